//! The local token pre-check (`authn::Precheck`), run on every bearer token before any
//! TokenReview. Tokens built from fuzzed claims must get exactly the verdict of an independent
//! model of the documented rules; any other text must never panic, and whatever passes must be
//! a compact JWS whose header and payload are JSON objects.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use meshid::fuzzing::{Precheck, PrecheckError};
use serde_json::{Map, Value, json};

const NOW: u64 = 1_800_000_000;
const SKEW: i64 = 60;
const AUDIENCES: [&str; 2] = ["istio-ca", "other"];
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
];

#[derive(Debug, Arbitrary)]
enum Alg<'a> {
    Known(u8),
    None,
    Hmac,
    Other(&'a str),
    Missing,
    NotAString(i64),
}

#[derive(Debug, Arbitrary)]
enum Time {
    /// Seconds relative to NOW.
    Offset(i32),
    Absolute(f64),
    Text,
    Null,
    Missing,
}

#[derive(Debug, Arbitrary)]
enum Aud<'a> {
    Ours(bool),
    Other(&'a str),
    List(Vec<Option<&'a str>>, bool),
    Number,
    Missing,
}

#[derive(Debug, Arbitrary)]
enum Iss<'a> {
    Ours,
    Other(&'a str),
    Empty,
    Number,
    Missing,
}

#[derive(Debug, Arbitrary)]
enum Shape {
    Object,
    /// The same members as a JSON array of their values, in field order.
    Array,
}

#[derive(Debug, Arbitrary)]
struct Built<'a> {
    alg: Alg<'a>,
    exp: Time,
    nbf: Time,
    aud: Aud<'a>,
    iss: Iss<'a>,
    pod: Option<bool>,
    header_shape: Shape,
    payload_shape: Shape,
    signature: &'a [u8],
    issuers_configured: bool,
    kid: bool,
}

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    Raw(&'a str),
    Built(Built<'a>),
}

fn time_value(t: &Time) -> Option<Value> {
    match t {
        Time::Offset(d) => Some(json!(NOW as i64 + i64::from(*d))),
        Time::Absolute(x) => {
            Some(serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number))
        }
        Time::Text => Some(json!("1800000000")),
        Time::Null => Some(Value::Null),
        Time::Missing => None,
    }
}

/// The time a claim value stands for, as the rules read a NumericDate.
fn numeric_date(v: &Value) -> Option<f64> {
    let t = v.as_f64()?;
    (t.is_finite() && (0.0..1e12).contains(&t)).then_some(t)
}

fn encode(members: Vec<(&str, Value)>, shape: &Shape) -> String {
    let value = match shape {
        Shape::Object => Value::Object(
            members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<Map<_, _>>(),
        ),
        Shape::Array => Value::Array(members.into_iter().map(|(_, v)| v).collect()),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&value).expect("JSON"))
}

fn check_built(b: Built<'_>) {
    let alg = match b.alg {
        Alg::Known(i) => Some(json!(ALGORITHMS[usize::from(i) % ALGORITHMS.len()])),
        Alg::None => Some(json!("none")),
        Alg::Hmac => Some(json!("HS256")),
        Alg::Other(s) => Some(json!(s)),
        Alg::Missing => None,
        Alg::NotAString(n) => Some(json!(n)),
    };
    let mut header = Vec::new();
    if let Some(a) = &alg {
        header.push(("alg", a.clone()));
    }
    if b.kid {
        header.push(("kid", json!("k")));
    }
    let aud = match &b.aud {
        Aud::Ours(second) => Some(json!(AUDIENCES[usize::from(*second)])),
        Aud::Other(s) => Some(json!(s)),
        Aud::List(items, ours) => {
            let mut list: Vec<Value> = items
                .iter()
                .map(|i| i.map_or(json!(7), |s| json!(s)))
                .collect();
            if *ours {
                list.push(json!("istio-ca"));
            }
            Some(Value::Array(list))
        }
        Aud::Number => Some(json!(1)),
        Aud::Missing => None,
    };
    let iss = match &b.iss {
        Iss::Ours => Some(json!(ISSUER)),
        Iss::Other(s) => Some(json!(s)),
        Iss::Empty => Some(json!("")),
        Iss::Number => Some(json!(3)),
        Iss::Missing => None,
    };
    let exp = time_value(&b.exp);
    let nbf = time_value(&b.nbf);
    let kubernetes = b.pod.map(|bound| {
        json!({"namespace": "ns", "pod": if bound { json!({"name": "p", "uid": "u"}) } else { Value::Null }})
    });
    // In the order of the pre-check's claim fields, so that the array shape lines them up.
    let mut payload = Vec::new();
    for (k, v) in [
        ("exp", &exp),
        ("nbf", &nbf),
        ("aud", &aud),
        ("iss", &iss),
        ("kubernetes.io", &kubernetes),
    ] {
        if let Some(v) = v {
            payload.push((k, v.clone()));
        }
    }
    let token = format!(
        "{}.{}.{}",
        encode(header, &b.header_shape),
        encode(payload, &b.payload_shape),
        URL_SAFE_NO_PAD.encode(b.signature)
    );

    // The model: the documented checks, in order.
    let expected = (|| {
        if token.len() > 8 * 1024 {
            return Err(PrecheckError::TooLong);
        }
        if b.signature.is_empty()
            || !matches!(b.header_shape, Shape::Object)
            || !matches!(b.payload_shape, Shape::Object)
        {
            return Err(PrecheckError::Malformed);
        }
        // A header `alg` that is not a string is not a JWS header.
        let alg = match &alg {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(PrecheckError::Malformed),
        };
        if !alg.is_some_and(|a| ALGORITHMS.contains(&a)) {
            return Err(PrecheckError::Algorithm);
        }
        let exp_at = exp
            .as_ref()
            .and_then(numeric_date)
            .ok_or(PrecheckError::Expired)?;
        if exp_at + SKEW as f64 <= NOW as f64 {
            return Err(PrecheckError::Expired);
        }
        match nbf.as_ref().filter(|v| !v.is_null()) {
            None => {}
            Some(v) => {
                let nbf_at = numeric_date(v).ok_or(PrecheckError::Expired)?;
                if nbf_at > (NOW as i64 + SKEW) as f64 {
                    return Err(PrecheckError::Expired);
                }
            }
        }
        let ours = |v: &Value| v.as_str().is_some_and(|s| AUDIENCES.contains(&s));
        let aud_ok = match &aud {
            Some(Value::Array(list)) => list.iter().any(ours),
            Some(v) => ours(v),
            None => false,
        };
        if !aud_ok {
            return Err(PrecheckError::Audience);
        }
        match iss.as_ref().and_then(Value::as_str) {
            Some(s) if !b.issuers_configured && !s.is_empty() => {}
            Some(s) if b.issuers_configured && s == ISSUER => {}
            _ => return Err(PrecheckError::Issuer),
        }
        Ok(b.pod == Some(true))
    })();

    let issuers = if b.issuers_configured {
        vec![ISSUER.to_owned()]
    } else {
        vec![]
    };
    let precheck = Precheck::new(AUDIENCES.iter().map(|a| (*a).to_owned()).collect(), issuers);
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let got = precheck.check(&token, now);
    match (&got, &expected) {
        (Ok(claims), Ok(pod_bound)) => {
            assert_eq!(claims.pod_bound, *pod_bound, "{token}");
            let exp_at = exp
                .as_ref()
                .and_then(numeric_date)
                .expect("model accepted exp");
            let got_at = claims
                .expires
                .duration_since(UNIX_EPOCH)
                .expect("after epoch")
                .as_secs_f64();
            assert!(
                (got_at - exp_at).abs() < 1e-3,
                "expires {got_at} for exp {exp_at}"
            );
        }
        // Within a microsecond of a boundary, float and SystemTime arithmetic may round apart.
        (Err(PrecheckError::Expired), Ok(_)) | (Ok(_), Err(PrecheckError::Expired))
            if near_boundary(&exp) || near_boundary(&nbf) => {}
        _ => assert_eq!(got.map(|c| c.pod_bound), expected, "{b:?}\n{token}"),
    }
}

fn near_boundary(t: &Option<Value>) -> bool {
    t.as_ref().and_then(numeric_date).is_some_and(|x| {
        let d = x - NOW as f64;
        (d.abs() - SKEW as f64).abs() < 1e-3
    })
}

fuzz_target!(|input: Input<'_>| match input {
    Input::Raw(token) => {
        let precheck = Precheck::new(vec!["istio-ca".into()], vec![]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        if precheck.check(token, now).is_ok() {
            let parts: Vec<&str> = token.split('.').collect();
            assert_eq!(parts.len(), 3, "{token:?}");
            for part in &parts[..2] {
                let json: Value =
                    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url"))
                        .expect("JSON");
                assert!(
                    json.is_object(),
                    "accepted a non-object JWS part: {token:?}"
                );
            }
        }
    }
    Input::Built(b) => check_built(b),
});
