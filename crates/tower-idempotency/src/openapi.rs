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
//! [draft-ietf-httpapi-idempotency-key-header-07, section 2.5.2]: https://datatracker.ietf.org/doc/html/draft-ietf-httpapi-idempotency-key-header-07#section-2.5.2

use std::time::Duration;

use http::{HeaderName, Method, StatusCode, header};
use serde_json::{Value, json};
use utoipa::openapi::{
    OpenApi, PathItem, RefOr, Required,
    extensions::Extensions,
    header::Header,
    path::{Operation, Parameter, ParameterIn},
    response::Response,
    schema::Schema,
};
use uuid::Uuid;

pub use utoipa;

use crate::{
    IDEMPOTENT_REPLAY_BODY, IDEMPOTENT_REPLAYED, IdempotencyLayer, InProgress, LedgerFailure,
    MissingKey,
    config::{Config, StorePredicate, is_stored_by_default},
    problem::{Rejection, RejectionKind, TYPE_BASE, render},
};

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

/// One rejection as the configured responder renders it.
#[derive(Debug, Clone)]
struct Sample {
    kind: RejectionKind,
    content_type: String,
    body: Option<Value>,
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

    /// The key header parameter.
    pub fn key_parameter(&self) -> Parameter {
        let name = display_name(&self.header);
        let required = if self.key_required {
            Required::True
        } else {
            Required::False
        };
        let mut description = format!(
            "A unique key per operation, so that a retry is not executed twice: 1 to 255 \
             visible ASCII characters (0x21 to 0x7E), sent bare (`abc`) or as an RFC 8941 \
             string (`\"abc\"`, escapes `\\\"` and `\\\\`); both forms name the same key. The \
             server remembers a key for {} seconds (`x-idempotency.expiry-seconds`).",
            self.retention.as_secs()
        );
        if !self.key_required {
            description.push_str(" Without it, the request runs unprotected.");
        }
        let mut parameter = Parameter::new(name);
        parameter.parameter_in = ParameterIn::Header;
        parameter.required = required;
        parameter.description = Some(description);
        parameter.schema = Some(schema(json!({
            "type": "string",
            "minLength": 1,
            "maxLength": 512,
            "pattern": KEY_PATTERN,
            "examples": ["order-42-attempt-1"],
        })));
        parameter
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

    /// The rejections, by status code (several cases may share one).
    fn rejection_responses(&self) -> Vec<(String, Response)> {
        let mut out: Vec<(String, Response)> = Vec::new();
        for status in self.samples.iter().map(|s| s.kind.status()) {
            let code = status.as_str().to_owned();
            if out.iter().any(|(c, _)| *c == code) {
                continue;
            }
            let cases: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.kind.status() == status)
                .collect();
            out.push((code, self.response_for(&cases)));
        }
        out
    }

    fn response_for(&self, cases: &[&Sample]) -> Response {
        let description = cases
            .iter()
            .map(|s| format!("{} (`{}`)", s.kind.title(), s.kind.slug()))
            .collect::<Vec<_>>()
            .join("; ");
        let mut response = Response::new(format!("Idempotency layer: {description}."));
        let status = cases[0].kind.status();
        if matches!(
            cases[0].kind,
            RejectionKind::InProgress | RejectionKind::Accepted | RejectionKind::LedgerUnavailable
        ) {
            response.headers.insert(
                "Retry-After".to_owned(),
                header_of(
                    json!({ "type": "integer", "minimum": 1, "examples": [self.retry_after] }),
                    "Seconds to wait before retrying with the same key.",
                ),
            );
        }
        if cases[0].kind == RejectionKind::Accepted {
            response.headers.insert(
                "Location".to_owned(),
                header_of(
                    json!({ "type": "string", "examples": [format!("{}/{}", self.operation_path, Uuid::nil())] }),
                    "The operation-status resource to poll.",
                ),
            );
        }
        for content_type in cases.iter().map(|s| s.content_type.as_str()) {
            if response.content.contains_key(content_type) {
                continue;
            }
            let same: Vec<&&Sample> = cases
                .iter()
                .filter(|s| s.content_type == content_type)
                .collect();
            let mut content = utoipa::openapi::content::Content::default();
            let uris: Vec<String> = same.iter().map(|s| type_uri(s.kind)).collect();
            let default_format = same.iter().all(|s| {
                s.body
                    .as_ref()
                    .is_some_and(|b| b["type"] == type_uri(s.kind))
            });
            if default_format {
                content.schema = Some(problem_schema(&uris, status));
            }
            content.example = same.iter().find_map(|s| s.body.clone());
            response.content.insert(content_type.to_owned(), content);
        }
        response
    }

    fn operation_status_item(&self) -> PathItem {
        let mut operation = Operation::new();
        operation.summary = Some("The status of an idempotent operation".to_owned());
        operation.description = Some(format!(
            "For the caller's own scope: 200 with `status: in_progress` and `Retry-After` while \
             the operation runs, its stored response (with `{}: true`) once it completed, 404 \
             for an unknown id or another caller's operation.",
            display_name(&IDEMPOTENT_REPLAYED)
        ));
        let mut id = Parameter::new("operation_id");
        id.parameter_in = ParameterIn::Path;
        id.required = Required::True;
        id.schema = Some(schema(json!({ "type": "string" })));
        operation.parameters = Some(vec![id]);

        let mut running = Response::new("The operation is in progress (or its stored 200).");
        running.headers.insert(
            "Retry-After".to_owned(),
            header_of(
                json!({ "type": "integer", "minimum": 1 }),
                "Seconds to wait before polling again.",
            ),
        );
        let mut content = utoipa::openapi::content::Content::default();
        content.schema = Some(schema(json!({
            "type": "object",
            "required": ["operation_id", "status"],
            "properties": {
                "operation_id": { "type": "string", "format": "uuid" },
                "status": { "type": "string", "enum": ["in_progress"] },
            },
        })));
        running
            .content
            .insert("application/json".to_owned(), content);
        let responses = &mut operation.responses.responses;
        responses.insert("200".to_owned(), RefOr::T(running));
        let mut stored = Response::new("The operation's stored response, replayed.");
        add_replay_headers(&mut stored);
        responses.insert("default".to_owned(), RefOr::T(stored));
        let kinds = [
            RejectionKind::OperationNotFound,
            RejectionKind::LedgerUnavailable,
        ];
        for kind in kinds {
            let Some(sample) = self
                .samples
                .iter()
                .find(|s| s.kind == kind)
                .cloned()
                .or_else(|| (kind == RejectionKind::OperationNotFound).then(|| self.not_found()))
            else {
                continue;
            };
            responses.insert(
                kind.status().as_str().to_owned(),
                RefOr::T(self.response_for(&[&sample])),
            );
        }
        PathItem::new(utoipa::openapi::HttpMethod::Get, operation)
    }

    fn not_found(&self) -> Sample {
        self.samples
            .iter()
            .find(|s| s.kind == RejectionKind::OperationNotFound)
            .cloned()
            .unwrap_or_else(|| Sample {
                kind: RejectionKind::OperationNotFound,
                content_type: self
                    .samples
                    .first()
                    .map(|s| s.content_type.clone())
                    .unwrap_or_else(|| "application/problem+json".to_owned()),
                body: None,
            })
    }
}

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        self.apply(openapi);
    }
}

/// `kind` rendered by the configured responder.
fn sample(config: &Config, kind: RejectionKind, operation: Option<Uuid>) -> Sample {
    let mut rejection = Rejection::new(kind, kind.title());
    if let Some(id) =
        operation.filter(|_| matches!(kind, RejectionKind::InProgress | RejectionKind::Accepted))
    {
        rejection = rejection.operation(id, None);
    }
    let response = render(&*config.responder, &rejection);
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    Sample {
        kind,
        content_type,
        body: serde_json::from_slice(response.body()).ok(),
    }
}

fn type_uri(kind: RejectionKind) -> String {
    format!("{TYPE_BASE}#{}", kind.slug())
}

fn problem_schema(uris: &[String], status: StatusCode) -> RefOr<Schema> {
    schema(json!({
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": { "type": "string", "enum": uris },
            "title": { "type": "string" },
            "status": { "type": "integer", "enum": [status.as_u16()] },
            "detail": { "type": "string" },
            "operation_id": { "type": "string", "format": "uuid" },
        },
    }))
}

fn add_replay_headers(response: &mut Response) {
    response.headers.insert(
        display_name(&IDEMPOTENT_REPLAYED),
        header_of(
            json!({ "type": "string", "enum": ["true"] }),
            "Present on a replay: this is the stored response of an earlier request with the same key.",
        ),
    );
    response.headers.insert(
        display_name(&IDEMPOTENT_REPLAY_BODY),
        header_of(
            json!({ "type": "string", "enum": ["omitted"] }),
            "Present on a replay whose body was too large to store: status and headers only.",
        ),
    );
}

/// Combines the layer's `ours` into the operation's own response for the same status.
fn merge_response(existing: &mut Response, ours: Response) {
    existing.description = format!("{} Or: {}", existing.description, ours.description);
    for (name, header) in ours.headers {
        existing.headers.entry(name).or_insert(header);
    }
    for (media_type, content) in ours.content {
        match existing.content.get_mut(&media_type) {
            Some(mine) => {
                mine.schema = match (mine.schema.take(), content.schema) {
                    (Some(a), Some(b)) => Some(schema(json!({ "anyOf": [a, b] }))),
                    (a, b) => a.or(b),
                };
            }
            None => {
                existing.content.insert(media_type, content);
            }
        }
    }
}

/// `idempotency-key` as `Idempotency-Key`: header names are case-insensitive, and documents
/// conventionally capitalise them.
fn display_name(name: &HeaderName) -> String {
    name.as_str()
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn header_of(schema_json: Value, description: &str) -> Header {
    let mut header = Header::new(schema(schema_json));
    header.description = Some(description.to_owned());
    header
}

/// A schema from its JSON form; the JSON above is fixed and valid, so this does not fail, and an
/// empty schema (anything) stands in if it ever did.
fn schema(value: Value) -> RefOr<Schema> {
    serde_json::from_value(value).unwrap_or_else(|_| RefOr::T(Schema::default()))
}
