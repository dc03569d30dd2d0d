//! The AWS Private CA signer's error type.

use super::api::{Api, ApiError};
use crate::signer::SignerError;

/// Why the AWS Private CA signer could not start or could not issue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PcaError {
    /// A PCA call failed (after retries, when it was retryable).
    #[error("{} on {arn}: {source}", .api.name())]
    Call {
        /// The operation.
        api: Api,
        /// The CA ARN.
        arn: String,
        /// The classified AWS error.
        #[source]
        source: ApiError,
    },
    /// The CA exists but cannot issue.
    #[error("certificate authority {arn} is {status}, not ACTIVE")]
    NotActive {
        /// The CA ARN.
        arn: String,
        /// Its status.
        status: String,
    },
    /// The CA's key algorithm has no signing algorithm meshid can use.
    #[error("unsupported CA key algorithm {0} (RSA and ECDSA CAs are supported)")]
    UnsupportedKeyAlgorithm(String),
    /// A short-lived-certificate-mode CA cannot issue certificates this long.
    #[error(
        "the CA is in short-lived certificate mode (at most 7 days) but {setting} is {requested}"
    )]
    TooLongForShortLivedMode {
        /// The setting asking for it.
        setting: &'static str,
        /// The requested lifetime, humanized.
        requested: String,
    },
    /// PCA returned a leaf that is not what meshid asked for (direct mode); it is not served.
    #[error("the certificate AWS Private CA returned differs from the request: {0}")]
    LeafMismatch(#[source] super::check::LeafMismatch),
    /// Direct mode puts the trust domain in the subject's O, which PCA limits to 64 characters.
    #[error(
        "--trust-domain {0:?} is longer than 64 characters, PCA's limit for the subject O that direct mode sets"
    )]
    TrustDomainTooLong(String),
    /// PCA returned something that is not a usable certificate or chain.
    #[error("unusable certificate: {0}")]
    InvalidCertificate(String),
    /// `GetCertificate` still said "in progress" when we gave up.
    #[error("certificate {certificate_arn} not issued after {polls} polls")]
    NotIssuedInTime {
        /// The certificate's ARN.
        certificate_arn: String,
        /// How often we asked.
        polls: u32,
    },
    /// Too many requests are already waiting for PCA.
    #[error("too many certificate requests waiting for AWS Private CA ({0} pending)")]
    QueueFull(usize),
    /// Direct mode needs the workload's CSR, and none was given.
    #[error("the request carries no CSR; AWS Private CA needs one")]
    CsrRequired,
    /// meshid's intermediate is expired, or expires sooner than the leaf floor, and renewing
    /// it keeps failing.
    #[error(
        "the PCA-issued intermediate expired (or expires within the leaf floor) and could not be renewed"
    )]
    IntermediateExpired,
    /// A local step failed (key generation, CSR encoding, building the intermediate signer).
    #[error("{0}")]
    Local(String),
}

impl PcaError {
    /// Whether a caller should retry later (maps to gRPC `UNAVAILABLE`).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Call { source, .. } => source.is_retryable(),
            Self::NotIssuedInTime { .. } | Self::QueueFull(_) | Self::IntermediateExpired => true,
            _ => false,
        }
    }
}

impl From<PcaError> for SignerError {
    fn from(e: PcaError) -> Self {
        if e.is_transient() {
            SignerError::Unavailable(e.to_string())
        } else {
            SignerError::AwsPca(e)
        }
    }
}
