//! Reading a covered request before the ledger sees it: its key (400), its body within the
//! limit (413, checked on `Content-Length` first), and its fingerprint.

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, header, request::Parts};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_idempotency_core::{BoxError, Fingerprint, IdempotencyKey, KeyError};

use crate::{
    builder::MissingKey,
    config::Config,
    problem::{Rejection, RejectionKind},
};

/// The request's key; `Ok(None)` if it has none and the layer lets such requests through, a
/// rejection (400) if it has none otherwise, or a malformed or repeated one.
pub(crate) fn key(
    config: &Config,
    headers: &HeaderMap,
) -> Result<Option<IdempotencyKey>, Rejection> {
    match read_key(headers, &config.header) {
        Ok(Some(key)) => Ok(Some(key)),
        Ok(None) if config.missing_key == MissingKey::Allow => Ok(None),
        Ok(None) => {
            let detail = format!("send a unique `{}` header with this request", config.header);
            Err(Rejection::new(RejectionKind::MissingKey, detail))
        }
        Err(error) => Err(Rejection::new(RejectionKind::InvalidKey, error.to_string())),
    }
}

/// The key from `headers`: `Ok(None)` if absent, an error if malformed or repeated.
fn read_key(headers: &HeaderMap, name: &HeaderName) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    IdempotencyKey::parse(value.as_bytes()).map(Some)
}

/// A 413 if the body says, before it is read, that it is over `limit`: by its `Content-Length`
/// or its own size hint.
pub(crate) fn declared_too_large<B: Body>(
    headers: &HeaderMap,
    body: &B,
    limit: usize,
) -> Option<Rejection> {
    let over = content_length(headers).is_some_and(|n| n > limit as u64)
        || body.size_hint().lower() > limit as u64;
    over.then(|| too_large(limit))
}

/// Reads the whole body, up to `limit` bytes: a 413 past it, a 400 if it cannot be read.
///
/// A combinator rather than an `async fn`, so that the body is held once, inside the read, in
/// the caller's state (see `handle` in service.rs).
pub(crate) fn read_body<B>(
    body: B,
    limit: usize,
) -> impl Future<Output = Result<Bytes, Rejection>> + Send
where
    B: Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Limited::new(body, limit)
        .collect()
        .map(move |read| match read {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err(too_large(limit))
            }
            Err(_) => Err(Rejection::new(
                RejectionKind::BodyUnreadable,
                "the request body could not be read",
            )),
        })
}

fn too_large(limit: usize) -> Rejection {
    let detail = format!("the request body is larger than {limit} bytes");
    Rejection::new(RejectionKind::PayloadTooLarge, detail)
}

/// The declared length, if the request declares one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request's fingerprint: the user's function if one is set, else
/// [`Fingerprint::of_request`] over the configured headers.
pub(crate) fn fingerprint(config: &Config, parts: &Parts, body: &Bytes) -> Fingerprint {
    match &config.fingerprint {
        Some(custom) => custom(parts, body),
        None => Fingerprint::of_request(
            parts,
            &config.fingerprint_headers,
            body,
            config.canonical_json,
        ),
    }
}
