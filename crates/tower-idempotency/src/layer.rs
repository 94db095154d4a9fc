//! The layer: shared settings and ledger, applied to an inner service.

use std::{fmt, sync::Arc};

use tower_layer::Layer;

use crate::{
    builder::IdempotencyLayerBuilder,
    config::{Config, Shared},
    drain::{DrainHandle, Gate},
    service::Idempotency,
};

/// Makes the services it wraps replay-safe: see the [crate docs](crate).
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryLedger};
///
/// async fn create() -> &'static str { "created" }
///
/// let app: Router = Router::new()
///     .route("/payments", post(create))
///     .layer(IdempotencyLayer::new(MemoryLedger::new()));
/// ```
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer<L> {
    pub(crate) shared: Arc<Shared<L>>,
}

impl<L> IdempotencyLayer<L> {
    /// A layer over `ledger` with every default (see [`IdempotencyLayerBuilder`]).
    pub fn new(ledger: L) -> Self {
        // The defaults are valid (tests/builder.rs checks it), so they skip `build`.
        IdempotencyLayerBuilder::new(ledger).into_layer()
    }

    /// A builder, to change the defaults.
    pub fn builder(ledger: L) -> IdempotencyLayerBuilder<L> {
        IdempotencyLayerBuilder::new(ledger)
    }

    pub(crate) fn from_parts(ledger: L, config: Config) -> Self {
        let gate = Gate::new(config.max_in_flight);
        Self {
            shared: Arc::new(Shared {
                ledger,
                config,
                gate,
            }),
        }
    }

    /// A handle to drain this layer on shutdown: refuse new covered requests, then wait for the
    /// ones in flight (detached handlers included). Shared by every clone of the layer and every
    /// service it made. See [`DrainHandle::drain`].
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle(self.shared.gate.clone())
    }

    /// The ledger the layer records into.
    pub fn ledger(&self) -> &L {
        &self.shared.ledger
    }
}

impl<L> Clone for IdempotencyLayer<L> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<L> fmt::Debug for IdempotencyLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, L> Layer<S> for IdempotencyLayer<L> {
    type Service = Idempotency<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.shared.clone())
    }
}
