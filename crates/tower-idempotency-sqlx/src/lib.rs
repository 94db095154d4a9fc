//! SQLite and PostgreSQL ledgers for [tower-idempotency](https://docs.rs/tower-idempotency), on
//! [sqlx](https://docs.rs/sqlx) (re-exported as [`sqlx`]).
//!
//! | | [`SqliteLedger`] (feature `sqlite`) | [`PostgresLedger`] (feature `postgres`) |
//! |---|---|---|
//! | for | one machine: an embedded file, or memory | many app instances sharing a database |
//! | clock | the machine's, read by SQLite per statement | the database's (`now()`) |
//! | waiting duplicates | poll, 5 ms doubling to 100 ms | `LISTEN`/`NOTIFY` |
//!
//! Both keep one table (default `idempotency_records`, see `with_table`), created by `migrate()`
//! from the versioned SQL shipped in the crate's `migrations/` directory; both pass the
//! [conformance suite](https://docs.rs/tower-idempotency-core/latest/tower_idempotency_core/conformance/)
//! of the [`Ledger`] contract. A claim is
//! one atomic `INSERT .. ON CONFLICT DO UPDATE .. WHERE .. RETURNING` statement (on PostgreSQL,
//! preceded by a plain insert or a plain read, as the mix of recent claims suggests:
//! [`ClaimStrategy`]); complete,
//! release and renew are fenced by the token in their `WHERE` clause. Expired records are deleted
//! in batches by [`Ledger::purge_expired`]; spawn [`purge_periodically`] to run it. The schema,
//! clocks and operational notes are in `docs/operations.md`.
//!
//! # Quick start: SQLite
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_idempotency_sqlx::{SqliteLedger, purge_periodically};
//!
//! let ledger = SqliteLedger::connect("sqlite://idempotency.db?mode=rwc").await?;
//! ledger.migrate().await?;
//! tokio::spawn(purge_periodically(ledger.clone(), Duration::from_secs(60), 1_000));
//! // hand `ledger` to the idempotency layer
//! # Ok(()) }
//! ```
//!
//! # Quick start: PostgreSQL
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_idempotency_sqlx::{PostgresLedger, purge_periodically, sqlx::postgres::PgPoolOptions};
//!
//! // With a pool of your own (or `PostgresLedger::connect(url)`):
//! let pool = PgPoolOptions::new()
//!     .max_connections(20)
//!     .test_before_acquire(false) // saves a round trip per ledger call
//!     .connect("postgres://app@db.internal/app")
//!     .await?;
//! let ledger = PostgresLedger::new(pool).with_table("idempotency_records")?;
//! ledger.migrate().await?;
//! tokio::spawn(purge_periodically(ledger.clone(), Duration::from_secs(60), 1_000));
//! # Ok(()) }
//! ```
//!
//! # Examples
//!
//! Two small axum apps with the layer in front of a payments endpoint, each migrating its ledger
//! and spawning [`purge_periodically`]: `examples/sqlite.rs` (scoped by an `X-Tenant` header)
//! and `examples/postgres.rs` (one fixed tenant; reads `DATABASE_URL`).
//!
//! ```text
//! cargo run -p tower-idempotency-sqlx --features sqlite --example sqlite
//! DATABASE_URL=postgres://… cargo run -p tower-idempotency-sqlx --features postgres --example postgres
//! ```
//!
//! # Errors
//!
//! Connection and query failures are [`LedgerError::Backend`] with the [`sqlx::Error`] as its
//! source; a row that does not decode (a bad status, a truncated headers blob, a digest of the
//! wrong length) is [`LedgerError::Corrupt`]; a stale fencing token is
//! [`LedgerError::LeaseLost`]. Setup (`connect`, `migrate`) returns [`sqlx::Error`], and a bad
//! table name [`TableNameError`].
//!
//! TLS is not enabled by this crate; turn on a `sqlx` TLS feature (such as `tls-rustls`) in your
//! own manifest and feature unification applies it.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod backend;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod ledger;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod migrate;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod row;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod table;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod tx;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod writer;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod claim_strategy;
#[cfg(feature = "postgres")]
mod completions;
#[cfg(feature = "postgres")]
mod listener;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use claim_strategy::ClaimStrategy;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use ledger::SqlLedger;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresLedger;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteLedger;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use table::{DEFAULT_TABLE, TableNameError};

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;

pub use tower_idempotency_core::{
    Claim, ClaimRequest, Ledger, LedgerError, StoredResponse, purge_periodically,
};
