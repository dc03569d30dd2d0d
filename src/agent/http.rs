//! The agent's HTTP endpoints: `/healthz` (process alive), `/readyz` (a valid SVID is held and
//! the SDS socket file is in place) and `/metrics` (Prometheus text format).

use std::sync::Arc;

use axum::Router;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::metrics::AgentMetrics;
use crate::svid::SvidReceiver;
use crate::telemetry::probes_router;

/// The probes/metrics router ([`probes_router`]). `sds_serving` is true while the SDS socket
/// file is in place.
pub fn router(
    svids: SvidReceiver,
    metrics: AgentMetrics,
    sds_serving: watch::Receiver<bool>,
) -> Router {
    let ready = move || {
        let (ok, body) = readiness(&svids, &sds_serving, OffsetDateTime::now_utc());
        (ok, body.to_owned())
    };
    probes_router(Arc::new(ready), Arc::new(move || metrics.encode()))
}

/// Ready while a valid SVID is held and the SDS socket file is in place.
fn readiness(
    svids: &SvidReceiver,
    sds_serving: &watch::Receiver<bool>,
    now: OffsetDateTime,
) -> (bool, &'static str) {
    let valid = svids
        .borrow()
        .as_ref()
        .is_some_and(|svid| svid.not_before <= now && now < svid.not_after);
    if !valid {
        (false, "no valid SVID")
    } else if !*sds_serving.borrow() {
        (false, "SDS socket missing")
    } else {
        (true, "ready")
    }
}
