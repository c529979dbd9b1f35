//! The sources of the shared suite (`tests/sources.rs`): each real server `.ci/test` starts
//! (`.ci/servers/`), and the loopback https origin, behind one small trait, [`Backend`].
//!
//! A backend knows how to reach its server, how to store an object in the suite's bucket
//! ([`BUCKET`]; each test uses keys of its own, so tests never collide), the URI a registration
//! names that object by, the node configuration that reaches the server and allows a bucket,
//! and the credential the control plane issues for it. Changing an object is storing other
//! bytes under its key. Every method that takes an `addr` lets a test address the server
//! through a [`super::front::Front`] relaying to [`Backend::addr`] instead of the server itself.
//!
//! To add a source to the suite: implement [`Backend`] for it here (its `start` returns `None`,
//! and the suite skips, when its server is not running), then add one line to the `suite!`
//! list at the top of `tests/sources.rs`. Sources addressed without a bucket treat `bucket` as
//! what their allow entries name (the https origin: [`BUCKET`] stands for its host, any other
//! name for a host that is not it).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{Value, json};
use sha2::Digest as _;

use super::agent::{Setup, artifact};
use super::hub::Hub;
use super::origin::Origin;
use super::servers::server;

/// The bucket (container) every test stores its objects in.
pub const BUCKET: &str = "blobstage-tests";

/// One source type's server, as the suite uses it; see the module docs.
#[allow(async_fn_in_trait)]
pub trait Backend: Sized {
    /// Connects to the running server; `None` when it is not running (the test then skips,
    /// or fails under `.ci/test`).
    async fn start() -> Option<Self>;
    /// The `source_type` of its registrations.
    fn source_type(&self) -> &'static str;
    /// Where the server listens.
    fn addr(&self) -> SocketAddr;
    /// Stores `body` as object `key` of [`BUCKET`], replacing any earlier one.
    async fn put(&self, key: &str, body: &[u8]);
    /// The URI of object `key`, reached at `addr`.
    fn uri(&self, addr: SocketAddr, key: &str) -> String;
    /// Node configuration (whole TOML tables) that reaches the server at `addr` and allows
    /// objects of `bucket` only.
    fn config(&self, addr: SocketAddr, bucket: &str) -> String;
    /// What the control plane issues for its objects.
    fn credential(&self) -> Value;
    /// Whether the source vouches for an object's digest before any byte is fetched (the Hub's
    /// LFS sha256): a registration it contradicts then fails with `source_digest_mismatch`
    /// before the transfer, instead of `digest_mismatch` after it.
    fn announces_digest(&self) -> bool {
        false
    }
    /// The code of a registered digest the object's bytes do not match.
    fn mismatch_code(&self) -> &'static str {
        match self.announces_digest() {
            true => "source_digest_mismatch",
            false => "digest_mismatch",
        }
    }
    /// Whether a front relaying to it must send `Host: <addr>` (the server routes by it).
    fn routes_by_host(&self) -> bool {
        false
    }
}

/// A node of `connections_per_blob` 64 KiB ranges that reaches `backend` at `addr` and
/// allows objects of `bucket` (its only allow entry).
pub fn node(backend: &impl Backend, addr: SocketAddr, bucket: &str, connections: usize) -> Setup {
    node_with(&backend.config(addr, bucket), connections)
}

/// Like [`node`], with `config` (sources and allow entries) instead of one backend's.
pub fn node_with(config: &str, connections: usize) -> Setup {
    let setup = Setup::new();
    let root = setup.root().display().to_string();
    setup.write_config(&format!(
        "state_dir = '{root}/state'\nnode_id = 'test-node'\n\n\
         [control_plane]\nregistry = '{root}/registry.json'\nevents_log = '{root}/events.jsonl'\n\n\
         [transfer]\nchunk_size = '64KiB'\nconnections_per_blob = {connections}\n\
         read_timeout = '5s'\nmax_attempts = 3\n\n{config}"
    ));
    setup
}

/// The registration of `body` at object `key` as artifact `t/blob@1`, with its size and the
/// backend's credential (the file-backed control plane issues it).
pub fn registration(backend: &impl Backend, addr: SocketAddr, key: &str, body: &[u8]) -> Value {
    let mut registration = artifact("t/blob@1", &backend.uri(addr, key), body);
    registration["source"]["source_type"] = backend.source_type().into();
    registration["credential"] = backend.credential();
    registration
}

/// A key no other test uses.
pub fn key(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{case}/{nanos:x}/blob.bin")
}

fn addr_of(url: &str) -> SocketAddr {
    let authority = url.split("://").nth(1).expect("a URL").split('/').next();
    authority.unwrap().parse().expect("an IP address and port")
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// An RFC 3339 time `lifetime` from now.
pub fn rfc3339_in(lifetime: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + lifetime).to_string()
}

/// The https source: the loopback origin, serving `/<bucket>/<key>`.
pub struct Https {
    origin: Origin,
}

impl Backend for Https {
    async fn start() -> Option<Self> {
        Some(Https {
            origin: Origin::start().await,
        })
    }
    fn source_type(&self) -> &'static str {
        "https"
    }
    fn addr(&self) -> SocketAddr {
        self.origin.addr()
    }
    async fn put(&self, key: &str, body: &[u8]) {
        self.origin.put(&format!("/{BUCKET}/{key}"), body.to_vec());
    }
    fn uri(&self, addr: SocketAddr, key: &str) -> String {
        format!("http://{addr}/{BUCKET}/{key}")
    }
    fn config(&self, _: SocketAddr, bucket: &str) -> String {
        let host = if bucket == BUCKET {
            "127.0.0.1"
        } else {
            "elsewhere.example"
        };
        format!("[[policy.allow]]\nsource_type = 'https'\nhost = '{host}'\ninsecure_http = true\n")
    }
    fn credential(&self) -> Value {
        json!({"kind": "none"})
    }
}

/// The `huggingface` source: the loopback Hub (`super::hub`), its files in repository
/// `<bucket>/suite`, so a bucket stands for a Hub organisation. The suite's relay goes in front
/// of the CDN, which serves every ranged GET; the hub's resolve requests go to the hub itself.
pub struct HuggingFace {
    hub: Hub,
}

impl HuggingFace {
    const REPO: &'static str = "blobstage-tests/suite";
}

impl Backend for HuggingFace {
    async fn start() -> Option<Self> {
        Some(HuggingFace {
            hub: Hub::start().await,
        })
    }
    fn source_type(&self) -> &'static str {
        "huggingface"
    }
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.hub.cdn_port()))
    }
    /// Commits `body` and squashes the history: like an object store's PUT, the earlier
    /// version is gone, not merely behind a branch that moved.
    async fn put(&self, key: &str, body: &[u8]) {
        self.hub.put(Self::REPO, key, body.to_vec());
        self.hub.squash(Self::REPO);
    }
    /// Points the Hub's signed URLs at `addr` when it is a relay rather than the CDN.
    fn uri(&self, addr: SocketAddr, key: &str) -> String {
        if addr != self.addr() {
            self.hub.route_cdn_through(addr.port());
        }
        self.hub.uri(Self::REPO, None, key)
    }
    fn config(&self, _: SocketAddr, bucket: &str) -> String {
        self.hub.node_config(&[bucket], true)
    }
    fn announces_digest(&self) -> bool {
        true
    }
    fn credential(&self) -> Value {
        json!({"kind": "none"})
    }
}

/// An S3 server reached with SigV4 credentials.
pub struct S3Server {
    url: String,
    access_key: String,
    secret_key: String,
}

impl S3Server {
    fn from_env(url: &str, key: Option<&str>, secret: Option<&str>) -> Option<S3Server> {
        let url = server(url)?;
        let var = |name: Option<&str>, default: &str| {
            name.and_then(|n| std::env::var(n).ok())
                .unwrap_or_else(|| default.to_owned())
        };
        Some(S3Server {
            url,
            access_key: var(key, "moto-key"),
            secret_key: var(secret, "moto-secret"),
        })
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// A client of the test bucket that signs with the server's own credentials.
    pub fn store(&self) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_endpoint(&self.url)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .build()
            .expect("an S3 client")
    }

    async fn put(&self, key: &str, body: &[u8]) -> Option<String> {
        let payload = object_store::PutPayload::from(body.to_vec());
        let put = self.store().put(&Path::from(key), payload).await;
        put.expect("S3 PUT").version
    }

    /// An `aws` credential of the server's keys, with `session_token`.
    pub fn credential_with(&self, secret: &str, session_token: &str) -> Value {
        json!({
            "kind": "aws", "access_key_id": self.access_key, "secret_access_key": secret,
            "session_token": session_token, "expires_at": rfc3339_in(Duration::from_secs(3600)),
        })
    }

    fn config(&self, addr: SocketAddr, bucket: &str) -> String {
        format!(
            "[sources.s3]\nendpoint = 'http://{addr}'\nregion = 'us-east-1'\n\n\
             [[policy.allow]]\nsource_type = 's3'\nbucket = '{bucket}'\ninsecure_http = true\n"
        )
    }
}

macro_rules! s3_backend {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        pub struct $name(pub S3Server);

        impl Backend for $name {
            async fn start() -> Option<Self> {
                $name::connect().await.map($name)
            }
            fn source_type(&self) -> &'static str {
                "s3"
            }
            fn addr(&self) -> SocketAddr {
                addr_of(&self.0.url)
            }
            async fn put(&self, key: &str, body: &[u8]) {
                self.0.put(key, body).await;
            }
            fn uri(&self, _: SocketAddr, key: &str) -> String {
                format!("s3://{BUCKET}/{key}")
            }
            fn config(&self, addr: SocketAddr, bucket: &str) -> String {
                self.0.config(addr, bucket)
            }
            fn credential(&self) -> Value {
                self.0
                    .credential_with(&self.0.secret_key, "s3-session-token")
            }
        }
    };
}

s3_backend!(
    S3s,
    "s3s-fs: checks SigV4 signatures. Its bucket is made by its start script."
);
s3_backend!(Moto, "moto: versioned buckets, any credentials.");

impl S3s {
    async fn connect() -> Option<S3Server> {
        let key = Some("TEST_S3S_ACCESS_KEY");
        S3Server::from_env("TEST_S3S_URL", key, Some("TEST_S3S_SECRET_KEY"))
    }
}

impl Moto {
    async fn connect() -> Option<S3Server> {
        let s3 = S3Server::from_env("TEST_MOTO_URL", None, None)?;
        // moto takes unsigned requests; a bucket that exists answers 409, which is fine.
        let bucket = format!("{}/{BUCKET}", s3.url);
        http()
            .put(&bucket)
            .send()
            .await
            .expect("moto: create bucket");
        let versioning =
            "<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>";
        let enabled = http()
            .put(format!("{bucket}?versioning"))
            .body(versioning)
            .send()
            .await
            .expect("moto: enable versioning");
        assert!(enabled.status().is_success(), "{enabled:?}");
        Some(s3)
    }

    /// Stores a new version of `key` and returns its version id.
    pub async fn put_version(&self, key: &str, body: &[u8]) -> String {
        self.0.put(key, body).await.expect("a versioned bucket")
    }
}

/// fake-gcs-server; it accepts any bearer token.
pub struct FakeGcs {
    url: String,
}

impl Backend for FakeGcs {
    async fn start() -> Option<Self> {
        let url = server("TEST_GCS_URL")?;
        let created = http()
            .post(format!("{url}/storage/v1/b"))
            .header("content-type", "application/json")
            .body(json!({"name": BUCKET}).to_string())
            .send()
            .await
            .expect("fake-gcs-server: create bucket");
        assert!(
            created.status().is_success() || created.status() == 409,
            "{created:?}"
        );
        Some(FakeGcs { url })
    }
    fn source_type(&self) -> &'static str {
        "gcs"
    }
    fn addr(&self) -> SocketAddr {
        addr_of(&self.url)
    }
    async fn put(&self, key: &str, body: &[u8]) {
        let name = query_escape(key);
        let upload = format!(
            "{}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}",
            self.url
        );
        let put = http()
            .post(upload)
            .body(body.to_vec())
            .send()
            .await
            .expect("fake-gcs-server: upload");
        assert!(put.status().is_success(), "{put:?}");
    }
    fn uri(&self, _: SocketAddr, key: &str) -> String {
        format!("gs://{BUCKET}/{key}")
    }
    fn config(&self, addr: SocketAddr, bucket: &str) -> String {
        format!(
            "[sources.gcs]\nendpoint = 'http://{addr}'\n\n\
             [[policy.allow]]\nsource_type = 'gcs'\nbucket = '{bucket}'\ninsecure_http = true\n"
        )
    }
    fn credential(&self) -> Value {
        json!({"kind": "bearer", "token": "gcs-test-token"})
    }
    fn routes_by_host(&self) -> bool {
        true
    }
}

/// The emulator's account and its published development key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// azurite: it checks SAS signatures and expiry, and serves public containers unsigned.
pub struct Azurite {
    /// The account endpoint, `http://127.0.0.1:P/devstoreaccount1`.
    url: String,
}

impl Azurite {
    /// Creates `container` (public when `public`: anonymous reads of its blobs are allowed).
    pub async fn create_container(&self, container: &str, public: bool) {
        let sas = account_sas("rwdlac", SystemTime::now() + Duration::from_secs(600));
        let mut request = http().put(format!("{}/{container}?restype=container&{sas}", self.url));
        if public {
            request = request.header("x-ms-blob-public-access", "blob");
        }
        let created = request.send().await.expect("azurite: create container");
        assert!(
            created.status().is_success() || created.status() == 409,
            "{created:?}"
        );
    }

    /// Stores `body` as `container/key`.
    pub async fn put_in(&self, container: &str, key: &str, body: &[u8]) {
        let sas = account_sas("rwdlac", SystemTime::now() + Duration::from_secs(600));
        let put = http()
            .put(format!("{}/{container}/{key}?{sas}", self.url))
            .header("x-ms-blob-type", "BlockBlob")
            .body(body.to_vec())
            .send()
            .await
            .expect("azurite: put blob");
        assert!(put.status().is_success(), "{put:?}");
    }
}

impl Backend for Azurite {
    async fn start() -> Option<Self> {
        let azurite = Azurite {
            url: server("TEST_AZURITE_URL")?,
        };
        azurite.create_container(BUCKET, false).await;
        Some(azurite)
    }
    fn source_type(&self) -> &'static str {
        "azure_blob"
    }
    fn addr(&self) -> SocketAddr {
        addr_of(&self.url)
    }
    async fn put(&self, key: &str, body: &[u8]) {
        self.put_in(BUCKET, key, body).await;
    }
    fn uri(&self, _: SocketAddr, key: &str) -> String {
        format!("az://{BUCKET}/{key}")
    }
    fn config(&self, addr: SocketAddr, bucket: &str) -> String {
        format!(
            "[sources.azure_blob]\naccount = '{AZURITE_ACCOUNT}'\n\
             endpoint = 'http://{addr}/{AZURITE_ACCOUNT}'\n\n\
             [[policy.allow]]\nsource_type = 'azure_blob'\naccount = '{AZURITE_ACCOUNT}'\n\
             container = '{bucket}'\ninsecure_http = true\n"
        )
    }
    fn credential(&self) -> Value {
        let lifetime = Duration::from_secs(3600);
        json!({
            "kind": "azure_sas",
            "sas": account_sas("rl", SystemTime::now() + lifetime),
            "expires_at": rfc3339_in(lifetime),
        })
    }
}

/// An account SAS of the emulator's account for the blob service, valid until `expiry`
/// (whole seconds), with `permissions` (`r`, `rl`, `rwdlac`...), as a query string.
pub fn account_sas(permissions: &str, expiry: SystemTime) -> String {
    let version = "2019-12-12";
    let expiry = humantime::format_rfc3339_seconds(expiry).to_string();
    let to_sign = format!("{AZURITE_ACCOUNT}\n{permissions}\nb\nsco\n\n{expiry}\n\n\n{version}\n");
    let key = base64_decode(AZURITE_KEY);
    let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
    format!(
        "sv={version}&ss=b&srt=sco&sp={permissions}&se={}&sig={}",
        query_escape(&expiry),
        query_escape(&signature)
    )
}

fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let padded = |byte: u8| block.map(|k| k ^ byte);
    let mut inner = sha2::Sha256::new();
    inner.update(padded(0x36));
    inner.update(message);
    let mut outer = sha2::Sha256::new();
    outer.update(padded(0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            match i <= chunk.len() {
                true => out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char),
                false => out.push('='),
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut n, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = BASE64.iter().position(|b| *b == c).expect("base64") as u32;
        n = n << 6 | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
        }
    }
    out
}
