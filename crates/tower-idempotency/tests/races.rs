//! Real races: 64 tasks, one key, a barrier, a handler that sleeps 200 ms and counts its runs.
//! Exactly one run, under each in-progress policy.

#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::{StatusCode, header},
};
use support::*;
use tokio::sync::Barrier;
use tower_idempotency::{IdempotencyLayer, InProgress, MemoryLedger};

const TASKS: usize = 64;
const BODY: &str = r#"{"amount":100}"#;

/// Fires `TASKS` identical requests at once and returns every (status, headers, body).
async fn race(app: &Router) -> Vec<(axum::http::Response<()>, axum::body::Bytes)> {
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                let request = pay("race-key", BODY);
                barrier.wait().await;
                send(&app, request).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(TASKS);
    for task in tasks {
        results.push(task.await.expect("request task panicked"));
    }
    results
}

fn app(runs: &Runs, policy: InProgress) -> (Router, IdempotencyLayer<MemoryLedger>) {
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_in_progress(policy)
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(200)).layer(layer.clone());
    // The operation-status resource is the `axum` feature's.
    #[cfg(feature = "axum")]
    let app = app.merge(layer.operation_router());
    (app, layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflict_policy_one_run_the_rest_409() {
    let runs = Runs::default();
    let (app, _) = app(&runs, InProgress::Conflict);
    let results = race(&app).await;
    let created = results
        .iter()
        .filter(|(r, _)| r.status() == StatusCode::CREATED)
        .count();
    let conflicts = results
        .iter()
        .filter(|(r, _)| r.status() == StatusCode::CONFLICT)
        .count();
    assert_eq!(runs.get(), 1, "the handler ran exactly once");
    // A loser that arrives after the winner completed gets the replay (201) instead of a 409.
    assert_eq!(created + conflicts, TASKS, "only 201s and 409s");
    assert!(
        conflicts > 0,
        "the race produced no in-progress duplicates at all"
    );
    for (r, _) in &results {
        if r.status() == StatusCode::CONFLICT {
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        }
    }
}

#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepted_policy_one_run_the_rest_202_with_working_locations() {
    let runs = Runs::default();
    let (app, _) = app(&runs, InProgress::Accepted);
    let results = race(&app).await;
    assert_eq!(runs.get(), 1, "the handler ran exactly once");
    let executed: Vec<_> = results
        .iter()
        .filter(|(r, _)| r.status() == StatusCode::CREATED && !is_replay(r))
        .collect();
    assert_eq!(executed.len(), 1);
    let winner_body = executed[0].1.clone();
    let accepted: Vec<_> = results
        .iter()
        .filter(|(r, _)| r.status() == StatusCode::ACCEPTED)
        .collect();
    assert!(!accepted.is_empty(), "the race produced no 202 at all");
    assert!(
        results
            .iter()
            .all(|(r, _)| matches!(r.status(), StatusCode::CREATED | StatusCode::ACCEPTED))
    );
    // Every Location resolves, after completion, to the winner's response.
    for (r, _) in accepted {
        let location = r.headers()[header::LOCATION].to_str().unwrap();
        let (status, body) = send(
            &app,
            axum::http::Request::get(location)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status.status(), StatusCode::CREATED, "{location}");
        assert!(is_replay(&status));
        assert_eq!(body, winner_body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_policy_one_run_everyone_gets_the_response() {
    let runs = Runs::default();
    let (app, _) = app(
        &runs,
        InProgress::Wait {
            timeout: Duration::from_secs(10),
        },
    );
    let results = race(&app).await;
    assert_eq!(runs.get(), 1, "the handler ran exactly once");
    let first_body = &results[0].1;
    for (r, body) in &results {
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "every duplicate waited for the result"
        );
        assert_eq!(body, first_body, "and got the same response");
    }
    assert_eq!(results.iter().filter(|(r, _)| !is_replay(r)).count(), 1);
}
