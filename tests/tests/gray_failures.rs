//! Gray failures (issue 12): PostgreSQL behind a loopback proxy that stops forwarding without
//! closing anything. While it is blackholed, every covered request is answered within the
//! ledger timeout plus a margin, no handler runs without a claim, and the circuit breaker opens;
//! once forwarding resumes, the service recovers by itself and no key ran twice.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Request, StatusCode},
    routing::post,
};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{CircuitBreaker, IdempotencyLayer, Ledger};
use tower_idempotency_core::conformance::{FaultyLedger, Op};
use tower_idempotency_sqlx::{
    PostgresLedger,
    sqlx::postgres::{PgConnectOptions, PgPoolOptions},
};
use tower_idempotency_tests::proxy::BlackholeProxy;

type Runs = Arc<Mutex<HashMap<String, usize>>>;

fn app<L: Ledger + Clone>(runs: Runs, layer: IdempotencyLayer<L>) -> Router {
    Router::new()
        .route(
            "/payments",
            post(move |headers: HeaderMap| {
                let runs = runs.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    *runs.lock().unwrap().entry(key).or_default() += 1;
                    (StatusCode::CREATED, "paid")
                }
            }),
        )
        .layer(layer)
}

async fn pay(app: &Router, key: &str) -> (StatusCode, Option<String>, Duration) {
    let request = Request::post("/payments")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap();
    let started = Instant::now();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let slug = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["type"].as_str().map(str::to_owned))
        .and_then(|t| t.rsplit('#').next().map(str::to_owned));
    (status, slug, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blackholed_answers_in_time_opens_the_breaker_and_recovers() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let direct = PgConnectOptions::from_str(&table.url).unwrap();
    let upstream = tokio::net::lookup_host((direct.get_host(), direct.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = BlackholeProxy::start(upstream).await.unwrap();
    let proxied = direct
        .clone()
        .host("127.0.0.1")
        .port(proxy.addr().port())
        .options([("statement_timeout", "5s")]);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(1))
        .test_before_acquire(false)
        .connect_with(proxied)
        .await
        .unwrap();
    // Counting calls only: it injects no fault.
    let ledger = FaultyLedger::new(
        PostgresLedger::new(pool.clone())
            .with_table(&table.name)
            .unwrap(),
    );
    let faults = ledger.faults();
    let timeout = Duration::from_millis(500);
    let open_for = Duration::from_secs(1);
    let layer = IdempotencyLayer::builder(ledger)
        .with_lease(Duration::from_secs(3))
        .with_ledger_timeout(timeout)
        .with_circuit_breaker(CircuitBreaker {
            failures: 3,
            open_for,
        })
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = app(runs.clone(), layer);
    let margin = Duration::from_millis(700);

    // Healthy.
    for i in 0..5 {
        let (status, _, _) = pay(&app, &format!("before-{i}")).await;
        assert_eq!(status, StatusCode::CREATED);
    }

    // Blackholed: every request is answered in time, with 503, and no handler runs.
    proxy.blackhole(true);
    let claims_before = faults.calls(Op::Claim);
    for i in 0..12 {
        let (status, slug, took) = pay(&app, &format!("during-{i}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "request {i}");
        assert_eq!(slug.as_deref(), Some("ledger-unavailable"));
        assert!(took < timeout + margin, "request {i} took {took:?}");
    }
    // The breaker opened after 3 timed-out claims: the rest were refused without a ledger call
    // (a probe or two may go through if the machine is slow enough for `open_for` to pass).
    let claims = faults.calls(Op::Claim) - claims_before;
    assert!(
        claims <= 6,
        "the breaker did not open: {claims} of 12 requests called the ledger"
    );
    assert!(
        runs.lock()
            .unwrap()
            .keys()
            .all(|k| k.starts_with("before-")),
        "a handler ran without a claim: {runs:?}"
    );

    // Forwarding resumes: the service recovers by itself (the breaker's probe), and every key
    // ends with one run. A claim that took effect in the blackhole holds its key until its
    // lease (3 s) expires, so the retries go on for a while.
    proxy.blackhole(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<String> = (0..12).map(|i| format!("during-{i}")).collect();
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "not recovered: {pending:?}");
        let mut still = Vec::new();
        for key in pending {
            let (status, _, took) = pay(&app, &key).await;
            assert!(took < timeout + margin, "{key} took {took:?}");
            if status != StatusCode::CREATED {
                still.push(key);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..5 {
        let (status, _, _) = pay(&app, &format!("before-{i}")).await;
        assert_eq!(status, StatusCode::CREATED, "the replay");
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 17);
    assert!(runs.values().all(|&n| n == 1), "a key ran twice: {runs:?}");
    drop(app);
    pool.close().await;
    table.drop().await;
}
