//! Command-line definitions (clap derive): one struct per subcommand, the
//! shared scan options flattened into each. No behaviour lives here.

use std::path::PathBuf;

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
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect, decide, write replays / DLQ / gaps, and commit the run.
    Run(RunArgs),
    /// Print the gap report alone.
    Gaps(GapsArgs),
    /// SQL over the archive and the job's state: a query, a script, or a shell.
    Sql(SqlArgs),
    /// Print the physical plans of the detection.
    Explain(ExplainArgs),
    /// Write a synthetic archive with injected gaps, failures, duplicates and conflicts.
    Generate(GenerateArgs),
    /// Inspect or clean the state (ledger and manifests).
    State(StateArgs),
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
    #[arg(long, value_name = "FILE")]
    pub job: Option<PathBuf>,
    /// The archive (path, file://, s3://, gs://, az://, kafka://HOST:PORT/TOPIC); repeat for a union.
    #[arg(long, value_name = "LOC")]
    pub source: Vec<String>,
    /// Window start on event_time, RFC 3339, inclusive.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Window end on event_time, RFC 3339, exclusive.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Remap an input-contract column: NAME=SOURCE_COLUMN (repeatable).
    #[arg(long, value_name = "NAME=SOURCE_COLUMN")]
    pub column: Vec<String>,
    /// A status value that means done (repeatable; default: processed).
    #[arg(long, value_name = "STATUS")]
    pub done_status: Vec<String>,
    /// Do not detect sequence gaps (key and seq become optional).
    #[arg(long)]
    pub no_gaps: bool,
    /// Do not detect (key, seq) conflicts.
    #[arg(long)]
    pub no_conflicts: bool,
    /// Memory for the query engine before it spills to disk (e.g. 4G;
    /// default: half the machine's or the container's memory).
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Directory the query engine spills to (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Progress on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Output root: DIR/replay, DIR/dlq, DIR/gaps, DIR/_state.
    #[arg(long, value_name = "DIR")]
    pub out: Option<String>,
    /// Ledger and manifests (default OUT/_state).
    #[arg(long, value_name = "LOC")]
    pub state: Option<String>,
    /// Where replays go: a folder, kafka://HOST:PORT/TOPIC, or - for stdout.
    #[arg(long, value_name = "LOC")]
    pub replay_sink: Option<String>,
    /// Where dead letters go.
    #[arg(long, value_name = "LOC")]
    pub dlq_sink: Option<String>,
    /// Where gap records go.
    #[arg(long, value_name = "LOC")]
    pub gaps_sink: Option<String>,
    /// Retries before the dead-letter queue (default 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<i64>,
    /// Errors matching this regex go to the DLQ at once (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub permanent_error: Vec<String>,
    /// Name of this run (default: run-<UTC time>); a committed id is never run twice.
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<String>,
    /// Decide and report; write and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Exit 3 when this run dead-lettered anything.
    #[arg(long)]
    pub fail_on_dlq: bool,
}

#[derive(Debug, Clone, Args)]
pub struct GapsArgs {
    #[command(flatten)]
    pub scan: ScanArgs,
    #[arg(long, value_enum, default_value_t = Format::Table)]
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
    /// Read the statements from a file; `-` reads stdin.
    #[arg(short = 'f', long = "file", value_name = "FILE.sql")]
    pub file: Option<PathBuf>,
    /// Output format of every result.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Rows printed of each result; the query stops reading there. 0 or
    /// `inf`: no limit. Default: 40 when stdout is a terminal, else no limit.
    #[arg(long, value_name = "N", value_parser = parse_maxrows)]
    pub maxrows: Option<MaxRows>,
    /// Also run statements that write or reach beyond the archive (COPY,
    /// INSERT, CREATE EXTERNAL TABLE, ...): `sql` is read-only without it.
    #[arg(long)]
    pub allow_writes: bool,
    /// The job's state, for the `ledger`, `runs` and `candidates` tables
    /// (default: the job file's `state`, else OUT/_state). Only read.
    #[arg(long, value_name = "LOC")]
    pub state: Option<String>,
    /// The job's output root: its state is OUT/_state, and its folders are
    /// left out of the archive as `run` leaves them out.
    #[arg(long, value_name = "DIR")]
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
    #[arg(long, value_name = "DIR")]
    pub out: String,
    /// Events to generate.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct keys (sequences are per key).
    #[arg(long, default_value_t = 100)]
    pub keys: u64,
    /// Seed: the same seed gives the same archive.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Days spanned, one dt=YYYY-MM-DD folder each.
    #[arg(long, default_value_t = 3)]
    pub days: u32,
    /// First day (YYYY-MM-DD).
    #[arg(long, default_value = "2024-01-01")]
    pub start: String,
    /// Files per day folder.
    #[arg(long, default_value_t = 2)]
    pub files_per_day: u32,
}

#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StateCommand {
    /// List committed runs.
    Runs(StateLocArgs),
    /// Remove what uncommitted runs left behind.
    Gc(GcArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StateLocArgs {
    /// Job file (for `state`, `out`, `[sinks]`, `[storage]`).
    #[arg(long, value_name = "FILE")]
    pub job: Option<PathBuf>,
    /// State location (default OUT/_state).
    #[arg(long, value_name = "LOC")]
    pub state: Option<String>,
    /// Output root, to find the sinks' folders.
    #[arg(long, value_name = "DIR")]
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
    #[arg(long, default_value_t = 60)]
    pub min_age_minutes: u64,
    /// List what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}
