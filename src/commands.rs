//! The read-only subcommands: `gaps`, `sql`, `explain`, `generate`,
//! `state` and `report` (`runs` is in [`crate::runs`]). Each builds the same session and views as `run`, so what a user
//! explores by hand is exactly what the job decides on.

use std::io::Write;

use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::cli::{
    AnomaliesArgs, ExplainArgs, Format, GapsArgs, GcArgs, GenerateArgs, ReportCommand, ScanArgs,
    SilencesArgs, SqlArgs, StateCommand, StateLocArgs,
};
use crate::error::Error;
use crate::job::{self, Scan};
use crate::location;
use crate::run::Phases;
use crate::source::{self, Archive};

/// Session with `archive`, `events` and the detection views registered.
pub async fn prepare(args: &ScanArgs) -> Result<(SessionContext, Scan, Archive), Error> {
    let (scan, _) = job::scan_settings(args)?;
    prepare_with(args, scan).await
}

/// [`prepare`] with the scan settings already read (a command that also
/// needs the job file's other sections).
async fn prepare_with(
    args: &ScanArgs,
    scan: Scan,
) -> Result<(SessionContext, Scan, Archive), Error> {
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
    let df = crate::detect::gaps(&ctx).await?;
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    print_batches(schema, &batches, args.format)
}

/// `backfill silences`: the silences alone, printed as `gaps` prints.
pub async fn silences(args: SilencesArgs) -> Result<(), Error> {
    let (scan, job) = job::scan_settings(&args.scan)?;
    job::no_cluster(&args.scan, &scan, "silences")?;
    let file = job.detect.as_ref().and_then(|d| d.silence.as_ref());
    let silence = job::detect::silence(
        file,
        &job::detect::SilenceFlags {
            by: &args.by,
            by_flag: "--by",
            threshold: args.threshold.as_deref(),
            threshold_flag: "--threshold",
            asked: true,
        },
    )?
    .ok_or_else(|| Error::Internal("silences: no settings".into()))?;
    let (ctx, scan, _) = prepare_with(&args.scan, scan).await?;
    crate::detect::silences::register(&ctx, &silence, scan.to).await?;
    let df = crate::detect::silences::silences(&ctx, &silence).await?;
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    print_batches(schema, &batches, args.format)
}

/// `backfill anomalies`: the flagged buckets (or, with `--all`, every
/// scored bucket), printed as `gaps` prints.
pub async fn anomalies(args: AnomaliesArgs) -> Result<(), Error> {
    let (scan, job) = job::scan_settings(&args.scan)?;
    job::no_cluster(&args.scan, &scan, "anomalies")?;
    let file = job.detect.as_ref().and_then(|d| d.volume.as_ref());
    let volume = job::detect::volume(
        file,
        &job::detect::VolumeFlags {
            by: &args.by,
            by_flag: "--by",
            bucket: args.bucket.as_deref(),
            bucket_flag: "--bucket",
            threshold: args.threshold,
            threshold_flag: "--threshold",
            asked: true,
        },
    )?
    .ok_or_else(|| Error::Internal("anomalies: no settings".into()))?;
    let (ctx, scan, _) = prepare_with(&args.scan, scan).await?;
    crate::detect::volume::register(&ctx, &volume, scan.from, scan.to).await?;
    crate::detect::volume::count(&ctx, &volume).await?;
    let df = crate::detect::volume::anomalies(&ctx, &volume, args.all).await?;
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    print_batches(schema, &batches, args.format)
}

/// `backfill sql`: see [`crate::shell`].
pub async fn sql(args: SqlArgs) -> Result<(), Error> {
    crate::shell::run(args).await
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
        sources: args.sources,
        seasonal: args.seasonal,
        outages: args.outages,
        logs: args.logs.clone(),
        ..Default::default()
    };
    let summary = crate::generate::generate(&out, &opts).await?;
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write_stdout(format!("generated {}\n{json}\n", out.original).as_bytes())
}

pub(crate) fn state_location(args: &StateLocArgs) -> Result<(String, job::JobFile), Error> {
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
        StateCommand::Runs(args) => crate::runs::list(args).await,
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

/// Print batches as a table, CSV, TSV, a JSON array or JSON lines; an
/// empty result still prints its header. The same printer as `sql`'s.
pub fn print_batches(
    schema: arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    format: Format,
) -> Result<(), Error> {
    let mut out = crate::shell::print::Out::stdout();
    crate::shell::print::print_batches(&mut out, schema, batches, format)
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

/// `backfill report merge`: one report from the shard runs' reports
/// ([`crate::report::merge`]).
pub fn report(cmd: ReportCommand) -> Result<(), Error> {
    let ReportCommand::Merge(args) = cmd;
    let mut reports = vec![];
    for path in &args.reports {
        let shown = path.display().to_string();
        // A report named wrong is the caller's mistake (exit 2), as is one
        // that is not a run's report: a JSON object with its figures.
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Usage(format!("report {shown} cannot be read: {e}")))?;
        let not_a_report = |why: String| {
            Error::Usage(format!(
                "report {shown} is not a backfill run report: {why}"
            ))
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| not_a_report(e.to_string()))?;
        if !value.is_object() || value.get("run_id").and_then(|v| v.as_str()).is_none() {
            return Err(not_a_report("not a JSON object with a run_id".into()));
        }
        let r: crate::report::Report =
            serde_json::from_value(value).map_err(|e| not_a_report(e.to_string()))?;
        reports.push(r);
    }
    let merged = crate::report::merge(&reports).map_err(|e| match e {
        crate::report::MergeError::Shards(m) => Error::Usage(format!("report merge: {m}")),
        crate::report::MergeError::Balance(m) => Error::Unbalanced(format!("report merge: {m}")),
    })?;
    let json = serde_json::to_string_pretty(&merged)
        .map_err(|e| Error::Internal(format!("the merged report: {e}")))?;
    if let Some(out) = &args.report {
        std::fs::write(out, format!("{json}\n")).map_err(|e| Error::Io {
            what: format!("report {}", out.display()),
            message: e.to_string(),
        })?;
    }
    if args.json {
        write_stdout(format!("{json}\n").as_bytes())
    } else {
        write_stdout(merged.human().as_bytes())
    }
}
