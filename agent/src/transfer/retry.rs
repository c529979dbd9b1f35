//! When to try a failed request again, and how long to wait first.
//!
//! One policy for every request a transfer makes (the first probe, each range, the single
//! stream): exponential backoff from 200 ms to 30 s with jitter, never shorter than a
//! `Retry-After` the origin sent (capped at five minutes), for at most `max_attempts` attempts,
//! and only for errors that may go away (5xx, 429, 408, connection errors, stalls, short bodies).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::source::SourceError;

/// Why a request is tried again, as the `reason` label of the retries metric shows it: a closed
/// set, `other` last for whatever a new source's errors do not fit.
pub const REASONS: [&str; 7] = [
    "server_error",
    "throttled",
    "timeout",
    "connection",
    "truncated",
    "credentials",
    "other",
];

/// The reason, one of [`REASONS`], that a retryable `error` is tried again.
pub fn reason(error: &SourceError) -> &'static str {
    match error {
        SourceError::Status { status: 429, .. } => "throttled",
        SourceError::Status { status: 408, .. } => "timeout",
        SourceError::Status { .. } => "server_error",
        SourceError::Transport { source, .. } if source.is_timeout() => "timeout",
        SourceError::Transport { .. } => "connection",
        SourceError::Truncated { .. } => "truncated",
        SourceError::Credentials(_) => "credentials",
        _ => "other",
    }
}

/// The longest `Retry-After` honoured; an origin asking for more gets this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The retry state of one request.
#[derive(Debug)]
pub struct Retry {
    delays: ExponentialBackoff,
    attempt: u32,
    max_attempts: u32,
}

impl Retry {
    pub fn new(max_attempts: u32) -> Self {
        let delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build();
        Retry {
            delays,
            attempt: 1,
            max_attempts,
        }
    }

    /// The attempt under way, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// After attempt `attempt()` failed with `error`: how long to wait before the next one, or
    /// `None` to give up.
    pub fn next_delay(&mut self, error: &SourceError) -> Option<Duration> {
        if !error.is_retryable() || self.attempt >= self.max_attempts {
            return None;
        }
        self.attempt += 1;
        let backoff = self.delays.next().unwrap_or(Duration::from_secs(30));
        let asked = error.retry_after().unwrap_or_default().min(MAX_RETRY_AFTER);
        Some(backoff.max(asked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Redacted;

    fn status(code: u16, retry_after: Option<Duration>) -> SourceError {
        SourceError::Status {
            uri: Redacted::uri("https://h.example/x"),
            status: code,
            retry_after,
        }
    }

    #[test]
    fn gives_up_after_max_attempts_and_on_permanent_errors() {
        let mut retry = Retry::new(3);
        assert!(retry.next_delay(&status(503, None)).is_some());
        assert!(retry.next_delay(&status(503, None)).is_some());
        assert_eq!(retry.attempt(), 3);
        assert!(retry.next_delay(&status(503, None)).is_none());
        assert!(Retry::new(5).next_delay(&status(404, None)).is_none());
        assert!(Retry::new(1).next_delay(&status(503, None)).is_none());
    }

    #[test]
    fn waits_at_least_what_retry_after_asks_within_the_cap() {
        let mut retry = Retry::new(10);
        let delay = retry
            .next_delay(&status(429, Some(Duration::from_secs(7))))
            .unwrap();
        assert!(delay >= Duration::from_secs(7));
        let capped = retry
            .next_delay(&status(503, Some(Duration::from_secs(86_400))))
            .unwrap();
        assert!(capped <= MAX_RETRY_AFTER.max(Duration::from_secs(30)));
    }

    #[test]
    fn every_reason_is_in_the_closed_set() {
        let truncated = SourceError::Truncated {
            uri: Redacted::uri("https://h.example/x"),
            expected: 2,
            got: 1,
        };
        for error in [
            status(503, None),
            status(429, None),
            status(408, None),
            truncated,
        ] {
            assert!(REASONS.contains(&reason(&error)), "{error}");
        }
        assert_eq!(reason(&status(429, None)), "throttled");
        assert_eq!(reason(&status(502, None)), "server_error");
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let mut retry = Retry::new(u32::MAX);
        let delays: Vec<_> = (0..12)
            .map(|_| retry.next_delay(&status(500, None)).unwrap())
            .collect();
        assert!(delays[0] >= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(delays[8] > delays[0]);
    }
}
