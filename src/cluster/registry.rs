//! The registry of clusters: the local one, and the remote ones from Secrets and files, merged
//! into one [`ClusterSet`] published through a `watch` whenever it changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::crypto::Sha256;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::kubeconfig::{self, KubeconfigError};

/// How often every remote cluster is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One cluster meshid serves, with the client meshid reaches its apiserver with.
pub struct Cluster {
    id: String,
    client: kube::Client,
    generation: u64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster ID (what callers send in the `clusterid` header).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A client for its apiserver.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Distinguishes two registrations of the same ID (a changed kubeconfig is a new
    /// generation), so nothing learned through the old client is used with the new one.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// The `clusterid` a caller sent names no registered cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cluster")]
pub struct UnknownCluster;

/// The clusters served at one moment: the local one and the registered remotes.
#[derive(Debug, Clone)]
pub struct ClusterSet {
    local: Arc<Cluster>,
    remotes: BTreeMap<String, Arc<Cluster>>,
}

impl ClusterSet {
    /// The local cluster.
    pub fn local(&self) -> &Arc<Cluster> {
        &self.local
    }

    /// The cluster a caller's `clusterid` header names: the local cluster when it is absent or
    /// empty. Errors: [`UnknownCluster`].
    pub fn resolve(&self, cluster_id: Option<&str>) -> Result<&Arc<Cluster>, UnknownCluster> {
        match cluster_id {
            None | Some("") => Ok(&self.local),
            Some(id) if id == self.local.id => Ok(&self.local),
            Some(id) => self.remotes.get(id).ok_or(UnknownCluster),
        }
    }

    /// Every cluster, the local one first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        std::iter::once(&self.local).chain(self.remotes.values())
    }

    fn same_as(&self, other: &ClusterSet) -> bool {
        let key = |s: &ClusterSet| -> Vec<(String, u64)> {
            s.iter().map(|c| (c.id.clone(), c.generation)).collect()
        };
        key(self) == key(other)
    }
}

/// What meshid last found out about a remote cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteState {
    /// Registered, not probed yet.
    Pending,
    /// Its apiserver answered and meshid may create TokenReviews there.
    Ready,
    /// Its kubeconfig cannot be used; it is not registered.
    Invalid(String),
    /// Registered, but its apiserver did not answer or refused meshid.
    Unreachable(String),
}

impl RemoteState {
    fn describe(&self) -> String {
        match self {
            Self::Pending => "not probed yet".into(),
            Self::Ready => "ready".into(),
            Self::Invalid(why) => format!("invalid kubeconfig: {why}"),
            Self::Unreachable(why) => format!("unreachable: {why}"),
        }
    }
}

/// Label of the per-cluster metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The cluster ID.
    pub cluster: String,
}

/// Where a remote cluster's kubeconfig came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// A file named on the command line; files take precedence over Secrets.
    File(PathBuf),
    /// A data key of the Secret of this name.
    Secret(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Secret(name) => write!(f, "secret {name}"),
        }
    }
}

/// One kubeconfig for one cluster ID, from one source.
struct Entry {
    fingerprint: [u8; 32],
    cluster: Result<Arc<Cluster>, KubeconfigError>,
}

#[derive(Default)]
struct State {
    /// (source, cluster ID) → entry.
    entries: BTreeMap<(Source, String), Entry>,
    /// cluster ID → state, for every remote ID some source names.
    status: BTreeMap<String, RemoteState>,
}

/// The registry. Sources ([`super::watch_remote_secrets`], [`ClusterRegistry::add_file`]) feed
/// it; consumers read [`ClusterRegistry::current`] or [`ClusterRegistry::subscribe`].
pub struct ClusterRegistry {
    local: Arc<Cluster>,
    tx: watch::Sender<Arc<ClusterSet>>,
    state: Mutex<State>,
    ready: Family<ClusterLabels, Gauge>,
    generations: AtomicU64,
}

impl std::fmt::Debug for ClusterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRegistry")
            .field("local", &self.local.id)
            .finish_non_exhaustive()
    }
}

impl ClusterRegistry {
    /// A registry with the local cluster `id` reached through `client`, and no remote yet.
    /// `ready` is the `remote_cluster_ready{cluster}` gauge family (1 ready, 0 otherwise).
    pub fn new(id: String, client: kube::Client, ready: Family<ClusterLabels, Gauge>) -> Self {
        let local = Arc::new(Cluster {
            id,
            client,
            generation: 0,
        });
        let (tx, _) = watch::channel(Arc::new(ClusterSet {
            local: local.clone(),
            remotes: BTreeMap::new(),
        }));
        Self {
            local,
            tx,
            state: Mutex::new(State::default()),
            ready,
            generations: AtomicU64::new(1),
        }
    }

    /// The local cluster's ID.
    pub fn local_id(&self) -> &str {
        &self.local.id
    }

    /// The clusters served now.
    pub fn current(&self) -> Arc<ClusterSet> {
        self.tx.borrow().clone()
    }

    /// Sees every change of the served clusters.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterSet>> {
        self.tx.subscribe()
    }

    /// Registers the remote cluster `id` from the kubeconfig file `path`. A file that cannot be
    /// used is reported (log, metric, readiness detail), never fatal.
    pub async fn add_file(&self, id: &str, path: PathBuf) {
        let fingerprint = Sha256::digest(path.as_os_str().as_encoded_bytes());
        let built = kubeconfig::client_from_file(&path).await;
        self.update(vec![(
            (Source::File(path), id.to_owned()),
            Some((fingerprint, built)),
        )]);
    }

    /// Sets what the Secret `name` registers: its data keys are cluster IDs, their values
    /// kubeconfigs (Istio's remote-secret format). Keys it no longer has are dropped.
    pub async fn apply_secret(&self, name: &str, data: BTreeMap<String, Vec<u8>>) {
        let source = Source::Secret(name.to_owned());
        let mut changes = Vec::new();
        let known: Vec<String> = {
            let state = self.lock();
            state
                .entries
                .keys()
                .filter(|(s, _)| *s == source)
                .map(|(_, id)| id.clone())
                .collect()
        };
        for id in known {
            if !data.contains_key(&id) {
                changes.push(((source.clone(), id), None));
            }
        }
        for (id, yaml) in data {
            if id == self.local.id {
                tracing::warn!(cluster = %id, secret = name, "remote secret names the local cluster; ignored");
                continue;
            }
            let fingerprint: [u8; 32] = Sha256::digest(&yaml);
            let unchanged = self
                .lock()
                .entries
                .get(&(source.clone(), id.clone()))
                .is_some_and(|e| e.fingerprint == fingerprint);
            if unchanged {
                continue;
            }
            let built = kubeconfig::client_from_secret(&yaml).await;
            changes.push(((source.clone(), id), Some((fingerprint, built))));
        }
        self.update(changes);
    }

    /// Drops what the Secret `name` registered.
    pub fn remove_secret(&self, name: &str) {
        let source = Source::Secret(name.to_owned());
        let gone: Vec<_> = self
            .lock()
            .entries
            .keys()
            .filter(|(s, _)| *s == source)
            .map(|k| (k.clone(), None))
            .collect();
        self.update(gone);
    }

    /// Replaces every Secret-sourced registration with `secrets` (name → data), as after a
    /// fresh list.
    pub async fn replace_secrets(&self, secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>) {
        let stale: Vec<String> = self
            .lock()
            .entries
            .keys()
            .filter_map(|(s, _)| match s {
                Source::Secret(name) if !secrets.contains_key(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        for name in stale {
            self.remove_secret(&name);
        }
        for (name, data) in secrets {
            self.apply_secret(&name, data).await;
        }
    }

    /// The `/readyz` detail: one line per cluster.
    pub fn describe(&self) -> String {
        let state = self.lock();
        let mut out = format!("cluster {}: local", self.local.id);
        for (id, s) in &state.status {
            out.push_str(&format!("\ncluster {id}: {}", s.describe()));
        }
        out
    }

    /// What meshid last found out about the remote cluster `id`, if any source names it.
    pub fn state(&self, id: &str) -> Option<RemoteState> {
        self.lock().status.get(id).cloned()
    }

    /// Probes every registered remote (a SelfSubjectAccessReview for creating TokenReviews:
    /// it proves the apiserver answers, accepts the credentials and lets meshid review).
    pub async fn probe_all(&self) {
        let set = self.current();
        let probes = set.remotes.values().map(|c| async move {
            let result = tokio::time::timeout(PROBE_TIMEOUT, may_review(c.client()))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            (c.clone(), result)
        });
        for (cluster, result) in futures::future::join_all(probes).await {
            let new = match result {
                Ok(()) => RemoteState::Ready,
                Err(why) => RemoteState::Unreachable(why),
            };
            let mut state = self.lock();
            // Skip results for a registration replaced or removed during the probe.
            let current = self.tx.borrow().remotes.get(&cluster.id).cloned();
            if current.is_none_or(|c| c.generation != cluster.generation) {
                continue;
            }
            if let Some(old) = state.status.get_mut(&cluster.id)
                && *old != new
            {
                match &new {
                    RemoteState::Ready => {
                        tracing::info!(cluster = %cluster.id, "remote cluster ready")
                    }
                    other => tracing::warn!(
                        cluster = %cluster.id,
                        state = %other.describe(),
                        "remote cluster not ready; its callers are refused until it is"
                    ),
                }
                self.ready
                    .get_or_create(&ClusterLabels {
                        cluster: cluster.id.clone(),
                    })
                    .set(i64::from(new == RemoteState::Ready));
                *old = new;
            }
        }
    }

    /// Probes every [`PROBE_INTERVAL`], and at once when the clusters change, until `shutdown`.
    pub async fn run_probes(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.subscribe();
        loop {
            self.probe_all().await;
            tokio::select! {
                _ = shutdown.wait_for(|v| *v) => return,
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `changes` ((source, id) → new entry, or `None` to drop it), recomputes the set
    /// and publishes it if it changed.
    #[allow(clippy::type_complexity)]
    fn update(
        &self,
        changes: Vec<(
            (Source, String),
            Option<([u8; 32], Result<kube::Client, KubeconfigError>)>,
        )>,
    ) {
        if changes.is_empty() {
            return;
        }
        let mut state = self.lock();
        for ((source, id), change) in changes {
            match change {
                None => {
                    state.entries.remove(&(source.clone(), id.clone()));
                    tracing::info!(cluster = %id, %source, "remote cluster kubeconfig removed");
                }
                Some((fingerprint, built)) => {
                    let cluster = built.map(|client| {
                        Arc::new(Cluster {
                            id: id.clone(),
                            client,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                        })
                    });
                    match &cluster {
                        Ok(_) => {
                            tracing::info!(cluster = %id, %source, "remote cluster kubeconfig loaded")
                        }
                        Err(e) => {
                            tracing::warn!(cluster = %id, %source, error = %e, "remote cluster kubeconfig unusable; the cluster is not served")
                        }
                    }
                    state.entries.insert(
                        (source, id),
                        Entry {
                            fingerprint,
                            cluster,
                        },
                    );
                }
            }
        }
        // Files come before Secrets, Secrets by name: the first usable entry for an ID wins.
        let mut remotes: BTreeMap<String, Arc<Cluster>> = BTreeMap::new();
        let mut invalid: BTreeMap<String, String> = BTreeMap::new();
        for ((source, id), entry) in &state.entries {
            match &entry.cluster {
                Ok(c) => {
                    if let Some(winner) = remotes.get(id) {
                        if winner.generation != c.generation {
                            tracing::warn!(cluster = %id, %source, "cluster registered twice; this source is ignored");
                        }
                    } else {
                        remotes.insert(id.clone(), c.clone());
                    }
                }
                Err(e) => {
                    invalid
                        .entry(id.clone())
                        .or_insert_with(|| format!("{source}: {e}"));
                }
            }
        }
        let old = self.tx.borrow().clone();
        let mut status = BTreeMap::new();
        for (id, c) in &remotes {
            let kept = old
                .remotes
                .get(id)
                .filter(|o| o.generation == c.generation)
                .and_then(|_| state.status.get(id).cloned());
            status.insert(id.clone(), kept.unwrap_or(RemoteState::Pending));
        }
        for (id, why) in invalid {
            status.entry(id).or_insert(RemoteState::Invalid(why));
        }
        for id in state.status.keys() {
            if !status.contains_key(id) {
                self.ready.remove(&ClusterLabels {
                    cluster: id.clone(),
                });
            }
        }
        for (id, s) in &status {
            self.ready
                .get_or_create(&ClusterLabels {
                    cluster: id.clone(),
                })
                .set(i64::from(*s == RemoteState::Ready));
        }
        state.status = status;
        let new = ClusterSet {
            local: self.local.clone(),
            remotes,
        };
        drop(state);
        if !new.same_as(&old) {
            tracing::info!(
                clusters = ?new.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                "served clusters changed"
            );
            self.tx.send_replace(Arc::new(new));
        }
    }
}

/// Whether the client may create TokenReviews in its cluster; `Err` says why not.
async fn may_review(client: &kube::Client) -> Result<(), String> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some("authentication.k8s.io".into()),
                resource: Some("tokenreviews".into()),
                verb: Some("create".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) => format!("apiserver answered {}: {}", s.code, s.reason),
            other => other.to_string(),
        })?;
    if answer.status.is_some_and(|s| s.allowed) {
        Ok(())
    } else {
        Err("meshid may not create tokenreviews there".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> kube::Client {
        crate::crypto::install_provider();
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn kubeconfig(server: &str) -> Vec<u8> {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
             users:\n- name: u\n  user:\n    token: t\n"
        )
        .into_bytes()
    }

    fn registry() -> (ClusterRegistry, Family<ClusterLabels, Gauge>) {
        let gauge = Family::default();
        (
            ClusterRegistry::new("local".into(), client(), gauge.clone()),
            gauge,
        )
    }

    fn data(pairs: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_missing_or_empty_header_is_the_local_cluster_and_an_unknown_id_is_refused() {
        let (r, _) = registry();
        let set = r.current();
        assert_eq!(set.resolve(None).unwrap().id(), "local");
        assert_eq!(set.resolve(Some("")).unwrap().id(), "local");
        assert_eq!(set.resolve(Some("local")).unwrap().id(), "local");
        assert_eq!(set.resolve(Some("b")).err(), Some(UnknownCluster));
    }

    #[tokio::test]
    async fn secrets_add_change_and_remove_remote_clusters() {
        let (r, gauge) = registry();
        let mut changes = r.subscribe();
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:2"))]))
            .await;
        assert!(changes.has_changed().unwrap());
        let first = r.current().resolve(Some("b")).unwrap().clone();
        assert_eq!(r.state("b"), Some(RemoteState::Pending));
        assert_eq!(
            gauge
                .get_or_create(&ClusterLabels {
                    cluster: "b".into()
                })
                .get(),
            0
        );
        changes.mark_unchanged();

        // The same data again changes nothing.
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:2"))]))
            .await;
        assert!(!changes.has_changed().unwrap());

        // A new kubeconfig is a new generation.
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:3"))]))
            .await;
        let second = r.current().resolve(Some("b")).unwrap().clone();
        assert_ne!(first.generation(), second.generation());

        r.remove_secret("s1");
        assert_eq!(r.current().resolve(Some("b")).err(), Some(UnknownCluster));
        assert_eq!(r.state("b"), None);
        assert!(!r.describe().contains("cluster b"));
    }

    #[tokio::test]
    async fn an_invalid_kubeconfig_is_reported_and_leaves_the_other_clusters_served() {
        let (r, _) = registry();
        r.apply_secret(
            "s1",
            data(&[
                ("b", kubeconfig("https://127.0.0.1:2")),
                ("c", kubeconfig("http://127.0.0.1:2")),
                ("d", b"{".to_vec()),
            ]),
        )
        .await;
        let set = r.current();
        assert!(set.resolve(Some("b")).is_ok());
        assert!(set.resolve(Some("c")).is_err());
        assert!(matches!(r.state("c"), Some(RemoteState::Invalid(_))));
        assert!(matches!(r.state("d"), Some(RemoteState::Invalid(_))));
        let detail = r.describe();
        assert!(
            detail
                .contains("cluster c: invalid kubeconfig: secret s1: the server URL is not https"),
            "{detail}"
        );
        // A key dropped from the secret drops its cluster.
        r.apply_secret("s1", data(&[("c", kubeconfig("https://127.0.0.1:4"))]))
            .await;
        let set = r.current();
        assert!(set.resolve(Some("b")).is_err());
        assert!(set.resolve(Some("c")).is_ok());
        assert_eq!(r.state("d"), None);
    }

    #[tokio::test]
    async fn a_secret_naming_the_local_cluster_does_not_replace_it() {
        let (r, _) = registry();
        r.apply_secret("s1", data(&[("local", kubeconfig("https://127.0.0.1:2"))]))
            .await;
        let set = r.current();
        assert_eq!(set.resolve(Some("local")).unwrap().generation(), 0);
        assert_eq!(set.iter().count(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_remote_is_probed_as_such_and_the_gauge_says_so() {
        let (r, gauge) = registry();
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:1"))]))
            .await;
        r.probe_all().await;
        assert!(
            matches!(r.state("b"), Some(RemoteState::Unreachable(_))),
            "{:?}",
            r.state("b")
        );
        assert_eq!(
            gauge
                .get_or_create(&ClusterLabels {
                    cluster: "b".into()
                })
                .get(),
            0
        );
        assert!(r.describe().contains("cluster b: unreachable"));
    }

    #[tokio::test]
    async fn a_kubeconfig_file_registers_a_cluster_and_an_unreadable_one_is_reported() {
        let (r, _) = registry();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.yaml");
        // A file may use what a Secret may not (here: a plain-http server).
        std::fs::write(&file, kubeconfig("http://127.0.0.1:2")).unwrap();
        r.add_file("b", file).await;
        r.add_file("c", dir.path().join("missing.yaml")).await;
        assert!(r.current().resolve(Some("b")).is_ok());
        assert!(r.current().resolve(Some("c")).is_err());
        let detail = r.describe();
        assert!(
            detail.contains("cluster c: invalid kubeconfig: file"),
            "{detail}"
        );
        // A file takes precedence over a Secret naming the same cluster.
        let from_file = r.current().resolve(Some("b")).unwrap().generation();
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:3"))]))
            .await;
        assert_eq!(
            r.current().resolve(Some("b")).unwrap().generation(),
            from_file
        );
    }

    #[tokio::test]
    async fn replacing_the_secrets_drops_those_no_longer_listed() {
        let (r, _) = registry();
        r.apply_secret("s1", data(&[("b", kubeconfig("https://127.0.0.1:2"))]))
            .await;
        r.apply_secret("s2", data(&[("c", kubeconfig("https://127.0.0.1:2"))]))
            .await;
        r.replace_secrets(BTreeMap::from([(
            "s2".to_owned(),
            data(&[("c", kubeconfig("https://127.0.0.1:2"))]),
        )]))
        .await;
        let ids: Vec<_> = r.current().iter().map(|c| c.id().to_owned()).collect();
        assert_eq!(ids, ["local", "c"]);
    }
}
