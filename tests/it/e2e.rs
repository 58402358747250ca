//! End to end: the binary on hand-made and generated archives, every output
//! and the report compared with the independent reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use arrow::datatypes::{DataType, TimeUnit};
use serde_json::Value as Json;

use crate::archive::{Archive, Col, Layout, Row, ts};
use crate::cli::{Run, backfill, backfill_in};
use crate::reference::{
    Columns, Config, Expected, Ledger, Source, decide, diff_events, diff_gaps, read_output,
    read_source,
};

// ---------------------------------------------------------------- helpers

/// Nanoseconds of an RFC 3339 timestamp, for [`Config`] windows.
fn ns(rfc3339: &str) -> i64 {
    ts(rfc3339) * 1000
}

/// Every file below `dir` (recursively), with size and modification time.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.insert(path, (meta.len(), meta.modified().expect("mtime")));
        }
    }
    out
}

/// The committed runs' log entries under a state folder (`log/*.json` of
/// kind `run`), in log order.
pub fn manifests(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(state.join("log"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .filter(|p| {
                    fs::read_to_string(p)
                        .ok()
                        .and_then(|t| serde_json::from_str::<Json>(&t).ok())
                        .is_some_and(|j| j["kind"] == "run")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The log entry that committed `run_id`, if any.
pub fn manifest_of(state: &Path, run_id: &str) -> Option<Json> {
    manifests(state)
        .iter()
        .filter_map(|p| serde_json::from_str::<Json>(&fs::read_to_string(p).ok()?).ok())
        .find(|j| j["run_id"] == run_id)
}

/// Where one run's outputs and state live.
#[derive(Clone, Debug)]
pub struct Target {
    pub out: PathBuf,
    pub replay: PathBuf,
    pub dlq: PathBuf,
    pub gaps: PathBuf,
    pub state: PathBuf,
}

impl Target {
    pub fn under(out: &Path) -> Target {
        Target {
            out: out.to_path_buf(),
            replay: out.join("replay"),
            dlq: out.join("dlq"),
            gaps: out.join("gaps"),
            state: out.join("_state"),
        }
    }
}

fn json_int(v: &Json) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A report counter, or a readable failure.
fn counter(report: &Json, key: &str) -> Result<i64, String> {
    report
        .get(key)
        .and_then(json_int)
        .ok_or_else(|| format!("report: `{key}` missing or not an integer"))
}

/// One sink's entry under `outputs`, whether `outputs` is an object keyed by
/// sink or an array of entries naming their sink.
fn output_entry<'a>(report: &'a Json, sink: &str) -> Option<&'a Json> {
    match report.get("outputs")? {
        Json::Object(m) => m.get(sink),
        Json::Array(a) => a.iter().find(|e| {
            e.as_object()
                .is_some_and(|o| o.values().any(|v| v.as_str() == Some(sink)))
        }),
        _ => None,
    }
}

/// Compare the JSON report with the expectation.
fn diff_report(
    report: &Json,
    exp: &Expected,
    run_id: &str,
    dry_run: bool,
    parquet_files: usize,
) -> Vec<String> {
    let mut errs = Vec::new();
    let mut eq = |key: &str, want: i64| match counter(report, key) {
        Ok(got) if got == want => {}
        Ok(got) => errs.push(format!("report: {key} = {got}, expected {want}")),
        Err(e) => errs.push(e),
    };
    eq("rows", exp.rows as i64);
    eq("events", exp.events as i64);
    eq("resolved", exp.resolved as i64);
    eq("replayed", exp.replay.len() as i64);
    eq("dead_lettered", exp.dlq.len() as i64);
    eq("skipped_dead_lettered", exp.skipped.len() as i64);
    eq("gaps", exp.gaps.len() as i64);
    eq("missing_events", exp.missing_events());
    eq("conflicts", exp.conflicts as i64);
    if report.get("run_id").and_then(Json::as_str) != Some(run_id) {
        errs.push(format!(
            "report: run_id {:?}, expected {run_id}",
            report.get("run_id")
        ));
    }
    if report.get("dry_run").and_then(Json::as_bool) != Some(dry_run) {
        errs.push(format!(
            "report: dry_run {:?}, expected {dry_run}",
            report.get("dry_run")
        ));
    }
    if report.get("already_committed").and_then(Json::as_bool) != Some(false) {
        errs.push(format!(
            "report: already_committed {:?}, expected false",
            report.get("already_committed")
        ));
    }
    match report
        .get("dead_lettered_by_reason")
        .and_then(Json::as_object)
    {
        Some(m) => {
            let want = exp.by_reason();
            for reason in [
                "missing_event_id",
                "invalid_attempts",
                "sequence_conflict",
                "permanent_error",
                "max_attempts_exceeded",
            ] {
                let got = m.get(reason).and_then(json_int).unwrap_or(0);
                let w = want.get(reason).copied().unwrap_or(0) as i64;
                if got != w {
                    errs.push(format!(
                        "report: dead_lettered_by_reason.{reason} = {got}, expected {w}"
                    ));
                }
            }
            for k in m.keys() {
                if ![
                    "missing_event_id",
                    "invalid_attempts",
                    "sequence_conflict",
                    "permanent_error",
                    "max_attempts_exceeded",
                ]
                .contains(&k.as_str())
                {
                    errs.push(format!(
                        "report: unknown reason {k} in dead_lettered_by_reason"
                    ));
                }
            }
        }
        None => errs.push("report: dead_lettered_by_reason missing or not an object".into()),
    }
    // the balance
    if let (Ok(e), Ok(r), Ok(p), Ok(d), Ok(s)) = (
        counter(report, "events"),
        counter(report, "resolved"),
        counter(report, "replayed"),
        counter(report, "dead_lettered"),
        counter(report, "skipped_dead_lettered"),
    ) && e != r + p + d + s
    {
        errs.push(format!(
            "report does not balance: events {e} != {r} + {p} + {d} + {s}"
        ));
    }
    match (
        counter(report, "files_scanned"),
        counter(report, "files_pruned"),
    ) {
        (Ok(scanned), Ok(pruned)) => {
            if scanned < 0 || pruned < 0 || (scanned + pruned) as usize > parquet_files {
                errs.push(format!(
                    "report: files_scanned {scanned} + files_pruned {pruned} > {parquet_files} files"
                ));
            }
            if exp.rows > 0 && scanned < 1 {
                errs.push("report: rows were read but files_scanned < 1".into());
            }
        }
        (a, b) => errs.extend(a.err().into_iter().chain(b.err())),
    }
    match counter(report, "bytes_scanned") {
        Ok(b) if exp.rows > 0 && b <= 0 => {
            errs.push("report: rows were read but bytes_scanned <= 0".into())
        }
        Ok(_) => {}
        Err(e) => errs.push(e),
    }
    if let Err(e) = counter(report, "elapsed_ms") {
        errs.push(e);
    }
    errs
}

/// Compare the report's `outputs` entry of one sink with what is on disk.
fn diff_output_entry(report: &Json, sink: &str, rows: usize, files: &[PathBuf]) -> Vec<String> {
    let Some(entry) = output_entry(report, sink) else {
        return vec![format!("report: outputs has no entry for {sink}")];
    };
    let mut errs = Vec::new();
    match entry.get("rows").and_then(json_int) {
        Some(n) if n == rows as i64 => {}
        other => errs.push(format!(
            "report: outputs.{sink}.rows = {other:?}, expected {rows}"
        )),
    }
    if entry.get("target").is_none() {
        errs.push(format!("report: outputs.{sink} has no target"));
    }
    let names: Option<Vec<String>> = entry.as_object().and_then(|o| {
        o.values().find_map(|v| {
            let a = v.as_array()?;
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
        })
    });
    match names {
        None if files.is_empty() => {}
        None => errs.push(format!("report: outputs.{sink} lists no object names")),
        Some(names) => {
            let listed: BTreeSet<String> = names
                .iter()
                .map(|n| n.rsplit('/').next().unwrap_or(n).to_string())
                .collect();
            let on_disk: BTreeSet<String> = files
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
                .collect();
            if listed != on_disk {
                errs.push(format!(
                    "report: outputs.{sink} names {names:?}, on disk {on_disk:?}"
                ));
            }
        }
    }
    errs
}

fn count_parquet(dir: &Path) -> usize {
    snapshot(dir)
        .keys()
        .filter(|p| {
            p.extension().is_some_and(|x| x == "parquet")
                && p.strip_prefix(dir).unwrap().components().all(|c| {
                    let s = c.as_os_str().to_string_lossy();
                    !s.starts_with('_') && !s.starts_with('.')
                })
        })
        .count()
}

/// A job run that the test checks against the reference model.
pub struct Job<'a> {
    pub source_dir: &'a Path,
    pub source: &'a Source,
    pub target: Target,
    pub cfg: Config,
    /// Flags beyond `--source`, `--out`, `--run-id` and `--report`.
    pub flags: Vec<String>,
}

impl<'a> Job<'a> {
    /// A job over `source` (read from `source_dir`) writing below `out`,
    /// with the default configuration and no extra flags.
    pub fn under(source_dir: &'a Path, source: &'a Source, out: &Path) -> Job<'a> {
        Job {
            source_dir,
            source,
            target: Target::under(out),
            cfg: Config::default(),
            flags: vec![],
        }
    }

    /// The same job with `cfg` and the `flags` that ask the binary for it.
    pub fn with(self, cfg: Config, flags: Vec<String>) -> Job<'a> {
        Job { cfg, flags, ..self }
    }

    /// The same job with a `--from`/`--to` window.
    pub fn window(mut self, from: &str, to: &str) -> Job<'a> {
        self.cfg.from = Some(ns(from));
        self.cfg.to = Some(ns(to));
        self.flags.extend(strings(&["--from", from, "--to", to]));
        self
    }

    /// The same job with `--no-gaps --no-conflicts`.
    pub fn without_gaps_and_conflicts(mut self) -> Job<'a> {
        self.cfg.gaps = false;
        self.cfg.conflicts = false;
        self.flags.extend(strings(&["--no-gaps", "--no-conflicts"]));
        self
    }
}

impl Job<'_> {
    /// Run with `run_id`, expect `code`, compare everything with the
    /// reference, and record the run in `ledger`.
    #[track_caller]
    pub fn run(&self, run_id: &str, ledger: &mut Ledger, code: i32) -> (Run, Expected) {
        let exp = decide(self.source, &self.cfg, ledger);
        let report_path = self
            .target
            .out
            .with_file_name(format!("report-{run_id}.json"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--source".into(),
            self.source_dir.display().to_string(),
            "--out".into(),
            self.target.out.display().to_string(),
            "--run-id".into(),
            run_id.into(),
            "--report".into(),
            report_path.display().to_string(),
        ];
        args.extend(self.flags.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = backfill(&args);
        run.expect_code(code);
        let errs = self.check(&run, &exp, run_id, &report_path);
        assert!(
            errs.is_empty(),
            "run {run_id} differs from the reference:\n  {}\n{}",
            errs.join("\n  "),
            run.describe()
        );
        ledger.commit(&exp);
        (run, exp)
    }

    fn check(&self, run: &Run, exp: &Expected, run_id: &str, report_path: &Path) -> Vec<String> {
        let t = &self.target;
        let replay = read_output(&t.replay, run_id);
        let dlq = read_output(&t.dlq, run_id);
        let gaps = read_output(&t.gaps, run_id);
        let mut errs = Vec::new();
        errs.extend(diff_events(
            "replay",
            &replay,
            &exp.replay,
            self.source,
            &self.cfg,
            run_id,
        ));
        errs.extend(diff_events(
            "dlq",
            &dlq,
            &exp.dlq,
            self.source,
            &self.cfg,
            run_id,
        ));
        errs.extend(diff_gaps(&gaps, &exp.gaps, run_id));
        // one detected_at per run, across sinks
        let detected: BTreeSet<String> = replay
            .rows
            .iter()
            .chain(&dlq.rows)
            .chain(&gaps.rows)
            .map(|r| format!("{:?}", r.get("backfill_detected_at")))
            .collect();
        if detected.len() > 1 {
            errs.push(format!(
                "backfill_detected_at differs across sinks: {detected:?}"
            ));
        }
        // the commit
        match manifest_of(&t.state, run_id) {
            Some(m) => {
                // A committed run's folder holds exactly the files its entry lists.
                for (kind, sink) in [("replay", &t.replay), ("dlq", &t.dlq), ("gaps", &t.gaps)] {
                    let listed: BTreeSet<PathBuf> = m["publish"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["kind"] == kind)
                        .flat_map(|p| p["files"].as_array().cloned().unwrap_or_default())
                        .map(|f| sink.join(f["published"].as_str().unwrap_or("?")))
                        .collect();
                    let present: BTreeSet<PathBuf> =
                        snapshot(&sink.join(format!("run_id={run_id}")))
                            .into_keys()
                            .collect();
                    if listed != present {
                        errs.push(format!(
                            "{kind}: committed files {listed:?} != files present {present:?}"
                        ));
                    }
                }
            }
            None => errs.push(format!("no log entry commits {run_id}")),
        }
        if !exp.replay.is_empty() || !exp.dlq.is_empty() {
            let ledgers: Vec<PathBuf> = snapshot(&t.state.join("runs").join(run_id))
                .into_keys()
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with("ledger-") && n.ends_with(".parquet")
                })
                .collect();
            if ledgers.is_empty() {
                errs.push(format!(
                    "no ledger-*.parquet under {}/runs/{run_id}",
                    t.state.display()
                ));
            }
        }
        for sink in [&t.replay, &t.dlq, &t.gaps] {
            let leftovers: Vec<PathBuf> = snapshot(&sink.join("_staging")).into_keys().collect();
            if !leftovers.is_empty() {
                errs.push(format!("temporary files left behind: {leftovers:?}"));
            }
        }
        if !run.stdout.contains(run_id) {
            errs.push(format!(
                "the summary on stdout does not name the run {run_id}"
            ));
        }
        // the report
        match fs::read_to_string(report_path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Json>(&s).map_err(|e| e.to_string()))
        {
            Ok(report) => {
                errs.extend(diff_report(
                    &report,
                    exp,
                    run_id,
                    false,
                    count_parquet(self.source_dir),
                ));
                errs.extend(diff_output_entry(
                    &report,
                    "replay",
                    replay.rows.len(),
                    &replay.files,
                ));
                errs.extend(diff_output_entry(
                    &report,
                    "dlq",
                    dlq.rows.len(),
                    &dlq.files,
                ));
                // with --no-gaps there may be no gaps sink at all
                if self.cfg.gaps
                    || output_entry(&report, "gaps").is_some()
                    || !gaps.files.is_empty()
                {
                    errs.extend(diff_output_entry(
                        &report,
                        "gaps",
                        gaps.rows.len(),
                        &gaps.files,
                    ));
                }
            }
            Err(e) => errs.push(format!("report {}: {e}", report_path.display())),
        }
        errs
    }
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------------ the tricky archive

const FROM: &str = "2024-01-01T00:00:00Z";
const TO: &str = "2024-01-03T00:00:00Z";

/// Every tricky case, spread over files with different schemas.
pub(crate) fn tricky_archive() -> Archive {
    let mut a = Archive::new();
    let failed = Some("failed");
    let done = Some("processed");
    // A: the default layout (µs, UTC), small row groups
    a.file(
        "dt=2024-01-01/part-a.parquet",
        &Layout::default().row_group_size(4),
        &[
            Row::new("e01", "k1", 1, "2024-01-01T01:00:00Z", done),
            Row::new("e02", "k1", 2, "2024-01-01T02:00:00Z", failed)
                .attempts(0)
                .error("timeout"),
            Row::new("e03", "k1", 3, "2024-01-01T03:00:00Z", failed)
                .attempts(1)
                .error("timeout"),
            // ties on attempts: the later row wins, not the later-but-fewer one
            Row::new("e04", "k1", 5, "2024-01-01T04:00:00Z", failed)
                .attempts(1)
                .error("first")
                .payload("p-first"),
            Row::new("e04", "k1", 5, "2024-01-01T04:30:00Z", failed)
                .attempts(1)
                .error("second")
                .payload("p-second"),
            Row::new("e04", "k1", 5, "2024-01-01T05:00:00Z", failed)
                .attempts(0)
                .error("zero")
                .payload("p-zero"),
            // NULL status, NULL attempts
            Row::new("e05", "k1", 6, "2024-01-01T06:00:00Z", None),
            // exact duplicates from at-least-once archiving
            Row::new("e06", "k1", 10, "2024-01-01T07:00:00Z", failed)
                .attempts(0)
                .error("timeout"),
            Row::new("e06", "k1", 10, "2024-01-01T07:00:00Z", failed)
                .attempts(0)
                .error("timeout"),
            Row::new("e07", "k2", 1, "2024-01-01T01:00:00Z", failed)
                .attempts(3)
                .error("timeout"),
            Row::new("e09", "k2", 3, "2024-01-01T03:00:00Z", failed)
                .attempts(0)
                .error("fatal: bad payload"),
            Row::new("e10", "k2", 4, "2024-01-01T04:00:00Z", done),
            Row::new("e18", "k2", 6, "2024-01-01T06:00:00Z", failed)
                .attempts(4)
                .error("timeout"),
            Row::new("e19", "k2", 6, "2024-01-01T06:30:00Z", None),
            // exactly at --from: inside
            Row::new("e12", "k3", 1, FROM, failed),
        ],
    );
    // B: reordered, no attempts/error/region, Int32 seq, naive ms timestamps
    a.file(
        "dt=2024-01-01/part-b.parquet",
        &Layout::default()
            .with_columns(&[
                Col::Payload,
                Col::Status,
                Col::EventTime,
                Col::Seq,
                Col::Key,
                Col::EventId,
            ])
            .seq_int32()
            .time(TimeUnit::Millisecond, None),
        &[
            Row::new("e02", "k1", 2, "2024-01-01T02:10:00Z", failed),
            Row::new("e05b", "k1", 9, "2024-01-01T09:00:00Z", None),
            Row::new("e20", "k4", 1, "2024-01-01T10:00:00Z", done),
            Row::new("e21", "k4", 2, "2024-01-01T11:00:00Z", failed),
            Row::new("e22", "k4", 4, "2024-01-01T12:00:00Z", failed),
        ],
    );
    // C: ns UTC, Int32 attempts, an extra Int32 passthrough column
    a.file(
        "dt=2024-01-02/part-c.parquet",
        &Layout::default()
            .with(Col::Shard)
            .attempts_int32()
            .time(TimeUnit::Nanosecond, Some("UTC")),
        &[
            Row::new("e02", "k1", 2, "2024-01-02T02:20:00Z", done).attempts(2),
            Row::new("e03", "k1", 3, "2024-01-02T03:05:00Z", failed)
                .attempts(2)
                .error("timeout again")
                .payload("p-e03-final"),
            Row::new("e08", "k2", 2, "2024-01-02T01:00:00Z", failed)
                .attempts(7)
                .error("fatal: schema mismatch"),
            Row::new("e11", "k2", 4, "2024-01-02T02:30:00Z", failed)
                .attempts(0)
                .error("fatal: x"),
            Row::new("e15", "k3", 3, "2024-01-02T10:00:00Z", failed)
                .attempts(1)
                .error("timeout"),
            Row::new("e16", "k3", 5, "2024-01-02T11:00:00Z", failed),
            // one instant before --to: inside
            Row::new("e23", "k3", 6, "2024-01-02T23:59:59.999Z", failed),
        ],
    );
    // D: a valid Parquet file with no rows
    a.rows("dt=2024-01-02/empty.parquet", &[]);
    // E: before the window
    a.rows(
        "dt=2023-12-31/old.parquet",
        &[
            Row::new("e14", "k3", 0, "2023-12-31T23:59:59Z", failed),
            Row::new("e17", "k3", 5, "2023-12-31T12:00:00Z", failed),
        ],
    );
    // F: at and after --to
    a.rows(
        "dt=2024-01-03/late.parquet",
        &[
            Row::new("e13", "k3", 2, TO, failed),
            Row::new("e15", "k3", 3, "2024-01-03T01:00:00Z", done),
        ],
    );
    a
}

fn tricky_config() -> Config {
    Config {
        from: Some(ns(FROM)),
        to: Some(ns(TO)),
        permanent: strings(&["^fatal:", "never-matches-[0-9]+"]),
        ..Config::default()
    }
}

pub(crate) fn tricky_flags() -> Vec<String> {
    strings(&[
        "--from",
        FROM,
        "--to",
        TO,
        "--permanent-error",
        "^fatal:",
        "--permanent-error",
        "never-matches-[0-9]+",
    ])
}

#[test]
fn tricky_archive_matches_reference() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out"))
        .with(tricky_config(), tricky_flags());
    let mut ledger = Ledger::default();
    let (run, exp) = job.run("tricky-1", &mut ledger, 0);

    // The reference itself, spelled out, so that a wrong model cannot pass
    // silently.
    let reason = |id: &str| exp.dlq.get(id).map(|o| (o.reason.as_str(), o.attempt));
    let replay = |id: &str| exp.replay.get(id).map(|o| o.attempt);
    assert_eq!(replay("e03"), Some(3));
    assert_eq!(replay("e04"), Some(2));
    assert_eq!(replay("e05"), Some(1));
    assert_eq!(replay("e05b"), Some(1));
    assert_eq!(replay("e06"), Some(1));
    assert_eq!(replay("e12"), Some(1));
    assert_eq!(replay("e15"), Some(2));
    assert_eq!(replay("e16"), Some(1));
    assert_eq!(replay("e21"), Some(1));
    assert_eq!(replay("e22"), Some(1));
    assert_eq!(replay("e23"), Some(1));
    assert_eq!(reason("e07"), Some(("max_attempts_exceeded", 3)));
    assert_eq!(reason("e08"), Some(("permanent_error", 7)));
    assert_eq!(reason("e09"), Some(("permanent_error", 0)));
    assert_eq!(reason("e11"), Some(("sequence_conflict", 0)));
    assert_eq!(reason("e18"), Some(("sequence_conflict", 4)));
    assert_eq!(reason("e19"), Some(("sequence_conflict", 0)));
    assert_eq!(exp.resolved, 4, "e01 e02 e10 e20");
    assert_eq!(exp.events, 4 + 11 + 6);
    assert_eq!(exp.conflicts, 2, "(k2,4) and (k2,6)");
    let gaps: Vec<(&str, i64, i64)> = exp
        .gaps
        .iter()
        .map(|g| (g.key.as_str().unwrap(), g.first, g.last))
        .collect();
    assert_eq!(
        gaps,
        vec![
            ("k1", 4, 4),
            ("k1", 7, 8),
            ("k2", 5, 5),
            ("k3", 2, 2),
            ("k3", 4, 4),
            ("k4", 3, 3)
        ]
    );
    let chosen = &exp.replay["e04"].candidates[0];
    assert_eq!(
        chosen.get("payload").and_then(|v| v.as_str()),
        Some("p-second")
    );
    assert!(!run.stderr.contains("panicked"), "stderr: {}", run.stderr);
}

#[test]
fn tricky_archive_without_permanent_errors() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out")).window(FROM, TO);
    let (_, exp) = job.run("tricky-2", &mut Ledger::default(), 0);
    assert_eq!(
        exp.dlq.get("e08").map(|o| o.reason.as_str()),
        Some("max_attempts_exceeded")
    );
    assert_eq!(exp.replay.get("e09").map(|o| o.attempt), Some(1));
}

#[test]
fn ignored_and_zero_byte_files() {
    let mut archive = Archive::new();
    archive
        .rows(
            "dt=2024-01-01/part-0.parquet",
            &[
                Row::new("a", "k", 1, "2024-01-01T00:00:00Z", Some("failed")),
                Row::new("b", "k", 3, "2024-01-01T00:01:00Z", Some("processed")),
            ],
        )
        .raw("dt=2024-01-01/zero.parquet", b"")
        .raw("_SUCCESS", b"")
        .raw("dt=2024-01-01/_SUCCESS", b"")
        .raw("_tmp/junk.parquet", b"not parquet at all")
        .raw(".hidden/junk.parquet", b"not parquet at all")
        .raw("dt=2024-01-01/_partial.parquet", b"not parquet at all")
        .raw("dt=2024-01-01/.part-0.parquet.crc", b"crc")
        .raw("dt=2024-01-01/.inflight.parquet", b"not parquet at all");
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out"));
    let (run, exp) = job.run("ignored-1", &mut Ledger::default(), 0);
    assert_eq!(exp.rows, 2);
    assert!(
        run.stderr.contains("zero.parquet"),
        "a zero-byte file is skipped with a warning naming it\n{}",
        run.describe()
    );
}

#[test]
fn uniform_source_types_are_kept() {
    // One schema everywhere: the outputs carry exactly the source types.
    let layout = Layout::default()
        .with(Col::Shard)
        .seq_int32()
        .attempts_int32()
        .payload_binary()
        .time(TimeUnit::Millisecond, None);
    let mut archive = Archive::new();
    archive.file(
        "part-0.parquet",
        &layout,
        &[
            Row::new("a", "k", 1, "2024-05-01T00:00:00Z", Some("failed")).attempts(1),
            Row::new("b", "k", 2, "2024-05-01T00:00:01Z", Some("failed"))
                .attempts(9)
                .error("boom"),
            Row::new("c", "k", 5, "2024-05-01T00:00:02Z", Some("processed")),
        ],
    );
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out"));
    let target = job.target.clone();
    job.run("types-1", &mut Ledger::default(), 0);
    let src_schema = source.files[0].schema.clone();
    let mut errs = Vec::new();
    for sink in [&target.replay, &target.dlq] {
        let out = read_output(sink, "types-1");
        if out.schemas.is_empty() {
            errs.push(format!("no output in {}", sink.display()));
        }
        for schema in &out.schemas {
            for field in src_schema.fields() {
                let got = schema
                    .field_with_name(field.name())
                    .map(|f| f.data_type().clone());
                if got.as_ref().ok() != Some(field.data_type()) {
                    errs.push(format!(
                        "{}: column {} is {got:?}, the source type is {}",
                        sink.display(),
                        field.name(),
                        field.data_type()
                    ));
                }
            }
        }
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

#[test]
fn passthrough_columns_keep_source_names_and_types_across_mixed_files() {
    // Two files that differ in contract-column types; the passthrough
    // columns (Utf8 `region`, Int32 `shard`, Binary payload) keep theirs.
    let mut archive = Archive::new();
    archive
        .file(
            "a.parquet",
            &Layout::default().with(Col::Shard).payload_binary(),
            &[Row::new(
                "a",
                "k",
                1,
                "2024-05-01T00:00:00Z",
                Some("failed"),
            )],
        )
        .file(
            "b.parquet",
            &Layout::default()
                .with(Col::Shard)
                .payload_binary()
                .seq_int32()
                .time(TimeUnit::Nanosecond, None),
            &[Row::new("b", "k", 2, "2024-05-01T00:00:01Z", None).attempts(5)],
        );
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out"));
    let target = job.target.clone();
    job.run("pass-1", &mut Ledger::default(), 0);
    for sink in [&target.replay, &target.dlq] {
        let out = read_output(sink, "pass-1");
        assert!(!out.schemas.is_empty(), "no output in {}", sink.display());
        for schema in &out.schemas {
            for (name, ty) in [
                ("region", DataType::Utf8),
                ("shard", DataType::Int32),
                ("payload", DataType::Binary),
                ("event_id", DataType::Utf8),
                ("key", DataType::Utf8),
            ] {
                let got = schema.field_with_name(name).map(|f| f.data_type().clone());
                assert_eq!(
                    got.ok(),
                    Some(ty.clone()),
                    "column {name} in {}: {schema:?}",
                    sink.display()
                );
            }
            let seq = schema.field_with_name("seq").map(|f| f.data_type().clone());
            assert!(
                matches!(seq, Ok(DataType::Int64)),
                "Int32/Int64 seq unify to Int64: {schema:?}"
            );
            let t = schema
                .field_with_name("event_time")
                .map(|f| f.data_type().clone());
            assert!(
                matches!(t, Ok(DataType::Timestamp(_, _))),
                "event_time stays a timestamp: {schema:?}"
            );
        }
    }
}

// ----------------------------------------------------- column remapping

fn remapped_layout() -> Layout {
    Layout::default()
        .renamed(Col::EventId, "id")
        .renamed(Col::Key, "entity")
        .renamed(Col::Seq, "n")
        .renamed(Col::EventTime, "ts")
        .renamed(Col::Status, "state")
        .renamed(Col::Attempts, "tries")
        .renamed(Col::Error, "err")
        .renamed(Col::Payload, "body")
}

fn remapped_archive() -> Archive {
    let mut a = Archive::new();
    a.file(
        "dt=2024-02-01/part-0.parquet",
        &remapped_layout(),
        &[
            Row::new("r1", "acct-1", 1, "2024-02-01T00:00:00Z", Some("ok")),
            Row::new("r2", "acct-1", 2, "2024-02-01T00:01:00Z", Some("failed"))
                .attempts(1)
                .error("timeout"),
            Row::new("r2", "acct-1", 2, "2024-02-01T00:02:00Z", Some("failed"))
                .attempts(2)
                .error("timeout"),
            Row::new("r3", "acct-1", 5, "2024-02-01T00:03:00Z", Some("skipped")),
            Row::new("r4", "acct-2", 1, "2024-02-01T00:04:00Z", Some("failed"))
                .error("fatal: nope"),
            Row::new("r5", "acct-2", 1, "2024-02-01T00:05:00Z", Some("processed")),
            Row::new("r6", "acct-2", 4, "2024-02-01T00:06:00Z", Some("failed")).attempts(2),
            Row::new("r8", "acct-4", 1, "2024-02-01T00:06:30Z", Some("failed"))
                .error("fatal: gone"),
            Row::new("r7", "acct-3", 1, "2024-02-01T00:07:00Z", None),
        ],
    );
    a
}

fn remapped_columns() -> Columns {
    Columns {
        event_id: "id".into(),
        key: "entity".into(),
        seq: "n".into(),
        event_time: "ts".into(),
        status: "state".into(),
        attempts: "tries".into(),
        error: "err".into(),
    }
}

#[test]
fn column_remapping_via_flags() {
    let archive = remapped_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out")).with(
        Config {
            columns: remapped_columns(),
            done: strings(&["ok", "skipped"]),
            ..Config::default()
        },
        strings(&[
            "--column",
            "event_id=id",
            "--column",
            "key=entity",
            "--column",
            "seq=n",
            "--column",
            "event_time=ts",
            "--column",
            "status=state",
            "--column",
            "attempts=tries",
            "--column",
            "error=err",
            "--column",
            "payload=body",
            "--done-status",
            "ok",
            "--done-status",
            "skipped",
        ]),
    );
    let (_, exp) = job.run("remap-1", &mut Ledger::default(), 0);
    // r5 (processed) is not done under the custom statuses; it conflicts with r4
    assert_eq!(exp.resolved, 2, "r1 r3");
    assert_eq!(exp.dlq.len(), 2, "r4 r5 conflict on (acct-2, 1)");
    assert_eq!(exp.gaps.len(), 2, "acct-1 3..4, acct-2 2..3");
}

#[test]
fn column_remapping_and_settings_via_job_file() {
    let archive = remapped_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let report = work.path().join("report-job-1.json");
    let job_file = work.path().join("job.toml");
    fs::write(
        &job_file,
        format!(
            r#"# a job file as an Airflow task would hold it
source = "${{BACKFILL_IT_SOURCE}}"
out = "{out}"
run_id = "job-1"
report = "{report}"
from = "2024-02-01T00:01:00Z"
to = "2024-02-01T00:07:00Z"
max_attempts = 2
permanent_errors = ["^fatal:"]
done_statuses = ["ok", "skipped"]

[columns]
event_id = "id"
key = "entity"
seq = "n"
event_time = "ts"
status = "state"
attempts = "tries"
error = "err"
payload = "body"
"#,
            out = out.display(),
            report = report.display()
        ),
    )
    .unwrap();
    let cfg = Config {
        columns: remapped_columns(),
        from: Some(ns("2024-02-01T00:01:00Z")),
        to: Some(ns("2024-02-01T00:07:00Z")),
        done: strings(&["ok", "skipped"]),
        max_attempts: 2,
        permanent: strings(&["^fatal:"]),
        ..Config::default()
    };
    let exp = decide(&source, &cfg, &Ledger::default());
    let src = archive.source();
    let run = backfill_in(
        &["run", "--job", &job_file.display().to_string()],
        &[("BACKFILL_IT_SOURCE", &src)],
        None,
    );
    run.ok();
    let job = Job::under(archive.dir.path(), &source, &out).with(cfg, vec![]);
    let errs = job.check(&run, &exp, "job-1", &report);
    assert!(
        errs.is_empty(),
        "job-file run differs from the reference:\n  {}\n{}",
        errs.join("\n  "),
        run.describe()
    );
    assert!(
        exp.dlq
            .values()
            .any(|o| o.reason == "max_attempts_exceeded")
    );
    assert!(exp.dlq.values().any(|o| o.reason == "permanent_error"));
}

#[test]
fn flags_override_the_job_file() {
    let archive = remapped_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job_file = work.path().join("job.toml");
    fs::write(
        &job_file,
        format!(
            r#"source = "{src}"
out = "/nonexistent/should/be/overridden"
run_id = "from-job"
max_attempts = 1
done_statuses = ["ok", "skipped"]
[columns]
event_id = "id"
key = "entity"
seq = "n"
event_time = "ts"
status = "state"
attempts = "tries"
error = "err"
payload = "body"
"#,
            src = archive.source()
        ),
    )
    .unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out")).with(
        Config {
            columns: remapped_columns(),
            done: strings(&["ok", "skipped"]),
            max_attempts: 3,
            ..Config::default()
        },
        strings(&[
            "--job",
            &job_file.display().to_string(),
            "--max-attempts",
            "3",
        ]),
    );
    // `--run-id from-flag` and `--out` are passed by Job::run
    let (_, exp) = job.run("from-flag", &mut Ledger::default(), 0);
    assert!(
        exp.replay.contains_key("r6"),
        "r6 (attempts 2) is replayed under --max-attempts 3"
    );
    assert!(!work.path().join("out/replay/run_id=from-job").exists());
}

// ------------------------------------------------------------ multi-run

fn retry_archive() -> Archive {
    let mut a = Archive::new();
    let failed = Some("failed");
    a.rows(
        "part-0.parquet",
        &[
            Row::new("m-null", "k", 1, "2024-03-01T00:00:00Z", failed),
            Row::new("m0", "k", 2, "2024-03-01T00:00:01Z", failed).attempts(0),
            Row::new("m1", "k", 3, "2024-03-01T00:00:02Z", failed).attempts(1),
            Row::new("m2", "k", 4, "2024-03-01T00:00:03Z", failed).attempts(2),
            Row::new("m3", "k", 5, "2024-03-01T00:00:04Z", failed).attempts(3),
            Row::new("perm", "k", 6, "2024-03-01T00:00:05Z", failed).error("fatal: no"),
            Row::new("done", "k", 7, "2024-03-01T00:00:06Z", Some("processed")),
        ],
    );
    a
}

#[test]
fn multi_run_attempts_grow_then_dlq_then_skipped() {
    let archive = retry_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out")).with(
        Config {
            permanent: strings(&["^fatal:"]),
            ..Config::default()
        },
        strings(&["--permanent-error", "^fatal:"]),
    );
    let mut ledger = Ledger::default();
    // (event, per run: Some(replay attempt) | dlq reason | skipped)
    #[derive(Debug, PartialEq)]
    enum O {
        Replay(i64),
        Dlq(&'static str, i64),
        Skipped,
    }
    use O::*;
    let want: Vec<(&str, [O; 5])> = vec![
        (
            "m-null",
            [
                Replay(1),
                Replay(2),
                Replay(3),
                Dlq("max_attempts_exceeded", 3),
                Skipped,
            ],
        ),
        (
            "m0",
            [
                Replay(1),
                Replay(2),
                Replay(3),
                Dlq("max_attempts_exceeded", 3),
                Skipped,
            ],
        ),
        (
            "m1",
            [
                Replay(2),
                Replay(3),
                Dlq("max_attempts_exceeded", 3),
                Skipped,
                Skipped,
            ],
        ),
        (
            "m2",
            [
                Replay(3),
                Dlq("max_attempts_exceeded", 3),
                Skipped,
                Skipped,
                Skipped,
            ],
        ),
        (
            "m3",
            [
                Dlq("max_attempts_exceeded", 3),
                Skipped,
                Skipped,
                Skipped,
                Skipped,
            ],
        ),
        (
            "perm",
            [
                Dlq("permanent_error", 0),
                Skipped,
                Skipped,
                Skipped,
                Skipped,
            ],
        ),
    ];
    for i in 0..5 {
        let run_id = format!("r{}", i + 1);
        let (_, exp) = job.run(&run_id, &mut ledger, 0);
        for (id, outcomes) in &want {
            let got = if let Some(o) = exp.replay.get(*id) {
                Replay(o.attempt)
            } else if let Some(o) = exp.dlq.get(*id) {
                Dlq(
                    match o.reason.as_str() {
                        "max_attempts_exceeded" => "max_attempts_exceeded",
                        "permanent_error" => "permanent_error",
                        other => panic!("unexpected reason {other}"),
                    },
                    o.attempt,
                )
            } else {
                assert!(exp.skipped.contains(*id), "{id} in run {run_id}");
                Skipped
            };
            assert_eq!(got, outcomes[i], "reference model for {id} in run {run_id}");
        }
        assert_eq!(exp.resolved, 1);
    }
    assert_eq!(manifests(&work.path().join("out/_state")).len(), 5);
}

#[test]
fn same_run_id_twice_does_nothing_the_second_time() {
    let archive = retry_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let job = Job::under(archive.dir.path(), &source, &out);
    let mut ledger = Ledger::default();
    job.run("once", &mut ledger, 0);
    let before = snapshot(&out);
    let report = work.path().join("again.json");
    let run = backfill(&[
        "run",
        "--source",
        &archive.source(),
        "--out",
        &out.display().to_string(),
        "--run-id",
        "once",
        "--report",
        &report.display().to_string(),
    ]);
    run.ok();
    let said = format!("{}{}", run.stdout, run.stderr).to_lowercase();
    assert!(
        said.contains("already committed"),
        "the second run says the run id is already committed\n{}",
        run.describe()
    );
    assert_eq!(
        before,
        snapshot(&out),
        "the second run wrote or changed files"
    );
    let json: Json = serde_json::from_str(&fs::read_to_string(&report).unwrap_or_default())
        .unwrap_or_else(|e| panic!("report of the no-op run: {e}\n{}", run.describe()));
    assert_eq!(
        json.get("already_committed"),
        Some(&Json::Bool(true)),
        "{json}"
    );
    assert_eq!(
        json.get("run_id").and_then(Json::as_str),
        Some("once"),
        "{json}"
    );
    // the ledger counted run `once` exactly one time
    job.run("twice", &mut ledger, 0);
}

#[test]
fn dry_run_writes_and_commits_nothing() {
    let archive = retry_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let cfg = Config::default();
    let dry = |run_id: &str, ledger: &Ledger| {
        let exp = decide(&source, &cfg, ledger);
        let report = work.path().join(format!("dry-{run_id}.json"));
        let before = snapshot(&out);
        let run = backfill(&[
            "run",
            "--source",
            &archive.source(),
            "--out",
            &out.display().to_string(),
            "--run-id",
            run_id,
            "--report",
            &report.display().to_string(),
            "--dry-run",
        ]);
        run.ok();
        assert_eq!(
            before,
            snapshot(&out),
            "--dry-run wrote\n{}",
            run.describe()
        );
        let json: Json = serde_json::from_str(&fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or_else(|e| panic!("dry-run report: {e}\n{}", run.describe()));
        let mut errs = diff_report(&json, &exp, run_id, true, 1);
        // The plan: every sink with what it would receive, nothing named.
        errs.extend(diff_output_entry(&json, "replay", exp.replay.len(), &[]));
        errs.extend(diff_output_entry(&json, "dlq", exp.dlq.len(), &[]));
        errs.extend(diff_output_entry(&json, "gaps", exp.gaps.len(), &[]));
        assert!(
            errs.is_empty(),
            "dry-run report differs:\n  {}\n{}",
            errs.join("\n  "),
            run.describe()
        );
    };
    let mut ledger = Ledger::default();
    dry("dry-1", &ledger);
    assert!(snapshot(&out).is_empty(), "--dry-run left files in OUT");
    let job = Job::under(archive.dir.path(), &source, &out).with(cfg.clone(), vec![]);
    // the dry run counted for nothing, and its id is still free
    job.run("dry-1", &mut ledger, 0);
    dry("dry-2", &ledger);
    job.run("real-2", &mut ledger, 0);
}

#[test]
fn fail_on_dlq_exit_codes() {
    let archive = retry_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out"))
        .with(Config::default(), strings(&["--fail-on-dlq"]));
    // m3 is dead-lettered: exit 3, and the run is committed
    let mut ledger = Ledger::default();
    job.run("dlq-1", &mut ledger, 3);

    let mut clean = Archive::new();
    clean.rows(
        "part-0.parquet",
        &[
            Row::new("x", "k", 1, "2024-03-01T00:00:00Z", Some("failed")),
            Row::new("y", "k", 2, "2024-03-01T00:00:01Z", Some("processed")),
        ],
    );
    let clean_source = read_source(&clean.path());
    let job = Job::under(
        clean.dir.path(),
        &clean_source,
        &work.path().join("out-clean"),
    )
    .with(Config::default(), strings(&["--fail-on-dlq"]));
    let (_, exp) = job.run("clean-1", &mut Ledger::default(), 0);
    assert!(exp.dlq.is_empty());
}

#[test]
fn state_is_shared_through_the_state_flag() {
    let archive = retry_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let state_flag = strings(&["--state", &state.display().to_string()]);
    let mut ledger = Ledger::default();
    for (i, out) in ["out-a", "out-b"].iter().enumerate() {
        let mut target = Target::under(&work.path().join(out));
        target.state = state.clone();
        let job = Job {
            source_dir: &archive.path(),
            source: &source,
            target,
            cfg: Config::default(),
            flags: state_flag.clone(),
        };
        job.run(&format!("s{i}"), &mut ledger, 0);
    }
    assert!(!work.path().join("out-a/_state").exists());
    assert_eq!(manifests(&state).len(), 2);
}

#[test]
fn sink_flags_move_outputs() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let target = Target {
        out: out.clone(),
        replay: work.path().join("elsewhere/replay"),
        dlq: work.path().join("elsewhere/dead"),
        gaps: work.path().join("elsewhere/holes"),
        state: out.join("_state"),
    };
    let mut flags = tricky_flags();
    flags.extend(strings(&[
        "--replay-sink",
        &target.replay.display().to_string(),
        "--dlq-sink",
        &target.dlq.display().to_string(),
        "--gaps-sink",
        &target.gaps.display().to_string(),
    ]));
    let job = Job {
        source_dir: &archive.path(),
        source: &source,
        target,
        cfg: tricky_config(),
        flags,
    };
    job.run("sinks-1", &mut Ledger::default(), 0);
    for sink in ["replay", "dlq", "gaps"] {
        assert!(
            !out.join(sink).exists(),
            "OUT/{sink} written despite --{sink}-sink"
        );
    }
}

#[test]
fn default_run_id_is_timestamped() {
    let archive = retry_archive();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = backfill(&[
        "run",
        "--source",
        &archive.source(),
        "--out",
        &out.display().to_string(),
    ]);
    run.ok();
    let found = manifests(&out.join("_state"));
    assert_eq!(found.len(), 1, "{found:?}\n{}", run.describe());
    let entry: Json = serde_json::from_str(&fs::read_to_string(&found[0]).unwrap()).unwrap();
    let name = entry["run_id"].as_str().unwrap().to_string();
    let re = regex::Regex::new(r"^run-\d{8}T\d{6}Z$").unwrap();
    assert!(re.is_match(&name), "default run id {name}");
    assert!(
        out.join("replay").join(format!("run_id={name}")).is_dir(),
        "{}",
        run.describe()
    );
}

// ------------------------------------------------------ generated archives

/// Generate an archive with the binary; return it and its rows.
fn generated(seed: u64) -> (tempfile::TempDir, Source) {
    let dir = tempfile::tempdir().unwrap();
    let run = backfill(&[
        "generate",
        "--out",
        &dir.path().display().to_string(),
        "--events",
        "20000",
        "--keys",
        "50",
        "--seed",
        &seed.to_string(),
    ]);
    run.ok();
    let source = read_source(dir.path());
    assert!(
        !source.rows.is_empty(),
        "generate wrote {} rows\n{}",
        source.rows.len(),
        run.describe()
    );
    for col in [
        "event_id",
        "key",
        "seq",
        "event_time",
        "status",
        "attempts",
        "error",
        "payload",
    ] {
        assert!(
            source.columns.contains(col),
            "generated archive lacks {col}: {:?}",
            source.columns
        );
    }
    assert!(
        source.columns.iter().any(|c| c.starts_with("kafka_")),
        "generated archive has no kafka_* passthrough: {:?}",
        source.columns
    );
    (dir, source)
}

fn rfc3339(nanos: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Check that the generated archive really carries the defects it claims.
fn assert_defects(exp: &Expected) {
    assert!(exp.resolved > 0, "no resolved events");
    assert!(!exp.replay.is_empty(), "no replays");
    assert!(exp.conflicts > 0, "no conflicts injected");
    assert!(!exp.gaps.is_empty(), "no gaps injected");
    assert!(
        exp.replay.values().any(|o| o.attempt > 1),
        "no retried events"
    );
}

#[test]
fn generated_seed_7_matches_reference_over_three_runs() {
    let (dir, source) = generated(7);
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(dir.path(), &source, &work.path().join("out"));
    let mut ledger = Ledger::default();
    let (_, exp) = job.run("gen7-1", &mut ledger, 0);
    assert_defects(&exp);
    job.run("gen7-2", &mut ledger, 0);
    let (_, exp) = job.run("gen7-3", &mut ledger, 0);
    assert!(!exp.skipped.is_empty());
}

/// A memory limit and a spill dir change how the engine works, never what it
/// decides: the same outputs as the reference and the same report counts as
/// a run with the default limit; the spill dir is left as it was found.
#[test]
fn memory_limit_and_spill_dir_keep_the_counts() {
    let (dir, source) = generated(11);
    let work = tempfile::tempdir().unwrap();
    let spill = work.path().join("spill");
    fs::create_dir(&spill).unwrap();
    let default = Job::under(dir.path(), &source, &work.path().join("default"));
    default.run("mem-default", &mut Ledger::default(), 0);
    let limited = Job::under(dir.path(), &source, &work.path().join("limited")).with(
        Config::default(),
        strings(&[
            "--memory-limit",
            "1G",
            "--spill-dir",
            &spill.display().to_string(),
        ]),
    );
    let (_, exp) = limited.run("mem-limited", &mut Ledger::default(), 0);
    assert_defects(&exp);
    let report = |id: &str| -> Json {
        let p = work.path().join(format!("report-{id}.json"));
        serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
    };
    let (a, b) = (report("mem-default"), report("mem-limited"));
    for key in [
        "rows",
        "events",
        "resolved",
        "replayed",
        "dead_lettered",
        "gaps",
        "missing_events",
        "conflicts",
    ] {
        assert_eq!(counter(&a, key), counter(&b, key), "{key}: {a}\n{b}");
    }
    let left: Vec<_> = fs::read_dir(&spill).unwrap().collect();
    assert!(left.is_empty(), "the spill dir is not left empty: {left:?}");
}

#[test]
fn generated_seed_42_windowed_with_permanent_errors() {
    let (dir, source) = generated(42);
    let mut times: Vec<i64> = source
        .rows
        .iter()
        .filter_map(|r| r.get("event_time").and_then(|v| v.as_ts()))
        .collect();
    times.sort();
    // bounds on observed instants: tests inclusive `from`, exclusive `to`
    let from = times[times.len() / 4];
    let to = times[times.len() * 3 / 4];
    // the most common error becomes permanent
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in &source.rows {
        if let Some(e) = r.get("error").and_then(|v| v.as_str()) {
            *errors.entry(e.to_string()).or_default() += 1;
        }
    }
    let (common, _) = errors
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("the generator writes errors");
    let regex = format!("^{}$", regex::escape(common));
    let work = tempfile::tempdir().unwrap();
    let job = Job::under(dir.path(), &source, &work.path().join("out")).with(
        Config {
            from: Some(from),
            to: Some(to),
            permanent: vec![regex.clone()],
            max_attempts: 2,
            ..Config::default()
        },
        strings(&[
            "--from",
            &rfc3339(from),
            "--to",
            &rfc3339(to),
            "--permanent-error",
            &regex,
            "--max-attempts",
            "2",
        ]),
    );
    let mut ledger = Ledger::default();
    let (_, exp) = job.run("gen42-1", &mut ledger, 0);
    assert!(exp.rows < source.rows.len() && exp.rows > 0);
    assert!(
        exp.dlq.values().any(|o| o.reason == "permanent_error"),
        "regex {regex} matched nothing"
    );
    job.run("gen42-2", &mut ledger, 0);
}

#[test]
fn generated_seed_2024_without_gaps_and_conflicts() {
    let (dir, source) = generated(2024);
    let work = tempfile::tempdir().unwrap();
    let job =
        Job::under(dir.path(), &source, &work.path().join("out")).without_gaps_and_conflicts();
    let (_, exp) = job.run("gen2024-1", &mut Ledger::default(), 0);
    assert!(exp.gaps.is_empty() && exp.conflicts == 0);
    assert!(!exp.replay.is_empty());
}

// ------------------------------------------------- gaps, sql, explain

/// Parse CSV (RFC 4180 quoting) into header + rows.
fn parse_csv(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut records = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        match (quoted, ch) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records.retain(|r| !(r.len() == 1 && r[0].trim().is_empty()));
    let mut it = records.into_iter();
    let header = it.next().unwrap_or_default();
    (header, it.collect())
}

/// JSON output as a list of objects: an array, or JSON lines.
fn parse_json_rows(text: &str) -> Result<Vec<serde_json::Map<String, Json>>, String> {
    let objects = |v: Json| -> Result<Vec<serde_json::Map<String, Json>>, String> {
        match v {
            Json::Array(a) => a
                .into_iter()
                .map(|x| match x {
                    Json::Object(o) => Ok(o),
                    other => Err(format!("not an object: {other}")),
                })
                .collect(),
            Json::Object(o) => Ok(vec![o]),
            other => Err(format!("not rows: {other}")),
        }
    };
    if let Ok(v) = serde_json::from_str::<Json>(text) {
        return objects(v);
    }
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Json = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        out.extend(objects(v)?);
    }
    Ok(out)
}

type GapKey = (String, i64, i64, i64, String, String);

fn expected_gap_keys(exp: &Expected) -> BTreeSet<GapKey> {
    exp.gaps
        .iter()
        .map(|g| {
            (
                g.key.as_str().unwrap().to_string(),
                g.first,
                g.last,
                g.count,
                g.before_id.as_str().unwrap().to_string(),
                g.after_id.as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn gaps_command_csv_json_and_table() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let exp = decide(&source, &tricky_config(), &Ledger::default());
    let want = expected_gap_keys(&exp);
    let src = archive.source();
    let base = ["gaps", "--source", &src, "--from", FROM, "--to", TO];

    let run = backfill(&[&base[..], &["--format", "csv"]].concat());
    run.ok();
    let (header, rows) = parse_csv(&run.stdout);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("csv has no column {name}\n{}", run.describe()))
    };
    let idx = [
        col("key"),
        col("first_missing_seq"),
        col("last_missing_seq"),
        col("missing_count"),
        col("before_event_id"),
        col("after_event_id"),
    ];
    let int = |s: &str| s.trim().parse::<i64>().unwrap_or(i64::MIN);
    let got: BTreeSet<GapKey> = rows
        .iter()
        .map(|r| {
            (
                r[idx[0]].clone(),
                int(&r[idx[1]]),
                int(&r[idx[2]]),
                int(&r[idx[3]]),
                r[idx[4]].clone(),
                r[idx[5]].clone(),
            )
        })
        .collect();
    assert_eq!(got, want, "gaps --format csv\n{}", run.describe());
    assert_eq!(rows.len(), want.len(), "{}", run.describe());

    let run = backfill(&[&base[..], &["--format", "json"]].concat());
    run.ok();
    let rows = parse_json_rows(&run.stdout)
        .unwrap_or_else(|e| panic!("gaps --format json: {e}\n{}", run.describe()));
    let s = |o: &serde_json::Map<String, Json>, k: &str| {
        o.get(k)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let i = |o: &serde_json::Map<String, Json>, k: &str| {
        o.get(k).and_then(json_int).unwrap_or(i64::MIN)
    };
    let got: BTreeSet<GapKey> = rows
        .iter()
        .map(|o| {
            (
                s(o, "key"),
                i(o, "first_missing_seq"),
                i(o, "last_missing_seq"),
                i(o, "missing_count"),
                s(o, "before_event_id"),
                s(o, "after_event_id"),
            )
        })
        .collect();
    assert_eq!(got, want, "gaps --format json\n{}", run.describe());

    let run = backfill(&base);
    run.ok();
    for g in &exp.gaps {
        assert!(
            run.stdout.contains(g.before_id.as_str().unwrap()),
            "the gap table lacks {g:?}\n{}",
            run.describe()
        );
    }
    assert!(
        !run.stdout.contains("e13") && !run.stdout.contains("e14"),
        "the table shows events outside the window\n{}",
        run.describe()
    );
}

/// The single value of a one-row, one-column query result in `format`.
fn scalar(run: &Run, format: &str, column: &str) -> i64 {
    match format {
        "csv" => {
            let (header, rows) = parse_csv(&run.stdout);
            assert_eq!(header, vec![column.to_string()], "{}", run.describe());
            assert_eq!(rows.len(), 1, "{}", run.describe());
            rows[0][0]
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a number\n{}", run.describe()))
        }
        "json" => {
            let rows = parse_json_rows(&run.stdout)
                .unwrap_or_else(|e| panic!("sql --format json: {e}\n{}", run.describe()));
            assert_eq!(rows.len(), 1, "{}", run.describe());
            rows[0]
                .get(column)
                .and_then(json_int)
                .unwrap_or_else(|| panic!("no {column}\n{}", run.describe()))
        }
        other => panic!("format {other}"),
    }
}

#[test]
fn sql_command_counts_the_archive() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let src = archive.source();
    for format in ["csv", "json"] {
        let run = backfill(&[
            "sql",
            "--source",
            &src,
            "--format",
            format,
            "SELECT count(*) AS n FROM events",
        ]);
        run.ok();
        assert_eq!(
            scalar(&run, format, "n"),
            source.rows.len() as i64,
            "{}",
            run.describe()
        );
    }
    let run = backfill(&["sql", "--source", &src, "SELECT count(*) AS n FROM events"]);
    run.ok();
    assert!(
        run.stdout.contains(&source.rows.len().to_string()),
        "table output\n{}",
        run.describe()
    );
}

#[test]
fn sql_command_from_a_file_and_in_a_window() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let exp = decide(&source, &tricky_config(), &Ledger::default());
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("q.sql");
    fs::write(
        &file,
        "-- distinct events in the window\nSELECT count(DISTINCT event_id) AS n\nFROM events;\n",
    )
    .unwrap();
    let src = archive.source();
    let file_arg = file.display().to_string();
    let run = backfill(&[
        "sql", "--source", &src, "--from", FROM, "--to", TO, "--format", "csv", "-f", &file_arg,
    ]);
    run.ok();
    assert_eq!(
        scalar(&run, "csv", "n"),
        exp.events as i64,
        "{}",
        run.describe()
    );

    let run = backfill(&[
        "sql",
        "--source",
        &src,
        "--from",
        FROM,
        "--to",
        TO,
        "--format",
        "csv",
        "SELECT count(*) AS n FROM events",
    ]);
    run.ok();
    assert_eq!(
        scalar(&run, "csv", "n"),
        exp.rows as i64,
        "{}",
        run.describe()
    );
}

#[test]
fn sql_gaps_view_matches_reference() {
    let archive = tricky_archive();
    let source = read_source(&archive.path());
    let exp = decide(&source, &tricky_config(), &Ledger::default());
    let run = backfill(&[
        "sql",
        "--source",
        &archive.source(),
        "--from",
        FROM,
        "--to",
        TO,
        "--format",
        "json",
        "SELECT count(*) AS n, sum(missing_count) AS m FROM gaps",
    ]);
    run.ok();
    let rows = parse_json_rows(&run.stdout)
        .unwrap_or_else(|e| panic!("sql --format json: {e}\n{}", run.describe()));
    assert_eq!(rows.len(), 1, "{}", run.describe());
    assert_eq!(
        rows[0].get("n").and_then(json_int),
        Some(exp.gaps.len() as i64),
        "{}",
        run.describe()
    );
    assert_eq!(
        rows[0].get("m").and_then(json_int),
        Some(exp.missing_events()),
        "{}",
        run.describe()
    );
}

#[test]
fn explain_prints_the_physical_plans() {
    let archive = tricky_archive();
    let run = backfill(&[
        "explain",
        "--source",
        &archive.source(),
        "--from",
        FROM,
        "--to",
        TO,
    ]);
    run.ok();
    assert!(
        run.stdout.trim().lines().count() >= 3,
        "explain prints a plan\n{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("Exec"),
        "explain prints DataFusion physical plan nodes\n{}",
        run.describe()
    );
}

#[test]
fn window_prunes_files_outside_it() {
    // ten day folders, one file each; the window covers two days
    let mut archive = Archive::new();
    for day in 1..=10 {
        let rows: Vec<Row> = (0..20)
            .map(|i| {
                Row::new(
                    &format!("d{day}-{i}"),
                    "k",
                    day * 100 + i,
                    &format!("2024-04-{day:02}T{:02}:00:00Z", i),
                    Some(if i % 3 == 0 { "failed" } else { "processed" }),
                )
            })
            .collect();
        archive.rows(&format!("dt=2024-04-{day:02}/part-0.parquet"), &rows);
    }
    let source = read_source(&archive.path());
    let work = tempfile::tempdir().unwrap();
    let (from, to) = ("2024-04-04T00:00:00Z", "2024-04-06T00:00:00Z");
    let job = Job::under(archive.dir.path(), &source, &work.path().join("out")).window(from, to);
    let (run, exp) = job.run("pruned-1", &mut Ledger::default(), 0);
    assert_eq!(exp.rows, 40);
    let report: Json = serde_json::from_str(
        &fs::read_to_string(work.path().join("report-pruned-1.json")).unwrap(),
    )
    .unwrap();
    let scanned = counter(&report, "files_scanned").unwrap();
    let pruned = counter(&report, "files_pruned").unwrap();
    assert_eq!(
        scanned + pruned,
        10,
        "every file is either scanned or pruned: {report}\n{}",
        run.describe()
    );
    assert!(
        pruned >= 8,
        "the eight day folders outside the window are pruned: {report}\n{}",
        run.describe()
    );
}
