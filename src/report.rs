//! What a run did: one serializable struct, printed as a human summary on
//! stdout and written as JSON with `--report`. Metrics are data, not log
//! lines, so Airflow and scripts read the same numbers people see.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::sink::SinkReceipt;

/// Deserialize reads a report back from a log entry (a recovered attempt's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub run_id: String,
    pub dry_run: bool,
    /// The run id was committed before; this invocation did nothing.
    pub already_committed: bool,
    /// The exit code the run ended with, as committed: 0, or 3 when
    /// `--fail-on-dlq` was given and it dead-lettered an event. A rerun of
    /// a committed run id carries the committed run's code (and exits with
    /// it). Absent in a dry run, and for runs committed by versions that
    /// did not record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    /// Earlier committed runs whose interrupted publishing this run finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled_forward: Vec<String>,
    /// This invocation committed an earlier attempt of the same run id that
    /// had delivered everything but crashed before its commit (its nonce):
    /// nothing was sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_attempt: Option<String>,
    pub window_from: Option<String>,
    pub window_to: Option<String>,
    /// The shard this run decided (`--shard I/N`): its events, gaps and
    /// conflicts are that shard's alone (see [`merge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::Shard>,
    /// The Ballista scheduler the detection ran on (`--cluster`); its
    /// executors' reads are not in `bytes_scanned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The shard runs a merged report sums ([`merge`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Archive rows inside the window.
    pub rows: u64,
    pub files_scanned: u64,
    pub files_pruned: u64,
    pub partitions_pruned: u64,
    pub row_groups_pruned: u64,
    pub bytes_scanned: u64,
    /// Distinct event_ids inside the window.
    pub events: u64,
    pub resolved: u64,
    pub replayed: u64,
    pub dead_lettered: u64,
    pub dead_lettered_by_reason: BTreeMap<String, u64>,
    pub skipped_dead_lettered: u64,
    /// Unresolved events left out of this run by a barrier (`--on-gap
    /// hold`, `--on-conflict hold`): not written, not in the ledger; a
    /// later run decides them again. By reason: `held_by_gap`,
    /// `held_by_conflict`.
    pub held: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held_by_reason: BTreeMap<String, u64>,
    /// Gap ranges, and the events they miss.
    pub gaps: u64,
    pub missing_events: u64,
    /// (key, seq) pairs carried by more than one event_id.
    pub conflicts: u64,
    /// Silent intervals found (`[detect.silence]`; 0 when not asked).
    pub silences: u64,
    /// Flagged volume buckets (`[detect.volume]`; 0 when not asked).
    pub anomalies: u64,
    /// `--reconcile-snapshot`: the snapshot's keys by status (absent when
    /// not asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<crate::reconcile::Counts>,
    /// Resolved events with an error-level log line after their processed
    /// row (`--logs`; 0 without logs). Outside the balance: they are
    /// resolved, and reported, never replayed.
    #[serde(default)]
    pub contradicted: u64,
    /// What the logs held (`--logs`), absent without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogFigures>,
    /// Kafka-source messages that did not decode, dead-lettered as
    /// `undecodable` (not events: outside the balance above).
    pub undecodable_dead_lettered: u64,
    /// Undecodable messages an earlier run already dead-lettered.
    pub undecodable_skipped: u64,
    /// Messages read from Kafka sources.
    pub kafka_messages: u64,
    /// Per sink kind: where its rows went.
    pub outputs: BTreeMap<String, SinkReceipt>,
    pub state: Option<String>,
    /// Bytes the detection wrote to its spill files (0 when the window
    /// fitted the memory limit).
    pub spilled_bytes: u64,
    /// Wall time of each phase (list, scan, gaps, decide, commit), to see
    /// where a run's time went.
    pub phase_ms: BTreeMap<String, u64>,
    pub elapsed_ms: u64,
    /// Gap recovery (`--recover-from`): absent without it.
    #[serde(flatten)]
    pub recovery: Option<Recovery>,
    /// Set for `backfill redrive`: what it selected from the DLQ and why
    /// rows were left out. Its `replayed` is the dead letters it sent;
    /// the archive's figures (events, rows, ...) stay 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<Redrive>,
}

/// The figures of gap recovery (`--recover-from`). The events recovered
/// and decided by this run are counted in `events` and balance like the
/// archive's; those an earlier run already replayed or dead-lettered are
/// `recovered_skipped`, outside the balance (this run decides nothing
/// about them), so that a later run never sends them again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// Gaps whose every missing seq the topic still holds.
    pub gaps_recoverable: u64,
    /// Gaps of which the topic holds some missing seqs.
    pub gaps_partial: u64,
    /// Gaps of which the topic holds none (beyond its retention): report
    /// them upstream.
    pub gaps_lost: u64,
    /// Distinct events found in the topic for the gaps.
    pub recovered: u64,
    /// Of those, the ones an earlier committed run already replayed or
    /// dead-lettered (the ledger): not decided again.
    pub recovered_skipped: u64,
    /// Messages read from the recovery topic.
    pub recovery_messages: u64,
}

/// The figures of a redrive ([`crate::run::redrive`]): the dead letters
/// the predicate selected balance as `selected = replayed +
/// already_redriven + without_event_id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Redrive {
    /// The DLQ folder the dead letters were read from.
    pub dlq: String,
    /// The `--where` predicate, as given.
    pub predicate: String,
    /// `--again`: dead letters redriven before were sent again.
    pub again: bool,
    /// Dead letters of committed runs the predicate selected.
    pub selected: u64,
    /// Selected, but an earlier committed redrive sent them (left out
    /// without `--again`).
    pub already_redriven: u64,
    /// Selected, but without an event_id (undecodable Kafka messages, rows
    /// dead-lettered as missing_event_id): nothing could record them, so
    /// they are never redriven.
    pub without_event_id: u64,
    /// Per run that dead-lettered them: how many were sent.
    pub of_runs: BTreeMap<String, u64>,
}

impl Report {
    /// The balance the README promises; checked before every commit.
    /// Summed in u128: the check itself must not overflow.
    pub fn balances(&self) -> bool {
        self.events as u128
            == self.resolved as u128
                + self.replayed as u128
                + self.dead_lettered as u128
                + self.skipped_dead_lettered as u128
                + self.held as u128
    }

    /// The balance as an equation, for a message saying it does not hold.
    pub fn balance_equation(&self) -> String {
        format!(
            "{} events != {} resolved + {} replayed + {} dead-lettered + {} already in the DLQ + {} held",
            self.events,
            self.resolved,
            self.replayed,
            self.dead_lettered,
            self.skipped_dead_lettered,
            self.held
        )
    }

    /// How a run with these figures ends: 3 when `--fail-on-dlq` was given
    /// and it dead-lettered an event, else 0 (the README's exit codes).
    /// Recorded with the commit, so that a rerun of the run id ends the
    /// same way; `main` applies the same rule to the report it is handed.
    pub fn exit_code_under(&self, fail_on_dlq: bool) -> u8 {
        if fail_on_dlq && self.dead_lettered > 0 {
            crate::error::EXIT_DLQ
        } else {
            crate::error::EXIT_OK
        }
    }

    /// Add a batch of gaps' `missing_count` values to `missing_events`,
    /// saturating: a span of seqs wider than u64 (or several near i64::MAX)
    /// must read as "huge", never wrap to a small number. Negative or NULL
    /// counts (which the gaps view never produces) add nothing.
    pub fn add_missing_counts(&mut self, counts: &dyn arrow::array::Array) {
        use arrow::array::{Array, AsArray};
        let Ok(c) = arrow::compute::cast(counts, &arrow::datatypes::DataType::Int64) else {
            return;
        };
        let c = c.as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..c.len() {
            if c.is_valid(i) {
                let v = u64::try_from(c.value(i)).unwrap_or(0);
                self.missing_events = self.missing_events.saturating_add(v);
            }
        }
    }

    /// The human summary, for a run that ends with its recorded code (0
    /// when none is recorded, as in a dry run).
    pub fn human(&self) -> String {
        self.human_with(self.exit_code.unwrap_or(crate::error::EXIT_OK))
    }

    /// The human summary of a run that exits with `code`: a head line,
    /// aligned figures with units and absolute paths, and one outcome line
    /// last ([`Report::outcome_line`]), the line a scheduler that keeps the
    /// last line of output shows.
    pub fn human_with(&self, code: u8) -> String {
        use crate::human::{bytes, count, location, millis};
        if let Some(r) = &self.redrive
            && !self.already_committed
        {
            return self.redrive_human(r, code);
        }
        let mut s = String::new();
        let head = if self.already_committed {
            let then = match self.exit_code {
                Some(crate::error::EXIT_DLQ) => format!(
                    " (it exited 3: {} dead-lettered under --fail-on-dlq)",
                    self.dead_lettered
                ),
                Some(code) if code != crate::error::EXIT_OK => format!(" (it exited {code})"),
                _ => String::new(),
            };
            let what = if self.redrive.is_some() {
                "redrive"
            } else {
                "run"
            };
            format!(
                "{what} {} is already committed; nothing to do{then}",
                self.run_id
            )
        } else if self.dry_run {
            format!(
                "run {} (dry run: nothing written or committed)",
                self.run_id
            )
        } else if let Some(a) = &self.recovered_attempt {
            format!(
                "run {} committed (recovered attempt {a}, which had delivered everything before a crash; nothing sent again)",
                self.run_id
            )
        } else {
            format!("run {} committed", self.run_id)
        };
        let _ = writeln!(s, "{head}");
        if self.already_committed {
            return s;
        }
        const LABEL: usize = 16;
        let window = match (&self.window_from, &self.window_to) {
            (None, None) => "whole archive".to_string(),
            (f, t) => format!(
                "[{}, {})",
                f.as_deref().unwrap_or("-inf"),
                t.as_deref().unwrap_or("+inf")
            ),
        };
        let _ = writeln!(s, "  {:<LABEL$}{window}", "window");
        if let Some(sh) = self.shard {
            let _ = writeln!(
                s,
                "  {:<LABEL$}{} of {} (keys with FNV-1a(key) mod {} = {})",
                "shard", sh.index, sh.count, sh.count, sh.index
            );
        }
        if !self.merged_from.is_empty() {
            let _ = writeln!(
                s,
                "  {:<LABEL$}{} shard runs: {}",
                "merged",
                self.merged_from.len(),
                self.merged_from.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  {:<LABEL$}{} rows, {}, in {} files ({} pruned by the window)",
            "scanned",
            count(self.rows),
            match &self.cluster {
                Some(c) => format!("by the executors of {c}"),
                None => bytes(self.bytes_scanned),
            },
            count(self.files_scanned),
            count(self.files_pruned)
        );
        // The counts, right-aligned in one column, a note after each.
        let by_reason = self
            .dead_lettered_by_reason
            .iter()
            .map(|(k, v)| format!("{k} {}", count(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut figures: Vec<(&str, u64, String)> = vec![
            ("events", self.events, String::new()),
            ("resolved", self.resolved, String::new()),
            ("replayed", self.replayed, String::new()),
            ("dead-lettered", self.dead_lettered, by_reason),
            ("already in DLQ", self.skipped_dead_lettered, String::new()),
        ];
        // Only when a barrier held something: the summary of a default run
        // stays as it was.
        if self.held > 0 {
            let by_reason = self
                .held_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {}", count(*v)))
                .collect::<Vec<_>>()
                .join(", ");
            figures.push(("held", self.held, by_reason));
        }
        figures.extend([
            (
                "gaps",
                self.gaps,
                format!("{} missing events", count(self.missing_events)),
            ),
            ("conflicts", self.conflicts, String::new()),
        ]);
        if let Some(r) = &self.recovery {
            figures.push((
                "recovered",
                r.recovered,
                format!(
                    "gaps {} recoverable, {} partial, {} lost; {} already replayed or dead-lettered",
                    count(r.gaps_recoverable),
                    count(r.gaps_partial),
                    count(r.gaps_lost),
                    count(r.recovered_skipped)
                ),
            ));
        }
        if self.outputs.contains_key("silences") || self.silences > 0 {
            figures.push(("silences", self.silences, String::new()));
        }
        if self.outputs.contains_key("anomalies") || self.anomalies > 0 {
            figures.push(("anomalies", self.anomalies, String::new()));
        }
        if let Some(r) = &self.reconcile {
            figures.push((
                "disagree",
                r.disagreeing(),
                format!(
                    "of {} in the snapshot's comparison ({} missing downstream, {} missing in the archive); {} explained by unresolved events",
                    count(r.keys),
                    count(r.missing_downstream),
                    count(r.missing_archive),
                    count(r.explained)
                ),
            ));
        }
        if let Some(l) = &self.logs {
            figures.push((
                "contradicted",
                self.contradicted,
                format!(
                    "processed, then an error logged; from {} log lines in {} files, {} at an error level naming {} events",
                    count(l.lines),
                    count(l.files),
                    count(l.error_lines),
                    count(l.error_events)
                ),
            ));
        }
        if self.kafka_messages > 0 {
            figures.push((
                "kafka messages",
                self.kafka_messages,
                format!(
                    "{} undecodable dead-lettered, {} already in the DLQ",
                    count(self.undecodable_dead_lettered),
                    count(self.undecodable_skipped)
                ),
            ));
        }
        let width = figures
            .iter()
            .map(|(_, n, _)| count(*n).len())
            .max()
            .unwrap_or(1);
        for (label, n, note) in &figures {
            let line = format!("  {label:<LABEL$}{:>width$}  {note}", count(*n));
            let _ = writeln!(s, "{}", line.trim_end());
        }
        // Where the rows went: one line a sink, in the order of the flow.
        let written: Vec<(&str, &crate::sink::SinkReceipt)> = ["replay", "dlq", "gaps"]
            .into_iter()
            .chain(
                self.outputs
                    .keys()
                    .map(String::as_str)
                    .filter(|k| !["replay", "dlq", "gaps"].contains(k)),
            )
            .filter_map(|k| self.outputs.get(k).map(|r| (k, r)))
            .collect();
        let rows_width = written
            .iter()
            .map(|(_, r)| count(r.rows).len())
            .max()
            .unwrap_or(1);
        for (i, (kind, r)) in written.iter().enumerate() {
            let what = match *kind {
                "replay" => "replays",
                "dlq" => "dead letters",
                "gaps" => "gap records",
                "silences" => "silences",
                "anomalies" => "anomalies",
                "reconcile" => "keys",
                "contradicted" => "contradicted",
                other => other,
            };
            let place = match r.outputs.as_slice() {
                [] if self.dry_run => location(&r.target),
                [] => format!("{} (nothing written)", location(&r.target)),
                outputs => shown_outputs(&r.target, outputs),
            };
            let label = match (i, self.dry_run) {
                (0, true) => "would write",
                (0, false) => "written",
                _ => "",
            };
            let _ = writeln!(
                s,
                "  {label:<LABEL$}{:>rows_width$} {what:<12}  {place}",
                count(r.rows)
            );
        }
        if let Some(st) = &self.state {
            let _ = writeln!(s, "  {:<LABEL$}{}", "state", location(st));
        }
        let phases: Vec<String> = [
            "list",
            "logs",
            "scan",
            "gaps",
            "contradicted",
            "decide",
            "commit",
            "publish",
        ]
        .into_iter()
        .filter_map(|p| {
            self.phase_ms
                .get(p)
                .map(|ms| format!("{p} {}", millis(*ms)))
        })
        .collect();
        let detail = if phases.is_empty() {
            String::new()
        } else {
            format!(" ({})", phases.join(", "))
        };
        let _ = writeln!(
            s,
            "  {:<LABEL$}{}{detail}",
            "elapsed",
            millis(self.elapsed_ms)
        );
        let _ = writeln!(s, "{}", self.outcome_line(code));
        s
    }

    /// A redrive's summary: what the predicate selected, what was sent
    /// where, what was left out and why, and the outcome line.
    fn redrive_human(&self, r: &Redrive, code: u8) -> String {
        use crate::human::{count, location, millis};
        const LABEL: usize = 18;
        let mut s = String::new();
        let head = if self.dry_run {
            format!(
                "redrive {} (dry run: nothing sent or committed)",
                self.run_id
            )
        } else {
            format!("redrive {} committed", self.run_id)
        };
        let _ = writeln!(s, "{head}");
        let _ = writeln!(s, "  {:<LABEL$}{}", "dlq", location(&r.dlq));
        let _ = writeln!(s, "  {:<LABEL$}{}", "where", r.predicate);
        let of_runs = r
            .of_runs
            .iter()
            .map(|(k, v)| format!("{k} {}", count(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        let again = if r.again { "  (--again)" } else { "" };
        let figures: [(&str, u64, String); 4] = [
            ("selected", r.selected, String::new()),
            (
                if self.dry_run { "would send" } else { "sent" },
                self.replayed,
                if of_runs.is_empty() {
                    String::new()
                } else {
                    format!("dead-lettered by {of_runs}")
                },
            ),
            (
                "already redriven",
                r.already_redriven,
                if r.already_redriven > 0 && !r.again {
                    "left out: --again sends them again".to_string()
                } else {
                    again.trim().to_string()
                },
            ),
            (
                "without event_id",
                r.without_event_id,
                if r.without_event_id > 0 {
                    "left out: a dead letter without an id cannot be recorded".to_string()
                } else {
                    String::new()
                },
            ),
        ];
        let width = figures
            .iter()
            .map(|(_, n, _)| count(*n).len())
            .max()
            .unwrap_or(1);
        for (label, n, note) in &figures {
            let line = format!("  {label:<LABEL$}{:>width$}  {note}", count(*n));
            let _ = writeln!(s, "{}", line.trim_end());
        }
        if let Some(o) = self.outputs.get("replay") {
            let place = match o.outputs.as_slice() {
                [] => location(&o.target),
                outputs => shown_outputs(&o.target, outputs),
            };
            let _ = writeln!(s, "  {:<LABEL$}{place}", "to");
        }
        if let Some(st) = &self.state {
            let _ = writeln!(s, "  {:<LABEL$}{}", "state", location(st));
        }
        let _ = writeln!(s, "  {:<LABEL$}{}", "elapsed", millis(self.elapsed_ms));
        let _ = writeln!(s, "{}", self.outcome_line(code));
        s
    }

    /// The run in one line, ending with its exit code: `run R committed:
    /// 165 replayed, 86 dead-lettered, 11 gaps, 4 conflicts in 1.2 s; exit 0`.
    pub fn outcome_line(&self, code: u8) -> String {
        use crate::human::{count, millis};
        let what = if self.redrive.is_some() {
            "redrive"
        } else {
            "run"
        };
        if self.already_committed {
            return format!(
                "{what} {} is already committed; nothing to do; exit {code}",
                self.run_id
            );
        }
        if self.redrive.is_some() {
            return if self.dry_run {
                format!(
                    "redrive {} dry run: would send {} dead letters; nothing sent; exit {code}",
                    self.run_id,
                    count(self.replayed)
                )
            } else {
                format!(
                    "redrive {} committed: {} dead letters sent in {}; exit {code}",
                    self.run_id,
                    count(self.replayed),
                    millis(self.elapsed_ms)
                )
            };
        }
        let figures = format!(
            "{} replayed, {} dead-lettered, {} gaps, {} conflicts in {}",
            count(self.replayed),
            count(self.dead_lettered),
            count(self.gaps),
            count(self.conflicts),
            millis(self.elapsed_ms)
        );
        let why = if code == crate::error::EXIT_DLQ {
            " (dead letters under --fail-on-dlq)"
        } else {
            ""
        };
        if self.dry_run {
            format!(
                "run {} dry run: would have {figures}; nothing written; exit {code}{why}",
                self.run_id
            )
        } else {
            format!("run {} committed: {figures}; exit {code}{why}", self.run_id)
        }
    }
}

/// A sink's outputs as the summary shows them: the first and how many
/// more. A file is a path or URL of its own; a Kafka span (`topic/p:a-b`)
/// or a Redis stream is not a place on its own, so it follows its sink's
/// URL instead of being taken for a relative path.
fn shown_outputs(target: &str, outputs: &[String]) -> String {
    let Some(first) = outputs.first() else {
        return crate::human::location(target);
    };
    let first =
        if target.contains("://") && !target.starts_with("file://") && !first.contains("://") {
            format!("{} [{first}]", crate::human::location(target))
        } else {
            crate::human::location(first)
        };
    match outputs.len() {
        1 => first,
        n => format!("{first} (+{} more)", crate::human::count(n as u64 - 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    #[test]
    fn kafka_spans_follow_their_url_and_files_stand_alone() {
        let spans = ["orders/0:0-475".to_string(), "orders/1:0-12".to_string()];
        assert_eq!(
            shown_outputs("kafka://b:9092/orders", &spans),
            "kafka://b:9092/orders [orders/0:0-475] (+1 more)"
        );
        let file = ["s3://lake/out/replay/part-0.parquet".to_string()];
        assert_eq!(shown_outputs("s3://lake/out/replay", &file), file[0]);
        let local = ["/data/out/replay/part-0.parquet".to_string()];
        assert_eq!(shown_outputs("/data/out/replay", &local), local[0]);
    }

    /// Regression: the sum over gaps wrapped around on huge seq spans.
    #[test]
    fn missing_counts_saturate() {
        let mut r = Report::default();
        r.add_missing_counts(&Int64Array::from(vec![
            Some(i64::MAX),
            Some(i64::MAX),
            None,
        ]));
        assert_eq!(r.missing_events, u64::MAX - 1);
        r.add_missing_counts(&Int64Array::from(vec![i64::MAX, 5, -3]));
        assert_eq!(r.missing_events, u64::MAX);
    }

    #[test]
    fn balance_check_does_not_overflow() {
        let r = Report {
            events: 1,
            resolved: u64::MAX,
            replayed: 2,
            ..Default::default()
        };
        assert!(!r.balances());
    }
}

/// Why shard reports cannot be merged.
#[derive(Debug, PartialEq)]
pub enum MergeError {
    /// The reports are not the N shards of one backfill (exit 2).
    Shards(String),
    /// A report, or their sum, breaks the balance (exit 1).
    Balance(String),
}

/// One report from the reports of the N shard runs of one backfill
/// (`backfill report merge`): every shard 0..N once, the same window, each
/// balancing; the counts of events, decisions, gaps, conflicts, rows and
/// bytes summed (each shard reads every file of the window, so the files
/// are counted once and the bytes as read), the phases and the elapsed
/// time the longest shard's (they run side by side). The sum must balance
/// too.
pub fn merge(reports: &[Report]) -> Result<Report, MergeError> {
    let shards = |m: String| Err(MergeError::Shards(m));
    let Some(first) = reports.first() else {
        return shards("no reports to merge".into());
    };
    let Some(count) = first.shard.map(|s| s.count) else {
        return shards(format!(
            "{} is not a shard's report (no --shard)",
            first.run_id
        ));
    };
    if count == 0 || count > crate::shard::MAX_SHARDS {
        return shards(format!(
            "{} claims {count} shards: a shard count is between 1 and {}",
            first.run_id,
            crate::shard::MAX_SHARDS
        ));
    }
    for r in reports {
        if let Some(s) = r.shard
            && s.index >= s.count
        {
            return shards(format!(
                "{} claims shard {s}, which does not exist",
                r.run_id
            ));
        }
    }
    // The id the shards share: each is `<base>-shard-I-of-N`.
    let base = |r: &Report| {
        r.shard.and_then(|s| {
            r.run_id
                .strip_suffix(&s.run_id_suffix())
                .filter(|b| !b.is_empty())
                .map(str::to_string)
        })
    };
    let Some(first_base) = base(first) else {
        return shards(format!(
            "'{}' is not a shard run's id (ID-shard-I-of-N)",
            first.run_id
        ));
    };
    let mut seen = vec![None::<&str>; count as usize];
    for r in reports {
        let Some(s) = r.shard else {
            return shards(format!("{} is not a shard's report (no --shard)", r.run_id));
        };
        if s.count != count {
            return shards(format!(
                "{} is shard {s} but {} is of {count} shards",
                r.run_id, first.run_id
            ));
        }
        if base(r).as_deref() != Some(first_base.as_str()) {
            return shards(format!(
                "'{}' is not a shard of {first_base}: not one backfill",
                r.run_id
            ));
        }
        if r.state != first.state {
            return shards(format!(
                "{} and {} committed to different states: not one backfill",
                first.run_id, r.run_id
            ));
        }
        if let Some(other) = seen[s.index as usize].replace(&r.run_id) {
            return shards(format!(
                "shard {s} is given twice: {other} and {}",
                r.run_id
            ));
        }
        if (&r.window_from, &r.window_to) != (&first.window_from, &first.window_to) {
            return shards(format!(
                "{} and {} have different windows: not one backfill",
                first.run_id, r.run_id
            ));
        }
        if r.dry_run != first.dry_run {
            return shards(format!(
                "{} and {} are not both dry runs",
                first.run_id, r.run_id
            ));
        }
        if !r.balances() {
            return Err(MergeError::Balance(format!(
                "{} does not balance: {}",
                r.run_id,
                r.balance_equation()
            )));
        }
    }
    let missing: Vec<usize> = (0..seen.len()).filter(|i| seen[*i].is_none()).collect();
    if !missing.is_empty() {
        // The first few: 4 reports of 65,536 shards miss 65,532.
        let mut named: Vec<String> = missing
            .iter()
            .take(8)
            .map(|i| format!("{i}/{count}"))
            .collect();
        if missing.len() > 8 {
            named.push(format!("and {} more", missing.len() - 8));
        }
        return shards(format!("missing the report of shard {}", named.join(", ")));
    }
    let mut m = Report {
        run_id: first_base,
        dry_run: first.dry_run,
        // A rerun of a shard's id did nothing; the merge is "already
        // committed" only when every shard's was.
        already_committed: reports.iter().all(|r| r.already_committed),
        window_from: first.window_from.clone(),
        window_to: first.window_to.clone(),
        files_scanned: first.files_scanned,
        files_pruned: first.files_pruned,
        partitions_pruned: first.partitions_pruned,
        row_groups_pruned: first.row_groups_pruned,
        kafka_messages: first.kafka_messages,
        state: first.state.clone(),
        ..Report::default()
    };
    let mut ordered: Vec<&Report> = reports.iter().collect();
    ordered.sort_by_key(|r| r.shard.map(|s| s.index));
    for r in ordered {
        // Counts no run reaches: a report edited by hand.
        let add = |a: &mut u64, b: u64| -> Result<(), MergeError> {
            *a = a.checked_add(b).ok_or_else(|| {
                MergeError::Shards(format!(
                    "{}: its counts are too large to add up (edited by hand?)",
                    r.run_id
                ))
            })?;
            Ok(())
        };
        m.merged_from.push(r.run_id.clone());
        m.exit_code = m.exit_code.max(r.exit_code);
        add(&mut m.rows, r.rows)?;
        add(&mut m.bytes_scanned, r.bytes_scanned)?;
        add(&mut m.events, r.events)?;
        add(&mut m.resolved, r.resolved)?;
        add(&mut m.replayed, r.replayed)?;
        add(&mut m.dead_lettered, r.dead_lettered)?;
        for (reason, n) in &r.dead_lettered_by_reason {
            add(
                m.dead_lettered_by_reason.entry(reason.clone()).or_default(),
                *n,
            )?;
        }
        add(&mut m.skipped_dead_lettered, r.skipped_dead_lettered)?;
        add(&mut m.held, r.held)?;
        for (reason, n) in &r.held_by_reason {
            add(m.held_by_reason.entry(reason.clone()).or_default(), *n)?;
        }
        add(&mut m.gaps, r.gaps)?;
        if let Some(rr) = &r.recovery {
            let mr = m.recovery.get_or_insert_with(Recovery::default);
            add(&mut mr.gaps_recoverable, rr.gaps_recoverable)?;
            add(&mut mr.gaps_partial, rr.gaps_partial)?;
            add(&mut mr.gaps_lost, rr.gaps_lost)?;
            add(&mut mr.recovered, rr.recovered)?;
            add(&mut mr.recovered_skipped, rr.recovered_skipped)?;
            add(&mut mr.recovery_messages, rr.recovery_messages)?;
        }
        m.missing_events = m.missing_events.saturating_add(r.missing_events);
        add(&mut m.conflicts, r.conflicts)?;
        add(&mut m.contradicted, r.contradicted)?;
        // Every shard reads all of the logs.
        if m.logs.is_none() {
            m.logs = r.logs.clone();
        }
        add(
            &mut m.undecodable_dead_lettered,
            r.undecodable_dead_lettered,
        )?;
        add(&mut m.undecodable_skipped, r.undecodable_skipped)?;
        add(&mut m.spilled_bytes, r.spilled_bytes)?;
        for (kind, receipt) in &r.outputs {
            let out = m
                .outputs
                .entry(kind.clone())
                .or_insert_with(|| SinkReceipt {
                    target: receipt.target.clone(),
                    ..SinkReceipt::default()
                });
            add(&mut out.rows, receipt.rows)?;
            out.outputs.extend(receipt.outputs.iter().cloned());
        }
        for (phase, ms) in &r.phase_ms {
            let p = m.phase_ms.entry(phase.clone()).or_default();
            *p = (*p).max(*ms);
        }
        m.elapsed_ms = m.elapsed_ms.max(r.elapsed_ms);
    }
    if !m.balances() {
        return Err(MergeError::Balance(format!(
            "the shards' sum does not balance: {}",
            m.balance_equation()
        )));
    }
    Ok(m)
}

/// What a run's logs held (`--logs`): files and lines read, the lines at an
/// error level that name an event, and the events they name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LogFigures {
    pub files: u64,
    pub lines: u64,
    pub error_lines: u64,
    pub error_events: u64,
}
