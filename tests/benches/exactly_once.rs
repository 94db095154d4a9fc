//! Exactly-once mode's cost on PostgreSQL: the fresh path (a new key per request, one payment
//! row written by the handler) with and without `with_transactions()`, in-process through an
//! axum Router, at 1 and 16 concurrent workers. Modes alternate in rounds so that drift on a
//! shared machine hits both alike. Needs DATABASE_URL.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p tower-idempotency-tests --bench exactly_once`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, http::Request, http::StatusCode, routing::post};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, LedgerTx};
use tower_idempotency_sqlx::{
    PostgresLedger,
    sqlx::{self, AssertSqlSafe, postgres::PgPoolOptions},
};

const ROUNDS: usize = 6;
const ROUND: Duration = Duration::from_secs(3);

fn app(ledger: &PostgresLedger, payments: &str, transactional: bool) -> Router {
    let insert = format!("INSERT INTO {payments} (amount) VALUES ($1)");
    let router = if transactional {
        Router::new().route(
            "/payments",
            post(move |mut tx: LedgerTx<PostgresLedger>| {
                let insert = insert.clone();
                async move {
                    sqlx::query(AssertSqlSafe(insert))
                        .bind(100i64)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    StatusCode::CREATED
                }
            }),
        )
    } else {
        let pool = ledger.pool().clone();
        Router::new().route(
            "/payments",
            post(move || {
                let (insert, pool) = (insert.clone(), pool.clone());
                async move {
                    sqlx::query(AssertSqlSafe(insert))
                        .bind(100i64)
                        .execute(&pool)
                        .await
                        .unwrap();
                    StatusCode::CREATED
                }
            }),
        )
    };
    let builder = IdempotencyLayer::builder(ledger.clone());
    let builder = if transactional {
        builder.with_transactions()
    } else {
        builder
    };
    router.layer(builder.build().unwrap())
}

/// Requests per second over `ROUND` with `workers` concurrent clients.
async fn measure(app: &Router, workers: usize, next: &'static AtomicU64) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < ROUND {
                    let key = format!("bench-{}", next.fetch_add(1, Ordering::Relaxed));
                    let request = Request::post("/payments")
                        .header("idempotency-key", key)
                        .body(Body::empty())
                        .unwrap();
                    let response = app.clone().oneshot(request).await.unwrap();
                    assert_eq!(response.status(), StatusCode::CREATED);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("SKIPPED: set DATABASE_URL to run this benchmark");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pool = PgPoolOptions::new()
            .max_connections(40)
            .test_before_acquire(false)
            .connect(&url)
            .await
            .unwrap();
        let suffix = std::process::id();
        let (records, payments) = (
            format!("bench_tx_records_{suffix}"),
            format!("bench_tx_payments_{suffix}"),
        );
        let ledger = PostgresLedger::new(pool.clone())
            .with_table(&records)
            .unwrap();
        ledger.migrate().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {payments} (id BIGSERIAL PRIMARY KEY, amount BIGINT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let plain = app(&ledger, &payments, false);
        let transactional = app(&ledger, &payments, true);
        println!("| workers | without transactions (req/s) | with transactions (req/s) | ratio |");
        println!("|---:|---:|---:|---:|");
        for workers in [1, 16] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                a.push(measure(&plain, workers, &NEXT).await);
                b.push(measure(&transactional, workers, &NEXT).await);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (a, b) = (median(&mut a), median(&mut b));
            println!("| {workers} | {a:.0} | {b:.0} | {:.2} |", b / a);
        }
        for table in [&records, &payments] {
            sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}")))
                .execute(&pool)
                .await
                .unwrap();
        }
    });
}
