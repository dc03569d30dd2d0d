//! Workload identity: SPIFFE IDs, the CSR issuance policy and the leaf certificate template.

mod csr;
mod leaf;
mod spiffe;

pub use csr::{CsrRejection, KeyKind, ValidatedCsr, check_csr};
pub use leaf::{LeafProfile, is_rsa_key, key_usages, leaf_params, random_serial};
pub use spiffe::{IdentityError, SpiffeId, truncate_echo, uri_sans};
