//! A test CA for the SVID's consumers: a real [`LocalSigner`] root that issues validated
//! SVIDs for one identity. (The agent's scripted `FakeCa` builds on the agent's traits.)

use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;

use super::{Svid, WorkloadKeyType, generate_csr};
use crate::identity::{DEFAULT_MAX_BACKDATE, LeafProfile, SpiffeId, check_csr};
use crate::signer::{LocalSigner, SignRequest, Signer};
use crate::trust::TrustBundle;

/// A root generated in a directory, issuing for one identity.
pub(crate) struct TestCa {
    signer: LocalSigner,
    identity: SpiffeId,
}

impl TestCa {
    /// A CA with a fresh root generated in `dir`, certifying `identity`.
    pub fn new(dir: &Path, identity: SpiffeId) -> Self {
        let signer = LocalSigner::load_or_generate(&dir.join("test-ca"), identity.trust_domain())
            .expect("test CA");
        Self { signer, identity }
    }

    /// The root bundle it returns, PEM.
    pub fn roots_pem(&self) -> String {
        self.signer.trust_anchors_pem().concat()
    }

    /// Issues an SVID for the CA's identity, valid for `ttl`, validated like the agent does.
    pub fn svid(&self, ttl: Duration) -> Svid {
        let (key, csr) = generate_csr(&self.identity, WorkloadKeyType::EcdsaP256).expect("csr");
        let csr = check_csr(&csr, &self.identity).expect("valid CSR");
        let issued = self
            .signer
            .sign_now(&SignRequest {
                profile: LeafProfile::Workload(self.identity.clone()),
                spki_der: csr.spki_der,
                ttl,
                max_backdate: DEFAULT_MAX_BACKDATE,
                csr_der: None,
            })
            .expect("sign");
        let mut chain = vec![issued.leaf_pem];
        chain.extend(issued.intermediates_pem);
        chain.push(self.roots_pem());
        let trusted = TrustBundle::from_pem(&self.roots_pem()).expect("valid roots");
        Svid::from_response(
            &chain,
            &key,
            &self.identity,
            &trusted,
            OffsetDateTime::now_utc(),
        )
        .expect("valid SVID")
    }
}
