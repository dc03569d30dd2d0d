//! Authentication from a static token file, for the quickstart and development without a
//! Kubernetes cluster. Each non-comment line is `token,namespace,serviceaccount`.
//! Do not use it in production: tokens never expire and cannot be revoked without a restart.

use std::collections::HashMap;
use std::path::Path;

use crate::crypto::Sha256;

use super::{Authenticator, AuthnError, Caller};
use crate::identity::SpiffeId;
use futures::future::BoxFuture;

/// Maps SHA-256 digests of static tokens to callers.
pub struct StaticTokenAuthenticator {
    callers: HashMap<[u8; 32], Caller>,
    cluster_id: String,
}

impl std::fmt::Debug for StaticTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokenAuthenticator")
            .field("tokens", &self.callers.len())
            .finish()
    }
}

/// A static token file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StaticTokenError {
    /// The file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `token,namespace,serviceaccount` with valid names.
    #[error("token file line {line}: expected token,namespace,serviceaccount")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
}

impl StaticTokenAuthenticator {
    /// Loads a token file. Errors: [`StaticTokenError`].
    pub fn from_file(path: &Path, trust_domain: &str) -> Result<Self, StaticTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticTokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, trust_domain)
    }

    /// Parses token-file text; see the module docs for the format.
    pub fn parse(text: &str, trust_domain: &str) -> Result<Self, StaticTokenError> {
        let mut callers = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || StaticTokenError::BadLine { line: i + 1 };
            let mut parts = line.split(',').map(str::trim);
            let (Some(token), Some(ns), Some(sa), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            if token.is_empty() {
                return Err(bad());
            }
            let identity =
                SpiffeId::for_service_account(trust_domain, ns, sa).map_err(|_| bad())?;
            let caller = Caller {
                identity,
                cluster: DEFAULT_CLUSTER_ID.to_owned(),
                username: format!("system:serviceaccount:{ns}:{sa}"),
                pod: None,
            };
            callers.insert(Sha256::digest(token.as_bytes()), caller);
        }
        Ok(Self {
            callers,
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
        })
    }

    /// Names the one cluster these tokens are from (`--cluster-id`; `Kubernetes` by default):
    /// callers must send it in `clusterid`, or nothing.
    pub fn for_cluster(mut self, cluster_id: &str) -> Self {
        self.cluster_id = cluster_id.to_owned();
        for caller in self.callers.values_mut() {
            caller.cluster = cluster_id.to_owned();
        }
        self
    }
}

/// `--cluster-id`'s default.
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl Authenticator for StaticTokenAuthenticator {
    fn authenticate<'a>(
        &'a self,
        cluster: Option<&'a str>,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Caller, AuthnError>> {
        let result = match cluster {
            None | Some("") => Ok(()),
            Some(id) if id == self.cluster_id => Ok(()),
            Some(_) => Err(AuthnError::UnknownCluster),
        }
        .and_then(|()| {
            let key: [u8; 32] = Sha256::digest(token.as_bytes());
            self.callers.get(&key).cloned().ok_or(AuthnError::Rejected)
        });
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listed_token_authenticates_as_its_service_account_and_others_do_not() {
        let a =
            StaticTokenAuthenticator::parse("# comment\n\nsecret1,default,web\n", "td").unwrap();
        let c = a.authenticate(None, "secret1").await.unwrap();
        assert_eq!(c.identity.to_string(), "spiffe://td/ns/default/sa/web");
        assert_eq!(
            a.authenticate(None, "secret2").await,
            Err(AuthnError::Rejected)
        );
    }

    #[tokio::test]
    async fn static_tokens_are_from_the_local_cluster_only() {
        let a = StaticTokenAuthenticator::parse("secret1,default,web\n", "td")
            .unwrap()
            .for_cluster("c1");
        for ok in [None, Some(""), Some("c1")] {
            assert_eq!(a.authenticate(ok, "secret1").await.unwrap().cluster, "c1");
        }
        assert_eq!(
            a.authenticate(Some("c2"), "secret1").await,
            Err(AuthnError::UnknownCluster)
        );
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let err = StaticTokenAuthenticator::parse("a,b,c\nonly,two\n", "td").unwrap_err();
        assert!(matches!(err, StaticTokenError::BadLine { line: 2 }));
        assert!(StaticTokenAuthenticator::parse("t,NS,sa", "td").is_err());
    }
}
