//! Logging: the global tracing subscriber and its writer thread.

use super::json::{JsonFields, JsonLines};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the log writer thread alive; dropping it flushes every line still queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

/// Log lines the writer thread's queue holds before a logging call waits.
pub const LOG_QUEUE_LINES: usize = 4096;

/// Installs the global tracing subscriber (filter from `RUST_LOG`, else `default_level`),
/// writing to stderr. Safe to call more than once: later calls are ignored.
pub fn init_logging(format: LogFormat, default_level: &str) -> LogGuard {
    init_logging_to(format, default_level, std::io::stderr())
}

/// Like [`init_logging`], writing to `writer`. Lines are handed to a dedicated writer thread, so
/// a slow log pipe never stalls the async workers serving requests. The queue is not lossy:
/// when it is full, the logging call waits, so no audit line is ever dropped.
pub fn init_logging_to(
    format: LogFormat,
    default_level: &str,
    writer: impl std::io::Write + Send + 'static,
) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The queue is allocated up front: 4,096 lines is 128 KiB (the default, 128,000, would
        // be 4 MiB, more than the whole agent). Bursts beyond it wait; they are not dropped.
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("meshid-log")
        // The writer thread flushes whenever it has drained the queue, so under load many lines
        // leave in one write, and at rest every line leaves at once.
        .finish(std::io::BufWriter::with_capacity(64 * 1024, writer));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    LogGuard {
        _worker: installed.ok().map(|_| guard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::SharedBuf;

    #[test]
    fn no_log_line_is_dropped_when_the_writer_queue_overflows() {
        let buf = SharedBuf::default();
        // The only test in this binary that installs the global subscriber.
        let guard = init_logging_to(LogFormat::Json, "info", buf.clone());
        assert!(guard._worker.is_some(), "subscriber installed");
        // Many more lines than the writer thread's queue holds.
        let lines = 10 * LOG_QUEUE_LINES as u32;
        for i in 0..lines {
            tracing::info!(target: "meshid::audit", seq = i, "overflow-check");
        }
        drop(guard);
        let written = buf
            .text()
            .lines()
            .filter(|l| l.contains("overflow-check"))
            .count();
        assert_eq!(written, lines as usize);
    }
}
