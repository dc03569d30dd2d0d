//! AWS Private CA calls per 1,000 workload rotations, in direct and intermediate mode, counted
//! through the `PcaApi` trait around the real SDK client talking to moto on 127.0.0.1; then a
//! pod storm (many rotations at once) against a low client-side rate limit, to show it turns
//! into latency, not errors.
//!
//! Run: `cargo bench --bench pca_calls` (options after `--`: `--rotations N`, `--storm N`,
//! `--storm-tps N`). Needs `pip install 'moto[server]'`; prints "skipped" without it.
//! moto answers instantly and never throttles, so the latencies are meshid's + moto's, not
//! AWS's; the call counts are what PCA would see.

#[path = "../tests/common/moto.rs"]
mod moto;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use meshid::agent::{WorkloadKeyType, generate_csr};
use meshid::identity::{LeafProfile, SpiffeId, check_csr};
use meshid::signer::aws_pca::api::{
    Api, ApiError, CaDescription, CertificateAndChain, IssueRequest,
};
use meshid::signer::aws_pca::{AwsPcaOptions, PcaApi, PcaMetrics, PcaMode, SdkPcaClient, start};
use meshid::signer::{SignRequest, Signer};

const MAX_LEAF: Duration = Duration::from_secs(48 * 3600);
const INTERMEDIATE_TTL: Duration = Duration::from_secs(6 * 24 * 3600);

struct Opts {
    rotations: usize,
    storm: usize,
    storm_tps: u32,
}

fn opts() -> Option<Opts> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("pca_calls bench: skipped (run with `cargo bench`)");
        return None;
    }
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    Some(Opts {
        rotations: get("--rotations").unwrap_or(1000),
        storm: get("--storm").unwrap_or(200),
        storm_tps: get("--storm-tps").map(|v| v as u32).unwrap_or(20),
    })
}

/// Counts every call by API before passing it on.
struct Counting {
    inner: SdkPcaClient,
    counts: [AtomicU64; 4],
    times: std::sync::Mutex<Vec<Instant>>,
}

impl Counting {
    fn new(inner: SdkPcaClient) -> Self {
        Self {
            inner,
            counts: Default::default(),
            times: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn bump(&self, api: Api) {
        let i = match api {
            Api::Describe => 0,
            Api::GetCaCertificate => 1,
            Api::Issue => 2,
            Api::Get => 3,
        };
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut t) = self.times.lock() {
            t.push(Instant::now());
        }
    }

    /// The most calls sent within any one-second window since `since`.
    fn busiest_second(&self, since: Instant) -> usize {
        let mut times: Vec<Instant> = self
            .times
            .lock()
            .map(|t| t.iter().copied().filter(|t| *t >= since).collect())
            .unwrap_or_default();
        times.sort();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    fn snapshot(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

impl PcaApi for Counting {
    fn describe_certificate_authority<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CaDescription, ApiError>> {
        self.bump(Api::Describe);
        self.inner.describe_certificate_authority(ca_arn)
    }

    fn get_certificate_authority_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        self.bump(Api::GetCaCertificate);
        self.inner.get_certificate_authority_certificate(ca_arn)
    }

    fn issue_certificate<'a>(
        &'a self,
        req: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        self.bump(Api::Issue);
        self.inner.issue_certificate(req)
    }

    fn get_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
        certificate_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        self.bump(Api::Get);
        self.inner.get_certificate(ca_arn, certificate_arn)
    }
}

fn identity(n: usize) -> SpiffeId {
    SpiffeId::for_service_account("cluster.local", "bench", &format!("sa-{}", n % 50))
        .expect("identity")
}

/// A request as the CA service builds it from an agent's CSR.
fn rotation_request(n: usize) -> SignRequest {
    let id = identity(n);
    let (_key, pem) = generate_csr(&id, WorkloadKeyType::EcdsaP256).expect("csr");
    let csr = check_csr(&pem, &id).expect("policy");
    SignRequest {
        profile: LeafProfile::Workload(id),
        spki_der: csr.spki_der,
        ttl: Duration::from_secs(12 * 3600),
        max_backdate: meshid::identity::DEFAULT_MAX_BACKDATE,
        csr_der: Some(csr.csr_der),
    }
}

struct Run {
    startup: [u64; 4],
    rotations: [u64; 4],
    issued: u64,
    elapsed: Duration,
    errors: usize,
}

async fn signer_for(
    moto: &moto::Moto,
    mode: PcaMode,
    tps: u32,
) -> (Arc<dyn Signer>, Arc<Counting>, PcaMetrics) {
    let arn = moto.create_active_ca().await;
    let api = Arc::new(Counting::new(
        SdkPcaClient::new(moto::REGION, Some(&moto.endpoint)).await,
    ));
    let opts = AwsPcaOptions {
        ca_arn: arn,
        region: moto::REGION.into(),
        endpoint: Some(moto.endpoint.clone()),
        mode,
        requests_per_second: tps,
        max_pending: 10_000,
        intermediate_ttl: INTERMEDIATE_TTL,
    };
    let metrics = PcaMetrics::default();
    let started = start(
        api.clone(),
        &opts,
        "cluster.local",
        MAX_LEAF,
        metrics.clone(),
        None,
    )
    .await
    .expect("signer");
    (started.signer, api, metrics)
}

async fn sequential(moto: &moto::Moto, mode: PcaMode, rotations: usize) -> Run {
    let (signer, api, metrics) = signer_for(moto, mode, 1000).await;
    let startup = api.snapshot();
    let started = Instant::now();
    let mut errors = 0;
    for n in 0..rotations {
        if signer.sign(rotation_request(n)).await.is_err() {
            errors += 1;
        }
    }
    let elapsed = started.elapsed();
    let after = api.snapshot();
    Run {
        startup,
        rotations: [0, 1, 2, 3].map(|i| after[i] - startup[i]),
        issued: metrics.issued("leaf") + metrics.issued("intermediate"),
        elapsed,
        errors,
    }
}

/// `n` rotations at once in direct mode with a `tps` limit: (errors, elapsed, busiest second).
async fn storm(moto: &moto::Moto, n: usize, tps: u32) -> (usize, Duration, usize, Duration) {
    let (signer, api, _metrics) = signer_for(moto, PcaMode::Direct, tps).await;
    // Let the bucket refill after startup.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests: Vec<SignRequest> = (0..n).map(rotation_request).collect();
    let before = api.snapshot();
    let started = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let s = signer.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                (s.sign(r).await.is_ok(), t.elapsed())
            })
        })
        .collect();
    let mut errors = 0;
    let mut worst = Duration::ZERO;
    for t in tasks {
        let (ok, latency) = t.await.expect("task");
        errors += usize::from(!ok);
        worst = worst.max(latency);
    }
    let elapsed = started.elapsed();
    let busiest = api.busiest_second(started);
    let calls = api.snapshot().iter().sum::<u64>() - before.iter().sum::<u64>();
    assert_eq!(calls as usize, 2 * n, "one Issue and one Get per rotation");
    (errors, elapsed, busiest, worst)
}

fn per_thousand(count: u64, rotations: usize) -> f64 {
    count as f64 * 1000.0 / rotations as f64
}

#[tokio::main]
async fn main() {
    let Some(o) = opts() else { return };
    meshid::app::install_crypto_provider();
    let Some(moto) = moto::Moto::start(moto::Flavour::Documented) else {
        println!("pca_calls bench: skipped (moto is not installed)");
        return;
    };
    println!(
        "| mode | startup calls (Describe / GetCACert / Issue / Get) | calls per 1,000 rotations (Describe / GetCACert / Issue / Get) | PCA certificates per 1,000 rotations | rotations | wall time per rotation (moto) | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mode in [PcaMode::Direct, PcaMode::Intermediate] {
        let r = sequential(&moto, mode, o.rotations).await;
        let [d, g, i, c] = r.rotations.map(|v| per_thousand(v, o.rotations));
        let issued_during = if mode == PcaMode::Intermediate {
            // The startup intermediate is not a per-rotation cost.
            r.issued.saturating_sub(1)
        } else {
            r.issued
        };
        println!(
            "| {} | {} / {} / {} / {} | {d:.0} / {g:.0} / {i:.0} / {c:.0} | {:.0} | {} | {:.2} ms | {} |",
            mode.as_str(),
            r.startup[0],
            r.startup[1],
            r.startup[2],
            r.startup[3],
            per_thousand(issued_during, o.rotations),
            o.rotations,
            r.elapsed.as_secs_f64() * 1e3 / o.rotations as f64,
            r.errors,
        );
    }
    let renewals_per_day =
        24.0 * 3600.0 / (INTERMEDIATE_TTL - MAX_LEAF - Duration::from_secs(3600)).as_secs_f64();
    println!();
    println!(
        "intermediate renewals (6d intermediate, 48h max leaf): every {:.0} h = {:.2} IssueCertificate + {:.2} GetCertificate calls per day, independent of rotations",
        (INTERMEDIATE_TTL - MAX_LEAF - Duration::from_secs(3600)).as_secs_f64() / 3600.0,
        renewals_per_day,
        renewals_per_day,
    );
    let (errors, elapsed, busiest, worst) = storm(&moto, o.storm, o.storm_tps).await;
    println!();
    println!("| pod storm (direct mode) | value |");
    println!("|---|---|");
    println!("| simultaneous rotations | {} |", o.storm);
    println!("| --pca-tps | {} |", o.storm_tps);
    println!("| PCA calls | {} |", 2 * o.storm);
    println!(
        "| most calls in any 1 s window (bound: burst + rate = {}) | {busiest} |",
        2 * o.storm_tps
    );
    println!("| drained in | {:.1} s |", elapsed.as_secs_f64());
    println!("| slowest rotation | {:.1} s |", worst.as_secs_f64());
    println!("| errors | {errors} |");
}
