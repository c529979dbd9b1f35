//! Telling systemd how the daemon is doing (sd_notify), when it runs under `Type=notify`.
//!
//! `READY=1` goes out once the API socket and the health listener are bound and the store is
//! usable: never before, and never after a failed start. `STOPPING=1` goes out when shutdown
//! begins. In between, [`keep_alive`] sends `WATCHDOG=1` at half the watchdog interval with a
//! one-line `STATUS=` (transfers in flight and queued, bytes/s, events waiting), but only while
//! the daemon is not wedged; without a watchdog it refreshes `STATUS=` every few seconds.
//!
//! Wedged, concretely: the [`Pulse`] did not beat since the last ping, or the store cannot be
//! used. The pulse is advanced by a task of its own ([`beat`]): each round sleeps on the
//! runtime's timer, then runs on the blocking pool a snapshot of the pull scheduler taken under
//! its lock. A runtime whose workers are all blocked, a pull registry lock that is never
//! released, or an exhausted blocking pool (every disk write, fsync and event of every transfer
//! goes through it, so a hung disk exhausts it) each stop the pulse; the pings stop, and systemd
//! restarts the daemon after `WatchdogSec`. A slow origin does not: its transfers wait, they
//! are not wedged, and stalls are the transfer engine's business (`read_timeout`).
//!
//! Without `NOTIFY_SOCKET` (not under systemd) nothing is sent and no task runs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often `STATUS=` is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Where notifications go.
#[derive(Debug, Clone)]
pub enum Notifier {
    /// Not under systemd: nothing is sent.
    Off,
    /// To `$NOTIFY_SOCKET`.
    Systemd,
    /// Kept, one string per datagram, for tests.
    Recorded(Arc<Mutex<Vec<String>>>),
}

impl Notifier {
    pub fn from_env() -> Self {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(_) => Notifier::Systemd,
            None => Notifier::Off,
        }
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, Notifier::Off)
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        match self {
            Notifier::Off => {}
            Notifier::Systemd => {
                if let Err(e) = sd_notify::notify(states) {
                    debug!(error = %e, "sd_notify failed");
                }
            }
            Notifier::Recorded(sent) => {
                let lines: Vec<String> = states.iter().map(ToString::to_string).collect();
                sent.lock().expect("recorder lock").push(lines.join("\n"));
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// The pull scheduler as one [`beat`] saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Pulls transferring or finishing.
    pub active: usize,
    /// Pulls waiting for a transfer slot.
    pub queued: usize,
    /// Bytes done by the pulls in flight.
    pub bytes_done: u64,
    /// Events waiting for the control plane.
    pub events_waiting: usize,
}

/// Proof that the daemon's machinery turns: beats, and the last snapshot they took.
#[derive(Debug, Default)]
pub struct Pulse {
    beats: AtomicU64,
    active: AtomicUsize,
    queued: AtomicUsize,
    bytes_done: AtomicU64,
    events_waiting: AtomicUsize,
}

impl Pulse {
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Acquire)
    }

    /// Stores `snapshot`, then counts a beat.
    pub fn record(&self, snapshot: Snapshot) {
        self.active.store(snapshot.active, Ordering::Relaxed);
        self.queued.store(snapshot.queued, Ordering::Relaxed);
        self.bytes_done
            .store(snapshot.bytes_done, Ordering::Relaxed);
        self.events_waiting
            .store(snapshot.events_waiting, Ordering::Relaxed);
        self.beats.fetch_add(1, Ordering::AcqRel);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            active: self.active.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            events_waiting: self.events_waiting.load(Ordering::Relaxed),
        }
    }
}

/// Takes a snapshot of the pull scheduler; blocking (it takes the scheduler's lock).
pub type Probe = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Advances `pulse` every `every` with a snapshot taken on the blocking pool, until `stop`.
pub async fn beat(pulse: Arc<Pulse>, every: Duration, probe: Probe, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let probe = probe.clone();
        let taken = tokio::select! {
            taken = tokio::task::spawn_blocking(move || probe()) => taken,
            () = stop.cancelled() => return,
        };
        match taken {
            Ok(snapshot) => pulse.record(snapshot),
            // A probe that panicked never beats again: the daemon is broken.
            Err(_) => return,
        }
    }
}

/// How often to ping or refresh the status, and how often the pulse must beat for that.
pub fn intervals(watchdog: Option<Duration>) -> (Duration, Duration) {
    let every = watchdog.map_or(STATUS_EVERY, |interval| interval / 2);
    (every, every / 4)
}

/// Pings the watchdog while the pulse beats and the store is usable, with the status line;
/// says why when it does not. Ends when `stop` fires.
pub async fn keep_alive(
    notifier: Notifier,
    pulse: Arc<Pulse>,
    watchdog: Option<Duration>,
    usable: impl Fn() -> bool,
    stop: CancellationToken,
) {
    let (every, _) = intervals(watchdog);
    let mut last_beats = pulse.beats();
    let mut last = (Instant::now(), pulse.snapshot().bytes_done);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let beats = pulse.beats();
        let alive = beats != last_beats;
        last_beats = beats;
        let snapshot = pulse.snapshot();
        let now = (Instant::now(), snapshot.bytes_done);
        let seconds = now.0.duration_since(last.0).as_secs_f64();
        let rate = now.1.saturating_sub(last.1) as f64 / seconds.max(f64::EPSILON);
        last = now;

        let status = summary(&snapshot, rate);
        let wedged = format!("wedged: the pull scheduler made no progress in {every:?}");
        match (alive, usable()) {
            (false, _) => notifier.send(&[NotifyState::Status(&wedged)]),
            (true, false) => notifier.send(&[NotifyState::Status("the store cannot be used")]),
            (true, true) if watchdog.is_some() => {
                notifier.send(&[NotifyState::Watchdog, NotifyState::Status(&status)])
            }
            (true, true) => notifier.send(&[NotifyState::Status(&status)]),
        }
    }
}

/// The one-line `STATUS=`.
pub fn summary(snapshot: &Snapshot, bytes_per_second: f64) -> String {
    format!(
        "{} transfers in flight, {} queued, {:.1} MB/s, {} events waiting",
        snapshot.active,
        snapshot.queued,
        bytes_per_second / 1e6,
        snapshot.events_waiting
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pings(sent: &Mutex<Vec<String>>) -> usize {
        let sent = sent.lock().unwrap();
        sent.iter().filter(|m| m.contains("WATCHDOG=1")).count()
    }

    /// A scheduler whose lock is held stops the pings; once it is released they resume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(
        clippy::await_holding_lock,
        reason = "the held lock is the wedge under test"
    )]
    async fn a_wedged_scheduler_gets_no_watchdog_ping_and_a_turning_one_does() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let notifier = Notifier::Recorded(sent.clone());
        let (pulse, stop) = (Arc::new(Pulse::default()), CancellationToken::new());
        let scheduler = Arc::new(Mutex::new(()));
        let wedge = scheduler.lock().unwrap();
        let locked = scheduler.clone();
        let probe: Probe = Arc::new(move || {
            let _registry = locked.lock().unwrap();
            Snapshot::default()
        });
        let watchdog = Some(Duration::from_millis(80));
        let (_, beat_every) = intervals(watchdog);
        let beating = tokio::spawn(beat(pulse.clone(), beat_every, probe, stop.clone()));
        let pinging = tokio::spawn(keep_alive(
            notifier,
            pulse.clone(),
            watchdog,
            || true,
            stop.clone(),
        ));

        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(pulse.beats(), 0);
        assert_eq!(pings(&sent), 0, "{:?}", sent.lock().unwrap());
        assert!(
            sent.lock()
                .unwrap()
                .iter()
                .all(|m| m.starts_with("STATUS=wedged"))
        );

        drop(wedge);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pings(&sent) == 0 {
            assert!(
                Instant::now() < deadline,
                "no ping once the scheduler turned"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let last = sent.lock().unwrap().last().cloned().unwrap();
        assert!(last.contains("STATUS=0 transfers in flight"), "{last}");
        stop.cancel();
        let _ = (beating.await, pinging.await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unusable_store_gets_no_ping() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let notifier = Notifier::Recorded(sent.clone());
        let (pulse, stop) = (Arc::new(Pulse::default()), CancellationToken::new());
        let probe: Probe = Arc::new(Snapshot::default);
        let watchdog = Some(Duration::from_millis(80));
        let (_, beat_every) = intervals(watchdog);
        tokio::spawn(beat(pulse.clone(), beat_every, probe, stop.clone()));
        tokio::spawn(keep_alive(
            notifier,
            pulse.clone(),
            watchdog,
            || false,
            stop.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.lock().unwrap().len() < 3 {
            assert!(Instant::now() < deadline, "no status");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        assert_eq!(pings(&sent), 0);
        assert!(pulse.beats() > 0, "the pulse beat");
        let sent = sent.lock().unwrap();
        assert!(
            sent.iter().all(|m| m == "STATUS=the store cannot be used"),
            "{sent:?}"
        );
    }

    #[test]
    fn the_summary_names_transfers_rate_and_events() {
        let snapshot = Snapshot {
            active: 2,
            queued: 1,
            bytes_done: 0,
            events_waiting: 3,
        };
        assert_eq!(
            summary(&snapshot, 12_500_000.0),
            "2 transfers in flight, 1 queued, 12.5 MB/s, 3 events waiting"
        );
    }
}
