//! The race checks: 64 claims of one key at once, released together by a barrier.

use std::{sync::Arc, time::Duration};

use tokio::sync::Barrier;

use super::support::{acquire, long, request, sample_response};
use crate::{Claim, Ledger, RecordState};

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
