//! The agent role: obtain an SVID from an Istio-compatible CA and keep it fresh.

mod ca_client;
mod csr;

pub use ca_client::{CaClient, CaClientError, Svid};
pub use csr::{WorkloadKeyType, generate_csr};
