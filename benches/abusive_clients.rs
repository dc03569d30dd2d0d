//! What abusive clients cost the server, and how long SIGTERM takes with stalled clients
//! (docs/BENCHMARKS.md, "Abusive clients"). Runs the release `meshid` binary on loopback with its
//! default limits and a self-generated root and static tokens, and reads its RSS from /proc:
//!
//! - 1,000 idle connections: TLS handshakes completed, then silence;
//! - 10,000 attempted half-open streams (HEADERS, never a body) on one connection, and 100 on
//!   each of 100 connections;
//! - SIGTERM with 200 stalled clients (50 each: never TLS, never HTTP/2, a body that never
//!   arrives, stops reading): the time from the signal to the exit.
//!
//! `cargo bench --bench abusive_clients`

#[path = "../tests/common/raw_h2.rs"]
mod raw_h2;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raw_h2::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN: &str = "bench-token";

struct Server {
    child: Child,
    grpc: SocketAddr,
    root_pem: String,
    _dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn ready(http: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return false;
    };
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("200 OK")
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},default,bench\n")).unwrap();
        let (grpc, http) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_meshid"))
            .arg("server")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--static-tokens")
            .arg(&tokens)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshid binary");
        let started = Instant::now();
        while !ready(http) {
            assert!(started.elapsed() < Duration::from_secs(30), "no start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let root_pem = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
        Self {
            child,
            grpc,
            root_pem,
            _dir: dir,
        }
    }

    fn rss_mib(&self) -> f64 {
        rss_kib(self.child.id()) as f64 / 1024.0
    }

    /// SIGTERM, then the time until the process has exited.
    fn terminate(&mut self) -> Duration {
        let sent = Instant::now();
        assert!(
            Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return sent.elapsed();
            }
            if sent.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return sent.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// `streams` half-open CreateCertificate streams on one new connection; the server's answers are
/// read (and dropped) in the background so that its writes never block.
async fn half_open(server: &Server, streams: u32) -> tokio::task::JoinHandle<()> {
    let tls = tls_connect_to(server.grpc, &server.root_pem).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut both = tokio::io::join(&mut rd, &mut wr);
    h2_handshake(&mut both).await;
    let mut flood = Vec::new();
    for i in 0..streams {
        flood.extend(open_stream(
            2 * i + 1,
            &[("authorization", &format!("Bearer {TOKEN}"))],
            false,
        ));
    }
    wr.write_all(&flood).await.unwrap();
    tokio::spawn(async move {
        let _keep = wr;
        while read_frame(&mut rd).await.is_some() {}
    })
}

async fn idle_connections() {
    let server = Server::start(&[]);
    settle().await;
    let before = server.rss_mib();
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(tls_connect_to(server.grpc, &server.root_pem).await);
    }
    settle().await;
    let held = server.rss_mib();
    drop(conns);
    settle().await;
    let after = server.rss_mib();
    println!(
        "1,000 idle TLS connections: RSS {before:.1} MiB before, {held:.1} MiB holding them \
         ({:.1} KiB each), {after:.1} MiB after they closed",
        (held - before) * 1024.0 / 1000.0
    );
}

async fn half_open_streams() {
    let mut server = Server::start(&[]);
    settle().await;
    let before = server.rss_mib();
    let one = half_open(&server, 10_000).await;
    settle().await;
    let one_conn = server.rss_mib();
    one.abort();
    println!(
        "10,000 half-open streams attempted on one connection (100 admitted): RSS {before:.1} MiB \
         before, {one_conn:.1} MiB during"
    );
    server.terminate();

    let mut server = Server::start(&[]);
    settle().await;
    let before = server.rss_mib();
    let mut readers = Vec::new();
    for _ in 0..100 {
        readers.push(half_open(&server, 100).await);
    }
    settle().await;
    let during = server.rss_mib();
    for r in readers {
        r.abort();
    }
    println!(
        "100 connections x 100 half-open streams (10,000 held): RSS {before:.1} MiB before, \
         {during:.1} MiB during ({:.1} KiB per stream)",
        (during - before) * 1024.0 / 10_000.0
    );
    server.terminate();
}

async fn sigterm_with_stalled_clients() {
    let mut server = Server::start(&[]);
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..50 {
        held.push(Box::new(TcpStream::connect(server.grpc).await.unwrap()));
        held.push(Box::new(
            tls_connect_to(server.grpc, &server.root_pem).await,
        ));
        let mut body_never = tls_connect_to(server.grpc, &server.root_pem).await;
        h2_handshake(&mut body_never).await;
        body_never
            .write_all(&open_stream(
                1,
                &[("authorization", &format!("Bearer {TOKEN}"))],
                false,
            ))
            .await
            .unwrap();
        held.push(Box::new(body_never));
        let mut stops_reading = tls_connect_to(server.grpc, &server.root_pem).await;
        h2_handshake(&mut stops_reading).await;
        for i in 0..50u32 {
            let mut bytes = open_stream(2 * i + 1, &[("authorization", "Bearer nope")], false);
            bytes.extend(frame(0x0, 0x1, 2 * i + 1, &grpc_message(0)));
            stops_reading.write_all(&bytes).await.unwrap();
        }
        held.push(Box::new(stops_reading));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = tokio::task::block_in_place(|| server.terminate());
    println!(
        "SIGTERM with 200 stalled clients (drain deadline 10s): exited after {:.2}s",
        took.as_secs_f64()
    );
    drop(held);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        idle_connections().await;
        half_open_streams().await;
        sigterm_with_stalled_clients().await;
    });
}
