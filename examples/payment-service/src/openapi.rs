//! `GET /openapi.json`: the service's OpenAPI 3.1 document.
//!
//! The schemas come from the service's own types (`#[derive(ToSchema)]` on [`NewPayment`],
//! [`Payment`], [`PaymentList`] and the problem body); everything about idempotency (the
//! `Idempotency-Key` parameter, the replay headers, the layer's rejections, the
//! operation-status resource, the expiry policy) is added by the layer itself,
//! [`IdempotencyLayer::openapi`], from the settings it runs with, so the document cannot say
//! something the service does not do. `scripts/schemathesis.sh` fuzzes the live service from it.

use serde::Serialize;
use serde_json::{Value, json};
use tower_idempotency::IdempotencyLayer;
use utoipa::{OpenApi as _, ToSchema, openapi::OpenApi};

use crate::store::{NewPayment, Payment};

/// The body of `GET /payments?customer=..`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentList {
    /// The customer's payments, oldest first, at most [`LIST_LIMIT`](crate::store::LIST_LIMIT).
    pub payments: Vec<Payment>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "payment-service",
        description = "A small payment API that cannot charge twice, on tower-idempotency."
    ),
    components(schemas(NewPayment, Payment, PaymentList, crate::problem::Body<'static>))
)]
struct ApiDoc;

/// The whole document, as served: [`build`], with the stateful link from a created payment to
/// `GET /payments/{id}` that fuzzers follow.
pub fn document<L>(layer: &IdempotencyLayer<L>) -> Value {
    let mut doc = serde_json::to_value(build(layer)).unwrap_or_default();
    // Added to the JSON because utoipa 5.5's `Link` serialises its fields in snake case
    // (`operation_id`), which OpenAPI does not know.
    doc["paths"]["/payments"]["post"]["responses"]["201"]["links"] = json!({
        "GetPaymentById": {
            "operationId": "getPayment",
            "parameters": { "id": "$response.body#/id" }
        }
    });
    doc
}

/// The document as utoipa's model: the service's routes and types, then the idempotency
/// layer's contract on `POST /payments` and its operation-status resource.
pub fn build<L>(layer: &IdempotencyLayer<L>) -> OpenApi {
    let mut doc = ApiDoc::openapi();
    // The routes, as app.rs mounts them. The JSON form is the document's own, so it reads as
    // the document will; the component schemas it refers to are derived above.
    let paths: Value = json!({
        "/payments": {
            "post": {
                "operationId": "createPayment",
                "summary": "Charge a customer once per Idempotency-Key",
                "security": [{ "bearer": [] }],
                "requestBody": {
                    "required": true,
                    "content": { "application/json": {
                        "schema": { "$ref": "#/components/schemas/NewPayment" }
                    } }
                },
                "responses": {
                    "201": {
                        "description": "Charged and recorded.",
                        "headers": { "Location": {
                            "description": "The new payment.",
                            "schema": { "type": "string" }
                        } },
                        "content": { "application/json": {
                            "schema": { "$ref": "#/components/schemas/Payment" }
                        } }
                    },
                    "400": problem("The body is not JSON (`malformed-json`) or not a valid payment (`invalid-payment`)."),
                    "401": unauthorized(),
                    "402": problem("The processor declined the card (`card-declined`); nothing was charged. Stored: a retry with the same key gets this answer again."),
                    "415": problem("The body is not declared `application/json` (`unsupported-media-type`)."),
                    "502": problem("The processor refused the charge request (`processor-error`). Not stored: a retry with the same key runs again, with the same charge key."),
                    "503": problem("The processor (`processor-unavailable`, `processor-busy`) or the database (`database-unavailable`) failed; the card may have been charged (the detail says). Not stored: retry with the same key, whose charge key is the same, so the processor replays rather than charging again."),
                }
            },
            "get": {
                "operationId": "listPayments",
                "summary": "A customer's payments, oldest first",
                "security": [{ "bearer": [] }],
                "parameters": [{
                    "name": "customer",
                    "in": "query",
                    "required": true,
                    "schema": { "type": "string" }
                }],
                "responses": {
                    "200": {
                        "description": "The payments.",
                        "content": { "application/json": {
                            "schema": { "$ref": "#/components/schemas/PaymentList" }
                        } }
                    },
                    "400": problem("No valid `customer` (`invalid-query`)."),
                    "401": unauthorized(),
                    "503": problem("The database is unavailable (`database-unavailable`)."),
                }
            }
        },
        "/payments/{id}": {
            "get": {
                "operationId": "getPayment",
                "summary": "One of the caller's payments",
                "security": [{ "bearer": [] }],
                "parameters": [{
                    "name": "id",
                    "in": "path",
                    "required": true,
                    "schema": { "type": "string" }
                }],
                "responses": {
                    "200": {
                        "description": "The payment.",
                        "content": { "application/json": {
                            "schema": { "$ref": "#/components/schemas/Payment" }
                        } }
                    },
                    "401": unauthorized(),
                    "404": problem("No such payment for this caller (`payment-not-found`)."),
                    "503": problem("The database is unavailable (`database-unavailable`)."),
                }
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Whether the database answers",
                "responses": {
                    "200": {
                        "description": "Healthy.",
                        "content": { "application/json": { "schema": {
                            "type": "object",
                            "required": ["status"],
                            "properties": { "status": { "type": "string", "enum": ["ok"] } }
                        } } }
                    },
                    "503": problem("The database does not answer (`unhealthy`)."),
                }
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": { "200": {
                    "description": "The OpenAPI 3.1 document.",
                    "content": { "application/json": { "schema": { "type": "object" } } }
                } }
            }
        }
    });
    // The JSON above is fixed and well-formed; `paths_are_well_formed` in the tests checks it.
    if let Ok(paths) = serde_json::from_value(paths) {
        doc.paths = paths;
    }
    let contract = layer.openapi().with_operation_status(true);
    let status_path = contract.operation_status_path();
    contract.apply_where(&mut doc, |path| path == "/payments");
    // The operation-status resource is behind authentication too.
    if let Some(get) = doc
        .paths
        .paths
        .get_mut(&status_path)
        .and_then(|item| item.get.as_mut())
    {
        get.operation_id = Some("getOperation".to_owned());
        if let Ok(security) = serde_json::from_value(json!([{ "bearer": [] }])) {
            get.security = Some(security);
        }
        if let Ok(response) = serde_json::from_value(unauthorized()) {
            get.responses.responses.insert("401".to_owned(), response);
        }
    }
    let scheme = json!({ "type": "http", "scheme": "bearer" });
    if let (Some(components), Ok(scheme)) =
        (doc.components.as_mut(), serde_json::from_value(scheme))
    {
        components
            .security_schemes
            .insert("bearer".to_owned(), scheme);
    }
    doc
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { crate::problem::CONTENT_TYPE: {
            "schema": { "$ref": "#/components/schemas/ProblemBody" }
        } }
    })
}

fn unauthorized() -> Value {
    let mut response = problem("No well-formed `Authorization: Bearer <token>` (`unauthorized`).");
    response["headers"] = json!({ "WWW-Authenticate": { "schema": { "type": "string" } } });
    response
}
