//! Soak: mixed fresh, replayed and concurrently duplicated requests through an axum router on a
//! `MemoryLedger` with short retention and the purge task, for `SOAK_SECS` seconds (default 5;
//! `scripts/soak.sh` runs 60 in release). Every response must be a 201 (executed or replayed) or
//! the 409 of a concurrent duplicate, the ledger must stay within what retention allows, the
//! process's memory must stay bounded, and the purge task must drain the ledger at the end.
#![allow(clippy::unwrap_used)]

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    http::{Request, StatusCode},
    response::IntoResponse,
    routing::post,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_idempotency::{IDEMPOTENT_REPLAYED, IdempotencyLayer, MemoryLedger, purge_periodically};

const TASKS: usize = 64;
const LEASE: Duration = Duration::from_secs(1);
const PURGE_EVERY: Duration = Duration::from_millis(200);
/// Slack for the purge task being scheduled late on a loaded machine.
const PURGE_SLACK: Duration = Duration::from_millis(800);
/// The recent keys each client task remembers, to replay.
const RECENT: usize = 16;
/// Generous: the test binary with a bounded ledger sits at a few tens of MiB.
const RSS_LIMIT_KIB: u64 = 512 * 1024;

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// The resident set of this process, from `/proc/self/status` (`VmRSS`, in KiB).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

static EXECUTIONS: AtomicU64 = AtomicU64::new(0);

async fn create_payment(Json(payment): Json<Value>) -> impl IntoResponse {
    // Duplicates are sent slow, so that they really overlap and some get the 409.
    if payment["slow"] == true {
        tokio::time::sleep(Duration::from_millis(5)).await;
    } else {
        tokio::task::yield_now().await;
    }
    let execution = EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        Json(json!({ "execution": execution, "amount": payment["amount"] })),
    )
}

#[derive(Default)]
struct Counts {
    executed: AtomicU64,
    replayed: AtomicU64,
    conflicts: AtomicU64,
    /// Executions seen by clients: each one is a record that retention keeps.
    records_made: AtomicU64,
    in_flight: AtomicUsize,
    duplicate_groups: AtomicU64,
}

enum Got {
    Executed(Bytes),
    Replayed(Bytes),
    Conflict,
}

async fn send(app: &Router, counts: &Counts, key: &str, body: &Value) -> Got {
    let request = Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    counts.in_flight.fetch_add(1, Ordering::SeqCst);
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get(&IDEMPOTENT_REPLAYED).is_some();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let got = match status {
        StatusCode::CREATED if replayed => {
            counts.replayed.fetch_add(1, Ordering::Relaxed);
            Got::Replayed(bytes)
        }
        StatusCode::CREATED => {
            counts.executed.fetch_add(1, Ordering::Relaxed);
            counts.records_made.fetch_add(1, Ordering::SeqCst);
            Got::Executed(bytes)
        }
        StatusCode::CONFLICT => {
            counts.conflicts.fetch_add(1, Ordering::Relaxed);
            Got::Conflict
        }
        other => panic!(
            "unexpected {other} for {key}: {}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    counts.in_flight.fetch_sub(1, Ordering::SeqCst);
    got
}

/// One client: fresh keys, replays of its own recent keys, and groups of concurrent duplicates.
async fn client(
    id: usize,
    app: Router,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    retention: Duration,
) {
    // (key, body sent, response body of the latest execution, when that request was sent)
    let mut recent: VecDeque<(String, Value, Bytes, Instant)> = VecDeque::new();
    let mut n = 0u64;
    let mut rng = (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        n += 1;
        let key = format!("soak-{id}-{n}");
        match rng % 10 {
            // Replay a recent key.
            0..=3 if !recent.is_empty() => {
                let i = (rng >> 8) as usize % recent.len();
                let (key, body, first, sent) = &mut recent[i];
                // Taken before sending: if this request runs the handler, its record completes
                // after this instant, so a later re-run proves retention really passed.
                let sending = Instant::now();
                match send(&app, &counts, key, body).await {
                    Got::Replayed(bytes) => assert_eq!(&bytes, first, "a replay of {key}"),
                    Got::Executed(bytes) => {
                        // Only after the record can have expired: it was completed after `sent`,
                        // so it lives at least until `sent + retention`.
                        assert!(
                            sent.elapsed() >= retention,
                            "{key} ran again within retention"
                        );
                        *first = bytes;
                        *sent = sending;
                    }
                    Got::Conflict => panic!("{key} was in progress after it completed"),
                }
            }
            // A group of concurrent duplicates of a fresh key.
            4 => {
                counts.duplicate_groups.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "amount": n, "slow": true });
                let started = Instant::now();
                let (a, b, c) = tokio::join!(
                    send(&app, &counts, &key, &body),
                    send(&app, &counts, &key, &body),
                    send(&app, &counts, &key, &body),
                );
                let took = started.elapsed();
                let got = [a, b, c];
                let executed: Vec<&Bytes> = got
                    .iter()
                    .filter_map(|g| match g {
                        Got::Executed(b) => Some(b),
                        _ => None,
                    })
                    .collect();
                // Within retention of the first send, the key is one record: one execution.
                if took < retention {
                    assert_eq!(executed.len(), 1, "{key} ran {} times", executed.len());
                    for g in &got {
                        if let Got::Replayed(bytes) = g {
                            assert_eq!(bytes, executed[0], "a replay of {key}");
                        }
                    }
                }
            }
            // A fresh key.
            _ => {
                let body = json!({ "amount": n, "note": "x".repeat((rng >> 20) as usize % 200) });
                let sent = Instant::now();
                match send(&app, &counts, &key, &body).await {
                    Got::Executed(bytes) => {
                        if recent.len() == RECENT {
                            recent.pop_front();
                        }
                        recent.push_back((key, body, bytes, sent));
                    }
                    _ => panic!("a fresh key {key} was not executed"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_stays_bounded() {
    let duration = env_secs("SOAK_SECS", 5.0);
    let retention = env_secs("SOAK_RETENTION_SECS", 1.0).max(LEASE);
    let ledger = MemoryLedger::new();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(LEASE)
        .with_retention(retention)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(layer);
    let purge = tokio::spawn(purge_periodically(ledger.clone(), PURGE_EVERY, 10_000));

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..TASKS)
        .map(|id| {
            tokio::spawn(client(
                id,
                app.clone(),
                counts.clone(),
                stop.clone(),
                retention,
            ))
        })
        .collect();

    // A record lives until `retention` after its response, plus until the next purge: what
    // clients received within that window, plus what is in flight, bounds the ledger.
    let window = retention + PURGE_EVERY + PURGE_SLACK;
    let started = Instant::now();
    let mut made: VecDeque<(Instant, u64)> = VecDeque::new();
    let (mut peak_records, mut peak_bound, mut peak_rss) = (0usize, 0u64, 0u64);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let records = ledger.len();
        let total = counts.records_made.load(Ordering::SeqCst);
        let in_flight = counts.in_flight.load(Ordering::SeqCst) as u64;
        made.push_back((now, total));
        // Keep the newest sample at least `window` old as the base.
        while made.len() > 1 && now.duration_since(made[1].0) >= window {
            made.pop_front();
        }
        let base = if now.duration_since(made[0].0) >= window {
            made[0].1
        } else {
            0
        };
        let bound = (total - base + in_flight) * 5 / 4 + 64;
        assert!(
            (records as u64) <= bound,
            "{records} records held, retention allows {bound}"
        );
        let rss = rss_kib().unwrap();
        assert!(rss < RSS_LIMIT_KIB, "RSS {rss} KiB");
        peak_records = peak_records.max(records);
        peak_bound = peak_bound.max(bound);
        peak_rss = peak_rss.max(rss);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = started.elapsed();

    // Traffic has stopped: the purge task alone must bring the ledger back to empty.
    let drain_started = Instant::now();
    while !ledger.is_empty() && drain_started.elapsed() < retention * 10 + Duration::from_secs(10) {
        tokio::time::sleep(PURGE_EVERY).await;
    }
    let left = ledger.len();
    purge.abort();

    let c = &counts;
    let (executed, replayed, conflicts) = (
        c.executed.load(Ordering::Relaxed),
        c.replayed.load(Ordering::Relaxed),
        c.conflicts.load(Ordering::Relaxed),
    );
    let total = executed + replayed + conflicts;
    println!(
        "soak: {:.1} s, {TASKS} tasks, retention {:?}: {total} requests ({:.0}/s): {executed} executed, \
         {replayed} replayed, {conflicts} conflicts (409) in {} duplicate groups; \
         peak records {peak_records} (bound {peak_bound}), peak RSS {:.1} MiB, left after drain {left}",
        elapsed.as_secs_f64(),
        retention,
        total as f64 / elapsed.as_secs_f64(),
        c.duplicate_groups.load(Ordering::Relaxed),
        peak_rss as f64 / 1024.0,
    );
    assert_eq!(left, 0, "the purge task did not drain the ledger");
    assert!(executed > 0 && replayed > 0, "both paths ran");
    assert!(
        c.duplicate_groups.load(Ordering::Relaxed) > 0,
        "duplicates were sent"
    );
}
