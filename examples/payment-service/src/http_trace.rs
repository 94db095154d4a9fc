//! The HTTP server span around every request, with OpenTelemetry's HTTP semantic conventions.

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use tracing::{Instrument, field::Empty};

/// Middleware: one `http.server` span per request, exported as `{method} {route}` (such as
/// `POST /payments`) with `http.request.method`, `url.path`, `http.route` and
/// `http.response.status_code`. The idempotency layer's `idempotency` span is its child.
pub async fn trace(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.to_string(),
    };
    let span = tracing::info_span!(
        "http.server",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        url.path = %request.uri().path(),
        http.route = route.as_deref().unwrap_or_default(),
        http.response.status_code = Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    // As i64: tracing-opentelemetry exports u64 fields as strings.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}
