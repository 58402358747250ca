//! `backfill state-at`: the state per key at T on a hand-built archive, the
//! latest event and a fold, each output kind, `--key`, the `state_at('T')`
//! table function, and bad input.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use serde_json::Value as Json;

use crate::archive::{Archive, Row};
use crate::cli::backfill;

/// T of every test.
pub const T: &str = "2024-05-01T12:00:00Z";

/// Keys a and b have state at T; c only after T; d only unprocessed.
/// a: a-3 is after T, a-4 (latest before T) failed: a-2 is its state.
/// b: b-3 is exactly at T (included). One file per day so that the window
/// can prune the next day's file.
pub fn archive() -> Archive {
    let p = Some("processed");
    let mut a = Archive::new();
    a.rows(
        "dt=2024-05-01/part-0.parquet",
        &[
            Row::new("a-1", "a", 1, "2024-05-01T10:00:00Z", p),
            Row::new("a-2", "a", 2, "2024-05-01T11:00:00Z", p),
            Row::new("a-4", "a", 4, "2024-05-01T11:30:00Z", Some("failed")),
            Row::new("a-3", "a", 3, "2024-05-01T12:30:00Z", p),
            Row::new("b-1", "b", 1, "2024-05-01T09:00:00Z", p),
            Row::new("b-2", "b", 2, "2024-05-01T11:59:59Z", p),
            Row::new("b-3", "b", 3, "2024-05-01T12:00:00Z", p),
            Row::new("c-1", "c", 1, "2024-05-01T13:00:00Z", p),
            Row::new("d-1", "d", 1, "2024-05-01T10:00:00Z", Some("failed")),
        ],
    );
    a.rows(
        "dt=2024-05-02/part-0.parquet",
        &[Row::new("a-5", "a", 5, "2024-05-02T10:00:00Z", p)],
    );
    a
}

/// `key -> event_id` of JSON rows.
fn ids(rows: &[Json]) -> BTreeMap<String, String> {
    rows.iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or_default().to_string(),
                r["event_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn json_rows(stdout: &str) -> Vec<Json> {
    serde_json::from_str::<Vec<Json>>(stdout.trim())
        .unwrap_or_else(|e| panic!("not a JSON array ({e}):\n{stdout}"))
}

#[test]
fn latest_processed_event_per_key_at_t() {
    let a = archive();
    let src = a.source();
    let run = backfill(&["state-at", "--source", &src, "--at", T, "--format", "json"]);
    run.ok();
    let rows = json_rows(&run.stdout);
    let want: BTreeMap<String, String> = [("a", "a-2"), ("b", "b-3")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(ids(&rows), want, "{}", run.describe());
    assert_eq!(rows.len(), 2, "{}", run.describe());
    // The whole row, without the internal columns.
    assert_eq!(rows[0]["payload"], "{\"body\":\"a-2\"}");
    assert_eq!(rows[0]["seq"], 2);
    assert_eq!(rows[0]["region"], "eu-a");
    assert!(rows[0].get("backfill_done").is_none(), "{}", run.describe());

    // A later T moves the state; an earlier one removes keys.
    let run = backfill(&[
        "state-at",
        "--source",
        &src,
        "--at",
        "2024-05-03T00:00:00Z",
        "--format",
        "json",
    ]);
    run.ok();
    let got = ids(&json_rows(&run.stdout));
    assert_eq!(got.get("a").map(String::as_str), Some("a-5"));
    assert_eq!(got.get("c").map(String::as_str), Some("c-1"));
    assert!(!got.contains_key("d"), "{}", run.describe());
    let run = backfill(&[
        "state-at",
        "--source",
        &src,
        "--at",
        "2024-05-01T09:30:00Z",
        "--format",
        "json",
    ]);
    run.ok();
    assert_eq!(
        ids(&json_rows(&run.stdout)).into_iter().collect::<Vec<_>>(),
        vec![("b".to_string(), "b-1".to_string())]
    );
}

#[test]
fn one_key_and_csv() {
    let a = archive();
    let src = a.source();
    let run = backfill(&[
        "state-at", "--source", &src, "--at", T, "--key", "a", "--format", "csv",
    ]);
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.describe());
    assert!(
        lines[0].starts_with("event_id,key,seq,event_time"),
        "{}",
        run.describe()
    );
    assert!(
        lines[1].starts_with("a-2,a,2,2024-05-01T11:00:00"),
        "{}",
        run.describe()
    );
    // A key without state at T: the header alone.
    let run = backfill(&[
        "state-at", "--source", &src, "--at", T, "--key", "c", "--format", "csv",
    ]);
    run.ok();
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.describe());
}

fn fold_job(dir: &Path, columns: &str) -> String {
    let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
    let path = dir.join(format!("job-{n}.toml"));
    std::fs::write(&path, format!("[state_at]\ncolumns = {{ {columns} }}\n")).expect("job file");
    path.display().to_string()
}

#[test]
fn fold_of_aggregates() {
    let a = archive();
    let src = a.source();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = fold_job(
        tmp.path(),
        r#"events = "count(*)", top = "max(seq)", total = "sum(seq)""#,
    );
    let run = backfill(&[
        "state-at", "--job", &job, "--source", &src, "--at", T, "--format", "json",
    ]);
    run.ok();
    let rows = json_rows(&run.stdout);
    assert_eq!(rows.len(), 2, "{}", run.describe());
    assert_eq!(rows[0]["key"], "a");
    assert_eq!(rows[0]["events"], 2);
    assert_eq!(rows[0]["top"], 2);
    assert_eq!(rows[0]["total"], 3);
    assert_eq!(rows[1]["key"], "b");
    assert_eq!(rows[1]["events"], 3);
    assert_eq!(rows[1]["total"], 6);
    assert!(
        rows[1]["last_event_time"]
            .as_str()
            .is_some_and(|t| t.starts_with("2024-05-01T12:00:00")),
        "{}",
        run.describe()
    );
    // The same fold through `backfill sql`.
    let run = backfill(&[
        "sql",
        "--job",
        &job,
        "--source",
        &src,
        "--format",
        "csv",
        &format!("SELECT key, events, total FROM state_at('{T}') WHERE key = 'b'"),
    ]);
    run.ok();
    assert_eq!(
        run.stdout,
        "key,events,total\nb,3,6\n",
        "{}",
        run.describe()
    );
}

/// A duplicate delivery the archive holds twice is one event to the fold;
/// a processed row without a key is no key's state (in the latest state
/// and in the fold); the archive itself as the sink is refused.
#[test]
fn each_event_once_and_no_keyless_state() {
    let p = Some("processed");
    let mut keyless = Row::new("x-1", "x", 1, "2024-05-01T10:00:00Z", p);
    keyless.key = None;
    let mut a = Archive::new();
    a.rows(
        "dt=2024-05-01/part-0.parquet",
        &[
            Row::new("a-1", "a", 1, "2024-05-01T10:00:00Z", p),
            Row::new("a-1", "a", 1, "2024-05-01T10:00:00Z", p),
            Row::new("a-2", "a", 2, "2024-05-01T11:00:00Z", p),
            keyless,
        ],
    );
    let src = a.source();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = fold_job(tmp.path(), r#"events = "count(*)", total = "sum(seq)""#);
    let run = backfill(&[
        "state-at", "--job", &job, "--source", &src, "--at", T, "--format", "json",
    ]);
    run.ok();
    let rows = json_rows(&run.stdout);
    assert_eq!(rows.len(), 1, "{}", run.describe());
    assert_eq!(rows[0]["key"], "a");
    assert_eq!(rows[0]["events"], 2, "{}", run.describe());
    assert_eq!(rows[0]["total"], 3, "{}", run.describe());
    let run = backfill(&["state-at", "--source", &src, "--at", T, "--format", "json"]);
    run.ok();
    let rows = json_rows(&run.stdout);
    assert_eq!(
        ids(&rows).into_iter().collect::<Vec<_>>(),
        vec![("a".to_string(), "a-2".to_string())]
    );
    backfill(&["state-at", "--source", &src, "--at", T, "--sink", &src])
        .expect_error(2, "is the archive itself");
}

#[test]
fn table_function_in_sql_matches_the_command() {
    let a = archive();
    let src = a.source();
    let run = backfill(&[
        "sql",
        "--source",
        &src,
        "--format",
        "csv",
        &format!("SELECT key, event_id FROM state_at('{T}') ORDER BY key"),
    ]);
    run.ok();
    assert_eq!(
        run.stdout,
        "key,event_id\na,a-2\nb,b-3\n",
        "{}",
        run.describe()
    );
    // A key filter reaches the Parquet scan.
    let run = backfill(&[
        "sql",
        "--source",
        &src,
        "--format",
        "csv",
        &format!("EXPLAIN SELECT * FROM state_at('{T}') WHERE key = 'a'"),
    ]);
    run.ok();
    let scan = run
        .stdout
        .lines()
        .find(|l| l.contains("DataSourceExec"))
        .unwrap_or_else(|| panic!("no scan in the plan\n{}", run.describe()));
    assert!(scan.contains("key@") && scan.contains("= a"), "{scan}");
    assert!(scan.contains("pruning_predicate"), "{scan}");
}

/// Every Parquet row under `dir`.
pub fn read_parquet_dir(dir: &Path) -> Vec<RecordBatch> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let f = std::fs::File::open(&p).expect("open");
                let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                    .expect("parquet")
                    .build()
                    .expect("reader");
                out.extend(r.map(|b| b.expect("batch")));
            }
        }
    }
    out
}

#[test]
fn parquet_folder_output() {
    let a = archive();
    let src = a.source();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("state");
    let job = fold_job(tmp.path(), r#"events = "count(*)""#);
    let run = backfill(&[
        "state-at",
        "--job",
        &job,
        "--source",
        &src,
        "--at",
        T,
        "--sink",
        &out.display().to_string(),
    ]);
    run.ok();
    assert!(run.stdout.is_empty(), "{}", run.describe());
    let batches = read_parquet_dir(&out);
    let mut got = BTreeMap::new();
    for b in &batches {
        let keys = b.column_by_name("key").expect("key").as_string::<i32>();
        let n = b
            .column_by_name("events")
            .expect("events")
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            got.insert(keys.value(i).to_string(), n.value(i));
        }
    }
    assert_eq!(
        got,
        BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 3)]),
        "{}",
        run.describe()
    );
    // Nothing staged is left behind.
    let names: Vec<String> = walk(&out)
        .into_iter()
        .map(|n| n.trim_start_matches(&out.display().to_string()).to_string())
        .collect();
    assert!(
        names.len() == 1
            && names[0].starts_with("/run_id=state-at-")
            && names[0].ends_with(".parquet"),
        "{names:?}"
    );
    assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() == 2);
    assert!(batches[0].column(0).null_count() == 0);
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let a = archive();
    let src = a.source();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--at".into(), "yesterday".into()],
            "--at: 'yesterday' is not an RFC 3339 timestamp",
        ),
        (
            vec![
                "--at".into(),
                T.into(),
                "--job".into(),
                fold_job(tmp.path(), r#"bal = "seq + 1""#),
            ],
            "[state_at] columns.bal = \"seq + 1\": not an aggregate",
        ),
        (
            vec![
                "--at".into(),
                T.into(),
                "--job".into(),
                fold_job(tmp.path(), r#"bal = "sum(amount)""#),
            ],
            "[state_at] columns.bal = \"sum(amount)\": unknown column",
        ),
        (
            vec![
                "--at".into(),
                T.into(),
                "--to".into(),
                "2024-05-01T11:00:00Z".into(),
            ],
            "after the window's end",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["state-at".to_string(), "--source".into(), src.clone()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = backfill(&args);
        run.expect_code(2);
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{}", run.describe());
        assert!(
            errors[0].contains(want),
            "want {want:?}\n{}",
            run.describe()
        );
        assert!(run.stdout.is_empty(), "{}", run.describe());
    }
}
