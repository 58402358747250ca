//! Compacted Kafka output (`[kafka] compact = true`, `state-at --compact`)
//! against Tansu: one message per key carrying its latest state,
//! tombstones for deleted keys, the topic created with
//! `cleanup.policy=compact` (read back through rdkafka's admin API), and an
//! existing topic that is not compacted refused; a run's sink with
//! `compact = true` refused (its rows must each arrive).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;

use crate::archive::{Archive, Row};
use crate::cli::backfill;
use crate::kafka::consume;
use crate::services::{self, KafkaServer, unique_name};

/// Keys a (latest before T: a-2), b (latest before T: deleted), c (one
/// event), and an unprocessed a-4 that must not count.
fn archive() -> Archive {
    let p = Some("processed");
    let mut a = Archive::new();
    a.rows(
        "dt=2024-05-01/part-0.parquet",
        &[
            Row::new("a-1", "a", 1, "2024-05-01T10:00:00Z", p),
            Row::new("a-2", "a", 2, "2024-05-01T11:00:00Z", p),
            Row::new("a-4", "a", 4, "2024-05-01T11:30:00Z", Some("failed")),
            Row::new("a-3", "a", 3, "2024-05-01T12:30:00Z", p),
            Row::new("b-1", "b", 1, "2024-05-01T09:00:00Z", p),
            Row::new("b-2", "b", 2, "2024-05-01T10:00:00Z", Some("deleted")),
            Row::new("c-1", "c", 1, "2024-05-01T10:00:00Z", p),
        ],
    );
    a
}

async fn cleanup_policy(server: &KafkaServer, topic: &str) -> String {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &server.bootstrap)
        .create()
        .expect("admin client");
    let r = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let res = r
        .into_iter()
        .next()
        .expect("one resource")
        .expect("described");
    res.entries
        .iter()
        .find(|e| e.name == "cleanup.policy")
        .and_then(|e| e.value.clone())
        .unwrap_or_default()
}

fn job(dir: &std::path::Path, extra: &str) -> String {
    let path = dir.join(format!("{}.toml", unique_name("job")));
    std::fs::write(
        &path,
        format!("done_statuses = [\"processed\", \"deleted\"]\n[kafka]\n{extra}\n"),
    )
    .expect("job file");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_at_to_a_compacted_topic_one_message_per_key_and_tombstones() {
    let server = services::kafka();
    let a = archive();
    let tmp = tempfile::tempdir().expect("tempdir");
    let topic = unique_name("state-compact");
    let job = job(tmp.path(), "allow_auto_create_topics = true");
    let src = a.source();
    let url = server.url(&topic);
    let run = tokio::task::spawn_blocking(move || {
        backfill(&[
            "state-at",
            "--job",
            &job,
            "--source",
            &src,
            "--at",
            "2024-05-01T12:00:00Z",
            "--sink",
            &url,
            "--compact",
        ])
    })
    .await
    .expect("join");
    run.ok();
    assert_eq!(cleanup_policy(server, &topic).await, "compact");
    let msgs = consume(server, &topic, false, 3, Duration::from_secs(20)).await;
    let by_key: BTreeMap<String, Option<String>> = msgs
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().expect("keyed")).into_owned(),
                m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
            )
        })
        .collect();
    assert_eq!(msgs.len(), 3, "{by_key:?}\n{}", run.describe());
    assert_eq!(
        by_key,
        BTreeMap::from([
            ("a".to_string(), Some("{\"body\":\"a-2\"}".to_string())),
            ("b".to_string(), None),
            ("c".to_string(), Some("{\"body\":\"c-1\"}".to_string())),
        ])
    );
}

/// A run's replays must each arrive (the ledger records every one as
/// sent): `compact = true` on a run's Kafka sink is refused before anything
/// is read, and nothing is committed or created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_to_a_compacted_topic_is_refused() {
    let server = services::kafka();
    let topic = unique_name("replay-compact");
    let mut a = Archive::new();
    a.rows(
        "dt=2024-05-01/part-0.parquet",
        &[
            Row::new("k1-1", "k1", 1, "2024-05-01T10:00:00Z", Some("failed")),
            Row::new("k1-2", "k1", 2, "2024-05-01T10:01:00Z", Some("failed")),
        ],
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = job(
        tmp.path(),
        "allow_auto_create_topics = true\ncompact = true",
    );
    let out = tmp.path().join("out");
    let out_s = out.display().to_string();
    let src = a.source();
    let url = server.url(&topic);
    let run = tokio::task::spawn_blocking(move || {
        backfill(&[
            "run",
            "--job",
            &job,
            "--source",
            &src,
            "--out",
            &out_s,
            "--replay-sink",
            &url,
        ])
    })
    .await
    .expect("join");
    run.expect_error(
        2,
        "[kafka] compact = true sends one message per key, but every replay row must arrive",
    );
    assert!(!out.join("_state").exists(), "nothing committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_that_is_not_compacted_is_refused() {
    let server = services::kafka();
    let topic = unique_name("not-compacted");
    server.create_topic(&topic, 1).await;
    let a = archive();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = job(tmp.path(), "");
    let src = a.source();
    let url = server.url(&topic);
    let run = tokio::task::spawn_blocking(move || {
        backfill(&[
            "state-at",
            "--job",
            &job,
            "--source",
            &src,
            "--at",
            "2024-05-01T12:00:00Z",
            "--sink",
            &url,
            "--compact",
        ])
    })
    .await
    .expect("join");
    run.expect_code(2);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.describe());
    assert!(
        errors[0].contains(&topic) && errors[0].contains("cleanup.policy=compact"),
        "{}",
        run.describe()
    );
    let msgs = consume(server, &topic, false, 0, Duration::from_secs(3)).await;
    assert!(msgs.is_empty(), "nothing may be sent: {}", msgs.len());
}

#[test]
fn compact_needs_a_kafka_sink() {
    let a = archive();
    let run = backfill(&[
        "state-at",
        "--source",
        &a.source(),
        "--at",
        "2024-05-01T12:00:00Z",
        "--compact",
    ]);
    run.expect_code(2);
    assert!(
        run.stderr
            .contains("error: --compact: the sink - is not a kafka:// topic"),
        "{}",
        run.describe()
    );
}
