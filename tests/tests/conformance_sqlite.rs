//! The ledger conformance suite against `SqliteLedger`: on a file (a fresh one per test) and in
//! memory.

mod common;

mod file {
    use tower_idempotency_core::ledger_conformance_tests;

    ledger_conformance_tests!(async { super::common::sqlite_file_ledger().await });
}

mod memory {
    use tower_idempotency_core::ledger_conformance_tests;

    ledger_conformance_tests!(async { super::common::sqlite_memory_ledger().await });
}
