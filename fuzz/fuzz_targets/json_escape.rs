//! The JSON log line escaper (`telemetry::json`): every key and string value of a log line goes
//! through it. Its output must be one JSON string, on one line, that decodes to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::json_string;

fuzz_target!(|input: &str| {
    let mut out = String::new();
    json_string(&mut out, input).expect("writing to a String never fails");
    assert!(out.len() >= 2 && out.starts_with('"') && out.ends_with('"'));
    assert!(
        !out.bytes().any(|b| b < 0x20),
        "a raw control character (line break) escaped the escaper: {out:?}"
    );
    let decoded: String =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not valid JSON ({e}): {out:?}"));
    assert_eq!(decoded, input);
});
