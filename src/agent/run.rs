//! Builds the agent's components from a validated configuration, runs them, and stops them when
//! the shutdown future completes (or one of them fails).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ca_client::{CaClient, CaClientError};
use super::config::{AgentConfig, AgentConfigError};
use super::files::run_file_sink;
use super::http::router;
use super::metrics::AgentMetrics;
use super::rotation::{Rotation, RotationSettings};
use super::trust::{CaTrust, ROOT_FILE_POLL_INTERVAL, watch_root_file};
use crate::sds::{self, SdsError, SdsService};
use crate::svid::SvidReceiver;
use crate::trust::TrustBundle;

/// The agent could not start, or a component failed while running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] AgentConfigError),
    /// The CA root file could not be read.
    #[error("cannot read CA root file {path}: {source}")]
    CaRoot {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CA root file holds no usable certificate.
    #[error("CA root file {path}: {source}")]
    CaRootInvalid {
        /// The file.
        path: String,
        /// Why it is unusable.
        #[source]
        source: crate::trust::TrustError,
    },
    /// The CA client could not be set up (address or TLS settings).
    #[error(transparent)]
    CaClient(#[from] CaClientError),
    /// The SDS socket could not be set up, or the SDS server failed.
    #[error(transparent)]
    Sds(#[from] SdsError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    /// A component task panicked.
    #[error("agent task failed: {0}")]
    Task(String),
}

/// A started agent.
pub struct AgentHandle {
    /// The SDS socket it serves on.
    pub sds_socket: PathBuf,
    /// The bound HTTP probes/metrics address (useful with port 0).
    pub http_addr: SocketAddr,
    svids: SvidReceiver,
    metrics: AgentMetrics,
    task: JoinHandle<Result<(), AgentError>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("sds_socket", &self.sds_socket)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl AgentHandle {
    /// The SVID currently served (`None` until the first one), and its updates.
    pub fn svids(&self) -> SvidReceiver {
        self.svids.clone()
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// Waits until every component has stopped after shutdown. Returns the first error of a
    /// component that failed.
    pub async fn wait(self) -> Result<(), AgentError> {
        self.task
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?
    }
}

/// Starts the agent: reads the CA roots, binds the SDS socket and the HTTP listener, and
/// spawns the rotation loop and the watcher of the CA root file (its roots, and those of every
/// validated response, are trusted for the CA connection and served as `ROOTCA`; see
/// `agent::trust`). Returns once everything is listening; the first SVID arrives
/// later (watch [`AgentHandle::svids`] or `/readyz`). Everything stops when `shutdown`
/// completes; the SDS socket file is removed then. While running, the agent keeps the socket
/// file in place (see [`sds::SdsSocket`]); `/readyz` fails while it is missing.
///
/// Errors (all at startup): [`AgentError::Config`], [`AgentError::CaRoot`],
/// [`AgentError::CaRootInvalid`], [`AgentError::CaClient`], [`AgentError::Sds`] (including
/// [`sds::SdsError::InUse`] when another live agent holds the socket path),
/// [`AgentError::Bind`]. A CA that is unreachable or refuses is not a startup error: the
/// agent keeps retrying with backoff.
pub async fn start_agent(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<AgentHandle, AgentError> {
    crate::crypto::install_provider();
    let s = config.validate()?;
    let trust = CaTrust::new(&read_ca_roots(&s.ca_root_file).await?);
    let client = CaClient::following(
        &s.ca_address,
        trust.subscribe(),
        s.ca_server_name.as_deref(),
        s.cluster_id.clone(),
    )?;

    let metrics = AgentMetrics::new();
    let (svid_tx, svids) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Arc::new(stop_tx);

    // Locks the path first: a second agent on it fails here and leaves the live socket alone.
    let sds_socket = sds::SdsSocket::bind(&s.sds_socket)?
        .count_recreations(metrics.sds.socket_recreations.clone());
    let sds_serving = sds_socket.serving();
    let (http_listener, http_addr) = bind_http(s.http_listen).await?;

    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.send_replace(true);
        }
    });

    let rotation = Rotation::new(
        client,
        RotationSettings {
            identity: s.identity.clone(),
            key_type: s.key_type,
            cert_ttl: s.cert_ttl,
            token_file: s.token_file.clone(),
            policy: s.policy,
        },
        metrics.clone(),
        trust.clone(),
    );
    let components = Components {
        rotation: rotation.run(svid_tx, stop_rx.clone()),
        root_file: watch_root_file(
            s.ca_root_file.clone(),
            trust,
            ROOT_FILE_POLL_INTERVAL,
            stop_rx.clone(),
        ),
        files: s
            .write_files
            .clone()
            .map(|dir| run_file_sink(dir, svids.clone(), stop_rx.clone())),
        sds_socket,
        sds_service: SdsService::new(svids.clone(), metrics.sds.clone(), stop_rx.clone()),
        http_listener,
        http: router(svids.clone(), metrics.clone(), sds_serving),
        stop,
        stop_rx,
    };
    tracing::info!(
        identity = %s.identity,
        ca = %s.ca_address,
        sds_socket = %s.sds_socket.display(),
        %http_addr,
        "meshid agent started"
    );
    Ok(AgentHandle {
        sds_socket: s.sds_socket,
        http_addr,
        svids,
        metrics,
        task: tokio::spawn(components.run()),
    })
}

/// Reads and parses the CA root file.
async fn read_ca_roots(path: &std::path::Path) -> Result<TrustBundle, AgentError> {
    let root_path = path.display().to_string();
    let root_pem = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| AgentError::CaRoot {
            path: root_path.clone(),
            source,
        })?;
    TrustBundle::from_pem(&root_pem).map_err(|source| AgentError::CaRootInvalid {
        path: root_path,
        source,
    })
}

/// Binds the HTTP probes/metrics listener.
async fn bind_http(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AgentError> {
    let bind_err = |source| AgentError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}

/// The agent's running parts, built and bound by [`start_agent`].
struct Components<R, F, S> {
    rotation: R,
    root_file: F,
    files: Option<S>,
    sds_socket: sds::SdsSocket,
    sds_service: SdsService,
    http_listener: TcpListener,
    http: axum::Router,
    stop: Arc<watch::Sender<bool>>,
    stop_rx: watch::Receiver<bool>,
}

impl<R, F, S> Components<R, F, S>
where
    R: Future<Output = ()> + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    /// Runs every component until shutdown; a component that fails stops the others.
    async fn run(self) -> Result<(), AgentError> {
        let Self {
            rotation,
            root_file,
            files,
            sds_socket,
            sds_service,
            http_listener,
            http,
            stop,
            stop_rx,
        } = self;
        let rotation = tokio::spawn(rotation);
        let root_file = tokio::spawn(root_file);
        let files = files.map(tokio::spawn);
        let fail_fast = |result: Result<(), AgentError>| {
            if result.is_err() {
                stop.send_replace(true);
            }
            result
        };
        let sds = async {
            let served = sds::serve(sds_socket, sds_service, stop_rx.clone()).await;
            fail_fast(served.map_err(AgentError::from))
        };
        let mut http_stop = stop_rx.clone();
        let http = async {
            let served = axum::serve(http_listener, http)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await;
            fail_fast(served.map_err(AgentError::Http))
        };
        let (sds_result, http_result) = tokio::join!(sds, http);
        let joined =
            |r: Result<(), tokio::task::JoinError>| r.map_err(|e| AgentError::Task(e.to_string()));
        joined(rotation.await)?;
        joined(root_file.await)?;
        if let Some(files) = files {
            joined(files.await)?;
        }
        sds_result?;
        http_result?;
        tracing::info!("meshid agent stopped");
        Ok(())
    }
}

/// Runs the agent until `shutdown` completes: [`start_agent`] then [`AgentHandle::wait`].
pub async fn run_agent(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    start_agent(config, shutdown).await?.wait().await
}
