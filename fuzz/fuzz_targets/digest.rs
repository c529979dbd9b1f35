//! Digests as registrations declare them (`control_client::Digest`), from text and from JSON.
//!
//! A digest that parses is the text it was parsed from (its `Display` round-trips exactly), its
//! hex has the algorithm's length, rebuilding it from the hash bytes gives the same digest, and
//! its JSON form reads back as itself. A JSON string holding a digest reads as the same digest
//! as its text.

#![no_main]

use control_client::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_text(text);
    }
    check_json(data);
});

fn check_text(text: &str) {
    let Ok(digest) = text.parse::<Digest>() else {
        return;
    };
    assert_eq!(
        digest.to_string(),
        text,
        "Display must give back the parsed text"
    );
    assert_eq!(digest.hex().len(), digest.algorithm().hex_len());

    let bytes = decode_hex(digest.hex()).expect("a parsed digest's hex decodes");
    assert_eq!(Digest::from_bytes(digest.algorithm(), &bytes), digest);

    let json = serde_json::to_string(&digest).expect("a digest serialises");
    let back: Digest = serde_json::from_str(&json).expect("a serialised digest reads back");
    assert_eq!(back, digest);
}

fn check_json(data: &[u8]) {
    let Ok(digest) = serde_json::from_slice::<Digest>(data) else {
        return;
    };
    let text: String = serde_json::from_slice(data).expect("a JSON digest is a JSON string");
    assert_eq!(text.parse::<Digest>().as_ref(), Ok(&digest));
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let pairs = hex.as_bytes().chunks(2);
    pairs
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}
