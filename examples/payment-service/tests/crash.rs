//! Crash tests of exactly-once mode: the real `payment-service` binary, killed with SIGKILL in
//! the middle of a payment, restarted on the same database, and retried with the same key.
//!
//! Two kill points: during the processor call, before anything is written, and right
//! after the payment row is written (the hidden `--pause-after-write` hook prints `WRITTEN` and
//! hangs), before the transaction commits. Either way, every key ends with exactly one payment,
//! and the retries that reach the restarted service while the dead process's lease still runs
//! are refused (409, or 202 under `--in-progress accepted`) rather than run a second time.
//!
//! The contrast: with `--exactly-once false`, the row commits on its own before the response is
//! stored, so a crash after the write and a retry charge twice. That is the double charge
//! exactly-once mode exists to prevent.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::{PATIENCE, Process};
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tower_idempotency_sqlx::sqlx;

/// The dead process's lease: retries within it must be refused.
const LEASE_MS: &str = "1500";

/// Where the killed and the restarted service keep the ledger and the payments.
struct Db {
    url: String,
    /// PostgreSQL: a ledger table of this test's own, dropped at the end.
    ledger_table: Option<String>,
    /// SQLite: the file, removed at the end.
    file: Option<std::path::PathBuf>,
    /// The card processor's SQLite file (the in-process one of `serve`), removed at the end.
    processor: std::path::PathBuf,
}

fn processor_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "payment-processor-crash-{}.db",
        uuid::Uuid::new_v4().simple()
    ))
}

impl Db {
    fn sqlite() -> Self {
        let file = std::env::temp_dir().join(format!(
            "payment-service-crash-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        Self {
            url: format!("sqlite://{}?mode=rwc", file.display()),
            ledger_table: None,
            file: Some(file),
            processor: processor_file(),
        }
    }

    /// `None` (and `SKIPPED` printed) without `DATABASE_URL`, unless in CI, where it panics.
    fn postgres(test: &str) -> Option<Self> {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("DATABASE_URL must be set in CI: {test} cannot be skipped");
            }
            println!("SKIPPED {test}: DATABASE_URL is not set");
            return None;
        };
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
        Some(Self {
            url,
            ledger_table: Some(format!("payment_service_crash_{suffix}")),
            file: None,
            processor: processor_file(),
        })
    }

    async fn cleanup(&self, customers: &str) {
        if let Some(table) = &self.ledger_table {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("DELETE FROM payments WHERE customer LIKE $1")
                .bind(format!("{customers}%"))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        for file in self.file.iter().chain([&self.processor]) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// How a service is started.
#[derive(Debug, Clone, Copy)]
struct Mode {
    exactly_once: bool,
    /// `--in-progress accepted` (202) instead of the default 409.
    accepted: bool,
}

/// What a duplicate of a request in progress gets.
fn in_progress(mode: Mode) -> StatusCode {
    if mode.accepted {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CONFLICT
    }
}

/// Starts `payment-service serve` on `db` in `mode`.
async fn start(db: &Db, mode: Mode, latency_ms: u64, pause_after_write: bool) -> Process {
    let latency = latency_ms.to_string();
    let processor = processor_url(db);
    let mut command = Process::command(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--lease-ms",
        LEASE_MS,
        "--database-url",
        &db.url,
        "--latency-ms",
        &latency,
        // The processor (in-process, on its own file shared with the restarted service): the
        // killed one leaves its claim of the charge key behind, which must lapse before the
        // service's own (LEASE_MS), so the retry is not told the processor is busy.
        "--processor-database-url",
        &processor,
        "--processor-lease-ms",
        "600",
        "--exactly-once",
        if mode.exactly_once { "true" } else { "false" },
        "--in-progress",
        if mode.accepted {
            "accepted"
        } else {
            "conflict"
        },
    ]);
    if let Some(table) = &db.ledger_table {
        command.args(["--ledger-table", table]);
    }
    if pause_after_write {
        command.arg("--pause-after-write");
    }
    Process::spawn(command).await
}

fn processor_url(db: &Db) -> String {
    format!("sqlite://{}?mode=rwc", db.processor.display())
}

const TOKEN: &str = "tok_crash_test";

struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

/// A 503 from the idempotency layer itself (`ledger-unavailable`): the claim failed or timed
/// out, so the handler did not run.
fn ledger_refused(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        && body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("#ledger-unavailable"))
}

async fn pay(client: &Client, base: &str, key: &str, customer: &str) -> reqwest::Result<Answer> {
    let response = client
        .post(format!("{base}/payments"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": 1234, "currency": "EUR", "customer": customer }))
        .send()
        .await?;
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.json().await.unwrap_or(Value::Null);
    Ok(Answer {
        status,
        replayed,
        body,
    })
}

async fn payments_of(client: &Client, base: &str, customer: &str) -> Vec<Value> {
    let body: Value = client
        // The test's customers are letters, digits and dashes: nothing to escape.
        .get(format!("{base}/payments?customer={customer}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    body["payments"].as_array().unwrap().clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillPoint {
    /// While the processor call runs (the claim is held, nothing is written).
    InProcessorCall,
    /// After the payment row is written, before the answer (and the commit).
    AfterWrite,
}

/// What one crash gave.
#[derive(Debug)]
struct Crash {
    /// The retries' statuses, in order, the last one a 201.
    statuses: Vec<StatusCode>,
    /// Whether that 201 was a replay.
    replayed: bool,
    /// Its payment id.
    id: String,
    /// The customer's payments after the retry.
    payments: Vec<Value>,
}

/// Sends a payment to a fresh service, kills it at `point`, restarts it without the hooks on
/// the same database, and retries the payment with the same key until a 201.
async fn crash_once(db: &Db, mode: Mode, point: KillPoint, key: &str, customer: &str) -> Crash {
    let client = Client::builder().timeout(PATIENCE).build().unwrap();
    let (latency, pause) = match point {
        KillPoint::InProcessorCall => (600_000, false),
        KillPoint::AfterWrite => (0, true),
    };
    let mut doomed = start(db, mode, latency, pause).await;
    let first = tokio::spawn({
        let (client, base) = (client.clone(), doomed.base.clone());
        let (key, customer) = (key.to_owned(), customer.to_owned());
        async move { pay(&client, &base, &key, &customer).await }
    });
    match point {
        KillPoint::AfterWrite => {
            assert_eq!(doomed.next_line().await.as_deref(), Some("WRITTEN"));
        }
        KillPoint::InProcessorCall => {
            // The key is claimed, and a handler is in the processor call, once a duplicate is
            // told it is in progress, or (if the duplicate won the claim) does not come back.
            let probe = client
                .post(format!("{}/payments", doomed.base))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", key)
                .json(&json!({ "amount": 1234, "currency": "EUR", "customer": customer }))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            match probe {
                Ok(response) => {
                    let status = response.status();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    assert!(
                        status == in_progress(mode) || ledger_refused(status, &body),
                        "{status} {body}"
                    );
                }
                Err(error) => assert!(error.is_timeout(), "{error}"),
            }
        }
    }
    doomed.kill().await;
    // The first caller never gets its 201: its connection died with the process (or, if the
    // probe won the claim, it was told the key is in progress).
    match first.await.unwrap() {
        Err(_) => {}
        Ok(answer) => assert_eq!(answer.status, in_progress(mode)),
    }

    let restarted = start(db, mode, 0, false).await;
    let mut statuses = Vec::new();
    let answer = loop {
        let answer = pay(&client, &restarted.base, key, customer).await.unwrap();
        // A ledger call past its deadline (these processes run 1.5 s leases, so 500 ms
        // deadlines, on a busy machine) is refused like a key in progress: nothing ran.
        statuses.push(if ledger_refused(answer.status, &answer.body) {
            in_progress(mode)
        } else {
            answer.status
        });
        if answer.status == StatusCode::CREATED {
            break answer;
        }
        assert!(statuses.len() < 2000, "no 201 after {statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let payments = payments_of(&client, &restarted.base, customer).await;
    // Once completed, the key replays the same payment.
    let again = pay(&client, &restarted.base, key, customer).await.unwrap();
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed);
    assert_eq!(again.body["id"], answer.body["id"]);
    restarted.kill().await;
    Crash {
        statuses,
        replayed: answer.replayed,
        id: answer.body["id"].as_str().unwrap().to_owned(),
        payments,
    }
}

/// `rounds` crashes at each kill point, each with its own key and customer: each must charge
/// once, and the dead lease must be seen refusing retries.
async fn crashes_charge_once(db: &Db, mode: Mode, rounds: usize, run: &str) {
    let in_progress = in_progress(mode);
    let mut refused = 0;
    for round in 0..rounds {
        for point in [KillPoint::InProcessorCall, KillPoint::AfterWrite] {
            let key = format!("{run}-{round}-{point:?}");
            let customer = format!("{run}-{round}-{point:?}");
            let crash = crash_once(db, mode, point, &key, &customer).await;
            let (last, before) = crash.statuses.split_last().unwrap();
            assert_eq!(*last, StatusCode::CREATED, "{point:?}: {crash:?}");
            // Until the dead lease ran out: refused, never run. Then one execution, possibly
            // after a 503 from the processor (its own dead claim of the charge key, or its
            // ledger deadline on a busy machine): nothing is stored then, and the retry sends
            // the same charge key, so it still charges once (checked below).
            assert!(
                before
                    .iter()
                    .all(|s| *s == in_progress || *s == StatusCode::SERVICE_UNAVAILABLE),
                "{point:?}: {crash:?}"
            );
            assert!(!crash.replayed, "{point:?}: {crash:?}");
            assert_eq!(crash.payments.len(), 1, "{point:?}: {crash:?}");
            assert_eq!(crash.payments[0]["id"], crash.id.as_str(), "{crash:?}");
            refused += before.iter().filter(|s| **s == in_progress).count();
        }
    }
    // The restarted service was asked while the dead process still held the key: the
    // refusals above were exercised, not vacuous.
    assert!(
        refused > 0,
        "no retry reached the service within the dead lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_on_sqlite_charge_each_payment_once() {
    let db = Db::sqlite();
    let run = format!("crash-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mode = Mode {
        exactly_once: true,
        accepted: false,
    };
    crashes_charge_once(&db, mode, 10, &run).await;
    db.cleanup(&run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_on_postgres_charge_each_payment_once() {
    let Some(db) = Db::postgres("crashes_on_postgres_charge_each_payment_once") else {
        return;
    };
    let run = format!("crash-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mode = Mode {
        exactly_once: true,
        accepted: true,
    };
    crashes_charge_once(&db, mode, 6, &run).await;
    db.cleanup(&run).await;
}

/// The contrast: without exactly-once mode, the payment row commits before the response is
/// stored, so a crash right after the write leaves a payment behind a key that is still in
/// progress, and the retry, once the lease runs out, charges again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exactly_once_a_crash_after_the_write_charges_twice() {
    let db = Db::sqlite();
    let run = format!("crash-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mode = Mode {
        exactly_once: false,
        accepted: false,
    };
    let crash = crash_once(&db, mode, KillPoint::AfterWrite, &run, &run).await;
    assert_eq!(
        crash.statuses.last(),
        Some(&StatusCode::CREATED),
        "{crash:?}"
    );
    assert!(!crash.replayed, "{crash:?}");
    assert_eq!(crash.payments.len(), 2, "the double charge: {crash:?}");
    db.cleanup(&run).await;
}
