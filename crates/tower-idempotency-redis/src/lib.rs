//! A Redis ledger for tower-idempotency (docs to follow).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod error;
mod ledger;
mod notifier;

pub use error::ConfigError;
pub use ledger::{
    DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT, RedisLedger, RedisLedgerBuilder, script_sources,
};
pub use redis;
pub use tower_idempotency_core::{
    Claim, ClaimRequest, Ledger, LedgerError, StoredResponse, purge_periodically,
};
