//! The ledger conformance suite against `RedisLedger`: on the server at `REDIS_URL` (each check
//! under a key prefix of its own, its keys deleted after it), and on a 3-master Redis Cluster
//! that this file starts itself. Then Redis outages: a paused server, a killed and restarted
//! one. Without `REDIS_URL` each test says it is skipped (and fails if `CI=true`).
//!
//! The Cluster and the outage servers are `redis-server` processes on free loopback ports, in a
//! temporary directory, killed by pid when their guard drops (a failing test included).

#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_cluster::{Servers, cli, free_port, redis_url, start_cluster, temp_dir, unique_prefix};
use tower_idempotency_core::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Ledger, LedgerError, LedgerKey, RecordState,
    ScopeDigest, conformance,
};
use tower_idempotency_redis::{RedisLedger, redis};

/// A ledger under a fresh prefix on the `REDIS_URL` server; its keys are deleted afterwards.
struct Prefixed {
    ledger: RedisLedger,
    url: String,
}

impl Prefixed {
    async fn create() -> Option<Self> {
        let url = redis_url()?;
        let ledger = RedisLedger::builder()
            .with_prefix(&unique_prefix())
            .expect("a valid prefix")
            .connect(url.as_str())
            .await
            .expect("connect to REDIS_URL");
        Some(Self { ledger, url })
    }
}

impl conformance::Fixture for Prefixed {
    type Ledger = RedisLedger;

    fn ledger(&self) -> RedisLedger {
        self.ledger.clone()
    }

    async fn teardown(self) {
        delete_prefix(&self.url, self.ledger.prefix()).await;
    }
}

/// Deletes every key under `prefix` on one server.
async fn delete_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).expect("a valid URL");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect for clean-up");
    let keys: Vec<String> = {
        let mut iter = con
            .scan_match::<_, String>(format!("{prefix}*"))
            .await
            .expect("scan");
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key.expect("a scanned key"));
        }
        keys
    };
    for chunk in keys.chunks(100) {
        let _: () = con.del(chunk).await.expect("delete test keys");
    }
}

/// The standard checks, each its own test on its own prefix.
mod standalone {
    use super::*;

    tower_idempotency_core::ledger_conformance_tests!(fixture: Prefixed::create());

    /// Beyond the suite's purge check: the expired records' keys are really gone from Redis.
    #[test]
    fn redis_expiry_replaces_purge() {
        conformance::run(async {
            if let Some(fixture) = Prefixed::create().await {
                let url = fixture.url.clone();
                conformance::with_fixture(fixture, move |ledger| async move {
                    let client = redis::Client::open(url.as_str()).expect("url");
                    let con = client
                        .get_multiplexed_async_connection()
                        .await
                        .expect("connect");
                    super::expiry_replaces_purge(ledger, con).await;
                })
                .await;
            }
        });
    }
}

fn request(key: &str, lease: Duration, retention: Duration) -> ClaimRequest {
    let parsed = IdempotencyKey::parse(key.as_bytes()).expect("a valid key");
    ClaimRequest::new(
        LedgerKey::new(b"s", &parsed),
        ScopeDigest::new(b"s"),
        Fingerprint::of(b"b"),
        lease,
        retention,
    )
}

async fn acquire(ledger: &RedisLedger, request: &ClaimRequest) -> tower_idempotency_core::Lease {
    match ledger.claim(request).await.expect("claim") {
        Claim::Acquired(lease) => lease,
        Claim::Existing(e) => panic!("expected to acquire, found {e:?}"),
    }
}

/// The purge check's scenario, for a ledger that expires records by itself: completed and
/// abandoned records whose retention passed are gone from Redis (no key left, index entries of
/// abandoned claims included), `purge_expired` finds nothing, and the live ones stay.
async fn expiry_replaces_purge<C: redis::aio::ConnectionLike + Send>(
    ledger: RedisLedger,
    mut con: C,
) {
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(60);
    let mut gone = Vec::new();
    for i in 0..7 {
        let r = request(&format!("done-{i}"), long, long);
        let lease = acquire(&ledger, &r).await;
        ledger
            .complete(
                &r.key,
                lease.token,
                &conformance::sample_response(b"x"),
                short,
            )
            .await
            .expect("complete");
        gone.push(ledger.record_key(&r.key));
    }
    for i in 0..3 {
        let r = request(&format!("abandoned-{i}"), short, short);
        let lease = acquire(&ledger, &r).await;
        gone.push(ledger.record_key(&r.key));
        gone.push(ledger.operation_key(lease.operation_id));
    }
    let kept = request("kept", long, long);
    let lease = acquire(&ledger, &kept).await;
    ledger
        .complete(
            &kept.key,
            lease.token,
            &conformance::sample_response(b"kept"),
            long,
        )
        .await
        .expect("complete");
    let live = request("live", long, long);
    acquire(&ledger, &live).await;

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ledger.purge_expired(3).await.expect("purge"), 0);
    for key in &gone {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("EXISTS");
        assert!(!exists, "{key} outlived its retention");
    }
    let found = |r: ClaimRequest| {
        let ledger = ledger.clone();
        async move {
            match ledger.claim(&r).await.expect("claim") {
                Claim::Existing(e) => e.state,
                Claim::Acquired(l) => panic!("a live record was gone: {l:?}"),
            }
        }
    };
    assert_eq!(
        found(request("kept", long, long)).await,
        RecordState::Completed(conformance::sample_response(b"kept"))
    );
    assert_eq!(
        found(request("live", long, long)).await,
        RecordState::InProgress
    );
}

/// A waiter on one app instance sees a completion made through another instance's ledger, by
/// its published message (well within the once-a-second re-check).
#[test]
fn a_completion_on_another_instance_wakes_a_waiter() {
    conformance::run(async {
        let Some(fixture) = Prefixed::create().await else {
            return;
        };
        let other = RedisLedger::builder()
            .with_prefix(fixture.ledger.prefix())
            .expect("prefix")
            .connect(fixture.url.as_str())
            .await
            .expect("connect");
        conformance::with_fixture(fixture, move |ledger| cross_instance_wake(ledger, other)).await;
    });
}

/// Waits on `other` for a key that `ledger` completes: the waiter returns well within the
/// once-a-second re-check, so by the published message.
async fn cross_instance_wake(ledger: RedisLedger, other: RedisLedger) {
    let r = request("k", Duration::from_secs(60), Duration::from_secs(60));
    let lease = acquire(&ledger, &r).await;
    let key = r.key;
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            other.wait_for_change(&key, Duration::from_secs(10)).await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let completed = Instant::now();
    ledger
        .complete(
            &key,
            lease.token,
            &conformance::sample_response(b"ok"),
            Duration::from_secs(60),
        )
        .await
        .expect("complete");
    let waited = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("the waiter returned")
        .expect("no panic");
    let after = completed.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && after < Duration::from_millis(500),
        "the waiter returned {waited:?} after it started, {after:?} after the completion"
    );
}

/// The whole suite against a Redis Cluster this test starts (3 masters), every check at once,
/// each under its own prefix. Needs `REDIS_URL` only as the switch that Redis is available.
#[test]
fn cluster_conformance() {
    if redis_url().is_none() {
        return;
    }
    let started = Instant::now();
    let (servers, ports) = start_cluster(3, 0, &[]);
    eprintln!("cluster of 3 masters up in {:?}", started.elapsed());
    let nodes: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let failures = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let connect = || {
                let nodes = nodes.clone();
                async move {
                    RedisLedger::builder()
                        .with_prefix(&unique_prefix())
                        .expect("prefix")
                        .connect_cluster(nodes)
                        .await
                        .expect("connect to the cluster")
                }
            };
            macro_rules! checks {
                ($($case:ident),* $(,)?) => {{
                    let mut tasks = Vec::new();
                    $(
                        let ledger = connect().await;
                        assert!(ledger.is_cluster());
                        tasks.push((stringify!($case), tokio::spawn(conformance::$case(ledger))));
                    )*
                    tasks
                }};
            }
            // Every check of the suite, including any added later.
            let mut tasks = tower_idempotency_core::conformance_checks!([checks]);
            let ledger = connect().await;
            let raw = redis::cluster::ClusterClient::new(nodes.clone())
                .expect("cluster client")
                .get_async_connection()
                .await
                .expect("connect");
            tasks.push((
                "redis_expiry_replaces_purge",
                tokio::spawn(expiry_replaces_purge(ledger, raw)),
            ));
            // Two app instances on one prefix: each ledger has its own connections.
            let ledger = connect().await;
            let other = RedisLedger::builder()
                .with_prefix(ledger.prefix())
                .expect("prefix")
                .connect_cluster(nodes.clone())
                .await
                .expect("connect");
            tasks.push((
                "cross_instance_wake",
                tokio::spawn(cross_instance_wake(ledger, other)),
            ));
            let mut failures = Vec::new();
            for (name, task) in tasks {
                if let Err(error) = tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .unwrap_or_else(|_| panic!("{name} did not finish in 60 s"))
                {
                    failures.push(format!("{name}: {error}"));
                }
            }
            failures
        });
    drop(servers);
    eprintln!("cluster suite done in {:?}", started.elapsed());
    assert!(failures.is_empty(), "failed on the cluster: {failures:#?}");
}

fn claim_of(name: &str) -> ClaimRequest {
    request(name, Duration::from_secs(30), Duration::from_secs(60))
}

/// A paused Redis (`CLIENT PAUSE 3000 ALL`) fails a claim within the response timeout instead
/// of hanging it, and the same ledger works again once the pause ends. A killed Redis fails
/// calls; restarted on the same port, the same ledger recovers by itself.
#[test]
fn outages_fail_fast_and_the_ledger_recovers() {
    if redis_url().is_none() {
        return;
    }
    let mut servers = Servers::new(temp_dir("outage"));
    let port = free_port();
    servers.start(port, &[]);
    let timeout = Duration::from_millis(300);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let ledger = RedisLedger::builder()
                .with_response_timeout(timeout)
                .connect(format!("redis://127.0.0.1:{port}").as_str())
                .await
                .expect("connect");
            acquire(&ledger, &claim_of("before")).await;

            // Paused: the claim fails within the response timeout (plus margin), never hangs.
            assert!(cli(port, &["client", "pause", "3000", "all"]).is_some());
            let paused_at = Instant::now();
            let started = Instant::now();
            let outcome = ledger.claim(&claim_of("paused")).await;
            let took = started.elapsed();
            assert!(
                matches!(outcome, Err(LedgerError::Backend(_))),
                "a claim on a paused Redis: {outcome:?}"
            );
            assert!(
                took < timeout * 3 + Duration::from_millis(500),
                "took {took:?}"
            );
            eprintln!(
                "claim during CLIENT PAUSE failed after {took:?}: {:?}",
                outcome.err()
            );

            // After the pause, the very next claim succeeds on the same ledger.
            tokio::time::sleep(
                (paused_at + Duration::from_millis(3200)).saturating_duration_since(Instant::now()),
            )
            .await;
            acquire(&ledger, &claim_of("after-pause")).await;

            // Killed: calls fail, bounded.
            servers.kill(port);
            let started = Instant::now();
            let outcome = ledger.claim(&claim_of("down")).await;
            assert!(outcome.is_err(), "a claim on a stopped Redis: {outcome:?}");
            assert!(started.elapsed() < timeout * 3 + Duration::from_millis(500));

            // Restarted on the same port: the same ledger recovers by itself.
            servers.start(port, &[]);
            let restarted = Instant::now();
            let mut attempts = 0;
            loop {
                attempts += 1;
                match ledger.claim(&claim_of("recovered")).await {
                    Ok(Claim::Acquired(_)) => break,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(error) => {
                        assert!(
                            restarted.elapsed() < Duration::from_secs(10),
                            "not recovered 10 s after the restart: {error}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            eprintln!(
                "recovered {:?} after the restart, in {attempts} attempt(s)",
                restarted.elapsed()
            );
        });
}

/// `with_wait_replicas` on a server without replicas: the claim fails after the `WAIT`
/// timeout and is given back, so the key is free for the retry.
#[test]
fn a_claim_no_replica_acknowledged_is_failed_and_released() {
    conformance::run(async {
        let Some(fixture) = Prefixed::create().await else {
            return;
        };
        let url = fixture.url.clone();
        let prefix = fixture.ledger.prefix().to_owned();
        conformance::with_fixture(fixture, move |plain| async move {
            let waiting = RedisLedger::builder()
                .with_prefix(&prefix)
                .expect("prefix")
                .with_wait_replicas(1, Duration::from_millis(50))
                .connect(url.as_str())
                .await
                .expect("connect");
            let replicas: String = {
                let client = redis::Client::open(url.as_str()).expect("url");
                let mut con = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect");
                redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut con)
                    .await
                    .expect("INFO")
            };
            if !replicas.contains("connected_slaves:0") {
                eprintln!("REDIS_URL has replicas; the no-replica case is not checked here");
                return;
            }
            let r = claim_of("k");
            let outcome = waiting.claim(&r).await;
            assert!(
                matches!(outcome, Err(LedgerError::Backend(_))),
                "{outcome:?}"
            );
            // Given back: a plain claim acquires it afresh.
            let lease = acquire(&plain, &claim_of("k")).await;
            assert!(!lease.taken_over);
        })
        .await;
    });
}
