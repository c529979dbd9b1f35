//! The resume journal: what of an ingest file is durably on disk, and how far it is hashed.
//!
//! # Design
//!
//! One journal sits beside each ingest file (`<ingest>.journal`). It records the object it
//! belongs to (digest, size, chunk size, and the validator the transfer is pinned to), the
//! written prefix of every range, and a checkpoint of the ordered hasher: the length of the
//! hashed prefix and the hasher's serialized state. A checkpoint is taken by first
//! `fdatasync`ing the ingest file and only then writing the journal, so the journal never
//! claims a byte the disk may not hold. The journal is written to a temporary file, synced and
//! renamed over the old one, so a crash leaves the old journal or the new one, never half of one.
//!
//! The file is two lines: the SHA-256 of the second line, and the second line, a JSON object.
//! A journal whose checksum, format, hash-state format or object does not match is refused
//! whole: the transfer then starts clean. Resuming from a doubtful journal could splice bytes
//! of two versions, which only the final digest check would catch, after a full transfer.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use control_client::Digest;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::plan::RangePlan;
use crate::source::Validator;

/// The journal layout this build writes and reads.
pub const FORMAT: u32 = 2;

/// How the hasher state is serialized: sha2 0.11's `SerializableState`. Another version of the
/// crate may lay the state out differently, so a journal from it is refused.
pub const HASH_STATE_FORMAT: &str = "sha2-0.11-serializable-state";

/// One checkpoint of an ingest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub format: u32,
    pub digest: String,
    pub size: u64,
    pub chunk_size: u64,
    /// The connections the range plan was cut for: with the size and chunk size, it makes the
    /// plan the `written` counters are of.
    pub plan_connections: u32,
    pub validator: Option<Validator>,
    /// Bytes written from the start of each range, durably.
    pub written: Vec<u64>,
    /// Length of the hashed prefix the state below covers.
    pub hashed: u64,
    pub hash_state_format: String,
    /// Hex of the serialized hasher state.
    pub hash_state: String,
}

/// Why a journal on disk cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("the journal cannot be read: {0}")]
    Unreadable(String),
    #[error("the journal's checksum does not match its contents")]
    Corrupt,
    #[error("the journal is of format {0}, this build reads format {FORMAT}")]
    Format(u32),
    #[error("the journal is for another object: {0}")]
    Mismatch(&'static str),
}

/// The journal path of an ingest file.
pub fn path_for(ingest: &Path) -> PathBuf {
    let mut name = ingest.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

impl Journal {
    /// Reads the journal at `path`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Journal>, JournalError> {
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(JournalError::Unreadable(e.to_string())),
        };
        Journal::decode(&text).map(Some)
    }

    pub(crate) fn decode(text: &[u8]) -> Result<Journal, JournalError> {
        let newline = text
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(JournalError::Corrupt)?;
        let (sum, body) = (&text[..newline], &text[newline + 1..]);
        if sum != checksum(body).as_bytes() {
            return Err(JournalError::Corrupt);
        }
        let journal: Journal =
            serde_json::from_slice(body).map_err(|e| JournalError::Unreadable(e.to_string()))?;
        if journal.format != FORMAT {
            return Err(JournalError::Format(journal.format));
        }
        if journal.hash_state_format != HASH_STATE_FORMAT {
            return Err(JournalError::Mismatch(
                "the hash state is of another format",
            ));
        }
        Ok(journal)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("journals always serialize");
        let mut text = checksum(&body).into_bytes();
        text.push(b'\n');
        text.extend_from_slice(&body);
        text
    }

    /// Replaces the journal at `path` atomically and durably.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let temporary = path.with_extension("journal.tmp");
        let _ = fs::remove_file(&temporary);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&self.encode())?;
        file.sync_data()?;
        fs::rename(&temporary, path)?;
        let dir = path
            .parent()
            .expect("journals live in the ingest directory");
        File::open(dir)?.sync_all()
    }

    /// Checks that this journal describes the transfer about to start.
    pub fn check(
        &self,
        digest: &Digest,
        plan: &RangePlan,
        validator: Option<&Validator>,
    ) -> Result<(), JournalError> {
        let size = plan.size();
        let mismatch = |what| Err(JournalError::Mismatch(what));
        if self.digest != digest.to_string() {
            return mismatch("another digest");
        }
        if self.size != size {
            return mismatch("the source's size changed");
        }
        if validator.is_none() || self.validator.as_ref() != validator {
            return mismatch("the source's validator changed or is missing");
        }
        if self.chunk_size != plan.chunk() || self.plan_connections != plan.connections() {
            return mismatch("another range plan (chunk size or connections)");
        }
        if self.written.len() != plan.len() {
            return mismatch("another number of ranges");
        }
        let fits = self.written.iter().enumerate().all(|(i, w)| {
            let range = plan.range(i);
            *w <= range.end - range.start
        });
        if !fits || self.hashed > size {
            return mismatch("a range or the hashed prefix is past its end");
        }
        Ok(())
    }
}

fn checksum(body: &[u8]) -> String {
    let sum = sha2::Sha256::digest(body);
    sum.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        format!("sha256:{}", "1".repeat(64)).parse().unwrap()
    }

    fn journal() -> Journal {
        Journal {
            format: FORMAT,
            digest: digest().to_string(),
            size: 250,
            chunk_size: 100,
            plan_connections: 1,
            validator: Some(Validator::ETag("\"v1\"".into())),
            written: vec![100, 40, 0],
            hashed: 100,
            hash_state_format: HASH_STATE_FORMAT.into(),
            hash_state: "00ff".into(),
        }
    }

    #[test]
    fn round_trips_through_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.journal");
        assert_eq!(Journal::read(&path).unwrap(), None);
        journal().write(&path).unwrap();
        assert_eq!(Journal::read(&path).unwrap(), Some(journal()));
        assert_eq!(
            path_for(Path::new("/i/sha256-ab")),
            Path::new("/i/sha256-ab.journal")
        );
    }

    #[test]
    fn flipped_truncated_or_foreign_journals_are_refused() {
        let text = journal().encode();
        let mut flipped = text.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x01;
        assert_eq!(Journal::decode(&flipped), Err(JournalError::Corrupt));
        assert_eq!(
            Journal::decode(&text[..text.len() - 3]),
            Err(JournalError::Corrupt)
        );
        assert_eq!(Journal::decode(b""), Err(JournalError::Corrupt));

        let mut future = journal();
        future.format = FORMAT + 1;
        assert_eq!(
            Journal::decode(&future.encode()),
            Err(JournalError::Format(FORMAT + 1))
        );
        let mut other_state = journal();
        other_state.hash_state_format = "sha2-0.12".into();
        assert!(matches!(
            Journal::decode(&other_state.encode()),
            Err(JournalError::Mismatch(_))
        ));
    }

    #[test]
    fn check_refuses_another_object_or_version() {
        let j = journal();
        let v1 = Validator::ETag("\"v1\"".into());
        let plan = |size, chunk, connections| RangePlan::new(size, chunk, connections);
        assert_eq!(j.check(&digest(), &plan(250, 100, 1), Some(&v1)), Ok(()));
        let other: Digest = format!("sha256:{}", "2".repeat(64)).parse().unwrap();
        assert!(j.check(&other, &plan(250, 100, 1), Some(&v1)).is_err());
        assert!(j.check(&digest(), &plan(251, 100, 1), Some(&v1)).is_err());
        assert!(j.check(&digest(), &plan(250, 50, 1), Some(&v1)).is_err());
        assert!(j.check(&digest(), &plan(250, 100, 2), Some(&v1)).is_err());
        assert!(
            j.check(
                &digest(),
                &plan(250, 100, 1),
                Some(&Validator::ETag("\"v2\"".into()))
            )
            .is_err()
        );
        assert!(j.check(&digest(), &plan(250, 100, 1), None).is_err());
        let mut overfull = journal();
        overfull.written[2] = 51;
        assert!(
            overfull
                .check(&digest(), &plan(250, 100, 1), Some(&v1))
                .is_err()
        );
    }
}
