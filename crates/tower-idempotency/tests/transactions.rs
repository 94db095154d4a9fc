//! Exactly-once mode at the layer: the handler's writes commit with the stored response or not
//! at all, shown with a ledger whose transaction is a list of writes applied on commit. The SQL
//! ledgers' real transactions are tested in the tests/ crate.
#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    http::{StatusCode, header},
    routing::post,
};
use support::*;
use tower_idempotency::{
    IdempotencyLayer, Ledger, LedgerError, LedgerTx, MemoryLedger, TransactionalLedger,
    core::{
        Claim, ClaimRequest, FencingToken, LedgerKey, OperationId, RecordState, ScopeDigest,
        StoredResponse,
    },
};

/// Writes made in one transaction: applied to the shared table only when committed.
#[derive(Debug, Default)]
struct Writes(Vec<String>);

impl Deref for Writes {
    type Target = Vec<String>;
    fn deref(&self) -> &Vec<String> {
        &self.0
    }
}

impl DerefMut for Writes {
    fn deref_mut(&mut self) -> &mut Vec<String> {
        &mut self.0
    }
}

/// A memory ledger plus a "payments table" that transactions commit into. The tests wrap it
/// in core's `FaultyLedger` to fail a commit or drop renewals.
#[derive(Clone, Default)]
struct TableLedger {
    inner: MemoryLedger,
    table: Arc<Mutex<Vec<String>>>,
}

type TxLedger = FaultyLedger<TableLedger>;

impl Ledger for TableLedger {
    fn name(&self) -> &'static str {
        "tx-test"
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        self.inner.complete(key, token, response, retention).await
    }
    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        self.inner.renew(key, token, lease).await
    }
    async fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> Result<Option<RecordState>, LedgerError> {
        self.inner.operation(scope, id).await
    }
    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        self.inner.purge_expired(batch).await
    }
    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        self.inner.wait_for_change(key, timeout).await
    }
}

impl TransactionalLedger for TableLedger {
    type Transaction = Writes;

    async fn begin(&self) -> Result<Writes, LedgerError> {
        Ok(Writes::default())
    }

    async fn complete_in(
        &self,
        tx: Writes,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        // The memory ledger's fenced complete stands in for the UPDATE inside the transaction;
        // its table writes are applied only if that succeeds, as a COMMIT would.
        self.inner.complete(key, token, response, retention).await?;
        self.table.lock().unwrap().extend(tx.0);
        Ok(())
    }

    async fn rollback(&self, _: Writes) -> Result<(), LedgerError> {
        Ok(())
    }
}

const BODY: &str = r#"{"amount":100}"#;

/// `POST /payments` writing "payment {run}" in the ledger's transaction; the first run can be
/// held at a gate, and the status comes from `status`.
fn app(
    ledger: &TxLedger,
    runs: &Runs,
    gate: Option<Arc<tokio::sync::Notify>>,
    status: StatusCode,
    lease: Duration,
) -> Router {
    let runs = runs.clone();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_transactions()
        .with_lease(lease)
        .build()
        .unwrap();
    Router::new()
        .route(
            "/payments",
            post(move |mut tx: LedgerTx<TxLedger>| {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    let n = runs.bump();
                    tx.push(format!("payment {n}"));
                    if let (1, Some(gate)) = (n, gate) {
                        gate.notified().await;
                    }
                    (
                        status,
                        [(header::CONTENT_TYPE, "text/plain")],
                        format!("holder {n}"),
                    )
                }
            }),
        )
        .layer(layer)
}

fn table(ledger: &TxLedger) -> Vec<String> {
    ledger.inner().table.lock().unwrap().clone()
}

#[tokio::test]
async fn writes_commit_with_the_stored_response_once() {
    let (ledger, runs) = (TxLedger::default(), Runs::default());
    let app = app(
        &ledger,
        &runs,
        None,
        StatusCode::CREATED,
        Duration::from_secs(30),
    );
    let (first, _) = send(&app, pay("k", BODY)).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let (again, body) = send(&app, pay("k", BODY)).await;
    assert!(is_replay(&again));
    assert_eq!(body, "holder 1");
    assert_eq!(table(&ledger), ["payment 1"]);
}

#[tokio::test]
async fn a_response_not_stored_rolls_the_writes_back_and_releases_the_key() {
    let (ledger, runs) = (TxLedger::default(), Runs::default());
    let app = app(
        &ledger,
        &runs,
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(30),
    );
    assert_eq!(
        send(&app, pay("k", BODY)).await.0.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&app, pay("k", BODY)).await.0.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(runs.get(), 2, "released: the retry ran");
    assert!(table(&ledger).is_empty(), "nothing of a 503 was committed");
}

#[tokio::test]
async fn a_failed_commit_writes_nothing_answers_503_and_a_retry_runs_again() {
    let (ledger, runs) = (TxLedger::default(), Runs::default());
    let app = app(
        &ledger,
        &runs,
        None,
        StatusCode::CREATED,
        Duration::from_secs(30),
    );
    ledger.faults().fail_next(Op::CompleteIn, 1);
    let (response, body) = send(&app, pay("commit-key", BODY)).await;
    assert_problem(&response, &body, 503, "ledger-unavailable", "commit-key");
    // A failed commit may still have landed: the answer must not claim that nothing happened.
    let detail = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["detail"].clone();
    assert!(
        !detail.as_str().unwrap().contains("not processed"),
        "{detail}"
    );
    assert!(detail.as_str().unwrap().contains("same key"), "{detail}");
    assert!(table(&ledger).is_empty());
    assert_eq!(
        send(&app, pay("commit-key", BODY)).await.0.status(),
        StatusCode::CREATED
    );
    assert_eq!(table(&ledger), ["payment 2"]);
}

#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_loses_its_writes() {
    let (ledger, runs) = (TxLedger::default(), Runs::default());
    let gate = Arc::new(tokio::sync::Notify::new());
    let app = app(
        &ledger,
        &runs,
        Some(gate.clone()),
        StatusCode::CREATED,
        Duration::from_millis(300),
    );

    ledger.faults().drop_renewals(true);
    let stalled = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The stall lasts until the retry took over (a renewal allowed earlier could revive it).
    let (retry, body) = send(&app, pay("k", BODY)).await;
    ledger.faults().drop_renewals(false);
    assert_eq!(
        (retry.status(), &body[..]),
        (StatusCode::CREATED, &b"holder 2"[..])
    );

    gate.notify_one();
    let (stale, body) = stalled.await.unwrap();
    assert_problem(&stale, &body, 409, "request-in-progress", "");
    assert_eq!(
        table(&ledger),
        ["payment 2"],
        "only the new holder's payment exists"
    );
    let (replay, body) = send(&app, pay("k", BODY)).await;
    assert!(is_replay(&replay));
    assert_eq!(body, "holder 2");
}

/// The contrast: the same stall without transactional mode. The handler's write is made
/// directly, so the stalled holder's payment stays although its response is never recorded:
/// two payments for one key. This is the double charge the transactional mode prevents.
#[tokio::test]
async fn without_transactions_the_same_takeover_charges_twice() {
    let ledger = Faulty::default();
    let (runs, table) = (Runs::default(), Arc::new(Mutex::new(Vec::<String>::new())));
    let gate = Arc::new(tokio::sync::Notify::new());
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = {
        let (runs, table, gate) = (runs.clone(), table.clone(), gate.clone());
        Router::new()
            .route(
                "/payments",
                post(move || {
                    let (runs, table, gate) = (runs.clone(), table.clone(), gate.clone());
                    async move {
                        let n = runs.bump();
                        table.lock().unwrap().push(format!("payment {n}"));
                        if n == 1 {
                            gate.notified().await;
                        }
                        (StatusCode::CREATED, format!("holder {n}"))
                    }
                }),
            )
            .layer(layer)
    };
    ledger.faults().drop_renewals(true);
    let stalled = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    send(&app, pay("k", BODY)).await;
    ledger.faults().drop_renewals(false);
    gate.notify_one();
    stalled.await.unwrap();
    assert_eq!(
        table.lock().unwrap().len(),
        2,
        "without the transaction both holders' writes stay"
    );
}

#[tokio::test]
async fn handlers_without_the_extractor_behave_as_before() {
    let ledger = TxLedger::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_transactions()
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    assert_eq!(
        send(&app, pay("k", BODY)).await.0.status(),
        StatusCode::CREATED
    );
    assert!(is_replay(&send(&app, pay("k", BODY)).await.0));
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_extractor_without_transactional_mode_is_a_500_problem() {
    let layer = IdempotencyLayer::new(TxLedger::default());
    let app = Router::new()
        .route(
            "/payments",
            post(|_tx: LedgerTx<TxLedger>| async { StatusCode::CREATED }),
        )
        .layer(layer);
    let (response, body) = send(&app, pay("k", BODY)).await;
    assert_problem(&response, &body, 500, "handler-failed", "");
}

/// Two `LedgerTx` extractors in one handler: the second cannot have the transaction the first
/// holds. It is a 500 problem at once, never a wait for ever, and the key is released.
#[tokio::test]
async fn a_second_ledger_tx_in_one_request_is_a_500_not_a_hang() {
    let ledger = TxLedger::default();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_transactions()
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/payments",
            post(|_a: LedgerTx<TxLedger>, _b: LedgerTx<TxLedger>| async { StatusCode::CREATED }),
        )
        .layer(layer);
    let (response, body) =
        tokio::time::timeout(Duration::from_secs(5), send(&app, pay("twice", BODY)))
            .await
            .expect("the second extraction answered instead of waiting for the first");
    assert_problem(&response, &body, 500, "handler-failed", "twice");
    let detail = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["detail"].clone();
    assert!(detail.as_str().unwrap().contains("already"), "{detail}");
    assert!(table(&ledger).is_empty());
}
