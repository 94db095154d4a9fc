//! The service: one covered request from key to stored response.

use std::{
    fmt,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, TryFutureExt};
use http::{HeaderMap, HeaderName, Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_idempotency_core::{
    BoxError, Claim, ClaimRequest, Existing, FencingToken, Fingerprint, IdempotencyKey, KeyError,
    Ledger, LedgerError, LedgerKey, RecordState, StoredResponse,
};
use tower_service::Service;
use tracing::{Instrument, field::Empty};

use crate::{
    Outcome,
    body::ResponseBody,
    config::{Config, InProgress, LedgerFailure, MissingKey},
    future::{Phase, ResponseFuture},
    layer::Shared,
    problem::{Rejection, RejectionKind, render},
    response::{replay, to_stored},
    transaction::{TxError, TxHandle},
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
            Box::pin(handle(shared, inner, Box::new(parts), body, phase.clone()).instrument(span)),
            phase,
        )
    }
}

type Result<T, E> = std::result::Result<T, E>;

/// A response with no handler behind it: a rejection, a 202 or a replay.
fn answer<B>(
    shared: &Shared<impl Ledger>,
    outcome: Outcome,
    response: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>> {
    let mut response = response;
    shared.config.telemetry.outcome(outcome);
    response.extensions_mut().insert(outcome);
    response
}

fn reject<B>(
    shared: &Shared<impl Ledger>,
    outcome: Outcome,
    rejection: Rejection,
) -> Response<ResponseBody<B>> {
    let response = render(&*shared.config.responder, &rejection).map(ResponseBody::full);
    answer(shared, outcome, response)
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

/// The declared length, if the request declares one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

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
///
/// Sizes and timings are in docs/benchmarks.md ("One future per request").
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
        let config = &shared.config;
        let key = match read_key(&parts.headers, &config.header) {
            Ok(Some(key)) => key,
            Ok(None) if config.missing_key == MissingKey::Allow => {
                let request = Request::from_parts(*parts, body);
                let response = Box::pin(inner.call(request)).await?;
                return Ok(answer(
                    &shared,
                    Outcome::Bypassed,
                    response.map(ResponseBody::stream),
                ));
            }
            Ok(None) => {
                let detail = format!("send a unique `{}` header with this request", config.header);
                return Ok(reject(
                    &shared,
                    Outcome::Rejected,
                    Rejection::new(RejectionKind::MissingKey, detail),
                ));
            }
            Err(error) => {
                return Ok(reject(
                    &shared,
                    Outcome::Rejected,
                    Rejection::new(RejectionKind::InvalidKey, error.to_string()),
                ));
            }
        };

        let limit = config.body_limit;
        let too_large = || {
            let detail = format!("the request body is larger than {limit} bytes");
            Rejection::new(RejectionKind::PayloadTooLarge, detail)
        };
        if content_length(&parts.headers).is_some_and(|n| n > limit as u64)
            || body.size_hint().lower() > limit as u64
        {
            return Ok(reject(&shared, Outcome::Rejected, too_large()));
        }
        let body = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                return Ok(reject(&shared, Outcome::Rejected, too_large()));
            }
            Err(_) => {
                let rejection = Rejection::new(
                    RejectionKind::BodyUnreadable,
                    "the request body could not be read",
                );
                return Ok(reject(&shared, Outcome::Rejected, rejection));
            }
        };

        let scope = config.scope_of(&parts);
        let ledger_key = LedgerKey::new(&scope, &key);
        let scope = Config::scope_digest(&scope);
        let span = tracing::Span::current();
        span.record("key", tracing::field::display(&ledger_key));
        let fingerprint = match &config.fingerprint {
            Some(custom) => custom(&parts, &body),
            None => Fingerprint::of_request(
                &parts,
                &config.fingerprint_headers,
                &body,
                config.canonical_json,
            ),
        };

        let ledger = &shared.ledger;
        let telemetry = &config.telemetry;
        let deadline = match config.in_progress {
            InProgress::Wait { timeout } => Some(Instant::now() + timeout),
            _ => None,
        };
        let mut waited = false;
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
            let claimed = telemetry
                .ledger(ledger.name(), "claim", ledger.claim(&claim))
                .await;
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
            span.record(
                "operation_id",
                tracing::field::display(existing.operation_id),
            );
            match settle_existing(&shared, existing, fingerprint, waited, deadline) {
                Ok(response) => return Ok(response),
                Err(deadline) => {
                    waited = true;
                    let now = Instant::now();
                    let wait = ledger.wait_for_change(&ledger_key, deadline - now);
                    Box::pin(telemetry.ledger(ledger.name(), "wait", wait)).await;
                }
            }
        };

        // The key is ours. Until its result is recorded, a disconnect no longer cancels the
        // request: the handler runs between its side effects and the record of them.
        phase.running();
        span.record("operation_id", tracing::field::display(lease.operation_id));
        if lease.taken_over {
            telemetry.takeover();
        }
        let token = lease.token;
        let mut parts = parts;
        crate::downstream::Operation::new(ledger_key, lease.operation_id)
            .expose(&mut parts.extensions);
        // The rest in a box of its own (1.5 KB): a replay, a conflict or a rejection never
        // allocates the handler's part of the state.
        Box::pin(run(shared, inner, parts, body, ledger_key, token)).await
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
        let (ledger, telemetry) = (&shared.ledger, &config.telemetry);
        let transaction = match &config.transactions {
            None => None,
            Some(driver) => {
                match Box::pin(telemetry.ledger(ledger.name(), "begin", driver.begin())).await {
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
            let mut handler = std::pin::pin!(
                AssertUnwindSafe(inner.call(request).map_ok(Response::into_parts).and_then(
                    move |(parts, body)| {
                        collect(body, store_limit).map(move |collected| Ok((parts, collected)))
                    }
                ))
                .catch_unwind()
            );
            match renewing(&shared, &ledger_key, token, handler.as_mut()).await {
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
                complete(&shared, &ledger_key, token, &stored).await;
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

/// The answer to a claim that found a record: a mismatch, a replay or an in-progress answer;
/// or, under the `Wait` policy before its deadline, `Err(deadline)`: wait, then claim again.
fn settle_existing<B>(
    shared: &Shared<impl Ledger>,
    existing: Existing,
    fingerprint: Fingerprint,
    waited: bool,
    deadline: Option<Instant>,
) -> Result<Response<ResponseBody<B>>, Instant> {
    let config = &shared.config;
    if existing.fingerprint != fingerprint {
        let rejection = Rejection::new(
            RejectionKind::KeyReused,
            "this idempotency key was already used with a different request",
        );
        return Ok(reject(shared, Outcome::Mismatch, rejection));
    }
    if let RecordState::Completed(stored) = existing.state {
        let outcome = if waited {
            Outcome::Waited
        } else {
            Outcome::Replayed
        };
        return Ok(answer(shared, outcome, replay(stored)));
    }
    let in_progress = || {
        Rejection::new(
            RejectionKind::InProgress,
            "a request with this idempotency key is still being processed",
        )
        .retry_after(config.retry_after_secs())
        .operation(existing.operation_id, None)
    };
    match (config.in_progress, deadline) {
        (InProgress::Accepted, _) => {
            let location = format!("{}/{}", config.operation_path, existing.operation_id);
            let rejection = Rejection::new(
                RejectionKind::Accepted,
                "the request is being processed; poll the Location for its result",
            )
            .retry_after(config.retry_after_secs())
            .operation(existing.operation_id, Some(location));
            Ok(reject(shared, Outcome::Accepted, rejection))
        }
        (InProgress::Wait { .. }, Some(deadline)) if Instant::now() < deadline => Err(deadline),
        _ => Ok(reject(shared, Outcome::Conflict, in_progress())),
    }
}

/// The claim failed: fail open (run the handler unguarded) or closed (503), as configured.
async fn ledger_failed<S, L, ReqBody, ResBody>(
    shared: &Shared<L>,
    mut inner: S,
    request: Request<ReqBody>,
    error: LedgerError,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: Ledger,
{
    tracing::warn!(%error, error.source = ?std::error::Error::source(&error), "idempotency ledger claim failed");
    match shared.config.ledger_failure {
        LedgerFailure::FailOpen => {
            let response = inner.call(request).await?;
            Ok(answer(
                shared,
                Outcome::LedgerError,
                response.map(ResponseBody::stream),
            ))
        }
        LedgerFailure::FailClosed => Ok(reject(
            shared,
            Outcome::LedgerError,
            unavailable(shared.config.retry_after_secs()),
        )),
    }
}

fn unavailable(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger is unavailable; the handler did not run",
    )
    .retry_after(retry_after)
}

/// The handler ran but its result could not be recorded: its transaction was rolled back, but
/// what it did outside the transaction stays done.
fn commit_failed(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger failed to record the result; the handler's transaction was rolled \
         back, but its other side effects may have happened. A retry with the same key runs the \
         request again",
    )
    .retry_after(retry_after)
}

fn handler_failed<B>(shared: &Shared<impl Ledger>) -> Response<ResponseBody<B>> {
    let rejection = Rejection::new(
        RejectionKind::HandlerFailed,
        "the request failed and its response was not stored; a retry with the same key runs it \
         again, which is safe only if the handler's side effects are idempotent",
    );
    render(&*shared.config.responder, &rejection).map(ResponseBody::full)
}

/// What reading the handler's response body for storage gave.
enum Collected<B> {
    /// The whole body, within the store limit.
    Full(Bytes),
    /// Over the store limit: what was read, and the rest, still to stream.
    Over(Bytes, Pin<Box<B>>),
    /// The body failed.
    Failed(BoxError),
}

async fn collect<B>(body: B, limit: usize) -> Collected<B>
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

/// Exactly-once mode: commits the handler's transaction with the ledger's completion in it.
async fn commit<L: Ledger, B>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
    transaction: Box<dyn TxHandle>,
    response: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>> {
    let config = &shared.config;
    let committed = config
        .telemetry
        .ledger(
            shared.ledger.name(),
            "complete",
            transaction.commit(key, token, stored, config.retention),
        )
        .await;
    match committed {
        Ok(()) => {
            config.telemetry.stored(stored.stored_len());
            answer(shared, Outcome::Executed, response)
        }
        Err(TxError::LeaseLost) => {
            // The handler's writes were rolled back with the transaction, so its response must
            // not reach the caller: a retry replays the newer holder's result instead.
            tracing::warn!(
                "the lease was taken over while the handler ran; its transaction was rolled back"
            );
            let rejection = Rejection::new(
                RejectionKind::InProgress,
                "this request was taken over by a retry; its writes were rolled back",
            )
            .retry_after(config.retry_after_secs());
            reject(shared, Outcome::Conflict, rejection)
        }
        Err(TxError::StillHeld) => {
            tracing::error!("the handler kept its LedgerTx past its return; rolling back");
            release(shared, key, token).await;
            answer(shared, Outcome::Executed, handler_failed(shared))
        }
        Err(TxError::Ledger(error)) => {
            tracing::error!(%error, "committing the handler's transaction failed; it was rolled back");
            release(shared, key, token).await;
            reject(
                shared,
                Outcome::LedgerError,
                commit_failed(config.retry_after_secs()),
            )
        }
    }
}

/// The handler's result is not to be kept: roll its transaction back, then release the key.
async fn abandon<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    transaction: Option<Box<dyn TxHandle>>,
) {
    if let Some(transaction) = transaction {
        transaction.rollback().await;
    }
    release(shared, key, token).await;
}

/// Drives `handler` while renewing the lease every third of its length, concurrently, so a slow
/// handler keeps its key and a slow ledger does not stall the handler.
///
/// The handler is borrowed, pinned in its caller's state, rather than moved in (which would
/// hold it twice). Most handlers of a fast service finish at their first poll and need no
/// renewal timer: one is set up, boxed, only if the handler is still running after it.
/// Registering a timer costs a timer-wheel entry and often a wake-up of the runtime's driver
/// (an eventfd write, and on a multi-threaded runtime a cross-thread unpark).
async fn renewing<L: Ledger, F: Future>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    mut handler: Pin<&mut F>,
) -> F::Output {
    let mut renewals: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = handler.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        let renewals = renewals.get_or_insert_with(|| Box::pin(renew(shared, key, token)));
        // `renew` never finishes: it renews until the handler does, or stops at a lost lease.
        let _ = renewals.as_mut().poll(cx);
        Poll::Pending
    })
    .await
}

/// Renews the lease every third of its length, forever; after a lost lease, waits forever.
async fn renew<L: Ledger>(shared: &Shared<L>, key: &LedgerKey, token: FencingToken) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let period = config.lease / 3;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match config
            .telemetry
            .ledger(
                ledger.name(),
                "renew",
                ledger.renew(key, token, config.lease),
            )
            .await
        {
            Ok(()) => {}
            Err(LedgerError::LeaseLost) => {
                tracing::warn!(
                    "the lease was taken over while the handler ran; its result will not be stored"
                );
                return std::future::pending().await;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the idempotency lease failed; retrying")
            }
        }
    }
}

/// Records the handler's response: one attempt here, and only if it fails with a ledger error,
/// two more with a backoff (boxed, so the retry loop costs the usual path nothing).
async fn complete<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let first = config
        .telemetry
        .ledger(
            ledger.name(),
            "complete",
            ledger.complete(key, token, stored, config.retention),
        )
        .await;
    match first {
        Ok(()) => config.telemetry.stored(stored.stored_len()),
        Err(LedgerError::LeaseLost) => lease_lost_before_storing(),
        Err(error) => Box::pin(complete_retrying(shared, key, token, stored, error)).await,
    }
}

fn lease_lost_before_storing() {
    tracing::warn!(
        "the lease was taken over before the response was stored; the newer holder's result stands"
    );
}

async fn complete_retrying<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
    first: LedgerError,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let mut error = first;
    let mut backoff = Duration::from_millis(50);
    for attempt in 2..=3 {
        tracing::warn!(%error, attempt = attempt - 1, "storing the idempotent response failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        match config
            .telemetry
            .ledger(
                ledger.name(),
                "complete",
                ledger.complete(key, token, stored, config.retention),
            )
            .await
        {
            Ok(()) => {
                config.telemetry.stored(stored.stored_len());
                return;
            }
            Err(LedgerError::LeaseLost) => return lease_lost_before_storing(),
            Err(next) => error = next,
        }
    }
    tracing::error!(%error, "storing the idempotent response failed; the key stays in progress until its lease expires");
}

async fn release<L: Ledger>(shared: &Shared<L>, key: &LedgerKey, token: FencingToken) {
    let (ledger, telemetry) = (&shared.ledger, &shared.config.telemetry);
    match telemetry
        .ledger(ledger.name(), "release", ledger.release(key, token))
        .await
    {
        Ok(()) | Err(LedgerError::LeaseLost) => {}
        Err(error) => {
            tracing::warn!(%error, "releasing the idempotency key failed; it frees itself when the lease expires")
        }
    }
}
