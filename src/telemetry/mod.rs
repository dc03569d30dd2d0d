//! Logging (tracing, with a JSON line format of our own) and Prometheus metrics.

// Crate-visible for `crate::fuzzing`, which re-exports its string escaper.
pub(crate) mod json;
mod logging;
#[cfg(feature = "server")]
mod metrics;
#[cfg(test)]
mod testing;

pub(crate) use logging::DroppedLogLines;
pub use logging::{LogFormat, LogGuard, init_logging, init_logging_to};
#[cfg(feature = "server")]
pub(crate) use metrics::{CertLabels, OutcomeLabels, ResultLabels, ServerMetrics};
