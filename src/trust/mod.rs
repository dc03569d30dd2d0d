//! Trust: the bundle of roots, the one path validator every chain goes through, and the
//! server's bundle reload.
//!
//! - [`TrustBundle`]: one or more roots (current and next, so that a root can be rotated without
//!   downtime), published through a `tokio::sync::watch` channel as an `Arc<TrustBundle>` and
//!   only ever published after it parsed.
//! - [`validate_chain`] / [`TrustBundle::validate`]: path validation on rustls-webpki with the
//!   checks Envoy makes (see [`validate`]).
//! - [`IssuerPathCache`]: the last in-process issuer path that validated against a bundle.
//! - [`combine`] / [`reload_extra_roots`]: the server's bundle from its signer and
//!   `--extra-roots`.

mod bundle;
#[cfg(feature = "server")]
mod path_cache;
#[cfg(feature = "server")]
mod reload;
mod validate;

pub use bundle::{TrustBundle, TrustError};
#[cfg(feature = "server")]
pub(crate) use path_cache::IssuerPathCache;
#[cfg(feature = "server")]
pub(crate) use reload::{RELOAD_INTERVAL, channel, combine, reload_extra_roots};
pub use validate::{Usage, ValidatedPath, ValidationError};
pub(crate) use validate::{check_ca_certificate, validate_chain};

#[cfg(test)]
mod tests;
