//! End-to-end tests of the daemon: the real `blobstage serve` (`support::daemon`) on a
//! throwaway node, a loopback origin with fault knobs (`support::origin`), and raw HTTP/1.1
//! over the Unix socket. Each test holds the daemon to `docs/local-api.md` and the contract's
//! "Local API" section: statuses and error codes, the pull object and its states, joining of
//! concurrent pulls (checked through the origin's request log), long-polls, cancellation and
//! SIGTERM that keep partial data for a resume (checked through the origin's byte counter),
//! peer checks, the client commands, and one event per pull in the events log.
//!
//! The transfer runs with 64 KiB ranges over 4 connections and a 1 s read timeout, so a
//! `Stall` fault makes a small transfer last about a second; tests that freeze a transfer set a
//! 60 s read timeout so that it stays frozen until the test acts.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use support::agent::{CHUNK, artifact, parse_range, pseudo_random, sha256_hex};
use support::daemon::{Daemon, Node, parse_metrics_addr, parse_response, tcp_get};
use support::origin::{Fault, Logged, Origin};

/// About 300 KiB: five 64 KiB ranges, the last one short.
const SIZE: usize = 300 * 1024 + 123;

/// A blob of ten and a bit ranges, for the tests that freeze a transfer part-way.
const FROZEN_SIZE: usize = 10 * CHUNK as usize + 777;

/// Every state a pull may be in, and the terminal ones.
const STATES: &[&str] = &[
    "queued",
    "resolving",
    "transferring",
    "verifying",
    "staged",
    "failed",
    "cancelled",
];
const TERMINAL: &[&str] = &["staged", "failed", "cancelled"];

/// The documented limit of a request body.
const BODY_LIMIT: usize = 64 * 1024;

// ---- helpers -----------------------------------------------------------------------------

/// Serves `body` at `/<name>` and returns its registration as `t/<name>@1`.
fn publish(origin: &Origin, name: &str, body: &[u8]) -> Value {
    let path = format!("/{name}");
    origin.put(&path, body.to_vec());
    artifact(&format!("t/{name}@1"), &origin.url(&path), body)
}

async fn post_pull(daemon: &Daemon, artifact_id: &str) -> (u16, Value) {
    let body = json!({ "artifact_id": artifact_id });
    daemon.request("POST", "/v1/pulls", Some(&body)).await
}

/// `POST /v1/pulls` that must create or join a pull (202); returns the pull.
async fn start_pull(daemon: &Daemon, artifact_id: &str) -> Value {
    let (status, pull) = post_pull(daemon, artifact_id).await;
    assert_eq!(status, 202, "POST /v1/pulls {artifact_id}: {pull:#}");
    assert_pull_shape(&pull);
    assert_eq!(pull["artifact_id"], artifact_id, "{pull:#}");
    pull
}

fn pull_id(pull: &Value) -> String {
    pull["id"].as_str().expect("a pull id").to_owned()
}

fn state(pull: &Value) -> &str {
    pull["state"].as_str().unwrap_or("<no state>")
}

/// Long-polls `GET /v1/pulls/{id}?wait=10s` until the pull is terminal (at most a minute).
async fn wait_terminal(daemon: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, pull) = daemon
            .request("GET", &format!("/v1/pulls/{id}?wait=10s"), None)
            .await;
        assert_eq!(status, 200, "GET /v1/pulls/{id}?wait=10s: {pull:#}");
        assert_pull_shape(&pull);
        assert_eq!(pull["id"], id, "{pull:#}");
        if TERMINAL.contains(&state(&pull)) {
            return pull;
        }
        assert!(
            Instant::now() < deadline,
            "pull {id} not terminal after a minute: {pull:#}\n{}",
            daemon.output()
        );
    }
}

/// Waits until the pull is terminal and asserts it is `staged`; returns it.
async fn wait_staged(daemon: &Daemon, id: &str) -> Value {
    let pull = wait_terminal(daemon, id).await;
    assert_eq!(state(&pull), "staged", "{pull:#}\n{}", daemon.output());
    pull
}

/// The pull object of local-api.md: every key present, each of its type.
fn assert_pull_shape(pull: &Value) {
    let keys = [
        "id",
        "artifact_id",
        "digest",
        "state",
        "bytes_done",
        "bytes_total",
        "path",
        "error",
    ];
    for key in keys {
        assert!(pull.get(key).is_some(), "pull without `{key}`: {pull:#}");
    }
    assert!(
        pull["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{pull:#}"
    );
    assert!(pull["artifact_id"].is_string(), "{pull:#}");
    assert!(STATES.contains(&state(pull)), "unknown state: {pull:#}");
    assert!(pull["bytes_done"].is_u64(), "{pull:#}");
    assert!(
        pull["bytes_total"].is_u64() || pull["bytes_total"].is_null(),
        "{pull:#}"
    );
    assert!(
        pull["digest"].is_string() || pull["digest"].is_null(),
        "{pull:#}"
    );
    match state(pull) {
        "staged" => assert!(pull["path"].is_string(), "staged without a path: {pull:#}"),
        _ => assert!(pull["path"].is_null(), "a path before staged: {pull:#}"),
    }
    match state(pull) {
        "failed" => {
            let error = &pull["error"];
            assert!(
                error["code"].is_string(),
                "failed without error.code: {pull:#}"
            );
            assert!(
                error["message"].is_string(),
                "failed without error.message: {pull:#}"
            );
        }
        _ => assert!(
            pull["error"].is_null(),
            "an error while not failed: {pull:#}"
        ),
    }
}

/// Asserts `{"error": {"code": code, "message": ...}}` with `status`.
fn assert_error(answer: &(u16, Value), status: u16, code: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!(
        (*got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{what}: {body:#}"
    );
    assert!(
        body["error"]["message"].is_string(),
        "{what}: no message: {body:#}"
    );
}

/// Asserts the staged pull's path holds `body`, as a read-only blob of the content store.
fn assert_staged_blob(node: &Node, pull: &Value, body: &[u8]) -> PathBuf {
    let hex = sha256_hex(body);
    let path = PathBuf::from(pull["path"].as_str().expect("a staged path"));
    assert_eq!(path, node.setup.blob_path(&hex), "{pull:#}");
    let on_disk = fs::read(&path).expect("read the staged blob");
    assert!(on_disk == body, "the staged bytes differ from the origin's");
    let mode = fs::metadata(&path)
        .expect("blob metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444, "blob mode");
    assert_eq!(pull["digest"], format!("sha256:{hex}"), "{pull:#}");
    path
}

/// GETs of `path` that asked for content: every GET but the `bytes=0-0` probe.
fn content_gets(origin: &Origin, path: &str) -> Vec<Logged> {
    let gets = origin.requests().into_iter();
    let gets = gets.filter(|l| l.method == "GET" && l.path == path);
    gets.filter(|l| l.range.as_deref() != Some("bytes=0-0"))
        .collect()
}

/// The `bytes=0-0` probes of `path`: one per transfer.
fn probes(origin: &Origin, path: &str) -> usize {
    let log = origin.requests().into_iter();
    log.filter(|l| l.method == "GET" && l.path == path)
        .filter(|l| l.range.as_deref() == Some("bytes=0-0"))
        .count()
}

/// Waits until the origin has sent at least `at_least` bytes of `path` and then nothing more
/// for 500 ms: a transfer frozen by `StallFrom`.
async fn wait_frozen(origin: &Origin, path: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while origin.body_bytes_sent(path) < at_least {
        assert!(Instant::now() < deadline, "the transfer never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = origin.body_bytes_sent(path);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = origin.body_bytes_sent(path);
        if now == last {
            return;
        }
        assert!(Instant::now() < deadline, "the transfer never froze");
        last = now;
    }
}

/// Waits up to 5 s for the events log to hold at least `count` events, then 300 ms more for
/// any extra one to show up; returns them all.
async fn settled_events(node: &Node, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.setup.all_events().len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.setup.all_events()
}

fn events_of<'a>(events: &'a [Value], artifact_id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["artifact_id"] == artifact_id)
        .collect()
}

/// A node whose stalled connections wait rather than time out, so a frozen transfer stays
/// frozen until the test cancels it or stops the daemon.
fn patient_node() -> Node {
    let mut node = Node::new();
    node.env("BLOBSTAGE_TRANSFER_READ_TIMEOUT", "60s");
    node
}

/// This test process's uid and gid (it is the daemon's peer).
fn own_ids() -> (u32, u32) {
    let meta = fs::metadata("/proc/self").expect("/proc/self");
    (meta.uid(), meta.gid())
}

// ---- pulls -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_is_accepted_staged_and_then_answered_from_the_store() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 1);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;

    let pull = start_pull(&daemon, "t/blob@1").await;
    let id = pull_id(&pull);
    let pull = wait_staged(&daemon, &id).await;
    let path = assert_staged_blob(&node, &pull, &body);
    assert_eq!(pull["bytes_total"], json!(SIZE), "{pull:#}");
    assert_eq!(pull["bytes_done"], json!(SIZE), "{pull:#}");
    assert!(node.setup.ingest_is_empty(), "ingest left behind");

    // A plain GET answers the same, without waiting.
    let (status, again) = daemon
        .request("GET", &format!("/v1/pulls/{id}"), None)
        .await;
    assert_eq!((status, state(&again)), (200, "staged"), "{again:#}");
    // Cancelling a pull that has ended answers it as it ended.
    let (status, again) = daemon
        .request("DELETE", &format!("/v1/pulls/{id}"), None)
        .await;
    assert_eq!((status, state(&again)), (200, "staged"), "{again:#}");
    assert!(path.exists(), "a DELETE after staging removed the blob");

    // The blob is in the store now: 200 at once, and the origin hears nothing.
    let requests = origin.requests().len();
    let (status, second) = post_pull(&daemon, "t/blob@1").await;
    assert_eq!(status, 200, "{second:#}");
    assert_pull_shape(&second);
    assert_eq!(state(&second), "staged", "{second:#}");
    assert_eq!(second["path"], json!(path), "{second:#}");
    assert_eq!(
        origin.requests().len(),
        requests,
        "the second pull contacted the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_pulls_of_one_artifact_share_one_pull_and_one_transfer() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 2);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    // The first GET is the one-byte probe, too short to stall; the second stalls after
    // 1000 bytes until the 1 s read timeout, so the transfer lasts about a second.
    origin.set_fault(
        "/blob",
        Fault::Stall {
            after: 1000,
            times: 2,
        },
    );
    let daemon = node.start().await;

    let body_json = json!({ "artifact_id": "t/blob@1" });
    let posts = (0..50).map(|_| daemon.request("POST", "/v1/pulls", Some(&body_json)));
    let answers = join_all(posts).await;

    let first = pull_id(&answers[0].1);
    for (status, pull) in &answers {
        assert_eq!(*status, 202, "{pull:#}");
        assert_pull_shape(pull);
        assert_eq!(
            pull["id"],
            first.as_str(),
            "a concurrent pull got its own id: {pull:#}"
        );
    }
    let pull = wait_staged(&daemon, &first).await;
    assert_staged_blob(&node, &pull, &body);

    let ranges = SIZE.div_ceil(CHUNK as usize);
    let gets = content_gets(&origin, "/blob");
    assert_eq!(
        probes(&origin, "/blob"),
        1,
        "more than one transfer started"
    );
    assert!(
        gets.len() <= ranges + 1,
        "{} content GETs for {ranges} ranges and one retry: {gets:#?}",
        gets.len()
    );
    // The stall did fire, so the transfer was still running while the POSTs arrived.
    let resumed = gets.iter().filter_map(|l| parse_range(l.range.as_deref()?));
    let resumed: Vec<_> = resumed.filter(|(first, _)| first % CHUNK == 1000).collect();
    assert_eq!(
        resumed.len(),
        1,
        "the stalled range was not resumed once: {gets:#?}"
    );
    let events = settled_events(&node, 1).await;
    assert_eq!(events.len(), 1, "one pull, one event: {events:#?}");
    assert_eq!(events[0]["outcome"], "staged", "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_of_another_artifact_with_the_same_digest_joins_and_then_answers_at_once() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 16);
    let first = publish(&origin, "blob", &body);
    let mut second = first.clone();
    second["id"] = json!("t/alias@1");
    let mut third = first.clone();
    third["id"] = json!("t/later@1");
    node.setup.register(&[first, second, third]);
    origin.set_fault(
        "/blob",
        Fault::Stall {
            after: 1000,
            times: 2,
        },
    );
    let daemon = node.start().await;

    let pull = start_pull(&daemon, "t/blob@1").await;
    let id = pull_id(&pull);
    // Joining by digest needs the digest: wait until the first pull has reached the origin.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probes(&origin, "/blob") == 0 {
        assert!(
            Instant::now() < deadline,
            "the first pull never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, alias) = post_pull(&daemon, "t/alias@1").await;
    assert_eq!(status, 202, "{alias:#}");
    assert_eq!(
        alias["id"],
        id.as_str(),
        "the same digest in transfer was not joined: {alias:#}"
    );
    let pull = wait_staged(&daemon, &id).await;
    assert_staged_blob(&node, &pull, &body);
    assert_eq!(
        probes(&origin, "/blob"),
        1,
        "the digest was transferred twice"
    );

    let requests = origin.requests().len();
    let (status, later) = post_pull(&daemon, "t/later@1").await;
    assert_eq!((status, state(&later)), (200, "staged"), "{later:#}");
    assert_eq!(later["path"], pull["path"], "{later:#}");
    assert_eq!(
        origin.requests().len(),
        requests,
        "a staged digest contacted the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_when_the_pull_ends() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 3);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    origin.set_fault(
        "/blob",
        Fault::Stall {
            after: 1000,
            times: 2,
        },
    );
    let daemon = node.start().await;

    let id = pull_id(&start_pull(&daemon, "t/blob@1").await);
    let asked = Instant::now();
    let (status, pull) = daemon
        .request("GET", &format!("/v1/pulls/{id}?wait=30s"), None)
        .await;
    let waited = asked.elapsed();

    assert_eq!(status, 200, "{pull:#}");
    assert_pull_shape(&pull);
    assert!(
        TERMINAL.contains(&state(&pull)),
        "the long-poll answered before the end: {pull:#}"
    );
    assert!(
        waited < Duration::from_secs(30),
        "the long-poll waited it all out: {waited:?}"
    );
    assert_eq!(state(&pull), "staged", "{pull:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pull_keeps_its_data_and_the_next_pull_resumes() {
    let (node, origin) = (patient_node(), Origin::start().await);
    let body = pseudo_random(FROZEN_SIZE, 4);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let offset = 3 * CHUNK;
    origin.set_fault(
        "/blob",
        Fault::StallFrom {
            offset,
            after: 1000,
        },
    );
    let daemon = node.start().await;

    let id = pull_id(&start_pull(&daemon, "t/blob@1").await);
    wait_frozen(&origin, "/blob", offset).await;
    // A long-poll that times out answers the pull as it is.
    let (status, pull) = daemon
        .request("GET", &format!("/v1/pulls/{id}?wait=1s"), None)
        .await;
    assert_eq!((status, state(&pull)), (200, "transferring"), "{pull:#}");
    assert_pull_shape(&pull);
    assert_eq!(pull["bytes_total"], json!(FROZEN_SIZE), "{pull:#}");
    let done = pull["bytes_done"].as_u64().unwrap_or(0);
    assert!(
        (offset..FROZEN_SIZE as u64).contains(&done),
        "bytes_done {done}, with everything before {offset} received: {pull:#}"
    );

    let (status, cancelled) = daemon
        .request("DELETE", &format!("/v1/pulls/{id}"), None)
        .await;
    assert_eq!(status, 200, "{cancelled:#}");
    assert_pull_shape(&cancelled);
    assert_eq!(cancelled["id"], id.as_str(), "{cancelled:#}");
    assert_eq!(state(&cancelled), "cancelled", "{cancelled:#}");
    let after = wait_terminal(&daemon, &id).await;
    assert_eq!(state(&after), "cancelled", "{after:#}");
    assert_eq!(
        node.setup.blobs(),
        Vec::<PathBuf>::new(),
        "a cancelled pull published"
    );

    // Cancelling again answers the pull as it ended.
    let (status, again) = daemon
        .request("DELETE", &format!("/v1/pulls/{id}"), None)
        .await;
    assert_eq!((status, state(&again)), (200, "cancelled"), "{again:#}");

    origin.clear_fault("/blob");
    let sent = origin.body_bytes_sent("/blob");
    let next = start_pull(&daemon, "t/blob@1").await;
    assert_ne!(
        pull_id(&next),
        id,
        "a new pull reused the cancelled one's id"
    );
    let pull = wait_staged(&daemon, &pull_id(&next)).await;
    assert_staged_blob(&node, &pull, &body);
    let fetched = origin.body_bytes_sent("/blob") - sent;
    assert!(
        fetched < FROZEN_SIZE as u64,
        "the pull after the cancel fetched {fetched} of {FROZEN_SIZE} bytes: nothing was kept"
    );

    // Every pull yields one event, the cancelled one too (not staged, so `failed`).
    let events = settled_events(&node, 2).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        events[0]["outcome"], "failed",
        "the cancelled pull: {events:#?}"
    );
    assert_eq!(events[1]["outcome"], "staged", "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_transfer_exits_0_and_the_next_daemon_resumes() {
    let (node, origin) = (patient_node(), Origin::start().await);
    let body = pseudo_random(FROZEN_SIZE, 5);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let offset = 3 * CHUNK;
    origin.set_fault(
        "/blob",
        Fault::StallFrom {
            offset,
            after: 1000,
        },
    );
    let mut daemon = node.start().await;

    start_pull(&daemon, "t/blob@1").await;
    wait_frozen(&origin, "/blob", offset).await;
    let status = daemon.terminate(Duration::from_secs(10)).await;
    let status =
        status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", daemon.output()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM:\n{}",
        daemon.output()
    );
    drop(daemon);
    assert_eq!(
        node.setup.blobs(),
        Vec::<PathBuf>::new(),
        "published on the way out"
    );

    origin.clear_fault("/blob");
    let sent = origin.body_bytes_sent("/blob");
    let daemon = node.start().await;
    let (status, pull) = post_pull(&daemon, "t/blob@1").await;
    assert!(status == 200 || status == 202, "{status}: {pull:#}");
    let pull = wait_staged(&daemon, &pull_id(&pull)).await;
    assert_staged_blob(&node, &pull, &body);
    let fetched = origin.body_bytes_sent("/blob") - sent;
    assert!(
        fetched < FROZEN_SIZE as u64,
        "the restarted daemon fetched {fetched} of {FROZEN_SIZE} bytes: nothing was kept"
    );

    // Two pulls, the interrupted one included: two events (at least once, so by event_id).
    let events = settled_events(&node, 2).await;
    let ids: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "one event per pull, across the restart: {events:#?}"
    );
    let outcome = |e: &&Value| e["outcome"] == "staged";
    assert_eq!(events.iter().filter(outcome).count(), 1, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_transfers_a_pull_waits_queued_for_a_slot() {
    let (mut node, origin) = (patient_node(), Origin::start().await);
    node.env("BLOBSTAGE_TRANSFER_MAX_TRANSFERS", "1");
    let first = pseudo_random(FROZEN_SIZE, 14);
    let second = pseudo_random(SIZE, 15);
    node.setup.register(&[
        publish(&origin, "first", &first),
        publish(&origin, "second", &second),
    ]);
    let offset = 3 * CHUNK;
    origin.set_fault(
        "/first",
        Fault::StallFrom {
            offset,
            after: 1000,
        },
    );
    let daemon = node.start().await;

    let frozen = pull_id(&start_pull(&daemon, "t/first@1").await);
    wait_frozen(&origin, "/first", offset).await;
    let waiting = pull_id(&start_pull(&daemon, "t/second@1").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, pull) = daemon
        .request("GET", &format!("/v1/pulls/{waiting}"), None)
        .await;
    assert_eq!((status, state(&pull)), (200, "queued"), "{pull:#}");
    assert_eq!(
        probes(&origin, "/second"),
        0,
        "a queued pull reached the origin"
    );
    let (status, body) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(
        body["pulls"],
        json!({ "active": 1, "queued": 1 }),
        "{body:#}"
    );

    // Freeing the slot lets the queued pull run.
    let (status, cancelled) = daemon
        .request("DELETE", &format!("/v1/pulls/{frozen}"), None)
        .await;
    assert_eq!(
        (status, state(&cancelled)),
        (200, "cancelled"),
        "{cancelled:#}"
    );
    let pull = wait_staged(&daemon, &waiting).await;
    assert_staged_blob(&node, &pull, &second);
}

// ---- request errors ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_their_documented_status_and_code() {
    let node = Node::new();
    let daemon = node.start().await;
    let post = |body: &'static [u8]| daemon.request_raw("POST", "/v1/pulls", Some(body));

    let answer = |r: support::daemon::Response| {
        let json_type = r
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json"));
        assert!(json_type, "an error answer that is not JSON: {r:?}");
        (r.status, r.json())
    };
    assert_error(
        &answer(post(b"{\"artifact_id\": ").await),
        400,
        "invalid_request",
        "malformed JSON",
    );
    assert_error(
        &answer(post(b"[1, 2]").await),
        400,
        "invalid_request",
        "not an object",
    );
    assert_error(
        &answer(post(b"{}").await),
        400,
        "invalid_request",
        "no artifact_id",
    );
    assert_error(
        &answer(post(b"{\"artifact_id\": 7}").await),
        400,
        "invalid_request",
        "a number for artifact_id",
    );
    assert_error(
        &answer(post(b"{\"artifact_id\": \"t/a@1\", \"priority\": 1}").await),
        400,
        "invalid_request",
        "an unknown field",
    );
    assert_error(
        &answer(post(b"{\"artifact_id\": \"t/a b@1\"}").await),
        400,
        "invalid_artifact_id",
        "whitespace in the id",
    );
    assert_error(
        &answer(post(b"{\"artifact_id\": \"t/a@1\", \"digest\": \"sha256:XYZ\"}").await),
        400,
        "invalid_digest",
        "a malformed pin",
    );

    let unknown = daemon
        .request("GET", "/v1/pulls/p-does-not-exist", None)
        .await;
    assert_error(&unknown, 404, "pull_not_found", "GET of an unknown pull");
    let unknown = daemon
        .request("DELETE", "/v1/pulls/p-does-not-exist", None)
        .await;
    assert_error(&unknown, 404, "pull_not_found", "DELETE of an unknown pull");
    let route = daemon.request("GET", "/v1/nothing", None).await;
    assert_error(&route, 404, "route_not_found", "an unknown route");
    let method = daemon.request("PUT", "/v1/pulls", None).await;
    assert_error(&method, 405, "method_not_allowed", "PUT /v1/pulls");
    let method = daemon.request("DELETE", "/v1/blobs", None).await;
    assert_error(&method, 405, "method_not_allowed", "DELETE /v1/blobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_64_kib_is_refused_and_one_of_64_kib_is_read() {
    let node = Node::new();
    let daemon = node.start().await;

    // Valid JSON padded with spaces to exactly the limit, then one byte more.
    let mut at_limit = br#"{"artifact_id": "t/none@1"}"#.to_vec();
    at_limit.resize(BODY_LIMIT, b' ');
    let response = daemon
        .request_raw("POST", "/v1/pulls", Some(&at_limit))
        .await;
    let answer = (response.status, response.json());
    assert_error(&answer, 404, "not_registered", "a body of exactly 64 KiB");

    let mut over = at_limit;
    over.push(b' ');
    let response = daemon.request_raw("POST", "/v1/pulls", Some(&over)).await;
    let answer = (response.status, response.json());
    assert_error(&answer, 413, "body_too_large", "a body of 64 KiB + 1");

    let mut large = br#"{"artifact_id": ""#.to_vec();
    large.resize(4 * BODY_LIMIT, b'a');
    large.extend_from_slice(br#""}"#);
    let response = daemon.request_raw("POST", "/v1/pulls", Some(&large)).await;
    let answer = (response.status, response.json());
    assert_error(&answer, 413, "body_too_large", "a body of 256 KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_wait_is_an_invalid_request() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 6);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;
    let id = pull_id(&start_pull(&daemon, "t/blob@1").await);

    for wait in ["soon", "-1s", "10parsecs"] {
        let answer = daemon
            .request("GET", &format!("/v1/pulls/{id}?wait={wait}"), None)
            .await;
        assert_error(&answer, 400, "invalid_request", &format!("wait={wait}"));
    }
    wait_staged(&daemon, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_policy_refusals_fail_the_post() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 7);
    let good = publish(&origin, "blob", &body);
    let mut revoked = publish(&origin, "revoked", &body);
    revoked["lifecycle_state"] = json!("revoked");
    let mut quarantined = publish(&origin, "quarantined", &body);
    quarantined["trust_state"] = json!("quarantined");
    node.setup.register(&[good, revoked, quarantined]);
    let daemon = node.start().await;

    let unregistered = post_pull(&daemon, "t/nobody@1").await;
    assert_error(
        &unregistered,
        404,
        "not_registered",
        "an unregistered artifact",
    );
    let refused = post_pull(&daemon, "t/revoked@1").await;
    assert_error(&refused, 403, "artifact_revoked", "a revoked artifact");
    let refused = post_pull(&daemon, "t/quarantined@1").await;
    assert_error(
        &refused,
        403,
        "artifact_quarantined",
        "a quarantined artifact",
    );

    let other = sha256_hex(b"something else");
    let pin = json!({ "artifact_id": "t/blob@1", "digest": format!("sha256:{other}") });
    let mismatch = daemon.request("POST", "/v1/pulls", Some(&pin)).await;
    assert_error(&mismatch, 409, "digest_pin_mismatch", "a wrong digest pin");
    assert!(
        content_gets(&origin, "/blob").is_empty() && probes(&origin, "/blob") == 0,
        "a refused pull reached the origin"
    );

    let pin =
        json!({ "artifact_id": "t/blob@1", "digest": format!("sha256:{}", sha256_hex(&body)) });
    let (status, pull) = daemon.request("POST", "/v1/pulls", Some(&pin)).await;
    assert_eq!(status, 202, "the right pin: {pull:#}");
    let pull = wait_staged(&daemon, &pull_id(&pull)).await;
    assert_staged_blob(&node, &pull, &body);
}

// ---- blobs and status --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_lists_and_finds_staged_blobs() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 8);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;

    let (status, empty) = daemon.request("GET", "/v1/blobs", None).await;
    assert_eq!(
        (status, &empty),
        (200, &json!({ "blobs": [] })),
        "{empty:#}"
    );

    let id = pull_id(&start_pull(&daemon, "t/blob@1").await);
    let pull = wait_staged(&daemon, &id).await;
    let path = assert_staged_blob(&node, &pull, &body);
    let digest = format!("sha256:{}", sha256_hex(&body));
    let blob = json!({ "digest": digest, "path": path, "size": SIZE });

    let (status, list) = daemon.request("GET", "/v1/blobs", None).await;
    assert_eq!(
        (status, &list),
        (200, &json!({ "blobs": [blob] })),
        "{list:#}"
    );
    let (status, one) = daemon
        .request("GET", &format!("/v1/blobs/{digest}"), None)
        .await;
    assert_eq!((status, &one), (200, &blob), "{one:#}");

    let unknown = format!("/v1/blobs/sha256:{}", sha256_hex(b"not staged"));
    let answer = daemon.request("GET", &unknown, None).await;
    assert_error(&answer, 404, "blob_not_found", "an unknown digest");
    let upper = format!("/v1/blobs/sha256:{}", sha256_hex(&body).to_uppercase());
    for malformed in [
        "/v1/blobs/sha256:xyz",
        "/v1/blobs/md5:abcd",
        "/v1/blobs/nothing",
        &upper,
    ] {
        let answer = daemon.request("GET", malformed, None).await;
        assert_error(&answer, 400, "invalid_digest", malformed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_version_node_pulls_and_store() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 9);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;

    let (code, status) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(code, 200, "{status:#}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status:#}");
    assert_eq!(status["node_id"], "test-node", "{status:#}");
    assert_eq!(
        status["pulls"],
        json!({ "active": 0, "queued": 0 }),
        "{status:#}"
    );
    assert_eq!(
        status["store"],
        json!({ "blobs": 0, "bytes": 0 }),
        "{status:#}"
    );

    let id = pull_id(&start_pull(&daemon, "t/blob@1").await);
    wait_staged(&daemon, &id).await;
    let (code, status) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(code, 200, "{status:#}");
    assert_eq!(
        status["pulls"],
        json!({ "active": 0, "queued": 0 }),
        "{status:#}"
    );
    assert_eq!(
        status["store"],
        json!({ "blobs": 1, "bytes": SIZE }),
        "{status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_answers_on_the_logged_address() {
    let node = Node::new();
    let daemon = node.start().await;
    let addr = daemon.metrics_addr().await;
    let addr = addr
        .unwrap_or_else(|| panic!("no `listening ... metrics=ADDR` line:\n{}", daemon.output()));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let health = tcp_get(addr, "/healthz").await;
    assert_eq!(
        (health.status, health.text().trim()),
        (200, "ok"),
        "{health:?}"
    );
    let ready = tcp_get(addr, "/readyz").await;
    assert_eq!(
        (ready.status, ready.text().trim()),
        (200, "ready"),
        "{ready:?}"
    );
}

// ---- peers -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_uid_is_not_allowed_is_refused_on_every_route() {
    let (uid, _) = own_ids();
    assert_ne!(uid, 12345, "the test assumes it does not run as uid 12345");
    let (node, origin) = (
        Node::with_api("allowed_uids = [12345]"),
        Origin::start().await,
    );
    let body = pseudo_random(SIZE, 10);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;

    // Every route the daemon serves, each with a body it would otherwise accept.
    let digest = format!("sha256:{}", sha256_hex(&body));
    for (method, template) in blobstage::daemon::api::ROUTES {
        let path = template.replace("{id}", "any").replace("{digest}", &digest);
        let body = match (*method, *template) {
            ("POST", "/v1/pulls" | "/v1/verify") => Some(json!({ "artifact_id": "t/blob@1" })),
            ("POST", "/v1/leases") => Some(json!({
                "holder": "test", "digests": [digest], "ttl_seconds": 60
            })),
            _ => None,
        };
        let answer = daemon.request(method, &path, body.as_ref()).await;
        let what = format!("{method} {path}");
        assert_error(&answer, 403, "peer_not_allowed", &what);
    }
    assert!(
        origin.requests().is_empty(),
        "a refused peer's pull reached the origin"
    );
    assert_eq!(node.setup.blobs(), Vec::<PathBuf>::new());

    let run = node.cli("status", &[]).await;
    assert_ne!(run.code, 0, "{run:#?}");
    assert!(
        run.last_stderr_line()
            .starts_with("error[peer_not_allowed]"),
        "{run:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_allowed_by_its_gid_is_served() {
    let (_, gid) = own_ids();
    let api = format!("allowed_uids = [12345]\nallowed_gids = [{gid}]");
    let node = Node::with_api(&api);
    let daemon = node.start().await;

    let (status, body) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(status, 200, "{body:#}");
}

// ---- the client commands -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_pulls_lists_and_shows_status() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 11);
    node.setup.register(&[publish(&origin, "blob", &body)]);
    let daemon = node.start().await;

    let run = node.cli("pull", &["--wait", "t/blob@1"]).await;
    assert_eq!(run.code, 0, "{run:#?}\n{}", daemon.output());
    let lines: Vec<&str> = run.stdout.lines().collect();
    let hex = sha256_hex(&body);
    assert_eq!(
        lines,
        [node.setup.blob_path(&hex).to_str().unwrap()],
        "{run:#?}"
    );
    assert!(
        fs::read(lines[0]).unwrap() == body,
        "the printed path holds other bytes"
    );

    let run = node.cli("ls", &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stdout.contains(&hex),
        "ls does not list the blob: {run:#?}"
    );

    let run = node.cli("status", &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stdout.contains("test-node"),
        "status without the node id: {run:#?}"
    );

    let run = node.cli("pull", &["--wait", "t/nobody@1"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(
        run.last_stderr_line()
            .starts_with("error[not_registered]: "),
        "{run:#?}"
    );
}

// ---- events ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pull_yields_one_event_a_join_none_and_a_refusal_one() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 12);
    let other = pseudo_random(SIZE, 13);
    let staged = publish(&origin, "blob", &body);
    let joined = publish(&origin, "joined", &other);
    // Registered with the digest of other bytes than the origin serves.
    let mut mismatch = publish(&origin, "mismatch", &body);
    mismatch["digest"] = json!(format!("sha256:{}", sha256_hex(b"not these bytes")));
    let mut revoked = publish(&origin, "revoked", &body);
    revoked["lifecycle_state"] = json!("revoked");
    node.setup.register(&[staged, joined, mismatch, revoked]);
    origin.set_fault(
        "/joined",
        Fault::Stall {
            after: 1000,
            times: 2,
        },
    );
    let daemon = node.start().await;
    let (uid, _) = own_ids();

    // A pull that stages.
    let pull = wait_staged(&daemon, &pull_id(&start_pull(&daemon, "t/blob@1").await)).await;
    let events = settled_events(&node, 1).await;
    let mine = events_of(&events, "t/blob@1");
    assert_eq!(mine.len(), 1, "{events:#?}");
    assert_eq!(mine[0]["outcome"], "staged", "{events:#?}");
    assert_eq!(mine[0]["operation"], "pull_blob", "{events:#?}");
    assert_eq!(mine[0]["digest"], pull["digest"], "{events:#?}");
    assert_eq!(mine[0]["bytes_transferred"], json!(SIZE), "{events:#?}");
    assert_eq!(mine[0]["requested_by"]["uid"], json!(uid), "{events:#?}");
    assert_eq!(
        mine[0]["requested_by"]["pid"],
        json!(std::process::id()),
        "the requester is this test process: {events:#?}"
    );

    // A pull that fails: one `failed` event with the pull's error code.
    let id = pull_id(&start_pull(&daemon, "t/mismatch@1").await);
    let failed = wait_terminal(&daemon, &id).await;
    assert_eq!(state(&failed), "failed", "{failed:#}");
    assert_eq!(failed["error"]["code"], "digest_mismatch", "{failed:#}");
    let events = settled_events(&node, 2).await;
    let mine = events_of(&events, "t/mismatch@1");
    assert_eq!(mine.len(), 1, "{events:#?}");
    assert_eq!(mine[0]["outcome"], "failed", "{events:#?}");
    assert_eq!(mine[0]["error_code"], "digest_mismatch", "{events:#?}");

    // A refused POST: one `refused` event.
    let refused = post_pull(&daemon, "t/revoked@1").await;
    assert_error(&refused, 403, "artifact_revoked", "a revoked artifact");
    let events = settled_events(&node, 3).await;
    let mine = events_of(&events, "t/revoked@1");
    assert_eq!(mine.len(), 1, "{events:#?}");
    assert_eq!(mine[0]["outcome"], "refused", "{events:#?}");
    assert_eq!(mine[0]["error_code"], "artifact_revoked", "{events:#?}");

    // Two POSTs while the transfer lasts: one pull, one event.
    let first = start_pull(&daemon, "t/joined@1").await;
    let second = start_pull(&daemon, "t/joined@1").await;
    assert_eq!(first["id"], second["id"], "{first:#} {second:#}");
    wait_staged(&daemon, &pull_id(&first)).await;
    let events = settled_events(&node, 4).await;
    let mine = events_of(&events, "t/joined@1");
    assert_eq!(
        mine.len(),
        1,
        "a joined pull made its own event: {events:#?}"
    );
    assert_eq!(mine[0]["outcome"], "staged", "{events:#?}");
    assert_eq!(events.len(), 4, "{events:#?}");
}

// ---- the harness itself ------------------------------------------------------------------

#[test]
fn the_harness_parses_content_length_and_chunked_answers() {
    let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
    let response = parse_response(plain, false).unwrap().unwrap();
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, &b"{}"[..])
    );

    let chunked: &[u8] = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
        3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
    let cut = &chunked[..chunked.len() - 2];
    assert!(parse_response(cut, false).unwrap().is_none());
    let response = parse_response(chunked, false).unwrap().unwrap();
    assert_eq!(response.status, 404);
    assert_eq!(response.json(), json!({"a": 1}));

    let short = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab";
    assert!(parse_response(short, true).unwrap().is_none());
    let unframed = b"HTTP/1.1 200 OK\r\n\r\nok";
    assert!(parse_response(unframed, false).unwrap().is_none());
    assert_eq!(
        parse_response(unframed, true).unwrap().unwrap().text(),
        "ok"
    );
}

#[test]
fn the_harness_finds_the_metrics_address_in_the_listening_line() {
    let log = "stderr: 2025-01-01T00:00:00Z  INFO blobstage::daemon: listening \
               socket=/tmp/x/run/agent.sock metrics=127.0.0.1:40123\n";
    let expected = "127.0.0.1:40123".parse().ok();
    assert_eq!(parse_metrics_addr(log), expected);
    assert_eq!(parse_metrics_addr("stderr: metrics=127.0.0.1:1\n"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_refuses_to_start_and_the_first_goes_on() {
    let (node, origin) = (Node::new(), Origin::start().await);
    let body = pseudo_random(SIZE, 62);
    node.setup.register(&[publish(&origin, "shared", &body)]);
    let first = node.start().await;

    // Another node's configuration (its own socket and listener) on the first one's state dir.
    let other = Node::new();
    let config = fs::read_to_string(other.setup.config_path()).unwrap();
    let (theirs, ours) = (other.setup.state_dir(), node.setup.state_dir());
    let shared = config.replace(theirs.to_str().unwrap(), ours.to_str().unwrap());
    assert_ne!(shared, config);
    other.setup.write_config(&shared);
    let mut second = other.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.has_exited() {
        assert!(
            Instant::now() < deadline,
            "the second daemon is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = second.output();
    assert!(output.contains("error[state_dir_in_use]"), "{output}");
    assert!(output.contains(&format!("pid {}", first.pid())), "{output}");
    assert!(
        !other.socket().exists(),
        "the second daemon bound its socket"
    );

    let pull = start_pull(&first, "t/shared@1").await;
    let pull = wait_staged(&first, &pull_id(&pull)).await;
    assert_staged_blob(&node, &pull, &body);
}
