//! aws-lc-rs, the crypto library rustls links: the process-wide rustls provider, and SHA-256
//! from it, so that no second SHA-2 implementation is compiled in. The digest is used for cache
//! keys, idempotency tokens and resource versions; never for anything that needs a
//! secret-dependent constant-time comparison.

use aws_lc_rs::digest::{Context, SHA256};

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent). rustls cannot choose
/// one itself when, as here, kube's and the AWS SDK's features name more than one.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An incremental SHA-256.
pub(crate) struct Sha256(Context);

impl Sha256 {
    pub(crate) fn new() -> Self {
        Self(Context::new(&SHA256))
    }

    pub(crate) fn update(&mut self, bytes: impl AsRef<[u8]>) {
        self.0.update(bytes.as_ref());
    }

    pub(crate) fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }

    /// The digest of `bytes` in one call.
    #[cfg_attr(not(feature = "server"), allow(dead_code))] // server-side callers only
    pub(crate) fn digest(bytes: impl AsRef<[u8]>) -> [u8; 32] {
        let mut h = Self::new();
        h.update(bytes);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::Sha256;

    #[test]
    fn sha256_matches_the_fips_180_test_vector_in_one_call_and_incrementally() {
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex::encode(Sha256::digest(b"abc")), want);
        let mut h = Sha256::new();
        h.update(b"a");
        h.update([b'b']);
        h.update(b"c".as_slice());
        assert_eq!(hex::encode(h.finalize()), want);
    }
}
