//! The trust bundle: the set of roots that issued chains must end in, and that clients trust.
//!
//! The bundle may hold several roots at once (current and next) so that a root can be rotated
//! without downtime. It is published through a `tokio::sync::watch` channel as an
//! `Arc<TrustBundle>` and is only ever published after it parsed.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pem::{PemError, cert_to_pem, parse_certs};

/// A chain did not verify against the bundle, or a bundle was unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The bundle PEM held no certificate or was malformed.
    #[error("invalid trust bundle: {0}")]
    InvalidBundle(String),
    /// A certificate in the chain could not be parsed.
    #[error("certificate {index} in the chain is malformed")]
    Malformed {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// The chain is empty.
    #[error("empty chain")]
    Empty,
    /// Certificate `index` is not signed by certificate `index + 1`.
    #[error("certificate {index} is not signed by the next certificate in the chain")]
    BrokenLink {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// Certificate `index` is outside its validity period at the given time.
    #[error("certificate {index} is not valid at this time")]
    NotValidNow {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// The last certificate is not issued by any root in the bundle.
    #[error("chain does not end in a trusted root")]
    UntrustedRoot,
}

/// An immutable set of root certificates.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    pem: String,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl TrustBundle {
    /// Parses a PEM bundle of one or more root certificates; duplicates are dropped and the
    /// rest sorted (see [`from_ders`](Self::from_ders)).
    pub fn from_pem(pem: &str) -> Result<Self, TrustError> {
        let certs =
            parse_certs(pem).map_err(|e: PemError| TrustError::InvalidBundle(e.to_string()))?;
        Self::from_ders(certs)
    }

    /// Builds a bundle from DER roots; duplicates are dropped. The roots are kept in one
    /// canonical order (sorted by DER) so that the same set of roots is always the same PEM, and
    /// a replica publishing it writes nothing when another one already did.
    pub fn from_ders(certs: Vec<CertificateDer<'static>>) -> Result<Self, TrustError> {
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        for cert in certs {
            X509Certificate::from_der(cert.as_ref()).map_err(|_| {
                TrustError::InvalidBundle("a root is not a valid certificate".into())
            })?;
            if !roots.contains(&cert) {
                roots.push(cert);
            }
        }
        if roots.is_empty() {
            return Err(TrustError::InvalidBundle("no roots".into()));
        }
        roots.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let pem = roots.iter().map(|c| cert_to_pem(c)).collect();
        Ok(Self { roots, pem })
    }

    /// The roots, in canonical (DER) order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The whole bundle as concatenated PEM (each block newline-terminated).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The earliest expiry among the roots.
    pub fn earliest_expiry(&self) -> Option<OffsetDateTime> {
        self.roots
            .iter()
            .filter_map(|r| X509Certificate::from_der(r.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .min()
    }

    /// Verifies that `chain` (leaf first, then intermediates, no root needed) is valid at `now`,
    /// each link is signed by the next, and the last certificate is signed by one of the roots
    /// (or is one of them).
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: OffsetDateTime,
    ) -> Result<(), TrustError> {
        if chain.is_empty() {
            return Err(TrustError::Empty);
        }
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(index, der)| {
                X509Certificate::from_der(der.as_ref())
                    .map(|(_, c)| c)
                    .map_err(|_| TrustError::Malformed { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ts = x509_parser::time::ASN1Time::from(now);
        for (index, cert) in parsed.iter().enumerate() {
            if !cert.validity().is_valid_at(ts) {
                return Err(TrustError::NotValidNow { index });
            }
            if let Some(next) = parsed.get(index + 1)
                && (cert.issuer() != next.subject()
                    || cert.verify_signature(Some(next.public_key())).is_err())
            {
                return Err(TrustError::BrokenLink { index });
            }
        }
        let last_index = chain.len() - 1;
        let last = &parsed[last_index];
        if self
            .roots
            .iter()
            .any(|r| r.as_ref() == chain[last_index].as_ref())
        {
            return Ok(());
        }
        let trusted = self
            .roots
            .iter()
            .filter_map(|r| X509Certificate::from_der(r.as_ref()).ok())
            .any(|(_, root)| {
                root.subject() == last.issuer()
                    && root.validity().is_valid_at(ts)
                    && last.verify_signature(Some(root.public_key())).is_ok()
            });
        if trusted {
            Ok(())
        } else {
            Err(TrustError::UntrustedRoot)
        }
    }
}

/// How long a verified issuer path is trusted without being checked again, even when neither it
/// nor the bundle changed (a backstop; any change of either re-verifies at once).
pub const ISSUER_PATH_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Remembers the last issuer path (the in-process signing certificate, then any intermediates)
/// that verified against a bundle, so that certificates signed in this process do not pay for
/// re-verifying unchanged intermediates on every request.
///
/// An entry is used only for the very same bundle (`Arc` identity: every published bundle is a
/// new `Arc`), the very same path, a time inside every path certificate's validity, and at most
/// [`ISSUER_PATH_TTL`] after it was verified. Anything else verifies in full.
#[derive(Debug, Default)]
pub struct IssuerPathCache {
    last: std::sync::Mutex<Option<VerifiedPath>>,
}

/// How [`IssuerPathCache::verify`] reached its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathCheck {
    /// Every signature and validity period in the path was checked just now.
    Verified,
    /// The same path verified against the same bundle recently, and is still within validity.
    Cached,
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
    /// verifies against `bundle` at `now`, reusing the last successful check when it applies.
    pub fn verify(
        &self,
        bundle: &Arc<TrustBundle>,
        path: &[CertificateDer<'_>],
        now: OffsetDateTime,
    ) -> Result<PathCheck, TrustError> {
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = last.as_ref()
                && Arc::ptr_eq(&v.bundle, bundle)
                && v.path[..] == *path
                && v.valid_from <= now
                && now < v.valid_until
            {
                return Ok(PathCheck::Cached);
            }
        }
        bundle.verify_chain(path, now)?;
        let (mut valid_from, mut valid_until) = (now, now + ISSUER_PATH_TTL);
        for (index, der) in path.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(der.as_ref())
                .map_err(|_| TrustError::Malformed { index })?;
            valid_from = valid_from.max(c.validity().not_before.to_datetime());
            valid_until = valid_until.min(c.validity().not_after.to_datetime());
        }
        let entry = VerifiedPath {
            bundle: Arc::clone(bundle),
            path: path.iter().map(|c| c.clone().into_owned()).collect(),
            valid_from,
            valid_until,
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(entry);
        Ok(PathCheck::Verified)
    }
}

/// Builds the bundle from the signer's anchors plus the PEM roots in `extra_roots_pem` (empty or
/// whitespace-only means none).
pub fn combine(
    anchors: &[String],
    extra_roots_pem: Option<&str>,
) -> Result<TrustBundle, TrustError> {
    let mut pem = anchors.concat();
    if let Some(extra) = extra_roots_pem.filter(|e| !e.trim().is_empty()) {
        // Validate the extra file on its own so that its errors are named.
        TrustBundle::from_pem(extra)?;
        pem.push_str(&crate::pem::join_pems([extra]));
    }
    TrustBundle::from_pem(&pem)
}

/// How often the extra-roots file is checked for changes.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Re-reads `path` every `interval` and publishes `anchors` + its roots whenever the result
/// differs from the current bundle. An unreadable or invalid file is logged and ignored (the
/// current bundle stays). Returns at `shutdown`.
pub async fn reload_extra_roots(
    anchors: Vec<String>,
    path: std::path::PathBuf,
    tx: watch::Sender<Arc<TrustBundle>>,
    interval: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read extra roots; keeping the current bundle");
                continue;
            }
        };
        match combine(&anchors, Some(&text)) {
            Ok(bundle) if **tx.borrow() != bundle => {
                tracing::info!(
                    roots = bundle.roots().len(),
                    "trust bundle changed; publishing"
                );
                tx.send_replace(Arc::new(bundle));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "invalid extra roots; keeping the current bundle")
            }
        }
    }
}

/// Creates a watch channel publishing `bundle`.
pub fn channel(
    bundle: TrustBundle,
) -> (
    watch::Sender<Arc<TrustBundle>>,
    watch::Receiver<Arc<TrustBundle>>,
) {
    watch::channel(Arc::new(bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{LocalSigner, Signer};
    use std::time::Duration;

    fn signer() -> (tempfile::TempDir, LocalSigner) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        (dir, s)
    }

    fn leaf(s: &LocalSigner) -> Vec<CertificateDer<'static>> {
        parse_certs(&s.sign_test_leaf().leaf_pem).unwrap()
    }

    #[test]
    fn a_bundle_with_two_roots_verifies_leaves_from_either() {
        let (_d1, a) = signer();
        let (_d2, b) = signer();
        let pem = format!("{}{}", a.trust_anchors_pem()[0], b.trust_anchors_pem()[0]);
        let bundle = TrustBundle::from_pem(&pem).unwrap();
        assert_eq!(bundle.roots().len(), 2);
        let now = OffsetDateTime::now_utc();
        bundle.verify_chain(&leaf(&a), now).unwrap();
        bundle.verify_chain(&leaf(&b), now).unwrap();
    }

    #[test]
    fn a_leaf_from_another_root_is_untrusted() {
        let (_d1, a) = signer();
        let (_d2, b) = signer();
        let bundle = TrustBundle::from_pem(&a.trust_anchors_pem()[0]).unwrap();
        assert_eq!(
            bundle.verify_chain(&leaf(&b), OffsetDateTime::now_utc()),
            Err(TrustError::UntrustedRoot)
        );
    }

    #[test]
    fn an_expired_leaf_is_not_valid() {
        let (_d, a) = signer();
        let bundle = TrustBundle::from_pem(&a.trust_anchors_pem()[0]).unwrap();
        let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        assert_eq!(
            bundle.verify_chain(&leaf(&a), later),
            Err(TrustError::NotValidNow { index: 0 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_extra_roots_file_is_published_and_a_broken_one_is_ignored() {
        let (_d1, a) = signer();
        let (_d2, b) = signer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.pem");
        std::fs::write(&path, "").unwrap();
        let anchors = a.trust_anchors_pem();
        let (tx, mut rx) = channel(combine(&anchors, None).unwrap());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(reload_extra_roots(
            anchors,
            path.clone(),
            tx,
            RELOAD_INTERVAL,
            stop_rx,
        ));
        std::fs::write(&path, &b.trust_anchors_pem()[0]).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().roots().len(), 2);
        std::fs::write(&path, "not pem").unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 3).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().roots().len(), 2);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    /// A CA whose certificate is an intermediate under `root`'s key: (signer, its cert DER).
    fn intermediate_signer(root_dir: &std::path::Path) -> (LocalSigner, CertificateDer<'static>) {
        let root_cert = std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap();
        let root_key = std::fs::read_to_string(root_dir.join("root-key.pem")).unwrap();
        let root_key = rcgen::KeyPair::from_pem(&root_key).unwrap();
        let root_der = parse_certs(&root_cert).unwrap().remove(0);
        let root = rcgen::Issuer::from_ca_cert_der(&root_der, root_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "intermediate");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(3600);
        let cert = p.signed_by(&key, &root).unwrap();
        let signer =
            LocalSigner::from_pem(&cert.pem(), &key.serialize_pem(), None, Some(&root_cert))
                .unwrap();
        (signer, cert.der().clone())
    }

    /// A root, an intermediate under it, and a bundle of that root.
    struct PathFixture {
        root_dir: tempfile::TempDir,
        path: [CertificateDer<'static>; 1],
        bundle: Arc<TrustBundle>,
        cache: IssuerPathCache,
        now: OffsetDateTime,
    }

    fn path_fixture() -> PathFixture {
        let (root_dir, a) = signer();
        let (_intermediate, inter) = intermediate_signer(root_dir.path());
        PathFixture {
            path: [inter],
            bundle: Arc::new(TrustBundle::from_pem(&a.trust_anchors_pem()[0]).unwrap()),
            root_dir,
            cache: IssuerPathCache::new(),
            now: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn an_issuer_path_is_verified_once_per_bundle_and_again_for_a_new_bundle() {
        let PathFixture {
            path,
            bundle,
            cache,
            now,
            ..
        } = path_fixture();
        assert_eq!(cache.verify(&bundle, &path, now), Ok(PathCheck::Verified));
        assert_eq!(
            cache.verify(&bundle, &path, now + Duration::from_secs(30)),
            Ok(PathCheck::Cached)
        );
        // An equal bundle published anew is a new Arc: checked again.
        let republished = Arc::new((*bundle).clone());
        assert_eq!(
            cache.verify(&republished, &path, now),
            Ok(PathCheck::Verified)
        );
        // The root rotated away: the cached success for the old bundle does not carry over.
        let (_d2, b) = signer();
        let other = Arc::new(TrustBundle::from_pem(&b.trust_anchors_pem()[0]).unwrap());
        assert_eq!(
            cache.verify(&other, &path, now),
            Err(TrustError::UntrustedRoot)
        );
    }

    #[test]
    fn a_cached_issuer_path_expires_with_its_certificates_and_after_the_ttl() {
        let PathFixture {
            root_dir: d,
            path,
            bundle,
            cache,
            now,
        } = path_fixture();
        cache.verify(&bundle, &path, now).unwrap();
        assert_eq!(
            cache.verify(&bundle, &path, now + ISSUER_PATH_TTL),
            Ok(PathCheck::Verified),
            "the TTL bounds how long a check is reused"
        );
        // The intermediate lives one hour.
        assert_eq!(
            cache.verify(&bundle, &path, now + Duration::from_secs(7200)),
            Err(TrustError::NotValidNow { index: 0 })
        );
        // A different path is never answered from the cache.
        let (_ib2, inter2) = intermediate_signer(d.path());
        assert_eq!(
            cache.verify(&bundle, std::slice::from_ref(&inter2), now),
            Ok(PathCheck::Verified)
        );
    }

    #[test]
    fn duplicate_roots_are_dropped_and_garbage_is_refused() {
        let (_d, a) = signer();
        let pem = a.trust_anchors_pem()[0].repeat(2);
        assert_eq!(TrustBundle::from_pem(&pem).unwrap().roots().len(), 1);
        assert!(matches!(
            TrustBundle::from_pem("nope"),
            Err(TrustError::InvalidBundle(_))
        ));
    }
}
