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
    /// Gap ranges, and the events they miss.
    pub gaps: u64,
    pub missing_events: u64,
    /// (key, seq) pairs carried by more than one event_id.
    pub conflicts: u64,
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

    /// The human summary.
    pub fn human(&self) -> String {
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
            format!(
                "run {} is already committed; nothing to do{then}",
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
        let window = match (&self.window_from, &self.window_to) {
            (None, None) => "whole archive".to_string(),
            (f, t) => format!(
                "[{}, {})",
                f.as_deref().unwrap_or("-inf"),
                t.as_deref().unwrap_or("+inf")
            ),
        };
        let _ = writeln!(s, "  window            {window}");
        let _ = writeln!(
            s,
            "  scanned           {} rows in {} files ({} pruned), {} bytes",
            self.rows, self.files_scanned, self.files_pruned, self.bytes_scanned
        );
        let _ = writeln!(s, "  events            {}", self.events);
        let _ = writeln!(s, "  resolved          {}", self.resolved);
        let _ = writeln!(s, "  replayed          {}", self.replayed);
        let _ = writeln!(s, "  dead-lettered     {}", self.dead_lettered);
        for (k, v) in &self.dead_lettered_by_reason {
            let _ = writeln!(s, "    {k:<22}{v}");
        }
        let _ = writeln!(s, "  skipped (in DLQ)  {}", self.skipped_dead_lettered);
        let _ = writeln!(
            s,
            "  gaps              {} ({} missing events)",
            self.gaps, self.missing_events
        );
        let _ = writeln!(s, "  conflicts         {}", self.conflicts);
        if self.kafka_messages > 0 {
            let _ = writeln!(
                s,
                "  kafka messages    {} ({} undecodable dead-lettered, {} already in the DLQ)",
                self.kafka_messages, self.undecodable_dead_lettered, self.undecodable_skipped
            );
        }
        for (kind, r) in &self.outputs {
            let first = r.outputs.first().map(String::as_str).unwrap_or("(no rows)");
            let more = if r.outputs.len() > 1 {
                format!(" (+{} more files)", r.outputs.len() - 1)
            } else {
                String::new()
            };
            let _ = writeln!(s, "  {kind:<18}{} rows -> {first}{more}", r.rows);
        }
        if let Some(st) = &self.state {
            let _ = writeln!(s, "  state             {st}");
        }
        let _ = writeln!(s, "  elapsed           {} ms", self.elapsed_ms);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

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
