//! The layer's response body.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_idempotency_core::BoxError;

pin_project! {
    /// The body of every response that passes through the layer: the handler's own body
    /// (streamed untouched), a replayed or rejected body (bytes in memory), or a body over the
    /// store limit (the part read while trying to store it, then the rest of the stream).
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Stream { #[pin] inner: B },
        Over { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> ResponseBody<B> {
    /// A body of `bytes`.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The inner body, untouched.
    pub(crate) fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream { inner: body },
        }
    }

    /// `prefix`, then the rest of a body that was boxed to be read for storage.
    pub(crate) fn over_limit(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Over {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full { data } => f
                .debug_struct("ResponseBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream { .. } | Kind::Over { .. } => f
                .debug_struct("ResponseBody::Stream")
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Stream { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Over { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                rest.as_mut().poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { inner } => inner.is_end_stream(),
            Kind::Over { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { inner } => inner.size_hint(),
            Kind::Over { prefix, rest } => prefixed_hint(prefix, rest.size_hint()),
        }
    }
}

fn prefixed_hint(prefix: &Option<Bytes>, inner: SizeHint) -> SizeHint {
    let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
    let mut hint = SizeHint::new();
    hint.set_lower(inner.lower() + extra);
    if let Some(upper) = inner.upper() {
        hint.set_upper(upper + extra);
    }
    hint
}
