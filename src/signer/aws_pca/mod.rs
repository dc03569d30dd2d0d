//! The AWS Private CA signer, in two modes:
//!
//! - **direct**: every certificate is issued by PCA (`IssueCertificate` with the
//!   `BlankEndEntityCertificate_APIPassthrough` template and our policy in `ApiPassthrough`,
//!   then `GetCertificate`);
//! - **intermediate**: PCA issues meshid a short-lived subordinate CA certificate
//!   (`SubordinateCACertificate_PathLen0`), meshid signs leaves locally with it and renews it
//!   well before it expires.
//!
//! PCA is reached only through [`PcaApi`] (the four calls we make), wrapped in a rate limit,
//! retries with jittered backoff and metrics ([`upstream`]). See `docs/aws-pca.md`.

pub mod api;
mod check;
mod direct;
mod error;
#[cfg(test)]
mod fake;
pub(crate) mod intermediate;
mod limit;
mod metrics;
mod options;
mod request;
mod sdk;
mod setup;
#[cfg(test)]
mod tests;
mod upstream;

pub use api::{ApiError, PcaApi};
pub use check::LeafMismatch;
pub use error::PcaError;
pub(crate) use intermediate::IntermediateRenewal;
pub use metrics::PcaMetrics;
pub use options::{AwsPcaOptions, CaArn, PcaMode};
pub(crate) use options::{
    DEFAULT_INTERMEDIATE_TTL, DEFAULT_MAX_PENDING, DEFAULT_TPS, parse_ca_arn,
};
pub use sdk::SdkPcaClient;
pub(crate) use setup::connect;
pub use setup::{Started, start};
