//! Every reason a CreateCertificate call is refused, and its conversion to a gRPC status
//! (the only place server errors become `tonic::Status`).

use tonic::{Code, Status};

use crate::authn::AuthnError;
use crate::identity::CsrRejection;
use crate::signer::SignerError;
use crate::trust::ValidationError;

/// Why CreateCertificate did not issue a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Authentication failed or could not be done.
    #[error("authentication: {0}")]
    Authn(#[from] AuthnError),
    /// The `clusterid` header names another cluster.
    #[error("clusterid {got:?} does not match this cluster")]
    ClusterMismatch {
        /// The header value.
        got: String,
    },
    /// `metadata.ImpersonatedIdentity` was set and the caller may not impersonate it.
    #[error("impersonation denied: {0}")]
    ImpersonationDenied(String),
    /// The CSR broke the issuance policy.
    #[error("csr: {0}")]
    Csr(#[from] CsrRejection),
    /// The signer failed.
    #[error("signer: {0}")]
    Signer(#[from] SignerError),
    /// The issued chain did not verify against the current roots (a CA misconfiguration).
    #[error("issued chain does not verify: {0}")]
    ChainVerify(#[from] ValidationError),
}

impl Rejection {
    /// A short, stable label for metrics and audit logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Authn(e) => e.reason(),
            Self::ClusterMismatch { .. } => "cluster_mismatch",
            Self::ImpersonationDenied(_) => "impersonation_denied",
            Self::Csr(e) => e.reason(),
            Self::Signer(SignerError::Unavailable(_)) => "signer_unavailable",
            Self::Signer(_) => "signer_error",
            Self::ChainVerify(_) => "chain_verify_failed",
        }
    }

    /// The status returned to the caller. Messages describe the caller's own input only; no
    /// backend detail (apiserver errors, file paths, key problems) leaks.
    pub fn to_status(&self) -> Status {
        match self {
            Self::Authn(AuthnError::Unavailable(_)) => Status::new(
                Code::Unavailable,
                "authentication backend unavailable, retry later",
            ),
            Self::Authn(
                e @ (AuthnError::MissingToken
                | AuthnError::Rejected
                | AuthnError::NotServiceAccount),
            ) => Status::new(Code::Unauthenticated, e.to_string()),
            Self::Authn(e) => Status::new(Code::PermissionDenied, e.to_string()),
            Self::ClusterMismatch { .. } => Status::new(
                Code::PermissionDenied,
                "clusterid does not match this cluster",
            ),
            Self::ImpersonationDenied(_) => Status::new(
                Code::PermissionDenied,
                "not authorized to impersonate this identity",
            ),
            Self::Csr(e @ CsrRejection::IdentityMismatch { .. }) => {
                Status::new(Code::PermissionDenied, e.to_string())
            }
            Self::Csr(e) => Status::new(Code::InvalidArgument, e.to_string()),
            Self::Signer(SignerError::Unavailable(_)) => {
                Status::new(Code::Unavailable, "signer unavailable, retry later")
            }
            Self::Signer(SignerError::PublicKey(_)) => {
                Status::new(Code::InvalidArgument, "unusable public key")
            }
            Self::Signer(_) | Self::ChainVerify(_) => {
                Status::new(Code::Internal, "certificate issuance failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_documented_codes_and_hide_backend_detail() {
        let cases: Vec<(Rejection, Code)> = vec![
            (AuthnError::MissingToken.into(), Code::Unauthenticated),
            (AuthnError::Rejected.into(), Code::Unauthenticated),
            (
                AuthnError::Unavailable("dial tcp 10.0.0.1: refused".into()).into(),
                Code::Unavailable,
            ),
            (
                Rejection::ClusterMismatch { got: "x".into() },
                Code::PermissionDenied,
            ),
            (CsrRejection::Empty.into(), Code::InvalidArgument),
            (
                CsrRejection::IdentityMismatch {
                    requested: "a".into(),
                    expected: "b".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                SignerError::InvalidCa("/etc/secret/key.pem broken".into()).into(),
                Code::Internal,
            ),
            (
                SignerError::Unavailable("ThrottlingException".into()).into(),
                Code::Unavailable,
            ),
        ];
        for (rejection, code) in cases {
            let status = rejection.to_status();
            assert_eq!(status.code(), code, "{rejection}");
            assert!(
                !status.message().contains("10.0.0.1") && !status.message().contains("/etc/secret")
            );
        }
    }
}
