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

/// A meter provider whose readings the test reads back from the exporter.
fn recording() -> (SdkMeterProvider, InMemoryMetricExporter) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    (provider, exporter)
}

#[tokio::test]
async fn the_outcome_counter_counts_by_outcome() {
    let (provider, exporter) = recording();
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

/// One exported data point: metric name, attributes (`key=value`, sorted) and value.
type Point = (String, Vec<String>, f64);

/// Flushes `provider` and returns the points of that export (cumulative totals).
fn snapshot(provider: &SdkMeterProvider, exporter: &InMemoryMetricExporter) -> Vec<Point> {
    exporter.reset();
    provider.force_flush().unwrap();
    let mut points = Vec::new();
    let attrs = |kvs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
        let mut out: Vec<String> = kvs.map(|kv| format!("{}={}", kv.key, kv.value)).collect();
        out.sort();
        out
    };
    for resource in exporter.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics() {
                let name = metric.name().to_owned();
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                        for p in sum.data_points() {
                            points.push((
                                name.clone(),
                                attrs(&mut p.attributes()),
                                p.value() as f64,
                            ));
                        }
                    }
                    AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                        for p in sum.data_points() {
                            points.push((
                                name.clone(),
                                attrs(&mut p.attributes()),
                                p.value() as f64,
                            ));
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            points.push((
                                name.clone(),
                                attrs(&mut p.attributes()),
                                p.count() as f64,
                            ));
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            points.push((
                                name.clone(),
                                attrs(&mut p.attributes()),
                                p.count() as f64,
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    points
}

/// The value of `name` with exactly `attributes`, if exported.
fn value(points: &[Point], name: &str, attributes: &[&str]) -> Option<f64> {
    points
        .iter()
        .find(|(n, a, _)| n == name && a.iter().map(String::as_str).eq(attributes.iter().copied()))
        .map(|(_, _, v)| *v)
}

fn unkeyed() -> axum::http::Request<axum::body::Body> {
    axum::http::Request::post("/payments")
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{}"))
        .unwrap()
}

/// Every outcome value, the takeovers counter, the stored-bytes histogram, the in-flight gauge,
/// the wait histogram and the purge counter, each with its attributes (and never a key).
#[tokio::test]
async fn every_metric_and_every_outcome_is_recorded_with_its_attributes() {
    use tower_idempotency::{InProgress, LedgerFailure, MissingKey};
    use tower_idempotency_core::conformance::FaultyLedger;

    let (provider, exporter) = recording();
    let meter = provider.meter("test");
    let slow = Duration::from_millis(400);
    let layer = |policy: InProgress| {
        IdempotencyLayer::builder(MemoryLedger::new())
            .with_meter(meter.clone())
            .with_in_progress(policy)
            .build()
            .unwrap()
    };

    // executed, replayed, mismatch, rejected; stored bytes.
    let app = payments(Runs::default(), Duration::ZERO).layer(layer(InProgress::Conflict));
    send(&app, pay("a", "{}")).await;
    send(&app, pay("a", "{}")).await;
    send(&app, pay("a", "{\"x\":1}")).await;
    send(&app, unkeyed()).await;

    // conflict, with the in-flight gauge at 1 while the first request runs.
    let app = payments(Runs::default(), slow).layer(layer(InProgress::Conflict));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("c", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&app, pay("c", "{}")).await;
    let during = snapshot(&provider, &exporter);
    assert_eq!(
        value(&during, "idempotency.in_flight", &[]),
        Some(1.0),
        "{during:?}"
    );
    first.await.unwrap();

    // accepted.
    let app = payments(Runs::default(), slow).layer(layer(InProgress::Accepted));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("d", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&app, pay("d", "{}")).await;
    first.await.unwrap();

    // waited, and how long.
    let app = payments(Runs::default(), slow).layer(layer(InProgress::Wait {
        timeout: Duration::from_secs(5),
    }));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("w", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&app, pay("w", "{}")).await;
    first.await.unwrap();

    // bypassed.
    let allow = IdempotencyLayer::builder(MemoryLedger::new())
        .with_meter(meter.clone())
        .with_missing_key(MissingKey::Allow)
        .build()
        .unwrap();
    send(
        &payments(Runs::default(), Duration::ZERO).layer(allow),
        unkeyed(),
    )
    .await;

    // ledger_error.
    let failing = FaultyLedger::new(MemoryLedger::new());
    failing.faults().fail_all(true);
    let broken = IdempotencyLayer::builder(failing)
        .with_meter(meter.clone())
        .with_ledger_failure(LedgerFailure::FailClosed)
        .build()
        .unwrap();
    send(
        &payments(Runs::default(), Duration::ZERO).layer(broken),
        pay("e", "{}"),
    )
    .await;

    // a takeover: the first holder's renewals are lost, its lease lapses, the retry takes over.
    let stalled = FaultyLedger::new(MemoryLedger::new());
    stalled.faults().drop_renewals(true);
    let takeover = IdempotencyLayer::builder(stalled)
        .with_meter(meter.clone())
        .with_lease(Duration::from_millis(100))
        .build()
        .unwrap();
    let app = payments(Runs::default(), slow).layer(takeover);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("t", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    send(&app, pay("t", "{}")).await;
    first.await.unwrap();

    // purged.
    let expiring = IdempotencyLayer::builder(MemoryLedger::new())
        .with_meter(meter.clone())
        .with_lease(Duration::from_millis(50))
        .with_retention(Duration::from_millis(100))
        .build()
        .unwrap();
    send(
        &payments(Runs::default(), Duration::ZERO).layer(expiring.clone()),
        pay("p", "{}"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The first tick purges at once; the next is an hour away.
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        expiring.purge_task(Duration::from_secs(3600), 10),
    )
    .await;

    let points = snapshot(&provider, &exporter);
    let outcome = |o: &str| value(&points, "idempotency.outcomes", &[&format!("outcome={o}")]);
    // a, c, d, w, t (twice: the first holder and the retry), p.
    assert_eq!(outcome("executed"), Some(7.0), "{points:?}");
    assert_eq!(outcome("replayed"), Some(1.0), "{points:?}");
    assert_eq!(outcome("mismatch"), Some(1.0), "{points:?}");
    assert_eq!(outcome("rejected"), Some(1.0), "{points:?}");
    assert_eq!(outcome("conflict"), Some(1.0), "{points:?}");
    assert_eq!(outcome("accepted"), Some(1.0), "{points:?}");
    assert_eq!(outcome("waited"), Some(1.0), "{points:?}");
    assert_eq!(outcome("bypassed"), Some(1.0), "{points:?}");
    assert_eq!(outcome("ledger_error"), Some(1.0), "{points:?}");
    assert_eq!(
        value(&points, "idempotency.lease.takeovers", &[]),
        Some(1.0)
    );
    // Stored responses: a, c, d, w, t (only the retry's completion holds the lease), p.
    assert_eq!(value(&points, "idempotency.stored.bytes", &[]), Some(6.0));
    assert_eq!(
        value(&points, "idempotency.wait.duration", &["outcome=waited"]),
        Some(1.0),
        "{points:?}"
    );
    assert_eq!(
        value(&points, "idempotency.in_flight", &[]),
        Some(0.0),
        "every claim ended"
    );
    assert_eq!(
        value(&points, "idempotency.purged", &["ledger=memory"]),
        Some(1.0),
        "{points:?}"
    );
    for (name, attributes, _) in &points {
        for attribute in attributes {
            let key = attribute.split('=').next().unwrap();
            assert!(
                ["outcome", "operation", "ledger"].contains(&key),
                "{name} has a label {attribute}: never a key or digest"
            );
        }
    }
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
    let (provider, exporter) = recording();
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
    // Read now: the next layer's ledger has the same name, so its breaker's first reading
    // (closed) lands in the same series.
    provider.force_flush().unwrap();
    let metrics = flat(&exporter);
    assert_eq!(
        metrics.get("idempotency.breaker.state{ledger=memory}"),
        Some(&1),
        "{metrics:?}"
    );

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
}

/// The breaker's gauge starts at 0 (closed) under its ledger's label, the series its later
/// changes are recorded in; there is no second, unlabelled series.
#[tokio::test]
async fn the_breaker_gauge_starts_closed_under_its_ledger_label() {
    let (provider, exporter) = recording();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_meter(provider.meter("test"))
        .build()
        .unwrap();
    let app = payments(Runs::default(), Duration::ZERO).layer(layer);
    send(&app, pay("calm", "{}")).await;
    provider.force_flush().unwrap();
    let metrics = flat(&exporter);
    assert_eq!(
        metrics.get("idempotency.breaker.state{ledger=memory}"),
        Some(&0),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("idempotency.breaker.state{}"),
        None,
        "{metrics:?}"
    );
}

/// The purge task counts claims whose lease lapsed with nobody taking them over (an instance
/// that died holding them) into `idempotency.stuck`, by ledger: the gauge a stuck-409s alert
/// watches.
#[tokio::test]
async fn the_purge_task_counts_stuck_claims() {
    use tower_idempotency::{
        Fingerprint, IdempotencyKey, Ledger,
        core::{ClaimRequest, LedgerKey, ScopeDigest},
    };
    let (provider, exporter) = recording();
    let ledger = MemoryLedger::new();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_meter(provider.meter("test"))
        .build()
        .unwrap();
    for (key, lease_ms) in [("dead-1", 50), ("dead-2", 50), ("live", 60_000)] {
        let parsed = IdempotencyKey::parse(key.as_bytes()).unwrap();
        let claim = ClaimRequest::new(
            LedgerKey::new(b"", &parsed),
            ScopeDigest::new(b""),
            Fingerprint::of(b"body"),
            Duration::from_millis(lease_ms),
            Duration::from_secs(3600),
        );
        ledger.claim(&claim).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The first tick runs at once; the next is an hour away.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        layer.purge_task(Duration::from_secs(3600), 10),
    )
    .await;
    provider.force_flush().unwrap();
    let metrics = flat(&exporter);
    assert_eq!(
        metrics.get("idempotency.stuck{ledger=memory}"),
        Some(&2),
        "{metrics:?}"
    );
}
