//! The ledger side of [tower-idempotency](https://docs.rs/tower-idempotency): the [`Ledger`]
//! trait and its contract, the records it keeps, idempotency keys and request fingerprints, and
//! [`MemoryLedger`].
//!
//! This crate has no HTTP server dependency, so a ledger backend can depend on it alone. Backend
//! authors check their implementation with the conformance suite (feature `conformance`):
//!
//! ```toml
//! [dev-dependencies]
//! tower-idempotency-core = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! and then, in a test file, `ledger_conformance_tests!(async { YourLedger::new() });` expands to
//! one test per rule of the contract (see the `conformance` module). A ledger on an external
//! service gives `ledger_conformance_tests!(fixture: ..)` a factory that can skip and that tears
//! its table down after each check, even a failed one.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cache;
mod error;
pub mod fingerprint;
mod inspect;
mod key;
mod ledger;
mod memory;
pub mod notify;
mod record;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use cache::CachedLedger;
pub use error::{BoxError, LedgerError};
pub use fingerprint::Fingerprint;
pub use inspect::{Progress, RecordInfo, system_time_from_millis};
pub use key::{IdempotencyKey, KeyError, LedgerKey, MAX_KEY_LEN, ScopeDigest};
pub use ledger::{ClaimRequest, Ledger, MAX_DURATION, TransactionalLedger, purge_periodically};
pub use memory::MemoryLedger;
pub use record::{Claim, Existing, FencingToken, Lease, OperationId, RecordState, StoredResponse};
