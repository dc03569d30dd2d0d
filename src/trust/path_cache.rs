//! Remembering the issuer path of in-process signers, so that it is not re-validated for every
//! certificate signed with it.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::bundle::TrustBundle;
use super::validate::{Usage, ValidationError};
use crate::pem::parse_certs;

/// How long a verified issuer path is trusted without being checked again, even when neither it
/// nor the bundle changed (a backstop; any change of either re-verifies at once).
pub const ISSUER_PATH_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Remembers the last issuer path (the in-process signing certificate, then any intermediates)
/// that validated against a bundle, so that certificates signed in this process do not pay for
/// re-validating unchanged intermediates on every request.
///
/// A miss validates a whole chain, the leaf just signed plus the path, through
/// [`TrustBundle::validate`] (for [`Usage::ServerAndClientAuth`], what every leaf meshid signs
/// carries), and remembers the path. Later leaves signed with the same path are signed by the key
/// proven at load to belong to its first certificate, so only the path needed checking.
///
/// An entry is used only for the very same bundle (`Arc` identity: every published bundle is a
/// new `Arc`), the very same path, a time inside every path certificate's validity, and at most
/// [`ISSUER_PATH_TTL`] after it was validated. Anything else validates in full.
#[derive(Debug, Default)]
pub struct IssuerPathCache {
    last: std::sync::Mutex<Option<VerifiedPath>>,
}

#[derive(Debug)]
struct VerifiedPath {
    bundle: Arc<TrustBundle>,
    path: Vec<CertificateDer<'static>>,
    /// Not before the check, nor before any path certificate's not_before.
    valid_from: OffsetDateTime,
    /// The earliest of every path certificate's not_after and the check + [`ISSUER_PATH_TTL`].
    valid_until: OffsetDateTime,
}

impl IssuerPathCache {
    /// A cache holding nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `path` (issuer first, then its intermediates; the root may be left out)
    /// validates against `bundle` at `now`, reusing the last successful check when it applies.
    /// On a miss, and only then, `leaf_pem` (a certificate just signed with the path's first
    /// certificate) is parsed and validated with it. Errors: [`ValidationError`] (a leaf that is not PEM is
    /// `Malformed { index: 0 }`).
    pub fn verify(
        &self,
        bundle: &Arc<TrustBundle>,
        leaf_pem: &str,
        path: &[CertificateDer<'_>],
        now: OffsetDateTime,
    ) -> Result<(), ValidationError> {
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = last.as_ref()
                && Arc::ptr_eq(&v.bundle, bundle)
                && v.path[..] == *path
                && v.valid_from <= now
                && now < v.valid_until
            {
                return Ok(());
            }
        }
        let mut chain =
            parse_certs(leaf_pem).map_err(|_| ValidationError::Malformed { index: 0 })?;
        chain.truncate(1);
        chain.extend(path.iter().map(|c| c.clone().into_owned()));
        bundle.validate(&chain, now, Usage::ServerAndClientAuth)?;
        let (mut valid_from, mut valid_until) = (now, now + ISSUER_PATH_TTL);
        for (index, der) in path.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(der.as_ref())
                .map_err(|_| ValidationError::Malformed { index: index + 1 })?;
            valid_from = valid_from.max(c.validity().not_before.to_datetime());
            valid_until = valid_until.min(c.validity().not_after.to_datetime());
        }
        let entry = VerifiedPath {
            bundle: Arc::clone(bundle),
            path: chain.split_off(1),
            valid_from,
            valid_until,
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(entry);
        Ok(())
    }
}
