//! Turning stored columns back into records, without trusting them: anything malformed is
//! [`LedgerError::Corrupt`], never a panic.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use sqlx::{ColumnIndex, Decode, Row, Type};
use tower_idempotency_core::{
    Existing, FencingToken, Fingerprint, LedgerError, LedgerKey, Progress, RecordInfo, RecordState,
    ScopeDigest, StoredResponse, system_time_from_millis,
};
use uuid::Uuid;

pub(crate) const IN_PROGRESS: &str = "in_progress";
pub(crate) const COMPLETED: &str = "completed";

/// The columns of a record that a claim or a lookup reads back.
pub(crate) struct StoredColumns {
    pub(crate) state: String,
    pub(crate) status: Option<i64>,
    pub(crate) headers: Option<Vec<u8>>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) body_omitted: bool,
}

impl StoredColumns {
    pub(crate) fn into_state(self) -> Result<RecordState, LedgerError> {
        match self.state.as_str() {
            IN_PROGRESS => Ok(RecordState::InProgress),
            COMPLETED => Ok(RecordState::Completed(self.into_response()?)),
            other => Err(LedgerError::corrupt(format!(
                "unknown record state {other:?}"
            ))),
        }
    }

    fn into_response(self) -> Result<StoredResponse, LedgerError> {
        let status = self
            .status
            .ok_or_else(|| LedgerError::corrupt("a completed record has no status"))?;
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| LedgerError::corrupt(format!("stored status {status} is invalid")))?;
        let headers = StoredResponse::decode_headers(self.headers.as_deref().unwrap_or_default())?;
        Ok(StoredResponse {
            status,
            headers,
            body: Bytes::from(self.body.unwrap_or_default()),
            body_omitted: self.body_omitted,
        })
    }
}

/// The record columns of `row` (a claim's read-back, or an operation lookup), in either database.
pub(crate) fn columns<R>(row: &R) -> Result<StoredColumns, LedgerError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i16: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Vec<u8>: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
{
    // A smallint in PostgreSQL; in SQLite, an integer out of its range does not decode.
    let status: Option<i16> = row.try_get("status").map_err(error)?;
    Ok(StoredColumns {
        state: row.try_get("state").map_err(error)?,
        status: status.map(i64::from),
        headers: row.try_get("headers").map_err(error)?,
        body: row.try_get("body").map_err(error)?,
        body_omitted: row.try_get("body_omitted").map_err(error)?,
    })
}

/// The record a claim lost to, from its columns (`fingerprint`, `operation_id`, `expires_in`
/// and [`columns`]).
pub(crate) fn existing<R>(row: &R) -> Result<Existing, LedgerError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i16: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Vec<u8>: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Uuid: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
{
    let fingerprint_bytes: Vec<u8> = row.try_get("fingerprint").map_err(error)?;
    // Milliseconds to the record's expiry, by the database's clock (for `CachedLedger`).
    let expires_in: Option<i64> = row.try_get("expires_in").map_err(error)?;
    Ok(Existing {
        fingerprint: fingerprint(&fingerprint_bytes)?,
        operation_id: uuid(row, "operation_id")?,
        state: columns(row)?.into_state()?,
        expires_in: expires_in.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
    })
}

/// A 32-byte digest column.
fn digest<R>(row: &R, column: &str) -> Result<[u8; 32], LedgerError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> Vec<u8>: Decode<'a, R::Database> + Type<R::Database>,
{
    let bytes: Vec<u8> = row.try_get(column).map_err(error)?;
    <[u8; 32]>::try_from(&bytes[..]).map_err(|_| {
        LedgerError::corrupt(format!("stored {column} is {} bytes, not 32", bytes.len()))
    })
}

/// A record for operators, from the columns of the `inspect` and `stuck` statements (those of
/// [`columns`] and `key`, `scope`, `fingerprint`, `operation_id`, `token`, `lease_until_ms`,
/// `lapsed`, `expires_at_ms`, `body_len`). The response is kept only if `with_body`.
pub(crate) fn info<R>(row: &R, with_body: bool) -> Result<RecordInfo, LedgerError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i16: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Vec<u8>: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Uuid: Decode<'a, R::Database> + Type<R::Database>,
{
    let stored = columns(row)?;
    let progress = match stored.state.as_str() {
        IN_PROGRESS => {
            let lease_until: Option<i64> = row.try_get("lease_until_ms").map_err(error)?;
            let lease_until = lease_until
                .ok_or_else(|| LedgerError::corrupt("an in-progress record has no lease"))?;
            Progress::InProgress {
                token: FencingToken::from_uuid(uuid(row, "token")?),
                lease_until: system_time_from_millis(lease_until),
                lease_lapsed: row.try_get("lapsed").map_err(error)?,
            }
        }
        _ => {
            let body_len: i64 = row.try_get("body_len").map_err(error)?;
            let RecordState::Completed(response) = stored.into_state()? else {
                return Err(LedgerError::corrupt(
                    "a record neither in progress nor completed",
                ));
            };
            Progress::Completed {
                status: response.status,
                body_len: usize::try_from(body_len).unwrap_or(0),
                body_omitted: response.body_omitted,
                response: with_body.then_some(response),
            }
        }
    };
    let expires_at: i64 = row.try_get("expires_at_ms").map_err(error)?;
    Ok(RecordInfo {
        key: LedgerKey::from_bytes(digest(row, "key")?),
        scope: ScopeDigest::from_bytes(digest(row, "scope")?),
        operation_id: uuid(row, "operation_id")?,
        fingerprint: Fingerprint::from_bytes(digest(row, "fingerprint")?),
        expires_at: system_time_from_millis(expires_at),
        progress,
    })
}

/// A UUID column.
pub(crate) fn uuid<R>(row: &R, column: &str) -> Result<Uuid, LedgerError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> Uuid: Decode<'a, R::Database> + Type<R::Database>,
{
    row.try_get(column).map_err(error)
}

/// A stored fingerprint: exactly 32 bytes.
pub(crate) fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, LedgerError> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint::from_bytes)
        .map_err(|_| {
            LedgerError::corrupt(format!(
                "stored fingerprint is {} bytes, not 32",
                bytes.len()
            ))
        })
}

/// A value that did not decode as its column's type is a corrupt record; every other failure is
/// the backend's.
pub(crate) fn error(error: sqlx::Error) -> LedgerError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            LedgerError::corrupt(error.to_string())
        }
        other => LedgerError::backend(other),
    }
}

/// A duration in whole milliseconds, capped at about 100 years so that adding it to a timestamp
/// cannot overflow in either database.
pub(crate) fn millis(duration: Duration) -> i64 {
    const CAP: i64 = tower_idempotency_core::MAX_DURATION.as_millis() as i64;
    i64::try_from(duration.as_millis()).map_or(CAP, |ms| ms.min(CAP))
}

/// No row written means the token is not (or no longer) the holder's.
pub(crate) fn fenced(rows: u64) -> Result<(), LedgerError> {
    if rows == 0 {
        Err(LedgerError::LeaseLost)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(status: Option<i64>, headers: Option<Vec<u8>>) -> StoredColumns {
        StoredColumns {
            state: COMPLETED.to_owned(),
            status,
            headers,
            body: None,
            body_omitted: false,
        }
    }

    #[test]
    fn malformed_columns_are_corrupt() {
        for columns in [
            completed(None, None),
            completed(Some(1000), None),
            completed(Some(-1), None),
            completed(Some(70_000), None),
            completed(Some(200), Some(vec![0, 9, b'x'])),
            StoredColumns {
                state: "done".to_owned(),
                ..completed(Some(200), None)
            },
        ] {
            assert!(matches!(
                columns.into_state(),
                Err(LedgerError::Corrupt { .. })
            ));
        }
        assert!(matches!(
            fingerprint(&[0; 31]),
            Err(LedgerError::Corrupt { .. })
        ));
        assert!(completed(Some(200), None).into_state().is_ok());
    }

    #[test]
    fn millis_saturates() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert!(millis(Duration::MAX) > 0);
    }
}
