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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use common::kube::{Harness, Instance, TokenOptions, eventually, harness, rule};
use common::meshid::{
    Running, ca_client, metric_value, openssl_csr, openssl_key, server_identity, server_rules,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use meshid::agent::{CaClient, CaClientError};

use meshid::cluster::{
    CLUSTER_ANNOTATION, ClusterRegistry, MULTICLUSTER_LABEL, RemoteState, watch_remote_secrets,
};
use meshid::config::ServerArgs;
use tonic::Code;

/// Long enough for a watch event, a probe and a controller pass; polled, never waited out.
const WAIT: Duration = Duration::from_secs(30);

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

    // The two Secrets' events arrive in their own time: wait for both, B probed ready and C
    // refused (B's probe can finish before the watcher has seen C's Secret).
    eventually(WAIT, || async {
        ensure!(state(&registry, "cluster-b")? == RemoteState::Ready);
        state(&registry, "cluster-c")?;
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

// ---------------------------------------------------------------------------------------------
// One meshid, two clusters.

const SELECTOR_KEY: &str = "meshid-test-selector";
const DOC: &str = include_str!("../docs/multicluster.md");

/// The fenced YAML block of docs/multicluster.md that contains `marker`, as printed.
fn doc_yaml(marker: &str) -> &'static str {
    DOC.split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block))
        .find(|block| block.contains(marker))
        .unwrap_or_else(|| panic!("docs/multicluster.md has no YAML block with {marker:?}"))
}

/// Creates the objects of the remote-side role printed in docs/multicluster.md in `h`.
async fn apply_doc_remote_role(h: &Harness) {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(doc_yaml("kind: ClusterRoleBinding")).unwrap();
    let client = h.admin_client();
    let pp = PostParams::default();
    for doc in docs {
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        match doc["kind"].as_str().unwrap() {
            "Namespace" => {
                let o: Namespace = serde_json::from_value(doc).unwrap();
                Api::all(client.clone()).create(&pp, &o).await.unwrap();
            }
            "ServiceAccount" => {
                let o: ServiceAccount = serde_json::from_value(doc).unwrap();
                Api::namespaced(client.clone(), &ns)
                    .create(&pp, &o)
                    .await
                    .unwrap();
            }
            "ClusterRole" => {
                let o: ClusterRole = serde_json::from_value(doc).unwrap();
                Api::all(client.clone()).create(&pp, &o).await.unwrap();
            }
            "ClusterRoleBinding" => {
                let o: ClusterRoleBinding = serde_json::from_value(doc).unwrap();
                Api::all(client.clone()).create(&pp, &o).await.unwrap();
            }
            other => panic!("unexpected kind {other} in the documented role"),
        }
    }
}

/// The remote Secret printed in docs/multicluster.md (istioctl's output), in `namespace`, with
/// `kubeconfig` as the value of its data key.
fn doc_remote_secret(namespace: &str, kubeconfig: String) -> Secret {
    let mut secret: Secret = serde_saphyr::from_str(doc_yaml("kind: Secret")).unwrap();
    secret.metadata.namespace = Some(namespace.to_owned());
    let data = secret.string_data.as_mut().unwrap();
    assert_eq!(data.len(), 1, "one cluster in the documented Secret");
    let value = data.values_mut().next().unwrap();
    *value = kubeconfig;
    secret
}

/// Cluster A (the shared harness) with meshid's namespace, cluster B (this test's own
/// instance), and the workloads: namespace `app` and `zt` exist in both clusters under the same
/// names, with pods on nodes of the same names placed differently, so that a lookup in the
/// wrong cluster would give the opposite answer.
struct Mesh {
    a: Harness,
    b: Instance,
    /// meshid's namespace in cluster A (Lease, remote Secrets).
    ns: String,
    app: String,
    zt: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

/// A CA client of `server` that names `cluster` (none: the server's own).
fn client_of(server: &Running, cluster: Option<&str>) -> CaClient {
    match cluster {
        None => ca_client(&server.handle),
        Some(id) => CaClient::new(
            &format!("https://{}", server.handle.grpc_addr),
            &server.handle.root_pem,
            Some("localhost"),
            Some(id.to_owned()),
        )
        .unwrap(),
    }
}

const A: &str = "cluster-a";
const B: &str = "cluster-b";

impl Mesh {
    async fn new(a: Harness) -> Mesh {
        let b = Instance::start().await.unwrap();
        let ns = a.create_namespace("mc").await.unwrap();
        let mut rules = server_rules(true);
        rules.push(rule("", "secrets", &["list", "watch"]));
        let (dir, kubeconfig) = server_identity(&a, &ns, "meshid-test:multicluster", rules).await;
        let app = format!("mc-app-{:08x}", rand::random::<u32>());
        let zt = format!("mc-zt-{:08x}", rand::random::<u32>());
        let mesh = Mesh {
            a,
            b,
            ns,
            app,
            zt,
            kubeconfig,
            dir,
        };
        // (cluster, pod, service account, node): ztunnel runs on node-1 in both clusters; web
        // shares its node in A, db in B.
        for (h, web_node, db_node) in [
            (&mesh.a, "node-1", "node-2"),
            (mesh.b.harness(), "node-2", "node-1"),
        ] {
            for name in [&mesh.app, &mesh.zt] {
                create_selected_namespace(h, name, &mesh.ns).await;
            }
            for (ns, sa) in [(&mesh.zt, "ztunnel"), (&mesh.app, "web"), (&mesh.app, "db")] {
                h.create_service_account(ns, sa).await.unwrap();
            }
            h.create_pod(&mesh.zt, "ztunnel-0", "ztunnel", "node-1")
                .await
                .unwrap();
            h.create_pod(&mesh.app, "web-0", "web", web_node)
                .await
                .unwrap();
            h.create_pod(&mesh.app, "db-0", "db", db_node)
                .await
                .unwrap();
        }
        mesh
    }

    fn args(&self) -> ServerArgs {
        ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(self.dir.path().join("ca")),
            kubeconfig: Some(self.kubeconfig.clone()),
            serving_hosts: Some(vec!["localhost".into()]),
            cluster_id: Some(A.into()),
            remote_secrets: Some(true),
            remote_secrets_namespace: Some(self.ns.clone()),
            namespace_selector: Some(format!("{SELECTOR_KEY}={}", self.ns)),
            leader_election_namespace: Some(self.ns.clone()),
            pod_name: Some("replica-0".into()),
            trusted_node_accounts: Some(vec![format!("{}/ztunnel", self.zt)]),
            ..Default::default()
        }
    }

    async fn start(&self) -> Running {
        Running::start(self.args()).await
    }

    fn harness(&self, cluster: &str) -> &Harness {
        if cluster == A {
            &self.a
        } else {
            self.b.harness()
        }
    }

    /// A pod-bound `istio-ca` token of `sa` in cluster `cluster`.
    async fn token(&self, cluster: &str, ns: &str, sa: &str, pod: &str) -> String {
        let h = self.harness(cluster);
        let pod = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(h.admin_client(), ns)
            .get(pod)
            .await
            .unwrap();
        h.request_token(
            ns,
            sa,
            &TokenOptions::for_audiences(["istio-ca"]).bound_to(&pod),
        )
        .await
        .unwrap()
    }

    /// Applies the documented remote role in cluster B and creates the documented remote
    /// Secret for it in meshid's namespace in cluster A.
    async fn register_b(&self) {
        let b = self.b.harness();
        apply_doc_remote_role(b).await;
        let token = b
            .request_token("meshid-remote", "meshid-remote", &TokenOptions::default())
            .await
            .unwrap();
        let kubeconfig = remote_kubeconfig(B, self.b.url(), &ca_data(b), &token);
        Api::<Secret>::namespaced(self.a.admin_client(), &self.ns)
            .create(
                &PostParams::default(),
                &doc_remote_secret(&self.ns, kubeconfig),
            )
            .await
            .unwrap();
    }

    fn spiffe(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
    }

    /// Waits until a request for `target` with `token`, naming cluster B, is refused with
    /// `code`.
    async fn until_b_refuses(&self, server: &Running, token: &str, target: &str, code: Code) {
        eventually(WAIT, || async {
            match self.call(server, Some(B), token, target, false).await {
                Err(c) if c == code => Ok(()),
                other => bail!("cluster B: {:?}", other.map(|_| "issued")),
            }
        })
        .await
        .unwrap();
    }

    /// CreateCertificate for `ns/sa` (or `target` through impersonation) with `token`, sending
    /// `cluster` in the `clusterid` header.
    async fn call(
        &self,
        server: &Running,
        cluster: Option<&str>,
        token: &str,
        target: &str,
        impersonate: bool,
    ) -> Result<Vec<String>, Code> {
        let key = openssl_key(
            self.dir.path(),
            &format!("k{:x}", rand::random::<u32>()),
            "ec",
        );
        let csr = openssl_csr(&key, "/", &[&format!("subjectAltName=URI:{target}")]);
        let metadata = impersonate.then(|| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(target.to_owned())),
                },
            )]
            .into(),
        });
        client_of(server, cluster)
            .create_certificate(&csr, token, Duration::from_secs(3600), metadata)
            .await
            .map_err(|e| match e {
                CaClientError::Status { code, .. } => code,
                other => panic!("{other}"),
            })
    }

    /// Waits until cluster `cluster`'s namespace `ns` holds `istio-ca-root-cert` with `pem`.
    async fn wait_root_configmap(&self, cluster: &str, ns: &str, pem: &str) {
        let api: Api<ConfigMap> = Api::namespaced(self.harness(cluster).admin_client(), ns);
        eventually(WAIT, || async {
            let cm = api
                .get_opt("istio-ca-root-cert")
                .await?
                .ok_or_else(|| anyhow::anyhow!("absent in {cluster}"))?;
            let got = cm.data.unwrap_or_default().remove("root-cert.pem");
            ensure!(
                got.as_deref() == Some(pem),
                "not the bundle yet in {cluster}"
            );
            Ok(())
        })
        .await
        .unwrap();
    }
}

/// Creates namespace `name` in `h` with the selector label of this test's meshid.
async fn create_selected_namespace(h: &Harness, name: &str, selector: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                (SELECTOR_KEY.to_owned(), selector.to_owned()),
                (common::kube::TEST_LABEL.to_owned(), "true".to_owned()),
            ])),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(h.admin_client())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// The certificate of `chain` names `id`.
fn names(chain: &[String], id: &str) -> bool {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_meshid_serves_two_clusters_by_clusterid_and_stops_serving_b_when_its_secret_goes() {
    let m = Mesh::new(harness!()).await;
    let server = m.start().await;
    let web = m.spiffe(&m.app, "web");
    let db = m.spiffe(&m.app, "db");
    let token_a = m.token(A, &m.app, "web", "web-0").await;
    let token_b = m.token(B, &m.app, "web", "web-0").await;

    // Before its Secret exists, cluster B is unknown.
    assert_eq!(
        m.call(&server, Some(B), &token_b, &web, false)
            .await
            .unwrap_err(),
        Code::PermissionDenied
    );
    let registered = std::time::Instant::now();
    m.register_b().await;
    let chain = eventually(WAIT, || async {
        m.call(&server, Some(B), &token_b, &web, false)
            .await
            .map_err(|c| anyhow::anyhow!("{c:?}"))
    })
    .await
    .unwrap();
    eprintln!(
        "cluster B served {:?} after its Secret was created (role applied, token minted, Secret created)",
        registered.elapsed()
    );
    assert!(names(&chain, &web));

    // Each cluster's token, with its own clusterid (or none for the local cluster).
    for cluster in [Some(A), None] {
        let chain = m
            .call(&server, cluster, &token_a, &web, false)
            .await
            .unwrap();
        assert!(names(&chain, &web), "{cluster:?}");
    }
    // The same tokens with the other cluster's ID are refused by the other apiserver.
    for (cluster, token) in [(Some(B), &token_a), (Some(A), &token_b), (None, &token_b)] {
        assert_eq!(
            m.call(&server, cluster, token, &web, false)
                .await
                .unwrap_err(),
            Code::Unauthenticated,
            "{cluster:?}"
        );
    }
    // An unknown cluster ID is refused, and audited as such.
    assert_eq!(
        m.call(&server, Some("cluster-z"), &token_a, &web, false)
            .await
            .unwrap_err(),
        Code::PermissionDenied
    );
    let metrics = server.get("/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "meshid_certificate_requests_total{outcome=\"rejected\",reason=\"unknown_cluster\"}"
        ) >= 2,
        "{metrics}"
    );

    // ztunnel node authorization reads the pods of the caller's cluster: web shares ztunnel's
    // node in A, db in B.
    let zt_a = m.token(A, &m.zt, "ztunnel", "ztunnel-0").await;
    let zt_b = m.token(B, &m.zt, "ztunnel", "ztunnel-0").await;
    for (cluster, ztunnel, on_node, elsewhere) in [(A, &zt_a, &web, &db), (B, &zt_b, &db, &web)] {
        let chain = m.call(&server, Some(cluster), ztunnel, on_node, true).await;
        assert!(names(&chain.unwrap(), on_node), "{cluster}");
        assert_eq!(
            m.call(&server, Some(cluster), ztunnel, elsewhere, true)
                .await
                .unwrap_err(),
            Code::PermissionDenied,
            "{cluster}"
        );
    }

    // The root ConfigMaps, with the same bundle, in the selected namespaces of both clusters.
    for cluster in [A, B] {
        for ns in [&m.app, &m.zt] {
            m.wait_root_configmap(cluster, ns, &server.handle.root_pem)
                .await;
        }
    }
    // Repaired in cluster B as in the local cluster.
    Api::<ConfigMap>::namespaced(m.b.harness().admin_client(), &m.app)
        .delete("istio-ca-root-cert", &DeleteParams::default())
        .await
        .unwrap();
    m.wait_root_configmap(B, &m.app, &server.handle.root_pem)
        .await;
    let ready = server.get("/readyz").await;
    assert!(ready.contains("cluster cluster-b: ready"), "{ready}");
    assert_eq!(
        metric_value(
            &server.get("/metrics").await,
            "meshid_remote_cluster_ready{cluster=\"cluster-b\"}"
        ),
        1
    );

    // Deleting the remote Secret stops issuance for cluster B.
    let deleted = std::time::Instant::now();
    Api::<Secret>::namespaced(m.a.admin_client(), &m.ns)
        .delete("istio-remote-secret-cluster-b", &DeleteParams::default())
        .await
        .unwrap();
    m.until_b_refuses(&server, &token_b, &web, Code::PermissionDenied)
        .await;
    eprintln!(
        "cluster B refused {:?} after its Secret was deleted",
        deleted.elapsed()
    );
    assert!(
        m.call(&server, Some(A), &token_a, &web, false)
            .await
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_cluster_b_s_apiserver_leaves_cluster_a_fully_served() {
    let mut m = Mesh::new(harness!()).await;
    let server = m.start().await;
    let web = m.spiffe(&m.app, "web");
    let token_a = m.token(A, &m.app, "web", "web-0").await;
    let token_b = m.token(B, &m.app, "web", "web-0").await;
    let zt_a = m.token(A, &m.zt, "ztunnel", "ztunnel-0").await;
    m.register_b().await;
    eventually(WAIT, || async {
        m.call(&server, Some(B), &token_b, &web, false)
            .await
            .map_err(|c| anyhow::anyhow!("{c:?}"))
    })
    .await
    .unwrap();

    m.b.stop().await.unwrap();
    // B's callers fail closed once their cached review is gone (pod-bound: 3 s).
    m.until_b_refuses(&server, &token_b, &web, Code::Unavailable)
        .await;
    eventually(WAIT, || async {
        let ready = server.get("/readyz").await;
        ensure!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        ensure!(ready.contains("cluster cluster-b: unreachable"), "{ready}");
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        metric_value(
            &server.get("/metrics").await,
            "meshid_remote_cluster_ready{cluster=\"cluster-b\"}"
        ),
        0
    );

    // Cluster A: issuance, node authorization and root distribution (a new namespace) go on.
    assert!(names(
        &m.call(&server, Some(A), &token_a, &web, false)
            .await
            .unwrap(),
        &web
    ));
    assert!(names(
        &m.call(&server, None, &token_a, &web, false).await.unwrap(),
        &web
    ));
    assert!(names(
        &m.call(&server, Some(A), &zt_a, &web, true).await.unwrap(),
        &web
    ));
    let fresh = format!("mc-new-{:08x}", rand::random::<u32>());
    create_selected_namespace(&m.a, &fresh, &m.ns).await;
    m.wait_root_configmap(A, &fresh, &server.handle.root_pem)
        .await;
    server.stop().await;
}
