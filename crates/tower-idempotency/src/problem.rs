//! What the layer answers when it does not run the handler: RFC 9457 problem details.
//!
//! Every case has a stable `type` URI: this page, with the case's anchor. The body never contains
//! the idempotency key.
//!
//! # missing-key
//! 400: the covered request has no `Idempotency-Key`.
//!
//! # invalid-key
//! 400: the key is empty, longer than 255 characters, has a character outside visible ASCII,
//! is a malformed quoted string, or the header is repeated.
//!
//! # body-unreadable
//! 400: the request body could not be read (the client aborted, a framing error).
//!
//! # payload-too-large
//! 413: the request body is over the layer's limit; checked on `Content-Length` before reading.
//!
//! # key-reused
//! 422: the key was already used with a different request (method, path, query, fingerprinted
//! headers or body).
//!
//! # request-in-progress
//! 409: a request with this key is still running; retry after `Retry-After` seconds.
//!
//! # operation-accepted
//! 202 (not an error): a request with this key is running; poll `Location`.
//!
//! # operation-not-found
//! 404: no operation with this id in the caller's scope: it never existed, or it was released
//! (its request failed and was not recorded) or expired. Whoever sent the request may send it
//! again with the same key.
//!
//! # ledger-unavailable
//! 503: the idempotency ledger could not be reached, so the request was not run; or, in
//! exactly-once mode, committing the handler's writes with the result failed, and the commit
//! may or may not have landed. Either way, retry with the same key.
//!
//! # overloaded
//! 503: the layer holds as many requests as its in-flight cap allows; the request was not run.
//! Retry after `Retry-After` seconds.
//!
//! # shutting-down
//! 503: the server is draining for shutdown; the request was not run. Retry after
//! `Retry-After` seconds (another instance, or this one after its restart, will take it).
//!
//! # handler-failed
//! 500: the handler panicked or its response body failed; the key was released, so a retry runs
//! the handler again.
//!
//! # outcome-unknown
//! 500: the handler answered with a success status, then its response body failed. Its side
//! effects may well be done, so this answer is stored and replayed to every retry with the same
//! key: check the resource's state, or send a new request with a new key.
//!
//! # Admin router
//! The operator's router (`IdempotencyLayer::admin_router`, feature `axum`) answers
//! `invalid-key` (400) and `ledger-unavailable` (503) as above, and:
//!
//! # record-not-found
//! 404: no live record for this key in the caller's scope: never used, released, evicted or
//! expired, or another scope's.
//!
//! # invalid-token
//! 400: a release without a fencing token (a UUID, as inspect shows it).
//!
//! # invalid-parameter
//! 400: a query parameter that is not a non-negative integer.
//!
//! # token-stale
//! 409: the release's token is no longer the record's (it completed, or another request took
//! it over); nothing was changed. Inspect the key again.
//!
//! # unsupported
//! 501: the ledger does not offer this operator call.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use uuid::Uuid;

/// Where the `type` URIs point: this module's documentation.
pub const TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html";

/// Why the layer answered without running the handler (or, for
/// [`HandlerFailed`](Self::HandlerFailed), why the handler's own answer was replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No key on a covered request.
    MissingKey,
    /// A malformed or repeated key.
    InvalidKey,
    /// The request body could not be read.
    BodyUnreadable,
    /// The request body is over the limit.
    PayloadTooLarge,
    /// The key was used with a different request.
    KeyReused,
    /// The first request with this key is still running (Conflict policy, or Wait timed out).
    InProgress,
    /// The first request with this key is still running (Accepted policy).
    Accepted,
    /// No such operation in the caller's scope.
    OperationNotFound,
    /// The ledger failed, timed out, or its circuit breaker is open.
    LedgerUnavailable,
    /// The layer's in-flight cap is reached.
    Overloaded,
    /// The layer is draining for shutdown.
    ShuttingDown,
    /// The handler panicked, or its response body failed.
    HandlerFailed,
    /// The handler answered with a success status, then its response body failed.
    OutcomeUnknown,
}

impl RejectionKind {
    /// The case's anchor in [`TYPE_BASE`], such as `key-reused`.
    pub fn slug(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::BodyUnreadable => "body-unreadable",
            Self::PayloadTooLarge => "payload-too-large",
            Self::KeyReused => "key-reused",
            Self::InProgress => "request-in-progress",
            Self::Accepted => "operation-accepted",
            Self::OperationNotFound => "operation-not-found",
            Self::LedgerUnavailable => "ledger-unavailable",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting-down",
            Self::HandlerFailed => "handler-failed",
            Self::OutcomeUnknown => "outcome-unknown",
        }
    }

    /// The status code answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InProgress => StatusCode::CONFLICT,
            Self::Accepted => StatusCode::ACCEPTED,
            Self::OperationNotFound => StatusCode::NOT_FOUND,
            Self::LedgerUnavailable | Self::Overloaded | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::HandlerFailed | Self::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, fixed, human-readable summary.
    pub fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key required",
            Self::InvalidKey => "Invalid idempotency key",
            Self::BodyUnreadable => "Request body could not be read",
            Self::PayloadTooLarge => "Request body too large",
            Self::KeyReused => "Idempotency key reused with a different request",
            Self::InProgress => "A request with this idempotency key is in progress",
            Self::Accepted => "Request accepted and in progress",
            Self::OperationNotFound => "Operation not found",
            Self::LedgerUnavailable => "Idempotency ledger unavailable",
            Self::Overloaded => "Too many requests in flight",
            Self::ShuttingDown => "Shutting down",
            Self::HandlerFailed => "Request failed",
            Self::OutcomeUnknown => "Outcome unknown",
        }
    }
}

/// One rejection, with what a response needs to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Which case.
    pub kind: RejectionKind,
    /// An explanation for this occurrence (never the key itself).
    pub detail: String,
    /// Seconds for `Retry-After`, where the case has one.
    pub retry_after: Option<u64>,
    /// `Location` of the operation-status resource, for [`RejectionKind::Accepted`].
    pub location: Option<String>,
    /// The operation, where one exists.
    pub operation_id: Option<Uuid>,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
            location: None,
            operation_id: None,
        }
    }

    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub(crate) fn operation(mut self, id: Uuid, location: Option<String>) -> Self {
        self.operation_id = Some(id);
        self.location = location;
        self
    }
}

/// Renders a [`Rejection`] as a response. Implemented for [`ProblemJson`] (the default) and for
/// every `Fn(&Rejection) -> Response<Bytes>`, so a custom format is a closure:
///
/// ```
/// use bytes::Bytes;
/// use http::Response;
/// use tower_idempotency::{IdempotencyLayer, MemoryLedger, problem::Rejection};
///
/// let layer = IdempotencyLayer::builder(MemoryLedger::new())
///     .with_responder(|r: &Rejection| {
///         Response::builder()
///             .status(r.kind.status())
///             .body(Bytes::from(r.kind.slug()))
///             .unwrap()
///     })
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub trait Responder: Send + Sync + 'static {
    /// The response for `rejection`. The layer adds `Retry-After` and `Location` from the
    /// rejection if the response does not set them.
    fn respond(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> Responder for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The default responder: `application/problem+json` per RFC 9457, with `type`, `title`,
/// `status`, `detail`, and `operation_id` where there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    operation_id: Option<Uuid>,
}

impl Responder for ProblemJson {
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        let status = rejection.kind.status();
        let body = Body {
            type_: format!("{TYPE_BASE}#{}", rejection.kind.slug()),
            title: rejection.kind.title(),
            status: status.as_u16(),
            detail: &rejection.detail,
            operation_id: rejection.operation_id,
        };
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Bytes::from(json));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// A problem+json answer of the admin router (`IdempotencyLayer::admin_router`), with the
/// `type` anchor `slug` in [`TYPE_BASE`].
#[cfg(feature = "axum")]
pub(crate) fn admin_problem(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
) -> Response<Bytes> {
    let body = Body {
        type_: format!("{TYPE_BASE}#{slug}"),
        title,
        status: status.as_u16(),
        detail,
        operation_id: None,
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(Bytes::from(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// Renders `rejection` with `responder`, adding `Retry-After` and `Location` when the responder
/// left them out.
pub(crate) fn render(responder: &dyn Responder, rejection: &Rejection) -> Response<Bytes> {
    let mut response = responder.respond(rejection);
    let headers = response.headers_mut();
    if let Some(secs) = rejection.retry_after {
        headers
            .entry(header::RETRY_AFTER)
            .or_insert_with(|| HeaderValue::from(secs));
    }
    if let Some(location) = rejection
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        headers.entry(header::LOCATION).or_insert(location);
    }
    response
}
