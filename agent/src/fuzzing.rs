//! The doorway of the fuzz targets in `fuzz/` to the crate-internal parsers of untrusted input.
//!
//! Each function hands its input to the very parser the agent uses and returns what that parser
//! said, in plain public types, so that the targets can assert properties of the result. Nothing
//! here parses, checks or decides anything of its own, and nothing in the agent calls it: it
//! exists so the parsers can stay `pub(crate)` instead of becoming API. Not a stable interface
//! (hidden from the docs). Every crash a fuzzer found has a regression test at the bottom of
//! this file, on the same input as the file kept in `fuzz/corpus/<target>/`.

use url::Url;

use crate::source::SourceError;
use crate::source::cloud::split_uri;
use crate::source::http::parse_content_range;
use crate::source::huggingface::{HubFile, resolve_path, resolve_url};
use crate::transfer::journal::{Journal, JournalError};

/// An `hf://` URI as the Hub source reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUri {
    /// `[datasets/|spaces/]org/name`, as the Hub's URLs spell the repository.
    pub repo: String,
    pub org: String,
    pub name: String,
    /// Percent-decoded; `None` when the URI names no revision.
    pub revision: Option<String>,
    /// The file's path inside the repository, as written.
    pub path: String,
}

/// The Hub source's `hf://` parser.
pub fn parse_hub_uri(uri: &str) -> Result<HubUri, String> {
    let file = HubFile::parse(uri)?;
    Ok(HubUri {
        repo: file.repo(),
        org: file.org,
        name: file.name,
        revision: file.revision,
        path: file.path,
    })
}

/// The resolve URL the Hub source asks for `path` of `repo` at `revision`.
pub fn hub_resolve_url(endpoint: &Url, repo: &str, revision: &str, path: &str) -> Url {
    resolve_url(endpoint, repo, revision, path)
}

/// A Hub URL of a file, read back as the Hub source's policy gate reads every URL it is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrlParts {
    pub repo: String,
    /// The organisation the policy's `org` entries are checked against.
    pub org: String,
    /// The file path after the revision, still percent-encoded.
    pub file: String,
}

/// The Hub source's reading of `url`; `None` when it is not a file URL of `endpoint`.
pub fn hub_resolve_path(endpoint: &Url, url: &Url) -> Option<HubUrlParts> {
    let parts = resolve_path(endpoint, url)?;
    Some(HubUrlParts {
        repo: parts.repo.to_owned(),
        org: parts.org.to_owned(),
        file: parts.file.to_owned(),
    })
}

/// The bucket and key of `scheme://bucket/key`, split as the `s3`, `gcs` and `az://` sources
/// split them.
pub fn split_object_uri(uri: &str, scheme: &str) -> Result<(String, String), SourceError> {
    let (bucket, key) = split_uri(uri, scheme)?;
    Ok((bucket.to_owned(), key.as_ref().to_owned()))
}

/// A `Content-Range` value as the web sources read it; `None` on a side written `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRangeParts {
    /// First and last byte, inclusive.
    pub span: Option<(u64, u64)>,
    pub total: Option<u64>,
}

/// The web sources' `Content-Range` parser; `None` when they refuse the value.
pub fn parse_content_range_value(value: &str) -> Option<ContentRangeParts> {
    let parsed = parse_content_range(value)?;
    Some(ContentRangeParts {
        span: parsed.span,
        total: parsed.total,
    })
}

/// Reads a resume journal from the bytes of its file, as [`Journal::read`] does.
pub fn decode_journal(text: &[u8]) -> Result<Journal, JournalError> {
    Journal::decode(text)
}

/// The bytes [`Journal::write`] puts in the journal's file.
pub fn encode_journal(journal: &Journal) -> Vec<u8> {
    journal.encode()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::policy::{Bucket, Policy};
    use crate::redact::Redacted;
    use crate::source::cloud::{Azure, Cloud, Location};
    use crate::source::{Validator, huggingface};

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, Path::new("/etc/blobstage/config.toml"), []).unwrap()
    }

    #[test]
    fn a_hub_uri_reads_back_from_its_resolve_url() {
        let uri = "hf://datasets/acme/corpus@refs%2Fpr%2F1/dir/a b.parquet";
        let file = parse_hub_uri(uri).unwrap();
        assert_eq!(file.repo, "datasets/acme/corpus");
        assert_eq!(file.revision.as_deref(), Some("refs/pr/1"));
        let endpoint = Url::parse("https://huggingface.co").unwrap();
        let url = hub_resolve_url(&endpoint, &file.repo, "refs/pr/1", &file.path);
        let parts = hub_resolve_path(&endpoint, &url).unwrap();
        assert_eq!(
            (parts.org.as_str(), parts.file.as_str()),
            ("acme", "dir/a%20b.parquet")
        );
        assert!(huggingface::HubFile::parse("hf://acme/x/../f").is_err());
    }

    #[test]
    fn object_uris_and_content_ranges_read_as_the_sources_read_them() {
        let split = split_object_uri("s3://models/llama/w.bin", "s3://").unwrap();
        assert_eq!(split, ("models".into(), "llama/w.bin".into()));
        assert!(split_object_uri("s3://models/a//b", "s3://").is_err());
        let range = parse_content_range_value("bytes 5-9/10").unwrap();
        assert_eq!((range.span, range.total), (Some((5, 9)), Some(10)));
        assert_eq!(parse_content_range_value("bytes 9-5/10"), None);
    }

    #[test]
    fn a_journal_written_back_reads_as_itself() {
        let journal = Journal {
            format: crate::transfer::journal::FORMAT,
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 10,
            chunk_size: 4,
            plan_connections: 1,
            validator: Some(Validator::ETag("\"v1\"".into())),
            written: vec![4, 1, 0],
            hashed: 4,
            hash_state_format: crate::transfer::journal::HASH_STATE_FORMAT.into(),
            hash_state: "00".into(),
        };
        let text = encode_journal(&journal);
        assert_eq!(decode_journal(&text), Ok(journal));
        assert_eq!(decode_journal(&text[1..]), Err(JournalError::Corrupt));
    }

    /// Found by the `source_uri` target (fuzz/corpus/source_uri/crash-redacted-userinfo).
    #[test]
    fn a_uri_that_does_not_parse_is_shown_without_its_userinfo() {
        let found = "http://userEtgp1@qil]es";
        assert!(!Redacted::uri(found).to_string().contains("userEtgp1"));
        // The same in the error of an s3 URI that carries credentials before its bucket.
        let error = split_object_uri("s3://user:SECRET42@/models/w.bin", "s3://").unwrap_err();
        assert!(!error.to_string().contains("SECRET42"), "{error}");
    }

    /// Found by the `source_uri` target (fuzz/corpus/source_uri/crash-azure-foreign-endpoint).
    #[test]
    fn an_azure_uri_is_admitted_only_at_its_accounts_endpoint() {
        let config = config("[[policy.allow]]\nsource_type = 'azure_blob'\naccount = 'acct'\n");
        let policy = Policy::new(config.policy.clone());
        for uri in [
            "https://acct.blob.core.windoss.net/models/w.biccsv=1&sig=SECRET42",
            "https://acct.blob.attacker.example/models/w.bin",
            "https://acct.blob.core.windows.net/models/w.bin",
        ] {
            // A URI refused outright is not admitted either.
            let Ok(location) = Azure::locate(uri, &config) else {
                continue;
            };
            let admitted = admit_azure(&policy, uri, &location);
            let host = location.endpoint.host_str();
            assert!(
                admitted.is_err() || host == Some("acct.blob.core.windows.net"),
                "{uri}"
            );
        }
    }

    fn admit_azure(
        policy: &Policy,
        uri: &str,
        location: &Location,
    ) -> Result<(), crate::policy::PolicyError> {
        let bucket = Bucket {
            account: location.account.as_deref(),
            name: &location.bucket,
        };
        let shown = Redacted::uri(uri);
        let azure = control_client::SourceType::AzureBlob;
        policy.check_bucket(azure, &bucket, &location.endpoint, &shown)
    }

    /// Found by the `source_uri` target (fuzz/corpus/source_uri/crash-azure-port-dropped).
    #[test]
    fn an_azure_uri_is_reached_at_its_own_port() {
        let none = config("");
        for (uri, port) in [
            ("https:.blob.z:5/s/t", 5),
            (
                "https://acct.blob.core.windows.net:10000/models/w.bin",
                10000,
            ),
        ] {
            // A URI refused outright (the first names no account) loses no port either.
            let Ok(location) = Azure::locate(uri, &none) else {
                continue;
            };
            assert_eq!(
                location.endpoint.port_or_known_default(),
                Some(port),
                "{uri}"
            );
        }
    }

    /// Found by the `config` target (fuzz/corpus/config/crash-relative-socket).
    #[test]
    fn a_relative_socket_is_resolved_against_the_files_directory() {
        let path = Path::new("/etc/blobstage/config.toml");
        for socket in ["", "agent.sock"] {
            let text = format!("[api]\nsocket = '{socket}'\n");
            // Refusing the path fixes it as well as resolving it does.
            let Ok(loaded) = Config::from_toml(&text, path, []) else {
                continue;
            };
            let socket = loaded.api.socket;
            assert!(socket.starts_with("/etc/blobstage"), "{}", socket.display());
        }
    }

    /// Found by the `registry_file` target (fuzz/corpus/registry_file/crash-array-registry).
    #[test]
    fn a_registry_that_is_not_an_object_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.json");
        std::fs::write(&registry, "[[4]]\t").unwrap();
        let plane = control_client::FileControlPlane::new(registry, dir.path().join("events"));
        let id = control_client::ArtifactId::new("a@1").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let resolved = runtime.block_on(control_client::ControlPlane::resolve(&plane, &id));
        let code = resolved.unwrap_err().code();
        assert_eq!(code, "control_plane_unavailable");
    }
}
