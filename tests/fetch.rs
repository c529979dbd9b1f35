//! End-to-end tests of `blobstage fetch`: the real binary against a loopback HTTP origin
//! (`support::origin`) with a throwaway node (`support::agent`). Each test checks what the
//! contract promises: the printed path or `error[code]` line and exit code, the bytes and
//! mode of the published blob, the one event per fetch, an empty ingest area after a
//! failure, and, through the origin's request log, which requests the agent did (and did
//! not) send. The transfer runs with 64 KiB ranges over 4 connections and a 1 s read
//! timeout, so multi-range, retry and stall paths are exercised with small blobs.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use support::agent::{
    CHUNK, ConfigOptions, Run, Setup, artifact, artifact_without_size, parse_range, pseudo_random,
    sha256_hex, sha512_hex,
};
use support::front::{Front, FrontOptions};
use support::origin::{Fault, Logged, Origin};

/// SHA-256 of the empty string.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The development bearer token of the credential tests.
const TOKEN: &str = "s3cret-t0ken";

/// A size that is not a multiple of the chunk size and spans many ranges.
const MULTI_RANGE_SIZE: usize = (1 << 20) + 12_345;

/// Serves `body` at `path` and registers it as `id` (with its size) on `setup`.
fn publish(setup: &Setup, origin: &Origin, id: &str, path: &str, body: &[u8]) {
    origin.put(path, body.to_vec());
    setup.register(&[artifact(id, &origin.url(path), body)]);
}

/// The GETs that fetched content: every GET but the `bytes=0-0` probe the agent starts with.
fn content_gets(origin: &Origin, path: &str) -> Vec<Logged> {
    let gets = origin.requests().into_iter().filter(|l| l.method == "GET");
    let gets = gets.filter(|l| l.path == path);
    gets.filter(|l| l.range.as_deref() != Some("bytes=0-0"))
        .collect()
}

/// The `(first, last)` byte ranges asked for by `gets`.
fn ranges(gets: &[Logged]) -> Vec<(u64, u64)> {
    let spans = gets.iter().filter_map(|l| l.range.as_deref());
    spans
        .map(|r| parse_range(r).expect("a bytes=first-last range"))
        .collect()
}

/// A redirect to `location` with `status`.
fn redirect(location: String, status: u16) -> Fault {
    Fault::Redirect { location, status }
}

/// Asserts that the printed path is the blob of `body`, holds it, is read-only, and that
/// the ingest area is clean.
fn assert_published(setup: &Setup, run: &Run, body: &[u8]) {
    let hex = sha256_hex(body);
    let path = run.staged_path();
    assert_eq!(path, setup.blob_path(&hex));
    let on_disk = fs::read(&path).expect("read the published blob");
    assert!(on_disk == body, "published bytes differ from the origin's");
    let mode = fs::metadata(&path)
        .expect("blob metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444, "blob mode");
    assert!(setup.ingest_is_empty(), "ingest left behind");
}

/// Asserts one `staged` event for `body`, all of it transferred exactly once.
fn assert_staged_event(run: &Run, id: &str, body: &[u8]) {
    run.assert_event("staged", None);
    let event = run.event();
    assert_eq!(event["artifact_id"], id);
    assert_eq!(event["digest"], format!("sha256:{}", sha256_hex(body)));
    assert_eq!(event["bytes_transferred"], json!(body.len()), "{event:#}");
}

/// Asserts that nothing was published and the ingest area is clean after a failure.
fn assert_nothing_published(setup: &Setup) {
    assert_eq!(setup.blobs(), Vec::<std::path::PathBuf>::new(), "blobs/");
    assert!(setup.ingest_is_empty(), "ingest left behind");
}

// ---- staging ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_range_blob_is_staged_from_pinned_identity_ranges() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(MULTI_RANGE_SIZE, 1);
    publish(&setup, &origin, "t/multi@1", "/blob", &body);

    let run = setup.fetch("t/multi@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/multi@1", &body);
    assert_eq!(setup.blobs().len(), 1);
    let etag = origin.etag("/blob").expect("etag");
    let gets = content_gets(&origin, "/blob");
    assert!(gets.len() > 1, "several ranged GETs: {gets:#?}");
    for get in &gets {
        assert_eq!(get.status, 206, "{get:?}");
        assert_eq!(get.if_match.as_deref(), Some(etag.as_str()), "{get:?}");
    }
    for request in origin.requests() {
        assert_eq!(request.accept_encoding.as_deref(), Some("identity"));
    }
    assert_ranges_tile(ranges(&gets), body.len() as u64);
}

/// Asserts that `spans` cover `0..size` exactly once, none longer than a chunk.
fn assert_ranges_tile(mut spans: Vec<(u64, u64)>, size: u64) {
    spans.sort_unstable();
    let mut next = 0;
    for (first, last) in &spans {
        assert_eq!(*first, next, "gap or overlap in {spans:?}");
        assert!(last - first < CHUNK, "range longer than a chunk: {spans:?}");
        next = last + 1;
    }
    assert_eq!(next, size, "ranges do not reach the end: {spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_fetched_in_parallel_up_to_connections_per_blob() {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    // A slow test machine could make the transfer long enough to add connections.
    setup.env("BLOBSTAGE_TRANSFER_MAX_CONNECTIONS_PER_BLOB", "4");
    let front = Front::start(origin.addr(), held(Duration::from_millis(50))).await;
    let body = pseudo_random(MULTI_RANGE_SIZE, 2);
    origin.put("/blob", body.clone());
    setup.register(&[artifact("t/parallel@1", &front.url("/blob"), &body)]);

    let run = setup.fetch("t/parallel@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/parallel@1", &body);
    assert_eq!(front.max_concurrent(), 4, "connections_per_blob = 4");
}

/// Pulls `size` bytes through `fault` with 1 MiB ranges over 2 connections, which may grow
/// to 8; returns the `fetch --json` line and the most requests the origin had at once.
async fn paced_pull(fault: Fault, size: usize) -> (Value, usize) {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    setup.env("BLOBSTAGE_TRANSFER_CHUNK_SIZE", "1MiB");
    setup.env("BLOBSTAGE_TRANSFER_CONNECTIONS_PER_BLOB", "2");
    let body = pseudo_random(size, 40);
    origin.put("/blob", body.clone());
    origin.set_fault("/blob", fault);
    setup.register(&[artifact("t/paced@1", &origin.url("/blob"), &body)]);

    let run = setup.fetch_with(&["--json", "t/paced@1"]).await;

    let line = parse_json_line(&run);
    let published = fs::read(setup.blob_path(&sha256_hex(&body))).expect("the blob");
    assert!(published == body, "the published blob differs");
    (line, origin.max_concurrent())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_added_while_each_one_adds_throughput() {
    // 2 MiB/s a connection, as an object store caps each: every level up pays off.
    let capped = Fault::Paced {
        per_request: Some(2 << 20),
        total: None,
    };
    let (line, most) = paced_pull(capped, 64 << 20).await;

    assert_eq!(line["connections"], 8, "{line}");
    assert_eq!(most, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_add_nothing_are_given_up() {
    // 4 MiB/s for all connections together, as a full link: a third connection adds nothing.
    let link = Fault::Paced {
        per_request: None,
        total: Some(4 << 20),
    };
    let (line, most) = paced_pull(link, 24 << 20).await;

    assert_eq!(line["connections"], 2, "{line}");
    assert_eq!(most, 3, "one level tried");
}

/// A front that holds every request for `delay`, so parallel requests overlap visibly.
fn held(delay: Duration) -> FrontOptions {
    FrontOptions {
        delay,
        ..FrontOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_one_byte_blobs_are_staged() {
    assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    let (setup, origin) = (Setup::new(), Origin::start().await);
    origin.put("/empty", Bytes::new());
    origin.put("/one", Bytes::from_static(b"x"));
    setup.register(&[
        artifact("t/empty@1", &origin.url("/empty"), b""),
        artifact("t/one@1", &origin.url("/one"), b"x"),
    ]);

    let empty = setup.fetch("t/empty@1").await;
    assert_published(&setup, &empty, b"");
    assert!(empty.staged_path().ends_with(EMPTY_SHA256));
    assert_staged_event(&empty, "t/empty@1", b"");

    let one = setup.fetch("t/one@1").await;
    assert_published(&setup, &one, b"x");
    assert_staged_event(&one, "t/one@1", b"x");
    assert_eq!(setup.blobs().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_already_staged_blob_is_answered_without_contacting_the_origin() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(200_000, 3);
    publish(&setup, &origin, "t/again@1", "/blob", &body);
    let first = setup.fetch("t/again@1").await;
    assert_published(&setup, &first, &body);
    let requests_before = origin.requests().len();

    let second = setup.fetch("t/again@1").await;

    assert_eq!(second.staged_path(), first.staged_path());
    second.assert_event("already_present", None);
    assert_eq!(second.event()["bytes_transferred"], 0);
    assert_eq!(
        origin.requests().len(),
        requests_before,
        "the origin was contacted"
    );
    assert_eq!(fs::read(second.staged_path()).unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_ignores_range_is_read_as_one_stream() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(300_000, 10);
    publish(&setup, &origin, "t/whole@1", "/blob", &body);
    origin.set_fault("/blob", Fault::IgnoreRange);

    let run = setup.fetch("t/whole@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/whole@1", &body);
    let statuses: Vec<u16> = origin.requests().iter().map(|l| l.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_within_the_allowlist_is_followed() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(150_000, 18);
    origin.put("/blob", body.clone());
    let location = origin.url("/blob");
    origin.set_fault("/r", redirect(location, 302));
    setup.register(&[artifact("t/moved@1", &origin.url("/r"), &body)]);

    let run = setup.fetch("t/moved@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/moved@1", &body);
    assert!(origin.get_count("/blob") > 1, "{:#?}", origin.requests());
}

// ---- resilience ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_resumes_after_the_bytes_already_received() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(MULTI_RANGE_SIZE, 11);
    publish(&setup, &origin, "t/cut@1", "/blob", &body);
    // The first GET is the 1-byte probe, too short to cut; the second is cut at 30 000.
    let cut = Fault::CutBody {
        after: 30_000,
        times: 2,
    };
    origin.set_fault("/blob", cut);

    let run = setup.fetch("t/cut@1").await;

    assert_published(&setup, &run, &body);
    // Resumed, not restarted: every byte was received exactly once.
    assert_staged_event(&run, "t/cut@1", &body);
    let spans = ranges(&content_gets(&origin, "/blob"));
    let resumed = spans.iter().filter(|(first, _)| first % CHUNK != 0);
    let resumed: Vec<_> = resumed.collect();
    assert_eq!(resumed.len(), 1, "one resumed range expected: {spans:?}");
    let (first, last) = *resumed[0];
    assert!(first % CHUNK > 0 && spans.contains(&(first - first % CHUNK, last)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_on_the_first_request_is_retried_and_the_blob_staged() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(200_000, 12);
    publish(&setup, &origin, "t/busy@1", "/blob", &body);
    let busy = Fault::Status {
        status: 503,
        retry_after: Some("1".into()),
        times: 1,
    };
    origin.set_fault("/blob", busy);

    let run = setup.fetch("t/busy@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/busy@1", &body);
    assert!(has_warning(&run), "no retry warning: {run:#?}");
    let statuses: Vec<u16> = origin.requests().iter().map(|l| l.status).collect();
    assert_eq!(statuses.first(), Some(&503), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_on_a_range_is_retried_no_sooner_than_retry_after() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let refusing = FrontOptions {
        refusals: 1,
        retry_after: Some("1".into()),
        ..FrontOptions::default()
    };
    let front = Front::start(origin.addr(), refusing).await;
    let body = pseudo_random(300_000, 23);
    origin.put("/blob", body.clone());
    setup.register(&[artifact("t/busy-range@1", &front.url("/blob"), &body)]);

    let run = setup.fetch("t/busy-range@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/busy-range@1", &body);
    assert!(has_warning(&run), "no retry warning: {run:#?}");
    let seen = front.seen();
    let refused = seen.iter().find(|s| s.refused).expect("a refused range");
    let retry = seen.iter().find(|s| !s.refused && s.range == refused.range);
    let retry = retry.unwrap_or_else(|| panic!("{:?} never retried: {seen:#?}", refused.range));
    let waited = retry.at.duration_since(refused.at);
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}"
    );
}

/// Whether stderr holds a WARN-level log line.
fn has_warning(run: &Run) -> bool {
    run.stderr.lines().any(|l| l.contains("WARN"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_is_abandoned_and_its_range_resumed() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(MULTI_RANGE_SIZE, 13);
    publish(&setup, &origin, "t/stall@1", "/blob", &body);
    // The first GET is the 1-byte probe, too short to stall; the second stalls at 10 000.
    let stall = Fault::Stall {
        after: 10_000,
        times: 2,
    };
    origin.set_fault("/blob", stall);

    let run = setup.fetch("t/stall@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/stall@1", &body);
    let planned = (body.len() as u64).div_ceil(CHUNK) as usize;
    let spans = ranges(&content_gets(&origin, "/blob"));
    assert!(spans.len() > planned, "no retry: {spans:?}");
    assert!(
        spans.iter().any(|(first, _)| first % CHUNK == 10_000),
        "{spans:?}"
    );
    // The other connections kept going while one was stalled.
    assert!(
        origin.max_concurrent() > 1,
        "ranges waited for the stalled one"
    );
}

// ---- verification ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_fails_and_publishes_nothing() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let served = pseudo_random(150_000, 4);
    let registered = pseudo_random(150_000, 5);
    origin.put("/blob", served.clone());
    setup.register(&[artifact("t/bad@1", &origin.url("/blob"), &registered)]);

    let run = setup.fetch("t/bad@1").await;

    let line = run.error("digest_mismatch");
    assert!(
        line.contains(&format!("sha256:{}", sha256_hex(&served))),
        "{line}"
    );
    assert!(
        line.contains(&format!("sha256:{}", sha256_hex(&registered))),
        "{line}"
    );
    assert_nothing_published(&setup);
    run.assert_event("failed", Some("digest_mismatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_changes_mid_transfer_fails_with_source_changed() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(MULTI_RANGE_SIZE, 14);
    publish(&setup, &origin, "t/moving@1", "/blob", &body);
    let new_body = Bytes::from(pseudo_random(MULTI_RANGE_SIZE, 15));
    origin.set_fault("/blob", Fault::ChangeAfter { gets: 3, new_body });

    let run = setup.fetch("t/moving@1").await;

    run.error("source_changed");
    assert_nothing_published(&setup);
    run.assert_event("failed", Some("source_changed"));
    assert!(origin.requests().iter().any(|l| l.status == 412));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_mismatch_fails_after_the_first_probe() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(100_000, 16);
    origin.put("/blob", body.clone());
    let mut registration = artifact("t/size@1", &origin.url("/blob"), &body);
    registration["source"]["size_bytes"] = json!(body.len() + 1);
    setup.register(&[registration]);

    let run = setup.fetch("t/size@1").await;

    run.error("size_mismatch");
    assert_nothing_published(&setup);
    run.assert_event("failed", Some("size_mismatch"));
    let requests = origin.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0].range.as_deref(), Some("bytes=0-0"));
}

// ---- refusals --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_artifact_is_refused_without_contact() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 6);
    publish(&setup, &origin, "t/known@1", "/blob", &body);

    let run = setup.fetch("t/unknown@1").await;

    run.error("not_registered");
    run.assert_event("refused", Some("not_registered"));
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_quarantined_inactive_and_denied_artifacts_are_refused() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 7);
    origin.put("/blob", body.clone());
    let base = artifact("t/x@1", &origin.url("/blob"), &body);
    let cases = [
        (
            "t/revoked@1",
            "lifecycle_state",
            json!("revoked"),
            "artifact_revoked",
        ),
        (
            "t/quarantined@1",
            "trust_state",
            json!("quarantined"),
            "artifact_quarantined",
        ),
        (
            "t/registered@1",
            "lifecycle_state",
            json!("registered"),
            "artifact_not_active",
        ),
        (
            "t/denied@1",
            "source_policy",
            json!({"decision": "deny", "policy_id": "t@2"}),
            "policy_denied",
        ),
    ];
    let registrations: Vec<Value> = cases
        .iter()
        .map(|(id, field, value, _)| {
            with_fields(&base, &[("id", json!(id)), (field, value.clone())])
        })
        .collect();
    setup.register(&registrations);

    for (id, _, _, code) in cases {
        let run = setup.fetch(id).await;
        run.error(code);
        run.assert_event("refused", Some(code));
    }
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

/// `base` with top-level `fields` replaced.
fn with_fields(base: &Value, fields: &[(&str, Value)]) -> Value {
    let mut value = base.clone();
    for (name, field) in fields {
        value[*name] = field.clone();
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_off_the_allowlist_is_refused_before_any_request() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 8);
    origin.put("/blob", body.clone());
    let uri = format!("http://localhost:{}/blob", origin.addr().port());
    setup.register(&[artifact("t/elsewhere@1", &uri, &body)]);

    let run = setup.fetch("t/elsewhere@1").await;

    run.error("source_not_allowed");
    run.assert_event("refused", Some("source_not_allowed"));
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_off_the_allowlist_is_not_followed() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 9);
    origin.put("/blob", body.clone());
    let location = format!("http://localhost:{}/blob", origin.addr().port());
    origin.set_fault("/r", redirect(location, 302));
    setup.register(&[artifact("t/away@1", &origin.url("/r"), &body)]);

    let run = setup.fetch("t/away@1").await;

    run.error("source_not_allowed");
    assert_eq!(run.event()["error_code"], "source_not_allowed");
    let requests = origin.requests();
    assert!(!requests.is_empty(), "the registered URI was never asked");
    assert!(requests.iter().all(|l| l.path == "/r"), "{requests:#?}");
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_file_or_another_scheme_is_refused() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let port = origin.addr().port();
    let targets = [
        "file:///etc/passwd".to_owned(),
        format!("ftp://127.0.0.1:{port}/blob"),
        format!("ws://127.0.0.1:{port}/blob"),
        "data:text/plain,hello".to_owned(),
    ];
    for (n, location) in targets.iter().enumerate() {
        let path = format!("/r{n}");
        origin.set_fault(&path, redirect(location.clone(), 302));
        let id = format!("t/scheme{n}@1");
        setup.register(&[artifact(&id, &origin.url(&path), b"hello")]);

        let run = setup.fetch(&id).await;

        let line = run.error("source_not_allowed");
        assert!(!line.contains("root:"), "{location}: {line}");
        run.assert_event("refused", Some("source_not_allowed"));
        let requests = origin.requests();
        assert!(
            requests.iter().all(|l| l.path.starts_with("/r")),
            "{requests:#?}"
        );
        assert_nothing_published(&setup);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_an_http_date_retry_after_is_retried_and_the_blob_staged() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(200_000, 13);
    publish(&setup, &origin, "t/throttled@1", "/blob", &body);
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    let throttled = Fault::Status {
        status: 429,
        retry_after: Some(httpdate::fmt_http_date(later)),
        times: 1,
    };
    origin.set_fault("/blob", throttled);

    let run = setup.fetch("t/throttled@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/throttled@1", &body);
    assert!(has_warning(&run), "no retry warning: {run:#?}");
    let statuses: Vec<u16> = origin.requests().iter().map(|l| l.status).collect();
    assert_eq!(statuses.first(), Some(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_without_insecure_http_is_refused() {
    let options = ConfigOptions {
        insecure_http: false,
        ..ConfigOptions::default()
    };
    let (setup, origin) = (Setup::with(options), Origin::start().await);
    let body = pseudo_random(1000, 17);
    publish(&setup, &origin, "t/plain@1", "/blob", &body);

    let run = setup.fetch("t/plain@1").await;

    run.error("insecure_source");
    run.assert_event("refused", Some("insecure_source"));
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_with_too_many_redirects() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let location = origin.url("/loop");
    origin.set_fault("/loop", redirect(location, 302));
    let hex = sha256_hex(b"never");
    setup.register(&[artifact_without_size(
        "t/loop@1",
        &origin.url("/loop"),
        &hex,
    )]);

    let run = setup.fetch("t/loop@1").await;

    run.error("too_many_redirects");
    run.assert_event("failed", Some("too_many_redirects"));
    let hops = origin.get_count("/loop");
    assert!((2..=50).contains(&hops), "{hops} requests for /loop");
    assert_nothing_published(&setup);
}

// ---- command line and configuration --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_describes_the_staged_blob() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(200_000, 19);
    publish(&setup, &origin, "t/json@1", "/blob", &body);
    let hex = sha256_hex(&body);

    let run = setup.fetch_with(&["--json", "t/json@1"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let staged = parse_json_line(&run);
    assert_eq!(staged["path"], setup.blob_path(&hex).display().to_string());
    assert_eq!(staged["digest"], format!("sha256:{hex}"));
    assert_eq!(staged["size"], json!(body.len()));
    assert_eq!(staged["bytes_transferred"], json!(body.len()));
    assert!(
        staged["seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{staged}"
    );
    assert_eq!(staged["outcome"], "staged");

    let again = parse_json_line(&setup.fetch_with(&["--json", "t/json@1"]).await);
    assert_eq!(again["outcome"], "already_present");
    assert_eq!(again["bytes_transferred"], 0);
    assert_eq!(again["size"], json!(body.len()));
}

/// Asserts stdout is one line of one JSON object and returns it.
fn parse_json_line(run: &Run) -> Value {
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
    let value: Value = serde_json::from_str(&run.stdout).expect("stdout is JSON");
    let keys = [
        "path",
        "digest",
        "size",
        "bytes_transferred",
        "bytes_resumed",
        "bytes_read_back",
        "connections",
        "seconds",
        "outcome",
    ];
    let object = value.as_object().expect("a JSON object");
    let mut found: Vec<&str> = object.keys().map(String::as_str).collect();
    found.sort_unstable();
    let mut wanted = keys.to_vec();
    wanted.sort_unstable();
    assert_eq!(found, wanted);
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_configuration_key_exits_64_before_anything_else() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 20);
    publish(&setup, &origin, "t/cfg@1", "/blob", &body);
    let options = ConfigOptions {
        extra: "[transfer_typo]\nchunk_size = '1MiB'\n".into(),
        ..ConfigOptions::default()
    };
    setup.write_config(&setup.config_text(&options));

    let run = setup.fetch("t/cfg@1").await;

    run.failed_with(64, "config_invalid");
    assert!(run.events.is_empty(), "{run:#?}");
    assert!(!setup.events_path().exists(), "events log written");
    assert_eq!(origin.requests(), Vec::new());
    assert!(
        !setup.state_dir().exists(),
        "state touched before the config was valid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_environment_key_exits_64() {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 21);
    publish(&setup, &origin, "t/envtypo@1", "/blob", &body);
    setup.env("BLOBSTAGE_TRANSFER_CONECTIONS_PER_BLOB", "2");

    let run = setup.fetch("t/envtypo@1").await;

    run.failed_with(64, "config_invalid");
    assert!(run.events.is_empty(), "{run:#?}");
    assert_eq!(origin.requests(), Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_override_limits_connections_per_blob() {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    let front = Front::start(origin.addr(), held(Duration::from_millis(20))).await;
    let body = pseudo_random(MULTI_RANGE_SIZE / 2, 22);
    origin.put("/blob", body.clone());
    setup.register(&[artifact("t/env@1", &front.url("/blob"), &body)]);
    setup.env("BLOBSTAGE_TRANSFER_CONNECTIONS_PER_BLOB", "1");
    setup.env("BLOBSTAGE_TRANSFER_MAX_CONNECTIONS_PER_BLOB", "1");

    let run = setup.fetch("t/env@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/env@1", &body);
    assert!(content_gets(&origin, "/blob").len() > 1);
    assert_eq!(front.max_concurrent(), 1, "one connection per blob");
    assert_eq!(origin.max_concurrent(), 1);
}

// ---- more of the contract ----------------------------------------------------------------

/// A registration of `body` at `uri` whose entry carries a development bearer token.
fn with_bearer(id: &str, uri: &str, body: &[u8]) -> Value {
    let mut registration = artifact(id, uri, body);
    registration["credential"] = json!({"kind": "bearer", "token": TOKEN});
    registration
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_is_sent_on_every_request_to_the_registered_origin() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(200_000, 24);
    origin.put("/blob", body.clone());
    setup.register(&[with_bearer("t/private@1", &origin.url("/blob"), &body)]);

    let run = setup.fetch("t/private@1").await;

    assert_published(&setup, &run, &body);
    let requests = origin.requests();
    assert!(requests.len() > 1, "{requests:#?}");
    let bearer = format!("Bearer {TOKEN}");
    let authorized = |l: &Logged| l.authorization.as_deref() == Some(bearer.as_str());
    assert!(requests.iter().all(authorized), "{requests:#?}");
    assert_token_not_printed(&setup, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_is_not_sent_to_a_redirect_target_elsewhere() {
    let (setup, registered) = (Setup::new(), Origin::start().await);
    let elsewhere = Origin::start().await;
    let body = pseudo_random(200_000, 25);
    elsewhere.put("/blob", body.clone());
    registered.set_fault("/r", redirect(elsewhere.url("/blob"), 307));
    setup.register(&[with_bearer("t/moved@1", &registered.url("/r"), &body)]);

    let run = setup.fetch("t/moved@1").await;

    assert_published(&setup, &run, &body);
    let hops = registered.requests();
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        hops.iter()
            .all(|l| l.authorization.as_deref() == Some(bearer.as_str()))
    );
    let moved = elsewhere.requests();
    assert!(moved.len() > 1, "{moved:#?}");
    assert!(
        moved.iter().all(|l| l.authorization.is_none()),
        "token leaked: {moved:#?}"
    );
    assert_token_not_printed(&setup, &run);
}

/// Asserts the token appears neither in the output nor in the events.
fn assert_token_not_printed(setup: &Setup, run: &Run) {
    let printed = format!("{}{}{:?}", run.stdout, run.stderr, setup.all_events());
    assert!(!printed.contains(TOKEN), "token printed: {printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_range_other_than_asked_is_a_bad_source_response() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(300_000, 35);
    publish(&setup, &origin, "t/shifted@1", "/blob", &body);
    origin.set_fault("/blob", Fault::WrongContentRange);

    let run = setup.fetch("t/shifted@1").await;

    run.error("bad_source_response");
    run.assert_event("failed", Some("bad_source_response"));
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_range_longer_than_announced_is_a_bad_source_response() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(300_000, 27);
    publish(&setup, &origin, "t/long@1", "/blob", &body);
    origin.set_fault("/blob", Fault::Overlong { extra: 100 });

    let run = setup.fetch("t/long@1").await;

    run.error("bad_source_response");
    run.assert_event("failed", Some("bad_source_response"));
    assert!(setup.blobs().is_empty());

    // What was kept for a resume holds no byte past its ranges: once the origin behaves, the
    // resumed blob verifies.
    origin.clear_fault("/blob");
    let run = setup.fetch("t/long@1").await;
    assert_published(&setup, &run, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_object_is_source_not_found() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let hex = sha256_hex(b"gone");
    setup.register(&[artifact_without_size(
        "t/gone@1",
        &origin.url("/gone"),
        &hex,
    )]);

    let run = setup.fetch_with(&["--json", "t/gone@1"]).await;

    run.error("source_not_found");
    run.assert_event("failed", Some("source_not_found"));
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_keeps_failing_is_given_up_on_within_max_attempts() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(100_000, 26);
    publish(&setup, &origin, "t/down@1", "/blob", &body);
    let down = Fault::Status {
        status: 500,
        retry_after: None,
        times: usize::MAX,
    };
    origin.set_fault("/blob", down);

    let run = setup.fetch("t/down@1").await;

    run.error("source_unavailable");
    run.assert_event("failed", Some("source_unavailable"));
    let gets = origin.get_count("/blob");
    assert!((1..=4).contains(&gets), "{gets} GETs with max_attempts = 4");
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deprecated_artifact_is_staged_with_a_warning() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 27);
    origin.put("/blob", body.clone());
    let mut registration = artifact("t/old@1", &origin.url("/blob"), &body);
    registration["lifecycle_state"] = json!("deprecated");
    setup.register(&[registration]);

    let run = setup.fetch("t/old@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/old@1", &body);
    assert!(has_warning(&run), "no deprecation warning: {run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_channel_and_trust_policy_refuse_before_any_request() {
    let options = ConfigOptions {
        extra: "[policy]\nchannels = ['dev']\nmin_trust = { dev = 'signed' }\n".into(),
        ..ConfigOptions::default()
    };
    let (setup, origin) = (Setup::with(options), Origin::start().await);
    let body = pseudo_random(1000, 28);
    origin.put("/blob", body.clone());
    let base = artifact("t/x@1", &origin.url("/blob"), &body);
    setup.register(&[
        with_fields(&base, &[("id", json!("t/prod@1"))]),
        with_fields(
            &base,
            &[("id", json!("t/dev@1")), ("channel", json!("dev"))],
        ),
    ]);

    let prod = setup.fetch("t/prod@1").await;
    prod.error("channel_not_allowed");
    prod.assert_event("refused", Some("channel_not_allowed"));
    let dev = setup.fetch("t/dev@1").await;
    dev.error("trust_too_low");
    dev.assert_event("refused", Some("trust_too_low"));
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_blob_is_not_handed_out_once_its_artifact_is_revoked() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 29);
    publish(&setup, &origin, "t/late@1", "/blob", &body);
    let staged = setup.fetch("t/late@1").await;
    assert_published(&setup, &staged, &body);
    let mut revoked = artifact("t/late@1", &origin.url("/blob"), &body);
    revoked["lifecycle_state"] = json!("revoked");
    setup.register(&[revoked]);

    let run = setup.fetch("t/late@1").await;

    run.error("artifact_revoked");
    run.assert_event("refused", Some("artifact_revoked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha512_registration_is_staged_under_its_algorithm() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(150_000, 30);
    origin.put("/blob", body.clone());
    let hex = sha512_hex(&body);
    let mut registration = artifact("t/512@1", &origin.url("/blob"), &body);
    registration["digest"] = json!(format!("sha512:{hex}"));
    setup.register(&[registration]);

    let run = setup.fetch("t/512@1").await;

    let path = run.staged_path();
    assert!(path.ends_with(format!("blobs/sha512/{hex}")), "{path:?}");
    assert!(fs::read(&path).unwrap() == body);
    run.assert_event("staged", None);
    assert_eq!(run.event()["digest"], format!("sha512:{hex}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_without_contact() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(1000, 31);
    origin.put("/blob", body.clone());
    let base = artifact("t/x@1", &origin.url("/blob"), &body);
    let hex = sha256_hex(&body);
    let cases = [
        (
            "t/upper@1",
            "digest",
            json!(format!("sha256:{}", hex.to_uppercase())),
        ),
        ("t/short@1", "digest", json!("sha256:abc")),
        (
            "t/md5@1",
            "digest",
            json!("md5:0123456789abcdef0123456789abcdef"),
        ),
        ("t/nodigest@1", "digest", Value::Null),
        ("t/archived@1", "lifecycle_state", json!("archived")),
        ("t/trusty@1", "trust_state", json!("very_trusted")),
        ("t/maybe@1", "source_policy", json!({"decision": "maybe"})),
    ];
    let mut registrations: Vec<Value> = cases
        .iter()
        .map(|(id, field, value)| with_fields(&base, &[("id", json!(id)), (field, value.clone())]))
        .collect();
    let twice = with_fields(&base, &[("id", json!("t/twice@1"))]);
    registrations.extend([twice.clone(), twice]);
    setup.register(&registrations);

    let ids = cases.iter().map(|(id, _, _)| *id).chain(["t/twice@1"]);
    for id in ids {
        let run = setup.fetch(id).await;
        run.error("invalid_registration");
        run.assert_event("refused", Some("invalid_registration"));
    }
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_from_disk_without_a_memory_window_verifies_the_same_blob() {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(MULTI_RANGE_SIZE, 32);
    publish(&setup, &origin, "t/window@1", "/blob", &body);
    setup.env("BLOBSTAGE_TRANSFER_HASH_WINDOW", "0");

    let run = setup.fetch("t/window@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/window@1", &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_ingest_file_does_not_disturb_the_next_fetch() {
    let (setup, origin) = (Setup::new(), Origin::start().await);
    let body = pseudo_random(300_000, 33);
    publish(&setup, &origin, "t/crashed@1", "/blob", &body);
    let ingest = setup.state_dir().join("ingest");
    fs::create_dir_all(&ingest).unwrap();
    let leftover = ingest.join(format!("sha256-{}", sha256_hex(&body)));
    fs::write(&leftover, pseudo_random(400_000, 34)).unwrap();

    let run = setup.fetch("t/crashed@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/crashed@1", &body);
}

// ---- TLS -------------------------------------------------------------------------------

/// A TLS origin serving `body` at `/blob`, registered as `id` on a node that has the
/// origin's test CA in `ca.pem` and trusts it (`[sources.https] ca_file`) only if `trust`.
async fn tls_node(trust: bool, id: &str, body: &[u8]) -> (Setup, Origin) {
    let (origin, ca) = Origin::start_tls().await;
    let setup = Setup::with(ConfigOptions::https(trust.then_some("ca.pem")));
    setup.write_file("ca.pem", &ca.cert_pem);
    publish(&setup, &origin, id, "/blob", body);
    (setup, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_staged_over_tls_with_a_configured_ca() {
    let body = pseudo_random(300 * 1024, 36);
    let (setup, origin) = tls_node(true, "t/tls@1", &body).await;
    assert!(origin.url("/blob").starts_with("https://127.0.0.1:"));

    let run = setup.fetch("t/tls@1").await;

    assert_published(&setup, &run, &body);
    assert_staged_event(&run, "t/tls@1", &body);
    let gets = content_gets(&origin, "/blob");
    assert!(gets.len() > 1, "several ranged GETs: {gets:#?}");
    assert!(gets.iter().all(|g| g.status == 206), "{gets:#?}");
    assert_ranges_tile(ranges(&gets), body.len() as u64);
    assert_eq!(origin.failed_handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_without_contacting_past_the_handshake() {
    let body = pseudo_random(300 * 1024, 37);
    let (setup, origin) = tls_node(false, "t/untrusted@1", &body).await;

    let run = setup.fetch("t/untrusted@1").await;

    let line = run.error("source_unavailable");
    assert!(
        line.contains("certificate"),
        "the cause is not shown: {line}"
    );
    run.assert_event("failed", Some("source_unavailable"));
    // A certificate that is not trusted will not become trusted: one handshake, no retries.
    assert_eq!(origin.failed_handshakes(), 1, "{run:#?}");
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_that_holds_no_certificate_is_a_configuration_error() {
    let body = pseudo_random(1000, 38);
    let (setup, origin) = tls_node(true, "t/badca@1", &body).await;
    let broken_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n";
    for text in [broken_pem, "not a certificate\n", ""] {
        setup.write_file("ca.pem", text);

        let run = setup.fetch("t/badca@1").await;

        run.failed_with(64, "config_invalid");
        assert!(run.events.is_empty(), "{run:#?}");
    }
    assert_eq!(origin.failed_handshakes(), 0);
    assert_eq!(origin.requests(), Vec::new());
    assert_nothing_published(&setup);
}
