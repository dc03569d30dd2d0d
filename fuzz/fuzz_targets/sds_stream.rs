//! The per-stream SDS state machine (`sds::StreamState`) fed random sequences of
//! DiscoveryRequests and SVID rotations, checked step by step against a model of the xDS
//! state-of-the-world rules it implements:
//! - nothing is sent before a subscription or without an SVID;
//! - a response carries only secrets the stream subscribed to (both when it named none), each
//!   once, from the SVID it was built for, under the version `sds::resources` gives for them;
//! - nonces strictly increase; the same content is never sent twice in a row unless the client
//!   re-subscribed; asking again with nothing new sends nothing;
//! - a request answering anything but the latest nonce is stale and changes nothing; a NACK
//!   keeps the subscription; an ACK carries its version and replaces the subscription.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status;
use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::{
    LeafProfile, LocalSigner, RequestKind, SECRET_TYPE_URL, SignRequest, Signer, SpiffeId,
    StreamState, Svid, TrustBundle, resources,
};
use prost::Message;

/// Three SVIDs: two from one root (a rotation), one from another root (a root change).
static SVIDS: LazyLock<[Svid; 3]> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = SpiffeId::for_service_account("cluster.local", "ns", "sa").expect("identity");
    let issue = |signer: &LocalSigner| {
        let key = rcgen::KeyPair::generate().expect("key");
        let req = SignRequest::for_key(
            LeafProfile::Workload(id.clone()),
            &key,
            Duration::from_secs(3600),
        )
        .expect("request");
        let issued = signer.sign_now(&req).expect("sign");
        let roots = signer.trust_anchors_pem().concat();
        let mut chain = vec![issued.leaf_pem];
        chain.extend(issued.intermediates_pem);
        chain.push(roots.clone());
        let trusted = TrustBundle::from_pem(&roots).expect("roots");
        Svid::from_response(&chain, &key, &id, &trusted, time::OffsetDateTime::now_utc())
            .expect("SVID")
    };
    let first = LocalSigner::load_or_generate(&dir.path().join("a"), "cluster.local").expect("CA");
    let second = LocalSigner::load_or_generate(&dir.path().join("b"), "cluster.local").expect("CA");
    [issue(&first), issue(&first), issue(&second)]
});

#[derive(Debug, Arbitrary)]
enum Name<'a> {
    Default,
    RootCa,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Nonce<'a> {
    Empty,
    Latest,
    /// The nonce of an earlier response, counted back from the latest.
    Earlier(u8),
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Version<'a> {
    Empty,
    Latest,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Step<'a> {
    Request {
        names: Vec<Name<'a>>,
        version: Version<'a>,
        nonce: Nonce<'a>,
        nack: Option<&'a str>,
    },
    /// The store publishes this SVID (index into SVIDS, or none yet), and the stream is asked
    /// for its next response, as the handler does after every request and every rotation.
    Publish(Option<u8>),
    /// The handler asks again with the same SVID.
    Poll,
}

/// What the model knows about the stream.
#[derive(Default)]
struct Model {
    names: Option<Vec<String>>,
    nonces: Vec<String>,
    sent_version: Option<String>,
    svid: Option<usize>,
}

fn effective(names: &[String]) -> Vec<String> {
    if names.is_empty() {
        vec!["default".to_owned(), "ROOTCA".to_owned()]
    } else {
        names.to_vec()
    }
}

fn respond(state: &mut StreamState, model: &mut Model) {
    let svid = model.svid.map(|i| &SVIDS[i]);
    let got = state.next_response(svid);
    let Some(names) = &model.names else {
        assert!(got.is_none(), "sent before any subscription");
        return;
    };
    let Some(svid) = svid else {
        assert!(got.is_none(), "sent without an SVID");
        return;
    };
    let expected = resources(names, svid);
    let Some(resp) = got else {
        // Nothing new: either nothing subscribed is served, or this exact content was the last sent.
        assert!(
            expected.is_none() || expected.map(|e| e.version) == model.sent_version,
            "withheld a response with new content"
        );
        return;
    };
    let expected = expected.expect("sent a response though no subscribed name is served");
    assert_ne!(
        Some(&resp.version_info),
        model.sent_version.as_ref(),
        "sent the same content twice"
    );
    assert_eq!(resp.version_info, expected.version);
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    let previous = model
        .nonces
        .last()
        .map(|n| n.parse::<u64>().expect("numeric nonce"));
    let nonce: u64 = resp.nonce.parse().expect("numeric nonce");
    assert!(
        previous.is_none_or(|p| nonce > p),
        "nonce {nonce} after {previous:?}"
    );
    let wanted = effective(names);
    let mut seen = Vec::new();
    for any in &resp.resources {
        assert_eq!(any.type_url, SECRET_TYPE_URL);
        let secret = Secret::decode(any.value.as_slice()).expect("a Secret");
        assert!(
            wanted.contains(&secret.name),
            "sent {} unasked ({wanted:?})",
            secret.name
        );
        assert!(!seen.contains(&secret.name), "sent {} twice", secret.name);
        let inline = |s: Option<Specifier>| match s {
            Some(Specifier::InlineBytes(b)) => String::from_utf8(b).expect("PEM"),
            other => panic!("not inline: {other:?}"),
        };
        match secret.r#type {
            Some(secret::Type::TlsCertificate(tls)) => {
                assert_eq!(secret.name, "default");
                let chain = inline(tls.certificate_chain.and_then(|d| d.specifier));
                assert_eq!(chain, svid.chain_pem, "sent another SVID's chain");
                let key = inline(tls.private_key.and_then(|d| d.specifier));
                assert_eq!(key, svid.key_pem(), "sent another SVID's key");
            }
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(secret.name, "ROOTCA");
                assert_eq!(
                    inline(v.trusted_ca.and_then(|d| d.specifier)),
                    svid.roots_pem
                );
            }
            other => panic!("unexpected secret type {other:?}"),
        }
        seen.push(secret.name);
    }
    assert_eq!(seen, expected.names);
    model.nonces.push(resp.nonce);
    model.sent_version = Some(resp.version_info);
}

fuzz_target!(|steps: Vec<Step<'_>>| {
    let mut state = StreamState::default();
    let mut model = Model::default();
    for step in steps.into_iter().take(64) {
        match step {
            Step::Publish(i) => {
                model.svid = i.map(|i| usize::from(i) % SVIDS.len());
                respond(&mut state, &mut model);
            }
            Step::Poll => respond(&mut state, &mut model),
            Step::Request {
                names,
                version,
                nonce,
                nack,
            } => {
                let names: Vec<String> = names
                    .into_iter()
                    .map(|n| match n {
                        Name::Default => "default".to_owned(),
                        Name::RootCa => "ROOTCA".to_owned(),
                        Name::Other(s) => s.to_owned(),
                    })
                    .collect();
                let nonce = match nonce {
                    Nonce::Empty => String::new(),
                    Nonce::Latest => model.nonces.last().cloned().unwrap_or_default(),
                    Nonce::Earlier(k) => {
                        let n = model.nonces.len();
                        n.checked_sub(2 + usize::from(k))
                            .map(|i| model.nonces[i].clone())
                            .unwrap_or_default()
                    }
                    Nonce::Other(s) => s.to_owned(),
                };
                let version = match version {
                    Version::Empty => String::new(),
                    Version::Latest => model.sent_version.clone().unwrap_or_default(),
                    Version::Other(s) => s.to_owned(),
                };
                let req = DiscoveryRequest {
                    version_info: version.clone(),
                    resource_names: names.clone(),
                    type_url: SECRET_TYPE_URL.to_owned(),
                    response_nonce: nonce.clone(),
                    error_detail: nack.map(|m| Status {
                        code: 3,
                        message: m.to_owned(),
                        details: vec![],
                    }),
                    ..Default::default()
                };
                let kind = state.on_request(&req);
                let latest = model.nonces.last();
                if nonce.is_empty() {
                    assert_eq!(kind, RequestKind::Initial);
                    model.names = Some(names);
                    if latest.is_some() {
                        // A re-subscription: the client may have lost what it had.
                        model.sent_version = None;
                    }
                } else if latest != Some(&nonce) {
                    assert_eq!(kind, RequestKind::Stale);
                } else if let Some(message) = &req.error_detail.as_ref().map(|e| e.message.clone())
                {
                    assert_eq!(
                        kind,
                        RequestKind::Nack {
                            version,
                            message: message.clone()
                        }
                    );
                } else {
                    assert_eq!(kind, RequestKind::Ack { version });
                    model.names = Some(names);
                }
                assert_eq!(state.names(), model.names.as_deref());
                // The handler answers every request with what is due.
                respond(&mut state, &mut model);
            }
        }
    }
});
