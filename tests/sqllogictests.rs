//! The detection SQL (`sql/*.sql`) tested as SQL: every `tests/sql/*.slt`
//! file runs against a fresh DataFusion session, the way DataFusion tests
//! itself (`datafusion/sqllogictest`).
//!
//! The harness adds two statements of its own to plain SQL:
//!
//! - `LOAD sql/NAME.sql` executes the statements of that file (relative to
//!   the repository root) as the binary does, so a test file builds its own
//!   `events` and `ledger_entries` and then loads the real views.
//! - `EXPLAIN SHAPE <query>` returns the physical plan as its operator tree
//!   only (one row per operator, depth shown by `-`), for asserting a plan's
//!   shape without pinning every column index and expression.
//!
//! Every record of every file runs, even after a failure; the summary line
//! `N passed, M failed` ends the output and any failure makes the exit code
//! non-zero. Arguments that do not start with `-` select files by substring.
//!
//! Never writes outside the per-file scratch directory (DataFusion's spill
//! folder), and never touches the SQL under test: it is read as it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::DFParser;
use sqllogictest::{
    AsyncDB, ColumnType, DBOutput, Normalizer, Record, Runner, default_validator,
    strict_column_validator,
};

/// Partitions are fixed (not the machine's core count) so that `EXPLAIN`
/// output is the same everywhere, and above 1 so that hash repartitioning,
/// the case that can split an event's rows, is what runs.
const TARGET_PARTITIONS: usize = 4;

/// Result column types, as written after `query`: `T` text, `I` integer,
/// `R` float or decimal, `B` boolean, `P` timestamp, `D` date or time,
/// `?` anything else. Checked strictly.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Col {
    Text,
    Integer,
    Float,
    Boolean,
    Timestamp,
    DateTime,
    Any,
}

impl ColumnType for Col {
    fn from_char(value: char) -> Option<Self> {
        Some(match value {
            'T' => Col::Text,
            'I' => Col::Integer,
            'R' => Col::Float,
            'B' => Col::Boolean,
            'P' => Col::Timestamp,
            'D' => Col::DateTime,
            _ => Col::Any,
        })
    }

    fn to_char(&self) -> char {
        match self {
            Col::Text => 'T',
            Col::Integer => 'I',
            Col::Float => 'R',
            Col::Boolean => 'B',
            Col::Timestamp => 'P',
            Col::DateTime => 'D',
            Col::Any => '?',
        }
    }
}

fn col_type(t: &DataType) -> Col {
    use DataType::*;
    match t {
        Utf8 | LargeUtf8 | Utf8View => Col::Text,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => Col::Integer,
        Float16 | Float32 | Float64 | Decimal32(..) | Decimal64(..) | Decimal128(..)
        | Decimal256(..) => Col::Float,
        Boolean => Col::Boolean,
        Timestamp(..) => Col::Timestamp,
        Date32 | Date64 | Time32(_) | Time64(_) => Col::DateTime,
        Dictionary(_, v) => col_type(v),
        _ => Col::Any,
    }
}

/// One session per test file.
struct Engine {
    ctx: SessionContext,
    root: PathBuf,
}

#[async_trait]
impl AsyncDB for Engine {
    type Error = DataFusionError;
    type ColumnType = Col;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Col>> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        if let Some(file) = strip_keyword(trimmed, &["LOAD"]) {
            return self.load(file).await;
        }
        if let Some(query) = strip_keyword(trimmed, &["EXPLAIN", "SHAPE"]) {
            return self.shape(query).await;
        }
        output(self.ctx.sql(sql).await?).await
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "datafusion"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

impl Engine {
    /// `LOAD sql/NAME.sql`: every statement of the file, in order; the
    /// result is the last statement's (so a query file can be a `query`).
    async fn load(&self, file: &str) -> Result<DBOutput<Col>> {
        let path = self.root.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DataFusionError::Execution(format!("LOAD {}: {e}", path.display())))?;
        let mut last = DBOutput::StatementComplete(0);
        for statement in DFParser::parse_sql(&text)? {
            let plan = self.ctx.state().statement_to_plan(statement).await?;
            last = output(self.ctx.execute_logical_plan(plan).await?).await?;
        }
        Ok(last)
    }

    /// `EXPLAIN SHAPE <query>`: the physical operators, without their details.
    async fn shape(&self, query: &str) -> Result<DBOutput<Col>> {
        let plan = self.ctx.sql(query).await?.create_physical_plan().await?;
        let mut rows = vec![];
        operator_tree(plan.as_ref(), 0, &mut rows);
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, line)| vec![format!("{:02}){line}", i + 1)])
            .collect();
        Ok(DBOutput::Rows {
            types: vec![Col::Text],
            rows,
        })
    }
}

/// Execute a planned statement; DDL has no result columns.
async fn output(df: DataFrame) -> Result<DBOutput<Col>> {
    let schema = df.schema().as_arrow().clone();
    let batches = df.collect().await?;
    if schema.fields().is_empty() {
        return Ok(DBOutput::StatementComplete(0));
    }
    let types = schema
        .fields()
        .iter()
        .map(|f| col_type(f.data_type()))
        .collect();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let rows = if names == ["plan_type", "plan"] {
        explain_rows(&batches)?
    } else {
        to_rows(&batches)?
    };
    Ok(DBOutput::Rows { types, rows })
}

/// The text of `sql` after the given keywords (case-insensitive, separated
/// by whitespace), if it starts with them.
fn strip_keyword<'a>(sql: &'a str, keywords: &[&str]) -> Option<&'a str> {
    let mut rest = sql;
    for kw in keywords {
        let head = rest.get(..kw.len())?;
        let tail = &rest[kw.len()..];
        if !head.eq_ignore_ascii_case(kw) || !tail.starts_with(char::is_whitespace) {
            return None;
        }
        rest = tail.trim_start();
    }
    Some(rest)
}

fn operator_tree(plan: &dyn ExecutionPlan, depth: usize, out: &mut Vec<String>) {
    out.push(format!("{}{}", "-".repeat(2 * depth), plan.name()));
    for child in plan.children() {
        operator_tree(child.as_ref(), depth + 1, out);
    }
}

/// Results as text: NULL as `NULL`, the empty string as `(empty)` (so that
/// it cannot pass for a missing value), everything else as Arrow displays
/// it (timestamps with a zone as `2024-01-01T00:00:00Z`). A newline inside a
/// value is shown as `\n` so that one row stays one line.
fn to_rows(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>> {
    Ok(cells(batches)?
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|s| match s.as_str() {
                    "" => "(empty)".to_string(),
                    _ => s.replace('\n', "\\n"),
                })
                .collect()
        })
        .collect())
}

/// The values as Arrow displays them, NULL as `NULL`.
fn cells(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = vec![];
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref() as &dyn Array, &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect(),
            );
        }
    }
    Ok(rows)
}

/// `EXPLAIN` output as DataFusion's own sqllogictests show it: the plan
/// type on a line, then the plan's lines numbered, indentation as `-`.
fn explain_rows(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>> {
    let mut rows = vec![];
    for row in cells(batches)? {
        let [plan_type, plan] = <[String; 2]>::try_from(row).map_err(|_| {
            DataFusionError::Internal("EXPLAIN returned other than 2 columns".into())
        })?;
        rows.push(vec![plan_type]);
        for (i, line) in plan.lines().filter(|l| !l.is_empty()).enumerate() {
            let body = line.trim_start();
            let indent = line.len() - body.len();
            rows.push(vec![format!("{:02}){}{body}", i + 1, "-".repeat(indent))]);
        }
    }
    Ok(rows)
}

/// Compare rows exactly, cells joined by one space, trailing whitespace
/// ignored: unlike the default, inner and leading whitespace counts (it is
/// data, and plan indentation). `<slt:ignore>` keeps its default meaning.
fn validator(normalizer: Normalizer, actual: &[Vec<String>], expected: &[String]) -> bool {
    if expected.iter().any(|l| l.contains("<slt:ignore>")) {
        return default_validator(normalizer, actual, expected);
    }
    actual.len() == expected.len()
        && actual
            .iter()
            .zip(expected)
            .all(|(row, line)| row.join(" ").trim_end() == line.trim_end())
}

fn session(scratch: &Path) -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_target_partitions(TARGET_PARTITIONS)
        .with_batch_size(8192)
        .with_information_schema(true)
        .set_bool("datafusion.sql_parser.enable_ident_normalization", true)
        // `events` has Utf8 columns in the binary (register_events casts to
        // Utf8), so VARCHAR in a test's CREATE TABLE must mean Utf8 too.
        .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false);
    let runtime = RuntimeEnvBuilder::new()
        .with_temp_file_path(scratch)
        .build_arc()?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
}

async fn run_file(root: &Path, file: &Path, tally: &mut Tally) {
    let name = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let records = match sqllogictest::parse_file::<Col>(file) {
        Ok(r) => r,
        Err(e) => {
            tally.failed += 1;
            tally.failures.push(format!("{name}: cannot parse: {e}"));
            println!("{name}: cannot parse: {e}");
            return;
        }
    };
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            tally.failed += 1;
            tally.failures.push(format!("{name}: no scratch dir: {e}"));
            return;
        }
    };
    let ctx = match session(scratch.path()) {
        Ok(c) => c,
        Err(e) => {
            tally.failed += 1;
            tally.failures.push(format!("{name}: no session: {e}"));
            return;
        }
    };
    let root_dir = root.to_path_buf();
    let mut runner = Runner::new(move || {
        let engine = Engine {
            ctx: ctx.clone(),
            root: root_dir.clone(),
        };
        async move { Ok::<_, DataFusionError>(engine) }
    });
    runner.with_validator(validator);
    runner.with_column_validator(strict_column_validator);

    let (mut passed, mut failed) = (0, 0);
    for record in records {
        let counted = matches!(record, Record::Statement { .. } | Record::Query { .. });
        if let Record::Halt { .. } = record {
            break;
        }
        match runner.run_async(record).await {
            Ok(_) if counted => passed += 1,
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                println!("FAIL {}", e.display(false));
                let what = e.kind().to_string();
                let what = what.lines().next().unwrap_or_default().to_string();
                tally.failures.push(format!("{}: {what}", e.location()));
            }
        }
    }
    println!("{name}: {passed} passed, {failed} failed");
    tally.passed += passed;
    tally.failed += failed;
}

#[tokio::main]
async fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let dir = root.join("tests/sql");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "slt"))
            .collect(),
        Err(e) => {
            eprintln!("error: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    files.sort();
    files.retain(|f| {
        let s = f.to_string_lossy();
        filters.is_empty() || filters.iter().any(|x| s.contains(x.as_str()))
    });

    let mut tally = Tally::default();
    for file in &files {
        run_file(&root, file, &mut tally).await;
    }
    if !tally.failures.is_empty() {
        println!("\nfailures:");
        for f in &tally.failures {
            println!("  {f}");
        }
    }
    // The closing line in the plain form CI runners read: "word: N passed, N failed".
    println!("sqllogictest files: {}", files.len());
    println!(
        "sqllogictest: {} passed, {} failed",
        tally.passed, tally.failed
    );
    if files.is_empty() && filters.is_empty() {
        eprintln!("error: no .slt files in {}", dir.display());
        return ExitCode::FAILURE;
    }
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
