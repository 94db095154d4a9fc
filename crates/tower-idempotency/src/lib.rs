//! Tower/axum middleware that makes handlers replay-safe with the `Idempotency-Key` header.
//!
//! A retried `POST /payments` with the same key never charges twice: the first request runs the
//! handler, a retry gets the stored response back (`Idempotent-Replayed: true`), a concurrent
//! duplicate gets 409 (or 202, or waits for the result), and the same key with a different body
//! gets 422. The behaviour follows the IETF draft
//! [`draft-ietf-httpapi-idempotency-key-header`](https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/),
//! Stripe's idempotent requests and brandur's Postgres design.
//!
//! ```
//! use axum::{Json, Router, http::StatusCode, routing::post};
//! use serde_json::{Value, json};
//! use tower_idempotency::{IdempotencyLayer, MemoryLedger};
//!
//! async fn create_payment(Json(payment): Json<Value>) -> (StatusCode, Json<Value>) {
//!     // charge the card once, write the payment...
//!     (StatusCode::CREATED, Json(json!({ "id": "pay_1", "amount": payment["amount"] })))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(MemoryLedger::new()));
//! ```
//!
//! | situation | response | handler runs |
//! |---|---|---|
//! | first request with this key | the handler's own response | once |
//! | same key, same request, completed | the stored response + `Idempotent-Replayed: true` | no |
//! | same key, different request | 422 | no |
//! | same key, same request, still running | 409 + `Retry-After` (or 202, or wait) | no |
//! | missing or invalid key | 400 | no |
//! | body over the limit (1 MiB) | 413 | no |
//! | ledger unreachable | 503 + `Retry-After` (or fail open) | no |
//!
//! Rejections are `application/problem+json` ([`problem`]). Settings and their defaults are on
//! [`IdempotencyLayerBuilder`]. Ledgers implement [`Ledger`]: [`MemoryLedger`] here, SQLite and
//! PostgreSQL in `tower-idempotency-sqlx`. Spans and metrics are described in [`telemetry`].
//!
//! # How a covered request runs
//! 1. The key is read and validated; the body is read up to the limit and fingerprinted.
//! 2. The ledger claims `(scope, key)` in one atomic step with a fresh fencing token.
//! 3. The winner runs the handler (if the client disconnects, the rest moves into a task of its
//!    own rather than stopping),
//!    renewing its lease every third of the lease; its response is stored with the token (a
//!    holder whose lease was taken over cannot overwrite the newer result), or, for 5xx, a panic,
//!    a body that fails behind an error head or a response marked [`DoNotStore`], the key is
//!    released so that a retry runs again (a body that fails behind a success head stores a 500
//!    `outcome-unknown` instead).
//! 4. Everyone else gets the replay, 409/202/a wait, or 422, as above.
//!
//! # Features
//! The layer is plain tower (`tower-layer`, `tower-service`, `http-body`); both features are on
//! by default.
//! - `axum`: the operation-status router (`IdempotencyLayer::operation_router`), the
//!   operators' admin router (`IdempotencyLayer::admin_router`) and the `LedgerTx` extractor
//!   of exactly-once mode.
//! - `opentelemetry`: OpenTelemetry metrics (`with_meter`). Spans go through `tracing` either
//!   way.
//!
//! Off by default:
//! - `openapi`: the layer's contract as OpenAPI 3.1 (`IdempotencyLayer::openapi`, with utoipa):
//!   the key header, the replay headers, the rejections, the operation-status resource and the
//!   expiry policy, from the layer's own settings.
//!
//! # Downstream keys, and answers that are not stored
//! A handler that calls another idempotent service (a card processor) passes it a key derived
//! from its [`Operation`]: the same on every run of this request, even after a 5xx released the
//! key, so the downstream service charges once however often the handler re-runs.
//! A validation failure, given before any side effect, is marked [`DoNotStore`] (or sent with
//! `Cache-Control: no-store`): the key is released, and the fixed request may reuse it.
//!
//! ```
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower_idempotency::{DoNotStore, IdempotencyLayer, MemoryLedger, Operation};
//!
//! async fn pay(op: Operation, body: String) -> Result<StatusCode, (DoNotStore, StatusCode)> {
//!     if body.is_empty() {
//!         return Err((DoNotStore, StatusCode::BAD_REQUEST)); // not stored: fix and retry
//!     }
//!     let charge_key = op.derive("charge"); // the processor's Idempotency-Key, every run
//!     # let _ = charge_key;
//!     Ok(StatusCode::CREATED)
//! }
//! let app: Router = Router::new()
//!     .route("/payments", post(pay))
//!     .layer(IdempotencyLayer::new(MemoryLedger::new()));
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod answer;
mod body;
mod breaker;
mod builder;
mod capture;
mod config;
mod downstream;
mod drain;
mod duplicate;
mod future;
mod intake;
mod layer;
mod lease;
mod ledger_call;
#[cfg(feature = "openapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "openapi")))]
pub mod openapi;
#[cfg(feature = "axum")]
mod operations;
mod outcome;
pub mod problem;
mod response;
mod service;
mod store_decision;
pub mod telemetry;
mod transaction;

pub use body::ResponseBody;
pub use breaker::CircuitBreaker;
pub use builder::{ConfigError, IdempotencyLayerBuilder, InProgress, LedgerFailure, MissingKey};
pub use capture::Streaming;
pub use config::is_stored_by_default;
pub use downstream::{MissingOperation, Operation};
pub use drain::DrainHandle;
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use outcome::Outcome;
pub use response::{IDEMPOTENT_REPLAY_BODY, IDEMPOTENT_REPLAYED};
pub use service::Idempotency;
pub use store_decision::DoNotStore;
pub use tower_idempotency_core::{
    self as core, CachedLedger, Fingerprint, IdempotencyKey, Ledger, LedgerError, MemoryLedger,
    TransactionalLedger, purge_periodically,
};
#[cfg(feature = "axum")]
pub use transaction::{LedgerTx, MissingLedgerTx};

#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
