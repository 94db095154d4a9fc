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
