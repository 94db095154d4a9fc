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

pub(crate) fn unavailable(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger is unavailable; the handler did not run",
    )
    .retry_after(retry_after)
}

/// The handler ran but its result could not be recorded: its transaction was rolled back, but
/// what it did outside the transaction stays done.
pub(crate) fn commit_failed(retry_after: u64) -> Rejection {
    Rejection::new(
        RejectionKind::LedgerUnavailable,
        "the idempotency ledger failed to record the result; the handler's transaction was rolled \
         back, but its other side effects may have happened. A retry with the same key runs the \
         request again",
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
