//! A load on the SQLite ledger in one process, for issue 18: `TASKS` concurrent tasks, each
//! claiming and completing fresh keys on a SQLite file (WAL, `synchronous = FULL`) for
//! `SECONDS`, then the fresh requests per second and the latency of one claim + complete
//! (p50, p99, max). Results in `docs/benchmarks.md`.
//!
//! ```text
//! cargo run -p tower-idempotency-sqlx --features sqlite --example sqlite_load [TASKS] [SECONDS]
//! ```

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tower_idempotency_core::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Ledger, LedgerKey, ScopeDigest,
    StoredResponse,
};
use tower_idempotency_sqlx::{SqliteLedger, sqlx};

fn request(key: &str) -> ClaimRequest {
    let parsed = IdempotencyKey::parse(key.as_bytes()).expect("a valid key");
    ClaimRequest::new(
        LedgerKey::new(b"scope", &parsed),
        ScopeDigest::new(b"scope"),
        Fingerprint::of(b"{\"amount\":1}"),
        Duration::from_secs(60),
        Duration::from_secs(3600),
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map_or(32, |a| a.parse().expect("TASKS"));
    let seconds: u64 = args.next().map_or(5, |a| a.parse().expect("SECONDS"));
    let dir = std::env::temp_dir().join(format!("sqlite-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let path = dir.join("ledger.db");
    let ledger = SqliteLedger::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .expect("open the file");
    ledger.migrate().await.expect("migrate");
    // Say what the file runs with, so that the numbers can be read.
    let (journal,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(ledger.pool())
        .await
        .expect("journal_mode");
    let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
        .fetch_one(ledger.pool())
        .await
        .expect("synchronous");
    let response = Arc::new(StoredResponse {
        status: http::StatusCode::CREATED,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
        body_omitted: false,
    });
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers = (0..tasks).map(|task| {
        let ledger = ledger.clone();
        let response = response.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < end {
                let request = request(&format!("load-{task}-{n}"));
                n += 1;
                let began = Instant::now();
                let Claim::Acquired(lease) = ledger.claim(&request).await.expect("claim") else {
                    panic!("a fresh key is acquired")
                };
                ledger
                    .complete(
                        &request.key,
                        lease.token,
                        &response,
                        Duration::from_secs(3600),
                    )
                    .await
                    .expect("complete");
                latencies.push(began.elapsed());
            }
            latencies
        })
    });
    let mut latencies = Vec::new();
    for worker in workers.collect::<Vec<_>>() {
        latencies.extend(worker.await.expect("a worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "sqlite file (journal {journal}, synchronous {synchronous}), {tasks} tasks, {:.1} s: \
         {} fresh requests (claim + complete), {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        latencies.last().expect("a request").as_secs_f64() * 1e3,
    );
    // Transactions the writes took (claims, completions, and the migration's none).
    println!(
        "  {} writes in {} transactions",
        latencies.len() * 2,
        ledger.group_commits()
    );
    drop(ledger);
    let _ = std::fs::remove_dir_all(&dir);
}
