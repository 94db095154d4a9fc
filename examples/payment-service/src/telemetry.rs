//! Logs, traces and metrics for the binary: `--otel stdout|otlp|none`.
//!
//! - Logs (`tracing` events) go to stderr, filtered by `RUST_LOG` (default `info`).
//! - `stdout`: every finished span, and the metrics every 10 s and at shutdown, as one JSON
//!   object per line on stdout (see [`json`]).
//! - `otlp`: spans and metrics to an OTLP/HTTP (protobuf) collector, configured by the standard
//!   `OTEL_EXPORTER_OTLP_*` variables (default `http://localhost:4318`), and `OTEL_SERVICE_NAME`.
//! - `none`: logs only.
//!
//! The meter provider is installed globally before the idempotency layer is built, so the
//! layer's `idempotency.*` metrics go through it.

pub mod json;

use std::{str::FromStr, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::SdkTracerProvider,
};
use tracing_subscriber::{Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// Where spans and metrics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Otel {
    /// JSON lines on stdout.
    Stdout,
    /// OTLP over HTTP, per the `OTEL_EXPORTER_OTLP_*` variables.
    Otlp,
    /// No export; logs only.
    #[default]
    None,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// Building an OTLP exporter failed.
    #[error("OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global `tracing` subscriber was already installed.
    #[error("tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the providers alive; [`shutdown`](Self::shutdown) flushes them.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

fn resource() -> Resource {
    // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` still apply on top.
    Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "payment-service".to_owned()),
        )
        .build()
}

fn periodic<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>(
    exporter: E,
) -> PeriodicReader<E> {
    let builder = PeriodicReader::builder(exporter);
    // The SDK reads OTEL_METRIC_EXPORT_INTERVAL (default 60 s); without it, 10 s suits a demo.
    if std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_some() {
        builder.build()
    } else {
        builder.with_interval(Duration::from_secs(10)).build()
    }
}

/// Installs the global `tracing` subscriber (logs to stderr, and spans to OpenTelemetry unless
/// `otel` is [`Otel::None`]) and the global meter provider.
pub fn init(otel: Otel) -> Result<Telemetry, TelemetryError> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| Targets::from_str(&s).ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let (tracer, meter) = match otel {
        Otel::None => (None, None),
        Otel::Stdout => (
            Some(
                SdkTracerProvider::builder()
                    .with_resource(resource())
                    .with_simple_exporter(json::JsonSpanExporter::stdout())
                    .build(),
            ),
            Some(
                SdkMeterProvider::builder()
                    .with_resource(resource())
                    .with_reader(periodic(json::JsonMetricExporter::stdout()))
                    .build(),
            ),
        ),
        Otel::Otlp => {
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()?;
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()?;
            (
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource())
                        .with_batch_exporter(spans)
                        .build(),
                ),
                Some(
                    SdkMeterProvider::builder()
                        .with_resource(resource())
                        .with_reader(periodic(metrics))
                        .build(),
                ),
            )
        }
    };
    let otel_layer = tracer.as_ref().map(|provider| {
        // Only the attributes the spans declare: no code location, thread, target or
        // busy/idle times.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("payment-service"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
    });
    tracing_subscriber::registry()
        .with(logs.and_then(otel_layer).with_filter(filter))
        .try_init()?;
    if let Some(provider) = &meter {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    if let Some(provider) = &tracer {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(Telemetry { tracer, meter })
}

impl Telemetry {
    /// Flushes and stops the exporters; failures are logged.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(error) = tracer.shutdown()
        {
            tracing::warn!(%error, "shutting down the tracer provider failed");
        }
        if let Some(meter) = self.meter
            && let Err(error) = meter.shutdown()
        {
            tracing::warn!(%error, "shutting down the meter provider failed");
        }
    }
}
