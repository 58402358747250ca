//! The shipped scheduler files, exercised for real: the Airflow DAG loaded
//! into an installed Apache Airflow 3 (tests/it/airflow_check.py says what
//! is checked), and the crontab's line run as cron runs it — `env -i`, the
//! crontab's variables, `$SHELL -c` — with the built binary on the
//! crontab's PATH, against an archive of yesterday's events.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use serde_json::Value as Json;

use crate::archive::{Layout, Row, write_file};
use crate::cli::{Run, read_all};
use crate::e2e::manifest_of;

/// The repository's root (jobs/, scripts/, tests/).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Run `cmd` to its end (at most `limit`), as a [`Run`].
fn finish(mut cmd: Command, what: &str, limit: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = read_all(child.stdout.take().unwrap());
    let err = read_all(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        args: vec![what.to_string()],
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

// ------------------------------------------------------------------ Airflow

/// The python of the Airflow venv, installed (once per test process, and
/// once per machine: the script reuses a venv at the pinned version) by
/// scripts/install-airflow.sh. `Err` says why it could not be installed.
fn airflow_python() -> &'static Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let mut cmd = Command::new(repo().join("scripts/install-airflow.sh"));
        if std::env::var_os("BACKFILL_CACHE").is_none()
            && let Some(home) = std::env::var_os("HOME")
        {
            cmd.env(
                "BACKFILL_CACHE",
                Path::new(&home).join(".cache/event-backfill"),
            );
        }
        let r = finish(cmd, "scripts/install-airflow.sh", Duration::from_secs(1200));
        match r.code {
            Some(0) => Ok(PathBuf::from(r.stdout.trim())),
            _ => Err(format!(
                "exit {:?}: {}",
                r.code,
                r.stderr
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
        }
    })
}

/// jobs/airflow_backfill_dag.py in a real Airflow 3: the DagBag loads it
/// without error or deprecation warning, the timetable gives a real window
/// (a plain `@daily` gives an empty one), the templates render to the
/// documented command line, exit codes 0..4 become the documented task
/// states (2 and 3 never retried), and against the real binary a run that
/// exits 3 pushes its report to XCom and its retry exits 3 again.
#[test]
fn the_airflow_dag_loads_renders_and_maps_exit_codes_in_airflow_3() {
    let python = match airflow_python() {
        Ok(p) => p,
        Err(why) => {
            // Only where PyPI cannot be reached: every other machine runs it.
            println!("SKIPPED: Apache Airflow could not be installed ({why})");
            return;
        }
    };
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("airflow-home");
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/it/airflow_check.py"))
        .arg(repo().join("jobs/airflow_backfill_dag.py"))
        .arg(env!("CARGO_BIN_EXE_backfill"))
        .arg(work.path().join("check"))
        .env("AIRFLOW_HOME", &home)
        .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        .env_remove("BACKFILL_BIN")
        .env_remove("BACKFILL_ENV_FILE");
    let r = finish(cmd, "airflow_check.py", Duration::from_secs(300));
    let oks: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("ok: ")).collect();
    assert!(
        r.code == Some(0) && oks.len() == 6,
        "the DAG check failed\n{}",
        r.describe()
    );
    for l in oks {
        println!("{l}");
    }
}

// --------------------------------------------------------------------- cron

/// The crontab's variables and its one command, as cron reads them.
struct CronEntry {
    vars: Vec<(String, String)>,
    command: String,
}

/// Parse jobs/crontab: `NAME=value` lines and the one job line (five time
/// fields, then the command, in which cron turns `\%` into `%`).
fn crontab() -> CronEntry {
    let text = fs::read_to_string(repo().join("jobs/crontab")).unwrap();
    let mut vars = vec![];
    let mut commands = vec![];
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, value)) = line.split_once('=')
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            vars.push((name.to_string(), value.trim().to_string()));
            continue;
        }
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).expect("five time fields");
            rest = &rest[end..];
        }
        let command = rest.trim();
        assert!(
            !command.replace("\\%", "").contains('%'),
            "an unescaped % ends a cron command: {command}"
        );
        commands.push(command.replace("\\%", "%"));
    }
    assert_eq!(commands.len(), 1, "one job line in jobs/crontab");
    CronEntry {
        vars,
        command: commands.remove(0),
    }
}

/// The folders the crontab names, relocated under a test root as an
/// installation at another prefix would be.
const PREFIXES: [&str; 3] = ["/opt/backfill", "/etc/backfill", "/var/log/backfill"];

/// A machine laid out as docs/scheduling.md installs it, under `root`: the
/// built binary in opt/backfill/bin, jobs/ in opt/backfill/jobs, the job
/// file and env file in etc/backfill, an archive of yesterday in lake/.
struct Machine {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// Yesterday (UTC), the day the run covers.
    day: String,
}

impl Machine {
    fn new(rows: impl Fn(&str) -> Vec<Row>) -> Machine {
        Machine::under("cron-", rows)
    }

    /// As [`Machine::new`], in a temporary folder whose name starts with
    /// `prefix` (spaces, say).
    fn under(prefix: &str, rows: impl Fn(&str) -> Vec<Row>) -> Machine {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let day = (Utc::now().date_naive() - Days::new(1)).to_string();
        let bin = root.join("opt/backfill/bin");
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_backfill"), bin.join("backfill")).unwrap();
        let jobs = root.join("opt/backfill/jobs");
        fs::create_dir_all(&jobs).unwrap();
        fs::copy(
            repo().join("jobs/backfill-cron.sh"),
            jobs.join("backfill-cron.sh"),
        )
        .unwrap();
        let m = Machine {
            _dir: dir,
            root,
            day,
        };
        m.job("etc/backfill/nightly.toml", "out");
        m.write_env(&format!(
            "# as jobs/backfill.env.example\nLAKE_DIR={}\n",
            m.root.join("lake").display()
        ));
        write_file(
            &m.root
                .join(format!("lake/archive/dt={}/part-0.parquet", m.day)),
            &Layout::default(),
            &rows(&m.day),
        );
        m
    }

    /// Write a job file at `path` (under the root) over the archive,
    /// writing to `lake/OUT`; its absolute path.
    fn job(&self, path: &str, out: &str) -> PathBuf {
        let file = self.root.join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(
            &file,
            format!("source = \"${{LAKE_DIR}}/archive\"\nout = \"${{LAKE_DIR}}/{out}\"\n"),
        )
        .unwrap();
        file
    }

    fn env_file(&self) -> PathBuf {
        self.root.join("etc/backfill/backfill.env")
    }

    fn write_env(&self, text: &str) {
        fs::write(self.env_file(), text).unwrap();
    }

    /// Replace the binary on the crontab's PATH by a shell script.
    fn fake_backfill(&self, script: &str) {
        let bin = self.root.join("opt/backfill/bin/backfill");
        fs::remove_file(&bin).unwrap();
        fs::write(&bin, format!("#!/bin/sh\n{script}")).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `path` of the crontab, relocated under the root.
    fn relocate(&self, s: &str) -> String {
        PREFIXES.iter().fold(s.to_string(), |s, p| {
            s.replace(p, &format!("{}{p}", self.root.display()))
        })
    }

    fn log_dir(&self) -> PathBuf {
        self.root.join("var/log/backfill")
    }

    fn run_id(&self) -> String {
        format!("nightly-{}", self.day)
    }

    fn script(&self) -> PathBuf {
        self.root.join("opt/backfill/jobs/backfill-cron.sh")
    }

    /// The crontab's command as cron starts it: an empty environment
    /// (`env -i`) but for the crontab's variables and what cron itself sets
    /// (HOME, LOGNAME), run by the crontab's SHELL with `-c`.
    fn cron(&self) -> Command {
        self.cron_with(&self.relocate(&crontab().command), &[])
    }

    /// As [`Machine::cron`], with another command line (already relocated)
    /// and variables added to, or replacing, the crontab's.
    fn cron_with(&self, command: &str, vars: &[(&str, &str)]) -> Command {
        let entry = crontab();
        let mut env: Vec<(String, String)> = entry
            .vars
            .iter()
            .map(|(name, value)| (name.clone(), self.relocate(value)))
            .filter(|(name, _)| !vars.iter().any(|(n, _)| n == name))
            .collect();
        env.extend(vars.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        let shell = env
            .iter()
            .find(|(n, _)| n == "SHELL")
            .map_or("/bin/sh".to_string(), |(_, v)| v.clone());
        let mut cmd = Command::new("env");
        cmd.arg("-i");
        for (name, value) in env {
            cmd.arg(format!("{name}={value}"));
        }
        cmd.arg(format!("HOME={}", self.root.display()))
            .arg("LOGNAME=backfill")
            .arg(shell)
            .arg("-c")
            .arg(command);
        cmd
    }

    fn run_cron(&self) -> Run {
        run(self.cron())
    }

    /// The files of the log folder whose names start with `prefix` and end
    /// with `suffix`.
    fn files(&self, prefix: &str, suffix: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(self.log_dir())
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        found.retain(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        });
        found.sort();
        found
    }

    /// The log of jobs/crontab's job (nightly-CRC.log); empty before it
    /// exists.
    fn log(&self) -> String {
        let logs = self.files("nightly-", ".log");
        assert!(logs.len() <= 1, "one log per job: {logs:?}");
        logs.first()
            .map(|p| fs::read_to_string(p).unwrap())
            .unwrap_or_default()
    }

    /// The report of the run over yesterday (nightly-CRC-DAY.json).
    fn report(&self) -> Json {
        let reports = self.files("nightly-", &format!("-{}.json", self.day));
        assert_eq!(reports.len(), 1, "{reports:?}");
        serde_json::from_str(&fs::read_to_string(&reports[0]).unwrap()).unwrap()
    }

    /// Wait (30 s at most) until `n` `.log` files of the log folder hold
    /// `text`.
    fn wait_for_logs(&self, text: &str, n: usize) {
        let start = Instant::now();
        while self
            .files("", ".log")
            .iter()
            .filter(|p| fs::read_to_string(p).unwrap_or_default().contains(text))
            .count()
            < n
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "fewer than {n} logs say {text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A command line of the crontab's job, as cron runs it.
fn run(cmd: Command) -> Run {
    finish(cmd, "the crontab line", Duration::from_secs(120))
}

/// `s` as one word of a `sh -c` command line.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A command started in the background with its output collected.
struct Started {
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Started {
    fn new(mut cmd: Command) -> Started {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let out = read_all(child.stdout.take().unwrap());
        let err = read_all(child.stderr.take().unwrap());
        Started { child, out, err }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait(mut self) -> Run {
        let status = self.child.wait().unwrap();
        Run {
            args: vec!["the crontab line".into()],
            code: status.code(),
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap(),
        }
    }
}

/// One key in order, all processed but one failure that is retried.
fn clean_rows(day: &str) -> Vec<Row> {
    vec![
        Row::new("e1", "k", 1, &format!("{day}T01:00:00Z"), Some("processed")),
        Row::new("e2", "k", 2, &format!("{day}T02:00:00Z"), Some("failed")).attempts(1),
        Row::new("e3", "k", 3, &format!("{day}T03:00:00Z"), Some("processed")),
    ]
}

/// As [`clean_rows`], and an event whose retries are exhausted: a dead
/// letter, exit 3 under `--fail-on-dlq`.
fn dead_letter_rows(day: &str) -> Vec<Row> {
    let mut rows = clean_rows(day);
    rows.push(
        Row::new("e4", "k", 4, &format!("{day}T04:00:00Z"), Some("failed"))
            .attempts(3)
            .error("boom"),
    );
    rows
}

/// The crontab line under `env -i`: a successful run prints nothing (cron
/// mails nothing), logs the run, commits yesterday's window under the run
/// id named after yesterday and writes the report named after the same day;
/// the same line again the same day is a retry: nothing printed, nothing
/// written.
#[test]
fn the_crontab_line_runs_under_env_i_and_prints_nothing_on_success() {
    let m = Machine::new(clean_rows);
    let r = m.run_cron();
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "a successful cron run printed (cron would mail it)\n{}",
        r.describe()
    );
    let log = m.log();
    let id = m.run_id();
    assert!(
        log.contains(&format!("{id}: start"))
            && log.contains(&format!("run {id} committed"))
            && log.contains(&format!("{id}: exit 0")),
        "{log}"
    );
    let report = m.report();
    assert_eq!(report["run_id"], id.as_str(), "{report}");
    assert_eq!(report["replayed"], 1, "{report}");
    assert_window(&m.root.join("lake/out/_state"), &id, &m.day);

    let again = m.run_cron();
    assert!(
        again.code == Some(0) && again.stdout.is_empty() && again.stderr.is_empty(),
        "{}",
        again.describe()
    );
    assert!(m.log().contains(&format!("run {id} is already committed")));
}

/// The run `id` committed in `state` covers `[day, day + 1)`.
#[track_caller]
fn assert_window(state: &Path, id: &str, day: &str) {
    let entry = manifest_of(state, id).expect("the run is committed");
    let next =
        (chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap() + Days::new(1)).to_string();
    assert_eq!(
        (&entry["settings"]["from"], &entry["settings"]["to"]),
        (
            &Json::from(format!("{day}T00:00:00+00:00")),
            &Json::from(format!("{next}T00:00:00+00:00"))
        ),
        "{entry}"
    );
}

/// What cron mails: a failing run prints why, then its part of the log.
/// Without the environment file the job file's `${LAKE_DIR}` is unset:
/// exit 2, naming it; with dead letters, exit 3 and the report's path.
#[test]
fn a_failing_cron_run_prints_what_cron_mails() {
    let m = Machine::new(dead_letter_rows);
    let saved = fs::read_to_string(m.env_file()).unwrap();
    fs::remove_file(m.env_file()).unwrap();
    let r = m.run_cron();
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(
        r.stdout.contains(&format!(
            "backfill {} failed: exit 2, configuration error",
            m.run_id()
        )) && r.stdout.contains("LAKE_DIR")
            && r.stdout.contains("no environment file"),
        "{}",
        r.describe()
    );
    assert!(manifest_of(&m.root.join("lake/out/_state"), &m.run_id()).is_none());

    m.write_env(&saved);
    let r = m.run_cron();
    assert_eq!(r.code, Some(3), "{}", r.describe());
    assert!(
        r.stdout.contains(&format!(
            "backfill {} failed: exit 3, committed, and dead-lettered events",
            m.run_id()
        )) && r.stdout.contains(", 1 dead-lettered,")
            && !r.stdout.contains("exit 2"),
        "only this run's part of the log is printed\n{}",
        r.describe()
    );
    let report = m.files("nightly-", &format!("-{}.json", m.day));
    assert!(
        r.stdout
            .contains(&format!("(report: {})", report[0].display())),
        "{}",
        r.describe()
    );
    // The next night's retry of the same day (or a rerun) alerts again.
    let again = m.run_cron();
    assert_eq!(again.code, Some(3), "{}", again.describe());
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.describe()
    );
}

/// Two invocations at once: the second is stopped by the lock (it says so:
/// a run still holding the lock a day later is worth a mail) and runs
/// nothing; the first finishes as usual. The first is held mid-run by the
/// test build's `after_write` pause, set through the environment file.
#[test]
fn a_second_cron_invocation_is_stopped_by_the_lock() {
    let m = Machine::new(clean_rows);
    let mut env = fs::read_to_string(m.env_file()).unwrap();
    env.push_str("BACKFILL_FAILPOINT=after_write:sleep-4000\n");
    m.write_env(&env);

    let mut first = Started::new(m.cron());
    m.wait_for_logs(": start", 1);
    let second = m.run_cron();
    assert!(
        first.running(),
        "the first run ended before the second started (is the build without --features failpoints?)"
    );
    assert_eq!(second.code, Some(75), "{}", second.describe());
    let lock = m.files("nightly-", ".lock");
    assert!(
        second
            .stdout
            .contains("skipped: a run of this job still holds")
            && lock.len() == 1
            && second.stdout.contains(&lock[0].display().to_string()),
        "{}\n{lock:?}",
        second.describe()
    );
    let first = first.wait();
    assert!(
        first.code == Some(0) && first.stdout.is_empty() && first.stderr.is_empty(),
        "first run: {}",
        first.describe()
    );
    let log = m.log();
    assert_eq!(log.matches(": start").count(), 1, "{log}");
    assert!(
        log.contains(&format!("run {} committed", m.run_id())),
        "{log}"
    );
}

/// The environment file is data, never shell: `$(...)`, backticks, `;` and
/// spaces reach backfill as written, and nothing in the file runs.
/// Comments, blank lines, `export `, one pair of quotes, CRLF line ends and
/// a last line without its newline are what people write and are taken.
#[test]
fn the_environment_file_is_read_as_data_and_never_run() {
    let m = Machine::new(clean_rows);
    let ran = m.root.join("ran");
    let seen = m.root.join("seen.env");
    m.fake_backfill(&format!(
        "env > {}\n",
        sh_quote(&seen.display().to_string())
    ));
    let touch = format!("touch {}", ran.display());
    m.write_env(&format!(
        "# the run's environment\n\
         \n\
         SUBST=$({touch})\n\
         export   TICKS=`{touch}`\n\
         \x20 SEMI = a;{touch} \n\
         SPACES=two words\n\
         DOUBLE=\"$HOME and ${{HOME}} stay\"\n\
         SINGLE='it''s # not a comment'\n\
         HASH=p#ss\n\
         EMPTY=\n\
         EQUALS=a=b\r\n\
         LAST=no newline"
    ));
    let r = m.run_cron();
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "{}",
        r.describe()
    );
    assert!(!ran.exists(), "the environment file ran a command");
    let seen = fs::read_to_string(&seen).unwrap();
    let vars: std::collections::BTreeMap<&str, &str> =
        seen.lines().filter_map(|l| l.split_once('=')).collect();
    for (name, value) in [
        ("SUBST", format!("$({touch})")),
        ("TICKS", format!("`{touch}`")),
        ("SEMI", format!("a;{touch}")),
        ("SPACES", "two words".into()),
        ("DOUBLE", "$HOME and ${HOME} stay".into()),
        ("SINGLE", "it''s # not a comment".into()),
        ("HASH", "p#ss".into()),
        ("EMPTY", String::new()),
        ("EQUALS", "a=b".into()),
        ("LAST", "no newline".into()),
    ] {
        assert_eq!(vars.get(name), Some(&value.as_str()), "{name} in\n{seen}");
    }
}

/// A line that is not KEY=VALUE stops the script before anything runs:
/// exit 2, one line naming the file and the line number (never the line's
/// text, which may hold a secret), in the mail and in the log.
#[test]
fn an_environment_line_that_is_not_key_value_stops_the_run_naming_it() {
    let m = Machine::new(clean_rows);
    let ran = m.root.join("ran");
    m.fake_backfill(&format!("touch {}\n", sh_quote(&ran.display().to_string())));
    for (bad, why) in [
        ("hunter2 is the password", "not KEY=VALUE"),
        ("KAFKA PASSWORD=hunter2", "not a variable name"),
        ("1PASSWORD=hunter2", "not a variable name"),
        ("PASSWORD=\"hunter2", "opens a quote it does not close"),
    ] {
        m.write_env(&format!("# ok so far\nLAKE_DIR=/lake\n{bad}\nLATER=1\n"));
        let r = m.run_cron();
        assert_eq!(r.code, Some(2), "{bad}: {}", r.describe());
        let line = format!(
            "backfill {} failed: exit 2, the environment file {} (BACKFILL_ENV_FILE), line 3: ",
            m.run_id(),
            m.env_file().display()
        );
        assert!(
            r.stdout.starts_with(&line)
                && r.stdout.contains(why)
                && r.stdout.lines().count() == 1
                && r.stderr.is_empty()
                && !r.stdout.contains("hunter2"),
            "{bad}: {}",
            r.describe()
        );
        assert!(!ran.exists(), "{bad}: backfill ran");
        assert!(m.log().contains(&line), "{bad}: not logged\n{}", m.log());
        assert!(!m.log().contains("hunter2"), "{}", m.log());
    }
}

/// `date` as a system has it without GNU's `-d` or BSD's `-r`/`-j`/`-v`:
/// `-u` and `+FORMAT`, anything else refused with a usage message on stderr.
const POSIX_DATE: &str = r#"#!/bin/sh
for a in "$@"; do
  case $a in
    -u | +*) ;;
    *) echo "date: illegal option -- ${a#-}" >&2
       echo "usage: date [-u] [+format]" >&2
       exit 1 ;;
  esac
done
exec /bin/date "$@"
"#;

/// A userland like macOS's: `date` without `-d`, no flock(1) (perl takes
/// the lock). The crontab line runs yesterday's window, quietly, and a
/// second invocation is still stopped by the lock.
#[test]
fn a_userland_without_gnu_date_or_flock_runs_and_locks() {
    let m = Machine::new(clean_rows);
    let date = m.root.join("opt/backfill/bin/date");
    fs::write(&date, POSIX_DATE).unwrap();
    fs::set_permissions(&date, fs::Permissions::from_mode(0o755)).unwrap();
    // The system's commands, but flock(1).
    let userland = m.root.join("usr-bin-without-flock");
    fs::create_dir_all(&userland).unwrap();
    for dir in ["/usr/bin", "/bin"] {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let link = userland.join(e.file_name());
            if e.file_name() != "flock" && !link.exists() {
                std::os::unix::fs::symlink(e.path(), link).unwrap();
            }
        }
    }
    let path = format!(
        "{}:{}",
        m.root.join("opt/backfill/bin").display(),
        userland.display()
    );
    let cron = || m.cron_with(&m.relocate(&crontab().command), &[("PATH", &path)]);
    let r = run(cron());
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "{}",
        r.describe()
    );
    assert_window(&m.root.join("lake/out/_state"), &m.run_id(), &m.day);

    // A job of its own, not yet committed, held mid-run.
    let mut env = fs::read_to_string(m.env_file()).unwrap();
    env.push_str("BACKFILL_FAILPOINT=after_write:sleep-3000\n");
    m.write_env(&env);
    let other = m.job("etc/backfill/other/nightly.toml", "other");
    let line = || {
        let command = format!(
            "{} {}",
            sh_quote(&m.script().display().to_string()),
            sh_quote(&other.display().to_string())
        );
        m.cron_with(&command, &[("PATH", &path)])
    };
    let mut first = Started::new(line());
    m.wait_for_logs(": start", 2);
    let second = run(line());
    assert!(first.running(), "the first run ended too soon");
    assert_eq!(second.code, Some(75), "{}", second.describe());
    let first = first.wait();
    assert_eq!(first.code, Some(0), "{}", first.describe());
}

/// `BACKFILL_DAY` by the calendar, leap days and year ends included; what
/// is not a day, or has not ended, stops the script with one line and
/// nothing on stderr (no `date` fallback's complaint in the mail).
#[test]
fn backfill_day_is_checked_by_the_calendar_and_refused_in_one_line() {
    let m = Machine::new(clean_rows);
    let args = m.root.join("args");
    m.fake_backfill(&format!(
        "printf '%s\\n' \"$@\" > {}\n",
        sh_quote(&args.display().to_string())
    ));
    let command = m.relocate(&crontab().command);
    for (day, next) in [
        ("2024-02-29", "2024-03-01"),
        ("2000-02-29", "2000-03-01"),
        ("1999-12-31", "2000-01-01"),
        ("1970-01-01", "1970-01-02"),
        ("2026-09-08", "2026-09-09"),
    ] {
        let r = run(m.cron_with(&command, &[("BACKFILL_DAY", day)]));
        assert!(
            r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
            "{day}: {}",
            r.describe()
        );
        let args = fs::read_to_string(&args).unwrap();
        assert!(
            args.contains(&format!(
                "--from\n{day}T00:00:00Z\n--to\n{next}T00:00:00Z\n--run-id\nnightly-{day}\n"
            )),
            "{day}: {args}"
        );
    }
    let today = Utc::now().date_naive();
    for (day, why) in [
        ("2023-02-29".to_string(), "is not a day"),
        ("2100-02-29".into(), "is not a day"),
        ("2026-13-01".into(), "is not a day"),
        ("2026-1-1".into(), "is not a day"),
        ("1969-12-31".into(), "is not a day"),
        ("yesterday".into(), "is not a day"),
        (today.to_string(), "has not ended"),
        ((today + Days::new(1)).to_string(), "has not ended"),
    ] {
        let r = run(m.cron_with(&command, &[("BACKFILL_DAY", &day)]));
        assert_eq!(r.code, Some(2), "{day}: {}", r.describe());
        assert!(
            r.stdout.starts_with(&format!(
                "backfill nightly failed: exit 2, BACKFILL_DAY={day} {why}"
            )) && r.stdout.lines().count() == 1
                && r.stderr.is_empty(),
            "{day}: {}",
            r.describe()
        );
    }
}

/// Two job files with one base name (a/nightly.toml, b/nightly.toml) have
/// a lock, a log and reports each: both run at once, and each log holds
/// its own run only.
#[test]
fn two_jobs_with_one_base_name_have_a_lock_and_a_log_each() {
    let m = Machine::new(clean_rows);
    let mut env = fs::read_to_string(m.env_file()).unwrap();
    env.push_str("BACKFILL_FAILPOINT=after_write:sleep-3000\n");
    m.write_env(&env);
    let line = |job: &Path| {
        m.cron_with(
            &format!(
                "{} {}",
                sh_quote(&m.script().display().to_string()),
                sh_quote(&job.display().to_string())
            ),
            &[],
        )
    };
    let a = m.job("etc/backfill/a/nightly.toml", "a");
    let b = m.job("etc/backfill/b/nightly.toml", "b");
    let mut first = Started::new(line(&a));
    m.wait_for_logs(": start", 1);
    assert!(first.running(), "the first run ended too soon");
    let second = run(line(&b));
    let first = first.wait();
    for r in [&first, &second] {
        assert!(
            r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
            "{}",
            r.describe()
        );
    }
    for out in ["a", "b"] {
        assert_window(
            &m.root.join(format!("lake/{out}/_state")),
            &m.run_id(),
            &m.day,
        );
    }
    let logs = m.files("nightly-", ".log");
    assert_eq!(logs.len(), 2, "{logs:?}");
    for log in &logs {
        let text = fs::read_to_string(log).unwrap();
        assert_eq!(text.matches(": start").count(), 1, "{text}");
        assert_eq!(text.matches(": exit 0").count(), 1, "{text}");
    }
    assert_eq!(m.files("nightly-", ".lock").len(), 2);
    assert_eq!(
        m.files("nightly-", &format!("-{}.json", m.day)).len(),
        2,
        "a report each"
    );
}

/// Spaces in every path (the root, the job's folder and name, the log
/// folder, the environment file, the lake) and a job name outside the run
/// id alphabet: the run id takes the name with `_` for what run ids refuse.
#[test]
fn spaces_in_every_path_and_a_job_name_outside_the_run_id_alphabet() {
    let m = Machine::under("cron root ", clean_rows);
    let lake = m.root.join("the lake");
    fs::rename(m.root.join("lake"), &lake).unwrap();
    let env_file = m.root.join("etc/back fill/back fill.env");
    fs::create_dir_all(env_file.parent().unwrap()).unwrap();
    fs::write(&env_file, format!("LAKE_DIR=\"{}\"\n", lake.display())).unwrap();
    let job = m.job("etc/back fill/my nightly (v2).toml", "out");
    let log_dir = m.root.join("var/log/back fill");
    let command = format!(
        "{} {}",
        sh_quote(&m.script().display().to_string()),
        sh_quote(&job.display().to_string())
    );
    let r = run(m.cron_with(
        &command,
        &[
            ("BACKFILL_ENV_FILE", &env_file.display().to_string()),
            ("BACKFILL_LOG_DIR", &log_dir.display().to_string()),
        ],
    ));
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "{}",
        r.describe()
    );
    let id = format!("my_nightly__v2_-{}", m.day);
    assert_window(&lake.join("out/_state"), &id, &m.day);
    let logs: Vec<String> = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.starts_with("my_nightly__v2_-") && l.ends_with(".log")),
        "{logs:?}"
    );
}

/// What a hostile crontab can get wrong, each refused with one line and
/// exit 2 (a human fixes it; a retry would not), nothing on stderr, no
/// secret shown: a URL for a job file, a folder, a log folder that is a
/// file, a log file that is a folder.
#[test]
fn a_broken_installation_is_one_line_and_exit_2() {
    let m = Machine::new(clean_rows);
    let script = sh_quote(&m.script().display().to_string());
    let job = m
        .root
        .join("etc/backfill/nightly.toml")
        .display()
        .to_string();
    let blocker = m.root.join("a-file");
    fs::write(&blocker, "").unwrap();
    let blocked = blocker.join("logs").display().to_string();
    let refused = |command: &str, vars: &[(&str, &str)], want: &str| {
        let r = run(m.cron_with(command, vars));
        assert!(
            r.code == Some(2)
                && r.stdout.starts_with(want)
                && r.stdout.lines().count() == 1
                && r.stderr.is_empty()
                && !r.stdout.contains("hunter2"),
            "{command}: {}",
            r.describe()
        );
    };
    refused(
        &format!("{script} 's3://user:hunter2@bucket/nightly.toml'"),
        &[],
        "backfill-cron.sh failed: exit 2, the job file must be a local path, not a URL",
    );
    refused(
        &format!(
            "{script} {}",
            sh_quote(&format!("{}/etc/backfill/", m.root.display()))
        ),
        &[],
        "backfill-cron.sh failed: exit 2, the job file argument names a folder",
    );
    refused(
        &format!("{script} {}", sh_quote(&job)),
        &[("BACKFILL_LOG_DIR", &blocked)],
        "backfill nightly failed: exit 2, cannot create the log folder",
    );
    // The log file's name taken by a folder.
    assert_eq!(m.run_cron().code, Some(0));
    let log = m.files("nightly-", ".log").remove(0);
    fs::remove_file(&log).unwrap();
    fs::create_dir(&log).unwrap();
    let r = m.run_cron();
    assert!(
        r.code == Some(2)
            && r.stdout.starts_with(&format!(
                "backfill nightly failed: exit 2, cannot write {}",
                log.display()
            ))
            && r.stderr.is_empty(),
        "{}",
        r.describe()
    );
}

/// kill -9 of the script and its backfill mid-run leaves the lock file but
/// no lock (flock's lock dies with its holders): the next invocation runs
/// and commits.
#[test]
fn a_run_killed_with_kill_9_leaves_no_stale_lock() {
    use std::os::unix::process::CommandExt;
    let m = Machine::new(clean_rows);
    let saved = fs::read_to_string(m.env_file()).unwrap();
    m.write_env(&format!(
        "{saved}BACKFILL_FAILPOINT=after_write:sleep-30000\n"
    ));
    let mut cmd = m.cron();
    cmd.process_group(0);
    let mut first = Started::new(cmd);
    m.wait_for_logs(": start", 1);
    let group = first.child.id() as libc::pid_t;
    // The group the test itself started: the shell, the script, backfill.
    assert_eq!(unsafe { libc::killpg(group, libc::SIGKILL) }, 0);
    assert!(first.child.wait().unwrap().code().is_none());
    assert_eq!(m.files("nightly-", ".lock").len(), 1);

    m.write_env(&saved);
    let r = m.run_cron();
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "{}",
        r.describe()
    );
    assert_window(&m.root.join("lake/out/_state"), &m.run_id(), &m.day);
}

/// backfill's exit code is the script's, and only a non-zero one prints:
/// the line saying what it means, then this run's part of the log.
#[test]
fn exit_codes_pass_through_and_only_failures_print() {
    let m = Machine::new(clean_rows);
    m.fake_backfill(
        "echo \"fake run, exit $FAKE_EXIT\"\n\
         [ \"$FAKE_EXIT\" = kill ] && kill -9 $$\n\
         exit \"$FAKE_EXIT\"\n",
    );
    let saved = fs::read_to_string(m.env_file()).unwrap();
    for (fake, code, why) in [
        ("0", 0, ""),
        ("1", 1, "runtime failure (store or broker)"),
        ("2", 2, "configuration error"),
        ("3", 3, "committed, and dead-lettered events"),
        ("4", 4, "another run on the same state won"),
        ("kill", 137, "killed by signal 9"),
    ] {
        m.write_env(&format!("{saved}FAKE_EXIT={fake}\n"));
        let r = m.run_cron();
        assert_eq!(r.code, Some(code), "{}", r.describe());
        assert!(r.stderr.is_empty(), "{}", r.describe());
        if code == 0 {
            assert!(r.stdout.is_empty(), "{}", r.describe());
            continue;
        }
        let first = r.stdout.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!(
                "backfill {} failed: exit {code}, {why}",
                m.run_id()
            )),
            "{}",
            r.describe()
        );
        // The shell may add its own "Killed" line.
        let tail: Vec<&str> = r.stdout.lines().skip(2).collect();
        assert!(
            (3..=4).contains(&tail.len())
                && tail[0].ends_with(": start")
                && tail[1] == format!("fake run, exit {fake}")
                && tail[tail.len() - 1].ends_with(&format!(": exit {code}")),
            "only this run's part of the log\n{}",
            r.describe()
        );
    }
    let missing = m.root.join("no/such/backfill").display().to_string();
    let r = run(m.cron_with(
        &m.relocate(&crontab().command),
        &[("BACKFILL_BIN", &missing)],
    ));
    assert_eq!(r.code, Some(127), "{}", r.describe());
    assert!(
        r.stdout.starts_with(&format!(
            "backfill {} failed: exit 127, {missing} could not be run (BACKFILL_BIN, PATH)",
            m.run_id()
        )),
        "{}",
        r.describe()
    );
}
