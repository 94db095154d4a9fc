//! One `LISTEN` connection per PostgreSQL ledger, dispatching notifications to per-key waiters
//! (see [`tower_idempotency_core::notify`]).

use std::{sync::Arc, time::Duration};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tower_idempotency_core::notify::{Dispatcher, START_TIMEOUT, Subscriber};

/// The listener of one ledger (shared by its clones), its waiters keyed by [`LedgerKey`] bytes.
///
/// [`LedgerKey`]: tower_idempotency_core::LedgerKey
pub(crate) type Notifier = Dispatcher<[u8; 32]>;

/// The listener of `channel`, on a pool of one of its own so that it never takes a connection
/// from the app's pool.
pub(crate) fn notifier(pool: &PgPool, channel: String) -> Notifier {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(START_TIMEOUT)
        .connect_lazy_with((*pool.connect_options()).clone());
    let name = channel.clone();
    Dispatcher::new(channel, move |subscriber| {
        run(pool.clone(), name.clone(), subscriber)
    })
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

async fn run(pool: PgPool, channel: String, subscriber: Arc<Subscriber<[u8; 32]>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect(&pool, &channel).await {
            Ok(mut listener) => {
                subscriber.listening();
                backoff = Duration::from_millis(100);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => {
                            if let Some(key) = parse_key(notification.payload()) {
                                subscriber.notify(&key);
                            }
                        }
                        // The connection was lost and has been re-established (and `LISTEN`
                        // re-issued); notifications in between are lost, so every waiter
                        // re-checks its record.
                        Ok(None) => subscriber.wake_all(),
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
        subscriber.down();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    /// Without a server the listener does not claim to listen, so waiters poll; and it keeps
    /// retrying (the restart of an ended task is checked in `tower_idempotency_core::notify`).
    #[tokio::test]
    async fn a_listener_that_cannot_connect_is_not_listening() {
        // Never connected: the URL only has to parse. Its task retries in the background.
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a valid URL");
        let notifier = notifier(&pool, "test_channel".to_owned());
        let soon = || Instant::now() + Duration::from_millis(200);
        assert!(!notifier.listening(soon()).await);
        assert!(!notifier.listening(soon()).await);
        assert_eq!(notifier.channel(), "test_channel");
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
