//! Archives, outputs and state on a real S3 server (s3s-fs): the binary run
//! with the standard AWS environment against `s3://` locations.
//!
//! s3s-fs stores an object `s3://BUCKET/KEY` as the plain file
//! `ROOT/BUCKET/KEY`, so the tests read what the server holds straight from
//! its folder with the same independent reader the other tests use.
//!
//! Failures are injected deterministically by a small HTTP proxy between the
//! binary and the server ([`Proxy`]): it can hold a request until the test
//! releases it, answer it with an error status, or cut every connection. A
//! test never sleeps to hit a window.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::cli::{Run, command, read_all};
use crate::reference::{Record, read_output};
use crate::services::{self, S3Server};

/// The longest one invocation of the binary may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------ environment

/// Endpoint and credentials, as the binary gets them: the standard AWS
/// environment variables.
#[derive(Clone, Debug)]
pub(crate) struct S3Env {
    endpoint: String,
    access_key: String,
    secret_key: String,
}

impl S3Env {
    pub(crate) fn of(s: &S3Server) -> S3Env {
        S3Env {
            endpoint: s.endpoint.clone(),
            access_key: s.access_key.clone(),
            secret_key: s.secret_key.clone(),
        }
    }

    fn via(&self, endpoint: &str) -> S3Env {
        S3Env {
            endpoint: endpoint.to_string(),
            ..self.clone()
        }
    }

    pub(crate) fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }
}

/// One running invocation of the binary (also used by the Kafka tests that
/// act while a run is under way).
pub(crate) struct Spawned {
    args: Vec<String>,
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

impl Spawned {
    /// Start the binary with exactly these AWS variables: any `AWS_*` of the
    /// test's own environment (a profile, a session token) is removed.
    pub(crate) fn start(args: &[&str], vars: &[(String, String)]) -> Spawned {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_backfill")), args, vars)
    }

    fn start_program(program: &Path, args: &[&str], vars: &[(String, String)]) -> Spawned {
        let mut cmd = command(program, args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let out = read_all(child.stdout.take().expect("stdout pipe"));
        let err = read_all(child.stderr.take().expect("stderr pipe"));
        Spawned {
            args: args.iter().map(|s| s.to_string()).collect(),
            child,
            out: Some(out),
            err: Some(err),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub(crate) fn wait(mut self) -> Run {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for the binary") {
                break s;
            }
            if start.elapsed() > RUN_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "backfill {} did not finish in {RUN_TIMEOUT:?}",
                    self.args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            args: std::mem::take(&mut self.args),
            code: status.code(),
            stdout: self
                .out
                .take()
                .map(|t| t.join().expect("stdout"))
                .unwrap_or_default(),
            stderr: self
                .err
                .take()
                .map(|t| t.join().expect("stderr"))
                .unwrap_or_default(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run the binary against `env` and wait for it.
pub(crate) fn bf(env: &S3Env, args: &[&str]) -> Run {
    Spawned::start(args, &env.vars()).wait()
}

/// `backfill generate` straight into a location.
pub(crate) fn generate(env: &S3Env, out: &str, events: u64, keys: u64, seed: u64, days: u32) {
    bf(
        env,
        &[
            "generate",
            "--out",
            out,
            "--events",
            &events.to_string(),
            "--keys",
            &keys.to_string(),
            "--seed",
            &seed.to_string(),
            "--days",
            &days.to_string(),
        ],
    )
    .ok();
}

/// A fresh bucket on the shared server.
pub(crate) fn bucket(s3: &S3Server, prefix: &str) -> String {
    let name = services::unique_name(prefix).to_ascii_lowercase();
    s3.create_bucket(&name);
    name
}

pub(crate) fn read_json(path: &Path) -> Json {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

pub(crate) fn num(report: &Json, key: &str) -> u64 {
    report
        .get(key)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("report has no count `{key}`: {report}"))
}

/// The report's counts, without what legitimately differs between two
/// places or two runs: timing, where the outputs and state went.
pub(crate) fn counts(report: &Json, also_drop: &[&str]) -> BTreeMap<String, Json> {
    let mut m: BTreeMap<String, Json> = report
        .as_object()
        .expect("the report is a JSON object")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for k in ["elapsed_ms", "phase_ms", "outputs", "state"]
        .iter()
        .chain(also_drop)
    {
        m.remove(*k);
    }
    let outputs = report.get("outputs").and_then(Json::as_object);
    for (kind, o) in outputs.into_iter().flatten() {
        m.insert(format!("outputs.{kind}.rows"), o["rows"].clone());
        let files = o["outputs"].as_array().map_or(0, Vec::len);
        m.insert(format!("outputs.{kind}.files"), files.into());
    }
    m
}

/// The scan figures: what differs between a pruned and an unpruned scan.
const SCAN_FIGURES: &[&str] = &[
    "files_scanned",
    "files_pruned",
    "partitions_pruned",
    "row_groups_pruned",
    "bytes_scanned",
];

/// One sink's rows of one run, without the columns that name the run
/// (`backfill_run_id`, `backfill_detected_at`), in a canonical order.
pub(crate) fn rows(sink_dir: &Path, run_id: &str) -> Vec<Record> {
    let mut rows: Vec<Record> = read_output(sink_dir, run_id)
        .rows
        .into_iter()
        .map(|mut r| {
            r.remove("backfill_run_id");
            r.remove("backfill_detected_at");
            r
        })
        .collect();
    rows.sort_by_cached_key(|r| format!("{r:?}"));
    rows
}

/// Compare replay, DLQ and gap rows of two output roots.
pub(crate) fn assert_same_rows(a: &Path, run_a: &str, b: &Path, run_b: &str) {
    for sink in ["replay", "dlq", "gaps"] {
        let (ra, rb) = (rows(&a.join(sink), run_a), rows(&b.join(sink), run_b));
        assert!(!ra.is_empty(), "{sink} of {} is empty", a.display());
        assert_eq!(
            ra.len(),
            rb.len(),
            "{sink}: {} rows in {} but {} in {}",
            ra.len(),
            a.display(),
            rb.len(),
            b.display()
        );
        if let Some(i) = (0..ra.len()).find(|&i| ra[i] != rb[i]) {
            panic!(
                "{sink}: row {i} differs\n{}: {:?}\n{}: {:?}",
                a.display(),
                ra[i],
                b.display(),
                rb[i]
            );
        }
    }
}

/// Every file below `dir`, as paths relative to it.
pub(crate) fn files_below(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The committed runs under a state folder on the server's disk, as
/// `<run_id>.json`, in log order.
pub(crate) fn manifests(state_dir: &Path) -> Vec<String> {
    crate::e2e::manifests(state_dir)
        .iter()
        .filter_map(|p| {
            let j: Json = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
            Some(format!("{}.json", j["run_id"].as_str()?))
        })
        .collect()
}

/// The log entry that committed `run_id`.
fn manifest_json(state_dir: &Path, run_id: &str) -> Json {
    crate::e2e::manifest_of(state_dir, run_id).unwrap_or_else(|| {
        panic!(
            "no log entry commits {run_id} under {}",
            state_dir.display()
        )
    })
}

pub(crate) fn error_lines(run: &Run) -> Vec<&str> {
    run.stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect()
}

/// Exactly one `error:` line, and nothing else on stderr but warnings.
#[track_caller]
pub(crate) fn the_error_line(run: &Run) -> String {
    let errors = error_lines(run);
    assert_eq!(
        errors.len(),
        1,
        "expected one error line\n{}",
        run.describe()
    );
    for l in run.stderr_lines() {
        assert!(
            l.starts_with("error:") || l.starts_with("warning:"),
            "stray stderr line {l:?}\n{}",
            run.describe()
        );
    }
    errors[0].to_string()
}

/// A job file in `dir`.
pub(crate) fn job_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p.display().to_string()
}

/// Fast retries so that a dead server fails a run in seconds.
const FAST_RETRY: &str = "[storage.retry]\nmax_retries = 2\ninit_backoff_ms = 50\nmax_backoff_ms = 200\nretry_timeout_secs = 5\nconnect_timeout_secs = 1\nrequest_timeout_secs = 20\n";

// ------------------------------------------------------------ restartable server

/// An s3s-fs server of one test whose data folder outlives the process, so
/// that it can be killed and started again on the same folder and port.
/// Like the shared fixture it runs under a watchdog that kills it when the
/// test process ends, however it ends.
struct OwnS3 {
    dir: tempfile::TempDir,
    port: u16,
    access_key: String,
    secret_key: String,
    process: Option<(Child, ChildStdin)>,
}

impl OwnS3 {
    fn start() -> OwnS3 {
        let dir = tempfile::Builder::new()
            .prefix("backfill-it-own-s3-")
            .tempdir()
            .expect("scratch folder");
        std::fs::create_dir_all(dir.path().join("root")).expect("server root");
        let mut s = OwnS3 {
            dir,
            port: services::free_port(),
            access_key: "own-test-key".into(),
            secret_key: "own-test-secret-41d8".into(),
            process: None,
        };
        s.spawn();
        s
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn env(&self) -> S3Env {
        S3Env {
            endpoint: format!("http://{}", self.addr()),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root().join(name)).expect("create a bucket folder");
    }

    fn spawn(&mut self) {
        let program = services::tools_bin_dir().join("s3s-fs");
        assert!(
            program.is_file(),
            "s3s-fs is not installed at {}: run scripts/install-tools.sh",
            program.display()
        );
        let log = self.dir.path().join("server.log");
        let script = r#"exec 3<&0
"$0" "$@" </dev/null >>"$OWN_S3_LOG" 2>&1 &
s=$!
read -r _ <&3
kill -KILL "$s" 2>/dev/null
wait "$s" 2>/dev/null"#;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg(&program)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(self.root())
            .env("OWN_S3_LOG", &log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bash to watch s3s-fs");
        let stdin = child.stdin.take().expect("watchdog stdin");
        let start = Instant::now();
        while TcpStream::connect_timeout(
            &self.addr().parse().expect("address"),
            Duration::from_millis(200),
        )
        .is_err()
        {
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "s3s-fs did not listen on {} in 30 s: {}",
                    self.addr(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some((child, stdin));
    }

    /// SIGKILL: a crash, not a shutdown. Returns once the server is gone.
    fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.process.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------ fault-injecting proxy

/// The head of one HTTP request that passed through the proxy.
#[derive(Debug, Clone)]
struct Head {
    method: String,
    /// Path and query, e.g. `/bucket/out/_state/manifests/r.json`.
    target: String,
    /// Header block, lower-cased.
    headers: String,
    content_length: usize,
    head_len: usize,
}

impl Head {
    fn parse(buf: &[u8]) -> Option<Head> {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let text = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let target = first.next()?.to_string();
        if !first.next()?.starts_with("HTTP/1.") {
            return None;
        }
        let headers = lines.collect::<Vec<_>>().join("\n").to_ascii_lowercase();
        let content_length = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(Head {
            method,
            target,
            headers,
            content_length,
            head_len: end,
        })
    }

    /// The full length of an HTTP answer once its head is complete.
    fn parse_answer(buf: &[u8]) -> Option<usize> {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(end + len)
    }

    fn is_copy(&self) -> bool {
        self.headers.contains("x-amz-copy-source:")
    }
}

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Forward,
    /// Park it until the test calls [`Proxy::release`] (or goes dark).
    Hold,
    /// Answer with this status and an S3 error body; never forwarded.
    Fail(u16),
    /// Forward it, wait for the server's answer, drop that answer and
    /// answer this status instead: a response lost on the way back.
    LoseAnswer(u16),
    /// Cut this connection and refuse every later one: the server is gone
    /// as far as the client can tell.
    Dark,
}

type Rule = Box<dyn FnMut(&Head) -> Action + Send>;

struct ProxyState {
    upstream: String,
    rule: Rule,
    held: usize,
    releases: usize,
    dark: bool,
    log: Vec<String>,
}

/// A plain HTTP/1.1 proxy in front of an S3 server. Requests are not
/// rewritten (SigV4 signs the Host header, which the server only checks
/// against the signature), so the binary talks to it as to the server.
struct Proxy {
    endpoint: String,
    shared: Arc<(Mutex<ProxyState>, Condvar)>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new((
            Mutex::new(ProxyState {
                upstream: upstream.to_string(),
                rule: Box::new(|_| Action::Forward),
                held: 0,
                releases: 0,
                dark: false,
                log: vec![],
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let sh = sh.clone();
                    std::thread::spawn(move || Self::serve(sh, c));
                }
            }
        });
        Proxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            shared,
            stop,
            port,
        }
    }

    fn set_rule(&self, rule: impl FnMut(&Head) -> Action + Send + 'static) {
        self.shared.0.lock().expect("proxy lock").rule = Box::new(rule);
    }

    fn set_dark(&self, dark: bool) {
        let (m, c) = &*self.shared;
        m.lock().expect("proxy lock").dark = dark;
        c.notify_all();
    }

    /// Let one held request through.
    fn release(&self) {
        let (m, c) = &*self.shared;
        m.lock().expect("proxy lock").releases += 1;
        c.notify_all();
    }

    /// Wait until `n` requests are parked; false on timeout.
    fn wait_held(&self, n: usize, timeout: Duration) -> bool {
        let (m, c) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut s = m.lock().expect("proxy lock");
        while s.held < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = c.wait_timeout(s, deadline - now).expect("proxy lock").0;
        }
        true
    }

    /// The request lines seen so far, for assertion messages.
    fn log(&self) -> String {
        self.shared.0.lock().expect("proxy lock").log.join("\n")
    }

    fn serve(shared: Arc<(Mutex<ProxyState>, Condvar)>, mut client: TcpStream) {
        let (m, c) = &*shared;
        let upstream = {
            let s = m.lock().expect("proxy lock");
            if s.dark {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            s.upstream.clone()
        };
        let Ok(mut up) = TcpStream::connect(&upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        let (Ok(mut up_read), Ok(mut client_write)) = (up.try_clone(), client.try_clone()) else {
            return;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_read, &mut client_write);
            let _ = client_write.shutdown(Shutdown::Both);
        });
        let mut pending: Vec<u8> = vec![];
        let mut body_left = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            if body_left > 0 {
                let k = body_left.min(n);
                if up.write_all(&data[..k]).is_err() {
                    break;
                }
                body_left -= k;
                data = &data[k..];
                if data.is_empty() {
                    continue;
                }
            }
            // The start of a request (HTTP/1.1 clients do not pipeline):
            // gather its head before deciding.
            pending.extend_from_slice(data);
            let Some(head) = Head::parse(&pending) else {
                if pending.len() > 1 << 20 {
                    break;
                }
                continue;
            };
            let action = {
                let mut s = m.lock().expect("proxy lock");
                if s.dark {
                    // Gone dark while this connection sat in the pool.
                    drop(s);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = up.shutdown(Shutdown::Both);
                    return;
                }
                let a = (s.rule)(&head);
                s.log
                    .push(format!("{} {} -> {a:?}", head.method, head.target));
                a
            };
            match action {
                Action::Forward => {}
                Action::Hold => {
                    let mut s = m.lock().expect("proxy lock");
                    s.held += 1;
                    c.notify_all();
                    while s.releases == 0 && !s.dark {
                        s = c.wait(s).expect("proxy lock");
                    }
                    s.held -= 1;
                    if s.dark {
                        drop(s);
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = up.shutdown(Shutdown::Both);
                        return;
                    }
                    s.releases -= 1;
                }
                Action::Fail(status) | Action::LoseAnswer(status) => {
                    // Read the body first: closing on unread data resets the
                    // connection and the client would never see the answer.
                    let need = head.head_len + head.content_length;
                    while pending.len() < need {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => pending.extend_from_slice(&buf[..k]),
                        }
                    }
                    if action != Action::Fail(status) {
                        Self::send_and_drop_answer(&upstream, &pending);
                    }
                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>refused by the test proxy</Message></Error>";
                    let resp = format!(
                        "HTTP/1.1 {status} Refused\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.write_all(resp.as_bytes());
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = up.shutdown(Shutdown::Both);
                    return;
                }
                Action::Dark => {
                    m.lock().expect("proxy lock").dark = true;
                    c.notify_all();
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = up.shutdown(Shutdown::Both);
                    return;
                }
            }
            body_left = head
                .content_length
                .saturating_sub(pending.len() - head.head_len);
            if up.write_all(&pending).is_err() {
                break;
            }
            pending.clear();
        }
        let _ = up.shutdown(Shutdown::Write);
    }
}

impl Proxy {
    /// Send one whole request on a connection of its own and read the
    /// server's answer up to its end, then drop it.
    fn send_and_drop_answer(upstream: &str, request: &[u8]) {
        let Ok(mut conn) = TcpStream::connect(upstream) else {
            return;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        if conn.write_all(request).is_err() {
            return;
        }
        let mut answer: Vec<u8> = vec![];
        let mut buf = [0u8; 4096];
        loop {
            if let Some(h) = Head::parse_answer(&answer)
                && answer.len() >= h
            {
                return;
            }
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(k) => answer.extend_from_slice(&buf[..k]),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_dark(true);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The shared server, its environment, and a fresh bucket named after
/// `prefix` holding a generated archive at `s3://BUCKET/archive`.
fn s3_with_archive(
    prefix: &str,
    events: u64,
    keys: u64,
    seed: u64,
    days: u32,
) -> (&'static S3Server, S3Env, String) {
    let s3 = services::s3();
    let env = S3Env::of(s3);
    let b = bucket(s3, prefix);
    generate(&env, &format!("s3://{b}/archive"), events, keys, seed, days);
    (s3, env, b)
}

/// `run --source SOURCE --out OUT --run-id RUN_ID --report REPORT`.
pub(crate) fn run_args<'a>(
    source: &'a str,
    out: &'a str,
    run_id: &'a str,
    report: &'a Path,
) -> Vec<&'a str> {
    vec![
        "run",
        "--source",
        source,
        "--out",
        out,
        "--run-id",
        run_id,
        "--report",
        report.to_str().unwrap(),
    ]
}

/// The `backfill_attempt` of each event the run `run_id` replayed into the
/// sink folder `out`, by event id.
fn replay_attempts(out: &Path, run_id: &str) -> BTreeMap<String, i64> {
    read_output(&out.join("replay"), run_id)
        .rows
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap().to_string(),
                r["backfill_attempt"].as_int().unwrap(),
            )
        })
        .collect()
}

/// Assert that the stdout of `run` contains `text`.
#[track_caller]
fn assert_says(run: &Run, text: &str) {
    assert!(run.stdout.contains(text), "{}", run.describe());
}

/// Assert that `run` succeeded and its stdout contains `text`.
#[track_caller]
fn assert_ok_saying(run: &Run, text: &str) {
    run.ok();
    assert_says(run, text);
}

/// A PUT of a commit-log entry: the commit.
fn is_manifest_put(h: &Head) -> bool {
    h.method == "PUT" && h.target.contains("/_state/log/")
}

/// A proxy to the S3 server on `port` that does `action` to every log
/// entry write (the commit) and forwards everything else.
fn proxy_on_commits(port: u16, action: Action) -> Proxy {
    let proxy = Proxy::start(&format!("127.0.0.1:{port}"));
    proxy.set_rule(move |h| {
        if is_manifest_put(h) {
            action
        } else {
            Action::Forward
        }
    });
    proxy
}

// ------------------------------------------------------------ tests

/// The same generated archive on local disk and on S3 gives the same rows
/// in every output and the same report, with sinks and state on S3; a
/// second run reads the ledger back from S3.
#[test]
fn s3_archive_sinks_and_state_match_the_local_run() {
    let s3 = services::s3();
    let env = S3Env::of(s3);
    let b = bucket(s3, "local-vs-s3");
    let work = tempfile::tempdir().expect("tempdir");
    let local_archive = work.path().join("archive");
    let local_out = work.path().join("out");
    let (events, keys, seed, days) = (3000, 30, 11, 3);
    generate(
        &env,
        local_archive.to_str().unwrap(),
        events,
        keys,
        seed,
        days,
    );
    generate(&env, &format!("s3://{b}/archive"), events, keys, seed, days);

    // The same archive, byte for byte, with its hive folders.
    let s3_archive = s3.root.join(&b).join("archive");
    let names = files_below(&local_archive);
    assert!(names.iter().any(|n| n.starts_with("dt=")), "{names:?}");
    assert_eq!(names, files_below(&s3_archive));
    for n in &names {
        assert!(
            std::fs::read(local_archive.join(n)).unwrap()
                == std::fs::read(s3_archive.join(n)).unwrap(),
            "{n} differs between the local and the S3 archive"
        );
    }

    for run_id in ["first", "second"] {
        let lr = work.path().join(format!("local-{run_id}.json"));
        let sr = work.path().join(format!("s3-{run_id}.json"));
        let (local_src, local_dst) = (local_archive.to_str().unwrap(), local_out.to_str().unwrap());
        bf(&env, &run_args(local_src, local_dst, run_id, &lr)).ok();
        let (s3_src, s3_dst) = (format!("s3://{b}/archive/"), format!("s3://{b}/out"));
        let s3_run = bf(&env, &run_args(&s3_src, &s3_dst, run_id, &sr));
        assert_ok_saying(
            &s3_run,
            &format!("s3://{b}/out/replay/run_id={run_id}/part-00000-"),
        );
        let (l, s) = (read_json(&lr), read_json(&sr));
        assert_eq!(
            counts(&l, &[]),
            counts(&s, &[]),
            "reports differ for {run_id}"
        );
        assert!(num(&s, "replayed") > 0 && num(&s, "gaps") > 0, "{s}");
        assert_eq!(s["state"], format!("s3://{b}/out/_state"), "{s}");
        assert_same_rows(&local_out, run_id, &s3.root.join(&b).join("out"), run_id);
    }

    // The second run read the first one's ledger from S3: what the first
    // dead-lettered it skipped, and replays carry the next attempt.
    let (first, second) = (
        read_json(&work.path().join("s3-first.json")),
        read_json(&work.path().join("s3-second.json")),
    );
    assert!(num(&first, "dead_lettered") > 0);
    assert_eq!(
        num(&second, "skipped_dead_lettered"),
        num(&first, "dead_lettered")
    );
    let out = s3.root.join(&b).join("out");
    let (a1, a2) = (
        replay_attempts(&out, "first"),
        replay_attempts(&out, "second"),
    );
    let both: Vec<&String> = a2.keys().filter(|k| a1.contains_key(*k)).collect();
    assert!(!both.is_empty());
    for k in both {
        assert_eq!(a2[k], a1[k] + 1, "attempt of {k}");
    }
    assert_eq!(
        manifests(&out.join("_state")),
        vec!["first.json".to_string(), "second.json".to_string()]
    );
    let leftovers: Vec<String> = files_below(&out)
        .into_iter()
        .filter(|f| f.contains("_staging/"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
}

/// Over a 30-day archive on S3, a one-day window with `dt` partitions
/// declared reads at most 5% of the bytes of the whole archive, and decides
/// exactly as the unpruned scan filtered to the same window.
#[test]
fn hive_partitions_prune_a_one_day_window_on_s3() {
    let (s3, env, b) = s3_with_archive("pruning", 9000, 20, 5, 30);
    let work = tempfile::tempdir().expect("tempdir");
    let job = job_file(
        work.path(),
        "partitions.toml",
        "[[partitions]]\nname = \"dt\"\nformat = \"%Y-%m-%d\"\n",
    );
    let src = format!("s3://{b}/archive");
    let report = |name: &str| work.path().join(format!("{name}.json"));
    let run = |name: &str, extra: &[&str]| {
        let out = format!("s3://{b}/{name}");
        let rep = report(name);
        let mut args = run_args(&src, &out, "window", &rep);
        args.extend_from_slice(extra);
        bf(&env, &args).ok();
        read_json(&rep)
    };
    let (from, to) = ("2024-01-10T00:00:00Z", "2024-01-11T00:00:00Z");
    let whole = run("whole", &["--job", &job]);
    let day = run("day", &["--job", &job, "--from", from, "--to", to]);
    let filtered = run("filtered", &["--from", from, "--to", to]);

    assert_eq!(num(&whole, "files_scanned"), 60, "{whole}");
    assert_eq!(num(&whole, "files_pruned"), 0);
    assert_eq!(num(&day, "files_scanned"), 2, "{day}");
    assert_eq!(num(&day, "files_pruned"), 58, "{day}");
    assert_eq!(num(&day, "partitions_pruned"), 29, "{day}");
    // Without [[partitions]] every folder is listed (files may still be
    // skipped by their footer statistics).
    assert_eq!(num(&filtered, "partitions_pruned"), 0, "{filtered}");
    assert_eq!(
        num(&filtered, "files_scanned") + num(&filtered, "files_pruned"),
        60,
        "{filtered}"
    );
    let (bd, bw) = (num(&day, "bytes_scanned"), num(&whole, "bytes_scanned"));
    assert!(bd > 0, "{day}");
    assert!(
        bd * 20 <= bw,
        "a one-day window read {bd} bytes, more than 5% of the {bw} bytes of the whole archive"
    );
    assert!(num(&day, "rows") > 0 && num(&day, "replayed") > 0, "{day}");
    assert!(num(&day, "rows") < num(&whole, "rows") / 10);

    // The same decision as the full scan filtered to the window.
    assert_eq!(
        counts(&day, SCAN_FIGURES),
        counts(&filtered, SCAN_FIGURES),
        "pruned and unpruned runs over one window disagree"
    );
    let root = s3.root.join(&b);
    assert_same_rows(
        &root.join("day"),
        "window",
        &root.join("filtered"),
        "window",
    );
}

/// Two runs racing for one run id on S3: both reach the commit (the proxy
/// parks both manifest writes), exactly one commits, the other exits 1
/// saying so; the ledger counts the winner only.
/// Start two runs through `proxy` (holding commit-log PUTs), wait until
/// both hold at their commit, let one through and wait for its run to end,
/// then the other: as a store that orders conditional writes would. Returns
/// the first run, its pid, and the second.
fn race_to_commit(proxy: &Proxy, via: &S3Env, args: [&[&str]; 2]) -> (Run, u32, Run) {
    let mut racers: Vec<Spawned> = args
        .iter()
        .map(|a| Spawned::start(a, &via.vars()))
        .collect();
    assert!(
        proxy.wait_held(2, Duration::from_secs(90)),
        "both runs should reach the commit; proxy saw:\n{}",
        proxy.log()
    );
    proxy.release();
    let start = Instant::now();
    let first = loop {
        if let Some(i) = racers.iter_mut().position(Spawned::finished) {
            break i;
        }
        assert!(start.elapsed() < RUN_TIMEOUT, "no racer finished");
        std::thread::sleep(Duration::from_millis(20));
    };
    let winner = racers.remove(first);
    let winner_pid = winner.pid();
    let winner = winner.wait();
    proxy.release();
    let loser = racers.pop().expect("second racer").wait();
    (winner, winner_pid, loser)
}

#[test]
fn racing_runs_on_s3_commit_exactly_once() {
    let (s3, env, b) = s3_with_archive("race", 2000, 20, 3, 2);
    let work = tempfile::tempdir().expect("tempdir");
    let proxy = proxy_on_commits(s3.port, Action::Hold);
    let via = env.via(&proxy.endpoint);
    let src = format!("s3://{b}/archive");
    let out = format!("s3://{b}/out");
    let args = [
        "run",
        "--source",
        &src,
        "--out",
        &out,
        "--run-id",
        "contested",
    ];
    let (winner, winner_pid, loser) = race_to_commit(&proxy, &via, [&args, &args]);
    assert_ok_saying(&winner, "run contested committed");
    loser.expect_code(4);
    let line = the_error_line(&loser);
    assert!(
        line.contains("contested") && line.contains("committed by another attempt"),
        "{line}"
    );

    let state = s3.root.join(&b).join("out/_state");
    assert_eq!(manifests(&state), vec!["contested.json".to_string()]);
    let m = manifest_json(&state, "contested");
    let nonce = m["nonce"].as_str().expect("nonce");
    assert!(
        nonce.ends_with(&format!("-{winner_pid}")),
        "the manifest is not the winner's: {m}"
    );
    assert_eq!(
        m["ledger_files"],
        serde_json::json!([format!("runs/contested/ledger-{nonce}.parquet")])
    );
    // The loser removed its ledger file, its record and its staged files.
    let ledgers: Vec<String> = files_below(&state.join("runs/contested"))
        .into_iter()
        .collect();
    assert_eq!(ledgers.len(), 1, "{ledgers:?}");
    let left: Vec<String> = files_below(&s3.root.join(&b).join("out"))
        .into_iter()
        .filter(|f| f.contains("_staging/") || f.contains("attempts/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A third run with a new id counts the winner's replays once.
    let rep = work.path().join("third.json");
    bf(&env, &run_args(&src, &out, "third", &rep)).ok();
    let outdir = s3.root.join(&b).join("out");
    let (a1, a3) = (
        replay_attempts(&outdir, "contested"),
        replay_attempts(&outdir, "third"),
    );
    assert!(!a1.is_empty());
    let mut common = 0;
    for (id, a) in &a3 {
        if let Some(prev) = a1.get(id) {
            assert_eq!(*a, prev + 1, "attempt of {id} after one committed replay");
            common += 1;
        }
    }
    assert!(common > 0, "no event replayed by both runs");
    let dlq1 = read_output(&outdir.join("dlq"), "contested").rows.len() as u64;
    assert_eq!(num(&read_json(&rep), "skipped_dead_lettered"), dlq1);
}

/// Two runs with different ids on one S3 state, both deciding from the
/// same ledger and holding at their commit: the first to commit wins, the
/// other reads the winner's entry, finds the events they share and exits 4
/// with nothing visible; its rerun counts the winner's attempts. (s3s-fs
/// checks `If-None-Match` before it writes, not atomically, so the proxy
/// lets the two commits reach it one after the other, as a real S3 would
/// order them.)
#[test]
fn two_runs_with_different_ids_on_s3_never_both_act_on_one_event() {
    let (s3, env, b) = s3_with_archive("race-ids", 2000, 20, 4, 2);
    let proxy = proxy_on_commits(s3.port, Action::Hold);
    let via = env.via(&proxy.endpoint);
    let src = format!("s3://{b}/archive");
    let out = format!("s3://{b}/out");
    let args = |id: &'static str| -> Vec<String> {
        ["run", "--source", &src, "--out", &out, "--run-id", id]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let (a1, a2) = (args("left"), args("right"));
    let v1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let v2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let (winner, _, loser) = race_to_commit(&proxy, &via, [&v1, &v2]);
    winner.ok();
    loser.expect_code(4);
    let line = the_error_line(&loser);
    assert!(
        line.contains("conflicts with run") && line.contains("safe to rerun"),
        "{line}"
    );
    let (win_id, lose_id) = if winner.args.contains(&"left".to_string()) {
        ("left", "right")
    } else {
        ("right", "left")
    };
    let root = s3.root.join(&b).join("out");
    assert_eq!(
        manifests(&root.join("_state")),
        vec![format!("{win_id}.json")]
    );
    let leftovers: Vec<String> = files_below(&root)
        .into_iter()
        .filter(|f| f.contains(&format!("run_id={lose_id}")) || f.contains("_staging/"))
        .collect();
    assert!(leftovers.is_empty(), "the loser left {leftovers:?}");

    // The loser's rerun counts the winner's replays: attempt + 1.
    let rerun = bf(&env, &v1_or_v2(&v1, &v2, lose_id));
    rerun.ok();
    let (aw, al) = (
        replay_attempts(&root, win_id),
        replay_attempts(&root, lose_id),
    );
    let mut common = 0;
    for (id, a) in &al {
        if let Some(prev) = aw.get(id) {
            assert_eq!(*a, prev + 1, "attempt of {id} after the winner's replay");
            common += 1;
        }
    }
    assert!(common > 0, "the two runs should share events");
}

fn v1_or_v2<'a>(v1: &[&'a str], v2: &[&'a str], id: &str) -> Vec<&'a str> {
    if v1.contains(&id) {
        v1.to_vec()
    } else {
        v2.to_vec()
    }
}

/// The server killed while the run uploads its outputs: exit 1, one error
/// line naming the URL and the operation, nothing committed; started again
/// on the same folder, the rerun commits once.
#[test]
fn server_killed_mid_upload_commits_nothing_and_the_rerun_commits_once() {
    let mut srv = OwnS3::start();
    srv.create_bucket("lake");
    let env = srv.env();
    generate(&env, "s3://lake/archive", 2000, 20, 9, 2);
    let work = tempfile::tempdir().expect("tempdir");
    let job = job_file(work.path(), "retry.toml", FAST_RETRY);
    let proxy = Proxy::start(&srv.addr());
    proxy.set_rule(|h| {
        if h.method == "PUT" && h.target.contains("/_staging/") {
            Action::Hold
        } else {
            Action::Forward
        }
    });
    let via = env.via(&proxy.endpoint);
    let args = [
        "run",
        "--job",
        &job,
        "--source",
        "s3://lake/archive",
        "--out",
        "s3://lake/out",
        "--run-id",
        "crash",
    ];
    let run = Spawned::start(&args, &via.vars());
    assert!(
        proxy.wait_held(1, Duration::from_secs(90)),
        "the run never uploaded an output; proxy saw:\n{}",
        proxy.log()
    );
    srv.stop();
    proxy.set_dark(true);
    let run = run.wait();
    run.expect_code(1);
    let line = the_error_line(&run);
    assert!(
        line.contains("s3://lake/out/replay") && line.contains("write failed"),
        "the error should name the URL and the operation: {line}"
    );
    assert!(
        line.contains(&format!("{}/lake/out/replay/_staging/", proxy.endpoint)),
        "{line}"
    );
    let state = srv.root().join("lake/out/_state");
    assert!(
        manifests(&state).is_empty(),
        "a manifest after a failed run"
    );

    srv.restart();
    proxy.set_rule(|_| Action::Forward);
    proxy.set_dark(false);
    let rerun = Spawned::start(&args, &via.vars()).wait();
    assert_ok_saying(&rerun, "run crash committed");
    assert_eq!(manifests(&state), vec!["crash.json".to_string()]);
    let again = Spawned::start(&args, &via.vars()).wait();
    assert_ok_saying(&again, "already committed");
    assert_eq!(manifests(&state), vec!["crash.json".to_string()]);
    assert!(
        !read_output(&srv.root().join("lake/out/replay"), "crash")
            .rows
            .is_empty()
    );
}

/// Rejected credentials and missing buckets fail with one clear line; the
/// secret key never shows, on success, on failure, in the report, in the
/// manifest or in a dry run.
#[test]
fn credentials_and_missing_buckets_fail_clearly_and_secrets_never_show() {
    let (s3, env, b) = s3_with_archive("creds", 1000, 10, 4, 1);
    let work = tempfile::tempdir().expect("tempdir");
    let src = format!("s3://{b}/archive");
    let out = format!("s3://{b}/out");
    let mut secrets = vec![env.secret_key.clone()];

    // Rejected credentials: a wrong secret, an unknown key id.
    let wrong_secret = "wrong-secret-d41d8cd98f00".to_string();
    secrets.push(wrong_secret.clone());
    for bad in [
        S3Env {
            secret_key: wrong_secret.clone(),
            ..env.clone()
        },
        S3Env {
            access_key: "no-such-key-id".into(),
            ..env.clone()
        },
    ] {
        let r = bf(
            &bad,
            &["run", "--source", &src, "--out", &out, "--run-id", "x"],
        );
        r.expect_code(1);
        let line = the_error_line(&r);
        assert!(
            line.contains(&format!("s3://{b}/out")) && line.contains("403"),
            "{line}"
        );
        assert!(line.contains(&format!("{}/{b}", env.endpoint)), "{line}");
        for s in &secrets {
            assert!(
                !r.stdout.contains(s) && !r.stderr.contains(s),
                "{}",
                r.describe()
            );
        }
    }

    // A missing bucket, as the source and as the output.
    for (source, target, missing) in [
        (
            "s3://no-such-bucket-src/archive".to_string(),
            out.clone(),
            "no-such-bucket-src",
        ),
        (
            src.clone(),
            "s3://no-such-bucket-out/out".to_string(),
            "no-such-bucket-out",
        ),
    ] {
        let r = bf(
            &env,
            &[
                "run", "--source", &source, "--out", &target, "--run-id", "x",
            ],
        );
        r.expect_code(1);
        let line = the_error_line(&r);
        assert!(
            line.contains(&format!("s3://{missing}/")) && line.contains("NoSuchBucket"),
            "{line}"
        );
        assert!(!line.contains(&env.secret_key), "{line}");
    }
    assert!(manifests(&s3.root.join(&b).join("out/_state")).is_empty());

    // Success, the keys from the job file's [storage] (${ENV} interpolation)
    // and none in the AWS environment: the secret shows nowhere.
    let job = job_file(
        work.path(),
        "storage.toml",
        "[storage]\nendpoint = \"${BF_S3_ENDPOINT}\"\naccess_key_id = \"${BF_S3_KEY}\"\nsecret_access_key = \"${BF_S3_SECRET}\"\nregion = \"us-east-1\"\nallow_http = true\n",
    );
    let vars = vec![
        ("BF_S3_ENDPOINT".to_string(), env.endpoint.clone()),
        ("BF_S3_KEY".to_string(), env.access_key.clone()),
        ("BF_S3_SECRET".to_string(), env.secret_key.clone()),
    ];
    let rep = work.path().join("report.json");
    let mut outputs = vec![];
    for (run_id, dry) in [("dry", true), ("real", false)] {
        let mut args = vec![
            "run",
            "--job",
            &job,
            "--source",
            &src,
            "--out",
            &out,
            "--run-id",
            run_id,
            "--report",
            rep.to_str().unwrap(),
        ];
        if dry {
            args.push("--dry-run");
        }
        let r = Spawned::start(&args, &vars).wait();
        r.ok();
        outputs.push(r.stdout.clone());
        outputs.push(r.stderr.clone());
        outputs.push(std::fs::read_to_string(&rep).expect("report"));
    }
    // And with the keys in the environment.
    let r = bf(&env, &run_args(&src, &out, "env", &rep));
    r.ok();
    outputs.extend([
        r.stdout,
        r.stderr,
        std::fs::read_to_string(&rep).expect("report"),
    ]);
    let state = s3.root.join(&b).join("out/_state");
    assert_eq!(
        manifests(&state),
        vec!["real.json".to_string(), "env.json".to_string()],
        "committed in this order"
    );
    for entry in std::fs::read_dir(state.join("log")).unwrap() {
        outputs.push(std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(outputs[0].contains("dry run"), "{}", outputs[0]);
    for text in &outputs {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "a secret in the output:\n{text}"
            );
        }
    }
}

/// The commit reaches the server but its answer is lost (a 503 instead):
/// the client retries the create-only write, the server answers "exists",
/// and the run must recognise its own manifest rather than report a race
/// it won.
#[test]
fn a_commit_whose_answer_is_lost_is_recognised_as_our_own() {
    let (s3, env, b) = s3_with_archive("lost-answer", 1000, 10, 8, 1);
    let proxy = Proxy::start(&format!("127.0.0.1:{}", s3.port));
    let mut lost = false;
    proxy.set_rule(move |h| {
        if is_manifest_put(h) && !lost {
            lost = true;
            Action::LoseAnswer(503)
        } else {
            Action::Forward
        }
    });
    let src = format!("s3://{b}/archive");
    let out = format!("s3://{b}/out");
    let args = ["run", "--source", &src, "--out", &out, "--run-id", "once"];
    let r = bf(&env.via(&proxy.endpoint), &args);
    let puts = proxy
        .log()
        .lines()
        .filter(|l| l.starts_with("PUT") && l.contains("/_state/log/"))
        .count();
    assert_eq!(
        puts,
        2,
        "the commit should have been retried once:\n{}",
        proxy.log()
    );
    assert_ok_saying(&r, "run once committed");
    let state = s3.root.join(&b).join("out/_state");
    assert_eq!(manifests(&state), vec!["once.json".to_string()]);
    let again = bf(&env, &args);
    assert_ok_saying(&again, "already committed");
}

/// `backfill state gc` on S3: lists (with --dry-run) then removes what
/// uncommitted attempts left, and leaves a committed run alone.
#[test]
fn state_gc_on_s3_removes_uncommitted_leftovers_only() {
    let (s3, env, b) = s3_with_archive("gc", 1000, 10, 6, 1);
    let src = format!("s3://{b}/archive");
    let out = format!("s3://{b}/out");
    let work = tempfile::tempdir().expect("tempdir");
    let job = job_file(work.path(), "retry.toml", FAST_RETRY);
    let run_args = |id: &'static str| -> Vec<String> {
        [
            "run", "--job", &job, "--source", &src, "--out", &out, "--run-id", id,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let strs = |v: &[String]| -> Vec<String> { v.to_vec() };
    let call = |env: &S3Env, v: Vec<String>| {
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        bf(env, &a)
    };
    let root = s3.root.join(&b).join("out");

    // A committed run.
    call(&env, strs(&run_args("kept"))).ok();
    let kept: BTreeSet<String> = files_below(&root);
    assert!(
        kept.iter()
            .all(|f| !f.contains("_staging/") && !f.starts_with("_state/attempts/")),
        "a committed, published run leaves nothing staged: {kept:?}"
    );

    // An attempt whose commit was refused: its outputs stay staged (the
    // outcome of a failed commit is unknown to it, so it deletes nothing).
    let proxy = proxy_on_commits(s3.port, Action::Fail(403));
    let r = call(&env.via(&proxy.endpoint), run_args("refused"));
    r.expect_code(1);
    let line = the_error_line(&r);
    assert!(line.contains("write log entry"), "{line}");

    // An attempt cut off while publishing: committed, outputs still staged.
    let proxy2 = Proxy::start(&format!("127.0.0.1:{}", s3.port));
    proxy2.set_rule(|h| {
        if h.is_copy() {
            Action::Dark
        } else {
            Action::Forward
        }
    });
    let cut = call(&env.via(&proxy2.endpoint), run_args("cut"));
    cut.expect_code(1);
    assert!(
        the_error_line(&cut).contains("is committed, but publishing its outputs failed"),
        "{}",
        cut.describe()
    );

    let leftovers: BTreeSet<String> = files_below(&root).difference(&kept).cloned().collect();
    let refused: BTreeSet<String> = leftovers
        .iter()
        .filter(|f| {
            f.starts_with("_state/runs/refused/ledger-")
                || f.starts_with("_state/attempts/refused/")
                || f.contains("/_staging/run_id=refused/")
        })
        .cloned()
        .collect();
    assert_eq!(
        refused.len(),
        6,
        "3 staged outputs + 1 ledger + 1 attempt record + 1 prepared entry: {leftovers:?}"
    );
    assert!(
        !leftovers
            .iter()
            .any(|f| !f.contains("_staging/") && f.contains("/run_id=refused/")),
        "an uncommitted attempt is visible: {leftovers:?}"
    );
    assert_eq!(
        manifests(&root.join("_state")),
        vec!["kept.json".to_string(), "cut.json".to_string()]
    );

    let gc = |dry: bool| {
        let mut v = vec!["state", "gc", "--out", &out, "--min-age-minutes", "0"];
        if dry {
            v.push("--dry-run");
        }
        let r = bf(&env, &v);
        r.ok();
        r
    };
    let dry = gc(true);
    for f in &refused {
        assert!(
            dry.stdout
                .contains(&format!("would remove s3://{b}/out/{f} ")),
            "{f} not listed\n{}",
            dry.describe()
        );
    }
    assert_says(&dry, "would remove 6 objects");
    assert!(!dry.stdout.contains("kept"), "{}", dry.describe());
    assert_eq!(
        files_below(&root).len(),
        kept.len() + leftovers.len(),
        "a dry run removed something"
    );

    let real = gc(false);
    assert_says(&real, "published the outputs of committed run cut");
    assert_says(&real, "fenced abandoned attempt");
    assert_says(&real, "removed 6 objects");
    let after = files_below(&root);
    assert!(kept.is_subset(&after), "gc touched the committed run");
    assert!(
        !after
            .iter()
            .any(|f| f.contains("_staging/") || f.contains("refused")),
        "{after:?}"
    );
    let cut_files: Vec<&String> = after
        .iter()
        .filter(|f| f.contains("/run_id=cut/"))
        .collect();
    assert_eq!(cut_files.len(), 3, "the cut run rolled forward: {after:?}");
    assert!(gc(true).stdout.contains("would remove 0 objects"));
}

/// `jobs/minio.toml` and `scripts/minio-demo.sh` (the `make minio-demo`
/// path) against s3s-fs instead of MinIO; without Docker the script says so
/// and exits 2.
#[test]
fn minio_job_and_demo_script_run_against_s3s_fs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = repo.join("scripts/minio-demo.sh");
    let srv = services::start_s3_private();
    srv.create_bucket("backfill");
    let work = tempfile::tempdir().expect("tempdir");
    let report = work.path().join("report.json");
    let mut vars = S3Env::of(&srv).vars();
    vars.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    vars.extend([
        ("BACKFILL_S3_ENDPOINT".to_string(), srv.endpoint.clone()),
        (
            "BACKFILL_BIN".to_string(),
            env!("CARGO_BIN_EXE_backfill").to_string(),
        ),
        ("MINIO_DEMO_EVENTS".to_string(), "3000".to_string()),
        (
            "MINIO_DEMO_REPORT".to_string(),
            report.display().to_string(),
        ),
    ]);
    let r = Spawned::start_program(&script, &[], &vars).wait();
    r.ok();
    let rep = read_json(&report);
    assert!(num(&rep, "replayed") > 0, "{rep}");
    assert_eq!(
        num(&rep, "files_scanned") + num(&rep, "files_pruned"),
        6,
        "{rep}"
    );
    assert!(
        rep["state"].as_str().unwrap().starts_with("s3://backfill/"),
        "{rep}"
    );
    let run_id = rep["run_id"].as_str().unwrap();
    let state = srv.root.join("backfill/out/_state");
    assert_eq!(manifests(&state), vec![format!("{run_id}.json")]);
    assert!(!r.stdout.contains(&srv.secret_key) && !r.stderr.contains(&srv.secret_key));

    // No Docker and no endpoint: a clear message, exit 2.
    let no_docker = vec![
        ("DOCKER".to_string(), "/nonexistent/docker".to_string()),
        ("BACKFILL_S3_ENDPOINT".to_string(), String::new()),
    ];
    let r = Spawned::start_program(&script, &[], &no_docker).wait();
    r.expect_code(2);
    assert!(r.stderr.contains("Docker"), "{}", r.describe());
}
