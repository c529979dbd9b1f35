//! The agent against an HTTP control plane on loopback (`support::plane`): registrations,
//! credentials and events travel over HTTP with the node's token; events wait in the outbox
//! while the control plane cannot take them and arrive once each by id; credentials are asked
//! once for all ranges, and again only when the origin refuses them; a control plane that
//! answers another digest for a known id is refused, and that refusal is reported.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Setup, artifact, pseudo_random};
use support::daemon::{Daemon, Node};
use support::origin::{Fault, Origin};
use support::plane::{Mode, Plane};

const TOKEN: &str = "s3cret-node-token";

/// An origin serving `size` bytes at `/w`, and a control plane registering them as `team/w@1`.
async fn registered_blob(size: usize, seed: u64) -> (Origin, Plane, Vec<u8>) {
    let origin = Origin::start().await;
    let body = pseudo_random(size, seed);
    origin.put("/w", body.clone());
    let plane = Plane::start().await;
    plane.register(artifact("team/w@1", &origin.url("/w"), &body));
    (origin, plane, body)
}

fn node(plane: &Plane) -> Setup {
    let setup = Setup::new();
    plane.configure(&setup, TOKEN);
    setup
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pull(daemon: &Daemon, id: &str) -> Value {
    let (status, pull) = daemon
        .request("POST", "/v1/pulls", Some(&json!({ "artifact_id": id })))
        .await;
    if status >= 400 {
        return pull;
    }
    let pull_id = pull["id"].as_str().unwrap();
    let (_, pull) = daemon
        .request("GET", &format!("/v1/pulls/{pull_id}?wait=30s"), None)
        .await;
    pull
}

fn assert_once_each(events: &[Value]) {
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "an event id arrived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_resolves_and_reports_through_the_http_control_plane() {
    let (_origin, plane, body) = registered_blob(200_000, 77).await;
    let setup = node(&plane);

    let run = setup.fetch("team/w@1").await;
    assert_eq!(std::fs::read(run.staged_path()).unwrap(), body);
    let events = plane.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "staged");
    let auths = plane.authorizations();
    assert!(
        auths.iter().all(|a| a == &format!("Bearer {TOKEN}")),
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
    plane.set_mode(Mode::Error, true);
    let mut setup = node(&plane);
    setup.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "2s");

    let first = setup.fetch("team/w@1").await;
    assert_eq!(first.code, 0, "{first:#?}");
    assert!(plane.events().is_empty());

    plane.set_mode(Mode::Up, false);
    let second = setup.fetch("team/w@1").await;
    assert_eq!(second.code, 0, "{second:#?}");
    let events = plane.events();
    let outcomes: Vec<_> = events
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["staged", "already_present"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pulls_during_an_outage_report_every_event_once_when_it_ends() {
    let origin = Origin::start().await;
    let plane = Plane::start().await;
    let mut node = Node::new();
    plane.configure(&node.setup, TOKEN);
    node.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "1s");
    for i in 0..20 {
        let body = pseudo_random(40_000, 500 + i);
        origin.put(&format!("/o{i}"), body.clone());
        plane.register(artifact(
            &format!("t/o{i}@1"),
            &origin.url(&format!("/o{i}")),
            &body,
        ));
    }
    let daemon = node.start().await;

    // Registrations and credentials answer; only the events cannot be delivered, in turn as
    // 500s, 429s and garbage.
    for (i, mode) in (0..20).zip([Mode::Error, Mode::Busy, Mode::Garbage].iter().cycle()) {
        plane.set_mode(*mode, true);
        let staged = pull(&daemon, &format!("t/o{i}@1")).await;
        assert_eq!(staged["state"], "staged", "{staged:#}");
    }
    assert!(plane.events().is_empty());

    plane.set_mode(Mode::Up, false);
    wait_for("the outbox drains", || plane.events().len() >= 20).await;
    let events = plane.events();
    assert_once_each(&events);
    assert_eq!(events.len(), 20, "{events:#?}");
    assert!(events.iter().all(|e| e["outcome"] == "staged"));
    // The control plane deduplicates, but the node sends each event once when nothing is
    // lost in between.
    assert_eq!(plane.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_ranges_share_one_credential_and_a_refusal_refreshes_it_once() {
    // 32 ranges of 64 KiB on 16 connections.
    let (origin, plane, body) = registered_blob(32 * 64 * 1024, 79).await;
    let token = json!({"kind": "bearer", "token": "origin-token"});
    plane.issue("team/w@1", token, Some(Duration::from_secs(3600)));
    let mut setup = node(&plane);
    setup.env("BLOBSTAGE_TRANSFER_CONNECTIONS_PER_BLOB", "16");

    let run = setup.fetch("team/w@1").await;
    assert_eq!(std::fs::read(run.staged_path()).unwrap(), body);
    assert_eq!(plane.issued("team/w@1"), 1);
    let requests = origin.requests();
    assert!(requests.len() > 16, "{}", requests.len());
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer origin-token")),
        "{requests:#?}"
    );

    // A second process asks once for itself; the origin refuses that token once, so it asks
    // once more and the request is retried.
    std::fs::remove_dir_all(setup.state_dir().join("blobs")).unwrap();
    origin.set_fault(
        "/w",
        Fault::Status {
            status: 401,
            retry_after: None,
            times: 1,
        },
    );
    let again = setup.fetch("team/w@1").await;
    assert_eq!(std::fs::read(again.staged_path()).unwrap(), body);
    assert_eq!(plane.issued("team/w@1"), 3);
    let refused: Vec<_> = origin
        .requests()
        .into_iter()
        .filter(|r| r.status == 401)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_digest_for_a_known_id_is_refused_and_reported() {
    let (origin, plane, body) = registered_blob(50_000, 80).await;
    let mut node = Node::new();
    plane.configure(&node.setup, TOKEN);
    node.env("BLOBSTAGE_CONTROL_PLANE_CACHE_TTL", "0s");
    let daemon = node.start().await;

    let staged = pull(&daemon, "team/w@1").await;
    assert_eq!(staged["state"], "staged", "{staged:#}");

    // The same id now answers another digest (and another object behind it).
    let other = pseudo_random(50_000, 81);
    origin.put("/w", other.clone());
    plane.register(artifact("team/w@1", &origin.url("/w"), &other));
    let refused = pull(&daemon, "team/w@1").await;
    assert_eq!(
        refused["error"]["code"], "registration_changed",
        "{refused:#}"
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&support::agent::sha256_hex(&body)),
        "{message}"
    );

    wait_for("both events arrive", || plane.events().len() >= 2).await;
    let events = plane.events();
    assert_eq!(events[1]["outcome"], "refused", "{events:#?}");
    assert_eq!(events[1]["error_code"], "registration_changed");
    assert_eq!(
        node.setup.blobs().len(),
        1,
        "nothing of the new answer is staged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_control_plane_fails_the_fetch_with_a_clear_code() {
    let (_origin, plane, _body) = registered_blob(10_000, 82).await;
    plane.set_mode(Mode::Hang, false);
    let mut setup = node(&plane);
    setup.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "1s");

    let run = setup.fetch("team/w@1").await;
    run.error("control_plane_unavailable");
    assert!(setup.blobs().is_empty());
}

/// A control plane that answers 200 with a body that is not JSON: the pull fails with a clear
/// code and stages nothing; the daemon serves the next pull once the control plane is sound
/// again, and the failed pull's event arrives beside the staged one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_answering_garbage_fails_the_pull_and_the_daemon_goes_on() {
    let (_origin, plane, body) = registered_blob(50_000, 83).await;
    let mut node = Node::new();
    plane.configure(&node.setup, TOKEN);
    node.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "1s");
    let daemon = node.start().await;

    plane.set_mode(Mode::Garbage, false);
    let failed = pull(&daemon, "team/w@1").await;
    assert_eq!(
        failed["error"]["code"], "control_plane_unavailable",
        "{failed:#}"
    );
    assert!(node.setup.blobs().is_empty());

    plane.set_mode(Mode::Up, false);
    let staged = pull(&daemon, "team/w@1").await;
    assert_eq!(staged["state"], "staged", "{staged:#}");
    let path = staged["path"].as_str().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
    wait_for("both events arrive", || plane.events().len() >= 2).await;
    let events = plane.events();
    assert_once_each(&events);
    let outcomes: Vec<&str> = events
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.contains(&"staged"), "{events:#?}");
    let failure = events
        .iter()
        .find(|e| e["outcome"] != "staged")
        .expect("the failed pull's event");
    assert_eq!(
        failure["error_code"], "control_plane_unavailable",
        "{failure:#}"
    );
}
