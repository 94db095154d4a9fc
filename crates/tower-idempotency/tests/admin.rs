//! The admin router (`IdempotencyLayer::admin_router`): inspect, release, evict and stuck, each
//! for the caller's own scope only.

#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::time::Duration;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
    routing::post,
};
use serde_json::Value;
use support::*;
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, Ledger, MemoryLedger,
    core::{Claim, ClaimRequest, FencingToken, LedgerKey, ScopeDigest},
};

const BODY: &str = r#"{"amount":100,"currency":"EUR"}"#;
const BASE: &str = "/admin/idempotency";

/// `POST /payments` (201) and `POST /declined` (402, stored like any 4xx), both counting their
/// runs, behind a layer scoped by `x-tenant`; the admin router merged beside them.
fn app(runs: &Runs) -> (Router, MemoryLedger) {
    let ledger = MemoryLedger::new();
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_scope(|parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    let declined = {
        let runs = runs.clone();
        post(move || {
            let runs = runs.clone();
            async move {
                runs.bump();
                (StatusCode::PAYMENT_REQUIRED, "card declined")
            }
        })
    };
    let app = payments(runs.clone(), Duration::ZERO)
        .route("/declined", declined)
        .layer(layer.clone())
        .merge(layer.admin_router(BASE));
    (app, ledger)
}

fn as_tenant(tenant: &str, request: Request<Body>) -> Request<Body> {
    let mut request = request;
    request
        .headers_mut()
        .insert("x-tenant", tenant.parse().unwrap());
    request
}

fn admin(method: &str, tenant: &str, path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("{BASE}{path}"))
        .header("x-tenant", tenant)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn json(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (response, body) = send(app, request).await;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (response.status(), value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A claim of `key` in `tenant`'s scope whose holder "crashed": its lease lapses after 10 ms.
async fn abandoned_claim(ledger: &MemoryLedger, tenant: &str, key: &str) -> FencingToken {
    let request = claim_request(tenant, key);
    match ledger.claim(&request).await.unwrap() {
        Claim::Acquired(lease) => lease.token,
        Claim::Existing(_) => panic!("the key was free"),
    }
}

fn claim_request(tenant: &str, key: &str) -> ClaimRequest {
    let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
    ClaimRequest::new(
        LedgerKey::new(tenant.as_bytes(), &key),
        ScopeDigest::new(tenant.as_bytes()),
        tower_idempotency::Fingerprint::of(b"whatever the crashed request sent"),
        Duration::from_millis(10),
        Duration::from_secs(3600),
    )
}

#[tokio::test]
async fn inspect_a_paid_key_and_another_scope_gets_404() {
    let runs = Runs::default();
    let (app, _) = app(&runs);
    let (paid, _) = send(&app, as_tenant("alice", pay("order-42", BODY))).await;
    assert_eq!(paid.status(), StatusCode::CREATED);

    let (status, record) = json(&app, admin("GET", "alice", "/keys/order-42", "")).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["state"], "completed");
    assert_eq!(record["status"], 201);
    assert!(record["body_len"].as_u64().unwrap() > 0, "{record}");
    assert!(record["operation_id"].is_string());
    assert_eq!(record["fingerprint"].as_str().unwrap().len(), 64);
    let key = LedgerKey::new(b"alice", &IdempotencyKey::parse(b"order-42").unwrap());
    assert_eq!(record["ledger_key"], hex(key.as_bytes()));
    assert_eq!(record["scope"], hex(ScopeDigest::new(b"alice").as_bytes()));
    assert!(record["expires_in_ms"].as_i64().unwrap() > 0);
    assert!(
        record.get("body").is_none(),
        "no body unless asked: {record}"
    );
    assert!(
        !record.to_string().contains("order-42"),
        "the raw key leaked"
    );

    let (status, with_body) =
        json(&app, admin("GET", "alice", "/keys/order-42?body=true", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        with_body["body"].as_str().unwrap().contains(r#""run":1"#),
        "{with_body}"
    );

    // Bob's order-42 is another record (none), and bob cannot touch alice's.
    for (method, path) in [
        ("GET", "/keys/order-42"),
        ("DELETE", "/keys/order-42"),
        (
            "POST",
            "/keys/order-42/release?token=00000000-0000-0000-0000-000000000000",
        ),
    ] {
        let request = admin(method, "bob", path, "");
        let (response, body) = send(&app, request).await;
        assert_problem(&response, &body, 404, "record-not-found", "order-42");
    }
    let (status, _) = json(&app, admin("GET", "alice", "/keys/order-42", "")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "bob's calls left alice's record alone"
    );

    // A malformed key is 400 (a control character, percent-encoded in the path).
    let (response, body) = send(&app, admin("GET", "alice", "/keys/bad%01key", "")).await;
    assert_problem(&response, &body, 400, "invalid-key", "");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn release_a_stuck_claim_with_its_token_then_the_retry_runs_once() {
    let runs = Runs::default();
    let (app, ledger) = app(&runs);
    let crashed = abandoned_claim(&ledger, "alice", "order-7").await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (status, record) = json(&app, admin("GET", "alice", "/keys/order-7", "")).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["state"], "in_progress");
    assert_eq!(record["lease_lapsed"], true);
    assert!(record["lease_in_ms"].as_i64().unwrap() <= 0, "{record}");
    assert_eq!(record["token"], crashed.as_uuid().to_string());

    // A token that is not the record's changes nothing.
    let stranger = FencingToken::new().as_uuid();
    let (response, body) = send(
        &app,
        admin(
            "POST",
            "alice",
            &format!("/keys/order-7/release?token={stranger}"),
            "",
        ),
    )
    .await;
    assert_problem(&response, &body, 409, "token-stale", "order-7");
    // No token at all is 400.
    let (response, body) = send(&app, admin("POST", "alice", "/keys/order-7/release", "")).await;
    assert_problem(&response, &body, 400, "invalid-token", "order-7");

    // The token seen in inspect releases it (given in the body this time).
    let token = record["token"].as_str().unwrap();
    let (status, released) = json(
        &app,
        admin(
            "POST",
            "alice",
            "/keys/order-7/release",
            &format!(r#"{{"token":"{token}"}}"#),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{released}");
    assert_eq!(released["released"], true);
    assert_eq!(released["operation_id"], record["operation_id"]);
    let (status, _) = json(&app, admin("GET", "alice", "/keys/order-7", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "released: gone");

    // The retry runs the handler once; the next one is its replay.
    let (first, _) = send(&app, as_tenant("alice", pay("order-7", BODY))).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!is_replay(&first));
    let (again, _) = send(&app, as_tenant("alice", pay("order-7", BODY))).await;
    assert!(is_replay(&again));
    assert_eq!(runs.get(), 1);

    // The old token is stale now that the key completed.
    let (response, body) = send(
        &app,
        admin(
            "POST",
            "alice",
            &format!("/keys/order-7/release?token={token}"),
            "",
        ),
    )
    .await;
    assert_problem(&response, &body, 409, "token-stale", "order-7");
    let (_, record) = json(&app, admin("GET", "alice", "/keys/order-7", "")).await;
    assert_eq!(record["state"], "completed", "the refused release left it");
}

#[tokio::test]
async fn a_token_from_before_a_takeover_is_refused() {
    let runs = Runs::default();
    let (app, ledger) = app(&runs);
    let first = abandoned_claim(&ledger, "alice", "order-9").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Another request takes the lapsed claim over: a new token.
    let Claim::Acquired(takeover) = ledger
        .claim(&claim_request("alice", "order-9"))
        .await
        .unwrap()
    else {
        panic!("the lapsed claim is taken over");
    };
    assert_ne!(takeover.token, first);
    let (response, body) = send(
        &app,
        admin(
            "POST",
            "alice",
            &format!("/keys/order-9/release?token={}", first.as_uuid()),
            "",
        ),
    )
    .await;
    assert_problem(&response, &body, 409, "token-stale", "order-9");
    let (_, record) = json(&app, admin("GET", "alice", "/keys/order-9", "")).await;
    assert_eq!(record["token"], takeover.token.as_uuid().to_string());
}

#[tokio::test]
async fn evict_a_stored_4xx_then_the_retry_runs_the_handler() {
    let runs = Runs::default();
    let (app, _) = app(&runs);
    let declined = || {
        as_tenant(
            "alice",
            Request::post("/declined")
                .header("idempotency-key", "order-402")
                .body(Body::empty())
                .unwrap(),
        )
    };
    let (first, _) = send(&app, declined()).await;
    assert_eq!(first.status(), StatusCode::PAYMENT_REQUIRED);
    let (replayed, _) = send(&app, declined()).await;
    assert!(is_replay(&replayed));
    assert_eq!(runs.get(), 1);

    let (response, body) = send(&app, admin("DELETE", "bob", "/keys/order-402", "")).await;
    assert_problem(&response, &body, 404, "record-not-found", "order-402");

    let (status, evicted) = json(&app, admin("DELETE", "alice", "/keys/order-402", "")).await;
    assert_eq!(status, StatusCode::OK, "{evicted}");
    assert_eq!(evicted["evicted"], true);
    assert_eq!(evicted["record"]["status"], 402);
    let (response, body) = send(&app, admin("DELETE", "alice", "/keys/order-402", "")).await;
    assert_problem(&response, &body, 404, "record-not-found", "order-402");

    let (retry, _) = send(&app, declined()).await;
    assert_eq!(retry.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(!is_replay(&retry), "evicted: the handler ran again");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn stuck_lists_only_the_callers_scope() {
    let runs = Runs::default();
    let (app, ledger) = app(&runs);
    abandoned_claim(&ledger, "alice", "a-1").await;
    abandoned_claim(&ledger, "alice", "a-2").await;
    abandoned_claim(&ledger, "bob", "b-1").await;
    // A live claim is not stuck.
    let mut live = claim_request("alice", "a-live");
    live.lease = Duration::from_secs(600);
    ledger.claim(&live).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let digest = |tenant: &str, key: &str| {
        hex(LedgerKey::new(
            tenant.as_bytes(),
            &IdempotencyKey::parse(key.as_bytes()).unwrap(),
        )
        .as_bytes())
    };
    let keys = |list: &Value| -> Vec<String> {
        let mut keys: Vec<String> = list["stuck"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ledger_key"].as_str().unwrap().to_owned())
            .collect();
        keys.sort();
        keys
    };
    let (status, alice) = json(&app, admin("GET", "alice", "/stuck?older_than_ms=0", "")).await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    let mut expected = vec![digest("alice", "a-1"), digest("alice", "a-2")];
    expected.sort();
    assert_eq!(keys(&alice), expected);
    assert!(
        alice["stuck"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "in_progress" && r["lease_lapsed"] == true)
    );

    let (_, bob) = json(&app, admin("GET", "bob", "/stuck", "")).await;
    assert_eq!(keys(&bob), vec![digest("bob", "b-1")]);

    let (_, limited) = json(&app, admin("GET", "alice", "/stuck?limit=1", "")).await;
    assert_eq!(keys(&limited).len(), 1);
    let (_, none) = json(
        &app,
        admin("GET", "alice", "/stuck?older_than_ms=600000", ""),
    )
    .await;
    assert_eq!(keys(&none), Vec::<String>::new());
    let (response, body) = send(&app, admin("GET", "alice", "/stuck?limit=many", "")).await;
    assert_problem(&response, &body, 400, "invalid-parameter", "");
}
