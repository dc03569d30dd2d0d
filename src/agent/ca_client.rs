//! A client for the Istio CA API (meshid server, istiod, or any compatible CA), and validation
//! of what it returns.

use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::SpiffeId;
use crate::pem::{cert_to_pem, parse_certs};
use crate::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use crate::trust::TrustBundle;

/// Talking to the CA failed, or it returned something we will not use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaClientError {
    /// The endpoint URL or TLS settings are invalid.
    #[error("invalid CA endpoint: {0}")]
    Endpoint(String),
    /// The CA answered with an error status.
    #[error("CA refused: {code:?}: {message}")]
    Status {
        /// gRPC status code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The response chain is unusable (too short, wrong key or identity, does not verify).
    #[error("invalid response from CA: {0}")]
    InvalidResponse(String),
}

/// A client for `IstioCertificateService/CreateCertificate` over TLS.
#[derive(Clone)]
pub struct CaClient {
    inner: IstioCertificateServiceClient<Channel>,
    cluster_id: Option<String>,
}

impl CaClient {
    /// Prepares a client for `endpoint` (`https://host:port`) trusting `root_pem`, verifying the
    /// server name `server_name` (defaults to the endpoint host). Connects lazily.
    pub fn new(
        endpoint: &str,
        root_pem: &str,
        server_name: Option<&str>,
        cluster_id: Option<String>,
    ) -> Result<Self, CaClientError> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_pem));
        if let Some(name) = server_name {
            tls = tls.domain_name(name);
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| CaClientError::Endpoint(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| CaClientError::Endpoint(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        Ok(Self {
            inner: IstioCertificateServiceClient::new(channel),
            cluster_id,
        })
    }

    /// Sends `csr_pem` with `token` as the bearer credential, asking for `validity`.
    /// Returns the raw `cert_chain` (leaf first, root bundle last).
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        token: &str,
        validity: Duration,
        metadata: Option<prost_types::Struct>,
    ) -> Result<Vec<String>, CaClientError> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaClientError::Endpoint("token is not a valid header value".into()))?;
        req.metadata_mut().insert("authorization", bearer);
        if let Some(id) = &self.cluster_id {
            let v = id
                .parse()
                .map_err(|_| CaClientError::Endpoint("invalid cluster id".into()))?;
            req.metadata_mut().insert("clusterid", v);
        }
        let resp = self
            .inner
            .clone()
            .create_certificate(req)
            .await
            .map_err(|s| CaClientError::Status {
                code: s.code(),
                message: s.message().to_owned(),
            })?;
        Ok(resp.into_inner().cert_chain)
    }
}

/// A validated SVID: chain, key and roots. `Debug` never shows the key.
#[derive(Clone)]
pub struct Svid {
    /// Leaf and intermediates, PEM, leaf first.
    pub chain_pem: String,
    /// The trust bundle returned with it (PEM, one or more roots).
    pub roots_pem: String,
    /// PKCS#8 PEM of the private key.
    key_pem: String,
    /// The identity in the leaf.
    pub identity: SpiffeId,
    /// Leaf serial, lowercase hex.
    pub serial_hex: String,
    /// Leaf validity start.
    pub not_before: OffsetDateTime,
    /// Leaf expiry.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity)
            .field("serial", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// The private key, PKCS#8 PEM. Handle with care: never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Validates a CreateCertificate response for `key` and `expected` at `now`: at least two
    /// elements, the leaf certifies `key`, carries exactly the URI SAN `expected`, and the chain
    /// verifies against the root bundle in the last element.
    pub fn from_response(
        cert_chain: &[String],
        key: &KeyPair,
        expected: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<Self, CaClientError> {
        let bad = |m: &str| CaClientError::InvalidResponse(m.to_owned());
        let [chain @ .., roots] = cert_chain else {
            return Err(bad("empty chain"));
        };
        if chain.is_empty() {
            return Err(bad("chain has no leaf besides the root bundle"));
        }
        let mut ders = Vec::new();
        for pem in chain {
            ders.extend(
                parse_certs(pem).map_err(|e| CaClientError::InvalidResponse(e.to_string()))?,
            );
        }
        let bundle = TrustBundle::from_pem(roots)
            .map_err(|e| CaClientError::InvalidResponse(e.to_string()))?;
        bundle
            .verify_chain(&ders, now)
            .map_err(|e| CaClientError::InvalidResponse(e.to_string()))?;
        let (_, leaf) =
            X509Certificate::from_der(ders[0].as_ref()).map_err(|_| bad("leaf is malformed"))?;
        if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("leaf does not certify our key"));
        }
        let uris = crate::identity::uri_sans(&leaf);
        if uris != [expected.to_string().as_str()] {
            return Err(bad("leaf identity does not match"));
        }
        Ok(Self {
            chain_pem: ders.iter().map(|d| cert_to_pem(d)).collect(),
            roots_pem: bundle.pem().to_owned(),
            key_pem: key.serialize_pem(),
            identity: expected.clone(),
            serial_hex: hex::encode(leaf.raw_serial()),
            not_before: leaf.validity().not_before.to_datetime(),
            not_after: leaf.validity().not_after.to_datetime(),
        })
    }
}
