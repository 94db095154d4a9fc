//! One pub/sub connection per ledger, dispatching change messages to per-key waiters.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};

/// How long a first waiter waits for the subscription before it falls back to polling.
const START_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the subscriber pings its server, so that a hung or vanished server is noticed
/// (and waiters fall back to polling) instead of leaving them on a silent connection.
const PING_EVERY: Duration = Duration::from_secs(2);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first connection attempt has not finished.
    Starting,
    /// `SUBSCRIBE` is in effect: every message published from now on is dispatched.
    Listening,
    /// The connection failed or was lost; the task is retrying. Waiters poll meanwhile.
    Down,
}

type Waiters = Mutex<HashMap<Vec<u8>, watch::Sender<()>>>;

fn lock(waiters: &Waiters) -> MutexGuard<'_, HashMap<Vec<u8>, watch::Sender<()>>> {
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
    fn wake(&self, record: &[u8]) {
        if let Some(tx) = lock(&self.waiters).get(record) {
            tx.send_replace(());
        }
    }

    fn wake_all(&self) {
        for tx in lock(&self.waiters).values() {
            tx.send_replace(());
        }
    }
}

/// The subscriber of one ledger (shared by its clones): started by the first waiter, stopped
/// when the last clone is dropped.
pub(crate) struct Notifier {
    channel: String,
    /// The servers to subscribe on, tried in turn: the one server, or a Cluster's seed nodes
    /// (a Cluster forwards every `PUBLISH` to every node, so any node will do).
    clients: Arc<[redis::Client]>,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Notifier {
    pub(crate) fn new(clients: Vec<redis::Client>, channel: String) -> Self {
        Self {
            channel,
            clients: clients.into(),
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

    /// Starts the subscriber if need be and says whether it is subscribed, waiting for the first
    /// attempt at most until `deadline` (and at most 2 s).
    pub(crate) async fn listening(&self, deadline: Instant) -> bool {
        {
            let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
            if task.is_none() {
                *task = Some(tokio::spawn(run(
                    self.clients.clone(),
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

    /// Registers interest in the record named `record`. Every message for it after this call is
    /// seen by the returned waiter, so check the record after registering, then wait.
    pub(crate) fn waiter(&self, record: &[u8]) -> Waiter {
        let rx = lock(&self.shared.waiters)
            .entry(record.to_vec())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Waiter {
            shared: self.shared.clone(),
            record: record.to_vec(),
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

/// Interest in one record's messages.
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    record: Vec<u8>,
    rx: watch::Receiver<()>,
}

impl Waiter {
    /// Whether the record was changed (or the subscriber lost messages) before `deadline`.
    pub(crate) async fn changed_before(&mut self, deadline: Instant) -> bool {
        timeout_at(deadline, self.rx.changed()).await.is_ok()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = lock(&self.shared.waiters);
        if waiters
            .get(&self.record)
            .is_some_and(|tx| tx.receiver_count() == 1)
        {
            waiters.remove(&self.record);
        }
    }
}

/// Subscribes on one of `clients` and dispatches until the connection fails or stops answering
/// pings; then marks the subscriber down, wakes every waiter (messages may have been lost), and
/// tries the next client.
async fn run(clients: Arc<[redis::Client]>, channel: String, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    for client in clients.iter().cycle() {
        match subscribe(client, &channel).await {
            Ok((mut sink, mut stream)) => {
                shared.state.send_replace(State::Listening);
                backoff = Duration::from_millis(50);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ping.tick().await;
                loop {
                    tokio::select! {
                        message = stream.next() => match message {
                            Some(message) => shared.wake(message.get_payload_bytes()),
                            None => {
                                tracing::warn!(channel, "idempotency ledger subscriber lost");
                                break;
                            }
                        },
                        _ = ping.tick() => {
                            if !matches!(
                                timeout(PING_EVERY, sink.ping::<String>()).await,
                                Ok(Ok(_))
                            ) {
                                tracing::warn!(channel, "idempotency ledger subscriber stopped answering");
                                break;
                            }
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, channel, "idempotency ledger subscriber cannot subscribe");
            }
        }
        shared.state.send_replace(State::Down);
        shared.wake_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Subscription = (redis::aio::PubSubSink, redis::aio::PubSubStream);

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<Subscription, redis::RedisError> {
    let attempt = async {
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(channel).await?;
        Ok((sink, stream))
    };
    timeout(START_TIMEOUT, attempt).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "subscribing timed out",
        )))
    })
}
