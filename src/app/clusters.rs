//! The cluster registry of a server that talks to Kubernetes: the local cluster, the remote
//! kubeconfig files, and (when configured) the watch on remote Secrets and the probes.

use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cluster::{ClusterLabels, ClusterRegistry, watch_remote_secrets};
use crate::config::RemoteClusters;
use crate::server::Readiness;
use crate::telemetry::ServerMetrics;

/// The registry and what keeps it current.
pub(super) struct Clusters {
    /// Every cluster served.
    pub registry: Arc<ClusterRegistry>,
    client: kube::Client,
    secrets_namespace: Option<String>,
}

impl Clusters {
    /// The local cluster `local_id` reached with `client`, and the remote kubeconfig files of
    /// `remote` (an unusable file is reported, never fatal). Registers
    /// `meshid_remote_cluster_ready{cluster}`.
    pub async fn build(
        local_id: &str,
        client: kube::Client,
        remote: &RemoteClusters,
        metrics: &ServerMetrics,
    ) -> Self {
        let ready: Family<ClusterLabels, Gauge> = metrics.registered(
            "remote_cluster_ready",
            "1 when the remote cluster's apiserver answers and lets meshid create TokenReviews, \
             0 when it does not or its kubeconfig is unusable",
        );
        let registry = Arc::new(ClusterRegistry::new(
            local_id.to_owned(),
            client.clone(),
            ready,
        ));
        for (id, path) in &remote.kubeconfigs {
            registry.add_file(id, path.clone()).await;
        }
        Self {
            registry,
            client,
            secrets_namespace: remote.secrets_namespace.clone(),
        }
    }

    /// Adds the clusters' states to `/readyz`.
    pub fn report_to(&self, readiness: &Readiness) {
        let registry = self.registry.clone();
        readiness.set_detail(Arc::new(move || registry.describe()));
    }

    /// Starts the remote-Secret watch (when configured) and the probes of remote clusters.
    pub fn spawn(self, tasks: &mut JoinSet<()>, shutdown: &watch::Receiver<bool>) {
        if let Some(namespace) = self.secrets_namespace {
            tracing::info!(%namespace, "watching remote secrets");
            tasks.spawn(watch_remote_secrets(
                self.client,
                namespace,
                self.registry.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(self.registry.run_probes(shutdown.clone()));
    }
}
