//! The origin rows of the fault matrix (README "Fault matrix") against one running daemon. Every
//! fault is pulled through the API at the same time as the others; each pull ends as its row
//! says (staged, or failed with its code), no byte of a failed pull is at a blob path, every
//! pull records exactly one event with its outcome, and afterwards the same daemon stages a
//! clean blob. `tests/fetch.rs` has each row on its own against `blobstage fetch`, with the
//! requests the origin saw; this file proves that a fault in one transfer stays in it.

mod support;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::Value;
use support::agent::{artifact, pseudo_random, sha256_hex};
use support::daemon::Node;
use support::origin::{Fault, Origin, http_date};

/// Five ranges of the test configuration's 64 KiB chunks.
const SIZE: usize = 300_000;

/// One row: the fault at its origin path, and the outcome: `None` for staged, or the code.
struct Row {
    name: &'static str,
    fault: Fault,
    expect: Option<&'static str>,
}

fn redirect(location: &str) -> Fault {
    Fault::Redirect {
        location: location.to_owned(),
        status: 302,
    }
}

fn rows(origin: &Origin) -> Vec<Row> {
    let status = |status, retry_after: Option<String>, times| Fault::Status {
        status,
        retry_after,
        times,
    };
    let in_a_second = http_date(SystemTime::now() + Duration::from_secs(1));
    // The first GET of a transfer is the one-byte probe: the faults that count GETs start at
    // the second, a range.
    vec![
        Row {
            name: "cut",
            fault: Fault::CutBody {
                after: 30_000,
                times: 2,
            },
            expect: None,
        },
        Row {
            name: "stall",
            fault: Fault::Stall {
                after: 10_000,
                times: 2,
            },
            expect: None,
        },
        Row {
            name: "no-range",
            fault: Fault::IgnoreRange,
            expect: None,
        },
        Row {
            name: "shifted",
            fault: Fault::WrongContentRange,
            expect: Some("bad_source_response"),
        },
        Row {
            name: "overlong",
            fault: Fault::Overlong { extra: 100 },
            expect: Some("bad_source_response"),
        },
        Row {
            name: "busy",
            fault: status(503, Some("1".into()), 2),
            expect: None,
        },
        Row {
            name: "throttled",
            fault: status(429, Some(in_a_second), 2),
            expect: None,
        },
        Row {
            name: "down",
            fault: status(500, None, usize::MAX),
            expect: Some("source_unavailable"),
        },
        Row {
            name: "moving",
            fault: Fault::ChangeAfter {
                gets: 3,
                new_body: Bytes::from(pseudo_random(SIZE, 999)),
            },
            expect: Some("source_changed"),
        },
        Row {
            name: "loop",
            fault: redirect(&origin.url("/r/loop")),
            expect: Some("too_many_redirects"),
        },
        Row {
            name: "metadata",
            fault: redirect("http://169.254.169.254/latest/meta-data/"),
            expect: Some("source_not_allowed"),
        },
        Row {
            name: "file",
            fault: redirect("file:///etc/passwd"),
            expect: Some("source_not_allowed"),
        },
    ]
}

/// Polls the file control plane's event log until `count` events are in it.
async fn events(node: &Node, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = node.setup.all_events();
        if events.len() >= count || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_origin_fault_ends_as_the_matrix_says_and_the_daemon_goes_on() {
    let origin = Origin::start().await;
    let node = Node::new();
    let rows = rows(&origin);
    let mut registrations = Vec::new();
    let mut bodies = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        let path = format!("/r/{}", row.name);
        let body = pseudo_random(SIZE, 500 + n as u64);
        origin.put(&path, body.clone());
        origin.set_fault(&path, row.fault.clone());
        registrations.push(artifact(
            &format!("t/{}@1", row.name),
            &origin.url(&path),
            &body,
        ));
        bodies.push(body);
    }
    // Wrong bytes: the origin is sound, the registered digest is of other bytes of that size.
    let wrong = pseudo_random(SIZE, 498);
    origin.put("/r/wrong", pseudo_random(SIZE, 497));
    registrations.push(artifact("t/wrong@1", &origin.url("/r/wrong"), &wrong));
    let clean = pseudo_random(SIZE, 496);
    origin.put("/clean", clean.clone());
    registrations.push(artifact("t/clean@1", &origin.url("/clean"), &clean));
    node.setup.register(&registrations);
    let daemon = node.start().await;

    let ids: Vec<String> = rows
        .iter()
        .map(|r| format!("t/{}@1", r.name))
        .chain(["t/wrong@1".to_owned()])
        .collect();
    let ended = join_all(ids.iter().map(|id| daemon.pull_to_end(id))).await;

    let expected = rows
        .iter()
        .map(|r| r.expect)
        .chain([Some("digest_mismatch")]);
    let mut staged = Vec::new();
    for ((id, pull), expect) in ids.iter().zip(&ended).zip(expected) {
        match expect {
            None => {
                assert_eq!(pull["state"], "staged", "{id}: {pull:#}");
                staged.push(pull["path"].as_str().unwrap().to_owned());
            }
            Some(code) => {
                assert_eq!(pull["state"], "failed", "{id}: {pull:#}");
                assert_eq!(pull["error"]["code"], code, "{id}: {pull:#}");
            }
        }
    }
    for (row, body) in rows.iter().zip(&bodies) {
        if row.expect.is_none() {
            let path = node.setup.blob_path(&sha256_hex(body));
            assert_eq!(std::fs::read(&path).unwrap(), *body, "{}", row.name);
        }
    }
    // Only the staged blobs are in the store: nothing of a failed pull reached a blob path.
    let mut blobs: Vec<String> = node
        .setup
        .blobs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    blobs.sort();
    staged.sort();
    assert_eq!(blobs, staged);

    // The daemon goes on: a clean pull after all of them.
    let pull = daemon.pull_to_end("t/clean@1").await;
    assert_eq!(pull["state"], "staged", "{pull:#}");
    assert_eq!(
        std::fs::read(pull["path"].as_str().unwrap()).unwrap(),
        clean
    );

    // One event per pull, with its outcome and code.
    let events = events(&node, ids.len() + 1).await;
    assert_eq!(events.len(), ids.len() + 1, "{events:#?}");
    for (id, pull) in ids.iter().zip(&ended) {
        let mine: Vec<&Value> = events.iter().filter(|e| e["artifact_id"] == *id).collect();
        assert_eq!(mine.len(), 1, "{id}: {events:#?}");
        let event = mine[0];
        match pull["state"].as_str() {
            Some("staged") => assert_eq!(event["outcome"], "staged", "{event:#}"),
            _ => {
                assert_ne!(event["outcome"], "staged", "{event:#}");
                assert_eq!(event["error_code"], pull["error"]["code"], "{event:#}");
            }
        }
    }
    // The loop was followed a bounded number of times; nothing went to file: or 169.254.
    let hops = origin.get_count("/r/loop");
    assert!((2..=50).contains(&hops), "{hops} requests for the loop");
    assert!(
        origin
            .requests()
            .iter()
            .all(|l| l.path.starts_with("/r/") || l.path == "/clean"),
        "{:#?}",
        origin.requests()
    );
}
