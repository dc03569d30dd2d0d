//! A client for the Istio CA API (meshid server, istiod, or any compatible CA), and validation
//! of what it returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::SpiffeId;
use crate::pem::{cert_to_pem, parse_certs};
use crate::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use crate::trust::{TrustBundle, Usage, ValidationError};

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
    /// The response chain is unusable (too short, malformed, wrong key or identity).
    #[error("invalid response from CA: {0}")]
    InvalidResponse(String),
    /// The response chain does not validate against the roots trusted before the response
    /// (whatever roots the response itself carries).
    #[error("CA response does not validate against the trusted roots: {0}")]
    Untrusted(#[source] ValidationError),
}

/// A client for `IstioCertificateService/CreateCertificate` over TLS. The TLS client trusts
/// the roots on a `watch` channel and is rebuilt before the next call whenever they change.
#[derive(Clone)]
pub struct CaClient {
    endpoint: String,
    server_name: Option<String>,
    cluster_id: Option<String>,
    roots: watch::Receiver<Arc<TrustBundle>>,
    /// The client for the roots it was built from.
    current: Arc<Mutex<(Arc<TrustBundle>, IstioCertificateServiceClient<Channel>)>>,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("endpoint", &self.endpoint)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A lazily connecting channel to `endpoint` trusting `roots`.
fn connect(
    endpoint: &str,
    roots: &TrustBundle,
    server_name: Option<&str>,
) -> Result<IstioCertificateServiceClient<Channel>, CaClientError> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots.pem()));
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
    Ok(IstioCertificateServiceClient::new(channel))
}

impl CaClient {
    /// Prepares a client for `endpoint` (`https://host:port`) trusting `root_pem` (fixed),
    /// verifying the server name `server_name` (defaults to the endpoint host). Connects
    /// lazily. Errors: [`CaClientError::Endpoint`] (also for roots that are not a valid bundle).
    pub fn new(
        endpoint: &str,
        root_pem: &str,
        server_name: Option<&str>,
        cluster_id: Option<String>,
    ) -> Result<Self, CaClientError> {
        let roots = TrustBundle::from_pem(root_pem)
            .map_err(|e| CaClientError::Endpoint(format!("CA roots: {e}")))?;
        let (_, rx) = watch::channel(Arc::new(roots));
        Self::following(endpoint, rx, server_name, cluster_id)
    }

    /// Like [`CaClient::new`], trusting whatever `roots` holds at each call: when it changed
    /// since the last call, a new TLS client is built from it first (existing connections,
    /// made with the old roots, are dropped).
    pub fn following(
        endpoint: &str,
        roots: watch::Receiver<Arc<TrustBundle>>,
        server_name: Option<&str>,
        cluster_id: Option<String>,
    ) -> Result<Self, CaClientError> {
        let bundle = roots.borrow().clone();
        let client = connect(endpoint, &bundle, server_name)?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            server_name: server_name.map(str::to_owned),
            cluster_id,
            roots,
            current: Arc::new(Mutex::new((bundle, client))),
        })
    }

    /// The client for the roots trusted now, rebuilt if they changed.
    fn client(&self) -> Result<IstioCertificateServiceClient<Channel>, CaClientError> {
        let roots = self.roots.borrow().clone();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&current.0, &roots) {
            let client = connect(&self.endpoint, &roots, self.server_name.as_deref())?;
            tracing::info!(
                roots = roots.roots().len(),
                "trusted CA roots changed; rebuilt the CA client"
            );
            *current = (roots, client);
        }
        Ok(current.1.clone())
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
        let resp =
            self.client()?
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
    /// The trust bundle served with it (PEM, one or more roots): in the agent, the roots it
    /// trusts (see `agent::trust`); from [`Svid::from_response`], the bundle returned with it.
    pub roots_pem: String,
    /// The bundle the CA returned with it.
    response_roots: TrustBundle,
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

    /// The roots the CA returned with this SVID (its last `cert_chain` element).
    pub fn response_roots(&self) -> &TrustBundle {
        &self.response_roots
    }

    /// The same SVID served with another trust bundle.
    pub fn with_roots_pem(&self, roots_pem: String) -> Self {
        Self {
            roots_pem,
            ..self.clone()
        }
    }

    /// Validates a CreateCertificate response for `key` and `expected` at `now`: at least two
    /// elements, the last a valid root bundle; the chain (leaf and intermediates) validates
    /// against `trusted`, the roots trusted *before* this response, for server and client
    /// authentication (never against the roots in the response itself); the leaf certifies
    /// `key` and carries exactly the URI SAN `expected`.
    ///
    /// Errors: [`CaClientError::Untrusted`] when the chain does not validate against `trusted`,
    /// [`CaClientError::InvalidResponse`] for anything else.
    pub fn from_response(
        cert_chain: &[String],
        key: &KeyPair,
        expected: &SpiffeId,
        trusted: &TrustBundle,
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
        let response_roots = TrustBundle::from_pem(roots)
            .map_err(|e| CaClientError::InvalidResponse(e.to_string()))?;
        trusted
            .validate(&ders, now, Usage::ServerAndClientAuth)
            .map_err(CaClientError::Untrusted)?;
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
            roots_pem: response_roots.pem().to_owned(),
            response_roots,
            key_pem: key.serialize_pem(),
            identity: expected.clone(),
            serial_hex: hex::encode(leaf.raw_serial()),
            not_before: leaf.validity().not_before.to_datetime(),
            not_after: leaf.validity().not_after.to_datetime(),
        })
    }
}
