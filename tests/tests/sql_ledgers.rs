//! Ledger-level tests of the SQL ledgers beyond the conformance suite: corrupt rows, table names,
//! an unreachable database, many app instances on one table, and `LISTEN`/`NOTIFY`.

mod common;

use std::{error::Error as _, sync::Arc, time::Duration};

use tokio::sync::Barrier;
use tower_idempotency_core::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Ledger, LedgerError, LedgerKey, RecordState,
    ScopeDigest, StoredResponse, conformance::sample_response,
};
use tower_idempotency_sqlx::{
    PostgresLedger, SqliteLedger, TableNameError,
    sqlx::{self, AssertSqlSafe, PgPool, SqlitePool, postgres::PgListener},
};

const LONG: Duration = Duration::from_secs(60);

fn request(key: &str, body: &str) -> ClaimRequest {
    let parsed = IdempotencyKey::parse(key.as_bytes()).expect("a valid key");
    ClaimRequest::new(
        LedgerKey::new(b"scope", &parsed),
        ScopeDigest::new(b"scope"),
        Fingerprint::of(body.as_bytes()),
        LONG,
        Duration::from_secs(3600),
    )
}

/// Claims and completes `key`, returning its request.
async fn completed<L: Ledger>(ledger: &L, key: &str) -> ClaimRequest {
    let first = request(key, "body");
    let Claim::Acquired(lease) = ledger.claim(&first).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    ledger
        .complete(&first.key, lease.token, &sample_response(b"ok"), LONG)
        .await
        .expect("complete");
    first
}

fn assert_corrupt<T: std::fmt::Debug>(result: Result<T, LedgerError>, what: &str) {
    match result {
        Err(LedgerError::Corrupt { .. }) => {}
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

#[test]
fn with_table_rejects_bad_names() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _guard = rt.enter();
    let sqlite = SqliteLedger::new(SqlitePool::connect_lazy("sqlite::memory:").expect("a pool"));
    let postgres = PostgresLedger::new(
        PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("a lazy pool"),
    );
    for bad in [
        "",
        "Records",
        "1records",
        "records-v2",
        "records; DROP TABLE users",
        "\"records\"",
        "récords",
        &"r".repeat(64),
        "a.b.c",
        ".records",
    ] {
        assert!(
            matches!(
                sqlite.clone().with_table(bad),
                Err(TableNameError::Invalid { .. })
            ),
            "SQLite accepted {bad:?}"
        );
        assert!(
            postgres.clone().with_table(bad).is_err(),
            "PostgreSQL accepted {bad:?}"
        );
    }
    // A schema is a PostgreSQL notion.
    assert!(sqlite.clone().with_table("billing.records").is_err());
    let qualified = postgres
        .with_table("billing.records")
        .expect("a schema-qualified name");
    assert_eq!(qualified.table(), "billing.records");
    for good in ["records", "_r", "order", &"r".repeat(63)] {
        assert_eq!(
            sqlite
                .clone()
                .with_table(good)
                .expect("a valid name")
                .table(),
            good
        );
    }
}

#[tokio::test]
async fn sqlite_corrupt_rows_are_errors_not_panics() {
    let ledger = common::sqlite_file_ledger().await;
    let corruptions = [
        (
            "status",
            "UPDATE idempotency_records SET status = 1000 WHERE key = ?1",
        ),
        (
            "status type",
            "UPDATE idempotency_records SET status = 'abc' WHERE key = ?1",
        ),
        (
            "headers",
            "UPDATE idempotency_records SET headers = x'0009ff' WHERE key = ?1",
        ),
        (
            "fingerprint",
            "UPDATE idempotency_records SET fingerprint = x'00' WHERE key = ?1",
        ),
        (
            "operation id",
            "UPDATE idempotency_records SET operation_id = x'01' WHERE key = ?1",
        ),
    ];
    for (i, (what, sql)) in corruptions.into_iter().enumerate() {
        let first = completed(&ledger, &format!("k{i}")).await;
        sqlx::query(sql)
            .bind(&first.key.as_bytes()[..])
            .execute(ledger.pool())
            .await
            .expect("corrupt the row");
        assert_corrupt(ledger.claim(&request(&format!("k{i}"), "body")).await, what);
    }
    let first = completed(&ledger, "lookup").await;
    let Claim::Existing(existing) = ledger.claim(&first).await.expect("claim") else {
        panic!("completed")
    };
    sqlx::query("UPDATE idempotency_records SET headers = x'00' WHERE key = ?1")
        .bind(&first.key.as_bytes()[..])
        .execute(ledger.pool())
        .await
        .expect("corrupt the row");
    assert_corrupt(
        ledger.operation(&first.scope, existing.operation_id).await,
        "operation lookup",
    );
}

#[tokio::test]
async fn sqlite_memory_database_is_shared_by_the_pool() {
    let ledger = common::sqlite_memory_ledger().await;
    completed(&ledger, "k").await;
    // A clone, and any later connection of the pool, sees the same database.
    let clone = ledger.clone();
    let Claim::Existing(existing) = clone.claim(&request("k", "body")).await.expect("claim") else {
        panic!("the record is visible through the clone")
    };
    assert_eq!(
        existing.state,
        RecordState::Completed(sample_response(b"ok"))
    );
    // And migrating again is harmless.
    ledger.migrate().await.expect("migrate twice");
}

#[tokio::test]
async fn postgres_corrupt_rows_are_errors_not_panics() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let ledger = &table.ledger;
    let corruptions = [
        ("status", "SET status = 1000"),
        ("negative status", "SET status = -5"),
        ("headers", "SET headers = '\\x0009ff'::bytea"),
        ("fingerprint", "SET fingerprint = '\\x00'::bytea"),
        ("completed without status", "SET status = NULL"),
        // No CHECK constraint guards `state` since migration 0003; the read does.
        ("state", "SET state = 'done'"),
    ];
    for (i, (what, set)) in corruptions.into_iter().enumerate() {
        let first = completed(ledger, &format!("k{i}")).await;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{}\" {set} WHERE key = $1",
            table.name
        )))
        .bind(&first.key.as_bytes()[..])
        .execute(ledger.pool())
        .await
        .expect("corrupt the row");
        assert_corrupt(ledger.claim(&request(&format!("k{i}"), "body")).await, what);
    }
    let first = completed(ledger, "lookup").await;
    let Claim::Existing(existing) = ledger.claim(&first).await.expect("claim") else {
        panic!("completed")
    };
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\" SET headers = '\\x00'::bytea WHERE key = $1",
        table.name
    )))
    .bind(&first.key.as_bytes()[..])
    .execute(ledger.pool())
    .await
    .expect("corrupt the row");
    assert_corrupt(
        ledger.operation(&first.scope, existing.operation_id).await,
        "operation lookup",
    );
    table.drop().await;
}

#[tokio::test]
async fn postgres_unreachable_is_a_backend_error() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("a lazy pool");
    let ledger = PostgresLedger::new(pool);
    // Bounded so that a hang fails the test instead of stalling the run.
    let result = tokio::time::timeout(Duration::from_secs(30), ledger.claim(&request("k", "b")))
        .await
        .expect("an unreachable database fails fast");
    match result {
        Err(error @ LedgerError::Backend(_)) => {
            let source = error
                .source()
                .expect("the sqlx error is kept as the source");
            assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(matches!(
        ledger.purge_expired(10).await,
        Err(LedgerError::Backend(_))
    ));
    // A waiter without a database returns (having nothing to wait on) rather than hang.
    tokio::time::timeout(
        Duration::from_secs(30),
        ledger.wait_for_change(&request("k", "b").key, Duration::from_secs(1)),
    )
    .await
    .expect("wait_for_change returns");
}

/// Two app instances (two pools, two ledgers) on one table: 200 keys, each claimed by 8 racing
/// tasks spread across both, give exactly 200 winners, one per key.
#[test]
fn postgres_two_pools_one_winner_per_key() {
    tower_idempotency_core::conformance::run(async {
        let Some(table) = common::PgTable::create().await else {
            return;
        };
        let other = PostgresLedger::new(common::pg_pool(&table.url).await)
            .with_table(&table.name)
            .expect("the same table");
        let ledgers = [table.ledger.clone(), other.clone()];
        const KEYS: usize = 200;
        const CLAIMERS: usize = 8;
        let barrier = Arc::new(Barrier::new(KEYS * CLAIMERS));
        let mut tasks = Vec::new();
        for key in 0..KEYS {
            for claimer in 0..CLAIMERS {
                let ledger = ledgers[claimer % 2].clone();
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    let request = request(&format!("key-{key}"), "body");
                    barrier.wait().await;
                    (key, ledger.claim(&request).await.expect("claim"))
                }));
            }
        }
        let mut winners = [0usize; KEYS];
        for task in tasks {
            match task.await.expect("task panicked") {
                (key, Claim::Acquired(_)) => winners[key] += 1,
                (_, Claim::Existing(existing)) => {
                    assert_eq!(existing.state, RecordState::InProgress)
                }
            }
        }
        assert_eq!(
            winners.iter().sum::<usize>(),
            KEYS,
            "exactly {KEYS} acquired"
        );
        assert!(winners.iter().all(|&w| w == 1), "one winner per key");
        other.pool().close().await;
        table.drop().await;
    });
}

/// Completion and release of a record that a waiter watches send the key's hex digest on the
/// table's channel, and a waiter on another pool (another app instance) wakes and sees the
/// completion. Records nobody waits for send nothing (a notifying commit takes a database-wide
/// lock). Notifications arrive in commit order, so the first one received proves that the
/// unwatched changes before it sent none.
#[test]
fn postgres_notifies_watched_records_only_and_wakes_waiters_on_another_pool() {
    tower_idempotency_core::conformance::run(async {
        let Some(table) = common::PgTable::create().await else {
            return;
        };
        let mut listener = PgListener::connect(&table.url).await.expect("listen");
        listener
            .listen(table.ledger.channel())
            .await
            .expect("LISTEN");
        let hex = |key: &LedgerKey| {
            key.as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // Bounded, so that a notification never sent fails the test instead of hanging it.
        async fn next(listener: &mut PgListener) -> String {
            tokio::time::timeout(Duration::from_secs(30), listener.recv())
                .await
                .expect("a notification within 30 s")
                .expect("a notification")
                .payload()
                .to_owned()
        }

        // Nobody waits: completing and releasing notify nothing.
        for (name, release) in [("quiet-complete", false), ("quiet-release", true)] {
            let quiet = request(name, "body");
            let Claim::Acquired(lease) = table.ledger.claim(&quiet).await.expect("claim") else {
                panic!("acquired")
            };
            if release {
                table.ledger.release(&quiet.key, lease.token).await
            } else {
                let response = sample_response(b"quiet");
                table
                    .ledger
                    .complete(&quiet.key, lease.token, &response, LONG)
                    .await
            }
            .expect("the unwatched change");
        }

        let other = PostgresLedger::new(common::pg_pool(&table.url).await)
            .with_table(&table.name)
            .expect("the same table");

        // A watched release notifies, and it is the first notification.
        let released = request("released", "body");
        let Claim::Acquired(lease) = table.ledger.claim(&released).await.expect("claim") else {
            panic!("acquired")
        };
        let waiter = spawn_waiter(other.clone(), "released");
        wait_until_watched(&table, &released.key).await;
        table
            .ledger
            .release(&released.key, lease.token)
            .await
            .expect("release");
        assert_eq!(next(&mut listener).await, hex(&released.key));
        let woke = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the waiter wakes")
            .expect("the waiter did not panic");
        assert_eq!(woke, None, "the waiter claimed the released key");

        // A watched completion notifies and the waiter sees the response.
        let first = request("k", "body");
        let Claim::Acquired(lease) = table.ledger.claim(&first).await.expect("claim") else {
            panic!("acquired")
        };
        let waiter = spawn_waiter(other.clone(), "k");
        wait_until_watched(&table, &first.key).await;
        table
            .ledger
            .complete(&first.key, lease.token, &sample_response(b"done"), LONG)
            .await
            .expect("complete");
        assert_eq!(next(&mut listener).await, hex(&first.key));
        let response = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the waiter wakes")
            .expect("the waiter did not panic");
        assert_eq!(response, Some(sample_response(b"done")));
        other.pool().close().await;
        table.drop().await;
    });
}

/// A duplicate of `key` (body "body") waiting as the layer's `Wait` policy does: it waits for a
/// change, then claims again, until the record is completed (`Some` of its response) or
/// released (`None`: its own claim won the key).
fn spawn_waiter(
    ledger: PostgresLedger,
    key: &'static str,
) -> tokio::task::JoinHandle<Option<StoredResponse>> {
    tokio::spawn(async move {
        loop {
            ledger
                .wait_for_change(&request(key, "body").key, Duration::from_secs(60))
                .await;
            match ledger.claim(&request(key, "body")).await.expect("claim") {
                Claim::Existing(e) => {
                    if let RecordState::Completed(response) = e.state {
                        return Some(response);
                    }
                }
                Claim::Acquired(_) => return None,
            }
        }
    })
}

/// Until a waiter has marked `key`'s record watched (bounded).
async fn wait_until_watched(table: &common::PgTable, key: &LedgerKey) {
    let sql = format!("SELECT watched FROM {} WHERE key = $1", table.name);
    for _ in 0..3000 {
        let watched: Option<bool> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .bind(&key.as_bytes()[..])
            .fetch_optional(table.ledger.pool())
            .await
            .expect("read watched");
        if watched == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the waiter never marked the record watched");
}

/// A schema-qualified table is created (twice, harmlessly) and used.
#[tokio::test]
async fn postgres_schema_qualified_table_migrates_idempotently() {
    let Some(url) = common::database_url() else {
        return;
    };
    let pool = common::pg_pool(&url).await;
    let schema = common::unique_name("ti_test_schema");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&pool)
        .await
        .expect("create the schema");
    let _cleanup = tower_idempotency_tests::pg::SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let ledger = PostgresLedger::new(pool.clone())
        .with_table(&format!("{schema}.records"))
        .expect("a qualified name");
    let twin = ledger.clone();
    let (a, b) = tokio::join!(ledger.migrate(), twin.migrate());
    a.expect("migrate");
    b.expect("migrate concurrently");
    ledger.migrate().await.expect("migrate again");
    completed(&ledger, "k").await;
}

/// `migrate()` upgrades a table made by an earlier release, in a schema of its own (the index it
/// drops must be named with the schema): migration 0003 drops 0001's CHECK constraint on `state`
/// (planned again in every write, issue 18) and leaves an operator's own; 0004 replaces the
/// `expires_at` index with one on `purge_from` (so that a completion is a heap-only update); and
/// records written before 0004 are still purged once expired, and only then.
#[tokio::test]
async fn postgres_migrate_upgrades_an_older_table() {
    let Some(url) = common::database_url() else {
        return;
    };
    let pool = common::pg_pool(&url).await;
    let schema = common::unique_name("ti_test_older");
    let run = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("SQL set-up")
        }
    };
    run(format!("CREATE SCHEMA \"{schema}\"")).await;
    let _cleanup = tower_idempotency_tests::pg::SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let table = format!("{schema}.records");
    let quoted = format!("\"{schema}\".\"records\"");
    let ledger = PostgresLedger::new(pool.clone())
        .with_table(&table)
        .expect("a qualified name");
    // The table as the release before 0003 made it: 0001 (which also indexed `expires_at`) and
    // 0002, with one expired and one live record in it.
    for (_, sql) in ledger.migrations().iter().take(2) {
        run(sql.clone()).await;
    }
    run(format!(
        "CREATE INDEX records_expires_at ON {quoted} (expires_at); \
         ALTER TABLE {quoted} ADD CONSTRAINT operator_check CHECK (state <> ''); \
         INSERT INTO {quoted} (key, scope, fingerprint, operation_id, token, state, \
           lease_until, expires_at) \
         SELECT sha256(k::bytea), sha256('s'), sha256('f'), gen_random_uuid(), \
           gen_random_uuid(), 'in_progress', now(), now() + e * interval '1 hour' \
         FROM (VALUES ('old-expired', -1), ('old-live', 1)) AS v(k, e)"
    ))
    .await;
    let catalog = |sql: &'static str| {
        let (pool, quoted) = (pool.clone(), quoted.clone());
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(quoted)
                .fetch_one(&pool)
                .await
                .expect("read the catalog")
        }
    };
    let checks =
        "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'";
    let indexed = "SELECT count(*) FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = $1::regclass AND a.attname = 'expires_at'";
    let purge_index = "SELECT count(*) FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = $1::regclass AND a.attname = 'purge_from'";
    let before = (catalog(checks).await, catalog(indexed).await);
    let (a, b) = tokio::join!(ledger.migrate(), ledger.migrate());
    a.expect("migrate");
    b.expect("migrate concurrently");
    ledger.migrate().await.expect("migrate again");
    let after = (
        catalog(checks).await,
        catalog(indexed).await,
        catalog(purge_index).await,
    );
    let purged = ledger.purge_expired(10).await;
    let left: Result<i64, _> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {quoted}")))
            .fetch_one(&pool)
            .await;
    completed(&ledger, "k").await;
    assert_eq!(
        before,
        (2, 1),
        "0001's CHECK on state and an operator's own, and 0001's expiry index"
    );
    assert_eq!(
        after,
        (1, 0, 1),
        "migrate drops 0001's CHECK (not the operator's) and the expiry index, and indexes purge_from"
    );
    assert_eq!(
        purged.expect("purge"),
        1,
        "the expired old record is purged"
    );
    assert_eq!(left.expect("count"), 1, "the live old record is kept");
}

/// A completion on PostgreSQL is a heap-only update (migration 0004, issue 18): it changes no
/// indexed column, so PostgreSQL adds no index entries and writes about a quarter less WAL.
/// Counted by PostgreSQL's own statistics, on a one-connection pool so that they can be flushed.
#[tokio::test]
async fn postgres_a_completion_is_a_heap_only_update() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&table.url)
        .await
        .expect("a one-connection pool");
    let ledger = PostgresLedger::new(pool.clone())
        .with_table(&table.name)
        .expect("a valid name");
    for i in 0..20 {
        // Completed with the claim's retention, as the layer does (a shorter one lowers
        // `purge_from`, an indexed column, and that update is not heap-only).
        let first = request(&format!("k{i}"), "body");
        let Claim::Acquired(lease) = ledger.claim(&first).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        ledger
            .complete(
                &first.key,
                lease.token,
                &sample_response(b"ok"),
                first.retention,
            )
            .await
            .expect("complete");
    }
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&pool)
        .await
        .expect("flush the statistics");
    let mut counts = (0, 0);
    for _ in 0..50 {
        counts = sqlx::query_as::<_, (i64, i64)>(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = $1::regclass",
        )
        .bind(format!("\"{}\"", table.name))
        .fetch_one(&pool)
        .await
        .expect("read the statistics");
        if counts.0 >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
    table.drop().await;
    assert_eq!(counts, (20, 20), "(updates, heap-only updates)");
}

/// A PostgreSQL test that panics before `PgTable::drop` still removes its table (the `Drop` guard
/// in tests/common), so a failing run does not leave `ti_test_*` tables behind.
#[test]
fn a_postgres_test_that_panics_still_drops_its_table() {
    let created = Arc::new(std::sync::Mutex::new(None));
    let record = created.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        tower_idempotency_core::conformance::run(async move {
            let Some(table) = common::PgTable::create().await else {
                return;
            };
            *record.lock().expect("not poisoned") = Some((table.name.clone(), table.url.clone()));
            panic!("a failing PostgreSQL test");
        })
    }));
    let Some((name, url)) = created.lock().expect("not poisoned").take() else {
        return; // skipped: no DATABASE_URL (and not CI)
    };
    assert!(outcome.is_err(), "the test's panic came through");
    tower_idempotency_core::conformance::run(async move {
        let pool = common::pg_pool(&url).await;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{name}\""))
            .fetch_one(&pool)
            .await
            .expect("look the table up");
        assert!(!exists, "table {name} was left behind");
        pool.close().await;
    });
}

/// The listener's connection is cut (a failover, a proxy's idle reaper) while a duplicate waits:
/// the waiter still sees the completion, and the listener comes back. A completion committed
/// while it was away sends a notification nobody hears; the listener then wakes every waiter to
/// re-check, and each waiter also re-checks once a second.
#[test]
fn postgres_waiters_survive_a_lost_listener_connection() {
    tower_idempotency_core::conformance::run(async {
        let Some(table) = common::PgTable::create().await else {
            return;
        };
        let first = request("k", "body");
        let Claim::Acquired(lease) = table.ledger.claim(&first).await.expect("claim") else {
            panic!("acquired")
        };
        let waiter = spawn_waiter(table.ledger.clone(), "k");
        // The waiter marks the record once `LISTEN` is in effect.
        wait_until_watched(&table, &first.key).await;
        let listeners = format!(
            "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' \
             AND query LIKE '%{}%' AND pid <> pg_backend_pid()",
            table.ledger.channel()
        );
        let cut: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT pid FROM ({listeners}) l WHERE pg_terminate_backend(pid)"
        )))
        .fetch_all(table.ledger.pool())
        .await
        .expect("terminate the listener");
        assert_eq!(cut.len(), 1, "one listener connection for the ledger");
        table
            .ledger
            .complete(&first.key, lease.token, &sample_response(b"done"), LONG)
            .await
            .expect("complete");
        let response = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the waiter saw the completion")
            .expect("the waiter did not panic");
        assert_eq!(response, Some(sample_response(b"done")));
        // And the listener is back (bounded).
        let mut back = false;
        for _ in 0..300 {
            let pids: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(listeners.clone()))
                .fetch_all(table.ledger.pool())
                .await
                .expect("list listeners");
            if pids.iter().any(|pid| !cut.contains(pid)) {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "the listener reconnected");
        table.drop().await;
    });
}

/// Two table names, 60 bytes long, that differ only in their last byte (issue 14): their index
/// names were cut to a common prefix, so the second table's `CREATE INDEX IF NOT EXISTS` found
/// the first table's indexes and created none.
fn long_twin_names(prefix: &str) -> [String; 2] {
    let base = format!("{prefix:_<58}");
    [format!("{base}_a"), format!("{base}_b")]
}

#[tokio::test]
async fn sqlite_tables_with_a_long_common_prefix_each_get_their_indexes() {
    let ledger = common::sqlite_memory_ledger().await;
    for name in long_twin_names("ti_long") {
        let twin = ledger.clone().with_table(&name).expect("a valid name");
        twin.migrate().await.expect("migrate");
        let indexes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 \
             AND sql IS NOT NULL",
        )
        .bind(&name)
        .fetch_one(ledger.pool())
        .await
        .expect("list the indexes");
        assert_eq!(indexes, 2, "{name} has its operation id and expiry indexes");
    }
}

#[tokio::test]
async fn postgres_tables_with_a_long_common_prefix_each_get_their_indexes() {
    let Some(url) = common::database_url() else {
        return;
    };
    let pool = common::pg_pool(&url).await;
    let names = long_twin_names(&common::unique_name("ti_test"));
    let mut counts = Vec::new();
    for name in &names {
        let ledger = PostgresLedger::new(pool.clone())
            .with_table(name)
            .expect("a valid name");
        ledger.migrate().await.expect("migrate");
        let indexes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() \
             AND tablename = $1 \
             AND (indexdef LIKE '%(operation_id)' OR indexdef LIKE '%(purge_from)')",
        )
        .bind(name)
        .fetch_one(&pool)
        .await
        .expect("list the indexes");
        counts.push(indexes);
    }
    for name in &names {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{name}\"")))
            .execute(&pool)
            .await
            .expect("drop the table");
    }
    pool.close().await;
    assert_eq!(counts, [2, 2], "each of {names:?} has its two indexes");
}

/// A claim that waits for a pool connection still gets its whole lease (issue 12): SQLite read the
/// clock before the wait, so a 1.5 s lease granted after a 2 s wait had already run out. (The
/// wait stays under `connect`'s 3 s acquire timeout.)
#[tokio::test]
async fn sqlite_lease_is_timed_from_when_the_claim_runs_not_from_the_pool_wait() {
    // An in-memory ledger's pool has one connection.
    let ledger = common::sqlite_memory_ledger().await;
    let held = ledger.pool().acquire().await.expect("the only connection");
    let mut claim = request("k", "body");
    claim.lease = Duration::from_millis(1500);
    let claimer = tokio::spawn({
        let (ledger, claim) = (ledger.clone(), claim.clone());
        async move { ledger.claim(&claim).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let Claim::Acquired(_) = claimer.await.expect("no panic").expect("claim") else {
        panic!("a fresh key is acquired")
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let lease_until: i64 =
        sqlx::query_scalar("SELECT lease_until FROM idempotency_records WHERE key = ?1")
            .bind(&claim.key.as_bytes()[..])
            .fetch_one(ledger.pool())
            .await
            .expect("read the lease");
    let left = i128::from(lease_until) - now_ms as i128;
    assert!(
        left > 750,
        "the lease has {left} ms left just after the claim returned; expected about 1500"
    );
}

/// Issue 18: the claim of a completed key is a plain read. It neither waits for a row lock that
/// another transaction holds nor takes a transaction id, so its commit writes no WAL record and
/// waits for no flush (an `ON CONFLICT DO UPDATE` whose `WHERE` excludes the row still locks it).
#[tokio::test]
async fn postgres_a_replay_claim_locks_nothing_and_writes_nothing() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let ledger = &table.ledger;
    let first = completed(ledger, "replay").await;
    let replayed = |claim: Result<Claim, LedgerError>| {
        matches!(
            claim,
            Ok(Claim::Existing(tower_idempotency_core::Existing {
                state: RecordState::Completed(_),
                ..
            }))
        )
    };

    // Another transaction holds the row's lock: the replay does not wait for it.
    let mut holder = ledger.pool().begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{}\" WHERE key = $1 FOR UPDATE",
        table.name
    )))
    .bind(&first.key.as_bytes()[..])
    .execute(&mut *holder)
    .await
    .expect("lock the row");
    let replay = tokio::time::timeout(Duration::from_secs(10), ledger.claim(&first))
        .await
        .expect("the replay's claim waited for the row lock");
    assert!(replayed(replay));
    holder.rollback().await.expect("rollback");

    // The ledger's own claim statement, inside a transaction we can look into: no xid.
    let mut tx = ledger.pool().begin().await.expect("begin");
    let found = sqlx::query(ledger.statements().claim.clone())
        .bind(&first.key.as_bytes()[..])
        .bind(&first.scope.as_bytes()[..])
        .bind(&first.fingerprint.as_bytes()[..])
        .bind(first.operation_id)
        .bind(first.token.as_uuid())
        .bind(60_000_i64)
        .bind(3_600_000_i64)
        .fetch_optional(&mut *tx)
        .await
        .expect("the claim statement");
    assert!(found.is_some(), "the claim found the completed record");
    let xid: Option<String> = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned()::text")
        .fetch_one(&mut *tx)
        .await
        .expect("xid");
    assert_eq!(
        xid, None,
        "the replay's claim took a transaction id (a write)"
    );
    tx.rollback().await.expect("rollback");

    // A fresh key still inserts, of course.
    assert!(matches!(
        ledger.claim(&request("fresh", "body")).await,
        Ok(Claim::Acquired(_))
    ));
    table.drop().await;
}

/// Issue 18: on SQLite too, once replays are common (a retry storm: more than one in eight of
/// the recent claims found a record), a replay's claim reads and writes nothing, so it does not
/// wait for the database's write lock: here another connection holds it (`BEGIN IMMEDIATE`) for
/// longer than the test waits, and the replay still answers. A fresh claim, which must write,
/// waits.
#[tokio::test]
async fn sqlite_a_replay_claim_does_not_wait_for_the_write_lock() {
    let ledger = common::sqlite_file_ledger().await;
    let first = completed(&ledger, "replay").await;
    // The storm's first replays.
    for _ in 0..16 {
        assert!(matches!(ledger.claim(&first).await, Ok(Claim::Existing(_))));
    }
    let mut writer = ledger.pool().acquire().await.expect("a connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *writer)
        .await
        .expect("take the write lock");
    let replay = tokio::time::timeout(Duration::from_secs(3), ledger.claim(&first))
        .await
        .expect("the replay's claim waited for the write lock");
    assert!(matches!(
        replay,
        Ok(Claim::Existing(tower_idempotency_core::Existing {
            state: RecordState::Completed(_),
            ..
        }))
    ));
    let fresh = request("fresh", "body");
    let blocked = tokio::time::timeout(Duration::from_millis(300), ledger.claim(&fresh)).await;
    assert!(
        blocked.is_err(),
        "a fresh claim wrote past a held write lock"
    );
    sqlx::query("ROLLBACK")
        .execute(&mut *writer)
        .await
        .expect("release the write lock");
    drop(writer);
    assert!(matches!(ledger.claim(&fresh).await, Ok(Claim::Acquired(_))));
}

/// Issue 18: a SQLite claim that skipped its read (ordinary traffic) still answers a replay when
/// the write lock is held elsewhere: a replay whose write fails (the lock held past the busy
/// timeout) is answered by the read it skipped, not with the error; and while the writer's batch
/// is stalled on the lock, claims read first, so a replay is answered while an earlier first
/// request still waits in the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_replay_is_answered_while_the_write_lock_is_held_elsewhere() {
    let ledger = common::sqlite_file_ledger().await;
    let stored = completed(&ledger, "replay").await;
    let mut lock = ledger.pool().acquire().await.expect("a connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *lock)
        .await
        .expect("take the write lock");
    // The writer is idle: the replay goes to it, and its write fails at the busy timeout.
    let replay = tokio::time::timeout(Duration::from_secs(30), ledger.claim(&stored))
        .await
        .expect("a bounded claim");
    assert!(
        matches!(&replay, Ok(Claim::Existing(existing)) if matches!(existing.state, RecordState::Completed(_))),
        "a replay whose write failed: {replay:?}"
    );
    // A first request waits in the writer for the lock; meanwhile a replay reads first.
    let fresh = tokio::spawn({
        let ledger = ledger.clone();
        async move { ledger.claim(&request("fresh", "body")).await }
    });
    // Its batch under way, and for longer than the ledger's 100 ms: stalled.
    until_queue(&ledger, (true, 0)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let replay = tokio::time::timeout(Duration::from_secs(30), ledger.claim(&stored))
        .await
        .expect("a bounded claim");
    assert!(matches!(replay, Ok(Claim::Existing(_))), "{replay:?}");
    assert!(
        !fresh.is_finished(),
        "the replay was answered only after the first request's batch ended"
    );
    sqlx::query("ROLLBACK")
        .execute(&mut *lock)
        .await
        .expect("release the write lock");
    drop(lock);
    // The first request's own write met the lock too; it is answered either way.
    let _ = fresh.await.expect("a task");
}

/// Claims `stored`, a completed record's request, and returns how many statements the writer
/// ran for it.
async fn replay_writes(ledger: &SqliteLedger, stored: &ClaimRequest) -> u64 {
    let before = ledger.group_commit_statements();
    match ledger.claim(stored).await {
        Ok(Claim::Existing(existing)) => {
            assert!(matches!(existing.state, RecordState::Completed(_)));
        }
        other => panic!("not a replay: {other:?}"),
    }
    ledger.group_commit_statements() - before
}

/// Issue 18: a SQLite claim reads the record before it claims only once replays are common.
/// While nearly every claim takes its key (under one in eight of the recent ones found a
/// record; a new ledger starts there), the read would find nothing and costs a first request a
/// round trip, so a claim goes straight to the writer, a replay too (it takes a turn and writes
/// nothing); after a run of replays, a replay is answered by the read, with no turn in the
/// writer; after a run of first requests, claims go straight to the writer again. Seen in the
/// writer's count of statements.
#[tokio::test]
async fn sqlite_a_claim_reads_first_only_once_replays_are_common() {
    let ledger = common::sqlite_file_ledger().await;
    let stored = completed(&ledger, "stored").await;
    let writes = || ledger.group_commit_statements();
    for n in 0..32 {
        let before = writes();
        assert!(matches!(
            ledger.claim(&request(&format!("first-{n}"), "body")).await,
            Ok(Claim::Acquired(_))
        ));
        assert_eq!(writes() - before, 1);
    }
    assert_eq!(
        replay_writes(&ledger, &stored).await,
        1,
        "among first requests, a replay took no turn in the writer"
    );
    for _ in 0..16 {
        replay_writes(&ledger, &stored).await;
    }
    assert_eq!(
        replay_writes(&ledger, &stored).await,
        0,
        "in a storm of replays, a replay took a turn in the writer"
    );
    for n in 0..200 {
        assert!(matches!(
            ledger.claim(&request(&format!("again-{n}"), "body")).await,
            Ok(Claim::Acquired(_))
        ));
    }
    assert_eq!(
        replay_writes(&ledger, &stored).await,
        1,
        "back among first requests, a replay still read first"
    );
}

/// Issue 18: concurrent fresh claims and completions on a SQLite file share transactions (group
/// commit: fewer commits, so fewer fsyncs, than writes) and statements (a batch's claims in one,
/// its completions in another), and each still gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_writes_share_transactions() {
    const TASKS: usize = 64;
    let ledger = common::sqlite_file_ledger().await;
    let before = ledger.group_commits();
    let statements_before = ledger.group_commit_statements();
    let start = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|n| {
            let (ledger, start) = (ledger.clone(), start.clone());
            tokio::spawn(async move {
                let request = request(&format!("batched-{n}"), "body");
                start.wait().await;
                let Claim::Acquired(lease) = ledger.claim(&request).await.expect("claim") else {
                    panic!("a fresh key is acquired")
                };
                ledger
                    .complete(&request.key, lease.token, &sample_response(b"ok"), LONG)
                    .await
                    .expect("complete");
                request
            })
        })
        .collect();
    let requests: Vec<ClaimRequest> = futures_join(tasks).await;
    let commits = ledger.group_commits() - before;
    assert!(
        commits < 2 * TASKS as u64,
        "{commits} transactions for {} writes: no batching",
        2 * TASKS
    );
    // And the claims, and the completions, of a batch share statements.
    let statements = ledger.group_commit_statements() - statements_before;
    assert!(
        statements < 2 * TASKS as u64,
        "{statements} statements for {} writes: no merging",
        2 * TASKS
    );
    for request in &requests {
        match ledger.claim(request).await {
            Ok(Claim::Existing(existing)) => {
                assert!(matches!(existing.state, RecordState::Completed(_)));
            }
            other => panic!("{:?} is not a replay: {other:?}", request.key),
        }
    }
}

/// Issue 18: in one batch, claims of one key have one winner (each sees the rows written before
/// it in the same transaction), and a write fenced off (a completion with a stranger's token)
/// fails alone: the other writes of its batch commit. The batch is made by holding SQLite's
/// write lock from another connection while the writes queue behind the writer's first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failed_write_does_not_fail_its_batch() {
    const RACERS: usize = 32;
    let ledger = common::sqlite_file_ledger().await;
    let held = request("held", "body");
    let Claim::Acquired(_) = ledger.claim(&held).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    let before = ledger.group_commits();
    let (racers, fenced, other) = in_one_batch(&ledger, "first", RACERS + 2, || {
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.claim(&request("raced", "body")).await })
            })
            .collect();
        let fenced = tokio::spawn({
            let (ledger, key) = (ledger.clone(), held.key);
            async move {
                let stranger = tower_idempotency_core::FencingToken::new();
                ledger
                    .complete(&key, stranger, &sample_response(b"no"), LONG)
                    .await
            }
        });
        let other = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.claim(&request("other", "body")).await }
        });
        (racers, fenced, other)
    })
    .await;
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("a task").expect("a racing claim") {
            Claim::Acquired(_) => won += 1,
            Claim::Existing(existing) => {
                assert!(matches!(existing.state, RecordState::InProgress));
            }
        }
    }
    assert_eq!(won, 1, "one winner per key, within a batch too");
    assert!(matches!(
        fenced.await.expect("a task"),
        Err(LedgerError::LeaseLost)
    ));
    assert!(matches!(
        other.await.expect("a task"),
        Ok(Claim::Acquired(_))
    ));
    // The first write alone, then everything else in one transaction.
    assert_eq!(ledger.group_commits() - before, 2);
    // What the batch wrote is there: the winner's lease, the other claim's.
    assert!(matches!(
        ledger.claim(&request("other", "body")).await,
        Ok(Claim::Existing(_))
    ));
}

/// Holds SQLite's write lock from another connection while `queue` queues `writes` writes on
/// `ledger`, so that they run in one batch: the writer takes a first write alone (a claim of the
/// fresh key `first`, which waits in `BEGIN IMMEDIATE`), and the writes `queue` spawns behind it
/// go into the next batch together. Returns what `queue` returned once the lock is released, and
/// the first write answered.
async fn in_one_batch<T>(
    ledger: &SqliteLedger,
    first: &str,
    writes: usize,
    queue: impl FnOnce() -> T,
) -> T {
    let mut lock = ledger.pool().acquire().await.expect("a connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *lock)
        .await
        .expect("take the write lock");
    let first = tokio::spawn({
        let (ledger, first) = (ledger.clone(), request(first, "body"));
        async move { ledger.claim(&first).await }
    });
    // The first write taken alone: a batch under way, nothing queued.
    until_queue(ledger, (true, 0)).await;
    let queued = queue();
    until_queue(ledger, (true, writes)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut *lock)
        .await
        .expect("release the write lock");
    drop(lock);
    assert!(matches!(
        first.await.expect("a task"),
        Ok(Claim::Acquired(_))
    ));
    queued
}

/// Waits until the ledger's group commit is in the state `expected` (a batch under way, writes
/// queued for the next), within a generous bound.
async fn until_queue(ledger: &SqliteLedger, expected: (bool, usize)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while ledger.group_commit_queue() != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group commit is {:?}, not {expected:?}",
            ledger.group_commit_queue()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Issue 18: a batch writes its completions in one statement, and each is still fenced by its
/// own key and token. In one batch of eight, a lapsed holder's completion beside its successor's
/// is refused while the successor's is written. In another, a lease completed twice at once is
/// completed once: the repeat runs after the statement (as it would one after the other) and is
/// refused, and the completion told Ok is the one whose response is stored (in one statement
/// both would match the record, SQLite would store one of the two, and both would be told Ok).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_completions_in_one_statement_are_each_fenced() {
    let ledger = common::sqlite_file_ledger().await;
    // A lease that lapses at once, and its successor's.
    let mut lapsing = request("lapsed", "body");
    lapsing.lease = Duration::from_millis(1);
    let Claim::Acquired(stale) = ledger.claim(&lapsing).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let Claim::Acquired(successor) = ledger
        .claim(&request("lapsed", "body"))
        .await
        .expect("claim")
    else {
        panic!("a lapsed lease is taken over")
    };
    let mut leases = Vec::new();
    for n in 0..13 {
        let claim = request(&format!("held-{n}"), "body");
        let Claim::Acquired(lease) = ledger.claim(&claim).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        leases.push((claim.key, lease.token));
    }
    let complete = |key: LedgerKey, token, body: &'static [u8]| {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            ledger
                .complete(&key, token, &sample_response(body), LONG)
                .await
        })
    };

    // The stale holder, its successor and six others: eight, one statement.
    let (before, statements_before) = (ledger.group_commits(), ledger.group_commit_statements());
    let (stale_done, successor_done, held_done) = in_one_batch(&ledger, "first-a", 8, || {
        let stale_done = complete(lapsing.key, stale.token, b"stale");
        let successor_done = complete(lapsing.key, successor.token, b"successor");
        let held_done: Vec<_> = leases[1..7]
            .iter()
            .map(|(key, token)| complete(*key, *token, b"held"))
            .collect();
        (stale_done, successor_done, held_done)
    })
    .await;
    assert!(matches!(
        stale_done.await.expect("a task"),
        Err(LedgerError::LeaseLost)
    ));
    successor_done
        .await
        .expect("a task")
        .expect("the successor's completion");
    for done in held_done {
        done.await.expect("a task").expect("a completion");
    }
    // The first claim alone; then the eight in one statement, in one transaction.
    assert_eq!(ledger.group_commits() - before, 2);
    assert_eq!(ledger.group_commit_statements() - statements_before, 2);

    // One lease completed twice with two responses, and six others: eight completions, seven
    // distinct.
    let (before, statements_before) = (ledger.group_commits(), ledger.group_commit_statements());
    let (twice_done, held_done) = in_one_batch(&ledger, "first-b", 8, || {
        let (key, token) = leases[0];
        let twice_done = [
            complete(key, token, b"once-a"),
            complete(key, token, b"once-b"),
        ];
        let held_done: Vec<_> = leases[7..]
            .iter()
            .map(|(key, token)| complete(*key, *token, b"held"))
            .collect();
        (twice_done, held_done)
    })
    .await;
    for done in held_done {
        done.await.expect("a task").expect("a completion");
    }
    let [a, b] = twice_done;
    let twice = [a.await.expect("a task"), b.await.expect("a task")];
    let completed_by = match &twice {
        [Ok(()), Err(LedgerError::LeaseLost)] => &b"once-a"[..],
        [Err(LedgerError::LeaseLost), Ok(())] => &b"once-b"[..],
        other => panic!("a lease completed twice at once: {other:?}"),
    };
    let (commits, statements) = (
        ledger.group_commits() - before,
        ledger.group_commit_statements() - statements_before,
    );
    // The response stored is the one whose completion was answered Ok.
    for (key, expected) in [("held-0", completed_by), ("lapsed", &b"successor"[..])] {
        match ledger.claim(&request(key, "body")).await {
            Ok(Claim::Existing(existing)) => match existing.state {
                RecordState::Completed(stored) => assert_eq!(&stored.body[..], expected, "{key}"),
                other => panic!("{key} is not completed: {other:?}"),
            },
            other => panic!("{key} is not a replay: {other:?}"),
        }
    }
    // The first claim alone; then the seven distinct in statements of 4, 2 and 1, and the
    // repeat after them, in one transaction.
    assert_eq!(commits, 2);
    assert_eq!(statements, 1 + 3 + 1);
}

/// Issue 18: a write that violates a constraint inside a batch's merged statement fails alone.
/// Two fresh claims with one operation id (unique in the table) go into one statement with six
/// others; SQLite undoes the statement, the ledger runs its claims one by one, and only the
/// second claim of that operation id fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_that_fails_in_a_merged_statement_fails_alone() {
    let ledger = common::sqlite_file_ledger().await;
    let mut claims: Vec<ClaimRequest> = (0..8)
        .map(|n| request(&format!("merged-{n}"), "body"))
        .collect();
    claims[7].operation_id = claims[0].operation_id;
    let (before, statements_before) = (ledger.group_commits(), ledger.group_commit_statements());
    let tasks = in_one_batch(&ledger, "first", claims.len(), || {
        claims
            .iter()
            .cloned()
            .map(|claim| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.claim(&claim).await })
            })
            .collect::<Vec<_>>()
    })
    .await;
    let mut acquired = 0;
    let mut failed = Vec::new();
    for (n, task) in tasks.into_iter().enumerate() {
        match task.await.expect("a task") {
            Ok(Claim::Acquired(_)) => acquired += 1,
            Err(LedgerError::Backend(error)) => failed.push((n, error.to_string())),
            other => panic!("claim {n}: {other:?}"),
        }
    }
    assert_eq!(acquired, 7, "failed: {failed:?}");
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].0 == 0 || failed[0].0 == 7,
        "claim {} failed: {}",
        failed[0].0,
        failed[0].1
    );
    assert!(failed[0].1.contains("UNIQUE"), "{}", failed[0].1);
    // One transaction for the batch: the failed statement, then the eight one by one.
    assert_eq!(ledger.group_commits() - before, 2);
    assert_eq!(
        ledger.group_commit_statements() - statements_before,
        1 + 1 + 8
    );
}

/// Issue 18: a batch's merged completion looks each key up by the primary key rather than scan
/// the table (given its values as a subquery, SQLite 3.51 planned it as a scan of every live
/// record by the `expires_at` index). (The merged claim finds its conflicts by the primary key by
/// definition, `ON CONFLICT (key)`, which its plan does not show.)
#[tokio::test]
async fn sqlite_merged_statements_look_each_key_up() {
    let ledger = common::sqlite_file_ledger().await;
    for n in [2, 8, 64] {
        let (_, complete) = ledger.batch_statements(n).expect("a merged statement");
        let plan: Vec<String> =
            sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {complete}")))
                .fetch_all(ledger.pool())
                .await
                .unwrap_or_else(|error| panic!("the plan of {complete}: {error}"))
                .iter()
                .map(|step| sqlx::Row::get::<String, _>(step, "detail"))
                .collect();
        let on_table: Vec<&String> = plan
            .iter()
            .filter(|step| step.contains("idempotency_records"))
            .collect();
        assert!(
            !on_table.is_empty() && on_table.iter().all(|step| step.contains("(key=?)")),
            "{n} completions are not looked up by key:\n{}",
            plan.join("\n")
        );
    }
    assert!(ledger.batch_statements(1).is_none());
    assert!(ledger.batch_statements(3).is_none());
    assert!(ledger.batch_statements(128).is_none());
}

async fn futures_join<T: Send + 'static>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("a task"));
    }
    out
}

/// Issue 18: the default ledger (`ClaimStrategy::Adaptive`) claims a key nobody has used with a
/// plain `INSERT`, and once most claims find a stored record (a retry storm) answers a replay
/// with a plain `SELECT`; the claim statement (whose `INSERT .. ON CONFLICT DO UPDATE`
/// PostgreSQL sets up even when it neither inserts nor updates) runs only when those guess wrong.
/// Shown by privileges: a role without `UPDATE` can claim a fresh key by the plain insert but
/// cannot run the claim statement; a role with only `SELECT` gets a replay by the plain read.
#[tokio::test]
async fn postgres_the_claim_path_follows_the_mix_of_claims() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let admin = table.ledger.pool().clone();
    let reader = format!("{}_r", table.name);
    let inserter = format!("{}_i", table.name);
    // Dropped last, pass or fail (roles outlive the test's table).
    let _roles = tower_idempotency_tests::pg::RoleGuard {
        url: table.url.clone(),
        roles: vec![reader.clone(), inserter.clone()],
    };
    for sql in [
        format!("CREATE ROLE \"{reader}\" NOLOGIN"),
        format!("CREATE ROLE \"{inserter}\" NOLOGIN"),
        format!("GRANT SELECT ON \"{}\" TO \"{reader}\"", table.name),
        format!(
            "GRANT SELECT, INSERT ON \"{}\" TO \"{inserter}\"",
            table.name
        ),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .expect("the roles");
    }
    // One connection, so that `SET ROLE` applies to every statement the ledgers run.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&table.url)
        .await
        .expect("a one-connection pool");
    let role = |name: Option<&str>| {
        let sql = name.map_or_else(|| "RESET ROLE".to_owned(), |r| format!("SET ROLE \"{r}\""));
        let pool = pool.clone();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("set the role");
        }
    };
    let ledger = |strategy| {
        PostgresLedger::new(pool.clone())
            .with_table(&table.name)
            .expect("a valid name")
            .with_claim_strategy(strategy)
    };
    use tower_idempotency_sqlx::ClaimStrategy;
    let adaptive = ledger(ClaimStrategy::Adaptive);
    let combined = ledger(ClaimStrategy::Combined);
    let replayed = |claim: &Result<Claim, LedgerError>| {
        matches!(
            claim,
            Ok(Claim::Existing(tower_idempotency_core::Existing {
                state: RecordState::Completed(_),
                ..
            }))
        )
    };

    // Ordinary traffic: a first request is the plain insert.
    role(Some(&inserter)).await;
    let first = request("replay", "body");
    let inserted = adaptive.claim(&first).await;
    let combined_fresh = combined.claim(&request("other", "body")).await;
    role(None).await;
    if let Ok(Claim::Acquired(lease)) = &inserted {
        adaptive
            .complete(&first.key, lease.token, &sample_response(b"ok"), LONG)
            .await
            .expect("complete");
    }
    // A retry storm: every claim finds the stored response.
    for _ in 0..200 {
        assert!(replayed(&adaptive.claim(&first).await));
    }
    role(Some(&reader)).await;
    let storm = adaptive.claim(&first).await;
    let combined_replay = combined.claim(&first).await;
    let fresh_in_storm = adaptive.claim(&request("fresh", "body")).await;
    role(None).await;
    pool.close().await;
    table.drop().await;

    let denied = |claim: &Result<Claim, LedgerError>| {
        matches!(claim, Err(LedgerError::Backend(_)))
            && format!("{claim:?}").contains("permission denied")
    };
    assert!(
        matches!(inserted, Ok(Claim::Acquired(_))),
        "a first request ran the claim statement: {inserted:?}"
    );
    assert!(
        denied(&combined_fresh),
        "ClaimStrategy::Combined inserted first: {combined_fresh:?}"
    );
    assert!(
        replayed(&storm),
        "the replay ran the claim statement: {storm:?}"
    );
    assert!(
        denied(&combined_replay),
        "ClaimStrategy::Combined read first: {combined_replay:?}"
    );
    assert!(
        denied(&fresh_in_storm),
        "in a retry storm a first request did not run the claim statement: {fresh_in_storm:?}"
    );
}

/// The generic plans of `statement` (`PREPARE name(types) AS ..` with `plan_cache_mode =
/// force_generic_plan`, as sqlx's cached statements end up after five runs), in text.
async fn generic_plan(pool: &PgPool, name: &str, types: &str, sql: &str, args: &str) -> String {
    let mut connection = pool.acquire().await.expect("a connection");
    for setup in [
        "SET plan_cache_mode = force_generic_plan".to_owned(),
        format!("PREPARE {name}({types}) AS {sql}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(setup))
            .execute(&mut *connection)
            .await
            .expect("prepare");
    }
    let lines: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN EXECUTE {name}({args})")))
            .fetch_all(&mut *connection)
            .await
            .expect("explain");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DEALLOCATE {name}; RESET plan_cache_mode"
    )))
    .execute(&mut *connection)
    .await
    .expect("deallocate");
    lines.join("\n")
}

/// Issue 18: the statement that writes a batch of completions finds each record by the primary
/// key in every plan, including the generic plan a connection settles on while the table is new
/// and small (sqlx keeps it as the table grows). Its first form, `UPDATE .. FROM unnest(..)`, was
/// planned there as a scan of the whole table: measured, 160 µs of the database's CPU per request
/// once the table had grown.
#[tokio::test]
async fn postgres_a_batch_of_completions_is_planned_by_the_primary_key_on_a_new_table() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let pool = table.ledger.pool().clone();
    let mut plans = Vec::new();
    for n in [2, 16] {
        let sql = table
            .ledger
            .completion_batch_statement(n)
            .expect("a batch statement")
            .to_owned();
        let types = vec!["bytea, uuid, smallint, bytea, bytea, boolean, bigint"; n].join(", ");
        let args: Vec<String> = (0..n)
            .map(|i| {
                format!("sha256('k{i}'), gen_random_uuid(), 201::smallint, NULL, NULL, false, 1000")
            })
            .collect();
        let plan = generic_plan(
            &pool,
            &format!("ti_batch_{n}"),
            &types,
            &sql,
            &args.join(", "),
        )
        .await;
        plans.push((n, plan));
    }
    assert!(table.ledger.completion_batch_statement(1).is_none());
    assert!(table.ledger.completion_batch_statement(17).is_none());
    table.drop().await;
    for (n, plan) in plans {
        assert!(
            !plan.contains("Seq Scan") && plan.contains("Index Scan"),
            "the batch of {n} is not planned by the key:\n{plan}"
        );
    }
}

/// A ledger table that was emptied (every record expired and purged) and then vacuumed must
/// not make PostgreSQL plan the key lookups as sequential scans. VACUUM truncates a table's empty
/// tail; planned on a table of a few pages, `WHERE key = $1` is cheapest as a sequential scan,
/// and a connection keeps that cached plan while the table grows again: measured with pgbench
/// (claims on fresh keys, 10 connections), 11,000 claims per second on a table that had never
/// been vacuumed, 720 after it had been emptied and vacuumed. Migration 0005 keeps the table's
/// pages (`vacuum_truncate = false`).
#[tokio::test]
async fn postgres_key_lookups_stay_index_scans_after_the_table_was_emptied() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let pool = table.ledger.pool().clone();
    let t = format!("\"{}\"", table.name);
    // A busy day's records, all purged, then a VACUUM (autovacuum's, after the purge).
    for sql in [
        format!(
            "INSERT INTO {t} (key, scope, fingerprint, operation_id, token, state, lease_until, \
               expires_at, purge_from) \
             SELECT sha256(i::text::bytea), sha256('s'), sha256('f'), gen_random_uuid(), \
               gen_random_uuid(), 'in_progress', now(), now() + interval '1 day', now() \
             FROM generate_series(1, 5000) i"
        ),
        format!("DELETE FROM {t}"),
        format!("VACUUM {t}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("fill, empty and vacuum the table");
    }
    let sql = table.ledger.statements();
    let key = "sha256('k')";
    let uuid = "gen_random_uuid()";
    let key_args = format!("{key}, {key}, {key}, {uuid}, {uuid}, 1000, 1000");
    let complete_args = format!("{key}, {uuid}, 201::smallint, NULL, NULL, false, 1000");
    let statements = [
        (
            "claim",
            "bytea, bytea, bytea, uuid, uuid, bigint, bigint",
            sql.claim.as_str(),
            key_args.as_str(),
        ),
        (
            "complete",
            "bytea, uuid, smallint, bytea, bytea, boolean, bigint",
            sql.complete.as_str(),
            complete_args.as_str(),
        ),
        ("held", "bytea", sql.held.as_str(), key),
    ];
    let mut plans = Vec::new();
    for (statement, types, text, args) in statements {
        let name = format!("ti_{statement}");
        plans.push((
            statement,
            generic_plan(&pool, &name, types, text, args).await,
        ));
    }
    table.drop().await;
    for (statement, plan) in plans {
        assert!(
            !plan.contains("Seq Scan"),
            "{statement} is planned as a sequential scan:\n{plan}"
        );
    }
}

/// Migration 0005 sets the table's storage options once and leaves an operator's own value of
/// any of them as it is, however often `migrate()` runs.
#[tokio::test]
async fn postgres_migrate_keeps_an_operators_own_table_options() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let pool = table.ledger.pool().clone();
    let options = || async {
        let found: Option<Vec<String>> =
            sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = $1::regclass")
                .bind(format!("\"{}\"", table.name))
                .fetch_one(&pool)
                .await
                .expect("the table's options");
        let mut found = found.unwrap_or_default();
        found.sort();
        found
    };
    let migrated = options().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER TABLE \"{}\" SET (autovacuum_analyze_threshold = 50)",
        table.name
    )))
    .execute(&pool)
    .await
    .expect("an operator's setting");
    table.ledger.migrate().await.expect("migrate again");
    let again = options().await;
    table.drop().await;
    assert_eq!(
        migrated,
        [
            "autovacuum_analyze_threshold=1000",
            "autovacuum_vacuum_insert_threshold=1000",
            "autovacuum_vacuum_threshold=1000",
            "vacuum_truncate=false",
        ]
    );
    assert_eq!(
        again,
        [
            "autovacuum_analyze_threshold=50",
            "autovacuum_vacuum_insert_threshold=1000",
            "autovacuum_vacuum_threshold=1000",
            "vacuum_truncate=false",
        ]
    );
}

/// A ledger on `table`'s table with a pool of `connections`, and those connections held, so that
/// every ledger call queues for one until the holder is dropped.
async fn ledger_with_pool_held(
    table: &common::PgTable,
    connections: u32,
) -> (
    PostgresLedger,
    Vec<sqlx::pool::PoolConnection<sqlx::Postgres>>,
) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect(&table.url)
        .await
        .expect("connect to DATABASE_URL");
    let ledger = PostgresLedger::new(pool.clone())
        .with_table(&table.name)
        .expect("a valid table name");
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(pool.acquire().await.expect("a connection"));
    }
    (ledger, held)
}

/// Claims `key` on `ledger` and returns its request and fencing token.
async fn acquired(
    ledger: &PostgresLedger,
    request: ClaimRequest,
) -> (ClaimRequest, tower_idempotency_core::FencingToken) {
    match ledger.claim(&request).await.expect("claim") {
        Claim::Acquired(lease) => (request, lease.token),
        other => panic!("a fresh key is acquired, got {other:?}"),
    }
}

/// `ledger.complete(..)` on a task of its own.
fn spawn_complete(
    ledger: &PostgresLedger,
    key: LedgerKey,
    token: tower_idempotency_core::FencingToken,
    response: StoredResponse,
) -> tokio::task::JoinHandle<Result<(), LedgerError>> {
    let ledger = ledger.clone();
    tokio::spawn(async move { ledger.complete(&key, token, &response, LONG).await })
}

/// Whether `request`'s record is completed with `body`, read by a claim of the same request.
async fn replays(ledger: &PostgresLedger, request: &ClaimRequest, body: &[u8]) -> bool {
    match ledger.claim(request).await.expect("claim") {
        Claim::Existing(existing) => match existing.state {
            RecordState::Completed(response) => response.body.as_ref() == body,
            _ => false,
        },
        Claim::Acquired(_) => false,
    }
}

/// Issue 18: completions that wait for a pooled connection together are written by one
/// statement (one commit), and each is still fenced by its own key and token: in the same batch
/// as 48 holders' completions, a stale holder of a key taken over after its lease lapsed and a
/// stranger with a token nobody holds get `LeaseLost` and write nothing, and the key's new
/// holder's completion is the one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_completions_waiting_for_a_connection_share_a_statement_each_fenced() {
    const HOLDERS: usize = 48;
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let mut holders = Vec::new();
    for n in 0..HOLDERS {
        holders.push(acquired(&table.ledger, request(&format!("holder-{n}"), "body")).await);
    }
    // A key whose first holder's lease lapses and whose second holder takes it over.
    let mut short = request("taken-over", "body");
    short.lease = Duration::from_millis(50);
    let (_, stale) = acquired(&table.ledger, short.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (taken_over, current) = acquired(&table.ledger, request("taken-over", "body")).await;
    assert_ne!(stale, current);
    let (stranger_key, _) = acquired(&table.ledger, request("stranger", "body")).await;

    let (ledger, held) = ledger_with_pool_held(&table, 2).await;
    let before = ledger.completion_batches();
    let complete = |key, token, body: &'static [u8]| {
        spawn_complete(&ledger, key, token, sample_response(body))
    };
    let holder_tasks: Vec<_> = holders
        .iter()
        .map(|(request, token)| complete(request.key, *token, b"holder"))
        .collect();
    let stale_task = complete(taken_over.key, stale, b"stale");
    let current_task = complete(taken_over.key, current, b"current");
    let stranger_task = complete(
        stranger_key.key,
        tower_idempotency_core::FencingToken::new(),
        b"stranger",
    );
    // Every completion queues for a connection; then the pool has them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);

    for result in futures_join(holder_tasks).await {
        result.expect("a holder's completion");
    }
    assert!(matches!(
        stale_task.await.expect("a task"),
        Err(LedgerError::LeaseLost)
    ));
    current_task
        .await
        .expect("a task")
        .expect("the current holder's completion");
    assert!(matches!(
        stranger_task.await.expect("a task"),
        Err(LedgerError::LeaseLost)
    ));
    // At most 16 completions a statement: 51 make at least 4, and with batching, far fewer
    // than one statement each.
    let batches = ledger.completion_batches() - before;
    assert!(
        (4..=8).contains(&batches),
        "{} completions in {batches} batch statements",
        HOLDERS + 3
    );
    for (request, _) in &holders {
        assert!(
            replays(&ledger, request, b"holder").await,
            "{:?}",
            request.key
        );
    }
    assert!(replays(&ledger, &taken_over, b"current").await);
    assert!(matches!(
        ledger.claim(&stranger_key).await,
        Ok(Claim::Existing(existing)) if matches!(existing.state, RecordState::InProgress)
    ));
    table.drop().await;
}

/// Issue 18: a lease completed twice at once (a caller's bug, or its retry racing itself) with
/// two responses, both waiting for a connection, is completed once, and the completion told Ok
/// is the one whose response is stored; the other gets `LeaseLost`, as it would one after the
/// other. (In one statement both would find the record and PostgreSQL would keep one update of
/// the two, which one it does not say; the batch would have told both Ok.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lease_completed_twice_at_once_is_completed_once() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let (twice, token) = acquired(&table.ledger, request("twice", "body")).await;
    let mut others = Vec::new();
    for n in 0..4 {
        others.push(acquired(&table.ledger, request(&format!("other-{n}"), "body")).await);
    }
    let (ledger, held) = ledger_with_pool_held(&table, 1).await;
    let other_tasks: Vec<_> = others
        .iter()
        .map(|(request, token)| spawn_complete(&ledger, request.key, *token, sample_response(b"o")))
        .collect();
    let a = spawn_complete(&ledger, twice.key, token, sample_response(b"a"));
    let b = spawn_complete(&ledger, twice.key, token, sample_response(b"b"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    for result in futures_join(other_tasks).await {
        result.expect("a completion");
    }
    let both = [a.await.expect("a task"), b.await.expect("a task")];
    let stored: &[u8] = match &both {
        [Ok(()), Err(LedgerError::LeaseLost)] => b"a",
        [Err(LedgerError::LeaseLost), Ok(())] => b"b",
        other => panic!("a lease completed twice at once: {other:?}"),
    };
    assert!(
        replays(&ledger, &twice, stored).await,
        "the response stored is not the one told Ok"
    );
    table.drop().await;
}

/// Issue 18: the completion that leads a batch is its request's; if the request goes away while
/// it waits for the connection (its ledger timeout, say), the batch is finished on a task of its
/// own, so the completions that joined it are still written and answered. The leader's own
/// completion, whose caller went away before the batch was taken, is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_of_completions_outlives_its_leader() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let (leader, leader_token) = acquired(&table.ledger, request("leader", "body")).await;
    let (follower, follower_token) = acquired(&table.ledger, request("follower", "body")).await;
    let (ledger, held) = ledger_with_pool_held(&table, 1).await;
    let leading = spawn_complete(
        &ledger,
        leader.key,
        leader_token,
        sample_response(b"leader"),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let following = spawn_complete(
        &ledger,
        follower.key,
        follower_token,
        sample_response(b"follower"),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    leading.abort();
    assert!(leading.await.expect_err("aborted").is_cancelled());
    drop(held);

    tokio::time::timeout(Duration::from_secs(10), following)
        .await
        .expect("the follower is answered without its leader")
        .expect("a task")
        .expect("the follower's completion");
    assert!(replays(&ledger, &follower, b"follower").await);
    assert!(matches!(
        ledger.claim(&leader).await,
        Ok(Claim::Existing(existing)) if matches!(existing.state, RecordState::InProgress)
    ));
    table.drop().await;
}

/// Issue 18: a completion that fails as a statement (here a trigger of the test's refuses status
/// 599) fails alone: its batch is written again one completion at a time, and the others are
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_completion_that_fails_in_a_batch_fails_alone() {
    const OTHERS: usize = 8;
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let t = format!("\"{}\"", table.name);
    for sql in [
        format!(
            "CREATE FUNCTION \"{}_refuse\"() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.status = 599 THEN RAISE EXCEPTION 'status 599 refused'; END IF; \
             RETURN NEW; END $$",
            table.name
        ),
        format!(
            "CREATE TRIGGER refuse BEFORE UPDATE ON {t} FOR EACH ROW \
             EXECUTE FUNCTION \"{}_refuse\"()",
            table.name
        ),
    ] {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(table.ledger.pool())
            .await
            .expect("create the trigger");
    }
    let mut others = Vec::new();
    for n in 0..OTHERS {
        others.push(acquired(&table.ledger, request(&format!("other-{n}"), "body")).await);
    }
    let (refused, refused_token) = acquired(&table.ledger, request("refused", "body")).await;
    let (ledger, held) = ledger_with_pool_held(&table, 1).await;
    let tasks: Vec<_> = others
        .iter()
        .map(|(request, token)| {
            spawn_complete(&ledger, request.key, *token, sample_response(b"ok"))
        })
        .collect();
    let mut response = sample_response(b"refused");
    response.status = http::StatusCode::from_u16(599).expect("a status");
    let refused_task = spawn_complete(&ledger, refused.key, refused_token, response);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);

    match refused_task.await.expect("a task") {
        Err(LedgerError::Backend(error)) => {
            assert!(format!("{error:?}").contains("599"), "{error:?}");
        }
        other => panic!("the refused completion fails alone, got {other:?}"),
    }
    for result in futures_join(tasks).await {
        result.expect("the other completions of the batch");
    }
    for (request, _) in &others {
        assert!(replays(&ledger, request, b"ok").await);
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TRIGGER refuse ON {t}; DROP FUNCTION \"{}_refuse\"()",
        table.name
    )))
    .execute(table.ledger.pool())
    .await
    .expect("drop the trigger");
    table.drop().await;
}

/// Issue 18: a batch of completions is bounded by itself, since a batch whose leader's request
/// went away runs on a task that nobody awaits with a deadline. Here its statement waits on a row
/// lock that another transaction holds (the pool sets no `statement_timeout`): its completions
/// fail with the batch's own timeout (5 s) while the lock is still held, instead of waiting for
/// it. (The 20 s below only keeps a broken build from hanging the suite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_of_completions_that_gets_no_answer_fails_in_time() {
    let Some(table) = common::PgTable::create().await else {
        return;
    };
    let (first, first_token) = acquired(&table.ledger, request("first", "body")).await;
    let (second, second_token) = acquired(&table.ledger, request("second", "body")).await;
    let mut locker = table.ledger.pool().begin().await.expect("a transaction");
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{}\" WHERE key = $1 FOR UPDATE",
        table.name
    )))
    .bind(&first.key.as_bytes()[..])
    .execute(&mut *locker)
    .await
    .expect("lock the first record");
    let (ledger, held) = ledger_with_pool_held(&table, 1).await;
    let tasks = [
        spawn_complete(&ledger, first.key, first_token, sample_response(b"ok")),
        spawn_complete(&ledger, second.key, second_token, sample_response(b"ok")),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(held);
    // The lock is held for the whole wait: only the batch's own bound can answer these.
    for task in tasks {
        let result = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the batch is answered while the lock is held")
            .expect("a task");
        match result {
            Err(LedgerError::Backend(error)) => {
                assert!(error.to_string().contains("no answer within"), "{error}");
            }
            other => panic!("the batch's own timeout, got {other:?}"),
        }
    }
    assert!(
        ledger.completion_batches() == 0,
        "the batch was not written"
    );
    locker.rollback().await.expect("release the lock");
    ledger.pool().close().await;
    table.drop().await;
}
