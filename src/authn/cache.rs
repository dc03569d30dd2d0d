//! A bounded cache of authentication results keyed by a SHA-256 of the token.
//!
//! Positive results live until the earliest of the token's own `exp` and the configured TTL;
//! negative results live for a few seconds only; "unavailable" results are never cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha2::{Digest, Sha256};

use super::{AuthnError, Caller};

/// How many entries the cache holds before it drops expired ones, then everything.
const MAX_ENTRIES: usize = 65_536;

type Key = [u8; 32];

struct Entry {
    result: Result<Caller, AuthnError>,
    expires: Instant,
}

/// Cache of authentication results. The token itself is never stored.
pub struct TokenCache {
    positive_ttl: Duration,
    negative_ttl: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("positive_ttl", &self.positive_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .finish_non_exhaustive()
    }
}

/// The key a token is cached under.
pub(crate) fn token_key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

/// The `exp` claim of a JWT, read without verifying it (only used to bound caching).
pub(crate) fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

impl TokenCache {
    /// A cache keeping positive results up to `positive_ttl` and negative ones `negative_ttl`.
    pub fn new(positive_ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            positive_ttl,
            negative_ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A cached result for `token`, if one is still fresh at `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<Result<Caller, AuthnError>> {
        let key = token_key(token);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(&key) {
            Some(e) if e.expires > now => Some(e.result.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Records `result` for `token` reviewed at `now` (wall clock `wall_now`).
    pub fn put(
        &self,
        token: &str,
        result: &Result<Caller, AuthnError>,
        now: Instant,
        wall_now: SystemTime,
    ) {
        let ttl = match result {
            Ok(_) => {
                let until_exp = match jwt_expiry(token) {
                    Some(exp) => exp.duration_since(wall_now).unwrap_or(Duration::ZERO),
                    None => self.positive_ttl,
                };
                self.positive_ttl.min(until_exp)
            }
            Err(AuthnError::Unavailable(_)) => return,
            Err(_) => self.negative_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            token_key(token),
            Entry {
                result: result.clone(),
                expires: now + ttl,
            },
        );
    }

    /// Number of entries (fresh or not).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn jwt(exp: u64) -> String {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            enc(&format!(r#"{{"exp":{exp}}}"#))
        )
    }

    fn caller() -> Result<Caller, AuthnError> {
        Ok(Caller {
            identity: SpiffeId::for_service_account("td", "a", "b").unwrap(),
            username: "system:serviceaccount:a:b".into(),
            pod: None,
        })
    }

    #[test]
    fn a_positive_result_is_never_cached_beyond_the_token_expiry() {
        let cache = TokenCache::new(Duration::from_secs(300), Duration::from_secs(2));
        let wall = SystemTime::now();
        let now = Instant::now();
        let exp = wall.duration_since(UNIX_EPOCH).unwrap().as_secs() + 10;
        let token = jwt(exp);
        cache.put(&token, &caller(), now, wall);
        assert!(cache.get(&token, now + Duration::from_secs(5)).is_some());
        assert!(cache.get(&token, now + Duration::from_secs(11)).is_none());
    }

    #[test]
    fn a_positive_result_is_never_cached_beyond_the_ttl() {
        let cache = TokenCache::new(Duration::from_secs(30), Duration::from_secs(2));
        let wall = SystemTime::now();
        let now = Instant::now();
        let token = jwt(wall.duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600);
        cache.put(&token, &caller(), now, wall);
        assert!(cache.get(&token, now + Duration::from_secs(29)).is_some());
        assert!(cache.get(&token, now + Duration::from_secs(31)).is_none());
    }

    #[test]
    fn negative_results_are_short_lived_and_unavailable_is_never_cached() {
        let cache = TokenCache::new(Duration::from_secs(300), Duration::from_secs(2));
        let now = Instant::now();
        cache.put("t1", &Err(AuthnError::Rejected), now, SystemTime::now());
        assert_eq!(
            cache.get("t1", now + Duration::from_secs(1)),
            Some(Err(AuthnError::Rejected))
        );
        assert_eq!(cache.get("t1", now + Duration::from_secs(3)), None);
        cache.put(
            "t2",
            &Err(AuthnError::Unavailable("down".into())),
            now,
            SystemTime::now(),
        );
        assert_eq!(cache.get("t2", now), None);
    }

    #[test]
    fn an_already_expired_token_is_not_cached() {
        let cache = TokenCache::new(Duration::from_secs(300), Duration::from_secs(2));
        let token = jwt(1);
        cache.put(&token, &caller(), Instant::now(), SystemTime::now());
        assert!(cache.is_empty());
    }
}
