//! The local signer: a CA key and certificate held in process memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use rustls_pki_types::CertificateDer;

use futures::future::BoxFuture;

use super::{IssuedChain, Provenance, SignRequest, Signer, SignerError};
use crate::identity::{leaf_params, random_serial};
use crate::pem::{cert_to_pem, parse_certs};

/// File names used in a self-generated CA directory.
const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";
/// Lifetime of a self-generated root.
const GENERATED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Paths of an operator-provided CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSignerFiles {
    /// The signing CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The signing CA private key (PKCS#8 PEM).
    pub ca_key: PathBuf,
    /// Optional intermediates between the signing CA and the root (PEM, leaf-most first).
    pub ca_chain: Option<PathBuf>,
    /// Root bundle (PEM). Required when the signing CA is not itself a self-signed root.
    pub root_cert: Option<PathBuf>,
}

/// Signs leaves with an in-memory CA key.
pub struct LocalSigner {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate whose key is `issuer`'s (checked at load), then the intermediates
    /// above it: what the server verifies against the trust bundle for every leaf.
    issuer_path: Arc<[CertificateDer<'static>]>,
    /// Signing CA cert (when it is an intermediate) followed by further intermediates.
    intermediates_pem: Vec<String>,
    roots_pem: Vec<String>,
    ca_not_after: OffsetDateTime,
}

impl std::fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("LocalSigner")
            .field("intermediates", &self.intermediates_pem.len())
            .field("roots", &self.roots_pem.len())
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, SignerError> {
    std::fs::read_to_string(path).map_err(|source| SignerError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(msg: impl Into<String>) -> SignerError {
    SignerError::InvalidCa(msg.into())
}

struct CaFacts {
    self_signed: bool,
    not_after: OffsetDateTime,
    spki: Vec<u8>,
}

fn ca_facts(der: &[u8], now: OffsetDateTime) -> Result<CaFacts, SignerError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| invalid(format!("CA certificate: {e}")))?;
    crate::trust::check_ca_certificate(der)
        .map_err(|source| SignerError::CaCertificate { index: 0, source })?;
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= now {
        return Err(invalid(format!("CA certificate expired at {not_after}")));
    }
    let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
    Ok(CaFacts {
        self_signed,
        not_after,
        spki: cert.public_key().raw.to_vec(),
    })
}

impl LocalSigner {
    /// Loads an operator-provided CA. Errors: [`SignerError::Read`] for unreadable files,
    /// [`SignerError::InvalidCa`] when the certificate is not a valid CA, the key does not
    /// match it, or no root is known.
    pub fn from_files(files: &LocalSignerFiles) -> Result<Self, SignerError> {
        let cert_pem = read(&files.ca_cert)?;
        let key_pem = read(&files.ca_key)?;
        let chain_pem = files.ca_chain.as_deref().map(read).transpose()?;
        let roots_pem = files.root_cert.as_deref().map(read).transpose()?;
        Self::from_pem(
            &cert_pem,
            &key_pem,
            chain_pem.as_deref(),
            roots_pem.as_deref(),
        )
    }

    /// Builds a signer from PEM text; see [`LocalSigner::from_files`].
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
        roots_pem: Option<&str>,
    ) -> Result<Self, SignerError> {
        let now = OffsetDateTime::now_utc();
        let certs = parse_certs(cert_pem).map_err(|e| invalid(format!("CA certificate: {e}")))?;
        let ca_der = &certs[0];
        let facts = ca_facts(ca_der, now)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| invalid("CA key is not a PKCS#8 PEM private key"))?;
        if key.subject_public_key_info() != facts.spki {
            return Err(invalid("CA key does not match the CA certificate"));
        }
        let issuer = Issuer::from_ca_cert_der(ca_der, key)
            .map_err(|e| invalid(format!("CA certificate: {e}")))?;
        let mut intermediates_pem = Vec::new();
        let mut issuer_path = vec![ca_der.clone()];
        let roots: Vec<String> = match roots_pem {
            Some(pem) => parse_certs(pem)
                .map_err(|e| invalid(format!("root bundle: {e}")))?
                .iter()
                .map(|c| cert_to_pem(c))
                .collect(),
            None if facts.self_signed => vec![cert_to_pem(ca_der)],
            None => {
                return Err(invalid(
                    "the CA certificate is not self-signed: a root bundle is required",
                ));
            }
        };
        if !facts.self_signed {
            intermediates_pem.push(cert_to_pem(ca_der));
        }
        if let Some(chain) = chain_pem {
            let chain = parse_certs(chain).map_err(|e| invalid(format!("CA chain: {e}")))?;
            for (i, der) in chain.iter().enumerate() {
                crate::trust::check_ca_certificate(der).map_err(|source| {
                    SignerError::CaCertificate {
                        index: i + 1,
                        source,
                    }
                })?;
            }
            intermediates_pem.extend(chain.iter().map(|c| cert_to_pem(c)));
            issuer_path.extend(chain);
        }
        check_path(&issuer, &facts.spki, &issuer_path, &roots, now)?;
        Ok(Self {
            issuer,
            issuer_path: issuer_path.into(),
            intermediates_pem,
            roots_pem: roots,
            ca_not_after: facts.not_after,
        })
    }

    /// Loads the root CA kept in `dir`, generating an ECDSA P-256 root there first if the
    /// directory holds none (key written with mode 0600). For quickstarts and single-node use.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, SignerError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        if !cert_path.exists() {
            let (cert_pem, key_pem) = generate_root(trust_domain)?;
            std::fs::create_dir_all(dir).map_err(|source| SignerError::Write {
                path: dir.display().to_string(),
                source,
            })?;
            write_private(&key_path, &key_pem)?;
            std::fs::write(&cert_path, cert_pem).map_err(|source| SignerError::Write {
                path: cert_path.display().to_string(),
                source,
            })?;
            tracing::info!(path = %cert_path.display(), "generated a new root CA");
        }
        Self::from_files(&LocalSignerFiles {
            ca_cert: cert_path,
            ca_key: key_path,
            ca_chain: None,
            root_cert: None,
        })
    }

    /// When the signing CA certificate expires; leaves never outlive it.
    pub fn ca_not_after(&self) -> OffsetDateTime {
        self.ca_not_after
    }

    /// Signs synchronously (the cost is one signature with the CA key). The lifetime is cut to
    /// end with the CA certificate, and the backdate is bounded by a tenth of what is left
    /// ([`crate::identity::backdate`]), so clients renewing at the midpoint never renew at once.
    pub fn sign_now(&self, req: &SignRequest) -> Result<IssuedChain, SignerError> {
        let now = OffsetDateTime::now_utc();
        let ca_left = Duration::try_from(self.ca_not_after - now).unwrap_or(Duration::ZERO);
        let params = leaf_params(
            &req.profile,
            &req.spki_der,
            now,
            req.ttl.min(ca_left),
            req.max_backdate,
        );
        let spki = SubjectPublicKeyInfo::from_der(&req.spki_der).map_err(SignerError::PublicKey)?;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(SignerError::Sign)?;
        Ok(IssuedChain {
            leaf_pem: cert.pem(),
            intermediates_pem: self.intermediates_pem.clone(),
            serial_hex,
            not_after: params.not_after,
            provenance: Provenance::InProcess {
                issuer_path: Arc::clone(&self.issuer_path),
            },
        })
    }
}

#[cfg(test)]
impl LocalSigner {
    /// Test helper: a 10-minute workload leaf for `spiffe://td/ns/a/sa/b` and a fresh key.
    pub(crate) fn sign_test_leaf(&self) -> IssuedChain {
        let key = KeyPair::generate().expect("key");
        let req = SignRequest {
            profile: crate::identity::LeafProfile::Workload(
                crate::identity::SpiffeId::for_service_account("td", "a", "b").expect("id"),
            ),
            spki_der: key.subject_public_key_info(),
            ttl: Duration::from_secs(600),
            max_backdate: crate::identity::DEFAULT_MAX_BACKDATE,
            csr_der: None,
        };
        self.sign_now(&req).expect("sign")
    }
}

/// Checks, once at load, that certificates signed with `issuer` validate through
/// `issuer_path` to `roots`, with the same validator used for everything else: it signs a
/// short-lived probe certificate (for the CA's own public key, never published) and validates
/// probe + path. This proves the path (CA:TRUE, keyCertSign, path lengths, validity, critical
/// extensions, signatures) and that the key signs for the first certificate of the path.
fn check_path(
    issuer: &Issuer<'static, KeyPair>,
    spki: &[u8],
    issuer_path: &[CertificateDer<'static>],
    roots_pem: &[String],
    now: OffsetDateTime,
) -> Result<(), SignerError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "meshid issuer path check");
    p.serial_number = Some(random_serial());
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(60);
    p.is_ca = IsCa::ExplicitNoCa;
    let spki = SubjectPublicKeyInfo::from_der(spki).map_err(SignerError::PublicKey)?;
    let probe = p.signed_by(&spki, issuer).map_err(SignerError::Sign)?;
    let mut chain = vec![probe.der().clone()];
    chain.extend(issuer_path.iter().cloned());
    let mut roots = Vec::new();
    for pem in roots_pem {
        roots.extend(parse_certs(pem).map_err(|e| invalid(format!("root bundle: {e}")))?);
    }
    crate::trust::validate_chain(
        &chain,
        &roots,
        now,
        crate::trust::Usage::ServerAndClientAuth,
    )
    .map_err(SignerError::CaPath)?;
    Ok(())
}

/// Generates a self-signed ECDSA P-256 root: returns (certificate PEM, PKCS#8 key PEM).
pub(crate) fn generate_root(trust_domain: &str) -> Result<(String, String), SignerError> {
    let key = KeyPair::generate().map_err(SignerError::Sign)?;
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    p.distinguished_name
        .push(DnType::CommonName, "meshid root CA");
    p.not_before = now - Duration::from_secs(3600);
    p.not_after = now + GENERATED_ROOT_TTL;
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).map_err(SignerError::Sign)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, contents: &str) -> Result<(), SignerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| SignerError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

impl Signer for LocalSigner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn trust_anchors_pem(&self) -> Vec<String> {
        self.roots_pem.clone()
    }

    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<IssuedChain, SignerError>> {
        Box::pin(async move { self.sign_now(&req) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{LeafProfile, SpiffeId};

    fn request(key: &KeyPair, ttl: Duration) -> SignRequest {
        SignRequest {
            profile: LeafProfile::Workload(
                SpiffeId::for_service_account("td", "ns", "sa").unwrap(),
            ),
            spki_der: key.subject_public_key_info(),
            ttl,
            max_backdate: crate::identity::DEFAULT_MAX_BACKDATE,
            csr_der: None,
        }
    }

    #[test]
    fn a_generated_root_signs_a_leaf_that_chains_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let signer = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(ROOT_KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let key = KeyPair::generate().unwrap();
        let issued = signer
            .sign_now(&request(&key, Duration::from_secs(3600)))
            .unwrap();
        assert!(issued.intermediates_pem.is_empty());
        let bundle =
            crate::trust::TrustBundle::from_pem(&signer.trust_anchors_pem().join("")).unwrap();
        let leaf = parse_certs(&issued.leaf_pem).unwrap();
        bundle
            .validate(
                &leaf,
                OffsetDateTime::now_utc(),
                crate::trust::Usage::ServerAndClientAuth,
            )
            .unwrap();
        // Loading again reuses the same root.
        let again = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        assert_eq!(again.trust_anchors_pem(), signer.trust_anchors_pem());
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let signer = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = signer
            .sign_now(&request(&key, Duration::from_secs(20 * 365 * 24 * 3600)))
            .unwrap();
        assert_eq!(issued.not_after, signer.ca_not_after());
    }

    #[test]
    fn a_key_that_does_not_match_the_ca_certificate_is_refused() {
        let (cert, _) = generate_root("td").unwrap();
        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = LocalSigner::from_pem(&cert, &other, None, None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn a_non_ca_certificate_is_refused_as_a_signing_ca() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::default().self_signed(&key).unwrap();
        let err = LocalSigner::from_pem(&cert.pem(), &key.serialize_pem(), None, None).unwrap_err();
        assert!(err.to_string().contains("CA:TRUE"), "{err}");
    }

    #[test]
    fn an_intermediate_ca_without_a_root_bundle_is_refused_and_with_one_is_chained() {
        let (root_pem, root_key_pem) = generate_root("td").unwrap();
        let root_key = KeyPair::from_pem(&root_key_pem).unwrap();
        let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.use_authority_key_identifier_extension = true;
        let int = p.signed_by(&int_key, &root_issuer).unwrap();
        let err =
            LocalSigner::from_pem(&int.pem(), &int_key.serialize_pem(), None, None).unwrap_err();
        assert!(err.to_string().contains("root bundle"), "{err}");
        let signer =
            LocalSigner::from_pem(&int.pem(), &int_key.serialize_pem(), None, Some(&root_pem))
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = signer
            .sign_now(&request(&key, Duration::from_secs(60)))
            .unwrap();
        assert_eq!(issued.intermediates_pem.len(), 1);
        let mut chain = parse_certs(&issued.leaf_pem).unwrap();
        chain.extend(parse_certs(&issued.intermediates_pem[0]).unwrap());
        let bundle = crate::trust::TrustBundle::from_pem(&root_pem).unwrap();
        bundle
            .validate(
                &chain,
                OffsetDateTime::now_utc(),
                crate::trust::Usage::ServerAndClientAuth,
            )
            .unwrap();
    }

    /// notBefore and notAfter of a PEM leaf.
    fn validity(pem: &str) -> (OffsetDateTime, OffsetDateTime) {
        let der = parse_certs(pem).unwrap().remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        (
            cert.validity().not_before.to_datetime(),
            cert.validity().not_after.to_datetime(),
        )
    }

    /// A CA certificate signed by `parent`, from `tweak`ed CA parameters.
    fn ca_under(
        parent: &Issuer<'static, KeyPair>,
        cn: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        tweak(&mut p);
        let cert = p.signed_by(&key, parent).unwrap();
        (cert.pem(), key)
    }

    /// Loads a signing CA under an intermediate (from `tweak`ed parameters) under a fresh root,
    /// with the intermediate given as `--ca-chain`.
    fn load_with_chain(
        tweak: impl FnOnce(&mut CertificateParams),
        roots: Option<&str>,
    ) -> Result<LocalSigner, SignerError> {
        let (root_pem, root_key_pem) = generate_root("td").unwrap();
        let root_key = KeyPair::from_pem(&root_key_pem).unwrap();
        let root = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let (chain_pem, chain_key) = ca_under(&root, "chain intermediate", tweak);
        let chain_issuer = Issuer::from_ca_cert_pem(&chain_pem, chain_key).unwrap();
        let (ca_pem, ca_key) = ca_under(&chain_issuer, "signing CA", |_| {});
        LocalSigner::from_pem(
            &ca_pem,
            &ca_key.serialize_pem(),
            Some(&chain_pem),
            Some(roots.unwrap_or(&root_pem)),
        )
    }

    #[test]
    fn a_short_leaf_is_backdated_by_a_tenth_of_its_lifetime_and_a_long_one_by_the_allowance() {
        let dir = tempfile::tempdir().unwrap();
        let signer = LocalSigner::load_or_generate(dir.path(), "td").unwrap();
        let key = KeyPair::generate().unwrap();
        for (ttl, allowance, want) in [(20, 60, 2), (600, 60, 60), (3600, 30, 30)] {
            let mut req = request(&key, Duration::from_secs(ttl));
            req.max_backdate = Duration::from_secs(allowance);
            let issued = signer.sign_now(&req).unwrap();
            let (not_before, not_after) = validity(&issued.leaf_pem);
            // X.509 times have whole seconds: the lifetime is the backdate plus the ttl, +-1s.
            let lifetime = (not_after - not_before).whole_seconds();
            let expected = (ttl + want) as i64;
            assert!(
                (expected - 1..=expected + 1).contains(&lifetime),
                "ttl {ttl}s, allowance {allowance}s: {not_before}..{not_after}"
            );
        }
    }

    #[test]
    fn a_ca_chain_is_loaded_only_when_every_intermediate_can_issue_and_the_path_validates() {
        let signer = load_with_chain(|_| {}, None).unwrap();
        assert_eq!(signer.sign_test_leaf().intermediates_pem.len(), 2);
        let not_ca = load_with_chain(|p| p.is_ca = IsCa::ExplicitNoCa, None).unwrap_err();
        assert!(
            matches!(
                not_ca,
                SignerError::CaCertificate {
                    index: 1,
                    source: crate::trust::ValidationError::NotCa
                }
            ),
            "{not_ca}"
        );
        let no_cert_sign = load_with_chain(
            |p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature],
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                no_cert_sign,
                SignerError::CaCertificate {
                    index: 1,
                    source: crate::trust::ValidationError::NoKeyCertSign
                }
            ),
            "{no_cert_sign}"
        );
        let expired = load_with_chain(
            |p| {
                p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
                p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
            },
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                expired,
                SignerError::CaPath(crate::trust::ValidationError::Expired)
            ),
            "{expired}"
        );
        // A root of another name: the intermediate's issuer is not among the roots.
        let (other_root, _) = generate_root("other").unwrap();
        let foreign = load_with_chain(|_| {}, Some(&other_root)).unwrap_err();
        assert!(
            matches!(
                foreign,
                SignerError::CaPath(crate::trust::ValidationError::UnknownIssuer)
            ),
            "{foreign}"
        );
    }
}
