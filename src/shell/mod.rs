//! `backfill sql`: SQL over the archive, the detection views and the job's
//! state, as a one-shot query, a script (`-f FILE`, `-f -`, piped stdin) or
//! an interactive shell on a terminal, in the manner of datafusion-cli.
//!
//! What it must never do: write. Every statement's plan is checked before
//! it runs (and a script's plans before any of it runs, where they plan on
//! their own), and anything that writes or changes the catalog beyond the
//! session is refused unless `--allow-writes`; the job's state is read as
//! `backfill run` reads it and never changed. Errors are one line naming the
//! statement (its number, line and first words) or the file.

pub mod print;
pub mod script;
pub mod state;

use std::io::{IsTerminal, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use clap::ValueEnum;
use datafusion::common::{ResolvedTableReference, TableReference};
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;

use crate::cli::{Format, MaxRows, SqlArgs, parse_maxrows};
use crate::error::Error;
use crate::job::{self, Scan};
use crate::run::Phases;
use crate::source;
use print::Out;
use script::{Item, Piece};

/// Rows of each result on a terminal unless `--maxrows` says otherwise.
pub const TERMINAL_MAXROWS: usize = 40;

/// Where the statements come from; errors of a file or stdin name it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Argument,
    File(String),
    Stdin,
    Shell,
}

impl Origin {
    /// The prefix of an error line: `q.sql: `, `stdin: `, or nothing.
    fn prefix(&self) -> String {
        match self {
            Origin::File(f) => format!("{f}: "),
            Origin::Stdin => "stdin: ".into(),
            Origin::Argument | Origin::Shell => String::new(),
        }
    }
}

/// What to run: a script read whole, or the interactive shell.
enum Input {
    Script(Origin, String),
    Shell,
}

/// The statements' source, decided before the archive is listed: a file
/// that cannot be read is a usage error that costs no listing.
fn input(args: &SqlArgs) -> Result<Input, Error> {
    if let Some(q) = args.query.as_ref().or(args.command.as_ref()) {
        return Ok(Input::Script(Origin::Argument, q.clone()));
    }
    match &args.file {
        Some(f) if f.as_os_str() == "-" => Ok(Input::Script(Origin::Stdin, read_stdin()?)),
        Some(f) => {
            let what = format!("-f {}", f.display());
            let bytes = std::fs::read(f).map_err(|e| {
                Error::Usage(format!(
                    "{what}: cannot read the SQL file: {}",
                    io_reason(&e)
                ))
            })?;
            let text = decode(&what, bytes)?;
            Ok(Input::Script(Origin::File(f.display().to_string()), text))
        }
        None if std::io::stdin().is_terminal() => Ok(Input::Shell),
        None => Ok(Input::Script(Origin::Stdin, read_stdin()?)),
    }
}

fn read_stdin() -> Result<String, Error> {
    let mut bytes = vec![];
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Usage(format!("stdin: cannot read SQL: {}", io_reason(&e))))?;
    decode("stdin", bytes)
}

/// SQL text from bytes, or a usage error saying where it is not UTF-8:
/// "stream did not contain valid UTF-8" left a Latin-1 file's user
/// searching, and a UTF-16 file (Windows Notepad's "Unicode") is not text
/// the tokenizer can read at all.
fn decode(what: &str, bytes: Vec<u8>) -> Result<String, Error> {
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(Error::Usage(format!(
            "{what}: the SQL is UTF-16 (it starts with a UTF-16 byte order mark): save it as UTF-8"
        )));
    }
    // A data file given for the script (`-f part-0.parquet`) is not an
    // encoding problem, as the message below would have it.
    if bytes.starts_with(b"PAR1") {
        return Err(Error::Usage(format!(
            "{what}: this is a Parquet file, not SQL: query it with SELECT * FROM 'FILE'"
        )));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(Error::Usage(format!(
            "{what}: this is gzip-compressed: gunzip -c FILE | backfill sql ..."
        )));
    }
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(Error::Usage(format!(
            "{what}: this is a binary file (it holds NUL bytes), not SQL text"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let before = &bytes[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Valid up to `at`, so this counts characters, as editors do.
        let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
        Error::Usage(format!(
            "{what}: line {line}, column {column}: byte 0x{:02x} is not UTF-8 (Latin-1 or another encoding?): save the SQL as UTF-8",
            bytes[at]
        ))
    })
}

/// `No such file or directory`, without the `(os error 2)` noise.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What the shell's settings give: the scan; the state location the job's
/// runs use (`None` without one: `--state`, the job's `state`, else
/// `OUT/_state`); the silence and volume detections; and the job's
/// `[state_at] columns` fold for `state_at('T')`.
type ShellSettings = (
    Scan,
    Option<String>,
    Detections,
    std::collections::BTreeMap<String, String>,
);

fn settings(args: &SqlArgs) -> Result<ShellSettings, Error> {
    let (mut scan, job) = job::scan_settings(&args.scan)?;
    let detections = Detections::of(&job)?;
    let out_dir = args.out.clone().or(job.out.clone());
    let state_loc = args.state.clone().or(job.state.clone()).or_else(|| {
        out_dir
            .as_ref()
            .map(|o| format!("{}/_state", o.trim_end_matches('/')))
    });
    // As `run` does: the job's own outputs inside the archive are not events.
    let sinks = job.sinks.clone().unwrap_or_default();
    scan.exclude = [
        out_dir,
        state_loc.clone(),
        sinks.replay,
        sinks.dlq,
        sinks.gaps,
        sinks.silences,
        sinks.anomalies,
        sinks.contradicted,
    ]
    .into_iter()
    .flatten()
    .filter(|l| !crate::sink::outside_the_lake(l))
    .collect();
    let fold = job.state_at.map(|s| s.columns).unwrap_or_default();
    Ok((scan, state_loc, detections, fold))
}

/// The `silences` and `volume` views of a session: with the job file's
/// `[detect.silence]` and `[detect.volume]` as `run` finds them; without
/// them, with the defaults (silences by key at 5x median, volume by source
/// per hour) where the archive has those columns, so that the views are
/// there to explore.
struct Detections {
    silence: Option<crate::job::detect::Silence>,
    volume: Option<crate::job::detect::Volume>,
    /// Set in the job file: a column it names that is not there is an error.
    silence_configured: bool,
    volume_configured: bool,
}

impl Detections {
    fn of(job: &job::JobFile) -> Result<Detections, Error> {
        let silence_file = job.detect.as_ref().and_then(|d| d.silence.as_ref());
        let volume_file = job.detect.as_ref().and_then(|d| d.volume.as_ref());
        let silence_flags = crate::job::detect::SilenceFlags {
            asked: true,
            ..Default::default()
        };
        let volume_flags = crate::job::detect::VolumeFlags {
            asked: true,
            ..Default::default()
        };
        Ok(Detections {
            silence: crate::job::detect::silence(silence_file, &silence_flags)?,
            volume: crate::job::detect::volume(volume_file, &volume_flags)?,
            silence_configured: silence_file.is_some(),
            volume_configured: volume_file.is_some(),
        })
    }

    async fn register(&self, ctx: &SessionContext, scan: &Scan) -> Result<(), Error> {
        if let Some(silence) = &self.silence {
            match crate::detect::silences::register(ctx, silence, scan.to).await {
                Err(Error::Usage(_)) if !self.silence_configured => {}
                other => other?,
            }
        }
        if let Some(volume) = &self.volume {
            match crate::detect::volume::register(ctx, volume, scan.from, scan.to).await {
                Err(Error::Usage(_)) if !self.volume_configured => {}
                other => other?,
            }
        }
        Ok(())
    }
}

/// The stack of the thread `sql` parses and plans on: DataFusion's planner
/// and optimizer, and the syntax tree's derived `Clone` and `Drop`, recurse
/// once per level of an expression, and in a debug build a chain of 8,000
/// `+` (or of 2,000 `OR`) overflowed the main thread's 8 MiB: a process
/// killed by SIGABRT, no error line. 64 MiB holds [`script::MAX_DEPTH`]
/// levels with room to spare; it is address space, not memory, until used.
const SESSION_STACK: usize = 64 << 20;

/// The stack of the session runtime's workers, where the query's
/// operators evaluate expressions (recursively, once per level): tokio's 2
/// MiB overflowed at 3,000 terms in a debug build.
const WORKER_STACK: usize = 16 << 20;

/// `backfill sql`: the session runs on a thread and a runtime of its own,
/// whose stacks hold statements as deep as [`script::MAX_DEPTH`] allows.
pub async fn run(args: SqlArgs) -> Result<(), Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_error = |e: std::io::Error| Error::Io {
        what: "sql: starting its thread".into(),
        message: e.to_string(),
    };
    std::thread::Builder::new()
        .name("backfill-sql".into())
        .stack_size(SESSION_STACK)
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(WORKER_STACK)
                .build()
                .map_err(thread_error)
                .and_then(|rt| rt.block_on(session(args)));
            let _ = tx.send(outcome);
        })
        .map_err(thread_error)?;
    let outcome = rx
        .await
        .map_err(|_| Error::Internal("the sql session's thread ended without an outcome".into()))?;
    outcome.map_err(escaped)
}

/// `e` with the control characters of its text escaped (ESC as `\u{1b}`, as
/// a table shows it; see [`print::escape_controls`]), keeping its exit
/// code. The text of an error comes from SQL, data, file names and paths in
/// the archive, and reaches a terminal: `SELECT * FROM "\u{1b}[2J"` cleared
/// the screen with its "table not found". Line breaks and tabs are left to
/// the fold into one line that `Error::line` does.
fn escaped(e: Error) -> Error {
    let text = e.to_string();
    let clean = print::escape_error(&text);
    if clean == text {
        return e;
    }
    if e.exit_code() == crate::error::EXIT_USAGE {
        return Error::Usage(clean.into_owned());
    }
    match clean.split_once(": ") {
        Some((what, message)) => Error::Io {
            what: what.to_string(),
            message: message.to_string(),
        },
        None => Error::Io {
            what: "sql".into(),
            message: clean.into_owned(),
        },
    }
}

async fn session(args: SqlArgs) -> Result<(), Error> {
    let input = input(&args)?;
    let (scan, state_loc, detections, fold) = settings(&args)?;
    let ctx = source::session(&scan)?;
    // SHOW TABLES, SHOW COLUMNS and `\d` read information_schema. Not on
    // a cluster: there the session options carry the storage credentials
    // to the executors (`backfill.storage`), and information_schema's
    // df_settings and SHOW ALL would print them.
    ctx.state_ref()
        .write()
        .config_mut()
        .options_mut()
        .catalog
        .information_schema = !source::on_cluster(&ctx);
    // Parsed before the archive is listed: a typo costs no listing.
    let script = match &input {
        Input::Script(origin, text) => {
            let items =
                parse(&ctx, text).map_err(|e| Error::Usage(format!("{}{e}", origin.prefix())))?;
            if items.is_empty() {
                return Err(Error::Usage(match origin {
                    Origin::Argument => "sql: the query is empty".into(),
                    Origin::File(f) => format!("-f {f}: the file holds no statement"),
                    _ => "sql: no statement on stdin: pipe statements in, pass QUERY or -f FILE.sql, or start `backfill sql` on a terminal for a shell".into(),
                }));
            }
            Some((origin.clone(), items))
        }
        Input::Shell => None,
    };

    let phases = Phases::new(args.scan.progress);
    phases.set("listing the archive");
    let archive = source::register(&ctx, &scan).await?;
    match &state_loc {
        Some(loc) => {
            phases.set("reading the state");
            state::register(&ctx, loc, &scan.storage).await?;
        }
        None => state::register_none(&ctx)?,
    }
    crate::detect::register_views(&ctx, &scan).await?;
    detections.register(&ctx, &scan).await?;
    // `state_at('T')`: the state as of T over this window, with the job's
    // fold (checked now, so that a bad fold is named before the first query).
    crate::state_at::validate_fold(&ctx, &fold).await?;
    ctx.register_udtf(
        "state_at",
        std::sync::Arc::new(crate::state_at::StateAtFunction { fold }),
    );
    phases.done();
    // Like datafusion-cli: `SELECT * FROM 'out/replay/'` reads files by
    // URL, so a run's outputs can be inspected next to the archive.
    let ctx = ctx.enable_url_table();

    let maxrows = match args.maxrows {
        Some(MaxRows::Limit(n)) => Some(n),
        Some(MaxRows::Unlimited) => None,
        None if std::io::stdout().is_terminal() => Some(TERMINAL_MAXROWS),
        None => None,
    };
    let builtins = builtins(&ctx);
    let mut shell = Shell {
        ctx,
        format: args.format,
        maxrows,
        allow_writes: args.allow_writes,
        out: Out::stdout(),
        origin: Origin::Shell,
        builtins,
    };
    match script {
        Some((origin, items)) => {
            shell.origin = origin;
            shell.script(&items).await
        }
        None => shell.interactive(archive.stats.files_scanned).await,
    }
}

/// Parse with the session's dialect and recursion limit.
fn parse(ctx: &SessionContext, text: &str) -> Result<Vec<Item>, script::ScriptError> {
    let state = ctx.state();
    let options = &state.config().options().sql_parser;
    let dialect = datafusion::sql::sqlparser::dialect::dialect_from_str(options.dialect)
        .ok_or_else(|| {
            script::ScriptError(format!(
                "unsupported SQL dialect '{}' (datafusion.sql_parser.dialect)",
                options.dialect
            ))
        })?;
    script::parse(dialect.as_ref(), options.recursion_limit.get(), text)
}

/// Whether to read on after an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

/// A session: the context with every table, and how results print.
struct Shell {
    ctx: SessionContext,
    format: Format,
    /// `None`: every row.
    maxrows: Option<usize>,
    allow_writes: bool,
    out: Out,
    origin: Origin,
    /// The tables and views `backfill sql` registered (archive, events, the
    /// sql/ views, the state's tables), by full name: none of them may be
    /// replaced or dropped.
    builtins: std::collections::BTreeSet<ResolvedTableReference>,
}

impl Shell {
    /// Run a script: refused whole if any statement that plans on its own
    /// fails [`Shell::check`] (it writes, it replaces a built-in table);
    /// then in order, stopping at the first error (its exit code is the
    /// script's) or `\q`.
    async fn script(&mut self, items: &[Item]) -> Result<(), Error> {
        for item in items {
            if let Item::Sql(p) = item
                // A statement that only plans after an earlier one ran
                // (a view it creates) is checked when its turn comes.
                && let Ok(plan) = self.ctx.state().statement_to_plan(p.statement.clone()).await
            {
                self.check(p, &plan)?;
            }
        }
        for item in items {
            let flow = self.item(item).await;
            self.out.flush().map_err(print::stdout_error)?;
            if flow? == Flow::Quit || self.out.closed() {
                break;
            }
        }
        Ok(())
    }

    async fn item(&mut self, item: &Item) -> Result<Flow, Error> {
        match item {
            Item::Sql(p) => self.statement(p).await.map(|_| Flow::Continue),
            Item::Command { line, text } => self.command(*line, text).await,
        }
    }

    /// Plan, check, run and print one statement.
    async fn statement(&mut self, p: &Piece) -> Result<(), Error> {
        let started = Instant::now();
        let plan = self
            .ctx
            .state()
            .statement_to_plan(p.statement.clone())
            .await
            .map_err(|e| self.failed(&p.name(), e))?;
        self.check(p, &plan)?;
        // SET, DROP VIEW and their like only change the session's catalog:
        // when they fail ("View 'v' doesn't exist", a setting's value that
        // does not parse) the statement is at fault, not the data.
        let catalog_only = catalog_only(&plan);
        let plan = limited(plan, self.maxrows).map_err(|e| self.failed(&p.name(), e))?;
        let df = self.ctx.execute_logical_plan(plan).await.map_err(|e| {
            // A CREATE TABLE AS plans its query here: a plan it refuses
            // (a local path on a cluster) is the statement's fault too.
            let usage = catalog_only || matches!(e, DataFusionError::Plan(_));
            self.error(&p.name(), e, usage)
        })?;
        self.show(df, &p.name(), started).await
    }

    /// What is checked of a statement before it runs, and of a script's
    /// statements before any of them does: a built-in table replaced or
    /// dropped, a time zone that could not be used, and the read-only guard.
    fn check(&self, p: &Piece, plan: &LogicalPlan) -> Result<(), Error> {
        if let Some(name) = self.replaced_builtin(plan) {
            return Err(Error::Usage(format!(
                "{}{}: {name} is one of backfill's own tables and views (\\d lists them): \
                 replacing or dropping it is refused, as every later statement would read \
                 something else under that name; give yours another name",
                self.origin.prefix(),
                p.name(),
            )));
        }
        if let LogicalPlan::Statement(datafusion::logical_expr::Statement::SetVariable(v)) = plan
            && v.variable == TIME_ZONE
            && v.value.parse::<arrow::array::timezone::Tz>().is_err()
        {
            // DataFusion takes any text and every later query that shows a
            // time fails on it ("Invalid timezone").
            return Err(Error::Usage(format!(
                "{}{}: '{}' is not a time zone: give an offset ('+02:00') or a name ('Europe/Paris', 'UTC')",
                self.origin.prefix(),
                p.name(),
                v.value
            )));
        }
        self.guard(p, plan)
    }

    /// Print a result with its footer (tables) or its truncation warning
    /// (other formats, on stderr: stdout stays machine-readable).
    async fn show(&mut self, df: DataFrame, what: &str, started: Instant) -> Result<(), Error> {
        let schema = Arc::new(df.schema().as_arrow().clone());
        // A plan is read line by line: a table keeps its line breaks, which
        // it escapes in data.
        let plan = matches!(
            df.logical_plan(),
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_)
        );
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| self.failed(what, e))?;
        let columns = !schema.fields().is_empty();
        let printed = print::print_stream(
            &mut self.out,
            schema,
            stream,
            self.format,
            self.maxrows,
            plan,
        )
        .await
        .map_err(|e| match e {
            Error::DataFusion(e) => self.failed(what, *e),
            // Formatting a value failed: the statement is named, as
            // for any error of a statement.
            Error::Arrow(e) => Error::Io {
                what: format!("{}{what}", self.origin.prefix()),
                message: e.to_string(),
            },
            other => other,
        })?;
        let more = if self.origin == Origin::Shell {
            "\\pset maxrows inf shows all"
        } else {
            "--maxrows inf shows all"
        };
        if !columns {
            // A query without columns (`SELECT FROM events`) printed nothing
            // at all, as if it were a CREATE VIEW: a table says its rows.
            if printed.rows > 0 && self.format == Format::Table {
                let line = match printed.more {
                    true => format!(
                        "First {} row(s) fetched, without columns; the rest were not fetched ({more}).",
                        printed.rows
                    ),
                    false => format!("{} row(s) fetched, without columns.", printed.rows),
                };
                writeln!(self.out, "{line}").map_err(print::stdout_error)?;
            }
            return Ok(());
        }
        if self.format == Format::Table {
            let mut line = if printed.more {
                format!(
                    "First {} row(s) displayed; the rest were not fetched ({more}).",
                    printed.rows
                )
            } else {
                format!("{} row(s) fetched.", printed.rows)
            };
            if self.origin == Origin::Shell {
                line.push_str(&format!(
                    " Elapsed {:.3} seconds.",
                    started.elapsed().as_secs_f64()
                ));
            }
            writeln!(self.out, "{line}").map_err(print::stdout_error)?;
        } else if printed.more {
            // After the rows it is about, on a terminal showing both.
            self.out.flush().map_err(print::stdout_error)?;
            let warning = format!(
                "{}{what}: printed the first {} row(s); the rest were not fetched ({more})",
                self.origin.prefix(),
                printed.rows
            );
            eprintln!("warning: {}", print::escape_error(&warning));
        }
        Ok(())
    }

    /// The name of the built-in table or view `plan` would create over,
    /// replace or drop, if any. `CREATE OR REPLACE VIEW events AS ...`
    /// silently replaced the window for the rest of the session, so that
    /// `unprocessed`, `candidates` and every later query read the
    /// replacement: in a tool used to decide what to replay, that is
    /// refused rather than announced. Decided on the plan, by full name, so
    /// that `public.events` and `"events"` are the same name.
    fn replaced_builtin(&self, plan: &LogicalPlan) -> Option<String> {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        use datafusion::logical_expr::DdlStatement as D;
        let (catalog, schema) = self.default_schema();
        let mut found = None;
        let _ = plan.apply(|p| {
            let name = match p {
                LogicalPlan::Ddl(D::CreateView(v)) => &v.name,
                LogicalPlan::Ddl(D::CreateMemoryTable(t)) => &t.name,
                LogicalPlan::Ddl(D::CreateExternalTable(t)) => &t.name,
                LogicalPlan::Ddl(D::DropView(v)) => &v.name,
                LogicalPlan::Ddl(D::DropTable(t)) => &t.name,
                _ => return Ok(TreeNodeRecursion::Continue),
            };
            if self
                .builtins
                .contains(&name.clone().resolve(&catalog, &schema))
            {
                found = Some(name.table().to_string());
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found
    }

    /// Refuse a statement that writes, unless `--allow-writes`.
    fn guard(&self, p: &Piece, plan: &LogicalPlan) -> Result<(), Error> {
        if self.allow_writes {
            return Ok(());
        }
        match writes(plan) {
            Some(what) => Err(Error::Usage(format!(
                "{}{}: {what} is refused: `backfill sql` is read-only (pass --allow-writes to run it)",
                self.origin.prefix(),
                p.name()
            ))),
            None => Ok(()),
        }
    }

    /// A DataFusion error of `what`, as one line naming it: SQL that does
    /// not plan is a usage error (exit 2), anything else a runtime one.
    fn failed(&self, what: &str, e: DataFusionError) -> Error {
        let usage = is_usage(&e);
        self.error(what, e, usage)
    }

    /// [`Shell::failed`], with the exit code chosen by the caller.
    fn error(&self, what: &str, e: DataFusionError, usage: bool) -> Error {
        let at = format!("{}{what}", self.origin.prefix());
        if usage {
            // "Optimizer rule 'simplify_expressions' failed caused by" says
            // where DataFusion was, not what is wrong.
            let e = match e {
                DataFusionError::Context(c, inner) if optimizer_context(&c) => *inner,
                e => e,
            };
            let line = e.to_string();
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            let line = self
                .path_not_found(&line)
                .unwrap_or_else(|| without_debug(&line));
            Error::Usage(format!("{at}: {line}"))
        } else {
            // The crate's own wording (e.g. out of memory under
            // --memory-limit), after the statement.
            Error::Io {
                what: at,
                message: Error::from(e).to_string(),
            }
        }
    }

    /// DataFusion's answer to a path in FROM it cannot read (`SELECT * FROM
    /// 'out/dlq/'` with a typo, a file without a known extension, a folder
    /// without data files) is "table 'datafusion.public.out/dlq/' not
    /// found": the path glued to the schema's name, as though it were a
    /// table. Said as what it is, with what would be read.
    fn path_not_found(&self, message: &str) -> Option<String> {
        let (catalog, schema) = self.default_schema();
        let prefix = format!("table '{catalog}.{schema}.");
        let start = message.find(&prefix)? + prefix.len();
        let name = message[start..].strip_suffix("' not found")?;
        let path_like = name.contains('/') || name.contains('\\') || {
            let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
            matches!(
                ext.as_deref(),
                Some("parquet" | "csv" | "tsv" | "json" | "ndjson" | "arrow" | "avro")
            )
        };
        path_like.then(|| {
            format!(
                "'{name}' is no table, and no file or folder that can be read: a path in FROM \
                 must exist and be a Parquet, CSV, JSON or Arrow file (known by its extension) \
                 or a folder of them"
            )
        })
    }

    /// A shell command (`\d`, `\q`, ...).
    async fn command(&mut self, line: u64, text: &str) -> Result<Flow, Error> {
        let started = Instant::now();
        let usage =
            |msg: String| Error::Usage(format!("{}line {line}: {msg}", self.origin.prefix()));
        // `\d NAME` takes the rest of the line: a quoted name may hold
        // spaces (`\d "My Table"`), which split the command into words.
        if let Some(arg) = text
            .strip_prefix("\\d")
            .filter(|a| a.starts_with(char::is_whitespace))
        {
            // psql drops a `;` typed after the name out of SQL habit.
            let arg = arg.trim();
            let name = arg.strip_suffix(';').unwrap_or(arg).trim_end();
            let table = self
                .table_reference(name)
                .map_err(|m| usage(format!("\\d {name}: {m}")))?;
            let df = self
                .columns(&table)
                .await
                .map_err(|e| self.failed(text, e))?
                .ok_or_else(|| {
                    usage(format!(
                        "\\d {name}: there is no table or view named {name} (\\d lists them)"
                    ))
                })?;
            self.show(df, text, started).await?;
            return Ok(Flow::Continue);
        }
        let mut words = text.split_whitespace();
        let cmd = words.next().unwrap_or_default();
        let rest: Vec<&str> = words.collect();
        match (cmd, rest.as_slice()) {
            ("\\q" | "\\quit", []) => Ok(Flow::Quit),
            ("\\?" | "\\h" | "\\help", _) => {
                self.out
                    .write_all(HELP.as_bytes())
                    .map_err(print::stdout_error)?;
                Ok(Flow::Continue)
            }
            ("\\d" | "\\dt", []) => {
                let df = self.tables().await.map_err(|e| self.failed(text, e))?;
                self.show(df, text, started).await?;
                Ok(Flow::Continue)
            }
            ("\\pset", []) => {
                let rows = self.maxrows.map_or("inf".to_string(), |n| n.to_string());
                let format = self
                    .format
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                writeln!(self.out, "format {format}\nmaxrows {rows}")
                    .map_err(print::stdout_error)?;
                Ok(Flow::Continue)
            }
            ("\\pset", ["format", value]) => {
                self.format = Format::from_str(value, true).map_err(|_| {
                    usage(format!(
                        "\\pset format: '{value}' is not one of table, csv, tsv, json, ndjson"
                    ))
                })?;
                Ok(Flow::Continue)
            }
            ("\\pset", ["maxrows", value]) => {
                self.maxrows = match parse_maxrows(value)
                    .map_err(|m| usage(format!("\\pset maxrows: {m}")))?
                {
                    MaxRows::Limit(n) => Some(n),
                    MaxRows::Unlimited => None,
                };
                Ok(Flow::Continue)
            }
            _ => Err(usage(format!(
                "{text}: not a command of this shell (\\? lists them)"
            ))),
        }
    }

    /// `\d`: the tables and views, with what each is for.
    async fn tables(&self) -> datafusion::error::Result<DataFrame> {
        let (catalog, schema) = self.default_schema();
        let df = self
            .ctx
            .sql(&format!(
                "SELECT table_name, lower(table_type) AS table_type FROM information_schema.tables \
                 WHERE table_catalog = {} AND table_schema = {} ORDER BY table_name",
                literal(&catalog),
                literal(&schema)
            ))
            .await?;
        let batches = df.collect().await?;
        let mut name = arrow::array::StringBuilder::new();
        let mut kind = arrow::array::StringBuilder::new();
        let mut about = arrow::array::StringBuilder::new();
        for b in &batches {
            let names = arrow::array::AsArray::as_string::<i32>(b.column(0));
            let kinds = arrow::array::AsArray::as_string::<i32>(b.column(1));
            for i in 0..b.num_rows() {
                name.append_value(names.value(i));
                kind.append_value(kinds.value(i).replace("base table", "table"));
                about.append_option(describe(names.value(i)));
            }
        }
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("name", arrow::datatypes::DataType::Utf8, false),
            arrow::datatypes::Field::new("type", arrow::datatypes::DataType::Utf8, false),
            arrow::datatypes::Field::new("about", arrow::datatypes::DataType::Utf8, true),
        ]));
        let batch = arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![
                Arc::new(name.finish()),
                Arc::new(kind.finish()),
                Arc::new(about.finish()),
            ],
        )?;
        self.ctx.read_batch(batch)
    }

    /// `NAME` of `\d NAME` as SQL reads a table name: parts split on `.`
    /// (`schema.name`, `catalog.schema.name`), unquoted parts lower-cased,
    /// `"Quoted"` parts exact, with the session's dialect and
    /// normalization, so that `\d` describes what `SELECT * FROM NAME`
    /// reads.
    fn table_reference(&self, name: &str) -> Result<TableReference, String> {
        use datafusion::sql::sqlparser::parser::Parser;
        use datafusion::sql::sqlparser::tokenizer::Token;
        let state = self.ctx.state();
        let options = &state.config().options().sql_parser;
        let dialect = datafusion::sql::sqlparser::dialect::dialect_from_str(options.dialect)
            .ok_or_else(|| format!("unsupported SQL dialect '{}'", options.dialect))?;
        let not_a_name = || "not a table name (NAME, schema.NAME or \"Quoted Name\")".to_string();
        let mut parser = Parser::new(dialect.as_ref())
            .try_with_sql(name)
            .map_err(|_| not_a_name())?;
        let object = parser.parse_object_name(false).map_err(|_| not_a_name())?;
        if parser.peek_token().token != Token::EOF {
            return Err(not_a_name());
        }
        let parts = object
            .0
            .iter()
            .map(|part| {
                let ident = part.as_ident().ok_or_else(not_a_name)?;
                Ok(match ident.quote_style {
                    None if options.enable_ident_normalization => ident.value.to_lowercase(),
                    _ => ident.value.clone(),
                })
            })
            .collect::<Result<Vec<String>, String>>()?;
        Ok(match parts.as_slice() {
            [table] => TableReference::bare(table.as_str()),
            [schema, table] => TableReference::partial(schema.as_str(), table.as_str()),
            [catalog, schema, table] => {
                TableReference::full(catalog.as_str(), schema.as_str(), table.as_str())
            }
            _ => return Err(not_a_name()),
        })
    }

    /// `\d NAME`: its columns as `DESCRIBE` shows them, or `None` when
    /// there is no such table. Read from the table itself, not from
    /// information_schema (which has no rows for its own tables, and whose
    /// filter on the schema alone mixed catalogs up).
    async fn columns(
        &self,
        table: &TableReference,
    ) -> datafusion::error::Result<Option<DataFrame>> {
        use arrow::datatypes::{DataType, Field, Schema};
        let Ok(provider) = self.ctx.table_provider(table.clone()).await else {
            return Ok(None);
        };
        let schema = provider.schema();
        let mut name = arrow::array::StringBuilder::new();
        let mut data_type = arrow::array::StringBuilder::new();
        let mut nullable = arrow::array::StringBuilder::new();
        for f in schema.fields() {
            name.append_value(f.name());
            data_type.append_value(f.data_type().to_string());
            nullable.append_value(if f.is_nullable() { "YES" } else { "NO" });
        }
        let described = Arc::new(Schema::new(vec![
            Field::new("column_name", DataType::Utf8, false),
            Field::new("data_type", DataType::Utf8, false),
            Field::new("is_nullable", DataType::Utf8, false),
        ]));
        let batch = arrow::record_batch::RecordBatch::try_new(
            described,
            vec![
                Arc::new(name.finish()),
                Arc::new(data_type.finish()),
                Arc::new(nullable.finish()),
            ],
        )?;
        Ok(Some(self.ctx.read_batch(batch)?))
    }

    fn default_schema(&self) -> (String, String) {
        let state = self.ctx.state();
        let c = &state.config().options().catalog;
        (c.default_catalog.clone(), c.default_schema.clone())
    }

    /// The shell on a terminal: rustyline with history, multi-line
    /// statements ending in `;`, Ctrl-C cancels a running statement or
    /// clears the line, Ctrl-D or `\q` quits. Errors are printed and the
    /// shell goes on.
    async fn interactive(&mut self, files: u64) -> Result<(), Error> {
        use rustyline::error::ReadlineError;
        let config = rustyline::Config::builder()
            .auto_add_history(true)
            .max_history_size(10_000)
            .map_err(|e| shell_error(&e))?
            .build();
        let mut rl =
            rustyline::Editor::<Helper, rustyline::history::DefaultHistory>::with_config(config)
                .map_err(|e| shell_error(&e))?;
        rl.set_helper(Some(Helper {
            ctx: self.ctx.clone(),
        }));
        let history = history_path();
        if let Some(h) = &history {
            // No file yet is the first session, not an error.
            let _ = rl.load_history(h);
        }
        eprintln!(
            "backfill sql over {files} archive file(s): \\d lists the tables, \\? helps, \\q quits."
        );
        loop {
            let text = match rl.readline("backfill> ") {
                Ok(text) => text,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(shell_error(&e)),
            };
            let items = match parse(&self.ctx, &text) {
                Ok(items) => items,
                Err(e) => {
                    let line = crate::redact::line(&e.to_string());
                    eprintln!("error: {}", print::escape_error(&line));
                    continue;
                }
            };
            let mut quit = false;
            for item in &items {
                let outcome = tokio::select! {
                    r = self.item(item) => Some(r),
                    _ = tokio::signal::ctrl_c() => None,
                };
                let _ = self.out.flush();
                match outcome {
                    Some(Ok(Flow::Continue)) => {}
                    Some(Ok(Flow::Quit)) => {
                        quit = true;
                        break;
                    }
                    Some(Err(e)) => {
                        eprintln!("error: {}", escaped(e).line());
                        break;
                    }
                    None => {
                        eprintln!("cancelled");
                        break;
                    }
                }
            }
            if quit || self.out.closed() {
                break;
            }
        }
        if let Some(h) = &history {
            let saved = h
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .map_err(|e| e.to_string())
                .and_then(|_| rl.save_history(h).map_err(|e| e.to_string()));
            if let Err(e) = saved {
                eprintln!("warning: history not saved to {}: {e}", h.display());
            }
        }
        Ok(())
    }
}

fn shell_error(e: &rustyline::error::ReadlineError) -> Error {
    Error::Io {
        what: "the terminal".into(),
        message: e.to_string(),
    }
}

/// `$XDG_STATE_HOME/backfill/history`, else `~/.local/state/backfill/history`
/// (the XDG base-directory default); `None` without either variable.
pub fn history_path() -> Option<std::path::PathBuf> {
    history_path_from(|v| std::env::var_os(v))
}

fn history_path_from(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::path::PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let base = match set("XDG_STATE_HOME") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(set("HOME")?).join(".local/state"),
    };
    Some(base.join("backfill").join("history"))
}

/// The line editor's view of SQL: Enter runs what ends in `;` (or a shell
/// command), and opens a new line otherwise.
struct Helper {
    ctx: SessionContext,
}

impl rustyline::validate::Validator for Helper {
    fn validate(
        &self,
        vc: &mut rustyline::validate::ValidationContext,
    ) -> rustyline::Result<rustyline::validate::ValidationResult> {
        use rustyline::validate::ValidationResult;
        let input = vc.input();
        if input.trim().is_empty() || script::command(input.lines().next().unwrap_or("")).is_some()
        {
            return Ok(ValidationResult::Valid(None));
        }
        let state = self.ctx.state();
        let name = &state.config().options().sql_parser.dialect;
        let Some(dialect) = datafusion::sql::sqlparser::dialect::dialect_from_str(name) else {
            // Let the parser say what is wrong.
            return Ok(ValidationResult::Valid(None));
        };
        Ok(match script::progress(dialect.as_ref(), input) {
            script::Progress::Open => ValidationResult::Incomplete,
            _ => ValidationResult::Valid(None),
        })
    }
}

impl rustyline::completion::Completer for Helper {
    type Candidate = String;
}

impl rustyline::hint::Hinter for Helper {
    type Hint = String;
}

impl rustyline::highlight::Highlighter for Helper {}

impl rustyline::Helper for Helper {}

const HELP: &str = "\
Statements end with ';' and may span lines. Commands:
  \\d               the tables and views
  \\d NAME          the columns of one
  \\pset            the output settings
  \\pset format F   table, csv, tsv, json or ndjson
  \\pset maxrows N  rows printed of each result (0 or inf: all)
  \\? or \\h         this help
  \\q, quit, exit   leave (also Ctrl-D); Ctrl-C cancels a running statement
Tables: archive, events, unprocessed, conflicts, gaps, silences, volume, candidates,
logs, log_attempts, contradicted (with --logs or [logs]; empty without),
ledger, ledger_entries and runs (from the job's state: --state, --out or
the job file), information_schema; files by path, e.g. SELECT * FROM 'out/dlq/'.
";

/// What each of the tables `backfill sql` registers is for (`\d`).
fn describe(table: &str) -> Option<&'static str> {
    Some(match table {
        "archive" => "every row of the archive as stored: no window, source column names",
        "archive_files" => "the archive's files (without the Kafka sources)",
        "events" => "the window, input-contract column names, plus backfill_done",
        "unprocessed" => "one row per unresolved event: its chosen row",
        "conflicts" => "(key, seq) pairs carried by more than one event_id",
        "gaps" => "per key, each run of missing seq values",
        "ledger_entries" => "what the committed runs of the state replayed and dead-lettered",
        "ledger" => "per event, what the committed runs did with it",
        "candidates" => {
            "what the next run decides over: unprocessed events with conflict and ledger"
        }
        "runs" => "the committed runs of the state, with their reports",
        "silences" => "per group, the intervals with no event for longer than the threshold",
        "silence_settings" => "the threshold and window end the silences view uses",
        "volume" => "per group and time bucket, the count against its seasonal baseline",
        "volume_settings" => "the bucket, threshold and window the volume view uses",
        "logs" => {
            "every line of the application logs (--logs, [logs]): event_id, log_time, level, message, error"
        }
        "log_error_levels" => "the levels that mean a failed attempt, upper case",
        "log_attempts" => "per event an error-level log line names: how many, first and last",
        "contradicted" => {
            "resolved events with an error-level log line after their latest done row"
        }
        _ => return None,
    })
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Every table and view in the session's default schema, by full name:
/// taken once all of `backfill sql`'s own are registered.
fn builtins(ctx: &SessionContext) -> std::collections::BTreeSet<ResolvedTableReference> {
    let state = ctx.state();
    let c = &state.config().options().catalog;
    let (catalog, schema) = (c.default_catalog.as_str(), c.default_schema.as_str());
    ctx.catalog(catalog)
        .and_then(|cat| cat.schema(schema))
        .map(|s| s.table_names())
        .unwrap_or_default()
        .into_iter()
        .map(|t| TableReference::full(catalog, schema, t).resolve(catalog, schema))
        .collect()
}

/// DataFusion's name of the session's time zone, which `SET TIME ZONE`,
/// `SET timezone` and `SET datafusion.execution.time_zone` all set.
const TIME_ZONE: &str = "datafusion.execution.time_zone";

/// A plan that only changes the session's catalog or settings: no data is
/// read, so its failure is the statement's (exit 2).
fn catalog_only(plan: &LogicalPlan) -> bool {
    use datafusion::logical_expr::{DdlStatement as D, Statement as S};
    matches!(
        plan,
        LogicalPlan::Statement(S::SetVariable(_) | S::ResetVariable(_) | S::Deallocate(_))
            | LogicalPlan::Ddl(
                D::CreateView(_)
                    | D::DropView(_)
                    | D::DropTable(_)
                    | D::CreateCatalog(_)
                    | D::CreateCatalogSchema(_)
                    | D::DropCatalogSchema(_)
                    | D::DropFunction(_)
            )
    )
}

/// A DataFusion message without the Rust debug dump of a syntax tree that
/// some of its "not implemented" errors end with (`SET variant not
/// implemented yet: SetRole { context_modifier: None, role_name: Some(Ident
/// { value: "admin", quote_style: None, span: Span(Location(1,10)..` and
/// on): the dump is cut to its type name and where it starts, as the
/// statement is named already. A dump is known by the spans every node of
/// the tree carries.
fn without_debug(message: &str) -> String {
    let Some(span) = message.find("Span(Location(") else {
        return message.to_string();
    };
    let start = regex::Regex::new(r"\b[A-Z][A-Za-z0-9]*\s?[({]").expect("a valid regex");
    let Some(m) = start.find(&message[..span]) else {
        return message.to_string();
    };
    let name = m.as_str().trim_end_matches(['(', '{', ' ']);
    let mut out = format!("{}{name}", &message[..m.start()]);
    let at = regex::Regex::new(r"Location\((\d+),(\d+)\)").expect("a valid regex");
    if let Some(c) = at.captures(&message[span..]) {
        out.push_str(&format!(" at line {}, column {}", &c[1], &c[2]));
    }
    if out.contains("SET variant not implemented") {
        out.push_str(
            " (SET name = value and SET TIME ZONE are what DataFusion sets; SHOW ALL lists the settings)",
        );
    }
    out
}

/// SQL that does not plan: the user's to fix (exit 2).
fn is_usage(e: &DataFusionError) -> bool {
    use DataFusionError as D;
    match e {
        D::SQL(..) | D::Plan(_) | D::SchemaError(..) | D::NotImplemented(_) => true,
        // The logical optimizer reads no data: what fails there is the
        // statement's own constants (`WHERE event_time > '2024-13-45'`,
        // `CAST('x' AS INT)`), which a retry cannot mend.
        D::Context(c, _) if optimizer_context(c) => true,
        D::Context(_, inner) | D::Diagnostic(_, inner) => is_usage(inner),
        _ => false,
    }
}

/// The context DataFusion's logical optimizer wraps its rules' errors in.
fn optimizer_context(context: &str) -> bool {
    context.starts_with("Optimizer rule '")
}

/// A query reads at most one row past what is printed: DataFusion pushes
/// the limit into the scan (and turns a sort into a top-k), so
/// `SELECT * FROM events` on a terminal reads 41 rows, not the archive.
fn limited(plan: LogicalPlan, maxrows: Option<usize>) -> datafusion::error::Result<LogicalPlan> {
    // A limit past i64::MAX rows is none: DataFusion's LIMIT is an i64, and
    // `--maxrows 18446744073709551615` became LIMIT -1, a planning error.
    let Some(n) = maxrows.filter(|&n| n < i64::MAX as usize) else {
        return Ok(plan);
    };
    let query = !matches!(
        plan,
        LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::DescribeTable(_)
    );
    if !query {
        return Ok(plan);
    }
    LogicalPlanBuilder::from(plan)
        .limit(0, Some(n.saturating_add(1)))?
        .build()
}

/// What in a plan could write or change anything outside this session,
/// if anything. `sql` explores an archive, often a production one, and a
/// typo'd `COPY ... TO` or an `INSERT` into an external table must not
/// overwrite files there. Queries, EXPLAIN (without ANALYZE of a write),
/// SHOW, DESCRIBE, session-only views and the session's time zone are
/// read-only. Decided on the
/// plan, not the text: `EXPLAIN ANALYZE COPY ...` executes the COPY, and
/// the plan says so wherever the statement hides it.
fn writes(plan: &LogicalPlan) -> Option<String> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{DdlStatement, ResetVariable, SetVariable, Statement};
    let mut found = None;
    let _ = plan.apply(|p| {
        let what = match p {
            LogicalPlan::Dml(d) => Some(format!("{} {}", d.op.name().to_uppercase(), d.table_name)),
            LogicalPlan::Copy(c) => Some(format!("COPY ... TO '{}'", c.output_url)),
            LogicalPlan::Ddl(DdlStatement::CreateView(_)) => None,
            // How this session shows times, nothing more.
            LogicalPlan::Statement(Statement::SetVariable(SetVariable { variable, .. }))
            | LogicalPlan::Statement(Statement::ResetVariable(ResetVariable { variable }))
                if variable == TIME_ZONE =>
            {
                None
            }
            LogicalPlan::Ddl(d) => Some(sql_words(d.name())),
            LogicalPlan::Statement(s) => Some(sql_words(s.name())),
            _ => None,
        };
        if what.is_some() {
            found = what;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// `CreateExternalTable` as the user typed it: `CREATE EXTERNAL TABLE`.
fn sql_words(camel: &str) -> String {
    let mut out = String::new();
    for c in camel.chars() {
        if c.is_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.extend(c.to_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sql` is read-only: writes and catalog changes are found on the
    /// plan, wherever the statement hides them.
    #[tokio::test]
    async fn writes_are_found_on_the_plan() {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t AS VALUES (1)")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let found = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let plan = ctx.state().create_logical_plan(sql).await.unwrap();
                writes(&plan)
            }
        };
        for sql in [
            "SELECT * FROM t",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "EXPLAIN SELECT * FROM t",
            "DESCRIBE t",
            "CREATE VIEW v AS SELECT * FROM t",
        ] {
            assert_eq!(found(sql).await, None, "{sql}");
        }
        for (sql, what) in [
            ("COPY t TO '/tmp/x.parquet'", "COPY"),
            ("EXPLAIN ANALYZE COPY t TO '/tmp/x.parquet'", "COPY"),
            ("INSERT INTO t VALUES (2)", "INSERT"),
            (
                "CREATE EXTERNAL TABLE e STORED AS PARQUET LOCATION '/tmp/e/'",
                "CREATE EXTERNAL TABLE",
            ),
            ("CREATE TABLE u AS SELECT 1", "CREATE MEMORY TABLE"),
            ("DROP TABLE t", "DROP TABLE"),
            ("SET datafusion.execution.batch_size = 1", "SET VARIABLE"),
        ] {
            let w = found(sql).await;
            assert!(
                w.as_deref().is_some_and(|w| w.contains(what)),
                "{sql}: {w:?}"
            );
        }
    }

    /// The row limit reaches the plan as a LIMIT one past it (so the scan
    /// stops there); statements that are not queries are left alone.
    #[tokio::test]
    async fn queries_are_limited_one_past_maxrows() {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t AS VALUES (1), (2), (3)")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let plan = ctx
            .state()
            .create_logical_plan("SELECT * FROM t ORDER BY 1")
            .await
            .unwrap();
        let limited_plan = limited(plan.clone(), Some(40)).unwrap();
        match &limited_plan {
            LogicalPlan::Limit(l) => assert!(matches!(
                l.get_fetch_type().unwrap(),
                datafusion::logical_expr::logical_plan::FetchType::Literal(Some(41))
            )),
            other => panic!("not a limit: {other}"),
        }
        assert_eq!(limited(plan.clone(), None).unwrap(), plan);
        // Row counts past an i64 are no limit, not an overflowed one.
        for huge in [i64::MAX as usize, usize::MAX] {
            assert_eq!(limited(plan.clone(), Some(huge)).unwrap(), plan);
        }
        let explain = ctx
            .state()
            .create_logical_plan("EXPLAIN SELECT * FROM t")
            .await
            .unwrap();
        assert!(matches!(
            limited(explain, Some(1)).unwrap(),
            LogicalPlan::Explain(_)
        ));
    }

    #[test]
    fn debug_dumps_are_cut_to_their_type_name() {
        assert_eq!(
            without_debug(
                "This feature is not implemented: SET variant not implemented yet: SetRole { \
                 context_modifier: None, role_name: Some(Ident { value: \"admin\", quote_style: \
                 None, span: Span(Location(1,10)..Location(1,15)) }) }"
            ),
            "This feature is not implemented: SET variant not implemented yet: SetRole at line 1, \
             column 10 (SET name = value and SET TIME ZONE are what DataFusion sets; SHOW ALL \
             lists the settings)"
        );
        let plain = "Error during planning: table 'datafusion.public.x' not found";
        assert_eq!(without_debug(plain), plain);
    }

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn history_lives_in_the_xdg_state_dir() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(
            history_path_from(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/h")])),
            Some("/s/backfill/history".into())
        );
        assert_eq!(
            history_path_from(env(&[("XDG_STATE_HOME", ""), ("HOME", "/h")])),
            Some("/h/.local/state/backfill/history".into())
        );
        assert_eq!(history_path_from(env(&[])), None);
    }
}
