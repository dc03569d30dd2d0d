//! A TCP proxy on 127.0.0.1 in front of the harness apiserver: it counts the connections meshid
//! opens, and it can be cut (every connection dropped, new ones refused) and restored, to play
//! an apiserver outage without stopping the shared harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// See the module documentation. Stops when dropped.
pub struct TcpProxy {
    /// Where meshid should connect.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the open-connection count when a relay ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TcpProxy {
    /// Relays 127.0.0.1:<random port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (up, accepted, open, peak) =
                (up.clone(), accepted.clone(), open.clone(), peak.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is reset
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now_open, Ordering::SeqCst);
                    let guard = Open(open.clone());
                    let mut cuts = cuts.clone();
                    // Only cuts made from now on end this connection.
                    cuts.borrow_and_update();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            }
        });
        TcpProxy {
            addr,
            up,
            cut,
            accepted,
            open,
            peak,
            task,
        }
    }

    /// The proxy's URL for a kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cuts every open connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Most connections open at once so far.
    pub fn peak_open(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}
