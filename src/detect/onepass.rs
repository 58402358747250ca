//! The run's detection in one pass over the narrow columns of `events`.
//!
//! The views in `sql/` are the readable definition of the rules (and what
//! `backfill sql` shows); planned as SQL they scan and hash the archive four
//! times and hold one hash group per event in memory. This module decides
//! exactly what they decide (`tests::fast_path_decides_like_the_views`
//! checks that over many random archives) in two scans:
//!
//! 1. **Narrow pass.** `event_id, key, seq, attempts, event_time, status,
//!    error` and the two flags of every row are read once and shuffled into
//!    hash buckets twice: by event_id (resolution, the chosen row, counts)
//!    and, for rows with a key and a seq, by key (conflicts, gaps). Buckets
//!    live in a reservation of DataFusion's memory pool; when it is full the
//!    largest bucket is written to an Arrow IPC file under the spill
//!    directory and read back when its turn comes, so memory is bounded by
//!    the pool, not by the archive. A Parquet archive's rows also carry
//!    their place (file, row: [`Positions`]); in a sharded run, their
//!    shard ([`crate::shard`]).
//! 2. **Buckets**, two at a time on blocking threads: rows are sorted by
//!    their hash (a radix sort on 32 bits that the bucket number leaves
//!    free; rows that share them are split by the real bytes), and each
//!    run of one event (or one key) is decided in a linear sweep. What is
//!    kept is small: per unresolved event its id, the chosen row's place
//!    and fingerprint, the conflicting (key, seq) pairs, and the gap rows.
//! 3. **Late materialization.** A second scan reads each file through a
//!    row selection of the chosen rows ([`select_rows`]; an archive with a
//!    Kafka source: every row, filtered by id), checks each against its
//!    candidate (id and fingerprint, claimed once) and annotates it with
//!    what the policy needs; DataFusion then sorts those rows (a spilling
//!    sort) into the order replays are sent in.
//!
//! Hash collisions cannot change a decision: equal hashes are only a hint,
//! every group is confirmed by comparing the ids (or keys) themselves.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Int64Array, RecordBatch, StringArray,
    StringBuilder, UInt32Array, UInt64Array,
};
use arrow::compute::{and, cast, filter_record_batch, is_not_null, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt32Type, UInt64Type};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::logical_expr::{cast as cast_expr, col, lit};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, SendableRecordBatchStream,
};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use hashbrown::HashTable;
use std::hash::BuildHasher;

use crate::job::Scan;
use crate::source::named::{FILE_COLUMN, ROW_COLUMN};
use crate::source::{MISSING_EVENT_ID_COLUMN, RowBytes};

/// Columns the fetch adds to `events` for the policy (the names of the
/// `candidates` view).
pub const ARCHIVED_ATTEMPTS: &str = "archived_attempts";
pub const IN_CONFLICT: &str = "backfill_in_conflict";
pub const LEDGER_REPLAYS: &str = "backfill_ledger_replays";
pub const LEDGER_DEAD: &str = "backfill_ledger_dead";
/// The barriers: the chosen row's seq lies after its key's first gap
/// (first missing seq below it) or first conflicting seq.
pub const AFTER_GAP: &str = "backfill_after_gap";
pub const AFTER_CONFLICT: &str = "backfill_after_conflict";

/// Bytes a row is assumed to take in a bucket, to size the bucket count
/// from the footers' row counts before anything is read.
const EVENT_ROW_BYTES: usize = 100;
const KEY_ROW_BYTES: usize = 70;
/// Rows a bucket is sized for.
const BUCKET_ROWS: usize = 200_000;
/// Rows per batch of the narrow scan: its pieces per bucket stay large
/// enough that splitting costs little per row.
const NARROW_BATCH_ROWS: usize = 65_536;
/// Rows per batch of the fetch and of the sort after it (DataFusion's
/// default).
const FETCH_BATCH_ROWS: usize = 8192;
/// A batch takes at most this share of the pool. The narrow pass holds a
/// batch and its two copies in the shuffle per scan partition, outside the
/// pool; the sort of the fetched rows holds a batch twice while it sorts it
/// and two batches per stream it merges. DataFusion's row counts (8192 and
/// ours) assume narrow rows: 8192 rows of 100 KB payloads are 800 MiB, 64K
/// ids of 5 KB 320 MiB, whatever `--memory-limit` says.
const BATCH_SHARE_OF_POOL: usize = 64;

/// Rows per batch so that a batch of rows of `row_bytes` takes at most
/// 1/[`BATCH_SHARE_OF_POOL`] of `pool`: `max` when the rows are narrow or
/// their width unknown (0), never fewer than one.
pub fn batch_rows(pool: usize, row_bytes: u64, max: usize) -> usize {
    let row = usize::try_from(row_bytes).unwrap_or(usize::MAX).max(1);
    (pool / BATCH_SHARE_OF_POOL / row).clamp(1, max)
}

fn hasher() -> RandomState {
    RandomState::with_seed(0x0bac_f111)
}

/// Tests squeeze every hash into a few values, so that the collision paths
/// (groups split by the real bytes) run on every archive.
#[cfg(test)]
static COLLIDE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn mix(h: u64) -> u64 {
    #[cfg(test)]
    if COLLIDE.load(Ordering::Relaxed) {
        return h & (3 << 32 | 3);
    }
    h
}

/// Which bucket a row hash goes to (bits from 32 up: the sort inside a
/// bucket uses the low 32, [`sort_hash`]).
fn bucket_of(h: u64, buckets: usize) -> usize {
    ((h >> 32) as usize) & (buckets - 1)
}

/// What the narrow pass found, and the candidates still to be fetched.
pub struct Detection {
    pub rows: u64,
    pub events: u64,
    /// (key, seq) pairs carried by more than one event_id.
    pub conflicts: u64,
    /// Gap rows found, unordered: [`Detection::gaps`] streams them in
    /// order.
    gaps: Mutex<GapSpill>,
    /// Unresolved events: what the fetch must find.
    pub candidates: u64,
    /// Scans of the archive the fetch makes: one per generation of the
    /// table of unresolved events (see [`Generations`]).
    pub generations: u64,
    /// Bytes written to spill files.
    pub spilled_bytes: u64,
    /// Milliseconds of the narrow pass (scan and shuffle) and of deciding
    /// the buckets.
    pub narrow_ms: u64,
    pub buckets_ms: u64,
    /// The narrow scan, for its metrics.
    pub narrow_plan: Arc<dyn ExecutionPlan>,
    /// `events` with the rows' positions, which the fetch reads (None: it
    /// reads `events`, by id).
    events_at: Option<DataFrame>,
    /// Rows per batch of the fetch and its sort ([`batch_rows`]).
    fetch_batch_rows: usize,
    /// The merge headroom of the fetch's sort: 16 of its batches, at most
    /// a quarter of the pool.
    fetch_merge_bytes: usize,
    shared: Arc<Shared>,
}

impl Detection {
    /// The gap rows in the `gaps` view's schema, ordered by key and first
    /// missing seq: one sort that spills (those past the gaps' share of the
    /// pool are read back from the spill folder). Once.
    pub async fn gaps(&self, ctx: &SessionContext) -> Result<SendableRecordBatchStream> {
        let (schema, rows) = {
            let mut g = self.gaps.lock().map_err(|_| poisoned("gaps"))?;
            let mem = std::mem::take(&mut g.mem);
            // Handed to the sort, which reserves what it holds.
            g.reservation.free();
            let file = g.file.take().map(|(p, _)| p);
            (g.schema.clone(), (mem, file, g.dir.take()))
        };
        let source = GapSource {
            schema: schema.clone(),
            rows: Mutex::new(Some(rows)),
        };
        let table = StreamingTable::try_new(schema, vec![Arc::new(source)])?;
        let mut config = ctx
            .copied_config()
            .with_create_default_catalog_and_schema(false);
        config.options_mut().optimizer.repartition_sorts = false;
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
            .with_config(config)
            .build();
        SessionContext::new_with_state(state)
            .read_table(Arc::new(table))?
            .sort(vec![
                col("key").sort(true, true),
                col("first_missing_seq").sort(true, true),
            ])?
            .execute_stream()
            .await
    }

    /// The chosen rows of the candidates: every column of `events` and the
    /// four the policy reads, unordered. Reading them is the second scan.
    ///
    /// The frame carries its own session settings, for the sort the caller
    /// puts on it (execute it with [`DataFrame::task_ctx`]): batches of
    /// [`batch_rows`] rows, so that wide rows fit the pool, and one sort
    /// over all partitions instead of one per partition and a merge of
    /// them. Those each merge their spill files with as much of the pool
    /// as they can get (DataFusion's multi-level merge is greedy), and the
    /// merge above them then found none left: `--memory-limit 64M` failed
    /// on a plain archive of 1M events, one run in two.
    pub async fn fetch(&self, ctx: &SessionContext) -> Result<DataFrame> {
        // Late materialization. With positions (a Parquet archive), each
        // file is read through a selection of its candidates' rows: the
        // reader decodes those rows and skips the pages of the others.
        // Without (a Kafka source in the archive), the membership test is
        // pushed into the Parquet reader as a row filter, which decodes
        // event_id, tests it, and decodes the wide columns (payload) of the
        // matching rows only.
        let mut events = match &self.events_at {
            Some(at) => at.clone(),
            None => ctx.table("events").await?,
        };
        if self.shared.positions.is_none() {
            let is_candidate = datafusion::logical_expr::ScalarUDF::new_from_impl(IsCandidate {
                shared: self.shared.clone(),
                signature: datafusion::logical_expr::Signature::any(
                    1,
                    datafusion::logical_expr::Volatility::Immutable,
                ),
            });
            events = events.filter(is_candidate.call(vec![col("event_id")]))?;
        }
        let (state, logical) = events.into_parts();
        // Not creating the default catalog again: the builder would replace
        // the shared one, and every table of `ctx` with it.
        let mut config = state
            .config()
            .clone()
            .with_create_default_catalog_and_schema(false);
        config.options_mut().execution.parquet.pushdown_filters = true;
        let config = config.with_batch_size(self.fetch_batch_rows);
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
            .with_config(config)
            .build();
        let plan = DataFrame::new(state, logical)
            .create_physical_plan()
            .await?;
        let mut fields: Vec<Field> = plan
            .schema()
            .fields()
            .iter()
            .filter(|f| f.name() != FILE_COLUMN && f.name() != ROW_COLUMN)
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend([
            Field::new(ARCHIVED_ATTEMPTS, DataType::Int64, false),
            Field::new(IN_CONFLICT, DataType::Boolean, false),
            Field::new(LEDGER_REPLAYS, DataType::Int64, false),
            Field::new(LEDGER_DEAD, DataType::Boolean, false),
            Field::new(AFTER_GAP, DataType::Boolean, false),
            Field::new(AFTER_CONFLICT, DataType::Boolean, false),
        ]);
        let schema = Arc::new(Schema::new(fields));
        let generations = !self
            .shared
            .generations
            .lock()
            .map_err(|_| poisoned("generations"))?
            .files
            .is_empty();
        let first = self.shared.positioned(&plan)?;
        let parts: Vec<Arc<dyn PartitionStream>> = if generations {
            // One partition that scans the archive once per generation:
            // each scan is all partitions at once (CoalescePartitionsExec:
            // the decoding stays parallel), one generation in memory.
            self.shared.reading.store(1, Ordering::Release);
            vec![Arc::new(FetchGenerations {
                plan: plan.clone(),
                first: Mutex::new(Some(first)),
                shared: self.shared.clone(),
                schema: schema.clone(),
                ctx: ctx.clone(),
            })]
        } else {
            let n = first.output_partitioning().partition_count();
            self.shared.reading.store(n, Ordering::Release);
            *self.shared.lock_scan()? = Some(first);
            (0..n)
                .map(|partition| {
                    Arc::new(Fetch {
                        partition,
                        shared: self.shared.clone(),
                        schema: schema.clone(),
                    }) as Arc<dyn PartitionStream>
                })
                .collect()
        };
        let table = StreamingTable::try_new(schema, parts)?;
        let mut config = ctx
            .copied_config()
            .with_batch_size(self.fetch_batch_rows)
            .with_create_default_catalog_and_schema(false);
        config.options_mut().optimizer.repartition_sorts = false;
        // The one sort's merge headroom: a few of its batches, more than
        // the session's share for one sort per core when the sort key is
        // as wide as the rows (ids of 5 KB: the merge of the batches it
        // spills holds their keys, and 5 MiB failed 6000 of them at 64M).
        let merge = &mut config.options_mut().execution.sort_spill_reservation_bytes;
        *merge = (*merge).max(self.fetch_merge_bytes);
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
            .with_config(config)
            .build();
        let sorting = SessionContext::new_with_state(state);
        sorting.read_table(Arc::new(table))
    }

    /// What the fetch's scans read, once the fetch has ended.
    pub fn fetch_metrics(&self) -> Result<super::ScanMetrics> {
        Ok(self
            .shared
            .scanned
            .lock()
            .map_err(|_| poisoned("scan metrics"))?
            .clone())
    }

    /// Gap recovery (`--recover-from`): move keys' gap barriers to the
    /// first seq still missing once the topic's events are counted in
    /// (`None`: every gap of the key was recovered, no barrier). Before the
    /// fetch, which reads the marks; keys not given keep theirs.
    pub fn reset_first_gaps(
        &mut self,
        first: impl IntoIterator<Item = (String, Option<i64>)>,
    ) -> Result<()> {
        let shared = Arc::get_mut(&mut self.shared).ok_or_else(|| {
            DataFusionError::Internal("the gap barriers were reset after the fetch began".into())
        })?;
        for (key, seq) in first {
            match seq {
                Some(seq) => shared.marks.by_key.entry(key).or_default().first_gap = Some(seq),
                None => {
                    if let Some(m) = shared.marks.by_key.get_mut(&key) {
                        m.first_gap = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// (in conflict, after a conflict, after a gap) of a (key, seq), as the
    /// fetch flags its rows: for rows that come from elsewhere (recovered
    /// from a topic) and join the candidates.
    pub fn flags(&self, key: &str, seq: i64) -> (bool, bool, bool) {
        self.shared.marks.flags(key, seq)
    }

    /// The retries the policy sees for an event with `attempts` of its
    /// own, as the fetch computes them (`--logs`): for rows that come from
    /// elsewhere (recovered from a topic).
    pub fn with_logs(&self, event_id: Option<&str>, attempts: i64) -> i64 {
        let lines = self
            .shared
            .logged
            .as_ref()
            .zip(event_id)
            .and_then(|(m, id)| m.get(id).map(|l| l.lines));
        with_logged(attempts, lines)
    }

    /// After the fetch stream ended: every candidate was found. Anything
    /// else means the archive changed between the two scans.
    pub fn check_fetched(&self) -> Result<()> {
        let got = self.shared.fetched.load(Ordering::SeqCst);
        if got != self.candidates {
            return Err(DataFusionError::Execution(format!(
                "the archive changed during the run: {} of {} unresolved events were not found again by the second scan; rerun when no file is being rewritten",
                self.candidates - got.min(self.candidates),
                self.candidates
            )));
        }
        Ok(())
    }
}

/// What the detection knows of the archive before reading it.
pub struct Shape {
    /// The footers' row count: sizes the buckets.
    pub est_rows: u64,
    /// The footers' widest rows: size the batches.
    pub row_bytes: RowBytes,
    /// For a Parquet archive, where its rows are and `events` with them
    /// ([`crate::source::events_at`]); None reads `events` and fetches by
    /// id.
    pub positioned: Option<(Arc<Positions>, DataFrame)>,
    /// `--logs`: per event, its error-level log lines
    /// ([`crate::source::logs::error_counts`]), read before the archive.
    pub logged: Option<Arc<LoggedErrors>>,
}

/// Per event named by an error-level log line, how many there are.
pub type LoggedErrors = datafusion::common::HashMap<String, crate::source::logs::Logged>;

/// The retries the policy sees (`sql/candidates.sql`): the archive's, or
/// the error lines' less the first try where they show more. Greatest,
/// not a sum: one failure archived and logged is one failure.
fn with_logged(archived: i64, error_lines: Option<u64>) -> i64 {
    match error_lines {
        Some(n) => archived.max(i64::try_from(n).unwrap_or(i64::MAX).saturating_sub(1)),
        None => archived,
    }
}

/// Run the narrow pass and decide every bucket; `gaps_schema` is the
/// `gaps` view's schema.
pub async fn detect(
    ctx: &SessionContext,
    scan: &Scan,
    shape: Shape,
    spill_dir: &Path,
    gaps_schema: SchemaRef,
    progress: Option<indicatif::ProgressBar>,
) -> Result<Detection> {
    let Shape {
        est_rows,
        row_bytes,
        positioned,
        logged,
    } = shape;
    let (positions, events) = match positioned {
        Some((p, events)) => (Some(p), events),
        None => (None, ctx.table("events").await?),
    };
    let events_at = positions.is_some().then(|| events.clone());
    let time_type = events
        .schema()
        .field_with_unqualified_name("event_time")?
        .data_type()
        .clone();
    let utf8 = |c: &str| cast_expr(col(c), DataType::Utf8).alias(c);
    let mut columns = vec![
        utf8("event_id"),
        utf8("key"),
        cast_expr(col("seq"), DataType::Int64).alias("seq"),
        datafusion::functions::expr_fn::coalesce(vec![
            cast_expr(col("attempts"), DataType::Int64),
            lit(0i64),
        ])
        .alias("attempts"),
        cast_expr(col("event_time"), DataType::Int64).alias("event_time"),
        col("backfill_done"),
        col(MISSING_EVENT_ID_COLUMN),
        utf8("status"),
        utf8("error"),
    ];
    // Where each row is archived, for the fetch to read the chosen rows
    // back by position ([`Positions`]).
    if positions.is_some() {
        columns.push(col(FILE_COLUMN));
        columns.push(col(ROW_COLUMN));
    }
    let narrow = events.select(columns)?;
    let plan = narrow.create_physical_plan().await?;
    let keys_on = scan.detect_gaps || scan.detect_conflicts;

    let pool = ctx.runtime_env().memory_pool.clone();
    let pool_bytes = crate::machine::pool_bytes(scan.memory_limit);
    // The buckets get the pool but what DataFusion's scans and the gap
    // rows need beside them (half of a small pool, 1 GiB of a large one):
    // nothing else is held before they are decided, and the candidates
    // grow only as decided buckets free more than they add.
    let budget = pool_bytes
        .saturating_sub((pool_bytes / 2).min(1 << 30))
        .max(1);
    // A bucket row holds the narrow strings (the footers say how wide)
    // besides its fixed columns.
    let wide = usize::try_from(row_bytes.narrow).unwrap_or(usize::MAX);
    // Enough buckets that one bucket's share of the budget holds it (four
    // times over: it is read back whole, and its sort entries come on top),
    // and small enough (~200k rows, a few MiB) that deciding it works in
    // the CPU's cache instead of missing it on every row.
    let buckets = |row_bytes: usize| {
        let for_memory = (est_rows as usize)
            .saturating_mul(row_bytes)
            .saturating_mul(4)
            / budget;
        let for_cache = est_rows as usize / BUCKET_ROWS;
        for_memory.max(for_cache).clamp(8, 4096).next_power_of_two()
    };
    // What killed runs left in the spill dir goes first (crate::spill).
    for gone in crate::spill::sweep(spill_dir) {
        tracing::info!(
            "removed {}: the spill folder of a run that was killed",
            gone.display()
        );
    }
    let dir = Arc::new(
        tempfile::Builder::new()
            .prefix("backfill-spill-")
            .tempdir_in(spill_dir)
            .map_err(|e| {
                DataFusionError::Execution(format!(
                    "cannot create a spill folder in {}: {e}",
                    spill_dir.display()
                ))
            })?,
    );
    // Best effort: on a file system without locks the folder is only not
    // removable by a later run, the run itself goes on.
    if let Err(e) = crate::spill::claim(dir.path()) {
        tracing::debug!(
            "spill folder {} not marked as this run's: {e}",
            dir.path().display()
        );
    }
    let reservation = MemoryConsumer::new("backfill one-pass detection")
        .with_can_spill(true)
        .register(&pool);
    let shuffle = Arc::new(Mutex::new(Shuffles {
        events: Shuffle::new(
            "events",
            event_bucket_schema(scan.shard.is_some()),
            buckets(EVENT_ROW_BYTES.max(wide.saturating_add(40))),
            dir.path(),
        ),
        keys: Shuffle::new(
            "keys",
            key_bucket_schema(),
            buckets(KEY_ROW_BYTES.max(wide.saturating_add(40))),
            dir.path(),
        ),
        reservation,
        budget,
        spilled_bytes: 0,
    }));

    // 1. The narrow pass: one task per scan partition.
    let started = std::time::Instant::now();
    let task = Arc::new(TaskContext::from(&ctx.state()).with_session_config(
        ctx.copied_config().with_batch_size(batch_rows(
            pool_bytes,
            row_bytes.narrow,
            NARROW_BATCH_ROWS,
        )),
    ));
    let n_parts = plan.output_partitioning().partition_count();
    let (p_events, p_keys) = {
        let s = shuffle.lock().expect("shuffle lock");
        (s.events.buckets.len(), s.keys.buckets.len())
    };
    let shard = scan.shard;
    let mut tasks = vec![];
    for p in 0..n_parts {
        let mut stream = plan.execute(p, task.clone())?;
        let shuffle = shuffle.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(b) = stream.next().await {
                let b = b?;
                if let Some(p) = &progress {
                    p.inc(b.num_rows() as u64);
                }
                let (e, k) = split(&b, p_events, p_keys, keys_on, shard)?;
                shuffle.lock().expect("shuffle lock").push(e, k)?;
            }
            Ok::<_, DataFusionError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| DataFusionError::External(Box::new(e)))??;
    }

    let narrow_ms = started.elapsed().as_millis() as u64;
    let started = std::time::Instant::now();
    // 2. Decide the buckets, two (or as many as cores) at a time.
    let (jobs, spilled_bytes, reservation) = {
        let mut s = shuffle.lock().expect("shuffle lock");
        let mut jobs: Vec<Job> = vec![];
        for b in std::mem::take(&mut s.events.buckets) {
            jobs.push(Job::Events(b));
        }
        for b in std::mem::take(&mut s.keys.buckets) {
            jobs.push(Job::Keys(
                b,
                scan.detect_gaps,
                scan.detect_gaps && scan.gap_barrier,
            ));
        }
        let r = s.reservation.new_empty();
        r.grow(s.reservation.size());
        s.reservation.free();
        (jobs, s.spilled_bytes, Arc::new(r))
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let detect_conflicts = scan.detect_conflicts;
    // Each bucket's result is folded in as it comes: held until all were
    // done, the candidates' intermediate rows (a String each) outweighed
    // the final table (50M events at `--memory-limit 1G`: +0.8 GiB).
    let mut outs = futures::stream::iter(jobs)
        .map(|job| {
            let reservation = reservation.clone();
            async move {
                tokio::task::spawn_blocking(move || job.run(&reservation, shard))
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?
            }
        })
        .buffer_unordered(threads);

    let mut rows = 0u64;
    let mut events_n = 0u64;
    // The table of unresolved events cannot spill: past half the pool its
    // rows go to a file, a generation that the fetch reads back and scans
    // the archive for once the one before is done (see `Generations`).
    let mut gens = Generations {
        current: Candidates::new(&pool, selection_bytes(positions.is_some())),
        files: vec![],
        count: 0,
        budget: (pool_bytes / 2).max(1),
        pool: pool.clone(),
    };
    let mut marks = KeyMarks::default();
    // Those of this shard's keys (all of them unsharded).
    let mut own_conflicts = 0u64;
    let mut gap_rows = GapSpill {
        schema: gaps_schema.clone(),
        mem: vec![],
        reservation: MemoryConsumer::new("backfill gaps")
            .with_can_spill(true)
            .register(&pool),
        budget: pool_bytes / 8,
        file: None,
        dir: None,
        spilled_bytes: 0,
    };
    while let Some(o) = outs.next().await {
        match o? {
            Out::Events(e) => {
                rows += e.rows;
                events_n += e.events;
                gens.absorb(e.cands, dir.path())?;
            }
            Out::Keys(k) => {
                for (key, seq, ours) in k.conflicts {
                    own_conflicts += u64::from(ours);
                    if detect_conflicts {
                        marks.conflict(key, seq);
                    }
                }
                for (key, seq) in k.first_gaps {
                    marks.first_gap(key, seq);
                }
                if k.gaps.len() > 0 {
                    gap_rows.push(k.gaps.finish(&gaps_schema, &time_type)?, &dir)?;
                }
            }
        }
    }
    drop(outs);
    reservation.free();
    let spilled_bytes = spilled_bytes + gens.files.iter().map(|f| f.1).sum::<u64>();
    marks.seal();
    let Generations {
        current: mut cands,
        mut files,
        count: candidates,
        budget: generation_budget,
        ..
    } = gens;
    // The last generation was full: scanning for an empty one would waste
    // a pass over the archive.
    if cands.len() == 0
        && let Some((path, _)) = files.pop()
    {
        cands = Candidates::read(&path, cands)?;
        let _ = std::fs::remove_file(&path);
    }
    // In generations, each holds the budget at least (see `floor`).
    let floor = if files.is_empty() {
        0
    } else {
        generation_budget
    };
    cands.floor = floor;
    // Generation files are read by the fetch; the folder goes with them.
    let dir = (!files.is_empty()).then_some(dir);
    let generations = 1 + files.len() as u64;
    let fetch_batch_rows = batch_rows(pool_bytes, row_bytes.wide, FETCH_BATCH_ROWS);
    cands.seal();
    let n_conflicts = own_conflicts;
    gap_rows.finish()?;
    let spilled_bytes = spilled_bytes + gap_rows.spilled_bytes;
    if ctx.table_exist("ledger_entries")? {
        cands.annotate_ledger(ctx).await?;
    }
    let buckets_ms = started.elapsed().as_millis() as u64;
    Ok(Detection {
        narrow_ms,
        buckets_ms,
        rows,
        events: events_n,
        conflicts: n_conflicts,
        gaps: Mutex::new(gap_rows),
        candidates,
        generations,
        spilled_bytes,
        narrow_plan: plan,
        events_at,
        fetch_batch_rows,
        fetch_merge_bytes: fetch_batch_rows
            .saturating_mul(usize::try_from(row_bytes.wide).unwrap_or(usize::MAX))
            .saturating_mul(16)
            .min(pool_bytes / 4),
        shared: Arc::new(Shared {
            cands: RwLock::new(Some(cands)),
            generations: Mutex::new(GenFiles { files, dir }),
            pool,
            marks,
            fetched: AtomicU64::new(0),
            probed: AtomicU64::new(0),
            reading: AtomicUsize::new(0),
            positions,
            scan: Mutex::new(None),
            scanned: Mutex::new(Default::default()),
            generation_floor: floor,
            logged,
        }),
    })
}

/// Gap rows from every bucket, as they come: kept while they fit their
/// share of the pool, then written to a file in the spill folder. There is
/// a gap row per event when seq is a counter shared across keys; held
/// whole (and then sorted and collected, twice that), they were outside
/// the pool: 1M of them failed `--memory-limit 64M`.
struct GapSpill {
    schema: SchemaRef,
    mem: Vec<RecordBatch>,
    reservation: MemoryReservation,
    budget: usize,
    /// Rows past the budget, and the folder that holds them.
    file: Option<(PathBuf, StreamWriter<BufWriter<File>>)>,
    dir: Option<Arc<tempfile::TempDir>>,
    spilled_bytes: u64,
}

impl GapSpill {
    fn push(&mut self, b: RecordBatch, dir: &Arc<tempfile::TempDir>) -> Result<()> {
        let size = b.get_array_memory_size();
        if self.file.is_none()
            && self.reservation.size() + size <= self.budget
            && self.reservation.try_grow(size).is_ok()
        {
            self.mem.push(b);
            return Ok(());
        }
        if self.file.is_none() {
            let path = dir.path().join("gaps.arrow");
            let f = File::create(&path).map_err(|e| spill_error(&path, e))?;
            let w = StreamWriter::try_new(BufWriter::new(f), &self.schema)
                .map_err(|e| spill_error(&path, e))?;
            self.file = Some((path, w));
            self.dir = Some(dir.clone());
        }
        if let Some((path, w)) = self.file.as_mut() {
            w.write(&b).map_err(|e| spill_error(path, e))?;
        }
        self.spilled_bytes += size as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some((path, w)) = self.file.as_mut() {
            w.finish().map_err(|e| spill_error(path, e))?;
        }
        Ok(())
    }
}

/// Gap rows to be read: those in memory, the file of the rest and the
/// folder that holds it.
type GapRowsLeft = (
    Vec<RecordBatch>,
    Option<PathBuf>,
    Option<Arc<tempfile::TempDir>>,
);

/// The gap rows as a partition: those in memory, then the file's.
struct GapSource {
    schema: SchemaRef,
    rows: Mutex<Option<GapRowsLeft>>,
}

impl std::fmt::Debug for GapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GapSource")
    }
}

impl PartitionStream for GapSource {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        let taken = self.rows.lock().ok().and_then(|mut r| r.take());
        let (mem, file, dir) = taken.unwrap_or_default();
        let from_file = file.map(|path| {
            let reader = File::open(&path)
                .map_err(|e| spill_error(&path, e))
                .and_then(|f| Ok(StreamReader::try_new(BufReader::new(f), None)?));
            let path2 = path.clone();
            let batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> = match reader {
                Ok(r) => Box::new(r.map(move |b| b.map_err(|e| spill_error(&path2, e)))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            // The file and its folder go when the rows are read.
            let done = futures::stream::once(async move {
                let _ = std::fs::remove_file(&path);
                drop(dir);
                None
            })
            .filter_map(futures::future::ready);
            futures::stream::iter(batches).chain(done)
        });
        let stream = futures::stream::iter(mem.into_iter().map(Ok));
        let stream: futures::stream::BoxStream<'static, Result<RecordBatch>> = match from_file {
            Some(f) => Box::pin(stream.chain(f)),
            None => Box::pin(stream),
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

// ---------------------------------------------------------------------------
// The shuffle

/// Columns of an event-bucket batch.
mod ev {
    pub const EID: usize = 0;
    pub const ATT: usize = 1;
    pub const TIME: usize = 2;
    pub const DONE: usize = 3;
    pub const STATUS: usize = 4;
    pub const ERROR: usize = 5;
    pub const HASH: usize = 6;
    pub const POS: usize = 7;
    /// The row's shard: of its key, or of its id without a key (sharded
    /// runs only).
    pub const SHARD: usize = 8;
}

/// Columns of a key-bucket batch.
mod kc {
    pub const KEY: usize = 0;
    pub const SEQ: usize = 1;
    pub const EID: usize = 2;
    pub const TIME: usize = 3;
    pub const MISSING: usize = 4;
    pub const HASH: usize = 5;
}

/// With `sharded`, each row's shard too ([`ev::SHARD`]).
fn event_bucket_schema(sharded: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("event_id", DataType::Utf8, true),
        Field::new("attempts", DataType::Int64, true),
        Field::new("event_time", DataType::Int64, true),
        Field::new("done", DataType::Boolean, true),
        Field::new("status", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("hash", DataType::UInt64, false),
        Field::new("pos", DataType::UInt64, false),
    ];
    if sharded {
        fields.push(Field::new("shard", DataType::UInt32, false));
    }
    Arc::new(Schema::new(fields))
}

fn key_bucket_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, true),
        Field::new("seq", DataType::Int64, true),
        Field::new("event_id", DataType::Utf8, true),
        Field::new("event_time", DataType::Int64, true),
        Field::new("missing", DataType::Boolean, true),
        Field::new("hash", DataType::UInt64, false),
    ]))
}

type Parts = Vec<(usize, RecordBatch)>;

/// One narrow batch into its event-bucket and key-bucket pieces.
fn split(
    b: &RecordBatch,
    p_events: usize,
    p_keys: usize,
    keys_on: bool,
    shard: Option<crate::shard::Shard>,
) -> Result<(Parts, Parts)> {
    let n = b.num_rows();
    if n == 0 {
        return Ok((vec![], vec![]));
    }
    let eid = b.column(0).clone();
    let key = b.column(1).clone();
    let seq = b.column(2).clone();
    let rs = hasher();
    let mut h = vec![0u64; n];
    create_hashes([&eid], &rs, &mut h)?;
    h.iter_mut().for_each(|h| *h = mix(*h));
    let mut columns = vec![
        eid.clone(),
        b.column(3).clone(),
        b.column(4).clone(),
        b.column(5).clone(),
        b.column(7).clone(),
        b.column(8).clone(),
        Arc::new(UInt64Array::from(h.clone())) as ArrayRef,
        Arc::new(positions(b)?.0),
    ];
    if let Some(shard) = shard {
        let (ids, keys) = (eid.as_string::<i32>(), key.as_string::<i32>());
        let of = |i: usize| match keys.is_valid(i) {
            true => shard.of(keys.value(i).as_bytes()),
            false => shard.of(ids.value(i).as_bytes()),
        };
        columns.push(Arc::new((0..n).map(of).collect::<UInt32Array>()));
    }
    let eb = RecordBatch::try_new(event_bucket_schema(shard.is_some()), columns)?;
    let e = partition(&eb, &h, p_events)?;
    if !keys_on {
        return Ok((e, vec![]));
    }
    let mut kb = RecordBatch::try_new(
        key_bucket_schema(),
        vec![
            key.clone(),
            seq.clone(),
            eid,
            b.column(4).clone(),
            b.column(6).clone(),
            Arc::new(UInt64Array::from(vec![0u64; n])),
        ],
    )?;
    if key.null_count() > 0 || seq.null_count() > 0 {
        let mask = and(&is_not_null(&key)?, &is_not_null(&seq)?)?;
        kb = filter_record_batch(&kb, &mask)?;
    }
    let m = kb.num_rows();
    if m == 0 {
        return Ok((e, vec![]));
    }
    let mut kh = vec![0u64; m];
    create_hashes([kb.column(kc::KEY)], &rs, &mut kh)?;
    kh.iter_mut().for_each(|h| *h = mix(*h));
    let mut cols = kb.columns().to_vec();
    cols[kc::HASH] = Arc::new(UInt64Array::from(kh.clone()));
    let kb = RecordBatch::try_new(kb.schema(), cols)?;
    Ok((e, partition(&kb, &kh, p_keys)?))
}

/// The archive's files in order, for positions: a row's position is
/// `file << 40 | row`, the ordinal of its file in this list and its index
/// in the file, which the narrow pass reads from the Parquet scan
/// (`input_file_name()`, `file_row_index()`). The fetch turns the
/// candidates' positions back into a row selection per file
/// ([`select_rows`]): it decodes the chosen rows and no others, and tests
/// no id but theirs.
#[derive(Debug)]
pub struct Positions {
    ordinals: std::collections::HashMap<String, u32>,
    /// Rows of each file, by ordinal.
    rows: Vec<u64>,
}

/// Bytes of a candidate's row selection, at most: a row to skip and one
/// to read, and its entry in [`Candidates::by_pos`].
const SELECTION_BYTES: usize = 48;

/// What the fetch holds per candidate beside the table: its row selection
/// when it reads by position, nothing when it tests ids.
fn selection_bytes(positioned: bool) -> usize {
    if positioned { SELECTION_BYTES } else { 0 }
}

/// A row's position: its file's ordinal and its index in the file.
fn position(file: u64, row: u64) -> u64 {
    file << ROW_BITS | (row & ROW_MASK)
}

/// Bytes per candidate that [`Candidates::seal`] adds: the hash table's
/// index and control byte at its load factor, and the filter's bits.
const SEAL_BYTES: usize = 8;

/// Bits of a position that hold the row: 2^40 rows in a file, 2^24 files.
const ROW_BITS: u32 = 40;
const ROW_MASK: u64 = (1 << ROW_BITS) - 1;

impl Positions {
    /// Files as `(path, rows)`, the path as the scan's `input_file_name()`
    /// gives it; None past what a position holds (2^24 files, 2^40 rows in
    /// one), where the fetch tests ids instead.
    pub fn new(files: Vec<(String, u64)>) -> Option<Self> {
        if files.len() >= 1 << (64 - ROW_BITS) || files.iter().any(|(_, n)| *n > ROW_MASK) {
            return None;
        }
        let mut ordinals = std::collections::HashMap::with_capacity(files.len());
        let mut rows = Vec::with_capacity(files.len());
        for (i, (path, n)) in files.into_iter().enumerate() {
            ordinals.insert(path, i as u32);
            rows.push(n);
        }
        Some(Positions { ordinals, rows })
    }

    fn ordinal(&self, path: &str) -> Option<u32> {
        self.ordinals.get(path).copied()
    }
}

/// `plan` reading only the rows at the positions of `pos` (sorted, with
/// their candidates: [`Candidates::by_pos`]): every Parquet file of
/// its scans gets a [`ParquetRowSelection`] of the rows chosen in it, and
/// a file with none is not opened. The row filters and page index of the
/// scan stay as they were; a file the positions do not know is read whole
/// (the fetch tests each row's id all the same).
///
/// [`ParquetRowSelection`]: datafusion::datasource::physical_plan::parquet::ParquetRowSelection
fn select_rows(
    plan: Arc<dyn ExecutionPlan>,
    positions: &Positions,
    by_pos: &[(u64, u32)],
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
    use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
    use datafusion::datasource::source::DataSourceExec;
    use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
    let pos = |i: usize| by_pos[i].0;
    let mut selections = std::collections::HashMap::new();
    let mut i = 0;
    while i < by_pos.len() {
        let file = pos(i) >> ROW_BITS;
        let total = *positions.rows.get(file as usize).ok_or_else(|| {
            DataFusionError::Internal(format!("a position names file {file}, beyond the archive"))
        })?;
        // At most a skip and a select per row and a skip at the end: sized
        // exactly, since a doubling vector held twice the reservation
        // (5.5M unresolved events at `--memory-limit 1G`: 1,044 MiB RSS).
        let end = i + by_pos[i..].partition_point(|(p, _)| p >> ROW_BITS == file);
        let mut selectors: Vec<RowSelector> = Vec::with_capacity(2 * (end - i) + 1);
        let mut at = 0u64;
        while i < end {
            let row = pos(i) & ROW_MASK;
            i += 1;
            if row < at {
                continue;
            }
            if row >= total {
                return Err(DataFusionError::Internal(format!(
                    "a position names row {row} of file {file}, which has {total}"
                )));
            }
            if row > at {
                selectors.push(RowSelector::skip((row - at) as usize));
            }
            match selectors.last_mut() {
                Some(s) if !s.skip => s.row_count += 1,
                _ => selectors.push(RowSelector::select(1)),
            }
            at = row + 1;
        }
        if total > at {
            selectors.push(RowSelector::skip((total - at) as usize));
        }
        selections.insert(
            file as u32,
            Arc::new(ParquetRowSelection::new(RowSelection::from(selectors))),
        );
    }
    plan.transform_up(|node| {
        let Some(ds) = node.downcast_ref::<DataSourceExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(config) = ds.data_source().downcast_ref::<FileScanConfig>() else {
            return Ok(Transformed::no(node));
        };
        let mut config = config.clone();
        config.file_groups = config
            .file_groups
            .iter()
            .map(|g| {
                FileGroup::new(
                    g.iter()
                        .filter_map(
                            |f| match positions.ordinal(f.object_meta.location.as_ref()) {
                                None => Some(f.clone()),
                                Some(o) => selections.get(&o).map(|sel| {
                                    let mut f = f.clone();
                                    f.extensions.insert_arc(sel.clone());
                                    f
                                }),
                            },
                        )
                        .collect(),
                )
            })
            .collect();
        Ok(Transformed::yes(
            DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
        ))
    })
    .map(|t| t.data)
}

/// Each row's place in the archive ([`position`]; 0 when the batch has no
/// position columns: a Kafka source), with the indices of those columns.
fn positions(b: &RecordBatch) -> Result<(UInt64Array, Option<(usize, usize)>)> {
    let schema = b.schema();
    let (Ok(f), Ok(r)) = (schema.index_of(FILE_COLUMN), schema.index_of(ROW_COLUMN)) else {
        return Ok((UInt64Array::from(vec![0u64; b.num_rows()]), None));
    };
    let file = cast(b.column(f), &DataType::UInt64)?;
    let row = cast(b.column(r), &DataType::UInt64)?;
    let pos = file
        .as_primitive::<UInt64Type>()
        .values()
        .iter()
        .zip(row.as_primitive::<UInt64Type>().values())
        .map(|(f, r)| position(*f, *r))
        .collect();
    Ok((pos, Some((f, r))))
}

/// `backfill_file_ordinal(input_file_name())`, the `backfill_file` column
/// of [`crate::source::events_at`]: a file's place in the archive's file
/// list. Evaluated inside the scan, where its argument is the file's path
/// as one value for the whole batch.
pub fn file_ordinal(positions: &Arc<Positions>) -> datafusion::logical_expr::ScalarUDF {
    datafusion::logical_expr::ScalarUDF::new_from_impl(FileOrdinal {
        positions: positions.clone(),
        signature: datafusion::logical_expr::Signature::any(
            1,
            datafusion::logical_expr::Volatility::Immutable,
        ),
    })
}

#[derive(Debug)]
struct FileOrdinal {
    positions: Arc<Positions>,
    signature: datafusion::logical_expr::Signature,
}

impl PartialEq for FileOrdinal {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for FileOrdinal {}

impl std::hash::Hash for FileOrdinal {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.positions.rows.len().hash(state)
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for FileOrdinal {
    fn name(&self) -> &str {
        "backfill_file_ordinal"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt32)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<datafusion::logical_expr::ColumnarValue> {
        use datafusion::common::ScalarValue;
        use datafusion::logical_expr::ColumnarValue;
        let find = |p: &str| {
            self.positions.ordinal(p).ok_or_else(|| {
                DataFusionError::Internal(format!("{p} is not a file of the archive"))
            })
        };
        match &args.args[0] {
            ColumnarValue::Scalar(v) => match v {
                ScalarValue::Utf8(Some(p))
                | ScalarValue::Utf8View(Some(p))
                | ScalarValue::LargeUtf8(Some(p)) => {
                    Ok(ColumnarValue::Scalar(ScalarValue::UInt32(Some(find(p)?))))
                }
                other => Err(DataFusionError::Internal(format!(
                    "backfill_file_ordinal of {other}"
                ))),
            },
            ColumnarValue::Array(a) => {
                let a = cast(a, &DataType::Utf8)?;
                let a = a.as_string::<i32>();
                let out: Result<Vec<u32>> = a.iter().map(|p| find(p.unwrap_or_default())).collect();
                Ok(ColumnarValue::Array(Arc::new(
                    arrow::array::UInt32Array::from(out?),
                )))
            }
        }
    }
}

fn partition(b: &RecordBatch, hashes: &[u64], buckets: usize) -> Result<Parts> {
    if buckets == 1 {
        return Ok(vec![(0, b.clone())]);
    }
    let mut idx: Vec<Vec<u32>> = vec![vec![]; buckets];
    for (i, h) in hashes.iter().enumerate() {
        idx[bucket_of(*h, buckets)].push(i as u32);
    }
    let mut out = vec![];
    for (bucket, rows) in idx.into_iter().enumerate() {
        if !rows.is_empty() {
            out.push((bucket, take_record_batch(b, &UInt32Array::from(rows))?));
        }
    }
    Ok(out)
}

struct Shuffles {
    events: Shuffle,
    keys: Shuffle,
    reservation: MemoryReservation,
    budget: usize,
    spilled_bytes: u64,
}

impl Shuffles {
    /// Keep the pieces in memory if the reservation allows; otherwise
    /// spill the largest buckets until it does (or spill the pieces).
    fn push(&mut self, e: Parts, k: Parts) -> Result<()> {
        let size: usize = e
            .iter()
            .chain(k.iter())
            .map(|(_, b)| b.get_array_memory_size())
            .sum();
        loop {
            if self.reservation.size() + size <= self.budget
                && self.reservation.try_grow(size).is_ok()
            {
                self.events.keep(e);
                self.keys.keep(k);
                return Ok(());
            }
            let (se, ie) = self.events.largest();
            let (sk, ik) = self.keys.largest();
            let freed = if se == 0 && sk == 0 {
                break;
            } else if se >= sk {
                self.events.spill(ie)?
            } else {
                self.keys.spill(ik)?
            };
            self.reservation.shrink(freed.min(self.reservation.size()));
            self.spilled_bytes += freed as u64;
        }
        for (i, b) in e {
            self.spilled_bytes += self.events.buckets[i].write(&b)? as u64;
        }
        for (i, b) in k {
            self.spilled_bytes += self.keys.buckets[i].write(&b)? as u64;
        }
        Ok(())
    }
}

struct Shuffle {
    buckets: Vec<Bucket>,
}

impl Shuffle {
    fn new(name: &str, schema: SchemaRef, n: usize, dir: &Path) -> Self {
        Shuffle {
            buckets: (0..n)
                .map(|i| Bucket {
                    path: dir.join(format!("{name}-{i:05}.arrow")),
                    schema: schema.clone(),
                    mem: vec![],
                    bytes: 0,
                    writer: None,
                })
                .collect(),
        }
    }

    fn keep(&mut self, parts: Parts) {
        for (i, b) in parts {
            let bucket = &mut self.buckets[i];
            bucket.bytes += b.get_array_memory_size();
            bucket.mem.push(b);
        }
    }

    fn largest(&self) -> (usize, usize) {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (b.bytes, i))
            .max()
            .unwrap_or((0, 0))
    }

    /// Write a bucket's batches to its file; the bytes freed.
    fn spill(&mut self, i: usize) -> Result<usize> {
        let b = &mut self.buckets[i];
        for batch in std::mem::take(&mut b.mem) {
            b.write(&batch)?;
        }
        Ok(std::mem::take(&mut b.bytes))
    }
}

struct Bucket {
    path: PathBuf,
    /// Of every batch, in memory or in the spill file.
    schema: SchemaRef,
    mem: Vec<RecordBatch>,
    /// Memory of `mem`, as reserved.
    bytes: usize,
    writer: Option<StreamWriter<BufWriter<File>>>,
}

impl Bucket {
    fn write(&mut self, b: &RecordBatch) -> Result<usize> {
        if self.writer.is_none() {
            let f = File::create(&self.path).map_err(|e| spill_error(&self.path, e))?;
            self.writer = Some(StreamWriter::try_new(BufWriter::new(f), &self.schema)?);
        }
        // A full disk shows here: name the file, so the spill dir is known.
        self.writer
            .as_mut()
            .expect("writer")
            .write(b)
            .map_err(|e| spill_error(&self.path, e))?;
        Ok(b.get_array_memory_size())
    }

    /// Every batch of the bucket: those in memory and those spilled. The
    /// bytes read back are reserved (forcibly: the bucket must be decided)
    /// and returned for release.
    fn load(mut self, reservation: &MemoryReservation) -> Result<(Vec<RecordBatch>, usize, usize)> {
        let mut batches = std::mem::take(&mut self.mem);
        let mut loaded = 0;
        if let Some(mut w) = self.writer.take() {
            w.finish().map_err(|e| spill_error(&self.path, e))?;
            drop(w);
            let f = File::open(&self.path).map_err(|e| spill_error(&self.path, e))?;
            for b in StreamReader::try_new(BufReader::new(f), None)? {
                let b = b?;
                loaded += b.get_array_memory_size();
                batches.push(b);
            }
            reservation.grow(loaded);
            let _ = std::fs::remove_file(&self.path);
        }
        Ok((batches, self.bytes, loaded))
    }
}

fn spill_error(path: &Path, e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("spill file {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Deciding a bucket

enum Job {
    Events(Bucket),
    /// A key bucket, whether its gap rows are wanted (conflicts alone
    /// need no gaps), and whether each key's first gap is (the gap
    /// barrier, [`Scan::gap_barrier`]).
    Keys(Bucket, bool, bool),
}

enum Out {
    Events(EventsOut),
    Keys(Box<KeysOut>),
}

impl Job {
    fn run(
        self,
        reservation: &MemoryReservation,
        shard: Option<crate::shard::Shard>,
    ) -> Result<Out> {
        let (bucket, gaps) = match self {
            Job::Events(b) => (b, None),
            Job::Keys(b, gaps, barrier) => (b, Some((gaps, barrier))),
        };
        let (batches, kept, loaded) = bucket.load(reservation)?;
        let out = match gaps {
            None => Out::Events(decide_events(&batches, shard)?),
            Some((gaps, barrier)) => {
                Out::Keys(Box::new(decide_keys(&batches, gaps, barrier, shard)?))
            }
        };
        drop(batches);
        reservation.shrink((kept + loaded).min(reservation.size()));
        Ok(out)
    }
}

struct EvCols<'a> {
    eid: &'a StringArray,
    status: &'a StringArray,
    error: &'a StringArray,
}

fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

fn opt_i64(a: &Int64Array, i: usize) -> Option<i64> {
    a.is_valid(i).then(|| a.value(i))
}

/// `ORDER BY x` in DataFusion: ascending, NULLs last.
fn cmp_nulls_last(a: Option<&str>, b: Option<&str>) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Less,
        (None, Some(_)) => Greater,
        (None, None) => Equal,
    }
}

struct EventsOut {
    rows: u64,
    events: u64,
    cands: Vec<Cand>,
}

/// An unresolved event and its chosen row's fingerprint.
struct Cand {
    event_id: String,
    /// The chosen row's place (`file << 40 | row`; 0 without positions).
    pos: u64,
    attempts: i64,
    time: Option<i64>,
    /// Several rows share (attempts, time): the chosen one's (status, error).
    tie: Option<(Option<String>, Option<String>)>,
}

/// One row of an event bucket with what the decision reads, so that the
/// sweep after the sort reads memory in order; the batches are visited
/// again only for ids (groups of several rows, candidates) and ties.
#[derive(Clone, Copy)]
struct EvRow {
    h: u64,
    pos: u64,
    /// The row's shard (0 when the run is not sharded).
    shard: u32,
    att: i64,
    time: i64,
    b: u32,
    r: u32,
    has_time: bool,
    done: bool,
}

impl EvRow {
    fn time(&self) -> Option<i64> {
        self.has_time.then_some(self.time)
    }
}

fn decide_events(batches: &[RecordBatch], shard: Option<crate::shard::Shard>) -> Result<EventsOut> {
    let cols: Vec<EvCols> = batches
        .iter()
        .map(|b| EvCols {
            eid: b.column(ev::EID).as_string::<i32>(),
            status: b.column(ev::STATUS).as_string::<i32>(),
            error: b.column(ev::ERROR).as_string::<i32>(),
        })
        .collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut entries: Vec<EvRow> = Vec::with_capacity(total);
    for (bi, b) in batches.iter().enumerate() {
        let h = b.column(ev::HASH).as_primitive::<UInt64Type>().values();
        let att = b.column(ev::ATT).as_primitive::<Int64Type>();
        let time = b.column(ev::TIME).as_primitive::<Int64Type>();
        let done = b.column(ev::DONE).as_boolean();
        let pos = b.column(ev::POS).as_primitive::<UInt64Type>().values();
        let row_shard = shard.map(|_| b.column(ev::SHARD).as_primitive::<UInt32Type>().values());
        for (r, h) in h.iter().enumerate() {
            entries.push(EvRow {
                h: *h,
                pos: pos[r],
                shard: row_shard.map_or(0, |s| s[r]),
                att: att.value(r),
                time: time.value(r),
                b: bi as u32,
                r: r as u32,
                has_time: time.is_valid(r),
                done: done.is_valid(r) && done.value(r),
            });
        }
    }
    let mut entries = sort_by_hash(entries, |e| e.h);
    let eid = |e: &EvRow| cols[e.b as usize].eid.value(e.r as usize);
    let mut out = EventsOut {
        rows: 0,
        events: 0,
        cands: vec![],
    };
    for_each_group(
        &mut entries,
        |e| sort_hash(e.h),
        eid,
        |_, _| std::cmp::Ordering::Equal,
        |rows| {
            // Each event is one shard's: the lowest of its rows' (see
            // crate::shard).
            let ours = shard.is_none_or(|s| rows.iter().map(|e| e.shard).min() == Some(s.index));
            if ours {
                decide_event(&cols, rows, &mut out)
            }
        },
    );
    Ok(out)
}

/// The part of a row hash that orders a bucket: its low 32 bits, which
/// [`bucket_of`] leaves free (it takes bits from 32 up). Distinct values
/// that share them are split by [`for_each_group`] like any collision: a
/// bucket of 200k events holds a handful of such pairs.
fn sort_hash(h: u64) -> u64 {
    h & 0xFFFF_FFFF
}

/// `entries` ordered by [`sort_hash`], the rows of one value in their
/// order before: a stable LSD radix sort of (hash, index) pairs in three
/// passes of 11 bits, then one gather. Sorting the rows themselves (40-48
/// bytes each) by comparisons took a tenth of a 10M-event run's CPU.
fn sort_by_hash<T: Copy>(entries: Vec<T>, hash: impl Fn(&T) -> u64) -> Vec<T> {
    const BITS: u32 = 11;
    const RADIX: usize = 1 << BITS;
    let n = entries.len();
    if n <= 256 || n > u32::MAX as usize {
        let mut entries = entries;
        entries.sort_by_key(|e| sort_hash(hash(e)));
        return entries;
    }
    let mut keys: Vec<u64> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| sort_hash(hash(e)) << 32 | i as u64)
        .collect();
    let mut counts = [[0usize; RADIX]; 3];
    for k in &keys {
        for (d, c) in counts.iter_mut().enumerate() {
            c[((k >> (32 + d as u32 * BITS)) as usize) & (RADIX - 1)] += 1;
        }
    }
    let mut out = vec![0u64; n];
    for (d, c) in counts.iter_mut().enumerate() {
        // All rows share this digit: the pass would copy them in order.
        if c.contains(&n) {
            continue;
        }
        let mut sum = 0;
        for x in c.iter_mut() {
            let v = *x;
            *x = sum;
            sum += v;
        }
        for k in &keys {
            let digit = ((k >> (32 + d as u32 * BITS)) as usize) & (RADIX - 1);
            out[c[digit]] = *k;
            c[digit] += 1;
        }
        std::mem::swap(&mut keys, &mut out);
    }
    keys.iter().map(|k| entries[*k as u32 as usize]).collect()
}

/// Each group of `entries` (sorted by hash) that shares one real value:
/// a run of one hash is one group unless its values differ (a collision:
/// [`sort_hash`] keeps 32 bits), then it is sorted by the values (and
/// `then`) and split.
fn for_each_group<'a, T>(
    entries: &mut [T],
    hash: impl Fn(&T) -> u64,
    value: impl Fn(&T) -> &'a str,
    then: impl Fn(&T, &T) -> std::cmp::Ordering,
    mut f: impl FnMut(&[T]),
) {
    let mut i = 0;
    while i < entries.len() {
        let mut j = i + 1;
        while j < entries.len() && hash(&entries[j]) == hash(&entries[i]) {
            j += 1;
        }
        let run = &mut entries[i..j];
        if run.len() > 1 && run.iter().any(|e| value(e) != value(&run[0])) {
            run.sort_by(|a, b| value(a).cmp(value(b)).then_with(|| then(a, b)));
            let mut s = 0;
            while s < run.len() {
                let mut t = s + 1;
                while t < run.len() && value(&run[t]) == value(&run[s]) {
                    t += 1;
                }
                f(&run[s..t]);
                s = t;
            }
        } else {
            f(run);
        }
        i = j;
    }
}

/// The rows of one event: resolved, or its chosen row (the `unprocessed`
/// view: highest attempts, then latest event_time with NULL last, then the
/// smallest status and error with NULL last).
fn decide_event(cols: &[EvCols], rows: &[EvRow], out: &mut EventsOut) {
    out.rows += rows.len() as u64;
    out.events += 1;
    if rows.iter().any(|e| e.done) {
        return;
    }
    let c = |e: &EvRow| (&cols[e.b as usize], e.r as usize);
    let max_att = rows.iter().map(|e| e.att).max().unwrap_or(0);
    let chosen_time = rows
        .iter()
        .filter(|e| e.att == max_att)
        .filter_map(EvRow::time)
        .max();
    let mut best: Option<&EvRow> = None;
    let mut matching = 0;
    for e in rows
        .iter()
        .filter(|e| e.att == max_att && e.time() == chosen_time)
    {
        matching += 1;
        best = match best {
            None => Some(e),
            Some(b) => {
                let (cb, rb) = c(b);
                let (ce, re) = c(e);
                let ord = cmp_nulls_last(opt_str(ce.status, re), opt_str(cb.status, rb))
                    .then_with(|| cmp_nulls_last(opt_str(ce.error, re), opt_str(cb.error, rb)));
                if ord == std::cmp::Ordering::Less {
                    Some(e)
                } else {
                    Some(b)
                }
            }
        };
    }
    let best = best.expect("an event has a row");
    let (cb, rb) = c(best);
    out.cands.push(Cand {
        event_id: cb.eid.value(rb).to_string(),
        pos: best.pos,
        attempts: max_att,
        time: chosen_time,
        tie: (matching > 1).then(|| {
            (
                opt_str(cb.status, rb).map(str::to_string),
                opt_str(cb.error, rb).map(str::to_string),
            )
        }),
    });
}

struct KeysOut {
    /// (key, seq, the key is this run's shard's).
    conflicts: Vec<(String, i64, bool)>,
    gaps: GapRows,
    /// (key, its first missing seq), for the gap barrier: every key's,
    /// this shard's or not (an event of this shard may sit under another
    /// shard's key, as for conflicts).
    first_gaps: Vec<(String, i64)>,
}

struct KCols<'a> {
    key: &'a StringArray,
    eid: &'a StringArray,
}

/// One observed seq of a key: the row of the smallest event_id among the
/// rows that have one of their own, and that id's earliest event_time.
#[derive(Clone, Copy)]
struct Seen {
    seq: i64,
    eid: Option<(u32, u32)>,
    time: Option<i64>,
}

/// One row of a key bucket with what the sweep reads (see [`EvRow`]).
#[derive(Clone, Copy)]
struct KRow {
    h: u64,
    seq: i64,
    time: i64,
    b: u32,
    r: u32,
    has_time: bool,
    missing: bool,
}

fn decide_keys(
    batches: &[RecordBatch],
    gaps: bool,
    barrier: bool,
    shard: Option<crate::shard::Shard>,
) -> Result<KeysOut> {
    let cols: Vec<KCols> = batches
        .iter()
        .map(|b| KCols {
            key: b.column(kc::KEY).as_string::<i32>(),
            eid: b.column(kc::EID).as_string::<i32>(),
        })
        .collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut entries: Vec<KRow> = Vec::with_capacity(total);
    for (bi, b) in batches.iter().enumerate() {
        let h = b.column(kc::HASH).as_primitive::<UInt64Type>().values();
        let seq = b.column(kc::SEQ).as_primitive::<Int64Type>().values();
        let time = b.column(kc::TIME).as_primitive::<Int64Type>();
        let missing = b.column(kc::MISSING).as_boolean();
        for r in 0..b.num_rows() {
            entries.push(KRow {
                h: h[r],
                seq: seq[r],
                time: time.value(r),
                b: bi as u32,
                r: r as u32,
                has_time: time.is_valid(r),
                missing: missing.is_valid(r) && missing.value(r),
            });
        }
    }
    let mut entries = sort_by_hash(entries, |e| e.h);
    // Each key's rows in seq order; they come nearly so (an archive is
    // written in time order), which the stable sort walks in one pass.
    for run in entries.chunk_by_mut(|a, b| sort_hash(a.h) == sort_hash(b.h)) {
        if !run.is_sorted_by_key(|e| e.seq) {
            run.sort_by_key(|e| e.seq);
        }
    }
    let key = |e: &KRow| cols[e.b as usize].key.value(e.r as usize);
    let mut out = KeysOut {
        conflicts: vec![],
        gaps: GapRows::default(),
        first_gaps: vec![],
    };
    for_each_group(
        &mut entries,
        |e| sort_hash(e.h),
        key,
        |a, b| a.seq.cmp(&b.seq),
        |rows| decide_key(&cols, rows, gaps, barrier, shard, &mut out),
    );
    Ok(out)
}

/// The rows of one key, ordered by seq: its conflicts (the `conflicts`
/// view) and, if wanted, its gaps (the `gaps` view).
///
/// In a sharded run, a key of another shard gives no gap rows, and its
/// conflicts are kept (an event of this shard may have a row under it)
/// but not counted.
fn decide_key(
    cols: &[KCols],
    rows: &[KRow],
    gaps: bool,
    barrier: bool,
    shard: Option<crate::shard::Shard>,
    out: &mut KeysOut,
) {
    let eid = |e: &KRow| cols[e.b as usize].eid.value(e.r as usize);
    let key = cols[rows[0].b as usize].key.value(rows[0].r as usize);
    let ours = shard.is_none_or(|s| s.holds(key.as_bytes()));
    let gaps = gaps && ours;
    let mut barrier = barrier;
    let time = |e: &KRow| e.has_time.then_some(e.time);
    let mut prev: Option<Seen> = None;
    let mut i = 0;
    while i < rows.len() {
        let seq = rows[i].seq;
        let mut j = i;
        while j < rows.len() && rows[j].seq == seq {
            j += 1;
        }
        let group = &rows[i..j];
        let own = || group.iter().filter(|e| !e.missing);
        let mut ids = own();
        let seen = match (ids.next(), ids.next()) {
            (None, _) => Seen {
                seq,
                eid: None,
                time: None,
            },
            // The common case: one row, no id to compare.
            (Some(one), None) => Seen {
                seq,
                eid: Some((one.b, one.r)),
                time: time(one),
            },
            _ => {
                let min = own().min_by(|a, b| eid(a).cmp(eid(b))).expect("two rows");
                let max = own().max_by(|a, b| eid(a).cmp(eid(b))).expect("two rows");
                let min_id = eid(min);
                if min_id < eid(max) {
                    out.conflicts.push((key.to_string(), seq, ours));
                }
                Seen {
                    seq,
                    eid: Some((min.b, min.r)),
                    time: own().filter(|e| eid(e) == min_id).filter_map(time).min(),
                }
            }
        };
        if let Some(p) = prev
            && barrier
            && seq - 1 > p.seq
        {
            // The key's first gap (rows come in seq order): the barrier.
            out.first_gaps.push((key.to_string(), p.seq + 1));
            barrier = false;
        }
        if let Some(p) = prev
            && gaps
            && seq - 1 > p.seq
        {
            let missing = ((seq as i128 - 1) - p.seq as i128).min(i64::MAX as i128) as i64;
            let id = |s: &Seen| s.eid.map(|(b, r)| cols[b as usize].eid.value(r as usize));
            out.gaps.push(
                key,
                p.seq,
                id(&p),
                p.time,
                seen.seq,
                id(&seen),
                seen.time,
                missing,
            );
        }
        prev = Some(seen);
        i = j;
    }
}

#[derive(Default)]
struct GapRows {
    key: StringBuilder,
    first: Vec<i64>,
    last: Vec<i64>,
    missing: Vec<i64>,
    before_id: StringBuilder,
    before_time: Vec<Option<i64>>,
    after_id: StringBuilder,
    after_time: Vec<Option<i64>>,
}

impl GapRows {
    fn len(&self) -> usize {
        self.first.len()
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key: &str,
        before_seq: i64,
        before_id: Option<&str>,
        before_time: Option<i64>,
        after_seq: i64,
        after_id: Option<&str>,
        after_time: Option<i64>,
        missing: i64,
    ) {
        self.key.append_value(key);
        self.first.push(before_seq + 1);
        self.last.push(after_seq - 1);
        self.missing.push(missing);
        self.before_id.append_option(before_id);
        self.before_time.push(before_time);
        self.after_id.append_option(after_id);
        self.after_time.push(after_time);
    }

    /// As a batch of the `gaps` view's schema (times back in the stored
    /// unit and zone).
    fn finish(mut self, schema: &SchemaRef, time_type: &DataType) -> Result<RecordBatch> {
        let time = |v: Vec<Option<i64>>| -> Result<ArrayRef> {
            Ok(cast(&Int64Array::from(v), time_type)?)
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.key.finish()),
            Arc::new(Int64Array::from(self.first)),
            Arc::new(Int64Array::from(self.last)),
            Arc::new(Int64Array::from(self.missing)),
            Arc::new(self.before_id.finish()),
            time(self.before_time)?,
            Arc::new(self.after_id.finish()),
            time(self.after_time)?,
        ];
        let cols = cols
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| Ok(cast(&c, f.data_type())?))
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

// ---------------------------------------------------------------------------
// Candidates and the fetch

/// Unresolved events, in fixed slots with a hash table of indices: about
/// 56 bytes an event whose id is a UUID (kept in its slot), other ids their
/// length more (in an arena), so that tens of millions of
/// them fit. What they hold is reserved in DataFusion's pool, so that the
/// sort of the fetched rows, which runs while they are alive, spills sooner
/// instead of pushing the process past `--memory-limit`; they are dropped
/// as soon as the fetch has read the archive, before that sort merges.
struct Candidates {
    reservation: MemoryReservation,
    /// One bit per hash value (a Bloom filter with one probe), a few MiB
    /// that stay in the CPU cache: most rows of the second scan are not
    /// candidates and are turned away here without touching the table.
    bits: Vec<u64>,
    table: HashTable<u32>,
    /// Ids other than canonical UUIDs, as the archive spells them, in
    /// chunks that are never reallocated.
    ids: Vec<Vec<u8>>,
    /// Each candidate's fixed fields, together: the fetch looks a row's
    /// candidate up at random, and one slot is one or two cache lines
    /// where the fields in arrays of their own were one miss each (eight
    /// for a hit, the table's included: 10M events spent a tenth of the
    /// CPU there).
    slots: ChunkVec<Slot>,
    /// Each candidate's chosen row, `file << 40 | row` (0 without
    /// positions): the fetch reads these rows and no others.
    pos: ChunkVec<u64>,
    /// (position, candidate) in position order, while the fetch reads by
    /// position: a fetched row finds its candidate by its place, with no
    /// hashing and no probe of the table (those were 7 % of a 10M run's
    /// CPU, cache misses all).
    by_pos: Vec<(u64, u32)>,
    ties: Vec<(Option<String>, Option<String>)>,
    /// Bytes of the fetch's row selection per candidate
    /// ([`SELECTION_BYTES`] with positions, else 0): reserved with the
    /// table, since the selection lives as long as it.
    selection_bytes: usize,
    /// The least the reservation holds: in generations, the budget of one,
    /// kept while the next is read, so that the sort running beside them
    /// does not take the room a larger generation then needs (it held
    /// 19 MiB of a 40 MiB pool when a generation of 21 MiB came in, and
    /// its merge found nothing left).
    floor: usize,
}

/// One candidate, 48 bytes.
struct Slot {
    /// A canonical UUID's 16 bytes ([`UUID`] in `flags`), or the
    /// [`IdAt`] of the id in the arena (the first 8 bytes).
    id: [u8; 16],
    attempts: i64,
    /// The chosen row's event_time; [`NO_TIME`] in `flags` when NULL.
    time: i64,
    /// The chosen row's (status, error) in `ties`, when another row of the
    /// event has the same attempts and time; [`NO_TIE`] otherwise.
    tie: u32,
    /// Replays by earlier committed runs (the ledger), saturated.
    replays: u32,
    /// [`TAKEN`], [`DEAD`], [`NO_TIME`], [`UUID`].
    flags: AtomicU8,
}

/// A candidate's id as stored.
#[derive(Debug, PartialEq)]
enum StoredId<'a> {
    Uuid(&'a [u8; 16]),
    /// Any other id, as the archive spells it.
    Raw(&'a [u8]),
}

/// The chosen row was found by the fetch (claimed once: duplicates of the
/// row in the archive are not fetched twice).
const TAKEN: u8 = 1;
/// An earlier committed run dead-lettered the event (the ledger).
const DEAD: u8 = 2;
/// The chosen row's event_time is NULL.
const NO_TIME: u8 = 4;
/// The id is a canonical UUID, stored in the slot itself.
const UUID: u8 = 8;

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lowercase hex, as 16 bytes.
fn parse_uuid(id: &[u8]) -> Option<[u8; 16]> {
    if id.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    for (i, &c) in id.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        out[n / 2] |= if n % 2 == 0 { v << 4 } else { v };
        n += 1;
    }
    Some(out)
}

/// A UUID's canonical lowercase spelling.
fn unpack_uuid<'a>(uuid: &[u8; 16], buf: &'a mut [u8; 36]) -> &'a [u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *b = b'-';
            continue;
        }
        let byte = uuid[n / 2];
        *b = HEX[usize::from(if n % 2 == 0 { byte >> 4 } else { byte & 15 })];
        n += 1;
    }
    &buf[..]
}

/// An id's place in 8 bytes: its chunk (32 bits), its start in the chunk
/// (20 bits: chunks are 1 MiB) and its length (12 bits). An id of
/// [`LONG_ID`] bytes or more has a chunk of its own, and its length field
/// says "the whole chunk".
struct IdAt;

impl IdAt {
    fn pack(chunk: usize, start: usize, len: usize) -> u64 {
        let len = len.min(LONG_ID) as u64;
        ((chunk as u64) << 32) | ((start as u64) << 12) | len
    }

    fn unpack(at: u64) -> (usize, usize, usize) {
        (
            (at >> 32) as usize,
            ((at >> 12) & 0xF_FFFF) as usize,
            (at & 0xFFF) as usize,
        )
    }
}

const LONG_ID: usize = 0xFFF;
const _: () = assert!(ID_CHUNK_BYTES <= 1 << 20);

/// Rows of a [`ChunkVec`] chunk; bytes of an id chunk.
const CHUNK_ROWS: usize = 1 << 16;
const ID_CHUNK_BYTES: usize = 1 << 20;

/// A vector in fixed chunks: growing it never copies what it holds, and
/// never holds more than one chunk unused. A `Vec` doubling to tens of
/// millions of rows holds up to twice its length, and both copies while
/// it moves.
struct ChunkVec<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> ChunkVec<T> {
    fn new() -> Self {
        ChunkVec {
            chunks: vec![],
            len: 0,
        }
    }

    fn push(&mut self, v: T) {
        if self.len.is_multiple_of(CHUNK_ROWS) {
            self.chunks.push(Vec::with_capacity(CHUNK_ROWS));
        }
        if let Some(last) = self.chunks.last_mut() {
            last.push(v);
        }
        self.len += 1;
    }

    fn heap_size(&self) -> usize {
        self.chunks.len() * CHUNK_ROWS * std::mem::size_of::<T>()
    }
}

impl<T> std::ops::Index<usize> for ChunkVec<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK_ROWS][i % CHUNK_ROWS]
    }
}

impl<T> std::ops::IndexMut<usize> for ChunkVec<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK_ROWS][i % CHUNK_ROWS]
    }
}

const NO_TIE: u32 = u32::MAX;

/// A hash's two bits in a filter of `n_words` 64-bit words (a power of
/// two): the word and the first bit from its top bits, the second bit
/// from six others, in the same word so that a probe reads one cache
/// line. With 16 to 32 bits per candidate one bit lets 3-6 % of the other
/// rows through to the table (each a cache miss or two); two bits let
/// 0.4-1.5 % through.
fn bloom_bits(h: u64, n_words: usize) -> (usize, u64) {
    let i = (h.rotate_left(24) as usize) & (n_words * 64 - 1);
    (i / 64, 1 << (i % 64) | 1 << ((h >> 34) & 63))
}

impl Candidates {
    /// An empty table; `selection_bytes` per candidate ([`selection_bytes`]).
    fn new(
        pool: &Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
        selection_bytes: usize,
    ) -> Self {
        Self::with_reservation(
            MemoryConsumer::new("backfill candidates").register(pool),
            selection_bytes,
            0,
        )
    }

    /// An empty table that takes over `reservation` (a generation's, when
    /// the one before it is dropped) and holds at least `floor`.
    fn with_reservation(
        reservation: MemoryReservation,
        selection_bytes: usize,
        floor: usize,
    ) -> Self {
        Candidates {
            reservation,
            bits: vec![],
            table: HashTable::new(),
            ids: vec![],
            slots: ChunkVec::new(),
            pos: ChunkVec::new(),
            by_pos: vec![],
            ties: vec![],
            selection_bytes,
            floor,
        }
    }

    /// The bytes the arena and the table hold (capacities, not lengths).
    fn heap_size(&self) -> usize {
        self.bits.capacity() * 8
            + self.table.allocation_size()
            + self.ids.iter().map(Vec::capacity).sum::<usize>()
            + self.slots.heap_size()
            + self.pos.heap_size()
            + self.len() * self.selection_bytes
            + self.ties.capacity() * std::mem::size_of::<(Option<String>, Option<String>)>()
    }

    /// Keep the reservation equal to what is held. Forced: the candidates
    /// cannot spill, the sort after them can.
    fn account(&mut self) {
        self.reservation.resize(self.heap_size().max(self.floor));
    }

    fn len(&self) -> usize {
        self.slots.len
    }

    /// The id of candidate `i`, as stored.
    fn stored(&self, i: u32) -> StoredId<'_> {
        let slot = &self.slots[i as usize];
        if slot.flags.load(Ordering::Relaxed) & UUID != 0 {
            return StoredId::Uuid(&slot.id);
        }
        let at = u64::from_le_bytes(slot.id[..8].try_into().expect("8 bytes"));
        let (chunk, start, len) = IdAt::unpack(at);
        let c = &self.ids[chunk];
        StoredId::Raw(if len == LONG_ID {
            c
        } else {
            &c[start..start + len]
        })
    }

    /// The id of candidate `i` as the archive spells it (`buf` holds an
    /// unpacked UUID).
    fn id<'a>(&'a self, i: u32, buf: &'a mut [u8; 36]) -> &'a [u8] {
        match self.stored(i) {
            StoredId::Uuid(u) => unpack_uuid(u, buf),
            StoredId::Raw(r) => r,
        }
    }

    /// The slot's id field for `id`, and whether it is a UUID (its 16
    /// bytes: only the canonical lowercase spelling, so that unpacking
    /// gives back the archive's very bytes). Other ids go to the arena as
    /// they are (a new chunk when the current one is full; a long id gets
    /// one of its own).
    fn push_id(&mut self, id: &[u8]) -> ([u8; 16], bool) {
        if let Some(u) = parse_uuid(id) {
            return (u, true);
        }
        let len = id.len();
        let fits = len < LONG_ID
            && self
                .ids
                .last()
                .is_some_and(|c| c.capacity() - c.len() >= len);
        if !fits {
            let capacity = if len < LONG_ID { ID_CHUNK_BYTES } else { len };
            self.ids.push(Vec::with_capacity(capacity));
        }
        let chunk = self.ids.len() - 1;
        let c = &mut self.ids[chunk];
        let start = c.len();
        c.extend_from_slice(id);
        let start = if len < LONG_ID { start } else { 0 };
        let mut field = [0u8; 16];
        field[..8].copy_from_slice(&IdAt::pack(chunk, start, len).to_le_bytes());
        (field, false)
    }

    /// The chosen row's event_time.
    fn time(&self, i: usize) -> Option<i64> {
        let slot = &self.slots[i];
        (slot.flags.load(Ordering::Relaxed) & NO_TIME == 0).then_some(slot.time)
    }

    fn dead(&self, i: usize) -> bool {
        self.slots[i].flags.load(Ordering::Relaxed) & DEAD != 0
    }

    fn absorb(&mut self, cands: Vec<Cand>) {
        for c in cands {
            self.push(c.event_id.as_bytes(), c.pos, c.attempts, c.time, c.tie);
        }
        self.account();
    }

    /// Each chosen row's position and its candidate, in archive order.
    fn sorted_positions(&self) -> Vec<(u64, u32)> {
        let mut pos: Vec<(u64, u32)> = (0..self.len()).map(|i| (self.pos[i], i as u32)).collect();
        pos.sort_unstable();
        pos
    }

    /// The candidate whose chosen row is at `pos`, starting the search at
    /// `*hint` (the rows of a batch come in position order, so the next
    /// one is usually the next entry) and leaving it past the answer.
    fn at_position(&self, pos: u64, hint: &mut usize) -> Option<u32> {
        let k = match self.by_pos.get(*hint) {
            Some((p, _)) if *p == pos => *hint,
            _ => self.by_pos.partition_point(|(p, _)| *p < pos),
        };
        let (p, i) = *self.by_pos.get(k)?;
        *hint = k + 1;
        (p == pos).then_some(i)
    }

    /// One candidate (the table is built by [`Candidates::seal`]).
    fn push(
        &mut self,
        id: &[u8],
        pos: u64,
        attempts: i64,
        time: Option<i64>,
        tie: Option<(Option<String>, Option<String>)>,
    ) {
        let (id, uuid) = self.push_id(id);
        let tie = match tie {
            Some(t) => {
                self.ties.push(t);
                (self.ties.len() - 1) as u32
            }
            None => NO_TIE,
        };
        let flags = if time.is_none() { NO_TIME } else { 0 } | if uuid { UUID } else { 0 };
        self.pos.push(pos);
        self.slots.push(Slot {
            id,
            attempts,
            time: time.unwrap_or(0),
            tie,
            replays: 0,
            flags: AtomicU8::new(flags),
        });
    }

    /// Write the candidates (as decided, before the ledger) to `path`, in
    /// [`generation_schema`]; the bytes written.
    fn write(&self, path: &Path) -> Result<u64> {
        let f = File::create(path).map_err(|e| spill_error(path, e))?;
        let mut w = StreamWriter::try_new(BufWriter::new(f), &generation_schema())
            .map_err(|e| spill_error(path, e))?;
        let mut bytes = 0u64;
        let mut buf = [0u8; 36];
        let mut start = 0;
        while start < self.len() {
            let end = (start + 8192).min(self.len());
            let mut id = arrow::array::BinaryBuilder::new();
            let mut att = vec![];
            let mut time = vec![];
            let mut tied = vec![];
            let mut status = StringBuilder::new();
            let mut error = StringBuilder::new();
            let mut pos = vec![];
            for i in start..end {
                pos.push(self.pos[i]);
                id.append_value(self.id(i as u32, &mut buf));
                att.push(self.slots[i].attempts);
                time.push(self.time(i));
                let tie = match self.slots[i].tie {
                    NO_TIE => None,
                    t => Some(&self.ties[t as usize]),
                };
                tied.push(tie.is_some());
                status.append_option(tie.and_then(|t| t.0.as_deref()));
                error.append_option(tie.and_then(|t| t.1.as_deref()));
            }
            let b = RecordBatch::try_new(
                generation_schema(),
                vec![
                    Arc::new(id.finish()),
                    Arc::new(Int64Array::from(att)),
                    Arc::new(Int64Array::from(time)),
                    Arc::new(BooleanArray::from(tied)),
                    Arc::new(status.finish()),
                    Arc::new(error.finish()),
                    Arc::new(UInt64Array::from(pos)),
                ],
            )?;
            bytes += b.get_array_memory_size() as u64;
            w.write(&b).map_err(|e| spill_error(path, e))?;
            start = end;
        }
        w.finish().map_err(|e| spill_error(path, e))?;
        Ok(bytes)
    }

    /// Candidates written by [`Candidates::write`] (to be sealed).
    fn read(path: &Path, mut c: Candidates) -> Result<Candidates> {
        let f = File::open(path).map_err(|e| spill_error(path, e))?;
        for b in StreamReader::try_new(BufReader::new(f), None)? {
            let b = b.map_err(|e| spill_error(path, e))?;
            let id = b.column(0).as_binary::<i32>();
            let att = b.column(1).as_primitive::<Int64Type>();
            let time = b.column(2).as_primitive::<Int64Type>();
            let tied = b.column(3).as_boolean();
            let status = b.column(4).as_string::<i32>();
            let error = b.column(5).as_string::<i32>();
            let pos = b.column(6).as_primitive::<UInt64Type>();
            for r in 0..b.num_rows() {
                let tie = tied.value(r).then(|| {
                    (
                        opt_str(status, r).map(str::to_string),
                        opt_str(error, r).map(str::to_string),
                    )
                });
                c.push(
                    id.value(r),
                    pos.value(r),
                    att.value(r),
                    opt_i64(time, r),
                    tie,
                );
            }
            c.account();
        }
        Ok(c)
    }

    /// Build the hash table and the bit filter once every candidate is in,
    /// each at its final size: grown row by row, the table would hold its
    /// old and new copies at once on every doubling.
    fn seal(&mut self) {
        let rs = hasher();
        let n = self.len();
        let mut table = HashTable::with_capacity(n);
        let n_bits = (n * 16).next_power_of_two().max(64);
        let mut bits = vec![0u64; n_bits / 64];
        // Hashed as the archive spells them, so that a probe is hashed
        // without packing it.
        let hash = |i: u32| {
            let mut buf = [0u8; 36];
            mix(rs.hash_one(self.id(i, &mut buf)))
        };
        for i in 0..n {
            let h = hash(i as u32);
            let (w, m) = bloom_bits(h, bits.len());
            bits[w] |= m;
            table.insert_unique(h, i as u32, |&j| hash(j));
        }
        self.table = table;
        self.bits = bits;
        self.account();
    }

    fn find(&self, rs: &RandomState, id: &str) -> Option<u32> {
        let h = mix(rs.hash_one(id.as_bytes()));
        if !self.bits.is_empty() {
            let (w, m) = bloom_bits(h, self.bits.len());
            if self.bits[w] & m != m {
                return None;
            }
        }
        // The probe's UUID form is parsed once, at the first stored UUID
        // it is compared with.
        let mut uuid: Option<Option<[u8; 16]>> = None;
        self.table
            .find(h, |&i| match self.stored(i) {
                StoredId::Uuid(u) => {
                    uuid.get_or_insert_with(|| parse_uuid(id.as_bytes()))
                        .as_ref()
                        == Some(u)
                }
                StoredId::Raw(r) => r == id.as_bytes(),
            })
            .copied()
    }

    /// What earlier committed runs did with each candidate: the `ledger`
    /// view's figures (replays: the entries `replay`; dead-lettered: any
    /// entry `dlq`), counted over the raw entries as they stream by. The
    /// view groups every event_id the state ever saw in a hash table that
    /// cannot spill: ids of 1 KB in the ledger failed `--memory-limit 64M`
    /// on the second run. Only candidates are kept.
    async fn annotate_ledger(&mut self, ctx: &SessionContext) -> Result<()> {
        if self.len() == 0 {
            return Ok(());
        }
        let df = ctx
            .sql("SELECT event_id, outcome FROM ledger_entries")
            .await?;
        let mut stream = df.execute_stream().await?;
        let rs = hasher();
        while let Some(b) = stream.next().await {
            let b = b?;
            let id = cast(b.column(0), &DataType::Utf8)?;
            let id = id.as_string::<i32>();
            let outcome = cast(b.column(1), &DataType::Utf8)?;
            let outcome = outcome.as_string::<i32>();
            for r in 0..b.num_rows() {
                if !id.is_valid(r) {
                    continue;
                }
                if let Some(i) = self.find(&rs, id.value(r)) {
                    let i = i as usize;
                    let slot = &mut self.slots[i];
                    match opt_str(outcome, r) {
                        Some("replay") => slot.replays = slot.replays.saturating_add(1),
                        Some("dlq") => *slot.flags.get_mut() |= DEAD,
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// Per key: its seqs in conflict and its first gap, for the candidates'
/// flags (in conflict, after a conflict, after a gap). Only keys with a
/// conflict or (with the gap barrier) a gap have an entry, so a row is
/// flagged with one lookup, as before the barriers.
#[derive(Default)]
struct KeyMarks {
    by_key: datafusion::common::HashMap<String, Marks>,
}

#[derive(Default)]
struct Marks {
    /// Sorted once sealed.
    conflicts: Vec<i64>,
    first_gap: Option<i64>,
}

impl KeyMarks {
    fn conflict(&mut self, key: String, seq: i64) {
        self.by_key.entry(key).or_default().conflicts.push(seq);
    }

    fn first_gap(&mut self, key: String, seq: i64) {
        let m = self.by_key.entry(key).or_default();
        m.first_gap = Some(m.first_gap.map_or(seq, |s| s.min(seq)));
    }

    fn seal(&mut self) {
        for v in self.by_key.values_mut() {
            v.conflicts.sort_unstable();
        }
    }

    /// (in conflict, after a conflict, after a gap) for a row's key and seq.
    fn flags(&self, key: &str, seq: i64) -> (bool, bool, bool) {
        match self.by_key.get(key) {
            None => (false, false, false),
            Some(m) => (
                m.conflicts.binary_search(&seq).is_ok(),
                m.conflicts.first().is_some_and(|&c| c < seq),
                m.first_gap.is_some_and(|g| g < seq),
            ),
        }
    }
}

/// A generation file's columns: a candidate as decided (see [`Cand`]).
fn generation_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Binary, false),
        Field::new("attempts", DataType::Int64, false),
        Field::new("event_time", DataType::Int64, true),
        Field::new("tied", DataType::Boolean, false),
        Field::new("status", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("pos", DataType::UInt64, false),
    ]))
}

/// The table of unresolved events, in generations of at most half the
/// pool. It cannot spill, and the sort of the fetched rows needs the rest
/// while it is alive: held whole, 1.1M unresolved events of 10M (66 MiB)
/// failed `--memory-limit 64M`, and 70k ids of 5 KB (330 MiB) failed 1G.
/// A full generation is written to a file; the fetch scans the archive
/// once per generation (see [`Detection::fetch`]).
struct Generations {
    /// Being filled.
    current: Candidates,
    /// Full generations: (file, bytes written).
    files: Vec<(PathBuf, u64)>,
    /// Candidates in all generations.
    count: u64,
    budget: usize,
    pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
}

impl Generations {
    fn absorb(&mut self, cands: Vec<Cand>, dir: &Path) -> Result<()> {
        self.count += cands.len() as u64;
        self.current.absorb(cands);
        // The hash table and the filter come at the seal.
        let sealed = self.current.heap_size() + self.current.len() * SEAL_BYTES;
        if sealed > self.budget {
            let path = dir.join(format!("candidates-{:05}.arrow", self.files.len()));
            let bytes = self.current.write(&path)?;
            self.files.push((path, bytes));
            self.current = Candidates::new(&self.pool, self.current.selection_bytes);
        }
        Ok(())
    }
}

/// The generations the fetch has still to read, and their folder (removed
/// with the last).
struct GenFiles {
    files: Vec<(PathBuf, u64)>,
    dir: Option<Arc<tempfile::TempDir>>,
}

struct Shared {
    /// `None` once the fetch has read the archive: the sort of the fetched
    /// rows then merges what it spilled, and gets the candidates' memory.
    cands: RwLock<Option<Candidates>>,
    /// Further generations of candidates, read after `cands`.
    generations: Mutex<GenFiles>,
    /// The pool the generations' tables are reserved in.
    pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
    /// Conflicts (when detected) and first gaps (with the gap barrier).
    marks: KeyMarks,
    fetched: AtomicU64,
    /// Rows the fetch tested: with positions, the candidates' alone.
    probed: AtomicU64,
    /// Fetch partitions still reading; the last to end drops the candidates.
    reading: AtomicUsize,
    /// Where the archive's rows are: the fetch reads by position. None for
    /// an archive with a Kafka source.
    positions: Option<Arc<Positions>>,
    /// The scan the fetch's partitions read, dropped with the candidates:
    /// its row selections are as large as the candidates' positions.
    scan: Mutex<Option<Arc<dyn ExecutionPlan>>>,
    /// What the fetch's scans read, summed as each ends.
    scanned: Mutex<super::ScanMetrics>,
    /// What each generation of candidates holds at least
    /// ([`Candidates::floor`]).
    generation_floor: usize,
    /// Error-level log lines per event (`--logs`).
    logged: Option<Arc<LoggedErrors>>,
}

/// The error for a lock a panicking thread left behind.
fn poisoned(what: &str) -> DataFusionError {
    DataFusionError::Internal(format!("the lock of the {what} is poisoned"))
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .cands
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(Candidates::len));
        write!(f, "Shared({n:?} candidates)")
    }
}

impl Shared {
    /// `f` over the candidates, while the fetch still reads them.
    fn with_candidates<R>(&self, f: impl FnOnce(&Candidates) -> Result<R>) -> Result<R> {
        let guard = self.cands.read().map_err(|_| poisoned("candidates"))?;
        match guard.as_ref() {
            Some(c) => f(c),
            None => Err(DataFusionError::Internal(
                "the candidates were read after the fetch ended".into(),
            )),
        }
    }

    /// The fetch's scan for the current candidates: `plan` reading their
    /// rows alone when there are positions, `plan` itself otherwise.
    fn positioned(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(positions) = &self.positions else {
            return Ok(plan.clone());
        };
        // The selection's memory is reserved with the candidates
        // ([`SELECTION_BYTES`]).
        let mut guard = self.cands.write().map_err(|_| poisoned("candidates"))?;
        let c = guard.as_mut().ok_or_else(|| {
            DataFusionError::Internal("the candidates were read after the fetch ended".into())
        })?;
        let by_pos = c.sorted_positions();
        let plan = select_rows(plan.clone(), positions, &by_pos)?;
        c.by_pos = by_pos;
        Ok(plan)
    }

    fn lock_scan(&self) -> Result<std::sync::MutexGuard<'_, Option<Arc<dyn ExecutionPlan>>>> {
        self.scan.lock().map_err(|_| poisoned("fetch scan"))
    }

    /// Add what `plan` read to the fetch's figures.
    fn count_scan(&self, plan: &dyn ExecutionPlan) -> Result<()> {
        self.scanned
            .lock()
            .map_err(|_| poisoned("scan metrics"))?
            .add(plan);
        Ok(())
    }

    /// A fetch partition read its last row: the last one counts what the
    /// scan read and drops it and the candidates.
    fn partition_done(&self) -> Result<()> {
        if self.reading.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(scan) = self.lock_scan()?.take() {
                self.count_scan(scan.as_ref())?;
            }
            self.cands
                .write()
                .map_err(|_| poisoned("candidates"))?
                .take();
        }
        Ok(())
    }

    /// The candidates' chosen rows of one `events` batch, each claimed
    /// once, with the columns the policy reads appended.
    fn annotate(&self, b: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
        self.with_candidates(|c| self.annotate_with(c, b, schema))
    }

    fn annotate_with(
        &self,
        c: &Candidates,
        b: &RecordBatch,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let rs = hasher();
        let named = |n: &str| {
            b.column_by_name(n)
                .ok_or_else(|| DataFusionError::Internal(format!("events lacks the column {n}")))
        };
        // Read by position: each row says where it is, and that names its
        // candidate (its id must still be the candidate's).
        let (at, position_cols) = positions(b)?;
        let at = position_cols.map(|_| at.values().clone());
        let mut hint = 0;
        let mut buf = [0u8; 36];
        let id = cast(named("event_id")?, &DataType::Utf8)?;
        let id = id.as_string::<i32>();
        let att = cast(named("attempts")?, &DataType::Int64)?;
        let att = att.as_primitive::<Int64Type>();
        let time = cast(named("event_time")?, &DataType::Int64)?;
        let time = time.as_primitive::<Int64Type>();
        let status = cast(named("status")?, &DataType::Utf8)?;
        let status = status.as_string::<i32>();
        let error = cast(named("error")?, &DataType::Utf8)?;
        let error = error.as_string::<i32>();
        let key = cast(named("key")?, &DataType::Utf8)?;
        let key = key.as_string::<i32>();
        let seq = cast(named("seq")?, &DataType::Int64)?;
        let seq = seq.as_primitive::<Int64Type>();
        let mut keep = BooleanBuilder::with_capacity(b.num_rows());
        let mut archived = vec![];
        let mut conflict = vec![];
        let mut after_conflict = vec![];
        let mut after_gap = vec![];
        let mut replays = vec![];
        let mut dead = vec![];
        // Each row's candidate by position first, touching its slot: the
        // slots are in no order the archive knows, and one cache miss per
        // row taken in turn (each waiting for the last) cost more than
        // the rest of this loop; issued together they overlap.
        let by_position: Vec<Option<u32>> = match &at {
            Some(pos) => {
                let mut touched = 0u8;
                let found = (0..b.num_rows())
                    .map(|r| {
                        let i = c.at_position(pos[r], &mut hint)?;
                        touched ^= c.slots[i as usize].flags.load(Ordering::Relaxed);
                        Some(i)
                    })
                    .collect();
                std::hint::black_box(touched);
                found
            }
            None => vec![],
        };
        for r in 0..b.num_rows() {
            let found = match &at {
                Some(_) if id.is_valid(r) => by_position
                    .get(r)
                    .copied()
                    .flatten()
                    .filter(|i| c.id(*i, &mut buf) == id.value(r).as_bytes()),
                Some(_) => None,
                None => id.is_valid(r).then(|| c.find(&rs, id.value(r))).flatten(),
            };
            let Some(i) = found else {
                keep.append_value(false);
                continue;
            };
            let iu = i as usize;
            let slot = &c.slots[iu];
            let matches = opt_i64(att, r).unwrap_or(0) == slot.attempts
                && opt_i64(time, r) == c.time(iu)
                && match slot.tie {
                    NO_TIE => true,
                    t => {
                        let (s, e) = &c.ties[t as usize];
                        opt_str(status, r) == s.as_deref() && opt_str(error, r) == e.as_deref()
                    }
                };
            if !matches || slot.flags.fetch_or(TAKEN, Ordering::AcqRel) & TAKEN != 0 {
                keep.append_value(false);
                continue;
            }
            keep.append_value(true);
            archived.push(with_logged(
                slot.attempts,
                self.logged
                    .as_ref()
                    .and_then(|m| m.get(id.value(r)).map(|l| l.lines)),
            ));
            let (in_c, ac, ag) = match (opt_str(key, r), opt_i64(seq, r)) {
                (Some(k), Some(s)) => self.marks.flags(k, s),
                _ => (false, false, false),
            };
            conflict.push(in_c);
            after_conflict.push(ac);
            after_gap.push(ag);
            replays.push(i64::from(slot.replays));
            dead.push(c.dead(iu));
        }
        self.fetched
            .fetch_add(archived.len() as u64, Ordering::SeqCst);
        self.probed
            .fetch_add(b.num_rows() as u64, Ordering::Relaxed);
        let picked = filter_record_batch(b, &keep.finish())?;
        // The position columns were for this: not the events' own.
        let mut cols: Vec<ArrayRef> = picked
            .columns()
            .iter()
            .enumerate()
            .filter(|(j, _)| position_cols.is_none_or(|(f, r)| *j != f && *j != r))
            .map(|(_, a)| a.clone())
            .collect();
        cols.push(Arc::new(Int64Array::from(archived)));
        cols.push(Arc::new(BooleanArray::from(conflict)));
        cols.push(Arc::new(Int64Array::from(replays)));
        cols.push(Arc::new(BooleanArray::from(dead)));
        cols.push(Arc::new(BooleanArray::from(after_gap)));
        cols.push(Arc::new(BooleanArray::from(after_conflict)));
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

/// `backfill_candidate(event_id)`: the id is an unresolved event's.
#[derive(Debug)]
struct IsCandidate {
    shared: Arc<Shared>,
    signature: datafusion::logical_expr::Signature,
}

impl PartialEq for IsCandidate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for IsCandidate {}

impl std::hash::Hash for IsCandidate {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.shared).hash(state)
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for IsCandidate {
    fn name(&self) -> &str {
        "backfill_candidate"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<datafusion::logical_expr::ColumnarValue> {
        let ids = args.args[0].clone().into_array(args.number_rows)?;
        let ids = cast(&ids, &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let rs = hasher();
        let hit: BooleanArray = self.shared.with_candidates(|c| {
            Ok((0..ids.len())
                .map(|i| Some(ids.is_valid(i) && c.find(&rs, ids.value(i)).is_some()))
                .collect())
        })?;
        Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
            hit,
        )))
    }
}

/// One partition of the fetch: the `events` scan's partition, filtered to
/// the candidates' chosen rows.
struct Fetch {
    partition: usize,
    shared: Arc<Shared>,
    schema: SchemaRef,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetch(partition {})", self.partition)
    }
}

impl PartitionStream for Fetch {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.schema.clone();
        let input = self
            .shared
            .lock_scan()
            .and_then(|scan| match scan.as_ref() {
                Some(plan) => plan.execute(self.partition, ctx),
                None => Err(DataFusionError::Internal(
                    "the fetch's scan was executed after it ended".into(),
                )),
            });
        let input = match input {
            Ok(s) => s,
            Err(e) => {
                return Box::pin(RecordBatchStreamAdapter::new(
                    schema,
                    futures::stream::once(async move { Err(e) }),
                ));
            }
        };
        let shared = self.shared.clone();
        let done = self.shared.clone();
        let out_schema = schema.clone();
        let stream = input
            .filter_map(move |b| {
                let r = b.and_then(|b| shared.annotate(&b, &out_schema));
                async move {
                    match r {
                        Ok(b) if b.num_rows() == 0 => None,
                        other => Some(other),
                    }
                }
            })
            // At the end of the partition's rows, before the sort merges.
            .chain(
                futures::stream::once(async move { done.partition_done().err().map(Err) })
                    .filter_map(futures::future::ready),
            );
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// The fetch when the candidates came in generations: the archive is
/// scanned once per generation, the next generation read (and matched with
/// the ledger) when the scan of the one before has ended.
struct FetchGenerations {
    /// The archive's scan, and the first generation's (with its rows
    /// selected when there are positions).
    plan: Arc<dyn ExecutionPlan>,
    first: Mutex<Option<Arc<dyn ExecutionPlan>>>,
    shared: Arc<Shared>,
    schema: SchemaRef,
    ctx: SessionContext,
}

impl std::fmt::Debug for FetchGenerations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FetchGenerations")
    }
}

impl PartitionStream for FetchGenerations {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, task: Arc<TaskContext>) -> SendableRecordBatchStream {
        use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
        use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let (plan, shared, schema, ctx) = (
            self.plan.clone(),
            self.shared.clone(),
            self.schema.clone(),
            self.ctx.clone(),
        );
        let first = self.first.lock().map(|mut f| f.take()).ok().flatten();
        builder.spawn(async move {
            let Some(mut scan) = first else {
                return Err(DataFusionError::Internal(
                    "the fetch's generations were read twice".into(),
                ));
            };
            loop {
                let all = Arc::new(CoalescePartitionsExec::new(scan.clone()));
                let mut stream = all.execute(0, task.clone())?;
                while let Some(b) = stream.next().await {
                    let b = shared.annotate(&b?, &schema)?;
                    if b.num_rows() > 0 && tx.send(Ok(b)).await.is_err() {
                        return Ok(());
                    }
                }
                drop(stream);
                // A positioned scan is this generation's own; otherwise
                // every pass shares the metrics of `plan`, counted at the
                // end.
                if shared.positions.is_some() {
                    shared.count_scan(scan.as_ref())?;
                }
                // This generation is done: free it before the next is read,
                // but not its reservation (see `Candidates::floor`).
                let held = shared
                    .cands
                    .write()
                    .map_err(|_| poisoned("candidates"))?
                    .take();
                let next = {
                    let mut g = shared
                        .generations
                        .lock()
                        .map_err(|_| poisoned("generations"))?;
                    let next = (!g.files.is_empty()).then(|| g.files.remove(0));
                    if next.is_none() {
                        g.dir.take();
                    }
                    next
                };
                let Some((path, _)) = next else {
                    if shared.positions.is_none() {
                        shared.count_scan(plan.as_ref())?;
                    }
                    shared.partition_done()?;
                    return Ok(());
                };
                let selection = selection_bytes(shared.positions.is_some());
                let mut next = match held {
                    Some(c) => Candidates::with_reservation(c.reservation, selection, 0),
                    None => Candidates::new(&shared.pool, selection),
                };
                next.floor = shared.generation_floor;
                let read = path.clone();
                let mut c = tokio::task::spawn_blocking(move || Candidates::read(&read, next))
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))??;
                let _ = std::fs::remove_file(&path);
                c.seal();
                if ctx.table_exist("ledger_entries")? {
                    c.annotate_ledger(&ctx).await?;
                }
                c.account();
                *shared.cands.write().map_err(|_| poisoned("candidates"))? = Some(c);
                // A fresh scan: the last one's file queue was drained. A
                // copy shares the plan's metrics, so the report's bytes
                // read count every pass; a positioned one has its own.
                scan = if shared.positions.is_some() {
                    shared.positioned(&plan)?
                } else {
                    datafusion::physical_plan::execution_plan::reset_plan_states(plan.clone())?
                };
            }
        });
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    //! The fast path against the views, event by event, over random
    //! archives: duplicates, retries, conflicts, gaps, NULLs, rows without
    //! an id, exact ties, earlier runs in the ledger; small memory limits
    //! (spilling) and squeezed hashes (collisions) included.

    use super::*;
    use arrow::array::{BinaryArray, Int32Array, TimestampMicrosecondArray};
    use arrow::datatypes::TimeUnit;
    use std::collections::BTreeMap;

    /// event_id, key, seq, event_time, status, attempts, error, missing id.
    type Row = (
        String,
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<i64>,
        Option<String>,
        bool,
    );

    /// The radix sort orders by the low 32 bits and keeps the order of
    /// equal ones, at every size (the comparison sort below 257 rows, the
    /// radix above), with every digit varying or not.
    #[test]
    fn sort_by_hash_is_a_stable_sort_on_the_low_32_bits() {
        let mut x: u64 = 7;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x
        };
        for (n, spread) in [
            (0, u64::MAX),
            (1, u64::MAX),
            (256, u64::MAX),
            (257, u64::MAX),
            (5_000, u64::MAX),
            (5_000, 0x7FF),
            (5_000, 3),
            (100_000, u64::MAX),
            (100_000, 0xFFFF_FFFF_0000_0000 | 0xFF),
        ] {
            // (hash, original index)
            let entries: Vec<(u64, usize)> = (0..n).map(|i| (next() & spread, i)).collect();
            let mut expected = entries.clone();
            expected.sort_by_key(|e| sort_hash(e.0));
            let sorted = sort_by_hash(entries, |e| e.0);
            assert_eq!(sorted, expected, "{n} rows, hashes within {spread:#x}");
        }
    }

    #[test]
    fn batches_follow_the_row_width() {
        let pool = crate::machine::pool_bytes(64 << 20);
        // Narrow rows, or an unknown width: DataFusion's row counts.
        assert_eq!(batch_rows(10 << 30, 200, FETCH_BATCH_ROWS), 8192);
        assert_eq!(batch_rows(pool, 0, NARROW_BATCH_ROWS), NARROW_BATCH_ROWS);
        // 80-byte rows at 64M: thousands a batch, a 64th of the pool.
        let narrow = batch_rows(pool, 80, NARROW_BATCH_ROWS);
        assert!(narrow > 4096 && narrow < NARROW_BATCH_ROWS, "{narrow}");
        assert!(narrow * 80 <= pool / BATCH_SHARE_OF_POOL);
        // 100 KB payloads at 64M: a handful of rows (not 8192: 800 MiB).
        let wide = batch_rows(pool, 100_000, FETCH_BATCH_ROWS);
        assert!((1..=8).contains(&wide), "{wide}");
        assert!(wide * 100_000 <= pool / BATCH_SHARE_OF_POOL);
        // 5 KB ids in the narrow pass; a row wider than the pool: one row.
        assert!(batch_rows(pool, 5_100, NARROW_BATCH_ROWS) < 200);
        assert_eq!(batch_rows(pool, u64::MAX, FETCH_BATCH_ROWS), 1);
    }

    #[test]
    fn ids_pack_exactly() {
        let long = "x".repeat(5000);
        for id in [
            "0b9c5d1e-2f3a-4b5c-8d6e-7f8091a2b3c4",
            "0B9C5D1E-2F3A-4B5C-8D6E-7F8091A2B3C4",
            "0b9c5d1e-2f3a-4b5c-8d6e-7f8091a2b3c",
            "0b9c5d1e2f3a-4b5c-8d6e-7f8091a2b3c4-",
            "g b9c5d1e-2f3a-4b5c-8d6e-7f8091a2b3c",
            "",
            "\u{0}\u{1}",
            "e-1",
            long.as_str(),
        ] {
            let pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool> =
                Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default());
            let mut c = Candidates::new(&pool, 0);
            c.push(id.as_bytes(), 0, 0, None, None);
            c.seal();
            let mut buf = [0u8; 36];
            assert_eq!(c.id(0, &mut buf), id.as_bytes(), "{id}");
            let rs = hasher();
            assert_eq!(c.find(&rs, id), Some(0), "{id}");
            assert_eq!(c.find(&rs, &format!("{id}0")), None, "{id}");
            // Only the canonical lowercase spelling of a UUID is packed.
            assert_eq!(
                matches!(c.stored(0), StoredId::Uuid(_)),
                id == "0b9c5d1e-2f3a-4b5c-8d6e-7f8091a2b3c4",
                "{id}"
            );
        }
        let pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool> =
            Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default());
        let mut c = Candidates::new(&pool, 0);
        c.push(b"0b9c5d1e-2f3a-4b5c-8d6e-7f8091a2b3c4", 0, 0, None, None);
        c.seal();
        assert_eq!(
            c.find(&hasher(), "0B9C5D1E-2F3A-4B5C-8D6E-7F8091A2B3C4"),
            None
        );
    }

    #[test]
    fn ids_long_and_short_share_the_arena() {
        let pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool> =
            Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default());
        let mut c = Candidates::new(&pool, 0);
        let ids: Vec<String> = (0..70_000)
            .map(|i| match i % 3 {
                0 => format!("{:08x}-0000-4000-8000-{:012x}", i, i),
                1 => format!("e-{i}"),
                _ if i % 1000 == 2 => format!("{}{i}", "y".repeat(4085 + (i / 1000) % 10)),
                _ => format!("event {i} ünïcode"),
            })
            .collect();
        c.absorb(
            ids.iter()
                .map(|id| Cand {
                    event_id: id.clone(),
                    pos: 0,
                    attempts: 0,
                    time: None,
                    tie: None,
                })
                .collect(),
        );
        c.seal();
        let rs = hasher();
        let mut buf = [0u8; 36];
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(c.find(&rs, id), Some(i as u32), "id {i}");
            assert_eq!(c.id(i as u32, &mut buf), id.as_bytes(), "id {i}");
            // Canonical UUIDs live in their slot, the others in the arena.
            assert_eq!(
                matches!(c.stored(i as u32), StoredId::Uuid(_)),
                i % 3 == 0,
                "id {i}"
            );
        }
        assert_eq!(c.find(&rs, "e-70000"), None);
        // A UUID in another spelling is another id.
        assert_eq!(c.find(&rs, &ids[12].to_uppercase()), None);
        assert_eq!(c.find(&rs, &format!("{}0", ids[0])), None);
        assert_eq!(c.time(0), None);
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    /// Event ids of both forms the candidate table stores: UUIDs (packed)
    /// and others, an uppercase UUID (not packed) among them.
    fn event_name(e: u64) -> String {
        match e % 3 {
            0 => format!("{e:08x}-0000-4000-8000-{:012x}", e * 7),
            1 if e % 2 == 1 => format!("{e:08X}-0000-4000-8000-{:012X}", e * 7),
            _ => format!("e{e:03}"),
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, pct: u64) -> bool {
            self.below(100) < pct
        }
    }

    fn scan(memory_limit: usize, gaps: bool, conflicts: bool) -> Scan {
        Scan {
            sources: vec![],
            from: None,
            to: None,
            columns: Default::default(),
            done_statuses: vec!["processed".into()],
            detect_gaps: gaps,
            detect_conflicts: conflicts,
            memory_limit,
            shard: None,
            partitions: vec![],
            storage: Default::default(),
            kafka: None,
            exclude: vec![],
            spill_dir: None,
            gap_barrier: true,
            recover_from: None,
            logs: None,
            cluster: None,
        }
    }

    fn events_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, true),
            Field::new("key", DataType::Utf8, true),
            Field::new("seq", DataType::Int64, true),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("status", DataType::Utf8, true),
            Field::new("attempts", DataType::Int64, true),
            Field::new("error", DataType::Utf8, true),
            Field::new("payload", DataType::Binary, true),
            Field::new("backfill_done", DataType::Boolean, false),
            Field::new(MISSING_EVENT_ID_COLUMN, DataType::Boolean, false),
        ]))
    }

    /// A random `events` (as the source module would register it) split
    /// over a few batches, and a random ledger of earlier runs.
    fn archive(rng: &mut Rng) -> (Vec<RecordBatch>, RecordBatch) {
        let n_events = 1 + rng.below(300);
        let n_keys = 1 + rng.below(6);
        let mut rows: Vec<Row> = vec![];
        for e in 0..n_events {
            // An event's key and seq are its own; some share a (key, seq)
            // with another event (conflicts); seqs skip (gaps).
            let key = (!rng.chance(3)).then(|| format!("k{}", e % n_keys));
            let seq = (!rng.chance(3)).then(|| {
                let base = (e / n_keys) as i64 * 2 - 20;
                match rng.below(10) {
                    0 => base - 2, // the previous event of the key: a conflict
                    1 => base + 1,
                    _ => base,
                }
            });
            let copies = 1 + rng.below(4);
            for _ in 0..copies {
                let time = (!rng.chance(5)).then(|| 1_000 + rng.below(4) as i64);
                let status = match rng.below(5) {
                    0 => None,
                    1 | 2 => Some("failed".to_string()),
                    3 => Some("processed".to_string()),
                    _ => Some("pending".to_string()),
                };
                // Never 0: NULL counts as 0, and a row differing only in
                // NULL vs 0 would be a tie the views break arbitrarily.
                let attempts = (!rng.chance(15)).then(|| 1 + rng.below(4) as i64);
                let error = match rng.below(3) {
                    0 => None,
                    1 => Some("timeout".to_string()),
                    _ => Some("bad request".to_string()),
                };
                // Now and then a row of the event under another key: an
                // anomaly, which one shard alone must decide.
                let row_key = if rng.chance(3) {
                    Some(format!("k{}", rng.below(n_keys)))
                } else {
                    key.clone()
                };
                // Such a row names its key in its error, so that it never
                // ties exactly with a row of another key: the views break
                // an exact tie arbitrarily (their plan's row order; the
                // logs' join changes it), the fast path by the fetch's.
                let error = if row_key != key {
                    row_key.as_ref().map(|k| format!("moved to {k}"))
                } else {
                    error
                };
                rows.push((
                    event_name(e),
                    row_key,
                    seq,
                    time,
                    status,
                    attempts,
                    error,
                    false,
                ));
            }
        }
        // Rows without an id of their own: a synthetic id from key/seq/time.
        for _ in 0..rng.below(8) {
            let key = format!("k{}", rng.below(n_keys));
            let seq = rng.below(10) as i64 - 20;
            let time = 1_000 + rng.below(2) as i64;
            let id = format!(
                "{}{key}/{seq}/{time}",
                crate::source::MISSING_EVENT_ID_PREFIX
            );
            let status = Some("failed".to_string());
            rows.push((
                id,
                Some(key),
                Some(seq),
                Some(time),
                status,
                None,
                None,
                true,
            ));
        }
        // Shuffle, then cut into batches.
        for i in (1..rows.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            rows.swap(i, j);
        }
        let mut batches = vec![];
        for chunk in rows.chunks(1 + rng.below(200) as usize) {
            let payload: Vec<Vec<u8>> = chunk
                .iter()
                .map(|r| format!("{}|{:?}|{:?}|{:?}|{:?}", r.0, r.3, r.4, r.5, r.6).into_bytes())
                .collect();
            batches.push(
                RecordBatch::try_new(
                    events_schema(),
                    vec![
                        Arc::new(StringArray::from_iter_values(
                            chunk.iter().map(|r| r.0.clone()),
                        )),
                        Arc::new(StringArray::from_iter(chunk.iter().map(|r| r.1.clone()))),
                        Arc::new(Int64Array::from_iter(chunk.iter().map(|r| r.2))),
                        Arc::new(
                            TimestampMicrosecondArray::from_iter(chunk.iter().map(|r| r.3))
                                .with_timezone("UTC"),
                        ),
                        Arc::new(StringArray::from_iter(chunk.iter().map(|r| r.4.clone()))),
                        Arc::new(Int64Array::from_iter(chunk.iter().map(|r| r.5))),
                        Arc::new(StringArray::from_iter(chunk.iter().map(|r| r.6.clone()))),
                        Arc::new(BinaryArray::from_iter_values(payload.iter())),
                        Arc::new(BooleanArray::from_iter(
                            chunk
                                .iter()
                                .map(|r| Some(r.4.as_deref() == Some("processed"))),
                        )),
                        Arc::new(BooleanArray::from_iter(chunk.iter().map(|r| Some(r.7)))),
                    ],
                )
                .unwrap(),
            );
        }
        // Earlier committed runs: some events replayed, some dead-lettered.
        let mut ledger: Vec<(String, String, &str)> = vec![];
        for run in 0..rng.below(3) {
            for e in 0..n_events {
                if rng.chance(15) {
                    let outcome = if rng.chance(70) { "replay" } else { "dlq" };
                    ledger.push((format!("run-{run}"), event_name(e), outcome));
                }
            }
        }
        let ledger = RecordBatch::try_new(
            super::super::ledger_entries_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    ledger.iter().map(|l| l.0.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    ledger.iter().map(|l| l.1.clone()),
                )),
                Arc::new(StringArray::from_iter_values(ledger.iter().map(|l| l.2))),
                Arc::new(StringArray::from_iter_values(
                    ledger.iter().map(|_| "unprocessed"),
                )),
                Arc::new(Int32Array::from_iter_values(ledger.iter().map(|_| 1))),
            ],
        )
        .unwrap();
        (batches, ledger)
    }

    /// Per event_id: every column of the chosen row and the policy's four,
    /// as text.
    fn by_event(batches: &[RecordBatch]) -> BTreeMap<String, Vec<String>> {
        use arrow::util::display::array_value_to_string;
        let mut out = BTreeMap::new();
        let cols = [
            "event_id",
            "key",
            "seq",
            "event_time",
            "status",
            "attempts",
            "error",
            "payload",
            MISSING_EVENT_ID_COLUMN,
            ARCHIVED_ATTEMPTS,
            IN_CONFLICT,
            LEDGER_REPLAYS,
            LEDGER_DEAD,
            AFTER_GAP,
            AFTER_CONFLICT,
        ];
        for b in batches {
            for r in 0..b.num_rows() {
                let row: Vec<String> = cols
                    .iter()
                    .map(|c| array_value_to_string(b.column_by_name(c).unwrap(), r).unwrap())
                    .collect();
                assert!(
                    out.insert(row[0].clone(), row).is_none(),
                    "one row per event"
                );
            }
        }
        out
    }

    /// The policy's decision per event over candidate rows (the view's or
    /// the fast path's): "replay", "dlq <reason>", or "held"; and the
    /// figures. The internal columns are the candidates' own, renamed as
    /// `detect::candidates_from` does.
    fn decide_all(
        batches: &[RecordBatch],
        policy: &crate::policy::Policy,
    ) -> (BTreeMap<String, String>, crate::policy::Decisions) {
        use super::super::internal;
        let renames = [
            ("event_id", internal::EVENT_ID),
            ("error", internal::ERROR),
            (ARCHIVED_ATTEMPTS, internal::ARCHIVED_ATTEMPTS),
            (IN_CONFLICT, internal::IN_CONFLICT),
            (LEDGER_REPLAYS, internal::LEDGER_REPLAYS),
            (LEDGER_DEAD, internal::LEDGER_DEAD),
            (MISSING_EVENT_ID_COLUMN, internal::MISSING_EVENT_ID),
            (AFTER_GAP, internal::AFTER_GAP),
            (AFTER_CONFLICT, internal::AFTER_CONFLICT),
        ];
        let mut out = BTreeMap::new();
        let mut counts = crate::policy::Decisions::default();
        for b in batches {
            let mut fields = vec![Field::new("event_id", DataType::Utf8, true)];
            let mut cols =
                vec![cast(b.column_by_name("event_id").unwrap(), &DataType::Utf8).unwrap()];
            for (from, to) in renames {
                let c = b.column_by_name(from).unwrap();
                fields.push(Field::new(to, c.data_type().clone(), true));
                cols.push(c.clone());
            }
            let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
            let d = policy.decide(&b).unwrap();
            counts.add(&d.counts);
            let ids = b.column(0).as_string::<i32>();
            for r in 0..b.num_rows() {
                out.insert(ids.value(r).to_string(), "held".to_string());
            }
            let ledger = d.ledger.column(1).as_string::<i32>();
            for r in 0..d.ledger.num_rows() {
                let outcome = d.ledger.column(2).as_string::<i32>().value(r);
                let reason = d.ledger.column(3).as_string::<i32>().value(r);
                let what = if outcome == "replay" {
                    "replay".to_string()
                } else {
                    format!("dlq {reason}")
                };
                out.insert(ledger.value(r).to_string(), what);
            }
            // Skipped (dead-lettered before) is neither held nor acted on.
            let dead = b
                .column_by_name(internal::LEDGER_DEAD)
                .unwrap()
                .as_boolean();
            for r in 0..b.num_rows() {
                if dead.value(r) {
                    out.insert(ids.value(r).to_string(), "skipped".to_string());
                }
            }
        }
        (out, counts)
    }

    fn text(batches: &[RecordBatch]) -> String {
        arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_path_decides_like_the_views() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // What the rounds covered, so that the test cannot pass vacuously.
        let (mut seen_conflicts, mut seen_gaps, mut seen_spills, mut seen_ledger) = (0, 0, 0, 0);
        let (mut seen_generations, mut seen_positions, mut seen_shards) = (0, 0, 0);
        let (mut seen_after_gap, mut seen_after_conflict, mut seen_logs) = (0, 0, 0);
        let mut seen_raised = 0;
        let mut seen_barriers: BTreeMap<String, u64> = BTreeMap::new();
        let barrier = |n: u64| match n {
            0 => crate::policy::OnBarrier::Replay,
            1 => crate::policy::OnBarrier::Hold,
            _ => crate::policy::OnBarrier::Dlq,
        };
        for round in 0..120 {
            let (batches, ledger) = archive(&mut rng);
            let limit = if rng.chance(40) { 2048 } else { 1 << 30 };
            let mut scan = scan(limit, !rng.chance(15), !rng.chance(15));
            // A default run keeps no per-key gap map; the view then says
            // no event is after a gap either.
            scan.gap_barrier = scan.detect_gaps && !rng.chance(20);
            let policy = crate::policy::Policy {
                max_attempts: 1 + rng.below(4) as i64,
                permanent_errors: vec!["^bad".into()],
                run_id: "r".into(),
                detected_at_us: 0,
                on_gap: barrier(rng.below(3)),
                on_conflict: barrier(rng.below(3)),
                reconciled: None,
            };
            let est_rows = if rng.chance(50) { 0 } else { 1 << 30 };
            COLLIDE.store(rng.chance(30), Ordering::Relaxed);
            let ctx = SessionContext::new();
            // Half the rounds read Parquet files, by position.
            let files_dir = tempfile::tempdir().unwrap();
            let positions = if rng.chance(50) {
                let files = write_files(&mut rng, files_dir.path(), &batches);
                let urls = files
                    .iter()
                    .map(|(p, _)| {
                        datafusion::datasource::listing::ListingTableUrl::parse(format!("/{p}"))
                            .unwrap()
                    })
                    .collect();
                let options = datafusion::datasource::listing::ListingOptions::new(Arc::new(
                    datafusion::datasource::file_format::parquet::ParquetFormat::default(),
                ))
                .with_file_extension("");
                let config =
                    datafusion::datasource::listing::ListingTableConfig::new_with_multi_paths(urls)
                        .with_listing_options(options)
                        .with_schema(events_schema());
                let table = Arc::new(
                    datafusion::datasource::listing::ListingTable::try_new(config).unwrap(),
                );
                ctx.register_table("events", table.clone()).unwrap();
                let positions = Arc::new(Positions::new(files.clone()).unwrap());
                // The same files with their positions, as the run reads them
                // (source::named::NamedFiles::with_positions).
                let store: Arc<dyn object_store::ObjectStore> =
                    Arc::new(object_store::local::LocalFileSystem::new());
                let mut named = vec![];
                for (path, _) in &files {
                    let meta = object_store::ObjectStoreExt::head(
                        &store,
                        &object_store::path::Path::from(path.as_str()),
                    )
                    .await
                    .unwrap();
                    named.push(crate::source::named::NamedFile {
                        store: store.clone(),
                        meta,
                        display: path.clone(),
                    });
                }
                let at_table = crate::source::named::NamedFiles::new(table, named)
                    .with_positions(file_ordinal(&positions));
                let at = ctx.read_table(Arc::new(at_table)).unwrap();
                Some((positions, at))
            } else {
                let table =
                    datafusion::datasource::MemTable::try_new(events_schema(), vec![batches])
                        .unwrap();
                ctx.register_table("events", Arc::new(table)).unwrap();
                None
            };
            seen_positions += usize::from(positions.is_some());
            let lt = datafusion::datasource::MemTable::try_new(ledger.schema(), vec![vec![ledger]])
                .unwrap();
            ctx.register_table("ledger_entries", Arc::new(lt)).unwrap();
            // Half the rounds have application logs: error lines raise the
            // attempts, in the views (sql/candidates.sql) and in the fetch
            // (the counts of the logs' narrow pass).
            let logged = if rng.chance(50) {
                let levels: Vec<String> = if rng.chance(25) {
                    vec!["WARN".into()]
                } else {
                    vec!["ERROR".into(), "FATAL".into()]
                };
                let lines = random_logs(&mut rng, &batches_ids(&ctx).await);
                let mut counts = crate::source::logs::ErrorCounts::default();
                counts.add(&lines, &levels);
                seen_logs += counts.by_event.len();
                let t = datafusion::datasource::MemTable::try_new(
                    crate::source::logs::schema(),
                    vec![vec![lines]],
                )
                .unwrap();
                ctx.register_table("logs", Arc::new(t)).unwrap();
                let values: Vec<String> = levels.iter().map(|l| format!("('{l}')")).collect();
                ctx.sql(&format!(
                    "CREATE TABLE log_error_levels AS SELECT * FROM (VALUES {}) AS t(level)",
                    values.join(", ")
                ))
                .await
                .unwrap();
                scan.logs = Some(crate::source::logs::LogSettings {
                    paths: vec!["memory".into()],
                    fields: Default::default(),
                    error_levels: levels,
                });
                Some(Arc::new(counts.by_event))
            } else {
                None
            };
            super::super::register_views(&ctx, &scan).await.unwrap();
            if logged.is_some() {
                // Events whose logs show more retries than the archive.
                seen_raised += ctx
                    .sql(
                        "SELECT count(*) FROM candidates c JOIN unprocessed u \
                         ON c.event_id = u.event_id WHERE c.archived_attempts > u.archived_attempts",
                    )
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()[0]
                    .column(0)
                    .as_primitive::<Int64Type>()
                    .value(0);
            }

            let view_rows = ctx
                .table("candidates")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let expected = by_event(&view_rows);
            let (expected_decisions, expected_counts) = decide_all(&view_rows, &policy);
            let counts = ctx
                .sql("SELECT count(*), count(DISTINCT event_id) FROM events")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let (rows, events) = (
                counts[0].column(0).as_primitive::<Int64Type>().value(0) as u64,
                counts[0].column(1).as_primitive::<Int64Type>().value(0) as u64,
            );
            let gaps_df = super::super::gaps(&ctx).await.unwrap();
            let gaps_schema = Arc::new(gaps_df.schema().as_arrow().clone());
            let expected_gaps = if scan.detect_gaps {
                text(&gaps_df.collect().await.unwrap())
            } else {
                text(&[])
            };
            let conflicts = ctx
                .sql("SELECT count(*) FROM conflicts")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()[0]
                .column(0)
                .as_primitive::<Int64Type>()
                .value(0) as u64;

            // A quarter of the rounds run as 1-3 shards, whose union must
            // be the unsharded result.
            let count = if rng.chance(25) {
                1 + rng.below(3) as u32
            } else {
                0
            };
            let shards: Vec<Option<crate::shard::Shard>> = match count {
                0 => vec![None],
                n => (0..n)
                    .map(|index| Some(crate::shard::Shard { index, count: n }))
                    .collect(),
            };
            seen_shards += usize::from(count > 1);
            let ctx_note = format!(
                "round {round}, limit {limit}, positions {}, shards {count}, {scan:?}",
                positions.is_some()
            );
            let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut fetched_rows: Vec<RecordBatch> = vec![];
            let mut gaps: Vec<RecordBatch> = vec![];
            let (mut d_rows, mut d_events, mut d_conflicts, mut spilled) = (0, 0, 0, 0);
            for shard in shards {
                let scan = Scan {
                    shard,
                    ..scan.clone()
                };
                let dir = tempfile::tempdir().unwrap();
                let shape = Shape {
                    est_rows,
                    row_bytes: RowBytes::default(),
                    positioned: positions.clone(),
                    logged: logged.clone(),
                };
                let d = detect(&ctx, &scan, shape, dir.path(), gaps_schema.clone(), None)
                    .await
                    .unwrap();
                let fetched = d.fetch(&ctx).await.unwrap();
                let fetched = fetched.collect().await.unwrap();
                let mine = by_event(&fetched);
                fetched_rows.extend(fetched);
                d.check_fetched().unwrap();
                for t in ["events", "ledger", "candidates"] {
                    assert!(ctx.table_exist(t).unwrap(), "the fetch left {t} registered");
                }
                assert_eq!(d.candidates as usize, mine.len(), "{ctx_note}");
                if d.shared.positions.is_some() {
                    assert_eq!(
                        d.shared.probed.load(Ordering::Relaxed),
                        d.candidates,
                        "the fetch read the candidates' rows alone: {ctx_note}"
                    );
                }
                for (id, row) in mine {
                    assert!(
                        got.insert(id, row).is_none(),
                        "one shard per event: {ctx_note}"
                    );
                }
                let mut stream = d.gaps(&ctx).await.unwrap();
                while let Some(b) = stream.next().await {
                    gaps.push(b.unwrap());
                }
                assert_eq!(
                    std::fs::read_dir(dir.path()).unwrap().count(),
                    0,
                    "spill files are removed"
                );
                d_rows += d.rows;
                d_events += d.events;
                d_conflicts += d.conflicts;
                spilled += d.spilled_bytes;
                seen_spills += usize::from(d.spilled_bytes > 0);
                seen_generations += usize::from(d.generations > 1);
            }
            assert_eq!((d_rows, d_events), (rows, events), "{ctx_note}");
            if scan.detect_conflicts {
                assert_eq!(d_conflicts, conflicts, "{ctx_note}");
            }
            for (id, want) in &expected {
                assert_eq!(got.get(id), Some(want), "event {id}: {ctx_note}");
            }
            assert_eq!(got.len(), expected.len(), "{ctx_note}");
            // The same decisions, barriers included, and the balance.
            let (decisions, counts) = decide_all(&fetched_rows, &policy);
            assert_eq!(decisions, expected_decisions, "{ctx_note}, {policy:?}");
            assert_eq!(counts, expected_counts, "{ctx_note}, {policy:?}");
            assert_eq!(
                counts.candidates,
                counts.replayed + counts.dead_lettered + counts.skipped_dead_lettered + counts.held,
                "{ctx_note}, {policy:?}"
            );
            for (what, n) in counts
                .held_by_reason
                .iter()
                .chain(counts.dead_lettered_by_reason.iter())
            {
                *seen_barriers.entry(what.clone()).or_default() += n;
            }
            seen_after_gap += got.values().filter(|r| r[13] == "true").count();
            seen_after_conflict += got.values().filter(|r| r[14] == "true").count();
            // The shards' gap rows, in the order of one run's.
            let gaps = if gaps.is_empty() {
                gaps
            } else {
                let all = arrow::compute::concat_batches(&gaps[0].schema(), &gaps).unwrap();
                let order = arrow::compute::lexsort_to_indices(
                    &[
                        arrow::compute::SortColumn {
                            values: all.column_by_name("key").unwrap().clone(),
                            options: None,
                        },
                        arrow::compute::SortColumn {
                            values: all.column_by_name("first_missing_seq").unwrap().clone(),
                            options: None,
                        },
                    ],
                    None,
                )
                .unwrap();
                vec![take_record_batch(&all, &order).unwrap()]
            };
            assert_eq!(text(&gaps), expected_gaps, "{ctx_note}");
            if limit == 2048 && rows > 50 {
                assert!(spilled > 0, "a 2 KiB limit spills: {ctx_note}");
            }
            seen_conflicts += got.values().filter(|r| r[10] == "true").count();
            seen_gaps += gaps.iter().map(|b| b.num_rows()).sum::<usize>();
            seen_ledger += got
                .values()
                .filter(|r| r[11] != "0" || r[12] == "true")
                .count();
        }
        COLLIDE.store(false, Ordering::Relaxed);
        assert!(
            seen_after_gap > 0 && seen_after_conflict > 0,
            "coverage: {seen_after_gap} after a gap, {seen_after_conflict} after a conflict"
        );
        for what in [
            crate::policy::HELD_BY_GAP,
            crate::policy::HELD_BY_CONFLICT,
            crate::policy::REASON_AFTER_GAP,
            crate::policy::REASON_AFTER_CONFLICT,
        ] {
            assert!(
                seen_barriers.get(what).is_some_and(|n| *n > 0),
                "coverage: no {what} in any round: {seen_barriers:?}"
            );
        }
        assert!(
            seen_conflicts > 0
                && seen_gaps > 0
                && seen_spills > 0
                && seen_ledger > 0
                && seen_generations > 0
                && seen_positions > 0
                && seen_shards > 0
                && seen_logs > 0
                && seen_raised > 0,
            "coverage: {seen_conflicts} conflicts, {seen_gaps} gaps, {seen_spills} spills, {seen_ledger} ledger, {seen_generations} in generations, {seen_positions} by position, {seen_shards} sharded, {seen_logs} logged events, {seen_raised} with more retries logged than archived"
        );
    }

    /// The distinct event ids of `events` (synthetic ones included).
    async fn batches_ids(ctx: &SessionContext) -> Vec<String> {
        let b = ctx
            .sql("SELECT DISTINCT event_id FROM events ORDER BY event_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut out = vec![];
        for b in &b {
            let ids = cast(b.column(0), &DataType::Utf8).unwrap();
            let ids = ids.as_string::<i32>();
            out.extend(
                (0..ids.len())
                    .filter(|&i| ids.is_valid(i))
                    .map(|i| ids.value(i).to_string()),
            );
        }
        out
    }

    /// `logs` rows naming about a third of `ids` (1-6 lines each, of mixed
    /// levels and cases), ids the archive lacks, and lines naming none.
    fn random_logs(rng: &mut Rng, ids: &[String]) -> RecordBatch {
        const LEVELS: [&str; 7] = ["ERROR", "error", "FATAL", "Fatal", "WARN", "INFO", "debug"];
        let mut id: Vec<Option<String>> = vec![];
        let mut level: Vec<Option<&str>> = vec![];
        let mut push = |rng: &mut Rng, e: Option<String>| {
            id.push(e);
            level.push((!rng.chance(5)).then(|| LEVELS[rng.below(LEVELS.len() as u64) as usize]));
        };
        for e in ids {
            if rng.chance(35) {
                for _ in 0..1 + rng.below(6) {
                    push(rng, Some(e.clone()));
                }
            }
        }
        for i in 0..rng.below(4) {
            push(rng, Some(format!("not-archived-{i}")));
            push(rng, None);
        }
        let n = id.len();
        let times: Vec<Option<i64>> = (0..n).map(|_| Some(1_000 + rng.below(5) as i64)).collect();
        RecordBatch::try_new(
            crate::source::logs::schema(),
            vec![
                Arc::new(StringArray::from(id)),
                Arc::new(arrow::array::TimestampMicrosecondArray::from(times).with_timezone("UTC")),
                Arc::new(StringArray::from(level)),
                Arc::new(StringArray::from(vec![Some("m"); n])),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
            ],
        )
        .unwrap()
    }

    /// `batches` as one to three Parquet files in `dir`, in row groups and
    /// pages of a few rows (so that selections skip pages and groups):
    /// each file's object-store path and rows.
    fn write_files(rng: &mut Rng, dir: &Path, batches: &[RecordBatch]) -> Vec<(String, u64)> {
        let all = arrow::compute::concat_batches(&events_schema(), batches).unwrap();
        let n_files = 1 + rng.below(3) as usize;
        let per = all.num_rows().div_ceil(n_files).max(1);
        let mut out = vec![];
        for f in 0..n_files {
            let start = (f * per).min(all.num_rows());
            let len = per.min(all.num_rows() - start);
            let path = dir.join(format!("part-{f}.parquet"));
            let props = parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_row_count(Some(1 + rng.below(40) as usize))
                .set_data_page_row_count_limit(1 + rng.below(8) as usize)
                .set_write_batch_size(1)
                .build();
            let mut w = parquet::arrow::ArrowWriter::try_new(
                File::create(&path).unwrap(),
                events_schema(),
                Some(props),
            )
            .unwrap();
            w.write(&all.slice(start, len)).unwrap();
            w.close().unwrap();
            let location = object_store::path::Path::from_filesystem_path(&path).unwrap();
            out.push((location.to_string(), len as u64));
        }
        out
    }
}
