//! ztunnel (ambient) node authorization: may this caller impersonate that identity?
//!
//! Allowed only when the caller's service account is a trusted node agent (e.g.
//! `istio-system/ztunnel`), its token is bound to a pod whose UID and service account match, and
//! at least one non-terminated pod running as the impersonated service account (in its
//! namespace) is scheduled on the caller pod's node. Lookups use a pod GET and a field-selector
//! LIST (no cluster-wide informer), with a short cache. Concurrent requests needing the same
//! lookup share one apiserver call ([`SingleFlight`]), and calls run within the same
//! [`ApiLimiter`] as TokenReviews. An apiserver failure is [`AuthzError::Unavailable`], never a
//! denial.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use prometheus_client::metrics::counter::Counter;

use super::{AuthzError, Denial, ImpersonationAuthorizer};
use crate::authn::{ApiLimiter, BackendError, Caller, PodRef, SingleFlight};
use crate::cluster::ClusterRegistry;
use crate::identity::SpiffeId;
use futures::future::BoxFuture;

/// How long positive lookups are cached.
const POSITIVE_TTL: Duration = Duration::from_secs(5);
/// How long negative node lookups are cached (short: a pod may be starting).
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// The Kubernetes reads node authorization makes. Implemented for `kube::Client`.
pub trait PodLookup: Send + Sync {
    /// `GET /api/v1/namespaces/{ns}/pods/{name}`; `Ok(None)` when absent.
    fn get_pod<'a>(
        &'a self,
        cluster: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, BackendError>>;
    /// `LIST /api/v1/namespaces/{ns}/pods?fieldSelector=spec.nodeName={node}`.
    fn pods_on_node<'a>(
        &'a self,
        cluster: &'a str,
        ns: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>, BackendError>>;
}

async fn get_pod(client: kube::Client, ns: &str, name: &str) -> Result<Option<Pod>, BackendError> {
    Ok(Api::<Pod>::namespaced(client, ns).get_opt(name).await?)
}

async fn pods_on_node(
    client: kube::Client,
    ns: &str,
    node: &str,
) -> Result<Vec<Pod>, BackendError> {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    Ok(Api::<Pod>::namespaced(client, ns).list(&lp).await?.items)
}

/// One cluster's pods, whatever cluster the caller names.
impl PodLookup for kube::Client {
    fn get_pod<'a>(
        &'a self,
        _cluster: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, BackendError>> {
        Box::pin(get_pod(self.clone(), ns, name))
    }

    fn pods_on_node<'a>(
        &'a self,
        _cluster: &'a str,
        ns: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>, BackendError>> {
        Box::pin(pods_on_node(self.clone(), ns, node))
    }
}

/// The client of a cluster the registry serves; one no longer served is unavailable (its
/// caller was authenticated there a moment ago).
fn cluster_client(registry: &ClusterRegistry, cluster: &str) -> Result<kube::Client, BackendError> {
    registry
        .current()
        .resolve(Some(cluster))
        .map(|c| c.client().clone())
        .map_err(|_| BackendError::Transport(format!("cluster {cluster:?} is no longer served")))
}

/// The pods of the caller's cluster, among those the registry serves.
impl PodLookup for Arc<ClusterRegistry> {
    fn get_pod<'a>(
        &'a self,
        cluster: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, BackendError>> {
        Box::pin(async move { get_pod(cluster_client(self, cluster)?, ns, name).await })
    }

    fn pods_on_node<'a>(
        &'a self,
        cluster: &'a str,
        ns: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>, BackendError>> {
        Box::pin(async move { pods_on_node(cluster_client(self, cluster)?, ns, node).await })
    }
}

/// (cluster, node, namespace, service account) of an impersonation target.
type Placement = (String, String, String, String);
/// (cluster, pod UID) of a caller.
type CallerPod = (String, String);

type NodeResult = Result<String, AuthzError>;
type PlacementResult = Result<bool, BackendError>;

/// Lookup results, each kept until it expires; expired entries are dropped on every insert.
struct Expiring<K, V>(Mutex<HashMap<K, (Instant, V)>>);

impl<K: Eq + Hash, V: Clone> Expiring<K, V> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    /// The value kept for `key`, unless it has expired by `now`.
    fn get(&self, key: &K, now: Instant) -> Option<V> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|(expiry, _)| *expiry > now)
            .map(|(_, value)| value.clone())
    }

    /// Keeps `value` for `key` until `now + ttl`.
    fn insert(&self, key: K, value: V, now: Instant, ttl: Duration) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (expiry, _)| *expiry > now);
        map.insert(key, (now + ttl, value));
    }
}

struct Inner<L> {
    lookup: L,
    limiter: ApiLimiter,
    /// (cluster, caller pod UID) → node name
    caller_nodes: Expiring<CallerPod, String>,
    /// (cluster, node, ns, sa) → allowed
    placements: Expiring<Placement, bool>,
    api_calls: Counter,
}

/// Authorizes ztunnel impersonation by node co-location.
pub struct NodeAuthorizer<L> {
    inner: Arc<Inner<L>>,
    trusted: Vec<(String, String)>,
    caller_lookups: SingleFlight<(CallerPod, String), NodeResult>,
    placement_lookups: SingleFlight<Placement, PlacementResult>,
}

/// Parses `ns/sa,ns/sa` into pairs. Errors name the bad entry.
pub fn parse_trusted_accounts(list: &[String]) -> Result<Vec<(String, String)>, String> {
    list.iter()
        .map(|e| {
            e.trim()
                .split_once('/')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
                .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
                .ok_or_else(|| format!("{e:?} is not namespace/serviceaccount"))
        })
        .collect()
}

fn terminated(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed")) || pod.metadata.deletion_timestamp.is_some()
}

fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

impl<L: PodLookup + 'static> NodeAuthorizer<L> {
    /// Trusts callers running as any of `trusted` (namespace, service account) pairs. Reads run
    /// within `limiter`; `api_calls` counts them.
    pub fn new(
        lookup: L,
        trusted: Vec<(String, String)>,
        limiter: ApiLimiter,
        api_calls: Counter,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                lookup,
                limiter,
                caller_nodes: Expiring::new(),
                placements: Expiring::new(),
                api_calls,
            }),
            trusted,
            caller_lookups: SingleFlight::default(),
            placement_lookups: SingleFlight::default(),
        }
    }

    async fn caller_node(&self, caller: &Caller) -> NodeResult {
        let pod_ref = caller.pod.as_ref().ok_or(Denial::NotPodBound)?;
        let now = Instant::now();
        let pod_key = (caller.cluster.clone(), pod_ref.uid.clone());
        if let Some(node) = self.inner.caller_nodes.get(&pod_key, now) {
            return Ok(node);
        }
        let ns = caller.identity.namespace().to_owned();
        let sa = caller.identity.service_account().to_owned();
        let pod_ref = pod_ref.clone();
        let key = (pod_key.clone(), pod_ref.name.clone());
        self.caller_lookups
            .run(key, || {
                let inner = self.inner.clone();
                Box::pin(async move { inner.fetch_caller_node(pod_key, &ns, &sa, &pod_ref).await })
            })
            .await
    }

    async fn identity_on_node(
        &self,
        cluster: &str,
        node: &str,
        target: &SpiffeId,
    ) -> PlacementResult {
        let key = (
            cluster.to_owned(),
            node.to_owned(),
            target.namespace().to_owned(),
            target.service_account().to_owned(),
        );
        if let Some(allowed) = self.inner.placements.get(&key, Instant::now()) {
            return Ok(allowed);
        }
        self.placement_lookups
            .run(key.clone(), || {
                let inner = self.inner.clone();
                Box::pin(async move { inner.fetch_placement(key).await })
            })
            .await
    }
}

impl<L: PodLookup> Inner<L> {
    async fn fetch_caller_node(
        &self,
        pod_key: CallerPod,
        ns: &str,
        sa: &str,
        pod_ref: &PodRef,
    ) -> NodeResult {
        let now = Instant::now();
        // A lookup that completed after the caller missed the cache has left its result there.
        if let Some(node) = self.caller_nodes.get(&pod_key, now) {
            return Ok(node);
        }
        self.api_calls.inc();
        let pod = self
            .limiter
            .run(self.lookup.get_pod(&pod_key.0, ns, &pod_ref.name))
            .await?
            .ok_or(Denial::PodNotFound)?;
        if pod.metadata.uid.as_deref() != Some(pod_ref.uid.as_str()) {
            return Err(Denial::PodUidMismatch.into());
        }
        if service_account(&pod) != sa {
            return Err(Denial::ServiceAccountMismatch.into());
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or(Denial::NotScheduled)?;
        self.caller_nodes
            .insert(pod_key, node.clone(), now, POSITIVE_TTL);
        Ok(node)
    }

    async fn fetch_placement(&self, key: Placement) -> PlacementResult {
        let now = Instant::now();
        if let Some(allowed) = self.placements.get(&key, now) {
            return Ok(allowed);
        }
        let (cluster, node, ns, sa) = &key;
        self.api_calls.inc();
        let pods = self
            .limiter
            .run(self.lookup.pods_on_node(cluster, ns, node))
            .await?;
        let allowed = pods
            .iter()
            .any(|p| !terminated(p) && service_account(p) == sa);
        let ttl = if allowed { POSITIVE_TTL } else { NEGATIVE_TTL };
        self.placements.insert(key, allowed, now, ttl);
        Ok(allowed)
    }
}

impl<L: PodLookup + 'static> ImpersonationAuthorizer for NodeAuthorizer<L> {
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        target: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthzError>> {
        Box::pin(async move {
            let result = self.decide(caller, target).await;
            match &result {
                Ok(()) => {
                    tracing::debug!(%target, "impersonation authorized: on the caller's node")
                }
                Err(AuthzError::Unavailable(e)) => tracing::warn!(
                    error = %e,
                    cluster = %caller.cluster,
                    %target,
                    "node authorization unavailable; failing closed"
                ),
                Err(AuthzError::Denied(_)) => {}
            }
            result
        })
    }
}

impl<L: PodLookup + 'static> NodeAuthorizer<L> {
    /// Whether `caller` may have a certificate for `target`: it is a trusted node agent, and
    /// `target` runs on the node its pod runs on.
    async fn decide(&self, caller: &Caller, target: &SpiffeId) -> Result<(), AuthzError> {
        let id = &caller.identity;
        if !self
            .trusted
            .iter()
            .any(|(ns, sa)| ns == id.namespace() && sa == id.service_account())
        {
            return Err(Denial::NotTrusted.into());
        }
        let node = self.caller_node(caller).await?;
        if self
            .identity_on_node(&caller.cluster, &node, target)
            .await?
        {
            Ok(())
        } else {
            Err(Denial::NotOnNode {
                target: target.to_string(),
                node,
            }
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    //! A scripted [`PodLookup`] checks the decision logic and caching in isolation; the same
    //! paths run against the real apiserver in `tests/kube_controllers.rs`.
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    /// Pods in namespaces, counting reads; `down` makes every read fail like an unreachable
    /// apiserver, and `gate` makes every read wait for a notification.
    #[derive(Default)]
    struct Pods(
        Vec<(String, Pod)>,
        std::sync::atomic::AtomicUsize,
        bool,
        Option<Arc<tokio::sync::Notify>>,
    );

    impl Pods {
        fn read(&self) -> Result<Option<Arc<tokio::sync::Notify>>, BackendError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.2 {
                return Err(BackendError::Transport("connection refused".into()));
            }
            Ok(self.3.clone())
        }
    }

    async fn wait(gate: Option<Arc<tokio::sync::Notify>>) {
        if let Some(g) = gate {
            g.notified().await;
        }
    }

    impl Pods {
        /// One apiserver read: counted, failed when `down`, answered with the pods of
        /// `cluster/ns` that `keep` accepts, and held at the gate before it returns.
        fn matching<'a>(
            &'a self,
            cluster: &str,
            ns: &str,
            keep: impl Fn(&Pod) -> bool,
        ) -> BoxFuture<'a, Result<Vec<Pod>, BackendError>> {
            let ns = format!("{cluster}/{ns}");
            let answer = self.read().map(|gate| {
                let pods = self.0.iter().filter(|(n, p)| *n == ns && keep(p));
                (gate, pods.map(|(_, p)| p.clone()).collect())
            });
            Box::pin(async move {
                let (gate, pods) = answer?;
                wait(gate).await;
                Ok(pods)
            })
        }
    }

    impl PodLookup for Pods {
        fn get_pod<'a>(
            &'a self,
            cluster: &'a str,
            ns: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<Pod>, BackendError>> {
            let named = self.matching(cluster, ns, |p| p.metadata.name.as_deref() == Some(name));
            Box::pin(async move { Ok(named.await?.into_iter().next()) })
        }
        fn pods_on_node<'a>(
            &'a self,
            cluster: &'a str,
            ns: &'a str,
            node: &'a str,
        ) -> BoxFuture<'a, Result<Vec<Pod>, BackendError>> {
            self.matching(cluster, ns, |p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            })
        }
    }

    fn ztunnel(uid: &str) -> Caller {
        Caller {
            identity: SpiffeId::for_service_account("td", "istio-system", "ztunnel").unwrap(),
            cluster: "c".into(),
            username: "system:serviceaccount:istio-system:ztunnel".into(),
            pod: Some(PodRef {
                name: "ztunnel-a".into(),
                uid: uid.into(),
            }),
        }
    }

    fn authorizer() -> NodeAuthorizer<Pods> {
        authorizer_with(false, None)
    }

    fn authorizer_with(down: bool, gate: Option<Arc<tokio::sync::Notify>>) -> NodeAuthorizer<Pods> {
        let pods = vec![
            (
                "c/istio-system".to_owned(),
                pod("ztunnel-a", "uid-z", "ztunnel", "node-a", "Running"),
            ),
            (
                "c/app".to_owned(),
                pod("web-1", "u1", "web", "node-a", "Running"),
            ),
            (
                "c/app".to_owned(),
                pod("db-1", "u2", "db", "node-b", "Running"),
            ),
            (
                "c/app".to_owned(),
                pod("job-1", "u3", "job", "node-a", "Succeeded"),
            ),
        ];
        NodeAuthorizer::new(
            Pods(pods, Default::default(), down, gate),
            vec![("istio-system".into(), "ztunnel".into())],
            ApiLimiter::new(crate::authn::ApiLimits::default(), Counter::default()),
            Counter::default(),
        )
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::for_service_account("td", "app", sa).unwrap()
    }

    #[tokio::test]
    async fn ztunnel_may_impersonate_only_running_workloads_on_its_own_node() {
        let a = authorizer();
        assert!(a.authorize(&ztunnel("uid-z"), &id("web")).await.is_ok());
        assert_eq!(
            a.authorize(&ztunnel("uid-z"), &id("db")).await,
            Err(AuthzError::Denied(Denial::NotOnNode {
                target: id("db").to_string(),
                node: "node-a".into()
            }))
        );
        assert!(matches!(
            a.authorize(&ztunnel("uid-z"), &id("job")).await,
            Err(AuthzError::Denied(Denial::NotOnNode { .. }))
        ));
        assert_eq!(
            a.authorize(&ztunnel("other-uid"), &id("web")).await,
            Err(Denial::PodUidMismatch.into())
        );
        let mut untrusted = ztunnel("uid-z");
        untrusted.identity = id("web");
        assert_eq!(
            a.authorize(&untrusted, &id("web")).await,
            Err(Denial::NotTrusted.into())
        );
        let mut unbound = ztunnel("uid-z");
        unbound.pod = None;
        assert_eq!(
            a.authorize(&unbound, &id("web")).await,
            Err(Denial::NotPodBound.into())
        );
    }

    #[tokio::test]
    async fn pods_are_looked_up_in_the_caller_s_cluster_and_cached_per_cluster() {
        let a = authorizer();
        // Cluster "c" has the ztunnel and web pods; cluster "d" has none of them.
        assert!(a.authorize(&ztunnel("uid-z"), &id("web")).await.is_ok());
        let mut from_d = ztunnel("uid-z");
        from_d.cluster = "d".into();
        assert_eq!(
            a.authorize(&from_d, &id("web")).await,
            Err(Denial::PodNotFound.into())
        );
    }

    #[tokio::test]
    async fn an_apiserver_failure_is_unavailable_not_a_denial() {
        let a = authorizer_with(true, None);
        assert!(matches!(
            a.authorize(&ztunnel("uid-z"), &id("web")).await,
            Err(AuthzError::Unavailable(BackendError::Transport(_)))
        ));
    }

    #[tokio::test]
    async fn concurrent_authorizations_share_one_pod_get_and_one_list() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let a = Arc::new(authorizer_with(false, Some(gate.clone())));
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let a = a.clone();
            requests.spawn(async move { a.authorize(&ztunnel("uid-z"), &id("web")).await });
        }
        // The pod GET waits; then the LIST waits.
        for expected in [1, 2] {
            while a.inner.lookup.1.load(std::sync::atomic::Ordering::SeqCst) < expected {
                tokio::task::yield_now().await;
            }
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            gate.notify_one();
        }
        assert!(requests.join_all().await.iter().all(Result::is_ok));
        assert_eq!(
            a.inner.lookup.1.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }

    #[tokio::test]
    async fn repeated_authorizations_are_served_from_the_cache() {
        let a = authorizer();
        a.authorize(&ztunnel("uid-z"), &id("web")).await.unwrap();
        a.authorize(&ztunnel("uid-z"), &id("web")).await.unwrap();
        assert_eq!(
            a.inner.lookup.1.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
        assert_eq!(a.inner.api_calls.get(), 2);
    }

    #[test]
    fn trusted_accounts_must_be_namespace_slash_name() {
        assert_eq!(
            parse_trusted_accounts(&["istio-system/ztunnel".into()])
                .unwrap()
                .len(),
            1
        );
        assert!(parse_trusted_accounts(&["ztunnel".into()]).is_err());
        assert!(parse_trusted_accounts(&["a/b/c".into()]).is_err());
    }
}
