//! Signers turn an accepted request into a certificate chain. The server depends only on the
//! [`Signer`] trait; the local (in-process CA key) signer lives here, AWS Private CA elsewhere.

#[cfg(feature = "server")]
pub mod aws_pca;
mod local;

use futures::future::BoxFuture;
use std::time::Duration;

use time::OffsetDateTime;

use crate::identity::LeafProfile;

#[cfg(feature = "server")]
pub use aws_pca::{AwsPcaOptions, PcaMode};
pub use local::{LocalSigner, LocalSignerFiles};

/// What to sign: policy has already been applied.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// The kind of certificate and its names.
    pub profile: LeafProfile,
    /// DER SubjectPublicKeyInfo to certify.
    pub spki_der: Vec<u8>,
    /// Lifetime from now (the signer may shorten it to fit inside its CA's validity).
    pub ttl: Duration,
    /// Clock-skew allowance: `notBefore` is backdated by the smaller of this and a tenth of
    /// the lifetime ([`crate::identity::backdate`]). AWS Private CA in direct mode sets its
    /// own `notBefore` and ignores it.
    pub max_backdate: Duration,
    /// The DER PKCS#10 request the key came from, when there is one. Signers that delegate
    /// to an upstream CA needing proof of possession (AWS Private CA) require it; the local
    /// signer ignores it. Policy has already been applied: only its key may be certified.
    pub csr_der: Option<Vec<u8>>,
}

impl SignRequest {
    /// A request for a key generated in this process, with a CSR signed by that key naming the
    /// profile's subject and SANs, so that every signer (AWS Private CA in direct mode needs
    /// the CSR) can use it, backdated by at most [`crate::identity::DEFAULT_MAX_BACKDATE`].
    /// Errors with [`SignerError::Sign`] if the CSR cannot be encoded.
    pub fn for_key(
        profile: LeafProfile,
        key: &rcgen::KeyPair,
        ttl: Duration,
    ) -> Result<Self, SignerError> {
        let spki_der = rcgen::PublicKeyData::subject_public_key_info(key);
        let max_backdate = crate::identity::DEFAULT_MAX_BACKDATE;
        let policy = crate::identity::leaf_params(
            &profile,
            &spki_der,
            OffsetDateTime::now_utc(),
            ttl,
            max_backdate,
        );
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = policy.distinguished_name;
        params.subject_alt_names = policy.subject_alt_names;
        let csr = params.serialize_request(key).map_err(SignerError::Sign)?;
        Ok(Self {
            profile,
            spki_der,
            ttl,
            max_backdate,
            csr_der: Some(csr.der().to_vec()),
        })
    }
}

/// An issued certificate with the intermediates needed to reach a root.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// The leaf, PEM.
    pub leaf_pem: String,
    /// Intermediates from the leaf's issuer upwards, PEM each, excluding the root.
    pub intermediates_pem: Vec<String>,
    /// Serial number of the leaf, lowercase hex.
    pub serial_hex: String,
    /// Expiry of the leaf.
    pub not_after: OffsetDateTime,
    /// Who made the leaf's signature: decides how much of the chain the server re-verifies.
    pub provenance: Provenance,
}

/// Who produced a leaf's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Signed in this process with a key that was checked, when it was loaded, to match the
    /// public key of the first certificate of `issuer_path`. The leaf's signature is therefore
    /// known good; what can still go wrong is the path from that issuer to the current roots,
    /// which the server checks (and caches per trust bundle).
    InProcess {
        /// The signing key's certificate, then the intermediates above it (DER), shared by
        /// every leaf the signer issues.
        issuer_path: std::sync::Arc<[rustls_pki_types::CertificateDer<'static>]>,
    },
    /// Returned by an upstream CA (AWS Private CA in direct mode): every signature in the
    /// chain is verified, for every certificate.
    Upstream,
}

/// A signer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// A CA file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file could not be written (self-generated root).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CA material is unusable (wrong format, key does not match, not a CA, expired).
    #[error("invalid CA material: {0}")]
    InvalidCa(String),
    /// A certificate of the signing CA's path cannot issue certificates: certificate 0 is the
    /// signing CA, 1.. the `--ca-chain` intermediates in order.
    #[error(
        "CA certificate {index} (0 = signing CA, then the CA chain) cannot issue certificates: {source}"
    )]
    CaCertificate {
        /// Position in the issuer path.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: crate::trust::ValidationError,
    },
    /// A certificate signed with the CA does not validate through its path to its roots.
    #[error("the signing CA's path does not validate against its roots: {0}")]
    CaPath(#[source] crate::trust::ValidationError),
    /// The public key to certify could not be used.
    #[error("unusable public key: {0}")]
    PublicKey(#[source] rcgen::Error),
    /// Building or signing the certificate failed.
    #[error("signing failed: {0}")]
    Sign(#[source] rcgen::Error),
    /// An upstream CA (e.g. AWS Private CA) is unavailable or throttling.
    #[error("upstream CA unavailable: {0}")]
    Unavailable(String),
    /// AWS Private CA refused a request or returned something unusable (not retryable).
    #[cfg(feature = "server")]
    #[error("AWS Private CA: {0}")]
    AwsPca(#[source] aws_pca::PcaError),
}

/// Issues certificates. Implementations must never copy anything from the CSR but the key.
pub trait Signer: Send + Sync {
    /// A short name for logs and metrics, e.g. `local`.
    fn name(&self) -> &'static str;

    /// The root certificates (PEM) that chains from this signer end in.
    fn trust_anchors_pem(&self) -> Vec<String>;

    /// Signs `req`. Errors: [`SignerError::PublicKey`], [`SignerError::Sign`],
    /// [`SignerError::Unavailable`].
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<IssuedChain, SignerError>>;
}
