//! The AWS Private CA signer against [`FakePca`]: the exact requests built, retries, polling,
//! coalescing, rate limiting, the queue bound, startup checks and intermediate renewal.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::api::{Api, ApiError, ExtendedKeyUsage, PcaApi, ValidityKind};
use super::fake::{Call, FakePca};
use super::intermediate::renew_at;
use super::request::{self, INTERMEDIATE_TEMPLATE_ARN, LEAF_TEMPLATE_ARN};
use super::{AwsPcaOptions, LeafMismatch, PcaError, PcaMetrics, PcaMode, Started, start};
use crate::identity::{LeafProfile, SpiffeId, check_csr};
use crate::pem::parse_certs;
use crate::signer::{IssuedChain, SignRequest, SignerError};
use crate::svid::{WorkloadKeyType, generate_csr};
use crate::trust::TrustBundle;

const ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/test";
const MAX_LEAF: Duration = Duration::from_secs(48 * 3600);

fn opts(mode: PcaMode) -> AwsPcaOptions {
    AwsPcaOptions {
        ca_arn: ARN.into(),
        region: "eu-west-1".into(),
        endpoint: None,
        mode,
        requests_per_second: 1000,
        max_pending: 1000,
        intermediate_ttl: Duration::from_secs(6 * 24 * 3600),
    }
}

async fn started(fake: &Arc<FakePca>, o: AwsPcaOptions) -> Result<Started, PcaError> {
    let api: Arc<dyn PcaApi> = fake.clone();
    start(api, &o, "td", MAX_LEAF, PcaMetrics::default(), None).await
}

fn id() -> SpiffeId {
    SpiffeId::for_service_account("td", "ns", "web").unwrap()
}

/// A request as the CA service builds it from an agent's CSR.
fn workload_request(ttl: Duration) -> (KeyPair, SignRequest) {
    let (key, pem) = generate_csr(&id(), WorkloadKeyType::EcdsaP256).unwrap();
    let csr = check_csr(&pem, &id()).unwrap();
    let req = SignRequest {
        profile: LeafProfile::Workload(id()),
        spki_der: csr.spki_der,
        ttl,
        max_backdate: crate::identity::DEFAULT_MAX_BACKDATE,
        csr_der: Some(csr.csr_der),
    };
    (key, req)
}

fn verify(issued: &IssuedChain, roots: &[String]) {
    let bundle = TrustBundle::from_pem(&roots.concat()).unwrap();
    let mut chain = parse_certs(&issued.leaf_pem).unwrap();
    for pem in &issued.intermediates_pem {
        chain.extend(parse_certs(pem).unwrap());
    }
    bundle
        .validate(
            &chain,
            OffsetDateTime::now_utc(),
            crate::trust::Usage::ServerAndClientAuth,
        )
        .unwrap();
}

#[tokio::test]
async fn direct_mode_sends_our_policy_to_pca_and_returns_a_verified_chain_without_the_root() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    assert_eq!(s.signer.name(), "aws-pca-direct");
    let (_key, req) = workload_request(Duration::from_secs(12 * 3600));
    let csr_der = req.csr_der.clone().unwrap();
    let issued = s.signer.sign(req.clone()).await.unwrap();

    let [sent] = fake.issued().try_into().unwrap();
    assert_eq!(sent.ca_arn, ARN);
    assert_eq!(sent.template_arn, LEAF_TEMPLATE_ARN);
    assert_eq!(sent.signing_algorithm, "SHA256WITHECDSA");
    assert_eq!(sent.csr_pem, request::csr_pem(&csr_der));
    assert_eq!(sent.validity.kind, ValidityKind::Absolute);
    let expected_end = OffsetDateTime::now_utc().unix_timestamp() + 12 * 3600;
    assert!((sent.validity.value - expected_end).abs() <= 5);
    assert_eq!(
        sent.idempotency_token,
        request::idempotency_token(
            LEAF_TEMPLATE_ARN,
            &csr_der,
            &format!("O=td workload {}", id()),
            req.ttl
        )
    );
    let pt = sent.api_passthrough.unwrap();
    assert_eq!(
        pt.subject,
        super::api::Subject {
            organization: "td".into(),
            common_name: None
        }
    );
    // An ECDSA key: keyEncipherment is for RSA keys only.
    assert!(pt.key_usage.digital_signature && !pt.key_usage.key_encipherment);
    assert_eq!(
        pt.extended_key_usage,
        [ExtendedKeyUsage::ServerAuth, ExtendedKeyUsage::ClientAuth]
    );
    let [san] = pt.custom_extensions.try_into().unwrap();
    assert_eq!(
        (san.object_identifier.as_str(), san.critical),
        ("2.5.29.17", true)
    );
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(san.value_base64)
            .unwrap(),
        request::san_der(&[request::SanName::Uri(id().to_string())])
    );

    // The fake honours ApiPassthrough, so the leaf shows what PCA would issue.
    assert!(issued.intermediates_pem.is_empty(), "the root is dropped");
    verify(&issued, &s.signer.trust_anchors_pem());
    let der = parse_certs(&issued.leaf_pem).unwrap();
    let (_, leaf) = X509Certificate::from_der(der[0].as_ref()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical);
    assert_eq!(leaf.subject().to_string(), "O=td");
    assert_eq!(hex::encode(leaf.raw_serial()), issued.serial_hex);
    assert_eq!(fake.count(Api::Get), 1);
    assert!(
        matches!(fake.calls().last(), Some(Call::Get(arn)) if arn.starts_with(ARN)),
        "GetCertificate asks for the certificate IssueCertificate returned"
    );
    assert_eq!(s.metrics.issued("leaf"), 1);
}

#[tokio::test]
async fn whole_day_lifetimes_use_days_and_an_rsa_ca_gets_an_rsa_signing_algorithm() {
    let fake = Arc::new(FakePca::new());
    fake.description.lock().unwrap().key_algorithm = "RSA_2048".into();
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let (_key, req) = workload_request(Duration::from_secs(2 * 86_400));
    s.signer.sign(req).await.unwrap();
    let [sent] = fake.issued().try_into().unwrap();
    assert_eq!(sent.signing_algorithm, "SHA256WITHRSA");
    assert_eq!(
        (sent.validity.kind, sent.validity.value),
        (ValidityKind::Days, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn throttled_issues_are_retried_with_backoff_and_the_same_idempotency_token() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let throttled = || ApiError::Throttled {
        code: "ThrottlingException".into(),
    };
    fake.fail(Api::Issue, [throttled(), throttled()]);
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let t0 = Instant::now();
    s.signer.sign(req).await.unwrap();
    let sent = fake.issued();
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|r| r == &sent[0]), "identical retries");
    let times = fake.times(Api::Issue);
    // Equal jitter: at least half of 200 ms, then half of 400 ms.
    assert!(times[1] - times[0] >= Duration::from_millis(100));
    assert!(times[2] - times[1] >= Duration::from_millis(200));
    assert!(t0.elapsed() <= Duration::from_secs(1));
    assert_eq!(s.metrics.issued("leaf"), 1);
    assert_eq!(s.metrics.calls_of(Api::Issue), 3);
    let throttles = s
        .metrics
        .throttles
        .get(&super::metrics::ApiLabels {
            api: "IssueCertificate",
        })
        .map(|c| c.get());
    assert_eq!(throttles, Some(2));
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded_and_surface_as_unavailable() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    fake.fail(
        Api::Issue,
        (0..10).map(|_| ApiError::Transient("HTTP 503".into())),
    );
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
    assert_eq!(fake.count(Api::Issue), 5);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    fake.fail(
        Api::Issue,
        [ApiError::AccessDenied {
            code: "AccessDeniedException".into(),
            message: "not authorized to perform: acm-pca:IssueCertificate".into(),
        }],
    );
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(
        matches!(
            &err,
            SignerError::AwsPca(PcaError::Call {
                api: Api::Issue,
                source: ApiError::AccessDenied { .. },
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("IAM"), "{err}");
    assert_eq!(fake.count(Api::Issue), 1);
}

#[tokio::test(start_paused = true)]
async fn get_certificate_is_polled_with_backoff_while_the_request_is_in_progress() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    fake.fail(Api::Get, (0..3).map(|_| ApiError::InProgress));
    let (_key, req) = workload_request(Duration::from_secs(3600));
    s.signer.sign(req).await.unwrap();
    assert_eq!(fake.count(Api::Issue), 1);
    let polls = fake.times(Api::Get);
    assert_eq!(polls.len(), 4);
    assert!(polls[1] - polls[0] >= Duration::from_millis(50));
    assert!(polls[3] - polls[2] >= Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn polling_gives_up_after_the_poll_budget() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    fake.fail(Api::Get, (0..100).map(|_| ApiError::InProgress));
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
    assert_eq!(fake.count(Api::Get), 30);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_for_the_same_identity_and_key_make_one_pca_call() {
    let fake = Arc::new(FakePca::new());
    *fake.issue_delay.lock().unwrap() = Duration::from_secs(1);
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let signer = s.signer.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move { signer.sign(req).await }));
    }
    let mut serials = Vec::new();
    for t in tasks {
        serials.push(t.await.unwrap().unwrap().serial_hex);
    }
    assert!(serials.iter().all(|s| s == &serials[0]));
    assert_eq!(fake.count(Api::Issue), 1);
    assert_eq!(s.metrics.coalesced.get(), 4);
    // A different key is a different request.
    let (_other, req2) = workload_request(Duration::from_secs(3600));
    s.signer.sign(req2).await.unwrap();
    assert_eq!(fake.count(Api::Issue), 2);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_requests_is_spread_out_at_the_configured_rate() {
    let fake = Arc::new(FakePca::new());
    let s = started(
        &fake,
        AwsPcaOptions {
            requests_per_second: 4,
            ..opts(PcaMode::Direct)
        },
    )
    .await
    .unwrap();
    // Startup used 2 tokens (Describe, GetCACertificate); let the bucket refill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let signer = s.signer.clone();
        let (_key, req) = workload_request(Duration::from_secs(3600));
        tasks.push(tokio::spawn(async move { signer.sign(req).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 20 calls (Issue + Get each) at 4/s with a burst of 4: 16 waited for tokens.
    let mut all = fake.times(Api::Issue);
    all.extend(fake.times(Api::Get));
    all.retain(|t| *t >= t0);
    all.sort();
    assert_eq!(all.len(), 20);
    // Token bucket: any interval of length T holds at most burst + rate * T calls.
    for i in 0..all.len() {
        for j in i..all.len() {
            let allowed = 4.0 + 4.0 * (all[j] - all[i]).as_secs_f64();
            assert!((j - i + 1) as f64 <= allowed + 0.01, "calls {i}..={j}");
        }
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(3900),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_the_queue_bound_are_refused_as_unavailable() {
    let fake = Arc::new(FakePca::new());
    *fake.issue_delay.lock().unwrap() = Duration::from_secs(5);
    let s = started(
        &fake,
        AwsPcaOptions {
            max_pending: 2,
            ..opts(PcaMode::Direct)
        },
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let signer = s.signer.clone();
        let (_key, req) = workload_request(Duration::from_secs(3600));
        tasks.push(tokio::spawn(async move { signer.sign(req).await }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let err = s.signer.sign(req.clone()).await.unwrap_err();
    assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
    assert_eq!(s.metrics.rejected_queue_full.get(), 1);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    s.signer.sign(req).await.unwrap();
}

#[tokio::test]
async fn direct_mode_requires_the_csr() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let (_key, mut req) = workload_request(Duration::from_secs(3600));
    req.csr_der = None;
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(
        matches!(err, SignerError::AwsPca(PcaError::CsrRequired)),
        "{err}"
    );
    assert_eq!(fake.count(Api::Issue), 0);
}

#[tokio::test]
async fn a_server_certificate_for_a_generated_key_is_issued_in_direct_mode() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let profile = LeafProfile::Server {
        hosts: vec!["meshid.svc".into(), "127.0.0.1".into()],
        spiffe: None,
    };
    let req = SignRequest::for_key(profile, &key, Duration::from_secs(86_400)).unwrap();
    let issued = s.signer.sign(req).await.unwrap();
    verify(&issued, &s.signer.trust_anchors_pem());
    let [sent] = fake.issued().try_into().unwrap();
    let pt = sent.api_passthrough.unwrap();
    assert_eq!(pt.subject.organization, "td");
    assert_eq!(pt.subject.common_name.as_deref(), Some("meshid.svc"));
    assert!(!pt.custom_extensions[0].critical);
}

#[tokio::test]
async fn startup_refuses_a_ca_that_is_not_active() {
    let fake = Arc::new(FakePca::new());
    fake.description.lock().unwrap().status = "PENDING_CERTIFICATE".into();
    let err = started(&fake, opts(PcaMode::Direct)).await.unwrap_err();
    assert!(
        matches!(&err, PcaError::NotActive { status, .. } if status == "PENDING_CERTIFICATE"),
        "{err}"
    );
}

#[tokio::test]
async fn startup_errors_name_the_call_the_arn_and_the_reason() {
    let cases = [
        (
            ApiError::NotFound("Could not find certificate authority".into()),
            "wrong ARN, account or region",
        ),
        (
            ApiError::AccessDenied {
                code: "AccessDeniedException".into(),
                message: "not authorized to perform acm-pca:DescribeCertificateAuthority".into(),
            },
            "IAM policy",
        ),
        (
            ApiError::Credentials("no providers in chain provided credentials".into()),
            "no AWS credentials",
        ),
    ];
    for (e, why) in cases {
        let fake = Arc::new(FakePca::new());
        fake.fail(Api::Describe, [e]);
        let err = started(&fake, opts(PcaMode::Direct))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("DescribeCertificateAuthority on arn:"),
            "{err}"
        );
        assert!(err.contains(ARN) && err.contains(why), "{err}");
    }
}

#[tokio::test]
async fn startup_refuses_lifetimes_a_short_lived_ca_cannot_issue_and_unsupported_keys() {
    let fake = Arc::new(FakePca::new());
    fake.description.lock().unwrap().usage_mode = Some("SHORT_LIVED_CERTIFICATE".into());
    let err = started(
        &fake,
        AwsPcaOptions {
            intermediate_ttl: Duration::from_secs(8 * 86_400),
            ..opts(PcaMode::Intermediate)
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            PcaError::TooLongForShortLivedMode {
                setting: "--pca-intermediate-ttl",
                ..
            }
        ),
        "{err}"
    );
    assert!(started(&fake, opts(PcaMode::Intermediate)).await.is_ok());

    let fake = Arc::new(FakePca::new());
    fake.description.lock().unwrap().key_algorithm = "ML_DSA_65".into();
    let err = started(&fake, opts(PcaMode::Direct)).await.unwrap_err();
    assert!(matches!(err, PcaError::UnsupportedKeyAlgorithm(_)), "{err}");
}

#[tokio::test]
async fn intermediate_mode_calls_pca_once_and_signs_leaves_locally() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Intermediate)).await.unwrap();
    assert_eq!(s.signer.name(), "aws-pca-intermediate");
    let [sent] = fake.issued().try_into().unwrap();
    assert_eq!(sent.template_arn, INTERMEDIATE_TEMPLATE_ARN);
    assert_eq!(sent.api_passthrough, None);
    assert_eq!(
        (sent.validity.kind, sent.validity.value),
        (ValidityKind::Days, 6)
    );
    let calls_after_start = fake.calls().len();
    assert_eq!(
        calls_after_start, 4,
        "Describe, GetCACertificate, Issue, Get"
    );
    for _ in 0..20 {
        let (_key, req) = workload_request(Duration::from_secs(3600));
        let issued = s.signer.sign(req).await.unwrap();
        assert_eq!(issued.intermediates_pem.len(), 1);
        verify(&issued, &s.signer.trust_anchors_pem());
    }
    assert_eq!(fake.calls().len(), calls_after_start);
    assert_eq!(s.metrics.issued("intermediate"), 1);
    assert_eq!(s.metrics.issued("leaf"), 0);
}

#[tokio::test]
async fn a_renewed_intermediate_takes_over_and_earlier_leaves_still_verify() {
    let fake = Arc::new(FakePca::new());
    let mut s = started(&fake, opts(PcaMode::Intermediate)).await.unwrap();
    let roots = s.signer.trust_anchors_pem();
    let (_k, req) = workload_request(Duration::from_secs(3600));
    let before = s.signer.sign(req).await.unwrap();
    let renewal = s.renewal.as_mut().unwrap();
    renewal.renew_now().await.unwrap();
    let (_k, req) = workload_request(Duration::from_secs(3600));
    let after = s.signer.sign(req).await.unwrap();
    assert_ne!(before.intermediates_pem, after.intermediates_pem);
    verify(&before, &roots);
    verify(&after, &roots);
    // Each intermediate has its own key: the new CSR was not the old one.
    let sent = fake.issued();
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0].csr_pem, sent[1].csr_pem);
    assert_ne!(sent[0].idempotency_token, sent[1].idempotency_token);
}

#[test]
fn the_intermediate_is_renewed_while_a_full_length_leaf_still_fits_but_not_before_half_life() {
    let nb = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    let h = |n: u64| Duration::from_secs(n * 3600);
    // 6 days, 48 h leaves: renew at 144 - 48 - 1 = 95 h.
    assert_eq!(renew_at(nb, nb + h(144), h(48)), nb + h(95));
    // A certificate shorter than expected: half-life, never a loop of renewals.
    assert_eq!(renew_at(nb, nb + h(10), h(48)), nb + h(5));
}

#[tokio::test(start_paused = true)]
async fn the_renewal_loop_renews_retries_failures_and_stops_at_shutdown() {
    let fake = Arc::new(FakePca::new());
    // Four-second intermediates: the loop renews at half-life (every 2 s of virtual time,
    // since wall-clock time stands still relative to the paused tokio clock).
    let mut s = started(
        &fake,
        AwsPcaOptions {
            intermediate_ttl: Duration::from_secs(4),
            ..opts(PcaMode::Intermediate)
        },
    )
    .await
    .unwrap();
    fake.fail(
        Api::Issue,
        [ApiError::InvalidState("CA disabled for a moment".into())],
    );
    let renewal = s.renewal.take().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(renewal.run(stop_rx));
    while fake.count(Api::Issue) < 4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Start, one failure, then successes: the signer still works throughout.
    assert!(s.metrics.issued("intermediate") >= 3);
    let failed = s
        .metrics
        .calls
        .get(&super::metrics::CallLabels {
            api: "IssueCertificate",
            outcome: "invalid_state",
        })
        .map(|c| c.get());
    assert_eq!(failed, Some(1));
    let (_k, req) = workload_request(Duration::from_secs(1));
    s.signer.sign(req).await.unwrap();
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn an_expired_intermediate_makes_signing_unavailable_rather_than_issue_dead_leaves() {
    let fake = Arc::new(FakePca::new());
    let s = started(
        &fake,
        AwsPcaOptions {
            intermediate_ttl: Duration::from_secs(2),
            ..opts(PcaMode::Intermediate)
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (_k, req) = workload_request(Duration::from_secs(60));
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
}

/// A CSR for the workload identity that also asks for a hostname-like subject CN.
fn workload_request_with_cn(cn: &str) -> SignRequest {
    let key = KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.subject_alt_names = vec![rcgen::SanType::URI(id().to_string().try_into().unwrap())];
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    let csr = check_csr(&pem, &id()).unwrap();
    SignRequest {
        profile: LeafProfile::Workload(id()),
        spki_der: csr.spki_der,
        ttl: Duration::from_secs(3600),
        max_backdate: crate::identity::DEFAULT_MAX_BACKDATE,
        csr_der: Some(csr.csr_der),
    }
}

#[tokio::test]
async fn a_csr_chosen_subject_never_reaches_the_leaf_in_direct_mode() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let issued = s
        .signer
        .sign(workload_request_with_cn("internal-db.corp"))
        .await
        .unwrap();
    let [sent] = fake.issued().try_into().unwrap();
    assert_eq!(sent.api_passthrough.unwrap().subject.organization, "td");
    let der = parse_certs(&issued.leaf_pem).unwrap();
    let (_, leaf) = X509Certificate::from_der(der[0].as_ref()).unwrap();
    assert_eq!(leaf.subject().to_string(), "O=td");
}

#[tokio::test]
async fn a_leaf_carrying_the_csrs_subject_is_refused_not_served() {
    let fake = Arc::new(FakePca::new());
    // What moto does, and what PCA would do if the subject were not sent.
    fake.copy_csr_subject
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let err = s
        .signer
        .sign(workload_request_with_cn("internal-db.corp"))
        .await
        .unwrap_err();
    let SignerError::AwsPca(PcaError::LeafMismatch(LeafMismatch::Subject { got, want })) = err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (got.as_str(), want.as_str()),
        ("CN=internal-db.corp", "O=td")
    );
    // PCA billed it: it is counted even though it was not served.
    assert_eq!(s.metrics.issued("leaf"), 1);
}

#[tokio::test]
async fn resending_the_same_csr_counts_one_billed_certificate_per_idempotency_token() {
    let fake = Arc::new(FakePca::new());
    let s = started(&fake, opts(PcaMode::Direct)).await.unwrap();
    let (_key, req) = workload_request(Duration::from_secs(3600));
    let first = s.signer.sign(req.clone()).await.unwrap();
    let again = s.signer.sign(req).await.unwrap();
    assert_eq!(fake.count(Api::Issue), 2);
    // PCA answered the reused token with the certificate it had already issued.
    assert_eq!(first.serial_hex, again.serial_hex);
    assert_eq!(s.metrics.issued("leaf"), 1);
}

#[tokio::test]
async fn a_failed_renewal_is_retried_with_the_same_key_and_token_and_billed_once() {
    let fake = Arc::new(FakePca::new());
    let mut s = started(&fake, opts(PcaMode::Intermediate)).await.unwrap();
    let renewal = s.renewal.as_mut().unwrap();
    // PCA issued the certificate, but fetching it failed for good.
    fake.fail(
        Api::Get,
        [ApiError::NotFound("eventually consistent".into())],
    );
    renewal.renew_now().await.unwrap_err();
    renewal.renew_now().await.unwrap();
    let sent = fake.issued();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1].csr_pem, sent[2].csr_pem);
    assert_eq!(sent[1].idempotency_token, sent[2].idempotency_token);
    assert_eq!(s.metrics.issued("intermediate"), 2);
    // The next renewal uses a new key.
    renewal.renew_now().await.unwrap();
    assert_ne!(fake.issued()[3].csr_pem, sent[2].csr_pem);
}

#[test]
fn the_shortest_allowed_intermediate_ttl_renews_at_most_hourly_and_leaves_full_leaves() {
    use super::intermediate::{MIN_RENEWAL_INTERVAL, min_intermediate_ttl, renewal_interval};
    let one_second = Duration::from_secs(1);
    for minutes in [
        1,
        10,
        30,
        59,
        60,
        61,
        90,
        120,
        180,
        24 * 60,
        48 * 60,
        7 * 24 * 60,
    ] {
        let max_leaf = Duration::from_secs(minutes * 60);
        let min = min_intermediate_ttl(max_leaf);
        assert!(min >= max_leaf * 2, "{minutes}m");
        assert!(
            renewal_interval(min, max_leaf) >= MIN_RENEWAL_INTERVAL,
            "{minutes}m"
        );
        let shorter = min - one_second;
        assert!(
            shorter < max_leaf * 2 || renewal_interval(shorter, max_leaf) < MIN_RENEWAL_INTERVAL,
            "{minutes}m: the bound is tight"
        );
    }
    // The configuration of issue 11: renewal due the moment the intermediate arrives.
    assert_eq!(
        renewal_interval(Duration::from_secs(3600), Duration::from_secs(1800)),
        Duration::ZERO
    );
    assert_eq!(
        min_intermediate_ttl(Duration::from_secs(1800)),
        Duration::from_secs(150 * 60)
    );
}

#[test]
fn renewal_retries_back_off_while_the_intermediate_signs_and_come_within_seconds_after() {
    use super::intermediate::{LEAF_FLOOR, retry_delay};
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    let hour = Duration::from_secs(3600);
    for failures in 0..30 {
        // Far from expiry: the usual backoff, up to 10 minutes.
        assert!(retry_delay(failures, now, now + hour * 24) <= Duration::from_secs(600));
        // Never sleeping past the moment signing stops.
        let stops_in = Duration::from_secs(30);
        assert!(retry_delay(failures, now, now + LEAF_FLOOR + stops_in) <= stops_in);
        // Within the floor or expired: at most 5 s.
        for not_after in [now + LEAF_FLOOR / 2, now, now - hour] {
            assert!(retry_delay(failures, now, not_after) <= Duration::from_secs(5));
        }
    }
    assert!(retry_delay(20, now, now + hour * 24) >= Duration::from_secs(300));
}

#[tokio::test]
async fn leaves_are_never_cut_below_the_floor_by_the_intermediates_expiry() {
    let fake = Arc::new(FakePca::new());
    let s = started(
        &fake,
        AwsPcaOptions {
            intermediate_ttl: Duration::from_secs(300),
            ..opts(PcaMode::Intermediate)
        },
    )
    .await
    .unwrap();
    // 5 minutes left: an hour-long leaf would be cut below the 10-minute floor.
    let (_k, req) = workload_request(Duration::from_secs(3600));
    let err = s.signer.sign(req).await.unwrap_err();
    assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
    // A leaf asked to be shorter than what is left is not cut, and is served.
    let (_k, req) = workload_request(Duration::from_secs(60));
    let issued = s.signer.sign(req).await.unwrap();
    let lifetime = issued.not_after - OffsetDateTime::now_utc();
    assert!(lifetime > time::Duration::seconds(50), "{lifetime}");
}

#[tokio::test(start_paused = true)]
async fn after_the_intermediate_expired_in_an_outage_renewal_is_retried_every_few_seconds() {
    let fake = Arc::new(FakePca::new());
    let mut s = started(
        &fake,
        AwsPcaOptions {
            intermediate_ttl: Duration::from_secs(1),
            ..opts(PcaMode::Intermediate)
        },
    )
    .await
    .unwrap();
    // The outage: ten attempts fail.
    fake.fail(
        Api::Issue,
        (0..10).map(|_| ApiError::InvalidState("CA unreachable".into())),
    );
    let renewal = s.renewal.take().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(renewal.run(stop_rx));
    while fake.count(Api::Issue) < 12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    let times = fake.times(Api::Issue);
    // Attempts 2..=12: the failures and the first success after PCA returned.
    for pair in times[1..12].windows(2) {
        assert!(
            pair[1] - pair[0] <= Duration::from_secs(5),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    assert!(s.metrics.issued("intermediate") >= 2);
}

#[tokio::test]
async fn direct_mode_refuses_a_trust_domain_pca_cannot_put_in_the_subject() {
    let fake = Arc::new(FakePca::new());
    let api: Arc<dyn PcaApi> = fake.clone();
    let long = format!("{}.example", "a".repeat(60));
    let err = start(
        api,
        &opts(PcaMode::Direct),
        &long,
        MAX_LEAF,
        PcaMetrics::default(),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err, PcaError::TrustDomainTooLong(long));
    assert!(fake.calls().is_empty());
}
