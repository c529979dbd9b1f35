//! The event outbox: every pull and verify's event is on disk before the operation is reported
//! done, and leaves the disk only once the control plane has acknowledged it.
//!
//! # Design
//!
//! One file per event in `<state_dir>/outbox/`, named by its time-ordered event id, written to
//! a temporary name, synced, renamed and the directory synced: an event is either wholly in
//! the outbox or not there. Delivery sends the oldest events in batches and removes exactly the
//! files of a batch the control plane acknowledged, so a crash between the two sends a batch
//! again, never loses one (the control plane deduplicates on `event_id`). An exclusive lock on
//! the directory lets one process deliver at a time when a `fetch` runs beside the daemon on the
//! same state directory, which keeps duplicates rare.
//!
//! The outbox has a size limit: at the limit, new pulls are refused ([`Outbox::is_full`])
//! rather than events dropped. Operations already under way still record their events.
//!
//! Rejected: one append-only log with a delivery cursor (compaction and torn tails to handle,
//! for no gain at the rate of one event per pull), and an in-memory queue (lost on a crash).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use control_client::{ControlPlane, ControlPlaneError, Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::errors::Chain;

/// Events sent in one call to the control plane.
const BATCH: usize = 100;

/// Longest wait between delivery attempts while the control plane is down.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the event outbox {}", dir.display())]
pub struct OutboxError {
    op: &'static str,
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

impl OutboxError {
    /// `disk_full`, `state_dir_read_only` or `io_error`.
    pub fn code(&self) -> &'static str {
        crate::errors::io_code(&self.source)
    }
}

/// Events waiting for the control plane.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_events: usize,
    control_plane: Arc<dyn ControlPlane>,
    depth: AtomicUsize,
    wake: Notify,
}

impl Outbox {
    /// Opens the outbox in `dir`, creating it, and counts what an earlier run left.
    pub fn open(
        dir: PathBuf,
        max_events: usize,
        control_plane: Arc<dyn ControlPlane>,
    ) -> Result<Outbox, OutboxError> {
        let fail = |op| {
            let dir = dir.clone();
            move |source| OutboxError { op, dir, source }
        };
        fs::create_dir_all(&dir).map_err(fail("create"))?;
        let depth = pending(&dir).map_err(fail("list"))?.len();
        Ok(Outbox {
            dir,
            max_events,
            control_plane,
            depth: AtomicUsize::new(depth),
            wake: Notify::new(),
        })
    }

    /// Events not yet acknowledged.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// At the limit: new operations must be refused.
    pub fn is_full(&self) -> bool {
        self.depth() >= self.max_events
    }

    /// How long the oldest waiting event has waited.
    pub fn oldest_age(&self) -> Option<Duration> {
        let oldest = pending(&self.dir).ok()?.into_iter().next()?;
        let written = fs::metadata(oldest).and_then(|m| m.modified()).ok()?;
        SystemTime::now().duration_since(written).ok()
    }

    /// Writes `event` durably. Blocking: call from a blocking thread.
    pub fn append(&self, event: &Event) -> Result<(), OutboxError> {
        let fail = |op| {
            move |source| OutboxError {
                op,
                dir: self.dir.clone(),
                source,
            }
        };
        let body = serde_json::to_vec(event).expect("events serialize");
        let name = event_file_name(&event.event_id);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| {
                file.write_all(&body)?;
                file.sync_data()
            })
            .and_then(|()| fs::rename(&temporary, self.dir.join(&name)));
        if let Err(e) = written {
            // A half-written file on a full disk would only take more room.
            let _ = fs::remove_file(&temporary);
            return Err(fail("write")(e));
        }
        sync_dir(&self.dir).map_err(fail("sync"))?;
        self.depth.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
        Ok(())
    }

    /// Delivers every waiting event, oldest first. Returns how many the control plane took;
    /// stops at the first batch it does not take.
    pub async fn flush(&self) -> Result<usize, ControlPlaneError> {
        let dir = self.dir.clone();
        let Some(lock) = tokio::task::spawn_blocking(move || delivery_lock(&dir))
            .await
            .ok()
            .flatten()
        else {
            return Ok(0);
        };
        let mut delivered = 0;
        loop {
            let batch = self.next_batch().await;
            if batch.is_empty() {
                // Another process may have delivered some of ours: count what is left.
                let left = pending(&self.dir).map(|p| p.len()).unwrap_or(self.depth());
                self.depth.store(left, Ordering::Release);
                drop(lock);
                return Ok(delivered);
            }
            let events: Vec<Event> = batch.iter().map(|(_, e)| e.clone()).collect();
            self.control_plane.report(&events).await?;
            delivered += batch.len();
            self.remove(batch.into_iter().map(|(path, _)| path).collect())
                .await;
        }
    }

    /// The oldest waiting events, read from disk. A file that does not parse is set aside
    /// under `rejected/` so it cannot block the rest.
    async fn next_batch(&self) -> Vec<(PathBuf, Event)> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::new();
            for path in pending(&dir).unwrap_or_default().into_iter().take(BATCH) {
                match fs::read(&path).map(|text| serde_json::from_slice::<Event>(&text)) {
                    Ok(Ok(event)) => batch.push((path, event)),
                    Ok(Err(e)) => set_aside(&dir, &path, &e.to_string()),
                    Err(_) => {}
                }
            }
            batch
        })
        .await
        .expect("outbox read task panicked")
    }

    async fn remove(&self, paths: Vec<PathBuf>) {
        let (dir, count) = (self.dir.clone(), paths.len());
        let removed = tokio::task::spawn_blocking(move || {
            let removed = paths.iter().filter(|p| fs::remove_file(p).is_ok()).count();
            let _ = sync_dir(&dir);
            removed
        })
        .await
        .expect("outbox remove task panicked");
        debug!(count, removed, "events delivered");
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(removed))
            });
    }

    /// The daemon's delivery loop: delivers as events arrive, backs off while the control
    /// plane is down, and ends when `stop` fires (after one last attempt). A new event cuts a
    /// backoff short: the pull that made it has just talked to the control plane (or tried
    /// to), so a control plane that is back is found at once rather than after up to
    /// `MAX_BACKOFF` (a minute), and one that is still down costs one call per pull.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.flush().await {
                Ok(_) => backoff = Duration::from_millis(500),
                Err(e) => {
                    warn!(depth = self.depth(), retry_in = ?backoff, error = %Chain(&e),
                        "cannot deliver events; they wait in the outbox");
                    // Only a wait that ran out lengthens the next one: during an outage, an
                    // attempt made for each new event must not push the backoff to its maximum.
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(MAX_BACKOFF),
                        () = self.wake.notified() => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
                () = stop.cancelled() => {
                    let _ = self.flush().await;
                    return;
                }
            }
        }
    }
}

/// Event files in delivery order (their names sort by time).
fn pending(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Event ids are ours (uuid v7), but a name must never leave the directory.
fn event_file_name(event_id: &str) -> String {
    let safe: String = event_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    format!("{safe}.json")
}

fn set_aside(dir: &Path, path: &Path, reason: &str) {
    let rejected = dir.join("rejected");
    let _ = fs::create_dir_all(&rejected);
    if let Some(name) = path.file_name() {
        let _ = fs::rename(path, rejected.join(name));
    }
    warn!(path = %path.display(), %reason, "an outbox file is not an event; set aside");
}

/// Takes the delivery lock of the outbox, or `None` when another process delivers now.
fn delivery_lock(dir: &Path) -> Option<File> {
    let lock = File::create(dir.join(".deliver.lock")).ok()?;
    lock.try_lock().ok()?;
    Some(lock)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_client::{ArtifactId, BoxFuture, Credential, Intent, Operation, Outcome};
    use std::sync::Mutex;

    /// A control plane that records what it was sent and can be switched off.
    #[derive(Debug, Default)]
    struct Recorder {
        down: std::sync::atomic::AtomicBool,
        received: Mutex<Vec<Event>>,
    }

    impl ControlPlane for Recorder {
        fn resolve<'a>(
            &'a self,
            id: &'a ArtifactId,
        ) -> BoxFuture<'a, Result<control_client::Artifact, ControlPlaneError>> {
            Box::pin(async move { Err(ControlPlaneError::NotRegistered { id: id.clone() }) })
        }
        fn credentials<'a>(
            &'a self,
            _: &'a ArtifactId,
            _: Intent,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
            Box::pin(async { Ok(Credential::None) })
        }
        fn report<'a>(
            &'a self,
            events: &'a [Event],
        ) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
            Box::pin(async move {
                if self.down.load(Ordering::Acquire) {
                    let source = std::io::Error::other("down");
                    return Err(ControlPlaneError::Unavailable {
                        what: "test".into(),
                        source,
                    });
                }
                self.received.lock().unwrap().extend_from_slice(events);
                Ok(())
            })
        }
    }

    fn event() -> Event {
        Event::new("n", Operation::PullBlob, Outcome::Staged)
    }

    #[tokio::test]
    async fn events_wait_while_the_control_plane_is_down_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(Recorder::default());
        plane.down.store(true, Ordering::Release);
        let outbox = Outbox::open(dir.path().join("outbox"), 3, plane.clone()).unwrap();
        let sent: Vec<Event> = (0..3).map(|_| event()).collect();
        for e in &sent {
            outbox.append(e).unwrap();
        }
        assert!(outbox.flush().await.is_err());
        assert_eq!(outbox.depth(), 3);
        assert!(outbox.is_full());
        assert!(outbox.oldest_age().is_some());

        let reopened = Outbox::open(dir.path().join("outbox"), 3, plane.clone()).unwrap();
        assert_eq!(reopened.depth(), 3);
        plane.down.store(false, Ordering::Release);
        assert_eq!(reopened.flush().await.unwrap(), 3);
        assert_eq!(reopened.depth(), 0);
        assert_eq!(
            *plane.received.lock().unwrap(),
            sent,
            "every event once, oldest first"
        );
        assert_eq!(reopened.flush().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_garbled_file_is_set_aside_and_does_not_block_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(Recorder::default());
        let outbox = Outbox::open(dir.path().join("outbox"), 10, plane.clone()).unwrap();
        fs::write(dir.path().join("outbox/0000-garbage.json"), b"{not json").unwrap();
        outbox.append(&event()).unwrap();
        assert_eq!(outbox.flush().await.unwrap(), 1);
        assert!(
            dir.path()
                .join("outbox/rejected/0000-garbage.json")
                .exists()
        );
    }
}
