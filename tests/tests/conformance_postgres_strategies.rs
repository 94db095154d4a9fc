//! The ledger conformance suite against `PostgresLedger` with each fixed `ClaimStrategy`: the
//! claim statement alone, a plain insert first, a plain read first. (conformance_postgres.rs
//! runs it with the default, `ClaimStrategy::Adaptive`, which moves between them.) Without
//! `DATABASE_URL` each test says it is skipped (and fails if `CI=true`).

mod common;

mod combined {
    tower_idempotency_core::ledger_conformance_tests!(
        fixture: super::common::PgTable::with_strategy(tower_idempotency_sqlx::ClaimStrategy::Combined)
    );
}

mod insert_first {
    tower_idempotency_core::ledger_conformance_tests!(
        fixture: super::common::PgTable::with_strategy(tower_idempotency_sqlx::ClaimStrategy::InsertFirst)
    );
}

mod read_first {
    tower_idempotency_core::ledger_conformance_tests!(
        fixture: super::common::PgTable::with_strategy(tower_idempotency_sqlx::ClaimStrategy::ReadFirst)
    );
}
