//! The agent role: obtain an SVID from an Istio-compatible CA, keep it fresh, and serve it to
//! Envoy over SDS (and optionally as files).
//!
//! One rotation: [`generate_csr`] → [`CertificateIssuer`] (the CA) → [`Svid::from_response`]
//! (validation against the roots trusted before the call, [`CaTrust`]) → published on a `watch`
//! channel → every open SDS stream pushes it. When to rotate is decided by [`RotationPolicy`]
//! alone. The trusted roots follow the CA's: see [`CaTrust`].

mod ca_client;
mod config;
mod files;
mod http;
mod metrics;
mod policy;
mod rotation;
mod run;
#[cfg(test)]
pub(crate) mod testing;
mod trust;

pub use ca_client::{CaClient, CaClientError};
pub use config::{
    AgentConfig, AgentConfigError, DEFAULT_CA_ADDRESS, DEFAULT_CA_ROOT_FILE, DEFAULT_HTTP_LISTEN,
    DEFAULT_TOKEN_FILE,
};
pub use files::FilesError;
pub use policy::{PolicyError, RotationPolicy};
pub use run::{AgentError, AgentHandle, run_agent, start_agent};

// The SVID types live in `crate::svid` (below both the agent and `sds`); re-exported here for
// the agent's users.
pub use crate::svid::{Svid, SvidError, SvidReceiver, SvidSender, WorkloadKeyType, generate_csr};
