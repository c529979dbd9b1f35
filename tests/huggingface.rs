//! The `huggingface` source against the loopback Hub (`support::hub`): a hub host that answers
//! the resolve protocol and a CDN host with signed URLs that expire.
//!
//! Each test runs `blobstage fetch` on an `hf://` registration and reads both hosts' request
//! logs: which revision every resolve named (the branch once, then only the commit), which
//! ranges the CDN served, and which requests carried the token (none to the CDN).

mod support;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{CHUNK, ConfigOptions, Run, Setup, pseudo_random, sha256_hex};
use support::hub::{Change, Hub, Logged, artifact};
use support::plane::Plane;

/// 40 ranges and a short last one.
const SIZE: usize = 40 * CHUNK as usize + 777;
const RANGES: usize = 41;
const REPO: &str = "acme/llama";
const FILE: &str = "weights/model.safetensors";
const HF_TOKEN: &str = "hf_s3cretHubToken";

fn node(hub: &Hub) -> Setup {
    node_with(hub, &["acme"], true)
}

fn node_with(hub: &Hub, orgs: &[&str], cdn_allowed: bool) -> Setup {
    Setup::with(ConfigOptions {
        insecure_http: true,
        extra: hub.node_config(orgs, cdn_allowed),
    })
}

/// Registers `uri` as `t/w@1` for `body`, with `credential` beside it when given.
fn register(setup: &Setup, uri: &str, body: &[u8], credential: Option<Value>) -> Value {
    let mut registration = artifact("t/w@1", uri, body);
    if let Some(credential) = credential {
        registration["credential"] = credential;
    }
    setup.register(std::slice::from_ref(&registration));
    registration
}

fn bearer() -> Option<Value> {
    Some(json!({"kind": "bearer", "token": HF_TOKEN}))
}

fn heads(log: &[Logged]) -> Vec<String> {
    let heads = log.iter().filter(|l| l.method == "HEAD");
    heads.map(|l| l.path.clone()).collect()
}

fn resolve_path(revision: &str) -> String {
    format!("/{REPO}/resolve/{revision}/{FILE}")
}

/// The CDN's GETs answered with `status`.
fn cdn_gets(hub: &Hub, status: u16) -> Vec<Logged> {
    let log = hub.cdn_requests().into_iter();
    log.filter(|l| l.method == "GET" && l.status == status)
        .collect()
}

fn assert_no_token_reached_the_cdn(hub: &Hub) {
    let log = hub.cdn_requests();
    assert!(
        log.iter().all(|l| l.authorization.is_none()),
        "the CDN saw an Authorization header: {log:#?}"
    );
}

/// Every range of the blob served exactly once.
fn assert_each_range_once(hub: &Hub) {
    let mut ranges: Vec<String> = cdn_gets(hub, 206)
        .into_iter()
        .map(|l| l.range.expect("a ranged GET"))
        .collect();
    ranges.sort();
    let before = ranges.len();
    ranges.dedup();
    assert_eq!(ranges.len(), before, "a range was served twice: {ranges:?}");
    assert_eq!(ranges.len(), RANGES, "{ranges:?}");
}

fn staged(run: &Run, body: &[u8]) {
    assert_eq!(fs::read(run.staged_path()).unwrap(), body, "{run:#?}");
    run.assert_event("staged", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lfs_file_comes_in_ranges_from_the_cdn_after_one_resolve() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 1);
    hub.put(REPO, FILE, body.clone());
    let setup = node(&hub);
    register(&setup, &hub.uri(REPO, None, FILE), &body, None);

    let run = setup.fetch("t/w@1").await;
    staged(&run, &body);
    assert_eq!(heads(&hub.hub_requests()), [resolve_path("main")]);
    assert_each_range_once(&hub);
    assert!(hub.cdn_requests().iter().all(|l| l.status == 206));
    assert!(setup.ingest_is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_token_goes_to_the_hub_and_never_to_the_cdn() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 2);
    hub.put(REPO, FILE, body.clone());
    hub.make_private(REPO, HF_TOKEN);
    let plane = Plane::start().await;
    let mut setup = node(&hub);
    setup.env("BLOBSTAGE_LOG", "trace");
    plane.configure(&setup, "node-token");
    plane.register(artifact("t/w@1", &hub.uri(REPO, None, FILE), &body));
    let token = json!({"kind": "bearer", "token": HF_TOKEN});
    plane.issue("t/w@1", token, Some(Duration::from_secs(600)));

    let run = setup.fetch("t/w@1").await;
    assert_eq!(fs::read(run.staged_path()).unwrap(), body, "{run:#?}");
    let resolves = hub.hub_requests();
    assert_eq!(resolves.len(), 1, "{resolves:#?}");
    assert_eq!(
        resolves[0].authorization,
        Some(format!("Bearer {HF_TOKEN}"))
    );
    assert_each_range_once(&hub);
    assert_no_token_reached_the_cdn(&hub);
    assert!(run.stderr.contains("TRACE"), "TRACE logging was not on");
    assert!(!run.stderr.contains(HF_TOKEN), "{}", run.stderr);
    let events = serde_json::to_string(&plane.events()).unwrap();
    assert!(!events.contains(HF_TOKEN), "{events}");
    let files = support::agent::files_containing(&setup.state_dir(), HF_TOKEN);
    assert!(files.is_empty(), "{files:?}");
    assert_eq!(plane.issued("t/w@1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_moved_mid_transfer_still_serves_the_pinned_commit() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 3);
    let pinned = hub.put(REPO, FILE, body.clone());
    let moved = Change::Commit {
        repo: REPO.into(),
        path: FILE.into(),
        body: pseudo_random(SIZE, 4).into(),
    };
    // The branch moves, and the signed URLs expire, so the transfer has to resolve again.
    hub.after_cdn_gets(8, vec![moved, Change::ExpireSignedUrls]);
    let setup = node(&hub);
    register(&setup, &hub.uri(REPO, Some("main"), FILE), &body, None);

    let run = setup.fetch("t/w@1").await;
    staged(&run, &body);
    assert_ne!(hub.head(REPO, "main").as_deref(), Some(pinned.as_str()));
    let resolves = heads(&hub.hub_requests());
    assert_eq!(resolves, [resolve_path("main"), resolve_path(&pinned)]);
    assert!(!cdn_gets(&hub, 403).is_empty(), "no signed URL expired");
    assert_each_range_once(&hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_signed_url_costs_one_resolve_and_a_retry_of_its_ranges_only() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 5);
    let commit = hub.put(REPO, FILE, body.clone());
    hub.after_cdn_gets(12, vec![Change::ExpireSignedUrls]);
    let setup = node(&hub);
    register(&setup, &hub.uri(REPO, None, FILE), &body, None);

    let run = setup.fetch_with(&["--json", "t/w@1"]).await;
    run.assert_event("staged", None);
    let expired = cdn_gets(&hub, 403);
    assert!(!expired.is_empty(), "no signed URL expired");
    assert!(
        expired.len() <= 4,
        "more 403s than connections: {expired:#?}"
    );
    let resolves = heads(&hub.hub_requests());
    assert_eq!(resolves, [resolve_path("main"), resolve_path(&commit)]);
    assert_each_range_once(&hub);
    let json: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        json["bytes_transferred"], SIZE as u64,
        "bytes fetched twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdn_host_off_the_allowlist_is_refused_before_any_byte() {
    let hub = Hub::start().await;
    let body = pseudo_random(100_000, 6);
    hub.put(REPO, FILE, body.clone());
    let setup = node_with(&hub, &["acme"], false);
    register(&setup, &hub.uri(REPO, None, FILE), &body, None);

    let run = setup.fetch("t/w@1").await;
    let line = run.error("source_not_allowed");
    assert!(line.contains("localhost"), "{line}");
    assert!(!line.contains("sig="), "the signature was shown: {line}");
    run.assert_event("refused", Some("source_not_allowed"));
    assert!(hub.cdn_requests().is_empty(), "{:#?}", hub.cdn_requests());
    assert!(setup.ingest_is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_endpoint_needs_insecure_http_on_its_allow_entry() {
    let hub = Hub::start().await;
    let body = pseudo_random(100_000, 16);
    hub.put(REPO, FILE, body.clone());
    let secure_only = hub
        .node_config(&["acme"], true)
        .replace("insecure_http = true\n", "");
    let setup = Setup::with(ConfigOptions {
        insecure_http: true,
        extra: secure_only,
    });
    register(&setup, &hub.uri(REPO, None, FILE), &body, None);

    let run = setup.fetch("t/w@1").await;
    assert!(
        run.error("insecure_source").contains(&hub.endpoint()),
        "{run:#?}"
    );
    assert!(
        hub.hub_requests().is_empty(),
        "the hub was asked over plain http"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_are_allowed_by_name_on_the_uri_and_on_every_redirect() {
    let hub = Hub::start().await;
    let body = pseudo_random(100_000, 7);
    hub.put("evil/llama", FILE, body.clone());
    let setup = node(&hub);
    register(&setup, &hub.uri("evil/llama", None, FILE), &body, None);
    let run = setup.fetch("t/w@1").await;
    assert!(
        run.error("source_not_allowed").contains("`evil`"),
        "{run:#?}"
    );
    assert!(hub.hub_requests().is_empty(), "the hub was asked");

    hub.put("acme/old", FILE, body.clone());
    hub.rename("acme/old", "acme/new");
    register(&setup, &hub.uri("acme/old", None, FILE), &body, None);
    let run = setup.fetch("t/w@1").await;
    staged(&run, &body);
    let statuses: Vec<(String, u16)> = hub
        .hub_requests()
        .into_iter()
        .map(|l| (l.path, l.status))
        .collect();
    let moved = format!("/acme/new/resolve/main/{FILE}");
    assert_eq!(
        statuses,
        [
            (format!("/acme/old/resolve/main/{FILE}"), 307),
            (moved, 302)
        ]
    );

    let elsewhere = pseudo_random(100_000, 17);
    hub.put("acme/gone", FILE, elsewhere.clone());
    hub.rename("acme/gone", "evil/gone");
    register(&setup, &hub.uri("acme/gone", None, FILE), &elsewhere, None);
    let run = setup.fetch("t/w@1").await;
    assert!(
        run.error("source_not_allowed").contains("`evil`"),
        "{run:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_without_a_token_is_a_clear_error() {
    let hub = Hub::start().await;
    let body = pseudo_random(100_000, 8);
    hub.put(REPO, FILE, body.clone());
    hub.make_private(REPO, HF_TOKEN);
    let setup = node(&hub);
    register(&setup, &hub.uri(REPO, None, FILE), &body, None);

    let run = setup.fetch("t/w@1").await;
    let line = run.error("source_denied");
    assert!(
        line.contains("hf://acme/llama") || line.contains(REPO),
        "{line}"
    );
    assert!(line.contains("401") && line.contains("private"), "{line}");
    run.assert_event("failed", Some("source_denied"));
    assert!(hub.cdn_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_hub_serves_itself_is_read_from_the_hub_at_the_commit() {
    let hub = Hub::start().await;
    let body = pseudo_random(3 * CHUNK as usize + 5, 9);
    let commit = hub.put_small(REPO, "config.json", body.clone());
    hub.make_private(REPO, HF_TOKEN);
    let setup = node(&hub);
    register(&setup, &hub.uri(REPO, None, "config.json"), &body, bearer());

    let run = setup.fetch("t/w@1").await;
    staged(&run, &body);
    let log = hub.hub_requests();
    let gets: Vec<&Logged> = log.iter().filter(|l| l.method == "GET").collect();
    assert_eq!(gets.len(), 4, "{log:#?}");
    let at_commit = format!("/{REPO}/resolve/{commit}/config.json");
    assert!(
        gets.iter().all(|l| l.path == at_commit && l.status == 206),
        "{log:#?}"
    );
    let with_token = Some(format!("Bearer {HF_TOKEN}"));
    assert!(
        log.iter().all(|l| l.authorization == with_token),
        "{log:#?}"
    );
    assert!(hub.cdn_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_hub_contradicts_fails_before_the_download() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 10);
    let old = hub.put(REPO, FILE, pseudo_random(SIZE, 11));
    hub.put(REPO, FILE, body.clone());
    let setup = node(&hub);
    let uri = hub.uri(REPO, None, FILE);

    let mut other_digest = artifact("t/w@1", &uri, &body);
    other_digest["digest"] = json!(format!("sha256:{}", sha256_hex(b"other")));
    setup.register(&[other_digest]);
    let run = setup.fetch("t/w@1").await;
    assert!(
        run.error("source_digest_mismatch")
            .contains(&sha256_hex(&body)),
        "{run:#?}"
    );
    run.assert_event("failed", Some("source_digest_mismatch"));

    let mut other_size = artifact("t/w@1", &uri, &body);
    other_size["source"]["size_bytes"] = json!(SIZE + 1);
    setup.register(&[other_size]);
    setup.fetch("t/w@1").await.error("size_mismatch");

    let mut old_commit = artifact("t/w@1", &hub.uri(REPO, Some("main"), FILE), &body);
    old_commit["source"]["source_ref"] = json!(old);
    setup.register(&[old_commit]);
    let run = setup.fetch("t/w@1").await;
    assert!(run.error("source_ref_mismatch").contains(&old), "{run:#?}");

    assert!(hub.cdn_requests().is_empty(), "{:#?}", hub.cdn_requests());
    assert!(setup.ingest_is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_pull_request_refs_and_commits_resolve_as_the_hub_spells_them() {
    let hub = Hub::start().await;
    let body = pseudo_random(2 * CHUNK as usize, 12);
    let repo = "datasets/acme/corpus";
    let pr = hub.put_on(
        repo,
        "refs/pr/1",
        "train/part-0.parquet",
        body.clone().into(),
        true,
    );
    let setup = node(&hub);
    let uri = hub.uri(repo, Some("refs/pr/1"), "train/part-0.parquet");
    register(&setup, &uri, &body, None);
    staged(&setup.fetch("t/w@1").await, &body);

    let mut pinned = artifact("t/w@1", &hub.uri(repo, None, "train/part-0.parquet"), &body);
    pinned["source"]["source_ref"] = json!(pr);
    setup.register(&[pinned]);
    fs::remove_file(setup.blob_path(&sha256_hex(&body))).unwrap();
    staged(&setup.fetch("t/w@1").await, &body);

    let file = "train/part-0.parquet";
    let by_pr = format!("/{repo}/resolve/refs%2Fpr%2F1/{file}");
    let by_commit = format!("/{repo}/resolve/{pr}/{file}");
    assert_eq!(heads(&hub.hub_requests()), [by_pr, by_commit]);
}

// ---- resume ----------------------------------------------------------------------------

fn journal_path(setup: &Setup, body: &[u8]) -> PathBuf {
    let name = format!("sha256-{}.journal", sha256_hex(body));
    setup.state_dir().join("ingest").join(name)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `stalled` CDN GETs hang and the journal stops changing, then SIGKILLs `child`.
async fn kill_when_frozen(
    mut child: std::process::Child,
    hub: &Hub,
    stalled: usize,
    journal: PathBuf,
) {
    wait_until("the transfer stalls", || hub.cdn_gets_served() >= stalled).await;
    let mut last = fs::read(&journal).ok();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = fs::read(&journal).ok();
        if now.is_some() && now == last {
            break;
        }
        last = now;
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(
        status.code().is_none(),
        "the fetch ended before the kill: {status}"
    );
}

/// A node whose fetch of `body` (committed as `FILE` on `main`) was SIGKILLed with ranges 0-23
/// on disk and the four connections hanging on 24-27. Returns the pinned commit.
async fn killed_mid_transfer(hub: &Hub, body: &[u8]) -> (Setup, String) {
    let pinned = hub.put(REPO, FILE, body.to_vec());
    let mut setup = node(hub);
    setup.env("BLOBSTAGE_TRANSFER_READ_TIMEOUT", "60s");
    register(&setup, &hub.uri(REPO, None, FILE), body, None);
    hub.stall_cdn_from(Some((24 * CHUNK, 20_000)));
    let child = setup.spawn_fetch(&["t/w@1"]);
    kill_when_frozen(child, hub, 28, journal_path(&setup, body)).await;
    hub.stall_cdn_from(None);
    (setup, pinned)
}

/// `fetch --json` to the end: the JSON it printed, after checking the blob is `body`.
async fn fetch_json(setup: &Setup, body: &[u8]) -> Value {
    let run = setup.fetch_with(&["--json", "t/w@1"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let json: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let path = PathBuf::from(json["path"].as_str().unwrap());
    assert_eq!(fs::read(path).unwrap(), body);
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_sigkill_asks_for_the_commit_not_the_moved_branch() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 13);
    let (setup, pinned) = killed_mid_transfer(&hub, &body).await;
    hub.put(REPO, FILE, pseudo_random(SIZE, 14));
    let first_run = hub.hub_requests().len();

    let json = fetch_json(&setup, &body).await;
    assert!(
        json["bytes_resumed"].as_u64().unwrap() >= 20 * CHUNK,
        "{json}"
    );
    let resumed = heads(&hub.hub_requests()[first_run..]);
    assert_eq!(resumed, [resolve_path(&pinned)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_whose_commit_the_hub_lost_starts_clean_from_the_revision() {
    let hub = Hub::start().await;
    let body = pseudo_random(SIZE, 15);
    let (setup, pinned) = killed_mid_transfer(&hub, &body).await;
    let squashed = hub.squash(REPO);
    let first_run = hub.hub_requests().len();

    let json = fetch_json(&setup, &body).await;
    assert_eq!(json["bytes_resumed"], 0, "{json}");
    let resumed = heads(&hub.hub_requests()[first_run..]);
    assert_eq!(resumed, [resolve_path(&pinned), resolve_path("main")]);
    assert_eq!(hub.head(REPO, "main"), Some(squashed));
}
