//! Lifetimes no client can turn into a storm (issue 15): a real meshid server on 127.0.0.1 with
//! static tokens, called over TLS the way ztunnel calls it.
//!
//! - A client renewing at the midpoint of notBefore..notAfter and asking for the shortest
//!   lifetime makes no more requests than that lifetime implies.
//! - A client hammering one identity is refused with RESOURCE_EXHAUSTED and a retry hint while
//!   another identity is served normally.
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::time::{Duration, Instant};

use common::meshid::{http_get, metric_value};
use meshid::agent::{Svid, WorkloadKeyType, generate_csr};
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::identity::{BACKDATE_LIFETIME_DIVISOR, SpiffeId};
use meshid::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use meshid::server::RETRY_PUSHBACK_MS;
use meshid::trust::TrustBundle;
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const TD: &str = "cluster.local";

struct Server {
    handle: ServerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A server with tokens `web-token` and `db-token` for `default/web` and `default/db`,
    /// configured by `tweak`.
    async fn start(tweak: impl FnOnce(&mut ServerArgs)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, "web-token,default,web\ndb-token,default,db\n").unwrap();
        let mut args = ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(dir.path().join("ca")),
            static_tokens: Some(tokens),
            serving_hosts: Some(vec!["localhost".into()]),
            ..Default::default()
        };
        tweak(&mut args);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = start_server(args.validate().expect("config"), async move {
            let _ = stopped.await;
        })
        .await
        .expect("server starts");
        Self {
            handle,
            stop: Some(stop),
            _dir: dir,
        }
    }

    async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.handle.root_pem))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{}", self.handle.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        IstioCertificateServiceClient::new(channel)
    }

    /// The roots a workload trusts before its first call.
    fn roots(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.handle.root_pem).expect("root bundle")
    }

    fn metric(&self, series: &str) -> u64 {
        metric_value(&http_get(self.handle.http_addr, "/metrics"), series)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.wait().await.unwrap();
    }
}

fn identity(sa: &str) -> SpiffeId {
    SpiffeId::for_service_account(TD, "default", sa).unwrap()
}

/// One CreateCertificate for `sa` with a fresh key, asking for `validity_secs`; the response is
/// validated like a workload would (chain, key, identity).
async fn request(
    client: &mut IstioCertificateServiceClient<Channel>,
    trusted: &TrustBundle,
    sa: &str,
    validity_secs: i64,
) -> Result<Svid, tonic::Status> {
    let id = identity(sa);
    let (key, csr) = generate_csr(&id, WorkloadKeyType::EcdsaP256).unwrap();
    let chain = send(client, sa, &csr, validity_secs).await?;
    Ok(
        Svid::from_response(&chain, &key, &id, trusted, OffsetDateTime::now_utc())
            .expect("valid SVID"),
    )
}

async fn send(
    client: &mut IstioCertificateServiceClient<Channel>,
    sa: &str,
    csr: &str,
    validity_secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity_secs,
        metadata: None,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {sa}-token").parse().unwrap(),
    );
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_renewing_at_the_midpoint_of_the_shortest_lifetime_makes_only_the_requests_that_lifetime_implies()
 {
    // The shortest --min-ttl a test can wait for; everything else (the 60s skew allowance,
    // the rate limit) is left at its default, as in production.
    const MIN_TTL: Duration = Duration::from_secs(20);
    const RUN: Duration = Duration::from_secs(120);
    let server = Server::start(|a| a.min_ttl = Some("20s".into())).await;
    let mut client = server.client().await;
    let roots = server.roots();

    // Like ztunnel: renew at notBefore + (notAfter - notBefore) / 2, asking each time for a
    // lifetime (1s) below anything meshid issues.
    let started = Instant::now();
    let mut requests = 0u64;
    let mut lifetimes = Vec::new();
    while started.elapsed() < RUN {
        let svid = request(&mut client, &roots, "web", 1)
            .await
            .unwrap_or_else(|s| panic!("request {requests} refused: {s:?}"));
        requests += 1;
        let lifetime = svid.not_after - svid.not_before;
        lifetimes.push(lifetime.whole_seconds());
        let renew_at = svid.not_before + lifetime / 2;
        let wait = Duration::try_from(renew_at - OffsetDateTime::now_utc()).unwrap_or_default();
        tokio::time::sleep(wait.min(RUN.saturating_sub(started.elapsed()))).await;
    }

    // The request was raised to the minimum: 20s after issuance plus a backdate of a tenth of
    // it (2s), not the 60s skew allowance (X.509 times have whole seconds: +-1s).
    let backdate = MIN_TTL / BACKDATE_LIFETIME_DIVISOR;
    let expected = (MIN_TTL + backdate).as_secs() as i64;
    for l in &lifetimes {
        assert!(
            (expected - 1..=expected + 1).contains(l),
            "lifetimes {lifetimes:?}"
        );
    }
    // Each renewal comes (lifetime - backdate) / 2 = 9s after issuance, 8s at the least once
    // the times are cut to whole seconds: one request at the start, one per 8s after.
    let interval = (MIN_TTL - backdate) / 2 - Duration::from_secs(1);
    let implied = 1 + RUN.as_secs() / interval.as_secs();
    eprintln!(
        "{requests} requests in {RUN:?} (at most {implied} implied), lifetimes {lifetimes:?}"
    );
    assert!(
        requests <= implied,
        "{requests} requests in {RUN:?}; the lifetime implies at most {implied}"
    );
    assert!(
        requests >= 2,
        "the client renewed at least once ({requests})"
    );
    assert_eq!(
        server.metric(
            "meshid_certificate_requests_total{outcome=\"rejected\",reason=\"rate_limited\"}"
        ),
        0,
        "renewing at the midpoint never meets the rate limit"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hammering_one_identity_is_limited_while_another_identity_is_served() {
    // Default limit: a burst of 20, then one certificate every 10s.
    let server = Server::start(|_| {}).await;
    let mut hammer = server.client().await;
    let (_key, csr) = generate_csr(&identity("web"), WorkloadKeyType::EcdsaP256).unwrap();

    let started = Instant::now();
    let mut issued = 0u64;
    let refusal = loop {
        match send(&mut hammer, "web", &csr, 3600).await {
            Ok(_) => issued += 1,
            Err(status) => break status,
        }
        assert!(issued <= 1000, "never limited after {issued} certificates");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("retry in") && refusal.message().ends_with('s'),
        "{}",
        refusal.message()
    );
    let pushback_ms: u64 = refusal
        .metadata()
        .get(RETRY_PUSHBACK_MS)
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10_000).contains(&pushback_ms), "{pushback_ms}ms");
    eprintln!(
        "{issued} issued in {:?} before the first refusal ({pushback_ms}ms pushback)",
        started.elapsed()
    );
    // The whole burst was served, and at most one more per 10s that passed meanwhile.
    let refills = started.elapsed().as_secs() / 10 + 1;
    assert!(
        (20..=20 + refills).contains(&issued),
        "{issued} issued before the first refusal"
    );

    // The hammering goes on in the background while another identity asks for certificates.
    let mut background = hammer.clone();
    let hammering = tokio::spawn(async move {
        let started = Instant::now();
        let mut refused = 0u64;
        for _ in 0..200 {
            if let Err(s) = send(&mut background, "web", &csr, 3600).await {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused += 1;
            }
        }
        (refused, started.elapsed())
    });
    let mut other = server.client().await;
    let roots = server.roots();
    for n in 0..5 {
        let svid = request(&mut other, &roots, "db", 3600)
            .await
            .unwrap_or_else(|s| panic!("db request {n} refused while web is limited: {s:?}"));
        assert_eq!(svid.identity, identity("db"));
    }
    let (refused, took) = hammering.await.unwrap();
    let refills = took.as_secs() / 10 + 1;
    assert!(
        refused >= 200 - refills,
        "only {refused} of 200 hammering calls refused in {took:?}"
    );

    let limited = server
        .metric("meshid_certificate_requests_total{outcome=\"rejected\",reason=\"rate_limited\"}");
    assert_eq!(limited, refused + 1);
    server.stop().await;
}
