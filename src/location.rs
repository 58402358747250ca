//! The one resolver from a user's location string (a plain path, `file://`,
//! `s3://`, `gs://`, `az://`) to an object store and a prefix inside it.
//!
//! Every module that reads or writes data goes through [`Location`]: the
//! source scan, the Parquet sinks, the state. Nothing else opens data files,
//! so a new store works everywhere at once. This module must never put a
//! secret in a message: [`Location`]'s `Display` is the URL as the user wrote
//! it, which is why [`resolve`] refuses a URL or an endpoint with user info
//! (credentials only ever come from the environment or `[storage]`), every
//! message that names a rejected URL passes it through
//! [`crate::redact::url`], and the secret values of `[storage]` are
//! registered with [`crate::redact`] the moment they are read.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use datafusion::prelude::SessionContext;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use url::Url;

/// Errors while turning a location string into a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocationError {
    #[error("location '{location}': {reason}")]
    Invalid { location: String, reason: String },
    /// `message` is [`store_error_line`] of object_store's error, scrubbed
    /// of every configured value: a builder error may echo one ("failed to
    /// parse \"...\" as boolean").
    #[error("location '{location}': cannot configure the {scheme} store: {message}")]
    Store {
        location: String,
        scheme: String,
        message: String,
    },
}

/// Object-store settings from the job file's `[storage]` section. Every field
/// overrides the matching standard environment variable (`AWS_ENDPOINT_URL`,
/// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...), which are read first.
///
/// Secret values are registered with [`crate::redact`] as they are
/// deserialized, before any code could echo them, and serialize as `***`.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000` for MinIO. No
    /// user info (`http://user:pass@host`): credentials go in the fields
    /// below.
    #[serde(default, serialize_with = "serialize_url")]
    pub endpoint: Option<String>,
    /// Region; S3-compatible servers usually accept any (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id (use `${AWS_ACCESS_KEY_ID}` rather than the literal).
    pub access_key_id: Option<String>,
    /// Secret key; never printed.
    #[serde(
        default,
        deserialize_with = "deserialize_secret",
        serialize_with = "serialize_hidden"
    )]
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials; never printed.
    #[serde(
        default,
        deserialize_with = "deserialize_secret",
        serialize_with = "serialize_hidden"
    )]
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (MinIO and test servers).
    pub allow_http: Option<bool>,
    /// Use virtual-hosted-style requests (`bucket.host`) instead of
    /// path-style (`host/bucket`). Off by default: MinIO wants path-style.
    pub virtual_hosted_style: Option<bool>,
    /// Retries on throttling, 5xx and timeouts.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Any other object_store option for the scheme (`google_service_account`,
    /// `azure_storage_account_name`, ...), passed through untouched. Values
    /// of secret-looking or unknown keys are never printed.
    #[serde(
        default,
        deserialize_with = "deserialize_options",
        serialize_with = "serialize_options"
    )]
    pub options: BTreeMap<String, String>,
}

fn deserialize_secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    if let Some(v) = &v {
        crate::redact::register(v);
    }
    Ok(v)
}

fn deserialize_options<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let options = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &options {
        if option_is_secret(k) && !crate::redact::is_harmless_value(v) {
            crate::redact::register(v);
        }
    }
    Ok(options)
}

fn serialize_hidden<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().map(|_| crate::redact::REDACTED).serialize(s)
}

fn serialize_url<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    v.as_deref().map(crate::redact::url).serialize(s)
}

fn serialize_options<S: serde::Serializer>(
    v: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    shown_options(v).serialize(s)
}

/// True when an option's value must never be shown: its key looks secret,
/// or no store knows the key (a typo'd `aws_secret_acess_key` still holds
/// a secret).
fn option_is_secret(key: &str) -> bool {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::azure::AzureConfigKey;
    use object_store::gcp::GoogleConfigKey;
    let k = key.to_ascii_lowercase();
    let known = k.parse::<AmazonS3ConfigKey>().is_ok()
        || k.parse::<GoogleConfigKey>().is_ok()
        || k.parse::<AzureConfigKey>().is_ok();
    !known || crate::redact::is_secret_name(&k)
}

/// The options as they may be shown: secret values replaced by `***`,
/// endpoints without user info.
fn shown_options(options: &BTreeMap<String, String>) -> BTreeMap<&str, String> {
    options
        .iter()
        .map(|(k, v)| {
            let shown = if option_is_secret(k) {
                crate::redact::REDACTED.to_string()
            } else {
                crate::redact::url(v)
            };
            (k.as_str(), shown)
        })
        .collect()
}

/// Debug without secrets: settings end up in debug logs and panics, and a
/// secret must never be printed.
impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |v: &Option<String>| v.as_ref().map(|_| crate::redact::REDACTED);
        let options = shown_options(&self.options);
        f.debug_struct("StorageSettings")
            .field(
                "endpoint",
                &self.endpoint.as_deref().map(crate::redact::url),
            )
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hide(&self.secret_access_key))
            .field("session_token", &hide(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("retry", &self.retry)
            .field("options", &options)
            .finish()
    }
}

/// Retry settings for every object-store request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts after the first failure.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Give up retrying a request after this many seconds.
    #[serde(default = "default_retry_timeout_secs")]
    pub retry_timeout_secs: u64,
    /// First backoff, in milliseconds; doubles up to `max_backoff_ms`.
    #[serde(default = "default_init_backoff_ms")]
    pub init_backoff_ms: u64,
    /// Longest backoff, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Timeout of one request, in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Timeout to connect, in seconds: fail fast when the server is gone.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
}

fn default_max_retries() -> usize {
    5
}
fn default_retry_timeout_secs() -> u64 {
    60
}
fn default_init_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    5_000
}
fn default_request_timeout_secs() -> u64 {
    120
}
fn default_connect_timeout_secs() -> u64 {
    5
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: default_max_retries(),
            retry_timeout_secs: default_retry_timeout_secs(),
            init_backoff_ms: default_init_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            request_timeout_secs: default_request_timeout_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
        }
    }
}

impl RetrySettings {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(self.init_backoff_ms),
                max_backoff: Duration::from_millis(self.max_backoff_ms),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs(self.retry_timeout_secs),
        }
    }

    fn client_options(&self, allow_http: bool) -> ClientOptions {
        ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(Duration::from_secs(self.request_timeout_secs))
            .with_connect_timeout(Duration::from_secs(self.connect_timeout_secs))
    }
}

/// A resolved location: a store, the prefix inside it, and the URL that
/// names the store for DataFusion (`file:///`, `s3://bucket`, ...).
#[derive(Clone)]
pub struct Location {
    /// What the user wrote, for messages, the report and the commit log.
    /// Never holds a secret: URLs with user info, a query or a fragment are
    /// rejected by [`resolve`].
    pub original: String,
    pub store: Arc<dyn ObjectStore>,
    /// Prefix inside the store, without a trailing slash.
    pub prefix: Path,
    /// `scheme://authority` of the store, as DataFusion registers it.
    pub store_url: Url,
    /// True for the local file system, where rename is atomic and cheap.
    pub is_local: bool,
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Location")
            .field("original", &self.original)
            .field("prefix", &self.prefix.as_ref())
            .finish()
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl Location {
    /// The location `rel` below this one (`rel` uses `/` separators).
    pub fn child(&self, rel: &str) -> Location {
        let mut prefix = self.prefix.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            prefix = prefix.clone().join(part);
        }
        let sep = if self.original.ends_with('/') {
            ""
        } else {
            "/"
        };
        Location {
            original: format!("{}{}{}", self.original, sep, rel.trim_matches('/')),
            store: self.store.clone(),
            prefix,
            store_url: self.store_url.clone(),
            is_local: self.is_local,
        }
    }

    /// For a local location: the folder exists and can be written, or can
    /// be created (its nearest existing ancestor is a writable folder), on
    /// a file system that stores files, with room in PATH_MAX for what a
    /// run writes below it. The reason it cannot, as a phrase for the
    /// caller's one line; always `Ok` for object stores (their write is
    /// checked by listing, see the sinks).
    ///
    /// Writability is tried, not asked: a probe file is created in the
    /// nearest existing folder and removed at once (nothing stays, so a dry
    /// run can check too). access(2) answers yes to root for /proc, /sys
    /// and immutable or root-squashed folders, and the run then failed
    /// after the scan, at its first write.
    pub fn check_local_writable(&self) -> Result<(), String> {
        if !self.is_local {
            return Ok(());
        }
        let target = std::path::PathBuf::from(self.display_path(&self.prefix));
        let len = target.as_os_str().len();
        let path_max = libc::PATH_MAX as usize - 1;
        if len + WRITTEN_BELOW > path_max {
            return Err(format!(
                "the path is {len} bytes long, and what a run writes below it takes up to \
                 {WRITTEN_BELOW} more; Linux allows {path_max} (PATH_MAX): give a shorter path"
            ));
        }
        if let Some(long) = target
            .components()
            .find(|c| c.as_os_str().len() > libc::NAME_MAX as usize)
        {
            return Err(format!(
                "a folder name of {} bytes ({}...); file systems allow {}",
                long.as_os_str().len(),
                long.as_os_str()
                    .to_string_lossy()
                    .chars()
                    .take(16)
                    .collect::<String>(),
                libc::NAME_MAX
            ));
        }
        let mut dir = target.as_path();
        loop {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => return Err(format!("{} is not a folder", dir.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                    Some(p) => dir = p,
                    None => return Err(format!("{} does not exist", target.display())),
                },
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            }
        }
        if let Some(kind) = kernel_file_system(dir) {
            return Err(format!(
                "{} is on the kernel's {kind} file system, which stores no files: give a folder on a disk",
                dir.display()
            ));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let probe = dir.join(format!(".backfill-probe-{}-{nanos}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(format!("cannot write in {}: {e}", dir.display())),
        }
    }

    /// A store path `rel` below this location's prefix.
    pub fn path(&self, rel: &str) -> Path {
        self.child(rel).prefix
    }

    /// The display name of an object of this store, for messages: the URL of
    /// the store plus the object's path (`/data/x.parquet`, `s3://b/x.parquet`).
    pub fn display_path(&self, path: &Path) -> String {
        if self.is_local {
            format!("/{path}")
        } else {
            format!("{}/{}", self.store_url.as_str().trim_end_matches('/'), path)
        }
    }

    /// The URL DataFusion uses for an object of this store.
    pub fn object_url(&self, path: &Path) -> String {
        format!(
            "{}/{}",
            self.store_url.as_str().trim_end_matches('/'),
            path.as_ref()
        )
    }

    /// Make this store known to DataFusion under its `scheme://authority`.
    pub fn register(&self, ctx: &SessionContext) {
        ctx.register_object_store(&self.store_url, self.store.clone());
    }
}

/// The most a run writes below a sink or state folder, in bytes: a sink's
/// `/_staging/run_id=<RUN>/<NONCE>/part-00000.parquet.staged` with a
/// 128-character run id (the longest [`crate::job::validate_run_id`]
/// takes) and object_store's `#N` upload suffix is about 205; the state's
/// `attempts/<RUN>/<NONCE>.prepared.json#N` is shorter.
const WRITTEN_BELOW: usize = 256;

/// The name of the kernel's pseudo file system `dir` is on (`proc`,
/// `sysfs`, `cgroup2`, ...), where nothing can be stored; `None` for any
/// other file system, or when statfs(2) fails (the probe then speaks).
fn kernel_file_system(dir: &std::path::Path) -> Option<&'static str> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct it is given; the path is
    // NUL-terminated and outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    [
        (libc::PROC_SUPER_MAGIC as u32, "proc"),
        (libc::SYSFS_MAGIC as u32, "sysfs"),
        (libc::CGROUP_SUPER_MAGIC as u32, "cgroup"),
        (libc::CGROUP2_SUPER_MAGIC as u32, "cgroup2"),
        (libc::DEBUGFS_MAGIC as u32, "debugfs"),
        (libc::TRACEFS_MAGIC as u32, "tracefs"),
        (libc::SECURITYFS_MAGIC as u32, "securityfs"),
        (libc::BPF_FS_MAGIC as u32, "bpf"),
        (libc::DEVPTS_SUPER_MAGIC as u32, "devpts"),
        (libc::SELINUX_MAGIC as u32, "selinuxfs"),
    ]
    .into_iter()
    .find(|(magic, _)| st.f_type as u32 == *magic)
    .map(|(_, name)| name)
}

/// Resolve a location string. Plain paths may be relative; they are made
/// absolute against the current directory.
///
/// A URL with user info (any `@` after `://`, see
/// [`crate::redact::has_userinfo`]) is refused before it is parsed: a
/// parser's error would echo it, and a password may hold `/` or `@`, which
/// moves the parser's idea of where the host starts. So is a URL with a
/// query or fragment, shown without it: [`Location::original`] is copied
/// into the report and the commit log.
pub fn resolve(location: &str, storage: &StorageSettings) -> Result<Location, LocationError> {
    if location.trim().is_empty() {
        return Err(LocationError::Invalid {
            location: location.to_string(),
            reason: "empty location".into(),
        });
    }
    let looks_like_url = location.contains("://");
    if !looks_like_url {
        // `s3:/bucket` (one slash) is a typo, not a folder named `s3:`: as
        // a local path the run would "succeed" on local disk, and print
        // whatever the URL held.
        if let Some((scheme, _)) = location.split_once(":/")
            && !scheme.is_empty()
            && !scheme.contains('/')
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(LocationError::Invalid {
                location: format!("{scheme}:/***"),
                reason: format!("looks like a URL with a slash missing: write {scheme}://..."),
            });
        }
        return resolve_local(location, std::path::Path::new(location));
    }
    // Every message below names the URL through the redactor: a URL with
    // user info is refused here, but its query may still hold a signature.
    let shown = crate::redact::url(location);
    let invalid = |reason: String| LocationError::Invalid {
        location: shown.clone(),
        reason,
    };
    if crate::redact::has_userinfo(location) {
        crate::redact::register_userinfo(location);
        return Err(invalid(
            "credentials in the URL are not accepted (an '@' after '://' is read as \
             user info); use the environment or [storage]"
                .into(),
        ));
    }
    // No store reads a query or fragment (settings and credentials come
    // from [storage] and the environment), so a SAS token or a password
    // there would do nothing but ride along into every message, the report
    // and the commit log; a `#` would also silently cut a `file://` path.
    if let Some(shown) = crate::redact::hide_query(location) {
        return Err(LocationError::Invalid {
            location: shown,
            reason: "a URL takes no query or fragment ('?...', '#...'); store settings and \
                     credentials go in the job file's [storage] or the environment"
                .into(),
        });
    }
    let url = Url::parse(location).map_err(|e| invalid(format!("not a valid URL: {e}")))?;
    match url.scheme() {
        "file" => {
            let p = url
                .to_file_path()
                .map_err(|_| invalid("not a valid file:// URL".into()))?;
            resolve_local(location, &p)
        }
        "s3" | "s3a" => cloud(location, &url, "s3", storage),
        "gs" => cloud(location, &url, "gs", storage),
        "az" | "abfs" | "abfss" => cloud(location, &url, "az", storage),
        other => Err(invalid(format!(
            "unsupported scheme '{other}' (expected a path, file://, s3://, gs:// or az://)"
        ))),
    }
}

/// Refuse an endpoint with user info, a query or whitespace, wherever it
/// comes from: `[storage] endpoint`, an `*endpoint*` option, or one of the
/// environment variables the store's builder reads (`AWS_ENDPOINT_URL`,
/// `AWS_ENDPOINT`, `AWS_ENDPOINT_URL_S3`, `AZURE_STORAGE_ENDPOINT`, ...).
/// The message names the setting and shows the endpoint redacted.
fn check_endpoints(
    location: &str,
    scheme: &str,
    storage: &StorageSettings,
) -> Result<(), LocationError> {
    let env_prefix = match scheme {
        "s3" => "AWS_",
        "gs" => "GOOGLE_",
        _ => "AZURE_",
    };
    let mut candidates: Vec<(String, String)> = vec![];
    if let Some(e) = &storage.endpoint {
        candidates.push(("[storage] endpoint".into(), e.clone()));
    }
    for (k, v) in &storage.options {
        if k.to_ascii_lowercase().contains("endpoint") {
            candidates.push((format!("[storage] options.{k}"), v.clone()));
        }
    }
    for (k, v) in std::env::vars_os() {
        if let (Some(k), Some(v)) = (k.to_str(), v.to_str())
            && k.starts_with(env_prefix)
            && k.contains("ENDPOINT")
        {
            candidates.push((format!("environment variable {k}"), v.to_string()));
        }
    }
    for (setting, endpoint) in candidates {
        if crate::redact::has_userinfo(&endpoint) {
            crate::redact::register_userinfo(&endpoint);
            return Err(LocationError::Invalid {
                location: crate::redact::url(location),
                reason: format!(
                    "{setting} '{}' has credentials in it, which are not accepted; \
                     set them in [storage] (access_key_id, secret_access_key) or in \
                     the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
                    crate::redact::url(&endpoint)
                ),
            });
        }
        let refuse = |reason: String| LocationError::Invalid {
            location: crate::redact::url(location),
            reason: format!("{setting} {reason}"),
        };
        // A query may carry a token too; whitespace or a control character
        // made object_store's request signer panic (an invalid URI).
        if let Some(shown) = crate::redact::hide_query(&endpoint) {
            return Err(refuse(format!(
                "'{shown}' has a query or fragment, which an endpoint does not take"
            )));
        }
        if endpoint
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(refuse(format!(
                "'{}' holds whitespace or a control character; an endpoint is a URL such as http://127.0.0.1:9000",
                crate::redact::url(&endpoint).escape_debug()
            )));
        }
    }
    Ok(())
}

fn resolve_local(original: &str, p: &std::path::Path) -> Result<Location, LocationError> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| LocationError::Invalid {
                location: original.to_string(),
                reason: format!("cannot read the current directory: {e}"),
            })?
            .join(p)
    };
    let abs = normalize(&abs);
    let prefix = Path::from_absolute_path(&abs).map_err(|e| LocationError::Invalid {
        location: original.to_string(),
        reason: format!("not a usable path: {e}"),
    })?;
    Ok(Location {
        original: original.to_string(),
        store: Arc::new(LocalFileSystem::new()),
        prefix,
        store_url: Url::parse("file:///").expect("static URL"),
        is_local: true,
    })
}

/// Lexically resolve `.` and `..` so that prefixes compare as the user means.
fn normalize(p: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn cloud(
    original: &str,
    url: &Url,
    scheme: &str,
    storage: &StorageSettings,
) -> Result<Location, LocationError> {
    let bucket = url.host_str().unwrap_or_default();
    if bucket.is_empty() {
        return Err(LocationError::Invalid {
            location: crate::redact::url(original),
            reason: "missing bucket or container name".into(),
        });
    }
    let prefix = Path::parse(url.path().trim_matches('/')).map_err(|e| LocationError::Invalid {
        location: crate::redact::url(original),
        reason: format!("invalid object path: {e}"),
    })?;
    let store_url = Url::parse(&format!("{}://{}", url.scheme(), bucket)).map_err(|e| {
        LocationError::Invalid {
            location: crate::redact::url(original),
            reason: format!("invalid bucket: {e}"),
        }
    })?;
    check_endpoints(original, scheme, storage)?;
    // A builder error may echo a configured value; scrub every one of them
    // that is not obviously harmless.
    let configured: Vec<&str> = storage
        .options
        .values()
        .chain(storage.secret_access_key.iter())
        .chain(storage.session_token.iter())
        .map(String::as_str)
        .filter(|v| !crate::redact::is_harmless_value(v))
        .collect();
    let wrap = |e: object_store::Error| {
        // Name the option whose value the builder rejected: its message
        // quotes the value (which is then scrubbed), never the key.
        let raw = error_chain(&e);
        let culprit = storage
            .options
            .iter()
            .find(|(_, v)| !v.is_empty() && raw.contains(v.as_str()))
            .map(|(k, _)| format!("[storage] options.{k}: "))
            .unwrap_or_default();
        LocationError::Store {
            location: crate::redact::url(original),
            scheme: scheme.to_string(),
            message: format!(
                "{culprit}{}",
                crate::redact::scrub_values(&store_error_line(&e), configured.iter().copied())
            ),
        }
    };
    let retry = storage.retry.retry_config();
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let env_http = std::env::var("AWS_ALLOW_HTTP")
                .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
                .unwrap_or(false);
            let endpoint = storage
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
            let allow_http = storage.allow_http.unwrap_or(
                env_http
                    || endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
            );
            if let Some(e) = endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &storage.region {
                b = b.with_region(r);
            } else if std::env::var("AWS_REGION").is_err()
                && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(k) = &storage.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = &storage.secret_access_key {
                b = b.with_secret_access_key(s);
            }
            if let Some(t) = &storage.session_token {
                b = b.with_token(t);
            }
            if let Some(v) = storage.virtual_hosted_style {
                b = b.with_virtual_hosted_style_request(v);
            }
            for (k, v) in &storage.options {
                let key: AmazonS3ConfigKey = k.parse().map_err(wrap)?;
                b = b.with_config(key, v);
            }
            b = b
                .with_retry(retry)
                .with_client_options(storage.retry.client_options(allow_http));
            Arc::new(b.build().map_err(wrap)?)
        }
        "gs" => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
            for (k, v) in &storage.options {
                let key: GoogleConfigKey = k.parse().map_err(wrap)?;
                b = b.with_config(key, v);
            }
            b = b
                .with_retry(retry)
                .with_client_options(storage.retry.client_options(false));
            Arc::new(b.build().map_err(wrap)?)
        }
        _ => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let mut b = MicrosoftAzureBuilder::from_env().with_container_name(bucket);
            for (k, v) in &storage.options {
                let key: AzureConfigKey = k.parse().map_err(wrap)?;
                b = b.with_config(key, v);
            }
            b = b
                .with_retry(retry)
                .with_client_options(storage.retry.client_options(false));
            Arc::new(b.build().map_err(wrap)?)
        }
    };
    Ok(Location {
        original: original.to_string(),
        store,
        prefix,
        store_url,
        is_local: false,
    })
}

/// One line for an object-store error: its kind and message, newlines
/// folded. object_store messages carry URLs and status codes, not the
/// credentials, which live in headers; the line still goes through
/// [`crate::redact::line`] (user info of any URL, every registered secret),
/// because a server's error body or a builder's message may echo anything.
pub fn store_error_line(e: &object_store::Error) -> String {
    let msg = error_chain(e);
    let hint = [
        ("NoSuchBucket", "the bucket does not exist"),
        (
            "SignatureDoesNotMatch",
            "credentials rejected (wrong secret key)",
        ),
        (
            "InvalidAccessKeyId",
            "credentials rejected (unknown access key id)",
        ),
        (
            "NotSignedUp",
            "credentials rejected (unknown access key id)",
        ),
        ("AccessDenied", "access denied"),
        ("ExpiredToken", "credentials expired"),
        ("Connection refused", "the server is not reachable"),
    ]
    .iter()
    .find(|(needle, _)| msg.contains(needle))
    .map(|(_, h)| *h);
    let msg = crate::redact::line(&msg.replace('\n', " "));
    match hint {
        Some(h) => format!("{h}: {msg}"),
        None => msg,
    }
}

/// An error and its sources as one text, repeats dropped. Raw: for
/// matching only, never for a message (see [`store_error_line`]).
fn error_chain(e: &object_store::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_absolute_and_normalized() {
        let l = resolve("/tmp/a/../b/", &StorageSettings::default()).unwrap();
        assert_eq!(l.prefix.as_ref(), "tmp/b");
        assert!(l.is_local);
        assert_eq!(l.child("replay/x").prefix.as_ref(), "tmp/b/replay/x");
    }

    #[test]
    fn s3_url_splits_bucket_and_prefix() {
        let l = resolve("s3://bucket/events/2024", &StorageSettings::default()).unwrap();
        assert_eq!(l.store_url.as_str(), "s3://bucket");
        assert_eq!(l.prefix.as_ref(), "events/2024");
        assert_eq!(
            l.display_path(&l.path("x.parquet")),
            "s3://bucket/events/2024/x.parquet"
        );
    }

    #[test]
    fn credentials_in_url_are_refused_and_redacted() {
        let e = resolve("s3://AKIA:secret@bucket/x", &StorageSettings::default())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.contains("credentials in the URL"), "{e}");
    }

    /// As root, access(2) said yes to /proc and /sys, and the length of a
    /// path was not looked at.
    #[test]
    fn kernel_file_systems_and_paths_too_long_are_not_writable() {
        let storage = StorageSettings::default();
        for (path, want) in [
            ("/proc/backfill-test/out", "proc file system"),
            (
                "/sys/backfill-test/out",
                "sysfs file system|cannot write|does not exist",
            ),
        ] {
            if !std::path::Path::new(path)
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .is_dir()
            {
                continue;
            }
            let e = resolve(path, &storage)
                .unwrap()
                .check_local_writable()
                .unwrap_err();
            assert!(want.split('|').any(|w| e.contains(w)), "{path}: {e}");
        }
        let deep = format!("/tmp/{}", "d/".repeat(1920));
        let e = resolve(&deep, &storage)
            .unwrap()
            .check_local_writable()
            .unwrap_err();
        assert!(e.contains("PATH_MAX"), "{e}");
        let e = resolve(&format!("/tmp/{}", "n".repeat(256)), &storage)
            .unwrap()
            .check_local_writable()
            .unwrap_err();
        assert!(e.contains("file systems allow 255"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(dir.path().join("a/b").to_str().unwrap(), &storage).unwrap();
        loc.check_local_writable().unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe stays"
        );
    }

    /// No store reads a query or fragment; kept, it rode into the report
    /// and the commit log as the sink's target. Refused, shown without it.
    #[test]
    fn a_query_or_fragment_is_refused_without_its_value() {
        for loc in [
            "s3://bucket/x?x=Qs3cr%2Ft",
            "az://c/p?sv=2024&sig=Qs3cr",
            "gs://bucket?Qs3cr",
            "file:///tmp/out?sasl.password=Qs3cr/t",
            "file:///tmp/out#Qs3cr",
        ] {
            let e = resolve(loc, &StorageSettings::default())
                .unwrap_err()
                .to_string();
            assert!(!e.contains("Qs3cr"), "{e}");
            assert!(e.contains("takes no query or fragment"), "{e}");
            assert!(e.contains("?***'") || e.contains("#***'"), "{e}");
        }
        // In a plain path `?` and `#` are characters of a folder's name.
        assert!(resolve("/tmp/a?b#c", &StorageSettings::default()).is_ok());
    }

    /// `/`, `@`, `:` and a percent-encoded `/`: every way a URL parser could
    /// be led astray.
    const CANARY: &str = "Cr/n@ry:s3cr%2Ft";

    #[track_caller]
    fn assert_no_canary(text: &str) {
        for needle in [CANARY, "Cr/n@ry:s3cr/t", "s3cr%2Ft", "s3cr", "Cr%2Fn"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
    }

    #[test]
    fn credentials_with_slash_at_colon_and_percent_never_leak() {
        let storage = StorageSettings::default();
        for scheme in ["s3", "s3a", "gs", "az", "abfss", "file", "ftp"] {
            for userinfo in [
                format!("AKIA:{CANARY}"),
                CANARY.to_string(),
                format!(":{CANARY}"),
                "AKIA:Cr%2Fn%40ry%3As3cr%252Ft".to_string(),
                // Parses as host `u`, port 1234 and a path: still refused.
                "u:1234/s3cr%2Ft".to_string(),
            ] {
                let loc = format!("{scheme}://{userinfo}@bucket/x");
                let e = resolve(&loc, &storage).unwrap_err().to_string();
                assert_no_canary(&e);
                assert!(e.contains(&format!("'{scheme}://***@bucket/x'")), "{e}");
                assert!(e.contains("credentials in the URL"), "{e}");
            }
        }
        // A URL the parser rejects outright is not echoed either.
        let e = resolve(&format!("s3://{CANARY}@[bad/x"), &storage)
            .unwrap_err()
            .to_string();
        assert_no_canary(&e);
    }

    /// Whitespace in an endpoint made object_store's request signer panic;
    /// a query may carry a token.
    #[test]
    fn an_endpoint_with_a_query_or_whitespace_is_refused() {
        for (endpoint, want) in [
            (
                "http://127.0.0.1:9000/?token=Qs3cr",
                "has a query or fragment",
            ),
            ("http://127.0.0.1:9000/#Qs3cr", "has a query or fragment"),
            ("http://127.0.0.1 :9000", "whitespace"),
            ("http://127.0.0.1:9000\n", "whitespace"),
        ] {
            let storage = StorageSettings {
                endpoint: Some(endpoint.into()),
                ..Default::default()
            };
            let e = resolve("s3://bucket/x", &storage).unwrap_err().to_string();
            assert!(!e.contains("Qs3cr"), "{e}");
            assert!(e.contains("[storage] endpoint") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn endpoint_with_credentials_is_refused_naming_the_setting() {
        for (endpoint, option) in [
            (Some(format!("http://AKIA:{CANARY}@127.0.0.1:9000")), None),
            (Some(format!("AKIA:{CANARY}@127.0.0.1:9000")), None),
            (
                None,
                Some((
                    "aws_endpoint_url_s3",
                    format!("https://{CANARY}@s3.example"),
                )),
            ),
        ] {
            let storage = StorageSettings {
                endpoint: endpoint.clone(),
                options: option
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                ..Default::default()
            };
            let e = resolve("s3://bucket/x", &storage).unwrap_err().to_string();
            assert_no_canary(&e);
            let setting = match option {
                Some((k, _)) => format!("[storage] options.{k}"),
                None => "[storage] endpoint".into(),
            };
            assert!(e.contains(&setting), "{e}");
            assert!(e.contains("***@"), "{e}");
            assert!(e.contains("has credentials in it"), "{e}");
        }
    }

    #[test]
    fn builder_errors_do_not_echo_option_values() {
        let storage = StorageSettings {
            options: [("aws_skip_signature".to_string(), CANARY.to_string())].into(),
            ..Default::default()
        };
        let e = resolve("s3://bucket/x", &storage).unwrap_err().to_string();
        assert!(e.contains("cannot configure the s3 store"), "{e}");
        assert!(e.contains("[storage] options.aws_skip_signature"), "{e}");
        assert_no_canary(&e);
    }

    #[test]
    fn unknown_option_keys_are_named_and_their_values_registered() {
        let v = "Opt-Cr/n@ry-registered";
        let s: StorageSettings =
            toml::from_str(&format!("[options]\naws_scret_acess_kee = \"{v}\"\n")).unwrap();
        let e = resolve("s3://bucket/x", &s).unwrap_err().to_string();
        assert!(e.contains("aws_scret_acess_kee"), "{e}");
        assert!(!e.contains(v), "{e}");
        assert_eq!(crate::redact::scrub(&format!("x {v} y")), "x *** y");
        assert!(!format!("{s:?}").contains(v));
        assert!(!serde_json::to_string(&s).unwrap().contains(v));
    }

    #[test]
    fn store_error_line_hides_userinfo_and_registered_secrets() {
        let secret = "Line-Cr/n@ry-registered";
        crate::redact::register(secret);
        let e = object_store::Error::Generic {
            store: "S3",
            source: format!(
                "GET http://AKIA:{CANARY}@127.0.0.1:1/b/x failed; body echoed {secret}"
            )
            .into(),
        };
        let line = store_error_line(&e);
        assert_no_canary(&line);
        assert!(!line.contains("Line-Cr"), "{line}");
        assert!(line.contains("http://***@127.0.0.1:1/b/x"), "{line}");
    }

    #[test]
    fn debug_and_serialize_hide_secrets() {
        let s = StorageSettings {
            endpoint: Some("http://u:end-pw-789@h:9000".into()),
            secret_access_key: Some("hunter2".into()),
            session_token: Some("tok-123".into()),
            options: [
                ("azure_storage_account_key".to_string(), "k-456".to_string()),
                ("aws_sekret_typo".to_string(), "typo-000".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        for text in [format!("{s:?}"), serde_json::to_string(&s).unwrap()] {
            for secret in ["hunter2", "tok-123", "k-456", "end-pw-789", "typo-000"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn a_url_with_one_slash_is_refused_not_taken_for_a_folder() {
        for l in ["s3:/AK:Zq9/p@ss@lake/x", "gs:/b/x", "kafka:/h:9092/t"] {
            let e = resolve(l, &StorageSettings::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("slash missing"), "{e}");
            assert!(!e.contains("Zq9") && !e.contains("lake"), "{e}");
        }
        assert!(resolve("./data:2024/x", &StorageSettings::default()).is_ok());
    }

    #[test]
    fn unknown_scheme_is_named() {
        let e = resolve("ftp://h/x", &StorageSettings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
    }
}
