//! For operators: one record as JSON ([`RecordView`]), and (feature `axum`) a scope-checked
//! router over the ledger's operator calls, [`IdempotencyLayer::admin_router`].
//!
//! [`IdempotencyLayer::admin_router`]: crate::IdempotencyLayer::admin_router

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tower_idempotency_core::{Progress, RecordInfo};
use uuid::Uuid;

/// One record as an operator sees it, ready to serialize: what the admin router answers, and
/// what a CLI prints with `--json`. Digests are lowercase hex; times are RFC 3339 (UTC,
/// milliseconds) with their distance from `now` in milliseconds (negative: in the past). The raw
/// idempotency key is never in it (the ledger never has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecordView {
    /// The ledger key (the digest of scope and idempotency key), 64 hex digits.
    pub ledger_key: String,
    /// Its first 16 hex digits: the `key` attribute of the layer's spans and log lines.
    pub key_attribute: String,
    /// The digest of the record's scope, 64 hex digits.
    pub scope: String,
    /// `"in_progress"` or `"completed"`.
    pub state: &'static str,
    /// The operation id.
    pub operation_id: Uuid,
    /// The fingerprint of the request that created the record, 64 hex digits.
    pub fingerprint: String,
    /// When the record expires and is purged.
    pub expires_at: String,
    /// Milliseconds from `now` to `expires_at`.
    pub expires_in_ms: i64,
    /// In progress: the holder's fencing token, to pass to a release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Uuid>,
    /// In progress: when another request may take the key over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<String>,
    /// In progress: milliseconds from `now` to `lease_until`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_in_ms: Option<i64>,
    /// In progress: the lease had lapsed when the ledger read it (the holder most likely
    /// crashed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_lapsed: Option<bool>,
    /// Completed: the stored status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Completed: the stored body's length in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_len: Option<usize>,
    /// Completed: the body was over the store limit and was not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_omitted: Option<bool>,
    /// Completed, when the body was asked for: the stored headers, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<(String, String)>>,
    /// Completed, when the body was asked for and it is UTF-8: the stored body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Completed, when the body was asked for and it is not UTF-8: the stored body in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
}

impl RecordView {
    /// The view of `info`, with times relative to `now`.
    pub fn new(info: &RecordInfo, now: SystemTime) -> Self {
        let mut view = Self {
            ledger_key: hex(info.key.as_bytes()),
            key_attribute: info.key.short(),
            scope: hex(info.scope.as_bytes()),
            state: "completed",
            operation_id: info.operation_id,
            fingerprint: hex(info.fingerprint.as_bytes()),
            expires_at: rfc3339(info.expires_at),
            expires_in_ms: millis_from(now, info.expires_at),
            token: None,
            lease_until: None,
            lease_in_ms: None,
            lease_lapsed: None,
            status: None,
            body_len: None,
            body_omitted: None,
            headers: None,
            body: None,
            body_hex: None,
        };
        match &info.progress {
            Progress::InProgress {
                token,
                lease_until,
                lease_lapsed,
            } => {
                view.state = "in_progress";
                view.token = Some(token.as_uuid());
                view.lease_until = Some(rfc3339(*lease_until));
                view.lease_in_ms = Some(millis_from(now, *lease_until));
                view.lease_lapsed = Some(*lease_lapsed);
            }
            Progress::Completed {
                status,
                body_len,
                body_omitted,
                response,
            } => {
                view.status = Some(status.as_u16());
                view.body_len = Some(*body_len);
                view.body_omitted = Some(*body_omitted);
                if let Some(response) = response {
                    view.headers = Some(
                        response
                            .headers
                            .iter()
                            .map(|(name, value)| {
                                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                                (name.as_str().to_owned(), value)
                            })
                            .collect(),
                    );
                    match std::str::from_utf8(&response.body) {
                        Ok(body) => view.body = Some(body.to_owned()),
                        Err(_) => view.body_hex = Some(hex(&response.body)),
                    }
                }
            }
        }
        view
    }
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds from `now` to `then`, negative if `then` is past.
fn millis_from(now: SystemTime, then: SystemTime) -> i64 {
    let clamp = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    match then.duration_since(now) {
        Ok(ahead) => clamp(ahead),
        Err(behind) => -clamp(behind.duration()),
    }
}

/// `time` as RFC 3339 in UTC with milliseconds, such as `2023-11-14T22:13:20.000Z`. Times before
/// the Unix epoch print as the epoch.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_idempotency::admin::rfc3339;
///
/// let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
/// assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
/// ```
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(feature = "axum")]
mod router;
