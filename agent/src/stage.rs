//! `artifact.pull_blob`: one registered artifact from the control plane to a verified blob.
//!
//! The order is the contract: resolve (nothing unregistered is pulled), gate on the
//! registration, answer from the store if the blob is there (the source is not contacted),
//! obtain credentials, open the source (its URI passes the node policy before any request),
//! check the size, transfer while hashing, compare digests, publish. Whatever happens, exactly
//! one event is reported for the pull, and the pull is not reported done before its event is
//! recorded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_client::{
    Artifact, ArtifactId, CachedControlPlane, ControlPlane, ControlPlaneError, CredentialCache,
    Digest, Event, Intent, Operation, Outcome, Requester,
};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub mod verify;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::{Admission, Policy, PolicyError};
use crate::report::{Outbox, OutboxError};
use crate::source::ObjectInfo;
use crate::source::{self, SourceError};
use crate::store::{Ingest, Store, StoreError};
use crate::transfer::journal::Journal;
use crate::transfer::plan::RangePlan;
use crate::transfer::{self, Resume, Transfer, TransferError, TransferSettings};

/// A pull that ended with a verified blob in the store.
#[derive(Debug, Clone)]
pub struct Staged {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    /// Bytes received from the source; 0 when the blob was already present.
    pub bytes_transferred: u64,
    /// Bytes an earlier, interrupted run had already written and this one kept.
    pub bytes_resumed: u64,
    /// Bytes read back from the ingest file to hash them (never the already hashed prefix of
    /// an earlier run).
    pub bytes_read_back: u64,
    /// Connections the transfer ended with (it may add some to `connections_per_blob`); 0
    /// when nothing was transferred.
    pub connections: usize,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("{artifact} refused: {source}")]
    Refused {
        artifact: ArtifactId,
        source: PolicyError,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the source holds {actual} bytes but {registered} are registered")]
    SizeMismatch { registered: u64, actual: u64 },
    #[error("the source announces digest {announced}, but {registered} is registered")]
    SourceDigestMismatch {
        registered: Digest,
        announced: Digest,
    },
    #[error("transfer failed")]
    Transfer(#[from] TransferError),
    #[error("the pinned digest {pinned} is not the registered {registered}")]
    PinMismatch { pinned: Digest, registered: Digest },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("staged {}, but the event could not be recorded", path.display())]
    Unrecorded {
        path: PathBuf,
        #[source]
        source: OutboxError,
    },
    #[error(transparent)]
    Outbox { source: OutboxError },
    #[error(
        "the event outbox holds {depth} events, its limit; new pulls wait until the control plane takes them"
    )]
    OutboxFull { depth: usize },
}

impl StageError {
    /// The stable code printed as `error[code]` and sent in events.
    pub fn code(&self) -> &'static str {
        match self {
            StageError::ControlPlane(e) => e.code(),
            StageError::Refused { source, .. } => source.code(),
            StageError::Source(e) => e.code(),
            StageError::SizeMismatch { .. } => "size_mismatch",
            StageError::SourceDigestMismatch { .. } => "source_digest_mismatch",
            StageError::Transfer(e) => e.code(),
            StageError::DigestMismatch { .. } => "digest_mismatch",
            StageError::PinMismatch { .. } => "digest_pin_mismatch",
            StageError::Store(e) => e.code(),
            StageError::Unrecorded { source, .. } | StageError::Outbox { source } => source.code(),
            StageError::OutboxFull { .. } => "outbox_full",
        }
    }

    /// `refused` when the pull was not attempted, `failed` when it was tried and did not work.
    pub fn outcome(&self) -> Outcome {
        match self.code() {
            "not_registered"
            | "invalid_registration"
            | "policy_denied"
            | "artifact_revoked"
            | "artifact_not_active"
            | "artifact_quarantined"
            | "trust_too_low"
            | "channel_not_allowed"
            | "source_not_allowed"
            | "insecure_source"
            | "unsupported_source"
            | "invalid_source_uri"
            | "digest_pin_mismatch"
            | "registration_changed"
            | "wrong_credential_kind" => Outcome::Refused,
            _ => Outcome::Failed,
        }
    }
}

/// Where a pull stands, for whoever watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Queued = 0,
    Resolving = 1,
    Transferring = 2,
    Verifying = 3,
}

/// A window on a running pull, and the switch that cancels it.
#[derive(Debug)]
pub struct Observer {
    /// The pull's id (`p-<uuid>`): the daemon's pull id, and the `pull` field of its log span.
    id: String,
    phase: AtomicU8,
    /// Bytes received from the source so far in this run.
    received: Arc<AtomicU64>,
    /// Bytes kept from an earlier run.
    resumed: AtomicU64,
    /// The object's size once the source said it; `u64::MAX` before.
    total: AtomicU64,
    cancel: CancellationToken,
}

impl Default for Observer {
    fn default() -> Self {
        Observer {
            id: format!("p-{}", uuid::Uuid::now_v7().simple()),
            phase: AtomicU8::new(Phase::Queued as u8),
            received: Arc::default(),
            resumed: AtomicU64::new(0),
            total: AtomicU64::new(u64::MAX),
            cancel: CancellationToken::new(),
        }
    }
}

impl Observer {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Queued,
            1 => Phase::Resolving,
            2 => Phase::Transferring,
            _ => Phase::Verifying,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Bytes of the object on disk or received: kept from an earlier run plus fetched now.
    pub fn bytes_done(&self) -> u64 {
        self.resumed.load(Ordering::Acquire) + self.received.load(Ordering::Acquire)
    }

    pub fn bytes_total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Acquire)).filter(|t| *t != u64::MAX)
    }

    /// Stops the pull at the next block; what was written is kept for a later resume.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// Everything a pull needs, built once per process.
#[derive(Debug)]
pub struct Stager {
    config: Arc<Config>,
    node_id: String,
    /// Registrations, kept for `cache_ttl`, digests checked against earlier answers.
    control_plane: Arc<dyn ControlPlane>,
    /// Credentials per artifact, shared by every range and every pull of it.
    credentials: Arc<CredentialCache>,
    policy: Arc<Policy>,
    store: Store,
    http: reqwest::Client,
    /// `max_connections` for every transfer of this process together.
    connections: Arc<Semaphore>,
    /// Where every event goes first; delivered to the control plane from there.
    outbox: Arc<Outbox>,
    /// What this process counts; the daemon serves it at `/metrics`.
    metrics: Arc<Metrics>,
}

impl Stager {
    pub fn new(
        config: Arc<Config>,
        control_plane: Arc<dyn ControlPlane>,
        http: reqwest::Client,
    ) -> Result<Self, StageError> {
        let store = Store::open(&config.state_dir)?;
        let outbox = Outbox::open(
            config.state_dir.join("outbox"),
            config.control_plane.outbox_max_events,
            control_plane.clone(),
        )
        .map_err(|source| StageError::Outbox { source })?;
        let freed = store.sweep_ingests(config.transfer.ingest_ttl)?;
        if freed > 0 {
            info!(
                bytes = freed,
                "removed partial transfers older than ingest_ttl"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let counted = metrics.clone();
        let credentials = CredentialCache::new(control_plane.clone(), config.node_id())
            .with_refresh_hook(Arc::new(move || counted.credential_refreshed()));
        let cached = CachedControlPlane::new(control_plane, config.control_plane.cache_ttl);
        Ok(Stager {
            metrics,
            credentials: Arc::new(credentials),
            control_plane: Arc::new(cached),
            node_id: config.node_id(),
            policy: Arc::new(Policy::new(config.policy.clone())),
            connections: Arc::new(Semaphore::new(config.transfer.max_connections)),
            outbox: Arc::new(outbox),
            config,
            store,
            http,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Writes `event` to the outbox, durably, before the operation is reported done. When the
    /// outbox cannot be written (a full or read-only disk), the event goes to the control plane
    /// at once instead; it is lost only when that fails too.
    async fn keep(&self, event: Event) -> Result<(), OutboxError> {
        let outbox = self.outbox.clone();
        let written = {
            let event = event.clone();
            tokio::task::spawn_blocking(move || outbox.append(&event))
                .await
                .expect("outbox task panicked")
        };
        let Err(unwritten) = written else {
            return Ok(());
        };
        match self
            .control_plane
            .report(std::slice::from_ref(&event))
            .await
        {
            Ok(()) => {
                warn!(error = %crate::errors::Chain(&unwritten),
                    "the event outbox cannot be written; the event went to the control plane directly");
                Ok(())
            }
            Err(_) => Err(unwritten),
        }
    }

    /// Stages `id` and records its event: [`Stager::admit`], then [`Stager::stage`].
    pub async fn pull(
        &self,
        id: &ArtifactId,
        requester: Option<Requester>,
    ) -> Result<Staged, StageError> {
        let artifact = self.admit(id, requester).await?;
        self.stage(artifact, requester, &Observer::default()).await
    }

    /// Resolves `id` and checks it against policy. A refusal is recorded as the pull's event.
    pub async fn admit(
        &self,
        id: &ArtifactId,
        requester: Option<Requester>,
    ) -> Result<Artifact, StageError> {
        if self.outbox.is_full() {
            // Limitation: this refusal has no event: there is no room to keep one.
            return Err(StageError::OutboxFull {
                depth: self.outbox.depth(),
            });
        }
        let started = Instant::now();
        let span = info_span!("admit", artifact = %id);
        let admitted = self.resolve_and_check(id).instrument(span).await;
        match admitted {
            Ok(artifact) => Ok(artifact),
            Err((digest, error)) => {
                let recorded = self
                    .record(id, digest, requester, started, Err(error))
                    .await;
                Err(recorded.expect_err("a refused pull stays refused"))
            }
        }
    }

    async fn resolve_and_check(
        &self,
        id: &ArtifactId,
    ) -> Result<Artifact, (Option<Digest>, StageError)> {
        let artifact = self
            .control_plane
            .resolve(id)
            .await
            .map_err(|e| (None, e.into()))?;
        let digest = Some(artifact.digest.clone());
        if artifact.id != *id {
            let what = format!("asked for {id}, the answer is for {}", artifact.id);
            return Err((digest, ControlPlaneError::Malformed { what }.into()));
        }
        let refused = |source| StageError::Refused {
            artifact: id.clone(),
            source,
        };
        match self.policy.check_artifact(&artifact) {
            Ok(Admission::Admitted) => Ok(artifact),
            Ok(Admission::AdmittedDeprecated) => {
                warn!("artifact is deprecated; staging it anyway");
                Ok(artifact)
            }
            Err(e) => Err((digest, refused(e))),
        }
    }

    /// Stages an admitted artifact, reporting progress to `observer`, and records the event.
    pub async fn stage(
        &self,
        artifact: Artifact,
        requester: Option<Requester>,
        observer: &Observer,
    ) -> Result<Staged, StageError> {
        let started = Instant::now();
        let (id, digest) = (artifact.id.clone(), artifact.digest.clone());
        let source_type = artifact.source.source_type;
        let span = info_span!("pull", pull = %observer.id(), artifact = %id, %digest);
        let result = self
            .stage_admitted(artifact, started, observer)
            .instrument(span)
            .await;
        let outcome = result
            .as_ref()
            .map_or_else(StageError::outcome, |s| s.outcome);
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.stage_took(source_type, outcome, seconds);
        self.record(&id, Some(digest), requester, started, result)
            .await
    }

    /// Records a pull that ended before it was staged (cancelled while queued, or refused
    /// by the daemon before it could be admitted).
    pub async fn record_unstaged(
        &self,
        id: Option<&ArtifactId>,
        digest: Option<Digest>,
        outcome: Outcome,
        code: &str,
        requester: Option<Requester>,
    ) {
        let mut event = Event::new(&self.node_id, Operation::PullBlob, outcome);
        event.artifact_id = id.cloned();
        event.digest = digest;
        event.error_code = Some(code.to_owned());
        event.requested_by = requester;
        self.metrics.pull_ended(outcome, Some(code));
        if let Err(e) = self.keep(event).await {
            warn!(error = %crate::errors::Chain(&e), code, "an event was not recorded");
        }
    }

    /// Records the event of a pull, then hands its result back. The pull is not done before
    /// its event is recorded.
    async fn record(
        &self,
        id: &ArtifactId,
        digest: Option<Digest>,
        requester: Option<Requester>,
        started: Instant,
        result: Result<Staged, StageError>,
    ) -> Result<Staged, StageError> {
        let mut event = match &result {
            Ok(staged) => {
                let mut e = Event::new(&self.node_id, Operation::PullBlob, staged.outcome);
                e.bytes_transferred = staged.bytes_transferred;
                e
            }
            Err(err) => {
                let mut e = Event::new(&self.node_id, Operation::PullBlob, err.outcome());
                e.error_code = Some(err.code().to_owned());
                e
            }
        };
        event.artifact_id = Some(id.clone());
        event.digest = digest;
        event.requested_by = requester;
        let event = event.with_duration(started.elapsed());
        self.metrics
            .pull_ended(event.outcome, event.error_code.as_deref());

        // Only a disk that cannot be written loses an event here; a staged pull then fails.
        match (self.keep(event).await, result) {
            (Ok(()), result) => result,
            (Err(source), Ok(staged)) => Err(StageError::Unrecorded {
                path: staged.path,
                source,
            }),
            (Err(report), Err(err)) => {
                warn!(artifact = %id, error = %crate::errors::Chain(&report),
                    "the event of this failed pull was not recorded");
                Err(err)
            }
        }
    }

    async fn stage_admitted(
        &self,
        artifact: Artifact,
        started: Instant,
        observer: &Observer,
    ) -> Result<Staged, StageError> {
        if let Some((path, size)) = self.store.find(&artifact.digest)? {
            self.store.touch(&artifact.digest);
            return Ok(already_present(path, artifact.digest, size, started));
        }
        observer.set_phase(Phase::Resolving);
        self.transfer(artifact, started, observer).await
    }

    /// Credentials, the source (its URI checked against policy), and the first request, which
    /// learns the size and the validator; a size or a digest the source announces other than
    /// the registered ones stops here.
    async fn open_source(
        &self,
        artifact: &Artifact,
        observer: &Observer,
    ) -> Result<(Arc<dyn source::Source>, ObjectInfo), StageError> {
        let credentials = self.credentials.scoped(&artifact.id, Intent::Pull);
        // Asked before the source is opened, so that a control plane that issues nothing stops
        // the pull before any request to the source.
        credentials.current().await?;
        let source = source::open(
            &artifact.source,
            credentials,
            &self.config,
            self.policy.clone(),
            &self.http,
        )
        .map_err(|e| match e {
            SourceError::Policy(source) => StageError::Refused {
                artifact: artifact.id.clone(),
                source,
            },
            other => StageError::Source(other),
        })?;
        // A source whose URI names a moving version resumes the one its journal recorded.
        let journal = Journal::read(&self.store.journal_path(&artifact.digest));
        if let Some(earlier) = journal.ok().flatten().and_then(|j| j.validator) {
            source.prefer_version(&earlier);
        }
        // The first request counts against the connection budget like every range request.
        let permit = self.connections.acquire().await.expect("never closed");
        let metrics = self.metrics.transfer(artifact.source.source_type);
        let attempts = self.config.transfer.max_attempts;
        let info = transfer::stat(source.as_ref(), attempts, &metrics).await;
        drop(permit);
        let info = info?;
        observer.total.store(info.size, Ordering::Release);
        if let Some(registered) = artifact.source.size_bytes.filter(|r| *r != info.size) {
            return Err(StageError::SizeMismatch {
                registered,
                actual: info.size,
            });
        }
        let registered = &artifact.digest;
        let announced = source.announced_digest();
        if let Some(announced) = announced.filter(|a| a.algorithm() == registered.algorithm())
            && announced != *registered
        {
            return Err(StageError::SourceDigestMismatch {
                registered: registered.clone(),
                announced,
            });
        }
        Ok((source, info))
    }

    async fn transfer(
        &self,
        artifact: Artifact,
        started: Instant,
        observer: &Observer,
    ) -> Result<Staged, StageError> {
        let source_type = artifact.source.source_type;
        let _in_flight = self.metrics.transfer_in_flight(source_type);
        let (source, info) = self.open_source(&artifact, observer).await?;

        // One owner per ingest: wait for another process staging the same blob, then answer
        // from the store if it published it.
        let store = self.store.clone();
        let digest = artifact.digest.clone();
        let mut ingest = tokio::task::spawn_blocking(move || store.lock_ingest(&digest))
            .await
            .expect("ingest lock task panicked")?;
        if let Some((path, size)) = self.store.find(&artifact.digest)? {
            return Ok(already_present(path, artifact.digest, size, started));
        }

        let settings = TransferSettings::from(&self.config.transfer);
        let size = info.size;
        let plan = settings.plan(info.size);
        let resume = prepare_ingest(&mut ingest, &artifact.digest, &info, &plan)?;
        let algorithm = artifact.digest.algorithm();
        let mut transfer = Transfer::new(source, info, ingest.file(), algorithm, settings)
            .with_journal(ingest.journal_path().to_owned(), &artifact.digest)
            .with_budget(self.connections.clone())
            .with_metrics(self.metrics.transfer(source_type))
            .observed(observer.received.clone(), observer.cancel.clone());
        if let Some(resume) = resume {
            observer.resumed.store(resume.bytes(), Ordering::Release);
            self.metrics.resumed(source_type, resume.bytes());
            transfer = transfer.resuming(resume);
        }
        observer.set_phase(Phase::Transferring);
        let transferred = match transfer.run().await {
            Ok(transferred) => transferred,
            Err(e) => {
                let wrong_bytes = e.code() == "source_changed";
                if wrong_bytes || !ingest.journal_path().exists() {
                    ingest.discard()?;
                }
                return Err(e.into());
            }
        };
        observer.set_phase(Phase::Verifying);
        if transferred.digest != artifact.digest {
            ingest.discard()?;
            return Err(StageError::DigestMismatch {
                expected: artifact.digest,
                actual: transferred.digest,
            });
        }

        let transferred_at = started.elapsed();
        let path = tokio::task::spawn_blocking(move || ingest.publish())
            .await
            .expect("publish panicked")?;
        info!(
            path = %path.display(),
            bytes = transferred.bytes_received,
            read_back = transferred.bytes_read_back,
            resumed = transferred.bytes_resumed,
            connections = transferred.connections,
            transfer_ms = transferred_at.as_millis(),
            hash_tail_ms = transferred.hash_tail.as_millis(),
            publish_ms = (started.elapsed() - transferred_at).as_millis(),
            "staged"
        );
        Ok(Staged {
            path,
            digest: artifact.digest,
            size,
            bytes_transferred: transferred.bytes_received,
            bytes_resumed: transferred.bytes_resumed,
            bytes_read_back: transferred.bytes_read_back,
            connections: transferred.connections,
            outcome: Outcome::Staged,
            elapsed: started.elapsed(),
        })
    }
}

fn already_present(path: PathBuf, digest: Digest, size: u64, started: Instant) -> Staged {
    info!(path = %path.display(), "already present");
    Staged {
        path,
        digest,
        size,
        bytes_transferred: 0,
        bytes_resumed: 0,
        bytes_read_back: 0,
        connections: 0,
        outcome: Outcome::AlreadyPresent,
        elapsed: started.elapsed(),
    }
}

/// Opens the ingest for this transfer: the data of an earlier run when its journal matches
/// this object and version, else a fresh file. A journal that does not match is discarded with
/// its data, never mixed with a new transfer.
fn prepare_ingest(
    ingest: &mut Ingest,
    digest: &Digest,
    info: &ObjectInfo,
    plan: &RangePlan,
) -> Result<Option<Resume>, StoreError> {
    if !info.ranges {
        ingest.create(info.size)?;
        return Ok(None);
    }
    match resumable(ingest, digest, info, plan) {
        Ok(Some(resume)) => return Ok(Some(resume)),
        Ok(None) => {}
        // Limitation: the reason is logged only; the pull's event does not carry it.
        Err(reason) => warn!(%reason, "discarding the partial transfer of an earlier run"),
    }
    ingest.create(info.size)?;
    Ok(None)
}

fn resumable(
    ingest: &mut Ingest,
    digest: &Digest,
    info: &ObjectInfo,
    plan: &RangePlan,
) -> Result<Option<Resume>, String> {
    let Some(journal) = Journal::read(ingest.journal_path()).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    journal
        .check(digest, plan, info.validator.as_ref())
        .map_err(|e| e.to_string())?;
    let resume = Resume::from_journal(&journal, digest.algorithm())
        .ok_or("the journal's hash state does not restore")?;
    if !ingest.reopen(info.size).map_err(|e| e.to_string())? {
        return Err("the ingest file is missing or of another size".into());
    }
    info!(
        hashed = journal.hashed,
        "resuming the partial transfer of an earlier run"
    );
    Ok(Some(resume))
}
