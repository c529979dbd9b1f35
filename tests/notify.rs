//! sd_notify, with the test standing in for systemd: a real `NOTIFY_SOCKET` datagram socket
//! receives what the daemon announces.
//!
//! READY is the first message, and when it arrives the API socket already accepts and the
//! store is there; WATCHDOG pings follow at half the watchdog interval with a `STATUS=` line
//! that counts the transfer in flight; STOPPING comes only after SIGTERM, and no ping after it.
//! A store that cannot be used stops the pings (and `/readyz` says why) until it is back. A
//! daemon whose start-up fails, before or after it bound its socket, never says READY.

mod support;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::agent::{CHUNK, artifact, pseudo_random};
use support::daemon::{Node, tcp_get};
use support::origin::{Fault, Origin};

/// Every datagram that arrives on `socket` within `window`.
fn receive(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + window;
    let mut buffer = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buffer) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Err(_) => break,
        }
    }
    messages
}

/// Receives until a message has a line `line`, at most 10 s; returns everything received.
fn receive_until(socket: &UnixDatagram, line: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut messages = Vec::new();
    while position(&messages, line).is_none() {
        assert!(Instant::now() < deadline, "no {line} in {messages:#?}");
        messages.extend(receive(socket, Duration::from_millis(100)));
    }
    messages
}

fn position(messages: &[String], line: &str) -> Option<usize> {
    messages.iter().position(|m| m.lines().any(|l| l == line))
}

/// A node whose daemon notifies `notify.sock` (returned, bound) with a 1 s watchdog.
fn notifying_node() -> (Node, UnixDatagram) {
    let mut node = Node::new();
    let path = node.setup.root().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    node.env("NOTIFY_SOCKET", path.to_str().unwrap());
    node.env("WATCHDOG_USEC", "1000000");
    node.env("BLOBSTAGE_TRANSFER_READ_TIMEOUT", "60s");
    (node, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_serving_then_pings_with_status_then_stopping_after_sigterm() {
    let origin = Origin::start().await;
    let body = pseudo_random(10 * CHUNK as usize, 5);
    origin.put("/frozen", body.clone());
    // Served up to the second range, then frozen: a transfer that stays in flight.
    let fault = Fault::StallFrom {
        offset: CHUNK,
        after: 0,
    };
    origin.set_fault("/frozen", fault);
    let (node, socket) = notifying_node();
    node.setup
        .register(&[artifact("t/frozen@1", &origin.url("/frozen"), &body)]);

    let mut daemon = node.spawn();
    let first = tokio::task::spawn_blocking(move || {
        let first = receive_until(&socket, "READY=1");
        (first, socket)
    });
    let (mut messages, socket) = first.await.unwrap();
    // At the moment READY arrives, the socket serves and the store is there.
    let accepts = UnixStream::connect(node.socket());
    assert!(
        accepts.is_ok(),
        "READY before the socket accepts: {accepts:?}"
    );
    assert!(node.setup.state_dir().join("blobs").is_dir());
    assert_eq!(position(&messages, "READY=1"), Some(0), "{messages:#?}");

    let (code, _) = daemon
        .request(
            "POST",
            "/v1/pulls",
            Some(&serde_json::json!({"artifact_id": "t/frozen@1"})),
        )
        .await;
    assert_eq!(code, 202);
    messages.extend(receive(&socket, Duration::from_millis(2500)));
    assert!(position(&messages, "STOPPING=1").is_none(), "{messages:#?}");
    let busy = messages
        .iter()
        .find(|m| m.contains("WATCHDOG=1") && m.contains("STATUS=1 transfers in flight"));
    assert!(
        busy.is_some(),
        "no ping that counts the transfer: {messages:#?}"
    );

    let before_term = messages.len();
    let status = daemon
        .terminate(Duration::from_secs(20))
        .await
        .expect("the daemon exits");
    assert!(status.success(), "{status}\n{}", daemon.output());
    messages.extend(receive(&socket, Duration::from_millis(300)));

    let ready = position(&messages, "READY=1").unwrap();
    let watchdog = position(&messages, "WATCHDOG=1").expect("WATCHDOG=1");
    let stopping = position(&messages, "STOPPING=1").expect("STOPPING=1");
    assert!(ready < watchdog && watchdog < stopping, "{messages:#?}");
    assert!(
        stopping >= before_term,
        "STOPPING before SIGTERM: {messages:#?}"
    );
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "{pings} pings at a 1 s watchdog: {messages:#?}");
    let late = messages[stopping..]
        .iter()
        .any(|m| m.contains("WATCHDOG=1"));
    assert!(!late, "a ping after STOPPING: {messages:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_stop_while_the_store_cannot_be_used_and_resume_when_it_is_back() {
    let (node, socket) = notifying_node();
    let daemon = node.start().await;
    let socket = tokio::task::spawn_blocking(move || {
        receive_until(&socket, "WATCHDOG=1");
        socket
    })
    .await
    .unwrap();

    let blobs = node.setup.state_dir().join("blobs");
    let aside = node.setup.state_dir().join("blobs.aside");
    std::fs::rename(&blobs, &aside).unwrap();
    let addr = daemon.metrics_addr().await.expect("the metrics address");
    let ready = tcp_get(addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.text().contains("store"), "{}", ready.text());
    let (gone, socket) = tokio::task::spawn_blocking(move || {
        (receive(&socket, Duration::from_millis(2000)), socket)
    })
    .await
    .unwrap();
    let unusable = gone
        .iter()
        .position(|m| m.trim_end() == "STATUS=the store cannot be used");
    let unusable = unusable.unwrap_or_else(|| panic!("no status: {gone:#?}"));
    let pinged = gone[unusable..].iter().any(|m| m.contains("WATCHDOG=1"));
    assert!(!pinged, "a ping while the store was gone: {gone:#?}");

    std::fs::rename(&aside, &blobs).unwrap();
    tokio::task::spawn_blocking(move || receive_until(&socket, "WATCHDOG=1"))
        .await
        .unwrap();
    assert_eq!(tcp_get(addr, "/readyz").await.status, 200);
}

/// Runs `blobstage serve` to its end with `env` and returns its exit code, its stderr and what
/// it sent to the notify socket.
fn failed_start(node: &Node, env: &[(&str, String)]) -> (Option<i32>, String, Vec<String>) {
    let path = node.setup.root().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_blobstage"))
        .args(["serve", "--config"])
        .arg(node.setup.config_path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let sent = receive(&socket, Duration::from_millis(300));
    (output.status.code(), stderr, sent)
}

#[test]
fn a_daemon_that_cannot_start_never_says_ready() {
    // The socket's directory cannot be created: its parent is a regular file.
    let node = Node::new();
    std::fs::write(node.setup.root().join("blocked"), b"a file").unwrap();
    let socket = node.setup.root().join("blocked/run/agent.sock");
    let env = [("BLOBSTAGE_API_SOCKET", socket.display().to_string())];
    let (code, stderr, sent) = failed_start(&node, &env);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("error[io_error]"), "{stderr}");
    assert_eq!(sent, Vec::<String>::new());

    // The socket is bound, then the metrics port is taken: still no READY.
    let node = Node::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let env = [(
        "BLOBSTAGE_API_METRICS_LISTEN",
        taken.local_addr().unwrap().to_string(),
    )];
    let (code, stderr, sent) = failed_start(&node, &env);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot bind"), "{stderr}");
    assert_eq!(sent, Vec::<String>::new());
}
