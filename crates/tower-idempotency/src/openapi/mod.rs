//! The layer's contract as OpenAPI 3.1 (feature `openapi`), for the operations it covers.
//!
//! [`IdempotencyLayer::openapi`] reads the layer's own settings into a [`Contract`], which adds
//! to an OpenAPI document (built by hand or with `#[derive(OpenApi)]`):
//!
//! - the key header parameter with its real rules: its configured name; required unless
//!   [`MissingKey::Allow`]; 1 to 255 visible ASCII characters (0x21 to 0x7E), as a bare value or
//!   an RFC 8941 sf-string (`"abc"`, escapes `\"` and `\\`), as a `pattern`;
//! - on every response the layer stores and replays, the [`IDEMPOTENT_REPLAYED`] and
//!   [`IDEMPOTENT_REPLAY_BODY`] headers;
//! - the rejections, each with the body the configured responder renders as its example and,
//!   for the default [`ProblemJson`](crate::problem::ProblemJson), a problem schema whose `type`
//!   is one of the stable URIs of [`problem`](crate::problem): 400 `missing-key` (unless the key
//!   is optional), `invalid-key` and `body-unreadable`; 413; 422; 409 with `Retry-After`; 202
//!   with `Location` and `Retry-After` under [`InProgress::Accepted`]; 503 under
//!   [`LedgerFailure::FailClosed`]; 500 `handler-failed`;
//! - the operation-status resource `GET {operation_path}/{operation_id}`
//!   ([`IdempotencyLayer::operation_router`]);
//! - the expiry policy that the IETF draft requires a resource to publish
//!   ([draft-ietf-httpapi-idempotency-key-header-07, section 2.5.2]): an `x-idempotency`
//!   extension, on each covered operation and on the document, with `expiry-seconds` (the
//!   retention) and a description.
//!
//! Every value comes from the layer's configuration, so the document cannot drift from what the
//! layer does:
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryLedger};
//! use tower_idempotency::openapi::utoipa::openapi::{
//!     HttpMethod, OpenApiBuilder, PathItem, PathsBuilder, ResponseBuilder, path::OperationBuilder,
//! };
//!
//! let layer = IdempotencyLayer::new(MemoryLedger::new());
//! let create = OperationBuilder::new()
//!     .response("201", ResponseBuilder::new().description("Created"))
//!     .build();
//! let mut doc = OpenApiBuilder::new()
//!     .paths(PathsBuilder::new().path("/payments", PathItem::new(HttpMethod::Post, create)))
//!     .build();
//! layer.openapi().apply(&mut doc);
//!
//! let json = serde_json::to_value(&doc).unwrap();
//! let post = &json["paths"]["/payments"]["post"];
//! assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
//! assert!(post["responses"]["422"].is_object());
//! assert_eq!(post["x-idempotency"]["expiry-seconds"], 86400);
//! ```
//!
//! # Why utoipa
//! [utoipa](https://docs.rs/utoipa) 5 is the most used Rust OpenAPI crate, and it is only a
//! model of the document plus optional derive macros: it depends on no web framework, so this
//! plain-tower layer can describe itself without pulling in axum (utoipa 5.5 does not build
//! without its `macros` feature, so that comes along), and a service on any framework can merge the result. Its documents are
//! OpenAPI 3.1. aide, the other well-kept choice, is built around axum's router and schemars,
//! and would tie the description to how the app is routed. The crate is re-exported as
//! [`utoipa`] so that the versions match.
//!
//! [`IDEMPOTENT_REPLAY_BODY`]: crate::IDEMPOTENT_REPLAY_BODY
//! [draft-ietf-httpapi-idempotency-key-header-07, section 2.5.2]: https://datatracker.ietf.org/doc/html/draft-ietf-httpapi-idempotency-key-header-07#section-2.5.2

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use serde_json::json;
use utoipa::openapi::{
    OpenApi, PathItem, RefOr,
    extensions::Extensions,
    path::{Operation, ParameterIn},
};
use uuid::Uuid;

pub use utoipa;

use crate::{
    IDEMPOTENT_REPLAYED, IdempotencyLayer, InProgress, LedgerFailure, MissingKey,
    config::{Config, StorePredicate, is_stored_by_default},
    problem::RejectionKind,
};

mod headers;
mod operation_status;
mod responses;

use headers::{add_replay_headers, display_name};
use responses::{Sample, merge_response, sample};

/// The name of the extension that publishes the expiry policy.
pub const EXTENSION: &str = "x-idempotency";

/// A valid key, as an ECMA-262 (and Python) regular expression: a bare value of 1 to 255
/// visible ASCII characters not starting with `"`, or an RFC 8941 sf-string whose content is 1
/// to 255 such characters, `"` and `\` escaped.
pub const KEY_PATTERN: &str =
    r#"^(?:[\x21\x23-\x7E][\x21-\x7E]{0,254}|"(?:[\x21\x23-\x5B\x5D-\x7E]|\\["\\]){1,255}")$"#;

impl<L> IdempotencyLayer<L> {
    /// This layer's contract as OpenAPI, from its settings: see [`openapi`](crate::openapi).
    #[cfg_attr(docsrs, doc(cfg(feature = "openapi")))]
    pub fn openapi(&self) -> Contract {
        Contract::of(&self.shared.config)
    }
}

/// What a layer promises, ready to add to an OpenAPI document. Made by
/// [`IdempotencyLayer::openapi`].
#[derive(Clone)]
#[must_use = "a contract does nothing until it is applied to a document"]
pub struct Contract {
    header: HeaderName,
    methods: Vec<Method>,
    key_required: bool,
    in_progress: InProgress,
    retention: Duration,
    retry_after: u64,
    operation_path: String,
    body_limit: usize,
    store: Option<StorePredicate>,
    samples: Vec<Sample>,
    operation_status: bool,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("key_required", &self.key_required)
            .field("in_progress", &self.in_progress)
            .field("retention", &self.retention)
            .field("operation_path", &self.operation_path)
            .field("operation_status", &self.operation_status)
            .finish_non_exhaustive()
    }
}

impl Contract {
    fn of(config: &Config) -> Self {
        let mut kinds = vec![RejectionKind::InvalidKey, RejectionKind::BodyUnreadable];
        if config.missing_key == MissingKey::Reject {
            kinds.insert(0, RejectionKind::MissingKey);
        }
        kinds.extend([RejectionKind::PayloadTooLarge, RejectionKind::KeyReused]);
        // 409: a duplicate under Conflict, or under Wait after its timeout; and in exactly-once
        // mode, a holder whose lease was taken over.
        if config.in_progress != InProgress::Accepted || config.transactions.is_some() {
            kinds.push(RejectionKind::InProgress);
        }
        if config.in_progress == InProgress::Accepted {
            kinds.push(RejectionKind::Accepted);
        }
        if config.ledger_failure == LedgerFailure::FailClosed {
            kinds.push(RejectionKind::LedgerUnavailable);
        }
        kinds.push(RejectionKind::HandlerFailed);
        let samples = kinds
            .into_iter()
            .map(|kind| sample(config, kind, Some(Uuid::nil())))
            .collect();
        Self {
            header: config.header.clone(),
            methods: config.methods.clone(),
            key_required: config.missing_key == MissingKey::Reject,
            in_progress: config.in_progress,
            retention: config.retention,
            retry_after: config.retry_after_secs(),
            operation_path: config.operation_path.clone(),
            body_limit: config.body_limit,
            store: config.store.clone(),
            samples,
            operation_status: config.in_progress == InProgress::Accepted,
        }
    }

    /// Whether [`apply`](Self::apply) adds the operation-status resource
    /// `GET {operation_path}/{operation_id}`. Default: only under [`InProgress::Accepted`], whose
    /// 202 points there; set it when the app mounts
    /// [`operation_router`](IdempotencyLayer::operation_router) under another policy.
    pub fn with_operation_status(mut self, on: bool) -> Self {
        self.operation_status = on;
        self
    }

    /// The path of the operation-status resource, such as `/operations/{operation_id}`.
    pub fn operation_status_path(&self) -> String {
        format!("{}/{{operation_id}}", self.operation_path)
    }

    /// Adds the contract to every operation of `doc` whose method the layer covers, the
    /// operation-status resource if [`with_operation_status`](Self::with_operation_status), and
    /// the `x-idempotency` extension to the document.
    pub fn apply(&self, doc: &mut OpenApi) {
        self.apply_where(doc, |_| true);
    }

    /// As [`apply`](Self::apply), but only on the paths for which `covered` is true: the routes
    /// the layer wraps.
    pub fn apply_where(&self, doc: &mut OpenApi, covered: impl Fn(&str) -> bool) {
        let status_path = self.operation_status_path();
        for (path, item) in doc.paths.paths.iter_mut() {
            if *path == status_path || !covered(path) {
                continue;
            }
            for operation in self.covered_operations(item) {
                self.apply_to_operation(operation);
            }
        }
        if self.operation_status {
            doc.paths
                .paths
                .insert(status_path, self.operation_status_item());
        }
        let extensions = doc.extensions.get_or_insert_with(Extensions::default);
        extensions.merge(self.extension());
    }

    fn covered_operations<'a>(&self, item: &'a mut PathItem) -> Vec<&'a mut Operation> {
        let PathItem {
            get,
            put,
            post,
            delete,
            options,
            head,
            patch,
            trace,
            ..
        } = item;
        [
            (Method::GET, get),
            (Method::PUT, put),
            (Method::POST, post),
            (Method::DELETE, delete),
            (Method::OPTIONS, options),
            (Method::HEAD, head),
            (Method::PATCH, patch),
            (Method::TRACE, trace),
        ]
        .into_iter()
        .filter(|(method, _)| self.methods.contains(method))
        .filter_map(|(_, operation)| operation.as_mut())
        .collect()
    }

    /// Adds the contract to one covered operation: the key parameter, the replay headers on
    /// every response the layer stores, the rejections, and the `x-idempotency` extension.
    pub fn apply_to_operation(&self, operation: &mut Operation) {
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        parameters.retain(|p| {
            !(p.parameter_in == ParameterIn::Header
                && p.name.eq_ignore_ascii_case(self.header.as_str()))
        });
        parameters.push(self.key_parameter());

        let responses = &mut operation.responses.responses;
        for (status, response) in responses.iter_mut() {
            let stored = status
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .is_some_and(|s| self.stores(s));
            if let (true, RefOr::T(response)) = (stored, response) {
                add_replay_headers(response);
            }
        }
        for (status, response) in self.rejection_responses() {
            match responses.get_mut(&status) {
                Some(RefOr::T(existing)) => merge_response(existing, response),
                Some(RefOr::Ref(_)) => {}
                None => {
                    responses.insert(status, RefOr::T(response));
                }
            }
        }
        operation
            .extensions
            .get_or_insert_with(Extensions::default)
            .merge(self.extension());
    }

    fn stores(&self, status: StatusCode) -> bool {
        match &self.store {
            Some(predicate) => predicate(status),
            None => is_stored_by_default(status),
        }
    }

    /// The `x-idempotency` extension: the published idempotency specification and expiry policy.
    pub fn extension(&self) -> Extensions {
        let secs = self.retention.as_secs();
        let in_progress = match self.in_progress {
            InProgress::Accepted => json!({ "policy": "accepted", "status": 202 }),
            InProgress::Wait { timeout } => json!({
                "policy": "wait",
                "timeout-milliseconds": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "status-after-timeout": 409,
            }),
            _ => json!({ "policy": "conflict", "status": 409 }),
        };
        let mut value = json!({
            "header": display_name(&self.header),
            "required": self.key_required,
            "key": "1 to 255 characters 0x21-0x7E; bare or an RFC 8941 sf-string",
            "methods": self.methods.iter().map(Method::as_str).collect::<Vec<_>>(),
            "expiry-seconds": secs,
            "description": format!(
                "A key is remembered for {secs} seconds after its request was accepted or \
                 completed (the retention). Within that time the same request with the same key \
                 gets the stored response (`{}: true`), and a different request with it gets \
                 422; after it, the key is forgotten and a request with it runs as new. \
                 Responses with a 5xx status are not stored, so a retry runs again.",
                display_name(&IDEMPOTENT_REPLAYED)
            ),
            "in-progress": in_progress,
            "retry-after-seconds": self.retry_after,
            "body-limit-bytes": self.body_limit,
            "specification": "https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/",
        });
        if self.operation_status {
            value["operation-status"] = json!(self.operation_status_path());
        }
        Extensions::builder().add(EXTENSION, value).build()
    }
}

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        self.apply(openapi);
    }
}
