//! Real servers for the integration tests: a Kafka-protocol broker (Tansu)
//! and an S3-compatible server (s3s-fs), each started once per test process
//! on a free port and shared by every test.
//!
//! Why a watchdog: `cargo test` runs all tests in one process and never drops
//! statics, so a server started here must die with the process however it
//! ends (pass, panic, Ctrl-C, SIGKILL). Each server runs under a small bash
//! watchdog whose stdin is a pipe from this process: when the process exits
//! the pipe closes, `read` returns, and the watchdog kills the server and
//! removes its scratch folder. Tests that need to stop a server mid-run start
//! a private one ([`start_kafka_private`], [`start_s3_private`]), killed on
//! drop.
//!
//! The binaries come from `scripts/install-tools.sh` (in `$BACKFILL_CACHE/bin`
//! or `~/.cache/event-backfill/bin`); nothing here downloads anything.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `scripts/install-tools.sh` puts the servers.
pub fn tools_bin_dir() -> PathBuf {
    let cache = match std::env::var_os("BACKFILL_CACHE") {
        Some(c) => PathBuf::from(c),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
            PathBuf::from(home).join(".cache/event-backfill")
        }
    };
    cache.join("bin")
}

fn tool(name: &str) -> PathBuf {
    let path = tools_bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} is not installed at {}: run scripts/install-tools.sh (about 10 minutes once)",
            path.display()
        );
    }
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    l.local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// A scratch folder for one server, removed by its watchdog.
fn scratch_dir(name: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("backfill-it-{name}-"))
        .tempdir()
        .expect("create a scratch folder in the temp dir")
        .keep()
}

/// A server process under its watchdog.
struct Watched {
    name: &'static str,
    child: Child,
    /// Closing (or writing a line to) this pipe makes the watchdog kill the
    /// server.
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    log: PathBuf,
}

impl Watched {
    /// `dir` (from [`scratch_dir`]) holds the log and is removed with the
    /// server.
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        port: u16,
        dir: PathBuf,
    ) -> Watched {
        let log = dir.join("server.log");
        // $0 is the server, $@ its arguments: no quoting games. The server's
        // own stdin is /dev/null so that only the watchdog reads the pipe.
        let script = r#"exec 3<&0
"$0" "$@" </dev/null >"$BACKFILL_SERVICE_LOG" 2>&1 &
s=$!
read -r _ <&3
kill -KILL "$s" 2>/dev/null
wait "$s" 2>/dev/null
rm -rf "$BACKFILL_SERVICE_DIR""#;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .env("BACKFILL_SERVICE_LOG", &log)
            .env("BACKFILL_SERVICE_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bash to watch {name}: {e}"));
        let stdin = child.stdin.take();
        let mut w = Watched {
            name,
            child,
            stdin,
            dir,
            log,
        };
        w.wait_listening(port);
        w
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_listening(&mut self, port: u16) {
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse().expect("socket address"),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening on port {port}; its output:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if start.elapsed() > STARTUP_TIMEOUT {
                let tail = self.log_tail();
                self.kill();
                panic!(
                    "{} did not listen on port {port} within {} s; its output:\n{tail}",
                    self.name,
                    STARTUP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the server now and wait for it to be gone.
    fn kill(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Tansu broker (memory storage) on 127.0.0.1.
pub struct KafkaServer {
    /// `127.0.0.1:PORT`, for `bootstrap.servers` and `kafka://` URLs.
    pub bootstrap: String,
    pub port: u16,
    process: Option<Watched>,
}

impl KafkaServer {
    fn start_on(port: u16) -> KafkaServer {
        let listener = format!("tcp://127.0.0.1:{port}");
        let args = vec![
            "broker".to_string(),
            "--listener-url".into(),
            listener.clone(),
            "--advertised-listener-url".into(),
            listener,
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ];
        let process = Watched::spawn("tansu", &tool("tansu"), &args, port, scratch_dir("tansu"));
        KafkaServer {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            process: Some(process),
        }
    }

    /// `kafka://127.0.0.1:PORT/TOPIC`.
    pub fn url(&self, topic: &str) -> String {
        format!("kafka://{}/{topic}", self.bootstrap)
    }

    /// Kill the broker (SIGKILL: a crash, not a shutdown). Private brokers only.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Start a fresh broker on the same port. Its storage is in memory, so
    /// topics must be created again.
    pub fn restart(&mut self) {
        self.stop();
        *self = KafkaServer::start_on(self.port);
    }

    /// The broker's output so far, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(Watched::log_tail)
            .unwrap_or_default()
    }

    /// Create a topic through the Kafka admin API and wait until its metadata
    /// shows every partition.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        use rdkafka::ClientConfig;
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;

        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .unwrap_or_else(|e| panic!("create topic {topic} on {}: {e}", self.bootstrap));
        for r in results {
            if let Err((name, code)) = r {
                panic!("create topic {name} on {}: {code}", self.bootstrap);
            }
        }
        let start = Instant::now();
        loop {
            let md = admin
                .inner()
                .fetch_metadata(Some(topic), Duration::from_secs(5));
            if let Ok(md) = md
                && md
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.partitions().len() == partitions as usize)
            {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "topic {topic} not visible on {} after creation",
                    self.bootstrap
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An s3s-fs server serving a scratch folder on 127.0.0.1.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// The served folder: each directory directly under it is a bucket.
    /// Removed with the server.
    pub root: PathBuf,
    pub port: u16,
    process: Option<Watched>,
}

impl S3Server {
    fn start() -> S3Server {
        let port = free_port();
        let dir = scratch_dir("s3s-fs");
        let root = dir.join("root");
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("create the S3 root {}: {e}", root.display()));
        let access_key = "backfill-test-key".to_string();
        let secret_key = "backfill-test-secret".to_string();
        let args = vec![
            "--host".to_string(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--access-key".into(),
            access_key.clone(),
            "--secret-key".into(),
            secret_key.clone(),
            root.display().to_string(),
        ];
        let process = Watched::spawn("s3s-fs", &tool("s3s-fs"), &args, port, dir);
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            root,
            port,
            process: Some(process),
        }
    }

    /// Create a bucket (a directory under the served root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name))
            .unwrap_or_else(|e| panic!("create bucket {name} under {}: {e}", self.root.display()));
    }

    /// Environment for object_store / the CLI to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Kill the server (SIGKILL). Private servers only.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(Watched::log_tail)
            .unwrap_or_default()
    }
}

/// A redis-server (no persistence) on 127.0.0.1, from the tools' cache
/// (scripts/install-tools.sh links it there) or PATH.
pub struct RedisServer {
    pub port: u16,
    process: Option<Watched>,
}

impl RedisServer {
    fn start_on(port: u16) -> RedisServer {
        let cached = tools_bin_dir().join("redis-server");
        let program = if cached.exists() {
            cached
        } else {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
                .unwrap_or_else(|| {
                    panic!("redis-server is not installed: run scripts/install-tools.sh redis")
                })
        };
        let dir = scratch_dir("redis");
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            // Small stream nodes, so that approximate trimming (MAXLEN ~)
            // trims near the limit even in a small test.
            "--stream-node-max-entries",
            "10",
            "--dir",
            &dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Watched::spawn("redis-server", &program, &args, port, dir);
        RedisServer {
            port,
            process: Some(process),
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kill the server (SIGKILL). Private servers only.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// A fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        *self = RedisServer::start_on(self.port);
    }

    /// A plain client connection, for reading back what a sink wrote.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port))
    }
}

static REDIS: OnceLock<RedisServer> = OnceLock::new();

/// The shared Redis server, started on first use; killed when the test
/// binary exits. Use fresh key and stream names per test.
pub fn redis() -> &'static RedisServer {
    REDIS.get_or_init(|| RedisServer::start_on(free_port()))
}

/// A Redis server of the calling test's own, killed when dropped.
pub fn start_redis_private() -> RedisServer {
    RedisServer::start_on(free_port())
}

/// A Ballista cluster of this binary's own `backfill scheduler` and
/// `backfill executor` processes on 127.0.0.1. The executors start
/// without any `AWS_*` variable: what they read from S3 they read with the
/// settings the client's query carries.
pub struct BallistaCluster {
    /// `df://127.0.0.1:PORT`.
    pub url: String,
    scheduler: Option<Watched>,
    executors: Vec<Option<Watched>>,
}

impl BallistaCluster {
    /// A scheduler that declares an executor dead after
    /// `executor_timeout` seconds of silence, and `executors` executors of
    /// two task slots each, beating three times as often.
    pub fn start(executors: usize, executor_timeout: u64) -> BallistaCluster {
        Self::start_logging(
            executors,
            executor_timeout,
            "info",
            "warn,event_backfill=info,ballista_executor=info",
        )
    }

    /// [`BallistaCluster::start`] with the scheduler's and the executors'
    /// `--log-level`.
    pub fn start_logging(
        executors: usize,
        executor_timeout: u64,
        scheduler_log: &str,
        executor_log: &str,
    ) -> BallistaCluster {
        let bin = Path::new(env!("CARGO_BIN_EXE_backfill"));
        let port = free_port();
        let args = vec![
            "scheduler".to_string(),
            "--bind".into(),
            format!("127.0.0.1:{port}"),
            "--executor-timeout".into(),
            executor_timeout.to_string(),
            "--log-level".into(),
            scheduler_log.into(),
        ];
        let scheduler = Watched::spawn(
            "backfill scheduler",
            bin,
            &args,
            port,
            scratch_dir("scheduler"),
        );
        let url = format!("df://127.0.0.1:{port}");
        // Three heartbeats per timeout: a live executor is never taken
        // for dead.
        let heartbeat = (executor_timeout / 3).max(1);
        let executors = (0..executors)
            .map(|_| {
                let (flight, grpc) = (free_port(), free_port());
                let dir = scratch_dir("executor");
                let work = dir.join("work");
                std::fs::create_dir_all(&work).expect("executor work dir");
                let mut args: Vec<String> = [
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_ENDPOINT_URL",
                    "AWS_REGION",
                    "AWS_ALLOW_HTTP",
                    "AWS_SESSION_TOKEN",
                ]
                .iter()
                .flat_map(|v| ["-u".to_string(), v.to_string()])
                .collect();
                args.extend([
                    bin.display().to_string(),
                    "executor".into(),
                    "--scheduler".into(),
                    url.clone(),
                    "--port".into(),
                    flight.to_string(),
                    "--grpc-port".into(),
                    grpc.to_string(),
                    "--concurrent-tasks".into(),
                    "2".into(),
                    "--heartbeat-interval".into(),
                    heartbeat.to_string(),
                    "--work-dir".into(),
                    work.display().to_string(),
                    "--log-level".into(),
                    executor_log.into(),
                ]);
                Some(Watched::spawn(
                    "backfill executor",
                    Path::new("/usr/bin/env"),
                    &args,
                    flight,
                    dir,
                ))
            })
            .collect();
        BallistaCluster {
            url,
            scheduler: Some(scheduler),
            executors,
        }
    }

    /// Kill executor `i` (SIGKILL).
    pub fn kill_executor(&mut self, i: usize) {
        if let Some(mut e) = self.executors[i].take() {
            e.kill();
        }
    }

    /// Every process's whole log.
    pub fn logs(&self) -> String {
        std::iter::once(&self.scheduler)
            .chain(self.executors.iter())
            .flatten()
            .map(|w| std::fs::read_to_string(&w.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last lines of every process's log.
    pub fn log_tail(&self) -> String {
        std::iter::once(&self.scheduler)
            .chain(self.executors.iter())
            .flatten()
            .map(|w| format!("--- {}\n{}", w.name, w.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

static CLUSTER: OnceLock<BallistaCluster> = OnceLock::new();

/// The shared cluster (a scheduler and two executors), started on first use.
pub fn cluster() -> &'static BallistaCluster {
    CLUSTER.get_or_init(|| BallistaCluster::start(2, 180))
}

static KAFKA: OnceLock<KafkaServer> = OnceLock::new();
static S3: OnceLock<S3Server> = OnceLock::new();

/// The shared broker, started on first use. Use a fresh topic per test.
pub fn kafka() -> &'static KafkaServer {
    KAFKA.get_or_init(|| KafkaServer::start_on(free_port()))
}

/// The shared S3 server, started on first use. Use a fresh bucket per test.
pub fn s3() -> &'static S3Server {
    S3.get_or_init(S3Server::start)
}

/// A broker of the calling test's own, killed when dropped.
pub fn start_kafka_private() -> KafkaServer {
    KafkaServer::start_on(free_port())
}

/// An S3 server of the calling test's own, killed when dropped.
pub fn start_s3_private() -> S3Server {
    S3Server::start()
}

/// A name no other test (or earlier run against a shared server) uses.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The fixtures themselves: a bucket made as a directory is served over S3,
/// and a private broker accepts connections and is gone after `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_serve_and_stop() {
    use event_backfill::location::{StorageSettings, resolve};
    use object_store::{ObjectStoreExt, PutPayload};

    let s3 = s3();
    let bucket = unique_name("fixture");
    s3.create_bucket(&bucket);
    let storage = StorageSettings {
        endpoint: Some(s3.endpoint.clone()),
        access_key_id: Some(s3.access_key.clone()),
        secret_access_key: Some(s3.secret_key.clone()),
        allow_http: Some(true),
        ..StorageSettings::default()
    };
    let loc = resolve(&format!("s3://{bucket}/dir"), &storage).expect("resolve s3 URL");
    let path = loc.path("hello.txt");
    loc.store
        .put(&path, PutPayload::from_static(b"hi"))
        .await
        .unwrap_or_else(|e| panic!("put to {}: {e}\n{}", s3.endpoint, s3.log_tail()));
    let got = loc
        .store
        .get(&path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&got[..], b"hi");
    assert!(s3.root.join(&bucket).join("dir/hello.txt").is_file());

    let mut k = start_kafka_private();
    let addr = format!("127.0.0.1:{}", k.port);
    assert!(TcpStream::connect(&addr).is_ok());
    k.stop();
    assert!(TcpStream::connect(&addr).is_err(), "{addr} still listening");
}
