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
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_idempotency_core::{
    BoxError, Claim, ClaimRequest, FencingToken, Fingerprint, IdempotencyKey, KeyError, Lease,
    Ledger, LedgerError, LedgerKey, RecordState, ScopeDigest,
};
use tower_service::Service;
use tracing::{Instrument, field::Empty};

use crate::{
    Outcome,
    body::ResponseBody,
    config::{InProgress, LedgerFailure, MissingKey},
    future::ResponseFuture,
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
            return ResponseFuture {
                inner: Box::pin(async move { Ok(response.await?.map(ResponseBody::stream)) }),
            };
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
        ResponseFuture {
            inner: Box::pin(handle(shared, inner, request).instrument(span)),
        }
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

async fn handle<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
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
    let config = &shared.config;
    let key = match read_key(request.headers(), &config.header) {
        Ok(Some(key)) => key,
        Ok(None) if config.missing_key == MissingKey::Allow => {
            let response = inner.call(request).await?;
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

    let (parts, body) = request.into_parts();
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
    let scope = ScopeDigest::new(&scope);
    let span = tracing::Span::current();
    span.record("key", ledger_key.short());
    let fingerprint = match &config.fingerprint {
        Some(custom) => custom(&parts, &body),
        None => Fingerprint::of_request(
            &parts,
            &config.fingerprint_headers,
            &body,
            config.canonical_json,
        ),
    };

    settle(shared, inner, parts, body, ledger_key, scope, fingerprint).await
}

/// Claims the key and acts on the answer: runs the handler, replays, rejects or waits.
#[allow(clippy::too_many_arguments)]
async fn settle<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    mut inner: S,
    parts: http::request::Parts,
    body: Bytes,
    ledger_key: LedgerKey,
    scope: ScopeDigest,
    fingerprint: Fingerprint,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let span = tracing::Span::current();
    let ledger = &shared.ledger;
    let telemetry = &config.telemetry;
    let deadline = match config.in_progress {
        InProgress::Wait { timeout } => Some(Instant::now() + timeout),
        _ => None,
    };
    let mut waited = false;
    loop {
        let claim = ClaimRequest::new(
            ledger_key,
            scope,
            fingerprint,
            config.lease,
            config.retention,
        );
        let existing = match GuardedClaim::new(shared.clone(), claim).await {
            Ok(Claim::Acquired(lease)) => {
                span.record("operation_id", tracing::field::display(lease.operation_id));
                if lease.taken_over {
                    telemetry.takeover();
                }
                // Detached: a client disconnect (which drops this future) cannot stop the
                // handler between its side effects and the record of them.
                return Detached::new(
                    acquired(shared.clone(), inner, parts, body, ledger_key, lease)
                        .in_current_span(),
                )
                .await;
            }
            Ok(Claim::Existing(existing)) => existing,
            Err(error) => {
                tracing::warn!(%error, error.source = ?std::error::Error::source(&error), "idempotency ledger claim failed");
                return match config.ledger_failure {
                    LedgerFailure::FailOpen => {
                        let request = Request::from_parts(parts, ReqBody::from(body));
                        let response = inner.call(request).await?;
                        Ok(answer(
                            &shared,
                            Outcome::LedgerError,
                            response.map(ResponseBody::stream),
                        ))
                    }
                    LedgerFailure::FailClosed => Ok(reject(
                        &shared,
                        Outcome::LedgerError,
                        unavailable(config.retry_after_secs()),
                    )),
                };
            }
        };
        span.record(
            "operation_id",
            tracing::field::display(existing.operation_id),
        );
        if existing.fingerprint != fingerprint {
            let rejection = Rejection::new(
                RejectionKind::KeyReused,
                "this idempotency key was already used with a different request",
            );
            return Ok(reject(&shared, Outcome::Mismatch, rejection));
        }
        if let RecordState::Completed(stored) = existing.state {
            let outcome = if waited {
                Outcome::Waited
            } else {
                Outcome::Replayed
            };
            return Ok(answer(&shared, outcome, replay(stored)));
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
                return Ok(reject(&shared, Outcome::Accepted, rejection));
            }
            (InProgress::Wait { .. }, Some(deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(reject(&shared, Outcome::Conflict, in_progress()));
                }
                waited = true;
                telemetry
                    .ledger(
                        ledger.name(),
                        "wait",
                        ledger.wait_for_change(&ledger_key, deadline - now),
                    )
                    .await;
            }
            _ => return Ok(reject(&shared, Outcome::Conflict, in_progress())),
        }
    }
}

type ClaimFuture = Pin<Box<dyn Future<Output = Result<Claim, LedgerError>> + Send>>;

/// A claim whose effect is never stranded. A claim can take effect in the ledger before its
/// answer arrives; if the request is dropped then (a client disconnect), the claim is finished
/// in a task and, if it won the key for a caller that is gone, the key is released at once,
/// rather than left claimed with no handler until its lease expires. A claim that completes
/// costs one allocation, not a task: replays and conflicts never spawn.
struct GuardedClaim<L: Ledger> {
    shared: Arc<Shared<L>>,
    key: LedgerKey,
    pending: Option<ClaimFuture>,
}

impl<L: Ledger> GuardedClaim<L> {
    fn new(shared: Arc<Shared<L>>, request: ClaimRequest) -> Self {
        let key = request.key;
        let owner = shared.clone();
        let pending: ClaimFuture = Box::pin(
            async move {
                let ledger = &owner.ledger;
                let telemetry = &owner.config.telemetry;
                telemetry
                    .ledger(ledger.name(), "claim", ledger.claim(&request))
                    .await
            }
            .in_current_span(),
        );
        Self {
            shared,
            key,
            pending: Some(pending),
        }
    }
}

impl<L: Ledger> Future for GuardedClaim<L> {
    type Output = Result<Claim, LedgerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Ready(Err(LedgerError::backend(
                "a claim was polled after it finished",
            )));
        };
        let claimed = std::task::ready!(pending.as_mut().poll(cx));
        self.pending = None;
        Poll::Ready(claimed)
    }
}

impl<L: Ledger> Drop for GuardedClaim<L> {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, key) = (self.shared.clone(), self.key);
        runtime.spawn(
            async move {
                if let Ok(Claim::Acquired(lease)) = pending.await {
                    tracing::debug!("the client left during its claim; releasing the key");
                    release(&shared, &key, lease.token).await;
                }
            }
            .in_current_span(),
        );
    }
}

/// A future that runs to its end even if it is dropped first. Polled in place while its caller
/// waits (as a bare handler is, with no task spawned and no cross-thread wake-up); if the caller
/// goes away (a client disconnect drops the request's future), `Drop` moves the rest into a task
/// of its own. The future is boxed from the start, so moving it after it was polled is sound.
///
/// Outside a tokio runtime there is nowhere to move it, and it is dropped; the layer always
/// runs inside one.
struct Detached<T: Send + 'static> {
    pending: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
}

impl<T: Send + 'static> Detached<T> {
    fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            pending: Some(Box::pin(future)),
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(pending) = self.pending.as_mut() else {
            // Polled after it finished: a caller bug. Never finish twice.
            return Poll::Pending;
        };
        let output = std::task::ready!(pending.as_mut().poll(cx));
        self.pending = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // Nobody is waiting for the answer any more; the ledger gets it.
                    drop(pending.await);
                });
            }
            Err(_) => tracing::error!(
                "an idempotent handler was dropped outside a tokio runtime and could not finish"
            ),
        }
    }
}

/// The key is ours: open the transaction (in exactly-once mode) and run the handler.
async fn acquired<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    inner: S,
    mut parts: http::request::Parts,
    body: Bytes,
    key: LedgerKey,
    lease: Lease,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let transaction = match &config.transactions {
        None => None,
        Some(driver) => match config
            .telemetry
            .ledger(shared.ledger.name(), "begin", driver.begin())
            .await
        {
            Ok(handle) => {
                handle.expose(&mut parts.extensions);
                Some(handle)
            }
            Err(error) => {
                tracing::warn!(%error, "opening the handler's transaction failed; releasing the key");
                release(&shared, &key, lease.token).await;
                let rejection = unavailable(config.retry_after_secs());
                return Ok(reject(&shared, Outcome::LedgerError, rejection));
            }
        },
    };
    let request = Request::from_parts(parts, ReqBody::from(body));
    execute(shared, inner, request, key, lease, transaction).await
}

fn unavailable(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger is unavailable; the request was not processed",
    )
    .retry_after(retry_after)
}

/// Runs the handler (inside a [`Detached`] future) and answers for it.
async fn execute<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    inner: S,
    request: Request<ReqBody>,
    key: LedgerKey,
    lease: Lease,
    transaction: Option<Box<dyn TxHandle>>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    L: Ledger,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let response = run_handler(
        shared.clone(),
        inner,
        request,
        key,
        lease.token,
        transaction,
    )
    .await?;
    if response.extensions().get::<Outcome>().is_some() {
        // run_handler already answered for itself (a lease lost in transactional mode).
        return Ok(response);
    }
    Ok(answer(&shared, Outcome::Executed, response))
}

fn handler_failed<B>(shared: &Shared<impl Ledger>) -> Response<ResponseBody<B>> {
    let rejection = Rejection::new(
        RejectionKind::HandlerFailed,
        "the request failed; it was not recorded, so it may be retried with the same key",
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

async fn run_handler<S, L, ReqBody, ResBody>(
    shared: Arc<Shared<L>>,
    mut inner: S,
    request: Request<ReqBody>,
    key: LedgerKey,
    token: FencingToken,
    transaction: Option<Box<dyn TxHandle>>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    L: Ledger,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let store_limit = config.store_limit;
    let handler = AssertUnwindSafe(async move {
        let (parts, body) = inner.call(request).await?.into_parts();
        Ok::<_, S::Error>((parts, collect(body, store_limit).await))
    })
    .catch_unwind();
    let outcome = renewing(&shared, &key, token, handler).await;

    let (parts, collected) = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            abandon(&shared, &key, token, transaction).await;
            return Err(error);
        }
        Err(_panic) => {
            tracing::error!("the idempotent handler panicked; releasing its key");
            abandon(&shared, &key, token, transaction).await;
            return Ok(handler_failed(&shared));
        }
    };
    let (body, stored_body, omitted) = match collected {
        Collected::Full(body) => (ResponseBody::full(body.clone()), body, false),
        Collected::Over(read, rest) => (ResponseBody::over_limit(read, rest), Bytes::new(), true),
        Collected::Failed(error) => {
            tracing::error!(%error, "the idempotent handler's response body failed; releasing its key");
            abandon(&shared, &key, token, transaction).await;
            return Ok(handler_failed(&shared));
        }
    };
    if !config.should_store(parts.status) {
        abandon(&shared, &key, token, transaction).await;
        return Ok(Response::from_parts(parts, body));
    }
    let stored = to_stored(&parts, stored_body, omitted, &config.deny_headers);
    let Some(transaction) = transaction else {
        complete(&shared, &key, token, stored).await;
        return Ok(Response::from_parts(parts, body));
    };
    let bytes = stored.stored_len();
    let committed = config
        .telemetry
        .ledger(
            shared.ledger.name(),
            "complete",
            transaction.commit(&key, token, &stored, config.retention),
        )
        .await;
    match committed {
        Ok(()) => {
            config.telemetry.stored(bytes);
            Ok(Response::from_parts(parts, body))
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
            Ok(reject(&shared, Outcome::Conflict, rejection))
        }
        Err(TxError::StillHeld) => {
            tracing::error!("the handler kept its LedgerTx past its return; rolling back");
            release(&shared, &key, token).await;
            Ok(handler_failed(&shared))
        }
        Err(TxError::Ledger(error)) => {
            tracing::error!(%error, "committing the handler's transaction failed; nothing was written");
            release(&shared, &key, token).await;
            Ok(reject(
                &shared,
                Outcome::LedgerError,
                unavailable(config.retry_after_secs()),
            ))
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
async fn renewing<L: Ledger, F: Future>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    handler: F,
) -> F::Output {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let period = config.lease / 3;
    let renewals = async {
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
    };
    tokio::select! {
        output = handler => output,
        never = renewals => never,
    }
}

async fn complete<L: Ledger>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: tower_idempotency_core::StoredResponse,
) {
    let (ledger, config) = (&shared.ledger, &shared.config);
    let bytes = stored.stored_len();
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=3 {
        match config
            .telemetry
            .ledger(
                ledger.name(),
                "complete",
                ledger.complete(key, token, &stored, config.retention),
            )
            .await
        {
            Ok(()) => {
                config.telemetry.stored(bytes);
                return;
            }
            Err(LedgerError::LeaseLost) => {
                tracing::warn!(
                    "the lease was taken over before the response was stored; the newer holder's result stands"
                );
                return;
            }
            Err(error) if attempt < 3 => {
                tracing::warn!(%error, attempt, "storing the idempotent response failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(error) => {
                tracing::error!(%error, "storing the idempotent response failed; the key stays in progress until its lease expires");
            }
        }
    }
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
