//! Every reason a CreateCertificate call is refused, and its conversion to a gRPC status
//! (the only place server errors become `tonic::Status`).

use std::time::Duration;

use tonic::{Code, Status};

use crate::authn::{AuthnError, BackendError};
use crate::authz::AuthzError;
use crate::identity::CsrRejection;
use crate::signer::SignerError;
use crate::signer::aws_pca::PcaError;
use crate::trust::ValidationError;

/// Why CreateCertificate did not issue a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Authentication failed or could not be done.
    #[error("authentication: {0}")]
    Authn(#[from] AuthnError),
    /// More than one `authorization` header.
    #[error("more than one authorization header")]
    MultipleAuthorization,
    /// The bearer token is longer than any service-account token.
    #[error("bearer token of {len} bytes exceeds {max} bytes")]
    TokenTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `metadata.ImpersonatedIdentity` was set and the caller may not impersonate it.
    #[error("impersonation denied: {0}")]
    ImpersonationDenied(String),
    /// The impersonation check could not be made (apiserver unreachable or overloaded).
    #[error("impersonation check unavailable: {0}")]
    ImpersonationUnavailable(#[source] BackendError),
    /// The CSR broke the issuance policy.
    #[error("csr: {0}")]
    Csr(#[from] CsrRejection),
    /// The signer failed.
    #[error("signer: {0}")]
    Signer(#[from] SignerError),
    /// The issued chain did not verify against the current roots (a CA misconfiguration).
    #[error("issued chain does not verify: {0}")]
    ChainVerify(#[from] ValidationError),
    /// The identity (and pod) used up its issuance rate limit.
    #[error("issuance rate limit exceeded for {identity}, next certificate in {}s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// The identity to be certified.
        identity: String,
        /// Time until the next certificate is allowed.
        retry_after: Duration,
    },
}

/// Metadata key of the retry hint on `RESOURCE_EXHAUSTED`, in milliseconds: gRPC's server
/// pushback (gRFC A6), honoured by gRPC clients that have a retry policy.
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// Whole seconds to wait, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

impl From<AuthzError> for Rejection {
    fn from(e: AuthzError) -> Self {
        match e {
            AuthzError::Denied(denial) => Self::ImpersonationDenied(denial.to_string()),
            AuthzError::Unavailable(e) => Self::ImpersonationUnavailable(e),
        }
    }
}

impl Rejection {
    /// A short, stable label for metrics and audit logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Authn(e) => e.reason(),
            Self::MultipleAuthorization => "multiple_authorization",
            Self::TokenTooLarge { .. } => "token_too_large",
            Self::ImpersonationDenied(_) => "impersonation_denied",
            Self::ImpersonationUnavailable(_) => "impersonation_unavailable",
            Self::Csr(e) => e.reason(),
            Self::Signer(SignerError::Unavailable(_)) => "signer_unavailable",
            Self::Signer(SignerError::AwsPca(PcaError::LeafMismatch(_))) => {
                "upstream_leaf_mismatch"
            }
            Self::Signer(_) => "signer_error",
            Self::ChainVerify(_) => "chain_verify_failed",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// The status returned to the caller. Messages describe the caller's own input only; no
    /// backend detail (apiserver errors, file paths, key problems) leaks.
    pub fn to_status(&self) -> Status {
        match self {
            Self::Authn(AuthnError::Unavailable(BackendError::Overloaded)) => Status::new(
                Code::Unavailable,
                "too many authentications pending, retry later",
            ),
            Self::Authn(AuthnError::Unavailable(_)) | Self::ImpersonationUnavailable(_) => {
                Status::new(
                    Code::Unavailable,
                    "authentication backend unavailable, retry later",
                )
            }
            Self::Authn(
                e @ (AuthnError::MissingToken
                | AuthnError::Precheck(_)
                | AuthnError::Rejected
                | AuthnError::AudienceNotConfirmed
                | AuthnError::NotServiceAccount),
            ) => Status::new(Code::Unauthenticated, e.to_string()),
            Self::Authn(e) => Status::new(Code::PermissionDenied, e.to_string()),
            Self::MultipleAuthorization | Self::TokenTooLarge { .. } => {
                Status::new(Code::Unauthenticated, self.to_string())
            }
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
            Self::Signer(SignerError::AwsPca(PcaError::LeafMismatch(_))) => Status::new(
                Code::Internal,
                "certificate issuance failed: the upstream CA returned a certificate that \
                 differs from the request, and it was not served",
            ),
            Self::Signer(_) | Self::ChainVerify(_) => {
                Status::new(Code::Internal, "certificate issuance failed")
            }
            Self::RateLimited { retry_after, .. } => {
                let mut status = Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "certificate issuance rate limit for this identity exceeded, retry in {}s",
                        retry_after_secs(*retry_after)
                    ),
                );
                let ms = u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                if let Ok(value) = ms.to_string().parse() {
                    status.metadata_mut().insert(RETRY_PUSHBACK_MS, value);
                }
                status
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
                AuthnError::Unavailable(BackendError::Transport(
                    "dial tcp 10.0.0.1: refused".into(),
                ))
                .into(),
                Code::Unavailable,
            ),
            (
                AuthnError::Unavailable(BackendError::Overloaded).into(),
                Code::Unavailable,
            ),
            (
                AuthzError::Unavailable(BackendError::Transport("dial tcp 10.0.0.1".into())).into(),
                Code::Unavailable,
            ),
            (
                AuthzError::Denied(crate::authz::Denial::PodNotFound).into(),
                Code::PermissionDenied,
            ),
            (
                AuthnError::Precheck(crate::authn::PrecheckError::Malformed).into(),
                Code::Unauthenticated,
            ),
            (
                AuthnError::AudienceNotConfirmed.into(),
                Code::Unauthenticated,
            ),
            (AuthnError::UnknownCluster.into(), Code::PermissionDenied),
            (Rejection::MultipleAuthorization, Code::Unauthenticated),
            (
                Rejection::TokenTooLarge {
                    len: 100_000,
                    max: 16_384,
                },
                Code::Unauthenticated,
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
            (
                SignerError::AwsPca(PcaError::LeafMismatch(
                    crate::signer::aws_pca::LeafMismatch::Subject {
                        got: "CN=10.0.0.1".into(),
                        want: "O=td".into(),
                    },
                ))
                .into(),
                Code::Internal,
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

    #[test]
    fn a_rate_limited_request_gets_resource_exhausted_with_the_wait_in_seconds_and_milliseconds() {
        let status = Rejection::RateLimited {
            identity: "spiffe://td/ns/a/sa/b".into(),
            retry_after: Duration::from_millis(9_200),
        }
        .to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("retry in 10s"),
            "{}",
            status.message()
        );
        assert_eq!(status.metadata().get(RETRY_PUSHBACK_MS).unwrap(), "9200");
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
