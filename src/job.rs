//! Job settings: the TOML job file, `${ENV}` interpolation, flag overrides
//! and validation, layered in that order. The result ([`Scan`], [`RunSettings`])
//! is fully validated: nothing downstream re-checks user input, and every
//! error here names the key, flag or value at fault and says how to fix it.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::cli::{RunArgs, ScanArgs};
use crate::kafka::KafkaSettings;
use crate::location::StorageSettings;

pub mod detect;

/// Errors in settings: all are usage/configuration errors (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    #[error("job file {file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("job file {file}: {message}")]
    Parse { file: String, message: String },
    #[error("job file {file}: key `{key}`: environment variable ${{{var}}} is not set")]
    UnsetVariable {
        file: String,
        key: String,
        var: String,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// The job file, as written. Every field is optional: flags may supply it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// The archive: a location (path, file://, s3://, gs://, az://,
    /// kafka://HOST:PORT/TOPIC) or a list of them, read as one union.
    pub source: Option<OneOrMany>,
    /// Output root: replay/, dlq/, gaps/ and _state/ go below it.
    pub out: Option<String>,
    /// Run the detection plan on a Ballista cluster (df://HOST:PORT).
    pub cluster: Option<String>,
    /// In cluster mode, local paths are the same on every executor.
    pub cluster_shared_fs: Option<bool>,
    /// In cluster mode, the longest to wait for an answer (e.g. "30m").
    pub cluster_timeout: Option<String>,
    /// Where the ledger and run manifests live (default `<out>/_state`).
    pub state: Option<String>,
    /// Window start, RFC 3339, inclusive.
    pub from: Option<String>,
    /// Window end, RFC 3339, exclusive.
    pub to: Option<String>,
    /// The run id (default generated from the time).
    pub run_id: Option<String>,
    /// Write the JSON report to this local file.
    pub report: Option<String>,
    /// Retries before an event goes to the DLQ (default 3).
    pub max_attempts: Option<i64>,
    /// Regexes (Rust syntax) of errors that go to the DLQ at once.
    pub permanent_errors: Option<Vec<String>>,
    /// Status values that mean done (default ["processed"]).
    pub done_statuses: Option<Vec<String>>,
    /// Detect per-key sequence gaps (default true; needs key and seq).
    pub detect_gaps: Option<bool>,
    /// Detect (key, seq) conflicts (default true; needs key and seq).
    pub detect_conflicts: Option<bool>,
    /// Exit 3 when the run dead-lettered anything.
    pub fail_on_dlq: Option<bool>,
    /// What a run does with a key's events that would be replayed after
    /// its first gap: "replay" (default), "hold" (left for a later run,
    /// once the gap is filled), "dlq" (reason `after_gap`).
    pub on_gap: Option<crate::policy::OnBarrier>,
    /// The same after a key's first conflicting seq: "replay" (default),
    /// "hold", "dlq" (reason `after_conflict`).
    pub on_conflict: Option<crate::policy::OnBarrier>,
    /// A Kafka topic (`kafka://HOST:PORT/TOPIC`) that may still retain the
    /// events of the archive's gaps: each gap is classified `recoverable`,
    /// `partial` or `lost`, and the events found are replayed in the run.
    pub recover_from: Option<String>,
    /// Memory pool for the query engine, e.g. "4G", "512M" (default: half
    /// the memory available, see [`crate::machine`]).
    pub memory_limit: Option<String>,
    /// The directory the query engine spills to (default: the system temp
    /// dir). Must exist and be writable.
    pub spill_dir: Option<String>,
    /// Source column names for the input contract's columns.
    pub columns: Option<ColumnNames>,
    /// Sink locations overriding `<out>/replay`, `<out>/dlq`, `<out>/gaps`.
    pub sinks: Option<SinkTargets>,
    /// Hive partition folders to prune by the window, outermost first.
    pub partitions: Option<Vec<PartitionSpec>>,
    /// Object-store settings (endpoint, credentials, retries).
    pub storage: Option<StorageSettings>,
    /// Kafka settings for kafka:// sinks and sources.
    pub kafka: Option<KafkaSettings>,
    /// `[detect.silence]`, `[detect.volume]`: detections run only when set.
    pub detect: Option<detect::DetectFile>,
    /// `backfill state-at`: the state as aggregates, and the statuses that
    /// mean a key was deleted.
    pub state_at: Option<crate::state_at::StateAtSettings>,
    /// `backfill reconcile`, `run --reconcile-snapshot`: the downstream's
    /// snapshot and what it holds per key.
    pub reconcile: Option<crate::reconcile::ReconcileFile>,
    /// `[logs]`: application logs as evidence (NDJSON files and the field
    /// of each column of `logs`).
    pub logs: Option<LogsFile>,
}

/// `[logs]`: NDJSON / JSON-lines files (plain or `.gz`) whose error-level
/// lines count as failed attempts and contradict processed events
/// (docs/reference.md, "Application logs").
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogsFile {
    /// Files, folders or globs (`logs/app-*.jsonl.gz`), local or in an
    /// object store; `--logs` replaces them.
    pub paths: Option<OneOrMany>,
    /// The JSON field naming the event (default `event_id`).
    pub event_id: Option<String>,
    /// The line's time: RFC 3339 or epoch milliseconds (default `timestamp`).
    pub timestamp: Option<String>,
    /// The line's level (default `level`).
    pub level: Option<String>,
    /// The message (default `message`).
    pub message: Option<String>,
    /// The error or stack trace (default `error`).
    pub error: Option<String>,
    /// Levels that mean a failed attempt, case-insensitive (default
    /// `["ERROR", "FATAL"]`).
    pub error_levels: Option<Vec<String>>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `[columns]`: the source's name for each input-contract column.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnNames {
    pub event_id: Option<String>,
    pub key: Option<String>,
    pub seq: Option<String>,
    pub event_time: Option<String>,
    pub status: Option<String>,
    pub attempts: Option<String>,
    pub error: Option<String>,
    pub payload: Option<String>,
}

/// `[sinks]`: where each output goes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkTargets {
    pub replay: Option<String>,
    pub dlq: Option<String>,
    pub gaps: Option<String>,
    /// Silences (`[detect.silence]`), default `<out>/silences`.
    pub silences: Option<String>,
    /// Volume anomalies (`[detect.volume]`), default `<out>/anomalies`.
    pub anomalies: Option<String>,
    /// Keys whose downstream snapshot disagrees (`run --reconcile-snapshot`).
    pub reconcile: Option<String>,
    /// Processed events contradicted by a later error log line (`[logs]`),
    /// default `<out>/contradicted`.
    pub contradicted: Option<String>,
}

/// `[[partitions]]`: one hive folder level, e.g. `name = "dt"`,
/// `format = "%Y-%m-%d"`; with `hour` as `%H` below it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// The folder's key: `dt` in `dt=2024-01-31/`.
    pub name: String,
    /// chrono format of the value: `%Y-%m-%d`, `%H`, `%Y-%m-%dT%H`, ...
    pub format: String,
}

/// The input-contract columns, mapped to source column names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Columns {
    pub event_id: String,
    pub key: String,
    pub seq: String,
    pub event_time: String,
    pub status: String,
    pub attempts: String,
    pub error: String,
    pub payload: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            event_id: "event_id".into(),
            key: "key".into(),
            seq: "seq".into(),
            event_time: "event_time".into(),
            status: "status".into(),
            attempts: "attempts".into(),
            error: "error".into(),
            payload: "payload".into(),
        }
    }
}

impl Columns {
    /// (canonical name, source name) pairs.
    pub fn pairs(&self) -> [(&'static str, &str); 8] {
        [
            ("event_id", &self.event_id),
            ("key", &self.key),
            ("seq", &self.seq),
            ("event_time", &self.event_time),
            ("status", &self.status),
            ("attempts", &self.attempts),
            ("error", &self.error),
            ("payload", &self.payload),
        ]
    }

    fn set(&mut self, canonical: &str, source: String) -> bool {
        let slot = match canonical {
            "event_id" => &mut self.event_id,
            "key" => &mut self.key,
            "seq" => &mut self.seq,
            "event_time" => &mut self.event_time,
            "status" => &mut self.status,
            "attempts" => &mut self.attempts,
            "error" => &mut self.error,
            "payload" => &mut self.payload,
            _ => return false,
        };
        *slot = source;
        true
    }
}

/// The name of the setting that asked for a cluster, for messages: the
/// flag (or its variable), else the job file's key.
fn cluster_setting(args: &ScanArgs) -> &'static str {
    if args.cluster.is_some() {
        "--cluster"
    } else {
        "cluster"
    }
}

/// `command` runs in-process only: `--cluster` (or `cluster` in the job
/// file) is refused, naming it.
pub fn no_cluster(args: &ScanArgs, scan: &Scan, command: &str) -> Result<(), JobError> {
    if scan.cluster.is_none() {
        return Ok(());
    }
    Err(invalid(
        cluster_setting(args),
        format!(
            "`backfill {command}` does not run on a cluster yet (run, gaps, sql and explain do): run it without one"
        ),
    ))
}

/// Validated settings for reading and detecting (every subcommand but generate).
#[derive(Debug, Clone)]
pub struct Scan {
    pub sources: Vec<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub columns: Columns,
    pub done_statuses: Vec<String>,
    pub detect_gaps: bool,
    pub detect_conflicts: bool,
    pub memory_limit: usize,
    /// `--shard I/N`: this run decides the events and keys of one shard
    /// ([`crate::shard`]); None: all of them.
    pub shard: Option<crate::shard::Shard>,
    /// Where the query engine spills; `None`: the system temp dir. Checked to
    /// be an existing, writable directory. Use [`spill_dir`] to place files.
    pub spill_dir: Option<PathBuf>,
    pub partitions: Vec<PartitionSpec>,
    pub storage: StorageSettings,
    pub kafka: Option<KafkaSettings>,
    /// Locations the archive listing leaves out where they lie inside a
    /// source: the run's own outputs and state (`run` only).
    pub exclude: Vec<String>,
    /// The candidates carry their key's gap barrier (`backfill_after_gap`).
    /// On for `sql` (the view shows it) and for a run with `--on-gap
    /// hold|dlq`; off in a default run, whose fast path then keeps no
    /// per-key map of first gaps (an entry per key with a gap, outside the
    /// memory pool).
    pub gap_barrier: bool,
    /// `--recover-from`: the topic the gaps' missing events are looked for
    /// in (`run` only). With it the archive's schema gains the Kafka
    /// coordinate columns, NULL for archived rows, so that the sinks, opened
    /// before any gap is known, can carry a recovered event's coordinates.
    pub recover_from: Option<String>,
    /// `--logs` / `[logs]`: application logs as evidence; `None`: none.
    pub logs: Option<crate::source::logs::LogSettings>,
    /// `--cluster` / `cluster`: the Ballista scheduler the plans run on;
    /// `None`: in-process.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// Validated settings of `backfill run`.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub scan: Scan,
    pub out: Option<String>,
    pub state: String,
    pub replay_sink: Option<String>,
    pub dlq_sink: Option<String>,
    pub gaps_sink: Option<String>,
    /// Silences to find and where they go; `None`: not asked for.
    pub silence: Option<detect::Silence>,
    pub silences_sink: Option<String>,
    /// Volume anomalies to find and where they go; `None`: not asked for.
    pub volume: Option<detect::Volume>,
    pub anomalies_sink: Option<String>,
    /// The downstream's snapshot to reconcile with first; `None`: not asked.
    pub reconcile: Option<crate::reconcile::Reconcile>,
    pub reconcile_sink: Option<String>,
    /// Where contradicted events go (`--logs` runs only).
    pub contradicted_sink: Option<String>,
    pub max_attempts: i64,
    pub permanent_errors: Vec<String>,
    pub run_id: String,
    pub report: Option<String>,
    pub dry_run: bool,
    pub fail_on_dlq: bool,
    pub on_gap: crate::policy::OnBarrier,
    pub on_conflict: crate::policy::OnBarrier,
}

/// Read, interpolate and parse a job file.
pub fn load_job_file(path: &FsPath) -> Result<JobFile, JobError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
        file: file.clone(),
        source,
    })?;
    parse_job_text(&file, &text, &|v| std::env::var(v).ok())
}

/// Parse job-file text; `env` looks variables up (a parameter for tests).
pub fn parse_job_text(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<JobFile, JobError> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| JobError::Parse {
        file: file.to_string(),
        message: one_line_toml_error(text, &e),
    })?;
    for (k, v) in table.iter_mut() {
        interpolate(file, k, v, env)?;
    }
    JobFile::deserialize(toml::Value::Table(table)).map_err(|e| JobError::Parse {
        file: file.to_string(),
        message: placed_value_error(text, &e),
    })
}

/// A value of the wrong type (`memory_limit = 1073741824`, `max_attempts =
/// "3"`) fails the deserialization of the interpolated table, which has no
/// places: serde's message named neither the key nor the line. The text as
/// written has them (interpolation turns strings into strings only, so the
/// same value fails there): its line, and the key that starts it.
fn placed_value_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    // The same failure only: a `${VAR}` may fail the text elsewhere.
    let Some(span) = toml::from_str::<JobFile>(text)
        .err()
        .filter(|raw| raw.message().replace('\n', " ") == msg)
        .and_then(|raw| raw.span())
    else {
        return msg;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[..start].rsplit('\n').next().unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            format!("line {line_no}: `{}`: {msg}", key.trim())
        }
        _ => format!("line {line_no}: {msg}"),
    }
}

fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

/// Replace `${VAR}` in every string value; `$${` stays a literal `${`.
fn interpolate(
    file: &str,
    key: &str,
    v: &mut toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), JobError> {
    match v {
        toml::Value::String(s) => {
            *s = interpolate_str(s, &|var| {
                env(var).ok_or_else(|| JobError::UnsetVariable {
                    file: file.to_string(),
                    key: key.to_string(),
                    var: var.to_string(),
                })
            })?;
        }
        toml::Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                interpolate(file, &format!("{key}[{i}]"), x, env)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, x) in t.iter_mut() {
                interpolate(file, &format!("{key}.{k}"), x, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn interpolate_str(
    s: &str,
    lookup: &dyn Fn(&str) -> Result<String, JobError>,
) -> Result<String, JobError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            match body.find('}') {
                Some(end) => {
                    out.push_str(&lookup(&body[..end])?);
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse an RFC 3339 timestamp (a date alone means its midnight UTC).
///
/// A bound finer than a nanosecond is refused: chrono drops the digits after
/// the ninth, so `00:00:00.0000000001` would silently become `00:00:00` and
/// keep an event the user meant to leave out. Trailing zeros are exact and
/// accepted.
pub fn parse_time(what: &str, s: &str) -> Result<DateTime<Utc>, JobError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        if let Some(extra) = sub_nanosecond_digits(s)
            && extra.contains(|c: char| c != '0')
        {
            return Err(invalid(
                what,
                format!(
                    "'{s}' is finer than a nanosecond; times have at most 9 fractional \
                     digits (e.g. 2024-01-31T00:00:00.123456789Z)"
                ),
            ));
        }
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .unwrap_or_default());
    }
    Err(invalid(
        what,
        format!("'{s}' is not an RFC 3339 timestamp (e.g. 2024-01-31T00:00:00Z)"),
    ))
}

/// The fractional-second digits of an RFC 3339 time beyond the ninth, if
/// any: `HH:MM:SS.` is at a fixed place after the date (`YYYY-MM-DDTHH:MM:SS`
/// is 19 bytes; chrono accepts no other layout).
fn sub_nanosecond_digits(s: &str) -> Option<&str> {
    let frac = s.get(19..)?.strip_prefix('.')?;
    let digits = frac.len() - frac.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    frac.get(9..digits)
}

/// Parse "4G", "512M", "1073741824".
pub fn parse_size(what: &str, s: &str) -> Result<usize, JobError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: usize = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(invalid(what, format!("'{s}': unknown unit (use K, M, G)"))),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| invalid(what, format!("'{s}' is not a size (e.g. 4G, 512M)")))?;
    if n <= 0.0 {
        return Err(invalid(what, format!("'{s}' must be positive")));
    }
    Ok((n * mult as f64) as usize)
}

/// The smallest memory limit accepted. Below it nothing useful runs: the
/// engine's sorts reserve 10 MiB per core for their merge before they
/// spill, and one decoded batch of a wide archive takes more.
pub const MIN_MEMORY_LIMIT: usize = 64 << 20;

fn min_memory_limit(what: &str, s: &str) -> Result<usize, JobError> {
    let n = parse_size(what, s)?;
    if n < MIN_MEMORY_LIMIT {
        return Err(invalid(
            what,
            format!(
                "'{s}' is below the minimum of 64M (the engine's merge buffers alone need that much)"
            ),
        ));
    }
    Ok(n)
}

/// A spill directory must exist and take files: DataFusion would otherwise
/// create a missing one silently (a typo becomes a new folder) or fail in
/// the middle of the scan, with an error that names no setting.
fn check_spill_dir(what: &str, dir: &FsPath) -> Result<PathBuf, JobError> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(invalid(what, format!("{shown} is not a directory"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                what,
                format!(
                    "{shown} does not exist: create it, or leave the setting out to spill to the system temp dir"
                ),
            ));
        }
        Err(e) => return Err(invalid(what, format!("{shown}: {e}"))),
    }
    // Writable: an anonymous temporary file, gone when dropped.
    tempfile::tempfile_in(dir)
        .map_err(|e| invalid(what, format!("{shown} is not writable: {e}")))?;
    Ok(dir.to_path_buf())
}

/// The directory spill files go to: the configured `--spill-dir`, or the
/// system temp dir. Any code of ours that spills uses it too, so that one
/// setting moves every spill off a small /tmp.
pub fn spill_dir(scan: &Scan) -> PathBuf {
    scan.spill_dir.clone().unwrap_or_else(std::env::temp_dir)
}

/// A run id names folders and objects: keep it to a safe alphabet.
pub fn validate_run_id(id: &str) -> Result<(), JobError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--run-id",
            format!(
                "'{id}' is not a valid run id: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
            ),
        ))
    }
}

/// The default run id: the start time, to the second, UTC.
pub fn default_run_id(now: DateTime<Utc>) -> String {
    format!("run-{}", now.format("%Y%m%dT%H%M%SZ"))
}

fn job_of(args: &ScanArgs) -> Result<JobFile, JobError> {
    match &args.job {
        Some(p) => load_job_file(p),
        None => Ok(JobFile::default()),
    }
}

/// Layer flags over the job file into validated scan settings.
pub fn scan_settings(args: &ScanArgs) -> Result<(Scan, JobFile), JobError> {
    let job = job_of(args)?;
    let scan = build_scan(args, &job)?;
    Ok((scan, job))
}

fn build_scan(args: &ScanArgs, job: &JobFile) -> Result<Scan, JobError> {
    let sources = if !args.source.is_empty() {
        args.source.clone()
    } else {
        job.source
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    };
    if sources.is_empty() {
        return Err(invalid(
            "--source",
            "no source given: pass --source LOCATION or set `source` in the job file",
        ));
    }
    // Named as the user set it: the flag, or the job file's key.
    let from = match (args.from.as_deref(), job.from.as_deref()) {
        (Some(s), _) => Some(parse_time("--from", s)?),
        (None, Some(s)) => Some(parse_time("from", s)?),
        (None, None) => None,
    };
    let to = match (args.to.as_deref(), job.to.as_deref()) {
        (Some(s), _) => Some(parse_time("--to", s)?),
        (None, Some(s)) => Some(parse_time("to", s)?),
        (None, None) => None,
    };
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(invalid(
            "--from/--to",
            format!("the window is empty: --from {f} is not before --to {t}"),
        ));
    }
    let mut columns = Columns::default();
    if let Some(c) = &job.columns {
        for (canonical, v) in [
            ("event_id", &c.event_id),
            ("key", &c.key),
            ("seq", &c.seq),
            ("event_time", &c.event_time),
            ("status", &c.status),
            ("attempts", &c.attempts),
            ("error", &c.error),
            ("payload", &c.payload),
        ] {
            if let Some(v) = v {
                columns.set(canonical, v.clone());
            }
        }
    }
    for m in &args.column {
        let (canonical, source) = m.split_once('=').ok_or_else(|| {
            invalid(
                "--column",
                format!("'{m}' is not NAME=SOURCE_COLUMN (e.g. event_id=id)"),
            )
        })?;
        if source.is_empty() || !columns.set(canonical.trim(), source.trim().to_string()) {
            return Err(invalid(
                "--column",
                format!(
                    "'{m}': NAME must be one of event_id, key, seq, event_time, status, attempts, error, payload, and SOURCE_COLUMN not empty"
                ),
            ));
        }
    }
    let mut seen = BTreeMap::new();
    for (canonical, source) in columns.pairs() {
        if let Some(other) = seen.insert(source.to_string(), canonical) {
            return Err(invalid(
                "columns",
                format!("source column '{source}' is mapped to both {other} and {canonical}"),
            ));
        }
    }
    let done_statuses = if !args.done_status.is_empty() {
        args.done_status.clone()
    } else {
        job.done_statuses
            .clone()
            .unwrap_or_else(|| vec!["processed".into()])
    };
    if done_statuses.is_empty() {
        return Err(invalid(
            "done_statuses",
            "at least one done status is needed",
        ));
    }
    let memory_limit = match (args.memory_limit.as_deref(), job.memory_limit.as_deref()) {
        (Some(s), _) => min_memory_limit("--memory-limit", s)?,
        (None, Some(s)) => min_memory_limit("memory_limit", s)?,
        (None, None) => crate::machine::default_memory_limit(),
    };
    crate::machine::set_writer_budget(memory_limit);
    if args.memory_limit.is_some() || job.memory_limit.is_some() {
        crate::machine::memory_bounded();
        // More than there is: the pool never spills before the kernel (or
        // the container's limit) kills the process, the very thing the
        // setting is for.
        if let Some(here) = crate::machine::available_here()
            && memory_limit as u64 > here
        {
            let (what, value) = match (args.memory_limit.as_deref(), job.memory_limit.as_deref()) {
                (Some(s), _) => ("--memory-limit", s),
                (None, s) => ("memory_limit", s.unwrap_or_default()),
            };
            tracing::warn!(
                "{what} {} is more than the {} this process may use (the RAM or its cgroup's limit): the run spills only past it, so the kernel may kill it first; leave the setting out for half of it",
                value.trim(),
                crate::human::bytes(here)
            );
        }
    }
    let spill_dir = match (&args.spill_dir, job.spill_dir.as_deref()) {
        (Some(p), _) => Some(check_spill_dir("--spill-dir", p)?),
        (None, Some(s)) => Some(check_spill_dir("spill_dir", FsPath::new(s))?),
        (None, None) => None,
    };
    let partitions = job.partitions.clone().unwrap_or_default();
    for (i, p) in partitions.iter().enumerate() {
        if p.name.is_empty() || p.name.contains(['/', '=']) {
            return Err(invalid(
                format!("partitions[{i}].name"),
                format!("'{}' is not a folder key", p.name),
            ));
        }
        crate::source::partition_granularity(&p.format).map_err(|m| {
            invalid(
                format!("partitions[{i}].format"),
                format!("'{}': {m}", p.format),
            )
        })?;
    }
    let cluster = match args.cluster.as_deref().or(job.cluster.as_deref()) {
        Some(u) => {
            Some(crate::cluster::Cluster::parse(u).map_err(|m| invalid(cluster_setting(args), m))?)
        }
        None => None,
    }
    .map(|mut c| -> Result<_, JobError> {
        c.shared_fs = args.cluster_shared_fs || job.cluster_shared_fs.unwrap_or(false);
        c.timeout = match (&args.cluster_timeout, &job.cluster_timeout) {
            (Some(t), _) => Some(("--cluster-timeout", t)),
            (None, Some(t)) => Some(("cluster_timeout", t)),
            (None, None) => None,
        }
        .map(|(what, t)| {
            detect::parse_duration(what, t).map(|us| std::time::Duration::from_micros(us as u64))
        })
        .transpose()?;
        Ok(c)
    })
    .transpose()?;
    Ok(Scan {
        sources,
        from,
        to,
        columns,
        done_statuses,
        detect_gaps: !args.no_gaps && job.detect_gaps.unwrap_or(true),
        detect_conflicts: !args.no_conflicts && job.detect_conflicts.unwrap_or(true),
        memory_limit,
        shard: None,
        spill_dir,
        partitions,
        storage: job.storage.clone().unwrap_or_default(),
        kafka: job.kafka.clone(),
        exclude: vec![],
        gap_barrier: !args.no_gaps && job.detect_gaps.unwrap_or(true),
        recover_from: None,
        logs: log_settings(args, job)?,
        cluster,
    })
}

/// `--logs` over `[logs] paths`, with the job file's field mapping.
fn log_settings(
    args: &ScanArgs,
    job: &JobFile,
) -> Result<Option<crate::source::logs::LogSettings>, JobError> {
    let file = job.logs.clone().unwrap_or_default();
    let paths = if !args.logs.is_empty() {
        args.logs.clone()
    } else {
        file.paths
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    };
    if paths.is_empty() {
        if job.logs.is_some() {
            return Err(invalid(
                "logs.paths",
                "[logs] names no files: set `paths = [\"logs/\"]` or pass --logs LOC",
            ));
        }
        return Ok(None);
    }
    if let Some(p) = paths.iter().find(|p| p.trim().is_empty()) {
        return Err(invalid("--logs", format!("'{p}' is not a location")));
    }
    let defaults = crate::source::logs::LogFields::default();
    let fields = crate::source::logs::LogFields {
        event_id: file.event_id.unwrap_or(defaults.event_id),
        timestamp: file.timestamp.unwrap_or(defaults.timestamp),
        level: file.level.unwrap_or(defaults.level),
        message: file.message.unwrap_or(defaults.message),
        error: file.error.unwrap_or(defaults.error),
    };
    let mut seen = BTreeMap::new();
    for (role, field) in fields.pairs() {
        if field.is_empty() {
            return Err(invalid(format!("logs.{role}"), "the field name is empty"));
        }
        if let Some(other) = seen.insert(field.to_string(), role) {
            return Err(invalid(
                format!("logs.{role}"),
                format!("the field '{field}' is mapped to both {other} and {role}"),
            ));
        }
    }
    let error_levels: Vec<String> = file
        .error_levels
        .unwrap_or_else(crate::source::logs::default_error_levels)
        .into_iter()
        .map(|l| l.trim().to_uppercase())
        .collect();
    if error_levels.is_empty() || error_levels.iter().any(String::is_empty) {
        return Err(invalid(
            "logs.error_levels",
            "name at least one level, none empty (default [\"ERROR\", \"FATAL\"])",
        ));
    }
    Ok(Some(crate::source::logs::LogSettings {
        paths,
        fields,
        error_levels,
    }))
}

/// Layer flags over the job file into validated run settings.
pub fn run_settings(args: &RunArgs, now: DateTime<Utc>) -> Result<RunSettings, JobError> {
    let (mut scan, job) = scan_settings(&args.scan)?;
    let sinks = job.sinks.clone().unwrap_or_default();
    let out = args.out.clone().or(job.out.clone());
    let replay_sink = args.replay_sink.clone().or(sinks.replay);
    let dlq_sink = args.dlq_sink.clone().or(sinks.dlq);
    let gaps_sink = args.gaps_sink.clone().or(sinks.gaps);
    let detect_file = job.detect.clone().unwrap_or_default();
    let silence = detect::silence(
        detect_file.silence.as_ref(),
        &detect::SilenceFlags {
            by: &args.silence_by,
            by_flag: "--silence-by",
            threshold: args.silence_threshold.as_deref(),
            threshold_flag: "--silence-threshold",
            asked: args.silences || args.silences_sink.is_some(),
        },
    )?;
    let volume = detect::volume(
        detect_file.volume.as_ref(),
        &detect::VolumeFlags {
            by: &args.volume_by,
            by_flag: "--volume-by",
            bucket: args.volume_bucket.as_deref(),
            bucket_flag: "--volume-bucket",
            threshold: args.volume_threshold,
            threshold_flag: "--volume-threshold",
            asked: args.anomalies || args.anomalies_sink.is_some(),
        },
    )?;
    let silences_sink = args.silences_sink.clone().or(sinks.silences);
    let anomalies_sink = args.anomalies_sink.clone().or(sinks.anomalies);
    let reconcile = crate::reconcile::settings(
        job.reconcile.as_ref(),
        &crate::reconcile::Flags {
            snapshot: args.reconcile_snapshot.as_deref(),
            expected: args.reconcile_expected.as_deref(),
            ..Default::default()
        },
        "--reconcile-snapshot",
        "--reconcile-expected",
    )?;
    let reconcile_sink = args.reconcile_sink.clone().or(sinks.reconcile);
    if reconcile.is_some() {
        crate::reconcile::check_window(&scan, "--reconcile-snapshot")?;
    }
    let contradicted_sink = args.contradicted_sink.clone().or(sinks.contradicted);
    if scan.logs.is_none() {
        // The job file's key too: a sink that is never written is a
        // mistake to point out, not a setting to ignore.
        let given = if args.contradicted_sink.is_some() {
            Some("--contradicted-sink")
        } else {
            contradicted_sink.as_ref().map(|_| "[sinks] contradicted")
        };
        if let Some(what) = given {
            return Err(invalid(
                what,
                "contradicted events come from application logs: pass --logs LOC or set [logs] paths",
            ));
        }
    }
    let state = args.state.clone().or(job.state.clone());
    let state = match (state, &out) {
        (Some(s), _) => s,
        (None, Some(o)) => format!("{}/_state", o.trim_end_matches('/')),
        (None, None) => {
            return Err(invalid(
                "--state",
                "no state location: pass --out DIR (state goes to DIR/_state) or --state LOCATION",
            ));
        }
    };
    if out.is_none() {
        for (flag, s) in [
            ("--replay-sink", &replay_sink),
            ("--dlq-sink", &dlq_sink),
            ("--gaps-sink", &gaps_sink),
            ("--silences-sink", &silences_sink),
            ("--anomalies-sink", &anomalies_sink),
            ("--reconcile-sink", &reconcile_sink),
            ("--contradicted-sink", &contradicted_sink),
        ] {
            let needed = match flag {
                "--reconcile-sink" => reconcile.is_some(),
                "--contradicted-sink" => scan.logs.is_some(),
                "--gaps-sink" => scan.detect_gaps,
                "--silences-sink" => silence.is_some(),
                "--anomalies-sink" => volume.is_some(),
                _ => true,
            };
            if s.is_none() && needed {
                return Err(invalid(
                    flag,
                    format!("no location for this output: pass --out DIR or {flag} LOCATION"),
                ));
            }
        }
    }
    let max_attempts = args.max_attempts.or(job.max_attempts).unwrap_or(3);
    if max_attempts < 0 {
        return Err(invalid(
            "--max-attempts",
            format!("{max_attempts} must be 0 or more"),
        ));
    }
    let permanent_errors = if !args.permanent_error.is_empty() {
        args.permanent_error.clone()
    } else {
        job.permanent_errors.clone().unwrap_or_default()
    };
    for re in &permanent_errors {
        Regex::new(re).map_err(|e| {
            invalid(
                "--permanent-error",
                format!(
                    "'{re}' is not a valid regex: {}",
                    e.to_string().lines().last().unwrap_or("invalid")
                ),
            )
        })?;
    }
    let mut run_id = args
        .run_id
        .clone()
        .or(job.run_id.clone())
        .unwrap_or_else(|| default_run_id(now));
    if let Some(s) = &args.shard {
        let shard: crate::shard::Shard = s.parse().map_err(|m| invalid("--shard", m))?;
        run_id.push_str(&shard.run_id_suffix());
        scan.shard = Some(shard);
        // A shard sees its keys' events only in the one-pass detection;
        // silences and volumes look at whole groups over the whole window.
        if silence.is_some() || volume.is_some() {
            return Err(invalid(
                "--shard",
                "silences and volume anomalies are found over the whole window, not per shard: run them without --shard (or with `backfill silences` / `backfill anomalies`)",
            ));
        }
        if reconcile.is_some() {
            return Err(invalid(
                "--shard",
                "reconciliation compares every key of the snapshot, not a shard's: run it without --shard (or with `backfill reconcile`)",
            ));
        }
    }
    validate_run_id(&run_id)?;
    use crate::policy::OnBarrier;
    let on_gap = args.on_gap.or(job.on_gap).unwrap_or_default();
    let on_conflict = args.on_conflict.or(job.on_conflict).unwrap_or_default();
    for (flag, on, detected, off) in [
        (
            "--on-gap",
            on_gap,
            scan.detect_gaps,
            "--no-gaps or detect_gaps = false",
        ),
        (
            "--on-conflict",
            on_conflict,
            scan.detect_conflicts,
            "--no-conflicts or detect_conflicts = false",
        ),
    ] {
        if on != OnBarrier::Replay && !detected {
            return Err(invalid(
                flag,
                format!(
                    "{} needs the detection it acts on, which is switched off ({off}); drop one of the two",
                    on.name()
                ),
            ));
        }
    }
    scan.gap_barrier = on_gap != OnBarrier::Replay;
    let recover_from = args.recover_from.clone().or(job.recover_from.clone());
    if let Some(url) = &recover_from {
        let flag = if args.recover_from.is_some() {
            "--recover-from"
        } else {
            "recover_from"
        };
        crate::kafka::parse_url(url).map_err(|e| invalid(flag, e.to_string()))?;
        if !scan.detect_gaps {
            return Err(invalid(
                flag,
                "recovers the missing events of gaps, and gap detection is switched off (--no-gaps or detect_gaps = false); drop one of the two",
            ));
        }
    }
    scan.recover_from = recover_from;
    if scan.cluster.is_some() {
        let flag = cluster_setting(&args.scan);
        // What the views on a cluster do not cover yet: each is planned
        // in-process over data the executors cannot see (the logs' counts,
        // a Kafka topic's reads, the snapshot's facts) or needs the
        // one-pass detection (shards, recovery).
        let refused = [
            (
                scan.shard.is_some(),
                "--shard splits a run into independent runs; a cluster splits one run across executors: use one or the other",
            ),
            (
                scan.recover_from.is_some(),
                "--recover-from (recover_from) reads Kafka from this machine and is not supported on a cluster yet: run it in-process",
            ),
            (
                scan.logs.is_some(),
                "--logs ([logs]) is not supported on a cluster yet: run it in-process",
            ),
            (
                silence.is_some() || volume.is_some(),
                "silences and volume anomalies are not supported on a cluster yet: run them in-process (`backfill silences`, `backfill anomalies`)",
            ),
            (
                reconcile.is_some(),
                "reconciliation is not supported on a cluster yet: run it in-process (`backfill reconcile`)",
            ),
            (
                scan.sources.iter().any(|s| s.starts_with("kafka://")),
                "a kafka:// source is read by this machine, not the executors: not supported on a cluster yet",
            ),
        ];
        if let Some((_, why)) = refused.iter().find(|(on, _)| *on) {
            return Err(invalid(flag, *why));
        }
    }
    // Outputs written into the archive must not be read back as events.
    scan.exclude = [
        &out,
        &Some(state.clone()),
        &replay_sink,
        &dlq_sink,
        &gaps_sink,
        &silences_sink,
        &anomalies_sink,
        &reconcile_sink,
        &contradicted_sink,
    ]
    .into_iter()
    .flatten()
    .filter(|l| !crate::sink::outside_the_lake(l))
    .cloned()
    .collect();
    Ok(RunSettings {
        scan,
        out,
        state,
        replay_sink,
        dlq_sink,
        gaps_sink,
        silence,
        silences_sink,
        volume,
        anomalies_sink,
        reconcile,
        reconcile_sink,
        contradicted_sink,
        max_attempts,
        permanent_errors,
        run_id,
        report: args.report.clone().or(job.report.clone()),
        dry_run: args.dry_run,
        fail_on_dlq: args.fail_on_dlq || job.fail_on_dlq.unwrap_or(false),
        on_gap,
        on_conflict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &str) -> Option<String> {
        (v == "BUCKET").then(|| "lake".to_string())
    }

    #[test]
    fn interpolates_env_and_escapes() {
        let j = parse_job_text(
            "j.toml",
            "source = \"s3://${BUCKET}/events\"\nout = \"$${literal}\"\n",
            &env,
        )
        .unwrap();
        assert!(matches!(j.source, Some(OneOrMany::One(ref s)) if s == "s3://lake/events"));
        assert_eq!(j.out.as_deref(), Some("${literal}"));
    }

    #[test]
    fn unset_variable_names_key_and_variable() {
        let e = parse_job_text("j.toml", "[storage]\nendpoint = \"${NOPE}\"\n", &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.endpoint") && e.contains("${NOPE}"),
            "{e}"
        );
    }

    /// A value of the wrong type names its line and key (it named neither).
    #[test]
    fn mistyped_value_names_its_line_and_key() {
        for (text, key, line) in [
            (
                "source = \"x\"\nmemory_limit = 1073741824\n",
                "memory_limit",
                2,
            ),
            ("memory_limit = -5\n", "memory_limit", 1),
            (
                "source = \"${BUCKET}\"\n\nmax_attempts = \"3\"\n",
                "max_attempts",
                3,
            ),
            (
                "[storage]\nendpoint = \"e\"\n[columns]\nkey = 7\n",
                "key",
                4,
            ),
        ] {
            let e = parse_job_text("j.toml", text, &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("line {line}: `{key}`: invalid type")),
                "{text}: {e}"
            );
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_job_text("j.toml", "sorce = \"x\"\n", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sorce"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse_job_text("j.toml", "[columns]\nevent = \"x\"\n", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("event"), "{e}");
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(
            parse_time("--from", "2024-01-02T03:04:05+01:00")
                .unwrap()
                .to_rfc3339(),
            "2024-01-02T02:04:05+00:00"
        );
        assert!(parse_time("--from", "2024-01-02").is_ok());
        let e = parse_time("--from", "yesterday").unwrap_err().to_string();
        assert!(e.contains("--from") && e.contains("yesterday"));
        assert_eq!(
            parse_time("--from", "2024-01-01T00:00:00.123456789Z")
                .unwrap()
                .timestamp_subsec_nanos(),
            123_456_789
        );
        assert!(parse_time("--to", "2024-01-01T00:00:00.1234567890000+00:00").is_ok());
        for s in [
            "2024-01-01T00:00:00.0000000001Z",
            "2024-01-01T00:00:00.1234567891+01:00",
        ] {
            let e = parse_time("--from", s).unwrap_err().to_string();
            assert!(
                e.contains("--from") && e.contains(s) && e.contains("nanosecond"),
                "{e}"
            );
        }
        assert_eq!(parse_size("m", "4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("m", "512MiB").unwrap(), 512 << 20);
        assert!(parse_size("m", "lots").is_err());
    }

    #[test]
    fn spill_dirs() {
        let work = tempfile::tempdir().unwrap();
        assert_eq!(
            check_spill_dir("--spill-dir", work.path()).unwrap(),
            work.path()
        );
        let missing = work.path().join("nope");
        let e = check_spill_dir("spill_dir", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("spill_dir: ") && e.contains(&missing.display().to_string()),
            "{e}"
        );
        assert!(e.contains("does not exist") && !e.contains('\n'), "{e}");
        assert!(!missing.exists());
        let file = work.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_spill_dir("--spill-dir", &file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
        // Nothing is left behind by the check.
        assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 1);

        let mut scan = build_scan(
            &ScanArgs {
                source: vec!["x".into()],
                ..Default::default()
            },
            &JobFile::default(),
        )
        .unwrap();
        assert_eq!(scan.spill_dir, None);
        assert_eq!(spill_dir(&scan), std::env::temp_dir());
        assert_eq!(scan.memory_limit, crate::machine::default_memory_limit());
        scan.spill_dir = Some(work.path().to_path_buf());
        assert_eq!(spill_dir(&scan), work.path());
    }

    /// Every example job file in jobs/ parses (with any variable set).
    #[test]
    fn example_job_files_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&p).unwrap();
                parse_job_text(&p.display().to_string(), &text, &|_| Some("x".into()))
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn run_ids() {
        assert!(validate_run_id("2024-01-31.nightly_1").is_ok());
        for bad in ["", "../x", "a/b", "-x", "a b"] {
            assert!(validate_run_id(bad).is_err(), "{bad}");
        }
    }
}
