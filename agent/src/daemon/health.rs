//! The loopback TCP listener (`[api] metrics_listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! `/healthz` says the process answers. `/readyz` says it can do its job: the store's
//! directories exist, the API socket is still at its path, and the control plane can be used
//! ([`ControlPlaneCheck`]: never a network call per check). Its body names what is missing.
//! `/metrics` is the Prometheus text format of the stager's [`crate::metrics::Metrics`], with
//! the gauges of state on disk (store, ingest, outbox) read at the moment of the scrape, off
//! the async runtime.

use std::convert::Infallible;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::HEADER_TIMEOUT;
use super::probe::ControlPlaneCheck;
use super::pulls::Pulls;
use crate::config::Config;

/// What the health listener reads.
#[derive(Debug)]
pub struct Health {
    pub config: Arc<Config>,
    pub pulls: Arc<Pulls>,
    pub control_plane: ControlPlaneCheck,
}

impl Health {
    /// Whether the store's directories are there to stage into.
    pub fn store_usable(&self) -> bool {
        let state = &self.config.state_dir;
        state.join("blobs").is_dir() && state.join("ingest").is_dir()
    }

    /// `Ok` when the store, the API socket and the control plane can be used; else what not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.store_usable() {
            let state = self.config.state_dir.display();
            return Err(format!("the store in {state} cannot be used"));
        }
        let socket = &self.config.api.socket;
        let bound = std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket());
        if !bound {
            return Err(format!("the API socket {} is gone", socket.display()));
        }
        self.control_plane.usable()
    }

    /// Sets the gauges of state on disk and encodes every metric.
    async fn scrape(self: &Arc<Self>) -> String {
        let metrics = self.pulls.stager().metrics();
        let up = self.control_plane.usable().is_ok();
        metrics.gauges.control_plane_up.set(i64::from(up));
        let this = self.clone();
        let read = tokio::task::spawn_blocking(move || this.read_state()).await;
        // A store that cannot be read is what /readyz reports; the scrape shows the last values.
        if let Ok(Err(e)) = read {
            tracing::debug!(error = %e, "cannot read the store for /metrics");
        }
        metrics.encode()
    }

    /// Blocking: lists the store and the outbox.
    fn read_state(&self) -> Result<(), String> {
        let stager = self.pulls.stager();
        let gauges = &stager.metrics().gauges;
        let outbox = stager.outbox();
        gauges.outbox_events.set(outbox.depth() as i64);
        let age = outbox.oldest_age().unwrap_or_default();
        gauges.outbox_oldest_age.set(age.as_secs_f64());
        gauges.pulls_queued.set(self.pulls.counts().1 as i64);

        let chain = |e: crate::store::StoreError| crate::errors::Chain(&e).to_string();
        let blobs = stager.store().list().map_err(chain)?;
        gauges.store_blobs.set(blobs.len() as i64);
        let bytes: u64 = blobs.iter().map(|(_, _, size)| size).sum();
        gauges.store_bytes.set(bytes as i64);
        let ingest = stager.store().ingest_bytes().map_err(chain)?;
        gauges.ingest_bytes.set(ingest as i64);
        Ok(())
    }

    async fn answer(self: Arc<Self>, path: &str) -> Response<Full<Bytes>> {
        match path {
            "/healthz" => text(StatusCode::OK, "ok".into()),
            "/readyz" => match self.readiness() {
                Ok(()) => text(StatusCode::OK, "ready".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
            },
            "/metrics" => {
                let body = self.scrape().await;
                let kind = prometheus::TEXT_FORMAT;
                response(StatusCode::OK, kind, body)
            }
            _ => text(StatusCode::NOT_FOUND, "not found".into()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
}

fn response(status: StatusCode, kind: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, kind)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Serves the listener until `stopping` fires.
pub async fn serve(listener: TcpListener, health: Arc<Health>, stopping: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = stopping.cancelled() => return,
        };
        let health = health.clone();
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let health = health.clone();
            async move { Ok::<_, Infallible>(health.answer(request.uri().path()).await) }
        });
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
        });
    }
}
