//! The stored response as one binary field, and the replies of the scripts turned back into
//! records, without trusting them: anything malformed is [`LedgerError::Corrupt`], never a panic.

use bytes::Bytes;
use http::StatusCode;
use redis::Value;
use tower_idempotency_core::{
    Existing, Fingerprint, LedgerError, OperationId, RecordState, StoredResponse,
};

/// The first byte of an encoded response; a later layout gets another.
const VERSION: u8 = 1;
/// Flag bit: the body was over the store limit and not kept.
const BODY_OMITTED: u8 = 1;
/// version, status, flags, headers length.
const HEAD: usize = 1 + 2 + 1 + 4;

/// Encodes a response as `[version u8][status u16][flags u8][headers length u32][headers][body]`
/// (big-endian), the headers as [`StoredResponse::encode_headers`] writes them: every value of
/// a repeated header, in order, as opaque bytes.
pub(crate) fn encode_response(response: &StoredResponse) -> Vec<u8> {
    let headers = StoredResponse::encode_headers(&response.headers);
    let mut out = Vec::with_capacity(HEAD + headers.len() + response.body.len());
    out.push(VERSION);
    out.extend_from_slice(&response.status.as_u16().to_be_bytes());
    out.push(if response.body_omitted {
        BODY_OMITTED
    } else {
        0
    });
    // A response's headers are bounded by the store limit, far below 4 GiB.
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(&response.body);
    out
}

/// Decodes [`encode_response`] output. The body is a slice of `blob`, not a copy.
pub(crate) fn decode_response(blob: Bytes) -> Result<StoredResponse, LedgerError> {
    if blob.len() < HEAD {
        return Err(LedgerError::corrupt("stored response is truncated"));
    }
    if blob[0] != VERSION {
        return Err(LedgerError::corrupt(format!(
            "stored response has unknown version {}",
            blob[0]
        )));
    }
    let status = u16::from_be_bytes([blob[1], blob[2]]);
    let status = StatusCode::from_u16(status)
        .map_err(|_| LedgerError::corrupt(format!("stored status {status} is invalid")))?;
    let flags = blob[3];
    if flags & !BODY_OMITTED != 0 {
        return Err(LedgerError::corrupt("stored response has unknown flags"));
    }
    let len = u32::from_be_bytes([blob[4], blob[5], blob[6], blob[7]]) as usize;
    let end = HEAD
        .checked_add(len)
        .filter(|&end| end <= blob.len())
        .ok_or_else(|| LedgerError::corrupt("stored headers are truncated"))?;
    let headers = StoredResponse::decode_headers(&blob[HEAD..end])?;
    Ok(StoredResponse {
        status,
        headers,
        body: blob.slice(end..),
        body_omitted: flags & BODY_OMITTED != 0,
    })
}

/// The bytes of a bulk-string reply (`None` for nil), or a corrupt-record error.
pub(crate) fn bytes(value: Value, what: &str) -> Result<Option<Bytes>, LedgerError> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(Bytes::from(b))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s.into_bytes()))),
        other => Err(LedgerError::corrupt(format!(
            "{what}: expected a string reply, got {other:?}"
        ))),
    }
}

fn required(value: Value, what: &str) -> Result<Bytes, LedgerError> {
    bytes(value, what)?.ok_or_else(|| LedgerError::corrupt(format!("{what} is missing")))
}

pub(crate) fn operation_id(value: Value) -> Result<OperationId, LedgerError> {
    let b = required(value, "operation id")?;
    <[u8; 16]>::try_from(&b[..])
        .map(OperationId::from_bytes)
        .map_err(|_| LedgerError::corrupt("stored operation id is not 16 bytes"))
}

pub(crate) fn fingerprint(value: Value) -> Result<Fingerprint, LedgerError> {
    let b = required(value, "fingerprint")?;
    <[u8; 32]>::try_from(&b[..])
        .map(Fingerprint::from_bytes)
        .map_err(|_| LedgerError::corrupt("stored fingerprint is not 32 bytes"))
}

/// A record's state from its `st` and `rs` fields.
pub(crate) fn state(st: Value, rs: Value) -> Result<RecordState, LedgerError> {
    match &required(st, "record state")?[..] {
        b"p" => Ok(RecordState::InProgress),
        b"c" => Ok(RecordState::Completed(decode_response(required(
            rs,
            "stored response",
        )?)?)),
        other => Err(LedgerError::corrupt(format!(
            "unknown record state {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// What the claim script answers.
pub(crate) enum ClaimReply {
    /// The claim won: a fresh record (`taken_over` false) or a takeover, with its operation id.
    Won {
        taken_over: bool,
        operation_id: OperationId,
    },
    /// The record that holds the key.
    Lost(Existing),
}

/// Parses `{1, op}` (fresh), `{2, op}` (takeover) or `{0, fp, op, st, rs}` (existing).
pub(crate) fn claim_reply(value: Value) -> Result<ClaimReply, LedgerError> {
    let Value::Array(items) = value else {
        return Err(LedgerError::corrupt(format!(
            "claim: expected an array reply, got {value:?}"
        )));
    };
    let mut items = items.into_iter();
    let mut next = || items.next().unwrap_or(Value::Nil);
    match next() {
        Value::Int(won @ (1 | 2)) => Ok(ClaimReply::Won {
            taken_over: won == 2,
            operation_id: operation_id(next())?,
        }),
        Value::Int(0) => {
            let fingerprint = fingerprint(next())?;
            let operation_id = operation_id(next())?;
            let (st, rs) = (next(), next());
            // PTTL: milliseconds to the record's expiry (negative: none, or gone).
            let expires_in = match next() {
                Value::Int(ms) if ms >= 0 => Some(std::time::Duration::from_millis(ms as u64)),
                _ => None,
            };
            Ok(ClaimReply::Lost(Existing {
                fingerprint,
                operation_id,
                state: state(st, rs)?,
                expires_in,
            }))
        }
        other => Err(LedgerError::corrupt(format!(
            "claim: unexpected reply {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, header};

    use super::*;

    fn response(body: &[u8], omitted: bool) -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=1"));
        headers.append(header::VARY, HeaderValue::from_static("x"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=2"));
        headers.append(
            "x-bin",
            HeaderValue::from_bytes(&[0x80, 0xfe, b'\t', 0xff]).unwrap(),
        );
        headers.append("x-empty", HeaderValue::from_static(""));
        StoredResponse {
            status: StatusCode::from_u16(599).unwrap(),
            headers,
            body: Bytes::copy_from_slice(body),
            body_omitted: omitted,
        }
    }

    fn pairs(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn responses_round_trip_exactly() {
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        for r in [
            response(&body, false),
            response(b"", false),
            response(b"", true),
        ] {
            let back = decode_response(Bytes::from(encode_response(&r))).unwrap();
            assert_eq!(back, r);
            assert_eq!(pairs(&back.headers), pairs(&r.headers), "header order");
        }
    }

    #[test]
    fn malformed_blobs_are_corrupt_not_panics() {
        let good = encode_response(&response(b"body", false));
        for n in 0..good.len() {
            // Every truncation inside the headers is caught; cutting the body is undetectable
            // by design (the body is the rest), so only check up to the body.
            if n < good.len() - 4 {
                assert!(
                    matches!(
                        decode_response(Bytes::copy_from_slice(&good[..n])),
                        Err(LedgerError::Corrupt { .. })
                    ),
                    "prefix of {n} bytes"
                );
            }
        }
        let mut bad = good.clone();
        bad[0] = 9;
        assert!(decode_response(Bytes::from(bad)).is_err());
        let mut bad = good.clone();
        bad[3] = 0x80;
        assert!(decode_response(Bytes::from(bad)).is_err());
        let mut bad = good;
        bad[1..3].copy_from_slice(&42u16.to_be_bytes());
        assert!(decode_response(Bytes::from(bad)).is_err());
    }

    #[test]
    fn claim_replies_parse() {
        let op = OperationId::new_v4();
        let won = Value::Array(vec![
            Value::Int(2),
            Value::BulkString(op.as_bytes().to_vec()),
        ]);
        assert!(matches!(
            claim_reply(won).unwrap(),
            ClaimReply::Won { taken_over: true, operation_id } if operation_id == op
        ));
        let lost = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(vec![7; 32]),
            Value::BulkString(op.as_bytes().to_vec()),
            Value::BulkString(b"p".to_vec()),
            Value::BulkString(vec![]),
        ]);
        let ClaimReply::Lost(existing) = claim_reply(lost).unwrap() else {
            panic!("expected an existing record")
        };
        assert_eq!(existing.state, RecordState::InProgress);
        assert_eq!(existing.operation_id, op);
        assert!(claim_reply(Value::Array(vec![Value::Int(0)])).is_err());
        assert!(claim_reply(Value::Int(1)).is_err());
    }
}
