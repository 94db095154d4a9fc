//! The layer's runtime settings, shared by the layer, its services and the operation router.
//! They are set and validated by [`IdempotencyLayerBuilder`](crate::IdempotencyLayerBuilder).

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, Method, StatusCode, request::Parts};
use tower_idempotency_core::{Fingerprint, ScopeDigest};

use crate::{
    breaker::Breaker,
    builder::{InProgress, LedgerFailure, MissingKey},
    drain::Gate,
    problem::Responder,
    telemetry::Telemetry,
    transaction::TxDriver,
};

/// The ledger and the settings, behind one `Arc` shared by the layer, every service it made and
/// the operation router.
pub(crate) struct Shared<L> {
    pub(crate) ledger: L,
    pub(crate) config: Config,
    /// The in-flight cap and the drain.
    pub(crate) gate: Arc<Gate>,
}

pub(crate) type ScopeFn = Arc<dyn Fn(&Parts) -> Vec<u8> + Send + Sync>;
pub(crate) type FingerprintFn = Arc<dyn Fn(&Parts, &Bytes) -> Fingerprint + Send + Sync>;
pub(crate) type StorePredicate = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// Everything a request needs, shared by the layer, its services and the operation router.
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) missing_key: MissingKey,
    pub(crate) scope: Option<ScopeFn>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) canonical_json: bool,
    pub(crate) fingerprint: Option<FingerprintFn>,
    pub(crate) in_progress: InProgress,
    pub(crate) lease: Duration,
    pub(crate) retention: Duration,
    pub(crate) body_limit: usize,
    pub(crate) store_limit: usize,
    pub(crate) store: Option<StorePredicate>,
    pub(crate) deny_headers: Vec<HeaderName>,
    pub(crate) ledger_failure: LedgerFailure,
    pub(crate) retry_after: Duration,
    pub(crate) operation_path: String,
    pub(crate) responder: Arc<dyn Responder>,
    pub(crate) telemetry: Telemetry,
    pub(crate) transactions: Option<Arc<dyn TxDriver>>,
    /// Set explicitly, or `None` for the default derived from the lease.
    pub(crate) ledger_timeout: Option<Duration>,
    pub(crate) breaker: Breaker,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) max_handler_time: Duration,
}

impl Config {
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    pub(crate) fn scope_of(&self, parts: &Parts) -> Vec<u8> {
        self.scope.as_ref().map(|f| f(parts)).unwrap_or_default()
    }

    /// The digest of `scope`. Without a scope function every request has the empty scope, whose
    /// digest is computed once rather than hashed again per request.
    pub(crate) fn scope_digest(scope: &[u8]) -> ScopeDigest {
        static UNSCOPED: std::sync::OnceLock<ScopeDigest> = std::sync::OnceLock::new();
        if scope.is_empty() {
            *UNSCOPED.get_or_init(|| ScopeDigest::new(b""))
        } else {
            ScopeDigest::new(scope)
        }
    }

    pub(crate) fn should_store(&self, status: StatusCode) -> bool {
        match &self.store {
            Some(predicate) => predicate(status),
            None => is_stored_by_default(status),
        }
    }

    /// The deadline of each ledger call: as set, or a quarter of the lease, at most 5 s.
    pub(crate) fn ledger_timeout(&self) -> Duration {
        self.ledger_timeout
            .unwrap_or_else(|| (self.lease / 4).min(DEFAULT_MAX_LEDGER_TIMEOUT))
    }

    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// The longest default ledger timeout.
pub(crate) const DEFAULT_MAX_LEDGER_TIMEOUT: Duration = Duration::from_secs(5);

/// The default store predicate: 1xx to 4xx, except 408, 409 and 429 (the client may retry those
/// and expect a different answer); 5xx is not stored, so a retry runs the handler again.
pub fn is_stored_by_default(status: StatusCode) -> bool {
    status.as_u16() < 500
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
        )
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("missing_key", &self.missing_key)
            .field("scoped", &self.scope.is_some())
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("canonical_json", &self.canonical_json)
            .field("custom_fingerprint", &self.fingerprint.is_some())
            .field("in_progress", &self.in_progress)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .field("body_limit", &self.body_limit)
            .field("store_limit", &self.store_limit)
            .field("custom_store_predicate", &self.store.is_some())
            .field("deny_headers", &self.deny_headers)
            .field("ledger_failure", &self.ledger_failure)
            .field("retry_after", &self.retry_after)
            .field("operation_path", &self.operation_path)
            .field("transactions", &self.transactions.is_some())
            .field("ledger_timeout", &self.ledger_timeout())
            .field("circuit_breaker", &self.breaker.settings())
            .field("max_in_flight", &self.max_in_flight)
            .field("max_handler_time", &self.max_handler_time)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_by_default() {
        for stored in [200, 201, 204, 302, 400, 404, 422] {
            assert!(
                is_stored_by_default(StatusCode::from_u16(stored).unwrap()),
                "{stored}"
            );
        }
        for released in [408, 409, 429, 500, 502, 503] {
            assert!(
                !is_stored_by_default(StatusCode::from_u16(released).unwrap()),
                "{released}"
            );
        }
    }
}
