//! A payment API that cannot charge twice: [tower-idempotency] in front of a card processor
//! (a separate HTTP service, [`card_processor`], idempotent on the key it is sent) and a
//! `payments` table, on SQLite (the default, one file) or PostgreSQL.
//!
//! ```text
//! cargo run -p payment-service -- serve              # 127.0.0.1:3000, ./payment-service.db
//! cargo run -p payment-service --bin storm           # duplicates, drops, retries, then an audit
//! ```
//!
//! The app is a library so that tests build the same router in-process ([`app::app`]) and run
//! the same storm ([`storm::run`]) as the binaries.
//!
//! # Exactly-once mode
//!
//! On by default (`--exactly-once true`, [`Settings::exactly_once`]): the layer is built with
//! `with_transactions()`, and `POST /payments` writes its row through the
//! [`LedgerTx`](tower_idempotency::LedgerTx) extractor, in the transaction that also stores the
//! 201 for its key (the ledger and the `payments` table share one database on both backends).
//! Either both commit or neither does: a process killed between the write and the commit leaves
//! no payment and a claim whose lease runs out, and the retry (409 until then) charges once.
//! With `--exactly-once false` the payment commits on its own before the response is stored; a
//! crash in between leaves a payment whose key is not completed, and the retry after the lease
//! charges a second time. `tests/crash.rs` kills the binary at both points and shows the two.
//!
//! What it costs and what it does not cover:
//!
//! - One pooled connection per request in flight, held from the claim to the commit (the
//!   processor call included). The SQLite pool has 4 connections, the PostgreSQL pool 10.
//! - PostgreSQL runs the transaction at its default isolation, READ COMMITTED. The handler only
//!   inserts, which needs nothing stronger; a handler that reads and then writes on what it read
//!   needs its own locking (`SELECT .. FOR UPDATE`) or a stricter level.
//! - SQLite's transaction takes the database's write lock at its first write and keeps it to the
//!   commit, so the handler writes last, after the processor call.
//! - Side effects outside the database are not rolled back: the card charge stands. They are
//!   made idempotent instead: `POST /payments` sends the processor
//!   [`Operation::derive("charge")`](tower_idempotency::Operation::derive) as its
//!   `Idempotency-Key`, the same on every run of the payment (after a 5xx released the key, after
//!   a crash and a takeover), so every re-run gets the processor's replay and the card is charged
//!   once. `tests/downstream.rs` kills the service between the charge and the insert, kills the
//!   processor after charging, and makes the insert fail: one charge per key every time.
//!
//! [tower-idempotency]: https://docs.rs/tower-idempotency

pub mod app;
pub mod auth;
pub mod card_processor;
pub mod extract;
pub mod http_trace;
pub mod ledger_cli;
pub mod openapi;
pub mod problem;
pub mod processor;
pub mod store;
pub mod storm;
pub mod telemetry;

use std::time::Duration;

use axum::Router;
use tower_idempotency::{
    Ledger, LedgerError,
    core::{FencingToken, LedgerKey, RecordInfo},
};
use tower_idempotency_redis::RedisLedger;
use tower_idempotency_sqlx::{PostgresLedger, SqliteLedger};

pub use app::{Settings, app, app_with_drain};
pub use store::Store;

/// The default database: a SQLite file in the working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://payment-service.db?mode=rwc";

/// The database behind the service: the idempotency ledger and the `payments` table share it,
/// unless the ledger is on Redis.
#[derive(Debug, Clone)]
pub enum Database {
    /// SQLite: the ledger and the payments in one file.
    Sqlite(SqliteLedger),
    /// PostgreSQL: the ledger and the payments in one database.
    Postgres(PostgresLedger),
    /// The ledger on Redis (one server or a Cluster), the payments in the SQL database `Store`
    /// names. Not transactional: exactly-once mode is refused.
    Redis(RedisLedger, Store),
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The database URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// The ledger URL is neither the database's nor `redis://`.
    #[error(
        "unsupported ledger URL: use the database URL, or redis://HOST:PORT (a comma-separated \
         list of redis:// URLs for a Redis Cluster)"
    )]
    UnsupportedLedgerUrl,
    /// Exactly-once mode was asked for with a ledger that is not transactional (Redis).
    #[error(
        "exactly-once mode needs a transactional ledger (SQLite or PostgreSQL, the payments' own \
         database); with a Redis ledger pass --exactly-once false"
    )]
    NotTransactional,
    /// Connecting to the Redis ledger failed.
    #[error("redis ledger: {0}")]
    Redis(#[from] tower_idempotency_redis::redis::RedisError),
    /// Connecting or migrating failed.
    #[error("database: {0}")]
    Database(#[from] tower_idempotency_sqlx::sqlx::Error),
    /// A bad ledger table name.
    #[error("ledger table: {0}")]
    Table(#[from] tower_idempotency_sqlx::TableNameError),
    /// A setting the idempotency layer refuses.
    #[error("idempotency layer: {0}")]
    Layer(#[from] tower_idempotency::ConfigError),
    /// The processor's listener could not be bound.
    #[error("listener: {0}")]
    Io(std::io::Error),
    /// The processor's HTTP client could not be built.
    #[error("processor client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Runs `$call` with `$ledger` bound to whichever ledger `$database` holds.
macro_rules! on_ledger {
    ($database:expr, $ledger:ident => $call:expr) => {
        match $database {
            Self::Sqlite($ledger) => $call,
            Self::Postgres($ledger) => $call,
            Self::Redis($ledger, _) => $call,
        }
    };
}

impl Database {
    /// Connects to `url` and creates the ledger's table and the `payments` table if missing.
    /// `ledger_table` replaces the ledger's default table name (`idempotency_records`).
    pub async fn connect(url: &str, ledger_table: Option<&str>) -> Result<Self, StartError> {
        let database = if url.starts_with("sqlite:") {
            let ledger = SqliteLedger::connect(url).await?;
            Self::Sqlite(match ledger_table {
                Some(table) => ledger.with_table(table)?,
                None => ledger,
            })
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let ledger = PostgresLedger::connect(url).await?;
            Self::Postgres(match ledger_table {
                Some(table) => ledger.with_table(table)?,
                None => ledger,
            })
        } else {
            return Err(StartError::UnsupportedUrl);
        };
        match &database {
            Self::Sqlite(ledger) => ledger.migrate().await?,
            Self::Postgres(ledger) => ledger.migrate().await?,
            Self::Redis(..) => {}
        }
        database.store().migrate().await?;
        Ok(database)
    }

    /// Moves the ledger to `ledger_url` when it names Redis: `redis://HOST:PORT` for one
    /// server, a comma-separated list of `redis://` URLs for a Cluster. `None`, empty or the
    /// database URL itself keep the ledger in the database. The payments stay where they are.
    pub async fn with_ledger_url(
        self,
        database_url: &str,
        ledger_url: Option<&str>,
    ) -> Result<Self, StartError> {
        let Some(url) = ledger_url.filter(|url| !url.is_empty() && *url != database_url) else {
            return Ok(self);
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(StartError::UnsupportedLedgerUrl);
        }
        let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
        let ledger = if nodes.len() > 1 {
            RedisLedger::connect_cluster(nodes).await?
        } else {
            RedisLedger::connect(url).await?
        };
        Ok(Self::Redis(ledger, self.store()))
    }

    /// The `payments` table, on the ledger's pool (or the SQL database's, with a Redis ledger).
    pub fn store(&self) -> Store {
        match self {
            Self::Sqlite(ledger) => Store::Sqlite(ledger.pool().clone()),
            Self::Postgres(ledger) => Store::Postgres(ledger.pool().clone()),
            Self::Redis(_, store) => store.clone(),
        }
    }

    /// Where the ledger is: `"sqlite"`, `"postgres"` or `"redis"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::Redis(..) => "redis",
        }
    }

    /// Looks up the live record under `key` (for operators; see
    /// [`Ledger::inspect`]), on whichever ledger this is.
    pub async fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        on_ledger!(self, ledger => ledger.inspect(key, with_body).await)
    }

    /// Claims in progress whose lease lapsed at least `older_than` ago, every scope's
    /// ([`Ledger::stuck`]).
    pub async fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        on_ledger!(self, ledger => ledger.stuck(older_than, limit).await)
    }

    /// Releases the claim under `key` if `token` still holds it
    /// ([`Ledger::force_release`]).
    pub async fn force_release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> Result<(), LedgerError> {
        on_ledger!(self, ledger => ledger.force_release(key, token).await)
    }

    /// Deletes the record under `key`, whatever its state
    /// ([`Ledger::evict`]).
    pub async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        on_ledger!(self, ledger => ledger.evict(key).await)
    }

    /// The service's router on this database, calling the processor at `settings.processor_url`.
    pub fn router(&self, settings: &Settings) -> Result<Router, StartError> {
        Ok(self.router_with_drain(settings)?.0)
    }

    /// The service's router on this database, and the idempotency layer's drain handle.
    pub fn router_with_drain(
        &self,
        settings: &Settings,
    ) -> Result<(Router, tower_idempotency::DrainHandle), StartError> {
        let store = self.store();
        Ok(match self {
            Self::Sqlite(ledger) => app_with_drain(ledger.clone(), store, settings)?,
            Self::Postgres(ledger) => app_with_drain(ledger.clone(), store, settings)?,
            Self::Redis(ledger, _) => app::app_on(ledger.clone(), store, settings)?,
        })
    }
}
