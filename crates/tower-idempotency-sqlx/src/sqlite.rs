//! The SQLite ledger.

use std::{
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    AssertSqlSafe, Executor, Row, SqlSafeStr, SqlStr,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow},
};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, Existing, FencingToken, Lease, Ledger, LedgerError, LedgerKey,
    OperationId, RecordState, ScopeDigest, StoredResponse, TransactionalLedger,
};
use uuid::Uuid;

use crate::{
    ConfigError,
    row::{self, COMPLETED, IN_PROGRESS, StoredColumns},
    table::{TableName, render_migration},
};

/// The shipped migrations, in order.
const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_create_records",
    include_str!("../migrations/sqlite/0001_create_records.sql"),
)];

/// How often a claim retries when the record it lost to vanished before it could be read.
const CLAIM_ATTEMPTS: usize = 8;

/// A ledger in a SQLite database: the embedded default, for one machine (one file, or memory).
///
/// # Clock
///
/// Times (`lease_until`, `expires_at`) are milliseconds since the Unix epoch **by this process's
/// clock**. A SQLite file is used by the processes of one machine, which share a clock, and
/// reading it in Rust keeps each statement free of date functions. (The PostgreSQL ledger, shared
/// by many machines, uses the database's clock instead.)
///
/// # Connections
///
/// [`connect`](Self::connect) sets up the pool for you: WAL journal, a 5 s busy timeout, and for
/// `sqlite::memory:` a single connection kept open for the pool's life. If you build the pool
/// yourself, mind two things:
///
/// - Every connection to `sqlite::memory:` opened by sqlx shares one database through SQLite's
///   shared cache, whose table locks fail at once (`database table is locked`) rather than wait
///   on the busy timeout. Use `max_connections(1)` (as `connect` does) and keep that connection
///   alive (`min_connections(1)`, no idle timeout, no max lifetime): when the last connection
///   closes, the in-memory database is gone.
/// - For a file, use WAL (`journal_mode(Wal)`) and a busy timeout, so that readers do not block
///   the writer and writers wait for each other instead of failing.
///
/// Cloning is cheap and shares the pool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency_sqlx::SqliteLedger;
///
/// let ledger = SqliteLedger::connect("sqlite://idempotency.db?mode=rwc").await?;
/// ledger.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
    table: TableName,
    sql: Arc<Statements>,
}

struct Statements {
    claim: SqlStr,
    existing: SqlStr,
    complete: SqlStr,
    release: SqlStr,
    renew: SqlStr,
    operation: SqlStr,
    purge: SqlStr,
    held: SqlStr,
}

impl Statements {
    fn new(table: &TableName) -> Self {
        let t = table.quoted();
        // Arc-backed, so that cloning a statement per call does not copy it.
        let sql = |s: String| AssertSqlSafe(Arc::<str>::from(s)).into_sql_str();
        Self {
            // ?1 key, ?2 scope, ?3 fingerprint, ?4 operation id, ?5 token, ?6 lease deadline,
            // ?7 expiry, ?8 now. One statement decides: insert, replace an expired record, take
            // over an expired lease with the same fingerprint, or write nothing. The SET
            // expressions read the old row, so a takeover keeps its operation id.
            claim: sql(format!(
                "INSERT INTO {t} (key, scope, fingerprint, operation_id, token, state, \
                   lease_until, expires_at, status, headers, body, body_omitted) \
                 VALUES (?1, ?2, ?3, ?4, ?5, '{IN_PROGRESS}', ?6, ?7, NULL, NULL, NULL, 0) \
                 ON CONFLICT (key) DO UPDATE SET \
                   operation_id = CASE WHEN expires_at <= ?8 \
                     THEN excluded.operation_id ELSE operation_id END, \
                   scope = excluded.scope, fingerprint = excluded.fingerprint, \
                   token = excluded.token, state = '{IN_PROGRESS}', \
                   lease_until = excluded.lease_until, expires_at = excluded.expires_at, \
                   status = NULL, headers = NULL, body = NULL, body_omitted = 0 \
                 WHERE expires_at <= ?8 OR (state = '{IN_PROGRESS}' AND lease_until <= ?8 \
                   AND fingerprint = excluded.fingerprint) \
                 RETURNING operation_id, token"
            )),
            existing: sql(format!(
                "SELECT fingerprint, operation_id, state, status, headers, body, body_omitted \
                 FROM {t} WHERE key = ?1 AND expires_at > ?2"
            )),
            complete: sql(format!(
                "UPDATE {t} SET state = '{COMPLETED}', lease_until = NULL, status = ?3, \
                   headers = ?4, body = ?5, body_omitted = ?6, expires_at = ?7 \
                 WHERE key = ?1 AND token = ?2 AND state = '{IN_PROGRESS}' AND expires_at > ?8"
            )),
            release: sql(format!(
                "DELETE FROM {t} \
                 WHERE key = ?1 AND token = ?2 AND state = '{IN_PROGRESS}' AND expires_at > ?3"
            )),
            renew: sql(format!(
                "UPDATE {t} SET lease_until = ?3, expires_at = MAX(expires_at, ?3) \
                 WHERE key = ?1 AND token = ?2 AND state = '{IN_PROGRESS}' AND expires_at > ?4"
            )),
            operation: sql(format!(
                "SELECT state, status, headers, body, body_omitted FROM {t} \
                 WHERE operation_id = ?1 AND scope = ?2 AND expires_at > ?3"
            )),
            // The outer `expires_at` test is redundant under SQLite's single writer; it keeps the
            // statement correct on its own, as in the PostgreSQL ledger.
            purge: sql(format!(
                "DELETE FROM {t} WHERE key IN \
                   (SELECT key FROM {t} WHERE expires_at <= ?1 LIMIT ?2) \
                 AND expires_at <= ?1"
            )),
            held: sql(format!(
                "SELECT token FROM {t} WHERE key = ?1 AND state = '{IN_PROGRESS}' \
                 AND expires_at > ?2 AND lease_until > ?2"
            )),
        }
    }
}

/// Milliseconds since the Unix epoch by this process's clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, row::millis)
}

fn uuid_column(row: &SqliteRow, column: &str) -> Result<Uuid, LedgerError> {
    row.try_get(column).map_err(row::error)
}

impl SqliteLedger {
    /// A ledger on `pool`, in the table `idempotency_records`. Call [`migrate`](Self::migrate)
    /// once to create it. See the type's docs for how to set up the pool.
    pub fn new(pool: SqlitePool) -> Self {
        let table = TableName::default_name();
        Self {
            pool,
            sql: Arc::new(Statements::new(&table)),
            table,
        }
    }

    /// Connects to `url` (such as `sqlite://idempotency.db?mode=rwc` or `sqlite::memory:`) with
    /// the settings the ledger wants: WAL journal, 5 s busy timeout, the file created if
    /// missing, and for an in-memory database one connection kept open for the pool's life.
    /// The table is not created: call [`migrate`](Self::migrate).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            // SQLite has one writer at a time; a few connections let reads run beside it.
            SqlitePoolOptions::new().max_connections(4)
        }
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
        Ok(Self::new(pool))
    }

    /// Uses the table `name` instead of `idempotency_records`. The name must match
    /// `[a-z_][a-z0-9_]{0,62}`.
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::SqlitePool::connect_lazy("sqlite::memory:")?;
    /// use tower_idempotency_sqlx::SqliteLedger;
    ///
    /// let ledger = SqliteLedger::new(pool).with_table("payments_idempotency")?;
    /// assert_eq!(ledger.table(), "payments_idempotency");
    /// assert!(ledger.clone().with_table("Robert'); DROP TABLE").is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_table(self, name: &str) -> Result<Self, ConfigError> {
        let table = TableName::parse(name, false)?;
        Ok(Self {
            pool: self.pool,
            sql: Arc::new(Statements::new(&table)),
            table,
        })
    }

    /// The table's name.
    pub fn table(&self) -> String {
        self.table.display()
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Creates the table and its indexes if they do not exist, running the migrations shipped in
    /// `migrations/sqlite/` in one transaction. Safe to run at every start.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for (_, sql) in MIGRATIONS {
            sqlx::raw_sql(AssertSqlSafe(render_migration(sql, &self.table)))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// The migrations as run for this ledger's table: `(name, SQL)` in order, for applying them
    /// with your own migration tool.
    pub fn migrations(&self) -> Vec<(&'static str, String)> {
        MIGRATIONS
            .iter()
            .map(|(name, sql)| (*name, render_migration(sql, &self.table)))
            .collect()
    }

    async fn existing(&self, key: &LedgerKey, now: i64) -> Result<Option<Existing>, LedgerError> {
        let Some(found) = sqlx::query(self.sql.existing.clone())
            .bind(&key.as_bytes()[..])
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
        else {
            return Ok(None);
        };
        let fingerprint: Vec<u8> = found.try_get("fingerprint").map_err(row::error)?;
        Ok(Some(Existing {
            fingerprint: row::fingerprint(&fingerprint)?,
            operation_id: uuid_column(&found, "operation_id")?,
            state: columns(&found)?.into_state()?,
            expires_in: None,
        }))
    }

    /// The token of the live lease on `key`, if it is in progress.
    async fn held(&self, key: &LedgerKey) -> Result<Option<Uuid>, LedgerError> {
        sqlx::query(self.sql.held.clone())
            .bind(&key.as_bytes()[..])
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
            .map(|r| uuid_column(&r, "token"))
            .transpose()
    }
}

fn columns(row: &SqliteRow) -> Result<StoredColumns, LedgerError> {
    Ok(StoredColumns {
        state: row.try_get("state").map_err(row::error)?,
        status: row.try_get("status").map_err(row::error)?,
        headers: row.try_get("headers").map_err(row::error)?,
        body: row.try_get("body").map_err(row::error)?,
        body_omitted: row.try_get("body_omitted").map_err(row::error)?,
    })
}

impl fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("table", &self.table.display())
            .field("pool", &self.pool)
            .finish()
    }
}

impl Ledger for SqliteLedger {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let now = now_ms();
            let won = sqlx::query(self.sql.claim.clone())
                .bind(&request.key.as_bytes()[..])
                .bind(&request.scope.as_bytes()[..])
                .bind(&request.fingerprint.as_bytes()[..])
                .bind(request.operation_id)
                .bind(request.token.as_uuid())
                .bind(now.saturating_add(row::millis(request.lease)))
                .bind(now.saturating_add(row::millis(request.retention)))
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(row::error)?;
            if let Some(won) = won {
                let operation_id = uuid_column(&won, "operation_id")?;
                return Ok(Claim::Acquired(Lease {
                    token: request.token,
                    operation_id,
                    // A takeover keeps the record's operation id; a fresh record takes ours.
                    taken_over: operation_id != request.operation_id,
                }));
            }
            // The record was live a moment ago; read it to report it. If it went away in
            // between (released, purged), claim again.
            if let Some(existing) = self.existing(&request.key, now_ms()).await? {
                return Ok(Claim::Existing(existing));
            }
        }
        Err(LedgerError::backend(
            "the record kept changing between claiming and reading it",
        ))
    }

    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        self.complete_on(&self.pool, key, token, response, retention)
            .await
    }

    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        let done = sqlx::query(self.sql.release.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(row::error)?;
        row::fenced(done.rows_affected())
    }

    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        let now = now_ms();
        let done = sqlx::query(self.sql.renew.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(now.saturating_add(row::millis(lease)))
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(row::error)?;
        row::fenced(done.rows_affected())
    }

    async fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> Result<Option<RecordState>, LedgerError> {
        sqlx::query(self.sql.operation.clone())
            .bind(id)
            .bind(&scope.as_bytes()[..])
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
            .map(|r| columns(&r)?.into_state())
            .transpose()
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        let batch = batch.max(1);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let mut purged = 0;
        loop {
            let done = sqlx::query(self.sql.purge.clone())
                .bind(now_ms())
                .bind(limit)
                .execute(&self.pool)
                .await
                .map_err(row::error)?;
            purged += done.rows_affected();
            if done.rows_affected() < batch as u64 {
                return Ok(purged);
            }
        }
    }

    /// Polls the record, 5 ms after the call and then at doubling intervals up to 100 ms, until
    /// it is no longer in progress under the lease first seen, or `timeout` passes. (SQLite has no
    /// change notification across processes.)
    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Ok(Some(first)) = self.held(key).await else {
            return;
        };
        let mut pause = Duration::from_millis(5);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            match self.held(key).await {
                Ok(Some(token)) if token == first => {}
                _ => return,
            }
        }
    }
}

impl SqliteLedger {
    /// The fenced completion, on the pool or inside a transaction.
    async fn complete_on<'e, E>(
        &self,
        executor: E,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError>
    where
        E: Executor<'e, Database = sqlx::Sqlite>,
    {
        let now = now_ms();
        let done = sqlx::query(self.sql.complete.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(i64::from(response.status.as_u16()))
            .bind(StoredResponse::encode_headers(&response.headers))
            .bind(&response.body[..])
            .bind(response.body_omitted)
            .bind(now.saturating_add(row::millis(retention)))
            .bind(now)
            .execute(executor)
            .await
            .map_err(row::error)?;
        row::fenced(done.rows_affected())
    }
}

/// Exactly-once mode: the completion is written in the handler's transaction and committed
/// with it.
///
/// The transaction is SQLite's default (deferred): it takes the write lock at the handler's first
/// write and holds it until the commit, so write late in the handler. A handler that reads, then
/// writes after another connection committed, may get `SQLITE_BUSY`; the layer then answers 503
/// and releases the key, and the retry runs again.
impl TransactionalLedger for SqliteLedger {
    type Transaction = sqlx::Transaction<'static, sqlx::Sqlite>;

    async fn begin(&self) -> Result<Self::Transaction, LedgerError> {
        self.pool.begin().await.map_err(row::error)
    }

    async fn complete_in(
        &self,
        mut transaction: Self::Transaction,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        match self
            .complete_on(&mut *transaction, key, token, response, retention)
            .await
        {
            Ok(()) => transaction.commit().await.map_err(row::error),
            Err(error) => {
                // Fenced off (or failed): the handler's writes must not outlive it.
                let _ = transaction.rollback().await;
                Err(error)
            }
        }
    }

    async fn rollback(&self, transaction: Self::Transaction) -> Result<(), LedgerError> {
        transaction.rollback().await.map_err(row::error)
    }
}
