//! The `artifact_store` source with its embedded default: a local directory.
//!
//! `artifact-store://<key>` names `<root>/<key>`. Keys are relative paths of plain segments;
//! `..`, `.`, empty segments and absolute paths are refused, and the resolved file must lie
//! under the root after symlinks are followed, so a registration cannot read outside the store.
//! The validator is the file's identity (size, modification time, inode): a file replaced or
//! rewritten between ranges fails the transfer instead of mixing versions.

use std::fs::Metadata;
use std::io::SeekFrom;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use control_client::BoxFuture;
use futures_util::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{ByteStream, ObjectInfo, Source, SourceError, Validator};
use crate::redact::Redacted;

const SCHEME: &str = "artifact-store://";

/// Read size for one step of a local range read.
const READ_BLOCK: usize = 1 << 20;

#[derive(Debug)]
pub struct LocalStoreSource {
    root: PathBuf,
    path: PathBuf,
    uri: Redacted,
}

impl LocalStoreSource {
    pub fn new(root: &Path, uri: &str) -> Result<Self, SourceError> {
        let shown = Redacted::uri(uri);
        let invalid = |reason: &str| SourceError::InvalidUri {
            uri: shown.clone(),
            reason: reason.into(),
        };
        let key = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("expected artifact-store://<key>"))?;
        let plain_segments = !key.is_empty()
            && key
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..")
            && !key.contains(['\\', '\0', '?', '#']);
        if !plain_segments {
            return Err(invalid("the key must be a relative path of plain segments"));
        }
        Ok(LocalStoreSource {
            root: root.to_owned(),
            path: root.join(key),
            uri: shown,
        })
    }

    fn io(&self, source: std::io::Error) -> SourceError {
        if source.kind() == std::io::ErrorKind::NotFound {
            return SourceError::NotFound {
                uri: self.uri.clone(),
            };
        }
        SourceError::Io {
            uri: self.uri.clone(),
            source,
        }
    }

    /// Opens the file after checking that it really lies under the root.
    async fn open(&self) -> Result<(tokio::fs::File, Metadata), SourceError> {
        let root = tokio::fs::canonicalize(&self.root)
            .await
            .map_err(|e| self.io(e))?;
        let path = tokio::fs::canonicalize(&self.path)
            .await
            .map_err(|e| self.io(e))?;
        if !path.starts_with(&root) {
            return Err(SourceError::InvalidUri {
                uri: self.uri.clone(),
                reason: "the key resolves outside the artifact store".into(),
            });
        }
        let file = tokio::fs::File::open(&path).await.map_err(|e| self.io(e))?;
        let meta = file.metadata().await.map_err(|e| self.io(e))?;
        if !meta.is_file() {
            return Err(SourceError::NotFound {
                uri: self.uri.clone(),
            });
        }
        Ok((file, meta))
    }
}

fn identity(meta: &Metadata) -> Validator {
    Validator::Opaque(format!(
        "{}-{}.{}-{}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    ))
}

impl Source for LocalStoreSource {
    fn uri(&self) -> Redacted {
        self.uri.clone()
    }

    fn stat(&self) -> BoxFuture<'_, Result<ObjectInfo, SourceError>> {
        Box::pin(async move {
            let (_, meta) = self.open().await?;
            Ok(ObjectInfo {
                size: meta.len(),
                validator: Some(identity(&meta)),
                ranges: true,
            })
        })
    }

    fn read<'a>(
        &'a self,
        range: Option<Range<u64>>,
        pinned: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<ByteStream, SourceError>> {
        Box::pin(async move {
            let (mut file, meta) = self.open().await?;
            if pinned.validator.as_ref() != Some(&identity(&meta)) {
                return Err(SourceError::Changed {
                    uri: self.uri.clone(),
                    reason: "the file was replaced or modified".into(),
                });
            }
            let range = range.unwrap_or(0..pinned.size);
            file.seek(SeekFrom::Start(range.start))
                .await
                .map_err(|e| self.io(e))?;
            let reader = file.take(range.end - range.start);
            let uri = self.uri.clone();
            let stream = ReaderStream::with_capacity(reader, READ_BLOCK).map_err(move |source| {
                SourceError::Io {
                    uri: uri.clone(),
                    source,
                }
            });
            Ok(Box::pin(stream) as ByteStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn keys_cannot_escape_the_root() {
        let root = Path::new("/store");
        for bad in [
            "artifact-store://",
            "artifact-store://../etc/passwd",
            "artifact-store://a/../../b",
            "artifact-store:///abs",
            "artifact-store://a//b",
            "artifact-store://./a",
            "s3://b/k",
        ] {
            assert!(LocalStoreSource::new(root, bad).is_err(), "{bad} accepted");
        }
        let ok = LocalStoreSource::new(root, "artifact-store://models/a.bin").unwrap();
        assert_eq!(ok.path, Path::new("/store/models/a.bin"));
    }

    #[tokio::test]
    async fn a_symlink_out_of_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let source = LocalStoreSource::new(&root, "artifact-store://link").unwrap();
        assert_eq!(
            source.stat().await.unwrap_err().code(),
            "invalid_source_uri"
        );
    }

    #[tokio::test]
    async fn reads_ranges_of_the_pinned_version_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blob"), b"0123456789").unwrap();
        let source = LocalStoreSource::new(dir.path(), "artifact-store://blob").unwrap();
        let info = source.stat().await.unwrap();
        assert_eq!(info.size, 10);
        let chunks: Vec<_> = source
            .read(Some(3..7), &info)
            .await
            .unwrap()
            .collect()
            .await;
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap()).collect();
        assert_eq!(bytes, b"3456");

        std::fs::write(dir.path().join("blob"), b"changed!!!!").unwrap();
        assert_eq!(
            source.read(Some(0..2), &info).await.err().unwrap().code(),
            "source_changed"
        );
    }
}
