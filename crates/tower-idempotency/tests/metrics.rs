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
