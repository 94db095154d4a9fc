//! The router: routes, handlers, and the layers in front of them.

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tower_idempotency::{ConfigError, IdempotencyLayer, InProgress, Ledger};

use crate::{
    auth::{self, Tenant},
    extract::{ApiJson, ApiPath, ApiQuery},
    http_trace,
    problem::Problem,
    processor::Processor,
    store::{NewPayment, Payment, Store},
};

/// How the service behaves: the simulated processor and the idempotency layer's policies.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a charge takes. Default: 50 ms.
    pub latency: Duration,
    /// The probability that a charge fails (503, nothing charged). Default: 0.
    pub fail_rate: f64,
    /// What a duplicate gets while the first request runs. Default: 409.
    pub in_progress: InProgress,
    /// The idempotency lease. Default: 30 s.
    pub lease: Duration,
    /// The meter for the layer's metrics; `None` uses the global meter provider.
    pub meter: Option<opentelemetry::metrics::Meter>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(50),
            fail_rate: 0.0,
            in_progress: InProgress::Conflict,
            lease: Duration::from_secs(30),
            meter: None,
        }
    }
}

#[derive(Debug)]
struct AppState {
    store: Store,
    processor: Processor,
}

type Shared = State<Arc<AppState>>;

/// The idempotency layer as a payments API wants it: scoped by tenant, JSON bodies compared in
/// canonical form, `POST` covered, a key required, and the in-progress policy and lease from
/// `settings`.
pub fn idempotency_layer<L: Ledger>(
    ledger: L,
    settings: &Settings,
) -> Result<IdempotencyLayer<L>, ConfigError> {
    let builder = IdempotencyLayer::builder(ledger)
        .with_scope(Tenant::scope)
        .with_json_canonicalization(true)
        .with_methods([axum::http::Method::POST])
        .with_missing_key(tower_idempotency::MissingKey::Reject)
        .with_in_progress(settings.in_progress)
        .with_lease(settings.lease);
    match &settings.meter {
        Some(meter) => builder.with_meter(meter.clone()),
        None => builder,
    }
    .build()
}

/// The whole service on `ledger` and `store`:
///
/// - `POST /payments`, `GET /payments/{id}`, `GET /payments?customer=..` and
///   `GET /operations/{operation_id}`, behind bearer authentication, which runs before the
///   idempotency layer;
/// - `GET /healthz`, open;
/// - an HTTP server span around everything, and problem+json for unknown routes and methods.
pub fn app<L: Ledger>(ledger: L, store: Store, settings: &Settings) -> Result<Router, ConfigError> {
    let layer = idempotency_layer(ledger, settings)?;
    let state = Arc::new(AppState {
        store,
        processor: Processor::new(settings.latency, settings.fail_rate),
    });
    let protected = Router::new()
        .route("/payments", get(list_payments).post(create_payment))
        .route("/payments/{id}", get(get_payment))
        .layer(layer.clone())
        .layer(middleware::from_fn(detach))
        .merge(layer.operation_router())
        .layer(middleware::from_fn(auth::authenticate));
    Ok(Router::new()
        .route("/healthz", get(healthz))
        .with_state(state.clone())
        .merge(protected.with_state(state))
        .fallback(crate::problem::not_found)
        .method_not_allowed_fallback(crate::problem::method_not_allowed)
        .layer(middleware::from_fn(http_trace::trace)))
}

/// Runs the rest of the request in a task of its own, so that a client that goes away cannot
/// cancel the idempotency layer between its claim and the handler.
///
/// The layer spawns the handler once its claim returns, but the claim itself runs in the
/// request's future: a disconnect while the claim's database round trip is in flight can drop
/// that future after the claim committed, leaving the key in progress, with no handler, until the
/// lease runs out (every duplicate gets 409 meanwhile). Detaching closes that window.
async fn detach(request: axum::extract::Request, next: middleware::Next) -> Response {
    use tracing::Instrument;
    let task = tokio::spawn(next.run(request).in_current_span());
    match task.await {
        Ok(response) => response,
        Err(error) => Problem::internal(&error).into_response(),
    }
}

async fn create_payment(
    State(state): Shared,
    Extension(tenant): Extension<Tenant>,
    ApiJson(new): ApiJson<NewPayment>,
) -> Result<Response, Problem> {
    new.validate().map_err(Problem::invalid_payment)?;
    state.processor.charge(&new).await?;
    let payment = Payment::succeeded(new);
    state
        .store
        .insert(&tenant, &payment)
        .await
        .map_err(|e| Problem::internal(&e))?;
    tracing::info!(payment.id = %payment.id, amount = payment.amount, "payment created");
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::try_from(format!("/payments/{}", payment.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(payment)).into_response())
}

async fn get_payment(
    State(state): Shared,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Payment>, Problem> {
    state
        .store
        .get(&tenant, &id)
        .await
        .map_err(|e| Problem::internal(&e))?
        .map(Json)
        .ok_or_else(Problem::payment_not_found)
}

/// `GET /payments?customer=..`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    customer: String,
}

async fn list_payments(
    State(state): Shared,
    Extension(tenant): Extension<Tenant>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, Problem> {
    let payments = state
        .store
        .by_customer(&tenant, &query.customer)
        .await
        .map_err(|e| Problem::internal(&e))?;
    Ok(Json(serde_json::json!({ "payments": payments })))
}

async fn healthz(State(state): Shared) -> Result<Json<serde_json::Value>, Problem> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "health check failed");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "The database does not answer",
            "the database does not answer",
        )
    })?;
    Ok(Json(serde_json::json!({ "status": "ok" })))
}
