//! Root distribution in every cluster served: one `istio-ca-root-cert` controller per cluster,
//! started when a cluster is registered, restarted when its registration changes (a new
//! kubeconfig) and stopped when it goes. A cluster whose apiserver does not answer only delays its
//! own controller (kube's watcher retries with backoff).

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use super::run_root_configmaps;
use crate::cluster::ClusterSet;
use crate::telemetry::ResultLabels;
use crate::trust::TrustBundle;

/// Runs [`run_root_configmaps`] in each cluster of `clusters` until `shutdown` flips to true.
/// Dropping (aborting) this future aborts every controller it started.
pub async fn run_root_configmaps_everywhere(
    mut clusters: watch::Receiver<Arc<ClusterSet>>,
    trust: watch::Receiver<Arc<TrustBundle>>,
    namespace_selector: Option<String>,
    writes: Family<ResultLabels, Counter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Dropping the set aborts every controller: leadership loss aborts this future.
    let mut tasks = JoinSet::new();
    // cluster ID → (registration generation, the task).
    let mut running: HashMap<String, (u64, AbortHandle)> = HashMap::new();
    loop {
        let set = clusters.borrow_and_update().clone();
        running.retain(|id, (generation, task)| {
            let keep = set
                .iter()
                .any(|c| c.id() == id && c.generation() == *generation);
            if !keep {
                tracing::info!(cluster = %id, "stopping root distribution in a cluster no longer served as before");
                task.abort();
            }
            keep
        });
        for cluster in set.iter() {
            if running.contains_key(cluster.id()) {
                continue;
            }
            tracing::info!(cluster = %cluster.id(), "starting root distribution");
            let task = tasks.spawn(
                run_root_configmaps(
                    cluster.client().clone(),
                    trust.clone(),
                    namespace_selector.clone(),
                    writes.clone(),
                    stop_rx.clone(),
                )
                .instrument(tracing::info_span!("root_configmaps", cluster = %cluster.id())),
            );
            running.insert(cluster.id().to_owned(), (cluster.generation(), task));
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => break,
            r = clusters.changed() => if r.is_err() { break },
        }
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}
