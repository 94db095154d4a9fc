//! The handler's say over storage (`DoNotStore`, `Cache-Control: no-store`) and its downstream
//! keys (`Operation::derive`).
#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    http::{HeaderValue, Request, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use serde_json::Value;
use support::*;
use tower_idempotency::{
    DoNotStore, IdempotencyLayer, MemoryLedger, MissingKey, Operation,
    core::conformance::FaultyLedger,
};

/// How the validating handler marks its 400.
#[derive(Clone, Copy)]
enum Mark {
    Extension,
    CacheControl,
    Nothing,
}

/// `POST /payments`: 400 unless the body has a positive `amount`, else 201.
fn validating(runs: &Runs, mark: Mark) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/payments",
            post(move |Json(body): Json<Value>| {
                let runs = runs.clone();
                async move {
                    runs.bump();
                    if body["amount"].as_i64().is_none_or(|a| a <= 0) {
                        let invalid = (StatusCode::BAD_REQUEST, "amount: must be positive");
                        return match mark {
                            Mark::Extension => (DoNotStore, invalid).into_response(),
                            Mark::CacheControl => (
                                [(
                                    header::CACHE_CONTROL,
                                    HeaderValue::from_static("private, No-Store"),
                                )],
                                invalid,
                            )
                                .into_response(),
                            Mark::Nothing => invalid.into_response(),
                        };
                    }
                    StatusCode::CREATED.into_response()
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()))
}

const INVALID: &str = r#"{"amount":-5,"currency":"EUR"}"#;
const FIXED: &str = r#"{"amount":100,"currency":"EUR"}"#;

#[tokio::test]
async fn a_400_marked_do_not_store_releases_the_key_and_the_fixed_request_runs() {
    for mark in [Mark::Extension, Mark::CacheControl] {
        let runs = Runs::default();
        let app = validating(&runs, mark);
        let (first, body) = send(&app, pay("k-1", INVALID)).await;
        assert_eq!(first.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body, "amount: must be positive",
            "the answer reaches the client as is"
        );
        if let Mark::CacheControl = mark {
            assert_eq!(first.headers()[header::CACHE_CONTROL], "private, No-Store");
        }
        // The same invalid request again is not a replay: it runs again.
        let (again, _) = send(&app, pay("k-1", INVALID)).await;
        assert_eq!(again.status(), StatusCode::BAD_REQUEST);
        assert!(!is_replay(&again));
        // The fixed request with the same key runs and is then stored.
        let (fixed, _) = send(&app, pay("k-1", FIXED)).await;
        assert_eq!(fixed.status(), StatusCode::CREATED);
        assert!(!is_replay(&fixed));
        let (replay, _) = send(&app, pay("k-1", FIXED)).await;
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert!(is_replay(&replay));
        assert_eq!(runs.get(), 3);
    }
}

#[tokio::test]
async fn an_unmarked_400_is_stored_and_a_changed_body_is_422() {
    let runs = Runs::default();
    let app = validating(&runs, Mark::Nothing);
    let (first, _) = send(&app, pay("k-1", INVALID)).await;
    assert_eq!(first.status(), StatusCode::BAD_REQUEST);
    let (again, _) = send(&app, pay("k-1", INVALID)).await;
    assert!(is_replay(&again));
    let (fixed, body) = send(&app, pay("k-1", FIXED)).await;
    assert_problem(&fixed, &body, 422, "key-reused", "k-1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn cache_control_without_no_store_is_stored() {
    let app = Router::new()
        .route(
            "/payments",
            post(|| async {
                (
                    [(header::CACHE_CONTROL, "no-cache, max-age=0")],
                    StatusCode::CREATED,
                )
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()));
    send(&app, pay("k", FIXED)).await;
    assert!(is_replay(&send(&app, pay("k", FIXED)).await.0));
}

/// A handler that records the downstream key it derived, and fails with 503 while `fail` holds.
fn deriving(
    seen: &Arc<Mutex<Vec<String>>>,
    fail: bool,
    layer: IdempotencyLayer<MemoryLedger>,
) -> Router {
    let seen = seen.clone();
    Router::new()
        .route(
            "/payments",
            post(move |operation: Operation| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(operation.derive("charge"));
                    if fail {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::CREATED
                    }
                }
            }),
        )
        .layer(layer)
}

fn scoped(ledger: MemoryLedger) -> IdempotencyLayer<MemoryLedger> {
    IdempotencyLayer::builder(ledger)
        .with_scope(|parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .with_lease(Duration::from_millis(300))
        .build()
        .unwrap()
}

fn pay_as(tenant: &str, key: &str) -> Request<Body> {
    let mut request = pay(key, FIXED);
    request
        .headers_mut()
        .insert("x-tenant", HeaderValue::from_str(tenant).unwrap());
    request
}

#[tokio::test]
async fn the_downstream_key_survives_a_release_and_differs_across_scopes_and_keys() {
    let ledger = MemoryLedger::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Two runs that fail with 503 (the key is released), then one that succeeds.
    let failing = deriving(&seen, true, scoped(ledger.clone()));
    let working = deriving(&seen, false, scoped(ledger.clone()));
    for _ in 0..2 {
        let (response, _) = send(&failing, pay_as("a", "order-42")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let (response, _) = send(&working, pay_as("a", "order-42")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    send(&working, pay_as("b", "order-42")).await;
    send(&working, pay_as("a", "order-43")).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    assert!(
        seen[..3].iter().all(|k| *k == seen[0]),
        "every run of one request: {seen:?}"
    );
    assert_ne!(seen[0], seen[3], "another scope");
    assert_ne!(seen[0], seen[4], "another key");
    assert_ne!(seen[3], seen[4]);
    for key in &seen {
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!key.contains("order-42"));
    }
}

#[tokio::test]
async fn a_takeover_derives_the_same_downstream_key() {
    let seen = Arc::new(Mutex::new(Vec::<(String, uuid::Uuid)>::new()));
    // Renewals are dropped, so the first run's lease lapses while it still runs, and the retry
    // takes the key over.
    let faulty = FaultyLedger::new(MemoryLedger::new());
    faulty.faults().drop_renewals(true);
    let seen2 = seen.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move |operation: Operation| {
                let seen = seen2.clone();
                async move {
                    let first = {
                        let mut seen = seen.lock().unwrap();
                        seen.push((operation.derive("charge"), operation.operation_id()));
                        seen.len() == 1
                    };
                    if first {
                        // Outlive the lease: the retry takes over.
                        tokio::time::sleep(Duration::from_millis(600)).await;
                    }
                    StatusCode::CREATED
                }
            }),
        )
        .layer(
            IdempotencyLayer::builder(faulty)
                .with_lease(Duration::from_millis(150))
                .build()
                .unwrap(),
        );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", FIXED)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (retry, _) = send(&app, pay("k", FIXED)).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    let _ = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, seen[1].0, "the takeover derives the same key");
    assert_eq!(seen[0].1, seen[1].1, "a takeover keeps the operation id");
}

#[tokio::test]
async fn without_the_layer_the_extractor_is_a_500_problem_and_option_is_none() {
    let app = Router::new()
        .route(
            "/required",
            post(|_: Operation| async { StatusCode::CREATED }),
        )
        .route(
            "/optional",
            post(|operation: Option<Operation>| async move {
                if operation.is_none() {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::CREATED
                }
            }),
        );
    let (response, body) = send(
        &app,
        Request::post("/required").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("idempotency layer")
    );
    let (response, _) = send(
        &app,
        Request::post("/optional").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // A request the layer passes through unclaimed has no operation either.
    let allow = Router::new()
        .route(
            "/optional",
            post(|operation: Option<Operation>| async move {
                if operation.is_none() {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::CREATED
                }
            }),
        )
        .layer(
            IdempotencyLayer::builder(MemoryLedger::new())
                .with_missing_key(MissingKey::Allow)
                .build()
                .unwrap(),
        );
    let (response, _) = send(
        &allow,
        Request::post("/optional").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let keyed = Request::post("/optional")
        .header("idempotency-key", "k")
        .body(Body::empty())
        .unwrap();
    let (response, _) = send(&allow, keyed).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}
