//! The leaf certificate we issue, built from policy alone (never copied from the CSR).

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// How far `not_before` is backdated to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// What kind of leaf to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafProfile {
    /// A workload SVID: empty subject, one critical URI SAN.
    Workload(SpiffeId),
    /// A server certificate (meshid's own serving cert, istiod's): DNS/IP SANs plus an optional
    /// SPIFFE URI, with the first DNS name as the subject CN.
    Server {
        /// DNS names and IP literals.
        hosts: Vec<String>,
        /// Optional SPIFFE ID added as a URI SAN.
        spiffe: Option<SpiffeId>,
    },
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets).
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Keep it positive and 16 bytes long in DER: clear the top bit, set the next one.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Whether `spki_der` (a DER SubjectPublicKeyInfo) holds an RSA key.
pub fn is_rsa_key(spki_der: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).is_ok_and(|(_, spki)| {
        spki.algorithm.algorithm == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    })
}

/// The key usages of a leaf for the key `spki_der`: digitalSignature, plus keyEncipherment
/// for RSA only (RFC 5480 §3 forbids it for ECDSA keys, RFC 8410 §5 for Ed25519).
pub fn key_usages(spki_der: &[u8]) -> Vec<KeyUsagePurpose> {
    if is_rsa_key(spki_der) {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    }
}

/// Certificate parameters for a leaf certifying `spki_der`, valid from `now - BACKDATE` for
/// `ttl` after `now`.
///
/// Always: CA:FALSE, KU from [`key_usages`], EKU serverAuth + clientAuth, a random 128-bit
/// serial, SKI and AKI. For workloads the subject is empty, so the URI SAN is marked critical
/// (RFC 5280 §4.2.1.6).
pub fn leaf_params(
    profile: &LeafProfile,
    spki_der: &[u8],
    now: OffsetDateTime,
    ttl: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = key_usages(spki_der);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    match profile {
        LeafProfile::Workload(id) => {
            if let Ok(uri) = id.to_string().try_into() {
                p.subject_alt_names = vec![SanType::URI(uri)];
            }
        }
        LeafProfile::Server { hosts, spiffe } => {
            for host in hosts {
                if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                    p.subject_alt_names.push(SanType::IpAddress(ip));
                } else if let Ok(dns) = host.clone().try_into() {
                    p.subject_alt_names.push(SanType::DnsName(dns));
                }
            }
            if let Some(uri) = spiffe.as_ref().and_then(|s| s.to_string().try_into().ok()) {
                p.subject_alt_names.push(SanType::URI(uri));
            }
            if let Some(first) = hosts
                .iter()
                .find(|h| h.parse::<std::net::IpAddr>().is_err())
            {
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, first.as_str());
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_random_positive_and_sixteen_bytes() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] & 0x40 != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn a_workload_leaf_is_backdated_and_expires_after_the_ttl() {
        let id = SpiffeId::for_service_account("td", "ns", "sa").unwrap();
        let now = OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let p = leaf_params(
            &LeafProfile::Workload(id),
            &spki,
            now,
            Duration::from_secs(3600),
        );
        assert_eq!(p.not_before, now - BACKDATE);
        assert_eq!(p.not_after, now + Duration::from_secs(3600));
        assert!(p.distinguished_name.iter().next().is_none());
        assert_eq!(p.subject_alt_names.len(), 1);
    }

    #[test]
    fn only_rsa_leaves_get_key_encipherment() {
        let rsa =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let spki = |k: &rcgen::KeyPair| rcgen::PublicKeyData::subject_public_key_info(k);
        assert_eq!(
            key_usages(&spki(&rsa)),
            [
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment
            ]
        );
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            assert_eq!(key_usages(&spki(&key)), [KeyUsagePurpose::DigitalSignature]);
        }
    }
}
