//! Spans and OpenTelemetry metrics.
//!
//! Spans (with `tracing`; export them to OpenTelemetry with `tracing-opentelemetry`):
//! - `idempotency`, one per covered request: `outcome`, `key` (the first 16 hex digits of the
//!   ledger key digest, never the raw key), `operation_id`, `ledger`, `lease_ms`, `takeover`.
//! - `idempotency.ledger`, one per ledger call, a child of the request span: `operation`
//!   (`claim`, `complete`, `release`, `renew`, `wait`, `lookup`) and `ledger`.
//!
//! Metrics (OpenTelemetry, with the `opentelemetry` feature; no key or digest is ever a label):
//! - `idempotency.outcomes` (counter), by `outcome`.
//! - `idempotency.ledger.duration` (histogram, seconds), by `operation` and `ledger`.
//! - `idempotency.lease.takeovers` (counter): claims that took over an expired lease.
//! - `idempotency.stored.bytes` (histogram, bytes): the size of each stored response.
//! - `idempotency.in_flight` (up-down counter): claims this instance holds, from a won claim
//!   until its result is recorded or released (handlers finishing after a disconnect included).
//! - `idempotency.wait.duration` (histogram, seconds): how long a duplicate under the `Wait`
//!   policy was held, by `outcome` (`waited`, `conflict` at the timeout, `executed` when the
//!   first request released the key and the duplicate ran the handler).
//! - `idempotency.purged` (counter): expired records deleted by
//!   [`IdempotencyLayer::purge_task`](crate::IdempotencyLayer::purge_task), by `ledger`.
//! - `idempotency.ledger.timeouts` (counter), by `operation`: ledger calls that missed the
//!   ledger timeout.
//! - `idempotency.lease.lost` (counter), by `cause`: handlers that lost their lease while
//!   running, `taken_over` (a renewal was refused: another request holds the key) or `expired`
//!   (no renewal got through before the lease ran out).
//! - `idempotency.lease.ceiling` (counter): handlers still running at the maximum handler time,
//!   whose renewals stopped.
//! - `idempotency.breaker.state` (gauge): the ledger circuit breaker, 0 closed, 1 open,
//!   2 half-open (one probe in flight), by `ledger`: 0 at the layer's first ledger call, then
//!   at each change.

use std::future::Future;
#[cfg(feature = "opentelemetry")]
use std::{sync::OnceLock, time::Instant};

#[cfg(feature = "opentelemetry")]
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram, Meter},
};
use tracing::Instrument;

use crate::{Outcome, breaker::BreakerState};

/// The layer's spans, and with the `opentelemetry` feature its metrics.
pub(crate) struct Telemetry {
    #[cfg(feature = "opentelemetry")]
    meter: Option<Meter>,
    #[cfg(feature = "opentelemetry")]
    metrics: OnceLock<Metrics>,
    #[cfg(feature = "opentelemetry")]
    on_call: OnceLock<OnCallMetrics>,
    /// Whether the breaker's gauge has its first reading (closed, under the ledger's label).
    #[cfg(feature = "opentelemetry")]
    breaker_started: OnceLock<()>,
}

/// The on-call metrics (issue 16), apart from the others.
#[cfg(feature = "opentelemetry")]
struct OnCallMetrics {
    in_flight: opentelemetry::metrics::UpDownCounter<i64>,
    wait_duration: Histogram<f64>,
    purged: Counter<u64>,
    stuck: opentelemetry::metrics::Gauge<u64>,
}

/// One claim held by this instance, counted in `idempotency.in_flight` until dropped (the
/// request's future is dropped when its result is recorded, or its task ends).
pub(crate) struct InFlight {
    #[cfg(feature = "opentelemetry")]
    counter: opentelemetry::metrics::UpDownCounter<i64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        #[cfg(feature = "opentelemetry")]
        self.counter.add(-1, &[]);
    }
}

#[cfg(feature = "opentelemetry")]
struct Metrics {
    outcomes: Counter<u64>,
    ledger_duration: Histogram<f64>,
    takeovers: Counter<u64>,
    stored_bytes: Histogram<u64>,
    ledger_timeouts: Counter<u64>,
    lease_lost: Counter<u64>,
    lease_ceiling: Counter<u64>,
    breaker_state: Gauge<u64>,
}

impl Telemetry {
    /// Metrics through the global meter provider, looked up at the first request so that an app
    /// may install its provider after building the layer.
    pub(crate) fn global() -> Self {
        Self {
            #[cfg(feature = "opentelemetry")]
            meter: None,
            #[cfg(feature = "opentelemetry")]
            metrics: OnceLock::new(),
            #[cfg(feature = "opentelemetry")]
            on_call: OnceLock::new(),
            #[cfg(feature = "opentelemetry")]
            breaker_started: OnceLock::new(),
        }
    }

    #[cfg(feature = "opentelemetry")]
    pub(crate) fn with_meter(meter: Meter) -> Self {
        Self {
            meter: Some(meter),
            metrics: OnceLock::new(),
            on_call: OnceLock::new(),
            breaker_started: OnceLock::new(),
        }
    }

    #[cfg(feature = "opentelemetry")]
    fn metrics(&self) -> &Metrics {
        self.metrics.get_or_init(|| {
            let meter = self
                .meter
                .clone()
                .unwrap_or_else(|| opentelemetry::global::meter("tower-idempotency"));
            Metrics {
                outcomes: meter
                    .u64_counter("idempotency.outcomes")
                    .with_description("Covered requests, by what the idempotency layer did")
                    .build(),
                ledger_duration: meter
                    .f64_histogram("idempotency.ledger.duration")
                    .with_unit("s")
                    .with_description("Ledger call latency, by operation")
                    .build(),
                takeovers: meter
                    .u64_counter("idempotency.lease.takeovers")
                    .with_description("Claims that took over an expired lease")
                    .build(),
                stored_bytes: meter
                    .u64_histogram("idempotency.stored.bytes")
                    .with_unit("By")
                    .with_description("Size of each stored response")
                    .build(),
                ledger_timeouts: meter
                    .u64_counter("idempotency.ledger.timeouts")
                    .with_description("Ledger calls that missed the ledger timeout, by operation")
                    .build(),
                lease_lost: meter
                    .u64_counter("idempotency.lease.lost")
                    .with_description("Running handlers that lost their lease, by cause")
                    .build(),
                lease_ceiling: meter
                    .u64_counter("idempotency.lease.ceiling")
                    .with_description(
                        "Handlers still running at the maximum handler time; renewals stopped",
                    )
                    .build(),
                breaker_state: meter
                    .u64_gauge("idempotency.breaker.state")
                    .with_description("Ledger circuit breaker: 0 closed, 1 open, 2 half-open")
                    .build(),
            }
        })
    }

    #[cfg(feature = "opentelemetry")]
    fn on_call(&self) -> &OnCallMetrics {
        self.on_call.get_or_init(|| {
            let meter = self
                .meter
                .clone()
                .unwrap_or_else(|| opentelemetry::global::meter("tower-idempotency"));
            OnCallMetrics {
                in_flight: meter
                    .i64_up_down_counter("idempotency.in_flight")
                    .with_description("Claims this instance holds: handlers running under a lease")
                    .build(),
                wait_duration: meter
                    .f64_histogram("idempotency.wait.duration")
                    .with_unit("s")
                    .with_description("How long duplicates under the Wait policy were held")
                    .build(),
                purged: meter
                    .u64_counter("idempotency.purged")
                    .with_description("Expired records deleted by the purge task")
                    .build(),
                stuck: meter
                    .u64_gauge("idempotency.stuck")
                    .with_description(
                        "Claims whose lease lapsed with nobody taking them over, as the purge task last counted",
                    )
                    .build(),
            }
        })
    }

    /// Counts a won claim in `idempotency.in_flight` until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        #[cfg(feature = "opentelemetry")]
        {
            let counter = self.on_call().in_flight.clone();
            counter.add(1, &[]);
            InFlight { counter }
        }
        #[cfg(not(feature = "opentelemetry"))]
        InFlight {}
    }

    /// A `Wait` duplicate was held for `waited`, and ended as `outcome`.
    pub(crate) fn waited(&self, waited: std::time::Duration, outcome: Outcome) {
        #[cfg(feature = "opentelemetry")]
        self.on_call().wait_duration.record(
            waited.as_secs_f64(),
            &[KeyValue::new("outcome", outcome.as_str())],
        );
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (waited, outcome);
    }

    /// The purge task deleted `purged` expired records from `ledger`.
    /// Records how many claims the ledger holds whose lease lapsed (`idempotency.stuck`).
    pub(crate) fn stuck(&self, ledger: &'static str, stuck: u64) {
        #[cfg(feature = "opentelemetry")]
        self.on_call()
            .stuck
            .record(stuck, &[KeyValue::new("ledger", ledger)]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (ledger, stuck);
    }

    pub(crate) fn purged(&self, ledger: &'static str, purged: u64) {
        #[cfg(feature = "opentelemetry")]
        self.on_call()
            .purged
            .add(purged, &[KeyValue::new("ledger", ledger)]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (ledger, purged);
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        tracing::Span::current().record("outcome", outcome.as_str());
        #[cfg(feature = "opentelemetry")]
        self.metrics()
            .outcomes
            .add(1, &[KeyValue::new("outcome", outcome.as_str())]);
    }

    pub(crate) fn takeover(&self) {
        tracing::Span::current().record("takeover", true);
        #[cfg(feature = "opentelemetry")]
        self.metrics().takeovers.add(1, &[]);
    }

    pub(crate) fn stored(&self, bytes: usize) {
        #[cfg(feature = "opentelemetry")]
        self.metrics().stored_bytes.record(bytes as u64, &[]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = bytes;
    }

    pub(crate) fn ledger_timeout(&self, operation: &'static str) {
        #[cfg(feature = "opentelemetry")]
        self.metrics()
            .ledger_timeouts
            .add(1, &[KeyValue::new("operation", operation)]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = operation;
    }

    pub(crate) fn ledger_latency(
        &self,
        ledger: &'static str,
        operation: &'static str,
        elapsed: std::time::Duration,
    ) {
        #[cfg(feature = "opentelemetry")]
        self.metrics().ledger_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("ledger", ledger),
            ],
        );
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (ledger, operation, elapsed);
    }

    pub(crate) fn lease_lost(&self, cause: &'static str) {
        #[cfg(feature = "opentelemetry")]
        self.metrics()
            .lease_lost
            .add(1, &[KeyValue::new("cause", cause)]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = cause;
    }

    pub(crate) fn lease_ceiling(&self) {
        #[cfg(feature = "opentelemetry")]
        self.metrics().lease_ceiling.add(1, &[]);
    }

    /// At the first ledger call: the breaker's gauge starts at 0 (closed), in the `ledger`
    /// series its changes are recorded in.
    pub(crate) fn breaker_started(&self, ledger: &'static str) {
        #[cfg(feature = "opentelemetry")]
        self.breaker_started.get_or_init(|| {
            self.breaker_state(ledger, BreakerState::Closed);
        });
        #[cfg(not(feature = "opentelemetry"))]
        let _ = ledger;
    }

    pub(crate) fn breaker_state(&self, ledger: &'static str, state: BreakerState) {
        #[cfg(feature = "opentelemetry")]
        self.metrics()
            .breaker_state
            .record(state as u64, &[KeyValue::new("ledger", ledger)]);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (ledger, state);
    }

    /// Runs one ledger call in its own span and records its latency. Not an `async fn`, which
    /// would hold `call` twice (as an argument and inside the span's wrapper).
    #[cfg(feature = "opentelemetry")]
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would hold the call twice (see above)"
    )]
    pub(crate) fn ledger<T>(
        &self,
        ledger: &'static str,
        operation: &'static str,
        call: impl Future<Output = T>,
    ) -> impl Future<Output = T> {
        let call = call.instrument(tracing::info_span!("idempotency.ledger", operation, ledger));
        async move {
            let started = Instant::now();
            let result = call.await;
            self.metrics().ledger_duration.record(
                started.elapsed().as_secs_f64(),
                &[
                    KeyValue::new("operation", operation),
                    KeyValue::new("ledger", ledger),
                ],
            );
            result
        }
    }

    /// Runs one ledger call in its own span.
    #[cfg(not(feature = "opentelemetry"))]
    pub(crate) fn ledger<T>(
        &self,
        ledger: &'static str,
        operation: &'static str,
        call: impl Future<Output = T>,
    ) -> impl Future<Output = T> {
        call.instrument(tracing::info_span!("idempotency.ledger", operation, ledger))
    }
}
