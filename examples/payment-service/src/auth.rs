//! Bearer-token authentication: each token is a tenant of its own.
//!
//! The check runs in front of the idempotency layer, so an unauthenticated request never reaches
//! the ledger. The token itself is never stored or logged: the tenant id is a digest of it, and
//! that id is both the idempotency scope and the owner column of the `payments` table.

use std::fmt;

use axum::{
    extract::Request,
    http::{HeaderMap, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 512;

/// The authenticated caller: the first 32 hex digits of SHA-256 over its bearer token.
///
/// Put into the request extensions by [`authenticate`]; handlers extract it with
/// `Extension<Tenant>`, and the idempotency layer's scope function reads it from the parts.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    /// The tenant of `token`.
    pub fn of_token(token: &str) -> Self {
        let digest = Sha256::digest(token.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self(hex)
    }

    /// The tenant id (32 hex digits).
    pub fn id(&self) -> &str {
        &self.0
    }

    /// The idempotency scope of a request: its tenant id, or empty if it was not authenticated
    /// (which [`authenticate`] rules out for every covered route).
    pub fn scope(parts: &Parts) -> Vec<u8> {
        parts
            .extensions
            .get::<Tenant>()
            .map(|tenant| tenant.0.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// The `key` attribute of the `idempotency` span (and log lines) for a request with `token` and
/// idempotency key `key`: the first 16 hex digits of the ledger key,
/// `SHA-256("tower-idempotency/key\0" || u64_be(len(scope)) || scope || key)`, where the scope
/// is the tenant id. `None` if `key` is not a valid idempotency key.
///
/// ```
/// use payment_service::auth::key_attribute;
///
/// assert_eq!(key_attribute("tok_live_alice", "order-42").as_deref(), Some("37ef74113d1c74b4"));
/// ```
pub fn key_attribute(token: &str, key: &str) -> Option<String> {
    let key = tower_idempotency::IdempotencyKey::parse(key.as_bytes()).ok()?;
    let tenant = Tenant::of_token(token);
    Some(tower_idempotency::core::LedgerKey::new(tenant.id().as_bytes(), &key).short())
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Tenant").field(&self.0).finish()
    }
}

/// The bearer token of `headers`, if there is exactly one well-formed one.
///
/// Well-formed: `Bearer` (any case), one space, then 1 to [`MAX_TOKEN_LEN`] characters of the
/// RFC 6750 `b64token` alphabet (`A-Z a-z 0-9 - . _ ~ + /`, then `=` padding).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or("send `Authorization: Bearer <token>`")?;
    if values.next().is_some() {
        return Err("send one `Authorization` header");
    }
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII")?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("use the Bearer authentication scheme")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("use the Bearer authentication scheme");
    }
    let body = token.trim_end_matches('=');
    let valid = !body.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if valid {
        Ok(token)
    } else {
        Err("the bearer token is malformed")
    }
}

/// Middleware: 401 problem+json without a well-formed bearer token; otherwise the request goes
/// on with its [`Tenant`] in the extensions.
pub async fn authenticate(mut request: Request, next: Next) -> Response {
    let tenant = match bearer_token(request.headers()) {
        Ok(token) => Tenant::of_token(token),
        Err(detail) => return Problem::unauthorized(detail).into_response(),
    };
    request.extensions_mut().insert(tenant);
    next.run(request).await
}
