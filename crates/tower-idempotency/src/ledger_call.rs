//! The one door every ledger call goes through: refused at once while the circuit breaker is
//! open (for new work only), bounded by the layer's ledger timeout, timed, and fed back into the
//! breaker.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use pin_project_lite::pin_project;
use tokio::{task::Unconstrained, time::Sleep};
use tower_idempotency_core::{Ledger, LedgerError};
use tracing::{Instrument, instrument::Instrumented};

use crate::{breaker::Permit, config::Shared, transaction::TxError};

/// Whether the breaker may refuse a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Door {
    /// New work (a claim, a transaction's `begin`, an operation lookup): refused while the
    /// breaker is open, so a failing ledger gets no new load and callers get 503 at once.
    Gated,
    /// Work already under way (renew, complete, commit, release): always tried, since the
    /// handler has run or is running, and refusing would only lose its record. Still bounded,
    /// and its answer still feeds the breaker.
    Always,
}

/// What a ledger call's result says about the ledger's health, and how to say "timed out" or
/// "refused" in its type.
pub(crate) trait Answer {
    /// The ledger answered (even with `LeaseLost` or a corrupt record): it is alive.
    fn answered(&self) -> bool;
    fn timed_out(operation: &'static str, after: Duration) -> Self;
    fn refused() -> Self;
}

fn answered(error: &LedgerError) -> bool {
    matches!(error, LedgerError::LeaseLost | LedgerError::Corrupt { .. })
}

impl<T> Answer for Result<T, LedgerError> {
    fn answered(&self) -> bool {
        self.as_ref().err().is_none_or(answered)
    }
    fn timed_out(operation: &'static str, after: Duration) -> Self {
        Err(LedgerError::Timeout { operation, after })
    }
    fn refused() -> Self {
        Err(LedgerError::Unavailable)
    }
}

impl Answer for Result<(), TxError> {
    fn answered(&self) -> bool {
        match self {
            Err(TxError::Ledger(error)) => answered(error),
            _ => true,
        }
    }
    fn timed_out(operation: &'static str, after: Duration) -> Self {
        Err(TxError::Ledger(LedgerError::Timeout { operation, after }))
    }
    fn refused() -> Self {
        Err(TxError::Ledger(LedgerError::Unavailable))
    }
}

pin_project! {
    /// One ledger call through the door. A hand-written future rather than an `async` block,
    /// which would hold the wrapped call twice (as a capture, then as the awaited value): the
    /// claim's state is part of every request's future (see `handle` in service.rs, and
    /// docs/benchmarks.md).
    ///
    /// Its timer is armed when the call first answers `Pending`, for the ledger timeout from
    /// then: a call that answers at its first poll (a [`CachedLedger`] hit, a `MemoryLedger`)
    /// never creates one. A tokio timer costs a clock read and a clone of the runtime's handle,
    /// shared between its worker threads: about 0.6 % of a cached replay's server CPU in a
    /// profile (docs/benchmarks.md, "Issue 18, sixth pass").
    ///
    /// [`CachedLedger`]: tower_idempotency_core::CachedLedger
    pub(crate) struct LedgerCall<'a, L, F> {
        shared: &'a Shared<L>,
        operation: &'static str,
        permit: Permit,
        started: Option<Instant>,
        // `None`: refused by the breaker.
        #[pin]
        inner: Option<Instrumented<F>>,
        // Polled without tokio's cooperative budget, as `tokio::time::Timeout` does when the
        // call has used it up: a call that always exhausts it must still time out. Boxed: only a
        // call that waits (a round trip) allocates it, and a request's state stays small.
        timer: Option<Pin<Box<Unconstrained<Sleep>>>>,
    }

    impl<L, F> PinnedDrop for LedgerCall<'_, L, F> {
        fn drop(this: Pin<&mut Self>) {
            // A half-open probe dropped before its answer (its request was cancelled) counts
            // as failed, so the breaker never waits for an answer that will not come.
            let this = this.project();
            if *this.permit == Permit::Probe {
                this.shared.config.breaker.record(Permit::Probe, false);
            }
        }
    }
}

impl<L: Ledger, F: Future<Output = T>, T: Answer> Future for LedgerCall<'_, L, F> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(T::refused());
        };
        let started = *this.started.get_or_insert_with(Instant::now);
        let (shared, operation) = (*this.shared, *this.operation);
        let config = &shared.config;
        let result = match inner.poll(cx) {
            Poll::Ready(output) => output,
            Poll::Pending => {
                let timer = this.timer.get_or_insert_with(|| {
                    let timer = tokio::time::sleep(config.ledger_timeout());
                    Box::pin(tokio::task::unconstrained(timer))
                });
                std::task::ready!(timer.as_mut().poll(cx));
                let after = config.ledger_timeout();
                tracing::warn!(
                    operation,
                    ?after,
                    "the idempotency ledger did not answer in time"
                );
                config.telemetry.ledger_timeout(operation);
                T::timed_out(operation, after)
            }
        };
        config
            .telemetry
            .ledger_latency(shared.ledger.name(), operation, started.elapsed());
        let permit = std::mem::replace(this.permit, Permit::Call);
        shared.breaker_answered(permit, result.answered());
        Poll::Ready(result)
    }
}

impl<L: Ledger> Shared<L> {
    /// Makes one ledger call through the door: see the module docs.
    pub(crate) fn call<F: Future>(
        &self,
        operation: &'static str,
        door: Door,
        call: F,
    ) -> LedgerCall<'_, L, F> {
        let config = &self.config;
        config.telemetry.breaker_started(self.ledger.name());
        let permit = match config.breaker.permit() {
            Permit::Refused if door == Door::Gated => Permit::Refused,
            Permit::Refused => Permit::Call,
            permit => permit,
        };
        let inner = (permit != Permit::Refused).then(|| {
            let span =
                tracing::info_span!("idempotency.ledger", operation, ledger = self.ledger.name());
            call.instrument(span)
        });
        LedgerCall {
            shared: self,
            operation,
            permit,
            started: None,
            inner,
            timer: None,
        }
    }

    fn breaker_answered(&self, permit: Permit, answered: bool) {
        let config = &self.config;
        let Some(state) = config.breaker.record(permit, answered) else {
            return;
        };
        let settings = config.breaker.settings().unwrap_or_default();
        match state {
            crate::breaker::BreakerState::Open => tracing::error!(
                failures = settings.failures,
                open_for = ?settings.open_for,
                "the idempotency ledger keeps failing; circuit breaker open: covered requests get 503 without a ledger call"
            ),
            _ => tracing::info!(state = state.as_str(), "idempotency ledger circuit breaker"),
        }
        config.telemetry.breaker_state(self.ledger.name(), state);
    }
}
