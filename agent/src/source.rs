//! Sources: where a registered blob's bytes come from.
//!
//! Each source type implements [`Source`]: `stat` learns the object's size and a validator
//! (ETag, Last-Modified, version) in one request, and `read` streams one byte range of exactly
//! that version. A source never splices versions: a read of a changed object fails with
//! [`SourceError::Changed`]. A source does no retrying and no hashing; the transfer engine does
//! both, so every source type gets the same behaviour.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
/// `Retry-After`'s one parser, shared with the control-plane client.
pub use control_client::parse_retry_after;
use control_client::{
    BoxFuture, ControlPlaneError, Credentials, Digest, SourceDescriptor, SourceType,
};
use futures_util::stream::BoxStream;

use crate::config::Config;
use crate::policy::{Policy, PolicyError};
use crate::redact::Redacted;

pub mod artifact_store;
pub mod cloud;
pub mod http;
pub mod https;
pub mod huggingface;

/// A stream of an object's bytes, in order.
pub type ByteStream = BoxStream<'static, Result<Bytes, SourceError>>;

/// What identifies one version of an object, so that every range comes from that version.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Validator {
    /// An HTTP entity tag as sent, quotes and `W/` included.
    ETag(String),
    /// An HTTP-date, for origins that send no ETag.
    LastModified(String),
    /// A source-specific token (file identity in the local artifact store).
    Opaque(String),
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Validator::ETag(v) => write!(f, "etag {v}"),
            Validator::LastModified(v) => write!(f, "last-modified {v}"),
            Validator::Opaque(v) => write!(f, "version {v}"),
        }
    }
}

/// The object as the source describes it at `stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub validator: Option<Validator>,
    /// Whether the source serves byte ranges. When it does not, the object is read as one
    /// stream from the start.
    pub ranges: bool,
}

pub trait Source: Send + Sync + fmt::Debug {
    /// The object's address, fit to show in logs and errors.
    fn uri(&self) -> Redacted;

    /// Learns size and validator.
    fn stat(&self) -> BoxFuture<'_, Result<ObjectInfo, SourceError>>;

    /// Streams `range` (the whole object when `None`) of the version `pinned` describes.
    fn read<'a>(
        &'a self,
        range: Option<Range<u64>>,
        pinned: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<ByteStream, SourceError>>;

    /// Before `stat`: the version an interrupted run of this transfer was pinned to (from its
    /// resume journal). A source whose URI names a version that moves (a Hub branch) stats
    /// that version instead, so the resume goes on with the same bytes; others ignore it.
    fn prefer_version(&self, _earlier: &Validator) {}

    /// After `stat`: a digest of the whole object that the source vouches for (the Hub's LFS
    /// sha256), so that a registration it contradicts fails before any byte is fetched.
    fn announced_digest(&self) -> Option<Digest> {
        None
    }
}

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("source uri {uri} is invalid: {reason}")]
    InvalidUri { uri: Redacted, reason: String },
    #[error("source type {0} is not supported by this build")]
    Unsupported(SourceType),
    #[error("cannot obtain credentials for the source")]
    Credentials(#[from] ControlPlaneError),
    #[error("the control plane issued the wrong kind of credentials for {uri}: it takes {wanted}")]
    WrongCredential { uri: Redacted, wanted: &'static str },
    #[error("{uri} does not exist")]
    NotFound { uri: Redacted },
    #[error("{uri} was refused with status {status}")]
    Denied { uri: Redacted, status: u16 },
    #[error("{uri} was refused with status {status}: {reason}")]
    Unauthorized {
        uri: Redacted,
        status: u16,
        reason: &'static str,
    },
    #[error("{uri} resolves to commit {resolved}, but the registration pins {registered}")]
    RefMismatch {
        uri: Redacted,
        registered: String,
        resolved: String,
    },
    #[error("{uri} changed during the transfer: {reason}")]
    Changed { uri: Redacted, reason: String },
    #[error("{uri} ignored the Range header and sent the whole object")]
    RangeIgnored { uri: Redacted },
    #[error("{uri} answered outside the protocol: {reason}")]
    Protocol { uri: Redacted, reason: String },
    #[error("{uri} answered status {status}")]
    Status {
        uri: Redacted,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{uri}: {what}")]
    Transport {
        uri: Redacted,
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{uri}: {what}")]
    Cloud {
        uri: Redacted,
        what: &'static str,
        /// Boxed: object_store's error is large, and every `Result` of a transfer carries this.
        #[source]
        source: Box<::object_store::Error>,
    },
    #[error("{uri} ended the body after {got} of {expected} bytes")]
    Truncated {
        uri: Redacted,
        expected: u64,
        got: u64,
    },
    #[error("{uri} sent more bytes than the {expected} it announced")]
    Overlong { uri: Redacted, expected: u64 },
    #[error("{uri} redirected more than {max} times")]
    TooManyRedirects { uri: Redacted, max: usize },
    #[error("cannot read {uri}")]
    Io {
        uri: Redacted,
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            // A TLS handshake failure (rustls reports it as invalid data) will not go away.
            SourceError::Transport { source, .. } => {
                !crate::errors::has_io_kind(source, std::io::ErrorKind::InvalidData)
            }
            SourceError::Truncated { .. } | SourceError::Cloud { .. } => true,
            SourceError::Credentials(e) => e.code() == "control_plane_unavailable",
            _ => false,
        }
    }

    /// How long the origin asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            SourceError::Policy(e) => e.code(),
            SourceError::InvalidUri { .. } => "invalid_source_uri",
            SourceError::Credentials(e) => e.code(),
            SourceError::WrongCredential { .. } => "wrong_credential_kind",
            SourceError::Unsupported(_) => "unsupported_source",
            SourceError::NotFound { .. } => "source_not_found",
            SourceError::Denied { .. } | SourceError::Unauthorized { .. } => "source_denied",
            SourceError::RefMismatch { .. } => "source_ref_mismatch",
            SourceError::Changed { .. } => "source_changed",
            SourceError::TooManyRedirects { .. } => "too_many_redirects",
            SourceError::RangeIgnored { .. }
            | SourceError::Protocol { .. }
            | SourceError::Overlong { .. } => "bad_source_response",
            SourceError::Status { .. }
            | SourceError::Transport { .. }
            | SourceError::Truncated { .. }
            | SourceError::Cloud { .. }
            | SourceError::Io { .. } => "source_unavailable",
        }
    }
}

/// Builds the source for a registration. The URI is checked against policy here, before any
/// request is made.
pub fn open(
    descriptor: &SourceDescriptor,
    credentials: Credentials,
    config: &Config,
    policy: Arc<Policy>,
    http: &reqwest::Client,
) -> Result<Arc<dyn Source>, SourceError> {
    match descriptor.source_type {
        SourceType::Https => {
            let source =
                https::HttpsSource::new(&descriptor.uri, credentials, policy, http.clone())?;
            Ok(Arc::new(source))
        }
        SourceType::ArtifactStore => {
            policy.check_source_type(SourceType::ArtifactStore, &descriptor.uri)?;
            let root = &config.sources.artifact_store.root;
            Ok(Arc::new(artifact_store::LocalStoreSource::new(
                root,
                &descriptor.uri,
            )?))
        }
        SourceType::S3 => cloud::open::<cloud::S3>(descriptor, credentials, config, &policy, http),
        SourceType::Gcs => {
            cloud::open::<cloud::Gcs>(descriptor, credentials, config, &policy, http)
        }
        SourceType::AzureBlob => {
            cloud::open::<cloud::Azure>(descriptor, credentials, config, &policy, http)
        }
        SourceType::Huggingface => {
            let endpoint = config
                .sources
                .huggingface
                .endpoint_url()
                .map_err(|reason| SourceError::InvalidUri {
                    uri: Redacted::uri(&descriptor.uri),
                    reason,
                })?;
            let source = huggingface::HuggingfaceSource::new(
                &descriptor.uri,
                descriptor.source_ref.as_deref(),
                endpoint,
                credentials,
                policy,
                http.clone(),
            )?;
            Ok(Arc::new(source))
        }
    }
}
