//! Typed client for the blobstage control plane.
//!
//! The control plane owns registration, source policy, credential issue and audit; a node only
//! asks it. This crate holds the wire types of that conversation (artifact registrations,
//! digests, credentials, events), the [`ControlPlane`] interface the agent talks through, and
//! its two implementations: [`HttpControlPlane`] for the real control plane, and the
//! file-backed [`FileControlPlane`] that lets the agent run with no platform around it.
//!
//! Every type that comes from the wire validates while it is parsed and fails closed: an unknown
//! lifecycle, trust, kind or source type, or a digest that is missing, malformed or of an
//! undeclared algorithm, is refused, never defaulted. This crate never depends on the agent.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(unreachable_pub, missing_debug_implementations)]

mod artifact;
mod cache;
mod credential;
mod digest;
mod event;
mod file;
mod http;

use std::future::Future;
use std::pin::Pin;

pub use artifact::{
    Artifact, ArtifactId, ArtifactKind, Channel, LifecycleState, PolicyDecision, SourceDescriptor,
    SourcePolicy, SourceType, TrustState,
};
pub use cache::{CachedControlPlane, CredentialCache, Credentials, RefreshHook};
pub use credential::{Credential, Intent};
pub use digest::{Algorithm, Digest, DigestError};
pub use event::{Event, Operation, Outcome, Requester};
pub use file::FileControlPlane;
pub use http::{HttpControlPlane, HttpOptions, parse_retry_after};

/// A boxed future, so that [`ControlPlane`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the node asks of the control plane.
///
/// Implementations must be safe to share between concurrent transfers.
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    /// Looks up a registered artifact. An id the control plane does not know is
    /// [`ControlPlaneError::NotRegistered`]; nothing unregistered is ever staged.
    fn resolve<'a>(
        &'a self,
        id: &'a ArtifactId,
    ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>>;

    /// Issues credentials scoped to one artifact and one intent.
    fn credentials<'a>(
        &'a self,
        id: &'a ArtifactId,
        intent: Intent,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>>;

    /// Delivers events durably: when this returns `Ok`, the control plane holds them.
    fn report<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>>;
}

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlPlaneError {
    /// The control plane does not know this artifact.
    #[error("artifact {id} is not registered")]
    NotRegistered { id: ArtifactId },

    /// The registration exists but does not validate; it is refused, not guessed at.
    #[error("registration of {id} is invalid: {reason}")]
    InvalidRegistration { id: ArtifactId, reason: String },

    /// The control plane could not be reached or read.
    #[error("control plane unavailable: {what}")]
    Unavailable {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The control plane answered, but not in the shape of the protocol.
    #[error("control plane answered garbage: {what}")]
    Malformed { what: String },

    /// The control plane refused this node's identity token (HTTP 401 or 403): the token file
    /// is stale, or the node is not admitted. Retrying the same token does not help.
    #[error("control plane refused the node token for {call}: HTTP {status}: {detail}")]
    Denied {
        /// The call that was refused, e.g. `resolve team-a/x@1`.
        call: String,
        status: u16,
        /// What the control plane said, cut short; never the token.
        detail: String,
    },

    /// The control plane refused the request itself (a 4xx other than 401, 403, 408, 429, or
    /// 404 on a lookup; or a redirect, which is never followed): asking again unchanged would
    /// be refused again.
    #[error("control plane rejected {call}: HTTP {status}: {detail}")]
    Rejected {
        call: String,
        status: u16,
        detail: String,
    },

    /// The control plane answered a digest other than the one it gave earlier for the same id.
    /// A digest never changes for an artifact id, so the answer is refused.
    #[error("registration of {id} changed its digest from {known} to {answered}")]
    DigestChanged {
        id: ArtifactId,
        known: Digest,
        answered: Digest,
    },

    /// The options of a control-plane client were refused when it was built.
    #[error("invalid control plane options: {reason}")]
    InvalidOptions { reason: String },
}

impl ControlPlaneError {
    /// The stable machine code for this error, as printed in `error[...]` and sent in events.
    pub fn code(&self) -> &'static str {
        match self {
            ControlPlaneError::NotRegistered { .. } => "not_registered",
            ControlPlaneError::InvalidRegistration { .. } => "invalid_registration",
            ControlPlaneError::Unavailable { .. } | ControlPlaneError::Malformed { .. } => {
                "control_plane_unavailable"
            }
            ControlPlaneError::Denied { .. } => "control_plane_denied",
            ControlPlaneError::Rejected { .. } => "control_plane_rejected",
            ControlPlaneError::DigestChanged { .. } => "registration_changed",
            ControlPlaneError::InvalidOptions { .. } => "config_invalid",
        }
    }
}
