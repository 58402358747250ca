//! Kafka: the job file's `[kafka]` settings, the `kafka://` URL, the
//! replay/DLQ/gaps sink ([`sink::KafkaSink`]) and the topic source
//! ([`source::read_topic`]).
//!
//! Replaying into the bus is what a backfill is for, so Kafka is a peer of the
//! Parquet sink behind the same [`crate::sink::Sink`] trait and obeys the same
//! commit protocol: the sink makes every message durable (acknowledged, or
//! inside a transaction) and never commits the run itself.
//!
//! This module must never print a secret: librdkafka properties such as
//! `sasl.password` only leave it through [`KafkaSettings::redacted`], and the
//! `Debug` and `Serialize` forms of the settings are redacted too.

pub mod sink;
pub mod source;

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize, Serializer};

pub use sink::KafkaSink;
pub use source::{TopicRead, Undecodable, read_topic};

use crate::sink::{Sink, SinkContext, SinkError};

/// What a message's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// The payload column's bytes, unchanged: the consumer sees exactly what
    /// the original producer sent.
    Payload,
    /// The whole row as one JSON object (every column, `backfill_*` included).
    Json,
}

/// Which time a message carries as its Kafka timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampSource {
    /// The event's own time (the event_time column, in milliseconds), so that
    /// time-based consumers and retention treat a replay like the original.
    #[default]
    EventTime,
    /// The time of production (the broker's or producer's clock).
    ProduceTime,
}

/// The job file's `[kafka]` section: how the Kafka sinks produce and how the
/// Kafka source reads.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// librdkafka properties, passed through untouched (`security.protocol`,
    /// `sasl.mechanisms`, `sasl.username`, `sasl.password`, `ssl.*`,
    /// `compression.type`, `linger.ms`, ...). Write secrets as `${NAME}`: the
    /// job file reader replaces them from the environment, and secret values
    /// are never printed. A property set here wins
    /// over backfill's defaults (`enable.idempotence=true`,
    /// `partitioner=murmur2_random`). The brokers come from the URL, not from
    /// `bootstrap.servers`.
    #[serde(default, serialize_with = "serialize_redacted")]
    pub properties: BTreeMap<String, String>,
    /// The message value: `"payload"` (the payload column's bytes unchanged)
    /// or `"json"` (the whole row as a JSON object). Default: `"payload"` when
    /// the rows have a payload column, else `"json"`. Gap records are always
    /// JSON.
    #[serde(default)]
    pub value: Option<ValueFormat>,
    /// The message timestamp: `"event_time"` (default; the event's time) or
    /// `"produce_time"`.
    #[serde(default)]
    pub timestamp: TimestampSource,
    /// Produce each run's messages in one Kafka transaction, committed before
    /// the run is committed and aborted when the run fails, so that
    /// `read_committed` consumers see a run whole or not at all. Each sink uses
    /// `<transactional_id>.<replay|dlq|gaps>` so that two sinks never fence
    /// each other; keep it stable across runs so a crashed run's producer is
    /// fenced by the next one.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Let the broker create a missing topic at the first message (when the
    /// broker allows it too). Off by default: a typo in a topic name should
    /// fail the health check, not create a topic nobody reads.
    #[serde(default)]
    pub allow_auto_create_topics: bool,
    /// The column holding the event's original Kafka topic, sent as header
    /// `backfill.original.topic` when present. The Kafka source writes the
    /// topic it read under this name.
    #[serde(default = "default_original_topic_column")]
    pub original_topic_column: String,
    /// The column holding the original partition (`backfill.original.partition`).
    #[serde(default = "default_original_partition_column")]
    pub original_partition_column: String,
    /// The column holding the original offset (`backfill.original.offset`).
    #[serde(default = "default_original_offset_column")]
    pub original_offset_column: String,
    /// The column holding the original Kafka timestamp
    /// (`backfill.original.timestamp`, milliseconds since the epoch).
    #[serde(default = "default_original_timestamp_column")]
    pub original_timestamp_column: String,
    /// How long to wait, in milliseconds, before retrying when librdkafka's
    /// local queue is full (`queue.buffering.max.messages`); the producer keeps
    /// going as deliveries free room.
    #[serde(default = "default_queue_full_backoff_ms")]
    pub queue_full_backoff_ms: u64,
    /// How long librdkafka keeps trying to deliver a message, in milliseconds
    /// (librdkafka's `message.timeout.ms`; that property, if set, wins). A
    /// message not acknowledged by then fails the run, nothing committed. One
    /// minute by default: a batch job should fail and be rerun rather than
    /// hang when a broker is gone.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
}

fn default_original_topic_column() -> String {
    "kafka_topic".into()
}
fn default_original_partition_column() -> String {
    "kafka_partition".into()
}
fn default_original_offset_column() -> String {
    "kafka_offset".into()
}
fn default_original_timestamp_column() -> String {
    "kafka_timestamp".into()
}
fn default_queue_full_backoff_ms() -> u64 {
    10
}
fn default_message_timeout_ms() -> u64 {
    60_000
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            properties: BTreeMap::new(),
            value: None,
            timestamp: TimestampSource::default(),
            transactional_id: None,
            allow_auto_create_topics: false,
            original_topic_column: default_original_topic_column(),
            original_partition_column: default_original_partition_column(),
            original_offset_column: default_original_offset_column(),
            original_timestamp_column: default_original_timestamp_column(),
            queue_full_backoff_ms: default_queue_full_backoff_ms(),
            message_timeout_ms: default_message_timeout_ms(),
        }
    }
}

impl fmt::Debug for KafkaSettings {
    // Hand-written so that `{:?}` in a log line or a panic never shows a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("properties", &self.redacted())
            .field("value", &self.value)
            .field("timestamp", &self.timestamp)
            .field("transactional_id", &self.transactional_id)
            .field("allow_auto_create_topics", &self.allow_auto_create_topics)
            .field("original_topic_column", &self.original_topic_column)
            .field("original_partition_column", &self.original_partition_column)
            .field("original_offset_column", &self.original_offset_column)
            .field("original_timestamp_column", &self.original_timestamp_column)
            .field("queue_full_backoff_ms", &self.queue_full_backoff_ms)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .finish()
    }
}

/// What a redacted secret looks like.
pub const REDACTED: &str = "***";

/// True for librdkafka properties whose value is a secret (passwords, keys,
/// tokens, JAAS and OAuth configs). Errs on the side of hiding.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "sasl.jaas.config",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
        "ssl.keystore",
        "private",
    ]
    .iter()
    .any(|s| n.contains(s))
}

fn serialize_redacted<S: Serializer>(
    props: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    redact(props).serialize(s)
}

fn redact(props: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    props
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) {
                REDACTED.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

impl KafkaSettings {
    /// The properties as they may be shown to a person: secret values
    /// replaced by `***`.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        redact(&self.properties)
    }
}

/// Errors of the Kafka source and of Kafka settings; each names the URL,
/// topic or property at fault (never a secret value).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    #[error("Kafka URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("Kafka property '{property}': {reason}")]
    Property { property: String, reason: String },
    #[error("{url}: cannot create the Kafka client: {message}")]
    Client { url: String, message: String },
    #[error("{url}: topic '{topic}' does not exist on {bootstrap}")]
    TopicMissing {
        url: String,
        topic: String,
        bootstrap: String,
    },
    #[error("{url}: {operation} failed: {message}")]
    Broker {
        url: String,
        operation: &'static str,
        message: String,
    },
    #[error("{url}: cannot decode the topic's messages: {message}")]
    Decode { url: String, message: String },
}

impl KafkaError {
    /// True when the user's settings are at fault (exit 2), not the broker.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            KafkaError::Url { .. }
                | KafkaError::Property { .. }
                | KafkaError::Client { .. }
                | KafkaError::TopicMissing { .. }
        )
    }
}

/// A parsed `kafka://HOST:PORT[,HOST:PORT]/TOPIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaUrl {
    /// The URL as the user wrote it, for messages.
    pub original: String,
    /// `HOST:PORT[,HOST:PORT]`, librdkafka's `bootstrap.servers`.
    pub bootstrap: String,
    pub topic: String,
}

/// Parse `kafka://HOST:PORT[,HOST:PORT]/TOPIC`. Credentials in the URL are
/// refused (they would be echoed in every message); use `[kafka] properties`.
pub fn parse_url(url: &str) -> Result<KafkaUrl, KafkaError> {
    let invalid = |reason: String| KafkaError::Url {
        url: url.to_string(),
        reason,
    };
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| invalid("expected kafka://HOST:PORT[,HOST:PORT]/TOPIC".into()))?;
    let Some((hosts, topic)) = rest.split_once('/') else {
        return Err(invalid(
            "missing topic: expected kafka://HOST:PORT[,HOST:PORT]/TOPIC".into(),
        ));
    };
    if hosts.contains('@') {
        return Err(KafkaError::Url {
            url: crate::location::redact_userinfo(url),
            reason: "credentials in the URL are not accepted; set sasl.username and \
                     sasl.password in [kafka] properties"
                .into(),
        });
    }
    if hosts.is_empty() {
        return Err(invalid("missing broker address (HOST:PORT)".into()));
    }
    let mut brokers = Vec::new();
    for broker in hosts.split(',') {
        let Some((host, port)) = broker.rsplit_once(':') else {
            return Err(invalid(format!(
                "broker '{broker}' has no port (HOST:PORT)"
            )));
        };
        let host_ok = if let Some(h) = host.strip_prefix('[') {
            h.strip_suffix(']').is_some_and(|h| !h.is_empty())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        };
        if !host_ok {
            return Err(invalid(format!("broker '{broker}' has an invalid host")));
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid(format!(
                "broker '{broker}': port '{port}' is not a number from 1 to 65535"
            )));
        }
        brokers.push(broker);
    }
    validate_topic(topic).map_err(invalid)?;
    Ok(KafkaUrl {
        original: url.to_string(),
        bootstrap: brokers.join(","),
        topic: topic.to_string(),
    })
}

/// Kafka's own topic rules, checked here so the user hears about a bad name
/// before the scan rather than from the broker after it.
fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("missing topic after the '/'".into());
    }
    if topic == "." || topic == ".." {
        return Err(format!("'{topic}' is not a valid topic name"));
    }
    if topic.len() > 249 {
        return Err(format!(
            "topic name is {} characters long; Kafka allows at most 249",
            topic.len()
        ));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "topic '{topic}' contains '{c}'; Kafka topics use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Which client a configuration is for; decides backfill's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Producer,
    Consumer,
}

/// The librdkafka configuration: backfill's defaults, then the user's
/// properties (which win), then the brokers from the URL.
pub(crate) fn client_config(
    url: &KafkaUrl,
    settings: &KafkaSettings,
    role: Role,
) -> Result<ClientConfig, KafkaError> {
    let props = &settings.properties;
    if let Some(b) = props.get("bootstrap.servers")
        && b != &url.bootstrap
    {
        return Err(KafkaError::Property {
            property: "bootstrap.servers".into(),
            reason: format!(
                "set to '{b}' but the URL '{}' names '{}'; give the brokers in the URL only",
                url.original, url.bootstrap
            ),
        });
    }
    let mut cfg = ClientConfig::new();
    // Make librdkafka's own log lines (which the default context forwards to
    // the `log` facade) carry a recognisable client id.
    match role {
        Role::Producer => {
            cfg.set("client.id", "backfill")
                // Retries neither reorder nor duplicate within a run.
                .set("enable.idempotence", "true")
                // The Java client's partitioner: a key lands in the partition
                // where a Java producer would have put the original event.
                .set("partitioner", "murmur2_random")
                .set(
                    "message.timeout.ms",
                    settings.message_timeout_ms.to_string(),
                )
                .set(
                    "allow.auto.create.topics",
                    if settings.allow_auto_create_topics {
                        "true"
                    } else {
                        "false"
                    },
                );
        }
        Role::Consumer => {
            // librdkafka wants a group id even for assigned partitions; a
            // fresh one joins nothing and owns no committed offsets. A
            // `group.id` property (for ACLs) wins.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            cfg.set("client.id", "backfill-reader")
                .set(
                    "group.id",
                    format!("backfill-reader-{}-{nanos}", std::process::id()),
                )
                // A backfill must not disturb live consumers: no group
                // membership is used (partitions are assigned), and nothing is
                // ever committed.
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("enable.partition.eof", "true")
                .set("allow.auto.create.topics", "false");
        }
    }
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", &url.bootstrap);
    Ok(cfg)
}

/// Open a Kafka sink for `kafka://HOST:PORT[,HOST:PORT]/TOPIC`. Nothing is
/// contacted here; [`Sink::check`] does that.
pub fn open(target: &str, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
    Ok(Box::new(KafkaSink::new(target, ctx)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_several_brokers() {
        let u = parse_url("kafka://a:9092,b.example:9093/replay.v1").unwrap();
        assert_eq!(u.bootstrap, "a:9092,b.example:9093");
        assert_eq!(u.topic, "replay.v1");
    }

    #[test]
    fn url_errors_name_the_url() {
        for (url, want) in [
            ("http://a:1/t", "expected kafka://"),
            ("kafka://a:1", "missing topic"),
            ("kafka://a:1/", "missing topic"),
            ("kafka://a/t", "has no port"),
            ("kafka://a:x/t", "not a number"),
            ("kafka://a:1/t/u", "contains '/'"),
            ("kafka:///t", "missing broker"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(url), "{e}");
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn url_credentials_are_refused_and_hidden() {
        let e = parse_url("kafka://user:hunter2@a:1/t")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("sasl.password"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_everywhere() {
        let mut s = KafkaSettings::default();
        s.properties
            .insert("sasl.password".into(), "hunter2".into());
        s.properties
            .insert("ssl.key.password".into(), "hunter3".into());
        s.properties.insert("sasl.username".into(), "alice".into());
        let r = s.redacted();
        assert_eq!(r["sasl.password"], REDACTED);
        assert_eq!(r["ssl.key.password"], REDACTED);
        assert_eq!(r["sasl.username"], "alice");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("hunter"), "{json}");
    }

    #[test]
    fn settings_parse_with_defaults_and_reject_unknown_keys() {
        let s: KafkaSettings = toml::from_str(
            r#"
            value = "json"
            timestamp = "produce_time"
            [properties]
            "linger.ms" = "20"
            "#,
        )
        .unwrap();
        assert_eq!(s.value, Some(ValueFormat::Json));
        assert_eq!(s.timestamp, TimestampSource::ProduceTime);
        assert_eq!(s.original_offset_column, "kafka_offset");
        assert_eq!(s.message_timeout_ms, 60_000);
        let e = toml::from_str::<KafkaSettings>("valu = \"json\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("valu"), "{e}");
    }

    #[test]
    fn bootstrap_servers_property_must_match_the_url() {
        let u = parse_url("kafka://a:1/t").unwrap();
        let mut s = KafkaSettings::default();
        s.properties
            .insert("bootstrap.servers".into(), "b:2".into());
        let e = client_config(&u, &s, Role::Producer)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bootstrap.servers") && e.contains("kafka://a:1/t"),
            "{e}"
        );
    }
}
