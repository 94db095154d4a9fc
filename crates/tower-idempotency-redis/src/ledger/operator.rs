//! The operator calls: `inspect` of one record, and `stuck` by `SCAN` of the prefix.

use std::time::Duration;

use redis::Value;
use tower_idempotency_core::{
    FencingToken, LedgerError, LedgerKey, Progress, RecordInfo, RecordState, ScopeDigest,
    system_time_from_millis,
};

use super::{RedisLedger, error, scripts::INSPECT};
use crate::codec;

/// How many keys [`stuck`](tower_idempotency_core::Ledger::stuck) scans at most, so that one call on a large keyspace
/// stays bounded; a record beyond it is not listed.
pub const STUCK_SCAN_LIMIT: usize = 10_000;

/// At most this many `SCAN` calls (of 1,000 keys each) per `stuck`: 200,000 keys examined.
const STUCK_SCAN_CALLS: usize = 200;

impl RedisLedger {
    /// The record under the Redis key `record`, for operators.
    pub(super) async fn inspect_record(
        &self,
        record: &str,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        let reply: Option<Vec<Value>> = self.invoke(&INSPECT.key(record)).await?;
        let Some(fields) = reply else {
            return Ok(None);
        };
        let [st, tk, lu, fp, op, sc, rs, pttl, now]: [Value; 9] = fields
            .try_into()
            .map_err(|_| LedgerError::corrupt("inspect returned the wrong number of fields"))?;
        let number = |value: Value, what: &str| -> Result<i64, LedgerError> {
            let text = codec::bytes(value, what)?.unwrap_or_default();
            std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| LedgerError::corrupt(format!("stored {what} is not a number")))
        };
        let digest = |value: Value, what: &str| -> Result<[u8; 32], LedgerError> {
            let b = codec::bytes(value, what)?.unwrap_or_default();
            <[u8; 32]>::try_from(&b[..])
                .map_err(|_| LedgerError::corrupt(format!("stored {what} is not 32 bytes")))
        };
        let key = record
            .strip_prefix(&self.inner.prefix)
            .and_then(|rest| rest.strip_prefix('{')?.strip_suffix('}'))
            .and_then(|hex| {
                let mut out = [0u8; 32];
                (hex.len() == 64).then_some(())?;
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some(LedgerKey::from_bytes(out))
            })
            .ok_or_else(|| LedgerError::corrupt("a record key is not a ledger key"))?;
        let now = number(now, "server time")?;
        let pttl = number(pttl, "expiry")?;
        let lease_until = number(lu, "lease")?;
        let progress = match codec::state(st, rs)? {
            // `codec::state` reads the stored state only; whether the lease lapsed is below.
            RecordState::InProgress | RecordState::Abandoned => {
                let token = codec::bytes(tk, "token")?.unwrap_or_default();
                let token = <[u8; 16]>::try_from(&token[..])
                    .map_err(|_| LedgerError::corrupt("stored token is not 16 bytes"))?;
                Progress::InProgress {
                    token: FencingToken::from_uuid(uuid::Uuid::from_bytes(token)),
                    lease_until: system_time_from_millis(lease_until),
                    lease_lapsed: lease_until <= now,
                }
            }
            RecordState::Completed(response) => Progress::Completed {
                status: response.status,
                body_len: response.body.len(),
                body_omitted: response.body_omitted,
                response: with_body.then_some(response),
            },
        };
        Ok(Some(RecordInfo {
            key,
            scope: ScopeDigest::from_bytes(digest(sc, "scope")?),
            operation_id: codec::operation_id(op)?,
            fingerprint: codec::fingerprint(fp)?,
            // A record without an expiry (PTTL -1) is not one of ours; report it as expiring now.
            expires_at: system_time_from_millis(now + pttl.max(0)),
            progress,
        }))
    }

    /// Up to [`STUCK_SCAN_LIMIT`] record keys under the prefix (operation-index keys excluded),
    /// by `SCAN`.
    pub(super) async fn scan_records(&self) -> Result<Vec<String>, LedgerError> {
        let mut pattern = String::new();
        for c in self.inner.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("{*");
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        // SCAN walks the whole keyspace, whatever MATCH keeps: bound the walk too, so that a
        // Redis shared with other data answers in bounded time (the calls are bounded each).
        for _ in 0..STUCK_SCAN_CALLS {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = self
                .call(async { self.inner.connection.query(&scan).await.map_err(error) })
                .await?;
            keys.extend(batch);
            if next == 0 || keys.len() >= STUCK_SCAN_LIMIT {
                keys.truncate(STUCK_SCAN_LIMIT);
                return Ok(keys);
            }
            cursor = next;
        }
        tracing::warn!(
            examined = STUCK_SCAN_CALLS * 1000,
            found = keys.len(),
            "stuck: the Redis keyspace is larger than one scan walks; the list may be partial"
        );
        Ok(keys)
    }

    /// The claims whose lease lapsed at least `older_than` ago, longest lapsed first, up to
    /// `limit`: what [`Ledger::stuck`](tower_idempotency_core::Ledger::stuck) answers.
    pub(super) async fn stuck_records(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        if self.inner.cluster {
            return Err(LedgerError::Unsupported { operation: "stuck" });
        }
        let older_than = older_than.min(tower_idempotency_core::MAX_DURATION);
        let mut found = Vec::new();
        for record in self.scan_records().await? {
            let info = self.call(self.inspect_record(&record, false)).await?;
            if let Some(
                info @ RecordInfo {
                    progress: Progress::InProgress { lease_until, .. },
                    ..
                },
            ) = info
            {
                // Judged by Redis's clock: the record said whether its lease lapsed, and when.
                let lapsed_for = match &info.progress {
                    Progress::InProgress {
                        lease_lapsed: true, ..
                    } => std::time::SystemTime::now()
                        .duration_since(lease_until)
                        .unwrap_or_default(),
                    _ => continue,
                };
                if lapsed_for >= older_than {
                    found.push((lease_until, info));
                }
            }
        }
        found.sort_by_key(|(lease_until, _)| *lease_until);
        Ok(found
            .into_iter()
            .take(limit)
            .map(|(_, info)| info)
            .collect())
    }
}
