//! Read errors that name their file. DataFusion's Parquet scan reports a
//! data page that fails to decompress or decode as a bare Parquet error:
//! it knows the file, but does not say it, and a run over ten thousand
//! files that fails with "snappy: corrupt input" is no help at 3 a.m.
//!
//! [`NamedFiles`] wraps the `archive` table; its scan wraps DataFusion's in
//! [`NamedScanExec`], which passes batches through untouched and, when the
//! scan fails, reads the files of the failing partition again with the
//! Parquet reader alone (the scan's own columns only) to find the one that
//! fails, and reports it. Diagnosis runs only on the failure path, so a
//! healthy scan costs nothing; plan rewrites (filters, repartitioning) pass
//! through to the scan below. It never changes a batch and never hides an
//! error: when no file fails on its own, the original error stands.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterDescription, FilterPushdownPhase, FilterPushdownPropagation,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

use super::SourceError;

/// One file the table reads: its store, path and the name errors use.
#[derive(Debug, Clone)]
pub struct NamedFile {
    pub store: Arc<dyn ObjectStore>,
    pub meta: object_store::ObjectMeta,
    pub display: String,
}

/// The `archive` table, whose scan errors name their file.
#[derive(Debug)]
pub struct NamedFiles {
    inner: Arc<dyn TableProvider>,
    files: Arc<Vec<NamedFile>>,
    /// With positions: the function from a file's path to its ordinal,
    /// and the schema with [`FILE_COLUMN`] and [`ROW_COLUMN`] appended.
    positions: Option<(datafusion::logical_expr::ScalarUDF, SchemaRef)>,
}

/// The file's ordinal of each row, in a table [`NamedFiles::with_positions`].
pub const FILE_COLUMN: &str = "backfill_file";
/// The row's index in its file, in a table [`NamedFiles::with_positions`].
pub const ROW_COLUMN: &str = "backfill_row";

impl NamedFiles {
    pub fn new(inner: Arc<dyn TableProvider>, files: Vec<NamedFile>) -> Self {
        NamedFiles {
            inner,
            files: Arc::new(files),
            positions: None,
        }
    }

    /// The table with two more columns, where each row is archived:
    /// [`FILE_COLUMN`], `file_ordinal(input_file_name())`, and
    /// [`ROW_COLUMN`], `file_row_index()`. The scan computes them itself,
    /// in the Parquet reader: DataFusion evaluates both functions there
    /// alone, and a projection above the scan reaches it only when no
    /// other projection is in the way (common-expression elimination over
    /// a view that computes columns puts one there, and the query then
    /// fails with "input_file_name() is source dependent").
    pub fn with_positions(mut self, file_ordinal: datafusion::logical_expr::ScalarUDF) -> Self {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.inner.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            FILE_COLUMN,
            arrow::datatypes::DataType::UInt32,
            true,
        )));
        fields.push(Arc::new(arrow::datatypes::Field::new(
            ROW_COLUMN,
            arrow::datatypes::DataType::Int64,
            true,
        )));
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        self.positions = Some((file_ordinal, schema));
        self
    }

    /// `inner`, the scan of the file's own columns of `wanted` (indices of
    /// [`NamedFiles::with_positions`]'s schema), with the projection of
    /// `wanted`, the position columns included, moved into it.
    fn positions_projected(
        &self,
        state: &dyn Session,
        file_ordinal: &datafusion::logical_expr::ScalarUDF,
        inner: Arc<dyn ExecutionPlan>,
        wanted: &[usize],
    ) -> Result<Arc<dyn ExecutionPlan>> {
        use datafusion::functions::core::expr_fn::{file_row_index, input_file_name};
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        let schema = self.inner.schema();
        let n = schema.fields().len();
        let df_schema = datafusion::common::DFSchema::try_from(inner.schema().as_ref().clone())?;
        let mut exprs = vec![];
        for i in wanted {
            let (expr, name) = match i.checked_sub(n) {
                None => {
                    let name = schema.field(*i).name();
                    (
                        datafusion::logical_expr::col(super::quoted(name)),
                        name.clone(),
                    )
                }
                Some(0) => (
                    file_ordinal.call(vec![input_file_name()]),
                    FILE_COLUMN.to_string(),
                ),
                Some(_) => (
                    datafusion::logical_expr::cast(
                        file_row_index(),
                        arrow::datatypes::DataType::Int64,
                    ),
                    ROW_COLUMN.to_string(),
                ),
            };
            exprs.push(ProjectionExpr {
                expr: state.create_physical_expr(expr, &df_schema)?,
                alias: name,
            });
        }
        let projection = ProjectionExec::try_new(exprs, inner.clone())?;
        match inner.try_swapping_with_projection(&projection)? {
            Some(scan) => Ok(scan),
            // No file left to list (the archive changed under the run):
            // the table's scan is empty, and so is this one; the fetch then
            // says the archive changed.
            None if inner.downcast_ref::<DataSourceExec>().is_none() => Ok(Arc::new(
                datafusion::physical_plan::empty::EmptyExec::new(projection.schema()),
            )),
            None => Err(DataFusionError::Internal(format!(
                "the archive's scan ({}) did not take the positions' projection",
                inner.name()
            ))),
        }
    }
}

#[async_trait]
impl TableProvider for NamedFiles {
    fn schema(&self) -> SchemaRef {
        match &self.positions {
            Some((_, schema)) => schema.clone(),
            None => self.inner.schema(),
        }
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let n = schema.fields().len();
        // The file's own columns the scan reads: the position columns are
        // computed.
        let own: Option<Vec<usize>> = match (&self.positions, projection) {
            (None, p) => p.cloned(),
            (Some(_), Some(p)) => Some(p.iter().copied().filter(|i| *i < n).collect()),
            (Some(_), None) => Some((0..n).collect()),
        };
        // Planning reads each file's metadata again, page index included
        // (statistics for pruning): a corrupt index fails here, before any
        // stream exists, and is named the same way.
        let mut inner = match self.inner.scan(state, own.as_ref(), filters, limit).await {
            Ok(p) => p,
            Err(e) if is_data_error(&e) => {
                // No columns: the metadata alone is read again.
                return Err(match find_corrupt(&self.files, &[]).await {
                    Some(named) => DataFusionError::External(Box::new(named)),
                    None => e,
                });
            }
            Err(e) => return Err(e),
        };
        if let Some((file_ordinal, _)) = &self.positions {
            let wanted = projection.cloned().unwrap_or_else(|| (0..n + 2).collect());
            inner = self.positions_projected(state, file_ordinal, inner, &wanted)?;
        }
        let columns: Vec<String> = match own {
            Some(p) => p
                .iter()
                .filter_map(|i| schema.fields().get(*i).map(|f| f.name().clone()))
                .collect(),
            None => schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        Ok(Arc::new(NamedScanExec {
            inner,
            files: self.files.clone(),
            columns: Arc::new(columns),
        }))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // A filter on a position column stays above the scan: the file
        // table below does not have them.
        let positional = |f: &Expr| {
            self.positions.is_some()
                && f.column_refs()
                    .iter()
                    .any(|c| c.name == FILE_COLUMN || c.name == ROW_COLUMN)
        };
        let own: Vec<&Expr> = filters.iter().copied().filter(|f| !positional(f)).collect();
        let mut answers = self.inner.supports_filters_pushdown(&own)?.into_iter();
        filters
            .iter()
            .map(|f| {
                if positional(f) {
                    Ok(TableProviderFilterPushDown::Unsupported)
                } else {
                    answers.next().ok_or_else(|| {
                        DataFusionError::Internal("a filter without an answer".into())
                    })
                }
            })
            .collect()
    }
}

/// DataFusion's scan, with errors that name the file at fault.
#[derive(Debug, Clone)]
pub struct NamedScanExec {
    inner: Arc<dyn ExecutionPlan>,
    files: Arc<Vec<NamedFile>>,
    /// The columns the scan reads, for the diagnosis to read the same.
    columns: Arc<Vec<String>>,
}

impl NamedScanExec {
    fn with_inner(&self, inner: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        Arc::new(NamedScanExec {
            inner,
            files: self.files.clone(),
            columns: self.columns.clone(),
        })
    }

    /// The files partition `partition` reads, when the scan below says;
    /// otherwise every file of the table.
    fn partition_files(&self, partition: usize) -> Vec<NamedFile> {
        let paths: Option<Vec<Path>> = self
            .inner
            .downcast_ref::<DataSourceExec>()
            .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>())
            .and_then(|c| c.file_groups.get(partition))
            .map(|g| {
                g.files()
                    .iter()
                    .map(|f| f.object_meta.location.clone())
                    .collect()
            });
        match paths {
            Some(paths) => self
                .files
                .iter()
                .filter(|f| paths.contains(&f.meta.location))
                .cloned()
                .collect(),
            None => self.files.as_ref().clone(),
        }
    }
}

impl DisplayAs for NamedScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "NamedScanExec")
    }
}

#[allow(deprecated)]
impl ExecutionPlan for NamedScanExec {
    fn name(&self) -> &'static str {
        "NamedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.inner]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(inner), true) => Ok(self.with_inner(inner)),
            _ => Err(DataFusionError::Internal(
                "NamedScanExec takes exactly one child".into(),
            )),
        }
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    /// The scan's statistics, so that `max(event_time)` and `count(*)` over
    /// the whole archive are answered from the footers, as without the
    /// wrapper, not by reading a column.
    fn child_stats_requests(
        &self,
        partition: Option<usize>,
    ) -> Vec<datafusion::physical_plan::ChildStats> {
        vec![datafusion::physical_plan::ChildStats::At(partition)]
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<datafusion::common::Statistics>],
        _args: &datafusion::physical_plan::StatisticsArgs,
    ) -> Result<Arc<datafusion::common::Statistics>> {
        Ok(match input_stats.first() {
            Some(s) => s.clone(),
            None => Arc::new(datafusion::common::Statistics::new_unknown(&self.schema())),
        })
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn repartitioned(
        &self,
        target_partitions: usize,
        config: &ConfigOptions,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        Ok(self
            .inner
            .repartitioned(target_partitions, config)?
            .map(|inner| self.with_inner(inner)))
    }

    /// A projection moves into the scan below, as it would without this
    /// wrapper: DataFusion rewrites `input_file_name()` and
    /// `file_row_index()` into the Parquet reader's own columns only there
    /// (above the wrapper they failed, "source dependent and cannot be
    /// evaluated directly"), and a scan that computes its projection
    /// decodes only what it needs.
    fn try_swapping_with_projection(
        &self,
        projection: &datafusion::physical_plan::projection::ProjectionExec,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        Ok(self
            .inner
            .try_swapping_with_projection(projection)?
            .map(|inner| self.with_inner(inner)))
    }

    fn gather_filters_for_pushdown(
        &self,
        _phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterDescription> {
        FilterDescription::from_children(parent_filters, &self.children())
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        Ok(FilterPushdownPropagation::if_all(child_pushdown_result))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let stream = self.inner.execute(partition, context)?;
        let schema = stream.schema();
        // The partition's own files first; then every other file of the
        // table: DataFusion may hand a file planned for one partition to
        // another that is idle (seen under load), so the failing file is not
        // always in the partition's planned group.
        let mut files = self.partition_files(partition);
        let rest: Vec<NamedFile> = self
            .files
            .iter()
            .filter(|f| !files.iter().any(|g| g.meta.location == f.meta.location))
            .cloned()
            .collect();
        files.extend(rest);
        let files = Arc::new(files);
        let columns = self.columns.clone();
        let named = stream.then(move |r| {
            let (files, columns) = (files.clone(), columns.clone());
            async move {
                match r {
                    Ok(b) => Ok(b),
                    Err(e) if !is_data_error(&e) => Err(e),
                    Err(e) => match find_corrupt(&files, &columns).await {
                        Some(named) => Err(DataFusionError::External(Box::new(named))),
                        None => Err(e),
                    },
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, named)))
    }
}

/// Errors a file's bytes can cause (not memory, cancellation or plans).
fn is_data_error(e: &DataFusionError) -> bool {
    use DataFusionError as D;
    match e {
        D::ParquetError(_) | D::ArrowError(..) | D::External(_) | D::IoError(_) => true,
        D::ObjectStore(_) | D::Execution(_) => true,
        D::Context(_, inner) | D::Diagnostic(_, inner) => is_data_error(inner),
        D::Shared(inner) => is_data_error(inner),
        _ => false,
    }
}

/// The first of `files` that fails to read on its own (its footer and page
/// index, then `columns` only; none: the metadata alone), as an error
/// naming it.
#[allow(deprecated)]
pub async fn find_corrupt(files: &[NamedFile], columns: &[String]) -> Option<SourceError> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
    for f in files {
        let corrupt = |e: &dyn fmt::Display| SourceError::Corrupt {
            file: f.display.clone(),
            message: e.to_string().replace('\n', " "),
        };
        let reader = ParquetObjectReader::new(f.store.clone(), f.meta.location.clone())
            .with_file_size(f.meta.size);
        // With the page index, as the scan reads it: a corrupt index is
        // found here too (it failed the scan, and this reader without it
        // read the file fine).
        let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional);
        let builder = match ParquetRecordBatchStreamBuilder::new_with_options(reader, options).await
        {
            Ok(b) => b,
            Err(e) => return Some(corrupt(&e)),
        };
        let roots: Vec<usize> = builder
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, fl)| columns.contains(fl.name()))
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let mut stream = match builder.with_projection(mask).build() {
            Ok(s) => s,
            Err(e) => return Some(corrupt(&e)),
        };
        while let Some(b) = stream.next().await {
            if let Err(e) = b {
                return Some(corrupt(&e));
            }
        }
    }
    None
}
