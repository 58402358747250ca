//! Gap recovery (`run --recover-from kafka://HOST:PORT/TOPIC`): the events
//! a gap misses may still be in the topic they were first published to.
//! This module reads the topic over the gaps' time span, matches its rows
//! to the gaps by (key, seq), classifies each gap (`recoverable`, `partial`,
//! `lost`) and hands the events found to the run as candidates, shaped like
//! the fetch's rows, so that they join the one sort that puts a key's
//! replays in seq order. It decides nothing (the policy does) and writes
//! nothing (the sinks do); without the flag none of it runs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;

use crate::detect::onepass::{
    AFTER_CONFLICT, AFTER_GAP, ARCHIVED_ATTEMPTS, Detection, IN_CONFLICT, LEDGER_DEAD,
    LEDGER_REPLAYS,
};
use crate::error::Error;
use crate::job::Scan;
use crate::report::Recovery as Counts;
use crate::source::{self, Archive};

/// One gap as the gaps stream gave it.
struct Gap {
    key: String,
    first: i64,
    last: i64,
}

/// What the topic held for the gaps.
pub struct Recovered {
    /// One class per gap, in the order the gaps were given.
    pub classes: Vec<&'static str>,
    pub counts: Counts,
    /// Per key with a gap: the first seq still missing once the topic's
    /// events are counted in (None: every gap of the key was recovered).
    pub first_missing: Vec<(String, Option<i64>)>,
    /// The recovered events to decide, in the `events` view's columns.
    rows: Vec<RecordBatch>,
}

/// Read `url` over the span of `gaps` (the gaps stream's batches), match
/// its rows to them and classify each.
///
/// The read is bounded by time: from the earliest gap's preceding event
/// to the latest gap's following event (by the messages' Kafka
/// timestamps, found per partition with `offsets_for_times`), the run's
/// window where a neighbour has no time. Seeking only each key's partition
/// would read less on a topic of many partitions; one bounded read of all
/// of them finds events a producer keyed or partitioned differently too.
pub async fn recover(
    ctx: &SessionContext,
    scan: &Scan,
    archive: &Archive,
    url: &str,
    gaps: &[RecordBatch],
) -> Result<Recovered, Error> {
    let mut list: Vec<Gap> = vec![];
    let (mut from, mut to): (Option<i64>, Option<i64>) = (None, None);
    let mut unbounded = (false, false);
    for b in gaps {
        let key = string_column(b, "key")?;
        let first = int_column(b, "first_missing_seq")?;
        let last = int_column(b, "last_missing_seq")?;
        let before = millis_column(b, "before_event_time")?;
        let after = millis_column(b, "after_event_time")?;
        for i in 0..b.num_rows() {
            list.push(Gap {
                key: key.value(i).to_string(),
                first: first.value(i),
                last: last.value(i),
            });
            // Both neighbours bound both ends: seq order is not always
            // time order, and an empty span would be refused by the reader.
            if before.is_null(i) || after.is_null(i) {
                unbounded = (
                    unbounded.0 || before.is_null(i),
                    unbounded.1 || after.is_null(i),
                );
            }
            for v in [&before, &after]
                .iter()
                .filter(|c| !c.is_null(i))
                .map(|c| c.value(i))
            {
                from = Some(from.map_or(v, |f| f.min(v)));
                to = Some(to.map_or(v, |t| t.max(v)));
            }
        }
    }
    let mut out = Recovered {
        classes: vec![],
        counts: Counts::default(),
        first_missing: vec![],
        rows: vec![],
    };
    if list.is_empty() {
        return Ok(out);
    }
    let from = if unbounded.0 {
        scan.from
    } else {
        from.and_then(DateTime::<Utc>::from_timestamp_millis)
    };
    // Exclusive: the following event's own millisecond is in.
    let to = if unbounded.1 {
        scan.to
    } else {
        to.and_then(|t| DateTime::<Utc>::from_timestamp_millis(t + 1))
    };
    let kafka = scan.kafka.clone().unwrap_or_default();
    let hint = source::all_nullable(&archive.schema);
    let read = crate::kafka::source::read_topic(url, from, to, &kafka, Some(hint))
        .await
        .map_err(source::SourceError::from)?;
    out.counts.recovery_messages = read.messages;
    let batches = source::coerce_event_time(&read.schema, read.batches, &scan.columns.event_time)?;
    let nullable = source::all_nullable(&archive.schema);
    let adapted = batches
        .iter()
        .map(|b| source::adapt_batch(b, &nullable))
        .collect::<Result<Vec<_>, _>>()?;
    let table = datafusion::datasource::MemTable::try_new(nullable, vec![adapted])?;
    let events = source::events_frame(ctx.read_table(Arc::new(table))?, scan, archive, vec![])?
        .collect()
        .await?;

    // The gaps by key, in seq order, to find a row's gap by binary search.
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, g) in list.iter().enumerate() {
        by_key.entry(g.key.as_str()).or_default().push(i);
    }
    for v in by_key.values_mut() {
        v.sort_by_key(|&i| list[i].first);
    }
    let mut found: Vec<BTreeSet<i64>> = vec![BTreeSet::new(); list.len()];
    // One row per event: a message the producer sent twice is one event. A
    // message without an event id recovers nothing (no ledger entry could
    // ever say it was sent).
    let mut seen: HashSet<(String, (usize, i64))> = HashSet::new();
    let mut inside: Vec<(RecordBatch, Vec<(usize, i64)>)> = vec![];
    let mut ids: Vec<String> = vec![];
    for b in &events {
        let key = string_column(b, "key")?;
        let seq = int_column(b, "seq")?;
        let id = string_column(b, "event_id")?;
        let mut keep = Vec::with_capacity(b.num_rows());
        let mut places = vec![];
        for i in 0..b.num_rows() {
            let hit = (!key.is_null(i) && !seq.is_null(i) && !id.is_null(i))
                .then(|| {
                    let (k, s) = (key.value(i), seq.value(i));
                    let gs = by_key.get(k)?;
                    let at = gs.partition_point(|&g| list[g].first <= s);
                    let g = *gs.get(at.checked_sub(1)?)?;
                    (s <= list[g].last).then_some((g, s))
                })
                .flatten();
            let new = hit.is_some_and(|place| seen.insert((id.value(i).to_string(), place)));
            if let (true, Some(place)) = (new, hit) {
                ids.push(id.value(i).to_string());
                places.push(place);
            }
            keep.push(new);
        }
        let b = arrow::compute::filter_record_batch(b, &BooleanArray::from(keep))?;
        if b.num_rows() > 0 {
            inside.push((b, places));
        }
    }
    // Not recovered: an id the archive already holds (that event is decided
    // from its archived rows: replaying it would send it twice), a missing
    // seq the topic holds under two ids, and an id the topic holds under
    // two missing seqs (conflicts nobody can settle: the seqs stay missing,
    // as an archived conflict is not replayed either). Every message counts
    // in the contest, whatever else excludes it: one dropped for another
    // reason must not leave its rival looking uncontested.
    let known = ids_in(ctx, "events", None, &ids).await?;
    let mut per_seq: HashMap<(usize, i64), u32> = HashMap::new();
    let mut per_id: HashMap<String, u32> = HashMap::new();
    for (b, places) in &inside {
        let id = string_column(b, "event_id")?;
        for (i, place) in places.iter().enumerate() {
            *per_seq.entry(*place).or_default() += 1;
            *per_id.entry(id.value(i).to_string()).or_default() += 1;
        }
    }
    let mut kept: Vec<RecordBatch> = vec![];
    ids.clear();
    for (b, places) in inside {
        let id = string_column(&b, "event_id")?;
        let keep: BooleanArray = places
            .iter()
            .enumerate()
            .map(|(i, place)| {
                let ok = !known.contains(id.value(i))
                    && per_seq.get(place) == Some(&1)
                    && per_id.get(id.value(i)) == Some(&1);
                if ok {
                    found[place.0].insert(place.1);
                    ids.push(id.value(i).to_string());
                }
                Some(ok)
            })
            .collect();
        let b = arrow::compute::filter_record_batch(&b, &keep)?;
        if b.num_rows() > 0 {
            kept.push(b);
        }
    }
    out.counts.recovered = kept.iter().map(|b| b.num_rows() as u64).sum();

    // Events an earlier run replayed or dead-lettered are done: replaying
    // them in every later run (the gap stays in the archive) would send
    // them again and again.
    let done = ids_in(ctx, "ledger_entries", Some(&["replay", "dlq"]), &ids).await?;
    if !done.is_empty() {
        let mut rest = vec![];
        for b in kept {
            let id = string_column(&b, "event_id")?;
            let keep: BooleanArray = (0..b.num_rows())
                .map(|i| Some(id.is_null(i) || !done.contains(id.value(i))))
                .collect();
            let b = arrow::compute::filter_record_batch(&b, &keep)?;
            if b.num_rows() > 0 {
                rest.push(b);
            }
        }
        kept = rest;
    }
    let decided: u64 = kept.iter().map(|b| b.num_rows() as u64).sum();
    out.counts.recovered_skipped = out.counts.recovered - decided;
    out.rows = kept;

    for (gap, found) in list.iter().zip(&found) {
        let class = class_of(gap, found);
        match class {
            "lost" => out.counts.gaps_lost += 1,
            "recoverable" => out.counts.gaps_recoverable += 1,
            _ => out.counts.gaps_partial += 1,
        }
        out.classes.push(class);
    }
    for (key, gs) in &by_key {
        let first = gs.iter().find_map(|&g| first_unfound(&list[g], &found[g]));
        out.first_missing.push((key.to_string(), first));
    }
    Ok(out)
}

/// A gap's class by how many of its missing seqs were found.
fn class_of(gap: &Gap, found: &BTreeSet<i64>) -> &'static str {
    let n = found.len() as i64;
    if n == 0 {
        "lost"
    } else if n == gap.last - gap.first + 1 {
        "recoverable"
    } else {
        "partial"
    }
}

/// The first seq of `gap` the topic did not give back (`found`: the seqs
/// it did, all inside the gap), if any: where the key's barrier moves to.
fn first_unfound(gap: &Gap, found: &BTreeSet<i64>) -> Option<i64> {
    let mut s = gap.first;
    for &f in found {
        if f != s {
            break;
        }
        s += 1;
    }
    (s <= gap.last).then_some(s)
}

impl Recovered {
    /// The recovered events in the fetch's shape (`schema`: its columns,
    /// nullable), flagged as the fetch flags archived rows: after the gap
    /// barriers were reset ([`Detection::reset_first_gaps`]), a recovered
    /// event after its key's first *unrecovered* gap is after a gap.
    pub fn candidates(
        &self,
        schema: &Schema,
        detection: &Detection,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), Error> {
        let schema: SchemaRef = source::all_nullable(schema);
        let mut out = vec![];
        for b in &self.rows {
            let n = b.num_rows();
            let key = string_column(b, "key")?;
            let seq = int_column(b, "seq")?;
            let flags: Vec<(bool, bool, bool)> = (0..n)
                .map(|i| {
                    if key.is_null(i) || seq.is_null(i) {
                        (false, false, false)
                    } else {
                        detection.flags(key.value(i), seq.value(i))
                    }
                })
                .collect();
            let cols = schema
                .fields()
                .iter()
                .map(|f| -> Result<ArrayRef, Error> {
                    let c: ArrayRef = match f.name().as_str() {
                        ARCHIVED_ATTEMPTS => {
                            let a = b
                                .column_by_name("attempts")
                                .map(|c| arrow::compute::cast(c, &DataType::Int64))
                                .transpose()?;
                            let a = a.as_ref().map(|a| a.as_primitive::<Int64Type>());
                            // The logs' error lines raise them as for
                            // archived events (`--logs`).
                            let id = b
                                .column_by_name("event_id")
                                .map(|c| arrow::compute::cast(c, &DataType::Utf8))
                                .transpose()?;
                            let id = id.as_ref().map(|c| c.as_string::<i32>());
                            Arc::new(Int64Array::from_iter_values((0..n).map(|i| {
                                let own = a.filter(|a| !a.is_null(i)).map_or(0, |a| a.value(i));
                                let id = id.filter(|c| c.is_valid(i)).map(|c| c.value(i));
                                detection.with_logs(id, own)
                            })))
                        }
                        IN_CONFLICT => {
                            Arc::new(BooleanArray::from_iter(flags.iter().map(|f| Some(f.0))))
                        }
                        AFTER_CONFLICT => {
                            Arc::new(BooleanArray::from_iter(flags.iter().map(|f| Some(f.1))))
                        }
                        AFTER_GAP => {
                            Arc::new(BooleanArray::from_iter(flags.iter().map(|f| Some(f.2))))
                        }
                        // Done ones were left out above.
                        LEDGER_REPLAYS => Arc::new(Int64Array::from(vec![0; n])),
                        LEDGER_DEAD => Arc::new(BooleanArray::from(vec![false; n])),
                        name => match b.column_by_name(name) {
                            Some(c) if c.data_type() == f.data_type() => c.clone(),
                            Some(c) => arrow::compute::cast(c, f.data_type())?,
                            None => arrow::array::new_null_array(f.data_type(), n),
                        },
                    };
                    Ok(c)
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push(RecordBatch::try_new(schema.clone(), cols)?);
        }
        Ok((schema, out))
    }

    /// Recovered events this run decides.
    pub fn decided(&self) -> u64 {
        self.rows.iter().map(|b| b.num_rows() as u64).sum()
    }
}

/// The ids among `ids` that `table` holds: `events` (the archive), or
/// `ledger_entries` with one of `outcomes` (what committed runs replayed or
/// dead-lettered). Only with `--recover-from`, over the recovered ids.
async fn ids_in(
    ctx: &SessionContext,
    table: &str,
    outcomes: Option<&[&str]>,
    ids: &[String],
) -> Result<HashSet<String>, Error> {
    let mut done = HashSet::new();
    if ids.is_empty() || !ctx.table_exist(table)? {
        return Ok(done);
    }
    for chunk in ids.chunks(4096) {
        let mut wanted =
            col("event_id").in_list(chunk.iter().map(|s| lit(s.as_str())).collect(), false);
        if let Some(outcomes) = outcomes {
            wanted = col("outcome")
                .in_list(outcomes.iter().map(|o| lit(*o)).collect(), false)
                .and(wanted);
        }
        let df = ctx
            .table(table)
            .await?
            .filter(wanted)?
            .select(vec![col("event_id")])?;
        for b in df.collect().await? {
            let c = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
            let c = c.as_string::<i32>();
            for i in 0..c.len() {
                if !c.is_null(i) {
                    done.insert(c.value(i).to_string());
                }
            }
        }
    }
    Ok(done)
}

/// The `recovery` column of a batch of gap rows, from their classes.
pub fn recovery_column(classes: &[&'static str]) -> ArrayRef {
    Arc::new(StringArray::from(classes.to_vec()))
}

/// The gaps sink's extra column with `--recover-from`.
pub fn recovery_field() -> Field {
    Field::new("recovery", DataType::Utf8, false)
}

fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, Error> {
    b.column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("gap recovery: no column {name}")))
}

fn string_column(b: &RecordBatch, name: &str) -> Result<StringArray, Error> {
    let c = arrow::compute::cast(column(b, name)?, &DataType::Utf8)?;
    Ok(c.as_string::<i32>().clone())
}

fn int_column(b: &RecordBatch, name: &str) -> Result<Int64Array, Error> {
    let c = arrow::compute::cast(column(b, name)?, &DataType::Int64)?;
    Ok(c.as_primitive::<Int64Type>().clone())
}

/// A timestamp column as epoch milliseconds.
fn millis_column(b: &RecordBatch, name: &str) -> Result<Int64Array, Error> {
    let c = column(b, name)?;
    let c = match c.data_type() {
        DataType::Timestamp(_, _) => {
            arrow::compute::cast(c, &DataType::Timestamp(TimeUnit::Millisecond, None))?
        }
        _ => c.clone(),
    };
    let c = arrow::compute::cast(&c, &DataType::Int64)?;
    Ok(c.as_primitive::<Int64Type>().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(first: i64, last: i64) -> Gap {
        Gap {
            key: "k".into(),
            first,
            last,
        }
    }

    fn set(v: &[i64]) -> BTreeSet<i64> {
        v.iter().copied().collect()
    }

    /// The barrier moves to the first hole the topic leaves, not past a
    /// recovered seq that follows it.
    #[test]
    fn the_first_unfound_seq_is_the_first_hole() {
        let g = gap(2, 4);
        assert_eq!(first_unfound(&g, &set(&[])), Some(2));
        assert_eq!(first_unfound(&g, &set(&[2, 4])), Some(3));
        assert_eq!(first_unfound(&g, &set(&[3, 4])), Some(2));
        assert_eq!(first_unfound(&g, &set(&[2, 3])), Some(4));
        assert_eq!(first_unfound(&g, &set(&[2, 3, 4])), None);
    }

    #[test]
    fn classes_count_the_seqs_found() {
        let g = gap(10, 12);
        assert_eq!(class_of(&g, &set(&[])), "lost");
        assert_eq!(class_of(&g, &set(&[11])), "partial");
        assert_eq!(class_of(&g, &set(&[10, 11, 12])), "recoverable");
        assert_eq!(class_of(&gap(5, 5), &set(&[5])), "recoverable");
    }
}
