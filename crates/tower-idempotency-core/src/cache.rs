//! A bounded in-process cache of completed records, in front of any ledger.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    Claim, ClaimRequest, FencingToken, Ledger, LedgerError, LedgerKey, OperationId, RecordInfo,
    RecordState, ScopeDigest, StoredResponse, TransactionalLedger,
};

/// The default bound in entries: 10,000 records.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The default bound in bytes: 64 MiB of stored responses (body and headers) plus a fixed
/// per-entry overhead.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// The default longest time a record is served from the cache: 60 s.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(60);

mod store;

use store::Cache;

/// A ledger with a bounded in-process cache of completed records in front of it: a replay of a
/// key this process has already seen completed is answered from memory, with no round trip to
/// the ledger. Opt-in; it pays off in front of a shared ledger (PostgreSQL, SQLite), where a
/// replay otherwise costs a round trip (and, on PostgreSQL today, a WAL write).
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency_core::{CachedLedger, MemoryLedger};
///
/// let ledger = CachedLedger::new(MemoryLedger::new())
///     .with_max_entries(50_000)
///     .with_max_bytes(128 << 20)
///     .with_max_ttl(Duration::from_secs(30));
/// assert_eq!(ledger.len(), 0);
/// ```
///
/// # Why it is correct
///
/// A completed record never changes until it expires: the contract forbids overwriting it
/// (fencing), and a claim takes an existing key only once it is absent or expired. So
/// [`claim`](Ledger::claim) of a key found here returns
/// [`Claim::Existing`] with the stored response, fingerprint and operation id, exactly what the
/// ledger would have answered. A different fingerprint still gets the record's own, so the layer
/// answers 422 as it would without the cache. Every other call, and every claim of a key not
/// cached, goes to the inner ledger; a claim that finds a completed record there caches it.
///
/// # Expiry
///
/// A record is cached only when the ledger says how long it has left
/// ([`Existing::expires_in`]), and is served until the earlier of that expiry and
/// [`max_ttl`](Self::with_max_ttl) from when it was cached. The clock starts *before* the inner
/// claim is sent, so the cache never outlives the ledger's own record. Every shipped ledger
/// reports it (memory, SQLite, PostgreSQL by the database's clock, Redis by `PTTL`); a ledger
/// that answers `expires_in: None` is never cached: the cache then passes every claim through.
///
/// # Bounds and eviction
///
/// Bounded in entries ([`with_max_entries`](Self::with_max_entries)) and in bytes
/// ([`with_max_bytes`](Self::with_max_bytes): each response's body and header bytes plus a fixed
/// overhead per entry), whichever is reached first. Entries live in up to 16 shards, each behind
/// its own short-held mutex with an even share of both bounds (fewer shards when a share would
/// fall under 64 entries or 1 MiB; the defaults give 16 shards of 625 entries and 4 MiB); a full
/// shard evicts in insertion order with a second chance for entries replayed since they were
/// last passed over (CLOCK, an approximation of least-recently-used that needs no list
/// reordering on a hit). A response larger than a shard's share of the bytes is not cached. Expired entries are dropped when met
/// and by [`purge_expired`](Ledger::purge_expired).
///
/// No crate is used for this: `moka` and `quick_cache` bound one weight, not entries and bytes
/// together, and neither knows a per-entry deadline without extra machinery; a sharded map and a
/// queue are a hundred lines and add no dependency to every ledger's build.
///
/// # Deleting a completed record early
///
/// A completed record leaves a ledger before its expiry only by an operator's deletion. Every
/// process's cache keeps serving it until its cached deadline, so **a deleted record may be
/// replayed from other instances' caches for up to `max_ttl`**. Drop it from this process's
/// cache with [`evict_local`](Self::evict_local); keep `max_ttl` short where early deletion
/// matters.
///
/// Cloning is cheap and shares the cache. The builder methods start a new, empty cache: call
/// them before the ledger is used.
///
/// [`Existing::expires_in`]: crate::Existing::expires_in
pub struct CachedLedger<L> {
    inner: L,
    cache: Arc<Cache>,
}

impl<L: Clone> Clone for CachedLedger<L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<L> CachedLedger<L> {
    /// A cache in front of `inner`, with [`DEFAULT_MAX_ENTRIES`], [`DEFAULT_MAX_BYTES`] and
    /// [`DEFAULT_MAX_TTL`].
    pub fn new(inner: L) -> Self {
        Self {
            inner,
            cache: Arc::new(Cache::new(
                DEFAULT_MAX_ENTRIES,
                DEFAULT_MAX_BYTES,
                DEFAULT_MAX_TTL,
            )),
        }
    }

    /// Holds at most `max_entries` records (default [`DEFAULT_MAX_ENTRIES`]; 0 caches nothing).
    #[must_use]
    pub fn with_max_entries(self, max_entries: usize) -> Self {
        let (bytes, ttl) = (self.cache.max_bytes, self.cache.max_ttl);
        self.with_cache(Cache::new(max_entries, bytes, ttl))
    }

    /// Holds at most `max_bytes` of responses, counting body and header bytes plus a fixed
    /// overhead per entry (default [`DEFAULT_MAX_BYTES`]).
    #[must_use]
    pub fn with_max_bytes(self, max_bytes: usize) -> Self {
        let (entries, ttl) = (self.cache.max_entries, self.cache.max_ttl);
        self.with_cache(Cache::new(entries, max_bytes, ttl))
    }

    /// Serves a record for at most `max_ttl` after caching it, even when the record lives longer
    /// (default [`DEFAULT_MAX_TTL`]). It bounds how long a record deleted early from the ledger
    /// is still replayed here.
    #[must_use]
    pub fn with_max_ttl(self, max_ttl: Duration) -> Self {
        let (entries, bytes) = (self.cache.max_entries, self.cache.max_bytes);
        self.with_cache(Cache::new(entries, bytes, max_ttl))
    }

    fn with_cache(self, cache: Cache) -> Self {
        Self {
            inner: self.inner,
            cache: Arc::new(cache),
        }
    }

    /// Drops `key` from this process's cache, if it is there; the next claim asks the ledger.
    /// Other processes' caches keep it until their deadline (at most `max_ttl`).
    pub fn evict_local(&self, key: &LedgerKey) {
        self.cache.remove(key);
    }

    /// How many records are cached now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the cached records count against [`with_max_bytes`](Self::with_max_bytes).
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The ledger behind the cache.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }

    /// The ledger behind the cache, dropping the cache.
    pub fn into_inner(self) -> L {
        self.inner
    }
}

impl<L: fmt::Debug> fmt::Debug for CachedLedger<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedLedger")
            .field("inner", &self.inner)
            .field("max_entries", &self.cache.max_entries)
            .field("max_bytes", &self.cache.max_bytes)
            .field("max_ttl", &self.cache.max_ttl)
            .field("cached", &self.len())
            .finish()
    }
}

impl<L: Ledger> Ledger for CachedLedger<L> {
    /// The inner ledger's name: traces and metrics name the database, cached or not.
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        self.claim_with(request, |inner| inner.claim(request)).await
    }

    fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner.complete(key, token, response, retention)
    }

    fn release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner.release(key, token)
    }

    fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner.renew(key, token, lease)
    }

    fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<RecordState>, LedgerError>> + Send {
        self.inner.operation(scope, id)
    }

    /// Purges the inner ledger, and drops this process's expired cache entries (not counted in
    /// the result).
    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        self.cache.purge_expired(Instant::now());
        self.inner.purge_expired(batch).await
    }

    fn wait_for_change(
        &self,
        key: &LedgerKey,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        self.inner.wait_for_change(key, timeout)
    }

    fn expires_records_itself(&self) -> bool {
        self.inner.expires_records_itself()
    }

    fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> impl Future<Output = Result<Option<RecordInfo>, LedgerError>> + Send {
        self.inner.inspect(key, with_body)
    }

    fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordInfo>, LedgerError>> + Send {
        self.inner.stuck(older_than, limit)
    }

    fn force_release(
        &self,
        key: &LedgerKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner.force_release(key, token)
    }

    /// Evicts the record from the inner ledger and from this process's cache. Other processes'
    /// caches may replay it for up to their `max_ttl` (see the type's docs).
    async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        self.evict_local(key);
        self.inner.evict(key).await
    }
}

impl<L: Ledger> CachedLedger<L> {
    /// A claim answered from the cache, or by `claim` on the inner ledger (and then cached if
    /// the key is taken).
    async fn claim_with<'a, F>(
        &'a self,
        request: &ClaimRequest,
        claim: impl FnOnce(&'a L) -> F,
    ) -> Result<Claim, LedgerError>
    where
        F: Future<Output = Result<Claim, LedgerError>>,
    {
        // Taken before the inner call: a deadline counted from here is never later than the
        // ledger's own expiry, which it counted from the moment it answered.
        let now = Instant::now();
        if let Some(existing) = self.cache.get(&request.key, now) {
            return Ok(Claim::Existing(existing));
        }
        // Boxed, so that a hit's future does not carry the inner ledger's (see `Ledger`'s docs):
        // the allocation is made only on a miss, which costs a round trip anyway.
        let claim = Box::pin(claim(&self.inner)).await?;
        if let Claim::Existing(existing) = &claim {
            self.cache.insert(request.key, existing, now);
        }
        Ok(claim)
    }
}

impl<L: TransactionalLedger> TransactionalLedger for CachedLedger<L> {
    type Transaction = L::Transaction;

    async fn claim_before_transaction(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        self.claim_with(request, |inner| inner.claim_before_transaction(request))
            .await
    }

    fn begin(&self) -> impl Future<Output = Result<Self::Transaction, LedgerError>> + Send {
        self.inner.begin()
    }

    fn complete_in(
        &self,
        transaction: Self::Transaction,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner
            .complete_in(transaction, key, token, response, retention)
    }

    fn rollback(
        &self,
        transaction: Self::Transaction,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send {
        self.inner.rollback(transaction)
    }
}

#[cfg(test)]
mod tests;
