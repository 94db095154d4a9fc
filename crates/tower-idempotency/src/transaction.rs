//! Exactly-once mode: the handler's writes and the completion in one transaction.

use std::{
    fmt,
    marker::PhantomData,
    ops::{Deref, DerefMut},
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use futures_util::future::BoxFuture;
use http::{Extensions, request::Parts};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tower_idempotency_core::{
    FencingToken, LedgerError, LedgerKey, StoredResponse, TransactionalLedger,
};

use crate::problem::{ProblemJson, Rejection, RejectionKind, render};

mod commit;

pub(crate) use commit::commit;

/// Begins transactions for a ledger whose type the service does not name (it is fixed when
/// `with_transactions` is called), so `Idempotency<S, L>` keeps one type in both modes.
pub(crate) trait TxDriver: Send + Sync {
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn TxHandle>, LedgerError>>;
}

/// One request's transaction, from the layer's side.
pub(crate) trait TxHandle: Send {
    /// Makes the transaction reachable by [`LedgerTx`] through the request's extensions.
    fn expose(&self, extensions: &mut Extensions);

    /// Completes inside the transaction and commits.
    fn commit<'a>(
        self: Box<Self>,
        key: &'a LedgerKey,
        token: FencingToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), TxError>>;

    /// Rolls back (if the handler gave the transaction back).
    fn rollback(self: Box<Self>) -> BoxFuture<'static, ()>;
}

#[derive(Debug)]
pub(crate) enum TxError {
    /// The lease was taken over: the transaction was rolled back.
    LeaseLost,
    /// The handler still holds the transaction (it moved the extractor into a task that outlives
    /// it): nothing can be committed.
    StillHeld,
    /// The commit (or the completion inside it) failed.
    Ledger(LedgerError),
}

pub(crate) struct Driver<L> {
    pub(crate) ledger: L,
}

/// The slot the extractor and the layer share. `None` once the layer took the transaction back.
type Slot<T> = Arc<Mutex<Option<T>>>;

/// What the layer puts into the request's extensions.
struct Exposed<L: TransactionalLedger>(Slot<L::Transaction>);

impl<L: TransactionalLedger> Clone for Exposed<L> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct Handle<L: TransactionalLedger> {
    ledger: L,
    slot: Slot<L::Transaction>,
}

impl<L: TransactionalLedger> TxDriver for Driver<L> {
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn TxHandle>, LedgerError>> {
        Box::pin(async move {
            let transaction = self.ledger.begin().await?;
            let handle: Box<dyn TxHandle> = Box::new(Handle {
                ledger: self.ledger.clone(),
                slot: Arc::new(Mutex::new(Some(transaction))),
            });
            Ok(handle)
        })
    }
}

impl<L: TransactionalLedger> Handle<L> {
    fn take(&self) -> Result<L::Transaction, TxError> {
        // The handler has returned; its extractor is normally dropped by now. If it is still
        // held, nothing may be committed on its behalf.
        let mut slot = self.slot.try_lock().map_err(|_| TxError::StillHeld)?;
        slot.take().ok_or(TxError::StillHeld)
    }
}

impl<L: TransactionalLedger> TxHandle for Handle<L> {
    fn expose(&self, extensions: &mut Extensions) {
        extensions.insert(Exposed::<L>(self.slot.clone()));
    }

    fn commit<'a>(
        self: Box<Self>,
        key: &'a LedgerKey,
        token: FencingToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<(), TxError>> {
        Box::pin(async move {
            let transaction = self.take()?;
            match self
                .ledger
                .complete_in(transaction, key, token, response, retention)
                .await
            {
                Ok(()) => Ok(()),
                Err(LedgerError::LeaseLost) => Err(TxError::LeaseLost),
                Err(error) => Err(TxError::Ledger(error)),
            }
        })
    }

    fn rollback(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Ok(transaction) = self.take() else {
                return;
            };
            if let Err(error) = self.ledger.rollback(transaction).await {
                // Dropping the connection rolls back all the same.
                tracing::warn!(%error, "rolling back the handler's transaction failed");
            }
        })
    }
}

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

/// Why a handler could not get its [`LedgerTx`]: always a server misconfiguration, answered 500.
#[derive(Debug, Clone, Copy)]
pub struct MissingLedgerTx;

impl IntoResponse for MissingLedgerTx {
    fn into_response(self) -> Response {
        let rejection = Rejection::new(
            RejectionKind::HandlerFailed,
            "this handler needs the idempotency layer's transactional mode, which is not enabled \
             for this route (or the transaction was already finished)",
        );
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
        let Exposed(slot) = parts
            .extensions
            .get::<Exposed<L>>()
            .cloned()
            .ok_or(MissingLedgerTx)?;
        let guard = slot.lock_owned().await;
        if guard.is_none() {
            return Err(MissingLedgerTx);
        }
        Ok(Self {
            guard,
            ledger: PhantomData,
        })
    }
}
