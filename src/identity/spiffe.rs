//! SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// A SPIFFE ID could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("not a spiffe:// URI")]
    NotSpiffe,
    /// The trust domain is empty or has characters SPIFFE does not allow.
    #[error("invalid trust domain")]
    InvalidTrustDomain,
    /// The path is not `/ns/<ns>/sa/<sa>` with non-empty DNS-label-like segments.
    #[error("path is not /ns/<namespace>/sa/<service-account>")]
    InvalidPath,
}

/// A Kubernetes workload identity in SPIFFE form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// Kubernetes names: namespaces are DNS labels, service accounts DNS subdomains.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl SpiffeId {
    /// The identity of service account `sa` in namespace `ns` under `trust_domain`.
    ///
    /// Errors: [`IdentityError::InvalidTrustDomain`], [`IdentityError::InvalidPath`].
    pub fn for_service_account(
        trust_domain: &str,
        ns: &str,
        sa: &str,
    ) -> Result<Self, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::InvalidTrustDomain);
        }
        if !valid_k8s_name(ns) || !valid_k8s_name(sa) {
            return Err(IdentityError::InvalidPath);
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; any other shape is an error.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or(IdentityError::NotSpiffe)?;
        let (td, path) = rest.split_once('/').ok_or(IdentityError::InvalidPath)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::for_service_account(td, ns, sa)
            }
            _ => Err(IdentityError::InvalidPath),
        }
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account name.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

/// The URI SANs of a parsed certificate, in order (the SPIFFE ID of an SVID is its only one).
/// A certificate without a readable SAN extension has none.
pub fn uri_sans<'a>(cert: &x509_parser::certificate::X509Certificate<'a>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// At most `max` characters of client input, for logs and error messages.
pub fn truncate_echo(input: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(max) {
        None => input.into(),
        Some((at, _)) => format!("{}… ({} bytes)", &input[..at], input.len()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_truncated_and_says_how_long_it_was() {
        assert_eq!(truncate_echo("short", 10), "short");
        let long = "é".repeat(5000);
        let echoed = truncate_echo(&long, 10);
        assert!(echoed.starts_with(&"é".repeat(10)));
        assert!(echoed.ends_with("(10000 bytes)"), "{echoed}");
    }

    #[test]
    fn a_service_account_identity_formats_as_a_spiffe_uri() {
        let id = SpiffeId::for_service_account("cluster.local", "default", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn malformed_spiffe_uris_are_rejected_with_a_reason() {
        let cases = [
            ("https://cluster.local/ns/a/sa/b", IdentityError::NotSpiffe),
            ("spiffe://cluster.local", IdentityError::InvalidPath),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                IdentityError::InvalidPath,
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                IdentityError::InvalidPath,
            ),
            (
                "spiffe://cluster.local/sa/b/ns/a",
                IdentityError::InvalidPath,
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                IdentityError::InvalidTrustDomain,
            ),
            ("spiffe:///ns/a/sa/b", IdentityError::InvalidTrustDomain),
            (
                "spiffe://cluster.local/ns/A/sa/b",
                IdentityError::InvalidPath,
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(SpiffeId::parse(uri), Err(want), "{uri}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// A Kubernetes name as the apiserver allows it (lowercase, digits, inner `-` and `.`).
        fn k8s_name() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?"
        }

        proptest! {
            #[test]
            fn spiffe_ids_of_valid_parts_format_as_spiffe_uris_that_parse_back_to_them(
                td in "[a-z0-9._-]{1,40}",
                ns in k8s_name(),
                sa in k8s_name(),
            ) {
                let id = SpiffeId::for_service_account(&td, &ns, &sa).expect("valid parts");
                let uri = id.to_string();
                prop_assert_eq!(&uri, &format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
                prop_assert_eq!(SpiffeId::parse(&uri), Ok(id));
            }

            #[test]
            fn any_string_either_fails_to_parse_as_a_spiffe_id_or_is_exactly_its_formatting(
                uri in prop_oneof![
                    any::<String>(),
                    "spiffe://[a-zA-Z0-9./_-]{0,40}",
                    "spiffe://[a-z._-]{0,8}/ns/[a-z.-]{0,4}/sa/[a-z.-]{0,4}(/[a-z]{0,2})?",
                ],
            ) {
                if let Ok(id) = SpiffeId::parse(&uri) {
                    prop_assert_eq!(id.to_string(), uri);
                    prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
                }
            }
        }
    }
}
