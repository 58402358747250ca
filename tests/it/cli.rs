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
    let mut child = cmd.spawn().expect("spawn backfill");
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
