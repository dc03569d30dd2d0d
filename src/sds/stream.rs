//! Per-stream xDS bookkeeping (state-of-the-world protocol): what the client subscribed to,
//! what was last sent under which nonce, and whether a request is an ACK, a NACK or stale.
//! No I/O: the handler in [`super::service`] feeds requests and SVIDs in and sends what comes
//! out.

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::resources::{SECRET_TYPE_URL, resources};
use crate::svid::Svid;

/// How a request relates to what this stream sent before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// The first request of the stream (no nonce yet): a subscription.
    Initial,
    /// Accepts the response with the current nonce (possibly changing the subscription).
    Ack {
        /// The version the client now runs.
        version: String,
    },
    /// Rejects the response with the current nonce; the client keeps its previous version.
    Nack {
        /// The version the client still runs (not the rejected one).
        version: String,
        /// The client's reason.
        message: String,
    },
    /// Answers a response older than the latest one; ignored as the xDS protocol requires.
    Stale,
}

/// The state of one SDS stream.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Resource names of the current subscription; `None` before the first request.
    names: Option<Vec<String>>,
    /// Nonce of the latest response sent.
    nonce: Option<String>,
    /// Version of the latest response sent.
    sent_version: Option<String>,
    /// Counter behind the nonces.
    responses: u64,
}

impl StreamState {
    /// Classifies `req` and updates the subscription: initial requests and ACKs replace the
    /// subscribed names; NACKs and stale requests change nothing.
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> RequestKind {
        let nonce = req.response_nonce.as_str();
        let kind = if nonce.is_empty() {
            if self.nonce.is_some() {
                // A client that lost track of the stream (e.g. Envoy re-subscribing): treat
                // it as a fresh subscription.
                self.sent_version = None;
            }
            RequestKind::Initial
        } else if self.nonce.as_deref() != Some(nonce) {
            return RequestKind::Stale;
        } else if let Some(error) = &req.error_detail {
            return RequestKind::Nack {
                version: req.version_info.clone(),
                message: error.message.clone(),
            };
        } else {
            RequestKind::Ack {
                version: req.version_info.clone(),
            }
        };
        self.names = Some(req.resource_names.clone());
        kind
    }

    /// The response to send for `svid`, if the client subscribed, the SVID provides something it
    /// asked for, and that differs from the latest response. Records it as sent.
    pub fn next_response(&mut self, svid: Option<&Svid>) -> Option<DiscoveryResponse> {
        let names = self.names.as_ref()?;
        let found = resources(names, svid?)?;
        if self.sent_version.as_deref() == Some(found.version.as_str()) {
            return None;
        }
        self.responses += 1;
        let nonce = self.responses.to_string();
        self.nonce = Some(nonce.clone());
        self.sent_version = Some(found.version.clone());
        Some(DiscoveryResponse {
            version_info: found.version,
            resources: found.resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
            ..Default::default()
        })
    }

    /// The subscribed names (`None` before the first request).
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::identity::SpiffeId;
    use crate::svid::testing::TestCa;

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: "bad key".into(),
                details: vec![],
            }),
            ..request(names, version, nonce)
        }
    }

    fn svids() -> (tempfile::TempDir, Svid, Svid) {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(
            dir.path(),
            SpiffeId::for_service_account("cluster.local", "ns", "sa").unwrap(),
        );
        let a = ca.svid(Duration::from_secs(60));
        let b = ca.svid(Duration::from_secs(60));
        (dir, a, b)
    }

    #[test]
    fn nothing_is_sent_before_a_subscription_or_before_an_svid_exists() {
        let (_d, a, _) = svids();
        let mut s = StreamState::default();
        assert!(s.next_response(Some(&a)).is_none());
        assert_eq!(
            s.on_request(&request(&["default"], "", "")),
            RequestKind::Initial
        );
        assert!(s.next_response(None).is_none());
        let r = s
            .next_response(Some(&a))
            .expect("response once the SVID exists");
        assert_eq!(r.nonce, "1");
        assert_eq!(r.resources.len(), 1);
    }

    #[test]
    fn an_ack_is_recognised_and_does_not_cause_a_resend() {
        let (_d, a, _) = svids();
        let mut s = StreamState::default();
        s.on_request(&request(&["default"], "", ""));
        let r = s.next_response(Some(&a)).unwrap();
        let kind = s.on_request(&request(&["default"], &r.version_info, &r.nonce));
        assert_eq!(
            kind,
            RequestKind::Ack {
                version: r.version_info.clone()
            }
        );
        assert!(s.next_response(Some(&a)).is_none());
    }

    #[test]
    fn a_rotation_produces_a_new_version_and_nonce() {
        let (_d, a, b) = svids();
        let mut s = StreamState::default();
        s.on_request(&request(&["default"], "", ""));
        let r1 = s.next_response(Some(&a)).unwrap();
        s.on_request(&request(&["default"], &r1.version_info, &r1.nonce));
        let r2 = s.next_response(Some(&b)).expect("push after rotation");
        assert_ne!(r1.version_info, r2.version_info);
        assert_ne!(r1.nonce, r2.nonce);
    }

    #[test]
    fn a_nack_keeps_the_old_version_and_is_not_answered_with_the_same_content() {
        let (_d, a, b) = svids();
        let mut s = StreamState::default();
        s.on_request(&request(&["default"], "", ""));
        let r1 = s.next_response(Some(&a)).unwrap();
        s.on_request(&request(&["default"], &r1.version_info, &r1.nonce));
        let r2 = s.next_response(Some(&b)).unwrap();
        let kind = s.on_request(&nack(&["default"], &r1.version_info, &r2.nonce));
        assert_eq!(
            kind,
            RequestKind::Nack {
                version: r1.version_info.clone(),
                message: "bad key".into()
            }
        );
        assert!(
            s.next_response(Some(&b)).is_none(),
            "the rejected content must not be resent as is"
        );
    }

    #[test]
    fn requests_with_a_stale_nonce_are_ignored() {
        let (_d, a, b) = svids();
        let mut s = StreamState::default();
        s.on_request(&request(&["default"], "", ""));
        let r1 = s.next_response(Some(&a)).unwrap();
        let r2 = s.next_response(Some(&b)).unwrap();
        // A late ACK of r1 (and even a NACK of it, or a change of names) changes nothing.
        assert_eq!(
            s.on_request(&request(&["ROOTCA"], &r1.version_info, &r1.nonce)),
            RequestKind::Stale
        );
        assert_eq!(
            s.on_request(&nack(&["default"], "", &r1.nonce)),
            RequestKind::Stale
        );
        assert_eq!(s.names().unwrap(), ["default"]);
        assert_eq!(
            s.on_request(&request(&["default"], &r2.version_info, &r2.nonce)),
            RequestKind::Ack {
                version: r2.version_info.clone()
            }
        );
    }

    #[test]
    fn changing_the_subscribed_names_in_an_ack_sends_the_new_set() {
        let (_d, a, _) = svids();
        let mut s = StreamState::default();
        s.on_request(&request(&["default"], "", ""));
        let r1 = s.next_response(Some(&a)).unwrap();
        s.on_request(&request(
            &["default", "ROOTCA"],
            &r1.version_info,
            &r1.nonce,
        ));
        let r2 = s.next_response(Some(&a)).expect("new names, new response");
        assert_eq!(r2.resources.len(), 2);
    }
}
