//! Optional: keeps a `kubernetes.io/tls` Secret (default `istiod-tls`) with a serving
//! certificate for istiod (`istiod[-<rev>].<ns>.svc` plus its SPIFFE ID), renewed at half its
//! lifetime or when the trust bundle no longer covers it, so istiod can run with
//! `ENABLE_CA_SERVER=false`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{LeafProfile, SpiffeId};
use crate::pem::{join_pems, parse_certs};
use crate::signer::{SignRequest, Signer};
use crate::trust::{TrustBundle, Usage};

/// Settings for the istiod certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstiodCertSettings {
    /// istiod's namespace, e.g. `istio-system`.
    pub namespace: String,
    /// Revision, if istiod runs as `istiod-<rev>`.
    pub revision: Option<String>,
    /// Secret name, e.g. `istiod-tls`.
    pub secret_name: String,
    /// Trust domain of istiod's SPIFFE ID.
    pub trust_domain: String,
    /// Certificate lifetime.
    pub ttl: Duration,
}

impl IstiodCertSettings {
    fn service(&self) -> String {
        match &self.revision {
            Some(rev) if !rev.is_empty() => format!("istiod-{rev}"),
            _ => "istiod".into(),
        }
    }

    /// DNS names the certificate must carry.
    pub fn hosts(&self) -> Vec<String> {
        let svc = self.service();
        vec![
            format!("{svc}.{}.svc", self.namespace),
            format!("{svc}.{}.svc.cluster.local", self.namespace),
        ]
    }

    /// istiod's SPIFFE ID (its service account has the service's name).
    pub fn spiffe(&self) -> Option<SpiffeId> {
        SpiffeId::for_service_account(&self.trust_domain, &self.namespace, &self.service()).ok()
    }
}

/// A write or issuance failed (retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IstiodCertError {
    /// The apiserver refused or failed a read or write.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Issuing failed.
    #[error("signing: {0}")]
    Sign(#[from] crate::signer::SignerError),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
}

/// When the certificate in `secret` should be renewed, or `None` if it must be now: missing,
/// unparsable, wrong names, not chaining to `bundle`, or past half its lifetime.
pub fn renewal_due(
    secret: Option<&Secret>,
    s: &IstiodCertSettings,
    bundle: &TrustBundle,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let data = secret?.data.as_ref()?;
    let chain_pem = std::str::from_utf8(&data.get("tls.crt")?.0).ok()?;
    let chain = parse_certs(chain_pem).ok()?;
    bundle.validate(&chain, now, Usage::ServerAuth).ok()?;
    let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).ok()?;
    let dns: Vec<&str> = leaf
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::DNSName(d) = n {
                Some(*d)
            } else {
                None
            }
        })
        .collect();
    if !s.hosts().iter().all(|h| dns.contains(&h.as_str())) {
        return None;
    }
    let nb = leaf.validity().not_before.to_datetime();
    let na = leaf.validity().not_after.to_datetime();
    let half = crate::schedule::point_of_lifetime(nb, na, 0.5);
    (half > now).then_some(half)
}

/// Delay after a failed reconcile.
const RETRY: crate::schedule::Backoff = crate::schedule::Backoff::fixed(Duration::from_secs(10));

async fn write_secret(
    api: &Api<Secret>,
    s: &IstiodCertSettings,
    signer: &dyn Signer,
    bundle: &TrustBundle,
    existing: Option<Secret>,
) -> Result<OffsetDateTime, IstiodCertError> {
    let key = rcgen::KeyPair::generate()?;
    let issued = signer
        .sign(SignRequest::for_key(
            LeafProfile::Server {
                hosts: s.hosts(),
                spiffe: s.spiffe(),
            },
            &key,
            s.ttl,
        )?)
        .await?;
    let chain = join_pems(
        std::iter::once(issued.leaf_pem.as_str())
            .chain(issued.intermediates_pem.iter().map(String::as_str)),
    );
    let data = BTreeMap::from([
        ("tls.crt".to_owned(), ByteString(chain.into_bytes())),
        (
            "tls.key".to_owned(),
            ByteString(key.serialize_pem().into_bytes()),
        ),
        (
            "ca.crt".to_owned(),
            ByteString(bundle.pem().as_bytes().to_vec()),
        ),
    ]);
    let pp = PostParams {
        field_manager: Some("meshid".into()),
        ..Default::default()
    };
    match existing {
        Some(mut secret) => {
            secret.data = Some(data);
            api.replace(&s.secret_name, &pp, &secret).await?;
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(s.secret_name.clone()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Default::default()
            };
            api.create(&pp, &secret).await?;
        }
    }
    tracing::info!(secret = %s.secret_name, namespace = %s.namespace, serial = %issued.serial_hex, not_after = %issued.not_after, "wrote istiod serving certificate");
    let nb = OffsetDateTime::now_utc();
    Ok(nb + (issued.not_after - nb) / 2)
}

/// Keeps the istiod Secret current until `shutdown`.
pub async fn run_istiod_cert(
    client: kube::Client,
    signer: Arc<dyn Signer>,
    mut trust: watch::Receiver<Arc<TrustBundle>>,
    s: IstiodCertSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &s.namespace);
    loop {
        let bundle = trust.borrow_and_update().clone();
        let now = OffsetDateTime::now_utc();
        let next = match api.get_opt(&s.secret_name).await {
            Ok(existing) => match renewal_due(existing.as_ref(), &s, &bundle, now) {
                Some(at) => Ok(at),
                None => write_secret(&api, &s, signer.as_ref(), &bundle, existing).await,
            },
            Err(e) => Err(e.into()),
        };
        let wait = match next {
            Ok(at) => {
                crate::schedule::until(OffsetDateTime::now_utc(), at).min(Duration::from_secs(3600))
            }
            Err(e) => {
                tracing::warn!(error = %e, "istiod certificate reconcile failed; retrying");
                RETRY.jittered(0)
            }
        };
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = trust.changed() => {}
            _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
        }
    }
}
