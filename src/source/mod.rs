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

pub mod logs;
pub mod named;
pub mod partitions;

pub use partitions::partition_granularity;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
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

/// The column of `events` that is true where the archive row had no
/// event_id (NULL), and `event_id` holds a synthetic one.
pub const MISSING_EVENT_ID_COLUMN: &str = "backfill_missing_event_id";

/// The prefix of synthetic event ids. A row without an event_id still needs
/// a stable ledger id, so that a second run over the same archive skips the
/// dead letter the first run wrote instead of writing it again. The id is
/// derived from the row's content, never from its file or position (files
/// are compacted and re-partitioned; the ledger must not notice):
///
/// `backfill:missing-event-id:<key>/<seq>/<event_time>` where `<key>` is
/// `<length in characters>:<key>` (so no key can fake a separator),
/// `<seq>` the decimal seq, `<event_time>` whole microseconds since the
/// epoch (sub-microsecond digits dropped), and `-` stands for NULL. Rows
/// without an event_id that agree on all three are one event.
///
/// The prefix is reserved: an archived event_id that starts with it is
/// treated as missing too, so a synthetic id never collides with a real one.
pub const MISSING_EVENT_ID_PREFIX: &str = "backfill:missing-event-id:";

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
    /// A local path in cluster mode, which the executors cannot read.
    #[error(
        "{what} {location}: on this machine's disk, and a cluster's executors read it themselves: put it in an object store (s3://, gs://, az://), or pass --cluster-shared-fs (cluster_shared_fs = true) if every executor sees the same path"
    )]
    NotShared {
        what: &'static str,
        location: String,
    },
    #[error(
        "{file}: column '{column}' holds {value} {unit} since the epoch, beyond what the archive's microsecond timestamps can hold (about ±292,000 years)"
    )]
    TimeOutOfRange {
        file: String,
        column: String,
        value: i64,
        unit: &'static str,
    },
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error("query engine: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// The cluster of `--cluster` does not answer (exit 1: it may be back
    /// for a retry).
    #[error("{0}")]
    Cluster(String),
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
                | SourceError::NotShared { .. }
        ) || matches!(self, SourceError::Kafka(k) if k.is_config())
    }
}

/// One archive file, listed and footer-read.
#[derive(Debug, Clone)]
pub struct ArchiveFile {
    /// The store the file lives in (for reading it again on a scan error).
    pub store: Arc<dyn ObjectStore>,
    pub meta: ObjectMeta,
    pub url: String,
    /// The name errors use (a path for local files, a URL otherwise).
    pub display: String,
    pub rows: i64,
    pub row_groups: usize,
    /// event_time range from the footer's row-group statistics, in UTC
    /// microseconds (min rounded down, max up, clamped to i64: always a
    /// superset); None when a row group has no statistics.
    pub time_range: Option<(i64, i64)>,
    /// The file's own event_time unit and its extreme raw values, to check
    /// that they survive the archive's unified unit.
    pub time_raw: Option<(TimeUnit, i64, i64)>,
    /// The footer proves that every row has an event_id of its own: no
    /// NULL and none in the reserved synthetic range (see
    /// [`footer_ids_clean`]).
    pub ids_clean: bool,
    /// The widest row group's bytes per row, decoded: of every column, and
    /// of the narrow pass's string columns (see [`RowBytes`]).
    pub row_bytes: RowBytes,
}

/// Bytes a row takes once decoded, estimated from a footer: per row group,
/// each column chunk's uncompressed size (or its byte arrays' unencoded
/// size, where the writer recorded it and it is larger: a dictionary hides
/// repeated values) over the group's rows; the widest group of the file.
/// The batch sizes follow it, so that a batch of 100 KB payloads or of
/// 5 KB ids stays inside `--memory-limit` (0: unknown, a Kafka source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowBytes {
    /// Every column: what the fetch of the candidates' rows reads.
    pub wide: u64,
    /// event_id, key, status and error: the strings of the narrow pass.
    pub narrow: u64,
}

impl RowBytes {
    /// The wider of two estimates, column by column.
    pub fn max(self, o: RowBytes) -> RowBytes {
        RowBytes {
            wide: self.wide.max(o.wide),
            narrow: self.narrow.max(o.narrow),
        }
    }
}

/// [`RowBytes`] of a file's footer; `narrow` names the source columns of
/// the narrow pass's strings.
pub fn footer_row_bytes(
    md: &parquet::file::metadata::ParquetMetaData,
    narrow: &[&str],
) -> RowBytes {
    let mut out = RowBytes::default();
    for rg in md.row_groups() {
        let rows = rg.num_rows().max(1) as u64;
        let (mut wide, mut thin) = (0u64, 0u64);
        for c in rg.columns() {
            let bytes = c
                .uncompressed_size()
                .max(c.unencoded_byte_array_data_bytes().unwrap_or(0))
                .max(0) as u64;
            // Arrow's offsets or values: at least 4 bytes a row.
            let per_row = bytes.div_ceil(rows) + 4;
            wide += per_row;
            if c.column_path()
                .parts()
                .first()
                .is_some_and(|top| narrow.contains(&top.as_str()))
            {
                thin += per_row;
            }
        }
        out = out.max(RowBytes { wide, narrow: thin });
    }
    out
}

impl ArchiveFile {
    /// Can this file hold rows inside [from, to)? Decided from the footer
    /// alone, so a file outside the window is never read past its footer.
    fn may_overlap(&self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> bool {
        let Some((min, max)) = self.time_range else {
            return true;
        };
        // `max < from` and `min >= to`, compared at full precision: a bound
        // with sub-microsecond digits must not prune a file it overlaps.
        let micros = |t: DateTime<Utc>| ceil_in_unit(t, TimeUnit::Microsecond);
        if let Some(f) = from
            && (max as i128) < micros(f)
        {
            return false;
        }
        if let Some(t) = to
            && (min as i128) >= micros(t)
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
    /// Every row has an event_id of its own (every file's footer proves
    /// it): `events` skips the synthetic-id expression.
    pub ids_clean: bool,
    /// Messages of Kafka sources that did not decode: dead-lettered as
    /// `undecodable`, keyed by the source URL.
    pub undecodable: Vec<(String, crate::kafka::source::Undecodable)>,
    /// Every row comes from a Parquet file (no Kafka source): rows have a
    /// file and a row number in it (`input_file_name()`,
    /// `file_row_index()`).
    pub files_only: bool,
}

impl Archive {
    /// Each file's path as `input_file_name()` gives it and its rows, in
    /// file order.
    pub fn file_paths(&self) -> Vec<(String, u64)> {
        self.files
            .iter()
            .map(|f| (f.meta.location.to_string(), f.rows.max(0) as u64))
            .collect()
    }

    /// The widest rows of the files read ([`RowBytes`]).
    pub fn row_bytes(&self) -> RowBytes {
        self.files
            .iter()
            .fold(RowBytes::default(), |a, f| a.max(f.row_bytes))
    }
}

/// The session settings every command shares: Utf8 (not views) so that the
/// policy kernels and outputs see the archive's own types; pushdown and
/// page-index pruning on; a memory pool that spills instead of failing, to
/// `--spill-dir` (see [`crate::job::spill_dir`]).
pub fn session(scan: &Scan) -> Result<SessionContext, SourceError> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
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
    // Each sort partition (one per core) reserves this much for its merge
    // before it spills: a quarter of the pool across all of them, up to
    // 64 MiB each. DataFusion's fixed 10 MiB would eat a small limit whole,
    // and on a large one it is too little: the merge of the fetched rows
    // needs two buffered batches of two runs at least (~13 MiB for 200-byte
    // rows); when its reservation falls short it gives it back to the pool
    // and asks again from nothing, and by then the other partition's sort
    // has taken the pool (50M events at `--memory-limit 1G`: "Additional
    // allocation failed for ExternalSorterMerge[0]").
    let parts = config.target_partitions().max(1);
    let pool = crate::machine::pool_bytes(scan.memory_limit);
    config.options_mut().execution.sort_spill_reservation_bytes =
        (pool / (4 * parts)).clamp(1 << 20, 64 << 20);
    // Spill files go to --spill-dir, or (lazily, only if something spills)
    // to a fresh folder in the system temp dir. Either folder is removed
    // when the session ends.
    let disk = DiskManagerBuilder::default().with_mode(match &scan.spill_dir {
        Some(dir) => DiskManagerMode::Directories(vec![dir.clone()]),
        None => DiskManagerMode::OsTmpDirectory,
    });
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(pool, 1.0)
        .with_disk_manager_builder(disk)
        .build_arc()?;
    // DataFusion's folders under --spill-dir are this run's: a later run
    // removes them if this one is killed (crate::spill). Best effort: a
    // folder that cannot take the file fails its first spill anyway.
    for dir in runtime.disk_manager.temp_dir_paths() {
        let _ = crate::spill::claim(&dir);
    }
    let ctx = match &scan.cluster {
        Some(cluster) => SessionContext::new_with_state(crate::cluster::client_state(
            cluster,
            config,
            runtime,
            &scan.storage,
        )?),
        None => SessionContext::new_with_config_rt(config, runtime),
    };
    ctx.register_udf(crate::shard::udf());
    Ok(ctx)
}

/// The session plans on a cluster (`--cluster`).
pub fn on_cluster(ctx: &SessionContext) -> bool {
    ctx.state()
        .config()
        .options()
        .extensions
        .get::<crate::cluster::ClusterOptions>()
        .is_some()
}

/// In cluster mode, a location the executors must read: refused when it
/// is on this machine's disk, unless every executor sees the same paths.
pub fn check_cluster_reads(
    scan: &Scan,
    loc: &Location,
    what: &'static str,
) -> Result<(), SourceError> {
    match &scan.cluster {
        Some(c) if loc.is_local && !c.shared_fs => Err(SourceError::NotShared {
            what,
            location: loc.original.clone(),
        }),
        _ => Ok(()),
    }
}

/// List, footer-read, merge and validate the archive; register `archive`
/// and `events` in `ctx`.
pub async fn register(ctx: &SessionContext, scan: &Scan) -> Result<Archive, SourceError> {
    if let Some(cluster) = &scan.cluster {
        cluster.probe().await.map_err(SourceError::Cluster)?;
    }
    let listing_started = std::time::Instant::now();
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
        check_cluster_reads(scan, &loc, "source")?;
        loc.register(ctx);
        let excluded = excluded_prefixes(&loc, &scan.exclude, &scan.storage)?;
        let mut listing =
            list_archive(&loc, &scan.partitions, scan.from, scan.to, &excluded).await?;
        if loc.is_local {
            drop_linked_outputs(&mut listing, &scan.exclude, &scan.storage);
        }
        if listing.files.is_empty() && listing.pruned.is_empty() {
            return Err(SourceError::Empty {
                location: loc.original.clone(),
            });
        }
        stats.files_pruned += listing.pruned.len() as u64;
        stats.partitions_pruned += listing.partitions_pruned;
        stats.empty_files_skipped += listing.empty_skipped;
        for f in &listing.empty_files {
            tracing::warn!(
                "{}",
                crate::redact::line(&format!("skipping zero-byte file {}", loc.display_path(f)))
            );
        }
        if pruned_sample.is_none()
            && let Some(p) = listing.pruned.first()
        {
            pruned_sample = Some(read_footer(&loc, p.clone(), &scan.columns).await?);
        }
        let metas: Vec<ArchiveFile> = futures::stream::iter(listing.files)
            .map(|m| read_footer(&loc, m, &scan.columns))
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
            let merged = merge_schemas(loc, &schema_files).await?;
            if let Ok(f) = merged.field_with_name(&scan.columns.event_time) {
                for file in &all_files {
                    check_time_range(file, &scan.columns.event_time, f.data_type())?;
                }
            }
            Some(merged)
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
    if scan.recover_from.is_some() {
        schema = with_kafka_coordinates(&schema, &kafka_settings);
    }
    let synthesized = validate(&schema, scan, &location_name)?;

    let files_table = archive_table(ctx, &schema, &all_files, None)?;
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
    let ids_clean = reads.is_empty()
        && !all_files.is_empty()
        && !synthesized.contains(&"event_id")
        && all_files.iter().all(|f| f.ids_clean);
    let archive = Archive {
        ids_clean,
        schema,
        files: all_files,
        stats,
        synthesized,
        source_columns,
        undecodable,
        files_only: reads.is_empty(),
    };
    register_events(ctx, scan, &archive).await?;
    let s = &archive.stats;
    let (files, bytes) = (s.files_scanned, s.bytes_total);
    let mut message = format!(
        "listed {} files, {} ({} pruned by the window",
        crate::human::count(files),
        crate::human::bytes(bytes),
        crate::human::count(s.files_pruned),
    );
    if s.partitions_pruned > 0 {
        message.push_str(&format!(
            ", {} partitions never listed",
            crate::human::count(s.partitions_pruned)
        ));
    }
    message.push(')');
    if s.kafka_messages > 0 {
        message.push_str(&format!(
            "; read {} Kafka messages",
            crate::human::count(s.kafka_messages)
        ));
    }
    crate::progress::finished(
        "list",
        listing_started.elapsed(),
        &crate::progress::Figures {
            files: Some(files),
            files_pruned: Some(s.files_pruned),
            bytes: Some(bytes),
            rows: (s.kafka_messages > 0).then_some(s.kafka_messages),
            ..Default::default()
        },
        &message,
    );
    Ok(archive)
}

/// The `archive` table over an explicit file list and the merged schema.
fn archive_table(
    ctx: &SessionContext,
    schema: &SchemaRef,
    files: &[ArchiveFile],
    positions: Option<datafusion::logical_expr::ScalarUDF>,
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
    let listing = Arc::new(ListingTable::try_new(config)?);
    let named: Vec<named::NamedFile> = files
        .iter()
        .map(|f| named::NamedFile {
            store: f.store.clone(),
            meta: f.meta.clone(),
            display: f.display.clone(),
        })
        .collect();
    if on_cluster(ctx) && positions.is_none() {
        // A listing table travels to the cluster as its file list; the
        // wrapper that names a failing file would not (stock DataFusion
        // cannot serialize it): the client's watch over the cluster's
        // queries names a file whose metadata fails instead.
        crate::cluster::watch::remember_files(ctx, named);
        return Ok(listing);
    }
    let table = named::NamedFiles::new(listing, named);
    Ok(Arc::new(match positions {
        Some(file_ordinal) => table.with_positions(file_ordinal),
        None => table,
    }))
}

/// The run's own outputs and state, where they lie inside the archive: a
/// run must never read back what it (or an earlier run) wrote, or replays
/// would be replayed again. They are left out of the listing rather than
/// refused, since `--out archive/_backfill`-style layouts are common; an
/// output location that *is* the archive is refused (exit 2), as nothing
/// would be left to read.
fn excluded_prefixes(
    loc: &Location,
    exclude: &[String],
    storage: &location::StorageSettings,
) -> Result<Vec<Path>, SourceError> {
    let mut out = vec![];
    for e in exclude {
        let Ok(ex) = location::resolve(e, storage) else {
            // Not a store location (a Kafka URL, stdout): nothing to exclude.
            continue;
        };
        if ex.store_url != loc.store_url {
            continue;
        }
        // Local paths are compared as the file system resolves them: through
        // a symlink (`--source /r/link/archive --out /r/real/archive/out`)
        // the outputs are inside the archive though no prefix says so.
        let (src, inner) = if loc.is_local && ex.is_local {
            (canonical_prefix(&loc.prefix), canonical_prefix(&ex.prefix))
        } else {
            (loc.prefix.to_string(), ex.prefix.to_string())
        };
        if inner == src {
            return Err(SourceError::Unsupported {
                location: loc.original.clone(),
                message: format!(
                    "the output location {e} is the archive itself; write outputs outside it or in a folder below it"
                ),
            });
        }
        let below = if src.is_empty() {
            Some(inner.as_str())
        } else {
            inner.strip_prefix(&format!("{src}/"))
        };
        if let Some(rel) = below {
            // Named as the listing names it: below the archive's own prefix.
            let listed = if loc.prefix.as_ref().is_empty() {
                rel.to_string()
            } else {
                format!("{}/{rel}", loc.prefix)
            };
            out.push(Path::parse(listed).unwrap_or_else(|_| ex.prefix.clone()));
        }
    }
    Ok(out)
}

/// On local disk, a folder inside the archive may be a symlink to an
/// output folder (`archive/link -> /data/out`): no prefix says so, but its
/// files are this run's outputs. Drop every listed file whose folder,
/// resolved, lies in an output, state or sink folder. One `realpath` per
/// folder, on local disk only.
fn drop_linked_outputs(
    listing: &mut Listing,
    exclude: &[String],
    storage: &location::StorageSettings,
) {
    let outputs: Vec<String> = exclude
        .iter()
        .filter_map(|e| location::resolve(e, storage).ok())
        .filter(|l| l.is_local)
        .map(|l| canonical_prefix(&l.prefix))
        .collect();
    if outputs.is_empty() {
        return;
    }
    let mut resolved: std::collections::HashMap<String, bool> = Default::default();
    let mut inside = |p: &Path| -> bool {
        let dir = p.as_ref().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        *resolved.entry(dir.to_string()).or_insert_with(|| {
            let c = canonical_prefix(&Path::parse(dir).unwrap_or_else(|_| Path::from(dir)));
            outputs
                .iter()
                .any(|o| c == *o || c.starts_with(&format!("{o}/")))
        })
    };
    listing.files.retain(|m| !inside(&m.location));
    listing.pruned.retain(|m| !inside(&m.location));
}

/// The store prefix of a local path with its symlinks, `.` and `..`
/// resolved: the longest ancestor that exists is canonicalized, and the rest
/// (outputs not written yet) appended as written. Unchanged when nothing can
/// be resolved.
pub(crate) fn canonical_prefix(prefix: &Path) -> String {
    let full = std::path::PathBuf::from(format!("/{prefix}"));
    let mut existing = full.as_path();
    let mut rest = vec![];
    let canonical = loop {
        if let Ok(c) = std::fs::canonicalize(existing) {
            break c;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return prefix.to_string(),
        }
    };
    let resolved = rest.iter().rev().fold(canonical, |p, n| p.join(n));
    Path::from_absolute_path(&resolved).map_or_else(|_| prefix.to_string(), |p| p.to_string())
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
    excluded: &[Path],
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
            if name.starts_with('_') || name.starts_with('.') || excluded.contains(&dir) {
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
            if !is_data_file(&m.location) || excluded.contains(&m.location) {
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
    columns: &Columns,
) -> Result<ArchiveFile, SourceError> {
    let event_time = columns.event_time.as_str();
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
    let time_raw = footer_time_raw(builder.schema(), md, event_time);
    Ok(ArchiveFile {
        ids_clean: footer_ids_clean(builder.schema(), md, &columns.event_id),
        row_bytes: footer_row_bytes(
            md,
            &[
                columns.event_id.as_str(),
                columns.key.as_str(),
                columns.status.as_str(),
                columns.error.as_str(),
            ],
        ),
        time_range: micros_range(time_raw),
        time_raw,
        display,
        store: loc.store.clone(),
        rows: md.file_metadata().num_rows(),
        row_groups: md.num_row_groups(),
        url: loc.object_url(&meta.location),
        meta,
    })
}

/// The event_time of a file from its row-group statistics: its unit and
/// raw extremes. None (keep the file) when the column is absent, not a
/// timestamp, or any row group lacks statistics.
fn footer_time_raw(
    schema: &Schema,
    md: &parquet::file::metadata::ParquetMetaData,
    event_time: &str,
) -> Option<(TimeUnit, i64, i64)> {
    use arrow::array::{Array, AsArray};
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    if md.num_row_groups() == 0 {
        return None;
    }
    let field = schema.field_with_name(event_time).ok()?;
    let DataType::Timestamp(unit, _) = field.data_type() else {
        return None;
    };
    let conv =
        StatisticsConverter::try_new(event_time, schema, md.file_metadata().schema_descr()).ok()?;
    // Raw values in the file's own unit: converting here could overflow,
    // and that is for the caller to report, not to hide.
    let raw = |a: arrow::array::ArrayRef| -> Option<Vec<i64>> {
        let a = arrow::compute::cast(&a, &DataType::Int64).ok()?;
        let a = a.as_primitive::<arrow::datatypes::Int64Type>();
        if a.null_count() > 0 {
            return None;
        }
        Some(a.values().to_vec())
    };
    let mins = raw(conv.row_group_mins(md.row_groups()).ok()?)?;
    let maxes = raw(conv.row_group_maxes(md.row_groups()).ok()?)?;
    Some((*unit, *mins.iter().min()?, *maxes.iter().max()?))
}

/// Whether a file's row-group statistics prove that its event_id column
/// has no NULL and no value starting with [`MISSING_EVENT_ID_PREFIX`]: then
/// `events` can read the stored ids as they are, instead of testing every
/// row for a synthetic one (a string comparison and a copy of every id, on
/// every scan). A string starts with the prefix iff it lies in [prefix,
/// prefix with its last byte raised); a row group whose [min, max] misses
/// that range has none. Footer bounds may be truncated, but only outwards,
/// so the test stays on the safe side. Anything unknown answers false.
fn footer_ids_clean(
    schema: &Schema,
    md: &parquet::file::metadata::ParquetMetaData,
    event_id: &str,
) -> bool {
    use arrow::array::{Array, AsArray};
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    let Ok(field) = schema.field_with_name(event_id) else {
        return false;
    };
    if !matches!(
        field.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return false;
    }
    let Ok(conv) =
        StatisticsConverter::try_new(event_id, schema, md.file_metadata().schema_descr())
    else {
        return false;
    };
    let lo = MISSING_EVENT_ID_PREFIX.as_bytes();
    let mut hi = lo.to_vec();
    *hi.last_mut().expect("a non-empty prefix") += 1;
    let strings = |a: arrow::array::ArrayRef| -> Option<Vec<Option<Vec<u8>>>> {
        let a = arrow::compute::cast(&a, &DataType::Utf8).ok()?;
        let a = a.as_string::<i32>();
        Some(
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i).as_bytes().to_vec()))
                .collect(),
        )
    };
    let (Ok(nulls), Ok(mins), Ok(maxes)) = (
        conv.row_group_null_counts(md.row_groups()),
        conv.row_group_mins(md.row_groups()),
        conv.row_group_maxes(md.row_groups()),
    ) else {
        return false;
    };
    let (Some(mins), Some(maxes)) = (strings(mins), strings(maxes)) else {
        return false;
    };
    if nulls.null_count() > 0 || nulls.values().iter().any(|n| *n != 0) {
        return false;
    }
    mins.iter()
        .zip(maxes.iter())
        .all(|(min, max)| match (min, max) {
            (Some(min), Some(max)) => max.as_slice() < lo || min.as_slice() >= hi.as_slice(),
            _ => false,
        })
}

/// Nanoseconds in one `unit`.
fn nanos_per(unit: TimeUnit) -> i128 {
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

/// `ns` nanoseconds in units of `per` nanoseconds, rounded down or up.
fn div_round(ns: i128, per: i128, up: bool) -> i128 {
    if up {
        -((-ns).div_euclid(per))
    } else {
        ns.div_euclid(per)
    }
}

/// `v` (in `from`) expressed in `to`, rounded down or up; i128 so that
/// nothing overflows on the way.
fn convert_unit(v: i64, from: TimeUnit, to: TimeUnit, round_up: bool) -> i128 {
    div_round(v as i128 * nanos_per(from), nanos_per(to), round_up)
}

/// `t` in `unit`, rounded down or up.
fn in_unit(t: DateTime<Utc>, unit: TimeUnit, up: bool) -> i128 {
    let ns = t.timestamp() as i128 * 1_000_000_000 + t.timestamp_subsec_nanos() as i128;
    div_round(ns, nanos_per(unit), up)
}

/// The smallest value of `unit` at or after `t`: for integer x, `x >= t`
/// iff `x >= ceil(t)` and `x < t` iff `x < ceil(t)`, so both window bounds
/// are exact in any unit, whatever digits the user wrote.
fn ceil_in_unit(t: DateTime<Utc>, unit: TimeUnit) -> i128 {
    in_unit(t, unit, true)
}

/// A file's event_time range in microseconds, as a superset (see
/// [`ArchiveFile::time_range`]).
fn micros_range(raw: Option<(TimeUnit, i64, i64)>) -> Option<(i64, i64)> {
    let (unit, min, max) = raw?;
    let clamp = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    Some((
        clamp(convert_unit(min, unit, TimeUnit::Microsecond, false)),
        clamp(convert_unit(max, unit, TimeUnit::Microsecond, true)),
    ))
}

/// The event_time values of a file must fit the unit the archive reads them
/// in; a year-300,000 value in a millisecond file next to a microsecond one
/// would otherwise fail the scan with a cast error that names no file.
fn check_time_range(
    file: &ArchiveFile,
    column: &str,
    archive_type: &DataType,
) -> Result<(), SourceError> {
    let (Some((unit, min, max)), DataType::Timestamp(target, _)) = (file.time_raw, archive_type)
    else {
        return Ok(());
    };
    let fits = |v: i64| i64::try_from(v as i128 * nanos_per(unit) / nanos_per(*target)).is_ok();
    for v in [min, max] {
        if !fits(v) {
            return Err(SourceError::TimeOutOfRange {
                file: file.display.clone(),
                column: column.to_string(),
                value: v,
                unit: unit_name(unit),
            });
        }
    }
    Ok(())
}

fn unit_name(u: TimeUnit) -> &'static str {
    match u {
        TimeUnit::Second => "seconds",
        TimeUnit::Millisecond => "milliseconds",
        TimeUnit::Microsecond => "microseconds",
        TimeUnit::Nanosecond => "nanoseconds",
    }
}

/// Merge the schemas of every file: union of columns (first-seen order),
/// Int32 widened to Int64, timestamp units unified (microseconds where files
/// differ) and zones
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
        // Files that disagree on the unit meet at microseconds: ±292,000
        // years at microsecond resolution. Nanoseconds (the finest unit)
        // end in 2262, so a year-3000 value in a millisecond file would not
        // survive them; seconds and milliseconds would drop digits.
        (Timestamp(u1, _), Timestamp(u2, _)) => {
            let u = if u1 == u2 { *u1 } else { TimeUnit::Microsecond };
            Some(Timestamp(u, Some("UTC".into())))
        }
        (Utf8, LargeUtf8) | (LargeUtf8, Utf8) => Some(LargeUtf8),
        (Binary, LargeBinary) | (LargeBinary, Binary) => Some(LargeBinary),
        _ => None,
    }
}

/// Text of any Arrow string type.
pub fn is_text(t: &DataType) -> bool {
    is_string(t)
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

pub(crate) fn all_nullable(s: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        s.fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// The archive's schema with the four Kafka coordinate columns (named by
/// `original_*_column`, typed as the topic reader fills them) where it
/// lacks them, nullable: a run that recovers gaps from a topic opens its
/// sinks before it knows whether it will recover anything, and a recovered
/// event's replay carries its coordinates (`backfill.original.*` headers,
/// Parquet columns), NULL for archived rows, which the scan fills in.
fn with_kafka_coordinates(schema: &Schema, kafka: &crate::kafka::KafkaSettings) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for (name, t) in [
        (&kafka.original_topic_column, DataType::Utf8),
        (&kafka.original_partition_column, DataType::Int32),
        (&kafka.original_offset_column, DataType::Int64),
        (
            &kafka.original_timestamp_column,
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        ),
    ] {
        if schema.field_with_name(name).is_err() {
            fields.push(Field::new(name, t, true));
        }
    }
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
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

pub(crate) fn coerce_event_time(
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
pub(crate) fn adapt_batch(
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
    let df = events_frame(ctx.table("archive").await?, scan, archive, vec![])?;
    ctx.register_table("events", df.into_view())?;
    // A view: planned only by the queries that read it.
    ctx.sql(PROCESSED_SQL)
        .await
        .map_err(SourceError::DataFusion)?;
    Ok(())
}

/// `processed` (`sql/processed.sql`): one row per processed event.
pub const PROCESSED_SQL: &str = include_str!("../../sql/processed.sql");

/// `events` with each row's place in the archive: `backfill_file`, the
/// file's ordinal by `file_ordinal` (a function of the file's path, as
/// `input_file_name()` gives it), and `backfill_row`, its index in the file
/// (`file_row_index()`), which the archive's scan computes itself
/// ([`named::NamedFiles::with_positions`]): selected from the view, they
/// failed with "input_file_name() is source dependent" wherever the view
/// computes a column (synthesized columns, ids made for rows without
/// one). For a Parquet archive alone.
pub fn events_at(
    ctx: &SessionContext,
    scan: &Scan,
    archive: &Archive,
    file_ordinal: datafusion::logical_expr::ScalarUDF,
) -> Result<DataFrame, SourceError> {
    let table = archive_table(ctx, &archive.schema, &archive.files, Some(file_ordinal))?;
    let base = ctx.read_table(table)?;
    events_frame(
        base,
        scan,
        archive,
        vec![col(named::FILE_COLUMN), col(named::ROW_COLUMN)],
    )
}

/// The `events` view's frame over `archive` (the table of that name, or
/// the same files with positions), with `extra` columns of it kept beside
/// the canonical ones.
pub(crate) fn events_frame(
    archive_df: DataFrame,
    scan: &Scan,
    archive: &Archive,
    extra: Vec<Expr>,
) -> Result<DataFrame, SourceError> {
    let schema = &archive.schema;
    let c = &scan.columns;
    let mut df = archive_df;
    let time_field = schema
        .field_with_name(&c.event_time)
        .map_err(|e| SourceError::DataFusion(e.into()))?;
    let time = || col(quoted(&c.event_time));
    if scan.from.is_some() || scan.to.is_some() {
        // A windowed run never sees a row without a time (as before, when
        // the comparisons below dropped them), even when a bound lies
        // beyond what the column's unit can hold and falls away.
        df = df.filter(time().is_not_null())?;
    }
    // A bound beyond what the unit holds: `from` after every value or `to`
    // before every value leaves nothing; the others fall away.
    let bound = |t: Option<DateTime<Utc>>| t.map(|t| window_bound(time_field, t));
    let (from, to) = (bound(scan.from), bound(scan.to));
    if matches!(from, Some(Bound::BeyondMax)) || matches!(to, Some(Bound::BeforeMin)) {
        df = df.filter(lit(false))?;
    }
    let value = |b: &Option<Bound>| match b {
        Some(Bound::Value(v)) => Some(v.clone()),
        _ => None,
    };
    match coarser_file_unit(archive, time_field) {
        None => {
            if let Some(v) = value(&from) {
                df = df.filter(time().gt_eq(lit(v)))?;
            }
            if let Some(v) = value(&to) {
                df = df.filter(time().lt(lit(v)))?;
            }
        }
        Some(coarse) => {
            // Some files store a coarser unit than the archive reads (ms
            // files beside µs ones). DataFusion rewrites a comparison with a
            // literal into each file's own unit by truncating it, for
            // row-group pruning and for filters pushed into the reader,
            // which drops a row at 10.048 s from `< 10.0485 s`. So the
            // window is applied twice: as bounds widened to whole `coarse`
            // units, which survive that rewrite and still prune, and
            // exactly, by a function DataFusion cannot rewrite, over values
            // already cast to the archive's unit.
            let (read, tz) = match time_field.data_type() {
                DataType::Timestamp(u, tz) => (*u, tz.clone()),
                _ => (TimeUnit::Microsecond, None),
            };
            let widen = |t: DateTime<Utc>, up: bool| -> Option<ScalarValue> {
                let v = i64::try_from(in_unit(t, coarse, up)).ok()?;
                let v = i64::try_from(convert_unit(v, coarse, read, up)).ok()?;
                Some(timestamp_scalar(read, v, tz.clone()))
            };
            if let Some(v) = scan.from.and_then(|f| widen(f, false)) {
                df = df.filter(time().gt_eq(lit(v)))?;
            }
            if let Some(v) = scan.to.and_then(|t| widen(t, true)) {
                df = df.filter(time().lt(lit(v)))?;
            }
            let udf = in_window_udf(
                value(&from).as_ref().and_then(timestamp_value),
                value(&to).as_ref().and_then(timestamp_value),
            );
            df = df.filter(udf.call(vec![time()]))?;
        }
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
    exprs.extend(extra);
    let done = col(quoted(&c.status)).in_list(
        scan.done_statuses.iter().map(|s| lit(s.as_str())).collect(),
        false,
    );
    exprs.push(
        datafusion::functions::expr_fn::coalesce(vec![done, lit(false)]).alias("backfill_done"),
    );
    Ok(if archive.ids_clean {
        df.select(exprs)?
            .with_column(MISSING_EVENT_ID_COLUMN, lit(false))?
    } else {
        with_event_identity(df.select(exprs)?)?
    })
}

/// Quote an identifier for `col()`, which otherwise parses `a.b` as a
/// qualified name and folds case.
pub fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The coarsest unit a file stores event_time in, when it is coarser than
/// the unit the archive reads it in (None: no file is).
fn coarser_file_unit(archive: &Archive, time_field: &Field) -> Option<TimeUnit> {
    let DataType::Timestamp(read, _) = time_field.data_type() else {
        return None;
    };
    archive
        .files
        .iter()
        .filter_map(|f| f.time_raw.map(|r| r.0))
        .filter(|u| nanos_per(*u) > nanos_per(*read))
        .max_by_key(|u| nanos_per(*u))
}

fn timestamp_scalar(unit: TimeUnit, v: i64, tz: Option<Arc<str>>) -> ScalarValue {
    match unit {
        TimeUnit::Second => ScalarValue::TimestampSecond(Some(v), tz),
        TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(Some(v), tz),
        TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(Some(v), tz),
        TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(Some(v), tz),
    }
}

fn timestamp_value(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampSecond(v, _)
        | ScalarValue::TimestampMillisecond(v, _)
        | ScalarValue::TimestampMicrosecond(v, _)
        | ScalarValue::TimestampNanosecond(v, _) => *v,
        _ => None,
    }
}

/// `backfill_in_window(t)`: `from <= t < to` in the archive's unit, as
/// [`InWindow`] (a cluster's codec rebuilds it from its bounds).
pub fn in_window_udf(from: Option<i64>, to: Option<i64>) -> datafusion::logical_expr::ScalarUDF {
    datafusion::logical_expr::ScalarUDF::new_from_impl(InWindow {
        from,
        to,
        signature: datafusion::logical_expr::Signature::any(
            1,
            datafusion::logical_expr::Volatility::Immutable,
        ),
    })
}

/// The bounds of a [`in_window_udf`] function; None for any other.
pub fn in_window_bounds(
    udf: &datafusion::logical_expr::ScalarUDF,
) -> Option<(Option<i64>, Option<i64>)> {
    udf.inner()
        .downcast_ref::<InWindow>()
        .map(|w| (w.from, w.to))
}

/// `backfill_in_window(event_time)`: the exact window over the raw values
/// of the archive's unit, `from <= t < to` (None: unbounded). Opaque to
/// DataFusion on purpose: it cannot be rewritten into a file's coarser unit.
#[derive(Debug, PartialEq, Eq, Hash)]
struct InWindow {
    from: Option<i64>,
    to: Option<i64>,
    signature: datafusion::logical_expr::Signature,
}

impl datafusion::logical_expr::ScalarUDFImpl for InWindow {
    fn name(&self) -> &str {
        "backfill_in_window"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<datafusion::logical_expr::ColumnarValue> {
        use arrow::array::{Array, AsArray, BooleanArray};
        let t = args.args[0].clone().into_array(args.number_rows)?;
        let t = arrow::compute::cast(&t, &DataType::Int64)?;
        let t = t.as_primitive::<arrow::datatypes::Int64Type>();
        let hit: BooleanArray = (0..t.len())
            .map(|i| {
                Some(
                    t.is_valid(i)
                        && self.from.is_none_or(|f| t.value(i) >= f)
                        && self.to.is_none_or(|e| t.value(i) < e),
                )
            })
            .collect();
        Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
            hit,
        )))
    }
}

/// A window bound in the stored column's own unit.
#[derive(Debug, PartialEq)]
enum Bound {
    /// The exact bound: the smallest value of the unit at or after it.
    Value(ScalarValue),
    /// After every value the unit can hold (`--to 9999-12-31` on
    /// nanoseconds, which end in 2262).
    BeyondMax,
    /// Before every value the unit can hold (`--from 0001-01-01` on
    /// nanoseconds, which start in 1677).
    BeforeMin,
}

/// The literal that compares the stored column with a window bound exactly.
/// Rounding up is right for both bounds: for an integer x, `x >= t` iff
/// `x >= ceil(t)` and `x < t` iff `x < ceil(t)`. The literal has the
/// column's own type, so the filter reaches Parquet statistics unchanged.
fn window_bound(field: &Field, t: DateTime<Utc>) -> Bound {
    let (unit, tz) = match field.data_type() {
        DataType::Timestamp(u, tz) => (*u, tz.clone()),
        _ => (TimeUnit::Microsecond, None),
    };
    let v = ceil_in_unit(t, unit);
    let Ok(v) = i64::try_from(v) else {
        return if v > 0 {
            Bound::BeyondMax
        } else {
            Bound::BeforeMin
        };
    };
    Bound::Value(timestamp_scalar(unit, v, tz))
}

/// `events` with a usable identity for every row: where the archive has no
/// event_id (or a reserved one), `event_id` becomes the synthetic id of
/// [`MISSING_EVENT_ID_PREFIX`] and [`MISSING_EVENT_ID_COLUMN`] is true.
/// Every count, the ledger and the balance then see these rows like any
/// other event; the policy dead-letters them as `missing_event_id`.
fn with_event_identity(
    df: datafusion::dataframe::DataFrame,
) -> Result<datafusion::dataframe::DataFrame, SourceError> {
    use datafusion::functions::expr_fn::{character_length, coalesce, concat, starts_with};
    use datafusion::logical_expr::when;
    let id = || col("event_id");
    let missing = id()
        .is_null()
        .or(starts_with(id(), lit(MISSING_EVENT_ID_PREFIX)));
    let text = |e: Expr| {
        when(e.clone().is_null(), lit("-")).otherwise(concat(vec![
            cast(character_length(e.clone()), DataType::Utf8),
            lit(":"),
            e,
        ]))
    };
    let number = |e: Expr| coalesce(vec![cast(e, DataType::Utf8), lit("-")]);
    // Whole microseconds, whatever the stored unit, so that the id does not
    // change when a file of another unit joins the archive.
    let time_tz = match df.schema().field_with_unqualified_name("event_time") {
        Ok(f) => match f.data_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        },
        Err(_) => None,
    };
    let micros = cast(
        cast(
            col("event_time"),
            DataType::Timestamp(TimeUnit::Microsecond, time_tz),
        ),
        DataType::Int64,
    );
    let synthetic = concat(vec![
        lit(MISSING_EVENT_ID_PREFIX),
        text(col("key"))?,
        lit("/"),
        number(col("seq")),
        lit("/"),
        number(micros),
    ]);
    let mut exprs: Vec<Expr> = vec![];
    for f in df.schema().fields() {
        if f.name() == "event_id" {
            exprs.push(
                when(missing.clone(), synthetic.clone())
                    .otherwise(id())?
                    .alias("event_id"),
            );
        } else {
            exprs.push(col(quoted(f.name())));
        }
    }
    exprs.push(missing.alias(MISSING_EVENT_ID_COLUMN));
    Ok(df.select(exprs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    /// The widest row group sets the width, the narrow strings apart.
    #[test]
    fn footer_row_bytes_find_the_widest_rows() {
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
        let schema = s(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("payload", DataType::Utf8, false),
        ]);
        // Row group 1: ids of 10 bytes, payloads of 20; row group 2: ids
        // of 3000 bytes, payloads of 50,000 (each distinct: no dictionary
        // hides them).
        let batch = |id: usize, payload: usize, n: usize| {
            arrow::array::RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(arrow::array::StringArray::from_iter_values(
                        (0..n).map(|i| format!("{i:0id$}")),
                    )),
                    Arc::new(arrow::array::StringArray::from_iter_values(
                        (0..n).map(|i| format!("{i:0payload$}")),
                    )),
                ],
            )
            .unwrap()
        };
        let mut buf = vec![];
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(100))
            .build();
        let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props)).unwrap();
        w.write(&batch(10, 20, 100)).unwrap();
        w.write(&batch(3000, 50_000, 10)).unwrap();
        w.close().unwrap();
        let md = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&bytes::Bytes::from(buf))
            .unwrap();
        let rb = footer_row_bytes(&md, &["event_id", "key"]);
        assert!((3000..3200).contains(&rb.narrow), "{rb:?}");
        assert!((53_000..53_400).contains(&rb.wide), "{rb:?}");
        assert_eq!(footer_row_bytes(&md, &[]).narrow, 0);
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
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            "units that differ meet at microseconds (not the finest: ns ends in 2262)"
        );
        let same = merge(&[("a".into(), a.clone()), ("b".into(), a)]).unwrap();
        assert_eq!(
            same.field(2).data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
            "a type all files agree on is kept"
        );
        assert!(m.field(3).is_nullable(), "missing in a file => nullable");
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Bounds round up in the column's unit: exact for `>=` and `<` alike.
    #[test]
    fn window_bounds_are_exact_in_the_stored_unit() {
        let ms = Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        );
        let base = t("2024-01-01T00:00:00Z").timestamp_millis();
        assert_eq!(
            window_bound(&ms, t("2024-01-01T00:00:00.0005Z")),
            Bound::Value(ScalarValue::TimestampMillisecond(
                Some(base + 1),
                Some("UTC".into())
            ))
        );
        assert_eq!(
            window_bound(&ms, t("2024-01-01T00:00:00.001Z")),
            Bound::Value(ScalarValue::TimestampMillisecond(
                Some(base + 1),
                Some("UTC".into())
            ))
        );
        // Before 1970 too: -0.5 ms rounds up to 0, not down to -1.
        assert_eq!(
            window_bound(&ms, t("1969-12-31T23:59:59.9995Z")),
            Bound::Value(ScalarValue::TimestampMillisecond(
                Some(0),
                Some("UTC".into())
            ))
        );
        let ns = Field::new("t", DataType::Timestamp(TimeUnit::Nanosecond, None), true);
        assert_eq!(
            window_bound(&ns, t("0001-01-01T00:00:00Z")),
            Bound::BeforeMin
        );
        assert_eq!(
            window_bound(&ns, t("3000-01-01T00:00:00Z")),
            Bound::BeyondMax
        );
    }

    /// Footer ranges are a superset: a bound with sub-microsecond digits
    /// never prunes a file that holds a row inside the window.
    #[test]
    fn footer_pruning_is_exact() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let file = |raw: (TimeUnit, i64, i64)| ArchiveFile {
            store: store.clone(),
            meta: ObjectMeta {
                location: Path::from("x.parquet"),
                last_modified: Utc::now(),
                size: 1,
                e_tag: None,
                version: None,
            },
            url: "memory:///x.parquet".into(),
            display: "x.parquet".into(),
            rows: 1,
            row_groups: 1,
            time_range: micros_range(Some(raw)),
            time_raw: Some(raw),
            ids_clean: false,
            row_bytes: RowBytes::default(),
        };
        // One row at 1.5 us (in ns).
        let f = file((TimeUnit::Nanosecond, 1_500, 1_500));
        assert_eq!(f.time_range, Some((1, 2)));
        let at = |ns: u32| Some(DateTime::from_timestamp(0, ns).unwrap());
        assert!(f.may_overlap(at(1_400), at(1_600)));
        // The range is whole microseconds (1..=2): only a bound past it prunes.
        assert!(f.may_overlap(at(1_600), None));
        assert!(!f.may_overlap(at(2_001), None), "max <= 2us < from: pruned");
        assert!(!f.may_overlap(None, at(1_000)), "to is exclusive");
        // The overflow check: ms values that microseconds cannot hold.
        let far = file((TimeUnit::Millisecond, 0, 9_500_000_000_000_000));
        let us = DataType::Timestamp(TimeUnit::Microsecond, None);
        let e = check_time_range(&far, "event_time", &us)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.parquet") && e.contains("event_time"), "{e}");
        let ms = DataType::Timestamp(TimeUnit::Millisecond, None);
        assert!(check_time_range(&far, "event_time", &ms).is_ok());
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
