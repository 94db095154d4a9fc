//! Whether a handler's response is stored: the handler's own say, then the store predicate.

#[cfg(feature = "axum")]
use axum::response::{IntoResponseParts, ResponseParts};
use http::{HeaderMap, header, response};

use crate::config::Config;

/// A response extension by which a handler says "do not store this response, release the key":
/// the response reaches the client as it is, and a retry with the same key runs the handler
/// again, with whatever body it then carries.
///
/// Use it for answers given before any side effect, such as a validation failure (Stripe: "if
/// incoming parameters failed validation ... no idempotent result is saved"), so that a client
/// that fixes its request can reuse its key. `Cache-Control: no-store` on the response means the
/// same. Without either, the [store predicate](crate::IdempotencyLayerBuilder::with_store_predicate)
/// decides (by default a 400 is stored, and the fixed request with the same key gets 422).
///
/// ```
/// use axum::http::StatusCode;
/// use tower_idempotency::DoNotStore;
///
/// async fn create_payment(body: String) -> Result<StatusCode, (DoNotStore, StatusCode, String)> {
///     if body.is_empty() {
///         // Nothing happened yet: let the client fix the body and retry with the same key.
///         return Err((DoNotStore, StatusCode::BAD_REQUEST, "amount is missing".into()));
///     }
///     Ok(StatusCode::CREATED)
/// }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DoNotStore;

#[cfg(feature = "axum")]
impl IntoResponseParts for DoNotStore {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut parts: ResponseParts) -> Result<ResponseParts, Self::Error> {
        parts.extensions_mut().insert(self);
        Ok(parts)
    }
}

/// Whether `parts` is to be stored: not if the handler marked it [`DoNotStore`] or sent
/// `Cache-Control: no-store`; otherwise as the store predicate says for its status.
pub(crate) fn should_store(config: &Config, parts: &response::Parts) -> bool {
    if parts.extensions.get::<DoNotStore>().is_some() || no_store(&parts.headers) {
        return false;
    }
    config.should_store(parts.status)
}

/// Whether `Cache-Control` carries the `no-store` directive (RFC 9111 section 5.2.2.5;
/// directives are case-insensitive and may be spread over several header lines).
fn no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
}
