//! The PostgreSQL ledger's speed, against `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Not run by CI; results in `docs/benchmarks.md`.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p tower-idempotency-sqlx --features postgres
//! ```
//!
//! 1. `pairs/..`: claim + complete of a fresh key through `PostgresLedger`, and the same two
//!    statements issued raw through sqlx (the ceiling), with 1 and 16 workers, in alternating
//!    rounds (printed); again with `synchronous_commit = off`, so that the disk's fsync does not
//!    hide the ledger's own cost.
//! 2. `claim_latency/{empty,1m_rows}`: one claim of a fresh key, on an empty table and on one with
//!    1M completed records.
//! 3. Purging 1M expired records while 4 workers keep claiming (printed, not a criterion loop).

use std::{
    hint::black_box,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group};
use tower_idempotency_core::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Ledger, LedgerKey, ScopeDigest,
    StoredResponse,
};
use tower_idempotency_sqlx::{
    PostgresLedger,
    sqlx::{
        self, AssertSqlSafe, PgPool, SqlStr,
        postgres::{PgConnectOptions, PgPoolOptions},
    },
};

const WORKERS: [usize; 2] = [1, 16];
const FILL: i64 = 1_000_000;
const ROUNDS: u64 = 10;

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn pool() -> PgPool {
    pool_with(PgConnectOptions::from_str(&url()).expect("a valid DATABASE_URL")).await
}

/// A pool whose commits do not wait for the WAL flush, so that the disk's fsync latency does not
/// drown the ledger's own cost.
async fn async_commit_pool() -> PgPool {
    let options = PgConnectOptions::from_str(&url())
        .expect("a valid DATABASE_URL")
        .options([("synchronous_commit", "off")]);
    pool_with(options).await
}

async fn pool_with(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .expect("connect to DATABASE_URL")
}

/// A fresh, migrated table named `bench_{name}`.
async fn table(pool: &PgPool, name: &str) -> PostgresLedger {
    let table = format!("bench_{name}");
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .expect("drop");
    let ledger = PostgresLedger::new(pool.clone())
        .with_table(&table)
        .expect("a valid name");
    ledger.migrate().await.expect("migrate");
    ledger
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn request() -> ClaimRequest {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let key = IdempotencyKey::parse(format!("bench-{n}").as_bytes()).expect("a valid key");
    ClaimRequest::new(
        LedgerKey::new(b"bench", &key),
        ScopeDigest::new(b"bench"),
        Fingerprint::of(b"{\"amount\":100}"),
        Duration::from_secs(30),
        Duration::from_secs(24 * 3600),
    )
}

fn response() -> StoredResponse {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    StoredResponse {
        status: http::StatusCode::CREATED,
        headers,
        body: bytes::Bytes::from_static(b"{\"id\":\"pay_123\",\"amount\":100}"),
        body_omitted: false,
    }
}

/// What one worker does per pair.
trait Pair: Clone + Send + Sync + 'static {
    fn pair(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct ThroughLedger(PostgresLedger);

impl Pair for ThroughLedger {
    async fn pair(&self) {
        let request = request();
        let Claim::Acquired(lease) = self.0.claim(&request).await.expect("claim") else {
            panic!("fresh keys are acquired")
        };
        self.0
            .complete(&request.key, lease.token, &response(), request.retention)
            .await
            .expect("complete");
    }
}

/// The ledger's own claim and complete statements (`PostgresLedger::statements`), issued raw:
/// the same SQL, without the ledger's decoding and fencing around it.
#[derive(Clone)]
struct Raw {
    pool: PgPool,
    claim: SqlStr,
    complete: SqlStr,
}

impl Raw {
    fn new(ledger: &PostgresLedger) -> Self {
        let statements = ledger.statements();
        Self {
            pool: ledger.pool().clone(),
            claim: statements.claim.clone(),
            complete: statements.complete.clone(),
        }
    }
}

impl Pair for Raw {
    async fn pair(&self) {
        let request = request();
        let row = sqlx::query(self.claim.clone())
            .bind(&request.key.as_bytes()[..])
            .bind(&request.scope.as_bytes()[..])
            .bind(&request.fingerprint.as_bytes()[..])
            .bind(request.operation_id)
            .bind(request.token.as_uuid())
            .bind(30_000i64)
            .bind(86_400_000i64)
            .fetch_one(&self.pool)
            .await
            .expect("claim");
        black_box(row);
        let response = response();
        let done = sqlx::query(self.complete.clone())
            .bind(&request.key.as_bytes()[..])
            .bind(request.token.as_uuid())
            .bind(response.status.as_u16() as i16)
            .bind(StoredResponse::encode_headers(&response.headers))
            .bind(&response.body[..])
            .bind(false)
            .bind(86_400_000i64)
            .execute(&self.pool)
            .await
            .expect("complete");
        assert_eq!(done.rows_affected(), 1);
    }
}

/// Runs `iters` pairs across `workers` tasks and returns the wall time.
async fn run_pairs<P: Pair>(pair: P, workers: usize, iters: u64) -> Duration {
    let left = Arc::new(AtomicU64::new(iters));
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (pair, left) = (pair.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    pair.pair().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker panicked");
    }
    start.elapsed()
}

/// Claim + complete pairs per second through the ledger and raw, in alternating rounds (which
/// goes first alternates too), so that drift in the disk's or the database's speed hits both
/// alike. Prints the total rate of each and the median of the per-round ratios.
fn pairs() {
    let rt = runtime();
    rt.block_on(async {
        for (label, async_commit, per_round) in [
            ("durable", false, [150u64, 600]),
            ("async_commit", true, [500, 2_000]),
        ] {
            let pool = if async_commit {
                async_commit_pool().await
            } else {
                pool().await
            };
            let ledger = ThroughLedger(table(&pool, &format!("pairs_{label}_ledger")).await);
            let raw_ledger = table(&pool, &format!("pairs_{label}_raw")).await;
            let raw = Raw::new(&raw_ledger);
            for (workers, per_round) in WORKERS.into_iter().zip(per_round) {
                // Warm up: connections opened, statements prepared.
                run_pairs(ledger.clone(), workers, per_round / 4).await;
                run_pairs(raw.clone(), workers, per_round / 4).await;
                let (mut ledger_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
                let mut ratios = Vec::new();
                for round in 0..ROUNDS {
                    let (l, r) = if round % 2 == 0 {
                        let l = run_pairs(ledger.clone(), workers, per_round).await;
                        (l, run_pairs(raw.clone(), workers, per_round).await)
                    } else {
                        let r = run_pairs(raw.clone(), workers, per_round).await;
                        (run_pairs(ledger.clone(), workers, per_round).await, r)
                    };
                    ledger_time += l;
                    raw_time += r;
                    ratios.push(r.as_secs_f64() / l.as_secs_f64());
                }
                ratios.sort_by(f64::total_cmp);
                let rate = |t: Duration| (per_round * ROUNDS) as f64 / t.as_secs_f64();
                eprintln!(
                    "pairs/{label}/{workers:>2} workers: ledger {:.0}/s, raw {:.0}/s, \
                     ledger/raw {:.3} (median of {ROUNDS} rounds {:.3}, range {:.3}..{:.3})",
                    rate(ledger_time),
                    rate(raw_time),
                    rate(ledger_time) / rate(raw_time),
                    ratios[ratios.len() / 2],
                    ratios[0],
                    ratios[ratios.len() - 1],
                );
            }
            pool.close().await;
        }
    });
}

/// Fills the ledger's table with `FILL` completed records expiring `expiry` from now.
/// The secondary indexes are dropped during the insert and rebuilt by `migrate`, which is
/// several times faster than maintaining them row by row.
async fn fill(ledger: &PostgresLedger, expiry: &str) {
    let started = Instant::now();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP INDEX {t}_operation_id; DROP INDEX {t}_expires_at; \
         INSERT INTO \"{t}\" (key, scope, fingerprint, operation_id, token, state, lease_until, \
           expires_at, status, headers, body, body_omitted) \
         SELECT sha256(int8send(g)), sha256('fill'::bytea), sha256(int8send(-g)), \
           gen_random_uuid(), gen_random_uuid(), 'completed', NULL, now() + interval '{expiry}', \
           201, '\\x000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6e'::bytea, \
           convert_to('{{\"id\":\"pay_' || g || '\",\"amount\":100}}', 'UTF8'), false \
         FROM generate_series(1, {FILL}) g",
        t = ledger.table(),
    )))
    .execute(ledger.pool())
    .await
    .expect("fill");
    ledger.migrate().await.expect("rebuild the indexes");
    sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE \"{}\"", ledger.table())))
        .execute(ledger.pool())
        .await
        .expect("analyze");
    eprintln!(
        "filled {} with {FILL} rows (expiring {expiry}) in {:.1?}",
        ledger.table(),
        started.elapsed()
    );
}

fn claim_latency(c: &mut Criterion) {
    let rt = runtime();
    let (empty, full) = rt.block_on(async {
        let pool = pool().await;
        let empty = table(&pool, "latency_empty").await;
        let full = table(&pool, "latency_full").await;
        fill(&full, "1 day").await;
        (empty, full)
    });
    let mut group = c.benchmark_group("claim_latency");
    for (name, ledger) in [("empty", &empty), ("1m_rows", &full)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                black_box(ledger.claim(&request()).await.expect("claim"));
            });
        });
    }
    group.finish();
}

/// Claims fresh keys from 4 workers until `stop` is set; returns every claim's latency, sorted.
async fn claim_load(
    ledger: PostgresLedger,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (ledger, stop) = (ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    ledger.claim(&request()).await.expect("claim");
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker panicked"));
    }
    all.sort();
    all
}

fn summary(latencies: &[Duration], over: Duration) -> String {
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    format!(
        "{} claims in {over:.2?} ({:.0}/s), p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        latencies.len(),
        latencies.len() as f64 / over.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or_default()
    )
}

/// Purges 1M expired records in batches of 10 000 while 4 workers keep claiming.
fn purge_under_load() {
    let rt = runtime();
    rt.block_on(async {
        let pool = pool().await;
        let ledger = table(&pool, "purge").await;
        fill(&ledger, "-1 hour").await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let load = tokio::spawn(claim_load(ledger.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let before = load.await.expect("load");
        eprintln!("purge/baseline: {}", summary(&before, start.elapsed()));

        stop.store(false, Ordering::Relaxed);
        let load = tokio::spawn(claim_load(ledger.clone(), stop.clone()));
        let start = Instant::now();
        let purged = ledger.purge_expired(10_000).await.expect("purge");
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let during = load.await.expect("load");
        eprintln!("purge: {purged} expired rows in {took:.2?} (batches of 10000)");
        eprintln!("purge/during: {}", summary(&during, took));
        assert_eq!(purged, FILL as u64);
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6));
    targets = claim_latency
}

fn main() {
    pairs();
    benches();
    purge_under_load();
    Criterion::default().configure_from_args().final_summary();
}
