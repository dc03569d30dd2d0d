//! The rotation loop: fresh key → CSR → CA (with the current token) → validate against the roots
//! trusted before the call → trust the response's roots → publish, then sleep for what
//! [`RotationPolicy`] says, until shutdown. While it sleeps, a change of the trusted roots is
//! published with the current SVID (so the SDS `ROOTCA` resource follows it).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::Instrument;

use super::ca_client::{CaClient, CaClientError};
use super::metrics::AgentMetrics;
use super::policy::RotationPolicy;
use super::trust::CaTrust;
use crate::identity::SpiffeId;
use crate::svid::{Svid, SvidSender, WorkloadKeyType, generate_csr};

/// Where certificates come from: the one call the rotation loop makes. [`CaClient`] is the
/// production implementation; tests use a fake CA.
pub trait CertificateIssuer: Send + Sync + 'static {
    /// Asks for a certificate for `csr_pem`, authenticating with `token`, valid for `validity`.
    /// Returns the raw chain: leaf first, root bundle last.
    fn issue(
        &self,
        csr_pem: &str,
        token: &str,
        validity: Duration,
    ) -> impl Future<Output = Result<Vec<String>, CaClientError>> + Send;
}

impl<T: CertificateIssuer> CertificateIssuer for Arc<T> {
    fn issue(
        &self,
        csr_pem: &str,
        token: &str,
        validity: Duration,
    ) -> impl Future<Output = Result<Vec<String>, CaClientError>> + Send {
        T::issue(self, csr_pem, token, validity)
    }
}

impl CertificateIssuer for CaClient {
    fn issue(
        &self,
        csr_pem: &str,
        token: &str,
        validity: Duration,
    ) -> impl Future<Output = Result<Vec<String>, CaClientError>> + Send {
        self.create_certificate(csr_pem, token, validity, None)
    }
}

/// One rotation attempt failed. The loop keeps serving the previous SVID and retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Token {
        /// The token file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file is empty.
    #[error("token file {path} is empty")]
    EmptyToken {
        /// The token file.
        path: String,
    },
    /// Generating the key or the CSR failed.
    #[error("key or CSR generation failed: {0}")]
    Key(String),
    /// The CA refused, was unreachable, or returned an unusable chain.
    #[error(transparent)]
    Ca(#[from] CaClientError),
}

impl RotationError {
    /// A short label for metrics: `token`, `key`, `ca_unavailable`, `ca_refused`,
    /// `untrusted_chain` or `invalid_response`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token { .. } | Self::EmptyToken { .. } => "token",
            Self::Key(_) => "key",
            Self::Ca(CaClientError::Status {
                code:
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown,
                ..
            }) => "ca_unavailable",
            Self::Ca(CaClientError::Status { .. }) => "ca_refused",
            Self::Ca(CaClientError::Untrusted(_)) => "untrusted_chain",
            Self::Ca(_) => "invalid_response",
        }
    }
}

/// Reads the bearer token. The file is read on every attempt because the kubelet rotates
/// projected tokens in place.
async fn read_token(path: &Path) -> Result<String, RotationError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| RotationError::Token {
            path: path.display().to_string(),
            source,
        })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(RotationError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(token.to_owned())
}

/// Everything one rotation needs besides the CA.
#[derive(Debug, Clone)]
pub struct RotationSettings {
    /// The identity to ask for; the leaf must carry exactly this URI SAN.
    pub identity: SpiffeId,
    /// The key algorithm generated for each certificate.
    pub key_type: WorkloadKeyType,
    /// The lifetime requested from the CA (it may issue a shorter one).
    pub cert_ttl: Duration,
    /// The projected service-account token file.
    pub token_file: PathBuf,
    /// When to renew and how to back off.
    pub policy: RotationPolicy,
}

/// Keeps an SVID fresh: see the module docs.
pub struct Rotation<I> {
    issuer: I,
    settings: RotationSettings,
    metrics: AgentMetrics,
    trust: CaTrust,
}

impl<I: CertificateIssuer> Rotation<I> {
    /// A rotation loop obtaining certificates from `issuer`, validating them against `trust`
    /// (which it also teaches the roots of every response that validated).
    pub fn new(
        issuer: I,
        settings: RotationSettings,
        metrics: AgentMetrics,
        trust: CaTrust,
    ) -> Self {
        Self {
            issuer,
            settings,
            metrics,
            trust,
        }
    }

    /// One attempt: read the token, generate a key and CSR, call the CA and validate the
    /// response against the roots trusted before the call. Once it validated, the response's
    /// roots are trusted too, and the SVID is returned with every root now trusted.
    /// Errors: [`RotationError`].
    pub async fn attempt(&self) -> Result<Svid, RotationError> {
        let s = &self.settings;
        let token = read_token(&s.token_file).await?;
        let identity = s.identity.clone();
        let key_type = s.key_type;
        // RSA key generation takes tens of milliseconds: keep it off the async workers.
        let (key, csr) = tokio::task::spawn_blocking(move || generate_csr(&identity, key_type))
            .await
            .map_err(|e| RotationError::Key(e.to_string()))?
            .map_err(|e| RotationError::Key(e.to_string()))?;
        let trusted = self.trust.current();
        let chain = self.issuer.issue(&csr, &token, s.cert_ttl).await?;
        let svid = Svid::from_response(
            &chain,
            &key,
            &s.identity,
            &trusted,
            OffsetDateTime::now_utc(),
        )
        .map_err(CaClientError::from)?;
        self.trust.learn(svid.response_roots());
        Ok(svid.with_roots_pem(self.trust.current().pem().to_owned()))
    }

    /// Runs until `shutdown` turns true (or its sender is dropped): obtains an SVID, publishes
    /// it on `store` once validated, sleeps until the policy's refresh time, and repeats. On
    /// failure the current SVID stays published and the attempt is retried with backoff.
    pub async fn run(self, store: SvidSender, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        let mut roots = self.trust.subscribe();
        loop {
            let span = tracing::info_span!("rotation", identity = %self.settings.identity);
            let outcome = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                outcome = self.attempt().instrument(span.clone()) => outcome,
            };
            let now = OffsetDateTime::now_utc();
            let wait = match outcome {
                Ok(svid) => {
                    failures = 0;
                    self.metrics.rotations.inc();
                    self.metrics.set_expiry(svid.not_after);
                    let wait = self.settings.policy.refresh_in(
                        now,
                        svid.not_before,
                        svid.not_after,
                        rand::random(),
                    );
                    span.in_scope(|| {
                        tracing::info!(
                            serial = %svid.serial_hex,
                            not_after = %svid.not_after,
                            refresh_in = ?wait,
                            "SVID issued"
                        );
                    });
                    roots.borrow_and_update();
                    store.send_replace(Some(Arc::new(svid)));
                    wait
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.metrics.failure(e.reason());
                    let remaining = store
                        .borrow()
                        .as_ref()
                        .and_then(|s| Duration::try_from(s.not_after - now).ok())
                        .filter(|d| !d.is_zero());
                    let wait = self
                        .settings
                        .policy
                        .retry_in(failures, remaining, rand::random());
                    span.in_scope(|| {
                        tracing::warn!(
                            error = %e,
                            failures,
                            retry_in = ?wait,
                            current_valid_for = ?remaining,
                            "SVID renewal failed; keeping the current SVID"
                        );
                    });
                    wait
                }
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    // `self.trust` holds the sender, so this never ends.
                    Ok(()) = roots.changed() => {
                        let pem = roots.borrow_and_update().pem().to_owned();
                        serve_roots(&store, pem);
                    }
                }
            }
        }
    }
}

/// Publishes the current SVID again with `roots_pem`, if there is one and its roots differ.
fn serve_roots(store: &SvidSender, roots_pem: String) {
    store.send_if_modified(|current| match current {
        Some(svid) if svid.roots_pem != roots_pem => {
            *current = Some(Arc::new(svid.with_roots_pem(roots_pem)));
            true
        }
        _ => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::testing::{FakeCa, Outcome};
    use crate::svid::SvidReceiver;

    fn settings(dir: &Path, ttl: Duration) -> RotationSettings {
        let token_file = dir.join("token");
        std::fs::write(&token_file, "token-1\n").unwrap();
        RotationSettings {
            identity: SpiffeId::for_service_account("cluster.local", "shop", "cart").unwrap(),
            key_type: WorkloadKeyType::EcdsaP256,
            cert_ttl: ttl,
            token_file,
            policy: RotationPolicy::new(0.5, 0.0, Duration::from_secs(1), Duration::from_secs(30))
                .unwrap(),
        }
    }

    struct Running {
        ca: Arc<FakeCa>,
        svids: SvidReceiver,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        metrics: AgentMetrics,
        trust: CaTrust,
        _dir: tempfile::TempDir,
    }

    impl Running {
        /// Asks the loop to stop and waits until it has.
        async fn shut_down(self) {
            self.stop.send_replace(true);
            self.task.await.unwrap();
        }
    }

    fn start(ttl: Duration, outcomes: Vec<Outcome>) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let identity = SpiffeId::for_service_account("cluster.local", "shop", "cart").unwrap();
        let ca = Arc::new(FakeCa::new(dir.path(), identity));
        ca.script(outcomes);
        let metrics = AgentMetrics::new();
        let trust = CaTrust::new(&ca.bundle());
        let rotation = Rotation::new(
            ca.clone(),
            settings(dir.path(), ttl),
            metrics.clone(),
            trust.clone(),
        );
        let (tx, svids) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(rotation.run(tx, stop_rx));
        Running {
            ca,
            svids,
            stop,
            task,
            metrics,
            trust,
            _dir: dir,
        }
    }

    /// Lets every ready task run (time is paused, so this does not advance the clock much).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        // spawn_blocking work (key generation) completes on another thread in real time.
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    async fn wait_for_calls(ca: &FakeCa, n: usize) {
        // Waiting on a channel (not polling with sleeps) lets paused time jump straight to the
        // loop's next timer.
        tokio::time::timeout(Duration::from_secs(24 * 3600), ca.wait_for_calls(n))
            .await
            .unwrap_or_else(|_| panic!("expected {n} CA calls, saw {}", ca.calls().len()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_svid_is_published_only_after_it_validates() {
        let mut r = start(
            Duration::from_secs(3600),
            vec![Outcome::WrongIdentity, Outcome::Issue],
        );
        wait_for_calls(&r.ca, 1).await;
        settle().await;
        assert!(
            r.svids.borrow().is_none(),
            "an SVID for the wrong identity must not be published"
        );
        r.svids.wait_for(Option::is_some).await.unwrap();
        let svid = r.svids.borrow().clone().unwrap();
        assert_eq!(
            svid.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert!(
            r.metrics
                .encode()
                .contains("meshid_agent_rotation_failures_total{reason=\"invalid_response\"} 1")
        );
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_svid_is_renewed_at_half_its_remaining_lifetime_with_a_new_key() {
        let mut r = start(Duration::from_secs(3600), vec![]);
        r.svids.wait_for(Option::is_some).await.unwrap();
        let first = r.svids.borrow_and_update().clone().unwrap();
        let t0 = r.ca.calls()[0].at;
        tokio::time::sleep(Duration::from_secs(1790)).await;
        assert_eq!(r.ca.calls().len(), 1, "renewed too early");
        r.svids.changed().await.unwrap();
        let second = r.svids.borrow().clone().unwrap();
        let elapsed = r.ca.calls()[1].at - t0;
        assert!(
            elapsed >= Duration::from_secs(1795) && elapsed <= Duration::from_secs(1801),
            "renewed after {elapsed:?}"
        );
        assert_ne!(first.serial_hex, second.serial_hex);
        assert_ne!(
            first.key_pem(),
            second.key_pem(),
            "every rotation must use a fresh key"
        );
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_file_is_read_again_for_every_call() {
        let r = start(Duration::from_secs(100), vec![]);
        wait_for_calls(&r.ca, 1).await;
        let token_file = r._dir.path().join("token");
        std::fs::write(&token_file, "token-2").unwrap();
        wait_for_calls(&r.ca, 2).await;
        let tokens: Vec<String> = r.ca.calls().into_iter().map(|c| c.token).collect();
        assert_eq!(tokens[..2], ["token-1".to_owned(), "token-2".to_owned()]);
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_while_the_old_svid_keeps_being_served() {
        use Outcome::{Issue, Unavailable};
        let mut r = start(
            Duration::from_secs(3600),
            vec![
                Issue,
                Unavailable,
                Unavailable,
                Unavailable,
                Unavailable,
                Unavailable,
                Unavailable,
                Unavailable,
            ],
        );
        r.svids.wait_for(Option::is_some).await.unwrap();
        let first = r.svids.borrow_and_update().clone().unwrap();
        wait_for_calls(&r.ca, 8).await;
        // Through seven failures, the first SVID stayed published.
        assert_eq!(
            r.svids.borrow().as_ref().unwrap().serial_hex,
            first.serial_hex
        );
        assert!(!r.svids.has_changed().unwrap());
        // The ninth call succeeds: the new SVID is published.
        r.svids.changed().await.unwrap();
        assert_ne!(
            r.svids.borrow().as_ref().unwrap().serial_hex,
            first.serial_hex
        );
        let calls = r.ca.calls();
        let gaps: Vec<u64> = calls
            .windows(2)
            .skip(1)
            .map(|w| (w[1].at - w[0].at).as_secs())
            .collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 30, 30], "retry gaps");
        assert!(
            r.metrics
                .encode()
                .contains("meshid_agent_rotation_failures_total{reason=\"ca_unavailable\"} 7")
        );
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_loop_while_it_is_backing_off() {
        let r = start(Duration::from_secs(3600), vec![Outcome::Unavailable; 100]);
        wait_for_calls(&r.ca, 3).await;
        r.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), r.task)
            .await
            .expect("loop did not stop")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_token_file_is_a_retried_failure_not_a_crash() {
        let r = start(Duration::from_secs(3600), vec![]);
        wait_for_calls(&r.ca, 1).await;
        std::fs::remove_file(r._dir.path().join("token")).unwrap();
        tokio::time::sleep(Duration::from_secs(1900)).await;
        settle().await;
        assert!(
            r.metrics
                .encode()
                .contains("meshid_agent_rotation_failures_total{reason=\"token\"}")
        );
        std::fs::write(r._dir.path().join("token"), "token-3").unwrap();
        wait_for_calls(&r.ca, 2).await;
        assert_eq!(r.ca.calls()[1].token, "token-3");
        r.shut_down().await;
    }

    /// The serial of the published SVID.
    fn serial(svids: &SvidReceiver) -> String {
        svids.borrow().as_ref().unwrap().serial_hex.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_validates_only_against_its_own_roots_is_refused_and_not_trusted() {
        let mut r = start(
            Duration::from_secs(3600),
            vec![Outcome::Issue, Outcome::ForeignRoot],
        );
        r.svids.wait_for(Option::is_some).await.unwrap();
        let first = serial(&r.svids);
        let trusted_before = r.trust.current();
        // The second call answers with a chain from another CA and that CA's root.
        wait_for_calls(&r.ca, 3).await;
        settle().await;
        assert!(
            r.metrics
                .encode()
                .contains("meshid_agent_rotation_failures_total{reason=\"untrusted_chain\"} 1"),
            "{}",
            r.metrics.encode()
        );
        assert_eq!(
            *r.trust.current(),
            *trusted_before,
            "the refused response's root must not become trusted"
        );
        // The third call issued normally and replaced the first SVID.
        r.svids
            .wait_for(|s| s.as_ref().unwrap().serial_hex != first)
            .await
            .unwrap();
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_root_announced_in_a_validated_response_is_trusted_when_the_ca_switches_to_it() {
        let mut r = start(Duration::from_secs(100), vec![]);
        r.svids.wait_for(Option::is_some).await.unwrap();
        let new_root = r.ca.announce_next_root();
        let new_root = crate::trust::TrustBundle::from_pem(&new_root).unwrap();
        // The next rotation returns the announced root: it validates against the old root,
        // and its bundle becomes trusted, and served.
        wait_for_calls(&r.ca, 2).await;
        r.svids
            .wait_for(|s| {
                s.as_ref()
                    .is_some_and(|s| s.roots_pem.contains(new_root.pem()))
            })
            .await
            .unwrap();
        assert!(r.trust.current().contains(&new_root.roots()[0]));
        // The CA now signs with the new root: the following rotation is accepted.
        r.ca.switch_to_next_root();
        let before = serial(&r.svids);
        wait_for_calls(&r.ca, 3).await;
        r.svids
            .wait_for(|s| s.as_ref().unwrap().serial_hex != before)
            .await
            .unwrap();
        let svid = r.svids.borrow().clone().unwrap();
        let chain = crate::pem::parse_certs(&svid.chain_pem).unwrap();
        assert_eq!(
            new_root.validate(
                &chain,
                OffsetDateTime::now_utc(),
                crate::trust::Usage::ClientAuth
            ),
            Ok(crate::trust::ValidatedPath {
                root: 0,
                intermediates: 0
            }),
            "the SVID now comes from the new root"
        );
        assert!(!r.metrics.encode().contains("rotation_failures_total{"));
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_ca_that_switches_to_a_root_it_never_announced_is_refused() {
        let mut r = start(Duration::from_secs(100), vec![]);
        r.svids.wait_for(Option::is_some).await.unwrap();
        r.ca.switch_to_next_root();
        wait_for_calls(&r.ca, 2).await;
        settle().await;
        assert!(
            r.metrics
                .encode()
                .contains("meshid_agent_rotation_failures_total{reason=\"untrusted_chain\"} 1")
        );
        assert!(!r.svids.has_changed().unwrap());
        r.shut_down().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_served_roots_follow_the_trusted_roots_without_a_new_certificate() {
        let mut r = start(Duration::from_secs(3600), vec![]);
        r.svids.wait_for(Option::is_some).await.unwrap();
        let first = r.svids.borrow_and_update().clone().unwrap();
        // The root file gains a root (step 1 of a rotation, seen through the ConfigMap).
        let other = FakeCa::new(
            r._dir.path().join("other").as_path(),
            SpiffeId::for_service_account("cluster.local", "x", "y").unwrap(),
        );
        let both = crate::trust::TrustBundle::from_ders(
            [r.ca.bundle().roots(), other.bundle().roots()].concat(),
        )
        .unwrap();
        r.trust.set_file_roots(&both);
        r.svids.changed().await.unwrap();
        let served = r.svids.borrow_and_update().clone().unwrap();
        assert_eq!(served.serial_hex, first.serial_hex, "same certificate");
        assert_eq!(served.roots_pem, both.pem());
        assert_eq!(r.ca.calls().len(), 1, "no new CA call was needed");
        r.shut_down().await;
    }
}
