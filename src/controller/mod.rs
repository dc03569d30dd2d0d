//! Kubernetes controllers, run only by the replica holding the leader Lease: root ConfigMap
//! distribution and (optionally) istiod's serving certificate.

mod every_cluster;
mod istiod_cert;
mod leader;
mod root_configmap;
mod signing_roots;

pub(crate) use signing_roots::InUse;
pub use signing_roots::{SigningRoots, SigningRootsError, SigningRootsSettings, compose};

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

pub use every_cluster::run_root_configmaps_everywhere;
pub use istiod_cert::{IstiodCertSettings, run_istiod_cert};
pub use leader::{LeaseObserver, LeaseSettings, spawn_elector};
pub use root_configmap::run_root_configmaps;

use crate::cluster::ClusterSet;
use crate::signer::Signer;
use crate::telemetry::ResultLabels;
use crate::trust::TrustBundle;

/// What the leader runs.
#[derive(Clone)]
pub struct Controllers {
    /// Kubernetes client of the local cluster.
    pub client: kube::Client,
    /// Every cluster served, when there are remote ones: root distribution then runs in each.
    pub clusters: Option<watch::Receiver<Arc<ClusterSet>>>,
    /// Current trust bundle.
    pub trust: watch::Receiver<Arc<TrustBundle>>,
    /// Signer, for the istiod certificate.
    pub signer: Arc<dyn Signer>,
    /// Distribute `istio-ca-root-cert`?
    pub root_configmaps: bool,
    /// Namespace label selector for root distribution.
    pub namespace_selector: Option<String>,
    /// istiod certificate settings, when enabled.
    pub istiod: Option<IstiodCertSettings>,
    /// ConfigMap writes by result.
    pub configmap_writes: Family<ResultLabels, Counter>,
}

impl Controllers {
    /// Runs the controllers while `leading` is true, stops them within one lease retry period
    /// of losing it, and returns at `shutdown`.
    pub async fn run_while_leading(
        self,
        mut leading: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|v| *v) => return,
                r = leading.wait_for(|v| *v) => if r.is_err() { return },
            }
            tracing::info!("leading: starting controllers");
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut tasks = tokio::task::JoinSet::new();
            match (&self.clusters, self.root_configmaps) {
                (_, false) => {}
                (None, true) => {
                    tasks.spawn(run_root_configmaps(
                        self.client.clone(),
                        self.trust.clone(),
                        self.namespace_selector.clone(),
                        self.configmap_writes.clone(),
                        stop_rx.clone(),
                    ));
                }
                (Some(clusters), true) => {
                    tasks.spawn(run_root_configmaps_everywhere(
                        clusters.clone(),
                        self.trust.clone(),
                        self.namespace_selector.clone(),
                        self.configmap_writes.clone(),
                        stop_rx.clone(),
                    ));
                }
            }
            if let Some(s) = self.istiod.clone() {
                tasks.spawn(run_istiod_cert(
                    self.client.clone(),
                    self.signer.clone(),
                    self.trust.clone(),
                    s,
                    stop_rx.clone(),
                ));
            }
            tokio::select! {
                _ = shutdown.wait_for(|v| *v) => {}
                _ = leading.wait_for(|v| !*v) => {}
            };
            let _ = stop_tx.send(true);
            // On shutdown the elector also drops leadership: whichever came first, a shutdown
            // is a shutdown.
            if *shutdown.borrow() {
                while tasks.join_next().await.is_some() {}
                tracing::info!("shutting down: controllers stopped");
                return;
            }
            // Controllers stop at once when leadership is lost: abort rather than drain.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            tracing::warn!("controllers stopped after losing leadership");
        }
    }
}
