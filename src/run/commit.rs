//! The end of a run: the commit protocol (ARCHITECTURE.md), and the two
//! checks it makes before the scan — a report file that can be written, and
//! an earlier attempt at the same run id that only needs committing. This
//! module never decides anything: it makes what the run decided durable,
//! then committed, then visible, in that order.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;

use super::OpenSink;
use crate::error::Error;
use crate::failpoint;
use crate::job::RunSettings;
use crate::report::Report;
use crate::sink::SinkReceipt;
use crate::state::{LedgerWriter, Manifest, State};

/// What decides a run's outcome, recorded with it (no secrets: locations
/// are redacted, and storage and Kafka settings are left out). A rerun of
/// the run id with other values is another run: it must not take over an
/// earlier attempt's outputs, and a committed run id is not silently taken
/// as done for other settings.
pub(super) fn decision_settings(settings: &RunSettings) -> serde_json::Value {
    let scan = &settings.scan;
    let columns: BTreeMap<&str, &str> = scan.columns.pairs().into_iter().collect();
    let loc = |s: &Option<String>| s.as_deref().map(crate::redact::url);
    serde_json::json!({
        "sources": scan.sources.iter().map(|s| crate::redact::url(s)).collect::<Vec<_>>(),
        "from": scan.from.map(|t| t.to_rfc3339()),
        "to": scan.to.map(|t| t.to_rfc3339()),
        "columns": columns,
        "done_statuses": scan.done_statuses,
        "detect_gaps": scan.detect_gaps,
        "detect_conflicts": scan.detect_conflicts,
        "max_attempts": settings.max_attempts,
        "permanent_errors": settings.permanent_errors,
        "out": loc(&settings.out),
        "replay_sink": loc(&settings.replay_sink),
        "dlq_sink": loc(&settings.dlq_sink),
        "gaps_sink": loc(&settings.gaps_sink),
    })
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
    settings: &RunSettings,
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
        let mut r = s.sink.finish().await?;
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
    let mut manifest = Manifest {
        format_version: crate::state::FORMAT_VERSION,
        seq: 0,
        based_on,
        run_id: settings.run_id.clone(),
        nonce: run_nonce.to_string(),
        committed_at: Utc::now(),
        ledger_files: ledger_file,
        outputs,
        publish,
        report: serde_json::to_value(&*report).unwrap_or_default(),
        delivered,
        settings: decision_settings(settings),
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
        Err(e) => return Err(commit_unknown(&settings.run_id, e)),
    };
    report
        .phase_ms
        .insert("commit".into(), t.elapsed().as_millis() as u64);
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
    published.map_err(|e| committed(&settings.run_id, e))?;
    state.forget_attempt(&settings.run_id, run_nonce).await;
    report
        .phase_ms
        .insert("publish".into(), t.elapsed().as_millis() as u64);
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
    settings: &RunSettings,
) -> Result<Option<Report>, Error> {
    let kafka = settings.scan.kafka.clone().unwrap_or_default();
    let ours = decision_settings(settings);
    for prepared in state.prepared(&settings.run_id).await? {
        if prepared.settings != ours {
            // Prepared for other settings (another window, other sinks):
            // its outputs are not this run's. Its Kafka messages, if any,
            // were delivered: at-least-once for them.
            eprintln!(
                "warning: {}",
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
                &settings.run_id,
            )
            .await
            .map_err(crate::source::SourceError::from)?;
        }
        if !visible {
            state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
            continue;
        }
        let mut manifest = prepared.clone();
        // `commit` sets the entry's position, which publishing marks.
        match state.commit(&mut manifest).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {
                eprintln!(
                    "warning: {}",
                    crate::redact::line(&format!(
                        "attempt {} of run '{}' had delivered its outputs but cannot commit ({e}); running again",
                        prepared.nonce, prepared.run_id
                    ))
                );
                state.drop_prepared(&prepared.run_id, &prepared.nonce).await;
                continue;
            }
            Err(e) => return Err(commit_unknown(&settings.run_id, e)),
        };
        state
            .publish_entry(&manifest, &settings.scan.storage)
            .await
            .map_err(|e| committed(&settings.run_id, e.into()))?;
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
