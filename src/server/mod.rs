//! The gRPC server: the CreateCertificate handler, its rejections, serving TLS and the HTTP
//! probes/metrics endpoint.

mod ca_service;
mod coalesce;
mod h2_refusals;
mod http;
mod io_wrapper;
mod issuance_limit;
mod limits;
mod rejection;
mod routes;
mod tls;

pub(crate) use ca_service::{CaService, CaServiceOptions, Durations};
pub(crate) use coalesce::CoalescingIo;
pub(crate) use h2_refusals::RefusalWatch;
pub(crate) use http::{Readiness, http_router};
pub use issuance_limit::IssuanceLimitSettings;
pub(crate) use issuance_limit::IssuanceLimiter;
pub use limits::ServerLimits;
pub(crate) use limits::{
    ConnectionGuard, GuardedListener, HTTP_MAX_CONNECTIONS, Refusals, RequestLimits, accept_tls,
    drain_deadline,
};
pub use rejection::RETRY_PUSHBACK_MS;
pub(crate) use rejection::Rejection;
pub(crate) use routes::GrpcServices;
pub use tls::TlsError;
pub(crate) use tls::{ServingCertResolver, serving_config};
