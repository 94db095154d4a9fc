//! The layer's response future.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::Response;

use crate::body::ResponseBody;

/// The future returned by [`Idempotency`](crate::Idempotency)'s `call`.
///
/// A named type around a boxed future (as axum's `from_fn` does), so the public signature does
/// not expose the steps inside. Dropping it (a client disconnect) does not cancel a handler that
/// already started: the rest of it moves into a task of its own and records its result.
pub struct ResponseFuture<B, E> {
    pub(crate) inner: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
