//! Cluster mode against a real Ballista cluster: a `backfill scheduler`
//! and two `backfill executor` processes on 127.0.0.1 (services), the
//! archive and the state on s3s-fs. The executors start without any
//! `AWS_*` variable: they read S3 with what the client's query carries.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::Run;
use crate::s3::{
    S3Env, Spawned, assert_same_rows, bf, bucket, counts, generate, manifests, num, read_json,
    rows, run_args, the_error_line,
};
use crate::services::{self, BallistaCluster};

/// Report fields a cluster cannot fill as the in-process run does: the
/// executors' scan metrics stay on the executors, nothing spills on the
/// client.
const NOT_COMPARED: [&str; 4] = [
    "bytes_scanned",
    "row_groups_pruned",
    "spilled_bytes",
    "cluster",
];

/// A small generated archive on the shared S3 server, in a bucket of its
/// own: the server, the client's environment, the bucket and the source.
fn small_archive(name: &str) -> (&'static services::S3Server, S3Env, String, String) {
    let s3 = services::s3();
    let env = S3Env::of(s3);
    let b = bucket(s3, name);
    generate(&env, &format!("s3://{b}/archive"), 300, 5, 3, 1);
    let src = format!("s3://{b}/archive/");
    (s3, env, b, src)
}

fn with_cluster<'a>(mut args: Vec<&'a str>, url: &'a str) -> Vec<&'a str> {
    args.extend(["--cluster", url]);
    args
}

/// The same archive, in-process and on the cluster, twice (the second run
/// reads the first one's ledger from S3 on the executors): the same
/// replays, dead letters and gaps, row for row, and the same report.
#[test]
fn a_cluster_run_is_the_in_process_run_event_by_event() {
    let s3 = services::s3();
    let cluster = services::cluster();
    let env = S3Env::of(s3);
    let b = bucket(s3, "cluster-run");
    generate(&env, &format!("s3://{b}/archive"), 4000, 40, 21, 3);
    let work = tempfile::tempdir().unwrap();
    let src = format!("s3://{b}/archive/");
    for run_id in ["first", "second"] {
        let (here, there) = (format!("s3://{b}/here"), format!("s3://{b}/there"));
        let (hr, tr) = (
            work.path().join(format!("here-{run_id}.json")),
            work.path().join(format!("there-{run_id}.json")),
        );
        bf(&env, &run_args(&src, &here, run_id, &hr)).ok();
        let on_cluster = bf(
            &env,
            &with_cluster(run_args(&src, &there, run_id, &tr), &cluster.url),
        );
        assert_eq!(
            on_cluster.code,
            Some(0),
            "{}\n{}",
            on_cluster.describe(),
            cluster.log_tail()
        );
        let (h, t) = (read_json(&hr), read_json(&tr));
        assert_eq!(
            counts(&h, &NOT_COMPARED),
            counts(&t, &NOT_COMPARED),
            "reports differ for {run_id}"
        );
        assert!(
            num(&t, "replayed") > 0 && num(&t, "dead_lettered") > 0,
            "{t}"
        );
        assert!(num(&t, "gaps") > 0 && num(&t, "conflicts") > 0, "{t}");
        let root = s3.root.join(&b);
        assert_same_rows(&root.join("here"), run_id, &root.join("there"), run_id);
    }
    let second = read_json(&work.path().join("there-second.json"));
    assert!(num(&second, "skipped_dead_lettered") > 0, "{second}");
    assert_eq!(
        manifests(&s3.root.join(&b).join("there/_state")),
        vec!["first.json".to_string(), "second.json".to_string()]
    );
    // A rerun of a committed id writes nothing, on the cluster too.
    let again = bf(
        &env,
        &with_cluster(
            run_args(
                &src,
                &format!("s3://{b}/there"),
                "second",
                &work.path().join("r.json"),
            ),
            &cluster.url,
        ),
    );
    again.ok();
}

/// Copy a folder tree (an archive made on local disk) into a bucket.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The e2e suite's tricky archive (files of four schemas: reordered
/// columns, Int32 seq and attempts, ms, µs and ns times, an empty file,
/// files outside the window) with its exact window bounds, whose
/// comparison on mixed units is our own function: the cluster decides as
/// in-process, twice over the ledger.
#[test]
fn schema_merge_and_exact_windows_on_a_cluster() {
    let s3 = services::s3();
    let cluster = services::cluster();
    let env = S3Env::of(s3);
    let b = bucket(s3, "cluster-tricky");
    let archive = crate::e2e::tricky_archive();
    copy_tree(&archive.path(), &s3.root.join(&b).join("archive"));
    let flags = crate::e2e::tricky_flags();
    let work = tempfile::tempdir().unwrap();
    let src = format!("s3://{b}/archive/");
    for run_id in ["one", "two"] {
        let mut reports = vec![];
        for (name, on_cluster) in [("here", false), ("there", true)] {
            let out = format!("s3://{b}/{name}");
            let report = work.path().join(format!("{name}-{run_id}.json"));
            let mut args = run_args(&src, &out, run_id, &report);
            args.extend(flags.iter().map(String::as_str));
            if on_cluster {
                args.extend(["--cluster", &cluster.url]);
            }
            let r = bf(&env, &args);
            assert_eq!(r.code, Some(0), "{}\n{}", r.describe(), cluster.log_tail());
            reports.push(read_json(&report));
        }
        assert_eq!(
            counts(&reports[0], &NOT_COMPARED),
            counts(&reports[1], &NOT_COMPARED),
            "reports differ for {run_id}"
        );
        let root = s3.root.join(&b);
        for sink in ["replay", "dlq", "gaps"] {
            let (h, t) = (
                rows(&root.join("here").join(sink), run_id),
                rows(&root.join("there").join(sink), run_id),
            );
            assert!(
                run_id == "two" || !h.is_empty(),
                "{sink} of {run_id} is empty"
            );
            assert_eq!(h, t, "{sink} of {run_id}");
        }
    }
}

/// `gaps`, `sql` and `explain` on the cluster: the same answers as
/// in-process, and the plan shown as the cluster's stages.
#[test]
fn gaps_sql_and_explain_run_on_the_cluster() {
    let s3 = services::s3();
    let cluster = services::cluster();
    let env = S3Env::of(s3);
    let b = bucket(s3, "cluster-sql");
    generate(&env, &format!("s3://{b}/archive"), 1500, 15, 5, 2);
    let src = format!("s3://{b}/archive/");
    let both = |args: &[&str]| -> (Run, Run) {
        let here = bf(&env, args);
        let mut c = args.to_vec();
        c.extend(["--cluster", &cluster.url]);
        let there = bf(&env, &c);
        here.ok();
        assert_eq!(
            there.code,
            Some(0),
            "{}\n{}",
            there.describe(),
            cluster.log_tail()
        );
        (here, there)
    };
    let (h, t) = both(&["gaps", "--source", &src, "--format", "csv"]);
    assert!(h.stdout.lines().count() > 2, "{}", h.describe());
    assert_eq!(h.stdout, t.stdout);
    let q = "SELECT status, count(*) AS n, count(DISTINCT key) AS keys FROM events GROUP BY status ORDER BY status";
    let (h, t) = both(&["sql", "--source", &src, "--format", "csv", "-c", q]);
    assert!(h.stdout.contains("processed"), "{}", h.describe());
    assert_eq!(h.stdout, t.stdout);
    // The credentials the session carries to the executors are not
    // readable from SQL.
    for q in [
        "SHOW ALL",
        "SELECT value FROM information_schema.df_settings WHERE name = 'backfill.storage'",
    ] {
        let mut args = vec!["sql", "--source", &src, "-c", q, "--cluster"];
        args.push(&cluster.url);
        let r = bf(&env, &args);
        assert!(
            !r.stdout.contains(&s3.secret_key) && !r.stderr.contains(&s3.secret_key),
            "{q} printed the secret\n{}",
            r.describe()
        );
    }
    // DESCRIBE is answered by the client (Ballista cannot serialize it).
    let (h, t) = both(&[
        "sql",
        "--source",
        &src,
        "--format",
        "csv",
        "-c",
        "DESCRIBE events",
    ]);
    assert!(h.stdout.contains("event_id"), "{}", h.describe());
    assert_eq!(h.stdout, t.stdout);
    let (_, t) = both(&["explain", "--source", &src]);
    assert!(
        t.stdout.contains("ShuffleWriterExec") || t.stdout.contains("Stage"),
        "no stages in the cluster's plan:\n{}",
        t.stdout
    );
}

/// A wrong scheduler address fails in seconds with one line; what a
/// cluster cannot read or do is refused before anything runs.
#[test]
fn what_a_cluster_cannot_reach_or_do_is_refused_in_one_line() {
    let (s3, env, b, src) = small_archive("cluster-refused");
    let out = format!("s3://{b}/out");
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("r.json");

    let nobody = format!("df://127.0.0.1:{}", services::free_port());
    let started = Instant::now();
    let r = bf(
        &env,
        &with_cluster(run_args(&src, &out, "x", &report), &nobody),
    );
    r.expect_code(1);
    let line = the_error_line(&r);
    assert!(
        line.contains(&nobody) && line.contains("backfill scheduler"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(!s3.root.join(&b).join("out/_state/log").exists());

    for (url, says) in [
        ("http://127.0.0.1:1", "df://HOST:PORT"),
        ("df://u:pa/ss@127.0.0.1:1", "no user or password"),
    ] {
        let r = bf(&env, &with_cluster(run_args(&src, &out, "x", &report), url));
        r.expect_code(2);
        let line = the_error_line(&r);
        assert!(line.contains("--cluster") && line.contains(says), "{line}");
        assert!(!line.contains("pa/ss"), "{line}");
    }

    // Nothing below needs the cluster to answer: refused before it is asked.
    let url = &services::cluster().url;
    let local = work.path().join("archive");
    generate(&env, local.to_str().unwrap(), 100, 5, 3, 1);
    let (local_src, local_out) = (
        local.display().to_string(),
        work.path().join("out").display().to_string(),
    );
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "--source", &local_src, "--out", &out],
            "on this machine's disk",
        ),
        (
            &["run", "--source", &src, "--out", &local_out],
            "on this machine's disk",
        ),
        (
            &["run", "--source", &src, "--out", &out, "--shard", "0/2"],
            "--shard",
        ),
        (&["silences", "--source", &src], "does not run on a cluster"),
    ];
    for (args, says) in cases {
        let r = bf(&env, &with_cluster(args.to_vec(), url));
        r.expect_code(2);
        let line = the_error_line(&r);
        assert!(line.contains(says), "{says}: {line}");
    }
    // A file whose page index is corrupt fails the run (on the scheduler,
    // while planning), and the line names the file and the scheduler.
    let corrupt = crate::bad_input::archive_with_corrupt_page_index();
    let r = bf(
        &env,
        &[
            "gaps",
            "--source",
            &corrupt.source(),
            "--cluster",
            url,
            "--cluster-shared-fs",
        ],
    );
    r.expect_code(1);
    let line = the_error_line(&r);
    assert!(
        line.contains("corrupt-index.parquet") && line.contains(url.as_str()),
        "{line}"
    );

    // With a shared file system declared, a local archive is read there
    // (here every executor is on this machine).
    let mut args = run_args(local.to_str().unwrap(), &out, "shared", &report);
    args.extend(["--cluster", url, "--cluster-shared-fs"]);
    bf(&env, &args).ok();
}

/// An executor killed while the run's tasks are under way: Ballista runs
/// them again on the other one and the run is the in-process run, or the
/// run fails with exit 1 and commits nothing. Never a partial commit.
#[test]
fn an_executor_killed_mid_run_is_recovered_or_commits_nothing() {
    let s3 = services::s3();
    let env = S3Env::of(s3);
    let b = bucket(s3, "cluster-kill");
    generate(&env, &format!("s3://{b}/archive"), 20000, 50, 8, 4);
    let mut cluster = BallistaCluster::start(2, 3);
    let work = tempfile::tempdir().unwrap();
    let src = format!("s3://{b}/archive/");
    let (here, there) = (format!("s3://{b}/here"), format!("s3://{b}/there"));
    bf(
        &env,
        &run_args(&src, &here, "k", &work.path().join("h.json")),
    )
    .ok();
    let report = work.path().join("t.json");
    let args = with_cluster(run_args(&src, &there, "k", &report), &cluster.url);
    let run = Spawned::start(&args, &env.vars());
    // Kill the first executor as soon as it runs a task.
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = |log: &str| log.contains("Execute task") || log.contains("Received task");
    while !running(&cluster.log_tail()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        running(&cluster.log_tail()),
        "no task ran within a minute\n{}",
        cluster.log_tail()
    );
    cluster.kill_executor(0);
    let r = run.wait();
    let committed = manifests(&s3.root.join(&b).join("there/_state"));
    eprintln!(
        "after the kill: exit {:?}, committed {committed:?}: {}",
        r.code,
        r.stderr.lines().last().unwrap_or_default()
    );
    match r.code {
        Some(0) => {
            assert_eq!(committed, vec!["k.json".to_string()]);
            let root = s3.root.join(&b);
            assert_same_rows(&root.join("here"), "k", &root.join("there"), "k");
        }
        Some(1) => {
            assert!(committed.is_empty(), "{committed:?}\n{}", r.describe());
            assert!(!Path::new(&report).exists() || read_json(&report)["replayed"].is_number());
        }
        _ => panic!("{}\n{}", r.describe(), cluster.log_tail()),
    }
}

/// A cluster that cannot run a job fails the run in seconds, exit 1,
/// naming the scheduler, and commits nothing: a scheduler that never had
/// an executor (it cancels the job after its --executor-timeout), the
/// client's own --cluster-timeout (which cancels the job on the
/// scheduler), and an address where something else answers.
#[test]
fn a_cluster_that_cannot_answer_fails_the_run_in_seconds() {
    let (s3, env, b, src) = small_archive("cluster-stuck");
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("r.json");
    let fails_fast = |url: &str, extra: &[&str], says: &[&str]| {
        let out = format!("s3://{b}/out-{}", services::free_port());
        let mut args = with_cluster(run_args(&src, &out, "x", &report), url);
        args.extend(extra);
        let started = Instant::now();
        let r = bf(&env, &args);
        r.expect_code(1);
        let line = the_error_line(&r);
        for s in says {
            assert!(line.contains(s), "{s}: {line}\n{}", r.describe());
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{:?}: {line}",
            started.elapsed()
        );
        let state = s3.root.join(&b).join(out.rsplit('/').next().unwrap());
        assert!(manifests(&state.join("_state")).is_empty(), "{line}");
        line
    };

    // No executor ever: the scheduler cancels the job after 3 s.
    let lonely = BallistaCluster::start(0, 3);
    fails_fast(&lonely.url, &[], &[&lonely.url, "Cancelled", "no executor"]);
    assert!(
        lonely.logs().contains("no executor has been registered"),
        "{}",
        lonely.log_tail()
    );

    // The client's bound, with a scheduler that would wait three minutes:
    // the job is cancelled on the scheduler, not left running.
    let patient = BallistaCluster::start_logging(0, 180, "info,ballista_scheduler=info", "info");
    fails_fast(
        &patient.url,
        &["--cluster-timeout", "2s"],
        &[&patient.url, "--cluster-timeout"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !patient.logs().contains("Job cancelled") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        patient.logs().contains("Job cancelled"),
        "{}",
        patient.log_tail()
    );

    // Not a scheduler: the S3 server's port.
    let s3_url = format!("df://127.0.0.1:{}", s3.port);
    fails_fast(&s3_url, &[], &[&s3_url]);

    // A bad timeout is the setting's fault (exit 2).
    let r = bf(
        &env,
        &with_cluster(
            ["gaps", "--source", &src, "--cluster-timeout", "soon"].to_vec(),
            &patient.url,
        ),
    );
    r.expect_code(2);
    assert!(
        the_error_line(&r).contains("--cluster-timeout"),
        "{}",
        r.describe()
    );
}

/// Whatever `--log-level` asks of Ballista's crates, the storage
/// credentials the session carries never reach the scheduler's or the
/// executors' logs (Ballista prints session options at trace and debug).
#[test]
fn credentials_stay_out_of_the_clusters_logs_at_any_level() {
    let (s3, env, _, src) = small_archive("cluster-logs");
    let loud = "info,ballista_core::extension=trace,ballista_core=trace,ballista_scheduler=trace,ballista_executor=debug";
    let cluster = BallistaCluster::start_logging(1, 30, loud, loud);
    let r = bf(
        &env,
        &[
            "sql",
            "--source",
            &src,
            "--format",
            "csv",
            "-c",
            "SELECT count(*) AS n FROM events",
            "--cluster",
            &cluster.url,
            "--log-level",
            loud,
        ],
    );
    r.ok();
    assert!(r.stdout.contains('n'), "{}", r.describe());
    let logs = cluster.logs();
    assert!(
        logs.contains("Ballista executor") && logs.len() > 1000,
        "the processes logged nothing to look in:\n{}",
        cluster.log_tail()
    );
    for (who, text) in [("client", r.stderr.as_str()), ("cluster", logs.as_str())] {
        assert!(
            !text.contains(&s3.secret_key),
            "the secret is in the {who}'s log"
        );
    }
}

/// What the cluster would write on its executors' own disks is refused,
/// and a scheduler or an executor that cannot serve as asked says so in one
/// line instead of starting half-way (or exiting 0).
#[test]
fn cluster_processes_and_writes_refuse_what_they_cannot_do() {
    let (_, env, _, src) = small_archive("cluster-writes");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("copy.parquet");
    let url = &services::cluster().url;
    // A COPY to a local path, and a table at a local LOCATION (an insert,
    // a read): each executor would use its own disk.
    let dir = work.path().join("ext");
    let local = work.path().join("local");
    generate(&env, local.to_str().unwrap(), 100, 5, 3, 1);
    for q in [
        format!(
            "COPY (SELECT * FROM events) TO '{}' STORED AS PARQUET",
            target.display()
        ),
        format!(
            "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS CSV LOCATION '{}/'; INSERT INTO t VALUES (9)",
            dir.display()
        ),
        format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'; SELECT count(*) FROM t",
            local.display()
        ),
        format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'; CREATE TABLE m AS SELECT * FROM t",
            local.display()
        ),
    ] {
        let args = ["sql", "--source", &src, "--allow-writes", "-c", &q];
        let r = bf(&env, &with_cluster(args.to_vec(), url));
        r.expect_code(2);
        assert!(
            the_error_line(&r).contains("--cluster-shared-fs"),
            "{q}: {}",
            r.describe()
        );
    }
    assert!(!target.exists());
    assert!(
        std::fs::read_dir(&dir).map_or(true, |d| d.count() == 0),
        "an executor wrote into {}",
        dir.display()
    );

    // An executor waiting for a scheduler that is not there yet stops at
    // once, exit 0, when asked to.
    let mut waiting = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
        .args(["executor", "--scheduler"])
        .arg(format!("df://127.0.0.1:{}", services::free_port()))
        .args(["--port", &services::free_port().to_string()])
        .args(["--grpc-port", &services::free_port().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    unsafe { libc::kill(waiting.id() as i32, libc::SIGTERM) };
    let status = waiting.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let free = services::free_port().to_string();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "executor",
                "--scheduler",
                url,
                "--port",
                &port,
                "--grpc-port",
                &free,
            ],
            "--port",
        ),
        (
            &[
                "executor",
                "--scheduler",
                url,
                "--port",
                &free,
                "--grpc-port",
                &port,
            ],
            "--grpc-port",
        ),
        (
            &[
                "executor",
                "--scheduler",
                url,
                "--concurrent-tasks",
                "4294967297",
            ],
            "--concurrent-tasks",
        ),
        (&["scheduler", "--bind", "127.0.0.1:0"], "--bind"),
        (
            &["scheduler", "--executor-timeout", "0"],
            "--executor-timeout",
        ),
        (
            &["scheduler", "--bind", &format!("127.0.0.1:{port}")],
            "--bind",
        ),
    ];
    for (args, says) in cases {
        let r = bf(&env, args);
        r.expect_code(2);
        assert!(
            the_error_line(&r).contains(says),
            "{says}: {}",
            r.describe()
        );
    }
}
