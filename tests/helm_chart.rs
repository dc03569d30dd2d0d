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
fn raw(path: &Path) -> RawFile {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str::<serde_json::Value>(&text)
        .map(RawFile)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A rendered config file's top-level keys, read as a YAML reader reads scalars: a number or a
/// boolean is also its text.
struct RawFile(serde_json::Value);

impl RawFile {
    fn get(&self, key: &str) -> Result<&serde_json::Value, String> {
        self.0.get(key).ok_or_else(|| format!("{key} is not set"))
    }
    fn get_string(&self, key: &str) -> Result<String, String> {
        match self.get(key)? {
            serde_json::Value::String(s) => Ok(s.clone()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Ok(v.to_string()),
            v => Err(format!("{key}: {v} is not a scalar")),
        }
    }
    fn get_bool(&self, key: &str) -> Result<bool, String> {
        self.get(key)?
            .as_bool()
            .ok_or_else(|| format!("{key} is not a boolean"))
    }
    fn get_int(&self, key: &str) -> Result<i64, String> {
        self.get(key)?
            .as_i64()
            .ok_or_else(|| format!("{key} is not an integer"))
    }
    fn get_array(&self, key: &str) -> Result<Vec<serde_json::Value>, String> {
        self.get(key)?
            .as_array()
            .cloned()
            .ok_or_else(|| format!("{key} is not a list"))
    }
}

fn strings(file: &RawFile, key: &str) -> Vec<String> {
    file.get_array(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .into_iter()
        .map(|v| v.as_str().expect("a string").to_owned())
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

/// The value of `key` in the file as a duration, or `default` when the chart rendered none.
fn duration_or(file: &RawFile, key: &str, default: std::time::Duration) -> std::time::Duration {
    match file.get_string(key) {
        Ok(text) => humantime::parse_duration(&text).unwrap_or_else(|e| panic!("{key}: {e}")),
        Err(_) => default,
    }
}

/// The value of `key` in the file as a number, or `default` when the chart rendered none.
fn number_or(file: &RawFile, key: &str, default: u64) -> u64 {
    match file.get_int(key) {
        Ok(n) => u64::try_from(n).unwrap_or_else(|_| panic!("{key}: {n} is negative")),
        Err(_) => default,
    }
}

#[test]
fn every_rendered_limit_and_auth_setting_reaches_meshid_and_unset_ones_keep_its_defaults() {
    let Some(configs) = rendered_configs() else {
        return;
    };
    let mut set_somewhere = std::collections::BTreeSet::new();
    for (scenario, path) in configs {
        let file = raw(&path);
        let config = resolve(&path);
        for key in [
            "max-connections",
            "idle-timeout",
            "max-concurrent-streams",
            "request-timeout",
            "max-message-size",
            "max-header-list-size",
            "drain-deadline",
            "token-issuers",
            "pod-token-cache-ttl",
            "apiserver-concurrency",
            "apiserver-queue",
            "issuance-burst",
            "issuance-interval",
        ] {
            if file.get_string(key).is_ok() || file.get_array(key).is_ok() {
                set_somewhere.insert(key);
            }
        }
        let d = meshid::server::ServerLimits::default();
        let l = &config.limits;
        let n = |key, default: usize| number_or(&file, key, default as u64) as usize;
        // (the setting, what meshid resolved, its default when the chart rendered none)
        let numbers = [
            ("max-connections", l.max_connections, d.max_connections),
            (
                "max-concurrent-streams",
                l.max_concurrent_streams as usize,
                d.max_concurrent_streams as usize,
            ),
            ("max-message-size", l.max_message_size, d.max_message_size),
            (
                "max-header-list-size",
                l.max_header_list_size as usize,
                d.max_header_list_size as usize,
            ),
        ];
        for (key, got, default) in numbers {
            assert_eq!(got, n(key, default), "{scenario}: {key}");
        }
        let durations = [
            ("idle-timeout", l.idle_timeout, d.idle_timeout),
            ("request-timeout", l.request_timeout, d.request_timeout),
            ("drain-deadline", l.drain_deadline, d.drain_deadline),
        ];
        for (key, got, default) in durations {
            assert_eq!(got, duration_or(&file, key, default), "{scenario}: {key}");
        }
        let AuthnConfig::TokenReview {
            pod_cache_ttl,
            issuers,
            limits,
            ..
        } = &config.authn
        else {
            panic!("{scenario}: {:?}", config.authn);
        };
        // `--apiserver-concurrency` [default: 16], `--apiserver-queue` [default: 1000].
        assert_eq!(
            limits.concurrency,
            n("apiserver-concurrency", 16),
            "{scenario}"
        );
        assert_eq!(limits.queue, n("apiserver-queue", 1000), "{scenario}");
        let want_issuers = file
            .get_array("token-issuers")
            .map(|_| strings(&file, "token-issuers"))
            .unwrap_or_default();
        assert_eq!(issuers, &want_issuers, "{scenario}");
        // `--pod-token-cache-ttl` [default: 3s].
        let pod_default = std::time::Duration::from_secs(3);
        assert_eq!(
            *pod_cache_ttl,
            duration_or(&file, "pod-token-cache-ttl", pod_default),
            "{scenario}"
        );
        let issuance = meshid::server::IssuanceLimitSettings::default();
        match &config.issuance_limit {
            Some(got) => {
                assert_eq!(
                    u64::from(got.burst.get()),
                    number_or(&file, "issuance-burst", u64::from(issuance.burst.get())),
                    "{scenario}"
                );
                assert_eq!(
                    got.interval,
                    duration_or(&file, "issuance-interval", issuance.interval),
                    "{scenario}"
                );
            }
            None => assert_eq!(file.get_int("issuance-burst").ok(), Some(0), "{scenario}"),
        }
    }
    // At least one scenario (tests/helm/values/limits.yaml) sets every one of them.
    assert_eq!(
        set_somewhere.len(),
        13,
        "set in some scenario: {set_somewhere:?}"
    );
}
