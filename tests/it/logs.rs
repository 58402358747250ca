//! What a scheduler sees of a run: the log lines on stderr (JSON off a
//! terminal, human on request, filtered by level), the progress lines of
//! `--progress on` off a terminal, the retries of a store call, the report
//! as the last line of stdout (`--report -`), the summary, and the
//! `BACKFILL_*` variables standing in for flags. Each test spawns the
//! binary with stderr a pipe, as Airflow and cron do.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cli::{Run, backfill_in};

/// A generated archive (three days, 2024-01-01 to 2024-01-03) and a work
/// folder beside it.
struct Lake {
    dir: tempfile::TempDir,
}

impl Lake {
    fn new(events: u64) -> Lake {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        let n = events.to_string();
        backfill_in(
            &[
                "generate",
                "--out",
                archive.to_str().unwrap(),
                "--events",
                &n,
                "--keys",
                "50",
                "--seed",
                "7",
            ],
            &[],
            None,
        )
        .ok();
        Lake { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn archive(&self) -> String {
        self.root().join("archive").display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// `backfill ARGS` in the lake's folder, with `envs`.
    fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        backfill_in(args, envs, Some(self.root()))
    }
}

/// The records of `run` whose `event` field is `event` (start, end,
/// progress) and whose `phase` is `phase` (any phase when None).
fn events<'a>(run: &'a [Value], event: &str, phase: Option<&str>) -> Vec<&'a Value> {
    run.iter()
        .filter(|r| r["event"] == event && phase.is_none_or(|p| r["phase"] == p))
        .collect()
}

/// Regression: stderr was empty for the whole run when it was not a
/// terminal. Now every line is a JSON record with a timestamp, a level and
/// a message, and the phases start and end with their figures, which agree
/// with the report.
#[test]
fn stderr_off_a_terminal_is_json_lines_with_phases_and_figures() {
    let lake = Lake::new(3000);
    let report = lake.path("report.json");
    let src = lake.archive();
    let run = lake.run(
        &[
            "run",
            "--source",
            &src,
            "--out",
            "out",
            "--run-id",
            "logs-1",
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    run.ok();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(lines.len() >= 10, "{}", run.describe());
    let records: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", run.describe()))
        })
        .collect();
    let stamp = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$").unwrap();
    for r in &records {
        assert!(
            r["timestamp"].as_str().is_some_and(|t| stamp.is_match(t)),
            "{r}"
        );
        assert!(
            ["INFO", "WARN"].contains(&r["level"].as_str().unwrap_or_default()),
            "{r}"
        );
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for phase in [
        "state", "list", "scan", "decide", "write", "commit", "publish",
    ] {
        assert_eq!(
            events(&records, "start", Some(phase)).len(),
            1,
            "one start of {phase}\n{}",
            run.describe()
        );
    }
    let list = events(&records, "end", Some("list"));
    assert_eq!(list.len(), 1, "{}", run.describe());
    assert_eq!(list[0]["files"], rep["files_scanned"], "{}", list[0]);
    assert!(list[0]["bytes"].as_u64().unwrap() > 0, "{}", list[0]);
    let scan = events(&records, "end", Some("scan"));
    assert_eq!(scan.len(), 1, "{}", run.describe());
    assert_eq!(scan[0]["rows"], rep["rows"], "{}", scan[0]);
    assert_eq!(scan[0]["events"], rep["events"], "{}", scan[0]);
    assert!(scan[0]["bytes"].as_u64().unwrap() > 0, "{}", scan[0]);
    assert!(scan[0]["rows_per_s"].as_u64().unwrap() > 0, "{}", scan[0]);
    let decide = events(&records, "end", Some("decide"));
    assert_eq!(decide[0]["replayed"], rep["replayed"], "{}", decide[0]);
    assert_eq!(
        decide[0]["dead_lettered"], rep["dead_lettered"],
        "{}",
        decide[0]
    );
    // One write event a sink, with the rows its receipt reports.
    let writes = events(&records, "end", Some("write"));
    let mut sinks: Vec<&str> = writes.iter().map(|w| w["sink"].as_str().unwrap()).collect();
    sinks.sort();
    assert_eq!(sinks, ["dlq", "gaps", "replay"], "{}", run.describe());
    for w in writes {
        let kind = w["sink"].as_str().unwrap();
        assert_eq!(w["rows"], rep["outputs"][kind]["rows"], "{w}");
        let place = w["location"].as_str().unwrap();
        assert!(
            Path::new(place).is_absolute() && place.ends_with(&format!("out/{kind}")),
            "{w}"
        );
    }
    let commit = events(&records, "end", Some("commit"));
    assert_eq!(commit[0]["seq"], 1, "{}", commit[0]);
    let end = events(&records, "end", Some("run"));
    assert_eq!(end.len(), 1, "{}", run.describe());
    assert_eq!(end[0]["exit_code"], 0, "{}", end[0]);
    assert_eq!(end[0]["run_id"], "logs-1", "{}", end[0]);
    assert_eq!(
        end[0]["message"].as_str().unwrap(),
        run.stdout.lines().last().unwrap(),
        "the last log record says what the summary's last line says"
    );
}

/// `--log-format human`: a timestamp, the level, the message and its
/// fields, one event a line; no JSON.
#[test]
fn human_log_lines_have_timestamps_and_levels() {
    let lake = Lake::new(500);
    let src = lake.archive();
    let run = lake.run(
        &[
            "run",
            "--source",
            &src,
            "--out",
            "out",
            "--log-format",
            "human",
        ],
        &[],
    );
    run.ok();
    let line = regex::Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z +(TRACE|DEBUG|INFO|WARN|ERROR) \S",
    )
    .unwrap();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(lines.len() >= 10, "{}", run.describe());
    for l in &lines {
        assert!(line.is_match(l), "not a human log line: {l}");
        assert!(!l.starts_with('{'), "{l}");
        assert!(!l.contains('\u{1b}'), "no colours off a terminal: {l:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" INFO listed ") && l.contains("phase=\"list\"")),
        "{}",
        run.describe()
    );
    // BACKFILL_LOG_FORMAT is the same switch.
    let run = lake.run(
        &["run", "--source", &src, "--out", "out2"],
        &[("BACKFILL_LOG_FORMAT", "human")],
    );
    run.ok();
    assert!(
        run.stderr.lines().all(|l| line.is_match(l)),
        "{}",
        run.describe()
    );
}

/// Levels: `--log-level`, `BACKFILL_LOG_LEVEL` and `BACKFILL_LOG` (a level
/// or a RUST_LOG filter), the flag first; a filter that does not parse is
/// a usage error.
#[test]
fn log_levels_filter_and_the_flag_wins() {
    let lake = Lake::new(500);
    let src = lake.archive();
    let dry = |envs: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["run", "--source", src.as_str(), "--out", "out", "--dry-run"];
        args.extend_from_slice(extra);
        let run = lake.run(&args, envs);
        run.ok();
        run
    };
    let levels = |run: &Run| -> Vec<String> {
        run.log_records()
            .iter()
            .map(|r| r["level"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(levels(&dry(&[], &[])).contains(&"INFO".to_string()));
    for quiet in [
        dry(&[], &["--log-level", "warn"]),
        dry(&[("BACKFILL_LOG", "warn")], &[]),
        dry(&[("BACKFILL_LOG_LEVEL", "error")], &[]),
        dry(&[("BACKFILL_LOG", "off")], &[]),
    ] {
        assert!(quiet.stderr.is_empty(), "{}", quiet.describe());
    }
    // The flag over the variables, the specific variable over BACKFILL_LOG.
    let loud = dry(&[("BACKFILL_LOG", "off")], &["--log-level", "info"]);
    assert!(!loud.stderr.is_empty(), "{}", loud.describe());
    let loud = dry(
        &[("BACKFILL_LOG", "off"), ("BACKFILL_LOG_LEVEL", "info")],
        &[],
    );
    assert!(!loud.stderr.is_empty(), "{}", loud.describe());
    // A RUST_LOG filter: our progress target alone.
    let only = dry(
        &[("BACKFILL_LOG", "off,event_backfill::progress=info")],
        &[],
    );
    let records = only.log_records();
    assert!(!records.is_empty(), "{}", only.describe());
    assert!(
        records
            .iter()
            .all(|r| r["target"] == "event_backfill::progress"),
        "{}",
        only.describe()
    );
    // `sql`, `gaps` and `explain` answer on stdout: only warnings unless asked.
    let gaps = lake.run(&["gaps", "--source", &src], &[]);
    gaps.ok();
    assert!(gaps.stderr.is_empty(), "{}", gaps.describe());

    let bad = lake.run(
        &["run", "--source", &src, "--log-level", "info,x=loud"],
        &[],
    );
    bad.expect_code(2);
    assert_eq!(bad.stderr_lines().len(), 1, "{}", bad.describe());
    assert!(
        bad.stderr
            .starts_with("error: --log-level / BACKFILL_LOG `info,x=loud`"),
        "{}",
        bad.describe()
    );
}

/// Regression: `--progress on` printed nothing when stderr was not a
/// terminal (indicatif hides its bar there). Now it logs progress lines
/// every `--progress-interval`, even where the level would hide the phase
/// events; `--progress off` logs none.
#[test]
fn progress_on_off_a_terminal_logs_progress_lines() {
    let lake = Lake::new(40_000);
    let src = lake.archive();
    let run = lake.run(
        &[
            "run",
            "--source",
            &src,
            "--out",
            "out",
            "--dry-run",
            "--log-level",
            "warn",
            "--progress",
            "on",
            "--progress-interval",
            "10ms",
        ],
        &[],
    );
    run.ok();
    let records = run.log_records();
    let progress = events(&records, "progress", None);
    assert!(!progress.is_empty(), "{}", run.describe());
    for p in &progress {
        assert_eq!(p["level"], "INFO", "{p}");
        assert!(p["phase"].is_string() && p["elapsed_ms"].is_u64(), "{p}");
    }
    // A line while the scan counts (not in the moment between its start
    // and its first batch) has the rows against the footers' total.
    for p in events(&records, "progress", Some("scan"))
        .into_iter()
        .filter(|p| p.get("total_rows").is_some())
    {
        let (done, total) = (
            p["rows"].as_u64().unwrap(),
            p["total_rows"].as_u64().unwrap(),
        );
        assert!(done <= total && total > 40_000, "{p}");
        assert!(p["message"].as_str().unwrap().contains(" rows ("), "{p}");
    }
    // The phases come through as well: progress asked for.
    assert!(!events(&records, "start", Some("scan")).is_empty());

    let off = lake.run(
        &[
            "run",
            "--source",
            &src,
            "--out",
            "out",
            "--dry-run",
            "--log-level",
            "warn",
            "--progress",
            "off",
            "--progress-interval",
            "10ms",
        ],
        &[],
    );
    off.ok();
    assert!(off.stderr.is_empty(), "{}", off.describe());
}

/// Every retry of a store request is logged (object_store's own message,
/// at its target), and the store's secret is in no line.
#[test]
fn store_retries_are_logged_without_the_secret() {
    let lake = Lake::new(200);
    let secret = "Ret7yS3cretN0tInLogs";
    // A port nothing listens on: every connect is refused and retried.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = lake.path("retry.toml");
    std::fs::write(
        &job,
        format!(
            r#"source = "s3://lake/archive"
out = "out"

[storage]
endpoint = "http://127.0.0.1:{port}"
access_key_id = "AKIDRETRYTEST"
secret_access_key = "{secret}"
allow_http = true

[storage.retry]
max_retries = 2
init_backoff_ms = 10
max_backoff_ms = 20
connect_timeout_secs = 2
"#
        ),
    )
    .unwrap();
    let run = lake.run(&["run", "--job", job.to_str().unwrap()], &[]);
    run.expect_code(1);
    let retries: Vec<String> = run
        .log_records()
        .iter()
        .filter(|r| r["target"] == "object_store::client::retry")
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(retries.len(), 2, "{}", run.describe());
    assert!(retries[0].contains("retry 1 of 2"), "{retries:?}");
    assert!(retries[1].contains("retry 2 of 2"), "{retries:?}");
    // The error stays one plain line; a JSON record of it precedes it.
    let plain = run.stderr_lines();
    assert_eq!(plain.len(), 1, "{}", run.describe());
    assert!(
        plain[0].starts_with("error: source s3://lake/archive"),
        "{}",
        plain[0]
    );
    assert_eq!(run.logged("ERROR").len(), 1, "{}", run.describe());
    assert!(
        !run.stderr.contains(secret) && !run.stdout.contains(secret),
        "{}",
        run.describe()
    );
}

/// A warning is a WARN record with the text the `warning:` line had.
#[test]
fn warnings_are_warn_records() {
    let lake = Lake::new(200);
    std::fs::write(
        lake.path("archive")
            .join("dt=2024-01-01")
            .join("zero.parquet"),
        b"",
    )
    .unwrap();
    let src = lake.archive();
    let run = lake.run(&["run", "--source", &src, "--out", "out", "--dry-run"], &[]);
    run.ok();
    let warned = run.logged("WARN");
    assert_eq!(warned.len(), 1, "{}", run.describe());
    assert!(
        warned[0].starts_with("skipping zero-byte file ") && warned[0].ends_with("zero.parquet"),
        "{warned:?}"
    );
}

/// The report with volatile figures (times) taken out.
fn steady(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("elapsed_ms");
    o.remove("phase_ms");
    v
}

/// Regression: the last stdout line was `elapsed ... ms`; with `--report -`
/// it is the report, one compact JSON line, equal to what `--report FILE`
/// writes.
#[test]
fn report_dash_is_the_last_stdout_line_and_the_report_file_content() {
    let lake = Lake::new(2000);
    let src = lake.archive();
    let file = lake.path("report.json");
    let common = [
        "run",
        "--source",
        &src,
        "--out",
        "out",
        "--run-id",
        "same",
        "--dry-run",
    ];
    let to_stdout = lake.run(&[&common[..], &["--report", "-"]].concat(), &[]);
    to_stdout.ok();
    let last = to_stdout.stdout.lines().last().unwrap();
    assert!(last.starts_with('{') && last.ends_with('}'), "{last}");
    let from_stdout: Value = serde_json::from_str(last).unwrap();
    // The human summary comes first, as without the flag.
    assert!(
        to_stdout.stdout.starts_with("run same (dry run"),
        "{}",
        to_stdout.describe()
    );
    let to_file = lake.run(
        &[&common[..], &["--report", file.to_str().unwrap()]].concat(),
        &[],
    );
    to_file.ok();
    assert!(!to_file.stdout.lines().last().unwrap().starts_with('{'));
    let from_file: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(steady(from_stdout.clone()), steady(from_file));
    assert!(from_stdout["events"].as_u64().unwrap() > 0);
    assert!(
        !lake.path("-").exists(),
        "`-` is stdout, not a file named -"
    );

    // A committed run, BACKFILL_REPORT=- too: exit code and outputs.
    let run = lake.run(
        &["run", "--source", &src, "--out", "out", "--run-id", "real"],
        &[("BACKFILL_REPORT", "-")],
    );
    run.ok();
    let r: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["run_id"], "real");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["outputs"]["replay"]["rows"], r["replayed"]);
}

/// `--report -` beside a sink on `-`: both would write to stdout; refused
/// before anything is read or written, exit 2, one line.
#[test]
fn report_dash_beside_a_stdout_sink_is_refused() {
    let lake = Lake::new(200);
    let src = lake.archive();
    for sink in ["--replay-sink", "--dlq-sink", "--gaps-sink"] {
        let run = lake.run(
            &[
                "run", "--source", &src, "--out", "out", "--report", "-", sink, "-",
            ],
            &[],
        );
        run.expect_code(2);
        let lines = run.stderr_lines();
        let kind = sink.trim_start_matches("--").trim_end_matches("-sink");
        assert_eq!(
            lines,
            [format!(
                "error: --report - and the {kind} sink - both write to stdout; give the report a file (--report FILE) or the {kind} sink another target"
            )],
            "{}",
            run.describe()
        );
        assert!(run.stdout.is_empty(), "{}", run.describe());
        assert!(!lake.path("out").exists(), "{}", run.describe());
    }
}

/// Regression: the summary printed raw byte counts, `elapsed N ms` as its
/// last line, relative paths (`state out/_state`) and the label `gaps`
/// twice. Now: units, absolute paths, each label once, the counts aligned,
/// and an outcome line last.
#[test]
fn the_summary_has_units_absolute_paths_and_an_outcome_line() {
    let lake = Lake::new(3000);
    let src = lake.archive();
    let run = lake.run(
        &["run", "--source", &src, "--out", "out", "--run-id", "tidy"],
        &[],
    );
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "run tidy committed", "{}", run.stdout);
    let last = lines.last().unwrap();
    let outcome = regex::Regex::new(
        r"^run tidy committed: [\d,]+ replayed, [\d,]+ dead-lettered, [\d,]+ gaps, [\d,]+ conflicts in \d+(\.\d)? (ms|s); exit 0$",
    )
    .unwrap();
    assert!(outcome.is_match(last), "{last}");
    let body = &lines[1..lines.len() - 1];
    // Each label once.
    let labels: Vec<&str> = body
        .iter()
        .filter(|l| !l.starts_with("   "))
        .map(|l| l[2..18].trim())
        .collect();
    let mut unique = labels.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "{labels:?}");
    let line = |label: &str| -> &str {
        body.iter()
            .find(|l| l[2..18].trim() == label)
            .unwrap_or_else(|| panic!("no {label} line\n{}", run.stdout))
    };
    assert!(
        regex::Regex::new(r"^  scanned +[\d,]+ rows, \d+(\.\d)? (B|KiB|MiB), in 6 files")
            .unwrap()
            .is_match(line("scanned")),
        "{}",
        line("scanned")
    );
    let state = lake.path("out/_state").display().to_string();
    assert_eq!(line("state"), format!("  state           {state}"));
    assert!(
        regex::Regex::new(r"^  elapsed +\d+(\.\d)? (ms|s) \(list ")
            .unwrap()
            .is_match(line("elapsed")),
        "{}",
        line("elapsed")
    );
    // The counts end in one column.
    let counts: Vec<usize> = ["events", "resolved", "replayed", "dead-lettered", "gaps"]
        .iter()
        .map(|l| {
            let text = line(l);
            let digits = text[18..].trim_start();
            let n = digits.find(' ').unwrap_or(digits.len());
            text.len() - digits.len() + n
        })
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] == w[1]),
        "{counts:?}\n{}",
        run.stdout
    );
    // Every written file by its absolute path.
    let root = lake.path("out").display().to_string();
    let written: Vec<&&str> = body
        .iter()
        .filter(|l| {
            l.contains(" replays ") || l.contains(" dead letters ") || l.contains(" gap records ")
        })
        .collect();
    assert_eq!(written.len(), 3, "{}", run.stdout);
    for w in written {
        assert!(
            w.contains(&format!("{root}/")) && w.trim_end().ends_with(".parquet"),
            "{w}"
        );
    }
}

/// `BACKFILL_FROM` and `BACKFILL_MEMORY_LIMIT` stand in for their flags;
/// the flag wins over the variable.
#[test]
fn env_vars_stand_in_for_flags_and_flags_win() {
    let lake = Lake::new(3000);
    let src = lake.archive();
    let report = |run: &Run| -> Value {
        run.ok();
        serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap()
    };
    let base = [
        "run",
        "--source",
        src.as_str(),
        "--out",
        "out",
        "--dry-run",
        "--report",
        "-",
    ];
    let whole = report(&lake.run(&base, &[]));
    assert_eq!(whole["window_from"], Value::Null);
    let env = report(&lake.run(&base, &[("BACKFILL_FROM", "2024-01-02T00:00:00Z")]));
    assert_eq!(env["window_from"], "2024-01-02T00:00:00+00:00");
    assert!(env["rows"].as_u64() < whole["rows"].as_u64(), "{env}");
    let flag = report(&lake.run(
        &[&base[..], &["--from", "2024-01-03T00:00:00Z"]].concat(),
        &[("BACKFILL_FROM", "2024-01-02T00:00:00Z")],
    ));
    assert_eq!(flag["window_from"], "2024-01-03T00:00:00+00:00");
    assert!(flag["rows"].as_u64() < env["rows"].as_u64(), "{flag}");

    let small = lake.run(&base, &[("BACKFILL_MEMORY_LIMIT", "1M")]);
    small.expect_code(2);
    assert!(
        small.stderr_lines()[0].contains("'1M' is below the minimum of 64M"),
        "{}",
        small.describe()
    );
    report(&lake.run(
        &[&base[..], &["--memory-limit", "256M"]].concat(),
        &[("BACKFILL_MEMORY_LIMIT", "1M")],
    ));

    // A switch: BACKFILL_DRY_RUN=1 commits nothing.
    let run = lake.run(
        &["run", "--source", &src, "--out", "out"],
        &[("BACKFILL_DRY_RUN", "1")],
    );
    run.ok();
    assert!(run.stdout.contains("(dry run"), "{}", run.describe());
    assert!(!lake.path("out/_state").exists());
}

/// `BACKFILL_FILE` beside a QUERY: the variable stands for `-f`, which
/// excludes a QUERY, so the two are one usage error (exit 2), and its line
/// now names the variable; clap's own named only `--file`, which the user
/// had not typed. Typed, `-f` is named as before.
#[test]
fn backfill_file_beside_a_query_is_a_usage_error_naming_the_variable() {
    let lake = Lake::new(200);
    let src = lake.archive();
    std::fs::write(lake.path("q.sql"), "SELECT 1 AS a").unwrap();
    let query = ["sql", "--source", src.as_str(), "SELECT 2 AS b"];
    let run = lake.run(&query, &[("BACKFILL_FILE", "q.sql")]);
    run.expect_code(2);
    let lines = run.stderr_lines();
    assert!(
        lines.len() == 1
            && lines[0].starts_with("error: ")
            && lines[0].contains("--file is set by the environment variable BACKFILL_FILE"),
        "{}",
        run.describe()
    );
    assert!(run.stdout.is_empty(), "{}", run.describe());
    for typed in [&["-f", "q.sql"][..], &["--file=q.sql"]] {
        let run = lake.run(&[&query[..], typed].concat(), &[("BACKFILL_FILE", "q.sql")]);
        run.expect_code(2);
        assert!(
            !run.stderr.contains("BACKFILL_FILE") && run.stderr_lines().len() == 1,
            "{}",
            run.describe()
        );
    }
    // Alone, the variable runs its file.
    let run = lake.run(&query[..3], &[("BACKFILL_FILE", "q.sql")]);
    run.ok();
    assert!(run.stdout.contains("| 1 |"), "{}", run.describe());
}

/// Hostile log settings: a `--progress-interval` past u64 seconds panicked
/// in its parser (exit 101, a backtrace); a level with a typo (`inf`,
/// `warning`) was taken for a target and turned every log line off, exit
/// 0. Both are usage errors now, from the flag or from the variable, one
/// line each.
#[test]
fn hostile_log_settings_are_usage_errors_not_a_panic_or_silence() {
    let lake = Lake::new(200);
    let src = lake.archive();
    let run_args = ["run", "--source", src.as_str(), "--out", "out", "--dry-run"];
    let huge = "99999999999999999999999999999";
    for (args, envs, names) in [
        (
            vec!["--progress-interval", huge],
            vec![],
            "--progress-interval|too long",
        ),
        (
            vec![],
            vec![("BACKFILL_PROGRESS_INTERVAL", "1e30m")],
            "--progress-interval",
        ),
        (
            vec![],
            vec![("BACKFILL_PROGRESS_INTERVAL", &*format!("{huge}m"))],
            "too long",
        ),
        (vec!["--log-level", "inf"], vec![], "`inf` is not a level"),
        (
            vec!["--log-level", "warning"],
            vec![],
            "`warning` is not a level",
        ),
        (
            vec![],
            vec![("BACKFILL_LOG_LEVEL", "warning")],
            "is not a level",
        ),
        // Its echo stays on one line.
        (
            vec![],
            vec![("BACKFILL_LOG", "inf\nwarn")],
            "`inf\\nwarn` is not a level",
        ),
    ] {
        let run = lake.run(&[&args[..], &run_args[..]].concat(), &envs);
        run.expect_code(2);
        let lines = run.stderr_lines();
        assert!(
            lines.len() == 1
                && lines[0].starts_with("error: ")
                && names.split('|').all(|n| lines[0].contains(n)),
            "{}",
            run.describe()
        );
        assert!(!lake.path("out").exists(), "{}", run.describe());
    }
}

/// `--report` naming a device or a link to one (/dev/stdout, /dev/null):
/// the report was written beside it and renamed over it, replacing the
/// node itself (as root, /dev/null became a file), and a report meant for
/// stdout beside a `-` sink would have mixed with its rows. Refused before
/// anything is read, exit 2; the link is left as it was.
#[test]
fn a_report_path_that_is_a_device_is_refused() {
    let lake = Lake::new(200);
    let src = lake.archive();
    for (name, to) in [("to-null", "/dev/null"), ("to-stdout", "/proc/self/fd/1")] {
        let link = lake.path(name);
        std::os::unix::fs::symlink(to, &link).unwrap();
        let report = link.display().to_string();
        for extra in [&[][..], &["--dlq-sink", "-"]] {
            let run = lake.run(
                &[
                    &[
                        "run",
                        "--source",
                        src.as_str(),
                        "--out",
                        "out",
                        "--report",
                        &report,
                    ][..],
                    extra,
                ]
                .concat(),
                &[],
            );
            run.expect_code(2);
            assert_eq!(
                run.stderr_lines(),
                [format!(
                    "error: --report {report}: not a regular file (a device, pipe or socket); give a file, or - for stdout"
                )],
                "{}",
                run.describe()
            );
            assert!(run.stdout.is_empty(), "{}", run.describe());
            assert!(!lake.path("out").exists(), "{}", run.describe());
            assert!(
                std::fs::symlink_metadata(&link)
                    .unwrap()
                    .file_type()
                    .is_symlink(),
                "the link was replaced"
            );
        }
    }
}

/// A secret in a `BACKFILL_*` value (a location's user info) is in no
/// `--help` and no log line.
#[test]
fn secrets_in_env_values_stay_out_of_help_and_logs() {
    let lake = Lake::new(200);
    let secret = "EnvS3cretInAUrl9";
    let envs = [
        (
            "BACKFILL_SOURCE",
            format!("s3://AKIDENV:{secret}@lake/archive"),
        ),
        (
            "BACKFILL_REPLAY_SINK",
            format!("kafka://user:{secret}@127.0.0.1:9/replays"),
        ),
        ("BACKFILL_OUT", format!("s3://AKIDENV:{secret}@lake/out")),
        ("BACKFILL_STATE", format!("s3://AKIDENV:{secret}@lake/st")),
    ];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for args in [
        &["run", "--help"][..],
        &["run", "-h"],
        &["state", "gc", "--help"],
    ] {
        let help = lake.run(args, &envs);
        help.ok();
        assert!(!help.stdout.contains(secret), "{}", help.describe());
        assert!(
            help.stdout.contains("BACKFILL_STATE"),
            "{}",
            help.describe()
        );
    }
    let run = lake.run(&["run"], &envs);
    run.expect_code(2);
    assert!(!run.log_records().is_empty(), "{}", run.describe());
    assert!(
        !run.stderr.contains(secret) && !run.stdout.contains(secret),
        "{}",
        run.describe()
    );
    // A value without a secret is shown: the user sees where it came from.
    let help = lake.run(
        &["run", "--help"],
        &[("BACKFILL_FROM", "2024-01-02T00:00:00Z")],
    );
    assert!(
        help.stdout
            .contains("[env: BACKFILL_FROM=2024-01-02T00:00:00Z]"),
        "{}",
        help.describe()
    );
}

/// A run that exits 3 (dead letters under `--fail-on-dlq`) ends with a
/// WARN record, so that an alert on warnings catches it; its outcome line
/// says why.
#[test]
fn a_run_exiting_3_ends_with_a_warning() {
    let lake = Lake::new(2000);
    let src = lake.archive();
    let run = lake.run(
        &["run", "--source", &src, "--out", "out", "--fail-on-dlq"],
        &[],
    );
    run.expect_code(3);
    let records = run.log_records();
    let end = events(&records, "end", Some("run"));
    assert_eq!(end.len(), 1, "{}", run.describe());
    assert_eq!(end[0]["level"], "WARN", "{}", end[0]);
    assert_eq!(end[0]["exit_code"], 3, "{}", end[0]);
    assert!(end[0]["dead_lettered"].as_u64().unwrap() > 0, "{}", end[0]);
    assert!(
        run.stdout
            .lines()
            .last()
            .unwrap()
            .ends_with("; exit 3 (dead letters under --fail-on-dlq)"),
        "{}",
        run.stdout
    );
}
