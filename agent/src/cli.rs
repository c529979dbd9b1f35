//! The command line: parsing, logging set-up, output and exit codes.
//!
//! Output follows the contract: on success the only line on stdout is the absolute path of the
//! verified blob (or one JSON object with `--json`); on failure stdout is empty and the last
//! line on stderr is `error[<code>]: <message>`. Usage and configuration errors exit 64
//! (EX_USAGE) before anything else happens; every other failure exits 1.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use control_client::{
    ArtifactId, ControlPlane, ControlPlaneError, Event, FileControlPlane, HttpControlPlane,
    HttpOptions, Operation, Outcome, Requester,
};
use hyper::Method;
use serde_json::{Value, json};

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::stage::{Staged, Stager};

/// Exit code for bad usage or configuration (sysexits' EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "blobstage",
    version,
    about = "Stage registered, verified blobs onto this node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stage one artifact now, without a daemon, and print the path of the verified blob.
    Fetch(FetchArgs),
    /// Run the daemon: the local API on the Unix socket, health on loopback TCP.
    Serve(ServeArgs),
    /// Ask the running daemon for an artifact; with --wait, print its path once staged.
    Pull(PullArgs),
    /// Re-hash a staged blob (or a file, with --digest and --path) against its digest.
    Verify(VerifyArgs),
    /// List the blobs in the daemon's store.
    Ls(ClientArgs),
    /// Show the daemon's state: pulls in flight and the store.
    Status(ClientArgs),
    /// Evict least recently used, unleased blobs down to the store's low watermark.
    Gc(ClientArgs),
}

#[derive(Debug, clap::Args)]
struct FetchArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print one JSON object instead of the path.
    #[arg(long)]
    json: bool,
    /// The registered artifact, e.g. `team-a/llama-3-8b-weights@3`.
    artifact_id: String,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(
        long = "config",
        env = "BLOBSTAGE_CONFIG",
        default_value = "/etc/blobstage/agent.toml"
    )]
    path: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The daemon's socket.
    #[arg(
        long,
        env = "BLOBSTAGE_SOCKET",
        default_value = "/run/blobstage/agent.sock"
    )]
    socket: PathBuf,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct PullArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Wait until the blob is staged and print its path (a progress bar on a terminal).
    #[arg(long)]
    wait: bool,
    /// Refuse the pull unless the artifact's registered digest is this one.
    #[arg(long)]
    digest: Option<String>,
    /// The registered artifact.
    artifact_id: String,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The digest a file must have (with --path).
    #[arg(long, requires = "path", conflicts_with = "artifact_id")]
    digest: Option<String>,
    /// A file to verify against --digest.
    #[arg(long, requires = "digest")]
    path: Option<PathBuf>,
    /// The registered artifact whose staged blob to verify.
    #[arg(required_unless_present = "digest")]
    artifact_id: Option<String>,
}

/// A failure to report: a stable code, a message, and the exit code.
struct Failure {
    code: String,
    message: String,
    exit: u8,
}

impl Failure {
    fn usage(code: &str, message: String) -> Self {
        Failure {
            code: code.to_owned(),
            message,
            exit: EX_USAGE,
        }
    }

    fn runtime(code: &str, message: String) -> Self {
        Failure {
            code: code.to_owned(),
            message,
            exit: 1,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::runtime(e.code(), crate::errors::Chain(&e).to_string())
    }
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match cli.command {
        Command::Fetch(args) => fetch(args),
        Command::Serve(args) => serve(args),
        Command::Pull(args) => client_command(|| pull(args)),
        Command::Verify(args) => client_command(|| verify(args)),
        Command::Ls(args) => client_command(|| ls(args)),
        Command::Status(args) => client_command(|| status(args)),
        Command::Gc(args) => client_command(|| gc(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error[{}]: {}", failure.code, failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

/// What `fetch` and `serve` start from.
struct Loaded {
    config: Arc<Config>,
    http: reqwest::Client,
    control_plane: Arc<dyn ControlPlane>,
}

/// Configuration, the HTTP client for sources, and the control plane. Any problem here is a
/// usage error.
fn load(path: &std::path::Path) -> Result<Loaded, Failure> {
    let usage = |e: &(dyn std::error::Error + 'static)| {
        Failure::usage("config_invalid", crate::errors::Chain(e).to_string())
    };
    let config = Config::load(path).map_err(|e| usage(&e))?;
    let http =
        crate::source::https::client(&config).map_err(|e| Failure::usage("config_invalid", e))?;
    let control_plane = control_plane(&config).map_err(|e| usage(&e))?;
    Ok(Loaded {
        config: Arc::new(config),
        http,
        control_plane,
    })
}

/// The HTTP control plane when `[control_plane] url` is set, else the file-backed one.
fn control_plane(config: &Config) -> Result<Arc<dyn ControlPlane>, ControlPlaneError> {
    let cp = &config.control_plane;
    let Some(url) = &cp.url else {
        let file = FileControlPlane::new(config.registry_path(), config.events_log_path());
        return Ok(Arc::new(file));
    };
    let mut options = HttpOptions::new(url.clone())
        .with_insecure_http(cp.insecure_http)
        .with_timeout(cp.timeout);
    if let Some(token) = &cp.token_file {
        options = options.with_token_file(token.clone());
    }
    if let Some(ca) = &cp.ca_file {
        options = options.with_ca_file(ca.clone());
    }
    Ok(Arc::new(HttpControlPlane::new(options)?))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blobstage")
        .build()
        .map_err(|e| Failure::runtime("io_error", format!("cannot start the runtime: {e}")))
}

fn fetch(args: FetchArgs) -> Result<(), Failure> {
    let Loaded {
        config,
        http,
        control_plane,
    } = load(&args.config.path)?;
    let id = ArtifactId::new(args.artifact_id)
        .map_err(|e| Failure::usage("invalid_artifact_id", e.to_owned()))?;
    crate::logs::init("warn", config.log.format);
    let staged = runtime()?.block_on(async {
        let node_id = config.node_id();
        let stager = match Stager::new(config, control_plane.clone(), http) {
            Ok(stager) => stager,
            Err(e) => {
                report_unopened(&*control_plane, node_id, &id, e.code()).await;
                return Err(Failure::runtime(
                    e.code(),
                    crate::errors::Chain(&e).to_string(),
                ));
            }
        };
        let pulled = stager.pull(&id, Some(this_process())).await;
        // The event is safe in the outbox either way; deliver it now if the control plane
        // takes it, else the daemon or the next fetch will.
        if let Err(e) = stager.outbox().flush().await {
            let waiting = stager.outbox().depth();
            tracing::warn!(waiting, error = %crate::errors::Chain(&e), "events wait in the outbox");
        }
        pulled.map_err(|e| Failure::runtime(e.code(), crate::errors::Chain(&e).to_string()))
    })?;
    print_staged(&staged, args.json);
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let Loaded {
        config,
        http,
        control_plane,
    } = load(&args.config.path)?;
    crate::logs::init("info", config.log.format);
    runtime()?.block_on(async {
        crate::daemon::serve(config, control_plane, http)
            .await
            .map_err(|e| Failure::runtime(e.code(), crate::errors::Chain(&e).to_string()))
    })
}

/// Runs a client command on a small runtime of its own.
fn client_command(command: impl AsyncFnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
    crate::logs::init("warn", crate::config::LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime("io_error", format!("cannot start the runtime: {e}")))?;
    runtime.block_on(command())
}

async fn pull(args: PullArgs) -> Result<(), Failure> {
    let client = Client::new(&args.client.socket);
    let mut body = json!({ "artifact_id": args.artifact_id });
    if let Some(digest) = args.digest {
        body["digest"] = Value::String(digest);
    }
    let mut pull = client.call(Method::POST, "/v1/pulls", Some(&body)).await?;
    if !args.wait {
        match args.client.json {
            true => println!("{pull}"),
            false => println!("{}", pull["id"].as_str().unwrap_or_default()),
        }
        return Ok(());
    }
    let id = pull["id"].as_str().unwrap_or_default().to_owned();
    let mut progress = Progress::new();
    while !is_terminal(&pull) {
        progress.show(&pull);
        pull = client
            .call(Method::GET, &format!("/v1/pulls/{id}?wait=1s"), None)
            .await?;
    }
    progress.finish();
    finish_pull(&pull, args.client.json)
}

fn is_terminal(pull: &Value) -> bool {
    matches!(
        pull["state"].as_str(),
        Some("staged" | "failed" | "cancelled")
    )
}

fn finish_pull(pull: &Value, json: bool) -> Result<(), Failure> {
    match pull["state"].as_str() {
        Some("staged") if json => println!("{pull}"),
        Some("staged") => println!("{}", pull["path"].as_str().unwrap_or_default()),
        Some("cancelled") => {
            return Err(Failure::runtime(
                "cancelled",
                "the pull was cancelled".into(),
            ));
        }
        _ => {
            let code = pull["error"]["code"].as_str().unwrap_or("failed");
            let message = pull["error"]["message"]
                .as_str()
                .unwrap_or("the pull failed");
            return Err(Failure::runtime(code, message.to_owned()));
        }
    }
    Ok(())
}

/// Progress of `pull --wait`: a bar when stdout is a terminal, a plain line on stderr every
/// few seconds otherwise (stdout stays for the path alone).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// When the last plain line was written; the first comes a few seconds in, not at once.
    last_line: Instant,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style =
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
            bar.set_style(indicatif::ProgressStyle::with_template(style).expect("valid template"));
            bar
        });
        Progress {
            bar,
            last_line: Instant::now(),
        }
    }

    fn show(&mut self, pull: &Value) {
        let (done, total) = (
            pull["bytes_done"].as_u64().unwrap_or(0),
            pull["bytes_total"].as_u64(),
        );
        let state = pull["state"].as_str().unwrap_or("");
        if let Some(bar) = &self.bar {
            bar.set_length(total.unwrap_or(0));
            bar.set_position(done);
            bar.set_message(state.to_owned());
            return;
        }
        if self.last_line.elapsed() >= Duration::from_secs(5) {
            let total = total.map_or("?".to_owned(), |t| t.to_string());
            eprintln!("{state}: {done} of {total} bytes");
            self.last_line = Instant::now();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn verify(args: VerifyArgs) -> Result<(), Failure> {
    let body = match (args.artifact_id, args.digest, args.path) {
        (Some(id), _, _) => json!({ "artifact_id": id }),
        (None, Some(digest), Some(path)) => {
            let path = std::path::absolute(&path).unwrap_or(path);
            json!({ "digest": digest, "path": path })
        }
        _ => {
            return Err(Failure::usage(
                "invalid_request",
                "give ARTIFACT_ID, or --digest and --path".into(),
            ));
        }
    };
    let verified = Client::new(&args.client.socket)
        .call(Method::POST, "/v1/verify", Some(&body))
        .await?;
    match args.client.json {
        true => println!("{verified}"),
        false => println!("{}", verified["path"].as_str().unwrap_or_default()),
    }
    Ok(())
}

async fn ls(args: ClientArgs) -> Result<(), Failure> {
    let blobs = Client::new(&args.socket)
        .call(Method::GET, "/v1/blobs", None)
        .await?;
    if args.json {
        println!("{blobs}");
        return Ok(());
    }
    for blob in blobs["blobs"].as_array().into_iter().flatten() {
        let (digest, size) = (
            blob["digest"].as_str().unwrap_or(""),
            blob["size"].as_u64().unwrap_or(0),
        );
        println!(
            "{digest}  {size:>14}  {}",
            blob["path"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn gc(args: ClientArgs) -> Result<(), Failure> {
    let report = Client::new(&args.socket)
        .call(Method::POST, "/v1/gc", None)
        .await?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    for blob in report["evicted"].as_array().into_iter().flatten() {
        println!(
            "evicted {}  {}",
            blob["digest"].as_str().unwrap_or(""),
            blob["size"]
        );
    }
    println!("freed {} bytes", report["freed_bytes"]);
    Ok(())
}

async fn status(args: ClientArgs) -> Result<(), Failure> {
    let status = Client::new(&args.socket)
        .call(Method::GET, "/v1/status", None)
        .await?;
    if args.json {
        println!("{status}");
        return Ok(());
    }
    println!(
        "node {} (blobstage {})",
        status["node_id"].as_str().unwrap_or("?"),
        status["version"].as_str().unwrap_or("?")
    );
    println!(
        "pulls: {} active, {} queued",
        status["pulls"]["active"], status["pulls"]["queued"]
    );
    println!(
        "store: {} blobs, {} bytes",
        status["store"]["blobs"], status["store"]["bytes"]
    );
    let outbox = &status["outbox"];
    let age = outbox["oldest_age_seconds"]
        .as_u64()
        .map_or(String::new(), |a| format!(", oldest {a} s"));
    println!("outbox: {} events waiting{age}", outbox["depth"]);
    Ok(())
}

fn print_staged(staged: &Staged, json: bool) {
    if json {
        let outcome = serde_json::to_value(staged.outcome).expect("outcomes serialize");
        let line = serde_json::json!({
            "path": staged.path,
            "digest": staged.digest,
            "size": staged.size,
            "bytes_transferred": staged.bytes_transferred,
            "bytes_resumed": staged.bytes_resumed,
            "bytes_read_back": staged.bytes_read_back,
            "connections": staged.connections,
            "seconds": staged.elapsed.as_secs_f64(),
            "outcome": outcome,
        });
        println!("{line}");
    } else {
        println!("{}", staged.path.display());
    }
}

/// The requester of a one-shot command is the process itself.
/// The event of a fetch that failed because its state dir could not be opened (read-only,
/// full): with no outbox to keep it in, it goes to the control plane at once, and is lost only
/// when that fails too.
async fn report_unopened(
    control_plane: &dyn ControlPlane,
    node_id: String,
    id: &ArtifactId,
    code: &str,
) {
    let mut event = Event::new(&node_id, Operation::PullBlob, Outcome::Failed);
    event.artifact_id = Some(id.clone());
    event.error_code = Some(code.to_owned());
    event.requested_by = Some(this_process());
    if let Err(e) = control_plane.report(std::slice::from_ref(&event)).await {
        tracing::warn!(error = %crate::errors::Chain(&e), "the event of this fetch was not recorded");
    }
}

fn this_process() -> Requester {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    Requester {
        uid,
        pid: i32::try_from(std::process::id()).ok(),
    }
}
