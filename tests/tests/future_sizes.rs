//! The request path's ledger futures stay small. The layer holds the futures of `claim`,
//! `complete`, `release` and `renew` inline in every request's state, which every request
//! allocates and moves (`Ledger`'s docs, "Keep the request path's futures small"). Unboxed (in
//! this test's debug build), sqlx's statements made `PostgresLedger`'s claim future 648 bytes and
//! redis-rs's made `RedisLedger`'s 3,800; `CachedLedger<PostgresLedger>`'s was 736 bytes, its
//! inner ledger's carried into every cache hit. Boxed: 32, 32 and 96. The futures are built and
//! dropped unpolled: nothing is sent.

#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::{mem::size_of_val, time::Duration};

use http::{HeaderMap, StatusCode};
use tower_idempotency_core::{
    CachedLedger, ClaimRequest, Fingerprint, IdempotencyKey, Ledger, LedgerKey, MemoryLedger,
    ScopeDigest, StoredResponse,
};
use tower_idempotency_redis::RedisLedger;
use tower_idempotency_sqlx::{PostgresLedger, SqliteLedger, sqlx::postgres::PgPoolOptions};

/// Well above a boxed call's size (a box, the arguments, a state tag), well below an unboxed
/// client library's query future.
const MAX_BYTES: usize = 256;

/// The size of each request-path future of `ledger`, by call.
fn sizes<L: Ledger>(ledger: &L) -> Vec<(&'static str, usize)> {
    let key = IdempotencyKey::parse(b"sizes").expect("a valid key");
    let request = ClaimRequest::new(
        LedgerKey::new(b"", &key),
        ScopeDigest::new(b""),
        Fingerprint::of(b"body"),
        Duration::from_secs(30),
        Duration::from_secs(60),
    );
    let stored = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: "{}".into(),
        body_omitted: false,
    };
    let (key, token, ttl) = (&request.key, request.token, Duration::from_secs(60));
    vec![
        ("claim", size_of_val(&ledger.claim(&request))),
        (
            "complete",
            size_of_val(&ledger.complete(key, token, &stored, ttl)),
        ),
        ("release", size_of_val(&ledger.release(key, token))),
        ("renew", size_of_val(&ledger.renew(key, token, ttl))),
    ]
}

fn assert_small<L: Ledger>(name: &str, ledger: &L) {
    let sizes = sizes(ledger);
    eprintln!("{name}: {sizes:?}");
    for (call, bytes) in sizes {
        assert!(
            bytes <= MAX_BYTES,
            "{name}::{call}'s future is {bytes} bytes, over {MAX_BYTES}: box the backend's \
             future inside the call"
        );
    }
}

/// A pool that never connects: the futures are only built.
fn lazy_postgres() -> PostgresLedger {
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:1/never")
        .expect("a lazy pool");
    PostgresLedger::new(pool)
}

#[tokio::test]
async fn the_sql_ledgers_request_futures_are_small() {
    assert_small("PostgresLedger", &lazy_postgres());
    let sqlite = SqliteLedger::connect("sqlite::memory:")
        .await
        .expect("an in-memory database");
    assert_small("SqliteLedger", &sqlite);
    assert_small("MemoryLedger", &MemoryLedger::new());
}

#[tokio::test]
async fn a_cache_hit_does_not_carry_the_inner_ledgers_future() {
    assert_small(
        "CachedLedger<PostgresLedger>",
        &CachedLedger::new(lazy_postgres()),
    );
}

#[tokio::test]
async fn the_redis_ledgers_request_futures_are_small() {
    let Some(url) = redis_cluster::redis_url() else {
        return;
    };
    let ledger = RedisLedger::builder()
        .connect(url.as_str())
        .await
        .expect("connect to REDIS_URL");
    assert_small("RedisLedger", &ledger);
}
