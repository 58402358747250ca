//! The Redis sink against a real redis-server (tests/it/services.rs):
//! replays appended to a stream and read back with XRANGE, MAXLEN trimming,
//! state-at hashes with a TTL, a server killed mid-run (exit 1, nothing
//! committed, a rerun delivers), and credentials never shown.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::archive::{Archive, Row};
use crate::cli::{backfill, backfill_in, command, wait};
use crate::e2e::manifests;
use crate::services::{self, unique_name};

/// `n` unprocessed events over 4 keys: every one is replayed (no attempts).
fn failing_archive(n: i64) -> Archive {
    let rows: Vec<Row> = (0..n)
        .map(|i| {
            let key = format!("k{}", i % 4);
            Row::new(
                &format!("e-{i:04}"),
                &key,
                i / 4 + 1,
                &format!("2024-05-01T10:{:02}:{:02}Z", i / 60, i % 60),
                Some("failed"),
            )
        })
        .collect();
    let mut a = Archive::new();
    a.rows("dt=2024-05-01/part-0.parquet", &rows);
    a
}

type Entry = (String, BTreeMap<String, String>);
/// XRANGE's reply: per entry its id and its field/value pairs.
type RawEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Every entry of `stream`, in order: id and fields.
fn xrange(conn: &mut redis::Connection, stream: &str) -> Vec<Entry> {
    let raw: RawEntries = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE");
    raw.into_iter()
        .map(|(id, fields)| {
            (
                id,
                fields
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect(),
            )
        })
        .collect()
}

fn xlen(conn: &mut redis::Connection, stream: &str) -> u64 {
    redis::cmd("XLEN").arg(stream).query(conn).expect("XLEN")
}

#[test]
fn replays_appended_to_a_stream_equal_the_replays() {
    let server = services::redis();
    let a = failing_archive(23);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let stream = unique_name("replays");
    let sink = format!("{}/3?stream={stream}&batch=5", server.url());
    let run = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &out.display().to_string(),
        "--replay-sink",
        &sink,
        "--run-id",
        "redis-1",
        "--no-gaps",
    ]);
    run.ok();
    assert_eq!(
        manifests(&out.join("_state")).len(),
        1,
        "{}",
        run.describe()
    );
    let mut conn = redis::Client::open(format!("{}/3", server.url()))
        .and_then(|c| c.get_connection())
        .expect("connect");
    let entries = xrange(&mut conn, &stream);
    assert_eq!(entries.len(), 23, "{}", run.describe());
    let mut ids: Vec<String> = entries
        .iter()
        .map(|(_, f)| f["backfill.event_id"].clone())
        .collect();
    ids.sort();
    let want: Vec<String> = (0..23).map(|i| format!("e-{i:04}")).collect();
    assert_eq!(ids, want);
    for (_, f) in &entries {
        let id = &f["backfill.event_id"];
        assert_eq!(f["backfill.run_id"], "redis-1");
        assert_eq!(f["backfill.reason"], "unprocessed", "{f:?}");
        assert_eq!(f["backfill.attempt"], "1", "{f:?}");
        assert!(f["backfill.key"].starts_with('k'), "{f:?}");
        assert!(f.contains_key("backfill.seq"), "{f:?}");
        assert_eq!(f["payload"], format!("{{\"body\":\"{id}\"}}"));
    }
    // DB 0 holds nothing of it.
    assert_eq!(xlen(&mut server.client(), &stream), 0);
}

#[test]
fn maxlen_trims_the_stream() {
    let server = services::redis();
    let a = failing_archive(120);
    let tmp = tempfile::tempdir().expect("tempdir");
    let stream = unique_name("trimmed");
    let sink = format!("{}?stream={stream}&maxlen=10&batch=25", server.url());
    let run = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &tmp.path().join("out").display().to_string(),
        "--replay-sink",
        &sink,
        "--no-gaps",
    ]);
    run.ok();
    assert!(run.stdout.contains("120 replays"), "{}", run.describe());
    let mut conn = server.client();
    let n = xlen(&mut conn, &stream);
    // Approximate: whole nodes (10 entries here) are dropped.
    assert!((10..=20).contains(&n), "XLEN {n}");
    let entries = xrange(&mut conn, &stream);
    assert_eq!(entries.len() as u64, n);
}

#[test]
fn state_at_writes_hashes_with_a_ttl() {
    let server = services::redis();
    let a = crate::state_at::archive();
    let prefix = format!("{}:", unique_name("state"));
    let sink = format!("{}?hash_prefix={prefix}&ttl=600", server.url());
    let run = backfill(&[
        "state-at",
        "--source",
        &a.source(),
        "--at",
        crate::state_at::T,
        "--sink",
        &sink,
    ]);
    run.ok();
    let mut conn = server.client();
    let h: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}a"))
        .query(&mut conn)
        .expect("HGETALL");
    assert_eq!(h.get("event_id").map(String::as_str), Some("a-2"), "{h:?}");
    assert_eq!(h.get("seq").map(String::as_str), Some("2"), "{h:?}");
    assert_eq!(h.get("status").map(String::as_str), Some("processed"));
    assert_eq!(
        h.get("payload").map(String::as_str),
        Some("{\"body\":\"a-2\"}")
    );
    let b: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}b"))
        .query(&mut conn)
        .expect("HGETALL");
    assert_eq!(b.get("event_id").map(String::as_str), Some("b-3"));
    for k in ["a", "b"] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{prefix}{k}"))
            .query(&mut conn)
            .expect("TTL");
        assert!((1..=600).contains(&ttl), "TTL of {k}: {ttl}");
    }
    // No state at T, no hash.
    let c: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}c"))
        .query(&mut conn)
        .expect("EXISTS");
    assert_eq!(c, 0);
}

#[test]
fn a_redis_killed_mid_run_fails_the_run_and_a_rerun_delivers() {
    let mut server = services::start_redis_private();
    let a = failing_archive(40);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let state = out.join("_state");
    let stream = "replays";
    let sink = format!("{}?stream={stream}&batch=5", server.url());
    let out_s = out.display().to_string();
    let src = a.source();
    let args = [
        "run",
        "--source",
        &src,
        "--out",
        &out_s,
        "--replay-sink",
        &sink,
        "--run-id",
        "killed",
        "--no-gaps",
    ];
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_backfill")), &args);
    // After the first pipeline: 5 entries acknowledged, then a pause in
    // which the server is killed.
    cmd.env("BACKFILL_FAILPOINT", "redis_after_batch:sleep-5000@1");
    let child = cmd.spawn().expect("spawn backfill");
    let mut conn = server.client();
    let start = Instant::now();
    while xlen(&mut conn, stream) < 5 {
        assert!(start.elapsed() < Duration::from_secs(60), "no first batch");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let run = wait(child, &args);
    run.expect_code(1);
    assert!(
        run.stderr.contains("error: replay sink redis://127.0.0.1:"),
        "{}",
        run.describe()
    );
    assert!(
        manifests(&state).is_empty(),
        "committed: {}",
        run.describe()
    );

    server.restart();
    let rerun = backfill_in(&args, &[], None);
    rerun.ok();
    assert_eq!(manifests(&state).len(), 1, "{}", rerun.describe());
    let mut conn = server.client();
    assert_eq!(xlen(&mut conn, stream), 40, "{}", rerun.describe());
}

/// The stream and maxlen are settings of the run: a committed run id rerun
/// to another stream is another run under a taken name (exit 2), not
/// "already done" with nothing sent.
#[test]
fn a_rerun_to_another_stream_is_refused() {
    let server = services::redis();
    let a = failing_archive(5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out").display().to_string();
    let stream = unique_name("rerun");
    let run = |sink: &str| {
        backfill(&[
            "run",
            "--source",
            &a.source(),
            "--out",
            &out,
            "--replay-sink",
            sink,
            "--run-id",
            "redis-rerun",
            "--no-gaps",
        ])
    };
    run(&format!("{}?stream={stream}&maxlen=100", server.url())).ok();
    // The same settings however spelled: already done, nothing sent.
    run(&format!("{}?maxlen=100&stream={stream}", server.url())).ok();
    run(&format!("{}?stream={stream}-2&maxlen=100", server.url()))
        .expect_error(2, "this run has --replay-sink");
    run(&format!("{}?stream={stream}&maxlen=10", server.url()))
        .expect_error(2, "this run has --replay-sink");
    assert_eq!(xlen(&mut server.client(), &format!("{stream}-2")), 0);
    assert_eq!(xlen(&mut server.client(), &stream), 5);
}

#[test]
fn credentials_in_the_url_are_never_shown() {
    let server = services::redis();
    let a = failing_archive(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let sink = format!(
        "redis://backfill:Sup3rS3cretPw@127.0.0.1:{}?stream=s",
        server.port
    );
    let run = backfill(&[
        "run",
        "--source",
        &a.source(),
        "--out",
        &tmp.path().join("out").display().to_string(),
        "--replay-sink",
        &sink,
        "--no-gaps",
        "--log-format",
        "json",
    ]);
    // No such user: the health check fails, before anything is read, and
    // the URL's settings are at fault (exit 2).
    run.expect_code(2);
    assert!(
        run.stderr.contains("error: replay sink redis://"),
        "{}",
        run.describe()
    );
    for text in [&run.stdout, &run.stderr] {
        assert!(!text.contains("Sup3rS3cretPw"), "{}", run.describe());
    }
}

#[test]
fn bad_redis_urls_are_usage_errors() {
    let server = services::redis();
    let a = failing_archive(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    // Refused by the server for the URL's settings: the job's fault too.
    let no_db = format!("{}/99?stream=s", server.url());
    let password = format!(
        "redis://:wrong@{}?stream=s",
        server.url().trim_start_matches("redis://")
    );
    for (sink, want) in [
        (no_db.as_str(), "the server refused the URL's settings"),
        (password.as_str(), "the server refused the URL's settings"),
        ("redis://us:pa/ss@127.0.0.1:1?stream=s", "write `/` as %2F"),
        ("redis://127.0.0.1:1", "missing `?stream=NAME`"),
        (
            "redis://127.0.0.1:1?stream=s&password=x",
            "unknown option `password`",
        ),
        (
            "redis://127.0.0.1:1?hash_prefix=p",
            "`hash_prefix` is for `state-at`",
        ),
    ] {
        let run = backfill(&[
            "run",
            "--source",
            &a.source(),
            "--out",
            &tmp.path().join("out").display().to_string(),
            "--replay-sink",
            sink,
            "--no-gaps",
        ]);
        run.expect_code(2);
        assert!(run.stderr.contains(want), "{}", run.describe());
        assert!(!run.stderr.contains("wrong"), "{}", run.describe());
    }
}
