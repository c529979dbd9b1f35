//! Configuration: one TOML file, every key overridable from the environment, validated once at
//! start-up.
//!
//! A key `k` of section `[s]` is overridden by `BLOBSTAGE_S_K` (`[transfer] chunk_size` by
//! `BLOBSTAGE_TRANSFER_CHUNK_SIZE`, top-level `state_dir` by `BLOBSTAGE_STATE_DIR`). The value
//! is read as a TOML value when it parses as one (`8`, `true`, `["prod"]`) and as a string
//! otherwise. Unknown keys, from the file or the environment, are errors: a typo must not
//! silently fall back to a default. Relative paths are resolved against the directory of the
//! configuration file, so an example configuration works from any working directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use control_client::TrustState;
use serde::Deserialize;

/// Environment variables with the `BLOBSTAGE_` prefix that are not configuration keys.
const NOT_CONFIG_VARS: &[&str] = &[
    "BLOBSTAGE_CONFIG",
    "BLOBSTAGE_SOCKET",
    "BLOBSTAGE_LOG",
    // Test hooks of debug builds (store.rs); release builds ignore them.
    "BLOBSTAGE_PAUSE_AT",
    "BLOBSTAGE_PAUSE_UNTIL",
];

/// Sections whose keys the environment may override, longest first so that
/// `SOURCES_AZURE_BLOB_` wins over a shorter prefix.
const SECTIONS: &[&str] = &[
    "store",
    "sources.artifact_store",
    "sources.huggingface",
    "sources.azure_blob",
    "control_plane",
    "sources.https",
    "sources.gcs",
    "sources.s3",
    "transfer",
    "policy",
    "api",
    "log",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Content store, ingest area and event log live here.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// Identifies this node in events and credential requests; the hostname when unset.
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub control_plane: ControlPlaneConfig,
    #[serde(default)]
    pub transfer: TransferConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub sources: SourcesConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// How log lines are written. The filter is `BLOBSTAGE_LOG`, not a key: it applies before the
/// configuration is read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// Where and how log lines go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// The journal's native fields when stderr is connected to the journal (`JOURNAL_STREAM`),
    /// else text.
    #[default]
    Auto,
    /// Human-readable lines on stderr (colours on a terminal).
    Text,
    /// One JSON object a line on stderr, with the fields of the spans it happened in.
    Json,
    /// Straight to the journal, every field a journal field.
    Journald,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "defaults::socket")]
    pub socket: PathBuf,
    #[serde(default = "defaults::metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Peers (by uid) allowed on the socket besides root and the daemon's own user.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Peers (by primary gid) allowed on the socket.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// The file-backed control plane's registry. The default when no `url` is set.
    pub registry: Option<PathBuf>,
    /// Where the file-backed control plane appends events; `<state_dir>/events.jsonl` if unset.
    pub events_log: Option<PathBuf>,
    /// The HTTP control plane; when set, `registry` must not be.
    pub url: Option<String>,
    /// The node identity token for the HTTP control plane, re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// Allows a plain `http://` url (tests, labs).
    #[serde(default)]
    pub insecure_http: bool,
    /// Extra PEM certificate authorities for the HTTP control plane.
    pub ca_file: Option<PathBuf>,
    /// Per attempt of an HTTP control-plane call.
    #[serde(default = "defaults::control_plane_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Events kept on disk for the control plane at most; at the limit new pulls are refused.
    #[serde(default = "defaults::outbox_max_events")]
    pub outbox_max_events: usize,
    /// How long a registration is reused before the control plane is asked again. A digest
    /// that changes for a known id is refused whatever this is.
    #[serde(default = "defaults::cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// Size of one ranged request.
    #[serde(default = "defaults::chunk_size")]
    pub chunk_size: ByteSize,
    /// Ranged requests in flight for one blob, at the start of its transfer.
    #[serde(default = "defaults::connections_per_blob")]
    pub connections_per_blob: usize,
    /// How far a transfer may add connections while that raises its throughput (an origin
    /// that caps each connection); [4 × connections_per_blob, at most 64 and at most
    /// max_connections]. Equal to `connections_per_blob`, it never adds any.
    #[serde(default)]
    pub max_connections_per_blob: Option<usize>,
    /// Ranged requests in flight for all blobs together.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// A connection that delivers no byte for this long is abandoned and its range retried.
    #[serde(default = "defaults::read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Attempts per range, the first included, before the transfer fails.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Memory for ranges that arrive ahead of the hashed prefix; beyond it, the hasher reads
    /// them back from the page cache instead of holding them.
    #[serde(default = "defaults::hash_window")]
    pub hash_window: ByteSize,
    /// Partial transfers left untouched this long are removed instead of resumed.
    #[serde(default = "defaults::ingest_ttl", with = "humantime_serde")]
    pub ingest_ttl: Duration,
    /// Blobs the daemon transfers at once; further pulls wait in a queue.
    #[serde(default = "defaults::max_transfers")]
    pub max_transfers: usize,
    /// On SIGTERM, how long transfers get to checkpoint before the daemon exits anyway.
    #[serde(default = "defaults::shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// The content store's size budget. Without a high watermark, nothing is evicted on its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// When the blobs exceed this, least recently used unleased blobs are evicted...
    pub high_watermark: Option<ByteSize>,
    /// ...until they fit in this. `blobstage gc` also collects down to it.
    pub low_watermark: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    #[serde(default)]
    pub https: HttpsConfig,
    #[serde(default)]
    pub s3: S3Config,
    #[serde(default)]
    pub gcs: GcsConfig,
    #[serde(default)]
    pub azure_blob: AzureBlobConfig,
    #[serde(default)]
    pub huggingface: HuggingfaceConfig,
    #[serde(default)]
    pub artifact_store: ArtifactStoreConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsConfig {
    /// Extra PEM certificate authorities trusted besides the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// An S3-compatible store; `https://s3.<region>.amazonaws.com` when unset. Requests are
    /// path-style (`<endpoint>/<bucket>/<key>`).
    pub endpoint: Option<String>,
    /// The region requests are signed for; `us-east-1` when unset.
    pub region: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    /// `https://storage.googleapis.com` when unset.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureBlobConfig {
    /// The storage account of `az://container/blob` URIs.
    pub account: Option<String>,
    /// The account's blob endpoint for `az://` URIs; `https://<account>.blob.core.windows.net`
    /// when unset.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HuggingfaceConfig {
    /// The Hub, or a mirror of it; the public Hub when unset.
    pub endpoint: Option<String>,
}

impl HuggingfaceConfig {
    pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

    /// The endpoint as a URL: http or https, with no credentials, query or fragment. Plain
    /// http still needs an allow entry with `insecure_http`, like any other URL.
    pub fn endpoint_url(&self) -> Result<url::Url, String> {
        let text = self.endpoint.as_deref().unwrap_or(Self::DEFAULT_ENDPOINT);
        let bad = |why: &str| format!("sources.huggingface.endpoint `{text}` {why}");
        let url = url::Url::parse(text).map_err(|e| bad(&format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(bad("must be an http:// or https:// URL with a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("must not carry credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        Ok(url)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactStoreConfig {
    #[serde(default = "defaults::artifact_store_root")]
    pub root: PathBuf,
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The node's source allowlist; empty denies every source.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    /// Channels this node stages; unset accepts every channel.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// Lowest trust state staged, per channel (`prod = "verified"`).
    #[serde(default)]
    pub min_trust: BTreeMap<String, TrustState>,
}

/// One `[[policy.allow]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    pub source_type: control_client::SourceType,
    /// Exact host, or `*.example.com` for any subdomain of example.com.
    pub host: Option<String>,
    /// The bucket of `s3` and `gcs` entries (exact name).
    pub bucket: Option<String>,
    /// The container of `azure_blob` entries; unset allows every container of `account`.
    pub container: Option<String>,
    /// The storage account of `azure_blob` entries; unset allows `container` in any account.
    pub account: Option<String>,
    pub org: Option<String>,
    /// Allows plain `http://` for URIs this entry matches (loopback tests and labs only); for
    /// the bucket-addressed types, a plain-http `endpoint` of their `[sources]` section.
    #[serde(default)]
    pub insecure_http: bool,
}

/// Why the configuration was refused. Every variant maps to exit code 64.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var} does not name a configuration key")]
    UnknownVariable { var: String },
    #[error("configuration is invalid: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads, overrides from the environment, resolves relative paths and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path, std::env::vars())
    }

    /// Like [`Config::load`], with the file's text and the environment given.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        apply_env(&mut table, env)?;
        let mut config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        // Before paths are resolved: an empty path would resolve to the file's directory.
        if config.api.socket.as_os_str().is_empty() || config.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "api.socket and state_dir must not be empty".into(),
            ));
        }
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// This node's id: the configured one, else the hostname.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown-node".to_owned())
        })
    }

    /// The file-backed control plane's registry, unless an HTTP control plane is configured.
    pub fn registry_path(&self) -> PathBuf {
        self.control_plane
            .registry
            .clone()
            .unwrap_or_else(defaults::registry)
    }

    pub fn events_log_path(&self) -> PathBuf {
        self.control_plane
            .events_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("events.jsonl"))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        resolve(&mut self.api.socket);
        resolve(&mut self.sources.artifact_store.root);
        let optional = [
            &mut self.control_plane.registry,
            &mut self.control_plane.events_log,
            &mut self.control_plane.token_file,
            &mut self.control_plane.ca_file,
            &mut self.sources.https.ca_file,
        ];
        optional.into_iter().flatten().for_each(resolve);
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let t = &self.transfer;
        if !(ChunkBounds::MIN..=ChunkBounds::MAX).contains(&t.chunk_size.0) {
            return invalid(format!(
                "transfer.chunk_size must be between 64KiB and 1GiB, not {}",
                t.chunk_size
            ));
        }
        if t.connections_per_blob == 0 || t.connections_per_blob > 64 {
            return invalid("transfer.connections_per_blob must be between 1 and 64".into());
        }
        if t.max_connections < t.connections_per_blob {
            return invalid(
                "transfer.max_connections must be at least connections_per_blob".into(),
            );
        }
        if let Some(most) = t.max_connections_per_blob
            && !(t.connections_per_blob..=t.max_connections.min(64)).contains(&most)
        {
            return invalid(format!(
                "transfer.max_connections_per_blob must be between connections_per_blob ({}) and \
                 max_connections ({}, at most 64), not {most}",
                t.connections_per_blob, t.max_connections
            ));
        }
        let s = &self.store;
        if s.high_watermark.is_some() && s.low_watermark.is_none()
            || s.low_watermark > s.high_watermark && s.high_watermark.is_some()
        {
            return invalid(
                "store.low_watermark must be set and at most store.high_watermark".into(),
            );
        }
        if t.max_transfers == 0 {
            return invalid("transfer.max_transfers must be at least 1".into());
        }
        if t.max_attempts == 0 {
            return invalid("transfer.max_attempts must be at least 1".into());
        }
        if t.read_timeout.is_zero() || t.connect_timeout.is_zero() {
            return invalid("transfer timeouts must be greater than zero".into());
        }
        let cp = &self.control_plane;
        if cp.url.is_some() && cp.registry.is_some() {
            return invalid("control_plane: set url or registry, not both".into());
        }
        if cp.timeout.is_zero() {
            return invalid("control_plane.timeout must be greater than zero".into());
        }
        let mut channels = self.policy.channels.iter().flatten();
        if let Some(e) = channels.find_map(|c| control_client::Channel::new(c.as_str()).err()) {
            return invalid(format!("policy.channels: {e}"));
        }
        if let Err(e) = self.sources.huggingface.endpoint_url() {
            return invalid(e);
        }
        self.sources.validate_endpoints()?;
        self.policy.allow.iter().try_for_each(AllowEntry::validate)
    }
}

impl SourcesConfig {
    /// Every configured object-store endpoint is an http(s) URL without userinfo, query or
    /// fragment (whether plain http is allowed is the policy's to say).
    fn validate_endpoints(&self) -> Result<(), ConfigError> {
        let endpoints = [
            ("sources.s3.endpoint", &self.s3.endpoint),
            ("sources.gcs.endpoint", &self.gcs.endpoint),
            ("sources.azure_blob.endpoint", &self.azure_blob.endpoint),
        ];
        for (key, endpoint) in endpoints {
            let Some(endpoint) = endpoint else { continue };
            let valid = url::Url::parse(endpoint).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
            });
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "{key} `{endpoint}` must be an http(s) URL without credentials or query"
                )));
            }
        }
        Ok(())
    }
}

impl AllowEntry {
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_fields()?;
        if let Some(host) = &self.host {
            let pattern = host.strip_prefix("*.").unwrap_or(host);
            let valid = !pattern.is_empty()
                && !pattern.contains('*')
                && pattern
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "policy.allow host `{host}` must be an exact host or `*.domain`"
                )));
            }
        }
        self.validate_org()
    }

    /// `org` names Hub organisations: only on `huggingface` entries, and apart from `host`
    /// (an entry allows the Hub's and its CDN's hosts, or an organisation, not both at once).
    fn validate_org(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(format!("policy.allow: {m}")));
        let hub = self.source_type == control_client::SourceType::Huggingface;
        match (&self.org, &self.host) {
            (Some(_), _) if !hub => invalid("org is for source_type = \"huggingface\" only"),
            (Some(_), Some(_)) => invalid("a huggingface entry sets host or org, not both"),
            (None, None) if hub => invalid("a huggingface entry sets host or org"),
            (Some(org), None) if !valid_org(org) => {
                invalid("org must be a Hub name: letters, digits, '-', '_' or '.'")
            }
            _ => Ok(()),
        }
    }
}

fn valid_org(org: &str) -> bool {
    !org.is_empty()
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl AllowEntry {
    /// The bucket-addressed types name what they allow by bucket (or account and container),
    /// never by host: their host is the configured endpoint.
    fn validate_fields(&self) -> Result<(), ConfigError> {
        use control_client::SourceType::{AzureBlob, Gcs, S3};
        let t = self.source_type;
        let set = |field: &Option<String>| field.is_some();
        let (valid, needs) = match t {
            S3 | Gcs => (
                set(&self.bucket)
                    && !set(&self.host)
                    && !set(&self.container)
                    && !set(&self.account)
                    && !set(&self.org),
                "a bucket (and no host, container, account or org)",
            ),
            AzureBlob => (
                (set(&self.container) || set(&self.account))
                    && !set(&self.host)
                    && !set(&self.bucket)
                    && !set(&self.org),
                "a container, an account or both (and no host, bucket or org)",
            ),
            _ => (true, ""),
        };
        if !valid {
            return Err(ConfigError::Invalid(format!(
                "policy.allow entries of source_type {t} take {needs}"
            )));
        }
        Ok(())
    }
}

struct ChunkBounds;

impl ChunkBounds {
    const MIN: u64 = 64 << 10;
    const MAX: u64 = 1 << 30;
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(name) = var.strip_prefix("BLOBSTAGE_") else {
            continue;
        };
        if NOT_CONFIG_VARS.contains(&var.as_str()) {
            continue;
        }
        let (section, key) = split_env_name(name)
            .ok_or_else(|| ConfigError::UnknownVariable { var: var.clone() })?;
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let mut target = &mut *table;
        for part in section.iter().flat_map(|s| s.split('.')) {
            let entry = target
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default()));
            target = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::UnknownVariable { var: var.clone() })?;
        }
        target.insert(key, value);
    }
    Ok(())
}

/// `TRANSFER_CHUNK_SIZE` -> (Some("transfer"), "chunk_size"); `STATE_DIR` -> (None, "state_dir").
fn split_env_name(name: &str) -> Option<(Option<&'static str>, String)> {
    let lower = name.to_ascii_lowercase();
    for section in SECTIONS {
        let prefix = format!("{}_", section.replace('.', "_"));
        if let Some(key) = lower.strip_prefix(&prefix) {
            return (!key.is_empty()).then(|| (Some(*section), key.to_owned()));
        }
    }
    (!lower.is_empty()).then_some((None, lower))
}

/// A size in bytes, written in configuration as `16MiB`, `512KiB`, `1GB` or a plain integer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 16MiB"))?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ));
            }
        };
        n.checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        match UNITS
            .iter()
            .find(|(_, m)| self.0 >= *m && self.0.is_multiple_of(*m))
        {
            Some((unit, m)) => write!(f, "{}{unit}", self.0 / m),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Durations written as `30s`, `500ms`, `2m`.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod defaults {
    use super::*;

    pub(super) fn state_dir() -> PathBuf {
        "/var/lib/blobstage".into()
    }
    pub(super) fn socket() -> PathBuf {
        "/run/blobstage/agent.sock".into()
    }
    pub(super) fn metrics_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
    pub(super) fn registry() -> PathBuf {
        "/etc/blobstage/registry.json".into()
    }
    pub(super) fn artifact_store_root() -> PathBuf {
        "/var/lib/blobstage/artifact-store".into()
    }
    pub(super) fn chunk_size() -> ByteSize {
        ByteSize(16 << 20)
    }
    pub(super) fn connections_per_blob() -> usize {
        8
    }
    pub(super) fn max_connections() -> usize {
        32
    }
    pub(super) fn read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn max_attempts() -> u32 {
        5
    }
    pub(super) fn hash_window() -> ByteSize {
        ByteSize(16 << 20)
    }
    pub(super) fn ingest_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub(super) fn control_plane_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn cache_ttl() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn outbox_max_events() -> usize {
        100_000
    }
    pub(super) fn max_transfers() -> usize {
        4
    }
    pub(super) fn shutdown_grace() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: defaults::socket(),
            metrics_listen: defaults::metrics_listen(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
        }
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            registry: None,
            events_log: None,
            url: None,
            token_file: None,
            insecure_http: false,
            ca_file: None,
            timeout: defaults::control_plane_timeout(),
            outbox_max_events: defaults::outbox_max_events(),
            cache_ttl: defaults::cache_ttl(),
        }
    }
}

impl TransferConfig {
    /// The most connections one transfer may grow to (see `max_connections_per_blob`).
    pub fn connections_ceiling(&self) -> usize {
        self.max_connections_per_blob.unwrap_or_else(|| {
            (self.connections_per_blob * 4)
                .min(64)
                .min(self.max_connections)
                .max(self.connections_per_blob)
        })
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_size: defaults::chunk_size(),
            connections_per_blob: defaults::connections_per_blob(),
            max_connections_per_blob: None,
            max_connections: defaults::max_connections(),
            read_timeout: defaults::read_timeout(),
            connect_timeout: defaults::connect_timeout(),
            max_attempts: defaults::max_attempts(),
            hash_window: defaults::hash_window(),
            ingest_ttl: defaults::ingest_ttl(),
            max_transfers: defaults::max_transfers(),
            shutdown_grace: defaults::shutdown_grace(),
        }
    }
}

impl Default for ArtifactStoreConfig {
    fn default() -> Self {
        ArtifactStoreConfig {
            root: defaults::artifact_store_root(),
            url: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml(text, Path::new("/etc/blobstage/agent.toml"), env)
    }

    #[test]
    fn the_empty_file_gives_the_contract_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.state_dir, Path::new("/var/lib/blobstage"));
        assert_eq!(c.transfer.chunk_size, ByteSize(16 << 20));
        assert_eq!(c.transfer.connections_per_blob, 8);
        assert_eq!(c.transfer.max_connections, 32);
        assert_eq!(c.transfer.connections_ceiling(), 32);
        assert_eq!(c.api.metrics_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.registry_path(), Path::new("/etc/blobstage/registry.json"));
        assert_eq!(
            c.events_log_path(),
            Path::new("/var/lib/blobstage/events.jsonl")
        );
        assert_eq!(c.control_plane.outbox_max_events, 100_000);
        assert!(c.policy.allow.is_empty());
        assert_eq!(c.log.format, LogFormat::Auto);
        let hub = c.sources.huggingface.endpoint_url().unwrap();
        assert_eq!(hub.as_str(), "https://huggingface.co/");
    }

    #[test]
    fn environment_overrides_every_section() {
        let c = load(
            "state_dir = '/a'\n[transfer]\nchunk_size = '1MiB'\n",
            &[
                ("BLOBSTAGE_STATE_DIR", "/b"),
                ("BLOBSTAGE_TRANSFER_CHUNK_SIZE", "4MiB"),
                ("BLOBSTAGE_TRANSFER_CONNECTIONS_PER_BLOB", "3"),
                ("BLOBSTAGE_CONTROL_PLANE_REGISTRY", "reg.json"),
                ("BLOBSTAGE_SOURCES_AZURE_BLOB_ACCOUNT", "acct"),
                ("BLOBSTAGE_POLICY_CHANNELS", "[\"prod\", \"dev\"]"),
                ("BLOBSTAGE_LOG_FORMAT", "json"),
                ("BLOBSTAGE_LOG", "debug"),
                ("BLOBSTAGE_SOCKET", "/not/config"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.state_dir, Path::new("/b"));
        assert_eq!(c.transfer.chunk_size, ByteSize(4 << 20));
        assert_eq!(c.transfer.connections_per_blob, 3);
        assert_eq!(c.registry_path(), Path::new("/etc/blobstage/reg.json"));
        assert_eq!(c.sources.azure_blob.account.as_deref(), Some("acct"));
        assert_eq!(c.policy.channels, Some(vec!["prod".into(), "dev".into()]));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn object_store_sections_come_from_the_file_or_the_environment() {
        let c = load(
            "[sources.s3]\nendpoint = 'http://127.0.0.1:1'\n\
             [[policy.allow]]\nsource_type = 's3'\nbucket = 'models'\ninsecure_http = true\n\
             [[policy.allow]]\nsource_type = 'gcs'\nbucket = 'models'\n\
             [[policy.allow]]\nsource_type = 'azure_blob'\naccount = 'acct'\n\
             [[policy.allow]]\nsource_type = 'azure_blob'\ncontainer = 'c'\n",
            &[
                ("BLOBSTAGE_SOURCES_S3_ENDPOINT", "http://127.0.0.1:2"),
                ("BLOBSTAGE_SOURCES_S3_REGION", "eu-west-1"),
                ("BLOBSTAGE_SOURCES_GCS_ENDPOINT", "http://127.0.0.1:3"),
                (
                    "BLOBSTAGE_SOURCES_AZURE_BLOB_ENDPOINT",
                    "http://127.0.0.1:4/acct",
                ),
            ],
        )
        .unwrap();
        let s = &c.sources;
        assert_eq!(s.s3.endpoint.as_deref(), Some("http://127.0.0.1:2"));
        assert_eq!(s.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.gcs.endpoint.as_deref(), Some("http://127.0.0.1:3"));
        assert_eq!(
            s.azure_blob.endpoint.as_deref(),
            Some("http://127.0.0.1:4/acct")
        );
        assert_eq!(c.policy.allow.len(), 4);
        assert!(load("", &[("BLOBSTAGE_SOURCES_S3_BUCKET", "b")]).is_err());
    }

    #[test]
    fn unknown_keys_are_errors_wherever_they_come_from() {
        assert!(matches!(
            load("chunk_size = 1", &[]),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            load("[transfer]\nchunksize = 1", &[]),
            Err(ConfigError::Parse { .. })
        ));
        assert!(load("", &[("BLOBSTAGE_TRANSFER_CHUNKSIZE", "1MiB")]).is_err());
        assert!(load("", &[("BLOBSTAGE_", "x")]).is_err());
    }

    #[test]
    fn a_transfer_may_grow_to_four_times_its_connections_within_the_budget() {
        let ceiling = |text: &str| load(text, &[]).unwrap().transfer.connections_ceiling();
        assert_eq!(ceiling("[transfer]\nconnections_per_blob = 3"), 12);
        assert_eq!(ceiling("[transfer]\nconnections_per_blob = 20"), 32);
        let wide = "[transfer]\nconnections_per_blob = 20\nmax_connections = 100";
        assert_eq!(ceiling(wide), 64);
        let all = "[transfer]\nconnections_per_blob = 32";
        assert_eq!(ceiling(all), 32);
        let fixed = "[transfer]\nconnections_per_blob = 4\nmax_connections_per_blob = 4";
        assert_eq!(ceiling(fixed), 4);
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        for bad in [
            "[transfer]\nchunk_size = '1KiB'",
            "[transfer]\nconnections_per_blob = 0",
            "[transfer]\nconnections_per_blob = 16\nmax_connections = 8",
            "[transfer]\nconnections_per_blob = 8\nmax_connections_per_blob = 4",
            "[transfer]\nmax_connections_per_blob = 33",
            "[transfer]\nread_timeout = 'soon'",
            "[transfer]\nchunk_size = '16 parsecs'",
            "[[policy.allow]]\nsource_type = 'https'\nhost = 'a.*.com'",
            "[[policy.allow]]\nsource_type = 'ftp'",
            "[policy]\nmin_trust = { prod = 'trusted' }",
            "[log]\nformat = 'xml'",
            "[[policy.allow]]\nsource_type = 'https'\norg = 'acme'\nhost = 'a.example'",
            "[[policy.allow]]\nsource_type = 'huggingface'\norg = 'acme'\nhost = 'hf.co'",
            "[[policy.allow]]\nsource_type = 'huggingface'",
            "[[policy.allow]]\nsource_type = 'huggingface'\norg = 'a/b'",
            "[sources.huggingface]\nendpoint = 'ftp://hub.example'",
            "[sources.huggingface]\nendpoint = 'https://u:p@hub.example'",
            "[sources.huggingface]\nendpoint = 'hub.example'",
            "[[policy.allow]]\nsource_type = 's3'",
            "[[policy.allow]]\nsource_type = 's3'\nbucket = 'b'\nhost = 'h.example'",
            "[[policy.allow]]\nsource_type = 'gcs'\ncontainer = 'c'",
            "[[policy.allow]]\nsource_type = 'azure_blob'\nbucket = 'b'",
            "[[policy.allow]]\nsource_type = 'azure_blob'",
            "[sources.s3]\nendpoint = 'ftp://127.0.0.1'",
            "[sources.gcs]\nendpoint = 'not a url'",
            "[sources.azure_blob]\nendpoint = 'https://u:p@acct.blob.example'",
            "[sources.s3]\nendpoint = 'https://s3.example/?sig=x'",
            "[sources.s3]\nbucket = 'b'",
        ] {
            assert!(load(bad, &[]).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("1048576".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }
}
