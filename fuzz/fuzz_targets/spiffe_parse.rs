//! SPIFFE ID parsing. Whatever parses formats back to exactly the input and parses again to the
//! same ID; whatever `for_service_account` accepts formats to a string that parses back to it.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::SpiffeId;

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    /// Any string, as a CSR's URI SAN or a `--trust-domain` would bring it.
    Uri(&'a str),
    /// Separate parts, as a TokenReview username brings the namespace and account.
    Parts {
        trust_domain: &'a str,
        namespace: &'a str,
        service_account: &'a str,
    },
}

fn round_trips(id: &SpiffeId) {
    let formatted = id.to_string();
    let again = SpiffeId::parse(&formatted)
        .unwrap_or_else(|e| panic!("{formatted:?} was formatted from an ID but fails: {e}"));
    assert_eq!(&again, id);
    assert_eq!(again.to_string(), formatted);
    assert_eq!(
        SpiffeId::for_service_account(id.trust_domain(), id.namespace(), id.service_account()),
        Ok(id.clone())
    );
}

fuzz_target!(|input: Input<'_>| match input {
    Input::Uri(uri) => {
        if let Ok(id) = SpiffeId::parse(uri) {
            assert_eq!(id.to_string(), uri, "parse accepted a non-canonical form");
            round_trips(&id);
        }
    }
    Input::Parts {
        trust_domain,
        namespace,
        service_account,
    } => {
        if let Ok(id) = SpiffeId::for_service_account(trust_domain, namespace, service_account) {
            assert_eq!(
                (id.trust_domain(), id.namespace(), id.service_account()),
                (trust_domain, namespace, service_account)
            );
            for part in [trust_domain, namespace, service_account] {
                assert!(!part.is_empty() && !part.contains('/'), "{part:?} accepted");
            }
            round_trips(&id);
        }
    }
});
