//! Checks a leaf PCA returned against the `IssueCertificate` request meshid sent, before it is
//! served: PCA (or anything answering in its place) must have issued exactly what was asked.
//!
//! Checked: the subject (exactly the attributes sent), the subjectAltName (byte for byte the
//! DER sent, with the criticality sent), keyUsage and extendedKeyUsage (exactly the values
//! sent), basicConstraints CA:FALSE (the template's), the public key (the one policy approved)
//! and that no other extension is present than the identifiers and CRL/AIA pointers PCA adds
//! from the CA's configuration.

use base64::Engine;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_PKIX_AUTHORITY_INFO_ACCESS, OID_X509_COMMON_NAME, OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_CRL_DISTRIBUTION_POINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::{FromDer, X509Certificate, X509Extension};

use super::api::{ApiPassthrough, ExtendedKeyUsage};
use super::request::SAN_OID;

/// How a returned leaf differs from what meshid asked PCA for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeafMismatch {
    /// The certificate could not be parsed.
    #[error("unparseable certificate: {0}")]
    Unparseable(String),
    /// The subject is not the one sent in `ApiPassthrough` (e.g. the CSR's was copied).
    #[error("subject is {got:?}, asked for {want:?}")]
    Subject {
        /// The subject found.
        got: String,
        /// The subject asked for.
        want: String,
    },
    /// The subjectAltName is missing, repeated, or not the names sent.
    #[error("subjectAltName differs from the one asked for")]
    SubjectAltName,
    /// The subjectAltName's criticality is not the one sent.
    #[error("subjectAltName critical={got}, asked for critical={want}")]
    SubjectAltNameCriticality {
        /// Found.
        got: bool,
        /// Asked for.
        want: bool,
    },
    /// keyUsage is missing or not exactly the bits sent.
    #[error("keyUsage is {0}, not what was asked for")]
    KeyUsage(String),
    /// extendedKeyUsage is missing or not exactly the purposes sent.
    #[error("extendedKeyUsage differs from the one asked for")]
    ExtendedKeyUsage,
    /// basicConstraints is missing or says CA:TRUE.
    #[error("basicConstraints is not CA:FALSE")]
    BasicConstraints,
    /// The certificate certifies another key than the one policy approved.
    #[error("the certificate certifies another key")]
    PublicKey,
    /// An extension meshid did not ask for (or one present twice).
    #[error("unexpected extension {oid} (critical={critical})")]
    UnexpectedExtension {
        /// Its dotted OID.
        oid: String,
        /// Its criticality.
        critical: bool,
    },
}

/// The subject as `O=..., CN=...` text, attributes in certificate order.
fn subject_text(attrs: &[(String, String)]) -> String {
    attrs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks `leaf_der` against `asked` (the `ApiPassthrough` sent) and `spki_der` (the approved
/// key). Returns the first difference found.
pub fn check_leaf(
    leaf_der: &[u8],
    asked: &ApiPassthrough,
    spki_der: &[u8],
) -> Result<(), LeafMismatch> {
    let (_, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|e| LeafMismatch::Unparseable(e.to_string()))?;
    check_subject(&cert, asked)?;
    if cert.public_key().raw != spki_der {
        return Err(LeafMismatch::PublicKey);
    }
    check_extensions(&cert, asked)
}

/// The subject holds exactly the attributes sent, in any order.
fn check_subject(cert: &X509Certificate<'_>, asked: &ApiPassthrough) -> Result<(), LeafMismatch> {
    let mut want = vec![("O".to_owned(), asked.subject.organization.clone())];
    if let Some(cn) = &asked.subject.common_name {
        want.push(("CN".to_owned(), cn.clone()));
    }
    let mut got = Vec::new();
    for attr in cert.subject().iter_attributes() {
        let name = if *attr.attr_type() == OID_X509_ORGANIZATION_NAME {
            "O".to_owned()
        } else if *attr.attr_type() == OID_X509_COMMON_NAME {
            "CN".to_owned()
        } else {
            attr.attr_type().to_id_string()
        };
        got.push((name, attr.as_str().unwrap_or("<not a string>").to_owned()));
    }
    let (mut got_sorted, mut want_sorted) = (got.clone(), want.clone());
    got_sorted.sort();
    want_sorted.sort();
    if got_sorted != want_sorted {
        return Err(LeafMismatch::Subject {
            got: subject_text(&got),
            want: subject_text(&want),
        });
    }
    Ok(())
}

/// The extensions asked for are present, each once and as sent; the others are only the
/// non-critical identifiers and pointers PCA adds.
fn check_extensions(
    cert: &X509Certificate<'_>,
    asked: &ApiPassthrough,
) -> Result<(), LeafMismatch> {
    let asked_san = asked
        .custom_extensions
        .iter()
        .find(|c| c.object_identifier == SAN_OID)
        .ok_or(LeafMismatch::SubjectAltName)?;
    let san_der = base64::engine::general_purpose::STANDARD
        .decode(&asked_san.value_base64)
        .map_err(|_| LeafMismatch::SubjectAltName)?;
    let (mut san, mut ku, mut eku, mut bc) = (false, false, false, false);
    let mut seen = Vec::new();
    for ext in cert.extensions() {
        let unexpected = || LeafMismatch::UnexpectedExtension {
            oid: ext.oid.to_id_string(),
            critical: ext.critical,
        };
        if seen.contains(&&ext.oid) {
            return Err(unexpected());
        }
        seen.push(&ext.oid);
        if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
            if ext.value != san_der.as_slice() {
                return Err(LeafMismatch::SubjectAltName);
            }
            if ext.critical != asked_san.critical {
                return Err(LeafMismatch::SubjectAltNameCriticality {
                    got: ext.critical,
                    want: asked_san.critical,
                });
            }
            san = true;
        } else if ext.oid == OID_X509_EXT_KEY_USAGE {
            ku = check_key_usage(ext, asked)?;
        } else if ext.oid == OID_X509_EXT_EXTENDED_KEY_USAGE {
            eku = check_extended_key_usage(ext, asked)?;
        } else if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(b) if !b.ca => bc = true,
                _ => return Err(LeafMismatch::BasicConstraints),
            }
        } else if !is_added_by_pca(ext) {
            return Err(unexpected());
        }
    }
    if !san {
        return Err(LeafMismatch::SubjectAltName);
    }
    if !ku {
        return Err(LeafMismatch::KeyUsage("absent".into()));
    }
    if !eku && !asked.extended_key_usage.is_empty() {
        return Err(LeafMismatch::ExtendedKeyUsage);
    }
    if !bc {
        return Err(LeafMismatch::BasicConstraints);
    }
    Ok(())
}

/// A non-critical key identifier or CRL/AIA pointer, which PCA adds from the CA's configuration.
fn is_added_by_pca(ext: &X509Extension<'_>) -> bool {
    let added = ext.oid == OID_X509_EXT_SUBJECT_KEY_IDENTIFIER
        || ext.oid == OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER
        || ext.oid == OID_X509_EXT_CRL_DISTRIBUTION_POINTS
        || ext.oid == OID_PKIX_AUTHORITY_INFO_ACCESS;
    added && !ext.critical
}

/// keyUsage has exactly the bits sent.
fn check_key_usage(ext: &X509Extension<'_>, asked: &ApiPassthrough) -> Result<bool, LeafMismatch> {
    let ParsedExtension::KeyUsage(k) = ext.parsed_extension() else {
        return Err(LeafMismatch::KeyUsage("unparseable".into()));
    };
    let want_ku = (
        asked.key_usage.digital_signature,
        asked.key_usage.key_encipherment,
    );
    let other_bits = k.flags & !0b101;
    if (k.digital_signature(), k.key_encipherment()) != want_ku || other_bits != 0 {
        return Err(LeafMismatch::KeyUsage(k.to_string()));
    }
    Ok(true)
}

/// extendedKeyUsage has exactly the purposes sent.
fn check_extended_key_usage(
    ext: &X509Extension<'_>,
    asked: &ApiPassthrough,
) -> Result<bool, LeafMismatch> {
    let ParsedExtension::ExtendedKeyUsage(e) = ext.parsed_extension() else {
        return Err(LeafMismatch::ExtendedKeyUsage);
    };
    let want_server = asked
        .extended_key_usage
        .contains(&ExtendedKeyUsage::ServerAuth);
    let want_client = asked
        .extended_key_usage
        .contains(&ExtendedKeyUsage::ClientAuth);
    let others = e.any
        || e.code_signing
        || e.email_protection
        || e.time_stamping
        || e.ocsp_signing
        || !e.other.is_empty();
    if e.server_auth != want_server || e.client_auth != want_client || others {
        return Err(LeafMismatch::ExtendedKeyUsage);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{LeafProfile, SpiffeId};
    use crate::signer::aws_pca::request::leaf_passthrough;
    use rcgen::{
        CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    };

    fn asked() -> ApiPassthrough {
        let id = SpiffeId::for_service_account("td", "ns", "sa").unwrap();
        // The leaves below certify ECDSA keys: no keyEncipherment.
        leaf_passthrough(&LeafProfile::Workload(id), "td", false)
    }

    /// What PCA issues for `asked()`, changed by `change`; returns (leaf DER, approved SPKI).
    fn leaf(change: impl FnOnce(&mut CertificateParams)) -> (Vec<u8>, Vec<u8>) {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca, KeyPair::generate().unwrap());
        let key = KeyPair::generate().unwrap();
        let asked = asked();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(
            DnType::OrganizationName,
            asked.subject.organization.as_str(),
        );
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let san = &asked.custom_extensions[0];
        let mut ext = CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            base64::engine::general_purpose::STANDARD
                .decode(&san.value_base64)
                .unwrap(),
        );
        ext.set_criticality(san.critical);
        p.custom_extensions.push(ext);
        change(&mut p);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.der().to_vec(), key.subject_public_key_info())
    }

    fn check(change: impl FnOnce(&mut CertificateParams)) -> Result<(), LeafMismatch> {
        let (der, spki) = leaf(change);
        check_leaf(&der, &asked(), &spki)
    }

    #[test]
    fn the_leaf_that_was_asked_for_passes() {
        check(|_| {}).unwrap();
    }

    #[test]
    fn a_subject_copied_from_the_csr_is_refused() {
        let err = check(|p| {
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(DnType::CommonName, "internal-db.corp");
        })
        .unwrap_err();
        assert_eq!(
            err,
            LeafMismatch::Subject {
                got: "CN=internal-db.corp".into(),
                want: "O=td".into()
            }
        );
        // An extra CN next to the right O is refused too.
        let err = check(|p| p.distinguished_name.push(DnType::CommonName, "x")).unwrap_err();
        assert!(matches!(err, LeafMismatch::Subject { .. }), "{err}");
    }

    #[test]
    fn a_san_with_other_names_or_another_criticality_is_refused() {
        let err = check(|p| p.custom_extensions[0].set_criticality(false)).unwrap_err();
        assert_eq!(
            err,
            LeafMismatch::SubjectAltNameCriticality {
                got: false,
                want: true
            }
        );
        let err = check(|p| {
            p.custom_extensions.clear();
            p.subject_alt_names = vec![rcgen::SanType::DnsName(
                "internal-db.corp".try_into().unwrap(),
            )];
        })
        .unwrap_err();
        assert_eq!(err, LeafMismatch::SubjectAltName);
        let err = check(|p| p.custom_extensions.clear()).unwrap_err();
        assert_eq!(err, LeafMismatch::SubjectAltName);
    }

    #[test]
    fn other_key_usages_are_refused() {
        let err = check(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)).unwrap_err();
        assert!(matches!(err, LeafMismatch::KeyUsage(_)), "{err}");
        let err = check(|p| p.key_usages.clear()).unwrap_err();
        assert!(matches!(err, LeafMismatch::KeyUsage(_)), "{err}");
        // keyEncipherment on a leaf for an ECDSA key (RFC 5480) is not what was asked.
        let err = check(|p| p.key_usages.push(KeyUsagePurpose::KeyEncipherment)).unwrap_err();
        assert!(matches!(err, LeafMismatch::KeyUsage(_)), "{err}");
        let err = check(|p| {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::CodeSigning)
        })
        .unwrap_err();
        assert_eq!(err, LeafMismatch::ExtendedKeyUsage);
        let err = check(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth])
            .unwrap_err();
        assert_eq!(err, LeafMismatch::ExtendedKeyUsage);
    }

    #[test]
    fn a_ca_or_a_missing_basic_constraints_is_refused() {
        let err =
            check(|p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0))).unwrap_err();
        assert_eq!(err, LeafMismatch::BasicConstraints);
        let err = check(|p| p.is_ca = IsCa::NoCa).unwrap_err();
        assert_eq!(err, LeafMismatch::BasicConstraints);
    }

    #[test]
    fn another_key_or_an_unexpected_extension_is_refused() {
        let (der, _) = leaf(|_| {});
        let other = KeyPair::generate().unwrap().subject_public_key_info();
        assert_eq!(
            check_leaf(&der, &asked(), &other),
            Err(LeafMismatch::PublicKey)
        );
        let err = check(|p| {
            let mut ext = CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![0x05, 0x00]);
            ext.set_criticality(true);
            p.custom_extensions.push(ext);
        })
        .unwrap_err();
        assert_eq!(
            err,
            LeafMismatch::UnexpectedExtension {
                oid: "1.2.3.4".into(),
                critical: true
            }
        );
    }
}
