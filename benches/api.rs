//! Benchmark of the local API: how many `POST /v1/pulls` per second the daemon answers for
//! blobs that are already staged, with many concurrent clients, and at what latency.
//!
//! It builds a throwaway node in a temporary directory under `TMPDIR` (a configuration, an
//! artifact-store source holding `API_BENCH_ARTIFACTS` blobs of 4 KiB, a registry naming them
//! `bench/a<i>@1`), starts the real daemon (`blobstage serve`, the binary cargo builds for this
//! bench), stages every blob once, then loads it twice for `API_BENCH_SECONDS` each:
//! `API_BENCH_CLIENTS` concurrent clients post `{"artifact_id": ...}` round-robin over the
//! artifacts and expect 200 with state `staged`. The first phase opens a new connection per
//! request through `blobstage::client::Client`, as `blobstage pull` does; the second keeps one
//! HTTP/1.1 connection per client and reuses it. After each phase it waits until the daemon
//! has delivered its event outbox to the events log. Each phase reports requests, errors,
//! requests/s, latency percentiles, the daemon's CPU time, memory and threads, and the events
//! recorded. The Markdown report is printed and written to
//! `bench-results/api-<date>-<time>.md`. Last, the daemon is stopped with SIGTERM and must exit
//! 0. See benches/README.md for how to read the numbers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use blobstage::client::Client;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::Digest as _;
use tempfile::TempDir;
use tokio::net::UnixStream;

/// Size of each staged blob.
const BLOB_SIZE: usize = 4096;
/// How long the daemon gets to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon gets to deliver its outbox to the events log after a phase.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let load_before = load_average();
    let mut runs = Vec::new();
    for mode in [Mode::PerRequest, Mode::KeepAlive] {
        runs.push(run(mode, &settings).await?);
    }
    let report = Report {
        settings: &settings,
        runs: &runs,
        load_before,
    };
    report.save()?;
    for run in &runs {
        ensure!(
            run.exit.success(),
            "{}: the daemon exited with {} after SIGTERM",
            run.phase.mode.label(),
            run.exit
        );
    }
    Ok(())
}

/// One mode on a fresh node and daemon, so that what one mode leaves behind (a grown outbox
/// directory, the daemon's table of pulls) does not skew the other: stage, load, stop.
async fn run(mode: Mode, settings: &Settings) -> Result<Run> {
    let node = Node::create(settings.artifacts)?;
    let mut daemon = Daemon::start(&node)?;
    daemon.wait_until_accepting(&node.socket()).await?;
    let client = Client::new(&node.socket());
    let label = mode.label();
    eprintln!("[api-bench] {label}: staging {} blobs", node.bodies.len());
    prestage(&client, &node.bodies).await?;
    drain_outbox(&client).await?;
    let staged = daemon.stats()?;
    eprintln!("[api-bench] {label}: {} s of load", settings.seconds);
    let phase = measure(mode, settings, &node, &daemon).await?;
    let exit = daemon.stop().await?;
    Ok(Run {
        phase,
        staged,
        exit,
    })
}

/// What one mode measured, and how its daemon ended.
struct Run {
    phase: Phase,
    /// The daemon once every blob was staged, before the load.
    staged: ProcStats,
    exit: ExitStatus,
}

// ---- settings and the node's files ----------------------------------------------------------

/// What the environment may change.
struct Settings {
    /// `API_BENCH_SECONDS`: how long each phase lasts.
    seconds: u64,
    /// `API_BENCH_CLIENTS`: concurrent clients.
    clients: usize,
    /// `API_BENCH_ARTIFACTS`: registered (and staged) artifacts.
    artifacts: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            seconds: env_number("API_BENCH_SECONDS", 10)?,
            clients: env_number("API_BENCH_CLIENTS", 100)? as usize,
            artifacts: env_number("API_BENCH_ARTIFACTS", 100)? as usize,
        })
    }
}

/// A positive integer from the environment, `default` when unset.
fn env_number(name: &str, default: u64) -> Result<u64> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default);
    };
    match text.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{name} must be a positive integer, not {text:?}"),
    }
}

/// A node's files in a temporary directory, and the request body of each artifact.
struct Node {
    dir: TempDir,
    bodies: Vec<Value>,
}

impl Node {
    fn create(artifacts: usize) -> Result<Node> {
        let dir = tempfile::tempdir().context("create the node's temporary directory")?;
        let root = dir.path();
        fs::create_dir(root.join("store"))?;
        let registrations = (0..artifacts)
            .map(|i| write_blob(root, i))
            .collect::<Result<Vec<_>>>()?;
        let registry = json!({ "artifacts": registrations });
        fs::write(root.join("registry.json"), serde_json::to_vec(&registry)?)?;
        fs::write(root.join("agent.toml"), config_text(root))?;
        let bodies = (0..artifacts)
            .map(|i| json!({ "artifact_id": artifact_id(i) }))
            .collect();
        Ok(Node { dir, bodies })
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.root().join("agent.sock")
    }

    fn events_log(&self) -> PathBuf {
        self.root().join("events.jsonl")
    }

    /// Lines in the events log: one per recorded event.
    fn event_count(&self) -> Result<u64> {
        let log = match fs::read(self.events_log()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            read => read.context("read the events log")?,
        };
        Ok(log.iter().filter(|&&b| b == b'\n').count() as u64)
    }
}

fn artifact_id(i: usize) -> String {
    format!("bench/a{i}@1")
}

/// Writes blob `i` into the artifact store; returns its registration.
fn write_blob(root: &Path, i: usize) -> Result<Value> {
    let body: Vec<u8> = (0..BLOB_SIZE)
        .map(|n| (n as u64 * 31 + i as u64 * 7919) as u8)
        .collect();
    fs::write(root.join(format!("store/a{i}")), &body)?;
    let hex: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(json!({
        "id": artifact_id(i),
        "project": "bench",
        "artifact_kind": "blob",
        "source": {
            "source_type": "artifact_store",
            "uri": format!("artifact-store://a{i}"),
            "size_bytes": BLOB_SIZE,
        },
        "digest": format!("sha256:{hex}"),
        "lifecycle_state": "active",
        "trust_state": "verified",
        "channel": "prod",
        "source_policy": { "decision": "allow", "policy_id": "bench@1" },
    }))
}

fn config_text(root: &Path) -> String {
    let root = root.display();
    format!(
        "state_dir = '{root}/state'\nnode_id = 'bench'\n\n\
         [control_plane]\nregistry = '{root}/registry.json'\nevents_log = '{root}/events.jsonl'\n\n\
         [api]\nsocket = '{root}/agent.sock'\nmetrics_listen = '127.0.0.1:0'\n\n\
         [sources.artifact_store]\nroot = '{root}/store'\n\n\
         [[policy.allow]]\nsource_type = 'artifact_store'\n"
    )
}

// ---- the daemon -------------------------------------------------------------------------------

/// A running `blobstage serve`; killed when dropped before `stop`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with its stdout and stderr (info-level logs) in `<root>/daemon.log`.
    fn start(node: &Node) -> Result<Daemon> {
        let log = node.root().join("daemon.log");
        let output = fs::File::create(&log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_blobstage"));
        command
            .arg("serve")
            .arg("--config")
            .arg(node.root().join("agent.toml"));
        // The configuration loader refuses unknown BLOBSTAGE_* variables; use the file only.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("BLOBSTAGE_")) {
            command.env_remove(name);
        }
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = command.spawn().context("start blobstage serve")?;
        Ok(Daemon { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the daemon's log, for error messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_until_accepting(&mut self, socket: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(socket).await.is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited ({status}):\n{}", self.log_tail());
            }
            ensure!(
                Instant::now() < deadline,
                "the daemon did not accept connections within {START_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn stats(&self) -> Result<ProcStats> {
        ProcStats::of(&self.pid().to_string())
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    async fn stop(mut self) -> Result<ExitStatus> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()?;
        ensure!(sent.success(), "kill -TERM {} failed", self.pid());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time, memory and threads of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct ProcStats {
    /// User and system CPU seconds.
    user: f64,
    system: f64,
    /// Resident set now (`VmRSS`) and at its peak (`VmHWM`), in KiB.
    rss_kib: u64,
    peak_rss_kib: u64,
    threads: u64,
}

impl ProcStats {
    /// `pid` is a number or `self`.
    fn of(pid: &str) -> Result<ProcStats> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name, which is in parentheses and may contain spaces:
        // state is field 3, utime field 14 and stime field 15.
        let after_name = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let seconds = |field: &str| Ok::<_, anyhow::Error>(field.parse::<f64>()? / clock_ticks());
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(ProcStats {
            user: seconds(fields[11])?,
            system: seconds(fields[12])?,
            rss_kib: status_number(&status, "VmRSS:")?,
            peak_rss_kib: status_number(&status, "VmHWM:")?,
            threads: status_number(&status, "Threads:")?,
        })
    }

    fn cpu(&self) -> f64 {
        self.user + self.system
    }
}

/// The number on a `Name:   1234 kB` or `Name:   12` line of `/proc/<pid>/status`.
fn status_number(status: &str, name: &str) -> Result<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(name));
    let number = line.and_then(|l| l.split_whitespace().next());
    Ok(number
        .with_context(|| format!("no {name} in status"))?
        .parse()?)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    let output = Command::new("getconf").arg("CLK_TCK").output();
    let text = output.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    text.ok().and_then(|t| t.parse().ok()).unwrap_or(100.0)
}

// ---- staging and load -------------------------------------------------------------------------

/// Events waiting in the daemon's outbox, from `/v1/status`; `None` for a daemon without one.
async fn outbox_depth(client: &Client) -> Result<Option<u64>> {
    let status = client.call(Method::GET, "/v1/status", None).await?;
    Ok(status["outbox"]["depth"].as_u64())
}

/// Waits until the daemon has delivered every event of its outbox; returns how long it took.
async fn drain_outbox(client: &Client) -> Result<Duration> {
    let started = Instant::now();
    while outbox_depth(client).await?.is_some_and(|depth| depth > 0) {
        ensure!(
            started.elapsed() < DRAIN_TIMEOUT,
            "the outbox did not drain within {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

/// Pulls every artifact once and waits until each is staged.
async fn prestage(client: &Client, bodies: &[Value]) -> Result<()> {
    for body in bodies {
        let mut pull = client.call(Method::POST, "/v1/pulls", Some(body)).await?;
        while pull["state"] != "staged" {
            ensure!(
                !matches!(pull["state"].as_str(), Some("failed" | "cancelled")),
                "staging {} ended: {pull}",
                body["artifact_id"]
            );
            let path = format!("/v1/pulls/{}?wait=30s", pull["id"].as_str().unwrap_or(""));
            pull = client.call(Method::GET, &path, None).await?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// A new connection per request, through `blobstage::client::Client`.
    PerRequest,
    /// One connection per client, reused.
    KeepAlive,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::PerRequest => "new connection per request",
            Mode::KeepAlive => "keep-alive connection per client",
        }
    }
}

/// What one client (or, merged, all clients) saw.
#[derive(Default)]
struct Tally {
    /// The latency of every successful request.
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, latency: Duration, result: Result<()>) {
        match result {
            Ok(()) => self.latencies.push(latency),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One load phase: the clients' tally, how long it took, and what it cost the daemon, the
/// delivery of its events included.
struct Phase {
    mode: Mode,
    tally: Tally,
    /// From the start until the last client's last answer.
    wall: Duration,
    /// Events in the outbox when the load ended, and how long it then took to deliver them.
    outbox_at_end: Option<u64>,
    drain: Duration,
    /// The daemon's user and system CPU seconds during the phase and the drain.
    daemon_user: f64,
    daemon_system: f64,
    /// This process's CPU seconds (user and system) during the phase.
    client_cpu: f64,
    /// The daemon at the end of the drain.
    daemon_after: ProcStats,
    /// Lines the daemon appended to the events log during the phase and the drain.
    events: u64,
}

impl Phase {
    fn requests(&self) -> u64 {
        self.tally.latencies.len() as u64 + self.tally.errors
    }
}

/// Runs one phase: every client sends requests until the deadline, then the outbox drains.
async fn measure(mode: Mode, settings: &Settings, node: &Node, daemon: &Daemon) -> Result<Phase> {
    let (daemon_before, client_before) = (daemon.stats()?, ProcStats::of("self")?);
    let events_before = node.event_count()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(settings.seconds);
    let bodies = Arc::new(node.bodies.clone());
    let mut clients = Vec::new();
    for first in 0..settings.clients {
        let transport = Transport::new(mode, node.socket());
        let bodies = bodies.clone();
        clients.push(tokio::spawn(drive(transport, bodies, first, deadline)));
    }
    let mut tally = Tally::default();
    for client in clients {
        tally.merge(client.await?);
    }
    let wall = started.elapsed();
    let client = Client::new(&node.socket());
    let outbox_at_end = outbox_depth(&client).await?;
    let drain = drain_outbox(&client).await?;
    let (daemon_after, client_after) = (daemon.stats()?, ProcStats::of("self")?);
    Ok(Phase {
        mode,
        tally,
        wall,
        outbox_at_end,
        drain,
        daemon_user: daemon_after.user - daemon_before.user,
        daemon_system: daemon_after.system - daemon_before.system,
        client_cpu: client_after.cpu() - client_before.cpu(),
        daemon_after,
        events: node.event_count()? - events_before,
    })
}

/// One client: sends pulls of `bodies[first]`, `bodies[first + 1]`, ... until `deadline`,
/// timing each.
async fn drive(
    mut transport: Transport,
    bodies: Arc<Vec<Value>>,
    first: usize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut next = first;
    while Instant::now() < deadline {
        let body = &bodies[next % bodies.len()];
        let started = Instant::now();
        let result = transport.pull(body).await;
        tally.record(started.elapsed(), result);
        next += 1;
    }
    tally
}

/// How a client reaches the daemon.
enum Transport {
    /// `blobstage::client::Client`: a new connection per request.
    PerRequest(Client),
    /// One connection, opened on first use and reopened after an error.
    KeepAlive {
        socket: PathBuf,
        connection: Option<SendRequest<Full<Bytes>>>,
    },
}

impl Transport {
    fn new(mode: Mode, socket: PathBuf) -> Transport {
        match mode {
            Mode::PerRequest => Transport::PerRequest(Client::new(&socket)),
            Mode::KeepAlive => Transport::KeepAlive {
                socket,
                connection: None,
            },
        }
    }

    /// `POST /v1/pulls` with `body`; succeeds on 200 with a staged pull.
    async fn pull(&mut self, body: &Value) -> Result<()> {
        match self {
            Transport::PerRequest(client) => {
                // The client turns any status other than 2xx into an error.
                let pull = client.call(Method::POST, "/v1/pulls", Some(body)).await?;
                expect_staged(200, &pull)
            }
            Transport::KeepAlive { socket, connection } => {
                let result = send_on(socket, connection, body).await;
                if result.is_err() {
                    *connection = None;
                }
                result
            }
        }
    }
}

/// Sends one pull request on `connection`, (re)connecting first if there is none; the
/// connection time is part of that request's latency.
async fn send_on(
    socket: &Path,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
    body: &Value,
) -> Result<()> {
    if connection.as_ref().is_none_or(SendRequest::is_closed) {
        let stream = UnixStream::connect(socket).await?;
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        *connection = Some(sender);
    }
    let sender = connection.as_mut().expect("connected above");
    sender.ready().await?;
    let request = Request::post("/v1/pulls")
        .header(hyper::header::HOST, "blobstage")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let answer = response.into_body().collect().await?.to_bytes();
    let pull: Value =
        serde_json::from_slice(&answer).with_context(|| format!("{status} without a JSON body"))?;
    expect_staged(status, &pull)
}

fn expect_staged(status: u16, pull: &Value) -> Result<()> {
    if status == 200 && pull["state"] == "staged" {
        return Ok(());
    }
    Err(anyhow!(
        "expected 200 and a staged pull, got {status} {pull}"
    ))
}

// ---- the report -------------------------------------------------------------------------------

struct Report<'a> {
    settings: &'a Settings,
    runs: &'a [Run],
    /// The 1, 5 and 15 minute load averages at the start: other work on the host skews the
    /// numbers.
    load_before: String,
}

impl Report<'_> {
    /// Prints the report and writes it to `bench-results/api-<date>-<time>.md`.
    fn save(&self) -> Result<()> {
        let text = self.render();
        println!("{text}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
        fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let path = dir.join(format!(
            "api-{}.md",
            command_output("date", &["+%Y-%m-%d-%H%M%S"], "unknown-date")
        ));
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("[api-bench] results written to {}", path.display());
        Ok(())
    }

    fn render(&self) -> String {
        let s = self.settings;
        let mut out = format!(
            "# blobstage API benchmark, {}\n\n{}\n\
             setup: {} clients, {} s per mode, POST /v1/pulls round-robin over {} artifacts \
             (artifact store, {} KiB each, all staged beforehand), a fresh node and daemon per \
             mode, daemon log level info to a file, state dir (store, outbox) and events log on \
             {}, load average before {}, repo commit {}\n\n",
            command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"], ""),
            host_line(),
            s.clients,
            s.seconds,
            s.artifacts,
            BLOB_SIZE / 1024,
            fs_type(&std::env::temp_dir()),
            self.load_before,
            repo_commit(),
        );
        out.push_str(
            "| mode | requests | errors | requests/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for run in self.runs {
            out.push_str(&latency_row(&run.phase));
        }
        out.push_str(
            "\n| mode | daemon CPU user + sys (s) | daemon CPU per request (µs) | client CPU (s) \
             | outbox at end of load | drain (s) | events recorded | daemon RSS staged → end \
             (MiB) | daemon peak RSS (MiB) | daemon threads at end | exit after SIGTERM |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for run in self.runs {
            out.push_str(&cost_row(run));
        }
        for phase in self.runs.iter().map(|r| &r.phase) {
            if let Some(error) = &phase.tally.first_error {
                out.push_str(&format!(
                    "\nfirst error ({}): {error}\n",
                    phase.mode.label()
                ));
            }
        }
        out
    }
}

fn latency_row(phase: &Phase) -> String {
    let mut latencies = phase.tally.latencies.clone();
    latencies.sort_unstable();
    let ms = |p: f64| percentile(&latencies, p).as_secs_f64() * 1000.0;
    format!(
        "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
        phase.mode.label(),
        phase.requests(),
        phase.tally.errors,
        latencies.len() as f64 / phase.wall.as_secs_f64(),
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(1.0),
    )
}

fn cost_row(run: &Run) -> String {
    let phase = &run.phase;
    let daemon_cpu = phase.daemon_user + phase.daemon_system;
    let outbox = phase
        .outbox_at_end
        .map_or("n/a".to_owned(), |d| d.to_string());
    format!(
        "| {} | {:.2} + {:.2} | {:.0} | {:.2} | {outbox} | {:.2} | {} | {:.1} → {:.1} | {:.1} \
         | {} | {} |\n",
        phase.mode.label(),
        phase.daemon_user,
        phase.daemon_system,
        daemon_cpu * 1e6 / phase.requests().max(1) as f64,
        phase.client_cpu,
        phase.drain.as_secs_f64(),
        phase.events,
        mib(run.staged.rss_kib),
        mib(phase.daemon_after.rss_kib),
        mib(phase.daemon_after.peak_rss_kib),
        phase.daemon_after.threads,
        run.exit,
    )
}

/// The nearest-rank percentile `p` (0 < p <= 1) of sorted values; zero when there are none.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The report's `host:` line, as benches/lib.sh writes it.
fn host_line() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"));
    let sha_ni = flags.is_some_and(|f| f.split_whitespace().any(|w| w == "sha_ni"));
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "host: nproc={nproc}, cpu=\"{model}\", sha_ni={}, kernel {}",
        if sha_ni { "yes" } else { "no" },
        kernel.trim()
    )
}

/// The trimmed standard output of a command, or `fallback` if it fails.
fn command_output(program: &str, args: &[&str], fallback: &str) -> String {
    let output = Command::new(program).args(args).output();
    match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => fallback.to_owned(),
    }
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    fields.join(" ")
}

/// The file system type of `dir` (where the events log is), e.g. `ext4` or `tmpfs`.
fn fs_type(dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    let df = command_output("df", &["--output=fstype", &dir], "");
    df.lines().nth(1).unwrap_or("unknown").trim().to_owned()
}

fn repo_commit() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    command_output("git", &["-C", root, "rev-parse", "--short", "HEAD"], "none")
}
