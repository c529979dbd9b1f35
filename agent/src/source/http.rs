//! The HTTP exchange the web sources share (`https`, `huggingface`): one request with its
//! redirects followed by hand, and the strict reading of a ranged answer.
//!
//! `Exchange::send` runs every URL through the caller's policy gate before contacting it,
//! sends the bearer token only to the one origin it was issued for (scheme, host and port),
//! and answers a 401 or 403 from that origin once with a refreshed token. Which redirects it
//! follows is the caller's choice: all of them, or only those that stay on the token's origin
//! (the Hub's resolve request must stop at the redirect to its CDN and read that answer's
//! headers). `check_range` accepts only an answer that is exactly the bytes asked for. Nothing
//! here knows about validators: each source pins its version its own way.

use std::ops::Range;

use control_client::{Credential, Credentials};
use futures_util::TryStreamExt;
use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode};
use url::Url;

use super::{ByteStream, SourceError, parse_retry_after};
use crate::redact::Redacted;

/// Redirect hops followed before giving up (a loop ends here).
pub(crate) const MAX_REDIRECTS: usize = 10;

/// Which redirects [`Exchange::send`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirects {
    All,
    /// Only a `Location` on the token's origin; any other redirect is the answer.
    SameOrigin,
}

/// The policy gate a URL passes before it is contacted.
pub(crate) type Admit<'a> = &'a (dyn Fn(&Url) -> Result<(), SourceError> + Send + Sync);

/// One request of a source, and the rules for its redirects and its token.
pub(crate) struct Exchange<'a> {
    pub(crate) credentials: &'a Credentials,
    /// The only origin the bearer token is sent to.
    pub(crate) token_origin: &'a Url,
    pub(crate) redirects: Redirects,
    pub(crate) admit: Admit<'a>,
}

impl Exchange<'_> {
    /// Sends the request `build` makes for each URL, from `start`, following redirects by
    /// hand. Returns the URL that answered and its answer.
    pub(crate) async fn send(
        &self,
        start: Url,
        build: impl Fn(&Url) -> RequestBuilder,
    ) -> Result<(Url, Response), SourceError> {
        let mut credential = self.credentials.current().await?;
        let mut refreshed = false;
        let mut url = start;
        let mut hops = 0;
        while hops <= MAX_REDIRECTS {
            (self.admit)(&url)?;
            let bearer = bearer(&credential, self.token_origin)?
                .filter(|_| same_origin(&url, self.token_origin));
            let request = match bearer {
                Some(token) => build(&url).bearer_auth(token),
                None => build(&url),
            };
            let response = request
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
            match self.next_hop(&url, &response)? {
                Some(next) => url = next,
                None => return Ok((url, response)),
            }
        }
        Err(SourceError::TooManyRedirects {
            uri: Redacted::url(self.token_origin),
            max: MAX_REDIRECTS,
        })
    }

    /// Where a redirect leads, when it is one to follow.
    fn next_hop(&self, from: &Url, response: &Response) -> Result<Option<Url>, SourceError> {
        let location = response.headers().get(header::LOCATION);
        let Some(location) = location.filter(|_| response.status().is_redirection()) else {
            return Ok(None);
        };
        let target = redirect_target(from, location)?;
        let follow = match self.redirects {
            Redirects::All => true,
            Redirects::SameOrigin => same_origin(&target, self.token_origin),
        };
        Ok(follow.then_some(target))
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

/// A plain GET that asks for `range` (inclusive bounds) and no compression.
pub(crate) fn ranged_get(
    client: &reqwest::Client,
    url: &Url,
    range: Option<(u64, u64)>,
) -> RequestBuilder {
    let request = client
        .get(url.clone())
        .header(header::ACCEPT_ENCODING, "identity");
    match range {
        Some((first, last)) => request.header(header::RANGE, format!("bytes={first}-{last}")),
        None => request,
    }
}

/// Accepts only an answer that is exactly `range` (the whole object when `None`) of an object
/// of `size` bytes.
pub(crate) fn check_range(
    response: &Response,
    range: Option<Range<u64>>,
    size: u64,
    uri: &Redacted,
) -> Result<(), SourceError> {
    let headers = response.headers();
    match (response.status(), range) {
        (StatusCode::PARTIAL_CONTENT, Some(range)) => {
            let got = content_range(headers, uri)?;
            let asked = ContentRange {
                span: Some((range.start, range.end - 1)),
                total: Some(size),
            };
            if got != asked {
                return Err(protocol(
                    uri,
                    "Content-Range does not match the range asked for",
                ));
            }
            Ok(())
        }
        (StatusCode::OK, Some(range)) if range != (0..size) => {
            Err(SourceError::RangeIgnored { uri: uri.clone() })
        }
        (StatusCode::OK, _) => match content_length(headers) {
            Some(len) if len != size => {
                Err(changed(uri, "the size is not the one seen at the start"))
            }
            _ => Ok(()),
        },
        (StatusCode::PRECONDITION_FAILED, _) => {
            Err(changed(uri, "the validator no longer matches (412)"))
        }
        (status, _) => Err(status_error(uri, status, headers)),
    }
}

/// The answer's body as the transfer engine reads it; `uri` is the URL that answered.
pub(crate) fn body_stream(response: Response, uri: Redacted) -> ByteStream {
    let stream = response
        .bytes_stream()
        .map_err(move |source| SourceError::Transport {
            uri: uri.clone(),
            what: "body read failed",
            source,
        });
    Box::pin(stream)
}

pub(crate) fn status_error(uri: &Redacted, status: StatusCode, headers: &HeaderMap) -> SourceError {
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

pub(crate) fn redirect_target(
    from: &Url,
    location: &header::HeaderValue,
) -> Result<Url, SourceError> {
    let bad = |reason: &str| protocol(&Redacted::url(from), reason);
    let location = location.to_str().map_err(|_| bad("Location is not text"))?;
    from.join(location)
        .map_err(|_| bad("Location is not a URL"))
}

pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A header's value as text, when it is text.
pub(crate) fn text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    text(headers, header::CONTENT_LENGTH)?.parse().ok()
}

/// A parsed `Content-Range: bytes first-last/total`; either side may be `*` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    /// First and last byte, inclusive.
    pub(crate) span: Option<(u64, u64)>,
    pub(crate) total: Option<u64>,
}

pub(crate) fn content_range(
    headers: &HeaderMap,
    uri: &Redacted,
) -> Result<ContentRange, SourceError> {
    let value = text(headers, header::CONTENT_RANGE)
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

pub(crate) fn protocol(uri: &Redacted, reason: &str) -> SourceError {
    SourceError::Protocol {
        uri: uri.clone(),
        reason: reason.to_owned(),
    }
}

pub(crate) fn changed(uri: &Redacted, reason: &str) -> SourceError {
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
