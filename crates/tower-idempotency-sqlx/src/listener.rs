//! One `LISTEN` connection per PostgreSQL ledger, dispatching notifications to per-key waiters.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout_at},
};
use tower_idempotency_core::LedgerKey;

/// How long a first waiter waits for the listener to connect before it falls back to polling.
const START_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first connection attempt has not finished.
    Starting,
    /// `LISTEN` is in effect: every notification committed from now on will be dispatched.
    Listening,
    /// The connection failed or was lost; the task is retrying. Waiters poll meanwhile.
    Down,
}

type Waiters = Mutex<HashMap<[u8; 32], watch::Sender<()>>>;

fn lock(waiters: &Waiters) -> MutexGuard<'_, HashMap<[u8; 32], watch::Sender<()>>> {
    // Every critical section is a single map operation, so a poisoned lock holds no torn state.
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Shared {
    waiters: Waiters,
    state: watch::Sender<State>,
}

impl Shared {
    fn wake(&self, key: &[u8; 32]) {
        if let Some(tx) = lock(&self.waiters).get(key) {
            tx.send_replace(());
        }
    }

    fn wake_all(&self) {
        for tx in lock(&self.waiters).values() {
            tx.send_replace(());
        }
    }
}

/// The listener of one ledger (shared by its clones): started by the first waiter, stopped when
/// the last clone is dropped.
pub(crate) struct Notifier {
    channel: String,
    /// A pool of one for the listener, so that it never takes a connection from the app's pool.
    pool: PgPool,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Notifier {
    pub(crate) fn new(pool: &PgPool, channel: String) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(START_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        Self {
            channel,
            pool,
            shared: Arc::new(Shared {
                waiters: Mutex::default(),
                state: watch::channel(State::Starting).0,
            }),
            task: Mutex::default(),
        }
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Starts the listener if need be and says whether it is listening, waiting for the first
    /// connection attempt at most until `deadline` (and at most 2 s).
    pub(crate) async fn listening(&self, deadline: Instant) -> bool {
        {
            let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
            // `run` loops for ever, so a finished task was cut short: a panic, or the end of the
            // runtime that spawned it while the ledger lives on in another. Start it again, or
            // every waiter would trust a stale `Listening` and wait for notifications nobody
            // dispatches (falling back to the 1 s re-check for good).
            if task.as_ref().is_none_or(JoinHandle::is_finished) {
                if task.is_some() {
                    tracing::warn!(
                        channel = self.channel,
                        "idempotency ledger listener ended; restarting it"
                    );
                    self.shared.state.send_replace(State::Starting);
                }
                *task = Some(tokio::spawn(run(
                    self.pool.clone(),
                    self.channel.clone(),
                    self.shared.clone(),
                )));
            }
        }
        let mut state = self.shared.state.subscribe();
        let deadline = deadline.min(Instant::now() + START_TIMEOUT);
        matches!(
            timeout_at(deadline, state.wait_for(|s| *s != State::Starting)).await,
            Ok(Ok(s)) if *s == State::Listening
        )
    }

    /// Registers interest in `key`. Every notification for it after this call is seen by the
    /// returned waiter, so check the record after registering, then wait.
    pub(crate) fn waiter(&self, key: &LedgerKey) -> Waiter {
        let key = *key.as_bytes();
        let rx = lock(&self.shared.waiters)
            .entry(key)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Waiter {
            shared: self.shared.clone(),
            key,
            rx,
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// Interest in one key's notifications.
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    key: [u8; 32],
    rx: watch::Receiver<()>,
}

impl Waiter {
    /// Whether the key was notified (or the listener lost notifications) before `deadline`.
    pub(crate) async fn changed_before(&mut self, deadline: Instant) -> bool {
        timeout_at(deadline, self.rx.changed()).await.is_ok()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = lock(&self.shared.waiters);
        if waiters
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 1)
        {
            waiters.remove(&self.key);
        }
    }
}

fn parse_key(payload: &str) -> Option<[u8; 32]> {
    let bytes = payload.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut key = [0u8; 32];
    for (out, pair) in key.iter_mut().zip(bytes.chunks_exact(2)) {
        *out = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(key)
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}

async fn run(pool: PgPool, channel: String, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect(&pool, &channel).await {
            Ok(mut listener) => {
                shared.state.send_replace(State::Listening);
                backoff = Duration::from_millis(100);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => {
                            if let Some(key) = parse_key(notification.payload()) {
                                shared.wake(&key);
                            }
                        }
                        // The connection was lost and has been re-established (and `LISTEN`
                        // re-issued); notifications in between are lost, so every waiter
                        // re-checks its record.
                        Ok(None) => shared.wake_all(),
                        Err(error) => {
                            tracing::warn!(%error, channel, "idempotency ledger listener lost");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, channel, "idempotency ledger listener cannot connect");
            }
        }
        shared.state.send_replace(State::Down);
        shared.wake_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener task that ended (here aborted, as a panic or its runtime's shutdown would end
    /// it) is started again by the next waiter, and waiters wait for its new `LISTEN` instead
    /// of trusting the old state.
    #[tokio::test]
    async fn a_listener_task_that_ended_is_restarted() {
        // Never connected: the URL only has to parse. Its task retries in the background.
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a valid URL");
        let notifier = Notifier::new(&pool, "test_channel".to_owned());
        let soon = || Instant::now() + Duration::from_millis(50);
        notifier.listening(soon()).await;
        let first = notifier.task.lock().unwrap().as_ref().map(JoinHandle::id);
        notifier.task.lock().unwrap().as_ref().unwrap().abort();
        // As if it had been listening when it ended.
        notifier.shared.state.send_replace(State::Listening);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !notifier.listening(soon()).await,
            "a stale Listening is not trusted"
        );
        let task = notifier.task.lock().unwrap();
        let task = task.as_ref().expect("a task");
        assert_ne!(Some(task.id()), first, "a new task was started");
        assert!(!task.is_finished(), "and it runs");
    }

    #[test]
    fn payloads_parse_back_to_keys() {
        let key = [0xabu8; 32];
        assert_eq!(parse_key(&"ab".repeat(32)), Some(key));
        assert_eq!(parse_key(&"AB".repeat(32)), Some(key));
        assert_eq!(parse_key("ab"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
    }
}
