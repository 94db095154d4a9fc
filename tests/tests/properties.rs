//! Property tests of the parsers that face untrusted bytes: the `Idempotency-Key` parser, the JSON
//! canonicaliser behind the fingerprint, and the stored-header codec of the SQL ledgers.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use tower_idempotency_core::{
    IdempotencyKey, KeyError, MAX_KEY_LEN, StoredResponse, fingerprint::canonical_json_bytes,
};

// ---------------------------------------------------------------------------------------------
// The key parser
// ---------------------------------------------------------------------------------------------

fn visible(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// A reference decoder for the RFC 8941 sf-string form (section 3.3.3), written independently of
/// the parser: `None` if `value` is not a well-formed string.
fn reference_unquote(value: &[u8]) -> Option<Vec<u8>> {
    let inner = value.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = Vec::new();
    let mut escaped = false;
    for &b in inner {
        match (escaped, b) {
            (true, b'"' | b'\\') => {
                out.push(b);
                escaped = false;
            }
            (true, _) => return None,
            (false, b'\\') => escaped = true,
            // An unescaped quote before the end closes the string early: trailing garbage.
            (false, b'"') => return None,
            (false, 0x20..=0x7e) => out.push(b),
            (false, _) => return None,
        }
    }
    (!escaped).then_some(out)
}

/// What a header value should parse to, by the contract: the key, or `None` for a 400.
fn expected_key(value: &[u8]) -> Option<Vec<u8>> {
    let key = if value.first() == Some(&b'"') {
        reference_unquote(value)?
    } else {
        value.to_vec()
    };
    ((1..=MAX_KEY_LEN).contains(&key.len()) && key.iter().copied().all(visible)).then_some(key)
}

/// Quotes `key` as an RFC 8941 string, escaping `"` and `\`.
fn quote(key: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in key {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// A valid key: 1 to 255 visible ASCII bytes, with quotes and backslashes common enough to matter.
fn valid_key() -> impl Strategy<Value = Vec<u8>> {
    // One mapped strategy per byte rather than a union: as varied, and much cheaper to run.
    let byte = any::<u8>().prop_map(|b| match b % 8 {
        0 => b'"',
        1 => b'\\',
        _ => 0x21 + b % 94,
    });
    prop_oneof![
        proptest::collection::vec(byte.clone(), 1..=32),
        proptest::collection::vec(byte, 240..=MAX_KEY_LEN),
    ]
}

/// Header-value-like bytes: mostly visible ASCII, with quotes, escapes, spaces, controls and
/// high bytes mixed in, at lengths around the 255 boundary too.
fn key_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u16>().prop_map(|n| match n % 16 {
        0 | 1 => b'"',
        2 | 3 => b'\\',
        4 => b' ',
        5 => (n >> 8) as u8,
        _ => 0x21 + (n >> 4) as u8 % 94,
    });
    prop_oneof![
        proptest::collection::vec(byte.clone(), 0..=12),
        proptest::collection::vec(byte, 250..=262),
        proptest::collection::vec(any::<u8>(), 0..=300),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn key_parser_never_panics_and_agrees_with_the_contract(value in key_like_bytes()) {
        let parsed = IdempotencyKey::parse(&value);
        match expected_key(&value) {
            Some(key) => {
                let parsed = parsed.unwrap();
                prop_assert_eq!(parsed.as_str().as_bytes(), &key[..]);
            }
            None => prop_assert!(parsed.is_err(), "{:?} parsed", value),
        }
    }

    #[test]
    fn every_valid_key_is_accepted_bare_and_quoted_alike(key in valid_key()) {
        let quoted = IdempotencyKey::parse(&quote(&key)).unwrap();
        prop_assert_eq!(quoted.as_str().as_bytes(), &key[..]);
        // A bare value that opens with a quote is read as a (malformed) string, by design: such a
        // key must be sent quoted.
        if key[0] != b'"' {
            let bare = IdempotencyKey::parse(&key).unwrap();
            prop_assert_eq!(&bare, &quoted);
        }
    }

    #[test]
    fn keys_outside_the_bounds_are_rejected_in_both_forms(
        key in valid_key(),
        bad in prop_oneof![0u8..=0x20, 0x7fu8..=0xff],
        at in any::<prop::sample::Index>(),
        long in (MAX_KEY_LEN + 1)..=(MAX_KEY_LEN + 40),
    ) {
        let mut with_bad = key.clone();
        with_bad.insert(at.index(key.len() + 1), bad);
        prop_assert!(IdempotencyKey::parse(&quote(&with_bad)).is_err());
        if with_bad[0] != b'"' {
            let expected = if with_bad.len() > MAX_KEY_LEN {
                KeyError::TooLong
            } else {
                KeyError::InvalidCharacter
            };
            prop_assert_eq!(IdempotencyKey::parse(&with_bad), Err(expected));
        }
        let too_long: Vec<u8> = key.iter().copied().cycle().take(long).collect();
        prop_assert_eq!(IdempotencyKey::parse(&quote(&too_long)), Err(KeyError::TooLong));
        if too_long[0] != b'"' {
            prop_assert_eq!(IdempotencyKey::parse(&too_long), Err(KeyError::TooLong));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The JSON canonicaliser
// ---------------------------------------------------------------------------------------------

/// A JSON value as generated here: numbers are kept as their literal (integers of any size, and
/// finite floats as serde_json writes them), objects have unique member names.
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Int(String),
    Float(String),
    Str(String),
    Arr(Vec<J>),
    Obj(BTreeMap<String, J>),
}

fn json_string() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        6 => proptest::char::range('a', 'e'),
        2 => proptest::char::range('\0', '\u{7f}'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('/'),
        1 => proptest::char::range('\u{80}', '\u{7ff}'),
        1 => proptest::char::range('\u{e000}', '\u{ffff}'),
        1 => proptest::char::range('\u{10000}', '\u{10ffff}'),
    ];
    proptest::collection::vec(ch, 0..6).prop_map(|cs| cs.into_iter().collect())
}

fn integer() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        // Larger than any machine integer: only the literal keeps two of them apart.
        1 => (any::<bool>(), 1u8..=9, proptest::collection::vec(0u8..=9, 19..40)).prop_map(
            |(negative, first, rest)| {
                let mut s = String::from(if negative { "-" } else { "" });
                s.push(char::from(b'0' + first));
                s.extend(rest.into_iter().map(|d| char::from(b'0' + d)));
                s
            }
        ),
    ]
}

fn float() -> impl Strategy<Value = String> {
    prop_oneof![any::<f64>(), -1000.0f64..1000.0,].prop_filter_map("finite", |f| {
        serde_json::Number::from_f64(f).map(|n| n.to_string())
    })
}

fn json_value(with_floats: bool) -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        integer().prop_map(J::Int),
        if with_floats {
            float().boxed()
        } else {
            integer().boxed()
        }
        .prop_map(move |n| { if with_floats { J::Float(n) } else { J::Int(n) } }),
        json_string().prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            proptest::collection::btree_map(json_string(), inner, 0..6).prop_map(J::Obj),
        ]
    })
}

/// A tiny deterministic generator for the choices of one rendering (order, spaces, escapes).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*; a zero seed would stay zero.
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn ws(rng: &mut Rng, out: &mut String) {
    for _ in 0..rng.below(3) {
        out.push([' ', '\t', '\n', '\r'][rng.below(4) as usize]);
    }
}

fn escape_unit(out: &mut String, unit: u16, upper: bool) {
    if upper {
        out.push_str(&format!("\\u{unit:04X}"));
    } else {
        out.push_str(&format!("\\u{unit:04x}"));
    }
}

/// Writes `s` as a JSON string, escaping each character in one of its legal spellings.
fn render_string(s: &str, rng: &mut Rng, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let must = c == '"' || c == '\\' || c < ' ';
        let choice = if must { 1 + rng.below(2) } else { rng.below(5) };
        match choice {
            0 | 3 | 4 => out.push(c),
            1 => match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' => out.push_str("\\/"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                _ => {
                    let mut units = [0u16; 2];
                    for &unit in c.encode_utf16(&mut units).iter() {
                        escape_unit(out, unit, rng.below(2) == 0);
                    }
                }
            },
            _ => {
                let mut units = [0u16; 2];
                for &unit in c.encode_utf16(&mut units).iter() {
                    escape_unit(out, unit, rng.below(2) == 0);
                }
            }
        }
    }
    out.push('"');
}

/// One of the many texts of `v`: members in a shuffled order, whitespace anywhere it is allowed,
/// strings escaped in varying ways.
fn render(v: &J, rng: &mut Rng, out: &mut String) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(n) | J::Float(n) => out.push_str(n),
        J::Str(s) => render_string(s, rng, out),
        J::Arr(items) => {
            out.push('[');
            ws(rng, out);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    ws(rng, out);
                }
                render(item, rng, out);
                ws(rng, out);
            }
            out.push(']');
        }
        J::Obj(members) => {
            let mut members: Vec<_> = members.iter().collect();
            for i in (1..members.len()).rev() {
                members.swap(i, rng.below(i as u64 + 1) as usize);
            }
            out.push('{');
            ws(rng, out);
            for (i, (name, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    ws(rng, out);
                }
                render_string(name, rng, out);
                ws(rng, out);
                out.push(':');
                ws(rng, out);
                render(value, rng, out);
                ws(rng, out);
            }
            out.push('}');
        }
    }
}

fn text(v: &J, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut out = String::new();
    ws(&mut rng, &mut out);
    render(v, &mut rng, &mut out);
    ws(&mut rng, &mut out);
    out
}

/// The canonical form by its definition, written independently: members sorted by name (bytes),
/// no whitespace, `"` and `\` escaped, control characters as `\u00xx`, everything else raw.
fn expected_canonical(v: &J, out: &mut String) {
    fn string(s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c < ' ' => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(n) | J::Float(n) => out.push_str(n),
        J::Str(s) => string(s, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                expected_canonical(item, out);
            }
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            for (i, (name, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(name, out);
                out.push(':');
                expected_canonical(value, out);
            }
            out.push('}');
        }
    }
}

/// A value that differs from `v` in exactly one place, chosen by `rng`.
fn mutate(v: &J, rng: &mut Rng) -> J {
    match v {
        J::Null => J::Bool(false),
        J::Bool(b) => J::Bool(!b),
        J::Int(n) => {
            // Change the last digit: the nearest different literal, even for huge numbers.
            let mut digits = n.clone().into_bytes();
            let last = digits.len() - 1;
            digits[last] = if digits[last] == b'9' {
                b'8'
            } else {
                digits[last] + 1
            };
            J::Int(String::from_utf8(digits).unwrap())
        }
        J::Float(_) => J::Null,
        J::Str(s) => J::Str(format!("{s}\u{0}")),
        J::Arr(items) if items.is_empty() || rng.below(4) == 0 => {
            let mut items = items.clone();
            items.push(J::Null);
            J::Arr(items)
        }
        J::Arr(items) => {
            let mut items = items.clone();
            let i = rng.below(items.len() as u64) as usize;
            items[i] = mutate(&items[i], rng);
            J::Arr(items)
        }
        J::Obj(members) if members.is_empty() || rng.below(4) == 0 => {
            let mut members = members.clone();
            // Longer than the greatest name, with it as a prefix: greater than every name, so new.
            let name = members
                .keys()
                .next_back()
                .map(|k| format!("{k}x"))
                .unwrap_or_default();
            members.insert(name, J::Null);
            J::Obj(members)
        }
        J::Obj(members) => {
            let mut members = members.clone();
            let i = rng.below(members.len() as u64) as usize;
            let name = members.keys().nth(i).unwrap().clone();
            let value = mutate(&members[&name], rng);
            members.insert(name, value);
            J::Obj(members)
        }
    }
}

fn canon(text: &str) -> Option<Vec<u8>> {
    canonical_json_bytes(text.as_bytes())
}

fn serde_value(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Bytes drawn mostly from JSON's own alphabet, so that a fair share of them parse.
fn json_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let alphabet = b"{}[]{}[]\"\"\"::,,, \n\t0123456789-+.eEtruefalsn\\u/bfnrt\xc3\xa9\xff\x01";
    let token = prop_oneof![
        6 => proptest::sample::select(alphabet.to_vec()).prop_map(|b| vec![b]),
        1 => Just(b"true".to_vec()),
        1 => Just(b"null".to_vec()),
        1 => Just(b"\"a\":".to_vec()),
        1 => Just(b"\\ud83d\\ude00".to_vec()),
        1 => Just(b"\\ud800".to_vec()),
    ];
    prop_oneof![
        proptest::collection::vec(token, 0..40).prop_map(|ts| ts.concat()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn equal_values_give_equal_canonical_bytes(v in json_value(true), a: u64, b: u64) {
        let (ta, tb) = (text(&v, a), text(&v, b));
        let (ca, cb) = (canon(&ta).unwrap(), canon(&tb).unwrap());
        prop_assert_eq!(&ca, &cb, "{} vs {}", ta, tb);
        let mut expected = String::new();
        expected_canonical(&v, &mut expected);
        prop_assert_eq!(String::from_utf8(ca).unwrap(), expected);
    }

    #[test]
    fn canonical_output_means_the_same_and_is_a_fixed_point(v in json_value(true), seed: u64) {
        let t = text(&v, seed);
        let c = canon(&t).unwrap();
        prop_assert_eq!(serde_value(&c), serde_value(t.as_bytes()));
        prop_assert_eq!(canonical_json_bytes(&c), Some(c));
    }

    #[test]
    fn different_values_give_different_canonical_bytes(
        a in json_value(false),
        other in json_value(false),
        seeds: (u64, u64, u64),
    ) {
        let b = mutate(&a, &mut Rng(seeds.2));
        for b in [b, other] {
            let (ta, tb) = (text(&a, seeds.0), text(&b, seeds.1));
            let (ca, cb) = (canon(&ta).unwrap(), canon(&tb).unwrap());
            prop_assert_eq!(a == b, ca == cb, "{} vs {}", ta, tb);
            // serde_json reads huge integers as floats, so it may call two literals equal that the
            // canonical form keeps apart, never the other way round.
            if serde_value(ta.as_bytes()) != serde_value(tb.as_bytes()) {
                prop_assert_ne!(ca, cb);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_any_output_is_canonical(input in json_like_bytes()) {
        if let Some(c) = canonical_json_bytes(&input) {
            // serde_json refuses numbers beyond f64 (`1e999`), which RFC 8259 allows and the
            // canonicaliser keeps as written: then both texts are refused alike.
            let original = serde_json::from_slice::<serde_json::Value>(&input).ok();
            let canonical = serde_json::from_slice::<serde_json::Value>(&c).ok();
            prop_assert_eq!(canonical, original);
            prop_assert_eq!(canonical_json_bytes(&c), Some(c));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stored-header codec
// ---------------------------------------------------------------------------------------------

fn header_name() -> impl Strategy<Value = HeaderName> {
    let custom = proptest::collection::vec(
        proptest::sample::select(b"abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~".to_vec()),
        1..24,
    )
    .prop_map(|bytes| HeaderName::from_bytes(&bytes).unwrap());
    prop_oneof![
        // A small pool, so that names repeat and carry several values.
        3 => proptest::sample::select(vec!["vary", "set-cookie", "x-a", "link", "content-type"])
            .prop_map(HeaderName::from_static),
        1 => custom,
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    // What `HeaderValue::from_bytes` accepts: tab, and 0x20 to 0xff except DEL.
    let byte = any::<u8>().prop_map(|b| match b {
        0x7f => b'\t',
        0..=0x1f => b + 0x20,
        b => b,
    });
    prop_oneof![
        9 => proptest::collection::vec(byte.clone(), 0..40),
        1 => proptest::collection::vec(byte, 256..400),
    ]
    .prop_map(|bytes| HeaderValue::from_bytes(&bytes).unwrap())
}

fn header_map() -> impl Strategy<Value = Vec<(HeaderName, HeaderValue)>> {
    proptest::collection::vec((header_name(), header_value()), 0..12)
}

fn to_map(pairs: &[(HeaderName, HeaderValue)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.clone(), value.clone());
    }
    map
}

/// The byte offsets at which each header's encoding ends.
fn record_ends(map: &HeaderMap) -> Vec<usize> {
    map.iter()
        .scan(0, |end, (n, v)| {
            *end += 2 + n.as_str().len() + 4 + v.len();
            Some(*end)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn headers_round_trip_with_every_value_in_order(pairs in header_map()) {
        let map = to_map(&pairs);
        let decoded = StoredResponse::decode_headers(&StoredResponse::encode_headers(&map)).unwrap();
        prop_assert_eq!(&decoded, &map);
        let order = |m: &HeaderMap| {
            m.iter().map(|(n, v)| (n.clone(), v.clone())).collect::<Vec<_>>()
        };
        prop_assert_eq!(order(&decoded), order(&map));
        for name in map.keys() {
            let values = |m: &HeaderMap| m.get_all(name).iter().cloned().collect::<Vec<_>>();
            prop_assert_eq!(values(&decoded), values(&map));
        }
    }

    #[test]
    fn truncated_headers_are_an_error_unless_cut_between_headers(
        pairs in header_map(),
        cut in any::<prop::sample::Index>(),
    ) {
        let map = to_map(&pairs);
        let bytes = StoredResponse::encode_headers(&map);
        let cut = cut.index(bytes.len() + 1);
        let decoded = StoredResponse::decode_headers(&bytes[..cut]);
        let ends = record_ends(&map);
        if cut == 0 || ends.contains(&cut) {
            let kept = ends.iter().filter(|&&end| end <= cut).count();
            let expected: Vec<_> = map.iter().take(kept).collect();
            let decoded = decoded.unwrap();
            prop_assert_eq!(decoded.iter().collect::<Vec<_>>(), expected);
        } else {
            prop_assert!(decoded.is_err());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            // Plausible frames: short lengths, so that decoding gets past the first header.
            proptest::collection::vec(
                (0u16..8, proptest::collection::vec(any::<u8>(), 0..8), 0u32..8,
                 proptest::collection::vec(any::<u8>(), 0..8)),
                0..6,
            ).prop_map(|frames| {
                let mut out = Vec::new();
                for (nl, name, vl, value) in frames {
                    out.extend_from_slice(&nl.to_be_bytes());
                    out.extend_from_slice(&name);
                    out.extend_from_slice(&vl.to_be_bytes());
                    out.extend_from_slice(&value);
                }
                out
            }),
        ],
    ) {
        if let Ok(map) = StoredResponse::decode_headers(&bytes) {
            // Whatever decodes round-trips (not byte for byte: `HeaderName` lowercases names).
            let again = StoredResponse::encode_headers(&map);
            prop_assert_eq!(StoredResponse::decode_headers(&again).unwrap(), map);
        }
    }
}
