//! `-` as a sink: rows as JSON lines on stdout, for piping into jq or a
//! producer of the user's choice.
//!
//! Rows are printed only after the run's commit: until then they wait in an
//! anonymous temporary file (deleted by the OS however the process ends), so
//! a failed or conflicting run prints nothing. The price is that a crash
//! between the commit and the print loses the printed copy: stdout cannot be
//! read again, so this sink is at-most-once; use a Parquet or Kafka sink for
//! anything that must survive a crash.

use std::io::{Seek, Write};

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use super::{Sink, SinkContext, SinkError, SinkReceipt};

pub struct StdoutSink {
    ctx: SinkContext,
    rows: u64,
    /// JSON lines waiting for the commit; opened on the first row.
    pending: Option<std::io::BufWriter<std::fs::File>>,
}

impl StdoutSink {
    pub fn new(ctx: SinkContext) -> Self {
        StdoutSink {
            ctx,
            rows: 0,
            pending: None,
        }
    }

    fn err(&self, operation: &'static str, message: String) -> SinkError {
        SinkError::Io {
            kind: self.ctx.kind.name(),
            target: "-".into(),
            operation,
            message,
        }
    }

    fn receipt(&self) -> SinkReceipt {
        SinkReceipt {
            target: "-".into(),
            rows: self.rows,
            outputs: vec![],
            staged: None,
            delivered: None,
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.pending.is_none() {
            let f = tempfile::tempfile()
                .map_err(|e| self.err("open a temporary file", e.to_string()))?;
            self.pending = Some(std::io::BufWriter::new(f));
        }
        let result = match self.pending.as_mut() {
            Some(out) => {
                let mut w = arrow::json::LineDelimitedWriter::new(out);
                w.write(batch).and_then(|_| w.finish())
            }
            None => Ok(()),
        };
        result.map_err(|e| self.err("buffer", e.to_string()))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        if let Some(out) = self.pending.as_mut() {
            out.flush().map_err(|e| self.err("buffer", e.to_string()))?;
        }
        Ok(self.receipt())
    }

    async fn publish(&mut self) -> Result<(), SinkError> {
        let Some(buf) = self.pending.take() else {
            return Ok(());
        };
        let mut file = buf
            .into_inner()
            .map_err(|e| self.err("buffer", e.to_string()))?;
        file.rewind()
            .map_err(|e| self.err("buffer", e.to_string()))?;
        let mut out = std::io::stdout().lock();
        match std::io::copy(&mut file, &mut out).and_then(|_| out.flush()) {
            Ok(_) => Ok(()),
            // A closed pipe (`| head`) is the reader's choice, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(self.err("write", e.to_string())),
        }
    }

    async fn abort(&mut self) {
        self.pending = None;
    }
}
