//! Optional file output (`--write-files DIR`) for workloads that read their certificate from
//! disk: `root-cert.pem`, `key.pem` (mode 0600) and `cert-chain.pem`, rewritten on every
//! rotation, each atomically (temporary file in the same directory, then rename).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use crate::svid::{Svid, SvidReceiver};

/// The chain (leaf first).
pub const CHAIN_FILE: &str = "cert-chain.pem";
/// The private key, PKCS#8 PEM, mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// The trust bundle.
pub const ROOT_FILE: &str = "root-cert.pem";

/// Writing the SVID files failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// The output directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written or renamed into place.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn write_atomically(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), FilesError> {
    let target = dir.join(name);
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    let err = |source| FilesError::Write {
        path: target.display().to_string(),
        source,
    };
    // Remove a leftover temporary file so that the mode below applies to a new file.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, &target).map_err(err)
}

/// Writes `svid` into `dir` (created if needed): the roots first and the chain last, so that a
/// reader that watches `cert-chain.pem` finds the matching key already in place.
pub fn write_svid(dir: &Path, svid: &Svid) -> Result<(), FilesError> {
    std::fs::create_dir_all(dir).map_err(|source| FilesError::CreateDir {
        path: dir.display().to_string(),
        source,
    })?;
    write_atomically(dir, ROOT_FILE, svid.roots_pem.as_bytes(), 0o644)?;
    write_atomically(dir, KEY_FILE, svid.key_pem().as_bytes(), 0o600)?;
    write_atomically(dir, CHAIN_FILE, svid.chain_pem.as_bytes(), 0o644)
}

/// Writes every SVID published on `svids` into `dir` until `shutdown` turns true. Failures are
/// logged and retried at the next rotation.
pub async fn run_file_sink(
    dir: PathBuf,
    mut svids: SvidReceiver,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let current = svids.borrow_and_update().clone();
        if let Some(svid) = current {
            let target = dir.clone();
            let serial = svid.serial_hex.clone();
            match tokio::task::spawn_blocking(move || write_svid(&target, &svid)).await {
                Ok(Ok(())) => tracing::info!(dir = %dir.display(), %serial, "wrote SVID files"),
                Ok(Err(e)) => tracing::error!(error = %e, "writing SVID files failed"),
                Err(e) => tracing::error!(error = %e, "writing SVID files panicked"),
            }
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = svids.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::agent::testing::FakeCa;
    use crate::identity::SpiffeId;

    #[test]
    fn the_three_files_are_written_with_the_key_private_and_no_temporary_files_left() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::new(
            dir.path(),
            SpiffeId::for_service_account("cluster.local", "ns", "sa").unwrap(),
        );
        let out = dir.path().join("out");
        let a = ca.svid(Duration::from_secs(60));
        write_svid(&out, &a).unwrap();
        let b = ca.svid(Duration::from_secs(60));
        write_svid(&out, &b).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join(CHAIN_FILE)).unwrap(),
            b.chain_pem
        );
        assert_eq!(
            std::fs::read_to_string(out.join(KEY_FILE)).unwrap(),
            b.key_pem()
        );
        assert_eq!(
            std::fs::read_to_string(out.join(ROOT_FILE)).unwrap(),
            ca.roots_pem()
        );
        let mode = std::fs::metadata(out.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [CHAIN_FILE, KEY_FILE, ROOT_FILE]);
    }

    #[test]
    fn an_unwritable_directory_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let ca = FakeCa::new(
            dir.path(),
            SpiffeId::for_service_account("cluster.local", "ns", "sa").unwrap(),
        );
        let err = write_svid(&blocker.join("sub"), &ca.svid(Duration::from_secs(60))).unwrap_err();
        assert!(matches!(err, FilesError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("file/sub"), "{err}");
    }
}
