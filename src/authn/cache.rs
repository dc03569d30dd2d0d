//! A bounded cache of authentication results keyed by a SHA-256 of the token.
//!
//! Positive results live until the earliest of the token's own `exp` and the configured TTL,
//! which is shorter for pod-bound tokens (a deleted pod's token must stop working soon);
//! negative results live for a few seconds only; "unavailable" results are never cached. When
//! the cache is full, the least recently used entry makes room ([`lru::LruCache`]). Negative
//! results are kept apart, in a quarter of the room, so a flood of refused tokens cannot push
//! out the callers that were accepted.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::crypto::Sha256;
use lru::LruCache;

use super::{AuthnError, Caller, TokenClaims};

/// The key a token is cached under: its SHA-256. The token itself is never stored.
pub type TokenKey = [u8; 32];

/// How long results are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    /// Longest life of a positive result.
    pub positive: Duration,
    /// Longest life of a positive result for a token bound to a pod.
    pub pod_bound: Duration,
    /// Life of a negative result.
    pub negative: Duration,
}

struct Entry {
    result: Result<Caller, AuthnError>,
    expires: Instant,
}

/// Cache of authentication results. The token itself is never stored.
pub struct TokenCache {
    ttls: CacheTtls,
    entries: Mutex<Entries>,
}

struct Entries {
    positive: LruCache<TokenKey, Entry>,
    negative: LruCache<TokenKey, Entry>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("ttls", &self.ttls)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// Entries held by default (about 10 MiB at most).
    pub const DEFAULT_CAPACITY: usize = 65_536;

    /// A cache of at most `capacity` positive results (at least one) and a quarter of that
    /// negative ones, keeping results for `ttls`.
    pub fn new(ttls: CacheTtls, capacity: usize) -> Self {
        let room = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Self {
            ttls,
            entries: Mutex::new(Entries {
                positive: LruCache::new(room(capacity)),
                negative: LruCache::new(room(capacity / 4)),
            }),
        }
    }

    /// The key `token` is cached under when it was reviewed in `cluster`, registered as
    /// `generation` ([`crate::cluster::Cluster::generation`]): the same token string from two
    /// clusters, or from two registrations of one, never shares an entry.
    pub fn key(cluster: &str, generation: u64, token: &str) -> TokenKey {
        let mut h = Sha256::new();
        h.update((cluster.len() as u64).to_be_bytes());
        h.update(cluster.as_bytes());
        h.update(generation.to_be_bytes());
        h.update(token.as_bytes());
        h.finalize()
    }

    /// A cached result for `key`, if one is still fresh at `now`. A hit counts as a use.
    pub fn get(&self, key: &TokenKey, now: Instant) -> Option<Result<Caller, AuthnError>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Entries { positive, negative } = &mut *entries;
        for lru in [positive, negative] {
            match lru.get(key) {
                Some(e) if e.expires > now => return Some(e.result.clone()),
                Some(_) => {
                    lru.pop(key);
                }
                None => {}
            }
        }
        None
    }

    /// Records `result` for the token with `key` and (pre-checked) `claims`, reviewed at `now`
    /// (wall clock `wall_now`). Evicts the least recently used entry when full.
    pub fn put(
        &self,
        key: TokenKey,
        result: &Result<Caller, AuthnError>,
        claims: &TokenClaims,
        now: Instant,
        wall_now: SystemTime,
    ) {
        let ttl = match result {
            Ok(caller) => {
                let until_exp = claims
                    .expires
                    .duration_since(wall_now)
                    .unwrap_or(Duration::ZERO);
                let ttl = if caller.pod.is_some() || claims.pod_bound {
                    self.ttls.pod_bound.min(self.ttls.positive)
                } else {
                    self.ttls.positive
                };
                ttl.min(until_exp)
            }
            Err(AuthnError::Unavailable(_)) => return,
            Err(_) => self.ttls.negative,
        };
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let lru = if result.is_ok() {
            &mut entries.positive
        } else {
            &mut entries.negative
        };
        // Expired entries at the cold end go first: with every token new (the cold path), the
        // cache would otherwise fill to capacity with dead entries before the LRU evicted any
        // (a 10-minute soak grew RSS by about 0.4 KiB per token; docs/BENCHMARKS.md).
        while lru.peek_lru().is_some_and(|(_, e)| e.expires <= now) {
            lru.pop_lru();
        }
        lru.put(
            key,
            Entry {
                result: result.clone(),
                expires: now + ttl,
            },
        );
    }

    /// Number of entries (fresh or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.positive.len() + entries.negative.len()
    }

    /// Whether the cache is empty.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::{BackendError, PodRef};
    use crate::identity::SpiffeId;

    const TTLS: CacheTtls = CacheTtls {
        positive: Duration::from_secs(60),
        pod_bound: Duration::from_secs(4),
        negative: Duration::from_secs(2),
    };

    fn claims(expires_in: Duration) -> TokenClaims {
        TokenClaims {
            expires: SystemTime::now() + expires_in,
            pod_bound: false,
        }
    }

    fn caller() -> Result<Caller, AuthnError> {
        Ok(Caller {
            identity: SpiffeId::for_service_account("td", "a", "b").unwrap(),
            cluster: "c".into(),
            username: "system:serviceaccount:a:b".into(),
            pod: None,
        })
    }

    fn key(n: u32) -> TokenKey {
        TokenCache::key("c", 0, &format!("token-{n}"))
    }

    #[test]
    fn the_same_token_from_two_clusters_or_registrations_has_two_keys() {
        let k = TokenCache::key("a", 1, "t");
        assert_eq!(k, TokenCache::key("a", 1, "t"));
        assert_ne!(k, TokenCache::key("b", 1, "t"));
        assert_ne!(k, TokenCache::key("a", 2, "t"));
        // The cluster ID's length is part of the key: ("ab", "c") is not ("a", "bc").
        assert_ne!(TokenCache::key("a", 1, "bt"), TokenCache::key("ab", 1, "t"));
    }

    #[test]
    fn a_positive_result_is_never_cached_beyond_the_token_expiry() {
        let cache = TokenCache::new(TTLS, 16);
        let now = Instant::now();
        let c = claims(Duration::from_secs(10));
        cache.put(key(1), &caller(), &c, now, SystemTime::now());
        assert!(cache.get(&key(1), now + Duration::from_secs(5)).is_some());
        assert!(cache.get(&key(1), now + Duration::from_secs(11)).is_none());
    }

    #[test]
    fn expired_entries_at_the_cold_end_are_dropped_when_a_new_result_is_stored() {
        let cache = TokenCache::new(TTLS, 1000);
        let now = Instant::now();
        let c = claims(Duration::from_secs(3600));
        for n in 0..100 {
            cache.put(key(n), &caller(), &c, now, SystemTime::now());
        }
        assert_eq!(cache.len(), 100);
        // A minute later every one of them has expired: the next store drops them all.
        let later = now + Duration::from_secs(61);
        cache.put(key(1000), &caller(), &c, later, SystemTime::now());
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&key(1000), later).is_some());
    }

    #[test]
    fn a_positive_result_is_never_cached_beyond_the_ttl() {
        let cache = TokenCache::new(TTLS, 16);
        let now = Instant::now();
        let c = claims(Duration::from_secs(3600));
        cache.put(key(1), &caller(), &c, now, SystemTime::now());
        assert!(cache.get(&key(1), now + Duration::from_secs(59)).is_some());
        assert!(cache.get(&key(1), now + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn a_pod_bound_token_is_cached_only_for_the_short_pod_ttl() {
        let cache = TokenCache::new(TTLS, 16);
        let now = Instant::now();
        let long = claims(Duration::from_secs(3600));
        // Known pod-bound from the review's extras...
        let mut bound = caller().unwrap();
        bound.pod = Some(PodRef {
            name: "p".into(),
            uid: "u".into(),
        });
        cache.put(key(1), &Ok(bound), &long, now, SystemTime::now());
        // ...or from the token's claims.
        let pod_claims = TokenClaims {
            pod_bound: true,
            ..long
        };
        cache.put(key(2), &caller(), &pod_claims, now, SystemTime::now());
        for k in [key(1), key(2)] {
            assert!(cache.get(&k, now + Duration::from_secs(3)).is_some());
            assert!(cache.get(&k, now + Duration::from_secs(5)).is_none());
        }
    }

    #[test]
    fn negative_results_are_short_lived_and_unavailable_is_never_cached() {
        let cache = TokenCache::new(TTLS, 16);
        let now = Instant::now();
        let c = claims(Duration::from_secs(3600));
        cache.put(
            key(1),
            &Err(AuthnError::Rejected),
            &c,
            now,
            SystemTime::now(),
        );
        assert_eq!(
            cache.get(&key(1), now + Duration::from_secs(1)),
            Some(Err(AuthnError::Rejected))
        );
        assert_eq!(cache.get(&key(1), now + Duration::from_secs(3)), None);
        let down = Err(AuthnError::Unavailable(BackendError::TimedOut));
        cache.put(key(2), &down, &c, now, SystemTime::now());
        assert_eq!(cache.get(&key(2), now), None);
    }

    #[test]
    fn an_already_expired_token_is_not_cached() {
        let cache = TokenCache::new(TTLS, 16);
        let c = TokenClaims {
            expires: SystemTime::now() - Duration::from_secs(1),
            pod_bound: false,
        };
        cache.put(key(1), &caller(), &c, Instant::now(), SystemTime::now());
        assert!(cache.is_empty());
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_entry_and_keeps_the_others() {
        let cache = TokenCache::new(TTLS, 3);
        let now = Instant::now();
        let c = claims(Duration::from_secs(3600));
        for n in 1..=3 {
            cache.put(key(n), &caller(), &c, now, SystemTime::now());
        }
        // Token 1 is used again, so token 2 is now the least recently used.
        assert!(cache.get(&key(1), now).is_some());
        cache.put(key(4), &caller(), &c, now, SystemTime::now());
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key(2), now).is_none(), "evicted");
        for n in [1, 3, 4] {
            assert!(cache.get(&key(n), now).is_some(), "token {n} kept");
        }
    }

    #[test]
    fn a_flood_of_refused_tokens_never_pushes_out_accepted_callers() {
        let cache = TokenCache::new(TTLS, 8);
        let now = Instant::now();
        let c = claims(Duration::from_secs(3600));
        for n in 0..8 {
            cache.put(key(n), &caller(), &c, now, SystemTime::now());
        }
        for n in 100..10_000 {
            cache.put(
                key(n),
                &Err(AuthnError::Rejected),
                &c,
                now,
                SystemTime::now(),
            );
        }
        assert_eq!(cache.len(), 8 + 2);
        for n in 0..8 {
            assert!(cache.get(&key(n), now).is_some(), "token {n} kept");
        }
        assert!(
            cache.get(&key(9_999), now).is_some(),
            "the newest refusal is cached"
        );
    }
}
