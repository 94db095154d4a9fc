//! Group commit of the PostgreSQL ledger's completions: completions that wait for a pooled
//! connection at the same time share one statement and one commit.
//!
//! A first request takes a pooled connection twice (its claim, its completion), each time
//! through a statement, a commit and the commit's WAL flush. Where the pool is the queue (more
//! requests in flight than connections, the usual state under load), completions written
//! together take one connection for one round trip and one commit instead of one each, which
//! leaves the connections to the claims: measured on loopback, first requests +33 % (median of 5
//! alternating rounds) and the server's CPU per request about -28 %; with 1.1 ms to the
//! database, +70 % (docs/benchmarks.md, "Issue 18, seventh pass").
//!
//! - **Who writes.** The first completion to find no batch forming leads one: it waits for a
//!   pooled connection, as every completion would, and the completions that arrive meanwhile
//!   join its batch. With the connection, the leader takes everything queued (up to
//!   [`MAX_BATCH`]) and writes it in one statement and one commit: the `complete` statement
//!   once per completion, as data-modifying CTEs, each fenced by its own key and token and each
//!   a lookup by the primary key (`complete_many_statement` in `postgres.rs`). A completion that
//!   finds a connection idle in the pool, or the pool below its size, goes alone with the single
//!   statement, as does a leader that finds nobody joined it: batching adds no wait of its own,
//!   and batches form only where the pool is the queue. Several batches may be in flight at
//!   once (unlike SQLite's one writer, `writer.rs`).
//! - **Cancellation.** The leader's future is its request's. If the request goes away while it
//!   leads (its ledger timeout, say), the batch is handed to a task of its own and finishes
//!   there, so every completion in it is still answered. A completion whose caller went away
//!   before its batch was taken is not written, as it would not have been alone. A leader that
//!   cannot go on at all (its runtime shutting down) unmarks the queue as led, so that the next
//!   completion leads.
//! - **Failure.** If the batch's statement fails as a statement (a database error: it wrote
//!   nothing), each completion in it runs alone on the same connection, so one that cannot be
//!   written fails alone. Any other error (the connection) fails every completion in the batch,
//!   as it would have failed each of them alone.
//! - **Bounded.** The wait for the connection is the pool's (`acquire_timeout`); the batch's
//!   statements, once it has one, get [`WRITE_TIMEOUT`], after which its completions fail and
//!   the connection is closed, not returned. As with a single completion that times out, one
//!   whose caller hears of the failure may still have been written.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use sqlx::{PgPool, Postgres, Row, pool::PoolConnection, postgres::PgConnection};
use tokio::sync::oneshot;
use tower_idempotency_core::LedgerError;
use uuid::Uuid;

use crate::{PostgresLedger, ledger::Completion, row};

/// The most completions one statement takes.
pub(crate) const MAX_BATCH: usize = 16;

/// How long a batch's statements may take once it has its connection: as long as the
/// `statement_timeout` that `connect` sets. A batch handed to a task of its own is awaited by
/// nobody who could drop it, so without this bound a database that stops answering would keep
/// it, and its connection, for as long as TCP waits; with it, its completions fail as the layer's
/// ledger timeout would fail each of them alone.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = Result<(), LedgerError>;

struct Queued {
    completion: Completion,
    answer: oneshot::Sender<Answer>,
}

/// The queue of completions waiting for a connection (shared by a ledger's clones).
#[derive(Default)]
pub(crate) struct Completions {
    state: Mutex<State>,
    /// Statements that wrote more than one completion, for the tests and `Debug`.
    batches: AtomicU64,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    /// Whether a leader is waiting for a connection for the queue.
    leading: bool,
}

impl Completions {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The lock is never held across a panic that could leave the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Statements so far that wrote more than one completion.
    pub(crate) fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The batch for a leader that has its connection: up to [`MAX_BATCH`] of the queue, less
    /// the completions whose callers went away. A completion with the key and token of one
    /// already in the batch (a lease completed twice at once) stays queued for a later batch,
    /// where it finds the record completed, as it would one after the other: in one statement
    /// both would find the record in progress, PostgreSQL would keep one of the two updates
    /// without saying which, and both would be told Ok. If more are queued, another leader is
    /// started for them.
    fn take(&self, ledger: &PostgresLedger) -> Vec<Queued> {
        let mut state = self.state();
        state.queue.retain(|queued| !queued.answer.is_closed());
        let mut batch: Vec<Queued> = Vec::new();
        let mut later = Vec::new();
        for queued in state.queue.drain(..) {
            let (key, token) = (queued.completion.key, queued.completion.token);
            let repeated = batch
                .iter()
                .any(|taken| taken.completion.key == key && taken.completion.token == token);
            if batch.len() < MAX_BATCH && !repeated {
                batch.push(queued);
            } else {
                later.push(queued);
            }
        }
        state.queue = later;
        if state.queue.is_empty() {
            state.leading = false;
        } else {
            tokio::spawn(lead(Waiting::new(ledger)));
        }
        batch
    }
}

/// Whether a completion on `pool` would wait for a connection: none is idle and the pool may
/// open no more. Only then is there a wait to share.
pub(crate) fn must_wait(pool: &PgPool) -> bool {
    pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections()
}

/// Writes `completion`, in a batch with the completions that wait for a connection with it.
pub(crate) async fn complete(ledger: &PostgresLedger, completion: Completion) -> Answer {
    let (answer, answered) = oneshot::channel();
    let lead_now = {
        let mut state = ledger.extra.completions.state();
        state.queue.push(Queued { completion, answer });
        !std::mem::replace(&mut state.leading, true)
    };
    if lead_now {
        Detached(Some(Box::pin(lead(Waiting::new(ledger))))).await;
    }
    answered.await.unwrap_or_else(|_| {
        Err(LedgerError::backend(
            "the ledger's batch of completions stopped before answering",
        ))
    })
}

/// A leader: waits for a connection, then writes what is queued.
async fn lead(waiting: Waiting) {
    let pool = waiting.ledger().pool.clone();
    let connection = pool.acquire().await;
    let ledger = waiting.disarm();
    let mut batch = ledger.extra.completions.take(&ledger);
    if batch.is_empty() {
        return;
    }
    let mut connection = match connection {
        Ok(connection) => connection,
        Err(error) => return fail_all(batch.drain(..), error),
    };
    let written = tokio::time::timeout(WRITE_TIMEOUT, write(&ledger, &mut connection, &mut batch));
    if written.await.is_err() {
        // The connection stopped answering mid-statement: close it rather than return it.
        connection.close_on_drop();
        let error =
            format!("the ledger's batch of completions got no answer within {WRITE_TIMEOUT:?}");
        for queued in batch.drain(..) {
            let _ = queued.answer.send(Err(LedgerError::backend(error.clone())));
        }
    }
}

/// A leader until it has its connection. Dropped before then (its task cancelled before or
/// while it waits, as when the runtime shuts down, or a hand-off spawn that had no runtime to go
/// to), it unmarks the queue as led: otherwise no later completion would lead.
struct Waiting(Option<PostgresLedger>);

impl Waiting {
    fn new(ledger: &PostgresLedger) -> Self {
        Self(Some(ledger.clone()))
    }

    fn ledger(&self) -> &PostgresLedger {
        self.0.as_ref().expect("a leader is waiting until disarmed")
    }

    /// The leader has its connection (or the pool's error): [`Completions::take`] decides from
    /// here on.
    fn disarm(mut self) -> PostgresLedger {
        self.0.take().expect("disarmed once")
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(ledger) = &self.0 {
            ledger.extra.completions.state().leading = false;
        }
    }
}

/// Every completion of `batch` fails with `error`.
fn fail_all(batch: impl IntoIterator<Item = Queued>, error: sqlx::Error) {
    let error = Arc::new(error);
    for queued in batch {
        let _ = queued
            .answer
            .send(Err(LedgerError::backend(Arc::clone(&error))));
    }
}

/// Writes `batch` and answers each completion in it, taking it out of `batch` as it does (what
/// is left if this is cut short is unanswered).
async fn write(
    ledger: &PostgresLedger,
    connection: &mut PoolConnection<Postgres>,
    batch: &mut Vec<Queued>,
) {
    if batch.len() == 1 {
        let answer = alone(connection, ledger, &batch[0].completion).await;
        answer_first(batch, answer);
        return;
    }
    match together(ledger, connection, batch).await {
        Ok(written) => {
            ledger
                .extra
                .completions
                .batches
                .fetch_add(1, Ordering::Relaxed);
            for queued in batch.drain(..) {
                let done = written.contains(&(queued.completion.key, queued.completion.token));
                let _ = queued.answer.send(row::fenced(u64::from(done)));
            }
        }
        Err(sqlx::Error::Database(_)) => {
            while let Some(queued) = batch.first() {
                let answer = alone(connection, ledger, &queued.completion).await;
                answer_first(batch, answer);
            }
        }
        Err(error) => fail_all(batch.drain(..), error),
    }
}

/// Sends `answer` to the first completion of `batch` and takes it out.
fn answer_first(batch: &mut Vec<Queued>, answer: Answer) {
    let queued = batch.remove(0);
    let _ = queued.answer.send(answer);
}

/// One completion by the `complete` statement, on the batch's connection.
async fn alone(
    connection: &mut PgConnection,
    ledger: &PostgresLedger,
    completion: &Completion,
) -> Answer {
    let query = sqlx::query(ledger.sql.complete.clone());
    let done = PostgresLedger::bind_completion(query, completion)
        .execute(connection)
        .await
        .map_err(row::error)?;
    row::fenced(done.rows_affected())
}

/// The batch by one statement (`complete_many`): the key and token of each record it completed.
async fn together(
    ledger: &PostgresLedger,
    connection: &mut PoolConnection<Postgres>,
    batch: &[Queued],
) -> Result<HashSet<([u8; 32], Uuid)>, sqlx::Error> {
    let mut query = sqlx::query(ledger.extra.complete_many[batch.len() - 2].clone());
    for Queued { completion, .. } in batch {
        query = PostgresLedger::bind_completion(query, completion);
    }
    let rows = query.fetch_all(&mut **connection).await?;
    rows.iter()
        .map(|found| {
            let key: Vec<u8> = found.try_get("key")?;
            let token: Uuid = found.try_get("token")?;
            let key = <[u8; 32]>::try_from(key).map_err(|key| {
                sqlx::Error::Decode(format!("a ledger key of {} bytes", key.len()).into())
            })?;
            Ok((key, token))
        })
        .collect()
}

/// A future polled where it is awaited; dropped before it finished, it is finished on a task of
/// its own (if a runtime is still there to take it).
struct Detached(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Future for Detached {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(future) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        let done = future.as_mut().poll(cx);
        if done.is_ready() {
            self.0 = None;
        }
        done
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(future) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(future);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::postgres::PgPoolOptions;

    use super::*;

    /// A leader dropped while it waits for a connection, or before it ever ran, leaves the queue
    /// without a leader, so the next completion leads (and takes the completions queued behind
    /// the one that went away).
    #[tokio::test]
    async fn a_leader_dropped_while_waiting_leaves_no_leader_behind() {
        // Nothing listens on port 1: the connection is waited for until the pool gives up.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        let ledger = PostgresLedger::new(pool);
        ledger.extra.completions.state().leading = true;
        drop(lead(Waiting::new(&ledger)));
        assert!(
            !ledger.extra.completions.state().leading,
            "a leader that never ran is still marked as leading"
        );
        ledger.extra.completions.state().leading = true;
        let mut leader = Box::pin(lead(Waiting::new(&ledger)));
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut leader).await;
        assert!(
            waited.is_err(),
            "the leader is still waiting for its connection"
        );
        assert!(ledger.extra.completions.state().leading);
        drop(leader);
        assert!(
            !ledger.extra.completions.state().leading,
            "a leader that went away is still marked as leading"
        );
    }
}
