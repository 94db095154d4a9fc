//! README.md's quick start: a payment route behind the layer, scoped by the caller's API key.
//!
//! ```sh
//! cargo run -p tower-idempotency --example quick_start
//! curl -i localhost:3000/payments -H 'x-api-key: k1' -H 'Idempotency-Key: order-42' \
//!      -H 'Content-Type: application/json' -d '{"amount":1000}'   # 201, then replayed
//! ```

use axum::{Json, Router, http::StatusCode, routing::post};
use serde_json::{Value, json};
use tower_idempotency::{IdempotencyLayer, MemoryLedger};

async fn create_payment(Json(payment): Json<Value>) -> (StatusCode, Json<Value>) {
    // Charge the card and record the payment: runs once per key, whatever the retries.
    (
        StatusCode::CREATED,
        Json(json!({ "id": "pay_1", "amount": payment["amount"] })),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keys are compared per caller: here the API key a client sends. Two callers that happen to
    // pick the same Idempotency-Key never see each other's responses.
    let idempotency = IdempotencyLayer::builder(MemoryLedger::new())
        .with_scope(|parts| {
            let api_key = parts.headers.get("x-api-key");
            api_key.map(|v| v.as_bytes().to_vec()).unwrap_or_default()
        })
        .build()?;
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(idempotency);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
