//! A Redis Cluster failover mid-traffic (issue 15): the test starts a Cluster (3 masters, each
//! with replicas, `cluster-node-timeout 1000`), sends 300 keys twice each through the layer on
//! `RedisLedger::connect_cluster` over ~6 s, and `SIGKILL`s (by pid) the master that owns most
//! of those keys' slots 2.5 s in. The client retries 503 and 409 with the same key until it
//! gets 2xx. Every request is answered within its bound, the service recovers by itself, and the
//! test prints what it measured: 503s, the failover as the client saw it, keys run twice.
//!
//! Two runs: the default ledger (asynchronous replication: a claim acknowledged just before
//! the kill can be lost, so a second run is possible and only bounded here), and one with
//! `with_wait_replicas(1, ..)`, where a claim is acknowledged only once a replica has it: no
//! key runs twice. Without `REDIS_URL` the test says it is skipped (and fails if `CI=true`).

#![allow(clippy::unwrap_used)] // tests may panic

#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::{
    collections::HashMap,
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
use redis_cluster::{cli, cluster_nodes, key_slot, redis_url, start_cluster, unique_prefix};
use tower::ServiceExt;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency_core::{IdempotencyKey, LedgerKey};
use tower_idempotency_redis::RedisLedger;

const KEYS: usize = 300;
/// The first sends are spread evenly over this.
const SPREAD: Duration = Duration::from_secs(6);
/// When the master is killed, after the first send.
const KILL_AFTER: Duration = Duration::from_millis(2500);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);
const LEDGER_TIMEOUT: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(5);
/// The bound of one request. A claim is bounded by the ledger timeout, but a completion that
/// fails is retried while the lease lasts before the response goes out.
const REQUEST_BOUND: Duration = Duration::from_secs(6);
/// The client's pause before it retries a 503 or a 409 with the same key.
const BACKOFF: Duration = Duration::from_millis(100);
/// A key's sends must have succeeded within this (retries included).
const KEY_BOUND: Duration = Duration::from_secs(20);
/// The killed master's slots must answer 2xx again within this after the kill.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// Handler run times, by key.
type Runs = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

fn app(runs: Runs, layer: IdempotencyLayer<RedisLedger>) -> Router {
    Router::new()
        .route(
            "/payments",
            post(move |headers: HeaderMap| {
                let runs = runs.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    runs.lock()
                        .unwrap()
                        .entry(key)
                        .or_default()
                        .push(Instant::now());
                    (StatusCode::CREATED, "paid")
                }
            }),
        )
        .layer(layer)
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
struct Attempt {
    key: usize,
    started: Instant,
    answered: Instant,
    status: StatusCode,
    replayed: bool,
}

/// Sends `key` until it gets 2xx (retrying 503 and 409 after [`BACKOFF`]); every request is
/// bounded by [`REQUEST_BOUND`], all of them by [`KEY_BOUND`].
async fn send_until_ok(app: &Router, index: usize, key: &str, log: &Mutex<Vec<Attempt>>) {
    let first = Instant::now();
    loop {
        let request = Request::post("/payments")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let started = Instant::now();
        let answer = tokio::time::timeout(REQUEST_BOUND, async {
            let response = app.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            body.collect().await.unwrap();
            parts
        })
        .await;
        let parts = answer.unwrap_or_else(|_| panic!("{key}: no answer within {REQUEST_BOUND:?}"));
        let status = parts.status;
        log.lock().unwrap().push(Attempt {
            key: index,
            started,
            answered: Instant::now(),
            status,
            replayed: parts
                .headers
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true"),
        });
        if status.is_success() {
            return;
        }
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::CONFLICT,
            "{key}: unexpected {status}"
        );
        assert!(
            first.elapsed() < KEY_BOUND,
            "{key}: no 2xx within {KEY_BOUND:?} (last {status})"
        );
        tokio::time::sleep(BACKOFF).await;
    }
}

/// What one run measured (printed with `Debug`).
#[derive(Debug)]
#[allow(dead_code)] // most fields are read through `Debug`
struct Measured {
    requests: usize,
    unavailable: usize,
    unavailable_elsewhere: usize,
    conflicts: usize,
    conflicts_elsewhere: usize,
    last_conflict: Option<Duration>,
    slowest: Duration,
    first_failure: Option<Duration>,
    first_success_after: Option<Duration>,
    last_failure: Option<Duration>,
    victim_keys: usize,
    claimed_last_second: usize,
    double_runs: usize,
    second_not_replayed: usize,
}

/// One failover run: a Cluster of 3 masters with `replicas` replicas each, the ledger built by
/// `builder`, traffic, a master killed mid-traffic.
fn failover_run(
    label: &str,
    replicas: usize,
    builder: tower_idempotency_redis::RedisLedgerBuilder,
) -> Measured {
    let started = Instant::now();
    let (mut servers, ports) = start_cluster(
        3,
        replicas,
        &[
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        ],
    );
    eprintln!(
        "[{label}] cluster of 3 masters x {replicas} replica(s) up and in sync in {:?}",
        started.elapsed()
    );
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let topology = cluster_nodes(ports[0]);
    let keys: Vec<String> = (0..KEYS)
        .map(|i| format!("failover-{}-{i}", std::process::id()))
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (victim, slots, killed_at, t0, log, runs) = runtime.block_on(async {
        let ledger = builder
            .with_prefix(&unique_prefix())
            .unwrap()
            .with_response_timeout(RESPONSE_TIMEOUT)
            .connect_cluster(urls)
            .await
            .expect("connect to the cluster");
        // Each key's slot, as the layer keys it (no scope function: the empty scope).
        let slots: Vec<u16> = keys
            .iter()
            .map(|key| {
                let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
                key_slot(ledger.record_key(&LedgerKey::new(b"", &key)).as_bytes())
            })
            .collect();
        let record = ledger.record_key(&LedgerKey::new(
            b"",
            &IdempotencyKey::parse(keys[0].as_bytes()).unwrap(),
        ));
        assert_eq!(
            cli(ports[0], &["cluster", "keyslot", &record]).map(|s| s.trim().to_owned()),
            Some(slots[0].to_string()),
            "the computed slot is the Cluster's"
        );
        // The master that owns most of the keys' slots.
        let victim = topology
            .iter()
            .filter(|n| n.master)
            .max_by_key(|n| slots.iter().filter(|&&s| n.serves(s)).count())
            .unwrap()
            .clone();

        let layer = IdempotencyLayer::builder(ledger)
            .with_lease(LEASE)
            .with_ledger_timeout(LEDGER_TIMEOUT)
            .without_circuit_breaker()
            .build()
            .unwrap();
        let runs = Runs::default();
        let app = app(runs.clone(), layer);
        let log = Arc::new(Mutex::new(Vec::new()));

        let t0 = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (app, log, key) = (app.clone(), log.clone(), key.clone());
            let at = t0 + SPREAD * u32::try_from(i).unwrap() / u32::try_from(KEYS).unwrap();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                send_until_ok(&app, i, &key, &log).await;
                // The retry, after the first answered.
                send_until_ok(&app, i, &key, &log).await;
            }));
        }
        tokio::time::sleep_until(t0 + KILL_AFTER).await;
        let pid = servers.pid(victim.port).unwrap();
        let killed_at = Instant::now();
        servers.kill(victim.port);
        eprintln!(
            "[{label}] SIGKILLed master 127.0.0.1:{} (pid {pid}) at {:?}",
            victim.port,
            t0.elapsed()
        );
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(40), task)
                .await
                .expect("every key's sends end within 40 s")
                .unwrap();
        }
        let log = std::mem::take(&mut *log.lock().unwrap());
        (victim, slots, killed_at, t0.into_std(), log, runs)
    });
    drop(runtime);
    let promoted = cluster_nodes(ports.iter().copied().find(|&p| p != victim.port).unwrap())
        .into_iter()
        .find(|n| n.master && !n.failed && n.port != victim.port && n.serves(victim.slots[0].0))
        .map(|n| n.port);
    drop(servers);

    let on_victim = |a: &Attempt| victim.serves(slots[a.key]);
    let since_kill = |at: Instant| at.saturating_duration_since(killed_at);
    let failures_on_victim: Vec<&Attempt> = log
        .iter()
        .filter(|a| on_victim(a) && !a.status.is_success())
        .collect();
    let first_failure = failures_on_victim.iter().map(|a| a.answered).min();
    let first_success_after = first_failure.and_then(|failed| {
        log.iter()
            .filter(|a| on_victim(a) && a.status.is_success() && a.started >= failed)
            .map(|a| a.answered)
            .min()
    });
    let runs = runs.lock().unwrap();
    let window = killed_at - Duration::from_secs(1)..killed_at;
    let claimed_last_second = keys
        .iter()
        .enumerate()
        .filter(|(i, key)| {
            victim.serves(slots[*i])
                && runs
                    .get(*key)
                    .and_then(|r| r.first())
                    .is_some_and(|t| window.contains(t))
        })
        .count();
    for key in &keys {
        assert!(
            runs.get(key).is_some_and(|r| !r.is_empty()),
            "{key} never ran"
        );
    }
    // The second send of each key is its last 2xx attempt.
    let mut last_ok: HashMap<usize, &Attempt> = HashMap::new();
    for a in log.iter().filter(|a| a.status.is_success()) {
        last_ok.insert(a.key, a);
    }
    let measured = Measured {
        requests: log.len(),
        unavailable: log
            .iter()
            .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
            .count(),
        unavailable_elsewhere: log
            .iter()
            .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE && !on_victim(a))
            .count(),
        conflicts: log
            .iter()
            .filter(|a| a.status == StatusCode::CONFLICT)
            .count(),
        conflicts_elsewhere: log
            .iter()
            .filter(|a| a.status == StatusCode::CONFLICT && !on_victim(a))
            .count(),
        last_conflict: log
            .iter()
            .filter(|a| a.status == StatusCode::CONFLICT)
            .map(|a| since_kill(a.answered))
            .max(),
        slowest: log
            .iter()
            .map(|a| a.answered - a.started)
            .max()
            .unwrap_or_default(),
        first_failure: first_failure.map(since_kill),
        first_success_after: first_success_after.map(since_kill),
        last_failure: failures_on_victim
            .iter()
            .map(|a| a.answered)
            .max()
            .map(since_kill),
        victim_keys: slots.iter().filter(|&&s| victim.serves(s)).count(),
        claimed_last_second,
        double_runs: runs.values().filter(|r| r.len() > 1).count(),
        second_not_replayed: last_ok.values().filter(|a| !a.replayed).count(),
    };
    eprintln!(
        "[{label}] promoted replica: {promoted:?}; traffic {:?} after the first send; {measured:#?}",
        log.iter()
            .map(|a| a.answered)
            .max()
            .map(|end| end.saturating_duration_since(t0)),
    );

    assert!(
        measured.slowest < REQUEST_BOUND,
        "a request took {:?}",
        measured.slowest
    );
    // The killed master's slots answer 2xx again, by themselves, within the bound.
    match (measured.first_failure, measured.first_success_after) {
        (Some(_), back) => assert!(
            back.is_some_and(|back| back < RECOVERY_BOUND),
            "{label}: the killed master's slots came back {back:?} after the kill"
        ),
        (None, _) => assert!(
            log.iter()
                .any(|a| on_victim(a) && a.status.is_success() && a.started > killed_at),
            "{label}: no request on the killed master's slots after the kill"
        ),
    }
    measured
}

#[test]
fn a_master_killed_mid_traffic_fails_over_and_the_service_keeps_answering() {
    if redis_url().is_none() {
        return;
    }
    let started = Instant::now();
    // Asynchronous replication: a claim acknowledged just before the kill may be lost and its
    // key run again. Bounded by the keys first run in the last second before the kill.
    let plain = failover_run("default", 1, RedisLedger::builder());
    assert!(
        plain.double_runs <= plain.claimed_last_second,
        "{} keys ran twice, {} were claimed on the killed master in the last second",
        plain.double_runs,
        plain.claimed_last_second
    );
    // A claim is acknowledged only once a replica has it. Two replicas per master, so that the
    // promoted one still has a replica to acknowledge `WAIT 1`.
    let waiting = failover_run(
        "wait-replicas",
        2,
        RedisLedger::builder().with_wait_replicas(1, Duration::from_millis(150)),
    );
    assert_eq!(waiting.double_runs, 0, "with WAIT 1, a key ran twice");
    eprintln!("both failover runs done in {:?}", started.elapsed());
}
