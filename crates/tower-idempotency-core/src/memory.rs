//! An in-memory ledger for a single process.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    Claim, ClaimRequest, Existing, FencingToken, Lease, Ledger, LedgerError, LedgerKey,
    MAX_DURATION, OperationId, RecordInfo, RecordState, ScopeDigest, StoredResponse,
};

mod entry;
mod hasher;

use entry::{Entry, State};
pub(crate) use hasher::KeyHasher;
use hasher::shard_of;

/// A ledger in this process's memory: fast, and gone when the process exits.
///
/// Records live in shards, each behind its own short-held mutex, so requests for different keys
/// do not contend on one lock and nothing is held across an `.await`. Waiters for a key (the
/// `Wait` in-progress policy) are woken when it completes or is released. Memory is bounded by
/// retention: run [`purge_expired`](Ledger::purge_expired) periodically (see
/// [`purge_periodically`](crate::purge_periodically)).
///
/// Cloning is cheap and shares the records.
///
/// ```
/// use tower_idempotency_core::MemoryLedger;
/// let ledger = MemoryLedger::new();
/// assert_eq!(ledger.len(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryLedger {
    inner: Arc<Inner>,
}

/// One shard of records. Entries are boxed: a table slot is then 40 bytes, not 270, so a shard's
/// table (sized for the most records it held) costs a seventh of the memory, and growing it under
/// the shard's lock copies a seventh of the bytes. Measured in docs/benchmarks.md ("MemoryLedger
/// growth").
type Records = HashMap<LedgerKey, Box<Entry>, KeyHasher>;

struct Inner {
    records: Box<[Mutex<Records>]>,
    operations: Box<[Mutex<HashMap<OperationId, LedgerKey, KeyHasher>>]>,
}

/// `now + duration`, capped at [`MAX_DURATION`] (as the SQL ledgers cap it): `Duration::MAX`
/// means "practically forever", not a panic on overflow.
fn later(now: Instant, duration: Duration) -> Instant {
    now + duration.min(MAX_DURATION)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave a record half-written (every mutation is a
    // single insert, remove or assignment), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryLedger {
    /// A ledger with 64 shards.
    pub fn new() -> Self {
        Self::with_shards(64)
    }

    /// A ledger with `shards` shards (at least 1, at most 256).
    pub fn with_shards(shards: usize) -> Self {
        let shards = shards.clamp(1, 256);
        Self {
            inner: Arc::new(Inner {
                records: (0..shards).map(|_| Mutex::default()).collect(),
                operations: (0..shards).map(|_| Mutex::default()).collect(),
            }),
        }
    }

    /// How many records are held, expired ones included until purged.
    pub fn len(&self) -> usize {
        self.inner.records.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn records(&self, key: &LedgerKey) -> MutexGuard<'_, Records> {
        let shards = &self.inner.records;
        lock(&shards[shard_of(key.as_bytes(), shards.len())])
    }

    fn operations(
        &self,
        id: &OperationId,
    ) -> MutexGuard<'_, HashMap<OperationId, LedgerKey, KeyHasher>> {
        let shards = &self.inner.operations;
        lock(&shards[shard_of(id.as_bytes(), shards.len())])
    }

    fn forget_operation(&self, id: &OperationId) {
        self.operations(id).remove(id);
    }

    /// Applies `f` to the in-progress record held under `token`, or reports the lease lost.
    fn with_held<R>(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        f: impl FnOnce(&mut Records, Instant) -> R,
    ) -> Result<R, LedgerError> {
        let mut records = self.records(key);
        let now = Instant::now();
        match records.get(key).map(|entry| &**entry) {
            Some(Entry {
                state: State::InProgress { token: held, .. },
                expires_at,
                ..
            }) if *held == token && *expires_at > now => Ok(f(&mut records, now)),
            _ => Err(LedgerError::LeaseLost),
        }
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("shards", &self.inner.records.len())
            .field("records", &self.len())
            .finish()
    }
}

impl Ledger for MemoryLedger {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        let now = Instant::now();
        let mut stale_operation = None;
        let lease = {
            let mut records = self.records(&request.key);
            let lease = match records.get_mut(&request.key) {
                None => None,
                Some(entry) if entry.expires_at <= now => {
                    stale_operation = Some(entry.operation_id);
                    entry.notify();
                    records.remove(&request.key);
                    None
                }
                Some(entry) => match entry.state {
                    State::InProgress { lease_until, .. }
                        if lease_until <= now && entry.fingerprint == request.fingerprint =>
                    {
                        entry.state = State::InProgress {
                            token: request.token,
                            lease_until: later(now, request.lease),
                        };
                        entry.expires_at = later(now, request.retention);
                        entry.notify();
                        Some(Lease {
                            token: request.token,
                            operation_id: entry.operation_id,
                            taken_over: true,
                        })
                    }
                    ref state => {
                        return Ok(Claim::Existing(Existing {
                            fingerprint: entry.fingerprint,
                            operation_id: entry.operation_id,
                            expires_in: Some(entry.expires_at - now),
                            state: match state {
                                State::InProgress { .. } => RecordState::InProgress,
                                State::Completed(response) => {
                                    RecordState::Completed(response.clone())
                                }
                            },
                        }));
                    }
                },
            };
            match lease {
                Some(lease) => lease,
                None => {
                    records.insert(
                        request.key,
                        Box::new(Entry {
                            scope: request.scope,
                            fingerprint: request.fingerprint,
                            operation_id: request.operation_id,
                            expires_at: later(now, request.retention),
                            state: State::InProgress {
                                token: request.token,
                                lease_until: later(now, request.lease),
                            },
                            changed: None,
                        }),
                    );
                    Lease {
                        token: request.token,
                        operation_id: request.operation_id,
                        taken_over: false,
                    }
                }
            }
        };
        if let Some(id) = stale_operation {
            self.forget_operation(&id);
        }
        if !lease.taken_over {
            self.operations(&lease.operation_id)
                .insert(lease.operation_id, request.key);
        }
        Ok(Claim::Acquired(lease))
    }

    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        self.with_held(key, token, |records, now| {
            if let Some(entry) = records.get_mut(key) {
                entry.state = State::Completed(response.clone());
                entry.expires_at = later(now, retention);
                entry.notify();
            }
        })
    }

    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        let released = self.with_held(key, token, |records, _| {
            records.remove(key).map(|mut entry| {
                entry.notify();
                entry.operation_id
            })
        })?;
        if let Some(id) = released {
            self.forget_operation(&id);
        }
        Ok(())
    }

    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        self.with_held(key, token, |records, now| {
            if let Some(Entry {
                state: State::InProgress { lease_until, .. },
                expires_at,
                ..
            }) = records.get_mut(key).map(|entry| &mut **entry)
            {
                *lease_until = later(now, lease);
                *expires_at = (*expires_at).max(*lease_until);
            }
        })
    }

    async fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> Result<Option<RecordState>, LedgerError> {
        let Some(key) = self.operations(&id).get(&id).copied() else {
            return Ok(None);
        };
        let records = self.records(&key);
        let now = Instant::now();
        Ok(records
            .get(&key)
            .filter(|e| e.operation_id == id && e.scope == *scope)
            .filter(|e| e.expires_at > now)
            .map(|e| match &e.state {
                State::InProgress { lease_until, .. } if *lease_until <= now => {
                    RecordState::Abandoned
                }
                State::InProgress { .. } => RecordState::InProgress,
                State::Completed(response) => RecordState::Completed(response.clone()),
            }))
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        let batch = batch.max(1);
        let mut purged = 0u64;
        for shard in self.inner.records.iter() {
            loop {
                let now = Instant::now();
                let expired: Vec<(LedgerKey, OperationId)> = {
                    let mut records = lock(shard);
                    let expired: Vec<_> = records
                        .iter()
                        .filter(|(_, e)| e.expires_at <= now)
                        .take(batch)
                        .map(|(k, e)| (*k, e.operation_id))
                        .collect();
                    for (key, _) in &expired {
                        if let Some(mut entry) = records.remove(key) {
                            entry.notify();
                        }
                    }
                    expired
                };
                for (_, id) in &expired {
                    self.forget_operation(id);
                }
                purged += expired.len() as u64;
                if expired.len() < batch {
                    break;
                }
            }
        }
        Ok(purged)
    }

    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        // Subscribe under the shard lock: every change is made under the same lock and sent after
        // it, so no completion can slip between the caller's claim and this subscription unseen
        // (a change before it is seen by the caller's next claim).
        // A record that is already completed (or whose lease already lapsed) has nothing left
        // to wait for: nobody will notify it again, so subscribing would sleep out the timeout.
        let mut rx = {
            let mut records = self.records(key);
            let Some(entry) = records.get_mut(key) else {
                return;
            };
            match entry.state {
                State::Completed(_) => return,
                State::InProgress { lease_until, .. } if lease_until <= Instant::now() => return,
                State::InProgress { .. } => {}
            }
            entry
                .changed
                .get_or_insert_with(|| watch::channel(()).0)
                .subscribe()
        };
        // A closed channel (the entry was removed) is a change too.
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    async fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        let now = Instant::now();
        Ok(self
            .records(key)
            .get(key)
            .filter(|entry| entry.expires_at > now)
            .map(|entry| entry.info(key, now, with_body)))
    }

    async fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        let now = Instant::now();
        let mut found: Vec<(Instant, RecordInfo)> = Vec::new();
        for shard in self.inner.records.iter() {
            let records = lock(shard);
            found.extend(records.iter().filter_map(|(key, entry)| match entry.state {
                State::InProgress { lease_until, .. }
                    if entry.expires_at > now
                        && lease_until <= now
                        && now.duration_since(lease_until) >= older_than =>
                {
                    Some((lease_until, entry.info(key, now, false)))
                }
                _ => None,
            }));
        }
        found.sort_by_key(|(lease_until, _)| *lease_until);
        Ok(found
            .into_iter()
            .take(limit)
            .map(|(_, info)| info)
            .collect())
    }

    async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        let removed = self.records(key).remove(key).map(|mut entry| {
            entry.notify();
            entry.operation_id
        });
        if let Some(id) = removed {
            self.forget_operation(&id);
        }
        Ok(removed.is_some())
    }
}

#[cfg(test)]
mod tests;
