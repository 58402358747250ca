//! Where replays, dead letters and gap records go: Parquet on any object
//! store, a Kafka topic, or stdout, all behind one [`Sink`] trait.
//!
//! A sink never commits the run. The run drives every sink through
//! `check` → `write`* → `finish` (everything durable, nothing visible) →
//! `precommit` (only a transactional Kafka sink does anything here) → the
//! run's commit (a create-only log entry that lists every staged file) →
//! `publish` (staged files to their final names, stdout printed). On any
//! failure before the commit the run calls `abort`, and nothing it wrote is
//! visible. A crash after the commit is finished by the next run or by
//! `backfill state gc` from the log entry alone ([`staged`]).

pub mod parquet;
pub mod redis;
pub mod staged;
pub mod stdout;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::Serialize;

use crate::location::{Location, LocationError, StorageSettings};

/// What a sink carries; decides the folder name and the message layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Replay,
    Dlq,
    Gaps,
    /// Time silences ([`crate::detect::silences`]).
    Silences,
    /// Volume anomalies ([`crate::detect::volume`]).
    Anomalies,
    /// Processed events a later error log line contradicts
    /// ([`crate::detect::logs`]).
    Contradicted,
    /// Per-key state (`backfill state-at`): one row per key.
    State,
    /// Compensating events `backfill infer` inferred from snapshots.
    Inferred,
    /// Keys whose downstream snapshot disagrees ([`crate::reconcile`]).
    Reconcile,
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Replay => "replay",
            SinkKind::Dlq => "dlq",
            SinkKind::Gaps => "gaps",
            SinkKind::Silences => "silences",
            SinkKind::Anomalies => "anomalies",
            SinkKind::Contradicted => "contradicted",
            SinkKind::State => "state",
            SinkKind::Inferred => "inferred",
            SinkKind::Reconcile => "reconcile",
        }
    }
}

/// Errors of any sink; each names the sink's target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("{kind} sink {target}: {operation} failed: {message}")]
    Io {
        kind: &'static str,
        target: String,
        operation: &'static str,
        message: String,
    },
    #[error("{kind} sink {target}: {message}")]
    Config {
        kind: &'static str,
        target: String,
        message: String,
    },
}

impl SinkError {
    /// True when the user's settings are at fault (exit 2), not the run.
    pub fn is_config(&self) -> bool {
        matches!(self, SinkError::Config { .. } | SinkError::Location(_))
    }
}

/// What a sink delivered, for the report and the manifest.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SinkReceipt {
    /// The sink's target, as the user wrote it (no secrets).
    pub target: String,
    /// Rows (or messages) acknowledged.
    pub rows: u64,
    /// Final object names (Parquet) or topic/partition spans (Kafka).
    pub outputs: Vec<String>,
    /// What a file sink staged and must promote after the commit; recorded
    /// in the run's log entry (not in the report).
    #[serde(skip)]
    pub staged: Option<staged::Publication>,
    /// What a sink outside the lake (Kafka) delivered before the commit;
    /// recorded with the prepared attempt so that a rerun can recognise it.
    #[serde(skip)]
    pub delivered: Option<Delivered>,
}

/// Messages a Kafka sink delivered before the run's commit: enough for a
/// rerun of the run id to find out whether they are visible to consumers,
/// and then commit the prepared attempt instead of sending them again.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Delivered {
    /// `replay`, `dlq`, `gaps`, `silences` or `anomalies`.
    pub kind: String,
    /// The `kafka://` URL.
    pub target: String,
    /// Messages acknowledged.
    pub rows: u64,
    /// Sent inside a transaction: visible to `read_committed` consumers only
    /// once it committed, which a rerun must check.
    pub transactional: bool,
    /// Per partition, the end offset before this attempt sent anything:
    /// where a rerun starts looking for this run's messages.
    #[serde(default)]
    pub start_offsets: std::collections::BTreeMap<i32, i64>,
}

/// Names of the input-contract columns as they appear in the rows a sink
/// receives (the source's own names, after the job's column mapping).
#[derive(Debug, Clone)]
pub struct RowColumns {
    pub event_id: String,
    pub key: String,
    pub seq: String,
    pub event_time: String,
    /// The status column: a compacted Kafka sink sends a tombstone for a
    /// key whose row has a deleted status.
    pub status: String,
    pub error: String,
    pub payload: String,
}

/// Everything a sink needs to know about the run it writes for.
#[derive(Debug, Clone)]
pub struct SinkContext {
    pub run_id: String,
    /// Unique per attempt: keeps temporaries of racing attempts apart.
    pub nonce: String,
    pub kind: SinkKind,
    /// The schema of every batch `write` will receive.
    pub schema: SchemaRef,
    pub columns: Arc<RowColumns>,
    pub storage: StorageSettings,
    /// Kafka settings from the job file; `None` when no `[kafka]` section.
    pub kafka: Option<crate::kafka::KafkaSettings>,
}

#[async_trait]
pub trait Sink: Send {
    /// Fail fast, before the scan: the target is reachable and writable.
    async fn check(&mut self) -> Result<(), SinkError>;

    /// The checks of [`Sink::check`] that change nothing anywhere, for a
    /// dry run: a Kafka sink's `check` also initialises its transactions,
    /// which would fence a real run writing with the same transactional id.
    async fn preflight(&mut self) -> Result<(), SinkError> {
        self.check().await
    }
    /// Accept one batch. May buffer; must not make anything final.
    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError>;
    /// Make everything durable (files complete at staged names and synced,
    /// every Kafka message acknowledged). Still nothing visible.
    async fn finish(&mut self) -> Result<SinkReceipt, SinkError>;
    /// The last step before the run's commit, after every sink finished:
    /// a transactional Kafka sink commits its transaction here (Kafka cannot
    /// take part in our commit, and a transaction left open past the commit
    /// would be aborted by the broker: committed-but-lost is worse than a
    /// resend). Nothing for the others.
    async fn precommit(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// After the run's commit: make the output visible (staged files to
    /// their final names, stdout printed). Whatever this leaves undone after
    /// a crash, the next run or `state gc` finishes from the log entry.
    async fn publish(&mut self) -> Result<(), SinkError>;
    /// Undo what can be undone (delete staged files, abort a transaction).
    async fn abort(&mut self);
}

/// Open the sink for a target: `-` is stdout, `kafka://` a topic, anything
/// else a Parquet folder (under which the run writes `run_id=<RUN>/`).
pub fn open(target: &str, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
    if target == "-" {
        return Ok(Box::new(stdout::StdoutSink::new(ctx)));
    }
    if target.starts_with("kafka://") {
        return crate::kafka::open(target, ctx);
    }
    if redis::is_redis(target) {
        return Ok(Box::new(redis::RedisSink::new(target, ctx)?));
    }
    let loc = crate::location::resolve(target, &ctx.storage)?;
    Ok(Box::new(parquet::ParquetSink::new(loc, ctx)))
}

/// A target that is not a folder of the lake: stdout, a Kafka topic, a
/// Redis server. Nothing of it is listed, staged or excluded from the
/// archive.
pub fn outside_the_lake(target: &str) -> bool {
    target == "-" || target.starts_with("kafka://") || redis::is_redis(target)
}

/// Where a Parquet sink writes by default: `<out>/<kind>`.
pub fn default_target(out: &Location, kind: SinkKind) -> String {
    out.child(kind.name()).original
}
