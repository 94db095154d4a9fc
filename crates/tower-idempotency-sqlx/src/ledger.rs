//! [`SqlLedger`]: the ledger algorithm, written once for every [`Backend`].

use std::{fmt, sync::Arc, time::Duration};

use sqlx::{
    ColumnIndex, Decode, Encode, Executor, IntoArguments, Pool, SqlStr, Type, query::Query,
};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, Lease, Ledger, LedgerError, LedgerKey, OperationId,
    RecordInfo, RecordState, ScopeDigest, StoredResponse,
};
use uuid::Uuid;

use crate::{
    TableNameError,
    backend::{Backend, Statements},
    row,
    table::TableName,
    writer::{Merge, Write, Written},
};

/// How often a claim runs again when the record it lost to changed before it could be reported.
const CLAIM_ATTEMPTS: usize = 8;

/// A ledger in a SQL table: [`SqliteLedger`](crate::SqliteLedger) or
/// [`PostgresLedger`](crate::PostgresLedger), whose docs describe each. Cloning is cheap and
/// shares the pool.
pub struct SqlLedger<DB: Backend> {
    pub(crate) pool: Pool<DB>,
    pub(crate) table: TableName,
    pub(crate) sql: Arc<Statements>,
    pub(crate) extra: Arc<DB::Extra>,
}

impl<DB: Backend> Clone for SqlLedger<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            table: self.table.clone(),
            sql: self.sql.clone(),
            extra: self.extra.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlLedger<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct(DB::LEDGER);
        debug.field("table", &self.table.display());
        DB::debug_extra(&self.extra, &mut debug);
        debug.field("pool", &self.pool).finish()
    }
}

impl<DB: Backend> SqlLedger<DB> {
    /// A ledger on `pool`, in the table `idempotency_records`. Call [`migrate`](Self::migrate)
    /// once to create it. (See the ledger's docs for how to set up the pool.)
    pub fn new(pool: Pool<DB>) -> Self {
        Self::with(pool, TableName::default_name())
    }

    pub(crate) fn with(pool: Pool<DB>, table: TableName) -> Self {
        let (sql, extra) = DB::prepare(&pool, &table);
        Self {
            pool,
            table,
            sql: Arc::new(sql),
            extra: Arc::new(extra),
        }
    }

    /// Uses the table `name` instead of `idempotency_records`. The name must match
    /// `[a-z_][a-z0-9_]{0,62}`; PostgreSQL also takes `schema.table` with each part so (the
    /// schema must exist).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::SqlitePool::connect_lazy("sqlite::memory:")?;
    /// use tower_idempotency_sqlx::SqliteLedger;
    ///
    /// let ledger = SqliteLedger::new(pool).with_table("payments_idempotency")?;
    /// assert_eq!(ledger.table(), "payments_idempotency");
    /// assert!(ledger.clone().with_table("Robert'); DROP TABLE").is_err());
    /// assert!(ledger.clone().with_table("billing.records").is_err()); // PostgreSQL only
    /// # Ok(()) }
    /// ```
    pub fn with_table(self, name: &str) -> Result<Self, TableNameError> {
        let table = TableName::parse(name, DB::SCHEMAS)?;
        let mut ledger = Self::with(self.pool, table);
        if let Some(extra) = Arc::get_mut(&mut ledger.extra) {
            DB::carry(&self.extra, extra);
        }
        Ok(ledger)
    }

    /// The table's name, as given.
    pub fn table(&self) -> String {
        self.table.display()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The ledger's statements, for the benchmark's raw-SQL ceiling.
    #[doc(hidden)]
    pub fn statements(&self) -> &Statements {
        &self.sql
    }
}

/// A successful claim of `request`; `operation_id` is the record's.
pub(crate) fn acquired(request: &ClaimRequest, operation_id: Uuid) -> Claim {
    Claim::Acquired(Lease {
        token: request.token,
        operation_id,
        // A takeover keeps the record's operation id; a fresh record takes ours.
        taken_over: operation_id != request.operation_id,
    })
}

/// A completion's values, owned and ready to bind (`bind_completion`).
pub(crate) struct Completion {
    pub(crate) key: [u8; 32],
    pub(crate) token: Uuid,
    pub(crate) status: i16,
    pub(crate) headers: Vec<u8>,
    pub(crate) body: bytes::Bytes,
    pub(crate) body_omitted: bool,
    pub(crate) retention_ms: i64,
}

impl Completion {
    pub(crate) fn new(
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Self {
        Self {
            key: *key.as_bytes(),
            token: token.as_uuid(),
            // Status codes are 100..=999, so they fit a smallint.
            status: response.status.as_u16() as i16,
            headers: StoredResponse::encode_headers(&response.headers),
            body: response.body.clone(),
            body_omitted: response.body_omitted,
            retention_ms: row::millis(retention),
        }
    }
}

// What the shared code asks of a database's sqlx driver: both drivers have it all.
impl<DB> SqlLedger<DB>
where
    DB: Backend,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
    for<'a> Vec<u8>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Uuid: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i16: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> bool: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> String: Decode<'a, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
{
    /// A claim statement (`claim` or `claim_before_transaction`) with the request bound, as
    /// every backend binds it.
    pub(crate) fn claim_query(
        &self,
        sql: &SqlStr,
        request: &ClaimRequest,
    ) -> Query<'static, DB, DB::Arguments> {
        Self::bind_claim(sqlx::query(sql.clone()), request)
    }

    /// `query` with `request`'s seven values bound after what it has, in the `claim`
    /// statement's order (see [`Statements`]); SQLite's batches bind each of theirs so.
    pub(crate) fn bind_claim<'q>(
        query: Query<'q, DB, DB::Arguments>,
        request: &ClaimRequest,
    ) -> Query<'q, DB, DB::Arguments> {
        query
            .bind(&request.key.as_bytes()[..])
            .bind(&request.scope.as_bytes()[..])
            .bind(&request.fingerprint.as_bytes()[..])
            .bind(request.operation_id)
            .bind(request.token.as_uuid())
            .bind(row::millis(request.lease))
            .bind(row::millis(request.retention))
    }

    /// Runs one of the ledger's writes: through the backend's group commit on a one-writer
    /// database ([`Backend::ONE_WRITER`]), on the pool elsewhere.
    async fn write(&self, write: Write<DB>) -> Result<Written<DB>, LedgerError> {
        if DB::ONE_WRITER {
            DB::group_commit(self, write).await
        } else {
            write.run(&self.pool).await.map_err(row::error)
        }
    }

    /// The token that `sql` (`held`, or a statement like it) returns for `key`.
    pub(crate) async fn token_from(
        &self,
        sql: SqlStr,
        key: &LedgerKey,
    ) -> Result<Option<Uuid>, LedgerError> {
        sqlx::query(sql)
            .bind(&key.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
            .map(|found| row::uuid(&found, "token"))
            .transpose()
    }

    /// The token of the live lease on `key`, if it is in progress.
    pub(crate) async fn held(&self, key: &LedgerKey) -> Result<Option<Uuid>, LedgerError> {
        self.token_from(self.sql.held.clone(), key).await
    }

    /// Polls the record, 5 ms after the call and then at doubling intervals up to 100 ms, until
    /// it is no longer in progress under the lease first seen, or `deadline`.
    pub(crate) async fn poll(&self, key: &LedgerKey, deadline: Instant) {
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

    /// A claim by the `claim` statement, or by `claim_before_transaction` if `before_transaction`.
    pub(crate) async fn claim_with(
        &self,
        before_transaction: bool,
        request: &ClaimRequest,
    ) -> Result<Claim, LedgerError> {
        if let Some(decided) = DB::before_claim(self, request, before_transaction).await? {
            return Ok(decided);
        }
        let sql = if before_transaction {
            &self.sql.claim_before_transaction
        } else {
            &self.sql.claim
        };
        for _ in 0..CLAIM_ATTEMPTS {
            // On a one-writer database (SQLite) the batch binds the values, with other claims or
            // to the `claim` statement (there the same as `claim_before_transaction`).
            let claim = if DB::ONE_WRITER {
                Write::values(Merge::Claim(request.clone()))
            } else {
                Write::fetch(self.claim_query(sql, request))
            };
            let found = match self.write(claim).await {
                Ok(written) => written.row(),
                Err(error) => return DB::claim_failed(self, request, error).await,
            };
            if let Some(claim) = DB::claimed(self, request, found).await? {
                return Ok(claim);
            }
        }
        Err(LedgerError::backend(
            "the record kept changing while it was claimed",
        ))
    }

    /// The fenced completion with its values bound.
    fn complete_query(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Query<'static, DB, DB::Arguments> {
        let completion = Completion::new(key, token, response, retention);
        Self::bind_completion(sqlx::query(self.sql.complete.clone()), &completion)
    }

    /// `query` with `completion`'s seven values bound after what it has, in the `complete`
    /// statement's order (see [`Statements`]); the batches of both databases bind each of
    /// theirs so.
    pub(crate) fn bind_completion<'q>(
        query: Query<'q, DB, DB::Arguments>,
        completion: &Completion,
    ) -> Query<'q, DB, DB::Arguments> {
        query
            .bind(&completion.key[..])
            .bind(completion.token)
            .bind(completion.status)
            .bind(&completion.headers[..])
            .bind(&completion.body[..])
            .bind(completion.body_omitted)
            .bind(completion.retention_ms)
    }

    /// The fenced completion inside the handler's transaction.
    pub(crate) async fn complete_on<'e, E>(
        &self,
        executor: E,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError>
    where
        E: Executor<'e, Database = DB>,
    {
        let done = self
            .complete_query(key, token, response, retention)
            .execute(executor)
            .await
            .map_err(row::error)?;
        row::fenced(DB::rows_affected(&done))
    }
}

impl<DB> Ledger for SqlLedger<DB>
where
    DB: Backend,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
    for<'a> Vec<u8>: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Uuid: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> i16: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> bool: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> String: Decode<'a, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
{
    fn name(&self) -> &'static str {
        DB::KIND
    }

    // The calls a request makes (claim, complete, release, renew) box their statements'
    // futures (650 bytes and more with sqlx's): the layer holds these futures inline in every
    // request's state, and one allocation per round trip costs less than moving that state
    // (see `Ledger`'s docs).

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        Box::pin(self.claim_with(false, request)).await
    }

    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        // Boxed where it is made, so that the request's state holds a pointer, not the future.
        let batched = DB::complete_batched(self, key, token, response, retention).map(Box::pin);
        if let Some(batched) = batched {
            return batched.await;
        }
        let completion = Completion::new(key, token, response, retention);
        let complete = if DB::ONE_WRITER {
            Write::values(Merge::Complete(completion))
        } else {
            Write::execute(Self::bind_completion(
                sqlx::query(self.sql.complete.clone()),
                &completion,
            ))
        };
        row::fenced(Box::pin(self.write(complete)).await?.rows())
    }

    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        let release = sqlx::query(self.sql.release.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid());
        row::fenced(Box::pin(self.write(Write::execute(release))).await?.rows())
    }

    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        let renew = sqlx::query(self.sql.renew.clone())
            .bind(&key.as_bytes()[..])
            .bind(token.as_uuid())
            .bind(row::millis(lease));
        row::fenced(Box::pin(self.write(Write::execute(renew))).await?.rows())
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
            .map(|found| {
                // `lapsed` compares `lease_until` with the database's clock, as claims do.
                let lapsed: Option<bool> =
                    sqlx::Row::try_get(&found, "lapsed").map_err(row::error)?;
                match row::columns(&found)?.into_state()? {
                    RecordState::InProgress if lapsed == Some(true) => Ok(RecordState::Abandoned),
                    state => Ok(state),
                }
            })
            .transpose()
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        let batch = batch.max(1);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let mut purged = 0;
        loop {
            // One write per batch of records, so that claims get their turns in between.
            let purge = sqlx::query(self.sql.purge.clone()).bind(limit);
            let deleted = self.write(Write::execute(purge)).await?.rows();
            purged += deleted;
            if deleted < batch as u64 {
                return Ok(purged);
            }
        }
    }

    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        DB::wait_for_change(self, key, timeout).await
    }

    async fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        sqlx::query(self.sql.inspect.clone())
            .bind(&key.as_bytes()[..])
            .bind(with_body)
            .fetch_optional(&self.pool)
            .await
            .map_err(row::error)?
            .map(|found| row::info(&found, with_body))
            .transpose()
    }

    async fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        sqlx::query(self.sql.stuck.clone())
            .bind(row::millis(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(row::error)?
            .iter()
            .map(|found| row::info(found, false))
            .collect()
    }

    async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        // A write like the others: on SQLite it takes its place in the writer's queue.
        let evict = sqlx::query(self.sql.evict.clone()).bind(&key.as_bytes()[..]);
        Ok(self.write(Write::execute(evict)).await?.rows() > 0)
    }
}
