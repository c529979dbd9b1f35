//! sd_notify, with the test standing in for systemd: a real `NOTIFY_SOCKET` datagram socket
//! receives what the daemon announces. READY comes once it serves, WATCHDOG pings follow at
//! half the watchdog interval, STOPPING comes at SIGTERM, in that order; a daemon that cannot
//! start never says READY.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::Node;

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

fn position(messages: &[String], state: &str) -> Option<usize> {
    messages.iter().position(|m| m.lines().any(|l| l == state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_arrive_in_order() {
    let mut node = Node::new();
    let path = node.setup.root().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    node.env("NOTIFY_SOCKET", path.to_str().unwrap());
    node.env("WATCHDOG_USEC", "1000000");

    let mut daemon = node.start().await;
    let mut messages = receive(&socket, Duration::from_millis(1800));
    let status = daemon
        .terminate(Duration::from_secs(10))
        .await
        .expect("the daemon exits");
    assert!(status.success(), "{status}");
    messages.extend(receive(&socket, Duration::from_millis(200)));

    let ready = position(&messages, "READY=1").expect("READY=1");
    let watchdog = position(&messages, "WATCHDOG=1").expect("WATCHDOG=1");
    let stopping = position(&messages, "STOPPING=1").expect("STOPPING=1");
    assert!(ready < watchdog && watchdog < stopping, "{messages:#?}");
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 2,
        "{pings} pings in 1.8 s at a 1 s watchdog: {messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("STATUS=0 pulls in flight")),
        "{messages:#?}"
    );
}

#[test]
fn a_daemon_that_cannot_start_never_says_ready() {
    let node = Node::new();
    let path = node.setup.root().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    // The socket's directory cannot be created: its parent is a regular file.
    std::fs::write(node.setup.root().join("blocked"), b"a file").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_blobstage"))
        .args(["serve", "--config"])
        .arg(node.setup.config_path())
        .env(
            "BLOBSTAGE_API_SOCKET",
            node.setup.root().join("blocked/run/agent.sock"),
        )
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("error[io_error]"),
        "{stderr}"
    );
    assert_eq!(
        receive(&socket, Duration::from_millis(300)),
        Vec::<String>::new()
    );
}
