//! The claim's lease while the handler runs: renewed in the background, then given up in one of
//! three ways: completed with the response (retried on a ledger error while the lease lasts),
//! released (a response that is not stored, such as a 5xx, a panic or a failed body), or
//! abandoned (its transaction rolled back, then released).

use std::{pin::Pin, task::Poll, time::Duration};

use tokio::time::Instant;
use tower_idempotency_core::{FencingToken, Ledger, LedgerError, LedgerKey, StoredResponse};
use tracing::Instrument;

use crate::{
    config::{Config, Shared},
    ledger_call::Door,
    transaction::TxHandle,
};

/// What this process knows of its lease: when it runs out unless renewed (counted from when the
/// claim was sent, so never later than the ledger's own), when the next renewal is due, and when
/// renewals stop (the maximum handler time).
#[derive(Debug)]
pub(crate) struct LeaseClock {
    pub(crate) expires: Instant,
    next: Instant,
    ceiling: Instant,
}

impl LeaseClock {
    pub(crate) fn new(config: &Config, claimed_at: Instant) -> Self {
        let far = |d| claimed_at.checked_add(d).unwrap_or(claimed_at + MAX_AHEAD);
        Self {
            expires: far(config.lease),
            next: far(config.lease / 3),
            ceiling: far(config.max_handler_time),
        }
    }
}

/// Builder settings are at most 100 years (MAX_DURATION); this is a fallback for a platform
/// whose `Instant` cannot hold that.
const MAX_AHEAD: Duration = Duration::from_secs(365 * 24 * 60 * 60);

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
    clock: &mut LeaseClock,
    mut handler: Pin<&mut F>,
) -> F::Output {
    let mut clock = Some(clock);
    let mut renewals: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = handler.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        let renewals = renewals.get_or_insert_with(|| {
            let clock = clock.take().expect("the renewals are set up once");
            Box::pin(renew(shared, key, token, clock))
        });
        // `renew` never finishes: it renews until the handler does, or stops at a lost lease
        // or the ceiling.
        let _ = renewals.as_mut().poll(cx);
        Poll::Pending
    })
    .await
}

/// Renews the lease every third of its length; a renewal that fails or times out (each is
/// bounded by the ledger timeout) is retried shortly after, not a period later. Stops at a lost
/// lease or at the maximum handler time, and then waits forever.
async fn renew<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    clock: &mut LeaseClock,
) {
    let config = &shared.config;
    let period = config.lease / 3;
    let retry = (period / 10).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut lapsed = false;
    loop {
        tokio::time::sleep_until(clock.next).await;
        if Instant::now() >= clock.ceiling {
            tracing::error!(
                max_handler_time = ?config.max_handler_time,
                "the idempotent handler is still running at the maximum handler time; its lease is no longer renewed, so a retry may take the key over once it expires"
            );
            config.telemetry.lease_ceiling();
            return std::future::pending().await;
        }
        let sent = Instant::now();
        let renewed = shared
            .call(
                "renew",
                Door::Always,
                shared.ledger.renew(key, token, config.lease),
            )
            .await;
        match renewed {
            Ok(()) => {
                clock.expires = sent + config.lease;
                clock.next = sent + period;
                lapsed = false;
            }
            Err(LedgerError::LeaseLost) => {
                tracing::error!(
                    "the lease was taken over while the handler ran; its result will not be stored"
                );
                config.telemetry.lease_lost("taken_over");
                return std::future::pending().await;
            }
            Err(error) => {
                let now = Instant::now();
                if now >= clock.expires && !lapsed {
                    lapsed = true;
                    tracing::error!(%error, "no renewal got through before the lease expired; another request may take the key over while this handler runs");
                    config.telemetry.lease_lost("expired");
                } else {
                    tracing::warn!(%error, "renewing the idempotency lease failed; retrying");
                }
                clock.next = now + retry;
            }
        }
    }
}

/// Records the handler's response: one attempt here, and only if it fails with a ledger error
/// (or times out), more with a backoff while the lease lasts (boxed, so the retry loop costs
/// the usual path nothing). Every attempt is fenced by the token.
pub(crate) async fn complete<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
    clock: &LeaseClock,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let first = shared
        .call(
            "complete",
            Door::Always,
            ledger.complete(key, token, stored, config.retention),
        )
        .await;
    match first {
        Ok(()) => config.telemetry.stored(stored.stored_len()),
        Err(LedgerError::LeaseLost) => lease_lost_before_storing(),
        Err(error) => {
            Box::pin(complete_retrying(
                shared,
                key,
                token,
                stored,
                error,
                clock.expires,
            ))
            .await
        }
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
    expires: Instant,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let mut error = first;
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1;
    while Instant::now() + backoff < expires {
        tracing::warn!(%error, attempt, "storing the idempotent response failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        attempt += 1;
        match shared
            .call(
                "complete",
                Door::Always,
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
    tracing::error!(%error, attempt, "storing the idempotent response failed until its lease ran out; the key stays in progress until then, and a retry after it runs the handler again");
}

pub(crate) async fn release<L: Ledger>(shared: &Shared<L>, key: &LedgerKey, token: FencingToken) {
    match shared
        .call("release", Door::Always, shared.ledger.release(key, token))
        .await
    {
        Ok(()) | Err(LedgerError::LeaseLost) => {}
        Err(error) => {
            tracing::warn!(%error, "releasing the idempotency key failed; it frees itself when the lease expires")
        }
    }
}

/// A claim the layer stopped waiting for (the ledger timeout) may still have taken effect: its
/// answer was late (a slow round trip, a Redis Cluster's index write after the claim), or it is
/// still queued in the ledger (a statement waiting behind a lock, or for a slow disk) and commits
/// later. Gives the key back in the background, fenced by the claim's token, so that retries do
/// not get 409 until the lease lapses: at once, then again after one ledger timeout, two, four and
/// so on for as long as `lease_ends` is ahead, until a release finds the claim. A claim that never
/// took effect makes every release find nothing (a few cheap calls); one that commits before the
/// lease ends is given back by the next try after it.
pub(crate) fn release_timed_out_claim<L: Ledger>(
    shared: std::sync::Arc<Shared<L>>,
    key: LedgerKey,
    token: FencingToken,
    lease_ends: Instant,
) {
    // Bounded like every ledger call, but not through the breaker's door: its answer says
    // nothing about the claims that timed out (a ledger whose claims hang may still answer
    // releases), and must not close a breaker they opened.
    tokio::spawn(async move {
        let after = shared.config.ledger_timeout();
        let mut pause = after;
        loop {
            let call = shared.ledger.release(&key, token);
            let span = tracing::info_span!(
                "idempotency.ledger",
                operation = "release",
                ledger = shared.ledger.name()
            );
            let failed = match tokio::time::timeout(after, call.instrument(span)).await {
                Ok(Ok(())) => {
                    tracing::debug!("gave back a key whose claim timed out");
                    return;
                }
                // Nothing with this token: the claim has not taken effect, or never will.
                Ok(Err(LedgerError::LeaseLost)) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some("the release timed out".to_owned()),
            };
            let next = Instant::now().checked_add(pause);
            let Some(next) = next.filter(|next| *next < lease_ends) else {
                if let Some(error) = failed {
                    tracing::warn!(
                        %error,
                        "giving back a key whose claim timed out failed; it frees itself when the lease expires"
                    );
                }
                return;
            };
            tokio::time::sleep_until(next).await;
            pause = pause.saturating_mul(2);
        }
    });
}

/// The handler's result is not to be kept: roll its transaction back, then release the key.
pub(crate) async fn abandon<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    transaction: Option<Box<dyn TxHandle>>,
) {
    if let Some(transaction) = transaction {
        let after = shared.config.ledger_timeout();
        if tokio::time::timeout(after, transaction.rollback())
            .await
            .is_err()
        {
            // Dropping the connection rolls back all the same.
            tracing::warn!(?after, "rolling back the handler's transaction timed out");
        }
    }
    release(shared, key, token).await;
}
