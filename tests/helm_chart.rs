//! The Helm chart's configuration file is one `meshid server` accepts.
//!
//! `tests/helm/check.sh` renders `charts/meshid` for every values file in `tests/helm/values/`
//! and writes each rendering's meshid config file to `<dir>/<scenario>/config.yaml`; it then
//! runs this test with `MESHID_HELM_RENDERED=<dir>`. Each file must pass the server's own
//! `--config` loading and validation (unknown keys are an error there, so a renamed flag breaks
//! this test), and the validated settings must say what the file says.
//!
//! Skipped when `MESHID_HELM_RENDERED` is unset: run `tests/helm/check.sh`.
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

use std::path::{Path, PathBuf};

use meshid::config::{AuthnConfig, ServerArgs, ServerConfig, ServingTls, SignerConfig};

/// The rendered config files, by scenario name; `None` when the variable is unset.
fn rendered_configs() -> Option<Vec<(String, PathBuf)>> {
    let Some(dir) = std::env::var_os("MESHID_HELM_RENDERED") else {
        eprintln!("skipping: MESHID_HELM_RENDERED is not set; run tests/helm/check.sh");
        return None;
    };
    let dir = PathBuf::from(dir);
    let mut configs: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("MESHID_HELM_RENDERED={}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.join("config.yaml").is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, p.join("config.yaml"))
        })
        .collect();
    configs.sort();
    assert!(
        !configs.is_empty(),
        "no */config.yaml under {}",
        dir.display()
    );
    Some(configs)
}

/// The file as a generic key/value tree, to compare with what the server made of it.
fn raw(path: &Path) -> config::Config {
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .build()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strings(file: &config::Config, key: &str) -> Vec<String> {
    file.get_array(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .into_iter()
        .map(|v| v.into_string().expect("a string"))
        .collect()
}

fn resolve(path: &Path) -> ServerConfig {
    ServerArgs {
        config: Some(path.to_owned()),
        ..Default::default()
    }
    .resolve()
    .unwrap_or_else(|e| panic!("meshid server --config {} refuses it: {e}", path.display()))
}

#[test]
fn every_rendered_config_file_is_accepted_by_meshid_server() {
    let Some(configs) = rendered_configs() else {
        return;
    };
    for (scenario, path) in configs {
        let file = raw(&path);
        let config = resolve(&path);
        let get = |key: &str| {
            file.get_string(key)
                .unwrap_or_else(|e| panic!("{scenario}: {key}: {e}"))
        };
        let flag = |key: &str| {
            file.get_bool(key)
                .unwrap_or_else(|e| panic!("{scenario}: {key}: {e}"))
        };

        assert_eq!(config.trust_domain, get("trust-domain"), "{scenario}");
        assert_eq!(config.cluster_id, get("cluster-id"), "{scenario}");
        assert_eq!(config.listen.to_string(), get("listen"), "{scenario}");
        assert_eq!(
            config.http_listen.to_string(),
            get("http-listen"),
            "{scenario}"
        );
        match (get("signer").as_str(), &config.signer) {
            ("local", SignerConfig::Files(files)) => {
                assert_eq!(files.ca_cert, PathBuf::from(get("ca-cert")), "{scenario}");
                assert_eq!(files.ca_key, PathBuf::from(get("ca-key")), "{scenario}");
            }
            ("aws-pca", SignerConfig::AwsPca(pca)) => {
                assert_eq!(pca.ca_arn, get("pca-arn"), "{scenario}");
            }
            (kind, signer) => panic!("{scenario}: signer {kind} became {signer:?}"),
        }
        match &config.tls {
            ServingTls::SelfIssued { hosts } => {
                assert_eq!(hosts, &strings(&file, "serving-hosts"), "{scenario}");
            }
            ServingTls::Files { cert, .. } => {
                assert_eq!(cert, &PathBuf::from(get("tls-cert")), "{scenario}");
            }
        }
        // In the cluster: TokenReview with the pod's own service account, no kubeconfig.
        assert!(
            matches!(
                config.authn,
                AuthnConfig::TokenReview {
                    kubeconfig: None,
                    ..
                }
            ),
            "{scenario}: {:?}",
            config.authn
        );
        let trusted: Vec<String> = config
            .trusted_node_accounts
            .iter()
            .map(|(ns, sa)| format!("{ns}/{sa}"))
            .collect();
        assert_eq!(
            trusted,
            strings(&file, "trusted-node-accounts"),
            "{scenario}"
        );
        // Remote clusters: the Secrets are watched exactly where the chart grants reading them.
        let remote_secrets = file.get_bool("remote-secrets").unwrap_or(false);
        assert_eq!(
            config.remote_clusters.secrets_namespace,
            remote_secrets.then(|| get("remote-secrets-namespace")),
            "{scenario}"
        );
        // The controllers (and their leader election) run when one of them is on; the chart's
        // RBAC names this Lease and this Secret, so the controllers must use exactly these.
        let (root, istiod) = (flag("root-configmap"), flag("istiod-cert"));
        let Some(controllers) = config.controllers.as_ref() else {
            assert!(
                !root && !istiod,
                "{scenario}: the file enables a controller but meshid runs none"
            );
            continue;
        };
        assert_eq!(controllers.root_configmaps, root, "{scenario}");
        assert_eq!(
            controllers.lease.namespace,
            get("leader-election-namespace"),
            "{scenario}"
        );
        assert_eq!(controllers.lease.name, get("lease-name"), "{scenario}");
        assert_eq!(controllers.istiod.is_some(), istiod, "{scenario}");
        if let Some(settings) = &controllers.istiod {
            assert_eq!(settings.namespace, get("istiod-namespace"), "{scenario}");
            assert_eq!(
                settings.secret_name,
                get("istiod-secret-name"),
                "{scenario}"
            );
        }
    }
}
