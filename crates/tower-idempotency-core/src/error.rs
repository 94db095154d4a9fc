//! The one error type every ledger returns.

/// A boxed error from a ledger backend, kept as the [`source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in a ledger call.
///
/// The layer answers [`LeaseLost`](Self::LeaseLost) by keeping the newer holder's result, and
/// every other variant ([`Timeout`](Self::Timeout) and [`Unavailable`](Self::Unavailable)
/// included) with a 503 (or by passing the request through, when configured to fail
/// open).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The fencing token is no longer current: the lease expired and another request took the key
    /// over (or the record is gone). Nothing was written.
    #[error("the lease on this key is held by another request; nothing was written")]
    LeaseLost,
    /// A stored record could not be decoded. Nothing is replayed from it.
    #[error("a stored idempotency record is corrupt: {reason}")]
    Corrupt {
        /// What was wrong with it.
        reason: String,
    },
    /// The backend failed or could not be reached.
    #[error("the idempotency ledger backend failed")]
    Backend(#[source] BoxError),
    /// The ledger does not offer this operator call (see the default implementations of the
    /// operator calls on [`Ledger`](crate::Ledger)). Nothing was read or written.
    #[error("this idempotency ledger does not support `{operation}`")]
    Unsupported {
        /// The call: `"inspect"`, `"stuck"` or `"evict"`.
        operation: &'static str,
    },
    /// The call did not answer within its deadline (set by the caller, such as the layer's
    /// ledger timeout). Whether it took effect is unknown.
    #[error("the idempotency ledger did not answer {operation} within {after:?}")]
    Timeout {
        /// The call that timed out, such as `"claim"` or `"renew"`.
        operation: &'static str,
        /// The deadline it missed.
        after: std::time::Duration,
    },
    /// The call was not made: the caller's circuit breaker is open after repeated failures.
    #[error("the idempotency ledger is unavailable (circuit breaker open); the call was not made")]
    Unavailable,
}

impl LedgerError {
    /// Wraps a backend's own error.
    pub fn backend(error: impl Into<BoxError>) -> Self {
        Self::Backend(error.into())
    }

    /// A corrupt-record error.
    pub fn corrupt(reason: impl Into<String>) -> Self {
        Self::Corrupt {
            reason: reason.into(),
        }
    }
}
