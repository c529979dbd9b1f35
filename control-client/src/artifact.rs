//! Artifact registrations: what the control plane says about one blob.
//!
//! Every enumerated field is a closed set. Serde refuses values outside it, so a control plane
//! that grows a new lifecycle or trust state is refused by an older node rather than guessed at.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// The control plane's identifier of an artifact, e.g. `team-a/llama-3-8b-weights@3`.
///
/// Non-empty, at most 512 bytes, printable, without whitespace: it is echoed in errors, logs and
/// events, and must not be able to forge a line in any of them.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ArtifactId(String);

impl ArtifactId {
    pub const MAX_LEN: usize = 512;

    /// Validates an id. The error says what is wrong without echoing the input back.
    pub fn new(id: impl Into<String>) -> Result<Self, &'static str> {
        let id = id.into();
        if id.is_empty() {
            return Err("artifact id is empty");
        }
        if id.len() > Self::MAX_LEN {
            return Err("artifact id is longer than 512 bytes");
        }
        if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("artifact id contains whitespace or control characters");
        }
        Ok(ArtifactId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArtifactId({})", self.0)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ArtifactId::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// The kind of artifact. blobstage stages blobs only; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Blob,
}

/// Where the bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    S3,
    Gcs,
    AzureBlob,
    Https,
    Huggingface,
    ArtifactStore,
}

impl SourceType {
    /// Every source type, for metrics that show a series for each (zero until used).
    pub const ALL: [SourceType; 6] = [
        SourceType::S3,
        SourceType::Gcs,
        SourceType::AzureBlob,
        SourceType::Https,
        SourceType::Huggingface,
        SourceType::ArtifactStore,
    ];

    /// The name used in configuration, metrics labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            SourceType::S3 => "s3",
            SourceType::Gcs => "gcs",
            SourceType::AzureBlob => "azure_blob",
            SourceType::Https => "https",
            SourceType::Huggingface => "huggingface",
            SourceType::ArtifactStore => "artifact_store",
        }
    }
}

impl fmt::Display for SourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The registered origin of an artifact's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDescriptor {
    pub source_type: SourceType,
    /// The object's address, in the form of its source type (see CONTRACT.md).
    pub uri: String,
    /// Pins an object version or a Hugging Face commit.
    #[serde(default)]
    pub source_ref: Option<String>,
    /// When present, the source must report exactly this size before any byte is fetched.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Recorded only: blobs are stored as the bytes the digest covers, never decoded.
    #[serde(default)]
    pub content_encoding: Option<String>,
}

/// Lifecycle of a registration. Only `active` and `deprecated` artifacts are staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    Registered,
    Active,
    Deprecated,
    Revoked,
}

/// Trust in an artifact, from least to most. `quarantined` is never staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustState {
    Quarantined,
    Unverified,
    Verified,
    Signed,
}

impl TrustState {
    pub fn name(self) -> &'static str {
        match self {
            TrustState::Quarantined => "quarantined",
            TrustState::Unverified => "unverified",
            TrustState::Verified => "verified",
            TrustState::Signed => "signed",
        }
    }
}

/// A promotion channel (`dev`, `staging`, `prod`, ...): an open set of short names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Channel(String);

impl Channel {
    pub fn new(name: impl Into<String>) -> Result<Self, &'static str> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if valid {
            Ok(Channel(name))
        } else {
            Err("channel must be 1-64 of [A-Za-z0-9-_.]")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Channel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Channel::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The control plane's own source-allowlist decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyDecision {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePolicy {
    pub decision: PolicyDecision,
    #[serde(default)]
    pub policy_id: Option<String>,
}

/// One registered artifact, as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub id: ArtifactId,
    pub project: String,
    pub artifact_kind: ArtifactKind,
    pub source: SourceDescriptor,
    pub digest: Digest,
    pub lifecycle_state: LifecycleState,
    pub trust_state: TrustState,
    pub channel: Channel,
    pub source_policy: SourcePolicy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registration() -> serde_json::Value {
        json!({
            "id": "team-a/weights@3",
            "project": "team-a",
            "artifact_kind": "blob",
            "source": {"source_type": "https", "uri": "https://models.example.com/w.bin",
                       "source_ref": null, "size_bytes": 12, "content_encoding": null},
            "digest": format!("sha256:{}", "a".repeat(64)),
            "lifecycle_state": "active",
            "trust_state": "verified",
            "channel": "prod",
            "source_policy": {"decision": "allow", "policy_id": "default@7"}
        })
    }

    fn parse(v: serde_json::Value) -> Result<Artifact, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn parses_the_contract_example() {
        let a = parse(registration()).unwrap();
        assert_eq!(a.id.as_str(), "team-a/weights@3");
        assert_eq!(a.source.source_type, SourceType::Https);
        assert_eq!(a.source.size_bytes, Some(12));
        assert_eq!(a.trust_state, TrustState::Verified);
    }

    #[test]
    fn refuses_unknown_values_of_closed_fields() {
        let cases = [
            ("/lifecycle_state", json!("retired")),
            ("/trust_state", json!("trusted")),
            ("/artifact_kind", json!("image")),
            ("/source/source_type", json!("ftp")),
            ("/source_policy/decision", json!("maybe")),
            ("/digest", json!("sha1:abc")),
            ("/digest", json!(null)),
            ("/channel", json!("prod channel")),
            ("/id", json!("")),
        ];
        for (pointer, value) in cases {
            let mut v = registration();
            *v.pointer_mut(pointer).unwrap() = value.clone();
            assert!(parse(v).is_err(), "{pointer} = {value} was accepted");
        }
    }

    #[test]
    fn refuses_a_missing_digest() {
        let mut v = registration();
        v.as_object_mut().unwrap().remove("digest");
        assert!(parse(v).is_err());
    }

    #[test]
    fn trust_is_ordered_from_quarantined_to_signed() {
        assert!(TrustState::Quarantined < TrustState::Unverified);
        assert!(TrustState::Verified < TrustState::Signed);
    }
}
