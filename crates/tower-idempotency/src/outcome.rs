//! What the layer did with a request; put into every covered response's extensions.

use std::fmt;

/// What the layer did with a covered request. Outer layers read it from the response:
///
/// ```
/// # use http::Response;
/// use tower_idempotency::Outcome;
/// # let response = Response::new(());
/// match response.extensions().get::<Outcome>() {
///     Some(Outcome::Replayed) => { /* served from the ledger */ }
///     _ => {}
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran (first request with this key, or a retry after a release or takeover).
    Executed,
    /// The stored response was replayed.
    Replayed,
    /// A duplicate of a request in progress got 409.
    Conflict,
    /// A duplicate of a request in progress got 202 with the operation's `Location`.
    Accepted,
    /// A duplicate waited for the first request and got its replay.
    Waited,
    /// The key was used with a different request: 422.
    Mismatch,
    /// The request was refused before the ledger: bad or missing key, unreadable or oversized
    /// body.
    Rejected,
    /// The ledger failed: 503, or the handler ran unprotected under fail-open.
    LedgerError,
    /// No key and the layer allows that: the handler ran unprotected.
    Bypassed,
    /// The layer's in-flight cap was reached: 503 before the ledger.
    Overloaded,
    /// The layer was draining for shutdown: 503 before the ledger.
    ShuttingDown,
}

impl Outcome {
    /// The value recorded on spans and metrics, such as `"executed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Accepted => "accepted",
            Self::Waited => "waited",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::LedgerError => "ledger_error",
            Self::Bypassed => "bypassed",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
