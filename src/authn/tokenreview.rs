//! Kubernetes TokenReview authentication: a local pre-check, a cache, one review in flight per
//! token and a bound on concurrent reviews.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::cache::TokenKey;
use super::{
    ApiLimiter, Authenticator, AuthnError, BackendError, Caller, Precheck, SingleFlight, TokenCache,
};
use crate::cluster::{ClusterRegistry, UnknownCluster};
use crate::telemetry::{ResultLabels, ServerMetrics};
use futures::future::BoxFuture;

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
    /// `status.audiences`: the requested audiences the token is valid for. Empty from an
    /// apiserver that is not audience-aware, or for a token valid only for the apiserver itself.
    pub audiences: Vec<String>,
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
    ) -> BoxFuture<'a, Result<ReviewResult, BackendError>>;
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
    ) -> BoxFuture<'a, Result<ReviewResult, BackendError>> {
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
                    .map_err(|_| BackendError::TimedOut)??;
            let status = created.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(ReviewResult {
                authenticated: status.authenticated.unwrap_or(false),
                username: user.username.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                audiences: status.audiences.unwrap_or_default(),
                error: status.error,
            })
        })
    }
}

/// The reviewer of one cluster, as [`Reviewers::for_cluster`] found it.
#[derive(Clone)]
pub struct ClusterReviewer {
    /// The cluster's ID.
    pub cluster: String,
    /// Its registration ([`crate::cluster::Cluster::generation`]), part of the cache key.
    pub generation: u64,
    /// Reviews tokens in that cluster.
    pub reviewer: Arc<dyn TokenReviewer>,
}

/// The [`TokenReviewer`] of each cluster served.
pub trait Reviewers: Send + Sync {
    /// The reviewer of the cluster `cluster_id` names (`None` or empty: the local cluster).
    /// Errors: [`UnknownCluster`] when no such cluster is served.
    fn for_cluster(&self, cluster_id: Option<&str>) -> Result<ClusterReviewer, UnknownCluster>;
}

/// One cluster, reviewed by one reviewer (the unit tests' scripted reviewer).
#[cfg(test)]
pub struct SingleCluster {
    reviewer: ClusterReviewer,
}

#[cfg(test)]
impl SingleCluster {
    /// Cluster `cluster_id`, reviewed by `reviewer`.
    pub fn new(cluster_id: &str, reviewer: Arc<dyn TokenReviewer>) -> Self {
        Self {
            reviewer: ClusterReviewer {
                cluster: cluster_id.to_owned(),
                generation: 0,
                reviewer,
            },
        }
    }
}

#[cfg(test)]
impl Reviewers for SingleCluster {
    fn for_cluster(&self, cluster_id: Option<&str>) -> Result<ClusterReviewer, UnknownCluster> {
        match cluster_id {
            None | Some("") => Ok(self.reviewer.clone()),
            Some(id) if id == self.reviewer.cluster => Ok(self.reviewer.clone()),
            Some(_) => Err(UnknownCluster),
        }
    }
}

/// Every cluster of a [`ClusterRegistry`], each reviewed through its own apiserver.
pub struct ClusterReviewers {
    registry: Arc<ClusterRegistry>,
    timeout: Duration,
}

impl ClusterReviewers {
    /// Reviews in the clusters `registry` serves at the time of each call; each review gives up
    /// after `timeout`.
    pub fn new(registry: Arc<ClusterRegistry>, timeout: Duration) -> Self {
        Self { registry, timeout }
    }
}

impl Reviewers for ClusterReviewers {
    fn for_cluster(&self, cluster_id: Option<&str>) -> Result<ClusterReviewer, UnknownCluster> {
        let set = self.registry.current();
        let cluster = set.resolve(cluster_id)?;
        Ok(ClusterReviewer {
            cluster: cluster.id().to_owned(),
            generation: cluster.generation(),
            reviewer: Arc::new(KubeTokenReviewer::new(
                cluster.client().clone(),
                self.timeout,
            )),
        })
    }
}

/// What a [`TokenReviewAuthenticator`] accepts and how it protects the apiserver.
#[derive(Debug)]
pub struct TokenReviewOptions {
    /// Audiences requested in every review; a token must be valid for one of them.
    pub audiences: Vec<String>,
    /// Accepted `iss` values; any issuer when empty (the claim must still be present).
    pub issuers: Vec<String>,
    /// Trust domain service accounts are mapped into.
    pub trust_domain: String,
    /// Results cache.
    pub cache: TokenCache,
    /// Bound on concurrent reviews (shared with other apiserver calls made for callers).
    pub limiter: ApiLimiter,
}

struct Inner {
    reviewers: Arc<dyn Reviewers>,
    audiences: Vec<String>,
    trust_domain: String,
    precheck: Precheck,
    cache: TokenCache,
    limiter: ApiLimiter,
    metrics: ServerMetrics,
}

/// Authenticates callers with TokenReview.
///
/// A token found in the cache gets the cached result. Otherwise it is pre-checked locally
/// ([`Precheck`]): what cannot be a valid token is refused without a review, and without a
/// cache entry. Then one review per token is made however many requests carry it at once
/// ([`SingleFlight`]), within the limits of the [`ApiLimiter`], and its result is cached before
/// the waiting requests see it.
pub struct TokenReviewAuthenticator {
    inner: Arc<Inner>,
    in_flight: SingleFlight<TokenKey, Result<Caller, AuthnError>>,
}

impl TokenReviewAuthenticator {
    /// Reviews tokens in the cluster each caller names, through `reviewers`, with `options`.
    pub fn new(
        reviewers: Arc<dyn Reviewers>,
        options: TokenReviewOptions,
        metrics: ServerMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                reviewers,
                precheck: Precheck::new(options.audiences.clone(), options.issuers),
                audiences: options.audiences,
                trust_domain: options.trust_domain,
                cache: options.cache,
                limiter: options.limiter,
                metrics,
            }),
            in_flight: SingleFlight::default(),
        }
    }
}

impl Inner {
    async fn review(&self, target: &ClusterReviewer, token: &str) -> Result<Caller, AuthnError> {
        let result = self
            .limiter
            .run(target.reviewer.review(token, &self.audiences))
            .await;
        let count = |result: &'static str| {
            self.metrics
                .tokenreviews
                .get_or_create(&ResultLabels { result })
                .inc();
        };
        match result {
            // Refused by the limiter: no review was made.
            Err(e @ BackendError::Overloaded) => {
                tracing::warn!(error = %e, cluster = %target.cluster, "TokenReview not attempted; failing closed");
                Err(AuthnError::Unavailable(e))
            }
            Err(e) => {
                count("error");
                tracing::warn!(error = %e, cluster = %target.cluster, "TokenReview unavailable; failing closed");
                Err(AuthnError::Unavailable(e))
            }
            Ok(r) if !r.authenticated => {
                count("unauthenticated");
                tracing::info!(
                    error = r.error.as_deref().unwrap_or(""),
                    "token not authenticated"
                );
                Err(AuthnError::Rejected)
            }
            Ok(r) => {
                count("authenticated");
                if !r.audiences.iter().any(|a| self.audiences.contains(a)) {
                    tracing::warn!(
                        audiences = ?r.audiences,
                        "TokenReview did not confirm a requested audience"
                    );
                    return Err(AuthnError::AudienceNotConfirmed);
                }
                Caller::from_username(
                    &self.trust_domain,
                    &target.cluster,
                    &r.username,
                    &r.groups,
                    &r.extra,
                )
            }
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        cluster: Option<&'a str>,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Caller, AuthnError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let target = inner
                .reviewers
                .for_cluster(cluster)
                .map_err(|_| AuthnError::UnknownCluster)?;
            if token.is_empty() {
                return Err(AuthnError::MissingToken);
            }
            let key = TokenCache::key(&target.cluster, target.generation, token);
            // Entries were pre-checked when they were made, and never outlive the token's `exp`.
            if let Some(hit) = inner.cache.get(&key, Instant::now()) {
                let result = if hit.is_ok() {
                    "hit_positive"
                } else {
                    "hit_negative"
                };
                inner
                    .metrics
                    .token_cache
                    .get_or_create(&ResultLabels { result })
                    .inc();
                return hit;
            }
            let claims = inner.precheck.check(token, SystemTime::now())?;
            inner
                .metrics
                .token_cache
                .get_or_create(&ResultLabels { result: "miss" })
                .inc();
            self.in_flight
                .run(key, || {
                    let inner = self.inner.clone();
                    let token = token.to_owned();
                    let target = target.clone();
                    Box::pin(async move {
                        let now = Instant::now();
                        // A review that completed after this request missed the cache has
                        // left its result there.
                        if let Some(hit) = inner.cache.get(&key, now) {
                            return hit;
                        }
                        let result = inner.review(&target, &token).await;
                        inner
                            .cache
                            .put(key, &result, &claims, now, SystemTime::now());
                        result
                    })
                })
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    //! These use a scripted, counting [`TokenReviewer`] to check the pre-check, caching,
    //! single-flight and fail-closed behaviour in isolation; the real apiserver path is covered
    //! by `tests/ca_server.rs` on the harness.
    use super::*;
    use crate::authn::{ApiLimits, CacheTtls, PrecheckError};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    /// Answers from a script (the last answer repeats), counting calls; while `gate` is set,
    /// each review waits for it to be notified.
    struct Scripted {
        answers: Mutex<Vec<Result<ReviewResult, BackendError>>>,
        calls: AtomicUsize,
        audiences: Mutex<Vec<Vec<String>>>,
        gate: Option<Arc<tokio::sync::Notify>>,
    }

    impl TokenReviewer for Scripted {
        fn review<'a>(
            &'a self,
            _t: &'a str,
            aud: &'a [String],
        ) -> BoxFuture<'a, Result<ReviewResult, BackendError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.audiences.lock().unwrap().push(aud.to_vec());
            let a = {
                let mut answers = self.answers.lock().unwrap();
                if answers.len() > 1 {
                    answers.remove(0)
                } else {
                    answers[0].clone()
                }
            };
            let gate = self.gate.clone();
            Box::pin(async move {
                if let Some(g) = gate {
                    g.notified().await;
                }
                a
            })
        }
    }

    fn ok_review() -> ReviewResult {
        ReviewResult {
            authenticated: true,
            username: "system:serviceaccount:ns:sa".into(),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec!["istio-ca".into()],
            ..Default::default()
        }
    }

    /// A token shaped like a service-account JWT for `istio-ca`, expiring in an hour.
    fn jwt(n: u32) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let enc = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(serde_json::json!({"aud": ["istio-ca"], "exp": exp, "iss": "k8s", "n": n}))
        )
    }

    fn build(
        answers: Vec<Result<ReviewResult, BackendError>>,
        gate: Option<Arc<tokio::sync::Notify>>,
        limits: ApiLimits,
    ) -> (Arc<Scripted>, TokenReviewAuthenticator) {
        let s = Arc::new(Scripted {
            answers: Mutex::new(answers),
            calls: AtomicUsize::new(0),
            audiences: Mutex::new(vec![]),
            gate,
        });
        let a = TokenReviewAuthenticator::new(
            Arc::new(SingleCluster::new("local", s.clone())),
            TokenReviewOptions {
                audiences: vec!["istio-ca".into()],
                issuers: vec![],
                trust_domain: "td".into(),
                cache: TokenCache::new(
                    CacheTtls {
                        positive: Duration::from_secs(60),
                        pod_bound: Duration::from_secs(4),
                        negative: Duration::from_secs(2),
                    },
                    1024,
                ),
                limiter: ApiLimiter::new(limits, Counter::default()),
            },
            ServerMetrics::new(),
        );
        (s, a)
    }

    fn authn(
        answers: Vec<Result<ReviewResult, BackendError>>,
    ) -> (Arc<Scripted>, TokenReviewAuthenticator) {
        build(answers, None, ApiLimits::default())
    }

    #[tokio::test]
    async fn a_second_call_with_the_same_token_is_served_from_the_cache() {
        let (s, a) = authn(vec![Ok(ok_review())]);
        assert!(a.authenticate(None, &jwt(1)).await.is_ok());
        assert!(a.authenticate(None, &jwt(1)).await.is_ok());
        assert_eq!(
            s.audiences.lock().unwrap().as_slice(),
            &[vec!["istio-ca".to_owned()]]
        );
    }

    #[tokio::test]
    async fn an_unreachable_apiserver_fails_closed_and_is_retried_next_time() {
        let (s, a) = authn(vec![
            Err(BackendError::Transport("connection refused".into())),
            Ok(ok_review()),
        ]);
        assert!(matches!(
            a.authenticate(None, &jwt(1)).await,
            Err(AuthnError::Unavailable(BackendError::Transport(_)))
        ));
        assert!(a.authenticate(None, &jwt(1)).await.is_ok());
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unauthenticated_review_is_a_rejection() {
        let (_s, a) = authn(vec![Ok(ReviewResult {
            error: Some("bad audience".into()),
            ..Default::default()
        })]);
        assert_eq!(
            a.authenticate(None, &jwt(1)).await,
            Err(AuthnError::Rejected)
        );
        assert_eq!(
            a.authenticate(None, "").await,
            Err(AuthnError::MissingToken)
        );
    }

    #[tokio::test]
    async fn an_accepted_token_whose_review_confirms_none_of_our_audiences_is_refused() {
        for audiences in [vec![], vec!["https://kubernetes.default.svc".to_owned()]] {
            let (_s, a) = authn(vec![Ok(ReviewResult {
                audiences,
                ..ok_review()
            })]);
            assert_eq!(
                a.authenticate(None, &jwt(1)).await,
                Err(AuthnError::AudienceNotConfirmed)
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_cluster_is_refused_before_any_review_and_the_local_one_by_its_id() {
        let (s, a) = authn(vec![Ok(ok_review())]);
        assert_eq!(
            a.authenticate(Some("elsewhere"), &jwt(1)).await,
            Err(AuthnError::UnknownCluster)
        );
        assert_eq!(s.calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            a.authenticate(Some("local"), &jwt(1))
                .await
                .unwrap()
                .cluster,
            "local"
        );
        // The same token with no header is the local cluster's: served from the cache.
        assert!(a.authenticate(None, &jwt(1)).await.is_ok());
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn junk_tokens_are_refused_without_a_review() {
        let (s, a) = authn(vec![Ok(ok_review())]);
        for junk in ["x", "a.b.c", "Bearer", &"A".repeat(20_000)] {
            assert!(
                matches!(
                    a.authenticate(None, junk).await,
                    Err(AuthnError::Precheck(_))
                ),
                "{junk:.20}"
            );
        }
        assert_eq!(
            a.authenticate(None, &jwt(1).replace("c2ln", "")).await,
            Err(AuthnError::Precheck(PrecheckError::Malformed))
        );
        assert_eq!(s.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn five_hundred_concurrent_requests_with_one_new_token_make_one_review() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, a) = build(
            vec![Ok(ok_review())],
            Some(gate.clone()),
            ApiLimits::default(),
        );
        let a = Arc::new(a);
        let token = jwt(42);
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..500 {
            let (a, token) = (a.clone(), token.clone());
            requests.spawn(async move { a.authenticate(None, &token).await });
        }
        // Every request has either joined the review in flight or not started yet.
        while s.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let results = requests.join_all().await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn reviews_beyond_the_concurrency_and_queue_fail_closed_as_overloaded() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let limits = ApiLimits {
            concurrency: 1,
            queue: 1,
            queue_timeout: Duration::from_secs(5),
        };
        let (s, a) = build(vec![Ok(ok_review())], Some(gate.clone()), limits);
        let a = Arc::new(a);
        let mut first_two = tokio::task::JoinSet::new();
        for n in 0..2 {
            let a = a.clone();
            first_two.spawn(async move { a.authenticate(None, &jwt(n)).await });
        }
        while s.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            a.authenticate(None, &jwt(3)).await,
            Err(AuthnError::Unavailable(BackendError::Overloaded))
        );
        // The running and the queued review complete.
        gate.notify_one();
        while s.calls.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert!(first_two.join_all().await.iter().all(Result::is_ok));
    }
}
