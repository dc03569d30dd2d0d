//! Startup: check the CA, fetch the roots, and build the signer for the configured mode.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

use super::PcaError;
use super::api::{CaDescription, PcaApi};
use super::direct::DirectSigner;
use super::intermediate::{self, IntermediateRenewal, IntermediateSettings};
use super::metrics::PcaMetrics;
use super::options::{AwsPcaOptions, PcaMode};
use super::request::{SHORT_LIVED_MAX, root_of, signing_algorithm};
use super::sdk::SdkPcaClient;
use super::upstream::{RetryPolicy, Upstream};
use crate::signer::Signer;
use crate::telemetry::{CertLabels, ServerMetrics};
use crate::trust::TrustBundle;

/// A started AWS Private CA signer.
pub struct Started {
    /// The signer to hand to the CA service.
    pub signer: Arc<dyn Signer>,
    /// In intermediate mode, the task that renews the intermediate: run it with the server's
    /// shutdown signal.
    pub renewal: Option<IntermediateRenewal>,
    /// The signer's metrics.
    pub metrics: PcaMetrics,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("signer", &self.signer.name())
            .field("renewal", &self.renewal)
            .finish_non_exhaustive()
    }
}

/// Connects to PCA with the AWS SDK (default credential chain), registers the signer's
/// metrics with the server's, and starts the signer; see [`start`].
pub async fn connect(
    opts: &AwsPcaOptions,
    trust_domain: &str,
    max_leaf_ttl: Duration,
    server_metrics: &ServerMetrics,
) -> Result<Started, PcaError> {
    let api = Arc::new(SdkPcaClient::new(&opts.region, opts.endpoint.as_deref()).await);
    let metrics = PcaMetrics::default();
    server_metrics.register_with(|r| metrics.register(r));
    let expiry = server_metrics
        .cert_expiry
        .get_or_create(&CertLabels {
            cert: "intermediate",
        })
        .clone();
    let expiry = (opts.mode == PcaMode::Intermediate).then_some(expiry);
    start(api, opts, trust_domain, max_leaf_ttl, metrics, expiry).await
}

/// A CA in short-lived-certificate mode issues at most [`SHORT_LIVED_MAX`]: refuses the
/// lifetime asked of it above that.
fn check_short_lived_mode(
    ca: &CaDescription,
    opts: &AwsPcaOptions,
    max_leaf_ttl: Duration,
) -> Result<(), PcaError> {
    if ca.usage_mode.as_deref() != Some("SHORT_LIVED_CERTIFICATE") {
        return Ok(());
    }
    let (setting, ttl) = match opts.mode {
        PcaMode::Direct => ("--max-ttl", max_leaf_ttl),
        PcaMode::Intermediate => ("--pca-intermediate-ttl", opts.intermediate_ttl),
    };
    if ttl > SHORT_LIVED_MAX {
        return Err(PcaError::TooLongForShortLivedMode {
            setting,
            requested: humantime::format_duration(ttl).to_string(),
        });
    }
    Ok(())
}

/// Checks that the CA is ACTIVE and can issue what we need (`DescribeCertificateAuthority`),
/// takes the roots from `GetCertificateAuthorityCertificate` (the last, self-signed certificate
/// of its chain), and starts the signer for `opts.mode`; in intermediate mode this mints the
/// first intermediate. Errors name the failing call, ARN and reason: wrong ARN or region
/// ([`super::ApiError::NotFound`]), missing permissions ([`super::ApiError::AccessDenied`]),
/// missing credentials, a CA that is not ACTIVE, an unsupported key algorithm, or lifetimes a
/// short-lived-mode CA cannot issue; in direct mode, a trust domain longer than the 64
/// characters PCA allows in the subject O.
pub async fn start(
    api: Arc<dyn PcaApi>,
    opts: &AwsPcaOptions,
    trust_domain: &str,
    max_leaf_ttl: Duration,
    metrics: PcaMetrics,
    intermediate_expiry: Option<Gauge>,
) -> Result<Started, PcaError> {
    if opts.mode == PcaMode::Direct && trust_domain.chars().count() > 64 {
        return Err(PcaError::TrustDomainTooLong(trust_domain.to_owned()));
    }
    let upstream = Arc::new(Upstream::new(
        api,
        opts.ca_arn.clone(),
        opts.requests_per_second,
        RetryPolicy::default(),
        metrics.clone(),
    ));
    let ca = upstream.describe().await?;
    if ca.status != "ACTIVE" {
        return Err(PcaError::NotActive {
            arn: opts.ca_arn.clone(),
            status: ca.status,
        });
    }
    let algorithm = signing_algorithm(&ca.key_algorithm)?;
    check_short_lived_mode(&ca, opts, max_leaf_ttl)?;
    let root = root_of(&upstream.ca_certificate().await?)?;
    let bundle = TrustBundle::from_ders(vec![root])
        .map_err(|e| PcaError::InvalidCertificate(e.to_string()))?;
    tracing::info!(
        ca_arn = %opts.ca_arn,
        status = %ca.status,
        key_algorithm = %ca.key_algorithm,
        signing_algorithm = algorithm,
        usage_mode = ca.usage_mode.as_deref().unwrap_or("unknown"),
        ca_type = ca.ca_type.as_deref().unwrap_or("unknown"),
        mode = opts.mode.as_str(),
        requests_per_second = opts.requests_per_second,
        "AWS Private CA ready"
    );
    match opts.mode {
        PcaMode::Direct => Ok(Started {
            signer: Arc::new(DirectSigner::new(
                upstream,
                algorithm,
                trust_domain.to_owned(),
                bundle.roots().to_vec(),
                opts.max_pending,
            )),
            renewal: None,
            metrics,
        }),
        PcaMode::Intermediate => {
            let settings = IntermediateSettings {
                trust_domain: trust_domain.to_owned(),
                ttl: opts.intermediate_ttl,
                max_leaf_ttl,
                signing_algorithm: algorithm,
            };
            let (signer, renewal) =
                intermediate::start(upstream, settings, bundle, intermediate_expiry).await?;
            Ok(Started {
                signer: Arc::new(signer),
                renewal: Some(renewal),
                metrics,
            })
        }
    }
}
