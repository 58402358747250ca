//! Volume anomalies (`backfill anomalies`, `run --anomalies`, the `volume`
//! view) on generated five-week archives with daily and weekly
//! seasonality: every hour of every outage the generator records is
//! flagged, in its direction, and nothing else; a clean archive has no
//! flag at the default threshold.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value as Json;

use crate::cli::backfill;
use crate::reference::{Value, read_source};

struct Generated {
    _dir: tempfile::TempDir,
    path: PathBuf,
    summary: Json,
}

fn generate(outages: bool) -> Generated {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive");
    let mut args = vec![
        "generate",
        "--out",
        path.to_str().unwrap(),
        "--events",
        "300000",
        "--keys",
        "60",
        "--days",
        "35",
        "--sources",
        "3",
        "--seasonal",
        "--seed",
        "7",
    ];
    if outages {
        args.push("--outages");
    }
    let run = backfill(&args);
    run.ok();
    let json = run.stdout.split_once('\n').map(|(_, j)| j).unwrap_or("");
    let summary: Json = serde_json::from_str(json).expect("generate's summary");
    Generated {
        _dir: dir,
        path,
        summary,
    }
}

fn with_outages() -> &'static Generated {
    static G: OnceLock<Generated> = OnceLock::new();
    G.get_or_init(|| generate(true))
}

fn micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .timestamp_micros()
}

/// (source, bucket start µs, direction) of every hour of every outage the
/// generator recorded: a drop and a stop are drops, a storm a spike.
fn injected(g: &Generated) -> BTreeSet<(String, i64, String)> {
    let mut hours = BTreeSet::new();
    for o in g.summary["outages"].as_array().expect("outages recorded") {
        let (from, to) = (
            micros(o["from"].as_str().unwrap()),
            micros(o["to"].as_str().unwrap()),
        );
        let direction = if o["kind"] == "storm" {
            "spike"
        } else {
            "drop"
        };
        let mut t = from;
        while t < to {
            hours.insert((
                o["source"].as_str().unwrap().to_string(),
                t,
                direction.to_string(),
            ));
            t += 3_600_000_000;
        }
    }
    assert_eq!(hours.len(), 7, "{}", g.summary);
    hours
}

fn flagged(stdout: &str) -> BTreeSet<(String, i64, String)> {
    let v: Json = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["flagged"] == true)
        .map(|r| {
            (
                r["source"].as_str().unwrap().to_string(),
                micros(r["bucket_start"].as_str().unwrap()),
                r["direction"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_injected_outage_hour_is_flagged_and_nothing_else() {
    let g = with_outages();
    let run = backfill(&[
        "anomalies",
        "--source",
        g.path.to_str().unwrap(),
        "--by",
        "source",
        "--format",
        "json",
    ]);
    run.ok();
    assert_eq!(flagged(&run.stdout), injected(g), "{}", run.describe());
    // The stop's full hours count 0: the bucket exists though no row does.
    let v: Json = serde_json::from_str(&run.stdout).unwrap();
    let zeros = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["observed"] == 0)
        .count();
    assert_eq!(zeros, 2, "{}", run.describe());
}

#[test]
fn a_clean_seasonal_archive_has_no_flag_at_the_default_threshold() {
    let g = generate(false);
    let run = backfill(&[
        "anomalies",
        "--source",
        g.path.to_str().unwrap(),
        "--all",
        "--format",
        "json",
    ]);
    run.ok();
    let v: Json = serde_json::from_str(&run.stdout).unwrap();
    let rows = v.as_array().unwrap();
    // Five weeks of hours, three sources: the buckets with 3 weekly
    // references or more are scored (from day 22 on), but day 22's 00:00:
    // the first event comes after 00:00 on day 1, so the window does not
    // cover that bucket whole, and day 22's has two references.
    assert_eq!(rows.len(), 3 * (14 * 24 - 1), "{}", run.describe());
    assert!(
        rows.iter()
            .all(|r| r["reference_buckets"].as_i64().unwrap() >= 3)
    );
    assert_eq!(flagged(&run.stdout), BTreeSet::new(), "{}", run.describe());
}

/// `run` writes the flagged buckets like gaps and counts them.
#[test]
fn run_writes_and_counts_anomalies() {
    let g = with_outages();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let report = work.path().join("report.json");
    let run = backfill(&[
        "run",
        "--source",
        g.path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--run-id",
        "v1",
        "--volume-by",
        "source",
        "--report",
        report.to_str().unwrap(),
    ]);
    run.ok();
    let r: Json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["anomalies"], 7, "{r}");
    assert_eq!(r["outputs"]["anomalies"]["rows"], 7, "{r}");
    let written = read_source(&out.join("anomalies"));
    let got: BTreeSet<(String, i64, String)> = written
        .rows
        .iter()
        .map(
            |row| match (&row["source"], &row["bucket_start"], &row["direction"]) {
                (Value::Str(s), Value::Ts(ns), Value::Str(d)) => (s.clone(), ns / 1000, d.clone()),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(got, injected(g));
    assert!(
        written
            .rows
            .iter()
            .all(|r| r["backfill_run_id"] == Value::Str("v1".into()))
    );
}

#[test]
fn bad_volume_settings_name_the_key() {
    let g = with_outages();
    let src = g.path.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["anomalies", "--source", src, "--by", "nope"],
            "--by: no column 'nope'",
        ),
        (
            vec!["anomalies", "--source", src, "--bucket", "0h"],
            "--bucket: '0h'",
        ),
        (
            vec!["anomalies", "--source", src, "--bucket", "7m"],
            "--bucket: '7m' does not divide a day",
        ),
        (
            vec!["anomalies", "--source", src, "--bucket", "5y"],
            "--bucket: '5y'",
        ),
        (
            vec!["anomalies", "--source", src, "--threshold", "-3"],
            "--threshold: -3",
        ),
        (
            vec![
                "run",
                "--source",
                src,
                "--out",
                out,
                "--volume-bucket",
                "-3m",
            ],
            "--volume-bucket: '-3m'",
        ),
        (
            vec!["run", "--source", src, "--out", out, "--volume-by", "nope"],
            "--volume-by: no column 'nope'",
        ),
    ];
    for (args, want) in cases {
        let run = backfill(&args);
        run.expect_error(2, want);
    }
    for (section, want) in [
        ("bucket = \"0h\"", "detect.volume.bucket: '0h'"),
        ("threshold = 0.0", "detect.volume.threshold: 0"),
        ("by = [\"nope\"]", "detect.volume.by: no column 'nope'"),
        ("buckets = \"1h\"", "buckets"),
    ] {
        let job = work.path().join("bad.toml");
        std::fs::write(
            &job,
            format!("source = {src:?}\n[detect.volume]\n{section}\n"),
        )
        .unwrap();
        let run = backfill(&["anomalies", "--job", job.to_str().unwrap()]);
        run.expect_error(2, want);
    }
}

/// Minute buckets under a small `--memory-limit` end with the one-line
/// out-of-memory error, not a panic: past the counts, `volume` is planned
/// for one partition (DataFusion 55's repartitioning panicked there,
/// "partition not used yet", when its spilling met the limit).
#[test]
fn minute_buckets_under_a_small_limit_fail_cleanly_or_finish() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    backfill(&[
        "generate",
        "--out",
        archive.to_str().unwrap(),
        "--events",
        "20000",
        "--keys",
        "50",
        "--sources",
        "3",
        "--days",
        "35",
        "--seasonal",
        "--seed",
        "3",
    ])
    .ok();
    let run = backfill(&[
        "anomalies",
        "--source",
        archive.to_str().unwrap(),
        "--bucket",
        "1m",
        "--memory-limit",
        "128M",
        "--format",
        "csv",
    ]);
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    match run.code {
        Some(0) => assert!(run.stdout.starts_with("source,bucket_start")),
        Some(1) => assert!(
            run.stderr.contains("out of memory under --memory-limit"),
            "{}",
            run.describe()
        ),
        _ => panic!("{}", run.describe()),
    }
}
