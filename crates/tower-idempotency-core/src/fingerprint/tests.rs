use super::*;
use http::Request;

fn canon(s: &str) -> Option<String> {
    canonical_json_bytes(s.as_bytes()).map(|b| String::from_utf8(b).unwrap())
}

#[test]
fn reordering_and_whitespace_do_not_matter() {
    assert_eq!(canon(r#"{"a":1,"b":2}"#), canon("{ \"b\": 2,\n \"a\": 1 }"));
    assert_eq!(canon(r#"{"a":1,"b":2}"#).unwrap(), r#"{"a":1,"b":2}"#);
}

#[test]
fn escapes_are_normalised() {
    assert_eq!(canon(r#""\u00e9\/\ud83d\ude00""#).unwrap(), "\"é/😀\"");
    assert_eq!(canon(r#""a\nb""#).unwrap(), r#""a\u000ab""#);
}

#[test]
fn big_numbers_stay_distinct() {
    let a = canon(r#"{"amount":12345678901234567890123}"#).unwrap();
    let b = canon(r#"{"amount":12345678901234567890124}"#).unwrap();
    assert_ne!(a, b);
}

#[test]
fn invalid_json_is_not_canonicalised() {
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\":1,}",
        "01",
        "1.",
        "-",
        "1e",
        "tru",
        "\"\\x\"",
        "\"\\ud800\"",
        "{\"a\" 1}",
        "[1] x",
        "\"a\u{1}\"",
        "{\"a\":1,\"a\":1}",
    ] {
        assert!(canon(bad).is_none(), "{bad:?}");
    }
    let deep = "[".repeat(200) + &"]".repeat(200);
    assert!(canon(&deep).is_none());
    let ok = "[".repeat(100) + &"]".repeat(100);
    assert!(canon(&ok).is_some());
}

#[test]
fn agrees_with_serde_json_on_meaning() {
    let src = r#"{"z":[true,false,null,-0.5e-3,"x\"y"],"a":{"k":"\t"}}"#;
    let c = canon(src).unwrap();
    let a: serde_json::Value = serde_json::from_str(src).unwrap();
    let b: serde_json::Value = serde_json::from_str(&c).unwrap();
    assert_eq!(a, b);
}

#[test]
fn request_fingerprint_covers_method_path_query_headers_and_body() {
    let parts = |m: &str, uri: &str, ct: &str| {
        Request::builder()
            .method(m)
            .uri(uri)
            .header("content-type", ct)
            .body(())
            .unwrap()
            .into_parts()
            .0
    };
    let hs = [http::header::CONTENT_TYPE];
    let base = Fingerprint::of_request(&parts("POST", "/p?x=1", "a/json"), &hs, b"{}", false);
    for other in [
        Fingerprint::of_request(&parts("PATCH", "/p?x=1", "a/json"), &hs, b"{}", false),
        Fingerprint::of_request(&parts("POST", "/q?x=1", "a/json"), &hs, b"{}", false),
        Fingerprint::of_request(&parts("POST", "/p?x=2", "a/json"), &hs, b"{}", false),
        Fingerprint::of_request(&parts("POST", "/p?x=1", "a/xml"), &hs, b"{}", false),
        Fingerprint::of_request(&parts("POST", "/p?x=1", "a/json"), &hs, b"{ }", false),
    ] {
        assert_ne!(base, other);
    }
    assert_eq!(
        base,
        Fingerprint::of_request(&parts("POST", "/p?x=1", "a/json"), &hs, b"{}", false)
    );
    assert_eq!(
        Fingerprint::of_request(&parts("POST", "/p", "j"), &hs, br#"{"a":1,"b":2}"#, true),
        Fingerprint::of_request(&parts("POST", "/p", "j"), &hs, br#"{ "b":2, "a":1 }"#, true),
    );
}
