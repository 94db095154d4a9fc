//! Bounded waits (SEMANTICS.md §8): a stalled or hung ledger, the renewal ceiling, the in-flight
//! cap and the drain. Time is tokio's paused clock where the ledger is the memory one, so a
//! "1.5 s handler" costs no wall time and the trials run in a blink.

mod support;

use std::time::Duration;

use axum::{body::Body, http::Request, http::StatusCode};
use support::*;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_idempotency::{CircuitBreaker, IdempotencyLayer};

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

/// A ledger call is bounded by a timer armed only when the call first waits: one answered at
/// its first poll (a `MemoryLedger`, a `CachedLedger` hit) creates none. Shown on a runtime
/// without tokio's timer, where creating one panics ("timers are disabled"): the replay there is
/// served. Before, every call created its timer up front (a clock read and a clone of the
/// runtime's shared handle, 0.6 % of a cached replay's server CPU), and this test panicked. The
/// timer still fires for a call that waits: the tests above and below with hung ledgers.
#[test]
fn a_ledger_call_answered_at_once_arms_no_timer() {
    let runs = Runs::default();
    let app = payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(
        tower_idempotency::CachedLedger::new(tower_idempotency::MemoryLedger::new()),
    ));
    let timed = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // The first request runs its handler, whose lease renewal needs the timer; its replay is
    // the first claim to find the completed record, and caches it.
    for _ in 0..2 {
        let (response, _) = timed.block_on(send(&app, pay("no-timer", "{}")));
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let untimed = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (replay, body) = untimed.block_on(send(&app, pay("no-timer", "{}")));
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert!(is_replay(&replay), "{body:?}");
    let (reused, body) = untimed.block_on(send(&app, pay("no-timer", r#"{"other":1}"#)));
    assert_problem(&reused, &body, 422, "key-reused", "no-timer");
    assert_eq!(runs.get(), 1);
}

/// A faulty memory ledger's switches, a handler-run counter, and the payments app behind a layer
/// with a 30 s lease and a 500 ms ledger timeout.
fn lease_30s_timeout_500ms() -> (
    std::sync::Arc<tower_idempotency_core::conformance::Faults>,
    Runs,
    axum::Router,
) {
    let ledger = Faulty::default();
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_secs(30))
        .with_ledger_timeout(Duration::from_millis(500))
        .build()
        .expect("valid settings");
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    (ledger.faults(), runs, app)
}

/// The claim took effect in the ledger but its answer came after the layer's ledger timeout (a
/// slow round trip, a Redis Cluster's index write): the request is answered 503, and the key
/// must not stay claimed with no handler, or every retry would get 409 until the lease lapsed.
/// The layer gives it back (fenced by the claim's token), so the retry runs the handler, once.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_after_the_ledger_timeout_does_not_strand_the_key() {
    let (faults, runs, app) = lease_30s_timeout_500ms();
    faults.delay_answers(Op::Claim, Duration::from_millis(800));
    let (first, _) = send(&app, pay("slow-claim", "{}")).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    faults.delay_answers(Op::Claim, Duration::ZERO);
    // Well inside the 30 s lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (retry, body) = send(&app, pay("slow-claim", "{}")).await;
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "the key stayed claimed by the timed-out claim: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(runs.get(), 1);
}

/// The claim was still queued in the ledger when the layer stopped waiting (a statement behind a
/// lock, a slow disk) and took effect only after the layer's first release had found nothing:
/// the layer tries the release again while the lease lasts, so a retry well inside the lease runs
/// the handler, once, instead of getting 409 until the lease lapses.
#[tokio::test(start_paused = true)]
async fn a_claim_that_takes_effect_after_its_release_does_not_strand_the_key() {
    let (faults, runs, app) = lease_30s_timeout_500ms();
    faults.delay_claim_effects(Duration::from_millis(800));
    let (first, _) = send(&app, pay("late-claim", "{}")).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    faults.delay_claim_effects(Duration::ZERO);
    // The claim took effect at 800 ms, after the release at 500 ms; well inside the 30 s lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (retry, body) = send(&app, pay("late-claim", "{}")).await;
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "the key stayed claimed by the late claim: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(runs.get(), 1);
    // A claim that never takes effect costs a few releases while the lease lasts, not more.
    faults.stall_next(Op::Claim, 1);
    let (stalled, _) = send(&app, pay("never", "{}")).await;
    assert_eq!(stalled.status(), StatusCode::SERVICE_UNAVAILABLE);
    let before = faults.calls(Op::Release);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let releases = faults.calls(Op::Release) - before;
    // At 0.5 s (the timeout), then 1, 2, 4, 8 and 16 s later; the next would be past 30 s.
    assert!((1..=7).contains(&releases), "{releases} releases");
}

/// Every claim hangs: each covered request is answered 503 within the ledger timeout, the breaker
/// opens after 3 of them and later requests do not touch the ledger; once the ledger answers
/// again, the half-open probe closes the breaker and requests succeed.
#[tokio::test(start_paused = true)]
async fn a_hung_ledger_answers_503_in_time_and_opens_the_breaker_until_a_probe_succeeds() {
    let ledger = Faulty::default();
    let faults = ledger.faults();
    faults.stall_next(Op::Claim, usize::MAX);
    let runs = Runs::default();
    let timeout = Duration::from_millis(500);
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_secs(3))
        .with_ledger_timeout(timeout)
        .with_circuit_breaker(CircuitBreaker {
            failures: 3,
            open_for: Duration::from_secs(2),
        })
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(10)).layer(layer);
    for i in 0..3 {
        let started = Instant::now();
        let (response, body) = send(&app, pay(&format!("hung-{i}"), "{}")).await;
        assert!(started.elapsed() <= timeout + Duration::from_millis(100));
        assert_problem(&response, &body, 503, "ledger-unavailable", "");
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(faults.calls(Op::Claim), 3);
    // Open: refused at once, without a ledger call.
    for i in 0..5 {
        let started = Instant::now();
        let (response, body) = send(&app, pay(&format!("open-{i}"), "{}")).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_problem(&response, &body, 503, "ledger-unavailable", "");
    }
    assert_eq!(
        faults.calls(Op::Claim),
        3,
        "the open breaker touched the ledger"
    );
    assert_eq!(runs.get(), 0, "a handler ran without a claim");

    // The ledger answers again; after open_for, one probe closes the breaker.
    faults.stall_next(Op::Claim, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (response, _) = send(&app, pay("after-1", "{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (response, _) = send(&app, pay("after-2", "{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

/// A probe that fails opens the breaker again for another `open_for`.
#[tokio::test(start_paused = true)]
async fn a_failed_probe_keeps_the_breaker_open() {
    let ledger = Faulty::default();
    let faults = ledger.faults();
    faults.fail_all(true);
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_circuit_breaker(CircuitBreaker {
            failures: 2,
            open_for: Duration::from_secs(1),
        })
        .build()
        .unwrap();
    let app = payments(Runs::default(), Duration::ZERO).layer(layer);
    for i in 0..4 {
        let (response, _) = send(&app, pay(&format!("k{i}"), "{}")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(faults.calls(Op::Claim), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&app, pay("probe", "{}")).await;
    assert_eq!(faults.calls(Op::Claim), 3, "one probe");
    send(&app, pay("refused", "{}")).await;
    assert_eq!(
        faults.calls(Op::Claim),
        3,
        "open again after the failed probe"
    );
}

/// Max handler time 500 ms, lease 300 ms, handler 1.5 s: renewals stop at the ceiling, the lease
/// lapses, and a retry after it takes the key over (which a renewed lease would have refused,
/// as the stalled-renewal test shows).
#[tokio::test(start_paused = true)]
async fn renewals_stop_at_the_maximum_handler_time() {
    let ledger = Faulty::default();
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_millis(300))
        .with_max_handler_time(Duration::from_millis(500))
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(1500)).layer(layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("hung", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (early, _) = send(&app, pay("hung", "{}")).await;
    assert_eq!(
        early.status(),
        StatusCode::CONFLICT,
        "renewed before the ceiling"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let renewals = ledger.faults().calls(Op::Renew);
    let (retry, _) = send(&app, pay("hung", "{}")).await;
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "the retry took the key over"
    );
    assert_eq!(runs.get(), 2);
    first.await.unwrap();
    assert!((3..=5).contains(&renewals), "{renewals} renewals");
}

/// Cap 2, three concurrent slow requests: one gets 503 `overloaded` without a ledger call;
/// uncovered requests are not counted; a place frees up when a request finishes.
#[tokio::test(start_paused = true)]
async fn the_in_flight_cap_refuses_past_it() {
    let ledger = Faulty::default();
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_max_in_flight(2)
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(500))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .layer(layer);
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, pay(&format!("slow-{i}"), "{}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = app
        .clone()
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK, "uncovered requests pass");
    let (third, body) = send(&app, pay("third", "{}")).await;
    assert_problem(&third, &body, 503, "overloaded", "third");
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(ledger.faults().calls(Op::Claim), 2);
    for request in slow {
        assert_eq!(request.await.unwrap().0.status(), StatusCode::CREATED);
    }
    let (later, _) = send(&app, pay("third", "{}")).await;
    assert_eq!(later.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 3);
}

/// The drain: a request in flight finishes and is recorded, a handler whose client left is
/// waited for too, a new covered request gets 503 `shutting-down`, and the drain returns true
/// once both are recorded.
#[tokio::test(start_paused = true)]
async fn the_drain_waits_for_requests_in_flight_and_detached_handlers() {
    let ledger = Faulty::default();
    let faults = ledger.faults();
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(ledger.clone());
    let drain = layer.drain_handle();
    let app = payments(runs.clone(), Duration::from_secs(1)).layer(layer);
    let in_flight = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("in-flight", "{}")).await }
    });
    // This client leaves after 100 ms; its handler goes on in a task of its own.
    let left =
        tokio::time::timeout(Duration::from_millis(100), send(&app, pay("left", "{}"))).await;
    assert!(left.is_err());
    assert_eq!(drain.in_flight(), 2);
    let draining = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain(Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (refused, body) = send(&app, pay("new", "{}")).await;
    assert_problem(&refused, &body, 503, "shutting-down", "new");
    assert!(!draining.is_finished());
    assert!(draining.await.unwrap(), "the drain finished in time");
    assert_eq!(
        faults.calls(Op::Complete),
        2,
        "both results recorded before the drain returned"
    );
    assert_eq!(in_flight.await.unwrap().0.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
    assert_eq!(drain.in_flight(), 0);
}

/// A drain whose handler outlives the deadline says so.
#[tokio::test(start_paused = true)]
async fn the_drain_gives_up_at_its_deadline() {
    let layer = IdempotencyLayer::new(Faulty::default());
    let drain = layer.drain_handle();
    let app = payments(Runs::default(), Duration::from_secs(60)).layer(layer);
    let _slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("slow", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!drain.drain(Duration::from_secs(1)).await);
}

/// Exactly-once mode is not needed for this: a completion that times out is retried while the
/// lease lasts, not given up after three tries.
#[tokio::test(start_paused = true)]
async fn a_completion_that_times_out_is_retried_while_the_lease_lasts() {
    let ledger = Faulty::default();
    let faults = ledger.faults();
    faults.stall_next(Op::Complete, 5);
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_secs(30))
        .with_ledger_timeout(Duration::from_millis(200))
        .without_circuit_breaker()
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    let (first, _) = send(&app, pay("k", "{}")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(faults.calls(Op::Complete), 6);
    let (replay, _) = send(&app, pay("k", "{}")).await;
    assert!(is_replay(&replay));
    assert_eq!(runs.get(), 1);
}

#[test]
fn the_new_settings_are_validated() {
    use tower_idempotency::{ConfigError, MemoryLedger};
    let builder =
        || IdempotencyLayer::builder(MemoryLedger::new()).with_lease(Duration::from_secs(3));
    assert_eq!(
        builder()
            .with_ledger_timeout(Duration::from_secs(2))
            .build()
            .unwrap_err(),
        ConfigError::LedgerTimeoutTooLong {
            timeout: Duration::from_secs(2),
            lease: Duration::from_secs(3)
        }
    );
    assert!(
        builder()
            .with_ledger_timeout(Duration::from_secs(1))
            .build()
            .is_ok()
    );
    assert_eq!(
        builder()
            .with_ledger_timeout(Duration::ZERO)
            .build()
            .unwrap_err(),
        ConfigError::ZeroLedgerTimeout
    );
    assert_eq!(
        builder().with_max_in_flight(0).build().unwrap_err(),
        ConfigError::ZeroMaxInFlight
    );
    assert_eq!(
        builder()
            .with_max_handler_time(Duration::ZERO)
            .build()
            .unwrap_err(),
        ConfigError::ZeroMaxHandlerTime
    );
    assert_eq!(
        builder()
            .with_circuit_breaker(CircuitBreaker {
                failures: 0,
                open_for: Duration::from_secs(1)
            })
            .build()
            .unwrap_err(),
        ConfigError::InvalidCircuitBreaker
    );
}
