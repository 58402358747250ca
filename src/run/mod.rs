//! `backfill run`: plan, decide, write, commit, publish — in that order,
//! following the commit protocol (ARCHITECTURE.md): the attempt records its
//! intent → every sink writes under staged names and finishes (durable,
//! invisible) → a transactional Kafka sink commits → the ledger file is
//! closed → the log entry, listing every staged file, is appended
//! create-only (the commit; it aborts if a run committed since this one
//! started acted on the same events) → staged files move to their final
//! names and stdout is printed. Anything that fails before the log entry
//! aborts the sinks and leaves nothing visible; anything after it is
//! finished by the next run or `state gc` (roll-forward).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{Field, Schema, SchemaRef};
use chrono::Utc;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::cli::Progress;
use crate::detect;
use crate::error::Error;
use crate::failpoint;
use crate::human;
use crate::job::RunSettings;
use crate::location::{self, Location};
use crate::policy::{Decisions, Policy};
use crate::report::Report;
use crate::sink::{self, RowColumns, Sink, SinkContext, SinkKind};
use crate::source;
use crate::state::{AttemptRecord, Manifest, State};

mod commit;
mod recover;
pub mod redrive;

/// The outcome of `run`, for main to print and map to an exit code.
pub struct RunOutcome {
    pub report: Report,
    /// Some sink writes to stdout: the summary goes to stderr instead.
    pub stdout_taken: bool,
}

/// Progress moved to [`crate::progress`]; `run::Phases` stays its name here.
pub use crate::progress::Phases;

/// A unique id for this attempt: time and pid, so that racing attempts at
/// one run id never share a temporary or ledger file.
fn nonce() -> String {
    let now = Utc::now();
    format!(
        "{}{:09}-{}",
        now.timestamp(),
        now.timestamp_subsec_nanos(),
        std::process::id()
    )
}

/// What the scan found: by the one-pass detection in-process, or by the
/// `sql/` views on a cluster (`--cluster`), which decide the same.
enum Found {
    Here(Box<detect::onepass::Detection>),
    Cluster(crate::cluster::Detection),
}

/// The figures of [`Found`] the report takes.
struct FoundFigures {
    rows: u64,
    events: u64,
    conflicts: u64,
    spilled_bytes: u64,
    narrow_ms: u64,
    buckets_ms: u64,
    generations: u64,
    candidates: u64,
}

impl Found {
    fn figures(&self) -> FoundFigures {
        match self {
            Found::Here(d) => FoundFigures {
                rows: d.rows,
                events: d.events,
                conflicts: d.conflicts,
                spilled_bytes: d.spilled_bytes,
                narrow_ms: d.narrow_ms,
                buckets_ms: d.buckets_ms,
                generations: d.generations,
                candidates: d.candidates,
            },
            Found::Cluster(d) => FoundFigures {
                rows: d.rows,
                events: d.events,
                conflicts: d.conflicts,
                spilled_bytes: 0,
                narrow_ms: d.count_ms,
                buckets_ms: 0,
                generations: 1,
                candidates: 0,
            },
        }
    }

    fn narrow_plan(&self) -> &dyn datafusion::physical_plan::ExecutionPlan {
        match self {
            Found::Here(d) => d.narrow_plan.as_ref(),
            Found::Cluster(d) => d.plan.as_ref(),
        }
    }

    /// The one-pass detection, which `--recover-from` works with (refused
    /// with `--cluster`).
    fn here(&mut self) -> Result<&mut detect::onepass::Detection, Error> {
        match self {
            Found::Here(d) => Ok(d),
            Found::Cluster(_) => Err(Error::Internal(
                "a cluster run has no in-process detection".into(),
            )),
        }
    }

    async fn gaps(
        &self,
        ctx: &SessionContext,
    ) -> datafusion::error::Result<datafusion::physical_plan::SendableRecordBatchStream> {
        match self {
            Found::Here(d) => d.gaps(ctx).await,
            Found::Cluster(_) => detect::gaps(ctx).await?.execute_stream().await,
        }
    }

    async fn fetch(
        &self,
        ctx: &SessionContext,
    ) -> datafusion::error::Result<datafusion::dataframe::DataFrame> {
        match self {
            Found::Here(d) => d.fetch(ctx).await,
            Found::Cluster(_) => ctx.table("candidates").await,
        }
    }

    fn check_fetched(&self) -> datafusion::error::Result<()> {
        match self {
            Found::Here(d) => d.check_fetched(),
            Found::Cluster(_) => Ok(()),
        }
    }

    fn fetch_metrics(&self) -> datafusion::error::Result<detect::ScanMetrics> {
        match self {
            Found::Here(d) => d.fetch_metrics(),
            Found::Cluster(_) => Ok(detect::ScanMetrics::default()),
        }
    }
}

pub(super) struct OpenSink {
    kind: SinkKind,
    sink: Box<dyn Sink>,
}

pub async fn run(settings: RunSettings, progress: Progress) -> Result<RunOutcome, Error> {
    let started = Instant::now();
    let phases = Phases::new(progress);
    let scan = &settings.scan;
    let mut report = Report {
        run_id: settings.run_id.clone(),
        dry_run: settings.dry_run,
        window_from: scan.from.map(|t| t.to_rfc3339()),
        shard: scan.shard,
        cluster: scan.cluster.as_ref().map(|c| c.url()),
        window_to: scan.to.map(|t| t.to_rfc3339()),
        ..Default::default()
    };

    let state = State::new(location::resolve(&settings.state, &scan.storage)?);
    // The executors read the ledger's files.
    source::check_cluster_reads(scan, &state.loc, "state")?;
    report.state = Some(state.loc.original.clone());
    // A state that cannot be written is the settings' fault (exit 2), found
    // before anything is read; a dry run, a scheduler's preflight, too.
    if let Err(reason) = state.loc.check_local_writable() {
        return Err(Error::Usage(format!(
            "state {}: {reason}",
            state.loc.display_path(&state.loc.prefix)
        )));
    }
    phases.set("reading state");
    let snapshot = state.snapshot().await?;
    if !settings.dry_run {
        // A crash after an earlier commit left outputs staged: finish them
        // first, so that every committed run's folder is whole.
        match state.roll_forward(&snapshot, &scan.storage).await {
            Ok(runs) => report.rolled_forward = runs,
            Err(e) => tracing::warn!(
                "{}",
                crate::redact::line(&format!("{e}; `backfill state gc` retries it"))
            ),
        }
    }
    commit::check_split(&snapshot, &settings)?;
    // Two ways to be done before the scan: the run id is committed already,
    // or an earlier attempt delivered everything and only needs committing.
    let early = if let Some(m) = snapshot.committed(&settings.run_id) {
        // The same settings end as the committed run ended; other settings
        // are refused (exit 2), naming what differs.
        Some(commit::committed_again(
            m,
            &commit::Identity::of_run(&settings, started),
        )?)
    } else {
        // Everything below decides from the ledger: a damaged state stops
        // the run before the archive is listed.
        state
            .verify_ledgers(&snapshot.runs().cloned().collect::<Vec<_>>())
            .await?;
        if let Some(r) = &settings.report {
            commit::check_writable(r)?;
        }
        if settings.dry_run {
            None
        } else {
            commit::recover_prepared(&state, &commit::Identity::of_run(&settings, started)).await?
        }
    };
    if let Some(mut r) = early {
        r.rolled_forward = std::mem::take(&mut report.rolled_forward);
        r.elapsed_ms = started.elapsed().as_millis() as u64;
        phases.done();
        return Ok(RunOutcome {
            report: r,
            stdout_taken: false,
        });
    }

    phases.set("listing the archive");
    let t = Instant::now();
    let ctx = source::session(scan)?;
    let _watch = crate::machine::MemoryWatch::start(
        ctx.runtime_env().memory_pool.clone(),
        std::time::Duration::from_millis(200),
    );
    let archive = source::register(&ctx, scan).await?;
    report
        .phase_ms
        .insert("list".into(), t.elapsed().as_millis() as u64);
    report.files_scanned = archive.stats.files_scanned;
    report.files_pruned = archive.stats.files_pruned;
    report.partitions_pruned = archive.stats.partitions_pruned;
    report.kafka_messages = archive.stats.kafka_messages;
    let manifests: Vec<Manifest> = snapshot.runs().cloned().collect();
    state.register_ledger(&ctx, &manifests).await?;
    // The logs are listed before the views need them (a missing file
    // fails here, before any sink is opened).
    let log_files = match &scan.logs {
        Some(l) => {
            phases.set("listing the logs");
            crate::source::logs::register(&ctx, Some(l), &scan.storage).await?
        }
        None => vec![],
    };
    detect::register_views(&ctx, scan).await?;
    // Separate plans over the narrow columns, only when asked.
    let silences_schema = match &settings.silence {
        Some(s) => {
            detect::silences::register(&ctx, s, scan.to).await?;
            let df = detect::silences::silences(&ctx, s).await?;
            Some(gaps_output_schema(df.schema().as_arrow(), false))
        }
        None => None,
    };
    let contradicted_schema = match &scan.logs {
        Some(_) => {
            let df = detect::logs::contradicted(&ctx, scan).await?;
            Some(gaps_output_schema(df.schema().as_arrow(), false))
        }
        None => None,
    };
    let anomalies_schema = match &settings.volume {
        Some(v) => {
            detect::volume::register(&ctx, v, scan.from, scan.to).await?;
            let df = detect::volume::anomalies(&ctx, v, false).await?;
            Some(gaps_output_schema(df.schema().as_arrow(), false))
        }
        None => None,
    };
    let reconcile_schema = match &settings.reconcile {
        Some(r) => {
            crate::reconcile::register(&ctx, r, &scan.storage).await?;
            Some(gaps_output_schema(
                &crate::reconcile::output_schema(&ctx, r).await?,
                false,
            ))
        }
        None => None,
    };

    // The plan: the outputs' schemas, known before anything is read (the
    // views' shapes; the one-pass detection produces the same).
    let candidates = detect::candidates(&ctx, scan, &archive).await?;
    let cand_schema: SchemaRef = Arc::new(candidates.schema().as_arrow().clone());
    let out_schema = crate::policy::output_schema(&cand_schema);
    let gaps_view_schema: SchemaRef =
        Arc::new(detect::gaps(&ctx).await?.schema().as_arrow().clone());
    let gaps_schema = gaps_output_schema(&gaps_view_schema, scan.recover_from.is_some());

    // Open and check every sink before the scan: fail in seconds.
    let out_loc: Option<Location> = match &settings.out {
        Some(o) => Some(location::resolve(o, &scan.storage)?),
        None => None,
    };
    let row_columns = Arc::new(row_columns(scan));
    let run_nonce = nonce();
    let mut sinks: Vec<OpenSink> = vec![];
    // The state first: no sink may share its folder either.
    let mut file_kinds: Vec<(String, String, String)> = vec![(
        "state".to_string(),
        state.loc.display_path(&state.loc.prefix),
        folder_key(&state.loc),
    )];
    // The logs' folders, as the archive is: a sink may lie below one (its
    // Parquet files are never read as logs) but may not be one.
    let log_folders: Vec<(String, String)> = match &scan.logs {
        Some(l) => crate::source::logs::folders(l, &scan.storage)?
            .iter()
            .map(|loc| (loc.display_path(&loc.prefix), folder_key(loc)))
            .collect(),
        None => vec![],
    };
    let mut stdout_taken = false;
    // Every sink is checked in a dry run too (a scheduler's
    // preflight): nothing is created, and the opened sinks are dropped.
    for (kind, target, schema) in [
        (
            SinkKind::Replay,
            &settings.replay_sink,
            Some(out_schema.clone()),
        ),
        (SinkKind::Dlq, &settings.dlq_sink, Some(out_schema.clone())),
        (
            SinkKind::Gaps,
            &settings.gaps_sink,
            Some(gaps_schema.clone()),
        ),
        (
            SinkKind::Silences,
            &settings.silences_sink,
            silences_schema.clone(),
        ),
        (
            SinkKind::Anomalies,
            &settings.anomalies_sink,
            anomalies_schema.clone(),
        ),
        (
            SinkKind::Reconcile,
            &settings.reconcile_sink,
            reconcile_schema.clone(),
        ),
        (
            SinkKind::Contradicted,
            &settings.contradicted_sink,
            contradicted_schema.clone(),
        ),
    ] {
        if kind == SinkKind::Gaps && !scan.detect_gaps {
            continue;
        }
        // Not asked for: no sink.
        let Some(schema) = schema else {
            continue;
        };
        let target = match (target, &out_loc) {
            (Some(t), _) => t.clone(),
            (None, Some(o)) => sink::default_target(o, kind),
            (None, None) => continue,
        };
        stdout_taken |= target == "-" && !settings.dry_run;
        if !crate::sink::outside_the_lake(&target) {
            let base = location::resolve(&target, &scan.storage)?;
            let here = base.display_path(&base.prefix);
            // Two outputs in one folder would write the same part names
            // (and a reader could not tell replays from dead letters);
            // the state inside an output would show its ledger to the
            // output's readers. Local paths are compared resolved
            // (symlinks, `..`).
            let key = folder_key(&base);
            for (other_kind, other, other_key) in &file_kinds {
                // A sink may hold the state's folder below it only if
                // it is not the state: the state below a sink is refused,
                // a sink below the state is harmless.
                let clash = if other_kind == "state" {
                    nested(other_key, &key)
                } else {
                    nested(&key, other_key) || nested(other_key, &key)
                };
                if clash {
                    return Err(Error::Usage(format!(
                        "the {} sink {target} and the {other_kind} {other} share a folder; give each output a folder of its own",
                        kind.name(),
                    )));
                }
            }
            if let Some((logs, _)) = log_folders.iter().find(|(_, k)| *k == key) {
                return Err(Error::Usage(format!(
                    "the {} sink {target} is the logs folder {logs}; write outputs outside it or in a folder below it",
                    kind.name(),
                )));
            }
            file_kinds.push((format!("{} sink", kind.name()), here, key));
        }
        let ctx = SinkContext {
            run_id: settings.run_id.clone(),
            nonce: run_nonce.clone(),
            kind,
            schema,
            columns: row_columns.clone(),
            storage: scan.storage.clone(),
            kafka: scan.kafka.clone(),
        };
        let mut s = sink::open(&target, ctx)?;
        phases.set(format!("checking the {} sink", kind.name()));
        if settings.dry_run {
            s.preflight().await?;
            // The plan a dry run returns: where each kind of row would go
            // (its count is filled in once decided).
            report.outputs.insert(
                kind.name().to_string(),
                sink::SinkReceipt {
                    target: crate::redact::url(&target),
                    ..Default::default()
                },
            );
        } else {
            s.check().await?;
            sinks.push(OpenSink { kind, sink: s });
        }
    }

    if let Some(url) = &scan.recover_from {
        // The topic gaps are recovered from answers before the scan: fail
        // in seconds, as the sinks do.
        phases.set("checking the recovery topic");
        crate::kafka::source::check_topic(url, &scan.kafka.clone().unwrap_or_default())
            .await
            .map_err(source::SourceError::from)?;
    }

    let result = async {
        if !settings.dry_run {
            // Before anything is written: what this attempt may leave behind,
            // so that gc can prove it owns it.
            state
                .record_attempt(&AttemptRecord {
                    run_id: settings.run_id.clone(),
                    nonce: run_nonce.clone(),
                    started_at: Utc::now(),
                    based_on: snapshot.head,
                    targets: file_kinds
                        .iter()
                        .filter(|(kind, _, _)| kind != "state")
                        .map(|(_, here, _)| here.clone())
                        .collect(),
                })
                .await?;
            failpoint::hit("after_attempt_record").await?;
        }
        let plan = Plan {
            ctx: &ctx,
            archive: &archive,
            out_schema: &out_schema,
            gaps_view_schema,
            log_files: &log_files,
        };
        let attempt = Attempt {
            state: &state,
            nonce: &run_nonce,
            based_on: snapshot.head,
            started,
        };
        execute(&plan, &settings, &attempt, &mut sinks, &mut report, &phases).await
    }
    .await;
    if let Err(e) = result {
        let attempt =
            (!settings.dry_run).then_some((&state, settings.run_id.as_str(), run_nonce.as_str()));
        return Err(abort(e, &mut sinks, attempt, &phases).await);
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    phases.done();
    Ok(RunOutcome {
        report,
        stdout_taken,
    })
}

/// An attempt (a run's or a redrive's) failed: its sinks drop what they
/// staged and its attempt record goes (none for a dry run), unless it
/// committed, when the outputs are the state's now. Returns the error.
pub(super) async fn abort(
    e: Error,
    sinks: &mut [OpenSink],
    attempt: Option<(&State, &str, &str)>,
    phases: &Phases,
) -> Error {
    if !matches!(e, Error::Committed { .. } | Error::CommitUnknown { .. }) {
        phases.set("aborting");
        for s in sinks.iter_mut() {
            s.sink.abort().await;
        }
        if let Some((state, run_id, nonce)) = attempt {
            state.discard_attempt(run_id, nonce).await;
        }
    }
    phases.done();
    e
}

/// How long the phase `name` took, as the report recorded it.
fn phase_time(report: &Report, name: &str) -> std::time::Duration {
    std::time::Duration::from_millis(report.phase_ms.get(name).copied().unwrap_or(0))
}

/// A location as a comparable folder: its store and its prefix, resolved
/// through symlinks on local disk.
fn folder_key(loc: &Location) -> String {
    if loc.is_local {
        format!("file:///{}", crate::source::canonical_prefix(&loc.prefix))
    } else {
        loc.display_path(&loc.prefix)
    }
}

/// `a` is `b` or lies below it.
fn nested(a: &str, b: &str) -> bool {
    let b = b.trim_end_matches('/');
    a == b || a.starts_with(&format!("{b}/"))
}

fn row_columns(scan: &crate::job::Scan) -> RowColumns {
    let c = &scan.columns;
    RowColumns {
        event_id: c.event_id.clone(),
        key: c.key.clone(),
        seq: c.seq.clone(),
        event_time: c.event_time.clone(),
        status: c.status.clone(),
        error: c.error.clone(),
        payload: c.payload.clone(),
    }
}

/// The gaps sink's rows: the view's, the recovery class with
/// `--recover-from`, the run's columns.
fn gaps_output_schema(gaps: &Schema, recovering: bool) -> SchemaRef {
    let mut fields: Vec<Field> = gaps.fields().iter().map(|f| f.as_ref().clone()).collect();
    if recovering {
        fields.push(recover::recovery_field());
    }
    let bf = crate::policy::backfill_fields();
    fields.push(bf[0].clone());
    fields.push(bf[3].clone());
    Arc::new(Schema::new(fields))
}

/// What a run reads and the shapes it writes, settled before any row is
/// read.
struct Plan<'a> {
    ctx: &'a SessionContext,
    archive: &'a source::Archive,
    /// Replay and DLQ rows.
    out_schema: &'a SchemaRef,
    /// The `gaps` view's rows (before the run's columns are added).
    gaps_view_schema: SchemaRef,
    /// `--logs`: the files listed.
    log_files: &'a [crate::source::logs::LogFile],
}

/// This attempt at the run id: where it commits, under which nonce, and
/// the log position it read its ledger at.
struct Attempt<'a> {
    state: &'a State,
    nonce: &'a str,
    based_on: u64,
    /// When the invocation started.
    started: Instant,
}

/// Execute the plan: detect, decide, write, then commit the attempt.
async fn execute(
    plan: &Plan<'_>,
    settings: &RunSettings,
    attempt: &Attempt<'_>,
    sinks: &mut [OpenSink],
    report: &mut Report,
    phases: &Phases,
) -> Result<(), Error> {
    let Plan {
        ctx,
        archive,
        out_schema,
        ..
    } = *plan;
    let Attempt {
        state,
        nonce: run_nonce,
        based_on,
        ..
    } = *attempt;
    let detected_at_us = Utc::now().timestamp_micros();
    let mut policy = Policy {
        max_attempts: settings.max_attempts,
        permanent_errors: settings.permanent_errors.clone(),
        run_id: settings.run_id.clone(),
        detected_at_us,
        on_gap: settings.on_gap,
        on_conflict: settings.on_conflict,
        reconciled: None,
    };

    let mut t = Instant::now();
    let mut lap = |report: &mut Report, name: &str| {
        report
            .phase_ms
            .insert(name.to_string(), t.elapsed().as_millis() as u64);
        t = Instant::now();
    };
    // The logs' one narrow pass, before the archive's: per event, its
    // error-level lines (the candidates' attempts read them).
    let logged = match &settings.scan.logs {
        Some(l) => {
            phases.set("reading the logs");
            let counts = crate::source::logs::error_counts(plan.log_files, l).await?;
            report.logs = Some(crate::report::LogFigures {
                files: plan.log_files.len() as u64,
                lines: counts.lines,
                error_lines: counts.error_lines,
                error_events: counts.by_event.len() as u64,
            });
            detect::logs::use_counts(ctx, &counts).await?;
            lap(report, "logs");
            Some(Arc::new(counts.by_event))
        }
        None => None,
    };
    phases.set("scanning the archive");
    // One narrow pass decides resolution, conflicts and gaps (the views'
    // rules, detect::onepass); the candidates' wide rows are read after.
    let est_rows: u64 = archive
        .files
        .iter()
        .map(|f| f.rows.max(0) as u64)
        .sum::<u64>()
        + archive.stats.kafka_messages;
    let spill_dir = crate::job::spill_dir(&settings.scan);
    // A Parquet archive is read back by position: the fetch decodes the
    // chosen rows alone (detect::onepass::Positions).
    let positions = (archive.files_only && !archive.files.is_empty())
        .then(|| detect::onepass::Positions::new(archive.file_paths()))
        .flatten();
    let positioned = if let Some(positions) = positions {
        let positions = Arc::new(positions);
        let events = crate::source::events_at(
            ctx,
            &settings.scan,
            archive,
            detect::onepass::file_ordinal(&positions),
        )?;
        Some((positions, events))
    } else {
        None
    };
    let shape = detect::onepass::Shape {
        est_rows,
        row_bytes: archive.row_bytes(),
        positioned,
        logged,
    };
    let mut detection = if source::on_cluster(ctx) {
        // The views themselves, planned by the cluster's scheduler.
        Found::Cluster(crate::cluster::Detection::count(ctx, &settings.scan).await?)
    } else {
        Found::Here(Box::new(
            detect::onepass::detect(
                ctx,
                &settings.scan,
                shape,
                &spill_dir,
                plan.gaps_view_schema.clone(),
                phases.rows_bar(est_rows),
            )
            .await
            .map_err(|e| spill_full(e, &spill_dir))?,
        ))
    };
    let mut scan_metrics = detect::ScanMetrics::default();
    scan_metrics.add(detection.narrow_plan());
    let detection_figures = detection.figures();
    report.rows = detection_figures.rows;
    report.events = detection_figures.events;
    report.spilled_bytes = detection_figures.spilled_bytes;
    if settings.scan.detect_conflicts {
        report.conflicts = detection_figures.conflicts;
    }
    lap(report, "scan");
    let narrow_bytes = scan_metrics.bytes_scanned;
    crate::progress::finished(
        "scan",
        phase_time(report, "scan"),
        &crate::progress::Figures {
            rows: Some(report.rows),
            bytes: Some(narrow_bytes),
            events: Some(report.events),
            conflicts: Some(report.conflicts),
            spilled_bytes: Some(report.spilled_bytes),
            ..Default::default()
        },
        &format!(
            "scanned {} rows, {} ({} events, {} conflicts{})",
            human::count(report.rows),
            match &report.cluster {
                Some(c) => format!("on {c}"),
                None => human::bytes(narrow_bytes),
            },
            human::count(report.events),
            human::count(report.conflicts),
            if report.spilled_bytes > 0 {
                format!(", {} spilled", human::bytes(report.spilled_bytes))
            } else {
                String::new()
            }
        ),
    );
    report
        .phase_ms
        .insert("scan_narrow".into(), detection_figures.narrow_ms);
    report
        .phase_ms
        .insert("scan_buckets".into(), detection_figures.buckets_ms);

    // Gaps: to their sink.
    let mut recovered = None;
    if let (true, Some(url)) = (settings.scan.detect_gaps, &settings.scan.recover_from) {
        // Recovery classifies every gap before any is written: the gap
        // rows are held in memory for it (one per gap, narrow).
        phases.set("recovering gaps from Kafka");
        let mut gaps = detection.gaps(ctx).await?;
        let mut all = vec![];
        while let Some(b) = gaps.next().await {
            all.push(b.map_err(|e| spill_full(e, &spill_dir))?);
        }
        let r = recover::recover(ctx, &settings.scan, archive, url, &all).await?;
        let mut at = 0;
        for b in &all {
            report.gaps += b.num_rows() as u64;
            if let Some(c) = b.column_by_name("missing_count") {
                report.add_missing_counts(c.as_ref());
            }
            let classes = recover::recovery_column(&r.classes[at..at + b.num_rows()]);
            at += b.num_rows();
            let b = with_run_columns(b, &settings.run_id, detected_at_us, Some(classes))?;
            for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Gaps) {
                s.sink.write(&b).await?;
            }
        }
        report.recovery = Some(r.counts.clone());
        recovered = Some(r);
    } else if settings.scan.detect_gaps {
        phases.set("writing gaps");
        let mut gaps = detection.gaps(ctx).await?;
        while let Some(b) = gaps.next().await {
            let b = &b.map_err(|e| spill_full(e, &spill_dir))?;
            report.gaps += b.num_rows() as u64;
            if let Some(c) = b.column_by_name("missing_count") {
                report.add_missing_counts(c.as_ref());
            }
            let b = with_run_columns(b, &settings.run_id, detected_at_us, None)?;
            for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Gaps) {
                s.sink.write(&b).await?;
            }
        }
    }
    lap(report, "gaps");
    if settings.scan.detect_gaps {
        crate::progress::finished(
            "gaps",
            phase_time(report, "gaps"),
            &crate::progress::Figures {
                gaps: Some(report.gaps),
                missing_events: Some(report.missing_events),
                ..Default::default()
            },
            &format!(
                "found {} gaps ({} missing events)",
                human::count(report.gaps),
                human::count(report.missing_events)
            ),
        );
    }

    // Silences: a plan of their own, to their sink.
    if let Some(silence) = &settings.silence {
        phases.set("finding silences");
        let df = detect::silences::silences(ctx, silence).await?;
        let mut stream = df.execute_stream().await?;
        while let Some(b) = stream.next().await {
            let b = &b.map_err(|e| spill_full(e, &spill_dir))?;
            report.silences += b.num_rows() as u64;
            let b = with_run_columns(b, &settings.run_id, detected_at_us, None)?;
            for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Silences) {
                s.sink.write(&b).await?;
            }
        }
        lap(report, "silences");
    }
    // Contradicted events: a plan of their own (the events the logs name,
    // their done rows, the logs' later error lines), to their sink.
    if settings.scan.logs.is_some() {
        phases.set("finding contradicted events");
        let df = detect::logs::contradicted(ctx, &settings.scan).await?;
        let mut stream = df.execute_stream().await?;
        while let Some(b) = stream.next().await {
            let b = &b.map_err(|e| spill_full(e, &spill_dir))?;
            report.contradicted += b.num_rows() as u64;
            let b = with_run_columns(b, &settings.run_id, detected_at_us, None)?;
            for s in sinks
                .iter_mut()
                .filter(|s| s.kind == SinkKind::Contradicted)
            {
                s.sink.write(&b).await?;
            }
        }
        lap(report, "contradicted");
    }
    // Volume anomalies: the flagged buckets, to their sink.
    if let Some(volume) = &settings.volume {
        phases.set("finding volume anomalies");
        detect::volume::count(ctx, volume).await?;
        let df = detect::volume::anomalies(ctx, volume, false).await?;
        let mut stream = df.execute_stream().await?;
        while let Some(b) = stream.next().await {
            let b = &b.map_err(|e| spill_full(e, &spill_dir))?;
            report.anomalies += b.num_rows() as u64;
            let b = with_run_columns(b, &settings.run_id, detected_at_us, None)?;
            for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Anomalies) {
                s.sink.write(&b).await?;
            }
        }
        lap(report, "anomalies");
    }
    // Reconciliation: the keys that disagree to their sink; the keys whose
    // downstream already reflects their unresolved events hold those
    // replays (the policy's `reconciled`).
    if let Some(r) = &settings.reconcile {
        phases.set("reconciling with the downstream's snapshot");
        let judged = crate::reconcile::judge(ctx, r, &settings.scan)
            .await
            .map_err(|e| match e {
                Error::DataFusion(d) => spill_full(*d, &spill_dir),
                other => other,
            })?;
        let held = crate::reconcile::explained_events(ctx, judged.table.clone()).await?;
        let mut shown = crate::reconcile::shown(judged.table.clone(), false)?
            .execute_stream()
            .await?;
        while let Some(b) = shown.next().await {
            let b = with_run_columns(&b?, &settings.run_id, detected_at_us, None)?;
            for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Reconcile) {
                s.sink.write(&b).await?;
            }
        }
        report.reconcile = Some(judged.counts.clone());
        policy.reconciled = Some(Arc::new(held));
        lap(report, "reconcile");
    }

    // Candidates → policy → replay / DLQ / ledger.
    phases.set("deciding");
    let mut ledger = if settings.dry_run {
        None
    } else {
        Some(state.ledger_writer(&settings.run_id, run_nonce)?)
    };
    let mut decisions = Decisions::default();
    // A point of the test build (not in `failpoint::POINTS`: nothing is
    // written yet, so a crash here is a crash during the scan): between the
    // two scans, where a test rewrites the archive under the run.
    failpoint::hit("between_scans").await?;
    if detection_figures.generations > 1 {
        tracing::info!(
            generations = detection_figures.generations,
            "the table of {} unresolved events is larger than half the memory pool: the fetch reads the archive in {} passes, one per part of it",
            human::count(detection_figures.candidates),
            detection_figures.generations
        );
    }
    if let Some(r) = &recovered {
        // Only a gap that stays open holds its key: the barrier moves to
        // the first seq the topic did not give back.
        if settings.scan.gap_barrier {
            detection
                .here()?
                .reset_first_gaps(r.first_missing.iter().cloned())?;
        }
        report.events += r.decided();
    }
    let mut fetched = detection.fetch(ctx).await?;
    if let Some(r) = &recovered
        && r.decided() > 0
    {
        // The recovered events join the archive's candidates before the one
        // sort, so that a key's replays reach the sinks in seq order.
        let (schema, rows) = r.candidates(fetched.schema().as_arrow(), detection.here()?)?;
        let table = datafusion::datasource::MemTable::try_new(schema, vec![rows])?;
        fetched = fetched.union(ctx.read_table(Arc::new(table))?)?;
    }
    let candidates = detect::candidates_from(fetched, &settings.scan, archive)?;
    // The fetch's own settings (its batch size, one sort): see fetch().
    let task = candidates.task_ctx();
    let plan = candidates.create_physical_plan().await?;
    let mut stream = execute_stream(plan.clone(), Arc::new(task))?;
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| spill_full(e, &spill_dir))?;
        let d = policy.decide(&b)?;
        decisions.add(&d.counts);
        phases.set(format!(
            "deciding: {} replayed, {} dead-lettered",
            decisions.replayed, decisions.dead_lettered
        ));
        for s in sinks.iter_mut() {
            match s.kind {
                SinkKind::Replay => s.sink.write(&d.replay).await?,
                SinkKind::Dlq => s.sink.write(&d.dlq).await?,
                SinkKind::Gaps
                | SinkKind::Silences
                | SinkKind::Anomalies
                | SinkKind::Contradicted
                | SinkKind::State
                | SinkKind::Inferred
                | SinkKind::Reconcile => {}
            }
        }
        if let Some(l) = ledger.as_mut() {
            l.write(&d.ledger).await?;
        }
    }
    detection.check_fetched()?;
    scan_metrics.merge(&detection.fetch_metrics()?);
    if !archive.undecodable.is_empty() {
        phases.set("dead-lettering undecodable Kafka messages");
        let (dlq, entries, skipped) =
            undecodable_rows(ctx, settings, archive, out_schema, detected_at_us).await?;
        report.undecodable_dead_lettered = dlq.num_rows() as u64;
        report.undecodable_skipped = skipped;
        for s in sinks.iter_mut().filter(|s| s.kind == SinkKind::Dlq) {
            s.sink.write(&dlq).await?;
        }
        if let Some(l) = ledger.as_mut() {
            l.write(&entries).await?;
        }
    }
    lap(report, "decide");
    report.bytes_scanned = scan_metrics.bytes_scanned;
    crate::progress::finished(
        "decide",
        phase_time(report, "decide"),
        &crate::progress::Figures {
            rows: Some(decisions.replayed + decisions.dead_lettered),
            bytes: Some(scan_metrics.bytes_scanned.saturating_sub(narrow_bytes)),
            replayed: Some(decisions.replayed),
            dead_lettered: Some(decisions.dead_lettered),
            ..Default::default()
        },
        &format!(
            "decided: {} to replay, {} to dead-letter (read {} of their rows)",
            human::count(decisions.replayed),
            human::count(decisions.dead_lettered),
            human::bytes(scan_metrics.bytes_scanned.saturating_sub(narrow_bytes))
        ),
    );
    report.row_groups_pruned = scan_metrics.row_groups_pruned;
    report.replayed = decisions.replayed;
    report.dead_lettered = decisions.dead_lettered;
    report.skipped_dead_lettered = decisions.skipped_dead_lettered;
    report.dead_lettered_by_reason = decisions.dead_lettered_by_reason.clone();
    report.held = decisions.held;
    report.held_by_reason = decisions.held_by_reason.clone();
    report.resolved = report.events.saturating_sub(decisions.candidates);
    if !report.balances() {
        return Err(Error::Internal(format!(
            "the report does not balance: {}",
            report.balance_equation()
        )));
    }
    if settings.dry_run {
        for (kind, rows) in [
            (SinkKind::Replay, report.replayed),
            (
                SinkKind::Dlq,
                report.dead_lettered + report.undecodable_dead_lettered,
            ),
            (SinkKind::Gaps, report.gaps),
            (SinkKind::Silences, report.silences),
            (SinkKind::Anomalies, report.anomalies),
            (
                SinkKind::Reconcile,
                report.reconcile.as_ref().map_or(0, |c| c.disagreeing()),
            ),
            (SinkKind::Contradicted, report.contradicted),
        ] {
            if let Some(r) = report.outputs.get_mut(kind.name()) {
                r.rows = rows;
            }
        }
        return Ok(());
    }

    failpoint::hit("after_write").await?;

    commit::commit_and_publish(
        state,
        &commit::Identity::of_run(settings, attempt.started),
        sinks,
        ledger,
        based_on,
        run_nonce,
        report,
        phases,
    )
    .await
}

/// Dead letters for the Kafka messages that did not decode, except those
/// an earlier committed run already dead-lettered (the ledger, read here;
/// the rows themselves are the policy's: [`crate::policy::undecodable`]).
async fn undecodable_rows(
    ctx: &SessionContext,
    settings: &RunSettings,
    archive: &source::Archive,
    out_schema: &SchemaRef,
    detected_at_us: i64,
) -> Result<(RecordBatch, RecordBatch, u64), Error> {
    let done: std::collections::BTreeSet<String> = {
        let b = ctx
            .sql("SELECT event_id FROM ledger WHERE dead_lettered AND event_id LIKE 'kafka://%'")
            .await?
            .collect()
            .await?;
        b.iter()
            .flat_map(|b| {
                let c = b.column(0).as_string::<i32>().clone();
                (0..c.len())
                    .map(move |i| c.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // A shard dead-letters the messages whose ids are its own (they have
    // no key: crate::shard).
    let shard = settings.scan.shard;
    let ours = |id: &str| shard.is_none_or(|s| s.holds(id.as_bytes()));
    let mine: Vec<&(String, crate::kafka::source::Undecodable)> = archive
        .undecodable
        .iter()
        .filter(|(url, u)| ours(&crate::policy::undecodable_id(url, u)))
        .collect();
    let todo: Vec<(&str, &crate::kafka::source::Undecodable)> = mine
        .iter()
        .copied()
        .filter(|(url, u)| !done.contains(&crate::policy::undecodable_id(url, u)))
        .map(|(url, u)| (url.as_str(), u))
        .collect();
    let skipped = (mine.len() - todo.len()) as u64;
    let (dlq, ledger) = crate::policy::undecodable(
        out_schema,
        &todo,
        &settings.scan.columns,
        &settings.scan.kafka.clone().unwrap_or_default(),
        &settings.run_id,
        detected_at_us,
    )?;
    Ok((dlq, ledger, skipped))
}

/// Append the recovery class (with `--recover-from`), `backfill_run_id`
/// and `backfill_detected_at` to a gaps batch.
fn with_run_columns(
    b: &RecordBatch,
    run_id: &str,
    detected_at_us: i64,
    recovery: Option<ArrayRef>,
) -> Result<RecordBatch, Error> {
    let schema = gaps_output_schema(b.schema().as_ref(), recovery.is_some());
    let n = b.num_rows();
    let mut cols: Vec<ArrayRef> = b.columns().to_vec();
    cols.extend(recovery);
    cols.push(Arc::new(StringArray::from(vec![run_id; n])));
    cols.push(Arc::new(
        TimestampMicrosecondArray::from(vec![detected_at_us; n]).with_timezone("UTC"),
    ));
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// A query-engine error from a full disk is the spill folder's: nothing
/// else the engine writes (the sinks and the state name their own
/// targets). DataFusion's sort said only `Arrow error: Io error: IO error:
/// No space left on device`, naming no file, folder or setting.
fn spill_full(e: datafusion::error::DataFusionError, dir: &std::path::Path) -> Error {
    let text = e.to_string();
    // ENOSPC, EDQUOT: in an io::Error of the chain, or only in its text
    // (DataFusion formats some into a message).
    let full = |s: &str| s.contains("(os error 28)") || s.contains("(os error 122)");
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut is_full = full(&text);
    let mut text = text;
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(28 | 122))
        {
            is_full = true;
            if !full(&text) {
                text = format!("{text}: {io}");
            }
        }
        cause = c.source();
    }
    if !is_full {
        return e.into();
    }
    Error::Io {
        what: format!(
            "the spill folder {} (--spill-dir; default the system temp dir)",
            dir.display()
        ),
        message: format!(
            "full: {}; give it more room or point --spill-dir at a larger disk",
            text.replace('\n', " ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sort's spill write failing on a full disk names the folder and
    /// the flag (DataFusion's error named neither); other errors pass.
    #[test]
    fn a_full_disk_is_the_spill_folder() {
        let full = datafusion::error::DataFusionError::ArrowError(
            Box::new(arrow::error::ArrowError::IoError(
                "IO error".into(),
                std::io::Error::from_raw_os_error(28),
            )),
            None,
        );
        let e = spill_full(full, std::path::Path::new("/mnt/spill"));
        let line = e.line();
        assert!(
            line.starts_with("the spill folder /mnt/spill (--spill-dir")
                && line.contains("full: ")
                && line.contains("os error 28"),
            "{line}"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_RUNTIME);
        let other = datafusion::error::DataFusionError::Execution("boom".into());
        let e = spill_full(other, std::path::Path::new("/mnt/spill"));
        assert!(!e.line().contains("spill folder"), "{}", e.line());
    }
}
