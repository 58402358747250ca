//! Parquet files on any object store: `<base>/run_id=<RUN>/part-N.parquet`.
//!
//! Files stream through the store's multipart upload (bounded memory
//! however large the output) to `<base>/_tmp/run_id=<RUN>/<nonce>/`, and
//! move to their final names only in `publish`, after every sink of the run
//! has finished. `_`-prefixed folders are ignored by Spark, Hive, DuckDB's
//! hive reader and our own source listing, so readers never see a partial file.

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{Sink, SinkContext, SinkError, SinkReceipt};
use crate::location::{Location, store_error_line};

/// Rows per output file before rolling to the next part.
const ROWS_PER_FILE: u64 = 1_000_000;

pub struct ParquetSink {
    base: Location,
    ctx: SinkContext,
    writer: Option<AsyncArrowWriter<BufWriter>>,
    rows_in_file: u64,
    rows: u64,
    /// (temporary, final) per finished or open part.
    parts: Vec<(Path, Path)>,
    published: bool,
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

    /// On local disk, folders outlive the files moved out of them; remove
    /// this attempt's now-empty `_tmp` folders (never anything with files).
    /// Object stores have no folders, so there is nothing to do there.
    fn remove_empty_tmp_dirs(&self) {
        if !self.base.is_local {
            return;
        }
        let root = std::path::PathBuf::from(format!("/{}", self.base.prefix));
        let tmp = root.join("_tmp");
        let run = tmp.join(format!("run_id={}", self.ctx.run_id));
        for dir in [run.join(&self.ctx.nonce), run, tmp] {
            // remove_dir fails on a non-empty folder: exactly what we want.
            let _ = std::fs::remove_dir(dir);
        }
    }

    fn properties() -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(128 * 1024))
            .build()
    }

    async fn close_current(&mut self) -> Result<(), SinkError> {
        if let Some(w) = self.writer.take() {
            w.close()
                .await
                .map_err(|e| self.err("write", e.to_string()))?;
        }
        self.rows_in_file = 0;
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), SinkError> {
        let n = self.parts.len();
        let tmp = self.base.path(&format!(
            "_tmp/run_id={}/{}/part-{n}.parquet",
            self.ctx.run_id, self.ctx.nonce
        ));
        let fin = self
            .base
            .path(&format!("run_id={}/part-{n}.parquet", self.ctx.run_id));
        let w = BufWriter::new(self.base.store.clone(), tmp.clone());
        let w = AsyncArrowWriter::try_new(w, self.ctx.schema.clone(), Some(Self::properties()))
            .map_err(|e| self.err("open", e.to_string()))?;
        self.writer = Some(w);
        self.parts.push((tmp, fin));
        Ok(())
    }
}

#[async_trait]
impl Sink for ParquetSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        if self.base.is_local {
            return Ok(());
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
        if let Err(e) = w.write(batch).await {
            return Err(self.err("write", e.to_string()));
        }
        self.rows_in_file += batch.num_rows() as u64;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.close_current().await?;
        Ok(SinkReceipt {
            target: self.base.original.clone(),
            rows: self.rows,
            outputs: self
                .parts
                .iter()
                .map(|(t, _)| self.base.display_path(t))
                .collect(),
        })
    }

    async fn publish(&mut self) -> Result<SinkReceipt, SinkError> {
        for (tmp, fin) in &self.parts {
            self.base
                .store
                .rename(tmp, fin)
                .await
                .map_err(|e| self.err("rename to final name", store_error_line(&e)))?;
        }
        self.published = true;
        self.remove_empty_tmp_dirs();
        Ok(SinkReceipt {
            target: self.base.original.clone(),
            rows: self.rows,
            outputs: self
                .parts
                .iter()
                .map(|(_, f)| self.base.display_path(f))
                .collect(),
        })
    }

    async fn abort(&mut self) {
        // Drop an open upload; delete temporaries. Best effort: what
        // remains is ignored by readers and removed by `state gc`.
        if let Some(w) = self.writer.take() {
            drop(w);
        }
        if !self.published {
            for (tmp, _) in &self.parts {
                let _ = self.base.store.delete(tmp).await;
            }
        }
        self.remove_empty_tmp_dirs();
    }
}
