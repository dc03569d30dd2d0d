//! How much load meshid's authentication puts on the apiserver, against the kube-apiserver
//! harness: a real server on 127.0.0.1 reviewing real service-account tokens, with a TCP proxy
//! in front of the apiserver that counts meshid's connections.
//!
//! 1. Junk-token flood: requests whose tokens cannot be valid (random text, JWT-shaped junk,
//!    `alg: none`, expired, another audience). Reports TokenReviews per junk request.
//! 2. Bursts: `--burst N` concurrent requests carrying one new token, `--rounds R` times.
//!    Reports TokenReviews per burst and the most apiserver connections open at once.
//!    After each burst (connections closed, 1 s later) it prints the bytes this process holds
//!    allocated (a counting global allocator) beside its RSS, and at the end RSS again after
//!    glibc's `malloc_trim(0)`: a leak grows the live bytes, allocator retention only the RSS.
//! 3. Cold path: `--cold N` requests at once, each with its own new token, `--ratio-rounds R`
//!    times. Reports TokenReviews, the most apiserver connections open at once, against
//!    `--apiserver-concurrency` (16), and certificates/s against the apiserver's own TokenReview
//!    rate measured directly in the same round: N reviews of N other new tokens by a kube client
//!    with meshid's credentials, 16 at a time (meshid's bound).
//! 4. Soak (`--soak SECONDS`, off by default): the `meshid` binary as a child process, 16
//!    clients each looping TokenRequest (a new, valid token) + CreateCertificate with it; the
//!    child's RSS, the requests and the TokenReviews every 10 s.
//!
//! TokenReviews are counted with meshid's own `meshid_tokenreviews_total`.
//!
//! Run: `eval "$(tests/kube-harness/run.sh up)"; cargo bench --bench auth_path` (options after
//! `--`: `--junk N`, `--burst N`, `--rounds R`, `--cold N`, `--ratio-rounds R`, `--soak S`,
//! `--only junk,burst,cold,soak`). Prints "skipped" without the harness.

#[path = "common/child.rs"]
mod child;
#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use child::{ChildServer, rss_mib};
use common::kube::{Harness, TokenOptions, unix_now};
use common::meshid::{http_get, metric_value, openssl_csr, openssl_key, write_token_kubeconfig};
use common::proxy::TcpProxy;
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The system allocator, counting the bytes currently allocated through it (Rust code only;
/// aws-lc's own `malloc` calls are not seen).
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

unsafe extern "C" {
    /// glibc: returns free memory at the top of the heap and in every arena to the kernel.
    fn malloc_trim(pad: usize) -> i32;
}

fn live_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

struct Opts {
    junk: usize,
    burst: usize,
    rounds: usize,
    cold: usize,
    ratio_rounds: usize,
    soak: u64,
    only: Option<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|s| s == section))
    }
}

fn opts() -> Option<Opts> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("auth_path bench: skipped (run with `cargo bench`)");
        return None;
    }
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    Some(Opts {
        junk: get("--junk").unwrap_or(10_000),
        burst: get("--burst").unwrap_or(1000),
        rounds: get("--rounds").unwrap_or(5),
        cold: get("--cold").unwrap_or(400),
        ratio_rounds: get("--ratio-rounds").unwrap_or(3),
        soak: get("--soak").unwrap_or(0) as u64,
        only: args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .cloned(),
    })
}

struct Bench {
    h: Harness,
    ns: String,
    proxy: TcpProxy,
    server: ServerHandle,
    channels: Vec<Channel>,
    csr: String,
    /// meshid's own service-account token (what it reviews tokens with).
    server_token: String,
    kubeconfig: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Bench {
    async fn tokenreviews(&self) -> u64 {
        let addr = self.server.http_addr;
        let m = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
            .await
            .unwrap();
        ["authenticated", "unauthenticated", "error"]
            .iter()
            .map(|r| metric_value(&m, &format!("meshid_tokenreviews_total{{result=\"{r}\"}}")))
            .sum()
    }

    async fn token(&self) -> String {
        self.h
            .request_token(&self.ns, "web", &TokenOptions::for_audiences(["istio-ca"]))
            .await
            .unwrap()
    }

    /// `n` new tokens, 8 TokenRequests at a time.
    async fn tokens(&self, n: usize) -> Vec<String> {
        futures::stream::iter(0..n)
            .map(|_| self.token())
            .buffer_unordered(8)
            .collect()
            .await
    }

    /// A one-hour CreateCertificate for the bench CSR, carrying `token`.
    fn request(&self, token: &str) -> tonic::Request<IstioCertificateRequest> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: self.csr.clone(),
            validity_duration: 3600,
            metadata: None,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }

    /// Sends one request per token, all at once, over the channels; returns (ok, failed).
    async fn fire(&self, tokens: &[String]) -> (usize, usize) {
        let calls = tokens.iter().enumerate().map(|(i, t)| {
            let req = self.request(t);
            let mut client =
                IstioCertificateServiceClient::new(self.channels[i % self.channels.len()].clone());
            async move { client.create_certificate(req).await.is_ok() }
        });
        let results = futures::future::join_all(calls).await;
        let ok = results.iter().filter(|r| **r).count();
        (ok, results.len() - ok)
    }
}

async fn channels_to(addr: SocketAddr, root_pem: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name("localhost");
        channels.push(
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    channels
}

async fn setup(h: Harness) -> Bench {
    let ns = h.create_namespace("bench").await.unwrap();
    h.create_service_account(&ns, "meshid").await.unwrap();
    h.create_service_account(&ns, "web").await.unwrap();
    h.grant_token_review(&ns, "meshid").await.unwrap();
    let url = &h.config().cluster_url;
    let upstream = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap())
        .parse()
        .unwrap();
    let proxy = TcpProxy::start(upstream).await;
    let server_token = h
        .request_token(&ns, "meshid", &TokenOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    write_token_kubeconfig(&h, &server_token, Some(&proxy.url()), &kubeconfig);
    let args = ServerArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ca_dir: Some(dir.path().join("ca")),
        kubeconfig: Some(kubeconfig.clone()),
        root_configmap: Some(false),
        serving_hosts: Some(vec!["localhost".into()]),
        // One identity asks for thousands of certificates: measure authentication, not the
        // per-identity issuance limit.
        issuance_burst: Some(0),
        ..Default::default()
    };
    let server = start_server(args.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let channels = channels_to(server.grpc_addr, &server.root_pem, 8).await;
    let key = openssl_key(dir.path(), "k", "ec");
    let csr = openssl_csr(
        &key,
        "/",
        &[&format!(
            "subjectAltName=URI:spiffe://cluster.local/ns/{ns}/sa/web"
        )],
    );
    Bench {
        h,
        ns,
        proxy,
        server,
        channels,
        csr,
        server_token,
        kubeconfig,
        dir,
    }
}

/// `n` tokens that cannot be valid, in several shapes.
fn junk_tokens(b: &Bench, good: &str, other_audience: &str, n: usize) -> Vec<String> {
    let (_, rest) = good.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
    let expired =
        b.h.resign_token(good, |c| {
            c.insert("exp".into(), (unix_now() - 3600).into());
        })
        .unwrap();
    (0..n)
        .map(|i| {
            let r: u64 = rand::random();
            match i % 5 {
                0 => format!("{r:x}{i}"),
                1 => format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(r.to_be_bytes()), i, r),
                2 => format!("{none}.{payload}.{r:x}"),
                3 => format!("{expired}{r:x}"),
                _ => format!("{other_audience}{r:x}"),
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(opts) = opts() else { return };
    let Some(h) = Harness::from_env().await else {
        println!("auth_path bench: skipped (no harness)");
        return;
    };
    let b = setup(h).await;
    if opts.runs("junk") {
        junk_flood(&b, &opts).await;
    }
    if opts.runs("burst") {
        bursts(&b, &opts).await;
    }
    if opts.runs("cold") {
        for round in 1..=opts.ratio_rounds {
            cold_ratio(&b, &opts, round).await;
        }
    }
    if opts.soak > 0 && opts.runs("soak") {
        soak(&b, opts.soak).await;
    }
}

async fn junk_flood(b: &Bench, opts: &Opts) {
    let good = b.token().await;
    let other_audience =
        b.h.request_token(&b.ns, "web", &TokenOptions::default())
            .await
            .unwrap();
    let junk = junk_tokens(b, &good, &other_audience, opts.junk);
    let before = b.tokenreviews().await;
    let connections = b.proxy.accepted();
    let started = Instant::now();
    let mut refused = 0;
    for chunk in junk.chunks(500) {
        refused += b.fire(chunk).await.1;
    }
    let elapsed = started.elapsed();
    let reviews = b.tokenreviews().await - before;
    println!(
        "junk flood: {} requests, {refused} refused in {elapsed:.2?} ({:.0}/s); \
         TokenReviews {reviews} ({:.4} per junk request); apiserver connections opened {}",
        junk.len(),
        junk.len() as f64 / elapsed.as_secs_f64(),
        reviews as f64 / junk.len() as f64,
        b.proxy.accepted() - connections,
    );
}

async fn bursts(b: &Bench, opts: &Opts) {
    let me = std::process::id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "before the bursts: live heap {:.1} MiB, RSS {:.1} MiB",
        live_mib(),
        rss_mib(me)
    );
    for round in 1..=opts.rounds {
        let token = b.token().await;
        let tokens = vec![token; opts.burst];
        let before = b.tokenreviews().await;
        let started = Instant::now();
        let (ok, failed) = b.fire(&tokens).await;
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "burst {round}: {} concurrent requests with one new token: {ok} ok, {failed} failed \
             in {elapsed:.2?}; TokenReviews {}; peak apiserver connections so far {}; \
             then live heap {:.1} MiB, RSS {:.1} MiB",
            opts.burst,
            b.tokenreviews().await - before,
            b.proxy.peak_open(),
            live_mib(),
            rss_mib(me),
        );
    }
    // SAFETY: glibc's malloc_trim takes no pointers and may be called at any time.
    let trimmed = unsafe { malloc_trim(0) };
    println!(
        "after the bursts and malloc_trim(0) (returned {trimmed}): live heap {:.1} MiB, RSS {:.1} MiB",
        live_mib(),
        rss_mib(me)
    );
}

/// One round of the cold-path ratio: the apiserver's own TokenReview rate, then meshid's
/// certificates/s, each on `opts.cold` new tokens.
async fn cold_ratio(b: &Bench, opts: &Opts, round: usize) {
    let direct_tokens = b.tokens(opts.cold).await;
    let client = b.h.client_for_token(&b.server_token);
    let started = Instant::now();
    let authenticated = futures::stream::iter(direct_tokens.iter())
        .map(|t| {
            let client = client.clone();
            async move {
                common::kube::review_token(&client, t, &["istio-ca"])
                    .await
                    .is_ok_and(|s| s.authenticated == Some(true))
            }
        })
        .buffer_unordered(16)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let direct_elapsed = started.elapsed();
    let direct_rate = authenticated as f64 / direct_elapsed.as_secs_f64();

    let tokens = b.tokens(opts.cold).await;
    let before = b.tokenreviews().await;
    let started = Instant::now();
    let (ok, failed) = b.fire(&tokens).await;
    let elapsed = started.elapsed();
    let rate = ok as f64 / elapsed.as_secs_f64();
    println!(
        "cold {round}: apiserver alone {authenticated}/{} TokenReviews in {direct_elapsed:.2?} \
         ({direct_rate:.0}/s, 16 at a time); meshid {} concurrent requests, each a new token: \
         {ok} ok, {failed} failed in {elapsed:.2?} ({rate:.0} certificates/s); \
         ratio {:.0}%; TokenReviews {}; peak apiserver connections {} \
         (--apiserver-concurrency default 16)",
        direct_tokens.len(),
        opts.cold,
        100.0 * rate / direct_rate,
        b.tokenreviews().await - before,
        b.proxy.peak_open(),
    );
}

/// The `meshid` binary reviewing tokens on the harness (through the counting proxy).
fn start_child(b: &Bench) -> ChildServer {
    let kubeconfig = b.kubeconfig.to_str().expect("a UTF-8 temporary path");
    ChildServer::start(
        &b.dir.path().join("child-ca"),
        [
            "--kubeconfig",
            kubeconfig,
            "--root-configmap",
            "false",
            "--serving-hosts",
            "localhost",
            "--issuance-burst",
            "0",
        ],
    )
}

/// `seconds` of cold requests against the `meshid` binary, sampling its RSS every 10 s.
async fn soak(b: &Bench, seconds: u64) {
    let server = tokio::task::block_in_place(|| start_child(b));
    let pid = server.child.id();
    let channels = channels_to(server.grpc, &server.root_pem, 8).await;
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let reviews = || {
        let http = server.http;
        async move {
            let m = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
                .await
                .unwrap();
            metric_value(&m, "meshid_tokenreviews_total{result=\"authenticated\"}")
        }
    };
    println!(
        "soak: meshid pid {pid}, MALLOC_ARENA_MAX={}, RSS at start {:.1} MiB",
        std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "(glibc default)".into()),
        rss_mib(pid)
    );
    let workers = (0..16).map(|w| {
        let channel = channels[w % channels.len()].clone();
        let (ok, failed) = (&ok, &failed);
        async move {
            while Instant::now() < deadline {
                let Ok(token) =
                    b.h.request_token(&b.ns, "web", &TokenOptions::for_audiences(["istio-ca"]))
                        .await
                else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let req = b.request(&token);
                let mut client = IstioCertificateServiceClient::new(channel.clone());
                let counter = if client.create_certificate(req).await.is_ok() {
                    ok
                } else {
                    failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let sampler = async {
        let started = Instant::now();
        let mut last = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let n = ok.load(Ordering::Relaxed);
            println!(
                "soak t={:>4.0}s: RSS {:.1} MiB; {n} certificates ({:.0}/s in the last 10 s), \
                 {} failed; TokenReviews {}",
                started.elapsed().as_secs_f64(),
                rss_mib(pid),
                (n - last) as f64 / 10.0,
                failed.load(Ordering::Relaxed),
                reviews().await,
            );
            last = n;
        }
    };
    futures::future::join(futures::future::join_all(workers), sampler).await;
    drop(channels);
    tokio::time::sleep(Duration::from_secs(15)).await;
    println!(
        "soak end: {} certificates, {} failed; RSS 15 s after the clients closed {:.1} MiB",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        rss_mib(pid)
    );
}
