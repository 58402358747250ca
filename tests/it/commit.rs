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
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_backfill")), &args);
    cmd.env("BACKFILL_FAILPOINT", "before_commit:sleep-4000");
    let mut child = cmd.spawn().unwrap();
    let t_out = read_all(child.stdout.take().unwrap());
    let t_err = read_all(child.stderr.take().unwrap());
    // Wait until it has staged its outputs.
    let start = std::time::Instant::now();
    while !out.join("replay/_staging").exists() || !out.join("_state/attempts").exists() {
        assert!(
            start.elapsed().as_secs() < 60,
            "the run never staged anything"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let gc = bf(&["state", "gc", "--out", o, "--min-age-minutes", "0"], None);
    gc.ok();
    assert!(
        gc.stdout.contains("fenced abandoned attempt"),
        "{}",
        gc.describe()
    );
    let status = child.wait().unwrap();
    let (_, err) = (t_out.join().unwrap(), t_err.join().unwrap());
    assert_eq!(status.code(), Some(4), "{err}");
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
        again.stderr.contains("warning: report file"),
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
