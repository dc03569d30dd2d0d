//! Unit tests for the trust module: path validation on chains built with rcgen at run time,
//! the bundle, and the issuer-path cache.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::*;
use crate::identity::random_serial;

/// A CA made here: its certificate and what signs with it.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A CA certificate's parameters: CA:TRUE with `constraints`, keyCertSign + cRLSign, valid an
/// hour either side of now.
fn ca_params(cn: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(random_serial());
    p.not_before = now() - Duration::from_secs(3600);
    p.not_after = now() + Duration::from_secs(3600);
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A workload leaf's parameters: CA:FALSE, serverAuth + clientAuth, valid for ten minutes.
fn leaf_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.serial_number = Some(random_serial());
    p.not_before = now() - Duration::from_secs(60);
    p.not_after = now() + Duration::from_secs(600);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let p = ca_params(cn, BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

/// A CA certificate from `p`, signed by `parent`.
fn sub_ca(p: CertificateParams, parent: &Ca) -> Ca {
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

fn leaf(p: CertificateParams, parent: &Ca) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    p.signed_by(&key, &parent.issuer).unwrap().der().clone()
}

fn bundle(roots: &[&Ca]) -> TrustBundle {
    TrustBundle::from_ders(roots.iter().map(|r| r.der.clone()).collect()).unwrap()
}

fn critical(oid: &[u64]) -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(oid, vec![0x05, 0x00]);
    ext.set_criticality(true);
    ext
}

#[test]
fn a_leaf_through_an_intermediate_is_accepted_and_the_path_is_reported() {
    let r = root("root");
    let i = sub_ca(
        ca_params("intermediate", BasicConstraints::Constrained(0)),
        &r,
    );
    let l = leaf(leaf_params(), &i);
    let b = bundle(&[&r]);
    for usage in [
        Usage::ServerAuth,
        Usage::ClientAuth,
        Usage::ServerAndClientAuth,
    ] {
        assert_eq!(
            b.validate(&[l.clone(), i.der.clone()], now(), usage),
            Ok(ValidatedPath {
                root: 0,
                intermediates: 1
            })
        );
    }
    // The same through the free function, and with the root included at the end.
    assert_eq!(
        validate_chain(
            &[l, i.der.clone(), r.der.clone()],
            b.roots(),
            now(),
            Usage::ServerAndClientAuth
        )
        .map(|p| p.intermediates),
        Ok(1)
    );
}

#[test]
fn a_bundle_with_two_roots_accepts_leaves_from_either_and_names_the_root() {
    let (a, b) = (root("root a"), root("root b"));
    let both = bundle(&[&a, &b]);
    assert_eq!(both.roots().len(), 2);
    let from_a = leaf(leaf_params(), &a);
    let from_b = leaf(leaf_params(), &b);
    let usage = Usage::ServerAndClientAuth;
    // The bundle keeps its roots in DER order: `root` indexes that order.
    let index_of = |ca: &Ca| both.roots().iter().position(|r| *r == ca.der).unwrap();
    assert_eq!(
        both.validate(&[from_a], now(), usage).unwrap().root,
        index_of(&a)
    );
    assert_eq!(
        both.validate(std::slice::from_ref(&from_b), now(), usage)
            .unwrap()
            .root,
        index_of(&b)
    );
    assert_eq!(
        bundle(&[&a]).validate(&[from_b], now(), usage),
        Err(ValidationError::UnknownIssuer)
    );
}

#[test]
fn an_intermediate_that_is_not_a_ca_is_refused() {
    let r = root("root");
    let mut p = ca_params("not a CA", BasicConstraints::Unconstrained);
    p.is_ca = IsCa::ExplicitNoCa;
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        bundle(&[&r]).validate(&[l, i.der.clone()], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::NotCa)
    );
    assert_eq!(check_ca_certificate(&i.der), Err(ValidationError::NotCa));
}

#[test]
fn an_intermediate_without_basic_constraints_is_refused() {
    let r = root("root");
    let mut p = ca_params("no constraints", BasicConstraints::Unconstrained);
    p.is_ca = IsCa::NoCa;
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        bundle(&[&r]).validate(&[l, i.der.clone()], now(), Usage::ServerAuth),
        Err(ValidationError::NotCa)
    );
}

#[test]
fn a_leaf_that_is_a_ca_is_refused() {
    let r = root("root");
    let mut p = leaf_params();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let l = leaf(p, &r);
    assert_eq!(
        bundle(&[&r]).validate(&[l], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::CaAsLeaf)
    );
}

#[test]
fn a_path_longer_than_an_issuers_path_length_is_refused() {
    let r = root("root");
    let i1 = sub_ca(ca_params("pathlen 0", BasicConstraints::Constrained(0)), &r);
    let i2 = sub_ca(
        ca_params("below pathlen 0", BasicConstraints::Constrained(0)),
        &i1,
    );
    let l = leaf(leaf_params(), &i2);
    assert_eq!(
        bundle(&[&r]).validate(
            &[l, i2.der.clone(), i1.der.clone()],
            now(),
            Usage::ServerAndClientAuth
        ),
        Err(ValidationError::PathLenExceeded)
    );
    // The same depth under a pathlen-1 intermediate is fine.
    let i1 = sub_ca(ca_params("pathlen 1", BasicConstraints::Constrained(1)), &r);
    let i2 = sub_ca(
        ca_params("below pathlen 1", BasicConstraints::Constrained(0)),
        &i1,
    );
    let l = leaf(leaf_params(), &i2);
    assert!(
        bundle(&[&r])
            .validate(
                &[l, i2.der.clone(), i1.der.clone()],
                now(),
                Usage::ServerAndClientAuth
            )
            .is_ok()
    );
}

#[test]
fn a_leaf_whose_extended_key_usage_does_not_allow_the_usage_is_refused() {
    let r = root("root");
    let b = bundle(&[&r]);
    let mut code_signing = leaf_params();
    code_signing.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let l = leaf(code_signing, &r);
    assert_eq!(
        b.validate(std::slice::from_ref(&l), now(), Usage::ServerAuth),
        Err(ValidationError::WrongUsage {
            usage: Usage::ServerAuth
        })
    );
    let mut server_only = leaf_params();
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let l = leaf(server_only, &r);
    assert!(
        b.validate(std::slice::from_ref(&l), now(), Usage::ServerAuth)
            .is_ok()
    );
    assert_eq!(
        b.validate(std::slice::from_ref(&l), now(), Usage::ServerAndClientAuth),
        Err(ValidationError::WrongUsage {
            usage: Usage::ServerAndClientAuth
        })
    );
    // No extendedKeyUsage at all allows every usage.
    let mut none = leaf_params();
    none.extended_key_usages = vec![];
    assert!(
        b.validate(&[leaf(none, &r)], now(), Usage::ServerAndClientAuth)
            .is_ok()
    );
}

#[test]
fn an_intermediate_whose_extended_key_usage_excludes_the_usage_is_refused() {
    let r = root("root");
    let mut p = ca_params("server-only CA", BasicConstraints::Unconstrained);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        bundle(&[&r]).validate(&[l, i.der.clone()], now(), Usage::ClientAuth),
        Err(ValidationError::WrongUsage {
            usage: Usage::ClientAuth
        })
    );
}

#[test]
fn an_expired_intermediate_is_refused() {
    let r = root("root");
    let mut p = ca_params("expired", BasicConstraints::Unconstrained);
    p.not_before = now() - Duration::from_secs(7200);
    p.not_after = now() - Duration::from_secs(60);
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        bundle(&[&r]).validate(&[l, i.der.clone()], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::Expired)
    );
}

#[test]
fn a_leaf_is_refused_outside_its_validity() {
    let r = root("root");
    let l = leaf(leaf_params(), &r);
    let b = bundle(&[&r]);
    let usage = Usage::ServerAndClientAuth;
    assert_eq!(
        b.validate(
            std::slice::from_ref(&l),
            now() + Duration::from_secs(1200),
            usage
        ),
        Err(ValidationError::Expired)
    );
    assert_eq!(
        b.validate(
            std::slice::from_ref(&l),
            now() - Duration::from_secs(600),
            usage
        ),
        Err(ValidationError::NotYetValid)
    );
}

#[test]
fn an_unknown_critical_extension_is_refused_on_a_leaf_and_on_an_intermediate() {
    let r = root("root");
    let b = bundle(&[&r]);
    let mut p = leaf_params();
    p.custom_extensions = vec![critical(&[1, 3, 6, 1, 4, 1, 55555, 1])];
    let l = leaf(p, &r);
    assert_eq!(
        b.validate(&[l], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::UnknownCriticalExtension)
    );
    let mut p = ca_params("odd CA", BasicConstraints::Unconstrained);
    p.custom_extensions = vec![critical(&[1, 3, 6, 1, 4, 1, 55555, 2])];
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        b.validate(&[l, i.der.clone()], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::UnknownCriticalExtension)
    );
    // The same extension, not critical, is ignored.
    let mut p = leaf_params();
    let mut ext = critical(&[1, 3, 6, 1, 4, 1, 55555, 1]);
    ext.set_criticality(false);
    p.custom_extensions = vec![ext];
    assert!(b.validate(&[leaf(p, &r)], now(), Usage::ServerAuth).is_ok());
}

#[test]
fn an_intermediate_whose_key_usage_lacks_key_cert_sign_is_refused() {
    let r = root("root");
    let mut p = ca_params("no keyCertSign", BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let i = sub_ca(p, &r);
    let l = leaf(leaf_params(), &i);
    assert_eq!(
        bundle(&[&r]).validate(&[l, i.der.clone()], now(), Usage::ServerAndClientAuth),
        Err(ValidationError::NoKeyCertSign)
    );
    assert_eq!(
        check_ca_certificate(&i.der),
        Err(ValidationError::NoKeyCertSign)
    );
    // A CA certificate with no keyUsage at all passes path validation (as in BoringSSL), but
    // not the stricter check for CA material meshid is given to sign with.
    let mut p = ca_params("no keyUsage", BasicConstraints::Unconstrained);
    p.key_usages = vec![];
    let i = sub_ca(p, &r);
    assert_eq!(
        check_ca_certificate(&i.der),
        Err(ValidationError::NoKeyCertSign)
    );
    let l = leaf(leaf_params(), &i);
    assert!(
        bundle(&[&r])
            .validate(&[l, i.der.clone()], now(), Usage::ServerAuth)
            .is_ok()
    );
}

#[test]
fn a_tampered_signature_and_garbage_are_refused() {
    let r = root("root");
    let b = bundle(&[&r]);
    let mut bytes = leaf(leaf_params(), &r).to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    assert_eq!(
        b.validate(&[CertificateDer::from(bytes)], now(), Usage::ServerAuth),
        Err(ValidationError::BadSignature)
    );
    let l = leaf(leaf_params(), &r);
    assert_eq!(
        b.validate(
            &[l, CertificateDer::from(vec![0x30, 0x00])],
            now(),
            Usage::ServerAuth
        ),
        Err(ValidationError::Malformed { index: 1 })
    );
    assert_eq!(
        b.validate(&[], now(), Usage::ServerAuth),
        Err(ValidationError::Empty)
    );
}

#[test]
fn duplicate_roots_are_dropped_and_garbage_is_refused() {
    let r = root("root");
    let b = TrustBundle::from_ders(vec![r.der.clone(), r.der.clone()]).unwrap();
    assert_eq!(b.roots().len(), 1);
    assert!(b.contains(&r.der));
    assert_eq!(TrustBundle::from_pem(b.pem()).unwrap(), b);
    assert!(matches!(
        TrustBundle::from_pem("nope"),
        Err(TrustError::InvalidBundle(_))
    ));
}

/// The issuer path cache (server only).
#[cfg(feature = "server")]
mod path_cache {
    use std::sync::Arc;

    use super::super::path_cache::ISSUER_PATH_TTL;
    use super::*;

    /// A root, an intermediate under it, a leaf signed by the intermediate, and a bundle of the
    /// root.
    struct PathFixture {
        root: Ca,
        intermediate: Ca,
        leaf_pem: String,
        bundle: Arc<TrustBundle>,
        cache: IssuerPathCache,
        now: OffsetDateTime,
    }

    fn leaf_pem(p: CertificateParams, parent: &Ca) -> String {
        crate::pem::cert_to_pem(&leaf(p, parent))
    }

    fn path_fixture() -> PathFixture {
        let root = root("root");
        let intermediate = sub_ca(
            ca_params("intermediate", BasicConstraints::Constrained(0)),
            &root,
        );
        PathFixture {
            leaf_pem: leaf_pem(leaf_params(), &intermediate),
            bundle: Arc::new(bundle(&[&root])),
            root,
            intermediate,
            cache: IssuerPathCache::new(),
            now: now(),
        }
    }

    /// Whether `cache` answers for `path` against `bundle` at `at` from a previous check: the leaf
    /// is parsed only on a miss, so a leaf that is not a certificate passes only on a hit.
    fn answered_from_cache(
        cache: &IssuerPathCache,
        bundle: &Arc<TrustBundle>,
        path: &[CertificateDer<'static>],
        at: OffsetDateTime,
    ) -> bool {
        match cache.verify(bundle, "not a certificate", path, at) {
            Ok(()) => true,
            Err(ValidationError::Malformed { index: 0 }) => false,
            Err(e) => panic!("a miss with a junk leaf fails on the leaf, not with {e:?}"),
        }
    }

    #[test]
    fn an_issuer_path_is_verified_once_per_bundle_and_again_for_a_new_bundle() {
        let f = path_fixture();
        let path = [f.intermediate.der.clone()];
        let check = |bundle: &Arc<TrustBundle>, at| f.cache.verify(bundle, &f.leaf_pem, &path, at);
        assert!(!answered_from_cache(&f.cache, &f.bundle, &path, f.now));
        assert_eq!(check(&f.bundle, f.now), Ok(()));
        assert!(answered_from_cache(
            &f.cache,
            &f.bundle,
            &path,
            f.now + Duration::from_secs(30)
        ));
        // An equal bundle published anew is a new Arc: checked again.
        let republished = Arc::new((*f.bundle).clone());
        assert!(!answered_from_cache(&f.cache, &republished, &path, f.now));
        assert_eq!(check(&republished, f.now), Ok(()));
        // The root rotated away: the cached success for the old bundle does not carry over.
        let other = Arc::new(bundle(&[&root("other root")]));
        assert_eq!(check(&other, f.now), Err(ValidationError::UnknownIssuer));
        let _ = &f.root;
    }

    #[test]
    fn a_cached_issuer_path_expires_with_its_certificates_and_after_the_ttl() {
        let f = path_fixture();
        let path = [f.intermediate.der.clone()];
        f.cache
            .verify(&f.bundle, &f.leaf_pem, &path, f.now)
            .unwrap();
        assert!(
            !answered_from_cache(&f.cache, &f.bundle, &path, f.now + ISSUER_PATH_TTL),
            "the TTL bounds how long a check is reused"
        );
        assert_eq!(
            f.cache
                .verify(&f.bundle, &f.leaf_pem, &path, f.now + ISSUER_PATH_TTL),
            Ok(())
        );
        // The intermediate lives one more hour.
        assert_eq!(
            f.cache.verify(
                &f.bundle,
                &f.leaf_pem,
                &path,
                f.now + Duration::from_secs(7200)
            ),
            Err(ValidationError::Expired)
        );
        // A different path is never answered from the cache.
        let other = sub_ca(
            ca_params("intermediate 2", BasicConstraints::Constrained(0)),
            &f.root,
        );
        let other_leaf = leaf_pem(leaf_params(), &other);
        assert!(!answered_from_cache(
            &f.cache,
            &f.bundle,
            std::slice::from_ref(&other.der),
            f.now
        ));
        assert_eq!(
            f.cache.verify(
                &f.bundle,
                &other_leaf,
                std::slice::from_ref(&other.der),
                f.now
            ),
            Ok(())
        );
    }

    #[test]
    fn an_issuer_path_that_is_not_a_ca_path_is_never_cached() {
        let r = root("root");
        let mut p = ca_params("not a CA", BasicConstraints::Unconstrained);
        p.is_ca = IsCa::ExplicitNoCa;
        let i = sub_ca(p, &r);
        let b = Arc::new(bundle(&[&r]));
        let cache = IssuerPathCache::new();
        let l = leaf_pem(leaf_params(), &i);
        for _ in 0..2 {
            assert_eq!(
                cache.verify(&b, &l, std::slice::from_ref(&i.der), now()),
                Err(ValidationError::NotCa)
            );
        }
    }
}
