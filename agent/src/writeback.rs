//! Write-behind: the kernel is asked to start writing what a transfer wrote to disk early.
//!
//! Without it, a transfer at disk speed leaves hundreds of megabytes dirty in the page cache
//! until a checkpoint's `fdatasync` writes them all at once; while that runs, writing goes on,
//! and what was written meanwhile is not covered by the checkpoint, so a kill fetches it again.
//! Started early, writeback runs beside the transfer, and a checkpoint's `fdatasync` has only
//! the last blocks left to wait for. The pages stay in the page cache, where the hasher reads
//! them back. This is `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which neither waits for the
//! disk nor makes anything durable: durability is still the checkpoint's `fdatasync` and the
//! publish's `fsync`.
//!
//! Its effect is measured, not tested: `benches/resume.sh` counts the bytes a kill costs.
//! It is the crate's one `unsafe` call: neither rustix nor the standard library offers a safe
//! wrapper for `sync_file_range`, and adding a crate for one call is not worth it.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts writing every dirty page of `file` to disk, without waiting. Advisory: a failure (a
/// file system that has nothing to write back) changes nothing, so none is reported.
pub(crate) fn start(file: &File) {
    // SAFETY: sync_file_range takes plain integers and touches no memory of this process; the
    // descriptor belongs to `file`, which is borrowed, so it stays open for the call. Offset 0
    // and length 0 name the whole file.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}
