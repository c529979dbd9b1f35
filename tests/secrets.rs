//! No secret leaves the process: a sentinel bearer token (the artifact's credential) and a
//! sentinel node token (the HTTP control plane's) never appear in any log line at TRACE level,
//! any error line, any event, or any file the agent writes under its state directory, for a
//! fetch that succeeds and for one that fails.

mod support;

use serde_json::json;
use support::agent::{Setup, artifact, files_containing, pseudo_random};
use support::origin::{Fault, Origin};

const SOURCE_SECRET: &str = "SENTINEL-source-4c1d";
const NODE_SECRET: &str = "SENTINEL-node-9e7b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_tokens_appear_in_no_log_error_event_or_file() {
    let origin = Origin::start().await;
    let body = pseudo_random(300_000, 91);
    origin.put("/ok", body.clone());
    let other = pseudo_random(300_000, 92);
    origin.put("/bad", other.clone());
    origin.set_fault(
        "/bad",
        Fault::Status {
            status: 503,
            retry_after: Some("0".into()),
            times: 100,
        },
    );

    let mut setup = Setup::new();
    setup.env("BLOBSTAGE_LOG", "trace");
    setup.env("BLOBSTAGE_TRANSFER_MAX_ATTEMPTS", "2");
    let credential = json!({ "kind": "bearer", "token": SOURCE_SECRET });
    let mut ok = artifact("t/ok@1", &origin.url("/ok"), &body);
    ok["credential"] = credential.clone();
    let mut bad = artifact("t/bad@1", &origin.url("/bad"), &other);
    bad["credential"] = credential;
    setup.register(&[ok, bad]);
    // A node token file is read only by the HTTP control plane; keep one beside the state to
    // be sure nothing copies it.
    setup.write_file("node-token", NODE_SECRET);

    let staged = setup.fetch("t/ok@1").await;
    assert_eq!(staged.code, 0, "{staged:#?}");
    let failed = setup.fetch_with(&["--json", "t/bad@1"]).await;
    assert_eq!(failed.code, 1, "{failed:#?}");
    assert!(
        staged.stderr.lines().count() > 10,
        "TRACE logging was not on: {}",
        staged.stderr
    );

    // The origin did get the token: the test would prove nothing otherwise.
    let sent = origin
        .requests()
        .iter()
        .filter(|r| r.authorization.as_deref() == Some(&format!("Bearer {SOURCE_SECRET}")))
        .count();
    assert!(sent > 0);
    for secret in [SOURCE_SECRET, NODE_SECRET] {
        for run in [&staged, &failed] {
            assert!(
                !run.stderr.contains(secret),
                "{secret} in stderr:\n{}",
                run.stderr
            );
            assert!(!run.stdout.contains(secret), "{secret} in stdout");
        }
        let events = std::fs::read_to_string(setup.events_path()).unwrap();
        assert!(!events.contains(secret), "{secret} in an event");
        assert_eq!(
            files_containing(&setup.state_dir(), secret),
            Vec::<String>::new()
        );
    }
}
