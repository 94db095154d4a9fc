//! Exactly-once mode's last step: the stored response written in the handler's transaction and
//! committed with its writes, fenced by the claim's token.

use http::Response;
use tower_idempotency_core::{FencingToken, Ledger, LedgerKey, StoredResponse};

use super::{TxError, TxHandle};
use crate::{
    Outcome,
    answer::{answer, commit_failed, handler_failed, reject},
    body::ResponseBody,
    config::Shared,
    lease::release,
    ledger_call::Door,
    problem::{Rejection, RejectionKind},
};

/// Exactly-once mode: commits the handler's transaction with the ledger's completion in it.
pub(crate) async fn commit<L: Ledger, B>(
    shared: &Shared<L>,
    key: &LedgerKey,
    token: FencingToken,
    stored: &StoredResponse,
    transaction: Box<dyn TxHandle>,
    response: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>> {
    let config = &shared.config;
    let committed = shared
        .call(
            "complete",
            Door::Always,
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
            // A commit whose answer was lost may have landed. Releasing is safe either way: it
            // frees only a key still in progress under this token, so a landed commit keeps
            // its stored response, and the retry gets it.
            tracing::error!(%error, "committing the handler's transaction failed; it may or may not have landed");
            release(shared, key, token).await;
            reject(
                shared,
                Outcome::LedgerError,
                commit_failed(config.retry_after_secs()),
            )
        }
    }
}
