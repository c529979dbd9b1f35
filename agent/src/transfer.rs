//! The transfer engine: one object from a [`Source`] into an ingest file, hashed as it lands.
//!
//! # Design
//!
//! The object is cut into ranges of `chunk_size` ([`plan`]). Up to `connections` workers take
//! the next unclaimed range, stream it, and write it at its offset with `pwrite` in blocks of
//! [`WRITE_BLOCK`], so memory is a block per connection plus the hasher's window, never a range.
//! After each block is written, the ordered hasher ([`crate::digest`]) hears of it; hashing thus
//! overlaps the transfer and the digest is ready when the last block lands.
//!
//! A failed range is retried with exponential backoff and jitter, waiting at least as long as a
//! `Retry-After` asks, from the first byte not yet written: the bytes a connection delivered
//! before it broke or stalled are kept. Stalls are caught by the source's read timeout.
//!
//! An origin that answers a ranged request with the whole object cannot be trusted with ranges
//! at all: the engine then starts over with a single stream from byte 0, which cannot resume
//! mid-way and is retried from the start. Bytes are never spliced from two kinds of answer.
//!
//! Rejected: one task per range without a connection cap (an object of 10,000 ranges would open
//! 10,000 requests), and a channel of blocks to one writer task (a copy and a hop per block for
//! nothing: `pwrite` at distinct offsets needs no coordination).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use control_client::{Algorithm, Digest};
use futures_util::StreamExt;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::config::TransferConfig;
use crate::digest::{self, HashFeed};
use crate::source::{ObjectInfo, Source, SourceError};

pub mod plan;
pub mod retry;

use plan::{Progress, RangePlan};
use retry::Retry;

/// Bytes gathered from the network before one `pwrite`.
pub const WRITE_BLOCK: usize = 1 << 20;

/// The settings of one transfer.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    pub chunk_size: u64,
    pub connections: usize,
    pub max_attempts: u32,
    pub hash_window: u64,
}

impl From<&TransferConfig> for TransferSettings {
    fn from(config: &TransferConfig) -> Self {
        TransferSettings {
            chunk_size: config.chunk_size.0,
            connections: config.connections_per_blob,
            max_attempts: config.max_attempts,
            hash_window: config.hash_window.0,
        }
    }
}

/// What a completed transfer produced.
#[derive(Debug, Clone)]
pub struct Transferred {
    /// The digest of the bytes in the ingest file.
    pub digest: Digest,
    /// Bytes received from the source, retries included.
    pub bytes_received: u64,
    /// Bytes the hasher read back from the file because they were not held in memory.
    pub bytes_read_back: u64,
    /// Time from the last byte written to the digest being ready: the hashing not overlapped
    /// with the transfer.
    pub hash_tail: Duration,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("bytes {}-{} failed after {attempts} attempt(s)", range.start, range.end)]
    Source {
        range: Range<u64>,
        attempts: u32,
        #[source]
        source: SourceError,
    },
    #[error("cannot write the ingest file")]
    Write(#[source] std::io::Error),
    #[error("cannot read back the ingest file for hashing")]
    Hash(#[source] std::io::Error),
}

impl TransferError {
    pub fn code(&self) -> &'static str {
        match self {
            TransferError::Source { source, .. } => source.code(),
            TransferError::Write(_) | TransferError::Hash(_) => "io_error",
        }
    }
}

/// Learns the object's size and validator, retrying like any other request of the transfer.
pub async fn stat(source: &dyn Source, max_attempts: u32) -> Result<ObjectInfo, SourceError> {
    let mut retry = Retry::new(max_attempts);
    loop {
        let error = match source.stat().await {
            Ok(info) => return Ok(info),
            Err(e) => e,
        };
        let Some(delay) = retry.next_delay(&error) else {
            return Err(error);
        };
        warn!(attempt = retry.attempt(), max = retry.max_attempts(), ?delay, %error,
            "first request failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// One object on its way from a source into an ingest file.
#[derive(Debug)]
pub struct Transfer {
    source: Arc<dyn Source>,
    info: Arc<ObjectInfo>,
    file: Arc<File>,
    algorithm: Algorithm,
    settings: TransferSettings,
    received: Arc<AtomicU64>,
}

impl Transfer {
    pub fn new(
        source: Arc<dyn Source>,
        info: ObjectInfo,
        file: Arc<File>,
        algorithm: Algorithm,
        settings: TransferSettings,
    ) -> Self {
        let info = Arc::new(info);
        Transfer {
            source,
            info,
            file,
            algorithm,
            settings,
            received: Arc::default(),
        }
    }

    pub async fn run(self) -> Result<Transferred, TransferError> {
        if self.info.ranges {
            let plan = RangePlan::new(self.info.size, self.settings.chunk_size);
            match self.attempt(plan, true).await {
                Err(TransferError::Source {
                    source: SourceError::RangeIgnored { uri },
                    ..
                }) => {
                    warn!(%uri, "origin ignored Range; reading the object as one stream");
                }
                done => return done,
            }
        }
        self.single_stream().await
    }

    /// The whole object in one request, retried from the start: without ranges nothing resumes.
    async fn single_stream(&self) -> Result<Transferred, TransferError> {
        let mut retry = Retry::new(self.settings.max_attempts);
        loop {
            let error = match self.attempt(RangePlan::whole(self.info.size), false).await {
                Err(TransferError::Source { source, .. }) => source,
                done => return done,
            };
            let Some(delay) = retry.next_delay(&error) else {
                let range = 0..self.info.size;
                return Err(TransferError::Source {
                    range,
                    attempts: retry.attempt(),
                    source: error,
                });
            };
            warn!(attempt = retry.attempt(), max = retry.max_attempts(), ?delay, %error,
                "single-stream transfer failed, starting over");
            tokio::time::sleep(delay).await;
        }
    }

    /// Runs `plan` to the end with fresh progress and a fresh hasher.
    async fn attempt(&self, plan: RangePlan, ranged: bool) -> Result<Transferred, TransferError> {
        let progress = Arc::new(Progress::new(plan));
        let (feed, hashed) = digest::spawn(
            self.algorithm,
            self.file.clone(),
            plan.size(),
            self.settings.hash_window,
        );
        let worker = Arc::new(Worker {
            source: self.source.clone(),
            info: self.info.clone(),
            file: self.file.clone(),
            progress,
            feed,
            next: AtomicUsize::new(0),
            received: self.received.clone(),
            ranged,
            max_attempts: if ranged {
                self.settings.max_attempts
            } else {
                1
            },
        });
        let mut workers = JoinSet::new();
        for _ in 0..self.settings.connections.min(plan.len()) {
            workers.spawn(worker.clone().run());
        }
        drop(worker);
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let written = Instant::now();
        let hashed = hashed
            .await
            .expect("the hasher thread reports before it ends");
        let hashed = hashed.map_err(TransferError::Hash)?;
        let digest = hashed
            .digest
            .expect("every range written, so the whole object is hashed");
        Ok(Transferred {
            digest,
            bytes_received: self.received.load(Ordering::Relaxed),
            bytes_read_back: hashed.read_back,
            hash_tail: written.elapsed(),
        })
    }
}

/// The shared state of the workers of one attempt. Each worker claims ranges in order.
#[derive(Debug)]
struct Worker {
    source: Arc<dyn Source>,
    info: Arc<ObjectInfo>,
    file: Arc<File>,
    progress: Arc<Progress>,
    feed: HashFeed,
    next: AtomicUsize,
    received: Arc<AtomicU64>,
    ranged: bool,
    max_attempts: u32,
}

impl Worker {
    async fn run(self: Arc<Self>) -> Result<(), TransferError> {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.progress.plan().len() {
                return Ok(());
            }
            self.fetch_range(index).await?;
        }
    }

    /// Fetches range `index`, retrying from its first unwritten byte.
    async fn fetch_range(&self, index: usize) -> Result<(), TransferError> {
        let range = self.progress.plan().range(index);
        let mut retry = Retry::new(self.max_attempts);
        loop {
            let from = range.start + self.progress.written(index);
            debug!(
                index,
                from,
                to = range.end,
                attempt = retry.attempt(),
                "range request"
            );
            let error = match self.fetch(index, from..range.end).await {
                Ok(()) => return Ok(()),
                Err(Fetch::Write(e)) => return Err(TransferError::Write(e)),
                Err(Fetch::Source(e)) => e,
            };
            let Some(delay) = retry.next_delay(&error) else {
                return Err(TransferError::Source {
                    range,
                    attempts: retry.attempt(),
                    source: error,
                });
            };
            warn!(?range, attempt = retry.attempt(), max = retry.max_attempts(), ?delay, %error,
                "range failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One request for `want`, written block by block. Bytes received before an error are
    /// written too, so that a retry starts after them.
    async fn fetch(&self, index: usize, want: Range<u64>) -> Result<(), Fetch> {
        let expected = want.end - want.start;
        let mut stream = self
            .source
            .read(self.ranged.then(|| want.clone()), &self.info)
            .await?;
        let mut block = BytesMut::with_capacity(WRITE_BLOCK.min(expected as usize));
        let mut offset = want.start;
        let mut got = 0u64;
        let outcome = loop {
            let chunk = match stream.next().await {
                None if got == expected => break Ok(()),
                None => {
                    break Err(SourceError::Truncated {
                        uri: self.uri(),
                        expected,
                        got,
                    });
                }
                Some(Err(e)) => break Err(e),
                Some(Ok(chunk)) => chunk,
            };
            if got + chunk.len() as u64 > expected {
                break Err(SourceError::Overlong {
                    uri: self.uri(),
                    expected,
                });
            }
            got += chunk.len() as u64;
            self.received
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let take = rest.len().min(WRITE_BLOCK - block.len());
                block.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if block.len() == WRITE_BLOCK {
                    self.write(index, &mut offset, &mut block).await?;
                }
            }
        };
        self.write(index, &mut offset, &mut block).await?;
        outcome.map_err(Fetch::Source)
    }

    /// Writes `block` at `offset`, records it, and lends it to the hasher.
    async fn write(
        &self,
        index: usize,
        offset: &mut u64,
        block: &mut BytesMut,
    ) -> Result<(), Fetch> {
        if block.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(block, BytesMut::with_capacity(WRITE_BLOCK)).freeze();
        let (file, data, at) = (self.file.clone(), bytes.clone(), *offset);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .expect("pwrite task panicked")
            .map_err(Fetch::Write)?;
        self.progress.record(index, bytes.len() as u64);
        *offset += bytes.len() as u64;
        self.feed.written(at, bytes);
        Ok(())
    }

    fn uri(&self) -> crate::redact::Redacted {
        self.source.uri()
    }
}

enum Fetch {
    Source(SourceError),
    Write(std::io::Error),
}

impl From<SourceError> for Fetch {
    fn from(e: SourceError) -> Self {
        Fetch::Source(e)
    }
}
