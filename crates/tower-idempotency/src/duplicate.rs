//! What a claim that found a record answers: a replay, 422 for another request under the same
//! key, or, while the first request runs, 409, 202 or a wait.

use http::Response;
use tokio::time::Instant;
use tower_idempotency_core::{Existing, Fingerprint, Ledger, RecordState};

use crate::{
    Outcome,
    answer::{answer, reject},
    body::ResponseBody,
    builder::InProgress,
    config::Shared,
    problem::{Rejection, RejectionKind},
    response::replay,
};

/// The answer to a claim that found a record: a mismatch, a replay or an in-progress answer;
/// or, under the `Wait` policy before its deadline, `Err(deadline)`: wait, then claim again.
pub(crate) fn settle_existing<B>(
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
