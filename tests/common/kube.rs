//! Access to the real kube-apiserver started by `tests/kube-harness/run.sh up`.
//!
//! Tests get a [`Harness`] from [`Harness::from_env`], which reads the
//! environment printed by `run.sh up`:
//!
//! | variable                      | meaning                                                   |
//! |-------------------------------|-----------------------------------------------------------|
//! | `MESHID_TEST_KUBECONFIG`      | admin kubeconfig (client certificate in `system:masters`) |
//! | `MESHID_TEST_SA_SIGNING_KEY`  | the apiserver's service account signing key (PKCS#8 PEM)  |
//!
//! When `MESHID_TEST_KUBECONFIG` is unset the tests skip, except under CI
//! (`CI=true`), where a missing harness is a failure.
//!
//! The apiserver runs without kubelet, scheduler or controller-manager: pods
//! are API objects with `spec.nodeName` set and never run, nothing creates the
//! `default` ServiceAccount in new namespaces, and deleted namespaces stay
//! `Terminating`. Every test therefore works in its own namespace from
//! [`Harness::create_namespace`] and never cleans it up; `run.sh down` throws
//! the whole etcd away.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// Label put on every namespace the tests create.
pub const TEST_LABEL: &str = "meshid.dev/test";

/// Field manager for server-side apply of shared RBAC objects.
const FIELD_MANAGER: &str = "meshid-tests";

/// A connection to the harness apiserver.
pub struct Harness {
    config: Config,
    kubeconfig: PathBuf,
    sa_signing_key: PathBuf,
}

/// What to put in a TokenRequest (`POST .../serviceaccounts/<sa>/token`).
#[derive(Clone, Debug, Default)]
pub struct TokenOptions {
    /// Audiences of the token; empty means the apiserver's own
    /// (`https://kubernetes.default.svc.cluster.local` in the harness).
    pub audiences: Vec<String>,
    /// Lifetime in seconds; `None` means the apiserver default (1 hour).
    /// The apiserver rejects values below 600.
    pub expiration_seconds: Option<i64>,
    /// Bind the token to this pod: it stops authenticating once the pod is
    /// gone, and TokenReview reports the pod in the user's extras.
    pub bound_pod: Option<BoundPod>,
}

impl TokenOptions {
    /// A token for `audiences`, valid for the apiserver's default lifetime.
    pub fn for_audiences<S: Into<String>>(audiences: impl IntoIterator<Item = S>) -> Self {
        TokenOptions {
            audiences: audiences.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    pub fn expiring_in(mut self, seconds: i64) -> Self {
        self.expiration_seconds = Some(seconds);
        self
    }

    pub fn bound_to(mut self, pod: &Pod) -> Self {
        self.bound_pod = Some(BoundPod::of(pod));
        self
    }
}

/// The name and UID of a pod a token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

impl BoundPod {
    /// Takes name and UID from a pod read back from the apiserver.
    ///
    /// Panics if either is missing, which only happens for a pod that was
    /// never stored.
    pub fn of(pod: &Pod) -> Self {
        BoundPod {
            name: pod.metadata.name.clone().expect("pod has a name"),
            uid: pod
                .metadata
                .uid
                .clone()
                .expect("pod was stored and has a uid"),
        }
    }
}

/// The shared harness in a test: `let h = harness!();` returns from the test (counted as
/// skipped) when [`Harness::from_env`] finds none. Not every test binary uses it.
#[allow(unused_macros)]
macro_rules! harness {
    () => {
        match $crate::common::kube::Harness::from_env().await {
            Some(h) => h,
            None => return,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use harness;

impl Harness {
    /// Connects to the harness named by `MESHID_TEST_KUBECONFIG`.
    ///
    /// Returns `None` (and prints why) when the variable is unset, so a test
    /// can `return` and count as skipped. Panics instead when `CI` is `true`
    /// or `1`, or when the variable is set but the kubeconfig is unusable.
    pub async fn from_env() -> Option<Harness> {
        let Some(kubeconfig) = std::env::var_os("MESHID_TEST_KUBECONFIG") else {
            let how = "start the harness with `eval \"$(tests/kube-harness/run.sh up)\"` \
                       (stop it with `tests/kube-harness/run.sh down`)";
            if matches!(std::env::var("CI").as_deref(), Ok("true" | "1")) {
                panic!("MESHID_TEST_KUBECONFIG is not set and CI=true: {how}");
            }
            eprintln!("skipping: MESHID_TEST_KUBECONFIG is not set; {how}");
            return None;
        };
        let kubeconfig = PathBuf::from(kubeconfig);
        let sa_signing_key = std::env::var_os("MESHID_TEST_SA_SIGNING_KEY")
            .map(PathBuf::from)
            .unwrap_or_else(|| sibling(&kubeconfig, "pki/sa.key"));
        Some(Harness::from_paths(kubeconfig, sa_signing_key).await)
    }

    /// Connects to the harness whose admin kubeconfig and service account signing key are
    /// these files. Panics when the kubeconfig is unusable.
    pub async fn from_paths(kubeconfig: PathBuf, sa_signing_key: PathBuf) -> Harness {
        // kube's rustls needs the process-wide crypto provider meshid installs.
        meshid::app::install_crypto_provider();
        let config = load_config(&kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e:#}", kubeconfig.display()));
        Harness {
            config,
            kubeconfig,
            sa_signing_key,
        }
    }

    /// The admin client configuration (client certificate, `system:masters`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Path of the admin kubeconfig, e.g. to hand to a process under test.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client with cluster-admin rights.
    pub fn admin_client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("admin client from harness kubeconfig")
    }

    /// A client configuration that authenticates with `token` only (no client
    /// certificate), trusting the harness CA.
    pub fn config_for_token(&self, token: &str) -> Config {
        let mut config = self.config.clone();
        // AuthInfo holds a secrecy::SecretString; building it through serde
        // avoids naming that crate here.
        config.auth_info =
            serde_json::from_value::<AuthInfo>(serde_json::json!({ "token": token }))
                .expect("AuthInfo from a token");
        config
    }

    /// A client that authenticates with `token`, e.g. a ServiceAccount token.
    pub fn client_for_token(&self, token: &str) -> Client {
        Client::try_from(self.config_for_token(token)).expect("client from a bearer token")
    }

    /// Creates a namespace named `<prefix>-<random>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_LABEL.to_owned(), "true".to_owned())])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.admin_client())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(name)
    }

    /// Creates ServiceAccount `ns/name` and returns it as stored (with UID).
    pub async fn create_service_account(
        &self,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<ServiceAccount> {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.admin_client(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .with_context(|| format!("creating serviceaccount {ns}/{name}"))
    }

    /// Creates pod `ns/name` running as `service_account`, already bound to
    /// `node` (no scheduler runs), and returns it as stored (with UID).
    ///
    /// The pod never runs; its image is a placeholder and no token is
    /// auto-mounted. The ServiceAccount must exist (admission checks it).
    pub async fn create_pod(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> anyhow::Result<Pod> {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                service_account_name: Some(service_account.to_owned()),
                automount_service_account_token: Some(false),
                containers: vec![Container {
                    name: "app".to_owned(),
                    image: Some("registry.invalid/meshid-test:none".to_owned()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Pod>::namespaced(self.admin_client(), ns)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {ns}/{name}"))
    }

    /// Deletes pod `ns/name` at once (grace period 0: with no kubelet a
    /// graceful delete would never finish) and waits until it is gone.
    pub async fn delete_pod(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        let pods = Api::<Pod>::namespaced(self.admin_client(), ns);
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await
            .with_context(|| format!("deleting pod {ns}/{name}"))?;
        eventually(Duration::from_secs(10), || async {
            match pods.get_opt(name).await? {
                None => Ok(()),
                Some(_) => bail!("pod {ns}/{name} still exists"),
            }
        })
        .await
    }

    /// Mints a token for ServiceAccount `ns/service_account` through the
    /// TokenRequest API and returns the JWT.
    pub async fn request_token(
        &self,
        ns: &str,
        service_account: &str,
        options: &TokenOptions,
    ) -> anyhow::Result<String> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: options.audiences.clone(),
                expiration_seconds: options.expiration_seconds,
                bound_object_ref: options.bound_pod.as_ref().map(|pod| BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let response: TokenRequest = Api::<ServiceAccount>::namespaced(self.admin_client(), ns)
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {ns}/{service_account}"))?;
        let status = response
            .status
            .context("TokenRequest response has no status")?;
        Ok(status.token)
    }

    /// Creates a namespace named after `prefix` with ServiceAccount
    /// `service_account` in it, and mints a token for that account. Returns
    /// (namespace, token).
    pub async fn service_account_token(
        &self,
        prefix: &str,
        service_account: &str,
        options: &TokenOptions,
    ) -> anyhow::Result<(String, String)> {
        let ns = self.create_namespace(prefix).await?;
        self.create_service_account(&ns, service_account).await?;
        let token = self.request_token(&ns, service_account, options).await?;
        Ok((ns, token))
    }

    /// Reviews `token` through the TokenReview API as `client` and returns the
    /// status. `audiences` empty means the apiserver's own audience.
    ///
    /// Errors when the call itself fails, e.g. 403 for a caller without
    /// `create tokenreviews`; an unauthenticated token is an `Ok` status.
    pub async fn review_token(
        &self,
        client: &Client,
        token: &str,
        audiences: &[&str],
    ) -> Result<TokenReviewStatus, kube::Error> {
        review_token(client, token, audiences).await
    }

    /// Grants ServiceAccount `ns/service_account` the cluster-wide `rules`
    /// through ClusterRole `role` and a ClusterRoleBinding named
    /// `<role>:<ns>:<service_account>`. Idempotent (server-side apply).
    ///
    /// RBAC changes reach the authorizer through a watch; callers should retry
    /// the first request that depends on them (see [`eventually`]).
    pub async fn grant_cluster_role(
        &self,
        role: &str,
        rules: Vec<PolicyRule>,
        ns: &str,
        service_account: &str,
    ) -> anyhow::Result<()> {
        let client = self.admin_client();
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let cluster_role = ClusterRole {
            metadata: ObjectMeta {
                name: Some(role.to_owned()),
                ..Default::default()
            },
            rules: Some(rules),
            ..Default::default()
        };
        Api::<ClusterRole>::all(client.clone())
            .patch(role, &apply, &Patch::Apply(&cluster_role))
            .await
            .with_context(|| format!("applying clusterrole {role}"))?;

        let binding_name = format!("{role}:{ns}:{service_account}");
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(binding_name.clone()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "ClusterRole".to_owned(),
                name: role.to_owned(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: service_account.to_owned(),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            }]),
        };
        Api::<ClusterRoleBinding>::all(client)
            .patch(&binding_name, &apply, &Patch::Apply(&binding))
            .await
            .with_context(|| format!("applying clusterrolebinding {binding_name}"))?;
        Ok(())
    }

    /// Lets ServiceAccount `ns/service_account` call the TokenReview API
    /// (`create tokenreviews.authentication.k8s.io`), as the CA server needs.
    pub async fn grant_token_review(&self, ns: &str, service_account: &str) -> anyhow::Result<()> {
        self.grant_cluster_role(
            "meshid-test:tokenreview",
            vec![rule("authentication.k8s.io", "tokenreviews", &["create"])],
            ns,
            service_account,
        )
        .await
    }

    /// Re-signs a token minted by this apiserver after `edit` changed its
    /// claims, keeping the JOSE header (algorithm and key id).
    ///
    /// TokenRequest refuses lifetimes under 10 minutes, so this is how tests
    /// get a token that differs from a genuine one only in, say, `exp`. Works
    /// because the harness signs with an ECDSA P-256 key (ES256) it wrote to
    /// `MESHID_TEST_SA_SIGNING_KEY`.
    pub fn resign_token(
        &self,
        token: &str,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> anyhow::Result<String> {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject as _;

        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("not a compact JWS");
        };
        let header_json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
        if header_json["alg"] != "ES256" {
            bail!(
                "token is signed with {}, only ES256 is supported",
                header_json["alg"]
            );
        }
        let mut claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
        edit(&mut claims);

        let signing_input = format!(
            "{header}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let key_der = PrivatePkcs8KeyDer::from_pem_file(&self.sa_signing_key)
            .with_context(|| format!("reading {}", self.sa_signing_key.display()))?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key_der.secret_pkcs8_der())
                .map_err(|e| anyhow::anyhow!("service account signing key: {e}"))?;
        let signature = key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// Reviews `token` through the TokenReview API as `client`.
pub async fn review_token(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> Result<TokenReviewStatus, kube::Error> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: (!audiences.is_empty())
                .then(|| audiences.iter().map(|a| (*a).to_owned()).collect()),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(reviewed.status.unwrap_or_default())
}

/// A PolicyRule for `verbs` on `resource` in `api_group` ("" is the core group).
pub fn rule(api_group: &str, resource: &str, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![api_group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..Default::default()
    }
}

/// The HTTP status of a failed API call, if the apiserver answered one.
pub fn api_status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Seconds since the Unix epoch, for JWT claims.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Retries `attempt` every 200 ms until it succeeds or `timeout` passes, then
/// returns its last error. For effects that reach the apiserver's caches
/// asynchronously (RBAC bindings, the 10 s token authentication cache).
pub async fn eventually<T, F, Fut>(timeout: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A harness instance a test starts and stops itself, beside the one `tests/run.sh` started:
/// `tests/kube-harness/run.sh up` with its own state directory (in a temporary directory) and
/// variable prefix. Stopped by [`Instance::stop`] or on drop.
pub struct Instance {
    dir: tempfile::TempDir,
    harness: Harness,
    url: String,
    running: bool,
}

impl Instance {
    /// The prefix of the variables `run.sh up` prints for it.
    const PREFIX: &'static str = "MESHID_TEST_INSTANCE_";

    /// Starts a new instance (4–8 s) and connects to it.
    pub async fn start() -> anyhow::Result<Instance> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("state");
        let out = Self::run_sh(&state, "up").await?;
        let var = |name: &str| -> anyhow::Result<String> {
            let key = format!("export {}{name}=", Self::PREFIX);
            out.lines()
                .find_map(|l| l.strip_prefix(&key))
                .map(str::to_owned)
                .with_context(|| format!("run.sh up printed no {key}: {out}"))
        };
        let harness =
            Harness::from_paths(var("KUBECONFIG")?.into(), var("SA_SIGNING_KEY")?.into()).await;
        Ok(Instance {
            url: var("KUBE_URL")?,
            dir,
            harness,
            running: true,
        })
    }

    /// The connection to it.
    pub fn harness(&self) -> &Harness {
        &self.harness
    }

    /// Its apiserver URL (`https://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops its apiserver and etcd (`run.sh down`) and waits until they are gone.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.running = false;
            Self::run_sh(&self.dir.path().join("state"), "down").await?;
        }
        Ok(())
    }

    async fn run_sh(state: &Path, command: &'static str) -> anyhow::Result<String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube-harness/run.sh");
        let state = state.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&script)
                .arg(command)
                .env("MESHID_HARNESS_DIR", &state)
                .env("MESHID_HARNESS_ENV_PREFIX", Self::PREFIX)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))
        })
        .await??;
        if !out.status.success() {
            bail!("run.sh {command} failed: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.running {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube-harness/run.sh");
            let _ = std::process::Command::new(script)
                .arg("down")
                .env("MESHID_HARNESS_DIR", self.dir.path().join("state"))
                .status();
        }
    }
}

async fn load_config(path: &Path) -> anyhow::Result<Config> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
}

fn sibling(path: &Path, relative: &str) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).join(relative)
}
