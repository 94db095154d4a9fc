//! The card processor: a separate HTTP service (`payment-service processor`, or started by
//! `serve` in-process behind a real listener) that records charges in its own SQLite file and is
//! itself idempotent on the `Idempotency-Key` it is sent, with this crate's own layer in
//! exactly-once mode.
//!
//! - `POST /charges` (`Idempotency-Key` required): `{merchant, customer, amount, currency}`;
//!   201 with the charge, or 402 `card-declined` for an amount over [`CARD_LIMIT`] (stored, like
//!   every answer: the same key gets the same answer for 24 hours).
//! - `GET /charges?merchant=..&customer=..`: the charges recorded, for audits.
//! - `GET /healthz`.
//!
//! It can be told to misbehave ([`Faults`]): to fail before charging (503, nothing recorded), to
//! fail after charging (the charge and its answer are recorded, then the answer is replaced by a
//! 503, or the connection is broken mid-answer), to be slow, and (for crash tests) to print
//! `CHARGED` after recording a charge and never answer. The faults sit outside the idempotency
//! layer, so an answer lost after charging is exactly what a real network does to a real
//! processor: the charge stands, and the same key gets its replay.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Extension, Json, Router,
    body::{Body, Bytes},
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, LedgerTx, MissingKey};
use tower_idempotency_sqlx::{
    SqliteLedger,
    sqlx::{self, Row},
};

/// The default database of `payment-service processor` (and of the processor `serve` starts).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://payment-processor.db?mode=rwc";

/// Amounts above this (in minor units) are declined: the demo card's limit.
pub const CARD_LIMIT: i64 = 1_000_000;

const SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS charges (
    id         TEXT PRIMARY KEY,
    merchant   TEXT NOT NULL,
    customer   TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    currency   TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_merchant_customer ON charges (merchant, customer);";

/// How the processor misbehaves. The default: it answers at once and never fails.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// How long a charge takes (inside the idempotency layer: a duplicate meanwhile gets 409).
    pub latency: Duration,
    /// The share of charge requests answered 503 before anything is recorded (0.0 to 1.0).
    pub fail_before: f64,
    /// The share of successful charges whose answer is replaced by a 503 after the charge and
    /// its answer were recorded (0.0 to 1.0).
    pub fail_after: f64,
    /// The share of successful charges whose connection is broken mid-answer after the charge
    /// was recorded (0.0 to 1.0).
    pub drop_after: f64,
    /// A test hook: after recording a charge (not on a replay), print `CHARGED` on stdout and
    /// never answer.
    pub pause_after_charge: bool,
    /// The processor's idempotency lease (not a fault, but set with them for crash tests, whose
    /// killed processor leaves a claim behind); `None`: the layer's default, 30 s.
    pub lease: Option<Duration>,
}

/// A charge as recorded and answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Charge {
    /// `ch_` and 32 hex digits.
    pub id: String,
    /// Who is paid: the payment service's tenant.
    pub merchant: String,
    /// Who pays.
    pub customer: String,
    /// In minor units.
    pub amount: i64,
    /// Three letters.
    pub currency: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// The body of `POST /charges`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// Who is paid.
    pub merchant: String,
    /// Who pays.
    pub customer: String,
    /// In minor units.
    pub amount: i64,
    /// Three letters.
    pub currency: String,
}

/// Opens (creating if missing) the processor's database: its idempotency ledger and `charges`.
pub async fn connect(url: &str) -> Result<SqliteLedger, sqlx::Error> {
    let ledger = SqliteLedger::connect(url).await?;
    ledger.migrate().await?;
    sqlx::raw_sql(SCHEMA).execute(ledger.pool()).await?;
    Ok(ledger)
}

/// The processor's routes on `ledger`, with `faults`.
pub fn router(
    ledger: SqliteLedger,
    faults: Faults,
) -> Result<Router, tower_idempotency::ConfigError> {
    let builder = IdempotencyLayer::builder(ledger.clone());
    let builder = match faults.lease {
        // A short test lease would give a deadline of a quarter of it: allow a third.
        Some(lease) => builder
            .with_lease(lease)
            .with_ledger_timeout((lease / 3).min(std::time::Duration::from_secs(5))),
        None => builder,
    };
    // One scope: the merchant is in the body, and the charge keys the service derives are
    // already unique per merchant (they digest the merchant's own scope).
    let layer = builder
        .unscoped()
        .with_missing_key(MissingKey::Reject)
        .with_json_canonicalization(true)
        .with_transactions()
        .build()?;
    let charges = Router::new()
        .route("/charges", post(charge))
        .layer(layer)
        .layer(middleware::from_fn(misbehave))
        .layer(Extension(faults));
    Ok(Router::new()
        .route("/charges", get(list))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .with_state(ledger)
        .merge(charges))
}

/// Serves the processor on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Starts a processor on `database_url` behind a listener on 127.0.0.1 (any free port), in a task
/// of its own; returns its base URL. This is what `serve` does without `--processor-url`, and
/// what in-process tests use.
pub async fn spawn(database_url: &str, faults: Faults) -> Result<String, crate::StartError> {
    let ledger = connect(database_url).await?;
    let router = router(ledger, faults)?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(crate::StartError::Io)?;
    let addr = listener.local_addr().map_err(crate::StartError::Io)?;
    tokio::spawn(async move {
        if let Err(error) = serve(listener, router).await {
            tracing::error!(%error, "the card processor stopped");
        }
    });
    Ok(format!("http://{addr}"))
}

/// The faults, outside the idempotency layer.
async fn misbehave(Extension(faults): Extension<Faults>, request: Request, next: Next) -> Response {
    if faults.fail_before > 0.0 && fastrand::f64() < faults.fail_before {
        return unavailable("injected failure before charging; nothing was charged");
    }
    let response = next.run(request).await;
    if !response.status().is_success() {
        return response;
    }
    // A replay charged nothing now: the hook waits for a fresh charge.
    if faults.pause_after_charge
        && !response
            .headers()
            .contains_key(tower_idempotency::IDEMPOTENT_REPLAYED)
    {
        {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "CHARGED");
            let _ = stdout.flush();
        }
        std::future::pending::<()>().await;
    }
    if faults.fail_after > 0.0 && fastrand::f64() < faults.fail_after {
        return unavailable("injected failure after charging; the charge was recorded");
    }
    if faults.drop_after > 0.0 && fastrand::f64() < faults.drop_after {
        // Headers go out, then the body fails: hyper breaks the connection mid-answer.
        let (parts, _) = response.into_parts();
        let broken = futures_util::stream::iter([
            Ok(Bytes::from_static(b"{")),
            Err(std::io::Error::other(
                "injected: connection dropped after charging",
            )),
        ]);
        let mut response = Response::from_parts(parts, Body::from_stream(broken));
        response.headers_mut().remove(header::CONTENT_LENGTH);
        return response;
    }
    response
}

fn unavailable(detail: &'static str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        Json(serde_json::json!({ "error": "unavailable", "detail": detail })),
    )
        .into_response()
}

async fn charge(
    Extension(faults): Extension<Faults>,
    mut tx: LedgerTx<SqliteLedger>,
    Json(request): Json<ChargeRequest>,
) -> Response {
    tokio::time::sleep(faults.latency).await;
    if request.amount > CARD_LIMIT {
        return (
            StatusCode::PAYMENT_REQUIRED,
            Json(serde_json::json!({
                "error": "card-declined",
                "detail": format!("the card's limit is {CARD_LIMIT} minor units"),
            })),
        )
            .into_response();
    }
    let charge = Charge {
        id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
        merchant: request.merchant,
        customer: request.customer,
        amount: request.amount,
        currency: request.currency,
        created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    // In the layer's transaction: the charge commits with its stored answer, or not at all.
    let inserted = sqlx::query(
        "INSERT INTO charges (id, merchant, customer, amount, currency, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&charge.id)
    .bind(&charge.merchant)
    .bind(&charge.customer)
    .bind(charge.amount)
    .bind(&charge.currency)
    .bind(&charge.created_at)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => (StatusCode::CREATED, Json(charge)).into_response(),
        Err(error) => {
            tracing::warn!(%error, "recording a charge failed");
            unavailable("the charge could not be recorded; nothing was charged")
        }
    }
}

/// `GET /charges?merchant=..&customer=..`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    merchant: String,
    customer: String,
}

async fn list(State(ledger): State<SqliteLedger>, Query(query): Query<ListQuery>) -> Response {
    let rows = sqlx::query(
        "SELECT id, merchant, customer, amount, currency, created_at FROM charges \
         WHERE merchant = $1 AND customer = $2 ORDER BY created_at, id",
    )
    .bind(&query.merchant)
    .bind(&query.customer)
    .fetch_all(ledger.pool())
    .await;
    let charges: Result<Vec<Charge>, sqlx::Error> = rows.and_then(|rows| {
        rows.iter()
            .map(|row| {
                Ok(Charge {
                    id: row.try_get("id")?,
                    merchant: row.try_get("merchant")?,
                    customer: row.try_get("customer")?,
                    amount: row.try_get("amount")?,
                    currency: row.try_get("currency")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    });
    match charges {
        Ok(charges) => Json(serde_json::json!({ "charges": charges })).into_response(),
        Err(error) => {
            tracing::warn!(%error, "listing charges failed");
            unavailable("the charges could not be read")
        }
    }
}
