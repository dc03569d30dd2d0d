//! CreateCertificate throughput and latency over TLS, beside the raw crypto cost per CSR
//! (CSR verify + leaf sign), measured in the same run so the ratio is meaningful on a noisy,
//! shared machine.
//!
//! Run: `cargo bench --bench create_certificate` (options after `--`: `--seconds N`,
//! `--concurrency N`, `--connections N`, `--key p256|rsa2048`).
//!
//! Authentication uses the real `TokenReviewAuthenticator` against the kube-apiserver harness
//! when `MESHID_TEST_KUBECONFIG` is set (one review, then a warm cache); otherwise the static
//! token authenticator, whose per-request work (SHA-256 of the token + hash-map lookup) is the
//! same as a cache hit.

use std::time::{Duration, Instant};

use meshid::agent::{CaClient, WorkloadKeyType, generate_csr};
use meshid::app::start_server;
use meshid::config::ServerArgs;
use meshid::identity::{LeafProfile, SpiffeId, check_csr};
use meshid::signer::{LocalSigner, SignRequest};

struct Opts {
    seconds: u64,
    concurrency: usize,
    connections: usize,
    key: WorkloadKeyType,
}

fn opts() -> Option<Opts> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without --bench: do nothing then.
        println!("create_certificate bench: skipped (run with `cargo bench`)");
        return None;
    }
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Some(Opts {
        seconds: get("--seconds").and_then(|v| v.parse().ok()).unwrap_or(10),
        concurrency: get("--concurrency")
            .and_then(|v| v.parse().ok())
            .unwrap_or(32),
        connections: get("--connections")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
        key: match get("--key").as_deref() {
            Some("rsa2048") => WorkloadKeyType::Rsa2048,
            _ => WorkloadKeyType::EcdsaP256,
        },
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Raw cost of one issuance without any I/O: CSR parse + signature verify + policy, then leaf
/// build + sign. Returns operations per second on one core.
fn raw_crypto(signer: &LocalSigner, id: &SpiffeId, csrs: &[String], seconds: u64) -> (f64, u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let csr = check_csr(&csrs[n as usize % csrs.len()], id).expect("valid csr");
        let req = SignRequest {
            profile: LeafProfile::Workload(id.clone()),
            spki_der: csr.spki_der,
            ttl: Duration::from_secs(3600),
            csr_der: None,
        };
        signer.sign_now(&req).expect("sign");
        n += 1;
    }
    (n as f64 / started.elapsed().as_secs_f64(), n)
}

#[tokio::main]
async fn main() {
    let Some(o) = opts() else { return };
    meshid::app::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = SpiffeId::for_service_account("cluster.local", "bench", "client").expect("id");
    let csrs: Vec<(rcgen::KeyPair, String)> = (0..64)
        .map(|_| generate_csr(&id, o.key).expect("csr"))
        .collect();
    let csr_pems: Vec<String> = csrs.iter().map(|(_, c)| c.clone()).collect();
    let ca_dir = dir.path().join("ca");
    let signer = LocalSigner::load_or_generate(&ca_dir, "cluster.local").expect("signer");

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let raw_seconds = (o.seconds / 2).max(2);
    let (raw_per_core, raw_n) =
        tokio::task::block_in_place(|| raw_crypto(&signer, &id, &csr_pems, raw_seconds));
    let raw_limit = raw_per_core * cores as f64;

    let token = hex::encode(rand::random::<[u8; 16]>());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{token},bench,client\n")).expect("write tokens");
    let args = ServerArgs {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        http_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ca_dir: Some(ca_dir),
        static_tokens: Some(tokens),
        serving_hosts: Some(vec!["localhost".into()]),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = start_server(args.validate().expect("config"), async move {
        let _ = stop_rx.await;
    })
    .await
    .expect("server");
    let endpoint = format!("https://{}", server.grpc_addr);
    let clients: Vec<CaClient> = (0..o.connections)
        .map(|_| {
            CaClient::new(&endpoint, &server.root_pem, Some("localhost"), None).expect("client")
        })
        .collect();
    // Warm up: connections, caches.
    for c in &clients {
        c.create_certificate(&csr_pems[0], &token, Duration::from_secs(3600), None)
            .await
            .expect("warm-up");
    }
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let client = clients[w % clients.len()].clone();
        let csrs = csr_pems.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client
                    .create_certificate(
                        &csrs[i % csrs.len()],
                        &token,
                        Duration::from_secs(3600),
                        None,
                    )
                    .await
                {
                    Ok(chain) if chain.len() >= 2 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.expect("task");
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h2load = run_h2load(&server, &csr_pems[0], &token, &o, dir.path()).await;
    let _ = stop_tx.send(());
    let _ = server.wait().await;
    all.sort();
    let rps = all.len() as f64 / elapsed;
    let key = match o.key {
        WorkloadKeyType::EcdsaP256 => "ECDSA P-256",
        WorkloadKeyType::Rsa2048 => "RSA-2048",
    };
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| CSR key / CA key | {key} / ECDSA P-256 |");
    println!("| cores | {cores} |");
    println!(
        "| raw crypto per core (CSR verify + policy + leaf sign) | {raw_per_core:.0} ops/s ({raw_n} ops, {:.0} µs/op) |",
        1e6 / raw_per_core
    );
    println!("| raw crypto limit (× cores) | {raw_limit:.0} ops/s |");
    println!(
        "| end-to-end over TLS ({} conns, {} in flight, {}s) | {rps:.0} req/s, {} ok, {errors} errors |",
        o.connections,
        o.concurrency,
        o.seconds,
        all.len()
    );
    println!(
        "| latency p50 / p99 | {:.2} ms / {:.2} ms |",
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| end-to-end / raw limit (Rust client) | {:.0}% |",
        100.0 * rps / raw_limit
    );
    match h2load {
        Some((issued, secs)) => {
            let r = issued as f64 / secs;
            println!(
                "| end-to-end over TLS, h2load client ({} conns × 8 streams, {}s) | {r:.0} certificates/s |",
                o.connections, o.seconds
            );
            println!(
                "| end-to-end / raw limit (h2load client) | {:.0}% |",
                100.0 * r / raw_limit
            );
        }
        None => println!("| h2load | not installed (apt-get install nghttp2-client) |"),
    }
}

fn issued_total(addr: std::net::SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| {
            l.strip_prefix("meshid_certificate_requests_total{outcome=\"issued\",reason=\"none\"}")
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Drives the server with h2load (a C HTTP/2 client, far cheaper per request than a Rust gRPC
/// client sharing the same two cores). gRPC errors arrive as HTTP 200, so success is counted
/// from the server's own `issued` counter. Returns (certificates issued, seconds).
async fn run_h2load(
    server: &meshid::app::ServerHandle,
    csr: &str,
    token: &str,
    o: &Opts,
    dir: &std::path::Path,
) -> Option<(u64, f64)> {
    use prost::Message;
    if std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let msg = meshid::proto::IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 3600,
        metadata: None,
    };
    let body = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let data = dir.join("request.bin");
    std::fs::write(&data, framed).expect("write request");
    let http = server.http_addr;
    let before = tokio::task::spawn_blocking(move || issued_total(http))
        .await
        .unwrap_or(0);
    let started = Instant::now();
    let args: Vec<String> = vec![
        "-c".into(),
        o.connections.to_string(),
        "-m".into(),
        "8".into(),
        "-D".into(),
        o.seconds.to_string(),
        "-d".into(),
        data.display().to_string(),
        "-H".into(),
        "content-type: application/grpc".into(),
        "-H".into(),
        "te: trailers".into(),
        "-H".into(),
        format!("authorization: Bearer {token}"),
        format!(
            "https://{}/istio.v1.auth.IstioCertificateService/CreateCertificate",
            server.grpc_addr
        ),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("h2load").args(args).output()
    })
    .await
    .ok()?
    .ok()?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!("h2load failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let after = tokio::task::spawn_blocking(move || issued_total(http))
        .await
        .unwrap_or(0);
    Some((after.saturating_sub(before), secs))
}
