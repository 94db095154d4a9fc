//! The cache's bounded store: entries in shards behind their own mutexes, each bounded in entries
//! and bytes, evicting in insertion order with a second chance (CLOCK).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    Existing, Fingerprint, LedgerKey, OperationId, RecordState, StoredResponse, memory::KeyHasher,
};

/// What an entry costs besides its response's bytes: the key, fingerprint, operation id,
/// deadline and the map's and queue's slots, roughly.
pub(super) const ENTRY_OVERHEAD: usize = 192;

/// A shard's share of the bounds is at least this many entries and bytes (when the bounds allow
/// one shard that much), so a small cache is not split into shards too small to hold anything.
const MIN_ENTRIES_PER_SHARD: usize = 64;
const MIN_BYTES_PER_SHARD: usize = 1 << 20;
const MAX_SHARDS: usize = 16;

pub(super) struct Cache {
    shards: Box<[Mutex<Shard>]>,
    pub(super) max_entries: usize,
    pub(super) max_bytes: usize,
    pub(super) max_ttl: Duration,
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
    pub(super) fn new(max_entries: usize, max_bytes: usize, max_ttl: Duration) -> Self {
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

    pub(super) fn get(&self, key: &LedgerKey, now: Instant) -> Option<Existing> {
        let mut shard = self.shard(key);
        let entry = shard.map.get_mut(key)?;
        if entry.until <= now {
            let size = entry.size;
            shard.map.remove(key);
            shard.bytes -= size;
            return None;
        }
        // Written only when it changes: a hit then leaves the entry's memory unmodified, and
        // the other cores' copies of it valid (a profile showed a write per hit costing a cache
        // miss on the next core's hit).
        if !entry.visited {
            entry.visited = true;
        }
        Some(Existing {
            fingerprint: entry.fingerprint,
            operation_id: entry.operation_id,
            state: RecordState::Completed(entry.response.clone()),
            expires_in: Some(entry.until - now),
        })
    }

    /// Caches a completed record found at `now` with `expires_in` left.
    pub(super) fn insert(&self, key: LedgerKey, existing: &Existing, now: Instant) {
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

    /// Drops `key`, if it is there.
    pub(super) fn remove(&self, key: &LedgerKey) {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.map.remove(key) {
            shard.bytes -= entry.size;
        }
    }

    /// How many entries the shards hold.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// The bytes the entries count against the bound.
    pub(super) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).bytes).sum()
    }

    pub(super) fn purge_expired(&self, now: Instant) {
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
