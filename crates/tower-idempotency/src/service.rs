//! The service: one covered request from key to stored response.

use std::{
    fmt,
    panic::AssertUnwindSafe,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{FutureExt, TryFutureExt, future::Either};
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_idempotency_core::{
    BoxError, Claim, ClaimRequest, FencingToken, Ledger, LedgerError, LedgerKey,
};
use tower_service::Service;
use tracing::{Instrument, field::Empty};

use crate::{
    Outcome,
    answer::{
        answer, handler_failed, ledger_failed, outcome_unknown, refused, reject, unavailable,
    },
    body::ResponseBody,
    builder::InProgress,
    capture::{Collected, collect, is_streaming},
    config::{Config, Shared},
    drain::Ticket,
    duplicate::settle_existing,
    future::{Phase, ResponseFuture},
    intake,
    lease::{self, LeaseClock, abandon, complete, release, renewing},
    ledger_call::Door,
    response::to_stored,
    transaction::commit,
};

/// The middleware service that [`IdempotencyLayer`](crate::IdempotencyLayer) wraps around a
/// handler. Its error is the inner service's own: every failure of its own (a bad key, a ledger
/// outage, a panic) becomes a response.
pub struct Idempotency<S, L> {
    inner: S,
    shared: Arc<Shared<L>>,
}

impl<S, L> Idempotency<S, L> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<L>>) -> Self {
        Self { inner, shared }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, without the layer.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, L> Clone for Idempotency<S, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, L> fmt::Debug for Idempotency<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, L, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Take the service that was polled ready and leave a clone in its place:
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        if !shared.config.covers(request.method()) {
            let response = inner.call(request);
            return ResponseFuture::cancellable(Box::pin(async move {
                Ok(response.await?.map(ResponseBody::stream))
            }));
        }
        // Counted from here until its result is recorded, in a task of its own if the client
        // leaves (the ticket moves with the future), so that a drain waits for it.
        let ticket = match shared.gate.enter() {
            Ok(ticket) => ticket,
            Err(why) => {
                let response = refused(&shared, why);
                return ResponseFuture::cancellable(Box::pin(async move { Ok(response) }));
            }
        };
        let span = tracing::info_span!(
            "idempotency",
            outcome = Empty,
            key = Empty,
            operation_id = Empty,
            ledger = shared.ledger.name(),
            // i64, not u64: tracing-opentelemetry exports u64 fields as strings.
            lease_ms = shared.config.lease.as_millis() as i64,
            takeover = Empty,
        );
        let phase = Phase::new();
        let (parts, body) = request.into_parts();
        ResponseFuture::detachable(
            Box::pin(
                handle(shared, inner, Box::new(parts), body, phase.clone(), ticket)
                    .instrument(span),
            ),
            phase,
        )
    }
}

type Result<T, E> = std::result::Result<T, E>;

/// One covered request, from its key to its answer; a won key goes on in [`run`].
///
/// Written for the size of its state, which every request allocates and moves:
/// - A plain function returning an `async move` block, not a chain of `async fn`s: each
///   `async fn` keeps a second copy of its arguments in its state, and each nested one adds its
///   own. The chain this replaces made 6 KB of futures per request.
/// - Rare paths (a bypass, a ledger failure, waiting, a failed handler) box their own futures,
///   so that they cost nothing here.
/// - The request head is boxed (224 bytes) and the handler's part is a box of its own, so this
///   future is 0.9 KB: under the size where glibc's allocator stops using its per-thread cache
///   (about 1 KB; larger requests also consolidate its free lists, which a profile showed at
///   15 % of a fresh request). A replay or a rejection allocates nothing larger.
/// - The ledger's claim future is held inline, so a ledger keeps it small (`Ledger`'s docs): the
///   shipped ones box their client library's futures. Unboxed, PostgreSQL's made this future
///   1.6 KB and Redis's 4.7 KB, and a `CachedLedger` hit carried its inner ledger's.
///
/// Sizes and timings are in docs/benchmarks.md ("One future per request", "Issue 18, fifth
/// pass").
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice (see above)"
)]
fn handle<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    mut inner: S,
    parts: Box<http::request::Parts>,
    body: ReqBody,
    phase: Phase,
    ticket: Ticket,
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>> + Send + 'static
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let _ticket = ticket;
        let config = &shared.config;
        let key = match intake::key(config, &parts.headers) {
            Ok(Some(key)) => key,
            Ok(None) => {
                // No key, and the layer lets such requests through unprotected.
                let request = Request::from_parts(*parts, body);
                let response = Box::pin(inner.call(request)).await?;
                return Ok(answer(
                    &shared,
                    Outcome::Bypassed,
                    response.map(ResponseBody::stream),
                ));
            }
            Err(rejection) => return Ok(reject(&shared, Outcome::Rejected, rejection)),
        };
        if let Some(rejection) =
            intake::declared_too_large(&parts.headers, &body, config.body_limit)
        {
            return Ok(reject(&shared, Outcome::Rejected, rejection));
        }
        let body = match intake::read_body(body, config.body_limit).await {
            Ok(body) => body,
            Err(rejection) => return Ok(reject(&shared, Outcome::Rejected, rejection)),
        };

        // Scoped, so that the raw key and scope are not kept in this future's state (nor is a
        // handle on the span, which `Span::current()` finds while this future runs).
        let (ledger_key, scope) = {
            let scope = config.scope_of(&parts);
            let ledger_key = LedgerKey::new(&scope, &key);
            drop(key);
            (ledger_key, Config::scope_digest(&scope))
        };
        tracing::Span::current().record("key", tracing::field::display(&ledger_key));
        let fingerprint = intake::fingerprint(config, &parts, &body);

        let ledger = &shared.ledger;
        let telemetry = &config.telemetry;
        let deadline = match config.in_progress {
            InProgress::Wait { timeout } => Some(Instant::now() + timeout),
            _ => None,
        };
        let mut waited = false;
        let mut wait_started: Option<Instant> = None;
        let mut claimed_at;
        let lease = loop {
            let claim = ClaimRequest::new(
                ledger_key,
                scope,
                fingerprint,
                config.lease,
                config.retention,
            );
            // From here until the claim's answer, a client disconnect does not cancel this
            // future: the claim can take effect before its answer arrives (see `Phase`).
            phase.claiming();
            // The lease is counted from before the claim is sent: never later than the
            // ledger's own count.
            claimed_at = Instant::now();
            // In exactly-once mode the ledger may answer before the claim is durable: the
            // handler's commit makes it so (`TransactionalLedger::claim_before_transaction`).
            let call = match &config.transactions {
                Some(transactions) => Either::Left(transactions.claim(&claim)),
                None => Either::Right(ledger.claim(&claim)),
            };
            let claimed = shared.call("claim", Door::Gated, call).await;
            if let Err(LedgerError::Timeout { .. }) = claimed {
                // It may have taken effect after all: give the key back rather than leave it
                // claimed with no handler (whether or not the client is still there).
                let lease_ends = LeaseClock::new(config, claimed_at).expires;
                lease::release_timed_out_claim(shared.clone(), ledger_key, claim.token, lease_ends);
            }
            if phase.detached() {
                // The client left while the claim was answered: give back a key won for nobody,
                // rather than leave it claimed with no handler until its lease expires.
                if let Ok(Claim::Acquired(lease)) = claimed {
                    tracing::debug!("the client left during its claim; releasing the key");
                    Box::pin(release(&shared, &ledger_key, lease.token)).await;
                }
                return Ok(handler_failed(&shared));
            }
            let existing = match claimed {
                Ok(Claim::Acquired(lease)) => break lease,
                Ok(Claim::Existing(existing)) => existing,
                Err(error) => {
                    phase.idle();
                    let request = Request::from_parts(*parts, ReqBody::from(body));
                    return Box::pin(ledger_failed(&shared, inner, request, error)).await;
                }
            };
            phase.idle();
            tracing::Span::current().record(
                "operation_id",
                tracing::field::display(existing.operation_id),
            );
            match settle_existing(&shared, existing, fingerprint, waited, deadline) {
                Ok(response) => {
                    if let Some(started) = wait_started {
                        let outcome = response.extensions().get::<Outcome>().copied();
                        telemetry.waited(started.elapsed(), outcome.unwrap_or(Outcome::Waited));
                    }
                    return Ok(response);
                }
                Err(deadline) => {
                    waited = true;
                    wait_started.get_or_insert_with(Instant::now);
                    let now = Instant::now();
                    let wait = ledger.wait_for_change(&ledger_key, deadline - now);
                    // Bounded here too: a hung ledger must not hold a waiting duplicate.
                    let bounded =
                        tokio::time::timeout(deadline - now + config.ledger_timeout(), wait);
                    let _ = Box::pin(telemetry.ledger(ledger.name(), "wait", bounded)).await;
                }
            }
        };

        // The key is ours. Until its result is recorded, a disconnect no longer cancels the
        // request: the handler runs between its side effects and the record of them.
        phase.running();
        tracing::Span::current()
            .record("operation_id", tracing::field::display(lease.operation_id));
        if lease.taken_over {
            telemetry.takeover();
        }
        if let Some(started) = wait_started {
            telemetry.waited(started.elapsed(), Outcome::Executed);
        }
        // Counted until the result is recorded or released: `run` below, in this future, which
        // a disconnect moves into a task of its own rather than drop.
        let _in_flight = telemetry.in_flight();
        let token = lease.token;
        // The handler's downstream keys derive from the ledger key: the same on every run.
        let mut parts = parts;
        crate::downstream::Operation::new(ledger_key, lease.operation_id)
            .expose(&mut parts.extensions);
        // The rest in a box of its own (1.5 KB): a replay, a conflict or a rejection never
        // allocates the handler's part of the state.
        Box::pin(run(
            shared, inner, parts, body, ledger_key, token, claimed_at,
        ))
        .await
    }
}

/// The key is ours: open the transaction (in exactly-once mode), run the handler, record its
/// response. Boxed by `handle` (see there).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice (see `handle`)"
)]
fn run<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    mut inner: S,
    mut parts: Box<http::request::Parts>,
    body: Bytes,
    ledger_key: LedgerKey,
    token: FencingToken,
    claimed_at: Instant,
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>> + Send + 'static
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let config = &shared.config;
        let mut clock = LeaseClock::new(config, claimed_at);
        let transaction = match &config.transactions {
            None => None,
            Some(driver) => {
                // Under renewal: waiting for a pooled connection must not let the lease lapse.
                let begin = std::pin::pin!(shared.call("begin", Door::Gated, driver.begin()));
                match Box::pin(renewing(&shared, &ledger_key, token, &mut clock, begin)).await {
                    Ok(handle) => {
                        handle.expose(&mut parts.extensions);
                        Some(handle)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "opening the handler's transaction failed; releasing the key");
                        Box::pin(release(&shared, &ledger_key, token)).await;
                        let rejection = unavailable(config.retry_after_secs());
                        return Ok(reject(&shared, Outcome::LedgerError, rejection));
                    }
                }
            }
        };

        // The handler and the reading of its body, as combinators rather than an async block,
        // so that the handler's future is held once, in place; scoped, so that it and its
        // outcome take no room in this future's state past this point.
        let (parts, collected) = {
            let store_limit = config.store_limit;
            let request = Request::from_parts(*parts, ReqBody::from(body));
            // `call` itself runs inside the caught future: a service that panics before
            // returning its future must release the key too.
            let call = futures_util::future::lazy(move |_| inner.call(request)).flatten();
            let mut handler = std::pin::pin!(
                AssertUnwindSafe(call.map_ok(Response::into_parts).and_then(
                    move |(parts, body)| {
                        let streaming = is_streaming(&parts);
                        collect(body, store_limit, streaming)
                            .map(move |collected| Ok((parts, collected)))
                    }
                ))
                .catch_unwind()
            );
            match renewing(&shared, &ledger_key, token, &mut clock, handler.as_mut()).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    Box::pin(abandon(&shared, &ledger_key, token, transaction)).await;
                    return Err(error);
                }
                Err(_panic) => {
                    tracing::error!("the idempotent handler panicked; releasing its key");
                    Box::pin(abandon(&shared, &ledger_key, token, transaction)).await;
                    return Ok(answer(&shared, Outcome::Executed, handler_failed(&shared)));
                }
            }
        };
        let (body, stored_body, omitted) = match collected {
            Collected::Full(body) => (ResponseBody::full(body.clone()), body, false),
            Collected::Over(read, rest) => {
                (ResponseBody::over_limit(read, rest), Bytes::new(), true)
            }
            // Recorded with its head alone, so that the key completes before the stream ends.
            Collected::Streaming(body) => (ResponseBody::stream(body), Bytes::new(), true),
            // After a success head the handler's side effects are likely done: outside
            // exactly-once mode (where they roll back) a retry must not run them again.
            Collected::Failed(error)
                if transaction.is_none()
                    && parts.status.is_success()
                    && config.should_store(parts.status) =>
            {
                tracing::error!(%error, "the idempotent handler's response body failed after a success head; storing outcome-unknown");
                let (parts, body) = outcome_unknown(&shared).into_parts();
                let stored = to_stored(&parts, body.clone(), false, &config.deny_headers);
                complete(&shared, &ledger_key, token, &stored, &clock).await;
                let response = Response::from_parts(parts, ResponseBody::full(body));
                return Ok(answer(&shared, Outcome::Executed, response));
            }
            Collected::Failed(error) => {
                tracing::error!(%error, "the idempotent handler's response body failed; releasing its key");
                Box::pin(abandon(&shared, &ledger_key, token, transaction)).await;
                return Ok(answer(&shared, Outcome::Executed, handler_failed(&shared)));
            }
        };
        if !crate::store_decision::should_store(config, &parts) {
            Box::pin(abandon(&shared, &ledger_key, token, transaction)).await;
            let response = Response::from_parts(parts, body);
            return Ok(answer(&shared, Outcome::Executed, response));
        }
        let stored = to_stored(&parts, stored_body, omitted, &config.deny_headers);
        let response = Response::from_parts(parts, body);
        match transaction {
            None => {
                complete(&shared, &ledger_key, token, &stored, &clock).await;
                Ok(answer(&shared, Outcome::Executed, response))
            }
            Some(transaction) => Ok(Box::pin(commit(
                &shared,
                &ledger_key,
                token,
                &stored,
                transaction,
                response,
            ))
            .await),
        }
    }
}
