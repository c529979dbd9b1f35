//! The response headers the web sources read from an origin: `Content-Range` and `Retry-After`.
//! Each input is given to both parsers as a header value.
//!
//! - `Content-Range`: an accepted value has `first <= last < total` (where given), and its
//!   canonical form `bytes first-last/total` reads back as the same range.
//! - `Retry-After`: delay-seconds are taken exactly; anything else accepted is an HTTP-date and
//!   its delay is no longer than that date is away; whatever the origin asks, the transfer
//!   engine waits at least what it asked (up to its cap) and never more than five minutes.
//!
//! The control client's own copy of the `Retry-After` parser (control-client/src/http.rs) is
//! private to that crate and has no fuzzing doorway; see README.md.

#![no_main]

use std::time::{Duration, SystemTime};

use blobstage::fuzzing::{self, ContentRangeParts};
use blobstage::redact::Redacted;
use blobstage::source::{SourceError, parse_retry_after};
use blobstage::transfer::retry::Retry;
use libfuzzer_sys::fuzz_target;

/// The longest wait the engine's retry policy allows (its `Retry-After` cap).
const LONGEST_WAIT: Duration = Duration::from_secs(300);

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    check_content_range(value);
    check_retry_after(value);
});

fn check_content_range(value: &str) {
    let Some(range) = fuzzing::parse_content_range_value(value) else {
        return;
    };
    if let Some((first, last)) = range.span {
        assert!(first <= last, "{value:?}");
        assert!(range.total.is_none_or(|total| last < total), "{value:?}");
    }
    let canonical = canonical(range);
    let back = fuzzing::parse_content_range_value(&canonical);
    assert_eq!(back, Some(range), "{value:?} written as {canonical:?}");
}

fn canonical(range: ContentRangeParts) -> String {
    let span = match range.span {
        Some((first, last)) => format!("{first}-{last}"),
        None => "*".into(),
    };
    let total = range.total.map_or("*".into(), |total| total.to_string());
    format!("bytes {span}/{total}")
}

fn check_retry_after(value: &str) {
    let before = SystemTime::now();
    let parsed = parse_retry_after(value);
    let trimmed = value.trim();
    let digits = !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit());
    match (parsed, trimmed.parse::<u64>()) {
        (_, Ok(seconds)) if digits => assert_eq!(parsed, Some(Duration::from_secs(seconds))),
        (Some(delay), _) if !digits => assert_within_date(trimmed, delay, before),
        _ => {}
    }
    assert_engine_waits(parsed);
}

/// A delay that is not delay-seconds comes from an HTTP-date at least that far away.
fn assert_within_date(trimmed: &str, delay: Duration, before: SystemTime) {
    let sign = trimmed.starts_with('+') && trimmed[1..].bytes().all(|b| b.is_ascii_digit());
    if sign {
        // u64's own parser takes a leading `+`; the delay is still the number written.
        return;
    }
    let at = httpdate::parse_http_date(trimmed).expect("a delay from neither seconds nor a date");
    let furthest = at.duration_since(before).unwrap_or_default();
    assert!(delay <= furthest, "{trimmed:?}: {delay:?} > {furthest:?}");
}

fn assert_engine_waits(asked: Option<Duration>) {
    let error = SourceError::Status {
        uri: Redacted::uri("https://origin.example/blob"),
        status: 503,
        retry_after: asked,
    };
    let delay = Retry::new(2).next_delay(&error).expect("a 503 is retried");
    assert!(delay <= LONGEST_WAIT, "waits {delay:?}");
    let floor = asked.unwrap_or_default().min(LONGEST_WAIT);
    assert!(delay >= floor, "waits {delay:?}, asked {asked:?}");
}
