//! `/metrics` after real pulls through the real daemon: staged (with retries, a cut body
//! resumed mid-range, and a credential refreshed after a 401), already present, failed
//! (digest mismatch), refused (not registered), a verify that confirms and one that
//! quarantines, and a garbage collection. The counters match what happened exactly, the label
//! sets are closed (no digest, URI, artifact or pull id in any label or anywhere in the
//! scrape), and `promtool check metrics` (Debian's `prometheus` package, from `.ci/servers/`)
//! accepts the scrape.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{CHUNK, artifact, pseudo_random, sha256_hex};
use support::daemon::{Daemon, Node, tcp_get};
use support::origin::{Fault, Origin};

/// One sample of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped).
fn parse(text: &str) -> Vec<Sample> {
    let lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    lines.map(parse_line).collect()
}

fn parse_line(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("a sample line");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let Some((name, labels)) = series.split_once('{') else {
        return Sample {
            name: series.to_owned(),
            labels: BTreeMap::new(),
            value,
        };
    };
    let labels = labels.strip_suffix('}').expect("closed labels");
    let labels = labels.split("\",").filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once("=\"").expect("label=\"value\"");
        (key.to_owned(), value.trim_end_matches('"').to_owned())
    });
    Sample {
        name: name.to_owned(),
        labels: labels.collect(),
        value,
    }
}

/// The value of the sample `name` whose labels include `labels`; 0 when there is none.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching = samples.iter().filter(|s| s.name == name).filter(|s| {
        labels
            .iter()
            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    });
    matching.map(|s| s.value).sum()
}

async fn scrape(addr: SocketAddr) -> String {
    let answer = tcp_get(addr, "/metrics").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let kind = answer.header("content-type").unwrap_or_default();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    answer.text()
}

async fn post(daemon: &Daemon, path: &str, body: Value) -> (u16, Value) {
    daemon.request("POST", path, Some(&body)).await
}

/// Pulls `id` and long-polls it to its end; returns the final pull (or the refusal).
async fn pull(daemon: &Daemon, id: &str) -> (u16, Value) {
    let (status, pull) = post(daemon, "/v1/pulls", json!({ "artifact_id": id })).await;
    if status != 202 {
        return (status, pull);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = format!("/v1/pulls/{}?wait=10s", pull["id"].as_str().unwrap());
    loop {
        let (_, pull) = daemon.request("GET", &target, None).await;
        if ["staged", "failed", "cancelled"].contains(&pull["state"].as_str().unwrap_or("")) {
            return (status, pull);
        }
        assert!(Instant::now() < deadline, "{pull:#}");
    }
}

/// The label names and values a scrape may carry: closed sets only (so no digest, URI, path,
/// artifact, pull or request id can be one).
fn assert_closed_labels(samples: &[Sample]) {
    let routes = blobstage::daemon::api::ROUTES
        .iter()
        .map(|(method, template)| {
            let path = template.replace("{id}", "x").replace("{digest}", "x");
            let endpoint = blobstage::daemon::api::route(&method.parse().unwrap(), &path).unwrap();
            endpoint.name()
        });
    let operations: Vec<&str> = routes.chain(["unknown"]).collect();
    let sources = [
        "s3",
        "gcs",
        "azure_blob",
        "https",
        "huggingface",
        "artifact_store",
    ];
    let outcomes = ["staged", "already_present", "verified", "failed", "refused"];
    let reasons = blobstage::transfer::retry::REASONS;
    for sample in samples {
        for (key, value) in &sample.labels {
            let allowed = match key.as_str() {
                "source_type" => sources.contains(&value.as_str()),
                "outcome" => outcomes.contains(&value.as_str()),
                "reason" => reasons.contains(&value.as_str()),
                "operation" => operations.contains(&value.as_str()),
                "status" => value == "other" || value.parse::<u16>().is_ok(),
                "code" => {
                    !value.is_empty() && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }
                "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
                "version" => value == env!("CARGO_PKG_VERSION"),
                _ => false,
            };
            assert!(allowed, "label {key}=\"{value}\" on {sample:?}");
        }
    }
}

/// promtool from `.ci/servers/promtool`, when it is installed.
fn promtool_check(text: &str) {
    let Some(promtool) = support::servers::server("TEST_PROMTOOL") else {
        return;
    };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "promtool check metrics:\n{said}\n{text}"
    );
    assert!(
        said.trim().is_empty(),
        "promtool has lint findings:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_real_pulls_verifies_and_gc_with_closed_labels_and_pass_promtool() {
    let origin = Origin::start().await;
    let size = |n: u64| (n * CHUNK + 123) as usize;
    let (a, b, c, e, f) = (
        pseudo_random(size(4), 1),
        // Whole ranges only, so that each cut request is cut (10,000 bytes in).
        pseudo_random(4 * CHUNK as usize, 2),
        pseudo_random(size(2), 3),
        pseudo_random(size(2), 4),
        pseudo_random(size(1), 5),
    );
    for (path, body) in [("/a", &a), ("/b", &b), ("/c", &c), ("/e", &e), ("/f", &f)] {
        origin.put(path, body.clone());
    }
    // b: the first two range requests are cut after 10,000 bytes (the probe takes the first
    // of the three uses); e: the probe is refused twice with 503; f: a 401 once.
    origin.set_fault(
        "/b",
        Fault::CutBody {
            after: 10_000,
            times: 3,
        },
    );
    let unavailable = Fault::Status {
        status: 503,
        retry_after: None,
        times: 2,
    };
    origin.set_fault("/e", unavailable);
    let denied = Fault::Status {
        status: 401,
        retry_after: None,
        times: 1,
    };
    origin.set_fault("/f", denied);
    let mut bad = artifact("t/c@1", &origin.url("/c"), &c);
    bad["digest"] = json!(format!("sha256:{}", sha256_hex(b"something else")));
    let mut refreshed = artifact("t/f@1", &origin.url("/f"), &f);
    refreshed["credential"] = json!({ "kind": "bearer", "token": "tok" });
    let registered = [
        artifact("t/a@1", &origin.url("/a"), &a),
        artifact("t/b@1", &origin.url("/b"), &b),
        bad,
        artifact("t/e@1", &origin.url("/e"), &e),
        refreshed,
    ];
    let mut node = Node::new();
    node.setup.register(&registered);
    node.env("BLOBSTAGE_STORE_HIGH_WATERMARK", "100GiB");
    node.env("BLOBSTAGE_STORE_LOW_WATERMARK", "1B");
    let daemon = node.start().await;
    let addr = daemon.metrics_addr().await.expect("the metrics address");

    let before = parse(&scrape(addr).await);
    assert_eq!(
        value(&before, "blobstage_pulls_total", &[("outcome", "staged")]),
        0.0
    );
    assert_eq!(
        value(
            &before,
            "blobstage_transferred_bytes_total",
            &[("source_type", "s3")]
        ),
        0.0
    );

    for id in ["t/a@1", "t/b@1", "t/e@1", "t/f@1"] {
        let (_, pulled) = pull(&daemon, id).await;
        assert_eq!(pulled["state"], "staged", "{pulled:#}\n{}", daemon.output());
    }
    assert_eq!(pull(&daemon, "t/a@1").await.0, 200, "already present");
    let (_, failed) = pull(&daemon, "t/c@1").await;
    assert_eq!(failed["error"]["code"], "digest_mismatch", "{failed:#}");
    assert_eq!(pull(&daemon, "t/nope@1").await.0, 404);
    let verify = |id: &str| json!({ "artifact_id": id });
    assert_eq!(post(&daemon, "/v1/verify", verify("t/a@1")).await.0, 200);
    let blob_b = node.setup.blob_path(&sha256_hex(&b));
    std::fs::set_permissions(&blob_b, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob_b, b"corrupted").unwrap();
    assert_eq!(post(&daemon, "/v1/verify", verify("t/b@1")).await.0, 409);

    let text = scrape(addr).await;
    let samples = parse(&text);
    let get = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    let https = [("source_type", "https")];
    assert_eq!(get("blobstage_pulls_total", &[("outcome", "staged")]), 4.0);
    assert_eq!(
        get("blobstage_pulls_total", &[("outcome", "already_present")]),
        1.0
    );
    assert_eq!(get("blobstage_pulls_total", &[("outcome", "failed")]), 1.0);
    assert_eq!(get("blobstage_pulls_total", &[("outcome", "refused")]), 1.0);
    assert_eq!(
        get(
            "blobstage_pull_errors_total",
            &[("code", "digest_mismatch")]
        ),
        1.0
    );
    assert_eq!(
        get("blobstage_pull_errors_total", &[("code", "not_registered")]),
        1.0
    );
    assert_eq!(
        get("blobstage_verifies_total", &[("outcome", "verified")]),
        1.0
    );
    assert_eq!(
        get("blobstage_verifies_total", &[("outcome", "failed")]),
        1.0
    );
    assert_eq!(
        get(
            "blobstage_verify_errors_total",
            &[("code", "digest_mismatch")]
        ),
        1.0
    );
    assert_eq!(get("blobstage_quarantined_blobs_total", &[]), 1.0);

    // Every byte of the five transfers once: the cut ranges resumed, none fetched twice.
    let sent: usize = [&a, &b, &c, &e, &f].iter().map(|body| body.len()).sum();
    assert_eq!(
        get("blobstage_transferred_bytes_total", &https),
        sent as f64
    );
    let events = node.setup.all_events();
    let reported: u64 = events
        .iter()
        .map(|e| e["bytes_transferred"].as_u64().unwrap_or(0))
        .sum();
    // The staged pulls' events say the same (a failed pull's event carries no byte count).
    assert_eq!(reported as usize, sent - c.len(), "{events:#?}");
    assert_eq!(get("blobstage_range_rerequests_total", &https), 2.0);
    let cut = get(
        "blobstage_retries_total",
        &[("source_type", "https"), ("reason", "connection")],
    ) + get(
        "blobstage_retries_total",
        &[("source_type", "https"), ("reason", "truncated")],
    );
    assert_eq!(cut, 2.0, "{text}");
    let retried = [("source_type", "https"), ("reason", "server_error")];
    assert_eq!(get("blobstage_retries_total", &retried), 2.0);
    assert_eq!(get("blobstage_retries_total", &https), 4.0);
    assert_eq!(get("blobstage_credential_refreshes_total", &[]), 1.0);

    let staged = [("source_type", "https"), ("outcome", "staged")];
    assert_eq!(get("blobstage_stage_duration_seconds_count", &staged), 4.0);
    let present = [("source_type", "https"), ("outcome", "already_present")];
    assert_eq!(get("blobstage_stage_duration_seconds_count", &present), 1.0);
    let ranges = (5 + 4 + 3 + 3 + 2 + 2) as f64;
    assert_eq!(
        get("blobstage_time_to_first_byte_seconds_count", &https),
        ranges
    );
    assert_eq!(get("blobstage_transfers_in_flight", &https), 0.0);
    assert_eq!(get("blobstage_connections_in_flight", &https), 0.0);
    // a, e and f are staged; b is quarantined.
    assert_eq!(get("blobstage_store_blobs", &[]), 3.0);
    assert_eq!(
        get("blobstage_store_bytes", &[]),
        (a.len() + e.len() + f.len()) as f64
    );
    assert_eq!(get("blobstage_ingest_bytes", &[]), 0.0);
    assert_eq!(get("blobstage_control_plane_up", &[]), 1.0);
    assert_eq!(get("blobstage_build_info", &[]), 1.0);
    let created = [("operation", "create_pull"), ("status", "202")];
    assert_eq!(get("blobstage_api_requests_total", &created), 5.0);
    let refused = [("operation", "create_pull"), ("status", "404")];
    assert_eq!(get("blobstage_api_requests_total", &refused), 1.0);
    for name in [
        "blobstage_outbox_events",
        "blobstage_outbox_oldest_event_age_seconds",
    ] {
        assert!(samples.iter().any(|s| s.name == name), "no {name}");
    }

    let (status, collected) = post(&daemon, "/v1/gc", json!({})).await;
    assert_eq!(status, 200, "{collected:#}");
    let after = parse(&scrape(addr).await);
    assert_eq!(value(&after, "blobstage_gc_evicted_blobs_total", &[]), 3.0);
    let freed = (a.len() + e.len() + f.len()) as f64;
    assert_eq!(value(&after, "blobstage_gc_freed_bytes_total", &[]), freed);
    assert_eq!(value(&after, "blobstage_store_blobs", &[]), 0.0);

    // Closed label sets, and nothing that names one blob, artifact, pull or origin anywhere.
    assert_closed_labels(&samples);
    assert_closed_labels(&after);
    let mut named: Vec<String> = [&a, &b, &c, &e, &f]
        .iter()
        .map(|body| sha256_hex(body))
        .collect();
    named.extend(["t/".into(), origin.addr().to_string()]);
    for needle in named {
        assert!(!text.contains(&needle), "{needle} in the scrape:\n{text}");
    }
    promtool_check(&text);
}
