//! Exactly-once mode: the handler's writes and the completion in one transaction.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use http::Extensions;
use tokio::sync::Mutex;
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, LedgerError, LedgerKey, StoredResponse, TransactionalLedger,
};

mod commit;
#[cfg(feature = "axum")]
mod extract;

pub(crate) use commit::commit;
#[cfg(feature = "axum")]
pub use extract::{LedgerTx, MissingLedgerTx};

/// Begins transactions for a ledger whose type the service does not name (it is fixed when
/// `with_transactions` is called), so `Idempotency<S, L>` keeps one type in both modes.
pub(crate) trait TxDriver: Send + Sync {
    /// The claim in this mode: [`TransactionalLedger::claim_before_transaction`].
    fn claim<'a>(&'a self, request: &'a ClaimRequest) -> BoxFuture<'a, Result<Claim, LedgerError>>;

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

/// What the layer puts into the request's extensions, for [`LedgerTx`] to take.
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
    fn claim<'a>(&'a self, request: &'a ClaimRequest) -> BoxFuture<'a, Result<Claim, LedgerError>> {
        Box::pin(self.ledger.claim_before_transaction(request))
    }

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
