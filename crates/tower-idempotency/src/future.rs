//! The layer's response future, and what happens to it when its client leaves.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::Response;

use crate::body::ResponseBody;

/// The future returned by [`Idempotency`](crate::Idempotency)'s `call`.
///
/// A named type around a boxed future (as axum's `from_fn` does), so the public signature does
/// not expose the steps inside. Dropping it (a client disconnect, or a timeout layer outside this
/// one) cancels the request only while nothing is at stake: before the key is claimed, or while
/// it waits for another request. Once a claim is in flight, the rest moves into a task of its
/// own: a claim that won for a client that is gone is released at once, and a handler that
/// started runs to its end and records its result, so a retry gets the replay.
pub struct ResponseFuture<B, E> {
    inner: Option<BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>>,
    detach: Option<Detach<Result<Response<ResponseBody<B>>, E>>>,
}

impl<B, E> ResponseFuture<B, E> {
    /// A future that is simply dropped with its client (uncovered requests).
    pub(crate) fn cancellable(
        inner: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>,
    ) -> Self {
        Self {
            inner: Some(inner),
            detach: None,
        }
    }

    /// A future that moves into a task if it is dropped while `phase` says something is at
    /// stake.
    pub(crate) fn detachable(
        inner: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>,
        phase: Phase,
    ) -> Self
    where
        B: Send + 'static,
        E: Send + 'static,
    {
        Self {
            inner: Some(inner),
            detach: Some(Detach {
                phase,
                spawn: spawn_detached::<Result<Response<ResponseBody<B>>, E>>,
            }),
        }
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            // Polled after it finished: a caller bug. Never answer twice.
            return Poll::Pending;
        };
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.inner = None;
        Poll::Ready(output)
    }
}

impl<B, E> Drop for ResponseFuture<B, E> {
    fn drop(&mut self) {
        let (Some(inner), Some(detach)) = (self.inner.take(), self.detach.as_ref()) else {
            return;
        };
        if detach.phase.detach() {
            (detach.spawn)(inner);
        }
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// How to move an unfinished request into a task. A function pointer, instantiated in `call`
/// where the output is known to be `Send + 'static`: `Drop` cannot ask for those bounds.
struct Detach<T> {
    phase: Phase,
    spawn: fn(BoxFuture<'static, T>),
}

fn spawn_detached<T: Send + 'static>(pending: BoxFuture<'static, T>) {
    match tokio::runtime::Handle::try_current() {
        // Nobody is waiting for the answer any more; the ledger gets it.
        Ok(runtime) => drop(runtime.spawn(async move { drop(pending.await) })),
        Err(_) => tracing::error!(
            "an idempotent request was dropped outside a tokio runtime and could not finish"
        ),
    }
}

/// Where a covered request is, shared between its future (which moves it on) and its
/// [`ResponseFuture`] (which reads it when dropped). The request's future and the drop never run
/// at the same time (a future is not dropped while it is polled), so this is a handshake, not a
/// race: the drop sets `DETACHED`, and the future, resumed in its new task, sees it.
#[derive(Clone)]
pub(crate) struct Phase(Arc<AtomicU8>);

/// Nothing at stake: dropping cancels the request (reading the body, waiting for another
/// request, or running a fail-open handler with no claim).
const IDLE: u8 = 0;
/// A claim is in flight: it may take effect in the ledger before its answer arrives.
const CLAIMING: u8 = 1;
/// The key is held and the handler runs: it must finish and record its result.
const RUNNING: u8 = 2;
/// Set by the drop: the client is gone.
const DETACHED: u8 = 4;

impl Phase {
    pub(crate) fn new() -> Self {
        Self(Arc::new(AtomicU8::new(IDLE)))
    }

    fn set(&self, phase: u8) {
        // Keep DETACHED: once gone, the client does not come back.
        let detached = self.0.load(Ordering::Acquire) & DETACHED;
        self.0.store(phase | detached, Ordering::Release);
    }

    /// The request goes on with nothing at stake.
    pub(crate) fn idle(&self) {
        self.set(IDLE);
    }

    /// A claim is about to be sent.
    pub(crate) fn claiming(&self) {
        self.set(CLAIMING);
    }

    /// The key was won: the handler is about to run.
    pub(crate) fn running(&self) {
        self.set(RUNNING);
    }

    /// Whether the client left (the request goes on in a task of its own).
    pub(crate) fn detached(&self) -> bool {
        self.0.load(Ordering::Acquire) & DETACHED != 0
    }

    /// Marks the client gone; whether the rest must run anyway.
    fn detach(&self) -> bool {
        self.0.fetch_or(DETACHED, Ordering::AcqRel) & (CLAIMING | RUNNING) != 0
    }
}
