//! ztunnel (ambient) node authorization: may this caller impersonate that identity?
//!
//! Allowed only when the caller's service account is a trusted node agent (e.g.
//! `istio-system/ztunnel`), its token is bound to a pod whose UID and service account match, and
//! at least one non-terminated pod running as the impersonated service account (in its
//! namespace) is scheduled on the caller pod's node. Lookups use a pod GET and a field-selector
//! LIST (no cluster-wide informer), with a short cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use prometheus_client::metrics::counter::Counter;

use super::Caller;
use crate::identity::SpiffeId;
use crate::server::ImpersonationAuthorizer;
use crate::signer::BoxFuture;

/// How long positive lookups are cached.
const POSITIVE_TTL: Duration = Duration::from_secs(5);
/// How long negative node lookups are cached (short: a pod may be starting).
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// The Kubernetes reads node authorization makes. Implemented for `kube::Client`.
pub trait PodLookup: Send + Sync {
    /// `GET /api/v1/namespaces/{ns}/pods/{name}`; `Ok(None)` when absent.
    fn get_pod<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, String>>;
    /// `LIST /api/v1/namespaces/{ns}/pods?fieldSelector=spec.nodeName={node}`.
    fn pods_on_node<'a>(
        &'a self,
        ns: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>, String>>;
}

impl PodLookup for kube::Client {
    fn get_pod<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, String>> {
        Box::pin(async move {
            Api::<Pod>::namespaced(self.clone(), ns)
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn pods_on_node<'a>(
        &'a self,
        ns: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>, String>> {
        Box::pin(async move {
            let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
            Api::<Pod>::namespaced(self.clone(), ns)
                .list(&lp)
                .await
                .map(|l| l.items)
                .map_err(|e| e.to_string())
        })
    }
}

/// (node, namespace, service account) of an impersonation target.
type Placement = (String, String, String);

/// Authorizes ztunnel impersonation by node co-location.
pub struct NodeAuthorizer<L> {
    lookup: L,
    trusted: Vec<(String, String)>,
    /// caller pod UID → node name
    caller_nodes: Mutex<HashMap<String, (Instant, String)>>,
    /// (node, ns, sa) → (expiry, allowed)
    placements: Mutex<HashMap<Placement, (Instant, bool)>>,
    api_calls: Counter,
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

impl<L: PodLookup> NodeAuthorizer<L> {
    /// Trusts callers running as any of `trusted` (namespace, service account) pairs.
    /// `api_calls` counts apiserver reads.
    pub fn new(lookup: L, trusted: Vec<(String, String)>, api_calls: Counter) -> Self {
        Self {
            lookup,
            trusted,
            caller_nodes: Mutex::new(HashMap::new()),
            placements: Mutex::new(HashMap::new()),
            api_calls,
        }
    }

    async fn caller_node(&self, caller: &Caller) -> Result<String, String> {
        let pod_ref = caller
            .pod
            .as_ref()
            .ok_or("caller token is not bound to a pod")?;
        let now = Instant::now();
        if let Some((exp, node)) = self
            .caller_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pod_ref.uid)
            && *exp > now
        {
            return Ok(node.clone());
        }
        self.api_calls.inc();
        let ns = caller.identity.namespace();
        let pod = self
            .lookup
            .get_pod(ns, &pod_ref.name)
            .await
            .map_err(|e| format!("pod lookup failed: {e}"))?
            .ok_or("caller pod not found")?;
        if pod.metadata.uid.as_deref() != Some(pod_ref.uid.as_str()) {
            return Err("caller pod UID does not match its token".into());
        }
        let spec = pod.spec.as_ref().ok_or("caller pod has no spec")?;
        let sa = spec.service_account_name.as_deref().unwrap_or("default");
        if sa != caller.identity.service_account() {
            return Err("caller pod runs as another service account".into());
        }
        let node = spec
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or("caller pod is not scheduled")?;
        let mut cache = self.caller_nodes.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (exp, _)| *exp > now);
        cache.insert(pod_ref.uid.clone(), (now + POSITIVE_TTL, node.clone()));
        Ok(node)
    }

    async fn identity_on_node(&self, node: &str, target: &SpiffeId) -> Result<bool, String> {
        let key = (
            node.to_owned(),
            target.namespace().to_owned(),
            target.service_account().to_owned(),
        );
        let now = Instant::now();
        if let Some((exp, allowed)) = self
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && *exp > now
        {
            return Ok(*allowed);
        }
        self.api_calls.inc();
        let pods = self
            .lookup
            .pods_on_node(target.namespace(), node)
            .await
            .map_err(|e| format!("pod list failed: {e}"))?;
        let allowed = pods.iter().any(|p| {
            !terminated(p)
                && p.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == target.service_account()
        });
        let ttl = if allowed { POSITIVE_TTL } else { NEGATIVE_TTL };
        let mut cache = self.placements.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (exp, _)| *exp > now);
        cache.insert(key, (now + ttl, allowed));
        Ok(allowed)
    }
}

impl<L: PodLookup> ImpersonationAuthorizer for NodeAuthorizer<L> {
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        target: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let id = &caller.identity;
            if !self
                .trusted
                .iter()
                .any(|(ns, sa)| ns == id.namespace() && sa == id.service_account())
            {
                return Err(format!("{id} is not a trusted node agent"));
            }
            let node = self.caller_node(caller).await?;
            if self.identity_on_node(&node, target).await? {
                Ok(())
            } else {
                Err(format!("no running pod of {target} on node {node}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    //! A scripted [`PodLookup`] checks the decision logic and caching in isolation; the same
    //! paths run against the real apiserver in `tests/kube_controllers.rs`.
    use super::*;
    use crate::authn::PodRef;
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

    struct Pods(Vec<(String, Pod)>, std::sync::atomic::AtomicUsize);

    impl PodLookup for Pods {
        fn get_pod<'a>(
            &'a self,
            ns: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<Pod>, String>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p = self
                .0
                .iter()
                .find(|(n, p)| n == ns && p.metadata.name.as_deref() == Some(name))
                .map(|(_, p)| p.clone());
            Box::pin(async move { Ok(p) })
        }
        fn pods_on_node<'a>(
            &'a self,
            ns: &'a str,
            node: &'a str,
        ) -> BoxFuture<'a, Result<Vec<Pod>, String>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let v = self
                .0
                .iter()
                .filter(|(n, p)| {
                    n == ns && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                })
                .map(|(_, p)| p.clone())
                .collect();
            Box::pin(async move { Ok(v) })
        }
    }

    fn ztunnel(uid: &str) -> Caller {
        Caller {
            identity: SpiffeId::for_service_account("td", "istio-system", "ztunnel").unwrap(),
            username: "system:serviceaccount:istio-system:ztunnel".into(),
            pod: Some(PodRef {
                name: "ztunnel-a".into(),
                uid: uid.into(),
            }),
        }
    }

    fn authorizer() -> NodeAuthorizer<Pods> {
        let pods = vec![
            (
                "istio-system".to_owned(),
                pod("ztunnel-a", "uid-z", "ztunnel", "node-a", "Running"),
            ),
            (
                "app".to_owned(),
                pod("web-1", "u1", "web", "node-a", "Running"),
            ),
            (
                "app".to_owned(),
                pod("db-1", "u2", "db", "node-b", "Running"),
            ),
            (
                "app".to_owned(),
                pod("job-1", "u3", "job", "node-a", "Succeeded"),
            ),
        ];
        NodeAuthorizer::new(
            Pods(pods, Default::default()),
            vec![("istio-system".into(), "ztunnel".into())],
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
        assert!(
            a.authorize(&ztunnel("uid-z"), &id("db"))
                .await
                .unwrap_err()
                .contains("node-a")
        );
        assert!(a.authorize(&ztunnel("uid-z"), &id("job")).await.is_err());
        assert!(
            a.authorize(&ztunnel("other-uid"), &id("web"))
                .await
                .unwrap_err()
                .contains("UID")
        );
        let mut untrusted = ztunnel("uid-z");
        untrusted.identity = id("web");
        assert!(
            a.authorize(&untrusted, &id("web"))
                .await
                .unwrap_err()
                .contains("trusted")
        );
    }

    #[tokio::test]
    async fn repeated_authorizations_are_served_from_the_cache() {
        let a = authorizer();
        a.authorize(&ztunnel("uid-z"), &id("web")).await.unwrap();
        a.authorize(&ztunnel("uid-z"), &id("web")).await.unwrap();
        assert_eq!(a.lookup.1.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(a.api_calls.get(), 2);
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
