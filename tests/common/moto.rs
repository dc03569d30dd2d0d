//! A real `moto_server` (moto's AWS mock) on 127.0.0.1 for the AWS Private CA tests.
//!
//! [`Moto::start`] runs it as a child process on a free port (killed on drop), through
//! `python3` (override with `MESHID_MOTO_PYTHON`), which needs `pip install 'moto[server]'`.
//! When moto is missing the tests skip, except under CI (`CI=true`), where that is a failure.
//!
//! What moto 5.2 does with ACM PCA, read from `moto/acmpca/models.py`, so that no test asserts
//! behaviour moto does not have:
//! - every CA key is RSA-2048 whatever `KeyAlgorithm` says, and it signs with SHA-512 whatever
//!   `SigningAlgorithm` says; `UsageMode` is always `SHORT_LIVED_CERTIFICATE`;
//! - `IssueCertificate` ignores `Validity` (always 365 days), `ApiPassthrough` and
//!   `IdempotencyToken`; the subject and the subjectAltName (with its criticality) are copied
//!   from the CSR; only the `RootCACertificate/V1` and `EndEntityCertificate/V1` templates add
//!   extensions, so `BlankEndEntityCertificate_APIPassthrough/V1` leaves carry only the CSR's
//!   SAN, and `SubordinateCACertificate_PathLen0/V1` certificates are *not CAs*;
//! - `GetCertificate` never answers `RequestInProgressException` and never throttles.
//!
//! [`Flavour::WithSubordinateTemplate`] starts moto with one patch: certificates issued with
//! `SubordinateCACertificate_PathLen0/V1` get that template's extensions as AWS documents them
//! (basicConstraints CA:TRUE pathLen 0, keyCertSign + cRLSign + digitalSignature, SKI, AKI),
//! so intermediate mode can be exercised end to end. [`Flavour::Documented`] adds a second
//! patch: `BlankEndEntityCertificate_APIPassthrough/V1` certificates get the subject and the
//! extensions given in `ApiPassthrough` (the CSR's subject and SAN only where the API gives
//! none), plus the template's basicConstraints CA:FALSE, SKI and AKI, as AWS documents. Every
//! flavour records the body of each `IssueCertificate` request as received
//! ([`Moto::issue_requests`]), so tests can assert what meshid sent.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use aws_sdk_acmpca::Client;
use aws_sdk_acmpca::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    Asn1Subject, CertificateAuthorityConfiguration, CertificateAuthorityType, KeyAlgorithm,
    SigningAlgorithm, Validity, ValidityPeriodType,
};

/// The region moto's ARNs are in.
pub const REGION: &str = "us-east-1";

/// Which moto to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// moto as installed.
    Plain,
    /// moto plus the documented extensions of `SubordinateCACertificate_PathLen0/V1`.
    WithSubordinateTemplate,
    /// moto plus the documented behaviour of both templates meshid uses:
    /// `SubordinateCACertificate_PathLen0/V1` and `BlankEndEntityCertificate_APIPassthrough/V1`.
    Documented,
}

/// Appends each IssueCertificate request body to the file named by `sys.argv[2]`.
const JOURNAL_PATCH: &str = r#"
import json, sys
from moto.acmpca import responses as _journal_responses

_journal_path = sys.argv[2]
_journal_shipped = _journal_responses.ACMPCAResponse.issue_certificate

def _journaled_issue_certificate(self):
    with open(_journal_path, "a") as f:
        f.write(json.dumps(json.loads(self.body)) + "\n")
    return _journal_shipped(self)

_journal_responses.ACMPCAResponse.issue_certificate = _journaled_issue_certificate
"#;

const API_PASSTHROUGH_PATCH: &str = r#"
import base64, json, threading
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from moto.acmpca import models as _pt_models, responses as _pt_responses

BLANK = "arn:aws:acm-pca:::template/BlankEndEntityCertificate_APIPassthrough/V1"
_pt = threading.local()
_pt_issue = _pt_responses.ACMPCAResponse.issue_certificate
_pt_generate = _pt_models.CertificateAuthority.generate_cert
_pt_extensions = _pt_models.CertificateAuthority._x509_extensions

def _issue_with_passthrough(self):
    params = json.loads(self.body)
    _pt.value = params.get("ApiPassthrough") if params.get("TemplateArn") == BLANK else None
    try:
        return _pt_issue(self)
    finally:
        _pt.value = None

def _generate_with_subject(self, subject, public_key, extensions):
    given = (getattr(_pt, "value", None) or {}).get("Subject")
    if given:
        names = [("Organization", NameOID.ORGANIZATION_NAME), ("CommonName", NameOID.COMMON_NAME)]
        subject = x509.Name([x509.NameAttribute(oid, given[k]) for k, oid in names if k in given])
    return _pt_generate(self, subject, public_key, extensions)

def _extensions_with_passthrough(self, csr, template_arn):
    shipped = _pt_extensions(self, csr, template_arn)
    if template_arn != BLANK:
        return shipped
    given = (getattr(_pt, "value", None) or {}).get("Extensions", {})
    out = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False),
    ]
    ku = given.get("KeyUsage")
    if ku:
        out.append((x509.KeyUsage(
            digital_signature=ku.get("DigitalSignature", False),
            content_commitment=ku.get("NonRepudiation", False),
            key_encipherment=ku.get("KeyEncipherment", False),
            data_encipherment=ku.get("DataEncipherment", False),
            key_agreement=False, key_cert_sign=ku.get("KeyCertSign", False),
            crl_sign=ku.get("CRLSign", False), encipher_only=False, decipher_only=False), True))
    purposes = {"SERVER_AUTH": ExtendedKeyUsageOID.SERVER_AUTH,
                "CLIENT_AUTH": ExtendedKeyUsageOID.CLIENT_AUTH}
    ekus = [purposes[e["ExtendedKeyUsageType"]] for e in given.get("ExtendedKeyUsage", [])]
    if ekus:
        out.append((x509.ExtendedKeyUsage(ekus), False))
    api_san = False
    for c in given.get("CustomExtensions", []):
        api_san = api_san or c["ObjectIdentifier"] == "2.5.29.17"
        value = x509.UnrecognizedExtension(ObjectIdentifier(c["ObjectIdentifier"]),
                                           base64.b64decode(c["Value"]))
        out.append((value, c.get("Critical", False)))
    if not api_san:
        out += [(e, c) for e, c in shipped if isinstance(e, x509.SubjectAlternativeName)]
    return out

_pt_responses.ACMPCAResponse.issue_certificate = _issue_with_passthrough
_pt_models.CertificateAuthority.generate_cert = _generate_with_subject
_pt_models.CertificateAuthority._x509_extensions = _extensions_with_passthrough
"#;

const SUBORDINATE_PATCH: &str = r#"
from cryptography import x509
from moto.acmpca import models

SUBORDINATE = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"
_shipped = models.CertificateAuthority._x509_extensions

def _with_subordinate_template(self, csr, template_arn):
    extensions = _shipped(self, csr, template_arn)
    if template_arn == SUBORDINATE:
        extensions = [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(digital_signature=True, content_commitment=False,
                           key_encipherment=False, data_encipherment=False,
                           key_agreement=False, key_cert_sign=True, crl_sign=True,
                           encipher_only=False, decipher_only=False), True),
            (x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False),
        ] + extensions
    return extensions

models.CertificateAuthority._x509_extensions = _with_subordinate_template
"#;

const RUN: &str = r#"
import sys
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"#;

/// A running moto server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    log: tempfile::NamedTempFile,
    journal: tempfile::NamedTempFile,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> String {
    std::env::var("MESHID_MOTO_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn moto_installed() -> bool {
    Command::new(python())
        .args(["-c", "import moto.server, moto.acmpca, flask"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Points the AWS SDK's default credential chain at fixed fake credentials (moto accepts any)
/// and turns IMDS off, so nothing ever leaves 127.0.0.1. Every test in a binary calls this
/// (through [`Moto::start`]) before anything reads the environment.
pub fn fake_aws_environment() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_SESSION_TOKEN", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent/meshid-test-aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/meshid-test-aws-credentials",
            ),
        ] {
            // SAFETY: runs once, before this binary's tests build any AWS client; the values
            // are identical for every test, and no test reads these variables concurrently
            // (each reaches this point first, and `Once` blocks the others until it is done).
            unsafe { std::env::set_var(k, v) };
        }
    });
}

impl Moto {
    /// Starts moto, or returns `None` (after printing why) when it is not installed outside CI.
    pub fn start(flavour: Flavour) -> Option<Self> {
        fake_aws_environment();
        if !moto_installed() {
            let msg = format!(
                "moto is not installed for {} (pip install 'moto[server]')",
                python()
            );
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}; the AWS Private CA tests need it under CI");
            }
            eprintln!("skipping: {msg}");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let script = match flavour {
            Flavour::Plain => format!("{JOURNAL_PATCH}{RUN}"),
            Flavour::WithSubordinateTemplate => format!("{SUBORDINATE_PATCH}{JOURNAL_PATCH}{RUN}"),
            Flavour::Documented => {
                format!("{SUBORDINATE_PATCH}{API_PASSTHROUGH_PATCH}{JOURNAL_PATCH}{RUN}")
            }
        };
        let log = tempfile::NamedTempFile::new().expect("log file");
        let journal = tempfile::NamedTempFile::new().expect("journal file");
        let child = Command::new(python())
            .args([
                "-c",
                &script,
                &port.to_string(),
                journal.path().to_str().expect("journal path"),
            ])
            .stdin(Stdio::null())
            .stdout(log.as_file().try_clone().expect("log"))
            .stderr(log.as_file().try_clone().expect("log"))
            .spawn()
            .expect("start moto");
        let mut moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            journal,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto exited with {status}:\n{}", moto.log());
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen within 30s:\n{}",
                moto.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// Every `IssueCertificate` request body moto received so far, in order, as JSON.
    pub fn issue_requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.journal.path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("journal line"))
            .collect()
    }

    /// The `IssueCertificate` requests not made by this harness (which issues each CA's own
    /// root with `RootCACertificate/V1`): what meshid asked for.
    pub fn meshid_issue_requests(&self) -> Vec<serde_json::Value> {
        self.issue_requests()
            .into_iter()
            .filter(|r| r["TemplateArn"] != "arn:aws:acm-pca:::template/RootCACertificate/V1")
            .collect()
    }

    /// What moto printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// An SDK client for moto (explicit fake credentials).
    pub fn client(&self) -> Client {
        let conf = aws_sdk_acmpca::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .build();
        Client::from_conf(conf)
    }

    /// Creates a root CA (RSA-2048, as moto always uses) and returns its ARN, still in
    /// `PENDING_CERTIFICATE`.
    pub async fn create_pending_ca(&self) -> String {
        let config = CertificateAuthorityConfiguration::builder()
            .key_algorithm(KeyAlgorithm::Rsa2048)
            .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
            .subject(
                Asn1Subject::builder()
                    .organization("meshid tests")
                    .common_name("meshid test root")
                    .build(),
            )
            .build()
            .expect("CA configuration");
        self.client()
            .create_certificate_authority()
            .certificate_authority_type(CertificateAuthorityType::Root)
            .certificate_authority_configuration(config)
            .send()
            .await
            .expect("CreateCertificateAuthority")
            .certificate_authority_arn()
            .expect("ARN")
            .to_owned()
    }

    /// Creates a root CA and activates it the way an operator would: sign its own CSR with
    /// the `RootCACertificate/V1` template and import the result. Returns its ARN.
    pub async fn create_active_ca(&self) -> String {
        let client = self.client();
        let arn = self.create_pending_ca().await;
        let csr = client
            .get_certificate_authority_csr()
            .certificate_authority_arn(&arn)
            .send()
            .await
            .expect("GetCertificateAuthorityCsr")
            .csr()
            .expect("CSR")
            .to_owned();
        let cert_arn = client
            .issue_certificate()
            .certificate_authority_arn(&arn)
            .csr(Blob::new(csr.into_bytes()))
            .template_arn("arn:aws:acm-pca:::template/RootCACertificate/V1")
            .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
            .validity(
                Validity::builder()
                    .r#type(ValidityPeriodType::Years)
                    .value(10)
                    .build()
                    .expect("validity"),
            )
            .send()
            .await
            .expect("IssueCertificate (root)")
            .certificate_arn()
            .expect("certificate ARN")
            .to_owned();
        let root = client
            .get_certificate()
            .certificate_authority_arn(&arn)
            .certificate_arn(cert_arn)
            .send()
            .await
            .expect("GetCertificate (root)")
            .certificate()
            .expect("certificate")
            .to_owned();
        client
            .import_certificate_authority_certificate()
            .certificate_authority_arn(&arn)
            .certificate(Blob::new(root.into_bytes()))
            .send()
            .await
            .expect("ImportCertificateAuthorityCertificate");
        arn
    }
}
