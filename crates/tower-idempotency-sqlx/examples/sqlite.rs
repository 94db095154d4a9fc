//! A payments endpoint made idempotent with a SQLite ledger, scoped by the `X-Tenant` header.
//!
//! ```text
//! cargo run -p tower-idempotency-sqlx --features sqlite --example sqlite
//! curl -i -X POST localhost:3000/payments -H 'X-Tenant: acme' -H 'Idempotency-Key: k1' \
//!   -H 'Content-Type: application/json' -d '{"amount":100}'
//! ```
//! Send it twice: the second answer is the stored first one, and the handler runs once.

use std::time::Duration;

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency_sqlx::{SqliteLedger, purge_periodically};

async fn create_payment(Json(payment): Json<Value>) -> Json<Value> {
    let id = std::time::UNIX_EPOCH
        .elapsed()
        .unwrap_or_default()
        .as_nanos();
    Json(json!({ "id": format!("pay_{id:x}"), "amount": payment["amount"] }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ledger = SqliteLedger::connect("sqlite://idempotency.db?mode=rwc").await?;
    ledger.migrate().await?;
    tokio::spawn(purge_periodically(
        ledger.clone(),
        Duration::from_secs(60),
        1_000,
    ));

    let idempotency = IdempotencyLayer::builder(ledger)
        // Keys are compared per tenant: two tenants may use the same key.
        .with_scope(|parts| {
            parts
                .headers
                .get("x-tenant")
                .map_or_else(Vec::new, |v| v.as_bytes().to_vec())
        })
        .build()?;
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(idempotency);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
