//! Whether the control plane can be used, for `/readyz` and `blobstage_control_plane_up`.
//!
//! The file-backed control plane is usable while its registry is a file: a `stat` per check.
//! The HTTP control plane is judged by what it last answered. Every call the daemon makes to it
//! goes through `Watched`, which records the outcome: `control_plane_unavailable` (down,
//! timing out, answering garbage) or `control_plane_denied` (the node token is refused) mark it
//! unusable; any other answer, a refusal or a 404 included, shows that it works. When nothing
//! was seen for [`PROBE_AFTER`], a readiness check starts one probe in the background (an empty
//! `POST /v1/events` batch, which the contract allows and which tests the node token) and
//! answers from what it knew; at most one probe runs at a time. So a busy daemon never probes,
//! a scraper that asks every second causes at most one call per [`PROBE_AFTER`], and an idle
//! daemon nobody asks about makes no call at all.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_client::{
    Artifact, ArtifactId, BoxFuture, ControlPlane, ControlPlaneError, Credential, Event, Intent,
};
use tracing::{info, warn};

use crate::config::Config;

/// How old the last observation of the HTTP control plane may be before a check probes it.
// Limitation: an idle daemon learns of an outage from a probe, so `/readyz` may say `ready` for
// up to this long (plus one probe, at most `PROBE_TIMEOUT`) after the control plane went down.
pub const PROBE_AFTER: Duration = Duration::from_secs(15);

/// How long a probe may take; one that takes longer counts as `control_plane_unavailable`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the daemon tells whether its control plane can be used.
#[derive(Debug, Clone)]
pub enum ControlPlaneCheck {
    /// The file-backed control plane: usable while its registry is a file.
    File(PathBuf),
    /// The HTTP control plane: what its calls and probes last showed.
    Http(Arc<Observed>),
}

/// Wraps `control_plane` so that its calls are observed when it is the HTTP one; returns the
/// control plane to use and the check that reads the observations.
pub fn watch(
    config: &Config,
    control_plane: Arc<dyn ControlPlane>,
) -> (Arc<dyn ControlPlane>, ControlPlaneCheck) {
    if config.control_plane.url.is_none() {
        return (
            control_plane,
            ControlPlaneCheck::File(config.registry_path()),
        );
    }
    let observed = Arc::new(Observed {
        inner: control_plane,
        last: Mutex::new(None),
        probing: AtomicBool::new(false),
    });
    let watched = Arc::new(Watched(observed.clone()));
    (watched, ControlPlaneCheck::Http(observed))
}

impl ControlPlaneCheck {
    /// `Ok` when the control plane can be used, else why not. Never waits for the network.
    pub fn usable(&self) -> Result<(), String> {
        match self {
            ControlPlaneCheck::File(registry) if registry.is_file() => Ok(()),
            ControlPlaneCheck::File(registry) => Err(format!(
                "the registry {} cannot be read",
                registry.display()
            )),
            ControlPlaneCheck::Http(observed) => observed.usable(),
        }
    }

    /// Starts a probe now if the last observation is stale (at start-up: the first one).
    pub fn refresh(&self) {
        if let ControlPlaneCheck::Http(observed) = self {
            observed.probe_if_stale();
        }
    }
}

/// What the HTTP control plane last answered: when, and the error code if it failed.
type Observation = (Instant, Option<&'static str>);

/// The HTTP control plane and what its calls showed.
#[derive(Debug)]
pub struct Observed {
    inner: Arc<dyn ControlPlane>,
    last: Mutex<Option<Observation>>,
    probing: AtomicBool,
}

impl Observed {
    fn usable(self: &Arc<Self>) -> Result<(), String> {
        self.probe_if_stale();
        match *self.last.lock().expect("observation lock") {
            None => Err("the control plane has not answered yet".into()),
            Some((_, None)) => Ok(()),
            Some((_, Some(code))) => Err(format!("the control plane cannot be used ({code})")),
        }
    }

    fn probe_if_stale(self: &Arc<Self>) {
        let stale = self
            .last
            .lock()
            .expect("observation lock")
            .is_none_or(|(at, _)| at.elapsed() >= PROBE_AFTER);
        if !stale || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(PROBE_TIMEOUT, this.inner.report(&[])).await;
            this.record(
                answer
                    .map_err(|_| "control_plane_unavailable")
                    .and_then(code_of),
            );
            this.probing.store(false, Ordering::Release);
        });
    }

    /// Records an answer; a change between usable and unusable is logged once.
    fn record(&self, answer: Result<(), &'static str>) {
        let failed = answer.err().filter(|code| unusable(code));
        let mut last = self.last.lock().expect("observation lock");
        let before = last.map(|(_, code)| code.is_none());
        *last = Some((Instant::now(), failed));
        drop(last);
        match (before, failed) {
            (Some(true) | None, Some(code)) => {
                warn!(
                    code,
                    "the control plane cannot be used; the daemon is not ready"
                )
            }
            (Some(false), None) => info!("the control plane answers again"),
            _ => {}
        }
    }
}

/// The codes that mean the control plane cannot serve this node at all.
fn unusable(code: &str) -> bool {
    matches!(code, "control_plane_unavailable" | "control_plane_denied")
}

fn code_of<T>(result: Result<T, ControlPlaneError>) -> Result<(), &'static str> {
    result.map(|_| ()).map_err(|e| e.code())
}

/// The HTTP control plane, every call observed.
#[derive(Debug)]
struct Watched(Arc<Observed>);

impl Watched {
    async fn observe<T>(
        &self,
        call: BoxFuture<'_, Result<T, ControlPlaneError>>,
    ) -> Result<T, ControlPlaneError> {
        let result = call.await;
        self.0.record(match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.code()),
        });
        result
    }
}

impl ControlPlane for Watched {
    fn resolve<'a>(
        &'a self,
        id: &'a ArtifactId,
    ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
        Box::pin(self.observe(self.0.inner.resolve(id)))
    }

    fn credentials<'a>(
        &'a self,
        id: &'a ArtifactId,
        intent: Intent,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
        Box::pin(self.observe(self.0.inner.credentials(id, intent, node_id)))
    }

    fn report<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        Box::pin(self.observe(self.0.inner.report(events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Answers every call with `code` (or success), counting them.
    #[derive(Debug, Default)]
    struct Plane {
        down: AtomicBool,
        calls: AtomicUsize,
    }

    impl Plane {
        fn answer(&self) -> Result<(), ControlPlaneError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                let source = std::io::Error::other("down");
                let what = "test".into();
                return Err(ControlPlaneError::Unavailable { what, source });
            }
            Ok(())
        }
    }

    impl ControlPlane for Plane {
        fn resolve<'a>(
            &'a self,
            id: &'a ArtifactId,
        ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
            let answer = self.answer();
            Box::pin(async move {
                answer?;
                Err(ControlPlaneError::NotRegistered { id: id.clone() })
            })
        }
        fn credentials<'a>(
            &'a self,
            _: &'a ArtifactId,
            _: Intent,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
            let answer = self.answer();
            Box::pin(async move { answer.map(|()| Credential::None) })
        }
        fn report<'a>(&'a self, _: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
            let answer = self.answer();
            Box::pin(async move { answer })
        }
    }

    fn http_config() -> Config {
        let text = "[control_plane]\nurl = 'https://cp.example'\n";
        let path = std::path::Path::new("/etc/blobstage/agent.toml");
        Config::from_toml(text, path, Vec::new()).unwrap()
    }

    async fn settle(check: &ControlPlaneCheck) {
        let ControlPlaneCheck::Http(observed) = check else {
            panic!("not the HTTP check")
        };
        while observed.probing.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn many_checks_make_one_probe_and_calls_decide_readiness() {
        let plane = Arc::new(Plane::default());
        let (watched, check) = watch(&http_config(), plane.clone());
        assert!(check.usable().is_err(), "ready before any answer");
        for _ in 0..50 {
            let _ = check.usable();
        }
        settle(&check).await;
        assert_eq!(
            plane.calls.load(Ordering::SeqCst),
            1,
            "one probe for 51 checks"
        );
        assert_eq!(check.usable(), Ok(()));

        // A failed call makes it unusable at once; a refusal that is an answer does not.
        plane.down.store(true, Ordering::SeqCst);
        let id = ArtifactId::new("t/x@1").unwrap();
        assert!(watched.resolve(&id).await.is_err());
        let reason = check.usable().unwrap_err();
        assert!(reason.contains("control_plane_unavailable"), "{reason}");
        plane.down.store(false, Ordering::SeqCst);
        let answer = watched.resolve(&id).await;
        assert_eq!(answer.unwrap_err().code(), "not_registered");
        assert_eq!(check.usable(), Ok(()));
        assert_eq!(
            plane.calls.load(Ordering::SeqCst),
            3,
            "no probe while calls are fresh"
        );
    }
}
