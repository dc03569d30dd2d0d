//! HTTP endpoints: `/healthz` (process alive), `/readyz` (signer and trust bundle loaded and the
//! gRPC listener serving) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;

use crate::telemetry::{MetricsText, probes_router};

/// A line of detail appended to the `/readyz` body (it never changes the status).
pub type ReadinessDetail = Arc<dyn Fn() -> String + Send + Sync>;

/// Readiness flag shared between the server and the probe endpoint, with optional detail lines
/// (such as the leader Lease state) that are informative only.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    detail: Arc<std::sync::Mutex<Vec<ReadinessDetail>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.get())
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// Marks the server ready (or not).
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the server is ready.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Adds lines to what `/readyz` prints after its first line (in the order added).
    pub fn set_detail(&self, detail: ReadinessDetail) {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(detail);
    }

    fn detail(&self) -> String {
        let details = self
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        details.iter().map(|d| d()).collect::<Vec<_>>().join("\n")
    }
}

/// The probes/metrics router ([`probes_router`]): `/readyz` says "ready" or "not ready" (200 or
/// 503), followed by the readiness detail. `metrics` renders the Prometheus text exposition.
pub fn http_router(ready: Readiness, metrics: MetricsText) -> Router {
    probes_router(Arc::new(move || ready.report()), metrics)
}

impl Readiness {
    /// Whether the server is ready, and the `/readyz` body.
    fn report(&self) -> (bool, String) {
        let detail = self.detail();
        let sep = if detail.is_empty() { "" } else { "\n" };
        if self.get() {
            (true, format!("ready{sep}{detail}"))
        } else {
            (false, format!("not ready{sep}{detail}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    async fn readyz_of(ready: &Readiness) -> (StatusCode, String) {
        let (ok, body) = ready.report();
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body)
    }

    #[tokio::test]
    async fn the_readiness_detail_is_informative_and_never_changes_the_status() {
        let ready = Readiness::default();
        ready.set(true);
        assert_eq!(readyz_of(&ready).await, (StatusCode::OK, "ready".into()));
        ready.set_detail(Arc::new(|| "lease l: unknown (cannot be read)".into()));
        assert_eq!(
            readyz_of(&ready).await,
            (
                StatusCode::OK,
                "ready\nlease l: unknown (cannot be read)".into()
            )
        );
        ready.set(false);
        assert_eq!(readyz_of(&ready).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
