//! Watches the remote Secrets in meshid's namespace: Istio's format, as
//! `istioctl create-remote-secret` writes it (label `istio/multiCluster: "true"`, each data key a
//! cluster ID and its value a kubeconfig for that cluster's apiserver).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::ClusterRegistry;

/// The label that marks a remote Secret (Istio's).
pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";
/// The annotation `istioctl create-remote-secret` sets to the cluster ID (informative: the data
/// keys are what count, as for istiod).
pub const CLUSTER_ANNOTATION: &str = "networking.istio.io/cluster";

/// Cluster ID → kubeconfig bytes of one Secret.
pub fn secret_clusters(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// Keeps `registry` in step with the remote Secrets in `namespace` until `shutdown`: an added
/// or changed Secret (re)registers its clusters, a deleted one (or one whose label was removed)
/// unregisters them. A failing watch (apiserver down, RBAC missing) is logged and retried with
/// backoff; the clusters registered so far stay.
pub async fn watch_remote_secrets(
    client: kube::Client,
    namespace: String,
    registry: Arc<ClusterRegistry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{MULTICLUSTER_LABEL}=true"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<BTreeMap<String, BTreeMap<String, Vec<u8>>>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, %namespace, "watching remote secrets failed; retrying")
            }
            Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
            Some(Ok(watcher::Event::InitApply(s))) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(s.name_any(), secret_clusters(&s));
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                if let Some(l) = listing.take() {
                    registry.replace_secrets(l).await;
                }
            }
            Some(Ok(watcher::Event::Apply(s))) => {
                registry
                    .apply_secret(&s.name_any(), secret_clusters(&s))
                    .await
            }
            Some(Ok(watcher::Event::Delete(s))) => registry.remove_secret(&s.name_any()),
        }
    }
}
