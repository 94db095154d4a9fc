//! A payments endpoint made idempotent with a PostgreSQL ledger, for one fixed tenant. Every app
//! instance pointed at the same database shares the ledger.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run -p tower-idempotency-sqlx --features postgres --example postgres
//! curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: k1' \
//!   -H 'Content-Type: application/json' -d '{"amount":100}'
//! ```
//! Send it twice: the second answer is the stored first one, and the handler runs once.

use std::time::Duration;

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency_sqlx::{PostgresLedger, purge_periodically};

async fn create_payment(Json(payment): Json<Value>) -> Json<Value> {
    let id = std::time::UNIX_EPOCH
        .elapsed()
        .unwrap_or_default()
        .as_nanos();
    Json(json!({ "id": format!("pay_{id:x}"), "amount": payment["amount"] }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")?;
    let ledger = PostgresLedger::connect(&url).await?;
    ledger.migrate().await?;
    tokio::spawn(purge_periodically(
        ledger.clone(),
        Duration::from_secs(60),
        1_000,
    ));

    let idempotency = IdempotencyLayer::builder(ledger)
        // One tenant: a fixed scope. Use the caller's API key or tenant id when there are more.
        .with_scope(|_| "tenant-1")
        .build()?;
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(idempotency);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
