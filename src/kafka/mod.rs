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
//! `Debug` and `Serialize` forms of the settings are redacted too. A value
//! is shown only when it cannot be a secret ([`property_is_shown`]): a
//! typo'd `sasl.passwd` is unknown to us and to librdkafka, yet holds a
//! password. librdkafka's own messages echo configured values ("Invalid
//! value ... for configuration property"), so they leave through
//! [`client_error_message`] or [`scrub_message`], which scrub every
//! configured value whatever its property's name: a secret put in a
//! property that is shown (`security.protocol`) must not be echoed either.

pub mod sink;
pub mod source;

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize, Serializer};

pub use sink::KafkaSink;
pub(crate) use sink::encode_messages;
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
    #[serde(
        default,
        deserialize_with = "deserialize_registered",
        serialize_with = "serialize_redacted"
    )]
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
    /// Compacted output: every Kafka sink of the job sends one message per
    /// key, its latest row (the last the command hands the sink for that
    /// key: `run` and `redrive` hand rows ordered by key and seq, `state-at`
    /// one row per key), to a topic with `cleanup.policy=compact`. The
    /// health check refuses an existing topic that is not compacted, and
    /// creates a missing one compacted when `allow_auto_create_topics` is
    /// set. Rows are held in memory until the sink finishes.
    #[serde(default)]
    pub compact: bool,
    /// With `compact`: a key whose latest row has one of these statuses is
    /// sent as a tombstone (a null value), so that compaction deletes it.
    #[serde(default = "default_tombstone_statuses")]
    pub tombstone_statuses: Vec<String>,
}

fn default_tombstone_statuses() -> Vec<String> {
    vec!["deleted".into()]
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
            compact: false,
            tombstone_statuses: default_tombstone_statuses(),
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
            .field("compact", &self.compact)
            .field("tombstone_statuses", &self.tombstone_statuses)
            .field("queue_full_backoff_ms", &self.queue_full_backoff_ms)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .finish()
    }
}

/// What a redacted secret looks like.
pub use crate::redact::REDACTED;

/// Properties whose values are shown in messages and `Debug`: none is a
/// secret, and an error about one is useless without its value.
const SHOWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "group.id",
    "transactional.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "compression.type",
    "compression.codec",
    "acks",
    "request.required.acks",
    "partitioner",
    "auto.offset.reset",
    "isolation.level",
    "debug",
    "broker.address.family",
    "ssl.endpoint.identification.algorithm",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.cipher.suites",
    "ssl.curves.list",
    "ssl.sigalgs.list",
    "sasl.kerberos.service.name",
    "sasl.kerberos.principal",
    "client.rack",
    "group.instance.id",
    "group.protocol",
    "partition.assignment.strategy",
    "log_level",
];

/// True for librdkafka properties whose value is a secret (passwords, keys,
/// tokens, JAAS and OAuth configs). Errs on the side of hiding.
pub fn is_secret_property(name: &str) -> bool {
    crate::redact::is_secret_name(name)
}

/// True when a property's value may be shown to a person: its name is not
/// secret-looking, and it is either a well-known non-secret property or its
/// value is a number or a boolean. Everything else, including every
/// property unknown to us (a typo'd `sasl.passwd`), is hidden.
pub fn property_is_shown(name: &str, value: &str) -> bool {
    !is_secret_property(name)
        && (crate::redact::is_harmless_value(value) || SHOWN_PROPERTIES.contains(&name))
}

fn deserialize_registered<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let props = BTreeMap::<String, String>::deserialize(d)?;
    // Known from the moment it is read: `main` scrubs it from any error.
    for (k, v) in &props {
        if !property_is_shown(k, v) {
            crate::redact::register(v);
        }
    }
    Ok(props)
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
            let v = if property_is_shown(k, v) {
                v.clone()
            } else {
                REDACTED.to_string()
            };
            (k.clone(), v)
        })
        .collect()
}

/// The values a librdkafka message may echo and must not: every configured
/// value, whatever its property's name. A secret may be put in any property
/// (`security.protocol = "${KAFKA_PASSWORD}"` by mistake), and librdkafka
/// quotes the value of any property it refuses. The brokers are the one
/// exception: they come from the URL, which every message shows anyway (a
/// `bootstrap.servers` property that differs from it is refused unechoed).
/// [`crate::redact::scrub_values`] leaves values under 4 characters alone.
fn echoable_values<'a>(
    properties: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> impl Iterator<Item = &'a str> {
    properties
        .into_iter()
        .filter(|(k, _)| *k != "bootstrap.servers")
        .map(|(_, v)| v)
}

/// One line for a librdkafka error about a configuration: the property at
/// fault named, and every configured value scrubbed out
/// ([`echoable_values`]). rdkafka's `ClientConfig` error carries the value
/// itself ("Client config error: No such configuration property:
/// \"sasl.passwd\" sasl.passwd <value>"), so that variant is rebuilt from its
/// description and key alone, and the quoted value of librdkafka's "Invalid
/// value \"...\" for configuration property" is dropped before any scrub.
pub(crate) fn client_error_message(e: &rdkafka::error::KafkaError, cfg: &ClientConfig) -> String {
    let raw = match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, _value) => {
            format!("property '{key}': {}", without_quoted_value(desc))
        }
        other => without_quoted_value(&other.to_string()),
    };
    // `config_map` hides the values of the properties rdkafka knows to be
    // sensitive behind a placeholder; `get` has them all.
    let keys = cfg.config_map();
    let values = echoable_values(keys.keys().filter_map(|k| cfg.get(k).map(|v| (*k, v))));
    crate::redact::line(&crate::redact::scrub_values(&raw, values))
}

/// librdkafka's `Invalid value "<value>" for configuration property "<name>"`
/// without the value: whatever it is, a message about an invalid value
/// shows the property, never the value.
fn without_quoted_value(desc: &str) -> String {
    const HEAD: &str = "Invalid value \"";
    const TAIL: &str = "\" for configuration property";
    match (desc.find(HEAD), desc.rfind(TAIL)) {
        (Some(h), Some(t)) if h + HEAD.len() <= t => {
            format!(
                "{}Invalid value for configuration property{}",
                &desc[..h],
                &desc[t + TAIL.len()..]
            )
        }
        _ => desc.to_string(),
    }
}

/// A message of the Kafka code about to leave it, scrubbed of every
/// configured property value ([`echoable_values`]) and of any URL's user
/// info: broker and librdkafka messages are not ours to trust.
pub(crate) fn scrub_message(message: &str, settings: &KafkaSettings) -> String {
    let values = echoable_values(
        settings
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    crate::redact::line(&crate::redact::scrub_values(message, values))
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

/// Parse `kafka://HOST:PORT[,HOST:PORT]/TOPIC`. Credentials, a query and a
/// fragment in the URL are refused (they would be echoed in every message);
/// use `[kafka] properties`.
///
/// Any `@` after `://` counts as credentials, checked before the URL is
/// split: hosts and topics never contain `@`, and a password holding `/`
/// would otherwise be split into "hosts" and "topic" and echoed by the
/// messages about them.
pub fn parse_url(url: &str) -> Result<KafkaUrl, KafkaError> {
    let shown = crate::redact::url(url);
    let invalid = |reason: String| KafkaError::Url {
        url: shown.clone(),
        reason,
    };
    if crate::redact::has_userinfo(url) {
        crate::redact::register_userinfo(url);
        return Err(invalid(
            "credentials in the URL are not accepted (an '@' after '://' is read as user \
             info); set sasl.username and sasl.password in [kafka] properties"
                .into(),
        ));
    }
    // Before the split: a `?` among the brokers (`kafka://h:1?pw=x/t`) was
    // echoed inside the message about the broker's port.
    if let Some(shown) = crate::redact::hide_query(url) {
        return Err(KafkaError::Url {
            url: shown,
            reason: "a Kafka URL takes no query or fragment ('?...', '#...'); client \
                     settings go in the job file's [kafka] properties"
                .into(),
        });
    }
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| invalid("expected kafka://HOST:PORT[,HOST:PORT]/TOPIC".into()))?;
    let Some((hosts, topic)) = rest.split_once('/') else {
        return Err(invalid(
            "missing topic: expected kafka://HOST:PORT[,HOST:PORT]/TOPIC".into(),
        ));
    };
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
    if let Some((at, c)) = topic
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        // Nothing after the bad character is echoed: whatever follows it
        // was not meant as a topic.
        return Err(format!(
            "the topic name contains '{c}' (after '{}'); Kafka topics use only letters, digits, '.', '_' and '-'",
            &topic[..at]
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
    if props
        .get("bootstrap.servers")
        .is_some_and(|b| b != &url.bootstrap)
    {
        // The property's value is not shown: no value is ever echoed.
        return Err(KafkaError::Property {
            property: "bootstrap.servers".into(),
            reason: format!(
                "differs from the brokers '{}' of the URL '{}'; give the brokers in the URL only",
                url.bootstrap, url.original
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

/// Whether `target` holds, after `start_offsets`, a message of run `run_id`
/// that `read_committed` consumers see: how a rerun finds out that a crashed
/// attempt's Kafka transaction committed before the attempt could commit the
/// run (and so must not be sent again).
pub async fn has_committed_messages(
    target: &str,
    settings: &KafkaSettings,
    start_offsets: &BTreeMap<i32, i64>,
    run_id: &str,
) -> Result<bool, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    use std::time::{Duration, Instant};

    let url = parse_url(target)?;
    let mut cfg = client_config(&url, settings, Role::Consumer)?;
    cfg.set("isolation.level", "read_committed");
    let original = url.original.clone();
    let settings_for_errors = settings.clone();
    let broker = move |operation: &'static str, e: rdkafka::error::KafkaError| KafkaError::Broker {
        url: original.clone(),
        operation,
        message: scrub_message(&e.to_string(), &settings_for_errors),
    };
    let consumer: BaseConsumer = cfg.create().map_err(|e| broker("create a reader", e))?;
    let topic = url.topic.clone();
    let offsets = start_offsets.clone();
    let run_id = run_id.to_string();
    let url_for_errors = url.original.clone();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let mut tpl = TopicPartitionList::new();
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for (&p, &start) in &offsets {
            let (_, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .map_err(|e| broker("read watermarks", e))?;
            if high > start {
                tpl.add_partition_offset(&topic, p, Offset::Offset(start))
                    .map_err(|e| broker("assign", e))?;
                ends.insert(p, high);
            }
        }
        if ends.is_empty() {
            return Ok(false);
        }
        consumer.assign(&tpl).map_err(|e| broker("assign", e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) => return Err(broker("read", e)),
                Some(Ok(m)) => {
                    let ours = m.headers().is_some_and(|h| {
                        h.iter().any(|h| {
                            h.key == crate::kafka::sink::headers::RUN_ID
                                && h.value == Some(run_id.as_bytes())
                        })
                    });
                    if ours {
                        return Ok(true);
                    }
                    if ends
                        .get(&m.partition())
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        ends.remove(&m.partition());
                    }
                }
            }
        }
        if ends.is_empty() {
            Ok(false)
        } else {
            Err(KafkaError::Broker {
                url: url_for_errors,
                operation: "look for a crashed attempt's messages",
                message: "the topic was not read to its end within 60 s".into(),
            })
        }
    })
    .await
    .map_err(|e| KafkaError::Broker {
        url: target.to_string(),
        operation: "look for a crashed attempt's messages",
        message: e.to_string(),
    })?
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

    /// A query is refused without echoing what follows the `?`, which the
    /// one-line redaction of the URL would not catch inside the topic.
    #[test]
    fn a_query_in_a_kafka_url_is_refused_without_its_value() {
        let e = parse_url("kafka://a:1/topic?sasl.password=S3CRET")
            .unwrap_err()
            .to_string();
        let shown = crate::redact::line(&e);
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("takes no query"), "{shown}");
    }

    /// A `?` or `#` among the brokers is refused as a query too: split
    /// first, the broker `h:1?sasl.password=...` was echoed by the message
    /// about its port.
    #[test]
    fn a_query_before_the_topic_is_refused_without_its_value() {
        for url in [
            "kafka://a:1?sasl.password=S3CRET/t",
            "kafka://a:1,b:2#S3CRET/t",
            "kafka://a:1/t#S3CRET",
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            let shown = crate::redact::line(&e);
            assert!(!shown.contains("S3CRET"), "{shown}");
            assert!(shown.contains("takes no query or fragment"), "{shown}");
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

    /// `/`, `@`, `:` and a percent-encoded `/`: every way a URL parser could
    /// be led astray.
    const CANARY: &str = "Cr/n@ry:s3cr%2Ft";

    fn assert_no_canary(text: &str) {
        for needle in [CANARY, "Cr/n@ry:s3cr/t", "s3cr%2Ft", "s3cr", "Cr%2Fn"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
    }

    #[test]
    fn url_credentials_with_slash_and_at_are_refused_whole() {
        for url in [
            format!("kafka://user:{CANARY}@a:1/t"),
            format!("kafka://{CANARY}@a:1,b:2/t"),
            format!("kafka://user:{CANARY}@a:1"),
            "kafka://user:Cr%2Fn%40ry%3As3cr%252Ft@a:1/t".to_string(),
        ] {
            let e = parse_url(&url).unwrap_err().to_string();
            assert_no_canary(&e);
            assert!(e.contains("kafka://***@a:1"), "{e}");
            assert!(e.contains("credentials in the URL"), "{e}");
        }
    }

    #[test]
    fn typoed_and_unknown_properties_are_hidden_everywhere() {
        let mut s = KafkaSettings::default();
        s.properties.insert("sasl.passwd".into(), CANARY.into());
        s.properties.insert("acks".into(), "all".into());
        s.properties.insert("linger.ms".into(), "20".into());
        assert_eq!(s.redacted()["sasl.passwd"], REDACTED);
        assert_eq!(s.redacted()["acks"], "all");
        assert_eq!(s.redacted()["linger.ms"], "20");
        assert_no_canary(&format!("{s:?}"));
        assert_no_canary(&serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn librdkafka_configuration_errors_never_echo_a_value() {
        let url = parse_url("kafka://127.0.0.1:1/t").unwrap();
        for (name, value) in [
            ("sasl.passwd", CANARY),
            ("sasl.password.typo", CANARY),
            ("message.max.bytes", CANARY),
            ("security.protocol", "sasl_plaintext"),
        ] {
            let mut s = KafkaSettings::default();
            s.properties.insert(name.into(), value.into());
            if name == "security.protocol" {
                // SASL without a username/password pair: a creation error
                // that is not about one property.
                s.properties
                    .insert("sasl.mechanisms".into(), "PLAIN".into());
                s.properties
                    .insert("sasl.oauthbearer.config".into(), CANARY.into());
            }
            let cfg = client_config(&url, &s, Role::Producer).unwrap();
            let raw = cfg
                .create::<rdkafka::producer::BaseProducer>()
                .err()
                .map(|e| (e.to_string(), client_error_message(&e, &cfg)));
            let Some((raw, msg)) = raw else {
                assert_eq!(name, "security.protocol", "librdkafka accepted {name}");
                continue;
            };
            assert_no_canary(&msg);
            if name != "security.protocol" {
                assert!(raw.contains(CANARY), "rdkafka no longer echoes: {raw}");
                assert!(msg.contains(&format!("property '{name}'")), "{msg}");
            }
        }
    }

    #[test]
    fn a_secret_in_a_property_not_named_like_one_is_not_echoed() {
        // librdkafka answers `Invalid value "<value>" for configuration
        // property "security.protocol"`; the property is one whose value is
        // shown, so the value was not scrubbed.
        let url = parse_url("kafka://127.0.0.1:1/t").unwrap();
        for (role, name) in [
            (Role::Producer, "security.protocol"),
            (Role::Producer, "compression.type"),
            (Role::Producer, "partitioner"),
            (Role::Consumer, "security.protocol"),
            (Role::Consumer, "auto.offset.reset"),
            (Role::Consumer, "isolation.level"),
        ] {
            let mut s = KafkaSettings::default();
            s.properties.insert(name.into(), CANARY.into());
            let cfg = client_config(&url, &s, role).unwrap();
            let err = match role {
                Role::Producer => cfg.create::<rdkafka::producer::BaseProducer>().err(),
                Role::Consumer => cfg.create::<rdkafka::consumer::BaseConsumer>().err(),
            };
            let e = err.unwrap_or_else(|| panic!("librdkafka accepted {name}"));
            let msg = client_error_message(&e, &cfg);
            assert_no_canary(&msg);
            assert!(msg.contains(name), "{msg}");
            let msg = scrub_message(&format!("{e} / {e:?}"), &s);
            assert_no_canary(&msg);
        }
        assert_eq!(
            without_quoted_value(r#"Invalid value "a"b" for configuration property "acks": x"#),
            r#"Invalid value for configuration property "acks": x"#
        );
    }

    #[test]
    fn deserialized_secrets_are_registered_for_main() {
        let v = "Kafka-Cr/n@ry-registered";
        let _: KafkaSettings =
            toml::from_str(&format!("[properties]\n\"sasl.passwd\" = \"{v}\"\n")).unwrap();
        assert_eq!(crate::redact::scrub(&format!("x {v} y")), "x *** y");
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
        // Its value is not echoed.
        s.properties
            .insert("bootstrap.servers".into(), CANARY.into());
        let e = client_config(&u, &s, Role::Producer)
            .unwrap_err()
            .to_string();
        assert_no_canary(&e);
    }
}
