//! The operation-status resource, `GET {operation_path}/{operation_id}`.

use serde_json::json;
use utoipa::openapi::{
    PathItem, RefOr, Required,
    path::{Operation, Parameter, ParameterIn},
    response::Response,
};

use crate::{IDEMPOTENT_REPLAYED, problem::RejectionKind};

use super::{
    Contract,
    headers::{add_replay_headers, display_name, header_of, schema},
    responses::Sample,
};

impl Contract {
    pub(super) fn operation_status_item(&self) -> PathItem {
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

    pub(super) fn not_found(&self) -> Sample {
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
