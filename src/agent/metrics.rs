//! The agent's Prometheus metrics (prefix `meshid_agent`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::sds::SdsMetrics;

/// Labels of a failed rotation attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// See [`super::RotationError::reason`].
    pub reason: &'static str,
}

/// Every metric the agent exports. Cloning shares the underlying values.
#[derive(Clone)]
pub struct AgentMetrics {
    /// SVIDs obtained and published.
    pub rotations: Counter,
    /// Failed rotation attempts by reason.
    pub failures: Family<ReasonLabels, Counter>,
    /// Unix time at which the published SVID expires (0 before the first one).
    pub expiry: Gauge,
    /// Seconds until the published SVID expires, computed at scrape time (negative once
    /// expired, absent before the first one).
    expires_in: Gauge,
    /// SDS streams, pushes and NACKs.
    pub sds: SdsMetrics,
    registry: Arc<Registry>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshid_agent");
        let rotations = Counter::default();
        let failures = Family::<ReasonLabels, Counter>::default();
        let expiry = Gauge::default();
        let expires_in = Gauge::default();
        let sds = SdsMetrics::default();
        registry.register(
            "rotations",
            "SVIDs obtained, validated and published",
            rotations.clone(),
        );
        registry.register(
            "rotation_failures",
            "Failed SVID rotation attempts by reason",
            failures.clone(),
        );
        registry.register(
            "svid_expiry_timestamp_seconds",
            "Unix time at which the current SVID expires",
            expiry.clone(),
        );
        registry.register(
            "svid_expires_in_seconds",
            "Seconds until the current SVID expires (negative once expired)",
            expires_in.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer fell behind",
            crate::telemetry::DroppedLogLines,
        );
        sds.register(registry.sub_registry_with_prefix("sds"));
        Self {
            rotations,
            failures,
            expiry,
            expires_in,
            sds,
            registry: Arc::new(registry),
        }
    }

    /// Counts a failed rotation attempt.
    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Records the expiry of the SVID just published.
    pub fn set_expiry(&self, not_after: OffsetDateTime) {
        self.expiry.set(not_after.unix_timestamp());
    }

    /// The registry in Prometheus text format, with the time-to-expiry computed for `now`.
    pub fn encode_at(&self, now: OffsetDateTime) -> String {
        let expiry = self.expiry.get();
        if expiry > 0 {
            self.expires_in.set(expiry - now.unix_timestamp());
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// [`Self::encode_at`] the current time.
    pub fn encode(&self) -> String {
        self.encode_at(OffsetDateTime::now_utc())
    }
}
