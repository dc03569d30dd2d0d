//! Workload identity: SPIFFE IDs, the CSR issuance policy and the leaf certificate template.

mod csr;
mod leaf;
mod spiffe;

pub use csr::{CsrRejection, KeyKind, ValidatedCsr, check_csr};
pub use leaf::{BACKDATE_LIFETIME_DIVISOR, DEFAULT_MAX_BACKDATE, LeafProfile};
#[cfg(feature = "server")]
pub(crate) use leaf::{DEFAULT_MIN_TTL, is_rsa_key};
pub(crate) use leaf::{MIN_TTL_FLOOR, leaf_params, random_serial};
pub(crate) use spiffe::truncate_echo;
pub use spiffe::{IdentityError, SpiffeId, uri_sans};
