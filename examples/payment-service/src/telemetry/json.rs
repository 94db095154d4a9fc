//! Span and metric exporters that print one JSON object per line.
//!
//! `opentelemetry-stdout` prints an indented, human-oriented text; these print lines that `jq`
//! reads:
//!
//! ```text
//! {"signal":"span","name":"idempotency","trace_id":"…","span_id":"…","parent_span_id":"…",
//!  "kind":"internal","start":"…","duration_ms":1.2,"status":"unset","attributes":{…}}
//! {"signal":"metric","name":"idempotency.outcomes","kind":"sum","unit":"",
//!  "attributes":{"outcome":"executed"},"value":1}
//! ```

use std::{
    fmt,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use opentelemetry::{
    KeyValue, Value,
    trace::{SpanId, SpanKind, Status},
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        Temporality,
        data::{AggregatedMetrics, MetricData, ResourceMetrics},
        exporter::PushMetricExporter,
    },
    trace::{SpanData, SpanExporter},
};
use serde_json::{Map, Value as Json, json};

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

fn stdout_sink() -> Sink {
    Arc::new(Mutex::new(Box::new(std::io::stdout())))
}

fn write_lines(sink: &Sink, lines: impl IntoIterator<Item = Json>) {
    let Ok(mut out) = sink.lock() else { return };
    for line in lines {
        // A closed stdout is not worth failing a request over.
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

fn value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => json!(b),
        Value::I64(i) => json!(i),
        Value::F64(f) => json!(f),
        Value::String(s) => json!(s.as_str()),
        other => json!(other.to_string()),
    }
}

fn attributes<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> Json {
    Json::Object(
        kvs.into_iter()
            .map(|kv| (kv.key.to_string(), value(&kv.value)))
            .collect::<Map<_, _>>(),
    )
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Prints each finished span as a JSON line.
pub struct JsonSpanExporter {
    sink: Sink,
}

impl fmt::Debug for JsonSpanExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonSpanExporter").finish_non_exhaustive()
    }
}

impl JsonSpanExporter {
    /// An exporter to stdout.
    pub fn stdout() -> Self {
        Self {
            sink: stdout_sink(),
        }
    }

    /// The JSON line for `span`.
    pub fn line(span: &SpanData) -> Json {
        let kind = match span.span_kind {
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
            SpanKind::Internal => "internal",
        };
        let status = match &span.status {
            Status::Unset => "unset".to_owned(),
            Status::Ok => "ok".to_owned(),
            Status::Error { description } => format!("error: {description}"),
        };
        let duration = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or(Duration::ZERO);
        let parent =
            (span.parent_span_id != SpanId::INVALID).then(|| span.parent_span_id.to_string());
        json!({
            "signal": "span",
            "name": span.name,
            "trace_id": span.span_context.trace_id().to_string(),
            "span_id": span.span_context.span_id().to_string(),
            "parent_span_id": parent,
            "kind": kind,
            "start": rfc3339(span.start_time),
            "duration_ms": duration.as_secs_f64() * 1e3,
            "status": status,
            "attributes": attributes(&span.attributes),
        })
    }
}

impl SpanExporter for JsonSpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        write_lines(&self.sink, batch.iter().map(Self::line));
        Ok(())
    }
}

/// Prints every data point of every metric as a JSON line at each collection.
pub struct JsonMetricExporter {
    sink: Sink,
}

impl fmt::Debug for JsonMetricExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonMetricExporter").finish_non_exhaustive()
    }
}

impl JsonMetricExporter {
    /// An exporter to stdout.
    pub fn stdout() -> Self {
        Self {
            sink: stdout_sink(),
        }
    }

    /// One JSON line per data point of `metrics`.
    pub fn lines(metrics: &ResourceMetrics) -> Vec<Json> {
        let mut lines = Vec::new();
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                let head = |kind: &str, attrs: Json| {
                    json!({
                        "signal": "metric",
                        "scope": scope.scope().name(),
                        "name": metric.name(),
                        "kind": kind,
                        "unit": metric.unit(),
                        "attributes": attrs,
                    })
                };
                match metric.data() {
                    AggregatedMetrics::U64(data) => points(data, &head, &mut lines),
                    AggregatedMetrics::I64(data) => points(data, &head, &mut lines),
                    AggregatedMetrics::F64(data) => points(data, &head, &mut lines),
                }
            }
        }
        lines
    }
}

fn points<T>(data: &MetricData<T>, head: &dyn Fn(&str, Json) -> Json, lines: &mut Vec<Json>)
where
    T: Copy + serde::Serialize,
{
    let mut push = |mut line: Json, extra: Json| {
        if let (Json::Object(line), Json::Object(extra)) = (&mut line, extra) {
            line.extend(extra);
        }
        lines.push(line);
    };
    match data {
        MetricData::Sum(sum) => {
            for p in sum.data_points() {
                push(
                    head("sum", attributes(p.attributes())),
                    json!({ "value": p.value() }),
                );
            }
        }
        MetricData::Gauge(gauge) => {
            for p in gauge.data_points() {
                push(
                    head("gauge", attributes(p.attributes())),
                    json!({ "value": p.value() }),
                );
            }
        }
        MetricData::Histogram(histogram) => {
            for p in histogram.data_points() {
                push(
                    head("histogram", attributes(p.attributes())),
                    json!({ "count": p.count(), "sum": p.sum(), "min": p.min(), "max": p.max() }),
                );
            }
        }
        MetricData::ExponentialHistogram(histogram) => {
            for p in histogram.data_points() {
                push(
                    head("exponential_histogram", attributes(p.attributes())),
                    json!({ "count": p.count(), "min": p.min(), "max": p.max() }),
                );
            }
        }
    }
}

impl PushMetricExporter for JsonMetricExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        write_lines(&self.sink, Self::lines(metrics));
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}
