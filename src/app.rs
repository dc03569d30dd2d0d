//! Builds the server's components from a validated [`ServerConfig`], runs them, and drains them
//! when the shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::authn::{
    ApiLimiter, Authenticator, CacheTtls, ClusterReviewers, StaticTokenAuthenticator, TokenCache,
    TokenReviewAuthenticator, TokenReviewOptions,
};
use crate::authz::{ImpersonationAuthorizer, NodeAuthorizer};
use crate::config::{AuthnConfig, ServerConfig, ServingTls, SignerConfig};
use crate::controller::{Controllers, SigningRoots, spawn_elector};
use crate::identity::LeafProfile;
use crate::proto::IstioCertificateServiceServer;
use crate::server::{
    CaService, ConnectionGuard, Durations, GrpcServices, GuardedListener, HTTP_MAX_CONNECTIONS,
    IssuanceLimiter, Readiness, Refusals, RequestLimits, ServingCertResolver, accept_tls,
    drain_deadline, http_router, serving_config,
};
use crate::signer::{LocalSigner, SignRequest, Signer};
use crate::telemetry::{CertLabels, ServerMetrics};
use crate::trust::{self, TrustBundle};

/// Lifetime of a self-issued serving certificate; it is renewed at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// Retry interval when renewing the serving certificate fails.
const SERVING_RETRY: Duration = Duration::from_secs(30);
/// How long after the drain deadline the server stops waiting for connections to close.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long a negative authentication result is cached.
const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(2);
/// How long one TokenReview may take.
const TOKENREVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The server could not start or failed while running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// Loading the signer failed.
    #[error("signer: {0}")]
    Signer(#[from] crate::signer::SignerError),
    /// The trust bundle is unusable.
    #[error("trust bundle: {0}")]
    Trust(#[from] crate::trust::TrustError),
    /// The serving certificate is unusable.
    #[error("serving TLS: {0}")]
    Tls(String),
    /// The `--extra-roots` file could not be read.
    #[error("cannot read extra roots {path}: {source}")]
    ExtraRoots {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The authenticator could not be set up (kubeconfig, token file).
    #[error("authentication setup: {0}")]
    Authn(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// This replica's signing roots could not be recorded in the registry at startup.
    #[error("signing-roots registry: {0}")]
    SigningRoots(#[from] crate::controller::SigningRootsError),
    /// A server task failed.
    #[error("server: {0}")]
    Serve(String),
}

/// A started server.
#[derive(Debug)]
pub struct ServerHandle {
    /// Bound gRPC address (useful with port 0).
    pub grpc_addr: SocketAddr,
    /// Bound HTTP probes/metrics address.
    pub http_addr: SocketAddr,
    /// The trust bundle PEM clients should trust.
    pub root_pem: String,
    task: JoinHandle<Result<(), AppError>>,
}

impl ServerHandle {
    /// Waits until the server has drained after shutdown.
    pub async fn wait(self) -> Result<(), AppError> {
        self.task
            .await
            .map_err(|e| AppError::Serve(e.to_string()))?
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

mod clusters;

/// The authenticator, and the Kubernetes client (with the limiter bounding the calls made for
/// callers, and the clusters served) when meshid talks to a cluster.
#[allow(clippy::type_complexity)]
async fn build_authenticator(
    cfg: &ServerConfig,
    metrics: &ServerMetrics,
) -> Result<
    (
        Arc<dyn Authenticator>,
        Option<(kube::Client, ApiLimiter, clusters::Clusters)>,
    ),
    AppError,
> {
    match &cfg.authn {
        AuthnConfig::StaticTokens(path) => {
            tracing::warn!("using static token authentication: development only");
            let a = StaticTokenAuthenticator::from_file(path, &cfg.trust_domain)
                .map_err(|e| AppError::Authn(e.to_string()))?
                .for_cluster(&cfg.cluster_id);
            Ok((Arc::new(a), None))
        }
        AuthnConfig::TokenReview {
            kubeconfig,
            cache_ttl,
            pod_cache_ttl,
            issuers,
            limits,
        } => {
            let kcfg = match kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .map_err(|e| AppError::Authn(e.to_string()))?;
                    kube::Config::from_custom_kubeconfig(
                        kc,
                        &kube::config::KubeConfigOptions::default(),
                    )
                    .await
                    .map_err(|e| AppError::Authn(e.to_string()))?
                }
                None => kube::Config::infer()
                    .await
                    .map_err(|e| AppError::Authn(e.to_string()))?,
            };
            let client =
                kube::Client::try_from(kcfg).map_err(|e| AppError::Authn(e.to_string()))?;
            let refused = prometheus_client::metrics::counter::Counter::<u64>::default();
            metrics.register_with(|r| {
                r.register(
                    "apiserver_calls_refused",
                    "Authentication and authorization calls to the apiserver refused because \
                     --apiserver-concurrency calls were running and --apiserver-queue waiting",
                    refused.clone(),
                );
            });
            let limiter = ApiLimiter::new(*limits, refused);
            let clusters = clusters::Clusters::build(
                &cfg.cluster_id,
                client.clone(),
                &cfg.remote_clusters,
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
            let authn = Arc::new(TokenReviewAuthenticator::new(
                reviewer,
                TokenReviewOptions {
                    audiences: cfg.audiences.clone(),
                    issuers: issuers.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                    cache: TokenCache::new(ttls, TokenCache::DEFAULT_CAPACITY),
                    limiter: limiter.clone(),
                },
                metrics.clone(),
            ));
            Ok((authn, Some((client, limiter, clusters))))
        }
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

fn set_expiry(metrics: &ServerMetrics, cert: &'static str, at: time::OffsetDateTime) {
    metrics
        .cert_expiry
        .get_or_create(&CertLabels { cert })
        .set(at.unix_timestamp());
}

/// Renews a self-issued serving certificate at half its lifetime until shutdown.
async fn renew_serving_cert(
    signer: Arc<dyn Signer>,
    hosts: Vec<String>,
    resolver: Arc<ServingCertResolver>,
    metrics: ServerMetrics,
    mut not_after: time::OffsetDateTime,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let remaining = (not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let wait = Duration::try_from(remaining / 2).unwrap_or(SERVING_RETRY);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match issue_serving_cert(signer.as_ref(), &hosts).await {
            Ok((chain, key, new_not_after)) => match resolver.replace(&chain, &key) {
                Ok(()) => {
                    not_after = new_not_after;
                    set_expiry(&metrics, "serving", not_after);
                    tracing::info!(%not_after, "renewed serving certificate");
                }
                Err(e) => tracing::error!(error = %e, "renewed serving certificate unusable"),
            },
            Err(e) => {
                tracing::error!(error = %e, "serving certificate renewal failed; retrying");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(SERVING_RETRY) => {}
                }
            }
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

/// Starts the server described by `cfg`; it drains and stops when `shutdown` completes.
///
/// Everything that can fail at startup (CA files, trust bundle, kubeconfig, serving certificate,
/// listeners) fails here, before the handle is returned. The listeners are bound before the
/// signer starts, so a server that cannot listen makes no call to an upstream CA.
pub async fn start_server(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServerHandle, AppError> {
    install_crypto_provider();
    // Listeners and authentication first: a taken port or a bad kubeconfig (a crash loop) must
    // fail before the signer starts, since a PCA signer is billed for what it issues then.
    let grpc_listener = bind(cfg.listen).await?;
    let http_listener = bind(cfg.http_listen).await?;
    let metrics = ServerMetrics::new();
    let (authn, kube) = build_authenticator(&cfg, &metrics).await?;
    let kube_client = kube.as_ref().map(|(client, _, _)| client.clone());
    let mut pca_renewal = None;
    let signer: Arc<dyn Signer> = match &cfg.signer {
        SignerConfig::Files(files) => Arc::new(LocalSigner::from_files(files)?),
        SignerConfig::GeneratedDir(dir) => {
            Arc::new(LocalSigner::load_or_generate(dir, &cfg.trust_domain)?)
        }
        SignerConfig::AwsPca(opts) => {
            let started =
                crate::signer::aws_pca::connect(opts, &cfg.trust_domain, cfg.max_ttl, &metrics)
                    .await
                    .map_err(crate::signer::SignerError::AwsPca)?;
            pca_renewal = started.renewal;
            started.signer
        }
    };
    let anchors = signer.trust_anchors_pem();
    let extra_roots = match &cfg.extra_roots {
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
    // With the controllers, every replica records the roots it signs with before it serves,
    // and publishes the union of every replica's roots (see controller::SigningRoots).
    let registry_errors = prometheus_client::metrics::counter::Counter::<u64>::default();
    let registry = match (&cfg.controllers, &kube_client) {
        (Some(c), Some(client)) => {
            let reg = SigningRoots::new(
                client.clone(),
                c.signing_roots.clone(),
                anchors.concat(),
                registry_errors.clone(),
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
        set_expiry(&metrics, "root", at);
    }
    let root_pem = bundle.pem().to_owned();
    let (local_tx, local_rx) = trust::channel(local_bundle);
    let (trust_tx, trust_rx) = trust::channel(bundle);
    // The extra-roots reload feeds the registry's union when there is one, else the bundle.
    let extra_roots_tx = if registry.is_some() {
        local_tx
    } else {
        trust_tx.clone()
    };
    let lease_observer = crate::controller::LeaseObserver::default();
    let node_authz_calls = prometheus_client::metrics::counter::Counter::<u64>::default();
    let configmap_writes = prometheus_client::metrics::family::Family::<
        crate::telemetry::ResultLabels,
        prometheus_client::metrics::counter::Counter,
    >::default();
    metrics.register_with(|r| {
        r.register(
            "node_authorization_apiserver_calls",
            "Pod reads made to authorize ztunnel impersonation",
            node_authz_calls.clone(),
        );
        r.register(
            "root_configmap_writes",
            "istio-ca-root-cert ConfigMap creates and updates",
            configmap_writes.clone(),
        );
        r.register(
            "signing_roots_heartbeat_errors",
            "Failed heartbeats to the signing-roots registry",
            registry_errors.clone(),
        );
        r.register(
            "leader",
            "1 for this replica's view of the controllers' Lease (leader, follower or unknown)",
            lease_observer.states.clone(),
        );
        r.register(
            "lease_renew_errors",
            "Failed or timed-out reads and writes of the controllers' Lease",
            lease_observer.renew_errors.clone(),
        );
    });
    let impersonation: Option<Arc<dyn ImpersonationAuthorizer>> =
        kube.as_ref().map(|(_, limiter, clusters)| {
            Arc::new(NodeAuthorizer::new(
                clusters.registry.clone(),
                cfg.trusted_node_accounts.clone(),
                limiter.clone(),
                node_authz_calls.clone(),
            )) as Arc<dyn ImpersonationAuthorizer>
        });
    let clusters = kube.map(|(_, _, clusters)| clusters);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut renewal = None;
    let resolver = match &cfg.tls {
        ServingTls::Files { cert, key } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| AppError::Tls(format!("{}: {e}", p.display())))
            };
            Arc::new(
                ServingCertResolver::from_pem(&read(cert)?, &read(key)?)
                    .map_err(|e| AppError::Tls(e.to_string()))?,
            )
        }
        ServingTls::SelfIssued { hosts } => {
            let (chain, key, not_after) = issue_serving_cert(signer.as_ref(), hosts).await?;
            set_expiry(&metrics, "serving", not_after);
            let resolver = Arc::new(
                ServingCertResolver::from_pem(&chain, &key)
                    .map_err(|e| AppError::Tls(e.to_string()))?,
            );
            renewal = Some(renew_serving_cert(
                signer.clone(),
                hosts.clone(),
                resolver.clone(),
                metrics.clone(),
                not_after,
                shutdown_rx.clone(),
            ));
            resolver
        }
    };
    let tls = serving_config(resolver).map_err(|e| AppError::Tls(e.to_string()))?;

    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            addr: cfg.http_listen,
            source,
        })?;

    let ca = CaService::new(
        authn,
        signer.clone(),
        trust_rx,
        Durations {
            default: cfg.default_ttl,
            min: cfg.min_ttl,
            max: cfg.max_ttl,
            max_backdate: cfg.max_backdate,
        },
        cfg.trust_domain.clone(),
        impersonation,
        metrics.clone(),
        cfg.issuance_limit.as_ref().map(IssuanceLimiter::new),
    );
    let controllers = match (&cfg.controllers, &kube_client) {
        (Some(c), Some(client)) => Some((
            c.lease.clone(),
            Controllers {
                client: client.clone(),
                clusters: clusters.as_ref().map(|c| c.registry.subscribe()),
                trust: trust_tx.subscribe(),
                signer: signer.clone(),
                root_configmaps: c.root_configmaps,
                namespace_selector: c.namespace_selector.clone(),
                istiod: c.istiod.clone(),
                configmap_writes,
            },
        )),
        _ => None,
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;

    let readiness = Readiness::default();
    if let Some((lease, _)) = &controllers {
        let observer = lease_observer.clone();
        let name = lease.name.clone();
        readiness.set_detail(Arc::new(move || match observer.current() {
            Some((state, detail)) => format!("lease {name}: {} ({detail})", state.as_str()),
            None => format!("lease {name}: not observed yet"),
        }));
    }
    if let Some(c) = &clusters {
        c.report_to(&readiness);
    }
    let metrics_fn: Arc<dyn Fn() -> String + Send + Sync> = {
        let m = metrics.clone();
        Arc::new(move || m.encode())
    };
    let router = http_router(readiness.clone(), metrics_fn);

    tokio::spawn({
        let tx = shutdown_tx.clone();
        async move {
            shutdown.await;
            let _ = tx.send(true);
        }
    });

    let (conn_tx, conn_rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(tls);
    let limits = cfg.limits.clone();
    let refusals = Refusals::register(&metrics);
    let hard_stop = drain_deadline(shutdown_rx.clone(), limits.drain_deadline);
    let grpc_guard = ConnectionGuard::new(
        limits.max_connections,
        limits.idle_timeout,
        hard_stop.clone(),
        refusals.clone(),
    );
    let http_guard = ConnectionGuard::new(
        HTTP_MAX_CONNECTIONS,
        limits.idle_timeout,
        hard_stop,
        refusals.for_listener("http"),
    );
    let task = tokio::spawn(async move {
        let mut background = tokio::task::JoinSet::new();
        background.spawn(export_root_expiry(
            metrics.clone(),
            trust_tx.subscribe(),
            shutdown_rx.clone(),
        ));
        if let Some(path) = cfg.extra_roots.clone() {
            background.spawn(trust::reload_extra_roots(
                anchors,
                path,
                extra_roots_tx,
                trust::RELOAD_INTERVAL,
                shutdown_rx.clone(),
            ));
        }
        if let Some(c) = clusters {
            c.spawn(&mut background, shutdown_rx.clone());
        }
        if let Some((reg, in_use)) = registry {
            background.spawn(reg.run(in_use, local_rx, trust_tx.clone(), shutdown_rx.clone()));
        }
        if let Some((lease, ctrl)) = controllers {
            let (leading, elector) = spawn_elector(
                ctrl.client.clone(),
                lease,
                lease_observer,
                shutdown_rx.clone(),
            );
            background.spawn(ctrl.run_while_leading(leading, shutdown_rx.clone()));
            background.spawn(async move {
                let _ = elector.await;
            });
        }
        let accept = tokio::spawn(accept_tls(
            grpc_listener,
            acceptor,
            grpc_guard,
            limits.handshake_timeout,
            conn_tx,
            shutdown_rx.clone(),
        ));
        if let Some(r) = renewal {
            tokio::spawn(r);
        }
        if let Some(r) = pca_renewal {
            tokio::spawn(r.run(shutdown_rx.clone()));
        }
        let mut grpc_stop = shutdown_rx.clone();
        let ca = IstioCertificateServiceServer::new(ca)
            .max_decoding_message_size(limits.max_message_size);
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_header_list_size(limits.max_header_list_size)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .serve_with_incoming_shutdown(
                RequestLimits::new(GrpcServices::new(ca, health_service), &limits, refusals),
                ReceiverStream::new(conn_rx),
                async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                },
            );
        let mut http_stop = shutdown_rx.clone();
        let http_listener = GuardedListener::new(http_listener, http_guard);
        let http = axum::serve(http_listener, router).with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        });
        readiness.set(true);
        tracing::info!(%grpc_addr, %http_addr, signer = signer.name(), "meshid server ready");
        let mut not_ready = shutdown_rx.clone();
        tokio::spawn(async move {
            let _ = not_ready.wait_for(|s| *s).await;
            readiness.set(false);
        });
        // At the drain deadline every connection is closed (`ConnectionGuard`); should a server
        // still not have returned a moment later, stop waiting for it.
        let served = async { tokio::join!(grpc, http.into_future()) };
        let (grpc_res, http_res) = tokio::select! {
            served = served => served,
            _ = async {
                let _ = shutdown_rx.clone().wait_for(|s| *s).await;
                tokio::time::sleep(limits.drain_deadline + DRAIN_GRACE).await;
            } => {
                tracing::warn!("servers still busy after the drain deadline; stopping anyway");
                (Ok(()), Ok(()))
            }
        };
        accept.abort();
        while background.join_next().await.is_some() {}
        drop(trust_tx);
        grpc_res.map_err(|e| AppError::Serve(e.to_string()))?;
        http_res.map_err(|e| AppError::Serve(e.to_string()))?;
        tracing::info!("meshid server stopped");
        Ok(())
    });
    Ok(ServerHandle {
        grpc_addr,
        http_addr,
        root_pem,
        task,
    })
}
