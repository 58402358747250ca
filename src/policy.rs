//! The retry decision, vectorized over Arrow record batches with arrow's
//! compute kernels: batches in, batches out, no I/O. Pure on purpose: it is
//! the rule set the whole tool exists for, and it is unit-tested with
//! hand-built batches.
//!
//! For each candidate (an unresolved event's chosen row), first match wins:
//! skip (an earlier run dead-lettered it) → DLQ `missing_event_id` → DLQ
//! `invalid_attempts` → DLQ `sequence_conflict` → DLQ `permanent_error` →
//! DLQ `max_attempts_exceeded` → replay. Then the barriers, on what would
//! be replayed alone: an event after its key's first gap (`--on-gap`) or
//! after its key's first conflicting seq (`--on-conflict`) is replayed,
//! held (`held_by_gap` / `held_by_conflict`: no ledger entry, so a later
//! run decides it again) or dead-lettered (`after_gap` / `after_conflict`).
//! A dead letter reaches no consumer, so an event the rules above
//! dead-letter keeps its own reason: order is only at stake for replays.
//!
//! A row with an impossible value is a decision, not a failed run: every
//! count here saturates instead of overflowing, and an attempts value that
//! cannot be a retry count is dead-lettered rather than carried into the
//! Int32 `backfill_attempt` column.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, Int64Array, RecordBatch, Scalar,
    StringArray, TimestampMicrosecondArray,
};
use arrow::compute::kernels::{boolean, cmp, zip};
use arrow::compute::{cast, filter_record_batch, is_null};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use serde::Serialize;

use crate::detect::internal;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("policy: candidate batch lacks column {0}")]
    MissingColumn(&'static str),
    #[error("policy: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

pub const REASON_UNPROCESSED: &str = "unprocessed";
pub const REASON_CONFLICT: &str = "sequence_conflict";
pub const REASON_PERMANENT: &str = "permanent_error";
pub const REASON_MAX_ATTEMPTS: &str = "max_attempts_exceeded";
/// The archive has no event_id for the row (NULL); its ledger id is
/// synthetic (see `source::MISSING_EVENT_ID_PREFIX`).
pub const REASON_MISSING_EVENT_ID: &str = "missing_event_id";
/// The archived attempts are negative or above [`MAX_ARCHIVED_ATTEMPTS`].
pub const REASON_INVALID_ATTEMPTS: &str = "invalid_attempts";

/// Replayed while its key's first gap (or first conflicting seq) lies
/// before it: `--on-gap dlq` / `--on-conflict dlq`.
pub const REASON_AFTER_GAP: &str = "after_gap";
pub const REASON_AFTER_CONFLICT: &str = "after_conflict";
/// Left out of the run (`--on-gap hold` / `--on-conflict hold`): counted,
/// never written, not in the ledger.
pub const HELD_BY_GAP: &str = "held_by_gap";
pub const HELD_BY_CONFLICT: &str = "held_by_conflict";
/// A would-be replay of a key whose downstream snapshot already reflects
/// its unresolved events (`run --reconcile-snapshot`, [`crate::reconcile`]).
pub const HELD_BY_RECONCILE: &str = "held_by_reconcile";

/// What a run does with the events of a key that would be replayed after
/// the key's first gap (or first conflicting seq): consumers that need
/// per-key order must not receive seq 105 before the missing 101–104.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum OnBarrier {
    /// Replay them anyway (the default: order is the consumer's concern).
    #[default]
    Replay,
    /// Leave them for a later run, once the gap is filled.
    Hold,
    /// Dead-letter them (`after_gap`, `after_conflict`).
    Dlq,
}

impl OnBarrier {
    pub fn name(self) -> &'static str {
        match self {
            OnBarrier::Replay => "replay",
            OnBarrier::Hold => "hold",
            OnBarrier::Dlq => "dlq",
        }
    }
}

/// The largest archived attempts value taken as a retry count. Anything
/// above it is a corrupt counter, not a history of retries: no live system
/// retries an event a million times. The bound also keeps every
/// `backfill_attempt` (attempts + runs + 1) far inside Int32.
pub const MAX_ARCHIVED_ATTEMPTS: i64 = 1_000_000;

/// The retry rules of one run.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_attempts: i64,
    /// Regexes (Rust syntax, validated by the job layer).
    pub permanent_errors: Vec<String>,
    pub run_id: String,
    /// Microseconds since the epoch, UTC; one value for the whole run.
    pub detected_at_us: i64,
    /// Replays after the key's first gap (`backfill_after_gap`).
    pub on_gap: OnBarrier,
    /// Replays after the key's first conflicting seq.
    pub on_conflict: OnBarrier,
    /// The unresolved events a downstream snapshot already reflects
    /// (`run --reconcile-snapshot`): their would-be replays are held.
    pub reconciled: Option<Arc<HashSet<String>>>,
}

/// Counts of one or more decided batches.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Decisions {
    pub candidates: u64,
    pub replayed: u64,
    pub dead_lettered: u64,
    pub skipped_dead_lettered: u64,
    pub dead_lettered_by_reason: BTreeMap<String, u64>,
    /// Left out of this run by a barrier (`--on-gap hold`, ...).
    pub held: u64,
    pub held_by_reason: BTreeMap<String, u64>,
}

impl Decisions {
    /// Saturating: a count that cannot grow further stays at u64::MAX
    /// rather than wrapping to a small, plausible-looking number.
    pub fn add(&mut self, o: &Decisions) {
        self.candidates = self.candidates.saturating_add(o.candidates);
        self.replayed = self.replayed.saturating_add(o.replayed);
        self.dead_lettered = self.dead_lettered.saturating_add(o.dead_lettered);
        self.skipped_dead_lettered = self
            .skipped_dead_lettered
            .saturating_add(o.skipped_dead_lettered);
        for (k, v) in &o.dead_lettered_by_reason {
            let c = self.dead_lettered_by_reason.entry(k.clone()).or_default();
            *c = c.saturating_add(*v);
        }
        self.held = self.held.saturating_add(o.held);
        for (k, v) in &o.held_by_reason {
            let c = self.held_by_reason.entry(k.clone()).or_default();
            *c = c.saturating_add(*v);
        }
    }
}

/// The outcome of one candidate batch.
#[derive(Debug)]
pub struct Decided {
    /// Source columns + backfill_* columns; rows to replay.
    pub replay: RecordBatch,
    /// Same shape; rows to dead-letter.
    pub dlq: RecordBatch,
    /// Ledger entries (run_id, event_id, outcome, reason, attempt).
    pub ledger: RecordBatch,
    pub counts: Decisions,
}

/// The columns a run appends to every replay and DLQ row.
/// The names of the columns every replay and dead letter carries, declared
/// once (the Kafka sink's headers read them by these names).
pub mod out_columns {
    pub const RUN_ID: &str = "backfill_run_id";
    pub const REASON: &str = "backfill_reason";
    pub const ATTEMPT: &str = "backfill_attempt";
    pub const DETECTED_AT: &str = "backfill_detected_at";
    /// Only in the rows of `backfill redrive`: the run that dead-lettered
    /// the event.
    pub const REDRIVE_OF: &str = "backfill_redrive_of";
}

pub fn backfill_fields() -> Vec<Field> {
    vec![
        Field::new(out_columns::RUN_ID, DataType::Utf8, false),
        Field::new(out_columns::REASON, DataType::Utf8, false),
        Field::new(out_columns::ATTEMPT, DataType::Int32, false),
        Field::new(
            out_columns::DETECTED_AT,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]
}

/// True for a candidate column that goes to the outputs as it is: not one
/// of the run's internal columns, and not a source column that carries one
/// of the names this run writes (an archive that holds earlier replays has
/// `backfill_attempt` & co. of its own): those are replaced by this run's
/// values, so a consumer's dedupe key is always this run's.
fn passes_through(name: &str) -> bool {
    !name.starts_with(internal::PREFIX) && !backfill_fields().iter().any(|f| f.name() == name)
}

/// The schema of replay/DLQ rows for a candidate schema: its pass-through
/// columns, then the backfill_* columns.
pub fn output_schema(candidates: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = candidates
        .fields()
        .iter()
        .filter(|f| passes_through(f.name()))
        // Nullable: a dead letter for an undecodable Kafka message has no
        // event_id, key or seq, and shares the DLQ's files with the rest.
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.extend(backfill_fields());
    Arc::new(Schema::new(fields))
}

fn column<'a>(b: &'a RecordBatch, name: &'static str) -> Result<&'a ArrayRef, PolicyError> {
    b.column_by_name(name)
        .ok_or(PolicyError::MissingColumn(name))
}

/// A count column as Int64 with NULL read as 0 (NULL attempts, no ledger row).
fn null_as_zero(a: &ArrayRef) -> Result<ArrayRef, PolicyError> {
    let c = cast(a, &DataType::Int64)?;
    Ok(zip::zip(&is_null(&c)?, &Int64Array::new_scalar(0), &c)?)
}

/// `a + b` per row, saturating at the Int64 bounds instead of failing the
/// run (arrow's checked add errors, its wrapping add lies).
fn saturating_add(a: &ArrayRef, b: &ArrayRef) -> Result<ArrayRef, PolicyError> {
    let (a, b) = (a.as_primitive::<Int64Type>(), b.as_primitive::<Int64Type>());
    let r: Int64Array = arrow::compute::binary(a, b, i64::saturating_add)?;
    Ok(Arc::new(r))
}

/// Int64 to Int32, clamped: `backfill_attempt` is Int32 and non-nullable,
/// and a plain cast turns what does not fit into NULL.
fn clamp_to_i32(a: &ArrayRef) -> ArrayRef {
    let r: Int32Array = a
        .as_primitive::<Int64Type>()
        .unary(|v| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
    Arc::new(r)
}

/// An optional flag column: absent means false for every row.
fn optional_flag(b: &RecordBatch, name: &str) -> Result<BooleanArray, PolicyError> {
    match b.column_by_name(name) {
        Some(c) => as_bool(c),
        None => Ok(BooleanArray::from(vec![false; b.num_rows()])),
    }
}

fn as_bool(a: &ArrayRef) -> Result<BooleanArray, PolicyError> {
    let c = cast(a, &DataType::Boolean)?;
    let b = c
        .as_any()
        .downcast_ref::<BooleanArray>()
        .cloned()
        .unwrap_or_else(|| BooleanArray::from(vec![false; a.len()]));
    Ok(null_as_false(&b))
}

/// NULL means false for every flag here. (`and_not(b, is_null(b))` would
/// not do: the non-Kleene kernels propagate the NULL itself.)
fn null_as_false(b: &BooleanArray) -> BooleanArray {
    match b.nulls() {
        // (prep_null_mask_filter would do this, but panics without nulls.)
        Some(n) => BooleanArray::new(b.values() & n.inner(), None),
        None => b.clone(),
    }
}

impl Policy {
    /// Decide one candidate batch.
    pub fn decide(&self, batch: &RecordBatch) -> Result<Decided, PolicyError> {
        let n = batch.num_rows();
        let archived = null_as_zero(column(batch, internal::ARCHIVED_ATTEMPTS)?)?;
        let replays = null_as_zero(column(batch, internal::LEDGER_REPLAYS)?)?;
        // retries so far = archived attempts + replays by earlier committed runs
        let skipped = as_bool(column(batch, internal::LEDGER_DEAD)?)?;
        let conflict = as_bool(column(batch, internal::IN_CONFLICT)?)?;
        let missing_id = optional_flag(batch, internal::MISSING_EVENT_ID)?;
        // Attempts outside [0, MAX_ARCHIVED_ATTEMPTS] are not a retry count.
        let invalid_attempts = boolean::or(
            &cmp::lt(&archived, &Int64Array::new_scalar(0))?,
            &cmp::gt(&archived, &Int64Array::new_scalar(MAX_ARCHIVED_ATTEMPTS))?,
        )?;
        let invalid_attempts = null_as_false(&invalid_attempts);
        // retries so far = archived attempts + replays by earlier committed
        // runs; for invalid attempts only the runs' replays are known.
        let archived = zip::zip(&invalid_attempts, &Int64Array::new_scalar(0), &archived)?;
        let retries = saturating_add(&archived, &replays)?;

        let error = cast(column(batch, internal::ERROR)?, &DataType::Utf8)?;
        let error = error
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .unwrap_or_else(|| StringArray::new_null(n));
        let mut permanent = BooleanArray::from(vec![false; n]);
        for re in &self.permanent_errors {
            let m = arrow::compute::regexp_is_match_scalar(&error, re, None)?;
            permanent = boolean::or_kleene(&permanent, &m)?;
        }
        // A NULL error matches no regex.
        let permanent = null_as_false(&permanent);
        let exceeded = null_as_false(&cmp::gt_eq(
            &retries,
            &Int64Array::new_scalar(self.max_attempts),
        )?);

        // First match wins: mask each rule by the ones before it.
        let live = boolean::not(&skipped)?;
        let is_missing_id = boolean::and(&live, &missing_id)?;
        let rest = boolean::and_not(&live, &is_missing_id)?;
        let is_invalid = boolean::and(&rest, &invalid_attempts)?;
        let rest = boolean::and_not(&rest, &is_invalid)?;
        let is_conflict = boolean::and(&rest, &conflict)?;
        let rest = boolean::and_not(&rest, &is_conflict)?;
        let is_permanent = boolean::and(&rest, &permanent)?;
        let rest = boolean::and_not(&rest, &is_permanent)?;
        let is_exceeded = boolean::and(&rest, &exceeded)?;
        let rest = boolean::and_not(&rest, &is_exceeded)?;
        // The barriers, over what would be replayed: the gap's first.
        let none = BooleanArray::from(vec![false; n]);
        let barred = |rest: &BooleanArray, on: OnBarrier, flag: &str| {
            Ok::<_, PolicyError>(match on {
                OnBarrier::Replay => none.clone(),
                _ => boolean::and(rest, &optional_flag(batch, flag)?)?,
            })
        };
        let after_gap = barred(&rest, self.on_gap, internal::AFTER_GAP)?;
        let rest = boolean::and_not(&rest, &after_gap)?;
        let after_conflict = barred(&rest, self.on_conflict, internal::AFTER_CONFLICT)?;
        let rest = boolean::and_not(&rest, &after_conflict)?;
        let held_by_reconcile = match &self.reconciled {
            Some(ids) if !ids.is_empty() => boolean::and(&rest, &reconciled(batch, ids)?)?,
            _ => none.clone(),
        };
        let is_replay = boolean::and_not(&rest, &held_by_reconcile)?;
        let pick = |m: &BooleanArray, on: OnBarrier, want: OnBarrier| {
            if on == want { m.clone() } else { none.clone() }
        };
        let is_after_gap = pick(&after_gap, self.on_gap, OnBarrier::Dlq);
        let is_after_conflict = pick(&after_conflict, self.on_conflict, OnBarrier::Dlq);
        let held_by_gap = pick(&after_gap, self.on_gap, OnBarrier::Hold);
        let held_by_conflict = pick(&after_conflict, self.on_conflict, OnBarrier::Hold);
        let mut is_dlq = is_missing_id.clone();
        for m in [
            &is_invalid,
            &is_conflict,
            &is_permanent,
            &is_exceeded,
            &is_after_gap,
            &is_after_conflict,
        ] {
            is_dlq = boolean::or(&is_dlq, m)?;
        }

        let s = |v: &str| Scalar::new(StringArray::from(vec![v]));
        let reason = zip::zip(
            &is_exceeded,
            &s(REASON_MAX_ATTEMPTS),
            &s(REASON_UNPROCESSED),
        )?;
        let reason = zip::zip(&is_after_gap, &s(REASON_AFTER_GAP), &reason)?;
        let reason = zip::zip(&is_after_conflict, &s(REASON_AFTER_CONFLICT), &reason)?;
        let reason = zip::zip(&is_permanent, &s(REASON_PERMANENT), &reason)?;
        let reason = zip::zip(&is_conflict, &s(REASON_CONFLICT), &reason)?;
        let reason = zip::zip(&is_invalid, &s(REASON_INVALID_ATTEMPTS), &reason)?;
        let reason = zip::zip(&is_missing_id, &s(REASON_MISSING_EVENT_ID), &reason)?;
        let one: ArrayRef = Arc::new(Int64Array::from(vec![1; n]));
        let attempt_replay = saturating_add(&retries, &one)?;
        let attempt = zip::zip(&is_replay, &attempt_replay, &retries)?;
        let attempt = clamp_to_i32(&attempt);

        // Assemble output rows: source columns + backfill_*.
        let out_schema = output_schema(batch.schema().as_ref());
        let mut cols: Vec<ArrayRef> = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| passes_through(f.name()))
            .map(|(_, c)| c.clone())
            .collect();
        cols.push(Arc::new(StringArray::from(vec![self.run_id.as_str(); n])));
        cols.push(reason.clone());
        cols.push(attempt.clone());
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(vec![self.detected_at_us; n]).with_timezone("UTC"),
        ));
        let all = RecordBatch::try_new(out_schema, cols)?;
        let replay = filter_record_batch(&all, &is_replay)?;
        let dlq = filter_record_batch(&all, &is_dlq)?;

        // Ledger entries for every replayed or dead-lettered event.
        let acted = boolean::or(&is_replay, &is_dlq)?;
        let outcome = zip::zip(&is_replay, &s("replay"), &s("dlq"))?;
        let event_id = cast(column(batch, internal::EVENT_ID)?, &DataType::Utf8)?;
        let ledger_all = RecordBatch::try_new(
            crate::detect::ledger_entries_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.run_id.as_str(); n])),
                event_id,
                outcome,
                reason,
                attempt,
            ],
        )?;
        let ledger = filter_record_batch(&ledger_all, &acted)?;

        let count = |m: &BooleanArray| m.true_count() as u64;
        let mut by_reason = BTreeMap::new();
        for (name, m) in [
            (REASON_MISSING_EVENT_ID, &is_missing_id),
            (REASON_INVALID_ATTEMPTS, &is_invalid),
            (REASON_CONFLICT, &is_conflict),
            (REASON_PERMANENT, &is_permanent),
            (REASON_MAX_ATTEMPTS, &is_exceeded),
            (REASON_AFTER_GAP, &is_after_gap),
            (REASON_AFTER_CONFLICT, &is_after_conflict),
        ] {
            if count(m) > 0 {
                by_reason.insert(name.to_string(), count(m));
            }
        }
        let mut held_by_reason = BTreeMap::new();
        for (name, m) in [
            (HELD_BY_GAP, &held_by_gap),
            (HELD_BY_CONFLICT, &held_by_conflict),
            (HELD_BY_RECONCILE, &held_by_reconcile),
        ] {
            if count(m) > 0 {
                held_by_reason.insert(name.to_string(), count(m));
            }
        }
        Ok(Decided {
            replay,
            dlq,
            ledger,
            counts: Decisions {
                candidates: n as u64,
                replayed: count(&is_replay),
                dead_lettered: count(&is_dlq),
                skipped_dead_lettered: count(&skipped),
                dead_lettered_by_reason: by_reason,
                held: count(&held_by_gap) + count(&held_by_conflict) + count(&held_by_reconcile),
                held_by_reason,
            },
        })
    }
}

/// The ledger id of an undecodable message: it has no event_id, but its
/// coordinates are unique, so the DLQ still holds it once across runs.
pub fn undecodable_id(url: &str, u: &crate::kafka::source::Undecodable) -> String {
    format!("{url}#{}@{}", u.partition, u.offset)
}

/// Dead letters (reason `undecodable`) for Kafka messages that did not
/// decode, and their ledger entries: raw bytes in the payload column, the
/// decode error in the error column, the coordinates in the Kafka columns;
/// everything else NULL. `todo` holds (source URL, message) pairs no
/// earlier run dead-lettered.
pub fn undecodable(
    out_schema: &SchemaRef,
    todo: &[(&str, &crate::kafka::source::Undecodable)],
    columns: &crate::job::Columns,
    k: &crate::kafka::KafkaSettings,
    run_id: &str,
    detected_at_us: i64,
) -> Result<(RecordBatch, RecordBatch), PolicyError> {
    use arrow::array::{
        BinaryArray, Int32Array, Int64Array, TimestampMillisecondArray, new_null_array,
    };
    let n = todo.len();
    let c = columns;
    let mut cols: Vec<ArrayRef> = vec![];
    for f in out_schema.fields() {
        let name = f.name().as_str();
        let col: ArrayRef = match name {
            out_columns::RUN_ID => Arc::new(StringArray::from(vec![run_id; n])),
            out_columns::REASON => Arc::new(StringArray::from(vec!["undecodable"; n])),
            out_columns::ATTEMPT => Arc::new(Int32Array::from(vec![0; n])),
            out_columns::DETECTED_AT => Arc::new(
                TimestampMicrosecondArray::from(vec![detected_at_us; n]).with_timezone("UTC"),
            ),
            _ if name == c.payload => cast(
                &BinaryArray::from_iter(todo.iter().map(|(_, u)| Some(u.value.as_slice()))),
                f.data_type(),
            )?,
            _ if name == c.error => cast(
                &StringArray::from_iter(todo.iter().map(|(_, u)| Some(u.error.clone()))),
                f.data_type(),
            )?,
            _ if name == c.key => cast(
                &StringArray::from_iter(todo.iter().map(|(_, u)| {
                    u.key
                        .as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                })),
                f.data_type(),
            )?,
            _ if name == k.original_topic_column => cast(
                &StringArray::from_iter(
                    todo.iter()
                        .map(|(url, _)| crate::kafka::parse_url(url).ok().map(|u| u.topic)),
                ),
                f.data_type(),
            )?,
            _ if name == k.original_partition_column => cast(
                &Int32Array::from_iter(todo.iter().map(|(_, u)| Some(u.partition))),
                f.data_type(),
            )?,
            _ if name == k.original_offset_column => cast(
                &Int64Array::from_iter(todo.iter().map(|(_, u)| Some(u.offset))),
                f.data_type(),
            )?,
            _ if name == k.original_timestamp_column => cast(
                &TimestampMillisecondArray::from_iter(
                    todo.iter()
                        .map(|(_, u)| u.timestamp.map(|t| t.timestamp_millis())),
                )
                .with_timezone("UTC"),
                f.data_type(),
            )?,
            _ => new_null_array(f.data_type(), n),
        };
        cols.push(col);
    }
    let dlq = RecordBatch::try_new(out_schema.clone(), cols)?;
    let ledger = RecordBatch::try_new(
        crate::detect::ledger_entries_schema(),
        vec![
            Arc::new(StringArray::from(vec![run_id; n])),
            Arc::new(StringArray::from_iter_values(
                todo.iter().map(|(url, u)| undecodable_id(url, u)),
            )),
            Arc::new(StringArray::from(vec!["dlq"; n])),
            Arc::new(StringArray::from(vec!["undecodable"; n])),
            Arc::new(Int32Array::from(vec![0; n])),
        ],
    )?;
    Ok((dlq, ledger))
}

/// Rows whose event id is one of `ids`.
fn reconciled(batch: &RecordBatch, ids: &HashSet<String>) -> Result<BooleanArray, PolicyError> {
    let id = cast(column(batch, internal::EVENT_ID)?, &DataType::Utf8)?;
    let id = id.as_string::<i32>();
    Ok((0..batch.num_rows())
        .map(|i| Some(id.is_valid(i) && ids.contains(id.value(i))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    /// One candidate: (event_id, error, archived attempts, conflict,
    /// ledger replays, ledger dead).
    type Row<'a> = (
        &'a str,
        Option<&'a str>,
        Option<i64>,
        bool,
        Option<i64>,
        Option<bool>,
    );

    /// A candidate batch plus a passthrough column.
    fn batch(rows: &[Row<'_>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("payload", DataType::Utf8, true),
            Field::new(internal::EVENT_ID, DataType::Utf8, false),
            Field::new(internal::ERROR, DataType::Utf8, true),
            Field::new(internal::ARCHIVED_ATTEMPTS, DataType::Int64, true),
            Field::new(internal::IN_CONFLICT, DataType::Boolean, true),
            Field::new(internal::LEDGER_REPLAYS, DataType::Int64, true),
            Field::new(internal::LEDGER_DEAD, DataType::Boolean, true),
        ]));
        let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.clone())),
                Arc::new(StringArray::from(
                    ids.iter()
                        .map(|i| Some(format!("body-{i}")))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(ids)),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(BooleanArray::from(
                    rows.iter().map(|r| Some(r.3)).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.4).collect::<Vec<_>>(),
                )),
                Arc::new(BooleanArray::from(
                    rows.iter().map(|r| r.5).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn policy(perm: &[&str]) -> Policy {
        Policy {
            max_attempts: 3,
            permanent_errors: perm.iter().map(|s| s.to_string()).collect(),
            run_id: "r1".into(),
            detected_at_us: 1_700_000_000_000_000,
            on_gap: OnBarrier::Replay,
            on_conflict: OnBarrier::Replay,
            reconciled: None,
        }
    }

    fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
        b.column_by_name(name)
            .unwrap()
            .as_string::<i32>()
            .iter()
            .map(|s| s.unwrap_or("").to_string())
            .collect()
    }

    fn ints(b: &RecordBatch, name: &str) -> Vec<i32> {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>()
            .values()
            .to_vec()
    }

    /// `batch` with the two barrier flags: (after gap, after conflict) per row.
    fn with_barriers(b: RecordBatch, flags: &[(bool, bool)]) -> RecordBatch {
        let mut fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(internal::AFTER_GAP, DataType::Boolean, false));
        fields.push(Field::new(
            internal::AFTER_CONFLICT,
            DataType::Boolean,
            false,
        ));
        let mut cols = b.columns().to_vec();
        cols.push(Arc::new(BooleanArray::from(
            flags.iter().map(|f| f.0).collect::<Vec<_>>(),
        )));
        cols.push(Arc::new(BooleanArray::from(
            flags.iter().map(|f| f.1).collect::<Vec<_>>(),
        )));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    /// The barriers act on would-be replays alone, the gap's first; held
    /// events are neither written nor in the ledger; the balance holds.
    #[test]
    fn barriers_hold_or_dead_letter_what_would_be_replayed() {
        let b = with_barriers(
            batch(&[
                // replay, no barrier
                ("a", None, None, false, None, None),
                // after a gap
                ("b", None, None, false, None, None),
                // after a conflict
                ("c", None, Some(1), false, None, None),
                // after both: the gap decides
                ("d", None, None, false, None, None),
                // after a gap but dead-lettered anyway: keeps its reason
                ("e", Some("schema"), None, false, None, None),
                // after a gap but skipped (dead-lettered before)
                ("f", None, None, false, None, Some(true)),
                // in conflict itself: sequence_conflict
                ("g", None, None, true, None, None),
            ]),
            &[
                (false, false),
                (true, false),
                (false, true),
                (true, true),
                (true, false),
                (true, false),
                (false, true),
            ],
        );
        let mut p = policy(&["^schema"]);
        // Replay: the flags change nothing.
        let d = p.decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["a", "b", "c", "d"]);
        assert_eq!(d.counts.held, 0);

        p.on_gap = OnBarrier::Hold;
        p.on_conflict = OnBarrier::Dlq;
        let d = p.decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["a"]);
        assert_eq!(strings(&d.dlq, "event_id"), ["c", "e", "g"]);
        assert_eq!(
            strings(&d.dlq, "backfill_reason"),
            [REASON_AFTER_CONFLICT, REASON_PERMANENT, REASON_CONFLICT]
        );
        // A dead letter after a barrier carries the retries so far, as
        // every dead letter does.
        assert_eq!(ints(&d.dlq, "backfill_attempt"), [1, 0, 0]);
        assert_eq!(strings(&d.ledger, "event_id"), ["a", "c", "e", "g"]);
        assert_eq!(d.counts.held, 2);
        assert_eq!(
            d.counts.held_by_reason,
            BTreeMap::from([(HELD_BY_GAP.to_string(), 2)])
        );
        let c = &d.counts;
        assert_eq!(
            c.candidates,
            c.replayed + c.dead_lettered + c.skipped_dead_lettered + c.held
        );

        p.on_gap = OnBarrier::Dlq;
        p.on_conflict = OnBarrier::Hold;
        let d = p.decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["a"]);
        assert_eq!(strings(&d.dlq, "event_id"), ["b", "d", "e", "g"]);
        assert_eq!(
            strings(&d.dlq, "backfill_reason"),
            [
                REASON_AFTER_GAP,
                REASON_AFTER_GAP,
                REASON_PERMANENT,
                REASON_CONFLICT
            ]
        );
        assert_eq!(
            d.counts.held_by_reason,
            BTreeMap::from([(HELD_BY_CONFLICT.to_string(), 1)])
        );
        assert_eq!(d.counts.dead_lettered_by_reason[REASON_AFTER_GAP], 2);
        // Without the flag columns (a redrive's batches): nothing is barred.
        let d = p
            .decide(&batch(&[("a", None, None, false, None, None)]))
            .unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["a"]);
    }

    #[test]
    fn first_match_wins_in_order() {
        let b = batch(&[
            // skipped even though it conflicts and is permanent
            (
                "a",
                Some("schema invalid"),
                Some(9),
                true,
                Some(0),
                Some(true),
            ),
            // conflict beats permanent and exceeded
            ("b", Some("schema invalid"), Some(9), true, None, None),
            // permanent beats exceeded
            ("c", Some("schema invalid"), Some(9), false, None, None),
            // exceeded: archive 1 + ledger 2 = 3 >= 3
            ("d", Some("timeout"), Some(1), false, Some(2), Some(false)),
            // replay: NULL attempts = 0, NULL error
            ("e", None, None, false, None, None),
            // replay: 2 retries so far → attempt 3
            ("f", Some("timeout"), Some(2), false, None, None),
        ]);
        let d = policy(&["^schema"]).decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["e", "f"]);
        assert_eq!(ints(&d.replay, "backfill_attempt"), [1, 3]);
        assert_eq!(
            strings(&d.replay, "backfill_reason"),
            ["unprocessed", "unprocessed"]
        );
        assert_eq!(strings(&d.dlq, "event_id"), ["b", "c", "d"]);
        assert_eq!(
            strings(&d.dlq, "backfill_reason"),
            [REASON_CONFLICT, REASON_PERMANENT, REASON_MAX_ATTEMPTS]
        );
        assert_eq!(ints(&d.dlq, "backfill_attempt"), [9, 9, 3]);
        assert_eq!(d.counts.skipped_dead_lettered, 1);
        assert_eq!(d.counts.replayed, 2);
        assert_eq!(d.counts.dead_lettered, 3);
        assert_eq!(d.counts.dead_lettered_by_reason.len(), 3);
        // Ledger holds the acted-on events only, with their outcome.
        assert_eq!(strings(&d.ledger, "event_id"), ["b", "c", "d", "e", "f"]);
        assert_eq!(
            strings(&d.ledger, "outcome"),
            ["dlq", "dlq", "dlq", "replay", "replay"]
        );
        // Internal columns never leak; passthrough columns do.
        assert!(
            d.replay
                .schema()
                .fields()
                .iter()
                .all(|f| !f.name().starts_with("__bf_"))
        );
        assert_eq!(strings(&d.replay, "payload"), ["body-e", "body-f"]);
        assert_eq!(strings(&d.replay, "backfill_run_id"), ["r1", "r1"]);
    }

    /// An archive that holds earlier replays carries `backfill_*` columns of
    /// its own: the outputs carry this run's values once, never two columns
    /// of one name (DuckDB renames one, Kafka headers take the wrong one).
    #[test]
    fn source_columns_named_like_ours_are_replaced_not_duplicated() {
        let b = appended(
            batch(&[("e", None, None, false, None, None)]),
            vec![
                (
                    Field::new("backfill_attempt", DataType::Int64, true),
                    Arc::new(Int64Array::from(vec![Some(7)])),
                ),
                (
                    Field::new("backfill_run_id", DataType::Utf8, true),
                    Arc::new(StringArray::from(vec![Some("oldrun")])),
                ),
            ],
        );
        let d = policy(&[]).decide(&b).unwrap();
        let names: Vec<&str> = d
            .replay
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| n.starts_with("backfill_"))
            .collect();
        assert_eq!(
            names,
            [
                "backfill_run_id",
                "backfill_reason",
                "backfill_attempt",
                "backfill_detected_at"
            ]
        );
        assert_eq!(strings(&d.replay, "backfill_run_id"), ["r1"]);
        assert_eq!(ints(&d.replay, "backfill_attempt"), [1]);
    }

    #[test]
    fn no_regex_means_no_permanent_errors_and_zero_max_dead_letters_all() {
        let b = batch(&[("x", Some("schema invalid"), Some(0), false, None, None)]);
        let d = policy(&[]).decide(&b).unwrap();
        assert_eq!(d.counts.replayed, 1);
        let mut p = policy(&[]);
        p.max_attempts = 0;
        let d = p.decide(&b).unwrap();
        assert_eq!(strings(&d.dlq, "backfill_reason"), [REASON_MAX_ATTEMPTS]);
        assert_eq!(ints(&d.dlq, "backfill_attempt"), [0]);
    }

    /// Regression: a NULL error with a regex set must not drop the event.
    #[test]
    fn null_error_with_regex_still_decided() {
        let b = batch(&[
            ("n", None, Some(0), false, None, None),
            ("m", None, Some(5), false, None, None),
        ]);
        let d = policy(&["zzz"]).decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["n"]);
        assert_eq!(strings(&d.dlq, "backfill_reason"), [REASON_MAX_ATTEMPTS]);
        assert_eq!(d.counts.replayed + d.counts.dead_lettered, 2);
    }

    /// The batch with these columns added at the end.
    fn appended(b: RecordBatch, extra: Vec<(Field, ArrayRef)>) -> RecordBatch {
        let mut fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut cols = b.columns().to_vec();
        for (f, c) in extra {
            fields.push(f);
            cols.push(c);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    /// The same batch with the missing-event-id flag set on these rows.
    fn with_missing_ids(b: RecordBatch, missing: &[bool]) -> RecordBatch {
        appended(
            b,
            vec![(
                Field::new(internal::MISSING_EVENT_ID, DataType::Boolean, false),
                Arc::new(BooleanArray::from(missing.to_vec())),
            )],
        )
    }

    /// Regression: attempts of i64::MAX or 3e9 failed the whole run (the
    /// add overflowed; the Int32 cast gave a NULL in a non-nullable
    /// column), and -1000 was replayed as attempt -999.
    #[test]
    fn absurd_attempts_are_dead_lettered_not_fatal() {
        let b = batch(&[
            ("max", Some("timeout"), Some(i64::MAX), false, Some(1), None),
            (
                "big",
                Some("timeout"),
                Some(3_000_000_000),
                false,
                None,
                None,
            ),
            ("neg", Some("timeout"), Some(-1000), false, None, None),
            ("min", None, Some(i64::MIN), true, None, None),
            // the bound itself is a (large) retry count
            ("edge", None, Some(MAX_ARCHIVED_ATTEMPTS), false, None, None),
            ("ok", None, Some(0), false, None, None),
        ]);
        let d = policy(&["timeout"]).decide(&b).unwrap();
        assert_eq!(
            strings(&d.dlq, "event_id"),
            ["max", "big", "neg", "min", "edge"]
        );
        assert_eq!(
            strings(&d.dlq, "backfill_reason"),
            [
                REASON_INVALID_ATTEMPTS,
                REASON_INVALID_ATTEMPTS,
                REASON_INVALID_ATTEMPTS,
                // invalid attempts beat a conflict
                REASON_INVALID_ATTEMPTS,
                REASON_MAX_ATTEMPTS,
            ]
        );
        // Only the earlier runs' replays count for invalid attempts.
        assert_eq!(ints(&d.dlq, "backfill_attempt"), [1, 0, 0, 0, 1_000_000]);
        assert_eq!(strings(&d.replay, "event_id"), ["ok"]);
        assert_eq!(d.counts.dead_lettered_by_reason[REASON_INVALID_ATTEMPTS], 4);
        assert_eq!(strings(&d.ledger, "reason")[0], REASON_INVALID_ATTEMPTS);
    }

    /// Ledger replays near i64::MAX saturate instead of failing the add,
    /// and the Int32 attempt is clamped, never NULL.
    #[test]
    fn counts_saturate() {
        let b = batch(&[
            ("x", None, Some(5), false, Some(i64::MAX - 10), None),
            // 5 + i64::MAX saturates at i64::MAX: exceeded, not an error
            ("y", None, Some(5), false, Some(i64::MAX), None),
        ]);
        let mut p = policy(&[]);
        p.max_attempts = i64::MAX;
        let d = p.decide(&b).unwrap();
        assert_eq!(strings(&d.replay, "event_id"), ["x"]);
        assert_eq!(ints(&d.replay, "backfill_attempt"), [i32::MAX]);
        assert_eq!(strings(&d.dlq, "backfill_reason"), [REASON_MAX_ATTEMPTS]);
        assert_eq!(ints(&d.dlq, "backfill_attempt"), [i32::MAX]);

        let mut a = Decisions {
            candidates: u64::MAX - 1,
            replayed: u64::MAX,
            ..Default::default()
        };
        a.dead_lettered_by_reason.insert("r".into(), u64::MAX);
        let b = a.clone();
        a.add(&b);
        assert_eq!(a.candidates, u64::MAX);
        assert_eq!(a.replayed, u64::MAX);
        assert_eq!(a.dead_lettered_by_reason["r"], u64::MAX);
    }

    /// Regression: rows without an event_id vanished from the balance.
    /// They are dead-lettered once, first of all rules, and skipped once
    /// an earlier run dead-lettered them.
    #[test]
    fn missing_event_id_is_dead_lettered_first() {
        let b = with_missing_ids(
            batch(&[
                ("syn-1", Some("schema"), Some(-5), true, None, None),
                ("syn-2", None, Some(0), false, Some(0), Some(true)),
                ("real", None, Some(0), false, None, None),
            ]),
            &[true, true, false],
        );
        let d = policy(&["schema"]).decide(&b).unwrap();
        assert_eq!(strings(&d.dlq, "event_id"), ["syn-1"]);
        assert_eq!(
            strings(&d.dlq, "backfill_reason"),
            [REASON_MISSING_EVENT_ID]
        );
        assert_eq!(strings(&d.replay, "event_id"), ["real"]);
        assert_eq!(d.counts.skipped_dead_lettered, 1);
        assert_eq!(d.counts.dead_lettered_by_reason[REASON_MISSING_EVENT_ID], 1);
        assert_eq!(strings(&d.ledger, "event_id"), ["syn-1", "real"]);
        assert_eq!(
            d.counts.replayed + d.counts.dead_lettered + d.counts.skipped_dead_lettered,
            d.counts.candidates
        );
    }

    #[test]
    fn empty_batch() {
        let d = policy(&["x"]).decide(&batch(&[])).unwrap();
        assert_eq!(
            d.replay.num_rows() + d.dlq.num_rows() + d.ledger.num_rows(),
            0
        );
    }
}
