//! Test doubles for the agent: a fake CA backed by a real local signer, with a script of
//! outcomes, that records every call it receives.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::ca_client::CaClientError;
use super::rotation::CertificateIssuer;
use crate::identity::{LeafProfile, SpiffeId, check_csr};
use crate::signer::{LocalSigner, SignRequest, Signer};
use crate::svid::{Svid, WorkloadKeyType, generate_csr};
use crate::trust::TrustBundle;

/// What the fake CA does with the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Issue a correct certificate.
    Issue,
    /// Fail with `UNAVAILABLE`, as when the CA is down.
    Unavailable,
    /// Issue a certificate for another identity (which the agent must reject).
    WrongIdentity,
    /// Issue from an unrelated CA and return that CA's root as the bundle: the chain validates
    /// only against the roots inside the response (which the agent must reject).
    ForeignRoot,
}

/// One call the fake CA received.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// When (tokio time, so it follows paused time).
    pub at: tokio::time::Instant,
    /// The bearer token sent.
    pub token: String,
}

/// A CA that signs with a real [`LocalSigner`] for one identity, and can rotate its root.
pub(crate) struct FakeCa {
    dir: PathBuf,
    /// The signing CA, and the roots returned besides its own (a root announced ahead of a
    /// switch, or the previous root after one).
    signer: Mutex<(Arc<LocalSigner>, Vec<String>)>,
    /// A root prepared by [`FakeCa::announce_next_root`], not signing yet.
    next: Mutex<Option<Arc<LocalSigner>>>,
    roots_made: Mutex<u32>,
    identity: SpiffeId,
    script: Mutex<VecDeque<Outcome>>,
    calls: Mutex<Vec<Call>>,
    count: watch::Sender<usize>,
}

impl FakeCa {
    /// A CA with a fresh root generated in `dir`, certifying `identity`.
    pub fn new(dir: &Path, identity: SpiffeId) -> Self {
        let signer = LocalSigner::load_or_generate(&dir.join("fake-ca"), identity.trust_domain())
            .expect("test CA");
        Self {
            dir: dir.to_owned(),
            signer: Mutex::new((Arc::new(signer), Vec::new())),
            next: Mutex::new(None),
            roots_made: Mutex::new(0),
            identity,
            script: Mutex::new(VecDeque::new()),
            calls: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
        }
    }

    /// Queues outcomes for the next calls; once they run out, every call issues.
    pub fn script(&self, outcomes: impl IntoIterator<Item = Outcome>) {
        self.script.lock().expect("lock").extend(outcomes);
    }

    /// The calls received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    /// Completes once `n` calls have been received.
    pub async fn wait_for_calls(&self, n: usize) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// The root bundle it returns, PEM: its own root, then any other root it trusts.
    pub fn roots_pem(&self) -> String {
        let (signer, extra) = &*self.signer.lock().expect("lock");
        let mut pem = signer.trust_anchors_pem().concat();
        pem.extend(extra.iter().map(String::as_str));
        pem
    }

    /// The roots it returns, as a bundle.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.roots_pem()).expect("valid roots")
    }

    fn new_root(&self) -> Arc<LocalSigner> {
        let n = {
            let mut made = self.roots_made.lock().expect("lock");
            *made += 1;
            *made
        };
        let dir = self.dir.join(format!("fake-ca-{n}"));
        Arc::new(LocalSigner::load_or_generate(&dir, self.identity.trust_domain()).expect("root"))
    }

    /// Step 1 of a root rotation: a new root, returned in every bundle from now on but not
    /// signing yet. Returns its PEM.
    pub fn announce_next_root(&self) -> String {
        let next = self.new_root();
        let pem = next.trust_anchors_pem().concat();
        self.signer.lock().expect("lock").1.push(pem.clone());
        *self.next.lock().expect("lock") = Some(next);
        pem
    }

    /// Step 2: sign with the announced root (a fresh one if none was announced); the previous
    /// root stays in the bundle.
    pub fn switch_to_next_root(&self) {
        let next = self
            .next
            .lock()
            .expect("lock")
            .take()
            .unwrap_or_else(|| self.new_root());
        let mut current = self.signer.lock().expect("lock");
        let old = current.0.trust_anchors_pem().concat();
        let new = next.trust_anchors_pem().concat();
        current.1.retain(|r| *r != new);
        current.1.insert(0, old);
        current.0 = next;
    }

    /// Issues and validates an SVID for the CA's identity, valid for `ttl`.
    pub fn svid(&self, ttl: Duration) -> Svid {
        let (key, csr) = generate_csr(&self.identity, WorkloadKeyType::EcdsaP256).expect("csr");
        let chain = self.sign(&csr, &self.identity, ttl).expect("sign");
        Svid::from_response(
            &chain,
            &key,
            &self.identity,
            &self.bundle(),
            OffsetDateTime::now_utc(),
        )
        .expect("valid SVID")
    }

    fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let signer = self.signer.lock().expect("lock").0.clone();
        let mut chain = Self::sign_with(&signer, csr_pem, &self.identity, identity, ttl)?;
        chain.push(self.roots_pem());
        Ok(chain)
    }

    /// Leaf and intermediates from `signer` (no root bundle) for a CSR made for `csr_identity`,
    /// certifying `identity`.
    fn sign_with(
        signer: &LocalSigner,
        csr_pem: &str,
        csr_identity: &SpiffeId,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let csr = check_csr(csr_pem, csr_identity).map_err(|e| CaClientError::Status {
            code: tonic::Code::InvalidArgument,
            message: e.to_string(),
        })?;
        let issued = signer
            .sign_now(&SignRequest {
                profile: LeafProfile::Workload(identity.clone()),
                spki_der: csr.spki_der,
                ttl,
                max_backdate: crate::identity::DEFAULT_MAX_BACKDATE,
                csr_der: None,
            })
            .map_err(|e| CaClientError::Status {
                code: tonic::Code::Internal,
                message: e.to_string(),
            })?;
        let mut chain = vec![issued.leaf_pem];
        chain.extend(issued.intermediates_pem);
        Ok(chain)
    }

    fn issue_now(
        &self,
        csr_pem: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        self.calls.lock().expect("lock").push(Call {
            at: tokio::time::Instant::now(),
            token: token.to_owned(),
        });
        self.count.send_modify(|c| *c += 1);
        let outcome = self
            .script
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(Outcome::Issue);
        match outcome {
            Outcome::Issue => self.sign(csr_pem, &self.identity, ttl),
            Outcome::Unavailable => Err(CaClientError::Status {
                code: tonic::Code::Unavailable,
                message: "CA is down".into(),
            }),
            Outcome::WrongIdentity => {
                let other = SpiffeId::for_service_account(
                    self.identity.trust_domain(),
                    "other",
                    "impostor",
                )
                .expect("valid identity");
                self.sign(csr_pem, &other, ttl)
            }
            Outcome::ForeignRoot => {
                let foreign = self.new_root();
                let mut chain =
                    Self::sign_with(&foreign, csr_pem, &self.identity, &self.identity, ttl)?;
                chain.push(foreign.trust_anchors_pem().concat());
                Ok(chain)
            }
        }
    }
}

impl CertificateIssuer for FakeCa {
    fn issue(
        &self,
        csr_pem: &str,
        token: &str,
        validity: Duration,
    ) -> impl Future<Output = Result<Vec<String>, CaClientError>> + Send {
        let result = self.issue_now(csr_pem, token, validity);
        async move { result }
    }
}
