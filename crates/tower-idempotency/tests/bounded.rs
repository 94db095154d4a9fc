//! Bounded waits (SEMANTICS.md §8): a stalled or hung ledger, the renewal ceiling, the in-flight
//! cap and the drain. Time is tokio's paused clock where the ledger is the memory one, so a
//! "1.5 s handler" costs no wall time and the trials run in a blink.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use support::*;
use tower_idempotency::IdempotencyLayer;

/// Issue 12's reproduction: the first renewal never answers. Lease 300 ms, handler 1.5 s, a retry
/// at 700 ms. Before renewals were bounded, no later renewal was sent, the lease lapsed at
/// 300 ms, and the retry ran the handler a second time.
#[tokio::test(start_paused = true)]
async fn a_stalled_renewal_never_runs_a_live_handler_twice() {
    for trial in 0..100 {
        let ledger = Faulty::default();
        ledger.faults().stall_next(Op::Renew, 1);
        let runs = Runs::default();
        let layer = IdempotencyLayer::builder(ledger.clone())
            .with_lease(Duration::from_millis(300))
            .build()
            .unwrap();
        let app = payments(runs.clone(), Duration::from_millis(1500)).layer(layer);
        let key = format!("stalled-{trial}");
        let first = tokio::spawn({
            let (app, key) = (app.clone(), key.clone());
            async move { send(&app, pay(&key, "{}")).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (retry, _) = send(&app, pay(&key, "{}")).await;
        assert_eq!(
            retry.status(),
            StatusCode::CONFLICT,
            "trial {trial}: the retry took the key over from a live handler"
        );
        let (first, _) = first.await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED, "trial {trial}");
        assert_eq!(runs.get(), 1, "trial {trial}: the handler ran twice");
        assert!(
            ledger.faults().calls(Op::Renew) >= 2,
            "trial {trial}: renewal was retried"
        );
    }
}
