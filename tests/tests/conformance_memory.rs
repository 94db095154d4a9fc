//! The ledger conformance suite against `MemoryLedger`.

use tower_idempotency_core::{MemoryLedger, ledger_conformance_tests};

ledger_conformance_tests!(async { MemoryLedger::new() });
