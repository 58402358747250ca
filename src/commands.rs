//! The read-only subcommands: `gaps`, `sql`, `explain`, `generate` and
//! `state`. Each builds the same session and views as `run`, so what a user
//! explores by hand is exactly what the job decides on.

use std::io::Write;

use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::cli::{
    ExplainArgs, Format, GapsArgs, GcArgs, GenerateArgs, ScanArgs, SqlArgs, StateCommand,
    StateLocArgs,
};
use crate::error::Error;
use crate::job::{self, Scan};
use crate::location;
use crate::run::Phases;
use crate::source::{self, Archive};

/// Session with `archive`, `events` and the detection views registered.
pub async fn prepare(args: &ScanArgs) -> Result<(SessionContext, Scan, Archive), Error> {
    let (scan, _) = job::scan_settings(args)?;
    let phases = Phases::new(args.progress);
    phases.set("listing the archive");
    let ctx = source::session(&scan)?;
    let archive = source::register(&ctx, &scan).await?;
    crate::detect::register_views(&ctx, &scan).await?;
    phases.done();
    Ok((ctx, scan, archive))
}

pub async fn gaps(args: GapsArgs) -> Result<(), Error> {
    let (ctx, scan, _) = prepare(&args.scan).await?;
    if !scan.detect_gaps {
        return Err(Error::Usage(
            "gaps: gap detection is switched off (--no-gaps or detect_gaps = false)".into(),
        ));
    }
    let batches = crate::detect::gaps(&ctx).await?.collect().await?;
    print_batches(&batches, args.format)
}

pub async fn sql(args: SqlArgs) -> Result<(), Error> {
    let text = match (&args.query, &args.file) {
        (Some(q), None) => q.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::Io {
            what: format!("SQL file {}", f.display()),
            message: e.to_string(),
        })?,
        _ => {
            return Err(Error::Usage("sql: give a QUERY or -f FILE.sql".into()));
        }
    };
    let (ctx, _, _) = prepare(&args.scan).await?;
    // Like datafusion-cli: `SELECT * FROM 'out/replay/'` reads files by URL,
    // so a run's outputs can be inspected next to the archive.
    let ctx = ctx.enable_url_table();
    let statements = split_statements(&text);
    if statements.is_empty() {
        return Err(Error::Usage("sql: the query is empty".into()));
    }
    for (i, stmt) in statements.iter().enumerate() {
        let plan = ctx.state().create_logical_plan(stmt).await?;
        if !args.allow_writes
            && let Some(what) = writes(&plan)
        {
            return Err(Error::Usage(format!(
                "sql: {what} is refused: `backfill sql` is read-only (pass --allow-writes to run it)"
            )));
        }
        let df = ctx.execute_logical_plan(plan).await?;
        let batches = df.collect().await?;
        // Only the last statement's result is printed, as in `psql -f`
        // with CREATE VIEW ... ; SELECT ...; scripts.
        if i + 1 == statements.len() {
            print_batches(&batches, args.format)?;
        }
    }
    Ok(())
}

/// What in a plan could write or change anything outside this session,
/// if anything. `sql` explores an archive, often a production one, and a
/// typo'd `COPY ... TO` or an `INSERT` into an external table must not
/// overwrite files there. Queries, EXPLAIN (without ANALYZE of a write),
/// SHOW, DESCRIBE and session-only views are read-only. Decided on the
/// plan, not the text: `EXPLAIN ANALYZE COPY ...` executes the COPY, and
/// the plan says so wherever the statement hides it.
fn writes(plan: &datafusion::logical_expr::LogicalPlan) -> Option<String> {
    use datafusion::common::tree_node::TreeNode;
    use datafusion::logical_expr::{DdlStatement, LogicalPlan};
    let mut found = None;
    let _ = plan.apply(|p| {
        let what = match p {
            LogicalPlan::Dml(d) => Some(format!("{} {}", d.op.name().to_uppercase(), d.table_name)),
            LogicalPlan::Copy(c) => Some(format!("COPY ... TO '{}'", c.output_url)),
            LogicalPlan::Ddl(DdlStatement::CreateView(_)) => None,
            LogicalPlan::Ddl(d) => Some(sql_words(d.name())),
            LogicalPlan::Statement(s) => Some(sql_words(s.name())),
            _ => None,
        };
        if what.is_some() {
            found = what;
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
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

/// Split a script on `;` outside quotes and comments.
fn split_statements(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let (mut in_single, mut in_double) = (false, false);
    while let Some(c) = chars.next() {
        match c {
            '\'' if !in_double => in_single = !in_single,
            '"' if !in_single => in_double = !in_double,
            '-' if !in_single && !in_double && chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                cur.push('\n');
                continue;
            }
            ';' if !in_single && !in_double => {
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

pub async fn explain(args: ExplainArgs) -> Result<(), Error> {
    let (ctx, scan, archive) = prepare(&args.scan).await?;
    let text = crate::detect::explain(&ctx, &scan, &archive).await?;
    write_stdout(text.as_bytes())
}

pub async fn generate(args: GenerateArgs) -> Result<(), Error> {
    let start = chrono::NaiveDate::parse_from_str(&args.start, "%Y-%m-%d").map_err(|_| {
        Error::Usage(format!(
            "--start: '{}' is not a date (YYYY-MM-DD)",
            args.start
        ))
    })?;
    let out = location::resolve(&args.out, &Default::default())?;
    let opts = crate::generate::GenerateOptions {
        events: args.events,
        keys: args.keys,
        seed: args.seed,
        days: args.days,
        start,
        files_per_day: args.files_per_day,
        ..Default::default()
    };
    let summary = crate::generate::generate(&out, &opts).await?;
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write_stdout(format!("generated {}\n{json}\n", out.original).as_bytes())
}

fn state_location(args: &StateLocArgs) -> Result<(String, job::JobFile), Error> {
    let job = match &args.job {
        Some(p) => job::load_job_file(p)?,
        None => job::JobFile::default(),
    };
    let out = args.out.clone().or(job.out.clone());
    let state = match (args.state.clone().or(job.state.clone()), &out) {
        (Some(s), _) => s,
        (None, Some(o)) => format!("{}/_state", o.trim_end_matches('/')),
        (None, None) => {
            return Err(Error::Usage(
                "state: pass --state LOCATION or --out DIR".into(),
            ));
        }
    };
    Ok((state, job))
}

pub async fn state(cmd: StateCommand) -> Result<(), Error> {
    match cmd {
        StateCommand::Runs(args) => {
            let (state, job) = state_location(&args)?;
            let storage = job.storage.unwrap_or_default();
            let st = crate::state::State::new(location::resolve(&state, &storage)?);
            let mut text = String::new();
            for m in st.manifests().await? {
                let r = &m.report;
                text.push_str(&format!(
                    "{}\tcommitted {}\treplayed {}\tdead-lettered {}\n",
                    m.run_id,
                    m.committed_at.to_rfc3339(),
                    r.get("replayed").and_then(|v| v.as_u64()).unwrap_or(0),
                    r.get("dead_lettered").and_then(|v| v.as_u64()).unwrap_or(0),
                ));
            }
            write_stdout(text.as_bytes())
        }
        StateCommand::Gc(args) => gc(args).await,
    }
}

async fn gc(args: GcArgs) -> Result<(), Error> {
    let (state, job) = state_location(&args.loc)?;
    let storage = job.storage.clone().unwrap_or_default();
    let st = crate::state::State::new(location::resolve(&state, &storage)?);
    if st.is_empty().await? {
        return Err(Error::Usage(format!(
            "state gc: there is no backfill state at {state} (no commit log, no attempts): check --out / --state"
        )));
    }
    if !args.sink.is_empty() {
        tracing::warn!(
            "--sink is no longer needed: gc finds every sink an attempt wrote to in the state"
        );
    }
    let outcome = crate::state::gc(
        &st,
        &storage,
        chrono::Duration::minutes(args.min_age_minutes as i64),
        args.dry_run,
    )
    .await?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut text = String::new();
    for r in &outcome.rolled_forward {
        text.push_str(&format!("published the outputs of committed run {r}\n"));
    }
    for a in &outcome.fenced {
        text.push_str(&format!(
            "fenced abandoned attempt {} of run {}\n",
            a.nonce, a.run_id
        ));
    }
    for l in &outcome.removed {
        text.push_str(&format!(
            "{verb} {} ({}, {} bytes)\n",
            l.object, l.why, l.bytes
        ));
    }
    text.push_str(&format!("{verb} {} objects\n", outcome.removed.len()));
    write_stdout(text.as_bytes())
}

/// Print batches as a table, CSV, a JSON array or JSON lines.
pub fn print_batches(batches: &[RecordBatch], format: Format) -> Result<(), Error> {
    let mut buf: Vec<u8> = vec![];
    match format {
        Format::Table => {
            let t = arrow::util::pretty::pretty_format_batches(batches)?;
            buf.extend_from_slice(t.to_string().as_bytes());
            buf.push(b'\n');
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut buf);
            let mut wrote = false;
            for b in batches {
                w.write(b)?;
                wrote = true;
            }
            drop(w);
            if !wrote {
                buf.clear();
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut buf);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
            drop(w);
            if buf.is_empty() {
                buf.extend_from_slice(b"[]");
            }
            buf.push(b'\n');
        }
        Format::Ndjson => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
        }
    }
    write_stdout(&buf)
}

/// Write to stdout; a closed pipe (`| head`) is not an error.
pub fn write_stdout(bytes: &[u8]) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Io {
            what: "stdout".into(),
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{split_statements, writes};

    /// `sql` is read-only: writes and catalog changes are found on the
    /// plan, wherever the statement hides them.
    #[tokio::test]
    async fn writes_are_found_on_the_plan() {
        let ctx = datafusion::prelude::SessionContext::new();
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

    #[test]
    fn splits_outside_quotes_and_comments() {
        let s = split_statements("select ';' as a; -- x; y\nselect 2;\n\n");
        assert_eq!(s, vec!["select ';' as a", "select 2"]);
    }
}
