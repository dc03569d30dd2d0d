//! `IstioCertificateService/CreateCertificate`: authenticate → authorize the identity → check
//! the CSR → clamp the lifetime → sign → verify the chain against the current roots → respond.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::value::Kind;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::Rejection;
use crate::authn::{Authenticator, AuthnError, AuthzError, Caller};
use crate::identity::{LeafProfile, SpiffeId, check_csr};
use crate::pem::parse_certs;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService};
use crate::signer::{BoxFuture, IssuedChain, Provenance, SignRequest, Signer};
use crate::telemetry::{OutcomeLabels, ServerMetrics};
use crate::trust::{IssuerPathCache, TrustBundle, Usage, ValidationError};

/// Metadata key ztunnel uses to ask for a certificate on behalf of a workload on its node.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Certificate lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    /// Used when the caller requests zero or a negative lifetime.
    pub default: Duration,
    /// Upper bound on any lifetime.
    pub max: Duration,
}

impl Durations {
    /// `min(requested, max)`; `requested <= 0` gives the default.
    pub fn clamp(&self, requested_secs: i64) -> Duration {
        match u64::try_from(requested_secs) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(self.max),
            _ => self.default.min(self.max),
        }
    }
}

/// Decides whether an authenticated caller (ztunnel) may obtain a certificate for `target`.
/// Lives here because the handler consumes it; the Kubernetes node authorizer implements it.
pub trait ImpersonationAuthorizer: Send + Sync {
    /// `Ok(())` to allow; [`AuthzError::Denied`] to deny (the reason is logged, not returned);
    /// [`AuthzError::Unavailable`] when the check could not be made (answered `UNAVAILABLE`).
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        target: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthzError>>;
}

struct Inner {
    authn: Arc<dyn Authenticator>,
    signer: Arc<dyn Signer>,
    trust: watch::Receiver<Arc<TrustBundle>>,
    durations: Durations,
    cluster_id: String,
    trust_domain: String,
    impersonation: Option<Arc<dyn ImpersonationAuthorizer>>,
    metrics: ServerMetrics,
    /// `metrics.requests{outcome="issued"}`, resolved once rather than per request.
    issued: prometheus_client::metrics::counter::Counter,
    issuer_paths: IssuerPathCache,
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
    serial: String,
    not_after: OffsetDateTime,
}

impl CaService {
    /// Builds the service. `impersonation` of `None` refuses every `ImpersonatedIdentity`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        authn: Arc<dyn Authenticator>,
        signer: Arc<dyn Signer>,
        trust: watch::Receiver<Arc<TrustBundle>>,
        durations: Durations,
        cluster_id: String,
        trust_domain: String,
        impersonation: Option<Arc<dyn ImpersonationAuthorizer>>,
        metrics: ServerMetrics,
    ) -> Self {
        let issued = metrics
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: "issued",
                reason: "none",
            })
            .clone();
        Self {
            inner: Arc::new(Inner {
                authn,
                signer,
                trust,
                durations,
                cluster_id,
                trust_domain,
                impersonation,
                issued,
                metrics,
                issuer_paths: IssuerPathCache::new(),
            }),
        }
    }

    async fn issue(
        &self,
        metadata: &MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<Issued, Rejection> {
        let inner = &self.inner;
        let token = bearer_token(metadata)?;
        check_cluster_id(metadata, &inner.cluster_id)?;
        let caller = inner.authn.authenticate(token).await?;
        let identity = self.target_identity(&caller, req).await?;
        let csr = check_csr(&req.csr, &identity)?;
        let ttl = inner.durations.clamp(req.validity_duration);
        let issued = inner
            .signer
            .sign(SignRequest {
                profile: LeafProfile::Workload(identity.clone()),
                spki_der: csr.spki_der,
                ttl,
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
            serial: issued.serial_hex,
            not_after: issued.not_after,
        })
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
        authz.authorize(caller, &target).await?;
        Ok(target)
    }
}

/// The caller's address in audit lines.
struct Peer(Option<std::net::SocketAddr>);

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
        Provenance::InProcess { issuer_path } => cache
            .verify(bundle, &issued.leaf_pem, issuer_path, now)
            .map(|_| ()),
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

fn check_cluster_id(metadata: &MetadataMap, expected: &str) -> Result<(), Rejection> {
    match metadata
        .get("clusterid")
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
    {
        None | Some("") => Ok(()),
        Some(got) if got == expected => Ok(()),
        Some(got) => Err(Rejection::ClusterMismatch {
            got: got.to_owned(),
        }),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        // Formatted only when the audit line is written. No span: the JSON log format would
        // re-parse a span's fields for every line, which costs more than the line itself.
        let peer = Peer(request.remote_addr());
        let (metadata, _, req) = request.into_parts();
        let result = self.issue(&metadata, &req).await;
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
                    signer = self.inner.signer.name(),
                    caller = %issued.caller,
                    %peer,
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
                tracing::warn!(target: "meshid::audit", reason, detail = %rejection, %peer, "certificate request rejected");
                Err(rejection.to_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_lifetimes_are_clamped_and_non_positive_ones_get_the_default() {
        let d = Durations {
            default: Duration::from_secs(100),
            max: Duration::from_secs(1000),
        };
        assert_eq!(d.clamp(0), Duration::from_secs(100));
        assert_eq!(d.clamp(-5), Duration::from_secs(100));
        assert_eq!(d.clamp(500), Duration::from_secs(500));
        assert_eq!(d.clamp(5000), Duration::from_secs(1000));
        assert_eq!(d.clamp(i64::MAX), Duration::from_secs(1000));
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
    fn the_cluster_id_must_match_or_be_empty() {
        assert!(check_cluster_id(&md(&[]), "c1").is_ok());
        assert!(check_cluster_id(&md(&[("clusterid", "")]), "c1").is_ok());
        assert!(check_cluster_id(&md(&[("clusterid", "c1")]), "c1").is_ok());
        assert!(check_cluster_id(&md(&[("clusterid", "c2")]), "c1").is_err());
    }
}
