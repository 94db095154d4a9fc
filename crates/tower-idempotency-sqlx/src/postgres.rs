//! The PostgreSQL ledger.

use std::{fmt, sync::Arc, time::Duration};

use sqlx::{
    AssertSqlSafe, Executor, Row, SqlSafeStr, SqlStr,
    postgres::{PgPool, PgPoolOptions, PgRow},
};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, Existing, FencingToken, Lease, Ledger, LedgerError, LedgerKey,
    OperationId, RecordState, ScopeDigest, StoredResponse, TransactionalLedger,
};
use uuid::Uuid;

use crate::{
    ConfigError,
    listener::Notifier,
    row::{self, COMPLETED, IN_PROGRESS, StoredColumns},
    table::{TableName, render_migration},
};

/// The shipped migrations, in order.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_create_records",
        include_str!("../migrations/postgres/0001_create_records.sql"),
    ),
    (
        "0002_watched",
        include_str!("../migrations/postgres/0002_watched.sql"),
    ),
];

/// How often a claim runs again when it found no row to report (see `claim`).
const CLAIM_ATTEMPTS: usize = 8;

/// A ledger in a PostgreSQL table, shared by every app instance that uses the database.
///
/// - **One statement per step.** A claim is a single `INSERT .. ON CONFLICT DO UPDATE .. WHERE
///   .. RETURNING` that also reads back the record it lost to; complete, release and renew are a
///   single fenced `UPDATE`/`DELETE`. A first request costs two round trips, a replay one.
/// - **The database's clock** (`now()`) decides leases and expiry, so app instances whose clocks
///   disagree still agree on who holds a key.
/// - **Waiting uses `LISTEN`/`NOTIFY`.** A waiter marks the record `watched`; completing or
///   releasing a watched record notifies the channel [`channel`](Self::channel) with the key's
///   hex digest, in the same statement. Records nobody waits for are not notified: a notifying
///   commit takes a lock shared by every notifying commit in the database, and notifying every
///   completion cut fresh-path throughput by about a quarter (docs/benchmarks.md). The first
///   [`wait_for_change`](Ledger::wait_for_change) starts one listener connection per ledger (its
///   own, not one of the pool's); while it is unavailable, waiters poll.
///
/// Cloning is cheap and shares the pool and the listener.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency_sqlx::PostgresLedger;
///
/// let ledger = PostgresLedger::connect("postgres://app@db.internal/app").await?;
/// ledger.migrate().await?;
/// # Ok(()) }
/// ```
///
/// If you build the pool yourself, consider `test_before_acquire(false)`: by default sqlx pings
/// a connection before handing it out, which doubles the round trips of every ledger call.
#[derive(Clone)]
pub struct PostgresLedger {
    pool: PgPool,
    table: TableName,
    sql: Arc<Statements>,
    notifier: Arc<Notifier>,
}

struct Statements {
    claim: SqlStr,
    complete: SqlStr,
    release: SqlStr,
    renew: SqlStr,
    operation: SqlStr,
    purge: SqlStr,
    held: SqlStr,
    watch: SqlStr,
}

/// `$n` milliseconds from now, by the database's clock.
fn from_now(n: u8) -> String {
    format!("now() + ${n}::bigint * interval '1 millisecond'")
}

impl Statements {
    fn new(table: &TableName, channel: &str) -> Self {
        let t = table.quoted();
        // Arc-backed, so that cloning a statement per call does not copy it.
        let sql = |s: String| AssertSqlSafe(Arc::<str>::from(s)).into_sql_str();
        let columns = "operation_id, fingerprint, state, status, headers, body, body_omitted";
        // Only a record that a waiter watches is notified (migration 0002): a notifying commit
        // takes a database-wide lock, and notifying every completion serialised them.
        let notify =
            format!("CASE WHEN watched THEN pg_notify('{channel}', encode(key, 'hex')) END");
        Self {
            // $1 key, $2 scope, $3 fingerprint, $4 operation id, $5 token, $6 lease and
            // $7 retention in ms. The INSERT decides atomically: insert, replace an expired
            // record, take over an expired lease with the same fingerprint, or write nothing (the
            // SET expressions read the old row, so a takeover keeps its operation id). When it
            // writes nothing, the second branch reads the record it lost to, in the same
            // statement. Under READ COMMITTED that read uses the statement's snapshot, which may
            // predate a record committed while the INSERT waited on it: then neither branch
            // returns a row and the caller runs the statement again. The `expires_at` test keeps
            // such a stale read from reporting a record that has since been replaced.
            claim: sql(format!(
                "WITH claimed AS ( \
                   INSERT INTO {t} AS r (key, scope, fingerprint, operation_id, token, state, \
                     lease_until, expires_at, status, headers, body, body_omitted) \
                   VALUES ($1, $2, $3, $4, $5, '{IN_PROGRESS}', {lease}, {retention}, \
                     NULL, NULL, NULL, false) \
                   ON CONFLICT (key) DO UPDATE SET \
                     operation_id = CASE WHEN r.expires_at <= now() \
                       THEN excluded.operation_id ELSE r.operation_id END, \
                     scope = excluded.scope, fingerprint = excluded.fingerprint, \
                     token = excluded.token, state = '{IN_PROGRESS}', \
                     lease_until = excluded.lease_until, expires_at = excluded.expires_at, \
                     status = NULL, headers = NULL, body = NULL, body_omitted = false \
                   WHERE r.expires_at <= now() OR (r.state = '{IN_PROGRESS}' \
                     AND r.lease_until <= now() AND r.fingerprint = excluded.fingerprint) \
                   RETURNING {columns}) \
                 SELECT true AS won, {columns} FROM claimed \
                 UNION ALL \
                 SELECT false, {columns} FROM {t} \
                 WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM claimed)",
                lease = from_now(6),
                retention = from_now(7),
            )),
            complete: sql(format!(
                "UPDATE {t} SET state = '{COMPLETED}', lease_until = NULL, status = $3, \
                   headers = $4, body = $5, body_omitted = $6, expires_at = {retention} \
                 WHERE key = $1 AND token = $2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > now() \
                 RETURNING {notify}",
                retention = from_now(7),
            )),
            release: sql(format!(
                "DELETE FROM {t} \
                 WHERE key = $1 AND token = $2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > now() \
                 RETURNING {notify}"
            )),
            renew: sql(format!(
                "UPDATE {t} SET lease_until = {lease}, expires_at = GREATEST(expires_at, {lease}) \
                 WHERE key = $1 AND token = $2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > now()",
                lease = from_now(3),
            )),
            operation: sql(format!(
                "SELECT state, status, headers, body, body_omitted FROM {t} \
                 WHERE operation_id = $1 AND scope = $2 AND expires_at > now()"
            )),
            // SKIP LOCKED leaves rows that a claim is replacing to the claim. The outer
            // `expires_at` test matters: if a claim replaces a row after the subquery picked it,
            // READ COMMITTED re-checks only the outer WHERE against the new row, and the key
            // alone would delete the fresh claim.
            purge: sql(format!(
                "DELETE FROM {t} WHERE key IN \
                   (SELECT key FROM {t} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 AND expires_at <= now()"
            )),
            held: sql(format!(
                "SELECT token FROM {t} WHERE key = $1 AND state = '{IN_PROGRESS}' \
                 AND expires_at > now() AND lease_until > now()"
            )),
            // `held`, marking the record watched. A completion that committed first makes this
            // find no row (READ COMMITTED re-checks the WHERE against the committed row), so
            // the waiter does not wait; one that comes after sees `watched` and notifies. `claim`
            // leaves the flag as it is when it takes a key over, so a waiter still waiting hears
            // the new holder's completion.
            watch: sql(format!(
                "UPDATE {t} SET watched = true WHERE key = $1 AND state = '{IN_PROGRESS}' \
                 AND expires_at > now() AND lease_until > now() RETURNING token"
            )),
        }
    }
}

/// The `NOTIFY` channel of a table: `idempotency_` and the table name (`.` as `_`), within
/// PostgreSQL's 63-byte limit. Two long names may share a channel; that only wakes a waiter
/// early, which the contract allows.
fn channel_of(table: &TableName) -> String {
    let mut channel = format!("idempotency_{}", table.display().replace('.', "_"));
    channel.truncate(63);
    channel
}

impl PostgresLedger {
    /// A ledger on `pool`, in the table `idempotency_records`. Call [`migrate`](Self::migrate)
    /// once to create it.
    pub fn new(pool: PgPool) -> Self {
        Self::with(pool, TableName::default_name())
    }

    fn with(pool: PgPool, table: TableName) -> Self {
        let channel = channel_of(&table);
        Self {
            sql: Arc::new(Statements::new(&table, &channel)),
            notifier: Arc::new(Notifier::new(&pool, channel)),
            pool,
            table,
        }
    }

    /// Connects a pool to `url` (10 connections, no ping before each use) and makes a ledger on
    /// it. The table is not created: call [`migrate`](Self::migrate).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .test_before_acquire(false)
            .connect(url)
            .await?;
        Ok(Self::new(pool))
    }

    /// Uses the table `name` instead of `idempotency_records`: `[a-z_][a-z0-9_]{0,62}`,
    /// optionally schema-qualified (`billing.idempotency`; the schema must exist).
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::PgPool::connect_lazy("postgres://localhost/app")?;
    /// use tower_idempotency_sqlx::PostgresLedger;
    ///
    /// let ledger = PostgresLedger::new(pool).with_table("billing.idempotency")?;
    /// assert_eq!(ledger.table(), "billing.idempotency");
    /// assert_eq!(ledger.channel(), "idempotency_billing_idempotency");
    /// assert!(ledger.clone().with_table("Billing").is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_table(self, name: &str) -> Result<Self, ConfigError> {
        Ok(Self::with(self.pool, TableName::parse(name, true)?))
    }

    /// The table's name, as given.
    pub fn table(&self) -> String {
        self.table.display()
    }

    /// The `NOTIFY` channel that completion and release signal on, with the key's digest in
    /// lowercase hex as the payload: `idempotency_` and the table name, `.` replaced by `_`.
    pub fn channel(&self) -> &str {
        self.notifier.channel()
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its indexes if they do not exist, running the migrations shipped in
    /// `migrations/postgres/` in one transaction under an advisory lock, so app instances that
    /// start together do not race. Safe to run at every start. The schema of a qualified name
    /// must exist.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("tower-idempotency-sqlx:{}", self.table.display()))
            .execute(&mut *tx)
            .await?;
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

    /// The token of the live lease on `key`, if it is in progress.
    pub(crate) async fn held(&self, key: &LedgerKey) -> Result<Option<Uuid>, LedgerError> {
        self.token_from(self.sql.held.clone(), key).await
    }

    /// [`held`](Self::held), marking the record watched, so that its completion or release
    /// notifies the channel. Call it once `LISTEN` is in effect.
    async fn watch(&self, key: &LedgerKey) -> Result<Option<Uuid>, LedgerError> {
        self.token_from(self.sql.watch.clone(), key).await
    }

    async fn token_from(&self, sql: SqlStr, key: &LedgerKey) -> Result<Option<Uuid>, LedgerError> {
        sqlx::query(sql)
            .bind(&key.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
            .map(|r| r.try_get("token").map_err(row::error))
            .transpose()
    }

    /// Polls the record at doubling intervals (5 ms to 100 ms) until it is no longer in progress
    /// under the lease first seen, or `deadline`.
    async fn poll(&self, key: &LedgerKey, deadline: Instant) {
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

fn columns(row: &PgRow) -> Result<StoredColumns, LedgerError> {
    let status: Option<i16> = row.try_get("status").map_err(row::error)?;
    Ok(StoredColumns {
        state: row.try_get("state").map_err(row::error)?,
        status: status.map(i64::from),
        headers: row.try_get("headers").map_err(row::error)?,
        body: row.try_get("body").map_err(row::error)?,
        body_omitted: row.try_get("body_omitted").map_err(row::error)?,
    })
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("table", &self.table.display())
            .field("channel", &self.notifier.channel())
            .field("pool", &self.pool)
            .finish()
    }
}

impl Ledger for PostgresLedger {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let found = sqlx::query(self.sql.claim.clone())
                .bind(&request.key.as_bytes()[..])
                .bind(&request.scope.as_bytes()[..])
                .bind(&request.fingerprint.as_bytes()[..])
                .bind(request.operation_id)
                .bind(request.token.as_uuid())
                .bind(row::millis(request.lease))
                .bind(row::millis(request.retention))
                .fetch_optional(&self.pool)
                .await
                .map_err(row::error)?;
            let Some(found) = found else {
                // The record we conflicted with was committed after this statement's snapshot.
                continue;
            };
            let won: bool = found.try_get("won").map_err(row::error)?;
            let operation_id: Uuid = found.try_get("operation_id").map_err(row::error)?;
            if won {
                return Ok(Claim::Acquired(Lease {
                    token: request.token,
                    operation_id,
                    // A takeover keeps the record's operation id; a fresh record takes ours.
                    taken_over: operation_id != request.operation_id,
                }));
            }
            let fingerprint: Vec<u8> = found.try_get("fingerprint").map_err(row::error)?;
            return Ok(Claim::Existing(Existing {
                fingerprint: row::fingerprint(&fingerprint)?,
                operation_id,
                state: columns(&found)?.into_state()?,
                expires_in: None,
            }));
        }
        Err(LedgerError::backend(
            "the record kept changing while it was claimed",
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
        let done = sqlx::query(self.sql.renew.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(row::millis(lease))
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

    /// Waits for a `NOTIFY` of the key (see the type's docs), re-checking the record once a
    /// second in case a notification was lost with the listener's connection. Without a
    /// listener (it cannot connect, or is reconnecting) it polls, 5 ms doubling to 100 ms.
    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if !self.notifier.listening(deadline).await {
            return self.poll(key, deadline).await;
        }
        let mut waiter = self.notifier.waiter(key);
        let Ok(Some(first)) = self.watch(key).await else {
            return;
        };
        loop {
            let tick = (Instant::now() + Duration::from_secs(1)).min(deadline);
            if waiter.changed_before(tick).await {
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
            match self.held(key).await {
                Ok(Some(token)) if token == first => {}
                _ => return,
            }
        }
    }
}

impl PostgresLedger {
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
        E: Executor<'e, Database = sqlx::Postgres>,
    {
        // Status codes are 100..=999, so they fit a smallint.
        let status = response.status.as_u16() as i16;
        let done = sqlx::query(self.sql.complete.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(status)
            .bind(StoredResponse::encode_headers(&response.headers))
            .bind(&response.body[..])
            .bind(response.body_omitted)
            .bind(row::millis(retention))
            .execute(executor)
            .await
            .map_err(row::error)?;
        row::fenced(done.rows_affected())
    }
}

/// Exactly-once mode: the completion is written in the handler's transaction and committed
/// with it.
///
/// Inside a transaction PostgreSQL's `now()` is the transaction's start (just after the claim),
/// so a response completed this way is kept for `retention` from then, not from the commit.
/// The fencing does not depend on it: it is the token that must still match.
impl TransactionalLedger for PostgresLedger {
    type Transaction = sqlx::Transaction<'static, sqlx::Postgres>;

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
