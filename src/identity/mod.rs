//! Workload identity: SPIFFE IDs, the CSR issuance policy and the leaf certificate template.

mod csr;
mod leaf;
mod spiffe;

pub use csr::{CsrRejection, KeyKind, ValidatedCsr, check_csr};
pub use leaf::{
    BACKDATE_LIFETIME_DIVISOR, DEFAULT_MAX_BACKDATE, DEFAULT_MIN_TTL, LeafProfile, MIN_TTL_FLOOR,
    backdate, is_rsa_key, key_usages, leaf_params, random_serial,
};
pub use spiffe::{IdentityError, SpiffeId, truncate_echo, uri_sans};
