//! Agent settings from flags and environment (`MESHID_*`), validated once at startup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::policy::{PolicyError, RotationPolicy};
use crate::identity::{IdentityError, MIN_TTL_FLOOR, SpiffeId};
use crate::svid::WorkloadKeyType;
use crate::telemetry::LogFormat;

/// Default CA address: the Service of the meshid Helm chart installed as `meshid` in
/// `meshid-system`.
pub const DEFAULT_CA_ADDRESS: &str = "https://meshid.meshid-system.svc:443";
/// Default CA root file: where Istio mounts the `istio-ca-root-cert` ConfigMap.
pub const DEFAULT_CA_ROOT_FILE: &str = "/var/run/secrets/istio/root-cert.pem";
/// Default token file: Istio's projected service-account token (audience `istio-ca`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// Default HTTP listen address for probes and metrics.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9403";
/// Jitter of refresh and retry times (a fraction of the delay, only ever earlier).
const JITTER: f64 = 0.1;

/// The agent configuration is invalid. The message names the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentConfigError {
    /// A setting has an invalid value.
    #[error("{setting}: {message}")]
    Invalid {
        /// Flag name of the setting.
        setting: &'static str,
        /// Why.
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> AgentConfigError {
    AgentConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

/// `meshid agent` settings: flags, or the `MESHID_*` environment variables named below.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct AgentConfig {
    /// CA address, `https://host:port` (a bare `host:port` means https).
    #[arg(long, env = "MESHID_CA_ADDRESS", default_value = DEFAULT_CA_ADDRESS)]
    pub ca_address: String,
    /// PEM roots to verify the CA's serving certificate with.
    #[arg(long, env = "MESHID_CA_ROOT_FILE", default_value = DEFAULT_CA_ROOT_FILE)]
    pub ca_root_file: PathBuf,
    /// TLS server name to verify on the CA's certificate [default: the address host].
    #[arg(long, env = "MESHID_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// Cluster ID sent in the `clusterid` header [default: none sent].
    #[arg(long, env = "MESHID_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Service-account token file, read again for every request (the kubelet rotates it).
    #[arg(long, env = "MESHID_TOKEN_FILE", default_value = DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// SPIFFE trust domain of the identity.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Namespace of the workload (identity `spiffe://<td>/ns/<namespace>/sa/<sa>`).
    #[arg(long, env = "MESHID_NAMESPACE")]
    pub namespace: String,
    /// Service account of the workload.
    #[arg(long, env = "MESHID_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Key algorithm generated for each certificate.
    #[arg(
        long,
        env = "MESHID_KEY_TYPE",
        value_enum,
        default_value = "ecdsa-p256"
    )]
    pub key_type: WorkloadKeyType,
    /// Certificate lifetime to request, e.g. `24h`, at least 10s. The CA may issue less (its
    /// --max-ttl) or more (its --min-ttl, 10m by default); renewal follows what it issued.
    #[arg(long, env = "MESHID_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// Renew after this fraction of the lifetime left when the certificate arrived (0 < f < 1).
    #[arg(long, env = "MESHID_REFRESH_FRACTION", default_value_t = 0.5)]
    pub refresh_fraction: f64,
    /// First retry delay after a failed renewal; doubles per failure.
    #[arg(long, env = "MESHID_RETRY_INITIAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub retry_initial: Duration,
    /// Longest retry delay (retries also come faster as the current certificate nears expiry).
    #[arg(long, env = "MESHID_RETRY_MAX", value_parser = humantime::parse_duration, default_value = "30s")]
    pub retry_max: Duration,
    /// Unix socket path for Envoy SDS.
    #[arg(long, env = "MESHID_SDS_SOCKET", default_value = crate::sds::DEFAULT_SOCKET)]
    pub sds_socket: PathBuf,
    /// Also write cert-chain.pem, key.pem (0600) and root-cert.pem into this directory.
    #[arg(long, env = "MESHID_WRITE_FILES")]
    pub write_files: Option<PathBuf>,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "MESHID_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN)]
    pub http_listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "MESHID_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl AgentConfig {
    /// The defaults for everything but the CA address, its root file, the token file and the
    /// identity's namespace and service account.
    pub fn new(
        ca_address: impl Into<String>,
        ca_root_file: impl Into<PathBuf>,
        token_file: impl Into<PathBuf>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            ca_address: ca_address.into(),
            ca_root_file: ca_root_file.into(),
            ca_server_name: None,
            cluster_id: None,
            token_file: token_file.into(),
            trust_domain: "cluster.local".into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            key_type: WorkloadKeyType::EcdsaP256,
            cert_ttl: Duration::from_secs(24 * 3600),
            refresh_fraction: 0.5,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            sds_socket: crate::sds::DEFAULT_SOCKET.into(),
            write_files: None,
            http_listen: DEFAULT_HTTP_LISTEN.parse().expect("valid default address"),
            log_format: LogFormat::Text,
        }
    }

    /// Validates the settings. Errors name the offending flag.
    pub(super) fn validate(&self) -> Result<AgentSettings, AgentConfigError> {
        let ca_address = match self.ca_address.split_once("://") {
            None => format!("https://{}", self.ca_address),
            Some(("https", rest)) if !rest.is_empty() => self.ca_address.clone(),
            Some(_) => {
                return Err(invalid(
                    "--ca-address",
                    "must be https://host:port or host:port",
                ));
            }
        };
        let identity = SpiffeId::for_service_account(
            &self.trust_domain,
            &self.namespace,
            &self.service_account,
        )
        .map_err(|e| match e {
            IdentityError::InvalidTrustDomain => {
                invalid("--trust-domain", "not a valid SPIFFE trust domain")
            }
            _ => invalid(
                "--namespace/--service-account",
                "must be non-empty Kubernetes names",
            ),
        })?;
        if self.cert_ttl < MIN_TTL_FLOOR {
            return Err(invalid(
                "--cert-ttl",
                format!(
                    "must be at least {} (meshid raises shorter requests to its --min-ttl, 10m by default)",
                    humantime::format_duration(MIN_TTL_FLOOR)
                ),
            ));
        }
        let policy = RotationPolicy::new(
            self.refresh_fraction,
            JITTER,
            self.retry_initial,
            self.retry_max,
        )
        .map_err(|e| match e {
            PolicyError::RefreshFraction(_) => invalid("--refresh-fraction", e.to_string()),
            _ => invalid(
                "--retry-initial/--retry-max",
                "must satisfy 0 < initial <= max",
            ),
        })?;
        let non_empty = |v: &Option<String>| {
            v.as_ref()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        Ok(AgentSettings {
            ca_address,
            ca_root_file: self.ca_root_file.clone(),
            ca_server_name: non_empty(&self.ca_server_name),
            cluster_id: non_empty(&self.cluster_id),
            identity,
            token_file: self.token_file.clone(),
            key_type: self.key_type,
            cert_ttl: self.cert_ttl,
            policy,
            sds_socket: self.sds_socket.clone(),
            write_files: self.write_files.clone(),
            http_listen: self.http_listen,
        })
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub(super) struct AgentSettings {
    pub ca_address: String,
    pub ca_root_file: PathBuf,
    pub ca_server_name: Option<String>,
    pub cluster_id: Option<String>,
    pub identity: SpiffeId,
    pub token_file: PathBuf,
    pub key_type: WorkloadKeyType,
    pub cert_ttl: Duration,
    pub policy: RotationPolicy,
    pub sds_socket: PathBuf,
    pub write_files: Option<PathBuf>,
    pub http_listen: SocketAddr,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentConfig,
    }

    fn base() -> AgentConfig {
        AgentConfig::new("meshid:8443", "/root.pem", "/token", "shop", "cart")
    }

    #[test]
    fn the_documented_defaults_are_the_flag_defaults() {
        let parsed = Cli::try_parse_from([
            "agent",
            "--namespace",
            "shop",
            "--service-account",
            "cart",
            "--ca-address",
            "meshid:8443",
            "--ca-root-file",
            "/root.pem",
            "--token-file",
            "/token",
        ])
        .unwrap();
        assert_eq!(parsed.agent, base());
    }

    #[test]
    fn a_bare_host_port_means_https_and_the_identity_is_built_from_the_flags() {
        let s = base().validate().unwrap();
        assert_eq!(s.ca_address, "https://meshid:8443");
        assert_eq!(
            s.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(s.policy.refresh_fraction(), 0.5);
        assert_eq!(s.cluster_id, None);
    }

    #[test]
    fn invalid_settings_are_reported_by_flag_name() {
        let cases: Vec<(AgentConfig, &str)> = vec![
            (
                AgentConfig {
                    ca_address: "http://meshid:8443".into(),
                    ..base()
                },
                "--ca-address",
            ),
            (
                AgentConfig {
                    trust_domain: "Bad Domain".into(),
                    ..base()
                },
                "--trust-domain",
            ),
            (
                AgentConfig {
                    namespace: String::new(),
                    ..base()
                },
                "--namespace",
            ),
            (
                AgentConfig {
                    cert_ttl: Duration::ZERO,
                    ..base()
                },
                "--cert-ttl",
            ),
            (
                AgentConfig {
                    cert_ttl: Duration::from_secs(9),
                    ..base()
                },
                "--cert-ttl",
            ),
            (
                AgentConfig {
                    refresh_fraction: 1.5,
                    ..base()
                },
                "--refresh-fraction",
            ),
            (
                AgentConfig {
                    retry_initial: Duration::from_secs(60),
                    ..base()
                },
                "--retry-initial",
            ),
        ];
        for (config, flag) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }
}
