//! The layer with tower-http's `CompressionLayer`, in the order docs/semantics.md recommends:
//! compression outside idempotency. The layer then stores the handler's own, uncompressed
//! response, and every caller (first or replayed) is compressed as it asks, by its own
//! `Accept-Encoding`. A replay whose body was omitted carries no `Content-Encoding`, so a gzip
//! decoder never meets an empty body that claims to be gzip.
#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::io::Read;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
    routing::post,
};
use support::*;
use tower_http::compression::CompressionLayer;
use tower_idempotency::{IdempotencyLayer, MemoryLedger};

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

fn request(key: &str, gzip: bool) -> Request<Body> {
    let request = Request::post("/report").header("idempotency-key", key);
    let request = if gzip {
        request.header(header::ACCEPT_ENCODING, "gzip")
    } else {
        request
    };
    request.body(Body::empty()).unwrap()
}

fn app(runs: Runs, size: usize, store_limit: usize) -> Router {
    let idempotency = IdempotencyLayer::builder(MemoryLedger::new())
        .with_store_limit(store_limit)
        .unscoped()
        .build()
        .unwrap();
    Router::new()
        .route(
            "/report",
            post(move || {
                runs.bump();
                let body = "all work and no play ".repeat(size / 21 + 1);
                async move { ([(header::CONTENT_TYPE, "text/plain")], body) }
            }),
        )
        .layer(idempotency)
        // Outside: compresses what the idempotency layer answers, stored or replayed.
        .layer(CompressionLayer::new().gzip(true))
}

#[tokio::test]
async fn compression_outside_the_layer_compresses_first_answers_and_replays_alike() {
    let runs = Runs::default();
    let app = app(runs.clone(), 4096, 1 << 20);
    let (first, body) = send(&app, request("r", true)).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()[header::CONTENT_ENCODING], "gzip");
    let plain = gunzip(&body);
    assert!(plain.starts_with(b"all work and no play"));

    // A replay to a client that takes gzip: compressed again from the stored plain body.
    let (replay, body) = send(&app, request("r", true)).await;
    assert!(is_replay(&replay));
    assert_eq!(replay.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(gunzip(&body), plain);

    // A replay to a client that does not: the plain body, as stored.
    let (replay, body) = send(&app, request("r", false)).await;
    assert!(is_replay(&replay));
    assert!(replay.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(body, plain);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_replay_whose_body_was_omitted_is_not_marked_gzip() {
    let runs = Runs::default();
    // Over the store limit: the first caller gets it all, a replay the head alone.
    let app = app(runs.clone(), 8192, 1024);
    let (first, body) = send(&app, request("big", true)).await;
    assert_eq!(first.headers()[header::CONTENT_ENCODING], "gzip");
    assert!(gunzip(&body).len() >= 8192);

    let (replay, body) = send(&app, request("big", true)).await;
    assert!(is_replay(&replay));
    assert_eq!(replay.headers()["idempotent-replay-body"], "omitted");
    assert!(body.is_empty());
    // An empty body labelled gzip would fail the client's decoder.
    assert!(
        replay.headers().get(header::CONTENT_ENCODING).is_none(),
        "an empty replay claims to be {:?}",
        replay.headers().get(header::CONTENT_ENCODING)
    );
    assert_eq!(runs.get(), 1);
}
