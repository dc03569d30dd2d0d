//! The HTTP probes and metrics router shared by the server and the agent: `/healthz` (the
//! process is alive), `/readyz` (what the role's readiness check says) and `/metrics`
//! (Prometheus text format).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// `/readyz`: whether the role is ready, and the body to answer with.
pub type ReadinessCheck = Arc<dyn Fn() -> (bool, String) + Send + Sync>;
/// `/metrics`: renders the Prometheus text exposition.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct ProbeState {
    ready: ReadinessCheck,
    metrics: MetricsText,
}

/// The probes/metrics router: `/readyz` answers 200 when `ready` says so, else 503, with its
/// body; `/metrics` answers what `metrics` renders.
pub fn probes_router(ready: ReadinessCheck, metrics: MetricsText) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(ProbeState { ready, metrics })
}

async fn readyz(State(s): State<ProbeState>) -> impl IntoResponse {
    let (ready, body) = (s.ready)();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics_handler(State(s): State<ProbeState>) -> impl IntoResponse {
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
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, Option<String>, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn readyz_answers_what_the_check_says_and_metrics_what_the_renderer_renders() {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let check: ReadinessCheck = {
            let ready = ready.clone();
            Arc::new(move || {
                let r = ready.load(std::sync::atomic::Ordering::SeqCst);
                (r, if r { "ready" } else { "not yet" }.to_owned())
            })
        };
        let router = probes_router(check, Arc::new(|| "# EOF\n".to_owned()));
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not yet")
        );
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready"));
        let (status, content_type, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert_eq!(body, "# EOF\n");
        assert_eq!(get(&router, "/other").await.0, StatusCode::NOT_FOUND);
    }
}
