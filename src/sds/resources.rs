//! The two SDS resources the agent serves, built from the current SVID.

use crate::crypto::Sha256;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;

use crate::svid::Svid;

/// The type URL of every resource and response on this service.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload certificate chain and key (Istio's name).
pub const DEFAULT_RESOURCE: &str = "default";
/// The trust bundle (Istio's name).
pub const ROOT_RESOURCE: &str = "ROOTCA";

fn inline(bytes: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// The secret called `name` for `svid`, if the agent serves such a secret.
///
/// - `default`: `tls_certificate` with the chain (leaf first) and the private key, inline.
/// - `ROOTCA`: `validation_context` with the trust bundle as `trusted_ca`, inline.
pub fn secret(name: &str, svid: &Svid) -> Option<Secret> {
    let kind = match name {
        DEFAULT_RESOURCE => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&svid.chain_pem),
            private_key: inline(svid.key_pem()),
            ..Default::default()
        }),
        ROOT_RESOURCE => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&svid.roots_pem),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret {
        name: name.to_owned(),
        r#type: Some(kind),
    })
}

/// What one response would carry: the packed secrets and a version that changes exactly when
/// their content does. `Debug` shows names and version only (the resources hold the key).
pub struct Resources {
    /// The names included, in request order (unknown names are left out).
    pub names: Vec<String>,
    /// Hex digest over the names, the leaf serial and the trust bundle.
    pub version: String,
    /// The secrets, packed.
    pub resources: Vec<Any>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("names", &self.names)
            .field("version", &self.version)
            .finish()
    }
}

/// The resources for a request naming `requested` (empty means both), or `None` when it names
/// nothing the agent serves.
pub fn resources(requested: &[String], svid: &Svid) -> Option<Resources> {
    let all = [DEFAULT_RESOURCE.to_owned(), ROOT_RESOURCE.to_owned()];
    let requested = if requested.is_empty() {
        &all[..]
    } else {
        requested
    };
    let mut names = Vec::new();
    let mut resources = Vec::new();
    let mut digest = Sha256::new();
    for name in requested {
        if names.contains(name) {
            continue;
        }
        let Some(s) = secret(name, svid) else {
            continue;
        };
        // The key changes with every certificate, so the serial stands for both; the digest
        // never covers key bytes.
        let content = if name == DEFAULT_RESOURCE {
            &svid.serial_hex
        } else {
            &svid.roots_pem
        };
        digest.update(name.as_bytes());
        digest.update([0]);
        digest.update(content.as_bytes());
        digest.update([0]);
        names.push(name.clone());
        resources.push(pack_any(s));
    }
    if names.is_empty() {
        return None;
    }
    let version = hex::encode(&digest.finalize()[..8]);
    Some(Resources {
        names,
        version,
        resources,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message;

    use super::*;
    use crate::identity::SpiffeId;
    use crate::svid::testing::TestCa;

    fn fake() -> (tempfile::TempDir, TestCa) {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(
            dir.path(),
            SpiffeId::for_service_account("cluster.local", "ns", "sa").unwrap(),
        );
        (dir, ca)
    }

    #[test]
    fn default_carries_the_chain_and_key_and_rootca_carries_the_bundle() {
        let (_dir, ca) = fake();
        let svid = ca.svid(Duration::from_secs(60));
        let r = resources(&["default".into(), "ROOTCA".into()], &svid).unwrap();
        assert_eq!(r.names, ["default", "ROOTCA"]);
        assert!(r.resources.iter().all(|a| a.type_url == SECRET_TYPE_URL));
        let default = Secret::decode(r.resources[0].value.as_slice()).unwrap();
        let Some(secret::Type::TlsCertificate(tls)) = default.r#type else {
            panic!("not a TLS certificate")
        };
        let bytes = |d: Option<DataSource>| match d.and_then(|d| d.specifier) {
            Some(Specifier::InlineBytes(b)) => String::from_utf8(b).unwrap(),
            _ => panic!("not inline bytes"),
        };
        assert_eq!(bytes(tls.certificate_chain), svid.chain_pem);
        assert_eq!(bytes(tls.private_key), svid.key_pem());
        let root = Secret::decode(r.resources[1].value.as_slice()).unwrap();
        assert_eq!(root.name, "ROOTCA");
        let Some(secret::Type::ValidationContext(vc)) = root.r#type else {
            panic!("not a validation context")
        };
        assert_eq!(bytes(vc.trusted_ca), ca.roots_pem());
    }

    #[test]
    fn the_version_changes_with_the_certificate_but_not_without_it() {
        let (_dir, ca) = fake();
        let a = ca.svid(Duration::from_secs(60));
        let b = ca.svid(Duration::from_secs(60));
        let names = ["default".to_owned()];
        assert_eq!(
            resources(&names, &a).unwrap().version,
            resources(&names, &a).unwrap().version
        );
        assert_ne!(
            resources(&names, &a).unwrap().version,
            resources(&names, &b).unwrap().version
        );
        // Same roots: ROOTCA alone keeps its version across a leaf rotation.
        let roots = ["ROOTCA".to_owned()];
        assert_eq!(
            resources(&roots, &a).unwrap().version,
            resources(&roots, &b).unwrap().version
        );
    }

    #[test]
    fn unknown_names_are_left_out_and_an_empty_request_means_both() {
        let (_dir, ca) = fake();
        let svid = ca.svid(Duration::from_secs(60));
        assert!(resources(&["nope".into()], &svid).is_none());
        assert_eq!(
            resources(&["nope".into(), "ROOTCA".into()], &svid)
                .unwrap()
                .names,
            ["ROOTCA"]
        );
        assert_eq!(resources(&[], &svid).unwrap().names, ["default", "ROOTCA"]);
    }

    #[test]
    fn debug_output_never_contains_the_key() {
        let (_dir, ca) = fake();
        let svid = ca.svid(Duration::from_secs(60));
        let r = resources(&[], &svid).unwrap();
        let shown = format!("{r:?} {svid:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
}
