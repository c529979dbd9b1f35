//! The shared source suite: the same cases against every source type, each against its real
//! server (`support::cloud` has the backends; adding one is a line in `suite!` below).
//!
//! Cases: a blob of several ranges whose size is not a multiple of the chunk, read through a
//! relay that sees every range request; a fetch killed with SIGKILL mid-way and resumed; a
//! registered digest the bytes do not match (found before the transfer where the source
//! announces a digest, as the Hub does); an object replaced between a killed run and the
//! next; and an object whose bucket (host, for https) the node does not allow, which is refused
//! before any request reaches the server.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{CHUNK, Run, Setup, artifact, pseudo_random, sha256_hex};
use support::cloud::{
    Azurite, BUCKET, Backend, FakeGcs, Https, HuggingFace, Moto, S3s, key, registration,
};
use support::front::{Front, FrontOptions};

/// One module of tests per backend, each running every case of `cases`.
macro_rules! suite {
    ($($name:ident: $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_range_blob() {
                if let Some(b) = <$backend>::start().await { cases::multi_range(&b).await }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn resume_after_sigkill() {
                if let Some(b) = <$backend>::start().await { cases::resume(&b).await }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn digest_mismatch() {
                if let Some(b) = <$backend>::start().await { cases::digest_mismatch(&b).await }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn changed_between_runs() {
                if let Some(b) = <$backend>::start().await { cases::changed(&b).await }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bucket_not_allowed() {
                if let Some(b) = <$backend>::start().await { cases::not_allowed(&b).await }
            }
        }
    )*};
}

suite! {
    https: Https,
    s3_s3s_fs: S3s,
    s3_moto: Moto,
    gcs: FakeGcs,
    azure_blob: Azurite,
    huggingface: HuggingFace,
}

/// Ranges of the suite's blobs: chunks of 64 KiB, two connections.
const CONNECTIONS: usize = 2;

/// A node reaching `backend` at `addr` that allows `bucket`.
fn node(backend: &impl Backend, addr: SocketAddr, bucket: &str) -> Setup {
    support::cloud::node(backend, addr, bucket, CONNECTIONS)
}

/// Registers `body` at object `key` as artifact `t/blob@1`, with the backend's credential.
fn register(setup: &Setup, backend: &impl Backend, addr: SocketAddr, key: &str, body: &[u8]) {
    setup.register(&[registration(backend, addr, key, body)]);
}

/// A relay to the backend's server that holds every request for `delay`.
async fn front(backend: &impl Backend, delay: Duration) -> Front {
    let options = FrontOptions {
        delay,
        upstream_host: backend.routes_by_host(),
        ..FrontOptions::default()
    };
    Front::start(backend.addr(), options).await
}

fn journal_path(setup: &Setup, body: &[u8]) -> PathBuf {
    let name = format!("sha256-{}.journal", sha256_hex(body));
    setup.state_dir().join("ingest").join(name)
}

/// Bytes the journal records as written, once it exists.
fn journaled(setup: &Setup, body: &[u8]) -> Option<u64> {
    let text = fs::read_to_string(journal_path(setup, body)).ok()?;
    let journal: Value = serde_json::from_str(text.split_once('\n')?.1).ok()?;
    let written = journal["written"].as_array()?;
    Some(written.iter().filter_map(Value::as_u64).sum())
}

fn json_of(run: &Run) -> Value {
    assert_eq!(run.code, 0, "{run:#?}");
    serde_json::from_str(run.stdout.trim()).expect("--json output")
}

/// Starts a fetch of `body` (registered in `setup`, through a slow relay), kills it with
/// SIGKILL once its journal records at least `at_least` bytes, and returns what it recorded.
async fn killed_run(setup: &Setup, body: &[u8], at_least: u64) -> u64 {
    let mut child = setup.spawn_fetch(&["t/blob@1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journaled(setup, body).is_none_or(|w| w < at_least) {
        assert!(Instant::now() < deadline, "no checkpoint came");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fetch ended too soon"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(status.code().is_none(), "ended by itself: {status}");
    assert!(setup.blobs().is_empty(), "a killed run published a blob");
    journaled(setup, body).expect("the journal stays")
}

mod cases {
    use super::*;

    /// 9 ranges and a short tenth one.
    const SIZE: usize = 9 * CHUNK as usize + 4321;

    pub async fn multi_range(backend: &impl Backend) {
        let relay = front(backend, Duration::ZERO).await;
        let (key, body) = (key("multi-range"), pseudo_random(SIZE, 1));
        backend.put(&key, &body).await;
        let setup = node(backend, relay_addr(&relay), BUCKET);
        register(&setup, backend, relay_addr(&relay), &key, &body);

        let run = setup.fetch("t/blob@1").await;
        assert_eq!(fs::read(run.staged_path()).unwrap(), body);
        run.assert_event("staged", None);
        let mut ranges: Vec<String> = relay
            .seen()
            .into_iter()
            .filter(|s| s.method == "GET")
            .filter_map(|s| s.range)
            // The https source's first request, which learns the size.
            .filter(|r| r != "bytes=0-0")
            .collect();
        ranges.sort();
        ranges.dedup();
        assert_eq!(ranges.len(), SIZE.div_ceil(CHUNK as usize), "{ranges:?}");
        let last = format!("bytes={}-{}", 9 * CHUNK, SIZE - 1);
        assert!(ranges.contains(&last), "{ranges:?}");
    }

    pub async fn resume(backend: &impl Backend) {
        let relay = front(backend, Duration::from_millis(150)).await;
        let (key, body) = (key("resume"), pseudo_random(SIZE * 2, 2));
        backend.put(&key, &body).await;
        let setup = node(backend, relay_addr(&relay), BUCKET);
        register(&setup, backend, relay_addr(&relay), &key, &body);

        let kept = killed_run(&setup, &body, 3 * CHUNK).await;
        let run = setup.fetch_with(&["--json", "t/blob@1"]).await;
        let json = json_of(&run);
        assert_eq!(json["outcome"], "staged");
        assert_eq!(json["bytes_resumed"], kept, "{}", run.stderr);
        assert_eq!(json["bytes_transferred"], body.len() as u64 - kept);
        let path = json["path"].as_str().unwrap();
        assert_eq!(fs::read(path).unwrap(), body);
        assert!(setup.ingest_is_empty());
    }

    pub async fn digest_mismatch(backend: &impl Backend) {
        let addr = backend.addr();
        let (key, body) = (key("digest-mismatch"), pseudo_random(SIZE, 3));
        backend.put(&key, &body).await;
        let setup = node(backend, addr, BUCKET);
        // Registered as other bytes of the same size.
        register(&setup, backend, addr, &key, &pseudo_random(SIZE, 4));

        let run = setup.fetch("t/blob@1").await;
        run.error(backend.mismatch_code());
        run.assert_event("failed", Some(backend.mismatch_code()));
        assert!(setup.blobs().is_empty());
        assert!(setup.ingest_is_empty());
    }

    pub async fn changed(backend: &impl Backend) {
        let relay = front(backend, Duration::from_millis(150)).await;
        let (key, body) = (key("changed"), pseudo_random(SIZE * 2, 5));
        backend.put(&key, &body).await;
        let setup = node(backend, relay_addr(&relay), BUCKET);
        register(&setup, backend, relay_addr(&relay), &key, &body);
        killed_run(&setup, &body, 2 * CHUNK).await;

        // Other bytes of the same size under the same name: another version.
        backend.put(&key, &pseudo_random(SIZE * 2, 6)).await;
        let run = setup.fetch("t/blob@1").await;
        run.error(backend.mismatch_code());
        // A source that announces the digest refuses the new version before reading it; the
        // others read it and find out at the end, having discarded the old version's bytes.
        let discarded = run.stderr.contains("discarding the partial transfer");
        assert!(
            backend.announces_digest() || (discarded && run.stderr.contains("validator")),
            "{}",
            run.stderr
        );
        assert!(setup.blobs().is_empty());
    }

    pub async fn not_allowed(backend: &impl Backend) {
        let relay = front(backend, Duration::ZERO).await;
        let (key, body) = (key("not-allowed"), pseudo_random(1000, 7));
        backend.put(&key, &body).await;
        let setup = node(backend, relay_addr(&relay), "elsewhere");
        register(&setup, backend, relay_addr(&relay), &key, &body);

        let run = setup.fetch("t/blob@1").await;
        run.error("source_not_allowed");
        run.assert_event("refused", Some("source_not_allowed"));
        assert!(relay.seen().is_empty(), "{:?}", relay.seen());
    }
}

fn relay_addr(front: &Front) -> SocketAddr {
    let url = front.url("");
    url.trim_start_matches("http://").parse().unwrap()
}

/// S3 only: `source_ref` pins an object version (moto keeps versions; s3s-fs does not).
mod s3_versions {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn source_ref_pins_the_version_even_after_a_newer_one() {
        let Some(moto) = Moto::start().await else {
            return;
        };
        let key = key("versions");
        let (old, new) = (pseudo_random(200_000, 8), pseudo_random(200_000, 9));
        let version = moto.put_version(&key, &old).await;
        moto.put_version(&key, &new).await;
        let setup = node(&moto, moto.addr(), BUCKET);
        let pinned = |version: &str| {
            let mut registration = artifact("t/blob@1", &moto.uri(moto.addr(), &key), &old);
            registration["source"]["source_type"] = "s3".into();
            registration["source"]["source_ref"] = version.into();
            registration["credential"] = moto.credential();
            registration
        };

        setup.register(&[pinned(&version)]);
        let run = setup.fetch("t/blob@1").await;
        assert_eq!(fs::read(run.staged_path()).unwrap(), old);

        let other = node(&moto, moto.addr(), BUCKET);
        other.register(&[pinned("no-such-version")]);
        let missing = other.fetch("t/blob@1").await;
        assert!(
            missing.last_stderr_line().starts_with("error[source_"),
            "{missing:#?}"
        );
        assert!(other.blobs().is_empty());
    }
}

#[test]
fn base64_and_hmac_match_known_answers() {
    use support::cloud::{base64_decode, base64_encode, hmac_sha256};
    assert_eq!(base64_encode(b"hello!?"), "aGVsbG8hPw==");
    assert_eq!(base64_decode("aGVsbG8hPw=="), b"hello!?");
    // RFC 4231, test case 2.
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}
