//! `backfill reconcile` and `run --reconcile-snapshot` on generated ledgers
//! with injected downstream defects: per key a class (agrees; the
//! downstream applied an event the archive marks failed; the downstream
//! lost a processed event; a failed event the downstream rightly lacks;
//! the key missing downstream), some processed rows archived twice, and a
//! snapshot key the archive never saw. Expected values come from the
//! test's own model, not from the crate.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::archive::{Archive, Col, Layout, Row};
use crate::cli::backfill;
use crate::state_at::read_parquet_dir;

const AS_OF: &str = "2024-05-01T12:00:00Z";
const KEYS: usize = 25;

fn amount(key: usize, seq: i64) -> i64 {
    (key as i64 + 1) * 100 + seq
}

/// What the test injects into each key: by `key % 5`.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Class {
    Agrees,
    /// seq 7 archived as failed, but the downstream holds it.
    AppliedButFailed,
    /// seq 3 processed, the downstream lost it.
    LostDownstream,
    /// seq 7 archived as failed and the downstream lacks it: a replay fixes it.
    FailedNotApplied,
    /// No snapshot row.
    MissingDownstream,
}

fn class(key: usize) -> Class {
    [
        Class::Agrees,
        Class::AppliedButFailed,
        Class::LostDownstream,
        Class::FailedNotApplied,
        Class::MissingDownstream,
    ][key % 5]
}

struct Ledger {
    _dir: tempfile::TempDir,
    archive: Archive,
    snapshot: String,
    root: std::path::PathBuf,
}

/// Ten seqs a key, hourly from 01:00 (seq 10 at 10:00, before as_of), plus
/// a processed seq 11 at 20:00 (after as_of: counted on neither side).
fn ledger() -> Ledger {
    let layout = Layout::default()
        .with(Col::Shard)
        .renamed(Col::Shard, "amount");
    let mut rows = vec![];
    let mut snapshot = String::from("key,value,as_of\n");
    for k in 0..KEYS {
        let key = format!("acct-{k:02}");
        let c = class(k);
        let mut downstream = 0;
        for seq in 1..=11 {
            let a = amount(k, seq);
            let failed = seq == 7 && matches!(c, Class::AppliedButFailed | Class::FailedNotApplied);
            let mut r = Row::new(
                &format!("{key}-{seq}"),
                &key,
                seq,
                &format!("2024-05-01T{:02}:00:00Z", if seq == 11 { 20 } else { seq }),
                Some(if failed { "failed" } else { "processed" }),
            );
            r.shard = Some(a as i32);
            if failed {
                r.attempts = Some(1);
                r.error = Some("timeout".into());
            }
            // Every fourth key has seq 2 archived twice.
            if seq == 2 && k % 4 == 0 {
                rows.push(r.clone());
            }
            rows.push(r);
            let applied = seq <= 10
                && match c {
                    Class::LostDownstream => seq != 3,
                    Class::FailedNotApplied => seq != 7,
                    _ => true,
                };
            if applied {
                downstream += a;
            }
        }
        if c != Class::MissingDownstream {
            snapshot.push_str(&format!("{key},{downstream},{AS_OF}\n"));
        }
    }
    snapshot.push_str(&format!("acct-ghost,42,{AS_OF}\n"));
    let mut archive = Archive::new();
    archive.file("dt=2024-05-01/part-0.parquet", &layout, &rows);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("snapshot.csv");
    std::fs::write(&path, snapshot).expect("snapshot");
    Ledger {
        snapshot: path.display().to_string(),
        root: dir.path().to_path_buf(),
        _dir: dir,
        archive,
    }
}

/// The model's report row for key `k`: status, actual, expected,
/// unresolved ids, explained.
fn expected(k: usize) -> (&'static str, Option<i64>, i64, Vec<String>, bool) {
    let processed: i64 = (1..=10).map(|s| amount(k, s)).sum();
    let key = format!("acct-{k:02}");
    match class(k) {
        Class::Agrees => ("agree", Some(processed), processed, vec![], false),
        Class::AppliedButFailed => (
            "disagree",
            Some(processed),
            processed - amount(k, 7),
            vec![format!("{key}-7")],
            true,
        ),
        Class::LostDownstream => (
            "disagree",
            Some(processed - amount(k, 3)),
            processed,
            vec![],
            false,
        ),
        Class::FailedNotApplied => (
            "agree",
            Some(processed - amount(k, 7)),
            processed - amount(k, 7),
            vec![format!("{key}-7")],
            false,
        ),
        Class::MissingDownstream => ("missing_downstream", None, processed, vec![], false),
    }
}

/// The keys the model says do not agree: its own, and the snapshot's
/// ghost key the archive never saw.
fn disagreeing_keys() -> usize {
    (0..KEYS).filter(|k| expected(*k).0 != "agree").count() + 1
}

#[test]
fn every_injected_disagreement_is_found_and_explained_where_the_data_says() {
    let l = ledger();
    let src = l.archive.source();
    let reconcile = |extra: &[&str]| {
        let mut args = vec![
            "reconcile",
            "--source",
            &src,
            "--snapshot",
            &l.snapshot,
            "--expected",
            "sum(amount)",
        ];
        args.extend_from_slice(extra);
        backfill(&args)
    };
    let run = reconcile(&["--all", "--format", "json"]);
    run.ok();
    let rows: Vec<Json> =
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    let by_key: BTreeMap<String, &Json> = rows
        .iter()
        .map(|r| (r["key"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(by_key.len(), KEYS + 1, "{}", run.stdout);
    for k in 0..KEYS {
        let key = format!("acct-{k:02}");
        let r = by_key[&key];
        let (status, actual, expected, ids, explained) = expected(k);
        assert_eq!(r["status"], status, "{key}: {r}");
        assert_eq!(r["actual"].as_i64(), actual, "{key}: {r}");
        assert_eq!(r["expected"].as_i64(), Some(expected), "{key}: {r}");
        // Each event once: a key with seq 2 archived twice still has 10.
        let processed = if ids.is_empty() { 10 } else { 9 };
        assert_eq!(r["processed_events"], processed, "{key}: {r}");
        assert_eq!(r["unresolved_events"], ids.len(), "{key}: {r}");
        let shown: Vec<String> = r["unresolved_event_ids"]
            .as_str()
            .map(|s| s.split(' ').map(String::from).collect())
            .unwrap_or_default();
        assert_eq!(shown, ids, "{key}: {r}");
        assert_eq!(r["explained"], explained, "{key}: {r}");
        if let Some(a) = actual {
            assert_eq!(r["difference"].as_i64(), Some(a - expected), "{key}: {r}");
        }
    }
    let ghost = by_key["acct-ghost"];
    assert_eq!(ghost["status"], "missing_archive", "{ghost}");
    assert_eq!(ghost["actual"], 42, "{ghost}");
    assert!(ghost["expected"].is_null(), "{ghost}");

    // Without --all: only the keys that do not agree; --fail-on-disagree
    // makes that exit 3.
    let run = reconcile(&["--format", "csv", "--fail-on-disagree"]);
    run.expect_code(3);
    let shown = run.stdout.lines().count() - 1;
    assert_eq!(shown, disagreeing_keys(), "{}", run.stdout);

    // A tolerance as wide as the lost amounts makes the lost keys agree.
    let run = reconcile(&["--tolerance", "10000", "--format", "json"]);
    run.ok();
    let rows: Vec<Json> = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(
        rows.iter().all(|r| r["status"] != "disagree"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_run_holds_the_replays_the_downstream_already_applied() {
    let l = ledger();
    let out = l.root.join("out");
    let run = backfill(&[
        "run",
        "--source",
        &l.archive.source(),
        "--out",
        out.to_str().unwrap(),
        "--reconcile-snapshot",
        &l.snapshot,
        "--reconcile-expected",
        "sum(amount)",
        "--report",
        "-",
    ]);
    run.ok();
    let report: Json =
        serde_json::from_str(run.stdout.lines().last().unwrap()).expect("report json");
    let applied: Vec<usize> = (0..KEYS)
        .filter(|k| class(*k) == Class::AppliedButFailed)
        .collect();
    let not_applied: Vec<usize> = (0..KEYS)
        .filter(|k| class(*k) == Class::FailedNotApplied)
        .collect();
    assert_eq!(report["held"], applied.len(), "{report}");
    assert_eq!(
        report["held_by_reason"]["held_by_reconcile"],
        applied.len(),
        "{report}"
    );
    assert_eq!(report["reconcile"]["explained"], applied.len(), "{report}");
    // The replays: exactly the failed events the downstream lacks.
    let replayed: Vec<String> = read_parquet_dir(&out.join("replay"))
        .iter()
        .flat_map(|b| {
            let ids = arrow::compute::cast(
                b.column_by_name("event_id").unwrap(),
                &arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            use arrow::array::AsArray;
            ids.as_string::<i32>()
                .iter()
                .map(|s| s.unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut want: Vec<String> = not_applied
        .iter()
        .map(|k| format!("acct-{k:02}-7"))
        .collect();
    let mut got = replayed.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // The disagreeing keys are the run's reconcile output.
    let rows: usize = read_parquet_dir(&out.join("reconcile"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, disagreeing_keys());
    assert_eq!(report["reconcile"]["keys"], KEYS + 1, "{report}");
}

#[test]
fn bad_snapshots_and_settings_are_named_and_exit_2() {
    let l = ledger();
    let dir = &l.root;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let twice = write(
        "twice.csv",
        "key,value,as_of\nacct-01,1,2024-05-01T12:00:00Z\nacct-01,2,2024-05-01T12:00:00Z\n",
    );
    let no_value = write(
        "novalue.csv",
        "key,total,as_of\nacct-01,1,2024-05-01T12:00:00Z\n",
    );
    let no_as_of = write("noasof.csv", "key,value\nacct-01,1\n");
    let text_value = write(
        "text.csv",
        "key,value,as_of\nacct-01,abc,2024-05-01T12:00:00Z\n",
    );
    let src = l.archive.source();
    let reconcile = |snapshot: &str, extra: &[&str]| {
        let mut args = vec!["reconcile", "--source", &src, "--snapshot", snapshot];
        args.extend_from_slice(extra);
        backfill(&args)
    };
    let sum = ["--expected", "sum(amount)"];
    reconcile(&twice, &sum).expect_error(2, "the key \"acct-01\" appears 2 times");
    reconcile(&no_value, &sum).expect_error(2, "no `value` column");
    reconcile(&no_as_of, &sum).expect_error(
        2,
        "no `as_of` column (it has key, value); give the snapshot's time with --as-of",
    );
    reconcile(&no_as_of, &["--expected", "sum(amount)", "--as-of", AS_OF]).ok();
    reconcile(
        &l.snapshot,
        &["--expected", "sum(amount)", "--as-of", AS_OF],
    )
    .expect_error(2, "the snapshot has its own `as_of` column");
    reconcile(&text_value, &sum).expect_error(2, "is Utf8, not a number");
    reconcile(&l.snapshot, &[]).expect_error(2, "--expected");
    reconcile(&l.snapshot, &["--expected", "amount + 1"]).expect_error(2, "not an aggregate");
    reconcile(&l.snapshot, &["--expected", "max(status)"]).expect_error(2, "not a number");
    reconcile(
        &l.snapshot,
        &["--expected", "sum(amount) AS y FROM events --"],
    )
    .expect_error(2, "comments and `;`");
    reconcile(&l.snapshot, &["--expected", "sum(nope)"]).expect_error(2, "unknown column");
    reconcile(
        &l.snapshot,
        &["--expected", "sum(amount)", "--tolerance", "-1"],
    )
    .expect_error(2, "not a non-negative number");
    reconcile(&dir.join("absent.csv").display().to_string(), &sum).expect_error(2, "absent.csv");
    let empty = write("empty.csv", "key,value,as_of\n");
    reconcile(&empty, &sum).expect_error(2, "the snapshot has no rows");
    let nan = write(
        "nan.csv",
        "key,value,as_of\nacct-01,NaN,2024-05-01T12:00:00Z\n",
    );
    reconcile(&nan, &sum).expect_error(2, "NaN or infinite");
    let null = write(
        "null.csv",
        "key,value,as_of\nacct-01,,2024-05-01T12:00:00Z\nacct-02,2,2024-05-01T12:00:00Z\n",
    );
    reconcile(&null, &sum).expect_error(2, "1 row(s) with no `value`");
    reconcile(
        &l.snapshot,
        &["--expected", "sum(amount) + (SELECT count(*) FROM events)"],
    )
    .expect_error(2, "a subquery is not allowed");
    reconcile(&l.snapshot, &["--expected", "sum(amount) * random()"])
        .expect_error(2, "a volatile function");
    // A window that starts later would leave out events the downstream holds.
    reconcile(
        &l.snapshot,
        &[
            "--expected",
            "sum(amount)",
            "--from",
            "2024-05-01T05:00:00Z",
        ],
    )
    .expect_error(2, "drop --from");
    // The archive itself as the output root.
    reconcile(&l.snapshot, &["--expected", "sum(amount)", "--out", &src])
        .expect_error(2, "is the archive itself");
    let out = dir.join("out");
    let out_s = out.display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--source", &src, "--out", &out_s];
        args.extend_from_slice(extra);
        backfill(&args)
    };
    let both = [
        "--reconcile-snapshot",
        l.snapshot.as_str(),
        "--reconcile-expected",
        "sum(amount)",
    ];
    run(&[&both[..], &["--shard", "0/2"]].concat())
        .expect_error(2, "reconciliation compares every key");
    run(&both[2..]).expect_error(
        2,
        "without --reconcile-snapshot there is nothing to reconcile",
    );
    run(&[&both[..], &["--from", "2024-05-01T05:00:00Z"]].concat()).expect_error(2, "drop --from");
    assert!(!out.join("_state").exists(), "nothing committed");
}

/// An archive of `n` processed events of `key` on 2024-01-01 and a CSV
/// snapshot in `dir` saying the downstream holds `n` of them at noon.
fn one_key(dir: &std::path::Path, key: &str, n: i64) -> (Archive, std::path::PathBuf) {
    let mut a = Archive::new();
    let rows: Vec<Row> = (1..=n)
        .map(|i| {
            let time = format!("2024-01-01T0{i}:00:00Z");
            Row::new(&format!("e{i}"), key, i, &time, Some("processed"))
        })
        .collect();
    a.rows("dt=2024-01-01/part-0.parquet", &rows);
    let snapshot = dir.join("snapshot.csv");
    std::fs::write(
        &snapshot,
        format!("key,value,as_of\n{key},{n},2024-01-01T12:00:00Z\n"),
    )
    .unwrap();
    (a, snapshot)
}

/// A CSV snapshot's keys are text: `007` is the archive's key `007`, not
/// the number 7 (which would make one key missing on each side).
#[test]
fn csv_keys_that_look_like_numbers_stay_text() {
    let dir = tempfile::tempdir().unwrap();
    let (a, snapshot) = one_key(dir.path(), "007", 2);
    let run = backfill(&[
        "reconcile",
        "--source",
        &a.source(),
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--expected",
        "count(*)",
        "--all",
        "--format",
        "csv",
    ]);
    run.ok();
    let rows: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{}", run.stdout);
    assert!(
        rows[0].starts_with("007,2024-01-01T12:00:00Z,agree,2,2,0,"),
        "{}",
        run.stdout
    );
}

/// Reconcile's folder in the spill directory is a claimed spill folder: a
/// reconcile killed before it removed its folder leaves one (its lock
/// free) that the next reconcile sweeps away, and its own goes at the end.
#[test]
fn a_killed_reconciles_folder_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let (a, snapshot) = one_key(dir.path(), "k", 1);
    let spill = dir.path().join("spill");
    // What a killed reconcile leaves: its folder, the owner's lock file
    // held by nobody.
    let stale = spill.join("backfill-spill-reconcile-dead");
    std::fs::create_dir_all(stale.join("reconcile_facts")).unwrap();
    std::fs::write(stale.join(".backfill-owner"), "").unwrap();
    backfill(&[
        "reconcile",
        "--source",
        &a.source(),
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--expected",
        "count(*)",
        "--spill-dir",
        spill.to_str().unwrap(),
    ])
    .ok();
    let left: Vec<String> = std::fs::read_dir(&spill)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
