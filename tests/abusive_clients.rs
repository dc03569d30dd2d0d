//! The server's limits against abusive clients: each test plays one abusive shape against a real
//! meshid server on 127.0.0.1 and shows the limit holding while a legitimate client is still
//! served.
//!
//! These servers authenticate with a static token file, not TokenReview: every limit here sits
//! below authentication (connections, TLS, HTTP/2 framing, request bodies), so the kube-apiserver
//! harness would add nothing these tests could observe, and they run without it.
//!
//! The abusive clients speak raw TCP, TLS and HTTP/2 frames (written by hand below), because a
//! well-behaved HTTP/2 library refuses to break the rules they break.
#![cfg(feature = "server")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::meshid::{ca_client, http_get, metric_value};
use common::raw_h2::*;
use meshid::agent::{WorkloadKeyType, generate_csr};
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

const TOKEN: &str = "web-token";
/// A bound that only a broken limit exceeds (a hang), never a timing measurement.
const GENEROUS: Duration = Duration::from_secs(30);

struct Server {
    handle: Option<ServerHandle>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A server with `limits` (fields of [`ServerArgs`]) over the defaults.
    async fn start(limits: impl FnOnce(&mut ServerArgs)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},default,web\n")).unwrap();
        let mut args = ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(dir.path().join("ca")),
            static_tokens: Some(tokens),
            ..Default::default()
        };
        limits(&mut args);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = start_server(args.validate().unwrap(), async move {
            let _ = stopped.await;
        })
        .await
        .expect("server starts");
        Self {
            handle: Some(handle),
            stop: Some(stop),
            _dir: dir,
        }
    }

    fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    fn grpc(&self) -> SocketAddr {
        self.handle().grpc_addr
    }

    fn metric(&self, series: &str) -> u64 {
        metric_value(&http_get(self.handle().http_addr, "/metrics"), series)
    }

    /// A legitimate client on a fresh connection gets a certificate.
    async fn assert_serves_a_legitimate_client(&self) {
        let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
        let (_key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
        let chain = tokio::time::timeout(
            GENEROUS,
            ca_client(self.handle()).create_certificate(
                &csr,
                TOKEN,
                Duration::from_secs(3600),
                None,
            ),
        )
        .await
        .expect("answered")
        .expect("a certificate for the legitimate client");
        assert!(chain.len() >= 2);
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.take().unwrap().wait().await.unwrap();
    }
}

fn refusals(listener: &str, reason: &str) -> String {
    format!("meshid_transport_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}")
}

/// A TLS connection (ALPN h2) to `server` that has finished its handshake.
async fn tls_connect(server: &Server) -> TlsStream<TcpStream> {
    tls_connect_to(server.grpc(), &server.handle().root_pem).await
}

/// An HTTP/2 client (the h2 crate) on a new TLS connection to `server`; its connection task
/// is spawned.
async fn h2_client(server: &Server) -> h2::client::SendRequest<bytes::Bytes> {
    let (h2, conn) = h2::client::handshake(tls_connect(server).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    h2
}

/// The head of a gRPC call to `path`, carrying [`TOKEN`] when `authorized`.
fn grpc_post(path: &str, authorized: bool) -> http::Request<()> {
    let mut request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if authorized {
        request = request.header("authorization", format!("Bearer {TOKEN}"));
    }
    request.body(()).unwrap()
}

/// The response head, which must arrive within [`GENEROUS`].
async fn answered(response: h2::client::ResponseFuture) -> http::Response<h2::RecvStream> {
    tokio::time::timeout(GENEROUS, response)
        .await
        .expect("answered")
        .unwrap()
}

/// Opens stream 1 with `kib` KiB of junk headers on a new connection to `server`, and returns
/// the first frame the server sends back that is `wanted`; panics past [`GENEROUS`].
async fn junk_headers_until(server: &Server, kib: usize, wanted: impl Fn(&Frame) -> bool) -> Frame {
    let mut conn = tls_connect(server).await;
    h2_handshake(&mut conn).await;
    let junk = "x".repeat(kib * 1024);
    conn.write_all(&open_stream(1, &[("x-junk", &junk)], true))
        .await
        .unwrap();
    tokio::time::timeout(GENEROUS, async {
        loop {
            let f = read_frame(&mut conn).await.expect("connection open");
            if wanted(&f) {
                return f;
            }
        }
    })
    .await
    .expect("an answer to the oversized header list")
}

/// Reads until the server closes the connection (EOF or an error); panics if it stays open
/// past [`GENEROUS`].
async fn assert_closed_by_server(io: &mut (impl AsyncRead + Unpin)) {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(GENEROUS, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_are_closed_at_once_and_silent_ones_are_reclaimed() {
    let server = Server::start(|a| {
        a.max_connections = Some(4);
        a.idle_timeout = Some("1s".into());
    })
    .await;
    // Four connections that never say anything fill the cap.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(server.grpc()).await.unwrap());
    }
    // Let the server accept all four before the fifth arrives.
    while server.metric(&refusals("grpc", "max_connections")) == 0 {
        let mut extra = TcpStream::connect(server.grpc()).await.unwrap();
        assert_closed_by_server(&mut extra).await;
    }
    // The probe listener has its own cap and still answers.
    assert!(http_get(server.handle().http_addr, "/healthz").contains("200 OK"));
    // The silent connections are closed after the idle timeout, freeing the cap.
    for conn in &mut silent {
        assert_closed_by_server(conn).await;
    }
    assert!(server.metric(&refusals("grpc", "idle_timeout")) >= 4);
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_starts_http2_is_closed_after_the_idle_timeout() {
    let server = Server::start(|a| a.idle_timeout = Some("1s".into())).await;
    let mut never_h2 = tls_connect(&server).await;
    server.assert_serves_a_legitimate_client().await;
    assert_closed_by_server(&mut never_h2).await;
    assert!(server.metric(&refusals("grpc", "idle_timeout")) >= 1);
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_closed_while_others_are_served() {
    let server = Server::start(|a| {
        a.idle_timeout = Some("2s".into());
        a.keepalive_interval = Some("1s".into());
        a.keepalive_timeout = Some("1s".into());
    })
    .await;
    let mut stalled = tls_connect(&server).await;
    h2_handshake(&mut stalled).await;
    // Requests whose answers it never reads.
    for i in 0..50u32 {
        let mut bytes = open_stream(2 * i + 1, &[("authorization", "Bearer nope")], false);
        bytes.extend(frame(DATA, END_STREAM, 2 * i + 1, &grpc_message(0)));
        stalled.write_all(&bytes).await.unwrap();
    }
    server.assert_serves_a_legitimate_client().await;
    // Unanswered keepalive PINGs (or the idle timeout) end it; reading now finds the end.
    assert_closed_by_server(&mut stalled).await;
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_body_never_arrives_gets_deadline_exceeded() {
    let server = Server::start(|a| a.request_timeout = Some("1s".into())).await;
    // A well-formed HTTP/2 client may open a stream and send its body later; this one never does.
    let mut h2 = h2_client(&server).await;
    let (response, _body_never_sent) = h2.send_request(grpc_post(CREATE, true), false).unwrap();
    server.assert_serves_a_legitimate_client().await;
    let response = answered(response).await;
    // A trailers-only response: the status is in the headers.
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "DEADLINE_EXCEEDED: {response:?}"
    );
    assert_eq!(server.metric(&refusals("grpc", "deadline_exceeded")), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_method_is_unimplemented_and_counted() {
    let server = Server::start(|_| {}).await;
    let mut h2 = h2_client(&server).await;
    let request = grpc_post("/istio.v1.auth.IstioCertificateService/Nope", false);
    let (response, _) = h2.send_request(request, true).unwrap();
    let response = answered(response).await;
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"12"[..]),
        "UNIMPLEMENTED: {response:?}"
    );
    assert_eq!(server.metric(&refusals("grpc", "unknown_method")), 1);
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_is_not_protobuf_is_internal_and_counted_as_malformed() {
    let server = Server::start(|_| {}).await;
    let mut h2 = h2_client(&server).await;
    let (response, mut body) = h2.send_request(grpc_post(CREATE, true), false).unwrap();
    // One gRPC message of 4 bytes that no protobuf decoder accepts (a truncated varint).
    let mut message = vec![0, 0, 0, 0, 4];
    message.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    body.send_data(message.into(), true).unwrap();
    let response = answered(response).await;
    let status = tonic::Status::from_header_map(response.headers()).expect("trailers-only");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert_eq!(server.metric(&refusals("grpc", "malformed_message")), 1);
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    let server = Server::start(|a| a.max_concurrent_streams = Some(8)).await;
    let mut conn = tls_connect(&server).await;
    let settings = h2_handshake(&mut conn).await;
    assert!(
        settings.contains(&(0x3, 8)),
        "SETTINGS_MAX_CONCURRENT_STREAMS advertised: {settings:?}"
    );
    // Forty half-open streams: headers, never a body.
    let mut flood = Vec::new();
    for i in 0..40u32 {
        flood.extend(open_stream(2 * i + 1, &[], false));
    }
    conn.write_all(&flood).await.unwrap();
    let refused = tokio::time::timeout(GENEROUS, async {
        let mut refused = std::collections::BTreeSet::new();
        while refused.len() < 32 {
            let f = read_frame(&mut conn).await.expect("connection open");
            if f.kind == RST_STREAM && f.payload == REFUSED_STREAM.to_be_bytes() {
                refused.insert(f.stream);
            }
            assert_ne!(f.kind, GOAWAY, "connection-level refusal");
        }
        refused
    })
    .await
    .expect("refusals");
    assert_eq!(refused.len(), 32, "all streams beyond the first 8 refused");
    assert_eq!(
        server.metric(&refusals("grpc", "max_concurrent_streams")),
        32,
        "h2's own refusals counted"
    );
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_list_over_the_limit_is_refused_and_counted_and_an_oversized_token_is_unauthenticated()
 {
    let server = Server::start(|_| {}).await;
    // 150 KiB of headers in 10 frames, over the 128 KiB default: h2 answers 431 itself.
    let answer = junk_headers_until(&server, 150, |f| {
        assert_ne!(f.kind, GOAWAY, "a stream-level refusal");
        f.kind == HEADERS && f.stream == 1
    })
    .await;
    assert_ne!(answer.payload.first(), Some(&0x88), "not :status 200");
    let too_large = refusals("grpc", "header_list_too_large");
    assert_eq!(server.metric(&too_large), 1, "the 431 counted");

    // 200 KiB: more CONTINUATION frames than the limit allows, so h2 sends GOAWAY.
    junk_headers_until(&server, 200, |f| f.kind == GOAWAY).await;
    assert_eq!(server.metric(&too_large), 2, "the GOAWAY counted");
    server.assert_serves_a_legitimate_client().await;

    // A 100 KB token fits the header limit and gets a typed, audited refusal.
    let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
    let (_key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
    let big_token = "a".repeat(100_000);
    let err = ca_client(server.handle())
        .create_certificate(&csr, &big_token, Duration::from_secs(3600), None)
        .await
        .unwrap_err();
    match err {
        meshid::agent::CaClientError::Status { code, message } => {
            assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected a status, got {other}"),
    }
    let rejected =
        "meshid_certificate_requests_total{outcome=\"rejected\",reason=\"token_too_large\"}";
    assert_eq!(server.metric(rejected), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_16_mib_message_is_resource_exhausted() {
    let server = Server::start(|_| {}).await;
    let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
    let (_key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
    let huge = format!("{csr}{}", " ".repeat(16 << 20));
    let err = ca_client(server.handle())
        .create_certificate(&huge, TOKEN, Duration::from_secs(3600), None)
        .await
        .unwrap_err();
    match err {
        meshid::agent::CaClientError::Status { code, message } => {
            assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        }
        other => panic!("expected a status, got {other}"),
    }
    assert_eq!(server.metric(&refusals("grpc", "message_too_large")), 1);
    server.assert_serves_a_legitimate_client().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_within_the_drain_deadline_despite_stalled_clients() {
    let dir = tempfile::tempdir().unwrap();
    // Idle, request and keepalive timeouts far beyond the drain deadline: only the deadline can
    // end these clients' connections.
    let (mut child, grpc) = spawn_binary(
        dir.path(),
        &[
            "--drain-deadline",
            "2s",
            "--idle-timeout",
            "1h",
            "--request-timeout",
            "1h",
            "--keepalive-interval",
            "1h",
        ],
    );
    let root_pem = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    // A legitimate client is served before the signal.
    let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
    let (_key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
    meshid::agent::CaClient::new(
        &format!("https://{grpc}"),
        &root_pem,
        Some("localhost"),
        None,
    )
    .unwrap()
    .create_certificate(&csr, TOKEN, Duration::from_secs(3600), None)
    .await
    .expect("a certificate before shutdown");
    // One that never starts TLS, one that never starts HTTP/2, one whose request body never
    // arrives, and one that stops reading.
    let never_tls = TcpStream::connect(grpc).await.unwrap();
    let never_h2 = tls_connect_to(grpc, &root_pem).await;
    let mut body_never = tls_connect_to(grpc, &root_pem).await;
    h2_handshake(&mut body_never).await;
    body_never
        .write_all(&open_stream(
            1,
            &[("authorization", &format!("Bearer {TOKEN}"))],
            false,
        ))
        .await
        .unwrap();
    let mut stops_reading = tls_connect_to(grpc, &root_pem).await;
    h2_handshake(&mut stops_reading).await;
    for i in 0..50u32 {
        let mut bytes = open_stream(2 * i + 1, &[("authorization", "Bearer nope")], false);
        bytes.extend(frame(DATA, END_STREAM, 2 * i + 1, &grpc_message(0)));
        stops_reading.write_all(&bytes).await.unwrap();
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // A functional bound: the drain deadline (2s) plus 5s, where "never" is the failure.
    let exited = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(7) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let status = exited.expect("meshid exited within the drain deadline + 5s");
    assert!(status.success(), "{status}");
    drop((never_tls, never_h2, body_never, stops_reading));
}

/// Starts the `meshid` binary with static tokens and its own root in `dir`, on free loopback
/// ports; returns it and its gRPC address once `/healthz` answers.
fn spawn_binary(dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let tokens = dir.join("tokens.csv");
    std::fs::write(&tokens, format!("{TOKEN},default,web\n")).unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", common::envoy::free_port())
        .parse()
        .unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", common::envoy::free_port())
        .parse()
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .arg("server")
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--static-tokens")
        .arg(&tokens)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("meshid binary");
    let started = std::time::Instant::now();
    while !http_get_ok(http) {
        assert!(started.elapsed() < GENEROUS, "meshid did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, grpc)
}

fn http_get_ok(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_ok() && http_get(addr, "/readyz").contains("200 OK")
}
