//! In-process cost of the layer: a bare axum handler vs the same handler behind
//! `IdempotencyLayer<MemoryLedger>`, on the fresh path (a new key per request) and the replay
//! path (one key, replayed), with a 1 KiB JSON body. Run: `cargo bench -p tower-idempotency`.
//! Method and numbers: docs/benchmarks.md.
#![allow(missing_docs, clippy::unwrap_used)]

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{Request, StatusCode, header},
    routing::post,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryLedger};

/// A 1 KiB JSON payment.
fn body() -> Bytes {
    let mut note = String::new();
    while note.len() < 1024 - 80 {
        note.push_str("abcdefghij");
    }
    Bytes::from(format!(
        r#"{{"amount":1000,"currency":"EUR","customer":"cus_123","note":"{note}"}}"#
    ))
}

fn app() -> Router {
    Router::new().route(
        "/payments",
        post(|body: Bytes| async move {
            // Trivial handler: answer with a small JSON document derived from the body.
            let len = body.len();
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"id":"pay_1","received":{len}}}"#),
            )
        }),
    )
}

fn request(key: &str, body: &Bytes) -> Request<Body> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.clone()))
        .unwrap()
}

async fn run(app: &Router, request: Request<Body>) -> Bytes {
    let response = app.clone().oneshot(request).await.unwrap();
    assert!(response.status().is_success());
    response.into_body().collect().await.unwrap().to_bytes()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = body();
    let bare = app();
    let layered = app().layer(IdempotencyLayer::new(MemoryLedger::new()));
    runtime.block_on(run(&layered, request("replayed", &body)));
    let next = AtomicU64::new(0);

    let mut group = c.benchmark_group("layer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare handler", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(run(&bare, request("unused", &body)).await) })
    });
    group.bench_function("memory ledger, fresh key", |b| {
        b.to_async(&runtime).iter(|| async {
            let key = format!("k-{}", next.fetch_add(1, Ordering::Relaxed));
            black_box(run(&layered, request(&key, &body)).await)
        })
    });
    group.bench_function("memory ledger, replay", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(run(&layered, request("replayed", &body)).await) })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
