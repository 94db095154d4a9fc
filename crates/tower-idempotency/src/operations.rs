//! The operation-status resource for the `Accepted` in-progress policy.

use std::sync::Arc;

use axum::{
    Router,
    extract::Path,
    response::{IntoResponse, Response},
    routing::get,
};
use http::{HeaderValue, header, request::Parts};
use tower_idempotency_core::{Ledger, RecordState};
use uuid::Uuid;

use crate::{
    IdempotencyLayer,
    config::{Config, Shared},
    ledger_call::Door,
    problem::{Rejection, RejectionKind, render},
    response::replay,
};

impl<L: Ledger> IdempotencyLayer<L> {
    /// The operation-status resource: `GET {operation_path}/{operation_id}` answers, for the
    /// caller's own scope (computed by the layer's scope function), `200 {"operation_id",
    /// "status": "in_progress"}` with `Retry-After` while the operation runs, `200
    /// {"operation_id", "status": "abandoned"}` once its holder's lease lapsed (a crash: send the
    /// request again with the same key), the stored response (marked `Idempotent-Replayed:
    /// true`) once it completed, and 404 otherwise: an unknown id, another scope's operation, or
    /// one that was released (its request failed and was not recorded) or expired. Merge it
    /// into the app:
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, InProgress, MemoryLedger};
    ///
    /// # async fn create() {}
    /// let layer = IdempotencyLayer::builder(MemoryLedger::new())
    ///     .with_in_progress(InProgress::Accepted)
    ///     .build()
    ///     .unwrap();
    /// let app: Router = Router::new()
    ///     .route("/payments", post(create))
    ///     .layer(layer.clone())
    ///     .merge(layer.operation_router());
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    pub fn operation_router<S>(&self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let shared = self.shared.clone();
        let path = format!("{}/{{operation_id}}", shared.config.operation_path);
        Router::new().route(
            &path,
            get(move |parts: Parts, Path(id): Path<String>| status(shared.clone(), parts, id)),
        )
    }
}

async fn status<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts, id: String) -> Response {
    let config = &shared.config;
    let not_found = || {
        let rejection = Rejection::new(
            RejectionKind::OperationNotFound,
            "no operation with this id exists for this caller: it never existed, or it was \
             released (its request failed and was not recorded) or expired. If you sent the \
             request, send it again with the same key",
        );
        render(&*config.responder, &rejection)
            .map(axum::body::Body::from)
            .into_response()
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return not_found();
    };
    let scope = Config::scope_digest(&config.scope_of(&parts));
    let ledger = &shared.ledger;
    let lookup = shared
        .call("lookup", Door::Gated, ledger.operation(&scope, id))
        .await;
    match lookup {
        Ok(None) => not_found(),
        Ok(Some(RecordState::InProgress)) => {
            let body = serde_json::json!({ "operation_id": id, "status": "in_progress" });
            let mut response = axum::Json(body).into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(config.retry_after_secs()),
            );
            response
        }
        Ok(Some(RecordState::Abandoned)) => {
            let body = serde_json::json!({
                "operation_id": id,
                "status": "abandoned",
                "detail": "the request holding this operation stopped without finishing (its \
                           lease lapsed); its effects may be partial. Send the request again \
                           with the same key: it takes the operation over",
            });
            axum::Json(body).into_response()
        }
        Ok(Some(RecordState::Completed(stored))) => {
            replay::<axum::body::Body>(stored).into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "looking up an idempotent operation failed");
            let rejection = Rejection::new(
                RejectionKind::LedgerUnavailable,
                "the idempotency ledger is unavailable",
            )
            .retry_after(config.retry_after_secs());
            render(&*config.responder, &rejection)
                .map(axum::body::Body::from)
                .into_response()
        }
    }
}
