//! The edges of the commit protocol on local disk that the crash harness
//! does not reach: gc beside another job and beside a running attempt,
//! stdout printed only after the commit, the report file checked before the
//! scan and never able to change a committed outcome.

use std::path::Path;

use crate::cli::{Run, backfill_in, command, read_all};
use crate::e2e::manifests;
use crate::reference::parquet_files;

fn bf(args: &[&str], failpoint: Option<&str>) -> Run {
    let envs: Vec<(&str, &str)> = failpoint
        .map(|f| vec![("BACKFILL_FAILPOINT", f)])
        .unwrap_or_default();
    backfill_in(args, &envs, None)
}

fn archive(dir: &Path) -> String {
    let a = dir.join("archive");
    let a = a.to_str().unwrap().to_string();
    bf(
        &[
            "generate", "--out", &a, "--events", "1500", "--keys", "15", "--seed", "5", "--days",
            "1",
        ],
        None,
    )
    .ok();
    a
}

/// Two jobs with their own states write to one shared sink folder; gc of
/// one never touches the other's committed (or running) files.
#[test]
fn gc_leaves_another_jobs_files_in_a_shared_sink_folder_alone() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let shared = work.path().join("shared");
    let sinks = |job: &str| -> Vec<String> {
        vec![
            "--replay-sink".into(),
            shared.join("replay").to_str().unwrap().into(),
            "--dlq-sink".into(),
            shared.join("dlq").to_str().unwrap().into(),
            "--gaps-sink".into(),
            shared.join("gaps").to_str().unwrap().into(),
            "--state".into(),
            work.path()
                .join(job)
                .join("_state")
                .to_str()
                .unwrap()
                .into(),
        ]
    };
    let run = |job: &str, id: &str, fp: Option<&str>| {
        let mut args: Vec<String> = vec!["run".into(), "--source".into(), a.clone()];
        args.extend(sinks(job));
        args.extend(["--run-id".into(), id.into()]);
        let v: Vec<&str> = args.iter().map(String::as_str).collect();
        bf(&v, fp)
    };
    run("job-b", "b1", None).ok();
    // An attempt of job B cut off before its commit: its staged files
    // belong to B, not to A.
    run("job-b", "b2", Some("before_commit:crash"));
    // What a kill mid-upload leaves on local disk: object_store's `#N`
    // temporaries, which its own listing hides.
    let staged_dir = std::fs::read_dir(shared.join("replay/_staging/run_id=b2"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let nonce = staged_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    std::fs::write(staged_dir.join("part-00001.parquet.staged#7"), b"partial").unwrap();
    let b_state = work.path().join("job-b/_state");
    std::fs::create_dir_all(b_state.join("runs/b2")).unwrap();
    std::fs::write(
        b_state.join(format!("runs/b2/ledger-{nonce}.parquet#9")),
        b"partial",
    )
    .unwrap();
    let before = snapshot(&shared);
    assert!(before.iter().any(|f| f.contains("_staging/run_id=b2/")));
    run("job-a", "a1", None).ok();
    let gc = bf(
        &[
            "state",
            "gc",
            "--state",
            work.path().join("job-a/_state").to_str().unwrap(),
            "--min-age-minutes",
            "0",
        ],
        None,
    );
    gc.ok();
    let after = snapshot(&shared);
    for f in &before {
        assert!(
            after.contains(f),
            "gc of job A removed job B's {f}\n{}",
            gc.describe()
        );
    }
    // Job B's own gc removes its abandoned attempt, and only that.
    let gc_b = bf(
        &[
            "state",
            "gc",
            "--state",
            work.path().join("job-b/_state").to_str().unwrap(),
            "--min-age-minutes",
            "0",
        ],
        None,
    );
    gc_b.ok();
    assert!(
        gc_b.stdout.contains("fenced abandoned attempt"),
        "{}",
        gc_b.describe()
    );
    let last = snapshot(&shared);
    assert!(!last.iter().any(|f| f.contains("_staging/")), "{last:?}");
    assert!(!shared.join("replay/_staging").exists());
    let state_left = snapshot(&b_state);
    assert!(
        !state_left
            .iter()
            .any(|f| f.contains('#') || f.contains("b2")),
        "{state_left:?}"
    );
    assert!(
        gc_b.stdout.contains("part-00001.parquet.staged#7"),
        "{}",
        gc_b.describe()
    );
    for f in after.iter().filter(|f| !f.contains("_staging/")) {
        assert!(last.contains(f), "gc of job B removed committed {f}");
    }
}

/// A run that is still going when gc declares it abandoned cannot commit
/// afterwards: gc's fence entry stops it (exit 4), nothing of it is
/// visible, and the rerun commits.
#[test]
fn a_run_fenced_by_gc_cannot_commit() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let args = ["run", "--source", &a, "--out", o, "--run-id", "slow"];
    let run = Background::start(&args, "before_commit:sleep-4000");
    // Wait until it has staged its outputs.
    wait_for(&[out.join("replay/_staging"), out.join("_state/attempts")]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let gc = bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None);
    gc.ok();
    assert!(
        gc.stdout.contains("fenced abandoned attempt"),
        "{}",
        gc.describe()
    );
    let (code, err) = run.wait();
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("fenced by `state gc`"), "{err}");
    assert!(manifests(&out.join("_state")).is_empty());
    assert!(parquet_files(&out.join("replay")).is_empty());
    bf(&args, None).ok();
    assert_eq!(manifests(&out.join("_state")).len(), 1);
}

/// `--replay-sink -` prints rows only once the run is committed: a run that
/// fails before its commit prints none.
#[test]
fn stdout_sink_prints_only_after_the_commit() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let args = [
        "run",
        "--source",
        &a,
        "--out",
        o,
        "--replay-sink",
        "-",
        "--run-id",
        "p",
    ];
    let failed = bf(&args, Some("before_commit:error"));
    failed.expect_code(1);
    assert!(failed.stdout.trim().is_empty(), "{}", failed.describe());
    let ok = bf(&args, None);
    ok.ok();
    let lines: Vec<&str> = ok.stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "{}", ok.describe());
    for l in &lines {
        let j: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(j["backfill_run_id"], "p");
    }
    // The summary went to stderr, the rows alone to stdout.
    assert!(ok.stderr.contains("run p committed"), "{}", ok.describe());
}

/// The report file: an unwritable path fails before the scan (exit 2,
/// nothing committed); once committed, a report that cannot be written is
/// a warning, and the rerun of the committed id still exits 0.
#[test]
fn report_file_is_checked_before_the_scan_and_cannot_undo_a_commit() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let bad = work.path().join("no/such/folder/report.json");
    let args = [
        "run",
        "--source",
        &a,
        "--out",
        o,
        "--run-id",
        "r",
        "--report",
        bad.to_str().unwrap(),
    ];
    let r = bf(&args, None);
    r.expect_code(2);
    assert!(
        r.stderr.contains("--report") && r.stderr.contains("no/such/folder"),
        "{}",
        r.describe()
    );
    assert!(manifests(&out.join("_state")).is_empty());

    // Commit, then make the report's folder read-only (as root, a folder
    // replaced by a file is the reliable way to refuse the write).
    let dir = work.path().join("reports");
    std::fs::create_dir(&dir).unwrap();
    let report = dir.join("report.json");
    let args = [
        "run",
        "--source",
        &a,
        "--out",
        o,
        "--run-id",
        "r",
        "--report",
        report.to_str().unwrap(),
    ];
    bf(&args, None).ok();
    let text = std::fs::read_to_string(&report).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["run_id"], "r");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a folder").unwrap();
    let again = bf(&args, None);
    again.ok();
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.describe()
    );
    assert!(
        again
            .logged("WARN")
            .iter()
            .any(|m| m.starts_with("report file") && m.ends_with("the run's outcome is unaffected")),
        "{}",
        again.describe()
    );
}

/// Every file below `dir`, relative, as strings.
fn snapshot(dir: &Path) -> Vec<String> {
    crate::e2e::snapshot(dir)
        .into_keys()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().to_string())
        .collect()
}

/// A run started in the background with a failpoint armed; `wait` joins it.
struct Background {
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Background {
    fn start(args: &[&str], failpoint: &str) -> Background {
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_backfill")), args);
        cmd.env("BACKFILL_FAILPOINT", failpoint);
        let mut child = cmd.spawn().unwrap();
        let out = read_all(child.stdout.take().unwrap());
        let err = read_all(child.stderr.take().unwrap());
        Background { child, out, err }
    }

    /// Exit code (None when killed or crashed) and stderr.
    fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let _ = self.out.join();
        (status.code(), self.err.join().unwrap())
    }
}

/// Wait (at most a minute) until every path exists.
fn wait_for(paths: &[std::path::PathBuf]) {
    let start = std::time::Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        assert!(start.elapsed().as_secs() < 60, "never appeared: {paths:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn run_args<'a>(a: &'a str, o: &'a str, id: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--source",
        a,
        "--out",
        o,
        "--run-id",
        id,
        "--progress",
        "off",
    ]
}

/// Two outputs in one folder (or one inside the other) would overwrite each
/// other's files: refused before anything is read.
#[test]
fn two_sinks_in_one_folder_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let both = out.join("both");
    let b = both.to_str().unwrap();
    let inner = out.join("replay/holes");
    for extra in [
        vec!["--replay-sink", b, "--dlq-sink", b],
        vec!["--gaps-sink", inner.to_str().unwrap()],
    ] {
        let mut args = run_args(&a, o, "s");
        args.extend(extra);
        let r = bf(&args, None);
        r.expect_code(2);
        assert!(r.stderr.contains("share a folder"), "{}", r.describe());
        assert!(manifests(&out.join("_state")).is_empty());
    }
}

/// A ledger file the log names that is gone or empty, or a hole in the
/// log, would read as "nothing done" and replay everything again: the run
/// stops with one line naming the file.
#[test]
fn a_damaged_state_stops_the_run_instead_of_acting_twice() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    for damage in [
        "missing ledger",
        "empty ledger",
        "truncated ledger",
        "hole in the log",
    ] {
        let out = work.path().join(damage.replace(' ', "-"));
        let o = out.to_str().unwrap();
        bf(&run_args(&a, o, "one"), None).ok();
        bf(&run_args(&a, o, "two"), None).ok();
        let state = out.join("_state");
        let ledger = std::fs::read_dir(state.join("runs/one"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let named = match damage {
            "missing ledger" => {
                std::fs::remove_file(&ledger).unwrap();
                ledger.display().to_string()
            }
            "empty ledger" => {
                std::fs::write(&ledger, b"").unwrap();
                ledger.display().to_string()
            }
            "truncated ledger" => {
                let bytes = std::fs::read(&ledger).unwrap();
                std::fs::write(&ledger, &bytes[..100.min(bytes.len() - 1)]).unwrap();
                ledger.display().to_string()
            }
            _ => {
                let first = manifests(&state)[0].clone();
                std::fs::remove_file(&first).unwrap();
                first.display().to_string()
            }
        };
        let r = bf(&run_args(&a, o, "three"), None);
        r.expect_code(1);
        let lines = r.stderr_lines();
        assert_eq!(lines.len(), 1, "{}", r.describe());
        assert!(
            lines[0].contains("is damaged") && lines[0].contains(&named),
            "{damage}: {}",
            r.describe()
        );
        // gc acts on no event; but with a hole in the log it cannot tell
        // which ledger files are named, so it refuses too.
        let gc = bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None);
        if damage == "hole in the log" {
            gc.expect_code(1);
            assert!(ledger.exists(), "gc deleted a ledger of a damaged log");
        } else {
            gc.ok();
        }
    }
}

/// `--fail-on-dlq`: a retry of a run that exited 3 exits 3 again (the
/// scheduler must not turn the task green).
#[test]
fn fail_on_dlq_survives_a_retry() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let mut args = run_args(&a, o, "d");
    args.push("--fail-on-dlq");
    bf(&args, None).expect_code(3);
    let again = bf(&args, None);
    again.expect_code(3);
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.describe()
    );
}

/// gc on a location with no state at all (a typo in --out) says so.
#[test]
fn gc_without_a_state_is_a_usage_error() {
    let work = tempfile::tempdir().unwrap();
    let nowhere = work.path().join("typo");
    let r = bf(&["state", "gc", "--out", nowhere.to_str().unwrap()], None);
    r.expect_code(2);
    assert!(r.stderr.contains("no backfill state"), "{}", r.describe());
}

/// A committed run whose publishing was cut and one of whose staged files
/// is then lost: the others are still published, the loss is reported
/// once, and gc is quiet afterwards.
#[test]
fn a_lost_staged_file_does_not_keep_the_rest_staged() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let r = bf(&run_args(&a, o, "cut"), Some("after_commit:crash"));
    assert!(r.code.is_none(), "{}", r.describe());
    let staged: Vec<_> = crate::e2e::snapshot(&out.join("replay/_staging"))
        .into_keys()
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    std::fs::remove_file(&staged[0]).unwrap();
    let gc = bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None);
    gc.expect_code(1);
    assert!(
        gc.stderr.contains("neither staged nor published"),
        "{}",
        gc.describe()
    );
    for sink in ["dlq", "gaps"] {
        assert_eq!(
            parquet_files(&out.join(sink)).len(),
            1,
            "{sink} published despite the lost replay file"
        );
        assert!(!out.join(sink).join("_staging").exists());
    }
    bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None).ok();
}

/// An attempt that gc fenced while it was still writing, and that was
/// killed afterwards, leaves staged files no attempt record names any
/// more: the next gc finds them through the fence entry.
#[test]
fn a_fenced_attempt_that_kept_writing_is_cleaned_by_the_next_gc() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let args = run_args(&a, o, "slow");
    let run = Background::start(&args, "after_write:sleep-3000,before_commit:crash");
    wait_for(&[out.join("_state/attempts")]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let gc = bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None);
    gc.ok();
    assert!(
        gc.stdout.contains("fenced abandoned attempt"),
        "{}",
        gc.describe()
    );
    let (code, _) = run.wait();
    assert!(code.is_none(), "the run should crash before its commit");
    let staged = snapshot(&out.join("replay"));
    assert!(
        staged.iter().any(|f| f.starts_with("_staging/")),
        "the fenced attempt wrote after the fence: {staged:?}"
    );
    bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None).ok();
    for sink in ["replay", "dlq", "gaps"] {
        assert!(!out.join(sink).join("_staging").exists(), "{sink}");
    }
}

/// A run that commits while gc works (gc paused after reading the log):
/// gc sees its entry before deleting anything, so the ledger survives and
/// the next run does not act on its events again.
#[test]
fn gc_never_deletes_the_ledger_of_a_run_that_commits_meanwhile() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let args = run_args(&a, o, "meanwhile");
    let run = Background::start(&args, "before_commit:sleep-1500");
    wait_for(&[out.join("_state/attempts")]);
    let gc = bf(
        &["state", "gc", "--out", o, "--min-age-minutes", "0"],
        Some("gc_after_snapshot:sleep-5000"),
    );
    let (code, err) = run.wait();
    assert_eq!(code, Some(0), "{err}");
    gc.ok();
    assert!(!gc.stdout.contains("ledger file"), "{}", gc.describe());
    let ledgers = snapshot(&out.join("_state/runs"));
    assert_eq!(ledgers.len(), 1, "{ledgers:?}");
    // The next run counts the committed run's decisions.
    bf(&run_args(&a, o, "next"), None).ok();
    let dup = crate::e2e::manifests(&out.join("_state")).len();
    assert_eq!(dup, 2);
}

/// A run id is its settings: after a crash at `after_prepare`, a rerun
/// with another window does not commit the old attempt's outputs under the
/// new report, and a committed run id rerun with other settings is refused
/// (exit 2) naming the difference (tests/it/rerun.rs has the rest).
#[test]
fn a_rerun_with_other_settings_is_not_a_retry() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let mut first = run_args(&a, o, "w");
    first.extend(["--to", "2024-01-01T12:00:00Z"]);
    let r = bf(&first, Some("after_prepare:crash"));
    assert!(r.code.is_none(), "{}", r.describe());
    let mut other = run_args(&a, o, "w");
    other.extend(["--to", "2024-01-01T18:00:00Z"]);
    let r = bf(&other, None);
    r.ok();
    assert!(
        r.stderr.contains("prepared with other settings") && !r.stdout.contains("recovered"),
        "{}",
        r.describe()
    );
    let m = crate::e2e::manifest_of(&out.join("_state"), "w").unwrap();
    assert_eq!(m["settings"]["to"], "2024-01-01T18:00:00+00:00");
    assert_eq!(m["report"]["window_to"], "2024-01-01T18:00:00+00:00");
    // Committed: the same id with the first window is not silently "done".
    let again = bf(&first, None);
    again.expect_code(2);
    assert!(
        again.stderr.contains(
            "run id w was committed with --to 2024-01-01T18:00:00Z; this run has --to 2024-01-01T12:00:00Z"
        ),
        "{}",
        again.describe()
    );
}

/// Folders compared as the file system resolves them: a symlinked
/// spelling of one sink's folder is the same folder, and a state inside a
/// sink folder would show its ledger to the sink's readers.
#[test]
fn sinks_and_state_sharing_a_folder_through_symlinks_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&out, work.path().join("link")).unwrap();
    let o = out.to_str().unwrap();
    let via_link = work.path().join("link/a");
    let direct = out.join("a");
    let state_in_sink = out.join("replay/st");
    for extra in [
        vec![
            "--replay-sink",
            direct.to_str().unwrap(),
            "--dlq-sink",
            via_link.to_str().unwrap(),
        ],
        vec!["--state", state_in_sink.to_str().unwrap()],
    ] {
        let mut args = run_args(&a, o, "s");
        args.extend(extra);
        let r = bf(&args, None);
        r.expect_code(2);
        assert!(r.stderr.contains("share a folder"), "{}", r.describe());
    }
}

/// A folder inside the archive that is a symlink to the outputs: the
/// second run does not read the first one's outputs back.
#[test]
fn outputs_reached_through_a_symlink_inside_the_source_are_not_read_back() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("real-out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&out, std::path::Path::new(&a).join("link")).unwrap();
    let o = out.to_str().unwrap();
    let rows = |r: &Run| -> String {
        r.stdout
            .lines()
            .find(|l| l.trim_start().starts_with("scanned"))
            .and_then(|l| l.split(" (").next())
            .unwrap_or("")
            .to_string()
    };
    let first = bf(&run_args(&a, o, "one"), None);
    first.ok();
    let second = bf(&run_args(&a, o, "two"), None);
    second.ok();
    assert_eq!(rows(&first), rows(&second), "{}", second.describe());
}

/// A crash after the attempt prepared, with a stdout sink: its rows were
/// never printed, so the rerun runs again and prints them instead of
/// committing the prepared attempt (which would mark them done, unprinted).
#[test]
fn a_prepared_attempt_with_stdout_rows_is_run_again_not_recovered() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let mut args = run_args(&a, o, "p");
    args.extend(["--dlq-sink", "-"]);
    let r = bf(&args, Some("after_prepare:crash"));
    assert!(
        r.code.is_none() && !r.stdout.contains('{'),
        "{}",
        r.describe()
    );
    let again = bf(&args, None);
    again.ok();
    assert!(!again.stderr.contains("recovered"), "{}", again.describe());
    assert!(
        again.stdout.lines().filter(|l| l.starts_with('{')).count() > 0,
        "the dead letters are printed\n{}",
        again.describe()
    );
}

/// The last log entry deleted: its published marker shows the hole, and
/// the run stops instead of acting on those events again.
#[test]
fn a_deleted_last_log_entry_is_seen_as_damage() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    bf(&run_args(&a, o, "one"), None).ok();
    bf(&run_args(&a, o, "two"), None).ok();
    let last = manifests(&out.join("_state")).pop().unwrap();
    std::fs::remove_file(&last).unwrap();
    let r = bf(&run_args(&a, o, "three"), None);
    r.expect_code(1);
    assert!(
        r.stderr.contains("is damaged") && r.stderr.contains(&last.display().to_string()),
        "{}",
        r.describe()
    );
}

/// A name in the log taken by something that is not an entry (a folder, a
/// dangling link) at the next free position: the commit's create-only
/// write finds it taken, the log read again shows no entry there. The run
/// must stop naming it (it used to retry the same write forever, holding
/// a scheduler's lock).
#[test]
fn a_log_position_taken_by_a_folder_stops_the_commit() {
    let work = tempfile::tempdir().unwrap();
    let a = archive(work.path());
    for blocker in ["folder", "dangling link"] {
        let out = work.path().join(blocker.replace(' ', "-"));
        let o = out.to_str().unwrap();
        bf(&run_args(&a, o, "one"), None).ok();
        let log = out.join("_state/log");
        let mut names: Vec<String> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        let last = names.last().expect("a log entry").clone();
        let seq: u64 = last.trim_end_matches(".json").parse().unwrap();
        let next = log.join(format!("{:020}.json", seq + 1));
        match blocker {
            "folder" => std::fs::create_dir(&next).unwrap(),
            _ => std::os::unix::fs::symlink("/nonexistent/entry", &next).unwrap(),
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let args: Vec<String> = run_args(&a, o, "two")
            .into_iter()
            .map(String::from)
            .collect();
        std::thread::spawn(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = tx.send(bf(&refs, None));
        });
        let run = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{blocker}: the commit did not end within 60 s"));
        assert_eq!(run.code, Some(1), "{blocker}\n{}", run.describe());
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{blocker}\n{}", run.describe());
        assert!(
            lines[0].contains(&format!("{:020}.json", seq + 1)),
            "{blocker}: the line names the log position\n{}",
            run.describe()
        );
    }
}
