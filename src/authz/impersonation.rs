//! The one question the CreateCertificate handler asks about impersonation.

use super::AuthzError;
use crate::authn::Caller;
use crate::identity::SpiffeId;
use futures::future::BoxFuture;

/// Decides whether an authenticated caller (ztunnel) may obtain a certificate for `target`.
/// The CreateCertificate handler consumes it; [`NodeAuthorizer`](super::NodeAuthorizer) (the
/// Kubernetes node co-location check) implements it.
pub trait ImpersonationAuthorizer: Send + Sync {
    /// `Ok(())` to allow; [`AuthzError::Denied`] to deny (the reason is logged, not returned);
    /// [`AuthzError::Unavailable`] when the check could not be made (answered `UNAVAILABLE`).
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        target: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthzError>>;
}
