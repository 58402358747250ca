//! What a plan of ours carries beyond stock DataFusion, on the wire between
//! the client, the scheduler and the executors: Ballista's own codecs,
//! wrapped so that they also carry
//! - our scalar functions: `backfill_in_window` (the window's exact bounds
//!   on an archive of mixed time units; its bounds are its state and
//!   travel with it) and `backfill_shard` (stateless: found by name);
//! - small in-memory tables (an empty ledger, a table of counts), as Arrow
//!   IPC inside the plan. A large one would make the plan large: the
//!   tables the run reads in bulk (the archive, the ledger files) are
//!   listing tables, which stock DataFusion serializes as their file lists.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan, ScalarUDF, WindowUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

/// Marks a table provider of ours in a plan (the bytes after it: IPC).
const MEM_TABLE: &[u8] = b"backfill-memtable\0";

/// Our scalar functions, for a registry that must know them by name.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    vec![Arc::new(crate::shard::udf())]
}

fn encode_udf(node: &ScalarUDF, buf: &mut Vec<u8>) -> Option<Result<()>> {
    let (from, to) = crate::source::in_window_bounds(node)?;
    let bounds = serde_json::json!({ "from": from, "to": to });
    buf.extend_from_slice(bounds.to_string().as_bytes());
    Some(Ok(()))
}

fn decode_udf(name: &str, buf: &[u8]) -> Option<Result<Arc<ScalarUDF>>> {
    match name {
        "backfill_shard" => Some(Ok(Arc::new(crate::shard::udf()))),
        "backfill_in_window" => Some((|| {
            let v: serde_json::Value = serde_json::from_slice(buf).map_err(|e| {
                DataFusionError::Internal(format!("backfill_in_window's bounds: {e}"))
            })?;
            let bound = |k: &str| v.get(k).and_then(|x| x.as_i64());
            Ok(Arc::new(crate::source::in_window_udf(
                bound("from"),
                bound("to"),
            )))
        })()),
        _ => None,
    }
}

fn encode_mem_table(table: &MemTable, buf: &mut Vec<u8>) -> Result<()> {
    let schema: SchemaRef = table.schema();
    let mut batches: Vec<RecordBatch> = vec![];
    for part in &table.batches {
        let rows = part
            .try_read()
            .map_err(|_| DataFusionError::Internal("an in-memory table is being written".into()))?;
        batches.extend(rows.iter().cloned());
    }
    buf.extend_from_slice(MEM_TABLE);
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut *buf, &schema)?;
    for b in &batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(())
}

fn decode_mem_table(buf: &[u8], schema: SchemaRef) -> Result<Arc<dyn TableProvider>> {
    let r = arrow::ipc::reader::StreamReader::try_new(buf, None)?;
    let batches = r.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// Ballista's logical codec, and ours.
#[derive(Debug, Default)]
pub struct Logical {
    inner: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for Logical {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        match buf.strip_prefix(MEM_TABLE) {
            Some(ipc) => decode_mem_table(ipc, schema),
            None => self
                .inner
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match node.downcast_ref::<MemTable>() {
            Some(t) => encode_mem_table(t, buf),
            None => self
                .inner
                .try_encode_table_provider(table_ref, node, buf)
                .map_err(|e| {
                    DataFusionError::NotImplemented(format!(
                        "the table {table_ref} cannot be sent to a cluster ({e})"
                    ))
                }),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        decode_udf(name, buf).unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        encode_udf(node, buf).unwrap_or_else(|| self.inner.try_encode_udf(node, buf))
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

/// Ballista's physical codec (its shuffle nodes), and our functions.
#[derive(Debug, Default)]
pub struct Physical {
    inner: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for Physical {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.inner.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        self.inner.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        decode_udf(name, buf).unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        encode_udf(node, buf).unwrap_or_else(|| self.inner.try_encode_udf(node, buf))
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn in_window_bounds_and_small_tables_survive_the_wire() {
        let udf = crate::source::in_window_udf(Some(-5), None);
        let mut buf = vec![];
        Logical::default().try_encode_udf(&udf, &mut buf).unwrap();
        assert!(!buf.is_empty());
        let back = Physical::default()
            .try_decode_udf("backfill_in_window", &buf)
            .unwrap();
        assert_eq!(
            crate::source::in_window_bounds(&back),
            Some((Some(-5), None))
        );
        // backfill_shard has no state: nothing written, found by name.
        let mut buf = vec![];
        Logical::default()
            .try_encode_udf(&crate::shard::udf(), &mut buf)
            .unwrap();
        assert!(buf.is_empty());
        assert_eq!(
            Logical::default()
                .try_decode_udf("backfill_shard", &[])
                .unwrap()
                .name(),
            "backfill_shard"
        );

        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a/1", "b@2"])),
                Arc::new(Int64Array::from(vec![Some(1), None])),
            ],
        )
        .unwrap();
        let table: Arc<dyn TableProvider> =
            Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch.clone()], vec![]]).unwrap());
        let codec = Logical::default();
        let mut buf = vec![];
        codec
            .try_encode_table_provider(&TableReference::bare("t"), table, &mut buf)
            .unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        let back = codec
            .try_decode_table_provider(&buf, &TableReference::bare("t"), schema, &ctx.task_ctx())
            .unwrap();
        let back = back.downcast_ref::<MemTable>().unwrap();
        let rows = back.batches[0].try_read().unwrap().clone();
        assert_eq!(rows, vec![batch]);
    }
}
