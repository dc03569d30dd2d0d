//! meshid server with the AWS Private CA signer, end to end against a real `moto_server` on
//! 127.0.0.1: the server runs in process (`start_server`) with a static token file, workloads
//! rotate over TLS with the agent's CA client, and every chain is checked by `Svid` and by the
//! `openssl verify` CLI (an independent implementation).
//!
//! moto ignores `Validity`, key types, `ApiPassthrough` and idempotency tokens, and copies the
//! subject and SAN from the CSR (see `tests/common/moto.rs`), so these tests assert only the
//! wiring and the chains: what meshid asks PCA for is asserted exactly by the unit tests
//! against the test double (`src/signer/aws_pca/tests.rs`).
//!
//! Skipped when moto is not installed (fails instead under `CI=true`).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::meshid::{ca_client, http_get, metric_value, openssl};
use common::moto::{Flavour, Moto};
use meshid::agent::{Svid, WorkloadKeyType, generate_csr};
use meshid::app::{AppError, ServerHandle, start_server};
use meshid::config::{ServerArgs, SignerKind};
use meshid::identity::SpiffeId;
use meshid::signer::PcaMode;
use meshid::trust::TrustBundle;
use time::OffsetDateTime;

const TOKEN: &str = "pca-test-token";

macro_rules! moto {
    ($flavour:expr) => {
        match Moto::start($flavour) {
            Some(m) => m,
            None => return,
        }
    };
}

struct Server {
    handle: ServerHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    dir: tempfile::TempDir,
}

fn identity() -> SpiffeId {
    SpiffeId::for_service_account("cluster.local", "apps", "web").unwrap()
}

async fn start(moto: &Moto, arn: &str, mode: PcaMode) -> Result<Server, AppError> {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN},apps,web\n")).unwrap();
    let args = ServerArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        static_tokens: Some(tokens),
        serving_hosts: Some(vec!["localhost".into()]),
        signer: Some(SignerKind::AwsPca),
        pca_arn: Some(arn.into()),
        pca_region: Some(common::moto::REGION.into()),
        pca_endpoint: Some(moto.endpoint.clone()),
        pca_mode: Some(mode),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = start_server(args.validate().unwrap(), async move {
        let _ = stopped.await;
    })
    .await?;
    Ok(Server { handle, stop, dir })
}

impl Server {
    /// One workload rotation: new key, CSR, CreateCertificate; the response is validated by
    /// the agent's `Svid` and by `openssl verify`. Returns the raw chain.
    async fn rotate(&self) -> Vec<String> {
        let client = ca_client(&self.handle);
        let (key, csr) = generate_csr(&identity(), WorkloadKeyType::EcdsaP256).unwrap();
        let chain = client
            .create_certificate(&csr, TOKEN, Duration::from_secs(3600), None)
            .await
            .unwrap();
        let trusted = TrustBundle::from_pem(&self.handle.root_pem).unwrap();
        Svid::from_response(
            &chain,
            &key,
            &identity(),
            &trusted,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        openssl_verify(self.dir.path(), &chain);
        chain
    }

    async fn metrics(&self) -> String {
        let addr = self.handle.http_addr;
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
            .await
            .unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.wait().await.unwrap();
    }
}

/// `openssl verify` of leaf (first) through the intermediates to the root bundle (last), and
/// the SPIFFE ID as openssl reads it.
fn openssl_verify(dir: &Path, chain: &[String]) {
    let (leaf, rest) = chain.split_first().unwrap();
    let (roots, intermediates) = rest.split_last().unwrap();
    let leaf_path = dir.join("leaf.pem");
    let roots_path = dir.join("roots.pem");
    let untrusted_path = dir.join("untrusted.pem");
    std::fs::write(&leaf_path, leaf).unwrap();
    std::fs::write(&roots_path, roots).unwrap();
    let mut args = vec!["verify", "-CAfile", roots_path.to_str().unwrap()];
    if !intermediates.is_empty() {
        std::fs::write(&untrusted_path, intermediates.concat()).unwrap();
        args.extend(["-untrusted", untrusted_path.to_str().unwrap()]);
    }
    args.push(leaf_path.to_str().unwrap());
    let out = String::from_utf8(openssl(&args)).unwrap();
    assert!(out.trim_end().ends_with(": OK"), "{out}");
    let san = String::from_utf8(openssl(&[
        "x509",
        "-in",
        leaf_path.to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]))
    .unwrap();
    assert!(san.contains(&format!("URI:{}", identity())), "{san}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_issues_every_svid_through_pca_and_openssl_verifies_the_chains() {
    let moto = moto!(Flavour::Plain);
    let arn = moto.create_active_ca().await;
    let server = start(&moto, &arn, PcaMode::Direct).await.unwrap();
    let mut serials = Vec::new();
    for _ in 0..3 {
        let chain = server.rotate().await;
        // Leaf and root bundle: moto's CA is a root, and the root is never an intermediate.
        assert_eq!(chain.len(), 2, "{chain:?}");
        serials.push(chain[0].clone());
    }
    serials.dedup();
    assert_eq!(serials.len(), 3, "a new certificate per rotation");
    let m = server.metrics().await;
    // The serving certificate and three SVIDs: four certificates billed by PCA.
    assert_eq!(
        metric_value(&m, r#"meshid_pca_certificates_issued_total{kind="leaf"}"#),
        4
    );
    assert_eq!(
        metric_value(
            &m,
            r#"meshid_pca_calls_total{api="IssueCertificate",outcome="ok"}"#
        ),
        4
    );
    assert_eq!(
        metric_value(
            &m,
            r#"meshid_pca_calls_total{api="DescribeCertificateAuthority",outcome="ok"}"#
        ),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_signs_every_svid_with_one_pca_issued_intermediate() {
    let moto = moto!(Flavour::WithSubordinateTemplate);
    let arn = moto.create_active_ca().await;
    let server = start(&moto, &arn, PcaMode::Intermediate).await.unwrap();
    let mut intermediates = Vec::new();
    for _ in 0..5 {
        let chain = server.rotate().await;
        assert_eq!(chain.len(), 3, "leaf, meshid's intermediate, root bundle");
        intermediates.push(chain[1].clone());
    }
    intermediates.dedup();
    assert_eq!(intermediates.len(), 1);
    let m = server.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"meshid_pca_certificates_issued_total{kind="intermediate"}"#
        ),
        1
    );
    assert_eq!(
        metric_value(&m, r#"meshid_pca_certificates_issued_total{kind="leaf"}"#),
        0
    );
    assert_eq!(
        metric_value(
            &m,
            r#"meshid_pca_calls_total{api="IssueCertificate",outcome="ok"}"#
        ),
        1
    );
    assert!(
        metric_value(
            &m,
            r#"meshid_certificate_expiry_timestamp_seconds{cert="intermediate"}"#
        ) > 0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_refuses_a_subordinate_certificate_that_is_not_a_ca() {
    // Shipped moto ignores the SubordinateCACertificate_PathLen0 template: its "intermediate"
    // has no basicConstraints. meshid must refuse to sign with it.
    let moto = moto!(Flavour::Plain);
    let arn = moto.create_active_ca().await;
    let err = start(&moto, &arn, PcaMode::Intermediate)
        .await
        .err()
        .expect("startup must fail")
        .to_string();
    assert!(err.contains("CA:TRUE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly_for_an_unknown_ca_or_one_that_is_not_active() {
    let moto = moto!(Flavour::Plain);
    let unknown = format!(
        "arn:aws:acm-pca:{}:123456789012:certificate-authority/00000000-0000-0000-0000-000000000000",
        common::moto::REGION
    );
    let err = start(&moto, &unknown, PcaMode::Direct)
        .await
        .err()
        .expect("unknown CA")
        .to_string();
    assert!(
        err.contains("DescribeCertificateAuthority") && err.contains("not found"),
        "{err}"
    );
    let pending = moto.create_pending_ca().await;
    let err = start(&moto, &pending, PcaMode::Direct)
        .await
        .err()
        .expect("pending CA")
        .to_string();
    assert!(err.contains("PENDING_CERTIFICATE, not ACTIVE"), "{err}");
}
