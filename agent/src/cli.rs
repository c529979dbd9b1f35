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

use clap::{Parser, Subcommand};
use control_client::{ArtifactId, FileControlPlane, Requester};
use tracing_subscriber::EnvFilter;

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
}

#[derive(Debug, clap::Args)]
struct FetchArgs {
    /// Configuration file.
    #[arg(
        long,
        env = "BLOBSTAGE_CONFIG",
        default_value = "/etc/blobstage/agent.toml"
    )]
    config: PathBuf,
    /// Print one JSON object instead of the path.
    #[arg(long)]
    json: bool,
    /// The registered artifact, e.g. `team-a/llama-3-8b-weights@3`.
    artifact_id: String,
}

/// A failure to report: a stable code, a message, and the exit code.
struct Failure {
    code: &'static str,
    message: String,
    exit: u8,
}

impl Failure {
    fn usage(code: &'static str, message: String) -> Self {
        Failure {
            code,
            message,
            exit: EX_USAGE,
        }
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error[{}]: {}", failure.code, failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

fn fetch(args: FetchArgs) -> Result<(), Failure> {
    let config = Config::load(&args.config)
        .map_err(|e| Failure::usage("config_invalid", crate::errors::Chain(&e).to_string()))?;
    let id = ArtifactId::new(args.artifact_id)
        .map_err(|e| Failure::usage("invalid_artifact_id", e.to_owned()))?;
    init_logging("warn");
    let http =
        crate::source::https::client(&config).map_err(|e| Failure::usage("config_invalid", e))?;
    let control_plane = Arc::new(FileControlPlane::new(
        config.registry_path(),
        config.events_log_path(),
    ));
    let config = Arc::new(config);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blobstage")
        .build()
        .map_err(|e| Failure {
            code: "io_error",
            message: format!("cannot start the runtime: {e}"),
            exit: 1,
        })?;
    let staged = runtime.block_on(async {
        let stager = Stager::new(config, control_plane, http).map_err(|e| Failure {
            code: e.code(),
            message: crate::errors::Chain(&e).to_string(),
            exit: 1,
        })?;
        stager
            .pull(&id, Some(this_process()))
            .await
            .map_err(|e| Failure {
                code: e.code(),
                message: crate::errors::Chain(&e).to_string(),
                exit: 1,
            })
    })?;
    print_staged(&staged, args.json);
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
            "seconds": staged.elapsed.as_secs_f64(),
            "outcome": outcome,
        });
        println!("{line}");
    } else {
        println!("{}", staged.path.display());
    }
}

/// The requester of a one-shot command is the process itself.
fn this_process() -> Requester {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    Requester {
        uid,
        pid: i32::try_from(std::process::id()).ok(),
    }
}

/// Logs to stderr, filtered by `BLOBSTAGE_LOG` (e.g. `debug`, `blobstage=trace`).
fn init_logging(default: &str) {
    let filter =
        EnvFilter::try_from_env("BLOBSTAGE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
