//! `HttpControlPlane` against a real HTTP server on loopback that answers from a script and
//! records every request it sees: paths, tokens, bodies, arrival times.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_client::{
    ArtifactId, ControlPlane, ControlPlaneError, Credential, Event, HttpControlPlane, HttpOptions,
    Intent, Operation, Outcome,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

const TOKEN: &str = "SENTINEL-NODE-TOKEN";

// ---- the scripted server -----------------------------------------------------------------

/// One scripted answer. In `body`, `{auth}` stands for the `Authorization` header received.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
    hang: bool,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            hang: false,
        }
    }

    fn json(status: u16, body: Value) -> Reply {
        Reply::text(status, &body.to_string())
    }

    fn text(status: u16, body: &str) -> Reply {
        Reply {
            body: body.to_owned(),
            ..Reply::status(status)
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// Never answers.
    fn hang() -> Reply {
        Reply {
            hang: true,
            ..Reply::status(200)
        }
    }
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
    at: Instant,
}

#[derive(Default)]
struct Script {
    /// Answers in order; the last one repeats.
    replies: VecDeque<Reply>,
    seen: Vec<Seen>,
}

struct Server {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    accept: JoinHandle<()>,
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Server {
        Server::listen(replies, None).await
    }

    async fn listen(replies: Vec<Reply>, tls: Option<TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            replies: replies.into(),
            seen: Vec::new(),
        }));
        let accept = tokio::spawn(accept_loop(listener, script.clone(), tls));
        Server {
            addr,
            script,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, script: Arc<Mutex<Script>>, tls: Option<TlsAcceptor>) {
    // Aborting this task drops the set, which aborts every connection, hung ones included.
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let (script, tls) = (script.clone(), tls.clone());
        connections.spawn(async move {
            match tls {
                None => serve(stream, script).await,
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        serve(stream, script).await;
                    }
                }
            }
        });
    }
}

async fn serve<S>(stream: S, script: Arc<Mutex<Script>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| answer(script.clone(), req));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn answer(
    script: Arc<Mutex<Script>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let seen = record(req).await;
    let auth = seen.authorization.clone().unwrap_or_default();
    let reply = {
        let mut script = script.lock().unwrap();
        script.seen.push(seen);
        let reply = script.replies.front().cloned().expect("a scripted reply");
        if script.replies.len() > 1 {
            script.replies.pop_front();
        }
        reply
    };
    if reply.hang {
        std::future::pending::<()>().await;
    }
    let mut response = Response::builder().status(reply.status);
    for (name, value) in reply.headers {
        response = response.header(name, value);
    }
    let body = Bytes::from(reply.body.replace("{auth}", &auth));
    Ok(response.body(Full::new(body)).unwrap())
}

async fn record(req: Request<Incoming>) -> Seen {
    let header = |name| {
        req.headers()
            .get(name)
            .map(|v: &hyper::header::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let (authorization, content_type) = (header("authorization"), header("content-type"));
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
    Seen {
        method,
        path,
        authorization,
        content_type,
        body,
        at: Instant::now(),
    }
}

// ---- helpers ---------------------------------------------------------------------------

fn registration(id: &str) -> Value {
    json!({
        "id": id, "project": "team-a", "artifact_kind": "blob",
        "source": {"source_type": "https", "uri": "https://models.example.com/x.bin",
                   "source_ref": null, "size_bytes": 12, "content_encoding": null},
        "digest": format!("sha256:{}", "a".repeat(64)),
        "lifecycle_state": "active", "trust_state": "verified", "channel": "prod",
        "source_policy": {"decision": "allow", "policy_id": "default@7"}
    })
}

fn id() -> ArtifactId {
    ArtifactId::new("team-a/x@1").unwrap()
}

fn token_file(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("node-token");
    std::fs::write(&path, token).unwrap();
    path
}

/// Options for a loopback server, with a short timeout and the node token in `dir`.
fn options(server: &Server, dir: &Path) -> HttpOptions {
    HttpOptions::new(server.url())
        .with_insecure_http(true)
        .with_token_file(token_file(dir, &format!("{TOKEN}\n")))
        .with_timeout(Duration::from_secs(5))
}

fn plane(options: HttpOptions) -> HttpControlPlane {
    HttpControlPlane::new(options).unwrap()
}

/// An error and all its causes, as the agent prints them.
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut shown = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        shown.push_str(": ");
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    shown
}

// ---- resolve ---------------------------------------------------------------------------

#[tokio::test]
async fn resolves_a_registration_by_its_encoded_id_under_the_base_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::json(200, registration("team-a/x@1"))]).await;
    let mut options = options(&server, dir.path());
    options.url = format!("{}/cp/", server.url());
    let cp = plane(options);

    let artifact = cp.resolve(&id()).await.unwrap();

    assert_eq!(artifact.id, id());
    assert_eq!(artifact.source.size_bytes, Some(12));
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/cp/v1/artifacts/team-a%2Fx@1");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer SENTINEL-NODE-TOKEN")
    );
}

#[tokio::test]
async fn an_unknown_id_is_not_registered_and_not_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::status(404)]).await;
    let cp = plane(options(&server, dir.path()));

    let e = cp.resolve(&id()).await.unwrap_err();

    assert_eq!(e.code(), "not_registered");
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn registrations_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut unknown_trust = registration("team-a/x@1");
    unknown_trust["trust_state"] = json!("trusted-enough");
    let server = Server::start(vec![
        Reply::json(200, unknown_trust),
        Reply::json(200, registration("team-b/other@1")),
        Reply::text(200, "<html>hello</html>"),
        Reply::json(200, json!(["not", "an", "object"])),
    ])
    .await;
    let cp = plane(options(&server, dir.path()));

    let trust = cp.resolve(&id()).await.unwrap_err();
    assert_eq!(trust.code(), "invalid_registration");
    assert!(trust.to_string().contains("trusted-enough"), "{trust}");
    let other = cp.resolve(&id()).await.unwrap_err();
    assert_eq!(other.code(), "invalid_registration");
    assert!(other.to_string().contains("team-b/other@1"), "{other}");
    for _ in 0..2 {
        let garbage = cp.resolve(&id()).await.unwrap_err();
        assert!(
            matches!(garbage, ControlPlaneError::Malformed { .. }),
            "{garbage:?}"
        );
        assert_eq!(garbage.code(), "control_plane_unavailable");
    }
    assert_eq!(server.seen().len(), 4);
}

// ---- retries ---------------------------------------------------------------------------

#[tokio::test]
async fn server_errors_are_retried_until_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        Reply::status(500),
        Reply::status(503),
        Reply::json(200, registration("team-a/x@1")),
    ])
    .await;
    let cp = plane(options(&server, dir.path()));

    assert_eq!(cp.resolve(&id()).await.unwrap().id, id());
    assert_eq!(server.seen().len(), 3);
}

#[tokio::test]
async fn server_errors_that_persist_are_unavailable_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::status(502)]).await;
    let cp = plane(options(&server, dir.path()).with_max_attempts(3));

    let e = cp.resolve(&id()).await.unwrap_err();

    assert_eq!(e.code(), "control_plane_unavailable");
    let shown = chain(&e);
    assert!(
        shown.contains("resolve team-a/x@1 failed after 3 attempts"),
        "{shown}"
    );
    assert!(shown.contains("502"), "{shown}");
    assert_eq!(server.seen().len(), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        Reply::json(
            400,
            json!({"error": {"code": "bad_request", "message": "no such intent"}}),
        ),
        Reply::status(401),
        Reply::status(403),
    ])
    .await;
    let cp = plane(options(&server, dir.path()));

    let bad = cp
        .credentials(&id(), Intent::Pull, "node-a")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), "control_plane_rejected");
    assert!(bad.to_string().contains("credentials team-a/x@1"), "{bad}");
    assert!(bad.to_string().contains("no such intent"), "{bad}");
    assert_eq!(server.seen().len(), 1);

    for status in ["401", "403"] {
        let denied = cp.resolve(&id()).await.unwrap_err();
        assert_eq!(denied.code(), "control_plane_denied");
        let shown = denied.to_string();
        assert!(
            shown.contains("refused the node token for resolve team-a/x@1"),
            "{shown}"
        );
        assert!(shown.contains(status), "{shown}");
    }
    assert_eq!(server.seen().len(), 3);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        Reply::status(429).header("retry-after", "1"),
        Reply::json(200, registration("team-a/x@1")),
    ])
    .await;
    let cp = plane(options(&server, dir.path()));

    assert_eq!(cp.resolve(&id()).await.unwrap().id, id());
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
}

#[tokio::test]
async fn a_hanging_server_times_out_and_is_retried_then_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::hang()]).await;
    let options = options(&server, dir.path())
        .with_timeout(Duration::from_millis(300))
        .with_max_attempts(2);
    let cp = plane(options);

    let e = cp.resolve(&id()).await.unwrap_err();

    assert_eq!(e.code(), "control_plane_unavailable");
    match &e {
        ControlPlaneError::Unavailable { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{}", chain(&e));
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let options = HttpOptions::new(url)
        .with_insecure_http(true)
        .with_token_file(token_file(dir.path(), TOKEN))
        .with_max_attempts(2);
    let cp = plane(options);

    let e = cp.report(&[]).await.unwrap_err();

    assert_eq!(e.code(), "control_plane_unavailable");
    assert!(
        chain(&e).contains("report 0 events failed after 2 attempts"),
        "{}",
        chain(&e)
    );
}

// ---- the node token --------------------------------------------------------------------

#[tokio::test]
async fn a_rotated_token_is_sent_on_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::json(200, registration("team-a/x@1"))]).await;
    let path = token_file(dir.path(), "first-token\n");
    let options = HttpOptions::new(server.url())
        .with_insecure_http(true)
        .with_token_file(&path);
    let cp = plane(options);

    cp.resolve(&id()).await.unwrap();
    std::fs::write(&path, "  second-token-longer \n").unwrap();
    cp.resolve(&id()).await.unwrap();
    // Rotation by rename keeps the length but is a new file.
    let next = dir.path().join("node-token.new");
    std::fs::File::create(&next)
        .and_then(|mut f| f.write_all(b"second-token-LONGER"))
        .unwrap();
    std::fs::rename(&next, &path).unwrap();
    cp.resolve(&id()).await.unwrap();

    let sent: Vec<_> = server.seen().into_iter().map(|s| s.authorization).collect();
    let expected = ["first-token", "second-token-longer", "second-token-LONGER"];
    let expected: Vec<_> = expected.map(|t| Some(format!("Bearer {t}"))).into();
    assert_eq!(sent, expected);
}

#[tokio::test]
async fn a_missing_or_empty_token_file_fails_the_call_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::json(200, registration("team-a/x@1"))]).await;
    let path = dir.path().join("absent-token");
    let options = HttpOptions::new(server.url())
        .with_insecure_http(true)
        .with_token_file(&path);
    let cp = plane(options);

    let missing = cp.resolve(&id()).await.unwrap_err();
    assert_eq!(missing.code(), "control_plane_unavailable");
    assert!(
        chain(&missing).contains("absent-token"),
        "{}",
        chain(&missing)
    );
    std::fs::write(&path, " \n").unwrap();
    let empty = cp.credentials(&id(), Intent::Pull, "n").await.unwrap_err();
    assert_eq!(empty.code(), "control_plane_unavailable");
    assert!(chain(&empty).contains("empty"), "{}", chain(&empty));
    assert!(server.seen().is_empty());

    std::fs::write(&path, "now-here").unwrap();
    cp.resolve(&id()).await.unwrap();
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn the_token_shows_in_no_debug_error_or_log_line() {
    let logs = CapturedLogs::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut echoed = registration("team-a/x@1");
    echoed["trust_state"] = json!("{auth}");
    let server = Server::start(vec![
        Reply::text(401, "who is {auth}?"),
        Reply::text(400, "{auth}"),
        Reply::text(500, "{auth}"),
        Reply::json(200, echoed),
        Reply::text(200, r#"{"kind":"bearer","token":5,"x":"{auth}"}"#),
        Reply::text(422, &format!("{}{{auth}}", "x".repeat(190))),
    ])
    .await;
    let cp = plane(options(&server, dir.path()).with_max_attempts(2));

    let mut errors = vec![
        cp.resolve(&id()).await.unwrap_err(),
        cp.report(&[]).await.unwrap_err(),
        cp.resolve(&id()).await.unwrap_err(),
        cp.credentials(&id(), Intent::Pull, "n").await.unwrap_err(),
        cp.credentials(&id(), Intent::Pull, "n").await.unwrap_err(),
    ];
    std::fs::remove_file(dir.path().join("node-token")).unwrap();
    errors.push(cp.resolve(&id()).await.unwrap_err());

    let codes: Vec<_> = errors.iter().map(|e| e.code()).collect();
    let expected = [
        "control_plane_denied",
        "control_plane_rejected",
        "invalid_registration",
        "control_plane_unavailable",
        "control_plane_rejected",
        "control_plane_unavailable",
    ];
    assert_eq!(codes, expected);
    assert_eq!(
        server.seen().len(),
        6,
        "the 500 was retried once, nothing else"
    );
    assert!(
        server
            .seen()
            .iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer SENTINEL-NODE-TOKEN"))
    );
    for e in &errors {
        let shown = format!("{} {e:?} {e:#?}", chain(e));
        assert!(!shown.contains("SENTINEL"), "{shown}");
    }
    let shown = format!("{cp:?} {cp:#?}");
    assert!(
        !shown.contains("SENTINEL") && shown.contains("node-token"),
        "{shown}"
    );
    let logged = logs.text();
    assert!(logged.contains("attempt 1 of 2"), "{logged}");
    assert!(!logged.contains("SENTINEL"), "{logged}");
}

#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// ---- credentials and events ------------------------------------------------------------

#[tokio::test]
async fn credentials_are_asked_for_with_intent_and_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        Reply::json(200, json!({"kind": "bearer", "token": "SENTINEL-CRED"})),
        Reply::json(200, json!({"kind": "password", "secret": "SENTINEL-CRED"})),
    ])
    .await;
    let cp = plane(options(&server, dir.path()));

    let credential = cp.credentials(&id(), Intent::Pull, "node-a").await.unwrap();
    assert!(matches!(credential, Credential::Bearer { ref token, .. } if token == "SENTINEL-CRED"));
    let seen = &server.seen()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/artifacts/team-a%2Fx@1/credentials");
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body, json!({"intent": "pull", "node_id": "node-a"}));

    let unknown = cp
        .credentials(&id(), Intent::Pull, "node-a")
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, ControlPlaneError::Malformed { .. }),
        "{unknown:?}"
    );
    assert!(!chain(&unknown).contains("SENTINEL"), "{}", chain(&unknown));
}

#[tokio::test]
async fn events_are_posted_as_serialized() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(vec![Reply::status(202)]).await;
    let cp = plane(options(&server, dir.path()));
    let mut staged = Event::new("node-a", Operation::PullBlob, Outcome::Staged);
    staged.artifact_id = Some(id());
    staged.bytes_transferred = 12;
    let verified = Event::new("node-a", Operation::Verify, Outcome::Verified);
    let events = [staged, verified];

    cp.report(&events).await.unwrap();

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("POST", "/v1/events")
    );
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    let expected: Vec<Value> = events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(body, json!({ "events": expected }));
}

/// A 2xx that is not JSON (an HTML page from a proxy) did not take the events; an empty 2xx
/// or any JSON did.
#[tokio::test]
async fn events_answered_with_a_page_that_is_not_json_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let replies = vec![
        Reply::text(200, "<html>captive portal</html>"),
        Reply::status(204),
        Reply::json(200, json!({"accepted": 1})),
    ];
    let server = Server::start(replies).await;
    let cp = plane(options(&server, dir.path()));
    let events = [Event::new("node-a", Operation::Verify, Outcome::Verified)];

    let refused = cp.report(&events).await.unwrap_err();
    assert_eq!(refused.code(), "control_plane_unavailable", "{refused}");
    cp.report(&events).await.unwrap();
    cp.report(&events).await.unwrap();
    assert_eq!(server.seen().len(), 3);
}

// ---- TLS -------------------------------------------------------------------------------

#[tokio::test]
async fn https_with_a_private_ca_needs_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, acceptor) = tls_server_config();
    let replies = vec![Reply::json(200, registration("team-a/x@1"))];
    let server = Server::listen(replies, Some(acceptor)).await;
    let url = format!("https://{}", server.addr);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();

    let trusting = plane(HttpOptions::new(&url).with_ca_file(&ca_file));
    assert_eq!(trusting.resolve(&id()).await.unwrap().id, id());

    let stranger = plane(HttpOptions::new(&url).with_max_attempts(1));
    let e = stranger.resolve(&id()).await.unwrap_err();
    assert_eq!(e.code(), "control_plane_unavailable");
    assert_eq!(
        server.seen().len(),
        1,
        "the untrusted handshake sent no request"
    );
}

/// A new CA, and an acceptor whose certificate it issued for 127.0.0.1.
fn tls_server_config() -> (String, TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    (ca.pem(), TlsAcceptor::from(Arc::new(config)))
}
