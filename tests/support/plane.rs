//! A control plane on loopback that speaks the HTTP protocol of CONTRACT.md, for tests that
//! need one the test can steer.
//!
//! It serves registrations (`GET /v1/artifacts/{id}`), issues credentials
//! (`POST /v1/artifacts/{id}/credentials`) from a per-artifact template whose `expires_at` is
//! set at issue time from a lifetime, and records events (`POST /v1/events`), deduplicated on
//! `event_id` the way the real control plane does, while counting the duplicates it was sent.
//! Every call's `Authorization` header is kept. A [`Mode`] makes it fail: down (connection
//! refused is not possible on a bound port, so 503), 500, 429 with `Retry-After`, a hang, or
//! garbage that is not JSON; a mode can apply to every call or to events only.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::agent::Setup;

/// How the control plane answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// 503 to everything.
    Down,
    /// 500 to everything.
    Error,
    /// 429 with `Retry-After: 1`.
    Busy,
    /// Never answers.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
}

/// Makes the credential of the `n`th issue (from 0) that expires at the given time.
pub type Issuer = Arc<dyn Fn(usize, SystemTime) -> Value + Send + Sync>;

/// What the control plane issues for one artifact.
#[derive(Clone)]
struct Issue {
    /// The credential object; `expires_at` is added when `lifetime` is set.
    template: Value,
    lifetime: Option<Duration>,
    /// Makes the credential instead of `template`, when set.
    issuer: Option<Issuer>,
    /// Answers this status (and no credential) instead, when set, once `granted` were issued.
    refusal: Option<u16>,
    granted: usize,
}

#[derive(Default)]
struct State {
    artifacts: Vec<Value>,
    credentials: HashMap<String, Issue>,
    events: Vec<Value>,
    event_ids: HashSet<String>,
    authorizations: Vec<String>,
    paths: Vec<String>,
}

/// The control plane; see the module docs. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct Plane {
    url: String,
    state: Arc<Mutex<State>>,
    mode: Arc<Mutex<(Mode, bool)>>,
    duplicates: Arc<AtomicUsize>,
    issued: Arc<Mutex<HashMap<String, usize>>>,
}

impl Plane {
    /// Starts it on `127.0.0.1:0`, up, with nothing registered.
    pub async fn start() -> Plane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the control plane");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let plane = Plane {
            url,
            state: Arc::default(),
            mode: Arc::new(Mutex::new((Mode::Up, false))),
            duplicates: Arc::default(),
            issued: Arc::default(),
        };
        let serving = plane.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let plane = serving.clone();
                let service = service_fn(move |request| {
                    let plane = plane.clone();
                    async move { Ok::<_, Infallible>(plane.answer(request).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        plane
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Points `setup` at this control plane instead of its registry file, with `token` in a
    /// token file (returned, so a test can rotate it).
    pub fn configure(&self, setup: &Setup, token: &str) -> PathBuf {
        let token_file = setup.write_file("node-token", &format!("{token}\n"));
        let text = std::fs::read_to_string(setup.config_path()).expect("read the configuration");
        let registry = format!("registry = '{}/registry.json'\n", setup.root().display());
        assert!(
            text.contains(&registry),
            "the configuration names its registry"
        );
        let http = format!(
            "url = '{}'\ninsecure_http = true\ntoken_file = '{}'\n",
            self.url,
            token_file.display()
        );
        setup.write_config(&text.replace(&registry, &http));
        token_file
    }

    /// Registers `artifact` (replacing one with the same id), issuing `{"kind": "none"}`.
    pub fn register(&self, artifact: Value) {
        let id = artifact["id"].as_str().expect("an id").to_owned();
        let mut state = self.state.lock().unwrap();
        state.artifacts.retain(|a| a["id"] != id.as_str());
        state.artifacts.push(artifact);
        state.credentials.entry(id).or_insert(Issue {
            template: json!({"kind": "none"}),
            lifetime: None,
            issuer: None,
            refusal: None,
            granted: 0,
        });
    }

    /// Issues `template` for `id`, with `expires_at` set `lifetime` after each issue.
    pub fn issue(&self, id: &str, template: Value, lifetime: Option<Duration>) {
        self.set_issue(
            id,
            Issue {
                template,
                lifetime,
                issuer: None,
                refusal: None,
                granted: 0,
            },
        );
    }

    /// Issues what `issuer` makes for `id` (a credential that changes with every issue), with
    /// `expires_at` set `lifetime` after each issue.
    pub fn issue_with(&self, id: &str, lifetime: Duration, issuer: Issuer) {
        self.set_issue(
            id,
            Issue {
                template: Value::Null,
                lifetime: Some(lifetime),
                issuer: Some(issuer),
                refusal: None,
                granted: 0,
            },
        );
    }

    /// Answers every credentials call for `id` with `status` (403: the control plane will not
    /// issue credentials for it to this node).
    pub fn refuse_credentials(&self, id: &str, status: u16) {
        self.set_issue(
            id,
            Issue {
                template: Value::Null,
                lifetime: None,
                issuer: None,
                refusal: Some(status),
                granted: 0,
            },
        );
    }

    /// Goes on issuing for `id` as set until `granted` credentials are out in all, then answers
    /// every further credentials call with `status`: a renewal the control plane refuses.
    pub fn refuse_credentials_after(&self, id: &str, granted: usize, status: u16) {
        let mut state = self.state.lock().unwrap();
        let issue = state.credentials.get_mut(id).expect("issued before");
        issue.refusal = Some(status);
        issue.granted = granted;
    }

    fn set_issue(&self, id: &str, issue: Issue) {
        self.state
            .lock()
            .unwrap()
            .credentials
            .insert(id.to_owned(), issue);
    }

    /// Answers every call with `mode`; with `events_only`, only `POST /v1/events`.
    pub fn set_mode(&self, mode: Mode, events_only: bool) {
        *self.mode.lock().unwrap() = (mode, events_only);
    }

    /// The events received, each once, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// Events sent again after they had been taken.
    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Credentials issued for `id` so far.
    pub fn issued(&self, id: &str) -> usize {
        self.issued.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// The `Authorization` header of every call, in order ("" when absent).
    pub fn authorizations(&self) -> Vec<String> {
        self.state.lock().unwrap().authorizations.clone()
    }

    /// The path of every call, in order.
    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let auth = request
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        {
            let mut state = self.state.lock().unwrap();
            state.authorizations.push(auth.unwrap_or_default());
            state.paths.push(path.clone());
        }
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let (mode, events_only) = *self.mode.lock().unwrap();
        let events_call = path == "/v1/events";
        if mode != Mode::Up && (events_call || !events_only) {
            return failing(mode).await;
        }
        let (status, answer) = match path.strip_prefix("/v1/artifacts/") {
            _ if events_call => self.take_events(&body),
            Some(rest) => match rest.strip_suffix("/credentials") {
                Some(id) => self.credentials(&decode(id)),
                None => self.resolve(&decode(rest)),
            },
            None => (404, json!({"error": "no such route"})),
        };
        reply(status, Bytes::from(answer.to_string()))
    }

    fn resolve(&self, id: &str) -> (u16, Value) {
        let state = self.state.lock().unwrap();
        match state.artifacts.iter().find(|a| a["id"] == id) {
            Some(artifact) => (200, artifact.clone()),
            None => (404, json!({"error": "not registered"})),
        }
    }

    fn credentials(&self, id: &str) -> (u16, Value) {
        let issue = self.state.lock().unwrap().credentials.get(id).cloned();
        let Some(issue) = issue else {
            return (404, json!({"error": "not registered"}));
        };
        if let Some(status) = issue.refusal.filter(|_| self.issued(id) >= issue.granted) {
            return (status, json!({"error": "no credentials for this node"}));
        }
        let n = {
            let mut issued = self.issued.lock().unwrap();
            let count = issued.entry(id.to_owned()).or_default();
            *count += 1;
            *count - 1
        };
        let expires = SystemTime::now() + issue.lifetime.unwrap_or_default();
        let mut credential = match &issue.issuer {
            Some(issuer) => issuer(n, expires),
            None => issue.template,
        };
        if issue.lifetime.is_some() {
            credential["expires_at"] = json!(humantime::format_rfc3339_millis(expires).to_string());
        }
        (200, credential)
    }

    fn take_events(&self, body: &[u8]) -> (u16, Value) {
        let Ok(posted) = serde_json::from_slice::<Value>(body) else {
            return (400, json!({"error": "not JSON"}));
        };
        let mut state = self.state.lock().unwrap();
        for event in posted["events"].as_array().cloned().unwrap_or_default() {
            let id = event["event_id"].as_str().unwrap_or_default().to_owned();
            if state.event_ids.insert(id) {
                state.events.push(event);
            } else {
                self.duplicates.fetch_add(1, Ordering::SeqCst);
            }
        }
        (200, json!({}))
    }
}

async fn failing(mode: Mode) -> Response<Full<Bytes>> {
    match mode {
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            reply(503, Bytes::new())
        }
        Mode::Busy => {
            let mut response = reply(429, Bytes::from_static(b"{}"));
            response
                .headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            response
        }
        Mode::Garbage => reply(200, Bytes::from_static(b"<html>not json")),
        Mode::Error => reply(500, Bytes::from_static(b"{}")),
        Mode::Down | Mode::Up => reply(503, Bytes::from_static(b"{}")),
    }
}

fn reply(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a valid response")
}

/// Undoes the percent-encoding of an artifact id in a path segment.
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
