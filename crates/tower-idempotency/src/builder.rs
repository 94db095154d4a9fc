//! The public builder: every setting and its default. The one place they are validated is
//! [`validate`].

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, Method, StatusCode, request::Parts};
use tower_idempotency_core::{Fingerprint, TransactionalLedger};

use crate::{
    breaker::{Breaker, CircuitBreaker},
    config::Config,
    layer::IdempotencyLayer,
    problem::{ProblemJson, Responder},
    telemetry::Telemetry,
    transaction::Driver,
};

mod validate;

pub use validate::ConfigError;

/// What a duplicate gets while the first request with its key is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InProgress {
    /// 409 Conflict with `Retry-After` (the default).
    #[default]
    Conflict,
    /// 202 Accepted with `Location` of the operation-status resource (see
    /// [`IdempotencyLayer::operation_router`], feature `axum`) and `Retry-After`.
    Accepted,
    /// Hold the duplicate until the first request finishes, then replay its response; after
    /// `timeout`, answer as [`Conflict`](Self::Conflict) does. Works across processes that share
    /// a ledger.
    Wait {
        /// How long a duplicate may wait.
        timeout: Duration,
    },
}

/// What a covered request without an idempotency key gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// 400 problem+json (the default).
    #[default]
    Reject,
    /// The request runs unprotected, as if the layer were not there.
    Allow,
}

/// What a request gets when the ledger cannot be reached or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LedgerFailure {
    /// 503 with `Retry-After`; the handler does not run (the default: a payment is never made
    /// without a record of it).
    #[default]
    FailClosed,
    /// The request runs unprotected and the failure is logged. Choose this only where a rare
    /// duplicate costs less than an outage.
    FailOpen,
}

/// Builds an [`IdempotencyLayer`]; every setting has a documented default, and
/// [`build`](Self::build) checks them all at once.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, InProgress, MemoryLedger};
///
/// let layer = IdempotencyLayer::builder(MemoryLedger::new())
///     .with_scope(|parts| {
///         parts.headers.get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default()
///     })
///     .with_json_canonicalization(true)
///     .with_in_progress(InProgress::Wait { timeout: Duration::from_secs(5) })
///     .build()
///     .expect("valid settings");
/// # let _ = layer;
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct IdempotencyLayerBuilder<L> {
    ledger: L,
    config: Config,
    /// `unscoped()` was called: one scope for every caller is a choice, not an oversight.
    unscoped: bool,
}

impl<L> fmt::Debug for IdempotencyLayerBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<L> IdempotencyLayerBuilder<L> {
    pub(crate) fn new(ledger: L) -> Self {
        Self {
            ledger,
            config: Config {
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
                missing_key: MissingKey::Reject,
                scope: None,
                fingerprint_headers: vec![http::header::CONTENT_TYPE],
                canonical_json: false,
                fingerprint: None,
                in_progress: InProgress::Conflict,
                lease: Duration::from_secs(30),
                retention: Duration::from_secs(24 * 60 * 60),
                body_limit: 1 << 20,
                store_limit: 1 << 20,
                store: None,
                deny_headers: Vec::new(),
                ledger_failure: LedgerFailure::FailClosed,
                retry_after: Duration::from_secs(1),
                operation_path: "/operations".to_owned(),
                responder: Arc::new(ProblemJson),
                telemetry: Telemetry::global(),
                transactions: None,
                ledger_timeout: None,
                breaker: Breaker::new(Some(CircuitBreaker::default())),
                max_in_flight: None,
                max_handler_time: Duration::from_secs(10 * 60),
            },
            unscoped: false,
        }
    }

    /// The header that carries the key. Default: `Idempotency-Key`.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The methods the layer covers; every other request passes through untouched.
    /// Default: `POST` and `PATCH`.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// What a covered request without a key gets. Default: [`MissingKey::Reject`] (400).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_missing_key(mut self, policy: MissingKey) -> Self {
        self.config.missing_key = policy;
        self
    }

    /// The caller's scope (an API key, a tenant id, an authenticated subject), from the request
    /// parts. Keys are only compared within a scope, and an operation is visible only to its own
    /// scope. Default: one empty scope for everyone, which lets two callers that send the same
    /// key and body get each other's stored response; the layer warns (`tracing::warn!`) when
    /// it is built that way, unless [`unscoped`](Self::unscoped) says it is meant.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_scope<F, S>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> S + Send + Sync + 'static,
        S: Into<Vec<u8>>,
    {
        self.config.scope = Some(Arc::new(move |parts| scope(parts).into()));
        self
    }

    /// One scope for every caller, on purpose: a single-tenant service, or one whose keys are
    /// unique across callers (such as UUIDs it issues itself). The same as the default, without
    /// its warning; a later [`with_scope`](Self::with_scope) still takes effect.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn unscoped(mut self) -> Self {
        self.unscoped = true;
        self
    }

    /// The request headers whose values enter the fingerprint, in this order.
    /// Default: `Content-Type`.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Fingerprint JSON bodies in canonical form, so that reordered members and whitespace count
    /// as the same request (numbers are compared as written). Default: off (bytes as sent).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_json_canonicalization(mut self, on: bool) -> Self {
        self.config.canonical_json = on;
        self
    }

    /// Replaces the default fingerprint (method, path, query, fingerprint headers, body) with
    /// your own, for example a hash of the payload fields that matter.
    /// Default: [`Fingerprint::of_request`].
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_fingerprint<F>(mut self, fingerprint: F) -> Self
    where
        F: Fn(&Parts, &Bytes) -> Fingerprint + Send + Sync + 'static,
    {
        self.config.fingerprint = Some(Arc::new(fingerprint));
        self
    }

    /// What a duplicate of a request still in progress gets. Default: [`InProgress::Conflict`].
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_in_progress(mut self, policy: InProgress) -> Self {
        self.config.in_progress = policy;
        self
    }

    /// How long a claim holds its key without renewal; the layer renews it every third of this
    /// while the handler runs, so only a crashed holder loses it. Default: 30 s.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// How long a completed response is replayed (and an abandoned claim kept).
    /// Default: 24 h.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// The largest request body accepted, in bytes; checked on `Content-Length` before reading,
    /// then while reading. Larger bodies get 413. Default: 1 MiB.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The largest response body stored for replay, in bytes. A larger body still reaches the
    /// first caller in full; the key completes with status and headers only, and its replays say
    /// so in `Idempotent-Replay-Body: omitted`. Default: 1 MiB.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_store_limit(mut self, bytes: usize) -> Self {
        self.config.store_limit = bytes;
        self
    }

    /// Which responses are stored and replayed; any other releases the key so that a retry runs
    /// the handler again. Default: [`is_stored_by_default`](crate::is_stored_by_default) (1xx to
    /// 4xx except 408, 409, 429).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_store_predicate<F>(mut self, store: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.config.store = Some(Arc::new(store));
        self
    }

    /// Response headers never stored or replayed, beyond the ones always left out (hop-by-hop
    /// headers, `Date`, `Set-Cookie`, `Content-Length`). Default: none.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_replay_deny_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.deny_headers = names.into_iter().collect();
        self
    }

    /// What happens when the ledger fails. Default: [`LedgerFailure::FailClosed`] (503).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_ledger_failure(mut self, policy: LedgerFailure) -> Self {
        self.config.ledger_failure = policy;
        self
    }

    /// The `Retry-After` sent with 409, 202 and 503, rounded up to whole seconds.
    /// Default: 1 s.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.config.retry_after = after;
        self
    }

    /// Where the operation-status router answers, and so what `Location` points to under
    /// [`InProgress::Accepted`]: `{path}/{operation_id}`. Default: `/operations`.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_operation_path(mut self, path: impl Into<String>) -> Self {
        self.config.operation_path = path.into();
        self
    }

    /// How rejections (400, 409, 413, 422, 503, ...) and the 202 are rendered.
    /// Default: [`ProblemJson`] (RFC 9457 `application/problem+json`).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_responder(mut self, responder: impl Responder) -> Self {
        self.config.responder = Arc::new(responder);
        self
    }

    /// The OpenTelemetry meter the layer records its metrics with.
    /// Default: `opentelemetry::global::meter("tower-idempotency")`, looked up at the first request.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    #[cfg(feature = "opentelemetry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    pub fn with_meter(mut self, meter: opentelemetry::metrics::Meter) -> Self {
        self.config.telemetry = Telemetry::with_meter(meter);
        self
    }

    /// The deadline of every ledger call (claim, renew, complete, release, begin, commit,
    /// lookup). A claim past it is a ledger failure (503, or fail open); a renewal past it is
    /// retried at once; a completion past it is retried while the lease lasts. At most a third of
    /// the lease, so that a renewal can time out and be retried inside one lease.
    /// Default: a quarter of the lease, at most 5 s (5 s for the default 30 s lease).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_ledger_timeout(mut self, timeout: Duration) -> Self {
        self.config.ledger_timeout = Some(timeout);
        self
    }

    /// The circuit breaker around the ledger: after `failures` consecutive failed or timed-out
    /// ledger calls, new covered requests get 503 at once without a ledger call for `open_for`;
    /// then one request probes the ledger, and its answer closes the breaker or opens it again.
    /// Renewals, completions and releases of requests already running are never refused.
    /// Default: on, 5 failures, open for 5 s ([`CircuitBreaker::default`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{CircuitBreaker, IdempotencyLayer, MemoryLedger};
    ///
    /// let layer = IdempotencyLayer::builder(MemoryLedger::new())
    ///     .with_circuit_breaker(CircuitBreaker { failures: 3, open_for: Duration::from_secs(2) })
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.config.breaker = Breaker::new(Some(breaker));
        self
    }

    /// No circuit breaker: every covered request tries the ledger (each call still bounded by
    /// the ledger timeout).
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn without_circuit_breaker(mut self) -> Self {
        self.config.breaker = Breaker::new(None);
        self
    }

    /// The most covered requests this layer holds at once, detached handlers included; beyond
    /// it, 503 with `Retry-After` (problem type `overloaded`) without a ledger call. Requests of
    /// uncovered methods are not counted. Default: no cap.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_max_in_flight(mut self, requests: usize) -> Self {
        self.config.max_in_flight = Some(requests);
        self
    }

    /// How long a handler's lease is renewed: past this, renewals stop (logged at error, metric
    /// `idempotency.lease.ceiling`), so a hung handler frees its key when its lease runs out and
    /// a retry can take it over. Default: 10 minutes.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_max_handler_time(mut self, max: Duration) -> Self {
        self.config.max_handler_time = max;
        self
    }

    pub(crate) fn into_layer(self) -> IdempotencyLayer<L> {
        if self.config.scope.is_none() && !self.unscoped {
            // hono-idempotency warns the same way; the IETF draft recommends keys composed with
            // the caller's identity.
            tracing::warn!(
                "idempotency layer built without a scope: callers that send the same key and \
                 body get each other's stored response. Set `with_scope` (an API key, a tenant, \
                 a subject), or `unscoped()` if one scope for everyone is meant"
            );
        }
        IdempotencyLayer::from_parts(self.ledger, self.config)
    }

    /// Exactly-once mode: after a claim, open a transaction in the ledger's database and hand it
    /// to the handler as [`LedgerTx`](crate::LedgerTx) (feature `axum`); the stored response is
    /// written in the same transaction, fenced by the claim's token, and committed with the
    /// handler's writes. If the lease was taken over meanwhile, everything rolls back and the
    /// caller gets 409 (its retry replays the new holder's result); a response that is not
    /// stored (5xx), a panic or a failed commit rolls back and releases the key. Default: off.
    ///
    /// Costs one pooled connection per request in flight for the handler's duration. Side
    /// effects outside the database (an email, a card network call) are not covered: record
    /// them in an outbox table in the same transaction and send them from there.
    #[must_use = "this returns the changed builder; it does not change it in place"]
    pub fn with_transactions(mut self) -> Self
    where
        L: TransactionalLedger,
    {
        self.config.transactions = Some(Arc::new(Driver {
            ledger: self.ledger.clone(),
        }));
        self
    }

    /// Checks every setting and builds the layer.
    pub fn build(self) -> Result<IdempotencyLayer<L>, ConfigError> {
        validate::check(&self.config)?;
        Ok(self.into_layer())
    }
}
