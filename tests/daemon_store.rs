//! The daemon's store under load and over time: the connection budget across many blobs,
//! verify quarantining a tampered blob, leases against garbage collection, and eviction at the
//! high watermark. The real daemon, over its real socket, against the loopback origin.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use support::agent::{artifact, pseudo_random, sha256_hex};
use support::daemon::Node;
use support::front::{Front, FrontOptions};
use support::origin::Origin;

fn staged_path(pull: &Value) -> PathBuf {
    assert_eq!(pull["state"], "staged", "{pull:#}");
    PathBuf::from(pull["path"].as_str().unwrap())
}

fn digest_of(body: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(body))
}

/// Registers `count` blobs of `size` bytes served at `/b<i>` (through `url`).
fn register_blobs(
    node: &Node,
    origin: &Origin,
    url: impl Fn(&str) -> String,
    count: usize,
    size: usize,
) -> Vec<Vec<u8>> {
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|i| pseudo_random(size, 100 + i as u64))
        .collect();
    let artifacts: Vec<Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            origin.put(&format!("/b{i}"), body.clone());
            artifact(&format!("t/b{i}@1"), &url(&format!("/b{i}")), body)
        })
        .collect();
    node.setup.register(&artifacts);
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_blobs_never_hold_more_than_max_connections_at_the_origin() {
    let origin = Origin::start().await;
    let options = FrontOptions {
        delay: Duration::from_millis(20),
        ..FrontOptions::default()
    };
    let front = Front::start(origin.addr(), options).await;
    let mut node = Node::new();
    node.env("BLOBSTAGE_TRANSFER_MAX_CONNECTIONS", "8");
    node.env("BLOBSTAGE_TRANSFER_MAX_TRANSFERS", "20");
    let bodies = register_blobs(&node, &origin, |p| front.url(p), 20, 300_000);
    let daemon = node.start().await;

    let pulls = (0..20).map(|i| {
        let daemon = &daemon;
        async move { daemon.pull_to_end(&format!("t/b{i}@1")).await }
    });
    let pulls = futures_util::future::join_all(pulls).await;
    for (pull, body) in pulls.iter().zip(&bodies) {
        assert_eq!(fs::read(staged_path(pull)).unwrap(), *body);
    }
    let most = front.max_concurrent();
    assert!(
        most <= 8,
        "{most} requests open at once with max_connections = 8"
    );
    assert!(
        most >= 4,
        "only {most} requests at once: the transfers did not overlap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_a_tampered_blob_quarantines_it_and_the_next_pull_stages_it_again() {
    let origin = Origin::start().await;
    let node = Node::new();
    let bodies = register_blobs(&node, &origin, |p| origin.url(p), 1, 200_000);
    let daemon = node.start().await;
    let path = staged_path(&daemon.pull_to_end("t/b0@1").await);
    let verify = json!({ "artifact_id": "t/b0@1" });
    let (status, verified) = daemon.request("POST", "/v1/verify", Some(&verify)).await;
    assert_eq!(
        (status, verified["outcome"].as_str()),
        (200, Some("verified")),
        "{verified:#}"
    );

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut tampered = bodies[0].clone();
    tampered[1000] ^= 1;
    fs::write(&path, &tampered).unwrap();
    let (status, refused) = daemon.request("POST", "/v1/verify", Some(&verify)).await;
    assert_eq!(status, 409, "{refused:#}");
    assert_eq!(refused["error"]["code"], "digest_mismatch");
    assert!(
        !path.exists(),
        "the tampered blob is still at its blob path"
    );
    let quarantined = fs::read_dir(node.setup.state_dir().join("quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);

    let gets_before = origin.get_count("/b0");
    let again = staged_path(&daemon.pull_to_end("t/b0@1").await);
    assert_eq!(again, path);
    assert_eq!(fs::read(&again).unwrap(), bodies[0]);
    assert!(
        origin.get_count("/b0") > gets_before,
        "the blob was not fetched again"
    );

    let events = node.setup.all_events();
    let verifies: Vec<_> = events
        .iter()
        .filter(|e| e["operation"] == "verify")
        .collect();
    let outcomes: Vec<_> = verifies
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["verified", "failed"]);
    assert_eq!(verifies[1]["error_code"], "digest_mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_a_blob_through_gc_and_its_expiry_releases_it() {
    let origin = Origin::start().await;
    let mut node = Node::new();
    node.env("BLOBSTAGE_STORE_LOW_WATERMARK", "1KiB");
    let bodies = register_blobs(&node, &origin, |p| origin.url(p), 2, 100_000);
    let daemon = node.start().await;
    let kept = staged_path(&daemon.pull_to_end("t/b0@1").await);
    let other = staged_path(&daemon.pull_to_end("t/b1@1").await);

    let lease =
        json!({ "holder": "runtime-1", "digests": [digest_of(&bodies[0])], "ttl_seconds": 2 });
    let (status, lease) = daemon.request("POST", "/v1/leases", Some(&lease)).await;
    assert_eq!(status, 201, "{lease:#}");
    let (_, report) = daemon.request("POST", "/v1/gc", None).await;
    assert_eq!(report["freed_bytes"], 100_000, "{report:#}");
    assert!(
        kept.exists() && !other.exists(),
        "gc evicted the leased blob or kept the other"
    );

    // Let the lease lapse (a lower bound on waiting, not a timing assertion).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (_, report) = daemon.request("POST", "/v1/gc", None).await;
    assert_eq!(
        report["evicted"][0]["digest"],
        digest_of(&bodies[0]),
        "{report:#}"
    );
    assert!(!kept.exists());
    let (status, gone) = daemon
        .request(
            "DELETE",
            &format!("/v1/leases/{}", lease["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (status, gone["error"]["code"].as_str()),
        (404, Some("lease_not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_high_watermark_a_staged_pull_evicts_the_least_recently_used() {
    let origin = Origin::start().await;
    let mut node = Node::new();
    node.env("BLOBSTAGE_STORE_HIGH_WATERMARK", "250000");
    node.env("BLOBSTAGE_STORE_LOW_WATERMARK", "200000");
    register_blobs(&node, &origin, |p| origin.url(p), 3, 100_000);
    let daemon = node.start().await;
    let first = staged_path(&daemon.pull_to_end("t/b0@1").await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = staged_path(&daemon.pull_to_end("t/b1@1").await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Using the first blob again makes the second the least recently used.
    assert_eq!(staged_path(&daemon.pull_to_end("t/b0@1").await), first);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let third = staged_path(&daemon.pull_to_end("t/b2@1").await);

    assert!(
        first.exists() && third.exists(),
        "a recently used blob was evicted"
    );
    assert!(
        !second.exists(),
        "the least recently used blob was kept above the watermark"
    );
}
