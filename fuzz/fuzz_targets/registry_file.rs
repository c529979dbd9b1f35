//! The file-backed control plane's registry, `{"artifacts": [...]}`, read as the agent reads it:
//! the input is written to a registry file and looked up through `FileControlPlane`.
//!
//! The ids looked up are those the file's entries carry, and one it does not. For each:
//! - a file that is not a JSON object with an `artifacts` array is `control_plane_unavailable`
//!   for every id, never "not registered";
//! - a registration is returned only for an id exactly one entry carries, it is that entry read
//!   as a registration, and it carries the id asked for;
//! - "not registered" only for an id no entry carries, "invalid" only for one some entry does;
//! - credentials come only from an id exactly one entry carries.

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use control_client::{
    Artifact, ArtifactId, ControlPlane, ControlPlaneError, Credential, FileControlPlane, Intent,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Ids looked up per input, at most (each lookup reads the file again).
const MAX_LOOKUPS: usize = 4;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.build().expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary registry");
    file.write_all(data).expect("the registry is written");
    // No event is reported, so the log is never created.
    let plane = FileControlPlane::new(file.path(), file.path().with_extension("events"));
    let entries = entries(data);
    for id in ids(entries.as_deref()) {
        let resolved = runtime().block_on(plane.resolve(&id));
        let credential = runtime().block_on(plane.credentials(&id, Intent::Pull, "node"));
        match &entries {
            None => assert_unreadable(&resolved, &credential),
            Some(entries) => assert_lookup(entries, &id, &resolved, &credential),
        }
    }
});

/// The entries of `{"artifacts": [...]}`, as plain JSON; `None` for any other file.
fn entries(data: &[u8]) -> Option<Vec<Value>> {
    match serde_json::from_slice::<Value>(data).ok()? {
        Value::Object(mut object) => match object.remove("artifacts")? {
            Value::Array(entries) => Some(entries),
            _ => None,
        },
        _ => None,
    }
}

/// The valid ids the entries carry, and one that none does.
fn ids(entries: Option<&[Value]>) -> Vec<ArtifactId> {
    let carried = entries
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("id")?.as_str());
    let absent = std::iter::once("absent-from-the-registry@1");
    let valid = carried
        .chain(absent)
        .filter_map(|id| ArtifactId::new(id).ok());
    valid.take(MAX_LOOKUPS).collect()
}

fn carrying<'e>(entries: &'e [Value], id: &ArtifactId) -> Vec<&'e Value> {
    let carries = |e: &&Value| e.get("id").and_then(Value::as_str) == Some(id.as_str());
    entries.iter().filter(carries).collect()
}

fn assert_unreadable(
    resolved: &Result<Artifact, ControlPlaneError>,
    credential: &Result<Credential, ControlPlaneError>,
) {
    for code in [code(resolved), code(credential)] {
        assert_eq!(
            code,
            Some("control_plane_unavailable"),
            "an unreadable registry"
        );
    }
}

fn assert_lookup(
    entries: &[Value],
    id: &ArtifactId,
    resolved: &Result<Artifact, ControlPlaneError>,
    credential: &Result<Credential, ControlPlaneError>,
) {
    let carrying = carrying(entries, id);
    match resolved {
        Ok(artifact) => {
            assert_eq!(
                carrying.len(),
                1,
                "resolved {id} carried by {} entries",
                carrying.len()
            );
            assert_eq!(&artifact.id, id);
            let entry = serde_json::from_value::<Artifact>(carrying[0].clone());
            assert_eq!(entry.as_ref().ok(), Some(artifact));
        }
        Err(ControlPlaneError::NotRegistered { .. }) => assert!(carrying.is_empty(), "{id}"),
        Err(ControlPlaneError::InvalidRegistration { .. }) => assert!(!carrying.is_empty()),
        Err(_) => {}
    }
    if credential.is_ok() {
        assert_eq!(carrying.len(), 1, "credentials for {id}");
    }
}

fn code<T>(result: &Result<T, ControlPlaneError>) -> Option<&'static str> {
    result.as_ref().err().map(ControlPlaneError::code)
}
