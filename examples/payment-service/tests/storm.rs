//! End to end over real TCP: the service on an ephemeral port, its card processor on another
//! (in-process, its own SQLite file), the storm against it (the same code as the `storm` binary),
//! on SQLite and on PostgreSQL; the audit checks both sides, payments and charges.

#![allow(clippy::unwrap_used)] // tests may panic

use std::time::Duration;

use payment_service::{
    Database, Settings,
    card_processor::{self, Faults},
    storm::{self, Summary},
};
use tower_idempotency::InProgress;

const PAYMENTS: usize = 60;

/// The processor fails a share of the charges before charging, a share after charging (503
/// with the charge recorded), and breaks the connection after charging for another share.
fn flaky(share: f64) -> Faults {
    Faults {
        latency: Duration::from_millis(20),
        fail_before: share,
        fail_after: share,
        drop_after: share / 2.0,
        pause_after_charge: false,
        lease: None,
    }
}

/// Serves `database` on 127.0.0.1:0 with a processor (its own SQLite file) misbehaving as
/// `faults`, and runs a storm of 60 payments x 6 duplicates with 20% of the requests dropped.
async fn storm_against(database: Database, in_progress: InProgress, faults: Faults) -> Summary {
    let processor_db = TempDb(std::env::temp_dir().join(format!(
        "payment-processor-e2e-{}.db",
        uuid::Uuid::new_v4().simple()
    )));
    let processor_url = card_processor::spawn(
        &format!("sqlite://{}?mode=rwc", processor_db.0.display()),
        faults,
    )
    .await
    .unwrap();
    let settings = Settings {
        processor_url,
        in_progress,
        ..Settings::default()
    };
    let router = database.router(&settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let mut config = storm::Config::new(format!("http://{addr}"));
    config.payments = PAYMENTS;
    config.duplicates = 6;
    config.drop_rate = 0.2;
    config.drop_after = Duration::from_millis(40);
    config.concurrency = 8;
    let summary = storm::run(config).await.unwrap();
    server.abort();
    println!("{summary}");
    summary
}

fn assert_clean(summary: &Summary) {
    assert_eq!(summary.double_charges, 0, "{summary}");
    assert_eq!(summary.lost, 0, "{summary}");
    assert_eq!(summary.created, PAYMENTS as u64, "{summary}");
    // Both sides: every payment has exactly one charge, and every charge its payment.
    assert_eq!(summary.processor_charges, PAYMENTS as u64, "{summary}");
    assert_eq!(summary.uncharged, 0, "{summary}");
    assert!(summary.is_clean(), "{summary}");
    assert_eq!(summary.unexpected, 0, "{summary}");
    // The storm really stormed: duplicates were answered from the ledger, and the network
    // lost requests that had to be retried.
    assert!(summary.replayed > 0, "{summary}");
    assert!(summary.dropped > 0 && summary.retries > 0, "{summary}");
    // Every payment's handler ran at least once, and no more often than it was created.
    assert!(summary.executed <= PAYMENTS as u64, "{summary}");
}

struct TempDb(std::path::PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_on_sqlite_charges_each_payment_once() {
    let file = TempDb(std::env::temp_dir().join(format!(
        "payment-service-e2e-{}.db",
        uuid::Uuid::new_v4().simple()
    )));
    let url = format!("sqlite://{}?mode=rwc", file.0.display());
    let database = Database::connect(&url, None).await.unwrap();
    // The processor fails before and after charging: the 503 releases the key, and the retry
    // sends the same charge key, so the processor replays instead of charging again.
    let summary = storm_against(database, InProgress::Conflict, flaky(0.15)).await;
    assert_clean(&summary);
    assert!(summary.conflicts > 0, "{summary}");
    assert!(summary.server_errors > 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_accepted_policy_charges_each_payment_once() {
    let file = TempDb(std::env::temp_dir().join(format!(
        "payment-service-e2e-{}.db",
        uuid::Uuid::new_v4().simple()
    )));
    let url = format!("sqlite://{}?mode=rwc", file.0.display());
    let database = Database::connect(&url, None).await.unwrap();
    let summary = storm_against(database, InProgress::Accepted, flaky(0.0)).await;
    assert_clean(&summary);
    assert!(summary.accepted > 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_on_postgres_charges_each_payment_once() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("DATABASE_URL must be set in CI: the PostgreSQL storm cannot be skipped");
        }
        println!("SKIPPED storm_on_postgres_charges_each_payment_once: DATABASE_URL is not set");
        return;
    };
    // A ledger table of this test's own; the payments are told apart by the storm's fresh
    // tenant and customers, so re-runs and parallel runs do not collide.
    let database = Database::connect(&url, Some("payment_service_e2e_records"))
        .await
        .unwrap();
    let summary = storm_against(
        database,
        InProgress::Wait {
            timeout: Duration::from_secs(5),
        },
        flaky(0.15),
    )
    .await;
    assert_clean(&summary);
    assert!(summary.server_errors > 0, "{summary}");
}

/// Issue 15: two service instances share one Redis ledger (the payments in one SQLite file)
/// behind a round-robin load balancer, so the storm's concurrent duplicates of a payment, each
/// on a connection of its own, land on both instances. No double charge, no lost payment, one
/// charge per payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_a_redis_ledger_charge_each_payment_once() {
    let Ok(redis_url) = std::env::var("REDIS_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("REDIS_URL must be set in CI: the Redis storm cannot be skipped");
        }
        println!("SKIPPED two_instances_sharing_a_redis_ledger: REDIS_URL is not set");
        return;
    };
    let file = TempDb(std::env::temp_dir().join(format!(
        "payment-service-redis-{}.db",
        uuid::Uuid::new_v4().simple()
    )));
    let processor_db = TempDb(std::env::temp_dir().join(format!(
        "payment-processor-redis-{}.db",
        uuid::Uuid::new_v4().simple()
    )));
    let processor_url = card_processor::spawn(
        &format!("sqlite://{}?mode=rwc", processor_db.0.display()),
        flaky(0.1),
    )
    .await
    .unwrap();
    let settings = Settings {
        processor_url,
        exactly_once: false,
        ..Settings::default()
    };
    let url = format!("sqlite://{}?mode=rwc", file.0.display());
    let mut tasks = Vec::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let database = Database::connect(&url, None)
            .await
            .unwrap()
            .with_ledger_url(&url, Some(&redis_url))
            .await
            .unwrap();
        assert_eq!(database.kind(), "redis");
        let router = database.router(&settings).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        instances.push(listener.local_addr().unwrap());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
    }
    // The load balancer: each new connection goes to the next instance.
    let balancer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = balancer.local_addr().unwrap();
    let served = std::sync::Arc::new([
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    ]);
    tasks.push(tokio::spawn({
        let served = served.clone();
        async move {
            let mut next = 0;
            while let Ok((mut client, _)) = balancer.accept().await {
                let instance = instances[next % 2];
                served[next % 2].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                next += 1;
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(instance).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }
    }));

    let mut config = storm::Config::new(format!("http://{addr}"));
    config.payments = PAYMENTS;
    config.duplicates = 6;
    config.drop_rate = 0.2;
    config.drop_after = Duration::from_millis(40);
    config.concurrency = 8;
    let summary = storm::run(config).await.unwrap();
    for task in tasks {
        task.abort();
    }
    println!("{summary}");
    assert_clean(&summary);
    for (i, count) in served.iter().enumerate() {
        let count = count.load(std::sync::atomic::Ordering::SeqCst);
        assert!(count > 10, "instance {i} served {count} connections");
    }
}

/// A Redis ledger cannot commit with the payments: exactly-once mode is refused at start.
#[tokio::test]
async fn exactly_once_on_a_redis_ledger_is_refused() {
    let Ok(redis_url) = std::env::var("REDIS_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("REDIS_URL must be set in CI");
        }
        println!("SKIPPED exactly_once_on_a_redis_ledger_is_refused: REDIS_URL is not set");
        return;
    };
    let database = Database::connect("sqlite::memory:", None)
        .await
        .unwrap()
        .with_ledger_url("sqlite::memory:", Some(&redis_url))
        .await
        .unwrap();
    let refused = database.router(&Settings::default());
    assert!(
        matches!(refused, Err(payment_service::StartError::NotTransactional)),
        "{refused:?}"
    );
}
