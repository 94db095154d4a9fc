use super::*;
use crate::{Fingerprint, IdempotencyKey};

fn claim(key: &str, fp: &[u8]) -> ClaimRequest {
    let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
    ClaimRequest::new(
        LedgerKey::new(b"", &key),
        ScopeDigest::new(b""),
        Fingerprint::of(fp),
        Duration::from_secs(30),
        Duration::from_secs(3600),
    )
}

/// A completion that lands between a duplicate's claim and its wait is seen at once, never
/// at the wait's timeout (issue 14). Time is paused, so a missed completion shows as the
/// whole timeout elapsed, not as a slow test.
#[tokio::test(start_paused = true)]
async fn a_completion_before_the_wait_is_not_waited_out() {
    let ledger = MemoryLedger::new();
    let timeout = Duration::from_secs(3);
    for i in 0..1_000 {
        let request = claim(&format!("race-{i}"), b"x");
        let Ok(Claim::Acquired(lease)) = ledger.claim(&request).await else {
            panic!("not acquired");
        };
        let Ok(Claim::Existing(_)) = ledger.claim(&request).await else {
            panic!("the duplicate acquired the key");
        };
        let response = StoredResponse {
            status: http::StatusCode::OK,
            headers: Default::default(),
            body: bytes::Bytes::from_static(b"ok"),
            body_omitted: false,
        };
        ledger
            .complete(
                &request.key,
                lease.token,
                &response,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let started = Instant::now();
        ledger.wait_for_change(&request.key, timeout).await;
        assert!(
            started.elapsed() < timeout,
            "iteration {i}: the wait missed a completion and ran out its timeout"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn spreads_keys_over_shards_and_buckets() {
    let ledger = MemoryLedger::with_shards(8);
    for i in 0..800 {
        let r = claim(&format!("k{i}"), b"x");
        assert!(matches!(
            ledger.claim(&r).await.unwrap(),
            Claim::Acquired(_)
        ));
    }
    let sizes: Vec<usize> = ledger.inner.records.iter().map(|s| lock(s).len()).collect();
    assert!(sizes.iter().all(|&n| n > 50), "uneven shards: {sizes:?}");
    assert_eq!(ledger.len(), 800);
}

#[tokio::test]
async fn durations_too_long_for_an_instant_saturate_instead_of_panicking() {
    let ledger = MemoryLedger::new();
    let mut r = claim("forever", b"x");
    (r.lease, r.retention) = (Duration::MAX, Duration::MAX);
    let Claim::Acquired(lease) = ledger.claim(&r).await.unwrap() else {
        panic!("expected a fresh claim")
    };
    ledger
        .renew(&r.key, lease.token, Duration::MAX)
        .await
        .unwrap();
    let stored = StoredResponse {
        status: http::StatusCode::OK,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::new(),
        body_omitted: false,
    };
    ledger
        .complete(&r.key, lease.token, &stored, Duration::MAX)
        .await
        .unwrap();
    assert_eq!(ledger.purge_expired(10).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn purge_bounds_memory_and_forgets_operations() {
    let ledger = MemoryLedger::new();
    let mut r = claim("k", b"x");
    r.retention = Duration::from_secs(1);
    let Claim::Acquired(lease) = ledger.claim(&r).await.unwrap() else {
        panic!("expected a fresh claim")
    };
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(ledger.purge_expired(10).await.unwrap(), 1);
    assert!(ledger.is_empty());
    assert!(
        ledger
            .operation(&r.scope, lease.operation_id)
            .await
            .unwrap()
            .is_none()
    );
    let ops: usize = ledger.inner.operations.iter().map(|s| lock(s).len()).sum();
    assert_eq!(ops, 0);
}
