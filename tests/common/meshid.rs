//! Helpers for tests that run meshid itself: kubeconfigs for a service account token, HTTP
//! probes, metric values, and openssl (an independent implementation) for keys and CSRs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::rbac::v1::PolicyRule;

use super::kube::{Harness, TokenOptions, rule};

/// Writes a kubeconfig for the harness apiserver (or `server_override`) that authenticates
/// with `token` only.
pub fn write_token_kubeconfig(
    h: &Harness,
    token: &str,
    server_override: Option<&str>,
    path: &Path,
) {
    let mut kc: serde_json::Value = {
        let parsed =
            kube::config::Kubeconfig::read_from(h.kubeconfig_path()).expect("harness kubeconfig");
        serde_json::to_value(&parsed).expect("kubeconfig as json")
    };
    for user in kc["users"].as_array_mut().expect("users") {
        user["user"] = serde_json::json!({ "token": token });
    }
    if let Some(server) = server_override {
        for cluster in kc["clusters"].as_array_mut().expect("clusters") {
            cluster["cluster"]["server"] = serde_json::json!(server);
        }
    }
    // JSON is YAML: kube reads it as a kubeconfig.
    std::fs::write(path, serde_json::to_vec(&kc).unwrap()).unwrap();
}

/// The rules the chart grants `meshid server` with its controllers on (ClusterRole and the
/// release-namespace Role), plus pod get/list for ztunnel node authorization if asked.
pub fn server_rules(node_authorization: bool) -> Vec<PolicyRule> {
    let mut rules = vec![
        rule("authentication.k8s.io", "tokenreviews", &["create"]),
        rule(
            "",
            "configmaps",
            &["get", "list", "watch", "create", "update", "patch"],
        ),
        rule("", "namespaces", &["get", "list", "watch"]),
        rule(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"],
        ),
        rule("", "secrets", &["get", "create", "update"]),
    ];
    if node_authorization {
        rules.push(rule("", "pods", &["get", "list"]));
    }
    rules
}

/// Creates the service account `meshid` in `ns`, grants it `rules` through the cluster role
/// `role`, and writes a kubeconfig carrying its token into a new temporary directory.
pub async fn server_identity(
    h: &Harness,
    ns: &str,
    role: &str,
    rules: Vec<PolicyRule>,
) -> (tempfile::TempDir, PathBuf) {
    h.create_service_account(ns, "meshid").await.unwrap();
    h.grant_cluster_role(role, rules, ns, "meshid")
        .await
        .unwrap();
    let token = h
        .request_token(ns, "meshid", &TokenOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    write_token_kubeconfig(h, &token, None, &kubeconfig);
    (dir, kubeconfig)
}

/// A meshid server running on this test's runtime, and a way to stop it.
pub struct Running {
    pub handle: meshid::app::ServerHandle,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    /// Starts `meshid server` with `args`, which must be valid.
    pub async fn start(args: meshid::config::ServerArgs) -> Self {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = meshid::app::start_server(args.validate().unwrap(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        Running { handle, stop }
    }

    /// Shuts it down and waits until it has finished.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.wait().await.unwrap();
    }

    /// `path` from its HTTP listener, fetched on a blocking thread: the server runs on this
    /// test's runtime.
    pub async fn get(&self, path: &'static str) -> String {
        let addr = self.handle.http_addr;
        tokio::task::spawn_blocking(move || http_get(addr, path))
            .await
            .unwrap()
    }
}

/// A plain HTTP/1.1 GET on loopback, returning the raw response.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one series in Prometheus text output (0 when absent).
pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// A CA API client for `server`, verifying its self-issued serving certificate (which names
/// `localhost`) against the server's root.
pub fn ca_client(server: &meshid::app::ServerHandle) -> meshid::agent::CaClient {
    meshid::agent::CaClient::new(
        &format!("https://{}", server.grpc_addr),
        &server.root_pem,
        Some("localhost"),
        None,
    )
    .expect("CA client")
}

/// Runs the openssl CLI and returns stdout; panics with stderr on failure.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl CLI must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Generates a key of `alg` ("rsa:2048", "rsa:1024", "ec") in `dir` and returns its path.
pub fn openssl_key(dir: &Path, name: &str, alg: &str) -> PathBuf {
    let path = dir.join(format!("{name}.key"));
    let p = path.to_str().unwrap();
    match alg.strip_prefix("rsa:") {
        Some(bits) => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
            "-out",
            p,
        ]),
        None => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            p,
        ]),
    };
    path
}

/// A CSR made by openssl (an independent implementation) with `subj` and extra `-addext`s.
pub fn openssl_csr(key: &Path, subj: &str, exts: &[&str]) -> String {
    let mut args = vec!["req", "-new", "-key", key.to_str().unwrap(), "-subj", subj];
    for e in exts {
        args.push("-addext");
        args.push(e);
    }
    String::from_utf8(openssl(&args)).unwrap()
}
