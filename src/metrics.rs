//! Prometheus metrics: what was fetched and why, how reads were served, how
//! long FUSE reads and layer mounts took. Served on `--metrics-address` (`endpoint`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// Why bytes were fetched from the registry; variants in priority order.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Cause {
    /// A reader is waiting for them.
    OnDemand,
    /// A sequential reader will want them next.
    ReadAhead,
    /// Prefetch hints (landmarks, recorded profiles).
    Prefetch,
    /// Filling the rest of the layer at the lowest priority.
    Background,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::OnDemand => "on_demand",
            Cause::ReadAhead => "read_ahead",
            Cause::Prefetch => "prefetch",
            Cause::Background => "background",
        }
    }
}

impl EncodeLabelValue for Cause {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Where a chunk wanted by a read was found.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Lookup {
    MemoryHit,
    DiskHit,
    /// Not cached: fetched (or joined a fetch already in flight).
    Miss,
}

impl EncodeLabelValue for Lookup {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Lookup::MemoryHit => "memory_hit",
            Lookup::DiskHit => "disk_hit",
            Lookup::Miss => "miss",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: Cause,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    result: Lookup,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

/// Bytes served and failures per registry endpoint host (mirrors and
/// registries); the registry client keeps a clone and counts into it.
#[derive(Clone, Default, Debug)]
pub struct EndpointMetrics {
    bytes: Family<HostLabels, Counter>,
    failures: Family<HostLabels, Counter>,
}

impl EndpointMetrics {
    /// `bytes` of blob or manifest content received from `host`.
    pub fn served(&self, host: &str, bytes: u64) {
        self.bytes
            .get_or_create(&HostLabels { host: host.to_string() })
            .inc_by(bytes);
    }

    /// A request to `host` failed (it fell over to the next host, or failed the attempt).
    pub fn failure(&self, host: &str) {
        self.failures
            .get_or_create(&HostLabels { host: host.to_string() })
            .inc();
    }

    /// Bytes received from `host` so far.
    pub fn served_total(&self, host: &str) -> u64 {
        self.bytes.get_or_create(&HostLabels { host: host.to_string() }).get()
    }

    /// Failures of `host` so far.
    pub fn failures_total(&self, host: &str) -> u64 {
        self.failures
            .get_or_create(&HostLabels { host: host.to_string() })
            .get()
    }
}

/// The daemon's metrics; cheap to update whether or not they are served.
pub struct Metrics {
    registry: Registry,
    endpoints: EndpointMetrics,
    fetched_bytes: Family<CauseLabels, Counter>,
    fetch_requests: Family<CauseLabels, Counter>,
    chunk_lookups: Family<LookupLabels, Counter>,
    fuse_read_seconds: Histogram,
    layer_mount_seconds: Histogram,
    /// On-demand range requests waiting for admission or on the registry now, every layer together.
    reads_waiting: Gauge,
    quarantined_layers: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("streamsnap");
        let fetched_bytes = Family::<CauseLabels, Counter>::default();
        let fetch_requests = Family::<CauseLabels, Counter>::default();
        let chunk_lookups = Family::<LookupLabels, Counter>::default();
        // 20 µs .. ~40 s: a page-cache-speed read to a stalled registry.
        let fuse_read_seconds = Histogram::new(exponential_buckets(20e-6, 2.0, 22));
        let layer_mount_seconds = Histogram::new(exponential_buckets(1e-3, 2.0, 18));
        registry.register(
            "fetched_bytes",
            "Compressed layer bytes received from registries, by cause",
            fetched_bytes.clone(),
        );
        registry.register(
            "fetch_requests",
            "Range requests made to registries, by cause",
            fetch_requests.clone(),
        );
        registry.register(
            "chunk_lookups",
            "Chunks wanted by reads, by where they were found",
            chunk_lookups.clone(),
        );
        registry.register(
            "fuse_read_seconds",
            "Time from a FUSE read request to its reply",
            fuse_read_seconds.clone(),
        );
        registry.register(
            "layer_mount_seconds",
            "Time to open (index) and mount one layer",
            layer_mount_seconds.clone(),
        );
        let reads_waiting = Gauge::default();
        registry.register(
            "reads_waiting",
            "On-demand range requests waiting for admission or on the registry now",
            reads_waiting.clone(),
        );
        let quarantined_layers = Counter::default();
        registry.register(
            "quarantined_layers",
            "Layers whose filled content failed its check against the layer digest; their reads fail",
            quarantined_layers.clone(),
        );
        let endpoints = EndpointMetrics::default();
        registry.register(
            "registry_endpoint_bytes",
            "Content bytes received per registry endpoint host (mirrors and registries)",
            endpoints.bytes.clone(),
        );
        registry.register(
            "registry_endpoint_failures",
            "Failed requests per registry endpoint host (each fell over to the next host or failed an attempt)",
            endpoints.failures.clone(),
        );
        Arc::new(Self {
            registry,
            endpoints,
            quarantined_layers,
            fetched_bytes,
            fetch_requests,
            chunk_lookups,
            fuse_read_seconds,
            layer_mount_seconds,
            reads_waiting,
        })
    }

    /// The per-endpoint counters, for the registry client (`RegistryOptions::endpoint_metrics`).
    pub fn endpoints(&self) -> EndpointMetrics {
        self.endpoints.clone()
    }

    /// On-demand range requests waiting for admission or on the registry now (set by the scheduler).
    pub fn set_reads_waiting(&self, n: i64) {
        self.reads_waiting.set(n);
    }

    /// A layer was quarantined.
    pub fn quarantined(&self) {
        self.quarantined_layers.inc();
    }

    /// Layers quarantined since start.
    pub fn quarantined_total(&self) -> u64 {
        self.quarantined_layers.get()
    }

    pub fn fetched(&self, cause: Cause, bytes: u64) {
        let l = CauseLabels { cause };
        self.fetched_bytes.get_or_create(&l).inc_by(bytes);
        self.fetch_requests.get_or_create(&l).inc();
    }

    pub fn lookups(&self, result: Lookup, chunks: u64) {
        if chunks > 0 {
            self.chunk_lookups
                .get_or_create(&LookupLabels { result })
                .inc_by(chunks);
        }
    }

    pub fn fuse_read(&self, took: Duration) {
        self.fuse_read_seconds.observe(took.as_secs_f64());
    }

    pub fn layer_mounted(&self, took: Duration) {
        self.layer_mount_seconds.observe(took.as_secs_f64());
    }

    /// Bytes fetched for `cause` so far.
    pub fn fetched_total(&self, cause: Cause) -> u64 {
        self.fetched_bytes.get_or_create(&CauseLabels { cause }).get()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_causes_and_results() {
        let m = Metrics::new();
        m.fetched(Cause::OnDemand, 100);
        m.lookups(Lookup::DiskHit, 2);
        m.fuse_read(Duration::from_micros(300));
        let text = m.encode();
        assert!(
            text.contains("streamsnap_fetched_bytes_total{cause=\"on_demand\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("streamsnap_chunk_lookups_total{result=\"disk_hit\"} 2"),
            "{text}"
        );
        assert!(text.contains("streamsnap_fuse_read_seconds_count 1"), "{text}");
    }
}
