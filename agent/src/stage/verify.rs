//! `artifact.verify`: re-hash a staged blob, or a file a runtime points at, against a digest.
//!
//! A staged blob that no longer matches its digest is moved out of `blobs/` into
//! `quarantine/`, so the next pull stages it again; a file outside the store is only judged,
//! never moved. A caller may name a file only if it owns it (or is root): the daemon must not
//! become a way to learn the digest of files the caller cannot read. Symlinks and anything but
//! regular files are refused, judged on the opened file so nothing can be swapped in between.
//! Every verify records exactly one event.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use control_client::{ArtifactId, Digest, Event, Operation, Outcome, Requester};
use tracing::{info, warn};

use super::{StageError, Stager};
use crate::digest::Hasher;

/// What to verify.
#[derive(Debug, Clone)]
pub enum Target {
    /// The staged blob of a registered artifact.
    Artifact(ArtifactId),
    /// A file a runtime points at, against a digest.
    File { digest: Digest, path: PathBuf },
}

/// A verify that found the bytes matching.
#[derive(Debug, Clone)]
pub struct Verified {
    pub digest: Digest,
    pub path: PathBuf,
    pub size: u64,
}

/// Why a verify did not confirm the bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("{digest} is not staged on this node")]
    NotStaged { digest: Digest },
    #[error("{} is not a regular file the caller owns", path.display())]
    NotAllowed { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} does not match: expected {expected}, got {actual}{}", path.display(),
        if *quarantined { "; the blob is quarantined" } else { "" })]
    Mismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
        quarantined: bool,
    },
}

impl VerifyError {
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Stage(e) => e.code(),
            VerifyError::NotStaged { .. } => "blob_not_found",
            VerifyError::NotAllowed { .. } => "path_not_allowed",
            VerifyError::Read { .. } => "io_error",
            VerifyError::Mismatch { .. } => "digest_mismatch",
        }
    }
}

impl Stager {
    /// Verifies `target` for `requester` and records the event.
    pub async fn verify(
        &self,
        target: Target,
        requester: Option<Requester>,
    ) -> Result<Verified, VerifyError> {
        let started = Instant::now();
        let artifact_id = match &target {
            Target::Artifact(id) => Some(id.clone()),
            Target::File { .. } => None,
        };
        let mut digest = None;
        let result = self.verify_target(target, requester, &mut digest).await;

        let mut event = match &result {
            Ok(_) => Event::new(&self.node_id, Operation::Verify, Outcome::Verified),
            Err(e) => {
                let outcome = match e {
                    VerifyError::Stage(stage) => stage.outcome(),
                    VerifyError::NotAllowed { .. } => Outcome::Refused,
                    _ => Outcome::Failed,
                };
                let mut event = Event::new(&self.node_id, Operation::Verify, outcome);
                event.error_code = Some(e.code().to_owned());
                event
            }
        };
        event.artifact_id = artifact_id;
        event.digest = digest;
        event.requested_by = requester;
        let event = event.with_duration(started.elapsed());
        self.metrics
            .verify_ended(event.outcome, event.error_code.as_deref());
        if let Err(source) = self.keep(event).await {
            return Err(VerifyError::Stage(StageError::Outbox { source }));
        }
        result
    }

    async fn verify_target(
        &self,
        target: Target,
        requester: Option<Requester>,
        digest_out: &mut Option<Digest>,
    ) -> Result<Verified, VerifyError> {
        let (digest, path, file) = match target {
            Target::Artifact(id) => {
                let artifact = self
                    .control_plane
                    .resolve(&id)
                    .await
                    .map_err(StageError::from)?;
                let digest = artifact.digest;
                *digest_out = Some(digest.clone());
                let found = self.store.find(&digest).map_err(StageError::Store)?;
                let (path, _) = found.ok_or_else(|| VerifyError::NotStaged {
                    digest: digest.clone(),
                })?;
                (digest, path, None)
            }
            Target::File { digest, path } => {
                *digest_out = Some(digest.clone());
                let file = open_callers_file(&path, requester)?;
                (digest, path, Some(file))
            }
        };
        let staged = file.is_none();
        let (actual, size) = hash_file(path.clone(), file, digest.clone()).await?;
        if actual == digest {
            info!(path = %path.display(), "verified");
            return Ok(Verified { digest, path, size });
        }
        let quarantined = staged && self.quarantine(&digest);
        Err(VerifyError::Mismatch {
            path,
            expected: digest,
            actual,
            quarantined,
        })
    }

    /// Moves a staged blob that no longer matches out of the store.
    fn quarantine(&self, digest: &Digest) -> bool {
        match self.store.quarantine(digest) {
            Ok(to) => {
                self.metrics.quarantined();
                warn!(%digest, to = %to.display(), "staged blob does not match its digest; quarantined");
                true
            }
            Err(e) => {
                warn!(%digest, error = %crate::errors::Chain(&e), "cannot quarantine a mismatching blob");
                false
            }
        }
    }
}

/// Opens a file a caller names: an absolute path, not a symlink (`O_NOFOLLOW`), and, judged on
/// the open file rather than the path so that nothing can be swapped in between, a regular file
/// the caller owns unless it is root. `O_NONBLOCK` keeps a FIFO from holding the open forever;
/// it does not change how a regular file reads.
fn open_callers_file(path: &Path, requester: Option<Requester>) -> Result<File, VerifyError> {
    let refused = || VerifyError::NotAllowed {
        path: path.to_owned(),
    };
    if !path.is_absolute() {
        return Err(refused());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|_| refused())?;
    let meta = file.metadata().map_err(|_| refused())?;
    let owner_ok = requester.is_none_or(|r| r.uid == 0 || r.uid == meta.uid());
    if !meta.is_file() || !owner_ok {
        return Err(refused());
    }
    Ok(file)
}

/// Hashes `file` (a staged blob at `path` when `None`) with the digest's algorithm, off the
/// async runtime.
async fn hash_file(
    path: PathBuf,
    file: Option<File>,
    digest: Digest,
) -> Result<(Digest, u64), VerifyError> {
    tokio::task::spawn_blocking(move || {
        let read_error = |source| VerifyError::Read {
            path: path.clone(),
            source,
        };
        let mut file = match file {
            Some(file) => file,
            None => File::open(&path).map_err(read_error)?,
        };
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buffer).map_err(read_error)?;
            if n == 0 {
                return Ok((hasher.finish(), size));
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
    })
    .await
    .expect("hash task panicked")
}
