//! The leaf certificate we issue, built from policy alone (never copied from the CSR).

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// Default clock-skew allowance: the most `not_before` is backdated (`--max-backdate`).
pub const DEFAULT_MAX_BACKDATE: Duration = Duration::from_secs(60);
/// Default shortest lifetime issued (`--min-ttl`): shorter requests are raised to it.
#[cfg(feature = "server")]
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(600);
/// The lowest `--min-ttl` the server accepts, and the shortest `--cert-ttl` the agent asks for.
pub const MIN_TTL_FLOOR: Duration = Duration::from_secs(10);
/// The backdate is at most this fraction of the lifetime (one tenth), see [`backdate`].
pub const BACKDATE_LIFETIME_DIVISOR: u32 = 10;

/// How far before issuance a leaf living `ttl` after issuance starts: the smaller of the
/// clock-skew allowance and a tenth of `ttl`.
///
/// Clients (istio-agent, ztunnel, `meshid agent`) renew at the midpoint of
/// `notBefore..notAfter`, which is `(ttl - backdate) / 2` after issuance. A fixed backdate
/// as long as the lifetime puts that midpoint at or before issuance, so the client renews the
/// moment a certificate arrives, in a loop. Bounded by a tenth of the lifetime, the midpoint
/// is always at least `0.45 * ttl` after issuance, whatever the lifetime.
pub fn backdate(ttl: Duration, skew_allowance: Duration) -> Duration {
    skew_allowance.min(ttl / BACKDATE_LIFETIME_DIVISOR)
}

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

/// Certificate parameters for a leaf certifying `spki_der`, valid from
/// `now - backdate(ttl, skew_allowance)` (see [`backdate`]) until `ttl` after `now`.
///
/// Always: CA:FALSE, KU from [`key_usages`], EKU serverAuth + clientAuth, a random 128-bit
/// serial, SKI and AKI. For workloads the subject is empty, so the URI SAN is marked critical
/// (RFC 5280 §4.2.1.6).
pub fn leaf_params(
    profile: &LeafProfile,
    spki_der: &[u8],
    now: OffsetDateTime,
    ttl: Duration,
    skew_allowance: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.not_before = now - backdate(ttl, skew_allowance);
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
            DEFAULT_MAX_BACKDATE,
        );
        assert_eq!(p.not_before, now - DEFAULT_MAX_BACKDATE);
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

    #[test]
    fn the_backdate_is_the_skew_allowance_for_long_lifetimes_and_a_tenth_for_short_ones() {
        let skew = Duration::from_secs(60);
        assert_eq!(backdate(Duration::from_secs(86_400), skew), skew);
        assert_eq!(backdate(Duration::from_secs(600), skew), skew);
        assert_eq!(
            backdate(Duration::from_secs(120), skew),
            Duration::from_secs(12)
        );
        assert_eq!(
            backdate(Duration::from_secs(20), skew),
            Duration::from_secs(2)
        );
        assert_eq!(backdate(Duration::ZERO, skew), Duration::ZERO);
        assert_eq!(
            backdate(Duration::from_secs(3600), Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn the_midpoint_of_every_leaf_lies_well_after_its_issuance() {
        // Where ztunnel, istio-agent and meshid's agent renew: notBefore + (notAfter - notBefore) / 2.
        let id = SpiffeId::for_service_account("td", "ns", "sa").unwrap();
        let now = OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        for secs in [1u64, 10, 20, 60, 120, 599, 600, 3600, 86_400] {
            for skew in [Duration::from_secs(60), Duration::from_secs(3600)] {
                let ttl = Duration::from_secs(secs);
                let p = leaf_params(&LeafProfile::Workload(id.clone()), &spki, now, ttl, skew);
                let midpoint = p.not_before + (p.not_after - p.not_before) / 2;
                let after_issuance = midpoint - now;
                assert!(
                    after_issuance >= ttl * 45 / 100,
                    "ttl {secs}s, skew {skew:?}: renewal due {after_issuance} after issuance"
                );
            }
        }
    }
}
