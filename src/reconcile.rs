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

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit};
use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::job::JobError;
use crate::location::StorageSettings;

pub const RECONCILE_SQL: &str = include_str!("../sql/reconcile.sql");

/// The job file's `[reconcile]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReconcileFile {
    /// The snapshot: a Parquet or .csv file, local or on an object store.
    pub snapshot: Option<String>,
    /// What the downstream holds per key, as an SQL aggregate over the
    /// key's processed events: `sum(amount)`, `count(*)`, `max(seq)`.
    pub expected: Option<String>,
    /// The snapshot's time for rows without an as_of (or a file without
    /// the column).
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
        (None, None) => return Ok(None),
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
    let file = ctx.table("snapshot_file").await?;
    let fallback = match r.as_of {
        Some(t) => format!(
            "CAST('{}' AS TIMESTAMP)",
            t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ),
        None => "NULL".into(),
    };
    let as_of_type = file
        .schema()
        .field_with_unqualified_name("__bf_as_of")?
        .data_type()
        .clone();
    // A timestamp as it is, text parsed as RFC 3339, anything else refused.
    let as_of = match &as_of_type {
        DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 | DataType::Null => {
            "CAST(__bf_as_of AS TIMESTAMP)".to_string()
        }
        t if crate::source::is_text(t) => "CAST(__bf_as_of AS TIMESTAMP)".to_string(),
        other => {
            return Err(Error::Usage(format!(
                "{} {shown}: the column `{}` is {other}, not a time (a timestamp, or RFC 3339 text)",
                r.snapshot_origin, r.as_of_column
            )));
        }
    };
    ctx.sql(&format!(
        "CREATE OR REPLACE VIEW snapshot AS \
         SELECT __bf_key, __bf_actual, coalesce({as_of}, {fallback}) AS __bf_as_of FROM snapshot_file"
    ))
    .await?
    .collect()
    .await
    .map_err(|e| unreadable(r, &shown, e))?;
    let missing = ctx
        .sql("SELECT count(*) FROM snapshot WHERE __bf_as_of IS NULL")
        .await?
        .collect()
        .await
        .map_err(|e| unreadable(r, &shown, e))?;
    let n = missing
        .first()
        .map(|b| {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
        })
        .unwrap_or(0);
    if n > 0 {
        return Err(Error::Usage(format!(
            "{} {shown}: {n} row(s) without `{}`; give the snapshot's time with --as-of (or [reconcile] as_of)",
            r.snapshot_origin, r.as_of_column
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

fn is_number(t: &DataType) -> bool {
    t.is_numeric() || matches!(t, DataType::Null)
}

/// `expected` must be one numeric aggregate over `events`.
async fn check_expected(ctx: &SessionContext, r: &Reconcile) -> Result<(), Error> {
    let what = format!("{} = {:?}", r.expected_origin, r.expected);
    let plan = crate::state_at::check_aggregate(ctx, &what, &r.expected).await?;
    let t = plan.schema().field(0).data_type().clone();
    if !is_number(&t) {
        return Err(Error::Usage(format!(
            "{what}: gives {t}, not a number; the snapshot's value is compared by difference"
        )));
    }
    Ok(())
}

/// The per-key report (every key; `status` says which agree).
pub async fn report(ctx: &SessionContext, r: &Reconcile) -> Result<DataFrame, Error> {
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
    ctx.sql(&sql)
        .await
        .map_err(bad)?
        .collect()
        .await
        .map_err(bad)?;
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

/// The rows a user is shown: those that do not agree (`all`: every key).
pub fn shown(report: DataFrame, all: bool) -> Result<DataFrame, Error> {
    Ok(if all {
        report
    } else {
        report.filter(col("status").not_eq(lit("agree")))?
    })
}

/// The keys whose snapshot already reflects their unresolved events, each
/// with its as_of in microseconds (UTC): a run holds their replays up to
/// then ([`crate::policy::Policy::reconciled`]).
pub async fn explained_keys(report: DataFrame) -> Result<HashMap<String, i64>, Error> {
    let rows = report
        .filter(col("explained"))?
        .select(vec![col("key"), col("as_of")])?
        .collect()
        .await?;
    let mut out = HashMap::new();
    for b in rows {
        let keys = b.column(0).as_string::<i32>();
        let at = arrow::compute::cast(
            b.column(1),
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let at = at.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            if keys.is_valid(i) && at.is_valid(i) {
                out.insert(keys.value(i).to_string(), at.value(i));
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
    let out = args.out.clone().or(job.out.clone());
    let target = out
        .as_ref()
        .map(|o| format!("{}/reconcile", o.trim_end_matches('/')));
    // As for a run: the output is never read back as events.
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
    let ctx = crate::source::session(&scan)?;
    crate::source::register(&ctx, &scan).await?;
    crate::detect::register_views(&ctx, &scan).await?;
    register(&ctx, &r, &scan.storage).await?;
    let full = report(&ctx, &r).await?;
    let rows = full.clone().collect().await?;
    let mut counts = Counts::default();
    for b in &rows {
        counts.count(b)?;
    }
    let table = ctx.read_batches(rows)?;
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
