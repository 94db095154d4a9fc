//! Metrics: the outcome counter and the ledger latency histogram, through an in-memory exporter.
#![cfg(feature = "opentelemetry")]
#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{collections::HashMap, time::Duration};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::{
    InMemoryMetricExporter, PeriodicReader, SdkMeterProvider,
    data::{AggregatedMetrics, MetricData},
};
use support::*;
use tower_idempotency::{IdempotencyLayer, MemoryLedger};

#[tokio::test]
async fn the_outcome_counter_counts_by_outcome() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_meter(provider.meter("test"))
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = payments(runs, Duration::ZERO).layer(layer);
    send(&app, pay("k", "{}")).await;
    send(&app, pay("k", "{}")).await;
    send(&app, pay("k", "{}")).await;
    send(&app, pay("k", "{ }")).await;
    provider.force_flush().unwrap();

    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut ledger_ops: Vec<String> = Vec::new();
    for resource in exporter.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics() {
                match (metric.name(), metric.data()) {
                    ("idempotency.outcomes", AggregatedMetrics::U64(MetricData::Sum(sum))) => {
                        for point in sum.data_points() {
                            for kv in point.attributes() {
                                assert_eq!(
                                    kv.key.as_str(),
                                    "outcome",
                                    "no other label, never a key"
                                );
                                counts.insert(kv.value.to_string(), point.value());
                            }
                        }
                    }
                    (
                        "idempotency.ledger.duration",
                        AggregatedMetrics::F64(MetricData::Histogram(h)),
                    ) => {
                        for point in h.data_points() {
                            for kv in point.attributes() {
                                if kv.key.as_str() == "operation" {
                                    ledger_ops.push(kv.value.to_string());
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert_eq!(counts.get("executed"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("replayed"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("mismatch"), Some(&1), "{counts:?}");
    ledger_ops.sort();
    ledger_ops.dedup();
    assert_eq!(ledger_ops, ["claim", "complete"]);
}

/// Sums of counters and last values of gauges, by metric name and attributes.
fn flat(exporter: &InMemoryMetricExporter) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for resource in exporter.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics() {
                let label =
                    |attrs: Vec<String>| format!("{}{{{}}}", metric.name(), attrs.join(","));
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                        for p in sum.data_points() {
                            let attrs = p.attributes().map(|kv| format!("{}={}", kv.key, kv.value));
                            out.insert(label(attrs.collect()), p.value());
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(gauge)) => {
                        for p in gauge.data_points() {
                            let attrs = p.attributes().map(|kv| format!("{}={}", kv.key, kv.value));
                            out.insert(label(attrs.collect()), p.value());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn the_renewal_ceiling_the_lost_lease_and_the_breaker_are_metrics() {
    use tower_idempotency::CircuitBreaker;
    use tower_idempotency_core::conformance::{FaultyLedger, Op};
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let ledger = FaultyLedger::new(MemoryLedger::new());
    let faults = ledger.faults();
    let layer = IdempotencyLayer::builder(ledger)
        .with_meter(provider.meter("test"))
        .with_lease(Duration::from_millis(300))
        .with_max_handler_time(Duration::from_millis(150))
        .with_circuit_breaker(CircuitBreaker {
            failures: 1,
            open_for: Duration::from_secs(60),
        })
        .build()
        .unwrap();
    let app = payments(Runs::default(), Duration::from_millis(400)).layer(layer);
    // The ceiling: a renewal at 100 ms, then none after 150 ms.
    send(&app, pay("ceiling", "{}")).await;
    // The breaker: one failed claim opens it.
    faults.fail_next(Op::Claim, 1);
    send(&app, pay("breaker", "{}")).await;

    // A lost lease: renewals answer without renewing, a retry takes the key over, and the
    // holder's next renewal is refused.
    let ledger = FaultyLedger::new(MemoryLedger::new());
    let faults = ledger.faults();
    let layer = IdempotencyLayer::builder(ledger)
        .with_meter(provider.meter("test"))
        .with_lease(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = payments(Runs::default(), Duration::from_millis(1000)).layer(layer);
    faults.drop_renewals(true);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("lost", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("lost", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    faults.drop_renewals(false);
    first.await.unwrap();
    retry.await.unwrap();
    provider.force_flush().unwrap();
    let metrics = flat(&exporter);
    assert_eq!(
        metrics.get("idempotency.lease.ceiling{}"),
        Some(&1),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("idempotency.lease.lost{cause=taken_over}"),
        Some(&1),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("idempotency.breaker.state{ledger=memory}"),
        Some(&1),
        "{metrics:?}"
    );
}
