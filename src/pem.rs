//! Small PEM helpers shared by the signer, trust bundle and agent: decoding with
//! rustls-pki-types' `PemObject`, encoding with the `pem` crate.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A PEM input could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// No `CERTIFICATE` block was found.
    #[error("no PEM certificate found")]
    NoCertificates,
    /// A block was present but not valid PEM/base64.
    #[error("invalid PEM: {0}")]
    Invalid(String),
    /// No PEM block at all.
    #[error("no PEM block found")]
    NoBlock,
    /// More than one PEM block where exactly one is expected.
    #[error("more than one PEM block")]
    MultipleBlocks,
    /// Text other than whitespace before or after the PEM block, or after its BEGIN or END
    /// marker on the same line, or an END marker whose label is not the BEGIN marker's.
    #[error("text outside the PEM block")]
    TextAround,
}

/// Checks that `pem` is exactly one PEM block (`-----BEGIN …-----` … `-----END …-----`) with
/// nothing but whitespace before and after it. The block's content is not decoded here.
///
/// Our own, beside the standard parsers: rustls-pki-types' `PemObject` and the `pem` crate
/// both skip any text around the blocks they find (as RFC 7468 allows), so neither can refuse
/// "garbage, then a CSR" or a second block; this check is what makes the CSR parser strict.
pub fn single_block(pem: &str) -> Result<(), PemError> {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    const DASHES: &str = "-----";
    let begins = pem.matches(BEGIN).count();
    let ends = pem.matches(END).count();
    match (begins, ends) {
        (0, _) | (_, 0) => return Err(PemError::NoBlock),
        (1, 1) => {}
        _ => return Err(PemError::MultipleBlocks),
    }
    // The first and last lines must be the markers, whole, with the same label: text after a
    // marker on its own line is text outside the block too (found by the pem_split fuzz target).
    let mut lines = pem.trim().lines();
    fn label<'a>(line: Option<&'a str>, marker: &str) -> Option<&'a str> {
        line?.strip_prefix(marker)?.strip_suffix(DASHES)
    }
    let begin = label(lines.next(), BEGIN);
    let end = label(lines.next_back(), END);
    match (begin, end) {
        (Some(b), Some(e)) if b == e => Ok(()),
        _ => Err(PemError::TextAround),
    }
}

/// Parses every `CERTIFICATE` block in `pem`, in order. Fails when there is none.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Encodes `der` as one PEM block labelled `label` (64-column lines, LF endings, a trailing
/// newline), with the `pem` crate (already linked through rcgen).
pub fn encode(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

/// Encodes one DER certificate as PEM (with a trailing newline).
pub fn cert_to_pem(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

/// Joins PEM documents so that each starts on its own line, even when one lacks a trailing
/// newline (AWS PCA and moto return such PEMs).
pub fn join_pems<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for part in parts {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        out.push_str(part);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_pems_without_trailing_newlines_keeps_blocks_apart() {
        let a = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let joined = join_pems([a, a]);
        assert_eq!(joined.matches("-----END CERTIFICATE-----\n").count(), 2);
        assert!(!joined.contains("----------"));
    }

    #[test]
    fn exactly_one_block_with_only_whitespace_around_it_is_a_single_block() {
        let block = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----";
        assert!(single_block(block).is_ok());
        assert!(single_block(&format!(" \r\n\t{block}\r\n \n")).is_ok());
        assert!(matches!(
            single_block(&format!("garbage\n{block}\n")),
            Err(PemError::TextAround)
        ));
        assert!(matches!(
            single_block(&format!("{block}\ntrailing")),
            Err(PemError::TextAround)
        ));
        assert!(matches!(
            single_block(&format!("{block}-x")),
            Err(PemError::TextAround)
        ));
        assert!(matches!(
            single_block(&format!("{block}\n{block}\n")),
            Err(PemError::MultipleBlocks)
        ));
        assert!(matches!(single_block("AAAA"), Err(PemError::NoBlock)));
    }

    #[test]
    fn text_after_a_marker_on_its_line_or_mismatched_labels_are_refused() {
        // Inputs the pem_split fuzz target found accepted (the first) or that the same rule covers.
        let cases = [
            "-----BEGIN CERTIFICATE REQUEST-----:MIIB\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----x-----",
            "-----BEGIN CERTIFICATE REQUEST----- x\nAAAA\n-----END CERTIFICATE REQUEST-----",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE-----",
            "-----BEGIN CERTIFICATE REQUEST-----AAAA-----END CERTIFICATE REQUEST-----",
        ];
        for pem in cases {
            assert!(
                matches!(single_block(pem), Err(PemError::TextAround)),
                "{pem:?}"
            );
        }
        let crlf = "-----BEGIN X-----\r\nAAAA\r\n-----END X-----\r\n";
        assert!(single_block(crlf).is_ok());
    }

    #[test]
    fn a_pem_without_certificates_is_rejected() {
        assert!(matches!(
            parse_certs("hello"),
            Err(PemError::NoCertificates)
        ));
    }

    #[test]
    fn a_certificate_round_trips_through_pem() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .expect("cert");
        let pem = cert_to_pem(cert.der());
        let back = parse_certs(&pem).expect("parse");
        assert_eq!(back[0].as_ref(), cert.der().as_ref());
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// Whitespace as it surrounds PEM in the wild: spaces, tabs, CR, LF.
        fn whitespace() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![Just(" "), Just("\t"), Just("\r"), Just("\n")],
                0..8,
            )
            .prop_map(|v| v.concat())
        }

        /// Text that is not only whitespace, including near-misses of PEM markers.
        fn garbage() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[-A-Za-z ]{0,12}-----",
                "-----[-A-Z ]{0,12}",
                "[^ \t\r\n]",
            ]
            .prop_filter("not only whitespace", |g| !g.trim().is_empty())
        }

        /// One block (no surrounding whitespace) holding `der`.
        fn block(der: &[u8]) -> String {
            cert_to_pem(der).trim().to_owned()
        }

        proptest! {
            #[test]
            fn a_valid_block_survives_arbitrary_surrounding_whitespace(
                before in whitespace(),
                after in whitespace(),
                der in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                let text = format!("{before}{}{after}", block(&der));
                prop_assert!(single_block(&text).is_ok(), "{:?}", text);
            }

            #[test]
            fn any_other_text_around_a_valid_block_is_refused(
                garbage in garbage(),
                gap in whitespace(),
                at_end in any::<bool>(),
                der in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                let text = if at_end {
                    format!("{}{gap}{garbage}", block(&der))
                } else {
                    format!("{garbage}{gap}{}", block(&der))
                };
                prop_assert!(single_block(&text).is_err(), "{:?}", text);
            }
        }
    }
}
