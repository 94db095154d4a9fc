//! [`FaultyLedger`]: a wrapper that makes any ledger fail, stall or answer late on command, and
//! counts its calls. For testing what a layer or an app does on a ledger's worst day.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    Claim, ClaimRequest, FencingToken, Ledger, LedgerError, LedgerKey, OperationId, RecordInfo,
    RecordState, ScopeDigest, StoredResponse, TransactionalLedger,
};

/// A ledger call, as [`Faults`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Ledger::claim`].
    Claim,
    /// [`Ledger::complete`].
    Complete,
    /// [`Ledger::release`].
    Release,
    /// [`Ledger::renew`].
    Renew,
    /// [`Ledger::operation`].
    Operation,
    /// [`Ledger::purge_expired`].
    Purge,
    /// [`Ledger::wait_for_change`]. It cannot fail; a failure makes it return at once.
    Wait,
    /// [`TransactionalLedger::begin`].
    Begin,
    /// [`TransactionalLedger::complete_in`] (the commit).
    CompleteIn,
    /// [`TransactionalLedger::rollback`].
    Rollback,
}

const OPS: usize = 10;

impl Op {
    fn index(self) -> usize {
        self as usize
    }
}

/// The fault switches of a [`FaultyLedger`], shared by its clones: set them from a test while
/// requests run. Every switch starts off.
#[derive(Default)]
pub struct Faults {
    fail_all: AtomicBool,
    drop_renewals: AtomicBool,
    fail_next: [AtomicUsize; OPS],
    stall_next: [AtomicUsize; OPS],
    answer_delay_ms: [AtomicU64; OPS],
    claim_effect_delay_ms: AtomicU64,
    calls: [AtomicUsize; OPS],
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("fail_all", &self.fail_all.load(Ordering::SeqCst))
            .field("drop_renewals", &self.drop_renewals.load(Ordering::SeqCst))
            .field("total_calls", &self.total_calls())
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// While on, every call fails with a backend error ("connection refused") and writes
    /// nothing: a ledger that is down.
    pub fn fail_all(&self, on: bool) {
        self.fail_all.store(on, Ordering::SeqCst);
    }

    /// The next `n` calls of `op` fail with a backend error and write nothing.
    pub fn fail_next(&self, op: Op, n: usize) {
        self.fail_next[op.index()].store(n, Ordering::SeqCst);
    }

    /// The next `n` calls of `op` never answer and write nothing: a connection a NAT dropped
    /// silently, or a database that stopped answering instead of failing. Whoever calls must
    /// bound the wait.
    pub fn stall_next(&self, op: Op, n: usize) {
        self.stall_next[op.index()].store(n, Ordering::SeqCst);
    }

    /// Every call of `op` takes effect, then answers `delay` later (a slow round trip); zero
    /// turns it off.
    pub fn delay_answers(&self, op: Op, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.answer_delay_ms[op.index()].store(ms, Ordering::SeqCst);
    }

    /// Every claim takes effect `delay` after it is made, whether or not its caller still waits,
    /// and answers then: a statement queued in the database (behind a lock, or a slow disk) that
    /// commits after the client gave up on it. Zero turns it off.
    pub fn delay_claim_effects(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.claim_effect_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// While on, renewals answer `Ok` without renewing: a holder stalled by a pause or a
    /// partition, whose lease then expires under it.
    pub fn drop_renewals(&self, on: bool) {
        self.drop_renewals.store(on, Ordering::SeqCst);
    }

    /// How many calls of `op` were made, faulty or not.
    pub fn calls(&self, op: Op) -> usize {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    /// How many calls were made, of every kind.
    pub fn total_calls(&self) -> usize {
        self.calls.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// Counts the call, then says whether it fails or stalls.
    async fn enter(&self, op: Op) -> Result<(), LedgerError> {
        self.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        if take_one(&self.stall_next[op.index()]) {
            std::future::pending::<()>().await;
        }
        if self.fail_all.load(Ordering::SeqCst) || take_one(&self.fail_next[op.index()]) {
            return Err(LedgerError::backend(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "ledger fault injected by FaultyLedger",
            )));
        }
        Ok(())
    }

    async fn answer<T>(&self, op: Op, value: T) -> T {
        let ms = self.answer_delay_ms[op.index()].load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        value
    }

    async fn call<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        self.enter(op).await?;
        let value = call.await;
        self.answer(op, value).await
    }
}

/// Decrements `counter` if it is above zero; whether it was.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Any ledger, with faults on command: fail every call or the next few of one kind, stall a call
/// for ever, answer late, take effect late, drop renewals; and a count of calls by kind. Its
/// clones share one [`Faults`] and the wrapped ledger.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency_core::{MemoryLedger, conformance::{FaultyLedger, Op}};
///
/// let ledger = FaultyLedger::new(MemoryLedger::new());
/// let faults = ledger.faults();
/// faults.stall_next(Op::Renew, 1); // the first renewal never answers
/// faults.delay_answers(Op::Claim, Duration::from_millis(50));
/// assert_eq!(faults.calls(Op::Claim), 0);
/// ```
pub struct FaultyLedger<L> {
    inner: Arc<L>,
    faults: Arc<Faults>,
}

impl<L> Clone for FaultyLedger<L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            faults: self.faults.clone(),
        }
    }
}

impl<L> FaultyLedger<L> {
    /// `inner`, with every fault off.
    pub fn new(inner: L) -> Self {
        Self {
            inner: Arc::new(inner),
            faults: Arc::default(),
        }
    }

    /// The switches, shared with every clone of this ledger.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// The wrapped ledger, to look at records behind the faults' back.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: Default> Default for FaultyLedger<L> {
    fn default() -> Self {
        Self::new(L::default())
    }
}

impl<L: fmt::Debug> fmt::Debug for FaultyLedger<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyLedger")
            .field("inner", &self.inner)
            .field("faults", &self.faults)
            .finish()
    }
}

impl<L: Ledger> Ledger for FaultyLedger<L> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        let ms = self.faults.claim_effect_delay_ms.load(Ordering::SeqCst);
        if ms == 0 {
            return self.faults.call(Op::Claim, self.inner.claim(request)).await;
        }
        // In a task of its own, so that a caller that stops waiting does not stop it.
        let (inner, request) = (self.inner.clone(), request.clone());
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            inner.claim(&request).await
        });
        let call = async {
            late.await
                .unwrap_or_else(|error| Err(LedgerError::backend(error)))
        };
        self.faults.call(Op::Claim, call).await
    }

    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        let call = self.inner.complete(key, token, response, retention);
        self.faults.call(Op::Complete, call).await
    }

    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        let call = self.inner.release(key, token);
        self.faults.call(Op::Release, call).await
    }

    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        self.faults.enter(Op::Renew).await?;
        let renewed = if self.faults.drop_renewals.load(Ordering::SeqCst) {
            Ok(())
        } else {
            self.inner.renew(key, token, lease).await
        };
        self.faults.answer(Op::Renew, renewed).await
    }

    async fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> Result<Option<RecordState>, LedgerError> {
        let call = self.inner.operation(scope, id);
        self.faults.call(Op::Operation, call).await
    }

    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        let call = self.inner.purge_expired(batch);
        self.faults.call(Op::Purge, call).await
    }

    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        if self.faults.enter(Op::Wait).await.is_ok() {
            self.inner.wait_for_change(key, timeout).await;
        }
    }

    fn expires_records_itself(&self) -> bool {
        self.inner.expires_records_itself()
    }

    // The operator calls pass straight through: faults are for the request path.
    async fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        self.inner.inspect(key, with_body).await
    }

    async fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        self.inner.stuck(older_than, limit).await
    }

    async fn force_release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        self.inner.force_release(key, token).await
    }

    async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        self.inner.evict(key).await
    }
}

impl<L: TransactionalLedger> TransactionalLedger for FaultyLedger<L> {
    type Transaction = L::Transaction;

    /// Faults as [`claim`](Ledger::claim) (the same [`Op::Claim`]).
    async fn claim_before_transaction(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        let call = self.inner.claim_before_transaction(request);
        self.faults.call(Op::Claim, call).await
    }

    async fn begin(&self) -> Result<L::Transaction, LedgerError> {
        self.faults.call(Op::Begin, self.inner.begin()).await
    }

    async fn complete_in(
        &self,
        tx: L::Transaction,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        if let Err(error) = self.faults.enter(Op::CompleteIn).await {
            // The transaction is dropped, so rolled back, as a failed COMMIT leaves it.
            let _ = self.inner.rollback(tx).await;
            return Err(error);
        }
        let committed = self
            .inner
            .complete_in(tx, key, token, response, retention)
            .await;
        self.faults.answer(Op::CompleteIn, committed).await
    }

    async fn rollback(&self, tx: L::Transaction) -> Result<(), LedgerError> {
        self.faults
            .call(Op::Rollback, self.inner.rollback(tx))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fingerprint, IdempotencyKey, Lease, MemoryLedger};

    fn request(key: &str) -> ClaimRequest {
        let scope = ScopeDigest::new(b"");
        let key = LedgerKey::new(b"", &IdempotencyKey::parse(key.as_bytes()).unwrap());
        let fingerprint = Fingerprint::of(b"body");
        let lease = Duration::from_secs(30);
        ClaimRequest::new(key, scope, fingerprint, lease, lease)
    }

    #[tokio::test]
    async fn fail_next_fails_that_many_calls_and_counts_them_all() {
        let ledger = FaultyLedger::new(MemoryLedger::new());
        let faults = ledger.faults();
        faults.fail_next(Op::Claim, 2);
        assert!(ledger.claim(&request("a")).await.is_err());
        assert!(ledger.claim(&request("a")).await.is_err());
        assert!(matches!(
            ledger.claim(&request("a")).await,
            Ok(Claim::Acquired(_))
        ));
        assert_eq!(faults.calls(Op::Claim), 3);
        assert_eq!(faults.total_calls(), 3);
    }

    #[tokio::test]
    async fn a_stalled_call_never_answers_and_writes_nothing() {
        let ledger = FaultyLedger::new(MemoryLedger::new());
        ledger.faults().stall_next(Op::Claim, 1);
        let first = request("a");
        let stalled = tokio::time::timeout(Duration::from_millis(100), ledger.claim(&first));
        assert!(stalled.await.is_err(), "the stalled claim answered");
        // The key was never claimed: the next claim acquires it.
        assert!(matches!(
            ledger.claim(&request("a")).await,
            Ok(Claim::Acquired(_))
        ));
    }

    #[tokio::test]
    async fn dropped_renewals_answer_ok_and_renew_nothing() {
        let ledger = FaultyLedger::new(MemoryLedger::new());
        let mut short = request("a");
        short.lease = Duration::from_millis(50);
        let Ok(Claim::Acquired(lease)) = ledger.claim(&short).await else {
            panic!("not acquired")
        };
        ledger.faults().drop_renewals(true);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let renewed = ledger.renew(&short.key, lease.token, Duration::from_secs(30));
        assert!(renewed.await.is_ok());
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Past the first lease: a renewal would have kept it; a dropped one did not.
        assert!(matches!(
            ledger.claim(&request("a")).await,
            Ok(Claim::Acquired(Lease {
                taken_over: true,
                ..
            }))
        ));
    }
}
