//! `backfill state-at --at T`: per key, the state the processed events
//! imply at T — the latest processed event at or before T (the whole row),
//! or the job's `[state_at] columns` aggregates — written to stdout, a
//! Parquet folder or a Kafka topic through the same [`crate::sink`]s as a
//! run. Also the `state_at('T')` table function of `backfill sql`.
//!
//! The queries are data (`sql/state_at.sql`, `sql/state_fold.sql`); T is
//! bound as a parameter in event_time's own type, and the scan's window is
//! cut at T so that whole files after T are never opened. This module
//! reads the archive only: it records nothing in the state (a state-at is
//! not a run: it decides nothing about any event).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use chrono::{DateTime, Utc};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNode;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::ViewTable;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, col, lit};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use crate::cli::StateAtArgs;
use crate::error::Error;
use crate::sink::{self, RowColumns, SinkContext, SinkKind};

pub const LATEST_SQL: &str = include_str!("../sql/state_at.sql");
pub const FOLD_SQL: &str = include_str!("../sql/state_fold.sql");

/// The job file's `[state_at]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateAtSettings {
    /// The state as SQL aggregates over each key's processed events, one
    /// output column each: `{ balance = "sum(amount)", orders = "count(*)" }`.
    /// Empty (the default): the latest processed event, whole.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

/// The query for `fold` (none: the latest event), with `$1` for T.
pub fn query_sql(fold: &BTreeMap<String, String>) -> String {
    if fold.is_empty() {
        return LATEST_SQL.to_string();
    }
    let list: Vec<String> = fold
        .iter()
        .map(|(name, expr)| format!("{expr} AS {}", crate::source::quoted(name)))
        .collect();
    FOLD_SQL.replace("/*columns*/", &list.join(", "))
}

/// Every fold column is planned on its own over `events`, so that the error
/// names the key at fault: an unknown column, SQL that does not parse, or an
/// expression that is not an aggregate (`amount + 1`, `key`).
pub async fn validate_fold(
    ctx: &SessionContext,
    fold: &BTreeMap<String, String>,
) -> Result<(), Error> {
    for (name, expr) in fold {
        let what = format!("[state_at] columns.{name} = {expr:?}");
        if name.trim().is_empty() || name == "key" || name == "last_event_time" {
            return Err(Error::Usage(format!(
                "{what}: the name is empty or taken by the output's own `key`/`last_event_time`; choose another"
            )));
        }
        check_aggregate(ctx, &what, expr).await?;
    }
    Ok(())
}

/// `expr` planned alone over `events`, per key: it must be one aggregate
/// expression (an unknown column, SQL that does not parse, `amount + 1`,
/// `key`, or two expressions are refused, named by `what`). The plan's one
/// output column is the expression's.
pub async fn check_aggregate(
    ctx: &SessionContext,
    what: &str,
    expr: &str,
) -> Result<LogicalPlan, Error> {
    // The expression is placed inside larger queries: a comment or a `;`
    // could end it early and change what the query means.
    if expr.contains("--") || expr.contains("/*") || expr.contains(';') {
        return Err(Error::Usage(format!(
            "{what}: comments and `;` are not allowed in an expression"
        )));
    }
    let sql = format!("SELECT {expr} AS x FROM events GROUP BY key");
    let not_aggregate = || {
        Error::Usage(format!(
            "{what}: not an aggregate; write an aggregate such as sum(amount), count(*), max(seq)"
        ))
    };
    let plan = ctx.state().create_logical_plan(&sql).await.map_err(|e| {
        let m = e.strip_backtrace();
        let first = m.lines().next().unwrap_or_default().to_string();
        if first.contains("No field named") {
            Error::Usage(format!("{what}: unknown column ({first})"))
        } else if first.contains("GROUP BY") || first.contains("aggregate") {
            not_aggregate()
        } else {
            Error::Usage(format!("{what}: {first}"))
        }
    })?;
    if plan.schema().fields().len() != 1 {
        return Err(Error::Usage(format!("{what}: one expression, not a list")));
    }
    if !has_aggregate(&plan) {
        return Err(not_aggregate());
    }
    // Per key, over that key's events, the same at every read: a subquery
    // would read other keys' events (or the whole table) into each key's
    // value, and `random()` or `now()` would differ between the report and
    // what is written.
    let mut subquery = false;
    let mut volatile = false;
    plan.apply_with_subqueries(|p| {
        if matches!(p, LogicalPlan::Subquery(_)) {
            subquery = true;
        }
        p.apply_expressions(|e| {
            subquery |= e.exists(|x| {
                Ok(matches!(
                    x,
                    Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                ))
            })?;
            volatile |= e.is_volatile();
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
    })?;
    if subquery {
        return Err(Error::Usage(format!(
            "{what}: a subquery is not allowed: the value is computed per key over that key's events"
        )));
    }
    if volatile {
        return Err(Error::Usage(format!(
            "{what}: a volatile function (random(), now(), ...) is not allowed: the value must be the same at every read"
        )));
    }
    Ok(plan)
}

/// Whether the plan aggregates something besides its group key.
fn has_aggregate(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(a) => !a.aggr_expr.is_empty(),
        other => other.inputs().into_iter().any(has_aggregate),
    }
}

/// T in the unit and time zone of `events.event_time`, rounded down: the
/// parameter `$1` of the queries. Only a timestamp column can be compared.
fn at_scalar(ctx_events: &DataFrame, at: DateTime<Utc>) -> Result<ScalarValue, Error> {
    let field = ctx_events
        .schema()
        .field_with_unqualified_name("event_time")
        .map_err(|e| Error::Usage(format!("state-at: {e}")))?;
    let (unit, tz) = match field.data_type() {
        DataType::Timestamp(u, tz) => (*u, tz.clone()),
        other => {
            return Err(Error::Usage(format!(
                "state-at: event_time is {other}, not a timestamp; map a timestamp column with --column event_time=..."
            )));
        }
    };
    Ok(match unit {
        TimeUnit::Second => ScalarValue::TimestampSecond(Some(at.timestamp()), tz),
        TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(Some(at.timestamp_millis()), tz),
        TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(Some(at.timestamp_micros()), tz),
        TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(
            Some(at.timestamp_nanos_opt().ok_or_else(|| {
                Error::Usage(format!(
                    "--at {at}: outside what nanosecond timestamps hold (1677-2262)"
                ))
            })?),
            tz,
        ),
    })
}

/// The state at `at` (for `key` alone when given), as a frame over
/// `events` in `ctx`. The key filter sits on top; DataFusion pushes it
/// through the window or the aggregate (both partition by key) into the
/// scan, where Parquet statistics prune row groups.
pub async fn frame(
    ctx: &SessionContext,
    fold: &BTreeMap<String, String>,
    at: DateTime<Utc>,
    key: Option<&str>,
) -> Result<DataFrame, Error> {
    let events = ctx.table("events").await?;
    let param = at_scalar(&events, at)?;
    let df = ctx
        .sql(&query_sql(fold))
        .await?
        .with_param_values(vec![param])?;
    let df = match key {
        Some(k) => df.filter(col("key").eq(lit(k)))?,
        None => df,
    };
    Ok(df.sort(vec![col("key").sort(true, false)])?)
}

/// `state_at('T')` for `backfill sql`: the same query as the command, over
/// the shell's `events` (its window), with the job's fold.
#[derive(Debug)]
pub struct StateAtFunction {
    pub fold: BTreeMap<String, String>,
}

impl TableFunctionImpl for StateAtFunction {
    fn call_with_args(
        &self,
        args: TableFunctionArgs,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        use datafusion::error::DataFusionError;
        let usage = || {
            DataFusionError::Plan(
                "state_at(T): T is one RFC 3339 time as a string, e.g. state_at('2024-05-01T14:00:00Z')"
                    .into(),
            )
        };
        let [Expr::Literal(ScalarValue::Utf8(Some(t)), _)] = args.exprs() else {
            return Err(usage());
        };
        let at = crate::job::parse_time("state_at(T)", t)
            .map_err(|e| DataFusionError::Plan(e.to_string()))?;
        let state = args
            .session()
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("state_at: not a SessionState".into()))?;
        // Planning reads only the catalog (tables registered in memory):
        // nothing here waits on I/O, so blocking on it cannot stall.
        let plan = futures::executor::block_on(async {
            let events = state.create_logical_plan("SELECT * FROM events").await?;
            let param = at_scalar(&DataFrame::new(state.clone(), events), at)
                .map_err(|e| DataFusionError::Plan(e.line()))?;
            let plan = state.create_logical_plan(&query_sql(&self.fold)).await?;
            plan.with_param_values(vec![param])
        })?;
        Ok(Arc::new(ViewTable::new(plan, None)))
    }
}

/// `backfill state-at`.
pub async fn state_at(args: StateAtArgs) -> Result<(), Error> {
    let at = crate::job::parse_time("--at", &args.at)?;
    let mut scan_args = args.scan.clone();
    // The window ends just after T: files wholly after T are never listed
    // or opened (the archive prunes by the window), and the window's exact
    // bound in the column's unit does the rest.
    let after_t = at + chrono::Duration::nanoseconds(1);
    let (mut scan, job) = crate::job::scan_settings(&scan_args)?;
    crate::job::no_cluster(&scan_args, &scan, "state-at")?;
    if let Some(to) = scan.to
        && to <= at
    {
        return Err(Error::Usage(format!(
            "--at {}: after the window's end (--to {to}); the state at T needs the events up to T",
            args.at
        )));
    }
    scan.to = Some(after_t);
    if let Some(from) = scan.from
        && from > at
    {
        return Err(Error::Usage(format!(
            "--at {}: before the window's start (--from {from})",
            args.at
        )));
    }
    scan_args.to = None;
    let settings = job.state_at.clone().unwrap_or_default();
    let target = args.sink.clone().unwrap_or_else(|| "-".into());
    let mut kafka = job.kafka.clone();
    if args.compact {
        if !target.starts_with("kafka://") {
            return Err(Error::Usage(format!(
                "--compact: the sink {} is not a kafka:// topic; a Parquet folder or stdout already holds one row per key",
                crate::redact::url(&target)
            )));
        }
        kafka.get_or_insert_with(Default::default).compact = true;
    }
    if let Some(k) = &args.key
        && k.is_empty()
    {
        return Err(Error::Usage(
            "--key: empty; give the key whose state to write".into(),
        ));
    }

    // As for a run: the sink is never read back as events, and the archive
    // itself is refused as one.
    if !crate::sink::outside_the_lake(&target) {
        scan.exclude.push(target.clone());
    }
    let ctx = crate::source::session(&scan)?;
    // Row-level filtering in the Parquet reader, so that `--key` decodes
    // only the rows of that key in the row groups statistics did not prune.
    ctx.state_ref()
        .write()
        .config_mut()
        .options_mut()
        .execution
        .parquet
        .pushdown_filters = true;
    crate::source::register(&ctx, &scan).await?;
    validate_fold(&ctx, &settings.columns).await?;
    let df = frame(&ctx, &settings.columns, at, args.key.as_deref()).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());

    if target == "-" {
        let batches = df.collect().await?;
        return crate::commands::print_batches(schema, &batches, args.format);
    }
    let storage = scan.storage.clone();
    let run_id = format!("state-at-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
    let ctx_sink = SinkContext {
        run_id: run_id.clone(),
        nonce: format!(
            "{}-{}",
            Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            std::process::id()
        ),
        kind: SinkKind::State,
        schema: schema.clone(),
        columns: Arc::new(RowColumns {
            event_id: "event_id".into(),
            key: "key".into(),
            seq: "seq".into(),
            event_time: if settings.columns.is_empty() {
                "event_time".into()
            } else {
                "last_event_time".into()
            },
            status: "status".into(),
            error: "error".into(),
            payload: "payload".into(),
        }),
        storage,
        kafka,
    };
    let mut out = sink::open(&target, ctx_sink)?;
    let delivered = deliver(out.as_mut(), df).await;
    match delivered {
        Ok(rows) => {
            tracing::info!(
                "{}",
                crate::redact::line(&format!(
                    "state at {} of {rows} key(s) written to {}",
                    at.to_rfc3339(),
                    target
                ))
            );
            Ok(())
        }
        Err(e) => {
            out.abort().await;
            Err(e)
        }
    }
}

/// check → write* → finish → precommit → publish: what a run does, without
/// a commit between (nothing is recorded).
async fn deliver(out: &mut dyn sink::Sink, df: DataFrame) -> Result<u64, Error> {
    use futures::StreamExt;
    out.check().await?;
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        out.write(&batch?).await?;
    }
    let receipt = out.finish().await?;
    out.precommit().await?;
    out.publish().await?;
    Ok(receipt.rows)
}
