//! The SDS Unix socket: held by one agent at a time, and kept in place while the agent runs.
//!
//! - **One agent per path.** [`SdsSocket::bind`] first takes an exclusive `flock` on a lock file
//!   beside the socket (`<socket>.lock`, see [`lock_path`]). A second agent started on the same
//!   path fails with [`SdsError::InUse`] and leaves the live socket alone. The lock goes away
//!   with the process that holds it, so a crashed agent never blocks the next one; the lock file
//!   itself is never removed (removing it would let two agents lock two different files).
//! - **Kept in place.** [`serve`] checks every [`CHECK_INTERVAL`] that the file at the path is
//!   still the socket it bound (same device and inode). When it was deleted or replaced, the
//!   agent logs it, reports not serving ([`SdsSocket::serving`], used by `/readyz`), binds a new
//!   socket at the path and reports serving again. Streams already open are not affected.
//! - **Removed on exit** only if the file at the path is still the one it bound.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::service::{SdsError, SdsService, bind_socket};

/// How often the socket file is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The lock file guarding `socket`: its path with `.lock` appended.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// (device, inode) of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A bound SDS socket and the lock that makes it this agent's.
#[derive(Debug)]
pub struct SdsSocket {
    path: PathBuf,
    _lock: File,
    listener: UnixListener,
    id: Option<(u64, u64)>,
    serving: watch::Sender<bool>,
    check_every: Duration,
    recreated: Counter,
}

impl SdsSocket {
    /// Locks `path` for this agent, then binds it (replacing a stale socket left by an agent
    /// that is gone). Errors: [`SdsError::InUse`] when another live agent holds the path, the
    /// errors of creating the directory or the lock file, and those of binding.
    pub fn bind(path: &Path) -> Result<Self, SdsError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SdsError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let lock_file = lock_path(path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_file)
            .map_err(|source| SdsError::Lock {
                path: lock_file.display().to_string(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SdsError::InUse {
                    path: path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(SdsError::Lock {
                    path: lock_file.display().to_string(),
                    source,
                });
            }
        }
        let listener = bind_socket(path)?;
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
            id: file_id(path),
            listener,
            serving: watch::channel(true).0,
            check_every: CHECK_INTERVAL,
            recreated: Counter::default(),
        })
    }

    /// True while the file at the path is the socket this agent serves on.
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Counts re-creations of the socket in `counter`.
    pub fn count_recreations(mut self, counter: Counter) -> Self {
        self.recreated = counter;
        self
    }

    /// Checks the socket file every `every` instead of [`CHECK_INTERVAL`].
    #[cfg(test)]
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = every;
        self
    }
}

/// Accepts connections on `listener` for the server until the server is gone.
async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<io::Result<UnixStream>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if tx.send(Ok(stream)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "SDS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `service` on `socket` until `shutdown` turns true, keeping the socket file in place
/// (see the module documentation), then removes it if it is still this agent's. Open streams
/// end at shutdown (see [`SdsService::new`]).
pub async fn serve(
    socket: SdsSocket,
    service: SdsService,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SdsError> {
    let SdsSocket {
        path,
        _lock,
        listener,
        mut id,
        serving,
        check_every,
        recreated,
    } = socket;
    let (tx, rx) = mpsc::channel(16);
    let mut server_stop = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(SecretDiscoveryServiceServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
    let keeper = async {
        let mut accept = tokio::spawn(accept_loop(listener, tx.clone()));
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            if id.is_some() && file_id(&path) == id {
                continue;
            }
            if *serving.borrow() {
                tracing::warn!(
                    path = %path.display(),
                    "SDS socket file was deleted or replaced; recreating it"
                );
                serving.send_replace(false);
            }
            match bind_socket(&path) {
                Ok(listener) => {
                    accept.abort();
                    id = file_id(&path);
                    accept = tokio::spawn(accept_loop(listener, tx.clone()));
                    recreated.inc();
                    serving.send_replace(true);
                    tracing::info!(path = %path.display(), "SDS socket recreated");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot recreate the SDS socket; retrying");
                }
            }
        }
        accept.abort();
        id
    };
    let (result, id) = tokio::join!(server, keeper);
    drop(tx);
    if id.is_some() && file_id(&path) == id {
        let _ = std::fs::remove_file(&path);
    }
    serving.send_replace(false);
    result.map_err(SdsError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use hyper_util::rt::TokioIo;
    use tonic::transport::Endpoint;

    use crate::sds::{SECRET_TYPE_URL, SdsMetrics};

    struct Running {
        serving: watch::Receiver<bool>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), SdsError>>,
        recreated: Counter,
    }

    fn start(path: &Path) -> Running {
        let recreated = Counter::default();
        let socket = SdsSocket::bind(path)
            .unwrap()
            .check_every(Duration::from_millis(20))
            .count_recreations(recreated.clone());
        let serving = socket.serving();
        let (stop, stop_rx) = watch::channel(false);
        let (_svids, rx) = watch::channel(None);
        let service = SdsService::new(rx, SdsMetrics::default(), stop_rx.clone());
        let task = tokio::spawn(serve(socket, service, stop_rx));
        Running {
            serving,
            stop,
            task,
            recreated,
        }
    }

    /// A FetchSecrets over the socket: the agent answers (UNAVAILABLE before any SVID).
    async fn fetch(path: &Path) -> Result<tonic::Code, tonic::transport::Error> {
        let path = path.to_owned();
        let channel = Endpoint::from_static("http://sds.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await?;
        let status = SecretDiscoveryServiceClient::new(channel)
            .fetch_secrets(DiscoveryRequest {
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .expect_err("no SVID yet");
        Ok(status.code())
    }

    #[tokio::test]
    async fn a_second_agent_on_a_held_path_refuses_to_start_and_leaves_the_live_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let first = start(&path);
        let before = file_id(&path);
        assert!(matches!(
            SdsSocket::bind(&path),
            Err(SdsError::InUse { .. })
        ));
        assert_eq!(file_id(&path), before, "the live socket was not replaced");
        assert_eq!(fetch(&path).await.unwrap(), tonic::Code::Unavailable);
        first.stop.send_replace(true);
        first.task.await.unwrap().unwrap();
        assert!(!path.exists(), "removed at exit");
        // Once the first agent is gone, the path is free again.
        let again = SdsSocket::bind(&path).expect("lock released with its holder");
        drop(again);
    }

    #[tokio::test]
    async fn a_deleted_socket_is_recreated_and_served_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("socket");
        let r = start(&path);
        assert!(*r.serving.borrow());
        std::fs::remove_file(&path).unwrap();
        while r.recreated.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(*r.serving.borrow());
        assert_eq!(r.recreated.get(), 1);
        assert_eq!(fetch(&path).await.unwrap(), tonic::Code::Unavailable);
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_socket_replaced_by_a_regular_file_is_not_served_until_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let mut r = start(&path);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        r.serving.wait_for(|s| !*s).await.unwrap();
        // The file is never removed by the agent; the agent keeps trying.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(!*r.serving.borrow());
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        }
        std::fs::remove_file(&path).unwrap();
        r.serving.wait_for(|s| *s).await.unwrap();
        assert_eq!(fetch(&path).await.unwrap(), tonic::Code::Unavailable);
        // At exit, a file that is not the agent's own socket is left in place.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
    }
}
