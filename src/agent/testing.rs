//! Test doubles for the agent: a fake CA backed by a real local signer, with a script of
//! outcomes, that records every call it receives.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::ca_client::{CaClientError, Svid};
use super::csr::{WorkloadKeyType, generate_csr};
use super::rotation::CertificateIssuer;
use crate::identity::{LeafProfile, SpiffeId, check_csr};
use crate::signer::{LocalSigner, SignRequest, Signer};

/// What the fake CA does with the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Issue a correct certificate.
    Issue,
    /// Fail with `UNAVAILABLE`, as when the CA is down.
    Unavailable,
    /// Issue a certificate for another identity (which the agent must reject).
    WrongIdentity,
}

/// One call the fake CA received.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// When (tokio time, so it follows paused time).
    pub at: tokio::time::Instant,
    /// The bearer token sent.
    pub token: String,
}

/// A CA that signs with a real [`LocalSigner`] for one identity.
pub(crate) struct FakeCa {
    signer: LocalSigner,
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
            signer,
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

    /// The root bundle, PEM.
    pub fn roots_pem(&self) -> String {
        self.signer.trust_anchors_pem().concat()
    }

    /// Issues and validates an SVID for the CA's identity, valid for `ttl`.
    pub fn svid(&self, ttl: Duration) -> Svid {
        let (key, csr) = generate_csr(&self.identity, WorkloadKeyType::EcdsaP256).expect("csr");
        let chain = self.sign(&csr, &self.identity, ttl).expect("sign");
        Svid::from_response(&chain, &key, &self.identity, OffsetDateTime::now_utc())
            .expect("valid SVID")
    }

    fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let csr = check_csr(csr_pem, &self.identity).map_err(|e| CaClientError::Status {
            code: tonic::Code::InvalidArgument,
            message: e.to_string(),
        })?;
        let issued = self
            .signer
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
        chain.push(self.roots_pem());
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
