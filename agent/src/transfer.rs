//! The transfer engine: one object from a [`Source`] into an ingest file, hashed as it lands.
//!
//! # Design
//!
//! The object is cut into ranges of `chunk_size`, finer towards its end ([`plan`]). Up to
//! `connections` workers take the next unclaimed range, stream it, and write it at its offset
//! with one vectored `pwrite` per block of at most [`WRITE_BLOCK`], so memory is a block per
//! connection plus the hasher's window, never a range. The number of workers starts at
//! `connections` and grows while more raise the throughput ([`adapt`]); a worker above the
//! wanted number leaves before claiming its next range.
//! After each block is written, the ordered hasher ([`crate::digest`]) hears of it; hashing thus
//! overlaps the transfer and the digest is ready when the last block lands.
//!
//! A writer whose block ends more than the hash window plus `connections × chunk_size` past
//! the hashed prefix waits for the hasher before reading on ([`HashFeed::within`]): on a
//! machine whose cores are all busy, the hasher would otherwise fall ever further behind and
//! finish alone after the last byte (measured: up to 0.8 s of a 2 s transfer).
//!
//! A failed range is retried with exponential backoff and jitter, waiting at least as long as a
//! `Retry-After` asks, from the first byte not yet written: the bytes a connection delivered
//! before it broke or stalled are kept. Stalls are caught by the source's read timeout.
//!
//! Progress is checkpointed into the resume journal ([`journal`]) every half of
//! `connections × chunk_size` bytes written, and once more when the transfer fails: the ingest
//! file is `fdatasync`ed, then the written prefix of every range and the hasher's state are
//! recorded. A transfer started with a valid journal fetches only what the journal does not
//! cover and hashes on from the checkpoint, reading back from the file only the bytes written
//! after it. A kill therefore costs the bytes written since the last checkpoint (at most half
//! of `connections × chunk_size`) and the blocks being filled (at most a quarter chunk per
//! connection, and [`BLOCKS_BUDGET`] for all of them when the transfer may grow past 16):
//! less than `connections × chunk_size` in all, when the disk keeps up. The
//! disk is helped to keep up: writeback of what was written is started every
//! [`WRITEBACK_EVERY`] bytes (`crate::writeback`), so a checkpoint's `fdatasync` waits only
//! for the last few blocks instead of everything written since the one before.
//!
//! An origin that answers a ranged request with the whole object cannot be trusted with ranges
//! at all: the engine then starts over with a single stream from byte 0, which cannot resume
//! mid-way and is retried from the start. Bytes are never spliced from two kinds of answer.
//!
//! Rejected: one task per range without a connection cap (an object of 10,000 ranges would open
//! 10,000 requests), and a channel of blocks to one writer task (a copy and a hop per block for
//! nothing: `pwrite` at distinct offsets needs no coordination). Measured and rejected too, on
//! 2 GiB from a loopback nginx: one `pwrite` at a time behind an async lock (ext4 takes the
//! file's lock for each buffered write; writers spun on it for 10 % of the CPU when new page
//! cache was slow to get, 1 % otherwise; with the lock, 2.5-2.7 s against 2.2-2.4 s, each
//! hand-over waiting for a task to wake), and 2 MiB ranges for a fast origin so that the ranges
//! in flight fit the hash window (2.3-2.6 s against 2.1-2.2 s: more requests, and the read-back
//! hardly shrank, 1.75-1.9 of 2 GiB, as the hasher lags behind all ranges in flight).

use std::fs::File;
use std::io::IoSlice;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use control_client::{Algorithm, Digest};
use futures_util::StreamExt;
use tokio::sync::{OwnedMutexGuard, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, trace, warn};

use crate::config::TransferConfig;
use crate::digest::{self, Checkpoint, HashFeed, Hasher};
use crate::errors::Chain;
use crate::metrics::TransferMetrics;
use crate::source::{ObjectInfo, Source, SourceError};

pub mod adapt;
pub mod journal;
pub mod plan;
pub mod retry;

use adapt::Adapt;
use journal::Journal;

use plan::{Progress, RangePlan};
use retry::Retry;

/// Bytes gathered from the network before one `pwrite`, at most; a quarter of the chunk size
/// when that is smaller, so that a kill loses less than a chunk per connection, and less with
/// many connections (see [`BLOCKS_BUDGET`]).
pub const WRITE_BLOCK: usize = 1 << 20;

/// The blocks being filled by all connections of one transfer together, at most: with more
/// than 16 connections, each fills a smaller block (down to [`MIN_WRITE_BLOCK`]), so memory
/// grows less as connections are added (measured before: about 3 MiB per connection with 1 MiB
/// blocks, the block and the connection's own buffers).
pub const BLOCKS_BUDGET: usize = 16 << 20;

/// The smallest block, however many connections: `pwrite`s below it cost more in calls.
pub const MIN_WRITE_BLOCK: usize = 256 << 10;

/// Bytes written between two starts of writeback: large enough that the disk gets large
/// requests (a start per 1 MiB block looked 5-10 % slower on the benchmark, within its noise),
/// small enough that a checkpoint's `fdatasync` has little left.
pub const WRITEBACK_EVERY: u64 = 32 << 20;

/// The settings of one transfer.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    pub chunk_size: u64,
    /// Bytes gathered before one `pwrite`.
    pub write_block: usize,
    /// Connections at the start, and the range plan's.
    pub connections: usize,
    /// Connections the transfer may grow to while they raise its throughput ([`adapt`]).
    pub max_connections: usize,
    pub max_attempts: u32,
    pub hash_window: u64,
}

impl TransferSettings {
    /// The connections the range plan is cut for (see [`plan`]).
    pub fn plan_connections(&self) -> u32 {
        u32::try_from(self.connections).unwrap_or(u32::MAX)
    }

    /// The ranges of an object of `size` bytes.
    pub fn plan(&self, size: u64) -> RangePlan {
        RangePlan::new(size, self.chunk_size, self.plan_connections())
    }
}

impl From<&TransferConfig> for TransferSettings {
    fn from(config: &TransferConfig) -> Self {
        let ceiling = config.connections_ceiling();
        TransferSettings {
            chunk_size: config.chunk_size.0,
            // Sized for the most connections the transfer may grow to.
            write_block: (BLOCKS_BUDGET / ceiling.max(1))
                .clamp(MIN_WRITE_BLOCK, WRITE_BLOCK)
                .min(usize::try_from(config.chunk_size.0 / 4).unwrap_or(WRITE_BLOCK)),
            connections: config.connections_per_blob,
            max_connections: ceiling,
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
    /// Bytes already on disk from an earlier run, not fetched again.
    pub bytes_resumed: u64,
    /// Where hashing started: the checkpoint of an earlier run, or 0.
    pub hash_resumed_from: u64,
    /// Connections the transfer ran at the end, after any growth ([`adapt`]).
    pub connections: usize,
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
    #[error("cannot checkpoint the transfer")]
    Checkpoint(#[source] std::io::Error),
    #[error("the transfer was cancelled")]
    Cancelled,
}

impl TransferError {
    pub fn code(&self) -> &'static str {
        match self {
            TransferError::Source { source, .. } => source.code(),
            TransferError::Write(e) | TransferError::Hash(e) | TransferError::Checkpoint(e) => {
                crate::errors::io_code(e)
            }
            TransferError::Cancelled => "cancelled",
        }
    }
}

/// Learns the object's size and validator, retrying like any other request of the transfer.
pub async fn stat(
    source: &dyn Source,
    max_attempts: u32,
    metrics: &TransferMetrics,
) -> Result<ObjectInfo, SourceError> {
    let mut retry = Retry::new(max_attempts);
    loop {
        let connection = metrics.connection();
        let stated = source.stat().await;
        drop(connection);
        let error = match stated {
            Ok(info) => return Ok(info),
            Err(e) => e,
        };
        let Some(delay) = retry.next_delay(&error) else {
            return Err(error);
        };
        metrics.retry(retry::reason(&error));
        warn!(attempt = retry.attempt(), max = retry.max_attempts(), ?delay, error = %Chain(&error),
            "first request failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// What an earlier run left on disk, from a journal that matched this transfer.
#[derive(Debug, Clone)]
pub struct Resume {
    written: Vec<u64>,
    checkpoint: Checkpoint,
}

impl Resume {
    /// Takes a journal already checked against this transfer; `None` when its hash state does
    /// not restore.
    pub fn from_journal(journal: &Journal, algorithm: Algorithm) -> Option<Resume> {
        let state = decode_hex(&journal.hash_state)?;
        let hasher = Hasher::from_state(algorithm, &state)?;
        let checkpoint = Checkpoint {
            hashed: journal.hashed,
            hasher,
        };
        Some(Resume {
            written: journal.written.clone(),
            checkpoint,
        })
    }

    /// Bytes the earlier run left on disk.
    pub fn bytes(&self) -> u64 {
        self.written.iter().sum()
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
    /// Where checkpoints go, and the journal they are made from.
    journal: Option<(PathBuf, Journal)>,
    resume: Option<Resume>,
    cancel: CancellationToken,
    /// Connections for all transfers of the process together; one permit per range request.
    budget: Option<Arc<Semaphore>>,
    metrics: TransferMetrics,
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
            journal: None,
            resume: None,
            cancel: CancellationToken::new(),
            budget: None,
            metrics: TransferMetrics::default(),
        }
    }

    /// Counts bytes, requests and retries into `metrics` (the series of the source's type).
    pub fn with_metrics(mut self, metrics: TransferMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counts received bytes into `received` (so others can watch), and stops at the next
    /// block when `cancel` fires, checkpointing what was written.
    pub fn observed(mut self, received: Arc<AtomicU64>, cancel: CancellationToken) -> Self {
        self.received = received;
        self.cancel = cancel;
        self
    }

    /// Holds a permit of `budget` during every range request.
    pub fn with_budget(mut self, budget: Arc<Semaphore>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Checkpoints progress into the journal at `path`, for the object of `digest`.
    pub fn with_journal(mut self, path: PathBuf, digest: &Digest) -> Self {
        let template = Journal {
            format: journal::FORMAT,
            digest: digest.to_string(),
            size: self.info.size,
            chunk_size: self.settings.chunk_size,
            plan_connections: self.settings.plan_connections(),
            validator: self.info.validator.clone(),
            written: Vec::new(),
            hashed: 0,
            hash_state_format: journal::HASH_STATE_FORMAT.into(),
            hash_state: String::new(),
        };
        self.journal = Some((path, template));
        self
    }

    /// Continues what an earlier run left.
    pub fn resuming(mut self, resume: Resume) -> Self {
        self.resume = Some(resume);
        self
    }

    pub async fn run(self) -> Result<Transferred, TransferError> {
        if self.info.ranges {
            let plan = self.settings.plan(self.info.size);
            match self.attempt(plan, true, self.resume.as_ref()).await {
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
    ///
    /// Limitation: a single stream is not checkpointed, so a kill restarts it from byte 0.
    async fn single_stream(&self) -> Result<Transferred, TransferError> {
        let mut retry = Retry::new(self.settings.max_attempts);
        loop {
            let error = match self
                .attempt(RangePlan::whole(self.info.size), false, None)
                .await
            {
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
            self.metrics.retry(retry::reason(&error));
            warn!(attempt = retry.attempt(), max = retry.max_attempts(), ?delay, error = %Chain(&error),
                "single-stream transfer failed, starting over");
            tokio::time::sleep(delay).await;
        }
    }

    /// Runs `plan` to the end, from what `resume` says is already done. Without `ranged`, the
    /// plan's one range is read without a `Range` header and nothing is checkpointed.
    async fn attempt(
        &self,
        plan: RangePlan,
        ranged: bool,
        resume: Option<&Resume>,
    ) -> Result<Transferred, TransferError> {
        let (size, ranges) = (plan.size(), plan.len());
        let progress = Arc::new(Progress::new(plan));
        let start = match resume {
            Some(resume) => {
                resume
                    .written
                    .iter()
                    .enumerate()
                    .for_each(|(i, w)| progress.record(i, *w));
                resume.checkpoint.clone()
            }
            None => Checkpoint::start(self.algorithm),
        };
        let resumed = progress.total();
        let hash_resumed_from = start.hashed;
        let (feed, hashed) =
            digest::spawn(start, self.file.clone(), size, self.settings.hash_window);
        announce_on_disk(&feed, &progress, hash_resumed_from);

        // A single stream is one range: nothing to grow.
        let ceiling = match ranged {
            true => self.settings.max_connections.min(ranges),
            false => 1,
        };
        let floor = self.settings.connections.min(ranges);
        let adapt = Adapt::new(floor, ceiling, Instant::now());
        let journal = self.journal.clone().filter(|_| ranged);
        let interval = (self.settings.chunk_size * self.settings.connections as u64 / 2).max(1);
        let worker = Arc::new(Worker {
            source: self.source.clone(),
            info: self.info.clone(),
            file: self.file.clone(),
            progress,
            feed,
            next: AtomicUsize::new(0),
            received: self.received.clone(),
            cancel: self.cancel.clone(),
            budget: self.budget.clone(),
            metrics: self.metrics.clone(),
            ranged,
            max_attempts: if ranged {
                self.settings.max_attempts
            } else {
                1
            },
            write_block: self.settings.write_block,
            checkpoints: journal.map(|(path, template)| Checkpoints::new(path, template, interval)),
            unsubmitted: AtomicU64::new(0),
            lead: self.settings.hash_window
                + self.settings.chunk_size * self.settings.max_connections as u64,
            active: AtomicUsize::new(0),
            level: AtomicUsize::new(adapt.level()),
        });
        let connections = worker.drive(adapt).await?;
        drop(worker);

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
            bytes_resumed: resumed,
            hash_resumed_from,
            connections,
        })
    }
}

/// Waits until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Tells the hasher about bytes an earlier run wrote after its checkpoint.
fn announce_on_disk(feed: &HashFeed, progress: &Progress, hashed: u64) {
    for index in 0..progress.plan().len() {
        let range = progress.plan().range(index);
        let from = range.start.max(hashed);
        let to = range.start + progress.written(index);
        if to > from {
            feed.on_disk(from, to - from);
        }
    }
}

/// The checkpoints of one transfer: when the next is due, and one at a time.
#[derive(Debug)]
struct Checkpoints {
    path: PathBuf,
    template: Journal,
    interval: u64,
    since: AtomicU64,
    /// Held by the checkpoint under way until its journal is written, including by the
    /// blocking write of a worker aborted meanwhile.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// A checkpoint failed: warned about once, not once a checkpoint.
    failed: std::sync::atomic::AtomicBool,
}

impl Checkpoints {
    fn new(path: PathBuf, template: Journal, interval: u64) -> Self {
        let busy = Arc::new(tokio::sync::Mutex::new(()));
        Checkpoints {
            path,
            template,
            interval,
            since: AtomicU64::new(0),
            busy,
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts `len` more bytes written; true when a checkpoint is due.
    ///
    /// Limitation: bytes written while a slow `fdatasync` runs are covered by the next
    /// checkpoint, so on a disk that cannot keep up a kill may cost more than
    /// `connections × chunk_size`.
    fn due(&self, len: u64) -> bool {
        self.since.fetch_add(len, Ordering::AcqRel) + len >= self.interval
    }

    /// Starts a checkpoint: everything written so far is about to be covered.
    fn covering(&self) {
        self.since.store(0, Ordering::Release);
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
    cancel: CancellationToken,
    budget: Option<Arc<Semaphore>>,
    metrics: TransferMetrics,
    ranged: bool,
    max_attempts: u32,
    checkpoints: Option<Checkpoints>,
    write_block: usize,
    /// Bytes written since writeback was last started.
    unsubmitted: AtomicU64,
    /// How far past the hashed prefix a block may end before its writer waits for the hasher:
    /// the hash window and every range in flight, so that a hasher keeping up never holds
    /// anyone back.
    lead: u64,
    /// Workers running.
    active: AtomicUsize,
    /// Workers wanted ([`adapt`]): above it, a worker leaves instead of claiming a range.
    level: AtomicUsize,
}

impl Worker {
    /// Starts workers until `level` run, or as many as there are ranges left to claim.
    fn spawn_up_to(
        self: &Arc<Self>,
        workers: &mut JoinSet<Result<(), TransferError>>,
        level: usize,
    ) {
        let unclaimed = self
            .progress
            .plan()
            .len()
            .saturating_sub(self.next.load(Ordering::Relaxed));
        let running = self.active.load(Ordering::Acquire);
        for _ in running..level.min(running + unclaimed) {
            self.active.fetch_add(1, Ordering::AcqRel);
            workers.spawn(self.clone().run().in_current_span());
        }
    }

    /// Runs workers until every range is written, as many as `adapt` wants as it goes, and
    /// returns how many it wanted at the end. On a failure, stops the others and records the
    /// progress for a later resume.
    async fn drive(self: &Arc<Self>, mut adapt: Adapt) -> Result<usize, TransferError> {
        let received_before = self.received.load(Ordering::Relaxed);
        let mut workers = JoinSet::new();
        self.spawn_up_to(&mut workers, adapt.level());
        loop {
            let joined = tokio::select! {
                joined = workers.join_next() => joined,
                () = sleep_until(adapt.deadline()) => {
                    let received = self.received.load(Ordering::Relaxed) - received_before;
                    let level = adapt.tick(Instant::now(), received);
                    if level != self.level.swap(level, Ordering::AcqRel) {
                        debug!(connections = level, "connections changed");
                        self.spawn_up_to(&mut workers, level);
                    }
                    continue;
                }
            };
            match joined {
                None => return Ok(adapt.level()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    workers.abort_all();
                    while workers.join_next().await.is_some() {}
                    if let Err(checkpoint) = self.checkpoint(true).await {
                        warn!(error = %Chain(&checkpoint), "cannot record progress for a later resume");
                    }
                    return Err(e);
                }
                Some(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    }

    /// Whether this worker should stop before its next range: more are running than wanted.
    /// Counts it out if so.
    fn leave(&self) -> bool {
        let wanted = self.level.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > wanted).then(|| n - 1)
            })
            .is_ok()
    }

    async fn run(self: Arc<Self>) -> Result<(), TransferError> {
        loop {
            if self.leave() {
                return Ok(());
            }
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.progress.plan().len() {
                self.active.fetch_sub(1, Ordering::AcqRel);
                return Ok(());
            }
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(TransferError::Cancelled),
                fetched = self.fetch_range(index) => fetched?,
            }
        }
    }

    /// Fetches range `index`, retrying from its first unwritten byte.
    async fn fetch_range(&self, index: usize) -> Result<(), TransferError> {
        let range = self.progress.plan().range(index);
        let mut retry = Retry::new(self.max_attempts);
        loop {
            let from = range.start + self.progress.written(index);
            if from == range.end {
                return Ok(());
            }
            debug!(
                index,
                from,
                to = range.end,
                attempt = retry.attempt(),
                "range request"
            );
            if from > range.start {
                self.metrics.rerequest();
            }
            let permit = match &self.budget {
                Some(budget) => Some(budget.clone().acquire_owned().await.expect("never closed")),
                None => None,
            };
            let connection = self.metrics.connection();
            let fetched = self.fetch(index, from..range.end).await;
            drop((connection, permit));
            let error = match fetched {
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
            self.metrics.retry(retry::reason(&error));
            warn!(?range, attempt = retry.attempt(), max = retry.max_attempts(), ?delay, error = %Chain(&error),
                "range failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One request for `want`, written block by block. Bytes received before an error are
    /// written too, so that a retry starts after them.
    async fn fetch(&self, index: usize, want: Range<u64>) -> Result<(), Fetch> {
        let expected = want.end - want.start;
        let asked = Instant::now();
        let mut stream = self
            .source
            .read(self.ranged.then(|| want.clone()), &self.info)
            .await?;
        let mut first_byte = Some(asked);
        let mut block = Block::default();
        let mut offset = want.start;
        let mut got = 0u64;
        let outcome = loop {
            let mut chunk = match stream.next().await {
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
            if let Some(asked) = first_byte.take() {
                self.metrics.first_byte(asked.elapsed().as_secs_f64());
            }
            got += chunk.len() as u64;
            self.received
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.metrics.received(chunk.len() as u64);
            while !chunk.is_empty() {
                let take = chunk.len().min(self.write_block - block.len);
                block.push(chunk.split_to(take));
                if block.len == self.write_block || block.parts.len() == MAX_PARTS {
                    self.write(index, &mut offset, &mut block).await?;
                }
            }
        };
        self.write(index, &mut offset, &mut block).await?;
        outcome.map_err(Fetch::Source)
    }

    /// Writes `block` at `offset` with one vectored `pwrite`, records it, and lends its parts
    /// to the hasher.
    async fn write(&self, index: usize, offset: &mut u64, block: &mut Block) -> Result<(), Fetch> {
        if block.len == 0 {
            return Ok(());
        }
        let Block { parts, len } = std::mem::take(block);
        let len = len as u64;
        let (file, data, at) = (self.file.clone(), parts.clone(), *offset);
        let kick = self.unsubmitted.fetch_add(len, Ordering::AcqRel) + len >= WRITEBACK_EVERY;
        if kick {
            self.unsubmitted.store(0, Ordering::Release);
        }
        tokio::task::spawn_blocking(move || {
            write_all_vectored_at(&file, &data, at)?;
            if kick {
                crate::writeback::start(&file);
            }
            Ok(())
        })
        .await
        .expect("pwrite task panicked")
        .map_err(Fetch::Write)?;
        trace!(index, offset = at, len, "block written");
        self.progress.record(index, len);
        *offset += len;
        self.feed.written(at, parts);
        self.feed.within(at + len, self.lead).await;
        // A checkpoint that cannot be written (a full disk) costs only resume progress: the
        // last journal written stays valid, and the bytes are on disk all the same.
        let Some(checkpoints) = self.checkpoints.as_ref().filter(|c| c.due(len)) else {
            return Ok(());
        };
        if let Err(e) = self.checkpoint(false).await
            && !checkpoints.failed.swap(true, Ordering::Relaxed)
        {
            warn!(error = %Chain(&e), "cannot record progress for a later resume; going on");
        }
        Ok(())
    }

    /// Makes what is written durable, then records it and the hasher's state in the journal.
    /// Skipped when another checkpoint is under way, unless `wait`; the next one covers it.
    /// A writer that finds a checkpoint under way goes on; the checkpoint's owner takes another
    /// one as soon as it is done if more than an interval was written meanwhile, so a burst of
    /// writes that ends during a slow `fdatasync` is still covered.
    async fn checkpoint(&self, wait: bool) -> std::io::Result<()> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let busy = checkpoints.busy.clone();
        let mut one_at_a_time = match wait {
            true => busy.lock_owned().await,
            false => match busy.try_lock_owned() {
                Ok(guard) => guard,
                Err(_) => return Ok(()),
            },
        };
        loop {
            checkpoints.covering();
            one_at_a_time = self.write_checkpoint(checkpoints, one_at_a_time).await?;
            if wait || !checkpoints.due(0) {
                return Ok(());
            }
        }
    }

    /// Writes one checkpoint. `busy` goes into the blocking write and comes back with it: a
    /// worker aborted while it waits (another range failed) leaves the write running, and the
    /// failed transfer's last checkpoint, or the discard of its ingest, must come after it.
    async fn write_checkpoint(
        &self,
        checkpoints: &Checkpoints,
        busy: OwnedMutexGuard<()>,
    ) -> std::io::Result<OwnedMutexGuard<()>> {
        let hashed = self.feed.checkpoint();
        let written = self.progress.snapshot();
        if written.iter().all(|w| *w == 0) {
            return Ok(busy);
        }
        let journal = Journal {
            written,
            hashed: hashed.hashed,
            hash_state: encode_hex(&hashed.hasher.state()),
            ..checkpoints.template.clone()
        };
        let (file, path) = (self.file.clone(), checkpoints.path.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            journal.write(&path)?;
            Ok(busy)
        })
        .await
        .expect("checkpoint task panicked")
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

/// Network chunks for more than this many parts are written before the block is full: a
/// vectored write takes at most `IOV_MAX` (1,024) of them.
const MAX_PARTS: usize = 256;

/// Bytes gathered from the network for one `pwrite`: the chunks as they arrived (slices of
/// the connection's buffers), written with one vectored write rather than copied into one
/// buffer first. The copy cost 6 % of the CPU of a loopback transfer.
#[derive(Debug, Default)]
struct Block {
    parts: Vec<Bytes>,
    len: usize,
}

impl Block {
    fn push(&mut self, part: Bytes) {
        self.len += part.len();
        self.parts.push(part);
    }
}

/// `pwritev` of every byte of `parts` at `at`, going on after a short write.
fn write_all_vectored_at(file: &File, parts: &[Bytes], mut at: u64) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match rustix::io::pwritev(file, rest, at) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
