//! The OpenAPI contract (feature `openapi`) follows the layer's settings, not copies of them.

#![cfg(feature = "openapi")]
#![allow(clippy::unwrap_used)] // tests may panic

use std::time::Duration;

use http::{HeaderName, Method};
use serde_json::{Value, json};
use tower_idempotency::{
    IDEMPOTENT_REPLAY_BODY, IDEMPOTENT_REPLAYED, IdempotencyKey, IdempotencyLayer, InProgress,
    MemoryLedger, MissingKey,
    openapi::{KEY_PATTERN, utoipa::openapi::OpenApi},
    problem::{RejectionKind, TYPE_BASE},
};

/// A document with `POST /payments` (201 and its own 400), `GET /payments/{id}` and
/// `PUT /payments/{id}`.
fn document() -> OpenApi {
    serde_json::from_value(json!({
        "openapi": "3.1.0",
        "info": { "title": "t", "version": "1" },
        "paths": {
            "/payments": { "post": { "responses": {
                "201": { "description": "Created" },
                "400": { "description": "Invalid payment", "content": {
                    "application/problem+json": { "schema": { "type": "object" } }
                } }
            } } },
            "/payments/{id}": {
                "get": { "responses": { "200": { "description": "A payment" } } },
                "put": { "responses": { "200": { "description": "Replaced" } } }
            }
        }
    }))
    .unwrap()
}

fn applied(layer: &IdempotencyLayer<MemoryLedger>) -> Value {
    let mut doc = document();
    layer.openapi().apply(&mut doc);
    serde_json::to_value(&doc).unwrap()
}

fn type_uri(kind: RejectionKind) -> String {
    format!("{TYPE_BASE}#{}", kind.slug())
}

fn header<'a>(response: &'a Value, name: &HeaderName) -> Option<&'a Value> {
    response["headers"]
        .as_object()?
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
        .map(|(_, v)| v)
}

fn types(response: &Value, media: &str) -> Vec<String> {
    response["content"][media]["schema"]["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_document_follows_non_default_settings() {
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_header_name(HeaderName::from_static("x-request-key"))
        .with_methods([Method::POST, Method::PUT])
        .with_missing_key(MissingKey::Allow)
        .with_in_progress(InProgress::Accepted)
        .with_retention(Duration::from_secs(3600))
        .with_retry_after(Duration::from_secs(7))
        .with_operation_path("/ops")
        .build()
        .unwrap();
    let doc = applied(&layer);

    let post = &doc["paths"]["/payments"]["post"];
    let key = &post["parameters"][0];
    assert_eq!(key["name"], "X-Request-Key");
    assert_eq!(key["in"], "header");
    assert_eq!(key["required"], false);
    assert_eq!(key["schema"]["pattern"], KEY_PATTERN);

    // Accepted: 202 with Location and Retry-After; no 409 (no exactly-once mode).
    let accepted = &post["responses"]["202"];
    assert!(header(accepted, &http::header::LOCATION).is_some());
    assert_eq!(
        header(accepted, &http::header::RETRY_AFTER).unwrap()["schema"]["examples"][0],
        7
    );
    assert_eq!(
        types(accepted, "application/problem+json"),
        [type_uri(RejectionKind::Accepted)]
    );
    assert!(post["responses"]["409"].is_null());
    // The key is optional, so 400 never says missing-key.
    let bad = &post["responses"]["400"];
    let any_of = &bad["content"]["application/problem+json"]["schema"]["anyOf"];
    assert_eq!(
        any_of[0],
        json!({ "type": "object" }),
        "the app's own 400 is kept"
    );
    let ours: Vec<&str> = any_of[1]["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        ours,
        [
            type_uri(RejectionKind::InvalidKey),
            type_uri(RejectionKind::BodyUnreadable)
        ]
    );
    for (status, kind) in [
        ("413", RejectionKind::PayloadTooLarge),
        ("422", RejectionKind::KeyReused),
        ("503", RejectionKind::LedgerUnavailable),
    ] {
        assert_eq!(
            types(&post["responses"][status], "application/problem+json"),
            [type_uri(kind)],
            "{status}"
        );
    }
    // Replay headers on the stored 201 and 400, by the crate's own names.
    for status in ["201", "400"] {
        let response = &post["responses"][status];
        assert!(header(response, &IDEMPOTENT_REPLAYED).is_some(), "{status}");
        assert!(
            header(response, &IDEMPOTENT_REPLAY_BODY).is_some(),
            "{status}"
        );
    }
    assert!(header(&post["responses"]["503"], &IDEMPOTENT_REPLAYED).is_none());

    // PUT is covered, GET is not.
    let put = &doc["paths"]["/payments/{id}"]["put"];
    assert_eq!(put["parameters"][0]["name"], "X-Request-Key");
    let get = &doc["paths"]["/payments/{id}"]["get"];
    assert!(get["parameters"].is_null() && get["x-idempotency"].is_null());

    // The operation-status resource at the configured path, and the expiry policy.
    assert!(doc["paths"]["/ops/{operation_id}"]["get"]["responses"]["404"].is_object());
    for extension in [&doc["x-idempotency"], &post["x-idempotency"]] {
        assert_eq!(extension["expiry-seconds"], 3600);
        assert_eq!(extension["header"], "X-Request-Key");
        assert_eq!(extension["in-progress"]["policy"], "accepted");
        assert_eq!(extension["operation-status"], "/ops/{operation_id}");
        assert!(extension["description"].as_str().unwrap().contains("3600"));
    }
}

#[test]
fn the_defaults_require_the_key_and_answer_409() {
    let doc = applied(&IdempotencyLayer::new(MemoryLedger::new()));
    let post = &doc["paths"]["/payments"]["post"];
    assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
    assert_eq!(post["parameters"][0]["required"], true);
    assert_eq!(
        types(&post["responses"]["409"], "application/problem+json"),
        [type_uri(RejectionKind::InProgress)]
    );
    assert!(header(&post["responses"]["409"], &http::header::RETRY_AFTER).is_some());
    assert!(post["responses"]["202"].is_null());
    let any_of =
        &post["responses"]["400"]["content"]["application/problem+json"]["schema"]["anyOf"];
    assert_eq!(
        any_of[1]["properties"]["type"]["enum"][0],
        type_uri(RejectionKind::MissingKey)
    );
    assert_eq!(doc["x-idempotency"]["expiry-seconds"], 86400);
    assert!(doc["paths"]["/operations/{operation_id}"].is_null());
    // The PUT is not covered by default.
    assert!(doc["paths"]["/payments/{id}"]["put"]["parameters"].is_null());
}

#[test]
fn the_operation_status_resource_can_be_published_under_any_policy() {
    let layer = IdempotencyLayer::new(MemoryLedger::new());
    let mut doc = document();
    layer
        .openapi()
        .with_operation_status(true)
        .apply_where(&mut doc, |path| path == "/payments");
    let doc = serde_json::to_value(&doc).unwrap();
    let status = &doc["paths"]["/operations/{operation_id}"]["get"];
    assert!(status["responses"]["200"].is_object());
    assert!(header(&status["responses"]["default"], &IDEMPOTENT_REPLAYED).is_some());
    assert!(doc["paths"]["/payments/{id}"]["put"]["parameters"].is_null());
}

#[test]
fn the_key_pattern_agrees_with_the_parser() {
    let pattern = regex::Regex::new(KEY_PATTERN).unwrap();
    let long = "k".repeat(255);
    let too_long = "k".repeat(256);
    let quoted_long = format!("\"{long}\"");
    let quoted_too_long = format!("\"{too_long}\"");
    let cases = [
        "abc",
        "a\"b",
        "\"abc\"",
        "\"a\\\"b\"",
        "\"a\\\\b\"",
        "\"\"",
        "\"abc",
        "\"abc\"x",
        "\"a b\"",
        "\"a\\xb\"",
        "a b",
        "",
        "é",
        "\"",
        "~!#$%&'()*+,-./:;<=>?@[]^_`{|}",
        long.as_str(),
        too_long.as_str(),
        quoted_long.as_str(),
        quoted_too_long.as_str(),
    ];
    for case in cases {
        assert_eq!(
            pattern.is_match(case),
            IdempotencyKey::parse(case.as_bytes()).is_ok(),
            "{case:?}"
        );
    }
}
