//! Helpers shared by the test files: the database URL, fresh SQLite files and fresh PostgreSQL
//! tables. Each test file uses some of them.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use tower_idempotency_sqlx::{
    PostgresLedger, SqliteLedger,
    sqlx::{PgPool, postgres::PgPoolOptions},
};

/// The PostgreSQL URL from `DATABASE_URL`, read at run time. Unset (or empty): the caller skips,
/// and this prints a line saying so, unless `CI=true`, where a missing service is a failure.
pub(crate) fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("DATABASE_URL is not set, and CI=true: the PostgreSQL tests must run in CI")
        }
        _ => {
            eprintln!("SKIPPED: DATABASE_URL is not set, so this PostgreSQL test did not run");
            None
        }
    }
}

/// A name no other test (in this process or another) uses: `{prefix}_{pid}_{n}_{nanos}`.
pub(crate) fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh SQLite file under cargo's temporary directory for integration tests.
pub(crate) fn sqlite_path() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sqlite-ledgers");
    std::fs::create_dir_all(&dir).expect("a directory for test databases");
    dir.join(format!("{}.db", unique_name("ledger")))
}

/// A migrated ledger on a fresh SQLite file.
pub(crate) async fn sqlite_file_ledger() -> SqliteLedger {
    let url = format!("sqlite://{}?mode=rwc", sqlite_path().display());
    let ledger = SqliteLedger::connect(&url)
        .await
        .expect("open the SQLite file");
    ledger.migrate().await.expect("migrate");
    ledger
}

/// A migrated ledger on a fresh in-memory SQLite database.
pub(crate) async fn sqlite_memory_ledger() -> SqliteLedger {
    let ledger = SqliteLedger::connect("sqlite::memory:")
        .await
        .expect("open an in-memory database");
    ledger.migrate().await.expect("migrate");
    ledger
}

/// A pool on `url` sized for the conformance suite's 64 racing claims.
pub(crate) async fn pg_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(url)
        .await
        .expect("connect to DATABASE_URL")
}

/// A PostgreSQL table of its own for one test, so that tests run in parallel. Call
/// [`drop`](Self::drop) at the end; a test that panics first still removes its table (see the
/// `Drop` impl).
pub(crate) struct PgTable {
    pub(crate) ledger: PostgresLedger,
    pub(crate) name: String,
    pub(crate) url: String,
    dropped: bool,
}

impl PgTable {
    /// A fresh, migrated table, or `None` (after saying so) when there is no database.
    pub(crate) async fn create() -> Option<Self> {
        let table = Self::unmigrated().await?;
        table.ledger.migrate().await.expect("migrate");
        Some(table)
    }

    /// A ledger on a table name of its own that no migration has run for yet (the test makes
    /// the table), or `None` when there is no database; dropped like [`create`](Self::create)'s.
    pub(crate) async fn unmigrated() -> Option<Self> {
        let url = database_url()?;
        let name = unique_name("ti_test");
        let ledger = PostgresLedger::new(pg_pool(&url).await)
            .with_table(&name)
            .expect("a valid table name");
        Some(Self {
            ledger,
            name,
            url,
            dropped: false,
        })
    }

    /// [`create`](Self::create)'s table, its ledger claiming by `strategy`.
    pub(crate) async fn with_strategy(
        strategy: tower_idempotency_sqlx::ClaimStrategy,
    ) -> Option<Self> {
        let mut table = Self::create().await?;
        table.ledger = table.ledger.clone().with_claim_strategy(strategy);
        Some(table)
    }

    /// Drops the table and closes the pool.
    pub(crate) async fn drop(mut self) {
        let pool = self.ledger.pool().clone();
        tower_idempotency_sqlx::sqlx::raw_sql(tower_idempotency_sqlx::sqlx::AssertSqlSafe(
            format!("DROP TABLE IF EXISTS \"{}\"", self.name),
        ))
        .execute(&pool)
        .await
        .expect("drop the test table");
        pool.close().await;
        self.dropped = true;
    }
}

/// A test that panicked (or returned) before [`PgTable::drop`] still removes its table
/// (`drop_table_blocking`: `Drop` cannot await).
impl Drop for PgTable {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        tower_idempotency_tests::pg::drop_table_blocking(self.url.clone(), self.name.clone());
    }
}

/// The conformance suite's fixture: a fresh table per check, dropped after it, pass or fail.
impl tower_idempotency_core::conformance::Fixture for PgTable {
    type Ledger = PostgresLedger;

    fn ledger(&self) -> PostgresLedger {
        self.ledger.clone()
    }

    async fn teardown(self) {
        self.drop().await;
    }
}
