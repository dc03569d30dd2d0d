//! Logging: the global tracing subscriber and its writer threads.
//!
//! Lines are formatted on the calling thread and handed to writer threads
//! ([`tracing_appender::non_blocking`]), so a slow log pipe never stalls the async workers:
//! - audit lines (target [`AUDIT_TARGET`]) go through a queue that is never lossy: when it is
//!   full the logging call waits, so no audit line is ever lost (one is written per request, so
//!   this is back-pressure on requests, not on logging);
//! - every other line goes through a lossy queue: when it is full the line is dropped and
//!   counted ([`dropped_log_lines`], exported as `meshid_log_lines_dropped_total` and
//!   `meshid_agent_log_lines_dropped_total`), and the call never waits.
//!
//! Both threads write whole lines into one buffered writer. Colour (ANSI escapes) is written
//! only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tracing_appender::non_blocking::ErrorCounter;

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

/// The target of audit lines: never dropped.
pub const AUDIT_TARGET: &str = "meshid::audit";

/// Keeps the log writer threads alive; dropping it flushes every line still queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    workers: Vec<tracing_appender::non_blocking::WorkerGuard>,
    dropped: ErrorCounter,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

impl LogGuard {
    /// Lines other than audit lines dropped because their queue was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }
}

/// Log lines each writer thread's queue holds: then audit lines wait and other lines are
/// dropped.
pub const LOG_QUEUE_LINES: usize = 4096;

/// Lines dropped by the globally installed logger (0 before [`init_logging`]).
pub fn dropped_log_lines() -> u64 {
    GLOBAL_DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

static GLOBAL_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The `log_lines_dropped` counter for a Prometheus registry: reads [`dropped_log_lines`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DroppedLogLines;

impl EncodeMetric for DroppedLogLines {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_counter::<NoLabelSet, _, u64>(&dropped_log_lines(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Installs the global tracing subscriber (filter from `RUST_LOG`, else `default_level`),
/// writing to stderr, in colour only when stderr is a terminal. Safe to call more than once:
/// later calls are ignored.
pub fn init_logging(format: LogFormat, default_level: &str) -> LogGuard {
    let ansi = std::io::stderr().is_terminal();
    install(format, default_level, std::io::stderr(), ansi)
}

/// Like [`init_logging`], writing to `writer`, without colour.
pub fn init_logging_to(
    format: LogFormat,
    default_level: &str,
    writer: impl std::io::Write + Send + 'static,
) -> LogGuard {
    install(format, default_level, writer, false)
}

fn install(
    format: LogFormat,
    default_level: &str,
    writer: impl std::io::Write + Send + 'static,
    ansi: bool,
) -> LogGuard {
    use tracing_subscriber::util::SubscriberInitExt;
    let (dispatch, mut guard) = build(format, default_level, writer, ansi);
    if dispatch.try_init().is_ok() {
        let _ = GLOBAL_DROPPED.set(guard.dropped.clone());
    } else {
        // Another subscriber is installed: these writer threads will never get a line.
        guard.workers.clear();
    }
    guard
}

/// One buffered writer shared by the two writer threads; each write is one whole line.
struct SharedWriter<W: std::io::Write>(Arc<Mutex<std::io::BufWriter<W>>>);

impl<W: std::io::Write> std::io::Write for SharedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// The subscriber (not installed) and the guard of its writer threads.
pub(crate) fn build(
    format: LogFormat,
    default_level: &str,
    writer: impl std::io::Write + Send + 'static,
    ansi: bool,
) -> (tracing::Dispatch, LogGuard) {
    use tracing_appender::non_blocking::NonBlockingBuilder;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::MakeWriterExt;

    let shared = Arc::new(Mutex::new(std::io::BufWriter::with_capacity(
        64 * 1024,
        writer,
    )));
    // Each queue is allocated up front: 4,096 lines is 128 KiB (the default, 128,000, would be
    // 4 MiB, more than the whole agent). The writer threads flush whenever they have drained
    // their queue, so under load many lines leave in one write, and at rest every line leaves
    // at once.
    let (audit, audit_guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("meshid-audit-log")
        .finish(SharedWriter(shared.clone()));
    let (other, other_guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("meshid-log")
        .finish(SharedWriter(shared));
    let dropped = other.error_counter();
    let writer = audit
        .with_filter(|meta: &tracing::Metadata<'_>| meta.target() == AUDIT_TARGET)
        .or_else(other);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let dispatch = match format {
        // tracing-subscriber's JSON lines. Our own format (issue 13) saved 1-4 points of the
        // CreateCertificate benchmark's ratio (the audit line cost about 5 points with this
        // one, 1-4 with ours; docs/BENCHMARKS.md): under the 10% a part of our own must earn,
        // and the audit/other split it was kept for is the writer's, not the format's.
        LogFormat::Json => tracing::Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
        LogFormat::Text => tracing::Dispatch::new(builder.finish()),
    };
    let guard = LogGuard {
        workers: vec![audit_guard, other_guard],
        dropped,
    };
    (dispatch, guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::SharedBuf;

    #[test]
    fn json_lines_carry_the_event_fields_at_the_top_level_and_the_spans_from_the_root() {
        let buf = SharedBuf::default();
        let (dispatch, guard) = build(LogFormat::Json, "info", buf.clone(), false);
        tracing::dispatcher::with_default(&dispatch, || {
            let outer = tracing::info_span!("rotation", identity = "spiffe://td/ns/a/sa/b");
            let _o = outer.enter();
            tracing::info!(
                target: "meshid::audit",
                serial = %"0a1b",
                latency_us = 1234u64,
                tricky = "quote \" newline \n",
                "certificate issued"
            );
        });
        drop(dispatch);
        drop(guard);
        let text = buf.text();
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
        assert_eq!(line["message"], "certificate issued");
        assert_eq!(line["target"], "meshid::audit");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["serial"], "0a1b");
        assert_eq!(line["latency_us"], 1234);
        assert_eq!(line["tricky"], "quote \" newline \n");
        assert_eq!(
            line["spans"],
            serde_json::json!([{"name": "rotation", "identity": "spiffe://td/ns/a/sa/b"}])
        );
        assert!(line.get("span").is_none(), "{line}");
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    #[test]
    fn no_audit_line_is_dropped_when_the_writer_queue_overflows_and_a_file_gets_no_colour() {
        let buf = SharedBuf::default();
        // The only test in this binary that installs the global subscriber.
        let guard = init_logging_to(LogFormat::Text, "info", buf.clone());
        assert!(!guard.workers.is_empty(), "subscriber installed");
        // Many more lines than the writer thread's queue holds.
        let lines = 10 * LOG_QUEUE_LINES as u32;
        for i in 0..lines {
            tracing::info!(target: "meshid::audit", seq = i, "overflow-check");
        }
        drop(guard);
        let text = buf.text();
        let written = text
            .lines()
            .filter(|l| l.contains("overflow-check"))
            .count();
        assert_eq!(written, lines as usize);
        assert!(
            !text.contains('\u{1b}'),
            "no ANSI escapes outside a terminal"
        );
    }

    /// A sink that blocks every write until the gate opens, like a stalled log pipe.
    #[derive(Clone)]
    struct Stalled {
        out: SharedBuf,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cvar) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cvar.wait(open).unwrap();
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_ordinary_lines_into_a_stalled_sink_never_blocks_and_is_counted_while_audit_lines_all_arrive()
     {
        let out = SharedBuf::default();
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let sink = Stalled {
            out: out.clone(),
            open: open.clone(),
        };
        let (dispatch, guard) = build(LogFormat::Text, "info", sink, false);
        let flood = 20 * LOG_QUEUE_LINES;
        let audits = 100;
        tracing::dispatcher::with_default(&dispatch, || {
            for i in 0..audits {
                tracing::info!(target: "meshid::audit", seq = i, "audit-line");
            }
            // The sink is stalled: were these lines waiting for room, this loop would never end.
            for i in 0..flood {
                tracing::info!(seq = i, "flood-line");
            }
        });
        let dropped = guard.dropped_lines();
        assert!(dropped > 0, "a stalled sink makes the flood overflow");
        {
            let (lock, cvar) = &*open;
            *lock.lock().unwrap() = true;
            cvar.notify_all();
        }
        drop(guard);
        let text = out.text();
        assert_eq!(
            text.lines().filter(|l| l.contains("audit-line")).count(),
            audits
        );
        let flooded = text.lines().filter(|l| l.contains("flood-line")).count();
        assert_eq!(
            flooded as u64 + dropped,
            flood as u64,
            "every line written or counted"
        );
        assert!(
            !text.contains('\u{1b}'),
            "no colour codes when writing to a non-terminal"
        );
    }
}
