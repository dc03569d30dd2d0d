//! Authentication: who is calling. The server depends on the [`Authenticator`] trait only.
//!
//! - [`TokenReviewAuthenticator`]: Kubernetes TokenReview of the caller's service-account JWT,
//!   after a local [`Precheck`], one review in flight per token ([`SingleFlight`]), a bound on
//!   concurrent apiserver calls ([`ApiLimiter`]) and a bounded LRU cache of positive (and
//!   briefly, negative) results ([`TokenCache`]).
//! - [`StaticTokenAuthenticator`]: a file of `token,namespace,serviceaccount` lines, for the
//!   quickstart and for development without a cluster.

mod cache;
mod flight;
mod limit;
mod precheck;
mod static_tokens;
mod tokenreview;

use std::collections::BTreeMap;

use crate::identity::SpiffeId;
use futures::future::BoxFuture;

pub(crate) use cache::{CacheTtls, TokenCache};
pub(crate) use flight::SingleFlight;
pub(crate) use limit::{ApiLimiter, ApiLimits};
pub use precheck::{MAX_TOKEN_BYTES, Precheck, PrecheckError, TokenClaims};
pub(crate) use static_tokens::StaticTokenAuthenticator;
pub(crate) use tokenreview::{ClusterReviewers, TokenReviewAuthenticator, TokenReviewOptions};

/// Extra key the apiserver sets on pod-bound tokens: the pod's name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// Extra key the apiserver sets on pod-bound tokens: the pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The pod a token is bound to, when it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own identity.
    pub identity: SpiffeId,
    /// The ID of the cluster whose apiserver authenticated the token.
    pub cluster: String,
    /// The Kubernetes username, `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    /// The pod the token was bound to, if any.
    pub pod: Option<PodRef>,
}

impl Caller {
    /// Builds a caller from a TokenReview made in `cluster`: its username and extras.
    ///
    /// Errors: [`AuthnError::NotServiceAccount`] when the username is not a service account,
    /// [`AuthnError::InvalidIdentity`] when its names cannot form a SPIFFE ID.
    pub fn from_username(
        trust_domain: &str,
        cluster: &str,
        username: &str,
        groups: &[String],
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, AuthnError> {
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or(AuthnError::NotServiceAccount)?;
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(AuthnError::NotServiceAccount);
        }
        let (ns, sa) = rest.split_once(':').ok_or(AuthnError::NotServiceAccount)?;
        let identity = SpiffeId::for_service_account(trust_domain, ns, sa)
            .map_err(|_| AuthnError::InvalidIdentity)?;
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = match (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) {
            (Some(name), Some(uid)) => Some(PodRef { name, uid }),
            _ => None,
        };
        Ok(Self {
            identity,
            cluster: cluster.to_owned(),
            username: username.to_owned(),
            pod,
        })
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthnError {
    /// No `authorization: Bearer` header.
    #[error("missing bearer token")]
    MissingToken,
    /// The `clusterid` header names no cluster this server serves.
    #[error("clusterid names no cluster this server serves")]
    UnknownCluster,
    /// The token was refused before review: it cannot be a valid token for this server.
    #[error(transparent)]
    Precheck(#[from] PrecheckError),
    /// The token was reviewed and not accepted (invalid, expired, wrong audience, pod deleted).
    #[error("token rejected")]
    Rejected,
    /// The apiserver accepted the token but did not confirm one of the requested audiences in
    /// `status.audiences` (it is not audience-aware, or the token is for another audience).
    #[error("token audience not confirmed by the reviewer")]
    AudienceNotConfirmed,
    /// The token is valid but not a Kubernetes service account's.
    #[error("token is not a service account token")]
    NotServiceAccount,
    /// The service account's names cannot form a SPIFFE ID.
    #[error("service account cannot be mapped to a SPIFFE ID")]
    InvalidIdentity,
    /// The authenticator could not reach its authority (apiserver down, forbidden, timed out,
    /// too many calls pending). Authentication fails closed.
    #[error("authentication backend unavailable: {0}")]
    Unavailable(#[source] BackendError),
}

/// A Kubernetes call made to authenticate or authorize a caller failed. Clients only ever see
/// "unavailable"; the detail is for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The call took longer than its timeout.
    #[error("apiserver call timed out")]
    TimedOut,
    /// Too many calls were already running or queued (see [`ApiLimits`]).
    #[error("too many apiserver calls pending")]
    Overloaded,
    /// The apiserver answered with an error status (e.g. 403 when meshid may not review).
    #[error("apiserver answered {code}: {reason}")]
    Status {
        /// HTTP status code.
        code: u16,
        /// The apiserver's machine-readable reason.
        reason: String,
    },
    /// The apiserver could not be reached or its answer could not be read.
    #[error("apiserver unreachable: {0}")]
    Transport(String),
}

impl From<kube::Error> for BackendError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => Self::Status {
                code: status.code,
                reason: status.reason,
            },
            // kube errors name the URL and the failure, never a request body (the token).
            other => Self::Transport(other.to_string()),
        }
    }
}

impl AuthnError {
    /// A short, stable label for metrics and audit logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::UnknownCluster => "unknown_cluster",
            Self::Precheck(e) => e.reason(),
            Self::Rejected => "token_rejected",
            Self::AudienceNotConfirmed => "token_audience_not_confirmed",
            Self::NotServiceAccount => "not_service_account",
            Self::InvalidIdentity => "invalid_identity",
            Self::Unavailable(BackendError::Overloaded) => "authn_overloaded",
            Self::Unavailable(_) => "authn_unavailable",
        }
    }
}

/// Turns a bearer token into a [`Caller`].
pub trait Authenticator: Send + Sync {
    /// Authenticates `token` in the cluster `cluster` names (the caller's `clusterid` header;
    /// `None` or empty: the local cluster). Never logs the token.
    ///
    /// Errors: [`AuthnError::UnknownCluster`] when the cluster is not served, before any check
    /// of the token; otherwise as documented on each variant.
    fn authenticate<'a>(
        &'a self,
        cluster: Option<&'a str>,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Caller, AuthnError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> Vec<String> {
        vec![
            "system:serviceaccounts".into(),
            "system:serviceaccounts:ns".into(),
            "system:authenticated".into(),
        ]
    }

    #[test]
    fn a_service_account_username_becomes_a_spiffe_identity_with_its_pod() {
        let mut extra = BTreeMap::new();
        extra.insert(EXTRA_POD_NAME.to_owned(), vec!["p".to_owned()]);
        extra.insert(EXTRA_POD_UID.to_owned(), vec!["u".to_owned()]);
        let c = Caller::from_username("td", "c", "system:serviceaccount:ns:sa", &groups(), &extra)
            .unwrap();
        assert_eq!(c.identity.to_string(), "spiffe://td/ns/ns/sa/sa");
        assert_eq!(
            c.pod,
            Some(PodRef {
                name: "p".into(),
                uid: "u".into()
            })
        );
    }

    #[test]
    fn users_that_are_not_service_accounts_are_refused() {
        let none = BTreeMap::new();
        for user in ["admin", "system:node:n1", "system:serviceaccount:only-ns"] {
            assert_eq!(
                Caller::from_username("td", "c", user, &groups(), &none),
                Err(AuthnError::NotServiceAccount)
            );
        }
        assert_eq!(
            Caller::from_username("td", "c", "system:serviceaccount:ns:sa", &[], &none),
            Err(AuthnError::NotServiceAccount)
        );
    }
}
