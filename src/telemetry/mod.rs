//! Logging (tracing, text or tracing-subscriber's JSON lines), Prometheus metrics, and the
//! probes/metrics HTTP router.

mod logging;
#[cfg(feature = "server")]
mod metrics;
mod probes;
#[cfg(test)]
mod testing;

pub(crate) use logging::DroppedLogLines;
#[cfg(all(test, feature = "server"))]
pub(crate) use logging::build as build_logging;
pub use logging::{LogFormat, LogGuard, init_logging, init_logging_to};
#[cfg(feature = "server")]
pub(crate) use metrics::{CertLabels, OutcomeLabels, ResultLabels, ServerMetrics};
pub use probes::{MetricsText, ReadinessCheck, probes_router};
#[cfg(all(test, feature = "server"))]
pub(crate) use testing::SharedBuf;
