//! `meshid agent` follows its CA's trust across a root rotation without a restart: real
//! `meshid server` processes on 127.0.0.1, restarted on a new root on the same port, and the
//! agent in-process (so that the test can watch what it serves).
//!
//! The servers use `--static-tokens` rather than TokenReview: what is under test is the TLS and
//! chain trust between agent and CA across server restarts, which authentication does not take
//! part in (TokenReview is covered by the kube-apiserver harness tests), and a static-token
//! server restarts in well under a second with no apiserver to wait for.
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshid::agent::{AgentConfig, AgentHandle, Svid, start_agent};
use meshid::identity::LeafProfile;
use meshid::pem::parse_certs;
use meshid::signer::{LocalSigner, SignRequest, Signer};
use meshid::trust::{TrustBundle, Usage};
use tokio::sync::oneshot;

const TOKEN: &str = "web-token";
/// How long any one awaited event may take before the test fails (not a timing assertion: a
/// bound so that a broken build fails instead of hanging).
const PATIENCE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A root CA kept in `dir` (generated on first use), as `meshid server --ca-dir` keeps it.
fn root_in(dir: &Path) -> (LocalSigner, String) {
    let signer = LocalSigner::load_or_generate(dir, "cluster.local").expect("root");
    let pem = signer.trust_anchors_pem().concat();
    (signer, pem)
}

/// A `meshid server` child process; killed on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `meshid server` on `listen` with the root CA in `ca_dir` plus `extra`, waits
    /// until `/readyz` answers 200.
    fn start(work: &Path, listen: SocketAddr, ca_dir: &Path, extra: &[&str]) -> Self {
        let tokens = work.join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},default,web\n")).unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(work.join(format!("server-{}.log", http.port()))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshid"))
            .arg("server")
            .args(["--listen", &listen.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--ca-dir", ca_dir.to_str().unwrap()])
            .args(["--static-tokens", tokens.to_str().unwrap()])
            .args(["--trust-domain", "cluster.local"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("meshid server starts");
        let mut server = Self { child };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("meshid server exited: {status}");
            }
            if http_status(http, "/readyz") == Some(200) {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "meshid server never became ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// Writes `dir/root-cert.pem` as the kubelet updates a ConfigMap volume: a new timestamped
/// directory, then a `..data` symlink renamed over the old one (the file is never rewritten).
fn kubelet_write(dir: &Path, generation: u32, pem: &str) -> PathBuf {
    let data = format!("..2026_12_01_{generation:04}");
    std::fs::create_dir(dir.join(&data)).unwrap();
    std::fs::write(dir.join(&data).join("root-cert.pem"), pem).unwrap();
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let file = dir.join("root-cert.pem");
    if file.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/root-cert.pem", &file).unwrap();
    }
    file
}

struct Agent {
    handle: AgentHandle,
    stop: oneshot::Sender<()>,
}

impl Agent {
    /// An agent for `default/web` against `ca`, trusting the roots in `root_file`, with a
    /// 30-second certificate renewed after a fifth of it (so that the test sees several).
    async fn start(work: &Path, ca: SocketAddr, root_file: &Path) -> Self {
        let token = work.join("token");
        std::fs::write(&token, TOKEN).unwrap();
        let mut config =
            AgentConfig::new(format!("https://{ca}"), root_file, token, "default", "web");
        config.sds_socket = work.join("sds.sock");
        config.http_listen = "127.0.0.1:0".parse().unwrap();
        config.cert_ttl = Duration::from_secs(30);
        config.refresh_fraction = 0.2;
        config.retry_initial = Duration::from_millis(200);
        config.retry_max = Duration::from_secs(1);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = start_agent(config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("agent starts");
        Self { handle, stop }
    }

    /// Waits until the served SVID satisfies `done`, and returns it.
    async fn wait_for(&self, what: &str, done: impl Fn(&Svid) -> bool) -> Svid {
        let mut svids = self.handle.svids();
        let found = tokio::time::timeout(
            PATIENCE,
            svids.wait_for(|s| s.as_deref().is_some_and(&done)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent never served {what}; metrics:\n{}",
                self.handle.metrics().encode()
            )
        })
        .expect("agent running");
        found.as_deref().cloned().expect("an SVID")
    }

    /// Waits until the agent's metrics contain `series`.
    async fn wait_for_metric(&self, series: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.handle.metrics().encode().contains(series) {
            assert!(
                Instant::now() < deadline,
                "no {series} in:\n{}",
                self.handle.metrics().encode()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shut_down(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle.wait())
            .await
            .expect("the agent stops")
            .expect("clean shutdown");
    }
}

/// Whether `svid`'s chain validates against `root_pem` alone.
fn issued_under(svid: &Svid, root_pem: &str) -> bool {
    let chain = parse_certs(&svid.chain_pem).unwrap();
    TrustBundle::from_pem(root_pem)
        .unwrap()
        .validate(&chain, time::OffsetDateTime::now_utc(), Usage::ClientAuth)
        .is_ok()
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_rotating_when_its_ca_restarts_on_a_new_root_listed_in_its_root_file() {
    let work = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (work.path().join("ca1"), work.path().join("ca2"));
    let (_, root1) = root_in(&ca1);
    let (_, root2) = root_in(&ca2);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The CA signs with root 1 and knows nothing of root 2.
    let server = Server::start(work.path(), listen, &ca1, &[]);
    let volume = work.path().join("istio-ca-root-cert");
    std::fs::create_dir(&volume).unwrap();
    let root_file = kubelet_write(&volume, 1, &root1);
    let agent = Agent::start(work.path(), listen, &root_file).await;
    let first = agent
        .wait_for("an SVID from root 1", |s| issued_under(s, &root1))
        .await;
    assert!(!first.roots_pem.contains(&root2));

    // Rotation step 1, as the agent sees it: the ConfigMap gains root 2, in place.
    kubelet_write(&volume, 2, &format!("{root1}{root2}"));
    agent
        .wait_for("root 2 from the updated root file", |s| {
            s.roots_pem.contains(&root2)
        })
        .await;

    // Step 2: the CA restarts signing with root 2 (its serving certificate now comes from root
    // 2 as well), keeping root 1 trusted through --extra-roots.
    server.stop();
    let extra = write_pem(work.path(), "extra-roots.pem", &root1);
    let _server = Server::start(
        work.path(),
        listen,
        &ca2,
        &["--extra-roots", extra.to_str().unwrap()],
    );
    let renewed = agent
        .wait_for("an SVID from root 2", |s| issued_under(s, &root2))
        .await;
    assert!(renewed.roots_pem.contains(&root1) && renewed.roots_pem.contains(&root2));
    assert!(
        !agent
            .handle
            .metrics()
            .encode()
            .contains("reason=\"untrusted_chain\""),
        "no response was refused"
    );
    agent.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trusts_a_root_announced_in_a_validated_response_when_its_root_file_lags() {
    let work = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (work.path().join("ca1"), work.path().join("ca2"));
    let (_, root1) = root_in(&ca1);
    let (_, root2) = root_in(&ca2);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Step 1 on the CA: root 2 is published in every response, but the agent's root file
    // (a ConfigMap the kubelet has not refreshed yet) still holds root 1 alone.
    let announce = write_pem(work.path(), "announce.pem", &root2);
    let server = Server::start(
        work.path(),
        listen,
        &ca1,
        &["--extra-roots", announce.to_str().unwrap()],
    );
    let root_file = write_pem(work.path(), "root-cert.pem", &root1);
    let agent = Agent::start(work.path(), listen, &root_file).await;
    agent
        .wait_for("root 2 learned from a response", |s| {
            issued_under(s, &root1) && s.roots_pem.contains(&root2)
        })
        .await;

    server.stop();
    let keep = write_pem(work.path(), "keep.pem", &root1);
    let _server = Server::start(
        work.path(),
        listen,
        &ca2,
        &["--extra-roots", keep.to_str().unwrap()],
    );
    agent
        .wait_for("an SVID from root 2", |s| issued_under(s, &root2))
        .await;
    assert_eq!(std::fs::read_to_string(&root_file).unwrap(), root1);
    agent.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_chain_validates_only_against_the_roots_it_carries_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (work.path().join("ca1"), work.path().join("ca2"));
    let (signer1, root1) = root_in(&ca1);
    // The CA serves TLS with a certificate from root 1, which the agent trusts, but signs
    // workloads with root 2 and returns root 2 as its bundle: the chain validates only against
    // the root inside the response.
    let key = rcgen::KeyPair::generate().unwrap();
    let req = SignRequest::for_key(
        LeafProfile::Server {
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            spiffe: None,
        },
        &key,
        Duration::from_secs(3600),
    )
    .unwrap();
    let serving = signer1.sign(req).await.unwrap();
    let tls_cert = write_pem(work.path(), "tls.pem", &serving.leaf_pem);
    let tls_key = write_pem(work.path(), "tls-key.pem", &key.serialize_pem());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _server = Server::start(
        work.path(),
        listen,
        &ca2,
        &[
            "--tls-cert",
            tls_cert.to_str().unwrap(),
            "--tls-key",
            tls_key.to_str().unwrap(),
        ],
    );
    let root_file = write_pem(work.path(), "root-cert.pem", &root1);
    let agent = Agent::start(work.path(), listen, &root_file).await;
    agent
        .wait_for_metric("meshid_agent_rotation_failures_total{reason=\"untrusted_chain\"}")
        .await;
    assert!(
        agent.handle.svids().borrow().is_none(),
        "nothing may be served"
    );
    agent.shut_down().await;
}
