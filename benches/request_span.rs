//! What the per-request tracing span costs (issue 13), measured in CPU time with the logging
//! meshid ships: `--log-format json` at level `info`, lines going to the writer threads (here
//! into `io::sink`).
//!
//! One "request" is a future awaiting `--awaits` times (a request to CreateCertificate is polled
//! several times: TokenReview cache, limiter, signer), in five forms, interleaved in rounds so
//! that a neighbour's load moves them alike:
//!
//! - bare: the future alone;
//! - span: the same inside `create_certificate`'s span as `CaService` makes it (`request_id`,
//!   `peer`; entered and exited on every poll by `Instrument`);
//! - span + child: one await inside an `impersonation` span naming the caller and the target,
//!   as `CaService` wraps the node authorizer for ztunnel's requests;
//! - span + recorded caller: `caller` recorded on the request span after the first await (the
//!   design measured and not taken: the JSON format re-reads the span's fields to add one);
//! - audit: the bare future followed by an audit line of the shipped shape, for scale (the audit
//!   line was measured at 1-4 points of the end-to-end ratio, docs/BENCHMARKS.md).
//!
//! It prints each cost in ns per request and as a share of `--server-us`, the server's CPU time
//! per certificate end to end that `create_certificate` prints ("in-process loop / server CPU
//! per certificate").
//!
//! Run: `cargo bench --bench request_span -- --server-us 180`.

#[path = "common/cpu_time.rs"]
mod cpu_time;

use std::net::SocketAddr;
use std::time::Duration;

use cpu_time::thread_cpu_seconds;
use meshid::telemetry::{LogFormat, init_logging_to};
use tracing::Instrument as _;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
        .unwrap_or(default)
}

/// The request's own work: `awaits` trips through the scheduler.
async fn work(awaits: u32) {
    for _ in 0..awaits {
        tokio::task::yield_now().await;
    }
}

/// The request inside its span; with `caller`, one await is made inside a child span naming
/// the caller (as an impersonation request's authorization is), or inside the request span
/// with `caller` recorded on it (the design measured and not taken).
async fn spanned(id: u64, peer: SocketAddr, awaits: u32, caller: Caller) {
    const CALLER: &str = "spiffe://cluster.local/ns/default/sa/bench";
    let span = match caller {
        Caller::Recorded => tracing::info_span!(
            "create_certificate",
            request_id = id,
            peer = %peer,
            caller = tracing::field::Empty
        ),
        _ => tracing::info_span!("create_certificate", request_id = id, peer = %peer),
    };
    async move {
        match caller {
            Caller::None => work(awaits).await,
            Caller::ChildSpan => {
                let child = tracing::info_span!(
                    "impersonation",
                    caller = CALLER,
                    target = "spiffe://cluster.local/ns/default/sa/workload"
                );
                tokio::task::yield_now().instrument(child).await;
                work(awaits.saturating_sub(1)).await;
            }
            Caller::Recorded => {
                tokio::task::yield_now().await;
                tracing::Span::current().record("caller", CALLER);
                work(awaits.saturating_sub(1)).await;
            }
        }
    }
    .instrument(span)
    .await
}

#[derive(Clone, Copy)]
enum Caller {
    None,
    ChildSpan,
    Recorded,
}

async fn audited(id: u64, peer: SocketAddr, awaits: u32) {
    work(awaits).await;
    tracing::info!(
        target: "meshid::audit",
        identity = "spiffe://cluster.local/ns/default/sa/bench",
        serial = "5f1c0d2e9a4b7c3d8e6f0a1b2c3d4e5f",
        not_after = "2026-12-03 04:00:00.0 +00:00:00",
        ttl_requested_s = 86400i64,
        ttl_granted_s = 86400u64,
        ttl = "as_requested",
        signer = "local",
        caller = "spiffe://cluster.local/ns/default/sa/bench",
        cluster = "Kubernetes",
        peer = %peer,
        request_id = id,
        latency_us = 180u64,
        "certificate issued"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test` builds benches too; only `cargo bench` runs them
    }
    let requests: u64 = arg(&args, "--requests", 100_000);
    let rounds: u32 = arg(&args, "--rounds", 5);
    let awaits: u32 = arg(&args, "--awaits", 4);
    let server_us: f64 = arg(&args, "--server-us", 180.0);
    let _guard = init_logging_to(LogFormat::Json, "info", std::io::sink());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let peer: SocketAddr = "127.0.0.1:45678".parse().expect("address");
    // CPU seconds per form: bare, span, span + child span, span + recorded caller, audit.
    let mut cpu = [0.0f64; 5];
    let mut id = 0u64;
    for _ in 0..rounds {
        for (form, total) in cpu.iter_mut().enumerate() {
            let started = thread_cpu_seconds();
            rt.block_on(async {
                for _ in 0..requests {
                    id += 1;
                    match form {
                        0 => work(awaits).await,
                        1 => spanned(id, peer, awaits, Caller::None).await,
                        2 => spanned(id, peer, awaits, Caller::ChildSpan).await,
                        3 => spanned(id, peer, awaits, Caller::Recorded).await,
                        _ => audited(id, peer, awaits).await,
                    }
                }
            });
            *total += thread_cpu_seconds() - started;
        }
        // Let the writer threads drain the audit lines outside the timed part.
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = (requests * rounds as u64) as f64;
    let ns = |i: usize| 1e9 * cpu[i] / n;
    let span_ns = ns(1) - ns(0);
    let child_ns = ns(2) - ns(0);
    let recorded_ns = ns(3) - ns(0);
    let audit_ns = ns(4) - ns(0);
    println!(
        "| measurement ({rounds} rounds × {requests} requests, {awaits} awaits each) | CPU time per request |"
    );
    println!("|---|---|");
    println!("| bare future | {:.0} ns |", ns(0));
    let share = |ns: f64| ns / (10.0 * server_us);
    println!(
        "| request span, every request (create, enter/exit per poll, close) | {span_ns:.0} ns = {:.2}% of {server_us:.0} µs server CPU per certificate |",
        share(span_ns)
    );
    println!(
        "| request span + impersonation span naming the caller (ztunnel's requests) | {child_ns:.0} ns = {:.2}% |",
        share(child_ns)
    );
    println!(
        "| request span with `caller` recorded on it instead (not shipped) | {recorded_ns:.0} ns = {:.2}% |",
        share(recorded_ns)
    );
    println!(
        "| audit line, for scale (format on this thread; writing is the writer thread's) | {audit_ns:.0} ns = {:.2}% of {server_us:.0} µs |",
        audit_ns / (10.0 * server_us)
    );
}
