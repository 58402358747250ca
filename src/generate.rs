//! Synthetic event archives with known defects, behind `backfill generate`.
//!
//! The generator writes a hive-partitioned Parquet archive
//! (`<out>/dt=YYYY-MM-DD/part-NNNNN.parquet`) of order events in which, from
//! a seed and deterministically, some events are missing (gaps in a key's
//! `seq`), some failed and were retried, some were never processed, some rows
//! were archived twice, and some `(key, seq)` pairs were reused by a second
//! event id. It is what the demo, the benchmarks and the integration tests
//! run the detection against.
//!
//! It is not an oracle: the [`GenerateSummary`] counts what was injected, for
//! people and for sanity checks, but tests of the detection compute their
//! expectations independently from the files (as this module's own tests do).
//!
//! The generator streams: events are produced in time order and rows pass
//! through a small reorder heap (later attempts of an event are minutes
//! later) into one batch of column builders, then into one
//! [`AsyncArrowWriter`] at a time. Memory is bounded by about one row group,
//! whatever the number of events. Every byte goes through the object store of
//! the [`Location`], so the output may be a local folder or a bucket.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use chrono::{Days, NaiveDate};
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::location::Location;

/// Settings of one generated archive.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Logical events (`--events`), including the ones injected as missing.
    pub events: u64,
    /// Distinct keys (`--keys`); event `i` has key `i % keys`, seq `i / keys`.
    pub keys: u64,
    /// Seed of every random choice (`--seed`).
    pub seed: u64,
    /// Days the events are spread over (default 3).
    pub days: u32,
    /// First day, at 00:00 UTC (default 2024-01-01).
    pub start: NaiveDate,
    /// Files per `dt=` folder (default 2); each covers an equal time slice.
    pub files_per_day: u32,
    /// Rows per Parquet row group (default 65536).
    pub row_group_rows: usize,
    /// Producers (`--sources`): key `k` belongs to `source-{k % sources}`;
    /// 1 (the default) writes `generator` for every row.
    pub sources: u32,
    /// Daily and weekly seasonality (`--seasonal`): events follow an hourly
    /// rate (low at night, high by day, lower at weekends, ±10% from hour
    /// to hour) instead of a uniform one.
    pub seasonal: bool,
    /// Inject volume outages (`--outages`; needs 3 sources and 3 days):
    /// [`OUTAGES`], recorded in [`GenerateSummary::outages`].
    pub outages: bool,
    /// Also write application logs here (`--logs DIR`): see [`LogWriter`].
    pub logs: Option<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            events: 100_000,
            keys: 1_000,
            seed: 42,
            days: 3,
            start: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap_or_default(),
            files_per_day: 2,
            row_group_rows: 65_536,
            sources: 1,
            seasonal: false,
            outages: false,
            logs: None,
        }
    }
}

/// What was written, counted while writing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenerateSummary {
    /// Parquet files written (time slices without rows get no file).
    pub files: u64,
    /// Rows written, duplicates and conflicts included.
    pub rows: u64,
    /// Logical events (`--events`), the missing ones included.
    pub events: u64,
    /// Maximal runs of missing seqs within a key.
    pub gaps_injected: u64,
    /// Events never written.
    pub missing_events: u64,
    /// Events whose rows are all `failed` (retried, never processed).
    pub failed_events: u64,
    /// Extra copies of rows (a row written twice counts once here).
    pub duplicate_rows: u64,
    /// Rows with a new `evt-dup-` event id reusing an existing `(key, seq)`.
    pub conflicts_injected: u64,
    /// Events with a `processed` row.
    pub processed_events: u64,
    /// Bytes of all files written.
    pub bytes: u64,
    /// The volume outages injected (`--outages`), in time order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outages: Vec<InjectedOutage>,
    /// Events an outage kept from being written (a drop or a stop).
    #[serde(skip_serializing_if = "is_zero")]
    pub outage_dropped_events: u64,
    /// `--logs`: log files and lines written, and the lines at ERROR level.
    #[serde(skip_serializing_if = "is_zero")]
    pub log_files: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub log_lines: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub log_error_lines: u64,
    /// Processed events given an ERROR line after their processing.
    #[serde(skip_serializing_if = "is_zero")]
    pub logs_contradicting: u64,
    /// Unprocessed events given 1-3 ERROR lines beyond their archived rows.
    #[serde(skip_serializing_if = "is_zero")]
    pub logs_extra_failures: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One injected outage: events of `source` with a base time in
/// `[from, to)` (RFC 3339) were `drop` (1 in 10 written), `stop` (none
/// written) or `storm` (every row written twice, as a replay storm does).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InjectedOutage {
    pub kind: String,
    pub source: String,
    pub from: String,
    pub to: String,
}

/// The outages of `--outages`: (kind, source number, days before the last
/// day, start hour, hours). Daytime, in the last days, so that weeks of
/// history precede them.
pub const OUTAGES: [(&str, u64, u32, i64, i64); 3] = [
    ("drop", 1, 2, 10, 2),
    ("stop", 2, 1, 13, 3),
    ("storm", 0, 0, 9, 2),
];

/// Errors of [`generate`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// An option is out of range; `flag` is the command-line flag at fault.
    #[error("{reason}")]
    Invalid { flag: &'static str, reason: String },
    /// Writing a file failed (the store, or the Parquet encoder).
    #[error("cannot write '{path}': {source}")]
    Write {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Writing a log file failed.
    #[error("cannot write '{path}': {message}")]
    WriteLogs { path: String, message: String },
    /// Assembling a record batch failed (a bug, reported with its file).
    #[error("cannot build a record batch for '{path}': {source}")]
    Batch {
        path: String,
        #[source]
        source: arrow::error::ArrowError,
    },
}

/// The Arrow schema of a generated archive.
pub fn archive_schema() -> SchemaRef {
    let utc = || Some(Arc::<str>::from("UTC"));
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Microsecond, utc()),
            false,
        ),
        Field::new("status", DataType::Utf8, true),
        Field::new("attempts", DataType::Int32, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("payload", DataType::Binary, true),
        Field::new("kafka_topic", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new(
            "kafka_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, utc()),
            true,
        ),
        Field::new("source", DataType::Utf8, true),
    ]))
}

// ---------------------------------------------------------------------------
// Defect rates. Probabilities are per event unless said otherwise.

/// A run of missing seqs starts at a (key, seq) with this probability; runs
/// are 1–3 seqs long, so about 1% of events go missing.
const MISSING_RUN_START: f64 = 0.005;
/// Written events that failed on every attempt (1–4 `failed` rows).
const FAILED: f64 = 0.08;
/// Written events never attempted (one row, status NULL or `pending`).
const PENDING: f64 = 0.03;
/// Processed events that failed 1–2 times before succeeding.
const RETRIED_THEN_PROCESSED: f64 = 0.10;
/// Failed events whose error looks permanent.
const PERMANENT: f64 = 0.20;
/// Written events with one of their rows archived twice.
const DUPLICATE: f64 = 0.01;
/// Written events whose (key, seq) is reused by a second event id.
const CONFLICT: f64 = 0.002;

const TRANSIENT_ERRORS: [&str; 4] = [
    "timeout calling payments-api",
    "connection reset by peer",
    "HTTP 503 from inventory-service",
    "deadlock detected while updating orders",
];
const PERMANENT_ERROR: &str = "schema validation failed: field amount";

const MICROS_PER_DAY: i64 = 86_400_000_000;
const MICROS_PER_SECOND: i64 = 1_000_000;
const PARTITIONS: u64 = 8;
const TOPIC: &str = "orders";
const SOURCE: &str = "generator";
/// Rows per record batch handed to the writer (at most one row group).
const BATCH_ROWS: usize = 8_192;

// Independent random streams.
const STREAM_GAP: u64 = 0x6761_7073; // "gaps"
const STREAM_EVENT: u64 = 0x6576_656e; // "even"
const STREAM_OUTAGE: u64 = 0x6f75_7461; // "outa"
const STREAM_SEASON: u64 = 0x7365_6173; // "seas"
const STREAM_LOGS: u64 = 0x6c6f_6773; // "logs"

/// Processed events whose worker logged an ERROR after marking them done.
const LOG_CONTRADICTING: f64 = 0.02;
/// Processed events with a WARN line after processing (no contradiction).
const LOG_WARN_AFTER: f64 = 0.05;
/// Unprocessed events (failed or never attempted) with 1-3 ERROR lines
/// beyond the rows the archive holds.
const LOG_EXTRA_FAILURES: f64 = 0.10;
/// Lines whose timestamp is epoch milliseconds (a number), not RFC 3339.
const LOG_EPOCH_MILLIS: f64 = 0.2;

/// The weight of hour `h` of the span (starting at `hour_start`, UTC) in a
/// seasonal archive: a daily curve (0.2 at night, up to 1.0 mid-day), 0.6
/// of it on Saturdays and Sundays, times a factor in [0.9, 1.1) of its own.
fn seasonal_weight(seed: u64, hour_start: i64, h: i64) -> f64 {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_micros(hour_start).unwrap_or_default();
    let hour = (hour_start.div_euclid(3_600 * MICROS_PER_SECOND) % 24) as f64;
    let day = 0.2 + 0.8 * (std::f64::consts::PI * (hour - 6.0) / 16.0).sin().max(0.0);
    let week = match t.weekday() {
        chrono::Weekday::Sat | chrono::Weekday::Sun => 0.6,
        _ => 1.0,
    };
    let noise = 0.9 + 0.2 * SplitMix64::at(seed, STREAM_SEASON, h as u64, 0).unit();
    day * week * noise
}

/// SplitMix64: small, fast, and good enough for choosing defects.
struct SplitMix64(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// The stream of random numbers for item (a, b) of `stream`.
    fn at(seed: u64, stream: u64, a: u64, b: u64) -> Self {
        SplitMix64(mix(mix(mix(seed ^ mix(stream)) ^ a) ^ b))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n >= 1`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `lo..=hi` microseconds.
    fn micros(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Processed,
    Failed,
    Pending,
    Null,
}

impl Status {
    fn as_str(self) -> Option<&'static str> {
        match self {
            Status::Processed => Some("processed"),
            Status::Failed => Some("failed"),
            Status::Pending => Some("pending"),
            Status::Null => None,
        }
    }
}

/// One archived row, before its Kafka offset is assigned.
#[derive(Debug, Clone)]
struct Row {
    time: i64,
    /// Insertion order: breaks ties of `time`, keeps an event's rows in order.
    order: u64,
    event: u64,
    conflict: bool,
    key: u64,
    seq: u64,
    status: Status,
    attempts: Option<i32>,
    error: Option<&'static str>,
    amount_cents: u64,
    /// 2 for a row archived twice.
    copies: u8,
    /// The last row of its event (not of a conflicting copy).
    last: bool,
}

impl PartialEq for Row {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Row {}
impl PartialOrd for Row {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Row {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.time, self.order).cmp(&(other.time, other.order))
    }
}

/// The validated options and everything derived from them.
struct Plan {
    events: u64,
    keys: u64,
    seed: u64,
    start: NaiveDate,
    start_us: i64,
    span_us: i64,
    files_per_day: i64,
    row_group_rows: usize,
    sources: u64,
    /// Seasonal: the cumulative weight at the start of each hour of the
    /// span (one more entry than hours).
    hour_cum: Option<Vec<f64>>,
    /// (kind, source, from, to) in microseconds.
    outages: Vec<(&'static str, u64, i64, i64)>,
}

impl Plan {
    fn new(opts: &GenerateOptions) -> Result<Plan, GenerateError> {
        let invalid = |flag: &'static str, reason: String| GenerateError::Invalid { flag, reason };
        if opts.events < 1 || opts.events > i64::MAX as u64 {
            return Err(invalid(
                "--events",
                format!(
                    "--events must be between 1 and {} (got {})",
                    i64::MAX,
                    opts.events
                ),
            ));
        }
        if opts.keys < 1 || opts.keys > opts.events {
            return Err(invalid(
                "--keys",
                format!(
                    "--keys must be between 1 and --events (got --keys {} with --events {})",
                    opts.keys, opts.events
                ),
            ));
        }
        if opts.days < 1 {
            return Err(invalid(
                "--days",
                "--days must be at least 1 (got 0)".into(),
            ));
        }
        if opts.files_per_day < 1 {
            return Err(invalid(
                "--files-per-day",
                "--files-per-day must be at least 1 (got 0)".into(),
            ));
        }
        if opts.row_group_rows < 1 {
            return Err(invalid(
                "--row-group-rows",
                "--row-group-rows must be at least 1 (got 0)".into(),
            ));
        }
        let start_us = opts
            .start
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros());
        let end_ok = opts
            .start
            .checked_add_days(Days::new(u64::from(opts.days)))
            .is_some();
        let span_us = i64::from(opts.days).checked_mul(MICROS_PER_DAY);
        let (Some(start_us), true, Some(span_us)) = (start_us, end_ok, span_us) else {
            return Err(invalid(
                "--days",
                format!(
                    "--start {} plus --days {} is out of the supported date range",
                    opts.start, opts.days
                ),
            ));
        };
        if opts.sources < 1 {
            return Err(invalid(
                "--sources",
                "--sources must be at least 1 (got 0)".into(),
            ));
        }
        if opts.outages && (opts.sources < 3 || opts.days < 3) {
            return Err(invalid(
                "--outages",
                format!(
                    "--outages needs --sources 3 or more and --days 3 or more (got --sources {} --days {})",
                    opts.sources, opts.days
                ),
            ));
        }
        let hour_us = 3_600 * MICROS_PER_SECOND;
        let hour_cum = opts.seasonal.then(|| {
            let hours = i64::from(opts.days) * 24;
            let mut cum = Vec::with_capacity(hours as usize + 1);
            let mut total = 0.0;
            cum.push(total);
            for h in 0..hours {
                total += seasonal_weight(opts.seed, start_us + h * hour_us, h);
                cum.push(total);
            }
            cum
        });
        let outages = if opts.outages {
            OUTAGES
                .iter()
                .map(|&(kind, source, before_last, hour, hours)| {
                    let day = i64::from(opts.days - 1 - before_last);
                    let from = start_us + day * MICROS_PER_DAY + hour * hour_us;
                    (kind, source, from, from + hours * hour_us)
                })
                .collect()
        } else {
            vec![]
        };
        Ok(Plan {
            events: opts.events,
            keys: opts.keys,
            seed: opts.seed,
            start: opts.start,
            start_us,
            span_us,
            files_per_day: i64::from(opts.files_per_day),
            row_group_rows: opts.row_group_rows,
            sources: u64::from(opts.sources),
            hour_cum,
            outages,
        })
    }

    /// The source of a key's events.
    fn source_of(&self, key: u64) -> Option<u64> {
        (self.sources > 1).then_some(key % self.sources)
    }

    /// The outage, if any, over event `i` of `key` at `base`.
    fn outage(&self, key: u64, base: i64) -> Option<&'static str> {
        let source = self.source_of(key)?;
        self.outages
            .iter()
            .find(|(_, s, from, to)| *s == source && (*from..*to).contains(&base))
            .map(|o| o.0)
    }

    /// The base time of event `i`: non-decreasing over the span; uniform,
    /// or following the seasonal hourly weights (the inverse of their
    /// cumulative sum, linear within an hour).
    fn base_time(&self, i: u64) -> i64 {
        if let Some(cum) = &self.hour_cum {
            let total = cum[cum.len() - 1];
            let f = (i as f64 + 0.5) / self.events as f64 * total;
            let h = cum
                .partition_point(|&c| c <= f)
                .saturating_sub(1)
                .min(cum.len() - 2);
            let within = (f - cum[h]) / (cum[h + 1] - cum[h]);
            let hour_us = 3_600 * MICROS_PER_SECOND;
            let t = self.start_us + h as i64 * hour_us + (within * hour_us as f64) as i64;
            return t.clamp(self.start_us, self.start_us + self.span_us - 1);
        }
        let off = i128::from(i) * i128::from(self.span_us) / i128::from(self.events);
        self.start_us + off as i64
    }

    /// The end (exclusive) of the day holding `time`.
    fn day_end(&self, time: i64) -> i64 {
        let day = (time - self.start_us) / MICROS_PER_DAY;
        self.start_us + (day + 1) * MICROS_PER_DAY
    }

    /// The file number (day * files_per_day + part) of a row time.
    fn file_of(&self, time: i64) -> u64 {
        let rel = time - self.start_us;
        let day = rel / MICROS_PER_DAY;
        let within = i128::from(rel % MICROS_PER_DAY);
        let part = within * i128::from(self.files_per_day) / i128::from(MICROS_PER_DAY);
        (day * self.files_per_day + part as i64) as u64
    }

    /// The last seq of `key`.
    fn last_seq(&self, key: u64) -> u64 {
        (self.events - 1 - key) / self.keys
    }

    /// Length (0 = none) of the run of missing seqs starting at (key, seq).
    fn run_len(&self, key: u64, seq: u64) -> u64 {
        let mut rng = SplitMix64::at(self.seed, STREAM_GAP, key, seq);
        if rng.chance(MISSING_RUN_START) {
            1 + rng.below(3)
        } else {
            0
        }
    }

    /// Whether (key, seq) is never written. The first and last seq of a key
    /// are always written, so that every gap is visible between two seqs.
    fn is_missing(&self, key: u64, seq: u64) -> bool {
        if seq == 0 || seq >= self.last_seq(key) {
            return false;
        }
        (0..3).any(|j| seq >= j && self.run_len(key, seq - j) > j)
    }

    /// The rows of event `i`, pushed in attempt order; counts the event.
    fn event_rows(
        &self,
        i: u64,
        order: &mut u64,
        summary: &mut GenerateSummary,
        mut push: impl FnMut(Row),
    ) {
        let key = i % self.keys;
        let seq = i / self.keys;
        if self.is_missing(key, seq) {
            summary.missing_events += 1;
            if !self.is_missing(key, seq - 1) {
                summary.gaps_injected += 1;
            }
            return;
        }
        let mut rng = SplitMix64::at(self.seed, STREAM_EVENT, i, 0);
        let base = self.base_time(i);
        let outage = self.outage(key, base);
        let dropped = match outage {
            Some("stop") => true,
            Some("drop") => SplitMix64::at(self.seed, STREAM_OUTAGE, i, 0).below(10) != 0,
            _ => false,
        };
        if dropped {
            summary.outage_dropped_events += 1;
            return;
        }
        let storm = if outage == Some("storm") { 2 } else { 1 };
        let day_end = self.day_end(base);
        let amount_cents = 100 + rng.below(100_000);

        // (status, attempts, error) of each row, in attempt order.
        let mut rows: [(Status, Option<i32>, Option<&'static str>); 4] =
            [(Status::Null, None, None); 4];
        let n: usize;
        let u = rng.unit();
        if u < FAILED {
            summary.failed_events += 1;
            n = 1 + rng.below(4) as usize;
            // Mostly the whole history from attempt 0; sometimes the archive
            // only caught the later attempts. Attempts stay within 0..=4.
            let first = if rng.chance(0.6) {
                0
            } else {
                rng.below(6 - n as u64) as i32
            };
            let permanent = rng.chance(PERMANENT);
            for (k, row) in rows.iter_mut().take(n).enumerate() {
                let error = if permanent {
                    PERMANENT_ERROR
                } else {
                    TRANSIENT_ERRORS[rng.below(TRANSIENT_ERRORS.len() as u64) as usize]
                };
                *row = (Status::Failed, Some(first + k as i32), Some(error));
            }
        } else if u < FAILED + PENDING {
            n = 1;
            let status = if rng.chance(0.5) {
                Status::Pending
            } else {
                Status::Null
            };
            rows[0] = (status, None, None);
        } else {
            summary.processed_events += 1;
            let failures = if rng.chance(RETRIED_THEN_PROCESSED) {
                1 + rng.below(2) as usize
            } else {
                0
            };
            for row in rows.iter_mut().take(failures).enumerate() {
                let error = TRANSIENT_ERRORS[rng.below(TRANSIENT_ERRORS.len() as u64) as usize];
                *row.1 = (Status::Failed, Some(row.0 as i32), Some(error));
            }
            rows[failures] = (Status::Processed, Some(failures as i32), None);
            n = failures + 1;
        }
        let duplicate = rng.chance(DUPLICATE).then(|| rng.below(n as u64) as usize);
        if duplicate.is_some() {
            summary.duplicate_rows += 1;
        }

        // Later attempts a few seconds to minutes later, kept inside the day
        // of the base time (and never before it).
        let mut offset = 0i64;
        for (k, &(status, attempts, error)) in rows.iter().take(n).enumerate() {
            if k > 0 {
                offset += rng.micros(5 * MICROS_PER_SECOND, 300 * MICROS_PER_SECOND);
            }
            let latest = day_end - (n - k) as i64;
            let time = (base + offset).min(latest).max(base);
            *order += 1;
            push(Row {
                time,
                order: *order,
                event: i,
                conflict: false,
                key,
                seq,
                status,
                attempts,
                error,
                amount_cents,
                copies: storm * if duplicate == Some(k) { 2 } else { 1 },
                last: k + 1 == n,
            });
        }

        if rng.chance(CONFLICT) {
            summary.conflicts_injected += 1;
            let offset = rng.micros(MICROS_PER_SECOND, 120 * MICROS_PER_SECOND);
            let error = TRANSIENT_ERRORS[rng.below(TRANSIENT_ERRORS.len() as u64) as usize];
            *order += 1;
            push(Row {
                time: (base + offset).min(day_end - 1).max(base),
                order: *order,
                event: i,
                conflict: true,
                key,
                seq,
                status: Status::Failed,
                attempts: Some(0),
                error: Some(error),
                amount_cents: 100 + rng.below(100_000),
                copies: storm,
                last: false,
            });
        }
    }
}

/// Column builders of one batch.
struct Columns {
    event_id: StringBuilder,
    key: StringBuilder,
    seq: Int64Builder,
    event_time: TimestampMicrosecondBuilder,
    status: StringBuilder,
    attempts: Int32Builder,
    error: StringBuilder,
    payload: BinaryBuilder,
    kafka_topic: StringBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    kafka_timestamp: TimestampMillisecondBuilder,
    source: StringBuilder,
    len: usize,
}

impl Columns {
    fn new(rows: usize) -> Self {
        Columns {
            event_id: StringBuilder::with_capacity(rows, rows * 18),
            key: StringBuilder::with_capacity(rows, rows * 9),
            seq: Int64Builder::with_capacity(rows),
            event_time: TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"),
            status: StringBuilder::with_capacity(rows, rows * 9),
            attempts: Int32Builder::with_capacity(rows),
            error: StringBuilder::with_capacity(rows, rows * 4),
            payload: BinaryBuilder::with_capacity(rows, rows * 64),
            kafka_topic: StringBuilder::with_capacity(rows, rows * TOPIC.len()),
            kafka_partition: Int32Builder::with_capacity(rows),
            kafka_offset: Int64Builder::with_capacity(rows),
            kafka_timestamp: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            source: StringBuilder::with_capacity(rows, rows * SOURCE.len()),
            len: 0,
        }
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        self.len = 0;
        vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.attempts.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.payload.finish()),
            Arc::new(self.kafka_topic.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
            Arc::new(self.kafka_timestamp.finish()),
            Arc::new(self.source.finish()),
        ]
    }
}

/// The file being written.
struct OpenFile {
    number: u64,
    display: String,
    writer: AsyncArrowWriter<BufWriter>,
}

/// Turns ordered rows into files.
struct Writer<'a> {
    out: &'a Location,
    plan: &'a Plan,
    schema: SchemaRef,
    props: WriterProperties,
    cols: Columns,
    batch_rows: usize,
    file: Option<OpenFile>,
    next_offset: [i64; PARTITIONS as usize],
    event_id: String,
    key: String,
    payload: String,
    summary: GenerateSummary,
    /// `--logs`: the worker's log lines.
    logs: Option<LogWriter>,
}

impl<'a> Writer<'a> {
    fn new(out: &'a Location, plan: &'a Plan) -> Self {
        let schema = archive_schema();
        let no_dictionary = ["event_id", "seq", "payload", "kafka_offset"];
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(plan.row_group_rows))
            .set_sorting_columns(Some(vec![SortingColumn {
                column_idx: 3,
                descending: false,
                nulls_first: false,
            }]));
        for c in no_dictionary {
            props = props.set_column_dictionary_enabled(ColumnPath::from(c), false);
        }
        let batch_rows = plan.row_group_rows.min(BATCH_ROWS);
        Writer {
            out,
            plan,
            schema,
            props: props.build(),
            cols: Columns::new(batch_rows),
            batch_rows,
            file: None,
            next_offset: [0; PARTITIONS as usize],
            event_id: String::with_capacity(32),
            key: String::with_capacity(16),
            payload: String::with_capacity(96),
            summary: GenerateSummary::default(),
            logs: None,
        }
    }

    fn open(&self, number: u64) -> Result<OpenFile, GenerateError> {
        let files_per_day = self.plan.files_per_day as u64;
        let (day, part) = (number / files_per_day, number % files_per_day);
        let date = self.plan.start.checked_add_days(Days::new(day));
        let rel = match date {
            Some(d) => format!("dt={}/part-{part:05}.parquet", d.format("%Y-%m-%d")),
            // Unreachable: the plan checked that the last day exists.
            None => format!("day-{day}/part-{part:05}.parquet"),
        };
        let path = self.out.path(&rel);
        let display = self.out.display_path(&path);
        let sink = BufWriter::new(self.out.store.clone(), path);
        let writer = AsyncArrowWriter::try_new(sink, self.schema.clone(), Some(self.props.clone()))
            .map_err(|source| GenerateError::Write {
                path: display.clone(),
                source,
            })?;
        Ok(OpenFile {
            number,
            display,
            writer,
        })
    }

    /// Appends `row` (twice for a duplicate) to the file of its time.
    async fn emit(&mut self, row: &Row) -> Result<(), GenerateError> {
        let number = self.plan.file_of(row.time);
        if self.file.as_ref().map(|f| f.number) != Some(number) {
            self.close().await?;
            self.file = Some(self.open(number)?);
        }
        let partition = mix(row.key) % PARTITIONS;
        let offset = self.next_offset[partition as usize];
        self.next_offset[partition as usize] += 1;

        self.event_id.clear();
        if row.conflict {
            let _ = write!(self.event_id, "evt-dup-{:010}", row.event);
        } else {
            let _ = write!(self.event_id, "evt-{:010}", row.event);
        }
        self.key.clear();
        let _ = write!(self.key, "key-{:05}", row.key);
        self.payload.clear();
        let _ = write!(
            self.payload,
            r#"{{"id":"{}","key":"{}","seq":{},"amount":{}.{:02}}}"#,
            self.event_id,
            self.key,
            row.seq,
            row.amount_cents / 100,
            row.amount_cents % 100
        );
        if let Some(l) = self.logs.as_mut() {
            l.row(row, &self.event_id, self.plan, &mut self.summary)
                .await?;
        }
        for _ in 0..row.copies {
            let c = &mut self.cols;
            c.event_id.append_value(&self.event_id);
            c.key.append_value(&self.key);
            c.seq.append_value(row.seq as i64);
            c.event_time.append_value(row.time);
            c.status.append_option(row.status.as_str());
            c.attempts.append_option(row.attempts);
            c.error.append_option(row.error);
            c.payload.append_value(self.payload.as_bytes());
            c.kafka_topic.append_value(TOPIC);
            c.kafka_partition.append_value(partition as i32);
            c.kafka_offset.append_value(offset);
            c.kafka_timestamp.append_value(row.time.div_euclid(1000));
            match self.plan.source_of(row.key) {
                Some(s) => c.source.append_value(format!("source-{s}")),
                None => c.source.append_value(SOURCE),
            }
            c.len += 1;
            self.summary.rows += 1;
            if self.cols.len >= self.batch_rows {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Hands the rows in the builders to the open file's writer.
    async fn flush(&mut self) -> Result<(), GenerateError> {
        if self.cols.len == 0 {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let batch =
            RecordBatch::try_new(self.schema.clone(), self.cols.finish()).map_err(|source| {
                GenerateError::Batch {
                    path: file.display.clone(),
                    source,
                }
            })?;
        file.writer
            .write(&batch)
            .await
            .map_err(|source| GenerateError::Write {
                path: file.display.clone(),
                source,
            })
    }

    /// Finishes the open file, if any.
    async fn close(&mut self) -> Result<(), GenerateError> {
        self.flush().await?;
        if let Some(mut file) = self.file.take() {
            file.writer
                .finish()
                .await
                .map_err(|source| GenerateError::Write {
                    path: file.display.clone(),
                    source,
                })?;
            self.summary.files += 1;
            self.summary.bytes += file.writer.bytes_written() as u64;
        }
        Ok(())
    }
}

/// The worker's application logs (`--logs DIR`): one NDJSON file per day
/// of the archive, `app-YYYY-MM-DD.ndjson` for the first day and
/// `app-YYYY-MM-DD.jsonl.gz` after it (so that both are read), with the
/// fields `timestamp` (RFC 3339, or epoch milliseconds on a fifth of the
/// lines), `level`, `event_id`, `message`, `error`. They agree with the
/// archive: one `ERROR` line per failed row (archived twice: still one),
/// one `INFO` line per processed or pending row, a first line naming no
/// event. Injected disagreements ([`GenerateSummary`] counts them): an
/// `ERROR` line after the processed row of 2% of processed events
/// (contradicted), and 1-3 `ERROR` lines after the last row of 10% of
/// unprocessed events (failures the archive missed). Decoys: a `WARN`
/// line after 5% of processed events, some levels in lower case.
struct LogWriter {
    out: Location,
    /// The day (from the start) whose file `buf` holds.
    day: Option<i64>,
    buf: Vec<u8>,
    /// Lines written, and those at ERROR level.
    lines: u64,
    error_lines: u64,
}

impl LogWriter {
    fn line(
        &mut self,
        rng: &mut SplitMix64,
        time: i64,
        level: &str,
        event_id: Option<&str>,
        message: &str,
        error: Option<&str>,
    ) {
        let timestamp = if rng.chance(LOG_EPOCH_MILLIS) {
            serde_json::Value::from(time.div_euclid(1000))
        } else {
            let t = chrono::DateTime::from_timestamp_micros(time).unwrap_or_default();
            serde_json::Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        };
        let level = if rng.chance(0.1) {
            level.to_lowercase()
        } else {
            level.to_string()
        };
        if level.eq_ignore_ascii_case("ERROR") {
            self.error_lines += 1;
        }
        let mut obj = serde_json::Map::new();
        obj.insert("timestamp".into(), timestamp);
        obj.insert("level".into(), level.into());
        if let Some(id) = event_id {
            obj.insert("event_id".into(), id.into());
        }
        obj.insert("message".into(), message.into());
        if let Some(e) = error {
            obj.insert("error".into(), e.into());
        }
        let _ = serde_json::to_writer(&mut self.buf, &serde_json::Value::Object(obj));
        self.buf.push(b'\n');
        self.lines += 1;
    }

    /// The lines of one archived row (once, however many copies).
    async fn row(
        &mut self,
        row: &Row,
        event_id: &str,
        plan: &Plan,
        summary: &mut GenerateSummary,
    ) -> Result<(), GenerateError> {
        let day = (row.time - plan.start_us).div_euclid(MICROS_PER_DAY);
        if self.day != Some(day) {
            self.flush(plan, summary).await?;
            self.day = Some(day);
            let mut rng = SplitMix64::at(plan.seed, STREAM_LOGS, u64::MAX, day as u64);
            let start = plan.start_us + day * MICROS_PER_DAY;
            self.line(&mut rng, start, "INFO", None, "worker started", None);
        }
        let mut rng = SplitMix64::at(plan.seed, STREAM_LOGS, row.event, row.order);
        let id = Some(event_id);
        match row.status {
            Status::Failed => self.line(
                &mut rng,
                row.time,
                "ERROR",
                id,
                "processing failed",
                row.error,
            ),
            Status::Processed => {
                self.line(&mut rng, row.time, "INFO", id, "processed", None);
                let later = row.time + rng.micros(MICROS_PER_SECOND, 600 * MICROS_PER_SECOND);
                if rng.chance(LOG_CONTRADICTING) {
                    summary.logs_contradicting += 1;
                    self.line(
                        &mut rng,
                        later,
                        "ERROR",
                        id,
                        "post-commit hook failed",
                        Some("publishing order-confirmed: broker unavailable"),
                    );
                } else if rng.chance(LOG_WARN_AFTER) {
                    self.line(&mut rng, later, "WARN", id, "slow commit", None);
                }
            }
            Status::Pending | Status::Null => {
                self.line(&mut rng, row.time, "INFO", id, "received", None)
            }
        }
        if row.last && !row.conflict && row.status != Status::Processed {
            let mut extra = SplitMix64::at(plan.seed, STREAM_LOGS, row.event, u64::MAX);
            if extra.chance(LOG_EXTRA_FAILURES) {
                summary.logs_extra_failures += 1;
                let mut time = row.time;
                for _ in 0..1 + extra.below(3) {
                    time += extra.micros(30 * MICROS_PER_SECOND, 300 * MICROS_PER_SECOND);
                    self.line(
                        &mut extra,
                        time,
                        "ERROR",
                        id,
                        "retry failed",
                        Some(row.error.unwrap_or(TRANSIENT_ERRORS[0])),
                    );
                }
            }
        }
        Ok(())
    }

    /// Write the day's file.
    async fn flush(
        &mut self,
        plan: &Plan,
        summary: &mut GenerateSummary,
    ) -> Result<(), GenerateError> {
        let Some(day) = self.day else {
            return Ok(());
        };
        let date = plan
            .start
            .checked_add_days(Days::new(day.max(0) as u64))
            .unwrap_or(plan.start);
        let (name, bytes) = if day == 0 {
            (format!("app-{date}.ndjson"), std::mem::take(&mut self.buf))
        } else {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let gz = gz
                .write_all(&self.buf)
                .and_then(|_| gz.finish())
                .map_err(|e| GenerateError::WriteLogs {
                    path: name_of(&self.out, &format!("app-{date}.jsonl.gz")),
                    message: e.to_string(),
                })?;
            self.buf.clear();
            (format!("app-{date}.jsonl.gz"), gz)
        };
        use object_store::ObjectStoreExt;
        self.out
            .store
            .put(&self.out.path(&name), bytes.into())
            .await
            .map_err(|e| GenerateError::WriteLogs {
                path: name_of(&self.out, &name),
                message: crate::location::store_error_line(&e),
            })?;
        summary.log_files += 1;
        Ok(())
    }

    async fn close(
        mut self,
        plan: &Plan,
        summary: &mut GenerateSummary,
    ) -> Result<(), GenerateError> {
        self.flush(plan, summary).await?;
        summary.log_lines = self.lines;
        summary.log_error_lines = self.error_lines;
        Ok(())
    }
}

fn name_of(out: &Location, name: &str) -> String {
    out.display_path(&out.path(name))
}

/// Writes a synthetic archive below `out` and returns what it injected.
///
/// Files that exist under the same names are overwritten; other files
/// below `out` are left alone.
pub async fn generate(
    out: &Location,
    opts: &GenerateOptions,
) -> Result<GenerateSummary, GenerateError> {
    let plan = Plan::new(opts)?;
    let mut writer = Writer::new(out, &plan);
    writer.summary.events = plan.events;
    if let Some(dir) = &opts.logs {
        let out = crate::location::resolve(dir, &Default::default()).map_err(|e| {
            GenerateError::Invalid {
                flag: "--logs",
                reason: e.to_string(),
            }
        })?;
        writer.logs = Some(LogWriter {
            out,
            day: None,
            buf: Vec::new(),
            lines: 0,
            error_lines: 0,
        });
    }
    let rfc = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    writer.summary.outages = plan
        .outages
        .iter()
        .map(|&(kind, source, from, to)| InjectedOutage {
            kind: kind.into(),
            source: format!("source-{source}"),
            from: rfc(from),
            to: rfc(to),
        })
        .collect();
    // Rows wait here until no later event can produce an earlier row: every
    // row of event i is at or after base_time(i), which never decreases.
    let mut pending: BinaryHeap<Reverse<Row>> = BinaryHeap::new();
    let mut order = 0u64;
    for i in 0..plan.events {
        let base = plan.base_time(i);
        while pending.peek().is_some_and(|r| r.0.time < base) {
            if let Some(Reverse(row)) = pending.pop() {
                writer.emit(&row).await?;
            }
        }
        plan.event_rows(i, &mut order, &mut writer.summary, |row| {
            pending.push(Reverse(row))
        });
    }
    while let Some(Reverse(row)) = pending.pop() {
        writer.emit(&row).await?;
    }
    writer.close().await?;
    if let Some(l) = writer.logs.take() {
        l.close(&plan, &mut writer.summary).await?;
    }
    Ok(writer.summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
    use std::path::PathBuf;

    use arrow::array::{
        Array, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
        TimestampMillisecondArray,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use crate::location::resolve;

    fn opts(events: u64, keys: u64, seed: u64) -> GenerateOptions {
        GenerateOptions {
            events,
            keys,
            seed,
            row_group_rows: 1_000,
            ..GenerateOptions::default()
        }
    }

    async fn run(dir: &std::path::Path, o: &GenerateOptions) -> GenerateSummary {
        let loc = resolve(dir.to_str().unwrap(), &Default::default()).unwrap();
        generate(&loc, o).await.unwrap()
    }

    /// Every file below `dir`, sorted by path.
    fn files(dir: &std::path::Path) -> Vec<PathBuf> {
        fn walk(d: &std::path::Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, &mut out);
        out.sort();
        out
    }

    /// One row as read back.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Read {
        file: usize,
        event_id: String,
        key: String,
        seq: i64,
        time: i64,
        status: Option<String>,
        attempts: Option<i32>,
        error: Option<String>,
        payload: Option<Vec<u8>>,
        partition: i32,
        offset: i64,
        kafka_ms: i64,
    }

    fn read_all(dir: &std::path::Path) -> Vec<Read> {
        let mut rows = Vec::new();
        for (n, path) in files(dir).iter().enumerate() {
            let f = std::fs::File::open(path).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let b = batch.unwrap();
                let col = |name: &str| b.column_by_name(name).unwrap().clone();
                let s = |name: &str| {
                    col(name)
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .unwrap()
                        .clone()
                };
                let (ids, keys, status, error) = (s("event_id"), s("key"), s("status"), s("error"));
                let seq = col("seq");
                let seq = seq.as_any().downcast_ref::<Int64Array>().unwrap();
                let time = col("event_time");
                let time = time
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .unwrap();
                let att = col("attempts");
                let att = att.as_any().downcast_ref::<Int32Array>().unwrap();
                let payload = col("payload");
                let payload = payload.as_any().downcast_ref::<BinaryArray>().unwrap();
                let part = col("kafka_partition");
                let part = part.as_any().downcast_ref::<Int32Array>().unwrap();
                let off = col("kafka_offset");
                let off = off.as_any().downcast_ref::<Int64Array>().unwrap();
                let ms = col("kafka_timestamp");
                let ms = ms
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .unwrap();
                let opt_s =
                    |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
                for i in 0..b.num_rows() {
                    rows.push(Read {
                        file: n,
                        event_id: ids.value(i).to_string(),
                        key: keys.value(i).to_string(),
                        seq: seq.value(i),
                        time: time.value(i),
                        status: opt_s(&status, i),
                        attempts: att.is_valid(i).then(|| att.value(i)),
                        error: opt_s(&error, i),
                        payload: payload.is_valid(i).then(|| payload.value(i).to_vec()),
                        partition: part.value(i),
                        offset: off.value(i),
                        kafka_ms: ms.value(i),
                    });
                }
            }
        }
        rows
    }

    #[tokio::test]
    async fn generate_same_seed_gives_identical_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let o = opts(5_000, 50, 7);
        let sa = run(a.path(), &o).await;
        let sb = run(b.path(), &o).await;
        assert_eq!(sa, sb);
        let (fa, fb) = (files(a.path()), files(b.path()));
        assert_eq!(fa.len(), fb.len());
        assert!(!fa.is_empty());
        for (x, y) in fa.iter().zip(&fb) {
            assert_eq!(
                x.strip_prefix(a.path()).unwrap(),
                y.strip_prefix(b.path()).unwrap()
            );
            assert!(
                std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
                "{x:?} differs"
            );
        }
    }

    #[tokio::test]
    async fn generate_different_seed_gives_different_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        run(a.path(), &opts(5_000, 50, 1)).await;
        run(b.path(), &opts(5_000, 50, 2)).await;
        let read = |d: &tempfile::TempDir| {
            files(d.path())
                .iter()
                .map(|p| std::fs::read(p).unwrap())
                .collect::<Vec<_>>()
        };
        assert_ne!(read(&a), read(&b));
    }

    #[tokio::test]
    async fn generate_schema_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), &opts(2_000, 20, 3)).await;
        let utc = Some(Arc::<str>::from("UTC"));
        let expected = Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("key", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, utc.clone()),
                false,
            ),
            Field::new("status", DataType::Utf8, true),
            Field::new("attempts", DataType::Int32, true),
            Field::new("error", DataType::Utf8, true),
            Field::new("payload", DataType::Binary, true),
            Field::new("kafka_topic", DataType::Utf8, true),
            Field::new("kafka_partition", DataType::Int32, true),
            Field::new("kafka_offset", DataType::Int64, true),
            Field::new(
                "kafka_timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, utc),
                true,
            ),
            Field::new("source", DataType::Utf8, true),
        ]);
        for path in files(dir.path()) {
            let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                .unwrap();
            let got = b.schema();
            assert_eq!(got.fields(), expected.fields(), "{path:?}");
            let meta = b.metadata();
            for rg in meta.row_groups() {
                assert!(
                    rg.num_rows() <= 1_000,
                    "{path:?}: row group of {}",
                    rg.num_rows()
                );
                assert_eq!(rg.column(0).compression(), Compression::SNAPPY, "{path:?}");
            }
        }
    }

    #[tokio::test]
    async fn generate_layout_and_event_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(20_000, 100, 11);
        let summary = run(dir.path(), &o).await;
        let names: Vec<String> = files(dir.path())
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "dt=2024-01-01/part-00000.parquet",
                "dt=2024-01-01/part-00001.parquet",
                "dt=2024-01-02/part-00000.parquet",
                "dt=2024-01-02/part-00001.parquet",
                "dt=2024-01-03/part-00000.parquet",
                "dt=2024-01-03/part-00001.parquet",
            ]
        );
        assert_eq!(summary.files, 6);
        let rows = read_all(dir.path());
        // Ordered by event_time within and across files (paths sort by time).
        for w in rows.windows(2) {
            assert!(w[0].time <= w[1].time, "{:?} before {:?}", w[0], w[1]);
        }
        // Each row lies in its file's day and half-day slice.
        let start = NaiveDate::from_ymd_opt(2024, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_micros();
        let half_day = 43_200_000_000i64;
        for r in &rows {
            assert_eq!(((r.time - start) / half_day) as usize, r.file, "{r:?}");
            assert_eq!(r.kafka_ms, r.time.div_euclid(1000));
        }
        // Row-group statistics can prune: min/max of event_time grow.
        let mut last_max = i64::MIN;
        for path in files(dir.path()) {
            let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                .unwrap();
            for rg in b.metadata().row_groups() {
                let stats = rg.column(3).statistics().unwrap();
                let parquet::file::statistics::Statistics::Int64(s) = stats else {
                    panic!("event_time statistics are not Int64: {stats:?}");
                };
                assert!(*s.min_opt().unwrap() >= last_max);
                last_max = *s.max_opt().unwrap();
            }
        }
        // Kafka offsets increase per partition in time order; a key stays on one partition.
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut partition_of: HashMap<&str, i32> = HashMap::new();
        let mut previous: Option<&Read> = None;
        for r in &rows {
            assert_eq!(
                *partition_of.entry(&r.key).or_insert(r.partition),
                r.partition
            );
            assert!((0..8).contains(&r.partition));
            let exact_repeat = previous.is_some_and(|p| {
                let mut p = p.clone();
                p.file = r.file;
                p == *r
            });
            if !exact_repeat {
                let n = next.entry(r.partition).or_insert(0);
                assert_eq!(r.offset, *n, "{r:?}");
                *n += 1;
            }
            previous = Some(r);
        }
    }

    /// The summary, recomputed from the files alone.
    #[tokio::test]
    async fn generate_summary_matches_files() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(20_000, 200, 5);
        let s = run(dir.path(), &o).await;
        let rows = read_all(dir.path());
        let paths = files(dir.path());
        assert_eq!(s.files, paths.len() as u64);
        let bytes: u64 = paths
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(s.bytes, bytes);
        assert_eq!(s.rows, rows.len() as u64);
        assert_eq!(s.events, 20_000);

        // Exact duplicates: rows minus distinct rows.
        let distinct: HashSet<Read> = rows
            .iter()
            .map(|r| Read {
                file: 0,
                ..r.clone()
            })
            .collect();
        assert_eq!(s.duplicate_rows, (rows.len() - distinct.len()) as u64);

        // Conflicts: evt-dup- ids, each on the (key, seq) of a regular event.
        let regular: Vec<&Read> = rows
            .iter()
            .filter(|r| !r.event_id.starts_with("evt-dup-"))
            .collect();
        let owner: HashMap<(&str, i64), &str> = regular
            .iter()
            .map(|r| ((r.key.as_str(), r.seq), r.event_id.as_str()))
            .collect();
        let conflicts: Vec<&Read> = rows
            .iter()
            .filter(|r| r.event_id.starts_with("evt-dup-"))
            .collect();
        assert_eq!(s.conflicts_injected, conflicts.len() as u64);
        for c in &conflicts {
            let original = owner.get(&(c.key.as_str(), c.seq)).unwrap();
            assert_ne!(original, &c.event_id);
            assert_eq!(c.status.as_deref(), Some("failed"));
        }
        // One (key, seq) per regular event id, and vice versa.
        let ids: BTreeSet<&str> = regular.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids.len(), owner.len());

        // Missing events and gaps, from the seqs of each key.
        let mut seqs: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
        for r in &regular {
            seqs.entry(&r.key).or_default().insert(r.seq);
        }
        let (mut missing, mut gaps) = (0u64, 0u64);
        for set in seqs.values() {
            let v: Vec<i64> = set.iter().copied().collect();
            assert_eq!(v[0], 0);
            for w in v.windows(2) {
                if w[1] > w[0] + 1 {
                    gaps += 1;
                    missing += (w[1] - w[0] - 1) as u64;
                }
            }
        }
        assert_eq!(seqs.len(), 200);
        assert_eq!(s.missing_events, missing);
        assert_eq!(s.gaps_injected, gaps);
        assert_eq!(ids.len() as u64 + missing, 20_000);

        // Outcomes per event.
        let mut by_event: BTreeMap<&str, Vec<&Read>> = BTreeMap::new();
        for r in &regular {
            by_event.entry(&r.event_id).or_default().push(r);
        }
        let (mut processed, mut failed, mut untried) = (0u64, 0u64, 0u64);
        for (id, rs) in &by_event {
            let statuses: Vec<Option<&str>> = rs.iter().map(|r| r.status.as_deref()).collect();
            if statuses.contains(&Some("processed")) {
                processed += 1;
                assert_eq!(statuses.last().unwrap(), &Some("processed"), "{id}");
            } else if statuses.iter().all(|s| *s == Some("failed")) {
                failed += 1;
                assert!(rs.iter().all(|r| r.error.is_some()), "{id}");
            } else {
                untried += 1;
                assert!(
                    rs.iter().all(|r| r.attempts.is_none() && r.error.is_none()),
                    "{id}"
                );
            }
            // Later attempts later; attempts never decrease; same day.
            for w in rs.windows(2) {
                assert!(w[0].time <= w[1].time, "{id}");
                if let (Some(a), Some(b)) = (w[0].attempts, w[1].attempts) {
                    assert!(a <= b, "{id}");
                }
                assert_eq!(
                    w[0].time / 86_400_000_000,
                    w[1].time / 86_400_000_000,
                    "{id}"
                );
            }
        }
        assert_eq!(s.processed_events, processed);
        assert_eq!(s.failed_events, failed);

        // Rates in the documented ranges.
        let pct = |n: u64| n as f64 * 100.0 / 20_000.0;
        assert!((0.4..2.0).contains(&pct(missing)), "missing {missing}");
        assert!(
            (84.0..92.0).contains(&pct(processed)),
            "processed {processed}"
        );
        assert!((6.5..9.5).contains(&pct(failed)), "failed {failed}");
        assert!((2.0..4.0).contains(&pct(untried)), "untried {untried}");
        assert!(
            (0.5..1.5).contains(&pct(s.duplicate_rows)),
            "dups {}",
            s.duplicate_rows
        );
        assert!(s.conflicts_injected > 0 && pct(s.conflicts_injected) < 0.6);
        let permanent = rows
            .iter()
            .filter(|r| r.error.as_deref() == Some("schema validation failed: field amount"))
            .count();
        assert!(permanent > 0);
        // Payloads are JSON naming their event.
        for r in rows.iter().take(100) {
            let v: serde_json::Value =
                serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
            assert_eq!(v["id"], r.event_id.as_str());
            assert!(v["amount"].as_f64().unwrap() >= 1.0);
        }
    }

    #[tokio::test]
    async fn generate_small_archives_skip_empty_slices() {
        let dir = tempfile::tempdir().unwrap();
        let s = run(dir.path(), &opts(1, 1, 9)).await;
        assert_eq!((s.files, s.events, s.missing_events), (1, 1, 0));
        assert_eq!(s.rows, read_all(dir.path()).len() as u64);
    }

    #[tokio::test]
    async fn generate_invalid_options_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(dir.path().to_str().unwrap(), &Default::default()).unwrap();
        let cases = [
            (opts(0, 1, 1), "--events"),
            (opts(10, 0, 1), "--keys"),
            (opts(10, 11, 1), "--keys"),
            (
                GenerateOptions {
                    days: 0,
                    ..opts(10, 1, 1)
                },
                "--days",
            ),
            (
                GenerateOptions {
                    files_per_day: 0,
                    ..opts(10, 1, 1)
                },
                "--files-per-day",
            ),
            (
                GenerateOptions {
                    row_group_rows: 0,
                    ..opts(10, 1, 1)
                },
                "--row-group-rows",
            ),
            (
                GenerateOptions {
                    days: u32::MAX,
                    ..opts(10, 1, 1)
                },
                "--days",
            ),
        ];
        for (o, flag) in cases {
            let e = generate(&loc, &o).await.unwrap_err();
            let GenerateError::Invalid { flag: f, .. } = &e else {
                panic!("{o:?}: expected Invalid, got {e}");
            };
            assert_eq!(*f, flag);
            assert!(e.to_string().contains(flag), "{e}");
        }
        let e = generate(&loc, &opts(10, 11, 1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("--keys must be between 1 and --events"), "{e}");
        assert!(files(dir.path()).is_empty());
    }
}
