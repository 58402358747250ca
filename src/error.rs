//! The crate's top-level error: every module's error, and the one mapping
//! from error to exit code (used by `main` alone). Messages are single
//! lines naming the thing at fault; `Display` never includes a secret, and
//! [`Error::line`], the form that leaves the process, makes sure of it.

use crate::job::JobError;
use crate::location::LocationError;
use crate::policy::PolicyError;
use crate::sink::SinkError;
use crate::source::SourceError;
use crate::state::StateError;

/// Exit codes, as documented in the README.
pub const EXIT_OK: u8 = 0;
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_DLQ: u8 = 3;
/// Another run on the same state won (same run id, or the same events):
/// nothing of this run is visible, and running it again is safe.
pub const EXIT_CONFLICT: u8 = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Location(#[from] LocationError),
    /// Boxed: it carries two Arrow types in its largest variant.
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error(transparent)]
    Logs(#[from] crate::source::logs::LogsError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// Boxed: DataFusion's error is large and would bloat every Result.
    #[error("{}", datafusion_line(.0))]
    DataFusion(Box<datafusion::error::DataFusionError>),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("{what}: {message}")]
    Io { what: String, message: String },
    #[error("{0}")]
    Usage(String),
    /// Figures that do not add up (merged shard reports): exit 1.
    #[error("{0}")]
    Unbalanced(String),
    /// The run committed; making its outputs visible failed part way.
    #[error(
        "run '{run_id}' is committed, but publishing its outputs failed: {message}; the next run or `backfill state gc` finishes it"
    )]
    Committed { run_id: String, message: String },
    /// The commit's answer was lost: the run may or may not be committed.
    #[error(
        "run '{run_id}': the outcome of the commit is unknown ({message}); nothing was deleted: run again with the same run id"
    )]
    CommitUnknown { run_id: String, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<SourceError> for Error {
    fn from(e: SourceError) -> Self {
        Error::Source(Box::new(e))
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        // A logs file that failed a query over `logs` is named as itself
        // (and is the user's to fix), not as a query error.
        if let Some(l) = crate::source::logs::find_in(&e) {
            return if l.is_config() {
                Error::Usage(l.to_string())
            } else {
                Error::Io {
                    what: "reading the logs".into(),
                    message: l.to_string(),
                }
            };
        }
        Error::DataFusion(Box::new(e))
    }
}

impl Error {
    /// The one line `main` prints after `error: `: whitespace folded, other
    /// control characters escaped ([`crate::log::printable`]: a file name
    /// may hold them), and passed through [`crate::redact::line`] after
    /// registering the secrets of the environment. Each module already keeps secrets out of its
    /// messages; this is the last line of defence for text that came from a
    /// library (librdkafka, object_store, DataFusion) or a path we missed.
    pub fn line(&self) -> String {
        crate::redact::register_env();
        // Scrubbed before folding, so that a secret with a newline in it still
        // matches.
        let s = crate::redact::line(&self.to_string());
        crate::log::printable(&s.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Job(_) | Error::Location(_) | Error::Usage(_) => EXIT_USAGE,
            Error::State(e) if e.is_conflict() => EXIT_CONFLICT,
            Error::Source(e) if e.is_config() => EXIT_USAGE,
            Error::Logs(e) if e.is_config() => EXIT_USAGE,
            Error::Sink(e) if e.is_config() => EXIT_USAGE,
            Error::Generate(crate::generate::GenerateError::Invalid { .. }) => EXIT_USAGE,
            Error::DataFusion(e) if is_plan_error(e) => EXIT_USAGE,
            _ => EXIT_RUNTIME,
        }
    }
}

/// SQL typed by the user that does not parse or plan is a usage error.
fn is_plan_error(e: &datafusion::error::DataFusionError) -> bool {
    use datafusion::error::DataFusionError as D;
    match e {
        D::SQL(..) | D::Plan(_) | D::SchemaError(..) => true,
        D::Context(_, inner) => is_plan_error(inner),
        D::Diagnostic(_, inner) => is_plan_error(inner),
        _ => false,
    }
}

/// DataFusion errors can span lines and repeat their wrappers; keep one line.
fn datafusion_line(e: &datafusion::error::DataFusionError) -> String {
    if let datafusion::error::DataFusionError::ResourcesExhausted(detail) = e.find_root() {
        // DataFusion's own text names settings a user cannot set
        // (datafusion.runtime.memory_limit); ours names the flag.
        let first = detail.lines().next().unwrap_or_default();
        let first = first
            .split(" with top memory consumers")
            .next()
            .unwrap_or_default()
            .trim_end_matches([':', ' ']);
        return format!(
            "out of memory under --memory-limit (memory_limit in the job file): {first}; raise it: sorts and aggregates spill to disk, but each must still hold a batch of the widest rows and its merge buffers"
        );
    }
    let s = e.to_string();
    let s = s.replace('\n', " ");
    let s = s.trim().to_string();
    if s.starts_with("Error during planning") || s.starts_with("SQL error") {
        format!("query: {s}")
    } else {
        format!("query engine: {s}")
    }
}
