//! Loopback HTTP/1.1 origin for the integration tests. It owns a hyper server bound to
//! 127.0.0.1:0 on the caller's tokio runtime, serving in-memory objects the way a plain
//! static-file server does (validators, single byte ranges, preconditions, no
//! compression), plus per-path fault knobs and a log of every request it answered.
//! `Origin::start_tls` serves the same over TLS (rustls), with a certificate for
//! `localhost` and `127.0.0.1` issued by a fresh test CA; connections whose handshake
//! fails are counted, and never reach the request log.
//! Dropping the `Origin` stops the accept loop and every open connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Size of the body frames handed to hyper.
const FRAME: usize = 64 * 1024;
/// Pause between the last byte before a cut and the abort, so hyper flushes that byte.
const CUT_GRACE: Duration = Duration::from_millis(20);

/// A misbehaviour to inject for one path; `Origin::set_fault` replaces any previous one.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Always answer 200 with the full body, ignoring `Range`.
    IgnoreRange,
    /// The first `times` GETs get `status` (plus `Retry-After` if given) and an empty body.
    Status {
        status: u16,
        retry_after: Option<String>,
        times: usize,
    },
    /// The first `times` GETs declare the full length but the connection is aborted
    /// after `after` body bytes.
    CutBody { after: u64, times: usize },
    /// The first `times` GETs send `after` body bytes, then nothing, until the client
    /// hangs up (or the origin is dropped).
    Stall { after: u64, times: usize },
    /// Every ranged GET that starts at or past `offset` sends `after` body bytes and then
    /// stalls: a transfer freezes with everything before `offset` served, wherever the
    /// connections happen to be.
    StallFrom { offset: u64, after: u64 },
    /// Once `gets` GETs have been served, the object becomes `new_body` with a new ETag.
    ChangeAfter { gets: usize, new_body: Bytes },
    /// Every HEAD and GET answers `status` with this `Location`.
    Redirect { location: String, status: u16 },
    /// 206 answers carry a `Content-Range` shifted by one byte (the body is as asked).
    WrongContentRange,
    /// No `ETag` and no `Last-Modified`.
    NoValidator,
    /// 206 answers are sent chunked (no `Content-Length`), with `extra` bytes past the range
    /// they announce in `Content-Range`.
    Overlong { extra: u64 },
    /// Bodies are sent at most `per_request` bytes a second each (an object store's cap per
    /// connection) and at most `total` bytes a second all together (a link's).
    Paced {
        per_request: Option<u64>,
        total: Option<u64>,
    },
}

/// One request as received, with the status it was answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_match: Option<String>,
    pub if_range: Option<String>,
    pub authorization: Option<String>,
    pub accept_encoding: Option<String>,
    pub status: u16,
}

/// A running loopback origin; see the module docs.
pub struct Origin {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

/// The test CA that issued a TLS origin's certificate.
pub struct TestCa {
    /// The CA certificate, PEM-encoded: what a client must trust.
    pub cert_pem: String,
}

impl Origin {
    /// Binds 127.0.0.1:0 and spawns the plain HTTP accept loop on the current runtime.
    pub async fn start() -> Origin {
        Origin::listen(None).await
    }

    /// Like `start`, but over TLS with a certificate from a new test CA, returned too.
    pub async fn start_tls() -> (Origin, TestCa) {
        let (ca, config) = issue_certificate();
        let origin = Origin::listen(Some(TlsAcceptor::from(Arc::new(config)))).await;
        (origin, ca)
    }

    async fn listen(tls: Option<TlsAcceptor>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let state = Arc::new(State::default());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept = tokio::spawn(accept_loop(listener, state.clone(), tls));
        Origin {
            addr,
            scheme,
            state,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}` (`https://` for a TLS origin); `path` should start
    /// with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// Adds or replaces the object at `path`; every put yields a new ETag.
    pub fn put(&self, path: &str, body: impl Into<Bytes>) {
        self.state.lock().put(path, body.into());
    }

    /// The current ETag of `path` (quoted, as sent), if the object exists.
    pub fn etag(&self, path: &str) -> Option<String> {
        let inner = self.state.lock();
        inner.objects.get(path).map(|o| o.etag.clone())
    }

    /// Installs `fault` for `path`, replacing any earlier one and resetting its counters.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        let armed = Armed {
            fault,
            used: 0,
            link: Arc::default(),
        };
        self.state.lock().faults.insert(path.to_owned(), armed);
    }

    pub fn clear_fault(&self, path: &str) {
        self.state.lock().faults.remove(path);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().log.clone()
    }

    /// Number of GET requests received for `path`, whatever they were answered with.
    pub fn get_count(&self, path: &str) -> usize {
        let inner = self.state.lock();
        let gets = inner.log.iter().filter(|l| l.method == "GET");
        gets.filter(|l| l.path == path).count()
    }

    /// Body bytes handed to the connection for GETs of `path`.
    pub fn body_bytes_sent(&self, path: &str) -> u64 {
        let inner = self.state.lock();
        let counter = inner.sent.get(path);
        counter.map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Highest number of requests in flight at once (a request is in flight from
    /// arrival until its response body is finished or abandoned).
    pub fn max_concurrent(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Connections to a TLS origin whose handshake failed (e.g. an untrusting client).
    pub fn failed_handshakes(&self) -> usize {
        self.state.failed_handshakes.load(Ordering::SeqCst)
    }
}

/// A new test CA, and a server configuration whose certificate it issued for `localhost`
/// and `127.0.0.1`.
fn issue_certificate() -> (TestCa, ServerConfig) {
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_name = &mut ca_params.distinguished_name;
    ca_name.push(DnType::CommonName, "blobstage test CA");
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let mut params = CertificateParams::new(names).expect("server parameters");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .expect("server TLS configuration");
    (TestCa { cert_pem: ca.pem() }, config)
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Formats `t` as an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[(days % 7) as usize];
    let month = MONTHS[month as usize - 1];
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{weekday}, {day:02} {month} {year} {h:02}:{m:02}:{s:02} GMT")
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// ---- shared state -------------------------------------------------------------------

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    failed_handshakes: AtomicUsize,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Inner {
    objects: HashMap<String, Object>,
    faults: HashMap<String, Armed>,
    log: Vec<Logged>,
    sent: HashMap<String, Arc<AtomicU64>>,
    generation: u64,
}

#[derive(Clone)]
struct Object {
    body: Bytes,
    etag: String,
    last_modified: String,
}

/// An installed fault and how many GETs it has seen.
struct Armed {
    fault: Fault,
    used: usize,
    /// `Paced { total }`: when the shared link is next free.
    link: Arc<Mutex<Option<Instant>>>,
}

impl Inner {
    fn put(&mut self, path: &str, body: Bytes) {
        self.generation += 1;
        let etag = format!("\"{:016x}{:08x}\"", content_hash(&body), self.generation);
        let last_modified = http_date(SystemTime::now());
        let object = Object {
            body,
            etag,
            last_modified,
        };
        self.objects.insert(path.to_owned(), object);
    }

    fn sent_counter(&mut self, path: &str) -> Arc<AtomicU64> {
        self.sent.entry(path.to_owned()).or_default().clone()
    }

    /// Applies a due `ChangeAfter` for `path`, then retires that fault.
    fn apply_change(&mut self, path: &str) {
        let Some(armed) = self.faults.get(path) else {
            return;
        };
        let Fault::ChangeAfter { gets, new_body } = &armed.fault else {
            return;
        };
        if armed.used >= *gets {
            let new_body = new_body.clone();
            self.faults.remove(path);
            self.put(path, new_body);
        }
    }

    /// Answers decided by a fault before the object is even looked up.
    fn early_fault(&mut self, path: &str, is_get: bool) -> Option<Reply> {
        let armed = self.faults.get_mut(path)?;
        match &armed.fault {
            Fault::Redirect { location, status } => {
                Some(Reply::empty(*status).with(header::LOCATION, location))
            }
            Fault::Status {
                status,
                retry_after,
                times,
            } if is_get && armed.used < *times => {
                let reply = Reply::empty(*status);
                let reply = match retry_after {
                    Some(value) => reply.with(header::RETRY_AFTER, value),
                    None => reply,
                };
                armed.used += 1;
                Some(reply)
            }
            _ => None,
        }
    }

    /// The fault-driven adjustments for a request that reached the object.
    fn quirks(&mut self, path: &str, is_get: bool, range_start: Option<u64>) -> Quirks {
        let mut quirks = Quirks::default();
        let Some(armed) = self.faults.get_mut(path) else {
            return quirks;
        };
        let first_uses = |times: usize| is_get && armed.used < times;
        match armed.fault {
            Fault::IgnoreRange => quirks.ignore_range = true,
            Fault::WrongContentRange => quirks.wrong_range = true,
            Fault::NoValidator => quirks.no_validator = true,
            Fault::Overlong { extra } => quirks.overlong = Some(extra),
            Fault::CutBody { after, times } if first_uses(times) => {
                quirks.stop = Some((Stop::Cut, after));
            }
            Fault::Stall { after, times } if first_uses(times) => {
                quirks.stop = Some((Stop::Stall, after));
            }
            Fault::StallFrom { offset, after } if is_get && range_start >= Some(offset) => {
                quirks.stop = Some((Stop::Stall, after));
            }
            Fault::Paced { per_request, total } => {
                quirks.pace = Some(Pace {
                    per_request,
                    total: total.map(|rate| (rate, armed.link.clone())),
                    own: None,
                });
            }
            _ => {}
        }
        if is_get {
            armed.used += 1;
        }
        quirks
    }
}

/// Content fingerprint for ETags: the length plus evenly spaced 4 KiB samples, so a
/// 64 MiB put stays cheap in unoptimised test builds. ETags also carry the put
/// generation, so they differ after every put whatever this returns.
fn content_hash(body: &[u8]) -> u64 {
    const SAMPLES: usize = 16;
    const WINDOW: usize = 4096;
    let mut hasher = DefaultHasher::new();
    hasher.write_usize(body.len());
    let stride = (body.len() / SAMPLES).max(WINDOW);
    for start in (0..body.len()).step_by(stride) {
        hasher.write(&body[start..body.len().min(start + WINDOW)]);
    }
    hasher.finish()
}

// ---- serving -------------------------------------------------------------------------

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: Option<TlsAcceptor>) {
    // Owning the connection tasks here means aborting this task aborts them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve_connection(stream, state.clone(), tls.clone()));
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return serve_http(stream, state).await;
    };
    match tls.accept(stream).await {
        Ok(stream) => serve_http(stream, state).await,
        Err(_) => {
            state.failed_handshakes.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn serve_http<S>(stream: S, state: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(state.clone(), req));
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    // Errors here are client hang-ups and injected cuts; nothing to report.
    let _ = connection.await;
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Payload>, Infallible> {
    let flight = Flight::enter(state.clone());
    let mut logged = Logged::of(&req);
    let mut inner = state.lock();
    let reply = decide(&mut inner, &logged);
    let sent = inner.sent_counter(&logged.path);
    logged.status = reply.status;
    inner.log.push(logged);
    drop(inner);
    let is_head = req.method() == hyper::Method::HEAD;
    Ok(reply.into_response(is_head, Tally { sent, flight }))
}

impl Logged {
    /// The request's loggable parts; `status` is filled in once decided.
    fn of(req: &Request<Incoming>) -> Logged {
        let headers = req.headers();
        Logged {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            range: header_text(headers, header::RANGE),
            if_match: header_text(headers, header::IF_MATCH),
            if_range: header_text(headers, header::IF_RANGE),
            authorization: header_text(headers, header::AUTHORIZATION),
            accept_encoding: header_text(headers, header::ACCEPT_ENCODING),
            status: 0,
        }
    }
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    let value = headers.get(name)?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// The whole routing decision, taken under the state lock.
fn decide(inner: &mut Inner, ask: &Logged) -> Reply {
    let is_get = ask.method == "GET";
    if !is_get && ask.method != "HEAD" {
        return Reply::empty(405).with(header::ALLOW, "GET, HEAD");
    }
    inner.apply_change(&ask.path);
    if let Some(reply) = inner.early_fault(&ask.path, is_get) {
        return reply;
    }
    let Some(object) = inner.objects.get(&ask.path).cloned() else {
        return Reply::empty(404);
    };
    let range_start = ask.range.as_deref().and_then(|r| r.strip_prefix("bytes="));
    let range_start = range_start.and_then(|r| r.split('-').next()?.parse().ok());
    let quirks = inner.quirks(&ask.path, is_get, range_start);
    serve_object(&object, ask, &quirks)
}

/// How faults bend the normal answer for one request.
#[derive(Default)]
struct Quirks {
    ignore_range: bool,
    wrong_range: bool,
    no_validator: bool,
    stop: Option<(Stop, u64)>,
    overlong: Option<u64>,
    pace: Option<Pace>,
}

/// How fast a body may go: its own rate, and a rate shared with other bodies.
#[derive(Clone, Default)]
struct Pace {
    per_request: Option<u64>,
    total: Option<(u64, Arc<Mutex<Option<Instant>>>)>,
    /// When this body may send its next frame.
    own: Option<Instant>,
}

impl Pace {
    /// When a frame of `len` bytes may go: once its time on this body's schedule and on the
    /// shared one has passed (booked now).
    fn book(&mut self, len: u64, now: Instant) -> Instant {
        let span = |rate: u64| Duration::from_secs_f64(len as f64 / rate as f64);
        let mut at = now;
        if let Some(rate) = self.per_request {
            let done = self.own.unwrap_or(now).max(now) + span(rate);
            self.own = Some(done);
            at = at.max(done);
        }
        if let Some((rate, link)) = &self.total {
            let mut next = link.lock().unwrap_or_else(PoisonError::into_inner);
            let done = next.unwrap_or(now).max(now) + span(*rate);
            *next = Some(done);
            at = at.max(done);
        }
        at
    }
}

fn serve_object(object: &Object, ask: &Logged, quirks: &Quirks) -> Reply {
    let etag = (!quirks.no_validator).then_some(object.etag.as_str());
    if let Some(wanted) = &ask.if_match
        && !if_match_passes(wanted, etag)
    {
        return Reply::empty(412);
    }
    let total = object.body.len() as u64;
    let reply = match wanted_range(object, ask, quirks) {
        Wanted::Unsatisfiable => {
            Reply::empty(416).with(header::CONTENT_RANGE, format!("bytes */{total}"))
        }
        Wanted::Slice(first, last) => {
            let reply = partial(&object.body, first, last, quirks.wrong_range);
            match quirks.overlong {
                Some(extra) => reply.overlong(extra),
                None => reply,
            }
        }
        Wanted::Whole => Reply::bytes(200, object.body.clone()),
    };
    let mut reply = with_representation_headers(reply, object, quirks.no_validator);
    reply.pace = quirks.pace.clone();
    match quirks.stop {
        Some(stop) if reply.status < 300 => reply.stopping(stop),
        _ => reply,
    }
}

fn with_representation_headers(reply: Reply, object: &Object, no_validator: bool) -> Reply {
    let reply = reply
        .with(header::ACCEPT_RANGES, "bytes")
        .with(header::CONTENT_TYPE, "application/octet-stream");
    if no_validator {
        return reply;
    }
    reply
        .with(header::ETAG, &object.etag)
        .with(header::LAST_MODIFIED, &object.last_modified)
}

/// Strong comparison against a comma-separated `If-Match` list (or `*`).
fn if_match_passes(wanted: &str, etag: Option<&str>) -> bool {
    let Some(etag) = etag else {
        return false;
    };
    wanted
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == etag)
}

/// `If-Range` holds either an entity tag (strong match) or an HTTP-date (exact match).
fn if_range_passes(value: &str, object: &Object, no_validator: bool) -> bool {
    let value = value.trim();
    !no_validator && (value == object.etag || value == object.last_modified)
}

enum Wanted {
    Whole,
    Slice(u64, u64),
    Unsatisfiable,
}

fn wanted_range(object: &Object, ask: &Logged, quirks: &Quirks) -> Wanted {
    let Some(range) = &ask.range else {
        return Wanted::Whole;
    };
    let if_range_ok = ask
        .if_range
        .as_deref()
        .is_none_or(|v| if_range_passes(v, object, quirks.no_validator));
    if ask.method != "GET" || quirks.ignore_range || !if_range_ok {
        return Wanted::Whole;
    }
    parse_range(range, object.body.len() as u64)
}

/// A single `bytes=` range against `total`; anything else (multi, malformed) is `Whole`.
fn parse_range(spec: &str, total: u64) -> Wanted {
    let (unit, set) = spec.trim().split_at_checked(6).unwrap_or_default();
    if !unit.eq_ignore_ascii_case("bytes=") || set.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = set.split_once('-') else {
        return Wanted::Whole;
    };
    match (first.trim(), last.trim()) {
        ("", count) => suffix_range(count, total),
        (first, "") => bounded_range(first, None, total),
        (first, last) => bounded_range(first, Some(last), total),
    }
}

fn suffix_range(count: &str, total: u64) -> Wanted {
    match digits(count) {
        None => Wanted::Whole,
        Some(0) => Wanted::Unsatisfiable,
        Some(_) if total == 0 => Wanted::Unsatisfiable,
        Some(n) => Wanted::Slice(total - n.min(total), total - 1),
    }
}

fn bounded_range(first: &str, last: Option<&str>, total: u64) -> Wanted {
    let Some(first) = digits(first) else {
        return Wanted::Whole;
    };
    let last = match last.map(digits) {
        None => u64::MAX,
        Some(Some(last)) => last,
        Some(None) => return Wanted::Whole,
    };
    if last < first {
        Wanted::Whole
    } else if first >= total {
        Wanted::Unsatisfiable
    } else {
        Wanted::Slice(first, last.min(total - 1))
    }
}

fn digits(text: &str) -> Option<u64> {
    let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    all_digits.then(|| text.parse().ok()).flatten()
}

fn partial(body: &Bytes, first: u64, last: u64, shifted: bool) -> Reply {
    let total = body.len() as u64;
    let slice = body.slice(first as usize..=last as usize);
    let shift = u64::from(shifted);
    let range = format!("bytes {}-{}/{total}", first + shift, last + shift);
    Reply::bytes(206, slice).with(header::CONTENT_RANGE, range)
}

// ---- responses -----------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Stop {
    Cut,
    Stall,
}

/// A decided answer, before it becomes a hyper response.
struct Reply {
    status: u16,
    headers: Vec<(HeaderName, String)>,
    body: Bytes,
    declared: u64,
    stop: Option<Stop>,
    /// Sent without `Content-Length`.
    chunked: bool,
    pace: Option<Pace>,
}

impl Reply {
    fn empty(status: u16) -> Reply {
        Reply::bytes(status, Bytes::new())
    }

    fn bytes(status: u16, body: Bytes) -> Reply {
        let declared = body.len() as u64;
        Reply {
            status,
            headers: Vec::new(),
            body,
            declared,
            stop: None,
            chunked: false,
            pace: None,
        }
    }

    /// Appends `extra` bytes past what the answer announces, and sends it chunked.
    fn overlong(mut self, extra: u64) -> Reply {
        let mut body = self.body.to_vec();
        body.resize(body.len() + extra as usize, 0xee);
        self.body = Bytes::from(body);
        self.declared = self.body.len() as u64;
        self.chunked = true;
        self
    }

    fn with(mut self, name: HeaderName, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// Keeps the declared length but sends only the first `after` bytes, then `stop`s.
    fn stopping(mut self, (stop, after): (Stop, u64)) -> Reply {
        if after < self.declared {
            self.body.truncate(after as usize);
            self.stop = Some(stop);
        }
        self
    }

    fn into_response(self, is_head: bool, tally: Tally) -> Response<Payload> {
        let status = StatusCode::from_u16(self.status).expect("valid status code");
        let mut response = Response::new(Payload::new(&self, is_head, tally));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, HeaderValue::from_str(&value).expect("header value"));
        }
        if is_head {
            headers.insert(header::CONTENT_LENGTH, self.declared.into());
        }
        response
    }
}

/// Per-response bookkeeping that lives as long as the body.
struct Tally {
    sent: Arc<AtomicU64>,
    flight: Flight,
}

/// Counts a request as in flight until dropped.
struct Flight(Arc<State>);

impl Flight {
    fn enter(state: Arc<State>) -> Flight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Flight(state)
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Response body: the bytes in `FRAME`-sized frames, then an optional stall or cut.
/// Its size hint counts down from the declared length, which hyper sends as
/// `Content-Length` even when a fault means fewer bytes will follow.
struct Payload {
    data: Bytes,
    remaining: u64,
    stop: Option<Stop>,
    grace: Option<Pin<Box<Sleep>>>,
    tally: Tally,
    chunked: bool,
    pace: Option<Pace>,
    /// The wait before the next frame, when paced.
    paced: Option<Pin<Box<Sleep>>>,
}

impl Payload {
    fn new(reply: &Reply, is_head: bool, tally: Tally) -> Payload {
        let (data, remaining, stop) = if is_head {
            (Bytes::new(), 0, None)
        } else {
            (reply.body.clone(), reply.declared, reply.stop)
        };
        Payload {
            data,
            remaining,
            stop,
            grace: None,
            tally,
            chunked: reply.chunked,
            pace: reply.pace.clone(),
            paced: None,
        }
    }

    fn next_frame(&mut self) -> Frame<Bytes> {
        let chunk = self.data.split_to(self.data.len().min(FRAME));
        let sent = chunk.len() as u64;
        self.remaining -= sent;
        self.tally.sent.fetch_add(sent, Ordering::SeqCst);
        Frame::data(chunk)
    }

    /// Waits `CUT_GRACE` (so hyper flushes what was sent), then fails the body,
    /// which makes hyper drop the connection mid-message.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let grace = self
            .grace
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CUT_GRACE)));
        ready!(grace.as_mut().poll(cx));
        let error = io::Error::new(io::ErrorKind::ConnectionAborted, "origin fault: body cut");
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for Payload {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        if !this.data.is_empty() {
            if let Some(pace) = &mut this.pace {
                let wait = this.paced.get_or_insert_with(|| {
                    let len = this.data.len().min(FRAME) as u64;
                    Box::pin(tokio::time::sleep_until(pace.book(len, Instant::now())))
                });
                ready!(wait.as_mut().poll(cx));
                this.paced = None;
            }
            return Poll::Ready(Some(Ok(this.next_frame())));
        }
        match this.stop {
            None => Poll::Ready(None),
            // Never woken: the connection task stays parked until the client leaves.
            Some(Stop::Stall) => Poll::Pending,
            Some(Stop::Cut) => this.poll_cut(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.stop.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.chunked {
            true => SizeHint::default(),
            false => SizeHint::with_exact(self.remaining),
        }
    }
}
