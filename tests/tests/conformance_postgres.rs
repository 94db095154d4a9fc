//! The ledger conformance suite against `PostgresLedger`, each check on a table of its own (so
//! that they run in parallel), dropped after it even when the check fails. Without
//! `DATABASE_URL` each test says it is skipped (and fails if `CI=true`).

mod common;

tower_idempotency_core::ledger_conformance_tests!(fixture: common::PgTable::create());
