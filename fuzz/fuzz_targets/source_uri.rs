//! Registered source URIs of all six forms, each input given to every parser (each refuses the
//! others' schemes), as the node would open them under a fixed configuration and policy.
//!
//! - `hf://`: an accepted URI has plain org, repository and path segments and a revision with no
//!   `.` or `..` segment; written back in canonical form it parses to the same file; its resolve
//!   URL reads back as the same repository, organisation and path; the source opens it only when
//!   the policy allows its organisation.
//! - `s3://`, `gs://`, `az://` (split) and `https://<account>.blob.<suffix>/` (Azure): an
//!   accepted URI is exactly `scheme://bucket/key` with a plain bucket and key; the located
//!   object's key splits back unchanged; an Azure account is a valid account name and an
//!   https-form endpoint is the URI's origin; a location the policy admits is reached at an
//!   endpoint the configuration names, or the store's own for that account.
//! - `artifact-store://`: an accepted key stays under the store's root.
//! - `https://`: an accepted URL is https (the policy allows no plain http), without userinfo,
//!   on an allowed host.
//!
//! And for every input: the URI as errors and logs show it, and every error message, carry
//! neither its query string nor its userinfo.

#![no_main]

use std::path::{Component, Path};
use std::sync::{Arc, OnceLock};

use blobstage::config::Config;
use blobstage::fuzzing::{self, HubUri};
use blobstage::policy::{Bucket, Policy};
use blobstage::redact::Redacted;
use blobstage::source::artifact_store::LocalStoreSource;
use blobstage::source::cloud::{Azure, Cloud, Gcs, Location, S3};
use blobstage::source::https::{self, HttpsSource};
use blobstage::source::huggingface::HuggingfaceSource;
use control_client::{Credential, Credentials, SourceType};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

/// What this node allows: one host pattern, one Hub organisation, one bucket per store.
const CONFIG: &str = r#"
[sources.azure_blob]
account = "acct"

[[policy.allow]]
source_type = "https"
host = "*.example.com"

[[policy.allow]]
source_type = "huggingface"
host = "huggingface.co"

[[policy.allow]]
source_type = "huggingface"
org = "acme"

[[policy.allow]]
source_type = "s3"
bucket = "models"

[[policy.allow]]
source_type = "gcs"
bucket = "models"

[[policy.allow]]
source_type = "azure_blob"
account = "acct"

[[policy.allow]]
source_type = "artifact_store"
"#;

const STORE_ROOT: &str = "/srv/artifact-store";

/// Where Azure serves blobs: `<account>.blob.<domain>`, in its public and sovereign clouds.
const AZURE_BLOB_DOMAINS: [&str; 3] = [
    "core.windows.net",
    "core.chinacloudapi.cn",
    "core.usgovcloudapi.net",
];

/// Everything but the unreserved characters, as a revision is written in canonical form.
const ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

struct Node {
    config: Config,
    policy: Arc<Policy>,
    client: reqwest::Client,
    hub: Url,
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let path = Path::new("/etc/blobstage/config.toml");
        let config = Config::from_toml(CONFIG, path, []).expect("the fixed configuration loads");
        let policy = Arc::new(Policy::new(config.policy.clone()));
        let client = https::client(&config).expect("the HTTP client builds");
        let hub = config
            .sources
            .huggingface
            .endpoint_url()
            .expect("the default Hub");
        Node {
            config,
            policy,
            client,
            hub,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = std::str::from_utf8(data) else {
        return;
    };
    assert_hidden(uri, &Redacted::uri(uri).to_string());
    check_hub(uri);
    check_split(uri);
    check_s3_and_gcs(uri);
    check_azure(uri);
    check_artifact_store(uri);
    check_https(uri);
});

fn check_hub(uri: &str) {
    let node = node();
    let credentials = Credentials::fixed(Credential::None);
    let opened = HuggingfaceSource::new(
        uri,
        None,
        node.hub.clone(),
        credentials,
        node.policy.clone(),
        node.client.clone(),
    );
    let parsed = fuzzing::parse_hub_uri(uri);
    match (&parsed, &opened) {
        (Err(_), Ok(_)) => panic!("the Hub source opened a URI its parser refuses"),
        (Ok(file), Ok(_)) => assert!(file.org.eq_ignore_ascii_case("acme"), "org not allowed"),
        (_, Err(e)) => assert_hidden(uri, &e.to_string()),
    }
    let Ok(file) = parsed else {
        return;
    };
    assert_plain_hub_file(&file);
    let canonical = canonical_hub_uri(&file);
    assert_eq!(
        fuzzing::parse_hub_uri(&canonical).as_ref(),
        Ok(&file),
        "{canonical}"
    );
    let mirror = Url::parse("http://127.0.0.1:8080/hub/").expect("a URL");
    for endpoint in [&node.hub, &mirror] {
        assert_resolve_round_trip(endpoint, &file);
    }
}

fn assert_plain_hub_file(file: &HubUri) {
    for name in [&file.org, &file.name] {
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        assert!(
            plain && !name.is_empty() && !name.starts_with('.'),
            "{name:?}"
        );
    }
    assert!(plain_segments(&file.path), "path {:?}", file.path);
    if let Some(revision) = &file.revision {
        let dots = revision.split('/').any(|s| s == "." || s == "..");
        assert!(!revision.is_empty() && !dots, "revision {revision:?}");
        assert!(
            !revision.chars().any(char::is_control),
            "revision {revision:?}"
        );
    }
}

/// `hf://{repo}[@{revision, every reserved character encoded}]/{path}`.
fn canonical_hub_uri(file: &HubUri) -> String {
    let revision = match &file.revision {
        Some(revision) => format!("@{}", utf8_percent_encode(revision, ENCODED)),
        None => String::new(),
    };
    format!("hf://{}{revision}/{}", file.repo, file.path)
}

fn assert_resolve_round_trip(endpoint: &Url, file: &HubUri) {
    let revision = file.revision.as_deref().unwrap_or("main");
    let url = fuzzing::hub_resolve_url(endpoint, &file.repo, revision, &file.path);
    let read = fuzzing::hub_resolve_path(endpoint, &url);
    let read = read.unwrap_or_else(|| panic!("{url} does not read back as a file URL"));
    assert_eq!(
        (read.repo.as_str(), read.org.as_str()),
        (file.repo.as_str(), file.org.as_str())
    );
    let decoded = percent_decode_str(&read.file).decode_utf8().expect("UTF-8");
    assert_eq!(decoded, file.path, "{url}");
}

fn check_split(uri: &str) {
    for scheme in ["s3://", "gs://", "az://"] {
        let (bucket, key) = match fuzzing::split_object_uri(uri, scheme) {
            Ok(split) => split,
            Err(e) => {
                assert_hidden(uri, &e.to_string());
                continue;
            }
        };
        assert_eq!(
            format!("{scheme}{bucket}/{key}"),
            uri,
            "the split must lose nothing"
        );
        assert_plain_object(&bucket, &key);
    }
}

fn assert_plain_object(bucket: &str, key: &str) {
    let bucket_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    assert!(!bucket.is_empty() && bucket_chars, "bucket {bucket:?}");
    assert!(
        plain_segments(key) && !key.contains(['?', '#']),
        "key {key:?}"
    );
}

fn check_s3_and_gcs(uri: &str) {
    let config = &node().config;
    let located = [
        (
            "s3://",
            S3::locate(uri, config),
            "https://s3.us-east-1.amazonaws.com/",
        ),
        (
            "gs://",
            Gcs::locate(uri, config),
            "https://storage.googleapis.com/",
        ),
    ];
    for (scheme, location, endpoint) in located {
        let location = match location {
            Ok(location) => location,
            Err(e) => {
                assert_hidden(uri, &e.to_string());
                continue;
            }
        };
        let split = fuzzing::split_object_uri(uri, scheme).expect("located, so it splits");
        assert_eq!(
            (location.bucket.as_str(), location.path.as_ref()),
            (&*split.0, &*split.1)
        );
        assert_eq!(
            (location.account.as_deref(), location.endpoint.as_str()),
            (None, endpoint)
        );
    }
}

fn check_azure(uri: &str) {
    let location = match Azure::locate(uri, &node().config) {
        Ok(location) => location,
        Err(e) => return assert_hidden(uri, &e.to_string()),
    };
    let account = location
        .account
        .as_deref()
        .expect("an Azure location names its account");
    let named = (3..=24).contains(&account.len())
        && account
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    assert!(named, "account {account:?}");
    let rebuilt = format!("az://{}/{}", location.bucket, location.path.as_ref());
    let split = fuzzing::split_object_uri(&rebuilt, "az://").expect("the located blob splits");
    assert_eq!(
        (split.0.as_str(), split.1.as_str()),
        (&*location.bucket, location.path.as_ref())
    );
    if uri.starts_with("az://") {
        assert_eq!(account, "acct");
    } else {
        let origin = Url::parse(uri)
            .expect("an https form URI is a URL")
            .origin();
        assert_eq!(
            location.endpoint.origin(),
            origin,
            "the endpoint is the URI's origin"
        );
    }
    assert_admitted_endpoint(uri, &location);
}

/// The policy's promise for the bucket-addressed sources (policy.rs): they only contact an
/// endpoint their configuration names, here none: for `az://`, the default
/// `https://acct.blob.core.windows.net`; for the https form, Azure's own blob endpoint of the
/// account, in its public or a sovereign cloud.
fn assert_admitted_endpoint(uri: &str, location: &Location) {
    let bucket = Bucket {
        account: location.account.as_deref(),
        name: &location.bucket,
    };
    let shown = Redacted::uri(uri);
    let azure = SourceType::AzureBlob;
    if node()
        .policy
        .check_bucket(azure, &bucket, &location.endpoint, &shown)
        .is_err()
    {
        return;
    }
    let host = location.endpoint.host_str().unwrap_or_default();
    let allowed = match uri.starts_with("az://") {
        true => host == "acct.blob.core.windows.net",
        false => AZURE_BLOB_DOMAINS
            .iter()
            .any(|domain| host == format!("acct.blob.{domain}")),
    };
    assert!(allowed, "admitted {host}, an endpoint no one configured");
}

fn check_artifact_store(uri: &str) {
    let root = Path::new(STORE_ROOT);
    if let Err(e) = LocalStoreSource::new(root, uri) {
        return assert_hidden(uri, &e.to_string());
    }
    let key = uri
        .strip_prefix("artifact-store://")
        .expect("accepted, so of its scheme");
    let normal = Path::new(key)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    assert!(
        normal && !key.contains('\0'),
        "key {key:?} is not a plain relative path"
    );
    assert!(
        root.join(key).starts_with(root),
        "key {key:?} leaves the root"
    );
}

fn check_https(uri: &str) {
    let node = node();
    let credentials = Credentials::fixed(Credential::None);
    let opened = HttpsSource::new(uri, credentials, node.policy.clone(), node.client.clone());
    if let Err(e) = opened {
        return assert_hidden(uri, &e.to_string());
    }
    let url = Url::parse(uri).expect("opened, so a URL");
    assert_eq!(
        url.scheme(),
        "https",
        "no allow entry lets plain http through"
    );
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "userinfo let through"
    );
    let host = url.host_str().expect("a host").to_ascii_lowercase();
    assert!(
        host.ends_with(".example.com") && host.len() > ".example.com".len(),
        "{host}"
    );
}

/// Every segment of `path` is non-empty and neither `.` nor `..`.
fn plain_segments(path: &str) -> bool {
    path.split('/')
        .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// `shown` (a message, or the URI as shown) carries neither the query and fragment of `uri`
/// nor its userinfo. Only parts that could not be there by coincidence are looked for: eight
/// characters or more, a digit among them (no message template has one), and nowhere in the
/// rest of the URI, even once its control characters are dropped.
fn assert_hidden(uri: &str, shown: &str) {
    for secret in [query(uri), userinfo(uri)].into_iter().flatten() {
        let telling = secret.len() >= 8 && secret.bytes().any(|b| b.is_ascii_digit());
        let rest: String = uri
            .replacen(secret, " ", 1)
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        if telling && !rest.contains(secret) {
            assert!(
                !shown.contains(secret),
                "{secret:?} of {uri:?} shown in {shown:?}"
            );
        }
    }
}

/// What follows the first `?` or `#`.
fn query(uri: &str) -> Option<&str> {
    uri.find(['?', '#']).map(|at| &uri[at + 1..])
}

/// `user:password` in `scheme://user:password@host/...`.
fn userinfo(uri: &str) -> Option<&str> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme_chars = scheme
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme.starts_with(|c: char| c.is_ascii_alphabetic()) || !scheme_chars {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len())];
    authority.rfind('@').map(|at| &authority[..at])
}
