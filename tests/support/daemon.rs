//! Runs the real daemon, `blobstage serve`, for the integration tests, and talks to it.
//!
//! A `Node` is a `Setup` (configuration, registry, events log, state directory in a temporary
//! directory) whose configuration also sets `[api] socket = "<root>/run/agent.sock"` and
//! `metrics_listen = "127.0.0.1:0"`. `Node::start` spawns `blobstage serve` as a child
//! process, keeps what it writes to stdout and stderr, and returns once the socket accepts
//! connections (`Node::spawn` returns at once); dropping the `Daemon` stops it (SIGTERM, then
//! SIGKILL after 5 s), so a failed test leaves no process behind.
//!
//! The client side is deliberately minimal and independent of the daemon's code: one raw
//! HTTP/1.1 request per connection (`Connection: close`, `Content-Length` when there is a
//! body), an answer read until its `Content-Length` or chunked terminator (or EOF), and the
//! body parsed as JSON. The client commands (`pull`, `ls`, `status`) run as child processes.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::agent::{ConfigOptions, Setup};

/// How long `Node::start` waits for the socket to accept a connection.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon gets to exit after SIGTERM before the harness sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// An upper bound on any one request, long-polls included, so a hung daemon fails the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// An upper bound on one client command.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// A node to run the daemon on; see the module docs.
pub struct Node {
    pub setup: Setup,
    env: Vec<(String, String)>,
}

impl Node {
    /// A node with the default test configuration and the generated `[api]` section.
    pub fn new() -> Node {
        Node::with_api("")
    }

    /// Like `new`, with `api` (TOML lines, e.g. `allowed_uids = [12345]`) added to `[api]`.
    pub fn with_api(api: &str) -> Node {
        let setup = Setup::new();
        let node = Node {
            setup,
            env: vec![("BLOBSTAGE_LOG".to_owned(), "info".to_owned())],
        };
        let socket = node.socket();
        std::fs::create_dir_all(socket.parent().expect("the socket's directory"))
            .expect("create the run directory");
        let extra = format!(
            "[api]\nsocket = '{}'\nmetrics_listen = '127.0.0.1:0'\n{api}\n",
            socket.display()
        );
        let options = ConfigOptions {
            insecure_http: true,
            extra,
        };
        node.setup.write_config(&node.setup.config_text(&options));
        node
    }

    /// Where the daemon listens.
    pub fn socket(&self) -> PathBuf {
        self.setup.root().join("run/agent.sock")
    }

    /// Sets an environment variable (e.g. `BLOBSTAGE_TRANSFER_READ_TIMEOUT`) for every later
    /// daemon start.
    pub fn env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Starts `blobstage serve --config <config>` and waits until its socket accepts a
    /// connection; panics with the daemon's output if it exits or does not get there in 10 s.
    pub async fn start(&self) -> Daemon {
        let mut daemon = self.spawn();
        daemon.wait_until_accepting().await;
        daemon
    }

    /// Starts `blobstage serve --config <config>` and returns at once, before it serves.
    pub fn spawn(&self) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_blobstage"));
        command
            .arg("serve")
            .arg("--config")
            .arg(self.setup.config_path());
        command.current_dir(self.setup.root());
        clear_blobstage_env(&mut command);
        command.envs(self.env.iter().map(|(n, v)| (n, v)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start blobstage serve");

        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        collect_lines(stdout, "stdout", output.clone());
        collect_lines(stderr, "stderr", output.clone());
        Daemon {
            child,
            exit: None,
            socket: self.socket(),
            output,
        }
    }

    /// `blobstage <subcommand> --socket <socket> <args>`, e.g. `cli("pull", &["--wait", id])`.
    pub async fn cli(&self, subcommand: &str, args: &[&str]) -> CliRun {
        let mut command = Command::new(env!("CARGO_BIN_EXE_blobstage"));
        command.arg(subcommand).arg("--socket").arg(self.socket());
        command.args(args).current_dir(self.setup.root());
        clear_blobstage_env(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().expect("start the blobstage client");
        let pid = child.id();
        let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
        let output = match tokio::time::timeout(CLI_TIMEOUT, waited).await {
            Ok(joined) => joined.expect("the client task").expect("run the client"),
            Err(_) => {
                signal(pid, "KILL");
                panic!("blobstage {subcommand} {args:?} did not exit within {CLI_TIMEOUT:?}");
            }
        };
        CliRun {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Configuration comes from the test's file and `Node::env` only: the config loader refuses
/// unknown `BLOBSTAGE_*` variables, and a stray `BLOBSTAGE_SOCKET` would redirect the client.
fn clear_blobstage_env(command: &mut Command) {
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("BLOBSTAGE_")) {
        command.env_remove(name);
    }
}

/// Appends every line of `stream` to `output`, tagged, on a thread of its own.
fn collect_lines(
    stream: impl Read + Send + 'static,
    tag: &'static str,
    output: Arc<Mutex<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut output = output.lock().unwrap_or_else(PoisonError::into_inner);
            output.push_str(tag);
            output.push_str(": ");
            output.push_str(&line);
            output.push('\n');
        }
    });
}

/// `kill -<name> <pid>`, ignoring failure (the process may be gone already).
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// What one client command did.
#[derive(Debug)]
pub struct CliRun {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// The last non-empty line of stderr.
    pub fn last_stderr_line(&self) -> &str {
        let mut lines = self.stderr.lines().filter(|l| !l.trim().is_empty());
        lines.next_back().unwrap_or("")
    }
}

/// A running `blobstage serve`; stopped when dropped.
pub struct Daemon {
    child: Child,
    exit: Option<ExitStatus>,
    socket: PathBuf,
    output: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote so far, stdout and stderr, one tagged line each.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The metrics address from the `listening` log line (`metrics=127.0.0.1:PORT`), waiting
    /// up to 5 s for it; `None` if no such line appeared.
    pub async fn metrics_addr(&self) -> Option<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(addr) = parse_metrics_addr(&self.output()) {
                return Some(addr);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                self.exit = Some(status);
                panic!(
                    "blobstage serve exited ({status}) before accepting connections:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "blobstage serve did not accept connections on {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One request on a new connection; the answer's status and its body as JSON (a body that
    /// is not JSON comes back as a JSON string holding its text, so an assertion shows it).
    pub async fn request(&self, method: &str, target: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| serde_json::to_vec(b).expect("a JSON body"));
        let response = self.request_raw(method, target, body.as_deref()).await;
        (response.status, response.json())
    }

    /// One request with `body` sent as is (`Content-Type: application/json`).
    pub async fn request_raw(&self, method: &str, target: &str, body: Option<&[u8]>) -> Response {
        let exchange = async {
            let stream = UnixStream::connect(&self.socket).await?;
            exchange(stream, method, target, body).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => panic!("{method} {target}: {e}\ndaemon output:\n{}", self.output()),
            Err(_) => panic!(
                "{method} {target}: no answer within {REQUEST_TIMEOUT:?}\ndaemon output:\n{}",
                self.output()
            ),
        }
    }

    /// Sends SIGTERM and waits up to `within` for the daemon to exit; `None` if it did not
    /// (it is then left running, and killed on drop).
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                self.exit = Some(status);
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// `POST /v1/pulls` of `artifact_id`, which must be accepted (200 or 202), then long-polls
    /// until the pull ends (2 minutes at most); returns the ended pull.
    pub async fn pull_to_end(&self, artifact_id: &str) -> Value {
        let body = serde_json::json!({ "artifact_id": artifact_id });
        let (status, pull) = self.request("POST", "/v1/pulls", Some(&body)).await;
        assert!(
            status == 200 || status == 202,
            "POST {artifact_id}: {status} {pull:#}"
        );
        let target = format!("/v1/pulls/{}?wait=10s", pull["id"].as_str().unwrap());
        for _ in 0..12 {
            let (_, pull) = self.request("GET", &target, None).await;
            if matches!(
                pull["state"].as_str(),
                Some("staged" | "failed" | "cancelled")
            ) {
                return pull;
            }
        }
        panic!("{target} did not end: {}", self.output());
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("poll the daemon");
        }
        self.exit.is_some()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.has_exited() {
            return;
        }
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in `metrics=ADDR` on a line that mentions `listening`.
pub fn parse_metrics_addr(output: &str) -> Option<SocketAddr> {
    let lines = output.lines().filter(|l| l.contains("listening"));
    let mut words = lines.flat_map(|l| l.split_whitespace());
    let value = words.find_map(|w| w.strip_prefix("metrics="))?;
    value.trim_matches(|c| c == '"' || c == ',').parse().ok()
}

/// `GET <path>` on the metrics listener (loopback TCP).
pub async fn tcp_get(addr: SocketAddr, path: &str) -> Response {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        exchange(stream, "GET", path, None).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr}: no answer"))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

// ---- HTTP/1.1 ---------------------------------------------------------------------------

/// An answer as received.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        let found = self.headers.iter().find(|(n, _)| *n == name);
        found.map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; a body that is not JSON becomes a JSON string of its text.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }
}

/// Writes one request on `stream` and reads its answer.
///
/// The request is written whole before reading; a write that fails (the server may answer
/// and close early, e.g. for a body that is too large) is not an error as long as an answer
/// can be read. Reading stops at the end of the body as its headers delimit it, or at EOF.
pub async fn exchange<S>(
    mut stream: S,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str("Content-Type: application/json\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let written = stream.write_all(&bytes).await;
    let _ = stream.flush().await;

    let mut received = Vec::new();
    let mut buf = vec![0; 16 * 1024];
    loop {
        if let Some(response) = parse_response(&received, false)? {
            return Ok(response);
        }
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // A reset after (part of) an answer: parse what arrived.
            Err(e) if !received.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(written.err().unwrap_or(e)),
        }
    }
    match parse_response(&received, true)? {
        Some(response) => Ok(response),
        None if received.is_empty() => Err(written.err().unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without an answer",
            )
        })),
        None => Err(invalid(format!(
            "truncated answer: {:?}",
            String::from_utf8_lossy(&received)
        ))),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A complete answer from `data`, `None` if more is needed; `eof` means no more will come.
pub fn parse_response(data: &[u8], eof: bool) -> io::Result<Option<Response>> {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&data[..end]).map_err(|e| invalid(e.to_string()))?;
    let rest = &data[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
        return Err(invalid(format!("bad status line {status_line:?}")));
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };

    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = response.header("content-length").map(str::parse::<usize>);
    if chunked {
        let Some(body) = dechunk(rest)? else {
            return Ok(None);
        };
        response.body = body;
    } else if let Some(length) = length {
        let length = length.map_err(|e| invalid(format!("bad Content-Length: {e}")))?;
        if rest.len() < length {
            return Ok(None);
        }
        response.body = rest[..length].to_vec();
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        response.body = Vec::new();
    } else if eof {
        response.body = rest.to_vec();
    } else {
        return Ok(None);
    }
    Ok(Some(response))
}

/// The body of a complete chunked message, `None` if incomplete.
fn dechunk(mut data: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[..eol]).map_err(|e| invalid(e.to_string()))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if eol == 0 {
                    return Ok(Some(body));
                }
                data = &data[eol + 2..];
            }
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
