//! `backfill runs list` and `backfill runs show ID`: the history of a
//! state's committed runs, read from its commit log.
//!
//! Nothing here has a table or a printer of its own: `list` is a query over
//! the same `runs` table `backfill sql` registers ([`crate::shell::state`]),
//! printed by the shell's printers, and `show` reads the run's log entry
//! and its ledger files the way `run` reads them. Read-only: this module
//! never rolls a run forward, fences or writes under the state.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;

use crate::cli::{Format, RunsCommand, RunsListArgs, RunsShowArgs, StateLocArgs};
use crate::commands::{print_batches, state_location, write_stdout};
use crate::error::Error;
use crate::location;
use crate::report::Report;
use crate::state::{Manifest, State};

/// The columns of `runs list`: a projection of the `runs` table.
const LIST_SQL: &str = "SELECT run_id, kind, committed_at, window_from, window_to, \
     events, replayed, dead_lettered, gaps, conflicts, sinks, elapsed_ms \
     FROM runs ORDER BY seq";

/// What one run's ledger says, per outcome and reason.
const LEDGER_SQL: &str = "SELECT outcome, reason, count(*) AS events, \
     min(attempt) AS min_attempt, max(attempt) AS max_attempt \
     FROM ledger_entries WHERE run_id = $1 GROUP BY outcome, reason ORDER BY outcome, reason";

pub async fn runs(cmd: RunsCommand) -> Result<(), Error> {
    match cmd {
        RunsCommand::List(a) => list(a).await,
        RunsCommand::Show(a) => show(a).await,
    }
}

/// The state the flags name, and its committed runs. A location with no
/// state at all is a usage error: a typo in `--out` must not read as "no
/// runs yet".
async fn committed_runs(args: &StateLocArgs, what: &str) -> Result<(State, Vec<Manifest>), Error> {
    let (state, job) = state_location(args)?;
    let storage = job.storage.unwrap_or_default();
    let st = State::new(location::resolve(&state, &storage)?);
    let manifests = st.manifests().await?;
    if manifests.is_empty() && st.is_empty().await? {
        return Err(Error::Usage(format!(
            "{what}: there is no backfill state at {} (no commit log): check --out / --state",
            st.loc.display_path(&st.loc.prefix)
        )));
    }
    Ok((st, manifests))
}

/// `runs list` (and its old name, `state runs`).
pub async fn list(args: RunsListArgs) -> Result<(), Error> {
    let (_, manifests) = committed_runs(&args.loc, "runs list").await?;
    let ctx = SessionContext::new();
    crate::shell::state::register_runs(&ctx, &manifests)?;
    let df = ctx.sql(LIST_SQL).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    print_batches(schema, &batches, args.format)
}

/// `runs show ID`: the run's log entry, its report as committed and its
/// ledger counts.
pub async fn show(args: RunsShowArgs) -> Result<(), Error> {
    let (st, manifests) = committed_runs(&args.loc, "runs show").await?;
    let Some(m) = manifests.iter().find(|m| m.run_id == args.run_id) else {
        return Err(Error::Usage(format!(
            "runs show: no committed run '{}' in the state {} ({} committed; `backfill runs list` shows them)",
            args.run_id,
            st.loc.display_path(&st.loc.prefix),
            manifests.len()
        )));
    };
    st.verify_ledgers(std::slice::from_ref(m)).await?;
    let ctx = SessionContext::new();
    st.register_ledger(&ctx, std::slice::from_ref(m)).await?;
    let df = ctx.sql(LEDGER_SQL).await?.with_param_values(vec![
        datafusion::scalar::ScalarValue::from(m.run_id.as_str()),
    ])?;
    let ledger_schema = Arc::new(df.schema().as_arrow().clone());
    let ledger = df.collect().await?;
    match args.format {
        Format::Table => {
            let report: Report = serde_json::from_value(m.report.clone()).unwrap_or_default();
            let head = format!(
                "{} {}: committed {} at log position {} (read the log at {})\n",
                m.kind(),
                m.run_id,
                m.committed_at.to_rfc3339(),
                m.seq,
                m.based_on
            );
            write_stdout(head.as_bytes())?;
            write_stdout(report.human().as_bytes())?;
            write_stdout(format!("\nledger of {}:\n", m.run_id).as_bytes())?;
            print_batches(ledger_schema, &ledger, Format::Table)
        }
        Format::Json | Format::Ndjson => {
            let v = as_json(m, &ledger)?;
            let text = if args.format == Format::Json {
                serde_json::to_string_pretty(&v)
            } else {
                serde_json::to_string(&v)
            }
            .map_err(|e| Error::Internal(format!("runs show: {e}")))?;
            write_stdout(format!("{text}\n").as_bytes())
        }
        Format::Csv | Format::Tsv => {
            let mut pairs = vec![];
            flatten("", &as_json(m, &ledger)?, &mut pairs);
            let schema = Arc::new(Schema::new(vec![
                Field::new("field", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ]));
            let fields: ArrayRef = Arc::new(StringArray::from_iter_values(
                pairs.iter().map(|(f, _)| f.as_str()),
            ));
            let values: ArrayRef = Arc::new(StringArray::from_iter(
                pairs.iter().map(|(_, v)| v.as_deref()),
            ));
            let batch = RecordBatch::try_new(schema.clone(), vec![fields, values])?;
            print_batches(schema, &[batch], args.format)
        }
    }
}

/// One committed run as one JSON object: its entry's facts, its settings,
/// its report as committed, and its ledger counts.
fn as_json(m: &Manifest, ledger: &[RecordBatch]) -> Result<serde_json::Value, Error> {
    let mut buf = vec![];
    {
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        for b in ledger {
            w.write(b)?;
        }
        w.finish()?;
    }
    let ledger: serde_json::Value = if buf.is_empty() {
        serde_json::json!([])
    } else {
        serde_json::from_slice(&buf)
            .map_err(|e| Error::Internal(format!("runs show: the ledger counts: {e}")))?
    };
    Ok(serde_json::json!({
        "run_id": m.run_id,
        "kind": m.kind(),
        "seq": m.seq,
        "based_on": m.based_on,
        "committed_at": m.committed_at.to_rfc3339(),
        "exit_code": m.outcome.map(|o| o.exit_code),
        "settings": m.settings,
        "report": m.report,
        "ledger": ledger,
    }))
}

/// A JSON value as `(dotted.path, text)` pairs, one per scalar: objects by
/// key, arrays by index, except the ledger's rows, which are named by
/// their outcome and reason (`ledger.dlq.max_attempts_exceeded.events`).
fn flatten(path: &str, v: &serde_json::Value, out: &mut Vec<(String, Option<String>)>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                flatten(&join(k), v, out);
            }
        }
        Value::Array(items) if path == "ledger" => {
            for row in items {
                let name = |k: &str| {
                    row.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                let at = format!("ledger.{}.{}", name("outcome"), name("reason"));
                for k in ["events", "min_attempt", "max_attempt"] {
                    if let Some(v) = row.get(k) {
                        flatten(&format!("{at}.{k}"), v, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&join(&i.to_string()), v, out);
            }
        }
        Value::Null => out.push((path.to_string(), None)),
        Value::String(s) => out.push((path.to_string(), Some(s.clone()))),
        other => out.push((path.to_string(), Some(other.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_names_ledger_rows_by_outcome_and_reason() {
        let v = serde_json::json!({
            "run_id": "r1",
            "report": {"replayed": 3, "outputs": {"replay": {"outputs": ["a", "b"]}}},
            "exit_code": null,
            "ledger": [{"outcome": "dlq", "reason": "permanent_error", "events": 2,
                        "min_attempt": 0, "max_attempt": 1}],
        });
        let mut out = vec![];
        flatten("", &v, &mut out);
        let get = |k: &str| {
            out.iter()
                .find(|(f, _)| f == k)
                .unwrap_or_else(|| panic!("{k} in {out:?}"))
                .1
                .clone()
        };
        assert_eq!(get("run_id").as_deref(), Some("r1"));
        assert_eq!(get("report.replayed").as_deref(), Some("3"));
        assert_eq!(get("report.outputs.replay.outputs.1").as_deref(), Some("b"));
        assert_eq!(get("exit_code"), None);
        assert_eq!(
            get("ledger.dlq.permanent_error.events").as_deref(),
            Some("2")
        );
        assert_eq!(
            get("ledger.dlq.permanent_error.max_attempt").as_deref(),
            Some("1")
        );
    }
}
