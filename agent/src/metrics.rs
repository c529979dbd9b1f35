//! Prometheus metrics: what the daemon counts, and the text a scrape of `/metrics` returns.
//!
//! One [`Metrics`] per [`crate::stage::Stager`], passed by hand rather than held in a global, so
//! that every test and every `fetch` counts on its own. Every name starts with `blobstage_` and
//! follows Prometheus naming (`_total` counters, `_bytes` and `_seconds` units, histograms in
//! seconds). Labels take values from closed sets only: source types, outcomes, the stable error
//! codes, retry reasons, API operations and HTTP statuses. A digest, URI, artifact id, pull id or
//! path is never a label value: each would make a new series per blob.
//!
//! The transfer engine's hot path touches only atomics: [`TransferMetrics`] holds the series of
//! one source type, resolved once per transfer, so a block written costs one relaxed add and no
//! lock or allocation. Gauges of things on disk (store size, outbox) are set at scrape time by
//! the daemon, not kept up to date on every change.

use control_client::{Outcome, SourceType};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::transfer::retry::REASONS;

/// Stage durations, 10 ms to an hour.
const STAGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

/// Time to first byte of a range request, 1 ms to 30 s.
const FIRST_BYTE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The name of an event outcome, as the `outcome` label shows it.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Staged => "staged",
        Outcome::AlreadyPresent => "already_present",
        Outcome::Verified => "verified",
        Outcome::Failed => "failed",
        Outcome::Refused => "refused",
    }
}

/// Every metric of one process, and the registry a scrape encodes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pulls: IntCounterVec,
    pull_errors: IntCounterVec,
    verifies: IntCounterVec,
    verify_errors: IntCounterVec,
    transferred: IntCounterVec,
    resumed: IntCounterVec,
    stage_duration: HistogramVec,
    first_byte: HistogramVec,
    transfers: IntGaugeVec,
    connections: IntGaugeVec,
    retries: IntCounterVec,
    rerequests: IntCounterVec,
    credential_refreshes: IntCounter,
    gc_evicted: IntCounter,
    gc_freed: IntCounter,
    quarantined: IntCounter,
    api_requests: IntCounterVec,
    /// Set by the daemon when it is scraped.
    pub gauges: ScrapeGauges,
}

/// Gauges of state the daemon reads when it is scraped.
#[derive(Debug)]
pub struct ScrapeGauges {
    pub store_bytes: IntGauge,
    pub store_blobs: IntGauge,
    pub ingest_bytes: IntGauge,
    pub pulls_queued: IntGauge,
    pub outbox_events: IntGauge,
    pub outbox_oldest_age: Gauge,
    pub control_plane_up: IntGauge,
}

impl ScrapeGauges {
    fn new(r: &Registry) -> Self {
        ScrapeGauges {
            store_bytes: gauge(r, "store_bytes", help::STORE_BYTES),
            store_blobs: gauge(r, "store_blobs", help::STORE_BLOBS),
            ingest_bytes: gauge(r, "ingest_bytes", help::INGEST),
            pulls_queued: gauge(r, "pulls_queued", help::QUEUED),
            outbox_events: gauge(r, "outbox_events", help::OUTBOX),
            outbox_oldest_age: float_gauge(r, "outbox_oldest_event_age_seconds", help::OLDEST),
            control_plane_up: gauge(r, "control_plane_up", help::UP),
        }
    }
}

/// The help text of every metric.
mod help {
    pub(super) const PULLS: &str = "Pulls that ended, by outcome (one per event).";
    pub(super) const PULL_ERRORS: &str = "Pulls that failed or were refused, by error code.";
    pub(super) const VERIFIES: &str = "Verifies that ended, by outcome (one per event).";
    pub(super) const VERIFY_ERRORS: &str = "Verifies that did not confirm the bytes, by code.";
    pub(super) const TRANSFERRED: &str = "Bytes received from sources, retries included.";
    pub(super) const RESUMED: &str =
        "Bytes an interrupted earlier run left on disk that a transfer kept.";
    pub(super) const STAGE: &str =
        "Time from an admitted pull to its blob in the store, or to its failure.";
    pub(super) const FIRST_BYTE: &str = "Time from sending a range request to its first body byte.";
    pub(super) const TRANSFERS: &str = "Blobs being transferred now.";
    pub(super) const CONNECTIONS: &str = "Requests to sources in flight now.";
    pub(super) const RETRIES: &str = "Requests to sources tried again, by reason.";
    pub(super) const REREQUESTS: &str =
        "Range requests that start past their range's first byte, resuming what was written.";
    pub(super) const REFRESHES: &str =
        "Credentials fetched again because the one held was about to expire or was refused.";
    pub(super) const EVICTED: &str = "Blobs evicted by garbage collection.";
    pub(super) const FREED: &str = "Bytes freed by garbage collection.";
    pub(super) const QUARANTINED: &str =
        "Staged blobs moved to quarantine because they no longer matched their digest.";
    pub(super) const API: &str = "Requests to the local API, by operation and HTTP status.";
    pub(super) const BUILD: &str = "The running build; always 1.";
    pub(super) const STORE_BYTES: &str = "Bytes of verified blobs in the store.";
    pub(super) const STORE_BLOBS: &str = "Verified blobs in the store.";
    pub(super) const INGEST: &str = "Bytes of partial transfers on disk.";
    pub(super) const QUEUED: &str = "Pulls waiting for a transfer slot.";
    pub(super) const OUTBOX: &str = "Events waiting in the outbox for the control plane.";
    pub(super) const OLDEST: &str = "Age of the oldest event in the outbox; 0 when it is empty.";
    pub(super) const UP: &str =
        "1 when the control plane can be used, as /readyz judges it; else 0.";
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered, with a zero series for each source type and outcome so that
    /// a scrape shows them before the first pull.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let (source, outcome, code) = (&["source_type"][..], &["outcome"][..], &["code"][..]);
        let metrics = Metrics {
            pulls: counters(r, "pulls_total", outcome, help::PULLS),
            pull_errors: counters(r, "pull_errors_total", code, help::PULL_ERRORS),
            verifies: counters(r, "verifies_total", outcome, help::VERIFIES),
            verify_errors: counters(r, "verify_errors_total", code, help::VERIFY_ERRORS),
            transferred: counters(r, "transferred_bytes_total", source, help::TRANSFERRED),
            resumed: counters(r, "resumed_bytes_total", source, help::RESUMED),
            stage_duration: histograms(
                r,
                "stage_duration_seconds",
                &["source_type", "outcome"],
                help::STAGE,
                STAGE_BUCKETS,
            ),
            first_byte: histograms(
                r,
                "time_to_first_byte_seconds",
                source,
                help::FIRST_BYTE,
                FIRST_BYTE_BUCKETS,
            ),
            transfers: gauges(r, "transfers_in_flight", source, help::TRANSFERS),
            connections: gauges(r, "connections_in_flight", source, help::CONNECTIONS),
            retries: counters(
                r,
                "retries_total",
                &["source_type", "reason"],
                help::RETRIES,
            ),
            rerequests: counters(r, "range_rerequests_total", source, help::REREQUESTS),
            credential_refreshes: counter(r, "credential_refreshes_total", help::REFRESHES),
            gc_evicted: counter(r, "gc_evicted_blobs_total", help::EVICTED),
            gc_freed: counter(r, "gc_freed_bytes_total", help::FREED),
            quarantined: counter(r, "quarantined_blobs_total", help::QUARANTINED),
            api_requests: counters(r, "api_requests_total", &["operation", "status"], help::API),
            gauges: ScrapeGauges::new(r),
            // A handle on the same registry (it is shared, not copied).
            registry: registry.clone(),
        };
        let info = gauges(r, "build_info", &["version"], help::BUILD);
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.zero_series();
        metrics
    }

    fn zero_series(&self) {
        for outcome in [
            Outcome::Staged,
            Outcome::AlreadyPresent,
            Outcome::Failed,
            Outcome::Refused,
        ] {
            self.pulls.with_label_values(&[outcome_name(outcome)]);
        }
        for outcome in [Outcome::Verified, Outcome::Failed, Outcome::Refused] {
            self.verifies.with_label_values(&[outcome_name(outcome)]);
        }
        for source in SourceType::ALL.map(SourceType::name) {
            self.transferred.with_label_values(&[source]);
            self.resumed.with_label_values(&[source]);
            self.transfers.with_label_values(&[source]);
            self.connections.with_label_values(&[source]);
            self.rerequests.with_label_values(&[source]);
            for reason in REASONS {
                self.retries.with_label_values(&[source, reason]);
            }
        }
    }

    /// The series of one source type, for a transfer to update without lookups.
    pub fn transfer(&self, source: SourceType) -> TransferMetrics {
        let source = source.name();
        TransferMetrics {
            bytes: self.transferred.with_label_values(&[source]),
            connections: self.connections.with_label_values(&[source]),
            first_byte: self.first_byte.with_label_values(&[source]),
            rerequests: self.rerequests.with_label_values(&[source]),
            retries: REASONS.map(|reason| self.retries.with_label_values(&[source, reason])),
        }
    }

    /// A transfer of `source` is under way until the guard is dropped.
    pub fn transfer_in_flight(&self, source: SourceType) -> InFlight {
        InFlight::new(self.transfers.with_label_values(&[source.name()]))
    }

    pub fn resumed(&self, source: SourceType, bytes: u64) {
        self.resumed
            .with_label_values(&[source.name()])
            .inc_by(bytes);
    }

    /// A pull ended with `outcome` (and `code` unless it succeeded): called once per event.
    pub fn pull_ended(&self, outcome: Outcome, code: Option<&str>) {
        self.pulls.with_label_values(&[outcome_name(outcome)]).inc();
        if let Some(code) = code {
            self.pull_errors.with_label_values(&[code]).inc();
        }
    }

    /// A verify ended with `outcome` (and `code` unless it confirmed the bytes).
    pub fn verify_ended(&self, outcome: Outcome, code: Option<&str>) {
        self.verifies
            .with_label_values(&[outcome_name(outcome)])
            .inc();
        if let Some(code) = code {
            self.verify_errors.with_label_values(&[code]).inc();
        }
    }

    pub fn stage_took(&self, source: SourceType, outcome: Outcome, seconds: f64) {
        let labels = [source.name(), outcome_name(outcome)];
        self.stage_duration
            .with_label_values(&labels)
            .observe(seconds);
    }

    pub fn credential_refreshed(&self) {
        self.credential_refreshes.inc();
    }

    pub fn collected(&self, blobs: usize, bytes: u64) {
        self.gc_evicted.inc_by(blobs as u64);
        self.gc_freed.inc_by(bytes);
    }

    pub fn quarantined(&self) {
        self.quarantined.inc();
    }

    /// One API request answered; `operation` and `status` come from closed sets (the routes
    /// and the statuses the API answers).
    pub fn api_request(&self, operation: &'static str, status: u16) {
        let status = status_label(status);
        self.api_requests
            .with_label_values(&[operation, status])
            .inc();
    }

    /// The text exposition format of every metric.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("metrics encode")
    }
}

/// The statuses the API answers, as static label values; anything else is `other`.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        202 => "202",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => "other",
    }
}

/// The metrics of one transfer's source type. Cloning is cheap (each handle is an `Arc`).
#[derive(Debug, Clone)]
pub struct TransferMetrics {
    bytes: IntCounter,
    connections: IntGauge,
    first_byte: Histogram,
    rerequests: IntCounter,
    retries: [IntCounter; REASONS.len()],
}

impl Default for TransferMetrics {
    /// Series in no registry: for a transfer that nobody scrapes.
    fn default() -> Self {
        let counter = || IntCounter::new("detached_total", "-").expect("valid metric");
        let opts = HistogramOpts::new("detached_seconds", "-");
        TransferMetrics {
            bytes: counter(),
            connections: IntGauge::new("detached", "-").expect("valid metric"),
            first_byte: Histogram::with_opts(opts).expect("valid metric"),
            rerequests: counter(),
            retries: REASONS.map(|_| counter()),
        }
    }
}

impl TransferMetrics {
    /// Bytes received: one relaxed atomic add.
    pub fn received(&self, bytes: u64) {
        self.bytes.inc_by(bytes);
    }

    /// A request to the source is in flight until the guard is dropped.
    pub fn connection(&self) -> InFlight {
        InFlight::new(self.connections.clone())
    }

    pub fn first_byte(&self, seconds: f64) {
        self.first_byte.observe(seconds);
    }

    pub fn rerequest(&self) {
        self.rerequests.inc();
    }

    /// A request is tried again for `reason` (one of [`REASONS`]).
    pub fn retry(&self, reason: &str) {
        let index = REASONS.iter().position(|r| *r == reason);
        self.retries[index.unwrap_or(REASONS.len() - 1)].inc();
    }
}

/// Holds a gauge one higher while it lives.
#[derive(Debug)]
pub struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn name(short: &str) -> String {
    format!("blobstage_{short}")
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn counters(registry: &Registry, short: &str, labels: &[&str], help: &str) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name(short), help), labels).expect("valid metric");
    register(registry, vec)
}

fn gauges(registry: &Registry, short: &str, labels: &[&str], help: &str) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name(short), help), labels).expect("valid metric");
    register(registry, vec)
}

fn histograms(
    registry: &Registry,
    short: &str,
    labels: &[&str],
    help: &str,
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name(short), help).buckets(buckets.to_vec());
    register(
        registry,
        HistogramVec::new(opts, labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, short: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name(short), help).expect("valid metric"),
    )
}

fn gauge(registry: &Registry, short: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name(short), help).expect("valid metric"),
    )
}

fn float_gauge(registry: &Registry, short: &str, help: &str) -> Gauge {
    register(
        registry,
        Gauge::new(name(short), help).expect("valid metric"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_the_prefix_and_counters_end_in_total() {
        let metrics = Metrics::new();
        metrics.pull_ended(Outcome::Failed, Some("digest_mismatch"));
        metrics.transfer(SourceType::S3).first_byte(0.2);
        for family in metrics.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("blobstage_"), "{name}");
            let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(counter, name.ends_with("_total"), "{name}");
            assert!(!family.help().is_empty(), "{name} has no help");
        }
    }

    #[test]
    fn a_transfer_counts_into_its_source_type_and_unknown_retry_reasons_into_other() {
        let metrics = Metrics::new();
        let transfer = metrics.transfer(SourceType::Gcs);
        transfer.received(10);
        transfer.retry("throttled");
        transfer.retry("not-a-reason");
        {
            let _connection = transfer.connection();
            assert_eq!(metrics.connections.with_label_values(&["gcs"]).get(), 1);
        }
        assert_eq!(metrics.connections.with_label_values(&["gcs"]).get(), 0);
        assert_eq!(metrics.transferred.with_label_values(&["gcs"]).get(), 10);
        assert_eq!(metrics.transferred.with_label_values(&["https"]).get(), 0);
        assert_eq!(
            metrics
                .retries
                .with_label_values(&["gcs", "throttled"])
                .get(),
            1
        );
        assert_eq!(
            metrics.retries.with_label_values(&["gcs", "other"]).get(),
            1
        );
        assert_eq!(status_label(418), "other");
    }
}
