//! Every kind of response through the layer (issue 14): streamed ones, bodies that fail after
//! their head, and handlers that fail before they return a future.

#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{Request, Response, StatusCode, header},
    routing::post,
};
use http_body_util::BodyExt;
use support::*;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryLedger};

/// A body that sends `data: tick` every 100 ms, for ever.
fn ticks() -> Body {
    let stream = futures_util::stream::unfold(0u64, |n| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from("data: tick\n\n")), n + 1))
    });
    Body::from_stream(stream)
}

fn events(runs: &Runs, content_type: &'static str, marked: bool) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/events",
            post(move || {
                runs.bump();
                async move {
                    let mut response = Response::builder()
                        .header(header::CONTENT_TYPE, content_type)
                        .header(header::CACHE_CONTROL, "no-cache")
                        .body(ticks())
                        .unwrap();
                    if marked {
                        response
                            .extensions_mut()
                            .insert(tower_idempotency::Streaming);
                    }
                    response
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()))
}

fn subscribe(key: &str) -> Request<Body> {
    Request::post("/events")
        .header("idempotency-key", key)
        .body(Body::empty())
        .unwrap()
}

/// The first event reaches the client long before the stream ends (it never does), the key is
/// completed with the head, and a retry gets a head-only replay instead of a 409 for ever.
async fn assert_streams(app: Router, runs: &Runs) {
    let response =
        tokio::time::timeout(Duration::from_secs(2), app.clone().oneshot(subscribe("s")))
            .await
            .expect("the head of a streaming response reaches the client at once")
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    for _ in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("each event reaches the client as it is produced")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "data: tick\n\n");
    }

    // The stream is still open; a retry gets the head, marked as a replay without its body.
    let retry = tokio::time::timeout(Duration::from_secs(2), send(&app, subscribe("s")))
        .await
        .expect("the retry is answered");
    let (retry, retry_body) = retry;
    assert_eq!(retry.status(), StatusCode::OK, "{retry_body:?}");
    assert!(is_replay(&retry));
    assert_eq!(retry.headers()["idempotent-replay-body"], "omitted");
    assert!(retry_body.is_empty());
    assert_eq!(runs.get(), 1);
    drop(body);
}

#[tokio::test]
async fn an_event_stream_reaches_the_client_as_it_is_produced_and_a_retry_gets_its_head() {
    let runs = Runs::default();
    assert_streams(events(&runs, "text/event-stream", false), &runs).await;
}

#[tokio::test]
async fn an_ndjson_stream_reaches_the_client_as_it_is_produced() {
    let runs = Runs::default();
    assert_streams(events(&runs, "application/x-ndjson", false), &runs).await;
}

#[tokio::test]
async fn a_handler_can_mark_its_response_as_streaming() {
    let runs = Runs::default();
    assert_streams(events(&runs, "application/octet-stream", true), &runs).await;
}

/// A service whose `call` panics before it returns a future: the panic is caught like a panic
/// inside the handler's future, so the key is released and a retry runs.
#[tokio::test]
async fn a_service_that_panics_in_call_releases_the_key() {
    let runs = Runs::default();
    let counted = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryLedger::new()))
        .service(tower::service_fn(move |_: Request<Body>| {
            if counted.bump() == 1 {
                panic!("a synchronous panic in call (test)");
            }
            async { Ok::<_, Infallible>(Response::new(Body::from("charged"))) }
        }));
    // In a task of its own, so that an escaping panic fails this test instead of aborting it.
    let first = tokio::spawn(service.clone().oneshot(pay("sync-panic", "{}")))
        .await
        .expect("the panic in call is caught by the layer")
        .unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = tokio::time::timeout(
        Duration::from_secs(2),
        service.clone().oneshot(pay("sync-panic", "{}")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(retry.status(), StatusCode::OK, "the key was released");
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "charged");
    assert_eq!(runs.get(), 2);
}

/// A body that sends `first`, then fails.
fn failing_after(first: &'static str) -> Body {
    let frames: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(first)),
        Err(std::io::Error::other(
            "the connection to the card network dropped (test)",
        )),
    ];
    Body::from_stream(futures_util::stream::iter(frames))
}

fn failing_body_app(runs: &Runs, status: StatusCode) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/payments",
            post(move || {
                runs.bump();
                async move {
                    Response::builder()
                        .status(status)
                        .body(failing_after("{\"id\":"))
                        .unwrap()
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()))
}

/// The handler answered 201, so its side effects are done, and then its body failed. Running it
/// again could charge twice: the key keeps a 500 "outcome unknown", replayed to every retry.
#[tokio::test]
async fn a_body_that_fails_after_a_success_head_stores_outcome_unknown() {
    let runs = Runs::default();
    let app = failing_body_app(&runs, StatusCode::CREATED);
    let (first, body) = send(&app, pay("fail-after-201", "{}")).await;
    assert_problem(&first, &body, 500, "outcome-unknown", "fail-after-201");
    let (retry, retry_body) = send(&app, pay("fail-after-201", "{}")).await;
    assert_problem(
        &retry,
        &retry_body,
        500,
        "outcome-unknown",
        "fail-after-201",
    );
    assert!(is_replay(&retry), "the retry is a replay, not a second run");
    assert_eq!(runs.get(), 1);
}

/// A failed body behind an error head (nothing was done): the key is released, as before.
#[tokio::test]
async fn a_body_that_fails_after_an_error_head_releases_the_key() {
    let runs = Runs::default();
    let app = failing_body_app(&runs, StatusCode::UNPROCESSABLE_ENTITY);
    let (first, body) = send(&app, pay("fail-after-422", "{}")).await;
    assert_problem(&first, &body, 500, "handler-failed", "fail-after-422");
    let (retry, _) = send(&app, pay("fail-after-422", "{}")).await;
    assert!(!is_replay(&retry));
    assert_eq!(runs.get(), 2);
}

/// A holder that crashed leaves its claim in progress until retention ends; the operation
/// resource says so (`abandoned`, send again with the same key) once its lease lapsed, instead
/// of `in_progress` for a day. A released or unknown operation's 404 says what it may mean.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_operation_resource_reports_a_lapsed_lease_as_abandoned() {
    use tower_idempotency::{
        Fingerprint, IdempotencyKey, Ledger,
        core::{Claim, ClaimRequest, LedgerKey, ScopeDigest},
    };
    let ledger = MemoryLedger::new();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .unscoped()
        .build()
        .unwrap();
    let app: Router = Router::new().merge(layer.operation_router());
    // A request that claimed its key and then crashed: nothing will complete or release it.
    let key = IdempotencyKey::parse(b"crashed").unwrap();
    let claim = ClaimRequest::new(
        LedgerKey::new(b"", &key),
        ScopeDigest::new(b""),
        Fingerprint::of(b"body"),
        Duration::from_millis(200),
        Duration::from_secs(3600),
    );
    let Claim::Acquired(lease) = ledger.claim(&claim).await.unwrap() else {
        panic!("the key was free");
    };
    let status = |id: String| {
        let app = app.clone();
        async move {
            let request = Request::get(format!("/operations/{id}"))
                .body(Body::empty())
                .unwrap();
            let (response, body) = send(&app, request).await;
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (response, json)
        }
    };
    let (live, json) = status(lease.operation_id.to_string()).await;
    assert_eq!(
        (live.status(), &json["status"]),
        (StatusCode::OK, &"in_progress".into())
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (lapsed, json) = status(lease.operation_id.to_string()).await;
    assert_eq!(lapsed.status(), StatusCode::OK);
    assert_eq!(json["status"], "abandoned", "{json}");
    assert!(
        json["detail"].as_str().unwrap().contains("same key"),
        "{json}"
    );

    let (gone, json) = status(uuid_like()).await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let detail = json["detail"].as_str().unwrap();
    assert!(
        detail.contains("released") && detail.contains("same key"),
        "{json}"
    );
}

#[cfg(feature = "axum")]
fn uuid_like() -> String {
    "9f0c1a52-3b7e-4c1d-8e2f-5a6b7c8d9e0f".to_owned()
}
