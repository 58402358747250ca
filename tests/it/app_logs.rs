//! Application logs as evidence (`--logs`, `[logs]`): on a generated
//! archive whose worker logs agree with it but for injected disagreements
//! (errors logged after processing, failures the archive missed), the run's
//! replays, dead letters and contradicted events are the reference model's
//! (tests/it/reference.rs, which reads the NDJSON itself); logs that only
//! agree change nothing; the `logs` table and the views in `backfill sql`;
//! a field mapping, gzip and a glob through a job file; bad input is one
//! line naming the file and field, exit 2, nothing committed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::cli::{backfill, backfill_in};
use crate::e2e::{Job, strings};
use crate::reference::{Config, Ledger, Logs, Value, read_output, read_source};

/// A generated archive and its worker's logs.
struct Generated {
    dir: tempfile::TempDir,
    summary: Json,
}

impl Generated {
    fn new(seed: u64) -> Generated {
        let dir = tempfile::tempdir().unwrap();
        let run = backfill(&[
            "generate",
            "--out",
            dir.path().join("archive").to_str().unwrap(),
            "--events",
            "20000",
            "--keys",
            "50",
            "--seed",
            &seed.to_string(),
            "--logs",
            dir.path().join("logs").to_str().unwrap(),
        ]);
        run.ok();
        let json = run.stdout.split_once('\n').map(|(_, j)| j).unwrap_or("");
        let summary: Json = serde_json::from_str(json).expect("generate's summary");
        Generated { dir, summary }
    }

    fn archive(&self) -> PathBuf {
        self.dir.path().join("archive")
    }

    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
}

fn report(path: &Path) -> Json {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// The contradicted rows a run wrote, checked against the reference's.
fn check_contradicted(
    out: &Path,
    run_id: &str,
    exp: &std::collections::BTreeMap<String, crate::reference::Contradicted>,
) {
    let got = read_output(&out.join("contradicted"), run_id);
    let mut errs = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for r in &got.rows {
        let Some(Value::Str(id)) = r.get("event_id") else {
            errs.push(format!("a row without event_id: {r:?}"));
            continue;
        };
        seen.insert(id.clone());
        let Some(want) = exp.get(id) else {
            errs.push(format!("{id} is not contradicted: {r:?}"));
            continue;
        };
        let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Str);
        for (col, want) in [
            ("key", want.key.clone()),
            ("seq", want.seq.clone()),
            ("processed_at", Value::Ts(want.processed_at)),
            ("error_at", Value::Ts(want.first.time.unwrap())),
            ("level", text(&want.first.level)),
            ("message", text(&want.first.message)),
            ("error", text(&want.first.error)),
            ("log_lines", Value::Int(want.log_lines)),
            ("backfill_run_id", Value::Str(run_id.into())),
        ] {
            if r.get(col) != Some(&want) {
                errs.push(format!("{id}: {col} is {:?}, want {want:?}", r.get(col)));
            }
        }
    }
    for id in exp.keys().filter(|id| !seen.contains(*id)) {
        errs.push(format!("{id} is contradicted but not written"));
    }
    assert!(
        errs.is_empty(),
        "contradicted differs:\n  {}",
        errs.join("\n  ")
    );
}

/// Two runs over the generated archive and its logs: the replays, dead
/// letters, gaps (tests/it/e2e.rs's checks) and contradicted events are
/// the reference's, which counts each error line as a failed attempt; the
/// injected disagreements are all found, and they send more events to the
/// DLQ than the archive alone.
#[test]
fn generated_logs_decide_like_the_reference() {
    let g = Generated::new(5);
    let (archive, logs) = (g.archive(), g.logs());
    let source = read_source(&archive);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let cfg = Config {
        logs: Some(Logs::read(&logs)),
        ..Config::default()
    };
    let job =
        Job::under(&archive, &source, &out).with(cfg, strings(&["--logs", logs.to_str().unwrap()]));
    let mut ledger = Ledger::default();
    let (_, exp) = job.run("logs-1", &mut ledger, 0);
    check_contradicted(&out, "logs-1", &exp.contradicted);
    let injected = g.summary["logs_contradicting"].as_u64().unwrap();
    assert!(injected > 0, "{}", g.summary);
    assert_eq!(exp.contradicted.len() as u64, injected, "{}", g.summary);
    let r = report(&work.path().join("report-logs-1.json"));
    assert_eq!(r["contradicted"].as_u64(), Some(injected), "{r}");
    assert_eq!(
        r["logs"]["lines"].as_u64(),
        g.summary["log_lines"].as_u64(),
        "{r}"
    );
    assert_eq!(
        r["outputs"]["contradicted"]["rows"].as_u64(),
        Some(injected),
        "{r}"
    );
    // Resolved events stay in the balance once.
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(
        n("resolved") + n("replayed") + n("dead_lettered") + n("skipped_dead_lettered") + n("held"),
        n("events"),
        "{r}"
    );

    // The logs' extra failures: more dead letters than the archive alone.
    let without = Job::under(&archive, &source, &work.path().join("plain"));
    let (_, plain) = without.run("plain-1", &mut Ledger::default(), 0);
    assert!(
        exp.dlq.len() > plain.dlq.len(),
        "with logs {} dead letters, without {}",
        exp.dlq.len(),
        plain.dlq.len()
    );

    // The second run: the ledger's replays on top of the logs' retries.
    let (_, exp2) = job.run("logs-2", &mut ledger, 0);
    check_contradicted(&out, "logs-2", &exp2.contradicted);
}

/// Logs that agree with the archive (an ERROR line per failed row, INFO
/// otherwise) decide nothing differently, and contradict nothing.
#[test]
fn agreeing_logs_change_nothing() {
    let g = Generated::new(8);
    let agreeing = g.dir.path().join("agreeing");
    fs::create_dir(&agreeing).unwrap();
    let all = Logs::read(&g.logs());
    let mut f = fs::File::create(agreeing.join("app.jsonl")).unwrap();
    let mut kept = 0;
    for l in &all.lines {
        // The injected lines: after processing, and beyond the archive.
        if matches!(
            l.message.as_deref(),
            Some("post-commit hook failed" | "retry failed")
        ) {
            continue;
        }
        let mut o = serde_json::Map::new();
        if let Some(id) = &l.event_id {
            o.insert("event_id".into(), id.clone().into());
        }
        o.insert("timestamp".into(), (l.time.unwrap() / 1_000_000).into());
        o.insert("level".into(), l.level.clone().into());
        o.insert("message".into(), l.message.clone().into());
        writeln!(f, "{}", Json::Object(o)).unwrap();
        kept += 1;
    }
    drop(f);
    assert!(kept > 0);
    let work = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> Json {
        let report = work.path().join(format!("{name}.json"));
        let mut args = vec![
            "run",
            "--source",
            g.dir.path().join("archive").to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(strings(&[
            "--out",
            work.path().join(name).to_str().unwrap(),
            "--run-id",
            name,
            "--report",
            report.to_str().unwrap(),
        ]));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        backfill(&args).ok();
        self::report(&report)
    };
    let plain = run("plain", &[]);
    let logged = run("logged", &["--logs", agreeing.to_str().unwrap()]);
    for k in ["replayed", "dead_lettered", "resolved", "gaps", "conflicts"] {
        assert_eq!(plain[k], logged[k], "{k}: {plain}\n{logged}");
    }
    assert_eq!(
        plain["dead_lettered_by_reason"],
        logged["dead_lettered_by_reason"]
    );
    assert_eq!(logged["contradicted"].as_u64(), Some(0), "{logged}");
    assert_eq!(logged["logs"]["lines"].as_u64(), Some(kept), "{logged}");
}

/// A job file maps other field names; gzip and a glob; `backfill sql`
/// shows `logs`, `log_attempts` and `contradicted`; `explain` plans
/// `contradicted`; `--contradicted-sink -` prints the rows.
#[test]
fn mapped_fields_gzip_glob_and_sql() {
    let g = Generated::new(3);
    let src = read_source(&g.archive());
    // The first processed event, and a failed one.
    let processed = src
        .rows
        .iter()
        .find(|r| r.get("status") == Some(&Value::Str("processed".into())))
        .unwrap();
    let (Some(Value::Str(done_id)), Some(Value::Ts(done_at))) =
        (processed.get("event_id"), processed.get("event_time"))
    else {
        panic!("no processed row")
    };
    let dir = g.dir.path().join("mapped");
    fs::create_dir(&dir).unwrap();
    let later = chrono::DateTime::from_timestamp_nanos(done_at + 60_000_000_000)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let lines = format!(
        "{{\"evt\":\"{done_id}\",\"ts\":\"{later}\",\"lvl\":\"Fatal\",\"msg\":\"lost\",\"stack\":\"at x\"}}\n\
         {{\"evt\":\"{done_id}\",\"ts\":\"{later}\",\"lvl\":\"INFO\",\"msg\":\"fine\"}}\n"
    );
    let mut gz = flate2::write::GzEncoder::new(
        fs::File::create(dir.join("app-1.jsonl.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(lines.as_bytes()).unwrap();
    gz.finish().unwrap();
    // Not matched by the glob: read, it would fail.
    fs::write(dir.join("other.jsonl"), "not json\n").unwrap();
    let job = g.dir.path().join("job.toml");
    fs::write(
        &job,
        format!(
            "source = \"{}\"\n\n[logs]\npaths = [\"{}/app-*.jsonl.gz\"]\nevent_id = \"evt\"\ntimestamp = \"ts\"\nlevel = \"lvl\"\nmessage = \"msg\"\nerror = \"stack\"\n",
            g.archive().display(),
            dir.display()
        ),
    )
    .unwrap();
    let job = job.to_str().unwrap();
    let run = backfill(&[
        "sql",
        "--job",
        job,
        "--format",
        "csv",
        "SELECT count(*) AS n FROM logs; SELECT event_id, level, message, error, log_lines FROM contradicted; SELECT error_lines FROM log_attempts",
    ]);
    run.ok();
    assert!(run.stdout.contains("n\n2\n"), "{}", run.describe());
    assert!(
        run.stdout.contains(&format!("{done_id},Fatal,lost,at x,1")),
        "{}",
        run.describe()
    );
    let explain = backfill(&["explain", "--job", job]);
    explain.ok();
    assert!(
        explain.stdout.contains("== contradicted"),
        "{}",
        explain.describe()
    );
    // The run prints the contradicted rows on stdout.
    let out = g.dir.path().join("out");
    let run = backfill(&[
        "run",
        "--job",
        job,
        "--out",
        out.to_str().unwrap(),
        "--contradicted-sink",
        "-",
    ]);
    run.ok();
    assert!(run.stdout.contains(done_id.as_str()), "{}", run.describe());
}

/// Bad logs: one `error:` line naming the file (and line and field), exit
/// 2, nothing committed.
#[test]
fn bad_logs_are_named_and_nothing_is_committed() {
    let g = Generated::new(4);
    let dir = g.dir.path().join("bad");
    fs::create_dir(&dir).unwrap();
    let ok_line = "{\"event_id\":\"a\",\"timestamp\":1,\"level\":\"ERROR\"}\n";
    let gz = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    // A gzip file whose deflate stream is damaged past its header.
    let mut corrupt = gz(&ok_line.repeat(100));
    let mid = corrupt.len() / 2;
    corrupt[12..mid].fill(0xff);
    // One byte past the longest line read.
    let long = format!(
        "{ok_line}{{\"event_id\":\"a\",\"timestamp\":1,\"level\":\"INFO\",\"message\":\"{}\"}}\n",
        "x".repeat(16 << 20)
    );
    let mut latin1 = ok_line.as_bytes().to_vec();
    latin1.extend(b"{\"event_id\":\"caf\xe9\",\"timestamp\":1,\"level\":\"ERROR\"}\n");
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "not-json.ndjson",
            "{\"event_id\":\"a\",\"timestamp\":1,\"level\":\"ERROR\"}\nhello world\n".into(),
            "",
            "not-json.ndjson, line 2: not a JSON object per line",
        ),
        (
            "bad-time.jsonl",
            "{\"event_id\":\"a\",\"timestamp\":\"yesterday\",\"level\":\"ERROR\"}\n".into(),
            "",
            "bad-time.jsonl, line 1: field 'timestamp' (timestamp) is 'yesterday'",
        ),
        (
            "no-level.jsonl",
            "{\"event_id\":\"a\",\"timestamp\":1}\n".into(),
            "",
            "no-level.jsonl, line 1: the line names event a but has no 'level' (level)",
        ),
        (
            "mapped.jsonl",
            "{\"event_id\":\"a\",\"timestamp\":1,\"level\":\"ERROR\"}\n".into(),
            "[logs]\nevent_id = \"evt\"\n",
            "mapped.jsonl: no line has the field 'evt' (event_id)",
        ),
        (
            "typo.jsonl",
            "{\"event_id\":\"a\",\"timestamp\":1,\"level\":\"ERROR\"}\n".into(),
            "[logs]\nevent = \"evt\"\n",
            "unknown field `event`",
        ),
        (
            "array.ndjson",
            format!("{ok_line}[1, 2]\n").into(),
            "",
            "array.ndjson, line 2: not a JSON object per line (NDJSON): the line holds an array",
        ),
        (
            "null.ndjson",
            "\n  null\n".into(),
            "",
            "null.ndjson, line 2: not a JSON object",
        ),
        (
            "two.ndjson",
            format!("{}\n", ok_line.trim_end().repeat(2)).into(),
            "",
            "two.ndjson, line 1: more than one JSON object",
        ),
        (
            "latin1.ndjson",
            latin1,
            "",
            "latin1.ndjson, line 2: not UTF-8",
        ),
        (
            "far.ndjson",
            "{\"event_id\":\"a\",\"timestamp\":9223372036854775,\"level\":\"ERROR\"}\n".into(),
            "",
            "far.ndjson, line 1: field 'timestamp' (timestamp) is '9223372036854775'",
        ),
        (
            "long.ndjson",
            long.into(),
            "",
            "long.ndjson: line 2 is longer than 16 MiB",
        ),
        (
            "empty.jsonl.gz",
            vec![],
            "",
            "empty.jsonl.gz: not valid gzip: the file is empty",
        ),
        (
            "plain.jsonl.gz",
            ok_line.into(),
            "",
            "plain.jsonl.gz: not valid gzip: it does not start with gzip's magic bytes",
        ),
        (
            "corrupt.jsonl.gz",
            corrupt,
            "",
            "corrupt.jsonl.gz: not valid gzip: ",
        ),
    ];
    for (name, text, job_text, want) in cases {
        let file = dir.join(name);
        fs::write(&file, text).unwrap();
        let job = dir.join(format!("{name}.toml"));
        fs::write(&job, job_text).unwrap();
        let out = dir.join(format!("out-{name}"));
        let run = backfill(&[
            "run",
            "--job",
            job.to_str().unwrap(),
            "--source",
            g.archive().to_str().unwrap(),
            "--logs",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        run.expect_error(2, want);
        assert!(
            !out.join("_state").join("log").exists()
                || fs::read_dir(out.join("_state").join("log"))
                    .unwrap()
                    .count()
                    == 0,
            "{name}: something was committed"
        );
        assert!(!out.join("replay").join("run_id=").exists());
    }
    // A location with no logs in it, and one that does not exist.
    let empty = dir.join("empty");
    fs::create_dir(&empty).unwrap();
    for (loc, want) in [
        (empty.clone(), "no log files found"),
        (dir.join("nope"), "no such file or directory"),
    ] {
        backfill(&[
            "gaps",
            "--source",
            g.archive().to_str().unwrap(),
            "--logs",
            loc.to_str().unwrap(),
        ])
        .expect_error(2, want);
    }
    // `sql` names the file too.
    fs::write(dir.join("q.ndjson"), "[1, 2]\n").unwrap();
    backfill(&[
        "sql",
        "--source",
        g.archive().to_str().unwrap(),
        "--logs",
        dir.join("q.ndjson").to_str().unwrap(),
        "SELECT count(*) FROM logs",
    ])
    .expect_error(2, "q.ndjson");
    // --contradicted-sink without logs, and its key in a job file.
    backfill(&[
        "run",
        "--source",
        g.archive().to_str().unwrap(),
        "--out",
        dir.join("o").to_str().unwrap(),
        "--contradicted-sink",
        dir.join("c").to_str().unwrap(),
    ])
    .expect_error(2, "--contradicted-sink");
    let job = dir.join("sink.toml");
    fs::write(
        &job,
        format!("[sinks]\ncontradicted = \"{}\"\n", dir.join("c").display()),
    )
    .unwrap();
    backfill(&[
        "run",
        "--job",
        job.to_str().unwrap(),
        "--source",
        g.archive().to_str().unwrap(),
        "--out",
        dir.join("o").to_str().unwrap(),
    ])
    .expect_error(
        2,
        "[sinks] contradicted: contradicted events come from application logs",
    );
    // A gzip file cut short is a read that failed (exit 1: it may still
    // be being written), not a file that is not gzip.
    let whole = gz(&ok_line.repeat(1000));
    let cut = dir.join("cut.jsonl.gz");
    fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let archive = g.archive();
    let run = |logs: &Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--source",
            archive.to_str().unwrap(),
            "--logs",
            logs.to_str().unwrap(),
        ];
        args.extend(extra);
        backfill(&args)
    };
    run(&cut, &["--out", dir.join("o").to_str().unwrap()])
        .expect_error(1, "cut.jsonl.gz: cannot read: the gzip stream ends early");
    // A sink may not be the logs' folder, as it may not be the archive.
    let logs = dir.join("logs");
    fs::create_dir(&logs).unwrap();
    fs::write(logs.join("a.ndjson"), ok_line).unwrap();
    run(
        &logs,
        &[
            "--out",
            dir.join("o").to_str().unwrap(),
            "--contradicted-sink",
            logs.to_str().unwrap(),
        ],
    )
    .expect_error(
        2,
        &format!(
            "the contradicted sink {} is the logs folder",
            logs.display()
        ),
    );
    // A URL with user info is named with its glob (after redaction).
    backfill(&[
        "sql",
        "--source",
        g.archive().to_str().unwrap(),
        "--logs",
        "s3://user:secret@bucket/logs/app-*.jsonl",
        "SELECT count(*) FROM logs",
    ])
    .expect_error(
        2,
        "'s3://***@bucket/logs/app-*.jsonl': credentials in the URL",
    );
}

/// `run` over the generated archive, in its folder (relative paths are
/// below it), with `--logs` for each of `logs`, then `args`; the report
/// goes to `report-NAME.json` there.
fn run_in(g: &Generated, name: &str, logs: &[&str], args: &[&str]) -> crate::cli::Run {
    let dir = g.dir.path();
    let report = dir.join(format!("report-{name}.json"));
    let mut all = strings(&[
        "run",
        "--source",
        g.archive().to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    for l in logs {
        all.extend(strings(&["--logs", l]));
    }
    all.extend(strings(args));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    backfill_in(&all, &[], Some(dir))
}

/// A file named twice (the folder twice, a glob in it, another spelling
/// of it) is read once: the same files, lines, error lines and decisions
/// as the folder named once.
#[test]
fn a_file_named_twice_is_read_once() {
    let g = Generated::new(6);
    let logs = g.logs();
    let logs = logs.to_str().unwrap();
    let report = |name: &str, given: &[&str]| -> Json {
        run_in(&g, name, given, &["--out", name, "--run-id", name]).ok();
        self::report(&g.dir.path().join(format!("report-{name}.json")))
    };
    let once = report("once", &[logs]);
    let twice = report("twice", &[logs, logs, "logs/*.ndjson", "./logs/"]);
    assert!(once["logs"]["error_lines"].as_u64() > Some(0), "{once}");
    for k in ["replayed", "dead_lettered", "resolved", "contradicted"] {
        assert_eq!(once[k], twice[k], "{k}: {once}\n{twice}");
    }
    assert_eq!(once["logs"], twice["logs"]);
}

/// `run` and `sql` fold a level's case by one rule (Unicode upper case,
/// as SQL's `upper`): `échec` and `straße` are `ÉCHEC` and `STRASSE`.
#[test]
fn error_levels_fold_case_as_sql_upper_does() {
    let g = Generated::new(7);
    let dir = g.dir.path().join("unicode");
    fs::create_dir(&dir).unwrap();
    let mut text = String::new();
    for (i, level) in [
        "échec", "Échec", "ÉCHEC", "straße", "STRASSE", "info", "ECHEC",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!(
            "{{\"event_id\":\"u{i}\",\"timestamp\":1,\"level\":\"{level}\"}}\n"
        ));
    }
    fs::write(dir.join("app.ndjson"), text).unwrap();
    let job = dir.join("job.toml");
    fs::write(
        &job,
        format!(
            "source = \"{}\"\n\n[logs]\npaths = [\"{}\"]\nerror_levels = [\"ÉCHEC\", \"straße\"]\n",
            g.archive().display(),
            dir.display()
        ),
    )
    .unwrap();
    let job = job.to_str().unwrap();
    let sql = backfill(&[
        "sql",
        "--job",
        job,
        "--format",
        "csv",
        "SELECT sum(error_lines) AS n FROM log_attempts",
    ]);
    sql.ok();
    assert!(sql.stdout.contains("n\n5\n"), "{}", sql.describe());
    let out = g.dir.path().join("out");
    run_in(
        &g,
        "u",
        &[],
        &["--job", job, "--out", out.to_str().unwrap()],
    )
    .ok();
    let r = report(&g.dir.path().join("report-u.json"));
    assert_eq!(r["logs"]["error_lines"].as_u64(), Some(5), "{r}");
    assert_eq!(r["logs"]["error_events"].as_u64(), Some(5), "{r}");
}

/// A committed run id rerun with logs added or dropped is another run:
/// refused, exit 2, naming `--logs`; with the same logs it is done.
#[test]
fn a_rerun_that_adds_or_drops_logs_is_refused() {
    let g = Generated::new(9);
    let logs = g.logs();
    let logs = logs.to_str().unwrap();
    let run = |id: &str, logs: &[&str]| run_in(&g, id, logs, &["--out", "out", "--run-id", id]);
    run("plain", &[]).ok();
    run("plain", &[logs]).expect_error(
        2,
        "run id plain was committed with no --logs; this run has logs = ",
    );
    run("logged", &[logs]).ok();
    run("logged", &[]).expect_error(2, "; this run has no --logs;");
    let again = run("logged", &[logs]);
    again.ok();
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.describe()
    );
}

/// An archive in nanoseconds and an error line past 2262 (what
/// nanoseconds can hold): the times compare in microseconds, so the
/// processed event is contradicted instead of the run failing on a cast.
#[test]
fn a_log_time_past_what_nanoseconds_hold_compares_in_microseconds() {
    use crate::archive::{Archive, Layout, Row};
    use arrow::datatypes::TimeUnit;
    let mut a = Archive::new();
    a.file(
        "dt=2024-01-01/part-0.parquet",
        &Layout::default().time(TimeUnit::Nanosecond, Some("UTC")),
        &[
            Row::new("e1", "k1", 1, "2024-01-01T01:00:00Z", Some("processed")),
            Row::new("e2", "k1", 2, "2024-01-01T02:00:00Z", Some("processed")),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir_all(&logs).unwrap();
    fs::write(
        logs.join("w.ndjson"),
        "{\"event_id\":\"e1\",\"timestamp\":\"3000-01-01T00:00:00Z\",\"level\":\"ERROR\",\"message\":\"late\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--logs",
        logs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--run-id",
        "far",
        "--progress",
        "off",
    ]);
    run.ok();
    let got = read_output(&out.join("contradicted"), "far");
    let ids: Vec<String> = got
        .rows
        .iter()
        .filter_map(|r| match r.get("event_id") {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids, ["e1"], "{}", run.describe());
}
