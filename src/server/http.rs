//! HTTP endpoints: `/healthz` (process alive), `/readyz` (signer and trust bundle loaded and the
//! gRPC listener serving) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// A line of detail appended to the `/readyz` body (it never changes the status).
pub type ReadinessDetail = Arc<dyn Fn() -> String + Send + Sync>;

/// Readiness flag shared between the server and the probe endpoint, with optional detail lines
/// (such as the leader Lease state) that are informative only.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    detail: Arc<std::sync::OnceLock<ReadinessDetail>>,
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

    /// Sets (once) what `/readyz` adds after its first line.
    pub fn set_detail(&self, detail: ReadinessDetail) {
        let _ = self.detail.set(detail);
    }

    fn detail(&self) -> String {
        self.detail.get().map(|d| d()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct HttpState {
    ready: Readiness,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

/// The probes/metrics router. `metrics` renders the Prometheus text exposition.
pub fn http_router(ready: Readiness, metrics: Arc<dyn Fn() -> String + Send + Sync>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(HttpState { ready, metrics })
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let detail = s.ready.detail();
    let sep = if detail.is_empty() { "" } else { "\n" };
    if s.ready.get() {
        (StatusCode::OK, format!("ready{sep}{detail}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready{sep}{detail}"),
        )
    }
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (s.metrics)(),
    )
}
