//! `payment-service ledger ...` against the real binary: inspect a key just paid, release a
//! claim left by a killed instance (the retry then runs once), evict a stored 402 (the retry
//! then runs again). Each on the SQLite default and on PostgreSQL (`DATABASE_URL`, a ledger
//! table of the test's own), where an operator would run it for a fleet of instances.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::{PATIENCE, Process};
use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::process::Command;

const TOKEN: &str = "tok_ledger_cli_test";

/// Where the service keeps its ledger and payments (a SQLite file, or PostgreSQL with a ledger
/// table of this test's own), and its processor's SQLite file; removed on drop.
struct Files {
    db: Backing,
    processor: PathBuf,
    /// Tells this run's customers apart in a payments table other runs share (PostgreSQL).
    tag: String,
}

enum Backing {
    Sqlite(PathBuf),
    Postgres { url: String, table: String },
}

fn sqlite_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{}.db", uuid::Uuid::new_v4().simple()))
}

impl Files {
    fn new() -> Self {
        Self {
            db: Backing::Sqlite(sqlite_file("payment-service-cli")),
            processor: sqlite_file("payment-processor-cli"),
            tag: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// On PostgreSQL (`DATABASE_URL`), or `None` after saying it skipped (a failure with
    /// `CI=true`).
    fn postgres() -> Option<Self> {
        let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "DATABASE_URL must be set in CI: the PostgreSQL CLI tests cannot be skipped"
                );
            }
            println!("SKIPPED: DATABASE_URL is not set, so this PostgreSQL CLI test did not run");
            return None;
        };
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Some(Self {
            db: Backing::Postgres {
                url,
                table: format!("cli_records_{tag}"),
            },
            processor: sqlite_file("payment-processor-cli"),
            tag,
        })
    }

    fn url(path: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    /// `--database-url` (and `--ledger-table` on PostgreSQL), as `serve` and `ledger` take them.
    fn database_args(&self) -> Vec<String> {
        match &self.db {
            Backing::Sqlite(path) => vec!["--database-url".into(), Self::url(path)],
            Backing::Postgres { url, table } => vec![
                "--database-url".into(),
                url.clone(),
                "--ledger-table".into(),
                table.clone(),
            ],
        }
    }

    /// On PostgreSQL, how many records the test's ledger table holds (so the test knows the
    /// service and the CLI used it); `None` on SQLite.
    async fn postgres_records(&self) -> Option<i64> {
        use tower_idempotency_sqlx::sqlx::{self, AssertSqlSafe};
        let Backing::Postgres { url, table } = &self.db else {
            return None;
        };
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let count = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM \"{table}\"")))
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        Some(count)
    }

    /// A customer name of this run's own.
    fn customer(&self, name: &str) -> String {
        format!("{name}-{}", &self.tag[..8])
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let mut files = vec![self.processor.clone()];
        match &self.db {
            Backing::Sqlite(path) => files.push(path.clone()),
            // Pass or fail.
            Backing::Postgres { url, table } => {
                tower_idempotency_tests::pg::drop_table_blocking(url.clone(), table.clone());
            }
        }
        for file in files {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Starts `payment-service serve` on `files`, with `hook` (a hidden test flag) if any.
async fn start(files: &Files, lease_ms: u64, hook: Option<&str>) -> Process {
    let lease = lease_ms.to_string();
    let processor = Files::url(&files.processor);
    let mut command = Process::command(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--lease-ms",
        &lease,
        "--processor-database-url",
        &processor,
        "--processor-lease-ms",
        "150",
        "--latency-ms",
        "0",
    ]);
    command.args(files.database_args());
    if let Some(hook) = hook {
        command.arg(hook);
    }
    Process::spawn(command).await
}

/// What one `payment-service ledger ...` run gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

async fn ledger(files: &Files, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_payment-service"))
        .arg("ledger")
        .args(args)
        .args(files.database_args())
        .env_remove("DATABASE_URL")
        .env_remove("PAYMENT_SERVICE_LEDGER_URL")
        .env_remove("PAYMENT_SERVICE_LEDGER_TABLE")
        .env_remove("PAYMENT_SERVICE_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, output)
        .await
        .expect("payment-service ledger hung")
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    eprintln!(
        "ledger {args:?} -> {:?}\n{stdout}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    Run {
        code: output.status.code().expect("exited, not signalled"),
        stdout,
    }
}

struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

async fn pay(client: &Client, base: &str, key: &str, customer: &str, amount: i64) -> Answer {
    let response = client
        .post(format!("{base}/payments"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": amount, "currency": "EUR", "customer": customer }))
        .send()
        .await
        .unwrap();
    Answer {
        status: response.status(),
        replayed: response.headers().contains_key("idempotent-replayed"),
        body: response.json().await.unwrap_or(Value::Null),
    }
}

fn client() -> Client {
    Client::builder().timeout(PATIENCE).build().unwrap()
}

#[tokio::test]
async fn inspect_finds_a_key_just_paid() {
    inspect_case(Files::new()).await;
}

#[tokio::test]
async fn inspect_finds_a_key_just_paid_on_postgres() {
    if let Some(files) = Files::postgres() {
        inspect_case(files).await;
    }
}

async fn inspect_case(files: Files) {
    let service = start(&files, 30_000, None).await;
    let alice = files.customer("cli-alice");
    let paid = pay(&client(), &service.base, "cli-paid-1", &alice, 1234).await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    if let Some(records) = files.postgres_records().await {
        assert_eq!(
            records, 1,
            "the service keeps its ledger in the test's table"
        );
    }

    let run = ledger(
        &files,
        &["inspect", "--token", TOKEN, "cli-paid-1", "--json"],
    )
    .await;
    assert_eq!(run.code, 0);
    let record = run.json();
    assert_eq!(record["state"], "completed");
    assert_eq!(record["status"], 201);
    assert!(record["body_len"].as_u64().unwrap() > 0);
    assert_eq!(
        record["key_attribute"].as_str(),
        payment_service::auth::key_attribute(TOKEN, "cli-paid-1").as_deref()
    );
    assert!(!run.stdout.contains("cli-paid-1") && !run.stdout.contains(TOKEN));

    // The block a person reads.
    let run = ledger(
        &files,
        &["inspect", "--token", TOKEN, "cli-paid-1", "--body"],
    )
    .await;
    assert_eq!(run.code, 0);
    for expected in [
        "completed",
        "201 Created",
        "bytes of body",
        "expires",
        "(in ",
    ] {
        assert!(
            run.stdout.contains(expected),
            "{expected:?} in {}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains(paid.body["id"].as_str().unwrap()),
        "--body prints the stored body"
    );

    // Another tenant's token finds nothing; a malformed key is an error.
    let other = ledger(&files, &["inspect", "--token", "tok_other", "cli-paid-1"]).await;
    assert_eq!(other.code, 1);
    assert!(other.stdout.contains("no live record"), "{}", other.stdout);
    let other = ledger(
        &files,
        &["inspect", "--token", "tok_other", "cli-paid-1", "--json"],
    )
    .await;
    assert_eq!((other.code, other.json()), (1, Value::Null));
    let bad = ledger(&files, &["inspect", "--token", TOKEN, "bad\u{1}key"]).await;
    assert_eq!(bad.code, 2);
    drop(service);
}

#[tokio::test]
async fn release_frees_a_claim_stuck_by_a_killed_instance_and_the_retry_runs_once() {
    release_case(Files::new()).await;
}

#[tokio::test]
async fn release_frees_a_claim_stuck_by_a_killed_instance_on_postgres() {
    if let Some(files) = Files::postgres() {
        release_case(files).await;
    }
}

async fn release_case(files: Files) {
    let client = client();
    let bob = files.customer("cli-bob");
    let key = "cli-stuck-1";
    let mut doomed = start(&files, 500, Some("--pause-after-write")).await;
    let first = tokio::spawn({
        let (client, base, bob) = (client.clone(), doomed.base.clone(), bob.clone());
        async move {
            client
                .post(format!("{base}/payments"))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", key)
                .json(&json!({ "amount": 1234, "currency": "EUR", "customer": bob }))
                .send()
                .await
        }
    });
    assert_eq!(doomed.next_line().await.as_deref(), Some("WRITTEN"));
    doomed.kill().await;
    assert!(first.await.unwrap().is_err(), "its connection died with it");

    // Once the lease (500 ms) lapsed, the claim is listed as stuck.
    let attribute = payment_service::auth::key_attribute(TOKEN, key).unwrap();
    let started = Instant::now();
    let stuck = loop {
        let run = ledger(&files, &["stuck", "--older-than-ms", "0", "--json"]).await;
        assert_eq!(run.code, 0);
        let list = run.json();
        if !list.as_array().unwrap().is_empty() {
            break list;
        }
        assert!(started.elapsed() < PATIENCE, "never listed as stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stuck.as_array().unwrap().len(), 1, "{stuck}");
    assert_eq!(stuck[0]["key_attribute"], attribute.as_str());
    assert_eq!(stuck[0]["state"], "in_progress");
    assert_eq!(stuck[0]["lease_lapsed"], true);
    // With a token, only its tenant's.
    let theirs = ledger(&files, &["stuck", "--token", "tok_other", "--json"]).await;
    assert_eq!(theirs.json(), json!([]));
    let human = ledger(&files, &["stuck"]).await;
    assert!(
        human.stdout.contains("1 claim(s) stuck"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains(" ago)"), "{}", human.stdout);

    let released = ledger(&files, &["release", "--token", TOKEN, key, "--json"]).await;
    assert_eq!(released.code, 0);
    assert_eq!(released.json()["released"], true);
    assert_eq!(
        released.json()["record"]["operation_id"],
        stuck[0]["operation_id"]
    );
    let again = ledger(&files, &["release", "--token", TOKEN, key]).await;
    assert_eq!(again.code, 1, "nothing left to release");
    let none = ledger(&files, &["stuck", "--json"]).await;
    assert_eq!(none.json(), json!([]));

    // The retry runs once (201, not a replay); the one after is its replay; one payment.
    let restarted = start(&files, 30_000, None).await;
    let retry = pay(&client, &restarted.base, key, &bob, 1234).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert!(!retry.replayed);
    let replay = pay(&client, &restarted.base, key, &bob, 1234).await;
    assert!(replay.replayed);
    assert_eq!(replay.body["id"], retry.body["id"]);
    let payments: Value = client
        .get(format!("{}/payments?customer={bob}", restarted.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        payments["payments"].as_array().unwrap().len(),
        1,
        "{payments}"
    );

    // A completed key is not released.
    let completed = ledger(&files, &["release", "--token", TOKEN, key]).await;
    assert_eq!(completed.code, 1);
    assert!(completed.stdout.contains("refused"), "{}", completed.stdout);
}

#[tokio::test]
async fn evict_of_a_stored_402_makes_the_retry_run_again() {
    evict_case(Files::new()).await;
}

#[tokio::test]
async fn evict_of_a_stored_402_makes_the_retry_run_again_on_postgres() {
    if let Some(files) = Files::postgres() {
        evict_case(files).await;
    }
}

async fn evict_case(files: Files) {
    let client = client();
    let carol = files.customer("cli-carol");
    let service = start(&files, 30_000, None).await;
    let key = "cli-declined-1";
    let declined = pay(&client, &service.base, key, &carol, 2_000_000).await;
    assert_eq!(
        declined.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        declined.body
    );
    let replayed = pay(&client, &service.base, key, &carol, 2_000_000).await;
    assert!(replayed.replayed, "a stored 4xx is replayed");

    let other = ledger(&files, &["evict", "--token", "tok_other", key]).await;
    assert_eq!(other.code, 1, "another tenant cannot evict it");
    let evicted = ledger(&files, &["evict", "--token", TOKEN, key]).await;
    assert_eq!(evicted.code, 0);
    assert!(evicted.stdout.contains("evicted"), "{}", evicted.stdout);
    assert!(evicted.stdout.contains("402"), "{}", evicted.stdout);
    let gone = ledger(&files, &["evict", "--token", TOKEN, key, "--json"]).await;
    assert_eq!(gone.code, 1);
    assert_eq!(gone.json()["refused"], "not-found");

    let retry = pay(&client, &service.base, key, &carol, 2_000_000).await;
    assert_eq!(retry.status, StatusCode::PAYMENT_REQUIRED);
    assert!(!retry.replayed, "evicted: the payment ran again");
    let record = ledger(&files, &["inspect", "--token", TOKEN, key, "--json"]).await;
    assert_eq!(record.json()["status"], 402);
    drop(service);
}
