//! A bound on concurrent apiserver calls made to authenticate and authorize callers
//! (TokenReviews and node-authorization pod reads), with a bounded queue.
//!
//! At most `concurrency` calls run at once; up to `queue` more wait for a slot, each for at most
//! `queue_timeout`. A call beyond that, or one that waited too long, fails at once with
//! [`BackendError::Overloaded`], which callers see as `UNAVAILABLE`. Since kube's client speaks
//! HTTP/1.1 (one request per connection at a time), this also bounds meshid's apiserver
//! connections opened for authentication to `concurrency`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

use super::BackendError;

/// The limiter's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Calls running at once.
    pub concurrency: usize,
    /// Calls waiting for a slot, beyond which calls are refused.
    pub queue: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
}

impl Default for ApiLimits {
    /// 16 running, 1,000 queued, 5 s wait.
    fn default() -> Self {
        Self {
            concurrency: 16,
            queue: 1000,
            queue_timeout: Duration::from_secs(5),
        }
    }
}

/// See the module documentation. Cheap to clone; clones share the limits.
#[derive(Clone, Debug)]
pub struct ApiLimiter {
    /// Admission: running plus queued calls.
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    #[cfg(test)]
    concurrency: usize,
    queue_timeout: Duration,
    refused: Counter,
}

impl ApiLimiter {
    /// A limiter with `limits`; `refused` counts calls refused as overloaded.
    pub fn new(limits: ApiLimits, refused: Counter) -> Self {
        let concurrency = limits.concurrency.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(concurrency + limits.queue)),
            running: Arc::new(Semaphore::new(concurrency)),
            #[cfg(test)]
            concurrency,
            queue_timeout: limits.queue_timeout,
            refused,
        }
    }

    /// Runs `call` once a slot is free. Errors: [`BackendError::Overloaded`] when the queue is
    /// full or the wait exceeds the queue timeout; otherwise whatever `call` returns.
    pub async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let overloaded = || {
            self.refused.inc();
            BackendError::Overloaded
        };
        let _admitted = self.admitted.try_acquire().map_err(|_| overloaded())?;
        let _running = match tokio::time::timeout(self.queue_timeout, self.running.acquire()).await
        {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; a timeout is a full queue that did not drain.
            Ok(Err(_)) | Err(_) => return Err(overloaded()),
        };
        call.await
    }

    /// Calls running now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.concurrency - self.running.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn limiter(concurrency: usize, queue: usize) -> ApiLimiter {
        ApiLimiter::new(
            ApiLimits {
                concurrency,
                queue,
                queue_timeout: Duration::from_secs(5),
            },
            Counter::default(),
        )
    }

    #[tokio::test]
    async fn calls_beyond_the_concurrency_wait_and_beyond_the_queue_are_refused_at_once() {
        let l = limiter(2, 1);
        let mut gates = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel::<()>();
            gates.push(tx);
            let l = l.clone();
            calls.push(tokio::spawn(async move {
                l.run(async move {
                    let _ = rx.await;
                    Ok(())
                })
                .await
            }));
        }
        while l.running() < 2 {
            tokio::task::yield_now().await;
        }
        // Two run, one waits; the fourth finds the queue full.
        assert_eq!(l.run(async { Ok(()) }).await, Err(BackendError::Overloaded));
        assert_eq!(l.refused.get(), 1);
        for g in gates {
            let _ = g.send(());
        }
        for c in calls {
            assert_eq!(c.await.unwrap(), Ok(()));
        }
        // Slots come back: a legitimate call is served again.
        assert_eq!(l.run(async { Ok(7) }).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_longer_than_the_queue_timeout_is_refused() {
        let l = limiter(1, 10);
        let (_gate, rx) = oneshot::channel::<()>();
        let blocker = tokio::spawn({
            let l = l.clone();
            async move {
                l.run(async move {
                    let _ = rx.await;
                    Ok(())
                })
                .await
            }
        });
        while l.running() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(l.run(async { Ok(()) }).await, Err(BackendError::Overloaded));
        blocker.abort();
    }
}
