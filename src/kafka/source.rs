//! The Kafka source: what a topic still retains inside `--from`/`--to`, as
//! Arrow batches, for the hybrid backfill (the lake for what Kafka no longer
//! has, the topic for the recent part).
//!
//! Why it reads this way:
//! - A backfill must not disturb live consumers: partitions are *assigned*
//!   (no group membership, no rebalance), offsets are never committed.
//! - The read has a fixed end, so that a run decides over a stable set: each
//!   partition's high watermark as its first fetch reports it (the reader
//!   never chases messages produced after it started). The start is
//!   `offsets_for_times(from)`, exact on Kafka by definition (the earliest
//!   offset whose timestamp is at or after `from`). Every message is also
//!   filtered by its timestamp, so the result is exactly the messages with
//!   `from <= timestamp < to` up to the ends. `to` is not turned into an end
//!   offset: with producer-set timestamps (CreateTime) a message before `to`
//!   may follow one after it.
//! - All partitions are fetched concurrently by one consumer (librdkafka
//!   fetches every assigned partition in parallel).
//! - A message that is not a JSON object, or does not fit the schema, is kept
//!   with its raw bytes in [`TopicRead::undecodable`] for the DLQ: one bad
//!   message must not fail the run.
//!
//! This module never commits offsets and never writes to the topic.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::json::reader::{ReaderBuilder, infer_json_schema_from_iterator};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Message;
use serde_json::Value;

use super::{KafkaError, KafkaSettings, KafkaUrl, Role, client_config, parse_url};

/// How long one metadata, watermark or offsets-for-times request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Give up when no partition makes progress for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows per decoded batch.
const CHUNK: usize = 8192;

/// A message that could not become a row; dead-lettered with reason
/// `undecodable`, its raw bytes kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    /// The raw value (empty for a message without a value).
    pub value: Vec<u8>,
    /// Why it did not decode, e.g. `not JSON: expected value at line 1 column 1`.
    pub error: String,
}

/// What [`read_topic`] read.
#[derive(Debug, Clone)]
pub struct TopicRead {
    /// The decoded columns, then the Kafka coordinates (named by the
    /// settings' `original_*_column`): topic Utf8, partition Int32, offset
    /// Int64, timestamp Timestamp(Millisecond, UTC).
    pub schema: SchemaRef,
    /// Ordered by partition, then offset.
    pub batches: Vec<RecordBatch>,
    pub undecodable: Vec<Undecodable>,
    /// Messages inside the range: rows plus undecodable.
    pub messages: u64,
}

/// One message as read, before decoding.
struct Raw {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

impl Raw {
    fn value(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }

    fn undecodable(self, error: String) -> Undecodable {
        Undecodable {
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp.and_then(DateTime::from_timestamp_millis),
            key: self.key,
            value: self.value.unwrap_or_default(),
            error,
        }
    }
}

/// Read `kafka://HOST:PORT[,HOST:PORT]/TOPIC` from `from` (inclusive) to `to`
/// (exclusive), decoding JSON values with `schema_hint` or, without one, a
/// schema inferred from the messages. Coordinate columns in the hint are
/// replaced by the ones this reader fills.
pub async fn read_topic(
    url: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    settings: &KafkaSettings,
    schema_hint: Option<SchemaRef>,
) -> Result<TopicRead, KafkaError> {
    let url = parse_url(url)?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(KafkaError::Url {
            url: url.original,
            reason: format!("the window is empty: from {f} is not before to {t}"),
        });
    }
    let settings = settings.clone();
    let original = url.original.clone();
    // librdkafka's consumer calls block; keep them off the async workers.
    tokio::task::spawn_blocking(move || {
        let result = fetch(&url, from, to, &settings)
            .and_then(|raws| decode(&url, raws, &settings, schema_hint));
        result.map_err(|e| scrubbed(e, &settings))
    })
    .await
    .map_err(|e| KafkaError::Broker {
        url: original,
        operation: "read",
        message: format!("the reader did not complete: {e}"),
    })?
}

/// Broker and librdkafka messages are not ours to trust: every configured
/// property value is scrubbed from them, whatever its name.
fn scrubbed(e: KafkaError, settings: &KafkaSettings) -> KafkaError {
    match e {
        KafkaError::Broker {
            url,
            operation,
            message,
        } => KafkaError::Broker {
            url,
            operation,
            message: crate::kafka::scrub_message(&message, settings),
        },
        other => other,
    }
}

#[derive(Debug)]
struct PartitionRange {
    /// The first offset asked for (0 for "the beginning").
    start: i64,
    /// The high watermark of the partition's first fetch: the end of the
    /// read. Unknown until that fetch answers.
    end: Option<i64>,
    done: bool,
}

/// The high watermark librdkafka cached from the last fetch response of a
/// partition, without a request.
///
/// Why not `fetch_watermarks` (a ListOffsets request)? Some Kafka-protocol
/// brokers answer ListOffsets(latest) from storage bookkeeping that can lag
/// behind the fetch path (Tansu 0.6 answers the base offset of the last
/// stored batch plus one), which would end the read early and lose messages.
/// The fetch response's watermark is what the consumer can actually read.
fn cached_high_watermark(consumer: &BaseConsumer, topic: &CStr, partition: i32) -> Option<i64> {
    let mut low: i64 = -1;
    let mut high: i64 = -1;
    // SAFETY: the client handle lives as long as `consumer`, which outlives
    // this call; `topic` is NUL-terminated; the out-pointers point to locals.
    // rd_kafka_get_watermark_offsets only reads librdkafka's local cache.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// A broker error, its message passed through [`crate::redact::line`]: a
/// broker's or librdkafka's text is not ours to trust.
fn broker_err(url: &KafkaUrl, operation: &'static str, message: String) -> KafkaError {
    KafkaError::Broker {
        url: url.original.clone(),
        operation,
        message: crate::redact::line(&message),
    }
}

/// The offset `offsets_for_times` found per partition: `None` when no
/// message is at or after the time.
fn offsets_for_time(
    consumer: &BaseConsumer,
    url: &KafkaUrl,
    partitions: &[i32],
    at: DateTime<Utc>,
) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(&url.topic, *p, Offset::Offset(at.timestamp_millis()))
            .map_err(|e| broker_err(url, "offsets for times", e.to_string()))?;
    }
    let found = consumer
        .offsets_for_times(tpl, REQUEST_TIMEOUT)
        .map_err(|e| {
            broker_err(
                url,
                "offsets for times",
                format!("topic '{}' at {at}: {e}", url.topic),
            )
        })?;
    let mut out = BTreeMap::new();
    for e in found.elements_for_topic(&url.topic) {
        if let Err(err) = e.error() {
            return Err(broker_err(
                url,
                "offsets for times",
                format!(
                    "topic '{}' partition {} at {at}: {err}",
                    url.topic,
                    e.partition()
                ),
            ));
        }
        let o = match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        };
        out.insert(e.partition(), o);
    }
    Ok(out)
}

/// The topic's partitions, sorted, as the brokers' metadata lists them:
/// unreachable brokers and a missing topic fail here.
fn partitions_of(consumer: &BaseConsumer, url: &KafkaUrl) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer
        .fetch_metadata(Some(&url.topic), REQUEST_TIMEOUT)
        .map_err(|e| {
            broker_err(
                url,
                "metadata",
                format!(
                    "brokers {} did not answer within {} s: {e}",
                    url.bootstrap,
                    REQUEST_TIMEOUT.as_secs()
                ),
            )
        })?;
    let Some(topic) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == url.topic && t.error().is_none() && !t.partitions().is_empty())
    else {
        return Err(KafkaError::TopicMissing {
            url: url.original.clone(),
            topic: url.topic.clone(),
            bootstrap: url.bootstrap.clone(),
        });
    };
    let mut partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Before the scan: the brokers answer and the topic exists (what
/// [`read_topic`] would find first), so that a run recovering gaps from an
/// unreachable topic fails in seconds, not after reading the archive.
pub async fn check_topic(url: &str, settings: &KafkaSettings) -> Result<(), KafkaError> {
    let url = parse_url(url)?;
    let settings = settings.clone();
    let original = url.original.clone();
    tokio::task::spawn_blocking(move || {
        let cfg = client_config(&url, &settings, Role::Consumer)?;
        let consumer: BaseConsumer = cfg.create().map_err(|e| KafkaError::Client {
            url: url.original.clone(),
            message: super::client_error_message(&e, &cfg),
        })?;
        partitions_of(&consumer, &url)
            .map(|_| ())
            .map_err(|e| scrubbed(e, &settings))
    })
    .await
    .map_err(|e| KafkaError::Broker {
        url: original,
        operation: "metadata",
        message: format!("the check did not complete: {e}"),
    })?
}

/// Read every message of the range, per partition in offset order.
fn fetch(
    url: &KafkaUrl,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    settings: &KafkaSettings,
) -> Result<Vec<Raw>, KafkaError> {
    let mut cfg = client_config(url, settings, Role::Consumer)?;
    // A partition whose start was deleted by retention meanwhile is read from
    // what remains, not skipped to the end.
    cfg.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = cfg.create().map_err(|e| KafkaError::Client {
        url: url.original.clone(),
        message: super::client_error_message(&e, &cfg),
    })?;
    let partitions = partitions_of(&consumer, url)?;

    let starts = match from {
        Some(f) => Some(offsets_for_time(&consumer, url, &partitions, f)?),
        None => None,
    };
    let mut ranges = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let start = match starts.as_ref().map(|s| s.get(p).copied().flatten()) {
            None => Offset::Beginning,
            Some(Some(o)) => Offset::Offset(o),
            // No message at or after `from`: nothing to read here.
            Some(None) => continue,
        };
        assignment
            .add_partition_offset(&url.topic, *p, start)
            .map_err(|e| broker_err(url, "assign", e.to_string()))?;
        let start = match start {
            Offset::Offset(o) => o,
            _ => 0,
        };
        ranges.insert(
            *p,
            PartitionRange {
                start,
                end: None,
                done: false,
            },
        );
    }
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| broker_err(url, "assign", format!("topic '{}': {e}", url.topic)))?;
    let topic_c = CString::new(url.topic.as_str())
        .map_err(|e| broker_err(url, "assign", format!("topic name: {e}")))?;

    let from_ms = from.map(|f| f.timestamp_millis());
    let to_ms = to.map(|t| t.timestamp_millis());
    let mut out = Vec::new();
    let mut last_progress = Instant::now();
    let mut last_error: Option<String> = None;
    while ranges.values().any(|r| !r.done) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let Some(r) = ranges.get_mut(&m.partition()) else {
                    continue;
                };
                if r.end.is_none() {
                    r.end = cached_high_watermark(&consumer, &topic_c, m.partition());
                }
                let o = m.offset();
                let before_end = r.end.is_none_or(|e| o < e);
                if !r.done && before_end {
                    let ts = m.timestamp().to_millis();
                    let in_window = match ts {
                        Some(t) => from_ms.is_none_or(|f| t >= f) && to_ms.is_none_or(|e| t < e),
                        // Without a timestamp a bounded window cannot claim it.
                        None => from_ms.is_none() && to_ms.is_none(),
                    };
                    if in_window {
                        out.push(Raw {
                            partition: m.partition(),
                            offset: o,
                            timestamp: ts,
                            key: m.key().map(<[u8]>::to_vec),
                            value: m.payload().map(<[u8]>::to_vec),
                        });
                    }
                }
                if r.end.is_some_and(|e| o + 1 >= e) {
                    r.done = true;
                }
            }
            Some(Err(RdKafkaError::PartitionEOF(p))) => {
                // At the partition's current end, which is at or past ours.
                if let Some(r) = ranges.get_mut(&p) {
                    r.done = true;
                }
                last_progress = Instant::now();
            }
            Some(Err(e)) => {
                // librdkafka retries on its own; keep the error for the
                // message if the read stalls.
                last_error = Some(e.to_string());
            }
            None => {
                // Transaction markers at a partition's tail are never
                // delivered, so the position (not a message) may be what
                // says a partition is finished.
                let positions = consumer.position().ok();
                for (p, r) in ranges.iter_mut().filter(|(_, r)| !r.done) {
                    if r.end.is_none() {
                        r.end = cached_high_watermark(&consumer, &topic_c, *p);
                    }
                    let position = positions.as_ref().and_then(|pos| {
                        pos.find_partition(&url.topic, *p)
                            .and_then(|e| match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            })
                    });
                    if let (Some(pos), Some(end)) = (position, r.end)
                        && pos >= end
                    {
                        r.done = true;
                    }
                }
                if last_progress.elapsed() > IDLE_TIMEOUT {
                    let stuck: Vec<String> = ranges
                        .iter()
                        .filter(|(_, r)| !r.done)
                        .map(|(p, r)| match r.end {
                            Some(e) => format!("{p} (offsets {}..{e})", r.start),
                            None => format!("{p} (from offset {})", r.start),
                        })
                        .collect();
                    return Err(broker_err(
                        url,
                        "read",
                        format!(
                            "topic '{}': no progress for {} s on partition(s) {}{}",
                            url.topic,
                            IDLE_TIMEOUT.as_secs(),
                            stuck.join(", "),
                            last_error
                                .map(|e| format!("; last error: {e}"))
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }
    // Messages of several partitions arrive interleaved; keep a stable order.
    out.sort_by_key(|m| (m.partition, m.offset));
    Ok(out)
}

/// Is this a single JSON object? (arrow-json would otherwise turn `1 2 3`
/// into rows, or an empty value into none.)
fn check_object(value: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(value).map_err(|e| format!("not JSON: {e}"))?;
    match value.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err("not a JSON object".into()),
    }
}

fn decode(
    url: &KafkaUrl,
    raws: Vec<Raw>,
    settings: &KafkaSettings,
    schema_hint: Option<SchemaRef>,
) -> Result<TopicRead, KafkaError> {
    let messages = raws.len() as u64;
    let mut undecodable = Vec::new();
    let mut valid = Vec::with_capacity(raws.len());
    for m in raws {
        if m.value.is_none() {
            undecodable.push(m.undecodable("the message has no value (a tombstone)".into()));
            continue;
        }
        match check_object(m.value()) {
            Ok(()) => valid.push(m),
            Err(e) => undecodable.push(m.undecodable(e)),
        }
    }
    let coordinates = [
        settings.original_topic_column.as_str(),
        settings.original_partition_column.as_str(),
        settings.original_offset_column.as_str(),
        settings.original_timestamp_column.as_str(),
    ];
    let base = match schema_hint {
        Some(h) => h.as_ref().clone(),
        None => infer(&mut valid, &mut undecodable).map_err(|message| KafkaError::Decode {
            url: url.original.clone(),
            message,
        })?,
    };
    let decode_schema = Arc::new(Schema::new_with_metadata(
        base.fields()
            .iter()
            .filter(|f| !coordinates.contains(&f.name().as_str()))
            .cloned()
            .collect::<Vec<_>>(),
        base.metadata().clone(),
    ));
    let mut fields: Vec<Arc<Field>> = decode_schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(coordinates[0], DataType::Utf8, false)));
    fields.push(Arc::new(Field::new(coordinates[1], DataType::Int32, false)));
    fields.push(Arc::new(Field::new(coordinates[2], DataType::Int64, false)));
    fields.push(Arc::new(Field::new(
        coordinates[3],
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        true,
    )));
    let schema = Arc::new(Schema::new_with_metadata(fields, base.metadata().clone()));

    let mut batches = Vec::new();
    let mut rest = valid;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(CHUNK));
        let mut chunk = std::mem::replace(&mut rest, tail);
        let decoded = match decode_chunk(&decode_schema, &chunk) {
            Ok(b) => b,
            Err(_) => {
                // Find the messages at fault one by one; decode the others.
                let mut good = Vec::with_capacity(chunk.len());
                for m in chunk.drain(..) {
                    match decode_chunk(&decode_schema, std::slice::from_ref(&m)) {
                        Ok(_) => good.push(m),
                        Err(e) => undecodable.push(m.undecodable(e.to_string())),
                    }
                }
                chunk = good;
                if chunk.is_empty() {
                    continue;
                }
                decode_chunk(&decode_schema, &chunk).map_err(|e| KafkaError::Decode {
                    url: url.original.clone(),
                    message: format!(
                        "partition {} from offset {}: {e}",
                        chunk[0].partition, chunk[0].offset
                    ),
                })?
            }
        };
        let mut columns: Vec<ArrayRef> = decoded.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(url.topic.as_str(), chunk.len()),
        )));
        columns.push(Arc::new(Int32Array::from_iter_values(
            chunk.iter().map(|m| m.partition),
        )));
        columns.push(Arc::new(Int64Array::from_iter_values(
            chunk.iter().map(|m| m.offset),
        )));
        columns.push(Arc::new(
            TimestampMillisecondArray::from_iter(chunk.iter().map(|m| m.timestamp))
                .with_timezone("UTC"),
        ));
        let batch =
            RecordBatch::try_new(schema.clone(), columns).map_err(|e| KafkaError::Decode {
                url: url.original.clone(),
                message: e.to_string(),
            })?;
        batches.push(batch);
    }
    undecodable.sort_by_key(|u| (u.partition, u.offset));
    Ok(TopicRead {
        schema,
        batches,
        undecodable,
        messages,
    })
}

/// Decode messages (each a validated JSON object) into one batch of exactly
/// as many rows.
fn decode_chunk(schema: &SchemaRef, msgs: &[Raw]) -> Result<RecordBatch, ArrowError> {
    let mut decoder = ReaderBuilder::new(schema.clone())
        // One more than the rows, so a full batch never stops a message short.
        .with_batch_size(msgs.len() + 1)
        .build_decoder()?;
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            decoder.decode(b"\n")?;
        }
        let v = m.value();
        let n = decoder.decode(v)?;
        if n != v.len() {
            return Err(ArrowError::JsonError(format!(
                "only {n} of {} bytes decoded",
                v.len()
            )));
        }
    }
    let batch = decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
    if batch.num_rows() != msgs.len() {
        return Err(ArrowError::JsonError(format!(
            "{} rows decoded from {} messages",
            batch.num_rows(),
            msgs.len()
        )));
    }
    Ok(batch)
}

fn parse_value(m: &Raw) -> Result<Value, ArrowError> {
    serde_json::from_slice(m.value()).map_err(|e| ArrowError::JsonError(e.to_string()))
}

/// A schema for all `valid` messages. When their shapes conflict (a field
/// that is an object in one message and a number in another), the messages
/// that conflict with the ones before them move to `undecodable`.
fn infer(valid: &mut Vec<Raw>, undecodable: &mut Vec<Undecodable>) -> Result<Schema, String> {
    if let Ok(s) = infer_json_schema_from_iterator(valid.iter().map(parse_value)) {
        return Ok(s);
    }
    // A running skeleton holds one representative of every shape accepted so
    // far, so each message is checked by arrow-json's own rules in one step.
    let mut skeleton = Value::Object(serde_json::Map::new());
    let mut keep = Vec::with_capacity(valid.len());
    for m in valid.drain(..) {
        let v = match parse_value(&m) {
            Ok(v) => v,
            Err(e) => {
                undecodable.push(m.undecodable(format!("not JSON: {e}")));
                continue;
            }
        };
        match infer_json_schema_from_iterator([Ok(&skeleton), Ok(&v)].into_iter()) {
            Ok(_) => {
                merge_shape(&mut skeleton, &v);
                keep.push(m);
            }
            Err(e) => undecodable.push(m.undecodable(format!(
                "its field types conflict with earlier messages of the topic: {e}"
            ))),
        }
    }
    *valid = keep;
    infer_json_schema_from_iterator(valid.iter().map(parse_value)).map_err(|e| e.to_string())
}

/// Fold `src`'s shape into `dst`: objects merge by key, arrays keep one
/// merged element, scalars stay scalars (arrow-json coerces those itself).
fn merge_shape(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, sv) in s {
                match d.get_mut(k) {
                    Some(dv) => merge_shape(dv, sv),
                    None => {
                        let mut v = Value::Null;
                        merge_shape(&mut v, sv);
                        d.insert(k.clone(), v);
                    }
                }
            }
        }
        (d @ Value::Array(_), Value::Array(s)) => {
            let Value::Array(items) = d else { return };
            let mut elem = items.pop().unwrap_or(Value::Null);
            for e in s {
                merge_shape(&mut elem, e);
            }
            items.clear();
            if !elem.is_null() {
                items.push(elem);
            }
        }
        (Value::Array(items), s) => {
            let mut elem = items.pop().unwrap_or(Value::Null);
            merge_shape(&mut elem, s);
            items.clear();
            if !elem.is_null() {
                items.push(elem);
            }
        }
        (d, Value::Array(s)) => {
            let mut elem = std::mem::take(d);
            for e in s {
                merge_shape(&mut elem, e);
            }
            *d = Value::Array(if elem.is_null() { vec![] } else { vec![elem] });
        }
        (d @ Value::Null, s) => {
            *d = match s {
                Value::Object(_) => {
                    let mut o = Value::Object(serde_json::Map::new());
                    merge_shape(&mut o, s);
                    o
                }
                other => other.clone(),
            };
        }
        // Scalar into scalar (or null into anything): the shape is unchanged.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(offset: i64, value: &str) -> Raw {
        Raw {
            partition: 0,
            offset,
            timestamp: Some(1_700_000_000_000 + offset),
            key: Some(b"k".to_vec()),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn url() -> KafkaUrl {
        parse_url("kafka://127.0.0.1:1/events").unwrap()
    }

    #[test]
    fn non_objects_and_bad_json_are_undecodable() {
        let raws = vec![
            raw(0, r#"{"id":"a","n":1}"#),
            raw(1, "not json"),
            raw(2, "1 2"),
            raw(3, "[1]"),
            raw(4, r#"{"id":"b","n":2.5}"#),
        ];
        let r = decode(&url(), raws, &KafkaSettings::default(), None).unwrap();
        assert_eq!(r.messages, 5);
        let rows: usize = r.batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2);
        let bad: Vec<i64> = r.undecodable.iter().map(|u| u.offset).collect();
        assert_eq!(bad, vec![1, 2, 3]);
        assert_eq!(r.undecodable[0].value, b"not json");
        assert!(r.undecodable[0].error.starts_with("not JSON"));
        let names: Vec<&str> = r
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert!(names.ends_with(&[
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            "kafka_timestamp"
        ]));
    }

    #[test]
    fn shape_conflicts_without_a_hint_are_undecodable() {
        let raws = vec![
            raw(0, r#"{"id":"a","meta":{"x":1}}"#),
            raw(1, r#"{"id":"b","meta":7}"#),
            raw(2, r#"{"id":"c","meta":{"y":"z"}}"#),
        ];
        let r = decode(&url(), raws, &KafkaSettings::default(), None).unwrap();
        assert_eq!(r.undecodable.len(), 1);
        assert_eq!(r.undecodable[0].offset, 1);
        assert_eq!(r.batches[0].num_rows(), 2);
    }

    #[test]
    fn type_errors_against_a_hint_are_undecodable() {
        let hint = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, true),
            Field::new("kafka_offset", DataType::Utf8, true),
        ]));
        let raws = vec![
            raw(0, r#"{"id":"a","seq":1}"#),
            raw(1, r#"{"id":"b","seq":"x"}"#),
            raw(2, r#"{"seq":3}"#),
            raw(3, r#"{"id":"d","seq":4,"extra":true}"#),
        ];
        let r = decode(&url(), raws, &KafkaSettings::default(), Some(hint)).unwrap();
        let bad: Vec<i64> = r.undecodable.iter().map(|u| u.offset).collect();
        assert_eq!(bad, vec![1, 2]);
        let b = &r.batches[0];
        assert_eq!(b.num_rows(), 2);
        // The hint's coordinate column is replaced by the reader's own.
        assert_eq!(
            r.schema
                .field_with_name("kafka_offset")
                .unwrap()
                .data_type(),
            &DataType::Int64
        );
        assert_eq!(r.schema.fields().len(), 2 + 4);
    }
}
