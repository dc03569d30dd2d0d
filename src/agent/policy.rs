//! When to renew: pure functions of the certificate's lifetime, the time it was received and the
//! number of consecutive failures. The rotation loop ([`super::rotation`]) only sleeps for what
//! these return.

use std::time::Duration;

use time::OffsetDateTime;

use crate::schedule::{self, Backoff};

/// The rotation policy is invalid. The message names the setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `refresh_fraction` is not strictly between 0 and 1.
    #[error("refresh fraction must be > 0 and < 1, got {0}")]
    RefreshFraction(f64),
    /// `jitter` is not in `[0, 1)`.
    #[error("jitter must be >= 0 and < 1, got {0}")]
    Jitter(f64),
    /// The backoff bounds are zero or inverted.
    #[error("retry backoff must satisfy 0 < initial <= max")]
    Backoff,
}

/// When to renew a certificate, and how to back off while the CA fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotationPolicy {
    refresh_fraction: f64,
    jitter: f64,
    retry_initial: Duration,
    retry_max: Duration,
}

impl Default for RotationPolicy {
    /// Renew at half of the remaining lifetime with 10% jitter; retry after 1s, doubling up to
    /// 30s.
    fn default() -> Self {
        Self {
            refresh_fraction: 0.5,
            jitter: 0.1,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// Retries are never scheduled closer together than this, even when the certificate is about to
/// expire.
const MIN_RETRY: Duration = Duration::from_millis(100);

impl RotationPolicy {
    /// A policy that renews after `refresh_fraction` of the lifetime left when the certificate
    /// was received, up to `jitter` (a fraction of that delay) earlier, and retries failures
    /// after `retry_initial`, doubling up to `retry_max`.
    ///
    /// Errors: [`PolicyError::RefreshFraction`] unless `0 < refresh_fraction < 1`,
    /// [`PolicyError::Jitter`] unless `0 <= jitter < 1`, [`PolicyError::Backoff`] unless
    /// `0 < retry_initial <= retry_max`.
    pub fn new(
        refresh_fraction: f64,
        jitter: f64,
        retry_initial: Duration,
        retry_max: Duration,
    ) -> Result<Self, PolicyError> {
        if !(refresh_fraction > 0.0 && refresh_fraction < 1.0) {
            return Err(PolicyError::RefreshFraction(refresh_fraction));
        }
        if !(0.0..1.0).contains(&jitter) {
            return Err(PolicyError::Jitter(jitter));
        }
        if retry_initial.is_zero() || retry_initial > retry_max {
            return Err(PolicyError::Backoff);
        }
        Ok(Self {
            refresh_fraction,
            jitter,
            retry_initial,
            retry_max,
        })
    }

    /// The fraction of the remaining lifetime after which a certificate is renewed.
    pub fn refresh_fraction(&self) -> f64 {
        self.refresh_fraction
    }

    /// How long after `received_at` to renew a certificate valid from `not_before` until
    /// `not_after`. `jitter_sample` in `[0, 1)` moves the time earlier by up to the policy's
    /// jitter; it never moves it later.
    ///
    /// The lifetime counts from `max(received_at, not_before)`, not from `not_before`, because
    /// CAs backdate `not_before` for clock skew (meshid by a minute): for a 30-second SVID a
    /// refresh fraction measured from `not_before` would fall after expiry. A certificate that
    /// has already expired is renewed at once.
    pub fn refresh_in(
        &self,
        received_at: OffsetDateTime,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        jitter_sample: f64,
    ) -> Duration {
        let start = received_at.max(not_before);
        let jitter = self.jitter * jitter_sample.clamp(0.0, 1.0);
        let fraction = self.refresh_fraction * (1.0 - jitter);
        let until_refresh = schedule::until(
            start,
            schedule::point_of_lifetime(start, not_after, fraction),
        );
        // If the certificate is not valid yet (clock skew), wait at least until it is.
        until_refresh.max(schedule::until(received_at, not_before))
    }

    /// How long to wait after the `failures`-th consecutive failure (1 for the first) before the
    /// next attempt, when the certificate currently served stays valid for `remaining` (`None`
    /// when there is none, or it has expired).
    ///
    /// Exponential: `retry_initial * 2^(failures-1)`, capped at `retry_max`. While a valid
    /// certificate is held, the delay is also capped at a quarter of its remaining lifetime, so
    /// that several more attempts happen before it could lapse. `jitter_sample` in `[0, 1)`
    /// shortens the delay by up to the policy's jitter.
    pub fn retry_in(
        &self,
        failures: u32,
        remaining: Option<Duration>,
        jitter_sample: f64,
    ) -> Duration {
        let backoff = Backoff {
            base: self.retry_initial,
            cap: self.retry_max,
            jitter: self.jitter,
        };
        let mut delay = backoff.ceiling(failures.saturating_sub(1));
        if let Some(remaining) = remaining {
            delay = delay.min(remaining / 4);
        }
        backoff.shorten(delay, jitter_sample).max(MIN_RETRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-01T00:00:00Z.
    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
    }

    fn no_jitter() -> RotationPolicy {
        RotationPolicy::new(0.5, 0.0, Duration::from_secs(1), Duration::from_secs(30)).unwrap()
    }

    #[test]
    fn a_certificate_is_renewed_at_the_configured_fraction_of_its_lifetime() {
        let p =
            RotationPolicy::new(0.8, 0.0, Duration::from_secs(1), Duration::from_secs(30)).unwrap();
        let in_ = p.refresh_in(t0(), t0(), t0() + time::Duration::hours(10), 0.7);
        assert_eq!(in_, Duration::from_secs(8 * 3600));
    }

    #[test]
    fn a_backdated_not_before_does_not_push_the_refresh_past_expiry() {
        // meshid backdates by 60s: a 24s certificate is "84s long" by its fields.
        let not_before = t0() - time::Duration::seconds(60);
        let not_after = t0() + time::Duration::seconds(24);
        assert_eq!(
            no_jitter().refresh_in(t0(), not_before, not_after, 0.0),
            Duration::from_secs(12)
        );
    }

    #[test]
    fn jitter_only_ever_renews_earlier_and_by_at_most_the_jitter() {
        let p =
            RotationPolicy::new(0.5, 0.1, Duration::from_secs(1), Duration::from_secs(30)).unwrap();
        let not_after = t0() + time::Duration::seconds(1000);
        let earliest = p.refresh_in(t0(), t0(), not_after, 0.999_999);
        let latest = p.refresh_in(t0(), t0(), not_after, 0.0);
        assert_eq!(latest, Duration::from_secs(500));
        assert!(
            earliest >= Duration::from_secs(450) && earliest < latest,
            "{earliest:?}"
        );
    }

    #[test]
    fn an_expired_certificate_is_renewed_immediately() {
        let d = no_jitter().refresh_in(
            t0(),
            t0() - time::Duration::hours(2),
            t0() - time::Duration::hours(1),
            0.0,
        );
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn a_certificate_from_the_future_is_not_renewed_before_it_becomes_valid() {
        let nb = t0() + time::Duration::seconds(100);
        let d = no_jitter().refresh_in(t0(), nb, nb + time::Duration::seconds(10), 0.0);
        assert_eq!(d, Duration::from_secs(100));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let p = no_jitter();
        let delays: Vec<u64> = (1..=8)
            .map(|n| p.retry_in(n, None, 0.0).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(p.retry_in(u32::MAX, None, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn retries_speed_up_as_the_served_certificate_nears_expiry() {
        let p = no_jitter();
        assert_eq!(
            p.retry_in(8, Some(Duration::from_secs(40)), 0.0),
            Duration::from_secs(10)
        );
        assert_eq!(
            p.retry_in(8, Some(Duration::from_millis(10)), 0.0),
            MIN_RETRY
        );
        assert_eq!(
            p.retry_in(1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn invalid_policies_are_rejected_by_setting() {
        let s = Duration::from_secs(1);
        assert_eq!(
            RotationPolicy::new(1.0, 0.0, s, s),
            Err(PolicyError::RefreshFraction(1.0))
        );
        assert_eq!(
            RotationPolicy::new(0.0, 0.0, s, s),
            Err(PolicyError::RefreshFraction(0.0))
        );
        assert!(matches!(
            RotationPolicy::new(f64::NAN, 0.0, s, s),
            Err(PolicyError::RefreshFraction(_))
        ));
        assert_eq!(
            RotationPolicy::new(0.5, 1.0, s, s),
            Err(PolicyError::Jitter(1.0))
        );
        assert_eq!(
            RotationPolicy::new(0.5, 0.0, Duration::ZERO, s),
            Err(PolicyError::Backoff)
        );
        assert_eq!(
            RotationPolicy::new(0.5, 0.0, 2 * s, s),
            Err(PolicyError::Backoff)
        );
    }
}
