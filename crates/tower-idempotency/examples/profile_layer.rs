//! Not an example of use: a fixed workload for profiling the layer's own cost with callgrind
//! (instruction counts do not depend on machine load): `N` fresh requests then `N` replays
//! through `IdempotencyLayer` (`bare`: no layer; `cached`: replays through a `CachedLedger` in
//! front of the memory ledger, as a shared ledger's replays would be). The examples to read are
//! `quick_start.rs` here and `tower-idempotency-sqlx`'s `examples/`.
//!
//! ```sh
//! CARGO_PROFILE_RELEASE_DEBUG=true cargo build --release -p tower-idempotency --example profile_layer
//! valgrind --tool=callgrind target/release/examples/profile_layer fresh 20000
//! callgrind_annotate --inclusive=yes callgrind.out.* | head -60
//! ```
#![allow(clippy::unwrap_used)]

use axum::{
    Router,
    body::{Body, Bytes},
    http::{Request, StatusCode, header},
    routing::post,
};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{CachedLedger, IdempotencyLayer, MemoryLedger};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "fresh".into());
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let body = Bytes::from(format!(
        r#"{{"amount":1000,"note":"{}"}}"#,
        "x".repeat(1000)
    ));
    let handler = Router::new().route(
        "/payments",
        post(|b: Bytes| async move {
            (
                StatusCode::CREATED,
                format!(r#"{{"received":{}}}"#, b.len()),
            )
        }),
    );
    let app = match mode.as_str() {
        "bare" => handler,
        "cached" => handler.layer(IdempotencyLayer::new(
            CachedLedger::new(MemoryLedger::new()),
        )),
        _ => handler.layer(IdempotencyLayer::new(MemoryLedger::new())),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for i in 0..n {
            let key = if mode == "replay" || mode == "cached" {
                "same".to_owned()
            } else {
                format!("k-{i}")
            };
            let request = Request::post("/payments")
                .header("idempotency-key", key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert!(response.status().is_success());
            std::hint::black_box(response.into_body().collect().await.unwrap().to_bytes());
        }
    });
}
