//! The PostgreSQL ledger: its SQL, its claim, and its `LISTEN`/`NOTIFY` wait (with
//! [`listener`](crate::listener)).

use std::{fmt, str::FromStr, time::Duration};

use sqlx::{
    Pool, Postgres, Row, SqlStr,
    postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgQueryResult, PgRow},
};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, LedgerError, LedgerKey, StoredResponse,
};

use crate::{
    SqlLedger,
    backend::{Backend, Statements, statement},
    claim_strategy::{ClaimStrategy, First, ReplayShare},
    completions::{self, Completions},
    ledger::{Completion, acquired},
    listener::{self, Notifier},
    row::{self, COMPLETED, IN_PROGRESS},
    table::TableName,
};

/// A ledger in a PostgreSQL table, shared by every app instance that uses the database.
///
/// - **One statement per step.** A claim is a single statement: it reads the record it cannot
///   take (a replay, a 409 or a 422 then locks and writes nothing: no WAL, no flush), or else
///   runs an `INSERT .. ON CONFLICT DO UPDATE .. WHERE .. RETURNING`. Complete, release and
///   renew are a single fenced `UPDATE`/`DELETE`. A first request costs two round trips, a
///   replay one read.
/// - **Completions share commits under load.** Completions that wait for a pooled connection at
///   the same time are written by one statement in one commit, each still fenced by its own key
///   and token; a completion that finds a connection free goes alone
///   ([`with_batched_completions`](SqlLedger::<Postgres>::with_batched_completions)).
/// - **A completion changes no indexed column**, so PostgreSQL writes it as a heap-only tuple
///   with no new index entries: the purge's index is on `purge_from`, which the completion
///   leaves as the claim set it (migration 0004; docs/operations.md).
/// - **The database's clock** (`now()`) decides leases and expiry, so app instances whose clocks
///   disagree still agree on who holds a key.
/// - **Waiting uses `LISTEN`/`NOTIFY`.** A waiter marks the record `watched`; completing or
///   releasing a watched record notifies the channel [`channel`](Self::channel) with the key's
///   hex digest, in the same statement. Records nobody waits for are not notified: a notifying
///   commit takes a lock shared by every notifying commit in the database, and notifying every
///   completion cut fresh-path throughput by about a quarter (docs/benchmarks.md). The first
///   [`wait_for_change`](crate::Ledger::wait_for_change) starts one listener connection per ledger (its
///   own, not one of the pool's); while it is unavailable, waiters poll.
///
/// # Exactly-once mode
///
/// As a [`TransactionalLedger`](tower_idempotency_core::TransactionalLedger), the completion is
/// written in the handler's transaction and committed with it. Inside a transaction PostgreSQL's
/// `now()` is the transaction's start (just after the claim), so a response completed this way
/// is kept for `retention` from then, not from the commit. The fencing does not depend on it: it
/// is the token that must still match.
///
/// In this mode the claim commits with `synchronous_commit = off` (for its own transaction only)
/// and does not wait for its WAL flush: the handler's commit flushes the WAL through it, so a
/// request waits for one flush instead of two. A claim lost in a crash of PostgreSQL took no
/// committed write with it, and the retry runs once
/// ([`claim_before_transaction`](tower_idempotency_core::TransactionalLedger::claim_before_transaction)).
///
/// Cloning is cheap and shares the pool and the listener.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency_sqlx::PostgresLedger;
///
/// let ledger = PostgresLedger::connect("postgres://app@db.internal/app").await?;
/// ledger.migrate().await?;
/// # Ok(()) }
/// ```
///
/// If you build the pool yourself, consider what [`connect`](SqlLedger::<Postgres>::connect)
/// sets: `acquire_timeout` well under the lease (3 s), `statement_timeout` (5 s) and
/// `test_before_acquire(false)` (by default sqlx pings a connection before handing it out, which
/// doubles the round trips of every ledger call). See docs/operations.md.
pub type PostgresLedger = SqlLedger<Postgres>;

/// The PostgreSQL ledger's own state: the statement that marks a record watched (`1` key), the
/// listener, and how claims go ([`ClaimStrategy`]: the plain statements, bound as the claim is,
/// and the share of recent claims that found a record).
pub struct Listening {
    watch: SqlStr,
    notifier: Notifier,
    /// The claim statement's read on its own.
    read: SqlStr,
    /// The claim statement's insert on its own, plain and for exactly-once mode.
    insert: SqlStr,
    insert_before_transaction: SqlStr,
    strategy: ClaimStrategy,
    replays: ReplayShare,
    /// The statements that write 2, 3, .. [`completions::MAX_BATCH`] completions at once
    /// (`complete_many[n - 2]` writes `n`; see [`complete_many_statement`]).
    pub(crate) complete_many: Vec<SqlStr>,
    pub(crate) completions: Completions,
    /// Whether completions are batched ([`PostgresLedger::with_batched_completions`]).
    batch_completions: bool,
}

impl fmt::Debug for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listening")
            .field("channel", &self.notifier.channel())
            .field("strategy", &self.strategy)
            .field("batch_completions", &self.batch_completions)
            .finish_non_exhaustive()
    }
}

/// `$n` milliseconds from now, by the database's clock.
fn from_now(n: u8) -> String {
    format!("now() + ${n}::bigint * interval '1 millisecond'")
}

/// The columns `row::info` reads; the headers and body only if `with_body` (an SQL expression).
fn info_columns(with_body: &str) -> String {
    let ms = |column: &str| format!("(extract(epoch FROM {column}) * 1000)::bigint");
    format!(
        "key, scope, fingerprint, operation_id, token, state, {lease} AS lease_until_ms, \
         COALESCE(lease_until <= now(), false) AS lapsed, {expires} AS expires_at_ms, status, \
         CASE WHEN {with_body} THEN headers END AS headers, \
         CASE WHEN {with_body} THEN body END AS body, \
         COALESCE(length(body), 0)::bigint AS body_len, body_omitted",
        lease = ms("lease_until"),
        expires = ms("expires_at"),
    )
}

/// The `NOTIFY` channel of a table: `idempotency_` and the table name (`.` as `_`), within
/// PostgreSQL's 63-byte limit. Two long names may share a channel; that only wakes a waiter
/// early, which the contract allows.
fn channel_of(table: &TableName) -> String {
    let mut channel = format!("idempotency_{}", table.display().replace('.', "_"));
    channel.truncate(63);
    channel
}

/// Added to the claim's `INSERT .. SELECT` in exactly-once mode: the claim's transaction commits
/// with `synchronous_commit = off` (`set_config`'s third argument keeps the setting to this
/// statement's own transaction, and PostgreSQL reads it at the commit). The handler's
/// transaction, which commits the completion, waits for the WAL flush through its own commit
/// record, so through the claim's too (the WAL is one sequence): nothing the handler writes
/// commits unless the claim is durable. A claim lost in a crash of the database (at most
/// `wal_writer_delay` × 3 of unflushed commits) leaves no committed write, and the retry claims
/// again and runs once. A replay writes nothing and commits nothing either way.
const UNFLUSHED: &str = "AND set_config('synchronous_commit', 'off', true) IS NOT NULL";

/// The claim statement (see `prepare`); `unflushed`: its commit does not wait for its WAL flush
/// ([`TransactionalLedger::claim_before_transaction`](tower_idempotency_core::TransactionalLedger::claim_before_transaction)).
fn claim_statement(t: &str, columns: &str, unflushed: bool) -> SqlStr {
    statement(format!(
        "WITH live AS ( \
           SELECT {columns}, \
             (extract(epoch FROM expires_at - now()) * 1000)::bigint AS expires_in \
           FROM {t} \
           WHERE key = $1 AND expires_at > now() AND NOT (state = '{IN_PROGRESS}' \
             AND lease_until <= now() AND fingerprint = $3)), \
         claimed AS ( \
           INSERT INTO {t} AS r (key, scope, fingerprint, operation_id, token, state, \
             lease_until, expires_at, purge_from, status, headers, body, body_omitted) \
           SELECT $1, $2, $3, $4, $5, '{IN_PROGRESS}', {lease}, {retention}, {retention}, \
             NULL, NULL, NULL, false \
           WHERE NOT EXISTS (SELECT 1 FROM live) {unflushed} \
           ON CONFLICT (key) DO UPDATE SET \
             operation_id = CASE WHEN r.expires_at <= now() \
               THEN excluded.operation_id ELSE r.operation_id END, \
             scope = excluded.scope, fingerprint = excluded.fingerprint, \
             token = excluded.token, state = '{IN_PROGRESS}', \
             lease_until = excluded.lease_until, expires_at = excluded.expires_at, \
             purge_from = excluded.purge_from, \
             status = NULL, headers = NULL, body = NULL, body_omitted = false \
           WHERE r.expires_at <= now() OR (r.state = '{IN_PROGRESS}' \
             AND r.lease_until <= now() AND r.fingerprint = excluded.fingerprint) \
           RETURNING {columns}) \
         SELECT true AS won, {columns}, NULL::bigint AS expires_in FROM claimed \
         UNION ALL \
         SELECT false, {columns}, expires_in FROM live",
        lease = from_now(6),
        retention = from_now(7),
        unflushed = if unflushed { UNFLUSHED } else { "" },
    ))
}

/// The fenced completion with its values bound from `$first` on (`first` key, then token,
/// status, headers, body, body omitted, retention in milliseconds), returning `returning`.
fn complete_sql(t: &str, first: usize, returning: &str) -> String {
    let n = |i: usize| u8::try_from(first + i).expect("at most 255 parameters");
    format!(
        "UPDATE {t} SET state = '{COMPLETED}', lease_until = NULL, status = ${status}, \
           headers = ${headers}, body = ${body}, body_omitted = ${omitted}, \
           expires_at = {retention}, purge_from = LEAST(purge_from, {retention}) \
         WHERE key = ${key} AND token = ${token} AND state = '{IN_PROGRESS}' \
           AND expires_at > now() \
         RETURNING {returning}",
        key = n(0),
        token = n(1),
        status = n(2),
        headers = n(3),
        body = n(4),
        omitted = n(5),
        retention = from_now(n(6)),
    )
}

/// `n` completions in one statement and so one commit (`completions.rs`): each the `complete`
/// statement as a data-modifying CTE, bound from `$1`, `$8`, `$15`, .. (seven values each, as the
/// `complete` statement takes them), returning the key and token of each record completed.
///
/// Each is a lookup of one key by the primary key, like the `complete` statement, so every plan
/// of it uses the index, however small the table was when it was prepared (a set-oriented form,
/// `UPDATE .. FROM unnest(..)`, was planned as a scan of the whole table while the table was
/// small, and kept that plan as it grew). Two completions of one key (a lapsed holder's and its
/// successor's) see the same snapshot, and only the one whose token the row holds matches.
fn complete_many_statement(t: &str, n: usize, notify: &str) -> SqlStr {
    let returning = format!("key, token, {notify}");
    let ctes: Vec<String> = (0..n)
        .map(|i| format!("c{i} AS ({})", complete_sql(t, 1 + 7 * i, &returning)))
        .collect();
    let selects: Vec<String> = (0..n)
        .map(|i| format!("SELECT key, token FROM c{i}"))
        .collect();
    statement(format!(
        "WITH {} {}",
        ctes.join(", "),
        selects.join(" UNION ALL ")
    ))
}

/// The claim statement's insert on its own (`ClaimStrategy::InsertFirst`): a new record if the
/// key has none, nothing otherwise (then the claim statement runs). Bound as the claim is;
/// `unflushed`: as in exactly-once mode's claim.
fn insert_statement(t: &str, unflushed: bool) -> SqlStr {
    statement(format!(
        "INSERT INTO {t} (key, scope, fingerprint, operation_id, token, state, lease_until, \
           expires_at, purge_from) \
         SELECT $1, $2, $3, $4, $5, '{IN_PROGRESS}', {lease}, {retention}, {retention} \
         {unflushed} \
         ON CONFLICT (key) DO NOTHING \
         RETURNING operation_id",
        lease = from_now(6),
        retention = from_now(7),
        unflushed = if unflushed {
            "WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL"
        } else {
            ""
        },
    ))
}

impl Backend for Postgres {
    const KIND: &'static str = "postgres";
    const LEDGER: &'static str = "PostgresLedger";
    const SCHEMAS: bool = true;
    const MIGRATIONS: &'static [(&'static str, &'static str)] = &[
        (
            "0001_create_records",
            include_str!("../migrations/postgres/0001_create_records.sql"),
        ),
        (
            "0002_watched",
            include_str!("../migrations/postgres/0002_watched.sql"),
        ),
        (
            "0003_no_state_check",
            include_str!("../migrations/postgres/0003_no_state_check.sql"),
        ),
        (
            "0004_purge_from",
            include_str!("../migrations/postgres/0004_purge_from.sql"),
        ),
        (
            "0005_keep_pages",
            include_str!("../migrations/postgres/0005_keep_pages.sql"),
        ),
    ];

    type Extra = Listening;

    fn prepare(pool: &Pool<Self>, table: &TableName) -> (Statements, Listening) {
        let channel = channel_of(table);
        let t = table.quoted();
        let sql = statement;
        let columns = "operation_id, fingerprint, state, status, headers, body, body_omitted";
        // Only a record that a waiter watches is notified (migration 0002): a notifying commit
        // takes a database-wide lock, and notifying every completion serialised them.
        let notify =
            format!("CASE WHEN watched THEN pg_notify('{channel}', encode(key, 'hex')) END");
        let statements = Statements {
            // $1 key, $2 scope, $3 fingerprint, $4 operation id, $5 token, $6 lease and
            // $7 retention in ms.
            //
            // `live` first reads the record this claim cannot take: a completed or in-progress
            // record within its retention, unless it is a lapsed lease with the same
            // fingerprint. If there is one, the INSERT is given no row at all, so a replay (or
            // a 409, or a 422) locks nothing and writes nothing: its transaction gets no xid and
            // its commit no WAL record and no flush (issue 18: an `ON CONFLICT DO UPDATE` whose
            // WHERE excludes the row still locks it, which cost a WAL flush per replay).
            //
            // Otherwise the INSERT decides atomically: insert, replace an expired record, take
            // over an expired lease with the same fingerprint, or write nothing (the SET
            // expressions read the old row, so a takeover keeps its operation id). When a
            // concurrent claim got there first, the INSERT writes nothing and `live`, read in the
            // statement's snapshot from before that claim committed, is empty too: neither
            // branch returns a row and the caller runs the statement again.
            claim: claim_statement(&t, columns, false),
            claim_before_transaction: claim_statement(&t, columns, true),
            // `purge_from` changes only if this retention ends before the claim's: with no
            // indexed column changed, PostgreSQL writes the completed row as a heap-only tuple,
            // with no new index entries (migration 0004).
            complete: sql(complete_sql(&t, 1, &notify)),
            release: sql(format!(
                "DELETE FROM {t} \
                 WHERE key = $1 AND token = $2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > now() \
                 RETURNING {notify}"
            )),
            renew: sql(format!(
                "UPDATE {t} SET lease_until = {lease}, expires_at = GREATEST(expires_at, {lease}) \
                 WHERE key = $1 AND token = $2 AND state = '{IN_PROGRESS}' \
                   AND expires_at > now()",
                lease = from_now(3),
            )),
            operation: sql(format!(
                "SELECT state, status, headers, body, body_omitted, \
                   lease_until <= now() AS lapsed FROM {t} \
                 WHERE operation_id = $1 AND scope = $2 AND expires_at > now()"
            )),
            // The index is on `purge_from`, which every statement keeps at or before
            // `expires_at` (migration 0004), so the expired records are among those it finds.
            // SKIP LOCKED leaves rows that a claim is replacing to the claim. The outer
            // `expires_at` test matters: if a claim replaces a row after the subquery picked it,
            // READ COMMITTED re-checks only the outer WHERE against the new row, and the key
            // alone would delete the fresh claim.
            purge: sql(format!(
                "DELETE FROM {t} WHERE key IN \
                   (SELECT key FROM {t} WHERE purge_from <= now() AND expires_at <= now() \
                    LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 AND expires_at <= now()"
            )),
            held: sql(format!(
                "SELECT token FROM {t} WHERE key = $1 AND state = '{IN_PROGRESS}' \
                 AND expires_at > now() AND lease_until > now()"
            )),
            inspect: sql(format!(
                "SELECT {info} FROM {t} WHERE key = $1 AND expires_at > now()",
                info = info_columns("$2::boolean"),
            )),
            stuck: sql(format!(
                "SELECT {info} FROM {t} WHERE state = '{IN_PROGRESS}' AND expires_at > now() \
                   AND lease_until <= now() - $1::bigint * interval '1 millisecond' \
                 ORDER BY lease_until LIMIT $2",
                info = info_columns("false"),
            )),
            // Waiters are told, as for a release, so that they claim again at once.
            evict: sql(format!("DELETE FROM {t} WHERE key = $1 RETURNING {notify}")),
        };
        // `held`, marking the record watched. A completion that committed first makes this
        // find no row (READ COMMITTED re-checks the WHERE against the committed row), so
        // the waiter does not wait; one that comes after sees `watched` and notifies. `claim`
        // leaves the flag as it is when it takes a key over, so a waiter still waiting hears
        // the new holder's completion.
        let watch = sql(format!(
            "UPDATE {t} SET watched = true WHERE key = $1 AND state = '{IN_PROGRESS}' \
             AND expires_at > now() AND lease_until > now() RETURNING token"
        ));
        let notifier = listener::notifier(pool, channel);
        // The claim statement's `live` read on its own (`ClaimStrategy::ReadFirst`). It is bound
        // as the claim is (`claim_query`); `$2` and `$4` to `$7` go unused, typed by the binds.
        let read = sql(format!(
            "SELECT {columns}, \
               (extract(epoch FROM expires_at - now()) * 1000)::bigint AS expires_in \
             FROM {t} \
             WHERE key = $1 AND expires_at > now() AND NOT (state = '{IN_PROGRESS}' \
               AND lease_until <= now() AND fingerprint = $3)"
        ));
        let extra = Listening {
            watch,
            notifier,
            read,
            insert: insert_statement(&t, false),
            insert_before_transaction: insert_statement(&t, true),
            strategy: ClaimStrategy::default(),
            replays: ReplayShare::default(),
            complete_many: (2..=completions::MAX_BATCH)
                .map(|n| complete_many_statement(&t, n, &notify))
                .collect(),
            completions: Completions::default(),
            batch_completions: true,
        };
        (statements, extra)
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn debug_extra(extra: &Listening, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("channel", &extra.notifier.channel());
        f.field("claim_strategy", &extra.strategy);
        f.field("replay_share", &extra.replays.get());
        f.field("batch_completions", &extra.batch_completions);
        f.field("completion_batches", &extra.completions.batches());
    }

    fn carry(from: &Listening, to: &mut Listening) {
        to.strategy = from.strategy;
        to.batch_completions = from.batch_completions;
    }

    fn complete_batched(
        ledger: &PostgresLedger,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Option<impl Future<Output = Result<(), LedgerError>> + Send + 'static> {
        // A connection free, or one the pool may open: no wait to share, so the shared path.
        if !ledger.extra.batch_completions || !completions::must_wait(&ledger.pool) {
            return None;
        }
        let completion = Completion::new(key, token, response, retention);
        let ledger = ledger.clone();
        Some(async move { completions::complete(&ledger, completion).await })
    }

    async fn before_migrations(
        connection: &mut PgConnection,
        table: &TableName,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("tower-idempotency-sqlx:{}", table.display()))
            .execute(connection)
            .await
            .map(drop)
    }

    /// As the [`ClaimStrategy`] says: the claim statement's insert on its own (the key is ours if
    /// it inserts), or its read on its own (the record this claim cannot take, if there is one).
    /// Otherwise the claim statement runs next, and `claimed` counts its outcome.
    async fn before_claim(
        ledger: &PostgresLedger,
        request: &ClaimRequest,
        before_transaction: bool,
    ) -> Result<Option<Claim>, LedgerError> {
        let extra = &ledger.extra;
        let (sql, first) = match extra.replays.first(extra.strategy) {
            First::Claim => return Ok(None),
            First::Read => (&extra.read, First::Read),
            First::Insert if before_transaction => {
                (&extra.insert_before_transaction, First::Insert)
            }
            First::Insert => (&extra.insert, First::Insert),
        };
        let found = ledger
            .claim_query(sql, request)
            .fetch_optional(&ledger.pool)
            .await
            .map_err(row::error)?;
        let Some(found) = found else {
            return Ok(None);
        };
        Ok(Some(if first == First::Insert {
            extra.replays.record(false);
            acquired(request, row::uuid(&found, "operation_id")?)
        } else {
            extra.replays.record(true);
            Claim::Existing(row::existing(&found)?)
        }))
    }

    async fn claimed(
        ledger: &PostgresLedger,
        request: &ClaimRequest,
        found: Option<PgRow>,
    ) -> Result<Option<Claim>, LedgerError> {
        let Some(found) = found else {
            // The record we conflicted with was committed after this statement's snapshot.
            return Ok(None);
        };
        let won: bool = found.try_get("won").map_err(row::error)?;
        ledger.extra.replays.record(!won);
        Ok(Some(if won {
            acquired(request, row::uuid(&found, "operation_id")?)
        } else {
            Claim::Existing(row::existing(&found)?)
        }))
    }

    /// Waits for a `NOTIFY` of the key (see the type's docs), re-checking the record once a
    /// second in case a notification was lost with the listener's connection. Without a
    /// listener (it cannot connect, or is reconnecting) it polls, 5 ms doubling to 100 ms.
    async fn wait_for_change(ledger: &PostgresLedger, key: &LedgerKey, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let notifier = &ledger.extra.notifier;
        if !notifier.listening(deadline).await {
            return ledger.poll(key, deadline).await;
        }
        let mut waiter = notifier.waiter(key.as_bytes());
        // `held`, marking the record watched, so that its completion or release notifies the
        // channel; only now that `LISTEN` is in effect.
        let Ok(Some(first)) = ledger.token_from(ledger.extra.watch.clone(), key).await else {
            return;
        };
        loop {
            let tick = (Instant::now() + Duration::from_secs(1)).min(deadline);
            if waiter.changed_before(tick).await {
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
            match ledger.held(key).await {
                Ok(Some(token)) if token == first => {}
                _ => return,
            }
        }
    }
}

impl PostgresLedger {
    /// How a claim goes: the claim statement alone, or first a plain insert or a plain read,
    /// each cheaper for the database than the claim statement when it guesses right and one more
    /// round trip when it does not. Default: [`ClaimStrategy::Adaptive`], which guesses from what
    /// the ledger's recent claims found: mostly nothing (ordinary traffic), insert first; mostly
    /// a stored record (a retry storm), read first. Every strategy means the same claim; see
    /// [`ClaimStrategy`].
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::PgPool::connect_lazy("postgres://localhost/app")?;
    /// use tower_idempotency_sqlx::{ClaimStrategy, PostgresLedger};
    ///
    /// // Every claim one round trip, whatever the traffic.
    /// let ledger = PostgresLedger::new(pool).with_claim_strategy(ClaimStrategy::Combined);
    /// # Ok(()) }
    /// ```
    pub fn with_claim_strategy(self, strategy: ClaimStrategy) -> Self {
        let mut ledger = Self::with(self.pool, self.table);
        if let Some(extra) = std::sync::Arc::get_mut(&mut ledger.extra) {
            Postgres::carry(&self.extra, extra);
            extra.strategy = strategy;
        }
        ledger
    }

    /// Whether completions that wait for a pooled connection at the same time are written
    /// together, in one statement and one commit (default: yes; up to 16 a statement). A
    /// completion that finds a connection idle, or the pool below its size, is written alone as
    /// before, so batching adds no wait; where the pool is the queue (more requests in flight
    /// than connections), a batch takes one connection for one round trip and one commit where
    /// its completions took one each, and leaves the others to the claims (measured: first
    /// requests +33 % on a busy pool of 10, docs/benchmarks.md). Each record is fenced by its own
    /// key and token either way, and a completion that fails as a statement fails alone.
    /// Completions in exactly-once mode are the handler's transaction's and never batched.
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::PgPool::connect_lazy("postgres://localhost/app")?;
    /// use tower_idempotency_sqlx::PostgresLedger;
    ///
    /// // Every completion its own statement and commit.
    /// let ledger = PostgresLedger::new(pool).with_batched_completions(false);
    /// # Ok(()) }
    /// ```
    pub fn with_batched_completions(self, batched: bool) -> Self {
        let mut ledger = Self::with(self.pool, self.table);
        if let Some(extra) = std::sync::Arc::get_mut(&mut ledger.extra) {
            Postgres::carry(&self.extra, extra);
            extra.batch_completions = batched;
        }
        ledger
    }

    /// How many statements so far wrote more than one completion, for the tests.
    #[doc(hidden)]
    pub fn completion_batches(&self) -> u64 {
        self.extra.completions.batches()
    }

    /// The statement that writes `n` completions at once (2 to 16), for the tests.
    #[doc(hidden)]
    pub fn completion_batch_statement(&self, n: usize) -> Option<&str> {
        let index = n.checked_sub(2)?;
        self.extra.complete_many.get(index).map(SqlStr::as_str)
    }

    /// Connects a pool to `url` (10 connections, no ping before each use) and makes a ledger on
    /// it. The table is not created: call [`migrate`](Self::migrate).
    ///
    /// The pool fails fast rather than hang a request: a connection is waited for at most 3 s (sqlx's default is 30 s, the layer's default
    /// lease), and PostgreSQL cancels any statement after 5 s (`statement_timeout`, set per
    /// connection). sqlx 0.9 has no client-side TCP keepalive setting; a connection that stops
    /// answering is bounded by the layer's ledger timeout instead.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?.options([("statement_timeout", "5s")]);
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(3))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self::new(pool))
    }

    /// The `NOTIFY` channel that completion and release signal on, with the key's digest in
    /// lowercase hex as the payload: `idempotency_` and the table name, `.` replaced by `_`.
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = tower_idempotency_sqlx::sqlx::PgPool::connect_lazy("postgres://localhost/app")?;
    /// use tower_idempotency_sqlx::PostgresLedger;
    ///
    /// let ledger = PostgresLedger::new(pool).with_table("billing.idempotency")?;
    /// assert_eq!(ledger.table(), "billing.idempotency");
    /// assert_eq!(ledger.channel(), "idempotency_billing_idempotency");
    /// assert!(ledger.clone().with_table("Billing").is_err());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> &str {
        self.extra.notifier.channel()
    }
}
