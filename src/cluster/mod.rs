//! Cluster mode: the detection plan on an Apache DataFusion Ballista
//! cluster (`--cluster df://HOST:PORT`), the policy, the sinks and the
//! commit on the client, as in-process.
//!
//! What runs where:
//! - **The client** (`backfill run|gaps|sql|explain --cluster ...`) lists
//!   the archive and reads its footers (the merged schema, the window's
//!   files), plans the `sql/` views as it does in-process, and sends the
//!   logical plan to the scheduler. It reads back the plan's output (the
//!   candidates, the gap rows, counts), decides, writes and commits: one
//!   writer, the same commit protocol.
//! - **The scheduler** (`backfill scheduler`) plans it physically and
//!   splits it into stages; **executors** (`backfill executor`) read the
//!   archive from the object store themselves and shuffle between stages.
//!   Both are Ballista's own library crates, started from this binary so
//!   that they know what the plan names beyond stock DataFusion: the
//!   window's exact-bound function and `backfill_shard` ([`codec`]), small
//!   in-memory tables (the empty ledger, shipped inside the plan), and the
//!   storage settings.
//! - **Storage settings** travel with the query as one session option,
//!   `backfill.storage` ([`ClusterOptions`]): the job's endpoint, region,
//!   retries and credentials, so that executors need no configuration of
//!   their own (and still take the environment's `AWS_*`/`GOOGLE_*`/
//!   `AZURE_*` where the job names none, as the client does). The option's
//!   `Debug` hides it; Ballista logs session options at trace level only,
//!   and our log filter keeps Ballista at info ([`crate::log`]).
//!
//! The run's in-process path is the one-pass detection
//! ([`crate::detect::onepass`]); a cluster runs the views themselves, which
//! the one-pass path is property-tested to decide exactly like.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use datafusion::common::config::{ConfigEntry, ConfigExtension, ExtensionOptions};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::prelude::SessionConfig;
use object_store::ObjectStore;
use url::Url;

use crate::location::StorageSettings;

pub mod codec;
pub mod serve;
pub mod watch;

/// The scheme of a scheduler's address, as Ballista writes it.
pub const SCHEME: &str = "df";
/// Ballista's default scheduler port, when the URL names none.
pub const DEFAULT_PORT: u16 = 50050;
/// How long the client waits for the scheduler's port before it gives up:
/// a wrong address fails in seconds, not at the first query's timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A checked scheduler address: `df://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub host: String,
    pub port: u16,
    /// Local paths are the same on every executor (a shared file system):
    /// a local archive or state is read there instead of refused.
    pub shared_fs: bool,
    /// `--cluster-timeout`: the longest the client waits for an answer to
    /// a query (its job, then each batch of its result); none: no limit.
    pub timeout: Option<Duration>,
}

impl Cluster {
    /// Parse `df://HOST[:PORT]`. The message names what is wrong; the
    /// caller names the setting.
    pub fn parse(url: &str) -> Result<Cluster, String> {
        let url = url.trim();
        let Some(rest) = url.strip_prefix("df://") else {
            return Err(format!(
                "'{}' is not a scheduler address: write df://HOST:PORT",
                crate::redact::url(url)
            ));
        };
        if rest.contains('@') {
            return Err("a scheduler address takes no user or password (df://HOST:PORT)".into());
        }
        let parsed = Url::parse(url).map_err(|e| {
            format!(
                "'{}' is not a scheduler address ({e}): write df://HOST:PORT",
                crate::redact::url(url)
            )
        })?;
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => return Err(format!("'{url}' names no host: write df://HOST:PORT")),
        };
        if !matches!(parsed.path(), "" | "/")
            || parsed.query().is_some()
            || parsed.fragment().is_some()
        {
            return Err(format!(
                "'{}' has a path, query or fragment: a scheduler address is df://HOST:PORT",
                crate::redact::url(url)
            ));
        }
        Ok(Cluster {
            host,
            port: parsed.port().unwrap_or(DEFAULT_PORT),
            shared_fs: false,
            timeout: None,
        })
    }

    /// The address as the user writes it.
    pub fn url(&self) -> String {
        format!("df://{}:{}", self.host, self.port)
    }

    /// The scheduler's gRPC endpoint, as Ballista's client wants it.
    fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Fail in seconds with one line when nothing answers at the address.
    pub async fn probe(&self) -> Result<(), String> {
        let addr = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "no Ballista scheduler at {}: {e} (start one with `backfill scheduler`)",
                self.url()
            )),
            Err(_) => Err(format!(
                "no Ballista scheduler at {}: no answer in {} s (start one with `backfill scheduler`)",
                self.url(),
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The session options backfill adds to a cluster session: the storage
/// settings, sent with every query to the scheduler and the executors.
#[derive(Clone, Default)]
pub struct ClusterOptions {
    /// [`storage_to_wire`] of the job's `[storage]`.
    pub storage: Option<String>,
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field(
                "storage",
                &self.storage.as_ref().map(|_| crate::redact::REDACTED),
            )
            .finish()
    }
}

impl ConfigExtension for ClusterOptions {
    const PREFIX: &'static str = "backfill";
}

impl ExtensionOptions for ClusterOptions {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "storage" => {
                // Checked here, where the executor first meets it.
                storage_from_wire(value)?;
                self.storage = Some(value.to_string());
                Ok(())
            }
            _ => Err(DataFusionError::Configuration(format!(
                "backfill.{key} is not an option of backfill's cluster sessions"
            ))),
        }
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        vec![ConfigEntry {
            key: "backfill.storage".into(),
            value: self.storage.clone(),
            description: "backfill's [storage] settings for the executors (JSON; secret)",
        }]
    }
}

/// The environment variables an object store reads for its credentials
/// and endpoint (`AmazonS3Builder::from_env` and its GCS and Azure peers).
const STORE_ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

/// The storage settings as the executors receive them: the job's
/// `[storage]` with its secrets in (serializing [`StorageSettings`] hides
/// them, for reports), and the client's store environment variables, which
/// the client's own stores read where the job names nothing.
pub fn storage_to_wire(s: &StorageSettings) -> String {
    let mut v = serde_json::to_value(s).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        let text = |x: &Option<String>| match x {
            Some(s) => serde_json::Value::String(s.clone()),
            None => serde_json::Value::Null,
        };
        o.insert("endpoint".into(), text(&s.endpoint));
        o.insert("secret_access_key".into(), text(&s.secret_access_key));
        o.insert("session_token".into(), text(&s.session_token));
        o.insert(
            "options".into(),
            serde_json::to_value(&s.options).unwrap_or_default(),
        );
    }
    let env: std::collections::BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| STORE_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    serde_json::json!({ "storage": v, "env": env }).to_string()
}

/// What [`storage_to_wire`] sent.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    pub storage: StorageSettings,
    pub env: std::collections::BTreeMap<String, String>,
}

/// [`storage_to_wire`] read back; its secrets join the redaction list.
pub fn storage_from_wire(s: &str) -> Result<Wire> {
    #[derive(serde::Deserialize)]
    struct Raw {
        storage: StorageSettings,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
    }
    let raw: Raw = serde_json::from_str(s).map_err(|e| {
        DataFusionError::Configuration(format!(
            "backfill.storage is not backfill's storage settings: {e}"
        ))
    })?;
    // The client's variables, judged by name as the client judged its own
    // (a region or an endpoint is not a secret).
    for (k, v) in &raw.env {
        crate::redact::register_variable(k, v);
    }
    Ok(Wire {
        storage: raw.storage,
        env: raw.env,
    })
}

impl Wire {
    /// The settings for a store of `scheme`: the job's, completed by the
    /// client's environment where the job names nothing (as the client's
    /// own stores were, by `from_env`).
    pub fn settings_for(&self, scheme: &str) -> StorageSettings {
        use object_store::aws::AmazonS3ConfigKey;
        use object_store::azure::AzureConfigKey;
        use object_store::gcp::GoogleConfigKey;
        let mut s = self.storage.clone();
        let env = |k: &str| self.env.get(k).cloned();
        match scheme {
            "s3" | "s3a" => {
                let fill = |slot: &mut Option<String>, keys: &[&str]| {
                    if slot.is_none() {
                        *slot = keys.iter().find_map(|k| env(k));
                    }
                };
                fill(&mut s.endpoint, &["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]);
                fill(&mut s.region, &["AWS_REGION", "AWS_DEFAULT_REGION"]);
                fill(&mut s.access_key_id, &["AWS_ACCESS_KEY_ID"]);
                fill(&mut s.secret_access_key, &["AWS_SECRET_ACCESS_KEY"]);
                fill(&mut s.session_token, &["AWS_SESSION_TOKEN", "AWS_TOKEN"]);
                if s.allow_http.is_none()
                    && let Some(v) = env("AWS_ALLOW_HTTP")
                {
                    s.allow_http = Some(matches!(
                        v.to_ascii_lowercase().as_str(),
                        "1" | "true" | "yes"
                    ));
                }
                let covered = [
                    "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT",
                    "AWS_REGION",
                    "AWS_DEFAULT_REGION",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN",
                    "AWS_TOKEN",
                    "AWS_ALLOW_HTTP",
                ];
                for (k, v) in &self.env {
                    let key = k.to_ascii_lowercase();
                    if k.starts_with("AWS_")
                        && !covered.contains(&k.as_str())
                        && key.parse::<AmazonS3ConfigKey>().is_ok()
                    {
                        s.options.entry(key).or_insert_with(|| v.clone());
                    }
                }
            }
            "gs" => {
                for (k, v) in &self.env {
                    let key = k.to_ascii_lowercase();
                    if k.starts_with("GOOGLE_") && key.parse::<GoogleConfigKey>().is_ok() {
                        s.options.entry(key).or_insert_with(|| v.clone());
                    }
                }
            }
            _ => {
                for (k, v) in &self.env {
                    let key = k.to_ascii_lowercase();
                    if k.starts_with("AZURE_") && key.parse::<AzureConfigKey>().is_ok() {
                        s.options.entry(key).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        s
    }
}

/// The storage settings a cluster session carries (defaults when none).
fn session_storage(config: &SessionConfig) -> Result<Wire> {
    match config
        .options()
        .extensions
        .get::<ClusterOptions>()
        .and_then(|o| o.storage.as_deref())
    {
        Some(s) => storage_from_wire(s),
        None => Ok(Wire::default()),
    }
}

/// Object stores made on first use from the session's storage settings,
/// by the same code as the client's ([`crate::location::resolve`]): the
/// scheduler lists the plan's files and the executors read them with
/// exactly the client's endpoint, credentials and retries.
#[derive(Debug)]
pub struct Stores {
    wire: Wire,
    known: DefaultObjectStoreRegistry,
    made: RwLock<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Stores {
    pub fn new(wire: Wire) -> Stores {
        Stores {
            wire,
            known: DefaultObjectStoreRegistry::new(),
            made: RwLock::new(HashMap::new()),
        }
    }
}

impl ObjectStoreRegistry for Stores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.known.register_store(url, store)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(s) = self.known.get_store(url) {
            return Ok(s);
        }
        let key = format!("{}://{}", url.scheme(), url.authority());
        if let Some(s) = self.made.read().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(s);
        }
        let settings = self.wire.settings_for(url.scheme());
        let loc = crate::location::resolve(&format!("{key}/"), &settings)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        if let Ok(mut m) = self.made.write() {
            m.insert(key, loc.store.clone());
        }
        Ok(loc.store)
    }
}

/// The runtime of a scheduler's or executor's session: its stores from the
/// session's storage settings.
pub fn runtime(config: &SessionConfig) -> Result<Arc<RuntimeEnv>> {
    let wire = session_storage(config)?;
    RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(Stores::new(wire)))
        .build_arc()
}

/// The session options every process of a cluster starts from: Ballista's,
/// and ours, so that `backfill.storage` can be set from the query's.
pub fn base_config() -> SessionConfig {
    use ballista_core::extension::SessionConfigExt;
    SessionConfig::new_with_ballista()
        .with_option_extension(ClusterOptions::default())
        .with_ballista_logical_extension_codec(Arc::new(codec::Logical::default()))
        .with_ballista_physical_extension_codec(Arc::new(codec::Physical::default()))
}

/// The scheduler's session for a query: its options, our stores and
/// functions.
pub fn scheduler_state(config: SessionConfig) -> Result<SessionState> {
    use ballista_core::extension::{
        ballista_aggregate_functions, ballista_scalar_functions, ballista_window_functions,
    };
    let runtime = runtime(&config)?;
    let mut scalars = ballista_scalar_functions();
    scalars.extend(codec::functions());
    Ok(SessionStateBuilder::new()
        .with_runtime_env(runtime)
        .with_config(config)
        .with_default_features()
        .with_scalar_functions(scalars)
        .with_aggregate_functions(ballista_aggregate_functions())
        .with_window_functions(ballista_window_functions())
        .build())
}

/// The client's session: `config` (the in-process settings) and `runtime`
/// for what the client does itself (listing, footers, the policy's sorts),
/// every query planned by the scheduler at `cluster`.
pub fn client_state(
    cluster: &Cluster,
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
    storage: &StorageSettings,
) -> Result<SessionState> {
    use ballista_core::extension::{SessionConfigExt, SessionStateExt};
    let config = config
        .with_option_extension(ClusterOptions {
            storage: Some(storage_to_wire(storage)),
        })
        .with_ballista_logical_extension_codec(Arc::new(codec::Logical::default()))
        .with_ballista_physical_extension_codec(Arc::new(codec::Physical::default()))
        // Ballista 55's adaptive planner never finishes a query whose
        // stage turns out empty ("there are stages to be cancelled but its
        // not implemented"): an archive without gaps hung `run` at the gap
        // report. The static planner runs every stage it plans.
        .with_ballista_adaptive_query_planner(false)
        // The client asks for the job's status (pull) instead of waiting
        // for the scheduler to push it: then it knows the job's id as soon
        // as the scheduler accepts it, and can cancel a job it gives up on
        // ([`watch`]); pushed, the id came with the first status change,
        // which a job waiting for executors never had.
        .set_bool("ballista.client.pull", true)
        // Ballista's join selection swaps a hash join's inputs after
        // DataFusion has built the join's dynamic filter, which DataFusion
        // refuses ("Cannot swap HashJoinExec inputs after dynamic filters
        // have been constructed"), and the job then never ends. On a
        // cluster, plans run without dynamic filters (the switch for joins
        // alone is overridden by this one, which is on by default).
        .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false);
    // Ballista's planner, as `upgrade_for_ballista` would make it, watched
    // ([`watch`]): the override is what that upgrade installs instead.
    let ballista = {
        use ballista_core::extension::SessionConfigExt as _;
        config.clone().upgrade_for_ballista().ballista_config()
    };
    let planner = ballista_core::planner::BallistaQueryPlanner::<
        datafusion_proto::protobuf::LogicalPlanNode,
    >::with_extension(
        cluster.endpoint(),
        ballista,
        Arc::new(codec::Logical::default()),
    );
    let config = config.with_ballista_query_planner(Arc::new(watch::Planner::new(
        Arc::new(planner),
        cluster.clone(),
    )));
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    state.upgrade_for_ballista(cluster.endpoint())
}

/// A run's detection on the cluster: its figures, counted by the
/// cluster; the gap rows and the candidates are the views' own frames
/// (`detect::gaps`, the `candidates` view), read by the run as it decides.
pub struct Detection {
    pub rows: u64,
    pub events: u64,
    pub conflicts: u64,
    pub count_ms: u64,
    /// The counting plan (its metrics stay on the executors).
    pub plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
}

impl Detection {
    /// Rows, events and conflicts of the window, as the one-pass detection
    /// counts them: rows of `events`, distinct event ids, `conflicts` rows.
    pub async fn count(
        ctx: &datafusion::prelude::SessionContext,
        scan: &crate::job::Scan,
    ) -> Result<Detection> {
        use arrow::array::AsArray;
        use arrow::datatypes::Int64Type;
        let started = std::time::Instant::now();
        let first = |batches: &[arrow::record_batch::RecordBatch], col: usize| -> u64 {
            batches
                .iter()
                .find(|b| b.num_rows() > 0)
                .and_then(|b| {
                    b.column(col)
                        .as_primitive_opt::<Int64Type>()
                        .map(|a| a.value(0))
                })
                .map_or(0, |v| v.max(0) as u64)
        };
        let df = ctx
            .sql(
                "SELECT CAST(coalesce(sum(n), 0) AS BIGINT) AS rows, count(*) AS events \
                 FROM (SELECT event_id, count(*) AS n FROM events GROUP BY event_id)",
            )
            .await?;
        let plan = df.create_physical_plan().await?;
        let counted = datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx()).await?;
        let conflicts = if scan.detect_conflicts {
            let c = ctx
                .sql("SELECT count(*) AS conflicts FROM conflicts")
                .await?
                .collect()
                .await?;
            first(&c, 0)
        } else {
            0
        };
        Ok(Detection {
            rows: first(&counted, 0),
            events: first(&counted, 1),
            conflicts,
            count_ms: started.elapsed().as_millis() as u64,
            plan,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_addresses() {
        let c = Cluster::parse("df://127.0.0.1:50051").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 50051));
        assert_eq!(Cluster::parse("df://sched").unwrap().port, DEFAULT_PORT);
        for bad in [
            "http://h:1",
            "h:1",
            "df://",
            "df://h:1/x",
            "df://h:1#frag",
            "df://h:1?x=1",
            "df://u:p@h:1",
            "df://h:99999",
        ] {
            assert!(Cluster::parse(bad).is_err(), "{bad}");
        }
        let e = Cluster::parse("df://user:s3cr/t@h:1").unwrap_err();
        assert!(!e.contains("s3cr"), "{e}");
    }

    #[test]
    fn storage_travels_with_its_secrets_and_debug_hides_them() {
        let s = StorageSettings {
            endpoint: Some("http://127.0.0.1:9000".into()),
            access_key_id: Some("AK".into()),
            secret_access_key: Some("se/cr@et".into()),
            session_token: Some("tok".into()),
            options: [("aws_sse_customer_key_base64".to_string(), "k3y".to_string())].into(),
            ..Default::default()
        };
        let wire = storage_to_wire(&s);
        let back = storage_from_wire(&wire).unwrap().storage;
        assert_eq!(back.secret_access_key.as_deref(), Some("se/cr@et"));
        assert_eq!(back.session_token.as_deref(), Some("tok"));
        assert_eq!(back.endpoint, s.endpoint);
        assert_eq!(back.options, s.options);
        let o = ClusterOptions {
            storage: Some(wire),
        };
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("se/cr@et") && !shown.contains("k3y"),
            "{shown}"
        );
    }

    #[test]
    fn the_clients_environment_completes_what_the_job_leaves_out() {
        let wire = Wire {
            storage: StorageSettings {
                region: Some("eu-west-1".into()),
                ..Default::default()
            },
            env: [
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", "AK"),
                ("AWS_SECRET_ACCESS_KEY", "S/@"),
                ("AWS_ALLOW_HTTP", "true"),
                ("AWS_REQUEST_PAYER", "true"),
                ("AWS_NOT_A_KEY_AT_ALL", "x"),
                ("GOOGLE_SERVICE_ACCOUNT", "/sa.json"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        let s3 = wire.settings_for("s3");
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"), "the job's wins");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.secret_access_key.as_deref(), Some("S/@"));
        assert_eq!(s3.allow_http, Some(true));
        assert_eq!(
            s3.options.get("aws_request_payer").map(String::as_str),
            Some("true")
        );
        assert!(!s3.options.contains_key("aws_not_a_key_at_all"));
        assert!(!s3.options.keys().any(|k| k.starts_with("google")));
        let gs = wire.settings_for("gs");
        assert_eq!(gs.access_key_id, None);
        assert_eq!(
            gs.options.get("google_service_account").map(String::as_str),
            Some("/sa.json")
        );
    }
}
