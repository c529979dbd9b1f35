//! The object-store sources, `s3`, `gcs` and `azure_blob`: one range-read path over
//! `object_store`, and a small [`Cloud`] per store (`cloud/s3.rs`, `cloud/gcs.rs`,
//! `cloud/azure.rs`) that says how its URIs name an object, how its client is built, and which
//! issued credentials it signs with.
//!
//! # Design
//!
//! Requests. `stat` is a HEAD (of the `source_ref` version when one is registered) and learns
//! the size and the ETag. Every read is a ranged GET of that version with `If-Match: <ETag>`,
//! and the ETag of its answer is compared as well, so a changed object fails with
//! `source_changed` instead of mixing versions, across ranges and across a resume (the journal
//! keeps the ETag). Bodies are streamed as they arrive, never gathered (`get_range` and
//! `bytes()` would hold a whole range in memory).
//!
//! HTTP. object_store sends through the agent's one HTTP client (HTTP/1.1, a connect and a read
//! timeout, no whole-request timeout, no redirects: [`super::https::client`]) behind a
//! [`Guard`] that refuses any URL outside the origin of the endpoint the policy admitted, so
//! neither an instance-metadata address nor an STS endpoint is ever contacted, whatever a
//! builder would fall back to. object_store's own retries are off: the transfer engine retries
//! a failed range from its first unwritten byte with backoff, and each range is one request
//! holding one permit of the connection budget. A mid-stream retry by object_store would
//! restart the range behind the engine's back and spend a retry budget shared across reads.
//!
//! Credentials. Each request first takes [`Credentials::current`] (refreshed ahead of its
//! expiry once for all ranges), and object_store signs it with exactly that credential: the
//! [`CredentialProvider`] it calls reads the credential from the request's task-local
//! `Exchange`. A 401 or 403 therefore names the credential that was refused, which is
//! [`Credentials::refresh`]ed (one control-plane call for all ranges refused with it) before
//! that one request is tried again, once. A `none` credential goes out unsigned through a second
//! client built with `skip_signature`; both clients are given our provider, so no builder is
//! ever left to find credentials of its own (environment, files, instance metadata).

use std::error::Error as StdError;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use ::object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use ::object_store::path::Path;
use ::object_store::{
    ClientOptions, CredentialProvider, GetOptions, GetRange, GetResult, ObjectStore, RetryConfig,
};
use control_client::{BoxFuture, Credential, Credentials, SourceDescriptor, SourceType};
use futures_util::TryStreamExt;
use url::Url;

use super::{ByteStream, ObjectInfo, Source, SourceError, Validator};
use crate::config::Config;
use crate::policy::{Bucket, Policy};
use crate::redact::Redacted;

mod azure;
mod gcs;
mod s3;

pub use azure::Azure;
pub use gcs::Gcs;
pub use s3::S3;

/// What differs between the object stores.
pub trait Cloud: Send + Sync + 'static {
    const SOURCE_TYPE: SourceType;
    /// The credential kinds it signs with, for the error when another kind is issued.
    const WANTED: &'static str;
    /// The object_store credential.
    type Credential: Send + Sync + 'static;

    /// Where the URI (and the configuration, for what the URI leaves out) places the object.
    fn locate(uri: &str, config: &Config) -> Result<Location, SourceError>;

    /// The client for `location`; unsigned when `signed` is false.
    fn build(
        location: &Location,
        config: &Config,
        client: Client<Self>,
        signed: bool,
    ) -> ::object_store::Result<Arc<dyn ObjectStore>>
    where
        Self: Sized;

    /// The credential to sign with; `None` for a kind this store does not take (`none`
    /// included: it is sent unsigned, not converted).
    fn convert(credential: &Credential) -> Option<Self::Credential>;
}

/// An object's place in its store.
#[derive(Debug, Clone)]
pub struct Location {
    /// The storage account (Azure only).
    pub account: Option<String>,
    /// The bucket or container.
    pub bucket: String,
    pub path: Path,
    /// The store's endpoint: every request goes to its origin.
    pub endpoint: Url,
}

/// What every client of a source is built from: its HTTP transport and its credentials.
#[derive(Debug)]
pub struct Client<C: Cloud> {
    pub guard: Guard,
    pub credentials: Arc<Issued<C>>,
    pub retry: RetryConfig,
}

/// Builds the source of an `s3`, `gcs` or `azure_blob` registration; the policy is checked
/// here, before any request.
pub fn open<C: Cloud>(
    descriptor: &SourceDescriptor,
    credentials: Credentials,
    config: &Config,
    policy: &Policy,
    http: &reqwest::Client,
) -> Result<Arc<dyn Source>, SourceError> {
    let uri = Redacted::uri(&descriptor.uri);
    let location = C::locate(&descriptor.uri, config)?;
    let bucket = Bucket {
        account: location.account.as_deref(),
        name: &location.bucket,
    };
    policy.check_bucket(C::SOURCE_TYPE, &bucket, &location.endpoint, &uri)?;

    let provider = Arc::new(Issued::<C> {
        credentials: credentials.clone(),
        cloud: PhantomData,
    });
    let build = |signed| {
        let client = Client {
            guard: Guard::new(http.clone(), &location.endpoint),
            credentials: provider.clone(),
            // The transfer engine retries; see the module docs.
            retry: RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            },
        };
        C::build(&location, config, client, signed).map_err(|e| SourceError::InvalidUri {
            uri: uri.clone(),
            reason: e.to_string(),
        })
    };
    Ok(Arc::new(CloudSource {
        signed: build(true)?,
        anonymous: build(false)?,
        accepts: |credential| C::convert(credential).is_some(),
        wanted: C::WANTED,
        path: location.path,
        version: descriptor.source_ref.clone(),
        uri,
        credentials,
    }))
}

/// Splits `scheme://bucket/key` into the bucket and the key's path. The key is taken as written
/// (not percent-decoded), and must not be empty, end with `/`, or have empty, `.` or `..`
/// segments: object_store could not address such a key exactly.
pub(crate) fn split_uri<'u>(uri: &'u str, scheme: &str) -> Result<(&'u str, Path), SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUri {
        uri: Redacted::uri(uri),
        reason: reason.to_owned(),
    };
    let rest = uri
        .strip_prefix(scheme)
        .ok_or_else(|| invalid(&format!("it does not start with {scheme}")))?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| invalid("it names no object"))?;
    let bucket_chars = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if bucket.is_empty() || !bucket.chars().all(bucket_chars) {
        return Err(invalid(
            "the bucket name is empty or has characters buckets cannot have",
        ));
    }
    if key.is_empty() || key.ends_with('/') || key.contains(['?', '#']) {
        return Err(invalid("the key is empty, ends with /, or has ? or #"));
    }
    let path = Path::parse(key).map_err(|e| invalid(&e.to_string()))?;
    if path.as_ref() != key {
        return Err(invalid(
            "the key is not one object_store can address as written",
        ));
    }
    Ok((bucket, path))
}

/// The endpoint of `[sources.*] endpoint`, else `default`.
pub(super) fn endpoint(configured: Option<&str>, default: String) -> Result<Url, SourceError> {
    let text = configured.map_or(default, str::to_owned);
    Url::parse(&text).map_err(|e| SourceError::InvalidUri {
        uri: Redacted::uri(&text),
        reason: format!("the endpoint is not a URL: {e}"),
    })
}

tokio::task_local! {
    /// The request being made: the credential it signs with, and the status it was answered.
    static EXCHANGE: Exchange;
}

/// One request's context, shared by the source, the credential provider and the [`Guard`].
struct Exchange {
    credential: Credential,
    /// The HTTP status of the answer; 0 before one arrives.
    status: AtomicU16,
}

/// An object in `s3`, `gcs` or `azure_blob`; see the module docs.
pub struct CloudSource {
    signed: Arc<dyn ObjectStore>,
    anonymous: Arc<dyn ObjectStore>,
    /// Whether the store signs with a credential of this kind.
    accepts: fn(&Credential) -> bool,
    wanted: &'static str,
    path: Path,
    /// The pinned object version (`source_ref`).
    version: Option<String>,
    uri: Redacted,
    credentials: Credentials,
}

impl fmt::Debug for CloudSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudSource")
            .field("uri", &self.uri)
            .field("version", &self.version)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl CloudSource {
    /// Sends one request, and once more with a refreshed credential if it is refused (401/403)
    /// with a credential that signed it.
    async fn get(&self, options: GetOptions) -> Result<GetResult, SourceError> {
        let mut credential = self.credentials.current().await?;
        let mut refreshed = false;
        loop {
            let refused = match self.send(&credential, options.clone()).await {
                Err(e @ SourceError::Denied { .. }) => e,
                done => return done,
            };
            if refreshed || credential == Credential::None {
                return Err(refused);
            }
            credential = self.credentials.refresh(&credential).await?;
            refreshed = true;
        }
    }

    async fn send(
        &self,
        credential: &Credential,
        options: GetOptions,
    ) -> Result<GetResult, SourceError> {
        let store = match credential {
            Credential::None => &self.anonymous,
            signing if (self.accepts)(signing) => &self.signed,
            _ => {
                return Err(SourceError::WrongCredential {
                    uri: self.uri.clone(),
                    wanted: self.wanted,
                });
            }
        };
        let exchange = Exchange {
            credential: credential.clone(),
            status: AtomicU16::new(0),
        };
        let request = async {
            let result = store.get_opts(&self.path, options).await;
            (result, EXCHANGE.with(|e| e.status.load(Ordering::Relaxed)))
        };
        let (result, status) = EXCHANGE.scope(exchange, request).await;
        result.map_err(|e| classify(&self.uri, e, status))
    }

    fn options(&self) -> GetOptions {
        GetOptions {
            version: self.version.clone(),
            ..GetOptions::default()
        }
    }
}

impl Source for CloudSource {
    fn uri(&self) -> Redacted {
        self.uri.clone()
    }

    fn stat(&self) -> BoxFuture<'_, Result<ObjectInfo, SourceError>> {
        Box::pin(async move {
            let options = GetOptions {
                head: true,
                ..self.options()
            };
            let meta = self.get(options).await?.meta;
            let etag = meta.e_tag.ok_or_else(|| SourceError::Protocol {
                uri: self.uri.clone(),
                reason: "the object has no ETag".into(),
            })?;
            Ok(ObjectInfo {
                size: meta.size,
                validator: Some(Validator::ETag(etag)),
                ranges: true,
            })
        })
    }

    fn read<'a>(
        &'a self,
        range: Option<Range<u64>>,
        pinned: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<ByteStream, SourceError>> {
        Box::pin(async move {
            let etag = match &pinned.validator {
                Some(Validator::ETag(etag)) => Some(etag.clone()),
                _ => None,
            };
            let options = GetOptions {
                range: range.map(GetRange::Bounded),
                if_match: etag.clone(),
                ..self.options()
            };
            let result = self.get(options).await?;
            if result.meta.e_tag != etag || result.meta.size != pinned.size {
                return Err(SourceError::Changed {
                    uri: self.uri.clone(),
                    reason: "its ETag or size is not the one seen at the start".into(),
                });
            }
            let uri = self.uri.clone();
            let stream = result.into_stream().map_err(move |e| classify(&uri, e, 0));
            Ok(Box::pin(stream) as ByteStream)
        })
    }
}

/// What a failed request means for the transfer. `status` is the answer's HTTP status, 0 when
/// none arrived (or the failure came while reading its body).
fn classify(uri: &Redacted, error: ::object_store::Error, status: u16) -> SourceError {
    use ::object_store::Error as E;
    let uri = uri.clone();
    match error {
        E::NotFound { .. } => SourceError::NotFound { uri },
        E::Precondition { .. } => SourceError::Changed {
            uri,
            reason: "its ETag no longer matches (412)".into(),
        },
        E::Unauthenticated { .. } => SourceError::Denied { uri, status: 401 },
        E::PermissionDenied { .. } => SourceError::Denied { uri, status: 403 },
        e if find::<OutsideEndpoint>(&e).is_some() => {
            let url = find::<OutsideEndpoint>(&e).expect("just found").url.clone();
            SourceError::Protocol {
                uri,
                reason: format!("the client tried to reach {url}, outside the endpoint"),
            }
        }
        // Limitation: object_store does not pass on `Retry-After`, so a 503 or 429 from an
        // object store is retried on the engine's own backoff only.
        _ if status != 0 && !(200..300).contains(&status) => SourceError::Status {
            uri,
            status,
            retry_after: None,
        },
        // A transport failure, or one before any answer (a credential the provider could not
        // get): worth another attempt.
        e if status == 0 || find::<HttpError>(&e).is_some() => SourceError::Cloud {
            uri,
            what: "request failed",
            source: Box::new(e),
        },
        // An answer object_store could not accept (no Content-Range, another range...).
        e => SourceError::Protocol {
            uri,
            reason: e.to_string(),
        },
    }
}

/// The first error of type `T` in the chain of `error`.
fn find<'e, T: StdError + 'static>(error: &'e (dyn StdError + 'static)) -> Option<&'e T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The [`CredentialProvider`] object_store calls before every request: the credential the
/// request's `Exchange` carries, converted for the store. Outside a request of
/// [`CloudSource`] (never, today) it asks [`Credentials::current`].
pub struct Issued<C: Cloud> {
    credentials: Credentials,
    cloud: PhantomData<fn() -> C>,
}

impl<C: Cloud> fmt::Debug for Issued<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("credentials", &self.credentials)
            .finish()
    }
}

#[async_trait::async_trait]
impl<C: Cloud> CredentialProvider for Issued<C> {
    type Credential = C::Credential;

    async fn get_credential(&self) -> ::object_store::Result<Arc<C::Credential>> {
        let credential = match EXCHANGE.try_with(|e| e.credential.clone()) {
            Ok(credential) => credential,
            Err(_) => self.credentials.current().await.map_err(generic)?,
        };
        let converted = C::convert(&credential).ok_or_else(|| generic(WrongKind(C::WANTED)))?;
        Ok(Arc::new(converted))
    }
}

fn generic(source: impl StdError + Send + Sync + 'static) -> ::object_store::Error {
    ::object_store::Error::Generic {
        store: "blobstage",
        source: Box::new(source),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the issued credential is not of a kind this store signs with ({0})")]
struct WrongKind(&'static str);

/// object_store's transport: the agent's HTTP client, restricted to the origin of one endpoint.
#[derive(Debug, Clone)]
pub struct Guard {
    client: reqwest::Client,
    origin: url::Origin,
}

impl Guard {
    fn new(client: reqwest::Client, endpoint: &Url) -> Self {
        Guard {
            client,
            origin: endpoint.origin(),
        }
    }
}

/// A request the [`Guard`] refused to send.
#[derive(Debug, thiserror::Error)]
#[error("{url} is outside the configured endpoint")]
struct OutsideEndpoint {
    url: Redacted,
}

impl HttpConnector for Guard {
    fn connect(&self, _: &ClientOptions) -> ::object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl HttpService for Guard {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let target = request.uri().to_string();
        if Url::parse(&target).map(|u| u.origin()).ok() != Some(self.origin.clone()) {
            let url = Redacted::uri(&target);
            return Err(HttpError::new(
                HttpErrorKind::Unknown,
                OutsideEndpoint { url },
            ));
        }
        let response = self.client.call(request).await?;
        let status = response.status().as_u16();
        let _ = EXCHANGE.try_with(|e| e.status.store(status, Ordering::Relaxed));
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_split_into_bucket_and_key() {
        let (bucket, path) = split_uri("s3://models/llama/7b/model.safetensors", "s3://").unwrap();
        assert_eq!(bucket, "models");
        assert_eq!(path.as_ref(), "llama/7b/model.safetensors");
        let (_, spaced) = split_uri("gs://b/a key with spaces", "gs://").unwrap();
        assert_eq!(spaced.as_ref(), "a key with spaces");
        for bad in [
            "s3://models",
            "s3://models/",
            "s3:///key",
            "s3://models/dir/",
            "s3://models/a//b",
            "s3://models/a/../b",
            "s3://models/k?versionId=1",
            "s3://bad bucket/k",
            "gs://models/k",
        ] {
            let err = split_uri(bad, "s3://").unwrap_err();
            assert_eq!(err.code(), "invalid_source_uri", "{bad}");
        }
    }

    #[test]
    fn classify_maps_statuses_and_failures() {
        let uri = Redacted::uri("s3://b/k");
        let generic = |source: Box<dyn StdError + Send + Sync>| ::object_store::Error::Generic {
            store: "test",
            source,
        };
        let io = || Box::new(std::io::Error::other("boom"));
        assert_eq!(
            classify(&uri, generic(io()), 503).code(),
            "source_unavailable"
        );
        assert!(classify(&uri, generic(io()), 503).is_retryable());
        assert!(!classify(&uri, generic(io()), 400).is_retryable());
        let body = HttpError::new(HttpErrorKind::Timeout, std::io::Error::other("stalled"));
        let stalled = classify(&uri, generic(Box::new(body)), 206);
        assert!(stalled.is_retryable(), "{stalled:?}");
        let bad = classify(&uri, generic(io()), 206);
        assert_eq!(bad.code(), "bad_source_response");
        let outside = OutsideEndpoint {
            url: Redacted::uri("http://169.254.169.254/latest"),
        };
        let refused = HttpError::new(HttpErrorKind::Unknown, outside);
        let refused = classify(&uri, generic(Box::new(refused)), 0);
        assert_eq!(refused.code(), "bad_source_response");
        assert!(!refused.is_retryable());
        let missing = ::object_store::Error::NotFound {
            path: "k".into(),
            source: io(),
        };
        assert_eq!(classify(&uri, missing, 404).code(), "source_not_found");
        let denied = ::object_store::Error::PermissionDenied {
            path: "k".into(),
            source: io(),
        };
        assert_eq!(classify(&uri, denied, 403).code(), "source_denied");
        let changed = ::object_store::Error::Precondition {
            path: "k".into(),
            source: io(),
        };
        assert_eq!(classify(&uri, changed, 412).code(), "source_changed");
    }
}
