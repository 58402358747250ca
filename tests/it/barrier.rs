//! Order-safe replay: `--on-gap` and `--on-conflict` hold or dead-letter a
//! key's would-be replays after its first gap (or first conflicting seq),
//! the report balances with the held events, and a later run, once the gap
//! is filled, replays what was held (nothing of it is in the ledger).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::archive::{Archive, Row};
use crate::cli::{Run, backfill};
use crate::reference::read_output;

const T: &str = "2024-01-01T10:00:00Z";

/// key a: 1 processed, 2, (3 missing), 4, 5: a4 and a5 are after a gap.
/// key b: 1, 2 twice (b2, b2x: a conflict), 3: b3 is after a conflict.
/// key c: 1, 2, 3: nothing in the way.
/// key d: 1, (2 missing), 3 failing permanently: dead-lettered for that,
/// whatever the gap says.
fn archive() -> Archive {
    let failed = |id: &str, key: &str, seq: i64| Row::new(id, key, seq, T, Some("failed"));
    let mut a = Archive::new();
    a.rows(
        "part-0.parquet",
        &[
            Row::new("a1", "a", 1, T, Some("processed")),
            failed("a2", "a", 2),
            failed("a4", "a", 4),
            failed("a5", "a", 5),
            failed("b1", "b", 1),
            failed("b2", "b", 2),
            failed("b2x", "b", 2),
            failed("b3", "b", 3),
            failed("c1", "c", 1),
            failed("c2", "c", 2),
            failed("c3", "c", 3),
            failed("d1", "d", 1),
            failed("d3", "d", 3).error("schema mismatch"),
        ],
    );
    a
}

struct Outcome {
    run: Run,
    report: Json,
    /// (event_id, backfill_attempt) of the replays.
    replay: BTreeSet<(String, i64)>,
    /// (event_id, backfill_reason) of the dead letters.
    dlq: BTreeSet<(String, String)>,
}

fn run(source: &str, out: &Path, run_id: &str, extra: &[&str]) -> Outcome {
    let report_path = out.with_extension(format!("{run_id}.json"));
    let report_arg = report_path.display().to_string();
    let out_arg = out.display().to_string();
    let mut args = vec![
        "run",
        "--source",
        source,
        "--out",
        &out_arg,
        "--run-id",
        run_id,
        "--permanent-error",
        "^schema",
        "--progress",
        "off",
        "--report",
        &report_arg,
    ];
    args.extend_from_slice(extra);
    let run = backfill(&args);
    run.ok();
    let report: Json =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let text = |r: &crate::reference::Record, c: &str| r[c].as_str().unwrap().to_string();
    let replay = read_output(&out.join("replay"), run_id)
        .rows
        .iter()
        .map(|r| (text(r, "event_id"), r["backfill_attempt"].as_int().unwrap()))
        .collect();
    let dlq = read_output(&out.join("dlq"), run_id)
        .rows
        .iter()
        .map(|r| (text(r, "event_id"), text(r, "backfill_reason")))
        .collect();
    Outcome {
        run,
        report,
        replay,
        dlq,
    }
}

fn replays(ids: &[(&str, i64)]) -> BTreeSet<(String, i64)> {
    ids.iter().map(|(i, a)| (i.to_string(), *a)).collect()
}

fn letters(ids: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    ids.iter()
        .map(|(i, r)| (i.to_string(), r.to_string()))
        .collect()
}

/// events = resolved + replayed + dead-lettered + skipped + held.
#[track_caller]
fn balances(r: &Json) {
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("report lacks {k}: {r}"))
    };
    assert_eq!(
        n("events"),
        n("resolved") + n("replayed") + n("dead_lettered") + n("skipped_dead_lettered") + n("held"),
        "{r}"
    );
}

fn out_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("out")
}

#[test]
fn hold_leaves_the_events_after_a_gap_for_the_run_that_follows_its_filling() {
    let mut a = archive();
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir);
    let first = run(&a.source(), &out, "first", &["--on-gap", "hold"]);
    assert_eq!(
        first.replay,
        replays(&[
            ("a2", 1),
            ("b1", 1),
            ("b3", 1),
            ("c1", 1),
            ("c2", 1),
            ("c3", 1),
            ("d1", 1)
        ])
    );
    assert_eq!(
        first.dlq,
        letters(&[
            ("b2", "sequence_conflict"),
            ("b2x", "sequence_conflict"),
            ("d3", "permanent_error")
        ])
    );
    let r = &first.report;
    assert_eq!(r["held"], 2, "{r}");
    assert_eq!(r["held_by_reason"]["held_by_gap"], 2, "{r}");
    balances(r);
    assert!(
        first
            .run
            .stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["held", "2", "held_by_gap", "2"]),
        "{}",
        first.run.stdout
    );

    // The gap is filled: seq 3 of key a arrives (unprocessed). The held
    // events were not in the ledger: their first replay is attempt 1.
    a.rows(
        "part-1.parquet",
        &[Row::new("a3", "a", 3, T, Some("failed"))],
    );
    let second = run(&a.source(), &out, "second", &["--on-gap", "hold"]);
    assert_eq!(
        second.replay,
        replays(&[
            ("a2", 2),
            ("a3", 1),
            ("a4", 1),
            ("a5", 1),
            ("b1", 2),
            ("b3", 2),
            ("c1", 2),
            ("c2", 2),
            ("c3", 2),
            ("d1", 2)
        ])
    );
    assert!(second.dlq.is_empty());
    let r = &second.report;
    assert_eq!(r["held"], 0, "{r}");
    assert_eq!(r["skipped_dead_lettered"], 3, "{r}");
    balances(r);
}

#[test]
fn dlq_dead_letters_after_a_gap_and_after_a_conflict() {
    let a = archive();
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir);
    let o = run(
        &a.source(),
        &out,
        "r",
        &["--on-gap", "dlq", "--on-conflict", "dlq"],
    );
    assert_eq!(
        o.replay,
        replays(&[
            ("a2", 1),
            ("b1", 1),
            ("c1", 1),
            ("c2", 1),
            ("c3", 1),
            ("d1", 1)
        ])
    );
    assert_eq!(
        o.dlq,
        letters(&[
            ("a4", "after_gap"),
            ("a5", "after_gap"),
            ("b2", "sequence_conflict"),
            ("b2x", "sequence_conflict"),
            ("b3", "after_conflict"),
            ("d3", "permanent_error")
        ])
    );
    let r = &o.report;
    assert_eq!(r["held"], 0, "{r}");
    assert_eq!(r["dead_lettered_by_reason"]["after_gap"], 2, "{r}");
    assert_eq!(r["dead_lettered_by_reason"]["after_conflict"], 1, "{r}");
    balances(r);
}

#[test]
fn hold_on_conflict_from_the_job_file() {
    let a = archive();
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir);
    let job = dir.path().join("job.toml");
    std::fs::write(&job, "on_conflict = \"hold\"\non_gap = \"replay\"\n").unwrap();
    let o = run(&a.source(), &out, "r", &["--job", job.to_str().unwrap()]);
    assert_eq!(
        o.replay,
        replays(&[
            ("a2", 1),
            ("a4", 1),
            ("a5", 1),
            ("b1", 1),
            ("c1", 1),
            ("c2", 1),
            ("c3", 1),
            ("d1", 1)
        ])
    );
    assert_eq!(
        o.dlq,
        letters(&[
            ("b2", "sequence_conflict"),
            ("b2x", "sequence_conflict"),
            ("d3", "permanent_error")
        ])
    );
    assert_eq!(o.report["held_by_reason"]["held_by_conflict"], 1);
    balances(&o.report);
}

#[test]
fn a_barrier_without_its_detection_is_refused_and_a_rerun_keeps_its_barrier() {
    let a = archive();
    let dir = tempfile::tempdir().unwrap();
    let out = out_dir(&dir).display().to_string();
    let r = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out,
        "--on-gap",
        "hold",
        "--no-gaps",
    ]);
    r.expect_code(2);
    let lines = r.stderr_lines();
    assert!(
        lines.len() == 1 && lines[0].contains("--on-gap") && lines[0].contains("--no-gaps"),
        "{}",
        r.describe()
    );
    // The same run id with another barrier is another run: refused.
    backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out,
        "--run-id",
        "x",
        "--on-gap",
        "hold",
    ])
    .ok();
    let r = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out,
        "--run-id",
        "x",
    ]);
    r.expect_code(2);
    assert!(r.stderr.contains("--on-gap"), "{}", r.describe());
    backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out,
        "--run-id",
        "x",
        "--on-gap",
        "hold",
    ])
    .ok();
}
