//! A deploy in the middle of a storm: the real `payment-service` binary gets SIGTERM while
//! payments with a long processor latency are in flight, drains, exits, and is started again on
//! the same address; the storm's retries then finish. Every payment is charged exactly once and
//! none is lost, so every 201 answered before the signal has its payment.

#![allow(clippy::unwrap_used)] // tests may panic

use std::{process::Stdio, time::Duration};

use payment_service::storm;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tower_idempotency_sqlx::sqlx;

/// A guard against hangs, not a timing under test.
const PATIENCE: Duration = Duration::from_secs(30);

async fn start(db_url: &str, addr: &str) -> Child {
    // The processor's own file beside the service's, kept across a restart (its charges are
    // audited) and fresh for each test: a charge key seen in an earlier run would be replayed
    // at once, without the processor's latency.
    let processor_url = db_url.replace(".db?", "-processor.db?");
    let mut child = Command::new(env!("CARGO_BIN_EXE_payment-service"))
        .args(["serve", "--addr", addr, "--database-url", db_url])
        .args(["--processor-database-url", &processor_url])
        .args(["--latency-ms", "400", "--drain-timeout-ms", "20000"])
        .env_remove("PAYMENT_SERVICE_PAUSE_AFTER_WRITE")
        .env_remove("PAYMENT_SERVICE_LEDGER_TABLE")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start payment-service");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, stdout.next_line())
        .await
        .expect("payment-service did not start listening")
        .unwrap()
        .expect("payment-service exited before listening");
    assert!(line.starts_with("listening on http://"), "{line}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_storm_drains_and_a_restart_charges_each_payment_once() {
    let file = std::env::temp_dir().join(format!(
        "payment-service-drain-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let db_url = format!("sqlite://{}?mode=rwc", file.display());
    // A free port, kept for the restart, so that the storm's URL stays valid.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");

    let first = start(&db_url, &addr).await;
    let mut config = storm::Config::new(format!("http://{addr}"));
    config.payments = 40;
    config.duplicates = 4;
    config.drop_rate = 0.1;
    config.drop_after = Duration::from_millis(300);
    config.concurrency = 8;
    // Connection refused while the service restarts: retried, with a 10-50 ms backoff.
    config.max_attempts = 5000;
    let storm = tokio::spawn(storm::run(config));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    // One more payment whose client leaves just before the signal: its handler is detached and
    // among the last to finish, so only the drain keeps the process alive until it is recorded.
    let client = reqwest::Client::new();
    let detached = client
        .post(format!("http://{addr}/payments"))
        .bearer_auth("tok_drain_test")
        .header("Idempotency-Key", "detached-before-sigterm")
        .json(&serde_json::json!({"customer": "drain-detached", "amount": 100, "currency": "EUR"}))
        .send();
    assert!(
        tokio::time::timeout(Duration::from_millis(150), detached)
            .await
            .is_err()
    );
    let pid = first.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let mut first = first;
    let exit = tokio::time::timeout(PATIENCE, first.wait())
        .await
        .expect("the service did not exit after SIGTERM")
        .unwrap();
    assert!(exit.success(), "a drained shutdown exits cleanly: {exit}");
    assert!(!storm.is_finished(), "the signal came mid-storm");
    // Drained: nothing the stopped process accepted is left in progress in the ledger.
    let pool = sqlx::SqlitePool::connect(&db_url).await.unwrap();
    let in_progress: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_records WHERE state = 'in_progress'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(
        in_progress, 0,
        "a payment accepted before SIGTERM was not recorded"
    );

    let mut second = start(&db_url, &addr).await;
    let summary = tokio::time::timeout(PATIENCE, storm)
        .await
        .expect("the storm did not finish")
        .unwrap()
        .unwrap();
    println!("{summary}");
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let processor = format!("{}-processor.db", file.with_extension("").display());
        for stem in [file.clone(), std::path::PathBuf::from(processor)] {
            let mut path = stem.into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
    assert_eq!(summary.double_charges, 0, "{summary}");
    assert_eq!(summary.lost, 0, "{summary}");
    assert_eq!(summary.created, 40, "{summary}");
    assert!(
        summary.server_errors > 0 || summary.unexpected > 0,
        "the storm saw the restart: {summary}"
    );
}

/// The drain itself, without a storm to hide it: the only payment in flight has lost its
/// client when SIGTERM arrives, so axum has no connection left to wait for. The process must
/// still wait for the detached handler and record its payment before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_payment_whose_client_left() {
    let file = std::env::temp_dir().join(format!(
        "payment-service-drain-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let db_url = format!("sqlite://{}?mode=rwc", file.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut service = start(&db_url, &addr).await;
    let detached = reqwest::Client::new()
        .post(format!("http://{addr}/payments"))
        .bearer_auth("tok_drain_test")
        .header("Idempotency-Key", "detached")
        .json(&serde_json::json!({"customer": "drain-one", "amount": 100, "currency": "EUR"}))
        .send();
    // The processor takes 400 ms; the client leaves after 100.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), detached)
            .await
            .is_err()
    );
    let pid = service.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(PATIENCE, service.wait())
        .await
        .expect("the service did not exit after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");
    let pool = sqlx::SqlitePool::connect(&db_url).await.unwrap();
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM idempotency_records")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let processor = format!("{}-processor.db", file.with_extension("").display());
        for stem in [file.clone(), std::path::PathBuf::from(processor)] {
            let mut path = stem.into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
    assert_eq!(
        states,
        ["completed"],
        "the detached payment was recorded before exit"
    );
}
