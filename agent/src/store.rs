//! The content store: verified blobs at `blobs/<algorithm>/<hex>`, in-progress data under
//! `ingest/`.
//!
//! # Design
//!
//! A blob path exists only for bytes whose digest was checked: an ingest file is written and
//! verified under `ingest/`, then `fsync`ed, made read-only (0444) and renamed into place, and
//! the directory is `fsync`ed so the rename survives a crash. Rename is atomic within one
//! filesystem, which is why `ingest/` lives beside `blobs/`. A reader therefore sees either no
//! blob or the whole verified blob, never a prefix.
//!
//! Each ingest has one owner at a time: an exclusive lock on `ingest/<name>.lock`, held for the
//! life of an [`Ingest`], so two processes on one state directory never write the same ingest;
//! the second waits, then finds the blob published or resumes what the first left. The lock
//! file is removed once its ingest is published or discarded; a waiter that then holds a lock
//! on a removed file notices it (the path no longer names its file) and locks again.
//!
//! An ingest that fails is kept, with its resume journal, for the next attempt; only an ingest
//! whose bytes are known to be wrong (a digest mismatch, a source that changed) is discarded.
//! Kept ingests untouched for `ingest_ttl` are removed by [`Store::sweep_ingests`], and so is
//! at once a journal whose data file is gone (a publish killed after its rename).
//!
//! Files are created with `O_EXCL` after removing whatever was at their path, so a symlink
//! planted in `ingest/` is replaced, never followed.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use control_client::{Algorithm, Digest};

use crate::transfer::journal;

pub mod gc;

/// Mode of published blobs: readable by the runtimes, writable by no one.
const BLOB_MODE: u32 = 0o444;

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}", path.display())]
pub struct StoreError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        crate::errors::io_code(&self.source)
    }
}

fn at(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError { op, path, source }
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store under `state_dir`, creating its directories.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(state_dir).map_err(at("create", state_dir))?;
        let root = fs::canonicalize(state_dir).map_err(at("resolve", state_dir))?;
        let store = Store { root };
        for (dir, mode) in [
            (store.root.join("blobs"), 0o755),
            (store.ingest_dir(), 0o700),
        ] {
            fs::create_dir_all(&dir).map_err(at("create", &dir))?;
            let mode = Permissions::from_mode(mode);
            fs::set_permissions(&dir, mode).map_err(at("set the mode of", &dir))?;
        }
        Ok(store)
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Where the verified blob of `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Every published blob: digest, path and size. Entries that are not blobs are skipped.
    pub fn list(&self) -> Result<Vec<(Digest, PathBuf, u64)>, StoreError> {
        let mut blobs = Vec::new();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(algorithm.name());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(at("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(at("list", &dir))?;
                let name = entry.file_name();
                let digest = format!("{}:{}", algorithm.name(), name.to_string_lossy());
                let (Ok(digest), Ok(meta)) = (digest.parse::<Digest>(), entry.metadata()) else {
                    continue;
                };
                if meta.is_file() {
                    blobs.push((digest, entry.path(), meta.len()));
                }
            }
        }
        blobs.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(blobs)
    }

    /// Marks the blob of `digest` as used now, for least-recently-used eviction.
    pub fn touch(&self, digest: &Digest) {
        let path = self.blob_path(digest);
        if let Ok(file) = File::open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Evicts least recently used blobs not in `protected` until the store holds at most
    /// `low` bytes. Returns what was evicted.
    pub fn collect(
        &self,
        low: u64,
        protected: &std::collections::HashSet<Digest>,
    ) -> Result<Vec<gc::Candidate>, StoreError> {
        let mut candidates = Vec::new();
        for (digest, path, size) in self.list()? {
            let meta = fs::symlink_metadata(&path).map_err(at("inspect", &path))?;
            let last_used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            candidates.push(gc::Candidate {
                digest,
                size,
                last_used,
            });
        }
        let evict = gc::plan(candidates, protected, low);
        for blob in &evict {
            let path = self.blob_path(&blob.digest);
            fs::remove_file(&path).map_err(at("evict", &path))?;
        }
        Ok(evict)
    }

    /// Moves the blob of `digest` out of `blobs/` into `quarantine/`, where nothing serves it.
    pub fn quarantine(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(at("create", &dir))?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let to = dir.join(format!(
            "{}-{}-{}",
            digest.algorithm(),
            digest.hex(),
            stamp.as_secs()
        ));
        let from = self.blob_path(digest);
        fs::rename(&from, &to).map_err(at("quarantine", &from))?;
        Ok(to)
    }

    /// The published blob of `digest`, with its size, if it is in the store.
    pub fn find(&self, digest: &Digest) -> Result<Option<(PathBuf, u64)>, StoreError> {
        let path = self.blob_path(digest);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some((path, meta.len()))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at("inspect", &path)(e)),
        }
    }

    /// Takes ownership of the ingest of `digest`, waiting while another process holds it.
    /// Blocking: call from a blocking thread.
    pub fn lock_ingest(&self, digest: &Digest) -> Result<Ingest, StoreError> {
        let path = self.ingest_path(digest);
        let lock_path = path.with_extension("lock");
        let lock = lock_file(&lock_path)?;
        Ok(Ingest {
            journal: journal::path_for(&path),
            path,
            lock_path,
            _lock: lock,
            file: None,
            blob: self.blob_path(digest),
            finished: false,
        })
    }

    /// Where the resume journal of `digest`'s ingest is, for a look before its lock is held.
    pub fn journal_path(&self, digest: &Digest) -> PathBuf {
        journal::path_for(&self.ingest_path(digest))
    }

    fn ingest_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir()
            .join(format!("{}-{}", digest.algorithm(), digest.hex()))
    }

    /// Bytes the ingest area takes on disk: allocated blocks, which for an ingest file are its
    /// blob's whole size from its creation (sparse until written only where `fallocate` is
    /// not supported).
    pub fn ingest_bytes(&self) -> Result<u64, StoreError> {
        let dir = self.ingest_dir();
        let mut bytes = 0;
        for entry in fs::read_dir(&dir).map_err(at("list", &dir))? {
            let meta = entry.and_then(|e| e.metadata()).map_err(at("list", &dir))?;
            bytes += meta.blocks() * 512;
        }
        Ok(bytes)
    }

    /// Removes kept ingests whose data has not changed for `ttl`, unless a transfer holds them.
    /// Returns the bytes freed.
    ///
    /// Kept ingests also count against the store's size budget (see the daemon's garbage
    /// collection), which evicts blobs, not ingests, to make room for them.
    pub fn sweep_ingests(&self, ttl: Duration) -> Result<u64, StoreError> {
        let dir = self.ingest_dir();
        let mut freed = 0;
        for entry in fs::read_dir(&dir).map_err(at("list", &dir))? {
            let path = entry.map_err(at("list", &dir))?.path();
            if path.extension().is_some_and(|e| e == "journal") {
                remove_orphan_journal(&path);
            }
            if path.extension().is_some() {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok());
            if age.is_none_or(|age| age < ttl) {
                continue;
            }
            let Ok(lock) = open_lock(&path.with_extension("lock")) else {
                continue;
            };
            if lock.try_lock().is_ok() {
                for stale in [
                    path.clone(),
                    journal::path_for(&path),
                    path.with_extension("lock"),
                ] {
                    let _ = fs::remove_file(stale);
                }
                freed += meta.len();
            }
        }
        Ok(freed)
    }
}

/// Removes the journal at `path`, and its lock, when its data file is gone and no transfer holds
/// it: what a publish killed between its rename and its clean-up leaves behind.
fn remove_orphan_journal(path: &Path) {
    let data = path.with_extension("");
    if fs::symlink_metadata(&data).is_ok() {
        return;
    }
    let lock_path = data.with_extension("lock");
    let Ok(lock) = open_lock(&lock_path) else {
        return;
    };
    if lock.try_lock().is_ok() && fs::symlink_metadata(&data).is_err() {
        let _ = fs::remove_file(path);
        let _ = fs::remove_file(&lock_path);
    }
}

/// Opens (creating it if need be) the lock file at `path`, never through a symlink and never
/// truncating what is there.
fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Locks `path` exclusively, and makes sure the lock is on the file that `path` still names.
fn lock_file(path: &Path) -> Result<File, StoreError> {
    loop {
        let file = match open_lock(path) {
            // A symlink planted at the path is removed, never followed.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                fs::remove_file(path).map_err(at("remove", path))?;
                continue;
            }
            opened => opened.map_err(at("open", path))?,
        };
        file.lock().map_err(at("lock", path))?;
        let held = file.metadata().map_err(at("inspect", path))?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(file),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at("inspect", path)(e)),
        }
    }
}

/// An ingest owned by this process: its data file, its journal and its lock.
#[derive(Debug)]
pub struct Ingest {
    path: PathBuf,
    journal: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    file: Option<Arc<File>>,
    blob: PathBuf,
    /// Published or discarded: the lock file goes too.
    finished: bool,
}

impl Ingest {
    pub fn journal_path(&self) -> &Path {
        &self.journal
    }

    /// The data file; call [`Ingest::create`] or [`Ingest::reopen`] first.
    pub fn file(&self) -> Arc<File> {
        self.file.clone().expect("the ingest file is open")
    }

    /// Opens the data a previous run left, if it is there at exactly `size` bytes.
    pub fn reopen(&mut self, size: u64) -> Result<bool, StoreError> {
        let file = match open_existing(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            // A symlink planted at the path: not ours to resume; `create` replaces it.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
            Err(e) => return Err(at("open", &self.path)(e)),
        };
        let meta = file.metadata().map_err(at("inspect", &self.path))?;
        if !meta.is_file() || meta.len() != size {
            return Ok(false);
        }
        self.file = Some(Arc::new(file));
        Ok(true)
    }

    /// Starts a fresh data file of `size` bytes, removing any earlier data and journal.
    pub fn create(&mut self, size: u64) -> Result<(), StoreError> {
        self.file = None;
        self.remove_data()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(at("create", &self.path))?;
        if let Err(e) = reserve(&file, size) {
            let _ = fs::remove_file(&self.path);
            return Err(at("reserve space for", &self.path)(e));
        }
        self.file = Some(Arc::new(file));
        Ok(())
    }

    fn remove_data(&self) -> Result<(), StoreError> {
        for path in [&self.path, &self.journal] {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at("remove", path)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the data and journal: their bytes must not be resumed.
    pub fn discard(mut self) -> Result<(), StoreError> {
        self.file = None;
        self.remove_data()?;
        self.finished = true;
        Ok(())
    }

    /// Makes the verified ingest the blob: fsync, 0444, rename, fsync of the directory.
    /// Call only after the digest of the file's contents has been checked.
    pub fn publish(mut self) -> Result<PathBuf, StoreError> {
        let file = self.file();
        file.sync_all().map_err(at("sync", &self.path))?;
        let mode = Permissions::from_mode(BLOB_MODE);
        file.set_permissions(mode)
            .map_err(at("set the mode of", &self.path))?;
        let dir = self.blob.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(at("create", dir))?;
        pause_at("publish-before-rename");
        fs::rename(&self.path, &self.blob).map_err(at("publish", &self.blob))?;
        pause_at("publish-after-rename");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at("sync", dir))?;
        let _ = fs::remove_file(&self.journal);
        self.finished = true;
        Ok(self.blob.clone())
    }
}

/// Sizes a new ingest file to `size` bytes and reserves its blocks, so that a disk without room
/// for the blob fails here, before any byte is fetched, and never half-way through. A
/// filesystem that cannot reserve (no `fallocate`) gets a sparse file instead.
fn reserve(file: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => file.set_len(size),
        result => result.map_err(io::Error::from),
    }
}

/// Opens an existing ingest file to read and write, never through a symlink. A file left
/// read-only (0444) by a publish killed between its chmod and its rename is made writable by
/// its owner again first: only root may open a read-only file for writing.
fn open_existing(path: &Path) -> io::Result<File> {
    let open = |write| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    match open(true) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open(false)?.set_permissions(Permissions::from_mode(0o600))?;
            open(true)
        }
        opened => opened,
    }
}

/// A test hook of debug builds: with `BLOBSTAGE_PAUSE_AT=<point>` in its environment the
/// process stops at that point of a publish (`publish-before-rename`, `publish-after-rename`),
/// so that a test can SIGKILL it exactly there, or change the world under it: with
/// `BLOBSTAGE_PAUSE_UNTIL=<path>` too, it goes on once that path exists, else never. Release
/// builds have no such point.
fn pause_at(point: &str) {
    if !cfg!(debug_assertions) || std::env::var_os("BLOBSTAGE_PAUSE_AT").is_none_or(|p| p != point)
    {
        return;
    }
    let until = std::env::var_os("BLOBSTAGE_PAUSE_UNTIL").map(PathBuf::from);
    loop {
        match &until {
            Some(go) if go.exists() => return,
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            None => std::thread::park(),
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // Removed while still locked, so a waiter finds its lock stale and locks again.
        if self.finished {
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn digest() -> Digest {
        format!("sha256:{}", "ab".repeat(32)).parse().unwrap()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir.join("ingest"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn publish_makes_a_read_only_blob_and_leaves_no_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.find(&digest()).unwrap().is_none());

        let mut ingest = store.lock_ingest(&digest()).unwrap();
        ingest.create(3).unwrap();
        (&*ingest.file()).write_all(b"abc").unwrap();
        let path = ingest.publish().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(path, root.join("blobs/sha256").join("ab".repeat(32)));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(store.find(&digest()).unwrap(), Some((path, 3)));
        assert!(listing(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_ingest_is_kept_for_resume_and_a_discarded_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ingest = store.lock_ingest(&digest()).unwrap();
        ingest.create(10).unwrap();
        drop(ingest);
        let mut again = store.lock_ingest(&digest()).unwrap();
        assert!(
            !again.reopen(11).unwrap(),
            "a file of another size is not resumed"
        );
        assert!(again.reopen(10).unwrap());
        again.discard().unwrap();
        assert!(listing(dir.path()).is_empty());
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let ingest_path = dir
            .path()
            .join("ingest")
            .join(format!("sha256-{}", "ab".repeat(32)));
        std::os::unix::fs::symlink(&victim, &ingest_path).unwrap();

        let mut ingest = store.lock_ingest(&digest()).unwrap();
        ingest.create(100).unwrap();
        (&*ingest.file()).write_all(b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert!(
            !fs::symlink_metadata(&ingest_path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn a_symlink_planted_as_ingest_or_lock_is_not_resumed_or_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"0123456789").unwrap();
        let name = format!("sha256-{}", "ab".repeat(32));
        let ingest_dir = dir.path().join("ingest");
        std::os::unix::fs::symlink(&victim, ingest_dir.join(&name)).unwrap();
        std::os::unix::fs::symlink(&victim, ingest_dir.join(format!("{name}.lock"))).unwrap();

        let mut ingest = store.lock_ingest(&digest()).unwrap();
        assert!(
            !ingest.reopen(10).unwrap(),
            "a symlink of the right size was resumed"
        );
        ingest.create(10).unwrap();
        (&*ingest.file()).write_all(b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"0123456789");
        let lock = fs::symlink_metadata(ingest_dir.join(format!("{name}.lock"))).unwrap();
        assert!(lock.is_file());
    }

    #[test]
    fn one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store.lock_ingest(&digest()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let second = store.lock_ingest(&digest()).unwrap();
                tx.send(()).unwrap();
                second
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "second owner got in"
        );
        first.discard().unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the waiter takes over");
        drop(waiter.join().unwrap());
    }

    #[test]
    fn ingest_bytes_count_the_space_an_ingest_reserves() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.ingest_bytes().unwrap(), 0);
        let mut ingest = store.lock_ingest(&digest()).unwrap();
        ingest.create(64 << 20).unwrap();
        assert_eq!(ingest.file().metadata().unwrap().len(), 64 << 20);
        let reserved = store.ingest_bytes().unwrap();
        assert!(
            reserved >= 64 << 20,
            "a reserved file counted {reserved} bytes"
        );
    }

    #[test]
    fn sweep_removes_only_old_unlocked_ingests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ingest = store.lock_ingest(&digest()).unwrap();
        ingest.create(10).unwrap();
        assert_eq!(
            store.sweep_ingests(Duration::ZERO).unwrap(),
            0,
            "held ingests stay"
        );
        drop(ingest);
        assert_eq!(
            store.sweep_ingests(Duration::from_secs(3600)).unwrap(),
            0,
            "young ones stay"
        );
        assert_eq!(store.sweep_ingests(Duration::ZERO).unwrap(), 10);
        assert!(listing(dir.path()).is_empty());
    }
}
