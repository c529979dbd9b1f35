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
//! instead of mixing versions.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use control_client::{BoxFuture, Credential, Credentials, SourceType};
use futures_util::TryStreamExt;
use reqwest::header::{self, HeaderMap};
use reqwest::{Response, StatusCode};
use url::Url;

use super::{ByteStream, ObjectInfo, Source, SourceError, Validator, parse_retry_after};
use crate::policy::Policy;
use crate::redact::Redacted;

/// Redirect hops followed before giving up (a loop ends here).
const MAX_REDIRECTS: usize = 10;

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

    /// Sends a GET, following redirects by hand; every hop passes the policy first. A 401 or
    /// 403 from the origin the token went to is answered once with a refreshed token.
    async fn get(
        &self,
        start: Url,
        range: Option<(u64, u64)>,
        pinned: Option<&Validator>,
    ) -> Result<(Url, Response), SourceError> {
        let mut credential = self.credentials.current().await?;
        let mut refreshed = false;
        let mut url = start;
        let mut hops = 0;
        while hops <= MAX_REDIRECTS {
            self.policy.check_url(SourceType::Https, &url)?;
            let bearer =
                bearer(&credential, &self.origin)?.filter(|_| same_origin(&url, &self.origin));
            let response = self
                .request(&url, range, pinned, bearer)
                .send()
                .await
                .map_err(|source| SourceError::Transport {
                    uri: Redacted::url(&url),
                    what: "request failed",
                    source,
                })?;
            let status = response.status();
            if bearer.is_some() && !refreshed && matches!(status.as_u16(), 401 | 403) {
                credential = self.credentials.refresh(&credential).await?;
                refreshed = true;
                continue;
            }
            hops += 1;
            let location = response.headers().get(header::LOCATION);
            match location.filter(|_| response.status().is_redirection()) {
                Some(location) => url = redirect_target(&url, location)?,
                None => return Ok((url, response)),
            }
        }
        Err(SourceError::TooManyRedirects {
            uri: Redacted::url(&self.origin),
            max: MAX_REDIRECTS,
        })
    }

    fn request(
        &self,
        url: &Url,
        range: Option<(u64, u64)>,
        pinned: Option<&Validator>,
        bearer: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .get(url.clone())
            .header(header::ACCEPT_ENCODING, "identity");
        if let Some((first, last)) = range {
            request = request.header(header::RANGE, format!("bytes={first}-{last}"));
        }
        match pinned {
            Some(Validator::ETag(tag)) if !tag.starts_with("W/") => {
                request = request.header(header::IF_MATCH, tag);
            }
            Some(Validator::LastModified(date)) => {
                request = request.header(header::IF_UNMODIFIED_SINCE, date);
            }
            _ => {}
        }
        match bearer {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// The token of a bearer credential; `None` for public objects.
fn bearer<'c>(credential: &'c Credential, origin: &Url) -> Result<Option<&'c str>, SourceError> {
    match credential {
        Credential::None => Ok(None),
        Credential::Bearer { token, .. } => Ok(Some(token)),
        _ => Err(SourceError::WrongCredential {
            uri: Redacted::url(origin),
            wanted: "bearer or none",
        }),
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
            let stream = response
                .bytes_stream()
                .map_err(move |source| SourceError::Transport {
                    uri: uri.clone(),
                    what: "body read failed",
                    source,
                });
            Ok(Box::pin(stream) as ByteStream)
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
    let headers = response.headers();
    let whole = 0..pinned.size;
    match (response.status(), range) {
        (StatusCode::PARTIAL_CONTENT, Some(range)) => {
            let got = content_range(headers, uri)?;
            let asked = ContentRange {
                span: Some((range.start, range.end - 1)),
                total: Some(pinned.size),
            };
            if got != asked {
                return Err(protocol(
                    uri,
                    "Content-Range does not match the range asked for",
                ));
            }
        }
        (StatusCode::OK, Some(range)) if range != whole => {
            return Err(SourceError::RangeIgnored { uri: uri.clone() });
        }
        (StatusCode::OK, _) => {
            if content_length(headers).is_some_and(|len| len != pinned.size) {
                return Err(changed(uri, "the size is not the one seen at the start"));
            }
        }
        (StatusCode::PRECONDITION_FAILED, _) => {
            return Err(changed(uri, "the validator no longer matches (412)"));
        }
        (status, _) => return Err(status_error(uri, status, headers)),
    }
    match (&pinned.validator, validator(headers)) {
        (Some(was), Some(now)) if *was != now => {
            Err(changed(uri, &format!("{was:?} is now {now:?}")))
        }
        _ => Ok(()),
    }
}

fn status_error(uri: &Redacted, status: StatusCode, headers: &HeaderMap) -> SourceError {
    let uri = uri.clone();
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => SourceError::NotFound { uri },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => SourceError::Denied {
            uri,
            status: status.as_u16(),
        },
        _ => {
            let retry_after = headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            SourceError::Status {
                uri,
                status: status.as_u16(),
                retry_after,
            }
        }
    }
}

fn redirect_target(from: &Url, location: &header::HeaderValue) -> Result<Url, SourceError> {
    let bad = |reason: &str| protocol(&Redacted::url(from), reason);
    let location = location.to_str().map_err(|_| bad("Location is not text"))?;
    from.join(location)
        .map_err(|_| bad("Location is not a URL"))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn validator(headers: &HeaderMap) -> Option<Validator> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    text(header::ETAG)
        .map(Validator::ETag)
        .or_else(|| text(header::LAST_MODIFIED).map(Validator::LastModified))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A parsed `Content-Range: bytes first-last/total`; either side may be `*` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    /// First and last byte, inclusive.
    span: Option<(u64, u64)>,
    total: Option<u64>,
}

fn content_range(headers: &HeaderMap, uri: &Redacted) -> Result<ContentRange, SourceError> {
    let value = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| protocol(uri, "a 206 or 416 without a Content-Range"))?;
    parse_content_range(value).ok_or_else(|| protocol(uri, "Content-Range is malformed"))
}

pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let total = match total {
        "*" => None,
        n => Some(n.parse::<u64>().ok()?),
    };
    let span = match span {
        "*" => None,
        span => {
            let (first, last) = span.split_once('-')?;
            let (first, last) = (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?);
            if first > last || total.is_some_and(|t| last >= t) {
                return None;
            }
            Some((first, last))
        }
    };
    Some(ContentRange { span, total })
}

fn protocol(uri: &Redacted, reason: &str) -> SourceError {
    SourceError::Protocol {
        uri: uri.clone(),
        reason: reason.to_owned(),
    }
}

fn changed(uri: &Redacted, reason: &str) -> SourceError {
    SourceError::Changed {
        uri: uri.clone(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn content_range_forms() {
        let parsed = |s| parse_content_range(s).map(|c| (c.span, c.total));
        assert_eq!(parsed("bytes 0-0/10"), Some((Some((0, 0)), Some(10))));
        assert_eq!(parsed("bytes 5-9/*"), Some((Some((5, 9)), None)));
        assert_eq!(parsed("bytes */0"), Some((None, Some(0))));
        for bad in [
            "bytes 9-5/10",
            "bytes 0-10/10",
            "bits 0-1/2",
            "bytes 0-1",
            "bytes a-b/c",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_token_stays_with_its_origin() {
        let origin = Url::parse("https://hub.example/a").unwrap();
        assert!(same_origin(
            &Url::parse("https://hub.example:443/b").unwrap(),
            &origin
        ));
        assert!(!same_origin(
            &Url::parse("https://cdn.example/a").unwrap(),
            &origin
        ));
        assert!(!same_origin(
            &Url::parse("http://hub.example/a").unwrap(),
            &origin
        ));
        assert!(!same_origin(
            &Url::parse("https://hub.example:8443/a").unwrap(),
            &origin
        ));
    }

    proptest! {
        #[test]
        fn content_range_never_panics(s in "\\PC{0,40}") {
            let _ = parse_content_range(&s);
        }

        #[test]
        fn content_range_round_trips(first in 0u64..1 << 40, len in 1u64..1 << 30, extra in 0u64..1 << 30) {
            let last = first + len - 1;
            let total = last + 1 + extra;
            let parsed = parse_content_range(&format!("bytes {first}-{last}/{total}"));
            prop_assert_eq!(parsed, Some(ContentRange { span: Some((first, last)), total: Some(total) }));
        }
    }
}
