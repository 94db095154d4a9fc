//! The handler's operation: its identity, and stable keys for its downstream calls.

use std::fmt;

#[cfg(feature = "axum")]
use axum::{
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::Extensions;
#[cfg(feature = "axum")]
use http::request::Parts;
use sha2::{Digest, Sha256};
use tower_idempotency_core::{LedgerKey, OperationId};

#[cfg(feature = "axum")]
use crate::problem::{ProblemJson, Rejection, RejectionKind, render};

/// The operation a covered request runs as: put into the request's extensions by the layer
/// before the handler runs, and extracted by the handler (it is an axum extractor).
///
/// [`derive`](Self::derive) gives a key for a downstream call, such as the card processor's own
/// `Idempotency-Key`:
///
/// - the same on every run of this request: a retry after a 5xx released the key, a retry that
///   took over a lapsed lease, a retry on another instance sharing the ledger;
/// - different across scopes and keys, and across labels;
/// - never the raw client key: it is `hex(SHA-256("tower-idempotency/downstream\0" ||
///   ledger key || label))`, and the ledger key is itself a SHA-256 digest of (scope, key).
///
/// It is derived from the ledger key, not from the [`operation_id`](Self::operation_id): the
/// operation id is fresh at every claim that finds no record, so it changes after a release.
///
/// ```
/// use axum::{Router, http::StatusCode, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryLedger, Operation};
///
/// async fn create_payment(operation: Operation) -> StatusCode {
///     let charge_key = operation.derive("charge"); // 64 hex digits, stable across retries
///     tracing::info!(operation = %operation.operation_id(), "charging");
///     // processor.post("/charges").header("Idempotency-Key", charge_key)...
///     # let _ = charge_key;
///     StatusCode::CREATED
/// }
///
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(IdempotencyLayer::new(MemoryLedger::new()));
/// ```
///
/// A request the layer did not claim (a method it does not cover, a missing key under
/// [`MissingKey::Allow`](crate::MissingKey::Allow), a ledger failure under
/// [`LedgerFailure::FailOpen`](crate::LedgerFailure::FailOpen)) has no operation: extracting
/// `Operation` answers 500 ([`MissingOperation`]); extract `Option<Operation>` to handle it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    key: LedgerKey,
    operation_id: OperationId,
}

impl Operation {
    /// The operation of the claim `operation_id` on `key`. The layer builds it; this is public
    /// for tests of handlers that run without the layer.
    pub fn new(key: LedgerKey, operation_id: OperationId) -> Self {
        Self { key, operation_id }
    }

    /// A key for the downstream call named `label` (such as `"charge"`): 64 lower-case hex
    /// digits, the same on every run of this request, different for another scope, key or
    /// label, and never the client's raw key.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyKey, Operation, core::LedgerKey};
    ///
    /// let key = LedgerKey::new(b"tenant-a", &IdempotencyKey::parse(b"order-42").unwrap());
    /// let first = Operation::new(key, uuid::Uuid::new_v4());
    /// let rerun = Operation::new(key, uuid::Uuid::new_v4()); // a new claim after a release
    /// assert_eq!(first.derive("charge"), rerun.derive("charge"));
    /// assert_ne!(first.derive("charge"), first.derive("refund"));
    /// assert_eq!(first.derive("charge").len(), 64);
    /// ```
    pub fn derive(&self, label: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/downstream\0");
        h.update(self.key.as_bytes());
        h.update(label.as_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        hex
    }

    /// The id of this claim, as in the `operation_id` span attribute and the operation
    /// resource: for logs. It is kept by a takeover, but a retry after a release gets a new
    /// one, so do not derive keys from it.
    pub fn operation_id(&self) -> OperationId {
        self.operation_id
    }

    /// The ledger key (a digest of scope and key, never the raw key); it displays as the `key`
    /// span attribute.
    pub fn ledger_key(&self) -> LedgerKey {
        self.key
    }

    pub(crate) fn expose(self, extensions: &mut Extensions) {
        extensions.insert(self);
    }
}

impl fmt::Debug for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operation")
            .field("key", &self.key)
            .field("operation_id", &self.operation_id)
            .finish()
    }
}

/// Why a handler could not get its [`Operation`]: the route is not behind the idempotency layer,
/// or the layer did not claim this request. Always a server misconfiguration, answered 500.
#[derive(Debug, Clone, Copy)]
pub struct MissingOperation;

#[cfg(feature = "axum")]
impl IntoResponse for MissingOperation {
    fn into_response(self) -> Response {
        let rejection = Rejection::new(
            RejectionKind::HandlerFailed,
            "this handler needs the idempotency layer's operation, which this request does not \
             have (the route is not behind the layer, or the layer did not claim the request)",
        );
        render(&ProblemJson, &rejection)
            .map(axum::body::Body::from)
            .into_response()
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> FromRequestParts<S> for Operation {
    type Rejection = MissingOperation;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Operation>()
            .copied()
            .ok_or(MissingOperation)
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> OptionalFromRequestParts<S> for Operation {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Operation>().copied())
    }
}
