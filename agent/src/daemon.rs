//! `blobstage serve`: the daemon runtime operators talk to.
//!
//! Binds the local API on the Unix socket (its directory created, a stale socket replaced, mode
//! 0660) and the health listener on loopback TCP (`/healthz`, `/readyz`, `/metrics`: see
//! [`health`]), tells systemd it is ready ([`notify`]), serves until SIGTERM or SIGINT, then stops
//! accepting, cancels the pulls in flight so that each checkpoints for a later resume, waits up
//! to `shutdown_grace` for them, and returns. Peers are checked by the credentials of their
//! socket: root and the daemon's own user, or exactly the configured `allowed_uids` and
//! `allowed_gids` when either is set; anyone else gets 403 and a refused event.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use control_client::{ControlPlane, Outcome, Requester};
use hyper::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::stage::Stager;

pub mod api;
pub mod health;
pub mod leases;
pub mod notify;
pub mod probe;
pub mod pulls;

use api::{Api, ApiError};
use health::Health;
use leases::Leases;
use pulls::{Pulls, Watermarks};

/// How long a client may take to send a request's headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("cannot bind {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Stage(#[from] crate::stage::StageError),
    #[error("the store in {} cannot be used", path.display())]
    Store { path: std::path::PathBuf },
    #[error("cannot read the leases in {}", path.display())]
    Leases {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon{} serves the state dir {}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default(), path.display())]
    InUse {
        path: std::path::PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// The stable code printed as `error[code]` when the daemon cannot start or stops.
    pub fn code(&self) -> &'static str {
        match self {
            DaemonError::Stage(e) => e.code(),
            DaemonError::InUse { .. } => "state_dir_in_use",
            DaemonError::Lock { source, .. } | DaemonError::Leases { source, .. } => {
                crate::errors::io_code(source)
            }
            DaemonError::Bind { .. } | DaemonError::Store { .. } => "io_error",
        }
    }
}

/// Makes this the one daemon of its state dir: an exclusive lock on `<state_dir>/daemon.lock`,
/// held for the life of the returned file, which names this process's pid. Two daemons on one
/// state dir would each keep their own leases and queue, and evict what the other leased. A
/// `fetch` takes no such lock: it coordinates through the per-ingest locks. The lock is held
/// through a read-only descriptor, so that the daemon keeps no file of the state dir open for
/// writing (which would stop an operator from remounting it read-only).
fn lock_state_dir(state_dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("daemon.lock");
    let fail = |source| DaemonError::Lock {
        path: path.clone(),
        source,
    };
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
    };
    let mut writer = open(true).map_err(fail)?;
    let mut held = open(false).map_err(fail)?;
    match held.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = held.read_to_string(&mut text);
            let holder = text.trim().parse().ok();
            return Err(DaemonError::InUse { path, holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(fail(e)),
    }
    writer
        .set_len(0)
        .and_then(|()| writeln!(writer, "{}", std::process::id()))
        .map_err(fail)?;
    Ok(held)
}

/// Who may use the socket.
#[derive(Debug, Clone)]
struct Peers {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Peers {
    fn new(config: &Config) -> Self {
        let api = &config.api;
        if api.allowed_uids.is_empty() && api.allowed_gids.is_empty() {
            let own = std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0);
            return Peers {
                uids: vec![0, own],
                gids: Vec::new(),
            };
        }
        Peers {
            uids: api.allowed_uids.clone(),
            gids: api.allowed_gids.clone(),
        }
    }

    fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Runs the daemon until a termination signal, then shuts down gracefully.
pub async fn serve(
    config: Arc<Config>,
    control_plane: Arc<dyn ControlPlane>,
    http: reqwest::Client,
) -> Result<(), DaemonError> {
    let (control_plane, check) = probe::watch(&config, control_plane);
    let stager = Arc::new(Stager::new(config.clone(), control_plane, http)?);
    let _one_daemon = lock_state_dir(&config.state_dir)?;
    let path = config.state_dir.join("leases.json");
    let leases =
        Leases::load(path.clone()).map_err(|source| DaemonError::Leases { path, source })?;
    let watermarks = Watermarks {
        high: config.store.high_watermark.map(|s| s.0),
        low: config.store.low_watermark.map(|s| s.0),
    };
    let outbox = stager.outbox().clone();
    let pulls = Pulls::new(stager, config.transfer.max_transfers, leases, watermarks);
    let stopping = CancellationToken::new();
    let api = Arc::new(Api {
        pulls: pulls.clone(),
        shutting_down: stopping.clone(),
    });
    // Before READY: a SIGTERM that comes right after it must find the handlers in place.
    let signals = Signals::new();

    let socket = bind_socket(&config.api.socket)?;
    let listener = TcpListener::bind(config.api.metrics_listen)
        .await
        .map_err(|source| DaemonError::Bind {
            what: config.api.metrics_listen.to_string(),
            source,
        })?;
    let metrics = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    log_configuration(&config);
    info!(socket = %config.api.socket.display(), %metrics, "listening");

    let health = Arc::new(Health {
        config: config.clone(),
        pulls: pulls.clone(),
        control_plane: check,
    });
    if !health.store_usable() {
        return Err(DaemonError::Store {
            path: config.state_dir.clone(),
        });
    }
    health.control_plane.refresh();
    let peers = Peers::new(&config);
    let serving = tokio::spawn(accept_socket(socket, api, peers, stopping.clone()));
    let checks = tokio::spawn(health::serve(listener, health.clone(), stopping.clone()));
    let stop_delivery = CancellationToken::new();
    let delivery = tokio::spawn(outbox.clone().run(stop_delivery.clone()));
    let notifier = notify::Notifier::from_env();
    let watchdog = watch_over(&notifier, &pulls, &health, &stopping);
    notifier.ready("serving");
    signals.wait().await;

    info!("shutting down");
    stopping.cancel();
    // The last ping is out before STOPPING, never after it.
    if let Some(watchdog) = watchdog {
        let _ = watchdog.await;
    }
    notifier.stopping();
    let finished = pulls.shut_down(config.transfer.shutdown_grace).await;
    if !finished {
        warn!(grace = ?config.transfer.shutdown_grace, "transfers did not stop within the grace period");
    }
    serving.abort();
    checks.abort();
    // One last delivery of what the stopped pulls recorded; what is left waits on disk.
    stop_delivery.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), delivery).await;
    if outbox.depth() > 0 {
        info!(
            events = outbox.depth(),
            "events wait in the outbox for the next start"
        );
    }
    let _ = std::fs::remove_file(&config.api.socket);
    info!("stopped");
    Ok(())
}

/// Under systemd: the pulse of the pull scheduler, and the watchdog task that reads it (its
/// handle is returned; it ends when `stopping` fires).
fn watch_over(
    notifier: &notify::Notifier,
    pulls: &Arc<Pulls>,
    health: &Arc<Health>,
    stopping: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !notifier.is_on() {
        return None;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let (_, beat_every) = notify::intervals(watchdog);
    let pulse = Arc::new(notify::Pulse::default());
    let scheduler = pulls.clone();
    let probe: notify::Probe = Arc::new(move || {
        let (active, queued) = scheduler.counts();
        notify::Snapshot {
            active,
            queued,
            bytes_done: scheduler.bytes_done(),
            events_waiting: scheduler.stager().outbox().depth(),
        }
    });
    tokio::spawn(notify::beat(
        pulse.clone(),
        beat_every,
        probe,
        stopping.clone(),
    ));
    let health = health.clone();
    let usable = move || health.store_usable();
    let notifier = notifier.clone();
    let pinging = notify::keep_alive(notifier, pulse, watchdog, usable, stopping.clone());
    Some(tokio::spawn(pinging))
}

/// The settings an operator checks first, once at start-up.
fn log_configuration(config: &Config) {
    let cp = &config.control_plane;
    let control_plane = match &cp.url {
        Some(url) => crate::redact::Redacted::uri(url).to_string(),
        None => format!("file {}", config.registry_path().display()),
    };
    let t = &config.transfer;
    info!(
        state_dir = %config.state_dir.display(),
        node = %config.node_id(),
        %control_plane,
        chunk_size = %t.chunk_size,
        connections_per_blob = t.connections_per_blob,
        max_connections = t.max_connections,
        max_transfers = t.max_transfers,
        log_format = config.log.format.name(),
        "configuration"
    );
}

fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    let bind_error = |source| DaemonError::Bind {
        what: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(bind_error)?
        }
        Ok(_) => {
            let exists = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a socket");
            return Err(bind_error(exists));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    let mode = std::fs::Permissions::from_mode(0o660);
    std::fs::set_permissions(path, mode).map_err(bind_error)?;
    Ok(listener)
}

async fn accept_socket(
    listener: UnixListener,
    api: Arc<Api>,
    peers: Peers,
    stopping: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopping.cancelled() => return,
        };
        tokio::spawn(serve_peer(stream, api.clone(), peers.clone()));
    }
}

async fn serve_peer(stream: UnixStream, api: Arc<Api>, peers: Peers) {
    let Ok(credentials) = stream.peer_cred() else {
        return;
    };
    let (uid, gid) = (credentials.uid(), credentials.gid());
    let requester = Requester {
        uid,
        pid: credentials.pid(),
    };
    let allowed = peers.allows(uid, gid);
    let service = service_fn(move |request| {
        let api = api.clone();
        async move {
            if allowed {
                return Ok::<_, Infallible>(api.handle(request, requester).await);
            }
            let stager = api.pulls.stager();
            let status = StatusCode::FORBIDDEN.as_u16();
            stager
                .metrics()
                .api_request(api::operation(&request), status);
            stager
                .record_unstaged(
                    None,
                    None,
                    Outcome::Refused,
                    "peer_not_allowed",
                    Some(requester),
                )
                .await;
            let message = format!("uid {uid} may not use this socket");
            Ok(ApiError::new(StatusCode::FORBIDDEN, "peer_not_allowed", message).into_response())
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let _ = connection.await;
}

/// SIGTERM and SIGINT, caught from the moment this is made.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            terminate: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            interrupt: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
