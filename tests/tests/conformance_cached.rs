//! The ledger conformance suite against `CachedLedger<MemoryLedger>`: the cache in front of a
//! ledger that reports each record's remaining lifetime, so completed records are cached.

use tower_idempotency_core::{CachedLedger, MemoryLedger, ledger_conformance_tests};

ledger_conformance_tests!(async { CachedLedger::new(MemoryLedger::new()) });
