//! Credentials of the object-store sources, against the real servers: s3s-fs, which checks SigV4
//! signatures (a wrong secret really fails), and azurite, which checks SAS signatures and their
//! expiry (a stale SAS really fails). Credentials come from the loopback control plane
//! (`support::plane`), which counts every issue.
//!
//! s3s-fs knows nothing of session expiry, so its tests put a gate in front of it that refuses,
//! as AWS does (403 `ExpiredToken`), a request whose session token has expired; the tokens the
//! control plane issues carry their expiry. Transfers are slowed by relays that hold every
//! request, so that they outlive the credentials they start with. Also here: a control plane
//! that refuses to issue credentials, a credential of the wrong kind, public objects read
//! unsigned with `{"kind": "none"}`, and sentinel tests that no secret (an S3 secret key and
//! session token, an Azure SAS, a GCS bearer token) leaves the agent, `fetch` or the daemon
//! (its log, `/metrics`, API answers, events and files).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::agent::{CHUNK, Setup, files_containing, pseudo_random};
use support::cloud::{
    Azurite, BUCKET, Backend, FakeGcs, S3s, account_sas, key, node, node_with, registration,
};
use support::daemon::{Node, tcp_get};
use support::front::{Front, FrontOptions, Judge};
use support::plane::Plane;

const ID: &str = "t/blob@1";
const NODE_TOKEN: &str = "node-token";

/// 60 ranges and a short last one: with two connections and every request held 100 ms, the
/// transfer takes 3 s at the very least.
const SIZE: usize = 60 * CHUNK as usize + 999;
const HELD: Duration = Duration::from_millis(100);

fn unix_millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// The value of header `name` in a request head.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim())
    })
}

/// Refuses, like AWS, a request whose session token (`...-<expiry in unix ms>`) has expired.
fn expired_token_gate() -> Judge {
    Judge(Arc::new(|head: &str| {
        let token = header(head, "x-amz-security-token")?;
        let expiry: u128 = token.rsplit('-').next()?.parse().ok()?;
        let body = "<Error><Code>ExpiredToken</Code></Error>";
        (expiry <= unix_millis(SystemTime::now())).then(|| {
            format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        })
    }))
}

async fn relay(backend: &impl Backend, judge: Option<Judge>) -> (Front, SocketAddr) {
    let options = FrontOptions {
        delay: HELD,
        judge,
        ..FrontOptions::default()
    };
    let front = Front::start(backend.addr(), options).await;
    let addr = front.url("").trim_start_matches("http://").parse().unwrap();
    (front, addr)
}

/// A node on `plane` that reaches `backend` at `addr`, with `body` stored and registered.
async fn registered(plane: &Plane, backend: &impl Backend, addr: SocketAddr, body: &[u8]) -> Setup {
    let key = key("credentials");
    backend.put(&key, body).await;
    let setup = node(backend, addr, BUCKET, 2);
    plane.configure(&setup, NODE_TOKEN);
    plane.register(registration(backend, addr, &key, body));
    setup
}

/// Fetches and checks the staged bytes; returns how long the fetch took.
async fn fetch_and_verify(setup: &Setup, body: &[u8]) -> Duration {
    let started = Instant::now();
    let run = setup.fetch(ID).await;
    assert_eq!(std::fs::read(run.staged_path()).unwrap(), body);
    started.elapsed()
}

/// At most one issue per `lifetime` of the fetch, plus the first and one spare: a refresh is
/// per expiry, never per range.
fn assert_once_per_expiry(issued: usize, elapsed: Duration, lifetime: Duration) {
    let bound = 2 + (elapsed.as_secs_f64() / lifetime.as_secs_f64()).ceil() as usize;
    let ranges = SIZE.div_ceil(CHUNK as usize);
    eprintln!("{issued} credentials issued in {elapsed:?} for {ranges} ranges");
    assert!(
        issued >= 2,
        "the transfer outlived its first credential without a refresh"
    );
    assert!(
        issued <= bound && issued < ranges / 4,
        "{issued} issues in {elapsed:?} for {ranges} ranges"
    );
}

/// s3s-fs behind the gate that refuses expired session tokens, a node on the loopback control
/// plane with `SIZE` bytes registered, and session tokens of `lifetime` issued for them.
struct Gated {
    s3: S3s,
    front: Front,
    plane: Plane,
    setup: Setup,
    body: Vec<u8>,
}

async fn gated(seed: u64, lifetime: Duration) -> Option<Gated> {
    let s3 = S3s::start().await?;
    let (front, addr) = relay(&s3, Some(expired_token_gate())).await;
    let plane = Plane::start().await;
    let body = pseudo_random(SIZE, seed);
    let setup = registered(&plane, &s3, addr, &body).await;
    plane.issue_with(ID, lifetime, session_tokens(&s3));
    Some(Gated {
        s3,
        front,
        plane,
        setup,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_of_two_seconds_are_refreshed_ahead_once_per_expiry() {
    let lifetime = Duration::from_secs(2);
    let Some(Gated {
        front,
        plane,
        setup,
        body,
        ..
    }) = gated(41, lifetime).await
    else {
        return;
    };

    let elapsed = fetch_and_verify(&setup, &body).await;
    // Refreshed a quarter of the lifetime ahead of expiry: every 1.5 s.
    assert_once_per_expiry(plane.issued(ID), elapsed, lifetime * 3 / 4);
    let refused = front.seen().iter().filter(|s| s.refused).count();
    assert!(
        refused <= 2,
        "{refused} requests went out with an expired token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sas_azurite_expires_mid_transfer_is_refreshed_once_for_all_ranges() {
    let Some(azurite) = Azurite::start().await else {
        return;
    };
    let (_front, addr) = relay(&azurite, None).await;
    let plane = Plane::start().await;
    let body = pseudo_random(SIZE, 42);
    let setup = registered(&plane, &azurite, addr, &body).await;
    // The control plane says an hour, so the node does not refresh ahead; the SAS itself ends
    // within two seconds, and azurite refuses it from then on.
    plane.issue_with(
        ID,
        Duration::from_secs(3600),
        Arc::new(|_, _| {
            let sas = account_sas("r", SystemTime::now() + Duration::from_secs(2));
            json!({"kind": "azure_sas", "sas": sas})
        }),
    );

    let elapsed = fetch_and_verify(&setup, &body).await;
    // Each SAS lives at least one second (its expiry is in whole seconds).
    assert_once_per_expiry(plane.issued(ID), elapsed, Duration::from_secs(1));
}

/// Short-lived S3 session credentials for the s3s-fs at `s3`, each token carrying its expiry.
fn session_tokens(s3: &S3s) -> support::plane::Issuer {
    let (key, secret) = (s3.0.access_key().to_owned(), s3.0.secret_key().to_owned());
    Arc::new(move |n, expires| {
        let token = format!("session-{n}-{}", unix_millis(expires));
        json!({"kind": "aws", "access_key_id": key, "secret_access_key": secret,
               "session_token": token})
    })
}

/// The credential expires mid-transfer and the control plane refuses to renew it: the pull
/// fails with the control plane's code (the refresh ahead of the expiry failed quietly first,
/// and the credential was used until it really expired), keeps what it wrote, reports its
/// event, exposes no blob; once the control plane issues again, the next pull resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_expire_mid_transfer_and_are_not_renewed_fail_cleanly_then_resume() {
    let lifetime = Duration::from_secs(2);
    let Some(Gated {
        s3,
        front,
        plane,
        setup,
        body,
    }) = gated(46, lifetime).await
    else {
        return;
    };
    plane.refuse_credentials_after(ID, 1, 403);

    let started = Instant::now();
    let run = setup.fetch(ID).await;
    run.error("control_plane_denied");
    // The held credential was used to its expiry, not dropped at the failed refresh ahead.
    assert!(started.elapsed() >= lifetime, "{:?}", started.elapsed());
    assert!(
        run.stderr
            .contains("cannot refresh credentials ahead of their expiry"),
        "{}",
        run.stderr
    );
    assert!(setup.blobs().is_empty(), "{:?}", setup.blobs());
    let events = plane.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "failed");
    assert_eq!(events[0]["error_code"], "control_plane_denied");
    let relayed = front.seen().iter().filter(|s| !s.refused).count();
    assert!(relayed > 2, "nothing was transferred before the expiry");

    plane.issue_with(ID, Duration::from_secs(3600), session_tokens(&s3));
    let run = setup.fetch_with(&["--json", ID]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let json: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(json["bytes_resumed"].as_u64().unwrap() > 0, "{json:#}");
    let path = json["path"].as_str().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(plane.events().len(), 2);
}

/// s3s-fs with a secret that is right from the issue `right_from` on.
async fn s3_with_secret(right_from: usize) -> Option<(Plane, Setup, Vec<u8>)> {
    let s3 = S3s::start().await?;
    let plane = Plane::start().await;
    let body = pseudo_random(300_000, 43);
    let setup = registered(&plane, &s3, s3.addr(), &body).await;
    let (key, secret) = (s3.0.access_key().to_owned(), s3.0.secret_key().to_owned());
    plane.issue_with(
        ID,
        Duration::from_secs(3600),
        Arc::new(move |n, _| {
            let secret = if n >= right_from {
                secret.clone()
            } else {
                format!("wrong-{n}")
            };
            json!({"kind": "aws", "access_key_id": key, "secret_access_key": secret})
        }),
    );
    Some((plane, setup, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_s3s_fs_refuses_is_refreshed_once_and_the_request_retried() {
    let Some((plane, setup, body)) = s3_with_secret(1).await else {
        return;
    };
    fetch_and_verify(&setup, &body).await;
    assert_eq!(plane.issued(ID), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_stays_wrong_fails_after_one_refresh() {
    let Some((plane, setup, _)) = s3_with_secret(usize::MAX).await else {
        return;
    };
    let run = setup.fetch(ID).await;
    run.error("source_denied");
    assert_eq!(plane.issued(ID), 2);
    assert!(setup.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_control_plane_refuses_stop_the_pull_before_any_request() {
    let Some(s3) = S3s::start().await else { return };
    let (front, addr) = relay(&s3, None).await;
    let plane = Plane::start().await;
    let setup = registered(&plane, &s3, addr, &pseudo_random(1000, 44)).await;
    plane.refuse_credentials(ID, 403);

    let run = setup.fetch(ID).await;
    let line = run.last_stderr_line().to_owned();
    eprintln!("{line}");
    assert!(line.starts_with("error[control_plane_"), "{run:#?}");
    assert!(front.seen().is_empty(), "{:?}", front.seen());
    let events = plane.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_credential_kind_is_refused_before_any_request() {
    let Some(s3) = S3s::start().await else { return };
    let (front, addr) = relay(&s3, None).await;
    let key = key("wrong-kind");
    let body = pseudo_random(1000, 45);
    s3.put(&key, &body).await;
    let setup = node(&s3, addr, BUCKET, 2);
    let mut registered = registration(&s3, addr, &key, &body);
    registered["credential"] = json!({"kind": "bearer", "token": "for-another-store"});
    setup.register(&[registered]);

    let run = setup.fetch(ID).await;
    run.error("wrong_credential_kind");
    run.assert_event("refused", Some("wrong_credential_kind"));
    assert!(front.seen().is_empty(), "{:?}", front.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_objects_are_read_unsigned_and_private_ones_are_not() {
    let Some(azurite) = Azurite::start().await else {
        return;
    };
    azurite.create_container("public-blobs", true).await;
    let (key, body) = (key("public"), pseudo_random(200_000, 46));
    azurite.put_in("public-blobs", &key, &body).await;
    azurite.put(&key, &body).await;
    let none = json!({"kind": "none"});

    let public = node(&azurite, azurite.addr(), "public-blobs", 2);
    let mut open = registration(&azurite, azurite.addr(), &key, &body);
    open["source"]["uri"] = format!("az://public-blobs/{key}").into();
    open["credential"] = none.clone();
    public.register(&[open]);
    assert_eq!(
        std::fs::read(public.fetch(ID).await.staged_path()).unwrap(),
        body
    );

    // The same blob in the private container: unsigned requests are refused.
    let private = node(&azurite, azurite.addr(), BUCKET, 2);
    let mut closed = registration(&azurite, azurite.addr(), &key, &body);
    closed["credential"] = none;
    private.register(&[closed]);
    let run = private.fetch(ID).await;
    let line = run.last_stderr_line();
    let refused = ["error[source_denied]", "error[source_not_found]"];
    assert!(refused.iter().any(|c| line.starts_with(c)), "{run:#?}");
    assert!(private.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_key_session_token_sas_or_bearer_leaves_the_agent() {
    let (Some(s3), Some(azurite), Some(gcs)) = (
        S3s::start().await,
        Azurite::start().await,
        FakeGcs::start().await,
    ) else {
        return;
    };
    let token = "SENTINEL-session-token-93c1";
    let bearer = "SENTINEL-gcs-bearer-5d0f";
    let secret = s3.0.secret_key().to_owned();
    assert!(
        secret.contains("SENTINEL"),
        "the s3s-fs script sets a sentinel secret"
    );
    let body = pseudo_random(300_000, 47);
    let (found, missing) = (key("secret-ok"), key("secret-missing"));
    s3.put(&found, &body).await;
    azurite.put(&found, &body).await;
    gcs.put(&found, &body).await;

    let all = s3.config(s3.addr(), BUCKET)
        + &azurite.config(azurite.addr(), BUCKET)
        + &gcs.config(gcs.addr(), BUCKET);
    let mut setup = node_with(&all, 2);
    setup.env("BLOBSTAGE_LOG", "trace");
    let with = |id: &str, backend: &dyn Fn(&str) -> Value, key: &str, credential: &Value| {
        let mut r = backend(key);
        r["id"] = id.into();
        r["credential"] = credential.clone();
        r
    };
    let s3_credential = s3.0.credential_with(&secret, token);
    let sas = account_sas("rl", SystemTime::now() + Duration::from_secs(3600));
    let sig = sas.rsplit("sig=").next().unwrap().to_owned();
    let decoded_sig = sig
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=");
    let sas_credential = json!({"kind": "azure_sas", "sas": sas,
        "expires_at": support::cloud::rfc3339_in(Duration::from_secs(3600))});
    let on_s3 = |k: &str| registration(&s3, s3.addr(), k, &body);
    let on_azure = |k: &str| registration(&azurite, azurite.addr(), k, &body);
    let on_gcs = |k: &str| registration(&gcs, gcs.addr(), k, &body);
    let bearer_credential = json!({"kind": "bearer", "token": bearer});
    setup.register(&[
        with("t/s3-ok@1", &on_s3, &found, &s3_credential),
        with("t/s3-missing@1", &on_s3, &missing, &s3_credential),
        with("t/az-ok@1", &on_azure, &found, &sas_credential),
        with("t/az-missing@1", &on_azure, &missing, &sas_credential),
        with("t/gcs-ok@1", &on_gcs, &found, &bearer_credential),
        with("t/gcs-missing@1", &on_gcs, &missing, &bearer_credential),
    ]);

    let mut runs = Vec::new();
    for id in ["t/s3-ok@1", "t/az-ok@1", "t/gcs-ok@1"] {
        let run = setup.fetch(id).await;
        run.staged_path();
        std::fs::remove_dir_all(setup.state_dir().join("blobs")).unwrap();
        runs.push(run);
    }
    for id in ["t/s3-missing@1", "t/az-missing@1", "t/gcs-missing@1"] {
        let run = setup.fetch_with(&["--json", id]).await;
        run.error("source_not_found");
        runs.push(run);
    }
    assert!(
        runs[0].stderr.lines().count() > 10,
        "TRACE logging was not on"
    );
    for needle in [secret.as_str(), token, &sig, &decoded_sig, bearer] {
        for run in &runs {
            assert!(
                !run.stderr.contains(needle),
                "{needle} in stderr:\n{}",
                run.stderr
            );
            assert!(!run.stdout.contains(needle), "{needle} in stdout");
        }
        let events = std::fs::read_to_string(setup.events_path()).unwrap();
        assert!(!events.contains(needle), "{needle} in an event");
        assert_eq!(
            files_containing(&setup.state_dir(), needle),
            Vec::<String>::new()
        );
    }
}

/// The daemon as well: after an s3 pull signed with a sentinel secret and session token, and
/// one refused for a missing object, neither secret is in its TRACE log, in a `/metrics`
/// scrape, in an API answer, in an event or in any file under the state dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_daemon_log_metrics_or_api() {
    let Some(s3) = S3s::start().await else {
        return;
    };
    let token = "SENTINEL-daemon-session-7a2e";
    let secret = s3.0.secret_key().to_owned();
    let body = pseudo_random(300_000, 48);
    let (found, missing) = (key("daemon-secret-ok"), key("daemon-secret-missing"));
    s3.put(&found, &body).await;

    let mut node = Node::new();
    let config = std::fs::read_to_string(node.setup.config_path()).unwrap();
    node.setup
        .write_config(&format!("{config}\n{}", s3.config(s3.addr(), BUCKET)));
    node.env("BLOBSTAGE_LOG", "trace");
    let credential = s3.0.credential_with(&secret, token);
    // Other bytes for the missing object: the same digest would be answered from the store.
    let other = pseudo_random(300_000, 49);
    let registered = |id: &str, key: &str, body: &[u8]| {
        let mut r = registration(&s3, s3.addr(), key, body);
        r["id"] = id.into();
        r["credential"] = credential.clone();
        r
    };
    node.setup.register(&[
        registered("t/ok@1", &found, &body),
        registered("t/missing@1", &missing, &other),
    ]);
    let daemon = node.start().await;

    let mut answers = Vec::new();
    for (id, state) in [("t/ok@1", "staged"), ("t/missing@1", "failed")] {
        let (status, pull) = daemon
            .request("POST", "/v1/pulls", Some(&json!({"artifact_id": id})))
            .await;
        assert_eq!(status, 202, "{pull}");
        let target = format!("/v1/pulls/{}?wait=30s", pull["id"].as_str().unwrap());
        let (_, done) = daemon.request("GET", &target, None).await;
        assert_eq!(done["state"], state, "{done}");
        answers.push(done.to_string());
    }
    let metrics_addr = daemon.metrics_addr().await.expect("the metrics listener");
    let scrape = tcp_get(metrics_addr, "/metrics").await.text();
    assert!(scrape.contains("blobstage_pulls_total"), "{scrape}");
    let log = daemon.output();
    assert!(log.contains("TRACE"), "TRACE logging was not on");

    for needle in [secret.as_str(), token] {
        assert!(
            !log.contains(needle),
            "{needle} in the daemon's log:\n{log}"
        );
        assert!(!scrape.contains(needle), "{needle} in /metrics");
        assert!(
            answers.iter().all(|a| !a.contains(needle)),
            "{needle} in an answer"
        );
        let events = std::fs::read_to_string(node.setup.events_path()).unwrap_or_default();
        assert!(!events.contains(needle), "{needle} in an event");
        assert_eq!(
            files_containing(&node.setup.state_dir(), needle),
            Vec::<String>::new()
        );
    }
}
