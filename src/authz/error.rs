//! Why an impersonation was refused, or could not be decided.

use crate::authn::BackendError;

/// Why an impersonation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// The caller is not one of the trusted node accounts.
    #[error("caller is not a trusted node agent")]
    NotTrusted,
    /// The caller's token is not bound to a pod, so there is no node to check.
    #[error("caller token is not bound to a pod")]
    NotPodBound,
    /// The caller's pod no longer exists.
    #[error("caller pod not found")]
    PodNotFound,
    /// The pod of that name has another UID than the one in the token.
    #[error("caller pod UID does not match its token")]
    PodUidMismatch,
    /// The caller's pod runs as another service account.
    #[error("caller pod runs as another service account")]
    ServiceAccountMismatch,
    /// The caller's pod has no node.
    #[error("caller pod is not scheduled")]
    NotScheduled,
    /// No running pod of the requested identity is on the caller's node.
    #[error("no running pod of {target} on node {node}")]
    NotOnNode {
        /// The requested identity.
        target: String,
        /// The caller's node.
        node: String,
    },
}

/// The outcome of a refused impersonation check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// The caller may not impersonate the identity.
    #[error("impersonation denied: {0}")]
    Denied(#[from] Denial),
    /// The check could not be made (apiserver unreachable, forbidden, overloaded). Fails closed.
    #[error("impersonation check unavailable: {0}")]
    Unavailable(#[from] BackendError),
}
