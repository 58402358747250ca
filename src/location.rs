//! The one resolver from a user's location string (a plain path, `file://`,
//! `s3://`, `gs://`, `az://`) to an object store and a prefix inside it.
//!
//! Every module that reads or writes data goes through [`Location`]: the
//! source scan, the Parquet sinks, the state. Nothing else opens data files,
//! so a new store works everywhere at once. This module must never put a
//! secret in a message: [`Location`]'s `Display` is the URL as the user wrote
//! it, and credentials only ever come from the environment or `[storage]`.

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
    #[error("location '{location}': cannot configure the {scheme} store: {source}")]
    Store {
        location: String,
        scheme: String,
        #[source]
        source: object_store::Error,
    },
}

/// Object-store settings from the job file's `[storage]` section. Every field
/// overrides the matching standard environment variable (`AWS_ENDPOINT_URL`,
/// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...), which are read first.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000` for MinIO.
    pub endpoint: Option<String>,
    /// Region; S3-compatible servers usually accept any (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id (use `${AWS_ACCESS_KEY_ID}` rather than the literal).
    pub access_key_id: Option<String>,
    /// Secret key; never printed.
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials; never printed.
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
    /// `azure_storage_account_name`, ...), passed through untouched.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// Debug without secrets: settings end up in debug logs and panics, and a
/// secret must never be printed.
impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |v: &Option<String>| v.as_ref().map(|_| "***");
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let secret = ["secret", "key", "token", "password", "credential", "sas"]
                    .iter()
                    .any(|w| k.to_ascii_lowercase().contains(w));
                (k.as_str(), if secret { "***" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("StorageSettings")
            .field("endpoint", &self.endpoint)
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
    /// What the user wrote, for messages. Never holds a secret: URLs with
    /// user info are rejected by [`resolve`].
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

/// Resolve a location string. Plain paths may be relative; they are made
/// absolute against the current directory.
pub fn resolve(location: &str, storage: &StorageSettings) -> Result<Location, LocationError> {
    let invalid = |reason: String| LocationError::Invalid {
        location: location.to_string(),
        reason,
    };
    if location.trim().is_empty() {
        return Err(invalid("empty location".into()));
    }
    let looks_like_url = location.contains("://");
    if !looks_like_url {
        return resolve_local(location, std::path::Path::new(location));
    }
    let url = Url::parse(location).map_err(|e| invalid(format!("not a valid URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Refuse rather than risk echoing a secret in every later message.
        return Err(LocationError::Invalid {
            location: redact_userinfo(location),
            reason: "credentials in the URL are not accepted; use the environment or [storage]"
                .into(),
        });
    }
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
            location: original.to_string(),
            reason: "missing bucket or container name".into(),
        });
    }
    let prefix = Path::parse(url.path().trim_matches('/')).map_err(|e| LocationError::Invalid {
        location: original.to_string(),
        reason: format!("invalid object path: {e}"),
    })?;
    let store_url = Url::parse(&format!("{}://{}", url.scheme(), bucket)).map_err(|e| {
        LocationError::Invalid {
            location: original.to_string(),
            reason: format!("invalid bucket: {e}"),
        }
    })?;
    let wrap = |source| LocationError::Store {
        location: original.to_string(),
        scheme: scheme.to_string(),
        source,
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

/// `s3://user:pass@b/x` → `s3://***@b/x`, for the one message that must
/// mention such a URL.
pub fn redact_userinfo(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(i), Some(j)) if j > i => format!("{}://***{}", &s[..i], &s[j..]),
        _ => s.to_string(),
    }
}

/// One line for an object-store error: its kind and message, newlines
/// folded. object_store messages carry URLs and status codes, never the
/// credentials, which live in headers.
pub fn store_error_line(e: &object_store::Error) -> String {
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
    let msg = msg.replace('\n', " ");
    match hint {
        Some(h) => format!("{h}: {msg}"),
        None => msg,
    }
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

    #[test]
    fn debug_hides_secrets() {
        let s = StorageSettings {
            secret_access_key: Some("hunter2".into()),
            session_token: Some("tok-123".into()),
            options: [("azure_storage_account_key".to_string(), "k-456".to_string())].into(),
            ..Default::default()
        };
        let d = format!("{s:?}");
        for secret in ["hunter2", "tok-123", "k-456"] {
            assert!(!d.contains(secret), "{d}");
        }
    }

    #[test]
    fn unknown_scheme_is_named() {
        let e = resolve("ftp://h/x", &StorageSettings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
    }
}
