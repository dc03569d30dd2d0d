//! Leader election with a `coordination.k8s.io/v1` Lease, for the controllers only (every
//! replica serves the gRPC API).
//!
//! The decision of what to do with a lease is a pure function ([`decide`]) of the lease, our
//! identity and how long its record has been seen unchanged; the loop around it publishes
//! leadership through a `watch<bool>`. As in client-go, another holder's lease expires
//! `leaseDurationSeconds` after this replica *observed* its record (holder, renew and acquire
//! times, transitions, resourceVersion) last change, on this replica's monotonic clock
//! ([`LeaseObservation`]): the holder's `renewTime` is never compared with the local clock, so
//! clock skew between replicas neither lets a live lease be stolen nor keeps a dead one.
//! A leader that cannot renew within `renew_deadline` (< `lease_duration`) steps down, so it
//! stops writing before any other replica can take the lease over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// This replica's view of the Lease, as exported (`meshid_leader{state}`, `/readyz` detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// We hold the lease and run the controllers.
    Leader,
    /// Another replica holds a live lease.
    Follower,
    /// The lease could not be read or renewed recently: nobody may be running the controllers.
    Unknown,
}

impl LeaseState {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Leader => "leader",
            LeaseState::Follower => "follower",
            LeaseState::Unknown => "unknown",
        }
    }
}

/// Label of `meshid_leader`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseStateLabels {
    /// `leader`, `follower` or `unknown`.
    pub state: &'static str,
}

/// Where the elector reports: `meshid_leader{state}` (1 for the current state, 0 for the
/// others), `meshid_lease_renew_errors_total`, and the current state for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct LeaseObserver {
    /// `meshid_leader{state}`.
    pub states: Family<LeaseStateLabels, Gauge>,
    /// Failed or timed-out lease reads and writes.
    pub renew_errors: Counter,
    current: std::sync::Arc<std::sync::Mutex<Option<(LeaseState, String)>>>,
}

impl LeaseObserver {
    fn set(&self, state: LeaseState, detail: String) {
        for s in [
            LeaseState::Leader,
            LeaseState::Follower,
            LeaseState::Unknown,
        ] {
            self.states
                .get_or_create(&LeaseStateLabels { state: s.as_str() })
                .set(i64::from(s == state));
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((state, detail));
    }

    /// The last observed state and a one-line detail (holder or error), once observed.
    pub fn current(&self) -> Option<(LeaseState, String)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Lease timing and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down. Must be < `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval between attempts.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Defaults matching client-go: 15s lease, 10s renew deadline, 2s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No lease exists: create it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it and it expired: take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Wait {
        /// The holder.
        holder: String,
    },
}

/// The parts of a Lease whose change shows that its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseRecord {
    resource_version: Option<String>,
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    duration_seconds: Option<i32>,
    transitions: Option<i32>,
}

impl LeaseRecord {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            resource_version: lease.metadata.resource_version.clone(),
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            acquire_time: spec.and_then(|s| s.acquire_time.clone()),
            duration_seconds: spec.and_then(|s| s.lease_duration_seconds),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

/// The last Lease record this replica read, and when (its own monotonic clock) it first read
/// that record. Expiry is judged from this, never from the holder's `renewTime`.
#[derive(Debug, Default)]
pub struct LeaseObservation {
    last: Option<(LeaseRecord, Instant)>,
}

impl LeaseObservation {
    /// Records `lease` as read at `now` and returns how long its record has been unchanged (zero
    /// when it just changed or was first seen).
    pub fn observe(&mut self, lease: &Lease, now: Instant) -> Duration {
        let record = LeaseRecord::of(lease);
        match &self.last {
            Some((seen, since)) if *seen == record => now.saturating_duration_since(*since),
            _ => {
                self.last = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// Decides the action for `lease` (None = absent) as `identity`, when its record has been
/// observed unchanged for `unchanged_for` (see [`LeaseObservation::observe`]). Another holder's
/// lease has expired once that reaches its `leaseDurationSeconds` (or `default_duration`).
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> LeaseAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaseAction::TakeOver
        } else {
            LeaseAction::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    if unchanged_for < duration {
        LeaseAction::Wait { holder }
    } else {
        LeaseAction::TakeOver
    }
}

fn spec_for(
    s: &LeaseSettings,
    now: Timestamp,
    previous: Option<&LeaseSpec>,
    acquire: bool,
) -> LeaseSpec {
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(s.lease_duration.as_secs()).unwrap_or(15)),
        acquire_time: if acquire {
            Some(MicroTime(now))
        } else {
            previous.and_then(|p| p.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if acquire && previous.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..Default::default()
    }
}

/// One attempt: returns `Ok(None)` when we hold the lease afterwards, `Ok(Some(holder))` when
/// another replica does. Errors are apiserver failures (including conflicts from a concurrent
/// writer).
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    s: &LeaseSettings,
    observation: &mut LeaseObservation,
) -> Result<Option<String>, kube::Error> {
    let current = api.get_opt(&s.name).await?;
    let unchanged_for = current.as_ref().map_or(Duration::ZERO, |l| {
        observation.observe(l, tokio::time::Instant::now().into_std())
    });
    // Only written into the Lease (renewTime, acquireTime), never compared with.
    let now = Timestamp::now();
    match decide(
        current.as_ref(),
        &s.identity,
        unchanged_for,
        s.lease_duration,
    ) {
        LeaseAction::Wait { holder } => Ok(Some(holder)),
        LeaseAction::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec_for(s, now, None, true)),
            };
            api.create(&PostParams::default(), &lease).await?;
            tracing::info!(lease = %s.name, identity = %s.identity, "acquired leadership");
            Ok(None)
        }
        action @ (LeaseAction::Renew | LeaseAction::TakeOver) => {
            let Some(mut lease) = current else {
                return Ok(Some(String::new()));
            };
            let acquire = action == LeaseAction::TakeOver;
            lease.spec = Some(spec_for(s, now, lease.spec.as_ref(), acquire));
            // replace carries resourceVersion: a concurrent writer makes this a 409 conflict.
            api.replace(&s.name, &PostParams::default(), &lease).await?;
            if acquire {
                tracing::info!(lease = %s.name, identity = %s.identity, "acquired leadership");
            }
            Ok(None)
        }
    }
}

/// Runs the election until `shutdown`, publishing leadership on the returned channel and the
/// lease state on `observer`. On shutdown a held lease is released (holder cleared) so a peer
/// can take over at once.
pub fn spawn_elector(
    client: kube::Client,
    s: LeaseSettings,
    observer: LeaseObserver,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let task = tokio::spawn(async move {
        let mut last_renew: Option<tokio::time::Instant> = None;
        let mut observation = LeaseObservation::default();
        loop {
            let attempt = tokio::time::timeout(
                s.retry_period.max(Duration::from_secs(1)),
                try_acquire_or_renew(&api, &s, &mut observation),
            )
            .await;
            let now = tokio::time::Instant::now();
            let observed = match attempt {
                Ok(Ok(None)) => {
                    last_renew = Some(now);
                    Some((LeaseState::Leader, s.identity.clone()))
                }
                Ok(Ok(Some(holder))) => {
                    last_renew = None;
                    Some((LeaseState::Follower, format!("held by {holder}")))
                }
                Ok(Err(e)) => {
                    observer.renew_errors.inc();
                    tracing::warn!(error = %e, lease = %s.name, "lease update failed");
                    None
                }
                Err(_) => {
                    observer.renew_errors.inc();
                    tracing::warn!(lease = %s.name, "lease update timed out");
                    None
                }
            };
            let leading = last_renew.is_some_and(|t| now.duration_since(t) < s.renew_deadline);
            match observed {
                Some((state, detail)) => observer.set(state, detail),
                // A leader keeps leading until its renew deadline; anyone else no longer knows.
                None if leading => {}
                None => observer.set(
                    LeaseState::Unknown,
                    "lease cannot be read or renewed (see meshid_lease_renew_errors_total)".into(),
                ),
            }
            if *tx.borrow() != leading {
                if !leading {
                    tracing::warn!(lease = %s.name, "lost leadership; controllers stop");
                }
                let _ = tx.send(leading);
            }
            tokio::select! {
                _ = shutdown.wait_for(|v| *v) => break,
                _ = tokio::time::sleep(s.retry_period) => {}
            }
        }
        if *tx.borrow() {
            let _ = tx.send(false);
            release(&api, &s).await;
            tracing::info!(lease = %s.name, "shutting down: released the lease");
        }
    });
    (rx, task)
}

async fn release(api: &Api<Lease>, s: &LeaseSettings) {
    let Ok(Some(mut lease)) = api.get_opt(&s.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(&s.identity) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = api.replace(&s.name, &PostParams::default(), &lease).await {
        tracing::debug!(error = %e, "releasing lease failed; it will expire");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, now: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(
                    now - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_lease_decision_follows_holder_and_how_long_the_record_stayed_unchanged() {
        let now = Timestamp::now();
        let d = secs(15);
        assert_eq!(decide(None, "a", secs(0), d), LeaseAction::Create);
        assert_eq!(
            decide(Some(&lease("a", 1, now)), "a", secs(60), d),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&lease("b", 5, now)), "a", secs(5), d),
            LeaseAction::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease("b", 5, now)), "a", secs(15), d),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide(Some(&lease("", 1, now)), "a", secs(0), d),
            LeaseAction::TakeOver
        );
    }

    /// What replica "a" decides on reading `lease` `at` (its own clock).
    fn read(obs: &mut LeaseObservation, lease: &Lease, at: Instant) -> LeaseAction {
        let unchanged_for = obs.observe(lease, at);
        decide(Some(lease), "a", unchanged_for, secs(15))
    }

    #[test]
    fn a_holder_whose_clock_is_far_behind_keeps_its_lease_while_it_renews() {
        // b's clock is an hour behind ours: every renewTime it writes is an hour in our past.
        let wall = Timestamp::now();
        let start = Instant::now();
        let mut obs = LeaseObservation::default();
        for i in 0..60u64 {
            let renewed = lease("b", 3600 - 2 * i as i64, wall);
            assert_eq!(
                read(&mut obs, &renewed, start + secs(2 * i)),
                LeaseAction::Wait { holder: "b".into() },
                "taken over after {}s although b renews every 2s",
                2 * i
            );
        }
    }

    #[test]
    fn a_holder_whose_clock_is_far_ahead_loses_its_lease_a_lease_duration_after_it_stops_renewing()
    {
        // b's clock is an hour ahead: its last renewTime stays an hour in our future.
        let wall = Timestamp::now();
        let start = Instant::now();
        let mut obs = LeaseObservation::default();
        let last = lease("b", -3600, wall);
        assert_eq!(
            read(&mut obs, &last, start),
            LeaseAction::Wait { holder: "b".into() }
        );
        assert_eq!(
            read(&mut obs, &last.clone(), start + secs(14)),
            LeaseAction::Wait { holder: "b".into() }
        );
        assert_eq!(
            read(&mut obs, &last.clone(), start + secs(15)),
            LeaseAction::TakeOver
        );
    }

    #[test]
    fn a_lease_first_seen_with_an_old_renew_time_is_not_taken_over_before_a_lease_duration() {
        let wall = Timestamp::now();
        let start = Instant::now();
        let mut obs = LeaseObservation::default();
        let stale = lease("b", 3600, wall);
        assert_eq!(
            read(&mut obs, &stale, start),
            LeaseAction::Wait { holder: "b".into() }
        );
        assert_eq!(
            read(&mut obs, &stale, start + secs(15)),
            LeaseAction::TakeOver
        );
    }

    #[test]
    fn a_changed_resource_version_alone_counts_as_a_renewal() {
        let wall = Timestamp::now();
        let start = Instant::now();
        let mut obs = LeaseObservation::default();
        let mut l = lease("b", 0, wall);
        l.metadata.resource_version = Some("1".into());
        read(&mut obs, &l, start);
        l.metadata.resource_version = Some("2".into());
        assert_eq!(
            read(&mut obs, &l, start + secs(14)),
            LeaseAction::Wait { holder: "b".into() }
        );
        assert_eq!(
            read(&mut obs, &l, start + secs(28)),
            LeaseAction::Wait { holder: "b".into() },
            "expiry counts from the last change, not from the first read"
        );
        assert_eq!(read(&mut obs, &l, start + secs(29)), LeaseAction::TakeOver);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let s = LeaseSettings::new("ns".into(), "l".into(), "me".into());
        let now = Timestamp::now();
        let prev = LeaseSpec {
            lease_transitions: Some(3),
            ..Default::default()
        };
        assert_eq!(
            spec_for(&s, now, Some(&prev), true).lease_transitions,
            Some(4)
        );
        assert_eq!(
            spec_for(&s, now, Some(&prev), false).lease_transitions,
            Some(3)
        );
        assert_eq!(spec_for(&s, now, None, true).lease_transitions, Some(0));
    }
}

#[cfg(test)]
mod elector_tests {
    use super::*;

    /// A Kubernetes client for a loopback port nobody listens on.
    fn unreachable_client() -> kube::Client {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let url: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_lease_is_reported_as_unknown_with_renew_errors_and_no_leadership() {
        let observer = LeaseObserver::default();
        let mut s = LeaseSettings::new("ns".into(), "lease".into(), "me".into());
        s.retry_period = Duration::from_millis(50);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (leading, task) = spawn_elector(unreachable_client(), s, observer.clone(), stop_rx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while observer.renew_errors.get() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(observer.renew_errors.get() >= 2);
        let (state, detail) = observer.current().expect("observed");
        assert_eq!(state, LeaseState::Unknown);
        assert!(detail.contains("cannot be read"), "{detail}");
        let gauge = |s: LeaseState| {
            observer
                .states
                .get_or_create(&LeaseStateLabels { state: s.as_str() })
                .get()
        };
        assert_eq!(
            (
                gauge(LeaseState::Unknown),
                gauge(LeaseState::Leader),
                gauge(LeaseState::Follower)
            ),
            (1, 0, 0)
        );
        assert!(!*leading.borrow());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
