//! What an operator sees of one record: [`RecordInfo`], from [`Ledger::inspect`] and
//! [`Ledger::stuck`](crate::Ledger::stuck).
//!
//! [`Ledger::inspect`]: crate::Ledger::inspect

use std::time::{Duration, SystemTime};

use http::StatusCode;

use crate::{FencingToken, Fingerprint, LedgerKey, OperationId, ScopeDigest, StoredResponse};

/// One record as an operator sees it: who it belongs to (digests only, never the raw key), where
/// it stands, and how big its stored response is. The body is included only when asked for.
///
/// Times are wall-clock (`SystemTime`), read from the ledger's own clock where it has one (the
/// database's, Redis's), so they can differ from this machine's by the clocks' skew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// The record's key (the digest of scope and idempotency key).
    pub key: LedgerKey,
    /// The digest of the scope that created the record.
    pub scope: ScopeDigest,
    /// The record's operation id.
    pub operation_id: OperationId,
    /// The fingerprint of the request that created the record.
    pub fingerprint: Fingerprint,
    /// When the record is treated as absent and purged.
    pub expires_at: SystemTime,
    /// In progress (with its lease) or completed (with its stored response's size).
    pub progress: Progress,
}

/// Where a record stands, for [`RecordInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A request holds, or held, the key.
    InProgress {
        /// The holder's fencing token: pass it to
        /// [`force_release`](crate::Ledger::force_release), which releases the key only if this
        /// holder still has it.
        token: FencingToken,
        /// When another request with the same fingerprint may take the key over.
        lease_until: SystemTime,
        /// The lease had lapsed when the record was read (the holder most likely crashed); by
        /// the ledger's clock.
        lease_lapsed: bool,
    },
    /// The key completed and its response is replayed.
    Completed {
        /// The stored status.
        status: StatusCode,
        /// The stored body's length in bytes (0 when the body was over the store limit).
        body_len: usize,
        /// The body was over the store limit and was not kept.
        body_omitted: bool,
        /// The stored response, only when asked for (`with_body`).
        response: Option<StoredResponse>,
    },
}

impl RecordInfo {
    /// Whether the record is in progress.
    pub fn is_in_progress(&self) -> bool {
        matches!(self.progress, Progress::InProgress { .. })
    }

    /// The holder's token, if the record is in progress.
    pub fn token(&self) -> Option<FencingToken> {
        match self.progress {
            Progress::InProgress { token, .. } => Some(token),
            Progress::Completed { .. } => None,
        }
    }
}

/// A time read as "`ms` milliseconds since the Unix epoch" (how the SQL and Redis ledgers store
/// time); negative values clamp to the epoch.
pub fn system_time_from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
