//! Gap recovery (`run --recover-from kafka://...`) against a real broker
//! (Tansu): a gap whose events the topic still holds is `recoverable` and
//! its events are replayed in the run, in seq order among the key's other
//! replays, with their Kafka coordinates; one with some of them is
//! `partial`, one with none `lost`; a rerun writes nothing, a later run
//! does not send recovered events again; `--on-gap hold` holds a key only
//! at a gap that stays open; an unreachable topic fails the run before the
//! scan. The report balances in every run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value as Json;

use crate::archive::{Archive, Row, ts};
use crate::cli::{Run, backfill};
use crate::kafka::headers;
use crate::reference::{Record, Value, read_output};
use crate::services::{self, KafkaServer, unique_name};

fn t(min: u32) -> String {
    format!("2024-01-01T10:{min:02}:00Z")
}

/// key a: 1 processed, 2, (3, 4 missing), 5, 6 — the topic holds a3, a4.
/// key b: 1, (2, 3, 4 missing), 5 — the topic holds b2 and b4, not b3.
/// key c: 1, (2 missing), 3 — the topic holds only c3, a later event.
fn archive() -> Archive {
    let failed = |id: &str, key: &str, seq: i64, min: u32| {
        Row::new(id, key, seq, &t(min), Some("failed")).error("timeout")
    };
    let mut a = Archive::new();
    a.rows(
        "part-0.parquet",
        &[
            Row::new("a1", "a", 1, &t(0), Some("processed")),
            failed("a2", "a", 2, 1),
            failed("a5", "a", 5, 4),
            failed("a6", "a", 6, 5),
            failed("b1", "b", 1, 10),
            failed("b5", "b", 5, 14),
            failed("c1", "c", 1, 20),
            failed("c3", "c", 3, 22),
        ],
    );
    a
}

/// The topic's messages, as the live producer sent them (no processing
/// status): (event_id, key, seq, minute).
const TOPIC: &[(&str, &str, i64, u32)] = &[
    ("a1", "a", 1, 0),
    ("a3", "a", 3, 2),
    ("a4", "a", 4, 3),
    // Sent twice by the producer: one event.
    ("a4", "a", 4, 3),
    ("a5", "a", 5, 4),
    ("b2", "b", 2, 11),
    ("b4", "b", 4, 13),
    ("c3", "c", 3, 22),
];

async fn produce(server: &KafkaServer, topic: &str) {
    server.create_topic(topic, 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &server.bootstrap)
        .create()
        .expect("test producer");
    for (id, key, seq, min) in TOPIC {
        let value = serde_json::json!({
            "event_id": id, "key": key, "seq": seq, "event_time": t(*min),
            "payload": format!("{{\"body\":\"{id}\"}}"),
        })
        .to_string();
        producer
            .send(
                FutureRecord::to(topic)
                    .key(*key)
                    .timestamp(ts(&t(*min)) / 1000)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }
}

struct Outcome {
    run: Run,
    report: Json,
    replay: Vec<Record>,
    gaps: Vec<Record>,
}

async fn run(source: &str, out: &Path, run_id: &str, extra: &[String]) -> Outcome {
    let report_path = out.with_extension(format!("{run_id}.json"));
    let mut args: Vec<String> = [
        "run",
        "--source",
        source,
        "--out",
        &out.display().to_string(),
        "--run-id",
        run_id,
        "--progress",
        "off",
        "--report",
        &report_path.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let run = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        backfill(&a)
    })
    .await
    .expect("runner");
    run.ok();
    let report: Json =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    balances(&report, &run);
    Outcome {
        replay: read_output(&out.join("replay"), run_id).rows,
        gaps: read_output(&out.join("gaps"), run_id).rows,
        run,
        report,
    }
}

#[track_caller]
fn balances(r: &Json, run: &Run) {
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(
        n("events"),
        n("resolved") + n("replayed") + n("dead_lettered") + n("skipped_dead_lettered") + n("held"),
        "{}",
        run.describe()
    );
}

fn text(r: &Record, c: &str) -> Option<String> {
    match r.get(c) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

fn ids(rows: &[Record]) -> Vec<String> {
    rows.iter().map(|r| text(r, "event_id").unwrap()).collect()
}

/// (key, recovery class) of the gap rows.
fn classes(rows: &[Record]) -> BTreeMap<String, String> {
    rows.iter()
        .map(|r| (text(r, "key").unwrap(), text(r, "recovery").unwrap()))
        .collect()
}

fn recover_args(url: &str, more: &[&str]) -> Vec<String> {
    let mut v = vec!["--recover-from".to_string(), url.to_string()];
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_classified_and_their_events_replayed_once_in_order() {
    let server = services::kafka();
    let topic = unique_name("recover");
    produce(server, &topic).await;
    let url = server.url(&topic);
    let a = archive();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");

    // A dry run reads the topic and reports, and writes nothing.
    let dry = run(
        &a.source(),
        &out,
        "rec-0",
        &recover_args(&url, &["--dry-run"]),
    )
    .await;
    assert_eq!(dry.report["recovered"].as_u64(), Some(4), "{}", dry.report);
    assert_eq!(dry.report["replayed"].as_u64(), Some(11), "{}", dry.report);
    assert!(dry.replay.is_empty() && dry.gaps.is_empty());
    assert!(
        !out.join("_state").join("log").exists(),
        "{}",
        dry.run.describe()
    );

    let first = run(&a.source(), &out, "rec-1", &recover_args(&url, &[])).await;
    let r = &first.report;
    assert_eq!(
        (
            r["gaps"].as_u64(),
            r["gaps_recoverable"].as_u64(),
            r["gaps_partial"].as_u64(),
            r["gaps_lost"].as_u64()
        ),
        (Some(3), Some(1), Some(1), Some(1)),
        "{r}"
    );
    assert_eq!(
        r["recovered"].as_u64(),
        Some(4),
        "a3, a4 (sent twice), b2, b4: {r}"
    );
    assert_eq!(r["recovered_skipped"].as_u64(), Some(0), "{r}");
    assert_eq!(r["events"].as_u64(), Some(8 + 4), "{r}");
    let want: BTreeMap<String, String> = [("a", "recoverable"), ("b", "partial"), ("c", "lost")]
        .iter()
        .map(|(k, c)| (k.to_string(), c.to_string()))
        .collect();
    assert_eq!(classes(&first.gaps), want, "{}", first.run.describe());
    // Every unresolved event, the recovered ones in their keys' seq order.
    assert_eq!(
        ids(&first.replay),
        [
            "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b4", "b5", "c1", "c3"
        ],
        "{}",
        first.run.describe()
    );
    for row in &first.replay {
        let id = text(row, "event_id").unwrap();
        let recovered = ["a3", "a4", "b2", "b4"].contains(&id.as_str());
        assert_eq!(
            text(row, "kafka_topic").as_deref(),
            recovered.then_some(topic.as_str()),
            "{id}: {row:?}"
        );
        for c in ["kafka_partition", "kafka_offset", "kafka_timestamp"] {
            assert_eq!(
                !matches!(row.get(c), Some(Value::Null) | None),
                recovered,
                "{id} {c}: {row:?}"
            );
        }
        if recovered {
            assert_eq!(row["backfill_attempt"].as_int(), Some(1), "{row:?}");
            let want_ts = ts(&t(TOPIC.iter().find(|m| m.0 == id).unwrap().3)) * 1000;
            assert_eq!(row["kafka_timestamp"], Value::Ts(want_ts), "{id}");
        }
    }

    // The same run id again: committed, nothing written.
    let again = run(&a.source(), &out, "rec-1", &recover_args(&url, &[])).await;
    assert_eq!(again.report["already_committed"].as_bool(), Some(true));
    assert_eq!(read_output(&out.join("replay"), "rec-1").files.len(), 1);

    // A later run: the archive's unresolved events are retried, the
    // recovered ones (replayed by rec-1, per the ledger) are not.
    let later = run(&a.source(), &out, "rec-2", &recover_args(&url, &[])).await;
    let r = &later.report;
    assert_eq!(r["recovered"].as_u64(), Some(4), "{r}");
    assert_eq!(r["recovered_skipped"].as_u64(), Some(4), "{r}");
    assert_eq!(r["events"].as_u64(), Some(8), "{r}");
    assert_eq!(
        ids(&later.replay),
        ["a2", "a5", "a6", "b1", "b5", "c1", "c3"],
        "{}",
        later.run.describe()
    );
    assert!(
        later
            .replay
            .iter()
            .all(|r| r["backfill_attempt"].as_int() == Some(2))
    );
    assert_eq!(classes(&later.gaps), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_gap_hold_holds_a_key_only_at_a_gap_that_stays_open() {
    let server = services::kafka();
    let topic = unique_name("recover-hold");
    produce(server, &topic).await;
    let url = server.url(&topic);
    let a = archive();
    let work = tempfile::tempdir().unwrap();

    // Without recovery: every key is held after its first gap.
    let plain = run(
        &a.source(),
        &work.path().join("plain"),
        "hold-0",
        &["--on-gap".into(), "hold".into()],
    )
    .await;
    assert_eq!(
        plain.report["held"].as_u64(),
        Some(4),
        "a5 a6 b5 c3: {}",
        plain.report
    );

    let out = work.path().join("out");
    let held = run(
        &a.source(),
        &out,
        "hold-1",
        &recover_args(&url, &["--on-gap", "hold"]),
    )
    .await;
    // a's gap is filled: nothing of a is held. b's is partial: b2 and b4
    // come back, b3 does not, so b4 (recovered) and b5 are held; c's is lost.
    assert_eq!(
        ids(&held.replay),
        ["a2", "a3", "a4", "a5", "a6", "b1", "b2", "c1"],
        "{}",
        held.run.describe()
    );
    assert_eq!(held.report["held"].as_u64(), Some(3), "{}", held.report);
    assert_eq!(
        held.report["held_by_reason"]["held_by_gap"].as_u64(),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_replays_reach_a_kafka_sink_in_seq_order_with_their_origin() {
    let server = services::kafka();
    let topic = unique_name("recover-src");
    produce(server, &topic).await;
    let replay_topic = unique_name("recover-replay");
    server.create_topic(&replay_topic, 3).await;
    let a = archive();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let extra = recover_args(
        &server.url(&topic),
        &["--replay-sink", &server.url(&replay_topic)],
    );
    let o = run(&a.source(), &out, "rec-k", &extra).await;
    assert_eq!(o.report["replayed"].as_u64(), Some(11), "{}", o.report);
    let msgs =
        crate::kafka::consume(server, &replay_topic, false, 11, Duration::from_secs(30)).await;
    assert_eq!(msgs.len(), 11);
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in &msgs {
        let h = headers(m);
        let id = h["backfill.event_id"].clone();
        by_key
            .entry(h["backfill.key"].clone())
            .or_default()
            .push(h["backfill.seq"].parse().unwrap());
        let recovered = ["a3", "a4", "b2", "b4"].contains(&id.as_str());
        assert_eq!(
            h.get("backfill.original.topic").map(String::as_str),
            recovered.then_some(topic.as_str()),
            "{id}: {h:?}"
        );
        for k in ["partition", "offset", "timestamp"] {
            assert_eq!(
                h.contains_key(&format!("backfill.original.{k}")),
                recovered,
                "{id}: {h:?}"
            );
        }
        if recovered {
            let min = TOPIC.iter().find(|t| t.0 == id).unwrap().3;
            assert_eq!(
                h["backfill.original.timestamp"],
                (ts(&t(min)) / 1000).to_string()
            );
            assert_eq!(
                m.payload(),
                Some(format!("{{\"body\":\"{id}\"}}").as_bytes())
            );
        }
    }
    let want: BTreeMap<String, Vec<i64>> = [
        ("a", vec![2, 3, 4, 5, 6]),
        ("b", vec![1, 2, 4, 5]),
        ("c", vec![1, 3]),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    assert_eq!(by_key, want, "each key's replays in seq order");
}

#[test]
fn an_unreachable_recovery_topic_fails_before_the_scan_and_commits_nothing() {
    let a = archive();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let port = services::free_port();
    let url = format!("kafka://127.0.0.1:{port}/events");
    let run = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out.display().to_string(),
        "--recover-from",
        &url,
        "--progress",
        "off",
    ]);
    run.expect_code(1);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.describe());
    assert!(
        errors[0].contains(&url),
        "names the URL: {}",
        run.describe()
    );
    let log = out.join("_state").join("log");
    let entries = std::fs::read_dir(&log).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 0, "nothing committed: {}", run.describe());
    assert!(read_output(&out.join("replay"), "x").rows.is_empty());
}

#[test]
fn recover_from_needs_a_kafka_url_and_gap_detection() {
    let a = archive();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out").display().to_string();
    let src = a.source();
    let bad = backfill(&[
        "run",
        "--source",
        &src,
        "--out",
        &out,
        "--recover-from",
        "/tmp/x",
    ]);
    bad.expect_code(2);
    assert!(bad.stderr.contains("--recover-from"), "{}", bad.describe());
    let off = backfill(&[
        "run",
        "--source",
        &src,
        "--out",
        &out,
        "--recover-from",
        "kafka://127.0.0.1:9/t",
        "--no-gaps",
    ]);
    off.expect_code(2);
    assert!(off.stderr.contains("gap detection"), "{}", off.describe());
}

/// What a topic may hold besides the missing events, none of which may be
/// replayed: a missing seq under two event ids (3), a missing seq under an
/// id the archive already holds and another (4: the archived id, dropped,
/// still contests it), a message without an event id (5), and one id under
/// two missing seqs (5 and 6). Only d2 comes back; d's gap (2-6) is
/// partial, and d1 is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_known_and_idless_messages_recover_nothing() {
    let server = services::kafka();
    let topic = unique_name("recover-hostile");
    server.create_topic(&topic, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &server.bootstrap)
        .create()
        .expect("test producer");
    let messages: &[(Option<&str>, i64, u32)] = &[
        (Some("d2"), 2, 31),
        (Some("d3"), 3, 32),
        (Some("x3"), 3, 32),
        (Some("d1"), 4, 33),
        (Some("z4"), 4, 33),
        (None, 5, 34),
        (Some("w6"), 5, 34),
        (Some("w6"), 6, 35),
    ];
    for (id, seq, min) in messages {
        let mut value = serde_json::json!({
            "key": "d", "seq": seq, "event_time": t(*min), "payload": "{}",
        });
        if let Some(id) = id {
            value["event_id"] = Json::from(*id);
        }
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("d")
                    .timestamp(ts(&t(*min)) / 1000)
                    .payload(&value.to_string()),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }
    let mut a = Archive::new();
    a.rows(
        "part-0.parquet",
        &[
            Row::new("d1", "d", 1, &t(30), Some("processed")),
            Row::new("d7", "d", 7, &t(36), Some("failed")).error("timeout"),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let out = run(
        &a.source(),
        &work.path().join("out"),
        "hostile",
        &recover_args(&server.url(&topic), &[]),
    )
    .await;
    assert_eq!(ids(&out.replay), ["d2", "d7"], "{}", out.run.describe());
    assert_eq!(
        classes(&out.gaps),
        BTreeMap::from([("d".to_string(), "partial".to_string())])
    );
    assert_eq!(out.report["events"].as_u64(), Some(3), "{}", out.report);
    assert_eq!(out.report["recovered"].as_u64(), Some(1), "{}", out.report);
}
