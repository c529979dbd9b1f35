//! Garbage collection: which blobs to evict when the store is over its size budget.
//!
//! Least recently used first: a blob's modification time is its last use (the store sets it
//! when the blob is staged or handed out again). Leased blobs are never evicted; nor is
//! anything else the caller protects. Eviction stops as soon as the store is at or below the
//! low watermark, so a collection frees no more than it must.

use std::collections::HashSet;
use std::time::SystemTime;

use control_client::Digest;

/// One blob as garbage collection sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub digest: Digest,
    pub size: u64,
    pub last_used: SystemTime,
}

/// The blobs to evict, oldest use first, to bring the store down to `low` bytes.
pub fn plan(mut blobs: Vec<Candidate>, protected: &HashSet<Digest>, low: u64) -> Vec<Candidate> {
    let mut total: u64 = blobs.iter().map(|b| b.size).sum();
    blobs.sort_by_key(|b| b.last_used);
    let mut evict = Vec::new();
    for blob in blobs {
        if total <= low {
            break;
        }
        if protected.contains(&blob.digest) {
            continue;
        }
        total -= blob.size;
        evict.push(blob);
    }
    evict
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_client::Algorithm;
    use proptest::prelude::*;
    use std::time::Duration;

    fn candidate(i: u8, size: u64, age: u64) -> Candidate {
        Candidate {
            digest: Digest::from_bytes(Algorithm::Sha256, &[i; 32]),
            size,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age),
        }
    }

    proptest! {
        #[test]
        fn evicts_least_recently_used_unprotected_until_low(
            blobs in proptest::collection::vec((1u64..1000, 0u64..1000, any::<bool>()), 0..30),
            low in 0u64..20_000,
        ) {
            let candidates: Vec<_> = blobs.iter().enumerate()
                .map(|(i, (size, age, _))| candidate(i as u8, *size, *age)).collect();
            let protected: HashSet<_> = blobs.iter().enumerate()
                .filter(|(_, (_, _, p))| *p).map(|(i, _)| candidate(i as u8, 0, 0).digest).collect();
            let evicted = plan(candidates.clone(), &protected, low);

            let total: u64 = candidates.iter().map(|c| c.size).sum();
            let freed: u64 = evicted.iter().map(|c| c.size).sum();
            prop_assert!(evicted.iter().all(|c| !protected.contains(&c.digest)));
            let evictable = candidates.iter().filter(|c| !protected.contains(&c.digest));
            let evictable_bytes: u64 = evictable.map(|c| c.size).sum();
            // Down to low, unless only protected blobs are left above it.
            prop_assert!(total - freed <= low || freed == evictable_bytes);
            // Not a byte more than needed: without the last eviction, the store was above low.
            if let Some(last) = evicted.last() {
                prop_assert!(total - freed + last.size > low);
            }
            // Oldest use first among what is evicted, and nothing unprotected older is kept.
            for pair in evicted.windows(2) {
                prop_assert!(pair[0].last_used <= pair[1].last_used);
            }
            if let Some(newest) = evicted.iter().map(|c| c.last_used).max() {
                let kept_older = candidates.iter().filter(|c| !protected.contains(&c.digest))
                    .filter(|c| !evicted.iter().any(|e| e.digest == c.digest))
                    .any(|c| c.last_used < newest);
                prop_assert!(!kept_older);
            }
        }
    }
}
