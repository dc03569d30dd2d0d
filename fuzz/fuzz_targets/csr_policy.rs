//! The server's CSR policy (`identity::check_csr`) against the caller's identity
//! `spiffe://cluster.local/ns/default/sa/web`.
//!
//! The first input byte picks how the rest is read:
//! - 0: the `csr` field's text, as a client sends it;
//! - 1: DER, wrapped in one well-formed PEM block (so mutations hit the PKCS#10 structure, not
//!   the base64; the committed corpus holds real CSRs of every key type);
//! - 2: a CSR built and signed here from fuzzed contents (SANs, extensions, basic
//!   constraints, key type), so the signature verifies and the extension policy is reached;
//!   its verdict must match a model of the policy.
//!
//! Whatever is accepted is checked independently: a self-signed PKCS#10 whose only extensions are
//! one subjectAltName with exactly the caller's URI and at most a basicConstraints CA:false
//! without a path length, and whose returned public key is the CSR's.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::{CsrRejection, KeyKind, SpiffeId, check_csr};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// `identity::check_csr`'s limit on the PEM it looks at (`CsrRejection::TooLarge` above it).
const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

static ME: LazyLock<SpiffeId> = LazyLock::new(|| {
    SpiffeId::for_service_account("cluster.local", "default", "web").expect("identity")
});

/// Keys for built CSRs, generated once per process: signing is most of an execution's cost,
/// so RSA (about 1 ms a signature) is left to the corpus of real CSRs (mode 1).
static KEYS: LazyLock<[KeyPair; 3]> = LazyLock::new(|| {
    [
        KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519"),
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256"),
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384"),
    ]
});

#[derive(Debug, Arbitrary)]
enum San<'a> {
    Me,
    /// The caller's URI with something appended (a prefix-match bug would accept it).
    MeWith(&'a str),
    Uri(&'a str),
    Dns(&'a str),
    Ip([u8; 4]),
    Email(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Ext<'a> {
    /// Raw content under the subjectAltName OID.
    San(&'a [u8]),
    /// Raw content under the basicConstraints OID.
    BasicConstraints(&'a [u8]),
    /// Raw content under the keyUsage OID.
    KeyUsage(&'a [u8]),
    /// Any other OID.
    Other { arcs: Vec<u16>, content: &'a [u8] },
}

#[derive(Debug, Arbitrary)]
enum Ca {
    /// No basicConstraints.
    Absent,
    /// CA:FALSE.
    No,
    /// CA:TRUE, with a path length or without.
    Yes(Option<u8>),
}

#[derive(Debug, Arbitrary)]
struct Spec<'a> {
    /// Index into `KEYS`: 0 Ed25519 most of the time, P-384 (the slowest) rarely.
    key: u8,
    common_name: Option<&'a str>,
    sans: Vec<San<'a>>,
    ca: Ca,
    key_usage: bool,
    server_auth: bool,
    extensions: Vec<Ext<'a>>,
}

fn wrap_der(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

/// Checks an accepted CSR against the policy with x509-parser directly.
fn assert_within_policy(pem: &str, csr_der: &[u8], spki_der: &[u8], key: KeyKind) {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .unwrap_or_else(|e| panic!("accepted a CSR that does not parse ({e}): {pem:?}"));
    assert!(rest.is_empty(), "accepted trailing bytes: {pem:?}");
    csr.verify_signature()
        .unwrap_or_else(|e| panic!("accepted a CSR whose signature fails ({e}): {pem:?}"));
    let spki = &csr.certification_request_info.subject_pki;
    assert_eq!(spki.raw, spki_der, "returned a key other than the CSR's");
    let alg = &spki.algorithm.algorithm;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match key {
        KeyKind::Rsa { bits } => {
            assert_eq!(*alg, OID_PKCS1_RSAENCRYPTION);
            assert!((2048..=8192).contains(&bits), "{bits}");
            let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
                panic!("accepted an RSA key that does not parse: {pem:?}");
            };
            assert_eq!(rsa.try_exponent().ok(), Some(65537), "{pem:?}");
        }
        KeyKind::EcdsaP256 => {
            assert!(*alg == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256))
        }
        KeyKind::EcdsaP384 => {
            assert!(*alg == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_NIST_EC_P384))
        }
        KeyKind::Ed25519 => assert_eq!(*alg, OID_SIG_ED25519),
    }
    let mut sans = 0;
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    sans += 1;
                    let me = ME.to_string();
                    assert!(
                        matches!(san.general_names.as_slice(), [GeneralName::URI(u)] if *u == me),
                        "accepted SANs {:?}: {pem:?}",
                        san.general_names
                    );
                }
                ParsedExtension::BasicConstraints(bc) => {
                    assert!(
                        !bc.ca && bc.path_len_constraint.is_none(),
                        "accepted {bc:?}: {pem:?}"
                    );
                }
                other => panic!("accepted extension {} ({other:?}): {pem:?}", ext.oid),
            }
        }
    }
    assert_eq!(
        sans, 1,
        "accepted {sans} subjectAltName extensions: {pem:?}"
    );
}

fn check(pem: &str) -> Result<(), CsrRejection> {
    let v = check_csr(pem, &ME)?;
    assert_within_policy(pem, &v.csr_der, &v.spki_der, v.key);
    Ok(())
}

fn built(spec: Spec<'_>) {
    let me = ME.to_string();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = spec.common_name {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    // The model: (allowed SANs, number of URI SANs equal to ours).
    let mut allowed = true;
    let mut uris = Vec::new();
    for san in &spec.sans {
        let entry = match san {
            San::Me => Some((SanType::URI(me.as_str().try_into().expect("ASCII")), true)),
            San::MeWith(s) => format!("{me}{s}")
                .as_str()
                .try_into()
                .ok()
                .map(|u| (SanType::URI(u), true)),
            San::Uri(s) => (*s).try_into().ok().map(|u| (SanType::URI(u), true)),
            San::Dns(s) => (*s).try_into().ok().map(|d| (SanType::DnsName(d), false)),
            San::Ip(a) => Some((SanType::IpAddress(IpAddr::V4(Ipv4Addr::from(*a))), false)),
            San::Email(s) => (*s)
                .try_into()
                .ok()
                .map(|e| (SanType::Rfc822Name(e), false)),
        };
        let Some((name, is_uri)) = entry else {
            continue;
        };
        if let SanType::URI(u) = &name {
            uris.push(u.as_str().to_owned());
        }
        allowed &= is_uri;
        params.subject_alt_names.push(name);
    }
    params.is_ca = match spec.ca {
        Ca::Absent => IsCa::NoCa,
        Ca::No => IsCa::ExplicitNoCa,
        Ca::Yes(None) => IsCa::Ca(BasicConstraints::Unconstrained),
        Ca::Yes(Some(n)) => IsCa::Ca(BasicConstraints::Constrained(n)),
    };
    if spec.key_usage {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    if spec.server_auth {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    }
    let custom = !spec.extensions.is_empty();
    for ext in spec.extensions {
        let (oid, content): (Vec<u64>, &[u8]) = match ext {
            Ext::San(c) => (vec![2, 5, 29, 17], c),
            Ext::BasicConstraints(c) => (vec![2, 5, 29, 19], c),
            Ext::KeyUsage(c) => (vec![2, 5, 29, 15], c),
            Ext::Other { arcs, content } => {
                let mut oid = vec![u64::from(arcs.first().copied().unwrap_or(1) % 3)];
                oid.push(u64::from(arcs.get(1).copied().unwrap_or(2) % 40));
                oid.extend(arcs.iter().skip(2).map(|a| u64::from(*a)));
                (oid, content)
            }
        };
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(&oid, content.to_vec()));
    }
    let key = &KEYS[match spec.key % 16 {
        0..=9 => 0,
        10..=14 => 1,
        _ => 2,
    }];
    let Ok(pem) = params.serialize_request(key).and_then(|csr| csr.pem()) else {
        return;
    };
    let got = check(&pem);
    if pem.len() > MAX_CSR_PEM_BYTES {
        // Size is checked before anything else (found by the campaign: hundreds of SANs).
        assert_eq!(
            got.err(),
            Some(CsrRejection::TooLarge),
            "{} bytes",
            pem.len()
        );
        return;
    }
    if custom {
        // Raw extension contents: only the independent check of what was accepted applies.
        return;
    }
    let ca_ok = matches!(params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa);
    let expected_ok =
        allowed && ca_ok && !spec.key_usage && !spec.server_auth && uris == [me.clone()];
    assert_eq!(got.is_ok(), expected_ok, "{got:?} for {params:?}");
    if let Err(reason) = got {
        let want = if !ca_ok {
            matches!(
                reason,
                CsrRejection::CaRequested
                    | CsrRejection::ForbiddenSan { .. }
                    | CsrRejection::ForbiddenExtension { .. }
            )
        } else if !allowed {
            matches!(
                reason,
                CsrRejection::ForbiddenSan { .. } | CsrRejection::ForbiddenExtension { .. }
            )
        } else if spec.key_usage || spec.server_auth {
            matches!(reason, CsrRejection::ForbiddenExtension { .. })
        } else {
            match uris.as_slice() {
                [] => reason == CsrRejection::MissingUriSan,
                [_] => matches!(reason, CsrRejection::IdentityMismatch { .. }),
                _ => reason == CsrRejection::MultipleUriSans,
            }
        };
        assert!(want, "{reason:?} is not the reason for {params:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = check(text);
            }
        }
        1 => {
            let _ = check(&wrap_der(rest));
        }
        _ => {
            if let Ok(spec) = Spec::arbitrary_take_rest(Unstructured::new(rest)) {
                built(spec);
            }
        }
    }
});
