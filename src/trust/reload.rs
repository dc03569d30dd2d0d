//! The server's bundle: the signer's anchors plus `--extra-roots`, re-read while running.

use std::sync::Arc;

use tokio::sync::watch;

use super::bundle::{TrustBundle, TrustError};

/// Creates a watch channel publishing `bundle`.
pub fn channel(
    bundle: TrustBundle,
) -> (
    watch::Sender<Arc<TrustBundle>>,
    watch::Receiver<Arc<TrustBundle>>,
) {
    watch::channel(Arc::new(bundle))
}

/// Builds the bundle from the signer's anchors plus the PEM roots in `extra_roots_pem` (empty or
/// whitespace-only means none).
pub fn combine(
    anchors: &[String],
    extra_roots_pem: Option<&str>,
) -> Result<TrustBundle, TrustError> {
    let mut pem = anchors.concat();
    if let Some(extra) = extra_roots_pem.filter(|e| !e.trim().is_empty()) {
        // Validate the extra file on its own so that its errors are named.
        TrustBundle::from_pem(extra)?;
        pem.push_str(&crate::pem::join_pems([extra]));
    }
    TrustBundle::from_pem(&pem)
}

/// How often the extra-roots file is checked for changes.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Re-reads `path` every `interval` and publishes `anchors` + its roots whenever the result
/// differs from the current bundle. An unreadable or invalid file is logged and ignored (the
/// current bundle stays). Returns at `shutdown`.
pub async fn reload_extra_roots(
    anchors: Vec<String>,
    path: std::path::PathBuf,
    tx: watch::Sender<Arc<TrustBundle>>,
    interval: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read extra roots; keeping the current bundle");
                continue;
            }
        };
        match combine(&anchors, Some(&text)) {
            Ok(bundle) if **tx.borrow() != bundle => {
                tracing::info!(
                    roots = bundle.roots().len(),
                    "trust bundle changed; publishing"
                );
                tx.send_replace(Arc::new(bundle));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "invalid extra roots; keeping the current bundle")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{LocalSigner, Signer};
    use crate::trust::channel;

    #[tokio::test(start_paused = true)]
    async fn a_changed_extra_roots_file_is_published_and_a_broken_one_is_ignored() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let a = LocalSigner::load_or_generate(d1.path(), "td").unwrap();
        let b = LocalSigner::load_or_generate(d2.path(), "td").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.pem");
        std::fs::write(&path, "").unwrap();
        let anchors = a.trust_anchors_pem();
        let (tx, mut rx) = channel(combine(&anchors, None).unwrap());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(reload_extra_roots(
            anchors,
            path.clone(),
            tx,
            RELOAD_INTERVAL,
            stop_rx,
        ));
        std::fs::write(&path, &b.trust_anchors_pem()[0]).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().roots().len(), 2);
        std::fs::write(&path, "not pem").unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 3).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().roots().len(), 2);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
