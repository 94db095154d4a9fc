//! The scope-checked admin router over the ledger's operator calls.
use std::{sync::Arc, time::SystemTime};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Path,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{StatusCode, request::Parts};
use tower_idempotency_core::{
    FencingToken, IdempotencyKey, Ledger, LedgerError, LedgerKey, RecordInfo, ScopeDigest,
};
use uuid::Uuid;

use super::RecordView;
use crate::{IdempotencyLayer, config::Shared, ledger_call::Door, problem::admin_problem};

/// Records per `stuck` call asked of the ledger before keeping the caller's own.
const STUCK_SCAN: usize = 1_000;

impl<L: Ledger> IdempotencyLayer<L> {
    /// The operator's router over this layer's ledger, under `base` (such as
    /// `/admin/idempotency`). Every route takes the client's raw `Idempotency-Key` and
    /// digests it with the caller's scope, exactly as the layer does (the layer's scope
    /// function on the admin request's parts), so a caller reaches only its own scope's
    /// records; another scope's record is a 404.
    ///
    /// | route | answer |
    /// |---|---|
    /// | `GET {base}/keys/{key}` (`?body=true` adds the stored headers and body) | 200 [`RecordView`] |
    /// | `POST {base}/keys/{key}/release` with the token from inspect (`?token=` or `{"token": ..}`) | 200 `{"released": true, "operation_id", "key_attribute"}`; 409 `token-stale` if the token is no longer the record's |
    /// | `DELETE {base}/keys/{key}` | 200 `{"evicted": true, "record"}` |
    /// | `GET {base}/stuck?older_than_ms=0&limit=100` | 200 `{"stuck": [RecordView]}`: the caller's scope's claims whose lease lapsed at least `older_than_ms` ago |
    ///
    /// Errors are `application/problem+json` (see [`problem`](crate::problem)): 400
    /// `invalid-key`, `invalid-token` or `invalid-parameter`, 404 `record-not-found`, 409
    /// `token-stale`, 501 `unsupported` (the ledger does not offer the call), 503
    /// `ledger-unavailable`. Calls go through the layer's ledger timeout and circuit breaker.
    ///
    /// **The router only scopes; it does not authenticate.** Mount it behind the operators'
    /// authentication (and whatever sets the scope the layer reads), never on the public
    /// listener as is. A release or an evict makes the next retry run the handler again:
    /// release only a claim whose holder is gone (`lease_lapsed`).
    ///
    /// The ledger's list of stuck claims is not scoped: the router asks for up to
    /// `max(limit, 1000)` of them and keeps the caller's, so a caller may see fewer than
    /// `limit` while more than that many other scopes' claims are stuck.
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, MemoryLedger};
    ///
    /// # async fn create() {}
    /// # async fn operators_only(r: axum::extract::Request, n: axum::middleware::Next) -> axum::response::Response { n.run(r).await }
    /// let layer = IdempotencyLayer::new(MemoryLedger::new());
    /// let admin: Router = layer
    ///     .admin_router("/admin/idempotency")
    ///     .layer(axum::middleware::from_fn(operators_only)); // your operators' auth
    /// let app: Router = Router::new()
    ///     .route("/payments", post(create))
    ///     .layer(layer.clone())
    ///     .merge(admin);
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    pub fn admin_router<S>(&self, base: &str) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        admin_router(self.shared.clone(), base)
    }
}

fn admin_router<L, S>(shared: Arc<Shared<L>>, base: &str) -> Router<S>
where
    L: Ledger,
    S: Clone + Send + Sync + 'static,
{
    let base = base.trim_end_matches('/');
    let key_path = format!("{base}/keys/{{key}}");
    let (a, b, c, d) = (shared.clone(), shared.clone(), shared.clone(), shared);
    Router::new()
        .route(
            &key_path,
            get(move |parts: Parts, Path(key): Path<String>| inspect(a.clone(), parts, key))
                .delete(move |parts: Parts, Path(key): Path<String>| evict(b.clone(), parts, key)),
        )
        .route(
            &format!("{key_path}/release"),
            post(move |parts: Parts, Path(key): Path<String>, body: Bytes| {
                release(c.clone(), parts, key, body)
            }),
        )
        .route(
            &format!("{base}/stuck"),
            get(move |parts: Parts| stuck(d.clone(), parts)),
        )
}

/// The caller's scope (by the layer's scope function) and its digest.
fn scope<L>(shared: &Shared<L>, parts: &Parts) -> (Vec<u8>, ScopeDigest) {
    let scope = shared.config.scope_of(parts);
    let digest = ScopeDigest::new(&scope);
    (scope, digest)
}

/// The ledger key of the raw key `key` in the caller's scope.
fn ledger_key<L>(
    shared: &Shared<L>,
    parts: &Parts,
    key: &str,
) -> Result<(LedgerKey, ScopeDigest), Box<Response>> {
    let key = IdempotencyKey::parse(key.as_bytes()).map_err(|error| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            "invalid-key",
            "Invalid idempotency key",
            &format!("not a valid idempotency key: {error}"),
        ))
    })?;
    let (scope, digest) = scope(shared, parts);
    Ok((LedgerKey::new(&scope, &key), digest))
}

fn query<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .uri
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> Response {
    admin_problem(status, slug, title, detail)
        .map(Body::from)
        .into_response()
}

fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "record-not-found",
        "Record not found",
        "no live record for this key in the caller's scope: never used, released, evicted \
         or expired",
    )
}

fn ledger_failed(error: &LedgerError) -> Response {
    if let LedgerError::Unsupported { operation } = error {
        return problem(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            "Not supported by this ledger",
            &format!("this idempotency ledger does not support `{operation}`"),
        );
    }
    tracing::warn!(%error, "an operator call on the idempotency ledger failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "ledger-unavailable",
        "Idempotency ledger unavailable",
        "the idempotency ledger is unavailable",
    )
}

fn json(value: serde_json::Value) -> Response {
    axum::Json(value).into_response()
}

fn view(info: &RecordInfo) -> serde_json::Value {
    serde_json::to_value(RecordView::new(info, SystemTime::now())).unwrap_or_default()
}

/// The caller's live record under `key`, or the answer to give instead.
async fn lookup<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    scope: &ScopeDigest,
    with_body: bool,
) -> Result<RecordInfo, Response> {
    let ledger = &shared.ledger;
    match shared
        .call("inspect", Door::Gated, ledger.inspect(key, with_body))
        .await
    {
        // The ledger key already digests the scope; the record's own scope is checked too.
        Ok(Some(info)) if info.scope == *scope => Ok(info),
        Ok(_) => Err(not_found()),
        Err(error) => Err(ledger_failed(&error)),
    }
}

async fn inspect<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts, key: String) -> Response {
    let (key, scope) = match ledger_key(&shared, &parts, &key) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let with_body = matches!(query(&parts, "body"), Some("true" | "1" | ""));
    match lookup(&shared, &key, &scope, with_body).await {
        Ok(info) => json(view(&info)),
        Err(response) => response,
    }
}

async fn release<L: Ledger>(
    shared: Arc<Shared<L>>,
    parts: Parts,
    key: String,
    body: Bytes,
) -> Response {
    let (key, scope) = match ledger_key(&shared, &parts, &key) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let from_body = || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()?
            .get("token")?
            .as_str()
            .map(str::to_owned)
    };
    let token = query(&parts, "token").map(str::to_owned).or_else(from_body);
    let Some(token) = token.and_then(|t| Uuid::parse_str(&t).ok()) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-token",
            "Fencing token required",
            "send the token seen in the record (`?token=` or `{\"token\": ..}`)",
        );
    };
    let token = FencingToken::from_uuid(token);
    let info = match lookup(&shared, &key, &scope, false).await {
        Ok(info) => info,
        Err(response) => return response,
    };
    let stale = || {
        problem(
            StatusCode::CONFLICT,
            "token-stale",
            "The record changed",
            "the token is no longer the record's: its request completed, or another request \
             took the key over. Inspect the key again",
        )
    };
    if info.token() != Some(token) {
        return stale();
    }
    let ledger = &shared.ledger;
    match shared
        .call(
            "force_release",
            Door::Always,
            ledger.force_release(&key, token),
        )
        .await
    {
        Ok(()) => json(serde_json::json!({
            "released": true,
            "operation_id": info.operation_id,
            "key_attribute": key.short(),
        })),
        Err(LedgerError::LeaseLost) => stale(),
        Err(error) => ledger_failed(&error),
    }
}

async fn evict<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts, key: String) -> Response {
    let (key, scope) = match ledger_key(&shared, &parts, &key) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let info = match lookup(&shared, &key, &scope, false).await {
        Ok(info) => info,
        Err(response) => return response,
    };
    let ledger = &shared.ledger;
    match shared.call("evict", Door::Always, ledger.evict(&key)).await {
        Ok(true) => json(serde_json::json!({ "evicted": true, "record": view(&info) })),
        Ok(false) => not_found(),
        Err(error) => ledger_failed(&error),
    }
}

async fn stuck<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts) -> Response {
    let number = |name: &str, default: u64| match query(&parts, name) {
        None => Ok(default),
        Some(value) => value.parse::<u64>().map_err(|_| {
            Box::new(problem(
                StatusCode::BAD_REQUEST,
                "invalid-parameter",
                "Invalid parameter",
                &format!("`{name}` must be a non-negative integer"),
            ))
        }),
    };
    let (older_than, limit) = match (number("older_than_ms", 0), number("limit", 100)) {
        (Ok(older), Ok(limit)) => (older, limit),
        (Err(response), _) | (_, Err(response)) => return *response,
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let (_, scope) = scope(&shared, &parts);
    let ledger = &shared.ledger;
    let older_than = std::time::Duration::from_millis(older_than);
    match shared
        .call(
            "stuck",
            Door::Gated,
            ledger.stuck(older_than, limit.max(STUCK_SCAN)),
        )
        .await
    {
        Ok(records) => {
            let now = SystemTime::now();
            let mine: Vec<RecordView> = records
                .iter()
                .filter(|info| info.scope == scope)
                .take(limit)
                .map(|info| RecordView::new(info, now))
                .collect();
            json(serde_json::json!({ "stuck": mine }))
        }
        Err(error) => ledger_failed(&error),
    }
}
