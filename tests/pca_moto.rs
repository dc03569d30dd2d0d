//! meshid server with the AWS Private CA signer, end to end against a real `moto_server` on
//! 127.0.0.1: the server runs in process (`start_server`) with a static token file, workloads
//! rotate over TLS with the agent's CA client, and every chain is checked by `Svid` and by the
//! `openssl verify` CLI (an independent implementation).
//!
//! moto ignores `Validity`, key types, `ApiPassthrough` and idempotency tokens, and copies the
//! subject and SAN from the CSR (see `tests/common/moto.rs`). So these tests assert what meshid
//! *sends* (moto's journal of IssueCertificate requests), that a leaf carrying the CSR's subject
//! (shipped moto) is refused rather than served, and, with the documented template behaviour
//! patched in (`Flavour::Documented`), the chains served. The unit tests against the test double
//! (`src/signer/aws_pca/tests.rs`) assert the requests exactly.
//!
//! Skipped when moto is not installed (fails instead under `CI=true`).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::meshid::{ca_client, http_get, metric_value, openssl};
use common::moto::{Flavour, Moto};
use meshid::agent::{CaClientError, Svid, WorkloadKeyType, generate_csr};
use meshid::app::{AppError, ServerHandle, start_server};
use meshid::config::{ServerArgs, SignerKind};
use meshid::identity::SpiffeId;
use meshid::signer::PcaMode;
use meshid::trust::TrustBundle;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

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
    start_with(moto, arn, mode, |_, _| {}).await
}

/// [`start`], with `change` applied to the settings (given the server's temp dir).
async fn start_with(
    moto: &Moto,
    arn: &str,
    mode: PcaMode,
    change: impl FnOnce(&mut ServerArgs, &Path),
) -> Result<Server, AppError> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(moto, arn, mode, dir.path());
    change(&mut args, dir.path());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = start_server(args.validate().unwrap(), async move {
        let _ = stopped.await;
    })
    .await?;
    Ok(Server { handle, stop, dir })
}

/// Settings for a server on loopback ports with a static token file in `dir`.
fn base_args(moto: &Moto, arn: &str, mode: PcaMode, dir: &Path) -> ServerArgs {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN},apps,web\n")).unwrap();
    ServerArgs {
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
    }
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
    let moto = moto!(Flavour::Documented);
    let arn = moto.create_active_ca().await;
    let server = start(&moto, &arn, PcaMode::Direct).await.unwrap();
    let mut serials = Vec::new();
    for _ in 0..3 {
        let chain = server.rotate().await;
        // Leaf and root bundle: moto's CA is a root, and the root is never an intermediate.
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert_eq!(subject_of(&chain[0]), "O=cluster.local");
        serials.push(chain[0].clone());
    }
    serials.dedup();
    assert_eq!(serials.len(), 3, "a new certificate per rotation");
    // What meshid sent: the serving certificate, then the three SVIDs.
    let sent = moto.meshid_issue_requests();
    assert_eq!(sent.len(), 4);
    assert_eq!(
        sent[0]["ApiPassthrough"]["Subject"],
        serde_json::json!({"Organization": "cluster.local", "CommonName": "localhost"})
    );
    for r in &sent[1..] {
        assert_sent_workload_policy(r);
    }
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

/// The subject of a PEM certificate, as x509-parser prints it.
fn subject_of(pem: &str) -> String {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(der.as_ref()).unwrap();
    cert.subject().to_string()
}

/// One workload IssueCertificate request carries meshid's policy, whatever the CSR asked (for the
/// ECDSA keys these tests use: no keyEncipherment, RFC 5480).
fn assert_sent_workload_policy(r: &serde_json::Value) {
    assert_eq!(
        r["TemplateArn"],
        "arn:aws:acm-pca:::template/BlankEndEntityCertificate_APIPassthrough/V1"
    );
    let pt = &r["ApiPassthrough"];
    assert_eq!(
        pt["Subject"],
        serde_json::json!({"Organization": "cluster.local"})
    );
    assert_eq!(
        pt["Extensions"]["KeyUsage"],
        serde_json::json!({
            "DigitalSignature": true, "KeyEncipherment": false, "NonRepudiation": false,
            "DataEncipherment": false, "KeyAgreement": false, "KeyCertSign": false,
            "CRLSign": false, "EncipherOnly": false, "DecipherOnly": false
        })
    );
    assert_eq!(
        pt["Extensions"]["ExtendedKeyUsage"],
        serde_json::json!([
            {"ExtendedKeyUsageType": "SERVER_AUTH"},
            {"ExtendedKeyUsageType": "CLIENT_AUTH"}
        ])
    );
    // SEQUENCE { [6] "spiffe://cluster.local/ns/apps/sa/web" }, critical.
    let uri = identity().to_string();
    let mut san = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
    san.extend_from_slice(uri.as_bytes());
    use base64::Engine;
    assert_eq!(
        pt["Extensions"]["CustomExtensions"],
        serde_json::json!([{
            "ObjectIdentifier": "2.5.29.17",
            "Value": base64::engine::general_purpose::STANDARD.encode(san),
            "Critical": true
        }])
    );
}

/// A CSR for the test identity that also asks for the subject `CN=internal-db.corp`.
fn csr_choosing_a_subject() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "internal-db.corp");
    p.subject_alt_names = vec![rcgen::SanType::URI(
        identity().to_string().try_into().unwrap(),
    )];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// Serves gRPC with a certificate from files (self-signed for `localhost`), so that the server
/// starts without PCA issuing its serving certificate; returns the client's root PEM.
fn serving_cert_files(args: &mut ServerArgs, dir: &Path) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("tls.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls-key.pem"), key.serialize_pem()).unwrap();
    args.tls_cert = Some(dir.join("tls.pem"));
    args.tls_key = Some(dir.join("tls-key.pem"));
    cert.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_refuses_a_leaf_carrying_the_csrs_subject_instead_of_serving_it() {
    // Shipped moto copies the CSR's subject into the leaf, as PCA would if meshid sent none.
    let moto = moto!(Flavour::Plain);
    let arn = moto.create_active_ca().await;
    let mut root = String::new();
    let server = start_with(&moto, &arn, PcaMode::Direct, |args, dir| {
        root = serving_cert_files(args, dir);
    })
    .await
    .unwrap();
    let client = meshid::agent::CaClient::new(
        &format!("https://{}", server.handle.grpc_addr),
        &root,
        Some("localhost"),
        None,
    )
    .unwrap();
    let err = client
        .create_certificate(
            &csr_choosing_a_subject(),
            TOKEN,
            Duration::from_secs(3600),
            None,
        )
        .await
        .unwrap_err();
    let CaClientError::Status { code, message } = err else {
        panic!("{err}")
    };
    assert_eq!(code, tonic::Code::Internal);
    assert!(message.contains("differs from the request"), "{message}");
    // meshid asked for its own subject; moto ignored it, and meshid noticed.
    let [sent] = moto.meshid_issue_requests().try_into().unwrap();
    assert_sent_workload_policy(&sent);
    let m = server.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            r#"meshid_certificate_requests_total{outcome="rejected",reason="upstream_leaf_mismatch"}"#
        ),
        1
    );
    // PCA billed the certificate even though meshid refused it.
    assert_eq!(
        metric_value(&m, r#"meshid_pca_certificates_issued_total{kind="leaf"}"#),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_serves_the_subject_meshid_chose_and_not_the_csrs() {
    let moto = moto!(Flavour::Documented);
    let arn = moto.create_active_ca().await;
    let server = start(&moto, &arn, PcaMode::Direct).await.unwrap();
    let chain = ca_client(&server.handle)
        .create_certificate(
            &csr_choosing_a_subject(),
            TOKEN,
            Duration::from_secs(3600),
            None,
        )
        .await
        .unwrap();
    assert_eq!(subject_of(&chain[0]), "O=cluster.local");
    openssl_verify(server.dir.path(), &chain);
    assert_sent_workload_policy(moto.meshid_issue_requests().last().unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_ttl_that_would_mint_more_than_one_intermediate_an_hour_is_refused() {
    let moto = moto!(Flavour::Documented);
    let arn = moto.create_active_ca().await;
    // With PCA's 1 h notBefore backdating, a 1 h intermediate is at half-life on arrival.
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs {
        max_ttl: Some("30m".into()),
        default_ttl: Some("30m".into()),
        pca_intermediate_ttl: Some("1h".into()),
        ..base_args(&moto, &arn, PcaMode::Intermediate, dir.path())
    };
    let err = args.validate().unwrap_err().to_string();
    assert!(
        err.contains("--pca-intermediate-ttl") && err.contains("--max-ttl 30m"),
        "{err}"
    );
    assert!(moto.meshid_issue_requests().is_empty());
    // The shortest allowed lifetime for 30 m leaves starts, with one intermediate.
    let server = start_with(&moto, &arn, PcaMode::Intermediate, |args, _| {
        args.max_ttl = Some("30m".into());
        args.default_ttl = Some("30m".into());
        args.pca_intermediate_ttl = Some("2h30m".into());
    })
    .await
    .unwrap();
    server.rotate().await;
    assert_eq!(moto.meshid_issue_requests().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_bind_its_ports_makes_no_billed_pca_call_however_often_it_restarts() {
    let moto = moto!(Flavour::Documented);
    let arn = moto.create_active_ca().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // A crash loop: both modes, either port taken, several restarts.
    for mode in [PcaMode::Intermediate, PcaMode::Direct] {
        for grpc in [true, false] {
            for _ in 0..3 {
                let err = start_with(&moto, &arn, mode, |args, _| {
                    if grpc {
                        args.listen = Some(addr);
                    } else {
                        args.http_listen = Some(addr);
                    }
                })
                .await
                .err()
                .expect("the port is taken");
                assert!(matches!(err, AppError::Bind { .. }), "{err}");
            }
        }
    }
    assert_eq!(moto.meshid_issue_requests().len(), 0);
}
