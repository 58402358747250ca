//! Volume anomalies: the `volume` view (`sql/volume.sql`) registered over
//! `events` with the job's grouping columns, bucket and threshold. A plan
//! of its own over the narrow columns (the grouping columns and
//! event_time), run only when asked: the run's one-pass detection never
//! pays for it. The model is in docs/sql.md ("volume").

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

use crate::error::Error;
use crate::job::detect::Volume;
use crate::source::quoted;

pub const VOLUME_SQL: &str = include_str!("../../sql/volume.sql");

/// Where `sql/volume.sql` names its grouping columns (each followed by a
/// comma, so that an empty list leaves valid SQL).
const BY_MARK: &str = "key /*by*/,";

/// Names the view uses for its own columns: a grouping column of one of
/// these names would be ambiguous.
const RESERVED: [&str; 5] = ["idx", "observed", "phase", "ref_idx", "ref_observed"];

/// Register `volume_settings` and `volume`; an unknown grouping column is
/// the settings' fault (exit 2), named with its key or flag.
pub async fn register(
    ctx: &SessionContext,
    volume: &Volume,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(), Error> {
    let mut reserved: Vec<&str> = RESERVED.to_vec();
    reserved.push("event_time");
    super::silences::check_columns(ctx, &volume.by, &volume.by_origin, &reserved).await?;
    let time = |t: Option<DateTime<Utc>>| match t {
        Some(t) => format!("'{}'", t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        None => "NULL".into(),
    };
    let settings = format!(
        "CREATE OR REPLACE VIEW volume_settings AS \
         SELECT CAST({} AS BIGINT) AS volume_bucket_us, \
                CAST({:?} AS DOUBLE) AS volume_threshold, \
                arrow_cast({}, 'Timestamp(µs, \"UTC\")') AS volume_window_start, \
                arrow_cast({}, 'Timestamp(µs, \"UTC\")') AS volume_window_end",
        volume.bucket_us,
        volume.threshold,
        time(from),
        time(to)
    );
    ctx.sql(&settings).await?.collect().await?;
    super::create_views(ctx, &with_columns(VOLUME_SQL, &volume.by), "CREATE").await?;
    Ok(())
}

/// Count the archive's rows per group and bucket (`volume_counts`, the
/// one pass over the archive) and keep the counts in memory in place of the
/// view, `volume` created again over them ([`super::swap_in`]): it reads
/// them several times, and each read of the view would scan the archive
/// again. Called just before
/// `volume` runs, so that planning and `--dry-run` read nothing. The
/// counts are small: one row per group and bucket that has events.
pub async fn count(ctx: &SessionContext, volume: &Volume) -> datafusion::error::Result<()> {
    let df = ctx.table("volume_counts").await?;
    let schema = df.schema().inner().clone();
    let partitions = df.collect_partitioned().await?;
    let table = datafusion::datasource::MemTable::try_new(schema, partitions)?;
    super::swap_in(
        ctx,
        "volume_counts",
        std::sync::Arc::new(table),
        &with_columns(VOLUME_SQL, &volume.by),
        "volume",
    )
    .await
}

fn with_columns(sql: &str, columns: &[String]) -> String {
    let list: String = columns.iter().map(|c| format!("{}, ", quoted(c))).collect();
    sql.replace(BY_MARK, &list)
}

/// The flagged buckets (`all`: every scored bucket), by group and time.
pub async fn anomalies(
    ctx: &SessionContext,
    volume: &Volume,
    all: bool,
) -> datafusion::error::Result<DataFrame> {
    let mut order: Vec<String> = volume.by.iter().map(|c| quoted(c)).collect();
    order.push("bucket_start".into());
    let filter = if all { "" } else { " WHERE flagged" };
    // Planned for one partition: past the counts the tables are small (a
    // row per group and bucket), and DataFusion 55's repartitioning
    // panics ("partition not used yet") when its spilling meets a memory
    // limit, as a grid of minute buckets under `--memory-limit 128M` did.
    // The frame keeps a copy of the session's state as it is now: one
    // partition for it, the session's own setting back at once.
    let shared = ctx.state_ref();
    let was = {
        let mut state = shared.write();
        let options = state.config_mut().options_mut();
        std::mem::replace(&mut options.execution.target_partitions, 1)
    };
    let df = ctx
        .sql(&format!(
            "SELECT * FROM volume{filter} ORDER BY {}",
            order.join(", ")
        ))
        .await;
    shared
        .write()
        .config_mut()
        .options_mut()
        .execution
        .target_partitions = was;
    df
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After [`count`], `volume` reads the counts, not the archive: the
    /// table under `events` is gone from its plan.
    #[tokio::test]
    async fn volume_reads_the_counts_once_counted() {
        let ctx = SessionContext::new();
        ctx.sql(
            "CREATE TABLE raw AS SELECT 's' AS source, \
             arrow_cast(to_timestamp_micros(h * 3600000000), 'Timestamp(µs, \"UTC\")') AS event_time \
             FROM (SELECT unnest(generate_series(0, 500)) AS h)",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
        ctx.sql("CREATE VIEW events AS SELECT * FROM raw")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let volume = Volume {
            by: vec!["source".into()],
            by_origin: "[detect.volume] by".into(),
            bucket_us: 3_600_000_000,
            threshold: 5.0,
        };
        register(&ctx, &volume, None, None).await.unwrap();
        // The archive's scans in `volume`'s plan, and the rows it gives.
        let probe = |ctx: SessionContext, volume: Volume| async move {
            let plan = ctx.table("volume").await.unwrap().into_optimized_plan();
            let scans = plan
                .unwrap()
                .display_indent()
                .to_string()
                .matches("TableScan: raw")
                .count();
            let batches = anomalies(&ctx, &volume, true)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            (scans, batches.iter().map(|b| b.num_rows()).sum::<usize>())
        };
        let (scans_before, rows_before) = probe(ctx.clone(), volume.clone()).await;
        assert!(scans_before >= 1, "{scans_before}");
        count(&ctx, &volume).await.unwrap();
        let (scans_after, rows_after) = probe(ctx.clone(), volume.clone()).await;
        assert_eq!(scans_after, 0);
        assert_eq!(rows_before, rows_after);
        assert!(rows_after > 0);
    }

    /// Every grouping place is marked: no bare `key` is left, and no
    /// grouping leaves a dangling comma.
    #[test]
    fn every_group_place_is_marked() {
        for by in [vec![], vec!["source".to_string(), "kafka_partition".into()]] {
            let s = with_columns(VOLUME_SQL, &by);
            let code: String = s
                .lines()
                .map(|l| l.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(!code.contains("key"), "{code}");
            assert!(!code.contains("(,") && !code.contains(", ,"), "{code}");
        }
    }
}
