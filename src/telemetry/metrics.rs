//! Prometheus metrics of the server.

use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// Labels of a CreateCertificate outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `issued` or `rejected`.
    pub outcome: &'static str,
    /// Typed rejection reason, `none` when issued.
    pub reason: &'static str,
}

/// Labels with a single `result` dimension.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The result, e.g. `authenticated`, `hit`.
    pub result: &'static str,
}

/// Labels naming a certificate whose expiry is exported.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `root` or `serving`.
    pub cert: &'static str,
}

/// Every metric the server exports. Cloning shares the underlying values.
#[derive(Clone)]
pub struct ServerMetrics {
    /// CreateCertificate requests by outcome and reason.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Seconds from request receipt to response for issued certificates.
    pub issuance_seconds: Histogram,
    /// TokenReview calls to the apiserver by result.
    pub tokenreviews: Family<ResultLabels, Counter>,
    /// Authentication cache lookups by result (`hit_positive`, `hit_negative`, `miss`).
    pub token_cache: Family<ResultLabels, Counter>,
    /// Unix time at which the root / serving certificate expires.
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// Certificates issued without a rate-limit bucket because the limiter tracked its most
    /// keys already (`--issuance-max-keys`).
    pub issuance_limit_untracked: Counter,
    registry: Arc<RwLock<Registry>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Creates and registers the metrics under the `meshid` prefix.
    pub fn new() -> Self {
        let requests = Family::<OutcomeLabels, Counter>::default();
        let issuance_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        let tokenreviews = Family::<ResultLabels, Counter>::default();
        let token_cache = Family::<ResultLabels, Counter>::default();
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        let issuance_limit_untracked = Counter::default();
        let mut registry = Registry::with_prefix("meshid");
        registry.register(
            "certificate_requests",
            "CreateCertificate requests by outcome and rejection reason",
            requests.clone(),
        );
        registry.register(
            "issuance_duration_seconds",
            "Latency of successful CreateCertificate calls",
            issuance_seconds.clone(),
        );
        registry.register(
            "tokenreviews",
            "TokenReview calls by result",
            tokenreviews.clone(),
        );
        registry.register(
            "token_cache_lookups",
            "Token cache lookups by result",
            token_cache.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which the root or serving certificate expires",
            cert_expiry.clone(),
        );
        registry.register(
            "issuance_rate_limit_untracked",
            "Requests admitted without a rate-limit bucket because the limiter was full",
            issuance_limit_untracked.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines (never audit lines) dropped because the log writer fell behind",
            super::DroppedLogLines,
        );
        Self {
            requests,
            issuance_seconds,
            tokenreviews,
            token_cache,
            cert_expiry,
            issuance_limit_untracked,
            registry: Arc::new(RwLock::new(registry)),
        }
    }

    /// A new metric registered as `meshid_{name}` with `help`; the metric returned is the
    /// one exported (its clones share the value).
    pub fn registered<M: Metric + Clone + Default>(&self, name: &str, help: &str) -> M {
        let metric = M::default();
        self.register_with(|r| r.register(name, help, metric.clone()));
        metric
    }

    /// Registers further metrics (e.g. a signer's) in the same registry, under `meshid_`.
    pub fn register_with(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        register(&mut registry);
    }

    /// The registry in Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
