//! The job's state as tables for `backfill sql`: `ledger_entries` (and so the
//! `ledger` and `candidates` views over it) from the ledger files the
//! committed runs name, exactly as `backfill run` reads them, and `runs`,
//! one row per committed run from the commit log (also what `backfill
//! runs list` prints).
//!
//! Read-only: this reads the log and registers tables over the ledger
//! files. It never rolls a run forward, never fences, never writes a byte
//! under the state location (a `sql` session over a production state must
//! not change what the next run decides).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, StringBuilder, TimestampMicrosecondBuilder, UInt8Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::error::Error;
use crate::location::{self, StorageSettings};
use crate::state::{Manifest, State};

/// The report counts `runs` carries as columns, in this order.
const COUNTS: [&str; 10] = [
    "rows",
    "events",
    "resolved",
    "replayed",
    "dead_lettered",
    "skipped_dead_lettered",
    "gaps",
    "missing_events",
    "conflicts",
    "files_scanned",
];

fn runs_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new("run_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("committed_at", ts.clone(), false),
        Field::new("window_from", ts.clone(), true),
        Field::new("window_to", ts, true),
        Field::new("shard", DataType::Utf8, true),
    ];
    fields.extend(
        COUNTS
            .iter()
            .map(|c| Field::new(*c, DataType::UInt64, true)),
    );
    fields.extend([
        Field::new("sinks", DataType::Utf8, false),
        Field::new("elapsed_ms", DataType::UInt64, true),
        Field::new("exit_code", DataType::UInt8, true),
        Field::new("based_on", DataType::UInt64, false),
        Field::new("report", DataType::Utf8, false),
        Field::new("settings", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// One row per committed run, in commit order.
fn runs_batch(manifests: &[Manifest]) -> Result<RecordBatch, Error> {
    let n = manifests.len();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut run_id = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut shard = StringBuilder::new();
    let mut sinks = StringBuilder::new();
    let mut elapsed = UInt64Builder::with_capacity(n);
    let mut exit_code = UInt8Builder::with_capacity(n);
    let mut committed = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut from = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut to = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut counts: Vec<UInt64Builder> = COUNTS
        .iter()
        .map(|_| UInt64Builder::with_capacity(n))
        .collect();
    let mut based_on = UInt64Builder::with_capacity(n);
    let mut report = StringBuilder::new();
    let mut settings = StringBuilder::new();
    let time = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_str())
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_micros())
    };
    for m in manifests {
        seq.append_value(m.seq);
        run_id.append_value(&m.run_id);
        kind.append_value(m.kind());
        committed.append_value(m.committed_at.timestamp_micros());
        from.append_option(time(m.report.get("window_from")));
        to.append_option(time(m.report.get("window_to")));
        shard.append_option(
            m.report
                .get("shard")
                .and_then(|s| serde_json::from_value::<crate::shard::Shard>(s.clone()).ok())
                .map(|s| s.to_string()),
        );
        for (b, c) in counts.iter_mut().zip(COUNTS) {
            b.append_option(m.report.get(c).and_then(|v| v.as_u64()));
        }
        // Where each kind of row went, in the order of the flow.
        let mut targets: Vec<(usize, String)> = m
            .outputs
            .iter()
            .map(|(k, r)| {
                (
                    sink_order(k),
                    format!("{k}={}", crate::human::location(&r.target)),
                )
            })
            .collect();
        targets.sort();
        let targets: Vec<String> = targets.into_iter().map(|(_, t)| t).collect();
        sinks.append_value(targets.join(" "));
        elapsed.append_option(m.report.get("elapsed_ms").and_then(|v| v.as_u64()));
        exit_code.append_option(m.outcome.map(|o| o.exit_code));
        based_on.append_value(m.based_on);
        report.append_value(m.report.to_string());
        if m.settings.is_null() {
            settings.append_null();
        } else {
            settings.append_value(m.settings.to_string());
        }
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(seq.finish()),
        Arc::new(run_id.finish()),
        Arc::new(kind.finish()),
        Arc::new(committed.finish()),
        Arc::new(from.finish()),
        Arc::new(to.finish()),
        Arc::new(shard.finish()),
    ];
    columns.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend([
        Arc::new(sinks.finish()) as ArrayRef,
        Arc::new(elapsed.finish()),
        Arc::new(exit_code.finish()),
        Arc::new(based_on.finish()),
        Arc::new(report.finish()),
        Arc::new(settings.finish()),
    ]);
    Ok(RecordBatch::try_new(runs_schema(), columns)?)
}

/// replay, dlq, gaps first (the flow), anything else after.
fn sink_order(kind: &str) -> usize {
    ["replay", "dlq", "gaps"]
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(3)
}

/// Register `runs` over these committed runs (`backfill runs list` prints
/// a projection of it through the shell's printers).
pub fn register_runs(ctx: &SessionContext, manifests: &[Manifest]) -> Result<(), Error> {
    let table = MemTable::try_new(runs_schema(), vec![vec![runs_batch(manifests)?]])?;
    ctx.register_table("runs", Arc::new(table))?;
    Ok(())
}

/// `runs` without a state: no rows, the same columns, so that a query
/// written for a job plans without one.
pub fn register_none(ctx: &SessionContext) -> Result<(), Error> {
    register_runs(ctx, &[])
}

/// Register `ledger_entries` and `runs` from the state at `location`, as the
/// next `backfill run` would read it: a damaged state (a log entry or a
/// ledger file missing) is the same error, naming the file.
pub async fn register(
    ctx: &SessionContext,
    location: &str,
    storage: &StorageSettings,
) -> Result<(), Error> {
    let state = State::new(location::resolve(location, storage)?);
    let snapshot = state.snapshot().await?;
    let manifests: Vec<Manifest> = snapshot.runs().cloned().collect();
    if manifests.is_empty() && state.is_empty().await? {
        // A typo in --state would otherwise read as "nothing done yet".
        let warning = crate::redact::line(&format!(
            "there is no backfill state at {location} yet: `ledger` and `runs` are empty"
        ));
        eprintln!("warning: {}", super::print::escape_error(&warning));
    }
    state.verify_ledgers(&manifests).await?;
    state.register_ledger(ctx, &manifests).await?;
    register_runs(ctx, &manifests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_rows_carry_the_reports_counts() {
        let m = Manifest {
            format_version: 2,
            seq: 3,
            based_on: 2,
            run_id: "r3".into(),
            nonce: "n".into(),
            committed_at: chrono::DateTime::parse_from_rfc3339("2024-02-01T00:00:00Z")
                .unwrap()
                .to_utc(),
            ledger_files: vec![],
            outputs: Default::default(),
            publish: vec![],
            report: serde_json::json!({
                "replayed": 7, "dead_lettered": 2,
                "window_from": "2024-01-31T00:00:00+00:00",
            }),
            delivered: vec![],
            settings: serde_json::Value::Null,
            outcome: None,
        };
        let b = runs_batch(&[m]).unwrap();
        let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
        let replayed = col("replayed");
        let replayed = replayed
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .unwrap();
        assert_eq!(replayed.value(0), 7);
        assert!(col("gaps").is_null(0), "absent from the report: NULL");
        assert!(!col("window_from").is_null(0));
        assert!(col("window_to").is_null(0));
        assert!(col("settings").is_null(0));
    }
}
