//! A minimal payment server for the crash tests: `POST /payments` writes one row to a payments
//! table, in the idempotency ledger's transaction (`--transactional`) or directly on the pool,
//! and answers 201. With `--pause-after-write` it prints `WRITTEN` after the write and hangs
//! before answering, so that a test can `kill -9` it exactly there.
//!
//! ```text
//! crash_target <database-url> <ledger-table> <payments-table> <lease-ms> [--transactional] [--pause-after-write]
//! ```
//! It prints `LISTENING <addr>` once it serves on an ephemeral port of 127.0.0.1.

use std::time::Duration;

use axum::{Router, body::Bytes, http::StatusCode, routing::post};
use tokio::io::AsyncWriteExt;
use tower_idempotency::{IdempotencyLayer, LedgerTx, TransactionalLedger};
use tower_idempotency_sqlx::{
    PostgresLedger, SqliteLedger,
    sqlx::{self, AssertSqlSafe},
};

#[derive(Clone)]
struct Settings {
    payments: String,
    pause: bool,
    /// `$1` for PostgreSQL, `?1` for SQLite.
    placeholder: &'static str,
}

async fn say(line: &str) {
    let mut out = tokio::io::stdout();
    // The test reads these lines; if it is gone there is nobody to tell.
    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
    let _ = out.flush().await;
}

/// After the write, before the answer: the test kills the process here.
async fn maybe_pause(settings: &Settings) {
    if settings.pause {
        say("WRITTEN").await;
        std::future::pending::<()>().await;
    }
}

fn insert(settings: &Settings) -> String {
    format!(
        "INSERT INTO {} (reference) VALUES ({})",
        settings.payments, settings.placeholder
    )
}

fn layer<L: TransactionalLedger + Clone>(
    ledger: L,
    lease: Duration,
    transactional: bool,
) -> IdempotencyLayer<L> {
    let builder = IdempotencyLayer::builder(ledger)
        .with_lease(lease)
        // The longest deadline the short test lease allows: this process is fresh, and its
        // first ledger calls open pool connections.
        .with_ledger_timeout(lease / 3);
    let builder = if transactional {
        builder.with_transactions()
    } else {
        builder
    };
    builder.build().expect("valid layer settings")
}

macro_rules! app {
    ($ledger:expr, $ledger_ty:ty, $settings:expr, $lease:expr, $transactional:expr) => {{
        let ledger: $ledger_ty = $ledger;
        let settings: Settings = $settings;
        let router = if $transactional {
            let settings = settings.clone();
            Router::new().route(
                "/payments",
                post(move |mut tx: LedgerTx<$ledger_ty>, body: Bytes| {
                    let settings = settings.clone();
                    async move {
                        let reference = String::from_utf8_lossy(&body).into_owned();
                        let written = sqlx::query(AssertSqlSafe(insert(&settings)))
                            .bind(&reference)
                            .execute(&mut *tx)
                            .await;
                        if written.is_err() {
                            return (StatusCode::SERVICE_UNAVAILABLE, "write failed");
                        }
                        maybe_pause(&settings).await;
                        (StatusCode::CREATED, "charged")
                    }
                }),
            )
        } else {
            let (settings, pool) = (settings.clone(), ledger.pool().clone());
            Router::new().route(
                "/payments",
                post(move |body: Bytes| {
                    let (settings, pool) = (settings.clone(), pool.clone());
                    async move {
                        let reference = String::from_utf8_lossy(&body).into_owned();
                        let written = sqlx::query(AssertSqlSafe(insert(&settings)))
                            .bind(&reference)
                            .execute(&pool)
                            .await;
                        if written.is_err() {
                            return (StatusCode::SERVICE_UNAVAILABLE, "write failed");
                        }
                        maybe_pause(&settings).await;
                        (StatusCode::CREATED, "charged")
                    }
                }),
            )
        };
        router.layer(layer(ledger, $lease, $transactional))
    }};
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, ledger_table, payments, lease_ms, flags @ ..] = &args[..] else {
        eprintln!(
            "usage: crash_target <database-url> <ledger-table> <payments-table> <lease-ms> [--transactional] [--pause-after-write]"
        );
        std::process::exit(2);
    };
    let transactional = flags.iter().any(|f| f == "--transactional");
    let settings = Settings {
        payments: payments.clone(),
        pause: flags.iter().any(|f| f == "--pause-after-write"),
        placeholder: if url.starts_with("postgres") {
            "$1"
        } else {
            "?1"
        },
    };
    let lease = Duration::from_millis(lease_ms.parse().expect("lease in ms"));
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {payments} (id {}, reference TEXT NOT NULL)",
        if url.starts_with("postgres") {
            "BIGSERIAL PRIMARY KEY"
        } else {
            "INTEGER PRIMARY KEY"
        }
    );
    let app = if url.starts_with("postgres") {
        let ledger = PostgresLedger::connect(url)
            .await
            .expect("connect")
            .with_table(ledger_table)
            .expect("table");
        ledger.migrate().await.expect("migrate");
        sqlx::query(AssertSqlSafe(create))
            .execute(ledger.pool())
            .await
            .expect("payments table");
        app!(ledger, PostgresLedger, settings, lease, transactional)
    } else {
        let ledger = SqliteLedger::connect(url)
            .await
            .expect("open")
            .with_table(ledger_table)
            .expect("table");
        ledger.migrate().await.expect("migrate");
        sqlx::query(AssertSqlSafe(create))
            .execute(ledger.pool())
            .await
            .expect("payments table");
        app!(ledger, SqliteLedger, settings, lease, transactional)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    say(&format!(
        "LISTENING {}",
        listener.local_addr().expect("address")
    ))
    .await;
    axum::serve(listener, app).await.expect("serve");
}
