//! The checks themselves: one public async function per rule of the [`Ledger`] contract.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Barrier;

use crate::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Lease, Ledger, LedgerError, LedgerKey,
    RecordState, ScopeDigest, StoredResponse,
};

/// A lease long enough never to expire during a check.
const LONG: Duration = Duration::from_secs(60);

fn request(
    key: &str,
    scope: &str,
    body: &str,
    lease: Duration,
    retention: Duration,
) -> ClaimRequest {
    let parsed = IdempotencyKey::parse(key.as_bytes()).expect("test keys are valid");
    ClaimRequest::new(
        LedgerKey::new(scope.as_bytes(), &parsed),
        ScopeDigest::new(scope.as_bytes()),
        Fingerprint::of(body.as_bytes()),
        lease,
        retention,
    )
}

fn long(key: &str) -> ClaimRequest {
    request(key, "scope", "body", LONG, Duration::from_secs(3600))
}

/// A response with a repeated header whose order matters.
pub fn sample_response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.append(header::VARY, HeaderValue::from_static("b"));
    headers.append(header::VARY, HeaderValue::from_static("a"));
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(body),
        body_omitted: false,
    }
}

async fn acquire<L: Ledger>(ledger: &L, request: &ClaimRequest) -> Lease {
    match ledger.claim(request).await.expect("claim failed") {
        Claim::Acquired(lease) => lease,
        Claim::Existing(existing) => panic!("expected to acquire the key, found {existing:?}"),
    }
}

async fn existing<L: Ledger>(ledger: &L, request: &ClaimRequest) -> crate::Existing {
    match ledger.claim(request).await.expect("claim failed") {
        Claim::Existing(existing) => existing,
        Claim::Acquired(lease) => panic!("expected an existing record, acquired {lease:?}"),
    }
}

fn assert_lease_lost(result: Result<(), LedgerError>, what: &str) {
    match result {
        Err(LedgerError::LeaseLost) => {}
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}

/// How many claims race in the race checks.
const RACERS: usize = 64;

/// `RACERS` tasks claim `key` at once, released together by a barrier; how many acquired it
/// (the others must all see it in progress).
async fn race<L: Ledger>(ledger: Arc<L>, key: &'static str) -> usize {
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|_| {
            let (ledger, barrier) = (ledger.clone(), barrier.clone());
            tokio::spawn(async move {
                let request = long(key);
                barrier.wait().await;
                ledger.claim(&request).await.expect("claim failed")
            })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("task panicked") {
            Claim::Acquired(_) => acquired += 1,
            Claim::Existing(e) => assert_eq!(e.state, RecordState::InProgress),
        }
    }
    acquired
}

/// 64 tasks claim one absent key at once, released together by a barrier: exactly one acquires
/// it; the other 63 see it in progress.
pub async fn concurrent_claims_have_one_winner<L: Ledger>(ledger: L) {
    let acquired = race(Arc::new(ledger), "race").await;
    assert_eq!(
        acquired, 1,
        "exactly one of {RACERS} concurrent claims of an absent key must win"
    );
}

/// 64 tasks race to take over one key whose lease lapsed: exactly one takes it over.
pub async fn concurrent_takeovers_have_one_winner<L: Ledger>(ledger: L) {
    let ledger = Arc::new(ledger);
    let dead = request(
        "race",
        "scope",
        "body",
        Duration::from_millis(200),
        Duration::from_secs(3600),
    );
    acquire(&*ledger, &dead).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acquired = race(ledger, "race").await;
    assert_eq!(
        acquired, 1,
        "exactly one of {RACERS} concurrent takeovers of a lapsed lease must win"
    );
}

/// 64 tasks race to claim one key whose completed record expired: exactly one claims it.
pub async fn concurrent_claims_of_an_expired_record_have_one_winner<L: Ledger>(ledger: L) {
    let ledger = Arc::new(ledger);
    let first = long("race");
    let lease = acquire(&*ledger, &first).await;
    let response = sample_response(b"old");
    let retention = Duration::from_millis(200);
    ledger
        .complete(&first.key, lease.token, &response, retention)
        .await
        .expect("complete failed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acquired = race(ledger, "race").await;
    assert_eq!(
        acquired, 1,
        "exactly one of {RACERS} concurrent claims of an expired record must win"
    );
}

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

/// A wait on a record that is already completed returns at once: nothing will change it again,
/// so a ledger that subscribes and sleeps would hold a `Wait` duplicate for its whole timeout.
pub async fn a_wait_on_a_completed_record_returns_at_once<L: Ledger>(ledger: L) {
    let first = long("k");
    let lease = acquire(&ledger, &first).await;
    ledger
        .complete(&first.key, lease.token, &sample_response(b"ok"), LONG)
        .await
        .expect("complete failed");
    // Far below the wait's own timeout: only a missed completion can take this long.
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        ledger.wait_for_change(&first.key, Duration::from_secs(600)),
    );
    assert!(
        waited.await.is_ok(),
        "the wait on a completed record did not return"
    );
}

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

/// Purge deletes every expired record (completed or abandoned), in batches smaller than their
/// number, and nothing else. A ledger whose backend expires records by itself
/// ([`Ledger::expires_records_itself`]) purges nothing, and its expired records are gone too.
pub async fn purge_deletes_only_expired<L: Ledger>(ledger: L) {
    let short = Duration::from_millis(200);
    for i in 0..7 {
        let r = request(&format!("done-{i}"), "s", "b", LONG, LONG);
        let lease = acquire(&ledger, &r).await;
        ledger
            .complete(&r.key, lease.token, &sample_response(b"x"), short)
            .await
            .expect("complete");
    }
    for i in 0..3 {
        // Abandoned claims: never completed, expired by their retention.
        acquire(
            &ledger,
            &request(&format!("abandoned-{i}"), "s", "b", short, short),
        )
        .await;
    }
    let kept = request("kept", "s", "b", LONG, LONG);
    let lease = acquire(&ledger, &kept).await;
    ledger
        .complete(&kept.key, lease.token, &sample_response(b"kept"), LONG)
        .await
        .expect("complete");
    let live = request("live", "s", "b", LONG, LONG);
    acquire(&ledger, &live).await;

    tokio::time::sleep(Duration::from_millis(600)).await;
    if ledger.expires_records_itself() {
        // The backend deleted them at their deadline: nothing is left to scan.
        assert_eq!(ledger.purge_expired(3).await.expect("purge failed"), 0);
    } else {
        assert_eq!(ledger.purge_expired(3).await.expect("purge failed"), 10);
        assert_eq!(ledger.purge_expired(3).await.expect("purge failed"), 0);
    }
    // Either way they are gone: each key is claimed afresh, with no takeover.
    for key in ["done-0", "abandoned-0"] {
        let fresh = request(key, "s", "b", LONG, LONG);
        let lease = acquire(&ledger, &fresh).await;
        assert!(!lease.taken_over, "{key} was still there after purge");
        assert_eq!(lease.operation_id, fresh.operation_id);
    }
    assert_eq!(
        existing(&ledger, &request("kept", "s", "b", LONG, LONG))
            .await
            .state,
        RecordState::Completed(sample_response(b"kept"))
    );
    assert_eq!(
        existing(&ledger, &request("live", "s", "b", LONG, LONG))
            .await
            .state,
        RecordState::InProgress
    );
}

/// A 1 MiB body of every byte value and repeated headers round-trip byte for byte.
pub async fn large_binary_response_round_trips<L: Ledger>(ledger: L) {
    let body: Vec<u8> = (0..(1usize << 20))
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect();
    let mut headers = HeaderMap::new();
    for v in ["z=1", "a=2", "m=3"] {
        headers.append(header::SET_COOKIE, HeaderValue::from_static(v));
    }
    headers.append(
        "x-binary",
        HeaderValue::from_bytes(&[0x80, 0xff, b' ', b'~']).expect("opaque bytes"),
    );
    headers.append(header::LINK, HeaderValue::from_static("<a>"));
    headers.append(header::LINK, HeaderValue::from_static("<b>"));
    let response = StoredResponse {
        status: StatusCode::from_u16(299).expect("a valid status"),
        headers,
        body: Bytes::from(body),
        body_omitted: false,
    };
    let first = long("big");
    let lease = acquire(&ledger, &first).await;
    ledger
        .complete(&first.key, lease.token, &response, LONG)
        .await
        .expect("complete failed");
    let RecordState::Completed(found) = existing(&ledger, &long("big")).await.state else {
        panic!("expected the completed record")
    };
    assert_eq!(found.status, response.status);
    assert_eq!(found.body, response.body, "body bytes differ");
    let order = |h: &HeaderMap| {
        h.iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        order(&found.headers),
        order(&response.headers),
        "headers or their order differ"
    );

    let omitted = StoredResponse {
        body: Bytes::new(),
        body_omitted: true,
        ..sample_response(b"")
    };
    let second = long("omitted");
    let lease = acquire(&ledger, &second).await;
    ledger
        .complete(&second.key, lease.token, &omitted, LONG)
        .await
        .expect("complete failed");
    assert_eq!(
        existing(&ledger, &long("omitted")).await.state,
        RecordState::Completed(omitted)
    );
}

/// A waiter on an in-progress key returns once the key completes, and the completion is then
/// visible. (It may return early; it must not miss the completion for its whole timeout, which
/// the layer's Wait tests check end to end.)
pub async fn waiters_see_completion<L: Ledger>(ledger: L) {
    let ledger = Arc::new(ledger);
    let first = long("k");
    let lease = acquire(&*ledger, &first).await;
    let waiter = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            loop {
                ledger
                    .wait_for_change(&long("k").key, Duration::from_secs(10))
                    .await;
                if let RecordState::Completed(r) = existing(&*ledger, &long("k")).await.state {
                    return r;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = sample_response(b"done");
    ledger
        .complete(&first.key, lease.token, &response, LONG)
        .await
        .expect("complete failed");
    // Bounded so that a completion the waiter never sees fails the check instead of hanging it.
    let seen = tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the waiter never saw the completion");
    assert_eq!(seen.expect("waiter panicked"), response);
}

/// How far a ledger's clock (a database's, Redis's) may be from this machine's in the checks
/// of reported times.
const SKEW: Duration = Duration::from_secs(5);

fn near(at: std::time::SystemTime, expected: std::time::SystemTime, what: &str) {
    let off = at
        .duration_since(expected)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or_default();
    assert!(
        off <= SKEW,
        "{what}: reported {at:?}, expected about {expected:?}"
    );
}

/// `inspect` reports nothing for an absent key, then the claim (token, operation id,
/// fingerprint, scope, a live lease), then the completion (status and body size; the body only
/// when asked for).
pub async fn inspect_reports_each_state<L: Ledger>(ledger: L) {
    use std::time::SystemTime;

    use crate::Progress;

    let req = long("inspected");
    assert_eq!(ledger.inspect(&req.key, true).await.expect("inspect"), None);
    let lease = acquire(&ledger, &req).await;
    let now = SystemTime::now();
    let info = ledger
        .inspect(&req.key, false)
        .await
        .expect("inspect")
        .expect("a claimed record is found");
    assert_eq!(info.key, req.key);
    assert_eq!(info.scope, req.scope);
    assert_eq!(info.fingerprint, req.fingerprint);
    assert_eq!(info.operation_id, lease.operation_id);
    near(info.expires_at, now + Duration::from_secs(3600), "expiry");
    match info.progress {
        Progress::InProgress {
            token,
            lease_until,
            lease_lapsed,
        } => {
            assert_eq!(token, lease.token, "the holder's token");
            assert!(!lease_lapsed, "a live lease is not lapsed");
            near(lease_until, now + LONG, "lease deadline");
        }
        other => panic!("expected in progress, got {other:?}"),
    }
    assert_eq!(info.token(), Some(lease.token));

    let response = sample_response(b"{\"id\":7}");
    ledger
        .complete(&req.key, lease.token, &response, Duration::from_secs(600))
        .await
        .expect("complete");
    let info = ledger
        .inspect(&req.key, false)
        .await
        .expect("inspect")
        .expect("a completed record is found");
    near(
        info.expires_at,
        SystemTime::now() + Duration::from_secs(600),
        "expiry after completion",
    );
    assert_eq!(info.token(), None);
    assert_eq!(
        info.progress,
        Progress::Completed {
            status: StatusCode::CREATED,
            body_len: 8,
            body_omitted: false,
            response: None,
        },
        "no body unless asked for"
    );
    let with_body = ledger
        .inspect(&req.key, true)
        .await
        .expect("inspect")
        .expect("found");
    match with_body.progress {
        Progress::Completed {
            response: Some(stored),
            ..
        } => assert_eq!(stored, response),
        other => panic!("expected the stored response, got {other:?}"),
    }
    // Another scope's record under the same raw key is another key.
    let other = request("inspected", "other scope", "body", LONG, LONG);
    assert_eq!(
        ledger.inspect(&other.key, false).await.expect("inspect"),
        None
    );
}

/// `stuck` lists live claims whose lease lapsed (longest lapsed first, up to `limit`), and
/// neither live leases nor completed records; `older_than` filters by how long ago it lapsed.
///
/// A ledger that does not offer `stuck` (it returns [`LedgerError::Unsupported`], as
/// `RedisLedger` on a Cluster does) passes, after saying so.
pub async fn stuck_lists_lapsed_claims<L: Ledger>(ledger: L) {
    if let Err(LedgerError::Unsupported { .. }) = ledger.stuck(Duration::ZERO, 1).await {
        eprintln!("{}: `stuck` is not supported; skipped", ledger.name());
        return;
    }
    let short = Duration::from_millis(200);
    let first = request("stuck-1", "scope", "body", short, LONG);
    let second = request("stuck-2", "scope", "body", short, LONG);
    let live = long("stuck-live");
    let done = request("stuck-done", "scope", "body", short, LONG);
    acquire(&ledger, &first).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    acquire(&ledger, &second).await;
    acquire(&ledger, &live).await;
    let lease = acquire(&ledger, &done).await;
    ledger
        .complete(&done.key, lease.token, &sample_response(b"x"), LONG)
        .await
        .expect("complete");
    assert!(
        ledger
            .stuck(Duration::ZERO, 10)
            .await
            .expect("stuck")
            .is_empty(),
        "no lease has lapsed yet"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;

    let stuck = ledger.stuck(Duration::ZERO, 10).await.expect("stuck");
    let keys: Vec<_> = stuck.iter().map(|info| info.key).collect();
    assert_eq!(
        keys,
        [first.key, second.key],
        "lapsed claims, longest first"
    );
    assert!(stuck.iter().all(|info| matches!(
        info.progress,
        crate::Progress::InProgress {
            lease_lapsed: true,
            ..
        }
    )));
    let limited = ledger.stuck(Duration::ZERO, 1).await.expect("stuck");
    assert_eq!(limited.len(), 1, "limit is kept");
    assert!(
        ledger.stuck(LONG, 10).await.expect("stuck").is_empty(),
        "none lapsed a minute ago"
    );
}

/// `force_release` frees a claim whose holder is gone, but only with the token `inspect`
/// showed: a wrong token, or one whose lease was taken over, writes nothing.
pub async fn force_release_is_fenced<L: Ledger>(ledger: L) {
    let short = Duration::from_millis(200);
    let req = request("forced", "scope", "body", short, LONG);
    let first = acquire(&ledger, &req).await;
    assert_lease_lost(
        ledger
            .force_release(&req.key, crate::FencingToken::new())
            .await,
        "a token that never held the key",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A takeover (a retry after the crash) makes the token seen earlier stale.
    let retry = request("forced", "scope", "body", short, LONG);
    let second = acquire(&ledger, &retry).await;
    assert_lease_lost(
        ledger.force_release(&req.key, first.token).await,
        "a token whose lease was taken over",
    );
    let seen = ledger
        .inspect(&req.key, false)
        .await
        .expect("inspect")
        .expect("the record is still there")
        .token()
        .expect("in progress");
    assert_eq!(seen, second.token);
    tokio::time::sleep(Duration::from_millis(300)).await;
    ledger
        .force_release(&req.key, seen)
        .await
        .expect("the current token releases a lapsed claim");
    assert_eq!(
        ledger.inspect(&req.key, false).await.expect("inspect"),
        None
    );
    // The key is free: even another fingerprint may claim it now.
    let other = request("forced", "scope", "another body", LONG, LONG);
    let fresh = acquire(&ledger, &other).await;
    assert!(!fresh.taken_over, "a fresh record, not a takeover");
}

/// `evict` deletes a record in any state and says whether there was one; the holder of an
/// evicted claim finds its lease lost, and the operation is gone.
pub async fn evict_deletes_any_state<L: Ledger>(ledger: L) {
    let req = long("evicted");
    assert!(
        !ledger.evict(&req.key).await.expect("evict"),
        "nothing to evict"
    );
    let lease = acquire(&ledger, &req).await;
    ledger
        .complete(&req.key, lease.token, &sample_response(b"bad"), LONG)
        .await
        .expect("complete");
    assert!(
        ledger.evict(&req.key).await.expect("evict"),
        "a completed record"
    );
    assert_eq!(
        ledger.inspect(&req.key, false).await.expect("inspect"),
        None
    );
    assert_eq!(
        ledger
            .operation(&req.scope, lease.operation_id)
            .await
            .expect("operation"),
        None
    );
    let again = long("evicted");
    let held = acquire(&ledger, &again).await;
    assert_ne!(held.operation_id, lease.operation_id, "a new operation");
    assert!(
        ledger.evict(&req.key).await.expect("evict"),
        "an in-progress record"
    );
    assert_lease_lost(
        ledger
            .complete(&req.key, held.token, &sample_response(b"late"), LONG)
            .await,
        "completing an evicted claim",
    );
    assert!(
        !ledger.evict(&req.key).await.expect("evict"),
        "already gone"
    );
}
