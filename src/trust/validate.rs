//! Certificate path validation: the one validator every chain in meshid goes through.
//!
//! Built on rustls-webpki (the validator rustls itself uses), which checks what Envoy's
//! BoringSSL checks on a path:
//! - every signature, with the algorithms in [`SIGNATURE_ALGORITHMS`];
//! - every certificate's validity at `now`;
//! - basicConstraints: issuers must be CA:TRUE, the end-entity certificate must not be, and no
//!   issuer's pathLenConstraint may be exceeded;
//! - critical extensions it does not understand are refused;
//! - extendedKeyUsage, on the end entity and on every issuer that carries one ([`Usage`]);
//! - name constraints on issuers.
//!
//! webpki ignores keyUsage, so this module adds BoringSSL's rule: an issuer that carries a
//! keyUsage extension must assert keyCertSign. The roots themselves are trust anchors: only
//! their subject, key and name constraints are used, as in every TLS stack.
//!
//! No DNS or IP name is checked here: meshid identities are SPIFFE URI SANs, checked by the
//! caller after the path is valid.

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use time::OffsetDateTime;
use webpki::aws_lc_rs as algs;
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The signature algorithms a path may use: those BoringSSL (Envoy) verifies in certificates.
/// ECDSA on P-256, P-384 and P-521 with SHA-256/384/512, RSA PKCS#1 v1.5 and RSA-PSS with
/// SHA-256/384/512 (2048 to 8192 bits), and Ed25519. SHA-1 and post-quantum signatures are
/// refused.
pub static SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    algs::ECDSA_P256_SHA256,
    algs::ECDSA_P256_SHA384,
    algs::ECDSA_P256_SHA512,
    algs::ECDSA_P384_SHA256,
    algs::ECDSA_P384_SHA384,
    algs::ECDSA_P384_SHA512,
    algs::ECDSA_P521_SHA256,
    algs::ECDSA_P521_SHA384,
    algs::ECDSA_P521_SHA512,
    algs::ED25519,
    algs::RSA_PKCS1_2048_8192_SHA256,
    algs::RSA_PKCS1_2048_8192_SHA384,
    algs::RSA_PKCS1_2048_8192_SHA512,
    algs::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    algs::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    algs::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    algs::RSA_PKCS1_3072_8192_SHA384,
    algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// id-kp-serverAuth (1.3.6.1.5.5.7.3.1), DER contents.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// id-kp-clientAuth (1.3.6.1.5.5.7.3.2), DER contents.
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// What the end-entity certificate is for. A certificate without extendedKeyUsage may be used
/// for anything (RFC 5280, and BoringSSL); one with it must list every purpose asked for, and
/// so must every issuer in the path that carries the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Usage {
    /// A TLS server certificate (serverAuth).
    ServerAuth,
    /// A TLS client certificate (clientAuth).
    ClientAuth,
    /// Both: a mesh workload's SVID, which Envoy presents as server and as client.
    ServerAndClientAuth,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ServerAuth => "serverAuth",
            Self::ClientAuth => "clientAuth",
            Self::ServerAndClientAuth => "serverAuth and clientAuth",
        })
    }
}

impl ExtendedKeyUsageValidator for Usage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let (mut any, mut server, mut client) = (false, false, false);
        for id in iter {
            let id = id?;
            any = true;
            server |= id == KeyPurposeId::new(EKU_SERVER_AUTH);
            client |= id == KeyPurposeId::new(EKU_CLIENT_AUTH);
        }
        let ok = !any
            || match self {
                Self::ServerAuth => server,
                Self::ClientAuth => client,
                Self::ServerAndClientAuth => server && client,
            };
        if ok {
            Ok(())
        } else {
            #[allow(deprecated)]
            Err(webpki::Error::RequiredEkuNotFound)
        }
    }
}

/// Why a chain was refused. Each reason is the first one found on the path webpki tried last;
/// `index` (position in the chain given, leaf = 0) is known only for certificates that could
/// not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The chain is empty.
    #[error("empty chain")]
    Empty,
    /// A certificate in the chain is not a well-formed X.509 certificate.
    #[error("certificate {index} in the chain is malformed")]
    Malformed {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// A root could not be used as a trust anchor.
    #[error("root {index} is not a usable trust anchor")]
    InvalidRoot {
        /// Position in the roots.
        index: usize,
    },
    /// No path leads from the chain to any of the roots (an issuer is missing or unknown).
    #[error("chain does not lead to a trusted root")]
    UnknownIssuer,
    /// A signature in the path does not verify with its issuer's key.
    #[error("a signature in the chain does not verify")]
    BadSignature,
    /// A certificate is signed with an algorithm that is not accepted, or does not fit the key.
    #[error("a certificate uses an unsupported signature algorithm")]
    UnsupportedSignatureAlgorithm,
    /// A certificate in the path has expired.
    #[error("a certificate in the chain has expired")]
    Expired,
    /// A certificate in the path is not valid yet.
    #[error("a certificate in the chain is not valid yet")]
    NotYetValid,
    /// An issuer is not a CA (no basicConstraints CA:TRUE).
    #[error("an issuer is not a CA (no basicConstraints CA:TRUE)")]
    NotCa,
    /// The end-entity certificate is a CA (basicConstraints CA:TRUE).
    #[error("the end-entity certificate is a CA (basicConstraints CA:TRUE)")]
    CaAsLeaf,
    /// An issuer's pathLenConstraint is exceeded.
    #[error("an issuer's path length constraint is exceeded")]
    PathLenExceeded,
    /// An issuer's keyUsage does not allow signing certificates (no keyCertSign).
    #[error("an issuer's keyUsage lacks keyCertSign")]
    NoKeyCertSign,
    /// The extendedKeyUsage of a certificate in the path does not allow the usage.
    #[error("extendedKeyUsage does not allow {usage}")]
    WrongUsage {
        /// What was asked for.
        usage: Usage,
    },
    /// A certificate carries a critical extension the validator does not understand.
    #[error("a certificate carries an unknown critical extension")]
    UnknownCriticalExtension,
    /// A name in the chain is outside an issuer's name constraints.
    #[error("a name violates an issuer's name constraints")]
    NameConstraintViolation,
    /// Any other reason webpki gave.
    #[error("chain refused: {0}")]
    Other(webpki::Error),
}

impl ValidationError {
    fn from_webpki(e: webpki::Error, usage: Usage, index: Option<usize>) -> Self {
        use webpki::Error as E;
        if let Some(index) = index
            && matches!(
                e,
                E::BadDer
                    | E::BadDerTime
                    | E::TrailingData(_)
                    | E::MalformedExtensions
                    | E::ExtensionValueInvalid
                    | E::InvalidCertValidity
                    | E::InvalidSerialNumber
            )
        {
            return Self::Malformed { index };
        }
        #[allow(deprecated)]
        match e {
            E::UnknownIssuer => Self::UnknownIssuer,
            E::InvalidSignatureForPublicKey => Self::BadSignature,
            E::UnsupportedSignatureAlgorithm
            | E::UnsupportedSignatureAlgorithmContext(_)
            | E::UnsupportedSignatureAlgorithmForPublicKey
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
            | E::SignatureAlgorithmMismatch => Self::UnsupportedSignatureAlgorithm,
            E::CertExpired { .. } => Self::Expired,
            E::CertNotValidYet { .. } => Self::NotYetValid,
            E::EndEntityUsedAsCa => Self::NotCa,
            E::CaUsedAsEndEntity => Self::CaAsLeaf,
            E::PathLenConstraintViolated => Self::PathLenExceeded,
            E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
                Self::WrongUsage { usage }
            }
            E::UnsupportedCriticalExtension => Self::UnknownCriticalExtension,
            E::NameConstraintViolation => Self::NameConstraintViolation,
            other => Self::Other(other),
        }
    }
}

/// What a successful validation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidatedPath {
    /// Index, in the roots given, of the root the path ends in.
    pub root: usize,
    /// How many intermediates the path used (the chain may have carried more).
    pub intermediates: usize,
}

/// The time as webpki counts it (whole seconds since the epoch; before 1970 counts as 1970).
fn unix_time(now: OffsetDateTime) -> UnixTime {
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
}

/// Trust anchors for `roots`, in order. Errors with [`ValidationError::InvalidRoot`].
pub(crate) fn anchors(
    roots: &[CertificateDer<'_>],
) -> Result<Vec<TrustAnchor<'static>>, ValidationError> {
    roots
        .iter()
        .enumerate()
        .map(|(index, r)| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|_| ValidationError::InvalidRoot { index })
        })
        .collect()
}

/// Validates `chain` (leaf first, then intermediates in any order; the root may be included or
/// left out) against `roots` at `now`, for `usage`. See the module docs for what is checked.
/// Errors: [`ValidationError`], one variant per reason.
pub fn validate_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: OffsetDateTime,
    usage: Usage,
) -> Result<ValidatedPath, ValidationError> {
    let anchors = anchors(roots)?;
    validate_with_anchors(chain, roots, &anchors, now, usage)
}

/// [`validate_chain`] with the anchors of `roots` already built.
pub(crate) fn validate_with_anchors(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: OffsetDateTime,
    usage: Usage,
) -> Result<ValidatedPath, ValidationError> {
    let (leaf, rest) = chain.split_first().ok_or(ValidationError::Empty)?;
    let leaf = EndEntityCert::try_from(leaf)
        .map_err(|e| ValidationError::from_webpki(e, usage, Some(0)))?;
    // Parse every intermediate up front, so that a broken one is refused (with its position)
    // even when another path exists.
    let mut intermediates = Vec::with_capacity(rest.len());
    for (i, der) in rest.iter().enumerate() {
        EndEntityCert::try_from(der)
            .map_err(|e| ValidationError::from_webpki(e, usage, Some(i + 1)))?;
        if !roots.contains(der) {
            intermediates.push(CertificateDer::from(der.as_ref()));
        }
    }
    let path = leaf
        .verify_for_usage(
            SIGNATURE_ALGORITHMS,
            anchors,
            &intermediates,
            unix_time(now),
            usage,
            None,
            None,
        )
        .map_err(|e| ValidationError::from_webpki(e, usage, None))?;
    let mut used = 0;
    for issuer in path.intermediate_certificates() {
        check_key_cert_sign(issuer.der().as_ref(), false)?;
        used += 1;
    }
    let root = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .unwrap_or_default();
    Ok(ValidatedPath {
        root,
        intermediates: used,
    })
}

/// Checks keyUsage on an issuer: it must assert keyCertSign when present (and, if `required`,
/// be present).
fn check_key_cert_sign(der: &[u8], required: bool) -> Result<(), ValidationError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| ValidationError::Malformed { index: 0 })?;
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        Ok(None) if !required => Ok(()),
        Ok(_) => Err(ValidationError::NoKeyCertSign),
        Err(_) => Err(ValidationError::Malformed { index: 0 }),
    }
}

/// Checks, on its own, a certificate meant to issue others (a signing CA or one of its
/// intermediates, checked when loaded): basicConstraints CA:TRUE, and a keyUsage extension
/// asserting keyCertSign (RFC 5280 requires it of CA certificates). Errors:
/// [`ValidationError::Malformed`] (index 0), [`ValidationError::NotCa`],
/// [`ValidationError::NoKeyCertSign`].
pub fn check_ca_certificate(der: &[u8]) -> Result<(), ValidationError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| ValidationError::Malformed { index: 0 })?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(ValidationError::NotCa);
    }
    check_key_cert_sign(der, true)
}
