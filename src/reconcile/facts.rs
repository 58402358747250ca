//! `reconcile_facts` computed from `reconcile_rows` in one sort: the rows
//! ordered by event id and, within an event, with the kept row first (the
//! order `sql/reconcile.sql` states), then one linear sweep that keeps each
//! event's first row with the minimum event time of all its rows. The view
//! says the same with a window partitioned by event id, which DataFusion
//! evaluates at a few microseconds per partition: 60-90 s at 10M events,
//! where the sort takes a few seconds. `tests::the_sweep_keeps_what_the_view_keeps`
//! checks that both keep the same rows.
//!
//! Times are compared as nanoseconds in an `i128`, whatever the units of
//! the archive's event_time and the snapshot's as_of: exact, and never out
//! of range.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::source::quoted;

/// An event's kept row first: `sql/reconcile.sql` (`reconcile_facts`)
/// states the order, and its window runs in it reversed.
pub const KEPT_FIRST: &str = "event_id, \
     backfill_done DESC NULLS FIRST, \
     CASE WHEN backfill_done THEN event_time END ASC NULLS LAST, \
     coalesce(attempts, 0) DESC NULLS FIRST, \
     event_time DESC NULLS LAST, \
     seq ASC NULLS LAST, \
     status ASC NULLS LAST, \
     error ASC NULLS LAST";

const TIME: &str = "__bf_row_time";
const DONE: &str = "__bf_row_done";

/// Write `reconcile_facts` (the `columns` of `reconcile_rows`, then
/// `__bf_done`) to `dir` as one Parquet file.
pub async fn write(ctx: &SessionContext, columns: &[String], dir: &Path) -> Result<()> {
    let carried: Vec<&String> = columns.iter().filter(|c| *c != "__bf_done").collect();
    let select: Vec<String> = carried.iter().map(|c| quoted(c)).collect();
    let df = ctx
        .sql(&format!(
            "SELECT {}, event_time AS {TIME}, backfill_done AS {DONE} \
             FROM reconcile_rows ORDER BY {KEPT_FIRST}",
            select.join(", ")
        ))
        .await?;
    let sorted = df.schema().inner().clone();
    let at = |name: &str| -> Result<usize> {
        sorted
            .index_of(name)
            .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
    };
    let cols = Columns {
        id: at("event_id")?,
        as_of: at("__bf_as_of")?,
        time: at(TIME)?,
        done: at(DONE)?,
        carried: carried.len(),
    };
    let mut fields: Vec<Field> = sorted.fields()[..cols.carried]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("__bf_done", DataType::Boolean, false));
    let out: SchemaRef = Arc::new(Schema::new(fields));

    std::fs::create_dir_all(dir)?;
    let file = std::fs::File::create(dir.join("part-0.parquet"))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, out.clone(), None)?;
    let mut sweep = Sweep::default();
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        for b in sweep.batch(&batch?, &cols, &out)? {
            writer.write(&b)?;
        }
    }
    if let Some(b) = sweep.finish(&cols, &out)? {
        writer.write(&b)?;
    }
    writer.close()?;
    Ok(())
}

/// Where the sweep finds what it reads in a sorted batch; the kept columns
/// are the first `carried`.
struct Columns {
    id: usize,
    as_of: usize,
    time: usize,
    done: usize,
    carried: usize,
}

/// The event being swept: where its first (kept) row is, what that row
/// says, and the minimum event time of its rows so far.
struct Group {
    /// The kept row in the batch being swept, while `carried` is None.
    row: usize,
    /// The kept row alone, once the batch it is in has ended with the
    /// event still open.
    carried: Option<RecordBatch>,
    id: String,
    seen: Option<i128>,
    as_of: Option<i128>,
    /// The kept row's event time when it is a processed row: the event's
    /// first processed row, as the kept row comes first.
    done_at: Option<i128>,
}

impl Group {
    /// Whether the event is kept (it was seen by its as_of), and then
    /// whether it was processed by then.
    fn kept(&self) -> Option<bool> {
        let as_of = self.as_of?;
        if self.seen? > as_of {
            return None;
        }
        Some(self.done_at.is_some_and(|d| d <= as_of))
    }
}

#[derive(Default)]
struct Sweep {
    group: Option<Group>,
}

impl Sweep {
    /// The kept rows of the events this batch ends.
    fn batch(&mut self, b: &RecordBatch, c: &Columns, out: &SchemaRef) -> Result<Vec<RecordBatch>> {
        let ids = cast(b.column(c.id), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let done = b.column(c.done).as_boolean();
        let mut here: (Vec<u32>, Vec<bool>) = (vec![], vec![]);
        let mut earlier = vec![];
        for r in 0..b.num_rows() {
            let t = nanos(b.column(c.time), r);
            let id = ids.value(r);
            match &mut self.group {
                Some(g) if ids.is_valid(r) && g.id == id => {
                    g.seen = min(g.seen, t);
                    continue;
                }
                _ => {}
            }
            if let Some(g) = self.group.take()
                && let Some(kept_done) = g.kept()
            {
                match &g.carried {
                    None => {
                        here.0.push(g.row as u32);
                        here.1.push(kept_done);
                    }
                    Some(one) => earlier.push(rows(one, vec![0], vec![kept_done], c, out)?),
                }
            }
            let row_done = done.is_valid(r) && done.value(r);
            self.group = Some(Group {
                row: r,
                carried: None,
                id: id.to_string(),
                seen: t,
                as_of: nanos(b.column(c.as_of), r),
                done_at: if row_done { t } else { None },
            });
        }
        // The event still open keeps its kept row past this batch.
        if let Some(g) = &mut self.group
            && g.carried.is_none()
        {
            g.carried = Some(b.slice(g.row, 1));
        }
        if !here.0.is_empty() {
            earlier.push(rows(b, here.0, here.1, c, out)?);
        }
        Ok(earlier)
    }

    /// The last event's kept row, if it is kept.
    fn finish(&mut self, c: &Columns, out: &SchemaRef) -> Result<Option<RecordBatch>> {
        let Some(g) = self.group.take() else {
            return Ok(None);
        };
        match (g.kept(), &g.carried) {
            (Some(done), Some(one)) => Ok(Some(rows(one, vec![0], vec![done], c, out)?)),
            _ => Ok(None),
        }
    }
}

/// The kept columns of `rows` of `b`, with `__bf_done`.
fn rows(
    b: &RecordBatch,
    rows: Vec<u32>,
    done: Vec<bool>,
    c: &Columns,
    out: &SchemaRef,
) -> Result<RecordBatch> {
    let kept = take_record_batch(b, &UInt32Array::from(rows))?;
    let mut columns: Vec<ArrayRef> = kept.columns()[..c.carried].to_vec();
    columns.push(Arc::new(BooleanArray::from(done)));
    Ok(RecordBatch::try_new(out.clone(), columns)?)
}

fn min(a: Option<i128>, b: Option<i128>) -> Option<i128> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A timestamp's value as nanoseconds since the epoch (NULL: None).
fn nanos(a: &ArrayRef, row: usize) -> Option<i128> {
    use arrow::datatypes::{
        TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
        TimestampSecondType,
    };
    if a.is_null(row) {
        return None;
    }
    let v = match a.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => {
            i128::from(a.as_primitive::<TimestampSecondType>().value(row)) * 1_000_000_000
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            i128::from(a.as_primitive::<TimestampMillisecondType>().value(row)) * 1_000_000
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            i128::from(a.as_primitive::<TimestampMicrosecondType>().value(row)) * 1_000
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            i128::from(a.as_primitive::<TimestampNanosecondType>().value(row))
        }
        _ => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small pseudo-random archive: events of one to four rows, ties in
    /// time, NULL times, attempts and seqs, processed rows before and
    /// after the snapshot's as_of, an event under two keys, a key the
    /// snapshot lacks, and event times in `unit`.
    async fn session(seed: u64, unit: &str, batch_rows: usize) -> SessionContext {
        let mut x = seed | 1;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut rows = vec![];
        for e in 0..400 {
            let key = format!("k{}", next(4));
            for r in 0..=next(4) {
                let key = if r == 2 && next(5) == 0 {
                    "k9".into()
                } else {
                    key.clone()
                };
                let time = match next(8) {
                    0 => "NULL".to_string(),
                    t => format!(
                        "'2024-01-0{}T0{}:00:00.{:03}Z'",
                        1 + t % 3,
                        next(4),
                        next(3)
                    ),
                };
                let status = ["processed", "failed", "pending"][next(3) as usize];
                let attempts = match next(4) {
                    0 => "NULL".into(),
                    a => a.to_string(),
                };
                let seq = match next(6) {
                    0 => "NULL".into(),
                    s => s.to_string(),
                };
                let error = ["NULL", "'timeout'", "'boom'"][next(3) as usize];
                rows.push(format!(
                    "('e{e}', '{key}', {seq}, {time}, '{status}', {attempts}, {error}, {})",
                    next(100)
                ));
            }
        }
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_batch_size(batch_rows),
        );
        for sql in [
            format!(
                "CREATE TABLE raw (event_id VARCHAR, \"key\" VARCHAR, seq BIGINT, t VARCHAR, \
                 status VARCHAR, attempts BIGINT, error VARCHAR, amount BIGINT) AS VALUES {}",
                rows.join(", ")
            ),
            format!(
                "CREATE VIEW events AS SELECT event_id, key, seq, \
                 arrow_cast(arrow_cast(t, 'Timestamp(µs, \"UTC\")'), 'Timestamp({unit}, \"UTC\")') \
                     AS event_time, \
                 status, attempts, error, amount, status = 'processed' AS backfill_done FROM raw"
            ),
            "CREATE TABLE snapshot AS SELECT * FROM (VALUES \
             ('k0', 1.0, arrow_cast('2024-01-02T01:00:00Z', 'Timestamp(µs, \"UTC\")')), \
             ('k1', 2.0, arrow_cast('2024-01-03T00:00:00Z', 'Timestamp(µs, \"UTC\")')), \
             ('k2', 3.0, arrow_cast('2024-01-01T02:00:00.001Z', 'Timestamp(µs, \"UTC\")'))) \
             AS s(__bf_key, __bf_actual, __bf_as_of)"
                .to_string(),
        ] {
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        }
        let statements =
            datafusion::sql::parser::DFParser::parse_sql(super::super::RECONCILE_SQL).unwrap();
        for statement in statements.into_iter().take(2) {
            let plan = ctx.state().statement_to_plan(statement).await.unwrap();
            ctx.execute_logical_plan(plan)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
        }
        ctx
    }

    /// Every kept row as text, sorted.
    async fn rows(ctx: &SessionContext, table: &str) -> Vec<String> {
        let batches = ctx
            .sql(&format!(
                "SELECT event_id, key, seq, amount, __bf_done, \
                 arrow_cast(__bf_as_of, 'Utf8') AS as_of, __bf_in_snapshot FROM {table}"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut out = vec![];
        for b in &batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                    .collect();
                out.push(cells.join(","));
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn the_sweep_keeps_what_the_view_keeps() {
        // Batches of 3 rows: events straddle batches, their kept row
        // carried past the batch it is in.
        for (seed, unit, batch_rows) in [
            (1, "µs", 8192),
            (7, "ns", 3),
            (42, "ms", 8192),
            (99, "s", 3),
        ] {
            let ctx = session(seed, unit, batch_rows).await;
            let want = rows(&ctx, "reconcile_facts").await;
            let dir = tempfile::tempdir().unwrap();
            let mut columns: Vec<String> = super::super::FACT_COLUMNS.map(String::from).to_vec();
            columns.push("amount".into());
            write(&ctx, &columns, dir.path()).await.unwrap();
            ctx.register_parquet(
                "swept",
                &format!("{}/", dir.path().display()),
                datafusion::prelude::ParquetReadOptions::default(),
            )
            .await
            .unwrap();
            let got = rows(&ctx, "swept").await;
            assert!(want.len() > 100, "seed {seed}: {}", want.len());
            assert!(want.iter().any(|r| r.contains("true")), "seed {seed}");
            assert_eq!(got, want, "seed {seed}, {unit}");
        }
    }
}
