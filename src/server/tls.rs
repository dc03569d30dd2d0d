//! Serving TLS: a certificate resolver whose certificate can be replaced while serving, and the
//! rustls configuration (TLS 1.2+, ALPN `h2`).

use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::pem::parse_certs;

/// The serving certificate or key is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate PEM held no certificate.
    #[error("serving certificate: {0}")]
    Certificate(String),
    /// The key PEM held no supported private key.
    #[error("serving key is not a supported PEM private key")]
    Key,
    /// The key does not match the certificate.
    #[error("serving key does not match the certificate")]
    Mismatch,
}

/// Resolves every handshake to the current serving certificate.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certs(chain_pem).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::Key)?;
    let signing_key =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|_| TlsError::Key)?;
    let ck = CertifiedKey::new(certs, signing_key);
    ck.keys_match().map_err(|_| TlsError::Mismatch)?;
    Ok(Arc::new(ck))
}

impl ServingCertResolver {
    /// A resolver serving `chain_pem` (leaf first) with `key_pem`.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(certified_key(chain_pem, key_pem)?),
        })
    }

    /// Replaces the serving certificate; new handshakes use it at once.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let ck = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
        Ok(())
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A rustls server configuration over `resolver`: TLS 1.2 and 1.3, ALPN `h2`, no client auth
/// (callers authenticate with their service-account token).
pub fn serving_config(
    resolver: Arc<ServingCertResolver>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
