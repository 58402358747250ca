//! Command-line definitions (clap derive): one struct per subcommand, the
//! shared scan options flattened into each. No behaviour lives here.
//!
//! Every flag also reads a `BACKFILL_<FLAG>` environment variable (the flag
//! wins; docs/cli.md lists them), so that a scheduler can set a job up in
//! the environment alone. A flag that may carry credentials (a location:
//! `s3://KEY:SECRET@...`, `kafka://user:pass@...`) hides its variable's
//! value from `--help`. A switch reads `1`/`true`/`yes`/`on` and
//! `0`/`false`/`no`/`off` from its variable.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "backfill",
    version,
    about = "Find unprocessed, missing and conflicting events in a Parquet archive; replay or dead-letter them.",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: human (timestamped lines), json (one object a
    /// line), or auto: human on a terminal, json otherwise.
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Auto,
        global = true,
        env = "BACKFILL_LOG_FORMAT",
        help_heading = "Logs"
    )]
    pub log_format: LogFormat,
    /// What to log: a level (error, warn, info, debug, trace, off) for
    /// backfill's own events, or a filter such as
    /// `info,object_store=debug` (RUST_LOG syntax). Default: info; warn for
    /// `gaps`, `sql` and `explain`, whose answer is on stdout. BACKFILL_LOG
    /// works too.
    #[arg(
        long,
        value_name = "LEVEL|FILTER",
        global = true,
        env = "BACKFILL_LOG_LEVEL",
        help_heading = "Logs"
    )]
    pub log_level: Option<String>,
    /// With --progress on and stderr not a terminal: how often a progress
    /// line is logged (e.g. 10s, 500ms, 2m).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_interval,
        global = true,
        env = "BACKFILL_PROGRESS_INTERVAL",
        help_heading = "Logs"
    )]
    pub progress_interval: std::time::Duration,
}

/// `10s`, `500ms`, `2m` or a bare number of seconds; at least 10 ms, so a
/// typo cannot turn the log into a flood.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("`{s}`: the unit is ms, s or m")),
    };
    if !secs.is_finite() || secs < 0.01 {
        return Err(format!("`{s}` is shorter than 10ms"));
    }
    // Past u64 seconds `from_secs_f64` panicked (exit 101, a backtrace).
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is too long"))
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human on a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// A timestamp, the level, the message and its fields.
    Human,
    /// One JSON object a line: timestamp, level, message, fields, target.
    Json,
}

// Parsed once per process: the size of the largest variant (run's flags)
// costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect, decide, write replays / DLQ / gaps, and commit the run.
    Run(RunArgs),
    /// Print the gap report alone.
    Gaps(GapsArgs),
    /// Print the intervals in which a group (key, source, ...) went silent.
    Silences(SilencesArgs),
    /// Print the time buckets whose event count is far from its seasonal baseline.
    Anomalies(AnomaliesArgs),
    /// SQL over the archive and the job's state: a query, a script, or a shell.
    Sql(SqlArgs),
    /// Print the physical plans of the detection.
    Explain(ExplainArgs),
    /// Write a synthetic archive with injected gaps, failures, duplicates and conflicts.
    Generate(GenerateArgs),
    /// Replay dead letters of committed runs, selected by SQL, to a sink.
    Redrive(RedriveArgs),
    /// The history of committed runs: `runs list`, `runs show ID`.
    Runs(RunsArgs),
    /// Per key, the state the processed events imply at a time T.
    StateAt(StateAtArgs),
    /// Lost transactions inferred from two snapshots of per-key totals.
    Infer(InferArgs),
    /// Per key, a snapshot of the downstream against what the archive says it should hold.
    Reconcile(ReconcileArgs),
    /// Inspect or clean the state (ledger and manifests).
    State(StateArgs),
    /// Work with run reports: merge the reports of shard runs into one.
    Report(ReportArgs),
    /// Serve a Ballista scheduler for `--cluster` runs.
    Scheduler(SchedulerArgs),
    /// Serve a Ballista executor: register with a scheduler, run its tasks.
    Executor(ExecutorArgs),
    /// Print a completion script for SHELL: `source <(backfill completions bash)`.
    Completions(CompletionsArgs),
    /// Print a man page (roff): `backfill man | man -l -`, `backfill man run`.
    Man(ManArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// The command whose page to print (`run`, `state gc`); none: the
    /// top-level page.
    #[arg(value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Output formats for tabular results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    /// Tab-separated, with a header (CSV's quoting).
    Tsv,
    Json,
    Ndjson,
}

/// Whether to draw progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Progress {
    /// Only when stderr is a terminal.
    #[default]
    Auto,
    On,
    Off,
}

/// Options of every command that reads the archive.
#[derive(Debug, Clone, Args, Default)]
pub struct ScanArgs {
    /// TOML job file; flags override its settings.
    #[arg(long, value_name = "FILE", env = "BACKFILL_JOB")]
    pub job: Option<PathBuf>,
    /// The archive (path, file://, s3://, gs://, az://, kafka://HOST:PORT/TOPIC); repeat for a union.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_SOURCE",
        hide_env_values = true
    )]
    pub source: Vec<String>,
    /// Window start on event_time, RFC 3339, inclusive.
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        env = "BACKFILL_FROM"
    )]
    pub from: Option<String>,
    /// Window end on event_time, RFC 3339, exclusive.
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        env = "BACKFILL_TO"
    )]
    pub to: Option<String>,
    /// Remap an input-contract column: NAME=SOURCE_COLUMN (repeatable).
    #[arg(long, value_name = "NAME=SOURCE_COLUMN", env = "BACKFILL_COLUMN")]
    pub column: Vec<String>,
    /// A status value that means done (repeatable; default: processed).
    #[arg(long, value_name = "STATUS", env = "BACKFILL_DONE_STATUS")]
    pub done_status: Vec<String>,
    /// Do not detect sequence gaps (key and seq become optional).
    #[arg(long, env = "BACKFILL_NO_GAPS", value_parser = BoolishValueParser::new())]
    pub no_gaps: bool,
    /// Do not detect (key, seq) conflicts.
    #[arg(long, env = "BACKFILL_NO_CONFLICTS", value_parser = BoolishValueParser::new())]
    pub no_conflicts: bool,
    /// Memory for the query engine before it spills to disk (e.g. 4G;
    /// default: half the machine's or the container's memory).
    // A leading '-' is the value's (`-5G`, refused as not positive): taken
    // for a flag, it was refused as `unexpected argument '-5'`, naming no
    // setting.
    #[arg(
        long,
        value_name = "SIZE",
        env = "BACKFILL_MEMORY_LIMIT",
        allow_hyphen_values = true
    )]
    pub memory_limit: Option<String>,
    /// Directory the query engine spills to (default: the system temp dir).
    #[arg(long, value_name = "DIR", env = "BACKFILL_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Application logs as evidence: NDJSON/JSON-lines files (plain or
    /// .gz), a folder of them or a glob, local or s3://... (repeatable;
    /// replaces `[logs] paths`; fields as `[logs]` maps them).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_LOGS",
        hide_env_values = true
    )]
    pub logs: Vec<String>,
    /// Progress on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto, env = "BACKFILL_PROGRESS")]
    pub progress: Progress,
    /// Run the detection plan on a Ballista cluster: its scheduler's
    /// address, df://HOST:PORT (`backfill scheduler`, `backfill executor`).
    #[arg(long, value_name = "URL", env = "BACKFILL_CLUSTER")]
    pub cluster: Option<String>,
    /// In cluster mode, local paths (archive, state) are the same on every
    /// executor (a shared file system): read them there instead of refusing.
    #[arg(long, env = "BACKFILL_CLUSTER_SHARED_FS", value_parser = BoolishValueParser::new())]
    pub cluster_shared_fs: bool,
    /// In cluster mode, the longest to wait for the cluster's answer to a
    /// query (its job, then each batch of the result), e.g. 30m: past it
    /// the job is cancelled and the run fails (exit 1, nothing committed).
    /// Default: no limit.
    #[arg(long, value_name = "DURATION", env = "BACKFILL_CLUSTER_TIMEOUT")]
    pub cluster_timeout: Option<String>,
}

/// `backfill scheduler`: a Ballista scheduler for `--cluster` runs.
#[derive(Debug, Clone, Args)]
pub struct SchedulerArgs {
    /// Address to listen on (0.0.0.0:50050 to take executors and clients
    /// from other machines; there is no authentication: keep it inside
    /// the cluster's network).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:50050",
        env = "BACKFILL_SCHEDULER_BIND"
    )]
    pub bind: String,
    /// The host executors and clients reach it at (default: the bind host).
    #[arg(long, value_name = "HOST", env = "BACKFILL_SCHEDULER_EXTERNAL_HOST")]
    pub external_host: Option<String>,
    /// An executor silent this long is dead: its tasks run again elsewhere;
    /// a job without any live executor this long is cancelled. A few of
    /// the executors' --heartbeat-interval.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 180,
        env = "BACKFILL_SCHEDULER_EXECUTOR_TIMEOUT",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub executor_timeout: u64,
}

/// `backfill executor`: a Ballista executor that registers with a scheduler.
#[derive(Debug, Clone, Args)]
pub struct ExecutorArgs {
    /// The scheduler, df://HOST:PORT.
    #[arg(
        long,
        value_name = "URL",
        default_value = "df://127.0.0.1:50050",
        env = "BACKFILL_EXECUTOR_SCHEDULER"
    )]
    pub scheduler: String,
    /// Address the executor's services listen on.
    #[arg(
        long,
        value_name = "HOST",
        default_value = "127.0.0.1",
        env = "BACKFILL_EXECUTOR_BIND"
    )]
    pub bind: String,
    /// The host the scheduler and other executors reach it at (default:
    /// the bind host).
    #[arg(long, value_name = "HOST", env = "BACKFILL_EXECUTOR_EXTERNAL_HOST")]
    pub external_host: Option<String>,
    /// Port of its Arrow Flight service (shuffle reads, results).
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 50051,
        env = "BACKFILL_EXECUTOR_PORT"
    )]
    pub port: u16,
    /// Port of its gRPC service.
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 50052,
        env = "BACKFILL_EXECUTOR_GRPC_PORT"
    )]
    pub grpc_port: u16,
    /// Tasks run at once (default: the cores).
    #[arg(long, value_name = "N", env = "BACKFILL_EXECUTOR_CONCURRENT_TASKS")]
    pub concurrent_tasks: Option<usize>,
    /// Directory for shuffle files (default: a temporary one).
    #[arg(long, value_name = "DIR", env = "BACKFILL_EXECUTOR_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Seconds between its heartbeats to the scheduler (keep the
    /// scheduler's --executor-timeout a few of them).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        env = "BACKFILL_EXECUTOR_HEARTBEAT_INTERVAL",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub heartbeat_interval: u64,
    /// Memory pool shared by its tasks, e.g. 4G (default: Ballista's, a
    /// share of the machine's).
    #[arg(long, value_name = "SIZE", env = "BACKFILL_EXECUTOR_MEMORY_LIMIT")]
    pub memory_limit: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Output root: DIR/replay, DIR/dlq, DIR/gaps, DIR/_state.
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
    /// Ledger and manifests (default OUT/_state).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_STATE",
        hide_env_values = true
    )]
    pub state: Option<String>,
    /// Where replays go: a folder, kafka://HOST:PORT/TOPIC, or - for stdout.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_REPLAY_SINK",
        hide_env_values = true
    )]
    pub replay_sink: Option<String>,
    /// Where dead letters go.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_DLQ_SINK",
        hide_env_values = true
    )]
    pub dlq_sink: Option<String>,
    /// Where gap records go.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_GAPS_SINK",
        hide_env_values = true
    )]
    pub gaps_sink: Option<String>,
    /// Retries before the dead-letter queue (default 3).
    #[arg(long, value_name = "N", env = "BACKFILL_MAX_ATTEMPTS")]
    pub max_attempts: Option<i64>,
    /// Errors matching this regex go to the DLQ at once (repeatable).
    #[arg(long, value_name = "REGEX", env = "BACKFILL_PERMANENT_ERROR")]
    pub permanent_error: Vec<String>,
    /// Name of this run (default: run-<UTC time>); a committed id is never run twice.
    #[arg(long, value_name = "ID", env = "BACKFILL_RUN_ID")]
    pub run_id: Option<String>,
    /// Process shard I of N (0 ≤ I < N): the keys with FNV-1a(key) mod N =
    /// I; the run id gets `-shard-I-of-N` (docs/scheduling.md, "Shards").
    #[arg(long, value_name = "I/N", env = "BACKFILL_SHARD")]
    pub shard: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE", env = "BACKFILL_REPORT")]
    pub report: Option<String>,
    /// Decide and report; write and commit nothing.
    #[arg(long, env = "BACKFILL_DRY_RUN", value_parser = BoolishValueParser::new())]
    pub dry_run: bool,
    /// Exit 3 when this run dead-lettered anything.
    #[arg(long, env = "BACKFILL_FAIL_ON_DLQ", value_parser = BoolishValueParser::new())]
    pub fail_on_dlq: bool,
    /// Events a key would replay after its first gap: replay them (default),
    /// hold them for a later run, or dead-letter them (`after_gap`).
    #[arg(long, value_enum, value_name = "WHAT", env = "BACKFILL_ON_GAP")]
    pub on_gap: Option<crate::policy::OnBarrier>,
    /// The same after a key's first conflicting seq (`after_conflict`).
    #[arg(long, value_enum, value_name = "WHAT", env = "BACKFILL_ON_CONFLICT")]
    pub on_conflict: Option<crate::policy::OnBarrier>,
    /// Look for each gap's missing events in this topic (still within its
    /// retention) and replay those found; the gaps get a `recovery` class.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_RECOVER_FROM",
        hide_env_values = true
    )]
    pub recover_from: Option<String>,
    /// Also find time silences (as `[detect.silence]`; implied by the
    /// --silence-* flags).
    #[arg(long, env = "BACKFILL_SILENCES", value_parser = BoolishValueParser::new(), help_heading = "Silences and volume anomalies")]
    pub silences: bool,
    /// Silences per this column of `events` (repeatable; default key).
    #[arg(
        long,
        value_name = "COLUMN",
        env = "BACKFILL_SILENCE_BY",
        help_heading = "Silences and volume anomalies"
    )]
    pub silence_by: Vec<String>,
    /// Silent for longer than this: 15m, or 5x median (default).
    #[arg(
        long,
        value_name = "THRESHOLD",
        allow_hyphen_values = true,
        env = "BACKFILL_SILENCE_THRESHOLD",
        help_heading = "Silences and volume anomalies"
    )]
    pub silence_threshold: Option<String>,
    /// Where silences go (default OUT/silences).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_SILENCES_SINK",
        hide_env_values = true,
        help_heading = "Silences and volume anomalies"
    )]
    pub silences_sink: Option<String>,
    /// Also find volume anomalies (as `[detect.volume]`; implied by the
    /// --volume-* flags).
    #[arg(long, env = "BACKFILL_ANOMALIES", value_parser = BoolishValueParser::new(), help_heading = "Silences and volume anomalies")]
    pub anomalies: bool,
    /// Volume per this column of `events` (repeatable; default source).
    #[arg(
        long,
        value_name = "COLUMN",
        env = "BACKFILL_VOLUME_BY",
        help_heading = "Silences and volume anomalies"
    )]
    pub volume_by: Vec<String>,
    /// Bucket width, dividing a day (default 1h).
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        env = "BACKFILL_VOLUME_BUCKET",
        help_heading = "Silences and volume anomalies"
    )]
    pub volume_bucket: Option<String>,
    /// Flag buckets whose |score| passes this (default 5).
    #[arg(
        long,
        value_name = "SCORE",
        allow_hyphen_values = true,
        env = "BACKFILL_VOLUME_THRESHOLD",
        help_heading = "Silences and volume anomalies"
    )]
    pub volume_threshold: Option<f64>,
    /// Where volume anomalies go (default OUT/anomalies).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_ANOMALIES_SINK",
        hide_env_values = true,
        help_heading = "Silences and volume anomalies"
    )]
    pub anomalies_sink: Option<String>,
    /// Compare the downstream's snapshot with the archive first (as
    /// `[reconcile] snapshot`): keys whose snapshot already reflects their
    /// unresolved events have those replays held; the keys that disagree
    /// go to OUT/reconcile.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_RECONCILE_SNAPSHOT",
        hide_env_values = true,
        help_heading = "Reconciliation"
    )]
    pub reconcile_snapshot: Option<String>,
    /// What the downstream holds per key (as `[reconcile] expected`), e.g.
    /// "sum(amount)".
    #[arg(
        long,
        value_name = "SQL",
        env = "BACKFILL_RECONCILE_EXPECTED",
        help_heading = "Reconciliation"
    )]
    pub reconcile_expected: Option<String>,
    /// Where the disagreeing keys go (default OUT/reconcile).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_RECONCILE_SINK",
        hide_env_values = true,
        help_heading = "Reconciliation"
    )]
    pub reconcile_sink: Option<String>,
    /// Where processed events that a later error log line contradicts go
    /// (with --logs; default OUT/contradicted).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_CONTRADICTED_SINK",
        hide_env_values = true
    )]
    pub contradicted_sink: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GapsArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct SilencesArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Group by this column of `events` (repeatable; default: the job
    /// file's `[detect.silence] by`, else key).
    #[arg(long, value_name = "COLUMN", env = "BACKFILL_BY")]
    pub by: Vec<String>,
    /// Silent for longer than this: a duration (15m) or a multiple of the
    /// group's median inter-arrival time (5x median, the default).
    #[arg(
        long,
        value_name = "THRESHOLD",
        allow_hyphen_values = true,
        env = "BACKFILL_THRESHOLD"
    )]
    pub threshold: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct AnomaliesArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Group by this column of `events` (repeatable; default: the job
    /// file's `[detect.volume] by`, else source).
    #[arg(long, value_name = "COLUMN", env = "BACKFILL_BY")]
    pub by: Vec<String>,
    /// Bucket width, dividing a day: 15m, 1h (default), 1d.
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        env = "BACKFILL_BUCKET"
    )]
    pub bucket: Option<String>,
    /// Flag buckets whose |score| passes this (default 5).
    #[arg(
        long,
        value_name = "SCORE",
        allow_hyphen_values = true,
        env = "BACKFILL_THRESHOLD"
    )]
    pub threshold: Option<f64>,
    /// Print every scored bucket, not only the flagged ones.
    #[arg(long, env = "BACKFILL_ALL", value_parser = BoolishValueParser::new())]
    pub all: bool,
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct SqlArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Statements to run, separated by ';' (without QUERY and -f: a shell
    /// on a terminal, else the statements piped into stdin).
    #[arg(value_name = "QUERY", conflicts_with = "file")]
    pub query: Option<String>,
    /// The same as QUERY, as datafusion-cli and psql spell it.
    #[arg(short = 'c', value_name = "SQL", conflicts_with_all = ["query", "file"])]
    pub command: Option<String>,
    /// Read the statements from a file; `-` reads stdin.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE.sql",
        env = "BACKFILL_FILE"
    )]
    pub file: Option<PathBuf>,
    /// Output format of every result.
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
    /// Rows printed of each result; the query stops reading there. 0 or
    /// `inf`: no limit. Default: 40 when stdout is a terminal, else no limit.
    #[arg(long, value_name = "N", value_parser = parse_maxrows, env = "BACKFILL_MAXROWS")]
    pub maxrows: Option<MaxRows>,
    /// Also run statements that write or reach beyond the archive (COPY,
    /// INSERT, CREATE EXTERNAL TABLE, ...): `sql` is read-only without it.
    #[arg(long, env = "BACKFILL_ALLOW_WRITES", value_parser = BoolishValueParser::new())]
    pub allow_writes: bool,
    /// The job's state, for the `ledger`, `runs` and `candidates` tables
    /// (default: the job file's `state`, else OUT/_state). Only read.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_STATE",
        hide_env_values = true
    )]
    pub state: Option<String>,
    /// The job's output root: its state is OUT/_state, and its folders are
    /// left out of the archive as `run` leaves them out.
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
}

/// How many rows of each result `sql` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxRows {
    Unlimited,
    Limit(usize),
}

/// `--maxrows`: a row count, with 0 and `inf` meaning no limit (as
/// datafusion-cli's `inf`; 0 rows would print nothing but headers).
pub fn parse_maxrows(s: &str) -> Result<MaxRows, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("inf") || t == "0" {
        return Ok(MaxRows::Unlimited);
    }
    t.parse::<usize>()
        .map(MaxRows::Limit)
        .map_err(|_| format!("'{s}' is not a row count: a number, or 0 or inf for no limit"))
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Where to write the archive (path or object-store URL).
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: String,
    /// Events to generate.
    #[arg(long, default_value_t = 100_000, env = "BACKFILL_EVENTS")]
    pub events: u64,
    /// Distinct keys (sequences are per key).
    #[arg(long, default_value_t = 100, env = "BACKFILL_KEYS")]
    pub keys: u64,
    /// Seed: the same seed gives the same archive.
    #[arg(long, default_value_t = 42, env = "BACKFILL_SEED")]
    pub seed: u64,
    /// Days spanned, one dt=YYYY-MM-DD folder each.
    #[arg(long, default_value_t = 3, env = "BACKFILL_DAYS")]
    pub days: u32,
    /// First day (YYYY-MM-DD).
    #[arg(long, default_value = "2024-01-01", env = "BACKFILL_START")]
    pub start: String,
    /// Files per day folder.
    #[arg(long, default_value_t = 2, env = "BACKFILL_FILES_PER_DAY")]
    pub files_per_day: u32,
    /// Producers: key k belongs to source-(k mod N) (1: every row's source
    /// is `generator`).
    #[arg(long, default_value_t = 1, env = "BACKFILL_SOURCES")]
    pub sources: u32,
    /// Daily and weekly seasonality instead of a uniform rate (use
    /// --days 28 or more for weeks of history).
    #[arg(long, env = "BACKFILL_SEASONAL", value_parser = BoolishValueParser::new())]
    pub seasonal: bool,
    /// Inject volume outages (a drop to 10% for 2h, a 3h stop, a 2h
    /// doubling) in the last three days; needs --sources 3 or more.
    #[arg(long, env = "BACKFILL_OUTAGES", value_parser = BoolishValueParser::new())]
    pub outages: bool,
    /// Also write the worker's application logs (NDJSON, a file a day) to
    /// this folder: they agree with the archive but for injected errors
    /// after processing (contradicted) and unarchived failures.
    #[arg(
        long,
        value_name = "DIR",
        env = "BACKFILL_GENERATE_LOGS",
        hide_env_values = true
    )]
    pub logs: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub command: ReportCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ReportCommand {
    /// Sum the JSON reports of the N shard runs of one backfill (`run
    /// --shard I/N --report FILE`) into one; exit 1 when they do not
    /// balance, 2 when they are not the N shards of one backfill.
    Merge(MergeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The shard runs' reports, one per shard, in any order.
    #[arg(value_name = "REPORT.json", required = true)]
    pub reports: Vec<PathBuf>,
    /// Also write the merged report as JSON to FILE.
    #[arg(long, value_name = "FILE", env = "BACKFILL_REPORT")]
    pub report: Option<PathBuf>,
    /// Print the merged report as JSON instead of the summary.
    #[arg(long, env = "BACKFILL_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StateCommand {
    /// List committed runs (the same as `backfill runs list`).
    Runs(RunsListArgs),
    /// Remove what uncommitted runs left behind.
    Gc(GcArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StateLocArgs {
    /// Job file (for `state`, `out`, `[sinks]`, `[storage]`).
    #[arg(long, value_name = "FILE", env = "BACKFILL_JOB")]
    pub job: Option<PathBuf>,
    /// State location (default OUT/_state).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_STATE",
        hide_env_values = true
    )]
    pub state: Option<String>,
    /// Output root, to find the sinks' folders.
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub loc: StateLocArgs,
    /// Ignored: every sink an attempt wrote to is recorded in the state.
    #[arg(long, value_name = "LOC", hide = true)]
    pub sink: Vec<String>,
    /// Only treat attempts older than this many minutes as abandoned (a
    /// younger one may still be running; an older one that is still running
    /// is fenced and will fail its commit, safe to rerun).
    #[arg(long, default_value_t = 60, env = "BACKFILL_MIN_AGE_MINUTES")]
    pub min_age_minutes: u64,
    /// List what would be removed; remove nothing.
    #[arg(long, env = "BACKFILL_DRY_RUN", value_parser = BoolishValueParser::new())]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: RunsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RunsCommand {
    /// One line per committed run, oldest first: id, kind (run, shard,
    /// redrive), commit time, window, counts, sinks, duration.
    List(RunsListArgs),
    /// One committed run: its report as committed and its ledger counts.
    Show(RunsShowArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunsListArgs {
    #[command(flatten)]
    pub loc: StateLocArgs,
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct RunsShowArgs {
    /// The run id (as `runs list` shows it).
    #[arg(value_name = "ID")]
    pub run_id: String,
    #[command(flatten)]
    pub loc: StateLocArgs,
    /// table: the summary the run printed and its ledger counts; csv/tsv:
    /// `field,value` rows; json/ndjson: one object.
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct InferArgs {
    /// --from T1 and --to T2 are the snapshots' times.
    #[command(flatten)]
    pub scan: ScanArgs,
    /// The snapshot of per-key totals at T1: a Parquet or .csv file with
    /// `key` and `total`.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_BEFORE",
        hide_env_values = true
    )]
    pub before: String,
    /// The snapshot at T2.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_AFTER",
        hide_env_values = true
    )]
    pub after: String,
    /// What an event adds to its key's total: a SQL expression over
    /// `events` (default: the column `amount`).
    #[arg(
        long,
        value_name = "EXPR",
        default_value = "amount",
        env = "BACKFILL_AMOUNT"
    )]
    pub amount: String,
    /// Output root: the inferred events go to OUT/inferred/.
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
    /// Also send the inferred events to this sink (a folder, kafka://,
    /// redis://, -). Never done unless asked.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_EMIT_INFERRED",
        hide_env_values = true
    )]
    pub emit_inferred: Option<String>,
    /// The largest |missing amount| that is nothing missing (default 0;
    /// float amounts seldom add up exactly).
    #[arg(
        long,
        value_name = "X",
        allow_hyphen_values = true,
        env = "BACKFILL_TOLERANCE"
    )]
    pub tolerance: Option<f64>,
    /// Format of the per-key report on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// The downstream's snapshot: a Parquet or .csv file with key, value
    /// and as_of columns (other names: `[reconcile.columns]`).
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_SNAPSHOT",
        hide_env_values = true
    )]
    pub snapshot: Option<String>,
    /// What the downstream holds per key: an SQL aggregate over the key's
    /// processed events up to as_of, e.g. "sum(amount)", "count(*)",
    /// "max(seq)" (as `[reconcile] expected`).
    #[arg(long, value_name = "SQL", env = "BACKFILL_EXPECTED")]
    pub expected: Option<String>,
    /// The snapshot's time, RFC 3339, for a snapshot without an as_of
    /// column.
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        env = "BACKFILL_AS_OF"
    )]
    pub as_of: Option<String>,
    /// The largest |actual - expected| that still agrees (default 0).
    #[arg(
        long,
        value_name = "X",
        allow_hyphen_values = true,
        env = "BACKFILL_TOLERANCE"
    )]
    pub tolerance: Option<f64>,
    /// Show every key, agreeing ones too.
    #[arg(long, env = "BACKFILL_ALL", value_parser = BoolishValueParser::new())]
    pub all: bool,
    /// Exit 3 when a key disagrees (or is missing on either side).
    #[arg(long, env = "BACKFILL_FAIL_ON_DISAGREE", value_parser = BoolishValueParser::new())]
    pub fail_on_disagree: bool,
    /// Output root: the keys shown also go to OUT/reconcile/ (Parquet).
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
    /// Format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct StateAtArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// T, RFC 3339 (or a date): the state implied by the processed events
    /// at or before it.
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        env = "BACKFILL_AT"
    )]
    pub at: String,
    /// One key's state only (pruned by Parquet statistics).
    #[arg(long, value_name = "KEY", env = "BACKFILL_KEY")]
    pub key: Option<String>,
    /// Where the state goes: - for stdout (default), a Parquet folder, or
    /// kafka://HOST:PORT/TOPIC.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_SINK",
        hide_env_values = true
    )]
    pub sink: Option<String>,
    /// A kafka:// --sink is compacted: one message per key, tombstones for
    /// deleted keys, a topic with cleanup.policy=compact (as `[kafka]
    /// compact = true`).
    #[arg(long, env = "BACKFILL_COMPACT", value_parser = BoolishValueParser::new())]
    pub compact: bool,
    /// Format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table, env = "BACKFILL_FORMAT")]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    /// Job file (for `out`, `state`, `[sinks]`, `[columns]`, `[storage]`,
    /// `[kafka]`).
    #[arg(long, value_name = "FILE", env = "BACKFILL_JOB")]
    pub job: Option<PathBuf>,
    /// Output root: the DLQ defaults to OUT/dlq, the state to OUT/_state,
    /// --to to OUT/replay.
    #[arg(long, value_name = "DIR", env = "BACKFILL_OUT", hide_env_values = true)]
    pub out: Option<String>,
    /// The state whose committed runs wrote the dead letters (default
    /// OUT/_state); the redrive commits there too.
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_STATE",
        hide_env_values = true
    )]
    pub state: Option<String>,
    /// The DLQ folder committed runs wrote to (default: the job's DLQ
    /// sink, else OUT/dlq). Only the files their log entries list are read.
    #[arg(long, value_name = "LOC", env = "BACKFILL_DLQ", hide_env_values = true)]
    pub dlq: Option<String>,
    /// A SQL predicate over the dead letters' columns, e.g. "reason =
    /// 'max_attempts_exceeded' AND error LIKE '%timeout%'"; `true` selects
    /// every one. `reason`, `run_id`, `attempt` and `detected_at` name the
    /// backfill_* columns.
    #[arg(
        long = "where",
        value_name = "PREDICATE",
        env = "BACKFILL_WHERE",
        allow_hyphen_values = true
    )]
    pub predicate: String,
    /// Where to send them: a folder, kafka://HOST:PORT/TOPIC, or - for
    /// stdout (default: the job's replay sink, else OUT/replay).
    /// (Its variable is not BACKFILL_TO, `run`'s window end: a scheduler
    /// exports that for its runs.)
    #[arg(
        long,
        value_name = "LOC",
        env = "BACKFILL_REDRIVE_TO",
        hide_env_values = true
    )]
    pub to: Option<String>,
    /// Name of this redrive (default: redrive-<UTC time>); a committed id
    /// is never run twice. (Not BACKFILL_RUN_ID: a redrive in a run's
    /// environment would take the run's id.)
    #[arg(long, value_name = "ID", env = "BACKFILL_REDRIVE_RUN_ID")]
    pub run_id: Option<String>,
    /// Also send dead letters that an earlier redrive sent.
    #[arg(long, env = "BACKFILL_AGAIN", value_parser = BoolishValueParser::new())]
    pub again: bool,
    /// Print what would be sent; send and commit nothing.
    #[arg(long, env = "BACKFILL_DRY_RUN", value_parser = BoolishValueParser::new())]
    pub dry_run: bool,
    /// Progress on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto, env = "BACKFILL_PROGRESS")]
    pub progress: Progress,
}
