//! The strict single-PEM-block check (`pem::single_block`, used on every CSR field): exactly one
//! `-----BEGIN L-----` … `-----END L-----` block with nothing but whitespace around it.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::single_block;

#[derive(Debug, Arbitrary)]
enum Space {
    Space,
    Tab,
    Cr,
    Lf,
    CrLf,
}

impl Space {
    fn text(&self) -> &'static str {
        match self {
            Space::Space => " ",
            Space::Tab => "\t",
            Space::Cr => "\r",
            Space::Lf => "\n",
            Space::CrLf => "\r\n",
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Label<'a> {
    CertificateRequest,
    Certificate,
    PrivateKey,
    /// Used only when it is a plausible label (capitals, digits, inner spaces).
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Garbage<'a> {
    text: &'a str,
    before: bool,
    /// Whitespace between the garbage and the block.
    gap: Vec<Space>,
}

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    /// Any text.
    Raw(&'a str),
    /// A well-formed block, with whitespace around it and maybe some other text too.
    Framed {
        before: Vec<Space>,
        label: Label<'a>,
        body: Vec<u8>,
        after: Vec<Space>,
        garbage: Option<Garbage<'a>>,
    },
}

fn spaces(s: &[Space]) -> String {
    s.iter().map(Space::text).collect()
}

/// An independent statement of the contract for text the check accepted: after trimming, its
/// first line is `-----BEGIN L-----`, its last `-----END L-----` with the same label, and no
/// other line begins or ends a block. (What lies between is the decoder's business.)
fn assert_one_block(pem: &str) {
    let lines: Vec<&str> = pem
        .trim()
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let [first, inner @ .., last] = lines.as_slice() else {
        panic!("accepted a block of fewer than two lines: {pem:?}");
    };
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|l| l.strip_suffix("-----"))
        .unwrap_or_else(|| panic!("accepted a malformed BEGIN line: {pem:?}"));
    assert_eq!(
        *last,
        format!("-----END {label}-----"),
        "accepted a block whose END line does not close its BEGIN line: {pem:?}"
    );
    for line in inner {
        assert!(
            !line.contains("-----BEGIN ") && !line.contains("-----END "),
            "accepted a second marker: {pem:?}"
        );
    }
}

fuzz_target!(|input: Input<'_>| match input {
    Input::Raw(text) => {
        if single_block(text).is_ok() {
            assert_one_block(text);
        }
    }
    Input::Framed {
        before,
        label,
        body,
        after,
        garbage,
    } => {
        let label = match label {
            Label::CertificateRequest => "CERTIFICATE REQUEST",
            Label::Certificate => "CERTIFICATE",
            Label::PrivateKey => "PRIVATE KEY",
            Label::Other(l) => {
                let plausible = !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
                    && !l.starts_with(' ')
                    && !l.ends_with(' ');
                if !plausible {
                    return;
                }
                l
            }
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
        let mut block = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            block.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            block.push('\n');
        }
        block.push_str(&format!("-----END {label}-----"));
        let mut text = format!("{}{block}{}", spaces(&before), spaces(&after));
        let mut only_whitespace = true;
        if let Some(g) = garbage {
            only_whitespace = g.text.trim().is_empty();
            text = if g.before {
                format!("{}{}{text}", g.text, spaces(&g.gap))
            } else {
                format!("{text}{}{}", spaces(&g.gap), g.text)
            };
        }
        let got = single_block(&text);
        if only_whitespace {
            assert!(
                got.is_ok(),
                "refused a block with only whitespace around it ({got:?}): {text:?}"
            );
            assert_one_block(&text);
        } else {
            assert!(got.is_err(), "accepted text outside the block: {text:?}");
        }
    }
});
