//! Server configuration: flags, environment and an optional YAML file, merged in that order of
//! precedence and validated once at startup into a [`ServerConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::{DEFAULT_MAX_BACKDATE, DEFAULT_MIN_TTL, MIN_TTL_FLOOR, SpiffeId};
use crate::server::{IssuanceLimitSettings, ServerLimits};
use crate::signer::LocalSignerFiles;
use crate::signer::aws_pca::{self, AwsPcaOptions, PcaMode};
use crate::telemetry::LogFormat;

/// Default CreateCertificate listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default probes/metrics listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9402";
/// Default and lowest `--min-ttl` with AWS Private CA in direct mode. PCA backdates every
/// certificate by an hour, so a client renewing at the midpoint of `notBefore..notAfter` renews
/// `(lifetime - 1h) / 2` after issuance: at once below an hour, after 30 minutes at 2 hours.
pub const PCA_DIRECT_MIN_TTL: Duration = Duration::from_secs(2 * 3600);

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
    /// Longest certificate lifetime issued, e.g. 48h; longer requests are cut to it
    /// [default: 48h].
    #[arg(long, env = "MESHID_MAX_TTL")]
    pub max_ttl: Option<String>,
    /// Shortest certificate lifetime issued; shorter requests are raised to it, at least 10s
    /// [default: 10m; 2h with --pca-mode direct].
    #[arg(long, env = "MESHID_MIN_TTL")]
    pub min_ttl: Option<String>,
    /// Clock-skew allowance: the most a certificate's notBefore is backdated; it is never more
    /// than a tenth of the lifetime [default: 60s].
    #[arg(long, env = "MESHID_MAX_BACKDATE")]
    pub max_backdate: Option<String>,
    /// Certificates one identity may obtain at once from this replica (per pod for pod-bound
    /// tokens); 0 turns the issuance rate limit off [default: 20].
    #[arg(long, env = "MESHID_ISSUANCE_BURST")]
    pub issuance_burst: Option<u32>,
    /// One more certificate per identity (and pod) every this long, beyond the burst
    /// [default: 10s].
    #[arg(long, env = "MESHID_ISSUANCE_INTERVAL")]
    pub issuance_interval: Option<String>,
    /// Most identities (and pods) the issuance rate limit tracks at once [default: 100000].
    #[arg(long, env = "MESHID_ISSUANCE_MAX_KEYS")]
    pub issuance_max_keys: Option<usize>,
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
    /// Where certificates are signed: `local` (--ca-cert/--ca-key or --ca-dir) or `aws-pca`
    /// (AWS Private CA, see docs/aws-pca.md) [default: local].
    #[arg(long, env = "MESHID_SIGNER")]
    pub signer: Option<SignerKind>,
    /// AWS Private CA certificate authority ARN (with --signer aws-pca).
    #[arg(long, env = "MESHID_PCA_ARN")]
    pub pca_arn: Option<String>,
    /// AWS region of the CA [default: the region in --pca-arn].
    #[arg(long, env = "MESHID_PCA_REGION")]
    pub pca_region: Option<String>,
    /// AWS Private CA endpoint URL override (VPC endpoint, or moto in tests).
    #[arg(long, env = "MESHID_PCA_ENDPOINT")]
    pub pca_endpoint: Option<String>,
    /// `direct` (PCA issues every SVID) or `intermediate` (PCA issues meshid a short-lived
    /// intermediate that signs SVIDs) [default: intermediate].
    #[arg(long, env = "MESHID_PCA_MODE")]
    pub pca_mode: Option<PcaMode>,
    /// Most AWS Private CA requests per second, all APIs, retries included [default: 10].
    #[arg(long, env = "MESHID_PCA_TPS")]
    pub pca_tps: Option<u32>,
    /// Most signing requests waiting for AWS Private CA in direct mode; beyond it requests
    /// fail with UNAVAILABLE [default: 1000].
    #[arg(long, env = "MESHID_PCA_MAX_PENDING")]
    pub pca_max_pending: Option<usize>,
    /// Lifetime of the PCA-issued intermediate, at least twice --max-ttl [default: 6d].
    #[arg(long, env = "MESHID_PCA_INTERMEDIATE_TTL")]
    pub pca_intermediate_ttl: Option<String>,
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
    /// Extra roots (PEM) added to the trust bundle, re-read when the file changes: the next
    /// root before a rotation, the previous one after it (see docs/root-rotation.md).
    #[arg(long, env = "MESHID_EXTRA_ROOTS")]
    pub extra_roots: Option<PathBuf>,
    /// Keep an `istio-ca-root-cert` ConfigMap in every selected namespace [default: true with
    /// TokenReview authentication].
    #[arg(long, env = "MESHID_ROOT_CONFIGMAP", num_args = 0..=1, default_missing_value = "true")]
    pub root_configmap: Option<bool>,
    /// Label selector choosing the namespaces that get the root ConfigMap [default: all].
    #[arg(long, env = "MESHID_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Namespace of the controllers' leader-election Lease [default: $POD_NAMESPACE or
    /// meshid-system].
    #[arg(long, env = "MESHID_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease [default: meshid-controllers].
    #[arg(long, env = "MESHID_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// This replica's identity in the Lease [default: $POD_NAME or the hostname].
    #[arg(long, env = "MESHID_POD_NAME")]
    pub pod_name: Option<String>,
    /// How often this replica records the roots it signs with in the signing-roots registry
    /// (see docs/root-rotation.md) [default: 10s].
    #[arg(long, env = "MESHID_SIGNING_ROOTS_INTERVAL")]
    pub signing_roots_interval: Option<String>,
    /// How long beyond `--max-ttl` a stopped replica's roots stay in the bundle, for clock skew
    /// and the last requests it served; at least twice `--signing-roots-interval` [default: 5m].
    #[arg(long, env = "MESHID_SIGNING_ROOTS_GRACE")]
    pub signing_roots_grace: Option<String>,
    /// Maintain istiod's serving certificate Secret [default: false].
    #[arg(long, env = "MESHID_ISTIOD_CERT", num_args = 0..=1, default_missing_value = "true")]
    pub istiod_cert: Option<bool>,
    /// istiod's namespace [default: istio-system].
    #[arg(long, env = "MESHID_ISTIOD_NAMESPACE")]
    pub istiod_namespace: Option<String>,
    /// istiod's revision (service `istiod-<rev>`) [default: none].
    #[arg(long, env = "MESHID_ISTIOD_REVISION")]
    pub istiod_revision: Option<String>,
    /// Name of istiod's TLS Secret [default: istiod-tls].
    #[arg(long, env = "MESHID_ISTIOD_SECRET_NAME")]
    pub istiod_secret_name: Option<String>,
    /// Serve the remote clusters registered by Istio remote Secrets (label
    /// `istio/multiCluster: "true"`) in --remote-secrets-namespace, watched (see
    /// docs/multicluster.md) [default: false].
    #[arg(long, env = "MESHID_REMOTE_SECRETS", num_args = 0..=1, default_missing_value = "true")]
    pub remote_secrets: Option<bool>,
    /// Namespace of the remote Secrets [default: $POD_NAMESPACE or meshid-system].
    #[arg(long, env = "MESHID_REMOTE_SECRETS_NAMESPACE")]
    pub remote_secrets_namespace: Option<String>,
    /// Remote clusters from kubeconfig files, `CLUSTER_ID=PATH` comma-separated [default: none].
    #[arg(long, env = "MESHID_REMOTE_KUBECONFIGS", value_delimiter = ',')]
    pub remote_kubeconfigs: Option<Vec<String>>,
    /// Service accounts (namespace/name, comma-separated) that may request certificates for
    /// workloads on their node via `ImpersonatedIdentity` [default: istio-system/ztunnel].
    #[arg(long, env = "MESHID_TRUSTED_NODE_ACCOUNTS", value_delimiter = ',')]
    pub trusted_node_accounts: Option<Vec<String>>,
    /// Most open gRPC connections; one beyond it is closed at once [default: 1024].
    #[arg(long, env = "MESHID_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// A TLS handshake not finished in this time is dropped [default: 10s].
    #[arg(long, env = "MESHID_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// A connection from which nothing is read, or whose writes stay blocked, this long is
    /// closed [default: 60s].
    #[arg(long, env = "MESHID_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Interval of HTTP/2 PINGs to gRPC clients [default: 30s].
    #[arg(long, env = "MESHID_KEEPALIVE_INTERVAL")]
    pub keepalive_interval: Option<String>,
    /// A gRPC connection whose PING is not answered in this time is closed [default: 10s].
    #[arg(long, env = "MESHID_KEEPALIVE_TIMEOUT")]
    pub keepalive_timeout: Option<String>,
    /// Concurrent HTTP/2 streams per gRPC connection (advertised) [default: 100].
    #[arg(long, env = "MESHID_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// A request not answered in this time gets DEADLINE_EXCEEDED [default: 30s].
    #[arg(long, env = "MESHID_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Largest HTTP/2 header list accepted, bytes (advertised) [default: 131072].
    #[arg(long, env = "MESHID_MAX_HEADER_LIST_SIZE")]
    pub max_header_list_size: Option<u32>,
    /// Largest gRPC request message, bytes; larger ones get RESOURCE_EXHAUSTED [default: 65536].
    #[arg(long, env = "MESHID_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// At shutdown, connections still open after this are closed [default: 10s].
    #[arg(long, env = "MESHID_DRAIN_DEADLINE")]
    pub drain_deadline: Option<String>,
    /// Accepted token issuers (`iss`), comma-separated [default: any; the claim must be
    /// present].
    #[arg(long, env = "MESHID_TOKEN_ISSUERS", value_delimiter = ',')]
    pub token_issuers: Option<Vec<String>>,
    /// Longest time a successful TokenReview of a pod-bound token is cached, so a deleted
    /// pod's token stops working soon [default: 3s].
    #[arg(long, env = "MESHID_POD_TOKEN_CACHE_TTL")]
    pub pod_token_cache_ttl: Option<String>,
    /// Most concurrent apiserver calls made to authenticate and authorize callers (TokenReviews
    /// and node-authorization pod reads) [default: 16].
    #[arg(long, env = "MESHID_APISERVER_CONCURRENCY")]
    pub apiserver_concurrency: Option<usize>,
    /// Most such calls waiting for a slot (for at most 5s); beyond it requests fail with
    /// UNAVAILABLE [default: 1000].
    #[arg(long, env = "MESHID_APISERVER_QUEUE")]
    pub apiserver_queue: Option<usize>,
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
        /// Positive cache TTL of pod-bound tokens.
        pod_cache_ttl: Duration,
        /// Accepted issuers; any when empty.
        issuers: Vec<String>,
        /// Bound on concurrent apiserver calls for authentication and authorization.
        limits: crate::authn::ApiLimits,
    },
    /// A static token file (development only).
    StaticTokens(PathBuf),
}

/// The `--signer` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignerKind {
    /// A CA key held by meshid.
    #[default]
    Local,
    /// AWS Private CA.
    AwsPca,
}

/// Where the signing CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerConfig {
    /// Operator-provided files.
    Files(LocalSignerFiles),
    /// A self-generated root kept in a directory.
    GeneratedDir(PathBuf),
    /// AWS Private CA.
    AwsPca(AwsPcaOptions),
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
    /// Shortest lifetime.
    pub min_ttl: Duration,
    /// Clock-skew allowance (the most `notBefore` is backdated).
    pub max_backdate: Duration,
    /// Per-identity issuance rate limit; `None` when turned off.
    pub issuance_limit: Option<IssuanceLimitSettings>,
    /// Authentication.
    pub authn: AuthnConfig,
    /// Signer.
    pub signer: SignerConfig,
    /// Serving TLS.
    pub tls: ServingTls,
    /// Log format.
    pub log_format: LogFormat,
    /// Extra roots file, re-read on change.
    pub extra_roots: Option<PathBuf>,
    /// Kubernetes controllers (only with TokenReview authentication).
    pub controllers: Option<ControllerConfig>,
    /// Trusted node agents (namespace, service account) for impersonation.
    pub trusted_node_accounts: Vec<(String, String)>,
    /// Connection and request limits of the listeners.
    pub limits: ServerLimits,
    /// Remote clusters (only with TokenReview authentication).
    pub remote_clusters: RemoteClusters,
    /// The settings left unset, with the defaults they got (logged by
    /// [`ServerConfig::log_defaults`] once logging is set up).
    pub defaults: Vec<AppliedDefault>,
}

/// Where remote clusters come from (see [`crate::cluster`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteClusters {
    /// Namespace whose remote Secrets are watched; `None` when off.
    pub secrets_namespace: Option<String>,
    /// (cluster ID, kubeconfig file).
    pub kubeconfigs: Vec<(String, PathBuf)>,
}

/// Settings of the leader-elected controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Distribute `istio-ca-root-cert`.
    pub root_configmaps: bool,
    /// Namespace label selector.
    pub namespace_selector: Option<String>,
    /// Leader election.
    pub lease: crate::controller::LeaseSettings,
    /// This replica's entry in the signing-roots registry.
    pub signing_roots: crate::controller::SigningRootsSettings,
    /// istiod certificate, when enabled.
    pub istiod: Option<crate::controller::IstiodCertSettings>,
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

/// Reads the YAML file. serde-saphyr (pure safe Rust) reports the line and column of what is
/// wrong, and refuses a key given twice instead of keeping one of them.
fn load_file(path: &Path) -> Result<ServerArgs, ConfigError> {
    let err = |message: String| ConfigError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_saphyr::from_str::<ServerArgs>(&text).map_err(|e| err(e.to_string()))
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
            min_ttl,
            max_backdate,
            issuance_burst,
            issuance_interval,
            issuance_max_keys,
            kubeconfig,
            token_cache_ttl,
            static_tokens,
            ca_cert,
            ca_key,
            ca_chain,
            root_cert,
            ca_dir,
            signer,
            pca_arn,
            pca_region,
            pca_endpoint,
            pca_mode,
            pca_tps,
            pca_max_pending,
            pca_intermediate_ttl,
            tls_cert,
            tls_key,
            serving_hosts,
            log_format,
            extra_roots,
            root_configmap,
            namespace_selector,
            leader_election_namespace,
            lease_name,
            pod_name,
            signing_roots_interval,
            signing_roots_grace,
            istiod_cert,
            istiod_namespace,
            istiod_revision,
            istiod_secret_name,
            remote_secrets,
            remote_secrets_namespace,
            remote_kubeconfigs,
            trusted_node_accounts,
            max_connections,
            handshake_timeout,
            idle_timeout,
            keepalive_interval,
            keepalive_timeout,
            max_concurrent_streams,
            request_timeout,
            max_header_list_size,
            max_message_size,
            drain_deadline,
            token_issuers,
            pod_token_cache_ttl,
            apiserver_concurrency,
            apiserver_queue,
        );
        merged.validate()
    }

    /// Validates these settings alone (no file) into a [`ServerConfig`], in the environment
    /// detected now ([`Environment::detect`]).
    pub fn validate(&self) -> Result<ServerConfig, ConfigError> {
        self.validate_in(&Environment::detect())
    }

    /// Validates these settings alone (no file) in `env`: a pure function of both. The
    /// defaults it applies are listed in [`ServerConfig::defaults`].
    pub fn validate_in(&self, env: &Environment) -> Result<ServerConfig, ConfigError> {
        Validator {
            args: self,
            env,
            defaults: Vec::new(),
        }
        .config()
    }
}

/// Facts about where meshid runs that some defaults come from, resolved once before validation
/// ([`Environment::detect`]) so that validation itself reads nothing but its inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// `$POD_NAMESPACE`: the default namespace of the leader-election Lease.
    pub pod_namespace: Option<String>,
    /// `$POD_NAME`: the default identity of this replica in the Lease.
    pub pod_name: Option<String>,
    /// `/etc/hostname`, trimmed: the identity when `$POD_NAME` is unset.
    pub hostname: Option<String>,
    /// Names this replica `meshid-<hex>` when nothing above does.
    pub random_id: u32,
}

impl Environment {
    /// Reads `$POD_NAMESPACE`, `$POD_NAME` and `/etc/hostname`, and draws a random id.
    pub fn detect() -> Self {
        Self {
            pod_namespace: std::env::var("POD_NAMESPACE").ok(),
            pod_name: std::env::var("POD_NAME").ok(),
            hostname: std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned()),
            random_id: rand::random(),
        }
    }
}

/// A setting left unset, and the default it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedDefault {
    /// Flag name without dashes, e.g. `max-ttl`.
    pub setting: &'static str,
    /// The value used.
    pub value: String,
}

impl ServerConfig {
    /// Logs, in one line, the defaults validation applied. Validation runs before logging is
    /// set up, so it collects them ([`ServerConfig::defaults`]) for this call.
    pub fn log_defaults(&self) {
        if self.defaults.is_empty() {
            return;
        }
        let defaults = self
            .defaults
            .iter()
            .map(|d| format!("{}={}", d.setting, d.value))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(%defaults, "settings left unset use their defaults");
    }
}

/// Validates one [`ServerArgs`] area by area, collecting the defaults it applies.
struct Validator<'a> {
    args: &'a ServerArgs,
    env: &'a Environment,
    defaults: Vec<AppliedDefault>,
}

impl Validator<'_> {
    /// `value`, or `default` (recorded).
    fn or_default<T: std::fmt::Display>(
        &mut self,
        setting: &'static str,
        value: Option<T>,
        default: impl FnOnce() -> T,
    ) -> T {
        value.unwrap_or_else(|| {
            let v = default();
            self.defaults.push(AppliedDefault {
                setting,
                value: v.to_string(),
            });
            v
        })
    }

    /// `value`, or the enum's default (recorded as spelled on the command line).
    fn enum_or_default<T: clap::ValueEnum + Default>(
        &mut self,
        setting: &'static str,
        value: Option<T>,
    ) -> T {
        value.unwrap_or_else(|| {
            let v = T::default();
            if let Some(name) = v.to_possible_value() {
                self.or_default(setting, None, || name.get_name().to_owned());
            }
            v
        })
    }

    /// A positive duration, or `default` (recorded). `setting` is the flag, `--` included.
    fn duration(
        &mut self,
        setting: &'static str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        if value.is_none() {
            let name = setting.trim_start_matches('-');
            self.or_default(name, None, || humantime::format_duration(default));
        }
        parse_duration(setting, value, default)
    }

    /// A count that must be at least 1, or `default` (recorded).
    fn positive(
        &mut self,
        setting: &'static str,
        value: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            Some(0) => Err(invalid(setting, "must be at least 1")),
            v => Ok(self.or_default(setting.trim_start_matches('-'), v, || default)),
        }
    }

    fn config(mut self) -> Result<ServerConfig, ConfigError> {
        let a = self.args;
        let listen = self.or_default("listen", a.listen, || {
            DEFAULT_LISTEN.parse().expect("valid default")
        });
        let http_listen = self.or_default("http-listen", a.http_listen, || {
            DEFAULT_HTTP_LISTEN.parse().expect("valid default")
        });
        let (trust_domain, cluster_id, audiences) = self.identity()?;
        let lifetimes = self.lifetimes()?;
        let issuance_limit = self.issuance_limit()?;
        let authn = self.authn()?;
        let signer = self.signer(lifetimes.max)?;
        let tls = self.serving_tls()?;
        let controllers = self.controllers(&authn, &trust_domain, lifetimes)?;
        let trusted = match &a.trusted_node_accounts {
            Some(accounts) => accounts.clone(),
            None => vec![self.or_default("trusted-node-accounts", None, || {
                "istio-system/ztunnel".to_owned()
            })],
        };
        let trusted_node_accounts = crate::authz::parse_trusted_accounts(&trusted)
            .map_err(|m| invalid("--trusted-node-accounts", m))?;
        let limits = self.limits()?;
        let remote_clusters = self.remote_clusters(&authn, &cluster_id)?;
        let log_format = self.enum_or_default("log-format", a.log_format);
        Ok(ServerConfig {
            listen,
            http_listen,
            trust_domain,
            cluster_id,
            audiences,
            default_ttl: lifetimes.default,
            max_ttl: lifetimes.max,
            min_ttl: lifetimes.min,
            max_backdate: lifetimes.max_backdate,
            issuance_limit,
            authn,
            signer,
            tls,
            log_format,
            extra_roots: a.extra_roots.clone(),
            controllers,
            trusted_node_accounts,
            limits,
            remote_clusters,
            defaults: self.defaults,
        })
    }

    /// Remote clusters need TokenReview authentication; file entries are `ID=PATH` with a
    /// non-empty ID other than the local one, each ID once.
    fn remote_clusters(
        &mut self,
        authn: &AuthnConfig,
        local_id: &str,
    ) -> Result<RemoteClusters, ConfigError> {
        let (a, env) = (self.args, self.env);
        let secrets = a.remote_secrets.unwrap_or(false);
        let files = a.remote_kubeconfigs.clone().unwrap_or_default();
        if matches!(authn, AuthnConfig::StaticTokens(_)) && (secrets || !files.is_empty()) {
            return Err(invalid(
                "--static-tokens",
                "remote clusters (--remote-secrets, --remote-kubeconfigs) need TokenReview",
            ));
        }
        let mut kubeconfigs: Vec<(String, PathBuf)> = Vec::new();
        for entry in files {
            let (id, path) = entry
                .split_once('=')
                .map(|(id, path)| (id.trim(), path.trim()))
                .filter(|(id, path)| !id.is_empty() && !path.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "--remote-kubeconfigs",
                        format!("{entry:?} is not CLUSTER_ID=PATH"),
                    )
                })?;
            if id == local_id {
                return Err(invalid(
                    "--remote-kubeconfigs",
                    format!("{id:?} is the local --cluster-id"),
                ));
            }
            if kubeconfigs.iter().any(|(other, _)| other == id) {
                return Err(invalid(
                    "--remote-kubeconfigs",
                    format!("cluster {id:?} named twice"),
                ));
            }
            kubeconfigs.push((id.to_owned(), PathBuf::from(path)));
        }
        let secrets_namespace = if secrets {
            Some(self.or_default(
                "remote-secrets-namespace",
                a.remote_secrets_namespace.clone(),
                || {
                    env.pod_namespace
                        .clone()
                        .unwrap_or_else(|| "meshid-system".into())
                },
            ))
        } else {
            None
        };
        Ok(RemoteClusters {
            secrets_namespace,
            kubeconfigs,
        })
    }

    /// `--trust-domain`, `--cluster-id` and `--audiences`.
    fn identity(&mut self) -> Result<(String, String, Vec<String>), ConfigError> {
        let a = self.args;
        let trust_domain = self.or_default("trust-domain", a.trust_domain.clone(), || {
            "cluster.local".into()
        });
        SpiffeId::for_service_account(&trust_domain, "a", "b").map_err(|_| {
            invalid(
                "--trust-domain",
                format!("{trust_domain:?} is not a valid SPIFFE trust domain"),
            )
        })?;
        let cluster_id =
            self.or_default("cluster-id", a.cluster_id.clone(), || "Kubernetes".into());
        let audiences = match &a.audiences {
            Some(list) => list.clone(),
            None => vec![self.or_default("audiences", None, || "istio-ca".to_owned())],
        };
        let audiences: Vec<String> = audiences
            .into_iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if audiences.is_empty() {
            return Err(invalid("--audiences", "at least one audience is required"));
        }
        Ok((trust_domain, cluster_id, audiences))
    }

    /// `--default-ttl`, `--max-ttl`, `--min-ttl` and `--max-backdate`.
    fn lifetimes(&mut self) -> Result<crate::server::Durations, ConfigError> {
        let a = self.args;
        let default = self.duration(
            "--default-ttl",
            a.default_ttl.as_deref(),
            Duration::from_secs(24 * 3600),
        )?;
        let max = self.duration(
            "--max-ttl",
            a.max_ttl.as_deref(),
            Duration::from_secs(48 * 3600),
        )?;
        if default > max {
            return Err(invalid("--default-ttl", "must not exceed --max-ttl"));
        }
        let min = self.min_ttl()?;
        if min > default {
            return Err(invalid(
                "--min-ttl",
                format!(
                    "{} must not exceed --default-ttl ({})",
                    humantime::format_duration(min),
                    humantime::format_duration(default)
                ),
            ));
        }
        let max_backdate = self.duration(
            "--max-backdate",
            a.max_backdate.as_deref(),
            DEFAULT_MAX_BACKDATE,
        )?;
        Ok(crate::server::Durations {
            default,
            min,
            max,
            max_backdate,
        })
    }

    /// `--min-ttl`: at least [`MIN_TTL_FLOOR`], and at least [`PCA_DIRECT_MIN_TTL`] (also its
    /// default) with AWS Private CA in direct mode.
    fn min_ttl(&mut self) -> Result<Duration, ConfigError> {
        let a = self.args;
        let direct = a.signer == Some(SignerKind::AwsPca) && a.pca_mode == Some(PcaMode::Direct);
        let (default, floor) = if direct {
            (PCA_DIRECT_MIN_TTL, PCA_DIRECT_MIN_TTL)
        } else {
            (DEFAULT_MIN_TTL, MIN_TTL_FLOOR)
        };
        let min_ttl = self.duration("--min-ttl", a.min_ttl.as_deref(), default)?;
        if min_ttl < floor {
            let why = if direct {
                " with --pca-mode direct (AWS Private CA backdates every certificate by an hour)"
            } else {
                ""
            };
            return Err(invalid(
                "--min-ttl",
                format!(
                    "must be at least {}{why}",
                    humantime::format_duration(floor)
                ),
            ));
        }
        Ok(min_ttl)
    }

    /// The per-identity issuance rate limit, `None` with `--issuance-burst 0`.
    fn issuance_limit(&mut self) -> Result<Option<IssuanceLimitSettings>, ConfigError> {
        let a = self.args;
        let defaults = IssuanceLimitSettings::default();
        let burst = self.or_default("issuance-burst", a.issuance_burst, || defaults.burst.get());
        let Some(burst) = std::num::NonZeroU32::new(burst) else {
            return Ok(None);
        };
        let interval = self.duration(
            "--issuance-interval",
            a.issuance_interval.as_deref(),
            defaults.interval,
        )?;
        let max_keys = self.positive(
            "--issuance-max-keys",
            a.issuance_max_keys,
            defaults.max_keys,
        )?;
        Ok(Some(IssuanceLimitSettings {
            burst,
            interval,
            max_keys,
        }))
    }

    /// TokenReview (with its cache and apiserver limits) or static tokens.
    fn authn(&mut self) -> Result<AuthnConfig, ConfigError> {
        let a = self.args;
        let cache_ttl = self.duration(
            "--token-cache-ttl",
            a.token_cache_ttl.as_deref(),
            Duration::from_secs(60),
        )?;
        match (&a.static_tokens, &a.kubeconfig) {
            (Some(_), Some(_)) => Err(invalid(
                "--static-tokens",
                "cannot be combined with --kubeconfig",
            )),
            (Some(file), None) => Ok(AuthnConfig::StaticTokens(file.clone())),
            (None, kubeconfig) => Ok(AuthnConfig::TokenReview {
                kubeconfig: kubeconfig.clone(),
                cache_ttl,
                pod_cache_ttl: self.duration(
                    "--pod-token-cache-ttl",
                    a.pod_token_cache_ttl.as_deref(),
                    Duration::from_secs(3),
                )?,
                issuers: a
                    .token_issuers
                    .iter()
                    .flatten()
                    .map(|i| i.trim().to_owned())
                    .filter(|i| !i.is_empty())
                    .collect(),
                limits: self.api_limits()?,
            }),
        }
    }

    /// The bound on apiserver calls made for callers.
    fn api_limits(&mut self) -> Result<crate::authn::ApiLimits, ConfigError> {
        let a = self.args;
        let defaults = crate::authn::ApiLimits::default();
        let concurrency = self.positive(
            "--apiserver-concurrency",
            a.apiserver_concurrency,
            defaults.concurrency,
        )?;
        let queue = self.or_default("apiserver-queue", a.apiserver_queue, || defaults.queue);
        Ok(crate::authn::ApiLimits {
            concurrency,
            queue,
            ..defaults
        })
    }

    /// AWS Private CA, operator CA files, or a self-generated root in a directory.
    fn signer(&mut self, max_ttl: Duration) -> Result<SignerConfig, ConfigError> {
        let a = self.args;
        if let Some(pca) = self.aws_pca_options(max_ttl)? {
            return Ok(SignerConfig::AwsPca(pca));
        }
        match (&a.ca_cert, &a.ca_key, &a.ca_dir) {
            (Some(_), Some(_), Some(_)) => Err(invalid(
                "--ca-dir",
                "cannot be combined with --ca-cert/--ca-key",
            )),
            (Some(cert), Some(key), None) => Ok(SignerConfig::Files(LocalSignerFiles {
                ca_cert: cert.clone(),
                ca_key: key.clone(),
                ca_chain: a.ca_chain.clone(),
                root_cert: a.root_cert.clone(),
            })),
            (Some(_), None, _) => Err(invalid("--ca-key", "required with --ca-cert")),
            (None, Some(_), _) => Err(invalid("--ca-cert", "required with --ca-key")),
            (None, None, Some(dir)) => Ok(SignerConfig::GeneratedDir(dir.clone())),
            (None, None, None) => Err(invalid(
                "--ca-cert",
                "a signer is required: --ca-cert and --ca-key, --ca-dir, or --signer aws-pca",
            )),
        }
    }

    /// The AWS Private CA settings: `None` for the local signer (refusing stray `--pca-*`
    /// settings), validated options for `--signer aws-pca` (refusing local CA settings).
    fn aws_pca_options(&mut self, max_ttl: Duration) -> Result<Option<AwsPcaOptions>, ConfigError> {
        let a = self.args;
        if a.signer.unwrap_or_default() == SignerKind::Local {
            return refuse_set(
                &[
                    ("--pca-arn", a.pca_arn.is_some()),
                    ("--pca-region", a.pca_region.is_some()),
                    ("--pca-endpoint", a.pca_endpoint.is_some()),
                    ("--pca-mode", a.pca_mode.is_some()),
                    ("--pca-tps", a.pca_tps.is_some()),
                    ("--pca-max-pending", a.pca_max_pending.is_some()),
                    ("--pca-intermediate-ttl", a.pca_intermediate_ttl.is_some()),
                ],
                "requires --signer aws-pca",
            )
            .map(|()| None);
        }
        refuse_set(
            &[
                ("--ca-cert", a.ca_cert.is_some()),
                ("--ca-key", a.ca_key.is_some()),
                ("--ca-chain", a.ca_chain.is_some()),
                ("--root-cert", a.root_cert.is_some()),
                ("--ca-dir", a.ca_dir.is_some()),
            ],
            "cannot be combined with --signer aws-pca",
        )?;
        let (ca_arn, region) = pca_arn_and_region(a)?;
        let endpoint = match a.pca_endpoint.as_deref().map(str::trim) {
            Some(e) if !(e.starts_with("https://") || e.starts_with("http://")) => {
                return Err(invalid(
                    "--pca-endpoint",
                    format!("{e:?} is not an http(s) URL"),
                ));
            }
            e => e.map(str::to_owned),
        };
        let tps = a.pca_tps.map(|t| t as usize);
        let requests_per_second = self.positive("--pca-tps", tps, aws_pca::DEFAULT_TPS as usize)?;
        let max_pending = self.positive(
            "--pca-max-pending",
            a.pca_max_pending,
            aws_pca::DEFAULT_MAX_PENDING,
        )?;
        let intermediate_ttl = self.duration(
            "--pca-intermediate-ttl",
            a.pca_intermediate_ttl.as_deref(),
            aws_pca::DEFAULT_INTERMEDIATE_TTL,
        )?;
        let mode = self.enum_or_default("pca-mode", a.pca_mode);
        if mode == PcaMode::Intermediate {
            check_intermediate_ttl(intermediate_ttl, max_ttl)?;
        }
        Ok(Some(AwsPcaOptions {
            ca_arn,
            region,
            endpoint,
            mode,
            requests_per_second: u32::try_from(requests_per_second).unwrap_or(u32::MAX),
            max_pending,
            intermediate_ttl,
        }))
    }

    /// Operator files, or a self-issued certificate for `--serving-hosts`.
    fn serving_tls(&mut self) -> Result<ServingTls, ConfigError> {
        let a = self.args;
        match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => Ok(ServingTls::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (Some(_), None) => Err(invalid("--tls-key", "required with --tls-cert")),
            (None, Some(_)) => Err(invalid("--tls-cert", "required with --tls-key")),
            (None, None) => {
                let hosts = match &a.serving_hosts {
                    Some(hosts) => hosts.clone(),
                    None => {
                        let d = "meshid.meshid-system.svc,localhost,127.0.0.1";
                        let d = self.or_default("serving-hosts", None, || d.to_owned());
                        d.split(',').map(str::to_owned).collect()
                    }
                };
                if hosts.is_empty() {
                    return Err(invalid("--serving-hosts", "at least one host is required"));
                }
                Ok(ServingTls::SelfIssued { hosts })
            }
        }
    }

    /// Controllers run only when meshid talks to Kubernetes (TokenReview authentication).
    fn controllers(
        &mut self,
        authn: &AuthnConfig,
        trust_domain: &str,
        lifetimes: crate::server::Durations,
    ) -> Result<Option<ControllerConfig>, ConfigError> {
        let a = self.args;
        let istiod_enabled = a.istiod_cert.unwrap_or(false);
        if matches!(authn, AuthnConfig::StaticTokens(_)) {
            if a.root_configmap == Some(true) || istiod_enabled {
                return Err(invalid(
                    "--static-tokens",
                    "controllers (--root-configmap, --istiod-cert) need a Kubernetes cluster",
                ));
            }
            return Ok(None);
        }
        let root_configmaps = self.or_default("root-configmap", a.root_configmap, || true);
        if !root_configmaps && !istiod_enabled {
            return Ok(None);
        }
        let lease = self.lease()?;
        let istiod = istiod_enabled.then(|| self.istiod(trust_domain, lifetimes.default));
        let signing_roots = self.signing_roots(&lease, lifetimes.max)?;
        Ok(Some(ControllerConfig {
            signing_roots,
            root_configmaps,
            namespace_selector: a
                .namespace_selector
                .clone()
                .filter(|s| !s.trim().is_empty()),
            lease,
            istiod,
        }))
    }

    /// The leader-election Lease: namespace, name and this replica's identity.
    fn lease(&mut self) -> Result<crate::controller::LeaseSettings, ConfigError> {
        let (a, env) = (self.args, self.env);
        let namespace = self.or_default(
            "leader-election-namespace",
            a.leader_election_namespace.clone(),
            || {
                env.pod_namespace
                    .clone()
                    .unwrap_or_else(|| "meshid-system".into())
            },
        );
        let identity = a
            .pod_name
            .clone()
            .or_else(|| env.pod_name.clone())
            .or_else(|| env.hostname.clone())
            .filter(|h| !h.is_empty());
        let identity = self.or_default("pod-name", identity, || {
            format!("meshid-{:08x}", env.random_id)
        });
        let name = self.or_default("lease-name", a.lease_name.clone(), || {
            "meshid-controllers".into()
        });
        Ok(crate::controller::LeaseSettings::new(
            namespace, name, identity,
        ))
    }

    /// istiod's serving certificate Secret.
    fn istiod(
        &mut self,
        trust_domain: &str,
        ttl: Duration,
    ) -> crate::controller::IstiodCertSettings {
        let a = self.args;
        crate::controller::IstiodCertSettings {
            namespace: self.or_default("istiod-namespace", a.istiod_namespace.clone(), || {
                "istio-system".into()
            }),
            revision: a.istiod_revision.clone().filter(|r| !r.is_empty()),
            secret_name: self.or_default(
                "istiod-secret-name",
                a.istiod_secret_name.clone(),
                || "istiod-tls".into(),
            ),
            trust_domain: trust_domain.to_owned(),
            ttl,
        }
    }

    /// This replica's entry in the signing-roots registry, kept `--max-ttl` plus the grace.
    fn signing_roots(
        &mut self,
        lease: &crate::controller::LeaseSettings,
        max_ttl: Duration,
    ) -> Result<crate::controller::SigningRootsSettings, ConfigError> {
        let a = self.args;
        let interval = self.duration(
            "--signing-roots-interval",
            a.signing_roots_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        let grace = self.duration(
            "--signing-roots-grace",
            a.signing_roots_grace.as_deref(),
            Duration::from_secs(300),
        )?;
        if grace < interval * 2 {
            return Err(invalid(
                "--signing-roots-grace",
                "must be at least twice --signing-roots-interval",
            ));
        }
        Ok(crate::controller::SigningRootsSettings::new(
            lease.namespace.clone(),
            &lease.name,
            &lease.identity,
            interval,
            max_ttl + grace,
        ))
    }

    /// The listener limits: defaults for what is unset; counts and sizes must be positive.
    fn limits(&mut self) -> Result<ServerLimits, ConfigError> {
        let a = self.args;
        let d = ServerLimits::default();
        let streams = a.max_concurrent_streams.map(|v| v as usize);
        let max_concurrent_streams = self.positive(
            "--max-concurrent-streams",
            streams,
            d.max_concurrent_streams as usize,
        )?;
        let header_list = a.max_header_list_size.map(|v| v as usize);
        let max_header_list_size = self.positive(
            "--max-header-list-size",
            header_list,
            d.max_header_list_size as usize,
        )?;
        Ok(ServerLimits {
            max_connections: self.positive(
                "--max-connections",
                a.max_connections,
                d.max_connections,
            )?,
            handshake_timeout: self.duration(
                "--handshake-timeout",
                a.handshake_timeout.as_deref(),
                d.handshake_timeout,
            )?,
            idle_timeout: self.duration(
                "--idle-timeout",
                a.idle_timeout.as_deref(),
                d.idle_timeout,
            )?,
            keepalive_interval: self.duration(
                "--keepalive-interval",
                a.keepalive_interval.as_deref(),
                d.keepalive_interval,
            )?,
            keepalive_timeout: self.duration(
                "--keepalive-timeout",
                a.keepalive_timeout.as_deref(),
                d.keepalive_timeout,
            )?,
            max_concurrent_streams: u32::try_from(max_concurrent_streams).unwrap_or(u32::MAX),
            request_timeout: self.duration(
                "--request-timeout",
                a.request_timeout.as_deref(),
                d.request_timeout,
            )?,
            max_header_list_size: u32::try_from(max_header_list_size).unwrap_or(u32::MAX),
            max_message_size: self.positive(
                "--max-message-size",
                a.max_message_size,
                d.max_message_size,
            )?,
            drain_deadline: self.duration(
                "--drain-deadline",
                a.drain_deadline.as_deref(),
                d.drain_deadline,
            )?,
        })
    }
}

/// The first of `flags` that is set is an error: `message`.
fn refuse_set(flags: &[(&'static str, bool)], message: &str) -> Result<(), ConfigError> {
    match flags.iter().find(|(_, set)| *set) {
        Some((flag, _)) => Err(invalid(flag, message)),
        None => Ok(()),
    }
}

/// `--pca-arn` (required) and `--pca-region` (must match the ARN's).
fn pca_arn_and_region(a: &ServerArgs) -> Result<(String, String), ConfigError> {
    let ca_arn = a
        .pca_arn
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("--pca-arn", "required with --signer aws-pca"))?;
    let arn = aws_pca::parse_ca_arn(ca_arn).map_err(|m| invalid("--pca-arn", m))?;
    match a.pca_region.as_deref().map(str::trim) {
        Some(r) if r != arn.region => Err(invalid(
            "--pca-region",
            format!(
                "{r:?} differs from the region of --pca-arn ({})",
                arn.region
            ),
        )),
        _ => Ok((ca_arn.to_owned(), arn.region)),
    }
}

/// In intermediate mode, the intermediate must outlive two leaves (and PCA's 1h backdate).
fn check_intermediate_ttl(
    intermediate_ttl: Duration,
    max_ttl: Duration,
) -> Result<(), ConfigError> {
    let min_intermediate_ttl = aws_pca::intermediate::min_intermediate_ttl(max_ttl);
    if intermediate_ttl >= min_intermediate_ttl {
        return Ok(());
    }
    let every = aws_pca::intermediate::renewal_interval(intermediate_ttl, max_ttl);
    Err(invalid(
        "--pca-intermediate-ttl",
        format!(
            "{} with --max-ttl {} would mint an intermediate every {} (PCA backdates \
             notBefore by 1h); it must be at least {}, so that every leaf gets its full \
             lifetime and at most one intermediate is minted per hour",
            humantime::format_duration(intermediate_ttl),
            humantime::format_duration(max_ttl),
            humantime::format_duration(every),
            humantime::format_duration(min_intermediate_ttl),
        ),
    ))
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
        assert_eq!(c.min_ttl, Duration::from_secs(600));
        assert_eq!(c.max_backdate, Duration::from_secs(60));
        assert_eq!(
            c.issuance_limit,
            Some(IssuanceLimitSettings {
                burst: std::num::NonZeroU32::new(20).unwrap(),
                interval: Duration::from_secs(10),
                max_keys: 100_000,
            })
        );
        assert_eq!(c.audiences, vec!["istio-ca"]);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(
            c.authn,
            AuthnConfig::TokenReview {
                kubeconfig: None,
                cache_ttl: Duration::from_secs(60),
                pod_cache_ttl: Duration::from_secs(3),
                issuers: vec![],
                limits: crate::authn::ApiLimits {
                    concurrency: 16,
                    queue: 1000,
                    queue_timeout: Duration::from_secs(5),
                },
            }
        );
    }

    #[test]
    fn remote_clusters_are_off_by_default_and_named_by_id_and_path() {
        let c = base().validate().unwrap();
        assert_eq!(c.remote_clusters, RemoteClusters::default());
        let c = ServerArgs {
            remote_secrets: Some(true),
            remote_kubeconfigs: Some(vec!["b=/etc/b.yaml".into(), " c = /etc/c.yaml".into()]),
            ..base()
        }
        .validate_in(&env())
        .unwrap();
        assert_eq!(
            c.remote_clusters.secrets_namespace.as_deref(),
            Some("pod-ns")
        );
        assert_eq!(
            c.remote_clusters.kubeconfigs,
            vec![
                ("b".to_owned(), PathBuf::from("/etc/b.yaml")),
                ("c".to_owned(), PathBuf::from("/etc/c.yaml"))
            ]
        );
        for bad in ["b", "=/x", "b=", "Kubernetes=/x"] {
            let err = ServerArgs {
                remote_kubeconfigs: Some(vec![bad.into()]),
                ..base()
            }
            .validate()
            .unwrap_err();
            assert!(
                err.to_string().contains("--remote-kubeconfigs"),
                "{bad}: {err}"
            );
        }
        let twice = ServerArgs {
            remote_kubeconfigs: Some(vec!["b=/x".into(), "b=/y".into()]),
            ..base()
        };
        assert!(twice.validate().is_err());
        let static_tokens = ServerArgs {
            static_tokens: Some("/tmp/tokens".into()),
            root_configmap: Some(false),
            remote_secrets: Some(true),
            ..base()
        };
        assert!(
            static_tokens
                .validate()
                .unwrap_err()
                .to_string()
                .contains("need TokenReview")
        );
    }

    fn env() -> Environment {
        Environment {
            pod_namespace: Some("pod-ns".into()),
            pod_name: None,
            hostname: Some("host-7".into()),
            random_id: 0xabcd,
        }
    }

    /// A `MakeWriter` into a shared buffer, to read what a subscriber logged.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn logged_during(&self, f: impl FnOnce()) -> String {
            let writer = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, f);
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn the_lease_defaults_come_from_the_environment_passed_in() {
        let c = base().validate_in(&env()).unwrap().controllers.unwrap();
        assert_eq!(c.lease.namespace, "pod-ns");
        assert_eq!(c.lease.identity, "host-7");
        let pod = Environment {
            pod_name: Some("meshid-0".into()),
            ..env()
        };
        let c = base().validate_in(&pod).unwrap().controllers.unwrap();
        assert_eq!(
            c.lease.identity, "meshid-0",
            "$POD_NAME before the hostname"
        );
        let bare = Environment {
            random_id: 0x1234,
            ..Environment::default()
        };
        let c = base().validate_in(&bare).unwrap().controllers.unwrap();
        assert_eq!(c.lease.namespace, "meshid-system");
        assert_eq!(c.lease.identity, "meshid-00001234");
        let flags = ServerArgs {
            leader_election_namespace: Some("flag-ns".into()),
            pod_name: Some("flag-pod".into()),
            ..base()
        };
        let c = flags.validate_in(&pod).unwrap().controllers.unwrap();
        assert_eq!(
            (c.lease.namespace.as_str(), c.lease.identity.as_str()),
            ("flag-ns", "flag-pod")
        );
    }

    #[test]
    fn validation_logs_nothing_and_lists_the_defaults_it_applied() {
        let captured = Captured::default();
        let mut config = None;
        let logged = captured.logged_during(|| config = Some(base().validate_in(&env())));
        assert_eq!(logged, "", "validation runs before logging is set up");
        let config = config.unwrap().unwrap();
        let default = |setting: &str| {
            config
                .defaults
                .iter()
                .find(|d| d.setting == setting)
                .map(|d| d.value.clone())
        };
        assert_eq!(default("listen").as_deref(), Some("0.0.0.0:8443"));
        assert_eq!(default("max-ttl").as_deref(), Some("2days"));
        assert_eq!(
            default("serving-hosts").as_deref(),
            Some("meshid.meshid-system.svc,localhost,127.0.0.1")
        );
        assert_eq!(
            default("leader-election-namespace").as_deref(),
            Some("pod-ns")
        );
        assert_eq!(default("log-format").as_deref(), Some("text"));
        assert_eq!(default("ca-dir"), None, "a setting given is no default");
        let pca = ServerArgs {
            max_ttl: Some("30h".into()),
            ..pca()
        };
        let config = pca.validate_in(&env()).unwrap();
        assert!(
            config
                .defaults
                .iter()
                .any(|d| d.setting == "pca-mode" && d.value == "intermediate")
        );
        assert!(!config.defaults.iter().any(|d| d.setting == "max-ttl"));
    }

    #[test]
    fn the_defaults_are_logged_once_logging_is_set_up() {
        let config = base().validate_in(&env()).unwrap();
        let captured = Captured::default();
        let logged = captured.logged_during(|| config.log_defaults());
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(
            logged.contains("settings left unset use their defaults"),
            "{logged}"
        );
        assert!(logged.contains("listen=0.0.0.0:8443"), "{logged}");
        assert!(
            logged.contains("serving-hosts=meshid.meshid-system.svc,localhost,127.0.0.1"),
            "{logged}"
        );
    }

    #[test]
    fn stopped_replicas_roots_are_retained_for_max_ttl_plus_grace() {
        let c = base().validate().unwrap().controllers.unwrap();
        assert_eq!(c.signing_roots.interval, Duration::from_secs(10));
        assert_eq!(
            c.signing_roots.retain,
            Duration::from_secs(172_800 + 300),
            "--max-ttl + --signing-roots-grace"
        );
        assert_eq!(c.signing_roots.name, "meshid-controllers-signing-roots");
        let short_grace = ServerArgs {
            signing_roots_interval: Some("10s".into()),
            signing_roots_grace: Some("15s".into()),
            ..base()
        };
        let e = short_grace.validate().unwrap_err().to_string();
        assert!(e.contains("--signing-roots-grace"), "{e}");
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
            (
                ServerArgs {
                    min_ttl: Some("5s".into()),
                    ..base()
                },
                "--min-ttl",
            ),
            (
                ServerArgs {
                    min_ttl: Some("2h".into()),
                    default_ttl: Some("1h".into()),
                    ..base()
                },
                "--min-ttl",
            ),
            (
                ServerArgs {
                    max_backdate: Some("0s".into()),
                    ..base()
                },
                "--max-backdate",
            ),
            (
                ServerArgs {
                    issuance_interval: Some("never".into()),
                    ..base()
                },
                "--issuance-interval",
            ),
            (
                ServerArgs {
                    issuance_max_keys: Some(0),
                    ..base()
                },
                "--issuance-max-keys",
            ),
            (
                ServerArgs {
                    apiserver_concurrency: Some(0),
                    ..base()
                },
                "--apiserver-concurrency",
            ),
            (
                ServerArgs {
                    pod_token_cache_ttl: Some("0s".into()),
                    ..base()
                },
                "--pod-token-cache-ttl",
            ),
        ];
        for (args, setting) in cases {
            let err = args.validate().unwrap_err().to_string();
            assert!(err.starts_with(setting), "{err}");
        }
    }

    /// `args` resolved with a config file holding `yaml`.
    fn resolve_with_yaml(yaml: &str, args: ServerArgs) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        ServerArgs {
            config: Some(path),
            ..args
        }
        .resolve()
    }

    #[test]
    fn flags_take_precedence_over_the_yaml_file() {
        let yaml = "trust-domain: from.file\ncluster-id: file-cluster\nca-dir: /tmp/x\nmax-ttl: 12h\ndefault-ttl: 1h\n";
        let args = ServerArgs {
            cluster_id: Some("flag-cluster".into()),
            ..Default::default()
        };
        let c = resolve_with_yaml(yaml, args).unwrap();
        assert_eq!(c.trust_domain, "from.file");
        assert_eq!(c.cluster_id, "flag-cluster");
        assert_eq!(c.max_ttl, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn listener_limits_default_safely_and_are_read_from_the_yaml_file() {
        assert_eq!(base().validate().unwrap().limits, ServerLimits::default());
        let l = resolve_with_yaml(
            "ca-dir: /tmp/x\nmax-connections: 7\nidle-timeout: 3s\nmax-concurrent-streams: 9\n\
             max-message-size: 1000\nmax-header-list-size: 2000\ndrain-deadline: 4s\n\
             request-timeout: 5s\nhandshake-timeout: 6s\nkeepalive-interval: 7s\n\
             keepalive-timeout: 8s\n",
            ServerArgs::default(),
        )
        .unwrap()
        .limits;
        let s = Duration::from_secs;
        assert_eq!(
            l,
            ServerLimits {
                max_connections: 7,
                handshake_timeout: s(6),
                idle_timeout: s(3),
                keepalive_interval: s(7),
                keepalive_timeout: s(8),
                max_concurrent_streams: 9,
                request_timeout: s(5),
                max_header_list_size: 2000,
                max_message_size: 1000,
                drain_deadline: s(4),
            }
        );
        for (args, setting) in [
            (
                ServerArgs {
                    max_connections: Some(0),
                    ..base()
                },
                "--max-connections",
            ),
            (
                ServerArgs {
                    drain_deadline: Some("0s".into()),
                    ..base()
                },
                "--drain-deadline",
            ),
        ] {
            let err = args.validate().unwrap_err();
            assert!(err.to_string().starts_with(setting), "{err}");
        }
    }

    #[test]
    fn lifetime_and_rate_settings_are_read_from_flags_and_the_yaml_file() {
        let yaml = "ca-dir: /tmp/x\nmin-ttl: 20m\nmax-backdate: 30s\nissuance-burst: 5\nissuance-interval: 1m\nissuance-max-keys: 10\n";
        let c = resolve_with_yaml(
            yaml,
            ServerArgs {
                min_ttl: Some("15m".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.min_ttl, Duration::from_secs(900));
        assert_eq!(c.max_backdate, Duration::from_secs(30));
        let limit = c.issuance_limit.unwrap();
        assert_eq!(limit.burst.get(), 5);
        assert_eq!(limit.interval, Duration::from_secs(60));
        assert_eq!(limit.max_keys, 10);
        let off = resolve_with_yaml(
            yaml,
            ServerArgs {
                issuance_burst: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(off.issuance_limit, None);
    }

    #[test]
    fn pca_direct_mode_raises_the_minimum_lifetime_to_two_hours_and_refuses_less() {
        let direct = ServerArgs {
            pca_mode: Some(PcaMode::Direct),
            ..pca()
        };
        assert_eq!(
            direct.validate().unwrap().min_ttl,
            Duration::from_secs(7200)
        );
        let err = ServerArgs {
            min_ttl: Some("1h".into()),
            ..direct
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--min-ttl") && err.contains("direct"),
            "{err}"
        );
        // Intermediate mode signs locally: the general default applies.
        assert_eq!(pca().validate().unwrap().min_ttl, Duration::from_secs(600));
    }

    #[test]
    fn a_yaml_number_or_boolean_for_a_text_setting_is_read_as_its_text() {
        let c = resolve_with_yaml(
            "cluster-id: 1234\ntrust-domain: true\nca-dir: /tmp/x\n",
            ServerArgs::default(),
        )
        .unwrap();
        assert_eq!(
            (c.cluster_id.as_str(), c.trust_domain.as_str()),
            ("1234", "true")
        );
    }

    #[test]
    fn a_key_given_twice_or_a_value_of_the_wrong_type_is_refused_with_its_line() {
        for (text, line) in [
            ("ca-dir: /tmp/x\nmax-ttl: 1h\nmax-ttl: 2h\n", "line 3"),
            ("ca-dir: /tmp/x\nissuance-burst: lots\n", "line 2"),
            ("ca-dir: /tmp/x\naudiences: {a: b}\n", "line 2"),
        ] {
            let err = resolve_with_yaml(text, ServerArgs::default()).unwrap_err();
            assert!(matches!(err, ConfigError::File { .. }), "{err}");
            assert!(err.to_string().contains(line), "{text:?}: {err}");
        }
    }

    #[test]
    fn an_empty_yaml_file_sets_nothing() {
        let args = ServerArgs {
            ca_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        let c = resolve_with_yaml("# nothing set here\n", args).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
    }

    #[test]
    fn unknown_keys_in_the_yaml_file_are_an_error() {
        let err = resolve_with_yaml("trust-domian: typo\n", ServerArgs::default()).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
    }

    const ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/abcd";

    fn pca() -> ServerArgs {
        ServerArgs {
            signer: Some(SignerKind::AwsPca),
            pca_arn: Some(ARN.into()),
            ..Default::default()
        }
    }

    #[test]
    fn aws_pca_settings_default_to_intermediate_mode_in_the_arn_region() {
        let c = pca().validate().unwrap();
        let SignerConfig::AwsPca(o) = c.signer else {
            panic!("{:?}", c.signer)
        };
        assert_eq!(o.region, "eu-west-1");
        assert_eq!(o.mode, PcaMode::Intermediate);
        assert_eq!(o.requests_per_second, aws_pca::DEFAULT_TPS);
        assert_eq!(o.intermediate_ttl, aws_pca::DEFAULT_INTERMEDIATE_TTL);
        assert_eq!(o.endpoint, None);
    }

    #[test]
    fn invalid_aws_pca_settings_are_reported_by_name() {
        let cases: Vec<(ServerArgs, &str)> = vec![
            (
                ServerArgs {
                    pca_arn: None,
                    ..pca()
                },
                "--pca-arn",
            ),
            (
                ServerArgs {
                    pca_arn: Some("arn:aws:s3:::bucket".into()),
                    ..pca()
                },
                "--pca-arn",
            ),
            (
                ServerArgs {
                    pca_region: Some("us-east-1".into()),
                    ..pca()
                },
                "--pca-region",
            ),
            (
                ServerArgs {
                    pca_endpoint: Some("127.0.0.1:5000".into()),
                    ..pca()
                },
                "--pca-endpoint",
            ),
            (
                ServerArgs {
                    pca_tps: Some(0),
                    ..pca()
                },
                "--pca-tps",
            ),
            (
                ServerArgs {
                    pca_intermediate_ttl: Some("72h".into()),
                    max_ttl: Some("48h".into()),
                    ..pca()
                },
                "--pca-intermediate-ttl",
            ),
            (
                ServerArgs {
                    ca_dir: Some("/tmp/ca".into()),
                    ..pca()
                },
                "--ca-dir",
            ),
            (
                ServerArgs {
                    pca_mode: Some(PcaMode::Direct),
                    ..base()
                },
                "--pca-mode",
            ),
        ];
        for (args, setting) in cases {
            let err = args.validate().unwrap_err().to_string();
            assert!(err.starts_with(setting), "{setting}: {err}");
        }
    }

    #[test]
    fn intermediate_ttls_that_would_mint_more_than_one_intermediate_an_hour_are_refused() {
        // PCA backdates notBefore by 1h: a 1h intermediate is at half-life when it arrives.
        let err = ServerArgs {
            max_ttl: Some("30m".into()),
            default_ttl: Some("30m".into()),
            pca_intermediate_ttl: Some("1h".into()),
            ..pca()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--pca-intermediate-ttl"), "{err}");
        assert!(err.contains("--max-ttl 30m"), "{err}");
        assert!(err.contains("every 0s"), "{err}");
        assert!(err.contains("at least 2h 30m"), "{err}");
        // docs/aws-pca.md prints this message as is.
        assert!(
            include_str!("../docs/aws-pca.md").contains(&format!("\n{err}\n")),
            "{err}"
        );
        let ok = ServerArgs {
            max_ttl: Some("30m".into()),
            default_ttl: Some("30m".into()),
            pca_intermediate_ttl: Some("2h30m".into()),
            ..pca()
        };
        ok.validate().unwrap();
        // Direct mode mints no intermediates (its lifetimes are at least 2h: --min-ttl).
        ServerArgs {
            max_ttl: Some("2h".into()),
            default_ttl: Some("2h".into()),
            pca_intermediate_ttl: Some("1h".into()),
            pca_mode: Some(PcaMode::Direct),
            ..pca()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn aws_pca_settings_are_read_from_the_yaml_file() {
        let yaml = format!("signer: aws-pca\npca-arn: {ARN}\npca-mode: direct\npca-tps: 3\n");
        let c = resolve_with_yaml(&yaml, ServerArgs::default()).unwrap();
        let SignerConfig::AwsPca(o) = c.signer else {
            panic!("{:?}", c.signer)
        };
        assert_eq!(o.mode, PcaMode::Direct);
        assert_eq!(o.requests_per_second, 3);
    }
}
