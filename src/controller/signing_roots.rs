//! The signing-roots registry: every replica records the roots it signs with, so that every
//! replica publishes the same bundle and no bundle ever lacks a root that some leaf chains to.
//!
//! One ConfigMap (`<lease-name>-signing-roots`, in the leader-election namespace) holds one data
//! key per replica (its identity, the pod name). The value is a JSON [`Record`]: the PEM roots
//! the replica signs with, when it last said so (`renewed`) and how long leaves it signed may
//! outlive that (`retainSeconds` = `--max-ttl` + `--signing-roots-grace`). Each replica
//! JSON-merge-patches only its own key every `--signing-roots-interval` (a heartbeat that needs
//! no read-modify-write) and reads every other key from the patched object it gets back.
//!
//! The bundle a replica publishes (response bundles, `istio-ca-root-cert`, istiod's `ca.crt`) is
//! [`compose`]: its own signing roots and `--extra-roots`, plus every root of a record that is
//! still retained ([`roots_in_use`]: `renewed + retainSeconds` in the future). A record outlives
//! its replica: a replica that stops keeps its last heartbeat, so its roots stay in every bundle
//! until every leaf it can have signed has expired; then any replica removes the record (a
//! merge patch guarded by the observed `resourceVersion`, so a concurrent heartbeat wins).
//!
//! When the registry cannot be read, the last roots read stay in force: a bundle never shrinks
//! because the apiserver is unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::trust::{TrustBundle, TrustError};

/// Suffix of the registry ConfigMap's name (after the Lease name).
pub const SIGNING_ROOTS_SUFFIX: &str = "-signing-roots";
const FIELD_MANAGER: &str = "meshid";

/// The registry could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigningRootsError {
    /// The apiserver refused or failed a read or write.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The registry call did not finish in time.
    #[error("registry call timed out")]
    Timeout,
}

/// Where the registry lives and who this replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningRootsSettings {
    /// Namespace of the registry ConfigMap (the leader-election namespace).
    pub namespace: String,
    /// Name of the registry ConfigMap.
    pub name: String,
    /// This replica's key in the registry (its pod name, made a valid ConfigMap key).
    pub identity: String,
    /// Heartbeat interval.
    pub interval: Duration,
    /// How long after its last heartbeat a replica's roots stay published
    /// (`--max-ttl` + `--signing-roots-grace`).
    pub retain: Duration,
}

impl SigningRootsSettings {
    /// The registry for the Lease `lease_name` in `namespace`, as `identity`.
    pub fn new(
        namespace: String,
        lease_name: &str,
        identity: &str,
        interval: Duration,
        retain: Duration,
    ) -> Self {
        Self {
            namespace,
            name: format!("{lease_name}{SIGNING_ROOTS_SUFFIX}"),
            identity: configmap_key(identity),
            interval,
            retain,
        }
    }
}

/// `identity` as a ConfigMap data key (`[-._a-zA-Z0-9]+`, at most 253 characters).
pub fn configmap_key(identity: &str) -> String {
    let key: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect();
    if key.is_empty() { "-".into() } else { key }
}

/// One replica's entry in the registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The PEM roots the replica signs with.
    pub roots: String,
    /// Its last heartbeat.
    pub renewed: Timestamp,
    /// How long after `renewed` its leaves may still be valid.
    pub retain_seconds: u64,
}

impl Record {
    /// Whether leaves signed under this record may still be valid at `now`.
    pub fn retained_at(&self, now: Timestamp) -> bool {
        let retain =
            SignedDuration::from_secs(i64::try_from(self.retain_seconds).unwrap_or(i64::MAX));
        self.renewed
            .checked_add(retain)
            .map_or(true, |until| until > now)
    }
}

/// What the registry says at `now`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InUse {
    /// The roots PEM of every retained record, by replica key (sorted).
    pub roots: BTreeMap<String, String>,
    /// Keys of records whose retention has passed (to be removed).
    pub expired: Vec<String>,
    /// Keys whose value is not a record (left alone, logged).
    pub invalid: Vec<String>,
}

/// Pure: sorts the registry's `data` into retained, expired and invalid records at `now`.
pub fn roots_in_use(data: &BTreeMap<String, String>, now: Timestamp) -> InUse {
    let mut out = InUse::default();
    for (key, value) in data {
        match serde_json::from_str::<Record>(value) {
            Ok(r) if r.retained_at(now) => {
                out.roots.insert(key.clone(), r.roots);
            }
            Ok(_) => out.expired.push(key.clone()),
            Err(_) => out.invalid.push(key.clone()),
        }
    }
    out
}

/// The published bundle: `local` (own signing roots + extra roots) plus every root in `in_use`.
/// A record whose PEM does not parse is skipped (and named in the error list returned).
pub fn compose(
    local: &TrustBundle,
    in_use: &BTreeMap<String, String>,
) -> (TrustBundle, Vec<(String, TrustError)>) {
    let mut ders = local.roots().to_vec();
    let mut bad = Vec::new();
    for (key, pem) in in_use {
        match TrustBundle::from_pem(pem) {
            Ok(b) => ders.extend(b.roots().iter().cloned()),
            Err(e) => bad.push((key.clone(), e)),
        }
    }
    // `local` parsed already, so the union has at least one valid root.
    let bundle = TrustBundle::from_ders(ders).unwrap_or_else(|_| local.clone());
    (bundle, bad)
}

/// This replica's handle on the registry.
#[derive(Clone)]
pub struct SigningRoots {
    api: Api<ConfigMap>,
    settings: SigningRootsSettings,
    anchors_pem: String,
    errors: Counter,
}

impl std::fmt::Debug for SigningRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningRoots")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How long one registry call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl SigningRoots {
    /// A registry handle for a replica signing with `anchors_pem`; `errors` counts failed
    /// heartbeats.
    pub fn new(
        client: kube::Client,
        settings: SigningRootsSettings,
        anchors_pem: String,
        errors: Counter,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            anchors_pem,
            errors,
        }
    }

    /// Records this replica's roots with a heartbeat at `now` and returns the registry as it is
    /// afterwards. Creates the ConfigMap when it does not exist yet.
    pub async fn beat(&self, now: Timestamp) -> Result<InUse, SigningRootsError> {
        let res = tokio::time::timeout(CALL_TIMEOUT, self.beat_inner(now))
            .await
            .unwrap_or(Err(SigningRootsError::Timeout));
        if res.is_err() {
            self.errors.inc();
        }
        res
    }

    async fn beat_inner(&self, now: Timestamp) -> Result<InUse, SigningRootsError> {
        let record = Record {
            roots: self.anchors_pem.clone(),
            renewed: now,
            retain_seconds: self.settings.retain.as_secs(),
        };
        let value = serde_json::to_string(&record).unwrap_or_default();
        let key = &self.settings.identity;
        let patch = serde_json::json!({ "data": { key: value } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let cm = match self
            .api
            .patch(&self.settings.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(cm) => cm,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(key.clone(), value)])),
                    ..Default::default()
                };
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match self.api.create(&post, &cm).await {
                    Ok(cm) => cm,
                    // Another replica created it first: add our key to theirs.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        self.api
                            .patch(&self.settings.name, &params, &Patch::Merge(&patch))
                            .await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let in_use = roots_in_use(&cm.data.clone().unwrap_or_default(), now);
        if !in_use.expired.is_empty() {
            self.remove_expired(&cm, &in_use.expired).await;
        }
        Ok(in_use)
    }

    /// Removes expired records, only if nobody wrote the registry since we read it.
    async fn remove_expired(&self, cm: &ConfigMap, expired: &[String]) {
        let nulls: serde_json::Map<String, serde_json::Value> = expired
            .iter()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": cm.metadata.resource_version },
            "data": nulls,
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self
            .api
            .patch(&self.settings.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => tracing::info!(replicas = ?expired, "removed expired signing-roots records"),
            // A concurrent heartbeat or removal: the next beat looks again.
            Err(e) => {
                tracing::debug!(error = %e, "removing expired signing-roots records deferred")
            }
        }
    }

    /// Keeps the heartbeat going and publishes `compose(local, registry)` on `tx` whenever it
    /// changes, starting from `in_use` (the result of the startup [`beat`](Self::beat)). A
    /// failed heartbeat keeps the last roots read. At `shutdown`, one last heartbeat records
    /// when this replica stopped signing.
    pub async fn run(
        self,
        mut in_use: InUse,
        mut local: watch::Receiver<Arc<TrustBundle>>,
        tx: watch::Sender<Arc<TrustBundle>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Without an extra-roots file nothing ever changes the local bundle.
        let mut local_open = true;
        loop {
            publish(&local.borrow_and_update(), &in_use, &tx);
            let beat_due = tokio::select! {
                _ = shutdown.wait_for(|v| *v) => break,
                r = local.changed(), if local_open => {
                    local_open = r.is_ok();
                    false
                }
                _ = tokio::time::sleep(self.settings.interval) => true,
            };
            if !beat_due {
                continue;
            }
            match self.beat(Timestamp::now()).await {
                Ok(now_in_use) => {
                    if !now_in_use.invalid.is_empty() && now_in_use.invalid != in_use.invalid {
                        tracing::warn!(keys = ?now_in_use.invalid, "ignoring malformed signing-roots records");
                    }
                    in_use = now_in_use;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    registry = %self.settings.name,
                    "signing-roots heartbeat failed; keeping the last roots read"
                ),
            }
        }
        match self.beat(Timestamp::now()).await {
            Ok(_) => tracing::info!(
                registry = %self.settings.name,
                "shutting down: recorded the last heartbeat of this replica's signing roots"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "shutting down: last signing-roots heartbeat failed")
            }
        }
    }
}

/// Publishes `compose(local, in_use)` if it differs from what `tx` holds.
fn publish(local: &TrustBundle, in_use: &InUse, tx: &watch::Sender<Arc<TrustBundle>>) {
    let (bundle, bad) = compose(local, &in_use.roots);
    for (key, e) in bad {
        tracing::warn!(replica = %key, error = %e, "ignoring unparsable signing roots");
    }
    if **tx.borrow() != bundle {
        tracing::info!(
            roots = bundle.roots().len(),
            "trust bundle changed; publishing"
        );
        tx.send_replace(Arc::new(bundle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{LocalSigner, Signer};

    fn root() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        let pem = s.trust_anchors_pem().concat();
        (dir, pem)
    }

    fn record(roots: &str, renewed: Timestamp, retain: u64) -> String {
        serde_json::to_string(&Record {
            roots: roots.into(),
            renewed,
            retain_seconds: retain,
        })
        .unwrap()
    }

    #[test]
    fn a_record_is_retained_until_its_heartbeat_plus_its_retention() {
        let now = Timestamp::now();
        let ago = |s: i64| now - SignedDuration::from_secs(s);
        let data = BTreeMap::from([
            ("live".to_owned(), record("A", ago(1), 60)),
            ("stopped".to_owned(), record("B", ago(59), 60)),
            ("gone".to_owned(), record("C", ago(61), 60)),
            ("junk".to_owned(), "{not json".to_owned()),
        ]);
        let in_use = roots_in_use(&data, now);
        assert_eq!(
            in_use.roots.keys().collect::<Vec<_>>(),
            vec!["live", "stopped"]
        );
        assert_eq!(in_use.expired, vec!["gone".to_owned()]);
        assert_eq!(in_use.invalid, vec!["junk".to_owned()]);
    }

    #[test]
    fn the_composed_bundle_is_the_union_in_one_order_whatever_the_local_roots() {
        let (_a, a) = root();
        let (_b, b) = root();
        let (_c, c) = root();
        let registry = BTreeMap::from([
            ("r1".to_owned(), a.clone()),
            ("r2".to_owned(), b.clone()),
            ("broken".to_owned(), "not pem".to_owned()),
        ]);
        // Two replicas: one signs with A and has C as an extra root, one signs with B and has C.
        let (one, bad) = compose(
            &TrustBundle::from_pem(&format!("{a}{c}")).unwrap(),
            &registry,
        );
        let (two, _) = compose(
            &TrustBundle::from_pem(&format!("{c}{b}")).unwrap(),
            &registry,
        );
        assert_eq!(one.roots().len(), 3);
        assert_eq!(one.pem(), two.pem(), "the same roots give the same bytes");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, "broken");
    }

    #[test]
    fn a_pod_name_becomes_a_valid_configmap_key() {
        assert_eq!(configmap_key("meshid-7d9f-x2"), "meshid-7d9f-x2");
        assert_eq!(configmap_key("host name/1"), "host-name-1");
        assert_eq!(configmap_key(""), "-");
    }

    #[tokio::test]
    async fn an_unreachable_registry_keeps_the_roots_last_read_in_the_bundle() {
        let (_a, a) = root();
        let (_b, b) = root();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let url: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
        let errors = Counter::default();
        let settings = SigningRootsSettings::new(
            "ns".into(),
            "lease",
            "me",
            Duration::from_millis(20),
            Duration::from_secs(60),
        );
        let reg = SigningRoots::new(client, settings, a.clone(), errors.clone());
        let local = TrustBundle::from_pem(&a).unwrap();
        let last_read = InUse {
            roots: BTreeMap::from([("other".to_owned(), b.clone())]),
            ..Default::default()
        };
        let (_local_tx, local_rx) = watch::channel(Arc::new(local.clone()));
        let (tx, mut rx) = watch::channel(Arc::new(local));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(reg.run(last_read, local_rx, tx, stop_rx));
        rx.wait_for(|bundle| bundle.roots().len() == 2)
            .await
            .unwrap();
        while errors.get() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            rx.borrow().roots().len(),
            2,
            "a failed heartbeat drops no root"
        );
        assert!(!rx.has_changed().unwrap());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
