//! The headers of the contract: the key parameter, and the replay headers on stored responses.

use http::HeaderName;
use serde_json::{Value, json};
use utoipa::openapi::{
    RefOr, Required,
    header::Header,
    path::{Parameter, ParameterIn},
    response::Response,
    schema::Schema,
};

use crate::{IDEMPOTENT_REPLAY_BODY, IDEMPOTENT_REPLAYED};

use super::{Contract, KEY_PATTERN};

impl Contract {
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
}

pub(super) fn add_replay_headers(response: &mut Response) {
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

/// `idempotency-key` as `Idempotency-Key`: header names are case-insensitive, and documents
/// conventionally capitalise them.
pub(super) fn display_name(name: &HeaderName) -> String {
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

pub(super) fn header_of(schema_json: Value, description: &str) -> Header {
    let mut header = Header::new(schema(schema_json));
    header.description = Some(description.to_owned());
    header
}

/// A schema from its JSON form; the JSON above is fixed and valid, so this does not fail, and an
/// empty schema (anything) stands in if it ever did.
pub(super) fn schema(value: Value) -> RefOr<Schema> {
    serde_json::from_value(value).unwrap_or_else(|_| RefOr::T(Schema::default()))
}
