//! The `SecretDiscoveryService` over a Unix socket. Each `StreamSecrets` stream is one task
//! running one `select!` loop over client requests, SVID updates and shutdown.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::resources::{DEFAULT_RESOURCE, ROOT_RESOURCE, SECRET_TYPE_URL, resources};
use super::stream::{RequestKind, StreamState};
use crate::svid::SvidReceiver;

/// The SDS socket could not be set up or the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdsError {
    /// The socket's directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is in the way at the socket path.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// Another live agent holds the socket path (its lock file is locked).
    #[error("{path} is held by another running agent; refusing to take it over")]
    InUse {
        /// The socket path.
        path: String,
    },
    /// The lock file beside the socket could not be created or locked.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("SDS server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// SDS metrics (registered under the agent's registry with the `sds` prefix).
#[derive(Clone, Debug, Default)]
pub struct SdsMetrics {
    /// Open `StreamSecrets` streams.
    pub streams: Gauge,
    /// Responses sent on streams (initial responses and pushes after rotation).
    pub pushes: Counter,
    /// NACKs received.
    pub nacks: Counter,
    /// Times the socket file was found deleted or replaced and was recreated.
    pub socket_recreations: Counter,
}

impl SdsMetrics {
    /// Registers these metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "streams",
            "Open SDS StreamSecrets streams",
            self.streams.clone(),
        );
        registry.register(
            "pushes",
            "SDS responses sent on streams",
            self.pushes.clone(),
        );
        registry.register(
            "nacks",
            "SDS responses rejected by the client",
            self.nacks.clone(),
        );
        registry.register(
            "socket_recreations",
            "Times the SDS socket file was found deleted or replaced and was recreated",
            self.socket_recreations.clone(),
        );
    }
}

/// Serves the current SVID as the SDS resources `default` and `ROOTCA`.
#[derive(Clone)]
pub struct SdsService {
    svids: SvidReceiver,
    metrics: SdsMetrics,
    shutdown: watch::Receiver<bool>,
}

impl SdsService {
    /// A service publishing what `svids` holds. Streams end when `shutdown` turns true.
    pub fn new(svids: SvidReceiver, metrics: SdsMetrics, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            svids,
            metrics,
            shutdown,
        }
    }
}

/// Decrements the open-streams gauge when a stream task ends, however it ends.
struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type Outgoing = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// What woke a stream's loop.
enum Event {
    Shutdown,
    ClientGone,
    SvidChanged,
    Request(Box<DiscoveryRequest>),
}

/// One `StreamSecrets` stream.
struct StreamHandler {
    state: StreamState,
    svids: SvidReceiver,
    metrics: SdsMetrics,
    shutdown: watch::Receiver<bool>,
}

impl StreamHandler {
    async fn run(mut self, mut requests: Streaming<DiscoveryRequest>, out: Outgoing) {
        self.metrics.streams.inc();
        let _guard = StreamGuard(self.metrics.streams.clone());
        loop {
            let event = tokio::select! {
                _ = self.shutdown.wait_for(|s| *s) => Event::Shutdown,
                _ = out.closed() => Event::ClientGone,
                changed = self.svids.changed() => match changed {
                    Ok(()) => Event::SvidChanged,
                    Err(_) => Event::Shutdown,
                },
                msg = requests.message() => match msg {
                    Ok(Some(req)) => Event::Request(Box::new(req)),
                    Ok(None) => Event::ClientGone,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "SDS stream ended by client");
                        Event::ClientGone
                    }
                },
            };
            let keep_going = match event {
                Event::Shutdown => {
                    tracing::debug!("shutting down; closing SDS stream");
                    false
                }
                Event::ClientGone => false,
                Event::SvidChanged => self.send_if_changed(&out).await,
                Event::Request(req) => self.on_request(&req, &out).await,
            };
            if !keep_going {
                return;
            }
        }
    }

    /// Handles one request; false when the stream should end.
    async fn on_request(&mut self, req: &DiscoveryRequest, out: &Outgoing) -> bool {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            let _ = out
                .send(Err(Status::invalid_argument(format!(
                    "unsupported type {}",
                    req.type_url
                ))))
                .await;
            return false;
        }
        let node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        match self.state.on_request(req) {
            RequestKind::Stale => {
                tracing::debug!(node, nonce = %req.response_nonce, "ignoring request with a stale nonce");
                true
            }
            RequestKind::Nack { version, message } => {
                self.metrics.nacks.inc();
                tracing::warn!(
                    node,
                    nonce = %req.response_nonce,
                    kept_version = %version,
                    error = %message,
                    "SDS client rejected secrets; keeping the stream open"
                );
                true
            }
            RequestKind::Initial => {
                tracing::info!(node, resources = ?req.resource_names, "SDS subscription");
                let served = [DEFAULT_RESOURCE, ROOT_RESOURCE];
                if !req.resource_names.is_empty()
                    && !req
                        .resource_names
                        .iter()
                        .any(|n| served.contains(&n.as_str()))
                {
                    tracing::warn!(node, resources = ?req.resource_names, "subscription names no secret this agent serves (default, ROOTCA)");
                }
                self.send_if_changed(out).await
            }
            RequestKind::Ack { version } => {
                tracing::debug!(node, %version, "SDS ACK");
                self.send_if_changed(out).await
            }
        }
    }

    /// Sends the current resources if they differ from the last response; false when the
    /// client is gone.
    async fn send_if_changed(&mut self, out: &Outgoing) -> bool {
        let response = {
            let svid = self.svids.borrow_and_update();
            self.state.next_response(svid.as_deref())
        };
        let Some(response) = response else {
            return true;
        };
        tracing::info!(
            resources = ?self.state.names(),
            version = %response.version_info,
            nonce = %response.nonce,
            "pushing secrets"
        );
        self.metrics.pushes.inc();
        out.send(Ok(response)).await.is_ok()
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (out, rx) = mpsc::channel(4);
        let handler = StreamHandler {
            state: StreamState::default(),
            svids: self.svids.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(handler.run(request.into_inner(), out));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "unsupported type {}",
                req.type_url
            )));
        }
        let svid = self.svids.borrow().clone();
        let svid = svid.ok_or_else(|| Status::unavailable("no SVID yet"))?;
        let found = resources(&req.resource_names, &svid).ok_or_else(|| {
            Status::not_found(format!("no such secrets: {:?}", req.resource_names))
        })?;
        Ok(Response::new(DiscoveryResponse {
            version_info: found.version,
            resources: found.resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            ..Default::default()
        }))
    }
}

/// Binds the SDS Unix socket at `path`, creating its directory and replacing a stale socket
/// left by a previous run. Errors: [`SdsError::CreateDir`], [`SdsError::NotASocket`] (a
/// regular file or directory is never removed), [`SdsError::Bind`].
pub fn bind_socket(path: &Path) -> Result<UnixListener, SdsError> {
    let shown = || path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SdsError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| SdsError::Bind {
                path: shown(),
                source,
            })?;
        }
        Ok(_) => return Err(SdsError::NotASocket { path: shown() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SdsError::Bind {
                path: shown(),
                source,
            });
        }
    }
    UnixListener::bind(path).map_err(|source| SdsError::Bind {
        path: shown(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use hyper_util::rt::TokioIo;
    use std::path::PathBuf;
    use tokio::net::UnixStream;
    use tonic::transport::{Channel, Endpoint};

    use super::*;
    use crate::identity::SpiffeId;
    use crate::svid::Svid;
    use crate::svid::testing::TestCa;

    struct Fixture {
        ca: TestCa,
        svids: watch::Sender<Option<Arc<Svid>>>,
        metrics: SdsMetrics,
        stop: watch::Sender<bool>,
        server: tokio::task::JoinHandle<Result<(), SdsError>>,
        socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(
            dir.path(),
            SpiffeId::for_service_account("cluster.local", "ns", "web").unwrap(),
        );
        let socket = dir.path().join("run").join("sds.sock");
        let (svids, rx) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let metrics = SdsMetrics::default();
        let bound = crate::sds::SdsSocket::bind(&socket).unwrap();
        let service = SdsService::new(rx, metrics.clone(), stop_rx.clone());
        let server = tokio::spawn(crate::sds::serve(bound, service, stop_rx));
        Fixture {
            ca,
            svids,
            metrics,
            stop,
            server,
            socket,
            _dir: dir,
        }
    }

    async fn client(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
        let socket = socket.to_owned();
        let channel = Endpoint::from_static("http://sds.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .unwrap();
        SecretDiscoveryServiceClient::new(channel)
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            node: Some(Node {
                id: "test-node".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    async fn next(responses: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("no response within 10s")
            .expect("stream error")
            .expect("stream ended")
    }

    #[tokio::test]
    async fn a_stream_waits_for_the_first_svid_then_gets_pushes_on_rotation_and_nacks_are_counted()
    {
        let f = fixture().await;
        let mut c = client(&f.socket).await;
        let (tx, rx) = mpsc::channel(8);
        tx.send(request(&["default"], "", "")).await.unwrap();
        let mut responses = c
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // No SVID yet: nothing is sent.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), responses.message())
                .await
                .is_err()
        );

        let a = f.ca.svid(Duration::from_secs(60));
        f.svids.send_replace(Some(Arc::new(a.clone())));
        let r1 = next(&mut responses).await;
        assert_eq!(r1.type_url, SECRET_TYPE_URL);
        assert_eq!(r1.resources.len(), 1);
        tx.send(request(&["default"], &r1.version_info, &r1.nonce))
            .await
            .unwrap();

        // Rotation: pushed without being asked.
        let b = f.ca.svid(Duration::from_secs(60));
        f.svids.send_replace(Some(Arc::new(b)));
        let r2 = next(&mut responses).await;
        assert_ne!(r2.version_info, r1.version_info);
        assert_ne!(r2.nonce, r1.nonce);

        // The client rejects it: counted, logged, and the stream stays open.
        tx.send(DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "cannot load key".into(),
                details: vec![],
            }),
            ..request(&["default"], &r1.version_info, &r2.nonce)
        })
        .await
        .unwrap();
        // A stale ACK (old nonce) is ignored.
        tx.send(request(&["default"], &r1.version_info, &r1.nonce))
            .await
            .unwrap();
        // (Wait for the NACK to be handled: a push racing ahead of it would make it stale.)
        for _ in 0..100 {
            if f.metrics.nacks.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.metrics.nacks.get(), 1, "the NACK was not counted");
        // The next rotation is still pushed on the same stream.
        let c3 = f.ca.svid(Duration::from_secs(60));
        f.svids.send_replace(Some(Arc::new(c3)));
        let r3 = next(&mut responses).await;
        assert_ne!(r3.version_info, r2.version_info);
        assert_eq!(f.metrics.nacks.get(), 1);
        assert_eq!(f.metrics.pushes.get(), 3);
        assert_eq!(f.metrics.streams.get(), 1);

        drop(tx);
        f.stop.send_replace(true);
        f.server.await.unwrap().unwrap();
        assert!(!f.socket.exists(), "the socket file is removed at shutdown");
        assert_eq!(f.metrics.streams.get(), 0);
    }

    #[tokio::test]
    async fn every_open_stream_gets_the_rotated_secret_and_rootca_is_not_resent_when_roots_did_not_change()
     {
        let f = fixture().await;
        f.svids
            .send_replace(Some(Arc::new(f.ca.svid(Duration::from_secs(60)))));
        let mut c = client(&f.socket).await;
        let mut streams = Vec::new();
        for names in [&["default"][..], &["default"][..], &["ROOTCA"][..]] {
            let (tx, rx) = mpsc::channel(8);
            tx.send(request(names, "", "")).await.unwrap();
            let mut responses = c
                .stream_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let first = next(&mut responses).await;
            tx.send(request(names, &first.version_info, &first.nonce))
                .await
                .unwrap();
            streams.push((tx, responses, first));
        }
        f.svids
            .send_replace(Some(Arc::new(f.ca.svid(Duration::from_secs(60)))));
        for (_tx, responses, first) in streams.iter_mut().take(2) {
            let pushed = next(responses).await;
            assert_ne!(pushed.version_info, first.version_info);
        }
        let (_tx, rootca, _) = &mut streams[2];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rootca.message())
                .await
                .is_err(),
            "ROOTCA was resent although the roots did not change"
        );
        f.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), f.server)
            .await
            .expect("server drains")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn fetch_secrets_answers_with_the_current_svid_or_unavailable() {
        let f = fixture().await;
        let mut c = client(&f.socket).await;
        let err = c
            .fetch_secrets(request(&["default"], "", ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        f.svids
            .send_replace(Some(Arc::new(f.ca.svid(Duration::from_secs(60)))));
        let r = c
            .fetch_secrets(request(&["ROOTCA", "default"], "", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.resources.len(), 2);
        let err = c
            .fetch_secrets(request(&["other"], "", ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let err = c
            .fetch_secrets(DiscoveryRequest {
                type_url: "type.googleapis.com/x".into(),
                ..request(&[], "", "")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        f.stop.send_replace(true);
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind_socket(&path),
            Err(SdsError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_stale_socket_from_a_previous_run_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        drop(bind_socket(&path).unwrap());
        assert!(path.exists());
        bind_socket(&path).expect("rebinding over a stale socket");
    }
}
