//! A local check of a bearer token before the apiserver sees it.
//!
//! It refuses what cannot be a valid Kubernetes service-account token for this server, so that
//! junk never costs a TokenReview. It does not verify the signature: TokenReview stays the only
//! authority, and a token that passes here still has to be accepted by the apiserver.
//!
//! Checks, in order (each failure is one [`PrecheckError`]):
//! - at most [`MAX_TOKEN_BYTES`] bytes;
//! - compact JWS: three non-empty base64url parts (no padding), the first two JSON objects;
//! - `alg` is an asymmetric JWS algorithm (`RS*`, `PS*`, `ES*`, `EdDSA`): never `none`, never
//!   an HMAC;
//! - `exp` is present and in the future, and `nbf`, when present, is not in the future (both
//!   with [`CLOCK_SKEW`]);
//! - `aud` (a string or a list) names at least one of the configured audiences;
//! - `iss` is present and, when issuers are configured, one of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Longest token accepted. Kubernetes service-account tokens are 1–2 KB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Allowed difference between this server's clock and the token issuer's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Signature algorithms a Kubernetes token may use (asymmetric JWS algorithms).
const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
];

/// Why a token was refused before review. Never carries the token or its claims' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrecheckError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// Not three base64url parts with a JSON header and payload.
    #[error("token is not a JWT")]
    Malformed,
    /// `alg` is missing, `none`, symmetric or unknown.
    #[error("token algorithm not accepted")]
    Algorithm,
    /// `exp` is missing or not in the future, or `nbf` is in the future.
    #[error("token expired or not yet valid")]
    Expired,
    /// `aud` names none of the configured audiences.
    #[error("token audience not accepted")]
    Audience,
    /// `iss` is missing or not one of the configured issuers.
    #[error("token issuer not accepted")]
    Issuer,
}

impl PrecheckError {
    /// A short, stable label for metrics and audit logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLong => "token_too_long",
            Self::Malformed => "token_malformed",
            Self::Algorithm => "token_algorithm",
            Self::Expired => "token_expired",
            Self::Audience => "token_audience",
            Self::Issuer => "token_issuer",
        }
    }
}

/// What the pre-check learned from a token's claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenClaims {
    /// The `exp` claim.
    pub expires: SystemTime,
    /// The token is bound to a pod (it has a `kubernetes.io.pod` claim).
    pub pod_bound: bool,
}

/// The pre-check's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precheck {
    audiences: Vec<String>,
    issuers: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
}

/// The claims looked at; wrongly typed values are refused by the check they fail, not as
/// malformed.
#[derive(Deserialize)]
struct Claims {
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
    iss: Option<serde_json::Value>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<serde_json::Value>,
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, PrecheckError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| PrecheckError::Malformed)?;
    // A JWS header and a JWT claims set are JSON objects (RFC 7515 §4, RFC 7519 §7.2). serde
    // would also fill a struct from a JSON array, field by field in order: refuse that first.
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| PrecheckError::Malformed)?;
    serde_json::from_value(serde_json::Value::Object(object)).map_err(|_| PrecheckError::Malformed)
}

/// A NumericDate (seconds since the epoch) as a time.
fn unix(t: &serde_json::Value) -> Option<SystemTime> {
    let t = t.as_f64()?;
    (t.is_finite() && (0.0..1e12).contains(&t)).then(|| UNIX_EPOCH + Duration::from_secs_f64(t))
}

impl Precheck {
    /// Accepts tokens for any of `audiences`, from any of `issuers` (any issuer when empty; the
    /// claim must still be present).
    pub fn new(audiences: Vec<String>, issuers: Vec<String>) -> Self {
        Self { audiences, issuers }
    }

    /// Checks `token` at `now`. See the module documentation for what is checked.
    pub fn check(&self, token: &str, now: SystemTime) -> Result<TokenClaims, PrecheckError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(PrecheckError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(PrecheckError::Malformed);
        };
        if signature.is_empty() || URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(PrecheckError::Malformed);
        }
        let header: Header = decode_json(header)?;
        let claims: Claims = decode_json(payload)?;
        match header.alg.as_deref() {
            Some(alg) if ALGORITHMS.contains(&alg) => {}
            _ => return Err(PrecheckError::Algorithm),
        }
        let expires = claims
            .exp
            .as_ref()
            .and_then(unix)
            .ok_or(PrecheckError::Expired)?;
        if expires + CLOCK_SKEW <= now {
            return Err(PrecheckError::Expired);
        }
        if let Some(nbf) = &claims.nbf {
            let nbf = unix(nbf).ok_or(PrecheckError::Expired)?;
            if nbf > now + CLOCK_SKEW {
                return Err(PrecheckError::Expired);
            }
        }
        let ours = |a: &serde_json::Value| {
            a.as_str()
                .is_some_and(|a| self.audiences.iter().any(|x| x == a))
        };
        let audience_ok = match &claims.aud {
            Some(serde_json::Value::Array(list)) => list.iter().any(ours),
            Some(one) => ours(one),
            None => false,
        };
        if !audience_ok {
            return Err(PrecheckError::Audience);
        }
        match claims.iss.as_ref().and_then(|i| i.as_str()) {
            Some(iss) if !iss.is_empty() && self.issuers.is_empty() => {}
            Some(iss) if self.issuers.iter().any(|i| i == iss) => {}
            _ => return Err(PrecheckError::Issuer),
        }
        Ok(TokenClaims {
            expires,
            pod_bound: claims
                .kubernetes
                .is_some_and(|k| k.get("pod").is_some_and(|p| !p.is_null())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn enc(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn token(header: serde_json::Value, claims: serde_json::Value) -> String {
        format!("{}.{}.c2lnbmF0dXJl", enc(&header), enc(&claims))
    }

    fn claims() -> serde_json::Value {
        json!({
            "aud": ["istio-ca"],
            "exp": NOW + 3600,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:ns:sa",
        })
    }

    fn with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        let mut c = claims();
        edit(c.as_object_mut().unwrap());
        token(json!({"alg": "ES256", "kid": "k"}), c)
    }

    fn precheck() -> Precheck {
        Precheck::new(vec!["istio-ca".into(), "other".into()], vec![])
    }

    #[test]
    fn a_well_formed_unexpired_token_for_our_audience_passes_and_reports_its_expiry() {
        let claims = precheck().check(&with(|_| {}), now()).unwrap();
        assert_eq!(claims.expires, now() + Duration::from_secs(3600));
        assert!(!claims.pod_bound);
        let single_audience = with(|c| {
            c.insert("aud".into(), json!("other"));
        });
        assert!(precheck().check(&single_audience, now()).is_ok());
    }

    #[test]
    fn a_pod_bound_token_is_recognised_by_its_kubernetes_io_pod_claim() {
        let t = with(|c| {
            c.insert(
                "kubernetes.io".into(),
                json!({"namespace": "ns", "pod": {"name": "p", "uid": "u"},
                       "serviceaccount": {"name": "sa", "uid": "s"}}),
            );
        });
        assert!(precheck().check(&t, now()).unwrap().pod_bound);
        let unbound = with(|c| {
            c.insert(
                "kubernetes.io".into(),
                json!({"namespace": "ns", "serviceaccount": {"name": "sa", "uid": "s"}}),
            );
        });
        assert!(!precheck().check(&unbound, now()).unwrap().pod_bound);
    }

    #[test]
    fn what_is_not_a_compact_jws_with_json_header_and_payload_is_malformed() {
        let good = with(|_| {});
        let (h, rest) = good.split_once('.').unwrap();
        let (p, _s) = rest.split_once('.').unwrap();
        let cases = [
            String::new(),
            "junk".into(),
            "a.b".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}."),
            format!("{h}.{p}.sig.extra"),
            format!("{h}.{p}.c2ln=="),
            format!("{h}.{p}.!!"),
            format!("{h}.not-base64!.sig"),
            format!("{}.{p}.sig", URL_SAFE_NO_PAD.encode("not json")),
            format!("{h}.{}.sig", URL_SAFE_NO_PAD.encode("[1,2]")),
            format!("{h}.{}.sig", URL_SAFE_NO_PAD.encode("")),
            format!("{}.{p}.sig", enc(&json!("ES256"))),
        ];
        for t in cases {
            assert_eq!(
                precheck().check(&t, now()),
                Err(PrecheckError::Malformed),
                "{t}"
            );
        }
    }

    #[test]
    fn a_header_or_claims_set_that_is_a_json_array_is_malformed_even_if_its_values_fit_in_order() {
        // Found by the token_precheck fuzz target: serde fills a struct from a JSON array
        // field by field, so these passed as a valid header and claims (exp, nbf, aud, iss).
        let array_claims = json!([NOW + 3600, NOW - 10, "istio-ca", "https://issuer", null]);
        let t = token(json!({"alg": "ES256"}), array_claims);
        assert_eq!(precheck().check(&t, now()), Err(PrecheckError::Malformed));
        let t = token(json!(["ES256"]), claims());
        assert_eq!(precheck().check(&t, now()), Err(PrecheckError::Malformed));
    }

    #[test]
    fn alg_none_hmac_and_unknown_algorithms_are_refused() {
        for header in [
            json!({"alg": "none"}),
            json!({"alg": "HS256"}),
            json!({"alg": "es256"}),
            json!({"alg": ""}),
            json!({}),
        ] {
            let t = token(header.clone(), claims());
            assert_eq!(
                precheck().check(&t, now()),
                Err(PrecheckError::Algorithm),
                "{header}"
            );
        }
        for alg in ["RS256", "ES384", "PS512", "EdDSA"] {
            assert!(
                precheck()
                    .check(&token(json!({ "alg": alg }), claims()), now())
                    .is_ok()
            );
        }
    }

    #[test]
    fn a_missing_or_past_exp_and_a_future_nbf_are_refused_allowing_for_clock_skew() {
        let skew = CLOCK_SKEW.as_secs();
        let cases = [
            with(|c| {
                c.remove("exp");
            }),
            with(|c| {
                c.insert("exp".into(), json!("tomorrow"));
            }),
            with(|c| {
                c.insert("exp".into(), json!(NOW - skew - 1));
            }),
            with(|c| {
                c.insert("exp".into(), json!(-5));
            }),
            with(|c| {
                c.insert("nbf".into(), json!(NOW + skew + 1));
            }),
        ];
        for t in cases {
            assert_eq!(precheck().check(&t, now()), Err(PrecheckError::Expired));
        }
        let just_expired = with(|c| {
            c.insert("exp".into(), json!(NOW - 1));
        });
        assert!(
            precheck().check(&just_expired, now()).is_ok(),
            "within skew"
        );
    }

    #[test]
    fn a_token_for_another_or_no_audience_is_refused() {
        for aud in [
            Some(json!(["https://kubernetes.default.svc"])),
            Some(json!("istio")),
            Some(json!([])),
            Some(json!(42)),
            None,
        ] {
            let t = with(|c| match &aud {
                Some(a) => {
                    c.insert("aud".into(), a.clone());
                }
                None => {
                    c.remove("aud");
                }
            });
            assert_eq!(
                precheck().check(&t, now()),
                Err(PrecheckError::Audience),
                "{aud:?}"
            );
        }
    }

    #[test]
    fn the_issuer_must_be_present_and_one_of_the_configured_issuers() {
        let no_iss = with(|c| {
            c.remove("iss");
        });
        assert_eq!(precheck().check(&no_iss, now()), Err(PrecheckError::Issuer));
        let strict = Precheck::new(
            vec!["istio-ca".into()],
            vec!["https://issuer.example".into()],
        );
        assert_eq!(
            strict.check(&with(|_| {}), now()),
            Err(PrecheckError::Issuer)
        );
        let from_it = with(|c| {
            c.insert("iss".into(), json!("https://issuer.example"));
        });
        assert!(strict.check(&from_it, now()).is_ok());
    }

    #[test]
    fn an_oversized_token_is_refused_before_it_is_parsed() {
        let huge = with(|c| {
            c.insert("pad".into(), json!("x".repeat(MAX_TOKEN_BYTES)));
        });
        assert_eq!(precheck().check(&huge, now()), Err(PrecheckError::TooLong));
    }
}
