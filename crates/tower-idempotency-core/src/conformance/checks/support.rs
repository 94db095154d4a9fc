//! What the checks share: requests with long leases, a sample response, and claims that
//! must acquire or must find a record.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::{
    Claim, ClaimRequest, Fingerprint, IdempotencyKey, Lease, Ledger, LedgerError, LedgerKey,
    ScopeDigest, StoredResponse,
};

/// A lease long enough never to expire during a check.
pub(super) const LONG: Duration = Duration::from_secs(60);

pub(super) fn request(
    key: &str,
    scope: &str,
    body: &str,
    lease: Duration,
    retention: Duration,
) -> ClaimRequest {
    let parsed = IdempotencyKey::parse(key.as_bytes()).expect("test keys are valid");
    ClaimRequest::new(
        LedgerKey::new(scope.as_bytes(), &parsed),
        ScopeDigest::new(scope.as_bytes()),
        Fingerprint::of(body.as_bytes()),
        lease,
        retention,
    )
}

pub(super) fn long(key: &str) -> ClaimRequest {
    request(key, "scope", "body", LONG, Duration::from_secs(3600))
}

/// A response with a repeated header whose order matters.
pub fn sample_response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.append(header::VARY, HeaderValue::from_static("b"));
    headers.append(header::VARY, HeaderValue::from_static("a"));
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(body),
        body_omitted: false,
    }
}

pub(super) async fn acquire<L: Ledger>(ledger: &L, request: &ClaimRequest) -> Lease {
    match ledger.claim(request).await.expect("claim failed") {
        Claim::Acquired(lease) => lease,
        Claim::Existing(existing) => panic!("expected to acquire the key, found {existing:?}"),
    }
}

pub(super) async fn existing<L: Ledger>(ledger: &L, request: &ClaimRequest) -> crate::Existing {
    match ledger.claim(request).await.expect("claim failed") {
        Claim::Existing(existing) => existing,
        Claim::Acquired(lease) => panic!("expected an existing record, acquired {lease:?}"),
    }
}

pub(super) fn assert_lease_lost(result: Result<(), LedgerError>, what: &str) {
    match result {
        Err(LedgerError::LeaseLost) => {}
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}
