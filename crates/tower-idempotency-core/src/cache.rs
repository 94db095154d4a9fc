//! A bounded in-process cache of completed records, in front of any ledger.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    Claim, ClaimRequest, Existing, FencingToken, Fingerprint, Ledger, LedgerError, LedgerKey,
    OperationId, RecordInfo, RecordState, ScopeDigest, StoredResponse, TransactionalLedger,
    memory::KeyHasher,
};

/// The default bound in entries: 10,000 records.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The default bound in bytes: 64 MiB of stored responses (body and headers) plus a fixed
/// per-entry overhead.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// The default longest time a record is served from the cache: 60 s.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(60);

/// What an entry costs besides its response's bytes: the key, fingerprint, operation id,
/// deadline and the map's and queue's slots, roughly.
const ENTRY_OVERHEAD: usize = 192;

/// A shard's share of the bounds is at least this many entries and bytes (when the bounds allow
/// one shard that much), so a small cache is not split into shards too small to hold anything.
const MIN_ENTRIES_PER_SHARD: usize = 64;
const MIN_BYTES_PER_SHARD: usize = 1 << 20;
const MAX_SHARDS: usize = 16;

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
        let mut shard = self.cache.shard(key);
        if let Some(entry) = shard.map.remove(key) {
            shard.bytes -= entry.size;
        }
    }

    /// How many records are cached now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.cache.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the cache holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the cached records count against [`with_max_bytes`](Self::with_max_bytes).
    pub fn cached_bytes(&self) -> usize {
        self.cache.shards.iter().map(|s| lock(s).bytes).sum()
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

struct Cache {
    shards: Box<[Mutex<Shard>]>,
    max_entries: usize,
    max_bytes: usize,
    max_ttl: Duration,
    entries_per_shard: usize,
    bytes_per_shard: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<LedgerKey, Entry, KeyHasher>,
    /// Keys in insertion order, with the `seq` they were inserted under; a key whose entry was
    /// removed or replaced since is skipped when met.
    order: VecDeque<(LedgerKey, u64)>,
    bytes: usize,
    next_seq: u64,
}

struct Entry {
    fingerprint: Fingerprint,
    operation_id: OperationId,
    response: StoredResponse,
    until: Instant,
    size: usize,
    seq: u64,
    /// Replayed since the eviction hand last passed it: it gets a second chance.
    visited: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation under the lock is a map or queue operation and a counter update that cannot
    // panic half-way, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cache {
    fn new(max_entries: usize, max_bytes: usize, max_ttl: Duration) -> Self {
        let shards = (max_entries / MIN_ENTRIES_PER_SHARD)
            .min(max_bytes / MIN_BYTES_PER_SHARD)
            .clamp(1, MAX_SHARDS);
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            max_entries,
            max_bytes,
            max_ttl,
            // Rounded down, so that the shards together never exceed the bounds.
            entries_per_shard: max_entries / shards,
            bytes_per_shard: max_bytes / shards,
        }
    }

    fn shard(&self, key: &LedgerKey) -> MutexGuard<'_, Shard> {
        // The key is a SHA-256 digest: any byte is uniform. The hasher reads the first 8.
        let byte = key.as_bytes()[31] as usize;
        lock(&self.shards[byte % self.shards.len()])
    }

    fn get(&self, key: &LedgerKey, now: Instant) -> Option<Existing> {
        let mut shard = self.shard(key);
        let entry = shard.map.get_mut(key)?;
        if entry.until <= now {
            let size = entry.size;
            shard.map.remove(key);
            shard.bytes -= size;
            return None;
        }
        entry.visited = true;
        Some(Existing {
            fingerprint: entry.fingerprint,
            operation_id: entry.operation_id,
            state: RecordState::Completed(entry.response.clone()),
            expires_in: Some(entry.until - now),
        })
    }

    /// Caches a completed record found at `now` with `expires_in` left.
    fn insert(&self, key: LedgerKey, existing: &Existing, now: Instant) {
        let (RecordState::Completed(response), Some(expires_in)) =
            (&existing.state, existing.expires_in)
        else {
            return;
        };
        let Some(until) = now.checked_add(expires_in.min(self.max_ttl)) else {
            return;
        };
        let size = response.stored_len() + ENTRY_OVERHEAD;
        if until <= now || size > self.bytes_per_shard || self.entries_per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&key);
        if let Some(old) = shard.map.remove(&key) {
            shard.bytes -= old.size;
        }
        shard.make_room(size, self.entries_per_shard, self.bytes_per_shard, now);
        let seq = shard.next_seq;
        shard.next_seq += 1;
        shard.order.push_back((key, seq));
        shard.bytes += size;
        shard.map.insert(
            key,
            Entry {
                fingerprint: existing.fingerprint,
                operation_id: existing.operation_id,
                response: response.clone(),
                until,
                size,
                seq,
                visited: false,
            },
        );
        // Keys removed other than by eviction stay in the queue until met; keep it from growing
        // without bound when that happens often.
        if shard.order.len() > 2 * shard.map.len() + MIN_ENTRIES_PER_SHARD {
            let Shard { map, order, .. } = &mut *shard;
            order.retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
    }

    fn purge_expired(&self, now: Instant) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            let Shard { map, bytes, .. } = &mut *shard;
            map.retain(|_, entry| {
                let keep = entry.until > now;
                if !keep {
                    *bytes -= entry.size;
                }
                keep
            });
        }
    }
}

impl Shard {
    /// Evicts until one more entry of `size` bytes fits: expired entries and entries not replayed
    /// since the hand last passed go; replayed ones get a second chance.
    fn make_room(&mut self, size: usize, max_entries: usize, max_bytes: usize, now: Instant) {
        while self.map.len() >= max_entries || self.bytes + size > max_bytes {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            let Some(entry) = self.map.get_mut(&key).filter(|e| e.seq == seq) else {
                continue;
            };
            if entry.visited && entry.until > now {
                entry.visited = false;
                self.order.push_back((key, seq));
                continue;
            }
            let size = entry.size;
            self.map.remove(&key);
            self.bytes -= size;
        }
    }
}

impl<L: Ledger> Ledger for CachedLedger<L> {
    /// The inner ledger's name: traces and metrics name the database, cached or not.
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        // Taken before the inner call: a deadline counted from here is never later than the
        // ledger's own expiry, which it counted from the moment it answered.
        let now = Instant::now();
        if let Some(existing) = self.cache.get(&request.key, now) {
            return Ok(Claim::Existing(existing));
        }
        let claim = self.inner.claim(request).await?;
        if let Claim::Existing(existing) = &claim {
            self.cache.insert(request.key, existing, now);
        }
        Ok(claim)
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

impl<L: TransactionalLedger> TransactionalLedger for CachedLedger<L> {
    type Transaction = L::Transaction;

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
mod tests {
    use bytes::Bytes;
    use http::StatusCode;

    use super::*;
    use crate::{IdempotencyKey, Lease, MemoryLedger};

    const HOUR: Duration = Duration::from_secs(3600);

    fn request(key: &str, body: &str, retention: Duration) -> ClaimRequest {
        let parsed = IdempotencyKey::parse(key.as_bytes()).expect("a valid key");
        ClaimRequest::new(
            LedgerKey::new(b"scope", &parsed),
            ScopeDigest::new(b"scope"),
            Fingerprint::of(body.as_bytes()),
            Duration::from_secs(30),
            retention,
        )
    }

    fn response(body_len: usize) -> StoredResponse {
        StoredResponse {
            status: StatusCode::CREATED,
            headers: http::HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            body_omitted: false,
        }
    }

    async fn acquire<L: Ledger>(ledger: &L, request: &ClaimRequest) -> Lease {
        match ledger.claim(request).await.expect("claim") {
            Claim::Acquired(lease) => lease,
            Claim::Existing(existing) => panic!("expected to acquire, found {existing:?}"),
        }
    }

    async fn existing<L: Ledger>(ledger: &L, request: &ClaimRequest) -> Existing {
        match ledger.claim(request).await.expect("claim") {
            Claim::Existing(existing) => existing,
            Claim::Acquired(lease) => panic!("expected the record, acquired {lease:?}"),
        }
    }

    /// Claims and completes `request`, then replays it once so that it is cached.
    async fn completed<L: Ledger>(ledger: &L, request: &ClaimRequest, body_len: usize) {
        let lease = acquire(ledger, request).await;
        ledger
            .complete(
                &request.key,
                lease.token,
                &response(body_len),
                request.retention,
            )
            .await
            .expect("complete");
        existing(ledger, request).await;
    }

    fn completed_record(body_len: usize, expires_in: Option<Duration>) -> Existing {
        Existing {
            fingerprint: Fingerprint::of(b"body"),
            operation_id: OperationId::new_v4(),
            state: RecordState::Completed(response(body_len)),
            expires_in,
        }
    }

    #[cfg(feature = "conformance")]
    #[tokio::test]
    async fn a_cached_replay_makes_no_inner_call() {
        use crate::conformance::{FaultyLedger, Op};

        let inner = FaultyLedger::new(MemoryLedger::new());
        let faults = inner.faults();
        let ledger = CachedLedger::new(inner);
        let request = request("k", "body", HOUR);
        completed(&ledger, &request, 10).await;
        // The claim that won the key and the first replay, which found the record and cached it.
        assert_eq!(faults.calls(Op::Claim), 2);
        for _ in 0..10 {
            let found = existing(&ledger, &request).await;
            assert_eq!(found.state, RecordState::Completed(response(10)));
            assert_eq!(found.fingerprint, request.fingerprint);
        }
        assert_eq!(faults.calls(Op::Claim), 2);
        // Once dropped locally, the next claim asks the ledger again.
        ledger.evict_local(&request.key);
        existing(&ledger, &request).await;
        assert_eq!(faults.calls(Op::Claim), 3);
    }

    #[cfg(feature = "conformance")]
    #[tokio::test(start_paused = true)]
    async fn max_ttl_bounds_how_long_a_long_lived_record_is_served() {
        use crate::conformance::{FaultyLedger, Op};

        let inner = FaultyLedger::new(MemoryLedger::new());
        let faults = inner.faults();
        let ledger = CachedLedger::new(inner).with_max_ttl(Duration::from_secs(5));
        let request = request("k", "body", HOUR);
        completed(&ledger, &request, 10).await;
        existing(&ledger, &request).await;
        assert_eq!(faults.calls(Op::Claim), 2);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Past max_ttl: asked again, and cached again.
        existing(&ledger, &request).await;
        existing(&ledger, &request).await;
        assert_eq!(faults.calls(Op::Claim), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_record_is_not_served() {
        let ledger = CachedLedger::new(MemoryLedger::new());
        let request = request("k", "body", Duration::from_secs(10));
        completed(&ledger, &request, 10).await;
        assert_eq!(ledger.len(), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        // The record expired in the ledger and in the cache: the key is free again.
        acquire(&ledger, &request).await;
        assert!(ledger.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn purge_drops_expired_entries() {
        let ledger = CachedLedger::new(MemoryLedger::new());
        completed(&ledger, &request("a", "body", Duration::from_secs(10)), 10).await;
        completed(&ledger, &request("b", "body", HOUR), 10).await;
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(ledger.purge_expired(100).await.expect("purge"), 1);
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.cached_bytes(), 10 + ENTRY_OVERHEAD);
    }

    #[tokio::test]
    async fn a_different_fingerprint_gets_the_stored_records() {
        let ledger = CachedLedger::new(MemoryLedger::new());
        let first = request("k", "body", HOUR);
        completed(&ledger, &first, 10).await;
        assert_eq!(ledger.len(), 1);
        let other = request("k", "another body", HOUR);
        let found = existing(&ledger, &other).await;
        // The layer compares this with the request's own and answers 422.
        assert_eq!(found.fingerprint, first.fingerprint);
        assert_ne!(found.fingerprint, other.fingerprint);
    }

    #[test]
    fn unknown_expiry_is_not_cached() {
        let cache = Cache::new(100, 1 << 20, HOUR);
        let key = request("k", "body", HOUR).key;
        cache.insert(key, &completed_record(10, None), Instant::now());
        assert!(cache.get(&key, Instant::now()).is_none());
        cache.insert(key, &completed_record(10, Some(HOUR)), Instant::now());
        assert!(cache.get(&key, Instant::now()).is_some());
    }

    #[test]
    fn in_progress_is_not_cached() {
        let cache = Cache::new(100, 1 << 20, HOUR);
        let key = request("k", "body", HOUR).key;
        let record = Existing {
            state: RecordState::InProgress,
            ..completed_record(0, Some(HOUR))
        };
        cache.insert(key, &record, Instant::now());
        assert!(cache.get(&key, Instant::now()).is_none());
    }

    fn fill(ledger: &CachedLedger<MemoryLedger>, keys: usize, body_len: usize) {
        for i in 0..keys {
            let key = request(&format!("k{i}"), "body", HOUR).key;
            ledger
                .cache
                .insert(key, &completed_record(body_len, Some(HOUR)), Instant::now());
        }
    }

    #[test]
    fn the_entry_bound_holds() {
        for max in [1, 10, 100, 1_000, 5_000] {
            let ledger = CachedLedger::new(MemoryLedger::new()).with_max_entries(max);
            fill(&ledger, 3 * max + 100, 10);
            assert!(
                ledger.len() <= max,
                "{} entries cached, bound {max}",
                ledger.len()
            );
            assert!(
                ledger.len() >= max / 2,
                "{} entries cached, bound {max}",
                ledger.len()
            );
        }
        let ledger = CachedLedger::new(MemoryLedger::new()).with_max_entries(0);
        fill(&ledger, 10, 10);
        assert!(ledger.is_empty());
    }

    #[test]
    fn the_byte_bound_holds() {
        let entry = 1_000 + ENTRY_OVERHEAD;
        for max_bytes in [entry, 10 * entry, 1_000 * entry] {
            let ledger = CachedLedger::new(MemoryLedger::new())
                .with_max_entries(100_000)
                .with_max_bytes(max_bytes);
            fill(&ledger, 3_000, 1_000);
            assert!(ledger.cached_bytes() <= max_bytes);
            assert_eq!(ledger.cached_bytes(), ledger.len() * entry);
            assert!(!ledger.is_empty());
        }
        // A response larger than a shard's share is not cached at all.
        let ledger = CachedLedger::new(MemoryLedger::new()).with_max_bytes(entry - 1);
        fill(&ledger, 1, 1_000);
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_replayed_entry_gets_a_second_chance() {
        let ledger = CachedLedger::new(MemoryLedger::new()).with_max_entries(10);
        let hot = request("hot", "body", HOUR).key;
        let now = Instant::now();
        ledger
            .cache
            .insert(hot, &completed_record(10, Some(HOUR)), now);
        fill(&ledger, 5, 10);
        assert!(ledger.cache.get(&hot, now).is_some());
        fill(&ledger, 10, 10);
        assert!(
            ledger.cache.get(&hot, now).is_some(),
            "a replayed entry was evicted first"
        );
        assert_eq!(ledger.len(), 10);
        // The oldest entry not replayed went instead.
        let oldest_cold = request("k0", "body", HOUR).key;
        assert!(ledger.cache.get(&oldest_cold, now).is_none());
    }
}
