//! Shared pieces of the layer's tests: an app that counts handler runs, request helpers, and a
//! memory ledger that can fail or stall on command (core's `FaultyLedger`).
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderValue, Request, Response, StatusCode, header},
    routing::post,
};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::MemoryLedger;

/// Counts handler runs.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// `POST /payments`: counts its run, sleeps `delay`, answers 201 with the run number and the body.
pub fn payments(runs: Runs, delay: Duration) -> Router {
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let runs = runs.clone();
            async move {
                let n = runs.bump();
                tokio::time::sleep(delay).await;
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header("x-run", n.to_string())
                    .body(Body::from(format!(
                        r#"{{"run":{n},"echo":{}}}"#,
                        serde_json::to_string(&String::from_utf8_lossy(&body)).unwrap()
                    )))
                    .unwrap()
            }
        }),
    )
}

pub fn pay(key: &str, body: &str) -> Request<Body> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

pub async fn send(app: &Router, request: Request<Body>) -> (Response<()>, Bytes) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

pub fn is_replay(response: &Response<()>) -> bool {
    response.headers().get("idempotent-replayed") == Some(&HeaderValue::from_static("true"))
}

/// Asserts an RFC 9457 problem with `status` and the `type` anchor `slug`, and that `key` is not
/// echoed anywhere in it.
pub fn assert_problem(response: &Response<()>, body: &Bytes, status: u16, slug: &str, key: &str) {
    assert_eq!(
        response.status().as_u16(),
        status,
        "body: {}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        response.headers().get(header::CONTENT_TYPE).unwrap(),
        "application/problem+json"
    );
    let json: serde_json::Value = serde_json::from_slice(body).expect("a JSON problem body");
    assert_eq!(json["status"], status);
    assert!(
        json["type"]
            .as_str()
            .unwrap()
            .ends_with(&format!("#{slug}")),
        "{json}"
    );
    assert!(
        json["title"].is_string() && json["detail"].is_string(),
        "{json}"
    );
    if !key.is_empty() {
        assert!(
            !String::from_utf8_lossy(body).contains(key),
            "the key leaked into {json}"
        );
    }
}

#[allow(unused_imports)] // not every test file uses every name
pub use tower_idempotency_core::conformance::{FaultyLedger, Op};

/// A memory ledger that fails, stalls or answers late on command, and counts its calls.
pub type Faulty = FaultyLedger<MemoryLedger>;
