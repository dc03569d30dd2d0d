//! Server configuration: flags, environment and an optional YAML file, merged in that order of
//! precedence and validated once at startup into a [`ServerConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::SpiffeId;
use crate::signer::LocalSignerFiles;
use crate::telemetry::LogFormat;

/// Default CreateCertificate listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default probes/metrics listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9402";

/// The configuration is invalid. The message names the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The YAML file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A setting has an invalid value.
    #[error("{setting}: {message}")]
    Invalid {
        /// Flag name of the setting.
        setting: &'static str,
        /// Why.
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

/// Raw server settings as given on the command line, in the environment (`MESHID_*`) or in
/// the YAML file given by `--config` (same names, kebab-case). Unset means "use the default".
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerArgs {
    /// YAML file with any of these settings; flags and environment take precedence.
    #[arg(long, env = "MESHID_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC (Istio CA API) listen address [default: 0.0.0.0:8443].
    #[arg(long, env = "MESHID_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address for /healthz, /readyz and /metrics [default: 0.0.0.0:9402].
    #[arg(long, env = "MESHID_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long, env = "MESHID_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Cluster ID callers must send in `clusterid` (or leave empty) [default: Kubernetes].
    #[arg(long, env = "MESHID_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Token audiences accepted, comma-separated [default: istio-ca].
    #[arg(long, env = "MESHID_AUDIENCES", value_delimiter = ',')]
    pub audiences: Option<Vec<String>>,
    /// Certificate lifetime when the caller asks for none, e.g. 24h [default: 24h].
    #[arg(long, env = "MESHID_DEFAULT_TTL")]
    pub default_ttl: Option<String>,
    /// Longest certificate lifetime issued, e.g. 48h [default: 48h].
    #[arg(long, env = "MESHID_MAX_TTL")]
    pub max_ttl: Option<String>,
    /// Kubeconfig for TokenReview; in-cluster configuration when unset.
    #[arg(long, env = "MESHID_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest time a successful TokenReview is cached [default: 60s].
    #[arg(long, env = "MESHID_TOKEN_CACHE_TTL")]
    pub token_cache_ttl: Option<String>,
    /// Authenticate with a static `token,namespace,serviceaccount` file instead of
    /// TokenReview (development only).
    #[arg(long, env = "MESHID_STATIC_TOKENS")]
    pub static_tokens: Option<PathBuf>,
    /// Signing CA certificate (PEM).
    #[arg(long, env = "MESHID_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Signing CA private key (PKCS#8 PEM).
    #[arg(long, env = "MESHID_CA_KEY")]
    pub ca_key: Option<PathBuf>,
    /// Intermediates above the signing CA (PEM).
    #[arg(long, env = "MESHID_CA_CHAIN")]
    pub ca_chain: Option<PathBuf>,
    /// Root bundle (PEM); required when the signing CA is an intermediate.
    #[arg(long, env = "MESHID_ROOT_CERT")]
    pub root_cert: Option<PathBuf>,
    /// Directory holding a self-generated root CA (created on first start). Alternative to
    /// --ca-cert/--ca-key for single-node and quickstart use.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Serving certificate (PEM). When unset, meshid issues its own from its CA.
    #[arg(long, env = "MESHID_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serving key (PKCS#8 PEM), with --tls-cert.
    #[arg(long, env = "MESHID_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// DNS names / IPs of the self-issued serving certificate, comma-separated
    /// [default: meshid.meshid-system.svc,localhost,127.0.0.1].
    #[arg(long, env = "MESHID_SERVING_HOSTS", value_delimiter = ',')]
    pub serving_hosts: Option<Vec<String>>,
    /// Log format [default: text].
    #[arg(long, env = "MESHID_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// How callers are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthnConfig {
    /// Kubernetes TokenReview.
    TokenReview {
        /// Kubeconfig path; in-cluster when `None`.
        kubeconfig: Option<PathBuf>,
        /// Positive cache TTL.
        cache_ttl: Duration,
    },
    /// A static token file (development only).
    StaticTokens(PathBuf),
}

/// Where the signing CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerConfig {
    /// Operator-provided files.
    Files(LocalSignerFiles),
    /// A self-generated root kept in a directory.
    GeneratedDir(PathBuf),
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingTls {
    /// Operator-provided certificate and key files.
    Files {
        /// Certificate chain PEM.
        cert: PathBuf,
        /// Key PEM.
        key: PathBuf,
    },
    /// Issued by meshid's own CA for these hosts and renewed at half-life.
    SelfIssued {
        /// DNS names and IPs.
        hosts: Vec<String>,
    },
}

/// Validated server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP probes/metrics listen address.
    pub http_listen: SocketAddr,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Expected `clusterid`.
    pub cluster_id: String,
    /// Accepted token audiences.
    pub audiences: Vec<String>,
    /// Lifetime when none is requested.
    pub default_ttl: Duration,
    /// Longest lifetime.
    pub max_ttl: Duration,
    /// Authentication.
    pub authn: AuthnConfig,
    /// Signer.
    pub signer: SignerConfig,
    /// Serving TLS.
    pub tls: ServingTls,
    /// Log format.
    pub log_format: LogFormat,
}

fn parse_duration(
    setting: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => {
            let d = humantime::parse_duration(v)
                .map_err(|e| invalid(setting, format!("{v:?}: {e}")))?;
            if d.is_zero() {
                return Err(invalid(setting, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

fn load_file(path: &Path) -> Result<ServerArgs, ConfigError> {
    let err = |message: String| ConfigError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize::<ServerArgs>())
        .map_err(|e| err(e.to_string()))
}

macro_rules! merge {
    ($hi:expr, $lo:expr, $($field:ident),+ $(,)?) => {
        ServerArgs { config: $hi.config.clone(), $($field: $hi.$field.clone().or_else(|| $lo.$field.clone())),+ }
    };
}

impl ServerArgs {
    /// Reads the `--config` file if any, merges it under these settings and validates.
    pub fn resolve(&self) -> Result<ServerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => ServerArgs::default(),
        };
        let merged = merge!(
            self,
            file,
            listen,
            http_listen,
            trust_domain,
            cluster_id,
            audiences,
            default_ttl,
            max_ttl,
            kubeconfig,
            token_cache_ttl,
            static_tokens,
            ca_cert,
            ca_key,
            ca_chain,
            root_cert,
            ca_dir,
            tls_cert,
            tls_key,
            serving_hosts,
            log_format,
        );
        merged.validate()
    }

    /// Validates these settings alone (no file) into a [`ServerConfig`].
    pub fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let defaulted = |what: &str, value: &dyn std::fmt::Display| {
            tracing::debug!(setting = what, %value, "using default");
        };
        let listen = self
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let http_listen = self
            .http_listen
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.parse().expect("valid default"));
        let trust_domain = self
            .trust_domain
            .clone()
            .unwrap_or_else(|| "cluster.local".into());
        SpiffeId::for_service_account(&trust_domain, "a", "b").map_err(|_| {
            invalid(
                "--trust-domain",
                format!("{trust_domain:?} is not a valid SPIFFE trust domain"),
            )
        })?;
        let cluster_id = self
            .cluster_id
            .clone()
            .unwrap_or_else(|| "Kubernetes".into());
        let audiences = self
            .audiences
            .clone()
            .unwrap_or_else(|| vec!["istio-ca".into()]);
        let audiences: Vec<String> = audiences
            .into_iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if audiences.is_empty() {
            return Err(invalid("--audiences", "at least one audience is required"));
        }
        let default_ttl = parse_duration(
            "--default-ttl",
            self.default_ttl.as_deref(),
            Duration::from_secs(24 * 3600),
        )?;
        let max_ttl = parse_duration(
            "--max-ttl",
            self.max_ttl.as_deref(),
            Duration::from_secs(48 * 3600),
        )?;
        if default_ttl > max_ttl {
            return Err(invalid("--default-ttl", "must not exceed --max-ttl"));
        }
        let cache_ttl = parse_duration(
            "--token-cache-ttl",
            self.token_cache_ttl.as_deref(),
            Duration::from_secs(60),
        )?;
        let authn = match (&self.static_tokens, &self.kubeconfig) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--static-tokens",
                    "cannot be combined with --kubeconfig",
                ));
            }
            (Some(file), None) => AuthnConfig::StaticTokens(file.clone()),
            (None, kubeconfig) => AuthnConfig::TokenReview {
                kubeconfig: kubeconfig.clone(),
                cache_ttl,
            },
        };
        let signer = match (&self.ca_cert, &self.ca_key, &self.ca_dir) {
            (Some(_), Some(_), Some(_)) => {
                return Err(invalid(
                    "--ca-dir",
                    "cannot be combined with --ca-cert/--ca-key",
                ));
            }
            (Some(cert), Some(key), None) => SignerConfig::Files(LocalSignerFiles {
                ca_cert: cert.clone(),
                ca_key: key.clone(),
                ca_chain: self.ca_chain.clone(),
                root_cert: self.root_cert.clone(),
            }),
            (Some(_), None, _) => return Err(invalid("--ca-key", "required with --ca-cert")),
            (None, Some(_), _) => return Err(invalid("--ca-cert", "required with --ca-key")),
            (None, None, Some(dir)) => SignerConfig::GeneratedDir(dir.clone()),
            (None, None, None) => {
                return Err(invalid(
                    "--ca-cert",
                    "a signer is required: --ca-cert and --ca-key, or --ca-dir",
                ));
            }
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServingTls::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (Some(_), None) => return Err(invalid("--tls-key", "required with --tls-cert")),
            (None, Some(_)) => return Err(invalid("--tls-cert", "required with --tls-key")),
            (None, None) => {
                let hosts = self.serving_hosts.clone().unwrap_or_else(|| {
                    let d = vec![
                        "meshid.meshid-system.svc".to_owned(),
                        "localhost".to_owned(),
                        "127.0.0.1".to_owned(),
                    ];
                    defaulted("serving-hosts", &d.join(","));
                    d
                });
                if hosts.is_empty() {
                    return Err(invalid("--serving-hosts", "at least one host is required"));
                }
                ServingTls::SelfIssued { hosts }
            }
        };
        Ok(ServerConfig {
            listen,
            http_listen,
            trust_domain,
            cluster_id,
            audiences,
            default_ttl,
            max_ttl,
            authn,
            signer,
            tls,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServerArgs {
        ServerArgs {
            ca_dir: Some("/tmp/ca".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = base().validate().unwrap();
        assert_eq!(c.default_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_ttl, Duration::from_secs(172_800));
        assert_eq!(c.audiences, vec!["istio-ca"]);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.cluster_id, "Kubernetes");
    }

    #[test]
    fn invalid_settings_are_reported_by_name() {
        let cases: Vec<(ServerArgs, &str)> = vec![
            (ServerArgs::default(), "--ca-cert"),
            (
                ServerArgs {
                    ca_cert: Some("c".into()),
                    ..Default::default()
                },
                "--ca-key",
            ),
            (
                ServerArgs {
                    default_ttl: Some("72h".into()),
                    ..base()
                },
                "--default-ttl",
            ),
            (
                ServerArgs {
                    max_ttl: Some("soon".into()),
                    ..base()
                },
                "--max-ttl",
            ),
            (
                ServerArgs {
                    trust_domain: Some("Bad Domain".into()),
                    ..base()
                },
                "--trust-domain",
            ),
            (
                ServerArgs {
                    audiences: Some(vec![" ".into()]),
                    ..base()
                },
                "--audiences",
            ),
            (
                ServerArgs {
                    tls_cert: Some("c".into()),
                    ..base()
                },
                "--tls-key",
            ),
        ];
        for (args, setting) in cases {
            let err = args.validate().unwrap_err().to_string();
            assert!(err.starts_with(setting), "{err}");
        }
    }

    #[test]
    fn flags_take_precedence_over_the_yaml_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "trust-domain: from.file\ncluster-id: file-cluster\nca-dir: /tmp/x\nmax-ttl: 12h\ndefault-ttl: 1h\n").unwrap();
        let args = ServerArgs {
            config: Some(path),
            cluster_id: Some("flag-cluster".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.trust_domain, "from.file");
        assert_eq!(c.cluster_id, "flag-cluster");
        assert_eq!(c.max_ttl, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn unknown_keys_in_the_yaml_file_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "trust-domian: typo\n").unwrap();
        let err = ServerArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
    }
}
