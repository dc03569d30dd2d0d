//! Pure functions that turn our issuance policy into PCA requests, and PCA responses back into
//! chains. Nothing here performs I/O.

use std::time::Duration;

use crate::crypto::Sha256;
use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::PcaError;
use super::api::{
    ApiPassthrough, CertificateAndChain, CustomExtension, ExtendedKeyUsage, IssueRequest, KeyUsage,
    Subject, Validity, ValidityKind,
};
use crate::identity::LeafProfile;
use crate::pem::{cert_to_pem, parse_certs};

/// Template for workload leaves: basicConstraints CA:FALSE from the template, everything else
/// (SAN, key usage, extended key usage, subject) from `ApiPassthrough`; only the key is taken
/// from the CSR. The template falls back to the CSR for the subject and the SAN when
/// `ApiPassthrough` lacks them, so meshid always sends both.
pub const LEAF_TEMPLATE_ARN: &str =
    "arn:aws:acm-pca:::template/BlankEndEntityCertificate_APIPassthrough/V1";
/// Template for meshid's own signing intermediate: CA:TRUE, pathLen 0, so it can sign leaves
/// only.
pub const INTERMEDIATE_TEMPLATE_ARN: &str =
    "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1";
/// The subjectAltName extension.
pub const SAN_OID: &str = "2.5.29.17";
/// Longest idempotency token PCA accepts.
pub const MAX_IDEMPOTENCY_TOKEN_LEN: usize = 36;
/// Longest certificate a short-lived-mode CA issues.
pub const SHORT_LIVED_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

const DAY: u64 = 24 * 3600;

/// The `SigningAlgorithm` for a CA key algorithm: SHA-256 for RSA and P-256, the curve's own
/// hash for P-384 and P-521. Errors with [`PcaError::UnsupportedKeyAlgorithm`] otherwise.
pub fn signing_algorithm(key_algorithm: &str) -> Result<&'static str, PcaError> {
    match key_algorithm {
        "RSA_2048" | "RSA_3072" | "RSA_4096" => Ok("SHA256WITHRSA"),
        "EC_prime256v1" => Ok("SHA256WITHECDSA"),
        "EC_secp384r1" => Ok("SHA384WITHECDSA"),
        "EC_secp521r1" => Ok("SHA512WITHECDSA"),
        other => Err(PcaError::UnsupportedKeyAlgorithm(other.to_owned())),
    }
}

/// `Validity` for a certificate living `ttl` from `now`: whole days as `DAYS` (relative to
/// issuance), anything else as an `ABSOLUTE` Unix time (PCA has no hour or minute unit).
/// Sub-second remainders round up.
pub fn validity(now: OffsetDateTime, ttl: Duration) -> Validity {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if secs >= DAY && secs.is_multiple_of(DAY) {
        Validity {
            kind: ValidityKind::Days,
            value: i64::try_from(secs / DAY).unwrap_or(i64::MAX),
        }
    } else {
        Validity {
            kind: ValidityKind::Absolute,
            value: now
                .unix_timestamp()
                .saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)),
        }
    }
}

/// A stable token for one logical issuance: the same CSR, names, template and lifetime give the
/// same token, so a retried `IssueCertificate` (by us, or by an agent resending its CSR within
/// five minutes) returns the certificate already minted instead of a second, billed one.
/// 32 lowercase hex characters (128 bits of SHA-256).
pub fn idempotency_token(template_arn: &str, csr_der: &[u8], names: &str, ttl: Duration) -> String {
    let mut h = Sha256::new();
    for part in [
        b"meshid-pca-v1".as_slice(),
        template_arn.as_bytes(),
        csr_der,
        names.as_bytes(),
        &ttl.as_secs().to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let token = hex::encode(&h.finalize()[..16]);
    debug_assert!(token.len() <= MAX_IDEMPOTENCY_TOKEN_LEN);
    token
}

/// Key for coalescing concurrent requests: same names, same key, same lifetime.
pub fn coalescing_key(profile: &LeafProfile, spki_der: &[u8], ttl: Duration) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        profile_names(profile).as_bytes(),
        spki_der,
        &ttl.as_secs().to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize()
}

/// A canonical text of the names a profile certifies (for hashing).
fn profile_names(profile: &LeafProfile) -> String {
    match profile {
        LeafProfile::Workload(id) => format!("workload {id}"),
        LeafProfile::Server { hosts, spiffe } => {
            let spiffe = spiffe.as_ref().map(|s| s.to_string()).unwrap_or_default();
            format!("server {} {spiffe}", hosts.join(","))
        }
    }
}

/// One GeneralName of a subjectAltName.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanName {
    /// uniformResourceIdentifier `[6] IA5String`.
    Uri(String),
    /// dNSName `[2] IA5String`.
    Dns(String),
    /// iPAddress `[7] OCTET STRING`.
    Ip(std::net::IpAddr),
}

/// DER of a subjectAltName extension value: `SEQUENCE OF GeneralName`, written with yasna (the
/// DER writer rcgen uses for its own SANs). A name that is not ASCII (which no SPIFFE ID is, and
/// PCA refuses) keeps its UTF-8 bytes under its tag rather than failing.
pub fn san_der(names: &[SanName]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for name in names {
                match name {
                    SanName::Uri(u) => write_ia5(w.next(), 6, u),
                    SanName::Dns(d) => write_ia5(w.next(), 2, d),
                    SanName::Ip(ip) => {
                        let octets = match ip {
                            std::net::IpAddr::V4(a) => a.octets().to_vec(),
                            std::net::IpAddr::V6(a) => a.octets().to_vec(),
                        };
                        w.next().write_tagged_implicit(yasna::Tag::context(7), |w| {
                            w.write_bytes(&octets)
                        });
                    }
                }
            }
        })
    })
}

/// `[tag] IMPLICIT IA5String`.
fn write_ia5(w: yasna::DERWriter<'_>, tag: u64, text: &str) {
    w.write_tagged_implicit(yasna::Tag::context(tag), |w| {
        if text.is_ascii() {
            w.write_ia5_string(text)
        } else {
            w.write_bytes(text.as_bytes())
        }
    });
}

/// The subject CN and SAN names a profile gets (the same as the local signer's
/// [`crate::identity::leaf_params`]).
fn names(profile: &LeafProfile) -> (Option<String>, Vec<SanName>) {
    match profile {
        LeafProfile::Workload(id) => (None, vec![SanName::Uri(id.to_string())]),
        LeafProfile::Server { hosts, spiffe } => {
            let mut sans: Vec<SanName> = hosts
                .iter()
                .map(|h| match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanName::Ip(ip),
                    Err(_) => SanName::Dns(h.clone()),
                })
                .collect();
            if let Some(id) = spiffe {
                sans.push(SanName::Uri(id.to_string()));
            }
            let cn = hosts
                .iter()
                .find(|h| h.parse::<std::net::IpAddr>().is_err())
                .cloned();
            (cn, sans)
        }
    }
}

/// `ApiPassthrough` for a leaf: the subject `O=<organization>` (plus `CN=<host>` for a server
/// certificate), never the CSR's; KU digitalSignature, plus keyEncipherment for an RSA key only
/// (as [`crate::identity::key_usages`]); EKU serverAuth + clientAuth; the SAN as a custom
/// extension (PCA's own SubjectAlternativeNames field is always non-critical), critical for
/// workloads, whose identity is the SAN alone (as for the local signer's empty-subject leaves,
/// RFC 5280 §4.2.1.6).
pub fn leaf_passthrough(
    profile: &LeafProfile,
    organization: &str,
    rsa_key: bool,
) -> ApiPassthrough {
    let (cn, sans) = names(profile);
    let critical = cn.is_none();
    ApiPassthrough {
        subject: Subject {
            organization: organization.to_owned(),
            common_name: cn,
        },
        key_usage: KeyUsage {
            digital_signature: true,
            key_encipherment: rsa_key,
        },
        extended_key_usage: vec![ExtendedKeyUsage::ServerAuth, ExtendedKeyUsage::ClientAuth],
        custom_extensions: vec![CustomExtension {
            object_identifier: SAN_OID.to_owned(),
            value_base64: base64::engine::general_purpose::STANDARD.encode(san_der(&sans)),
            critical,
        }],
    }
}

/// PEM-encodes a DER CSR.
pub fn csr_pem(csr_der: &[u8]) -> Vec<u8> {
    cert_to_pem(csr_der)
        .replace("CERTIFICATE-----", "CERTIFICATE REQUEST-----")
        .into_bytes()
}

/// The `IssueCertificate` request for a leaf; `organization` is the subject's O.
pub fn leaf_issue_request(
    ca_arn: &str,
    signing_algorithm: &'static str,
    profile: &LeafProfile,
    organization: &str,
    csr_der: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> IssueRequest {
    IssueRequest {
        ca_arn: ca_arn.to_owned(),
        csr_pem: csr_pem(csr_der),
        template_arn: LEAF_TEMPLATE_ARN,
        signing_algorithm,
        validity: validity(now, ttl),
        idempotency_token: idempotency_token(
            LEAF_TEMPLATE_ARN,
            csr_der,
            &format!("O={organization} {}", profile_names(profile)),
            ttl,
        ),
        api_passthrough: Some(leaf_passthrough(
            profile,
            organization,
            csr_key_is_rsa(csr_der),
        )),
    }
}

/// Whether the key of the DER CSR `csr_der` is RSA (false when it does not parse).
fn csr_key_is_rsa(csr_der: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::certification_request::X509CertificationRequest::from_der(csr_der).is_ok_and(
        |(_, csr)| crate::identity::is_rsa_key(csr.certification_request_info.subject_pki.raw),
    )
}

/// A fresh ECDSA P-256 key for meshid's intermediate and its CSR (DER), subject
/// `O=<trust domain>, CN=meshid intermediate`.
pub fn intermediate_csr(trust_domain: &str) -> Result<(KeyPair, Vec<u8>), PcaError> {
    let key = KeyPair::generate().map_err(|e| PcaError::Local(e.to_string()))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    p.distinguished_name
        .push(DnType::CommonName, "meshid intermediate");
    let csr = p
        .serialize_request(&key)
        .map_err(|e| PcaError::Local(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// The `IssueCertificate` request for meshid's intermediate. The token includes the key, so a
/// new key always gets a new certificate.
pub fn intermediate_issue_request(
    ca_arn: &str,
    signing_algorithm: &'static str,
    csr_der: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> IssueRequest {
    IssueRequest {
        ca_arn: ca_arn.to_owned(),
        csr_pem: csr_pem(csr_der),
        template_arn: INTERMEDIATE_TEMPLATE_ARN,
        signing_algorithm,
        validity: validity(now, ttl),
        idempotency_token: idempotency_token(INTERMEDIATE_TEMPLATE_ARN, csr_der, "", ttl),
        api_passthrough: None,
    }
}

/// The roots of the PCA hierarchy from `GetCertificateAuthorityCertificate`: the last
/// certificate of Certificate + CertificateChain, which must be self-signed.
pub fn root_of(ca: &CertificateAndChain) -> Result<CertificateDer<'static>, PcaError> {
    let mut all = parse_certs(&ca.certificate)
        .map_err(|e| PcaError::InvalidCertificate(format!("CA certificate: {e}")))?;
    if let Some(chain) = &ca.chain {
        all.extend(
            parse_certs(chain)
                .map_err(|e| PcaError::InvalidCertificate(format!("CA chain: {e}")))?,
        );
    }
    let root = all
        .pop()
        .ok_or_else(|| PcaError::InvalidCertificate("no CA certificate in the response".into()))?;
    let (_, cert) = X509Certificate::from_der(root.as_ref())
        .map_err(|e| PcaError::InvalidCertificate(format!("CA root: {e}")))?;
    if cert.subject() != cert.issuer() || cert.verify_signature(None).is_err() {
        return Err(PcaError::InvalidCertificate(
            "the last certificate of the CA chain is not a self-signed root".into(),
        ));
    }
    Ok(root)
}

/// An issued certificate split for [`crate::signer::IssuedChain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitChain {
    /// The certificate, PEM.
    pub leaf_pem: String,
    /// Its issuers up to (excluding) any of `roots`, PEM each.
    pub intermediates_pem: Vec<String>,
    /// Serial, lowercase hex.
    pub serial_hex: String,
    /// Not before.
    pub not_before: OffsetDateTime,
    /// Not after.
    pub not_after: OffsetDateTime,
}

/// Splits `GetCertificate`'s Certificate + CertificateChain into leaf and intermediates,
/// dropping the roots (clients get those from the trust bundle).
pub fn split_chain(
    got: &CertificateAndChain,
    roots: &[CertificateDer<'static>],
) -> Result<SplitChain, PcaError> {
    let leaf = parse_certs(&got.certificate)
        .map_err(|e| PcaError::InvalidCertificate(format!("certificate: {e}")))?;
    let leaf = &leaf[0];
    let chain = match &got.chain {
        Some(c) => parse_certs(c)
            .map_err(|e| PcaError::InvalidCertificate(format!("certificate chain: {e}")))?,
        None => Vec::new(),
    };
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| PcaError::InvalidCertificate(format!("certificate: {e}")))?;
    Ok(SplitChain {
        leaf_pem: cert_to_pem(leaf),
        intermediates_pem: chain
            .iter()
            .filter(|c| !roots.contains(c))
            .map(|c| cert_to_pem(c))
            .collect(),
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;
    use x509_parser::extensions::{GeneralName, SubjectAlternativeName};

    fn workload() -> LeafProfile {
        LeafProfile::Workload(SpiffeId::for_service_account("td", "ns", "sa").unwrap())
    }

    #[test]
    fn the_signing_algorithm_follows_the_ca_key() {
        assert_eq!(
            signing_algorithm("EC_prime256v1").unwrap(),
            "SHA256WITHECDSA"
        );
        assert_eq!(
            signing_algorithm("EC_secp384r1").unwrap(),
            "SHA384WITHECDSA"
        );
        assert_eq!(signing_algorithm("RSA_2048").unwrap(), "SHA256WITHRSA");
        assert_eq!(signing_algorithm("RSA_4096").unwrap(), "SHA256WITHRSA");
        assert!(matches!(
            signing_algorithm("ML_DSA_65"),
            Err(PcaError::UnsupportedKeyAlgorithm(_))
        ));
    }

    #[test]
    fn whole_days_are_relative_and_anything_shorter_is_an_absolute_time() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(
            validity(now, Duration::from_secs(2 * DAY)),
            Validity {
                kind: ValidityKind::Days,
                value: 2
            }
        );
        assert_eq!(
            validity(now, Duration::from_secs(12 * 3600)),
            Validity {
                kind: ValidityKind::Absolute,
                value: 1_700_000_000 + 12 * 3600
            }
        );
        assert_eq!(
            validity(now, Duration::from_secs(DAY + 60)),
            Validity {
                kind: ValidityKind::Absolute,
                value: 1_700_000_000 + DAY as i64 + 60
            }
        );
        assert_eq!(
            validity(now, Duration::from_millis(1500)).value,
            1_700_000_002
        );
    }

    #[test]
    fn the_idempotency_token_is_stable_short_and_changes_with_any_input() {
        let t = idempotency_token(LEAF_TEMPLATE_ARN, b"csr", "n", Duration::from_secs(60));
        assert_eq!(
            t,
            idempotency_token(LEAF_TEMPLATE_ARN, b"csr", "n", Duration::from_secs(60))
        );
        assert!(t.len() <= MAX_IDEMPOTENCY_TOKEN_LEN);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        for other in [
            idempotency_token(LEAF_TEMPLATE_ARN, b"csr2", "n", Duration::from_secs(60)),
            idempotency_token(LEAF_TEMPLATE_ARN, b"csr", "m", Duration::from_secs(60)),
            idempotency_token(LEAF_TEMPLATE_ARN, b"csr", "n", Duration::from_secs(61)),
            idempotency_token(
                INTERMEDIATE_TEMPLATE_ARN,
                b"csr",
                "n",
                Duration::from_secs(60),
            ),
            // Length-prefixed parts: moving a byte between fields changes the token.
            idempotency_token(LEAF_TEMPLATE_ARN, b"cs", "rn", Duration::from_secs(60)),
        ] {
            assert_ne!(t, other);
        }
    }

    /// One name of each kind, a DNS name long enough to need a two-byte DER length.
    fn san_names() -> [SanName; 4] {
        [
            SanName::Uri("spiffe://td/ns/a/sa/b".into()),
            SanName::Dns("x".repeat(200)),
            SanName::Ip("127.0.0.1".parse().unwrap()),
            SanName::Ip("::1".parse().unwrap()),
        ]
    }

    #[test]
    fn the_san_der_is_byte_for_byte_the_one_rcgen_writes() {
        let names = san_names();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()),
            rcgen::SanType::DnsName("x".repeat(200).try_into().unwrap()),
            rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
            rcgen::SanType::IpAddress("::1".parse().unwrap()),
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == SAN_OID)
            .unwrap();
        assert_eq!(san_der(&names), ext.value);
    }

    #[test]
    fn the_san_der_parses_back_to_the_same_names() {
        let names = san_names();
        let der = san_der(&names);
        let (rest, san) = SubjectAlternativeName::from_der(&der).unwrap();
        assert!(rest.is_empty());
        assert_eq!(san.general_names.len(), 4);
        assert_eq!(
            san.general_names[0],
            GeneralName::URI("spiffe://td/ns/a/sa/b")
        );
        assert!(matches!(san.general_names[1], GeneralName::DNSName(d) if d.len() == 200));
        assert_eq!(
            san.general_names[2],
            GeneralName::IPAddress(&[127, 0, 0, 1])
        );
        assert!(matches!(san.general_names[3], GeneralName::IPAddress(a) if a.len() == 16));
    }

    #[test]
    fn a_workload_leaf_request_carries_our_policy_and_a_critical_uri_san() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let req = leaf_issue_request(
            "arn:ca",
            "SHA256WITHECDSA",
            &workload(),
            "td",
            b"\x30\x00",
            Duration::from_secs(3600),
            now,
        );
        assert_eq!(req.template_arn, LEAF_TEMPLATE_ARN);
        assert!(
            std::str::from_utf8(&req.csr_pem)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----\n")
        );
        let pt = req.api_passthrough.unwrap();
        assert_eq!(
            pt.subject,
            Subject {
                organization: "td".into(),
                common_name: None
            }
        );
        assert!(pt.key_usage.digital_signature && !pt.key_usage.key_encipherment);
        assert_eq!(
            pt.extended_key_usage,
            vec![ExtendedKeyUsage::ServerAuth, ExtendedKeyUsage::ClientAuth]
        );
        let [san] = pt.custom_extensions.as_slice() else {
            panic!("one custom extension")
        };
        assert_eq!(san.object_identifier, "2.5.29.17");
        assert!(san.critical);
        let der = base64::engine::general_purpose::STANDARD
            .decode(&san.value_base64)
            .unwrap();
        // SEQUENCE { [6] "spiffe://td/ns/ns/sa/sa" }
        let uri = b"spiffe://td/ns/ns/sa/sa";
        let mut want = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
        want.extend_from_slice(uri);
        assert_eq!(der, want);
    }

    #[test]
    fn a_server_leaf_request_has_a_common_name_and_a_non_critical_san() {
        let profile = LeafProfile::Server {
            hosts: vec!["10.0.0.1".into(), "meshid.svc".into()],
            spiffe: None,
        };
        let pt = leaf_passthrough(&profile, "td", true);
        assert!(pt.key_usage.key_encipherment);
        assert_eq!(pt.subject.organization, "td");
        assert_eq!(pt.subject.common_name.as_deref(), Some("meshid.svc"));
        assert!(!pt.custom_extensions[0].critical);
    }

    #[test]
    fn the_subject_and_san_sent_to_pca_come_from_policy_whatever_the_csr_says() {
        // A CSR choosing a hostname-like CN and a DNS SAN: with an APIPassthrough template PCA
        // copies the CSR's subject and SAN unless ApiPassthrough gives them, so both must be sent.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["internal-db.corp".to_owned()]).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "internal-db.corp");
        let csr = p.serialize_request(&key).unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let req = leaf_issue_request(
            "arn:ca",
            "SHA256WITHECDSA",
            &workload(),
            "td",
            csr.der(),
            Duration::from_secs(3600),
            now,
        );
        let pt = req.api_passthrough.unwrap();
        assert_eq!(pt.subject.organization, "td");
        assert_eq!(pt.subject.common_name, None);
        let [san] = pt.custom_extensions.as_slice() else {
            panic!("one custom extension")
        };
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&san.value_base64)
                .unwrap(),
            san_der(&[SanName::Uri("spiffe://td/ns/ns/sa/sa".into())])
        );
    }
}
