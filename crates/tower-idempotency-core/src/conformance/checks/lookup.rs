//! What a lookup reports: scopes, the operation lookup, a completed record's expiry and an
//! abandoned claim.

use std::time::Duration;

use super::support::{LONG, acquire, existing, long, request, sample_response};
use crate::{Ledger, RecordState, ScopeDigest};

/// A claim that finds a completed record reports how long the record has left
/// ([`crate::Existing::expires_in`]): at most its retention, and more than nothing. A replay
/// cache in front of the ledger serves the record no longer than that.
pub async fn a_completed_record_reports_its_expiry<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    let retention = Duration::from_secs(600);
    ledger
        .complete(&first.key, lease.token, &sample_response(b"ok"), retention)
        .await
        .expect("complete failed");
    let found = existing(&ledger, &long("k")).await;
    let left = found
        .expires_in
        .expect("the ledger did not report the record's expiry");
    assert!(
        left <= retention && left > Duration::from_secs(500),
        "a record completed with {retention:?} of retention reported {left:?} left"
    );
}

/// The same key in two scopes is two records.
pub async fn scopes_are_separate<L: Ledger>(ledger: L) {
    let a = request("k", "tenant-a", "body", LONG, LONG);
    let b = request("k", "tenant-b", "body", LONG, LONG);
    let lease_a = acquire(&ledger, &a).await;
    let lease_b = acquire(&ledger, &b).await;
    assert_ne!(lease_a.operation_id, lease_b.operation_id);
}

/// An operation is found by its own scope (in progress, then completed) and by no other.
pub async fn operation_lookup_is_scoped<L: Ledger>(ledger: L) {
    let first = request("k", "tenant-a", "body", LONG, LONG);
    let lease = acquire(&ledger, &first).await;
    let own = ScopeDigest::new(b"tenant-a");
    let other = ScopeDigest::new(b"tenant-b");
    let id = lease.operation_id;
    assert_eq!(
        ledger.operation(&own, id).await.expect("lookup"),
        Some(RecordState::InProgress)
    );
    assert_eq!(ledger.operation(&other, id).await.expect("lookup"), None);
    let response = sample_response(b"done");
    ledger
        .complete(&first.key, lease.token, &response, LONG)
        .await
        .expect("complete failed");
    assert_eq!(
        ledger.operation(&own, id).await.expect("lookup"),
        Some(RecordState::Completed(response))
    );
    assert_eq!(ledger.operation(&other, id).await.expect("lookup"), None);
    assert_eq!(
        ledger
            .operation(&own, uuid::Uuid::new_v4())
            .await
            .expect("lookup"),
        None
    );
}

/// A claim whose lease lapsed (its holder crashed) is reported abandoned by the operation
/// lookup, not in progress until retention ends; once taken over it is in progress again.
pub async fn a_lapsed_lease_is_reported_abandoned<L: Ledger>(ledger: L) {
    let short = request("k", "scope", "body", Duration::from_millis(300), LONG);
    let lease = acquire(&ledger, &short).await;
    let scope = ScopeDigest::new(b"scope");
    let id = lease.operation_id;
    assert_eq!(
        ledger.operation(&scope, id).await.expect("lookup"),
        Some(RecordState::InProgress),
        "a live lease is in progress"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        ledger.operation(&scope, id).await.expect("lookup"),
        Some(RecordState::Abandoned),
        "a lapsed lease is abandoned"
    );
    let retry = acquire(&ledger, &long("k")).await;
    assert!(retry.taken_over);
    assert_eq!(
        ledger.operation(&scope, id).await.expect("lookup"),
        Some(RecordState::InProgress),
        "a taken-over lease is in progress again"
    );
}
