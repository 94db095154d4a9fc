//! RFC 9457 problem details for every error the service answers itself.
//!
//! The idempotency layer renders its own rejections (400 missing/invalid key, 409, 422, 503...)
//! in the same format, with `type` URIs under the `tower-idempotency` docs. The service's own
//! cases have `type` `/problems/{slug}`, a relative reference (RFC 9457 section 3.1.1) to:
//!
//! | slug | status | when |
//! |---|---|---|
//! | `unauthorized` | 401 | no `Authorization: Bearer <token>`, or a malformed token |
//! | `malformed-json` | 400 | the body is not JSON (or a number out of range, such as `1e400`) |
//! | `invalid-payment` | 400 | wrong types, missing or unknown fields, a value out of bounds |
//! | `invalid-query` | 400 | `GET /payments` without a valid `customer` |
//! | `unsupported-media-type` | 415 | the body is not declared `application/json` |
//! | `payment-not-found` | 404 | no payment with this id for this tenant |
//! | `not-found` | 404 | no such route |
//! | `method-not-allowed` | 405 | the route exists, the method does not |
//! | `card-declined` | 402 | the processor declined the card (stored: the same key gets it again) |
//! | `processor-unavailable` | 503 | the processor failed or did not answer: the card may have been charged, and a retry with the same key sends the processor the same charge key |
//! | `processor-busy` | 503 | an earlier attempt of this payment is still in progress at the processor |
//! | `processor-error` | 502 | the processor refused the charge request |
//! | `database-unavailable` | 503 | the database was unreachable (connection lost, pool exhausted, locked); the payment was not recorded |
//! | `internal` | 500 | the database failed otherwise |
//!
//! The 400 `malformed-json` and `invalid-payment` and the 415 are answered before any side
//! effect and marked [`DoNotStore`](tower_idempotency::DoNotStore): the idempotency layer
//! releases the key, so the client can fix its request and send it with the same key.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tower_idempotency_sqlx::sqlx;

/// The media type of every error body.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// One problem: rendered as `application/problem+json` with `type`, `title`, `status`, `detail`.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    not_stored: bool,
    /// The idempotency layer's own case, when the service answers one of them itself: its
    /// `type` URI is then the layer's, as the OpenAPI document publishes it.
    layer_case: bool,
}

/// The problem body, as the document describes it (`ProblemBody`).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ProblemBody)]
pub(crate) struct Body<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    /// A problem with `status`, the `type` `/problems/{slug}`, a fixed `title` and a `detail`
    /// about this occurrence.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            headers: Vec::new(),
            not_stored: false,
            layer_case: false,
        }
    }

    /// Marks the answer [`DoNotStore`](tower_idempotency::DoNotStore): the idempotency layer
    /// releases the key instead of storing it. Only for answers given before any side effect.
    pub fn not_stored(mut self) -> Self {
        self.not_stored = true;
        self
    }

    /// Adds a response header, such as `WWW-Authenticate` or `Retry-After`.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401: the request has no usable bearer token.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            detail,
        )
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 400: the payment is not valid. Answered before any side effect, so not stored.
    pub fn invalid_payment(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-payment",
            "The payment is not valid",
            detail,
        )
        .not_stored()
    }

    /// 404: no such payment for this tenant.
    pub fn payment_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "payment-not-found",
            "Payment not found",
            "no payment with this id exists for this caller",
        )
    }

    /// 500: the database failed. The error is logged, not sent.
    pub fn internal(error: &dyn std::error::Error) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the payment could not be recorded; the card may have been charged. A retry with the \
             same Idempotency-Key runs it again and sends the processor the same charge key, so \
             the card is charged at most once",
        )
    }

    /// A database error: 503 `database-unavailable` with `Retry-After: 1` if it is one a retry
    /// can get past (the connection was lost or refused, the pool timed out, SQLite was busy),
    /// otherwise 500 `internal`. Either way the idempotency layer does not store a 5xx and
    /// releases the key, so the retry runs the handler again.
    pub fn database(error: &sqlx::Error) -> Self {
        if !transient(error) {
            return Self::internal(error);
        }
        tracing::warn!(%error, "the database is unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database-unavailable",
            "The database is unavailable",
            "the payment was not recorded; the card may have been charged. A retry with the same \
             Idempotency-Key sends the processor the same charge key, so the card is charged at \
             most once",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// One of the idempotency layer's own cases (`kind`), answered by the service itself, with
    /// the layer's `type` URI, title and status.
    pub fn idempotency(
        kind: tower_idempotency::problem::RejectionKind,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            layer_case: true,
            ..Self::new(kind.status(), kind.slug(), kind.title(), detail)
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body {
            r#type: if self.layer_case {
                format!("{}#{}", tower_idempotency::problem::TYPE_BASE, self.slug)
            } else {
                format!("/problems/{}", self.slug)
            },
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        if self.not_stored {
            response
                .extensions_mut()
                .insert(tower_idempotency::DoNotStore);
        }
        response
    }
}

/// The fallback for unknown routes: 404 problem+json.
pub async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no resource at this path",
    )
}

/// The fallback for a known route with another method: 405 problem+json.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this resource does not support this method",
    )
}

/// Whether `error` is one of the database being away rather than of the statement: I/O, the
/// pool, a PostgreSQL connection exception (class 08) or operator intervention (class 57, such
/// as `pg_terminate_backend`), SQLite busy or locked.
fn transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // PostgreSQL SQLSTATEs; SQLite's primary result codes 5 (BUSY) and 6 (LOCKED),
            // possibly extended (code + 256 * n).
            code.starts_with("08")
                || code.starts_with("57")
                || code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
        }),
        _ => false,
    }
}
