//! The gRPC server: the CreateCertificate handler, its rejections, serving TLS and the HTTP
//! probes/metrics endpoint.

mod ca_service;
mod coalesce;
mod http;
mod issuance_limit;
mod limits;
mod rejection;
mod routes;
mod tls;

pub use ca_service::{CaService, CaServiceOptions, Durations, TtlDecision};
pub use coalesce::CoalescingIo;
pub use http::{Readiness, http_router};
pub use issuance_limit::{
    Admission, DEFAULT_BURST, DEFAULT_INTERVAL, DEFAULT_MAX_KEYS, IssuanceKey,
    IssuanceLimitSettings, IssuanceLimiter,
};
pub use limits::{
    ConnectionGuard, GuardedListener, HTTP_MAX_CONNECTIONS, Refusals, RequestLimits, ServerLimits,
    accept_tls, drain_deadline,
};
pub use rejection::{RETRY_PUSHBACK_MS, Rejection};
pub use routes::GrpcServices;
pub use tls::{ServingCertResolver, TlsError, serving_config};
