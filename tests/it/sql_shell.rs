//! `backfill sql` as a SQL shell: each test reproduces a failure of the old
//! one-shot command (issue 9) and checks what a user sees instead, by
//! running the binary with stdin piped (the shell's commands work there as
//! on a terminal), and once on a real pseudo-terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::archive::{Archive, Layout, Row};
use crate::cli::{Run, backfill, command, wait};

/// How long the terminal test waits for the shell to answer.
const TIMEOUT: Duration = Duration::from_secs(180);

/// The binary with `input` on its stdin (a pipe, not a terminal).
fn backfill_stdin(args: &[&str], input: &str) -> Run {
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_backfill")), args);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn backfill");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    // A thread of its own: a large input must not block on a full pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let run = wait(child, args);
    let _ = writer.join();
    run
}

/// Events e00..e49 on key k1, seq 0..49, one a minute; every fifth failed
/// (e00 after 5 attempts, so a run dead-letters it and replays the other
/// nine); payloads stored as Binary.
fn archive() -> Archive {
    let rows: Vec<Row> = (0..50)
        .map(|i| {
            let time = format!("2024-01-01T00:{i:02}:00Z");
            let failed = i % 5 == 0;
            let row = Row::new(
                &format!("e{i:02}"),
                "k1",
                i,
                &time,
                Some(if failed { "failed" } else { "processed" }),
            );
            match (i, failed) {
                (0, _) => row.attempts(5).error("timeout"),
                (_, true) => row.error("timeout"),
                _ => row,
            }
        })
        .collect();
    let mut a = Archive::new();
    a.file(
        "dt=2024-01-01/part-0.parquet",
        &Layout::default().payload_binary(),
        &rows,
    );
    a
}

/// `sql --source SRC ARGS...`.
fn sql(src: &str, args: &[&str]) -> Run {
    let mut all = vec!["sql", "--source", src];
    all.extend_from_slice(args);
    backfill(&all)
}

/// The one stderr line of a usage error (exit 2), with nothing on stdout.
#[track_caller]
fn usage_error(run: &Run) -> String {
    run.expect_code(2);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr\n{}", run.describe());
    assert!(lines[0].starts_with("error: "), "{}", run.describe());
    assert!(
        run.stdout.is_empty(),
        "nothing on stdout\n{}",
        run.describe()
    );
    lines[0].to_string()
}

/// `SHOW TABLES` failed: information_schema was off.
#[test]
fn show_tables_and_show_columns_read_information_schema() {
    let a = archive();
    let run = sql(
        &a.source(),
        &["--format", "csv", "SHOW TABLES; SHOW COLUMNS FROM events"],
    );
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "table_catalog,table_schema,table_name,table_type",
        "{}",
        run.describe()
    );
    for table in [
        "events",
        "unprocessed",
        "conflicts",
        "gaps",
        "candidates",
        "ledger",
        "runs",
    ] {
        assert!(
            lines.iter().any(|l| l.split(',').nth(2) == Some(table)),
            "SHOW TABLES lists {table}\n{}",
            run.describe()
        );
    }
    // The second result follows with its own header.
    let columns = lines
        .iter()
        .position(|l| l.contains("column_name"))
        .unwrap_or_else(|| panic!("no SHOW COLUMNS result\n{}", run.describe()));
    let described: Vec<&str> = lines[columns + 1..]
        .iter()
        .filter_map(|l| l.split(',').nth(3))
        .collect();
    assert_eq!(
        &described[..5],
        &["event_id", "key", "seq", "event_time", "status"],
        "{}",
        run.describe()
    );
}

/// `\d` was a syntax error; with stdin piped the shell's commands run as
/// on a terminal, and `\q` ends the script.
#[test]
fn backslash_d_lists_and_describes_tables_from_piped_stdin() {
    let a = archive();
    let run = backfill_stdin(
        &["sql", "--source", &a.source(), "--format", "csv"],
        "\\d\n\\d events\nSELECT count(*) AS n FROM events;\n\\q\nSELECT 'after quit' AS x;\n",
    );
    run.ok();
    let out = &run.stdout;
    assert!(out.starts_with("name,type,about\n"), "{}", run.describe());
    for line in [
        "events,view,",
        "candidates,view,",
        "ledger_entries,table,",
        "runs,table,",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(line)),
            "\\d lists {line}\n{}",
            run.describe()
        );
    }
    assert!(
        out.contains("column_name,data_type,is_nullable\nevent_id,Utf8,YES\nkey,Utf8,YES\n"),
        "\\d events\n{}",
        run.describe()
    );
    assert!(out.contains("\nn\n50\n"), "{}", run.describe());
    assert!(!out.contains("after quit"), "\\q stops\n{}", run.describe());

    // A command the shell does not have, or a table it does not have.
    for (input, needle) in [
        ("\\frobnicate\n", "\\frobnicate: not a command"),
        ("SELECT 1;\n\\d nope\n", "no table or view named nope"),
    ] {
        let run = backfill_stdin(&["sql", "--source", &a.source()], input);
        run.expect_code(2);
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{}", run.describe());
        assert!(
            lines[0].starts_with("error: stdin: line ") && lines[0].contains(needle),
            "{}",
            run.describe()
        );
    }
}

/// `SELECT * FROM events` printed every row. `--maxrows` stops the query
/// there and says so under the table.
#[test]
fn maxrows_cuts_each_result_and_says_so() {
    let a = archive();
    let src = a.source();
    let q = "SELECT event_id FROM events ORDER BY event_id";
    let data_rows = |run: &Run| {
        run.stdout
            .lines()
            .filter(|l| l.starts_with("| e") && !l.contains("event_id"))
            .map(|l| l.trim_matches(['|', ' ']).to_string())
            .collect::<Vec<_>>()
    };
    let run = sql(&src, &["--maxrows", "5", q]);
    run.ok();
    assert_eq!(
        data_rows(&run),
        vec!["e00", "e01", "e02", "e03", "e04"],
        "{}",
        run.describe()
    );
    assert_eq!(
        run.stdout.lines().last(),
        Some("First 5 row(s) displayed; the rest were not fetched (--maxrows inf shows all)."),
        "{}",
        run.describe()
    );
    for unlimited in ["inf", "0"] {
        let run = sql(&src, &["--maxrows", unlimited, q]);
        run.ok();
        assert_eq!(data_rows(&run).len(), 50, "{}", run.describe());
        assert_eq!(
            run.stdout.lines().last(),
            Some("50 row(s) fetched."),
            "{}",
            run.describe()
        );
    }
    // Exactly the limit is not "more"; not a terminal: no limit by default.
    for args in [&["--maxrows", "50", q][..], &[q][..]] {
        let run = sql(&src, args);
        run.ok();
        assert_eq!(data_rows(&run).len(), 50, "{}", run.describe());
        assert_eq!(run.stdout.lines().last(), Some("50 row(s) fetched."));
    }
    // Machine-readable formats keep stdout clean; the cut is said on stderr.
    let run = sql(&src, &["--maxrows", "3", "--format", "csv", q]);
    run.ok();
    assert_eq!(
        run.stdout,
        "event_id\ne00\ne01\ne02\n",
        "{}",
        run.describe()
    );
    assert!(
        run.stderr
            .contains("warning: statement 1 (line 1: SELECT event_id")
            && run.stderr.contains("printed the first 3 row(s)"),
        "{}",
        run.describe()
    );
    let run = sql(&src, &["--maxrows", "lots", q]);
    let line = usage_error(&run);
    assert!(
        line.contains("'lots'") && line.contains("--maxrows"),
        "{line}"
    );
}

/// Only the last statement's result was printed.
#[test]
fn every_statement_prints_in_order() {
    let a = archive();
    let run = sql(
        &a.source(),
        &[
            "--format",
            "csv",
            "SELECT 1 AS first; SELECT 'two' AS second;\nSELECT count(*) AS n FROM events",
        ],
    );
    run.ok();
    assert_eq!(
        run.stdout,
        "first\n1\nsecond\ntwo\nn\n50\n",
        "{}",
        run.describe()
    );
    let run = sql(
        &a.source(),
        &["CREATE VIEW v AS SELECT 1 AS first; SELECT first FROM v; SELECT 2 AS second"],
    );
    run.ok();
    let first = run.stdout.find("| first |");
    let second = run.stdout.find("| second |");
    assert!(
        first.is_some() && second.is_some() && first < second,
        "{}",
        run.describe()
    );
    assert_eq!(
        run.stdout.matches("1 row(s) fetched.").count(),
        2,
        "a footer per result, none for CREATE VIEW\n{}",
        run.describe()
    );
}

/// `/* a; b */` split the statement in two; `';'` in a string too.
#[test]
fn semicolons_in_comments_and_strings_do_not_split() {
    let a = archive();
    let script = "/* a; b */ SELECT ';' AS semi; -- c; d\n\
                  SELECT 'x;y' AS \"both;\", event_id FROM events WHERE event_id = 'e01';\n";
    let run = sql(&a.source(), &["--format", "csv", script]);
    run.ok();
    assert_eq!(
        run.stdout,
        "semi\n;\nboth;,event_id\nx;y,e01\n",
        "{}",
        run.describe()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q.sql");
    std::fs::write(&file, script).unwrap();
    let run = sql(
        &a.source(),
        &["--format", "csv", "-f", &file.display().to_string()],
    );
    run.ok();
    assert_eq!(run.stdout, "semi\n;\nboth;,event_id\nx;y,e01\n");
}

/// Payloads stored as Binary printed as hex.
#[test]
fn binary_payloads_print_as_text() {
    let a = archive();
    let src = a.source();
    let run = sql(
        &src,
        &[
            "--format",
            "csv",
            "SELECT arrow_typeof(payload) AS t, payload FROM events WHERE event_id = 'e01'",
        ],
    );
    run.ok();
    assert_eq!(
        run.stdout,
        "t,payload\nBinary,\"{\"\"body\"\":\"\"e01\"\"}\"\n",
        "{}",
        run.describe()
    );
    let run = sql(
        &src,
        &[
            "--format",
            "json",
            "SELECT payload, X'ff00' AS raw FROM events WHERE event_id = 'e02'",
        ],
    );
    run.ok();
    let v: serde_json::Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    assert_eq!(
        v,
        serde_json::json!([{"payload": "{\"body\":\"e02\"}", "raw": "\\xff00"}]),
        "{}",
        run.describe()
    );
    let run = sql(&src, &["SELECT payload FROM events WHERE event_id = 'e03'"]);
    run.ok();
    assert!(
        run.stdout.contains("| {\"body\":\"e03\"} |"),
        "{}",
        run.describe()
    );
}

/// An empty CSV result printed nothing, not even its header.
#[test]
fn empty_results_print_their_header() {
    let a = archive();
    let q = "SELECT event_id, key FROM events WHERE false";
    for (format, want) in [
        ("csv", "event_id,key\n"),
        ("tsv", "event_id\tkey\n"),
        ("json", "[]\n"),
        ("ndjson", ""),
    ] {
        let run = sql(&a.source(), &["--format", format, q]);
        run.ok();
        assert_eq!(run.stdout, want, "{format}\n{}", run.describe());
    }
    let run = sql(&a.source(), &[q]);
    run.ok();
    assert!(
        run.stdout.contains("| event_id | key |") && run.stdout.ends_with("0 row(s) fetched.\n"),
        "{}",
        run.describe()
    );
    // Hostile pass: rows without columns printed nothing, as a CREATE VIEW.
    let run = sql(&a.source(), &["SELECT FROM events"]);
    run.ok();
    assert_eq!(
        run.stdout,
        "50 row(s) fetched, without columns.\n",
        "{}",
        run.describe()
    );
    let run = sql(&a.source(), &["--maxrows", "5", "SELECT FROM events"]);
    run.ok();
    assert!(
        run.stdout
            .starts_with("First 5 row(s) fetched, without columns; the rest were not fetched"),
        "{}",
        run.describe()
    );
    // `gaps` shares the printer: no gaps, still a header.
    let run = backfill(&["gaps", "--source", &a.source(), "--format", "csv"]);
    run.ok();
    assert!(
        run.stdout
            .starts_with("key,first_missing_seq,last_missing_seq,missing_count,")
            && run.stdout.lines().count() == 1,
        "{}",
        run.describe()
    );
}

/// `-f -` was refused; stdin without QUERY or -f is the same script.
#[test]
fn dash_f_and_piped_stdin_read_the_script() {
    let a = archive();
    let script = "SELECT count(*) AS n\nFROM events;\nSELECT 'done' AS status;\n";
    for args in [
        &["sql", "--source", &a.source(), "--format", "csv", "-f", "-"][..],
        &["sql", "--source", &a.source(), "--format", "csv"][..],
    ] {
        let run = backfill_stdin(args, script);
        run.ok();
        assert_eq!(run.stdout, "n\n50\nstatus\ndone\n", "{}", run.describe());
    }
    let run = backfill_stdin(&["sql", "--source", &a.source()], "-- nothing\n");
    let line = usage_error(&run);
    assert!(line.contains("no statement on stdin"), "{line}");
}

/// Every file under `dir`, with its bytes: what `sql` must leave alone.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// `ledger` and `candidates` ignored the job's state: after a committed
/// run they showed nothing done. They now read the state `run` reads
/// (`--out`, `--state` or the job file), and `runs` lists its runs;
/// nothing under the state changes.
#[test]
fn ledger_runs_and_candidates_follow_the_jobs_state() {
    let a = archive();
    let src = a.source();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let out_s = out.display().to_string();
    let state_s = out.join("_state").display().to_string();
    let queries = "SELECT run_id, replayed, dead_lettered FROM runs;\n\
                   SELECT count(*) AS events, sum(replays) AS replays FROM ledger;\n\
                   SELECT event_id, backfill_ledger_replays, backfill_ledger_dead \
                   FROM candidates WHERE event_id IN ('e00', 'e05') ORDER BY event_id;\n";

    // Before the first run: an empty state, said on stderr.
    let run = sql(&src, &["--out", &out_s, "--format", "csv", queries]);
    run.ok();
    assert_eq!(
        run.stdout,
        "run_id,replayed,dead_lettered\nevents,replays\n0,\n\
         event_id,backfill_ledger_replays,backfill_ledger_dead\ne00,0,false\ne05,0,false\n",
        "{}",
        run.describe()
    );
    assert!(
        run.stderr.contains("no backfill state at"),
        "{}",
        run.describe()
    );

    backfill(&[
        "run",
        "--source",
        &src,
        "--out",
        &out_s,
        "--run-id",
        "r1",
        "--progress",
        "off",
    ])
    .ok();
    let before = snapshot(&out.join("_state"));
    assert!(!before.is_empty());

    let job = work.path().join("job.toml");
    std::fs::write(&job, format!("source = {src:?}\nout = {out_s:?}\n")).unwrap();
    let job_s = job.display().to_string();
    let want = "run_id,replayed,dead_lettered\nr1,9,1\nevents,replays\n10,9\n\
                event_id,backfill_ledger_replays,backfill_ledger_dead\ne00,0,true\ne05,1,false\n";
    for how in [
        &["--source", &src, "--out", &out_s][..],
        &["--source", &src, "--state", &state_s][..],
        &["--job", &job_s][..],
    ] {
        let mut args = vec!["sql"];
        args.extend_from_slice(how);
        args.extend_from_slice(&["--format", "csv", queries]);
        let run = backfill(&args);
        run.ok();
        assert_eq!(run.stdout, want, "{}", run.describe());
        assert!(run.stderr.is_empty(), "{}", run.describe());
    }
    // Without the state nothing is known, as before.
    let run = sql(
        &src,
        &["--format", "csv", "SELECT count(*) AS n FROM ledger"],
    );
    run.ok();
    assert_eq!(run.stdout, "n\n0\n", "{}", run.describe());

    assert_eq!(
        snapshot(&out.join("_state")),
        before,
        "sql changed the state"
    );
}

/// The read-only guard holds for every statement of a script and of the
/// stdin shell: a refused write refuses the script before anything of it
/// runs, unless the write depends on an earlier statement, in which case it
/// is refused when its turn comes.
#[test]
fn writes_stay_refused_in_scripts_and_the_shell() {
    let a = archive();
    let src = a.source();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("copied.parquet");
    let t = target.display().to_string();

    let run = sql(&src, &[&format!("SELECT 1 AS a; COPY (SELECT 1) TO '{t}'")]);
    let line = usage_error(&run);
    assert!(
        line.contains("statement 2 (line 1: COPY")
            && line.contains("is refused")
            && line.contains("--allow-writes"),
        "{line}"
    );

    let run = backfill_stdin(
        &["sql", "--source", &src],
        "\\d\nSELECT 1 AS a;\nINSERT INTO archive SELECT * FROM archive;\n",
    );
    let line = usage_error(&run);
    assert!(
        line.starts_with("error: stdin: statement 2 (line 3: INSERT") && line.contains("INSERT"),
        "{line}"
    );

    // Plans only once the view exists: refused at its turn, and EXPLAIN
    // ANALYZE does not hide it.
    let script = format!(
        "CREATE VIEW v AS SELECT 1 AS n;\nEXPLAIN ANALYZE COPY (SELECT * FROM v) TO '{t}';\n"
    );
    let run = backfill_stdin(&["sql", "--source", &src, "-f", "-"], &script);
    let line = usage_error(&run);
    assert!(
        line.contains("statement 2 (line 2: EXPLAIN ANALYZE COPY"),
        "{line}"
    );
    assert!(!target.exists(), "a refused COPY wrote {t}");

    // The same script with --allow-writes writes: the guard is what stopped it.
    let run = backfill_stdin(
        &["sql", "--source", &src, "--allow-writes", "-f", "-"],
        &script,
    );
    run.ok();
    assert!(target.exists(), "{}", run.describe());
}

/// Bad SQL and bad files: one line naming the statement or the file, exit
/// 2, and nothing of the script run.
#[test]
fn bad_sql_names_the_statement_and_runs_nothing() {
    let a = archive();
    let src = a.source();
    let run = sql(&src, &["SELECT 1 AS a;\nSELEC 2"]);
    let line = usage_error(&run);
    assert!(
        line.starts_with("error: statement 2 (line 2: SELEC 2): sql parser error:"),
        "{line}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.sql");
    std::fs::write(&file, "SELECT 1;\n\nSELECT 'open;\n").unwrap();
    let f = file.display().to_string();
    let line = usage_error(&sql(&src, &["-f", &f]));
    assert!(
        line.starts_with(&format!(
            "error: {f}: line 3, column 8: Unterminated string"
        )),
        "{line}"
    );

    let missing = dir.path().join("missing.sql").display().to_string();
    let line = usage_error(&sql(&src, &["-f", &missing]));
    assert!(
        line.contains(&format!("-f {missing}: cannot read the SQL file")),
        "{line}"
    );

    let line = usage_error(&sql(&src, &["SELECT nope FROM events"]));
    assert!(
        line.contains("statement 1 (line 1: SELECT nope FROM events)") && line.contains("nope"),
        "{line}"
    );
}

/// The shell on a real terminal (a pseudo-terminal from util-linux
/// `script`): rustyline reads a statement over two lines, `\d` and `\q`
/// work, and the statement lands in the history file under
/// `$XDG_STATE_HOME`.
#[test]
fn interactive_shell_on_a_terminal_keeps_history() {
    let Some(script) = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!(
            "skipped: util-linux `script` is not installed (no pseudo-terminal to test with)"
        );
        return;
    };
    let a = archive();
    let xdg = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} sql --source '{}' --progress off",
        env!("CARGO_BIN_EXE_backfill"),
        a.source()
    );
    let mut child = std::process::Command::new(script)
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .env("XDG_STATE_HOME", xdg.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    let mut stdin = child.stdin.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // Type only once the shell waits at its prompt, as a person would (a
    // key typed while rustyline asks the terminal for the cursor position
    // would be taken for the answer). `wait` returns where `needle` ends,
    // looking from `from` on.
    let wait = |needle: &str, from: usize| -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = seen
                .lock()
                .unwrap()
                .get(from..)
                .and_then(|s| s.find(needle))
            {
                return from + i + needle.len();
            }
            if start.elapsed() > TIMEOUT {
                let _ = std::process::Command::new("kill")
                    .arg(child.id().to_string())
                    .status();
                panic!(
                    "no {needle:?} from the shell; it printed:\n{}",
                    seen.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let p = wait("backfill> ", 0);
    stdin.write_all(b"\\d\n").unwrap();
    let p = wait("row(s) fetched", p);
    let p = wait("backfill> ", p);
    stdin.write_all(b"SELECT 6 *\n").unwrap();
    let p = wait("SELECT 6 *", p);
    stdin.write_all(b"7 AS answer;\n").unwrap();
    let p = wait("row(s) fetched", p);
    wait("backfill> ", p);
    stdin.write_all(b"\\q\n").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < TIMEOUT, "the shell did not quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let _ = reader.join();
    let text = seen.lock().unwrap().clone();
    assert!(status.success(), "exit {status:?}\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("| candidates ") && l.contains(" | view  |"))
            && text.contains("| answer |"),
        "{text}"
    );
    assert!(text.contains("| 42     |"), "{text}");
    let history = std::fs::read_to_string(xdg.path().join("backfill/history"))
        .unwrap_or_else(|e| panic!("no history file: {e}\n{text}"));
    assert!(
        history.contains("SELECT 6 *\\n7 AS answer;"),
        "one entry for the two-line statement\n{history}"
    );
}

/// `\d "My Table"` was "not a command" (the quoted name was split into
/// words), and `\d datafusion.public.events` found nothing (the catalog was
/// taken for part of the schema name). `\d` now reads a name as `SELECT *
/// FROM NAME` would: quoted parts exact, unquoted lower-cased, up to
/// catalog.schema.name, a `;` after it dropped as psql does.
#[test]
fn backslash_d_reads_quoted_and_qualified_names() {
    let a = archive();
    let src = a.source();
    let run = backfill_stdin(
        &["sql", "--source", &src, "--format", "csv"],
        "CREATE VIEW \"My Table\" AS SELECT 1 AS \"A b\";\n\
         \\d \"My Table\"\n\
         \\d datafusion.public.\"My Table\"\n\
         \\d DataFusion.Public.EVENTS;\n\
         \\d information_schema.tables\n",
    );
    run.ok();
    let my_table = "column_name,data_type,is_nullable\nA b,Int64,NO\n";
    assert!(
        run.stdout.starts_with(&format!("{my_table}{my_table}")),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("\nevent_id,Utf8,YES\nkey,Utf8,YES\n")
            && run.stdout.contains("\ntable_catalog,Utf8,NO\n"),
        "{}",
        run.describe()
    );

    for (name, needle) in [
        ("\"EVENTS\"", "there is no table or view named \"EVENTS\""),
        ("nope.events", "there is no table or view named nope.events"),
        ("a.b.c.d", "not a table name"),
        ("my table", "not a table name"),
    ] {
        let run = backfill_stdin(&["sql", "--source", &src], &format!("\\d {name}\n"));
        let line = usage_error(&run);
        assert!(
            line.starts_with(&format!("error: stdin: line 1: \\d {name}: "))
                && line.contains(needle),
            "{line}"
        );
    }
}

/// A file saved by a Windows editor (a UTF-8 byte order mark, CRLF line
/// ends) failed on its first statement ("found: \u{feff}"); a Latin-1 or
/// UTF-16 file said only "stream did not contain valid UTF-8".
#[test]
fn windows_files_run_and_other_encodings_are_named() {
    let a = archive();
    let src = a.source();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let bom = file(
        "bom.sql",
        b"\xef\xbb\xbfSELECT 1 AS one;\r\n\\d events\r\nSELECT 'two' AS two;\r\n",
    );
    let run = sql(&src, &["--format", "csv", "-f", &bom]);
    run.ok();
    assert!(
        run.stdout.starts_with("one\n1\ncolumn_name,") && run.stdout.ends_with("two\ntwo\n"),
        "{}",
        run.describe()
    );
    let run = backfill_stdin(
        &["sql", "--source", &src, "--format", "csv"],
        "\u{feff}SELECT 1 AS one",
    );
    run.ok();
    assert_eq!(run.stdout, "one\n1\n", "{}", run.describe());

    let latin1 = file("latin1.sql", b"SELECT 1;\nSELECT 'caf\xe9' AS x;\n");
    let line = usage_error(&sql(&src, &["-f", &latin1]));
    assert!(
        line.contains(&format!(
            "-f {latin1}: line 2, column 12: byte 0xe9 is not UTF-8"
        )) && line.contains("save the SQL as UTF-8"),
        "{line}"
    );
    let utf16 = file("utf16.sql", b"\xff\xfeS\x00E\x00L\x00");
    let line = usage_error(&sql(&src, &["-f", &utf16]));
    assert!(
        line.contains(&format!("-f {utf16}: the SQL is UTF-16")),
        "{line}"
    );
}

/// Hostile pass: a data file given as the script (`-f part-0.parquet`, a
/// gzipped script) was said to be "not UTF-8 (Latin-1 or another
/// encoding?)".
#[test]
fn data_files_given_as_scripts_are_named_for_what_they_are() {
    let a = archive();
    let src = a.source();
    let dir = tempfile::tempdir().unwrap();
    let parquet = std::fs::read_dir(a.path().join("dt=2024-01-01"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .display()
        .to_string();
    let gz = dir.path().join("q.sql.gz");
    std::fs::write(&gz, b"\x1f\x8b\x08\x00\x00\x00\x00\x00").unwrap();
    let bin = dir.path().join("q.bin");
    std::fs::write(&bin, b"SELECT\x00 1").unwrap();
    for (f, needle) in [
        (
            parquet,
            "this is a Parquet file, not SQL: query it with SELECT * FROM 'FILE'",
        ),
        (
            gz.display().to_string(),
            "this is gzip-compressed: gunzip -c FILE | backfill sql",
        ),
        (
            bin.display().to_string(),
            "this is a binary file (it holds NUL bytes)",
        ),
    ] {
        let line = usage_error(&sql(&src, &["-f", &f]));
        assert!(line.contains(&format!("-f {f}: {needle}")), "{line}");
    }
}

/// `--format csv` or `tsv` with a struct, list or map column printed the
/// header and then failed ("Nested type Struct(...) is not supported in
/// CSV"), naming no statement. Nested values are now written as their JSON
/// text, as DuckDB writes them into CSV; JSON keeps them as JSON.
#[test]
fn csv_and_tsv_write_nested_values_as_json_text() {
    let a = archive();
    let q = "SELECT event_id, named_struct('key', key, 'seq', seq) AS s, [seq, seq + 1] AS l, \
             map(['k'], [key]) AS m, CAST(NULL AS BIGINT[]) AS n \
             FROM events WHERE event_id = 'e01'";
    for (format, want) in [
        (
            "csv",
            "event_id,s,l,m,n\n\
             e01,\"{\"\"key\"\":\"\"k1\"\",\"\"seq\"\":1}\",\"[1,2]\",\"{\"\"k\"\":\"\"k1\"\"}\",\n",
        ),
        (
            "tsv",
            "event_id\ts\tl\tm\tn\n\
             e01\t\"{\"\"key\"\":\"\"k1\"\",\"\"seq\"\":1}\"\t[1,2]\t\"{\"\"k\"\":\"\"k1\"\"}\"\t\n",
        ),
        (
            "ndjson",
            "{\"event_id\":\"e01\",\"s\":{\"key\":\"k1\",\"seq\":1},\"l\":[1,2],\"m\":{\"k\":\"k1\"},\"n\":null}\n",
        ),
    ] {
        let run = sql(&a.source(), &["--format", format, q]);
        run.ok();
        assert_eq!(run.stdout, want, "{format}\n{}", run.describe());
    }
    // No rows: the header alone, as for any result.
    let run = sql(
        &a.source(),
        &[
            "--format",
            "csv",
            "SELECT [seq] AS l FROM events WHERE false",
        ],
    );
    run.ok();
    assert_eq!(run.stdout, "l\n", "{}", run.describe());
}

/// A value holding a newline printed as two table rows, one holding ESC
/// sent the terminal its escape sequence (`\x1b[31m` turned it red), and a
/// tab broke the column's width. A table shows them escaped; CSV and JSON,
/// for programs, keep the bytes.
#[test]
fn table_cells_escape_control_characters() {
    let a = archive();
    let q = "SELECT 'a' || chr(10) || 'b' AS nl, 'c' || chr(27) || '[31mred' AS esc, \
             'x' || chr(9) || 'y' AS \"t\u{1b}ab\", chr(8238) || 'gnp.exe' AS bidi";
    let run = sql(&a.source(), &[q]);
    run.ok();
    assert!(
        run.stdout
            .contains("| a\\nb | c\\u{1b}[31mred | x\\ty      | \\u{202e}gnp.exe |")
            && run
                .stdout
                .contains("| nl   | esc            | t\\u{1b}ab |"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stdout.contains(['\u{1b}', '\t', '\u{202e}']) && run.stdout.lines().count() == 6,
        "{}",
        run.describe()
    );
    let run = sql(&a.source(), &["--format", "csv", q]);
    run.ok();
    assert_eq!(
        run.stdout,
        "nl,esc,t\u{1b}ab,bidi\n\"a\nb\",c\u{1b}[31mred,x\ty,\u{202e}gnp.exe\n",
        "{}",
        run.describe()
    );
    // A plan is not data: EXPLAIN keeps its lines, one operator a line.
    let run = sql(&a.source(), &["EXPLAIN SELECT count(*) FROM events"]);
    run.ok();
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("|               |   Aggregate: "))
            && !run.stdout.contains("\\n"),
        "{}",
        run.describe()
    );
}

/// Control characters from SQL, data or file names reached the terminal
/// raw inside error and warning lines: `SELECT * FROM "\x1b[2J"` cleared
/// the screen with its "table not found". They are escaped as in a table;
/// the exit code is the error's own.
#[test]
fn errors_escape_control_characters() {
    let a = archive();
    let src = a.source();
    let raw = |run: &Run| run.stderr.contains(['\u{1b}', '\u{202e}']);

    let run = sql(&src, &["SELECT * FROM \"nope\u{1b}[2J\""]);
    let line = usage_error(&run);
    assert!(
        line.contains("(line 1: SELECT * FROM \"nope\\u{1b}[2J\")")
            && line.contains("'datafusion.public.nope\\u{1b}[2J' not found")
            && !raw(&run),
        "{}",
        run.describe()
    );

    // From data: a value that does not cast (a runtime error, exit 1).
    let run = sql(
        &src,
        &["SELECT CAST(event_id || chr(27) || '[2J' AS INT) FROM events"],
    );
    run.expect_code(1);
    assert!(
        run.stderr_lines()[0].contains("\\u{1b}[2J") && !raw(&run),
        "{}",
        run.describe()
    );

    // From a file name, in an error and in a warning.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad\u{1b}[31m\u{202e}.sql");
    std::fs::write(&bad, "SELEC 1").unwrap();
    let run = sql(&src, &["-f", &bad.display().to_string()]);
    let line = usage_error(&run);
    assert!(
        line.contains("bad\\u{1b}[31m\\u{202e}.sql: statement 1") && !raw(&run),
        "{line}"
    );
    let warned = dir.path().join("warned\u{1b}[31m.sql");
    std::fs::write(&warned, "SELECT event_id FROM events").unwrap();
    let run = sql(
        &src,
        &[
            "--format",
            "csv",
            "--maxrows",
            "1",
            "-f",
            &warned.display().to_string(),
        ],
    );
    run.ok();
    assert!(
        run.stderr.contains("warning: ")
            && run.stderr.contains("warned\\u{1b}[31m.sql: ")
            && !raw(&run),
        "{}",
        run.describe()
    );
}

/// `SET TIME ZONE 'UTC'` answered with a Rust debug dump of the statement
/// (`SetTimeZone { local: false, value: Value(ValueWithSpan { ...`), as
/// did `SET ROLE` and the other SETs DataFusion has no plan for. The time
/// zone is now set (it only changes how this session shows times, so no
/// --allow-writes is needed) and prints nothing, as datafusion-cli's SET
/// does; a zone that no query could use is refused when set, not by every
/// later query; the other SETs are one readable line.
#[test]
fn set_time_zone_runs_and_other_sets_say_what_is_wrong() {
    let a = archive();
    let src = a.source();
    let run = sql(
        &src,
        &[
            "--format",
            "csv",
            "SET TIME ZONE 'Europe/Paris'; SHOW TIME ZONE; \
             SET datafusion.execution.time_zone = '+02:00'; SHOW TIME ZONE; \
             SET TIME ZONE LOCAL; SHOW TIME ZONE",
        ],
    );
    run.ok();
    assert_eq!(
        run.stdout,
        "name,value\ndatafusion.execution.time_zone,Europe/Paris\n\
         name,value\ndatafusion.execution.time_zone,+02:00\n\
         name,value\ndatafusion.execution.time_zone,\n",
        "{}",
        run.describe()
    );
    assert!(run.stderr_lines().is_empty(), "{}", run.describe());

    let line = usage_error(&sql(&src, &["SELECT 1; SET TIME ZONE 'Mars/Olympus'"]));
    assert!(
        line.contains(
            "statement 2 (line 1: SET TIME ZONE 'Mars/Olympus'): 'Mars/Olympus' is not a time zone"
        ),
        "{line}"
    );
    for q in [
        "SET ROLE admin",
        "SET NAMES utf8",
        "SET LOCAL TIME ZONE 'UTC'",
    ] {
        let line = usage_error(&sql(&src, &["--allow-writes", q]));
        assert!(
            line.contains(&format!("(line 1: {q}): "))
                && line.contains("SHOW ALL lists the settings")
                && !line.contains("Span(")
                && !line.contains('{'),
            "{line}"
        );
    }
    // A SET or DROP that fails is the statement's fault (exit 2), not the
    // data's (it was 1).
    for (q, needle) in [
        (
            "SET datafusion.execution.batch_size = 'lots'",
            "Error parsing 'lots'",
        ),
        ("DROP VIEW nope", "View 'nope' doesn't exist"),
    ] {
        let line = usage_error(&sql(&src, &["--allow-writes", q]));
        assert!(line.contains(needle), "{line}");
    }
}

/// `CREATE OR REPLACE VIEW events AS ...` silently replaced the window for
/// the rest of the session: `unprocessed`, `candidates` and every later
/// query read the replacement. Replacing or dropping any of backfill's own
/// tables and views is refused, however the name is spelled, before
/// anything of the script runs; the session's own views are the user's.
#[test]
fn builtin_tables_are_not_replaced_or_dropped() {
    let a = archive();
    let src = a.source();
    for (q, name) in [
        (
            "SELECT 1 AS first; CREATE OR REPLACE VIEW events AS SELECT 1 AS x; \
             SELECT count(*) FROM unprocessed",
            "events",
        ),
        ("CREATE VIEW Events AS SELECT 1", "events"),
        ("CREATE OR REPLACE VIEW public.gaps AS SELECT 1", "gaps"),
        ("DROP VIEW datafusion.public.candidates", "candidates"),
        ("DROP TABLE IF EXISTS \"runs\"", "runs"),
        ("CREATE OR REPLACE TABLE ledger AS SELECT 1", "ledger"),
    ] {
        // --allow-writes: refused for what it would replace, not as a write.
        let line = usage_error(&sql(&src, &["--allow-writes", q]));
        assert!(
            line.contains(&format!(
                "{name} is one of backfill's own tables and views (\\d lists them): replacing or dropping it is refused"
            )),
            "{q}\n{line}"
        );
    }
    // A name of the user's own, even one that differs only by quoting, is
    // theirs to replace; `events` is still the window.
    let run = sql(
        &src,
        &[
            "--format",
            "csv",
            "CREATE VIEW \"Events\" AS SELECT 1 AS x; CREATE OR REPLACE VIEW \"Events\" AS SELECT 2 AS x; \
             SELECT x FROM \"Events\"; SELECT count(*) AS n FROM events",
        ],
    );
    run.ok();
    assert_eq!(run.stdout, "x\n2\nn\n50\n", "{}", run.describe());
}

/// `SELECT 1+1+...` with 10,000 terms overflowed the stack (SIGABRT, no
/// error line), and so did a 2,000-term `OR` chain, planned on the main
/// thread's 8 MiB. Chains past the limit are one line naming the statement,
/// before anything of the script runs; chains below it run.
#[test]
fn deep_expressions_run_or_fail_with_one_line() {
    let a = archive();
    let src = a.source();
    let terms = |n: usize| {
        (0..n)
            .map(|i| format!("event_id = 'e{i:02}'"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    // In files: a failure's description stays short.
    let dir = tempfile::tempdir().unwrap();
    let ors = dir.path().join("ors.sql");
    std::fs::write(
        &ors,
        format!("SELECT count(*) AS n FROM events WHERE {}", terms(1998)),
    )
    .unwrap();
    let run = sql(&src, &["--format", "csv", "-f", &ors.display().to_string()]);
    run.ok();
    assert_eq!(run.stdout, "n\n50\n", "{}", run.describe());

    let file = dir.path().join("deep.sql");
    std::fs::write(
        &file,
        format!(
            "SELECT 1 AS first;\nSELECT {};\n",
            vec!["1"; 10_000].join("+")
        ),
    )
    .unwrap();
    let f = file.display().to_string();
    let line = usage_error(&sql(&src, &["-f", &f]));
    assert!(
        line.starts_with(&format!("error: {f}: statement 2 (line 2: SELECT 1+1+1+"))
            && line.contains("nested more than 2000 deep"),
        "{line}"
    );
    let unions = dir.path().join("unions.sql");
    std::fs::write(&unions, vec!["SELECT 1 AS a"; 3000].join(" UNION ALL ")).unwrap();
    let line = usage_error(&sql(&src, &["-f", &unions.display().to_string()]));
    assert!(line.contains("more than 2000 UNION"), "{line}");
    // INTERSECT binds tighter than UNION: its chain hangs on the right.
    std::fs::write(
        &unions,
        format!(
            "SELECT 1 AS a UNION {}",
            vec!["SELECT 1 AS a"; 3000].join(" INTERSECT ")
        ),
    )
    .unwrap();
    let line = usage_error(&sql(&src, &["-f", &unions.display().to_string()]));
    assert!(line.contains("more than 2000 UNION"), "{line}");
}

/// `backfill sql -c "SELECT ..."`, as datafusion-cli and psql take it, was
/// "unexpected argument '-c' found".
#[test]
fn dash_c_is_the_query() {
    let a = archive();
    let src = a.source();
    let run = sql(
        &src,
        &[
            "--format",
            "csv",
            "-c",
            "SELECT count(*) AS n FROM events;\n\\d",
        ],
    );
    run.ok();
    assert!(
        run.stdout.starts_with("n\n50\nname,type,about\n"),
        "{}",
        run.describe()
    );
    let line = usage_error(&sql(&src, &["-c", "SELECT 1", "SELECT 2"]));
    assert!(line.contains("'-c <SQL>' cannot be used with"), "{line}");
}

/// A path in FROM that cannot be read (a typo, a file of no known
/// extension) said "table 'datafusion.public.out/dlq/' not found", the path
/// glued to the schema as if it were a table's name.
#[test]
fn an_unreadable_path_in_from_is_named_as_a_path() {
    let a = archive();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("out/dlq/").display().to_string();
    let line = usage_error(&sql(
        &a.source(),
        &[&format!("SELECT count(*) FROM '{missing}'")],
    ));
    assert!(
        line.contains(&format!(
            "'{missing}' is no table, and no file or folder that can be read"
        )) && !line.contains("datafusion.public"),
        "{line}"
    );
    // A table's name is still a table's.
    let line = usage_error(&sql(&a.source(), &["SELECT count(*) FROM nope"]));
    assert!(
        line.contains("table 'datafusion.public.nope' not found"),
        "{line}"
    );
}

/// Hostile pass: Windows files joined on one stdin (`cat a.sql b.sql`)
/// failed on the second file's byte order mark, printed invisibly in the
/// error; notes kept below `\q` in a file failed to parse although `\q`
/// ends the script; and a key with an invisible character in it (U+200B)
/// looked in a table like the key without it.
#[test]
fn joined_files_notes_after_quit_and_invisible_characters() {
    let a = archive();
    let src = a.source();
    let run = backfill_stdin(
        &["sql", "--source", &src, "--format", "csv"],
        "\u{feff}SELECT 1 AS one;\r\n\u{feff}SELECT 2 AS two;\r\n\\q\r\nnotes: run this after the backfill\r\n",
    );
    run.ok();
    assert_eq!(run.stdout, "one\n1\ntwo\n2\n", "{}", run.describe());

    let run = sql(
        &src,
        &["SELECT key || chr(8203) AS k FROM events WHERE event_id = 'e01'"],
    );
    run.ok();
    assert!(run.stdout.contains("| k1\\u{200b} |"), "{}", run.describe());
}

/// Hostile pass: a constant of the statement that does not convert (`WHERE
/// event_time > '2024-13-45'`) was exit 1, the code a scheduler retries,
/// blamed on "Optimizer rule 'simplify_expressions' failed". It is the
/// statement's fault, exit 2; a value of the data that does not convert is
/// still exit 1.
#[test]
fn a_bad_constant_is_the_statements_fault() {
    let a = archive();
    let src = a.source();
    let line = usage_error(&sql(
        &src,
        &["SELECT count(*) FROM events WHERE event_time > '2024-13-45'"],
    ));
    assert!(
        line.contains("Error parsing timestamp from '2024-13-45'")
            && !line.contains("Optimizer rule"),
        "{line}"
    );
    let run = sql(&src, &["SELECT CAST(event_id AS INT) FROM events"]);
    run.expect_code(1);
}

/// `input_file_name()` and `file_row_index()` name where an event is
/// archived (the file and its row in it), in `events` and `archive`, with
/// and without a window; they failed with "source dependent and cannot be
/// evaluated directly": backfill's wrapper of the scan kept DataFusion from
/// rewriting them into the Parquet reader's columns.
#[test]
fn input_file_name_and_file_row_index_name_where_an_event_is_archived() {
    let mut a = Archive::new();
    let rows = |from: i64| -> Vec<Row> {
        (from..from + 3)
            .map(|i| {
                Row::new(
                    &format!("e{i}"),
                    "k1",
                    i,
                    &format!("2024-01-01T00:0{i}:00Z"),
                    Some("failed"),
                )
            })
            .collect()
    };
    a.rows("dt=2024-01-01/part-0.parquet", &rows(0));
    a.rows("dt=2024-01-01/part-1.parquet", &rows(3));
    let expected = [
        "e0,part-0.parquet,0",
        "e1,part-0.parquet,1",
        "e2,part-0.parquet,2",
        "e3,part-1.parquet,0",
        "e4,part-1.parquet,1",
        "e5,part-1.parquet,2",
    ];
    for (table, window) in [
        ("events", vec![]),
        ("archive", vec![]),
        (
            "events",
            vec![
                "--from",
                "2024-01-01T00:01:00Z",
                "--to",
                "2024-01-01T00:05:00Z",
            ],
        ),
    ] {
        let query = format!(
            "SELECT event_id, input_file_name() AS f, file_row_index() AS r \
             FROM {table} ORDER BY event_id"
        );
        let mut args = vec!["--format", "csv"];
        args.extend(window.iter().copied());
        args.push(&query);
        let run = sql(&a.source(), &args);
        run.ok();
        let got: Vec<String> = run
            .stdout
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                assert_eq!(f.len(), 3, "{l}\n{}", run.describe());
                let file = f[1].rsplit('/').next().unwrap_or_default();
                assert!(
                    f[1].contains("dt=2024-01-01/"),
                    "the file's whole path: {l}\n{}",
                    run.describe()
                );
                format!("{},{file},{}", f[0], f[2])
            })
            .collect();
        let want: Vec<&str> = if window.is_empty() {
            expected.to_vec()
        } else {
            expected[1..5].to_vec()
        };
        assert_eq!(got, want, "{table} {window:?}\n{}", run.describe());
    }
}
