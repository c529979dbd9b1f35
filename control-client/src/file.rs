//! The file-backed control plane: the embedded default for a node with no platform around it.
//!
//! Registrations come from a JSON file (`{"artifacts": [...]}`) that is looked at on every
//! lookup, so edits take effect without a restart; it is parsed again only when its identity,
//! size or change time differ from the last parse (a registry of thousands of entries would
//! otherwise be parsed whole for every pull). Events are appended to a JSON-lines log and
//! `fdatasync`ed before `report` returns. An entry that does not validate is refused on its own;
//! it does not make the other entries unusable.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;

use crate::{
    Artifact, ArtifactId, BoxFuture, ControlPlane, ControlPlaneError, Credential, Event, Intent,
};

/// Registry file and event log on the local disk.
#[derive(Debug, Clone)]
pub struct FileControlPlane {
    registry: PathBuf,
    events_log: PathBuf,
    parsed: Arc<Mutex<Option<Parsed>>>,
}

/// Registry entries by id (more than one under an id is an error at lookup).
type ById = Arc<HashMap<String, Vec<serde_json::Value>>>;

/// The registry as last parsed: its entries by id, and what the file looked like then.
#[derive(Debug)]
struct Parsed {
    stamp: Stamp,
    by_id: ById,
}

/// What tells one version of the registry file from another: device, inode, size and change
/// time (nanoseconds; any write or rename sets it).
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// The registry file's entries by id: it must be a JSON object whose `artifacts` is an array.
/// (A derived struct would read an array as well: serde takes a struct's fields from a
/// sequence.) Entries without an id are left out; every lookup misses them anyway.
fn index_registry(text: &[u8]) -> Result<ById, String> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let Some(serde_json::Value::Array(artifacts)) = object.remove("artifacts") else {
        return Err("it has no \"artifacts\" array".into());
    };
    let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for entry in artifacts {
        if let Some(id) = entry.get("id").and_then(|v| v.as_str()) {
            by_id.entry(id.to_owned()).or_default().push(entry);
        }
    }
    Ok(Arc::new(by_id))
}

/// Development credentials may sit beside a registration in the file.
#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    credential: Option<Credential>,
}

impl FileControlPlane {
    pub fn new(registry: impl Into<PathBuf>, events_log: impl Into<PathBuf>) -> Self {
        FileControlPlane {
            registry: registry.into(),
            events_log: events_log.into(),
            parsed: Arc::default(),
        }
    }

    pub fn registry_path(&self) -> &Path {
        &self.registry
    }

    fn entry(&self, id: &ArtifactId) -> Result<serde_json::Value, ControlPlaneError> {
        match self.entries()?.get(id.as_str()).map(Vec::as_slice) {
            None | Some([]) => Err(ControlPlaneError::NotRegistered { id: id.clone() }),
            Some([entry]) => Ok(entry.clone()),
            Some(_) => Err(invalid(
                id,
                "the registry holds this id more than once".into(),
            )),
        }
    }

    /// The registry's entries by id: the last parse while the file is unchanged, else a new one.
    fn entries(&self) -> Result<ById, ControlPlaneError> {
        let unreadable = |source| ControlPlaneError::Unavailable {
            what: format!("cannot read registry {}", self.registry.display()),
            source,
        };
        let mut file = std::fs::File::open(&self.registry).map_err(unreadable)?;
        let stamp = stamp(&file.metadata().map_err(unreadable)?);
        let mut parsed = self.parsed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = parsed.as_ref().filter(|p| p.stamp == stamp) {
            return Ok(last.by_id.clone());
        }
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut text).map_err(unreadable)?;
        let by_id = index_registry(&text).map_err(|e| ControlPlaneError::Malformed {
            what: format!("registry {} is not valid: {e}", self.registry.display()),
        })?;
        *parsed = Some(Parsed {
            stamp,
            by_id: by_id.clone(),
        });
        Ok(by_id)
    }

    fn lookup(&self, id: &ArtifactId) -> Result<Artifact, ControlPlaneError> {
        let entry = self.entry(id)?;
        serde_json::from_value(entry).map_err(|e| invalid(id, e.to_string()))
    }

    fn lookup_credential(&self, id: &ArtifactId) -> Result<Credential, ControlPlaneError> {
        let entry: Entry =
            serde_json::from_value(self.entry(id)?).map_err(|e| invalid(id, e.to_string()))?;
        Ok(entry.credential.unwrap_or(Credential::None))
    }

    fn append(&self, events: &[Event]) -> Result<(), ControlPlaneError> {
        let unavailable = |source| ControlPlaneError::Unavailable {
            what: format!("cannot append to event log {}", self.events_log.display()),
            source,
        };
        let mut lines = Vec::new();
        for event in events {
            serde_json::to_writer(&mut lines, event).expect("events always serialize");
            lines.push(b'\n');
        }
        if let Some(parent) = self.events_log.parent() {
            std::fs::create_dir_all(parent).map_err(unavailable)?;
        }
        let mut log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.events_log)
            .map_err(unavailable)?;
        log.write_all(&lines).map_err(unavailable)?;
        log.sync_data().map_err(unavailable)
    }
}

fn invalid(id: &ArtifactId, reason: String) -> ControlPlaneError {
    ControlPlaneError::InvalidRegistration {
        id: id.clone(),
        reason,
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ControlPlaneError> + Send + 'static,
) -> Result<T, ControlPlaneError> {
    tokio::task::spawn_blocking(work)
        .await
        .expect("control-plane file task panicked")
}

impl ControlPlane for FileControlPlane {
    fn resolve<'a>(
        &'a self,
        id: &'a ArtifactId,
    ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
        let (this, id) = (self.clone(), id.clone());
        Box::pin(blocking(move || this.lookup(&id)))
    }

    fn credentials<'a>(
        &'a self,
        id: &'a ArtifactId,
        _intent: Intent,
        _node_id: &'a str,
    ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
        let (this, id) = (self.clone(), id.clone());
        Box::pin(blocking(move || this.lookup_credential(&id)))
    }

    fn report<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        let (this, events) = (self.clone(), events.to_vec());
        Box::pin(blocking(move || this.append(&events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Operation, Outcome};
    use serde_json::json;

    fn artifact(id: &str) -> serde_json::Value {
        json!({
            "id": id, "project": "p", "artifact_kind": "blob",
            "source": {"source_type": "https", "uri": "https://h.example/x"},
            "digest": format!("sha256:{}", "0".repeat(64)),
            "lifecycle_state": "active", "trust_state": "verified", "channel": "prod",
            "source_policy": {"decision": "allow"}
        })
    }

    fn plane(dir: &Path, artifacts: serde_json::Value) -> FileControlPlane {
        let registry = dir.join("registry.json");
        std::fs::write(&registry, json!({ "artifacts": artifacts }).to_string()).unwrap();
        FileControlPlane::new(registry, dir.join("log/events.jsonl"))
    }

    fn id(s: &str) -> ArtifactId {
        ArtifactId::new(s).unwrap()
    }

    #[tokio::test]
    async fn resolves_valid_entries_beside_invalid_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut broken = artifact("broken@1");
        broken["trust_state"] = json!("sort-of");
        let cp = plane(
            dir.path(),
            json!([artifact("good@1"), broken, artifact("dup"), artifact("dup")]),
        );

        assert_eq!(cp.resolve(&id("good@1")).await.unwrap().id, id("good@1"));
        let err = cp.resolve(&id("broken@1")).await.unwrap_err();
        assert_eq!(err.code(), "invalid_registration");
        assert_eq!(
            cp.resolve(&id("dup")).await.unwrap_err().code(),
            "invalid_registration"
        );
        assert_eq!(
            cp.resolve(&id("missing")).await.unwrap_err().code(),
            "not_registered"
        );
    }

    #[tokio::test]
    async fn an_edited_registry_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let cp = plane(dir.path(), json!([artifact("a@1")]));
        assert!(cp.resolve(&id("a@1")).await.is_ok());
        assert_eq!(
            cp.resolve(&id("b@1")).await.unwrap_err().code(),
            "not_registered"
        );

        // Rewritten in place (same inode) and replaced by a rename (a new one).
        let registry = cp.registry_path().to_owned();
        let both = json!({ "artifacts": [artifact("a@1"), artifact("b@1")] });
        std::fs::write(&registry, both.to_string()).unwrap();
        assert!(cp.resolve(&id("b@1")).await.is_ok());
        let only_c = json!({ "artifacts": [artifact("c@1")] });
        std::fs::write(dir.path().join("next.json"), only_c.to_string()).unwrap();
        std::fs::rename(dir.path().join("next.json"), &registry).unwrap();
        assert!(cp.resolve(&id("c@1")).await.is_ok());
        assert_eq!(
            cp.resolve(&id("a@1")).await.unwrap_err().code(),
            "not_registered"
        );
    }

    #[tokio::test]
    async fn a_garbled_registry_is_unavailable_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cp = plane(dir.path(), json!([]));
        std::fs::write(cp.registry_path(), "{not json").unwrap();
        assert_eq!(
            cp.resolve(&id("x")).await.unwrap_err().code(),
            "control_plane_unavailable"
        );
    }

    #[tokio::test]
    async fn credentials_default_to_none_and_come_from_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut with_token = artifact("private@1");
        with_token["credential"] = json!({"kind": "bearer", "token": "t0k"});
        let cp = plane(dir.path(), json!([artifact("public@1"), with_token]));
        let none = cp
            .credentials(&id("public@1"), Intent::Pull, "n")
            .await
            .unwrap();
        assert_eq!(none, Credential::None);
        let bearer = cp
            .credentials(&id("private@1"), Intent::Pull, "n")
            .await
            .unwrap();
        assert!(matches!(bearer, Credential::Bearer { ref token, .. } if token == "t0k"));
    }

    #[tokio::test]
    async fn report_appends_one_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let cp = plane(dir.path(), json!([]));
        let first = Event::new("n", Operation::PullBlob, Outcome::Staged);
        let second = Event::new("n", Operation::Verify, Outcome::Verified);
        cp.report(std::slice::from_ref(&first)).await.unwrap();
        cp.report(std::slice::from_ref(&second)).await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap();
        let events: Vec<Event> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events, vec![first, second]);
    }
}
