//! Authorization: may an authenticated [`Caller`](crate::authn::Caller) obtain a certificate
//! for another identity? The CreateCertificate handler depends on the
//! [`ImpersonationAuthorizer`] trait only; [`NodeAuthorizer`] implements it for ztunnel (node
//! co-location, checked against the apiserver). Denials are typed ([`Denial`]) and an
//! unreachable apiserver is [`AuthzError::Unavailable`], never a denial.
//!
//! Layering: `authz` sits on `authn` (the caller it authorizes, the apiserver call limiter);
//! `server` depends on both, neither depends on `server`.

mod error;
mod impersonation;
mod node;

pub use error::{AuthzError, Denial};
pub use impersonation::ImpersonationAuthorizer;
pub use node::{NodeAuthorizer, parse_trusted_accounts};
