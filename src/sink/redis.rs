//! A Redis server as a sink: `redis://[USER:PASS@]HOST:PORT[/DB]?stream=NAME`
//! appends one Stream entry per row (XADD, the Kafka sink's header names as
//! fields plus `payload`), optionally trimmed (`maxlen=N`, approximate);
//! `?hash_prefix=P[&ttl=SECONDS]` (state-at only) writes one hash per key
//! (DEL + HSET of every column, EXPIRE). Commands go out pipelined,
//! `batch=N` rows at a time (default 1000).
//!
//! Like every sink it commits nothing: everything is acknowledged by the
//! server before `finish` returns, so before the run's commit; a server that
//! goes away fails the write or the finish, and the run with it (exit 1,
//! nothing committed). What was appended before the failure stays (Redis
//! has no transaction spanning a run): a rerun appends again, and a
//! consumer drops repeats by `backfill.event_id` + `backfill.attempt`, as
//! for Kafka. Credentials in the URL are registered as secrets and never
//! shown: messages name the URL redacted.

use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use super::{Sink, SinkContext, SinkError, SinkKind, SinkReceipt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_BATCH: usize = 1000;
/// A hundred years: far past any recovery, well inside Redis's limit.
const MAX_TTL_SECONDS: u64 = 100 * 365 * 24 * 3600;

/// A `redis://` (or `rediss://`, refused: no TLS in this build) target.
pub fn is_redis(target: &str) -> bool {
    target.starts_with("redis://") || target.starts_with("rediss://")
}

/// The options of our query; their values are settings, never secrets.
const OPTIONS: [&str; 5] = ["stream", "maxlen", "hash_prefix", "ttl", "batch"];

/// The target as messages and the run's recorded settings show it: user
/// info redacted, our options with their values in a fixed order (so that
/// `?stream=a&maxlen=9` and `?maxlen=9&stream=a` are one setting, and
/// another stream is another), and any other option by its name alone: its
/// value may be a password under any name (`auth=`, `user=`).
pub fn shown(target: &str) -> String {
    let Ok(mut url) = url::Url::parse(target) else {
        // Not a URL: a password may hold `#`, `?` or `/` unencoded, which
        // would end the user info early for any parser. Everything up to
        // the last `@` is hidden, and everything after the host too.
        let (scheme, rest) = target.split_once("://").unwrap_or(("redis", target));
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let host = host.split(['/', '?', '#']).next().unwrap_or_default();
        let userinfo = if rest.contains('@') { "***@" } else { "" };
        let more = if host.len() + userinfo.len() < rest.len() {
            "/***"
        } else {
            ""
        };
        return format!("{scheme}://{userinfo}{host}{more}");
    };
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if OPTIONS.contains(&k.as_ref()) {
                v.into_owned()
            } else {
                crate::redact::REDACTED.to_string()
            };
            (k.into_owned(), v)
        })
        .collect();
    pairs.sort();
    url.set_query(None);
    let base = crate::redact::url(url.as_str());
    if pairs.is_empty() {
        return base;
    }
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{base}?{}", query.join("&"))
}

/// Where and how rows go.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Stream { name: String, maxlen: Option<u64> },
    Hash { prefix: String, ttl: Option<u64> },
}

/// A parsed target: the connection URL (without our query) and the mode.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    connect: String,
    mode: Mode,
    batch: usize,
}

fn parse_target(target: &str, kind: SinkKind) -> Result<Target, String> {
    if target.starts_with("rediss://") {
        return Err("rediss:// (TLS) is not supported by this build; use redis://".into());
    }
    let mut url = url::Url::parse(target).map_err(|e| {
        format!("not a URL: {e} (in a password, write `/` as %2F, `@` as %40, `:` as %3A, `#` as %23, `?` as %3F)")
    })?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("missing host: expected redis://HOST:PORT[/DB]?stream=NAME".into());
    }
    let (mut stream, mut maxlen, mut prefix, mut ttl, mut batch) = (None, None, None, None, None);
    // Bounded by what Redis takes (a TTL in seconds that its milliseconds
    // still hold; MAXLEN a signed 64-bit count) and by a batch a pipeline
    // can carry: refused before any connection, not after writes.
    let number = |name: &str, v: &str, max: u64| {
        v.parse::<u64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| format!("`{name}` must be a whole number from 1 to {max}"))
    };
    let mut seen: Vec<String> = vec![];
    for (k, v) in url.query_pairs() {
        if seen.contains(&k.to_string()) {
            return Err(format!("option `{k}` given twice"));
        }
        seen.push(k.to_string());
        match k.as_ref() {
            "stream" => stream = Some(v.into_owned()),
            "maxlen" => maxlen = Some(number("maxlen", &v, i64::MAX as u64)?),
            "hash_prefix" => prefix = Some(v.into_owned()),
            "ttl" => ttl = Some(number("ttl", &v, MAX_TTL_SECONDS)?),
            "batch" => batch = Some(number("batch", &v, 100_000)?),
            // The name alone: a value may be anything, a secret included.
            other => {
                return Err(format!(
                    "unknown option `{other}` (stream, maxlen, hash_prefix, ttl, batch)"
                ));
            }
        }
    }
    let mode = match (stream, prefix) {
        (Some(_), Some(_)) => {
            return Err("give `stream` or `hash_prefix`, not both".into());
        }
        (Some(name), None) if !name.is_empty() => {
            if ttl.is_some() {
                return Err("`ttl` applies to hashes (`hash_prefix`), not to a stream".into());
            }
            Mode::Stream { name, maxlen }
        }
        (None, Some(prefix)) if prefix.is_empty() => {
            return Err(
                "`hash_prefix` is empty: each hash would be named by the bare key, beside whatever else the database holds".into(),
            );
        }
        (None, Some(prefix)) if kind == SinkKind::State => {
            if maxlen.is_some() {
                return Err("`maxlen` applies to a stream, not to hashes".into());
            }
            Mode::Hash { prefix, ttl }
        }
        (None, Some(_)) => {
            return Err(format!(
                "`hash_prefix` is for `state-at` (one hash per key); the {} sink appends to a stream: ?stream=NAME",
                kind.name()
            ));
        }
        _ if kind == SinkKind::State => {
            return Err(
                "missing `?hash_prefix=P` (a hash per key) or `?stream=NAME` (a stream to append to)"
                    .into(),
            );
        }
        _ => return Err("missing `?stream=NAME` (the stream to append to)".into()),
    };
    url.set_query(None);
    Ok(Target {
        connect: url.to_string(),
        mode,
        batch: batch.map_or(DEFAULT_BATCH, |b| b as usize),
    })
}

pub struct RedisSink {
    /// The target as shown: redacted.
    shown: String,
    target: Target,
    ctx: SinkContext,
    conn: Option<redis::aio::MultiplexedConnection>,
    pipe: redis::Pipeline,
    /// Rows in `pipe`, not yet sent.
    pending: u64,
    /// Rows the server acknowledged.
    acked: u64,
    first_id: Option<String>,
    last_id: Option<String>,
    batches: u64,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("target", &self.shown)
            .field("acked", &self.acked)
            .finish()
    }
}

impl RedisSink {
    /// Parse and validate the target (no connection yet). Credentials in
    /// it become secrets before anything can show them.
    pub fn new(target: &str, ctx: SinkContext) -> Result<RedisSink, SinkError> {
        crate::redact::register_userinfo(target);
        if let Ok(u) = url::Url::parse(target)
            && let Some(p) = u.password()
        {
            crate::redact::register(p);
            if let Ok(p) = urlencoding_decode(p) {
                crate::redact::register(&p);
            }
        }
        let shown = shown(target);
        let parsed = parse_target(target, ctx.kind).map_err(|message| SinkError::Config {
            kind: ctx.kind.name(),
            target: shown.clone(),
            message,
        })?;
        Ok(RedisSink {
            shown,
            target: parsed,
            ctx,
            conn: None,
            pipe: redis::pipe(),
            pending: 0,
            acked: 0,
            first_id: None,
            last_id: None,
            batches: 0,
        })
    }

    /// A refusal that names the URL's settings (a wrong password, a
    /// missing one, a database the server does not have) is the job's
    /// fault (exit 2: retrying cannot help); anything else is the
    /// server's or the network's.
    fn classify(&self, operation: &'static str, e: redis::RedisError) -> SinkError {
        let text = e.to_string();
        let settings = e.kind() == redis::ErrorKind::AuthenticationFailed
            || [
                "NOAUTH",
                "WRONGPASS",
                "invalid password",
                "DB index is out of range",
            ]
            .iter()
            .any(|m| text.contains(m));
        if settings {
            self.config(format!(
                "the server refused the URL's settings: {}",
                crate::redact::line(&text)
            ))
        } else {
            self.io(operation, e)
        }
    }

    fn io(&self, operation: &'static str, e: impl std::fmt::Display) -> SinkError {
        SinkError::Io {
            kind: self.ctx.kind.name(),
            target: self.shown.clone(),
            operation,
            message: crate::redact::line(&e.to_string()),
        }
    }

    fn config(&self, message: String) -> SinkError {
        SinkError::Config {
            kind: self.ctx.kind.name(),
            target: self.shown.clone(),
            message,
        }
    }

    async fn connection(&mut self) -> Result<redis::aio::MultiplexedConnection, SinkError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let client = redis::Client::open(self.target.connect.as_str())
            .map_err(|e| self.config(crate::redact::line(&e.to_string())))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.classify("connect", e))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Queue one batch's commands.
    fn queue(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let settings = self.ctx.kafka.clone().unwrap_or_default();
        let msgs = crate::kafka::encode_messages(
            batch,
            self.ctx.kind,
            &self.ctx.columns,
            &settings,
            &self.ctx.run_id,
        )
        .map_err(|m| self.config(m))?;
        match self.target.mode.clone() {
            Mode::Stream { name, maxlen } => {
                for (row, headers) in msgs.headers.iter().enumerate() {
                    let cmd = self.pipe.cmd("XADD").arg(&name);
                    if let Some(n) = maxlen {
                        cmd.arg("MAXLEN").arg("~").arg(n);
                    }
                    cmd.arg("*");
                    for (field, value) in headers {
                        cmd.arg(*field).arg(value);
                    }
                    if let Some(v) = &msgs.values[row] {
                        cmd.arg("payload").arg(v.as_slice());
                    }
                }
            }
            Mode::Hash { prefix, ttl } => {
                let Some(keys) = &msgs.keys else {
                    return Err(self.config(format!(
                        "hash_prefix needs a key column '{}' in the rows",
                        self.ctx.columns.key
                    )));
                };
                let columns: Vec<(String, arrow::array::ArrayRef)> = batch
                    .schema()
                    .fields()
                    .iter()
                    .zip(batch.columns())
                    .map(|(f, c)| {
                        let text = arrow::compute::cast(c, &DataType::Utf8)
                            .map_err(|e| self.config(format!("column '{}': {e}", f.name())))?;
                        Ok((f.name().clone(), text))
                    })
                    .collect::<Result<_, SinkError>>()?;
                for row in 0..batch.num_rows() {
                    if !keys.is_valid(row) {
                        return Err(self.config(format!(
                            "a row has no key (column '{}' is null); a hash needs one",
                            self.ctx.columns.key
                        )));
                    }
                    let mut key = prefix.as_bytes().to_vec();
                    key.extend_from_slice(keys.value(row));
                    self.pipe.cmd("DEL").arg(&key).ignore();
                    let cmd = self.pipe.cmd("HSET").arg(&key);
                    for (name, text) in &columns {
                        let text = text.as_string::<i32>();
                        if text.is_valid(row) {
                            cmd.arg(name).arg(text.value(row));
                        }
                    }
                    cmd.ignore();
                    if let Some(t) = ttl {
                        self.pipe.cmd("EXPIRE").arg(&key).arg(t).ignore();
                    }
                    // One reply a row: the row count is what was written.
                    self.pipe.cmd("EXISTS").arg(&key);
                }
            }
        }
        self.pending += batch.num_rows() as u64;
        Ok(())
    }

    /// Send what is queued and wait for every reply.
    async fn flush(&mut self) -> Result<(), SinkError> {
        if self.pending == 0 {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io("write", e))?;
        if replies.len() as u64 != self.pending {
            return Err(self.io(
                "write",
                format!("{} of {} rows acknowledged", replies.len(), self.pending),
            ));
        }
        if matches!(self.target.mode, Mode::Stream { .. }) {
            let id = |v: &redis::Value| match v {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            };
            if self.first_id.is_none() {
                self.first_id = replies.first().and_then(id);
            }
            if let Some(last) = replies.last().and_then(id) {
                self.last_id = Some(last);
            }
        }
        self.acked += self.pending;
        self.pending = 0;
        self.batches += 1;
        // The test suite stops the server here, between two batches.
        crate::failpoint::hit("redis_after_batch")
            .await
            .map_err(|e| self.io("write", e.line()))?;
        Ok(())
    }
}

/// `%XX` decoding of a URL's password, so that the secret the user typed
/// (not only its encoded form) is registered.
fn urlencoding_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
}

#[async_trait]
impl Sink for RedisSink {
    async fn check(&mut self) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify("health check", e))?;
        if pong != "PONG" {
            return Err(self.io("health check", format!("PING answered {pong:?}")));
        }
        Ok(())
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // Sliced so that a pipeline never holds more than `batch` rows.
        let step = self.target.batch;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let room = step - self.pending as usize;
            let len = room.min(batch.num_rows() - offset);
            self.queue(&batch.slice(offset, len))?;
            offset += len;
            if self.pending as usize >= step {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.flush().await?;
        let outputs = match (&self.target.mode, &self.first_id, &self.last_id) {
            (Mode::Stream { name, .. }, Some(a), Some(b)) => {
                vec![format!("stream {name} {a}..{b}")]
            }
            (Mode::Hash { prefix, .. }, _, _) if self.acked > 0 => {
                vec![format!("hashes {prefix}*")]
            }
            _ => vec![],
        };
        Ok(SinkReceipt {
            target: self.shown.clone(),
            rows: self.acked,
            outputs,
            staged: None,
            delivered: None,
        })
    }

    async fn publish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Nothing to undo: what the server acknowledged stays (at-least-once);
    /// what is queued is dropped.
    async fn abort(&mut self) {
        self.pipe = redis::pipe();
        self.pending = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_errors_name_the_option() {
        let t = parse_target(
            "redis://h:6379/2?stream=s&maxlen=100&batch=7",
            SinkKind::Replay,
        )
        .expect("valid");
        assert_eq!(t.connect, "redis://h:6379/2");
        assert_eq!(
            t.mode,
            Mode::Stream {
                name: "s".into(),
                maxlen: Some(100)
            }
        );
        assert_eq!(t.batch, 7);
        let t =
            parse_target("redis://h:6379?hash_prefix=st:&ttl=60", SinkKind::State).expect("valid");
        assert_eq!(
            t.mode,
            Mode::Hash {
                prefix: "st:".into(),
                ttl: Some(60)
            }
        );
        for (url, kind, want) in [
            ("redis://h:1", SinkKind::Replay, "missing `?stream=NAME`"),
            (
                "redis://h:1?stream=s&pw=SECRET",
                SinkKind::Replay,
                "unknown option `pw`",
            ),
            (
                "redis://h:1?hash_prefix=p",
                SinkKind::Dlq,
                "`hash_prefix` is for `state-at`",
            ),
            (
                "redis://h:1?stream=s&maxlen=0",
                SinkKind::Replay,
                "`maxlen` must be",
            ),
            (
                "redis://h:1?stream=s&ttl=5",
                SinkKind::Replay,
                "`ttl` applies to hashes",
            ),
            ("rediss://h:1?stream=s", SinkKind::Replay, "not supported"),
            (
                "redis://h:1?stream=s&maxlen=18446744073709551615",
                SinkKind::Replay,
                "`maxlen` must be a whole number from 1 to 9223372036854775807",
            ),
            (
                "redis://h:1?hash_prefix=p&ttl=9223372036854775807",
                SinkKind::State,
                "`ttl` must be a whole number from 1 to 3153600000",
            ),
            (
                "redis://h:1?stream=a&stream=b",
                SinkKind::Replay,
                "option `stream` given twice",
            ),
            (
                "redis://h:1?hash_prefix=",
                SinkKind::State,
                "`hash_prefix` is empty",
            ),
        ] {
            let e = parse_target(url, kind).expect_err(url);
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    /// Our options keep their values, in one order (one setting however
    /// spelled); any other option and the user info are hidden.
    #[test]
    fn shown_hides_secrets_and_keeps_settings() {
        assert_eq!(
            shown("redis://h:1/2?maxlen=9&stream=s"),
            shown("redis://h:1/2?stream=s&maxlen=9")
        );
        assert_eq!(
            shown("redis://h:1/2?stream=s&maxlen=9"),
            "redis://h:1/2?maxlen=9&stream=s"
        );
        assert_ne!(shown("redis://h:1?stream=a"), shown("redis://h:1?stream=b"));
        for url in [
            "redis://h:1?stream=s&auth=TOPSECRET",
            "redis://h:1?stream=s&user=TOPSECRET",
            "redis://:TOPSECRET@h:1?stream=s",
            "redis://u:TOP%2FSECRET@h:1?stream=s",
            "redis://u:TOPSECRET#XYZ@h:1?stream=s",
            "redis://u:TOPSECRET?XYZ@h:1?stream=s",
            "redis://u:TOP/SECRET@h:1?stream=s",
        ] {
            let s = shown(url);
            assert!(!s.contains("TOP") && !s.contains("XYZ"), "{url}: {s}");
            assert!(s.contains("h:1"), "{url}: {s}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(urlencoding_decode("p%40ss%2Fw").as_deref(), Ok("p@ss/w"));
        assert_eq!(urlencoding_decode("plain").as_deref(), Ok("plain"));
    }
}
