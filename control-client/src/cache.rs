//! What a node may remember of the control plane's answers, and for how long.
//!
//! [`CachedControlPlane`] keeps registrations for a short, configured time, and remembers the
//! digest of every artifact id it has seen for as long as the process runs: a digest never
//! changes for an id, so a control plane that answers another one is refused, not believed.
//!
//! [`CredentialCache`] hands out [`Credentials`]: one handle per artifact and intent that every
//! range of a transfer shares. The credential is fetched once, kept in memory until shortly
//! before it expires, and fetched again by whichever caller comes first while the others wait
//! for that one call. A source whose request is refused asks for a [`Credentials::refresh`]
//! with the credential that failed; when another range already replaced it, the replacement is
//! returned without another call.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::{
    Artifact, ArtifactId, BoxFuture, ControlPlane, ControlPlaneError, Credential, Digest, Event,
    Intent,
};

/// The longest a credential is refreshed ahead of its expiry. Short-lived credentials are
/// refreshed a quarter of their lifetime ahead instead.
const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(60);

/// How long a credential still valid is used after a refresh ahead of its expiry failed,
/// before the refresh is tried again.
const RETRY_AHEAD_AFTER: Duration = Duration::from_secs(1);

/// A [`ControlPlane`] that keeps registrations for `ttl` and refuses a changed digest.
pub struct CachedControlPlane {
    inner: Arc<dyn ControlPlane>,
    ttl: Duration,
    registrations: Mutex<HashMap<ArtifactId, (Artifact, Instant)>>,
    /// Every digest answered for an id, for the life of the process.
    digests: Mutex<HashMap<ArtifactId, Digest>>,
}

impl fmt::Debug for CachedControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedControlPlane")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CachedControlPlane {
    /// With a `ttl` of zero every resolve asks the control plane; the digest check still holds.
    pub fn new(inner: Arc<dyn ControlPlane>, ttl: Duration) -> Self {
        CachedControlPlane {
            inner,
            ttl,
            registrations: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, id: &ArtifactId) -> Option<Artifact> {
        let mut registrations = self.registrations.lock().expect("never poisoned");
        registrations.retain(|_, (_, at)| at.elapsed() < self.ttl);
        registrations.get(id).map(|(artifact, _)| artifact.clone())
    }

    /// Remembers the digest of a fresh answer, or refuses it if it differs from the one known.
    fn check_digest(&self, artifact: &Artifact) -> Result<(), ControlPlaneError> {
        let mut digests = self.digests.lock().expect("never poisoned");
        match digests.get(&artifact.id) {
            Some(known) if *known != artifact.digest => Err(ControlPlaneError::DigestChanged {
                id: artifact.id.clone(),
                known: known.clone(),
                answered: artifact.digest.clone(),
            }),
            Some(_) => Ok(()),
            None => {
                digests.insert(artifact.id.clone(), artifact.digest.clone());
                Ok(())
            }
        }
    }
}

impl ControlPlane for CachedControlPlane {
    fn resolve<'a>(
        &'a self,
        id: &'a ArtifactId,
    ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
        Box::pin(async move {
            if let Some(artifact) = self.cached(id) {
                return Ok(artifact);
            }
            let artifact = self.inner.resolve(id).await?;
            self.check_digest(&artifact)?;
            if !self.ttl.is_zero() {
                let mut registrations = self.registrations.lock().expect("never poisoned");
                registrations.insert(id.clone(), (artifact.clone(), Instant::now()));
            }
            Ok(artifact)
        })
    }

    fn credentials<'a>(
        &'a self,
        id: &'a ArtifactId,
        intent: Intent,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
        self.inner.credentials(id, intent, node_id)
    }

    fn report<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        self.inner.report(events)
    }
}

/// Called each time a credential is fetched again because the one held expired or was refused.
pub type RefreshHook = Arc<dyn Fn() + Send + Sync>;

/// The node's credentials, one slot per artifact and intent, shared by every transfer.
pub struct CredentialCache {
    control_plane: Arc<dyn ControlPlane>,
    node_id: String,
    slots: Mutex<HashMap<(ArtifactId, Intent), Arc<Slot>>>,
    on_refresh: Option<RefreshHook>,
}

impl fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCache")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    pub fn new(control_plane: Arc<dyn ControlPlane>, node_id: impl Into<String>) -> Self {
        CredentialCache {
            control_plane,
            node_id: node_id.into(),
            slots: Mutex::new(HashMap::new()),
            on_refresh: None,
        }
    }

    /// Runs `hook` on every refresh (a metric counts them).
    pub fn with_refresh_hook(mut self, hook: RefreshHook) -> Self {
        self.on_refresh = Some(hook);
        self
    }

    /// The handle for one artifact and intent. Handles for the same pair share one credential.
    pub fn scoped(self: &Arc<Self>, id: &ArtifactId, intent: Intent) -> Credentials {
        let mut slots = self.slots.lock().expect("never poisoned");
        // Slots no transfer holds are forgotten once their credential has expired, or at once
        // when it names no expiry (nothing says how long it is meant to be used): a node that
        // pulls many artifacts keeps only the credentials that are still useful.
        slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.keep());
        let slot = slots
            .entry((id.clone(), intent))
            .or_insert_with(|| {
                Arc::new(Slot {
                    issuer: Some(Issuer {
                        cache: self.clone(),
                        id: id.clone(),
                        intent,
                    }),
                    held: tokio::sync::Mutex::new(None),
                })
            })
            .clone();
        Credentials { slot }
    }
}

/// Where a slot's credentials come from; `None` for a fixed credential.
struct Issuer {
    cache: Arc<CredentialCache>,
    id: ArtifactId,
    intent: Intent,
}

struct Slot {
    issuer: Option<Issuer>,
    /// The credential held and when it arrived. The async lock makes concurrent callers wait
    /// for one control-plane call instead of making their own.
    held: tokio::sync::Mutex<Option<Held>>,
}

struct Held {
    credential: Credential,
    received: SystemTime,
    /// A refresh ahead of the expiry failed: not tried again before this.
    retry_at: Option<SystemTime>,
}

impl Held {
    fn new(credential: Credential) -> Self {
        Held {
            credential,
            received: SystemTime::now(),
            retry_at: None,
        }
    }

    /// Whether it is time to fetch a new one: within a quarter of its lifetime (at most
    /// [`MAX_REFRESH_AHEAD`]) of its expiry, and not just after a failed try, unless expired.
    fn due(&self, now: SystemTime) -> bool {
        let Some(expires) = self.credential.expires_at() else {
            return false;
        };
        let lifetime = expires.duration_since(self.received).unwrap_or_default();
        let ahead = (lifetime / 4).min(MAX_REFRESH_AHEAD);
        let waiting = self.retry_at.is_some_and(|at| now < at);
        self.expired(now) || (now + ahead >= expires && !waiting)
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.credential.expires_at().is_some_and(|at| now >= at)
    }
}

impl Slot {
    /// Whether the credential held is worth keeping for a later transfer: it expires, and not
    /// soon. A slot being filled is kept.
    fn keep(&self) -> bool {
        match self.held.try_lock() {
            Ok(held) => held
                .as_ref()
                .is_some_and(|h| h.credential.expires_at().is_some() && !h.due(SystemTime::now())),
            Err(_) => true,
        }
    }

    async fn fetch(&self, refresh: bool) -> Result<Held, ControlPlaneError> {
        let issuer = self
            .issuer
            .as_ref()
            .expect("fixed credentials are never fetched");
        let cache = &issuer.cache;
        let credential = cache
            .control_plane
            .credentials(&issuer.id, issuer.intent, &cache.node_id)
            .await?;
        if let Some(hook) = cache.on_refresh.as_ref().filter(|_| refresh) {
            hook();
        }
        Ok(Held::new(credential))
    }
}

/// Credentials for one artifact and intent, as every range of its transfer uses them.
///
/// Cloning is cheap; clones share the credential.
#[derive(Clone)]
pub struct Credentials {
    slot: Arc<Slot>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Credentials");
        if let Some(issuer) = &self.slot.issuer {
            s.field("artifact", &issuer.id)
                .field("intent", &issuer.intent.name());
        }
        s.finish_non_exhaustive()
    }
}

impl Credentials {
    /// A credential that is never refreshed: for a source used without a control plane.
    pub fn fixed(credential: Credential) -> Self {
        Credentials {
            slot: Arc::new(Slot {
                issuer: None,
                held: tokio::sync::Mutex::new(Some(Held::new(credential))),
            }),
        }
    }

    /// The credential to use now: the one held, unless it is about to expire.
    ///
    /// A refresh ahead of the expiry that fails is not an error while the credential held is
    /// still valid: it goes on being used, and the refresh is tried again after
    /// [`RETRY_AHEAD_AFTER`], so a control plane that is briefly down costs nothing. Once the
    /// credential has expired, a failed refresh is the caller's error.
    pub async fn current(&self) -> Result<Credential, ControlPlaneError> {
        let mut held = self.slot.held.lock().await;
        let now = SystemTime::now();
        if let Some(h) = held.as_ref()
            && (self.slot.issuer.is_none() || !h.due(now))
        {
            return Ok(h.credential.clone());
        }
        let fresh = match (self.slot.fetch(held.is_some()).await, held.as_mut()) {
            (Ok(fresh), _) => fresh,
            (Err(error), Some(h)) if !h.expired(now) => {
                tracing::warn!(credentials = ?self, error = %error,
                    "cannot refresh credentials ahead of their expiry; using them until then");
                h.retry_at = Some(now + RETRY_AHEAD_AFTER);
                return Ok(h.credential.clone());
            }
            (Err(error), _) => return Err(error),
        };
        let credential = fresh.credential.clone();
        *held = Some(fresh);
        Ok(credential)
    }

    /// A new credential after `rejected` was refused by the source. When another caller
    /// already replaced it, the replacement is returned without asking the control plane.
    pub async fn refresh(&self, rejected: &Credential) -> Result<Credential, ControlPlaneError> {
        let mut held = self.slot.held.lock().await;
        if let Some(h) = held.as_ref()
            && (h.credential != *rejected || self.slot.issuer.is_none())
        {
            return Ok(h.credential.clone());
        }
        let fresh = self.slot.fetch(true).await?;
        let credential = fresh.credential.clone();
        *held = Some(fresh);
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts calls; answers credentials that live `lifetime` and a digest that can be changed.
    #[derive(Debug)]
    struct Counting {
        resolves: AtomicUsize,
        issued: AtomicUsize,
        lifetime: Duration,
        digest: Mutex<Digest>,
        /// Credentials calls fail while set.
        down: std::sync::atomic::AtomicBool,
    }

    impl Counting {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Counting {
                resolves: AtomicUsize::new(0),
                issued: AtomicUsize::new(0),
                lifetime,
                digest: Mutex::new(digest('a')),
                down: Default::default(),
            })
        }
    }

    fn digest(fill: char) -> Digest {
        format!("sha256:{}", fill.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn id() -> ArtifactId {
        ArtifactId::new("team/x@1").unwrap()
    }

    impl ControlPlane for Counting {
        fn resolve<'a>(
            &'a self,
            id: &'a ArtifactId,
        ) -> BoxFuture<'a, Result<Artifact, ControlPlaneError>> {
            self.resolves.fetch_add(1, Ordering::SeqCst);
            let artifact = serde_json::from_value(serde_json::json!({
                "id": id, "project": "team", "artifact_kind": "blob",
                "source": {"source_type": "https", "uri": "https://example.com/x"},
                "digest": self.digest.lock().unwrap().to_string(),
                "lifecycle_state": "active", "trust_state": "verified", "channel": "prod",
                "source_policy": {"decision": "allow", "policy_id": "p@1"}
            }))
            .unwrap();
            Box::pin(async move { Ok(artifact) })
        }

        fn credentials<'a>(
            &'a self,
            _: &'a ArtifactId,
            _: Intent,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Credential, ControlPlaneError>> {
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(async {
                    Err(ControlPlaneError::Unavailable {
                        what: "credentials".into(),
                        source: std::io::Error::other("down"),
                    })
                });
            }
            let n = self.issued.fetch_add(1, Ordering::SeqCst);
            let lifetime = self.lifetime;
            Box::pin(async move {
                // Slow enough that concurrent callers overlap.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Credential::Bearer {
                    token: format!("token-{n}"),
                    // Duration::MAX: a credential that names no expiry.
                    expires_at: SystemTime::now().checked_add(lifetime),
                })
            })
        }

        fn report<'a>(&'a self, _: &'a [Event]) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn token(c: &Credential) -> String {
        match c {
            Credential::Bearer { token, .. } => token.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn sixteen_concurrent_ranges_make_one_call() {
        let cp = Counting::new(Duration::from_secs(3600));
        let cache = Arc::new(CredentialCache::new(cp.clone(), "node"));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let creds = cache.scoped(&id(), Intent::Pull);
                tokio::spawn(async move { creds.current().await.map(|c| token(&c)) })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap().unwrap(), "token-0");
        }
        assert_eq!(cp.issued.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refusal_seen_by_many_ranges_refreshes_once() {
        let refreshes = Arc::new(AtomicUsize::new(0));
        let counted = refreshes.clone();
        let cp = Counting::new(Duration::from_secs(3600));
        let cache = Arc::new(
            CredentialCache::new(cp.clone(), "node").with_refresh_hook(Arc::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            })),
        );
        let creds = cache.scoped(&id(), Intent::Pull);
        let first = creds.current().await.unwrap();
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (creds, first) = (creds.clone(), first.clone());
                tokio::spawn(async move { creds.refresh(&first).await.map(|c| token(&c)) })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap().unwrap(), "token-1");
        }
        assert_eq!(cp.issued.load(Ordering::SeqCst), 2);
        assert_eq!(refreshes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_credential_is_refreshed_ahead_of_its_expiry() {
        // Lives 400 ms: refreshed once 300 ms have passed, not before.
        let cp = Counting::new(Duration::from_millis(400));
        let cache = Arc::new(CredentialCache::new(cp.clone(), "node"));
        let creds = cache.scoped(&id(), Intent::Pull);
        assert_eq!(token(&creds.current().await.unwrap()), "token-0");
        assert_eq!(token(&creds.current().await.unwrap()), "token-0");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(token(&creds.current().await.unwrap()), "token-1");
        assert_eq!(cp.issued.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_ahead_keeps_the_valid_credential_until_it_expires() {
        // Lives 400 ms, due from 300 ms; the control plane is down from the start of the refresh.
        let cp = Counting::new(Duration::from_millis(400));
        let cache = Arc::new(CredentialCache::new(cp.clone(), "node"));
        let creds = cache.scoped(&id(), Intent::Pull);
        assert_eq!(token(&creds.current().await.unwrap()), "token-0");
        cp.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert_eq!(token(&creds.current().await.unwrap()), "token-0");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let expired = creds.current().await.unwrap_err();
        assert_eq!(expired.code(), "control_plane_unavailable");
        cp.down.store(false, Ordering::SeqCst);
        assert_eq!(token(&creds.current().await.unwrap()), "token-1");
    }

    /// Pulls `count` artifacts one after the other, each with its own credential.
    async fn pull_each(cache: &Arc<CredentialCache>, count: usize) {
        for n in 0..count {
            let id = ArtifactId::new(format!("team/x@{n}")).unwrap();
            let creds = cache.scoped(&id, Intent::Pull);
            assert_eq!(token(&creds.current().await.unwrap()), format!("token-{n}"));
        }
    }

    fn slots(cache: &CredentialCache) -> usize {
        cache.slots.lock().unwrap().len()
    }

    #[tokio::test]
    async fn credentials_without_an_expiry_are_not_kept_between_transfers() {
        let cp = Counting::new(Duration::MAX);
        let cache = Arc::new(CredentialCache::new(cp.clone(), "node"));
        pull_each(&cache, 50).await;
        // Only the last one, which the next call forgets.
        assert_eq!(slots(&cache), 1);
        let again = cache.scoped(&ArtifactId::new("team/x@0").unwrap(), Intent::Pull);
        assert_eq!(token(&again.current().await.unwrap()), "token-50");
        assert_eq!(slots(&cache), 1);

        // Expiring ones are kept until they are due, and a later transfer takes them.
        let cp = Counting::new(Duration::from_secs(3600));
        let cache = Arc::new(CredentialCache::new(cp.clone(), "node"));
        pull_each(&cache, 50).await;
        assert_eq!(slots(&cache), 50);
        let again = cache.scoped(&ArtifactId::new("team/x@0").unwrap(), Intent::Pull);
        assert_eq!(token(&again.current().await.unwrap()), "token-0");
        assert_eq!(cp.issued.load(Ordering::SeqCst), 50);
    }

    #[tokio::test]
    async fn fixed_credentials_never_call_anyone() {
        let creds = Credentials::fixed(Credential::None);
        assert_eq!(creds.current().await.unwrap(), Credential::None);
        assert_eq!(
            creds.refresh(&Credential::None).await.unwrap(),
            Credential::None
        );
    }

    #[tokio::test]
    async fn registrations_are_kept_for_the_ttl_and_a_changed_digest_is_refused() {
        let cp = Counting::new(Duration::from_secs(60));
        let cached = CachedControlPlane::new(cp.clone(), Duration::from_millis(200));
        assert_eq!(cached.resolve(&id()).await.unwrap().digest, digest('a'));
        cached.resolve(&id()).await.unwrap();
        assert_eq!(cp.resolves.load(Ordering::SeqCst), 1);

        *cp.digest.lock().unwrap() = digest('b');
        // Still the cached registration while the ttl runs.
        assert_eq!(cached.resolve(&id()).await.unwrap().digest, digest('a'));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let err = cached.resolve(&id()).await.unwrap_err();
        assert_eq!(err.code(), "registration_changed");
        assert!(err.to_string().contains(&"a".repeat(64)), "{err}");
        // And it stays refused: the changed answer is not cached.
        assert!(cached.resolve(&id()).await.is_err());
        assert_eq!(cp.resolves.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn without_a_ttl_every_resolve_asks() {
        let cp = Counting::new(Duration::from_secs(60));
        let cached = CachedControlPlane::new(cp.clone(), Duration::ZERO);
        cached.resolve(&id()).await.unwrap();
        cached.resolve(&id()).await.unwrap();
        assert_eq!(cp.resolves.load(Ordering::SeqCst), 2);
    }
}
