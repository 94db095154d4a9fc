//! Group commit for a one-writer database (SQLite): the ledger's concurrent writes run in one
//! transaction, so that they pay one `COMMIT` (one fsync) between them, and its claims, and its
//! completions, each in as few statements as it can.
//!
//! A write is a statement with its values bound, or a claim's or a completion's values for the
//! batch to bind ([`Write`]). A caller queues it and waits for its own answer. One task at a time,
//! spawned by the first caller to find none running, takes everything queued (up to [`MAX_BATCH`]),
//! without waiting for more, and runs it on one connection in one `BEGIN IMMEDIATE .. COMMIT`.
//! Binding those itself ([`Merge`]), the batch writes its claims in one multi-row statement and its
//! completions in another (in chunks of a power of two: at most 6 statements for up to 64 of a
//! kind, where each took one; each statement is a round trip to sqlx's SQLite thread, and those
//! round trips, not the fsync, were what a batch spent its time on). Each keeps its meaning: a
//! claim sees the rows before it (two claims of one key have one winner), a completion is fenced by
//! its own key and token; a write that violates a constraint fails alone; a `COMMIT` that fails
//! fails the whole batch, which then wrote nothing (see `Writer::commit`).

use std::{fmt, time::Duration};

use sqlx::{Database, Executor, IntoArguments, query::Query};
use tower_idempotency_core::ClaimRequest;

use crate::ledger::Completion;

/// How long a write waits to be taken into a batch, and a batch for its connection, before
/// failing: as long as SQLite's own busy timeout.
#[cfg_attr(not(feature = "sqlite"), expect(dead_code, reason = "SQLite's"))]
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most writes one transaction takes.
#[cfg_attr(not(feature = "sqlite"), expect(dead_code, reason = "SQLite's"))]
pub(crate) const MAX_BATCH: usize = 64;

/// One of the ledger's writes, whose returned row is wanted (the claim) or only how many rows it
/// wrote.
pub struct Write<DB: Database> {
    what: What<DB>,
    fetch: bool,
}

#[cfg_attr(
    not(feature = "sqlite"),
    expect(dead_code, reason = "only SQLite's batches bind values")
)]
enum What<DB: Database> {
    /// A statement with its values bound.
    Query(Query<'static, DB, DB::Arguments>),
    /// A claim's or a completion's values, not yet bound: a one-writer database's batch binds
    /// them, with the others of its kind in one statement or alone (SQLite's; see [`Writer`]).
    Values(Merge),
}

/// A claim's or a completion's values, which a batch may write in one statement with the others
/// of its kind.
#[cfg_attr(
    not(feature = "sqlite"),
    expect(dead_code, reason = "only SQLite's batches merge")
)]
pub(crate) enum Merge {
    /// The values the `claim` statement binds.
    Claim(ClaimRequest),
    /// The values the `complete` statement binds.
    Complete(Completion),
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
        Self {
            what: What::Query(query),
            fetch: true,
        }
    }

    /// A statement whose count of written rows is wanted.
    pub(crate) fn execute(query: Query<'static, DB, DB::Arguments>) -> Self {
        Self {
            what: What::Query(query),
            fetch: false,
        }
    }

    /// A claim (whose returned row is wanted) or a completion (its count of written rows) as its
    /// values, for a one-writer database's batch ([`Backend::ONE_WRITER`]) to bind.
    ///
    /// [`Backend::ONE_WRITER`]: crate::backend::Backend::ONE_WRITER
    pub(crate) fn values(merge: Merge) -> Self {
        let fetch = matches!(merge, Merge::Claim(_));
        Self {
            what: What::Values(merge),
            fetch,
        }
    }

    /// Runs the statement on `executor` (the pool, or a batch's transaction). A write made of
    /// [`values`](Self::values) has no statement yet: its batch binds it first.
    pub(crate) async fn run<'e, E>(self, executor: E) -> Result<Written<DB>, sqlx::Error>
    where
        E: Executor<'e, Database = DB>,
        DB::Arguments: IntoArguments<DB>,
    {
        let What::Query(query) = self.what else {
            return Err(sqlx::Error::Protocol(
                "the ledger ran a write whose values were not bound".into(),
            ));
        };
        if self.fetch {
            query.fetch_optional(executor).await.map(Written::Row)
        } else {
            let done = query.execute(executor).await?;
            Ok(Written::Rows(DB::rows_affected(&done)))
        }
    }
}

impl<DB: Database> fmt::Debug for Write<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Write")
            .field("fetch", &self.fetch)
            .field("bound", &matches!(self.what, What::Query(_)))
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

#[cfg(feature = "sqlite")]
pub(crate) use sqlite::{MERGED, Merged, Writer};

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

    use std::time::Duration;

    use sqlx::{Connection, Row, SqlStr, Sqlite, SqliteConnection, SqlitePool, query::Query};
    use tokio::sync::oneshot;
    use tower_idempotency_core::LedgerError;
    use uuid::Uuid;

    use super::{MAX_BATCH, Merge, WRITE_TIMEOUT, What, Write, Written};
    use crate::{SqlLedger, row};

    type Answer = Result<Written<Sqlite>, LedgerError>;

    /// An error shared by every write of a failed batch.
    type Shared = Arc<dyn std::error::Error + Send + Sync>;

    /// The largest merged statement writes `2^MERGED` rows (as many as a batch takes).
    pub(crate) const MERGED: u32 = MAX_BATCH.trailing_zeros();
    const _: () = assert!(
        MAX_BATCH.is_power_of_two(),
        "a batch's kinds are chunked into powers of two up to MAX_BATCH"
    );

    /// The statements that write `2^n` claims, or completions, in one, for `n` in `1..=MERGED`
    /// (`claims[n - 1]`): a batch writes its claims in as few of them as add up to their count, and
    /// so its completions (up to 64 of a kind in 1 to 6 statements, where they took one each).
    /// Powers of two, so that sqlx's cache of prepared statements (100 per connection) holds them
    /// all, with the other statements of a table (about 25 in all; several tables on one pool
    /// share the cache and may evict each other's).
    pub(crate) struct Merged {
        /// The ledger's `claim` statement, for a claim written alone.
        pub(crate) claim: SqlStr,
        /// The ledger's `complete` statement, for a completion written alone.
        pub(crate) complete: SqlStr,
        pub(crate) claims: Vec<SqlStr>,
        pub(crate) completions: Vec<SqlStr>,
    }

    /// A write of the batch, by its place in the queue.
    type Placed = (usize, Write<Sqlite>);

    /// The SQLite ledger's group commit (shared by a ledger's clones).
    pub(crate) struct Writer {
        pool: SqlitePool,
        merged: Merged,
        state: Mutex<State>,
        /// Committed batches, for the tests.
        batches: AtomicU64,
        /// Statements run for the writes of batches, for the tests.
        statements: AtomicU64,
        /// When the batch under way began, in microseconds since `created`, plus one; 0 while
        /// none is (see [`stalled`](Self::stalled)).
        busy_since: AtomicU64,
        created: std::time::Instant,
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
                .field("statements", &self.statements)
                .finish_non_exhaustive()
        }
    }

    impl Writer {
        pub(crate) fn new(pool: SqlitePool, merged: Merged) -> Arc<Self> {
            Arc::new(Self {
                pool,
                merged,
                state: Mutex::default(),
                batches: AtomicU64::new(0),
                statements: AtomicU64::new(0),
                busy_since: AtomicU64::new(0),
                created: std::time::Instant::now(),
            })
        }

        /// The merged statements.
        pub(crate) fn merged(&self) -> &Merged {
            &self.merged
        }

        /// Writes queued and not yet taken into a batch.
        pub(crate) fn queued(&self) -> usize {
            self.state().queue.len()
        }

        /// Whether a batch is under way.
        pub(crate) fn busy(&self) -> bool {
            self.busy_since.load(Ordering::Relaxed) != 0
        }

        /// Statements run for writes so far.
        pub(crate) fn statements(&self) -> u64 {
            self.statements.load(Ordering::Relaxed)
        }

        /// Whether the batch under way began more than `after` ago: it waits for its
        /// connection, the write lock (held elsewhere, say), or the disk.
        pub(crate) fn stalled(&self, after: Duration) -> bool {
            match self.busy_since.load(Ordering::Relaxed) {
                0 => false,
                since => {
                    let now = self.micros();
                    now.saturating_sub(since - 1) > after.as_micros() as u64
                }
            }
        }

        fn micros(&self) -> u64 {
            u64::try_from(self.created.elapsed().as_micros()).unwrap_or(u64::MAX)
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
            // Marks the batch under way until it ends, however it ends.
            struct Busy<'a>(&'a Writer);
            impl Drop for Busy<'_> {
                fn drop(&mut self) {
                    self.0.busy_since.store(0, Ordering::Relaxed);
                }
            }
            self.busy_since.store(self.micros() + 1, Ordering::Relaxed);
            let _busy = Busy(self);
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
        /// The claims go first, then the completions, each kind in as few statements as
        /// [`Merged`] allows, then the other writes one by one in the order queued. Every write
        /// of a batch was waiting when the batch began, none answered, so any order is one they
        /// could have arrived in; a write sees those before it in that order (two claims of one
        /// key have one winner). A claim or completion whose key and token another of the batch
        /// has already (a caller completing one lease twice at once) goes with the others, after
        /// it, and finds the record completed, as it would have one after the other. So claims
        /// run before a release, an eviction or a purge that came with them: a claim can lose to a
        /// record that the batch then deletes, and then claims again in a later batch (the
        /// ledger's `CLAIM_ATTEMPTS`).
        ///
        /// A statement that violates a constraint is undone by SQLite on its own (its conflict
        /// resolution is the default, `ABORT`) and the transaction goes on: a single write fails
        /// alone, and the writes of a merged statement that failed so are run again one by one,
        /// so that only the failing one fails; so does a write whose values do not bind (it
        /// never ran). Any other error may have rolled the whole transaction back (SQLite names
        /// `SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_BUSY` and `SQLITE_NOMEM`), after which each
        /// later statement would commit on its own: the batch stops there and is rolled back,
        /// and every write fails. (A savepoint per write would cost two statements each and
        /// save nothing more: a transaction rolled back takes its savepoints with it.)
        ///
        /// A write whose caller went away before the batch began (it gave up waiting) is not
        /// run.
        async fn commit(
            &self,
            writes: Vec<Write<Sqlite>>,
            callers: &[oneshot::Sender<Answer>],
        ) -> Result<Vec<Answer>, Shared> {
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
            let mut answers: Vec<Option<Answer>> = writes.iter().map(|_| None).collect();
            let (mut claims, mut completions, mut others) = (Vec::new(), Vec::new(), Vec::new());
            for (at, (write, caller)) in writes.into_iter().zip(callers).enumerate() {
                if caller.is_closed() {
                    answers[at] = Some(Err(LedgerError::backend("the caller went away")));
                    continue;
                }
                let group = match &write.what {
                    What::Values(Merge::Claim(_)) => Some(&mut claims),
                    What::Values(Merge::Complete(_)) => Some(&mut completions),
                    What::Query(_) => None,
                };
                match (group, identity(&write)) {
                    (Some(group), Some(id))
                        if !group.iter().any(|(_, other)| identity(other) == Some(id)) =>
                    {
                        group.push((at, write));
                    }
                    _ => others.push((at, write)),
                }
            }
            for (group, statements) in [
                (claims, &self.merged.claims),
                (completions, &self.merged.completions),
            ] {
                let mut group = group.into_iter();
                while group.len() > 0 {
                    // The largest power of two that fits what is left.
                    let take = 1 << group.len().ilog2();
                    let chunk: Vec<Placed> = group.by_ref().take(take).collect();
                    if take == 1 {
                        self.run_alone(&mut transaction, chunk, &mut answers)
                            .await?;
                    } else {
                        let sql = &statements[take.trailing_zeros() as usize - 1];
                        self.run_merged(&mut transaction, sql, chunk, &mut answers)
                            .await?;
                    }
                }
            }
            self.run_alone(&mut transaction, others, &mut answers)
                .await?;
            transaction.commit().await.map_err(shared)?;
            Ok(answers
                .into_iter()
                .map(|answer| {
                    answer.unwrap_or_else(|| Err(LedgerError::backend("the batch did not run it")))
                })
                .collect())
        }

        /// `write` with its values bound to the ledger's own statement, for running alone.
        fn bound(&self, write: Write<Sqlite>) -> Write<Sqlite> {
            let query = match write.what {
                What::Query(query) => query,
                What::Values(Merge::Claim(request)) => SqlLedger::<Sqlite>::bind_claim(
                    sqlx::query(self.merged.claim.clone()),
                    &request,
                ),
                What::Values(Merge::Complete(completion)) => SqlLedger::<Sqlite>::bind_completion(
                    sqlx::query(self.merged.complete.clone()),
                    &completion,
                ),
            };
            Write {
                what: What::Query(query),
                fetch: write.fetch,
            }
        }

        /// Runs each of `writes` by its own statement, in order.
        async fn run_alone(
            &self,
            connection: &mut SqliteConnection,
            writes: Vec<Placed>,
            answers: &mut [Option<Answer>],
        ) -> Result<(), Shared> {
            for (at, write) in writes {
                self.statements.fetch_add(1, Ordering::Relaxed);
                answers[at] = Some(match self.bound(write).run(&mut *connection).await {
                    Ok(written) => Ok(written),
                    Err(error) if fails_alone(&error) => Err(row::error(error)),
                    // Dropping the transaction rolls it back.
                    Err(error) => return Err(shared(error)),
                });
            }
            Ok(())
        }

        /// Runs `writes`, all claims or all completions, in one statement, `sql` (one of
        /// [`Merged`]'s, for as many rows), and answers each from the rows it returned: a claim
        /// gets its row if it won, a completion one written row if it completed its record.
        async fn run_merged(
            &self,
            connection: &mut SqliteConnection,
            sql: &SqlStr,
            writes: Vec<Placed>,
            answers: &mut [Option<Answer>],
        ) -> Result<(), Shared> {
            let mut query: Query<'_, Sqlite, _> = sqlx::query(sql.clone());
            let values = writes.iter().filter_map(|(_, write)| match &write.what {
                What::Values(merge) => Some(merge),
                What::Query(_) => None,
            });
            for merge in values {
                query = match merge {
                    Merge::Claim(request) => SqlLedger::<Sqlite>::bind_claim(query, request),
                    Merge::Complete(completion) => {
                        SqlLedger::<Sqlite>::bind_completion(query, completion)
                    }
                };
            }
            self.statements.fetch_add(1, Ordering::Relaxed);
            let mut written = match query.fetch_all(&mut *connection).await {
                Ok(rows) => rows
                    .into_iter()
                    .map(|found| {
                        let key: [u8; 32] =
                            found.try_get::<&[u8], _>("key")?.try_into().map_err(|_| {
                                sqlx::Error::Decode("a record's key is not 32 bytes".into())
                            })?;
                        let token: Uuid = found.try_get("token")?;
                        Ok((key, token, Some(found)))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(shared)?,
                // SQLite undid the statement; run each alone to fail only the one at fault.
                Err(error) if fails_alone(&error) => {
                    return self.run_alone(connection, writes, answers).await;
                }
                Err(error) => return Err(shared(error)),
            };
            for (at, write) in writes {
                let id = identity(&write);
                let found = written
                    .iter_mut()
                    .find(|(key, token, _)| id == Some((*key, *token)))
                    .and_then(|(_, _, found)| found.take());
                answers[at] = Some(Ok(if write.fetch {
                    Written::Row(found)
                } else {
                    Written::Rows(u64::from(found.is_some()))
                }));
            }
            Ok(())
        }
    }

    fn shared(error: sqlx::Error) -> Shared {
        Arc::new(error)
    }

    /// The key and token of a claim or a completion: what its merged statement returns for it.
    fn identity(write: &Write<Sqlite>) -> Option<([u8; 32], Uuid)> {
        match &write.what {
            What::Values(Merge::Claim(request)) => {
                Some((*request.key.as_bytes(), request.token.as_uuid()))
            }
            What::Values(Merge::Complete(completion)) => Some((completion.key, completion.token)),
            What::Query(_) => None,
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
