//! The root rotation of docs/root-rotation.md, end to end, on the real kube-apiserver harness:
//! three meshid replicas behind a round-robin TCP balancer (a Service), replaced one by one as a
//! rolling update, two `meshid agent`s (web and client) whose CA root file follows the
//! `istio-ca-root-cert` ConfigMap as a kubelet projection does, a real Envoy serving web's SVID
//! with mTLS, and a client presenting the client agent's SVID and trusting its bundle.
//!
//! Lifetimes are short (30 s certificates, 1 s registry heartbeats) so the whole rotation,
//! including the automatic retirement of the old root, takes about two minutes.
//!
//! Skipped when MESHID_TEST_KUBECONFIG is unset or Envoy is missing (fails instead under
//! CI=true).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::envoy::{Envoy, client_config, envoy_binary, free_port, mtls_bootstrap, mtls_get};
use common::kube::{Harness, TokenOptions, eventually};
use common::meshid::{server_identity, server_rules};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use meshid::agent::{AgentConfig, AgentHandle, Svid, start_agent};
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use tokio::sync::oneshot;

const TD: &str = "cluster.local";
const WEB_ID: &str = "spiffe://cluster.local/ns/{ns}/sa/web";
const SELECTOR_KEY: &str = "meshid-test-selector";
const WAIT: Duration = Duration::from_secs(60);

/// The DER roots in a PEM bundle.
fn roots(pem: &str) -> BTreeSet<Vec<u8>> {
    meshid::pem::parse_certs(pem)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

fn root_der(ca_dir: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap();
    roots(&pem).into_iter().next().unwrap()
}

/// `openssl verify` (an independent implementation) of a leaf chain against a bundle.
fn verifies(dir: &Path, chain_pem: &str, bundle_pem: &str) -> bool {
    let n = rand::random::<u64>();
    let leaf = dir.join(format!("leaf-{n:x}.pem"));
    let bundle = dir.join(format!("bundle-{n:x}.pem"));
    std::fs::write(&leaf, chain_pem).unwrap();
    std::fs::write(&bundle, bundle_pem).unwrap();
    let ok = std::process::Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .status
        .success();
    let _ = std::fs::remove_file(leaf);
    let _ = std::fs::remove_file(bundle);
    ok
}

/// A round-robin TCP balancer over the replicas that are currently endpoints (a Service).
struct Balancer {
    addr: SocketAddr,
    endpoints: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoints: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let eps = endpoints.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = {
                    let eps = eps.lock().unwrap();
                    next += 1;
                    (!eps.is_empty()).then(|| eps[next % eps.len()])
                };
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, endpoints }
    }

    fn add(&self, a: SocketAddr) {
        self.endpoints.lock().unwrap().push(a);
    }

    fn remove(&self, a: SocketAddr) {
        self.endpoints.lock().unwrap().retain(|e| *e != a);
    }
}

struct Replica {
    handle: ServerHandle,
    stop: oneshot::Sender<()>,
}

struct Agent {
    handle: AgentHandle,
    _stop: oneshot::Sender<()>,
}

impl Agent {
    fn current(&self) -> Option<Arc<Svid>> {
        self.handle.svids().borrow().clone()
    }
}

/// What the monitors found: violations and what they saw.
#[derive(Default)]
struct Findings {
    violations: Vec<String>,
    /// Distinct root sets of `istio-ca-root-cert`, in the order they appeared.
    bundles: Vec<BTreeSet<Vec<u8>>>,
    /// Distinct root sets of the istiod Secret's `ca.crt`, in the order they appeared.
    istiod_bundles: Vec<BTreeSet<Vec<u8>>>,
    /// Leaves checked against the peer's and the distributed bundle.
    leaves_checked: usize,
    requests_ok: usize,
    requests_failed: Vec<String>,
}

struct Rotation {
    h: Harness,
    ns: String,
    app: String,
    istio: String,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    extra_roots: PathBuf,
    lb: Balancer,
}

impl Rotation {
    async fn new(h: Harness) -> Self {
        let ns = h.create_namespace("rot3").await.unwrap();
        let (dir, kubeconfig) =
            server_identity(&h, &ns, "meshid-test:rotation", server_rules(false)).await;
        let app = h.create_namespace("rot3-app").await.unwrap();
        let istio = h.create_namespace("rot3-istio").await.unwrap();
        let patch = serde_json::json!({ "metadata": { "labels": { SELECTOR_KEY: ns } } });
        Api::<Namespace>::all(h.admin_client())
            .patch(&app, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        for sa in ["web", "client"] {
            h.create_service_account(&app, sa).await.unwrap();
        }
        let extra_roots = dir.path().join("extra-roots.pem");
        std::fs::write(&extra_roots, "").unwrap();
        let lb = Balancer::start().await;
        Self {
            h,
            ns,
            app,
            istio,
            dir,
            kubeconfig,
            extra_roots,
            lb,
        }
    }

    /// Starts one replica (a pod of the Deployment) signing with `ca_dir` and makes it an
    /// endpoint once it serves.
    async fn start_replica(&self, ca_dir: &Path, pod: &str) -> Replica {
        let args = ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(ca_dir.to_path_buf()),
            kubeconfig: Some(self.kubeconfig.clone()),
            serving_hosts: Some(vec!["localhost".into()]),
            namespace_selector: Some(format!("{SELECTOR_KEY}={}", self.ns)),
            leader_election_namespace: Some(self.ns.clone()),
            lease_name: Some("meshid-controllers".into()),
            pod_name: Some(pod.into()),
            extra_roots: Some(self.extra_roots.clone()),
            default_ttl: Some("30s".into()),
            max_ttl: Some("30s".into()),
            // 30s leaves (the default minimum is 10m).
            min_ttl: Some("30s".into()),
            signing_roots_interval: Some("1s".into()),
            signing_roots_grace: Some("3s".into()),
            istiod_cert: Some(true),
            istiod_namespace: Some(self.istio.clone()),
            ..Default::default()
        };
        let (stop, rx) = oneshot::channel::<()>();
        let handle = start_server(args.validate().unwrap(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        self.lb.add(handle.grpc_addr);
        Replica { handle, stop }
    }

    /// Takes a replica out of the endpoints, then stops it (SIGTERM and drain).
    async fn stop_replica(&self, r: Replica) {
        self.lb.remove(r.handle.grpc_addr);
        let _ = r.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), r.handle.wait())
            .await
            .expect("a replica drains within 30s")
            .unwrap();
    }

    async fn distributed_bundle(&self) -> Option<String> {
        Api::<ConfigMap>::namespaced(self.h.admin_client(), &self.app)
            .get_opt("istio-ca-root-cert")
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("root-cert.pem").cloned())
    }

    /// The istiod Secret's `ca.crt`.
    async fn istiod_ca(&self) -> Option<String> {
        Api::<Secret>::namespaced(self.h.admin_client(), &self.istio)
            .get_opt("istiod-tls")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.data)
            .and_then(|d| {
                d.get("ca.crt")
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
    }

    /// An agent for `sa` whose CA root file is kept equal to the distributed bundle.
    async fn start_agent(&self, sa: &str) -> Agent {
        let dir = self.dir.path().join(sa);
        std::fs::create_dir_all(dir.join("sds")).unwrap();
        let root_file = dir.join("ca-root.pem");
        let bundle = self.distributed_bundle().await.expect("bundle distributed");
        std::fs::write(&root_file, bundle).unwrap();
        let token = self
            .h
            .request_token(
                &self.app,
                sa,
                &TokenOptions::for_audiences(["istio-ca"]).expiring_in(3600),
            )
            .await
            .unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let mut config = AgentConfig::new(
            format!("https://{}", self.lb.addr),
            root_file,
            token_file,
            self.app.clone(),
            sa,
        );
        config.ca_server_name = Some("localhost".into());
        config.trust_domain = TD.into();
        config.cert_ttl = Duration::from_secs(30);
        config.refresh_fraction = 0.5;
        config.retry_initial = Duration::from_millis(200);
        config.retry_max = Duration::from_secs(2);
        config.sds_socket = dir.join("sds").join("socket");
        config.http_listen = "127.0.0.1:0".parse().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let handle = start_agent(config, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        Agent {
            handle,
            _stop: stop,
        }
    }

    /// Mirrors `istio-ca-root-cert` into every agent's CA root file, atomically, as the kubelet
    /// updates a projected ConfigMap in place.
    fn project_bundle(self: &Arc<Self>, agents: &[&str], stop: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        let files: Vec<PathBuf> = agents
            .iter()
            .map(|sa| me.dir.path().join(sa).join("ca-root.pem"))
            .collect();
        tokio::spawn(async move {
            let mut last = String::new();
            while !*stop.borrow() {
                if let Some(b) = me.distributed_bundle().await
                    && b != last
                {
                    for f in &files {
                        let tmp = f.with_extension("tmp");
                        std::fs::write(&tmp, &b).unwrap();
                        std::fs::rename(&tmp, f).unwrap();
                    }
                    last = b;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    }
}

/// Checks the two agents' leaves against each other's bundle and the distributed one, and
/// follows the distributed bundle's root sets, until `stop`.
fn monitor(
    r: Arc<Rotation>,
    agents: Arc<[Agent; 2]>,
    root1: Vec<u8>,
    root2: Vec<u8>,
    findings: Arc<Mutex<Findings>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut checked: BTreeSet<(String, String, String)> = BTreeSet::new();
        let mut web_rx = agents[0].handle.svids();
        let mut client_rx = agents[1].handle.svids();
        loop {
            let bundle = r.distributed_bundle().await.unwrap_or_default();
            let set = roots(&bundle);
            let istiod = roots(&r.istiod_ca().await.unwrap_or_default());
            let (web, client) = (agents[0].current(), agents[1].current());
            {
                let mut f = findings.lock().unwrap();
                if f.bundles.last() != Some(&set) {
                    // The moment the old root is retired, every agent holds the new one.
                    if !set.contains(&root1) {
                        for (name, svid) in [("web", &web), ("client", &client)] {
                            let held = svid.as_ref().map(|s| roots(&s.roots_pem));
                            if !held.is_some_and(|h| h.contains(&root2)) {
                                f.violations.push(format!(
                                    "root 1 retired while agent {name} did not hold root 2"
                                ));
                            }
                        }
                    }
                    f.bundles.push(set.clone());
                }
                if !istiod.is_empty() && f.istiod_bundles.last() != Some(&istiod) {
                    f.istiod_bundles.push(istiod);
                }
            }
            // Each leaf against the bundle its peer holds now and the distributed one.
            let pairs = [(&web, &client, "web"), (&client, &web, "client")];
            for (own, peer, name) in pairs {
                let (Some(own), Some(peer)) = (own, peer) else {
                    continue;
                };
                let key = (
                    own.serial_hex.clone(),
                    peer.serial_hex.clone(),
                    bundle.clone(),
                );
                if !checked.insert(key) {
                    continue;
                }
                // openssl runs on a blocking thread: the replicas share this runtime.
                let (dir, chain, peer_roots, distributed) = (
                    r.dir.path().to_path_buf(),
                    own.chain_pem.clone(),
                    peer.roots_pem.clone(),
                    bundle.clone(),
                );
                let (ok_peer, ok_distributed) = tokio::task::spawn_blocking(move || {
                    (
                        verifies(&dir, &chain, &peer_roots),
                        distributed.is_empty() || verifies(&dir, &chain, &distributed),
                    )
                })
                .await
                .unwrap();
                let mut f = findings.lock().unwrap();
                f.leaves_checked += 1;
                if !ok_peer {
                    f.violations.push(format!(
                        "{name} leaf {} does not verify against its peer's bundle",
                        own.serial_hex
                    ));
                }
                if !ok_distributed {
                    f.violations.push(format!(
                        "{name} leaf {} does not verify against istio-ca-root-cert",
                        own.serial_hex
                    ));
                }
            }
            tokio::select! {
                _ = stop.wait_for(|v| *v) => return,
                _ = web_rx.changed() => {}
                _ = client_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    })
}

/// Sends mTLS requests to Envoy (web) as the client workload, with the client agent's current
/// SVID and bundle, counting successes and failures, until `stop`.
fn traffic(
    envoy_addr: SocketAddr,
    server_id: String,
    agents: Arc<[Agent; 2]>,
    findings: Arc<Mutex<Findings>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Some(client) = agents[1].current() {
                let config = client_config(&client.roots_pem, &server_id, Some(&client)).unwrap();
                let res = mtls_get(envoy_addr, config).await;
                let mut f = findings.lock().unwrap();
                match res {
                    Ok(x) if x.response.starts_with("HTTP/1.1 200") => f.requests_ok += 1,
                    Ok(x) => f.requests_failed.push(x.response),
                    Err(e) => f.requests_failed.push(format!("{e:#}")),
                }
            }
            tokio::select! {
                _ = stop.wait_for(|v| *v) => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })
}

fn pem_of(der: &[u8]) -> String {
    meshid::pem::cert_to_pem(&rustls::pki_types::CertificateDer::from(der.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_root_rotation_with_three_replicas_a_rolling_update_agents_and_envoys_fails_no_request_and_no_leaf()
 {
    let Some(h) = Harness::from_env().await else {
        return;
    };
    let Some(envoy_bin) = envoy_binary() else {
        return;
    };
    let r = Arc::new(Rotation::new(h).await);
    let ca1 = r.dir.path().join("ca1");
    let ca2 = r.dir.path().join("ca2");
    // The operator's two CAs (the chart mounts the signing CA from a Secret).
    meshid::signer::LocalSigner::load_or_generate(&ca1, TD).unwrap();
    meshid::signer::LocalSigner::load_or_generate(&ca2, TD).unwrap();
    let (root1, root2) = (root_der(&ca1), root_der(&ca2));

    // Phase 0: three replicas signing with root 1.
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(r.start_replica(&ca1, &format!("meshid-old-{i}")).await);
    }
    eventually(WAIT, || async {
        let b = r.distributed_bundle().await.unwrap_or_default();
        anyhow::ensure!(roots(&b) == BTreeSet::from([root1.clone()]), "not yet");
        Ok(())
    })
    .await
    .unwrap();
    let agents = Arc::new([r.start_agent("web").await, r.start_agent("client").await]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    r.project_bundle(&["web", "client"], stop_rx.clone());
    for a in agents.iter() {
        let mut rx = a.handle.svids();
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.is_some()))
            .await
            .expect("first SVID")
            .unwrap();
    }
    let envoy_dir = r.dir.path().join("envoy");
    std::fs::create_dir_all(&envoy_dir).unwrap();
    let port = free_port();
    let mut envoy = Envoy::start(
        &envoy_bin,
        &mtls_bootstrap(&agents[0].handle.sds_socket, port, TD),
        &envoy_dir,
    )
    .unwrap();
    let envoy_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server_id = WEB_ID.replace("{ns}", &r.app);
    // Envoy warms its listener once both secrets arrived.
    eventually(WAIT, || {
        let agents = agents.clone();
        let server_id = server_id.clone();
        async move {
            let client = agents[1]
                .current()
                .ok_or_else(|| anyhow::anyhow!("no SVID"))?;
            let config = client_config(&client.roots_pem, &server_id, Some(&client))?;
            mtls_get(envoy_addr, config).await.map(|_| ())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("Envoy never served: {e:#}\n{}", envoy.log_tail()));
    let findings = Arc::new(Mutex::new(Findings::default()));
    let watcher = monitor(
        r.clone(),
        agents.clone(),
        root1.clone(),
        root2.clone(),
        findings.clone(),
        stop_rx.clone(),
    );
    // Four clients at once (each request takes about a second: Envoy's delayed close).
    let load: Vec<_> = (0..4)
        .map(|_| {
            traffic(
                envoy_addr,
                server_id.clone(),
                agents.clone(),
                findings.clone(),
                stop_rx.clone(),
            )
        })
        .collect();

    // Step 1, pre-distribute: the new root goes into the extra-roots ConfigMap. Wait until
    // every agent holds it.
    std::fs::write(&r.extra_roots, pem_of(&root2)).unwrap();
    for a in agents.iter() {
        let mut rx = a.handle.svids();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|s| {
                s.as_ref()
                    .is_some_and(|s| roots(&s.roots_pem).contains(&root2))
            }),
        )
        .await
        .expect("every agent holds root 2 within a certificate lifetime")
        .unwrap();
    }

    // Step 2, switch: a rolling update to the new CA, one pod at a time (maxSurge 1,
    // maxUnavailable 0), the extra roots unchanged.
    for i in 0..3 {
        let new = r.start_replica(&ca2, &format!("meshid-new-{i}")).await;
        let old = replicas.remove(0);
        // Some traffic and renewals while old and new replicas serve side by side.
        tokio::time::sleep(Duration::from_secs(5)).await;
        r.stop_replica(old).await;
        replicas.push(new);
        envoy.check_running().unwrap();
    }

    // Step 3: empty the extra roots. The old root leaves every bundle by itself once every
    // leaf it signed has expired (the old replicas' last heartbeat + --max-ttl + grace).
    std::fs::write(&r.extra_roots, "").unwrap();
    eventually(Duration::from_secs(120), || async {
        let b = r.distributed_bundle().await.unwrap_or_default();
        let istiod = r.istiod_ca().await.unwrap_or_default();
        anyhow::ensure!(roots(&b) == BTreeSet::from([root2.clone()]), "not yet");
        anyhow::ensure!(roots(&istiod) == BTreeSet::from([root2.clone()]), "not yet");
        Ok(())
    })
    .await
    .unwrap();
    // Every agent renews at least once more under the new bundle alone.
    for a in agents.iter() {
        let before = a.current().map(|s| s.serial_hex.clone());
        let mut rx = a.handle.svids();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|s| s.as_ref().map(|s| s.serial_hex.clone()) != before),
        )
        .await
        .expect("a renewal after the retirement")
        .unwrap();
    }
    let _ = stop_tx.send(true);
    watcher.await.unwrap();
    for l in load {
        l.await.unwrap();
    }
    envoy.check_running().unwrap();

    for rep in replicas {
        r.stop_replica(rep).await;
    }
    let f = findings.lock().unwrap();
    eprintln!(
        "rotation: {} requests ok, {} failed, {} leaf checks, bundles {:?}, istiod ca.crt {:?}",
        f.requests_ok,
        f.requests_failed.len(),
        f.leaves_checked,
        f.bundles.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        f.istiod_bundles
            .iter()
            .map(BTreeSet::len)
            .collect::<Vec<_>>()
    );
    assert!(
        f.requests_failed.is_empty(),
        "0 failed requests: {} failed ({} succeeded), the first: {:?}",
        f.requests_failed.len(),
        f.requests_ok,
        &f.requests_failed[..f.requests_failed.len().min(3)]
    );
    assert!(f.requests_ok > 100, "traffic flowed: {}", f.requests_ok);
    assert_eq!(f.violations, Vec::<String>::new());
    assert!(
        f.leaves_checked >= 8,
        "leaves checked: {}",
        f.leaves_checked
    );
    let expected = vec![
        BTreeSet::from([root1.clone()]),
        BTreeSet::from([root1.clone(), root2.clone()]),
        BTreeSet::from([root2.clone()]),
    ];
    assert_eq!(
        f.bundles, expected,
        "the distributed bundle went root 1 → both → root 2, never dropping a root in use"
    );
    assert_eq!(
        f.istiod_bundles, expected,
        "istiod's ca.crt went root 1 → both → root 2"
    );
}
