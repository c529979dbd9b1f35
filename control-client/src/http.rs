//! The HTTP control plane: the node's side of `GET /v1/artifacts/{id}`,
//! `POST /v1/artifacts/{id}/credentials` and `POST /v1/events` (see CONTRACT.md).
//!
//! This module owns the conversation with the real control plane: the base URL (https, or plain
//! http only when asked for), the node identity token read from a file the platform rotates,
//! per-attempt timeouts, and retries with jittered exponential backoff for what may go away
//! (connection errors, timeouts, 408, 429 and 5xx, honouring `Retry-After`). It does not cache
//! credentials (the agent does) and does not deduplicate events (the control plane does, on
//! `event_id`), and it never follows a redirect, so the token goes to the configured origin only.
//! The token never reaches a log line, a `Debug` output or an error message: text the server
//! sends back is cut short, stripped of control characters and scrubbed of the token before an
//! error carries it.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use tracing::{debug, warn};

use crate::{
    Artifact, ArtifactId, BoxFuture, ControlPlane, ControlPlaneError, Credential, Event, Intent,
};

/// The longest `Retry-After` honoured; a control plane asking for more gets this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest answer read; anything longer is not a registration, a credential or an error.
const MAX_BODY: usize = 1 << 20;
/// How much of an error answer an error message quotes.
const MAX_DETAIL: usize = 200;
const USER_AGENT: &str = concat!("blobstage-control-client/", env!("CARGO_PKG_VERSION"));

/// How to reach the HTTP control plane.
///
/// Start from [`HttpOptions::new`]; the defaults are a 10 s timeout per attempt and 4 attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Base URL; the API paths are appended to its path, so `https://cp.example/api` works.
    pub url: String,
    /// The node identity token, sent as `Authorization: Bearer`. Re-read whenever the file's
    /// identity, length or modification time changes. `None` sends no `Authorization` at all.
    pub token_file: Option<PathBuf>,
    /// Allows a plain `http://` URL (loopback tests, labs). Never set it in production.
    pub insecure_http: bool,
    /// Extra PEM roots trusted beside the platform's own, for a control plane behind a
    /// private CA.
    pub ca_file: Option<PathBuf>,
    /// Deadline of one attempt, from connecting to the last byte of the answer.
    pub timeout: Duration,
    /// Attempts per call, the first included; at least 1.
    pub max_attempts: u32,
}

impl HttpOptions {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;

    pub fn new(url: impl Into<String>) -> Self {
        HttpOptions {
            url: url.into(),
            token_file: None,
            insecure_http: false,
            ca_file: None,
            timeout: Self::DEFAULT_TIMEOUT,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
        }
    }

    pub fn with_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    pub fn with_insecure_http(mut self, allowed: bool) -> Self {
        self.insecure_http = allowed;
        self
    }

    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
}

/// The control plane over HTTP/JSON. Safe to share between concurrent transfers.
pub struct HttpControlPlane {
    client: reqwest::Client,
    base: Url,
    token: Option<TokenFile>,
    timeout: Duration,
    max_attempts: u32,
}

impl fmt::Debug for HttpControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpControlPlane")
            .field("url", &self.base.as_str())
            .field("token_file", &self.token.as_ref().map(|t| &t.path))
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl HttpControlPlane {
    /// Checks the options and builds the HTTP client. Refused options are
    /// [`ControlPlaneError::InvalidOptions`]; the token file is not read until the first call.
    pub fn new(options: HttpOptions) -> Result<Self, ControlPlaneError> {
        let base = base_url(&options.url, options.insecure_http)?;
        if options.timeout.is_zero() {
            return Err(invalid_options("timeout must be greater than zero".into()));
        }
        if options.max_attempts == 0 {
            return Err(invalid_options("max_attempts must be at least 1".into()));
        }
        Ok(HttpControlPlane {
            client: client(&options)?,
            base,
            token: options.token_file.map(TokenFile::new),
            timeout: options.timeout,
            max_attempts: options.max_attempts,
        })
    }

    /// The base URL, as normalised; it never carries credentials.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    async fn fetch_artifact(&self, id: &ArtifactId) -> Result<Artifact, ControlPlaneError> {
        let call = Call::Resolve(id);
        let url = self.artifact_url(id, &[])?;
        let answer = self.send(&call, Method::GET, url, None).await?;
        match answer.status {
            StatusCode::NOT_FOUND => Err(ControlPlaneError::NotRegistered { id: id.clone() }),
            status if status.is_success() => answer.artifact(id),
            _ => Err(answer.refusal(&call)),
        }
    }

    async fn fetch_credentials(
        &self,
        id: &ArtifactId,
        intent: Intent,
        node_id: &str,
    ) -> Result<Credential, ControlPlaneError> {
        let call = Call::Credentials(id);
        let url = self.artifact_url(id, &["credentials"])?;
        let body = json(&CredentialsRequest {
            intent: intent.name(),
            node_id,
        });
        let answer = self.send(&call, Method::POST, url, Some(body)).await?;
        if !answer.status.is_success() {
            return Err(answer.refusal(&call));
        }
        answer.credential(&call)
    }

    async fn deliver(&self, events: &[Event]) -> Result<(), ControlPlaneError> {
        let call = Call::Report(events.len());
        let url = self.url(&["v1", "events"]);
        let body = json(&EventsRequest { events });
        let answer = self.send(&call, Method::POST, url, Some(body)).await?;
        if !answer.status.is_success() {
            return Err(answer.refusal(&call));
        }
        // A 2xx whose body is not JSON (say, an HTML page from a proxy in the way) is not a
        // control plane taking the events: they stay in the outbox and go again.
        let empty = answer.body.iter().all(u8::is_ascii_whitespace);
        if !empty && serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_err() {
            return Err(ControlPlaneError::Malformed {
                what: format!("{call}: the answer is not JSON"),
            });
        }
        Ok(())
    }

    /// `{base}/v1/artifacts/{id}/{tail...}`, the id percent-encoded as one path segment.
    fn artifact_url(&self, id: &ArtifactId, tail: &[&str]) -> Result<Url, ControlPlaneError> {
        // A URL path cannot hold `.` or `..` as a segment (they are resolved away, even when
        // percent-encoded), so no control plane can be asked about such an id.
        if matches!(id.as_str(), "." | "..") {
            return Err(ControlPlaneError::NotRegistered { id: id.clone() });
        }
        let mut segments = vec!["v1", "artifacts", id.as_str()];
        segments.extend_from_slice(tail);
        Ok(self.url(&segments))
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs always have a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends one call, retrying what may go away, until an answer that is final.
    async fn send(
        &self,
        call: &Call<'_>,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ControlPlaneError> {
        let mut delays = backoff();
        let mut attempt = 1;
        loop {
            let token = self.token(call).await?;
            let request = self.request(method.clone(), url.clone(), body.clone(), &token);
            let failure = match attempt_once(request).await {
                Ok((status, body)) => {
                    return Ok(Answer {
                        status,
                        body,
                        token,
                    });
                }
                Err(failure) => failure,
            };
            if attempt >= self.max_attempts {
                return Err(failure.into_error(call, attempt));
            }
            let delay = failure.delay(&mut delays);
            let error = &failure.cause;
            let max = self.max_attempts;
            warn!(%call, %error, "attempt {attempt} of {max} failed, backing off {delay:?}");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// The current node token, or `None` when no token file is configured.
    async fn token(&self, call: &Call<'_>) -> Result<Option<Secret>, ControlPlaneError> {
        let Some(file) = &self.token else {
            return Ok(None);
        };
        let secret = file
            .current()
            .await
            .map_err(|source| ControlPlaneError::Unavailable {
                what: format!("{call}: cannot use node token file {}", file.path.display()),
                source,
            })?;
        Ok(Some(secret))
    }

    fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        token: &Option<Secret>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .request(method, url)
            .header(header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, token.header.clone());
        }
        request
    }
}

impl ControlPlane for HttpControlPlane {
    fn resolve<'a>(
        &'a self,
        id: &'a ArtifactId,
    ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
        Box::pin(self.fetch_artifact(id))
    }

    fn credentials<'a>(
        &'a self,
        id: &'a ArtifactId,
        intent: Intent,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
        Box::pin(self.fetch_credentials(id, intent, node_id))
    }

    fn report<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        Box::pin(self.deliver(events))
    }
}

// ---- options ---------------------------------------------------------------------------

fn invalid_options(reason: String) -> ControlPlaneError {
    ControlPlaneError::InvalidOptions { reason }
}

/// Parses and checks the base URL. Messages never echo it: it might carry a password.
fn base_url(raw: &str, insecure_http: bool) -> Result<Url, ControlPlaneError> {
    let url = Url::parse(raw).map_err(|e| invalid_options(format!("url is not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if insecure_http => {}
        "http" => {
            return Err(invalid_options(
                "url must be https:// (plain http:// needs insecure_http = true)".into(),
            ));
        }
        _ => return Err(invalid_options("url must be https://".into())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid_options(
            "url must not carry credentials; the node token comes from token_file".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid_options(
            "url must not have a query or a fragment".into(),
        ));
    }
    Ok(url)
}

/// One client for every call: a deadline per attempt, no redirects, extra roots if given.
fn client(options: &HttpOptions) -> Result<reqwest::Client, ControlPlaneError> {
    let mut builder = reqwest::Client::builder()
        .timeout(options.timeout)
        .connect_timeout(options.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(!options.insecure_http)
        .user_agent(USER_AGENT);
    if let Some(path) = &options.ca_file {
        builder = builder.tls_certs_merge(ca_certificates(path)?);
    }
    builder
        .build()
        .map_err(|e| invalid_options(format!("cannot build the HTTP client: {e}")))
}

fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>, ControlPlaneError> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| invalid_options(format!("cannot read ca_file {shown}: {e}")))?;
    reqwest::Certificate::from_pem_bundle(&pem)
        .ok()
        .filter(|certs| !certs.is_empty())
        .ok_or_else(|| invalid_options(format!("ca_file {shown} holds no PEM certificate")))
}

// ---- the node token --------------------------------------------------------------------

/// The node token, read from its file and kept until the file changes.
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Stamp, Secret)>>,
}

/// What identifies one version of the token file without reading it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
        }
    }
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        TokenFile {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The token as the file holds it now; read again only when its stamp changed.
    ///
    /// Limitation: a rewrite in place that keeps the length and lands within the file
    /// system's timestamp granularity is not noticed until the file changes again; rotating
    /// by rename (a new inode), as the platform does, is always noticed.
    async fn current(&self) -> io::Result<Secret> {
        let stamp = Stamp::of(&tokio::fs::metadata(&self.path).await?);
        if let Some(secret) = self.cached_for(stamp) {
            return Ok(secret);
        }
        let secret = Secret::parse(&tokio::fs::read_to_string(&self.path).await?)?;
        *self.lock() = Some((stamp, secret.clone()));
        Ok(secret)
    }

    fn cached_for(&self, stamp: Stamp) -> Option<Secret> {
        match &*self.lock() {
            Some((cached, secret)) if *cached == stamp => Some(secret.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Stamp, Secret)>> {
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A node token and the `Authorization` header made of it. `Debug` shows neither.
#[derive(Clone)]
struct Secret {
    token: String,
    header: HeaderValue,
}

impl Secret {
    fn parse(text: &str) -> io::Result<Self> {
        let token = text.trim();
        if token.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is empty",
            ));
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            let reason = "the token holds characters an HTTP header cannot carry";
            io::Error::new(io::ErrorKind::InvalidData, reason)
        })?;
        header.set_sensitive(true);
        Ok(Secret {
            token: token.to_owned(),
            header,
        })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// ---- one attempt -----------------------------------------------------------------------

/// What a call is, for messages: `resolve team-a/x@1`, `report 3 events`.
enum Call<'a> {
    Resolve(&'a ArtifactId),
    Credentials(&'a ArtifactId),
    Report(usize),
}

impl fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Resolve(id) => write!(f, "resolve {id}"),
            Call::Credentials(id) => write!(f, "credentials {id}"),
            Call::Report(1) => f.write_str("report 1 event"),
            Call::Report(n) => write!(f, "report {n} events"),
        }
    }
}

#[derive(Serialize)]
struct CredentialsRequest<'a> {
    intent: &'a str,
    node_id: &'a str,
}

#[derive(Serialize)]
struct EventsRequest<'a> {
    events: &'a [Event],
}

fn json(body: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(body).expect("request bodies always serialize")
}

/// Why an attempt may be worth repeating.
struct Transient {
    cause: io::Error,
    retry_after: Option<Duration>,
}

impl Transient {
    fn status(status: StatusCode, headers: &HeaderMap) -> Self {
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let cause = io::Error::other(format!("the control plane answered {status}"));
        Transient { cause, retry_after }
    }

    /// The next backoff delay, but never shorter than what `Retry-After` asked (capped).
    fn delay(&self, delays: &mut ExponentialBackoff) -> Duration {
        let backoff = delays.next().unwrap_or(Duration::from_secs(5));
        let asked = self.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
        backoff.max(asked)
    }

    fn into_error(self, call: &Call<'_>, attempts: u32) -> ControlPlaneError {
        let what = match attempts {
            1 => format!("{call} failed"),
            n => format!("{call} failed after {n} attempts"),
        };
        ControlPlaneError::Unavailable {
            what,
            source: self.cause,
        }
    }
}

impl From<reqwest::Error> for Transient {
    fn from(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            io::ErrorKind::TimedOut
        } else {
            io::ErrorKind::Other
        };
        Transient {
            cause: io::Error::new(kind, e),
            retry_after: None,
        }
    }
}

fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date. A date in the past means "now".
/// The one parser of the header: the agent's sources use it too.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Whether an answer with this status is worth asking again: 5xx, 429, and 408 (the server
/// timed out waiting for the request, which is a timeout like any other).
fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Sends one request. A final answer comes back with its body (at most `MAX_BODY + 1` bytes).
async fn attempt_once(
    request: reqwest::RequestBuilder,
) -> Result<(StatusCode, Vec<u8>), Transient> {
    let mut response = request.send().await?;
    let status = response.status();
    debug!(%status, url = %response.url(), "control plane answered");
    if is_transient(status) {
        return Err(Transient::status(status, response.headers()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            break;
        }
    }
    Ok((status, body))
}

// ---- reading a final answer ------------------------------------------------------------

/// A final answer, with the token it was sent with (to scrub it from what the server said).
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
    token: Option<Secret>,
}

impl Answer {
    fn json_body(&self, call: &Call<'_>) -> Result<&[u8], ControlPlaneError> {
        if self.body.len() > MAX_BODY {
            return Err(ControlPlaneError::Malformed {
                what: format!("{call}: the answer is longer than {MAX_BODY} bytes"),
            });
        }
        Ok(&self.body)
    }

    /// A registration: garbage is `Malformed`; an object that does not validate, or that
    /// registers another id, is `InvalidRegistration`.
    fn artifact(&self, id: &ArtifactId) -> Result<Artifact, ControlPlaneError> {
        let call = Call::Resolve(id);
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(self.json_body(&call)?).map_err(|e| {
                ControlPlaneError::Malformed {
                    what: format!("{call}: the answer is not a JSON object: {e}"),
                }
            })?;
        let artifact: Artifact = serde_json::from_value(object.into()).map_err(|e| {
            ControlPlaneError::InvalidRegistration {
                id: id.clone(),
                reason: self.scrub(&e.to_string()),
            }
        })?;
        if artifact.id != *id {
            return Err(ControlPlaneError::InvalidRegistration {
                id: id.clone(),
                reason: format!("the control plane answered with {}", artifact.id),
            });
        }
        Ok(artifact)
    }

    /// Credentials. A parse error is reported by kind and position only: its text could
    /// quote a secret.
    fn credential(&self, call: &Call<'_>) -> Result<Credential, ControlPlaneError> {
        serde_json::from_slice(self.json_body(call)?).map_err(|e| {
            let kind = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "not JSON"
                }
                serde_json::error::Category::Data => "not a known credential",
            };
            let (line, column) = (e.line(), e.column());
            ControlPlaneError::Malformed {
                what: format!("{call}: the answer is {kind} (line {line}, column {column})"),
            }
        })
    }

    /// The error for a final answer that is not a success.
    fn refusal(&self, call: &Call<'_>) -> ControlPlaneError {
        let call = call.to_string();
        let status = self.status.as_u16();
        let detail = self.detail();
        match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ControlPlaneError::Denied {
                call,
                status,
                detail,
            },
            _ => ControlPlaneError::Rejected {
                call,
                status,
                detail,
            },
        }
    }

    /// What the server said, fit for one line of an error message.
    fn detail(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if text.is_empty() {
            return self.status.canonical_reason().unwrap_or("no reason").into();
        }
        self.scrub(text)
    }

    /// Cuts `text` short, replaces control characters, and hides the token.
    fn scrub(&self, text: &str) -> String {
        // The token goes first, so that the cut cannot leave a piece of it behind.
        let text = match &self.token {
            Some(secret) => text.replace(&secret.token, "<redacted>"),
            None => text.to_owned(),
        };
        let mut shown: String = text
            .chars()
            .take(MAX_DETAIL)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.chars().nth(MAX_DETAIL).is_some() {
            shown.push_str("...");
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(url: &str) -> HttpControlPlane {
        HttpControlPlane::new(HttpOptions::new(url).with_insecure_http(true)).unwrap()
    }

    fn refused(options: HttpOptions) -> String {
        let e = HttpControlPlane::new(options).unwrap_err();
        assert_eq!(e.code(), "config_invalid");
        e.to_string()
    }

    #[test]
    fn refuses_options_that_are_unsafe_or_unusable() {
        let http = refused(HttpOptions::new("http://cp.example"));
        assert!(http.contains("insecure_http"), "{http}");
        let password = refused(HttpOptions::new("https://u:hunter2@cp.example"));
        assert!(!password.contains("hunter2"), "{password}");
        refused(HttpOptions::new("ftp://cp.example"));
        refused(HttpOptions::new("https://cp.example/?a=b"));
        refused(HttpOptions::new("cp.example"));
        refused(HttpOptions::new("https://cp.example").with_max_attempts(0));
        refused(HttpOptions::new("https://cp.example").with_timeout(Duration::ZERO));
        refused(HttpOptions::new("https://cp.example").with_ca_file("/nonexistent/ca.pem"));
        assert!(HttpControlPlane::new(HttpOptions::new("https://cp.example")).is_ok());
    }

    #[test]
    fn the_id_is_one_path_segment_under_the_base_path() {
        let id = ArtifactId::new("team-a/x@1?y#z%2F").unwrap();
        let cp = plane("http://cp.example/api/");
        let url = cp.artifact_url(&id, &["credentials"]).unwrap();
        assert_eq!(
            url.as_str(),
            "http://cp.example/api/v1/artifacts/team-a%2Fx@1%3Fy%23z%252F/credentials"
        );
        let bare = plane("http://cp.example");
        assert_eq!(
            bare.url(&["v1", "events"]).as_str(),
            "http://cp.example/v1/events"
        );
    }

    #[test]
    fn dot_segments_cannot_be_asked_about() {
        let cp = plane("http://cp.example");
        for dots in [".", ".."] {
            let e = cp.artifact_url(&ArtifactId::new(dots).unwrap(), &[]);
            assert_eq!(e.unwrap_err().code(), "not_registered");
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        let soon = SystemTime::now() + Duration::from_secs(30);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(soon)).unwrap();
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("later"), None);
    }

    #[test]
    fn a_transient_failure_waits_at_least_what_retry_after_asks_within_the_cap() {
        let mut delays = backoff();
        let failure = |secs| Transient {
            cause: io::Error::other("503"),
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert!(failure(3).delay(&mut delays) >= Duration::from_secs(3));
        assert_eq!(failure(3600).delay(&mut delays), MAX_RETRY_AFTER);
    }

    #[test]
    fn tokens_are_trimmed_checked_and_never_shown() {
        let secret = Secret::parse("  SENTINEL-TOKEN\n").unwrap();
        assert_eq!(secret.token, "SENTINEL-TOKEN");
        assert!(!format!("{secret:?} {:?}", secret.header).contains("SENTINEL"));
        assert!(Secret::parse(" \n").is_err());
        assert!(Secret::parse("a\u{1}b").is_err());
    }

    #[test]
    fn server_text_is_cut_short_flattened_and_scrubbed() {
        let answer = Answer {
            status: StatusCode::BAD_REQUEST,
            body: format!("bad\ntoken SENTINEL-TOKEN {}", "x".repeat(500)).into_bytes(),
            token: Some(Secret::parse("SENTINEL-TOKEN").unwrap()),
        };
        let detail = answer.detail();
        assert!(detail.starts_with("bad token <redacted> x"), "{detail}");
        assert!(detail.ends_with("...") && detail.len() < MAX_DETAIL + 20);
    }

    #[test]
    fn calls_name_themselves() {
        let id = ArtifactId::new("team-a/x@1").unwrap();
        assert_eq!(Call::Resolve(&id).to_string(), "resolve team-a/x@1");
        assert_eq!(Call::Credentials(&id).to_string(), "credentials team-a/x@1");
        assert_eq!(Call::Report(3).to_string(), "report 3 events");
        assert_eq!(Call::Report(1).to_string(), "report 1 event");
    }
}
