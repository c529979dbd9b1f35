//! The content store: verified blobs at `blobs/<algorithm>/<hex>`, in-progress data under
//! `ingest/`.
//!
//! # Design
//!
//! A blob path exists only for bytes whose digest was checked: an ingest file is written and
//! verified under `ingest/`, then `fsync`ed, made read-only (0444) and renamed into place, and
//! the directory is `fsync`ed so the rename survives a crash. Rename is atomic within one
//! filesystem, which is why `ingest/` lives beside `blobs/`. A reader therefore sees either no
//! blob or the whole verified blob, never a prefix. An ingest that is not published is removed
//! when its [`Ingest`] is dropped.
//!
//! Ingest files are created with `O_EXCL` after removing whatever was at their path, so a
//! symlink planted in `ingest/` is replaced, never followed.
//!
//! Limitation: two processes staging the same digest at once share one ingest path and can
//! disturb each other's transfer; an ingest lock comes with resumable transfers. A blob either
//! of them publishes is still verified.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use control_client::Digest;

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
        "io_error"
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
            (store.root.join("ingest"), 0o700),
        ] {
            fs::create_dir_all(&dir).map_err(at("create", &dir))?;
            fs::set_permissions(&dir, Permissions::from_mode(mode))
                .map_err(at("set the mode of", &dir))?;
        }
        Ok(store)
    }

    /// Where the verified blob of `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
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

    /// Creates a fresh ingest file for `digest`, sized to `size`.
    pub fn create_ingest(&self, digest: &Digest, size: u64) -> Result<Ingest, StoreError> {
        let path =
            self.root
                .join("ingest")
                .join(format!("{}-{}", digest.algorithm(), digest.hex()));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at("remove", &path)(e)),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(at("create", &path))?;
        file.set_len(size).map_err(at("size", &path))?;
        Ok(Ingest {
            path,
            file: Arc::new(file),
            blob: self.blob_path(digest),
            published: false,
        })
    }
}

/// An ingest file on its way to becoming a blob. Removed on drop unless published.
#[derive(Debug)]
pub struct Ingest {
    path: PathBuf,
    file: Arc<File>,
    blob: PathBuf,
    published: bool,
}

impl Ingest {
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Makes the verified ingest the blob: fsync, 0444, rename, fsync of the directory.
    /// Call only after the digest of the file's contents has been checked.
    pub fn publish(mut self) -> Result<PathBuf, StoreError> {
        self.file.sync_all().map_err(at("sync", &self.path))?;
        self.file
            .set_permissions(Permissions::from_mode(BLOB_MODE))
            .map_err(at("set the mode of", &self.path))?;
        let dir = self.blob.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(at("create", dir))?;
        fs::rename(&self.path, &self.blob).map_err(at("publish", &self.blob))?;
        self.published = true;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at("sync", dir))?;
        Ok(self.blob.clone())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.path);
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

    #[test]
    fn publish_makes_a_read_only_blob_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.find(&digest()).unwrap().is_none());

        let ingest = store.create_ingest(&digest(), 3).unwrap();
        (&*ingest.file()).write_all(b"abc").unwrap();
        let path = ingest.publish().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(path, root.join("blobs/sha256").join("ab".repeat(32)));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(store.find(&digest()).unwrap(), Some((path, 3)));

        let dropped = store.create_ingest(&digest(), 10).unwrap();
        let ingest_path = dropped.path.clone();
        assert!(ingest_path.exists());
        drop(dropped);
        assert!(!ingest_path.exists());
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
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

        let ingest = store.create_ingest(&digest(), 100).unwrap();
        (&*ingest.file()).write_all(b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert!(
            !fs::symlink_metadata(&ingest_path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
