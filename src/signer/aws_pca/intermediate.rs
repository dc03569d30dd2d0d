//! Intermediate mode: PCA issues meshid a short-lived subordinate CA certificate for a key
//! meshid generates; SVIDs are signed locally with it ([`LocalSigner`]), and the intermediate
//! is replaced well before it expires.
//!
//! When to renew is a pure function of the current intermediate ([`renew_at`]); the loop
//! ([`IntermediateRenewal::run`]) only sleeps until then, mints the next intermediate, checks
//! that it chains to the trust bundle, and then publishes it through a `watch` channel. Leaves
//! already issued by the previous intermediate stay valid: it is never revoked, only retired.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::PcaError;
use super::limit::Backoff;
use super::request::{intermediate_csr, intermediate_issue_request, split_chain};
use super::upstream::Upstream;
use crate::pem::cert_to_pem;
use futures::future::BoxFuture;

use crate::signer::{IssuedChain, LocalSigner, SignRequest, Signer, SignerError};
use crate::trust::TrustBundle;

/// Renewal starts this long before the last moment a full-length leaf could still be issued.
pub const RENEW_MARGIN: Duration = Duration::from_secs(3600);
/// How far before issuance PCA sets a certificate's notBefore.
pub const PCA_BACKDATE: Duration = Duration::from_secs(3600);
/// The settings must not let meshid mint intermediates more often than this.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(3600);
/// No leaf is cut shorter than this (or than its requested lifetime, if shorter) by the
/// intermediate's expiry: once the intermediate expires sooner, signing is unavailable until
/// it is renewed. Renewal starts at least `--max-ttl` + [`RENEW_MARGIN`] before expiry, so this
/// is reached only after PCA has failed for over an hour.
pub const LEAF_FLOOR: Duration = Duration::from_secs(600);
/// Delays between failed renewal attempts while the intermediate can still sign.
const RETRY: Backoff = Backoff {
    base: Duration::from_secs(10),
    cap: Duration::from_secs(600),
};
/// Delays between failed renewal attempts once it cannot (expired, or within [`LEAF_FLOOR`] of
/// expiry): signing is down, so PCA's return must be noticed within seconds.
const URGENT_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(5),
};

/// The time from one intermediate's issuance to its renewal for the settings `ttl` and
/// `max_leaf_ttl`, counting PCA's notBefore backdating ([`PCA_BACKDATE`]), which moves
/// half-life earlier: the shortest interval at which meshid mints intermediates.
pub fn renewal_interval(ttl: Duration, max_leaf_ttl: Duration) -> Duration {
    let issued = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(10 * 365 * 86_400);
    let at = renew_at(issued - PCA_BACKDATE, issued + ttl, max_leaf_ttl);
    Duration::try_from(at - issued).unwrap_or(Duration::ZERO)
}

/// The shortest `--pca-intermediate-ttl` allowed with `--max-ttl` = `max_leaf_ttl`: twice the
/// leaf lifetime (so renewal never cuts a leaf short), and long enough that
/// [`renewal_interval`] is at least [`MIN_RENEWAL_INTERVAL`].
pub fn min_intermediate_ttl(max_leaf_ttl: Duration) -> Duration {
    // renewal_interval = max(ttl - max_leaf_ttl - RENEW_MARGIN, (ttl - PCA_BACKDATE) / 2).
    let by_rate = (max_leaf_ttl + RENEW_MARGIN + MIN_RENEWAL_INTERVAL)
        .min(PCA_BACKDATE + MIN_RENEWAL_INTERVAL * 2);
    (max_leaf_ttl * 2).max(by_rate)
}

/// How long to wait before renewal attempt `failures + 1`, at `now`, for an intermediate
/// expiring at `not_after`: the usual backoff while it can still sign (never sleeping past the
/// moment it stops), then at most a few seconds.
pub fn retry_delay(failures: u32, now: OffsetDateTime, not_after: OffsetDateTime) -> Duration {
    let stops_signing = not_after - LEAF_FLOOR;
    match Duration::try_from(stops_signing - now) {
        Ok(left) if !left.is_zero() => RETRY.jittered(failures).min(left),
        _ => URGENT_RETRY.jittered(failures),
    }
}

/// When to replace an intermediate valid from `not_before` to `not_after`, given the longest
/// leaf we issue: early enough that every leaf signed before then gets its full lifetime
/// (`not_after - max_leaf_ttl - RENEW_MARGIN`), but never before half its life, so an
/// unexpectedly short certificate cannot make us call PCA in a loop.
pub fn renew_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    max_leaf_ttl: Duration,
) -> OffsetDateTime {
    let full_leaves_until = not_after - max_leaf_ttl - RENEW_MARGIN;
    let half_life = not_before + (not_after - not_before) / 2;
    full_leaves_until.max(half_life)
}

/// What the intermediate is made from.
#[derive(Debug, Clone)]
pub struct IntermediateSettings {
    /// Trust domain (the intermediate's subject O).
    pub trust_domain: String,
    /// Requested lifetime of each intermediate.
    pub ttl: Duration,
    /// Longest leaf lifetime issued (drives [`renew_at`]).
    pub max_leaf_ttl: Duration,
    /// PCA signing algorithm for the CA's key.
    pub signing_algorithm: &'static str,
}

/// A minted intermediate, ready to sign.
pub struct Minted {
    signer: Arc<LocalSigner>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial_hex: String,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("serial", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Has PCA certify `key` (whose CSR is `csr_der`) as a subordinate CA and checks the result:
/// the key matches, it is a CA with keyCertSign, and its path validates against `bundle` now
/// ([`LocalSigner::from_pem`] checks all of it with `trust::validate_chain`). Nothing is
/// published here. Retrying with the same key and CSR reuses the idempotency token, so a
/// certificate PCA already issued (e.g. when `GetCertificate` failed) is returned instead of a
/// second one.
pub async fn mint(
    upstream: &Upstream,
    settings: &IntermediateSettings,
    bundle: &TrustBundle,
    key: &KeyPair,
    csr_der: &[u8],
) -> Result<Minted, PcaError> {
    let req = intermediate_issue_request(
        upstream.ca_arn(),
        settings.signing_algorithm,
        csr_der,
        settings.ttl,
        OffsetDateTime::now_utc(),
    );
    let got = upstream.issue(&req, "intermediate").await?;
    let split = split_chain(&got, bundle.roots())?;
    let chain = crate::pem::join_pems(split.intermediates_pem.iter().map(String::as_str));
    let signer = LocalSigner::from_pem(
        &split.leaf_pem,
        &key.serialize_pem(),
        (!chain.is_empty()).then_some(chain.as_str()),
        Some(bundle.pem()),
    )
    .map_err(|e| PcaError::InvalidCertificate(format!("intermediate: {e}")))?;
    Ok(Minted {
        signer: Arc::new(signer),
        not_before: split.not_before,
        not_after: split.not_after,
        serial_hex: split.serial_hex,
    })
}

/// Signs with the current PCA-issued intermediate.
pub struct IntermediateSigner {
    current: watch::Receiver<Arc<LocalSigner>>,
    roots_pem: Vec<String>,
}

impl std::fmt::Debug for IntermediateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntermediateSigner")
            .field("current", &*self.current.borrow())
            .finish_non_exhaustive()
    }
}

impl Signer for IntermediateSigner {
    fn name(&self) -> &'static str {
        "aws-pca-intermediate"
    }

    fn trust_anchors_pem(&self) -> Vec<String> {
        self.roots_pem.clone()
    }

    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<IssuedChain, SignerError>> {
        let current = self.current.borrow().clone();
        Box::pin(async move {
            // Leaves are cut at the intermediate's expiry; never below the floor.
            let floor = req.ttl.min(LEAF_FLOOR);
            if current.ca_not_after() - OffsetDateTime::now_utc() < floor {
                return Err(PcaError::IntermediateExpired.into());
            }
            current.sign_now(&req)
        })
    }
}

/// Keeps the intermediate fresh; run it with [`IntermediateRenewal::run`].
pub struct IntermediateRenewal {
    upstream: Arc<Upstream>,
    settings: IntermediateSettings,
    bundle: TrustBundle,
    current: watch::Sender<Arc<LocalSigner>>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    expiry: Option<Gauge>,
    /// The key (and CSR) of a renewal that failed, reused until one succeeds.
    pending: Option<(KeyPair, Vec<u8>)>,
}

impl std::fmt::Debug for IntermediateRenewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntermediateRenewal")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Mints the first intermediate and returns the signer using it and the renewal that keeps it
/// fresh. `expiry` (if given) is set to the current intermediate's expiry, Unix seconds.
pub async fn start(
    upstream: Arc<Upstream>,
    settings: IntermediateSettings,
    bundle: TrustBundle,
    expiry: Option<Gauge>,
) -> Result<(IntermediateSigner, IntermediateRenewal), PcaError> {
    let (key, csr_der) = intermediate_csr(&settings.trust_domain)?;
    let first = mint(&upstream, &settings, &bundle, &key, &csr_der).await?;
    tracing::info!(
        serial = %first.serial_hex,
        not_after = %first.not_after,
        renew_at = %renew_at(first.not_before, first.not_after, settings.max_leaf_ttl),
        "AWS Private CA issued meshid's intermediate"
    );
    if let Some(g) = &expiry {
        g.set(first.not_after.unix_timestamp());
    }
    let (tx, rx) = watch::channel(first.signer);
    let roots_pem = bundle.roots().iter().map(|r| cert_to_pem(r)).collect();
    Ok((
        IntermediateSigner {
            current: rx,
            roots_pem,
        },
        IntermediateRenewal {
            upstream,
            settings,
            bundle,
            current: tx,
            not_before: first.not_before,
            not_after: first.not_after,
            expiry,
            pending: None,
        },
    ))
}

impl IntermediateRenewal {
    /// When the current intermediate will be replaced.
    pub fn renew_at(&self) -> OffsetDateTime {
        renew_at(self.not_before, self.not_after, self.settings.max_leaf_ttl)
    }

    /// Mints the next intermediate and, once it verified, switches signing to it. After a
    /// failure the next call reuses the same key and CSR (and so the idempotency token).
    pub async fn renew_now(&mut self) -> Result<(), PcaError> {
        let (key, csr_der) = match self.pending.take() {
            Some(pending) => pending,
            None => intermediate_csr(&self.settings.trust_domain)?,
        };
        let next = match mint(&self.upstream, &self.settings, &self.bundle, &key, &csr_der).await {
            Ok(next) => next,
            Err(e) => {
                self.pending = Some((key, csr_der));
                return Err(e);
            }
        };
        self.not_before = next.not_before;
        self.not_after = next.not_after;
        if let Some(g) = &self.expiry {
            g.set(next.not_after.unix_timestamp());
        }
        tracing::info!(
            serial = %next.serial_hex,
            not_after = %next.not_after,
            renew_at = %self.renew_at(),
            "switched to a new PCA-issued intermediate"
        );
        self.current.send_replace(next.signer);
        Ok(())
    }

    /// Renews at [`renew_at`] until `shutdown` turns true; failed renewals are retried with
    /// backoff (the current intermediate keeps signing until it expires).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = Duration::try_from(self.renew_at() - OffsetDateTime::now_utc())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut failures = 0;
            loop {
                let renewed = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    r = self.renew_now() => r,
                };
                match renewed {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            not_after = %self.not_after,
                            "renewing the PCA-issued intermediate failed; retrying"
                        );
                        let delay =
                            retry_delay(failures, OffsetDateTime::now_utc(), self.not_after);
                        failures = failures.saturating_add(1);
                        tokio::select! {
                            _ = shutdown.wait_for(|s| *s) => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{LeafProfile, SpiffeId};
    use crate::pem::parse_certs;
    use x509_parser::prelude::{FromDer, X509Certificate};

    #[tokio::test]
    async fn a_short_leaf_from_the_intermediate_is_backdated_by_at_most_a_tenth_of_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalSigner::load_or_generate(dir.path(), "td").unwrap());
        let (_tx, current) = watch::channel(ca);
        let signer = IntermediateSigner {
            current,
            roots_pem: Vec::new(),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = signer
            .sign(SignRequest {
                profile: LeafProfile::Workload(
                    SpiffeId::for_service_account("td", "a", "b").unwrap(),
                ),
                spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
                ttl: Duration::from_secs(20),
                max_backdate: Duration::from_secs(60),
                csr_der: None,
            })
            .await
            .unwrap();
        let der = parse_certs(&issued.leaf_pem).unwrap().remove(0);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let v = leaf.validity();
        // 20s from issuance plus a 2s backdate (whole seconds, so +-1s).
        let lifetime = (v.not_after.to_datetime() - v.not_before.to_datetime()).whole_seconds();
        assert!((21..=23).contains(&lifetime), "{lifetime}s");
    }
}
