use bytes::Bytes;
use http::StatusCode;

use super::{store::ENTRY_OVERHEAD, *};
use crate::{Existing, Fingerprint, IdempotencyKey, Lease, MemoryLedger};

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
