//! The event outbox against the real daemon and `fetch`: events wait on disk while the control
//! plane cannot take them and arrive exactly once, by id, when it can again, across a SIGKILL.
//!
//! The file-backed control plane is "down" while its event log's directory is a regular file
//! (appending then fails even for root) and "up" again once it is a directory.

mod support;

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Setup, artifact, pseudo_random};
use support::daemon::{Daemon, Node};
use support::origin::Origin;

/// Where the events go in these tests: `<root>/cp/events.jsonl`.
fn control_plane_dir(setup: &Setup) -> PathBuf {
    setup.root().join("cp")
}

fn take_down(setup: &Setup) {
    let dir = control_plane_dir(setup);
    let _ = fs::remove_dir_all(&dir);
    fs::write(&dir, b"not a directory").unwrap();
}

/// Removes the file in the way; the daemon may create the directory itself the moment it is
/// gone (the file control plane makes its log's directory), so it may already exist.
fn bring_up(setup: &Setup) {
    let dir = control_plane_dir(setup);
    fs::remove_file(&dir).unwrap();
    fs::create_dir_all(&dir).unwrap();
}

fn delivered(setup: &Setup) -> Vec<Value> {
    let Ok(text) = fs::read_to_string(control_plane_dir(setup).join("events.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn outbox_files(setup: &Setup) -> usize {
    let dir = setup.state_dir().join("outbox");
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node whose events go to `<root>/cp/events.jsonl`, with `count` small blobs registered.
fn node_with_blobs(origin: &Origin, count: usize) -> Node {
    let mut node = Node::new();
    let log = control_plane_dir(&node.setup).join("events.jsonl");
    node.env("BLOBSTAGE_CONTROL_PLANE_EVENTS_LOG", log.to_str().unwrap());
    let artifacts: Vec<Value> = (0..count)
        .map(|i| {
            let body = pseudo_random(50_000, 300 + i as u64);
            origin.put(&format!("/e{i}"), body.clone());
            artifact(&format!("t/e{i}@1"), &origin.url(&format!("/e{i}")), &body)
        })
        .collect();
    node.setup.register(&artifacts);
    node
}

async fn pull_staged(daemon: &Daemon, id: &str) {
    let (status, pull) = daemon
        .request("POST", "/v1/pulls", Some(&json!({ "artifact_id": id })))
        .await;
    assert!(status == 200 || status == 202, "{pull:#}");
    let pull_id = pull["id"].as_str().unwrap();
    let (_, pull) = daemon
        .request("GET", &format!("/v1/pulls/{pull_id}?wait=30s"), None)
        .await;
    assert_eq!(pull["state"], "staged", "{pull:#}");
}

fn assert_once_each(events: &[Value], expected: usize) {
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "an event was delivered twice");
    assert_eq!(events.len(), expected, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_control_plane_outage_and_arrive_once_each() {
    let origin = Origin::start().await;
    let node = node_with_blobs(&origin, 20);
    take_down(&node.setup);
    let daemon = node.start().await;

    for i in 0..20 {
        pull_staged(&daemon, &format!("t/e{i}@1")).await;
    }
    assert!(delivered(&node.setup).is_empty());
    let (_, status) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(status["outbox"]["depth"], 20, "{status:#}");

    bring_up(&node.setup);
    wait_for("the outbox drains", || delivered(&node.setup).len() >= 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = delivered(&node.setup);
    assert_once_each(&events, 20);
    assert!(events.iter().all(|e| e["outcome"] == "staged"));
    assert_eq!(outbox_files(&node.setup), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pending_at_a_sigkill_are_delivered_after_the_restart() {
    let origin = Origin::start().await;
    let node = node_with_blobs(&origin, 3);
    take_down(&node.setup);
    let mut daemon = node.start().await;
    for i in 0..3 {
        pull_staged(&daemon, &format!("t/e{i}@1")).await;
    }
    assert_eq!(outbox_files(&node.setup), 3);
    std::process::Command::new("kill")
        .args(["-KILL", &daemon.pid().to_string()])
        .status()
        .unwrap();
    let _ = daemon.terminate(Duration::from_secs(5)).await;

    bring_up(&node.setup);
    let _daemon = node.start().await;
    wait_for("the restarted daemon delivers", || {
        delivered(&node.setup).len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_once_each(&delivered(&node.setup), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_new_pulls_and_drops_nothing() {
    let origin = Origin::start().await;
    let mut node = node_with_blobs(&origin, 3);
    node.env("BLOBSTAGE_CONTROL_PLANE_OUTBOX_MAX_EVENTS", "2");
    take_down(&node.setup);
    let daemon = node.start().await;
    pull_staged(&daemon, "t/e0@1").await;
    pull_staged(&daemon, "t/e1@1").await;

    let (status, refused) = daemon
        .request(
            "POST",
            "/v1/pulls",
            Some(&json!({ "artifact_id": "t/e2@1" })),
        )
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (503, Some("outbox_full")),
        "{refused:#}"
    );
    assert_eq!(outbox_files(&node.setup), 2);

    bring_up(&node.setup);
    wait_for("the outbox drains", || delivered(&node.setup).len() >= 2).await;
    // Delivered is not yet removed: the daemon takes new pulls once its outbox says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, status) = daemon.request("GET", "/v1/status", None).await;
        if status["outbox"]["depth"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox stays full: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pull_staged(&daemon, "t/e2@1").await;
    wait_for("the third event", || delivered(&node.setup).len() >= 3).await;
    assert_once_each(&delivered(&node.setup), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_control_plane_is_down_succeeds_and_leaves_its_event_for_later() {
    let origin = Origin::start().await;
    let mut node = node_with_blobs(&origin, 1);
    take_down(&node.setup);
    let log = control_plane_dir(&node.setup).join("events.jsonl");
    node.setup
        .env("BLOBSTAGE_CONTROL_PLANE_EVENTS_LOG", log.to_str().unwrap());
    let run = node.setup.fetch("t/e0@1").await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains("events wait in the outbox"),
        "{}",
        run.stderr
    );
    assert_eq!(outbox_files(&node.setup), 1);

    bring_up(&node.setup);
    let again = node.setup.fetch("t/e0@1").await;
    assert_eq!(again.code, 0, "{again:#?}");
    let events = delivered(&node.setup);
    assert_once_each(&events, 2);
    let outcomes: Vec<_> = events
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["staged", "already_present"]);
}
