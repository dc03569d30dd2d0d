//! Client-side protection for PCA: a token bucket (requests per second), a bound on waiting
//! requests, jittered exponential backoff, and single-flight coalescing of identical requests.
//! All waiting uses `tokio::time`, so tests can pause time.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// governor's clock on `tokio::time`, so that tests which pause time also pause the bucket.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl governor::clock::Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

type DirectLimiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;

/// A token bucket (governor's GCRA): at most `burst` requests at once, refilled at `rate` per
/// second. Waiters are served in arrival order (a fair async mutex is held while waiting), and
/// a waiter that is cancelled consumes no token.
#[derive(Debug)]
pub struct TokenBucket {
    limiter: DirectLimiter,
    queue: tokio::sync::Mutex<()>,
}

impl TokenBucket {
    /// A full bucket refilling `per_second` tokens per second, holding at most `burst`.
    /// Both are at least 1.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let at_least_one = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota =
            governor::Quota::per_second(at_least_one(per_second)).allow_burst(at_least_one(burst));
        Self {
            limiter: governor::RateLimiter::direct_with_clock(quota, TokioClock),
            queue: tokio::sync::Mutex::new(()),
        }
    }

    /// Waits for one token and takes it.
    pub async fn acquire(&self) {
        let _turn = self.queue.lock().await;
        while let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&TokioClock));
            tokio::time::sleep(wait).await;
        }
    }
}

/// Bounds how many requests may wait for PCA at once.
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
}

impl Admission {
    /// Admits up to `capacity` requests at a time (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// A slot, held until dropped; `None` when all are taken (reject instead of queueing).
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Exponential backoff with "equal jitter": attempt `n` (0-based) waits between half and all of
/// `min(cap, base * 2^n)`, so retries spread out but never fire back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry `attempt` given a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.cap);
        let half = exp / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a random `unit`.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

/// Coalesces concurrent calls with the same key: one runs, the others wait for and share its
/// result. If the running caller is cancelled, a waiting one takes over. Finished results are
/// not cached: the next call after completion runs again.
///
/// Standard parts: the waiting and the takeover are `tokio::sync::OnceCell::get_or_init`; ours
/// is only the key map. Unlike `authn::SingleFlight` (on `futures::future::Shared`, which needs
/// a `'static` call) it runs a call that borrows the request, and a cancelled PCA request is
/// retried by the next waiter rather than kept running with nobody to answer.
#[derive(Debug)]
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `make()` unless a call with `key` is already running; returns its value and whether
    /// it was shared (`true` when this caller did not run it).
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = V>,
    {
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                make()
            })
            .await
            .clone();
        {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(&key);
            }
        }
        (value, !ran)
    }

    /// Keys currently running.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is running.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_spaces_requests_at_the_rate() {
        let bucket = TokenBucket::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            bucket.acquire().await;
        }
        // 10 more tokens at 10/s take one second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_never_exceed_the_rate() {
        let bucket = Arc::new(TokenBucket::new(5, 1));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let b = bucket.clone();
            tasks.push(tokio::spawn(async move {
                b.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().duration_since(start));
        }
        times.sort();
        for (i, t) in times.iter().enumerate() {
            // The i-th token is available at i/5 s.
            let due = Duration::from_millis(200 * i as u64);
            assert!(*t + Duration::from_millis(5) >= due, "token {i} at {t:?}");
        }
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(2));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_millis(1500));
        for n in 0..8 {
            let d = b.jittered(n);
            assert!(d >= b.delay(n, 0.0) && d <= b.delay(n, 1.0));
        }
    }

    #[test]
    fn admission_rejects_beyond_capacity_and_frees_slots_on_drop() {
        let a = Admission::new(2);
        let one = a.try_admit().unwrap();
        let _two = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(one);
        assert!(a.try_admit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn identical_concurrent_calls_run_once_and_share_the_result() {
        let sf = Arc::new(SingleFlight::<u8, u32>::default());
        let runs = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let sf = sf.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                sf.run(1, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    42
                })
                .await
            }));
        }
        let mut shared = 0;
        for t in tasks {
            let (v, s) = t.await.unwrap();
            assert_eq!(v, 42);
            shared += u32::from(s);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(shared, 4);
        assert!(sf.is_empty());
        // Finished results are not cached.
        sf.run(1, || async { 7 }).await;
        assert_eq!(sf.run(1, || async { 8 }).await, (8, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_takes_over_when_the_running_caller_is_cancelled() {
        let sf = Arc::new(SingleFlight::<u8, u32>::default());
        let first = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(1, || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    1
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = {
            let sf = sf.clone();
            tokio::spawn(async move { sf.run(1, || async { 2 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        assert_eq!(second.await.unwrap(), (2, false));
    }
}
