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

#[cfg(test)]
mod tests {
    use super::*;

    async fn readyz_of(ready: &Readiness) -> (StatusCode, String) {
        let state = HttpState {
            ready: ready.clone(),
            metrics: Arc::new(String::new),
        };
        let response = readyz(State(state)).await.into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
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
