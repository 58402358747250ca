//! `run --shard I/N`: N shard runs are the unsharded run, event by event;
//! the ledger stays right across shards and later runs; `report merge`
//! sums their reports and refuses what is not one backfill's shards.

use std::path::Path;

use serde_json::Value as Json;

use crate::cli::{Run, backfill};
use crate::reference::read_output;

/// The rows of one sink of a run, as text without the columns a run
/// stamps (its id, its detection time), sorted: comparable across runs.
fn rows(out: &Path, sink: &str, run_id: &str) -> Vec<String> {
    let mut v: Vec<String> = read_output(&out.join(sink), run_id)
        .rows
        .into_iter()
        .map(|mut r| {
            r.remove("backfill_run_id");
            r.remove("backfill_detected_at");
            format!("{r:?}")
        })
        .collect();
    v.sort();
    v
}

fn run(args: &[&str]) -> Run {
    backfill(args)
}

/// The `error:` lines of a run's stderr (its JSON log lines aside).
fn error_lines(r: &Run) -> Vec<&str> {
    r.stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect()
}

/// The run exited `code` with one `error:` line that says `says`.
#[track_caller]
fn refused(r: &Run, code: i32, says: &str) {
    r.expect_code(code);
    let errs = error_lines(r);
    assert!(
        errs.len() == 1 && errs[0].contains(says),
        "expected one error line with '{says}'\n{}",
        r.describe()
    );
}

fn report(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The counts two reports of one backfill must agree on.
const COUNTS: [&str; 9] = [
    "rows",
    "events",
    "resolved",
    "replayed",
    "dead_lettered",
    "skipped_dead_lettered",
    "gaps",
    "missing_events",
    "conflicts",
];

fn generate(dir: &Path, seed: &str) {
    run(&[
        "generate",
        "--out",
        &dir.display().to_string(),
        "--events",
        "20000",
        "--keys",
        "50",
        "--seed",
        seed,
    ])
    .ok();
}

/// Three shard runs give the unsharded run's replays, dead letters and gaps
/// row for row; their merged report has its counts; a second round, an
/// unsharded run on each state, decides the same again (the ledger of the
/// shards is the unsharded run's), and a third round as two shards too.
#[test]
fn one_three_and_seven_shards_are_the_unsharded_run_event_by_event() {
    let archive = tempfile::tempdir().unwrap();
    generate(archive.path(), "5");
    let work = tempfile::tempdir().unwrap();
    let (whole, sharded) = (work.path().join("whole"), work.path().join("sharded"));
    let src = archive.path().display().to_string();
    // A run into `out`; its report's path.
    let go = |out: &Path, id: &str, extra: &[&str]| {
        let name = out.file_name().unwrap().to_string_lossy();
        let report = work.path().join(format!(
            "{name}-{id}-{}.json",
            extra.join("").replace('/', "of")
        ));
        let (out_s, report_s) = (out.display().to_string(), report.display().to_string());
        let mut args = vec!["run", "--source", &src, "--out", &out_s, "--run-id", id];
        args.extend(["--report", report_s.as_str()]);
        args.extend(extra);
        run(&args).ok();
        report
    };
    // N = 3, unsharded, 2, 7 and 1, on one state each side: every round
    // also reads the ledger the earlier rounds left.
    for (round, n) in [("r1", 3), ("r2", 0), ("r3", 2), ("r4", 7), ("r5", 1)] {
        let whole_report = report(&go(&whole, round, &[]));
        let (ids, reports): (Vec<String>, Vec<std::path::PathBuf>) = if n == 0 {
            (vec![round.to_string()], vec![go(&sharded, round, &[])])
        } else {
            (0..n)
                .map(|i| {
                    let shard = format!("{i}/{n}");
                    let r = go(&sharded, round, &["--shard", &shard]);
                    (format!("{round}-shard-{i}-of-{n}"), r)
                })
                .unzip()
        };
        for sink in ["replay", "dlq", "gaps"] {
            let want = rows(&whole, sink, round);
            let mut got: Vec<String> = ids.iter().flat_map(|id| rows(&sharded, sink, id)).collect();
            got.sort();
            assert_eq!(got.len(), want.len(), "{round} {sink}: row count");
            assert!(
                got == want,
                "{round} {sink}: the shards' rows differ from the run's"
            );
            if sink == "replay" && round == "r1" {
                assert!(!want.is_empty(), "the archive has replays");
            }
        }
        // Every shard holds some events, and reports its shard.
        for (i, r) in reports.iter().enumerate() {
            let r = report(r);
            if n > 0 {
                assert_eq!(r["shard"]["index"], i as u64, "{round}");
                assert_eq!(r["shard"]["count"], n as u64, "{round}");
                assert!(
                    r["events"].as_u64().unwrap() > 0,
                    "{round}: shard {i} is empty"
                );
            } else {
                assert!(r.get("shard").is_none());
            }
        }
        if n > 0 {
            let merged = work.path().join(format!("{round}-merged.json"));
            let mut args: Vec<String> = vec!["report".into(), "merge".into(), "--report".into()];
            args.push(merged.display().to_string());
            args.extend(reports.iter().rev().map(|p| p.display().to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let m = run(&args);
            m.ok();
            assert!(
                m.stdout.contains(&format!("run {round} committed")),
                "{}",
                m.describe()
            );
            let merged = report(&merged);
            for c in COUNTS {
                assert_eq!(merged[c], whole_report[c], "{round}: merged {c}");
            }
            assert_eq!(merged["run_id"], round);
            assert_eq!(merged["merged_from"].as_array().unwrap().len(), n);
        }
    }
}

/// Four shards on one state: run ids suffixed, each event in the ledger
/// once (no event decided by two shards), a rerun of a shard's id is its
/// committed outcome, and `backfill_shard` in SQL spreads the keys.
#[test]
fn shard_run_ids_and_the_ledger_hold_each_event_once() {
    let archive = tempfile::tempdir().unwrap();
    generate(archive.path(), "9");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let src = archive.path().display().to_string();
    let out_s = out.display().to_string();
    for i in 0..4 {
        let shard = format!("{i}/4");
        run(&[
            "run", "--source", &src, "--out", &out_s, "--run-id", "n", "--shard", &shard,
        ])
        .ok();
    }
    // The sql shell reads the state: each event in the ledger once.
    let q = run(&[
        "sql",
        "--source",
        &src,
        "--state",
        &out.join("_state").display().to_string(),
        "--format",
        "csv",
        "SELECT count(*) AS entries, count(DISTINCT event_id) AS events, count(DISTINCT run_id) AS runs FROM ledger_entries",
    ]);
    q.ok();
    let line = q.stdout.lines().nth(1).unwrap_or_default().to_string();
    let v: Vec<u64> = line.split(',').map(|s| s.trim().parse().unwrap()).collect();
    assert_eq!(v[0], v[1], "an event in two shards' ledgers: {line}");
    assert_eq!(v[2], 4, "{line}");
    // The same shard again: its committed outcome, nothing new.
    let again = run(&[
        "run", "--source", &src, "--out", &out_s, "--run-id", "n", "--shard", "2/4",
    ]);
    again.ok();
    assert!(
        again.stdout.contains("n-shard-2-of-4 is already committed"),
        "{}",
        again.describe()
    );
    // One backfill, one split: the same id as 2 shards, or unsharded,
    // would decide the 4 shards' events again.
    for (shard, says) in [
        (
            Some("0/2"),
            "run id n was committed as 4 shards (n-shard-0-of-4); this run is shard 0/2: rerun it with --shard I/4",
        ),
        (None, "this run is unsharded: rerun it with --shard I/4"),
    ] {
        let mut args = vec!["run", "--source", &src, "--out", &out_s, "--run-id", "n"];
        args.extend(shard.iter().flat_map(|s| ["--shard", *s]));
        let r = run(&args);
        refused(&r, 2, says);
    }
    // `backfill_shard` in SQL is the shard a key belongs to.
    let keys = run(&[
        "sql",
        "--source",
        &src,
        "--format",
        "csv",
        "SELECT count(DISTINCT backfill_shard(key, 4)) AS shards, min(backfill_shard(key, 4)) AS lo, max(backfill_shard(key, 4)) AS hi FROM events",
    ]);
    keys.ok();
    assert_eq!(
        keys.stdout.lines().nth(1),
        Some("4,0,3"),
        "{}",
        keys.describe()
    );
}

/// Bad shards: one line, exit 2, naming the flag; reports that are not one
/// backfill's shards: exit 2 naming what is missing; a report that does not
/// balance: exit 1.
#[test]
fn bad_shards_and_bad_merges_are_refused_in_one_line() {
    let archive = tempfile::tempdir().unwrap();
    generate(archive.path(), "3");
    let work = tempfile::tempdir().unwrap();
    let src = archive.path().display().to_string();
    let out = work.path().join("out").display().to_string();
    for (bad, says) in [
        ("4/4", "below 4"),
        ("0/0", "between 1 and"),
        ("two/4", "'two' is not a whole number"),
        ("1", "not I/N"),
    ] {
        let r = run(&["run", "--source", &src, "--out", &out, "--shard", bad]);
        refused(&r, 2, says);
        assert!(
            error_lines(&r)[0].starts_with("error: --shard"),
            "{}",
            r.describe()
        );
    }
    assert!(
        !work.path().join("out").exists(),
        "a refused run wrote nothing"
    );
    let rep = |id: &str, shard: &str| {
        let p = work
            .path()
            .join(format!("{id}-{}.json", shard.replace('/', "of")));
        let p_s = p.display().to_string();
        run(&[
            "run", "--source", &src, "--out", &out, "--run-id", id, "--shard", shard, "--report",
            &p_s,
        ])
        .ok();
        p
    };
    let (a, b, c) = (rep("m", "0/3"), rep("m", "1/3"), rep("m", "2/3"));
    let merge = |files: &[&std::path::PathBuf]| {
        let mut args = vec!["report".to_string(), "merge".to_string()];
        args.extend(files.iter().map(|p| p.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args)
    };
    merge(&[&a, &b, &c]).ok();
    for (files, says) in [
        (vec![&a, &b], "missing the report of shard 2/3"),
        (vec![&a, &b, &b, &c], "given twice"),
    ] {
        let r = merge(&files);
        refused(&r, 2, says);
    }
    let other = rep("o", "0/2");
    refused(&merge(&[&a, &b, &c, &other]), 2, "is of 3 shards");
    // A report edited so that it no longer balances.
    let mut broken = report(&b);
    broken["replayed"] = Json::from(broken["replayed"].as_u64().unwrap() + 1);
    let bp = work.path().join("broken.json");
    std::fs::write(&bp, broken.to_string()).unwrap();
    refused(&merge(&[&a, &bp, &c]), 1, "does not balance");
    // Edited reports: one clean line and exit 2, never a panic or a
    // runaway allocation.
    let edited = |name: &str, edit: &dyn Fn(&mut Json)| {
        let mut r = report(&a);
        edit(&mut r);
        let p = work.path().join(name);
        std::fs::write(&p, r.to_string()).unwrap();
        p
    };
    let out_of_range = edited("idx.json", &|r| r["shard"]["index"] = Json::from(5));
    let huge_count = edited("cnt.json", &|r| r["shard"]["count"] = Json::from(u32::MAX));
    let zero_count = edited("zero.json", &|r| {
        r["shard"] = serde_json::json!({"index": 0, "count": 0})
    });
    let other_backfill = edited("other.json", &|r| {
        r["run_id"] = Json::from("x-shard-0-of-3")
    });
    let overflow = edited("big.json", &|r| {
        r["rows"] = Json::from(u64::MAX);
        r["events"] = Json::from(u64::MAX);
        r["resolved"] = Json::from(
            u64::MAX - r["replayed"].as_u64().unwrap() - r["dead_lettered"].as_u64().unwrap(),
        );
    });
    let array = work.path().join("array.json");
    std::fs::write(&array, "[\"m-shard-0-of-3\", false]").unwrap();
    let empty = work.path().join("empty.json");
    std::fs::write(&empty, r#"{"shard":{"index":0,"count":1}}"#).unwrap();
    for (files, says) in [
        (
            vec![&out_of_range, &b, &c],
            "claims shard 5/3, which does not exist",
        ),
        (vec![&huge_count], "a shard count is between 1 and 65536"),
        (vec![&zero_count], "a shard count is between 1 and 65536"),
        (vec![&other_backfill, &b, &c], "not one backfill"),
        (vec![&overflow, &b, &c], "too large to add up"),
        (vec![&array], "not a JSON object with a run_id"),
        (vec![&empty], "not a JSON object with a run_id"),
        (vec![&work.path().join("absent.json")], "cannot be read"),
        (vec![&work.path().to_path_buf()], "cannot be read"),
    ] {
        let r = merge(&files);
        refused(&r, 2, says);
    }
    let not_json = work.path().join("x.json");
    std::fs::write(&not_json, "{").unwrap();
    refused(
        &merge(&[&not_json]),
        2,
        "x.json is not a backfill run report",
    );
    // In any order, the merged run is the shards' common id.
    let merged = merge(&[&c, &a, &b]);
    merged.ok();
    assert!(
        merged.stdout.starts_with("run m committed"),
        "{}",
        merged.describe()
    );
}
