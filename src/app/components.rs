//! The server's components, each built by its own constructor from its own options: the
//! authenticator (with the node authorizer), the signer, the trust bundle channels, the serving
//! TLS, and the controllers. [`super::start_server`] only wires them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::AppError;
use super::clusters::Clusters;
use crate::authn::{
    ApiLimiter, Authenticator, CacheTtls, ClusterReviewers, StaticTokenAuthenticator, TokenCache,
    TokenReviewAuthenticator, TokenReviewOptions,
};
use crate::authz::{ImpersonationAuthorizer, NodeAuthorizer};
use crate::cluster::ClusterSet;
use crate::config::{
    AuthnConfig, ControllerConfig, RemoteClusters, ServerConfig, ServingTls, SignerConfig,
};
use crate::controller::{
    Controllers, InUse, LeaseObserver, LeaseSettings, SigningRoots, SigningRootsSettings,
    spawn_elector,
};
use crate::identity::LeafProfile;
use crate::schedule::{self, Backoff};
use crate::server::{Readiness, ServingCertResolver, serving_config};
use crate::signer::{LocalSigner, SignRequest, Signer};
use crate::telemetry::{CertLabels, ResultLabels, ServerMetrics};
use crate::trust::{self, TrustBundle};

/// Lifetime of a self-issued serving certificate; it is renewed at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// Retry interval when renewing the serving certificate fails.
const SERVING_RETRY: Backoff = Backoff::fixed(Duration::from_secs(30));
/// How long a negative authentication result is cached.
const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(2);
/// How long one TokenReview may take.
const TOKENREVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets the `meshid_cert_expiry_seconds{cert}` gauge.
pub(super) fn set_expiry(metrics: &ServerMetrics, cert: &'static str, at: time::OffsetDateTime) {
    metrics
        .cert_expiry
        .get_or_create(&CertLabels { cert })
        .set(at.unix_timestamp());
}

fn authn_err(e: impl std::fmt::Display) -> AppError {
    AppError::Authn(e.to_string())
}

/// What the authenticator and the node authorizer are built from.
#[derive(Debug, Clone)]
pub(super) struct AuthnOptions {
    /// TokenReview or static tokens.
    pub authn: AuthnConfig,
    /// Accepted token audiences.
    pub audiences: Vec<String>,
    /// SPIFFE trust domain of the callers' identities.
    pub trust_domain: String,
    /// Node agents (namespace, service account) that may impersonate workloads on their node.
    pub trusted_node_accounts: Vec<(String, String)>,
    /// The local cluster's ID.
    pub cluster_id: String,
    /// Where remote clusters come from.
    pub remote_clusters: RemoteClusters,
}

impl AuthnOptions {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        Self {
            authn: cfg.authn.clone(),
            audiences: cfg.audiences.clone(),
            trust_domain: cfg.trust_domain.clone(),
            trusted_node_accounts: cfg.trusted_node_accounts.clone(),
            cluster_id: cfg.cluster_id.clone(),
            remote_clusters: cfg.remote_clusters.clone(),
        }
    }
}

/// The authenticator; with TokenReview also the Kubernetes client and the node authorizer,
/// which share one [`ApiLimiter`] on the calls made for callers.
pub(super) struct Authentication {
    pub authenticator: Arc<dyn Authenticator>,
    pub impersonation: Option<Arc<dyn ImpersonationAuthorizer>>,
    pub kube: Option<kube::Client>,
    /// The clusters served, with TokenReview.
    pub clusters: Option<Clusters>,
}

impl Authentication {
    /// Reads the static token file, or connects to Kubernetes (kubeconfig or in-cluster).
    pub async fn build(opts: AuthnOptions, metrics: &ServerMetrics) -> Result<Self, AppError> {
        let node_authz_calls: Counter = metrics.registered(
            "node_authorization_apiserver_calls",
            "Pod reads made to authorize ztunnel impersonation",
        );
        match &opts.authn {
            AuthnConfig::StaticTokens(path) => {
                tracing::warn!("using static token authentication: development only");
                let a = StaticTokenAuthenticator::from_file(path, &opts.trust_domain)
                    .map_err(authn_err)?
                    .for_cluster(&opts.cluster_id);
                Ok(Self {
                    authenticator: Arc::new(a),
                    impersonation: None,
                    kube: None,
                    clusters: None,
                })
            }
            AuthnConfig::TokenReview {
                kubeconfig,
                cache_ttl,
                pod_cache_ttl,
                issuers,
                limits,
            } => {
                let client = kube_client(kubeconfig.as_deref()).await?;
                let limiter = api_limiter(*limits, metrics);
                let clusters = Clusters::build(
                    &opts.cluster_id,
                    client.clone(),
                    &opts.remote_clusters,
                    metrics,
                )
                .await;
                let reviewer = Arc::new(ClusterReviewers::new(
                    clusters.registry.clone(),
                    TOKENREVIEW_TIMEOUT,
                ));
                let ttls = CacheTtls {
                    positive: *cache_ttl,
                    pod_bound: *pod_cache_ttl,
                    negative: NEGATIVE_CACHE_TTL,
                };
                let review = TokenReviewOptions {
                    audiences: opts.audiences.clone(),
                    issuers: issuers.clone(),
                    trust_domain: opts.trust_domain.clone(),
                    cache: TokenCache::new(ttls, TokenCache::DEFAULT_CAPACITY),
                    limiter: limiter.clone(),
                };
                let authenticator = Arc::new(TokenReviewAuthenticator::new(
                    reviewer,
                    review,
                    metrics.clone(),
                ));
                let node = NodeAuthorizer::new(
                    clusters.registry.clone(),
                    opts.trusted_node_accounts,
                    limiter,
                    node_authz_calls,
                );
                Ok(Self {
                    authenticator,
                    impersonation: Some(Arc::new(node)),
                    kube: Some(client),
                    clusters: Some(clusters),
                })
            }
        }
    }
}

/// The bound on apiserver calls made for callers, counting refusals in `metrics`.
fn api_limiter(limits: crate::authn::ApiLimits, metrics: &ServerMetrics) -> ApiLimiter {
    let refused: Counter = metrics.registered(
        "apiserver_calls_refused",
        "Authentication and authorization calls to the apiserver refused because \
         --apiserver-concurrency calls were running and --apiserver-queue waiting",
    );
    ApiLimiter::new(limits, refused)
}

/// A client from `kubeconfig`, or the in-cluster configuration.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, AppError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(authn_err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(authn_err)?
        }
        None => kube::Config::infer().await.map_err(authn_err)?,
    };
    kube::Client::try_from(config).map_err(authn_err)
}

/// What the signer is built from.
#[derive(Debug, Clone)]
pub(super) struct SignerOptions {
    /// Local files, a self-generated root, or AWS Private CA.
    pub signer: SignerConfig,
    /// SPIFFE trust domain (the subject of a generated root).
    pub trust_domain: String,
    /// Longest leaf lifetime (PCA intermediate mode sizes its intermediate from it).
    pub max_ttl: Duration,
}

impl SignerOptions {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        Self {
            signer: cfg.signer.clone(),
            trust_domain: cfg.trust_domain.clone(),
            max_ttl: cfg.max_ttl,
        }
    }
}

/// The signer and, in PCA intermediate mode, the task that renews its intermediate.
pub(super) struct StartedSigner {
    pub signer: Arc<dyn Signer>,
    pub pca_renewal: Option<crate::signer::aws_pca::IntermediateRenewal>,
}

impl StartedSigner {
    /// Loads the CA (or connects to AWS Private CA and, in intermediate mode, mints the first
    /// intermediate).
    pub async fn start(opts: SignerOptions, metrics: &ServerMetrics) -> Result<Self, AppError> {
        let signer: Arc<dyn Signer> = match &opts.signer {
            SignerConfig::Files(files) => Arc::new(LocalSigner::from_files(files)?),
            SignerConfig::GeneratedDir(dir) => {
                Arc::new(LocalSigner::load_or_generate(dir, &opts.trust_domain)?)
            }
            SignerConfig::AwsPca(pca) => {
                let started =
                    crate::signer::aws_pca::connect(pca, &opts.trust_domain, opts.max_ttl, metrics)
                        .await
                        .map_err(crate::signer::SignerError::AwsPca)?;
                return Ok(Self {
                    signer: started.signer,
                    pca_renewal: started.renewal,
                });
            }
        };
        Ok(Self {
            signer,
            pca_renewal: None,
        })
    }
}

/// What the trust bundle channels are built from.
#[derive(Debug, Clone)]
pub(super) struct TrustOptions {
    /// `--extra-roots`, re-read when it changes.
    pub extra_roots: Option<PathBuf>,
    /// This replica's entry in the signing-roots registry (with the controllers only).
    pub signing_roots: Option<SigningRootsSettings>,
}

impl TrustOptions {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        Self {
            extra_roots: cfg.extra_roots.clone(),
            signing_roots: cfg.controllers.as_ref().map(|c| c.signing_roots.clone()),
        }
    }
}

/// The published trust bundle: the signer's roots plus `--extra-roots`, and, with the
/// signing-roots registry, every replica's roots.
pub(super) struct TrustChannels {
    /// The bundle every consumer subscribes to.
    pub tx: watch::Sender<Arc<TrustBundle>>,
    /// Its first value, in PEM.
    pub root_pem: String,
    opts: TrustOptions,
    anchors: Vec<String>,
    /// Where the extra-roots reload publishes: the registry's input, or the bundle itself.
    extra_roots_tx: watch::Sender<Arc<TrustBundle>>,
    registry: Option<(SigningRoots, InUse, watch::Receiver<Arc<TrustBundle>>)>,
}

impl TrustChannels {
    /// Reads `--extra-roots` and, with the registry, records this replica's roots before it
    /// serves (see [`SigningRoots`]).
    pub async fn build(
        opts: TrustOptions,
        anchors: Vec<String>,
        kube: Option<&kube::Client>,
        metrics: &ServerMetrics,
    ) -> Result<Self, AppError> {
        let extra_roots = match &opts.extra_roots {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| AppError::ExtraRoots {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let local_bundle = trust::combine(&anchors, extra_roots.as_deref())?;
        let registry_errors: Counter = metrics.registered(
            "signing_roots_heartbeat_errors",
            "Failed heartbeats to the signing-roots registry",
        );
        let registry = match (&opts.signing_roots, kube) {
            (Some(settings), Some(client)) => {
                let reg = SigningRoots::new(
                    client.clone(),
                    settings.clone(),
                    anchors.concat(),
                    registry_errors,
                );
                let in_use = reg.beat(k8s_openapi::jiff::Timestamp::now()).await?;
                Some((reg, in_use))
            }
            _ => None,
        };
        let bundle = match &registry {
            Some((_, in_use)) => crate::controller::compose(&local_bundle, &in_use.roots).0,
            None => local_bundle.clone(),
        };
        if let Some(at) = bundle.earliest_expiry() {
            set_expiry(metrics, "root", at);
        }
        let root_pem = bundle.pem().to_owned();
        let (local_tx, local_rx) = trust::channel(local_bundle);
        let (tx, _) = trust::channel(bundle);
        let (extra_roots_tx, registry) = match registry {
            Some((reg, in_use)) => (local_tx, Some((reg, in_use, local_rx))),
            None => (tx.clone(), None),
        };
        Ok(Self {
            tx,
            root_pem,
            opts,
            anchors,
            extra_roots_tx,
            registry,
        })
    }

    /// Starts the extra-roots reload, the registry heartbeat and the root-expiry gauge.
    pub fn spawn(
        self,
        tasks: &mut JoinSet<()>,
        metrics: ServerMetrics,
        shutdown: &watch::Receiver<bool>,
    ) {
        tasks.spawn(export_root_expiry(
            metrics,
            self.tx.subscribe(),
            shutdown.clone(),
        ));
        if let Some(path) = self.opts.extra_roots {
            tasks.spawn(trust::reload_extra_roots(
                self.anchors,
                path,
                self.extra_roots_tx,
                trust::RELOAD_INTERVAL,
                shutdown.clone(),
            ));
        }
        if let Some((reg, in_use, local_rx)) = self.registry {
            tasks.spawn(reg.run(in_use, local_rx, self.tx, shutdown.clone()));
        }
    }
}

/// Keeps the root-expiry gauge in step with the published trust bundle.
async fn export_root_expiry(
    metrics: ServerMetrics,
    mut trust: watch::Receiver<Arc<TrustBundle>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Some(at) = trust.borrow_and_update().earliest_expiry() {
            set_expiry(&metrics, "root", at);
        }
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            r = trust.changed() => if r.is_err() { return },
        }
    }
}

/// The serving TLS configuration and, for a self-issued certificate, the task renewing it.
pub(super) struct ServingTlsSetup {
    pub config: Arc<rustls::ServerConfig>,
    pub renewal: Option<ServingCertRenewal>,
}

impl ServingTlsSetup {
    /// Reads the operator's files, or issues a serving certificate from `signer`.
    pub async fn build(
        tls: &ServingTls,
        signer: &Arc<dyn Signer>,
        metrics: &ServerMetrics,
    ) -> Result<Self, AppError> {
        let tls_err = |e: crate::server::TlsError| AppError::Tls(e.to_string());
        let (resolver, renewal) = match tls {
            ServingTls::Files { cert, key } => {
                let read = |p: &std::path::Path| {
                    std::fs::read_to_string(p)
                        .map_err(|e| AppError::Tls(format!("{}: {e}", p.display())))
                };
                let resolver = ServingCertResolver::from_pem(&read(cert)?, &read(key)?);
                (Arc::new(resolver.map_err(tls_err)?), None)
            }
            ServingTls::SelfIssued { hosts } => {
                let (chain, key, not_after) = issue_serving_cert(signer.as_ref(), hosts).await?;
                set_expiry(metrics, "serving", not_after);
                let resolver =
                    Arc::new(ServingCertResolver::from_pem(&chain, &key).map_err(tls_err)?);
                let renewal = ServingCertRenewal {
                    signer: signer.clone(),
                    hosts: hosts.clone(),
                    resolver: resolver.clone(),
                    metrics: metrics.clone(),
                    not_after,
                };
                (resolver, Some(renewal))
            }
        };
        let config = serving_config(resolver).map_err(|e| AppError::Tls(e.to_string()))?;
        Ok(Self { config, renewal })
    }
}

/// Issues a serving certificate from `signer` for `hosts`: (chain PEM, key PEM, not_after).
async fn issue_serving_cert(
    signer: &dyn Signer,
    hosts: &[String],
) -> Result<(String, String, time::OffsetDateTime), AppError> {
    let key = rcgen::KeyPair::generate().map_err(|e| AppError::Tls(e.to_string()))?;
    let profile = LeafProfile::Server {
        hosts: hosts.to_vec(),
        spiffe: None,
    };
    let req = SignRequest::for_key(profile, &key, SERVING_TTL)?;
    let issued = signer.sign(req).await?;
    let chain = crate::pem::join_pems(
        std::iter::once(issued.leaf_pem.as_str())
            .chain(issued.intermediates_pem.iter().map(String::as_str)),
    );
    Ok((chain, key.serialize_pem(), issued.not_after))
}

/// Renews a self-issued serving certificate at half its lifetime.
pub(super) struct ServingCertRenewal {
    signer: Arc<dyn Signer>,
    hosts: Vec<String>,
    resolver: Arc<ServingCertResolver>,
    metrics: ServerMetrics,
    not_after: time::OffsetDateTime,
}

impl ServingCertRenewal {
    /// Renews until shutdown.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now = time::OffsetDateTime::now_utc();
            let wait = schedule::until(now, schedule::point_of_lifetime(now, self.not_after, 0.5));
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match issue_serving_cert(self.signer.as_ref(), &self.hosts).await {
                Ok((chain, key, new_not_after)) => match self.resolver.replace(&chain, &key) {
                    Ok(()) => {
                        self.not_after = new_not_after;
                        set_expiry(&self.metrics, "serving", new_not_after);
                        tracing::info!(not_after = %new_not_after, "renewed serving certificate");
                    }
                    Err(e) => tracing::error!(error = %e, "renewed serving certificate unusable"),
                },
                Err(e) => {
                    tracing::error!(error = %e, "serving certificate renewal failed; retrying");
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(SERVING_RETRY.ceiling(0)) => {}
                    }
                }
            }
        }
    }
}

/// The leader-elected controllers and their metrics.
pub(super) struct ControllerSet {
    lease: LeaseSettings,
    observer: LeaseObserver,
    controllers: Controllers,
}

impl ControllerSet {
    /// Registers the controllers' metrics; `None` when they are off or meshid has no cluster.
    pub fn build(
        opts: Option<&ControllerConfig>,
        kube: Option<&kube::Client>,
        clusters: Option<watch::Receiver<Arc<ClusterSet>>>,
        trust: watch::Receiver<Arc<TrustBundle>>,
        signer: Arc<dyn Signer>,
        metrics: &ServerMetrics,
    ) -> Option<Self> {
        let observer = LeaseObserver::default();
        let configmap_writes = Family::<ResultLabels, Counter>::default();
        metrics.register_with(|r| {
            r.register(
                "root_configmap_writes",
                "istio-ca-root-cert ConfigMap creates and updates",
                configmap_writes.clone(),
            );
            r.register(
                "leader",
                "1 for this replica's view of the controllers' Lease (leader, follower or unknown)",
                observer.states.clone(),
            );
            r.register(
                "lease_renew_errors",
                "Failed or timed-out reads and writes of the controllers' Lease",
                observer.renew_errors.clone(),
            );
        });
        let (opts, client) = (opts?, kube?);
        Some(Self {
            lease: opts.lease.clone(),
            observer,
            controllers: Controllers {
                client: client.clone(),
                clusters,
                trust,
                signer,
                root_configmaps: opts.root_configmaps,
                namespace_selector: opts.namespace_selector.clone(),
                istiod: opts.istiod.clone(),
                configmap_writes,
            },
        })
    }

    /// Adds the Lease state to `/readyz`.
    pub fn report_to(&self, readiness: &Readiness) {
        let observer = self.observer.clone();
        let name = self.lease.name.clone();
        readiness.set_detail(Arc::new(move || match observer.current() {
            Some((state, detail)) => format!("lease {name}: {} ({detail})", state.as_str()),
            None => format!("lease {name}: not observed yet"),
        }));
    }

    /// Starts the elector and runs the controllers while this replica leads.
    pub fn spawn(self, tasks: &mut JoinSet<()>, shutdown: &watch::Receiver<bool>) {
        let (leading, elector) = spawn_elector(
            self.controllers.client.clone(),
            self.lease,
            self.observer,
            shutdown.clone(),
        );
        tasks.spawn(
            self.controllers
                .run_while_leading(leading, shutdown.clone()),
        );
        tasks.spawn(async move {
            let _ = elector.await;
        });
    }
}
