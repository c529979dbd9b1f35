//! Range planning and the record of what is on disk.
//!
//! # Design
//!
//! An object of `size` bytes is cut into ranges of `chunk` bytes, except its tail, which is cut
//! finer and finer: the range claimed when `rest` bytes remain is `rest / (2 × connections)`
//! long, at most `chunk` and at least [`min_range`] of it. Ranges are claimed in order, so the
//! connections of a transfer are all in their last, small ranges together near the end: they
//! finish at nearly the same time, and the ordered hasher, whose frontier waits for the oldest
//! range in flight, has at most `connections` small ranges left to hash when the last byte lands.
//! With uniform ranges it would have up to `connections - 1` whole chunks (496 MiB with 32
//! connections of 16 MiB), and an object no larger than `connections × chunk` would not be
//! hashed at all until every range was in. Only the last `2 × connections × chunk` bytes are
//! cut finer, so a large object costs a few dozen more requests, and a plan of one connection
//! is uniform.
//!
//! Each range is written front to back by one connection at a time, so what is written of a
//! range is always a prefix of it: one counter per range describes the whole file, and a retry
//! of a range starts where its counter stands. A plan is a pure function of its size, chunk and
//! connections, which the resume journal records so that a resumed transfer cuts the same one.
//!
//! Rejected: choosing one smaller chunk for the whole object (every range pays a request's
//! latency, which on an object store is tens of milliseconds), and splitting a range that is
//! already in flight (the written prefix of a range would no longer be one counter).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ranges of the tail are cut at multiples of this, so that writes stay page-aligned.
const ALIGN: u64 = 64 << 10;

/// The smallest range of a tail, against the chunk size: a sixteenth of it, at least 1 MiB,
/// and never more than the chunk itself.
pub fn min_range(chunk: u64) -> u64 {
    (chunk / 16).max(1 << 20).min(chunk)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePlan {
    size: u64,
    chunk: u64,
    connections: u32,
    /// Ranges of exactly `chunk` bytes from the start.
    body: u64,
    /// The ends of the ranges after the body, each shorter than `chunk` or the last.
    tail: Arc<[u64]>,
}

impl RangePlan {
    /// The plan of `size` bytes in ranges of `chunk` bytes for `connections` connections;
    /// `chunk` must not be zero.
    pub fn new(size: u64, chunk: u64, connections: u32) -> Self {
        assert!(chunk > 0, "a range plan needs a non-zero chunk size");
        let connections = connections.max(1);
        let (body, tail) = match connections {
            1 => (
                size / chunk,
                (!size.is_multiple_of(chunk))
                    .then_some(size)
                    .into_iter()
                    .collect(),
            ),
            _ => {
                // The body ends where fewer than `share` chunks remain.
                let share = 2 * u64::from(connections);
                let body = size.saturating_sub(share * chunk) / chunk;
                (body, taper(body * chunk, size, chunk, share))
            }
        };
        RangePlan {
            size,
            chunk,
            connections,
            body,
            tail,
        }
    }

    /// One range covering the whole object (for origins that ignore `Range`).
    pub fn whole(size: u64) -> Self {
        RangePlan::new(size, size.max(1), 1)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    pub fn connections(&self) -> u32 {
        self.connections
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.body).expect("range count fits in usize") + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn range(&self, index: usize) -> Range<u64> {
        let index = index as u64;
        if index < self.body {
            let start = index * self.chunk;
            return start..start + self.chunk;
        }
        let i = usize::try_from(index - self.body).expect("tail index fits in usize");
        let start = match i {
            0 => self.body * self.chunk,
            _ => self.tail[i - 1],
        };
        start..self.tail[i]
    }
}

/// The ends of the ranges that cut `start..size` finer and finer: `rest / share` each, within
/// [`min_range`] and `chunk`, and no sliver shorter than the smallest range after the last.
fn taper(mut start: u64, size: u64, chunk: u64, share: u64) -> Arc<[u64]> {
    let min = min_range(chunk);
    let mut ends = Vec::new();
    while start < size {
        let rest = size - start;
        let len = rest
            .div_ceil(share)
            .next_multiple_of(ALIGN)
            .clamp(min, chunk);
        // No sliver after it: a last range shorter than the smallest joins this one.
        start += if len >= rest || (rest - len < min && rest <= chunk) {
            rest
        } else {
            len
        };
        ends.push(start);
    }
    ends.into()
}

/// How much of each range is written to the ingest file.
#[derive(Debug)]
pub struct Progress {
    plan: RangePlan,
    written: Vec<AtomicU64>,
}

impl Progress {
    pub fn new(plan: RangePlan) -> Self {
        let written = (0..plan.len()).map(|_| AtomicU64::new(0)).collect();
        Progress { plan, written }
    }

    pub fn plan(&self) -> &RangePlan {
        &self.plan
    }

    /// Bytes of range `index` already on disk, from its start.
    pub fn written(&self, index: usize) -> u64 {
        self.written[index].load(Ordering::Acquire)
    }

    /// The written prefix of every range.
    pub fn snapshot(&self) -> Vec<u64> {
        self.written
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Bytes written over all ranges.
    pub fn total(&self) -> u64 {
        self.written.iter().map(|w| w.load(Ordering::Acquire)).sum()
    }

    /// Records `len` more bytes of range `index` as written. Call only after the write returned.
    pub fn record(&self, index: usize, len: u64) {
        let before = self.written[index].fetch_add(len, Ordering::AcqRel);
        let range = self.plan.range(index);
        debug_assert!(
            range.start + before + len <= range.end,
            "range {index} overfilled"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_tile_the_object(
            size in 0u64..1 << 34,
            chunk in (1u64..1 << 26).prop_map(|c| c.max(1)),
            connections in 1u32..=64,
        ) {
            let plan = RangePlan::new(size, chunk, connections);
            let mut next = 0;
            for i in 0..plan.len() {
                let r = plan.range(i);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start && r.end - r.start <= chunk);
                // Only the last range may be shorter than the smallest.
                prop_assert!(r.end - r.start >= min_range(chunk) || r.end == size);
                next = r.end;
            }
            prop_assert_eq!(next, size);
            prop_assert_eq!(plan.is_empty(), size == 0);
            // The tail is bounded whatever the size: the plan's memory does not grow with it.
            prop_assert!(plan.tail.len() as u64 <= 2 * u64::from(connections) * 16 + 2 * 64);
            prop_assert_eq!(&RangePlan::new(size, chunk, connections), &plan);
        }
    }

    #[test]
    fn one_connection_cuts_uniform_chunks() {
        let plan = RangePlan::new(10 * 100 + 7, 100, 1);
        assert_eq!(plan.len(), 11);
        assert_eq!(plan.range(3), 300..400);
        assert_eq!(plan.range(10), 1000..1007);
    }

    #[test]
    fn the_tail_of_many_connections_is_cut_finer_towards_the_end() {
        const MIB: u64 = 1 << 20;
        // 512 MiB for 32 connections of 16 MiB: no range of a whole chunk, ranges shrink to
        // 1 MiB, and the last 32 ranges together are far less than 31 chunks (496 MiB).
        let plan = RangePlan::new(512 * MIB, 16 * MIB, 32);
        let lens: Vec<u64> = (0..plan.len())
            .map(|i| plan.range(i).end - plan.range(i).start)
            .collect();
        let before_last = &lens[..lens.len() - 1];
        assert!(before_last.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
        assert_eq!(lens[0], 8 * MIB);
        let last = *lens.last().unwrap();
        assert!((MIB..2 * MIB).contains(&last), "{last}");
        let last_round: u64 = lens.iter().rev().take(32).sum();
        assert!(last_round < 36 * MIB, "{last_round}");
        assert!(plan.len() < 300, "{}", plan.len());
        // 100 GiB with 8 connections: all whole chunks but the last 256 MiB.
        let plan = RangePlan::new(100 << 30, 16 * MIB, 8);
        assert_eq!(plan.body, ((100 << 30) - 256 * MIB) / (16 * MIB));
        assert!(plan.tail.len() < 80, "{}", plan.tail.len());
    }

    #[test]
    fn the_whole_plan_is_one_range() {
        assert_eq!(RangePlan::whole(10).len(), 1);
        assert_eq!(RangePlan::whole(10).range(0), 0..10);
        assert_eq!(RangePlan::whole(0).len(), 0);
    }
}
