//! The one door every ledger call goes through: refused at once while the circuit breaker is
//! open (for new work only), bounded by the layer's ledger timeout, timed, and fed back into the
//! breaker.

use std::{future::Future, time::Duration};

use tower_idempotency_core::{Ledger, LedgerError};

use crate::{
    breaker::{Breaker, Permit},
    config::Shared,
    transaction::TxError,
};

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

/// Records a half-open probe that was dropped before its answer (its request was cancelled) as a
/// failure, so the breaker never waits for an answer that will not come.
struct Attempt<'a> {
    breaker: &'a Breaker,
    permit: Permit,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.permit == Permit::Probe {
            self.breaker.record(Permit::Probe, false);
        }
    }
}

impl<L: Ledger> Shared<L> {
    /// Makes one ledger call through the door: see the module docs.
    pub(crate) async fn call<T: Answer>(
        &self,
        operation: &'static str,
        door: Door,
        call: impl Future<Output = T>,
    ) -> T {
        let config = &self.config;
        let permit = match config.breaker.permit() {
            Permit::Refused if door == Door::Gated => return T::refused(),
            Permit::Refused => Permit::Call,
            permit => permit,
        };
        let mut attempt = Attempt {
            breaker: &config.breaker,
            permit,
        };
        let after = config.ledger_timeout();
        let timed = tokio::time::timeout(after, call);
        let result = match config
            .telemetry
            .ledger(self.ledger.name(), operation, timed)
            .await
        {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::warn!(
                    operation,
                    ?after,
                    "the idempotency ledger did not answer in time"
                );
                config.telemetry.ledger_timeout(operation);
                T::timed_out(operation, after)
            }
        };
        attempt.permit = Permit::Call;
        if let Some(state) = config.breaker.record(permit, result.answered()) {
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
        drop(attempt);
        result
    }
}
