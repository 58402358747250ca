//! Time silences: the `silences` view (`sql/silences.sql`) registered over
//! `events` with the job's grouping columns and threshold. It is a plan of
//! its own over the narrow columns (the grouping columns, event_id,
//! event_time), run only when asked: the run's one-pass detection never
//! pays for it.

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

use crate::error::Error;
use crate::job::detect::{Silence, Threshold};
use crate::source::quoted;

pub const SILENCES_SQL: &str = include_str!("../../sql/silences.sql");

/// Where `sql/silences.sql` names its grouping columns: it is written for
/// `key` and runs for any list of columns.
pub(crate) const BY_MARK: &str = "key /*by*/";

/// Register `silence_settings` and `silences`. A grouping column that
/// `events` does not have is the settings' fault (exit 2), named with the
/// key or flag it came from and the columns there are.
pub async fn register(
    ctx: &SessionContext,
    silence: &Silence,
    window_end: Option<DateTime<Utc>>,
) -> Result<(), Error> {
    check_columns(
        ctx,
        &silence.by,
        &silence.by_origin,
        &["event_id", "event_time"],
    )
    .await?;
    let (fixed, factor) = match silence.threshold {
        Threshold::Fixed(us) => (us.to_string(), "NULL".to_string()),
        Threshold::MedianMultiple(f) => ("NULL".to_string(), format!("{f:?}")),
    };
    // Without `--to`, the archive's last event time: from the footers'
    // statistics when the whole archive is read, else one column's pass.
    let end = match window_end {
        Some(t) => format!("'{}'", t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        None => "(SELECT max(event_time) FROM events)".into(),
    };
    let settings = format!(
        "CREATE OR REPLACE VIEW silence_settings AS \
         SELECT CAST({fixed} AS BIGINT) AS silence_threshold_us, \
                CAST({factor} AS DOUBLE) AS silence_median_factor, \
                arrow_cast({end}, 'Timestamp(µs, \"UTC\")') AS silence_window_end"
    );
    ctx.sql(&settings).await?.collect().await?;
    let sql = with_columns(SILENCES_SQL, &silence.by);
    ctx.sql(&sql).await?.collect().await?;
    Ok(())
}

/// The view's text with `columns` for its grouping column.
pub(crate) fn with_columns(sql: &str, columns: &[String]) -> String {
    let list = columns
        .iter()
        .map(|c| quoted(c))
        .collect::<Vec<_>>()
        .join(", ");
    sql.replace(BY_MARK, &list)
}

/// Every grouping column is a column of `events`.
pub(crate) async fn check_columns(
    ctx: &SessionContext,
    by: &[String],
    origin: &str,
    reserved: &[&str],
) -> Result<(), Error> {
    let events = ctx.table("events").await?;
    let names: Vec<&str> = events
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| !n.starts_with("backfill_"))
        .collect();
    for c in by {
        if reserved.contains(&c.as_str()) {
            return Err(Error::Usage(format!(
                "{origin}: '{c}' cannot group this detection: it is what the detection measures"
            )));
        }
        if !names.contains(&c.as_str()) {
            return Err(Error::Usage(format!(
                "{origin}: no column '{c}' in the archive's events (columns: {})",
                names.join(", ")
            )));
        }
    }
    Ok(())
}

/// The silences, ordered by group and start.
pub async fn silences(
    ctx: &SessionContext,
    silence: &Silence,
) -> datafusion::error::Result<DataFrame> {
    let mut order: Vec<String> = silence.by.iter().map(|c| quoted(c)).collect();
    order.push("silent_from".into());
    ctx.sql(&format!(
        "SELECT * FROM silences ORDER BY {}",
        order.join(", ")
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every grouping-column place of the view is marked: after the
    /// substitution no bare `key` is left.
    #[test]
    fn every_group_place_is_marked() {
        let s = with_columns(SILENCES_SQL, &["source".into(), "Kafka Partition".into()]);
        assert!(s.contains("\"source\", \"Kafka Partition\""), "{s}");
        let code: String = s
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!code.contains("key"), "{code}");
    }
}
