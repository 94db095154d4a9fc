//! The answers the layer gives on its own: the outcome each records, rejections, the 500 of a
//! failed handler, and what a failed claim gets (fail closed or open).

use http::{Request, Response};
use tower_idempotency_core::{Ledger, LedgerError};
use tower_service::Service;

use crate::{
    Outcome,
    body::ResponseBody,
    builder::LedgerFailure,
    config::Shared,
    drain::Refused,
    problem::{Rejection, RejectionKind, render},
};

/// A response with no handler behind it: a rejection, a 202 or a replay.
pub(crate) fn answer<B>(
    shared: &Shared<impl Ledger>,
    outcome: Outcome,
    response: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>> {
    let mut response = response;
    shared.config.telemetry.outcome(outcome);
    response.extensions_mut().insert(outcome);
    response
}

pub(crate) fn reject<B>(
    shared: &Shared<impl Ledger>,
    outcome: Outcome,
    rejection: Rejection,
) -> Response<ResponseBody<B>> {
    let response = render(&*shared.config.responder, &rejection).map(ResponseBody::full);
    answer(shared, outcome, response)
}

/// The claim failed: fail open (run the handler unguarded) or closed (503), as configured.
pub(crate) async fn ledger_failed<S, L, ReqBody, ResBody>(
    shared: &Shared<L>,
    mut inner: S,
    request: Request<ReqBody>,
    error: LedgerError,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: Ledger,
{
    if matches!(error, LedgerError::Unavailable) {
        // The breaker is open; its opening was logged once, not once per request.
        tracing::debug!(%error, "idempotency ledger claim refused");
    } else {
        tracing::warn!(%error, error.source = ?std::error::Error::source(&error), "idempotency ledger claim failed");
    }
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

pub(crate) fn unavailable(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger is unavailable; the handler did not run",
    )
    .retry_after(retry_after)
}

/// The handler ran and committing its result failed: the commit's answer was lost, so its writes
/// may or may not have landed, and what it did outside the transaction stays done.
pub(crate) fn commit_failed(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "recording the result failed; the request's writes may or may not have been committed, \
         and its side effects outside the database may have happened. Retry with the same key: \
         if the writes were committed, the retry gets the stored response; if not, the request \
         runs again",
    )
    .retry_after(retry_after)
}

pub(crate) fn handler_failed<B>(shared: &Shared<impl Ledger>) -> Response<ResponseBody<B>> {
    let rejection = Rejection::new(
        RejectionKind::HandlerFailed,
        "the request failed and its response was not stored; a retry with the same key runs it \
         again, which is safe only if the handler's side effects are idempotent",
    );
    render(&*shared.config.responder, &rejection).map(ResponseBody::full)
}

/// The handler answered with a success head, then its body failed: what is stored and answered
/// instead (see `problem`'s `outcome-unknown`).
pub(crate) fn outcome_unknown(shared: &Shared<impl Ledger>) -> Response<bytes::Bytes> {
    let rejection = Rejection::new(
        RejectionKind::OutcomeUnknown,
        "the request was processed with a success status, then its response failed; its effects \
         may be done, so it will not run again with this key",
    );
    render(&*shared.config.responder, &rejection)
}

/// The gate refused a covered request: the in-flight cap, or a drain.
pub(crate) fn refused<B>(shared: &Shared<impl Ledger>, why: Refused) -> Response<ResponseBody<B>> {
    let retry_after = shared.config.retry_after_secs();
    let (outcome, rejection) = match why {
        Refused::Full => (
            Outcome::Overloaded,
            Rejection::new(
                RejectionKind::Overloaded,
                "too many requests are in flight; the request was not processed",
            ),
        ),
        Refused::Draining => (
            Outcome::ShuttingDown,
            Rejection::new(
                RejectionKind::ShuttingDown,
                "the server is shutting down; the request was not processed",
            ),
        ),
    };
    reject(shared, outcome, rejection.retry_after(retry_after))
}
