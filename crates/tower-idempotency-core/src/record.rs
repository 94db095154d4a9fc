//! What the ledger stores about a request, and what a claim returns.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use uuid::Uuid;

use crate::{Fingerprint, LedgerError};

/// A response kept for replay: status, headers (every value of a repeated header, in order) and
/// body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The headers to replay (the layer has already removed hop-by-hop and denied headers).
    pub headers: HeaderMap,
    /// The body; empty when [`body_omitted`](Self::body_omitted) is set.
    pub body: Bytes,
    /// The body was larger than the store limit and was not kept: a replay carries status and
    /// headers only and says so.
    pub body_omitted: bool,
}

impl StoredResponse {
    /// How many bytes the record takes, roughly: headers plus body.
    pub fn stored_len(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
    }

    /// Encodes the headers for a backend that stores them as one binary column: per header, the
    /// name's length (u16, big-endian), the name, the value's length (u32), the value. Order is
    /// kept, repeated headers included.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, header::VARY};
    /// use tower_idempotency_core::StoredResponse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.append(VARY, HeaderValue::from_static("a"));
    /// headers.append(VARY, HeaderValue::from_static("b"));
    /// let bytes = StoredResponse::encode_headers(&headers);
    /// assert_eq!(StoredResponse::decode_headers(&bytes).unwrap(), headers);
    /// ```
    pub fn encode_headers(headers: &HeaderMap) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            headers
                .iter()
                .map(|(n, v)| 6 + n.as_str().len() + v.len())
                .sum(),
        );
        for (name, value) in headers {
            // Header names are short (hyper refuses names over 64 KiB) and values are bounded
            // by the response size, so the lengths fit their widths.
            out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Decodes [`encode_headers`](Self::encode_headers) output; anything malformed is
    /// [`LedgerError::Corrupt`], never a panic.
    pub fn decode_headers(mut bytes: &[u8]) -> Result<HeaderMap, LedgerError> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], LedgerError> {
            if bytes.len() < n {
                return Err(LedgerError::corrupt("stored headers are truncated"));
            }
            let (head, tail) = bytes.split_at(n);
            *bytes = tail;
            Ok(head)
        }
        let mut headers = HeaderMap::new();
        while !bytes.is_empty() {
            let len = take(&mut bytes, 2)?;
            let name = take(&mut bytes, u16::from_be_bytes([len[0], len[1]]) as usize)?;
            let len = take(&mut bytes, 4)?;
            let value = take(
                &mut bytes,
                u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize,
            )?;
            let name = HeaderName::from_bytes(name)
                .map_err(|_| LedgerError::corrupt("stored header name is invalid"))?;
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| LedgerError::corrupt("stored header value is invalid"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

/// An opaque, unguessable fencing token, fresh for every successful claim.
///
/// [`complete`](crate::Ledger::complete), [`release`](crate::Ledger::release) and
/// [`renew`](crate::Ledger::renew) succeed only with the current token, so a request whose lease
/// was taken over can never overwrite the newer holder's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FencingToken(Uuid);

impl FencingToken {
    /// A new random token.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Wraps a token read back from storage.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The token as a UUID, for storage.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for FencingToken {
    fn default() -> Self {
        Self::new()
    }
}

/// The id of one logical operation (one key within one scope). It stays the same when a lease is
/// taken over, so a `Location` handed out earlier keeps working.
pub type OperationId = Uuid;

/// What a won claim hands the caller: the right to run the handler and record its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The token to present to complete, release and renew.
    pub token: FencingToken,
    /// The operation id of the record.
    pub operation_id: OperationId,
    /// The key was held by a request whose lease had expired (a crash, most likely), and this
    /// claim took it over.
    pub taken_over: bool,
}

/// The state of a record: what a claim found and did not take, and what the operation-status
/// resource reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Another request holds the key (a live lease, or, in a claim's answer, one that expired
    /// and that nobody has taken over yet).
    InProgress,
    /// Only from [`Ledger::operation`](crate::Ledger::operation): the request that holds the
    /// key let its lease lapse (its process crashed or stalled) and nobody has taken it over.
    /// Its handler may or may not have run; the client should send the request again with the
    /// same key, which takes the key over.
    Abandoned,
    /// The key completed; this is the response to replay.
    Completed(StoredResponse),
}

/// A record found by a claim that did not win it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    /// The fingerprint of the request that created the record.
    pub fingerprint: Fingerprint,
    /// The record's operation id.
    pub operation_id: OperationId,
    /// In progress or completed.
    pub state: RecordState,
    /// How long the record had left before it expires, as the ledger saw it at this claim;
    /// `None` when the ledger does not say. [`CachedLedger`](crate::CachedLedger) caches a
    /// completed record only when this is known.
    pub expires_in: Option<Duration>,
}

/// The result of [`Ledger::claim`](crate::Ledger::claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the key and must run the handler, then complete or release.
    Acquired(Lease),
    /// The key is held or completed by another request; nothing was written.
    Existing(Existing),
}
