//! The local API fuzzed from its own OpenAPI document (`docs/openapi.json`) by schemathesis
//! (PyPI, installed by `.ci/servers/schemathesis`): generated and mutated requests on every
//! route must get no 5xx, answers the document describes (status, content type, body schema),
//! no crash and no hang; afterwards the daemon still stages a real pull.
//!
//! schemathesis speaks TCP and the API lives on a Unix socket, so the test puts a byte relay on
//! 127.0.0.1 in front of the socket; the daemon sees the test process as its peer.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::agent::{artifact, pseudo_random};
use support::daemon::Node;
use support::origin::Origin;
use support::servers::server;
use tokio::net::{TcpListener, UnixStream};

/// Relays every TCP connection on a free 127.0.0.1 port to `socket`; returns the port.
async fn relay_to(socket: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the relay");
    let port = listener.local_addr().unwrap().port();
    let socket = socket.to_owned();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    port
}

fn openapi_document() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let Some(st) = server("TEST_SCHEMATHESIS") else {
        return;
    };
    let origin = Origin::start().await;
    let node = Node::new();
    let body = pseudo_random(50_000, 1);
    origin.put("/real", body.clone());
    node.setup
        .register(&[artifact("t/real@1", &origin.url("/real"), &body)]);
    let mut daemon = node.start().await;
    let port = relay_to(daemon.socket()).await;

    let mut command = std::process::Command::new(&st);
    command
        .arg("--config-file")
        .arg(tests_dir().join("schemathesis.toml"))
        .arg("run")
        .arg(openapi_document())
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--checks", "all", "--workers", "1", "--max-time", "60"])
        .args(["--request-timeout", "10", "--no-color"])
        // Its cache of failing cases goes there, not into the checkout.
        .current_dir(node.setup.root());
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("schemathesis did not finish in 5 minutes")
        .expect("the runner task")
        .expect("run schemathesis");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "schemathesis failed:\n{report}");
    assert!(
        !daemon.has_exited(),
        "the daemon died:\n{}",
        daemon.output()
    );

    let done = daemon.pull_to_end("t/real@1").await;
    assert_eq!(done["state"], "staged", "{done}");
}
