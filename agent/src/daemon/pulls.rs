//! The daemon's pulls: one per blob in flight, shared by everyone who asks for that blob.
//!
//! A pull is admitted (resolved and checked against policy) on the caller's request, so that a
//! refusal is the caller's answer. An admitted pull joins the pull already running for the same
//! digest, whichever artifact id names it; only one transfer per blob ever runs. New pulls wait
//! for one of `max_transfers` slots, and every range request of every transfer holds one of
//! `max_connections` permits (see [`crate::stage::Stager`]): the semaphore is first-come,
//! first-served and a permit is held for one range at a time, so one huge blob cannot starve
//! small ones.
//!
//! Each pull records exactly one event (through the stager): joining a running pull adds none.
//! An ended pull can be read by its id for a minute, then it is forgotten, so the daemon's
//! memory does not grow with the number of pulls it has answered.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_client::{Artifact, ArtifactId, Digest, Outcome, Requester};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::leases::Leases;
use crate::stage::{Observer, Phase, StageError, Stager};
use crate::store::StoreError;
use crate::store::gc::Candidate;

/// How a pull ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Staged { path: PathBuf, size: u64 },
    Failed { code: String, message: String },
    Cancelled,
}

/// One pull: a blob on its way into the store, watched by every caller that asked for it.
#[derive(Debug)]
pub struct Pull {
    pub id: String,
    pub artifact_id: ArtifactId,
    pub digest: Digest,
    observer: Observer,
    ending: watch::Sender<Option<Ending>>,
    /// When the pull ended, for forgetting it a while later.
    ended_at: Mutex<Option<Instant>>,
}

impl Pull {
    fn new(artifact: &Artifact) -> Arc<Pull> {
        let observer = Observer::default();
        Arc::new(Pull {
            id: observer.id().to_owned(),
            artifact_id: artifact.id.clone(),
            digest: artifact.digest.clone(),
            observer,
            ending: watch::Sender::new(None),
            ended_at: Mutex::new(None),
        })
    }

    pub fn ending(&self) -> Option<Ending> {
        self.ending.borrow().clone()
    }

    /// Waits until the pull ends or `timeout` passes.
    pub async fn wait(&self, timeout: Duration) {
        let mut ending = self.ending.subscribe();
        let _ = tokio::time::timeout(timeout, ending.wait_for(Option::is_some)).await;
    }

    /// The pull as the API shows it.
    pub fn view(&self) -> Value {
        let total = self.observer.bytes_total();
        let (state, done, path, error) = match self.ending() {
            None => (
                phase_name(self.observer.phase()),
                self.observer.bytes_done(),
                None,
                None,
            ),
            Some(Ending::Staged { path, size }) => ("staged", size, Some(path), None),
            Some(Ending::Failed { code, message }) => {
                let error = json!({ "code": code, "message": message });
                ("failed", self.observer.bytes_done(), None, Some(error))
            }
            Some(Ending::Cancelled) => ("cancelled", self.observer.bytes_done(), None, None),
        };
        json!({
            "id": self.id,
            "artifact_id": self.artifact_id,
            "digest": self.digest,
            "state": state,
            "bytes_done": done,
            "bytes_total": total.or(path.as_ref().map(|_| done)),
            "path": path,
            "error": error,
        })
    }

    fn finish(&self, result: Result<(PathBuf, u64), StageError>) {
        let ending = match result {
            Ok((path, size)) => Ending::Staged { path, size },
            Err(e) if e.code() == "cancelled" => Ending::Cancelled,
            Err(e) => {
                // The daemon is where a failed pull ends: nobody else logs it.
                let message = crate::errors::Chain(&e).to_string();
                tracing::error!(pull = %self.id, artifact = %self.artifact_id, code = e.code(),
                    error = %message, "pull failed");
                Ending::Failed {
                    code: e.code().to_owned(),
                    message,
                }
            }
        };
        *self.ended_at.lock().expect("pull lock") = Some(Instant::now());
        self.ending.send_replace(Some(ending));
    }

    /// Ended more than `retain` ago.
    fn expired(&self, now: Instant, retain: Duration) -> bool {
        let ended_at = *self.ended_at.lock().expect("pull lock");
        ended_at.is_some_and(|at| now.duration_since(at) > retain)
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Queued => "queued",
        Phase::Resolving => "resolving",
        Phase::Transferring => "transferring",
        Phase::Verifying => "verifying",
    }
}

/// What a request for a pull got.
#[derive(Debug)]
pub enum Created {
    /// A new pull, now queued or running.
    Started(Arc<Pull>),
    /// The pull already running for this blob.
    Joined(Arc<Pull>),
    /// The blob was in the store; the pull is already staged.
    Present(Arc<Pull>),
}

/// How long an ended pull can still be read by its id.
const RETAIN_ENDED: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Registry {
    pulls: HashMap<String, Arc<Pull>>,
    /// The pull in flight for each digest.
    running: HashMap<Digest, Arc<Pull>>,
    last_pruned: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            pulls: HashMap::new(),
            running: HashMap::new(),
            last_pruned: Instant::now(),
        }
    }
}

impl Registry {
    /// Remembers `pull`, and forgets pulls that ended more than [`RETAIN_ENDED`] ago (at most
    /// once a second, so that a busy daemon does not scan on every request).
    fn insert(&mut self, pull: &Arc<Pull>) {
        let now = Instant::now();
        if now.duration_since(self.last_pruned) >= Duration::from_secs(1) {
            self.pulls.retain(|_, p| !p.expired(now, RETAIN_ENDED));
            self.last_pruned = now;
        }
        self.pulls.insert(pull.id.clone(), pull.clone());
    }
}

/// The store's size budget: collect down to `low` once above `high`.
#[derive(Debug, Clone, Copy)]
pub struct Watermarks {
    pub high: Option<u64>,
    pub low: Option<u64>,
}

/// Every pull the daemon knows of, the slots that bound how many transfer at once, and the
/// leases and budget that decide what garbage collection may evict.
#[derive(Debug)]
pub struct Pulls {
    stager: Arc<Stager>,
    slots: Arc<Semaphore>,
    registry: Mutex<Registry>,
    tasks: TaskTracker,
    leases: Leases,
    watermarks: Watermarks,
}

impl Pulls {
    pub fn new(
        stager: Arc<Stager>,
        max_transfers: usize,
        leases: Leases,
        watermarks: Watermarks,
    ) -> Arc<Pulls> {
        Arc::new(Pulls {
            stager,
            slots: Arc::new(Semaphore::new(max_transfers)),
            registry: Mutex::default(),
            tasks: TaskTracker::new(),
            leases,
            watermarks,
        })
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Evicts least recently used blobs down to the low watermark: always when `forced`, else
    /// only when the store is above the high watermark. Leased blobs, blobs being pulled and
    /// `keep` are never evicted.
    pub fn collect(
        &self,
        forced: bool,
        keep: Option<&Digest>,
    ) -> Result<Vec<Candidate>, StoreError> {
        let Some(low) = self.watermarks.low else {
            return Ok(Vec::new());
        };
        let store = self.stager.store();
        // Partial transfers take room too: they count toward the budget, and blobs make way.
        let partial = store.ingest_bytes()?;
        if !forced {
            let blobs: u64 = store.list()?.iter().map(|(_, _, size)| size).sum();
            if self
                .watermarks
                .high
                .is_none_or(|high| blobs + partial <= high)
            {
                return Ok(Vec::new());
            }
        }
        let low = low.saturating_sub(partial);
        let mut protected = self.leases.protected();
        protected.extend(
            self.registry
                .lock()
                .expect("registry lock")
                .running
                .keys()
                .cloned(),
        );
        protected.extend(keep.cloned());
        let evicted = store.collect(low, &protected)?;
        let freed: u64 = evicted.iter().map(|c| c.size).sum();
        self.stager.metrics().collected(evicted.len(), freed);
        if !evicted.is_empty() {
            info!(
                blobs = evicted.len(),
                bytes = freed,
                "evicted least recently used blobs"
            );
        }
        Ok(evicted)
    }

    pub fn stager(&self) -> &Stager {
        &self.stager
    }

    pub fn get(&self, id: &str) -> Option<Arc<Pull>> {
        self.registry
            .lock()
            .expect("registry lock")
            .pulls
            .get(id)
            .cloned()
    }

    /// Bytes done by the pulls in flight, for a transfer rate.
    pub fn bytes_done(&self) -> u64 {
        let registry = self.registry.lock().expect("registry lock");
        registry
            .running
            .values()
            .map(|p| p.observer.bytes_done())
            .sum()
    }

    /// Pulls in flight: (transferring or finishing, waiting for a slot).
    pub fn counts(&self) -> (usize, usize) {
        let registry = self.registry.lock().expect("registry lock");
        let queued = registry
            .running
            .values()
            .filter(|p| p.observer.phase() == Phase::Queued);
        let queued = queued.count();
        (registry.running.len() - queued, queued)
    }

    /// Admits `id` and starts, joins or answers its pull. A refusal is an error for the
    /// caller (and the pull's one event).
    pub async fn create(
        self: &Arc<Self>,
        id: &ArtifactId,
        pin: Option<&Digest>,
        requester: Option<Requester>,
    ) -> Result<Created, StageError> {
        let artifact = self.stager.admit(id, requester).await?;
        if let Some(pin) = pin.filter(|pin| **pin != artifact.digest) {
            let registered = artifact.digest.clone();
            let code = "digest_pin_mismatch";
            let digest = Some(registered.clone());
            self.stager
                .record_unstaged(Some(id), digest, Outcome::Refused, code, requester)
                .await;
            return Err(StageError::PinMismatch {
                pinned: pin.clone(),
                registered,
            });
        }
        if let Some(running) = self.join(&artifact.digest) {
            return Ok(Created::Joined(running));
        }
        if self
            .stager
            .store()
            .find(&artifact.digest)
            .map_err(StageError::Store)?
            .is_some()
        {
            let pull = Pull::new(&artifact);
            let staged = self.stager.stage(artifact, requester, &pull.observer).await;
            pull.finish(staged.map(|s| (s.path, s.size)));
            self.remember(&pull);
            return Ok(Created::Present(pull));
        }
        Ok(self.start(artifact, requester))
    }

    fn join(&self, digest: &Digest) -> Option<Arc<Pull>> {
        self.registry
            .lock()
            .expect("registry lock")
            .running
            .get(digest)
            .cloned()
    }

    fn remember(&self, pull: &Arc<Pull>) {
        self.registry.lock().expect("registry lock").insert(pull);
    }

    /// Starts a pull, unless one for the same digest started meanwhile.
    fn start(self: &Arc<Self>, artifact: Artifact, requester: Option<Requester>) -> Created {
        let mut registry = self.registry.lock().expect("registry lock");
        if let Some(running) = registry.running.get(&artifact.digest) {
            return Created::Joined(running.clone());
        }
        let pull = Pull::new(&artifact);
        registry.insert(&pull);
        registry.running.insert(pull.digest.clone(), pull.clone());
        drop(registry);

        info!(pull = %pull.id, artifact = %pull.artifact_id, "pull queued");
        let (this, task_pull) = (self.clone(), pull.clone());
        self.tasks
            .spawn(async move { this.run(task_pull, artifact, requester).await });
        Created::Started(pull)
    }

    async fn run(&self, pull: Arc<Pull>, artifact: Artifact, requester: Option<Requester>) {
        let cancel = pull.observer.cancellation().clone();
        let slot = tokio::select! {
            slot = self.slots.clone().acquire_owned() => Some(slot.expect("never closed")),
            () = cancel.cancelled() => None,
        };
        let result = match slot {
            Some(_slot) => {
                let staged = self.stager.stage(artifact, requester, &pull.observer).await;
                staged.map(|s| (s.path, s.size))
            }
            None => {
                let digest = Some(pull.digest.clone());
                let (id, outcome) = (Some(&pull.artifact_id), Outcome::Failed);
                self.stager
                    .record_unstaged(id, digest, outcome, "cancelled", requester)
                    .await;
                Err(StageError::Transfer(
                    crate::transfer::TransferError::Cancelled,
                ))
            }
        };
        self.registry
            .lock()
            .expect("registry lock")
            .running
            .remove(&pull.digest);
        if result.is_ok()
            && let Err(e) = self.collect(false, Some(&pull.digest))
        {
            warn!(error = %crate::errors::Chain(&e), "garbage collection failed");
        }
        pull.finish(result);
    }

    /// Cancels every pull in flight and waits up to `grace` for them to checkpoint and end.
    pub async fn shut_down(&self, grace: Duration) -> bool {
        let running: Vec<_> = {
            let registry = self.registry.lock().expect("registry lock");
            registry.running.values().cloned().collect()
        };
        running.iter().for_each(|pull| pull.observer.cancel());
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

impl Pull {
    /// Asks the pull to stop; it ends `cancelled` once its transfer has checkpointed.
    pub fn cancel(&self) {
        self.observer.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(id: &str) -> Arc<Pull> {
        let artifact: Artifact = serde_json::from_value(json!({
            "id": id, "project": "p", "artifact_kind": "blob",
            "source": {"source_type": "https", "uri": "https://h.example/x"},
            "digest": format!("sha256:{}", "0".repeat(64)),
            "lifecycle_state": "active", "trust_state": "verified", "channel": "prod",
            "source_policy": {"decision": "allow"}
        }))
        .unwrap();
        Pull::new(&artifact)
    }

    #[test]
    fn ended_pulls_are_forgotten_after_the_retention_and_running_ones_never() {
        let mut registry = Registry::default();
        let (old, recent, running) = (pull("old@1"), pull("recent@1"), pull("running@1"));
        for p in [&old, &recent] {
            p.finish(Ok((PathBuf::from("/x"), 1)));
        }
        let long_ago = Instant::now().checked_sub(RETAIN_ENDED * 2).unwrap();
        *old.ended_at.lock().unwrap() = Some(long_ago);
        for p in [&old, &recent, &running] {
            registry.insert(p);
        }
        registry.last_pruned = long_ago;
        registry.insert(&pull("new@1"));

        assert!(
            !registry.pulls.contains_key(&old.id),
            "an old ended pull was kept"
        );
        assert!(registry.pulls.contains_key(&recent.id));
        assert!(registry.pulls.contains_key(&running.id));
        assert_eq!(registry.pulls.len(), 3);
    }
}
