//! Audit events: every pull and every verify on a node yields exactly one.
//!
//! The control plane deduplicates on `event_id`, so an event may be delivered more than once
//! but must never be lost. Events carry ids, digests and counts; never a credential or a URI.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{ArtifactId, Digest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    PullBlob,
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Transferred, verified and published.
    Staged,
    /// Already in the content store; the source was not contacted.
    AlreadyPresent,
    /// A verify found the blob matching its digest.
    Verified,
    /// Tried and failed (network, disk, digest mismatch).
    Failed,
    /// Not attempted: registration, lifecycle, trust or policy said no.
    Refused,
}

/// The local process that asked, when the request came over the local API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub uid: u32,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub node_id: String,
    pub artifact_id: Option<ArtifactId>,
    pub digest: Option<Digest>,
    pub operation: Operation,
    pub outcome: Outcome,
    pub error_code: Option<String>,
    pub bytes_transferred: u64,
    pub duration_ms: u64,
    pub requested_by: Option<Requester>,
    /// RFC 3339, UTC.
    pub at: String,
}

impl Event {
    /// A new event with a fresh time-ordered id, stamped now.
    pub fn new(node_id: &str, operation: Operation, outcome: Outcome) -> Self {
        Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            node_id: node_id.to_owned(),
            artifact_id: None,
            digest: None,
            operation,
            outcome,
            error_code: None,
            bytes_transferred: 0,
            duration_ms: 0,
            requested_by: None,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    pub fn with_duration(mut self, elapsed: Duration) -> Self {
        self.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_the_contract_shape() {
        let mut e = Event::new("node-a", Operation::PullBlob, Outcome::AlreadyPresent);
        e.artifact_id = Some(ArtifactId::new("a/b@1").unwrap());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["operation"], "pull_blob");
        assert_eq!(v["outcome"], "already_present");
        assert_eq!(v["artifact_id"], "a/b@1");
        assert_eq!(v["error_code"], serde_json::Value::Null);
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
        let other = Event::new("node-a", Operation::PullBlob, Outcome::Staged);
        assert_ne!(e.event_id, other.event_id);
    }
}
