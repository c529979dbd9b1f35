//! The configuration: TOML text and `BLOBSTAGE_*` environment overrides to a validated Config.
//!
//! An input is the file's text, then, after each NUL byte, one environment variable
//! `NAME=value` (NUL can be in neither). A configuration that loads (from
//! `/etc/blobstage/config.toml`):
//! - holds what the rest of the agent relies on: a chunk size of 64KiB to 1GiB, 1 to 64
//!   connections per blob within the total, at least one attempt and one transfer, timeouts
//!   above zero, a low watermark at most the high one, a usable Hub endpoint;
//! - has every path absolute (relative ones resolved against the file's directory);
//! - writes each of its sizes in a form that reads back as the same size;
//! - still loads with one more override, `BLOBSTAGE_TRANSFER_MAX_ATTEMPTS=7`, which wins.

#![no_main]

use std::path::{Path, PathBuf};
use std::time::Duration;

use blobstage::config::{ByteSize, Config};
use libfuzzer_sys::fuzz_target;

/// Environment variables read per input, at most.
const MAX_VARS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts.take(MAX_VARS).map(variable).collect();
    let path = Path::new("/etc/blobstage/config.toml");
    let Ok(config) = Config::from_toml(toml, path, env.clone()) else {
        return;
    };
    assert_usable(&config);
    assert_paths_absolute(&config);
    assert_sizes_round_trip(&config);

    let mut overridden = env;
    overridden.push(("BLOBSTAGE_TRANSFER_MAX_ATTEMPTS".into(), "7".into()));
    let again = Config::from_toml(toml, path, overridden).expect("loads with max_attempts = 7");
    assert_eq!(again.transfer.max_attempts, 7);
});

/// `NAME=value`; a part without `=` is a variable set to the empty string.
fn variable(part: &str) -> (String, String) {
    let (name, value) = part.split_once('=').unwrap_or((part, ""));
    (name.to_owned(), value.to_owned())
}

fn assert_usable(config: &Config) {
    let t = &config.transfer;
    assert!(
        (64 << 10..=1 << 30).contains(&t.chunk_size.0),
        "{:?}",
        t.chunk_size
    );
    assert!((1..=64).contains(&t.connections_per_blob));
    assert!(t.max_connections >= t.connections_per_blob);
    assert!(t.max_attempts >= 1 && t.max_transfers >= 1);
    let timeouts = [
        t.read_timeout,
        t.connect_timeout,
        config.control_plane.timeout,
    ];
    assert!(!timeouts.contains(&Duration::ZERO));
    let store = &config.store;
    if let Some(high) = store.high_watermark {
        assert!(store.low_watermark.is_some_and(|low| low <= high));
    }
    assert!(config.sources.huggingface.endpoint_url().is_ok());
}

fn assert_paths_absolute(config: &Config) {
    let cp = &config.control_plane;
    let paths: [Option<&PathBuf>; 8] = [
        Some(&config.state_dir),
        Some(&config.sources.artifact_store.root),
        Some(&config.api.socket),
        cp.registry.as_ref(),
        cp.events_log.as_ref(),
        cp.token_file.as_ref(),
        cp.ca_file.as_ref(),
        config.sources.https.ca_file.as_ref(),
    ];
    for path in paths.into_iter().flatten() {
        assert!(path.is_absolute(), "{} is relative", path.display());
    }
}

fn assert_sizes_round_trip(config: &Config) {
    let t = &config.transfer;
    let store = &config.store;
    let sizes = [
        Some(t.chunk_size),
        Some(t.hash_window),
        store.high_watermark,
        store.low_watermark,
    ];
    for size in sizes.into_iter().flatten() {
        let written = size.to_string();
        assert_eq!(
            written.parse::<ByteSize>(),
            Ok(size),
            "written as {written}"
        );
    }
}
