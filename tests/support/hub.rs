//! A Hugging Face Hub on loopback, for the integration tests: a hub host and a separate CDN
//! host that speak the Hub's download protocol as the official client uses it.
//!
//! The hub (`http://127.0.0.1:P1`) keeps repositories of commits on branches and answers
//! `HEAD`/`GET {prefix}{org}/{repo}/resolve/{revision}/{path}` (revision percent-encoded, so
//! `refs/pr/1` is `refs%2Fpr%2F1`). For an LFS file it answers 302 with `X-Repo-Commit`,
//! `X-Linked-Etag` (the sha256), `X-Linked-Size`, `ETag` and a `Location` on the CDN; for a
//! small file it serves the bytes itself (200 or 206) with `X-Repo-Commit` and an `ETag`. A
//! renamed repository answers 307 with a relative `Location`; a private one wants its bearer
//! token and otherwise answers 401 `RepoNotFound`, as the Hub does; unknown revisions and files
//! answer 404 with `X-Error-Code`. The CDN (`http://localhost:P2`: another host name, so an
//! allowlist and a client's same-origin rule tell the two apart) serves LFS content by sha256
//! at signed URLs that expire, with single byte ranges; an expired or forged signature gets 403.
//!
//! A test seeds files ([`Hub::put`], [`Hub::put_small`]), moves branches by committing again,
//! and can make changes happen after the CDN has served a given number of GETs
//! ([`Hub::after_cdn_gets`]: expire every URL issued so far, or commit a new version), so
//! "mid-transfer" is a count, not a race. Each host keeps a log of the requests it answered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::agent::sha256_hex;

type Body = BoxBody<Bytes, Infallible>;

/// The key the CDN signs its URLs with.
const SIGNING_KEY: &str = "blobstage-test-cdn-key";

/// One request as received, with the status it was answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    /// The path as sent, still percent-encoded.
    pub path: String,
    pub query: Option<String>,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

/// Something to do once the CDN has served a number of GETs.
#[derive(Clone, Debug)]
pub enum Change {
    /// Every signed URL issued so far answers 403 from now on.
    ExpireSignedUrls,
    /// Commits `body` as `path` (an LFS file) on `main` of `repo`, moving the branch.
    Commit {
        repo: String,
        path: String,
        body: Bytes,
    },
}

#[derive(Clone)]
struct File {
    body: Bytes,
    lfs: bool,
    sha256: String,
    /// The ETag of a file the hub serves itself (git's blob id on the real Hub).
    git_etag: String,
}

#[derive(Default)]
struct Repo {
    branches: HashMap<String, String>,
    /// Commit id to its tree: path to file.
    commits: HashMap<String, HashMap<String, File>>,
    /// The bearer token a private repository wants.
    token: Option<String>,
}

#[derive(Default)]
struct Inner {
    repos: HashMap<String, Repo>,
    /// Old repository id to new one.
    renames: HashMap<String, String>,
    /// LFS content by sha256, what the CDN serves.
    blobs: HashMap<String, Bytes>,
    commits_made: u64,
    url_lifetime: Option<Duration>,
    /// Signed URLs with a serial below this answer 403.
    valid_from_serial: u64,
    next_serial: u64,
    /// CDN GETs that reached content, and the changes due after a count of them.
    cdn_gets: usize,
    pending: Vec<(usize, Vec<Change>)>,
    /// Ranged CDN GETs starting at or past `.0` send `.1` bytes, then nothing.
    stall_from: Option<(u64, u64)>,
    /// Where signed URLs point instead of the CDN itself (a relay in front of it).
    cdn_relay: Option<String>,
    hub_log: Vec<Logged>,
    cdn_log: Vec<Logged>,
}

/// The running hub and CDN; see the module docs. Dropping it stops both.
pub struct Hub {
    hub: SocketAddr,
    cdn: SocketAddr,
    state: Arc<Mutex<Inner>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Hub {
    /// Binds the hub and the CDN on 127.0.0.1:0 and serves them on the current runtime.
    pub async fn start() -> Hub {
        let state = Arc::new(Mutex::new(Inner::default()));
        let hub_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
        let cdn_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind cdn");
        let hub = hub_listener.local_addr().expect("hub address");
        let cdn = cdn_listener.local_addr().expect("cdn address");
        let cdn_origin = format!("http://localhost:{}", cdn.port());
        let tasks = vec![
            tokio::spawn(serve(hub_listener, state.clone(), Host::Hub { cdn_origin })),
            tokio::spawn(serve(cdn_listener, state.clone(), Host::Cdn)),
        ];
        Hub {
            hub,
            cdn,
            state,
            tasks,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `http://127.0.0.1:P1`: what `HF_ENDPOINT` or `[sources.huggingface] endpoint` names.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.hub)
    }

    /// The CDN's host name, apart from the hub's.
    pub fn cdn_host(&self) -> &'static str {
        "localhost"
    }

    pub fn cdn_port(&self) -> u16 {
        self.cdn.port()
    }

    /// Commits `body` as the LFS file `path` on `main` of `repo` (`org/name`,
    /// `datasets/org/name`, `spaces/org/name`), creating the repository; returns the commit.
    pub fn put(&self, repo: &str, path: &str, body: impl Into<Bytes>) -> String {
        self.put_on(repo, "main", path, body.into(), true)
    }

    /// Like [`Hub::put`], for a small file the hub serves itself (not in LFS).
    pub fn put_small(&self, repo: &str, path: &str, body: impl Into<Bytes>) -> String {
        self.put_on(repo, "main", path, body.into(), false)
    }

    /// Commits `path` on `branch` (created from `main`, or empty, when new).
    pub fn put_on(&self, repo: &str, branch: &str, path: &str, body: Bytes, lfs: bool) -> String {
        self.lock().commit(repo, branch, path, body, lfs)
    }

    /// Rewrites the history of `repo` to one new commit of `main`'s files (a squash): every
    /// earlier commit, and every other branch, is gone. Returns the new commit.
    pub fn squash(&self, repo: &str) -> String {
        let mut inner = self.lock();
        inner.commits_made += 1;
        let commit =
            sha256_hex(format!("{repo} squash {}", inner.commits_made).as_bytes())[..40].to_owned();
        let repo = inner.repos.get_mut(repo).expect("a repository to squash");
        let tree = repo.commits[&repo.branches["main"]].clone();
        repo.commits = HashMap::from([(commit.clone(), tree)]);
        repo.branches = HashMap::from([("main".to_owned(), commit.clone())]);
        commit
    }

    /// The commit `branch` of `repo` points at.
    pub fn head(&self, repo: &str, branch: &str) -> Option<String> {
        let inner = self.lock();
        inner.repos.get(repo)?.branches.get(branch).cloned()
    }

    /// `hf://{repo}[@{revision}]/{path}`.
    pub fn uri(&self, repo: &str, revision: Option<&str>, path: &str) -> String {
        match revision {
            Some(revision) => format!("hf://{repo}@{revision}/{path}"),
            None => format!("hf://{repo}/{path}"),
        }
    }

    /// From now on `repo` answers only requests with `Authorization: Bearer {token}`.
    pub fn make_private(&self, repo: &str, token: &str) {
        let mut inner = self.lock();
        let repo = inner
            .repos
            .get_mut(repo)
            .expect("a repository to make private");
        repo.token = Some(token.to_owned());
    }

    /// Renames `from` to `to`: `from` answers with a relative redirect to `to`.
    pub fn rename(&self, from: &str, to: &str) {
        let mut inner = self.lock();
        let repo = inner.repos.remove(from).expect("a repository to rename");
        inner.repos.insert(to.to_owned(), repo);
        inner.renames.insert(from.to_owned(), to.to_owned());
    }

    /// Signed URLs issued from now on point at `http://localhost:{port}`, a relay to the CDN
    /// ([`super::front::Front`]), so that the relay sees every ranged GET.
    pub fn route_cdn_through(&self, port: u16) {
        self.lock().cdn_relay = Some(format!("http://localhost:{port}"));
    }

    /// How long signed URLs issued from now on stay valid (an hour unless set).
    pub fn set_signed_url_lifetime(&self, lifetime: Duration) {
        self.lock().url_lifetime = Some(lifetime);
    }

    /// Every signed URL issued so far answers 403 from now on.
    pub fn expire_signed_urls(&self) {
        self.lock().expire_urls();
    }

    /// Applies `changes` once the CDN has served `gets` content GETs: the next GET sees them.
    pub fn after_cdn_gets(&self, gets: usize, changes: Vec<Change>) {
        self.lock().pending.push((gets, changes));
    }

    /// Ranged CDN GETs from `offset` on send `after` bytes, then stall until the client
    /// leaves; `None` ends the stall for later requests.
    pub fn stall_cdn_from(&self, stall: Option<(u64, u64)>) {
        self.lock().stall_from = stall;
    }

    /// Every request the hub answered, in order.
    pub fn hub_requests(&self) -> Vec<Logged> {
        self.lock().hub_log.clone()
    }

    /// Every request the CDN answered, in order.
    pub fn cdn_requests(&self) -> Vec<Logged> {
        self.lock().cdn_log.clone()
    }

    /// CDN GETs with a valid signature so far (what [`Hub::after_cdn_gets`] counts).
    pub fn cdn_gets_served(&self) -> usize {
        self.lock().cdn_gets
    }

    /// The node configuration for this hub: the endpoint, its host and the CDN's host
    /// allowed (plain http), and `orgs` allowed.
    pub fn node_config(&self, orgs: &[&str], cdn_allowed: bool) -> String {
        let mut toml = self.host_entry("127.0.0.1");
        if cdn_allowed {
            toml.push_str(&self.host_entry(self.cdn_host()));
        }
        for org in orgs {
            toml.push_str(&format!(
                "[[policy.allow]]\nsource_type = 'huggingface'\norg = '{org}'\n\n"
            ));
        }
        toml + &format!("[sources.huggingface]\nendpoint = '{}'\n", self.endpoint())
    }

    fn host_entry(&self, host: &str) -> String {
        format!(
            "[[policy.allow]]\nsource_type = 'huggingface'\nhost = '{host}'\ninsecure_http = true\n\n"
        )
    }
}

/// An active, verified, allowed `prod` registration of `body` at the `hf://` `uri`.
pub fn artifact(id: &str, uri: &str, body: &[u8]) -> Value {
    let mut value = super::agent::artifact(id, uri, body);
    value["source"]["source_type"] = "huggingface".into();
    value
}

// ---- state ---------------------------------------------------------------------------

impl Inner {
    fn commit(
        &mut self,
        repo_id: &str,
        branch: &str,
        path: &str,
        body: Bytes,
        lfs: bool,
    ) -> String {
        self.commits_made += 1;
        let commit = sha256_hex(format!("{repo_id} {branch} {}", self.commits_made).as_bytes())
            [..40]
            .to_owned();
        let sha256 = sha256_hex(&body);
        let git_object = [format!("blob {}\0", body.len()).as_bytes(), &body].concat();
        let git_etag = sha256_hex(&git_object)[..40].to_owned();
        if lfs {
            self.blobs.insert(sha256.clone(), body.clone());
        }
        let file = File {
            body,
            lfs,
            sha256,
            git_etag,
        };
        let repo = self.repos.entry(repo_id.to_owned()).or_default();
        let parent = repo
            .branches
            .get(branch)
            .or_else(|| repo.branches.get("main"));
        let mut tree = parent
            .and_then(|c| repo.commits.get(c))
            .cloned()
            .unwrap_or_default();
        tree.insert(path.to_owned(), file);
        repo.commits.insert(commit.clone(), tree);
        repo.branches.insert(branch.to_owned(), commit.clone());
        commit
    }

    fn expire_urls(&mut self) {
        self.valid_from_serial = self.next_serial;
    }

    /// Counts a CDN GET of content and applies the changes due before it is answered.
    fn count_cdn_get(&mut self) {
        let served = self.cdn_gets;
        self.cdn_gets += 1;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(after, _)| *after <= served);
        self.pending = later;
        for change in due.into_iter().flat_map(|(_, changes)| changes) {
            match change {
                Change::ExpireSignedUrls => self.expire_urls(),
                Change::Commit { repo, path, body } => {
                    self.commit(&repo, "main", &path, body, true);
                }
            }
        }
    }

    /// A signed CDN URL path and query for the content `sha256`.
    fn sign(&mut self, cdn_origin: &str, sha256: &str) -> String {
        let lifetime = self.url_lifetime.unwrap_or(Duration::from_secs(3600));
        let expires = unix_now() + lifetime.as_secs();
        let serial = self.next_serial;
        self.next_serial += 1;
        let path = format!("/repos/{}/{}/{sha256}", &sha256[..2], &sha256[2..4]);
        let sig = signature(&path, expires, serial);
        format!("{cdn_origin}{path}?expires={expires}&serial={serial}&sig={sig}")
    }
}

fn signature(path: &str, expires: u64, serial: u64) -> String {
    let text = format!("{SIGNING_KEY}\n{path}\n{expires}\n{serial}");
    sha256_hex(text.as_bytes())[..32].to_owned()
}

fn unix_now() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| d.as_secs())
}

// ---- serving -------------------------------------------------------------------------

#[derive(Clone)]
enum Host {
    Hub { cdn_origin: String },
    Cdn,
}

async fn serve(listener: TcpListener, state: Arc<Mutex<Inner>>, host: Host) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let (state, host) = (state.clone(), host.clone());
        let service = service_fn(move |request| {
            let (state, host) = (state.clone(), host.clone());
            async move { Ok::<_, Infallible>(answer(&state, &host, request)) }
        });
        connections.spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

/// The parts of a request the hosts read.
struct Ask {
    method: String,
    path: String,
    query: Option<String>,
    range: Option<String>,
    authorization: Option<String>,
}

fn answer(state: &Mutex<Inner>, host: &Host, request: Request<Incoming>) -> Response<Body> {
    let header = |name| {
        let value = request.headers().get(name);
        value.map(|v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let ask = Ask {
        method: request.method().as_str().to_owned(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        range: header(header::RANGE),
        authorization: header(header::AUTHORIZATION),
    };
    let mut inner = state.lock().unwrap_or_else(PoisonError::into_inner);
    let reply = match (&ask.method[..], host) {
        ("GET" | "HEAD", Host::Hub { cdn_origin }) => hub_answer(&mut inner, cdn_origin, &ask),
        ("GET" | "HEAD", Host::Cdn) => cdn_answer(&mut inner, &ask),
        _ => Reply::new(405),
    };
    let logged = Logged {
        method: ask.method.clone(),
        path: ask.path,
        query: ask.query,
        range: ask.range,
        authorization: ask.authorization,
        status: reply.status,
    };
    match host {
        Host::Hub { .. } => inner.hub_log.push(logged),
        Host::Cdn => inner.cdn_log.push(logged),
    }
    reply.into_response(ask.method == "HEAD")
}

/// A resolve path read back: repository id, revision and file path, decoded.
struct Resolve {
    repo: String,
    revision: String,
    file: String,
    /// What follows the repository id in the path, as sent: kept across a rename redirect.
    tail: String,
}

fn parse_resolve(path: &str) -> Option<Resolve> {
    let rest = path.strip_prefix('/')?;
    let typed = rest.starts_with("datasets/") || rest.starts_with("spaces/");
    let mut parts = rest.splitn(if typed { 6 } else { 5 }, '/');
    let kind = typed.then(|| parts.next()).flatten();
    let (org, name) = (parts.next()?, parts.next()?);
    let repo = match kind {
        Some(kind) => format!("{kind}/{org}/{name}"),
        None => format!("{org}/{name}"),
    };
    let tail = rest[repo.len()..].to_owned();
    if parts.next()? != "resolve" {
        return None;
    }
    let revision = decode(parts.next()?);
    let file = decode(parts.next()?);
    Some(Resolve {
        repo,
        revision,
        file,
        tail,
    })
}

fn decode(text: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(text);
    decoded.decode_utf8_lossy().into_owned()
}

fn hub_answer(inner: &mut Inner, cdn_origin: &str, ask: &Ask) -> Reply {
    let Some(resolve) = parse_resolve(&ask.path) else {
        return Reply::new(404).error("EntryNotFound");
    };
    if let Some(to) = inner.renames.get(&resolve.repo) {
        return Reply::new(307).with(header::LOCATION, format!("/{to}{}", resolve.tail));
    }
    let token = ask
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    let Some(repo) = inner.repos.get(&resolve.repo) else {
        return Reply::new(401).error("RepoNotFound");
    };
    if repo
        .token
        .as_deref()
        .is_some_and(|wanted| token != Some(wanted))
    {
        return Reply::new(401).error("RepoNotFound");
    }
    let commit = match repo.commits.contains_key(&resolve.revision) {
        true => Some(resolve.revision.clone()),
        false => repo.branches.get(&resolve.revision).cloned(),
    };
    let Some(commit) = commit else {
        return Reply::new(404).error("RevisionNotFound");
    };
    let Some(file) = repo.commits[&commit].get(&resolve.file).cloned() else {
        return Reply::new(404)
            .error("EntryNotFound")
            .with("x-repo-commit", &commit);
    };
    let reply = match file.lfs {
        true => {
            let origin = inner.cdn_relay.clone();
            let location = inner.sign(origin.as_deref().unwrap_or(cdn_origin), &file.sha256);
            let etag = format!("\"{}\"", file.sha256);
            Reply::new(302)
                .with(header::LOCATION, location)
                .with("x-linked-etag", &etag)
                .with("x-linked-size", file.body.len().to_string())
                .with(header::ETAG, etag)
        }
        false => serve_bytes(&file.body, ask.range.as_deref(), None)
            .with(header::ETAG, format!("\"{}\"", file.git_etag)),
    };
    reply.with("x-repo-commit", commit)
}

fn cdn_answer(inner: &mut Inner, ask: &Ask) -> Reply {
    let sha256 = ask.path.rsplit('/').next().unwrap_or_default().to_owned();
    let Some(body) = inner.blobs.get(&sha256).cloned() else {
        return Reply::new(404);
    };
    if !inner.signature_holds(&ask.path, ask.query.as_deref()) {
        let xml = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>";
        return Reply::new(403).body(Bytes::from_static(xml.as_bytes()));
    }
    if ask.method == "GET" {
        inner.count_cdn_get();
    }
    let start = ask
        .range
        .as_deref()
        .and_then(range_bounds)
        .map(|(first, _)| first);
    let stall = inner.stall_from.filter(|(from, _)| start >= Some(*from));
    serve_bytes(&body, ask.range.as_deref(), stall.map(|(_, after)| after))
        .with(header::ETAG, format!("\"cdn-{}\"", &sha256[..16]))
}

impl Inner {
    fn signature_holds(&self, path: &str, query: Option<&str>) -> bool {
        let params: HashMap<&str, &str> = query
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let number = |key| params.get(key).and_then(|v| v.parse::<u64>().ok());
        let (Some(expires), Some(serial)) = (number("expires"), number("serial")) else {
            return false;
        };
        params.get("sig") == Some(&signature(path, expires, serial).as_str())
            && expires >= unix_now()
            && serial >= self.valid_from_serial
    }
}

/// 200 with `body`, or 206 with the one range asked for (416 past the end); with `stall`,
/// only that many bytes are sent and the connection then hangs.
fn serve_bytes(body: &Bytes, range: Option<&str>, stall: Option<u64>) -> Reply {
    let total = body.len() as u64;
    let reply = match range.map(range_bounds) {
        None | Some(None) => Reply::new(200).body(body.clone()),
        Some(Some((first, _))) if first >= total => {
            Reply::new(416).with(header::CONTENT_RANGE, format!("bytes */{total}"))
        }
        Some(Some((first, last))) => {
            let last = last.min(total - 1);
            let slice = body.slice(first as usize..=last as usize);
            Reply::new(206).body(slice).with(
                header::CONTENT_RANGE,
                format!("bytes {first}-{last}/{total}"),
            )
        }
    };
    let reply = reply.with(header::ACCEPT_RANGES, "bytes");
    match stall {
        Some(after) => reply.stalling(after),
        None => reply,
    }
}

/// `bytes=first-last` or `bytes=first-`.
fn range_bounds(spec: &str) -> Option<(u64, u64)> {
    let (first, last) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let first = first.parse().ok()?;
    let last = match last {
        "" => u64::MAX,
        last => last.parse().ok()?,
    };
    (first <= last).then_some((first, last))
}

/// An answer being put together.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// Bytes sent before the body stalls, when it does.
    stall_after: Option<u64>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            stall_after: None,
        }
    }

    fn with(mut self, name: impl AsRef<str>, value: impl Into<String>) -> Reply {
        self.headers.push((name.as_ref().to_owned(), value.into()));
        self
    }

    fn body(mut self, body: Bytes) -> Reply {
        self.body = body;
        self
    }

    /// The Hub's error headers, as its client reads them.
    fn error(self, code: &str) -> Reply {
        let message = match code {
            "RepoNotFound" => "Invalid username or password.",
            "RevisionNotFound" => "Invalid rev id",
            _ => "Entry not found",
        };
        self.with("x-error-code", code)
            .with("x-error-message", message)
    }

    fn stalling(mut self, after: u64) -> Reply {
        if after < self.body.len() as u64 {
            self.stall_after = Some(after);
        }
        self
    }

    fn into_response(self, head: bool) -> Response<Body> {
        let length = self.body.len();
        let body = match (head, self.stall_after) {
            (true, _) => Empty::new().boxed(),
            (false, None) => Full::new(self.body).boxed(),
            (false, Some(after)) => stalled(self.body.slice(..after as usize)),
        };
        let mut response = Response::new(body);
        *response.status_mut() = hyper::StatusCode::from_u16(self.status).expect("a status");
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            let name = header::HeaderName::from_bytes(name.as_bytes()).expect("a header name");
            headers.append(name, HeaderValue::from_str(&value).expect("a header value"));
        }
        headers.insert(header::CONTENT_LENGTH, length.into());
        response
    }
}

/// `sent`, then a body that never ends.
fn stalled(sent: Bytes) -> Body {
    let first = stream::once(async move { Ok::<_, Infallible>(Frame::data(sent)) });
    BodyExt::boxed(StreamBody::new(first.chain(stream::pending())))
}
