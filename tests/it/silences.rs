//! Time silences (`backfill silences`, `run --silences`, the `silences`
//! view) on a generated archive whose outages the generator records: the
//! stop it injected is found exactly, with the events on either side read
//! from the files here, and nothing else is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value as Json;

use crate::cli::backfill;
use crate::reference::{Value, read_source};

/// One seasonal archive with outages, generated once for the module.
struct Generated {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// The generator's record of what it injected.
    summary: Json,
    /// Per source, (first arrival in µs, event_id), in time order.
    arrivals: BTreeMap<String, Vec<(i64, String)>>,
}

fn generated() -> &'static Generated {
    static G: OnceLock<Generated> = OnceLock::new();
    G.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        let run = backfill(&[
            "generate",
            "--out",
            path.to_str().unwrap(),
            "--events",
            "60000",
            "--keys",
            "60",
            "--days",
            "10",
            "--sources",
            "3",
            "--seasonal",
            "--outages",
            "--seed",
            "11",
        ]);
        run.ok();
        let json = run.stdout.split_once('\n').map(|(_, j)| j).unwrap_or("");
        let summary: Json = serde_json::from_str(json).expect("generate's summary");
        // An event arrives once, at its earliest row (as the view counts).
        let mut first: BTreeMap<(String, String), i64> = BTreeMap::new();
        for r in read_source(&path).rows {
            let (Some(Value::Str(id)), Some(Value::Str(src)), Some(Value::Ts(ns))) =
                (r.get("event_id"), r.get("source"), r.get("event_time"))
            else {
                continue;
            };
            let t = first.entry((src.clone(), id.clone())).or_insert(ns / 1000);
            *t = (*t).min(ns / 1000);
        }
        let mut arrivals: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
        for ((src, id), t) in first {
            arrivals.entry(src).or_default().push((t, id));
        }
        for v in arrivals.values_mut() {
            v.sort();
        }
        Generated {
            _dir: dir,
            path,
            summary,
            arrivals,
        }
    })
}

fn micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .timestamp_micros()
}

/// The injected outage of `kind`: (source, from µs, to µs).
fn outage(g: &Generated, kind: &str) -> (String, i64, i64) {
    let o = g.summary["outages"]
        .as_array()
        .expect("outages recorded")
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} outage in {}", g.summary));
    (
        o["source"].as_str().unwrap().to_string(),
        micros(o["from"].as_str().unwrap()),
        micros(o["to"].as_str().unwrap()),
    )
}

/// The arrivals of `source` either side of [from, to): the last before
/// `from` and the first at or after `to`.
fn around(g: &Generated, source: &str, from: i64, to: i64) -> ((i64, String), (i64, String)) {
    let a = &g.arrivals[source];
    assert!(
        !a.iter().any(|(t, _)| (from..to).contains(t)),
        "the stop of {source} has arrivals in it"
    );
    let before = a.iter().rev().find(|(t, _)| *t < from).unwrap().clone();
    let after = a.iter().find(|(t, _)| *t >= to).unwrap().clone();
    (before, after)
}

/// (group, silent_from µs, silent_to µs, before, after) of JSON rows.
fn rows(stdout: &str) -> Vec<(String, i64, i64, String, Option<String>)> {
    let v: Json = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or_default().to_string(),
                micros(r["silent_from"].as_str().unwrap()),
                micros(r["silent_to"].as_str().unwrap()),
                r["before_event_id"].as_str().unwrap().to_string(),
                r["after_event_id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn the_injected_stop_is_the_only_silence() {
    let g = generated();
    let (source, from, to) = outage(g, "stop");
    let ((t0, id0), (t1, id1)) = around(g, &source, from, to);
    let run = backfill(&[
        "silences",
        "--source",
        g.path.to_str().unwrap(),
        "--by",
        "source",
        "--threshold",
        "45m",
        "--format",
        "json",
    ]);
    run.ok();
    assert_eq!(
        rows(&run.stdout),
        vec![(source.clone(), t0, t1, id0.clone(), Some(id1.clone()))],
        "{}",
        run.describe()
    );
    // Its duration and expected count follow from the interval and the
    // source's cadence.
    let v: Json = serde_json::from_str(&run.stdout).unwrap();
    let r = &v[0];
    assert_eq!(
        r["duration_seconds"].as_f64().unwrap(),
        (t1 - t0) as f64 / 1e6
    );
    let median = r["median_interval_seconds"].as_f64().unwrap();
    assert!(median > 0.0 && median < 600.0, "{r}");
    let expected = r["expected_events"].as_f64().unwrap();
    assert!(
        (expected - (t1 - t0) as f64 / 1e6 / median).abs() < 1e-6,
        "{r}"
    );
    // Relative to the cadence (about 30 s), 20x median finds the stop and,
    // inside the drop to 10%, the longer waits between the few events
    // left: nothing outside the two outages.
    let run = backfill(&[
        "silences",
        "--source",
        g.path.to_str().unwrap(),
        "--by",
        "source",
        "--threshold",
        "20x median",
        "--format",
        "json",
    ]);
    run.ok();
    let found = rows(&run.stdout);
    let (drop_source, drop_from, drop_to) = outage(g, "drop");
    let ((d0, _), (d1, _)) = around_drop(g, &drop_source, drop_from, drop_to);
    assert!(
        found.contains(&(source.clone(), t0, t1, id0, Some(id1))),
        "{}",
        run.describe()
    );
    let in_drop = found
        .iter()
        .filter(|r| r.0 == drop_source && r.1 >= d0 && r.2 <= d1)
        .count();
    assert!(in_drop >= 1, "{}", run.describe());
    assert_eq!(found.len(), 1 + in_drop, "{}", run.describe());
}

/// The arrivals of `source` just outside [from, to) (events still arrive
/// inside it).
fn around_drop(g: &Generated, source: &str, from: i64, to: i64) -> ((i64, String), (i64, String)) {
    let a = &g.arrivals[source];
    assert!(
        a.iter().any(|(t, _)| (from..to).contains(t)),
        "a drop, not a stop"
    );
    let before = a.iter().rev().find(|(t, _)| *t < from).unwrap().clone();
    let after = a.iter().find(|(t, _)| *t >= to).unwrap().clone();
    (before, after)
}

/// A group still silent at the window's end: its silence runs to `--to`,
/// with no event after it.
#[test]
fn a_stopped_source_is_silent_to_the_window_end() {
    let g = generated();
    let (source, from, _) = outage(g, "stop");
    let end = from + 3_600_000_000;
    let to = chrono::DateTime::from_timestamp_micros(end)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (before, _) = around(g, &source, from, end);
    let run = backfill(&[
        "silences",
        "--source",
        g.path.to_str().unwrap(),
        "--to",
        &to,
        "--by",
        "source",
        "--threshold",
        "45m",
        "--format",
        "json",
    ]);
    run.ok();
    assert_eq!(
        rows(&run.stdout),
        vec![(source, before.0, end, before.1, None)],
        "{}",
        run.describe()
    );
}

/// `run` writes them like gaps (a Parquet folder under OUT, with the run's
/// columns) and counts them in the report; the job file's section asks.
#[test]
fn run_writes_and_counts_silences() {
    let g = generated();
    let (source, from, to) = outage(g, "stop");
    let ((t0, id0), (t1, _)) = around(g, &source, from, to);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let job = work.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "source = {:?}\nout = {:?}\n[detect.silence]\nby = [\"source\"]\nthreshold = \"45m\"\n",
            g.path.to_str().unwrap(),
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    let report = work.path().join("report.json");
    let run = backfill(&[
        "run",
        "--job",
        job.to_str().unwrap(),
        "--run-id",
        "s1",
        "--report",
        report.to_str().unwrap(),
    ]);
    run.ok();
    let r: Json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["silences"], 1, "{r}");
    assert_eq!(r["outputs"]["silences"]["rows"], 1, "{r}");
    let written = read_source(&out.join("silences"));
    assert_eq!(written.rows.len(), 1);
    let row = &written.rows[0];
    assert_eq!(row["source"], Value::Str(source));
    assert_eq!(row["silent_from"], Value::Ts(t0 * 1000));
    assert_eq!(row["silent_to"], Value::Ts(t1 * 1000));
    assert_eq!(row["before_event_id"], Value::Str(id0.clone()));
    assert_eq!(row["backfill_run_id"], Value::Str("s1".into()));
    // A dry run reports what the sink would get and writes nothing; `-`
    // prints the rows as JSON lines (the summary goes to stderr).
    let out3 = work.path().join("out3");
    let run = backfill(&[
        "run",
        "--job",
        job.to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
        "--run-id",
        "s3",
        "--dry-run",
        "--report",
        report.to_str().unwrap(),
    ]);
    run.ok();
    let r: Json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["silences"], 1, "{r}");
    assert_eq!(r["outputs"]["silences"]["rows"], 1, "{r}");
    assert!(!out3.join("silences").exists());
    let run = backfill(&[
        "run",
        "--job",
        job.to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
        "--run-id",
        "s4",
        "--silences-sink",
        "-",
    ]);
    run.ok();
    let lines: Vec<Json> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.describe());
    assert_eq!(
        lines[0]["before_event_id"],
        id0.as_str(),
        "{}",
        run.describe()
    );
    // Without the section (and no flag) no silences are looked for.
    let out2 = work.path().join("out2");
    let run = backfill(&[
        "run",
        "--source",
        g.path.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--run-id",
        "s2",
        "--report",
        report.to_str().unwrap(),
    ]);
    run.ok();
    let r: Json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["silences"], 0, "{r}");
    assert!(r["outputs"].get("silences").is_none(), "{r}");
    assert!(!Path::new(&out2.join("silences")).exists());
}

/// Every bad setting is one line naming its key or flag, exit 2, before
/// anything is written.
#[test]
fn bad_silence_settings_name_the_key() {
    let g = generated();
    let src = g.path.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["silences", "--source", src, "--by", "nope"],
            "--by: no column 'nope'",
        ),
        (
            vec!["silences", "--source", src, "--threshold", "5y"],
            "--threshold: '5y'",
        ),
        (
            vec!["silences", "--source", src, "--threshold", "-3m"],
            "--threshold: '-3m'",
        ),
        (
            vec!["silences", "--source", src, "--threshold", "0x median"],
            "--threshold: '0x median'",
        ),
        (
            vec!["run", "--source", src, "--out", out, "--silence-by", "nope"],
            "--silence-by: no column 'nope'",
        ),
        (
            vec![
                "run",
                "--source",
                src,
                "--out",
                out,
                "--silence-threshold",
                "0m",
            ],
            "--silence-threshold: '0m'",
        ),
        (
            vec![
                "run",
                "--source",
                src,
                "--out",
                out,
                "--silences",
                "--shard",
                "0/2",
            ],
            "--shard: silences",
        ),
    ];
    for (args, want) in cases {
        let run = backfill(&args);
        run.expect_error(2, want);
    }
    for (section, want) in [
        ("by = [\"nope\"]", "detect.silence.by: no column 'nope'"),
        ("by = []", "detect.silence.by: no grouping column"),
        ("threshold = \"5y\"", "detect.silence.threshold: '5y'"),
        ("treshold = \"5m\"", "treshold"),
    ] {
        let job = work.path().join("bad.toml");
        std::fs::write(
            &job,
            format!("source = {src:?}\n[detect.silence]\n{section}\n"),
        )
        .unwrap();
        let run = backfill(&["silences", "--job", job.to_str().unwrap()]);
        run.expect_error(2, want);
    }
    assert!(!Path::new(out).exists());
}

/// The same rows with event times in nanoseconds and in microseconds give
/// the same silences and the same anomalies: the views measure in
/// microseconds whatever the archive's unit (they once subtracted raw
/// nanoseconds from a threshold in microseconds, and bucketed a
/// nanosecond archive in the year 55969).
#[test]
fn the_archive_time_unit_changes_nothing() {
    use crate::archive::{Archive, Layout, Row};
    use arrow::datatypes::TimeUnit;
    let start = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
        .unwrap()
        .timestamp();
    let mut rows = vec![];
    for key in ["k1", "k2"] {
        for i in 0..(9 * 24 * 6) {
            // k1 stops for three hours on day 5, from 10:00.
            let minutes = i * 10;
            if key == "k1" && (4 * 1440 + 600..4 * 1440 + 780).contains(&minutes) {
                continue;
            }
            let t = chrono::DateTime::from_timestamp(start + minutes * 60 + 7, 123_456_789)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            rows.push(Row::new(
                &format!("{key}-{i}"),
                key,
                i,
                &t,
                Some("processed"),
            ));
        }
    }
    let outputs = |unit: TimeUnit| {
        let mut a = Archive::new();
        a.file(
            "dt=2024-01-01/part-0.parquet",
            &Layout::default().time(unit, Some("UTC")),
            &rows,
        );
        let s = a.source();
        let silences = backfill(&[
            "silences",
            "--source",
            &s,
            "--by",
            "key",
            "--threshold",
            "1h",
            "--format",
            "csv",
        ]);
        silences.ok();
        let anomalies = backfill(&[
            "anomalies",
            "--source",
            &s,
            "--by",
            "key",
            "--all",
            "--format",
            "csv",
        ]);
        anomalies.ok();
        (silences.stdout.clone(), anomalies.stdout.clone())
    };
    let (ns_silences, ns_anomalies) = outputs(TimeUnit::Nanosecond);
    let (us_silences, us_anomalies) = outputs(TimeUnit::Microsecond);
    assert_eq!(ns_silences, us_silences);
    assert_eq!(ns_anomalies, us_anomalies);
    let found: Vec<&str> = us_silences.lines().skip(1).collect();
    assert_eq!(found.len(), 1, "{us_silences}");
    assert!(
        found[0].starts_with("k1,2024-01-05T09:50:07.123456Z,2024-01-05T13:00:07.123456Z,11400.0,"),
        "{us_silences}"
    );
    assert!(
        us_anomalies.lines().count() > 100 && us_anomalies.contains("k1,2024-01-05T10:00:00Z"),
        "{us_anomalies}"
    );
}
