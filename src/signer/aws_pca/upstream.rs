//! Calls to PCA with the protections around them: every request waits for the token bucket,
//! is timed and counted, and retryable failures are retried with jittered backoff; issuance
//! waits for the certificate by polling `GetCertificate`.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::PcaError;
use super::api::{Api, ApiError, CaDescription, CertificateAndChain, IssueRequest, PcaApi};
use super::limit::{Backoff, TokenBucket};
use super::metrics::{KindLabels, PcaMetrics};
use futures::future::BoxFuture;

/// How hard to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call for retryable failures (throttling, timeouts, 5xx), at least 1.
    pub attempts: u32,
    /// Delay between those attempts.
    pub backoff: Backoff,
    /// `GetCertificate` polls while the certificate is in progress.
    pub polls: u32,
    /// Delay between polls.
    pub poll_backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Backoff {
                base: Duration::from_millis(200),
                cap: Duration::from_secs(5),
            },
            polls: 30,
            poll_backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
            },
        }
    }
}

/// PCA returns the certificate already issued for an idempotency token reused within this
/// long, and issues (and bills) a new one after it.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// A PCA CA as seen through [`PcaApi`], with rate limiting, retries and metrics.
pub struct Upstream {
    api: Arc<dyn PcaApi>,
    ca_arn: String,
    bucket: TokenBucket,
    retry: RetryPolicy,
    metrics: PcaMetrics,
    /// Idempotency tokens counted as billed certificates, and when; entries older than
    /// [`IDEMPOTENCY_WINDOW`] are dropped, so the map holds at most what the rate limit lets
    /// through in that window.
    billed: Mutex<Billed>,
}

/// Tokens counted within the window: a set, and the same tokens oldest first for expiry.
#[derive(Default)]
struct Billed {
    tokens: HashSet<String>,
    order: VecDeque<(Instant, String)>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("ca_arn", &self.ca_arn)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Calls `api` for `ca_arn` at most `requests_per_second` times per second (bursts of the
    /// same size).
    pub fn new(
        api: Arc<dyn PcaApi>,
        ca_arn: String,
        requests_per_second: u32,
        retry: RetryPolicy,
        metrics: PcaMetrics,
    ) -> Self {
        Self {
            api,
            ca_arn,
            bucket: TokenBucket::new(requests_per_second, requests_per_second),
            retry,
            metrics,
            billed: Mutex::new(Billed::default()),
        }
    }

    /// Whether a successful `IssueCertificate` with `token` is a new certificate: the first
    /// use of the token within [`IDEMPOTENCY_WINDOW`].
    fn first_use(&self, token: &str) -> bool {
        let now = Instant::now();
        let mut billed = self.billed.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, _)) = billed.order.front() {
            if now.duration_since(*at) < IDEMPOTENCY_WINDOW {
                break;
            }
            if let Some((_, old)) = billed.order.pop_front() {
                billed.tokens.remove(&old);
            }
        }
        if !billed.tokens.insert(token.to_owned()) {
            return false;
        }
        billed.order.push_back((now, token.to_owned()));
        true
    }

    /// The CA ARN.
    pub fn ca_arn(&self) -> &str {
        &self.ca_arn
    }

    /// The metrics.
    pub fn metrics(&self) -> &PcaMetrics {
        &self.metrics
    }

    fn fail(&self, api: Api, source: ApiError) -> PcaError {
        PcaError::Call {
            api,
            arn: self.ca_arn.clone(),
            source,
        }
    }

    /// One request: waits for a token, then makes, times and counts it. The call is created
    /// only once the token is granted, so even an eager [`PcaApi`] implementation is limited.
    async fn once<'a, T>(
        &'a self,
        api: Api,
        call: impl FnOnce() -> BoxFuture<'a, Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.bucket.acquire().await;
        let started = tokio::time::Instant::now();
        let result = call().await;
        let seconds = started.elapsed().as_secs_f64();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics.observe(api, outcome, seconds);
        match &result {
            Err(e @ ApiError::Throttled { .. }) => {
                tracing::warn!(api = api.name(), error = %e, "AWS Private CA throttled a call");
            }
            _ => tracing::debug!(api = api.name(), outcome, seconds, "AWS Private CA call"),
        }
        result
    }

    /// `call` until it succeeds, fails for good, or the attempts run out.
    async fn with_retries<'a, T>(
        &'a self,
        api: Api,
        mut call: impl FnMut() -> BoxFuture<'a, Result<T, ApiError>>,
    ) -> Result<T, PcaError> {
        let mut attempt = 0;
        loop {
            match self.once(api, &mut call).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt + 1 < self.retry.attempts => {
                    tokio::time::sleep(self.retry.backoff.jittered(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.fail(api, e)),
            }
        }
    }

    /// `DescribeCertificateAuthority`.
    pub async fn describe(&self) -> Result<CaDescription, PcaError> {
        self.with_retries(Api::Describe, || {
            self.api.describe_certificate_authority(&self.ca_arn)
        })
        .await
    }

    /// `GetCertificateAuthorityCertificate`.
    pub async fn ca_certificate(&self) -> Result<CertificateAndChain, PcaError> {
        self.with_retries(Api::GetCaCertificate, || {
            self.api.get_certificate_authority_certificate(&self.ca_arn)
        })
        .await
    }

    /// `IssueCertificate` (retried with the same idempotency token, so at most one certificate
    /// results), then `GetCertificate` until it is ready. `kind` labels the issued-certificate
    /// counter (`leaf` or `intermediate`), which counts each token once per
    /// [`IDEMPOTENCY_WINDOW`], as PCA bills.
    pub async fn issue(
        &self,
        req: &IssueRequest,
        kind: &'static str,
    ) -> Result<CertificateAndChain, PcaError> {
        let certificate_arn = self
            .with_retries(Api::Issue, || self.api.issue_certificate(req))
            .await?;
        if self.first_use(&req.idempotency_token) {
            self.metrics
                .certificates_issued
                .get_or_create(&KindLabels { kind })
                .inc();
        }
        let mut retries = 0;
        for poll in 0..self.retry.polls {
            let got = self
                .once(Api::Get, || {
                    self.api.get_certificate(&self.ca_arn, &certificate_arn)
                })
                .await;
            match got {
                Ok(c) => return Ok(c),
                Err(ApiError::InProgress) => {
                    tokio::time::sleep(self.retry.poll_backoff.jittered(poll)).await;
                }
                Err(e) if e.is_retryable() && retries + 1 < self.retry.attempts => {
                    tokio::time::sleep(self.retry.backoff.jittered(retries)).await;
                    retries += 1;
                }
                Err(e) => return Err(self.fail(Api::Get, e)),
            }
        }
        Err(PcaError::NotIssuedInTime {
            certificate_arn,
            polls: self.retry.polls,
        })
    }
}
