//! The JSON log line format: one object per event, written straight into the line buffer.
//!
//! tracing-subscriber's own JSON format serialises every field through serde_json, one small
//! write at a time, each validated as UTF-8 again on its way into the line; and it stores span
//! fields as JSON text that it parses back for every event. For the server's audit line (one per
//! certificate) that cost about 5 points of the throughput benchmark's ratio (docs/BENCHMARKS.md),
//! against 1–4 with this format. This format writes the same objects directly: keys and strings
//! are escaped as they are written, numbers are formatted in place, and span fields are stored
//! as ready-made `"key":value` members that are copied into each line as they are.
//!
//! A line looks like
//! `{"timestamp":"2026-11-23T13:33:37.123456Z","level":"INFO","message":"certificate issued",
//! "identity":"spiffe://…","target":"meshid::audit","spans":[{"name":"rotation",…}]}`:
//! the event's fields at the top level (as tracing-subscriber's `flatten_event(true)`), then the
//! target, then the spans in scope from the root, each with its name and fields.

use std::fmt::{self, Write};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format of JSON logs (see the module docs). Pair it with [`JsonFields`].
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

/// The span field format of JSON logs: `"key":value` members separated by commas, without
/// braces, so [`JsonLines`] can copy them into a line unparsed.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFields;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let w = &mut writer;
        w.write_str("{\"timestamp\":\"")?;
        write_timestamp(w, SystemTime::now())?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_char('"')?;
        let mut fields = Members::new(w, false);
        event.record(&mut fields);
        fields.result?;
        // Events bridged from the `log` crate carry their real target as a field.
        let target = fields.log_target.take();
        w.write_str(",\"target\":")?;
        write_string(w, target.as_deref().unwrap_or(meta.target()))?;
        if let Some(scope) = ctx.event_scope() {
            let mut open = false;
            for span in scope.from_root() {
                w.write_str(if open { "," } else { ",\"spans\":[" })?;
                open = true;
                w.write_str("{\"name\":")?;
                write_string(w, span.name())?;
                let extensions = span.extensions();
                if let Some(stored) = extensions.get::<FormattedFields<JsonFields>>()
                    && !stored.fields.is_empty()
                {
                    w.write_char(',')?;
                    w.write_str(&stored.fields)?;
                }
                w.write_char('}')?;
            }
            if open {
                w.write_char(']')?;
            }
        }
        w.write_str("}\n")
    }
}

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = Members::new(&mut writer, true);
        fields.record(&mut members);
        members.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut writer = current.as_writer();
        let mut members = Members::new(&mut writer, first);
        fields.record(&mut members);
        members.result
    }
}

/// Writes each recorded field as a `"key":value` member.
struct Members<'a, W: Write> {
    w: &'a mut W,
    /// No member written yet, so the next one has no leading comma.
    first: bool,
    /// The `log.target` field of an event bridged from the `log` crate.
    log_target: Option<String>,
    result: fmt::Result,
}

impl<'a, W: Write> Members<'a, W> {
    fn new(w: &'a mut W, first: bool) -> Self {
        Self {
            w,
            first,
            log_target: None,
            result: Ok(()),
        }
    }

    /// Writes `,"key":` and then the value with `value`, unless an earlier write failed. Fields
    /// named `log.*` (the metadata of events bridged from the `log` crate) are left out.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() && !field.name().starts_with("log.") {
            let first = std::mem::take(&mut self.first);
            self.result = write_member(self.w, first, field.name(), value);
        }
    }
}

fn write_member<W: Write>(
    w: &mut W,
    first: bool,
    name: &str,
    value: impl FnOnce(&mut W) -> fmt::Result,
) -> fmt::Result {
    if !first {
        w.write_char(',')?;
    }
    write_string(w, name)?;
    w.write_char(':')?;
    value(w)
}

impl<W: Write> Visit for Members<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_owned());
        }
        self.member(field, |w| write_string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value}")?;
            w.write_char('"')
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    // 128-bit integers go through `record_debug`, as strings: most JSON readers would round
    // them as numbers.

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those become strings.
        if value.is_finite() {
            self.member(field, |w| write!(w, "{value}"));
        } else {
            self.member(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| w.write_str(if value { "true" } else { "false" }));
    }
}

/// Writes `s` as a JSON string, quotes included: the escaper every key and string value of a
/// line goes through (its output never holds a raw control character, so never a line break).
pub fn write_string(w: &mut impl Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what passes through it for the inside of a JSON string: quote, backslash and the
/// control characters. Everything else, all of Unicode included, is valid JSON as it is.
struct Escaped<'a, W: ?Sized>(&'a mut W);

impl<W: Write + ?Sized> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean_from = 0;
        for (i, b) in s.bytes().enumerate() {
            let short = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            // `i` is at an ASCII byte, so both slices end on character boundaries.
            self.0.write_str(&s[clean_from..i])?;
            if short.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.0.write_str("\\u00")?;
                self.0.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                self.0.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
            } else {
                self.0.write_str(short)?;
            }
            clean_from = i + 1;
        }
        self.0.write_str(&s[clean_from..])
    }
}

/// Writes `at` as RFC 3339 in UTC with microseconds: `2026-11-23T13:33:37.123456Z`.
fn write_timestamp(w: &mut impl Write, at: SystemTime) -> fmt::Result {
    let t = time::OffsetDateTime::from(at);
    let (year, month, day) = t.to_calendar_date();
    let (hour, minute, second, micro) = t.to_hms_micro();
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let year = u32::try_from(year).map_err(|_| fmt::Error)?;
    digits(&mut out[0..4], year)?;
    digits(&mut out[5..7], u32::from(u8::from(month)))?;
    digits(&mut out[8..10], u32::from(day))?;
    digits(&mut out[11..13], u32::from(hour))?;
    digits(&mut out[14..16], u32::from(minute))?;
    digits(&mut out[17..19], u32::from(second))?;
    digits(&mut out[20..26], micro)?;
    w.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
}

/// Writes `value` as zero-padded decimal filling `out`; an error if it does not fit.
fn digits(out: &mut [u8], mut value: u32) -> fmt::Result {
    for d in out.iter_mut().rev() {
        *d = b'0' + (value % 10) as u8;
        value /= 10;
    }
    if value == 0 { Ok(()) } else { Err(fmt::Error) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::SharedBuf;

    fn parsed(lines: &SharedBuf) -> Vec<serde_json::Value> {
        lines
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Runs `f` with our format installed for this thread, and returns the parsed lines.
    fn ours(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = SharedBuf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        parsed(&lines)
    }

    /// The same with tracing-subscriber's own JSON format, as the independent reference.
    fn reference(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = SharedBuf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        parsed(&lines)
    }

    #[derive(Debug)]
    struct Oops;
    impl fmt::Display for Oops {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it broke: \"badly\"")
        }
    }
    impl std::error::Error for Oops {}

    fn events() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \0 é ✓ 🦀";
        tracing::info!(
            target: "meshid::audit",
            identity = "spiffe://cluster.local/ns/a/sa/b",
            serial = %"0a1b",
            latency_us = 1234u64,
            delta = -5i64,
            ratio = 0.25f64,
            ok = true,
            big = u128::MAX,
            tricky,
            shown = %tricky,
            debugged = ?Some(tricky),
            "certificate {} issued",
            "x"
        );
        let err = Oops;
        tracing::warn!(error = &err as &dyn std::error::Error, "with an error");
    }

    #[test]
    fn event_lines_parse_as_json_and_match_tracing_subscribers_own_format() {
        let ours = ours(events);
        let reference = reference(events);
        assert_eq!(ours.len(), 2);
        assert_eq!(ours.len(), reference.len());
        for (a, b) in ours.iter().zip(&reference) {
            let (mut a, mut b) = (a.clone(), b.clone());
            let (ta, tb) = (a["timestamp"].take(), b["timestamp"].take());
            assert_eq!(a, b);
            let (ta, tb) = (ta.as_str().expect("ts"), tb.as_str().expect("ts"));
            assert_eq!(ta.len(), tb.len(), "{ta} vs {tb}");
            assert_eq!(ta[..16], tb[..16], "same minute: {ta} vs {tb}");
        }
        assert_eq!(ours[0]["message"], "certificate x issued");
        assert_eq!(ours[0]["latency_us"], 1234);
        assert_eq!(ours[0]["ok"], true);
        assert_eq!(
            ours[0]["tricky"],
            "quote \" backslash \\ newline \n tab \t bell \u{7} nul \0 é ✓ 🦀"
        );
        assert_eq!(ours[1]["error"], "it broke: \"badly\"");
    }

    #[test]
    fn span_fields_including_ones_recorded_later_appear_with_each_span_from_the_root() {
        let lines = ours(|| {
            let outer = tracing::info_span!("rotation", identity = "spiffe://td/ns/a/sa/b");
            let _o = outer.enter();
            let inner = tracing::info_span!("attempt", n = 1u64, serial = tracing::field::Empty);
            inner.record("serial", "0a");
            let _i = inner.enter();
            tracing::info!("inside");
            let empty = tracing::info_span!("bare");
            let _e = empty.enter();
            tracing::info!("deeper");
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0]["spans"],
            serde_json::json!([
                {"name": "rotation", "identity": "spiffe://td/ns/a/sa/b"},
                {"name": "attempt", "n": 1, "serial": "0a"}
            ])
        );
        assert_eq!(lines[1]["spans"][2], serde_json::json!({"name": "bare"}));
        let outside = ours(|| tracing::info!("no span"));
        assert!(outside[0].get("spans").is_none());
    }

    #[test]
    fn log_crate_metadata_fields_are_left_out_and_log_target_becomes_the_target() {
        let lines = ours(|| {
            tracing::info!(
                log.target = "rustls::server",
                log.module_path = "rustls::server::hs",
                log.line = 42u64,
                kept = 1u64,
                "bridged"
            )
        });
        let line = lines[0].as_object().expect("object");
        assert_eq!(line["target"], "rustls::server");
        assert_eq!(line["kept"], 1);
        assert!(line.keys().all(|k| !k.starts_with("log.")), "{line:?}");
    }

    #[test]
    fn non_finite_floats_are_written_as_strings() {
        let lines = ours(|| tracing::info!(a = f64::NAN, b = f64::INFINITY, "floats"));
        assert_eq!(lines[0]["a"], "NaN");
        assert_eq!(lines[0]["b"], "inf");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let cases = [
            (0u64, 0u32, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 5_000, "2000-02-29T00:00:00.000005Z"),
            (1_795_440_817, 123_456_789, "2026-11-23T13:33:37.123456Z"),
            (4_102_444_799, 999_999_999, "2099-12-31T23:59:59.999999Z"),
        ];
        for (secs, nanos, want) in cases {
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
            let mut got = String::new();
            write_timestamp(&mut got, at).expect("format");
            assert_eq!(got, want);
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::write_string;

        proptest! {
            #[test]
            fn the_escaper_writes_one_line_of_valid_json_that_decodes_to_the_input(
                input in prop_oneof![
                    any::<String>(),
                    "[\\x00-\\x1f\\x7f\"\\\\/ a-zé✓🦀\u{2028}]{0,64}",
                ],
            ) {
                let mut out = String::new();
                write_string(&mut out, &input).expect("a String takes every write");
                prop_assert!(!out.bytes().any(|b| b < 0x20), "raw control character in {:?}", out);
                let decoded: String = serde_json::from_str(&out).expect("valid JSON");
                prop_assert_eq!(decoded, input);
            }
        }
    }
}
