//! Change notifications for ledger backends: one background subscription per ledger (a
//! PostgreSQL `LISTEN`, a Redis `SUBSCRIBE`, ...) dispatching its messages to per-record
//! waiters.
//!
//! A backend builds a [`Dispatcher`] with the future that runs its subscription. That future is
//! spawned by the first [`Dispatcher::listening`] call (and again if it ever ends), reports its
//! state through the [`Subscriber`] it is given ([`Subscriber::listening`], [`Subscriber::down`])
//! and hands every message to [`Subscriber::notify`]. A waiting call then:
//!
//! 1. checks [`Dispatcher::listening`], and polls the record instead when it is `false`;
//! 2. registers a [`Waiter`] with [`Dispatcher::waiter`] *before* it checks the record, so that
//!    a change between the check and the wait is not missed;
//! 3. waits with [`Waiter::changed_before`], re-checking the record now and then in case a
//!    message was lost.

use std::{
    borrow::Borrow,
    collections::HashMap,
    fmt,
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout_at},
};

/// How long a first waiter waits for the subscription to start before it falls back to polling.
pub const START_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first connection attempt has not finished.
    Starting,
    /// The subscription is in effect: every message sent from now on will be dispatched.
    Listening,
    /// The connection failed or was lost; the task is retrying. Waiters poll meanwhile.
    Down,
}

type Map<K> = HashMap<K, watch::Sender<()>>;

/// The side of a [`Dispatcher`] its subscription task works with: the waiters to wake, and the
/// state that waiters read.
pub struct Subscriber<K> {
    waiters: Mutex<Map<K>>,
    state: watch::Sender<State>,
}

impl<K> Subscriber<K> {
    fn lock(&self) -> MutexGuard<'_, Map<K>> {
        // Every critical section is a single map operation, so a poisoned lock holds no torn
        // state.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The subscription is in effect: every message sent from now on will be dispatched.
    pub fn listening(&self) {
        self.state.send_replace(State::Listening);
    }

    /// The connection failed or was lost: waiters poll until [`Subscriber::listening`], and
    /// every waiter re-checks its record, as messages may have been lost.
    pub fn down(&self) {
        self.state.send_replace(State::Down);
        self.wake_all();
    }

    /// Wakes every waiter, as when messages may have been lost.
    pub fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_replace(());
        }
    }
}

impl<K: Hash + Eq> Subscriber<K> {
    /// Wakes the waiters of `key`, if any.
    pub fn notify<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(tx) = self.lock().get(key) {
            tx.send_replace(());
        }
    }
}

impl<K> fmt::Debug for Subscriber<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("state", &*self.state.borrow())
            .field("waited_for", &self.lock().len())
            .finish()
    }
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;
type Start<K> = Box<dyn Fn(Arc<Subscriber<K>>) -> Task + Send + Sync>;

/// The subscription of one ledger (shared by its clones) and its waiters, keyed by `K`: started
/// by the first waiter, restarted if its task ends, stopped when dropped.
pub struct Dispatcher<K> {
    channel: String,
    subscriber: Arc<Subscriber<K>>,
    start: Start<K>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<K> Dispatcher<K> {
    /// A dispatcher of the messages on `channel` (named in logs), whose subscription task is
    /// `start(subscriber)`: a future that is meant to run for ever, reconnecting as need be,
    /// and is spawned on the Tokio runtime of the first waiter.
    pub fn new<F>(
        channel: String,
        start: impl Fn(Arc<Subscriber<K>>) -> F + Send + Sync + 'static,
    ) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self {
            channel,
            subscriber: Arc::new(Subscriber {
                waiters: Mutex::default(),
                state: watch::channel(State::Starting).0,
            }),
            start: Box::new(move |subscriber| Box::pin(start(subscriber))),
            task: Mutex::default(),
        }
    }

    /// The channel this dispatcher listens on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Starts the subscription if need be and says whether it is in effect, waiting for the
    /// first connection attempt at most until `deadline` (and at most [`START_TIMEOUT`]).
    pub async fn listening(&self, deadline: Instant) -> bool {
        {
            let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
            // The task loops for ever, so a finished task was cut short: a panic, or the end
            // of the runtime that spawned it while the ledger lives on in another. Start it
            // again, or every waiter would trust a stale `Listening` and wait for messages
            // nobody dispatches (falling back to its periodic re-check for good).
            if task.as_ref().is_none_or(JoinHandle::is_finished) {
                if task.is_some() {
                    tracing::warn!(
                        channel = self.channel,
                        "idempotency ledger listener ended; restarting it"
                    );
                    self.subscriber.state.send_replace(State::Starting);
                }
                *task = Some(tokio::spawn((self.start)(self.subscriber.clone())));
            }
        }
        let mut state = self.subscriber.state.subscribe();
        let deadline = deadline.min(Instant::now() + START_TIMEOUT);
        matches!(
            timeout_at(deadline, state.wait_for(|s| *s != State::Starting)).await,
            Ok(Ok(s)) if *s == State::Listening
        )
    }
}

impl<K: Hash + Eq> Dispatcher<K> {
    /// Registers interest in `key`. Every message for it after this call is seen by the
    /// returned waiter, so check the record after registering, then wait.
    pub fn waiter<Q>(&self, key: &Q) -> Waiter<K>
    where
        K: Borrow<Q> + Clone,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let key = key.to_owned();
        let rx = self
            .subscriber
            .lock()
            .entry(key.clone())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Waiter {
            subscriber: self.subscriber.clone(),
            key,
            rx,
        }
    }
}

impl<K> fmt::Debug for Dispatcher<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("channel", &self.channel)
            .field("subscriber", &self.subscriber)
            .finish_non_exhaustive()
    }
}

impl<K> Drop for Dispatcher<K> {
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

/// Interest in one key's messages, from [`Dispatcher::waiter`].
pub struct Waiter<K: Hash + Eq> {
    subscriber: Arc<Subscriber<K>>,
    key: K,
    rx: watch::Receiver<()>,
}

impl<K: Hash + Eq> Waiter<K> {
    /// Whether the key was notified (or the subscription lost messages) before `deadline`.
    pub async fn changed_before(&mut self, deadline: Instant) -> bool {
        timeout_at(deadline, self.rx.changed()).await.is_ok()
    }
}

impl<K: Hash + Eq + fmt::Debug> fmt::Debug for Waiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq> Drop for Waiter<K> {
    fn drop(&mut self) {
        let mut waiters = self.subscriber.lock();
        if waiters
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 1)
        {
            waiters.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    /// A task that ended (here aborted, as a panic or its runtime's shutdown would end it) is
    /// started again by the next waiter, and waiters wait for its new subscription instead of
    /// trusting the old state.
    #[tokio::test]
    async fn a_task_that_ended_is_restarted() {
        // Never connects: it stays `Starting` for ever.
        let dispatcher = Dispatcher::<u8>::new("test".to_owned(), |_| std::future::pending());
        assert!(!dispatcher.listening(soon()).await);
        let first = dispatcher.task.lock().unwrap().as_ref().map(JoinHandle::id);
        dispatcher.task.lock().unwrap().as_ref().unwrap().abort();
        // As if it had been listening when it ended.
        dispatcher.subscriber.listening();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !dispatcher.listening(soon()).await,
            "a stale Listening is not trusted"
        );
        let task = dispatcher.task.lock().unwrap();
        let task = task.as_ref().expect("a task");
        assert_ne!(Some(task.id()), first, "a new task was started");
        assert!(!task.is_finished(), "and it runs");
    }

    /// Messages reach the waiters of their key only; a lost connection wakes every waiter and
    /// makes them poll; the last waiter of a key unregisters it.
    #[tokio::test]
    async fn messages_reach_their_waiters() {
        let dispatcher = Dispatcher::<Vec<u8>>::new("test".to_owned(), |subscriber| async move {
            subscriber.listening();
            std::future::pending().await
        });
        assert!(dispatcher.listening(soon()).await);
        let mut a = dispatcher.waiter(&b"a"[..]);
        let mut b = dispatcher.waiter(&b"b"[..]);
        let subscriber = dispatcher.subscriber.clone();
        subscriber.notify(&b"a"[..]);
        assert!(a.changed_before(soon()).await);
        assert!(!b.changed_before(soon()).await);
        subscriber.down();
        assert!(a.changed_before(soon()).await);
        assert!(b.changed_before(soon()).await);
        assert!(!dispatcher.listening(soon()).await, "down: poll");
        let a2 = dispatcher.waiter(&b"a"[..]);
        drop(a);
        assert_eq!(subscriber.lock().len(), 2);
        drop((a2, b));
        assert!(subscriber.lock().is_empty());
    }
}
