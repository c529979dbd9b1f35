//! Range planning and the record of what is on disk.
//!
//! An object of `size` bytes is cut into ranges of `chunk` bytes (the last one shorter). Each
//! range is written front to back by one connection at a time, so what is written of a range is
//! always a prefix of it: one counter per range describes the whole file, and a retry of a range
//! starts where its counter stands.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangePlan {
    size: u64,
    chunk: u64,
}

impl RangePlan {
    /// Ranges of `chunk` bytes; `chunk` must not be zero.
    pub fn new(size: u64, chunk: u64) -> Self {
        assert!(chunk > 0, "a range plan needs a non-zero chunk size");
        RangePlan { size, chunk }
    }

    /// One range covering the whole object (for origins that ignore `Range`).
    pub fn whole(size: u64) -> Self {
        RangePlan::new(size, size.max(1))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.size.div_ceil(self.chunk)).expect("range count fits in usize")
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn range(&self, index: usize) -> Range<u64> {
        let start = index as u64 * self.chunk;
        debug_assert!(start < self.size, "range {index} is past the end");
        start..(start + self.chunk).min(self.size)
    }

    /// The range holding byte `offset`.
    pub fn index_of(&self, offset: u64) -> usize {
        usize::try_from(offset / self.chunk).expect("range index fits in usize")
    }
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
        fn ranges_tile_the_object(size in 0u64..1 << 24, chunk in 1u64..1 << 20) {
            let plan = RangePlan::new(size, chunk);
            let mut next = 0;
            for i in 0..plan.len() {
                let r = plan.range(i);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start && r.end - r.start <= chunk);
                prop_assert_eq!(plan.index_of(r.start), i);
                prop_assert_eq!(plan.index_of(r.end - 1), i);
                next = r.end;
            }
            prop_assert_eq!(next, size);
            prop_assert_eq!(plan.is_empty(), size == 0);
        }
    }

    #[test]
    fn the_whole_plan_is_one_range() {
        assert_eq!(RangePlan::whole(10).len(), 1);
        assert_eq!(RangePlan::whole(10).range(0), 0..10);
        assert_eq!(RangePlan::whole(0).len(), 0);
    }
}
