//! The history of runs (`runs list`, `runs show`) and the SQL redrive of
//! the DLQ, through the binary: what the predicate selects is checked
//! against the DLQ read independently, a second redrive sends nothing,
//! `--again` resends with the attempt continued, `--dry-run` changes
//! nothing, a bad predicate or DLQ is refused, a redrive that crashes
//! mid-delivery leaves the state as it was, and a redrive to Kafka carries
//! `backfill.redrive_of`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;

use crate::cli::{Run, backfill, backfill_in};
use crate::e2e::snapshot;
use crate::reference::{Record, Value, read_output};

/// The predicate of the example.
const TIMEOUTS: &str = "reason = 'max_attempts_exceeded' AND error LIKE '%timeout%'";

/// A generated archive and one committed run `r1` over it, whose DLQ holds
/// dead letters of several reasons.
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
        let archive = work.join("archive").display().to_string();
        backfill(&[
            "generate", "--out", &archive, "--events", "3000", "--keys", "20", "--seed", "5",
            "--days", "2",
        ])
        .ok();
        let out = work.join("out").display().to_string();
        let f = Fixture {
            _dir: dir,
            work,
            archive,
            out,
        };
        f.run("r1", &["--to", "2024-01-02T00:00:00Z"]).ok();
        f
    }

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

    /// `backfill redrive --out OUT --where PREDICATE --run-id ID` + `extra`.
    fn redrive(&self, run_id: &str, predicate: &str, extra: &[&str]) -> Run {
        self.redrive_env(run_id, predicate, extra, &[])
    }

    fn redrive_env(
        &self,
        run_id: &str,
        predicate: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Run {
        let mut args = vec![
            "redrive",
            "--out",
            &self.out,
            "--where",
            predicate,
            "--run-id",
            run_id,
            "--progress",
            "off",
        ];
        args.extend_from_slice(extra);
        backfill_in(&args, envs, None)
    }

    fn path(&self, rel: &str) -> PathBuf {
        Path::new(&self.out).join(rel)
    }

    fn to(&self) -> String {
        self.work.join("redriven").display().to_string()
    }

    /// The commit log's entries, by name.
    fn log(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.path("_state/log"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn runs(&self, args: &[&str]) -> Run {
        let mut a = vec!["runs"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--out", &self.out]);
        backfill(&a)
    }

    fn show_json(&self, run_id: &str) -> Json {
        let r = self.runs(&["show", run_id, "--format", "json"]);
        r.ok();
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}\n{}", r.describe()))
    }
}

fn text(r: &Record, col: &str) -> String {
    r.get(col)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{col} is not text in {r:?}"))
        .to_string()
}

fn int(r: &Record, col: &str) -> i64 {
    r.get(col)
        .and_then(Value::as_int)
        .unwrap_or_else(|| panic!("{col} is not an integer in {r:?}"))
}

/// The dead letters of `r1` the predicate selects, read from the
/// DLQ files with the test's own Parquet reader: event_id → attempt.
fn timeouts_of(f: &Fixture, run_id: &str) -> BTreeMap<String, i64> {
    read_output(&f.path("dlq"), run_id)
        .rows
        .iter()
        .filter(|r| {
            text(r, "backfill_reason") == "max_attempts_exceeded"
                && r.get("error")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.contains("timeout"))
        })
        .map(|r| (text(r, "event_id"), int(r, "backfill_attempt")))
        .collect()
}

/// The one `error:` line of a refused invocation, with its exit code.
#[track_caller]
fn refused(r: &Run, code: i32, needles: &[&str]) {
    r.expect_code(code);
    let lines = r.stderr_lines();
    assert!(
        lines.len() == 1
            && lines[0].starts_with("error: ")
            && needles.iter().all(|n| lines[0].contains(n)),
        "expected one error line containing {needles:?}\n{}",
        r.describe()
    );
}

/// The predicate selects exactly the dead letters it names (checked
/// against the DLQ read independently), each sent once with the
/// dead-lettering run, the redrive's run id and the next attempt; a second
/// redrive sends nothing; `--again` sends them again, one attempt higher;
/// the ledger holds one `redrive` entry per dead letter sent.
#[test]
fn redrive_sends_what_the_predicate_selects_once_and_again_on_demand() {
    let f = Fixture::new();
    let expected = timeouts_of(&f, "r1");
    assert!(
        expected.len() >= 3,
        "the fixture must dead-letter some timeouts: {expected:?}"
    );
    let dlq = read_output(&f.path("dlq"), "r1");
    assert!(
        dlq.rows.len() > expected.len(),
        "the predicate must leave some dead letters out"
    );
    let payload_of: BTreeMap<String, Value> = dlq
        .rows
        .iter()
        .map(|r| (text(r, "event_id"), r["payload"].clone()))
        .collect();
    let to = f.to();

    let r = f.redrive("rd1", TIMEOUTS, &["--to", &to]);
    r.ok();
    let sent = read_output(Path::new(&to), "rd1");
    let got: BTreeMap<String, i64> = sent
        .rows
        .iter()
        .map(|r| (text(r, "event_id"), int(r, "backfill_attempt")))
        .collect();
    assert_eq!(sent.rows.len(), expected.len(), "{}", r.describe());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for row in &sent.rows {
        let id = text(row, "event_id");
        assert_eq!(int(row, "backfill_attempt"), expected[&id] + 1, "{row:?}");
        assert_eq!(text(row, "backfill_redrive_of"), "r1");
        assert_eq!(text(row, "backfill_run_id"), "rd1");
        assert_eq!(text(row, "backfill_reason"), "max_attempts_exceeded");
        assert_eq!(
            row["payload"], payload_of[&id],
            "the payload as dead-lettered"
        );
    }
    assert!(
        r.stdout.contains(&format!(
            "redrive rd1 committed: {} dead letters sent",
            expected.len()
        )),
        "{}",
        r.describe()
    );
    let show = f.show_json("rd1");
    assert_eq!(show["kind"], "redrive");
    assert_eq!(show["report"]["replayed"], expected.len() as u64);
    assert_eq!(
        show["ledger"],
        serde_json::json!([{
            "outcome": "redrive", "reason": "max_attempts_exceeded",
            "events": expected.len(),
            "min_attempt": expected.values().min().unwrap() + 1,
            "max_attempt": expected.values().max().unwrap() + 1,
        }]),
        "{show}"
    );

    // The same predicate again: nothing to send, and it says why.
    let again = f.redrive("rd2", TIMEOUTS, &["--to", &to]);
    again.ok();
    assert!(
        read_output(Path::new(&to), "rd2").rows.is_empty(),
        "{}",
        again.describe()
    );
    let report = &f.show_json("rd2")["report"];
    assert_eq!(report["replayed"], 0);
    assert_eq!(
        report["redrive"]["already_redriven"],
        expected.len() as u64,
        "{report}"
    );
    // A wider predicate sends only what was not sent before.
    let wider = f.redrive("rd3", "reason = 'max_attempts_exceeded'", &["--to", &to]);
    wider.ok();
    let rest: BTreeSet<String> = read_output(Path::new(&to), "rd3")
        .rows
        .iter()
        .map(|r| text(r, "event_id"))
        .collect();
    let all_exceeded: BTreeSet<String> = dlq
        .rows
        .iter()
        .filter(|r| text(r, "backfill_reason") == "max_attempts_exceeded")
        .map(|r| text(r, "event_id"))
        .collect();
    let expected_rest: BTreeSet<String> = all_exceeded
        .difference(&expected.keys().cloned().collect())
        .cloned()
        .collect();
    assert_eq!(rest, expected_rest, "{}", wider.describe());

    // --again: the same dead letters once more, one attempt later.
    let forced = f.redrive("rd4", TIMEOUTS, &["--to", &to, "--again"]);
    forced.ok();
    let resent = read_output(Path::new(&to), "rd4");
    assert_eq!(resent.rows.len(), expected.len(), "{}", forced.describe());
    for row in &resent.rows {
        let id = text(row, "event_id");
        assert_eq!(int(row, "backfill_attempt"), expected[&id] + 2, "{row:?}");
        assert_eq!(text(row, "backfill_redrive_of"), "r1");
    }

    // A rerun of a committed redrive id does nothing; other settings under
    // it are refused.
    let before = snapshot(Path::new(&to));
    let rerun = f.redrive("rd1", TIMEOUTS, &["--to", &to]);
    rerun.ok();
    assert!(
        rerun
            .stdout
            .contains("redrive rd1 is already committed; nothing to do"),
        "{}",
        rerun.describe()
    );
    assert_eq!(snapshot(Path::new(&to)), before);
    refused(
        &f.redrive("rd1", "true", &["--to", &to]),
        2,
        &["run id rd1 was committed with --where"],
    );

    // `run` still takes the redriven events as dead-lettered: a later run
    // over the same window neither replays nor dead-letters them again.
    f.run("r2", &["--to", "2024-01-02T00:00:00Z"]).ok();
    let replayed: BTreeSet<String> = read_output(&f.path("replay"), "r2")
        .rows
        .iter()
        .map(|r| text(r, "event_id"))
        .collect();
    assert!(
        replayed.is_disjoint(&expected.keys().cloned().collect()),
        "run replayed redriven dead letters"
    );
    let dead_again: BTreeSet<String> = read_output(&f.path("dlq"), "r2")
        .rows
        .iter()
        .map(|r| text(r, "event_id"))
        .collect();
    assert!(
        dead_again.is_disjoint(&expected.keys().cloned().collect()),
        "run dead-lettered redriven dead letters again"
    );
}

/// A dry run lists the dead letters it would send, and sends, writes and
/// commits nothing.
#[test]
fn a_dry_run_redrive_lists_and_changes_nothing() {
    let f = Fixture::new();
    let expected = timeouts_of(&f, "r1");
    let to = f.to();
    let state_before = snapshot(&f.path("_state"));
    let r = f.redrive("dry", TIMEOUTS, &["--to", &to, "--dry-run"]);
    r.ok();
    for id in expected.keys() {
        assert!(
            r.stdout.contains(id.as_str()),
            "{id} listed\n{}",
            r.describe()
        );
    }
    let listed = r.stdout.lines().filter(|l| l.contains("| evt-")).count();
    assert_eq!(listed, expected.len(), "{}", r.describe());
    assert!(
        r.stdout.contains(&format!(
            "redrive dry dry run: would send {} dead letters; nothing sent",
            expected.len()
        )),
        "{}",
        r.describe()
    );
    assert!(!Path::new(&to).exists(), "a dry run wrote {to}");
    assert_eq!(snapshot(&f.path("_state")), state_before);
    // Nothing recorded: the real redrive then sends every one of them.
    f.redrive("real", TIMEOUTS, &["--to", &to]).ok();
    assert_eq!(
        read_output(Path::new(&to), "real").rows.len(),
        expected.len()
    );
}

/// A predicate that does not parse, names no column, is not a boolean or
/// smuggles a second statement, and a DLQ no committed run wrote to, are
/// refused with one line naming the problem (exit 2), committing nothing.
#[test]
fn a_bad_predicate_or_dlq_is_refused_and_commits_nothing() {
    let f = Fixture::new();
    let to = f.to();
    let log = f.log();
    for (predicate, needles) in [
        (
            "reason = ",
            &["--where \"reason =\"", "Expected: an expression"][..],
        ),
        (
            "no_such_column = 1",
            &["--where", "No field named no_such_column"][..],
        ),
        ("reason", &["--where", "non-boolean predicate"][..]),
        (
            "reason = 'x'; DROP TABLE runs",
            &["one expression expected, found `;`"][..],
        ),
        ("count(*) > 1", &["Aggregate functions are not allowed"][..]),
        ("random() < 0.5", &["--where", "volatile function"][..]),
        // Failing only on the rows it meets: still the predicate's fault.
        (
            "attempt / 0 = 1",
            &["--where \"attempt / 0 = 1\"", "Divide by zero"][..],
        ),
        (
            "cast(error as int) = 1",
            &["--where \"cast(error as int) = 1\"", "Cast error"][..],
        ),
    ] {
        refused(&f.redrive("bad", predicate, &["--to", &to]), 2, needles);
    }
    let elsewhere = f.work.join("not-a-dlq").display().to_string();
    refused(
        &f.redrive("bad", "true", &["--to", &to, "--dlq", &elsewhere]),
        2,
        &[
            "--dlq",
            "no committed run of the state",
            "wrote dead letters there",
            &f.path("dlq").display().to_string(),
        ],
    );
    refused(
        &f.redrive(
            "bad",
            "true",
            &["--to", &f.path("dlq").display().to_string()],
        ),
        2,
        &["share a folder"],
    );
    assert_eq!(f.log(), log, "nothing committed");
    assert!(!Path::new(&to).exists());
}

/// A redrive killed after its first batch was written (and, separately, one
/// whose commit fails) leaves the state and the sink's visible folder as
/// they were; a rerun sends every dead letter.
#[test]
fn a_redrive_that_fails_mid_delivery_changes_nothing_and_a_rerun_delivers() {
    let f = Fixture::new();
    let expected = timeouts_of(&f, "r1");
    let to = f.to();
    let log = f.log();
    let state_before: BTreeSet<PathBuf> = snapshot(&f.path("_state"))
        .into_keys()
        .filter(|p| !p.to_string_lossy().contains("/attempts/"))
        .collect();
    let crashed = f.redrive_env(
        "rd",
        TIMEOUTS,
        &["--to", &to],
        &[("BACKFILL_FAILPOINT", "redrive_after_batch:crash")],
    );
    assert_ne!(crashed.code, Some(0), "{}", crashed.describe());
    assert!(crashed.stderr.contains("failpoint redrive_after_batch"));
    let failed = f.redrive_env(
        "rd",
        TIMEOUTS,
        &["--to", &to],
        &[("BACKFILL_FAILPOINT", "before_commit:error")],
    );
    refused(&failed, 1, &["failpoint before_commit"]);
    assert_eq!(f.log(), log, "nothing committed");
    assert!(
        read_output(Path::new(&to), "rd").rows.is_empty(),
        "nothing visible"
    );
    // The crash's attempt record stays for gc; nothing else is new.
    let state_after: BTreeSet<PathBuf> = snapshot(&f.path("_state"))
        .into_keys()
        .filter(|p| !p.to_string_lossy().contains("/attempts/"))
        .filter(|p| !p.to_string_lossy().contains("/runs/rd/"))
        .collect();
    assert_eq!(state_after, state_before);
    let r = f.redrive("rd", TIMEOUTS, &["--to", &to]);
    r.ok();
    let sent: BTreeSet<String> = read_output(Path::new(&to), "rd")
        .rows
        .iter()
        .map(|r| text(r, "event_id"))
        .collect();
    assert_eq!(
        sent,
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        "{}",
        r.describe()
    );
}

/// `runs list` and `runs show` over real committed runs (a run, a shard
/// run, a redrive), in every format; `state runs` is the same list; an
/// unknown id is exit 2 with one line.
#[test]
fn runs_list_and_show_in_every_format() {
    let f = Fixture::new();
    f.run("r2", &["--from", "2024-01-02T00:00:00Z", "--shard", "0/2"])
        .ok();
    f.redrive("rd1", TIMEOUTS, &["--to", &f.to()]).ok();
    let ids = ["r1", "r2-shard-0-of-2", "rd1"];
    let kinds = ["run", "shard", "redrive"];
    let manifest = |id: &str| f.show_json(id);

    let csv = f.runs(&["list", "--format", "csv"]);
    csv.ok();
    let mut lines = csv.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(
            "run_id,kind,committed_at,window_from,window_to,events,replayed,dead_lettered,gaps,conflicts,sinks,elapsed_ms"
        ),
        "{}",
        csv.describe()
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{}", csv.describe());
    for (row, (id, kind)) in rows.iter().zip(ids.iter().zip(kinds)) {
        let m = manifest(id);
        assert_eq!(row[0], *id);
        assert_eq!(row[1], kind);
        assert_eq!(row[6], m["report"]["replayed"].to_string(), "{row:?}");
        assert_eq!(row[7], m["report"]["dead_lettered"].to_string(), "{row:?}");
        assert!(row[11].parse::<u64>().unwrap() > 0, "a duration: {row:?}");
    }
    assert_eq!(rows[0][4], "2024-01-02T00:00:00Z", "r1's window end");
    assert_eq!(rows[1][3], "2024-01-02T00:00:00Z", "r2's window start");
    assert!(
        rows[2][10].starts_with("replay=") && rows[2][10].ends_with("/redriven"),
        "{:?}",
        rows[2]
    );

    let json = f.runs(&["list", "--format", "json"]);
    json.ok();
    let list: Json = serde_json::from_str(&json.stdout).unwrap();
    let listed: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["run_id"].as_str().unwrap(), r["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, ids.into_iter().zip(kinds).collect::<Vec<_>>());

    let table = f.runs(&["list"]);
    table.ok();
    for id in ids {
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {id} "))),
            "{}",
            table.describe()
        );
    }
    let alias = backfill(&["state", "runs", "--out", &f.out]);
    alias.ok();
    assert_eq!(alias.stdout, table.stdout);

    // show: the report as committed and the ledger's counts, which add up
    // to what the run replayed and dead-lettered.
    let show = manifest("r1");
    let ledger = show["ledger"].as_array().unwrap();
    let sum = |outcome: &str| -> u64 {
        ledger
            .iter()
            .filter(|r| r["outcome"] == outcome)
            .map(|r| r["events"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("replay"), show["report"]["replayed"].as_u64().unwrap());
    assert_eq!(
        sum("dlq"),
        show["report"]["dead_lettered"].as_u64().unwrap()
    );
    assert!(sum("dlq") > 0);
    assert_eq!(show["kind"], "run");
    assert_eq!(show["seq"], 1);
    let csv = f.runs(&["show", "r1", "--format", "csv"]);
    csv.ok();
    let pairs: BTreeMap<&str, &str> = csv
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .collect();
    assert_eq!(
        pairs.get("report.replayed").copied(),
        Some(show["report"]["replayed"].to_string().as_str())
    );
    for r in ledger {
        let key = format!(
            "ledger.{}.{}.events",
            r["outcome"].as_str().unwrap(),
            r["reason"].as_str().unwrap()
        );
        assert_eq!(
            pairs.get(key.as_str()).copied(),
            Some(r["events"].to_string().as_str()),
            "{key}"
        );
    }
    let table = f.runs(&["show", "r1"]);
    table.ok();
    assert!(
        table.stdout.starts_with("run r1: committed ")
            && table.stdout.contains("\nrun r1 committed\n")
            && table.stdout.contains("ledger of r1:")
            && table.stdout.contains("| dlq "),
        "{}",
        table.describe()
    );

    refused(
        &f.runs(&["show", "no-such-run"]),
        2,
        &["no committed run 'no-such-run'", "runs list"],
    );
    let nowhere = f.work.join("nowhere").display().to_string();
    refused(
        &backfill(&["runs", "list", "--out", &nowhere]),
        2,
        &["there is no backfill state at"],
    );
}

/// A redrive to a Kafka topic: one message per selected dead letter, with
/// `backfill.redrive_of` naming the run that dead-lettered it, the
/// redrive's run id and the next attempt, read back by a consumer.
#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_to_kafka_carries_redrive_of() {
    let server = crate::services::kafka();
    let topic = crate::services::unique_name("redrive");
    server.create_topic(&topic, 2).await;
    let url = server.url(&topic);
    let (f, expected, r) = tokio::task::spawn_blocking(move || {
        let f = Fixture::new();
        let expected = timeouts_of(&f, "r1");
        let r = f.redrive("rdk", TIMEOUTS, &["--to", &url]);
        (f, expected, r)
    })
    .await
    .unwrap();
    r.ok();
    assert!(!expected.is_empty());
    let msgs = crate::kafka::consume(
        server,
        &topic,
        false,
        expected.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(msgs.len(), expected.len(), "{}", r.describe());
    let mut seen = BTreeMap::new();
    for m in &msgs {
        let h = crate::kafka::headers(m);
        assert_eq!(h["backfill.redrive_of"], "r1", "{h:?}");
        assert_eq!(h["backfill.run_id"], "rdk", "{h:?}");
        assert_eq!(h["backfill.reason"], "max_attempts_exceeded", "{h:?}");
        seen.insert(
            h["backfill.event_id"].clone(),
            h["backfill.attempt"].parse::<i64>().unwrap(),
        );
    }
    let want: BTreeMap<String, i64> = expected.iter().map(|(k, v)| (k.clone(), v + 1)).collect();
    assert_eq!(seen, want);
    // Recorded: the next redrive of the same rows sends nothing.
    let url = server.url(&topic);
    let again = tokio::task::spawn_blocking(move || f.redrive("rdk2", TIMEOUTS, &["--to", &url]))
        .await
        .unwrap();
    again.ok();
    assert!(
        again
            .stdout
            .contains("redrive rdk2 committed: 0 dead letters sent"),
        "{}",
        again.describe()
    );
}

/// A dead-letter file a committed run listed that no longer reads as one
/// (emptied, cut short) is damage to the state's outputs: exit 1, the line
/// naming the file, nothing committed; restored, the redrive goes through.
#[test]
fn a_damaged_dead_letter_file_is_named_and_commits_nothing() {
    let f = Fixture::new();
    let to = f.to();
    let log = f.log();
    let file = std::fs::read_dir(f.path("dlq/run_id=r1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .expect("a dead-letter file of r1");
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let original = std::fs::read(&file).unwrap();
    for damaged in [&[][..], &original[..100]] {
        std::fs::write(&file, damaged).unwrap();
        refused(
            &f.redrive("dmg", "true", &["--to", &to]),
            1,
            &[&name, "is damaged"],
        );
        assert_eq!(f.log(), log, "nothing committed");
    }
    std::fs::write(&file, &original).unwrap();
    f.redrive("dmg", "true", &["--to", &to]).ok();
}
