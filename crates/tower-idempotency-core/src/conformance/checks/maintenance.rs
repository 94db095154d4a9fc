//! Purging expired records, waits on a key, and a large response's round trip.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::support::{LONG, acquire, existing, long, request, sample_response};
use crate::{Ledger, RecordState, StoredResponse};

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
