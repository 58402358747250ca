//! `-` as a sink: rows as JSON lines on stdout, for piping into jq or a
//! producer of the user's choice. Nothing to publish or undo.

use std::io::Write;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use super::{Sink, SinkContext, SinkError, SinkReceipt};

pub struct StdoutSink {
    ctx: SinkContext,
    rows: u64,
}

impl StdoutSink {
    pub fn new(ctx: SinkContext) -> Self {
        StdoutSink { ctx, rows: 0 }
    }

    fn err(&self, message: String) -> SinkError {
        SinkError::Io {
            kind: self.ctx.kind.name(),
            target: "-".into(),
            operation: "write",
            message,
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            w.write(batch).map_err(|e| self.err(e.to_string()))?;
            w.finish().map_err(|e| self.err(e.to_string()))?;
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&buf).map_err(|e| self.err(e.to_string()))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        std::io::stdout()
            .flush()
            .map_err(|e| self.err(e.to_string()))?;
        Ok(self.receipt())
    }

    async fn publish(&mut self) -> Result<SinkReceipt, SinkError> {
        Ok(self.receipt())
    }

    async fn abort(&mut self) {}
}

impl StdoutSink {
    fn receipt(&self) -> SinkReceipt {
        SinkReceipt {
            target: "-".into(),
            rows: self.rows,
            outputs: vec![],
        }
    }
}
