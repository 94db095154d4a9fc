//! Exactly-once mode through a crash of PostgreSQL itself (issue 18). In this mode the claim
//! commits without waiting for its WAL flush (`TransactionalLedger::claim_before_transaction`):
//! the handler's commit flushes the WAL through it. These tests start a throwaway cluster of
//! their own (`initdb` in a temporary directory, `postgres` on a free loopback port), so that
//! they can `kill -9` it, and so that its WAL counters see nothing but the test.
//!
//! - `an_exactly_once_claim_waits_for_no_wal_flush`: counted by `pg_stat_wal.wal_sync`, a plain
//!   claim waits for a flush each, the claim before a transaction for none of its own.
//! - `killing_postgres_mid_traffic_leaves_one_payment_per_key`: payments written in the
//!   handler's transaction, under concurrent retries of every key, while the postmaster and its
//!   children are killed with SIGKILL twice and restarted; every key ends with exactly one
//!   payment and a stored 201.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::{
    collections::HashMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Bytes, http::StatusCode, routing::post};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, LedgerTx, TransactionalLedger};
use tower_idempotency_core::{Claim, ClaimRequest, Fingerprint, IdempotencyKey, Ledger};
use tower_idempotency_sqlx::{
    PostgresLedger,
    sqlx::{self, Connection, PgConnection, postgres::PgPoolOptions},
};

/// A PostgreSQL cluster of the test's own, stopped and deleted on drop.
struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    postmaster: Option<Child>,
}

/// The directory holding `initdb` and `postgres`: `pg_config --bindir`, else PostgreSQL 15's.
fn bin_dir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    from_pg_config
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")])
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `program` with `args`, as the `postgres` user when we are root (PostgreSQL refuses to run as
/// root).
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Cluster {
    /// A new cluster, started; `None` (printed as a skip, a failure with `CI=true`) when
    /// PostgreSQL's server binaries are not installed.
    async fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("initdb and postgres are not installed, and CI=true");
            }
            eprintln!("SKIPPED: initdb and postgres are not installed");
            return None;
        };
        let dir = std::env::temp_dir().join(common::unique_name("ti-pgkill"));
        std::fs::create_dir_all(&dir).expect("a cluster directory");
        if is_root() {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(chown.success(), "chown the cluster directory");
        }
        let data = dir.join("data");
        let initdb = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run initdb");
        assert!(initdb.success(), "initdb failed");
        let mut cluster = Self {
            dir,
            port: free_port(),
            bin,
            postmaster: None,
        };
        cluster.run().await;
        Some(cluster)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the postmaster and waits (at most 60 s, crash recovery included) until it
    /// accepts connections.
    async fn run(&mut self) {
        let data = self.dir.join("data");
        let port = self.port.to_string();
        let socket_dir = self.dir.to_str().expect("a UTF-8 path");
        let child = as_postgres(
            &self.bin.join("postgres"),
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-p",
                &port,
                "-k",
                socket_dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
        self.postmaster = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(connection) = PgConnection::connect(&self.url()).await {
                let _ = connection.close().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the throwaway cluster did not accept connections within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The postmaster's pid, from `postmaster.pid` (the child we spawned may be `runuser`).
    fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// SIGKILL to the postmaster and every process it started: the server dies at once, with
    /// whatever WAL was still in its shared buffers.
    fn kill(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let mut victims = vec![pid];
            victims.extend(children_of(pid));
            for victim in victims {
                // A process that exited meanwhile is fine.
                let _ = Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Until every backend is gone the old shared memory is in use and a new postmaster
        // refuses to start; they were killed, so this is short.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self
            .postmaster_pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The pids whose parent is `parent`, from `/proc`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ledger_on(cluster: &Cluster, connections: u32) -> PostgresLedger {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect(&cluster.url())
        .await
        .expect("connect to the throwaway cluster");
    let ledger = PostgresLedger::new(pool);
    ledger.migrate().await.expect("migrate");
    ledger
}

/// WAL flushes (`fdatasync` calls) so far, as the statistics system has them.
async fn wal_syncs(url: &str) -> i64 {
    let mut connection = PgConnection::connect(url).await.expect("connect");
    let syncs = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(&mut connection)
        .await
        .expect("read pg_stat_wal");
    let _ = connection.close().await;
    syncs
}

/// `CLAIMS` fresh claims made by `claim` on a one-connection pool, and the WAL flushes counted
/// meanwhile (the pool is closed first: a backend reports its counters when it exits).
async fn flushes_for<F, Fut>(cluster: &Cluster, prefix: &str, claim: F) -> i64
where
    F: Fn(PostgresLedger, ClaimRequest) -> Fut,
    Fut: Future<Output = Claim>,
{
    const CLAIMS: usize = 100;
    let ledger = ledger_on(cluster, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = wal_syncs(&cluster.url()).await;
    for n in 0..CLAIMS {
        let key = IdempotencyKey::parse(format!("{prefix}-{n}").as_bytes()).expect("a key");
        let request = ClaimRequest::new(
            tower_idempotency_core::LedgerKey::new(b"scope", &key),
            tower_idempotency_core::ScopeDigest::new(b"scope"),
            Fingerprint::of(b"body"),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        assert!(matches!(
            claim(ledger.clone(), request).await,
            Claim::Acquired(_)
        ));
    }
    ledger.pool().close().await;
    // The statistics of an exited backend and of the WAL writer arrive within about a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wal_syncs(&cluster.url()).await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_claim_waits_for_no_wal_flush() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let plain = flushes_for(&cluster, "plain", |ledger, request| async move {
        ledger.claim(&request).await.expect("claim")
    })
    .await;
    let unflushed = flushes_for(&cluster, "unflushed", |ledger, request| async move {
        ledger
            .claim_before_transaction(&request)
            .await
            .expect("claim before a transaction")
    })
    .await;
    eprintln!("WAL flushes for 100 claims: plain {plain}, before a transaction {unflushed}");
    assert!(
        plain >= 90,
        "100 plain claims made only {plain} WAL flushes: is the cluster syncing commits?"
    );
    // The WAL writer still flushes on its own every `wal_writer_delay` (200 ms).
    assert!(
        unflushed <= 30,
        "100 claims before a transaction waited for {unflushed} WAL flushes"
    );
}

const KEYS: usize = 120;
/// Each key is sent by this many clients at once, and again until it is answered 201.
const RACERS: usize = 2;

fn app(ledger: PostgresLedger, handler_runs: Arc<AtomicUsize>) -> Router {
    let layer = IdempotencyLayer::builder(ledger)
        .unscoped()
        .with_lease(Duration::from_secs(3))
        .with_transactions()
        .build()
        .expect("valid layer settings");
    Router::new()
        .route(
            "/payments",
            post(
                move |mut tx: LedgerTx<PostgresLedger>, body: Bytes| async move {
                    handler_runs.fetch_add(1, Ordering::Relaxed);
                    let reference = String::from_utf8_lossy(&body).into_owned();
                    let written = sqlx::query("INSERT INTO payments (reference) VALUES ($1)")
                        .bind(reference)
                        .execute(&mut *tx)
                        .await;
                    match written {
                        Ok(_) => (StatusCode::CREATED, "charged"),
                        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "write failed"),
                    }
                },
            ),
        )
        .layer(layer)
}

/// Sends `key` until it is answered 201 (a first answer or a replay), at most for `within`.
async fn pay_until_answered(app: Router, key: String, within: Duration) -> Option<StatusCode> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        let request = http::Request::post("/payments")
            .header("idempotency-key", &key)
            .body(axum::body::Body::from(key.clone()))
            .expect("a request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let _ = response.into_body().collect().await;
        if status == StatusCode::CREATED {
            return Some(status);
        }
        last = Some(status);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_postgres_mid_traffic_leaves_one_payment_per_key() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let ledger = ledger_on(&cluster, 10).await;
    sqlx::query("CREATE TABLE payments (id bigserial PRIMARY KEY, reference text NOT NULL)")
        .execute(ledger.pool())
        .await
        .expect("create the payments table");
    let handler_runs = Arc::new(AtomicUsize::new(0));
    let app = app(ledger.clone(), handler_runs.clone());
    let answered = Arc::new(AtomicUsize::new(0));

    // Every key, sent by RACERS clients at once; 16 keys at a time.
    let keys: Vec<String> = (0..KEYS).map(|n| format!("pay-{n:04}")).collect();
    let traffic = {
        let (app, answered) = (app.clone(), answered.clone());
        tokio::spawn(async move {
            let mut outcomes = HashMap::new();
            for chunk in keys.chunks(16) {
                let mut racers = Vec::new();
                for key in chunk {
                    for _ in 0..RACERS {
                        let (app, key) = (app.clone(), key.clone());
                        racers.push(tokio::spawn(async move {
                            let status =
                                pay_until_answered(app, key.clone(), Duration::from_secs(90)).await;
                            (key, status)
                        }));
                    }
                }
                for racer in racers {
                    let (key, status) = racer.await.expect("a client");
                    if status == Some(StatusCode::CREATED) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes.entry(key).or_insert_with(Vec::new).push(status);
                }
            }
            outcomes
        })
    };

    // Kill PostgreSQL twice mid-traffic: once a quarter and once two thirds of the answers are in.
    for share in [KEYS * RACERS / 4, KEYS * RACERS * 2 / 3] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while answered.load(Ordering::Relaxed) < share && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let runs = handler_runs.load(Ordering::Relaxed);
        cluster.kill();
        eprintln!(
            "killed PostgreSQL after {} answers and {runs} handler runs",
            answered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.run().await;
    }

    let outcomes = traffic.await.expect("the traffic");
    for (key, statuses) in &outcomes {
        assert!(
            statuses.iter().all(|s| *s == Some(StatusCode::CREATED)),
            "{key} was not answered 201 by every client within the time: {statuses:?}"
        );
    }
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT reference, count(*) FROM payments GROUP BY reference")
            .fetch_all(ledger.pool())
            .await
            .expect("count the payments");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "keys paid more than once: {twice:?}");
    assert_eq!(counts.len(), KEYS, "every key has its payment");
    eprintln!(
        "{KEYS} keys, {} handler runs, one payment each",
        handler_runs.load(Ordering::Relaxed)
    );
}
