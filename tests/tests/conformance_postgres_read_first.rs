//! The ledger conformance suite against `PostgresLedger` with `ReadFirst::Always`: every claim
//! reads the record with a plain `SELECT` before the claim statement (the default,
//! `ReadFirst::Adaptive`, does so in a retry storm; conformance_postgres.rs runs the suite as
//! the default starts, claiming first). Without `DATABASE_URL` each test says it is skipped (and
//! fails if `CI=true`).

mod common;

tower_idempotency_core::ledger_conformance_tests!(
    fixture: common::PgTable::reading_first(tower_idempotency_sqlx::ReadFirst::Always)
);
