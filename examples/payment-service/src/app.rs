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
use tower_idempotency::{ConfigError, DrainHandle, IdempotencyLayer, InProgress, LedgerTx};

use crate::{
    auth::{self, Tenant},
    extract::{ApiJson, ApiPath, ApiQuery},
    http_trace,
    problem::Problem,
    processor::Processor,
    store::{NewPayment, Payment, PaymentLedger, Store},
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
    /// Exactly-once mode: the payment row is written in the ledger's transaction and commits
    /// together with the stored response (see the [crate docs](crate#exactly-once-mode)).
    /// Default: true.
    pub exactly_once: bool,
    /// A test hook: after writing the payment row, print `WRITTEN` on stdout and never answer,
    /// so that a crash test can kill the process right there. Default: false.
    pub pause_after_write: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(50),
            fail_rate: 0.0,
            in_progress: InProgress::Conflict,
            lease: Duration::from_secs(30),
            meter: None,
            exactly_once: true,
            pause_after_write: false,
        }
    }
}

#[derive(Debug)]
struct AppState {
    store: Store,
    processor: Processor,
    pause_after_write: bool,
}

type Shared = State<Arc<AppState>>;

/// The idempotency layer as a payments API wants it: scoped by tenant, JSON bodies compared in
/// canonical form, `POST` covered, a key required, and the in-progress policy, lease and
/// exactly-once mode (`with_transactions`) from `settings`.
pub fn idempotency_layer<L: PaymentLedger>(
    ledger: L,
    settings: &Settings,
) -> Result<IdempotencyLayer<L>, ConfigError> {
    let builder = IdempotencyLayer::builder(ledger)
        .with_scope(Tenant::scope)
        .with_json_canonicalization(true)
        .with_methods([axum::http::Method::POST])
        .with_missing_key(tower_idempotency::MissingKey::Reject)
        .with_in_progress(settings.in_progress)
        .with_lease(settings.lease)
        // The longest deadline the lease allows (the crash tests run with 400 ms leases against
        // freshly started processes, whose first ledger calls open pool connections).
        .with_ledger_timeout((settings.lease / 3).min(Duration::from_secs(5)));
    let builder = if settings.exactly_once {
        builder.with_transactions()
    } else {
        builder
    };
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
///   idempotency layer; `POST /payments` writes its row in the layer's transaction if
///   `settings.exactly_once`, else on the pool;
/// - `GET /healthz`, open;
/// - an HTTP server span around everything, and problem+json for unknown routes and methods.
pub fn app<L: PaymentLedger>(
    ledger: L,
    store: Store,
    settings: &Settings,
) -> Result<Router, ConfigError> {
    app_with_drain(ledger, store, settings).map(|(router, _)| router)
}

/// [`app`], and the idempotency layer's [`DrainHandle`] for a graceful shutdown: on SIGTERM,
/// `drain` refuses new payments (503 `shutting-down`) and waits for those in flight, including
/// handlers whose client left.
pub fn app_with_drain<L: PaymentLedger>(
    ledger: L,
    store: Store,
    settings: &Settings,
) -> Result<(Router, DrainHandle), ConfigError> {
    let layer = idempotency_layer(ledger, settings)?;
    let drain = layer.drain_handle();
    let state = Arc::new(AppState {
        store,
        processor: Processor::new(settings.latency, settings.fail_rate),
        pause_after_write: settings.pause_after_write,
    });
    let payments = if settings.exactly_once {
        get(list_payments).post(create_payment_exactly_once::<L>)
    } else {
        get(list_payments).post(create_payment)
    };
    let protected = Router::new()
        .route("/payments", payments)
        .route("/payments/{id}", get(get_payment))
        .layer(layer.clone())
        .merge(layer.operation_router())
        .layer(middleware::from_fn(auth::authenticate));
    let router = Router::new()
        .route("/healthz", get(healthz))
        .with_state(state.clone())
        .merge(protected.with_state(state))
        .fallback(crate::problem::not_found)
        .method_not_allowed_fallback(crate::problem::method_not_allowed)
        .layer(middleware::from_fn(http_trace::trace));
    Ok((router, drain))
}

/// `POST /payments`, exactly-once: charge, then write the payment in the idempotency layer's
/// transaction, which commits it together with the stored 201. A crash before the commit leaves
/// neither (and the retry, after the lease, charges once); after it, both.
///
/// The write comes last, after the processor call: on SQLite the transaction takes the database's
/// write lock at its first write and holds it to the commit.
async fn create_payment_exactly_once<L: PaymentLedger>(
    State(state): Shared,
    Extension(tenant): Extension<Tenant>,
    mut tx: LedgerTx<L>,
    ApiJson(new): ApiJson<NewPayment>,
) -> Result<Response, Problem> {
    new.validate().map_err(Problem::invalid_payment)?;
    state.processor.charge(&new).await?;
    let payment = Payment::succeeded(new);
    L::insert_in(&mut tx, &tenant, &payment)
        .await
        .map_err(|e| Problem::database(&e))?;
    written(&state, &payment).await;
    Ok(created(payment))
}

/// `POST /payments` without exactly-once mode: the row is committed on its own, before the
/// layer stores the response. A crash between the two leaves a payment whose key is still in
/// progress; after the lease, the retry charges a second time.
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
        .map_err(|e| Problem::database(&e))?;
    written(&state, &payment).await;
    Ok(created(payment))
}

/// After the payment row is written: log it, and with the `pause_after_write` test hook, say
/// `WRITTEN` on stdout and hang, for a crash test to kill the process there.
async fn written(state: &AppState, payment: &Payment) {
    tracing::info!(payment.id = %payment.id, amount = payment.amount, "payment created");
    if state.pause_after_write {
        {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            // The test reads this line; if it is gone, there is nobody to tell.
            let _ = writeln!(stdout, "WRITTEN");
            let _ = stdout.flush();
        }
        std::future::pending::<()>().await;
    }
}

fn created(payment: Payment) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::try_from(format!("/payments/{}", payment.id)) {
        headers.insert(header::LOCATION, location);
    }
    (StatusCode::CREATED, headers, Json(payment)).into_response()
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
        .map_err(|e| Problem::database(&e))?
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
        .map_err(|e| Problem::database(&e))?;
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
