//! The per-identity issuance rate limit: a token bucket (governor's keyed GCRA limiter) per
//! SPIFFE ID, and per pod when the caller's token is bound to one.
//!
//! - A fresh key starts with a full bucket of `burst` certificates, so a workload's first
//!   certificate after a pod start is never delayed: a new pod is a new key.
//! - One more certificate is allowed every `interval`; beyond that the request is refused with
//!   the time until the next one ([`IssuanceLimiter::check`]).
//! - Memory is bounded: keys whose bucket has been full again for an interval are dropped
//!   (`retain_recent`) every [`SWEEP_EVERY`] checks, and whenever the map reaches `max_keys`.
//!   If it is still full after that sweep, the request is admitted without being tracked
//!   ([`Admission::Untracked`]) rather than delaying a first certificate; that is counted in a
//!   metric. 100,000 keys of a SPIFFE ID and a pod UID take about 20 MB.
//!
//! The state is in memory: each replica limits what it issues itself.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::identity::SpiffeId;

/// Default bucket size: certificates one identity (one pod, for pod-bound tokens) may obtain
/// at once.
pub const DEFAULT_BURST: u32 = 20;
/// Default refill interval: one more certificate per identity (and pod) every 10 seconds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default most keys tracked at once (an identity, a pod UID and 8 bytes of state each: about
/// 200 bytes with the map's overhead, 20 MB in all).
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Idle keys are swept after this many checks (a sweep visits every key: with at most
/// `max_keys` of them, about one visit per check).
pub const SWEEP_EVERY: u64 = 65_536;

/// Settings of the per-identity issuance rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuanceLimitSettings {
    /// Certificates a key may obtain at once (the bucket size).
    pub burst: NonZeroU32,
    /// One more certificate per key every `interval`.
    pub interval: Duration,
    /// Most keys tracked at once.
    pub max_keys: usize,
}

impl Default for IssuanceLimitSettings {
    fn default() -> Self {
        Self {
            burst: NonZeroU32::new(DEFAULT_BURST).unwrap_or(NonZeroU32::MIN),
            interval: DEFAULT_INTERVAL,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// What a bucket is kept for: the identity certified and, when the caller's token is bound to a
/// pod, that pod's UID (for ztunnel, its own pod: one bucket per workload identity per node).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IssuanceKey {
    identity: SpiffeId,
    pod_uid: Option<String>,
}

impl IssuanceKey {
    /// The key for certificates of `identity` requested by the pod `pod_uid` (if known).
    pub fn new(identity: &SpiffeId, pod_uid: Option<&str>) -> Self {
        Self {
            identity: identity.clone(),
            pod_uid: pod_uid.map(str::to_owned),
        }
    }
}

/// The outcome of [`IssuanceLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the limit.
    Admitted,
    /// Admitted without a bucket: the limiter is tracking `max_keys` recent keys already.
    Untracked,
    /// Over the limit: the next certificate for this key is allowed in `retry_after`.
    Limited {
        /// Time until the bucket holds a token again.
        retry_after: Duration,
    },
}

/// A token bucket per [`IssuanceKey`], bounded in memory.
pub struct IssuanceLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<
        IssuanceKey,
        DefaultKeyedStateStore<IssuanceKey>,
        C,
        NoOpMiddleware<<C as Clock>::Instant>,
    >,
    max_keys: usize,
    checks: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for IssuanceLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuanceLimiter")
            .field("keys", &self.limiter.len())
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

fn quota(settings: &IssuanceLimitSettings) -> Quota {
    // A zero interval is refused by configuration; 1ms keeps the quota valid regardless.
    Quota::with_period(settings.interval.max(Duration::from_millis(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(settings.burst)
}

impl IssuanceLimiter {
    /// A limiter on the monotonic clock.
    pub fn new(settings: &IssuanceLimitSettings) -> Self {
        Self::with_clock(settings, DefaultClock::default())
    }
}

impl<C: Clock> IssuanceLimiter<C> {
    /// A limiter on `clock` (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(settings: &IssuanceLimitSettings, clock: C) -> Self {
        Self {
            limiter: RateLimiter::new(quota(settings), DefaultKeyedStateStore::default(), clock),
            max_keys: settings.max_keys.max(1),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes a token from `key`'s bucket if it has one.
    pub fn check(&self, key: &IssuanceKey) -> Admission {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        if self.limiter.len() >= self.max_keys {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            if self.limiter.len() >= self.max_keys {
                return Admission::Untracked;
            }
        }
        match self.limiter.check_key(key) {
            Ok(()) => Admission::Admitted,
            Err(not_until) => Admission::Limited {
                retry_after: not_until.wait_time_from(self.limiter.clock().now()),
            },
        }
    }

    /// How many keys are tracked now.
    #[cfg(test)]
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::for_service_account("td", "ns", sa).unwrap()
    }

    fn settings(burst: u32, interval_secs: u64, max_keys: usize) -> IssuanceLimitSettings {
        IssuanceLimitSettings {
            burst: NonZeroU32::new(burst).unwrap(),
            interval: Duration::from_secs(interval_secs),
            max_keys,
        }
    }

    #[test]
    fn a_key_gets_its_burst_at_once_then_one_per_interval_with_the_wait_as_retry_hint() {
        let clock = FakeRelativeClock::default();
        let limiter = IssuanceLimiter::with_clock(&settings(3, 10, 100), clock.clone());
        let key = IssuanceKey::new(&id("web"), None);
        for _ in 0..3 {
            assert_eq!(limiter.check(&key), Admission::Admitted);
        }
        assert_eq!(
            limiter.check(&key),
            Admission::Limited {
                retry_after: Duration::from_secs(10)
            }
        );
        clock.advance(Duration::from_secs(4));
        assert_eq!(
            limiter.check(&key),
            Admission::Limited {
                retry_after: Duration::from_secs(6)
            }
        );
        clock.advance(Duration::from_secs(6));
        assert_eq!(limiter.check(&key), Admission::Admitted);
        assert!(matches!(limiter.check(&key), Admission::Limited { .. }));
    }

    #[test]
    fn an_exhausted_identity_does_not_limit_another_identity_or_another_pod() {
        let limiter =
            IssuanceLimiter::with_clock(&settings(1, 60, 100), FakeRelativeClock::default());
        let web = IssuanceKey::new(&id("web"), None);
        assert_eq!(limiter.check(&web), Admission::Admitted);
        assert!(matches!(limiter.check(&web), Admission::Limited { .. }));
        // Another identity, and the same identity in a new pod, start with a full bucket.
        assert_eq!(
            limiter.check(&IssuanceKey::new(&id("db"), None)),
            Admission::Admitted
        );
        assert_eq!(
            limiter.check(&IssuanceKey::new(&id("web"), Some("pod-2"))),
            Admission::Admitted
        );
        assert!(matches!(limiter.check(&web), Admission::Limited { .. }));
    }

    #[test]
    fn keys_whose_bucket_refilled_are_dropped_so_memory_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let limiter = IssuanceLimiter::with_clock(&settings(2, 10, 3), clock.clone());
        for sa in ["a", "b", "c"] {
            assert_eq!(
                limiter.check(&IssuanceKey::new(&id(sa), None)),
                Admission::Admitted
            );
        }
        assert_eq!(limiter.tracked_keys(), 3);
        // Full while every bucket is still refilling: a fourth identity is served, untracked.
        assert_eq!(
            limiter.check(&IssuanceKey::new(&id("d"), None)),
            Admission::Untracked
        );
        assert_eq!(limiter.tracked_keys(), 3);
        // An interval after their buckets are full again (governor's margin) the old keys are
        // swept, and new ones are tracked.
        clock.advance(Duration::from_secs(20));
        assert_eq!(
            limiter.check(&IssuanceKey::new(&id("d"), None)),
            Admission::Admitted
        );
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn idle_keys_are_swept_periodically_without_reaching_the_cap() {
        let clock = FakeRelativeClock::default();
        let limiter = IssuanceLimiter::with_clock(&settings(1, 1, 1_000_000), clock.clone());
        limiter.check(&IssuanceKey::new(&id("idle"), None));
        clock.advance(Duration::from_secs(3));
        let busy = IssuanceKey::new(&id("busy"), None);
        for _ in 0..SWEEP_EVERY {
            limiter.check(&busy);
        }
        assert_eq!(limiter.tracked_keys(), 1, "only the busy key is left");
    }
}
