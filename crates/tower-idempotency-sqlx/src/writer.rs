//! Group commit for a one-writer database (SQLite): the ledger's concurrent writes run in one
//! transaction, so that they pay one `COMMIT` (one fsync) between them.
//!
//! A write is a statement with its values bound ([`Write`]). A caller queues it and waits for its
//! own answer. One task at a time, spawned by the first caller to find none running, takes
//! everything queued (up to [`MAX_BATCH`]), without waiting for more, and runs it on one
//! connection in one `BEGIN IMMEDIATE .. COMMIT`, each write under its own savepoint: a write
//! that fails is undone and fails alone; a `COMMIT` (or a savepoint) that fails fails the whole
//! batch, which then wrote nothing. The writes run in the order queued and each sees the ones
//! before it, so two claims of one key in a batch have one winner, as they would one after the
//! other.

use std::{error::Error, fmt, sync::Arc, time::Duration};

use sqlx::{Database, Executor, IntoArguments, query::Query};

/// How long a write waits to be taken into a batch, and a batch for its connection, before
/// failing: as long as SQLite's own busy timeout.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most writes one transaction takes.
pub(crate) const MAX_BATCH: usize = 64;

/// One of the ledger's writes: a statement with its values bound, whose returned row is wanted
/// (the claim) or only how many rows it wrote.
pub struct Write<DB: Database> {
    query: Query<'static, DB, DB::Arguments>,
    fetch: bool,
}

/// What a [`Write`] gave back.
pub enum Written<DB: Database> {
    /// The row the statement returned, if any.
    Row(Option<DB::Row>),
    /// How many rows it wrote.
    Rows(u64),
}

impl<DB: crate::backend::Backend> Write<DB> {
    /// A statement whose returned row is wanted.
    pub(crate) fn fetch(query: Query<'static, DB, DB::Arguments>) -> Self {
        Self { query, fetch: true }
    }

    /// A statement whose count of written rows is wanted.
    pub(crate) fn execute(query: Query<'static, DB, DB::Arguments>) -> Self {
        Self {
            query,
            fetch: false,
        }
    }

    /// Runs the statement on `executor` (the pool, or a batch's transaction).
    pub(crate) async fn run<'e, E>(self, executor: E) -> Result<Written<DB>, sqlx::Error>
    where
        E: Executor<'e, Database = DB>,
        DB::Arguments: IntoArguments<DB>,
    {
        if self.fetch {
            self.query.fetch_optional(executor).await.map(Written::Row)
        } else {
            let done = self.query.execute(executor).await?;
            Ok(Written::Rows(DB::rows_affected(&done)))
        }
    }
}

impl<DB: Database> fmt::Debug for Write<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Write")
            .field("fetch", &self.fetch)
            .finish_non_exhaustive()
    }
}

impl<DB: Database> fmt::Debug for Written<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Row(row) => f.debug_tuple("Row").field(&row.is_some()).finish(),
            Self::Rows(rows) => f.debug_tuple("Rows").field(rows).finish(),
        }
    }
}

impl<DB: Database> Written<DB> {
    /// The returned row (of a [`Write::fetch`]).
    pub(crate) fn row(self) -> Option<DB::Row> {
        match self {
            Self::Row(row) => row,
            Self::Rows(_) => None,
        }
    }

    /// How many rows were written (by a [`Write::execute`]).
    pub(crate) fn rows(self) -> u64 {
        match self {
            Self::Rows(rows) => rows,
            Self::Row(row) => u64::from(row.is_some()),
        }
    }
}

/// An error shared by every write of a failed batch.
type Shared = Arc<dyn Error + Send + Sync>;

#[cfg(feature = "sqlite")]
pub(crate) use sqlite::Writer;

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::{
        collections::VecDeque,
        fmt,
        sync::{
            Arc, Mutex, PoisonError,
            atomic::{AtomicU64, Ordering},
        },
    };

    use sqlx::{Connection, Sqlite, SqlitePool};
    use tokio::sync::oneshot;
    use tower_idempotency_core::LedgerError;

    use super::{MAX_BATCH, Shared, WRITE_TIMEOUT, Write, Written};
    use crate::row;

    type Answer = Result<Written<Sqlite>, LedgerError>;

    /// The SQLite ledger's group commit (shared by a ledger's clones).
    pub(crate) struct Writer {
        pool: SqlitePool,
        state: Mutex<State>,
        /// Committed batches, for the tests.
        batches: AtomicU64,
    }

    #[derive(Default)]
    struct State {
        queue: VecDeque<Job>,
        /// Whether a task is taking batches from the queue.
        draining: bool,
        next: u64,
    }

    struct Job {
        id: u64,
        write: Write<Sqlite>,
        answer: oneshot::Sender<Answer>,
    }

    impl fmt::Debug for Writer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Writer")
                .field("batches", &self.batches)
                .finish_non_exhaustive()
        }
    }

    impl Writer {
        pub(crate) fn new(pool: SqlitePool) -> Arc<Self> {
            Arc::new(Self {
                pool,
                state: Mutex::default(),
                batches: AtomicU64::new(0),
            })
        }

        /// Transactions committed so far.
        pub(crate) fn batches(&self) -> u64 {
            self.batches.load(Ordering::Relaxed)
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            // The lock is never held across a panic that could leave the state half-changed.
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Queues `write` and waits for its answer. A write not taken into a batch within
        /// [`WRITE_TIMEOUT`] is taken back (it wrote nothing) and fails; one already in a batch
        /// waits for the batch, whose own waits are bounded.
        pub(crate) async fn write(self: &Arc<Self>, write: Write<Sqlite>) -> Answer {
            let (answer, mut answered) = oneshot::channel();
            let id = {
                let mut state = self.state();
                let id = state.next;
                state.next += 1;
                state.queue.push_back(Job { id, write, answer });
                if !state.draining {
                    state.draining = true;
                    tokio::spawn(Arc::clone(self).drain());
                }
                id
            };
            let gone = || LedgerError::backend("the ledger's writer stopped before answering");
            match tokio::time::timeout(WRITE_TIMEOUT, &mut answered).await {
                Ok(answer) => answer.unwrap_or_else(|_| Err(gone())),
                Err(_) => {
                    let taken_back = {
                        let mut state = self.state();
                        let at = state.queue.iter().position(|job| job.id == id);
                        at.and_then(|at| state.queue.remove(at)).is_some()
                    };
                    if taken_back {
                        return Err(LedgerError::backend(format!(
                            "no turn to write on the sqlite ledger within {WRITE_TIMEOUT:?}"
                        )));
                    }
                    answered.await.unwrap_or_else(|_| Err(gone()))
                }
            }
        }

        /// Takes batches until the queue is empty. Spawned, so that a caller that goes away
        /// does not cut a batch short.
        async fn drain(self: Arc<Self>) {
            // If this task ends early (a panic, the runtime shutting down), the next write
            // starts another.
            struct Draining<'a>(&'a Writer);
            impl Drop for Draining<'_> {
                fn drop(&mut self) {
                    self.0.state().draining = false;
                }
            }
            let _draining = Draining(&self);
            loop {
                let jobs: Vec<Job> = {
                    let mut state = self.state();
                    let take = state.queue.len().min(MAX_BATCH);
                    if take == 0 {
                        state.draining = false;
                        return;
                    }
                    // A caller that went away before its turn wants nothing written.
                    state
                        .queue
                        .drain(..take)
                        .filter(|job| !job.answer.is_closed())
                        .collect()
                };
                if !jobs.is_empty() {
                    self.batch(jobs).await;
                }
            }
        }

        /// Runs `jobs` in one transaction and answers each.
        async fn batch(&self, jobs: Vec<Job>) {
            let (writes, answers): (Vec<_>, Vec<_>) =
                jobs.into_iter().map(|job| (job.write, job.answer)).unzip();
            match self.commit(writes, &answers).await {
                Ok(results) => {
                    self.batches.fetch_add(1, Ordering::Relaxed);
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(result);
                    }
                }
                Err(failed) => {
                    for answer in answers {
                        let _ = answer.send(Err(LedgerError::backend(Arc::clone(&failed))));
                    }
                }
            }
        }

        /// One `BEGIN IMMEDIATE .. COMMIT`: the answer of each write, or the error that failed
        /// them all (nothing was written).
        ///
        /// A statement that violates a constraint is undone by SQLite on its own (its conflict
        /// resolution is the default, `ABORT`) and the transaction goes on, so only its write
        /// fails; so does a write whose values do not bind (it never ran). Any other error may
        /// have rolled the whole transaction back (SQLite names `SQLITE_FULL`, `SQLITE_IOERR`,
        /// `SQLITE_BUSY` and `SQLITE_NOMEM`), after which each later statement would commit on
        /// its own: the batch stops there and is rolled back, and every write fails. (A savepoint
        /// per write would cost two statements each and save nothing more: a transaction rolled
        /// back takes its savepoints with it.)
        ///
        /// A write whose caller went away before its turn (it gave up waiting) is not run.
        async fn commit(
            &self,
            writes: Vec<Write<Sqlite>>,
            callers: &[oneshot::Sender<Answer>],
        ) -> Result<Vec<Answer>, Shared> {
            let shared = |error: sqlx::Error| -> Shared { Arc::new(error) };
            let mut connection = tokio::time::timeout(WRITE_TIMEOUT, self.pool.acquire())
                .await
                .map_err(|_| -> Shared {
                    let message =
                        format!("no connection to the sqlite ledger within {WRITE_TIMEOUT:?}");
                    Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(message))
                })?
                .map_err(shared)?;
            let mut transaction = connection
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(shared)?;
            let mut answers = Vec::with_capacity(writes.len());
            for (write, caller) in writes.into_iter().zip(callers) {
                if caller.is_closed() {
                    answers.push(Err(LedgerError::backend("the caller went away")));
                    continue;
                }
                match write.run(&mut *transaction).await {
                    Ok(written) => answers.push(Ok(written)),
                    Err(error) if fails_alone(&error) => answers.push(Err(row::error(error))),
                    // Dropping the transaction rolls it back.
                    Err(error) => return Err(shared(error)),
                }
            }
            transaction.commit().await.map_err(shared)?;
            Ok(answers)
        }
    }

    /// Whether a failed write left the batch's transaction as it was (see [`Writer::commit`]).
    fn fails_alone(error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Encode(_) => true,
            sqlx::Error::Database(error) => !matches!(error.kind(), sqlx::error::ErrorKind::Other),
            _ => false,
        }
    }
}
