//! Kubeconfigs of remote clusters: from a remote Secret (untrusted input: anyone who may write a
//! Secret in meshid's namespace wrote it) or from a file the operator named (trusted).
//!
//! A kubeconfig from a Secret may not make meshid run a program (`exec`, `auth-provider`), read
//! a local file (`certificate-authority`, `client-certificate`, `client-key`, `tokenFile`) or
//! skip the server's certificate check (`insecure-skip-tls-verify`): the clients built from it
//! review the tokens meshid issues certificates for. `istioctl create-remote-secret` writes a
//! bearer token and inline CA data, which pass.

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// How long a connection to a remote apiserver may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a remote cluster's kubeconfig cannot be used. Messages never quote the kubeconfig (it
/// holds credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KubeconfigError {
    /// Not a kubeconfig YAML document.
    #[error("not a kubeconfig YAML document")]
    Parse,
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A kubeconfig from a Secret uses a field meshid refuses there.
    #[error("uses {0}, which a remote secret may not")]
    Forbidden(&'static str),
    /// The server URL is not `https://`.
    #[error("the server URL is not https")]
    NotHttps,
    /// kube could not build a client from it (no current context, bad CA data, ...).
    #[error("unusable: {0}")]
    Unusable(String),
}

/// Rejects what a kubeconfig from a Secret may not use (see the module docs).
pub fn check_untrusted(kc: &Kubeconfig) -> Result<(), KubeconfigError> {
    for named in &kc.clusters {
        let Some(c) = &named.cluster else { continue };
        if c.certificate_authority.is_some() {
            return Err(KubeconfigError::Forbidden("certificate-authority (a file)"));
        }
        if c.insecure_skip_tls_verify == Some(true) {
            return Err(KubeconfigError::Forbidden("insecure-skip-tls-verify"));
        }
        if !c
            .server
            .as_deref()
            .is_some_and(|s| s.to_ascii_lowercase().starts_with("https://"))
        {
            return Err(KubeconfigError::NotHttps);
        }
    }
    for named in &kc.auth_infos {
        let Some(a) = &named.auth_info else { continue };
        let forbidden = [
            (a.exec.is_some(), "exec"),
            (a.auth_provider.is_some(), "auth-provider"),
            (a.token_file.is_some(), "tokenFile"),
            (
                a.client_certificate.is_some(),
                "client-certificate (a file)",
            ),
            (a.client_key.is_some(), "client-key (a file)"),
        ];
        if let Some((_, what)) = forbidden.into_iter().find(|(used, _)| *used) {
            return Err(KubeconfigError::Forbidden(what));
        }
    }
    Ok(())
}

/// A client for the kubeconfig `yaml` taken from a remote Secret.
pub async fn client_from_secret(yaml: &[u8]) -> Result<kube::Client, KubeconfigError> {
    let text = std::str::from_utf8(yaml).map_err(|_| KubeconfigError::Parse)?;
    let kc = Kubeconfig::from_yaml(text).map_err(|_| KubeconfigError::Parse)?;
    check_untrusted(&kc)?;
    client_from(kc).await
}

/// A client for the kubeconfig file at `path`, which the operator named: every kubeconfig
/// feature kube supports is allowed.
pub async fn client_from_file(path: &Path) -> Result<kube::Client, KubeconfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| KubeconfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let kc = Kubeconfig::from_yaml(&text).map_err(|_| KubeconfigError::Parse)?;
    client_from(kc).await
}

async fn client_from(kc: Kubeconfig) -> Result<kube::Client, KubeconfigError> {
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| KubeconfigError::Unusable(e.to_string()))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    kube::Client::try_from(config).map_err(|e| KubeconfigError::Unusable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `istioctl create-remote-secret` writes as the value of the Secret's data key.
    fn istioctl_kubeconfig(server: &str) -> String {
        format!(
            "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    \
             server: {server}\n  name: b\ncontexts:\n- context:\n    cluster: b\n    user: b\n  \
             name: b\ncurrent-context: b\nkind: Config\npreferences: {{}}\nusers:\n- name: b\n  \
             user:\n    token: abc.def.ghi\n",
            ca = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                rcgen::generate_simple_self_signed(vec!["b".into()])
                    .unwrap()
                    .cert
                    .pem()
            ),
        )
    }

    fn parse(yaml: &str) -> Kubeconfig {
        Kubeconfig::from_yaml(yaml).unwrap()
    }

    #[tokio::test]
    async fn istioctl_s_remote_secret_kubeconfig_builds_a_client() {
        crate::crypto::install_provider();
        let kc = istioctl_kubeconfig("https://127.0.0.1:6443");
        client_from_secret(kc.as_bytes()).await.unwrap();
    }

    #[tokio::test]
    async fn a_remote_secret_may_not_run_programs_read_files_or_skip_tls_checks() {
        let base = istioctl_kubeconfig("https://127.0.0.1:6443");
        // The token's line replaced by another credential; a line added before the server's.
        let user = |credential: &str| base.replace("    token: abc.def.ghi\n", credential);
        let cluster = |line: &str| {
            base.replace(
                "    server: https://",
                &format!("{line}    server: https://"),
            )
        };
        let cases = [
            (
                user(
                    "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n",
                ),
                KubeconfigError::Forbidden("exec"),
            ),
            (
                user("    auth-provider:\n      name: gcp\n"),
                KubeconfigError::Forbidden("auth-provider"),
            ),
            (
                user("    tokenFile: /var/run/secrets/x\n"),
                KubeconfigError::Forbidden("tokenFile"),
            ),
            (
                user("    client-key: /etc/meshid/ca-key.pem\n"),
                KubeconfigError::Forbidden("client-key (a file)"),
            ),
            (
                cluster("    certificate-authority: /etc/passwd\n"),
                KubeconfigError::Forbidden("certificate-authority (a file)"),
            ),
            (
                cluster("    insecure-skip-tls-verify: true\n"),
                KubeconfigError::Forbidden("insecure-skip-tls-verify"),
            ),
            (
                istioctl_kubeconfig("http://127.0.0.1:8080"),
                KubeconfigError::NotHttps,
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(check_untrusted(&parse(&yaml)), Err(want.clone()), "{want}");
            assert_eq!(
                client_from_secret(yaml.as_bytes()).await.err(),
                Some(want.clone())
            );
        }
    }

    #[tokio::test]
    async fn junk_and_context_less_kubeconfigs_are_reported_without_their_content() {
        for junk in ["{", "token: s3cr3t-token\n- [", "\u{0}"] {
            let err = client_from_secret(junk.as_bytes()).await.err().unwrap();
            assert_eq!(err, KubeconfigError::Parse);
            assert!(!err.to_string().contains("s3cr3t"));
        }
        let no_context =
            istioctl_kubeconfig("https://127.0.0.1:6443").replace("current-context: b\n", "");
        assert!(matches!(
            client_from_secret(no_context.as_bytes()).await,
            Err(KubeconfigError::Unusable(_))
        ));
        assert!(matches!(
            client_from_secret(&[0xff, 0xfe]).await,
            Err(KubeconfigError::Parse)
        ));
    }
}
