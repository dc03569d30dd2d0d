//! The agent's HTTP endpoints: `/healthz` (process alive), `/readyz` (a valid SVID is held and
//! the SDS socket file is in place) and `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::metrics::AgentMetrics;
use crate::svid::SvidReceiver;

#[derive(Clone)]
struct HttpState {
    svids: SvidReceiver,
    metrics: AgentMetrics,
    sds_serving: watch::Receiver<bool>,
}

/// The probes/metrics router. `sds_serving` is true while the SDS socket file is in place.
pub fn router(
    svids: SvidReceiver,
    metrics: AgentMetrics,
    sds_serving: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(HttpState {
            svids,
            metrics,
            sds_serving,
        })
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let now = OffsetDateTime::now_utc();
    let valid = s
        .svids
        .borrow()
        .as_ref()
        .is_some_and(|svid| svid.not_before <= now && now < svid.not_after);
    if !valid {
        (StatusCode::SERVICE_UNAVAILABLE, "no valid SVID")
    } else if !*s.sds_serving.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "SDS socket missing")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
