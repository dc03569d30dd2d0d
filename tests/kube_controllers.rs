//! Kubernetes integration on the real kube-apiserver harness: root ConfigMap distribution,
//! zero-downtime root rotation, leader election, the istiod certificate and ztunnel node
//! authorization. meshid runs with its own service account and the RBAC rules the Helm chart
//! grants.
//!
//! Skipped when MESHID_TEST_KUBECONFIG is unset (fails instead under CI=true).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::kube::{Harness, TokenOptions, eventually, harness};
use common::meshid::{
    Running, ca_client, http_get, metric_value, openssl, openssl_csr, openssl_key, server_identity,
    server_rules,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use meshid::agent::generate_csr;

use meshid::config::ServerArgs;
use meshid::identity::SpiffeId;

const WAIT: Duration = Duration::from_secs(30);

/// A namespace holding meshid's service account with the chart's permissions, and a label
/// value unique to this test so its controllers only see this test's namespaces.
struct Setup {
    h: Harness,
    ns: String,
    selector_value: String,
    kubeconfig: std::path::PathBuf,
    dir: tempfile::TempDir,
}

const SELECTOR_KEY: &str = "meshid-test-selector";

impl Setup {
    async fn new(h: Harness) -> Self {
        let ns = h.create_namespace("ctl").await.unwrap();
        let (dir, kubeconfig) =
            server_identity(&h, &ns, "meshid-test:controllers", server_rules(true)).await;
        let selector_value = ns.clone();
        Setup {
            h,
            ns,
            selector_value,
            kubeconfig,
            dir,
        }
    }

    fn args(&self, ca_dir: &Path, pod: &str) -> ServerArgs {
        ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(ca_dir.to_path_buf()),
            kubeconfig: Some(self.kubeconfig.clone()),
            serving_hosts: Some(vec!["localhost".into()]),
            namespace_selector: Some(format!("{SELECTOR_KEY}={}", self.selector_value)),
            leader_election_namespace: Some(self.ns.clone()),
            lease_name: Some("meshid-controllers".into()),
            pod_name: Some(pod.into()),
            ..Default::default()
        }
    }

    /// A namespace carrying this test's selector label.
    async fn selected_namespace(&self, prefix: &str) -> String {
        let ns = self.h.create_namespace(prefix).await.unwrap();
        let patch =
            serde_json::json!({ "metadata": { "labels": { SELECTOR_KEY: self.selector_value } } });
        Api::<Namespace>::all(self.h.admin_client())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        ns
    }

    fn configmaps(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.h.admin_client(), ns)
    }

    /// Waits until `ns` has an `istio-ca-root-cert` whose bundle satisfies `ok`.
    async fn wait_root_configmap(&self, ns: &str, ok: impl Fn(&str) -> bool) -> ConfigMap {
        let api = self.configmaps(ns);
        eventually(WAIT, || async {
            let cm = api
                .get_opt("istio-ca-root-cert")
                .await?
                .ok_or_else(|| anyhow::anyhow!("absent"))?;
            let pem = cm
                .data
                .as_ref()
                .and_then(|d| d.get("root-cert.pem"))
                .cloned()
                .unwrap_or_default();
            anyhow::ensure!(ok(&pem), "bundle not as expected yet");
            Ok(cm)
        })
        .await
        .unwrap()
    }
}

fn roots_in(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

fn root_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("root-cert.pem")).unwrap()
}

/// `openssl verify` of `leaf_pem` against `bundle_pem`.
fn verifies(dir: &Path, leaf_pem: &str, bundle_pem: &str) -> bool {
    let leaf = dir.join(format!("leaf-{:x}.pem", rand::random::<u32>()));
    let bundle = dir.join(format!("bundle-{:x}.pem", rand::random::<u32>()));
    std::fs::write(&leaf, leaf_pem).unwrap();
    std::fs::write(&bundle, bundle_pem).unwrap();
    std::process::Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

/// Gets a workload certificate for `ns/sa` from `server` with a real token.
async fn workload_cert(s: &Setup, server: &Running, ns: &str, sa: &str) -> String {
    let token =
        s.h.request_token(ns, sa, &TokenOptions::for_audiences(["istio-ca"]))
            .await
            .unwrap();
    let id = SpiffeId::for_service_account("cluster.local", ns, sa).unwrap();
    let (_key, csr) = generate_csr(&id, Default::default()).unwrap();
    let client = ca_client(&server.handle);
    let chain = client
        .create_certificate(&csr, &token, Duration::from_secs(3600), None)
        .await
        .unwrap();
    chain[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_configmap_is_created_in_selected_namespaces_and_repaired_after_edits_and_deletes()
{
    let s = Setup::new(harness!()).await;
    let ca = s.dir.path().join("ca");
    let server = Running::start(s.args(&ca, "replica-a")).await;
    let root = server.handle.root_pem.clone();
    let selected = s.selected_namespace("sel").await;
    let other = s.h.create_namespace("unsel").await.unwrap();

    let cm = s.wait_root_configmap(&selected, |pem| pem == root).await;
    assert_eq!(
        cm.metadata.labels.as_ref().unwrap()["istio.io/config"],
        "true"
    );

    // Edited: repaired.
    let api = s.configmaps(&selected);
    let patch = serde_json::json!({ "data": { "root-cert.pem": "tampered" } });
    api.patch(
        "istio-ca-root-cert",
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    s.wait_root_configmap(&selected, |pem| pem == root).await;

    // Deleted: recreated.
    api.delete("istio-ca-root-cert", &Default::default())
        .await
        .unwrap();
    let cm = s.wait_root_configmap(&selected, |pem| pem == root).await;

    // Idempotent: with nothing changed, nothing is written.
    let rv = cm.metadata.resource_version.clone();
    let writes = metric_value(
        &server.get("/metrics").await,
        "meshid_root_configmap_writes_total{result=\"updated\"}",
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = api.get("istio-ca-root-cert").await.unwrap();
    assert_eq!(again.metadata.resource_version, rv);
    assert_eq!(
        metric_value(
            &server.get("/metrics").await,
            "meshid_root_configmap_writes_total{result=\"updated\"}"
        ),
        writes
    );

    // An unselected namespace gets nothing.
    assert!(
        s.configmaps(&other)
            .get_opt("istio-ca-root-cert")
            .await
            .unwrap()
            .is_none()
    );
    server.stop().await;
}

async fn lease_holder(s: &Setup) -> Option<String> {
    Api::<Lease>::namespaced(s.h.admin_client(), &s.ns)
        .get_opt("meshid-controllers")
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|spec| spec.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_a_replica_that_loses_the_lease_stops_writing() {
    let s = Setup::new(harness!()).await;
    // Two replicas listing the same two roots in opposite orders: each signs with its own CA
    // and has the other's root as an extra root.
    let (ca1, ca2) = (s.dir.path().join("ca1"), s.dir.path().join("ca2"));
    meshid::signer::LocalSigner::load_or_generate(&ca1, "cluster.local").unwrap();
    meshid::signer::LocalSigner::load_or_generate(&ca2, "cluster.local").unwrap();
    let with_extra = |ca: &Path, other: &Path, pod: &str| {
        let extra = s.dir.path().join(format!("extra-{pod}.pem"));
        std::fs::write(&extra, root_of(other)).unwrap();
        let mut args = s.args(ca, pod);
        args.extra_roots = Some(extra);
        args
    };
    let a = Running::start(with_extra(&ca1, &ca2, "replica-a")).await;
    let b = Running::start(with_extra(&ca2, &ca1, "replica-b")).await;
    let watched = s.selected_namespace("lead").await;
    let steady = s.selected_namespace("steady").await;
    s.wait_root_configmap(&watched, |p| roots_in(p) == 2).await;
    let steady_version = s
        .wait_root_configmap(&steady, |p| roots_in(p) == 2)
        .await
        .metadata
        .resource_version;
    let holder = eventually(WAIT, || async {
        lease_holder(&s)
            .await
            .ok_or_else(|| anyhow::anyhow!("no holder"))
    })
    .await
    .unwrap();
    assert!(holder == "replica-a" || holder == "replica-b", "{holder}");
    // Both replicas serve the CA API.
    s.h.create_service_account(&watched, "web").await.unwrap();
    workload_cert(&s, &a, &watched, "web").await;
    workload_cert(&s, &b, &watched, "web").await;

    // An intruder takes the lease (as if the leader had been partitioned away).
    let leases: Api<Lease> = Api::namespaced(s.h.admin_client(), &s.ns);
    let steal = || async {
        let mut lease = leases.get("meshid-controllers").await?;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some("intruder".into()),
            lease_duration_seconds: Some(60),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..lease.spec.unwrap_or_default()
        });
        leases
            .replace("meshid-controllers", &PostParams::default(), &lease)
            .await?;
        anyhow::Ok(())
    };
    eventually(WAIT, steal).await.unwrap();
    // Within a lease retry period plus the renew deadline both replicas have stepped down.
    tokio::time::sleep(Duration::from_secs(12)).await;
    s.configmaps(&watched)
        .delete("istio-ca-root-cert", &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.configmaps(&watched)
            .get_opt("istio-ca-root-cert")
            .await
            .unwrap()
            .is_none(),
        "no replica may write while another holds the lease"
    );
    assert_eq!(lease_holder(&s).await.as_deref(), Some("intruder"));
    // Followers say so in a metric and in /readyz, and stay ready.
    for r in [&a, &b] {
        let m = r.get("/metrics").await;
        assert_eq!(
            metric_value(&m, "meshid_leader{state=\"follower\"}"),
            1,
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "meshid_leader{state=\"leader\"}"),
            0,
            "{m}"
        );
        let addr = r.handle.http_addr;
        let ready = tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
            .await
            .unwrap();
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        assert!(
            ready.contains("lease meshid-controllers: follower (held by intruder)"),
            "{ready}"
        );
    }

    // When the lease is released, a replica takes over and repairs.
    let release = || async {
        let mut lease = leases.get("meshid-controllers").await?;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        leases
            .replace("meshid-controllers", &PostParams::default(), &lease)
            .await?;
        anyhow::Ok(())
    };
    eventually(WAIT, release).await.unwrap();
    s.wait_root_configmap(&watched, |p| roots_in(p) == 2).await;

    // Leadership moves to the other replica (the leader stops): it publishes the same bytes,
    // so the untouched namespace is not written again.
    let leader = lease_holder(&s).await.unwrap();
    let (gone, stays) = if leader == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    gone.stop().await;
    eventually(WAIT, || async {
        let h = lease_holder(&s).await;
        anyhow::ensure!(
            h.is_some() && h != Some(leader.clone()),
            "not taken over yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    s.configmaps(&watched)
        .delete("istio-ca-root-cert", &Default::default())
        .await
        .unwrap();
    s.wait_root_configmap(&watched, |p| roots_in(p) == 2).await;
    assert_eq!(
        s.configmaps(&steady)
            .get("istio-ca-root-cert")
            .await
            .unwrap()
            .metadata
            .resource_version,
        steady_version,
        "a change of leader rewrote an unchanged ConfigMap"
    );
    let m = stays.get("/metrics").await;
    assert_eq!(
        metric_value(&m, "meshid_leader{state=\"leader\"}"),
        1,
        "{m}"
    );
    stays.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_istiod_certificate_secret_is_issued_for_istiods_names_and_chains_to_the_root() {
    let s = Setup::new(harness!()).await;
    let istio = s.h.create_namespace("istio").await.unwrap();
    let ca = s.dir.path().join("ca");
    let mut args = s.args(&ca, "replica-a");
    args.istiod_cert = Some(true);
    args.istiod_namespace = Some(istio.clone());
    args.istiod_revision = Some("canary".into());
    let server = Running::start(args).await;
    let secrets: Api<Secret> = Api::namespaced(s.h.admin_client(), &istio);
    let secret = eventually(WAIT, || async {
        secrets
            .get_opt("istiod-tls")
            .await?
            .ok_or_else(|| anyhow::anyhow!("absent"))
    })
    .await
    .unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    let crt = String::from_utf8(data["tls.crt"].0.clone()).unwrap();
    let ca_crt = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    assert!(verifies(s.dir.path(), &crt, &ca_crt));
    let cert_file = s.dir.path().join("istiod.pem");
    std::fs::write(&cert_file, &crt).unwrap();
    let text = String::from_utf8(openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        cert_file.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(
        text.contains(&format!("DNS:istiod-canary.{istio}.svc")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "URI:spiffe://cluster.local/ns/{istio}/sa/istiod-canary"
        )),
        "{text}"
    );
    // The key in the Secret matches the certificate.
    let key_file = s.dir.path().join("istiod.key");
    std::fs::write(&key_file, &data["tls.key"].0).unwrap();
    assert_eq!(
        openssl(&[
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            cert_file.to_str().unwrap()
        ]),
        openssl(&["pkey", "-pubout", "-in", key_file.to_str().unwrap()])
    );
    // Not rewritten while valid.
    let rv = secrets
        .get("istiod-tls")
        .await
        .unwrap()
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        secrets
            .get("istiod-tls")
            .await
            .unwrap()
            .metadata
            .resource_version,
        rv
    );
    server.stop().await;
}

/// Calls CreateCertificate as `token` for `target` through `ImpersonatedIdentity`.
async fn impersonate(
    server: &Running,
    token: &str,
    target: &str,
    dir: &Path,
) -> Result<Vec<String>, tonic::Code> {
    let key = openssl_key(dir, &format!("k{:x}", rand::random::<u32>()), "ec");
    let csr = openssl_csr(&key, "/", &[&format!("subjectAltName=URI:{target}")]);
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(target.to_owned())),
            },
        )]
        .into(),
    };
    let client = ca_client(&server.handle);
    client
        .create_certificate(&csr, token, Duration::from_secs(3600), Some(metadata))
        .await
        .map_err(|e| match e {
            meshid::agent::CaClientError::Status { code, .. } => code,
            other => panic!("{other}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_may_get_certificates_only_for_workloads_on_its_own_node() {
    let s = Setup::new(harness!()).await;
    let sys = s.h.create_namespace("zt").await.unwrap();
    let app = s.h.create_namespace("app").await.unwrap();
    for (ns, sa) in [(&sys, "ztunnel"), (&app, "web"), (&app, "db")] {
        s.h.create_service_account(ns, sa).await.unwrap();
    }
    let zt_pod =
        s.h.create_pod(&sys, "ztunnel-a", "ztunnel", "node-a")
            .await
            .unwrap();
    s.h.create_pod(&app, "web-1", "web", "node-a")
        .await
        .unwrap();
    s.h.create_pod(&app, "db-1", "db", "node-b").await.unwrap();
    let ca = s.dir.path().join("ca");
    let mut args = s.args(&ca, "replica-a");
    args.root_configmap = Some(false);
    args.trusted_node_accounts = Some(vec![format!("{sys}/ztunnel")]);
    let server = Running::start(args).await;
    let aud = TokenOptions::for_audiences(["istio-ca"]);
    let zt_token =
        s.h.request_token(&sys, "ztunnel", &aud.clone().bound_to(&zt_pod))
            .await
            .unwrap();
    let web = format!("spiffe://cluster.local/ns/{app}/sa/web");
    let db = format!("spiffe://cluster.local/ns/{app}/sa/db");
    let dir = s.dir.path();

    let chain = impersonate(&server, &zt_token, &web, dir)
        .await
        .expect("web runs on ztunnel's node");
    assert!(verifies(dir, &chain[0], &chain[1]));
    let calls_cold = metric_value(
        &server.get("/metrics").await,
        "meshid_node_authorization_apiserver_calls_total",
    );
    impersonate(&server, &zt_token, &web, dir)
        .await
        .expect("again, from the cache");
    let calls_warm = metric_value(
        &server.get("/metrics").await,
        "meshid_node_authorization_apiserver_calls_total",
    );
    assert_eq!(
        (calls_cold, calls_warm),
        (2, 2),
        "one pod GET + one field-selector LIST, then cached"
    );

    assert_eq!(
        impersonate(&server, &zt_token, &db, dir).await.unwrap_err(),
        tonic::Code::PermissionDenied
    );
    // An untrusted caller (the workload itself) may not impersonate anyone else.
    let web_token = s.h.request_token(&app, "web", &aud).await.unwrap();
    assert_eq!(
        impersonate(&server, &web_token, &db, dir)
            .await
            .unwrap_err(),
        tonic::Code::PermissionDenied
    );
    // A ztunnel token not bound to its pod gives no node to check.
    let unbound = s.h.request_token(&sys, "ztunnel", &aud).await.unwrap();
    assert_eq!(
        impersonate(&server, &unbound, &web, dir).await.unwrap_err(),
        tonic::Code::PermissionDenied
    );
    server.stop().await;
}
