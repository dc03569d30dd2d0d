//! A validated SVID (chain, key, roots) and the validation of a CreateCertificate response
//! that makes one.

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::SpiffeId;
use crate::pem::{cert_to_pem, parse_certs};
use crate::trust::{TrustBundle, Usage, ValidationError};

/// A CreateCertificate response that is not a usable SVID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The response chain is unusable (too short, malformed, wrong key or identity).
    #[error("invalid response from CA: {0}")]
    InvalidResponse(String),
    /// The response chain does not validate against the roots trusted before the response
    /// (whatever roots the response itself carries).
    #[error("CA response does not validate against the trusted roots: {0}")]
    Untrusted(#[source] ValidationError),
}

/// A validated SVID: chain, key and roots. `Debug` never shows the key.
#[derive(Clone)]
pub struct Svid {
    /// Leaf and intermediates, PEM, leaf first.
    pub chain_pem: String,
    /// The trust bundle served with it (PEM, one or more roots): in the agent, the roots it
    /// trusts (see `agent::CaTrust`); from [`Svid::from_response`], the bundle returned with it.
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
    /// Errors: [`SvidError::Untrusted`] when the chain does not validate against `trusted`,
    /// [`SvidError::InvalidResponse`] for anything else.
    pub fn from_response(
        cert_chain: &[String],
        key: &KeyPair,
        expected: &SpiffeId,
        trusted: &TrustBundle,
        now: OffsetDateTime,
    ) -> Result<Self, SvidError> {
        let bad = |m: &str| SvidError::InvalidResponse(m.to_owned());
        let [chain @ .., roots] = cert_chain else {
            return Err(bad("empty chain"));
        };
        if chain.is_empty() {
            return Err(bad("chain has no leaf besides the root bundle"));
        }
        let mut ders = Vec::new();
        for pem in chain {
            ders.extend(parse_certs(pem).map_err(|e| SvidError::InvalidResponse(e.to_string()))?);
        }
        let response_roots =
            TrustBundle::from_pem(roots).map_err(|e| SvidError::InvalidResponse(e.to_string()))?;
        trusted
            .validate(&ders, now, Usage::ServerAndClientAuth)
            .map_err(SvidError::Untrusted)?;
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
