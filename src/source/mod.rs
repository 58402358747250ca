//! The archive as DataFusion tables: `archive` (every file, as stored) and
//! `events` (the window, with the input contract's column names).
//!
//! We list the files ourselves rather than let DataFusion infer them, because
//! we need what it cannot give: hive partitions pruned by the window before
//! their folders are listed, a schema merged across *every* file (DataFusion
//! infers from the first), the corrupt file named before the scan starts,
//! zero-byte files skipped, and exact counts for the report. DataFusion then
//! gets the explicit file list and the merged schema and does the scan, with
//! the window pushed into Parquet row-group pruning.
//!
//! Never reads data with std::fs: every byte comes through the location's
//! object store.

pub mod partitions;

pub use partitions::partition_granularity;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::logical_expr::{Expr, cast, col, lit};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};
// ParquetObjectReader is deprecated in parquet 59 in favour of hand-written
// AsyncFileReaders; it still does exactly what footer reads need.
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use serde::Serialize;

use crate::job::{Columns, PartitionSpec, Scan};
use crate::location::{self, Location, LocationError};

/// Errors reading the archive. `is_config` tells usage errors (exit 2)
/// from runtime ones (exit 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("source {location}: no such file or directory")]
    NotFound { location: String },
    #[error("source {location}: no .parquet files found")]
    Empty { location: String },
    #[error("source {location}: cannot list: {message}")]
    List { location: String, message: String },
    #[error("corrupt or unreadable Parquet file {file}: {message}")]
    Corrupt { file: String, message: String },
    #[error("column '{column}' has type {first} in {first_file} but {second} in {second_file}")]
    Incompatible {
        column: String,
        first: DataType,
        first_file: String,
        second: DataType,
        second_file: String,
    },
    #[error("required column '{column}' ({role}) is missing from the archive {location}{hint}")]
    MissingColumn {
        column: String,
        role: &'static str,
        location: String,
        hint: String,
    },
    #[error("column '{column}' ({role}) has type {found}; expected {expected}")]
    WrongType {
        column: String,
        role: &'static str,
        found: DataType,
        expected: &'static str,
    },
    #[error("source {location}: {message}")]
    Unsupported { location: String, message: String },
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error("query engine: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

impl SourceError {
    /// True when the user's input or settings are at fault (exit 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            SourceError::Location(_)
                | SourceError::NotFound { .. }
                | SourceError::Empty { .. }
                | SourceError::MissingColumn { .. }
                | SourceError::WrongType { .. }
                | SourceError::Unsupported { .. }
        ) || matches!(self, SourceError::Kafka(k) if k.is_config())
    }
}

/// One archive file, listed and footer-read.
#[derive(Debug, Clone)]
pub struct ArchiveFile {
    pub meta: ObjectMeta,
    pub url: String,
    pub rows: i64,
    pub row_groups: usize,
    /// event_time range from the footer's row-group statistics, in UTC
    /// microseconds; None when a row group has no statistics.
    pub time_range: Option<(i64, i64)>,
}

impl ArchiveFile {
    /// Can this file hold rows inside [from, to)? Decided from the footer
    /// alone, so a file outside the window is never read past its footer.
    fn may_overlap(&self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> bool {
        let Some((min, max)) = self.time_range else {
            return true;
        };
        if let Some(f) = from
            && max < f.timestamp_micros()
        {
            return false;
        }
        if let Some(t) = to
            && min >= t.timestamp_micros()
        {
            return false;
        }
        true
    }
}

/// What listing the archive found, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanStats {
    /// Files the scan reads (after partition pruning).
    pub files_scanned: u64,
    /// Files skipped because their partition lies outside the window.
    pub files_pruned: u64,
    /// Partition folders skipped without being listed.
    pub partitions_pruned: u64,
    /// Zero-byte files skipped.
    pub empty_files_skipped: u64,
    /// Row groups in the scanned files.
    pub row_groups: u64,
    /// Bytes of the scanned files.
    pub bytes_total: u64,
    /// Messages read from Kafka sources (rows plus undecodable).
    pub kafka_messages: u64,
}

/// The registered archive: what the views need to know about it.
#[derive(Debug, Clone)]
pub struct Archive {
    /// The merged schema of all files, as stored.
    pub schema: SchemaRef,
    pub files: Vec<ArchiveFile>,
    pub stats: ScanStats,
    /// Canonical columns that the source lacks and `events` fills with NULL.
    pub synthesized: Vec<&'static str>,
    /// Source column names, in archive order, that outputs carry.
    pub source_columns: Vec<String>,
    /// Messages of Kafka sources that did not decode: dead-lettered as
    /// `undecodable`, keyed by the source URL.
    pub undecodable: Vec<(String, crate::kafka::source::Undecodable)>,
}

/// The session settings every command shares: Utf8 (not views) so that the
/// policy kernels and outputs see the archive's own types; pushdown and
/// page-index pruning on; a memory pool that spills instead of failing.
pub fn session(scan: &Scan) -> Result<SessionContext, SourceError> {
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::prelude::SessionConfig;
    let mut config = SessionConfig::new()
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .with_batch_size(8192)
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .set_bool("datafusion.execution.parquet.pushdown_filters", false)
        .set_bool("datafusion.execution.parquet.enable_page_index", true)
        .set_bool("datafusion.execution.parquet.pruning", true)
        .set_bool("datafusion.sql_parser.enable_ident_normalization", true);
    config.options_mut().execution.parquet.binary_as_string = false;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(scan.memory_limit, 1.0)
        .build_arc()?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

/// List, footer-read, merge and validate the archive; register `archive`
/// and `events` in `ctx`.
pub async fn register(ctx: &SessionContext, scan: &Scan) -> Result<Archive, SourceError> {
    let mut all_files = Vec::new();
    let mut stats = ScanStats::default();
    let mut pruned_sample: Option<ArchiveFile> = None;
    let mut first_loc: Option<Location> = None;
    let mut kafka_sources: Vec<String> = vec![];
    for src in &scan.sources {
        if src.starts_with("kafka://") {
            kafka_sources.push(src.clone());
            continue;
        }
        let loc = location::resolve(src, &scan.storage)?;
        loc.register(ctx);
        let listing = list_archive(&loc, &scan.partitions, scan.from, scan.to).await?;
        if listing.files.is_empty() && listing.pruned.is_empty() {
            return Err(SourceError::Empty {
                location: loc.original.clone(),
            });
        }
        stats.files_pruned += listing.pruned.len() as u64;
        stats.partitions_pruned += listing.partitions_pruned;
        stats.empty_files_skipped += listing.empty_skipped;
        for f in &listing.empty_files {
            eprintln!("warning: skipping zero-byte file {}", loc.display_path(f));
        }
        if pruned_sample.is_none()
            && let Some(p) = listing.pruned.first()
        {
            pruned_sample = Some(read_footer(&loc, p.clone(), &scan.columns.event_time).await?);
        }
        let metas: Vec<ArchiveFile> = futures::stream::iter(listing.files)
            .map(|m| read_footer(&loc, m, &scan.columns.event_time))
            .buffer_unordered(16)
            .try_collect()
            .await?;
        for f in metas {
            if f.may_overlap(scan.from, scan.to) {
                all_files.push(f);
            } else {
                stats.files_pruned += 1;
                if pruned_sample.is_none() {
                    pruned_sample = Some(f);
                }
            }
        }
        first_loc.get_or_insert(loc);
    }
    // Deterministic order: the merged schema must not depend on listing order.
    all_files.sort_by(|a, b| a.url.cmp(&b.url));
    stats.files_scanned = all_files.len() as u64;
    stats.row_groups = all_files.iter().map(|f| f.row_groups as u64).sum();
    stats.bytes_total = all_files.iter().map(|f| f.meta.size).sum();

    let file_schema = match &first_loc {
        Some(loc) => {
            let schema_files: Vec<&ArchiveFile> = if all_files.is_empty() {
                pruned_sample.iter().collect()
            } else {
                all_files.iter().collect()
            };
            Some(merge_schemas(loc, &schema_files).await?)
        }
        None => None,
    };

    // Kafka sources: what the topics still retain inside the window, decoded
    // with the archive's schema when there is one, so both sides line up.
    let kafka_settings = scan.kafka.clone().unwrap_or_default();
    let mut reads = vec![];
    let mut undecodable = vec![];
    for url in &kafka_sources {
        let hint = file_schema.as_ref().map(|s| all_nullable(s));
        let read = crate::kafka::source::read_topic(url, scan.from, scan.to, &kafka_settings, hint)
            .await?;
        stats.kafka_messages += read.messages;
        undecodable.extend(read.undecodable.iter().cloned().map(|u| (url.clone(), u)));
        let batches = coerce_event_time(&read.schema, read.batches, &scan.columns.event_time)?;
        let schema = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| coerce_event_time_schema(&read.schema, &scan.columns.event_time));
        reads.push((url.clone(), schema, batches));
    }

    let mut all_schemas: Vec<(String, SchemaRef)> = vec![];
    if let Some(s) = &file_schema {
        all_schemas.push(("the archive files".into(), s.clone()));
    }
    for (url, schema, _) in &reads {
        all_schemas.push((url.clone(), schema.clone()));
    }
    let location_name = first_loc
        .as_ref()
        .map(|l| l.original.clone())
        .unwrap_or_else(|| kafka_sources.join(","));
    let mut schema = if all_schemas.len() == 1 {
        all_schemas[0].1.clone()
    } else {
        merge(&all_schemas)?
    };
    if !reads.is_empty() {
        // Union members must agree on nullability; Kafka rows may lack any column.
        schema = all_nullable(&schema);
    }
    let synthesized = validate(&schema, scan, &location_name)?;

    let files_table = archive_table(ctx, &schema, &all_files)?;
    if reads.is_empty() {
        ctx.register_table("archive", files_table)?;
    } else {
        // One union: the lake for what Kafka no longer has, the topics for
        // the recent part; the decision rules tolerate the same event twice.
        ctx.register_table("archive_files", files_table)?;
        let mut df = ctx.table("archive_files").await?;
        for (i, (_, _, batches)) in reads.iter().enumerate() {
            let adapted = batches
                .iter()
                .map(|b| adapt_batch(b, &schema))
                .collect::<Result<Vec<_>, _>>()?;
            let t = datafusion::datasource::MemTable::try_new(schema.clone(), vec![adapted])?;
            let name = format!("archive_kafka_{i}");
            ctx.register_table(name.as_str(), Arc::new(t))?;
            df = df.union(ctx.table(name.as_str()).await?)?;
        }
        ctx.register_table("archive", df.into_view())?;
    }
    let source_columns = schema.fields().iter().map(|f| f.name().clone()).collect();
    let archive = Archive {
        schema,
        files: all_files,
        stats,
        synthesized,
        source_columns,
        undecodable,
    };
    register_events(ctx, scan, &archive).await?;
    Ok(archive)
}

/// The `archive` table over an explicit file list and the merged schema.
fn archive_table(
    _ctx: &SessionContext,
    schema: &SchemaRef,
    files: &[ArchiveFile],
) -> Result<Arc<dyn datafusion::catalog::TableProvider>, SourceError> {
    if files.is_empty() {
        let empty = datafusion::datasource::MemTable::try_new(schema.clone(), vec![vec![]])?;
        return Ok(Arc::new(empty));
    }
    let urls = files
        .iter()
        .map(|f| ListingTableUrl::parse(&f.url))
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let format = ParquetFormat::default().with_enable_pruning(true);
    let options = ListingOptions::new(Arc::new(format)).with_file_extension("");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema.clone());
    Ok(Arc::new(ListingTable::try_new(config)?))
}

struct Listing {
    files: Vec<ObjectMeta>,
    pruned: Vec<ObjectMeta>,
    empty_files: Vec<Path>,
    empty_skipped: u64,
    partitions_pruned: u64,
}

/// Walk the archive folder by folder, skipping `_`/`.` entries and pruning
/// declared hive partitions outside the window before listing below them.
async fn list_archive(
    loc: &Location,
    partitions: &[PartitionSpec],
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Listing, SourceError> {
    let mut out = Listing {
        files: vec![],
        pruned: vec![],
        empty_files: vec![],
        empty_skipped: 0,
        partitions_pruned: 0,
    };
    let list_err = |e: object_store::Error| SourceError::List {
        location: loc.original.clone(),
        message: crate::location::store_error_line(&e),
    };
    // A location naming a single file.
    if loc.prefix.as_ref().ends_with(".parquet") {
        use object_store::ObjectStoreExt;
        return match loc.store.head(&loc.prefix).await {
            Ok(m) => {
                if m.size == 0 {
                    out.empty_skipped += 1;
                    out.empty_files.push(m.location);
                } else {
                    out.files.push(m);
                }
                Ok(out)
            }
            Err(object_store::Error::NotFound { .. }) => Err(SourceError::NotFound {
                location: loc.original.clone(),
            }),
            Err(e) => Err(list_err(e)),
        };
    }
    if loc.is_local {
        let p = std::path::PathBuf::from(format!("/{}", loc.prefix));
        if !p.exists() {
            return Err(SourceError::NotFound {
                location: loc.original.clone(),
            });
        }
    }
    // (prefix, known partition values so far)
    let mut stack: Vec<(Path, Vec<(String, String)>)> = vec![(loc.prefix.clone(), vec![])];
    while let Some((prefix, values)) = stack.pop() {
        let res = loc
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(list_err)?;
        for dir in res.common_prefixes {
            let name = dir.filename().unwrap_or_default().to_string();
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            let mut v = values.clone();
            if let Some((k, val)) = name.split_once('=')
                && partitions.iter().any(|p| p.name == k)
            {
                v.push((k.to_string(), val.to_string()));
                if !partitions::overlaps(partitions, &v, from, to) {
                    out.partitions_pruned += 1;
                    // Count its files for the report without reading them.
                    let mut s = loc.store.list(Some(&dir));
                    while let Some(m) = s.next().await {
                        let m = m.map_err(list_err)?;
                        if is_data_file(&m.location) && m.size > 0 {
                            out.pruned.push(m);
                        }
                    }
                    continue;
                }
            }
            stack.push((dir, v));
        }
        for m in res.objects {
            if !is_data_file(&m.location) {
                continue;
            }
            if m.size == 0 {
                out.empty_skipped += 1;
                out.empty_files.push(m.location);
                continue;
            }
            out.files.push(m);
        }
    }
    Ok(out)
}

fn is_data_file(p: &Path) -> bool {
    let name = p.filename().unwrap_or_default();
    name.ends_with(".parquet") && !name.starts_with('_') && !name.starts_with('.')
}

#[allow(deprecated)]
async fn read_footer(
    loc: &Location,
    meta: ObjectMeta,
    event_time: &str,
) -> Result<ArchiveFile, SourceError> {
    let display = loc.display_path(&meta.location);
    let reader = ParquetObjectReader::new(loc.store.clone(), meta.location.clone())
        .with_file_size(meta.size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| SourceError::Corrupt {
            file: display.clone(),
            message: e.to_string().replace('\n', " "),
        })?;
    let md = builder.metadata();
    let time_range = footer_time_range(builder.schema(), md, event_time);
    Ok(ArchiveFile {
        time_range,
        rows: md.file_metadata().num_rows(),
        row_groups: md.num_row_groups(),
        url: loc.object_url(&meta.location),
        meta,
    })
}

/// The event_time range of a file from its row-group statistics, in UTC
/// microseconds. None (keep the file) when the column is absent, not a
/// timestamp, or any row group lacks statistics.
fn footer_time_range(
    schema: &Schema,
    md: &parquet::file::metadata::ParquetMetaData,
    event_time: &str,
) -> Option<(i64, i64)> {
    use arrow::array::{Array, AsArray};
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    if md.num_row_groups() == 0 {
        return None;
    }
    let field = schema.field_with_name(event_time).ok()?;
    if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
        return None;
    }
    let conv =
        StatisticsConverter::try_new(event_time, schema, md.file_metadata().schema_descr()).ok()?;
    let to_micros = |a: arrow::array::ArrayRef| -> Option<Vec<i64>> {
        let a = arrow::compute::cast(&a, &DataType::Timestamp(TimeUnit::Microsecond, None)).ok()?;
        let a = a.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        if a.null_count() > 0 {
            return None;
        }
        Some(a.values().to_vec())
    };
    let mins = to_micros(conv.row_group_mins(md.row_groups()).ok()?)?;
    let maxes = to_micros(conv.row_group_maxes(md.row_groups()).ok()?)?;
    Some((*mins.iter().min()?, *maxes.iter().max()?))
}

/// Merge the schemas of every file: union of columns (first-seen order),
/// Int32 widened to Int64, timestamp units unified (finest wins) and zones
/// normalized to UTC, nullable where any file lacks the column.
#[allow(deprecated)]
async fn merge_schemas(loc: &Location, files: &[&ArchiveFile]) -> Result<SchemaRef, SourceError> {
    let schemas: Vec<(String, SchemaRef)> = futures::stream::iter(files.iter().map(|f| {
        let store = loc.store.clone();
        let meta = f.meta.clone();
        let url = f.url.clone();
        async move {
            let reader =
                ParquetObjectReader::new(store, meta.location.clone()).with_file_size(meta.size);
            let b = ParquetRecordBatchStreamBuilder::new(reader)
                .await
                .map_err(|e| SourceError::Corrupt {
                    file: url.clone(),
                    message: e.to_string(),
                })?;
            Ok::<_, SourceError>((url, b.schema().clone()))
        }
    }))
    .buffered(16)
    .try_collect()
    .await?;
    merge(&schemas)
}

/// The pure part of [`merge_schemas`], unit-tested.
pub fn merge(schemas: &[(String, SchemaRef)]) -> Result<SchemaRef, SourceError> {
    let mut order: Vec<String> = vec![];
    let mut fields: BTreeMap<String, (Field, String, usize)> = BTreeMap::new();
    for (file, s) in schemas {
        for f in s.fields() {
            match fields.get_mut(f.name()) {
                None => {
                    order.push(f.name().clone());
                    fields.insert(f.name().clone(), (f.as_ref().clone(), file.clone(), 1));
                }
                Some((existing, first_file, count)) => {
                    *count += 1;
                    let t = unify(existing.data_type(), f.data_type()).ok_or_else(|| {
                        SourceError::Incompatible {
                            column: f.name().clone(),
                            first: existing.data_type().clone(),
                            first_file: first_file.clone(),
                            second: f.data_type().clone(),
                            second_file: file.clone(),
                        }
                    })?;
                    let nullable = existing.is_nullable() || f.is_nullable();
                    *existing = Field::new(f.name(), t, nullable);
                }
            }
        }
    }
    let n = schemas.len();
    let merged: Vec<Field> = order
        .iter()
        .filter_map(|name| fields.remove(name))
        .map(|(f, _, count)| {
            // Types are kept as stored when every file agrees; `unify`
            // only widens (and sets UTC) where files differ.
            let nullable = f.is_nullable() || count < n;
            Field::new(f.name(), f.data_type().clone(), nullable)
        })
        .collect();
    Ok(Arc::new(Schema::new(merged)))
}

fn unify(a: &DataType, b: &DataType) -> Option<DataType> {
    use DataType::*;
    if a == b {
        return Some(a.clone());
    }
    match (a, b) {
        (Int32, Int64) | (Int64, Int32) => Some(Int64),
        (Int16 | Int8, Int32) | (Int32, Int16 | Int8) => Some(Int32),
        (Timestamp(u1, _), Timestamp(u2, _)) => {
            let rank = |u: &TimeUnit| match u {
                TimeUnit::Second => 0,
                TimeUnit::Millisecond => 1,
                TimeUnit::Microsecond => 2,
                TimeUnit::Nanosecond => 3,
            };
            let u = if rank(u1) >= rank(u2) { *u1 } else { *u2 };
            Some(Timestamp(u, Some("UTC".into())))
        }
        (Utf8, LargeUtf8) | (LargeUtf8, Utf8) => Some(LargeUtf8),
        (Binary, LargeBinary) | (LargeBinary, Binary) => Some(LargeBinary),
        _ => None,
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_int(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    )
}

/// Check the input contract; return the optional canonical columns the
/// source lacks.
fn validate(
    schema: &Schema,
    scan: &Scan,
    location: &str,
) -> Result<Vec<&'static str>, SourceError> {
    let seq_needed = scan.detect_gaps || scan.detect_conflicts;
    let mut synthesized = vec![];
    for (canonical, source) in scan.columns.pairs() {
        let (required, expected, ok): (bool, &'static str, fn(&DataType) -> bool) = match canonical
        {
            "event_id" => (true, "Utf8", is_string),
            "key" => (seq_needed, "Utf8", is_string),
            "seq" => (seq_needed, "Int64 or Int32", is_int),
            "event_time" => (true, "Timestamp", |t| {
                matches!(t, DataType::Timestamp(_, _))
            }),
            "status" => (true, "Utf8", is_string),
            "attempts" => (false, "Int32 or Int64", is_int),
            "error" => (false, "Utf8", is_string),
            _ => (false, "Utf8 or Binary", |t| {
                is_string(t)
                    || matches!(
                        t,
                        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                    )
            }),
        };
        match schema.field_with_name(source) {
            Ok(f) => {
                if !ok(f.data_type()) {
                    return Err(SourceError::WrongType {
                        column: source.to_string(),
                        role: canonical,
                        found: f.data_type().clone(),
                        expected,
                    });
                }
            }
            Err(_) if required => {
                let hint = if canonical == "key" || canonical == "seq" {
                    format!(
                        " (map it with --column {canonical}=NAME, or pass --no-gaps --no-conflicts)"
                    )
                } else {
                    format!(" (map it with --column {canonical}=NAME)")
                };
                return Err(SourceError::MissingColumn {
                    column: source.to_string(),
                    role: canonical,
                    location: location.to_string(),
                    hint,
                });
            }
            Err(_) => {
                if canonical != "payload" {
                    synthesized.push(canonical);
                }
            }
        }
    }
    Ok(synthesized)
}

fn all_nullable(s: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        s.fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// JSON has no timestamp type: an inferred event_time is a string (RFC
/// 3339) or a number (epoch milliseconds). Make it a UTC timestamp.
fn coerce_event_time_schema(schema: &Schema, event_time: &str) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == event_time && !matches!(f.data_type(), DataType::Timestamp(_, _)) {
                Field::new(
                    f.name(),
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    true,
                )
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn coerce_event_time(
    schema: &SchemaRef,
    batches: Vec<arrow::record_batch::RecordBatch>,
    event_time: &str,
) -> Result<Vec<arrow::record_batch::RecordBatch>, SourceError> {
    let target = coerce_event_time_schema(schema, event_time);
    if &target == schema {
        return Ok(batches);
    }
    batches.iter().map(|b| adapt_batch(b, &target)).collect()
}

/// Reorder, cast and null-fill a batch's columns to `schema` (by name).
fn adapt_batch(
    b: &arrow::record_batch::RecordBatch,
    schema: &SchemaRef,
) -> Result<arrow::record_batch::RecordBatch, SourceError> {
    let cols = schema
        .fields()
        .iter()
        .map(|f| match b.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => {
                let c = match (c.data_type(), f.data_type()) {
                    // Epoch milliseconds, as JSON producers usually write them.
                    (DataType::Int64, DataType::Timestamp(_, _)) => arrow::compute::cast(
                        &arrow::compute::cast(
                            c,
                            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                        )?,
                        f.data_type(),
                    )?,
                    _ => arrow::compute::cast(c, f.data_type())?,
                };
                Ok(c)
            }
            None => Ok(arrow::array::new_null_array(f.data_type(), b.num_rows())),
        })
        .collect::<Result<Vec<_>, arrow::error::ArrowError>>()
        .map_err(|e| SourceError::DataFusion(e.into()))?;
    let nullable = all_nullable(schema);
    arrow::record_batch::RecordBatch::try_new(nullable, cols)
        .map_err(|e| SourceError::DataFusion(e.into()))
}

/// `events`: the window of `archive`, mapped columns renamed to their
/// canonical names (seq and attempts as Int64), other columns untouched,
/// missing optional columns as NULL, and `backfill_done` (status is a done
/// value). The window filter is on the stored column with a literal of its
/// own type, so it reaches Parquet statistics unchanged.
async fn register_events(
    ctx: &SessionContext,
    scan: &Scan,
    archive: &Archive,
) -> Result<(), SourceError> {
    let schema = &archive.schema;
    let c = &scan.columns;
    let mut df = ctx.table("archive").await?;
    let time_field = schema
        .field_with_name(&c.event_time)
        .map_err(|e| SourceError::DataFusion(e.into()))?;
    if let Some(f) = scan.from {
        df = df.filter(col(quoted(&c.event_time)).gt_eq(lit(time_literal(time_field, f))))?;
    }
    if let Some(t) = scan.to {
        df = df.filter(col(quoted(&c.event_time)).lt(lit(time_literal(time_field, t))))?;
    }
    let renamed: BTreeMap<&str, &str> = c.pairs().iter().map(|(k, v)| (*v, *k)).collect();
    let mut exprs: Vec<Expr> = vec![];
    for f in schema.fields() {
        let name = f.name().as_str();
        let e = col(quoted(name));
        match renamed.get(name) {
            Some(&canonical @ ("seq" | "attempts")) => {
                exprs.push(cast(e, DataType::Int64).alias(canonical));
            }
            Some(&"key") | Some(&"event_id") | Some(&"status") | Some(&"error")
                if f.data_type() != &DataType::Utf8 =>
            {
                exprs.push(cast(e, DataType::Utf8).alias(renamed[name]));
            }
            Some(canonical) => exprs.push(e.alias(*canonical)),
            None => {
                if Columns::default().pairs().iter().any(|(k, _)| *k == name) {
                    // A source column named like a canonical one that is
                    // mapped elsewhere would shadow it: keep it under a prefix.
                    exprs.push(e.alias(format!("source_{name}")));
                } else {
                    exprs.push(e.alias(name));
                }
            }
        }
    }
    for s in &archive.synthesized {
        let t = match *s {
            "seq" | "attempts" => DataType::Int64,
            _ => DataType::Utf8,
        };
        exprs.push(lit(ScalarValue::try_from(&t)?).alias(*s));
    }
    let done = col(quoted(&c.status)).in_list(
        scan.done_statuses.iter().map(|s| lit(s.as_str())).collect(),
        false,
    );
    exprs.push(
        datafusion::functions::expr_fn::coalesce(vec![done, lit(false)]).alias("backfill_done"),
    );
    let df = df.select(exprs)?;
    ctx.register_table("events", df.into_view())?;
    Ok(())
}

/// Quote an identifier for `col()`, which otherwise parses `a.b` as a
/// qualified name and folds case.
pub fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn time_literal(field: &Field, t: DateTime<Utc>) -> ScalarValue {
    let tz = match field.data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    match field.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => {
            ScalarValue::TimestampSecond(Some(t.timestamp()), tz)
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            ScalarValue::TimestampMillisecond(Some(t.timestamp_millis()), tz)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            ScalarValue::TimestampNanosecond(Some(t.timestamp_nanos_opt().unwrap_or(i64::MAX)), tz)
        }
        _ => ScalarValue::TimestampMicrosecond(Some(t.timestamp_micros()), tz),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    #[test]
    fn merge_unions_widens_and_normalizes() {
        let a = s(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("seq", DataType::Int32, false),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ]);
        let b = s(vec![
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
            Field::new("seq", DataType::Int64, false),
            Field::new("event_id", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, false),
        ]);
        let m = merge(&[("a".into(), a.clone()), ("b".into(), b)]).unwrap();
        let names: Vec<_> = m.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["event_id", "seq", "event_time", "error"]);
        assert_eq!(m.field(1).data_type(), &DataType::Int64);
        assert_eq!(
            m.field(2).data_type(),
            &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
        );
        let same = merge(&[("a".into(), a.clone()), ("b".into(), a)]).unwrap();
        assert_eq!(
            same.field(2).data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
            "a type all files agree on is kept"
        );
        assert!(m.field(3).is_nullable(), "missing in a file => nullable");
    }

    #[test]
    fn merge_names_column_and_files_on_conflict() {
        let a = s(vec![Field::new("payload", DataType::Utf8, true)]);
        let b = s(vec![Field::new("payload", DataType::Float64, true)]);
        let e = merge(&[("x.parquet".into(), a), ("y.parquet".into(), b)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("payload") && e.contains("x.parquet") && e.contains("y.parquet"),
            "{e}"
        );
    }
}
