//! The resume journal, read from the bytes of its file as a restarted transfer reads it.
//!
//! Each input is read twice: as the whole file, and as the file's JSON line under a correct
//! checksum line (the format, from journal.rs: the SHA-256 hex of the second line, a newline,
//! the second line), so that the fuzzer reaches past the checksum. A journal that reads is of
//! this build's formats, and written back it reads as the same journal. When it passes its own
//! check (the transfer it describes, with a chunk size a configuration allows), the resume it
//! restores claims no more bytes than the object has.

#![no_main]

use blobstage::fuzzing;
use blobstage::transfer::Resume;
use blobstage::transfer::journal::{FORMAT, HASH_STATE_FORMAT, Journal};
use blobstage::transfer::plan::RangePlan;
use control_client::Digest;
use libfuzzer_sys::fuzz_target;
use sha2::Digest as _;

/// The chunk sizes a configuration allows (`[transfer] chunk_size`).
const CHUNK_SIZES: std::ops::RangeInclusive<u64> = 64 << 10..=1 << 30;
/// The connections a configuration allows (`[transfer] connections_per_blob`).
const CONNECTIONS: std::ops::RangeInclusive<u32> = 1..=64;

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&framed(data));
});

/// `body` under its checksum line.
fn framed(body: &[u8]) -> Vec<u8> {
    let sum = sha2::Sha256::digest(body);
    let mut text: Vec<u8> = sum
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    text.push(b'\n');
    text.extend_from_slice(body);
    text
}

fn check(text: &[u8]) {
    let Ok(journal) = fuzzing::decode_journal(text) else {
        return;
    };
    assert_eq!(journal.format, FORMAT);
    assert_eq!(journal.hash_state_format, HASH_STATE_FORMAT);
    let written = fuzzing::encode_journal(&journal);
    assert_eq!(fuzzing::decode_journal(&written).as_ref(), Ok(&journal));
    check_resume(&journal);
}

fn check_resume(journal: &Journal) {
    let Ok(digest) = journal.digest.parse::<Digest>() else {
        return;
    };
    if !CHUNK_SIZES.contains(&journal.chunk_size) || !CONNECTIONS.contains(&journal.plan_connections)
    {
        return;
    }
    // The plan a resumed transfer would cut; its memory does not grow with the size.
    let plan = RangePlan::new(journal.size, journal.chunk_size, journal.plan_connections);
    let validator = journal.validator.as_ref();
    if journal.check(&digest, &plan, validator).is_err() {
        return;
    }
    let Some(resume) = Resume::from_journal(journal, digest.algorithm()) else {
        return;
    };
    assert!(
        resume.bytes() <= journal.size,
        "resumes {} of {}",
        resume.bytes(),
        journal.size
    );
    assert!(journal.hashed <= journal.size);
}
