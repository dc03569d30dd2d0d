//! How much load meshid's authentication puts on the apiserver, against the kube-apiserver
//! harness: a real server on 127.0.0.1 reviewing real service-account tokens, with a TCP proxy
//! in front of the apiserver that counts meshid's connections.
//!
//! 1. Junk-token flood: requests whose tokens cannot be valid (random text, JWT-shaped junk,
//!    `alg: none`, expired, another audience). Reports TokenReviews per junk request.
//! 2. Bursts: `--burst N` concurrent requests carrying one new token, `--rounds R` times.
//!    Reports TokenReviews per burst and the most apiserver connections open at once.
//! 3. Cold path: `--cold N` requests at once, each with its own new token. Reports TokenReviews
//!    and the most apiserver connections open at once, against `--apiserver-concurrency`.
//!
//! TokenReviews are counted with meshid's own `meshid_tokenreviews_total`.
//!
//! Run: `eval "$(tests/kube-harness/run.sh up)"; cargo bench --bench auth_path` (options after
//! `--`: `--junk N`, `--burst N`, `--rounds R`, `--cold N`). Prints "skipped" without the harness.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::kube::{Harness, TokenOptions, unix_now};
use common::meshid::{http_get, metric_value, openssl_csr, openssl_key, write_token_kubeconfig};
use common::proxy::TcpProxy;
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

struct Opts {
    junk: usize,
    burst: usize,
    rounds: usize,
    cold: usize,
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
        cold: get("--cold").unwrap_or(200),
    })
}

struct Bench {
    h: Harness,
    ns: String,
    proxy: TcpProxy,
    server: ServerHandle,
    channels: Vec<Channel>,
    csr: String,
    _dir: tempfile::TempDir,
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

    /// Sends one request per token, all at once, over the channels; returns (ok, failed).
    async fn fire(&self, tokens: &[String]) -> (usize, usize) {
        let calls = tokens.iter().enumerate().map(|(i, t)| {
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: self.csr.clone(),
                validity_duration: 3600,
                metadata: None,
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            let mut client =
                IstioCertificateServiceClient::new(self.channels[i % self.channels.len()].clone());
            async move { client.create_certificate(req).await.is_ok() }
        });
        let results = futures::future::join_all(calls).await;
        let ok = results.iter().filter(|r| **r).count();
        (ok, results.len() - ok)
    }
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
        kubeconfig: Some(kubeconfig),
        root_configmap: Some(false),
        serving_hosts: Some(vec!["localhost".into()]),
        ..Default::default()
    };
    let server = start_server(args.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let mut channels = Vec::new();
    for _ in 0..8 {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&server.root_pem))
            .domain_name("localhost");
        channels.push(
            Endpoint::from_shared(format!("https://{}", server.grpc_addr))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
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
        _dir: dir,
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

    // 1. Junk flood.
    let good = b.token().await;
    let other_audience =
        b.h.request_token(&b.ns, "web", &TokenOptions::default())
            .await
            .unwrap();
    let junk = junk_tokens(&b, &good, &other_audience, opts.junk);
    let before = b.tokenreviews().await;
    let started = Instant::now();
    let mut refused = 0;
    for chunk in junk.chunks(500) {
        refused += b.fire(chunk).await.1;
    }
    let elapsed = started.elapsed();
    let reviews = b.tokenreviews().await - before;
    println!(
        "junk flood: {} requests, {refused} refused in {elapsed:.2?} ({:.0}/s); \
         TokenReviews {reviews} ({:.4} per junk request); apiserver connections so far {}",
        junk.len(),
        junk.len() as f64 / elapsed.as_secs_f64(),
        reviews as f64 / junk.len() as f64,
        b.proxy.accepted(),
    );

    // 2. Bursts of one new token.
    for round in 1..=opts.rounds {
        let token = b.token().await;
        let tokens = vec![token; opts.burst];
        let before = b.tokenreviews().await;
        let started = Instant::now();
        let (ok, failed) = b.fire(&tokens).await;
        println!(
            "burst {round}: {} concurrent requests with one new token: {ok} ok, {failed} failed \
             in {:.2?}; TokenReviews {}; peak apiserver connections so far {}",
            opts.burst,
            started.elapsed(),
            b.tokenreviews().await - before,
            b.proxy.peak_open(),
        );
    }

    // 3. Cold path: every request a new token, all at once.
    let mut tokens = Vec::with_capacity(opts.cold);
    for _ in 0..opts.cold {
        tokens.push(b.token().await);
    }
    let before = b.tokenreviews().await;
    let started = Instant::now();
    let (ok, failed) = b.fire(&tokens).await;
    let elapsed = started.elapsed();
    println!(
        "cold: {} concurrent requests, each a new token: {ok} ok, {failed} failed in {elapsed:.2?} \
         ({:.0} certificates/s); TokenReviews {}; peak apiserver connections {} \
         (--apiserver-concurrency default 16)",
        opts.cold,
        ok as f64 / elapsed.as_secs_f64(),
        b.tokenreviews().await - before,
        b.proxy.peak_open(),
    );
}
