//! Capturing the handler's response for storage: its body read up to the store limit (a larger
//! one still reaches the first caller in full, and only its status and headers are stored), or,
//! for a streaming response, not read at all.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, header, response::Parts};
use http_body::Body;
use http_body_util::BodyExt;
use tower_idempotency_core::BoxError;

/// What reading the handler's response body for storage gave.
pub(crate) enum Collected<B> {
    /// The whole body, within the store limit.
    Full(Bytes),
    /// Over the store limit: what was read, and the rest, still to stream.
    Over(Bytes, Pin<Box<B>>),
    /// The body failed.
    Failed(BoxError),
    /// A streaming response: its body is not read, it goes to the client as it is produced.
    Streaming(B),
}

/// Marks a response as streaming: put it into the response's extensions, and the layer sends
/// the body to the client as it is produced instead of reading it for storage first. Only the
/// status and headers are recorded, and the key completes as soon as the head is known; a
/// retry gets the head, marked `Idempotent-Replay-Body: omitted`.
///
/// Responses of type `text/event-stream` (server-sent events) and `application/x-ndjson` are
/// streaming without the marker.
///
/// ```
/// use axum::{body::Body, response::Response};
/// use tower_idempotency::Streaming;
///
/// fn export(body: Body) -> Response {
///     let mut response = Response::new(body);
///     response.extensions_mut().insert(Streaming);
///     response
/// }
/// # let _ = export;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streaming;

/// Content types whose bodies are streams of events rather than documents.
const STREAMING_TYPES: [&str; 2] = ["text/event-stream", "application/x-ndjson"];

/// Whether the response with this head is streaming: marked [`Streaming`], or of a streaming
/// content type (parameters such as `; charset=utf-8` ignored).
pub(crate) fn is_streaming(parts: &Parts) -> bool {
    parts.extensions.get::<Streaming>().is_some()
        || parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| {
                STREAMING_TYPES
                    .iter()
                    .any(|t| essence.trim().eq_ignore_ascii_case(t))
            })
}

/// Reads `body` for storage, up to `limit`; a `streaming` body is not read.
pub(crate) async fn collect<B>(body: B, limit: usize, streaming: bool) -> Collected<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if streaming {
        return Collected::Streaming(body);
    }
    let mut body = Box::pin(body);
    // Most handler bodies are one frame: keep it as it is, with no copy.
    let mut first: Option<Bytes> = None;
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                return Collected::Full(match first {
                    Some(only) if buffer.is_empty() => only,
                    _ => buffer.freeze(),
                });
            }
            Some(Err(error)) => return Collected::Failed(error.into()),
            Some(Ok(frame)) => {
                // Trailers are not stored and not forwarded for a buffered response.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let seen = first.as_ref().map_or(0, Bytes::len) + buffer.len() + data.len();
                if first.is_none() && buffer.is_empty() {
                    first = Some(data);
                } else {
                    if let Some(only) = first.take() {
                        buffer.extend_from_slice(&only);
                    }
                    buffer.extend_from_slice(&data);
                }
                if seen > limit {
                    let read = match first.take() {
                        Some(only) => only,
                        None => buffer.freeze(),
                    };
                    return Collected::Over(read, body);
                }
            }
        }
    }
}
