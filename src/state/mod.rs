//! The run's state in the lake: per committed run, a ledger of what it
//! replayed and dead-lettered, and a manifest, written last with create-only
//! semantics, which *is* the commit.
//!
//! Layout under the state location:
//! ```text
//! manifests/<run_id>.json              the commit (PutMode::Create)
//! runs/<run_id>/ledger-<nonce>.parquet  that attempt's ledger entries
//! ```
//! Readers trust manifests only: a ledger file no manifest names (a crashed
//! or losing attempt) is never read, and `backfill state gc` removes it.
//! The nonce keeps two attempts at the same run id from overwriting each
//! other's ledger: the manifest that wins names its own file.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use serde::{Deserialize, Serialize};

use crate::location::{Location, store_error_line};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state {location}: {operation} failed: {message}")]
    Store {
        location: String,
        operation: &'static str,
        message: String,
    },
    #[error("state {location}: manifest {file} is not valid: {message}")]
    BadManifest {
        location: String,
        file: String,
        message: String,
    },
    #[error(
        "run id '{run_id}' was committed by another run while this one was running; this attempt committed nothing"
    )]
    LostRace { run_id: String },
    #[error("state: query engine: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

/// A committed run. Written last; its presence is the commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub run_id: String,
    /// Distinguishes attempts at the same run id.
    pub nonce: String,
    pub committed_at: DateTime<Utc>,
    /// Ledger files of this run, relative to the state location.
    pub ledger_files: Vec<String>,
    /// Final outputs per sink kind (object names or topic spans).
    pub outputs: BTreeMap<String, crate::sink::SinkReceipt>,
    /// The report of the run, for `backfill state runs` and audits.
    pub report: serde_json::Value,
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

impl State {
    pub fn new(loc: Location) -> Self {
        State { loc }
    }

    fn manifest_path(&self, run_id: &str) -> Path {
        self.loc.path(&format!("manifests/{run_id}.json"))
    }

    /// The manifest of `run_id`, if that run is committed.
    pub async fn committed(&self, run_id: &str) -> Result<Option<Manifest>, StateError> {
        let path = self.manifest_path(run_id);
        match self.loc.store.get(&path).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| store_err(&self.loc, "read manifest", &e))?;
                Ok(Some(self.parse_manifest(&path, &bytes)?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(&self.loc, "read manifest", &e)),
        }
    }

    fn parse_manifest(&self, path: &Path, bytes: &[u8]) -> Result<Manifest, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::BadManifest {
            location: self.loc.original.clone(),
            file: self.loc.display_path(path),
            message: e.to_string(),
        })
    }

    /// Every committed run, oldest first.
    pub async fn manifests(&self) -> Result<Vec<Manifest>, StateError> {
        let prefix = self.loc.path("manifests");
        let metas: Vec<_> = self
            .loc
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| store_err(&self.loc, "list manifests", &e))?;
        let mut out = vec![];
        for m in metas {
            if !m.location.as_ref().ends_with(".json") {
                continue;
            }
            let bytes = self
                .loc
                .store
                .get(&m.location)
                .await
                .map_err(|e| store_err(&self.loc, "read manifest", &e))?
                .bytes()
                .await
                .map_err(|e| store_err(&self.loc, "read manifest", &e))?;
            out.push(self.parse_manifest(&m.location, &bytes)?);
        }
        out.sort_by(|a, b| (a.committed_at, &a.run_id).cmp(&(b.committed_at, &b.run_id)));
        Ok(out)
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
            .flat_map(|m| m.ledger_files.iter())
            .map(|f| self.loc.object_url(&self.loc.path(f)))
            .collect();
        self.loc.register(ctx);
        let schema = crate::detect::ledger_entries_schema();
        if files.is_empty() {
            let t = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
            ctx.register_table("ledger_entries", Arc::new(t))?;
            return Ok(());
        }
        let urls = files
            .iter()
            .map(ListingTableUrl::parse)
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema);
        ctx.register_table("ledger_entries", Arc::new(ListingTable::try_new(config)?))?;
        Ok(())
    }

    /// Start this attempt's ledger file (written as the run decides).
    pub fn ledger_writer(&self, run_id: &str, nonce: &str) -> Result<LedgerWriter, StateError> {
        let rel = format!("runs/{run_id}/ledger-{nonce}.parquet");
        let path = self.loc.path(&rel);
        let writer = BufWriter::new(self.loc.store.clone(), path.clone());
        let w = AsyncArrowWriter::try_new(writer, crate::detect::ledger_entries_schema(), None)
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

    /// Commit: write the manifest create-only. Err(LostRace) when another
    /// attempt committed the same run id first.
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), StateError> {
        let path = self.manifest_path(&manifest.run_id);
        let body = serde_json::to_vec_pretty(manifest).map_err(|e| StateError::Store {
            location: self.loc.original.clone(),
            operation: "encode manifest",
            message: e.to_string(),
        })?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let err = match self
            .loc
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // The write may have reached the store although its answer did not
        // (a lost response or a 5xx, retried into "already exists"): when
        // the manifest there is this attempt's own, the run is committed.
        if let Ok(Some(m)) = self.committed(&manifest.run_id).await
            && m.nonce == manifest.nonce
        {
            return Ok(());
        }
        match err {
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => Err(StateError::LostRace {
                run_id: manifest.run_id.clone(),
            }),
            e => Err(store_err(&self.loc, "write manifest", &e)),
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
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).await.map_err(|e| StateError::Store {
                location: self.loc.original.clone(),
                operation: "write ledger",
                message: e.to_string(),
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
        }
        Ok(self.rel)
    }
}

/// One leftover that gc found.
#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    pub object: String,
    pub why: &'static str,
    pub bytes: u64,
}

/// Find (and unless `dry_run`, delete) what uncommitted attempts left:
/// ledger files no manifest names, `_tmp/` objects under the sinks, and
/// `run_id=<ID>/` output folders of run ids that never committed. Only
/// objects older than `min_age` are touched, so a running job is safe.
pub async fn gc(
    state: &State,
    sinks: &[Location],
    min_age: chrono::Duration,
    dry_run: bool,
) -> Result<Vec<Leftover>, StateError> {
    let manifests = state.manifests().await?;
    let committed: BTreeMap<&str, &Manifest> =
        manifests.iter().map(|m| (m.run_id.as_str(), m)).collect();
    let named: std::collections::BTreeSet<String> = manifests
        .iter()
        .flat_map(|m| m.ledger_files.iter().cloned())
        .collect();
    let cutoff = Utc::now() - min_age;
    let mut found = vec![];
    let runs = state.loc.path("runs");
    let metas: Vec<_> = state
        .loc
        .store
        .list(Some(&runs))
        .try_collect()
        .await
        .map_err(|e| store_err(&state.loc, "list ledger files", &e))?;
    for m in metas {
        let rel = m
            .location
            .prefix_match(&state.loc.prefix)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default();
        if !named.contains(&rel) && m.last_modified < cutoff {
            found.push((
                state.loc.clone(),
                m,
                "ledger file of an uncommitted attempt",
            ));
        }
    }
    for sink in sinks {
        let metas: Vec<_> = match sink.store.list(Some(&sink.prefix)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => vec![],
            Err(e) => return Err(store_err(sink, "list sink", &e)),
        };
        for m in metas {
            if m.last_modified >= cutoff {
                continue;
            }
            let rel: Vec<String> = m
                .location
                .prefix_match(&sink.prefix)
                .map(|p| p.map(|x| x.as_ref().to_string()).collect())
                .unwrap_or_default();
            if rel.first().map(String::as_str) == Some("_tmp") {
                found.push((sink.clone(), m, "temporary output of an unfinished run"));
            } else if let Some(run) = rel.first().and_then(|d| d.strip_prefix("run_id="))
                && !committed.contains_key(run)
            {
                found.push((sink.clone(), m, "output of a run that never committed"));
            }
        }
    }
    let mut out = vec![];
    for (loc, m, why) in found {
        if !dry_run {
            match loc.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&loc, "delete leftover", &e)),
            }
        }
        out.push(Leftover {
            object: loc.display_path(&m.location),
            why,
            bytes: m.size,
        });
    }
    Ok(out)
}
