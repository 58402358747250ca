//! The shipped scheduler files, exercised for real: the Airflow DAG loaded
//! into an installed Apache Airflow 3 (tests/it/airflow_check.py says what
//! is checked), and the crontab's line run as cron runs it — `env -i`, the
//! crontab's variables, `$SHELL -c` — with the built binary on the
//! crontab's PATH, against an archive of yesterday's events.

use std::fs;
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
        r.code == Some(0) && oks.len() == 5,
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
        let dir = tempfile::tempdir().unwrap();
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
        let etc = root.join("etc/backfill");
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("nightly.toml"),
            "source = \"${LAKE_DIR}/archive\"\nout = \"${LAKE_DIR}/out\"\n",
        )
        .unwrap();
        fs::write(
            etc.join("backfill.env"),
            format!(
                "# as jobs/backfill.env.example\nLAKE_DIR={}\n",
                root.join("lake").display()
            ),
        )
        .unwrap();
        write_file(
            &root.join(format!("lake/archive/dt={day}/part-0.parquet")),
            &Layout::default(),
            &rows(&day),
        );
        Machine {
            _dir: dir,
            root,
            day,
        }
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

    /// The crontab's command as cron starts it: an empty environment
    /// (`env -i`) but for the crontab's variables and what cron itself sets
    /// (HOME, LOGNAME), run by the crontab's SHELL with `-c`.
    fn cron(&self) -> Command {
        let entry = crontab();
        let mut cmd = Command::new("env");
        cmd.arg("-i");
        let mut shell = "/bin/sh".to_string();
        for (name, value) in &entry.vars {
            let value = self.relocate(value);
            if name == "SHELL" {
                shell = value.clone();
            }
            cmd.arg(format!("{name}={value}"));
        }
        cmd.arg(format!("HOME={}", self.root.display()))
            .arg("LOGNAME=backfill")
            .arg(shell)
            .arg("-c")
            .arg(self.relocate(&entry.command));
        cmd
    }

    fn run_cron(&self) -> Run {
        finish(self.cron(), "the crontab line", Duration::from_secs(120))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_dir().join("nightly.log")).unwrap_or_default()
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
    let report: Json =
        serde_json::from_str(&fs::read_to_string(m.log_dir().join(format!("{id}.json"))).unwrap())
            .unwrap();
    assert_eq!(report["run_id"], id.as_str(), "{report}");
    assert_eq!(report["replayed"], 1, "{report}");
    let entry = manifest_of(&m.root.join("lake/out/_state"), &id).expect("the run is committed");
    let next =
        (chrono::NaiveDate::parse_from_str(&m.day, "%Y-%m-%d").unwrap() + Days::new(1)).to_string();
    assert_eq!(
        (&entry["settings"]["from"], &entry["settings"]["to"]),
        (
            &Json::from(format!("{}T00:00:00+00:00", m.day)),
            &Json::from(format!("{next}T00:00:00+00:00"))
        ),
        "{entry}"
    );

    let again = m.run_cron();
    assert!(
        again.code == Some(0) && again.stdout.is_empty() && again.stderr.is_empty(),
        "{}",
        again.describe()
    );
    assert!(m.log().contains(&format!("run {id} is already committed")));
}

/// What cron mails: a failing run prints why, then its part of the log.
/// Without the environment file the job file's `${LAKE_DIR}` is unset:
/// exit 2, naming it; with dead letters, exit 3 and the report's path.
#[test]
fn a_failing_cron_run_prints_what_cron_mails() {
    let m = Machine::new(dead_letter_rows);
    let env_file = m.root.join("etc/backfill/backfill.env");
    let saved = fs::read_to_string(&env_file).unwrap();
    fs::remove_file(&env_file).unwrap();
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

    fs::write(&env_file, saved).unwrap();
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
    let env_file = m.root.join("etc/backfill/backfill.env");
    let mut env = fs::read_to_string(&env_file).unwrap();
    env.push_str("BACKFILL_FAILPOINT=after_write:sleep-4000\n");
    fs::write(&env_file, env).unwrap();

    let mut first = m.cron();
    first
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut first = first.spawn().unwrap();
    let out = read_all(first.stdout.take().unwrap());
    let err = read_all(first.stderr.take().unwrap());
    let start = Instant::now();
    while !m.log().contains("start") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first run never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = m.run_cron();
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second started (is the build without --features failpoints?)"
    );
    assert_eq!(second.code, Some(75), "{}", second.describe());
    assert!(
        second
            .stdout
            .contains("skipped: a run of this job still holds")
            && second.stdout.contains("nightly.lock"),
        "{}",
        second.describe()
    );
    let status = first.wait().unwrap();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.code() == Some(0) && out.is_empty() && err.is_empty(),
        "first run: {status:?}\n{out}\n{err}"
    );
    let log = m.log();
    assert_eq!(log.matches(": start").count(), 1, "{log}");
    assert!(
        log.contains(&format!("run {} committed", m.run_id())),
        "{log}"
    );
}
