//! The roots the agent trusts for its CA, following the CA's own trust while it runs.
//!
//! Two sources, combined (file roots first, duplicates dropped):
//! - `--ca-root-file`, re-read every [`ROOT_FILE_POLL_INTERVAL`]: in Kubernetes it is the
//!   `istio-ca-root-cert` ConfigMap, which the kubelet changes in place (a `..data` symlink
//!   swap);
//! - the root bundle of the last CreateCertificate response that validated. A response is only
//!   ever validated against the roots trusted *before* it arrived, never against the roots it
//!   carries; once it has validated, its roots are trusted for the next connection.
//!
//! Roots leave the set when the source that brought them drops them: the next validated
//! response replaces the learned roots, and a root file that stops listing a root also drops
//! it from the learned roots (the file retired it). The CA client is rebuilt from the published
//! set before its next call, and the SDS `ROOTCA` resource follows it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::trust::{TrustBundle, TrustError};

/// How often `--ca-root-file` is read again.
pub const ROOT_FILE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The two sources of trusted roots and how they combine. Pure: no I/O, no time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowedRoots {
    file: Vec<CertificateDer<'static>>,
    learned: Vec<CertificateDer<'static>>,
}

impl FollowedRoots {
    /// Trusting what the root file holds, and nothing learned yet.
    pub fn new(file: &TrustBundle) -> Self {
        Self {
            file: file.roots().to_vec(),
            learned: Vec::new(),
        }
    }

    /// The root file now holds `new`. Learned roots that the previous file listed and `new`
    /// does not are dropped with it; other learned roots stay until the next response.
    pub fn file_changed(&mut self, new: &TrustBundle) {
        let old = std::mem::replace(&mut self.file, new.roots().to_vec());
        self.learned
            .retain(|r| !old.contains(r) || self.file.contains(r));
    }

    /// A response that validated against [`Self::bundle`] carried `roots`: they replace the
    /// roots learned before.
    pub fn response_validated(&mut self, roots: &TrustBundle) {
        self.learned = roots.roots().to_vec();
    }

    /// The roots trusted now: the file's, then the learned ones, without duplicates. Both
    /// parts come from valid bundles, so this fails only if that invariant is broken.
    pub fn bundle(&self) -> Result<TrustBundle, TrustError> {
        TrustBundle::from_ders(self.file.iter().chain(&self.learned).cloned().collect())
    }
}

/// The agent's trusted CA roots, shared by the rotation loop (which learns from responses), the
/// root-file watcher and the CA client, and published on a `watch` channel.
#[derive(Clone)]
pub struct CaTrust {
    state: Arc<Mutex<FollowedRoots>>,
    tx: Arc<watch::Sender<Arc<TrustBundle>>>,
}

impl std::fmt::Debug for CaTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaTrust")
            .field("roots", &self.current().roots().len())
            .finish()
    }
}

impl CaTrust {
    /// Trusting the roots of the root file, `file`.
    pub fn new(file: &TrustBundle) -> Self {
        let state = FollowedRoots::new(file);
        let (tx, _) = watch::channel(Arc::new(file.clone()));
        Self {
            state: Arc::new(Mutex::new(state)),
            tx: Arc::new(tx),
        }
    }

    /// The roots trusted now.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.tx.borrow().clone()
    }

    /// Every change of the trusted roots, starting from the current ones.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.tx.subscribe()
    }

    /// Trusts the roots of a response that validated: see [`FollowedRoots::response_validated`].
    pub fn learn(&self, response_roots: &TrustBundle) {
        self.update(|s| s.response_validated(response_roots));
    }

    /// The root file changed: see [`FollowedRoots::file_changed`].
    pub fn set_file_roots(&self, file: &TrustBundle) {
        self.update(|s| s.file_changed(file));
    }

    fn update(&self, change: impl FnOnce(&mut FollowedRoots)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        let next = match state.bundle() {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "cannot combine the CA roots; keeping the trusted roots");
                return;
            }
        };
        self.tx.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            tracing::info!(
                roots = next.roots().len(),
                previous = current.roots().len(),
                "trusted CA roots changed"
            );
            *current = Arc::new(next);
            true
        });
    }
}

/// Reads `path` every `interval` and, whenever its content changed and holds a valid bundle,
/// hands it to `trust`. A missing, unreadable or invalid file is logged once per content and
/// otherwise ignored (the roots trusted so far stay). Returns at `shutdown`.
pub async fn watch_root_file(
    path: PathBuf,
    trust: CaTrust,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<Result<String, String>> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let read = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| e.to_string());
        if last.as_ref() == Some(&read) {
            continue;
        }
        match &read {
            Ok(text) => match TrustBundle::from_pem(text) {
                Ok(bundle) => trust.set_file_roots(&bundle),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "invalid CA root file; keeping the trusted roots")
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read CA root file; keeping the trusted roots")
            }
        }
        last = Some(read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{LocalSigner, Signer};

    fn roots(n: usize) -> (Vec<tempfile::TempDir>, Vec<TrustBundle>) {
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let bundles = dirs
            .iter()
            .map(|d| {
                let s = LocalSigner::load_or_generate(d.path(), "td").unwrap();
                TrustBundle::from_pem(&s.trust_anchors_pem()[0]).unwrap()
            })
            .collect();
        (dirs, bundles)
    }

    fn union(parts: &[&TrustBundle]) -> TrustBundle {
        TrustBundle::from_ders(parts.iter().flat_map(|b| b.roots().to_vec()).collect()).unwrap()
    }

    #[test]
    fn roots_from_a_validated_response_are_added_to_the_files_and_replace_earlier_ones() {
        let (_d, r) = roots(3);
        let mut f = FollowedRoots::new(&r[0]);
        assert_eq!(f.bundle().unwrap(), r[0]);
        f.response_validated(&union(&[&r[0], &r[1]]));
        assert_eq!(f.bundle().unwrap(), union(&[&r[0], &r[1]]));
        // The CA's next bundle no longer lists root 1: it is not trusted any more.
        f.response_validated(&r[2]);
        assert_eq!(f.bundle().unwrap(), union(&[&r[0], &r[2]]));
    }

    #[test]
    fn a_root_the_file_drops_is_dropped_from_the_learned_roots_too() {
        let (_d, r) = roots(3);
        let mut f = FollowedRoots::new(&union(&[&r[0], &r[1]]));
        f.response_validated(&union(&[&r[0], &r[1], &r[2]]));
        // The file retires root 0: it goes, although the last response listed it. Root 2, which
        // the file never listed, stays until a response drops it.
        f.file_changed(&r[1]);
        assert_eq!(f.bundle().unwrap(), union(&[&r[1], &r[2]]));
        // A file that adds a root adds it.
        f.file_changed(&union(&[&r[1], &r[0]]));
        assert_eq!(f.bundle().unwrap(), union(&[&r[1], &r[0], &r[2]]));
    }

    #[test]
    fn a_change_is_published_once_and_an_unchanged_set_is_not_published() {
        let (_d, r) = roots(2);
        let trust = CaTrust::new(&r[0]);
        let mut rx = trust.subscribe();
        trust.learn(&r[0]);
        assert!(!rx.has_changed().unwrap(), "nothing new was trusted");
        trust.learn(&union(&[&r[0], &r[1]]));
        assert!(rx.has_changed().unwrap());
        assert_eq!(**rx.borrow_and_update(), union(&[&r[0], &r[1]]));
        assert_eq!(*trust.current(), union(&[&r[0], &r[1]]));
    }

    /// Replaces `dir/root-cert.pem` the way the kubelet updates a projected ConfigMap: a new
    /// timestamped directory, a new `..data` symlink renamed over the old one.
    fn kubelet_write(dir: &std::path::Path, generation: u32, pem: &str) {
        let data = dir.join(format!("..gen{generation}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("root-cert.pem"), pem).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..gen{generation}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        let link = dir.join("root-cert.pem");
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink("..data/root-cert.pem", &link).unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_root_file_swapped_in_place_by_the_kubelet_is_followed_and_garbage_is_ignored() {
        let (_d, r) = roots(2);
        let dir = tempfile::tempdir().unwrap();
        kubelet_write(dir.path(), 1, r[0].pem());
        let trust = CaTrust::new(&r[0]);
        let mut rx = trust.subscribe();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_root_file(
            dir.path().join("root-cert.pem"),
            trust.clone(),
            ROOT_FILE_POLL_INTERVAL,
            stop_rx,
        ));
        let both = union(&[&r[0], &r[1]]);
        kubelet_write(dir.path(), 2, both.pem());
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow_and_update(), both);
        kubelet_write(dir.path(), 3, "not a certificate");
        tokio::time::sleep(ROOT_FILE_POLL_INTERVAL * 3).await;
        assert!(!rx.has_changed().unwrap());
        kubelet_write(dir.path(), 4, r[1].pem());
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow_and_update(), r[1]);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
