//! The trust bundle: the set of roots that issued chains must end in, and that clients trust.

use rustls_pki_types::{CertificateDer, TrustAnchor};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::validate::{Usage, ValidatedPath, ValidationError, anchors, validate_with_anchors};
use crate::pem::{PemError, cert_to_pem, parse_certs};

/// A bundle of roots was unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The bundle PEM held no certificate, was malformed, or a root is not a usable trust
    /// anchor.
    #[error("invalid trust bundle: {0}")]
    InvalidBundle(String),
}

/// An immutable set of root certificates, with their trust anchors ready for validation.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    pem: String,
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        // The anchors and the PEM are derived from the roots.
        self.roots == other.roots
    }
}

impl Eq for TrustBundle {}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl TrustBundle {
    /// Parses a PEM bundle of one or more root certificates; duplicates are dropped.
    /// Errors: [`TrustError::InvalidBundle`].
    pub fn from_pem(pem: &str) -> Result<Self, TrustError> {
        let certs =
            parse_certs(pem).map_err(|e: PemError| TrustError::InvalidBundle(e.to_string()))?;
        Self::from_ders(certs)
    }

    /// Builds a bundle from DER roots; duplicates are dropped and the rest kept in one
    /// canonical order (sorted by DER).
    /// Errors: [`TrustError::InvalidBundle`] when there is none or one is not a certificate.
    pub fn from_ders(certs: Vec<CertificateDer<'static>>) -> Result<Self, TrustError> {
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        for cert in certs {
            X509Certificate::from_der(cert.as_ref()).map_err(|_| {
                TrustError::InvalidBundle("a root is not a valid certificate".into())
            })?;
            if !roots.contains(&cert) {
                roots.push(cert);
            }
        }
        if roots.is_empty() {
            return Err(TrustError::InvalidBundle("no roots".into()));
        }
        // One canonical order (by DER): the same roots are always the same PEM, so a replica
        // publishing them writes nothing when another one already did.
        roots.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let anchors = anchors(&roots).map_err(|e| TrustError::InvalidBundle(e.to_string()))?;
        let pem = roots.iter().map(|c| cert_to_pem(c)).collect();
        Ok(Self {
            roots,
            anchors,
            pem,
        })
    }

    /// The roots, in canonical (DER) order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The whole bundle as concatenated PEM (each block newline-terminated).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Whether `root` is one of the roots.
    pub fn contains(&self, root: &CertificateDer<'_>) -> bool {
        self.roots.iter().any(|r| r.as_ref() == root.as_ref())
    }

    /// The earliest expiry among the roots.
    pub fn earliest_expiry(&self) -> Option<OffsetDateTime> {
        self.roots
            .iter()
            .filter_map(|r| X509Certificate::from_der(r.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .min()
    }

    /// Validates `chain` (leaf first, then intermediates; the root may be left out) against
    /// these roots at `now` for `usage`: see [`super::validate_chain`], which this is, with the
    /// trust anchors built once per bundle. `ValidatedPath::root` indexes [`Self::roots`].
    pub fn validate(
        &self,
        chain: &[CertificateDer<'_>],
        now: OffsetDateTime,
        usage: Usage,
    ) -> Result<ValidatedPath, ValidationError> {
        validate_with_anchors(chain, &self.roots, &self.anchors, now, usage)
    }
}
