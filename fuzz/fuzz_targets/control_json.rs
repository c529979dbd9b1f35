//! What the control plane answers, as JSON: an artifact registration and issued credentials.
//! Each input is read as both.
//!
//! - A registration that reads is well-formed (a valid id, a digest that round-trips), its JSON
//!   form reads back as itself, and the node's policy gate admits it only when the control plane
//!   allows it, it is active or deprecated, not quarantined, on a staged channel and trusted
//!   enough for that channel.
//! - Credentials that read show nothing of their secrets in `Debug`: the output is the same
//!   whatever the secrets are. A kind that expires says when.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use blobstage::config::Config;
use blobstage::policy::Policy;
use control_client::{
    Artifact, ArtifactId, Credential, Digest, LifecycleState, PolicyDecision, TrustState,
};
use libfuzzer_sys::fuzz_target;

/// The node stages `prod` (verified or better) and `dev`.
const POLICY: &str = r#"
[policy]
channels = ["prod", "dev"]
min_trust = { prod = "verified" }
"#;

fn policy() -> &'static Policy {
    static POLICY_GATE: OnceLock<Policy> = OnceLock::new();
    POLICY_GATE.get_or_init(|| {
        let path = Path::new("/etc/blobstage/config.toml");
        let config = Config::from_toml(POLICY, path, []).expect("the fixed policy loads");
        Policy::new(config.policy)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(artifact) = serde_json::from_slice::<Artifact>(data) {
        check_artifact(&artifact);
    }
    if let Ok(credential) = serde_json::from_slice::<Credential>(data) {
        check_credential(&credential);
    }
});

fn check_artifact(artifact: &Artifact) {
    assert!(
        ArtifactId::new(artifact.id.as_str()).is_ok(),
        "{:?}",
        artifact.id
    );
    let digest = artifact.digest.to_string().parse::<Digest>();
    assert_eq!(digest.as_ref(), Ok(&artifact.digest));

    let json = serde_json::to_vec(artifact).expect("a registration serialises");
    let back: Artifact = serde_json::from_slice(&json).expect("a serialised registration reads");
    assert_eq!(&back, artifact);

    if policy().check_artifact(artifact).is_ok() {
        assert_admissible(artifact);
    }
}

fn assert_admissible(artifact: &Artifact) {
    assert_eq!(artifact.source_policy.decision, PolicyDecision::Allow);
    let live = [LifecycleState::Active, LifecycleState::Deprecated];
    assert!(
        live.contains(&artifact.lifecycle_state),
        "{:?}",
        artifact.lifecycle_state
    );
    assert_ne!(artifact.trust_state, TrustState::Quarantined);
    match artifact.channel.as_str() {
        "prod" => assert!(artifact.trust_state >= TrustState::Verified),
        "dev" => {}
        other => panic!("channel {other} is not staged here"),
    }
}

fn check_credential(credential: &Credential) {
    let shown = format!("{credential:?} {credential:#?}");
    let blank = blanked(credential);
    assert_eq!(
        shown,
        format!("{blank:?} {blank:#?}"),
        "Debug depends on a secret"
    );
    let expires = matches!(
        credential,
        Credential::Aws { .. } | Credential::AzureSas { .. }
    );
    assert!(!expires || credential.expires_at().is_some());
}

/// The same credential with every secret replaced.
fn blanked(credential: &Credential) -> Credential {
    let blank = || "-".to_owned();
    match credential.clone() {
        Credential::Aws {
            session_token,
            expires_at,
            ..
        } => Credential::Aws {
            access_key_id: blank(),
            secret_access_key: blank(),
            session_token: session_token.map(|_| blank()),
            expires_at,
        },
        Credential::Bearer { expires_at, .. } => Credential::Bearer {
            token: blank(),
            expires_at,
        },
        Credential::AzureSas { expires_at, .. } => Credential::AzureSas {
            sas: blank(),
            expires_at,
        },
        other => other,
    }
}
