//! The state directory on a small or read-only filesystem made for the test (a tmpfs mounted
//! over `<root>/state`; the tests need root, and skip with a message without it): a disk that
//! has no room for the blob (refused before any byte is fetched: the ingest file reserves the
//! blob's size), one that fills during the transfer (the reserved blob is still staged, and its
//! event goes to the control plane directly when the outbox cannot be written), and a state dir
//! that cannot be written at all. Nothing unverified is ever at a blob path, and every run's
//! event is recorded.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::agent::{Setup, artifact, pseudo_random};
use support::daemon::Node;
use support::front::{Front, FrontOptions};
use support::origin::Origin;

/// A tmpfs mounted at a directory for the life of the value.
struct Mount {
    at: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `size` bytes at `at` (created), or `None` when this process may not
    /// mount (not root, or no mount namespace rights).
    fn tmpfs(at: &Path, size: u64) -> Option<Mount> {
        Mount::tmpfs_with(at, &format!("size={size}"))
    }

    /// Like [`Mount::tmpfs`], with the mount options `options` (`size=...,nr_inodes=...`).
    fn tmpfs_with(at: &Path, options: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let options = format!("{options},mode=0755");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!(
                "skipped: cannot mount a tmpfs at {} (not root?)",
                at.display()
            );
            return None;
        }
        Some(Mount { at: at.to_owned() })
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.at)
            .status()
            .unwrap();
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// A node whose state dir is a tmpfs of `size` bytes, and a blob of `blob` bytes registered
/// as `t/big@1`, reached through a relay that holds every request for `delay`.
async fn node_on_tmpfs(
    size: u64,
    blob: usize,
    delay: Duration,
) -> Option<(Setup, Mount, Origin, Front, Vec<u8>)> {
    let setup = Setup::new();
    let mount = Mount::tmpfs(&setup.state_dir(), size)?;
    let origin = Origin::start().await;
    let body = pseudo_random(blob, 7);
    origin.put("/big", body.clone());
    let options = FrontOptions {
        delay,
        ..FrontOptions::default()
    };
    let front = Front::start(origin.addr(), options).await;
    setup.register(&[artifact("t/big@1", &front.url("/big"), &body)]);
    Some((setup, mount, origin, front, body))
}

/// GETs of the blob's content, the one-byte probe aside.
fn content_gets(front: &Front) -> usize {
    let seen = front.seen();
    let probe = |s: &&support::front::Seen| s.range.as_deref() == Some("bytes=0-0");
    seen.iter()
        .filter(|s| s.method == "GET" && !probe(s))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_free_space_fails_before_any_byte_and_records_its_event() {
    let Some((setup, mount, _origin, front, body)) =
        node_on_tmpfs(1 << 20, 3 << 20, Duration::ZERO).await
    else {
        return;
    };

    let run = setup.fetch("t/big@1").await;

    let line = run.error("disk_full");
    assert!(line.contains("reserve space"), "{line}");
    run.assert_event("failed", Some("disk_full"));
    assert_eq!(content_gets(&front), 0, "{:?}", front.seen());
    assert!(setup.blobs().is_empty());
    let left: Vec<_> = std::fs::read_dir(setup.state_dir().join("ingest"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "a failed reservation left {left:?}");

    // Room again: the next run stages the blob.
    mount.remount("size=8m");
    let run = setup.fetch("t/big@1").await;
    assert_eq!(std::fs::read(run.staged_path()).unwrap(), body);
    run.assert_event("staged", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_during_the_transfer_still_stages_the_blob_it_reserved() {
    let Some((setup, _mount, _origin, _front, body)) =
        node_on_tmpfs(4 << 20, 2 << 20, Duration::from_millis(50)).await
    else {
        return;
    };
    let journal = setup.state_dir().join("ingest").join(format!(
        "sha256-{}.journal",
        support::agent::sha256_hex(&body)
    ));

    let mut child = setup.fetch_command(&["--json", "t/big@1"]);
    let child = child
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the transfer has checkpointed, something else takes every free byte.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !journal.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fill(&setup.state_dir().join("filler"));
    let stderr = staged(child, &body).await;

    let warnings = stderr.matches("cannot record progress").count();
    assert_eq!(warnings, 1, "{stderr}");
    let events = setup.all_events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "staged");
}

/// The disk fills up, blocks and inodes, at the very moment of the publish: the run is held
/// just before its rename (debug builds' `BLOBSTAGE_PAUSE_AT`, let go by
/// `BLOBSTAGE_PAUSE_UNTIL`) while everything left is taken. The publish needs no new space (the
/// blob's blocks were reserved with the ingest file, `blobs/sha256/` exists, and a rename
/// allocates nothing), so the blob is staged whole, and its event is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_exactly_during_the_publish_still_stages_the_blob() {
    let setup = Setup::new();
    let Some(_mount) = Mount::tmpfs_with(&setup.state_dir(), "size=8m,nr_inodes=64") else {
        return;
    };
    let origin = Origin::start().await;
    let body = pseudo_random(1 << 20, 9);
    origin.put("/big", body.clone());
    setup.register(&[artifact("t/big@1", &origin.url("/big"), &body)]);
    let hex = support::agent::sha256_hex(&body);
    let ingest = setup
        .state_dir()
        .join("ingest")
        .join(format!("sha256-{hex}"));
    let go = setup.root().join("go");

    let mut command = setup.fetch_command(&["--json", "t/big@1"]);
    command
        .env("BLOBSTAGE_PAUSE_AT", "publish-before-rename")
        .env("BLOBSTAGE_PAUSE_UNTIL", &go)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    // Held before the rename: synced and made read-only, not yet at the blob path.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let held = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&ingest).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o444)
    };
    while !held() {
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the publish was not reached: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!setup.blob_path(&hex).exists());
    fill(&setup.state_dir().join("filler"));
    let inodes = setup.state_dir().join("inodes");
    std::fs::create_dir(&inodes).unwrap();
    let mut taken = 0;
    while std::fs::File::create(inodes.join(taken.to_string())).is_ok() {
        taken += 1;
    }
    let full = std::fs::File::create(setup.state_dir().join("one-more")).unwrap_err();
    assert_eq!(full.raw_os_error(), Some(28), "{full}"); // ENOSPC
    std::fs::write(&go, b"").unwrap();
    let stderr = staged(child, &body).await;

    assert_eq!(std::fs::read(setup.blob_path(&hex)).unwrap(), body);
    // The event went to the outbox in the room the publish freed (the journal), or, when
    // there was none, to the control plane directly: either way it is recorded once.
    let events = setup.all_events();
    assert_eq!(events.len(), 1, "{events:#?}\n{stderr}");
    assert_eq!(events[0]["outcome"], "staged");
}

/// Waits for a `fetch --json` run and asserts that it staged `body`; returns its stderr.
async fn staged(child: std::process::Child, body: &[u8]) -> String {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["outcome"], "staged", "{stderr}");
    assert_eq!(std::fs::read(json["path"].as_str().unwrap()).unwrap(), body);
    stderr
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    let _ = file.write_all(&[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_dir_fails_with_a_clear_code_and_records_its_event() {
    let Some((setup, mount, _origin, front, _body)) =
        node_on_tmpfs(8 << 20, 100_000, Duration::ZERO).await
    else {
        return;
    };
    // The store's directories exist (a first run made them), then the filesystem goes read-only.
    setup.fetch("t/none@1").await.error("not_registered");
    mount.remount("ro");

    let run = setup.fetch("t/big@1").await;

    run.error("state_dir_read_only");
    run.assert_event("failed", Some("state_dir_read_only"));
    assert!(setup.blobs().is_empty());
    assert!(front.seen().is_empty(), "a read-only store fetched anyway");
}

/// The daemon's state dir turns read-only under it: a pull fails with `state_dir_read_only`,
/// and its event, which the outbox cannot take, goes to the control plane directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_turning_read_only_under_the_daemon_fails_pulls_and_keeps_their_events() {
    let node = Node::new();
    let Some(mount) = Mount::tmpfs(&node.setup.state_dir(), 8 << 20) else {
        return;
    };
    let origin = Origin::start().await;
    let body = pseudo_random(100_000, 8);
    origin.put("/big", body.clone());
    node.setup
        .register(&[artifact("t/big@1", &origin.url("/big"), &body)]);
    let daemon = node.start().await;
    mount.remount("ro");

    let (status, pull) = daemon
        .request(
            "POST",
            "/v1/pulls",
            Some(&json!({"artifact_id": "t/big@1"})),
        )
        .await;
    let code = match status {
        202 => {
            let target = format!("/v1/pulls/{}?wait=30s", pull["id"].as_str().unwrap());
            let (_, done) = daemon.request("GET", &target, None).await;
            assert_eq!(done["state"], "failed", "{done}");
            done["error"]["code"].clone()
        }
        _ => pull["error"]["code"].clone(),
    };
    assert_eq!(code, "state_dir_read_only", "{status} {pull}");
    assert!(node.setup.blobs().is_empty());
    let output = daemon.output();
    assert!(
        output.contains("went to the control plane directly"),
        "{output}"
    );
    let events = node.setup.all_events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["error_code"], "state_dir_read_only");
}
