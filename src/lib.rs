//! meshid: an mTLS certificate authority for service meshes.
//!
//! One binary, two roles:
//! - `meshid server` speaks Istio's CA API (`istio.v1.auth.IstioCertificateService`),
//!   authenticates callers with Kubernetes TokenReview, checks each CSR against the caller's
//!   identity and issues short-lived SPIFFE X.509 SVIDs through a pluggable [`signer::Signer`].
//! - `meshid agent` obtains an SVID from such a server and serves it to Envoy over SDS.
//!
//! The `server` Cargo feature (on by default) brings the server role, the quickstart and their
//! Kubernetes and AWS dependencies; without it the crate is the agent alone.
//!
//! See `docs/ARCHITECTURE.md` for the path of one CreateCertificate through these modules.
#![forbid(unsafe_code)]

pub mod agent;
#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
pub mod authn;
#[cfg(feature = "server")]
pub(crate) mod authz;
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub(crate) mod controller;
pub(crate) mod crypto;
pub mod identity;
pub mod pem;
pub mod proto;
#[cfg(feature = "server")]
pub mod quickstart;
pub mod schedule;
pub mod sds;
#[cfg(feature = "server")]
pub mod server;
pub mod signer;
pub(crate) mod svid;
pub mod telemetry;
pub mod trust;

/// What the fuzz targets in `fuzz/` exercise, in one place (see `docs/FUZZING.md`).
///
/// Re-exports only, no logic: the targets call exactly these items, so narrowing the crate's
/// public surface elsewhere must keep them reachable here. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    #[cfg(feature = "server")]
    pub use crate::authn::{Precheck, PrecheckError};
    pub use crate::identity::{CsrRejection, KeyKind, SpiffeId, check_csr};
    pub use crate::pem::{PemError, single_block};
    pub use crate::sds::{RequestKind, SECRET_TYPE_URL, StreamState, resources};

    // To build fixtures (SVIDs for the SDS stream target).
    pub use crate::identity::LeafProfile;
    pub use crate::signer::{LocalSigner, SignRequest, Signer};
    pub use crate::svid::Svid;
    pub use crate::trust::TrustBundle;
}
