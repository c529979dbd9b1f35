//! The local API on the Unix socket: routing, peer checks, JSON in and out.
//!
//! Every answer is JSON. Every error is `{"error": {"code", "message"}}` with a stable code and
//! a fitting status. Request bodies are bounded ([`MAX_BODY`]) and refuse unknown fields. The
//! peer's uid and gid come from the socket (`SO_PEERCRED`), never from the request.
//! The routes are listed in [`ROUTES`]; `docs/openapi.json` describes the same set, and a test
//! holds the two together.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use control_client::{ArtifactId, Digest, Outcome, Requester};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{Instrument, debug, info_span};

use super::pulls::{Created, Pulls};
use crate::stage::StageError;
use crate::stage::verify::{Target, VerifyError};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// Longest long-poll a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most digests one lease holds.
const MAX_LEASE_DIGESTS: usize = 256;

/// Every (method, path template) the socket serves.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/pulls"),
    ("GET", "/v1/pulls/{id}"),
    ("DELETE", "/v1/pulls/{id}"),
    ("GET", "/v1/blobs"),
    ("GET", "/v1/blobs/{digest}"),
    ("GET", "/v1/status"),
    ("POST", "/v1/verify"),
    ("POST", "/v1/leases"),
    ("DELETE", "/v1/leases/{id}"),
    ("POST", "/v1/gc"),
];

/// One route, with what its path carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    CreatePull,
    GetPull(&'a str),
    CancelPull(&'a str),
    ListBlobs,
    GetBlob(&'a str),
    Status,
    Verify,
    TakeLease,
    ReleaseLease(&'a str),
    Collect,
}

impl Endpoint<'_> {
    /// The `operation` label of the API's metrics and log spans.
    pub fn name(&self) -> &'static str {
        match self {
            Endpoint::CreatePull => "create_pull",
            Endpoint::GetPull(_) => "get_pull",
            Endpoint::CancelPull(_) => "cancel_pull",
            Endpoint::ListBlobs => "list_blobs",
            Endpoint::GetBlob(_) => "get_blob",
            Endpoint::Status => "status",
            Endpoint::Verify => "verify",
            Endpoint::TakeLease => "take_lease",
            Endpoint::ReleaseLease(_) => "release_lease",
            Endpoint::Collect => "gc",
        }
    }
}

/// The operation a request asks for, `unknown` when no route serves it.
pub fn operation<B>(request: &Request<B>) -> &'static str {
    route(request.method(), request.uri().path()).map_or("unknown", |e| e.name())
}

/// Matches a request to its route. `Err(Some(allow))` when the path exists for other methods,
/// `allow` listing them (the `Allow` header of the 405); `Err(None)` when no route has it.
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Endpoint<'a>, Option<String>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let endpoint = match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "pulls"]) => Endpoint::CreatePull,
        (&Method::GET, ["v1", "pulls", id]) => Endpoint::GetPull(id),
        (&Method::DELETE, ["v1", "pulls", id]) => Endpoint::CancelPull(id),
        (&Method::GET, ["v1", "blobs"]) => Endpoint::ListBlobs,
        (&Method::GET, ["v1", "blobs", digest]) => Endpoint::GetBlob(digest),
        (&Method::GET, ["v1", "status"]) => Endpoint::Status,
        (&Method::POST, ["v1", "verify"]) => Endpoint::Verify,
        (&Method::POST, ["v1", "leases"]) => Endpoint::TakeLease,
        (&Method::DELETE, ["v1", "leases", id]) => Endpoint::ReleaseLease(id),
        (&Method::POST, ["v1", "gc"]) => Endpoint::Collect,
        (_, segments) => return Err(allowed_methods(segments)),
    };
    Ok(endpoint)
}

/// The methods [`ROUTES`] serve a path with, as an `Allow` header lists them; `None` when no
/// route has the path.
fn allowed_methods(segments: &[&str]) -> Option<String> {
    let serves = |template: &str| {
        let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
        let same = |(part, segment): (&&str, &&str)| part.starts_with('{') || part == segment;
        parts.len() == segments.len() && parts.iter().zip(segments).all(same)
    };
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, template)| serves(template))
        .map(|(method, _)| *method)
        .collect();
    (!methods.is_empty()).then(|| methods.join(", "))
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The `Allow` header of a 405.
    allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    /// A 405's `Allow` header: the methods the path takes.
    fn with_allow(self, allow: String) -> Self {
        ApiError {
            allow: Some(allow),
            ..self
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = respond(self.status, &body);
        if let Some(value) = self.allow.and_then(|a| a.parse().ok()) {
            response.headers_mut().insert(hyper::header::ALLOW, value);
        }
        response
    }
}

impl From<StageError> for ApiError {
    fn from(e: StageError) -> Self {
        ApiError::from_stage(&e)
    }
}

impl ApiError {
    fn from_stage(e: &StageError) -> Self {
        let status = match e.code() {
            "not_registered" => StatusCode::NOT_FOUND,
            "digest_pin_mismatch" => StatusCode::CONFLICT,
            "control_plane_unavailable" | "outbox_full" | "control_plane_denied" => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            "control_plane_rejected" => StatusCode::BAD_GATEWAY,
            "invalid_registration" => StatusCode::BAD_GATEWAY,
            "io_error" => StatusCode::INTERNAL_SERVER_ERROR,
            "disk_full" => StatusCode::INSUFFICIENT_STORAGE,
            "state_dir_read_only" => StatusCode::SERVICE_UNAVAILABLE,
            _ if e.outcome() == Outcome::Refused => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), crate::errors::Chain(e).to_string())
    }
}

pub fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let body = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("a valid response")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullRequest {
    artifact_id: String,
    #[serde(default)]
    digest: Option<String>,
}

/// `{"artifact_id"}`, or `{"digest", "path"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    #[serde(default)]
    artifact_id: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseRequest {
    holder: String,
    digests: Vec<String>,
    #[serde(deserialize_with = "whole_number")]
    ttl_seconds: u64,
}

/// A JSON integer, written as `2` or, as JSON Schema's `integer` allows, `2.0`.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    let whole = number.as_u64().or_else(|| {
        let float = number.as_f64()?;
        (float.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&float)).then_some(float as u64)
    });
    whole.ok_or_else(|| serde::de::Error::custom(format!("{number} is not a whole number")))
}

/// Longest lease: a holder renews rather than pinning blobs forever.
const MAX_LEASE: u64 = 30 * 24 * 3600;

/// The API's state: the pulls, and whether the daemon is stopping.
#[derive(Debug)]
pub struct Api {
    pub pulls: Arc<Pulls>,
    pub shutting_down: tokio_util::sync::CancellationToken,
}

impl Api {
    /// Answers one request from `peer`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: Requester,
    ) -> Response<Full<Bytes>> {
        let operation = operation(&request);
        let id = format!("r-{}", uuid::Uuid::now_v7().simple());
        let span = info_span!("request", request = %id, operation, method = %request.method(),
            path = %request.uri().path(), uid = peer.uid);
        let answer = self.dispatch(request, peer).instrument(span.clone()).await;
        let response = answer.unwrap_or_else(ApiError::into_response);
        let status = response.status().as_u16();
        self.pulls.stager().metrics().api_request(operation, status);
        span.in_scope(|| debug!(status, "answered"));
        response
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        peer: Requester,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        // Percent-decoded before it is split, so `sha256%3A...` names the digest it spells; an
        // encoded `/` splits too, which no id or digest has.
        let path = percent_decode_str(request.uri().path())
            .decode_utf8_lossy()
            .into_owned();
        let endpoint = route(request.method(), &path).map_err(|allow| match allow {
            Some(allow) => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} takes {allow}"),
            )
            .with_allow(allow),
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "route_not_found",
                format!("no route {path}"),
            ),
        })?;
        match endpoint {
            Endpoint::CreatePull => {
                let body = read_json::<PullRequest>(request).await?;
                self.create_pull(body, peer).await
            }
            Endpoint::GetPull(id) => self.get_pull(id, request.uri().query()).await,
            Endpoint::CancelPull(id) => self.cancel_pull(id).await,
            Endpoint::ListBlobs => self.list_blobs(),
            Endpoint::GetBlob(digest) => self.get_blob(digest),
            Endpoint::Status => self.status(),
            Endpoint::Verify => {
                let body = read_json::<VerifyRequest>(request).await?;
                self.verify(body, peer).await
            }
            Endpoint::TakeLease => {
                let body = read_json::<LeaseRequest>(request).await?;
                self.take_lease(body)
            }
            Endpoint::ReleaseLease(id) => self.release_lease(id),
            Endpoint::Collect => self.collect(),
        }
    }

    async fn create_pull(
        &self,
        body: PullRequest,
        peer: Requester,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        if self.shutting_down.is_cancelled() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the daemon is stopping",
            ));
        }
        let id = ArtifactId::new(body.artifact_id)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_artifact_id", e))?;
        let pin = body.digest.map(|d| parse_digest(&d)).transpose()?;
        let created = self.pulls.create(&id, pin.as_ref(), Some(peer)).await?;
        let (status, pull) = match created {
            Created::Started(pull) | Created::Joined(pull) => (StatusCode::ACCEPTED, pull),
            Created::Present(pull) => (StatusCode::OK, pull),
        };
        Ok(respond(status, &pull.view()))
    }

    async fn get_pull(
        &self,
        id: &str,
        query: Option<&str>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let wait = wait_of(query)?;
        let pull = self.pulls.get(id).ok_or_else(|| not_found_pull(id))?;
        if let Some(wait) = wait {
            pull.wait(wait).await;
        }
        Ok(respond(StatusCode::OK, &pull.view()))
    }

    async fn cancel_pull(&self, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let pull = self.pulls.get(id).ok_or_else(|| not_found_pull(id))?;
        pull.cancel();
        pull.wait(Duration::from_secs(30)).await;
        Ok(respond(StatusCode::OK, &pull.view()))
    }

    async fn verify(
        &self,
        body: VerifyRequest,
        peer: Requester,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let target =
            match (body.artifact_id, body.digest, body.path) {
                (Some(id), None, None) => Target::Artifact(ArtifactId::new(id).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_artifact_id", e)
                })?),
                (None, Some(digest), Some(path)) => Target::File {
                    digest: parse_digest(&digest)?,
                    path: path.into(),
                },
                _ => {
                    return Err(ApiError::bad_request(
                        "give artifact_id, or digest and path",
                    ));
                }
            };
        let verified = self
            .pulls
            .stager()
            .verify(target, Some(peer))
            .await
            .map_err(verify_error)?;
        let mut view = blob_view(&verified.digest, &verified.path, verified.size);
        view["outcome"] = json!("verified");
        Ok(respond(StatusCode::OK, &view))
    }

    fn take_lease(&self, body: LeaseRequest) -> Result<Response<Full<Bytes>>, ApiError> {
        let holder_ok = !body.holder.is_empty()
            && body.holder.chars().count() <= 256
            && !body.holder.chars().any(char::is_control);
        if !holder_ok {
            return Err(ApiError::bad_request(
                "holder must be 1-256 printable characters",
            ));
        }
        // 256 sha512 digests fit well within the body limit.
        if body.digests.is_empty() || body.digests.len() > MAX_LEASE_DIGESTS {
            return Err(ApiError::bad_request("a lease holds 1-256 digests"));
        }
        if !(1..=MAX_LEASE).contains(&body.ttl_seconds) {
            return Err(ApiError::bad_request(
                "ttl_seconds must be between 1 and 30 days",
            ));
        }
        let digests = body
            .digests
            .iter()
            .map(|d| parse_digest(d))
            .collect::<Result<Vec<_>, _>>()?;
        let ttl = Duration::from_secs(body.ttl_seconds);
        let store = self.pulls.stager().store();
        digests.iter().for_each(|d| store.touch(d));
        let lease = self
            .pulls
            .leases()
            .take(body.holder, digests, ttl)
            .map_err(io_error)?;
        let expires = std::time::UNIX_EPOCH + Duration::from_secs(lease.expires_at);
        let view = json!({
            "id": lease.id,
            "holder": lease.holder,
            "digests": lease.digests,
            "expires_at": humantime::format_rfc3339_seconds(expires).to_string(),
        });
        Ok(respond(StatusCode::CREATED, &view))
    }

    fn release_lease(&self, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        if !self.pulls.leases().release(id).map_err(io_error)? {
            let shown: String = id.chars().take(80).filter(|c| !c.is_control()).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "lease_not_found",
                format!("no lease {shown}"),
            ));
        }
        Ok(respond(
            StatusCode::OK,
            &json!({ "id": id, "released": true }),
        ))
    }

    fn collect(&self) -> Result<Response<Full<Bytes>>, ApiError> {
        let evicted = self.pulls.collect(true, None).map_err(store_error)?;
        let freed: u64 = evicted.iter().map(|c| c.size).sum();
        let evicted: Vec<Value> = evicted
            .iter()
            .map(|c| json!({ "digest": c.digest, "size": c.size }))
            .collect();
        Ok(respond(
            StatusCode::OK,
            &json!({ "evicted": evicted, "freed_bytes": freed }),
        ))
    }

    fn list_blobs(&self) -> Result<Response<Full<Bytes>>, ApiError> {
        let blobs = self.pulls.stager().store().list().map_err(store_error)?;
        let blobs: Vec<Value> = blobs
            .into_iter()
            .map(|(d, p, s)| blob_view(&d, &p, s))
            .collect();
        Ok(respond(StatusCode::OK, &json!({ "blobs": blobs })))
    }

    fn get_blob(&self, digest: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let digest = parse_digest(digest)?;
        let found = self
            .pulls
            .stager()
            .store()
            .find(&digest)
            .map_err(store_error)?;
        let (path, size) = found.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "blob_not_found",
                format!("{digest} is not in the store"),
            )
        })?;
        Ok(respond(StatusCode::OK, &blob_view(&digest, &path, size)))
    }

    fn status(&self) -> Result<Response<Full<Bytes>>, ApiError> {
        let blobs = self.pulls.stager().store().list().map_err(store_error)?;
        let bytes: u64 = blobs.iter().map(|(_, _, size)| size).sum();
        let (active, queued) = self.pulls.counts();
        let outbox = self.pulls.stager().outbox();
        let status = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "node_id": self.pulls.stager().node_id(),
            "pulls": { "active": active, "queued": queued },
            "store": { "blobs": blobs.len(), "bytes": bytes },
            "outbox": {
                "depth": outbox.depth(),
                "oldest_age_seconds": outbox.oldest_age().map(|age| age.as_secs()),
            },
        });
        Ok(respond(StatusCode::OK, &status))
    }
}

fn blob_view(digest: &Digest, path: &std::path::Path, size: u64) -> Value {
    json!({ "digest": digest, "path": path, "size": size })
}

fn verify_error(e: VerifyError) -> ApiError {
    let status = match &e {
        VerifyError::Stage(stage) => return ApiError::from_stage(stage),
        VerifyError::NotStaged { .. } => StatusCode::NOT_FOUND,
        VerifyError::NotAllowed { .. } => StatusCode::FORBIDDEN,
        VerifyError::Read { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        VerifyError::Mismatch { .. } => StatusCode::CONFLICT,
    };
    ApiError::new(status, e.code(), crate::errors::Chain(&e).to_string())
}

fn not_found_pull(id: &str) -> ApiError {
    let shown: String = id.chars().take(80).filter(|c| !c.is_control()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "pull_not_found",
        format!("no pull {shown}"),
    )
}

fn io_error(e: std::io::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string())
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "io_error",
        crate::errors::Chain(&e).to_string(),
    )
}

fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    text.parse().map_err(|e: control_client::DigestError| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_digest", e.to_string())
    })
}

/// `wait=30s` from the query string, capped at [`MAX_WAIT`].
fn wait_of(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|p| p.strip_prefix("wait="))
    else {
        return Ok(None);
    };
    let wait = humantime::parse_duration(value)
        .map_err(|_| ApiError::bad_request("wait must be a duration such as 30s"))?;
    Ok(Some(wait.min(MAX_WAIT)))
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the body exceeds 64 KiB",
                )
            } else {
                ApiError::bad_request("the body could not be read")
            }
        })?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed route reaches an endpoint, and every endpoint is listed.
    #[test]
    fn routes_and_the_router_agree() {
        let mut reached = Vec::new();
        for (method, template) in ROUTES {
            let method: Method = method.parse().unwrap();
            let path = template
                .replace("{id}", "p-1")
                .replace("{digest}", "sha256:ab");
            let endpoint = route(&method, &path).unwrap_or_else(|_| panic!("{template} unrouted"));
            reached.push(
                format!("{endpoint:?}")
                    .split('(')
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
        reached.sort();
        reached.dedup();
        assert_eq!(reached.len(), ROUTES.len(), "two routes reach one endpoint");
        let mut names: Vec<_> = ROUTES
            .iter()
            .map(|(method, template)| {
                let path = template.replace("{id}", "p-1").replace("{digest}", "d");
                route(&method.parse().unwrap(), &path).unwrap().name()
            })
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            ROUTES.len(),
            "two routes share an operation name"
        );
        for (method, template) in ROUTES {
            let path = template
                .replace("{id}", "x")
                .replace("{digest}", "sha256:ab");
            let Err(Some(allow)) = route(&Method::PATCH, &path) else {
                panic!("{template} takes PATCH or has no Allow");
            };
            assert!(
                allow.split(", ").any(|m| m == *method),
                "{template}: {allow}"
            );
        }
        let allow = |methods: &str| Err(Some(methods.to_owned()));
        assert_eq!(route(&Method::PUT, "/v1/pulls"), allow("POST"));
        assert_eq!(route(&Method::PUT, "/v1/pulls/p-1"), allow("GET, DELETE"));
        assert_eq!(route(&Method::TRACE, "/v1/status"), allow("GET"));
        assert_eq!(route(&Method::GET, "/v2/pulls"), Err(None));
        assert_eq!(route(&Method::GET, "/v1/pulls/a/b"), Err(None));
    }

    #[test]
    fn wait_is_parsed_and_capped() {
        assert_eq!(wait_of(None).unwrap(), None);
        assert_eq!(
            wait_of(Some("x=1&wait=2s")).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(wait_of(Some("wait=1h")).unwrap(), Some(MAX_WAIT));
        assert!(wait_of(Some("wait=soon")).is_err());
    }
}
