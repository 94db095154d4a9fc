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
use tower_idempotency::{
    ConfigError, DrainHandle, IdempotencyLayer, IdempotencyLayerBuilder, InProgress, Ledger,
    LedgerTx, Operation,
};

use crate::{
    auth::{self, Tenant},
    extract::{ApiJson, ApiPath, ApiQuery},
    http_trace,
    problem::Problem,
    processor::Processor,
    store::{NewPayment, Payment, PaymentLedger, Store},
};

/// How the service behaves: where its processor is and the idempotency layer's policies.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The card processor's base URL ([`card_processor::spawn`](crate::card_processor::spawn)
    /// starts one in-process). Default: `http://127.0.0.1:3001`.
    pub processor_url: String,
    /// The timeout of every call to the processor. Default: 10 s.
    pub processor_timeout: Duration,
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
    /// A test hook: after the charge, before the payment row, print `CHARGED` on stdout and
    /// never answer. Default: false.
    pub pause_after_charge: bool,
    /// A test hook: the share of payment inserts that fail (500, after the charge), 0.0 to 1.0.
    /// Default: 0.
    pub fail_insert_rate: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            processor_url: "http://127.0.0.1:3001".to_owned(),
            processor_timeout: crate::processor::DEFAULT_TIMEOUT,
            in_progress: InProgress::Conflict,
            lease: Duration::from_secs(30),
            meter: None,
            exactly_once: true,
            pause_after_write: false,
            pause_after_charge: false,
            fail_insert_rate: 0.0,
        }
    }
}

#[derive(Debug)]
struct AppState {
    store: Store,
    processor: Processor,
    pause_after_write: bool,
    pause_after_charge: bool,
    fail_insert_rate: f64,
}

type Shared = State<Arc<AppState>>;

/// The idempotency layer as a payments API wants it: scoped by tenant, JSON bodies compared in
/// canonical form, `POST` covered, a key required, and the in-progress policy, lease and
/// exactly-once mode (`with_transactions`) from `settings`.
pub fn idempotency_layer<L: PaymentLedger>(
    ledger: L,
    settings: &Settings,
) -> Result<IdempotencyLayer<L>, ConfigError> {
    let builder = layer_builder(ledger, settings);
    if settings.exactly_once {
        builder.with_transactions()
    } else {
        builder
    }
    .build()
}

/// Everything of [`idempotency_layer`] but exactly-once mode, for any ledger.
fn layer_builder<L: Ledger + Clone>(ledger: L, settings: &Settings) -> IdempotencyLayerBuilder<L> {
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
    match &settings.meter {
        Some(meter) => builder.with_meter(meter.clone()),
        None => builder,
    }
}

/// The whole service on `ledger` and `store`:
///
/// - `POST /payments`, `GET /payments/{id}`, `GET /payments?customer=..`,
///   `GET /processor/charges?customer=..` (the processor's charges for this tenant and customer,
///   for audits) and `GET /operations/{operation_id}`, behind bearer authentication, which runs
///   before the
///   idempotency layer; `POST /payments` writes its row in the layer's transaction if
///   `settings.exactly_once`, else on the pool;
/// - `GET /healthz`, open;
/// - an HTTP server span around everything, and problem+json for unknown routes and methods.
pub fn app<L: PaymentLedger>(
    ledger: L,
    store: Store,
    settings: &Settings,
) -> Result<Router, crate::StartError> {
    app_with_drain(ledger, store, settings).map(|(router, _)| router)
}

/// [`app`], and the idempotency layer's [`DrainHandle`] for a graceful shutdown: on SIGTERM,
/// `drain` refuses new payments (503 `shutting-down`) and waits for those in flight, including
/// handlers whose client left.
pub fn app_with_drain<L: PaymentLedger>(
    ledger: L,
    store: Store,
    settings: &Settings,
) -> Result<(Router, DrainHandle), crate::StartError> {
    let layer = idempotency_layer(ledger, settings)?;
    let payments = if settings.exactly_once {
        get(list_payments).post(create_payment_exactly_once::<L>)
    } else {
        get(list_payments).post(create_payment)
    };
    assemble(layer, payments, store, settings)
}

/// [`app`] on a ledger that is not transactional (Redis), whose payments `store` keeps apart:
/// exactly-once mode is refused ([`StartError::NotTransactional`](crate::StartError)), since
/// the payment and the stored response cannot commit together.
pub fn app_on<L: Ledger + Clone>(
    ledger: L,
    store: Store,
    settings: &Settings,
) -> Result<(Router, DrainHandle), crate::StartError> {
    if settings.exactly_once {
        return Err(crate::StartError::NotTransactional);
    }
    let layer = layer_builder(ledger, settings).build()?;
    assemble(
        layer,
        get(list_payments).post(create_payment),
        store,
        settings,
    )
}

/// The routes around `payments` (the `/payments` route), behind `layer` and authentication,
/// and the layer's drain handle.
fn assemble<L: Ledger + Clone>(
    layer: IdempotencyLayer<L>,
    payments: axum::routing::MethodRouter<Arc<AppState>>,
    store: Store,
    settings: &Settings,
) -> Result<(Router, DrainHandle), crate::StartError> {
    let drain = layer.drain_handle();
    let document = Json(crate::openapi::document(&layer));
    let state = Arc::new(AppState {
        store,
        processor: Processor::new(&settings.processor_url, settings.processor_timeout)?,
        pause_after_write: settings.pause_after_write,
        pause_after_charge: settings.pause_after_charge,
        fail_insert_rate: settings.fail_insert_rate.clamp(0.0, 1.0),
    });
    let protected = Router::new()
        .route("/payments", payments)
        .route("/payments/{id}", get(get_payment))
        .route("/processor/charges", get(processor_charges))
        .layer(layer.clone())
        .merge(layer.operation_router())
        .layer(middleware::from_fn(auth::authenticate));
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(move || async move { document }))
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
    operation: Operation,
    mut tx: LedgerTx<L>,
    ApiJson(new): ApiJson<NewPayment>,
) -> Result<Response, Problem> {
    new.validate().map_err(Problem::invalid_payment)?;
    charge(&state, &operation, &tenant, &new).await?;
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
    operation: Operation,
    ApiJson(new): ApiJson<NewPayment>,
) -> Result<Response, Problem> {
    new.validate().map_err(Problem::invalid_payment)?;
    charge(&state, &operation, &tenant, &new).await?;
    let payment = Payment::succeeded(new);
    state
        .store
        .insert(&tenant, &payment)
        .await
        .map_err(|e| Problem::database(&e))?;
    written(&state, &payment).await;
    Ok(created(payment))
}

/// Charges `new` with the processor, keyed by the operation's `derive("charge")`: the same key
/// on every run of this payment, so a re-run (after a 5xx, a failed insert, a crash) gets the
/// processor's replay and the card is charged once. Then the test hooks between the charge and
/// the insert.
async fn charge(
    state: &AppState,
    operation: &Operation,
    tenant: &Tenant,
    new: &NewPayment,
) -> Result<(), Problem> {
    let key = operation.derive("charge");
    tracing::debug!(operation_id = %operation.operation_id(), "charging");
    state.processor.charge(&key, tenant, new).await?;
    if state.pause_after_charge {
        say("CHARGED");
        std::future::pending::<()>().await;
    }
    if state.fail_insert_rate > 0.0 && fastrand::f64() < state.fail_insert_rate {
        return Err(Problem::internal(&std::io::Error::other(
            "injected: the payment insert failed (--fail-insert-rate)",
        )));
    }
    Ok(())
}

/// Prints `line` on stdout for a test that waits for it; if stdout is gone, nobody is waiting.
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// After the payment row is written: log it, and with the `pause_after_write` test hook, say
/// `WRITTEN` on stdout and hang, for a crash test to kill the process there.
async fn written(state: &AppState, payment: &Payment) {
    tracing::info!(payment.id = %payment.id, amount = payment.amount, "payment created");
    if state.pause_after_write {
        say("WRITTEN");
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

/// `GET /processor/charges?customer=..`: the processor's charges for this tenant's customer.
async fn processor_charges(
    State(state): Shared,
    Extension(tenant): Extension<Tenant>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, Problem> {
    state
        .processor
        .charges(&tenant, &query.customer)
        .await
        .map(Json)
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
