//! Prometheus metrics of the AWS Private CA signer, registered under `meshid_pca_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::api::Api;

/// Labels of one PCA call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The operation, e.g. `IssueCertificate`.
    pub api: &'static str,
    /// `ok` or an [`super::ApiError::outcome`] label.
    pub outcome: &'static str,
}

/// Labels naming an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// The operation.
    pub api: &'static str,
}

/// Labels naming what a PCA-issued certificate is.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `leaf` (direct mode) or `intermediate`.
    pub kind: &'static str,
}

type LatencyFamily = Family<ApiLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

/// The signer's metrics. Cloning shares the values.
#[derive(Clone, Debug)]
pub struct PcaMetrics {
    /// Calls by operation and outcome (every HTTP request, retries included).
    pub calls: Family<CallLabels, Counter>,
    /// Throttling responses by operation.
    pub throttles: Family<ApiLabels, Counter>,
    /// Latency of each call.
    pub latency: LatencyFamily,
    /// Certificates PCA issued for us (what PCA bills for).
    pub certificates_issued: Family<KindLabels, Counter>,
    /// Requests served from another identical in-flight request.
    pub coalesced: Counter,
    /// Requests refused because too many were waiting.
    pub rejected_queue_full: Counter,
}

impl Default for PcaMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            throttles: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            certificates_issued: Family::default(),
            coalesced: Counter::default(),
            rejected_queue_full: Counter::default(),
        }
    }
}

impl PcaMetrics {
    /// Registers every metric in `registry` (meant to be the server's, with prefix `meshid`),
    /// under the sub-prefix `pca`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pca");
        r.register(
            "calls",
            "AWS Private CA API calls by operation and outcome",
            self.calls.clone(),
        );
        r.register(
            "throttles",
            "AWS Private CA throttling responses by operation",
            self.throttles.clone(),
        );
        r.register(
            "call_duration_seconds",
            "Latency of AWS Private CA API calls",
            self.latency.clone(),
        );
        r.register(
            "certificates_issued",
            "Certificates issued by AWS Private CA for meshid (the billed quantity)",
            self.certificates_issued.clone(),
        );
        r.register(
            "coalesced_requests",
            "Signing requests answered by an identical request already in flight",
            self.coalesced.clone(),
        );
        r.register(
            "rejected_requests",
            "Signing requests refused because too many were waiting for AWS Private CA",
            self.rejected_queue_full.clone(),
        );
    }

    /// Counts one call.
    pub(crate) fn observe(&self, api: Api, outcome: &'static str, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels {
                api: api.name(),
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&ApiLabels { api: api.name() })
            .observe(seconds);
        if outcome == "throttled" {
            self.throttles
                .get_or_create(&ApiLabels { api: api.name() })
                .inc();
        }
    }

    /// The number of calls of `api` so far, any outcome.
    pub fn calls_of(&self, api: Api) -> u64 {
        [
            "ok",
            "throttled",
            "in_progress",
            "not_found",
            "invalid_arn",
            "access_denied",
            "no_credentials",
            "invalid_state",
            "malformed_csr",
            "invalid_args",
            "issuance_failed",
            "limit_exceeded",
            "transient",
            "error",
        ]
        .iter()
        .map(|outcome| {
            self.calls
                .get(&CallLabels {
                    api: api.name(),
                    outcome,
                })
                .map(|c| c.get())
                .unwrap_or(0)
        })
        .sum()
    }

    /// Certificates issued of `kind` (`leaf` or `intermediate`).
    pub fn issued(&self, kind: &'static str) -> u64 {
        self.certificates_issued
            .get(&KindLabels { kind })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}
