//! Exactly-once mode for every SQL ledger: the completion is written in the handler's transaction
//! and committed with it.

use std::time::Duration;

use sqlx::{ColumnIndex, Decode, Encode, Executor, IntoArguments, Type};
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, LedgerError, LedgerKey, StoredResponse, TransactionalLedger,
};
use uuid::Uuid;

use crate::{SqlLedger, backend::Backend, row};

/// See each ledger's docs for how its database's transactions behave here.
impl<DB> TransactionalLedger for SqlLedger<DB>
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
    type Transaction = sqlx::Transaction<'static, DB>;

    /// On PostgreSQL, the claim's commit does not wait for its WAL flush; the handler's commit
    /// waits for it instead (see `postgres.rs`). On SQLite, the plain claim.
    async fn claim_before_transaction(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        self.claim_with(true, request).await
    }

    /// Begins in a task of its own, so that a caller that stops waiting (the layer's ledger
    /// timeout) cannot leave a pooled connection inside an open transaction: sqlx 0.9's `begin`
    /// is not cancel-safe (cancelled after `BEGIN` is sent but before its answer, it returns the
    /// connection to the pool still in the transaction, where every later statement runs in it,
    /// with `now()` frozen, never committed). The task always finishes; a transaction nobody
    /// takes is dropped there, which rolls it back.
    async fn begin(&self) -> Result<Self::Transaction, LedgerError> {
        let pool = self.pool.clone();
        match tokio::spawn(async move { pool.begin().await }).await {
            Ok(begun) => begun.map_err(row::error),
            Err(join) => Err(LedgerError::backend(join)),
        }
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
