//! `fetch` against an HTTP control plane on loopback: the registration, credentials and events
//! travel over HTTP with the node's token, and events wait in the outbox while the control
//! plane refuses them.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::agent::{Setup, artifact, pseudo_random};
use support::origin::Origin;

/// A control plane that serves registrations, answers credentials with `none`, and records
/// events and the `Authorization` header of every call; events fail while `down` is set.
#[derive(Default)]
struct Plane {
    artifacts: Mutex<Vec<Value>>,
    events: Mutex<Vec<Value>>,
    authorizations: Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
}

impl Plane {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let auth = request
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        self.authorizations
            .lock()
            .unwrap()
            .push(auth.unwrap_or_default());
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let (status, answer) = match path.strip_prefix("/v1/") {
            Some("events") if self.down.load(std::sync::atomic::Ordering::Acquire) => {
                (500, json!({}))
            }
            Some("events") => {
                let posted: Value = serde_json::from_slice(&body).unwrap();
                self.events
                    .lock()
                    .unwrap()
                    .extend(posted["events"].as_array().unwrap().clone());
                (200, json!({}))
            }
            Some(rest) if rest.ends_with("/credentials") => (200, json!({ "kind": "none" })),
            Some(rest) => {
                let id = rest.trim_start_matches("artifacts/").replace("%2F", "/");
                let found = self
                    .artifacts
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|a| a["id"] == id)
                    .cloned();
                found.map_or((404, json!({})), |a| (200, a))
            }
            None => (404, json!({})),
        };
        let body = Full::new(Bytes::from(answer.to_string()));
        Response::builder().status(status).body(body).unwrap()
    }
}

async fn start(plane: Arc<Plane>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let plane = plane.clone();
            let service = service_fn(move |r| {
                let plane = plane.clone();
                async move { Ok::<_, Infallible>(plane.answer(r).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    url
}

fn node(url: &str) -> Setup {
    let setup = Setup::new();
    let token = setup.write_file("node-token", "s3cret-node-token\n");
    let text = fs_text(&setup).replace(
        &format!("registry = '{}/registry.json'\n", setup.root().display()),
        &format!(
            "url = '{url}'\ninsecure_http = true\ntoken_file = '{}'\n",
            token.display()
        ),
    );
    setup.write_config(&text);
    setup
}

fn fs_text(setup: &Setup) -> String {
    std::fs::read_to_string(setup.config_path()).unwrap()
}

/// An origin serving a blob of `size` bytes and a control plane registering it as `team/w@1`.
async fn registered_blob(size: usize, seed: u64) -> (Origin, Arc<Plane>, Vec<u8>) {
    let origin = Origin::start().await;
    let body = pseudo_random(size, seed);
    origin.put("/w", body.clone());
    let plane = Arc::new(Plane::default());
    let registration = artifact("team/w@1", &origin.url("/w"), &body);
    plane.artifacts.lock().unwrap().push(registration);
    (origin, plane, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_resolves_and_reports_through_the_http_control_plane() {
    let (_origin, plane, body) = registered_blob(200_000, 77).await;
    let setup = node(&start(plane.clone()).await);

    let run = setup.fetch("team/w@1").await;
    assert_eq!(std::fs::read(run.staged_path()).unwrap(), body);
    let events = plane.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "staged");
    let auths = plane.authorizations.lock().unwrap().clone();
    assert!(
        auths.iter().all(|a| a == "Bearer s3cret-node-token"),
        "{auths:?}"
    );
    assert!(!run.stderr.contains("s3cret"), "{}", run.stderr);

    let unknown = setup.fetch("team/nope@1").await;
    assert_eq!(unknown.code, 1);
    assert!(
        unknown
            .last_stderr_line()
            .starts_with("error[not_registered]"),
        "{unknown:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_control_plane_refuses_wait_and_go_with_the_next_fetch() {
    let (_origin, plane, _body) = registered_blob(100_000, 78).await;
    plane.down.store(true, std::sync::atomic::Ordering::Release);
    let mut setup = node(&start(plane.clone()).await);
    setup.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "2s");

    let first = setup.fetch("team/w@1").await;
    assert_eq!(first.code, 0, "{first:#?}");
    assert!(plane.events.lock().unwrap().is_empty());

    plane
        .down
        .store(false, std::sync::atomic::Ordering::Release);
    let second = setup.fetch("team/w@1").await;
    assert_eq!(second.code, 0, "{second:#?}");
    let events = plane.events.lock().unwrap().clone();
    let outcomes: Vec<_> = events
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["staged", "already_present"]);
}
