//! The run's state in the lake: a commit log of runs, each with a ledger of
//! what it replayed and dead-lettered. The log is the only truth: a run
//! happened if and only if a log entry names it.
//!
//! Layout under the state location:
//! ```text
//! log/<seq, 20 digits>.json               the commit log: sequential, create-only
//!                                         (a `run` entry commits a run, a `fence`
//!                                         entry, written by gc, forbids attempts to)
//! published/<seq>                         the outputs of run entry <seq> are final
//! attempts/<run_id>/<nonce>.json          an attempt's intent, written before it
//!                                         writes anything: proves what gc may delete
//! runs/<run_id>/ledger-<nonce>.parquet    an attempt's ledger entries
//! ```
//! Why a sequential log rather than one manifest per run id: two runs with
//! different ids on one state must not both act on one event (two schedulers,
//! overlapping Airflow intervals). Every run remembers the log position it
//! read its ledger at; its commit is the create-only write of the next
//! position, and before it a run reads every entry committed since its start
//! and aborts if one acted on any of its events (first committer wins, as in
//! Delta Lake's and Iceberg's optimistic commits). A ledger or staged file
//! that no entry names is never read, and `backfill state gc` removes it
//! once a fence entry guarantees its attempt can never commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use serde::{Deserialize, Serialize};

use crate::location::{Location, StorageSettings, store_error_line};
use crate::sink::staged::{self, Publication};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state {location}: {operation} failed: {message}")]
    Store {
        location: String,
        operation: &'static str,
        message: String,
    },
    #[error("state {location}: {file} is not valid: {message}")]
    BadManifest {
        location: String,
        file: String,
        message: String,
    },
    #[error(
        "run id '{run_id}' was committed by another attempt while this one was running; this attempt committed nothing"
    )]
    LostRace { run_id: String },
    #[error(
        "run '{run_id}' conflicts with run '{other}', committed while it ran: both acted on {events} event(s); this run committed nothing and is safe to rerun"
    )]
    Conflict {
        run_id: String,
        other: String,
        events: u64,
    },
    #[error(
        "run '{run_id}' (attempt {nonce}) was fenced by `state gc` as abandoned; it committed nothing and is safe to rerun"
    )]
    Fenced { run_id: String, nonce: String },
    /// Something the log names is gone, or the log has a hole: acting on
    /// such a state would replay or dead-letter events a second time.
    #[error(
        "state {location} is damaged: {message}; restore it from a backup (runs on a damaged state would act twice on the events it no longer records)"
    )]
    Damaged { location: String, message: String },
    #[error("state: query engine: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

impl StateError {
    /// Another run won: nothing of this one is visible and a rerun is safe.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StateError::LostRace { .. } | StateError::Conflict { .. } | StateError::Fenced { .. }
        )
    }
}

/// The current format of log entries.
pub const FORMAT_VERSION: u32 = 2;

/// A committed run: the `run` entry of the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    /// Position in the log (0 for entries of the format-1 layout).
    #[serde(default)]
    pub seq: u64,
    /// The log position this run read its ledger at.
    #[serde(default)]
    pub based_on: u64,
    pub run_id: String,
    /// Distinguishes attempts at the same run id.
    pub nonce: String,
    pub committed_at: DateTime<Utc>,
    /// Ledger files of this run, relative to the state location.
    pub ledger_files: Vec<String>,
    /// Final outputs per sink kind (object names or topic spans).
    pub outputs: BTreeMap<String, crate::sink::SinkReceipt>,
    /// What file sinks staged and what their final names are: everything a
    /// later process needs to finish publishing after a crash.
    #[serde(default)]
    pub publish: Vec<Publication>,
    /// The report of the run, for `backfill state runs` and audits.
    pub report: serde_json::Value,
    /// What Kafka sinks delivered before the commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<crate::sink::Delivered>,
    /// The settings that decided this run (window, sources, columns,
    /// policy, sinks; no secrets), for audits and to tell a rerun with
    /// other settings from a retry. `null` in entries of versions before
    /// it was recorded: such a run's settings are unknown, and a rerun of
    /// its id is not compared with them.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// How the run ended, so that a rerun of its id with the same settings
    /// ends the same way (a retry after exit 3 must not turn a task
    /// green). Absent in entries of versions before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Manifest {
    /// What kind of run the entry committed: `redrive` (`backfill
    /// redrive`), `shard` (`run --shard I/N`) or `run`.
    pub fn kind(&self) -> &'static str {
        if self.report.get("redrive").is_some_and(|r| !r.is_null())
            || self.settings.get("kind").and_then(|k| k.as_str()) == Some("redrive")
        {
            "redrive"
        } else if self.report.get("shard").is_some_and(|s| !s.is_null()) {
            "shard"
        } else {
            "run"
        }
    }
}

/// The exit outcome of a committed run. Kept apart from
/// [`Manifest::settings`], which a rerun must match to take over a prepared
/// attempt's outputs: `--fail-on-dlq` changes how a run ends, never what it
/// writes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code the run ended with: 0, or 3 (`--fail-on-dlq` and a
    /// dead letter).
    pub exit_code: u8,
    /// `--fail-on-dlq` was given: part of the settings a rerun must match.
    pub fail_on_dlq: bool,
}

/// An attempt of a run: what gc may prove it owns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttemptRef {
    pub run_id: String,
    pub nonce: String,
}

/// `gc`'s entry: these attempts never committed and never will.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fence {
    pub format_version: u32,
    #[serde(default)]
    pub seq: u64,
    pub fenced_at: DateTime<Utc>,
    pub attempts: Vec<AttemptRef>,
    /// Per fenced attempt (`run_id/nonce`), the sink bases it recorded: a
    /// fenced attempt that was still writing may leave staged files after
    /// gc removed its record, and every later gc looks there again.
    #[serde(default)]
    pub staged_under: BTreeMap<String, Vec<String>>,
}

/// One entry of the commit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogEntry {
    Run(Manifest),
    Fence(Fence),
}

impl LogEntry {
    pub fn seq(&self) -> u64 {
        match self {
            LogEntry::Run(m) => m.seq,
            LogEntry::Fence(f) => f.seq,
        }
    }

    fn set_seq(&mut self, seq: u64) {
        match self {
            LogEntry::Run(m) => m.seq = seq,
            LogEntry::Fence(f) => f.seq = seq,
        }
    }
}

/// An attempt's intent, written before it writes anything: which sinks it
/// may leave staged files under. gc deletes staged files only of attempts
/// it finds here, so it never touches another job's files in a shared folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    pub run_id: String,
    pub nonce: String,
    pub started_at: DateTime<Utc>,
    /// The log position the attempt read its ledger at.
    pub based_on: u64,
    /// File sinks' bases (absolute paths or URLs without credentials).
    pub targets: Vec<String>,
}

/// The log as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The highest position in the log (0 when empty).
    pub head: u64,
    /// Entries in log order (format-1 manifests first, at position 0).
    pub entries: Vec<LogEntry>,
    /// Positions whose outputs are known final.
    pub published: BTreeSet<u64>,
}

impl Snapshot {
    /// Committed runs, in commit order.
    pub fn runs(&self) -> impl Iterator<Item = &Manifest> {
        self.entries.iter().filter_map(|e| match e {
            LogEntry::Run(m) => Some(m),
            LogEntry::Fence(_) => None,
        })
    }

    pub fn committed(&self, run_id: &str) -> Option<&Manifest> {
        self.runs().find(|m| m.run_id == run_id)
    }

    fn fenced(&self) -> BTreeSet<AttemptRef> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                LogEntry::Fence(f) => Some(f.attempts.iter().cloned()),
                LogEntry::Run(_) => None,
            })
            .flatten()
            .collect()
    }
}

/// The state location and what it holds.
#[derive(Debug, Clone)]
pub struct State {
    pub loc: Location,
}

fn store_err(loc: &Location, operation: &'static str, e: &object_store::Error) -> StateError {
    StateError::Store {
        location: loc.original.clone(),
        operation,
        message: store_error_line(e),
    }
}

fn log_name(seq: u64) -> String {
    format!("log/{seq:020}.json")
}

/// The position of a log entry from its name (the inverse of [`log_name`]).
fn log_position(rel: &str) -> Option<u64> {
    rel.strip_prefix("log/")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Reads of many small objects at once: a state with thousands of runs on
/// S3 is read in a few round trips' time.
const READ_CONCURRENCY: usize = 32;

impl State {
    pub fn new(loc: Location) -> Self {
        State { loc }
    }

    async fn list_rel(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, object_store::ObjectMeta)>, StateError> {
        let prefix = self.loc.path(dir);
        let metas: Vec<_> = match self.loc.store.list(Some(&prefix)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => vec![],
            Err(e) => return Err(store_err(&self.loc, "list", &e)),
        };
        Ok(metas
            .into_iter()
            .map(|m| (self.rel(&m.location), m))
            .collect())
    }

    /// `path` relative to the state location.
    fn rel(&self, path: &Path) -> String {
        path.prefix_match(&self.loc.prefix)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default()
    }

    /// Read and parse one JSON object of the state; errors name the file.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        what: &'static str,
    ) -> Result<T, StateError> {
        let bytes = self
            .loc
            .store
            .get(path)
            .await
            .map_err(|e| store_err(&self.loc, what, &e))?
            .bytes()
            .await
            .map_err(|e| store_err(&self.loc, what, &e))?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::BadManifest {
            location: self.loc.original.clone(),
            file: self.loc.display_path(path),
            message: e.to_string(),
        })
    }

    async fn read_entry(&self, rel: &str) -> Result<LogEntry, StateError> {
        let path = self.loc.path(rel);
        if rel.starts_with("manifests/") {
            // The format-1 layout: one manifest per run id, published
            // before its commit, hence nothing to roll forward.
            let m: Manifest = self.read_json(&path, "read log entry").await?;
            return Ok(LogEntry::Run(m));
        }
        let e: LogEntry = self.read_json(&path, "read log entry").await?;
        if log_position(rel) != Some(e.seq()) {
            return Err(StateError::BadManifest {
                location: self.loc.original.clone(),
                file: self.loc.display_path(&path),
                message: format!("its position says {}", e.seq()),
            });
        }
        Ok(e)
    }

    /// Log positions present, ascending.
    async fn positions(&self) -> Result<Vec<u64>, StateError> {
        let mut v: Vec<u64> = self
            .list_rel("log")
            .await?
            .iter()
            .filter_map(|(rel, _)| log_position(rel))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    async fn read_entries(&self, rels: Vec<String>) -> Result<Vec<LogEntry>, StateError> {
        futures::stream::iter(rels)
            .map(|rel| async move { self.read_entry(&rel).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Entries after position `after`, in order.
    async fn entries_after(&self, after: u64) -> Result<Vec<LogEntry>, StateError> {
        let rels = self
            .positions()
            .await?
            .into_iter()
            .filter(|p| *p > after)
            .map(log_name)
            .collect();
        self.read_entries(rels).await
    }

    /// The whole log, read now.
    pub async fn snapshot(&self) -> Result<Snapshot, StateError> {
        let legacy: Vec<String> = self
            .list_rel("manifests")
            .await?
            .into_iter()
            .map(|(rel, _)| rel)
            .filter(|r| r.ends_with(".json"))
            .collect();
        let mut entries = self.read_entries(legacy).await?;
        entries.sort_by_key(|e| match e {
            LogEntry::Run(m) => (m.committed_at, m.run_id.clone()),
            LogEntry::Fence(f) => (f.fenced_at, String::new()),
        });
        let log = self.entries_after(0).await?;
        let head = log.last().map(LogEntry::seq).unwrap_or(0);
        for (i, e) in log.iter().enumerate() {
            if e.seq() != i as u64 + 1 {
                return Err(StateError::Damaged {
                    location: self.loc.original.clone(),
                    message: format!(
                        "log entry {} is missing (the log holds {} entries up to {head})",
                        self.loc
                            .display_path(&self.loc.path(&log_name(i as u64 + 1))),
                        log.len()
                    ),
                });
            }
        }
        entries.extend(log);
        let published: BTreeSet<u64> = self
            .list_rel("published")
            .await?
            .iter()
            .filter_map(|(rel, _)| rel.strip_prefix("published/")?.parse::<u64>().ok())
            .collect();
        // A marker is written only after its entry: one past the head means
        // the last entries of the log were deleted.
        if let Some(&last) = published.last()
            && last > head
        {
            return Err(StateError::Damaged {
                location: self.loc.original.clone(),
                message: format!(
                    "log entry {} is missing (its outputs were published; the log ends at {head})",
                    self.loc.display_path(&self.loc.path(&log_name(last)))
                ),
            });
        }
        Ok(Snapshot {
            head,
            entries,
            published,
        })
    }

    /// Every committed run, oldest first.
    pub async fn manifests(&self) -> Result<Vec<Manifest>, StateError> {
        Ok(self.snapshot().await?.runs().cloned().collect())
    }

    /// A table over ledger files (relative to the state), or an empty one.
    fn ledger_table(
        &self,
        ctx: &SessionContext,
        files: &[String],
    ) -> Result<Arc<dyn datafusion::catalog::TableProvider>, StateError> {
        self.loc.register(ctx);
        let schema = crate::detect::ledger_entries_schema();
        if files.is_empty() {
            let t = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
            return Ok(Arc::new(t));
        }
        let urls = files
            .iter()
            .map(|f| ListingTableUrl::parse(self.loc.object_url(&self.loc.path(f))))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }

    /// Register `ledger_entries`: the ledger files named by committed
    /// manifests, and nothing else.
    pub async fn register_ledger(
        &self,
        ctx: &SessionContext,
        manifests: &[Manifest],
    ) -> Result<(), StateError> {
        let files: Vec<String> = manifests
            .iter()
            .flat_map(|m| m.ledger_files.iter().cloned())
            .collect();
        let table = self.ledger_table(ctx, &files)?;
        ctx.register_table("ledger_entries", table)?;
        Ok(())
    }

    /// Every ledger file the committed runs name is there and not empty: a
    /// missing one would read as "nothing done" and its events would be
    /// replayed again.
    pub async fn verify_ledgers(&self, manifests: &[Manifest]) -> Result<(), StateError> {
        let files: Vec<(String, String)> = manifests
            .iter()
            .flat_map(|m| m.ledger_files.iter().map(|f| (m.run_id.clone(), f.clone())))
            .collect();
        let checks = futures::stream::iter(files)
            .map(|(run, f)| async move {
                let path = self.loc.path(&f);
                match self.loc.store.head(&path).await {
                    // A Parquet file ends with its magic: a truncated copy
                    // does not (one 4-byte read, no footer parse).
                    Ok(meta) if meta.size >= 12 => {
                        match self
                            .loc
                            .store
                            .get_range(&path, meta.size - 4..meta.size)
                            .await
                        {
                            Ok(tail) if tail.as_ref() == b"PAR1" => Ok(()),
                            Ok(_) => {
                                Err((run, path, "is truncated (no Parquet footer)".to_string()))
                            }
                            Err(e) => Err((run, path, store_error_line(&e))),
                        }
                    }
                    Ok(meta) if meta.size > 0 => {
                        Err((run, path, "is truncated (no Parquet footer)".to_string()))
                    }
                    Ok(_) => Err((run, path, "is empty".to_string())),
                    Err(object_store::Error::NotFound { .. }) => {
                        Err((run, path, "is missing".to_string()))
                    }
                    Err(e) => Err((run, path, store_error_line(&e))),
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for c in checks {
            if let Err((run, path, what)) = c {
                return Err(StateError::Damaged {
                    location: self.loc.original.clone(),
                    message: format!(
                        "the ledger file {} of committed run '{run}' {what}",
                        self.loc.display_path(&path)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Nothing at all under the state location: no log, no attempts.
    pub async fn is_empty(&self) -> Result<bool, StateError> {
        let mut list = self.loc.store.list(Some(&self.loc.prefix));
        match list.next().await {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(object_store::Error::NotFound { .. })) => Ok(true),
            Some(Err(e)) => Err(store_err(&self.loc, "list", &e)),
        }
    }

    /// How many events the ledger files `ours` and `theirs` both name.
    async fn overlap(&self, ours: &[String], theirs: &[String]) -> Result<u64, StateError> {
        if ours.is_empty() || theirs.is_empty() {
            return Ok(0);
        }
        let ctx = SessionContext::new();
        ctx.register_table("ours", self.ledger_table(&ctx, ours)?)?;
        ctx.register_table("theirs", self.ledger_table(&ctx, theirs)?)?;
        let b = ctx
            .sql(
                "SELECT count(*) FROM (SELECT DISTINCT event_id FROM ours) o \
                 WHERE o.event_id IN (SELECT event_id FROM theirs)",
            )
            .await?
            .collect()
            .await?;
        Ok(b.first()
            .filter(|b| b.num_rows() == 1)
            .map(|b| b.column(0).as_primitive::<Int64Type>().value(0) as u64)
            .unwrap_or(0))
    }

    /// Write one JSON object of the state and make it durable.
    async fn write_json<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        what: &'static str,
    ) -> Result<(), StateError> {
        let fail = |message: String| StateError::Store {
            location: self.loc.original.clone(),
            operation: what,
            message,
        };
        let body = serde_json::to_vec_pretty(value).map_err(|e| fail(e.to_string()))?;
        self.loc
            .store
            .put(path, PutPayload::from(body))
            .await
            .map_err(|e| fail(store_error_line(&e)))?;
        staged::sync_local(&self.loc, path).map_err(fail)
    }

    /// Write this attempt's intent, before it writes anything else.
    pub async fn record_attempt(&self, record: &AttemptRecord) -> Result<(), StateError> {
        let path = self.attempt_path(&record.run_id, &record.nonce);
        self.write_json(&path, record, "write attempt record").await
    }

    fn attempt_path(&self, run_id: &str, nonce: &str) -> Path {
        self.loc.path(&format!("attempts/{run_id}/{nonce}.json"))
    }

    fn prepared_path(&self, run_id: &str, nonce: &str) -> Path {
        self.loc
            .path(&format!("attempts/{run_id}/{nonce}.prepared.json"))
    }

    /// Record the entry an attempt is about to commit, after everything it
    /// wrote is durable and every Kafka message acknowledged, and before a
    /// Kafka transaction commits: if the attempt dies before its commit, a
    /// rerun of the run id can commit this instead of sending again.
    pub async fn prepare(&self, manifest: &Manifest) -> Result<(), StateError> {
        let path = self.prepared_path(&manifest.run_id, &manifest.nonce);
        self.write_json(&path, manifest, "write prepared entry")
            .await
    }

    /// The prepared entries of earlier attempts at `run_id`, newest first.
    pub async fn prepared(&self, run_id: &str) -> Result<Vec<Manifest>, StateError> {
        let mut out = vec![];
        for (rel, meta) in self.list_rel(&format!("attempts/{run_id}")).await? {
            if !rel.ends_with(".prepared.json") {
                continue;
            }
            let m: Manifest = self
                .read_json(&meta.location, "read prepared entry")
                .await?;
            out.push(m);
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.committed_at));
        Ok(out)
    }

    /// Give up on a prepared attempt (it can never be recovered).
    pub async fn drop_prepared(&self, run_id: &str, nonce: &str) {
        let _ = self
            .loc
            .store
            .delete(&self.prepared_path(run_id, nonce))
            .await;
    }

    /// Forget a finished attempt's record (best effort: gc removes it too).
    pub async fn forget_attempt(&self, run_id: &str, nonce: &str) {
        self.drop_prepared(run_id, nonce).await;
        let _ = self
            .loc
            .store
            .delete(&self.attempt_path(run_id, nonce))
            .await;
        if self.loc.is_local {
            let dir = format!("/{}", self.loc.path(&format!("attempts/{run_id}")));
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Remove what an attempt that certainly did not commit left in the
    /// state (its ledger file and record). Best effort: gc removes the rest.
    pub async fn discard_attempt(&self, run_id: &str, nonce: &str) {
        let ledger = self
            .loc
            .path(&format!("runs/{run_id}/ledger-{nonce}.parquet"));
        let _ = self.loc.store.delete(&ledger).await;
        if self.loc.is_local {
            let _ = std::fs::remove_dir(format!("/{}", self.loc.path(&format!("runs/{run_id}"))));
        }
        self.forget_attempt(run_id, nonce).await;
    }

    /// Start this attempt's ledger file (written as the run decides).
    pub fn ledger_writer(&self, run_id: &str, nonce: &str) -> Result<LedgerWriter, StateError> {
        let rel = format!("runs/{run_id}/ledger-{nonce}.parquet");
        let path = self.loc.path(&rel);
        let writer = BufWriter::new(self.loc.store.clone(), path.clone());
        // No dictionary for the ids: each is in the ledger once.
        let properties = crate::sink::parquet::without_dictionaries(
            parquet::file::properties::WriterProperties::builder(),
        )
        .build();
        let w = AsyncArrowWriter::try_new(
            writer,
            crate::detect::ledger_entries_schema(),
            Some(properties),
        )
        .map_err(|e| StateError::Store {
            location: self.loc.original.clone(),
            operation: "start ledger",
            message: e.to_string(),
        })?;
        Ok(LedgerWriter {
            loc: self.loc.clone(),
            rel,
            writer: Some(w),
            rows: 0,
        })
    }

    /// Append `entry` at the next free position after `based_on`, checking
    /// every entry committed since. `check` sees each of them and may refuse
    /// (conflict) or declare the entry already committed (its own lost
    /// answer): `Ok(Some(seq))`. Returns the position written.
    async fn append<F, Fut>(
        &self,
        entry: &mut LogEntry,
        based_on: u64,
        mut check: F,
    ) -> Result<u64, StateError>
    where
        F: FnMut(LogEntry) -> Fut,
        Fut: std::future::Future<Output = Result<Option<u64>, StateError>>,
    {
        let mut head = based_on;
        // The position a create-only write found taken: if reading the log
        // again shows no entry there, something else holds the name (a
        // folder, a dangling link); retrying would spin forever.
        let mut taken: Option<u64> = None;
        loop {
            for e in self.entries_after(head).await? {
                head = head.max(e.seq());
                if let Some(seq) = check(e).await? {
                    return Ok(seq);
                }
            }
            let seq = head + 1;
            if taken == Some(seq) {
                return Err(StateError::BadManifest {
                    location: self.loc.original.clone(),
                    file: log_name(seq),
                    message: "the name is taken by something that is not a log entry (a folder or a broken link?); move it away, then rerun".into(),
                });
            }
            entry.set_seq(seq);
            let path = self.loc.path(&log_name(seq));
            let body = serde_json::to_vec_pretty(&*entry).map_err(|e| StateError::Store {
                location: self.loc.original.clone(),
                operation: "encode log entry",
                message: e.to_string(),
            })?;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .loc
                .store
                .put_opts(&path, PutPayload::from(body.clone()), opts)
                .await
            {
                Ok(_) => {
                    staged::sync_local(&self.loc, &path).map_err(|message| StateError::Store {
                        location: self.loc.original.clone(),
                        operation: "sync log entry",
                        message,
                    })?;
                    return Ok(seq);
                }
                // Someone took the position: read it (and any after) and retry.
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {
                    taken = Some(seq);
                    continue;
                }
                Err(e) => {
                    // The write may have reached the store although its answer
                    // did not (a lost response, a 5xx retried into "already
                    // exists"): if the entry there is this one, it committed.
                    if let Ok(there) = self.read_entry(&log_name(seq)).await
                        && serde_json::to_vec_pretty(&there).ok() == Some(body)
                    {
                        return Ok(seq);
                    }
                    return Err(store_err(&self.loc, "write log entry", &e));
                }
            }
        }
    }

    /// Commit a run: append its entry, unless a run committed since
    /// `based_on` has the same id (LostRace) or acted on any of the same
    /// events (Conflict), or gc fenced this attempt (Fenced). Returns the
    /// entry's position. On any error, nothing of this run is committed.
    pub async fn commit(&self, manifest: &mut Manifest) -> Result<u64, StateError> {
        let ours = AttemptRef {
            run_id: manifest.run_id.clone(),
            nonce: manifest.nonce.clone(),
        };
        let our_ledger = manifest.ledger_files.clone();
        let mut entry = LogEntry::Run(manifest.clone());
        let seq = self
            .append(&mut entry, manifest.based_on, |e| {
                let ours = ours.clone();
                let our_ledger = our_ledger.clone();
                async move {
                    match e {
                        LogEntry::Run(m) if m.run_id == ours.run_id => {
                            if m.nonce == ours.nonce {
                                Ok(Some(m.seq))
                            } else {
                                Err(StateError::LostRace {
                                    run_id: ours.run_id.clone(),
                                })
                            }
                        }
                        LogEntry::Run(m) => {
                            let events = self.overlap(&our_ledger, &m.ledger_files).await?;
                            if events > 0 {
                                Err(StateError::Conflict {
                                    run_id: ours.run_id.clone(),
                                    other: m.run_id.clone(),
                                    events,
                                })
                            } else {
                                Ok(None)
                            }
                        }
                        LogEntry::Fence(f) if f.attempts.contains(&ours) => {
                            Err(StateError::Fenced {
                                run_id: ours.run_id.clone(),
                                nonce: ours.nonce.clone(),
                            })
                        }
                        LogEntry::Fence(_) => Ok(None),
                    }
                }
            })
            .await?;
        manifest.seq = seq;
        Ok(seq)
    }

    /// Record that the outputs of entry `seq` are final.
    pub async fn mark_published(&self, seq: u64) -> Result<(), StateError> {
        let path = self.loc.path(&format!("published/{seq:020}"));
        self.loc
            .store
            .put(&path, PutPayload::from_static(b""))
            .await
            .map_err(|e| store_err(&self.loc, "mark published", &e))?;
        Ok(())
    }

    /// Finish publishing every committed run whose outputs are not known
    /// final (a crash after its commit). Returns the run ids rolled forward.
    /// Idempotent and safe beside the run that is publishing them itself.
    pub async fn roll_forward(
        &self,
        snapshot: &Snapshot,
        storage: &StorageSettings,
    ) -> Result<Vec<String>, StateError> {
        let mut done = vec![];
        let mut problems = vec![];
        for m in snapshot.runs() {
            if m.seq == 0 || m.publish.is_empty() || snapshot.published.contains(&m.seq) {
                continue;
            }
            match self.publish_entry(m, storage).await {
                Ok(()) => done.push(m.run_id.clone()),
                Err(StateError::Store { message, .. }) => problems.push(message),
                Err(e) => return Err(e),
            }
        }
        if !problems.is_empty() {
            // Each committed run is reported here once: a run whose files
            // are gone is marked published, so the next call is quiet.
            return Err(StateError::Store {
                location: self.loc.original.clone(),
                operation: "roll forward",
                message: problems.join("; "),
            });
        }
        Ok(done)
    }

    /// Make the staged files of committed entry `m` final and mark it
    /// published. Every file is tried. A file that is gone for good is
    /// reported, but the entry is marked published all the same (the file
    /// cannot come back, and retrying it on every run would hide it); any
    /// other failure leaves the entry for the next try.
    pub async fn publish_entry(
        &self,
        m: &Manifest,
        storage: &StorageSettings,
    ) -> Result<(), StateError> {
        let mut problems = vec![];
        let mut failed = false;
        for p in &m.publish {
            let result = match crate::location::resolve(&p.target, storage) {
                Ok(base) => staged::promote(&base, &p.files).await,
                Err(e) => Err(staged::PromoteError {
                    lost: vec![],
                    errors: vec![e.to_string()],
                }),
            };
            if let Err(e) = result {
                failed |= !e.errors.is_empty();
                problems.push(format!("run '{}': {e}", m.run_id));
            }
        }
        if !failed {
            self.mark_published(m.seq).await?;
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StateError::Store {
                location: self.loc.original.clone(),
                operation: "publish",
                message: problems.join("; "),
            })
        }
    }
}

/// The ledger file of one attempt. Not read by anyone until a manifest
/// names it.
pub struct LedgerWriter {
    loc: Location,
    rel: String,
    writer: Option<AsyncArrowWriter<BufWriter>>,
    pub rows: u64,
}

impl LedgerWriter {
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<(), StateError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.rows += batch.num_rows() as u64;
        // Row groups cut by bytes, as the sinks' are: by rows only (the
        // writer's default, 1M), the ledger of a run held every entry
        // until it closed, outside the pool (66k ids of 5 KB: 330 MiB at
        // `--memory-limit 64M`).
        if let Some(w) = self.writer.as_mut() {
            crate::sink::parquet::write_one(w, batch)
                .await
                .map_err(|message| StateError::Store {
                    location: self.loc.original.clone(),
                    operation: "write ledger",
                    message,
                })?;
        }
        Ok(())
    }

    /// Close the file; returns its name relative to the state location.
    pub async fn finish(mut self) -> Result<String, StateError> {
        if let Some(w) = self.writer.take() {
            w.close().await.map_err(|e| StateError::Store {
                location: self.loc.original.clone(),
                operation: "close ledger",
                message: e.to_string(),
            })?;
            staged::sync_local(&self.loc, &self.loc.path(&self.rel)).map_err(|message| {
                StateError::Store {
                    location: self.loc.original.clone(),
                    operation: "sync ledger",
                    message,
                }
            })?;
        }
        Ok(self.rel)
    }
}

/// Files named `NAME#DIGITS` below `root` (object_store's local upload
/// temporaries), optionally only those last modified before `before`.
fn local_upload_temporaries(
    root: &std::path::Path,
    before: Option<std::time::SystemTime>,
) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let temp = name
                .rsplit_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            let old = match (before, meta.modified()) {
                (Some(b), Ok(m)) => m < b,
                (Some(_), Err(_)) => false,
                (None, _) => true,
            };
            if temp && old {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// One leftover that gc found.
#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    pub object: String,
    pub why: &'static str,
    pub bytes: u64,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcOutcome {
    /// Committed runs whose publishing gc finished.
    pub rolled_forward: Vec<String>,
    /// Attempts gc fenced (they can never commit now).
    pub fenced: Vec<AttemptRef>,
    pub removed: Vec<Leftover>,
}

/// Collect what attempts left behind, proving ownership of everything it
/// deletes:
/// - committed runs whose publishing was interrupted are rolled forward;
/// - an attempt recorded in this state (`attempts/`), older than `min_age`,
///   never committed: a fence entry in the log first makes sure it never
///   will, then its staged files under the sinks it recorded, its ledger file,
///   its prepared entry and its record are deleted;
/// - staged files that fenced attempts wrote after their fence (the sinks are
///   in the fence entry, so every gc looks again);
/// - ledger files under `runs/` that no entry names and no live attempt
///   owns, older than `min_age`;
/// - records of committed attempts.
///
/// Nothing is deleted by mere absence from this state: a file under a shared
/// sink folder that no attempt of this state recorded is never touched. A run
/// that commits while gc works is seen in the log before anything of it could
/// be deleted.
pub async fn gc(
    state: &State,
    storage: &StorageSettings,
    min_age: chrono::Duration,
    dry_run: bool,
) -> Result<GcOutcome, StateError> {
    let snapshot = state.snapshot().await?;
    // A point of the test build's crash harness (not in `failpoint::POINTS`,
    // which a run passes): a run may commit while gc is here.
    crate::failpoint::hit("gc_after_snapshot")
        .await
        .map_err(|e| StateError::Store {
            location: state.loc.original.clone(),
            operation: "gc",
            message: e.to_string(),
        })?;
    let mut out = GcOutcome::default();
    // A roll-forward that fails is reported after the clean-up, not instead.
    let mut roll_error = None;
    if !dry_run {
        match state.roll_forward(&snapshot, storage).await {
            Ok(r) => out.rolled_forward = r,
            Err(e) => roll_error = Some(e),
        }
    }
    let attempt_of = |m: &Manifest| AttemptRef {
        run_id: m.run_id.clone(),
        nonce: m.nonce.clone(),
    };
    let mut committed: BTreeSet<AttemptRef> = snapshot.runs().map(attempt_of).collect();
    let fenced = snapshot.fenced();
    let mut named: BTreeSet<String> = snapshot
        .runs()
        .flat_map(|m| m.ledger_files.iter().cloned())
        .collect();
    let cutoff = Utc::now() - min_age;
    let mut found: Vec<(Location, object_store::ObjectMeta, &'static str)> = vec![];

    // Attempt records: committed ones are done with; old uncommitted ones
    // are abandoned; the rest may be running.
    let mut records: Vec<(AttemptRecord, object_store::ObjectMeta)> = vec![];
    let mut prepared_files: BTreeMap<AttemptRef, object_store::ObjectMeta> = BTreeMap::new();
    for (rel, meta) in state.list_rel("attempts").await? {
        if let Some(stem) = rel.strip_suffix(".prepared.json") {
            let mut parts = stem.rsplitn(2, '/');
            if let (Some(nonce), Some(dir)) = (parts.next(), parts.next())
                && let Some(run_id) = dir.strip_prefix("attempts/")
            {
                prepared_files.insert(
                    AttemptRef {
                        run_id: run_id.to_string(),
                        nonce: nonce.to_string(),
                    },
                    meta,
                );
            }
            continue;
        }
        if !rel.ends_with(".json") {
            continue;
        }
        match state
            .read_json::<AttemptRecord>(&meta.location, "read attempt record")
            .await
        {
            Ok(r) => records.push((r, meta)),
            // Finished (and forgotten) while gc listed.
            Err(StateError::Store { message, .. }) if message.contains("not found") => {}
            // Half-written by a kill: it owns nothing gc could prove.
            Err(StateError::BadManifest { .. }) if meta.last_modified < cutoff => {
                found.push((state.loc.clone(), meta, "unreadable attempt record"));
            }
            Err(StateError::BadManifest { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let mut abandoned: Vec<(AttemptRecord, object_store::ObjectMeta)> = vec![];
    let mut live: BTreeSet<AttemptRef> = BTreeSet::new();
    for (r, meta) in records {
        let a = AttemptRef {
            run_id: r.run_id.clone(),
            nonce: r.nonce.clone(),
        };
        if committed.contains(&a) {
            if !dry_run
                && snapshot.committed(&a.run_id).is_some_and(|m| {
                    m.seq == 0
                        || m.publish.is_empty()
                        || snapshot.published.contains(&m.seq)
                        || out.rolled_forward.contains(&m.run_id)
                })
            {
                state.forget_attempt(&a.run_id, &a.nonce).await;
            }
        } else if fenced.contains(&a) || meta.last_modified < cutoff {
            abandoned.push((r, meta));
        } else {
            live.insert(a);
        }
    }

    // Fence the abandoned attempts that are not fenced yet, through the log:
    // an attempt that commits first is dropped from the fence instead.
    let key = |a: &AttemptRef| format!("{}/{}", a.run_id, a.nonce);
    let to_fence: Vec<AttemptRef> = abandoned
        .iter()
        .map(|(r, _)| AttemptRef {
            run_id: r.run_id.clone(),
            nonce: r.nonce.clone(),
        })
        .filter(|a| !fenced.contains(a))
        .collect();
    let mut new_fence: Option<Fence> = None;
    if !to_fence.is_empty() && !dry_run {
        let staged_under: BTreeMap<String, Vec<String>> = abandoned
            .iter()
            .map(|(r, _)| {
                (
                    key(&AttemptRef {
                        run_id: r.run_id.clone(),
                        nonce: r.nonce.clone(),
                    }),
                    r.targets.clone(),
                )
            })
            .collect();
        let mut entry = LogEntry::Fence(Fence {
            format_version: FORMAT_VERSION,
            seq: 0,
            fenced_at: Utc::now(),
            attempts: to_fence.clone(),
            staged_under,
        });
        loop {
            for e in state.entries_after(snapshot.head).await? {
                if let LogEntry::Run(m) = e {
                    committed.insert(attempt_of(&m));
                }
            }
            if let LogEntry::Fence(f) = &mut entry {
                f.attempts.retain(|a| !committed.contains(a));
                if f.attempts.is_empty() {
                    break;
                }
            }
            let targets = to_fence.clone();
            let seen = committed.clone();
            let result = state
                .append(&mut entry, snapshot.head, |e| {
                    let targets = targets.clone();
                    let seen = seen.clone();
                    async move {
                        match e {
                            LogEntry::Run(m) => {
                                let a = AttemptRef {
                                    run_id: m.run_id.clone(),
                                    nonce: m.nonce.clone(),
                                };
                                if targets.contains(&a) && !seen.contains(&a) {
                                    // One of them committed: start over without it.
                                    Err(StateError::LostRace { run_id: m.run_id })
                                } else {
                                    Ok(None)
                                }
                            }
                            LogEntry::Fence(_) => Ok(None),
                        }
                    }
                })
                .await;
            match result {
                Ok(_) => break,
                Err(StateError::LostRace { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        if let LogEntry::Fence(f) = entry {
            out.fenced = f.attempts.clone();
            new_fence = Some(f);
        }
    }
    // Whatever committed while gc worked is committed: its ledger is named,
    // its files are its own.
    for e in state.entries_after(snapshot.head).await? {
        if let LogEntry::Run(m) = e {
            committed.insert(attempt_of(&m));
            named.extend(m.ledger_files.iter().cloned());
        }
    }
    abandoned.retain(|(r, _)| {
        !committed.contains(&AttemptRef {
            run_id: r.run_id.clone(),
            nonce: r.nonce.clone(),
        })
    });

    // Staging folders to empty: of the abandoned attempts (from their
    // records) and of every fenced attempt (from the fence entries).
    let mut staging: BTreeSet<(String, String, String)> = BTreeSet::new();
    for (r, _) in &abandoned {
        for t in &r.targets {
            staging.insert((t.clone(), r.run_id.clone(), r.nonce.clone()));
        }
    }
    let fences = snapshot
        .entries
        .iter()
        .filter_map(|e| match e {
            LogEntry::Fence(f) => Some(f),
            LogEntry::Run(_) => None,
        })
        .chain(new_fence.as_ref());
    for f in fences {
        for a in &f.attempts {
            if committed.contains(a) {
                continue;
            }
            for t in f.staged_under.get(&key(a)).into_iter().flatten() {
                staging.insert((t.clone(), a.run_id.clone(), a.nonce.clone()));
            }
        }
    }
    let mut temporaries: Vec<(std::path::PathBuf, &'static str)> = vec![];
    let mut attempt_dirs: Vec<std::path::PathBuf> = vec![];
    for (target, run_id, nonce) in &staging {
        let Ok(base) = crate::location::resolve(target, storage) else {
            continue;
        };
        let dir = base.path(&staged::attempt_dir(run_id, nonce));
        let metas: Vec<_> = match base.store.list(Some(&dir)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => vec![],
            Err(e) => return Err(store_err(&base, "list staged files", &e)),
        };
        for m in metas {
            found.push((
                base.clone(),
                m,
                "staged output of an attempt that never committed",
            ));
        }
        if base.is_local {
            // object_store writes every object to `NAME#N` and renames it into
            // place; a kill in between leaves the `#N` file, which its listing
            // hides. Found by walking the folder.
            let d = std::path::PathBuf::from(format!("/{dir}"));
            for f in local_upload_temporaries(&d, None) {
                temporaries.push((f, "partial upload of an attempt that never committed"));
            }
            attempt_dirs.push(d);
        }
    }
    let mut owned_ledgers: BTreeSet<String> = BTreeSet::new();
    for (r, meta) in &abandoned {
        let a = AttemptRef {
            run_id: r.run_id.clone(),
            nonce: r.nonce.clone(),
        };
        owned_ledgers.insert(format!("runs/{}/ledger-{}.parquet", r.run_id, r.nonce));
        if let Some(p) = prepared_files.get(&a) {
            found.push((
                state.loc.clone(),
                p.clone(),
                "prepared entry of an attempt that never committed",
            ));
        }
        found.push((
            state.loc.clone(),
            meta.clone(),
            "record of an attempt that never committed",
        ));
    }
    for (rel, m) in state.list_rel("runs").await? {
        if named.contains(&rel) {
            continue;
        }
        let live_owner = live
            .iter()
            .any(|a| rel == format!("runs/{}/ledger-{}.parquet", a.run_id, a.nonce));
        if owned_ledgers.contains(&rel) || (!live_owner && m.last_modified < cutoff) {
            found.push((
                state.loc.clone(),
                m,
                "ledger file of an attempt that never committed",
            ));
        }
    }
    if state.loc.is_local {
        let root = std::path::PathBuf::from(format!("/{}", state.loc.prefix));
        let cutoff_time: std::time::SystemTime = cutoff.into();
        for f in local_upload_temporaries(&root, Some(cutoff_time)) {
            temporaries.push((f, "partial upload of an interrupted write"));
        }
    }
    for (f, why) in temporaries {
        let bytes = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        if !dry_run {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StateError::Store {
                        location: state.loc.original.clone(),
                        operation: "delete leftover",
                        message: format!("{}: {e}", f.display()),
                    });
                }
            }
        }
        out.removed.push(Leftover {
            object: f.display().to_string(),
            why,
            bytes,
        });
    }
    for (loc, m, why) in found {
        if !dry_run {
            match loc.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&loc, "delete leftover", &e)),
            }
        }
        out.removed.push(Leftover {
            object: loc.display_path(&m.location),
            why,
            bytes: m.size,
        });
    }
    if !dry_run {
        for d in &attempt_dirs {
            // Everything in it is gone by now; what is left is empty folders.
            let _ = std::fs::remove_dir_all(d);
            if let Some(run_dir) = d.parent() {
                let _ = std::fs::remove_dir(run_dir);
                if let Some(staging_dir) = run_dir.parent() {
                    let _ = std::fs::remove_dir(staging_dir);
                }
            }
        }
    }
    match roll_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
