//! Leases: a runtime's promise to the store that it is using some blobs.
//!
//! A leased blob is never evicted. Leases expire after their TTL unless released sooner, and
//! survive a daemon restart: they are kept in `<state_dir>/leases.json`, replaced atomically on
//! every change. A leases file that cannot be read stops the daemon rather than letting it
//! evict blobs that are in use.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control_client::Digest;
use serde::{Deserialize, Serialize};

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub holder: String,
    pub digests: Vec<Digest>,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Debug)]
pub struct Leases {
    path: PathBuf,
    leases: Mutex<HashMap<String, Lease>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Leases {
    /// Loads the leases kept at `path`; none when the file does not exist.
    pub fn load(path: PathBuf) -> std::io::Result<Leases> {
        let leases = match fs::read(&path) {
            Ok(text) => serde_json::from_slice::<Vec<Lease>>(&text)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let leases = leases.into_iter().map(|l| (l.id.clone(), l)).collect();
        Ok(Leases {
            path,
            leases: Mutex::new(leases),
        })
    }

    /// Takes a lease on `digests` for `ttl`.
    pub fn take(
        &self,
        holder: String,
        digests: Vec<Digest>,
        ttl: Duration,
    ) -> std::io::Result<Lease> {
        let lease = Lease {
            id: format!("l-{}", uuid::Uuid::now_v7().simple()),
            holder,
            digests,
            expires_at: now() + ttl.as_secs(),
        };
        let mut leases = self.leases.lock().expect("leases lock");
        leases.insert(lease.id.clone(), lease.clone());
        self.save(&leases)?;
        Ok(lease)
    }

    /// Releases lease `id`; false when there is no such lease, or it has expired.
    pub fn release(&self, id: &str) -> std::io::Result<bool> {
        let mut leases = self.leases.lock().expect("leases lock");
        let now = now();
        leases.retain(|_, l| l.expires_at > now);
        let released = leases.remove(id).is_some();
        if released {
            self.save(&leases)?;
        }
        Ok(released)
    }

    /// The digests under a lease that has not expired.
    pub fn protected(&self) -> HashSet<Digest> {
        let now = now();
        let leases = self.leases.lock().expect("leases lock");
        let live = leases.values().filter(|l| l.expires_at > now);
        live.flat_map(|l| l.digests.iter().cloned()).collect()
    }

    fn save(&self, leases: &HashMap<String, Lease>) -> std::io::Result<()> {
        let now = now();
        let mut live: Vec<&Lease> = leases.values().filter(|l| l.expires_at > now).collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        let temporary = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(&live).expect("leases serialize"))?;
        file.sync_data()?;
        fs::rename(&temporary, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_client::Algorithm;

    #[test]
    fn leases_protect_until_released_or_expired_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let leases = Leases::load(path.clone()).unwrap();
        let (a, b) = (
            Digest::from_bytes(Algorithm::Sha256, &[1; 32]),
            Digest::from_bytes(Algorithm::Sha256, &[2; 32]),
        );
        let kept = leases
            .take(
                "runtime-1".into(),
                vec![a.clone()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let expired = leases
            .take("runtime-2".into(), vec![b.clone()], Duration::ZERO)
            .unwrap();
        assert_eq!(leases.protected(), HashSet::from([a.clone()]));

        let reloaded = Leases::load(path.clone()).unwrap();
        assert_eq!(reloaded.protected(), HashSet::from([a.clone()]));
        assert!(
            !reloaded.release(&expired.id).unwrap(),
            "expired leases are not kept"
        );
        assert!(reloaded.release(&kept.id).unwrap());
        assert!(reloaded.protected().is_empty());

        fs::write(&path, "not json").unwrap();
        assert!(Leases::load(path).is_err());
    }
}
