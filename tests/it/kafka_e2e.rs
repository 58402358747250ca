//! End to end through the binary against a real Kafka-protocol broker
//! (Tansu): what a consumer of the replay, DLQ and gaps topics receives
//! compared with the Parquet run of the same archive; a broker that dies
//! mid-run (nothing committed, the rerun delivers everything once); the
//! Kafka source alone and in a hybrid union with the archive, decided
//! exactly as the reference model decides the same rows; the health check
//! failing before the scan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use rdkafka::ClientConfig;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value as Json;

use crate::archive::{Archive, Col, Layout, Row, ts};
use crate::cli::{Run, backfill};
use crate::e2e::manifests;
use crate::kafka::headers;
use crate::reference::{
    Config, Expected, Ledger, Record, Source, Value, decide, read_output, read_source,
};
use crate::services::{self, KafkaServer, unique_name};

// ---------------------------------------------------------------- helpers

/// Run the binary off the async workers.
async fn run_bin(args: Vec<String>) -> Run {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        backfill(&args)
    })
    .await
    .expect("the backfill runner thread")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `backfill generate` into `dir`.
async fn generate(dir: &Path, events: u64, keys: u64, seed: u64) {
    run_bin(strings(&[
        "generate",
        "--out",
        &path_str(dir),
        "--events",
        &events.to_string(),
        "--keys",
        &keys.to_string(),
        "--seed",
        &seed.to_string(),
    ]))
    .await
    .ok();
}

/// The stderr lines that start with `error:`.
fn error_lines(run: &Run) -> Vec<String> {
    run.stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read report {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report {}: {e}", path.display()))
}

fn report_int(report: &Json, key: &str) -> i64 {
    report
        .get(key)
        .and_then(Json::as_i64)
        .unwrap_or_else(|| panic!("report: {key} missing or not an integer: {report}"))
}

/// Everything on `topic` from the beginning, read uncommitted (the shared
/// reader of the sink-level tests).
async fn consume(
    server: &KafkaServer,
    topic: &str,
    expect: usize,
    within: Duration,
) -> Vec<OwnedMessage> {
    crate::kafka::consume(server, topic, false, expect, within).await
}

/// Nanoseconds since the epoch of an RFC 3339 (or zone-less ISO) text.
fn parse_time_ns(s: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return t.timestamp_nanos_opt();
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .and_then(|t| t.and_utc().timestamp_nanos_opt())
}

/// A record's value as header text, the way the README documents it.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        other => panic!("no header text for {other:?}"),
    }
}

fn field<'a>(r: &'a Record, col: &str) -> &'a Value {
    r.get(col).unwrap_or(&Value::Null)
}

/// The headers a replay (or, with `dlq`, a dead letter) of `row` carries,
/// without `backfill.detected_at` (checked on its own: one value per run).
fn expected_headers(row: &Record, run_id: &str, dlq: bool) -> BTreeMap<String, String> {
    let mut h = BTreeMap::new();
    h.insert("backfill.run_id".to_string(), run_id.to_string());
    for (header, col) in [
        ("backfill.reason", "backfill_reason"),
        ("backfill.attempt", "backfill_attempt"),
        ("backfill.event_id", "event_id"),
        ("backfill.key", "key"),
        ("backfill.seq", "seq"),
        ("backfill.original.topic", "kafka_topic"),
        ("backfill.original.partition", "kafka_partition"),
        ("backfill.original.offset", "kafka_offset"),
    ] {
        if let Some(v) = text(field(row, col)) {
            h.insert(header.to_string(), v);
        }
    }
    if dlq && let Some(e) = text(field(row, "error")) {
        h.insert("backfill.error".to_string(), e);
    }
    if let Some(ns) = field(row, "kafka_timestamp").as_ts() {
        h.insert(
            "backfill.original.timestamp".to_string(),
            ns.div_euclid(1_000_000).to_string(),
        );
    }
    h
}

/// Compare the messages of a replay or DLQ topic with the Parquet run's
/// rows: one message per row, key, value bytes, timestamp and every header.
/// Collects the `backfill.detected_at` values seen.
fn diff_messages(
    what: &str,
    rows: &[Record],
    msgs: &[OwnedMessage],
    run_id: &str,
    dlq: bool,
    detected: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut errs = Vec::new();
    let by_id: HashMap<String, &Record> = rows
        .iter()
        .map(|r| {
            let id = field(r, "event_id").as_str().expect("event_id").to_string();
            (id, r)
        })
        .collect();
    if by_id.len() != rows.len() {
        errs.push(format!("{what}: the Parquet run has repeated event ids"));
    }
    if msgs.len() != rows.len() {
        errs.push(format!(
            "{what}: {} messages on the topic, {} rows in the Parquet run",
            msgs.len(),
            rows.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for m in msgs {
        let mut h = headers(m);
        match h.remove("backfill.detected_at") {
            Some(d) => {
                detected.insert(d);
            }
            None => errs.push(format!("{what}: a message without backfill.detected_at")),
        }
        let Some(id) = h.get("backfill.event_id").cloned() else {
            errs.push(format!(
                "{what}: a message without backfill.event_id: {h:?}"
            ));
            continue;
        };
        if !seen.insert(id.clone()) {
            errs.push(format!("{what}: event {id} produced more than once"));
        }
        let Some(row) = by_id.get(&id) else {
            errs.push(format!("{what}: event {id} is not in the Parquet run"));
            continue;
        };
        let key = field(row, "key").as_str().map(str::as_bytes);
        if m.key() != key {
            errs.push(format!(
                "{what}: event {id}: key {:?}, expected {key:?}",
                m.key()
            ));
        }
        let payload = match field(row, "payload") {
            Value::Bytes(b) => Some(b.as_slice()),
            Value::Str(s) => Some(s.as_bytes()),
            _ => None,
        };
        if m.payload() != payload {
            errs.push(format!(
                "{what}: event {id}: value {:?}, expected the payload {payload:?}",
                m.payload()
            ));
        }
        let want_ts = field(row, "event_time")
            .as_ts()
            .map(|ns| ns.div_euclid(1_000_000));
        if m.timestamp().to_millis() != want_ts {
            errs.push(format!(
                "{what}: event {id}: timestamp {:?}, expected event_time {want_ts:?} ms",
                m.timestamp()
            ));
        }
        let want = expected_headers(row, run_id, dlq);
        if h != want {
            errs.push(format!(
                "{what}: event {id}: headers\n    {h:?}\n  expected\n    {want:?}"
            ));
        }
    }
    for id in by_id.keys() {
        if !seen.contains(id) {
            errs.push(format!("{what}: event {id} never arrived"));
        }
    }
    errs
}

/// A JSON gap field as a reference value, for comparison with Parquet.
fn json_as_value(v: Option<&Json>, time: bool) -> Value {
    match v {
        None | Some(Json::Null) => Value::Null,
        Some(Json::String(s)) if time => parse_time_ns(s)
            .map(Value::Ts)
            .unwrap_or_else(|| Value::Other(format!("unparseable time {s}"))),
        Some(Json::String(s)) => Value::Str(s.clone()),
        Some(Json::Number(n)) if n.is_i64() => Value::Int(n.as_i64().unwrap_or_default()),
        Some(other) => Value::Other(other.to_string()),
    }
}

/// Compare the gaps topic (JSON rows) with the Parquet run's gap rows.
fn diff_gap_messages(
    rows: &[Record],
    msgs: &[OwnedMessage],
    run_id: &str,
    detected: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut errs = Vec::new();
    if msgs.len() != rows.len() {
        errs.push(format!(
            "gaps: {} messages on the topic, {} rows in the Parquet run",
            msgs.len(),
            rows.len()
        ));
    }
    let gap_id = |key: &Value, first: &Value| format!("{key:?}/{first:?}");
    let by_id: HashMap<String, &Record> = rows
        .iter()
        .map(|r| (gap_id(field(r, "key"), field(r, "first_missing_seq")), r))
        .collect();
    let mut seen = BTreeSet::new();
    for m in msgs {
        let json: Json = match m.payload().map(serde_json::from_slice) {
            Some(Ok(j)) => j,
            other => {
                errs.push(format!("gaps: a value that is not JSON: {other:?}"));
                continue;
            }
        };
        let get = |name: &str, time: bool| json_as_value(json.get(name), time);
        let id = gap_id(&get("key", false), &get("first_missing_seq", false));
        if !seen.insert(id.clone()) {
            errs.push(format!("gaps: gap {id} produced more than once"));
        }
        let Some(row) = by_id.get(&id) else {
            errs.push(format!("gaps: gap {id} is not in the Parquet run: {json}"));
            continue;
        };
        for (col, time) in [
            ("last_missing_seq", false),
            ("missing_count", false),
            ("before_event_id", false),
            ("before_event_time", true),
            ("after_event_id", false),
            ("after_event_time", true),
        ] {
            if &get(col, time) != field(row, col) {
                errs.push(format!(
                    "gaps: gap {id}: {col} is {:?} in the message, {:?} in Parquet",
                    get(col, time),
                    field(row, col)
                ));
            }
        }
        if get("backfill_run_id", false) != Value::Str(run_id.to_string()) {
            errs.push(format!("gaps: gap {id}: backfill_run_id {json}"));
        }
        let key = field(row, "key").as_str().map(str::as_bytes);
        if m.key() != key {
            errs.push(format!(
                "gaps: gap {id}: key {:?}, expected {key:?}",
                m.key()
            ));
        }
        let mut h = headers(m);
        let d = h.remove("backfill.detected_at");
        if d.as_deref().and_then(parse_time_ns) != get("backfill_detected_at", true).as_ts() {
            errs.push(format!(
                "gaps: gap {id}: header detected_at {d:?} differs from the row's {:?}",
                json.get("backfill_detected_at")
            ));
        }
        if let Some(d) = d {
            detected.insert(d);
        }
        let want = BTreeMap::from([
            ("backfill.run_id".to_string(), run_id.to_string()),
            (
                "backfill.key".to_string(),
                text(field(row, "key")).unwrap_or_default(),
            ),
        ]);
        if h != want {
            errs.push(format!("gaps: gap {id}: headers {h:?}, expected {want:?}"));
        }
    }
    for id in by_id.keys() {
        if !seen.contains(id) {
            errs.push(format!("gaps: gap {id} never arrived"));
        }
    }
    errs
}

/// Within each key: one partition, and seq increasing with the offset
/// (strictly for replays; DLQ conflicts share a seq).
fn diff_per_key_order(what: &str, msgs: &[OwnedMessage], strict: bool) -> Vec<String> {
    let mut errs = Vec::new();
    let mut last: HashMap<Vec<u8>, (i32, i64, i64)> = HashMap::new();
    for m in msgs {
        let Some(key) = m.key().map(<[u8]>::to_vec) else {
            errs.push(format!("{what}: a message without a key"));
            continue;
        };
        let Some(seq) = headers(m)
            .get("backfill.seq")
            .and_then(|s| s.parse::<i64>().ok())
        else {
            errs.push(format!("{what}: a message without a numeric backfill.seq"));
            continue;
        };
        if let Some((p, prev, prev_offset)) = last.get(&key) {
            let key = String::from_utf8_lossy(&key);
            if *p != m.partition() {
                errs.push(format!(
                    "{what}: key {key} in partitions {p} and {}",
                    m.partition()
                ));
            } else if seq < *prev || (strict && seq == *prev) {
                errs.push(format!(
                    "{what}: key {key}: seq {seq} at offset {} after seq {prev} at offset {prev_offset}",
                    m.offset()
                ));
            }
        }
        last.insert(key, (m.partition(), seq, m.offset()));
    }
    errs
}

/// Assert no differences, showing all of them and the run.
#[track_caller]
fn assert_no_diffs(errs: &[String], run: &Run) {
    assert!(
        errs.is_empty(),
        "{} difference(s):\n  {}\n{}",
        errs.len(),
        errs.iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  "),
        run.describe()
    );
}

// ------------------------------------------- sinks: the topics vs Parquet

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_dlq_and_gaps_topics_carry_exactly_the_parquet_runs_rows() {
    let server = services::kafka();
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("archive");
    generate(&archive, 3000, 20, 5).await;
    let (replay_t, dlq_t, gaps_t) = (
        unique_name("e2e-replay"),
        unique_name("e2e-dlq"),
        unique_name("e2e-gaps"),
    );
    server.create_topic(&replay_t, 3).await;
    server.create_topic(&dlq_t, 2).await;
    server.create_topic(&gaps_t, 2).await;
    // The same run id in two separate states: the rows must be the same.
    let run_id = "kafka-e2e-sinks";

    let parquet = work.path().join("parquet");
    run_bin(strings(&[
        "run",
        "--source",
        &path_str(&archive),
        "--out",
        &path_str(&parquet),
        "--run-id",
        run_id,
        "--progress",
        "off",
    ]))
    .await
    .ok();

    let state = work.path().join("kafka-state");
    let report_path = work.path().join("kafka-report.json");
    let started = Utc::now();
    let run = run_bin(strings(&[
        "run",
        "--source",
        &path_str(&archive),
        "--replay-sink",
        &server.url(&replay_t),
        "--dlq-sink",
        &server.url(&dlq_t),
        "--gaps-sink",
        &server.url(&gaps_t),
        "--state",
        &path_str(&state),
        "--run-id",
        run_id,
        "--report",
        &path_str(&report_path),
        "--progress",
        "off",
    ]))
    .await;
    let finished = Utc::now();
    run.ok();

    let replay = read_output(&parquet.join("replay"), run_id).rows;
    let dlq = read_output(&parquet.join("dlq"), run_id).rows;
    let gaps = read_output(&parquet.join("gaps"), run_id).rows;
    assert!(
        !replay.is_empty() && !dlq.is_empty() && !gaps.is_empty(),
        "the generated archive should give replays ({}), dead letters ({}) and gaps ({})",
        replay.len(),
        dlq.len(),
        gaps.len()
    );
    assert!(
        dlq.iter().any(|r| !field(r, "error").is_null()),
        "no dead letter carries an error"
    );
    assert!(
        replay.iter().all(|r| !field(r, "kafka_offset").is_null()),
        "the generated rows carry their Kafka coordinates"
    );

    let within = Duration::from_secs(30);
    let replay_msgs = consume(server, &replay_t, replay.len(), within).await;
    let dlq_msgs = consume(server, &dlq_t, dlq.len(), within).await;
    let gaps_msgs = consume(server, &gaps_t, gaps.len(), within).await;

    let mut detected = BTreeSet::new();
    let mut errs = Vec::new();
    errs.extend(diff_messages(
        "replay",
        &replay,
        &replay_msgs,
        run_id,
        false,
        &mut detected,
    ));
    errs.extend(diff_messages(
        "dlq",
        &dlq,
        &dlq_msgs,
        run_id,
        true,
        &mut detected,
    ));
    errs.extend(diff_gap_messages(&gaps, &gaps_msgs, run_id, &mut detected));
    errs.extend(diff_per_key_order("replay", &replay_msgs, true));
    errs.extend(diff_per_key_order("dlq", &dlq_msgs, false));
    // One detection time per run, across the three topics, taken during it.
    if detected.len() != 1 {
        errs.push(format!(
            "backfill.detected_at is not one value: {detected:?}"
        ));
    }
    for d in &detected {
        match parse_time_ns(d) {
            Some(ns) => {
                let lo = started.timestamp_nanos_opt().unwrap_or_default() - 1_000_000_000;
                let hi = finished.timestamp_nanos_opt().unwrap_or_default() + 1_000_000_000;
                if !(lo..=hi).contains(&ns) {
                    errs.push(format!("backfill.detected_at {d} is not during the run"));
                }
            }
            None => errs.push(format!("backfill.detected_at {d} is not RFC 3339")),
        }
    }
    let report = read_json(&report_path);
    for (sink, rows, topic) in [
        ("replay", replay.len(), &replay_t),
        ("dlq", dlq.len(), &dlq_t),
        ("gaps", gaps.len(), &gaps_t),
    ] {
        let entry = &report["outputs"][sink];
        if entry["rows"].as_u64() != Some(rows as u64) {
            errs.push(format!(
                "report: outputs.{sink}.rows {entry}, expected {rows}"
            ));
        }
        if entry["target"].as_str() != Some(server.url(topic).as_str()) {
            errs.push(format!("report: outputs.{sink}.target {entry}"));
        }
    }
    if manifests(&state).len() != 1 {
        errs.push(format!("manifests: {:?}", manifests(&state)));
    }
    assert_no_diffs(&errs, &run);
}

// ------------------------------------------------ the broker dies mid-run

/// The inodes of the TCP sockets process `pid` has open.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    fds.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            l.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect()
}

/// How many established connections process `pid` has to `port` on
/// 127.0.0.1 (from /proc/net/tcp: the process talks to the broker).
fn connections_to(pid: u32, port: u16) -> usize {
    let inodes = socket_inodes(pid);
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 9
                && cols[3] == "01"
                && cols[2].ends_with(&format!(":{port:04X}"))
                && inodes.contains(cols[9])
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_run_commits_nothing_and_the_rerun_delivers_everything_once() {
    let mut server = services::start_kafka_private();
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("archive");
    generate(&archive, 3000, 20, 5).await;
    let (replay_t, dlq_t) = ("crash-replay", "crash-dlq");
    server.create_topic(replay_t, 3).await;
    server.create_topic(dlq_t, 2).await;
    // Messages wait in librdkafka's queue for linger.ms before their first
    // send, so a broker killed after the health check has delivered nothing
    // of this run; message_timeout_ms makes the run give up within seconds.
    let job = work.path().join("crash.toml");
    std::fs::write(
        &job,
        "[kafka]\nmessage_timeout_ms = 5000\nproperties = { \"linger.ms\" = \"2000\" }\n",
    )
    .expect("write the job file");
    let out = work.path().join("out");
    let state = out.join("_state");
    let run_id = "crash-run";
    let args = strings(&[
        "run",
        "--job",
        &path_str(&job),
        "--source",
        &path_str(&archive),
        "--out",
        &path_str(&out),
        "--replay-sink",
        &server.url(replay_t),
        "--dlq-sink",
        &server.url(dlq_t),
        "--run-id",
        run_id,
        "--progress",
        "off",
    ]);

    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = crate::s3::Spawned::start(&arg_refs, &[]);
    let pid = child.pid();
    // Both Kafka sinks connect for their health check; kill the broker once
    // the checks are done (a few ms on localhost) and before the first send.
    let start = Instant::now();
    let watchable = Path::new("/proc/net/tcp").exists();
    if !watchable {
        // No /proc: the checks are done well within a second on localhost.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    while watchable && connections_to(pid, server.port) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run never connected to the broker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.stop();
    let run = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("runner thread");
    run.expect_code(1);
    let errors = error_lines(&run);
    assert_eq!(errors.len(), 1, "one error line\n{}", run.describe());
    assert!(
        errors[0].contains(replay_t) || errors[0].contains(dlq_t),
        "the error names the topic\n{}",
        run.describe()
    );
    assert!(
        errors[0].contains("not acknowledged"),
        "the run failed at delivery, not at the health check\n{}",
        run.describe()
    );
    assert!(
        manifests(&state).is_empty(),
        "a failed run committed: {:?}",
        manifests(&state)
    );

    // A fresh broker (memory storage: topics again), the same run id.
    server.restart();
    server.create_topic(replay_t, 3).await;
    server.create_topic(dlq_t, 2).await;
    let rerun = run_bin(args.clone()).await;
    rerun.ok();
    assert_eq!(manifests(&state).len(), 1, "{}", rerun.describe());

    let exp = decide(
        &read_source(&archive),
        &Config::default(),
        &Ledger::default(),
    );
    let within = Duration::from_secs(30);
    let replay_msgs = consume(&server, replay_t, exp.replay.len(), within).await;
    let dlq_msgs = consume(&server, dlq_t, exp.dlq.len(), within).await;
    let mut errs = Vec::new();
    for (what, msgs, want) in [
        ("replay", &replay_msgs, &exp.replay),
        ("dlq", &dlq_msgs, &exp.dlq),
    ] {
        let got: Vec<(String, String, String)> = msgs
            .iter()
            .map(|m| {
                let h = headers(m);
                (
                    h.get("backfill.event_id").cloned().unwrap_or_default(),
                    h.get("backfill.reason").cloned().unwrap_or_default(),
                    h.get("backfill.attempt").cloned().unwrap_or_default(),
                )
            })
            .collect();
        let got_set: BTreeSet<_> = got.iter().cloned().collect();
        if got_set.len() != got.len() {
            errs.push(format!("{what}: a message arrived twice"));
        }
        let want_set: BTreeSet<_> = want
            .iter()
            .map(|(id, o)| (id.clone(), o.reason.clone(), o.attempt.to_string()))
            .collect();
        if got_set != want_set {
            errs.push(format!(
                "{what}: delivered {} messages, expected {}; missing {:?}; unexpected {:?}",
                got.len(),
                want_set.len(),
                want_set.difference(&got_set).take(5).collect::<Vec<_>>(),
                got_set.difference(&want_set).take(5).collect::<Vec<_>>()
            ));
        }
        if headers_run_ids(msgs) != BTreeSet::from([run_id.to_string()]) {
            errs.push(format!("{what}: run ids {:?}", headers_run_ids(msgs)));
        }
    }
    errs.extend(diff_per_key_order("replay", &replay_msgs, true));
    assert_no_diffs(&errs, &rerun);
}

fn headers_run_ids(msgs: &[OwnedMessage]) -> BTreeSet<String> {
    msgs.iter()
        .filter_map(|m| headers(m).get("backfill.run_id").cloned())
        .collect()
}

// --------------------------------------------------- the Kafka source

const WINDOW_FROM: &str = "2024-03-01T00:00:00Z";
const WINDOW_TO: &str = "2024-03-01T12:00:00Z";
const PERMANENT: &str = "^schema validation failed";

/// The hand-made events: what the topic still holds, and what only the
/// archive has (the lake for what Kafka no longer has).
fn source_rows() -> (Vec<Row>, Vec<Row>) {
    let failed = Some("failed");
    let done = Some("processed");
    let topic = vec![
        // k1: replay, resolved, max attempts, a NULL status after a gap
        Row::new("s01", "k1", 1, "2024-03-01T01:00:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s02", "k1", 2, "2024-03-01T02:00:00Z", done).attempts(0),
        Row::new("s03", "k1", 3, "2024-03-01T03:00:00Z", failed)
            .attempts(3)
            .error("timeout"),
        Row::new("s04", "k1", 5, "2024-03-01T04:00:00Z", None),
        // k2: a retried event (its first attempt only in the archive), a
        // sequence conflict, a permanent error
        Row::new("s05", "k2", 1, "2024-03-01T01:30:00Z", failed)
            .attempts(1)
            .error("timeout"),
        Row::new("s06", "k2", 2, "2024-03-01T02:00:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s07", "k2", 2, "2024-03-01T02:10:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s08", "k2", 3, "2024-03-01T03:00:00Z", failed)
            .attempts(0)
            .error("schema validation failed: amount"),
        // k3: in both places; processed later according to the archive;
        // outside the window on either side
        Row::new("s09", "k3", 1, "2024-03-01T05:00:00Z", failed)
            .attempts(1)
            .error("timeout"),
        Row::new("s10", "k3", 2, "2024-03-01T06:00:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s11", "k3", 3, "2024-02-29T23:00:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s12", "k3", 4, WINDOW_TO, failed)
            .attempts(0)
            .error("timeout"),
    ];
    let archive = vec![
        Row::new("s05", "k2", 1, "2024-03-01T01:00:00Z", failed)
            .attempts(0)
            .error("timeout"),
        Row::new("s09", "k3", 1, "2024-03-01T05:00:00Z", failed)
            .attempts(1)
            .error("timeout"),
        Row::new("s10", "k3", 2, "2024-03-01T06:30:00Z", done).attempts(1),
        Row::new("s13", "k3", 5, "2024-03-01T07:00:00Z", Some("pending")),
    ];
    (topic, archive)
}

/// The archive layout of these rows: the JSON messages' fields exactly.
fn source_layout() -> Layout {
    Layout::default().without(Col::Extra)
}

/// A row as the JSON the live producer would have sent.
fn row_json(r: &Row) -> Vec<u8> {
    let time = DateTime::from_timestamp_micros(r.event_time)
        .expect("test time")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::json!({
        "event_id": r.event_id,
        "key": r.key,
        "seq": r.seq,
        "event_time": time,
        "status": r.status,
        "attempts": r.attempts,
        "error": r.error,
        "payload": r.payload,
    })
    .to_string()
    .into_bytes()
}

/// Produce `(key, timestamp ms, value)` as they are, keyed like the live
/// producer (one key's events in one partition).
async fn produce(server: &KafkaServer, topic: &str, msgs: &[(String, i64, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &server.bootstrap)
        .create()
        .expect("test producer");
    for (key, ts_ms, value) in msgs {
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .timestamp(*ts_ms)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce a test message to {topic}: {e}"));
    }
}

/// What the reference model expects from `rows` in the window.
fn expected_from(rows: &[&[Row]], ledger: &Ledger) -> Expected {
    let mut sources: Vec<Source> = Vec::new();
    let mut dirs = Vec::new();
    for set in rows {
        let a = {
            let mut a = Archive::new();
            a.file("part-0.parquet", &source_layout(), set);
            a
        };
        sources.push(read_source(&a.path()));
        dirs.push(a);
    }
    let columns: BTreeSet<String> = sources.iter().flat_map(|s| s.columns.clone()).collect();
    let all = Source {
        files: Vec::new(),
        columns,
        rows: sources.into_iter().flat_map(|s| s.rows).collect(),
    };
    let cfg = Config {
        from: Some(ts(WINDOW_FROM) * 1000),
        to: Some(ts(WINDOW_TO) * 1000),
        permanent: vec![PERMANENT.to_string()],
        ..Config::default()
    };
    decide(&all, &cfg, ledger)
}

type Decisions = BTreeMap<String, (String, i64)>;

fn expected_decisions(exp: &Expected) -> (Decisions, Decisions) {
    let f = |m: &BTreeMap<String, crate::reference::Outcome>| {
        m.iter()
            .map(|(id, o)| (id.clone(), (o.reason.clone(), o.attempt)))
            .collect()
    };
    (f(&exp.replay), f(&exp.dlq))
}

/// `event_id → (reason, attempt)` of a Parquet output, and its undecodable
/// rows (no event id) apart.
fn output_decisions(rows: &[Record]) -> (Decisions, Vec<Record>) {
    let mut d = BTreeMap::new();
    let mut undecodable = Vec::new();
    for r in rows {
        if field(r, "backfill_reason").as_str() == Some("undecodable") {
            undecodable.push(r.clone());
            continue;
        }
        let id = field(r, "event_id")
            .as_str()
            .unwrap_or("<NULL>")
            .to_string();
        let reason = field(r, "backfill_reason")
            .as_str()
            .unwrap_or("")
            .to_string();
        let attempt = field(r, "backfill_attempt").as_int().unwrap_or(-1);
        d.insert(id, (reason, attempt));
    }
    (d, undecodable)
}

fn diff_report_counts(report: &Json, exp: &Expected) -> Vec<String> {
    let mut errs = Vec::new();
    for (key, want) in [
        ("rows", exp.rows),
        ("events", exp.events),
        ("resolved", exp.resolved),
        ("replayed", exp.replay.len()),
        ("dead_lettered", exp.dlq.len()),
        ("skipped_dead_lettered", exp.skipped.len()),
        ("conflicts", exp.conflicts),
        ("gaps", exp.gaps.len()),
    ] {
        let got = report.get(key).and_then(Json::as_i64);
        if got != Some(want as i64) {
            errs.push(format!("report: {key} = {got:?}, expected {want}"));
        }
    }
    errs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_alone_and_with_the_archive_decides_as_the_archive_would() {
    let server = services::kafka();
    let topic = unique_name("e2e-source");
    server.create_topic(&topic, 2).await;
    let (topic_rows, archive_rows) = source_rows();
    let mut msgs: Vec<(String, i64, Vec<u8>)> = topic_rows
        .iter()
        .map(|r| {
            (
                r.key.clone().unwrap_or_default(),
                r.event_time / 1000,
                row_json(r),
            )
        })
        .collect();
    // Undecodable: one inside the window, one after it.
    msgs.insert(
        5,
        (
            "k9".into(),
            ts("2024-03-01T08:00:00Z") / 1000,
            b"not json".to_vec(),
        ),
    );
    msgs.push((
        "k9".into(),
        ts("2024-03-02T08:00:00Z") / 1000,
        b"{\"also\": not json".to_vec(),
    ));
    produce(server, &topic, &msgs).await;
    let url = server.url(&topic);
    let in_window = topic_rows
        .iter()
        .filter(|r| r.event_time >= ts(WINDOW_FROM) && r.event_time < ts(WINDOW_TO))
        .count();

    let mut archive = Archive::new();
    archive.file(
        "dt=2024-03-01/part-0.parquet",
        &source_layout(),
        &archive_rows,
    );
    let work = tempfile::tempdir().expect("tempdir");
    let window = strings(&[
        "--from",
        WINDOW_FROM,
        "--to",
        WINDOW_TO,
        "--permanent-error",
        PERMANENT,
        "--progress",
        "off",
    ]);

    // 1. The topic alone, twice into one state.
    let out = work.path().join("topic-only");
    let mut ledger = Ledger::default();
    for (i, run_id) in ["src-1", "src-2"].into_iter().enumerate() {
        let report_path = work.path().join(format!("report-{run_id}.json"));
        let mut args = strings(&[
            "run",
            "--source",
            &url,
            "--out",
            &path_str(&out),
            "--run-id",
            run_id,
            "--report",
            &path_str(&report_path),
        ]);
        args.extend(window.iter().cloned());
        let run = run_bin(args).await;
        run.ok();
        let exp = expected_from(&[&topic_rows], &ledger);
        let (want_replay, want_dlq) = expected_decisions(&exp);
        assert!(
            !want_replay.is_empty() && (i > 0 || want_dlq.len() >= 3),
            "the hand-made events should replay and dead-letter: {exp:?}"
        );
        let (replay, replay_bad) = output_decisions(&read_output(&out.join("replay"), run_id).rows);
        let dlq_out = read_output(&out.join("dlq"), run_id);
        let (dlq, undecodable) = output_decisions(&dlq_out.rows);
        let report = read_json(&report_path);
        let mut errs = diff_report_counts(&report, &exp);
        if replay != want_replay {
            errs.push(format!("replay {replay:?}\n  expected {want_replay:?}"));
        }
        if dlq != want_dlq {
            errs.push(format!("dlq {dlq:?}\n  expected {want_dlq:?}"));
        }
        if !replay_bad.is_empty() {
            errs.push(format!("undecodable rows in the replay: {replay_bad:?}"));
        }
        if report_int(&report, "kafka_messages") != in_window as i64 + 1 {
            errs.push(format!(
                "report: kafka_messages {}, expected {} rows + 1 undecodable in the window",
                report["kafka_messages"], in_window
            ));
        }
        if i == 0 {
            // The undecodable message is dead-lettered, its bytes kept.
            if undecodable.len() != 1 {
                errs.push(format!("undecodable dead letters: {undecodable:?}"));
            } else {
                let u = &undecodable[0];
                let payload = match field(u, "payload") {
                    Value::Str(s) => s.as_bytes().to_vec(),
                    Value::Bytes(b) => b.clone(),
                    other => format!("{other:?}").into_bytes(),
                };
                if payload != b"not json" {
                    errs.push(format!("undecodable payload {payload:?}"));
                }
                if field(u, "kafka_topic").as_str() != Some(topic.as_str())
                    || field(u, "kafka_offset").is_null()
                    || field(u, "error").is_null()
                {
                    errs.push(format!("undecodable coordinates or error: {u:?}"));
                }
            }
            if report_int(&report, "undecodable_dead_lettered") != 1 {
                errs.push(format!("report: {report}"));
            }
            // Decoded rows carry where they were read.
            for r in &read_output(&out.join("replay"), run_id).rows {
                if field(r, "kafka_topic").as_str() != Some(topic.as_str())
                    || field(r, "kafka_offset").is_null()
                {
                    errs.push(format!("a replayed row lacks its coordinates: {r:?}"));
                }
            }
        } else {
            // Already in the DLQ: not dead-lettered a second time.
            if !undecodable.is_empty() {
                errs.push(format!("dead-lettered again: {undecodable:?}"));
            }
            if report_int(&report, "undecodable_skipped") != 1
                || report_int(&report, "undecodable_dead_lettered") != 0
            {
                errs.push(format!("report: {report}"));
            }
        }
        assert_no_diffs(&errs, &run);
        ledger.commit(&exp);
    }

    // 2. Hybrid: the archive and the topic as one union, the DLQ on a topic.
    let dlq_topic = unique_name("e2e-source-dlq");
    server.create_topic(&dlq_topic, 2).await;
    let out = work.path().join("hybrid");
    let report_path = work.path().join("report-hybrid.json");
    let mut args = strings(&[
        "run",
        "--source",
        &archive.source(),
        "--source",
        &url,
        "--out",
        &path_str(&out),
        "--dlq-sink",
        &server.url(&dlq_topic),
        "--run-id",
        "hybrid-1",
        "--report",
        &path_str(&report_path),
    ]);
    args.extend(window.iter().cloned());
    let run = run_bin(args).await;
    run.ok();
    let exp = expected_from(&[&topic_rows, &archive_rows], &Ledger::default());
    let (want_replay, want_dlq) = expected_decisions(&exp);
    // The union changes the decision: s10 is resolved by the archive, s13
    // exists only there, s05's archive row is its first attempt.
    assert!(!want_replay.contains_key("s10") && want_replay.contains_key("s13"));
    let (replay, _) = output_decisions(&read_output(&out.join("replay"), "hybrid-1").rows);
    let dlq_msgs = consume(
        server,
        &dlq_topic,
        want_dlq.len() + 1,
        Duration::from_secs(30),
    )
    .await;
    let mut dlq = BTreeMap::new();
    let mut undecodable = Vec::new();
    for m in &dlq_msgs {
        let h = headers(m);
        if h.get("backfill.reason").map(String::as_str) == Some("undecodable") {
            undecodable.push((m.payload().map(<[u8]>::to_vec), h));
            continue;
        }
        dlq.insert(
            h.get("backfill.event_id").cloned().unwrap_or_default(),
            (
                h.get("backfill.reason").cloned().unwrap_or_default(),
                h.get("backfill.attempt")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(-1),
            ),
        );
    }
    let report = read_json(&report_path);
    let mut errs = diff_report_counts(&report, &exp);
    if replay != want_replay {
        errs.push(format!(
            "hybrid replay {replay:?}\n  expected {want_replay:?}"
        ));
    }
    if dlq != want_dlq || dlq_msgs.len() != want_dlq.len() + 1 {
        errs.push(format!(
            "hybrid dlq ({} messages) {dlq:?}\n  expected {want_dlq:?} + 1 undecodable",
            dlq_msgs.len()
        ));
    }
    // The raw bytes are the dead letter's value, unchanged.
    match undecodable.as_slice() {
        [(Some(v), h)]
            if v == b"not json"
                && h.get("backfill.run_id").map(String::as_str) == Some("hybrid-1") => {}
        other => errs.push(format!("hybrid undecodable dead letters: {other:?}")),
    }
    assert_no_diffs(&errs, &run);
}

// ----------------------------------------------------- the health check

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_the_run_in_seconds_before_the_scan() {
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("archive");
    generate(&archive, 3000, 20, 5).await;
    let port = services::free_port();
    let out = work.path().join("out");
    let report = work.path().join("report.json");
    let start = Instant::now();
    let run = run_bin(strings(&[
        "run",
        "--source",
        &path_str(&archive),
        "--out",
        &path_str(&out),
        "--replay-sink",
        &format!("kafka://127.0.0.1:{port}/replay"),
        "--run-id",
        "unreachable",
        "--report",
        &path_str(&report),
        "--progress",
        "off",
    ]))
    .await;
    let took = start.elapsed();
    run.expect_code(1);
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}\n{}",
        run.describe()
    );
    let errors = error_lines(&run);
    assert_eq!(errors.len(), 1, "{}", run.describe());
    assert!(
        errors[0].contains(&format!("127.0.0.1:{port}")),
        "the error names the brokers\n{}",
        run.describe()
    );
    // Before the scan: nothing was written anywhere, nothing committed.
    let written: Vec<PathBuf> = crate::e2e::snapshot(&out).into_keys().collect();
    assert!(written.is_empty(), "{written:?}\n{}", run.describe());
    assert!(!report.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_a_configuration_error_naming_it() {
    let server = services::kafka();
    let work = tempfile::tempdir().expect("tempdir");
    let mut archive = Archive::new();
    archive.rows(
        "part-0.parquet",
        &[Row::new(
            "m1",
            "k",
            1,
            "2024-03-01T01:00:00Z",
            Some("failed"),
        )],
    );
    let topic = unique_name("e2e-absent");
    let out = work.path().join("out");
    let start = Instant::now();
    let run = run_bin(strings(&[
        "run",
        "--source",
        &archive.source(),
        "--out",
        &path_str(&out),
        "--dlq-sink",
        &server.url(&topic),
        "--run-id",
        "absent",
        "--progress",
        "off",
    ]))
    .await;
    run.expect_code(2);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{}",
        run.describe()
    );
    let errors = error_lines(&run);
    assert_eq!(errors.len(), 1, "{}", run.describe());
    assert!(errors[0].contains(&topic), "{}", run.describe());
    assert!(manifests(&out.join("_state")).is_empty());
}

// ------------------------------------------------ jobs/kafka-replay.toml

/// The example job as a user runs it: the archive in a bucket, the replay
/// and DLQ topics out, the gaps and the state in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_replay_job_file_runs_against_s3_and_the_broker() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let job = repo.join("jobs/kafka-replay.toml");
    let s3 = services::start_s3_private();
    s3.create_bucket("backfill");
    let kafka = services::start_kafka_private();
    kafka.create_topic("orders.replay", 3).await;
    kafka.create_topic("orders.dlq", 3).await;
    let mut env: Vec<(String, String)> = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("KAFKA_BROKERS".into(), kafka.bootstrap.clone()));
    let run_with_env = |args: Vec<String>| {
        let env = env.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            crate::cli::backfill_in(&args, &env, None)
        })
    };
    run_with_env(strings(&[
        "generate",
        "--out",
        "s3://backfill/archive",
        "--events",
        "3000",
        "--keys",
        "20",
        "--days",
        "3",
    ]))
    .await
    .expect("generate")
    .ok();
    let work = tempfile::tempdir().expect("tempdir");
    let report_path = work.path().join("report.json");
    let run_id = "orders-20240102";
    let run = run_with_env(strings(&[
        "run",
        "--job",
        &path_str(&job),
        "--run-id",
        run_id,
        "--from",
        "2024-01-02T00:00:00Z",
        "--to",
        "2024-01-03T00:00:00Z",
        "--report",
        &path_str(&report_path),
        "--progress",
        "off",
    ]))
    .await
    .expect("run");
    run.ok();
    let report = read_json(&report_path);
    let replayed = report_int(&report, "replayed") as usize;
    let dead = report_int(&report, "dead_lettered") as usize;
    assert!(replayed > 0 && dead > 0, "{report}");
    assert!(
        report_int(&report, "files_pruned") > 0,
        "the window prunes the other days: {report}"
    );
    let within = Duration::from_secs(30);
    let replay = consume(&kafka, "orders.replay", replayed, within).await;
    let dlq = consume(&kafka, "orders.dlq", dead, within).await;
    assert_eq!(replay.len(), replayed, "{}", run.describe());
    assert_eq!(dlq.len(), dead, "{}", run.describe());
    let mut errs = diff_per_key_order("replay", &replay, true);
    errs.extend(diff_per_key_order("dlq", &dlq, false));
    if headers_run_ids(&replay) != BTreeSet::from([run_id.to_string()]) {
        errs.push(format!("replay run ids {:?}", headers_run_ids(&replay)));
    }
    let bucket = s3.root.join("backfill/kafka-replay");
    let gaps = read_output(&bucket.join("gaps"), run_id);
    if gaps.rows.len() as i64 != report_int(&report, "gaps") {
        errs.push(format!("gaps in the bucket: {}", gaps.rows.len()));
    }
    if manifests(&bucket.join("_state")).len() != 1 {
        errs.push(format!("manifests {:?}", manifests(&bucket.join("_state"))));
    }
    if run.stdout.contains(&s3.secret_key) || run.stderr.contains(&s3.secret_key) {
        errs.push("the secret key was printed".into());
    }
    assert_no_diffs(&errs, &run);
}

/// A remapped key column: replays and gap records are still keyed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_keyed_by_a_remapped_key_column() {
    let server = services::kafka();
    let (replay_t, gaps_t) = (unique_name("e2e-rkey"), unique_name("e2e-gkey"));
    server.create_topic(&replay_t, 2).await;
    server.create_topic(&gaps_t, 2).await;
    let mut archive = Archive::new();
    archive.file(
        "part-0.parquet",
        &Layout::default().renamed(Col::Key, "order_id"),
        &[
            Row::new("r1", "o-1", 1, "2024-03-01T01:00:00Z", Some("failed")),
            Row::new("r2", "o-1", 4, "2024-03-01T02:00:00Z", Some("failed")),
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let run = run_bin(strings(&[
        "run",
        "--source",
        &archive.source(),
        "--column",
        "key=order_id",
        "--state",
        &path_str(&work.path().join("state")),
        "--replay-sink",
        &server.url(&replay_t),
        "--dlq-sink",
        &path_str(&work.path().join("dlq")),
        "--gaps-sink",
        &server.url(&gaps_t),
        "--run-id",
        "remapped",
        "--progress",
        "off",
    ]))
    .await;
    run.ok();
    let within = Duration::from_secs(30);
    let replays = consume(server, &replay_t, 2, within).await;
    let gaps = consume(server, &gaps_t, 1, within).await;
    assert_eq!((replays.len(), gaps.len()), (2, 1), "{}", run.describe());
    for m in replays.iter().chain(&gaps) {
        assert_eq!(m.key(), Some(&b"o-1"[..]), "{}", run.describe());
        assert_eq!(
            headers(m).get("backfill.key").map(String::as_str),
            Some("o-1")
        );
    }
}
