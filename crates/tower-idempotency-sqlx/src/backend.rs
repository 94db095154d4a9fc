//! What differs between the databases, as the one trait the shared ledger runs over (the way
//! sqlx's migrator runs one algorithm over its per-driver `Migrate` trait).

use std::{fmt, time::Duration};

use sqlx::{Database, Pool, SqlStr};
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, LedgerError, LedgerKey, StoredResponse,
};

use crate::{
    SqlLedger,
    table::TableName,
    writer::{Write, Written},
};

/// A database the ledger runs on: `sqlx::Sqlite` and `sqlx::Postgres`. It supplies the SQL, the
/// claim and the wait; everything else is [`SqlLedger`]'s, written once.
///
/// Not implementable outside this crate.
pub trait Backend: Database {
    /// [`Ledger::name`](tower_idempotency_core::Ledger::name): `"sqlite"`, `"postgres"`.
    const KIND: &'static str;
    /// The ledger's type, for `Debug`: `"SqliteLedger"`, `"PostgresLedger"`.
    const LEDGER: &'static str;
    /// Whether a table name may be `schema.table`.
    const SCHEMAS: bool;
    /// The shipped migrations, `(name, SQL)` in order.
    const MIGRATIONS: &'static [(&'static str, &'static str)];
    /// Whether the database has one writer at a time (SQLite): then the ledger's own writes go
    /// through [`group_commit`](Self::group_commit), instead of each taking the write lock (and
    /// spinning in the database's busy handler, whose sleeps grow to 100 ms) and paying its
    /// own fsync.
    const ONE_WRITER: bool = false;

    /// What the backend keeps beside the shared statements (shared by a ledger's clones).
    type Extra: Send + Sync + 'static;

    /// The table's statements, and the backend's own state.
    fn prepare(pool: &Pool<Self>, table: &TableName) -> (Statements, Self::Extra);

    /// How many rows a statement wrote (sqlx has no generic accessor).
    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// Adds the backend's own fields to the ledger's `Debug`.
    fn debug_extra(extra: &Self::Extra, f: &mut fmt::DebugStruct<'_, '_>);

    /// Keeps the settings of `from` in `to`, the state prepared for another table
    /// (`with_table`). Default: nothing to keep.
    fn carry(from: &Self::Extra, to: &mut Self::Extra) {
        let _ = (from, to);
    }

    /// Runs first in the migration transaction (PostgreSQL: an advisory lock, so that app
    /// instances starting together do not race).
    fn before_migrations(
        connection: &mut Self::Connection,
        table: &TableName,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Before the claim statement: a claim decided by a cheaper statement (SQLite: the record
    /// this claim cannot take, read without writing; PostgreSQL: that, or the key taken by a plain
    /// insert, as its [`ClaimStrategy`](crate::ClaimStrategy) says), or `None` to go on with the
    /// claim statement. `before_transaction`: the claim is
    /// [`claim_before_transaction`](tower_idempotency_core::TransactionalLedger::claim_before_transaction)'s.
    /// Default: `None`.
    fn before_claim(
        ledger: &SqlLedger<Self>,
        request: &ClaimRequest,
        before_transaction: bool,
    ) -> impl Future<Output = Result<Option<Claim>, LedgerError>> + Send {
        let _ = (ledger, request, before_transaction);
        async { Ok(None) }
    }

    /// One of the ledger's writes, queued for the backend's group commit (see `writer.rs`);
    /// called only if [`ONE_WRITER`](Self::ONE_WRITER).
    fn group_commit(
        ledger: &SqlLedger<Self>,
        write: Write<Self>,
    ) -> impl Future<Output = Result<Written<Self>, LedgerError>> + Send {
        let _ = (ledger, write);
        async { Err(LedgerError::backend("this database has no group commit")) }
    }

    /// The completion by the backend's own path (PostgreSQL: in a batch with the completions
    /// that wait for a connection with it, `completions.rs`), or `None` for the shared one, the
    /// `complete` statement on the pool. Default: `None`.
    fn complete_batched(
        ledger: &SqlLedger<Self>,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Option<impl Future<Output = Result<(), LedgerError>> + Send + 'static> {
        let _ = (ledger, key, token, response, retention);
        None::<std::future::Ready<Result<(), LedgerError>>>
    }

    /// The claim statement failed with `error`: the claim decided another way (SQLite: a read
    /// of the record it cannot take, for a claim that did not read first), or the error.
    /// Default: the error.
    fn claim_failed(
        ledger: &SqlLedger<Self>,
        request: &ClaimRequest,
        error: LedgerError,
    ) -> impl Future<Output = Result<Claim, LedgerError>> + Send {
        let _ = (ledger, request);
        async { Err(error) }
    }

    /// The outcome of one run of the `claim` statement, from the row it returned: `None` if it
    /// must run again (the record changed under it).
    fn claimed(
        ledger: &SqlLedger<Self>,
        request: &ClaimRequest,
        found: Option<Self::Row>,
    ) -> impl Future<Output = Result<Option<Claim>, LedgerError>> + Send;

    /// [`Ledger::wait_for_change`](tower_idempotency_core::Ledger::wait_for_change).
    fn wait_for_change(
        ledger: &SqlLedger<Self>,
        key: &LedgerKey,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send;
}

/// The statements every backend has, prepared for one table. The parameters are the same in both
/// databases, and so is the binding code ([`SqlLedger`]'s):
///
/// - `claim` and `claim_before_transaction`: `1` key, `2` scope, `3` fingerprint, `4` operation id, `5` token, `6` lease and `7`
///   retention in milliseconds; returns `operation_id` (and on PostgreSQL `won` and the record
///   it lost to).
/// - `complete`: `1` key, `2` token, `3` status, `4` headers, `5` body, `6` body omitted, `7`
///   retention in milliseconds.
/// - `release`: `1` key, `2` token. `renew`: `1` key, `2` token, `3` lease in milliseconds.
/// - `operation`: `1` operation id, `2` scope. `purge`: `1` batch size. `held`: `1` key.
/// - Operator calls: `inspect`: `1` key, `2` with body; `stuck`: `1` lapsed at least this many
///   milliseconds ago, `2` limit; `evict`: `1` key. `inspect` and `stuck` return the columns
///   [`row::info`](crate::row) reads.
///
/// Exposed (hidden) for the benchmark's raw-SQL ceiling, so that it runs exactly these.
#[doc(hidden)]
#[derive(Debug)]
pub struct Statements {
    /// Insert, replace an expired record, take over an expired lease, or write nothing.
    pub claim: SqlStr,
    /// `claim`, in exactly-once mode: on PostgreSQL its commit does not wait for its WAL flush
    /// (the handler's commit makes it durable); elsewhere the same as `claim`.
    pub claim_before_transaction: SqlStr,
    /// The fenced completion.
    pub complete: SqlStr,
    /// The fenced release.
    pub release: SqlStr,
    /// The fenced lease renewal.
    pub renew: SqlStr,
    /// A live record by operation id and scope, with `lapsed`: whether its lease has ended.
    pub operation: SqlStr,
    /// Deletes up to a batch of expired records.
    pub purge: SqlStr,
    /// The token of the live lease on a key.
    pub held: SqlStr,
    /// A live record, for operators.
    pub inspect: SqlStr,
    /// Live claims whose lease lapsed, longest lapsed first.
    pub stuck: SqlStr,
    /// Deletes a record in any state.
    pub evict: SqlStr,
}

/// A statement that is cheap to clone per call (`Arc`-backed).
pub(crate) fn statement(sql: String) -> SqlStr {
    use sqlx::SqlSafeStr;
    sqlx::AssertSqlSafe(std::sync::Arc::<str>::from(sql)).into_sql_str()
}
