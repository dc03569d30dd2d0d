//! Envoy SDS v3 (`envoy.service.secret.v3.SecretDiscoveryService`) for the agent's SVID, served
//! on a Unix socket: `default` (certificate chain and key) and `ROOTCA` (trust bundle), pushed
//! to every open stream on rotation, with per-stream version/nonce ACK/NACK bookkeeping.

mod resources;
mod service;
mod socket;
mod stream;

pub use resources::{Resources, SECRET_TYPE_URL, resources};
pub use service::SdsError;
pub(crate) use service::{SdsMetrics, SdsService};
pub(crate) use socket::{SdsSocket, serve};
pub use stream::{RequestKind, StreamState};

/// Where Envoy expects the SDS socket by default (Istio's workload SDS path).
pub const DEFAULT_SOCKET: &str = "/var/run/secrets/workload-spiffe-uds/socket";
