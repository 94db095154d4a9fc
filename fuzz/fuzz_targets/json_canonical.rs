//! Fuzzes `canonical_json_bytes`: it never panics, and its output is valid JSON (serde_json reads
//! it, and means by it what it means by the input), has no insignificant whitespace, and is a
//! fixed point (canonicalising it again gives the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency_core::fingerprint::canonical_json_bytes;

/// Whether `json` has whitespace outside its strings.
fn has_whitespace(json: &[u8]) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b' ' | b'\t' | b'\n' | b'\r') => return true,
            (false, _, _) => {}
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some(canonical) = canonical_json_bytes(data) else {
        return;
    };
    assert_eq!(
        canonical_json_bytes(&canonical).as_deref(),
        Some(&canonical[..]),
        "not a fixed point"
    );
    assert!(!has_whitespace(&canonical), "insignificant whitespace kept");
    let input = serde_json::from_slice::<serde_json::Value>(data);
    let output = serde_json::from_slice::<serde_json::Value>(&canonical);
    match (input, output) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "canonical form changed the meaning"),
        // serde_json refuses numbers outside f64 (`1e999`), which RFC 8259 allows, and nesting
        // deeper than 128: both texts hold the same literals and depth, so both are refused.
        (Err(_), Err(_)) => {}
        (a, b) => panic!("serde_json disagrees: input {a:?}, canonical {b:?}"),
    }
});
