//! Reconciliation: downstream totals that disagree with the archive.
//!
//! `backfill reconcile --snapshot LOC` compares a snapshot of the
//! downstream store (key, value, as_of: an account balance, an order
//! count, the last applied seq) per key with what the archive says the
//! downstream should hold at as_of: the job's `expected` aggregate over
//! the key's processed events up to then (`sql/reconcile.sql`, where the
//! rules are). Each disagreeing key comes with the unresolved events that
//! could explain it and whether they do, exactly.
//!
//! `run --reconcile-snapshot LOC` uses the same report to keep a run from
//! applying events twice: a key whose snapshot already reflects its
//! unresolved events (`explained`) has their replays held
//! (`held_by_reconcile`), and the disagreeing keys go to the run's
//! `reconcile` output. Reads the archive and the snapshot; records nothing
//! of its own in the state.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::job::JobError;
use crate::location::StorageSettings;

mod facts;

/// The columns of `reconcile_facts` the scope and the judgement read,
/// before those of the expected aggregate.
const FACT_COLUMNS: [&str; 6] = [
    "key",
    "event_id",
    "seq",
    "__bf_done",
    "__bf_as_of",
    "__bf_in_snapshot",
];

pub const RECONCILE_SQL: &str = include_str!("../../sql/reconcile.sql");

/// The job file's `[reconcile]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReconcileFile {
    /// The snapshot: a Parquet or .csv file, local or on an object store.
    pub snapshot: Option<String>,
    /// What the downstream holds per key, as an SQL aggregate over the
    /// key's processed events: `sum(amount)`, `count(*)`, `max(seq)`.
    pub expected: Option<String>,
    /// The snapshot's time, for a snapshot without an as_of column.
    pub as_of: Option<String>,
    /// The largest |actual − expected| that still agrees (default 0).
    pub tolerance: Option<f64>,
    /// The snapshot's column names, when not key, value, as_of.
    pub columns: Option<SnapshotColumns>,
}

/// `[reconcile.columns]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotColumns {
    pub key: Option<String>,
    pub value: Option<String>,
    pub as_of: Option<String>,
}

/// What the flags say (each overrides its job-file key).
#[derive(Debug, Clone, Default)]
pub struct Flags<'a> {
    pub snapshot: Option<&'a str>,
    pub expected: Option<&'a str>,
    pub as_of: Option<&'a str>,
    pub tolerance: Option<f64>,
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// Validated reconciliation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconcile {
    pub snapshot: String,
    /// The flag or key that named the snapshot, for error lines.
    pub snapshot_origin: &'static str,
    pub expected: String,
    pub expected_origin: &'static str,
    pub as_of: Option<DateTime<Utc>>,
    pub tolerance: f64,
    pub key_column: String,
    pub value_column: String,
    pub as_of_column: String,
}

/// The settings, or `None` when no snapshot is named (a run without
/// reconciliation). `snapshot_flag` is the flag's name in this command.
pub fn settings(
    file: Option<&ReconcileFile>,
    flags: &Flags<'_>,
    snapshot_flag: &'static str,
    expected_flag: &'static str,
) -> Result<Option<Reconcile>, JobError> {
    let empty = ReconcileFile::default();
    let file = file.unwrap_or(&empty);
    let (snapshot, snapshot_origin) = match (flags.snapshot, &file.snapshot) {
        (Some(s), _) => (s.to_string(), snapshot_flag),
        (None, Some(s)) => (s.clone(), "[reconcile] snapshot"),
        (None, None) => {
            if flags.expected.is_some() {
                return Err(invalid(
                    expected_flag,
                    format!(
                        "without {snapshot_flag} there is nothing to reconcile; give the downstream's snapshot too"
                    ),
                ));
            }
            return Ok(None);
        }
    };
    if snapshot.trim().is_empty() {
        return Err(invalid(
            snapshot_origin,
            "empty; name the downstream's snapshot (a Parquet or .csv file)",
        ));
    }
    let (expected, expected_origin) = match (flags.expected, &file.expected) {
        (Some(e), _) => (e.to_string(), expected_flag),
        (None, Some(e)) => (e.clone(), "[reconcile] expected"),
        (None, None) => {
            return Err(invalid(
                snapshot_origin,
                format!(
                    "say what the downstream holds per key with {expected_flag} (or [reconcile] expected), e.g. \"sum(amount)\", \"count(*)\", \"max(seq)\""
                ),
            ));
        }
    };
    if expected.trim().is_empty() {
        return Err(invalid(
            expected_origin,
            "empty; write an aggregate such as sum(amount)",
        ));
    }
    let as_of = match (flags.as_of, &file.as_of) {
        (Some(t), _) => Some(crate::job::parse_time("--as-of", t)?),
        (None, Some(t)) => Some(crate::job::parse_time("[reconcile] as_of", t)?),
        (None, None) => None,
    };
    let (tolerance, tolerance_origin) = match (flags.tolerance, file.tolerance) {
        (Some(t), _) => (t, "--tolerance"),
        (None, Some(t)) => (t, "[reconcile] tolerance"),
        (None, None) => (0.0, ""),
    };
    if !tolerance.is_finite() || tolerance < 0.0 {
        return Err(invalid(
            format!("{tolerance_origin} {tolerance}"),
            "not a non-negative number",
        ));
    }
    let columns = file.columns.clone().unwrap_or_default();
    let name = |v: Option<String>, default: &str, k: &str| -> Result<String, JobError> {
        let v = v.unwrap_or_else(|| default.to_string());
        if v.trim().is_empty() {
            return Err(invalid(
                format!("[reconcile.columns] {k}"),
                "empty; name the snapshot's column",
            ));
        }
        Ok(v)
    };
    Ok(Some(Reconcile {
        snapshot,
        snapshot_origin,
        expected,
        expected_origin,
        as_of,
        tolerance,
        key_column: name(columns.key, "key", "key")?,
        value_column: name(columns.value, "value", "value")?,
        as_of_column: name(columns.as_of, "as_of", "as_of")?,
    }))
}

/// The window must start at the archive's start: the downstream's value is
/// everything applied since it began, so a `--from` would leave out events
/// it holds (and their keys would look short, their events replayed again).
pub fn check_window(scan: &crate::job::Scan, what: &str) -> Result<(), JobError> {
    match scan.from {
        Some(from) => Err(invalid(
            format!("--from {}", from.to_rfc3339()),
            format!(
                "{what} compares the downstream's totals with every processed event up to the snapshot's time; a window that starts later leaves out events the downstream holds: drop --from (or from in the job file)"
            ),
        )),
        None => Ok(()),
    }
}

/// Register the snapshot as `snapshot` (`__bf_key`, `__bf_actual`,
/// `__bf_as_of`) and check `expected`; `events` and the detection views
/// must be registered.
pub async fn register(
    ctx: &SessionContext,
    r: &Reconcile,
    storage: &StorageSettings,
) -> Result<(), Error> {
    use crate::snapshot::Column;
    let columns = [
        Column {
            name: "__bf_key",
            source: &r.key_column,
            text: true,
            number: false,
            optional: false,
            hint: "; name it in [reconcile.columns] key",
        },
        Column {
            name: "__bf_actual",
            source: &r.value_column,
            text: false,
            number: true,
            optional: false,
            hint: "; name it in [reconcile.columns] value",
        },
        Column {
            name: "__bf_as_of",
            source: &r.as_of_column,
            text: false,
            number: false,
            optional: r.as_of.is_some(),
            hint: "; give the snapshot's time with --as-of, or name its column in [reconcile.columns] as_of",
        },
    ];
    crate::snapshot::register(
        ctx,
        "snapshot_file",
        r.snapshot_origin,
        &r.snapshot,
        storage,
        &columns,
    )
    .await?;
    let shown = crate::redact::url(&r.snapshot);
    // --as-of stands in for a missing column; beside one it would be
    // silently ignored, which a user who meant to override it would not see.
    if r.as_of.is_some()
        && ctx
            .table("snapshot_file__file")
            .await?
            .schema()
            .field_with_unqualified_name(&r.as_of_column)
            .is_ok()
    {
        return Err(Error::Usage(format!(
            "{} {shown}: the snapshot has its own `{}` column; --as-of (or [reconcile] as_of) is for a snapshot without one",
            r.snapshot_origin, r.as_of_column
        )));
    }
    // The file's column (a timestamp as it is, text parsed as RFC 3339,
    // anything else refused; NULLs the snapshot module refused), or --as-of
    // for a file without one.
    let as_of = match r.as_of {
        Some(t) => format!(
            "CAST('{}' AS TIMESTAMP)",
            t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ),
        None => {
            let file = ctx.table("snapshot_file").await?;
            match file
                .schema()
                .field_with_unqualified_name("__bf_as_of")?
                .data_type()
            {
                DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 | DataType::Null => {}
                t if crate::source::is_text(t) => {}
                other => {
                    return Err(Error::Usage(format!(
                        "{} {shown}: the column `{}` is {other}, not a time (a timestamp, or RFC 3339 text)",
                        r.snapshot_origin, r.as_of_column
                    )));
                }
            }
            "CAST(__bf_as_of AS TIMESTAMP)".to_string()
        }
    };
    ctx.sql(&format!(
        "CREATE OR REPLACE VIEW snapshot AS \
         SELECT __bf_key, __bf_actual, {as_of} AS __bf_as_of FROM snapshot_file"
    ))
    .await?
    .collect()
    .await
    .map_err(|e| unreadable(r, &shown, e))?;
    let rows = crate::snapshot::count(ctx, "snapshot")
        .await
        .map_err(|e| unreadable(r, &shown, e))?;
    if rows == 0 {
        return Err(Error::Usage(format!(
            "{} {shown}: the snapshot has no rows: nothing to compare",
            r.snapshot_origin
        )));
    }
    check_expected(ctx, r).await
}

fn unreadable(r: &Reconcile, shown: &str, e: datafusion::error::DataFusionError) -> Error {
    Error::Usage(format!(
        "{} {shown}: {}",
        r.snapshot_origin,
        e.strip_backtrace().lines().next().unwrap_or_default()
    ))
}

/// `expected` must be one numeric aggregate over `events`.
async fn check_expected(ctx: &SessionContext, r: &Reconcile) -> Result<(), Error> {
    let what = format!("{} = {:?}", r.expected_origin, r.expected);
    let plan = crate::state_at::check_aggregate(ctx, &what, &r.expected).await?;
    let t = plan.schema().field(0).data_type().clone();
    if !crate::snapshot::is_number(&t) {
        return Err(Error::Usage(format!(
            "{what}: gives {t}, not a number; the snapshot's value is compared by difference"
        )));
    }
    Ok(())
}

/// The per-key report, judged and held in memory (one row per key
/// compared; `status` says which agree), with its counts.
pub struct Judged {
    pub table: DataFrame,
    pub counts: Counts,
    /// The materialized views the report was computed from; the run reads
    /// the facts again for the held event ids ([`explained_events`]).
    /// Removed when this is dropped.
    _scratch: tempfile::TempDir,
}

/// The three views of `sql/reconcile.sql` are created in turn; the keys
/// compared and the one row per event are written to a folder under the
/// spill directory (the facts narrowed to the columns the report reads),
/// so that the archive is read and sorted once and the report's three
/// aggregates read that file. `reconcile` and `run --reconcile-snapshot`.
pub async fn judge(
    ctx: &SessionContext,
    r: &Reconcile,
    scan: &crate::job::Scan,
) -> Result<Judged, Error> {
    let spill = crate::job::spill_dir(scan);
    // A spill folder like the run's (`crate::spill`): claimed by this
    // process, so that a reconcile killed before it could remove its
    // folder leaves one the next run or reconcile sweeps away.
    crate::spill::sweep(&spill);
    let cannot = |e: std::io::Error| {
        Error::Usage(format!(
            "spill directory {}: cannot create a folder in it: {e}",
            spill.display()
        ))
    };
    let scratch = tempfile::Builder::new()
        .prefix("backfill-spill-reconcile-")
        .tempdir_in(&spill)
        .map_err(cannot)?;
    crate::spill::claim(scratch.path()).map_err(cannot)?;
    let rows = views(ctx, r, Some(scratch.path())).await?.collect().await?;
    let mut counts = Counts::default();
    for b in &rows {
        counts.count(b)?;
    }
    Ok(Judged {
        table: ctx.read_batches(rows)?,
        counts,
        _scratch: scratch,
    })
}

/// The report's schema, from the views planned without reading anything
/// (a run opens its sinks before it scans).
pub async fn output_schema(
    ctx: &SessionContext,
    r: &Reconcile,
) -> Result<arrow::datatypes::Schema, Error> {
    Ok(views(ctx, r, None).await?.schema().as_arrow().clone())
}

/// Create the three views; with `dir`, the first two are materialized
/// there. The report over them, strings plain.
async fn views(
    ctx: &SessionContext,
    r: &Reconcile,
    dir: Option<&std::path::Path>,
) -> Result<DataFrame, Error> {
    use datafusion::sql::parser::DFParser;
    let sql = RECONCILE_SQL
        .replace("sum(amount) /*expected*/", &format!("({})", r.expected))
        .replace("0 /*tolerance*/", &format!("{:?}", r.tolerance));
    let bad = |e: datafusion::error::DataFusionError| {
        Error::Usage(format!(
            "{} = {:?}: {}",
            r.expected_origin,
            r.expected,
            e.strip_backtrace().lines().next().unwrap_or_default()
        ))
    };
    let mut facts_columns: Vec<String> = FACT_COLUMNS.into_iter().map(String::from).collect();
    for c in expression_columns(ctx, r).await? {
        if !facts_columns.contains(&c) {
            facts_columns.push(c);
        }
    }
    let statements = DFParser::parse_sql(&sql).map_err(bad)?;
    for (i, statement) in statements.into_iter().enumerate() {
        let plan = ctx
            .state()
            .statement_to_plan(statement)
            .await
            .map_err(bad)?;
        ctx.execute_logical_plan(plan)
            .await
            .map_err(bad)?
            .collect()
            .await
            .map_err(bad)?;
        let Some(dir) = dir else { continue };
        match i {
            1 => {
                let at = dir.join("reconcile_facts");
                facts::write(ctx, &facts_columns, &at).await?;
                use_folder(ctx, "reconcile_facts", &at).await?;
            }
            2 => materialize(ctx, "reconcile_scope", None, &dir.join("reconcile_scope")).await?,
            _ => {}
        }
    }
    let df = ctx
        .sql("SELECT * FROM reconcile ORDER BY key")
        .await
        .map_err(bad)?;
    // Plain strings in the outputs, as the other outputs keep them.
    let plain = |c: &str| datafusion::functions::expr_fn::arrow_cast(col(c), lit("Utf8")).alias(c);
    let names: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let exprs = names
        .iter()
        .map(|n| match n.as_str() {
            "key" | "status" | "unresolved_event_ids" => plain(n),
            "as_of" => {
                datafusion::functions::expr_fn::arrow_cast(col(n), lit("Timestamp(µs, \"UTC\")"))
                    .alias(n)
            }
            _ => col(n),
        })
        .collect::<Vec<_>>();
    Ok(df.select(exprs)?)
}

/// The columns of `events` the expected aggregate reads.
async fn expression_columns(ctx: &SessionContext, r: &Reconcile) -> Result<Vec<String>, Error> {
    let what = format!("{} = {:?}", r.expected_origin, r.expected);
    let plan = crate::state_at::check_aggregate(ctx, &what, &r.expected).await?;
    let mut out = vec![];
    let mut stack = vec![&plan];
    while let Some(p) = stack.pop() {
        if let datafusion::logical_expr::LogicalPlan::Aggregate(a) = p {
            for e in &a.aggr_expr {
                for c in e.column_refs() {
                    if !out.contains(&c.name) {
                        out.push(c.name.clone());
                    }
                }
            }
        }
        stack.extend(p.inputs());
    }
    Ok(out)
}

/// Replace the view `name` by a Parquet folder of its rows at `dir`
/// (`columns` only, when given).
async fn materialize(
    ctx: &SessionContext,
    name: &str,
    columns: Option<&Vec<String>>,
    dir: &std::path::Path,
) -> Result<(), Error> {
    let mut df = ctx.table(name).await?;
    if let Some(cols) = columns {
        df = df.select(
            cols.iter()
                .map(|c| col(crate::source::quoted(c)))
                .collect::<Vec<_>>(),
        )?;
    }
    let path = format!("{}/", dir.display());
    df.write_parquet(
        &path,
        datafusion::dataframe::DataFrameWriteOptions::new(),
        None,
    )
    .await?;
    use_folder(ctx, name, dir).await
}

/// Replace the view `name` by the Parquet folder at `dir`.
async fn use_folder(ctx: &SessionContext, name: &str, dir: &std::path::Path) -> Result<(), Error> {
    ctx.deregister_table(name)?;
    ctx.register_parquet(
        name,
        &format!("{}/", dir.display()),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await?;
    Ok(())
}

/// The rows a user is shown: those that do not agree (`all`: every key).
pub fn shown(report: DataFrame, all: bool) -> Result<DataFrame, Error> {
    Ok(if all {
        report
    } else {
        report.filter(col("status").not_eq(lit("agree")))?
    })
}

/// The unresolved events of the keys whose snapshot already reflects them
/// (`explained`), from the report's rows and the materialized facts: a run
/// holds their replays ([`crate::policy::Policy::reconciled`]).
pub async fn explained_events(
    ctx: &SessionContext,
    report: DataFrame,
) -> Result<HashSet<String>, Error> {
    ctx.register_table("reconcile_report", report.into_view())?;
    let rows = ctx
        .sql(
            "SELECT arrow_cast(f.event_id, 'Utf8') FROM reconcile_facts f \
             JOIN reconcile_report r ON f.key = r.key \
             WHERE r.explained AND NOT f.__bf_done",
        )
        .await?
        .collect()
        .await?;
    let mut out = HashSet::new();
    for b in rows {
        let ids = b.column(0).as_string::<i32>();
        for i in 0..b.num_rows() {
            if ids.is_valid(i) {
                out.insert(ids.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// Counts of a report, for the run's report and the command's summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub keys: u64,
    pub agree: u64,
    pub disagree: u64,
    pub missing_downstream: u64,
    pub missing_archive: u64,
    pub explained: u64,
}

impl Counts {
    /// Keys that do not agree.
    pub fn disagreeing(&self) -> u64 {
        self.disagree + self.missing_downstream + self.missing_archive
    }

    pub fn count(&mut self, b: &arrow::record_batch::RecordBatch) -> Result<(), Error> {
        let status = b
            .column_by_name("status")
            .ok_or_else(|| Error::Internal("reconcile: no status column".into()))?;
        let status = arrow::compute::cast(status, &DataType::Utf8)?;
        let status = status.as_string::<i32>();
        let explained = b
            .column_by_name("explained")
            .ok_or_else(|| Error::Internal("reconcile: no explained column".into()))?
            .as_boolean();
        for i in 0..b.num_rows() {
            self.keys += 1;
            match status.value(i) {
                "agree" => self.agree += 1,
                "disagree" => self.disagree += 1,
                "missing_downstream" => self.missing_downstream += 1,
                _ => self.missing_archive += 1,
            }
            if explained.value(i) {
                self.explained += 1;
            }
        }
        Ok(())
    }
}

/// `backfill reconcile`.
pub async fn reconcile(args: crate::cli::ReconcileArgs) -> Result<u8, Error> {
    let (mut scan, job) = crate::job::scan_settings(&args.scan)?;
    crate::job::no_cluster(&args.scan, &scan, "reconcile")?;
    let out = args.out.clone().or(job.out.clone());
    let target = out
        .as_ref()
        .map(|o| format!("{}/reconcile", o.trim_end_matches('/')));
    // As for a run: the output is never read back as events, and the
    // archive itself is refused as the output root.
    scan.exclude.extend(out.clone());
    scan.exclude.extend(target.clone());
    let flags = Flags {
        snapshot: args.snapshot.as_deref(),
        expected: args.expected.as_deref(),
        as_of: args.as_of.as_deref(),
        tolerance: args.tolerance,
    };
    let r = settings(job.reconcile.as_ref(), &flags, "--snapshot", "--expected")?.ok_or_else(|| {
        Error::Usage(
            "reconcile: name the downstream's snapshot with --snapshot LOC (or [reconcile] snapshot)"
                .into(),
        )
    })?;
    check_window(&scan, "reconcile")?;
    let ctx = crate::source::session(&scan)?;
    crate::source::register(&ctx, &scan).await?;
    crate::detect::register_views(&ctx, &scan).await?;
    register(&ctx, &r, &scan.storage).await?;
    let Judged { table, counts, .. } = judge(&ctx, &r, &scan).await?;
    let shown_df = shown(table, args.all)?;
    let schema = Arc::new(shown_df.schema().as_arrow().clone());
    let batches = shown_df.clone().collect().await?;
    crate::commands::print_batches(schema.clone(), &batches, args.format)?;
    if let Some(target) = target {
        crate::infer::write_all(
            &[target],
            crate::sink::SinkKind::Reconcile,
            schema,
            &batches,
            &scan,
            job.kafka.clone(),
        )
        .await?;
    }
    tracing::info!(
        keys = counts.keys,
        agree = counts.agree,
        disagree = counts.disagree,
        missing_downstream = counts.missing_downstream,
        missing_archive = counts.missing_archive,
        explained = counts.explained,
        "{} key(s): {} agree, {} disagree, {} missing downstream, {} missing in the archive ({} explained by unresolved events)",
        counts.keys,
        counts.agree,
        counts.disagree,
        counts.missing_downstream,
        counts.missing_archive,
        counts.explained
    );
    Ok(if args.fail_on_disagree && counts.disagreeing() > 0 {
        crate::error::EXIT_DLQ
    } else {
        crate::error::EXIT_OK
    })
}

#[cfg(test)]
mod tests {
    use super::RECONCILE_SQL;

    /// The archive is read once: only `reconcile_rows` names `events` (the
    /// facts are computed from it in one sort and materialized; the scope
    /// and the judgement read the facts), and it names it once.
    #[test]
    fn only_the_rows_read_the_archive_once() {
        let code: Vec<&str> = RECONCILE_SQL
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect();
        let reads: Vec<&str> = code
            .iter()
            .copied()
            .filter(|l| l.split_whitespace().any(|w| w == "events"))
            .collect();
        assert_eq!(
            reads,
            ["    FROM events e LEFT JOIN snapshot s ON e.key = s.__bf_key"]
        );
        let rows = RECONCILE_SQL
            .find("VIEW reconcile_rows")
            .zip(RECONCILE_SQL.find("VIEW reconcile_facts"));
        let at = RECONCILE_SQL.find("FROM events e");
        assert!(
            matches!((rows, at), (Some((r, f)), Some(a)) if r < a && a < f),
            "the read of events is not in reconcile_rows"
        );
    }
}
