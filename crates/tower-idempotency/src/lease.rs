//! The claim's lease while the handler runs: renewed in the background, then given up in one of
//! three ways: completed with the response (retried on a ledger error), released (a response
//! that is not stored, such as a 5xx, a panic or a failed body), or abandoned (its transaction
//! rolled back, then released).

use std::{pin::Pin, task::Poll, time::Duration};

use tokio::time::Instant;
use tower_idempotency_core::{FencingToken, Ledger, LedgerError, LedgerKey, StoredResponse};

use crate::{config::Shared, transaction::TxHandle};

/// Drives `handler` while renewing the lease every third of its length, concurrently, so a slow
/// handler keeps its key and a slow ledger does not stall the handler.
///
/// The handler is borrowed, pinned in its caller's state, rather than moved in (which would
/// hold it twice). Most handlers of a fast service finish at their first poll and need no
/// renewal timer: one is set up, boxed, only if the handler is still running after it.
/// Registering a timer costs a timer-wheel entry and often a wake-up of the runtime's driver
/// (an eventfd write, and on a multi-threaded runtime a cross-thread unpark).
pub(crate) async fn renewing<L: Ledger, F: Future>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    mut handler: Pin<&mut F>,
) -> F::Output {
    let mut renewals: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = handler.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        let renewals = renewals.get_or_insert_with(|| Box::pin(renew(shared, key, token)));
        // `renew` never finishes: it renews until the handler does, or stops at a lost lease.
        let _ = renewals.as_mut().poll(cx);
        Poll::Pending
    })
    .await
}

/// Renews the lease every third of its length, forever; after a lost lease, waits forever.
async fn renew<L: Ledger>(shared: &Shared<L>, key: &LedgerKey, token: FencingToken) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let period = config.lease / 3;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match config
            .telemetry
            .ledger(
                ledger.name(),
                "renew",
                ledger.renew(key, token, config.lease),
            )
            .await
        {
            Ok(()) => {}
            Err(LedgerError::LeaseLost) => {
                tracing::warn!(
                    "the lease was taken over while the handler ran; its result will not be stored"
                );
                return std::future::pending().await;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the idempotency lease failed; retrying")
            }
        }
    }
}

/// Records the handler's response: one attempt here, and only if it fails with a ledger error,
/// two more with a backoff (boxed, so the retry loop costs the usual path nothing).
pub(crate) async fn complete<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let first = config
        .telemetry
        .ledger(
            ledger.name(),
            "complete",
            ledger.complete(key, token, stored, config.retention),
        )
        .await;
    match first {
        Ok(()) => config.telemetry.stored(stored.stored_len()),
        Err(LedgerError::LeaseLost) => lease_lost_before_storing(),
        Err(error) => Box::pin(complete_retrying(shared, key, token, stored, error)).await,
    }
}

fn lease_lost_before_storing() {
    tracing::warn!(
        "the lease was taken over before the response was stored; the newer holder's result stands"
    );
}

async fn complete_retrying<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
    first: LedgerError,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let mut error = first;
    let mut backoff = Duration::from_millis(50);
    for attempt in 2..=3 {
        tracing::warn!(%error, attempt = attempt - 1, "storing the idempotent response failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        match config
            .telemetry
            .ledger(
                ledger.name(),
                "complete",
                ledger.complete(key, token, stored, config.retention),
            )
            .await
        {
            Ok(()) => {
                config.telemetry.stored(stored.stored_len());
                return;
            }
            Err(LedgerError::LeaseLost) => return lease_lost_before_storing(),
            Err(next) => error = next,
        }
    }
    tracing::error!(%error, "storing the idempotent response failed; the key stays in progress until its lease expires");
}

pub(crate) async fn release<L: Ledger>(shared: &Shared<L>, key: &LedgerKey, token: FencingToken) {
    let (ledger, telemetry) = (&shared.ledger, &shared.config.telemetry);
    match telemetry
        .ledger(ledger.name(), "release", ledger.release(key, token))
        .await
    {
        Ok(()) | Err(LedgerError::LeaseLost) => {}
        Err(error) => {
            tracing::warn!(%error, "releasing the idempotency key failed; it frees itself when the lease expires")
        }
    }
}

/// The handler's result is not to be kept: roll its transaction back, then release the key.
pub(crate) async fn abandon<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    transaction: Option<Box<dyn TxHandle>>,
) {
    if let Some(transaction) = transaction {
        transaction.rollback().await;
    }
    release(shared, key, token).await;
}
