//! `IstioCertificateService/CreateCertificate`: authenticate → authorize the identity → rate
//! limit per identity → check the CSR → pick the lifetime → sign → verify the chain against the
//! current roots → respond.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost_types::value::Kind;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Rejection;
use super::issuance_limit::{Admission, IssuanceKey, IssuanceLimiter};
use crate::authn::{Authenticator, AuthnError, Caller};
use crate::authz::ImpersonationAuthorizer;
use crate::identity::{LeafProfile, SpiffeId, check_csr};
use crate::pem::parse_certs;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService};
use crate::signer::{IssuedChain, Provenance, SignRequest, Signer};
use crate::telemetry::{OutcomeLabels, ServerMetrics};
use crate::trust::{IssuerPathCache, TrustBundle, Usage, ValidationError};

/// Metadata key istio-agent and ztunnel name their cluster with (Istio's `CLUSTER_ID`).
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// Metadata key ztunnel uses to ask for a certificate on behalf of a workload on its node.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Certificate lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    /// Used when the caller requests zero or a negative lifetime.
    pub default: Duration,
    /// Lower bound on any lifetime: shorter requests are raised to it.
    pub min: Duration,
    /// Upper bound on any lifetime: longer requests are cut to it.
    pub max: Duration,
    /// Clock-skew allowance: the most `notBefore` is backdated ([`crate::identity::backdate`]).
    pub max_backdate: Duration,
}

/// How the granted lifetime was chosen; written in the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlDecision {
    /// The requested lifetime, within bounds.
    AsRequested,
    /// None was requested: the default.
    Default,
    /// The request was shorter than the minimum and was raised to it.
    RaisedToMin,
    /// The request was longer than the maximum and was cut to it (istiod refuses instead).
    ClampedToMax,
}

impl TtlDecision {
    /// A stable label for audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AsRequested => "as_requested",
            Self::Default => "default",
            Self::RaisedToMin => "raised_to_min",
            Self::ClampedToMax => "clamped_to_max",
        }
    }
}

impl Durations {
    /// The lifetime granted for `requested_secs`: the default when it is zero or negative,
    /// otherwise the request raised to `min` and cut to `max`.
    pub fn grant(&self, requested_secs: i64) -> (Duration, TtlDecision) {
        let requested = match u64::try_from(requested_secs) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => {
                return (
                    self.default.max(self.min).min(self.max),
                    TtlDecision::Default,
                );
            }
        };
        if requested > self.max {
            (self.max, TtlDecision::ClampedToMax)
        } else if requested < self.min {
            (self.min, TtlDecision::RaisedToMin)
        } else {
            (requested, TtlDecision::AsRequested)
        }
    }
}

struct Inner {
    authn: Arc<dyn Authenticator>,
    signer: Arc<dyn Signer>,
    trust: watch::Receiver<Arc<TrustBundle>>,
    durations: Durations,
    trust_domain: String,
    impersonation: Option<Arc<dyn ImpersonationAuthorizer>>,
    metrics: ServerMetrics,
    /// `metrics.requests{outcome="issued"}`, resolved once rather than per request.
    issued: prometheus_client::metrics::counter::Counter,
    issuer_paths: IssuerPathCache,
    /// The per-identity issuance rate limit, when enabled.
    limiter: Option<IssuanceLimiter>,
}

/// The CreateCertificate service. Cheap to clone.
#[derive(Clone)]
pub struct CaService {
    inner: Arc<Inner>,
}

struct Issued {
    chain: Vec<String>,
    identity: SpiffeId,
    caller: String,
    cluster: String,
    serial: String,
    not_after: OffsetDateTime,
    ttl: Duration,
    ttl_decision: TtlDecision,
}

/// What a [`CaService`] is built from.
pub struct CaServiceOptions {
    /// Authenticates the caller's token.
    pub authn: Arc<dyn Authenticator>,
    /// Signs the leaf.
    pub signer: Arc<dyn Signer>,
    /// The current trust bundle: issued chains are verified against it and it is appended to
    /// every response.
    pub trust: watch::Receiver<Arc<TrustBundle>>,
    /// Lifetime policy.
    pub durations: Durations,
    /// SPIFFE trust domain of the identities issued.
    pub trust_domain: String,
    /// Decides `ImpersonatedIdentity` requests; `None` refuses every one.
    pub impersonation: Option<Arc<dyn ImpersonationAuthorizer>>,
    /// Request counters and the audit of outcomes.
    pub metrics: ServerMetrics,
    /// The per-identity issuance rate limit; `None` issues without one.
    pub limiter: Option<IssuanceLimiter>,
}

impl CaService {
    /// Builds the service from `opts`.
    pub fn new(opts: CaServiceOptions) -> Self {
        let issued = opts
            .metrics
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: "issued",
                reason: "none",
            })
            .clone();
        let inner = Inner {
            authn: opts.authn,
            signer: opts.signer,
            trust: opts.trust,
            durations: opts.durations,
            trust_domain: opts.trust_domain,
            impersonation: opts.impersonation,
            metrics: opts.metrics,
            issued,
            issuer_paths: IssuerPathCache::new(),
            limiter: opts.limiter,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    async fn issue(
        &self,
        metadata: &MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<Issued, Rejection> {
        let inner = &self.inner;
        let token = bearer_token(metadata)?;
        let cluster = cluster_header(metadata)?;
        let caller = inner.authn.authenticate(cluster, token).await?;
        let identity = self.target_identity(&caller, req).await?;
        self.check_rate(&caller, &identity)?;
        let csr = check_csr(&req.csr, &identity)?;
        let (ttl, ttl_decision) = inner.durations.grant(req.validity_duration);
        let issued = inner
            .signer
            .sign(SignRequest {
                profile: LeafProfile::Workload(identity.clone()),
                spki_der: csr.spki_der,
                ttl,
                max_backdate: inner.durations.max_backdate,
                csr_der: Some(csr.csr_der),
            })
            .await?;
        let bundle = inner.trust.borrow().clone();
        verify_issued(
            &bundle,
            &issued,
            &inner.issuer_paths,
            OffsetDateTime::now_utc(),
        )?;
        let mut chain = Vec::with_capacity(issued.intermediates_pem.len() + 2);
        chain.push(issued.leaf_pem);
        chain.extend(issued.intermediates_pem);
        chain.push(bundle.pem().to_owned());
        Ok(Issued {
            chain,
            identity,
            caller: caller.identity.to_string(),
            cluster: caller.cluster,
            serial: issued.serial_hex,
            not_after: issued.not_after,
            ttl,
            ttl_decision,
        })
    }

    /// Takes one certificate from the bucket of `identity` (and of the caller's pod, when its
    /// token is bound to one). A new pod always finds a full bucket.
    fn check_rate(&self, caller: &Caller, identity: &SpiffeId) -> Result<(), Rejection> {
        let Some(limiter) = &self.inner.limiter else {
            return Ok(());
        };
        let key = IssuanceKey::new(identity, caller.pod.as_ref().map(|p| p.uid.as_str()));
        match limiter.check(&key) {
            Admission::Admitted => Ok(()),
            Admission::Untracked => {
                self.inner.metrics.issuance_limit_untracked.inc();
                Ok(())
            }
            Admission::Limited { retry_after } => Err(Rejection::RateLimited {
                identity: identity.to_string(),
                retry_after,
            }),
        }
    }

    /// The identity to certify: the caller's own, or an impersonated one if authorized.
    async fn target_identity(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<SpiffeId, Rejection> {
        let requested = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .map(|v| &v.kind);
        let target = match requested {
            None => return Ok(caller.identity.clone()),
            Some(Some(Kind::StringValue(s))) if s.is_empty() => return Ok(caller.identity.clone()),
            Some(Some(Kind::StringValue(s))) => s,
            Some(_) => {
                return Err(Rejection::ImpersonationDenied(
                    "ImpersonatedIdentity is not a string".into(),
                ));
            }
        };
        let target = SpiffeId::parse(target)
            .map_err(|e| Rejection::ImpersonationDenied(format!("ImpersonatedIdentity: {e}")))?;
        if target.trust_domain() != self.inner.trust_domain {
            return Err(Rejection::ImpersonationDenied(
                "foreign trust domain".into(),
            ));
        }
        if target == caller.identity {
            return Ok(target);
        }
        let Some(authz) = &self.inner.impersonation else {
            return Err(Rejection::ImpersonationDenied(
                "impersonation is not enabled".into(),
            ));
        };
        // The node authorizer's lines name the caller and the target. A span of their own,
        // rather than `caller` recorded on the request's span: with the JSON log format a
        // recorded field costs a re-read of the span's fields on every request (1.4 µs of the
        // request span's 3.1 µs, `cargo bench --bench request_span`); this costs only the
        // impersonation requests.
        let span = tracing::info_span!("impersonation", caller = %caller.identity, %target);
        authz.authorize(caller, &target).instrument(span).await?;
        Ok(target)
    }
}

/// The caller's address in audit lines (every refusal below the handler names it the same way).
pub(super) struct Peer(pub(super) Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// Checks an issued chain against the roots clients have before it is returned, so that a
/// misconfigured signer or a root rotated away can never hand out a certificate that does not
/// verify. An upstream CA's chain is verified signature by signature, every time. A chain signed
/// in this process needs only its issuer path checked (the leaf's signature is made by a key
/// checked against the issuer certificate at load), and that check is cached per bundle.
fn verify_issued(
    bundle: &Arc<TrustBundle>,
    issued: &IssuedChain,
    cache: &IssuerPathCache,
    now: OffsetDateTime,
) -> Result<(), ValidationError> {
    match &issued.provenance {
        Provenance::InProcess { issuer_path } => {
            cache.verify(bundle, &issued.leaf_pem, issuer_path, now)
        }
        Provenance::Upstream => {
            let mut ders = parse_certs(&issued.leaf_pem)
                .map_err(|_| ValidationError::Malformed { index: 0 })?;
            for pem in &issued.intermediates_pem {
                let index = ders.len();
                ders.extend(parse_certs(pem).map_err(|_| ValidationError::Malformed { index })?);
            }
            // Workload SVIDs are presented as server and as client certificates.
            bundle
                .validate(&ders, now, Usage::ServerAndClientAuth)
                .map(|_| ())
        }
    }
}

/// Numbers the requests this process serves, so that the lines one request causes can be
/// found together (with the pod name, unique across replicas).
fn next_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Longest bearer token accepted; service-account tokens are 1–2 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The token of the one `authorization: Bearer` header.
fn bearer_token(metadata: &MetadataMap) -> Result<&str, Rejection> {
    let mut values = metadata.get_all("authorization").iter();
    let value = values.next();
    if values.next().is_some() {
        return Err(Rejection::MultipleAuthorization);
    }
    let value = value
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthnError::MissingToken)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthnError::MissingToken)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthnError::MissingToken.into());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::TokenTooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    Ok(token)
}

/// The `clusterid` header istio-agent and ztunnel send: the cluster the caller's token is from
/// (`None` when absent). A value that is not text names no cluster.
fn cluster_header(metadata: &MetadataMap) -> Result<Option<&str>, Rejection> {
    match metadata.get(CLUSTER_ID_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| AuthnError::UnknownCluster.into()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let peer = Peer(request.remote_addr());
        let request_id = next_request_id();
        // Every line logged while this request is served (TokenReview, node authorization,
        // the signer) carries its id and the peer. The audit line below is written outside the
        // span and names the same request id.
        let span = tracing::info_span!("create_certificate", request_id, %peer);
        let (metadata, _, req) = request.into_parts();
        let result = self.issue(&metadata, &req).instrument(span).await;
        let metrics = &self.inner.metrics;
        match result {
            Ok(issued) => {
                let latency = started.elapsed();
                self.inner.issued.inc();
                metrics.issuance_seconds.observe(latency.as_secs_f64());
                tracing::info!(
                    target: "meshid::audit",
                    identity = %issued.identity,
                    serial = %issued.serial,
                    not_after = %issued.not_after,
                    ttl_requested_s = req.validity_duration,
                    ttl_granted_s = issued.ttl.as_secs(),
                    ttl = issued.ttl_decision.as_str(),
                    signer = self.inner.signer.name(),
                    caller = %issued.caller,
                    cluster = %issued.cluster,
                    %peer,
                    request_id,
                    latency_us = latency.as_micros() as u64,
                    "certificate issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                }))
            }
            Err(rejection) => {
                let reason = rejection.reason();
                metrics
                    .requests
                    .get_or_create(&OutcomeLabels {
                        outcome: "rejected",
                        reason,
                    })
                    .inc();
                tracing::warn!(
                    target: "meshid::audit",
                    reason,
                    detail = %rejection,
                    %peer,
                    request_id,
                    "certificate request rejected"
                );
                Err(rejection.to_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_lifetimes_are_raised_to_the_minimum_cut_to_the_maximum_and_defaulted() {
        let d = Durations {
            default: Duration::from_secs(100),
            min: Duration::from_secs(50),
            max: Duration::from_secs(1000),
            max_backdate: Duration::from_secs(60),
        };
        let s = Duration::from_secs;
        assert_eq!(d.grant(0), (s(100), TtlDecision::Default));
        assert_eq!(d.grant(-5), (s(100), TtlDecision::Default));
        assert_eq!(d.grant(1), (s(50), TtlDecision::RaisedToMin));
        assert_eq!(d.grant(49), (s(50), TtlDecision::RaisedToMin));
        assert_eq!(d.grant(50), (s(50), TtlDecision::AsRequested));
        assert_eq!(d.grant(500), (s(500), TtlDecision::AsRequested));
        assert_eq!(d.grant(1000), (s(1000), TtlDecision::AsRequested));
        assert_eq!(d.grant(5000), (s(1000), TtlDecision::ClampedToMax));
        assert_eq!(d.grant(i64::MAX), (s(1000), TtlDecision::ClampedToMax));
    }

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn only_a_well_formed_bearer_header_yields_a_token() {
        assert_eq!(
            bearer_token(&md(&[("authorization", "Bearer abc")])).unwrap(),
            "abc"
        );
        assert_eq!(
            bearer_token(&md(&[("authorization", "bearer  abc ")])).unwrap(),
            "abc"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert!(
                bearer_token(&md(&[("authorization", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(bearer_token(&md(&[])).is_err());
    }

    #[test]
    fn two_authorization_headers_are_refused_even_when_both_are_valid() {
        let mut m = md(&[("authorization", "Bearer abc")]);
        m.append("authorization", "Bearer abc".parse().unwrap());
        assert!(matches!(
            bearer_token(&m),
            Err(Rejection::MultipleAuthorization)
        ));
    }

    #[test]
    fn a_token_longer_than_any_service_account_token_is_refused_as_too_large() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(
            bearer_token(&md(&[("authorization", &long)])),
            Err(Rejection::TokenTooLarge { .. })
        ));
        let max = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES));
        assert!(bearer_token(&md(&[("authorization", &max)])).is_ok());
    }

    /// Two unrelated self-generated CAs (with the directories that hold them).
    fn two_cas() -> (
        [tempfile::TempDir; 2],
        crate::signer::LocalSigner,
        crate::signer::LocalSigner,
    ) {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = crate::signer::LocalSigner::load_or_generate(dirs[0].path(), "td").unwrap();
        let b = crate::signer::LocalSigner::load_or_generate(dirs[1].path(), "td").unwrap();
        (dirs, a, b)
    }

    fn bundle_of(signer: &crate::signer::LocalSigner) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::from_pem(&signer.trust_anchors_pem().concat()).unwrap())
    }

    #[test]
    fn an_in_process_chain_is_checked_against_the_current_roots() {
        let (_dirs, a, b) = two_cas();
        let cache = IssuerPathCache::new();
        let now = OffsetDateTime::now_utc();
        let issued = a.sign_test_leaf();
        assert!(matches!(issued.provenance, Provenance::InProcess { .. }));
        verify_issued(&bundle_of(&a), &issued, &cache, now).unwrap();
        // After a root rotation that dropped a's root, a's certificates are refused. Both roots
        // bear the same name (as every generated meshid root does), so the path leads to b's
        // root, whose key did not sign.
        assert_eq!(
            verify_issued(&bundle_of(&b), &issued, &cache, now),
            Err(ValidationError::BadSignature)
        );
    }

    #[test]
    fn an_upstream_leaf_is_verified_signature_by_signature() {
        let (_dirs, a, b) = two_cas();
        let cache = IssuerPathCache::new();
        let now = OffsetDateTime::now_utc();
        let mut good = a.sign_test_leaf();
        good.provenance = Provenance::Upstream;
        verify_issued(&bundle_of(&a), &good, &cache, now).unwrap();
        // An upstream CA answering with a leaf from another CA is caught.
        let mut foreign = b.sign_test_leaf();
        foreign.provenance = Provenance::Upstream;
        assert_eq!(
            verify_issued(&bundle_of(&a), &foreign, &cache, now),
            Err(ValidationError::BadSignature)
        );
        let mut garbage = a.sign_test_leaf();
        garbage.provenance = Provenance::Upstream;
        garbage.leaf_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(verify_issued(&bundle_of(&a), &garbage, &cache, now).is_err());
    }

    #[test]
    fn the_clusterid_header_is_passed_on_and_one_that_is_not_text_names_no_cluster() {
        assert_eq!(cluster_header(&md(&[])).unwrap(), None);
        assert_eq!(cluster_header(&md(&[("clusterid", "")])).unwrap(), Some(""));
        assert_eq!(
            cluster_header(&md(&[("clusterid", "c1")])).unwrap(),
            Some("c1")
        );
        let mut m = MetadataMap::new();
        m.insert(
            "clusterid",
            tonic::metadata::MetadataValue::try_from(&b"c\xff"[..]).unwrap(),
        );
        assert!(matches!(
            cluster_header(&m),
            Err(Rejection::Authn(AuthnError::UnknownCluster))
        ));
    }

    /// Accepts every token as `ns/sa`, logging a line as the TokenReview path does.
    struct LoggingAuthn;

    impl Authenticator for LoggingAuthn {
        fn authenticate<'a>(
            &'a self,
            _cluster: Option<&'a str>,
            _token: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Caller, AuthnError>> {
            Box::pin(async move {
                tracing::info!("token reviewed");
                Ok(Caller {
                    identity: SpiffeId::for_service_account("td", "ns", "sa").unwrap(),
                    cluster: "local".into(),
                    username: "system:serviceaccount:ns:sa".into(),
                    pod: None,
                })
            })
        }
    }

    /// Denies every impersonation, logging a line as the node authorizer does.
    struct LoggingDeny;

    impl ImpersonationAuthorizer for LoggingDeny {
        fn authorize<'a>(
            &'a self,
            _caller: &'a Caller,
            _target: &'a SpiffeId,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::authz::AuthzError>> {
            Box::pin(async move {
                tracing::info!("node checked");
                Err(crate::authz::Denial::NotTrusted.into())
            })
        }
    }

    fn request(csr: &str, impersonate: Option<&str>) -> Request<IstioCertificateRequest> {
        let metadata = impersonate.map(|target| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(target.into())),
                },
            )]
            .into(),
        });
        let mut r = Request::new(IstioCertificateRequest {
            csr: csr.into(),
            validity_duration: 3600,
            metadata,
        });
        r.metadata_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        r
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lines_logged_while_serving_a_request_carry_its_id_and_peer_and_authorization_lines_its_caller()
     {
        let buf = crate::telemetry::SharedBuf::default();
        let (dispatch, guard) = crate::telemetry::build_logging(
            crate::telemetry::LogFormat::Json,
            "info",
            buf.clone(),
            false,
        );
        let dir = tempfile::tempdir().unwrap();
        let signer = crate::signer::LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        let (_tx, trust) = watch::channel(bundle_of(&signer));
        let service = CaService::new(CaServiceOptions {
            authn: Arc::new(LoggingAuthn),
            signer: Arc::new(signer),
            trust,
            durations: Durations {
                default: Duration::from_secs(3600),
                min: Duration::from_secs(60),
                max: Duration::from_secs(86400),
                max_backdate: Duration::from_secs(60),
            },
            trust_domain: "td".into(),
            impersonation: Some(Arc::new(LoggingDeny)),
            metrics: ServerMetrics::new(),
            limiter: None,
        });
        let own = SpiffeId::for_service_account("td", "ns", "sa").unwrap();
        let (_key, csr) =
            crate::svid::generate_csr(&own, crate::svid::WorkloadKeyType::EcdsaP256).unwrap();
        {
            let _default = tracing::dispatcher::set_default(&dispatch);
            let issued = service.create_certificate(request(&csr, None)).await;
            assert!(issued.is_ok(), "{issued:?}");
            let denied = service
                .create_certificate(request(&csr, Some("spiffe://td/ns/other/sa/x")))
                .await;
            assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
        }
        drop(dispatch);
        drop(guard);
        let lines: Vec<serde_json::Value> = buf
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let find = |message: &str| -> Vec<&serde_json::Value> {
            lines.iter().filter(|l| l["message"] == message).collect()
        };
        let reviewed = find("token reviewed");
        let audited: Vec<_> = lines
            .iter()
            .filter(|l| l["target"] == "meshid::audit")
            .collect();
        assert_eq!((reviewed.len(), audited.len()), (2, 2), "{lines:?}");
        for (review, audit) in reviewed.iter().zip(&audited) {
            let span = &review["spans"][0];
            assert_eq!(span["name"], "create_certificate", "{review}");
            assert_eq!(span["peer"], "unknown", "{review}");
            // The audit line, written outside the span, names the same request.
            assert_eq!(span["request_id"], audit["request_id"], "{review} {audit}");
        }
        assert_ne!(audited[0]["request_id"], audited[1]["request_id"]);
        let checked = find("node checked");
        assert_eq!(checked.len(), 1, "{lines:?}");
        let spans = &checked[0]["spans"];
        assert_eq!(spans[0]["request_id"], audited[1]["request_id"], "{spans}");
        assert_eq!(spans[1]["name"], "impersonation", "{spans}");
        assert_eq!(spans[1]["caller"], "spiffe://td/ns/ns/sa/sa", "{spans}");
        assert_eq!(spans[1]["target"], "spiffe://td/ns/other/sa/x", "{spans}");
        assert_eq!(
            audited[1]["reason"], "impersonation_denied",
            "{:?}",
            audited[1]
        );
    }
}
