//! A client for the Istio CA API (meshid server, istiod, or any compatible CA), and validation
//! of what it returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use crate::svid::SvidError;
use crate::trust::{TrustBundle, ValidationError};

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

impl From<SvidError> for CaClientError {
    fn from(e: SvidError) -> Self {
        match e {
            SvidError::InvalidResponse(m) => Self::InvalidResponse(m),
            SvidError::Untrusted(e) => Self::Untrusted(e),
        }
    }
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
