//! The `https` source: any origin that speaks HTTP/1.1 with byte ranges (nginx, CDNs, signed
//! object-store URLs).
//!
//! `stat` is a `GET` of the first byte (`Range: bytes=0-0`), not a `HEAD`: signed URLs are often
//! valid for `GET` only, and the answer says at once whether the origin serves ranges (206), or
//! ignores them (200: the object is then read as one stream), and what the size and validator
//! are. Redirects are followed by hand so that every hop passes the node policy, and the bearer
//! token goes only to the registered origin (scheme, host and port), never to a redirect target
//! elsewhere. Every ranged read carries `If-Match` (or `If-Unmodified-Since`) with the validator
//! learnt at `stat`, and the answer's own validator is compared too, so a changed object fails
//! instead of mixing versions. The exchange itself (redirects, the token, strict range answers)
//! is shared with the Hub source, in [`super::http`].

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use control_client::{BoxFuture, Credentials, SourceType};
use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode};
use url::Url;

use super::http::{
    ContentRange, Exchange, Redirects, body_stream, changed, check_range, content_length,
    content_range, protocol, ranged_get, status_error, text,
};
use super::{ByteStream, ObjectInfo, Source, SourceError, Validator};
use crate::policy::Policy;
use crate::redact::Redacted;

pub struct HttpsSource {
    client: reqwest::Client,
    policy: Arc<Policy>,
    /// The registered URI; the bearer token is sent to its origin only.
    origin: Url,
    credentials: Credentials,
    /// Where `stat` ended up after redirects; ranged reads start there.
    resolved: Mutex<Url>,
}

impl fmt::Debug for HttpsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsSource")
            .field("origin", &Redacted::url(&self.origin))
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Builds the one HTTP client shared by every https transfer: HTTP/1.1 (one connection per
/// range in flight), no automatic redirects, no decompression, a connect timeout and a read
/// timeout that resets on every read (the stall detector), and no whole-request timeout.
pub fn client(config: &crate::config::Config) -> Result<reqwest::Client, String> {
    let t = &config.transfer;
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(t.connect_timeout)
        .read_timeout(t.read_timeout)
        .pool_max_idle_per_host(t.max_connections)
        .tcp_nodelay(true)
        .user_agent(concat!("blobstage/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.sources.https.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl HttpsSource {
    pub fn new(
        uri: &str,
        credentials: Credentials,
        policy: Arc<Policy>,
        client: reqwest::Client,
    ) -> Result<Self, SourceError> {
        let origin = Url::parse(uri).map_err(|e| SourceError::InvalidUri {
            uri: Redacted::uri(uri),
            reason: e.to_string(),
        })?;
        policy.check_url(SourceType::Https, &origin)?;
        Ok(HttpsSource {
            client,
            policy,
            resolved: Mutex::new(origin.clone()),
            origin,
            credentials,
        })
    }

    /// Sends a GET, following redirects by hand; every hop passes the policy first.
    async fn get(
        &self,
        start: Url,
        range: Option<(u64, u64)>,
        pinned: Option<&Validator>,
    ) -> Result<(Url, Response), SourceError> {
        let admit = |url: &Url| Ok(self.policy.check_url(SourceType::Https, url)?);
        let exchange = Exchange {
            credentials: &self.credentials,
            token_origin: &self.origin,
            redirects: Redirects::All,
            admit: &admit,
        };
        exchange
            .send(start, |url| {
                conditional(ranged_get(&self.client, url, range), pinned)
            })
            .await
    }
}

/// Adds the precondition that keeps a ranged read on the version learnt at `stat`.
fn conditional(request: RequestBuilder, pinned: Option<&Validator>) -> RequestBuilder {
    match pinned {
        Some(Validator::ETag(tag)) if !tag.starts_with("W/") => {
            request.header(header::IF_MATCH, tag)
        }
        Some(Validator::LastModified(date)) => request.header(header::IF_UNMODIFIED_SINCE, date),
        _ => request,
    }
}

impl Source for HttpsSource {
    fn uri(&self) -> Redacted {
        Redacted::url(&self.origin)
    }

    fn stat(&self) -> BoxFuture<'_, Result<ObjectInfo, SourceError>> {
        Box::pin(async move {
            let (url, response) = self.get(self.origin.clone(), Some((0, 0)), None).await?;
            let uri = Redacted::url(&url);
            let headers = response.headers();
            let validator = validator(headers);
            let info = match response.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let total = content_range(headers, &uri)?.total;
                    let size =
                        total.ok_or_else(|| protocol(&uri, "Content-Range has no total size"))?;
                    ObjectInfo {
                        size,
                        validator,
                        ranges: true,
                    }
                }
                StatusCode::OK => {
                    let size = content_length(headers).ok_or_else(|| {
                        protocol(&uri, "neither Content-Range nor Content-Length")
                    })?;
                    ObjectInfo {
                        size,
                        validator,
                        ranges: false,
                    }
                }
                StatusCode::RANGE_NOT_SATISFIABLE => match content_range(headers, &uri)? {
                    ContentRange {
                        span: None,
                        total: Some(0),
                    } => ObjectInfo {
                        size: 0,
                        validator,
                        ranges: true,
                    },
                    _ => {
                        return Err(protocol(
                            &uri,
                            "416 for the first byte of a non-empty object",
                        ));
                    }
                },
                status => return Err(status_error(&uri, status, headers)),
            };
            *self.resolved.lock().expect("resolved url lock") = url;
            Ok(info)
        })
    }

    fn read<'a>(
        &'a self,
        range: Option<Range<u64>>,
        pinned: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<ByteStream, SourceError>> {
        Box::pin(async move {
            let start = self.resolved.lock().expect("resolved url lock").clone();
            let wanted = range.clone().map(|r| (r.start, r.end - 1));
            let (url, response) = self.get(start, wanted, pinned.validator.as_ref()).await?;
            let uri = Redacted::url(&url);
            check_answer(&response, range, pinned, &uri)?;
            Ok(body_stream(response, uri))
        })
    }
}

/// Accepts only an answer that is exactly the bytes asked for, of the pinned version.
fn check_answer(
    response: &Response,
    range: Option<Range<u64>>,
    pinned: &ObjectInfo,
    uri: &Redacted,
) -> Result<(), SourceError> {
    check_range(response, range, pinned.size, uri)?;
    match (&pinned.validator, validator(response.headers())) {
        (Some(was), Some(now)) if *was != now => {
            Err(changed(uri, &format!("{was:?} is now {now:?}")))
        }
        _ => Ok(()),
    }
}

fn validator(headers: &HeaderMap) -> Option<Validator> {
    let text = |name| text(headers, name).map(str::to_owned);
    text(header::ETAG)
        .map(Validator::ETag)
        .or_else(|| text(header::LAST_MODIFIED).map(Validator::LastModified))
}
