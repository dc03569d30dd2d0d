//! Keeps a ConfigMap `istio-ca-root-cert` (key `root-cert.pem`, label `istio.io/config: "true"`)
//! with the current trust bundle in every namespace matched by an optional label selector.
//!
//! Reconcile is idempotent: a namespace whose ConfigMap already holds the bundle (and the label)
//! causes no write. It runs on namespace events, on any change to one of these ConfigMaps (edit
//! or delete is repaired), and on every trust-bundle change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tracing::Instrument;

use crate::telemetry::ResultLabels;
use crate::trust::TrustBundle;

/// Name of the distributed ConfigMap.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Data key holding the PEM bundle.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// Label Istio expects on the ConfigMap.
pub const ISTIO_CONFIG_LABEL: &str = "istio.io/config";
const FIELD_MANAGER: &str = "meshid";

/// A reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootConfigMapError {
    /// The apiserver refused or failed a read or write.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

struct Ctx {
    client: kube::Client,
    trust: watch::Receiver<Arc<TrustBundle>>,
    writes: Family<ResultLabels, Counter>,
}

/// What the ConfigMap in a namespace needs, given what is there now.
#[derive(Debug, PartialEq, Eq)]
pub enum Desired {
    /// Nothing: it already holds the bundle and label.
    UpToDate,
    /// It does not exist.
    Create,
    /// It exists but its data or label differ.
    Update,
}

/// Pure comparison of an existing ConfigMap with the bundle PEM.
pub fn desired(existing: Option<&ConfigMap>, bundle_pem: &str) -> Desired {
    let Some(cm) = existing else {
        return Desired::Create;
    };
    let data_ok = cm
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CERT_KEY))
        .is_some_and(|v| v == bundle_pem);
    let label_ok = cm
        .labels()
        .get(ISTIO_CONFIG_LABEL)
        .is_some_and(|v| v == "true");
    if data_ok && label_ok {
        Desired::UpToDate
    } else {
        Desired::Update
    }
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, RootConfigMapError> {
    let name = ns.name_any();
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let span = tracing::info_span!("reconcile_root_configmap", namespace = %name);
    // `instrument`, not `span.enter()`: a guard held across `.await` would leave the span
    // entered on whatever task the worker thread polls next.
    write_root_configmap(name, ctx).instrument(span).await
}

/// Creates or updates the root ConfigMap in namespace `name` to hold the current bundle.
async fn write_root_configmap(name: String, ctx: Arc<Ctx>) -> Result<Action, RootConfigMapError> {
    let pem = ctx.trust.borrow().pem().to_owned();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &name);
    let existing = api.get_opt(ROOT_CONFIGMAP).await?;
    let label = |r: &'static str| ResultLabels { result: r };
    match desired(existing.as_ref(), &pem) {
        Desired::UpToDate => {}
        Desired::Create => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CONFIGMAP.into()),
                    namespace: Some(name.clone()),
                    labels: Some(BTreeMap::from([(ISTIO_CONFIG_LABEL.into(), "true".into())])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(ROOT_CERT_KEY.into(), pem)])),
                ..Default::default()
            };
            match api
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &cm,
                )
                .await
            {
                Ok(_) => {
                    ctx.writes.get_or_create(&label("created")).inc();
                    tracing::info!("created {ROOT_CONFIGMAP}");
                }
                // Namespace being deleted or a concurrent create: requeue and look again.
                Err(e) => return Err(e.into()),
            }
        }
        Desired::Update => {
            let patch = serde_json::json!({
                "metadata": { "labels": { ISTIO_CONFIG_LABEL: "true" } },
                "data": { ROOT_CERT_KEY: pem },
            });
            api.patch(
                ROOT_CONFIGMAP,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
            ctx.writes.get_or_create(&label("updated")).inc();
            tracing::info!("updated {ROOT_CONFIGMAP}");
        }
    }
    Ok(Action::requeue(Duration::from_secs(3600)))
}

fn error_policy(_ns: Arc<Namespace>, err: &RootConfigMapError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "root ConfigMap reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// How long after the controller starts every namespace is reconciled once more (see
/// `run_root_configmaps`).
const STARTUP_RECHECK: Duration = Duration::from_secs(10);

/// Runs the root distribution controller until `shutdown` flips to true.
///
/// `namespace_selector` is a Kubernetes label selector (e.g. `istio-injection=enabled`);
/// `None` means every namespace. `writes` counts ConfigMap creates/updates.
pub async fn run_root_configmaps(
    client: kube::Client,
    trust: watch::Receiver<Arc<TrustBundle>>,
    namespace_selector: Option<String>,
    writes: Family<ResultLabels, Counter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ns_config = watcher::Config::default();
    if let Some(sel) = &namespace_selector {
        ns_config = ns_config.labels(sel);
    }
    let cm_config = watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}"));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let configmaps: Api<ConfigMap> = Api::all(client.clone());
    // Every new bundle re-reconciles all namespaces (the first value is skipped: the initial
    // list already reconciles everything).
    let bundle_changes = WatchStream::from_changes(trust.clone()).map(|_| ());
    // The Namespace and ConfigMap watchers list independently. A ConfigMap deleted after its
    // namespace was reconciled but before the ConfigMap watcher's initial list yields no event,
    // and would wait for the hourly requeue. One more pass once both lists are done closes that
    // window at the start of every leadership; it writes nothing where all is up to date.
    let settled = futures::stream::once(tokio::time::sleep(STARTUP_RECHECK)).map(|_| ());
    let triggers = futures::stream::select(bundle_changes, settled);
    let ctx = Arc::new(Ctx {
        client,
        trust,
        writes,
    });
    Controller::new(namespaces, ns_config)
        .watches(configmaps, cm_config, |cm| {
            cm.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns))
        })
        .reconcile_all_on(triggers)
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|v| *v).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(data: Option<&str>, label: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                labels: label
                    .map(|l| BTreeMap::from([(ISTIO_CONFIG_LABEL.to_owned(), l.to_owned())])),
                ..Default::default()
            },
            data: data.map(|d| BTreeMap::from([(ROOT_CERT_KEY.to_owned(), d.to_owned())])),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_missing_or_different_configmap_needs_a_write() {
        assert_eq!(desired(None, "pem"), Desired::Create);
        assert_eq!(
            desired(Some(&cm(Some("pem"), Some("true"))), "pem"),
            Desired::UpToDate
        );
        assert_eq!(
            desired(Some(&cm(Some("old"), Some("true"))), "pem"),
            Desired::Update
        );
        assert_eq!(
            desired(Some(&cm(Some("pem"), None)), "pem"),
            Desired::Update
        );
        assert_eq!(
            desired(Some(&cm(None, Some("true"))), "pem"),
            Desired::Update
        );
    }
}
