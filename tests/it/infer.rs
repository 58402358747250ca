//! `backfill infer` on generated ledgers: per key, amounts 1..=10 by seq,
//! some transactions dropped from the archive (but counted in the
//! snapshots). Where one gap explains the missing amount the inference is
//! exact; elsewhere the verdict is `ambiguous`. Expected values come from
//! the test's own model, not from the crate.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use serde_json::Value as Json;

use crate::archive::{Archive, Col, Layout, Row};
use crate::cli::backfill;
use crate::state_at::read_parquet_dir;

const T1: &str = "2024-05-01T02:30:00Z";
const T2: &str = "2024-05-01T11:00:00Z";

fn amount(key: usize, seq: i64) -> i64 {
    (key as i64 + 1) * 100 + seq
}

/// Per key, the seqs dropped from the archive. Keys 0..20 drop from the
/// interior (4..=9) by a fixed LCG; key 20 drops seq 10, the window's
/// last, which no gap shows (ambiguous); key 21 drops nothing but its
/// downstream total holds 7 more than its events (ambiguous).
fn drops() -> Vec<BTreeSet<i64>> {
    let mut x: u64 = 12345;
    let mut out = vec![];
    for _ in 0..20 {
        let mut d = BTreeSet::new();
        for s in 4..=9 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 33).is_multiple_of(5) {
                d.insert(s);
            }
        }
        out.push(d);
    }
    out.push(BTreeSet::from([10]));
    out.push(BTreeSet::new());
    out
}

struct Expected {
    verdict: &'static str,
    missing: i64,
    range: Option<(i64, i64)>,
}

/// The model: runs of consecutive dropped seqs between kept ones are gaps.
fn expected(key: usize, dropped: &BTreeSet<i64>) -> Expected {
    let missing: i64 =
        dropped.iter().map(|s| amount(key, *s)).sum::<i64>() + if key == 21 { 7 } else { 0 };
    let mut runs: Vec<(i64, i64)> = vec![];
    for s in dropped.iter().copied().filter(|s| *s < 10) {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => runs.push((s, s)),
        }
    }
    let verdict = match (missing, runs.len()) {
        (0, 0) => "consistent",
        (m, 1) if m != 0 && !dropped.contains(&10) => "inferred",
        _ => "ambiguous",
    };
    Expected {
        verdict,
        missing,
        range: (verdict == "inferred").then(|| runs[0]),
    }
}

#[test]
fn inferred_where_the_data_decides_ambiguous_elsewhere() {
    let drops = drops();
    let layout = Layout::default()
        .with(Col::Shard)
        .renamed(Col::Shard, "amount");
    let mut rows = vec![];
    let (mut before, mut after) = (String::from("key,total\n"), String::from("key,total\n"));
    for (k, dropped) in drops.iter().enumerate() {
        let key = format!("acct-{k:02}");
        let mut total_before = 0;
        let mut total_after = 0;
        for seq in 1..=10 {
            let a = amount(k, seq);
            total_after += a;
            if seq <= 2 {
                total_before += a;
            }
            if dropped.contains(&seq) {
                continue;
            }
            let mut r = Row::new(
                &format!("{key}-{seq}"),
                &key,
                seq,
                &format!("2024-05-01T{seq:02}:00:00Z"),
                Some("processed"),
            );
            r.shard = Some(a as i32);
            rows.push(r);
        }
        if k == 21 {
            total_after += 7;
        }
        before.push_str(&format!("{key},{total_before}\n"));
        after.push_str(&format!("{key},{total_after}\n"));
    }
    let mut a = Archive::new();
    a.file("dt=2024-05-01/part-0.parquet", &layout, &rows);
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = tmp.path().join("before.csv");
    let af = tmp.path().join("after.csv");
    std::fs::write(&b, before).expect("snapshot");
    std::fs::write(&af, after).expect("snapshot");
    let out = tmp.path().join("out");
    let run = backfill(&[
        "infer",
        "--source",
        &a.source(),
        "--from",
        T1,
        "--to",
        T2,
        "--before",
        &b.display().to_string(),
        "--after",
        &af.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--format",
        "json",
    ]);
    run.ok();
    let report: Vec<Json> = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    assert_eq!(report.len(), drops.len(), "{}", run.describe());
    let mut want_inferred = BTreeMap::new();
    let mut verdicts = BTreeMap::new();
    for (k, dropped) in drops.iter().enumerate() {
        let e = expected(k, dropped);
        let r = &report[k];
        assert_eq!(r["key"], format!("acct-{k:02}"));
        assert_eq!(r["verdict"], e.verdict, "key {k}, dropped {dropped:?}: {r}");
        assert_eq!(r["missing_amount"], e.missing, "key {k}: {r}");
        *verdicts.entry(e.verdict).or_insert(0) += 1;
        if let Some((from, to)) = e.range {
            want_inferred.insert(format!("acct-{k:02}"), (from, to, e.missing));
        }
    }
    // The generated ledger exercises every verdict.
    assert!(verdicts.len() == 3, "{verdicts:?}");

    let mut got = BTreeMap::new();
    for batch in read_parquet_dir(&out.join("inferred")) {
        let keys = batch.column_by_name("key").expect("key").as_string::<i32>();
        let from = batch
            .column_by_name("seq_from")
            .expect("seq_from")
            .as_primitive::<Int64Type>();
        let to = batch
            .column_by_name("seq_to")
            .expect("seq_to")
            .as_primitive::<Int64Type>();
        let amt = batch
            .column_by_name("amount")
            .expect("amount")
            .as_primitive::<Int64Type>();
        let inferred = batch
            .column_by_name("inferred")
            .expect("inferred")
            .as_boolean();
        let derivation = batch
            .column_by_name("derivation")
            .expect("derivation")
            .as_string::<i32>();
        for i in 0..batch.num_rows() {
            assert!(inferred.value(i) && !inferred.is_null(i));
            assert!(
                derivation.value(i).contains("one gap"),
                "{}",
                derivation.value(i)
            );
            got.insert(
                keys.value(i).to_string(),
                (from.value(i), to.value(i), amt.value(i)),
            );
        }
    }
    assert_eq!(got, want_inferred, "{}", run.describe());
    // Nothing was replayed: infer writes no replay folder.
    assert!(!out.join("replay").exists());
}

#[test]
fn infer_needs_the_interval_and_snapshots_with_key_and_total() {
    let mut a = Archive::new();
    a.rows(
        "dt=2024-05-01/part-0.parquet",
        &[Row::new(
            "e1",
            "k",
            1,
            "2024-05-01T05:00:00Z",
            Some("processed"),
        )],
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let snap = tmp.path().join("s.csv");
    std::fs::write(&snap, "account,balance\nk,1\n").expect("snapshot");
    let s = snap.display().to_string();
    let run = backfill(&[
        "infer",
        "--source",
        &a.source(),
        "--before",
        &s,
        "--after",
        &s,
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("--from T1"), "{}", run.describe());
    let run = backfill(&[
        "infer",
        "--source",
        &a.source(),
        "--from",
        T1,
        "--to",
        T2,
        "--before",
        &s,
        "--after",
        &s,
    ]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("--before") && run.stderr.contains("no `key` column"),
        "{}",
        run.describe()
    );
}

/// Each event once (a duplicate delivery is one event), a NULL amount
/// never a silent 0 (ambiguous), an inferred event named by its key and
/// range; a NULL total or a key twice in a snapshot refused; every sink
/// checked before any is written.
#[test]
fn duplicates_once_null_amounts_ambiguous_and_sinks_checked_first() {
    let layout = Layout::default()
        .with(Col::Shard)
        .renamed(Col::Shard, "amount");
    let row = |key: &str, seq: i64, amount: Option<i32>| {
        let mut r = Row::new(
            &format!("{key}-{seq}"),
            key,
            seq,
            &format!("2024-05-01T{:02}:00:00Z", seq + 2),
            Some("processed"),
        );
        r.shard = amount;
        r
    };
    // d: seq 1..3 of 5 each, seq 2 archived twice, nothing lost.
    // n: seq 1 NULL, seq 3 of 5; seq 2 lost (one gap) and 5 missing.
    // g: seq 1 and 3 of 5; seq 2 (amount 7) lost: inferred.
    let rows = vec![
        row("d", 1, Some(5)),
        row("d", 2, Some(5)),
        row("d", 2, Some(5)),
        row("d", 3, Some(5)),
        row("n", 1, None),
        row("n", 3, Some(5)),
        row("g", 1, Some(5)),
        row("g", 3, Some(5)),
    ];
    let mut a = Archive::new();
    a.file("dt=2024-05-01/part-0.parquet", &layout, &rows);
    let tmp = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).expect("snapshot");
        p.display().to_string()
    };
    let before = write("before.csv", "key,total\nd,0\nn,0\ng,0\n");
    let after = write("after.csv", "key,total\nd,15\nn,10\ng,17\n");
    let src = a.source();
    let out = tmp.path().join("out");
    let infer = |after: &str, extra: &[&str]| {
        let mut args = vec![
            "infer", "--source", &src, "--from", T1, "--to", T2, "--before", &before, "--after",
            after,
        ];
        args.extend_from_slice(extra);
        backfill(&args)
    };
    let run = infer(
        &after,
        &["--format", "json", "--out", out.to_str().unwrap()],
    );
    run.ok();
    let report: Vec<Json> = serde_json::from_str(run.stdout.trim()).expect("json");
    let by_key: BTreeMap<&str, &Json> = report
        .iter()
        .map(|r| (r["key"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_key["d"]["archived"], 15, "{}", run.describe());
    assert_eq!(by_key["d"]["verdict"], "consistent", "{}", run.describe());
    assert_eq!(by_key["n"]["verdict"], "ambiguous", "{}", run.describe());
    assert_eq!(by_key["g"]["verdict"], "inferred", "{}", run.describe());
    let ids: Vec<String> = read_parquet_dir(&out.join("inferred"))
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name("event_id")
                .expect("event_id")
                .as_string::<i32>();
            (0..b.num_rows())
                .map(|i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, vec!["inferred:g:2-2".to_string()]);

    let null_total = write("nulltotal.csv", "key,total\nd,15\nn,\ng,17\n");
    infer(&null_total, &[]).expect_error(2, "1 row(s) with no `total`");
    let twice = write("twice.csv", "key,total\nd,15\nd,16\ng,17\n");
    infer(&twice, &[]).expect_error(2, "the key \"d\" appears 2 times");
    let nan = write("nan.csv", "key,total\nd,15.0\nn,NaN\ng,17.0\n");
    infer(&nan, &[]).expect_error(2, "NaN or infinite");
    infer(&after, &["--amount", "(SELECT max(amount) FROM events)"])
        .expect_error(2, "a subquery is not allowed");
    infer(&after, &["--amount", "amount * random()"]).expect_error(2, "a volatile function");
    // The archive itself as the output root.
    infer(&after, &["--out", &src]).expect_error(2, "is the archive itself");
    let text = write("text.csv", "key,total\nd,abc\n");
    infer(&text, &[]).expect_error(2, "the column `total` is Utf8, not a number");

    // A sink that cannot take them (nothing listens on port 1): nothing is
    // written to the folder either.
    let out2 = tmp.path().join("out2");
    infer(
        &after,
        &[
            "--out",
            out2.to_str().unwrap(),
            "--emit-inferred",
            "redis://127.0.0.1:1?stream=inferred",
        ],
    )
    .expect_code(1);
    let inferred = out2.join("inferred");
    assert!(
        !inferred.exists() || read_parquet_dir(&inferred).is_empty(),
        "nothing written before every sink was checked"
    );
}
