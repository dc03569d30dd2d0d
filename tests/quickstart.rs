//! The README's first command: `meshid quickstart` issues a real certificate end to end, and the
//! result is cross-checked with the openssl CLI (an independent implementation).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::process::Command;

/// The openssl CLI's output, as text.
fn openssl(args: &[&str]) -> String {
    String::from_utf8_lossy(&common::meshid::openssl(args)).into_owned()
}

#[test]
fn the_quickstart_issues_a_certificate_that_openssl_verifies_against_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(["quickstart", "--dir"])
        .arg(dir.path())
        .args(["--namespace", "shop", "--service-account", "cart"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(
        summary.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{summary}"
    );
    let chain = dir.path().join("cert-chain.pem");
    let root = dir.path().join("root-cert.pem");
    let verified = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        root.to_str().unwrap(),
        chain.to_str().unwrap(),
    ]);
    assert!(verified.trim_end().ends_with(": OK"), "{verified}");
    let text = openssl(&["x509", "-noout", "-text", "-in", chain.to_str().unwrap()]);
    assert!(
        text.contains("X509v3 Subject Alternative Name: critical"),
        "{text}"
    );
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/shop/sa/cart"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
}

#[test]
fn the_server_refuses_to_start_with_a_clear_error_when_no_signer_is_configured() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env_remove("MESHID_CA_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ca-cert") && err.contains("signer is required"),
        "{err}"
    );
}
