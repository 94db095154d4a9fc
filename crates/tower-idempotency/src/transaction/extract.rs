//! The `LedgerTx` extractor: the handler's side of exactly-once mode (feature `axum`).

use std::{
    fmt,
    marker::PhantomData,
    ops::{Deref, DerefMut},
};

use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::request::Parts;
use tokio::sync::OwnedMutexGuard;
use tower_idempotency_core::TransactionalLedger;

use super::Exposed;
use crate::problem::{ProblemJson, Rejection, RejectionKind, render};

/// The ledger's transaction, for a handler behind a layer built with
/// [`with_transactions`](crate::IdempotencyLayerBuilder::with_transactions): write on it, and
/// the writes commit together with the stored response, or not at all.
///
/// It dereferences to the transaction's connection, so with the SQL ledgers it is used as sqlx
/// expects:
///
/// ```text
/// async fn create(mut tx: LedgerTx<PostgresLedger>, Json(p): Json<NewPayment>) -> StatusCode {
///     sqlx::query("INSERT INTO payments (amount) VALUES ($1)")
///         .bind(p.amount)
///         .execute(&mut *tx)
///         .await?;
///     StatusCode::CREATED
/// }
/// ```
///
/// Do not commit it yourself, and do not keep it past the handler: the layer commits after the
/// handler returns (and answers 500, rolling back, if the handler still holds it). Without the
/// layer's transactional mode, extracting it answers 500.
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub struct LedgerTx<L: TransactionalLedger> {
    guard: OwnedMutexGuard<Option<L::Transaction>>,
    ledger: PhantomData<fn() -> L>,
}

impl<L: TransactionalLedger> fmt::Debug for LedgerTx<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerTx").finish_non_exhaustive()
    }
}

impl<L> Deref for LedgerTx<L>
where
    L: TransactionalLedger,
    L::Transaction: Deref,
{
    type Target = <L::Transaction as Deref>::Target;

    fn deref(&self) -> &Self::Target {
        // Extraction checked the slot is full, and the layer only empties it through the same
        // mutex, which this guard holds.
        self.guard
            .as_deref()
            .expect("a LedgerTx always holds its transaction")
    }
}

impl<L> DerefMut for LedgerTx<L>
where
    L: TransactionalLedger,
    L::Transaction: DerefMut,
{
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard
            .as_deref_mut()
            .expect("a LedgerTx always holds its transaction")
    }
}

impl<L: TransactionalLedger> LedgerTx<L> {
    /// The transaction itself, for APIs that want it rather than its connection.
    pub fn transaction(&mut self) -> &mut L::Transaction {
        self.guard
            .as_mut()
            .expect("a LedgerTx always holds its transaction")
    }
}

/// Why a handler could not get its [`LedgerTx`]: always a server bug or misconfiguration,
/// answered 500 (`handler-failed`).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub struct MissingLedgerTx {
    reason: Reason,
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    /// The route's layer is not in transactional mode.
    NotEnabled,
    /// Another `LedgerTx` of the same request holds the transaction.
    AlreadyHeld,
    /// The layer already took the transaction back.
    Finished,
}

impl IntoResponse for MissingLedgerTx {
    fn into_response(self) -> Response {
        let detail = match self.reason {
            Reason::NotEnabled => {
                "this handler needs the idempotency layer's transactional mode, which is not \
                 enabled for this route"
            }
            Reason::AlreadyHeld => {
                "the request's transaction is already held by another LedgerTx (extract it once \
                 per request); nothing was written"
            }
            Reason::Finished => "the request's transaction was already finished",
        };
        let rejection = Rejection::new(RejectionKind::HandlerFailed, detail);
        render(&ProblemJson, &rejection)
            .map(axum::body::Body::from)
            .into_response()
    }
}

impl<S, L> FromRequestParts<S> for LedgerTx<L>
where
    S: Send + Sync,
    L: TransactionalLedger,
{
    type Rejection = MissingLedgerTx;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let rejected = |reason| MissingLedgerTx { reason };
        let Exposed(slot) = parts
            .extensions
            .get::<Exposed<L>>()
            .cloned()
            .ok_or(rejected(Reason::NotEnabled))?;
        // Never wait for the lock: its only other holders are a second extractor of this same
        // request, which would wait for ever, and the layer after the handler returned.
        let guard = slot
            .try_lock_owned()
            .map_err(|_| rejected(Reason::AlreadyHeld))?;
        if guard.is_none() {
            return Err(rejected(Reason::Finished));
        }
        Ok(Self {
            guard,
            ledger: PhantomData,
        })
    }
}
