//! Telling systemd how the daemon is doing (sd_notify), when it runs under `Type=notify`.
//!
//! `READY=1` is sent once the socket is bound and the store is open, never before and never
//! after a failed start. While the daemon works, a task sends `WATCHDOG=1` at half the
//! watchdog interval together with a one-line `STATUS=`; it stops pinging when the store can
//! no longer be used or the runtime is too wedged to run it, so systemd restarts a daemon that
//! cannot do its job. `STOPPING=1` goes out when shutdown begins. Without `NOTIFY_SOCKET`
//! (not under systemd) every call does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::pulls::Pulls;

/// How often `STATUS=` is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

pub(super) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(super) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog and refreshes the status line until `stop` fires.
pub(super) async fn keep_alive(
    pulls: Arc<Pulls>,
    usable: impl Fn() -> bool,
    stop: CancellationToken,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |interval| interval / 2);
    let mut last = (Instant::now(), pulls.bytes_done());
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let now = (Instant::now(), pulls.bytes_done());
        let rate = now.1.saturating_sub(last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        last = now;
        let (active, queued) = pulls.counts();
        let waiting = pulls.stager().outbox().depth();
        let status = format!(
            "{active} pulls in flight, {queued} queued, {:.1} MB/s, {waiting} events waiting",
            rate / 1e6
        );
        match (watchdog.is_some(), usable()) {
            (true, true) => send(&[NotifyState::Watchdog, NotifyState::Status(&status)]),
            (true, false) => send(&[NotifyState::Status("the store cannot be used")]),
            (false, _) => send(&[NotifyState::Status(&status)]),
        }
    }
}
