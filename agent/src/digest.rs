//! Ordered hashing: the digest of the object, computed while its ranges land out of order.
//!
//! # Design
//!
//! A hash is a fold over the bytes in order, so only the contiguous prefix of the object can be
//! hashed. One thread owns the hasher and advances its frontier (`hashed`) as far as the blocks
//! it has heard of reach. Writers announce every block once, after writing it
//! ([`HashFeed::written`]); the hasher learns of bytes only through these announcements, never
//! by looking at shared progress, so it cannot race a writer into reading back a block that is
//! about to be handed to it. A writer lends the block itself when it lies within `window` bytes
//! of the hashed prefix, which the hasher publishes as it advances: a block at the frontier is
//! then hashed straight from the buffer it arrived in, and a block a little ahead is held until
//! the frontier reaches it. A block further ahead is announced without its bytes, and the hasher
//! reads it back from the file when the frontier gets there, while it is still in the page
//! cache. Blocks never overlap and the hasher never passes one it has not consumed, so every
//! lent block lies in `[hashed, hashed + window)`: memory is bounded by the window whatever the
//! object size and arrival order.
//!
//! With `connections` ranges of `chunk_size` in flight, ranges beyond the window are read back:
//! about `(connections - 1) / connections` of the object with the defaults. A read-back costs a
//! copy from the page cache, a fraction of the cost of hashing the same bytes; holding every
//! range in flight instead would cost `connections × chunk_size` of memory.
//!
//! Rejected: hashing each range separately (the declared digest is of the whole object, and a
//! tree hash would need the control plane to declare one), holding every out-of-order range
//! (memory grows with connections × chunk size), and hashing only after the transfer (a full
//! second pass over the file, which is the tail this design removes).
//!
//! The hasher runs on its own OS thread, not on the async runtime: hashing is the one CPU-bound
//! step, and it must not stall the tasks that keep connections flowing.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use control_client::{Algorithm, Digest};
use sha2::Digest as _;
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use tokio::sync::oneshot;

/// Largest read-back at once, when the frontier is on disk but not in memory.
const READ_BACK_BLOCK: u64 = 1 << 20;

/// A running hash of one of the declared algorithms.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Hasher::Sha256(_) => "sha256",
            Hasher::Sha512(_) => "sha512",
        };
        write!(f, "Hasher({name})")
    }
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The hasher's internal state, to be restored by [`Hasher::from_state`].
    pub fn state(&self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.serialize().to_vec(),
            Hasher::Sha512(h) => h.serialize().to_vec(),
        }
    }

    /// Restores a hasher saved by [`Hasher::state`]; `None` when `state` is not one.
    pub fn from_state(algorithm: Algorithm, state: &[u8]) -> Option<Self> {
        match algorithm {
            Algorithm::Sha256 => {
                let state = SerializedState::<sha2::Sha256>::try_from(state).ok()?;
                sha2::Sha256::deserialize(&state).ok().map(Hasher::Sha256)
            }
            Algorithm::Sha512 => {
                let state = SerializedState::<sha2::Sha512>::try_from(state).ok()?;
                sha2::Sha512::deserialize(&state).ok().map(Hasher::Sha512)
            }
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_bytes(Algorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::from_bytes(Algorithm::Sha512, &h.finalize()),
        }
    }
}

/// The hasher as it stood after `hashed` bytes: where a resumed transfer starts hashing.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub hashed: u64,
    pub hasher: Hasher,
}

impl Checkpoint {
    /// Nothing hashed yet.
    pub fn start(algorithm: Algorithm) -> Self {
        Checkpoint {
            hashed: 0,
            hasher: Hasher::new(algorithm),
        }
    }
}

/// A block written to the ingest file, with its bytes (the parts it was written from) when
/// the window lent them.
struct Piece {
    offset: u64,
    len: u64,
    parts: Option<Vec<Bytes>>,
}

/// The writers' side of the ordered hasher.
#[derive(Debug)]
pub struct HashFeed {
    tx: mpsc::Sender<Piece>,
    /// The hashed prefix, as the hasher last published it.
    frontier: Arc<Published>,
    window: u64,
    latest: Arc<Mutex<Checkpoint>>,
}

/// The hashed prefix as the hasher publishes it, for writers to lend against and wait on.
#[derive(Debug, Default)]
struct Published {
    hashed: AtomicU64,
    /// The hasher has stopped: nothing will move the frontier again.
    stopped: std::sync::atomic::AtomicBool,
    moved: tokio::sync::Notify,
}

impl Published {
    fn set(&self, hashed: u64) {
        self.hashed.store(hashed, Ordering::Release);
        self.moved.notify_waiters();
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.moved.notify_waiters();
    }
}

impl HashFeed {
    /// Tells the hasher that the block `parts`, in order, is on disk at `offset`. Never blocks.
    pub fn written(&self, offset: u64, parts: Vec<Bytes>) {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let lend = offset + len
            <= self
                .frontier
                .hashed
                .load(Ordering::Acquire)
                .saturating_add(self.window);
        let parts = lend.then_some(parts);
        // A send fails only once the hasher has stopped; the bytes are on disk regardless.
        let _ = self.tx.send(Piece { offset, len, parts });
    }

    /// Tells the hasher that `len` bytes at `offset` are on disk from an earlier run.
    pub fn on_disk(&self, offset: u64, len: u64) {
        let _ = self.tx.send(Piece {
            offset,
            len,
            parts: None,
        });
    }

    /// Waits until the hashed prefix is within `lead` bytes of `end`, or the hasher stopped.
    ///
    /// Writers call it after each block, so that the transfer never runs further ahead of the
    /// hasher than the ranges in flight need: when both cores are busy, a hasher left behind
    /// would otherwise finish alone after the last byte, reading back from the page cache
    /// everything it fell behind by, while the network tasks sit idle.
    pub async fn within(&self, end: u64, lead: u64) {
        let published = &self.frontier;
        let near = || {
            let hashed = published.hashed.load(Ordering::Acquire);
            end <= hashed.saturating_add(lead) || published.stopped.load(Ordering::Acquire)
        };
        // Registered before the second look, so that a move between the two is not missed.
        while !near() {
            let moved = published.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if near() {
                return;
            }
            moved.await;
        }
    }

    /// The hasher's latest state, for a journal checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        self.latest.lock().expect("checkpoint lock").clone()
    }
}

/// What the hasher did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// The digest, when the whole object was hashed; `None` when the writers stopped first.
    pub digest: Option<Digest>,
    /// Length of the hashed prefix.
    pub hashed: u64,
    /// Bytes read back from the file because they were not held in memory.
    pub read_back: u64,
}

/// Starts the hasher thread for an object of `size` bytes being written to `file`, from
/// `start` (the beginning of the object, or a checkpoint of an earlier run).
pub fn spawn(
    start: Checkpoint,
    file: Arc<File>,
    size: u64,
    window: u64,
) -> (HashFeed, oneshot::Receiver<std::io::Result<Hashed>>) {
    let (tx, rx) = mpsc::channel();
    let frontier = Arc::new(Published::default());
    frontier.set(start.hashed);
    let latest = Arc::new(Mutex::new(start.clone()));
    let (done_tx, done_rx) = oneshot::channel();
    let state = Frontier {
        hasher: start.hasher,
        hashed: start.hashed,
        read_back: 0,
        pieces: BTreeMap::new(),
        frontier: frontier.clone(),
        latest: latest.clone(),
        file,
        size,
        buffer: Vec::new(),
    };
    std::thread::Builder::new()
        .name("blobstage-hash".into())
        .spawn(move || {
            let published = state.frontier.clone();
            let hashed = state.run(rx);
            published.stop();
            let _ = done_tx.send(hashed);
        })
        .expect("cannot start the hasher thread");
    (
        HashFeed {
            tx,
            frontier,
            window,
            latest,
        },
        done_rx,
    )
}

/// A block the hasher has heard of and not yet hashed.
enum Block {
    /// Lent by the writer: hashed from memory, part after part.
    Lent(Vec<Bytes>),
    /// Only announced: this many bytes are read back from the file.
    OnDisk(u64),
}

struct Frontier {
    hasher: Hasher,
    hashed: u64,
    read_back: u64,
    /// Blocks announced and not yet hashed, by offset.
    pieces: BTreeMap<u64, Block>,
    frontier: Arc<Published>,
    latest: Arc<Mutex<Checkpoint>>,
    file: Arc<File>,
    size: u64,
    buffer: Vec<u8>,
}

impl Frontier {
    fn run(mut self, rx: mpsc::Receiver<Piece>) -> std::io::Result<Hashed> {
        loop {
            self.advance()?;
            if self.hashed == self.size {
                return Ok(self.finish(true));
            }
            let Ok(piece) = rx.recv() else {
                return Ok(self.finish(false));
            };
            self.accept(piece);
            while let Ok(piece) = rx.try_recv() {
                self.accept(piece);
            }
        }
    }

    fn accept(&mut self, piece: Piece) {
        let block = match piece.parts {
            Some(parts) => Block::Lent(parts),
            None => Block::OnDisk(piece.len),
        };
        self.pieces.insert(piece.offset, block);
    }

    /// Hashes every block that continues the hashed prefix, then publishes the new frontier.
    fn advance(&mut self) -> std::io::Result<()> {
        let before = self.hashed;
        while let Some(entry) = self.pieces.first_entry() {
            let offset = *entry.key();
            debug_assert!(
                offset >= self.hashed,
                "blocks never overlap the hashed prefix"
            );
            if offset != self.hashed {
                break;
            }
            match entry.remove() {
                Block::Lent(parts) => {
                    for part in parts {
                        self.hasher.update(&part);
                        self.hashed += part.len() as u64;
                    }
                }
                Block::OnDisk(len) => self.read_back(len)?,
            }
        }
        if self.hashed != before {
            let checkpoint = Checkpoint {
                hashed: self.hashed,
                hasher: self.hasher.clone(),
            };
            *self.latest.lock().expect("checkpoint lock") = checkpoint;
            self.frontier.set(self.hashed);
        }
        Ok(())
    }

    /// Hashes the next `len` bytes from the file, a bounded buffer at a time.
    fn read_back(&mut self, len: u64) -> std::io::Result<()> {
        let end = self.hashed + len;
        while self.hashed < end {
            let step = (end - self.hashed).min(READ_BACK_BLOCK) as usize;
            self.buffer.resize(step, 0);
            self.file.read_exact_at(&mut self.buffer, self.hashed)?;
            self.hasher.update(&self.buffer);
            self.hashed += step as u64;
            self.read_back += step as u64;
            // Writers waiting on the frontier go on a block at a time, not after all of `len`.
            self.frontier.set(self.hashed);
        }
        Ok(())
    }

    fn finish(self, complete: bool) -> Hashed {
        let digest = complete.then(|| self.hasher.finish());
        Hashed {
            digest,
            hashed: self.hashed,
            read_back: self.read_back,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::plan::RangePlan;
    use proptest::prelude::*;
    use std::time::Duration;

    fn one_shot(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// Writes `data` range by range in `order`, each range in pieces of `piece` bytes, telling
    /// the hasher as a writer would, and returns what it computed.
    fn hash_out_of_order(
        data: &[u8],
        chunk: u64,
        order: &[usize],
        piece: usize,
        window: u64,
    ) -> Hashed {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let plan = RangePlan::new(data.len() as u64, chunk, 1);
        let start = Checkpoint::start(Algorithm::Sha256);
        let (feed, done) = spawn(start, file.clone(), plan.size(), window);
        for &index in order {
            let range = plan.range(index);
            for start in (range.start..range.end).step_by(piece) {
                let end = (start + piece as u64).min(range.end);
                let bytes = Bytes::copy_from_slice(&data[start as usize..end as usize]);
                file.write_all_at(&bytes, start).unwrap();
                feed.written(start, vec![bytes]);
            }
        }
        drop(feed);
        done.blocking_recv().unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_writer_too_far_ahead_waits_for_the_hasher_until_it_moves_or_stops() {
        let data = pseudo(4096);
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.write_all_at(&data, 0).unwrap();
        let (feed, done) = spawn(Checkpoint::start(Algorithm::Sha256), file, 4096, 0);
        // Everything but the first 1,024 bytes is in: the hasher cannot move.
        feed.on_disk(1024, 3072);
        let waiting = feed.within(4096, 1024);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(100), &mut waiting).await;
        assert!(early.is_err(), "let go before the frontier moved");
        // The prefix lands, the hasher hashes all of it, and the writer is let go.
        feed.on_disk(0, 1024);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("let go once the frontier moved");
        let hashed = done.await.unwrap().unwrap();
        assert_eq!(hashed.digest, Some(one_shot(Algorithm::Sha256, &data)));
        // The hasher has stopped: nobody waits on it any more, however far ahead.
        tokio::time::timeout(Duration::from_secs(10), feed.within(u64::MAX, 0))
            .await
            .expect("let go once the hasher stopped");
    }

    fn pseudo(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_arrival_order_gives_the_one_shot_digest(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunk in 1u64..4_000,
            piece in 1usize..1_500,
            window in prop_oneof![Just(0u64), 1u64..5_000, Just(u64::MAX)],
            seed in any::<u64>(),
        ) {
            let ranges = RangePlan::new(data.len() as u64, chunk, 1).len();
            let mut order: Vec<usize> = (0..ranges).collect();
            // A seeded Fisher-Yates shuffle, so that proptest can shrink a failing order.
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let hashed = hash_out_of_order(&data, chunk, &order, piece, window);
            prop_assert_eq!(hashed.digest, Some(one_shot(Algorithm::Sha256, &data)));
            prop_assert_eq!(hashed.hashed, data.len() as u64);
            if window == 0 {
                prop_assert_eq!(hashed.read_back, data.len() as u64);
            }
        }
    }

    #[test]
    fn in_order_arrival_within_the_window_reads_nothing_back() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let order: Vec<usize> = (0..10).collect();
        let hashed = hash_out_of_order(&data, 10_000, &order, 4096, 1 << 20);
        assert_eq!(hashed.read_back, 0);
        assert_eq!(hashed.digest, Some(one_shot(Algorithm::Sha256, &data)));
    }

    #[test]
    fn stops_without_a_digest_when_writers_stop_early() {
        let data = vec![7u8; 10_000];
        let hashed = hash_out_of_order(&data, 1_000, &[0, 1, 3], 500, 1 << 20);
        assert_eq!(hashed.digest, None);
        assert_eq!(hashed.hashed, 2_000);
    }

    #[test]
    fn a_restored_checkpoint_continues_the_same_hash() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let mut first = Hasher::new(algorithm);
            first.update(&data[..123_457]);
            let mut resumed = Hasher::from_state(algorithm, &first.state()).unwrap();
            resumed.update(&data[123_457..]);
            assert_eq!(resumed.finish(), one_shot(algorithm, &data));
        }
        assert!(Hasher::from_state(Algorithm::Sha256, b"short").is_none());
        let sha512 = Hasher::new(Algorithm::Sha512).state();
        assert!(Hasher::from_state(Algorithm::Sha256, &sha512).is_none());
    }

    #[test]
    fn a_hasher_started_from_a_checkpoint_reads_back_only_what_follows_it() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 13) as u8).collect();
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.write_all_at(&data, 0).unwrap();
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(&data[..20_000]);
        let start = Checkpoint {
            hashed: 20_000,
            hasher,
        };
        let (feed, done) = spawn(start, file, data.len() as u64, 1 << 20);
        feed.on_disk(20_000, 30_000);
        let hashed = done.blocking_recv().unwrap().unwrap();
        assert_eq!(hashed.digest, Some(one_shot(Algorithm::Sha256, &data)));
        assert_eq!(hashed.read_back, 30_000);
        drop(feed);
    }

    #[test]
    fn sha512_is_supported() {
        let d = one_shot(Algorithm::Sha512, b"abc");
        assert!(d.hex().starts_with("ddaf35a193617aba"));
        assert_eq!(d.algorithm(), Algorithm::Sha512);
    }
}
