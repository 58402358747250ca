//! Application logs as evidence: the `log_attempts` and `contradicted`
//! views (`sql/logs.sql`) over `logs` (registered by
//! [`crate::source::logs`]) and `events`. `log_attempts` feeds the
//! candidates' attempts (`sql/candidates.sql`); the run's one-pass
//! detection reads the same counts from one narrow pass over the logs
//! instead ([`crate::source::logs::error_counts`]). `contradicted` is a
//! plan of its own, run only when logs are given: the archive's narrow
//! columns of the events an error line names, joined before grouping.
//!
//! Never decides anything about replays: contradicted events are resolved
//! and only reported.

use std::sync::Arc;

use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;

use crate::job::Scan;

pub const LOGS_SQL: &str = include_str!("../../sql/logs.sql");

/// Register `logs` (empty without settings) and `log_error_levels` unless
/// the caller did, then the views of `sql/logs.sql`.
pub async fn register(ctx: &SessionContext, scan: &Scan) -> datafusion::error::Result<()> {
    if !ctx.table_exist("logs")? {
        crate::source::logs::register(ctx, scan.logs.as_ref(), &scan.storage)
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    }
    super::create_views(ctx, LOGS_SQL, "CREATE").await
}

/// The run's `log_attempts`: the counts its narrow pass over the logs
/// found (the view's rows, computed line by line), so that the
/// `contradicted` plan reads the logs once more, not twice: the view is
/// planned again over them.
pub async fn use_counts(
    ctx: &SessionContext,
    counts: &crate::source::logs::ErrorCounts,
) -> datafusion::error::Result<()> {
    let batch = counts.log_attempts()?;
    let table = datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch]])?;
    super::swap_in(
        ctx,
        "log_attempts",
        Arc::new(table),
        LOGS_SQL,
        "contradicted",
    )
    .await
}

/// The contradicted events, ordered by key, seq and event_id; in a sharded
/// run only the shard's (by the key of the processed row; no key: shard 0).
pub async fn contradicted(
    ctx: &SessionContext,
    scan: &Scan,
) -> datafusion::error::Result<DataFrame> {
    let mut df = ctx.table("contradicted").await?;
    if let Some(s) = scan.shard {
        let shard = datafusion::functions::expr_fn::coalesce(vec![
            crate::shard::udf().call(vec![col("key"), lit(i64::from(s.count))]),
            lit(0u32),
        ]);
        df = df.filter(shard.eq(lit(s.index)))?;
    }
    df.sort(vec![
        col("key").sort(true, true),
        col("seq").sort(true, true),
        col("event_id").sort(true, true),
    ])
}
