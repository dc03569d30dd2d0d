//! Logging (tracing, with a JSON line format of our own) and Prometheus metrics.

// Crate-visible for `crate::fuzzing`, which re-exports its string escaper.
pub(crate) mod json;
mod logging;
mod metrics;
#[cfg(test)]
mod testing;

pub use json::{JsonFields, JsonLines};
pub use logging::{
    AUDIT_TARGET, DroppedLogLines, LOG_QUEUE_LINES, LogFormat, LogGuard, dropped_log_lines,
    init_logging, init_logging_to,
};
pub use metrics::{CertLabels, OutcomeLabels, ResultLabels, ServerMetrics};
