//! The loopback Hub (`support::hub`) speaks the real protocol: the official `huggingface_hub`
//! Python client (the pinned version `.ci/servers/huggingface-hub` installs, found through
//! `TEST_HF_PYTHON`) downloads the same files from it with `hf_hub_download`, `HF_ENDPOINT`
//! pointing at the hub, and gets the bytes that were seeded and that `blobstage fetch` stages:
//! an LFS file through the CDN redirect, a small file the hub serves itself, a dataset on a
//! pull-request ref, a private repository with a token, and a renamed repository.

mod support;

use std::fs;
use std::process::Command;

use serde_json::{Value, json};
use support::agent::{ConfigOptions, Setup, pseudo_random};
use support::hub::{Hub, artifact};
use support::servers::server;

const TOKEN: &str = "hf_pythonClientToken";

/// One file both clients download.
struct Case {
    /// As `hf_hub_download` takes it.
    repo_type: &'static str,
    repo_id: &'static str,
    revision: &'static str,
    filename: &'static str,
    token: Option<&'static str>,
    /// The repository as the hub and `hf://` name it (with the type prefix).
    repo: &'static str,
    body: Vec<u8>,
}

impl Case {
    fn uri(&self, hub: &Hub) -> String {
        hub.uri(self.repo, Some(self.revision), self.filename)
    }
}

fn seed(hub: &Hub) -> Vec<Case> {
    let case = |repo_type, repo_id, revision, filename, token, repo, seed| Case {
        repo_type,
        repo_id,
        revision,
        filename,
        token,
        repo,
        body: pseudo_random(300_000 + seed as usize, seed),
    };
    let cases = vec![
        case(
            "model",
            "acme/llama",
            "main",
            "weights/model.safetensors",
            None,
            "acme/llama",
            1,
        ),
        case(
            "model",
            "acme/llama",
            "main",
            "config.json",
            None,
            "acme/llama",
            2,
        ),
        case(
            "dataset",
            "acme/corpus",
            "refs/pr/1",
            "train/a.parquet",
            None,
            "datasets/acme/corpus",
            3,
        ),
        case(
            "model",
            "acme/secret",
            "main",
            "w.bin",
            Some(TOKEN),
            "acme/secret",
            4,
        ),
        case("model", "acme/old", "main", "w.bin", None, "acme/old", 5),
    ];
    for c in &cases {
        let lfs = c.filename != "config.json";
        hub.put_on(c.repo, c.revision, c.filename, c.body.clone().into(), lfs);
    }
    hub.make_private("acme/secret", TOKEN);
    hub.rename("acme/old", "acme/new");
    cases
}

/// Downloads every case with `hf_hub_download` into a fresh cache; returns what it got.
async fn python_downloads(python: &str, hub: &Hub, cases: &[Case]) -> Vec<Vec<u8>> {
    let home = tempfile::tempdir().unwrap();
    let jobs: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"repo_type": c.repo_type, "repo_id": c.repo_id, "revision": c.revision,
                   "filename": c.filename, "token": c.token.map_or(json!(false), |t| json!(t))})
        })
        .collect();
    let script = "import json, sys\n\
        from huggingface_hub import hf_hub_download\n\
        for job in json.loads(sys.argv[1]):\n    \
            print(hf_hub_download(**job))\n";
    let mut command = Command::new(python);
    command
        .args(["-c", script, &Value::from(jobs).to_string()])
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", home.path())
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run the huggingface_hub client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the client failed:\n{stdout}\n{stderr}"
    );
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), cases.len(), "{stdout}\n{stderr}");
    paths
        .iter()
        .map(|p| fs::read(p).expect("a downloaded file"))
        .collect()
}

/// Stages every case with `blobstage fetch`; returns the blobs.
async fn blobstage_fetches(hub: &Hub, cases: &[Case]) -> Vec<Vec<u8>> {
    let setup = Setup::with(ConfigOptions {
        insecure_http: true,
        extra: hub.node_config(&["acme"], true),
    });
    let registrations: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut a = artifact(&format!("t/case@{i}"), &c.uri(hub), &c.body);
            if let Some(token) = c.token {
                a["credential"] = json!({"kind": "bearer", "token": token});
            }
            a
        })
        .collect();
    setup.register(&registrations);
    let mut blobs = Vec::new();
    for i in 0..cases.len() {
        let run = setup.fetch(&format!("t/case@{i}")).await;
        blobs.push(fs::read(run.staged_path()).unwrap());
    }
    blobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_downloads_the_same_bytes_from_the_test_hub() {
    let Some(python) = server("TEST_HF_PYTHON") else {
        return;
    };
    let hub = Hub::start().await;
    let cases = seed(&hub);

    let by_python = python_downloads(&python, &hub, &cases).await;
    let python_requests = (hub.hub_requests(), hub.cdn_requests());
    let by_blobstage = blobstage_fetches(&hub, &cases).await;
    for ((case, python), blobstage) in cases.iter().zip(&by_python).zip(&by_blobstage) {
        assert!(
            *python == case.body,
            "python got other bytes for {}",
            case.uri(&hub)
        );
        assert!(
            *blobstage == case.body,
            "blobstage got other bytes for {}",
            case.uri(&hub)
        );
    }

    // The client took the CDN redirects (without the token) and sent the token to the hub.
    let (hub_log, cdn_log) = python_requests;
    let cdn_gets = cdn_log
        .iter()
        .filter(|l| l.method == "GET" && l.status == 200);
    assert_eq!(cdn_gets.count(), 4, "{cdn_log:#?}");
    assert!(
        cdn_log.iter().all(|l| l.authorization.is_none()),
        "{cdn_log:#?}"
    );
    let to_secret = hub_log
        .iter()
        .filter(|l| l.path.starts_with("/acme/secret/"));
    let bearer = Some(format!("Bearer {TOKEN}"));
    assert!(
        to_secret.clone().count() > 0 && to_secret.into_iter().all(|l| l.authorization == bearer)
    );
    let renamed = hub_log.iter().filter(|l| l.status == 307);
    assert!(
        renamed.count() > 0,
        "the client never met the rename: {hub_log:#?}"
    );
    assert!(hub.cdn_requests().iter().all(|l| l.authorization.is_none()));
}
