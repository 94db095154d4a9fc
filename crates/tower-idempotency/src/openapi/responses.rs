//! The rejections as responses: each case rendered by the configured responder, grouped by
//! status, with a problem schema; and merging them into an operation's own responses.

use http::{StatusCode, header};
use serde_json::{Value, json};
use utoipa::openapi::{RefOr, response::Response, schema::Schema};
use uuid::Uuid;

use crate::{
    config::Config,
    problem::{Rejection, RejectionKind, TYPE_BASE, render},
};

use super::{
    Contract,
    headers::{header_of, schema},
};

/// One rejection as the configured responder renders it.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) kind: RejectionKind,
    pub(super) content_type: String,
    pub(super) body: Option<Value>,
}

impl Contract {
    /// The rejections, by status code (several cases may share one).
    pub(super) fn rejection_responses(&self) -> Vec<(String, Response)> {
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

    pub(super) fn response_for(&self, cases: &[&Sample]) -> Response {
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
}

/// `kind` rendered by the configured responder.
pub(super) fn sample(config: &Config, kind: RejectionKind, operation: Option<Uuid>) -> Sample {
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

pub(super) fn type_uri(kind: RejectionKind) -> String {
    format!("{TYPE_BASE}#{}", kind.slug())
}

pub(super) fn problem_schema(uris: &[String], status: StatusCode) -> RefOr<Schema> {
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

/// Combines the layer's `ours` into the operation's own response for the same status.
pub(super) fn merge_response(existing: &mut Response, ours: Response) {
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
