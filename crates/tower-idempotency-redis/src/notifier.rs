//! One pub/sub connection per ledger, dispatching change messages to per-record waiters (see
//! [`tower_idempotency_core::notify`]).

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::time::timeout;
use tower_idempotency_core::notify::{Dispatcher, START_TIMEOUT, Subscriber};

/// How often the subscriber pings its server, so that a hung or vanished server is noticed
/// (and waiters fall back to polling) instead of leaving them on a silent connection.
const PING_EVERY: Duration = Duration::from_secs(2);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The subscriber of one ledger (shared by its clones), its waiters keyed by record name.
pub(crate) type Notifier = Dispatcher<Vec<u8>>;

/// The subscriber of `channel` on `clients`, tried in turn: the one server, or a Cluster's seed
/// nodes (a Cluster forwards every `PUBLISH` to every node, so any node will do).
pub(crate) fn notifier(clients: Vec<redis::Client>, channel: String) -> Notifier {
    let clients: Arc<[redis::Client]> = clients.into();
    let name = channel.clone();
    Dispatcher::new(channel, move |subscriber| {
        run(clients.clone(), name.clone(), subscriber)
    })
}

/// Subscribes on one of `clients` and dispatches until the connection fails or stops answering
/// pings; then marks the subscriber down, wakes every waiter (messages may have been lost), and
/// tries the next client.
async fn run(clients: Arc<[redis::Client]>, channel: String, subscriber: Arc<Subscriber<Vec<u8>>>) {
    let mut backoff = Duration::from_millis(50);
    for client in clients.iter().cycle() {
        match subscribe(client, &channel).await {
            Ok((mut sink, mut stream)) => {
                subscriber.listening();
                backoff = Duration::from_millis(50);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ping.tick().await;
                loop {
                    tokio::select! {
                        message = stream.next() => match message {
                            Some(message) => subscriber.notify(message.get_payload_bytes()),
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
        subscriber.down();
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
