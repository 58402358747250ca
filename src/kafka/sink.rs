//! The Kafka sink: replays, dead letters and gap records as messages on a
//! topic, behind the same [`Sink`] trait as the Parquet sink.
//!
//! Why it is shaped this way:
//! - Throughput comes from never awaiting one message, and from producing
//!   while the run decides: `write` casts a batch's columns (key, value,
//!   timestamp, headers) and hands it to this sink's enqueuing thread through
//!   a small bounded channel, then returns; the thread enqueues the messages
//!   into librdkafka in order, backing off while its local queue is full.
//!   `finish` waits until every message has its delivery report. Reports are
//!   counted by a delivery callback on the producer's polling thread (atomic
//!   counters, the first error kept), not by one future per message: no
//!   channel, box or task per message, and nothing held per message in flight
//!   but what librdkafka holds itself. A failed delivery stops the run early.
//! - Nothing is lost silently: a message that librdkafka gives up on (after its
//!   own retries, `message.timeout.ms`) makes `finish` fail, so the run
//!   commits nothing and a rerun sends everything again (at-least-once).
//!   With `transactional_id`, `precommit` commits the transaction and `abort`
//!   aborts it (exactly-once for `read_committed` consumers).
//! - Within a key, messages are produced in the order the rows arrive (the run
//!   sorts by key and seq) and idempotent production keeps that order on the
//!   broker. This sink never reorders rows.
//!
//! This sink must never commit the run, print a secret property, or panic on
//! the content of a row.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, StringArray, StringBuilder};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{
    DataType, Schema, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
};
use arrow::json::writer::{LineDelimited, WriterBuilder};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::util::Timeout;

use super::{
    KafkaSettings, KafkaUrl, Role, TimestampSource, ValueFormat, client_config,
    client_error_message, parse_url, scrub_message,
};
use crate::sink::{RowColumns, Sink, SinkContext, SinkError, SinkKind, SinkReceipt};

/// How long the health check waits for broker metadata: long enough for a
/// slow broker, short enough that a wrong address fails before the scan.
const CHECK_TIMEOUT: Duration = Duration::from_secs(8);
/// How long `init_transactions`, `commit_transaction` and `abort_transaction`
/// may take.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Header names, in our namespace (the conventions of Kafka Connect's DLQ and
/// Spring's DLT). Documented in docs/kafka.md, "The messages".
pub mod headers {
    pub const RUN_ID: &str = "backfill.run_id";
    pub const REASON: &str = "backfill.reason";
    pub const ATTEMPT: &str = "backfill.attempt";
    pub const EVENT_ID: &str = "backfill.event_id";
    pub const KEY: &str = "backfill.key";
    pub const SEQ: &str = "backfill.seq";
    pub const DETECTED_AT: &str = "backfill.detected_at";
    pub const ERROR: &str = "backfill.error";
    pub const ORIGINAL_TOPIC: &str = "backfill.original.topic";
    pub const ORIGINAL_PARTITION: &str = "backfill.original.partition";
    pub const ORIGINAL_OFFSET: &str = "backfill.original.offset";
    pub const ORIGINAL_TIMESTAMP: &str = "backfill.original.timestamp";
    /// `backfill redrive`: the run that dead-lettered the event.
    pub const REDRIVE_OF: &str = "backfill.redrive_of";
}

/// The `backfill_*` columns the run adds to every replay and DLQ row.
use crate::policy::out_columns::{
    ATTEMPT as ATTEMPT_COLUMN, DETECTED_AT as DETECTED_AT_COLUMN, REASON as REASON_COLUMN,
    REDRIVE_OF as REDRIVE_OF_COLUMN, RUN_ID as RUN_ID_COLUMN,
};
/// The key column of gap rows (the gaps view's name, not the source's).
const GAPS_KEY_COLUMN: &str = "key";

/// How a header's column becomes a UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderFormat {
    /// The value's text (Arrow's cast to Utf8).
    Text,
    /// A timestamp as RFC 3339 in UTC (`2024-05-01T12:00:00.250Z`).
    Rfc3339,
    /// A timestamp as milliseconds since the epoch, Kafka's own unit.
    EpochMillis,
}

/// Where each part of a message comes from in a batch; resolved by column
/// name so a batch whose columns are in another order still maps right.
#[derive(Debug)]
struct Layout {
    key: Option<usize>,
    /// `Some(payload column)` for raw values; `None` for JSON rows.
    payload: Option<usize>,
    event_time: Option<usize>,
    run_id: Option<usize>,
    headers: Vec<(&'static str, usize, HeaderFormat)>,
}

impl Layout {
    fn resolve(
        schema: &Schema,
        kind: SinkKind,
        columns: &RowColumns,
        settings: &KafkaSettings,
    ) -> Result<Layout, String> {
        let idx = |name: &str| schema.index_of(name).ok();
        // Replay and DLQ rows keep the source's column names; gap rows name
        // their key `key` whatever the source calls it.
        let key_column = match kind {
            SinkKind::Gaps
            | SinkKind::Silences
            | SinkKind::Anomalies
            | SinkKind::Reconcile
            | SinkKind::Contradicted => GAPS_KEY_COLUMN,
            _ => columns.key.as_str(),
        };
        let payload = match (kind, settings.value) {
            (
                SinkKind::Gaps
                | SinkKind::Silences
                | SinkKind::Anomalies
                | SinkKind::Reconcile
                | SinkKind::Contradicted,
                _,
            )
            | (_, Some(ValueFormat::Json)) => None,
            (_, Some(ValueFormat::Payload)) => Some(idx(&columns.payload).ok_or_else(|| {
                format!(
                    "value = \"payload\" but the rows have no payload column '{}' \
                     (map one with --column payload=..., or set value = \"json\")",
                    columns.payload
                )
            })?),
            (_, None) => idx(&columns.payload),
        };
        let event_time = match settings.timestamp {
            TimestampSource::EventTime => idx(&columns.event_time),
            TimestampSource::ProduceTime => None,
        };
        let is_time = |i: usize| {
            matches!(
                schema.field(i).data_type(),
                DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64
            )
        };
        let mut headers = Vec::new();
        let mut add = |header: &'static str, column: &str, time: HeaderFormat| {
            if let Some(i) = idx(column) {
                let f = if time != HeaderFormat::Text && is_time(i) {
                    time
                } else {
                    HeaderFormat::Text
                };
                headers.push((header, i, f));
            }
        };
        add(headers::REASON, REASON_COLUMN, HeaderFormat::Text);
        add(headers::ATTEMPT, ATTEMPT_COLUMN, HeaderFormat::Text);
        add(headers::EVENT_ID, &columns.event_id, HeaderFormat::Text);
        add(headers::KEY, key_column, HeaderFormat::Text);
        add(headers::SEQ, &columns.seq, HeaderFormat::Text);
        add(
            headers::DETECTED_AT,
            DETECTED_AT_COLUMN,
            HeaderFormat::Rfc3339,
        );
        if kind == SinkKind::Dlq {
            add(headers::ERROR, &columns.error, HeaderFormat::Text);
        }
        // Present only in a redrive's rows.
        add(headers::REDRIVE_OF, REDRIVE_OF_COLUMN, HeaderFormat::Text);
        add(
            headers::ORIGINAL_TOPIC,
            &settings.original_topic_column,
            HeaderFormat::Text,
        );
        add(
            headers::ORIGINAL_PARTITION,
            &settings.original_partition_column,
            HeaderFormat::Text,
        );
        add(
            headers::ORIGINAL_OFFSET,
            &settings.original_offset_column,
            HeaderFormat::Text,
        );
        add(
            headers::ORIGINAL_TIMESTAMP,
            &settings.original_timestamp_column,
            HeaderFormat::EpochMillis,
        );
        Ok(Layout {
            key: idx(key_column),
            payload,
            event_time,
            run_id: idx(RUN_ID_COLUMN),
            headers,
        })
    }
}

/// Delivery reports, as the producer's polling thread counts them.
#[derive(Debug, Default)]
struct Deliveries {
    acked: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    /// Per partition, the first and last acknowledged offsets.
    spans: Mutex<BTreeMap<i32, (i64, i64)>>,
}

impl Deliveries {
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    fn settled(&self) -> u64 {
        self.acked() + self.failed()
    }
}

/// The producer's context: a delivery callback that counts, nothing per
/// message to allocate or to wake.
struct Counter(Arc<Deliveries>);

impl ClientContext for Counter {}

impl ProducerContext for Counter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let d = &self.0;
        match result {
            Ok(m) => {
                let (p, o) = (m.partition(), m.offset());
                if let Ok(mut spans) = d.spans.lock() {
                    let span = spans.entry(p).or_insert((o, o));
                    span.0 = span.0.min(o);
                    span.1 = span.1.max(o);
                }
                d.acked.fetch_add(1, Ordering::Release);
            }
            Err((e, _)) => {
                if let Ok(mut first) = d.first_failure.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
                d.failed.fetch_add(1, Ordering::Release);
            }
        }
    }
}

type KafkaProducer = ThreadedProducer<Counter>;

/// One batch's messages, every part already cast: what `write` hands to the
/// enqueuing thread.
struct Prepared {
    rows: usize,
    keys: Option<BinaryArray>,
    payloads: Option<BinaryArray>,
    json: Option<JsonRows>,
    times: Option<arrow::array::TimestampMillisecondArray>,
    run_ids: Option<StringArray>,
    header_cols: Vec<(&'static str, StringArray)>,
    /// Compacted output: rows sent with a null value (a tombstone).
    tombstones: Option<Vec<bool>>,
}

/// Batches handed over but not yet enqueued, at most: enough to keep the
/// thread busy while the run decides the next batch, little memory.
const FEED_CAPACITY: usize = 4;

/// The enqueuing thread's side of the sink.
#[derive(Debug, Default)]
struct Feed {
    /// Messages librdkafka accepted (each gets one delivery report).
    enqueued: AtomicU64,
    /// Why enqueuing stopped, when it failed (not a full queue: that waits).
    error: Mutex<Option<String>>,
    /// Stop enqueuing (the run is aborting).
    stop: AtomicBool,
}

struct Feeder {
    tx: tokio::sync::mpsc::Sender<Prepared>,
    thread: std::thread::JoinHandle<()>,
}

/// The enqueuing thread: turns each handed-over batch into messages, in
/// order, so that the run decides the next batch (and writes its ledger)
/// while this one is being produced. One thread, one FIFO channel: the rows'
/// order is the messages' order.
fn enqueue_batches(
    mut rx: tokio::sync::mpsc::Receiver<Prepared>,
    producer: Arc<KafkaProducer>,
    topic: String,
    run_id: String,
    backoff: Duration,
    feed: Arc<Feed>,
    deliveries: Arc<Deliveries>,
) {
    let halted = |feed: &Feed| {
        feed.stop.load(Ordering::Acquire)
            || deliveries.failed() > 0
            || feed.error.lock().map(|e| e.is_some()).unwrap_or(true)
    };
    while let Some(b) = rx.blocking_recv() {
        if halted(&feed) {
            // Keep receiving (and dropping) so that `write` never blocks.
            continue;
        }
        // Sends retried after a full queue, told once a batch (debug): one
        // event a retry would be thousands a second under backpressure.
        let mut queue_full = 0u64;
        'rows: for row in 0..b.rows {
            if row % 1024 == 0 && feed.stop.load(Ordering::Acquire) {
                break;
            }
            let mut hdrs = OwnedHeaders::new_with_capacity(b.header_cols.len() + 1);
            let rid = match &b.run_ids {
                Some(a) if a.is_valid(row) => a.value(row),
                _ => run_id.as_str(),
            };
            hdrs = hdrs.insert(Header {
                key: headers::RUN_ID,
                value: Some(rid),
            });
            for (name, values) in &b.header_cols {
                if values.is_valid(row) {
                    hdrs = hdrs.insert(Header {
                        key: name,
                        value: Some(values.value(row)),
                    });
                }
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).headers(hdrs);
            if let Some(k) = &b.keys
                && k.is_valid(row)
            {
                record = record.key(k.value(row));
            }
            let tombstone = b.tombstones.as_ref().is_some_and(|t| t[row]);
            match (&b.payloads, &b.json) {
                _ if tombstone => {}
                (Some(p), _) => {
                    if p.is_valid(row) {
                        record = record.payload(p.value(row));
                    }
                }
                (None, Some(rows)) => {
                    record = record.payload(rows.row(row));
                }
                (None, None) => {}
            }
            if let Some(t) = &b.times
                && t.is_valid(row)
            {
                record = record.timestamp(t.value(row));
            }
            loop {
                match producer.send(record) {
                    Ok(()) => {
                        feed.enqueued.fetch_add(1, Ordering::Release);
                        break;
                    }
                    Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The polling thread serves delivery reports and
                        // frees room meanwhile.
                        if halted(&feed) {
                            break 'rows;
                        }
                        record = r;
                        queue_full += 1;
                        std::thread::sleep(backoff);
                    }
                    Err((e, _)) => {
                        if let Ok(mut slot) = feed.error.lock() {
                            slot.get_or_insert_with(|| e.to_string());
                        }
                        break 'rows;
                    }
                }
            }
        }
        if queue_full > 0 {
            tracing::debug!(
                topic = topic.as_str(),
                retries = queue_full,
                rows = b.rows as u64,
                "kafka sink: {queue_full} sends to topic '{topic}' retried after {} ms: librdkafka's queue was full",
                backoff.as_millis()
            );
        }
    }
}

/// A Kafka topic as a replay, DLQ or gaps sink.
pub struct KafkaSink {
    url: KafkaUrl,
    ctx: SinkContext,
    settings: KafkaSettings,
    producer: Arc<KafkaProducer>,
    deliveries: Arc<Deliveries>,
    transactional: bool,
    /// `init_transactions` has succeeded (in `check`, or lazily).
    transactions_ready: bool,
    in_transaction: bool,
    /// What the enqueuing thread shares with the sink.
    feed: Arc<Feed>,
    /// The enqueuing thread, started by the first write.
    feeder: Option<Feeder>,
    /// Rows handed to the enqueuing thread: each must become one enqueued
    /// message, or the run fails.
    handed: u64,
    /// How long `finish` waits for the last delivery report: librdkafka
    /// reports every message within its message timeout; this is a guard
    /// against a report that never comes. `None` when that timeout is
    /// infinite.
    settle_timeout: Option<Duration>,
    receipt: Option<SinkReceipt>,
    /// Per partition, the end offset before this attempt sent anything
    /// (read in `check` for a transactional sink).
    start_offsets: BTreeMap<i32, i64>,
    /// `compact = true`: the rows held until `finish`, and per key where
    /// its latest row is.
    compacting: Option<Compacting>,
    /// What the health check found: the topic exists.
    topic_exists: bool,
}

/// What a compacted sink holds until `finish`: every batch written, and per
/// message key the (batch, row) of the last row seen for it, in the order
/// keys first appeared.
#[derive(Debug, Default)]
struct Compacting {
    batches: Vec<RecordBatch>,
    latest: std::collections::HashMap<Vec<u8>, usize>,
    order: Vec<(usize, usize)>,
}

impl Compacting {
    /// One batch holding each key's last row, in first-seen key order.
    fn reduce(&self) -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
        if self.order.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&RecordBatch> = self.batches.iter().collect();
        arrow::compute::interleave_record_batch(&refs, &self.order).map(Some)
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("url", &self.url.original)
            .field("kind", &self.ctx.kind)
            .field("enqueued", &self.feed.enqueued.load(Ordering::Relaxed))
            .field("acked", &self.deliveries.acked())
            .finish()
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Dropped without `finish` or `abort` (the run is unwinding): enqueue
        // nothing more. The thread exits after its current message.
        self.feed.stop.store(true, Ordering::Release);
    }
}

impl KafkaSink {
    /// Parse the URL, validate the row layout against `ctx.schema` and create
    /// the producer (which contacts no broker yet). Errors are configuration
    /// errors naming the URL, the column or the property.
    pub fn new(target: &str, ctx: SinkContext) -> Result<KafkaSink, SinkError> {
        let kind = ctx.kind.name();
        let settings = ctx.kafka.clone().unwrap_or_default();
        // The target is named redacted: it is not yet known to be a valid
        // URL without user info.
        let config_err = |message: String| SinkError::Config {
            kind,
            target: crate::redact::url(target),
            message: scrub_message(&message, &settings),
        };
        let url = parse_url(target).map_err(|e| config_err(e.to_string()))?;
        // One message per key would drop rows the run records as delivered:
        // a replay or dead letter the ledger says was sent, never sent.
        if settings.compact && ctx.kind != SinkKind::State {
            return Err(config_err(format!(
                "[kafka] compact = true sends one message per key, but every {kind} row must arrive (a run records each as delivered); compaction is for state-at's per-key state: use `state-at --compact`, or keep `compact` in a job file used by state-at alone"
            )));
        }
        Layout::resolve(&ctx.schema, ctx.kind, &ctx.columns, &settings).map_err(&config_err)?;
        let mut cfg = client_config(&url, &settings, Role::Producer)
            .map_err(|e| config_err(e.to_string()))?;
        let transactional = match &settings.transactional_id {
            Some(id) if id.trim().is_empty() => {
                return Err(config_err("transactional_id is empty".into()));
            }
            Some(id) => {
                cfg.set("transactional.id", format!("{id}.{kind}"));
                true
            }
            None => false,
        };
        // `delivery.timeout.ms` is librdkafka's alias of `message.timeout.ms`.
        let message_timeout_ms = ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|k| settings.properties.get(*k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(settings.message_timeout_ms);
        let settle_timeout = (message_timeout_ms > 0)
            .then(|| Duration::from_millis(message_timeout_ms) + Duration::from_secs(60));
        let deliveries = Arc::new(Deliveries::default());
        let producer: KafkaProducer = cfg
            .create_with_context(Counter(deliveries.clone()))
            .map_err(|e| {
                // librdkafka names the property at fault ("No such configuration
                // property: ..."; "Invalid value for configuration property ...")
                // and rdkafka appends its value: rebuilt without it.
                config_err(format!(
                    "invalid Kafka configuration: {}",
                    client_error_message(&e, &cfg)
                ))
            })?;
        let compacting = settings.compact.then(Compacting::default);
        Ok(KafkaSink {
            url,
            ctx,
            settings,
            producer: Arc::new(producer),
            deliveries,
            transactional,
            transactions_ready: false,
            in_transaction: false,
            start_offsets: BTreeMap::new(),
            feed: Arc::new(Feed::default()),
            feeder: None,
            handed: 0,
            settle_timeout,
            receipt: None,
            compacting,
            topic_exists: false,
        })
    }

    /// Encode one batch and hand it to the enqueuing thread.
    async fn send(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if let Some(e) = self.feed_error().or_else(|| self.delivery_error()) {
            return Err(e);
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let layout = Layout::resolve(
            &batch.schema(),
            self.ctx.kind,
            &self.ctx.columns,
            &self.settings,
        )
        .map_err(|m| self.config(m))?;
        let column_err = |i: usize, what: &str, e: String| {
            self.config(format!(
                "column '{}' cannot be used as {what}: {e}",
                batch.schema().field(i).name()
            ))
        };
        let keys = match layout.key {
            Some(i) => {
                Some(as_binary(batch.column(i)).map_err(|e| column_err(i, "the message key", e))?)
            }
            None => None,
        };
        let payloads = match layout.payload {
            Some(i) => Some(
                as_binary(batch.column(i)).map_err(|e| column_err(i, "the message value", e))?,
            ),
            None => None,
        };
        let json = if payloads.is_none() {
            Some(json_rows(batch).map_err(|e| self.io("encode", format!("rows as JSON: {e}")))?)
        } else {
            None
        };
        let times = match layout.event_time {
            Some(i) => {
                let utc: Option<Arc<str>> = Some("UTC".into());
                let t = cast_with_options(
                    batch.column(i),
                    &DataType::Timestamp(TimeUnit::Millisecond, utc),
                    &strict(),
                )
                .map_err(|e| column_err(i, "the message timestamp", e.to_string()))?;
                Some(t.as_primitive::<TimestampMillisecondType>().clone())
            }
            None => None,
        };
        let run_ids = match layout.run_id {
            Some(i) => Some(
                as_header_strings(batch.column(i), HeaderFormat::Text)
                    .map_err(|e| column_err(i, "a header", e))?,
            ),
            None => None,
        };
        let mut header_cols = Vec::with_capacity(layout.headers.len());
        for (name, i, format) in &layout.headers {
            let values = as_header_strings(batch.column(*i), *format)
                .map_err(|e| column_err(*i, "a header", e))?;
            header_cols.push((*name, values));
        }

        if self.transactional && !self.in_transaction {
            self.init_transactions().await?;
            self.producer.begin_transaction().map_err(|e| {
                self.io(
                    "begin transaction",
                    format!("topic '{}' on {}: {e}", self.url.topic, self.url.bootstrap),
                )
            })?;
            self.in_transaction = true;
        }

        let tombstones = self.tombstones(batch);
        let rows = batch.num_rows() as u64;
        let prepared = Prepared {
            rows: batch.num_rows(),
            keys,
            payloads,
            json,
            times,
            run_ids,
            header_cols,
            tombstones,
        };
        let sent = match self.feeder_tx() {
            Some(tx) => tx.send(prepared).await.is_ok(),
            None => false,
        };
        if !sent {
            // The enqueuing thread stopped: a produce error says why.
            return Err(self.feed_error().unwrap_or_else(|| {
                self.io(
                    "produce",
                    format!("topic '{}': the enqueuing thread stopped", self.url.topic),
                )
            }));
        }
        self.handed += rows;
        match self.feed_error().or_else(|| self.delivery_error()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `compact = true`: keep the batch, and note each row as its key's
    /// latest. A row without a key cannot be compacted (Kafka refuses it on
    /// a compacted topic): a configuration error naming the column.
    fn hold(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let layout = Layout::resolve(
            &batch.schema(),
            self.ctx.kind,
            &self.ctx.columns,
            &self.settings,
        )
        .map_err(|m| self.config(m))?;
        let Some(k) = layout.key else {
            return Err(self.config(format!(
                "compact = true needs a key column '{}' in the rows",
                self.ctx.columns.key
            )));
        };
        let keys = as_binary(batch.column(k)).map_err(|e| {
            self.config(format!(
                "column '{}' cannot be used as the message key: {e}",
                batch.schema().field(k).name()
            ))
        })?;
        if keys.null_count() > 0 {
            return Err(self.config(format!(
                "compact = true: a row has no key (column '{}' is null); a compacted topic takes keyed messages only",
                batch.schema().field(k).name()
            )));
        }
        let Some(c) = self.compacting.as_mut() else {
            return Ok(());
        };
        let b = c.batches.len();
        c.batches.push(batch.clone());
        for row in 0..keys.len() {
            match c.latest.get(keys.value(row)) {
                Some(&slot) => c.order[slot] = (b, row),
                None => {
                    c.latest.insert(keys.value(row).to_vec(), c.order.len());
                    c.order.push((b, row));
                }
            }
        }
        Ok(())
    }

    /// Per row, whether it is a tombstone: `compact = true` and its status
    /// is one of `tombstone_statuses`. `None` when nothing is.
    fn tombstones(&self, batch: &RecordBatch) -> Option<Vec<bool>> {
        if !self.settings.compact || self.settings.tombstone_statuses.is_empty() {
            return None;
        }
        let col = batch.column_by_name(&self.ctx.columns.status)?;
        let text = arrow::compute::cast(col, &DataType::Utf8).ok()?;
        let text = text.as_string::<i32>();
        let marks: Vec<bool> = (0..text.len())
            .map(|i| {
                text.is_valid(i)
                    && self
                        .settings
                        .tombstone_statuses
                        .iter()
                        .any(|s| s == text.value(i))
            })
            .collect();
        marks.iter().any(|m| *m).then_some(marks)
    }

    /// An admin client with the sink's own settings (security properties
    /// included).
    fn admin(
        &self,
    ) -> Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, SinkError> {
        let cfg = client_config(&self.url, &self.settings, Role::Producer)
            .map_err(|e| self.config(e.to_string()))?;
        cfg.create().map_err(|e| {
            self.config(format!(
                "invalid Kafka configuration: {}",
                client_error_message(&e, &cfg)
            ))
        })
    }

    /// `compact = true` on an existing topic: its `cleanup.policy` must
    /// include `compact`, or the broker would delete old states by age and
    /// keep every message: refused, naming the policy and the fix.
    async fn require_compacted_topic(&self) -> Result<(), SinkError> {
        use rdkafka::admin::{AdminOptions, ResourceSpecifier};
        let admin = self.admin()?;
        let opts = AdminOptions::new().request_timeout(Some(CHECK_TIMEOUT));
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(&self.url.topic)], &opts)
            .await
            .map_err(|e| {
                self.io(
                    "health check",
                    format!("describing topic '{}': {e}", self.url.topic),
                )
            })?;
        let resource = described
            .into_iter()
            .next()
            .ok_or_else(|| {
                self.io(
                    "health check",
                    format!("the broker did not describe topic '{}'", self.url.topic),
                )
            })?
            .map_err(|code| {
                self.io(
                    "health check",
                    format!("describing topic '{}': {code}", self.url.topic),
                )
            })?;
        let policy = resource
            .entries
            .iter()
            .find(|e| e.name == "cleanup.policy")
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| "delete".into());
        if policy.split(',').any(|p| p.trim() == "compact") {
            return Ok(());
        }
        Err(self.config(format!(
            "compact = true but topic '{}' has cleanup.policy={policy}; a compacted sink needs \
             cleanup.policy=compact (kafka-configs --alter --entity-type topics --entity-name {} \
             --add-config cleanup.policy=compact), or write to another topic",
            self.url.topic, self.url.topic
        )))
    }

    /// `compact = true` and the topic is missing (which the health check
    /// allows only with `allow_auto_create_topics`): create it compacted,
    /// with the broker's default partitions and replication. Left to the
    /// broker's auto-creation it would get the default `delete` policy.
    async fn create_compacted_topic(&self) -> Result<(), SinkError> {
        use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
        let admin = self.admin()?;
        let opts = AdminOptions::new().request_timeout(Some(CHECK_TIMEOUT));
        let topic = NewTopic::new(&self.url.topic, -1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let results = admin.create_topics([&topic], &opts).await.map_err(|e| {
            self.io(
                "create topic",
                format!("topic '{}' (cleanup.policy=compact): {e}", self.url.topic),
            )
        })?;
        for r in results {
            match r {
                Ok(_) => {}
                // Created meanwhile by someone else: check it as any
                // existing topic.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    return self.require_compacted_topic().await;
                }
                Err((name, code)) => {
                    return Err(self.io(
                        "create topic",
                        format!("topic '{name}' (cleanup.policy=compact): {code}"),
                    ));
                }
            }
        }
        tracing::info!(
            topic = self.url.topic.as_str(),
            "created topic '{}' with cleanup.policy=compact",
            self.url.topic
        );
        Ok(())
    }

    /// Every error of a created sink goes through here or [`Self::config`]:
    /// the message is scrubbed of configured values that may not be shown
    /// (a broker's or librdkafka's text is not ours to trust).
    fn io(&self, operation: &'static str, message: String) -> SinkError {
        SinkError::Io {
            kind: self.ctx.kind.name(),
            target: self.url.original.clone(),
            operation,
            message: scrub_message(&message, &self.settings),
        }
    }

    fn config(&self, message: String) -> SinkError {
        SinkError::Config {
            kind: self.ctx.kind.name(),
            target: self.url.original.clone(),
            message: scrub_message(&message, &self.settings),
        }
    }

    /// The channel to the enqueuing thread, started on first use.
    fn feeder_tx(&mut self) -> Option<tokio::sync::mpsc::Sender<Prepared>> {
        if self.feeder.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(FEED_CAPACITY);
            let producer = self.producer.clone();
            let topic = self.url.topic.clone();
            let run_id = self.ctx.run_id.clone();
            let backoff = Duration::from_millis(self.settings.queue_full_backoff_ms.max(1));
            let feed = self.feed.clone();
            let deliveries = self.deliveries.clone();
            let thread = std::thread::Builder::new()
                .name(format!("backfill-kafka-{}", self.ctx.kind.name()))
                .spawn(move || {
                    enqueue_batches(rx, producer, topic, run_id, backoff, feed, deliveries)
                })
                .ok()?;
            self.feeder = Some(Feeder { tx, thread });
        }
        self.feeder.as_ref().map(|f| f.tx.clone())
    }

    /// Close the channel and wait until the enqueuing thread has enqueued
    /// (or, with `halt`, dropped) everything handed to it.
    async fn stop_feeder(&mut self, halt: bool) {
        if halt {
            self.feed.stop.store(true, Ordering::Release);
        }
        if let Some(Feeder { tx, thread }) = self.feeder.take() {
            drop(tx);
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(())))
                && let Ok(mut slot) = self.feed.error.lock()
            {
                slot.get_or_insert_with(|| "the enqueuing thread failed".into());
            }
        }
    }

    /// Enqueuing failed for another reason than a full queue.
    fn feed_error(&self) -> Option<SinkError> {
        let e = self.feed.error.lock().ok()?.clone()?;
        Some(self.io(
            "produce",
            format!("topic '{}' on {}: {e}", self.url.topic, self.url.bootstrap),
        ))
    }

    fn delivery_error(&self) -> Option<SinkError> {
        let failed = self.deliveries.failed();
        if failed == 0 {
            return None;
        }
        let first = self
            .deliveries
            .first_failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "unknown".into());
        Some(self.io(
            "delivery",
            format!(
                "{failed} message(s) to topic '{}' were not acknowledged (brokers {}); first error: {first}",
                self.url.topic, self.url.bootstrap
            ),
        ))
    }

    fn receipt(&self) -> SinkReceipt {
        let spans = self
            .deliveries
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        SinkReceipt {
            target: self.url.original.clone(),
            rows: self.deliveries.acked(),
            outputs: spans
                .iter()
                .map(|(p, (a, b))| format!("{}/{p}:{a}-{b}", self.url.topic))
                .collect(),
            staged: None,
            delivered: Some(crate::sink::Delivered {
                kind: self.ctx.kind.name().to_string(),
                target: self.url.original.clone(),
                rows: self.deliveries.acked(),
                transactional: self.transactional,
                start_offsets: self.start_offsets.clone(),
            }),
        }
    }

    /// Register the transactional id with its coordinator (fencing any
    /// earlier producer with the same id, such as a crashed run's). Once.
    async fn init_transactions(&mut self) -> Result<(), SinkError> {
        if self.transactional && !self.transactions_ready {
            self.blocking("init transactions", |p| {
                p.init_transactions(Timeout::After(TRANSACTION_TIMEOUT))
            })
            .await?;
            self.transactions_ready = true;
        }
        Ok(())
    }

    /// Run a blocking producer call (transactions) off the async workers.
    async fn blocking<F>(&self, operation: &'static str, f: F) -> Result<(), SinkError>
    where
        F: FnOnce(&KafkaProducer) -> Result<(), RdKafkaError> + Send + 'static,
    {
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || f(&producer)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.io(
                operation,
                format!("topic '{}' on {}: {e}", self.url.topic, self.url.bootstrap),
            )),
            Err(e) => Err(self.io(operation, format!("the Kafka call did not complete: {e}"))),
        }
    }
}

/// Casts that fail on a value they cannot convert, rather than turning it
/// into a null that would silently drop a key, a timestamp or a header.
fn strict() -> CastOptions<'static> {
    CastOptions {
        safe: false,
        ..CastOptions::default()
    }
}

/// A column as bytes, for message keys and raw values.
fn as_binary(col: &ArrayRef) -> Result<BinaryArray, String> {
    let strict = strict();
    let binary = match col.data_type() {
        DataType::Binary => col.clone(),
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => {
            cast_with_options(col, &DataType::Binary, &strict).map_err(|e| e.to_string())?
        }
        _ => {
            let text =
                cast_with_options(col, &DataType::Utf8, &strict).map_err(|e| e.to_string())?;
            cast_with_options(&text, &DataType::Binary, &strict).map_err(|e| e.to_string())?
        }
    };
    Ok(binary.as_binary::<i32>().clone())
}

/// A column as UTF-8 header values.
fn as_header_strings(col: &ArrayRef, format: HeaderFormat) -> Result<StringArray, String> {
    let strict = strict();
    let utc: Option<Arc<str>> = Some("UTC".into());
    match format {
        HeaderFormat::Text => {
            let text =
                cast_with_options(col, &DataType::Utf8, &strict).map_err(|e| e.to_string())?;
            Ok(text.as_string::<i32>().clone())
        }
        HeaderFormat::Rfc3339 => {
            let t = cast_with_options(
                col,
                &DataType::Timestamp(TimeUnit::Microsecond, utc),
                &strict,
            )
            .map_err(|e| e.to_string())?;
            let t = t.as_primitive::<TimestampMicrosecondType>();
            let mut b = StringBuilder::with_capacity(t.len(), t.len() * 27);
            // A run's detection time is one value for all its rows: format
            // each distinct run of values once.
            let mut last: Option<(i64, String)> = None;
            for v in t.iter() {
                let Some(micros) = v else {
                    b.append_null();
                    continue;
                };
                if last.as_ref().is_none_or(|(m, _)| *m != micros) {
                    last = DateTime::from_timestamp_micros(micros)
                        .map(|d| (micros, d.to_rfc3339_opts(SecondsFormat::AutoSi, true)));
                }
                match &last {
                    Some((m, text)) if *m == micros => b.append_value(text),
                    _ => b.append_null(),
                }
            }
            Ok(b.finish())
        }
        HeaderFormat::EpochMillis => {
            let t = cast_with_options(
                col,
                &DataType::Timestamp(TimeUnit::Millisecond, utc),
                &strict,
            )
            .map_err(|e| e.to_string())?;
            let t = t.as_primitive::<TimestampMillisecondType>();
            Ok(t.iter().map(|v| v.map(|ms| ms.to_string())).collect())
        }
    }
}

/// A batch's rows as JSON objects: one buffer, and each row's byte span in it.
struct JsonRows {
    buf: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl JsonRows {
    fn row(&self, i: usize) -> &[u8] {
        let (a, b) = self.spans[i];
        &self.buf[a..b]
    }
}

/// Each row of a batch as one JSON object (arrow-json, nulls written out so
/// consumers see every column).
fn json_rows(batch: &RecordBatch) -> Result<JsonRows, String> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 256);
    {
        let mut w = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, LineDelimited>(&mut buf);
        w.write(batch).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
    }
    // JSON strings escape newlines, so each '\n' ends exactly one row.
    let mut spans = Vec::with_capacity(batch.num_rows());
    let mut start = 0;
    for (i, b) in buf.iter().enumerate() {
        if *b == b'\n' {
            spans.push((start, i));
            start = i + 1;
        }
    }
    if spans.len() != batch.num_rows() {
        return Err(format!(
            "JSON encoding produced {} rows for {} input rows",
            spans.len(),
            batch.num_rows()
        ));
    }
    Ok(JsonRows { buf, spans })
}

/// One batch as messages, outside Kafka: per row the key, the headers
/// (`backfill.*`, the run id first) and the value, exactly as the Kafka sink
/// would send them. The Redis sink writes these fields, so that a consumer
/// reads the same names from either.
pub(crate) struct Messages {
    pub keys: Option<BinaryArray>,
    /// Per row: `(header, value)` pairs, run id first.
    pub headers: Vec<Vec<(&'static str, String)>>,
    /// Per row: the value (the payload's bytes or the row as JSON); `None`
    /// for a null payload.
    pub values: Vec<Option<Vec<u8>>>,
}

/// Encode `batch` as the Kafka sink would (its `Layout`, headers and
/// values); errors name the column at fault.
pub(crate) fn encode_messages(
    batch: &RecordBatch,
    kind: SinkKind,
    columns: &RowColumns,
    settings: &KafkaSettings,
    run_id: &str,
) -> Result<Messages, String> {
    let layout = Layout::resolve(&batch.schema(), kind, columns, settings)?;
    let named = |i: usize, e: String| {
        format!(
            "column '{}' cannot be used: {e}",
            batch.schema().field(i).name()
        )
    };
    let keys = match layout.key {
        Some(i) => Some(as_binary(batch.column(i)).map_err(|e| named(i, e))?),
        None => None,
    };
    let payloads = match layout.payload {
        Some(i) => Some(as_binary(batch.column(i)).map_err(|e| named(i, e))?),
        None => None,
    };
    let json = match payloads {
        None => Some(json_rows(batch).map_err(|e| format!("rows as JSON: {e}"))?),
        Some(_) => None,
    };
    let run_ids = match layout.run_id {
        Some(i) => {
            Some(as_header_strings(batch.column(i), HeaderFormat::Text).map_err(|e| named(i, e))?)
        }
        None => None,
    };
    let mut cols = Vec::with_capacity(layout.headers.len());
    for (name, i, format) in &layout.headers {
        cols.push((
            *name,
            as_header_strings(batch.column(*i), *format).map_err(|e| named(*i, e))?,
        ));
    }
    let n = batch.num_rows();
    let mut headers = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    for row in 0..n {
        let rid = match &run_ids {
            Some(a) if a.is_valid(row) => a.value(row),
            _ => run_id,
        };
        let mut h = vec![(headers::RUN_ID, rid.to_string())];
        for (name, v) in &cols {
            if v.is_valid(row) {
                h.push((*name, v.value(row).to_string()));
            }
        }
        headers.push(h);
        values.push(match (&payloads, &json) {
            (Some(p), _) => p.is_valid(row).then(|| p.value(row).to_vec()),
            (None, Some(j)) => Some(j.row(row).to_vec()),
            (None, None) => None,
        });
    }
    Ok(Messages {
        keys,
        headers,
        values,
    })
}

#[async_trait]
impl Sink for KafkaSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        self.preflight().await?;
        if self.settings.compact && !self.topic_exists {
            self.create_compacted_topic().await?;
        }
        self.init_transactions().await
    }

    async fn preflight(&mut self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let topic = self.url.topic.clone();
        // Metadata is not Send; reduce it to "does the topic exist" in place.
        let transactional = self.transactional;
        // With transactions, also where each partition ends now: a rerun
        // looks there for this run's committed messages.
        let found = tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), CHECK_TIMEOUT)?;
            let mut offsets = BTreeMap::new();
            let mut exists = false;
            for t in md.topics() {
                if t.name() != topic || t.error().is_some() || t.partitions().is_empty() {
                    continue;
                }
                exists = true;
                if transactional {
                    for p in t.partitions() {
                        let (_, high) =
                            producer
                                .client()
                                .fetch_watermarks(&topic, p.id(), CHECK_TIMEOUT)?;
                        offsets.insert(p.id(), high);
                    }
                }
            }
            Ok::<_, RdKafkaError>((exists, offsets))
        })
        .await
        .map_err(|e| {
            self.io(
                "health check",
                format!("the metadata request did not complete: {e}"),
            )
        })?
        .map_err(|e| {
            self.io(
                "health check",
                format!(
                    "brokers {} did not answer a metadata request within {} s: {e}",
                    self.url.bootstrap,
                    CHECK_TIMEOUT.as_secs()
                ),
            )
        })?;
        let (exists, offsets) = found;
        self.start_offsets = offsets;
        self.topic_exists = exists;
        if exists && self.settings.compact {
            self.require_compacted_topic().await?;
        }
        if !exists && !self.settings.allow_auto_create_topics {
            return Err(self.config(format!(
                "topic '{}' does not exist on {} (create it, or set allow_auto_create_topics = true \
                 in [kafka] if the broker may create it)",
                self.url.topic, self.url.bootstrap
            )));
        }
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if self.compacting.is_some() {
            return self.hold(batch);
        }
        self.send(batch).await
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        if let Some(r) = &self.receipt {
            return Ok(r.clone());
        }
        // A compacted sink sends now: one row per key, its latest.
        if let Some(c) = self.compacting.take() {
            let reduced = c
                .reduce()
                .map_err(|e| self.io("compact", format!("latest row per key: {e}")))?;
            if let Some(batch) = reduced {
                self.send(&batch).await?;
            }
        }
        // Everything handed over is enqueued first.
        self.stop_feeder(false).await;
        if let Some(e) = self.feed_error() {
            return Err(e);
        }
        let enqueued = self.feed.enqueued.load(Ordering::Acquire);
        if enqueued != self.handed && self.delivery_error().is_none() {
            return Err(self.io(
                "produce",
                format!(
                    "{enqueued} of {} message(s) to topic '{}' were enqueued",
                    self.handed, self.url.topic
                ),
            ));
        }
        // Every enqueued message gets exactly one delivery report (within
        // librdkafka's message timeout); wait for all of them.
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        while self.deliveries.settled() < enqueued {
            if let Some(limit) = self.settle_timeout
                && start.elapsed() > limit
            {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        if let Some(e) = self.delivery_error() {
            return Err(e);
        }
        let acked = self.deliveries.acked();
        if acked != enqueued {
            return Err(self.io(
                "delivery",
                format!(
                    "{acked} of {enqueued} message(s) to topic '{}' were acknowledged after {} s (brokers {})",
                    self.url.topic,
                    start.elapsed().as_secs(),
                    self.url.bootstrap
                ),
            ));
        }
        let receipt = self.receipt();
        self.receipt = Some(receipt.clone());
        Ok(receipt)
    }

    /// Commit the transaction, before the run's log entry: a transaction
    /// still open at the commit could be aborted by the broker afterwards,
    /// losing committed messages. A crash between this and the log entry
    /// shows the messages to `read_committed` consumers without a committed
    /// run; the rerun sends them again (at-least-once, deduplicated by
    /// `backfill.event_id` + `backfill.attempt`).
    async fn precommit(&mut self) -> Result<(), SinkError> {
        if self.receipt.is_none() {
            self.finish().await?;
        }
        if self.in_transaction {
            self.blocking("commit transaction", |p| {
                p.commit_transaction(Timeout::After(TRANSACTION_TIMEOUT))
            })
            .await?;
            self.in_transaction = false;
        }
        Ok(())
    }

    async fn publish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn abort(&mut self) {
        // Stop sending what is still queued: the run failed, and whatever was
        // already acknowledged is covered by at-least-once (or by the abort).
        self.stop_feeder(true).await;
        self.producer.purge(PurgeConfig::default().queue());
        if self.in_transaction {
            // Nothing to report to: the run is already failing with the
            // original error, and an unfinished transaction is aborted by the
            // broker at transaction.timeout.ms or fenced by the next run.
            let _ = self
                .blocking("abort transaction", |p| {
                    p.abort_transaction(Timeout::After(TRANSACTION_TIMEOUT))
                })
                .await;
            self.in_transaction = false;
        }
    }
}
