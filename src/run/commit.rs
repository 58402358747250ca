//! The end of a run: the commit protocol (ARCHITECTURE.md), and the three
//! checks it makes before the scan — a run id committed already (the same
//! settings end as that run ended; other settings are refused), a report
//! file that can be written, and an earlier attempt at the same run id that
//! only needs committing. This module never decides anything: it makes what
//! the run decided durable, then committed, then visible, in that order.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;

use super::OpenSink;
use crate::error::Error;
use crate::failpoint;
use crate::job::RunSettings;
use crate::report::Report;
use crate::sink::SinkReceipt;
use crate::state::{LedgerWriter, Manifest, Outcome, State};

/// Whose commit this is and what decided it: everything the commit
/// protocol needs to know about an attempt besides its outputs. `run` and
/// `redrive` each build one, so that both go through one protocol (one
/// prepare, one create-only log entry, one publish, one recovery).
pub(crate) struct Identity {
    pub run_id: String,
    /// The settings recorded with the entry (no secrets), which a rerun of
    /// the run id must match: [`decision_settings`] for a run.
    pub settings: serde_json::Value,
    pub fail_on_dlq: bool,
    pub storage: crate::location::StorageSettings,
    pub kafka: Option<crate::kafka::KafkaSettings>,
    /// When the invocation started: the committed report's `elapsed_ms`
    /// is the time up to its commit (what `runs list` shows).
    pub started: Instant,
}

impl Identity {
    pub(crate) fn of_run(settings: &RunSettings, started: Instant) -> Identity {
        Identity {
            run_id: settings.run_id.clone(),
            settings: decision_settings(settings),
            fail_on_dlq: settings.fail_on_dlq,
            storage: settings.scan.storage.clone(),
            kafka: settings.scan.kafka.clone(),
            started,
        }
    }
}

/// What kind of entry recorded `settings`: `redrive`, or `run` (entries of
/// runs carry no `kind`).
fn kind_of(settings: &serde_json::Value) -> &str {
    settings
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("run")
}

/// What a location means, not how it was spelled: a local path resolved
/// (absolute, `.` and `..` gone, no trailing `/`, `file://` or not), a
/// store URL without its trailing `/`; Kafka URLs and `-` as written. A
/// URL with a query is refused before anything is committed; in the
/// message of a rerun refused for other settings it is shown without it.
pub(super) fn location_meaning(s: &str, storage: &crate::location::StorageSettings) -> String {
    // Its query is settings (the stream, maxlen), not a signature.
    if crate::sink::redis::is_redis(s) {
        return crate::sink::redis::shown(s);
    }
    if let Some(shown) = crate::redact::hide_query(s) {
        return shown;
    }
    if crate::sink::outside_the_lake(s) {
        return crate::redact::url(s);
    }
    match crate::location::resolve(s, storage) {
        Ok(l) if l.is_local => l.display_path(&l.prefix),
        _ => crate::redact::url(s.trim_end_matches('/')),
    }
}

/// What decides a run's outcome, recorded with it (no secrets: locations
/// are redacted, and storage and Kafka settings are left out). A rerun of
/// the run id with other values is another run: it must not take over an
/// earlier attempt's outputs, and a committed run id is not silently taken
/// as done for other settings.
pub(super) fn decision_settings(settings: &RunSettings) -> serde_json::Value {
    let scan = &settings.scan;
    let columns: BTreeMap<&str, &str> = scan.columns.pairs().into_iter().collect();
    let meaning = |s: &str| location_meaning(s, &scan.storage);
    let out = settings
        .out
        .as_deref()
        .and_then(|o| crate::location::resolve(o, &scan.storage).ok());
    // A sink left to its default and the same folder given explicitly are
    // one setting.
    let sink = |given: &Option<String>, kind: crate::sink::SinkKind| -> Option<String> {
        match (given, &out) {
            (Some(t), _) => Some(meaning(t)),
            (None, Some(o)) => Some(meaning(&crate::sink::default_target(o, kind))),
            (None, None) => None,
        }
    };
    // Sets, not lists: order and repeats do not change a decision.
    let set = |v: &[String]| -> Vec<String> {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    };
    let sources: Vec<String> = scan.sources.iter().map(|s| meaning(s)).collect();
    let mut v = serde_json::json!({
        "sources": set(&sources),
        "from": scan.from.map(|t| t.to_rfc3339()),
        "to": scan.to.map(|t| t.to_rfc3339()),
        "columns": columns,
        "done_statuses": set(&scan.done_statuses),
        "detect_gaps": scan.detect_gaps,
        "detect_conflicts": scan.detect_conflicts,
        "max_attempts": settings.max_attempts,
        "permanent_errors": set(&settings.permanent_errors),
        "out": settings.out.as_deref().map(meaning),
        "replay_sink": sink(&settings.replay_sink, crate::sink::SinkKind::Replay),
        "dlq_sink": sink(&settings.dlq_sink, crate::sink::SinkKind::Dlq),
        "gaps_sink": sink(&settings.gaps_sink, crate::sink::SinkKind::Gaps),
        "shard": scan.shard.map(|s| s.to_string()),
        // Entries written before the barriers lack these: only keys both
        // sides record are compared ([`differences`]).
        "on_gap": settings.on_gap.name(),
        "on_conflict": settings.on_conflict.name(),
        "recover_from": scan.recover_from.as_deref().map(crate::redact::url),
    });
    // Only when asked: the settings of runs without them stay as they were.
    if let (Some(s), Some(map)) = (&settings.silence, v.as_object_mut()) {
        map.insert(
            "silence".into(),
            serde_json::json!({
                "by": s.by,
                "threshold": format!("{:?}", s.threshold),
                "sink": sink(&settings.silences_sink, crate::sink::SinkKind::Silences),
            }),
        );
    }
    // Logs change decisions (attempts): a rerun with other logs or another
    // mapping is another run.
    if let (Some(l), Some(map)) = (&scan.logs, v.as_object_mut()) {
        map.insert(
            "logs".into(),
            serde_json::json!({
                "paths": l.paths.iter().map(|p| meaning(p)).collect::<Vec<_>>(),
                "fields": l.fields,
                "error_levels": l.error_levels,
                "sink": sink(&settings.contradicted_sink, crate::sink::SinkKind::Contradicted),
            }),
        );
    }
    if let (Some(s), Some(map)) = (&settings.volume, v.as_object_mut()) {
        map.insert(
            "volume".into(),
            serde_json::json!({
                "by": s.by,
                "bucket_us": s.bucket_us,
                "threshold": s.threshold,
                "sink": sink(&settings.anomalies_sink, crate::sink::SinkKind::Anomalies),
            }),
        );
    }
    if let (Some(r), Some(map)) = (&settings.reconcile, v.as_object_mut()) {
        map.insert(
            "reconcile".into(),
            serde_json::json!({
                "snapshot": crate::redact::url(&r.snapshot),
                "expected": r.expected,
                "as_of": r.as_of.map(|t| t.to_rfc3339()),
                "tolerance": r.tolerance,
                "sink": sink(&settings.reconcile_sink, crate::sink::SinkKind::Reconcile),
            }),
        );
    }
    v
}

/// A rerun of a committed run id: nothing is written, and the run ends as
/// the committed run ended (3 stays 3 under `--fail-on-dlq`), so that a
/// retried or cleared scheduler task tells the same story as the first. The
/// same id with other settings (another window, policy, sinks, or
/// `--fail-on-dlq`) is another run under a taken name: refused, exit 2,
/// naming what differs. An entry without recorded settings (written by an
/// older version) is taken as done whatever this run's settings, as before;
/// without a recorded outcome, the exit code follows this run's
/// `--fail-on-dlq` and the committed figures, as before.
pub(super) fn committed_again(m: &Manifest, id: &Identity) -> Result<Report, Error> {
    let mut report: Report = serde_json::from_value(m.report.clone()).unwrap_or_default();
    report.already_committed = true;
    if m.settings.is_null() && kind_of(&id.settings) == "run" {
        return Ok(report);
    }
    // A run and a redrive share no settings worth comparing: the id is
    // simply taken.
    let (kind_then, kind) = (kind_of(&m.settings), kind_of(&id.settings));
    if kind_then != kind {
        return Err(Error::Usage(format!(
            "run id {} is taken by a committed {kind_then}; give this {kind} another run id",
            id.run_id
        )));
    }
    let theirs = fingerprint(&m.settings, m.outcome.map(|o| o.fail_on_dlq));
    let ours = fingerprint(&id.settings, Some(id.fail_on_dlq));
    let diffs = differences(&theirs, &ours);
    if !diffs.is_empty() {
        let (then, now): (Vec<String>, Vec<String>) = diffs.into_iter().unzip();
        return Err(Error::Usage(format!(
            "run id {} was committed with {}; this {kind} has {}; rerun it with the committed settings, or give these settings a new run id",
            id.run_id,
            then.join(", "),
            now.join(", ")
        )));
    }
    if let Some(o) = m.outcome {
        // `main` derives the exit code from the report and the flag, both
        // the committed run's here: they must give the recorded code.
        if report.exit_code_under(id.fail_on_dlq) != o.exit_code {
            return Err(Error::Internal(format!(
                "run id {} was committed with exit code {}, which its recorded report does not reproduce",
                id.run_id, o.exit_code
            )));
        }
        report.exit_code = Some(o.exit_code);
    }
    Ok(report)
}

/// One backfill (one run id) is split one way: a run of `ID` as shard I/N
/// is refused (exit 2) when `ID` was committed unsharded or as shards of
/// another N, and an unsharded `ID` when shards of it were; those runs
/// decided their events already, and a retry with another shard count
/// would decide them again as a later attempt.
pub(super) fn check_split(
    snapshot: &crate::state::Snapshot,
    settings: &RunSettings,
) -> Result<(), Error> {
    let shard = settings.scan.shard;
    let base = match shard {
        Some(s) => settings
            .run_id
            .strip_suffix(&s.run_id_suffix())
            .unwrap_or(&settings.run_id),
        None => settings.run_id.as_str(),
    };
    // The shard count of a committed id of this backfill (None: unsharded).
    let split_of = |id: &str| -> Option<Option<u32>> {
        if id == base {
            return Some(None);
        }
        let rest = id.strip_prefix(base)?.strip_prefix("-shard-")?;
        let (i, n) = rest.split_once("-of-")?;
        let (_, n) = (i.parse::<u32>().ok()?, n.parse::<u32>().ok()?);
        Some(Some(n))
    };
    let ours = shard.map(|s| s.count);
    let other = snapshot
        .runs()
        .filter_map(|m| split_of(&m.run_id).map(|n| (m.run_id.as_str(), n)))
        .find(|(_, n)| *n != ours);
    let Some((id, n)) = other else {
        return Ok(());
    };
    let then = match n {
        Some(n) => format!("as {n} shards ({id})"),
        None => "unsharded".to_string(),
    };
    let now = match shard {
        Some(s) => format!("this run is shard {s}"),
        None => "this run is unsharded".to_string(),
    };
    let fix = match n {
        Some(n) => format!("rerun it with --shard I/{n}"),
        None => "rerun it without --shard".to_string(),
    };
    Err(Error::Usage(format!(
        "run id {base} was committed {then}; {now}: {fix}, or give this backfill a new run id"
    )))
}

/// What a rerun of a committed run id must match, key by key: the decision
/// settings, and `--fail-on-dlq` where the entry recorded its outcome.
fn fingerprint(
    settings: &serde_json::Value,
    fail_on_dlq: Option<bool>,
) -> BTreeMap<String, serde_json::Value> {
    let mut out: BTreeMap<String, serde_json::Value> = settings
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    if let Some(f) = fail_on_dlq {
        out.insert("fail_on_dlq".into(), f.into());
    }
    out
}

/// The settings [`decision_settings`] records only when they are asked
/// for (`--logs`, silences, volume anomalies, reconciliation), each so
/// since the version that added it: an entry without one ran without it,
/// whichever version wrote it.
const RECORDED_WHEN_ASKED: [&str; 4] = ["silence", "logs", "volume", "reconcile"];

/// The settings that differ, as (committed, this run) phrases written as
/// the flags that set them. Which keys are compared:
/// - a key both sides record, always;
/// - a key of [`RECORDED_WHEN_ASKED`] one side lacks: absent is off, so
///   a rerun that adds or drops logs (or silences, ...) differs;
/// - any other key one side lacks is not compared: the others are recorded
///   always (null when unset), so an entry without one was written before
///   the key existed (`on_gap`, `fail_on_dlq`'s outcome), and its value
///   then is unknown, not different.
fn differences(
    theirs: &BTreeMap<String, serde_json::Value>,
    ours: &BTreeMap<String, serde_json::Value>,
) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut keys: Vec<&String> = theirs.keys().chain(ours.keys()).collect();
    keys.sort();
    keys.dedup();
    let off = serde_json::Value::Null;
    for key in keys {
        let (then, now) = match (theirs.get(key), ours.get(key)) {
            (Some(t), Some(n)) => (t, n),
            (t, n) if RECORDED_WHEN_ASKED.contains(&key.as_str()) => {
                (t.unwrap_or(&off), n.unwrap_or(&off))
            }
            _ => continue,
        };
        if then == now {
            continue;
        }
        match (key.as_str(), then.as_object(), now.as_object()) {
            // One phrase per remapped column, not the whole mapping.
            ("columns", Some(t), Some(n)) => {
                let mut names: Vec<&String> = t.keys().chain(n.keys()).collect();
                names.sort();
                names.dedup();
                for name in names {
                    let (a, b) = (t.get(name), n.get(name));
                    if a != b {
                        let show = |v: Option<&serde_json::Value>| match v.and_then(|v| v.as_str())
                        {
                            Some(s) => format!("--column {name}={s}"),
                            None => format!("no --column {name}"),
                        };
                        out.push((show(a), show(b)));
                    }
                }
            }
            _ => out.push((as_flag(key, then), as_flag(key, now))),
        }
    }
    out
}

/// One setting written as the flag that sets it: `--to
/// 2026-11-30T00:00:00Z`, `no --to`, `--no-gaps`, `--source a --source b`.
fn as_flag(key: &str, value: &serde_json::Value) -> String {
    use serde_json::Value;
    let flag = match key {
        "sources" => "--source",
        "from" => "--from",
        "to" => "--to",
        "done_statuses" => "--done-status",
        "max_attempts" => "--max-attempts",
        "permanent_errors" => "--permanent-error",
        "out" => "--out",
        "replay_sink" => "--replay-sink",
        "dlq_sink" => "--dlq-sink",
        "gaps_sink" => "--gaps-sink",
        "fail_on_dlq" => "--fail-on-dlq",
        "on_gap" => "--on-gap",
        "on_conflict" => "--on-conflict",
        "recover_from" => "--recover-from",
        "shard" => "--shard",
        "dlq" => "--dlq",
        "where" => "--where",
        "again" => "--again",
        // Switched on as a whole: shown as off, or by the recorded value.
        "logs" | "silence" | "volume" | "reconcile" if value.is_null() => {
            let flag = match key {
                "logs" => "--logs",
                "silence" => "--silences",
                "volume" => "--anomalies",
                _ => "--reconcile-snapshot",
            };
            return format!("no {flag}");
        }
        // Negative flags: the setting is on unless the flag is given.
        "detect_gaps" | "detect_conflicts" => {
            let flag = if key == "detect_gaps" {
                "--no-gaps"
            } else {
                "--no-conflicts"
            };
            return match value.as_bool() {
                Some(false) => flag.to_string(),
                _ => format!("no {flag}"),
            };
        }
        other => return format!("{other} = {value}"),
    };
    let one = |v: &Value| match v.as_str() {
        Some(s) if key == "from" || key == "to" => {
            // As a user writes it (`Z`), not as stored (`+00:00`).
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| {
                    t.with_timezone(&Utc)
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                })
                .unwrap_or_else(|_| s.to_string())
        }
        Some(s) => s.to_string(),
        None => v.to_string(),
    };
    match value {
        Value::Null => format!("no {flag}"),
        Value::Bool(true) => flag.to_string(),
        Value::Bool(false) => format!("no {flag}"),
        Value::Array(items) if items.is_empty() => format!("no {flag}"),
        Value::Array(items) => items
            .iter()
            .map(|v| format!("{flag} {}", one(v)))
            .collect::<Vec<_>>()
            .join(" "),
        v => format!("{flag} {}", one(v)),
    }
}

/// A commit whose outcome is unknown (the store failed and the entry could
/// not be read back): nothing may be deleted, the run may be committed.
fn commit_unknown(run_id: &str, e: crate::state::StateError) -> Error {
    Error::CommitUnknown {
        run_id: run_id.to_string(),
        message: e.to_string(),
    }
}

/// A failure after the commit: the run stays committed, and what is left
/// undone the next run or `state gc` finishes.
fn committed(run_id: &str, e: Error) -> Error {
    Error::Committed {
        run_id: run_id.to_string(),
        message: e.to_string(),
    }
}

/// Finish every sink, close the ledger, prepare, precommit, append the log
/// entry, publish.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit_and_publish(
    state: &State,
    id: &Identity,
    sinks: &mut [OpenSink],
    ledger: Option<LedgerWriter>,
    based_on: u64,
    run_nonce: &str,
    report: &mut Report,
    phases: &super::Phases,
) -> Result<(), Error> {
    let t = Instant::now();
    // Commit protocol: finish all → ledger → prepare → precommit (Kafka
    // transactions) → log entry → publish all.
    phases.set("flushing outputs");
    let mut outputs: BTreeMap<String, SinkReceipt> = BTreeMap::new();
    let mut publish = vec![];
    let mut delivered = vec![];
    for s in sinks.iter_mut() {
        let flushed = Instant::now();
        let mut r = s.sink.finish().await?;
        let kind = s.kind.name();
        let files = r.outputs.len() as u64;
        let place = crate::human::location(&r.target);
        crate::progress::finished(
            "write",
            flushed.elapsed(),
            &crate::progress::Figures {
                rows: Some(r.rows),
                files: Some(files),
                sink: Some(kind),
                location: Some(&place),
                ..Default::default()
            },
            &format!(
                "{kind} sink: {} to {place} ({})",
                crate::human::plural(r.rows, "row"),
                crate::human::plural(files, "output")
            ),
        );
        if let Some(p) = r.staged.take() {
            publish.push(p);
        }
        if let Some(d) = r.delivered.take() {
            delivered.push(d);
        }
        outputs.insert(s.kind.name().to_string(), r);
    }
    failpoint::hit("after_finish").await?;
    report.outputs = outputs.clone();
    let ledger_file = match ledger {
        Some(l) => vec![l.finish().await?],
        None => vec![],
    };
    failpoint::hit("after_ledger").await?;
    phases.set("committing");
    // Decided here, committed with the run: a rerun of the id ends the same.
    let outcome = Outcome {
        exit_code: report.exit_code_under(id.fail_on_dlq),
        fail_on_dlq: id.fail_on_dlq,
    };
    report.exit_code = Some(outcome.exit_code);
    report.elapsed_ms = id.started.elapsed().as_millis() as u64;
    let mut manifest = Manifest {
        format_version: crate::state::FORMAT_VERSION,
        seq: 0,
        based_on,
        run_id: id.run_id.clone(),
        nonce: run_nonce.to_string(),
        committed_at: Utc::now(),
        ledger_files: ledger_file,
        outputs,
        publish,
        report: serde_json::to_value(&*report).unwrap_or_default(),
        delivered,
        settings: id.settings.clone(),
        outcome: Some(outcome),
    };
    // Everything is durable and every message acknowledged: a rerun after
    // a crash from here on commits this entry instead of sending again.
    state.prepare(&manifest).await?;
    failpoint::hit("after_prepare").await?;
    for s in sinks.iter_mut() {
        s.sink.precommit().await?;
    }
    failpoint::hit("after_precommit").await?;
    failpoint::hit("before_commit").await?;
    let seq = match state.commit(&mut manifest).await {
        Ok(seq) => seq,
        Err(e) if e.is_conflict() => return Err(e.into()),
        // The entry may or may not be there: deleting the staged files now
        // could take the outputs of a committed run.
        Err(e) => return Err(commit_unknown(&id.run_id, e)),
    };
    report
        .phase_ms
        .insert("commit".into(), t.elapsed().as_millis() as u64);
    crate::progress::finished(
        "commit",
        t.elapsed(),
        &crate::progress::Figures {
            seq: Some(seq),
            ..Default::default()
        },
        &format!("committed run {} at log position {seq}", id.run_id),
    );
    let t = Instant::now();

    // Committed. From here on a failure cannot take the run back; what is
    // left undone the next run or `state gc` finishes from the log entry.
    phases.set("publishing outputs");
    let published = async {
        failpoint::hit("after_commit").await?;
        for s in sinks.iter_mut() {
            s.sink.publish().await?;
        }
        failpoint::hit("after_publish").await?;
        state.mark_published(seq).await?;
        failpoint::hit("after_published_marker").await?;
        Ok::<(), Error>(())
    }
    .await;
    published.map_err(|e| committed(&id.run_id, e))?;
    state.forget_attempt(&id.run_id, run_nonce).await;
    report
        .phase_ms
        .insert("publish".into(), t.elapsed().as_millis() as u64);
    crate::progress::finished(
        "publish",
        t.elapsed(),
        &crate::progress::Figures::default(),
        "published the outputs",
    );
    Ok(())
}

/// An earlier attempt at this run id that had delivered everything (every
/// file durable, every Kafka message acknowledged, its entry prepared) and
/// died before its commit: commit its entry now rather than send its
/// messages again. A transactional attempt counts only if its transaction
/// is visible to `read_committed` consumers; otherwise the broker aborted
/// it, and the run starts afresh. An attempt that can no longer commit (a
/// run acted on its events since, or gc fenced it) is dropped: its messages
/// were delivered, and the fresh run is at-least-once for them.
pub(super) async fn recover_prepared(
    state: &State,
    id: &Identity,
) -> Result<Option<Report>, Error> {
    let kafka = id.kafka.clone().unwrap_or_default();
    for prepared in state.prepared(&id.run_id).await? {
        if prepared.settings != id.settings {
            // Prepared for other settings (another window, other sinks):
            // its outputs are not this run's. Its Kafka messages, if any,
            // were delivered: at-least-once for them.
            tracing::warn!(
                "{}",
                crate::redact::line(&format!(
                    "attempt {} of run '{}' was prepared with other settings; running afresh",
                    prepared.nonce, prepared.run_id
                ))
            );
            state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
            continue;
        }
        let printed = prepared
            .outputs
            .values()
            .any(|r| r.target == "-" && r.rows > 0);
        if printed {
            // Its stdout rows were never printed (they are printed after the
            // commit): committing it would mark them done and print nothing.
            // Run again and print them; its Kafka messages, if any, were
            // delivered (at-least-once for them).
            state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
            continue;
        }
        let mut visible = true;
        for d in prepared
            .delivered
            .iter()
            .filter(|d| d.transactional && d.rows > 0)
        {
            visible &= crate::kafka::has_committed_messages(
                &d.target,
                &kafka,
                &d.start_offsets,
                &id.run_id,
            )
            .await
            .map_err(crate::source::SourceError::from)?;
        }
        if !visible {
            state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
            continue;
        }
        let mut manifest = prepared.clone();
        // The outputs are the attempt's; how the run ends is this
        // invocation's (`--fail-on-dlq` decides nothing about outputs).
        let mut figures: Report =
            serde_json::from_value(manifest.report.clone()).unwrap_or_default();
        let outcome = Outcome {
            exit_code: figures.exit_code_under(id.fail_on_dlq),
            fail_on_dlq: id.fail_on_dlq,
        };
        figures.exit_code = Some(outcome.exit_code);
        manifest.report = serde_json::to_value(&figures).unwrap_or_default();
        manifest.outcome = Some(outcome);
        // `commit` sets the entry's position, which publishing marks.
        match state.commit(&mut manifest).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {
                tracing::warn!(
                    "{}",
                    crate::redact::line(&format!(
                        "attempt {} of run '{}' had delivered its outputs but cannot commit ({e}); running again",
                        prepared.nonce, prepared.run_id
                    ))
                );
                state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
                continue;
            }
            Err(e) => return Err(commit_unknown(&id.run_id, e)),
        };
        state
            .publish_entry(&manifest, &id.storage)
            .await
            .map_err(|e| committed(&id.run_id, e.into()))?;
        state
            .forget_attempt(&prepared.run_id, &prepared.nonce)
            .await;
        let mut report: Report =
            serde_json::from_value(manifest.report.clone()).unwrap_or_default();
        report.recovered_attempt = Some(prepared.nonce.clone());
        return Ok(Some(report));
    }
    Ok(None)
}

/// Fail before the scan when the report file cannot be written: its folder
/// is missing or read-only. Probed with a file of our own, never the report.
pub(super) fn check_writable(report: &str) -> Result<(), Error> {
    // `--report -`: stdout, which main checks against the sinks.
    if report == "-" {
        return Ok(());
    }
    let path = std::path::Path::new(report);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let probe = dir.join(format!(".backfill-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            if path.is_dir() {
                return Err(Error::Usage(format!("--report {report}: is a folder")));
            }
            Ok(())
        }
        Err(e) => Err(Error::Usage(format!(
            "--report {report}: cannot write in {}: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A key only one side records (a later version's addition) is unknown,
    /// not different; values read as the flags a user types.
    #[test]
    fn differences_are_flags_over_the_keys_both_record() {
        let then = fingerprint(
            &json!({"to": "2026-11-30T00:00:00+00:00", "detect_gaps": true,
                    "columns": {"key": "order_id", "seq": "order_seq"}}),
            None,
        );
        let now = fingerprint(
            &json!({"to": "2026-12-01T00:00:00+00:00", "detect_gaps": false,
                    "columns": {"key": "order_id", "seq": "seq"}, "new_key": 1}),
            Some(true),
        );
        assert_eq!(
            differences(&then, &now),
            vec![
                ("--column seq=order_seq".into(), "--column seq=seq".into()),
                ("no --no-gaps".into(), "--no-gaps".into()),
                (
                    "--to 2026-11-30T00:00:00Z".into(),
                    "--to 2026-12-01T00:00:00Z".into()
                ),
            ]
        );
        assert_eq!(as_flag("from", &serde_json::Value::Null), "no --from");
        // A setting recorded only when asked: absent is off, and differs.
        let logs = json!({"paths": ["/l"]});
        let with = fingerprint(&json!({"to": null, "logs": logs}), None);
        let without = fingerprint(&json!({"to": null}), None);
        assert_eq!(
            differences(&without, &with),
            vec![("no --logs".into(), format!("logs = {logs}"))]
        );
        assert_eq!(
            differences(&with, &without),
            vec![(format!("logs = {logs}"), "no --logs".into())]
        );
        assert_eq!(
            as_flag("sources", &json!(["a", "b"])),
            "--source a --source b"
        );
    }
}
