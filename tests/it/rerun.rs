//! A committed run tells the same story twice: a rerun of its run id with
//! the same settings writes nothing and exits as the committed run exited
//! (a scheduler's retry after exit 3 must not turn green), the same id with
//! other settings is refused with exit 2 naming the difference, and log
//! entries of older versions (no settings, or no outcome) keep the
//! behaviour they had.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::cli::{Run, backfill};
use crate::e2e::{manifest_of, manifests, snapshot};

/// A generated two-day archive; the first day's window dead-letters some
/// events (attempts exhausted, a conflict), so `--fail-on-dlq` exits 3.
struct Fixture {
    _dir: tempfile::TempDir,
    work: PathBuf,
    archive: String,
    out: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        let archive = work.join("archive").to_str().unwrap().to_string();
        backfill(&[
            "generate", "--out", &archive, "--events", "2000", "--keys", "20", "--seed", "3",
            "--days", "2",
        ])
        .ok();
        let out = work.join("out").to_str().unwrap().to_string();
        Fixture {
            _dir: dir,
            work,
            archive,
            out,
        }
    }

    /// `backfill run` over the archive into `out`, with `extra` flags.
    fn run(&self, run_id: &str, extra: &[&str]) -> Run {
        let mut args = vec![
            "run",
            "--source",
            &self.archive,
            "--out",
            &self.out,
            "--run-id",
            run_id,
            "--progress",
            "off",
        ];
        args.extend_from_slice(extra);
        backfill(&args)
    }

    fn state(&self) -> PathBuf {
        Path::new(&self.out).join("_state")
    }

    /// Rewrite the log entry of `run_id` as an older version wrote it.
    fn age_entry(&self, run_id: &str, edit: impl Fn(&mut serde_json::Map<String, Json>)) {
        let path = manifests(&self.state())
            .into_iter()
            .find(|p| {
                let j: Json = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
                j["run_id"] == run_id
            })
            .expect("the run's log entry");
        let mut j: Json = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        edit(j.as_object_mut().unwrap());
        fs::write(&path, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
    }
}

const DAY1: &str = "2024-01-02T00:00:00Z";
const DAY2: &str = "2024-01-03T00:00:00Z";

/// The one `error:` line of a refused rerun.
#[track_caller]
fn refused_saying(r: &Run, needle: &str) {
    r.expect_code(2);
    let lines = r.stderr_lines();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains(needle),
        "expected one error line containing {needle:?}\n{}",
        r.describe()
    );
}

/// The retry of a run that exited 3 under `--fail-on-dlq` exits 3 again
/// (an Airflow retry cannot turn it green), says the run is committed,
/// writes nothing, and hands back the committed figures with the code.
#[test]
fn a_retry_after_exit_3_exits_3_again_and_writes_nothing() {
    let f = Fixture::new();
    let report = f.work.join("report.json");
    let r = report.to_str().unwrap();
    let flags = ["--to", DAY1, "--fail-on-dlq", "--report", r];
    f.run("nightly-1", &flags).expect_code(3);
    let m = manifest_of(&f.state(), "nightly-1").unwrap();
    assert_eq!(
        m["outcome"],
        serde_json::json!({"exit_code": 3, "fail_on_dlq": true}),
        "{m}"
    );
    let dead = m["report"]["dead_lettered"].as_u64().unwrap();
    assert!(dead > 0);
    let before = snapshot(Path::new(&f.out));

    let again = f.run("nightly-1", &flags);
    again.expect_code(3);
    assert!(
        again.stdout.contains(&format!(
            "run nightly-1 is already committed; nothing to do (it exited 3: {dead} dead-lettered under --fail-on-dlq)"
        )) && again.stderr_lines().is_empty()
            // No warning but the run's end (at warn: it exits 3).
            && again
                .log_records()
                .iter()
                .all(|r| r["level"] != "WARN" || r["phase"] == "run"),
        "{}",
        again.describe()
    );
    assert_eq!(before, snapshot(Path::new(&f.out)), "the retry wrote");
    let json: Json = serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["already_committed"], true, "{json}");
    assert_eq!(json["exit_code"], 3, "{json}");
    assert_eq!(json["dead_lettered"], dead, "{json}");
}

/// A clean run's retry exits 0, and writes nothing.
#[test]
fn a_retry_after_exit_0_exits_0_and_writes_nothing() {
    let f = Fixture::new();
    f.run("nightly-1", &["--to", DAY1]).ok();
    assert_eq!(
        manifest_of(&f.state(), "nightly-1").unwrap()["outcome"]["exit_code"],
        0
    );
    let before = snapshot(Path::new(&f.out));
    let again = f.run("nightly-1", &["--to", DAY1]);
    again.ok();
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.describe()
    );
    assert_eq!(before, snapshot(Path::new(&f.out)), "the retry wrote");
}

/// The same run id over another window is another run under a taken name:
/// exit 2, one line naming the flag and both values, nothing written. A
/// dry run (the DAG's preflight) is refused the same way.
#[test]
fn the_same_run_id_with_another_window_exits_2_naming_it() {
    let f = Fixture::new();
    f.run("nightly-2024-01-01", &["--to", DAY1]).ok();
    let before = snapshot(Path::new(&f.out));
    let expected = format!(
        "run id nightly-2024-01-01 was committed with --to {DAY1}; this run has --to {DAY2}"
    );
    refused_saying(&f.run("nightly-2024-01-01", &["--to", DAY2]), &expected);
    refused_saying(
        &f.run("nightly-2024-01-01", &["--to", DAY2, "--dry-run"]),
        &expected,
    );
    // Rules and sinks are part of the run too; each difference is named.
    let gaps = f.work.join("elsewhere").to_str().unwrap().to_string();
    refused_saying(
        &f.run(
            "nightly-2024-01-01",
            &["--to", DAY1, "--max-attempts", "5", "--gaps-sink", &gaps],
        ),
        // The default sink is named by the folder it stands for.
        &format!(
            "was committed with --gaps-sink {}/gaps, --max-attempts 3; this run has --gaps-sink {gaps}, --max-attempts 5",
            f.out
        ),
    );
    assert_eq!(before, snapshot(Path::new(&f.out)), "a refused rerun wrote");
}

/// `--fail-on-dlq` decides how a run ends: a run committed without it
/// (exit 0) is not re-reported as a failure by a rerun that adds it, nor
/// the other way round: both are refused, naming the flag.
#[test]
fn fail_on_dlq_is_part_of_the_run() {
    let f = Fixture::new();
    f.run("quiet", &["--to", DAY1]).ok();
    refused_saying(
        &f.run("quiet", &["--to", DAY1, "--fail-on-dlq"]),
        "run id quiet was committed with no --fail-on-dlq; this run has --fail-on-dlq",
    );
    f.run("loud", &["--to", DAY1, "--fail-on-dlq"])
        .expect_code(3);
    refused_saying(
        &f.run("loud", &["--to", DAY1]),
        "run id loud was committed with --fail-on-dlq; this run has no --fail-on-dlq",
    );
}

/// A log entry written before settings were recorded: the settings are
/// unknown, so the run id is taken as done whatever this run's settings
/// (exit 0 or, under `--fail-on-dlq`, 3 from the committed figures), as
/// those versions did.
#[test]
fn an_entry_without_settings_is_taken_as_done() {
    let f = Fixture::new();
    f.run("old", &["--to", DAY1]).ok();
    f.age_entry("old", |m| {
        m.remove("settings");
        m.remove("outcome");
        m["report"].as_object_mut().unwrap().remove("exit_code");
    });
    let before = snapshot(Path::new(&f.out));
    let again = f.run("old", &["--to", DAY2]);
    again.ok();
    assert!(
        again
            .stdout
            .contains("run old is already committed; nothing to do\n"),
        "{}",
        again.describe()
    );
    f.run("old", &["--to", DAY2, "--fail-on-dlq"])
        .expect_code(3);
    assert_eq!(before, snapshot(Path::new(&f.out)), "a rerun wrote");
    // The next run id decides as usual beside the old entry.
    f.run("new", &["--to", DAY2]).ok();
}

/// A log entry with settings but no outcome (the version before outcomes
/// were recorded): other settings are refused; `--fail-on-dlq`, which it did
/// not record, is not compared, and the exit code follows this run's flag.
#[test]
fn an_entry_without_outcome_compares_its_settings_only() {
    let f = Fixture::new();
    f.run("mid", &["--to", DAY1]).ok();
    f.age_entry("mid", |m| {
        m.remove("outcome");
        m["report"].as_object_mut().unwrap().remove("exit_code");
    });
    refused_saying(
        &f.run("mid", &["--to", DAY2]),
        &format!("run id mid was committed with --to {DAY1}; this run has --to {DAY2}"),
    );
    f.run("mid", &["--to", DAY1]).ok();
    f.run("mid", &["--to", DAY1, "--fail-on-dlq"])
        .expect_code(3);
}

/// The refusal names sinks as the log records them: without credentials
/// (a signed URL's signature is hidden).
#[test]
fn a_refusal_never_prints_a_secret() {
    let f = Fixture::new();
    f.run("s", &["--to", DAY1]).ok();
    let r = f.run(
        "s",
        &[
            "--to",
            DAY1,
            "--replay-sink",
            "s3://bucket/replay?X-Amz-Signature=c2VjcmV0LXNpZ25hdHVyZQ",
        ],
    );
    refused_saying(&r, "this run has --replay-sink s3://bucket/replay?");
    assert!(
        !r.stderr.contains("c2VjcmV0LXNpZ25hdHVyZQ"),
        "{}",
        r.describe()
    );
    let m = manifest_of(&f.state(), "s").unwrap();
    assert!(
        m["settings"].is_object() && m.get("outcome").is_some(),
        "{m}"
    );
}

/// Settings compare by what they mean: the same folders spelled otherwise
/// (relative, `./`, a trailing `/`, `file://`, the default sink given
/// explicitly) and the same statuses repeated or reordered are the same
/// run, not "other settings" (exit 2 tells a scheduler never to retry).
#[test]
fn the_same_settings_spelled_otherwise_are_the_same_run() {
    let f = Fixture::new();
    let first = f.run(
        "spelled",
        &["--done-status", "processed", "--done-status", "skipped"],
    );
    assert_eq!(first.code, Some(0), "{}", first.describe());
    let before = snapshot(Path::new(&f.out));
    let replay = format!("{}/replay", f.out);
    let file_url = format!("file://{}", f.archive);
    let spellings: Vec<Vec<&str>> = vec![
        vec!["--source", "./archive/", "--out", "./out/"],
        vec!["--source", &file_url, "--out", "out"],
        vec![
            "--source",
            "archive",
            "--out",
            "out",
            "--replay-sink",
            &replay,
        ],
    ];
    for spelled in spellings {
        let mut args = vec!["run", "--run-id", "spelled", "--progress", "off"];
        args.extend_from_slice(&spelled);
        args.extend_from_slice(&[
            "--done-status",
            "skipped",
            "--done-status",
            "processed",
            "--done-status",
            "processed",
        ]);
        let run = crate::cli::backfill_in(&args, &[], Some(&f.work));
        assert_eq!(run.code, Some(0), "{spelled:?}\n{}", run.describe());
        assert!(
            run.stdout.contains("already committed"),
            "{spelled:?}\n{}",
            run.describe()
        );
        assert_eq!(
            snapshot(Path::new(&f.out)),
            before,
            "{spelled:?}: nothing written"
        );
    }
}
