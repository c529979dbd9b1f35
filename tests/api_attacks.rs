//! The local API under attack, over the real socket: a thousand idle and half-sent connections
//! held open while a real client is served (and then dropped by the daemon), JSON nested past
//! any sane depth or otherwise hostile, and paths a client names that try to reach what it may
//! not read (relative paths, symlinks, FIFOs, directories, traversal in ids and digests). After
//! each attack the daemon still stages a real pull.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{artifact, pseudo_random, sha256_hex};
use support::daemon::{Daemon, Node};
use support::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The daemon's header read timeout (`daemon::HEADER_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A node with one registered blob, `t/real@1`, served by `origin`.
fn node_with_blob(origin: &Origin, seed: u64) -> (Node, Vec<u8>) {
    let node = Node::new();
    let body = pseudo_random(100_000, seed);
    origin.put("/real", body.clone());
    node.setup
        .register(&[artifact("t/real@1", &origin.url("/real"), &body)]);
    (node, body)
}

/// Pulls `t/real@1` to its end and checks the staged bytes: the daemon still does its job.
async fn assert_still_stages(daemon: &Daemon, body: &[u8]) {
    let done = daemon.pull_to_end("t/real@1").await;
    assert_eq!(done["state"], "staged", "{done}");
    assert_eq!(std::fs::read(done["path"].as_str().unwrap()).unwrap(), body);
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str, what: &str) {
    assert_eq!(answer.0, status, "{what}: {}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{what}: {}", answer.1);
}

/// Whether the daemon closed `stream` (EOF or a reset) within `within`.
async fn closed_by_peer(stream: &mut UnixStream, within: Duration) -> bool {
    let mut buffer = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or 400 answer before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_neither_keep_a_client_out_nor_stay_open() {
    let origin = Origin::start().await;
    let (node, body) = node_with_blob(&origin, 1);
    let daemon = node.start().await;

    // Half say nothing at all; half send a request head that never ends (slowloris).
    let mut idle = Vec::new();
    for n in 0..1000 {
        let mut stream = UnixStream::connect(daemon.socket()).await.expect("connect");
        if n % 2 == 1 {
            let partial = b"GET /v1/status HTTP/1.1\r\nHost: blobstage\r\nX-Slow: ";
            stream.write_all(partial).await.expect("a partial head");
        }
        idle.push(stream);
    }

    let (status, _) = daemon.request("GET", "/v1/status", None).await;
    assert_eq!(status, 200);
    assert_still_stages(&daemon, &body).await;

    // The daemon drops them once the header timeout has passed, silent ones included.
    let within = HEADER_TIMEOUT + Duration::from_secs(10);
    for n in [0, 1, 500, 501, 998, 999] {
        assert!(
            closed_by_peer(&mut idle[n], within).await,
            "idle connection {n} still open after {within:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_is_refused_with_a_code_and_the_daemon_goes_on() {
    let origin = Origin::start().await;
    let (node, body) = node_with_blob(&origin, 2);
    let daemon = node.start().await;

    let deep_array = "[".repeat(60_000);
    let deep_field = format!(
        "{{\"artifact_id\": {}\"x\"{}}}",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("60,000 open brackets", deep_array.into_bytes()),
        ("an artifact_id nested 5,000 deep", deep_field.into_bytes()),
        (
            "invalid UTF-8",
            b"{\"artifact_id\": \"t/\xff\xfe@1\"}".to_vec(),
        ),
        (
            "a NUL in a string",
            b"{\"artifact_id\": \"t/a\\u0000@1\"}".to_vec(),
        ),
        ("a huge number", b"{\"artifact_id\": 1e999999}".to_vec()),
        (
            "a duplicate key",
            b"{\"artifact_id\": \"t/a@1\", \"artifact_id\": \"t/real@1\"}".to_vec(),
        ),
        (
            "trailing garbage",
            b"{\"artifact_id\": \"t/real@1\"} {}".to_vec(),
        ),
    ];
    for (what, bytes) in &hostile {
        let response = daemon.request_raw("POST", "/v1/pulls", Some(bytes)).await;
        assert!(
            (400..500).contains(&response.status),
            "{what}: {} {}",
            response.status,
            response.text()
        );
        let code = response.json()["error"]["code"].clone();
        assert!(
            code.is_string(),
            "{what}: no error code in {}",
            response.text()
        );
    }
    let leases = br#"{"holder": "x", "digests": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]], "ttl_seconds": 1}"#;
    let response = daemon.request_raw("POST", "/v1/leases", Some(leases)).await;
    assert_eq!(response.status, 400, "{}", response.text());

    assert_still_stages(&daemon, &body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_ids_a_client_names_reach_nothing_it_may_not_read() {
    let origin = Origin::start().await;
    let (node, body) = node_with_blob(&origin, 3);
    let daemon = node.start().await;
    let dir = node.setup.root().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, b"not for the caller").unwrap();
    let digest = format!("sha256:{}", sha256_hex(b"not for the caller"));
    symlink(&secret, dir.join("link")).unwrap();
    symlink(&dir, dir.join("dirlink")).unwrap();
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());

    let verify = |path: &Path| json!({"digest": digest, "path": path});
    let refused = [
        ("a relative path", Path::new("client/secret").to_owned()),
        ("a traversal", Path::new("../../../etc/passwd").to_owned()),
        ("a symlink", dir.join("link")),
        ("a directory", dir.clone()),
        ("a FIFO (must not hang the daemon)", fifo.clone()),
        ("a path that does not exist", dir.join("missing")),
    ];
    for (what, path) in &refused {
        let answer = daemon
            .request("POST", "/v1/verify", Some(&verify(path)))
            .await;
        assert_error(&answer, 403, "path_not_allowed", what);
        assert!(
            !answer.1.to_string().contains("not for the caller"),
            "{what}"
        );
    }
    // The file itself, named plainly, is verified (the caller, root, owns it).
    let answer = daemon
        .request("POST", "/v1/verify", Some(&verify(&secret)))
        .await;
    assert_eq!(answer.0, 200, "{}", answer.1);

    // Ids and digests that try to walk out of where they are looked up.
    let traversal = daemon
        .request(
            "POST",
            "/v1/pulls",
            Some(&json!({"artifact_id": "../../etc/passwd"})),
        )
        .await;
    assert!((400..500).contains(&traversal.0), "{}", traversal.1);
    for target in [
        "/v1/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/blobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/blobs/sha256%2F..%2F..%2Fleases.json",
        "/v1/pulls/..%2F..%2Fleases.json",
    ] {
        let (status, answer) = daemon.request("GET", target, None).await;
        assert!((400..500).contains(&status), "{target}: {status} {answer}");
        assert!(!answer.to_string().contains("root:"), "{target}: {answer}");
    }
    let lease = json!({"holder": "../../../../tmp/evil", "digests": [digest], "ttl_seconds": 60});
    let (status, answer) = daemon.request("POST", "/v1/leases", Some(&lease)).await;
    assert!(status == 201 || status == 200, "{status} {answer}");
    assert!(!Path::new("/tmp/evil").exists());

    assert_still_stages(&daemon, &body).await;
}
