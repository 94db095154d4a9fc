//! The SQLite ledger: its SQL, its claim, and its connection settings.

use std::{fmt, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    Pool, SqlStr, Sqlite,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult, SqliteRow,
    },
};
use tokio::time::Instant;
use tower_idempotency_core::{Claim, ClaimRequest, Existing, LedgerError, LedgerKey};

use crate::{
    SqlLedger,
    backend::{Backend, Statements, statement},
    claim_strategy::ReplayShare,
    ledger::acquired,
    row::{self, COMPLETED, IN_PROGRESS},
    table::TableName,
    writer::{MERGED, Merged, Write, Writer, Written},
};

/// A ledger in a SQLite database: the embedded default, for one machine (one file, or memory).
///
/// # Clock
///
/// Times (`lease_until`, `expires_at`) are milliseconds since the Unix epoch **by the machine's
/// clock, read by SQLite when the statement runs** (`unixepoch('subsec')`), so that time spent
/// waiting for a pool connection does not shorten the lease a claim grants. A SQLite file is used
/// by the processes of one machine, which share a clock. (The PostgreSQL ledger, shared by many
/// machines, uses the database's clock the same way.)
///
/// # One writer
///
/// SQLite has one writer at a time. Once replays are common (one in eight or more of about the last
/// 64 claims found a record: a retry storm), or while the writer's batch has waited over 100 ms
/// (for a write lock held elsewhere, say), a claim first reads the record it cannot take, so a
/// replay, a 409 or a 422 writes nothing and does not wait for the write lock. While nearly every
/// claim takes its key (ordinary traffic; a new ledger starts there), that read would find nothing
/// and cost each first request a round trip, so claims go straight to the writer, whose claim
/// statement decides the same; a replay among them takes a turn there and writes nothing. If that
/// write fails (the lock held elsewhere past the busy timeout), a read answers the replay. The
/// ledger's own writes (claim, complete, release, renew, each purge batch) go through one writer
/// per ledger (shared by its clones), which **commits them in groups**: it takes every write queued
/// (up to 64, without waiting for more, so an idle ledger adds no latency) and runs them in one
/// `BEGIN IMMEDIATE .. COMMIT` on one connection, so that concurrent requests share one fsync; the
/// batch's claims go in one multi-row statement and its completions in another (in chunks of a
/// power of two), the other writes one by one. Any order of the writes of a batch is one they could
/// have arrived in (all were waiting, none answered). Each write keeps its meaning: a claim's
/// `INSERT .. ON CONFLICT` still decides atomically, and sees the writes before it in the batch
/// (two claims of one key have one winner); a fenced write whose token is stale fails alone, as
/// does one that violates a constraint (its merged statement is undone and its writes run again one
/// by one); an error that may have rolled the transaction back (a full disk, an I/O error), or a
/// failed `COMMIT`, fails every write of the batch, and none was written. A write not taken into a
/// batch within 5 s, or a batch that gets no connection within 5 s, is a ledger error. Another
/// process on the same file, another ledger value on it (or another table), and exactly-once
/// transactions (which commit with the handler's own writes) still meet at SQLite's lock and its
/// busy timeout.
///
/// # Connections
///
/// [`connect`](Self::connect) sets up the pool for you: WAL journal, a 5 s busy timeout, and for
/// `sqlite::memory:` a single connection kept open for the pool's life. If you build the pool
/// yourself, mind two things:
///
/// - Every connection to `sqlite::memory:` opened by sqlx shares one database through SQLite's
///   shared cache, whose table locks fail at once (`database table is locked`) rather than wait
///   on the busy timeout. Use `max_connections(1)` (as `connect` does) and keep that connection
///   alive (`min_connections(1)`, no idle timeout, no max lifetime): when the last connection
///   closes, the in-memory database is gone.
/// - For a file, use WAL (`journal_mode(Wal)`) and a busy timeout, so that readers do not block
///   the writer and writers wait for each other instead of failing.
///
/// # Exactly-once mode
///
/// As a [`TransactionalLedger`](tower_idempotency_core::TransactionalLedger), the completion is
/// written in the handler's transaction and committed with it. The transaction is SQLite's
/// default (deferred): it takes the write lock at the handler's first write and holds it until
/// the commit, so write late in the handler. A handler that reads, then writes after another
/// connection committed, may get `SQLITE_BUSY`; the layer then answers 503 and releases the key,
/// and the retry runs again.
///
/// # Waiting duplicates
///
/// [`wait_for_change`](tower_idempotency_core::Ledger::wait_for_change) polls the record, 5 ms
/// after the call and then at doubling intervals up to 100 ms, until it is no longer in progress
/// under the lease first seen (SQLite has no change notification across processes).
///
/// Cloning is cheap and shares the pool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency_sqlx::SqliteLedger;
///
/// let ledger = SqliteLedger::connect("sqlite://idempotency.db?mode=rwc").await?;
/// ledger.migrate().await?;
/// # Ok(()) }
/// ```
pub type SqliteLedger = SqlLedger<Sqlite>;

/// Milliseconds since the Unix epoch, read by SQLite when the statement runs (after the pool
/// handed out a connection, so a wait for one does not eat into a lease). `'now'` is the same for
/// every use within one statement.
const NOW: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// `(?1, .. ?7), (?8, .. ?14), ..`: `rows` rows of `columns` numbered parameters.
fn parameters(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| {
            let row: Vec<String> = (1..=columns)
                .map(|column| format!("?{}", row * columns + column))
                .collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The claim of `rows` keys in one statement (one is the ledger's `claim`). Each row binds
/// `1` key, `2` scope, `3` fingerprint, `4` operation id, `5` token, `6` lease and `7` retention
/// in ms. For each row, in order, one statement decides: insert, replace an expired record, take
/// over an expired lease with the same fingerprint, or write nothing; a row sees the rows before
/// it, so two claims of one key have one winner. The SET expressions read the old row, so a
/// takeover keeps its operation id. Returns `key`, `operation_id` and `token` of each claim
/// that won (in no set order: a batch matches them by key and token).
fn claim_sql(t: &str, rows: usize) -> String {
    // The `WHERE true` is SQLite's: an upsert on `INSERT .. SELECT` needs a WHERE clause to
    // parse.
    format!(
        "INSERT INTO {t} (key, scope, fingerprint, operation_id, token, state, \
           lease_until, expires_at, status, headers, body, body_omitted) \
         SELECT column1, column2, column3, column4, column5, '{IN_PROGRESS}', \
           {NOW} + column6, {NOW} + column7, NULL, NULL, NULL, 0 \
         FROM (VALUES {values}) WHERE true \
         ON CONFLICT (key) DO UPDATE SET \
           operation_id = CASE WHEN expires_at <= {NOW} \
             THEN excluded.operation_id ELSE operation_id END, \
           scope = excluded.scope, fingerprint = excluded.fingerprint, \
           token = excluded.token, state = '{IN_PROGRESS}', \
           lease_until = excluded.lease_until, expires_at = excluded.expires_at, \
           status = NULL, headers = NULL, body = NULL, body_omitted = 0 \
         WHERE expires_at <= {NOW} OR (state = '{IN_PROGRESS}' \
           AND lease_until <= {NOW} AND fingerprint = excluded.fingerprint) \
         RETURNING key, operation_id, token",
        values = parameters(rows, 7),
    )
}

/// The fenced completion of `rows` records in one statement. Each row binds `1` key, `2` token,
/// `3` status, `4` headers, `5` body, `6` body omitted and `7` retention in ms. One row (the
/// ledger's `complete`) is a plain `UPDATE`, whose count of changed rows is its answer; more are
/// an `UPDATE .. FROM` their values (a primary-key lookup each), which returns `key` and `token`
/// of each record it completed.
fn complete_sql(t: &str, rows: usize) -> String {
    let (with, from, value, returning) = if rows == 1 {
        (
            String::new(),
            "",
            ["?1", "?2", "?3", "?4", "?5", "?6", "?7"],
            "",
        )
    } else {
        // Given as a (materialized) CTE, the values are taken first and each key looked up;
        // given as a subquery, SQLite 3.51 scans every live record (by the `expires_at` index)
        // and probes the values for each (test: `sqlite_merged_statements_look_each_key_up`).
        (
            format!(
                "WITH v(k, tok, st, hd, bd, om, ret) AS MATERIALIZED (VALUES {}) ",
                parameters(rows, 7)
            ),
            "FROM v ",
            ["v.k", "v.tok", "v.st", "v.hd", "v.bd", "v.om", "v.ret"],
            " RETURNING key, token",
        )
    };
    let [key, token, status, headers, body, omitted, retention] = value;
    format!(
        "{with}UPDATE {t} SET state = '{COMPLETED}', lease_until = NULL, status = {status}, \
           headers = {headers}, body = {body}, body_omitted = {omitted}, \
           expires_at = {NOW} + {retention} \
         {from}WHERE {t}.key = {key} AND {t}.token = {token} \
           AND {t}.state = '{IN_PROGRESS}' AND {t}.expires_at > {NOW}{returning}"
    )
}

/// The columns `row::info` reads; the headers and body only if `with_body` (an SQL expression).
fn info_columns(with_body: &str) -> String {
    format!(
        "key, scope, fingerprint, operation_id, token, state, lease_until AS lease_until_ms, \
         COALESCE(lease_until <= {NOW}, 0) AS lapsed, expires_at AS expires_at_ms, status, \
         CASE WHEN {with_body} THEN headers END AS headers, \
         CASE WHEN {with_body} THEN body END AS body, \
         COALESCE(length(body), 0) AS body_len, body_omitted"
    )
}

/// The SQLite ledger's own statements and its group commit.
#[derive(Debug)]
pub struct ReadBack {
    /// The record a claim lost to (`1` key).
    existing: SqlStr,
    /// The record a claim cannot take (`1` key, `2` fingerprint), read before claiming.
    live: SqlStr,
    /// The one writer the ledger's writes go through.
    writer: Arc<Writer>,
    /// The share of recent claims that found a record: whether a claim reads first.
    replays: ReplayShare,
}

impl Backend for Sqlite {
    const KIND: &'static str = "sqlite";
    const LEDGER: &'static str = "SqliteLedger";
    const SCHEMAS: bool = false;
    const ONE_WRITER: bool = true;
    const MIGRATIONS: &'static [(&'static str, &'static str)] = &[(
        "0001_create_records",
        include_str!("../migrations/sqlite/0001_create_records.sql"),
    )];

    type Extra = ReadBack;

    fn prepare(pool: &Pool<Self>, table: &TableName) -> (Statements, ReadBack) {
        let t = table.quoted();
        let sql = statement;
        let claim = sql(claim_sql(&t, 1));
        let statements = Statements {
            // SQLite has no durability setting per transaction: the same statement.
            claim_before_transaction: claim.clone(),
            claim,
            complete: sql(complete_sql(&t, 1)),
            release: sql(format!(
                "DELETE FROM {t} \
                 WHERE key = ?1 AND token = ?2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > {NOW}"
            )),
            renew: sql(format!(
                "UPDATE {t} SET lease_until = {NOW} + ?3, \
                   expires_at = MAX(expires_at, {NOW} + ?3) \
                 WHERE key = ?1 AND token = ?2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > {NOW}"
            )),
            operation: sql(format!(
                "SELECT state, status, headers, body, body_omitted, \
                   lease_until <= {NOW} AS lapsed FROM {t} \
                 WHERE operation_id = ?1 AND scope = ?2 AND expires_at > {NOW}"
            )),
            // The outer `expires_at` test is redundant under SQLite's single writer; it keeps the
            // statement correct on its own, as in the PostgreSQL ledger.
            purge: sql(format!(
                "DELETE FROM {t} WHERE key IN \
                   (SELECT key FROM {t} WHERE expires_at <= {NOW} LIMIT ?1) \
                 AND expires_at <= {NOW}"
            )),
            held: sql(format!(
                "SELECT token FROM {t} WHERE key = ?1 AND state = '{IN_PROGRESS}' \
                 AND expires_at > {NOW} AND lease_until > {NOW}"
            )),
            inspect: sql(format!(
                "SELECT {info} FROM {t} WHERE key = ?1 AND expires_at > {NOW}",
                info = info_columns("?2"),
            )),
            stuck: sql(format!(
                "SELECT {info} FROM {t} WHERE state = '{IN_PROGRESS}' AND expires_at > {NOW} \
                   AND lease_until <= {NOW} - ?1 ORDER BY lease_until LIMIT ?2",
                info = info_columns("0"),
            )),
            evict: sql(format!("DELETE FROM {t} WHERE key = ?1")),
        };
        let existing = sql(format!(
            "SELECT fingerprint, operation_id, state, status, headers, body, body_omitted, \
               expires_at - {NOW} AS expires_in \
             FROM {t} WHERE key = ?1 AND expires_at > {NOW}"
        ));
        // What `live_record` reads: a record within its retention that is not a lapsed lease
        // with this request's fingerprint (which the claim would take over).
        let live = sql(format!(
            "SELECT fingerprint, operation_id, state, status, headers, body, body_omitted, \
               expires_at - {NOW} AS expires_in \
             FROM {t} WHERE key = ?1 AND expires_at > {NOW} \
               AND NOT (state = '{IN_PROGRESS}' AND lease_until <= {NOW} AND fingerprint = ?2)"
        ));
        let merged = Merged {
            claim: statements.claim.clone(),
            complete: statements.complete.clone(),
            claims: (1..=MERGED).map(|n| sql(claim_sql(&t, 1 << n))).collect(),
            completions: (1..=MERGED)
                .map(|n| sql(complete_sql(&t, 1 << n)))
                .collect(),
        };
        let writer = Writer::new(pool.clone(), merged);
        (
            statements,
            ReadBack {
                existing,
                live,
                writer,
                replays: ReplayShare::default(),
            },
        )
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn debug_extra(extra: &ReadBack, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("replay_share", &extra.replays.get());
        f.field("writer", &extra.writer);
    }

    async fn before_migrations(_: &mut Self::Connection, _: &TableName) -> Result<(), sqlx::Error> {
        Ok(())
    }

    /// A replay, a 409 or a 422 reads its record and writes nothing: no turn in the writer
    /// queue, no write lock. A claim that finds nothing goes on to the `INSERT`, whose
    /// `ON CONFLICT .. WHERE` still decides atomically if another claim got there in between.
    ///
    /// Unless nearly every recent claim took its key (under one in eight of about the last 64
    /// found a record, the band in which PostgreSQL's `ClaimStrategy::Adaptive` inserts first; a
    /// new ledger starts there) and the writer is not stalled: then the read would find nothing
    /// and costs a first request a round trip to sqlx's SQLite thread, so the claim goes straight
    /// to the writer, whose claim statement decides the same (a replay among them takes a turn in
    /// the writer queue and writes nothing). A writer whose batch has waited longer than
    /// `STALLED` (for a write lock held elsewhere, say) is stalled: claims read first meanwhile,
    /// so that replays are answered without waiting for it.
    async fn before_claim(
        ledger: &SqliteLedger,
        request: &ClaimRequest,
        _: bool,
    ) -> Result<Option<Claim>, LedgerError> {
        let extra = &ledger.extra;
        if extra.replays.mostly_fresh() && !extra.writer.stalled(STALLED) {
            return Ok(None);
        }
        let found = live_record(ledger, request).await?;
        if found.is_some() {
            extra.replays.record(true);
        }
        Ok(found.map(Claim::Existing))
    }

    /// A claim that went straight to the writer and could not write (the writer gave it no turn,
    /// or the write lock stayed held elsewhere past the busy timeout) is answered by the read it
    /// skipped, if that finds a record it could not have taken: a replay, a 409 or a 422 still
    /// gets its answer. It counts as having found one, so that later claims read first.
    async fn claim_failed(
        ledger: &SqliteLedger,
        request: &ClaimRequest,
        error: LedgerError,
    ) -> Result<Claim, LedgerError> {
        match live_record(ledger, request).await {
            Ok(Some(existing)) => {
                ledger.extra.replays.record(true);
                Ok(Claim::Existing(existing))
            }
            _ => Err(error),
        }
    }

    async fn group_commit(
        ledger: &SqliteLedger,
        write: Write<Sqlite>,
    ) -> Result<Written<Sqlite>, LedgerError> {
        ledger.extra.writer.write(write).await
    }

    async fn claimed(
        ledger: &SqliteLedger,
        request: &ClaimRequest,
        won: Option<SqliteRow>,
    ) -> Result<Option<Claim>, LedgerError> {
        ledger.extra.replays.record(won.is_none());
        if let Some(won) = won {
            return Ok(Some(acquired(request, row::uuid(&won, "operation_id")?)));
        }
        // The record was live a moment ago; read it to report it. If it went away in between
        // (released, purged), claim again.
        sqlx::query(ledger.extra.existing.clone())
            .bind(&request.key.as_bytes()[..])
            .fetch_optional(&ledger.pool)
            .await
            .map_err(row::error)?
            .map(|found| Ok(Claim::Existing(row::existing(&found)?)))
            .transpose()
    }

    async fn wait_for_change(ledger: &SqliteLedger, key: &LedgerKey, timeout: Duration) {
        ledger.poll(key, Instant::now() + timeout).await;
    }
}

/// How long the writer's batch may wait (for its connection, the write lock, its statements,
/// the commit) before claims stop skipping their read (`before_claim`): a batch takes a few
/// milliseconds under load (p99 of a whole first request 12-16 ms over HTTP,
/// docs/benchmarks.md).
const STALLED: Duration = Duration::from_millis(100);

/// The record `request` cannot take (`live`): a stored response, a live lease, another request's.
async fn live_record(
    ledger: &SqliteLedger,
    request: &ClaimRequest,
) -> Result<Option<Existing>, LedgerError> {
    sqlx::query(ledger.extra.live.clone())
        .bind(&request.key.as_bytes()[..])
        .bind(&request.fingerprint.as_bytes()[..])
        .fetch_optional(&ledger.pool)
        .await
        .map_err(row::error)?
        .map(|found| row::existing(&found))
        .transpose()
}

impl SqliteLedger {
    /// How many transactions the ledger's group commit has committed, for the tests.
    #[doc(hidden)]
    pub fn group_commits(&self) -> u64 {
        self.extra.writer.batches()
    }

    /// Whether the group commit has a batch under way, and how many writes wait for the next,
    /// for the tests.
    #[doc(hidden)]
    pub fn group_commit_queue(&self) -> (bool, usize) {
        (self.extra.writer.busy(), self.extra.writer.queued())
    }

    /// How many statements the group commit has run for the ledger's writes (a merged one
    /// counts once), for the tests.
    #[doc(hidden)]
    pub fn group_commit_statements(&self) -> u64 {
        self.extra.writer.statements()
    }

    /// The statements that write `n` claims and `n` completions at once (`n` a power of two
    /// from 2 to 64), for the tests.
    #[doc(hidden)]
    pub fn batch_statements(&self, n: usize) -> Option<(&str, &str)> {
        let merged = self.extra.writer.merged();
        let index = (n.is_power_of_two() && n > 1).then(|| n.trailing_zeros() as usize - 1)?;
        Some((
            merged.claims.get(index)?.as_str(),
            merged.completions.get(index)?.as_str(),
        ))
    }

    /// Connects to `url` (such as `sqlite://idempotency.db?mode=rwc` or `sqlite::memory:`) with
    /// the settings the ledger wants: WAL journal, 5 s busy timeout, the file created if
    /// missing, and for an in-memory database one connection kept open for the pool's life.
    /// A pooled connection is waited for at most 3 s (sqlx's default is 30 s).
    /// The table is not created: call [`migrate`](Self::migrate).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            // SQLite has one writer at a time; a few connections let reads run beside it.
            SqlitePoolOptions::new().max_connections(4)
        }
        // Fail fast: sqlx waits 30 s for a connection by default, the layer's default lease.
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
        Ok(Self::new(pool))
    }
}
