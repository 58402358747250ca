//! Parquet files on any object store: `<base>/run_id=<RUN>/part-N-<NONCE>.parquet`.
//!
//! Files stream through the store's multipart upload (bounded memory
//! however large the output) to this attempt's staging folder (see
//! [`super::staged`] for the names and why readers never see them), are
//! synced in `finish`, and reach their final names only in `publish`, after
//! the run's log entry has committed them. This sink never makes a file
//! visible before that.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;

use super::staged::{self, Publication, StagedFile};
use super::{Sink, SinkContext, SinkError, SinkReceipt};
use crate::location::{Location, store_error_line};

/// Rows per output file before rolling to the next part.
const ROWS_PER_FILE: u64 = 1_000_000;

/// Columns of the outputs whose values rarely repeat (see `properties`).
const UNIQUE_COLUMNS: &[&str] = &[
    "event_id",
    "payload",
    "seq",
    "event_time",
    "kafka_offset",
    "kafka_timestamp",
    "before_event_id",
    "after_event_id",
];
/// Bytes a row group may hold in memory before it is written out. The
/// writer buffers a whole row group; with large payloads, 128k rows would
/// be gigabytes outside DataFusion's memory pool, so the cap is in bytes:
/// at most 32 MiB, less under a small `--memory-limit`
/// ([`crate::machine::row_group_bytes`]), as up to three sinks and the
/// ledger write at once, outside the pool (`machine::pool_bytes` leaves
/// room for them).
#[cfg(test)]
const ROW_GROUP_BYTES: usize = crate::machine::MAX_ROW_GROUP_BYTES;

pub struct ParquetSink {
    base: Location,
    ctx: SinkContext,
    writer: Option<FileWriter>,
    rows_in_file: u64,
    rows: u64,
    /// Staged and final names per finished or open part, relative to the base.
    parts: Vec<StagedFile>,
    published: bool,
}

/// The open file's writer. Encoding and compressing row groups is most of
/// a sink's CPU; done in the run's loop, it ran in turn with the fetch's
/// merge and the policy on one core while the other waited (the last
/// second of a 10M-event run), so it runs on a task of its own, fed
/// through a channel of one batch. Under a small memory limit (row groups
/// cut below their largest size) it stays in the loop: the batches in
/// flight and the encoding beside the merge cost memory outside the pool
/// (50M events at `--memory-limit 1G` peaked at 891-1,065 MiB over four
/// runs with the task, 964-972 MiB in two without it: the spread is
/// larger than the difference, so the cautious side is kept).
enum FileWriter {
    Inline(Box<AsyncArrowWriter<BufWriter>>),
    Background {
        tx: tokio::sync::mpsc::Sender<RecordBatch>,
        task: tokio::task::JoinHandle<Result<(), String>>,
        /// What the writer buffers after its last write (for a test).
        #[cfg(test)]
        buffered: Arc<AtomicUsize>,
    },
}

/// One batch into `w`, and its row group out once it holds its bytes: by
/// rows only (the writer's default), a row group of wide rows would be
/// gigabytes outside the pool. The sinks' files and the ledger's.
pub(crate) async fn write_one(
    w: &mut AsyncArrowWriter<BufWriter>,
    b: &RecordBatch,
) -> Result<(), String> {
    w.write(b).await.map_err(|e| e.to_string())?;
    if w.memory_size() >= crate::machine::row_group_bytes() {
        w.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl FileWriter {
    fn start(mut w: AsyncArrowWriter<BufWriter>) -> Self {
        if crate::machine::row_group_bytes() < crate::machine::MAX_ROW_GROUP_BYTES {
            return FileWriter::Inline(Box::new(w));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(1);
        let buffered = Arc::new(AtomicUsize::new(0));
        let seen = buffered.clone();
        #[cfg(not(test))]
        let _ = buffered;
        let task = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                write_one(&mut w, &b).await?;
                seen.store(w.memory_size(), Ordering::Relaxed);
            }
            w.close().await.map(|_| ()).map_err(|e| e.to_string())
        });
        FileWriter::Background {
            tx,
            task,
            #[cfg(test)]
            buffered,
        }
    }

    /// Written, or queued for the task. `Err(None)`: the task stopped on an
    /// error, which [`FileWriter::close`] returns.
    async fn write(&mut self, b: &RecordBatch) -> Result<(), Option<String>> {
        match self {
            FileWriter::Inline(w) => write_one(w, b).await.map_err(Some),
            FileWriter::Background { tx, .. } => tx.send(b.clone()).await.map_err(|_| None),
        }
    }

    /// Every batch written and the file complete; or the error that
    /// stopped the writer.
    async fn close(self) -> Result<(), String> {
        match self {
            FileWriter::Inline(w) => w.close().await.map(|_| ()).map_err(|e| e.to_string()),
            FileWriter::Background { tx, task, .. } => {
                drop(tx);
                match task.await {
                    Ok(r) => r,
                    Err(e) => Err(format!("the writer task failed: {e}")),
                }
            }
        }
    }

    /// Stop writing: the upload is dropped unfinished.
    async fn abort(self) {
        if let FileWriter::Background { task, .. } = self {
            task.abort();
            let _ = task.await;
        }
    }

    /// What the writer buffers (the task's: after its last write).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        match self {
            FileWriter::Inline(w) => w.memory_size(),
            FileWriter::Background { buffered, .. } => buffered.load(Ordering::Relaxed),
        }
    }
}

/// No dictionary for [`UNIQUE_COLUMNS`]: the writer interns every value
/// of a dictionary column in a hash table until the dictionary outgrows
/// its page (1 MiB), in each row group again, for nothing: 4 % of a
/// 10M-event run's CPU went to interning ids and payloads. Keys, statuses,
/// errors, topics and sources keep theirs (they repeat). The sinks' files
/// and the ledger's.
pub(crate) fn without_dictionaries(mut b: WriterPropertiesBuilder) -> WriterPropertiesBuilder {
    for unique in UNIQUE_COLUMNS {
        b = b.set_column_dictionary_enabled(ColumnPath::from(*unique), false);
    }
    b
}

impl ParquetSink {
    pub fn new(base: Location, ctx: SinkContext) -> Self {
        ParquetSink {
            base,
            ctx,
            writer: None,
            rows_in_file: 0,
            rows: 0,
            parts: vec![],
            published: false,
        }
    }

    fn err(&self, operation: &'static str, message: String) -> SinkError {
        SinkError::Io {
            kind: self.ctx.kind.name(),
            target: self.base.original.clone(),
            operation,
            message,
        }
    }

    fn properties() -> WriterProperties {
        without_dictionaries(
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .set_max_row_group_row_count(Some(128 * 1024)),
        )
        .build()
    }

    async fn close_current(&mut self) -> Result<(), SinkError> {
        if let Some(w) = self.writer.take() {
            w.close().await.map_err(|e| self.err("write", e))?;
        }
        self.rows_in_file = 0;
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), SinkError> {
        let names = staged::part_names(&self.ctx.run_id, &self.ctx.nonce, self.parts.len());
        let w = BufWriter::new(self.base.store.clone(), self.base.path(&names.staged));
        let w = AsyncArrowWriter::try_new(w, self.ctx.schema.clone(), Some(Self::properties()))
            .map_err(|e| self.err("open", e.to_string()))?;
        self.writer = Some(FileWriter::start(w));
        self.parts.push(names);
        Ok(())
    }

    fn publication(&self) -> Publication {
        Publication {
            kind: self.ctx.kind.name().to_string(),
            target: self.base.display_path(&self.base.prefix),
            files: self.parts.clone(),
        }
    }
}

#[async_trait]
impl Sink for ParquetSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        if self.base.is_local {
            // Found before the scan, not after it (issue 9).
            return self
                .base
                .check_local_writable()
                .map_err(|message| SinkError::Config {
                    kind: self.ctx.kind.name(),
                    target: self.base.original.clone(),
                    message,
                });
        }
        // Bucket exists and the credentials are accepted: fail before the scan.
        match self
            .base
            .store
            .list_with_delimiter(Some(&self.base.prefix))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err("list", store_error_line(&e))),
        }
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.writer.is_none() || self.rows_in_file >= ROWS_PER_FILE {
            self.close_current().await?;
            self.open_next()?;
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(self.err("write", "no open file".into()));
        };
        match w.write(batch).await {
            Ok(()) => {}
            Err(Some(message)) => return Err(self.err("write", message)),
            // The task stopped on an error, which closing returns.
            Err(None) => {
                let message = match self.writer.take() {
                    Some(w) => w.close().await.err(),
                    None => None,
                };
                let message = message.unwrap_or_else(|| "the writer stopped".into());
                return Err(self.err("write", message));
            }
        }
        self.rows_in_file += batch.num_rows() as u64;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.close_current().await?;
        for p in &self.parts {
            staged::sync_local(&self.base, &self.base.path(&p.staged))
                .map_err(|e| self.err("sync", e))?;
        }
        Ok(SinkReceipt {
            target: self.base.original.clone(),
            rows: self.rows,
            outputs: self
                .parts
                .iter()
                .map(|p| self.base.display_path(&self.base.path(&p.published)))
                .collect(),
            staged: Some(self.publication()),
            delivered: None,
        })
    }

    async fn publish(&mut self) -> Result<(), SinkError> {
        staged::promote(&self.base, &self.parts)
            .await
            .map_err(|e| self.err("publish", e.to_string()))?;
        self.published = true;
        Ok(())
    }

    async fn abort(&mut self) {
        // Drop an open upload; delete staged files. Best effort: what
        // remains is invisible to readers and removed by `state gc`.
        if let Some(w) = self.writer.take() {
            w.abort().await;
        }
        if !self.published {
            for p in &self.parts {
                let _ = self.base.store.delete(&self.base.path(&p.staged)).await;
            }
            staged::remove_empty_dirs(&self.base, &self.parts);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::sink::{RowColumns, SinkKind};

    /// Large payloads end row groups by size, not by the 128k-row count, so
    /// the writer's buffer stays near `ROW_GROUP_BYTES` however wide a row.
    #[tokio::test]
    async fn row_groups_are_cut_by_bytes_for_wide_rows() {
        let dir = tempfile::tempdir().unwrap();
        let base = crate::location::resolve(
            dir.path().to_str().unwrap(),
            &crate::location::StorageSettings::default(),
        )
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("payload", DataType::Utf8, false),
        ]));
        let columns = RowColumns {
            event_id: "event_id".into(),
            key: "key".into(),
            seq: "seq".into(),
            event_time: "event_time".into(),
            status: "status".into(),
            error: "error".into(),
            payload: "payload".into(),
        };
        let ctx = SinkContext {
            run_id: "r".into(),
            nonce: "n".into(),
            kind: SinkKind::Replay,
            schema: schema.clone(),
            columns: Arc::new(columns),
            storage: Default::default(),
            kafka: None,
        };
        let mut sink = ParquetSink::new(base, ctx);
        // Incompressible payloads of 1 MiB: 200 rows, 200 MiB in all.
        let mut x: u64 = 1;
        for chunk in 0..20 {
            let payloads: Vec<String> = (0..10)
                .map(|_| {
                    (0..(1 << 20))
                        .map(|_| {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                            char::from(b'a' + ((x >> 59) as u8 % 26))
                        })
                        .collect()
                })
                .collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(chunk * 10..chunk * 10 + 10)),
                    Arc::new(StringArray::from(payloads)),
                ],
            )
            .unwrap();
            sink.write(&batch).await.unwrap();
            if let Some(w) = sink.writer.as_ref() {
                let buffered = w.buffered();
                assert!(
                    buffered < ROW_GROUP_BYTES + (16 << 20),
                    "buffered {buffered} bytes"
                );
            }
        }
        sink.finish().await.unwrap();
        let staged = dir.path().join(&sink.parts[0].staged);
        let file = std::fs::File::open(staged).unwrap();
        let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
        use parquet::file::reader::FileReader;
        let groups = reader.metadata().num_row_groups();
        // 200 rows are one row group by count; by size they are several.
        assert!(groups >= 2, "{groups} row groups for 200 MiB");
    }
}
