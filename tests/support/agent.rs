//! Runs the `blobstage` binary against a throwaway node: a `Setup` owns a temporary directory
//! holding the configuration, the registry, the events log and the state directory, runs
//! `blobstage fetch` as a child process (off the async runtime, so a loopback origin on the
//! test's runtime keeps serving), and returns what the process printed plus the events it
//! appended. Helpers build registrations, deterministic test data and SHA-256 digests, and
//! inspect the content store.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::Digest as _;
use tempfile::TempDir;

/// The chunk size the default test configuration sets: the smallest the agent accepts.
pub const CHUNK: u64 = 64 * 1024;

/// How the configuration file of a `Setup` is written.
#[derive(Clone, Debug)]
pub struct ConfigOptions {
    /// Whether the `127.0.0.1` allow entry sets `insecure_http = true`.
    pub insecure_http: bool,
    /// TOML appended verbatim after the generated configuration.
    pub extra: String,
}

impl ConfigOptions {
    /// For an https-only origin: no `insecure_http`, and `[sources.https] ca_file` set when
    /// given (a relative path is resolved against the `Setup` root, where the file lives).
    pub fn https(ca_file: Option<&str>) -> ConfigOptions {
        let ca = ca_file.map(|f| format!("[sources.https]\nca_file = '{f}'\n"));
        ConfigOptions {
            insecure_http: false,
            extra: ca.unwrap_or_default(),
        }
    }
}

impl Default for ConfigOptions {
    fn default() -> Self {
        ConfigOptions {
            insecure_http: true,
            extra: String::new(),
        }
    }
}

/// A node's files in a temporary directory; see the module docs.
pub struct Setup {
    dir: TempDir,
    env: Vec<(String, String)>,
}

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The events this run appended to the events log, parsed.
    pub events: Vec<Value>,
}

impl Setup {
    /// A node with the default test configuration and an empty registry.
    pub fn new() -> Setup {
        Setup::with(ConfigOptions::default())
    }

    pub fn with(options: ConfigOptions) -> Setup {
        let dir = tempfile::tempdir().expect("temporary directory");
        let setup = Setup {
            dir,
            env: Vec::new(),
        };
        setup.write_config(&setup.config_text(&options));
        setup.register(&[]);
        setup
    }

    /// The generated configuration (see `ConfigOptions`).
    pub fn config_text(&self, options: &ConfigOptions) -> String {
        let root = self.root().display();
        let insecure = if options.insecure_http {
            "insecure_http = true\n"
        } else {
            ""
        };
        format!(
            "state_dir = '{root}/state'\nnode_id = 'test-node'\n\n\
             [control_plane]\nregistry = '{root}/registry.json'\nevents_log = '{root}/events.jsonl'\n\n\
             [transfer]\nchunk_size = '64KiB'\nconnections_per_blob = 4\nread_timeout = '1s'\nmax_attempts = 4\n\n\
             [[policy.allow]]\nsource_type = 'https'\nhost = '127.0.0.1'\n{insecure}\n{}\n",
            options.extra
        )
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.root().join("agent.toml")
    }

    pub fn events_path(&self) -> PathBuf {
        self.root().join("events.jsonl")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    /// Replaces the configuration file with `text`.
    pub fn write_config(&self, text: &str) {
        fs::write(self.config_path(), text).expect("write configuration");
    }

    /// Writes `contents` to `name` in the root directory; returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.root().join(name);
        fs::write(&path, contents).expect("write a file in the node directory");
        path
    }

    /// Replaces the registry with these registrations.
    pub fn register(&self, artifacts: &[Value]) {
        let registry = json!({ "artifacts": artifacts });
        let text = serde_json::to_vec_pretty(&registry).expect("registry serializes");
        fs::write(self.root().join("registry.json"), text).expect("write registry");
    }

    /// Sets an environment variable for every later run.
    pub fn env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// `blobstage fetch --config <config> <id>`.
    pub async fn fetch(&self, id: &str) -> Run {
        self.fetch_with(&[id]).await
    }

    /// `blobstage fetch --config <config>` followed by `args`, ready to run.
    pub fn fetch_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_blobstage"));
        command.arg("fetch").arg("--config").arg(self.config_path());
        command.args(args).current_dir(self.root());
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("BLOBSTAGE_")) {
            command.env_remove(name);
        }
        command.envs(self.env.iter().map(|(n, v)| (n, v)));
        command
    }

    /// Starts `blobstage fetch` in the background, output discarded, for a test to kill.
    pub fn spawn_fetch(&self, args: &[&str]) -> std::process::Child {
        let mut command = self.fetch_command(args);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command.spawn().expect("start blobstage")
    }

    /// `blobstage fetch --config <config>` followed by `args`.
    pub async fn fetch_with(&self, args: &[&str]) -> Run {
        let before = self.all_events().len();
        let mut command = self.fetch_command(args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("the runner task")
            .expect("run blobstage");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            events: self.all_events().split_off(before),
        }
    }

    /// Every event in the log, in order; none when the log does not exist.
    pub fn all_events(&self) -> Vec<Value> {
        let Ok(text) = fs::read_to_string(self.events_path()) else {
            return Vec::new();
        };
        let lines = text.lines().filter(|l| !l.trim().is_empty());
        lines
            .map(|l| serde_json::from_str(l).expect("an event line is JSON"))
            .collect()
    }

    /// Where the verified blob of `hex` (a SHA-256) is published, as the agent prints it.
    pub fn blob_path(&self, hex: &str) -> PathBuf {
        let root = fs::canonicalize(self.root()).expect("canonical temporary directory");
        root.join("state/blobs/sha256").join(hex)
    }

    /// Whether `<state_dir>/ingest` is empty (or absent).
    pub fn ingest_is_empty(&self) -> bool {
        match fs::read_dir(self.state_dir().join("ingest")) {
            Ok(mut entries) => entries.next().is_none(),
            Err(_) => true,
        }
    }

    /// Every non-directory entry under `<state_dir>/blobs`, recursively.
    pub fn blobs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        collect_files(&self.state_dir().join("blobs"), &mut found);
        found.sort();
        found
    }
}

fn collect_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if is_dir {
            collect_files(&path, found);
        } else {
            found.push(path);
        }
    }
}

impl Run {
    /// Asserts a successful plain fetch and returns the one path it printed.
    pub fn staged_path(&self) -> PathBuf {
        assert_eq!(self.code, 0, "fetch failed: {self:#?}");
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "stdout must be one line: {self:#?}");
        let path = PathBuf::from(lines[0]);
        assert!(path.is_absolute(), "not an absolute path: {self:#?}");
        path
    }

    /// The last non-empty line of stderr.
    pub fn last_stderr_line(&self) -> &str {
        let mut lines = self.stderr.lines().filter(|l| !l.trim().is_empty());
        lines.next_back().unwrap_or("")
    }

    /// Asserts a failure with exit code `exit` and error `code`; returns the error line.
    pub fn failed_with(&self, exit: i32, code: &str) -> &str {
        assert_eq!(self.code, exit, "exit code: {self:#?}");
        assert!(self.stdout.is_empty(), "stdout must be empty: {self:#?}");
        let line = self.last_stderr_line();
        let prefix = format!("error[{code}]: ");
        assert!(line.starts_with(&prefix), "expected {prefix}: {self:#?}");
        line
    }

    /// Asserts a failure (exit 1) with error `code`; returns the error line.
    pub fn error(&self, code: &str) -> &str {
        self.failed_with(1, code)
    }

    /// Asserts exactly one event and returns it.
    pub fn event(&self) -> &Value {
        assert_eq!(self.events.len(), 1, "exactly one event: {self:#?}");
        &self.events[0]
    }

    /// Asserts one event with this outcome and error code (`None` for success).
    pub fn assert_event(&self, outcome: &str, error_code: Option<&str>) {
        let event = self.event();
        assert_eq!(event["outcome"], outcome, "{event:#}");
        assert_eq!(event["error_code"], json!(error_code), "{event:#}");
        assert_eq!(event["operation"], "pull_blob", "{event:#}");
        assert_eq!(event["node_id"], "test-node", "{event:#}");
    }
}

/// An active, verified, allowed `prod` registration of `body` at `uri`, with its size.
pub fn artifact(id: &str, uri: &str, body: &[u8]) -> Value {
    let mut value = artifact_without_size(id, uri, &sha256_hex(body));
    value["source"]["size_bytes"] = json!(body.len());
    value
}

/// Like `artifact`, but with only the digest's hex and no `size_bytes`.
pub fn artifact_without_size(id: &str, uri: &str, hex: &str) -> Value {
    json!({
        "id": id,
        "project": "t",
        "artifact_kind": "blob",
        "source": { "source_type": "https", "uri": uri },
        "digest": format!("sha256:{hex}"),
        "lifecycle_state": "active",
        "trust_state": "verified",
        "channel": "prod",
        "source_policy": { "decision": "allow", "policy_id": "t@1" },
    })
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = sha2::Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-512 of `data`.
pub fn sha512_hex(data: &[u8]) -> String {
    let digest = sha2::Sha512::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` deterministic pseudo-random bytes (xorshift64*), different for each `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Parses `bytes=first-last` into `(first, last)`.
pub fn parse_range(header: &str) -> Option<(u64, u64)> {
    let (first, last) = header.strip_prefix("bytes=")?.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// Every file under `dir`, read as bytes (the blob included: it must not hold a token either).
pub fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if fs::read(&path)
            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(path.display().to_string());
        }
    }
    found
}
