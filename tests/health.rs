//! `/readyz` with the HTTP control plane (`support::plane`): ready only once the control plane
//! has answered; not ready, with the reason, while it is down (learnt from the daemon's own
//! calls, at once, or from a probe); ready again once a call goes through; and many readiness
//! checks cost at most one probe, never a call each. `blobstage_control_plane_up` agrees.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::agent::{artifact, pseudo_random};
use support::daemon::{Daemon, Node, tcp_get};
use support::origin::Origin;
use support::plane::{Mode, Plane};

/// `GET /readyz` until its status is `status` (at most 30 s); returns the body.
async fn readyz_becomes(addr: SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = tcp_get(addr, "/readyz").await;
        if answer.status == status {
            return answer.text();
        }
        assert!(Instant::now() < deadline, "/readyz stays {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn control_plane_up(addr: SocketAddr) -> bool {
    let text = tcp_get(addr, "/metrics").await.text();
    let line = text
        .lines()
        .find(|l| l.starts_with("blobstage_control_plane_up "));
    line.expect("blobstage_control_plane_up").ends_with(" 1")
}

fn probes(plane: &Plane) -> usize {
    plane.paths().iter().filter(|p| *p == "/v1/events").count()
}

async fn pull_state(daemon: &Daemon, id: &str) -> (u16, String) {
    let body = json!({ "artifact_id": id });
    let (status, pull) = daemon.request("POST", "/v1/pulls", Some(&body)).await;
    let code = pull["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_http_control_plane_without_a_call_per_check() {
    let origin = Origin::start().await;
    let body = pseudo_random(100_000, 41);
    origin.put("/w", body.clone());
    let plane = Plane::start().await;
    plane.register(artifact("team/w@1", &origin.url("/w"), &body));
    plane.set_mode(Mode::Down, false);
    let mut node = Node::new();
    plane.configure(&node.setup, "node-token");
    node.env("BLOBSTAGE_CONTROL_PLANE_TIMEOUT", "1s");
    node.env("BLOBSTAGE_CONTROL_PLANE_CACHE_TTL", "0s");
    let daemon = node.start().await;
    let addr = daemon.metrics_addr().await.expect("the metrics address");

    // Down from the start: the first probe fails, and /readyz says why.
    let why = readyz_becomes(addr, 503).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut why = why;
    while !why.contains("control_plane_unavailable") {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        why = tcp_get(addr, "/readyz").await.text();
    }
    assert!(!control_plane_up(addr).await);

    // Up again: a call that goes through makes the daemon ready at once.
    plane.set_mode(Mode::Up, false);
    assert_eq!(pull_state(&daemon, "team/w@1").await.0, 202);
    assert_eq!(readyz_becomes(addr, 200).await.trim(), "ready");
    assert!(control_plane_up(addr).await);

    // Fifty checks in a row: no probe while the last answer is fresh.
    let before = probes(&plane);
    for _ in 0..50 {
        assert_eq!(tcp_get(addr, "/readyz").await.status, 200);
    }
    assert!(probes(&plane) <= before + 1, "{:?}", plane.paths());

    // Down: the daemon's own failed call makes it not ready, without waiting for a probe.
    plane.set_mode(Mode::Down, false);
    let (status, code) = pull_state(&daemon, "team/w@1").await;
    assert_eq!((status, code.as_str()), (503, "control_plane_unavailable"));
    let why = tcp_get(addr, "/readyz").await;
    assert_eq!(why.status, 503, "{why:?}");
    assert!(
        why.text().contains("control_plane_unavailable"),
        "{}",
        why.text()
    );
}
