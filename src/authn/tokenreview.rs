//! Kubernetes TokenReview authentication, with caching.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::{Authenticator, AuthnError, Caller, TokenCache};
use crate::signer::BoxFuture;
use crate::telemetry::{ResultLabels, ServerMetrics};

/// What a TokenReview said about a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReviewResult {
    /// Whether the token is valid for one of the requested audiences.
    pub authenticated: bool,
    /// The authenticated username.
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Extra attributes (pod name and UID for pod-bound tokens).
    pub extra: BTreeMap<String, Vec<String>>,
    /// The apiserver's error text when not authenticated (logged, never returned to clients).
    pub error: Option<String>,
}

/// The one Kubernetes call authentication makes. Implemented by [`KubeTokenReviewer`].
pub trait TokenReviewer: Send + Sync {
    /// Reviews `token` for `audiences`. An `Err` means the apiserver could not answer.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewResult, String>>;
}

/// TokenReview through the Kubernetes API with a `kube::Client`.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
    timeout: Duration,
}

impl KubeTokenReviewer {
    /// Uses `client`; each review gives up after `timeout`.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewResult, String>> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(audiences.to_vec()),
                },
                ..Default::default()
            };
            let created =
                tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
                    .await
                    .map_err(|_| "TokenReview timed out".to_owned())?
                    // kube errors name the URL and status, never the request body.
                    .map_err(|e| format!("TokenReview failed: {e}"))?;
            let status = created.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(ReviewResult {
                authenticated: status.authenticated.unwrap_or(false),
                username: user.username.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                error: status.error,
            })
        })
    }
}

/// Authenticates callers with TokenReview, caching results (see [`TokenCache`]).
pub struct TokenReviewAuthenticator {
    reviewer: Arc<dyn TokenReviewer>,
    audiences: Vec<String>,
    trust_domain: String,
    cache: TokenCache,
    metrics: ServerMetrics,
}

impl TokenReviewAuthenticator {
    /// Authenticates tokens for `audiences`, mapping service accounts into `trust_domain`.
    pub fn new(
        reviewer: Arc<dyn TokenReviewer>,
        audiences: Vec<String>,
        trust_domain: String,
        cache: TokenCache,
        metrics: ServerMetrics,
    ) -> Self {
        Self {
            reviewer,
            audiences,
            trust_domain,
            cache,
            metrics,
        }
    }

    async fn review_uncached(&self, token: &str) -> Result<Caller, AuthnError> {
        let result = self.reviewer.review(token, &self.audiences).await;
        let label = |result: &'static str| ResultLabels { result };
        match result {
            Err(e) => {
                self.metrics
                    .tokenreviews
                    .get_or_create(&label("error"))
                    .inc();
                tracing::warn!(error = %e, "TokenReview unavailable; failing closed");
                Err(AuthnError::Unavailable(e))
            }
            Ok(r) if !r.authenticated => {
                self.metrics
                    .tokenreviews
                    .get_or_create(&label("unauthenticated"))
                    .inc();
                tracing::info!(
                    error = r.error.as_deref().unwrap_or(""),
                    "token not authenticated"
                );
                Err(AuthnError::Rejected)
            }
            Ok(r) => {
                self.metrics
                    .tokenreviews
                    .get_or_create(&label("authenticated"))
                    .inc();
                Caller::from_username(&self.trust_domain, &r.username, &r.groups, &r.extra)
            }
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthnError>> {
        Box::pin(async move {
            if token.is_empty() {
                return Err(AuthnError::MissingToken);
            }
            let now = Instant::now();
            if let Some(hit) = self.cache.get(token, now) {
                let result = if hit.is_ok() {
                    "hit_positive"
                } else {
                    "hit_negative"
                };
                self.metrics
                    .token_cache
                    .get_or_create(&ResultLabels { result })
                    .inc();
                return hit;
            }
            self.metrics
                .token_cache
                .get_or_create(&ResultLabels { result: "miss" })
                .inc();
            let result = self.review_uncached(token).await;
            self.cache.put(token, &result, now, SystemTime::now());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    //! These use a scripted [`TokenReviewer`] to check caching and fail-closed behaviour in
    //! isolation; the real apiserver path is covered by `tests/ca_server.rs` on the harness.
    use super::*;
    use std::sync::Mutex;

    struct Scripted {
        answers: Mutex<Vec<Result<ReviewResult, String>>>,
        calls: Mutex<Vec<Vec<String>>>,
    }

    impl TokenReviewer for Scripted {
        fn review<'a>(
            &'a self,
            _t: &'a str,
            aud: &'a [String],
        ) -> BoxFuture<'a, Result<ReviewResult, String>> {
            self.calls.lock().unwrap().push(aud.to_vec());
            let a = self.answers.lock().unwrap().remove(0);
            Box::pin(async move { a })
        }
    }

    fn ok_review() -> ReviewResult {
        ReviewResult {
            authenticated: true,
            username: "system:serviceaccount:ns:sa".into(),
            groups: vec!["system:serviceaccounts".into()],
            ..Default::default()
        }
    }

    fn authn(
        answers: Vec<Result<ReviewResult, String>>,
    ) -> (Arc<Scripted>, TokenReviewAuthenticator) {
        let s = Arc::new(Scripted {
            answers: Mutex::new(answers),
            calls: Mutex::new(vec![]),
        });
        let a = TokenReviewAuthenticator::new(
            s.clone(),
            vec!["istio-ca".into()],
            "td".into(),
            TokenCache::new(Duration::from_secs(60), Duration::from_secs(2)),
            ServerMetrics::new(),
        );
        (s, a)
    }

    #[tokio::test]
    async fn a_second_call_with_the_same_token_is_served_from_the_cache() {
        let (s, a) = authn(vec![Ok(ok_review())]);
        assert!(a.authenticate("tok").await.is_ok());
        assert!(a.authenticate("tok").await.is_ok());
        assert_eq!(
            s.calls.lock().unwrap().as_slice(),
            &[vec!["istio-ca".to_owned()]]
        );
    }

    #[tokio::test]
    async fn an_unreachable_apiserver_fails_closed_and_is_retried_next_time() {
        let (s, a) = authn(vec![Err("connection refused".into()), Ok(ok_review())]);
        assert!(matches!(
            a.authenticate("tok").await,
            Err(AuthnError::Unavailable(_))
        ));
        assert!(a.authenticate("tok").await.is_ok());
        assert_eq!(s.calls.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_unauthenticated_review_is_a_rejection() {
        let (_s, a) = authn(vec![Ok(ReviewResult {
            error: Some("bad audience".into()),
            ..Default::default()
        })]);
        assert_eq!(a.authenticate("tok").await, Err(AuthnError::Rejected));
        assert_eq!(a.authenticate("").await, Err(AuthnError::MissingToken));
    }
}
