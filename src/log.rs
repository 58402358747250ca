//! Logs: the one place that decides how a log line is filtered, formatted,
//! scrubbed and written. `tracing` events (ours: phases, figures, warnings;
//! object_store's: every retry of a store request; librdkafka's, through
//! the `log` bridge) go to stderr, as human lines with a timestamp and a
//! level on a terminal and as JSON objects, one a line, otherwise
//! (`--log-format`), filtered by `--log-level` / `BACKFILL_LOG`.
//!
//! This module must never write to stdout (the summary, the rows of a `-`
//! sink and `--report -` own it), never let a line out that did not pass
//! through [`crate::redact::line`] (a JSON line is scrubbed value by value,
//! so that it stays JSON), and never write an event as more than one line.

use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;

/// Read when `--log-level` (or `BACKFILL_LOG_LEVEL`) is not given, in the
/// syntax of `RUST_LOG`.
pub const FILTER_VAR: &str = "BACKFILL_LOG";

/// The targets a bare level applies to: ours, and object_store's retry
/// messages (each retry of a store request is logged at info there).
const OURS: [&str; 2] = ["event_backfill", "backfill"];
const STORE_RETRIES: &str = "object_store::client::retry";
const RDKAFKA_ECHO: &str = "rdkafka::client";
/// Ballista's crates (targets `ballista`, `ballista_core::…`,
/// `ballista_scheduler::…`, `ballista_executor::…`): never below info
/// ([`shown`]).
const BALLISTA: &str = "ballista";
/// Ballista's client side of a query (its job status and errors).
const BALLISTA_CLIENT: &str = "ballista_core::execution_plans::distributed_query";

/// What [`init`] settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Human or Json: `auto` resolved against stderr.
    pub format: LogFormat,
}

impl Settings {
    pub fn json(&self) -> bool {
        self.format == LogFormat::Json
    }
}

/// `auto` as stderr is: human on a terminal, JSON otherwise.
pub fn resolve(format: LogFormat) -> LogFormat {
    use std::io::IsTerminal;
    match format {
        LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Human,
        LogFormat::Auto => LogFormat::Json,
        f => f,
    }
}

/// The filter for `spec` (a `--log-level` value, else `BACKFILL_LOG`, else
/// `default`, a level). A bare level applies to backfill's own events and
/// the store's retries (at least warn shows those: a retry is worth seeing),
/// other crates staying at warn (and rdkafka's echo of librdkafka's errors
/// off below debug); anything else is an `EnvFilter` directive
/// list, as `RUST_LOG` takes. `progress` lets the phase and progress events
/// through whatever the level (`--progress on`).
pub fn filter(spec: Option<&str>, default: &str, progress: bool) -> Result<EnvFilter, String> {
    let spec = match spec {
        Some(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => match std::env::var(FILTER_VAR) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => default.to_string(),
        },
    };
    let level = spec.to_ascii_lowercase();
    let mut directives = match level.as_str() {
        "off" | "error" | "warn" | "info" | "debug" | "trace" => {
            let others = if matches!(level.as_str(), "off" | "error") {
                level.as_str()
            } else {
                "warn"
            };
            let retries = match level.as_str() {
                "warn" | "info" => "info",
                l => l,
            };
            let mut d = vec![others.to_string()];
            d.extend(OURS.iter().map(|t| format!("{t}={level}")));
            d.push(format!("{STORE_RETRIES}={retries}"));
            // Ballista's client logs a failed job at error before it
            // returns the error, which this process then reports itself:
            // two lines for one failure.
            d.push(format!("{BALLISTA_CLIENT}=off"));
            if !matches!(level.as_str(), "debug" | "trace") {
                // rdkafka echoes every librdkafka error callback at error
                // level, AllBrokersDown every 50 ms while a broker is
                // down: 300 lines in an 8 s health check. librdkafka's own
                // log lines (target `librdkafka`) say the same once, with
                // its own suppression of repeats, and stay.
                d.push(format!("{RDKAFKA_ECHO}=off"));
            }
            d.join(",")
        }
        // A bare word is a target at every level for EnvFilter, so a typo'd
        // level (`inf`, `warning`) turned every log line off, silently.
        _ if !spec.contains(['=', ',', '[']) => {
            return Err(format!(
                "--log-level / {FILTER_VAR} `{spec}` is not a level; give error, warn, info, debug, trace or off, or a filter naming a target with its level, such as info,object_store=debug"
            ));
        }
        _ => spec.clone(),
    };
    if progress {
        directives.push_str(&format!(",{}=info", crate::progress::TARGET));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(&directives)
        .map_err(|e| {
            format!(
                "--log-level / {FILTER_VAR} `{spec}`: {e}; give a level (error, warn, info, debug, trace, off) or a filter such as info,object_store=debug"
            )
        })
}

/// Whether an event at `level` from `target` may be written at all, whatever
/// the filter asks for. Ballista prints a query's session options (and with
/// them `backfill.storage`, credentials included) at trace when it applies
/// them and at debug when one does not parse (an executor of another
/// version), before this process has parsed them, so before redaction
/// knows the secrets. A directive can only add to an `EnvFilter` (the more
/// specific one wins: `ballista_core::extension=trace` beat an appended
/// `ballista_core=debug`), so the cap is a filter of its own on the layer.
pub fn shown(target: &str, level: &tracing::Level) -> bool {
    let ballista = target
        .strip_prefix(BALLISTA)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::") || rest.starts_with('_'));
    !ballista || *level <= tracing::Level::INFO
}

/// Install the process's subscriber: `format` (auto resolved), `filter`.
/// Also routes `log` records (librdkafka, DataFusion) into it. Called once,
/// by `main`; a second call keeps the first subscriber.
pub fn init(format: LogFormat, filter: EnvFilter) -> Settings {
    let format = resolve(format);
    let json = format == LogFormat::Json;
    let writer = Stderr { json };
    let color = !json
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let registry = tracing_subscriber::registry().with(filter);
    let cap = tracing_subscriber::filter::filter_fn(|m| shown(m.target(), m.level()));
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer)
                    .with_filter(cap),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(color)
                    .with_writer(writer)
                    .with_filter(cap),
            )
            .try_init()
    };
    Settings { format }
}

/// Hands the formatter one buffer per event; the buffer is scrubbed and
/// written whole when the event is done.
struct Stderr {
    json: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            json: self.json,
        }
    }
}

/// One event's text, written to stderr on drop.
struct Line {
    buf: Vec<u8>,
    json: bool,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let mut out = String::with_capacity(text.len() + 16);
        if self.json {
            // serde escapes every control character: one event, one line.
            for l in text.lines() {
                out.push_str(&scrub_line(l, true));
                out.push('\n');
            }
        } else {
            // One event, one line, whatever its message holds: a newline
            // in it made two lines, the second without timestamp or level,
            // and each was scrubbed alone. ESC stays: it is the formatter's
            // colouring, and tracing-subscriber escapes it in field values.
            let event = text.strip_suffix('\n').unwrap_or(&text);
            out.push_str(&escape_controls(
                &scrub_line(event, false),
                &['\t', '\u{1b}'],
            ));
            out.push('\n');
        }
        crate::progress::suspend(|| {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(out.as_bytes());
            let _ = e.flush();
        });
    }
}

/// `text` with every control character but the tab (and the Unicode line
/// separators) written as its escape (`\n`, `\u{1b}`): a file name or a
/// library's message can then neither break a line in two nor drive the
/// terminal (colours, a rewritten or cleared line). For the `error:` line.
pub fn printable(text: &str) -> String {
    escape_controls(text, &['\t'])
}

/// [`printable`] sparing the characters in `keep`.
fn escape_controls(text: &str, keep: &[char]) -> String {
    let escaped =
        |c: char| (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) && !keep.contains(&c);
    if !text.chars().any(escaped) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// A log line without secrets: a JSON line value by value (a URL's cut at
/// its last `@` must not swallow the fields after it), any other line as
/// [`crate::redact::line`] takes it.
///
/// The fields keep the order the formatter wrote them in (timestamp
/// first): each string that changes is replaced where it stands, in its
/// JSON encoding. Should the result not parse (it cannot, short of a bug),
/// the scrubbed object is written afresh.
pub fn scrub_line(line: &str, json: bool) -> String {
    if json && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) {
        let mut changes = vec![];
        scrub_value(&mut v, &mut changes);
        if changes.is_empty() {
            return line.to_string();
        }
        let mut out = line.to_string();
        for (from, to) in &changes {
            out = out.replace(from.as_str(), to);
        }
        return match serde_json::from_str::<serde_json::Value>(&out) {
            Ok(again) if again == v => out,
            _ => v.to_string(),
        };
    }
    crate::redact::line(line)
}

/// Scrub every string of `v`, noting each change as (old, new) JSON
/// encodings.
fn scrub_value(v: &mut serde_json::Value, changes: &mut Vec<(String, String)>) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            let clean = crate::redact::line(s);
            if clean != *s {
                let from = Value::String(std::mem::take(s)).to_string();
                let to = Value::String(clean.clone()).to_string();
                changes.push((from, to));
                *s = clean;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| scrub_value(x, changes)),
        Value::Object(o) => o.values_mut().for_each(|x| scrub_value(x, changes)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballista_never_logs_below_info_whatever_the_filter() {
        use tracing::Level;
        for t in [
            "ballista",
            "ballista_core::extension",
            "ballista_executor::executor_process",
            "ballista_scheduler",
        ] {
            assert!(!shown(t, &Level::TRACE), "{t}");
            assert!(!shown(t, &Level::DEBUG), "{t}");
            assert!(shown(t, &Level::INFO), "{t}");
            assert!(shown(t, &Level::WARN), "{t}");
        }
        for t in [
            "event_backfill::run",
            "datafusion",
            "ballistic",
            "object_store",
        ] {
            assert!(shown(t, &Level::TRACE), "{t}");
        }
    }

    #[test]
    fn a_bare_level_is_ours_and_the_retries() {
        let f = filter(Some("debug"), "info", false).unwrap().to_string();
        assert!(f.contains("event_backfill=debug"), "{f}");
        assert!(f.contains("object_store::client::retry=debug"), "{f}");
        let f = filter(Some("warn"), "info", false).unwrap().to_string();
        assert!(f.contains("object_store::client::retry=info"), "{f}");
        let f = filter(None, "warn", true).unwrap().to_string();
        assert!(f.contains("event_backfill::progress=info"), "{f}");
    }

    #[test]
    fn a_word_that_is_no_level_is_refused_not_taken_for_a_target() {
        for typo in ["inf", "warning", "99", "info\nwarn", "object_store"] {
            let e = filter(Some(typo), "info", false).unwrap_err();
            assert!(e.contains("is not a level"), "{typo}: {e}");
        }
        assert!(filter(Some("object_store=trace"), "info", false).is_ok());
        assert!(filter(Some(" WARN "), "info", false).is_ok());
    }

    #[test]
    fn control_characters_are_escaped_and_the_tab_kept() {
        assert_eq!(
            printable("a\nb\r\u{1b}[31mc\u{7}\td"),
            "a\\nb\\r\\u{1b}[31mc\\u{7}\td"
        );
        assert_eq!(printable("plain é"), "plain é");
        assert_eq!(
            escape_controls("\u{1b}[2mINFO\u{1b}[0m x\ny\u{2028}", &['\u{1b}']),
            "\u{1b}[2mINFO\u{1b}[0m x\\ny\\u{2028}"
        );
    }

    #[test]
    fn a_filter_is_taken_as_written_and_a_bad_one_says_how_to_fix_it() {
        let f = filter(Some("info,object_store=debug"), "info", false)
            .unwrap()
            .to_string();
        assert!(f.contains("object_store=debug"), "{f}");
        let e = filter(Some("info,a=loud"), "info", false).unwrap_err();
        assert!(e.contains("give a level"), "{e}");
    }

    /// A URL with user info in one field does not take the next field
    /// with it, and the line stays JSON.
    #[test]
    fn json_lines_are_scrubbed_value_by_value() {
        let line = r#"{"message":"reading s3://AKIA:se/cr@et@bucket/x","location":"kafka://u:pw@host:9092/t","n":3}"#;
        let out = scrub_line(line, true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["message"], "reading s3://***@bucket/x");
        assert_eq!(v["location"], "kafka://***@host:9092/t");
        assert_eq!(v["n"], 3);
        assert!(!out.contains("se/cr") && !out.contains("pw@"), "{out}");
        // In place: the fields keep their order.
        assert!(
            out.starts_with(r#"{"message":"reading s3://***@bucket/x","location""#),
            "{out}"
        );
        let clean = r#"{"timestamp":"t","level":"INFO","message":"m"}"#;
        assert_eq!(scrub_line(clean, true), clean);
    }
}
