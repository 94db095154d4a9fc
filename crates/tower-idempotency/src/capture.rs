//! Capturing the handler's response for storage: its body read up to the store limit (a larger
//! one still reaches the first caller in full, and only its status and headers are stored).

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
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
}

pub(crate) async fn collect<B>(body: B, limit: usize) -> Collected<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
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
