//! One meshid for two clusters, on two real kube-apiservers: cluster A is the harness
//! `tests/run.sh` started (MESHID_TEST_KUBECONFIG), cluster B a second instance each test starts
//! and stops itself (`common::kube::Instance`). Cluster B is registered by an Istio remote Secret
//! in meshid's namespace in cluster A, created while meshid runs.
//!
//! Skipped when MESHID_TEST_KUBECONFIG is unset (fails instead under CI=true).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use common::kube::{Harness, Instance, TokenOptions, eventually, rule};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use meshid::cluster::{
    CLUSTER_ANNOTATION, ClusterRegistry, MULTICLUSTER_LABEL, RemoteState, watch_remote_secrets,
};

/// Long enough for a watch event, a probe and a controller pass; polled, never waited out.
const WAIT: Duration = Duration::from_secs(30);

macro_rules! harness {
    () => {
        match Harness::from_env().await {
            Some(h) => h,
            None => return,
        }
    };
}

/// The kubeconfig `istioctl create-remote-secret` puts in its Secret: the server, the
/// cluster's CA inline and a bearer token, with one context named after the cluster.
fn remote_kubeconfig(cluster: &str, server: &str, ca_data: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca_data}\n    \
         server: {server}\n  name: {cluster}\ncontexts:\n- context:\n    cluster: {cluster}\n    \
         user: {cluster}\n  name: {cluster}\ncurrent-context: {cluster}\nkind: Config\n\
         preferences: {{}}\nusers:\n- name: {cluster}\n  user:\n    token: {token}\n"
    )
}

/// The Secret `istioctl create-remote-secret --name <cluster>` prints, holding `kubeconfig`.
fn remote_secret(cluster: &str, kubeconfig: String) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("istio-remote-secret-{cluster}")),
            annotations: Some(BTreeMap::from([(
                CLUSTER_ANNOTATION.to_owned(),
                cluster.to_owned(),
            )])),
            labels: Some(BTreeMap::from([(
                MULTICLUSTER_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(cluster.to_owned(), kubeconfig)])),
        ..Default::default()
    }
}

/// The base64 CA data of a harness's admin kubeconfig.
fn ca_data(h: &Harness) -> String {
    let kc = kube::config::Kubeconfig::read_from(h.kubeconfig_path()).unwrap();
    kc.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.certificate_authority_data.clone())
        .expect("harness kubeconfig has inline CA data")
}

/// A service account in cluster `h` with what meshid needs there (TokenReview, pods, root
/// ConfigMaps in namespaces), and a token for it.
async fn remote_access(h: &Harness) -> String {
    let ns = h.create_namespace("meshid-remote").await.unwrap();
    h.create_service_account(&ns, "meshid-remote")
        .await
        .unwrap();
    h.grant_cluster_role(
        "meshid-remote",
        vec![
            rule("authentication.k8s.io", "tokenreviews", &["create"]),
            rule("", "pods", &["get", "list"]),
            rule("", "namespaces", &["get", "list", "watch"]),
            rule(
                "",
                "configmaps",
                &["get", "list", "watch", "create", "update", "patch"],
            ),
        ],
        &ns,
        "meshid-remote",
    )
    .await
    .unwrap();
    h.request_token(&ns, "meshid-remote", &TokenOptions::default())
        .await
        .unwrap()
}

fn state(r: &ClusterRegistry, id: &str) -> anyhow::Result<RemoteState> {
    r.state(id)
        .ok_or_else(|| anyhow::anyhow!("cluster {id} not known"))
}

#[tokio::test]
async fn a_remote_secret_created_at_run_time_registers_cluster_b_and_its_deletion_unregisters_it() {
    let a = harness!();
    let mut b = Instance::start().await.unwrap();
    let token = remote_access(b.harness()).await;
    let ns = a.create_namespace("meshid-mc").await.unwrap();

    let registry = Arc::new(ClusterRegistry::new(
        "cluster-a".into(),
        a.admin_client(),
        Default::default(),
    ));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch_remote_secrets(
        a.admin_client(),
        ns.clone(),
        registry.clone(),
        stop.clone(),
    ));
    let probes = tokio::spawn(registry.clone().run_probes(stop));
    assert!(registry.current().resolve(Some("cluster-b")).is_err());

    let secrets: Api<Secret> = Api::namespaced(a.admin_client(), &ns);
    let kubeconfig = remote_kubeconfig("cluster-b", b.url(), &ca_data(b.harness()), &token);
    secrets
        .create(
            &PostParams::default(),
            &remote_secret("cluster-b", kubeconfig),
        )
        .await
        .unwrap();
    // A second remote with an exec kubeconfig is reported and changes nothing for the others.
    let exec = remote_kubeconfig("cluster-c", b.url(), &ca_data(b.harness()), &token).replace(
        "    token: ",
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/true\n    token: ",
    );
    secrets
        .create(&PostParams::default(), &remote_secret("cluster-c", exec))
        .await
        .unwrap();

    eventually(WAIT, || async {
        ensure!(state(&registry, "cluster-b")? == RemoteState::Ready);
        Ok(())
    })
    .await
    .unwrap();
    assert!(matches!(
        state(&registry, "cluster-c").unwrap(),
        RemoteState::Invalid(why) if why.contains("exec")
    ));
    assert!(registry.current().resolve(Some("cluster-c")).is_err());
    let detail = registry.describe();
    assert!(detail.contains("cluster cluster-b: ready"), "{detail}");

    // The registered client is cluster B's: it lists B's namespaces, not A's.
    let set = registry.current();
    let b_client = set.resolve(Some("cluster-b")).unwrap().client().clone();
    let b_namespaces = Api::<Namespace>::all(b_client)
        .list(&Default::default())
        .await;
    let names: Vec<String> = b_namespaces
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(!names.contains(&ns), "cluster B has A's namespace {ns}");

    // Stopping B's apiserver makes B unready; A is untouched.
    b.stop().await.unwrap();
    eventually(WAIT, || async {
        match state(&registry, "cluster-b")? {
            RemoteState::Unreachable(_) => Ok(()),
            other => bail!("cluster-b is {other:?}"),
        }
    })
    .await
    .unwrap();
    assert!(registry.current().resolve(None).is_ok());
    Api::<Namespace>::all(registry.current().local().client().clone())
        .get(&ns)
        .await
        .unwrap();

    // Deleting the Secret unregisters B.
    secrets
        .delete("istio-remote-secret-cluster-b", &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, || async {
        ensure!(registry.current().resolve(Some("cluster-b")).is_err());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(registry.state("cluster-b"), None);

    stop_tx.send(true).unwrap();
    watcher.await.unwrap();
    probes.await.unwrap();
}
