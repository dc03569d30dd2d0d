//! Single-flight: concurrent callers asking for the same key share one in-flight call.
//!
//! Built on [`futures::future::Shared`]: the first caller starts the call and every caller that
//! arrives while it runs awaits a clone of the same future. The call runs as long as at least one
//! caller still waits for it; a caller that goes away (its request was cancelled) does not cancel
//! it for the others, and when the last one goes away the call is dropped.
//!
//! The call itself should record its result where later callers look first (a cache) before it
//! completes: the key is forgotten here as soon as the call completes. And it should look there
//! first itself: a caller that missed the cache just before another call completed may start a
//! new call just after it.
//!
//! Standard parts: the sharing is `futures::future::Shared`; what is ours is only the map from
//! key to call and forgetting the key when the call completes or its last waiter leaves (about
//! 40 lines). A crate for this would add a dependency to save those lines and would not know
//! when our waiters leave.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::FutureExt;
use futures::future::Shared;

use futures::future::BoxFuture;

type Call<V> = Shared<BoxFuture<'static, V>>;

/// In-flight calls by key. See the module documentation.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, (u64, Call<V>)>>,
    next_id: AtomicU64,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<K, V> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &self.len())
            .finish()
    }
}

impl<K, V> SingleFlight<K, V> {
    /// Number of calls in flight.
    pub fn len(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no call is in flight.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone + Send + Sync + 'static,
{
    /// The result of the call in flight for `key`, or of a new one made by `start` when there is
    /// none. `start` is called at most once, and only when no call for `key` is in flight.
    pub async fn run(&self, key: K, start: impl FnOnce() -> BoxFuture<'static, V>) -> V {
        let (id, call) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key) {
                Some((id, call)) => (*id, call.clone()),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let call = start().shared();
                    inflight.insert(key.clone(), (id, call.clone()));
                    (id, call)
                }
            }
        };
        let mut waiter = Waiter {
            flight: self,
            key,
            id,
            call,
            done: false,
        };
        let out = (&mut waiter.call).await;
        waiter.done = true;
        out
    }
}

/// One caller waiting for a call; forgets the call when it completes, or when this was the
/// last caller waiting for it.
struct Waiter<'a, K: Hash + Eq, V> {
    flight: &'a SingleFlight<K, V>,
    key: K,
    id: u64,
    call: Call<V>,
    done: bool,
}

impl<K: Hash + Eq, V> Drop for Waiter<'_, K, V> {
    fn drop(&mut self) {
        let mut inflight = self
            .flight
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some((id, call)) = inflight.get(&self.key) else {
            return;
        };
        // Two holders left (the map and this waiter) means nobody else waits.
        let abandoned = call.strong_count() == Some(2);
        if *id == self.id && (self.done || abandoned) {
            inflight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn counting_call(
        calls: &Arc<AtomicUsize>,
        gate: &Arc<tokio::sync::Notify>,
    ) -> impl FnOnce() -> BoxFuture<'static, usize> + use<> {
        let calls = calls.clone();
        let gate = gate.clone();
        move || {
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                gate.notified().await;
                n
            })
        }
    }

    #[tokio::test]
    async fn concurrent_callers_with_the_same_key_share_one_call() {
        let flight = Arc::new(SingleFlight::<u8, usize>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..500 {
            let (flight, start) = (flight.clone(), counting_call(&calls, &gate));
            waiters.spawn(async move { flight.run(7, start).await });
        }
        while calls.load(Ordering::SeqCst) == 0 || flight.is_empty() {
            tokio::task::yield_now().await;
        }
        // Let every waiter reach the shared call before it completes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let results: Vec<usize> = waiters.join_all().await;
        assert_eq!(results.len(), 500);
        assert!(results.iter().all(|n| *n == 1), "every caller saw call #1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flight.is_empty(), "a completed call is forgotten");
    }

    #[tokio::test]
    async fn a_completed_call_is_not_reused_and_different_keys_do_not_share() {
        let flight = SingleFlight::<u8, usize>::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        gate.notify_one();
        assert_eq!(flight.run(1, counting_call(&calls, &gate)).await, 1);
        gate.notify_one();
        assert_eq!(flight.run(1, counting_call(&calls, &gate)).await, 2);
        gate.notify_one();
        assert_eq!(flight.run(2, counting_call(&calls, &gate)).await, 3);
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_cancel_the_call_for_the_others_and_the_last_one_frees_it()
    {
        let flight = Arc::new(SingleFlight::<u8, usize>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let first = tokio::spawn({
            let (flight, start) = (flight.clone(), counting_call(&calls, &gate));
            async move { flight.run(1, start).await }
        });
        let second = tokio::spawn({
            let (flight, start) = (flight.clone(), counting_call(&calls, &gate));
            async move { flight.run(1, start).await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        first.abort();
        let _ = first.await;
        assert_eq!(flight.len(), 1, "the second caller still waits");
        gate.notify_one();
        assert_eq!(second.await.unwrap(), 1);
        assert!(flight.is_empty());

        // When every caller goes away, the key is forgotten and the next caller starts afresh.
        let lone = tokio::spawn({
            let (flight, start) = (flight.clone(), counting_call(&calls, &gate));
            async move { flight.run(1, start).await }
        });
        while calls.load(Ordering::SeqCst) == 1 {
            tokio::task::yield_now().await;
        }
        lone.abort();
        let _ = lone.await;
        assert!(flight.is_empty());
        let gate2 = Arc::new(tokio::sync::Notify::new());
        gate2.notify_one();
        assert_eq!(flight.run(1, counting_call(&calls, &gate2)).await, 3);
    }
}
