//! Direct mode: every certificate is issued by PCA.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::PcaError;
use super::check::check_leaf;
use super::limit::{Admission, SingleFlight};
use super::request::{coalescing_key, leaf_issue_request, split_chain};
use super::upstream::Upstream;
use crate::pem::parse_certs;
use futures::future::BoxFuture;

use crate::signer::{IssuedChain, Provenance, SignRequest, Signer, SignerError};

/// Issues every certificate through PCA (`BlankEndEntityCertificate_APIPassthrough`), with
/// our policy in `ApiPassthrough`, and serves a leaf only once it matches that policy exactly
/// ([`check_leaf`]). Identical concurrent requests are coalesced; at most `max_pending`
/// requests wait for PCA, the rest are refused as unavailable.
pub struct DirectSigner {
    upstream: Arc<Upstream>,
    signing_algorithm: &'static str,
    organization: String,
    roots: Vec<CertificateDer<'static>>,
    roots_pem: Vec<String>,
    admission: Admission,
    inflight: SingleFlight<[u8; 32], Result<IssuedChain, PcaError>>,
}

impl std::fmt::Debug for DirectSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSigner")
            .field("ca_arn", &self.upstream.ca_arn())
            .field("signing_algorithm", &self.signing_algorithm)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl DirectSigner {
    /// A signer for the CA behind `upstream`, whose chains end in `roots`; every leaf's
    /// subject is `O=<organization>` (plus `CN=<host>` for server certificates).
    pub fn new(
        upstream: Arc<Upstream>,
        signing_algorithm: &'static str,
        organization: String,
        roots: Vec<CertificateDer<'static>>,
        max_pending: usize,
    ) -> Self {
        let roots_pem = roots.iter().map(|r| crate::pem::cert_to_pem(r)).collect();
        Self {
            upstream,
            signing_algorithm,
            organization,
            roots,
            roots_pem,
            admission: Admission::new(max_pending),
            inflight: SingleFlight::default(),
        }
    }

    /// Issues `req` through PCA. Errors: [`PcaError::CsrRequired`] without a CSR,
    /// [`PcaError::QueueFull`] when too many requests wait, [`PcaError::LeafMismatch`] when
    /// PCA's leaf is not exactly what was asked for, and PCA failures.
    pub async fn issue(&self, req: &SignRequest) -> Result<IssuedChain, PcaError> {
        let csr_der = req.csr_der.as_deref().ok_or(PcaError::CsrRequired)?;
        let Some(_slot) = self.admission.try_admit() else {
            self.upstream.metrics().rejected_queue_full.inc();
            return Err(PcaError::QueueFull(self.admission.capacity()));
        };
        let key = coalescing_key(&req.profile, &req.spki_der, req.ttl);
        let (result, shared) = self
            .inflight
            .run(key, || self.issue_now(req, csr_der))
            .await;
        if shared {
            self.upstream.metrics().coalesced.inc();
        }
        result
    }

    async fn issue_now(&self, req: &SignRequest, csr_der: &[u8]) -> Result<IssuedChain, PcaError> {
        let issue = leaf_issue_request(
            self.upstream.ca_arn(),
            self.signing_algorithm,
            &req.profile,
            &self.organization,
            csr_der,
            req.ttl,
            OffsetDateTime::now_utc(),
        );
        let got = self.upstream.issue(&issue, "leaf").await?;
        let split = split_chain(&got, &self.roots)?;
        let leaf = parse_certs(&split.leaf_pem)
            .map_err(|e| PcaError::InvalidCertificate(e.to_string()))?;
        if let Some(asked) = &issue.api_passthrough {
            check_leaf(leaf[0].as_ref(), asked, &req.spki_der).map_err(PcaError::LeafMismatch)?;
        }
        Ok(IssuedChain {
            leaf_pem: split.leaf_pem,
            intermediates_pem: split.intermediates_pem,
            serial_hex: split.serial_hex,
            not_after: split.not_after,
            provenance: Provenance::Upstream,
        })
    }
}

impl Signer for DirectSigner {
    fn name(&self) -> &'static str {
        "aws-pca-direct"
    }

    fn trust_anchors_pem(&self) -> Vec<String> {
        self.roots_pem.clone()
    }

    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<IssuedChain, SignerError>> {
        Box::pin(async move { self.issue(&req).await.map_err(SignerError::from) })
    }
}
