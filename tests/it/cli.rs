//! Running the `backfill` binary, and its command-line surface: help texts
//! and flag errors.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a single invocation may take before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(180);

/// What one invocation of the binary did.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything needed to understand a failed assertion.
    pub fn describe(&self) -> String {
        format!(
            "backfill {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    /// Assert the exit code, showing the whole invocation when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\n{}",
            self.describe()
        );
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked\n{}",
            self.describe()
        );
        self
    }

    /// Assert success.
    #[track_caller]
    pub fn ok(&self) -> &Run {
        self.expect_code(0)
    }

    /// Exit `code`, and the `error: ` line on stderr contains `want`.
    #[track_caller]
    pub fn expect_error(&self, code: i32, want: &str) -> &Run {
        self.expect_code(code);
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or("");
        assert!(line.contains(want), "want {want}\n{}", self.describe());
        self
    }

    /// The non-empty lines of stderr that are not log records: the
    /// `error:` line, a `-` sink's summary.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !is_log_record(l))
            .collect()
    }

    /// The log records on stderr (JSON lines: stderr is not a terminal
    /// here), parsed.
    pub fn log_records(&self) -> Vec<serde_json::Value> {
        self.stderr
            .lines()
            .filter(|l| is_log_record(l))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The messages of the log records at `level` (`WARN`, `ERROR`, ...).
    pub fn logged(&self, level: &str) -> Vec<String> {
        self.log_records()
            .iter()
            .filter(|r| r["level"] == level)
            .map(|r| r["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// A log record: one JSON object with a `level`, as `backfill` logs when
/// stderr is not a terminal.
pub fn is_log_record(line: &str) -> bool {
    line.starts_with('{')
        && serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.get("level").is_some())
}

/// `program` with `args`, no stdin, stdout and stderr piped, no `RUST_LOG`
/// and no colours.
pub fn command(program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    cmd
}

/// Read `pipe` to its end on a thread of its own, as (lossy) UTF-8.
pub fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = pipe.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Run the binary with `args`, extra environment variables, in `cwd`.
pub fn backfill_in(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> Run {
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_backfill")), args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().expect("spawn backfill");
    wait(child, args)
}

/// Wait (at most [`TIMEOUT`]) for a spawned `backfill ARGS` whose stdout and
/// stderr are piped, and collect what it did.
pub fn wait(mut child: std::process::Child, args: &[&str]) -> Run {
    let t_out = read_all(child.stdout.take().expect("stdout"));
    let t_err = read_all(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for backfill") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backfill {} did not finish in {TIMEOUT:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: status.code(),
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// Run the binary with `args`.
pub fn backfill(args: &[&str]) -> Run {
    backfill_in(args, &[], None)
}

#[test]
fn top_level_help_lists_the_commands() {
    let run = backfill(&["--help"]);
    run.ok();
    for cmd in ["run", "gaps", "sql", "explain", "generate", "state"] {
        assert!(
            run.stdout.contains(cmd),
            "--help does not mention `{cmd}`\n{}",
            run.describe()
        );
    }
}

#[test]
fn run_help_lists_every_flag() {
    let run = backfill(&["run", "--help"]);
    run.ok();
    for flag in [
        "--job",
        "--source",
        "--from",
        "--to",
        "--column",
        "--done-status",
        "--no-gaps",
        "--no-conflicts",
        "--memory-limit",
        "--spill-dir",
        "--progress",
        "--out",
        "--replay-sink",
        "--dlq-sink",
        "--gaps-sink",
        "--state",
        "--max-attempts",
        "--permanent-error",
        "--run-id",
        "--report",
        "--dry-run",
        "--fail-on-dlq",
        "--log-format",
        "--log-level",
        "--progress-interval",
    ] {
        assert!(
            run.stdout.contains(flag),
            "`run --help` does not list {flag}\n{}",
            run.describe()
        );
    }
}

#[test]
fn other_commands_help_lists_their_flags() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["gaps", "--help"],
            &["--source", "--format", "--from", "--to"],
        ),
        (
            &["sql", "--help"],
            &[
                "--source",
                "--format",
                "-f",
                "--memory-limit",
                "--spill-dir",
            ],
        ),
        (&["explain", "--help"], &["--source"]),
        (
            &["generate", "--help"],
            &["--out", "--events", "--keys", "--seed"],
        ),
    ];
    for (args, flags) in cases {
        let run = backfill(args);
        run.ok();
        for flag in *flags {
            assert!(
                run.stdout.contains(flag),
                "`{}` does not list {flag}\n{}",
                args.join(" "),
                run.describe()
            );
        }
    }
}

/// A usage error as the README promises: exactly one stderr line starting
/// `error: `, holding `needles`, exit 2, nothing on stdout.
#[track_caller]
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let run = backfill(args);
    run.expect_code(2);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line\n{}",
        run.describe()
    );
    assert!(
        lines[0].starts_with("error: "),
        "the line starts with `error: `\n{}",
        run.describe()
    );
    for n in needles {
        assert!(
            lines[0].contains(n),
            "the error holds `{n}`\n{}",
            run.describe()
        );
    }
    assert!(
        run.stdout.is_empty(),
        "nothing on stdout\n{}",
        run.describe()
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    assert_usage_error(
        &["run", "--source", "/tmp", "--no-such-flag"],
        &[
            "unexpected argument '--no-such-flag'",
            "(see backfill run --help)",
        ],
    );
}

#[test]
fn unknown_command_and_no_command_are_usage_errors() {
    assert_usage_error(&["frobnicate"], &["'frobnicate'", "(see backfill --help)"]);
    assert_usage_error(
        &[],
        &["a command is required", "run, gaps", "backfill --help"],
    );
    assert_usage_error(&["state"], &["runs, gc", "(see backfill state --help)"]);
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().display().to_string();
    for (args, needles) in [
        (
            vec!["run", "--source", &src, "--max-attempts", "many"],
            &["'many'", "--max-attempts", "backfill run --help"][..],
        ),
        (
            vec!["gaps", "--source", &src, "--format", "xml"],
            &[
                "'xml'",
                "possible values: table, csv",
                "backfill gaps --help",
            ][..],
        ),
        (
            vec!["run", "--source", &src, "--progress", "sometimes"],
            &["'sometimes'", "--progress"][..],
        ),
    ] {
        assert_usage_error(&args, needles);
    }
}

/// clap printed three or more lines (`error: ...`, a blank line, `Usage:`,
/// `For more information, try '--help'.`); the README promises one line.
/// The essential content (a tip, the possible values) stays on that line.
#[test]
fn every_usage_error_is_exactly_one_line() {
    assert_usage_error(
        &["run", "--source", "/tmp", "--x"],
        &["error: unexpected argument '--x' found (see backfill run --help)"],
    );
    assert_usage_error(
        &["run", "--source", "/tmp", "--sorce", "x"],
        &["'--sorce'", "similar argument exists: '--source'"],
    );
    assert_usage_error(&["run", "--source"], &["a value is required for '--source"]);
    assert_usage_error(
        &["state", "gc", "--bogus"],
        &["'--bogus'", "(see backfill state gc --help)"],
    );
    assert_usage_error(&["sql", "--source", "/tmp", "a", "b"], &["'b'"]);
    // --help and --version are not errors: stdout, several lines, exit 0.
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["state", "gc", "--help"],
    ] {
        let run = backfill(args);
        run.ok();
        assert!(run.stdout.lines().count() > 3, "{}", run.describe());
        assert!(run.stderr.is_empty(), "{}", run.describe());
    }
    let run = backfill(&["--version"]);
    run.ok();
    assert!(run.stdout.starts_with("backfill "), "{}", run.describe());
}

/// Every command and subcommand of the binary's definition, with the
/// words that name it (`["state", "gc"]`).
fn all_commands() -> Vec<(Vec<String>, clap::Command)> {
    use clap::CommandFactory;
    let mut cmd = event_backfill::cli::Cli::command();
    cmd.build();
    let mut out = vec![];
    let mut todo = vec![(vec![], cmd)];
    while let Some((path, c)) = todo.pop() {
        for sub in c.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            todo.push((p, sub.clone()));
        }
        out.push((path, c));
    }
    out
}

/// Every flag of every command reads `BACKFILL_<FLAG>` (the long name in
/// capitals, `-` as `_`); a flag that may carry credentials (a location)
/// hides its variable's value from `--help`; docs/cli.md lists each
/// variable.
#[test]
fn every_flag_has_a_backfill_env_var() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md"))
        .expect("docs/cli.md");
    let mut seen = 0;
    for (path, cmd) in all_commands() {
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") || arg.is_hide_set() {
                continue;
            }
            let flag = long.to_uppercase().replace('-', "_");
            // BACKFILL_<FLAG>, or BACKFILL_<COMMAND>_<FLAG> for a flag
            // whose name means something else elsewhere (redrive's --to
            // is a sink, run's a time a scheduler exports).
            let got = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let plain = format!("BACKFILL_{flag}");
            let scoped = format!("BACKFILL_{}_{flag}", path.join("_").to_uppercase());
            let want = if got.as_deref() == Some(scoped.as_str()) {
                scoped
            } else {
                plain
            };
            assert_eq!(
                got.as_deref(),
                Some(want.as_str()),
                "backfill {} --{long}",
                path.join(" ")
            );
            let value = arg
                .get_value_names()
                .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap_or_default();
            let location = value.iter().any(|v| v == "LOC")
                || ["out", "state"].contains(&long)
                || long.ends_with("-sink");
            if location {
                assert!(
                    arg.is_hide_env_values_set(),
                    "backfill {} --{long} may carry credentials: hide_env_values",
                    path.join(" ")
                );
            }
            assert!(
                doc.contains(&format!("`{want}`")),
                "docs/cli.md does not list {want}"
            );
            seen += 1;
        }
    }
    assert!(seen > 40, "only {seen} flags");
}

/// `backfill completions bash` prints a script bash parses and that
/// registers a completion for `backfill` knowing its commands and flags;
/// the other shells get a script too.
#[test]
fn completions_print_a_script_bash_can_source() {
    let run = backfill(&["completions", "bash"]);
    run.ok();
    assert!(run.stderr.is_empty(), "{}", run.describe());
    for word in [
        "run",
        "gaps",
        "completions",
        "--log-format",
        "--replay-sink",
    ] {
        assert!(run.stdout.contains(word), "no {word}\n{}", run.stdout);
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("backfill.bash");
    std::fs::write(&script, &run.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let sourced = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && complete -p backfill",
            script.display()
        ))
        .output()
        .expect("bash");
    assert!(
        String::from_utf8_lossy(&sourced.stdout).contains("-F _backfill backfill"),
        "{sourced:?}"
    );
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let run = backfill(&["completions", shell]);
        run.ok();
        assert!(
            // fish writes `-l log-format`, the others `--log-format`.
            run.stdout.contains("backfill") && run.stdout.contains("log-format"),
            "{}",
            run.describe()
        );
    }
    assert_usage_error(
        &["completions", "tcsh"],
        &["'tcsh'", "possible values: bash"],
    );
}

/// `backfill man` prints a roff page that `man` renders (checked with
/// `man -l -` where man is installed), naming the flags' variables;
/// `backfill man run` the page of `run`.
#[test]
fn man_prints_a_page_that_renders() {
    let run = backfill(&["man"]);
    run.ok();
    let page = &run.stdout;
    assert!(page.contains(".TH backfill 1"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}\n{page}");
    }
    let sub = backfill(&["man", "run"]);
    sub.ok();
    assert!(
        sub.stdout.contains(".TH backfill\\-run 1") || sub.stdout.contains(".TH backfill-run 1"),
        "{}",
        sub.stdout
    );
    assert!(
        sub.stdout.contains("BACKFILL_REPLAY_SINK"),
        "{}",
        sub.stdout
    );
    let gc = backfill(&["man", "state", "gc"]);
    gc.ok();
    assert!(gc.stdout.contains("min\\-age\\-minutes"), "{}", gc.stdout);
    let bad = backfill(&["man", "frobnicate"]);
    bad.expect_code(2);
    assert_eq!(
        bad.stderr_lines(),
        ["error: man: `backfill frobnicate` is not a command (see backfill --help)"]
    );

    let has_man = Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_man {
        eprintln!("man is not installed: the roff headers above are all that is checked");
        return;
    }
    use std::io::Write as _;
    let mut man = Command::new("man")
        .args(["-l", "-"])
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("MANWIDTH", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("man");
    man.stdin
        .take()
        .unwrap()
        .write_all(sub.stdout.as_bytes())
        .unwrap();
    let out = man.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "NAME",
        "backfill-run",
        "--replay-sink",
        "BACKFILL_REPLAY_SINK",
    ] {
        assert!(text.contains(want), "rendered page lacks {want}\n{text}");
    }
}
