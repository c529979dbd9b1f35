//! Resume: a `fetch` killed with SIGKILL restarts where its last checkpoint left it.
//!
//! Each test freezes a real transfer at a known point with the origin's `StallFrom` fault
//! (everything before an offset is served, every request from it on stalls), waits until the
//! origin has sent all it will, kills the process, and runs `fetch` again on the same state
//! directory. The origin's byte counters prove how much was fetched twice; the journal left by
//! the killed run says how far it had hashed, and the second run's `--json` output says how
//! much it kept and how much it read back from the ingest file.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{CHUNK, Run, Setup, artifact, pseudo_random, sha256_hex};
use support::origin::{Fault, Origin};

/// The suite's `connections_per_blob`.
const CONNECTIONS: u64 = 4;

/// 40 ranges and a short last one.
const SIZE: usize = 40 * CHUNK as usize + 777;

/// A node whose stalled connections wait rather than time out, so a frozen run stays frozen
/// until the test kills it.
fn patient_setup() -> Setup {
    let mut setup = Setup::new();
    setup.env("BLOBSTAGE_TRANSFER_READ_TIMEOUT", "60s");
    setup
}

fn ingest_path(setup: &Setup, body: &[u8]) -> PathBuf {
    setup
        .state_dir()
        .join("ingest")
        .join(format!("sha256-{}", sha256_hex(body)))
}

fn journal_path(setup: &Setup, body: &[u8]) -> PathBuf {
    let mut path = ingest_path(setup, body).into_os_string();
    path.push(".journal");
    path.into()
}

/// The JSON body of a journal (its second line).
fn read_journal(setup: &Setup, body: &[u8]) -> Value {
    let text = fs::read_to_string(journal_path(setup, body)).expect("a journal");
    let body = text.split_once('\n').expect("checksum line").1;
    serde_json::from_str(body).expect("journal JSON")
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the origin has stopped sending and the journal has stopped changing (the last
/// checkpoint is written; under a busy disk its `fdatasync` can take a while), then kills
/// `child` with SIGKILL.
async fn kill_when_frozen(
    mut child: Child,
    origin: &Origin,
    path: &str,
    stalled: usize,
    journal: &std::path::Path,
) {
    let stalled_gets = || {
        let log = origin.requests();
        log.iter()
            .filter(|l| l.path == path && l.method == "GET")
            .count()
    };
    wait_until("the transfer stalls", || stalled_gets() >= stalled).await;
    let observe = || (origin.body_bytes_sent(path), fs::read(journal).ok());
    let mut last = observe();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = observe();
        if now == last {
            break;
        }
        last = now;
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(
        status.code().is_none(),
        "the fetch ended by itself before the kill: {status}"
    );
}

fn path_of(json: &Value) -> PathBuf {
    PathBuf::from(json["path"].as_str().expect("a path"))
}

fn json_of(run: &Run) -> Value {
    assert_eq!(run.code, 0, "{run:#?}");
    serde_json::from_str(run.stdout.trim()).expect("--json output")
}

/// No blob path exists for `body` and nothing else is under blobs/.
fn assert_unpublished(setup: &Setup) {
    assert_eq!(
        setup.blobs(),
        Vec::<PathBuf>::new(),
        "a blob was published by a killed run"
    );
}

/// Freezes a fetch of `body` with every range from `offset` stalling after `after` bytes,
/// kills it, and returns the origin's bytes sent so far.
async fn killed_run(setup: &Setup, origin: &Origin, body: &[u8], offset: u64, after: u64) -> u64 {
    origin.set_fault("/blob", Fault::StallFrom { offset, after });
    let child = setup.spawn_fetch(&["t/blob@1"]);
    let gets_before_offset = (offset / CHUNK) as usize + 1;
    let expected_stalls = if offset == 0 {
        1
    } else {
        gets_before_offset + CONNECTIONS as usize
    };
    let ranges = body.len().div_ceil(CHUNK as usize) + 1;
    let journal = journal_path(setup, body);
    kill_when_frozen(
        child,
        origin,
        "/blob",
        expected_stalls.min(ranges),
        &journal,
    )
    .await;
    origin.clear_fault("/blob");
    assert_unpublished(setup);
    origin.body_bytes_sent("/blob")
}

/// Runs `fetch --json` to the end and returns its output and the content bytes it fetched
/// (the one-byte probe excluded).
async fn resumed_run(setup: &Setup, origin: &Origin, body: &[u8]) -> (Value, u64) {
    let before = origin.body_bytes_sent("/blob");
    let run = setup.fetch_with(&["--json", "t/blob@1"]).await;
    let json = json_of(&run);
    if json["bytes_resumed"] == 0 {
        eprintln!("the resumed run kept nothing: {}", run.stderr);
    }
    assert_eq!(fs::read(path_of(&json)).unwrap(), body);
    assert_eq!(json["outcome"], "staged");
    let fetched = origin.body_bytes_sent("/blob") - before - 1;
    assert!(!ingest_path(setup, body).exists() && !journal_path(setup, body).exists());
    (json, fetched)
}

fn serve(setup: &Setup, origin: &Origin, body: &[u8]) {
    origin.put("/blob", body.to_vec());
    setup.register(&[artifact("t/blob@1", &origin.url("/blob"), body)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_range_costs_less_than_a_chunk_per_connection_and_rehashes_nothing() {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, 31);
    serve(&setup, &origin, &body);

    let sent = killed_run(&setup, &origin, &body, 24 * CHUNK, 20_000).await;
    let journal = read_journal(&setup, &body);
    let hashed = journal["hashed"].as_u64().unwrap();
    let kept: u64 = journal["written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap())
        .sum();
    assert!(hashed > 0 && kept >= hashed, "{journal}");

    let (json, fetched) = resumed_run(&setup, &origin, &body).await;
    let refetched = sent + fetched - SIZE as u64;
    assert!(
        refetched <= CONNECTIONS * CHUNK,
        "{refetched} bytes fetched twice"
    );
    assert_eq!(json["bytes_resumed"], kept);
    assert_eq!(json["bytes_transferred"], SIZE as u64 - kept);
    let read_back = json["bytes_read_back"].as_u64().unwrap();
    assert!(
        read_back <= SIZE as u64 - hashed,
        "read back {read_back}, hashed before {hashed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_first_range_starts_clean() {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, 32);
    serve(&setup, &origin, &body);

    let sent = killed_run(&setup, &origin, &body, 0, 0).await;
    assert_eq!(sent, 0);
    assert!(!journal_path(&setup, &body).exists());

    let (json, fetched) = resumed_run(&setup, &origin, &body).await;
    assert_eq!(fetched, SIZE as u64);
    assert_eq!(json["bytes_resumed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_last_range_resumes_the_tail() {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, 33);
    serve(&setup, &origin, &body);

    let last = (SIZE as u64 / CHUNK) * CHUNK;
    let sent = killed_run(&setup, &origin, &body, last, 500).await;
    let (json, fetched) = resumed_run(&setup, &origin, &body).await;
    assert!(sent + fetched - SIZE as u64 <= CONNECTIONS * CHUNK);
    assert!(json["bytes_resumed"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_changed_between_runs_is_fetched_again_from_the_start() {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, 34);
    serve(&setup, &origin, &body);
    killed_run(&setup, &origin, &body, 20 * CHUNK, 1000).await;
    assert!(journal_path(&setup, &body).exists());

    // The same bytes under a new ETag: another version as far as the node can tell.
    origin.put("/blob", body.clone());
    let run = setup.fetch_with(&["--json", "t/blob@1"]).await;
    let json = json_of(&run);
    assert_eq!(json["bytes_resumed"], 0);
    assert_eq!(json["bytes_transferred"], SIZE as u64);
    assert!(
        run.stderr.contains("discarding the partial transfer"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("validator"), "{}", run.stderr);
}

/// Kills a run mid-way, damages its journal with `damage`, and checks that the next run
/// refuses the journal, starts clean, and stages the right bytes.
async fn damaged_journal_starts_clean(seed: u64, damage: impl FnOnce(&PathBuf)) {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, seed);
    serve(&setup, &origin, &body);
    killed_run(&setup, &origin, &body, 16 * CHUNK, 1000).await;
    damage(&journal_path(&setup, &body));

    let run = setup.fetch_with(&["--json", "t/blob@1"]).await;
    let json = json_of(&run);
    assert_eq!(fs::read(path_of(&json)).unwrap(), body);
    assert_eq!(json["bytes_resumed"], 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("discarding the partial transfer"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_journal_is_refused() {
    damaged_journal_starts_clean(35, |path| {
        let text = fs::read(path).unwrap();
        fs::write(path, &text[..text.len() / 2]).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_with_flipped_bytes_is_refused() {
    damaged_journal_starts_clean(36, |path| {
        let mut text = fs::read(path).unwrap();
        let at = text.len() - 10;
        text[at] ^= 0x20;
        fs::write(path, text).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_from_another_blob_is_refused() {
    let (setup, origin) = (patient_setup(), Origin::start().await);
    let body = pseudo_random(SIZE, 37);
    serve(&setup, &origin, &body);
    killed_run(&setup, &origin, &body, 20 * CHUNK, 1000).await;

    // Another artifact of the same size finds this blob's journal and data at its own paths.
    let other = pseudo_random(SIZE, 38);
    origin.put("/other", other.clone());
    setup.register(&[artifact("t/other@1", &origin.url("/other"), &other)]);
    fs::rename(ingest_path(&setup, &body), ingest_path(&setup, &other)).unwrap();
    fs::rename(journal_path(&setup, &body), journal_path(&setup, &other)).unwrap();

    let run = setup.fetch_with(&["--json", "t/other@1"]).await;
    let json = json_of(&run);
    assert_eq!(fs::read(path_of(&json)).unwrap(), other);
    assert_eq!(json["bytes_resumed"], 0);
    assert!(run.stderr.contains("another digest"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_state_dir_transfer_once() {
    let (mut setup, origin) = (Setup::new(), Origin::start().await);
    setup.env("BLOBSTAGE_TRANSFER_READ_TIMEOUT", "1s");
    let body = pseudo_random(SIZE, 39);
    serve(&setup, &origin, &body);
    // Slows the first process down (one stalled range, retried after 1 s) while the second
    // starts and has to wait for the ingest.
    origin.set_fault(
        "/blob",
        Fault::Stall {
            after: 1000,
            times: 2,
        },
    );

    let (first, second) = tokio::join!(setup.fetch_with(&["--json", "t/blob@1"]), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        setup.fetch_with(&["--json", "t/blob@1"]).await
    });
    let outcomes = [
        json_of(&first)["outcome"].clone(),
        json_of(&second)["outcome"].clone(),
    ];
    assert_eq!(
        outcomes,
        ["staged", "already_present"],
        "{first:#?}\n{second:#?}"
    );
    assert_eq!(json_of(&first)["path"], json_of(&second)["path"]);
    let content_gets = origin
        .requests()
        .iter()
        .filter(|l| l.range.as_deref() != Some("bytes=0-0"))
        .count();
    let ranges = SIZE.div_ceil(CHUNK as usize);
    assert!(
        content_gets <= ranges + 1,
        "{content_gets} content requests for {ranges} ranges"
    );
}

/// Gives the node's files to `nobody` when the tests run as root, so that its runs, started
/// as `nobody` by [`as_node_user`], meet file modes as the service user would: root may write
/// a read-only file, the service user may not.
fn hand_to_service_user(setup: &Setup) {
    fn chown_all(path: &std::path::Path) {
        std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
        if path.is_dir() && !path.is_symlink() {
            for entry in fs::read_dir(path).unwrap() {
                chown_all(&entry.unwrap().path());
            }
        }
    }
    if switches_to_service_user() {
        chown_all(setup.root());
    }
}

const NOBODY: u32 = 65534;

/// Root, with a binary that `nobody` can reach and run (every directory above it searchable by
/// others): the runs then switch to `nobody`.
fn switches_to_service_user() -> bool {
    use std::os::unix::fs::MetadataExt;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_blobstage"));
    let reachable = binary
        .ancestors()
        .skip(1)
        .all(|dir| fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0));
    fs::metadata("/proc/self").unwrap().uid() == 0 && reachable
}

/// `fetch` with `args`, as `nobody` when the tests run as root.
fn as_node_user(setup: &Setup, args: &[&str]) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut command = setup.fetch_command(args);
    if switches_to_service_user() {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

/// SIGKILL in the middle of a publish, the process held there by the debug builds'
/// `BLOBSTAGE_PAUSE_AT`. Killed before the rename, nothing is at the blob path, and the next
/// run (as the service user, who cannot open the read-only ingest for writing as it is)
/// resumes it, fetching again only what the last checkpoint had not recorded. Killed after the rename, the blob is
/// whole and read-only, and the next run answers from the store and clears what the killed
/// run left in `ingest/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_publish_leaves_no_blob_or_the_whole_verified_one() {
    for (point, seed) in [("publish-before-rename", 34), ("publish-after-rename", 35)] {
        let (setup, origin) = (Setup::new(), Origin::start().await);
        let body = pseudo_random(SIZE, seed);
        serve(&setup, &origin, &body);
        hand_to_service_user(&setup);
        let blob = setup.blob_path(&sha256_hex(&body));
        let ingest = ingest_path(&setup, &body);

        let mut paused = as_node_user(&setup, &["t/blob@1"]);
        paused.env("BLOBSTAGE_PAUSE_AT", point);
        paused.stdout(Stdio::null()).stderr(Stdio::null());
        let child = paused.spawn().expect("start blobstage");
        let reached = |_: &Child| match point {
            "publish-before-rename" => {
                fs::metadata(&ingest).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o444)
            }
            _ => blob.exists(),
        };
        kill_when(child, point, reached).await;

        let sent = origin.body_bytes_sent("/blob");
        let output = as_node_user(&setup, &["--json", "t/blob@1"])
            .output()
            .expect("run blobstage");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{point}: {stderr}");
        let json: Value = serde_json::from_slice(&output.stdout).expect("--json output");
        let expected = match point {
            "publish-before-rename" => "staged",
            _ => "already_present",
        };
        assert_eq!(json["outcome"], expected, "{point}: {stderr}");
        // Only what the last checkpoint had not recorded is fetched again.
        let again = json["bytes_transferred"].as_u64().unwrap();
        assert!(again <= CONNECTIONS * CHUNK, "{point}: {json}");
        // The one-byte probe, for a run that goes to the source at all.
        let probe = u64::from(expected == "staged");
        assert_eq!(
            origin.body_bytes_sent("/blob"),
            sent + again + probe,
            "{point}"
        );
        assert_eq!(fs::read(&blob).unwrap(), body, "{point}");
        let meta = fs::metadata(&blob).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{point}");
        if switches_to_service_user() {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                meta.uid(),
                NOBODY,
                "{point}: the blob is not the service user's"
            );
        }
        assert!(setup.ingest_is_empty(), "{point}: files left in ingest/");
    }
}

/// Waits (30 s at most) until `reached` holds while `child` is still running, then kills it
/// with SIGKILL.
async fn kill_when(mut child: Child, point: &str, reached: impl Fn(&Child) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reached(&child) {
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "{point}: the fetch ended first: {exited:?}"
        );
        assert!(Instant::now() < deadline, "{point}: never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reached, but perhaps not yet parked there: the pause is what comes next.
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(
        status.code().is_none(),
        "{point}: ended by itself: {status}"
    );
}
