//! Where log lines go and how they look: `[log] format` (or `BLOBSTAGE_LOG_FORMAT`), filtered
//! by `BLOBSTAGE_LOG`.
//!
//! `text` is for people: one line an event, colours on a terminal. `json` is one object a line
//! with the event's fields at the top level and the spans it happened in (`spans`: the API
//! request with its `request` id, the pull with its `pull` id and artifact). `journald` sends
//! each event to the journal with its fields as journal fields (`BLOBSTAGE_PULL=p-...`,
//! `PRIORITY` from the level), so `journalctl BLOBSTAGE_PULL=p-...` finds one pull's lines.
//! `auto`, the default, is `journald` when stderr is the journal's stream (systemd says so in
//! `JOURNAL_STREAM`), else `text`. Nothing here logs a secret: what is logged is decided where
//! it is logged, and URIs are redacted there.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The prefix of blobstage's own journal fields.
const JOURNAL_PREFIX: &str = "BLOBSTAGE";

/// Starts logging to stderr (or the journal), filtered by `BLOBSTAGE_LOG`, else `default`.
pub fn init(default: &str, format: LogFormat) {
    let filter =
        || EnvFilter::try_from_env("BLOBSTAGE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        chosen => chosen,
    };
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Journald => match journald() {
            Ok(layer) => tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .init(),
            Err(e) => {
                text(filter());
                tracing::warn!(error = %e, "the journal cannot be reached; logging text to stderr");
            }
        },
        LogFormat::Auto | LogFormat::Text => text(filter()),
    }
}

fn text(filter: EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

// Limitation: no test machine runs journald, so no test reads what this layer sends; the choice
// of it (`JOURNAL_STREAM` naming stderr) is tested, and its fallback to text.
fn journald() -> std::io::Result<tracing_journald::Layer> {
    let layer = tracing_journald::layer()?
        .with_syslog_identifier("blobstage".into())
        .with_field_prefix(Some(JOURNAL_PREFIX.into()));
    Ok(layer)
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// `device:inode`, and a child that inherits the variable but not the stream must not believe it.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    names_stream(&stream.to_string_lossy(), stderr.dev(), stderr.ino())
}

/// `JOURNAL_STREAM`'s `device:inode` against a file's.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_stderr() {
        assert!(names_stream("64769:123456", 64769, 123456));
        assert!(!names_stream("64769:123456", 64769, 123457));
        assert!(!names_stream("garbage", 64769, 123456));
        assert!(!names_stream("", 0, 0));
    }
}
