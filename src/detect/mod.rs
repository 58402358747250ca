//! Detection as DataFusion plans. The SQL lives in `sql/*.sql` (compiled
//! into the binary with `include_str!`, tested on its own with
//! sqllogictest); this module registers those views over `events` and builds
//! the two queries a run executes: the candidates for the policy (with the
//! output projection back to source names and types) and the gap report.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{Expr, cast, col};
use datafusion::prelude::SessionContext;

use crate::job::Scan;
use crate::source::{Archive, quoted};

pub mod logs;
pub mod onepass;
pub mod silences;
pub mod volume;

pub const UNPROCESSED_SQL: &str = include_str!("../../sql/unprocessed.sql");
pub const CONFLICTS_SQL: &str = include_str!("../../sql/conflicts.sql");
pub const GAPS_SQL: &str = include_str!("../../sql/gaps.sql");
pub const LEDGER_SQL: &str = include_str!("../../sql/ledger.sql");
pub const CANDIDATES_SQL: &str = include_str!("../../sql/candidates.sql");

/// Internal columns the candidates query adds for the policy; stripped
/// before anything is written.
pub mod internal {
    pub const EVENT_ID: &str = "__bf_event_id";
    pub const ERROR: &str = "__bf_error";
    pub const ARCHIVED_ATTEMPTS: &str = "__bf_archived_attempts";
    pub const IN_CONFLICT: &str = "__bf_in_conflict";
    pub const LEDGER_REPLAYS: &str = "__bf_ledger_replays";
    pub const LEDGER_DEAD: &str = "__bf_ledger_dead";
    /// The archive row had no event_id; `event_id` holds a synthetic one.
    pub const MISSING_EVENT_ID: &str = "__bf_missing_event_id";
    /// The event's seq lies after its key's first gap / first conflicting
    /// seq (the barriers of `--on-gap` / `--on-conflict`).
    pub const AFTER_GAP: &str = "__bf_after_gap";
    pub const AFTER_CONFLICT: &str = "__bf_after_conflict";
    pub const PREFIX: &str = "__bf_";
}

/// The schema of ledger entries (one row per event a committed run
/// replayed or dead-lettered).
pub fn ledger_entries_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("attempt", DataType::Int32, false),
    ]))
}

/// Register `unprocessed`, `conflicts`, `gaps`, `ledger` and `candidates`
/// over `events`. With detection switched off, `conflicts`/`gaps` are empty
/// views of the same shape, so every query still plans. An empty
/// `ledger_entries` is registered unless the caller already did.
pub async fn register_views(ctx: &SessionContext, scan: &Scan) -> datafusion::error::Result<()> {
    if !ctx.table_exist("ledger_entries")? {
        let empty =
            datafusion::datasource::MemTable::try_new(ledger_entries_schema(), vec![vec![]])?;
        ctx.register_table("ledger_entries", Arc::new(empty))?;
    }
    exec(ctx, LEDGER_SQL).await?;
    exec(ctx, UNPROCESSED_SQL).await?;
    // `conflicts` is always the real view: gaps use it, and ad-hoc SQL may
    // want it. Switching conflict detection off only takes it out of the
    // policy's input (candidates_sql).
    exec(ctx, CONFLICTS_SQL).await?;
    if scan.detect_gaps {
        exec(ctx, GAPS_SQL).await?;
    } else {
        exec(ctx, &empty_view(GAPS_SQL)).await?;
    }
    logs::register(ctx, scan).await?;
    exec(ctx, &candidates_sql(scan)).await?;
    Ok(())
}

/// The candidates view; without conflict detection its conflicts side is
/// empty, so no event is dead-lettered as `sequence_conflict` (nor is
/// behind a conflict barrier); without [`Scan::gap_barrier`] no event is
/// behind a gap (the run's fast path then keeps no per-key gap map).
pub fn candidates_sql(scan: &Scan) -> String {
    let mut sql = CANDIDATES_SQL.to_string();
    if !scan.detect_conflicts {
        sql = sql
            .replace(
                "LEFT JOIN conflicts c",
                "LEFT JOIN (SELECT * FROM conflicts WHERE false) c",
            )
            .replace(
                "FROM conflicts GROUP BY",
                "FROM (SELECT * FROM conflicts WHERE false) nc GROUP BY",
            );
    }
    if !scan.gap_barrier {
        sql = sql.replace(
            "FROM gaps GROUP BY",
            "FROM (SELECT * FROM gaps WHERE false) ng GROUP BY",
        );
    }
    // Without logs the join is planned away, as the switched-off sides are.
    if scan.logs.is_none() {
        sql = sql.replace(
            "LEFT JOIN log_attempts la",
            "LEFT JOIN (SELECT * FROM log_attempts WHERE false) la",
        );
    }
    sql
}

/// The same view with no rows: `... WHERE false` wrapped around it keeps
/// the column names and types without scanning (the optimizer removes it).
fn empty_view(sql: &str) -> String {
    let body = sql
        .split_once(" AS\n")
        .map(|(head, body)| (head.rsplit_once("VIEW ").map(|h| h.1).unwrap_or(""), body))
        .map(|(name, body)| {
            format!(
                "CREATE OR REPLACE VIEW {} AS SELECT * FROM ({}) WHERE false",
                name.trim(),
                body.trim().trim_end_matches(';')
            )
        });
    body.unwrap_or_default()
}

async fn exec(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<()> {
    ctx.sql(sql).await?.collect().await?;
    Ok(())
}

/// Run the statements of a `.sql` file of several (each ending with `;` at
/// the end of a line) whose text contains `only`: `"CREATE"` for all its
/// views, `"VIEW x AS"` for one.
pub(crate) async fn create_views(
    ctx: &SessionContext,
    sql: &str,
    only: &str,
) -> datafusion::error::Result<()> {
    for statement in sql.split_inclusive(";\n") {
        if statement.contains(only) {
            exec(ctx, statement).await?;
        }
    }
    Ok(())
}

/// Put `table` in place of the table or view `name`, then create the view
/// `view` of `sql` again over it. A view holds the plans of the tables it
/// named when it was created: replacing `name` alone would leave `view`
/// reading what was there before (a view over the archive, read again).
pub(crate) async fn swap_in(
    ctx: &SessionContext,
    name: &str,
    table: Arc<dyn datafusion::catalog::TableProvider>,
    sql: &str,
    view: &str,
) -> datafusion::error::Result<()> {
    ctx.deregister_table(name)?;
    ctx.register_table(name, table)?;
    create_views(ctx, sql, &format!("VIEW {view} AS")).await
}

/// The candidates in output shape: every source column under its source
/// name and type, then the internal columns, ordered by key, seq, event_id
/// (the order replays must reach Kafka in).
pub async fn candidates(
    ctx: &SessionContext,
    scan: &Scan,
    archive: &Archive,
) -> datafusion::error::Result<DataFrame> {
    candidates_from(ctx.table("candidates").await?, scan, archive)
}

/// [`candidates`] over any frame with the `candidates` view's columns (the
/// one-pass fetch gives the same).
pub fn candidates_from(
    df: DataFrame,
    scan: &Scan,
    archive: &Archive,
) -> datafusion::error::Result<DataFrame> {
    let mut exprs = output_projection(scan, archive);
    exprs.extend([
        col("event_id").alias(internal::EVENT_ID),
        col("error").alias(internal::ERROR),
        col(onepass::ARCHIVED_ATTEMPTS).alias(internal::ARCHIVED_ATTEMPTS),
        col(onepass::IN_CONFLICT).alias(internal::IN_CONFLICT),
        col(onepass::LEDGER_REPLAYS).alias(internal::LEDGER_REPLAYS),
        col(onepass::LEDGER_DEAD).alias(internal::LEDGER_DEAD),
        col(crate::source::MISSING_EVENT_ID_COLUMN).alias(internal::MISSING_EVENT_ID),
        col(onepass::AFTER_GAP).alias(internal::AFTER_GAP),
        col(onepass::AFTER_CONFLICT).alias(internal::AFTER_CONFLICT),
    ]);
    // Sort on the canonical columns before projecting them away.
    let df = df.sort(vec![
        col("key").sort(true, true),
        col("seq").sort(true, true),
        col("event_id").sort(true, true),
    ])?;
    df.select(exprs)
}

/// Columns of `events`/`candidates` back to the archive's names and types.
fn output_projection(scan: &Scan, archive: &Archive) -> Vec<Expr> {
    let pairs = scan.columns.pairs();
    let canonical_names: Vec<&str> = crate::job::Columns::default()
        .pairs()
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>();
    archive
        .schema
        .fields()
        .iter()
        .map(|f| {
            let name = f.name().as_str();
            let view_name = match pairs.iter().find(|(_, s)| *s == name) {
                Some((canonical, _)) => canonical.to_string(),
                None if canonical_names.contains(&name) => format!("source_{name}"),
                None => name.to_string(),
            };
            cast(col(quoted(&view_name)), f.data_type().clone()).alias(name)
        })
        .collect()
}

/// The gap report, ordered by key and first missing seq.
pub async fn gaps(ctx: &SessionContext) -> datafusion::error::Result<DataFrame> {
    ctx.sql("SELECT * FROM gaps ORDER BY key, first_missing_seq")
        .await
}

/// Physical plans of the detection, as text.
pub async fn explain(
    ctx: &SessionContext,
    scan: &Scan,
    archive: &Archive,
) -> datafusion::error::Result<String> {
    use datafusion::physical_plan::displayable;
    let mut out = String::new();
    let plans = [
        (
            "candidates (unprocessed + conflicts + ledger)",
            candidates(ctx, scan, archive).await?,
        ),
        ("gaps", gaps(ctx).await?),
    ];
    let mut plans = plans.to_vec();
    if scan.logs.is_some() {
        plans.push(("contradicted (logs)", logs::contradicted(ctx, scan).await?));
    }
    let on_cluster = crate::source::on_cluster(ctx);
    for (name, df) in plans {
        if on_cluster {
            // The scheduler's answer to EXPLAIN: the physical plan and its
            // stages (what each executor task runs, where they shuffle).
            out.push_str(&format!("== {name} ==\n"));
            for b in df.explain(false, false)?.collect().await? {
                use arrow::array::AsArray;
                let (kinds, texts) = (
                    b.column(0).as_string::<i32>(),
                    b.column(1).as_string::<i32>(),
                );
                for i in 0..b.num_rows() {
                    let kind = kinds.value(i);
                    if kind.contains("logical") {
                        continue;
                    }
                    out.push_str(&format!("-- {kind}\n{}\n", texts.value(i).trim_end()));
                }
            }
            out.push('\n');
            continue;
        }
        let plan = df.create_physical_plan().await?;
        out.push_str(&format!("== {name} ==\n"));
        out.push_str(&displayable(plan.as_ref()).indent(true).to_string());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_without_conflict_detection_join_nothing() {
        let mut scan = crate::job::Scan {
            sources: vec![],
            from: None,
            to: None,
            columns: Default::default(),
            done_statuses: vec![],
            detect_gaps: true,
            detect_conflicts: false,
            memory_limit: 1,
            shard: None,
            spill_dir: None,
            partitions: vec![],
            storage: Default::default(),
            kafka: None,
            exclude: vec![],
            gap_barrier: true,
            recover_from: None,
            logs: Some(crate::source::logs::LogSettings {
                paths: vec!["logs/".into()],
                fields: Default::default(),
                error_levels: vec!["ERROR".into()],
            }),
            cluster: None,
        };
        assert!(candidates_sql(&scan).contains("FROM conflicts WHERE false"));
        assert!(!candidates_sql(&scan).contains("FROM gaps WHERE false"));
        scan.detect_conflicts = true;
        assert_eq!(candidates_sql(&scan), CANDIDATES_SQL);
        scan.gap_barrier = false;
        assert!(candidates_sql(&scan).contains("FROM gaps WHERE false"));
        assert!(!candidates_sql(&scan).contains("FROM log_attempts WHERE false"));
        scan.logs = None;
        assert!(candidates_sql(&scan).contains("FROM log_attempts WHERE false"));
    }

    #[test]
    fn empty_view_keeps_the_name() {
        let s = empty_view(GAPS_SQL);
        assert!(
            s.starts_with("CREATE OR REPLACE VIEW gaps AS SELECT * FROM ("),
            "{s}"
        );
        assert!(s.ends_with("WHERE false"));
    }
}

/// Scan figures summed from DataFusion's Parquet metrics over a plan.
#[derive(Debug, Default, Clone)]
pub struct ScanMetrics {
    pub bytes_scanned: u64,
    pub row_groups_pruned: u64,
}

impl ScanMetrics {
    pub fn merge(&mut self, other: &ScanMetrics) {
        self.bytes_scanned += other.bytes_scanned;
        self.row_groups_pruned += other.row_groups_pruned;
    }

    pub fn add(&mut self, plan: &dyn datafusion::physical_plan::ExecutionPlan) {
        if let Some(m) = plan.metrics() {
            for metric in m.iter() {
                let v = metric.value();
                match v.name() {
                    "bytes_scanned" => self.bytes_scanned += v.as_usize() as u64,
                    "row_groups_pruned_statistics" | "row_groups_pruned_bloom_filter" => {
                        self.row_groups_pruned += pruned_count(v)
                    }
                    _ => {}
                }
            }
        }
        for c in plan.children() {
            self.add(c.as_ref());
        }
    }
}

fn pruned_count(v: &datafusion::physical_plan::metrics::MetricValue) -> u64 {
    use datafusion::physical_plan::metrics::MetricValue;
    match v {
        MetricValue::PruningMetrics {
            pruning_metrics, ..
        } => pruning_metrics.pruned() as u64,
        other => other.as_usize() as u64,
    }
}
