//! When renewal loops act: pure policies, shared by every loop that renews a certificate (the
//! server's serving certificate, istiod's certificate, the PCA-issued intermediate, the agent's
//! SVID) or retries a call (the PCA client). A loop asks these functions when, and only sleeps.

use std::time::Duration;

use time::OffsetDateTime;

/// The point `fraction` (in `[0, 1]`) of the way from `start` to `not_after`; `start` itself
/// when `not_after` is not later.
pub fn point_of_lifetime(
    start: OffsetDateTime,
    not_after: OffsetDateTime,
    fraction: f64,
) -> OffsetDateTime {
    let lifetime = Duration::try_from(not_after - start).unwrap_or(Duration::ZERO);
    start + lifetime.mul_f64(fraction.clamp(0.0, 1.0))
}

/// How long from `now` until `at`: zero once it has passed.
pub fn until(now: OffsetDateTime, at: OffsetDateTime) -> Duration {
    Duration::try_from(at - now).unwrap_or(Duration::ZERO)
}

/// Exponential backoff: attempt `n` (0-based) waits up to `min(cap, base * 2^n)`, shortened at
/// random by up to `jitter` (a fraction in `[0, 1)`) of it, so that retries spread out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
    /// The most a delay is shortened, as a fraction of it.
    pub jitter: f64,
}

impl Backoff {
    /// The same delay every time.
    pub const fn fixed(delay: Duration) -> Self {
        Self {
            base: delay,
            cap: delay,
            jitter: 0.0,
        }
    }

    /// The delay before attempt `attempt` without jitter: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.cap)
    }

    /// `delay` shortened by `jitter * unit` of it, for `unit` in `[0, 1]`.
    pub fn shorten(&self, delay: Duration, unit: f64) -> Duration {
        delay.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
    }

    /// The delay before attempt `attempt` for a given `unit` in `[0, 1]` (0: the ceiling).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        self.shorten(self.ceiling(attempt), unit)
    }

    /// [`Backoff::delay`] with a random `unit`.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000 + secs)
    }

    #[test]
    fn a_point_of_the_lifetime_is_that_fraction_of_the_way_to_expiry() {
        assert_eq!(point_of_lifetime(t(0), t(100), 0.5), t(50));
        assert_eq!(point_of_lifetime(t(0), t(100), 0.0), t(0));
        assert_eq!(point_of_lifetime(t(0), t(100), 2.0), t(100), "clamped");
        assert_eq!(
            point_of_lifetime(t(100), t(0), 0.5),
            t(100),
            "already expired"
        );
    }

    #[test]
    fn the_time_until_a_moment_is_zero_once_it_has_passed() {
        assert_eq!(until(t(0), t(30)), Duration::from_secs(30));
        assert_eq!(until(t(30), t(0)), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_and_jitter_only_shortens_it() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            jitter: 0.5,
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(50));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(10, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_millis(1500));
        for n in 0..8 {
            let d = b.jittered(n);
            assert!(d >= b.delay(n, 1.0) && d <= b.delay(n, 0.0), "{d:?}");
        }
    }

    #[test]
    fn a_fixed_backoff_never_changes() {
        let b = Backoff::fixed(Duration::from_secs(30));
        for n in [0, 1, 5, u32::MAX] {
            assert_eq!(b.jittered(n), Duration::from_secs(30));
        }
    }
}
