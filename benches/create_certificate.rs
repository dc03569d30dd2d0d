//! CreateCertificate throughput and latency over TLS, beside the raw crypto cost per CSR
//! (CSR verify + leaf sign), measured in the same run so the ratio is meaningful on a noisy,
//! shared machine.
//!
//! Run: `cargo bench --bench create_certificate` (options after `--`: `--seconds N`,
//! `--concurrency N`, `--connections N`, `--streams N` (h2load streams per connection),
//! `--key p256|rsa2048`, `--client rust|h2load|both`, `--pin`).
//!
//! Two setups:
//! - default: the server and the load generators share every core, and the raw limit is the
//!   per-core raw rate × all cores;
//! - `--pin`: the server (this process, one runtime worker) runs on CPU 0 only and h2load on
//!   CPU 1 only, and the raw limit is the per-core raw rate × 1. This is how a CA replica is
//!   loaded in production: its clients are elsewhere.
//!
//! The raw rate is measured in slices between the end-to-end runs (h2load runs in four rounds),
//! and the ratio uses the raw rate over all slices.
//!
//! Beside each slice, `openssl speed -seconds N ecdsap256` runs as a subprocess on the same core
//! (CPU 0, with util-linux `taskset`; the in-process slice is moved to CPU 0 too): one ECDSA
//! P-256 sign plus one verify is the crypto alone of one certificate (verify the CSR, sign the
//! leaf). Both sides are timed in CPU time (openssl's default, user CPU; the in-process loop's
//! `CLOCK_THREAD_CPUTIME_ID`), so neighbours taking the core do not move the ratio. It is
//! reported beside meshid's in-process CPU time per certificate, as a ratio, and as a second,
//! stricter raw limit for the end-to-end rate.
//!
//! The audit log is on, as shipped (JSON, level info, one line per certificate), written to
//! /dev/null through the same writer thread.
//!
//! Authentication uses the static-token authenticator, whose per-request work (SHA-256 of the
//! token + hash-map lookup) is the same as a warm TokenReview cache hit.

#[path = "common/cpu_time.rs"]
mod cpu_time;

use std::time::{Duration, Instant};

use cpu_time::{process_cpu_seconds, thread_cpu_seconds};
use meshid::agent::{CaClient, WorkloadKeyType, generate_csr};
use meshid::app::start_server;
use meshid::config::ServerArgs;
use meshid::identity::{LeafProfile, SpiffeId, check_csr};
use meshid::signer::{LocalSigner, SignRequest};
use meshid::telemetry::LogFormat;

struct Opts {
    seconds: u64,
    concurrency: usize,
    connections: usize,
    /// h2load's concurrent streams per connection (`-m`).
    streams: usize,
    key: WorkloadKeyType,
    /// Which load generators to run: `rust`, `h2load` or `both`.
    client: String,
    /// Server on CPU 0 alone (this process, one runtime worker), h2load on CPU 1.
    pin: bool,
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
        streams: get("--streams").and_then(|v| v.parse().ok()).unwrap_or(8),
        key: match get("--key").as_deref() {
            Some("rsa2048") => WorkloadKeyType::Rsa2048,
            _ => WorkloadKeyType::EcdsaP256,
        },
        client: get("--client").unwrap_or_else(|| "both".into()),
        pin: args.iter().any(|a| a == "--pin"),
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
/// build + sign, on one core for `seconds`. Returns (operations, seconds taken).
fn raw_crypto(
    signer: &LocalSigner,
    id: &SpiffeId,
    csrs: &[String],
    seconds: f64,
) -> (u64, f64, f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let cpu_started = thread_cpu_seconds();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let csr = check_csr(&csrs[n as usize % csrs.len()], id).expect("valid csr");
        let req = SignRequest {
            profile: LeafProfile::Workload(id.clone()),
            spki_der: csr.spki_der,
            ttl: Duration::from_secs(3600),
            max_backdate: meshid::identity::DEFAULT_MAX_BACKDATE,
            csr_der: None,
        };
        signer.sign_now(&req).expect("sign");
        n += 1;
    }
    (
        n,
        started.elapsed().as_secs_f64(),
        thread_cpu_seconds() - cpu_started,
    )
}

/// Raw-crypto slices taken between the end-to-end runs, so that a neighbour's load coming or
/// going during the benchmark moves both sides of the ratio alike.
#[derive(Default)]
struct RawSlices {
    ops: u64,
    seconds: f64,
    cpu_seconds: f64,
    rates: Vec<f64>,
    /// `openssl speed` per slice: µs for one P-256 sign plus one verify.
    openssl_us: Vec<f64>,
}

impl RawSlices {
    fn take(&mut self, signer: &LocalSigner, id: &SpiffeId, csrs: &[String], seconds: f64) {
        let (n, secs, cpu) = tokio::task::block_in_place(|| {
            // Both sides of the crypto ratio on the same core (CPU 0); with `--pin` the whole
            // process is there already.
            let restore = pin_thread("0");
            let r = raw_crypto(signer, id, csrs, seconds);
            if let Some(all) = restore {
                pin_thread(&all);
            }
            r
        });
        self.ops += n;
        self.seconds += secs;
        self.cpu_seconds += cpu;
        self.rates.push(n as f64 / secs);
        let openssl_seconds = (seconds / 2.0).round().max(1.0) as u64;
        if let Some(us) = tokio::task::block_in_place(|| openssl_sign_verify_us(openssl_seconds)) {
            self.openssl_us.push(us);
        }
    }

    /// Median of the `openssl speed` slices, µs per sign + verify.
    fn openssl_median_us(&self) -> Option<f64> {
        let mut v = self.openssl_us.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    fn per_core(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

fn main() {
    let Some(mut o) = opts() else { return };
    let total_cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // The cores the server may use; the raw limit is computed for exactly these.
    let server_cores = if o.pin {
        if total_cores < 2 {
            eprintln!("--pin needs at least 2 cores");
            std::process::exit(2);
        }
        // Only h2load can run off the server's core; the Rust client would share it.
        o.client = "h2load".into();
        pin_self_to_cpu0();
        1
    } else {
        total_cores
    };
    // The audit log as shipped: one JSON line per certificate at the default level, through
    // the same writer thread, into /dev/null rather than a terminal.
    let devnull = std::fs::File::create("/dev/null").expect("/dev/null");
    let _log = meshid::telemetry::init_logging_to(LogFormat::Json, "info", devnull);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_cores)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(o, server_cores));
}

/// Restricts every thread of this process (and the threads it starts later) to CPU 0, with
/// util-linux `taskset`, so the server never runs on the load generator's core.
fn pin_self_to_cpu0() {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("--pin: taskset failed (util-linux)");
        std::process::exit(2);
    }
}

/// Moves the calling thread to `cpus` (a taskset list) and returns the list it had, or `None`
/// when `taskset` is missing or failed.
fn pin_thread(cpus: &str) -> Option<String> {
    let tid = std::fs::read_link("/proc/thread-self").ok()?;
    let tid = tid.file_name()?.to_str()?.to_owned();
    let before = std::process::Command::new("taskset")
        .args(["-c", "-p", &tid])
        .output()
        .ok()?;
    // "pid 123's current affinity list: 0,1"
    let before = String::from_utf8_lossy(&before.stdout)
        .rsplit(": ")
        .next()?
        .trim()
        .to_owned();
    let ok = std::process::Command::new("taskset")
        .args(["-c", "-p", cpus, &tid])
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then_some(before)
}

/// `openssl speed -seconds N ecdsap256` on CPU 0: µs of user CPU time for one ECDSA P-256 sign
/// plus one verify. `None` when openssl is missing or its output is not understood.
fn openssl_sign_verify_us(seconds: u64) -> Option<f64> {
    let args = ["speed", "-seconds", &seconds.to_string(), "ecdsap256"];
    let pinned = std::process::Command::new("taskset")
        .args(["-c", "0", "openssl"])
        .args(args)
        .stderr(std::process::Stdio::null())
        .output();
    let out = match pinned {
        Ok(out) if out.status.success() => out,
        _ => std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?,
    };
    // " 256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0"
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .rev()
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let [verify_per_s, sign_per_s] = nums[..] else {
        return None;
    };
    Some(1e6 / sign_per_s + 1e6 / verify_per_s)
}

async fn bench(o: Opts, cores: usize) {
    meshid::app::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = SpiffeId::for_service_account("cluster.local", "bench", "client").expect("id");
    let csrs: Vec<(rcgen::KeyPair, String)> = (0..64)
        .map(|_| generate_csr(&id, o.key).expect("csr"))
        .collect();
    let csr_pems: Vec<String> = csrs.iter().map(|(_, c)| c.clone()).collect();
    let ca_dir = dir.path().join("ca");
    let signer = LocalSigner::load_or_generate(&ca_dir, "cluster.local").expect("signer");

    let raw_slice = (o.seconds as f64 / 8.0).max(1.0);
    let mut raw = RawSlices::default();
    raw.take(&signer, &id, &csr_pems, raw_slice);

    let token = hex::encode(rand::random::<[u8; 16]>());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{token},bench,client\n")).expect("write tokens");
    let args = ServerArgs {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        http_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ca_dir: Some(ca_dir),
        static_tokens: Some(tokens),
        serving_hosts: Some(vec!["localhost".into()]),
        // One identity asks for thousands of certificates a second: measure issuance, not the
        // per-identity rate limit (which would refuse all but 20 plus one per 10s).
        issuance_burst: Some(0),
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
    let rust = if o.client == "h2load" {
        None
    } else {
        let r = run_rust_client(&clients, &csr_pems, &token, &o).await;
        raw.take(&signer, &id, &csr_pems, raw_slice);
        Some(r)
    };
    // h2load runs in four rounds, each followed by a raw slice.
    // (certificates, seconds, this process's CPU seconds: the server's, h2load is another process)
    let mut h2load: Option<(u64, f64, f64)> = None;
    if o.client != "rust" {
        let round_seconds = (o.seconds / 4).max(2);
        for _ in 0..4 {
            let cpu_started = process_cpu_seconds();
            let Some((n, secs)) =
                run_h2load(&server, &csr_pems[0], &token, &o, round_seconds, dir.path()).await
            else {
                h2load = None;
                break;
            };
            let acc = h2load.get_or_insert((0, 0.0, 0.0));
            acc.0 += n;
            acc.1 += secs;
            acc.2 += process_cpu_seconds() - cpu_started;
            raw.take(&signer, &id, &csr_pems, raw_slice);
        }
    }
    let _ = stop_tx.send(());
    let _ = server.wait().await;
    let raw_per_core = raw.per_core();
    let raw_n = raw.ops;
    let (raw_min, raw_max) = raw
        .rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let raw_limit = raw_per_core * cores as f64;
    let key = match o.key {
        WorkloadKeyType::EcdsaP256 => "ECDSA P-256",
        WorkloadKeyType::Rsa2048 => "RSA-2048",
    };
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| CSR key / CA key | {key} / ECDSA P-256 |");
    if o.pin {
        println!("| cores | server: CPU 0 only (1 runtime worker); h2load: CPU 1 |");
    } else {
        println!("| cores | {cores}, shared by the server and the load generator |");
    }
    println!(
        "| raw crypto per core (CSR verify + policy + leaf sign) | {raw_per_core:.0} ops/s ({raw_n} ops, {:.0} µs/op; slices {raw_min:.0}–{raw_max:.0}) |",
        1e6 / raw_per_core
    );
    println!("| raw crypto limit (× cores) | {raw_limit:.0} ops/s |");
    let openssl = raw.openssl_median_us();
    match openssl {
        Some(us) => {
            let mut v = raw.openssl_us.clone();
            v.sort_by(f64::total_cmp);
            println!(
                "| openssl speed ecdsap256, sign + verify, same core | {us:.1} µs (median of {} slices, {:.1}–{:.1}) |",
                v.len(),
                v[0],
                v[v.len() - 1]
            );
            let meshid_cpu_us = 1e6 * raw.cpu_seconds / raw.ops as f64;
            println!(
                "| crypto alone / meshid in-process per certificate, CPU time | {:.0}% ({us:.1} µs / {meshid_cpu_us:.1} µs) |",
                100.0 * us / meshid_cpu_us,
            );
        }
        None => println!("| openssl speed | not installed or not understood |"),
    }
    // The stricter limit: the raw limit scaled by crypto alone / meshid's loop (CPU time), so it
    // shares the wall-clock basis of the end-to-end rate on this loaded machine.
    let openssl_limit = openssl.map(|us| raw_limit * (1e6 * raw.cpu_seconds / raw.ops as f64) / us);
    if let Some(mut r) = rust {
        r.latencies.sort();
        let rps = r.latencies.len() as f64 / r.elapsed;
        println!(
            "| end-to-end over TLS ({} conns, {} in flight, {}s) | {rps:.0} req/s, {} ok, {} errors |",
            o.connections,
            o.concurrency,
            o.seconds,
            r.latencies.len(),
            r.errors
        );
        println!(
            "| latency p50 / p99 | {:.2} ms / {:.2} ms |",
            percentile(&r.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&r.latencies, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "| end-to-end / raw limit (Rust client) | {:.0}% |",
            100.0 * rps / raw_limit
        );
        if let Some(limit) = openssl_limit {
            println!(
                "| end-to-end / openssl crypto limit (Rust client) | {:.0}% |",
                100.0 * rps / limit
            );
        }
    }
    match h2load {
        Some((issued, secs, cpu)) => {
            let r = issued as f64 / secs;
            println!(
                "| end-to-end over TLS, h2load client ({} conns × {} streams, 4 rounds, {secs:.0}s) | {r:.0} certificates/s |",
                o.connections, o.streams
            );
            println!(
                "| end-to-end / raw limit (h2load client) | {:.0}% |",
                100.0 * r / raw_limit
            );
            if let Some(limit) = openssl_limit {
                println!(
                    "| end-to-end / openssl crypto limit (h2load client) | {:.0}% |",
                    100.0 * r / limit
                );
            }
            // The same ratio in CPU time, which a neighbour taking the core does not move: the
            // in-process loop's CPU per certificate over the server's CPU per certificate end
            // to end (every thread of this process while h2load ran).
            let loop_us = 1e6 * raw.cpu_seconds / raw.ops as f64;
            let server_us = 1e6 * cpu / issued as f64;
            println!(
                "| in-process loop / server CPU per certificate, end to end (h2load client) | {:.1}% ({loop_us:.1} µs / {server_us:.1} µs) |",
                100.0 * loop_us / server_us
            );
        }
        None if o.client == "rust" => {}
        None => println!("| h2load | not installed or failed (apt-get install nghttp2-client) |"),
    }
}

/// What the Rust gRPC client measured.
struct RustRun {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: f64,
}

/// Drives the server with `o.concurrency` tasks over the given connections for `o.seconds`.
async fn run_rust_client(
    clients: &[CaClient],
    csr_pems: &[String],
    token: &str,
    o: &Opts,
) -> RustRun {
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let client = clients[w % clients.len()].clone();
        let csrs = csr_pems.to_vec();
        let token = token.to_owned();
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
    RustRun {
        latencies: all,
        errors,
        elapsed: started.elapsed().as_secs_f64(),
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
    seconds: u64,
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
        o.streams.to_string(),
        "-D".into(),
        seconds.to_string(),
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
    let pin = o.pin;
    let out = tokio::task::spawn_blocking(move || {
        if pin {
            std::process::Command::new("taskset")
                .args(["-c", "1", "h2load"])
                .args(args)
                .output()
        } else {
            std::process::Command::new("h2load").args(args).output()
        }
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
