//! The span tree and the outcome counter of one executed request and its replay, through
//! tracing-opentelemetry into in-memory exporters.
//!
//! Alone in its test binary on purpose: tracing caches each callsite's interest process-wide, so
//! a test running beside this one without a subscriber could hide its spans.

#![allow(clippy::unwrap_used)] // tests may panic

use std::collections::HashMap;

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use opentelemetry::{Value, trace::TracerProvider as _};
use opentelemetry_sdk::{
    metrics::{
        InMemoryMetricExporter, SdkMeterProvider,
        data::{AggregatedMetrics, MetricData},
    },
    trace::{InMemorySpanExporter, SdkTracerProvider, SpanData},
};
use payment_service::{Database, Settings};
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn one_request_is_a_server_span_an_idempotency_span_and_ledger_spans() {
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer("payment-service")),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_periodic_exporter(metrics.clone())
        .build();

    let database = Database::connect("sqlite::memory:", None).await.unwrap();
    let settings = Settings {
        processor_url: payment_service::card_processor::spawn(
            "sqlite::memory:",
            Default::default(),
        )
        .await
        .unwrap(),
        meter: Some(opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            "tower-idempotency",
        )),
        ..Settings::default()
    };
    let app = database.router(&settings).unwrap();
    let post = || {
        Request::post("/payments")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer span-test")
            .header("idempotency-key", "raw-key-never-exported")
            .body(Body::from(
                r#"{"amount":500,"currency":"USD","customer":"carol"}"#,
            ))
            .unwrap()
    };
    let first = app.clone().oneshot(post()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let second = app.clone().oneshot(post()).await.unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(second.headers()["idempotent-replayed"], "true");

    tracer_provider.force_flush().unwrap();
    let spans = spans.get_finished_spans().unwrap();
    let by_id: HashMap<_, _> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let children = |parent: &SpanData, name: &str| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_context.span_id() && s.name == name)
            .collect()
    };

    let servers: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "POST /payments")
        .collect();
    assert_eq!(servers.len(), 2, "{:#?}", spans);
    let mut operation_ids = Vec::new();
    for (server, (outcome, ledger_calls)) in servers.iter().zip([
        // Exactly-once mode (the default) opens the handler's transaction after the claim; the
        // completion is written and committed in it.
        ("executed", &["begin", "claim", "complete"][..]),
        ("replayed", &["claim"][..]),
    ]) {
        // The server span: a root, with the HTTP attributes.
        assert!(!by_id.contains_key(&server.parent_span_id), "{server:#?}");
        assert_eq!(server.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(text(server, "http.request.method"), "POST");
        assert_eq!(text(server, "url.path"), "/payments");
        assert_eq!(text(server, "http.route"), "/payments");
        assert_eq!(
            attribute(server, "http.response.status_code"),
            Some(Value::I64(201))
        );

        // Its child: the layer's span, with the outcome, the short digest and the operation.
        let idempotency = children(server, "idempotency");
        assert_eq!(idempotency.len(), 1, "{spans:#?}");
        let idempotency = idempotency[0];
        assert_eq!(
            idempotency.span_context.trace_id(),
            server.span_context.trace_id()
        );
        assert_eq!(text(idempotency, "outcome"), outcome);
        let key = text(idempotency, "key");
        assert!(
            key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key:?}"
        );
        assert_eq!(text(idempotency, "ledger"), "sqlite");
        operation_ids.push(text(idempotency, "operation_id"));

        // Its children: one span per ledger call.
        let mut calls: Vec<String> = children(idempotency, "idempotency.ledger")
            .iter()
            .map(|s| text(s, "operation"))
            .collect();
        calls.sort();
        assert_eq!(calls, ledger_calls, "{outcome}");
    }
    assert!(!operation_ids[0].is_empty());
    assert_eq!(operation_ids[0], operation_ids[1]);

    // The raw key is on no span.
    for span in &spans {
        for kv in &span.attributes {
            assert!(
                !kv.value.as_str().contains("raw-key-never-exported"),
                "{span:#?}"
            );
        }
    }

    meter_provider.force_flush().unwrap();
    let exported = metrics.get_finished_metrics().unwrap();
    let last = exported.last().unwrap();
    let mut outcomes = HashMap::new();
    for metric in last.scope_metrics().flat_map(|s| s.metrics()) {
        if metric.name() != "idempotency.outcomes" {
            continue;
        }
        let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() else {
            panic!("idempotency.outcomes is not a u64 sum: {metric:?}");
        };
        for point in sum.data_points() {
            let outcome = point
                .attributes()
                .find(|kv| kv.key.as_str() == "outcome")
                .map(|kv| kv.value.as_str().into_owned())
                .unwrap();
            outcomes.insert(outcome, point.value());
        }
    }
    assert_eq!(
        outcomes,
        HashMap::from([("executed".to_owned(), 1), ("replayed".to_owned(), 1)])
    );
}
