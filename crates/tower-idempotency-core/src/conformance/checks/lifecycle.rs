//! A record's life: claim, complete, fencing of stale tokens, takeover of a lapsed lease,
//! renewal, release and retention.

use std::time::Duration;

use super::support::{LONG, acquire, assert_lease_lost, existing, long, request, sample_response};
use crate::{Ledger, RecordState};

/// A live claim is reported in progress with its fingerprint and operation id, to a claim with
/// the same fingerprint and to one with another.
pub async fn live_claim_is_in_progress<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    assert!(!lease.taken_over);
    assert_eq!(lease.operation_id, first.operation_id);
    let again = existing(&ledger, &long("k")).await;
    assert_eq!(again.state, RecordState::InProgress);
    assert_eq!(again.fingerprint, first.fingerprint);
    assert_eq!(again.operation_id, first.operation_id);
    let other = request("k", "scope", "other body", LONG, Duration::from_secs(3600));
    let mismatch = existing(&ledger, &other).await;
    assert_eq!(
        mismatch.fingerprint, first.fingerprint,
        "the stored fingerprint is reported"
    );
}

/// After complete, a claim returns the stored response, exactly.
pub async fn completed_claim_returns_response<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    let response = sample_response(br#"{"id":1}"#);
    ledger
        .complete(
            &first.key,
            lease.token,
            &response,
            Duration::from_secs(3600),
        )
        .await
        .expect("complete failed");
    let found = existing(&ledger, &long("k")).await;
    assert_eq!(found.operation_id, first.operation_id);
    assert_eq!(found.fingerprint, first.fingerprint);
    assert_eq!(found.state, RecordState::Completed(response));
}

/// Complete, release and renew with a wrong token write nothing; a completed record is never
/// overwritten, not even by its own token.
pub async fn wrong_token_is_fenced<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    let stranger = crate::FencingToken::new();
    let response = sample_response(b"first");
    assert_lease_lost(
        ledger.complete(&first.key, stranger, &response, LONG).await,
        "complete with a stranger's token",
    );
    assert_lease_lost(
        ledger.release(&first.key, stranger).await,
        "release with a stranger's token",
    );
    assert_lease_lost(
        ledger.renew(&first.key, stranger, LONG).await,
        "renew with a stranger's token",
    );
    assert_eq!(
        existing(&ledger, &long("k")).await.state,
        RecordState::InProgress
    );

    ledger
        .complete(&first.key, lease.token, &response, LONG)
        .await
        .expect("complete failed");
    assert_lease_lost(
        ledger
            .complete(&first.key, lease.token, &sample_response(b"second"), LONG)
            .await,
        "a second complete",
    );
    assert_lease_lost(
        ledger.release(&first.key, lease.token).await,
        "release after complete",
    );
    assert_eq!(
        existing(&ledger, &long("k")).await.state,
        RecordState::Completed(response)
    );
    let absent = long("never-claimed");
    assert_lease_lost(
        ledger.release(&absent.key, lease.token).await,
        "release of an absent key",
    );
}

/// A lease that expires is taken over by a claim with the same fingerprint, keeping the operation
/// id; the old holder can then neither complete, release nor renew, and the new holder's result
/// is the one stored.
pub async fn expired_lease_is_taken_over_and_fenced<L: Ledger>(ledger: L) {
    let short = request(
        "k",
        "scope",
        "body",
        Duration::from_millis(300),
        Duration::from_secs(3600),
    );
    let old = acquire(&ledger, &short).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let retry = long("k");
    let new = acquire(&ledger, &retry).await;
    assert!(new.taken_over, "the claim took over an expired lease");
    assert_eq!(
        new.operation_id, old.operation_id,
        "a takeover keeps the operation id"
    );
    assert_ne!(new.token, old.token);

    assert_lease_lost(
        ledger
            .complete(&short.key, old.token, &sample_response(b"stale"), LONG)
            .await,
        "complete by the old holder",
    );
    assert_lease_lost(
        ledger.renew(&short.key, old.token, LONG).await,
        "renew by the old holder",
    );
    assert_lease_lost(
        ledger.release(&short.key, old.token).await,
        "release by the old holder",
    );
    assert_eq!(
        existing(&ledger, &long("k")).await.state,
        RecordState::InProgress
    );

    let fresh = sample_response(b"new holder");
    ledger
        .complete(&retry.key, new.token, &fresh, LONG)
        .await
        .expect("complete failed");
    assert_eq!(
        existing(&ledger, &long("k")).await.state,
        RecordState::Completed(fresh)
    );
}

/// An expired lease is not taken over by a request with another fingerprint.
pub async fn takeover_requires_same_fingerprint<L: Ledger>(ledger: L) {
    let short = request(
        "k",
        "scope",
        "body",
        Duration::from_millis(300),
        Duration::from_secs(3600),
    );
    acquire(&ledger, &short).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let other = request("k", "scope", "other", LONG, Duration::from_secs(3600));
    let found = existing(&ledger, &other).await;
    assert_eq!(found.fingerprint, short.fingerprint);
}

/// Renewing a lease keeps it from being taken over past its first deadline, and keeps the
/// record alive past its retention (here equal to the lease, the tightest valid setting).
pub async fn renewal_prevents_takeover<L: Ledger>(ledger: L) {
    let lease_len = Duration::from_millis(1000);
    let first = request("k", "scope", "body", lease_len, lease_len);
    let lease = acquire(&ledger, &first).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    ledger
        .renew(&first.key, lease.token, lease_len)
        .await
        .expect("renew failed");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // 1.2 s after the claim: past the first deadline, within the renewed one.
    assert_eq!(
        existing(&ledger, &long("k")).await.state,
        RecordState::InProgress
    );
    ledger
        .complete(&first.key, lease.token, &sample_response(b"ok"), LONG)
        .await
        .expect("the renewed holder can still complete");
}

/// Release deletes the claim: the next claim acquires the key afresh.
pub async fn release_frees_the_key<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    ledger
        .release(&first.key, lease.token)
        .await
        .expect("release failed");
    let again = long("k");
    let second = acquire(&ledger, &again).await;
    assert!(!second.taken_over);
    assert_eq!(
        second.operation_id, again.operation_id,
        "a released key starts a new operation"
    );
}

/// A completed record is replayed within its retention and treated as absent after it.
pub async fn retention_expires_records<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    ledger
        .complete(
            &first.key,
            lease.token,
            &sample_response(b"ok"),
            Duration::from_millis(300),
        )
        .await
        .expect("complete failed");
    assert!(matches!(
        existing(&ledger, &long("k")).await.state,
        RecordState::Completed(_)
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let next = long("k");
    let lease = acquire(&ledger, &next).await;
    assert!(!lease.taken_over);
    assert_eq!(lease.operation_id, next.operation_id);
}
