//! Logs for operators, from the real binary: with `[log] format = "json"` (here through
//! `BLOBSTAGE_LOG_FORMAT`) every line on stderr is one JSON object, an event inside the pull
//! carries the pull's span with its id (the API's pull id), artifact and digest, an API
//! request's lines carry the request span with its id and operation, and a signed URI's query
//! never appears, only `?<redacted>`. `fetch` logs JSON too and keeps stdout for the path.
//! `journald` on a machine without a journal falls back to text, and says so first.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Setup, artifact, pseudo_random, sha256_hex};
use support::daemon::Node;
use support::origin::{Fault, Origin};

const SIGNATURE: &str = "sig=SENTINEL-signature";

/// Every stderr line of a daemon's output, parsed; panics on one that is not a JSON object.
fn json_lines(output: &str) -> Vec<Value> {
    let lines = output.lines().filter_map(|l| l.strip_prefix("stderr: "));
    lines
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => value,
            _ => panic!("not a JSON object: {line}\n{output}"),
        })
        .collect()
}

/// The span named `name` among the spans a line happened in.
fn span<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    let spans = line["spans"].as_array()?;
    spans.iter().find(|s| s["name"] == name)
}

fn with_message<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["message"] == message).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_request_and_pull_spans_and_no_signed_query() {
    let origin = Origin::start().await;
    let body = pseudo_random(200_000, 31);
    origin.put("/w", body.clone());
    let retry_once = Fault::Status {
        status: 503,
        retry_after: Some("0".into()),
        times: 1,
    };
    origin.set_fault("/w", retry_once);
    let uri = format!("{}?{SIGNATURE}", origin.url("/w"));
    let mut node = Node::new();
    node.setup.register(&[artifact("t/w@1", &uri, &body)]);
    node.env("BLOBSTAGE_LOG_FORMAT", "json");
    node.env("BLOBSTAGE_LOG", "debug");
    let mut daemon = node.start().await;

    let request = json!({ "artifact_id": "t/w@1" });
    let (status, pull) = daemon.request("POST", "/v1/pulls", Some(&request)).await;
    assert_eq!(status, 202, "{pull:#}");
    let id = pull["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, pull) = daemon
            .request("GET", &format!("/v1/pulls/{id}?wait=5s"), None)
            .await;
        if pull["state"] == "staged" {
            break;
        }
        assert!(Instant::now() < deadline, "{pull:#}");
    }
    daemon.terminate(Duration::from_secs(10)).await.unwrap();
    let output = daemon.output();
    let lines = json_lines(&output);

    for line in &lines {
        for key in ["timestamp", "level", "message", "target"] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
    }
    let staged = with_message(&lines, "staged");
    assert_eq!(staged.len(), 1, "{output}");
    let pulled = span(staged[0], "pull").unwrap_or_else(|| panic!("{}", staged[0]));
    assert_eq!(pulled["pull"], id.as_str(), "{pulled}");
    assert_eq!(pulled["artifact"], "t/w@1", "{pulled}");
    assert_eq!(
        pulled["digest"],
        format!("sha256:{}", sha256_hex(&body)),
        "{pulled}"
    );
    let ranges = with_message(&lines, "range request");
    assert!(!ranges.is_empty(), "no debug line per range: {output}");
    assert!(
        ranges
            .iter()
            .all(|l| span(l, "pull").is_some_and(|s| s["pull"] == id.as_str()))
    );

    let answered = with_message(&lines, "answered");
    let created = answered
        .iter()
        .filter_map(|l| span(l, "request"))
        .find(|s| s["operation"] == "create_pull")
        .unwrap_or_else(|| panic!("no create_pull request span: {output}"));
    let request_id = created["request"].as_str().unwrap_or_default();
    assert!(request_id.starts_with("r-"), "{created}");
    let ids: Vec<_> = answered
        .iter()
        .filter_map(|l| span(l, "request")?["request"].as_str())
        .collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "request ids repeat: {ids:?}");

    let retried = with_message(&lines, "first request failed, retrying");
    assert_eq!(retried.len(), 1, "{output}");
    assert!(output.contains("?<redacted>"), "{output}");
    assert!(
        !output.contains(SIGNATURE),
        "the signature is in the logs:\n{output}"
    );
}

/// `blobstage fetch` of a fresh 50,000-byte blob with `BLOBSTAGE_LOG=info` and `format`.
async fn fetch_logging(format: &str) -> support::agent::Run {
    let origin = Origin::start().await;
    let body = pseudo_random(50_000, 32);
    origin.put("/f", body.clone());
    let mut setup = Setup::new();
    setup.register(&[artifact("t/f@1", &origin.url("/f"), &body)]);
    setup.env("BLOBSTAGE_LOG_FORMAT", format);
    setup.env("BLOBSTAGE_LOG", "info");
    setup.fetch("t/f@1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_logs_json_on_stderr_and_the_path_alone_on_stdout() {
    let run = fetch_logging("json").await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
    let tagged: String = run
        .stderr
        .lines()
        .map(|l| format!("stderr: {l}\n"))
        .collect();
    let lines = json_lines(&tagged);
    let staged = with_message(&lines, "staged");
    assert_eq!(staged.len(), 1, "{}", run.stderr);
    let pulled = span(staged[0], "pull").expect("the pull span");
    assert!(
        pulled["pull"].as_str().unwrap_or("").starts_with("p-"),
        "{pulled}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_without_a_journal_falls_back_to_text_and_says_so() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("skipped: this machine runs journald; the fallback cannot be seen here");
        return;
    }
    let run = fetch_logging("journald").await;
    assert_eq!(run.code, 0, "{run:#?}");
    let first = run.stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("the journal cannot be reached"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("staged") && !l.starts_with('{'))
    );
}
