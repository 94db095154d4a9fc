//! The ledger trait: where claims, leases and stored responses live.

use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    Claim, FencingToken, Fingerprint, LedgerError, LedgerKey, OperationId, RecordInfo, RecordState,
    ScopeDigest, StoredResponse,
};

/// The longest lease, retention or wait any part of tower-idempotency accepts or stores: 100
/// years. Longer durations (up to `Duration::MAX`, "practically forever") are refused by the
/// layer's builder and capped by the ledgers, so that adding one to a timestamp or an `Instant`
/// cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// One claim attempt: who asks, for which key, with which fingerprint, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The record's key (scope and idempotency key, digested).
    pub key: LedgerKey,
    /// The caller's scope, kept on the record for operation lookups.
    pub scope: ScopeDigest,
    /// The request's fingerprint, kept on the record and compared by the layer.
    pub fingerprint: Fingerprint,
    /// The token to install if the claim wins. Fresh for every attempt.
    pub token: FencingToken,
    /// The operation id to give a new record (a takeover keeps the record's own).
    pub operation_id: OperationId,
    /// How long the lease lasts before another request may take the key over.
    pub lease: Duration,
    /// How long an abandoned claim is kept before purge may delete it.
    pub retention: Duration,
}

impl ClaimRequest {
    /// A claim with a fresh token and operation id.
    pub fn new(
        key: LedgerKey,
        scope: ScopeDigest,
        fingerprint: Fingerprint,
        lease: Duration,
        retention: Duration,
    ) -> Self {
        Self {
            key,
            scope,
            fingerprint,
            token: FencingToken::new(),
            operation_id: OperationId::new_v4(),
            lease,
            retention,
        }
    }
}

/// A store of idempotency records. Implement it to put the ledger in another database; run
/// [`conformance`](crate::conformance) (feature `conformance`) to check the implementation.
///
/// # The contract
///
/// A record is absent, in progress (token, lease deadline, operation id) or completed (stored
/// response, expiry). Every implementation keeps these rules; the layer's guarantees rest on them.
///
/// 1. **[`claim`](Self::claim) is one atomic step** in the backend itself (a single statement, a
///    lock held across read and write, a script), never a read followed by a write. Of any number
///    of concurrent claims of an absent key, exactly one returns [`Claim::Acquired`].
/// 2. A claim **takes the key** when the record is absent, when its expiry (`retention` after it
///    was claimed or completed) has passed, or when it is in progress with an expired lease *and
///    the same fingerprint* (crash recovery; the takeover keeps the operation id and sets
///    [`Lease::taken_over`](crate::Lease::taken_over)). Otherwise it returns the record as
///    [`Claim::Existing`] and writes nothing.
/// 3. **Fencing**: [`complete`](Self::complete), [`release`](Self::release) and
///    [`renew`](Self::renew) succeed only while the record is in progress under the caller's
///    token; otherwise they write nothing and return [`LedgerError::LeaseLost`]. A completed
///    record is never overwritten.
/// 4. Lease and retention are separate: the lease bounds how long a crashed holder blocks its
///    key; retention bounds how long a completed response is replayed. A live claim never
///    expires: [`renew`](Self::renew) moves its expiry to at least the new lease deadline.
/// 5. [`operation`](Self::operation) answers only for the scope that created the record.
/// 6. Responses round-trip exactly: status, every header value in order, body bytes.
/// 7. Expired records are treated as absent by `claim`, `operation`, `inspect` and `stuck` even
///    before [`purge_expired`](Self::purge_expired) deletes them.
///
/// The operator calls ([`inspect`](Self::inspect), [`stuck`](Self::stuck),
/// [`force_release`](Self::force_release), [`evict`](Self::evict)) are for on-call tools, not the
/// request path; a ledger that cannot offer one keeps its default.
///
/// # Keep the request path's futures small
///
/// The layer holds the futures of [`claim`](Self::claim), [`complete`](Self::complete),
/// [`release`](Self::release) and [`renew`](Self::renew) inline in each request's state, which
/// every request allocates and moves. A client library's query future can be kilobytes: box it
/// inside the call (`Box::pin(query).await`). One allocation per round trip costs far less than
/// a larger state on every request, replays from a cache included. The shipped SQL and Redis
/// ledgers do so; [`MemoryLedger`](crate::MemoryLedger)'s futures are small and stay inline.
pub trait Ledger: Send + Sync + 'static {
    /// A short name for traces and metrics, such as `"memory"` or `"postgres"`.
    fn name(&self) -> &'static str;

    /// Atomically claims `request.key`, or reports the record that holds it. See the contract.
    fn claim(
        &self,
        request: &ClaimRequest,
    ) -> impl Future<Output = Result<Claim, LedgerError>> + Send;

    /// Stores `response` for the key held under `token` and keeps it for `retention`.
    fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// Deletes the in-progress record held under `token`, so that a retry runs the handler again.
    fn release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// Extends the lease held under `token` to `lease` from now, and the record's expiry to at
    /// least that deadline (so a handler that outlives retention is not purged or replaced).
    fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// The state of operation `id`, if it exists, has not expired, and belongs to `scope`: a
    /// record in progress whose lease has lapsed (by the ledger's clock) is
    /// [`RecordState::Abandoned`], never [`InProgress`](RecordState::InProgress).
    fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<RecordState>, LedgerError>> + Send;

    /// Deletes every expired record, at most `batch` per statement or lock hold so that claims
    /// keep flowing, and returns how many were deleted.
    fn purge_expired(&self, batch: usize) -> impl Future<Output = Result<u64, LedgerError>> + Send;

    /// Whether the backend deletes expired records by itself (a Redis expiry), so that
    /// [`purge_expired`](Self::purge_expired) has nothing to scan and returns 0. Default: `false`.
    fn expires_records_itself(&self) -> bool {
        false
    }

    /// Returns when the record under `key` may have changed (completed, released, taken over), or
    /// after at most `timeout`. It may return early; callers claim again and wait again.
    ///
    /// The default polls: it sleeps 25 ms (or `timeout`, if shorter). Ledgers that can be told of
    /// a change (a notify, a `LISTEN`, a pub/sub channel) should override it.
    fn wait_for_change(
        &self,
        key: &LedgerKey,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        let _ = key;
        tokio::time::sleep(timeout.min(Duration::from_millis(25)))
    }

    /// For operators: the live record under `key` (an expired one is absent, as for
    /// [`claim`](Self::claim)), with its stored body only if `with_body`. Never writes.
    ///
    /// The default returns [`LedgerError::Unsupported`].
    fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> impl Future<Output = Result<Option<RecordInfo>, LedgerError>> + Send {
        let _ = (key, with_body);
        std::future::ready(Err(LedgerError::Unsupported {
            operation: "inspect",
        }))
    }

    /// For operators: up to `limit` live records still in progress whose lease lapsed at least
    /// `older_than` ago (their holder crashed, or its renewal stopped at the maximum handler
    /// time), longest lapsed first, without bodies. `older_than` zero lists every lapsed lease.
    ///
    /// The default returns [`LedgerError::Unsupported`].
    fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordInfo>, LedgerError>> + Send {
        let _ = (older_than, limit);
        std::future::ready(Err(LedgerError::Unsupported { operation: "stuck" }))
    }

    /// For operators: deletes the in-progress record under `key` if `token` (as seen by
    /// [`inspect`](Self::inspect)) still holds it, whether or not its lease is live, so that a
    /// retry runs the handler again. Fenced like [`release`](Self::release): if another request
    /// took the key over or completed it meanwhile, nothing is written and the result is
    /// [`LedgerError::LeaseLost`].
    ///
    /// The default is [`release`](Self::release), which every ledger fences this way.
    fn force_release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.release(key, token)
    }

    /// For operators: deletes the record under `key` whatever its state (a stored response that
    /// must not be replayed, say), and returns whether there was one. A holder still running
    /// then finds its lease lost and its result is not stored.
    ///
    /// The default returns [`LedgerError::Unsupported`].
    fn evict(&self, key: &LedgerKey) -> impl Future<Output = Result<bool, LedgerError>> + Send {
        let _ = key;
        std::future::ready(Err(LedgerError::Unsupported { operation: "evict" }))
    }
}

impl<L: Ledger> Ledger for Arc<L> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn claim(
        &self,
        request: &ClaimRequest,
    ) -> impl Future<Output = Result<Claim, LedgerError>> + Send {
        (**self).claim(request)
    }

    fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        (**self).complete(key, token, response, retention)
    }

    fn release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        (**self).release(key, token)
    }

    fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        (**self).renew(key, token, lease)
    }

    fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<RecordState>, LedgerError>> + Send {
        (**self).operation(scope, id)
    }

    fn purge_expired(&self, batch: usize) -> impl Future<Output = Result<u64, LedgerError>> + Send {
        (**self).purge_expired(batch)
    }

    fn expires_records_itself(&self) -> bool {
        (**self).expires_records_itself()
    }

    fn wait_for_change(
        &self,
        key: &LedgerKey,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        (**self).wait_for_change(key, timeout)
    }

    fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> impl Future<Output = Result<Option<RecordInfo>, LedgerError>> + Send {
        (**self).inspect(key, with_body)
    }

    fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordInfo>, LedgerError>> + Send {
        (**self).stuck(older_than, limit)
    }

    fn force_release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        (**self).force_release(key, token)
    }

    fn evict(&self, key: &LedgerKey) -> impl Future<Output = Result<bool, LedgerError>> + Send {
        (**self).evict(key)
    }
}

/// Purges expired records every `every`, `batch` at a time, until the returned future is dropped.
/// Spawn it once per ledger; it is opt-in so that the app decides where maintenance runs.
///
/// A failed purge is logged (`tracing` at warn) and retried at the next tick.
///
/// ```
/// # async fn run() {
/// use std::time::Duration;
/// use tower_idempotency_core::{MemoryLedger, purge_periodically};
///
/// let ledger = MemoryLedger::new();
/// tokio::spawn(purge_periodically(ledger.clone(), Duration::from_secs(60), 1_000));
/// # }
/// ```
pub async fn purge_periodically<L: Ledger>(ledger: L, every: Duration, batch: usize) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match ledger.purge_expired(batch).await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(
                ledger = ledger.name(),
                purged,
                "purged expired idempotency records"
            ),
            Err(error) => {
                tracing::warn!(ledger = ledger.name(), %error, "purging expired idempotency records failed")
            }
        }
    }
}

/// A ledger that can record a completion inside a transaction the handler also writes in, so
/// that the handler's database writes and the record of them commit or vanish together
/// (exactly-once for side effects in the ledger's own database).
///
/// The layer, with `with_transactions()`, claims the key as usual (its own autocommitted
/// statement), then calls [`begin`](Self::begin) and hands the transaction to the handler. After
/// a response to be stored, it calls [`complete_in`](Self::complete_in); otherwise (a response
/// not stored, a panic, an error) it calls [`rollback`](Self::rollback) and releases the key.
///
/// # The contract
/// - `complete_in` writes the completion with the same fencing as
///   [`complete`](Ledger::complete), inside `transaction`, then commits. If the token is no
///   longer current it writes nothing, rolls the transaction back (the handler's writes vanish
///   with it) and returns [`LedgerError::LeaseLost`].
/// - If the commit fails, nothing of the transaction is visible and the key stays in progress.
/// - A transaction dropped without `complete_in` or `rollback` (a crash, a cancelled task)
///   leaves nothing behind.
pub trait TransactionalLedger: Ledger + Clone {
    /// The transaction handed to the handler, such as `sqlx::Transaction<'static, Postgres>`.
    type Transaction: Send + 'static;

    /// The claim the layer makes in exactly-once mode, before it calls [`begin`](Self::begin).
    /// Same contract as [`claim`](Ledger::claim), which is the default.
    ///
    /// A ledger whose database makes a commit durable together with everything committed
    /// before it (one sequential log, such as PostgreSQL's WAL) may answer before the claim is
    /// itself durable: nothing the handler writes can commit without making the claim durable
    /// first, and a claim lost in a crash of the database took nothing committed with it, so
    /// the retry runs once. PostgreSQL's ledger does this (the claim commits with
    /// `synchronous_commit = off`), saving a request one wait for a log flush.
    fn claim_before_transaction(
        &self,
        request: &ClaimRequest,
    ) -> impl Future<Output = Result<Claim, LedgerError>> + Send {
        self.claim(request)
    }

    /// Opens a transaction in the ledger's database.
    fn begin(&self) -> impl Future<Output = Result<Self::Transaction, LedgerError>> + Send;

    /// Records `response` for the key held under `token` inside `transaction` and commits it.
    fn complete_in(
        &self,
        transaction: Self::Transaction,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// Rolls `transaction` back.
    fn rollback(
        &self,
        transaction: Self::Transaction,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
}
