//! The operator calls: inspect, stuck, force_release and evict.

use std::time::Duration;

use http::StatusCode;

use super::support::{LONG, acquire, assert_lease_lost, long, request, sample_response};
use crate::{Ledger, LedgerError};

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
    // Long enough that the first `stuck` below runs before any lapses, even on a ledger whose
    // `stuck` scans (Redis) on a busy machine.
    let short = Duration::from_millis(1500);
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
    tokio::time::sleep(Duration::from_millis(1700)).await;

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
