//! Builds the server's components from a validated [`ServerConfig`], runs them, and drains them
//! when the shutdown future completes. Each component is built by its own constructor from its
//! own options (`components`); this module only wires them.

mod clusters;
mod components;
mod listeners;

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::ServerConfig;
use crate::server::{CaService, CaServiceOptions, Durations, IssuanceLimiter, Readiness};
use crate::telemetry::ServerMetrics;
use components::{
    Authentication, AuthnOptions, ControllerSet, ServingTlsSetup, SignerOptions, StartedSigner,
    TrustChannels, TrustOptions,
};
use listeners::{Listeners, Services};

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

pub use crate::crypto::install_provider as install_crypto_provider;

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
    cfg.log_defaults();
    // Listeners and authentication first: a taken port or a bad kubeconfig (a crash loop) must
    // fail before the signer starts, since a PCA signer is billed for what it issues then.
    let listeners = Listeners::bind(cfg.listen, cfg.http_listen).await?;
    let metrics = ServerMetrics::new();
    let authn = Authentication::build(AuthnOptions::from_config(&cfg), &metrics).await?;
    let signer = StartedSigner::start(SignerOptions::from_config(&cfg), &metrics).await?;
    let anchors = signer.signer.trust_anchors_pem();
    let trust = TrustOptions::from_config(&cfg);
    let trust = TrustChannels::build(trust, anchors, authn.kube.as_ref(), &metrics).await?;
    let tls = ServingTlsSetup::build(&cfg.tls, &signer.signer, &metrics).await?;
    let controllers = ControllerSet::build(
        cfg.controllers.as_ref(),
        authn.kube.as_ref(),
        authn.clusters.as_ref().map(|c| c.registry.subscribe()),
        trust.tx.subscribe(),
        signer.signer.clone(),
        &metrics,
    );
    let clusters = authn.clusters;
    let ca = CaService::new(CaServiceOptions {
        authn: authn.authenticator,
        signer: signer.signer.clone(),
        trust: trust.tx.subscribe(),
        durations: durations(&cfg),
        trust_domain: cfg.trust_domain.clone(),
        impersonation: authn.impersonation,
        metrics: metrics.clone(),
        limiter: cfg.issuance_limit.as_ref().map(IssuanceLimiter::new),
    });
    let readiness = readiness(controllers.as_ref(), clusters.as_ref());
    let shutdown = shutdown_channel(shutdown);
    let (grpc_addr, http_addr) = (listeners.grpc_addr, listeners.http_addr);
    let root_pem = trust.root_pem.clone();
    // Held until the background tasks have stopped, so no subscriber sees the bundle close.
    let trust_tx = trust.tx.clone();
    let mut background = JoinSet::new();
    trust.spawn(&mut background, metrics.clone(), &shutdown);
    if let Some(c) = controllers {
        c.spawn(&mut background, &shutdown);
    }
    if let Some(c) = clusters {
        c.spawn(&mut background, &shutdown);
    }
    if let Some(r) = tls.renewal {
        tokio::spawn(r.run(shutdown.clone()));
    }
    if let Some(r) = signer.pca_renewal {
        tokio::spawn(r.run(shutdown.clone()));
    }
    let services = Services {
        ca,
        tls: tls.config,
        readiness,
        metrics,
        signer: signer.signer.name(),
    };
    let task = tokio::spawn(async move {
        let served = listeners.serve(services, cfg.limits, shutdown).await;
        while background.join_next().await.is_some() {}
        drop(trust_tx);
        served?;
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

/// `/readyz`, with the Lease state and the remote clusters' state as detail.
fn readiness(
    controllers: Option<&ControllerSet>,
    clusters: Option<&clusters::Clusters>,
) -> Readiness {
    let readiness = Readiness::default();
    if let Some(c) = controllers {
        c.report_to(&readiness);
    }
    if let Some(c) = clusters {
        c.report_to(&readiness);
    }
    readiness
}

/// The lifetime policy of `cfg`.
fn durations(cfg: &ServerConfig) -> Durations {
    Durations {
        default: cfg.default_ttl,
        min: cfg.min_ttl,
        max: cfg.max_ttl,
        max_backdate: cfg.max_backdate,
    }
}

/// A `watch` that turns true when `shutdown` completes.
fn shutdown_channel(shutdown: impl Future<Output = ()> + Send + 'static) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    rx
}
