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

#[path = "common/child.rs"]
mod child;
#[path = "../tests/common/raw_h2.rs"]
mod raw_h2;

use std::process::Command;
use std::time::{Duration, Instant};

use child::{ChildServer, rss_mib};
use raw_h2::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN: &str = "bench-token";

/// `meshid server` with its default limits, a self-generated root and the static token
/// [`TOKEN`], and the directory that holds them.
fn start_server(extra: &[&str]) -> (ChildServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, format!("{TOKEN},default,bench\n")).unwrap();
    let tokens = tokens.to_str().expect("a UTF-8 temporary path");
    let args = ["--static-tokens", tokens]
        .into_iter()
        .chain(extra.iter().copied());
    let server = ChildServer::start(&dir.path().join("ca"), args);
    (server, dir)
}

/// SIGTERM, then the time until the process has exited.
fn terminate(server: &mut ChildServer) -> Duration {
    let sent = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    loop {
        if server.child.try_wait().unwrap().is_some() {
            return sent.elapsed();
        }
        if sent.elapsed() > Duration::from_secs(120) {
            let _ = server.child.kill();
            let _ = server.child.wait();
            return sent.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// `streams` half-open CreateCertificate streams on one new connection; the server's answers are
/// read (and dropped) in the background so that its writes never block.
async fn half_open(server: &ChildServer, streams: u32) -> tokio::task::JoinHandle<()> {
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
    let (server, _dir) = start_server(&[]);
    settle().await;
    let before = rss_mib(server.child.id());
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(tls_connect_to(server.grpc, &server.root_pem).await);
    }
    settle().await;
    let held = rss_mib(server.child.id());
    drop(conns);
    settle().await;
    let after = rss_mib(server.child.id());
    println!(
        "1,000 idle TLS connections: RSS {before:.1} MiB before, {held:.1} MiB holding them \
         ({:.1} KiB each), {after:.1} MiB after they closed",
        (held - before) * 1024.0 / 1000.0
    );
}

async fn half_open_streams() {
    let (mut server, _dir) = start_server(&[]);
    settle().await;
    let before = rss_mib(server.child.id());
    let one = half_open(&server, 10_000).await;
    settle().await;
    let one_conn = rss_mib(server.child.id());
    one.abort();
    println!(
        "10,000 half-open streams attempted on one connection (100 admitted): RSS {before:.1} MiB \
         before, {one_conn:.1} MiB during"
    );
    terminate(&mut server);

    let (mut server, _dir) = start_server(&[]);
    settle().await;
    let before = rss_mib(server.child.id());
    let mut readers = Vec::new();
    for _ in 0..100 {
        readers.push(half_open(&server, 100).await);
    }
    settle().await;
    let during = rss_mib(server.child.id());
    for r in readers {
        r.abort();
    }
    println!(
        "100 connections x 100 half-open streams (10,000 held): RSS {before:.1} MiB before, \
         {during:.1} MiB during ({:.1} KiB per stream)",
        (during - before) * 1024.0 / 10_000.0
    );
    terminate(&mut server);
}

async fn sigterm_with_stalled_clients() {
    let (mut server, _dir) = start_server(&[]);
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
    let took = tokio::task::block_in_place(|| terminate(&mut server));
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
