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
    /// A layer over `ledger` with every default (see [`IdempotencyLayerBuilder`]), including
    /// one scope for every caller: fine for a single-tenant service, and it warns once built.
    /// A multi-tenant service sets [`with_scope`](IdempotencyLayerBuilder::with_scope).
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

/// How many stuck claims the purge task counts at most.
const STUCK_COUNT_LIMIT: usize = 10_000;

impl<L: tower_idempotency_core::Ledger> IdempotencyLayer<L> {
    /// Purges expired records every `every`, `batch` at a time, until the returned future is
    /// dropped, as [`purge_periodically`](tower_idempotency_core::purge_periodically) does, and
    /// counts them in the layer's `idempotency.purged` metric (feature `opentelemetry`). Each
    /// tick it also counts the claims whose lease lapsed with nobody taking them over (up to
    /// 10,000; [`Ledger::stuck`](tower_idempotency_core::Ledger::stuck)) into the
    /// `idempotency.stuck` gauge, for an alert on stuck 409s; a ledger without `stuck` records
    /// nothing. Spawn it once per ledger; the first purge runs at once. Each call is bounded by
    /// the layer's ledger timeout (purge: ten times it, as it runs batch after batch); a failed
    /// or timed-out one is logged and tried again at the next tick.
    ///
    /// ```
    /// # async fn run() {
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryLedger};
    ///
    /// let layer = IdempotencyLayer::new(MemoryLedger::new());
    /// tokio::spawn(layer.purge_task(Duration::from_secs(60), 1_000));
    /// # }
    /// ```
    pub fn purge_task(
        &self,
        every: std::time::Duration,
        batch: usize,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ledger = &shared.ledger;
                let bound = shared.config.ledger_timeout();
                let purged = tokio::time::timeout(bound * 10, ledger.purge_expired(batch)).await;
                let purged = purged.unwrap_or(Err(tower_idempotency_core::LedgerError::Timeout {
                    operation: "purge",
                    after: bound * 10,
                }));
                match purged {
                    Ok(0) => {}
                    Ok(purged) => {
                        shared.config.telemetry.purged(ledger.name(), purged);
                        tracing::debug!(
                            ledger = ledger.name(),
                            purged,
                            "purged expired idempotency records"
                        );
                    }
                    Err(error) => tracing::warn!(
                        ledger = ledger.name(),
                        %error,
                        "purging expired idempotency records failed"
                    ),
                }
                let stuck = ledger.stuck(std::time::Duration::ZERO, STUCK_COUNT_LIMIT);
                match tokio::time::timeout(bound, stuck).await {
                    Ok(Ok(stuck)) => shared
                        .config
                        .telemetry
                        .stuck(ledger.name(), stuck.len() as u64),
                    Ok(Err(tower_idempotency_core::LedgerError::Unsupported { .. })) => {}
                    Ok(Err(error)) => tracing::warn!(
                        ledger = ledger.name(),
                        %error,
                        "counting stuck idempotency claims failed"
                    ),
                    Err(_) => tracing::warn!(
                        ledger = ledger.name(),
                        "counting stuck idempotency claims timed out"
                    ),
                }
            }
        }
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
