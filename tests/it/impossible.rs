//! Impossible values (issue 7, "data, not crashes"): a row whose attempts,
//! event_id or time cannot be what the contract says is a decision or a
//! one-line error naming its file, never a failed run that names nothing;
//! counts saturate; the run never reads its own outputs back; `sql` is
//! read-only. Each test here failed on the code before that issue.

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use serde_json::Value as Json;

use crate::archive::{Archive, Layout, Row, ts};
use crate::cli::{Run, backfill};
use crate::e2e::Job;
use crate::reference::{Ledger, read_output, read_source};

/// One raw row: (event_id, key, seq, event_time in the file's unit,
/// status, attempts).
type Raw<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<i64>,
    Option<i64>,
    Option<&'a str>,
    Option<i64>,
);

/// A file with a nullable event_id (the shared archive helper has none),
/// Int64 attempts and event_time in `unit`.
fn write_raw(path: &Path, unit: TimeUnit, rows: &[Raw<'_>]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let time: ArrayRef = match unit {
        TimeUnit::Millisecond => Arc::new(
            rows.iter()
                .map(|r| r.3)
                .collect::<TimestampMillisecondArray>()
                .with_timezone("UTC"),
        ),
        TimeUnit::Nanosecond => Arc::new(
            rows.iter()
                .map(|r| r.3)
                .collect::<TimestampNanosecondArray>()
                .with_timezone("UTC"),
        ),
        _ => Arc::new(
            rows.iter()
                .map(|r| r.3)
                .collect::<arrow::array::TimestampMicrosecondArray>()
                .with_timezone("UTC"),
        ),
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("seq", DataType::Int64, true),
        Field::new(
            "event_time",
            DataType::Timestamp(unit, Some("UTC".into())),
            true,
        ),
        Field::new("status", DataType::Utf8, true),
        Field::new("attempts", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(rows.iter().map(|r| r.0).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.2).collect::<Int64Array>()),
            time,
            Arc::new(rows.iter().map(|r| r.4).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.5).collect::<Int64Array>()),
        ],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn report(path: &Path) -> Json {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn int(j: &Json, key: &str) -> u64 {
    j.get(key)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("report key {key}: {j}"))
}

/// `backfill run --source SRC --out OUT --run-id ID --report OUT/../ID.json`.
fn run(src: &Path, out: &Path, id: &str, extra: &[&str]) -> (Run, std::path::PathBuf) {
    let rep = out.with_file_name(format!("{id}.json"));
    let (s, o, r) = (
        src.display().to_string(),
        out.display().to_string(),
        rep.display().to_string(),
    );
    let mut args = vec![
        "run", "--source", &s, "--out", &o, "--run-id", id, "--report", &r,
    ];
    args.extend_from_slice(extra);
    (backfill(&args), rep)
}

/// Attempts of i64::MAX or 3e9 failed every run; -1000 was replayed as
/// attempt -999; rows without an event_id vanished from the balance. Now
/// they are dead-lettered (`invalid_attempts`, `missing_event_id`), once:
/// the second run skips them. Checked against the reference model.
#[test]
fn impossible_attempts_and_missing_ids_are_dead_lettered_once() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("archive");
    let t = ts("2024-01-01T10:00:00Z");
    let failed = Some("failed");
    write_raw(
        &src.join("dt=2024-01-01/part-0.parquet"),
        TimeUnit::Microsecond,
        &[
            (Some("a"), Some("k"), Some(1), Some(t), failed, Some(0)),
            (
                Some("b"),
                Some("k"),
                Some(2),
                Some(t),
                Some("processed"),
                None,
            ),
            (
                Some("max"),
                Some("k"),
                Some(3),
                Some(t),
                failed,
                Some(i64::MAX),
            ),
            (
                Some("big"),
                Some("k"),
                Some(4),
                Some(t),
                failed,
                Some(3_000_000_000),
            ),
            (
                Some("neg"),
                Some("k"),
                Some(5),
                Some(t),
                failed,
                Some(-1000),
            ),
            (
                Some("min"),
                Some("k"),
                Some(6),
                Some(t),
                failed,
                Some(i64::MIN),
            ),
            // the documented bound is still a retry count
            (
                Some("edge"),
                Some("k"),
                Some(7),
                Some(t),
                failed,
                Some(1_000_000),
            ),
            // two rows of one id-less event (same key, seq, time)
            (None, Some("k"), Some(8), Some(t), failed, Some(1)),
            (None, Some("k"), Some(8), Some(t), failed, Some(2)),
            // an id-less event that is done: resolved, not dead-lettered
            (None, Some("k"), Some(9), Some(t + 1), failed, None),
            (
                None,
                Some("k"),
                Some(9),
                Some(t + 1),
                Some("processed"),
                None,
            ),
            // nothing but a time and a status
            (None, None, None, Some(t + 2), None, None),
            // a key that looks like a separator cannot fake another id
            (None, Some("k/8"), None, Some(t), failed, None),
            // the reserved prefix is not a real id
            (
                Some("backfill:missing-event-id:1:k/8/0"),
                Some("k"),
                Some(10),
                Some(t),
                failed,
                None,
            ),
        ],
    );
    let source = read_source(&src);
    let mut ledger = Ledger::default();
    let job = Job::under(&src, &source, &work.path().join("out"));
    let (_, first) = job.run("r1", &mut ledger, 0);
    let reasons = first.by_reason();
    assert_eq!(reasons.get("invalid_attempts"), Some(&4), "{reasons:?}");
    assert_eq!(reasons.get("missing_event_id"), Some(&4), "{reasons:?}");
    assert_eq!(
        reasons.get("max_attempts_exceeded"),
        Some(&1),
        "{reasons:?}"
    );
    assert_eq!(first.resolved, 2);
    let (_, second) = job.run("r2", &mut ledger, 0);
    assert!(
        second.dlq.is_empty(),
        "dead-lettered again: {:?}",
        second.dlq.keys()
    );
    assert_eq!(second.skipped.len(), 9);
}

/// A year-3000 time in a millisecond file next to a nanosecond file failed
/// the run naming no file (nanoseconds end in 2262). The archive now reads
/// both at microseconds.
#[test]
fn year_3000_in_a_millisecond_file_next_to_a_nanosecond_file() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("archive");
    let y3000 = ts("3000-01-01T00:00:00Z");
    let t = ts("2024-01-01T10:00:00Z");
    let failed = Some("failed");
    write_raw(
        &src.join("a.parquet"),
        TimeUnit::Millisecond,
        &[(
            Some("far"),
            Some("k"),
            Some(1),
            Some(y3000 / 1000),
            failed,
            None,
        )],
    );
    write_raw(
        &src.join("b.parquet"),
        TimeUnit::Nanosecond,
        &[(
            Some("near"),
            Some("k"),
            Some(2),
            Some(t * 1000),
            failed,
            None,
        )],
    );
    let out = work.path().join("out");
    let (r, rep) = run(&src, &out, "r1", &[]);
    r.ok();
    let j = report(&rep);
    assert_eq!((int(&j, "events"), int(&j, "replayed")), (2, 2), "{j}");
    // A window that holds only the far one.
    let (r, rep) = run(
        &src,
        &out,
        "r2",
        &["--from", "2999-12-31T23:59:59.999999Z", "--dry-run"],
    );
    r.ok();
    assert_eq!(int(&report(&rep), "rows"), 1);
}

/// A value no microsecond timestamp can hold (year ~300,000 in a
/// millisecond file next to a microsecond one) fails the run with one line
/// naming the file and the column, before anything is scanned.
#[test]
fn time_beyond_microseconds_names_file_and_column() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("archive");
    let f = Some("failed");
    // 9.5e15 ms since the epoch is ~301,000 years; in µs it overflows i64.
    write_raw(
        &src.join("far-future.parquet"),
        TimeUnit::Millisecond,
        &[(
            Some("a"),
            Some("k"),
            Some(1),
            Some(9_500_000_000_000_000),
            f,
            None,
        )],
    );
    write_raw(
        &src.join("now.parquet"),
        TimeUnit::Microsecond,
        &[(
            Some("b"),
            Some("k"),
            Some(2),
            Some(ts("2024-01-01T00:00:00Z")),
            f,
            None,
        )],
    );
    let out = work.path().join("out");
    let (r, _) = run(&src, &out, "r1", &[]);
    r.expect_code(1);
    let lines = r.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(
        lines[0].starts_with("error:")
            && lines[0].contains("far-future.parquet")
            && lines[0].contains("event_time"),
        "{}",
        r.describe()
    );
    assert!(
        !out.join("_state/manifests").exists()
            || fs::read_dir(out.join("_state/manifests"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// `--from 0001-01-01` on a nanosecond archive selected nothing and
/// committed an empty run (the bound saturated to i64::MAX); `--to` beyond
/// 2262 must keep everything too.
#[test]
fn bounds_beyond_the_unit_select_everything_or_nothing() {
    let mut a = Archive::new();
    let ns = Layout::default().time(TimeUnit::Nanosecond, Some("UTC"));
    a.file(
        "p.parquet",
        &ns,
        &[
            Row::new("a", "k", 1, "2024-01-01T00:00:00Z", Some("failed")),
            Row::new("b", "k", 2, "2024-01-02T00:00:00Z", Some("failed")),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for (id, flags, rows) in [
        ("r1", vec!["--from", "0001-01-01"], 2),
        ("r2", vec!["--to", "9999-12-31T00:00:00Z"], 2),
        ("r3", vec!["--from", "0001-01-01", "--to", "1000-01-01"], 0),
        ("r4", vec!["--from", "3000-01-01"], 0),
    ] {
        let mut f = flags.clone();
        f.push("--dry-run");
        let (r, rep) = run(&a.path(), &out, id, &f);
        r.ok();
        assert_eq!(int(&report(&rep), "rows"), rows, "{flags:?}");
    }
}

/// An RFC 3339 time in nanoseconds, exactly as written (the shared window
/// helper rounds to microseconds).
fn exact_ns(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap()
}

/// An archive of one file holding one failed event.
fn one_failed_event() -> Archive {
    let mut a = Archive::new();
    a.rows(
        "p.parquet",
        &[Row::new(
            "a",
            "k",
            1,
            "2024-01-01T00:00:00Z",
            Some("failed"),
        )],
    );
    a
}

/// What one run over `a` in [from, to) replays, checked against the
/// reference model with the bounds exactly as written (the shared window
/// helper rounds to microseconds).
fn replayed_in_window(a: &Archive, from: &str, to: &str) -> Vec<String> {
    let source = read_source(&a.path());
    let work = tempfile::tempdir().unwrap();
    let src = a.path();
    let mut job = Job::under(&src, &source, &work.path().join("out"));
    job.cfg.from = Some(exact_ns(from));
    job.cfg.to = Some(exact_ns(to));
    job.flags = ["--from", from, "--to", to]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (_, exp) = job.run("r1", &mut Ledger::default(), 0);
    exp.replay.keys().cloned().collect()
}

/// Bounds with digits finer than the file's unit were rounded down: `--from
/// .0005` kept the event at .000 and `--to .0015` dropped the one at .001.
/// An event is in [from, to) exactly as written; checked against the
/// reference model, which compares in nanoseconds.
#[test]
fn sub_unit_window_bounds_are_exact() {
    for (unit, digits, from, to) in [
        (
            TimeUnit::Millisecond,
            3,
            "2024-01-01T00:00:00.0005Z",
            "2024-01-01T00:00:00.0015Z",
        ),
        (
            TimeUnit::Microsecond,
            6,
            "2024-01-01T00:00:00.0000005Z",
            "2024-01-01T00:00:00.0000015Z",
        ),
    ] {
        let at = |i: usize| format!("2024-01-01T00:00:00.{i:0digits$}Z");
        let mut a = Archive::new();
        a.file(
            "p.parquet",
            &Layout::default().time(unit, Some("UTC")),
            &[
                Row::new("e0", "k", 1, &at(0), Some("failed")),
                Row::new("e1", "k", 2, &at(1), Some("failed")),
                Row::new("e2", "k", 3, &at(2), Some("failed")),
            ],
        );
        assert_eq!(replayed_in_window(&a, from, to), ["e1"], "{unit:?}");
    }
}

/// A millisecond file beside a microsecond one (the archive reads µs):
/// DataFusion rewrote `< .0485` into the ms file's unit by truncating it to
/// `< .048`, for row-group pruning and for the filters pushed into the
/// reader, so the event at .048 vanished (exit 0), or the second scan of
/// the run missed a candidate the first had seen ("the archive changed").
/// Row groups of 2 rows, so that pruning has something to cut.
#[test]
fn mixed_unit_archive_windows_are_exact() {
    let from = "2024-01-01T00:00:00.0015Z";
    let to = "2024-01-01T00:00:00.0045Z";
    let at = |i: usize| format!("2024-01-01T00:00:00.{i:03}Z");
    let mut a = Archive::new();
    let ms = Layout {
        row_group_size: Some(2),
        ..Layout::default().time(TimeUnit::Millisecond, Some("UTC"))
    };
    let rows: Vec<Row> = (0..8)
        .map(|i| Row::new(&format!("m{i}"), "k", i as i64, &at(i), Some("failed")))
        .collect();
    a.file("ms.parquet", &ms, &rows);
    a.file(
        "us.parquet",
        &Layout::default().time(TimeUnit::Microsecond, Some("UTC")),
        &[Row::new(
            "u",
            "u",
            1,
            "2024-01-01T00:00:00.003Z",
            Some("failed"),
        )],
    );
    assert_eq!(
        replayed_in_window(&a, from, to),
        ["m2", "m3", "m4", "u"],
        "[.0015, .0045) holds .002, .003, .004 of the ms file and the µs event"
    );
}

/// missing_events summed the gaps with a wrapping add: three gaps near
/// i64::MAX read as a small number. It saturates now.
#[test]
fn missing_events_saturate() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("archive");
    let t = Some(ts("2024-01-01T10:00:00Z"));
    let f = Some("failed");
    write_raw(
        &src.join("p.parquet"),
        TimeUnit::Microsecond,
        &[
            (Some("a1"), Some("k1"), Some(i64::MIN), t, f, None),
            (Some("a2"), Some("k1"), Some(0), t, f, None),
            (Some("a3"), Some("k1"), Some(i64::MAX), t, f, None),
            (Some("b1"), Some("k2"), Some(0), t, f, None),
            (Some("b2"), Some("k2"), Some(i64::MAX), t, f, None),
        ],
    );
    let (r, rep) = run(&src, &work.path().join("out"), "r1", &["--dry-run"]);
    r.ok();
    let j = report(&rep);
    assert_eq!(int(&j, "gaps"), 3, "{j}");
    assert_eq!(int(&j, "missing_events"), u64::MAX, "{j}");
}

/// `--out` inside `--source`: the second run read the first run's replays
/// back as archive events. The outputs and state are left out of the
/// listing; both runs agree with the reference over the archive alone.
#[test]
fn outputs_inside_the_source_are_not_read_back() {
    let mut a = Archive::new();
    a.rows(
        "dt=2024-01-01/part-0.parquet",
        &[
            Row::new("a", "k", 1, "2024-01-01T00:00:00Z", Some("failed")),
            Row::new("b", "k", 2, "2024-01-01T00:00:01Z", Some("failed")).attempts(5),
            Row::new("c", "k", 3, "2024-01-01T00:00:02Z", Some("processed")),
        ],
    );
    let source = read_source(&a.path());
    let out = a.path().join("backfill-out");
    let mut ledger = Ledger::default();
    let src = a.path();
    let job = Job::under(&src, &source, &out);
    job.run("r1", &mut ledger, 0);
    assert!(!read_output(&out.join("replay"), "r1").rows.is_empty());
    job.run("r2", &mut ledger, 0);
    job.run("r3", &mut ledger, 0);

    // An explicit --state and a sink folder inside the source, likewise.
    let a = one_failed_event();
    let work = tempfile::tempdir().unwrap();
    let state = a.path().join("state").display().to_string();
    let replays = a.path().join("replays").display().to_string();
    let flags = ["--state", state.as_str(), "--replay-sink", replays.as_str()];
    for id in ["s1", "s2"] {
        let (r, rep) = run(&a.path(), &work.path().join("out"), id, &flags);
        r.ok();
        let j = report(&rep);
        assert_eq!((int(&j, "rows"), int(&j, "replayed")), (1, 1), "{id}: {j}");
    }
    assert!(a.path().join("replays/run_id=s2").exists());
}

/// The archive named through a symlink and the outputs through the real
/// path (or the other way round): prefixes compared as written did not see
/// the outputs inside the archive, and each run read the earlier runs'
/// replays back as events. Local paths are compared canonicalized now.
#[test]
fn outputs_inside_the_source_through_a_symlink_are_not_read_back() {
    // (source through the link, outputs through the real path), and the
    // other way round.
    for link_source in [true, false] {
        let work = tempfile::tempdir().unwrap();
        let real = work.path().join("real");
        let link = work.path().join("link");
        crate::archive::write_file(
            &real.join("archive/dt=2024-01-01/part-0.parquet"),
            &Layout::default(),
            &[
                Row::new("a", "k", 1, "2024-01-01T00:00:00Z", Some("failed")),
                Row::new("b", "k", 2, "2024-01-01T00:00:01Z", Some("processed")),
            ],
        );
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (src, out) = if link_source {
            (link.join("archive"), real.join("archive/out"))
        } else {
            (real.join("archive"), link.join("archive/out"))
        };
        for id in ["r1", "r2", "r3"] {
            let (r, rep) = run(&src, &out, id, &[]);
            r.ok();
            let j = report(&rep);
            // The archive's one file and two rows, never the replays.
            assert_eq!(
                (int(&j, "files_scanned"), int(&j, "rows"), int(&j, "events")),
                (1, 2, 2),
                "{id}: {j}\n{}",
                r.describe()
            );
        }
    }
}

/// `--out` that is the archive itself leaves nothing to read: refused.
#[test]
fn out_equal_to_the_source_is_refused() {
    let a = one_failed_event();
    let src = a.source();
    let r = backfill(&[
        "run",
        "--source",
        &src,
        "--out",
        &src,
        "--run-id",
        "r1",
        "--replay-sink",
        "-",
    ]);
    r.expect_code(2);
    let lines = r.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(&src),
        "{}",
        r.describe()
    );
}

/// `backfill sql` ran `COPY ... TO` and `CREATE EXTERNAL TABLE` over any
/// path. It is read-only unless `--allow-writes`.
#[test]
fn sql_is_read_only_without_allow_writes() {
    let a = one_failed_event();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("copied.parquet");
    let src = a.source();
    let copy = format!("COPY (SELECT * FROM events) TO '{}'", target.display());
    let ext = format!(
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{}'",
        work.path().display()
    );
    for sql in [
        copy.as_str(),
        ext.as_str(),
        "SELECT 1; INSERT INTO archive SELECT * FROM archive",
    ] {
        let r = backfill(&["sql", "--source", &src, sql]);
        r.expect_code(2);
        let lines = r.stderr_lines();
        assert_eq!(lines.len(), 1, "{}", r.describe());
        assert!(
            lines[0].starts_with("error:") && lines[0].contains("--allow-writes"),
            "{}",
            r.describe()
        );
    }
    assert!(!target.exists(), "COPY wrote without --allow-writes");
    for sql in [
        "SELECT count(*) FROM events",
        "WITH x AS (SELECT 1 AS n) SELECT n FROM x",
        "EXPLAIN SELECT * FROM events",
        "DESCRIBE events",
        "CREATE VIEW v AS SELECT 1 AS n; SELECT n FROM v",
    ] {
        backfill(&["sql", "--source", &src, sql]).ok();
    }
    backfill(&["sql", "--source", &src, "--allow-writes", &copy]).ok();
    assert!(target.exists(), "COPY with --allow-writes wrote nothing");
}
