//! Every row of SEMANTICS.md section 5, and the rules around it, through an axum Router.

#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderValue, Request, Response, StatusCode, header},
    routing::{get, post},
};
use http_body::Frame;
use support::*;
use tower_idempotency::{
    IdempotencyLayer, InProgress, LedgerFailure, MemoryLedger, MissingKey, Outcome,
};

const BODY: &str = r#"{"amount":100,"currency":"EUR"}"#;

fn app(runs: &Runs) -> Router {
    payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(MemoryLedger::new()))
}

#[tokio::test]
async fn first_request_runs_the_handler_and_a_retry_is_replayed() {
    let runs = Runs::default();
    let app = app(&runs);
    let (first, first_body) = send(&app, pay("key-1", BODY)).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!is_replay(&first));
    assert_eq!(first.headers()["x-run"], "1");

    let (again, again_body) = send(&app, pay("key-1", BODY)).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(is_replay(&again));
    assert_eq!(again_body, first_body, "the replay carries the stored body");
    assert_eq!(again.headers()["x-run"], "1");
    assert_eq!(again.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_outcome_is_in_the_response_extensions() {
    use tower::ServiceExt;
    let runs = Runs::default();
    let app = app(&runs);
    let outcome = |r: &Response<Body>| r.extensions().get::<Outcome>().copied();
    let first = app.clone().oneshot(pay("k", BODY)).await.unwrap();
    assert_eq!(outcome(&first), Some(Outcome::Executed));
    let again = app.clone().oneshot(pay("k", BODY)).await.unwrap();
    assert_eq!(outcome(&again), Some(Outcome::Replayed));
    let other = app.clone().oneshot(pay("k", "{}")).await.unwrap();
    assert_eq!(outcome(&other), Some(Outcome::Mismatch));
}

#[tokio::test]
async fn same_key_with_a_different_request_is_422() {
    let runs = Runs::default();
    let app = app(&runs);
    send(&app, pay("key-1", BODY)).await;
    let (response, body) = send(&app, pay("key-1", r#"{"amount":999,"currency":"EUR"}"#)).await;
    assert_problem(&response, &body, 422, "key-reused", "key-1");
    let other_path = Request::post("/payments?x=1")
        .header("idempotency-key", "key-1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(BODY))
        .unwrap();
    let (response, body) = send(&app, other_path).await;
    assert_problem(&response, &body, 422, "key-reused", "key-1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_different_request_is_422_while_the_first_is_in_progress() {
    let runs = Runs::default();
    let app = payments(runs.clone(), Duration::from_millis(300))
        .layer(IdempotencyLayer::new(MemoryLedger::new()));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (response, body) = send(&app, pay("k", "{}")).await;
    assert_problem(&response, &body, 422, "key-reused", "");
    assert_eq!(first.await.unwrap().0.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_duplicate_in_progress_is_409_with_retry_after() {
    let runs = Runs::default();
    let app = payments(runs.clone(), Duration::from_millis(300))
        .layer(IdempotencyLayer::new(MemoryLedger::new()));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (response, body) = send(&app, pay("k", BODY)).await;
    assert_problem(&response, &body, 409, "request-in-progress", "");
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert_eq!(first.await.unwrap().0.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn missing_key_is_400_or_passes_through_when_allowed() {
    let runs = Runs::default();
    let app = app(&runs);
    let no_key = || Request::post("/payments").body(Body::from(BODY)).unwrap();
    let (response, body) = send(&app, no_key()).await;
    assert_problem(&response, &body, 400, "missing-key", "");
    assert_eq!(runs.get(), 0);

    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_missing_key(MissingKey::Allow)
        .build()
        .unwrap();
    let allowing = payments(runs.clone(), Duration::ZERO).layer(layer);
    assert_eq!(
        send(&allowing, no_key()).await.0.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        send(&allowing, no_key()).await.0.status(),
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 2, "without a key nothing is deduplicated");
}

#[tokio::test]
async fn invalid_keys_are_400_and_the_handler_does_not_run() {
    let runs = Runs::default();
    let app = app(&runs);
    let long = "k".repeat(256);
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("256 characters", vec![long.as_bytes()]),
        // Tab is the one control character a header value can carry (hyper refuses the others).
        ("control character", vec![b"ab\tcd"]),
        ("space", vec![b"ab cd"]),
        ("non-ASCII", vec!["clé".as_bytes()]),
        ("unterminated quote", vec![b"\"abc"]),
        ("text after the quote", vec![b"\"abc\"d"]),
        ("repeated header", vec![b"abc", b"abc"]),
    ];
    for (case, values) in cases {
        let mut request = pay("placeholder", BODY);
        request.headers_mut().remove("idempotency-key");
        for value in values {
            request
                .headers_mut()
                .append("idempotency-key", HeaderValue::from_bytes(value).unwrap());
        }
        let (response, body) = send(&app, request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        assert_problem(&response, &body, 400, "invalid-key", "");
    }
    assert_eq!(runs.get(), 0);
    // Both forms of a valid key name the same record.
    assert_eq!(
        send(&app, pay("\"abc\"", BODY)).await.0.status(),
        StatusCode::CREATED
    );
    assert!(is_replay(&send(&app, pay("abc", BODY)).await.0));
    assert_eq!(runs.get(), 1);
}

/// A body that records whether anyone read it.
struct Watched {
    polled: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polled.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 4096])))))
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_without_being_read() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_body_limit(1024)
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);

    let polled = Arc::new(AtomicBool::new(false));
    let request = Request::post("/payments")
        .header("idempotency-key", "big")
        .header(header::CONTENT_LENGTH, "5000")
        .body(Body::new(Watched {
            polled: polled.clone(),
        }))
        .unwrap();
    let (response, body) = send(&app, request).await;
    assert_problem(&response, &body, 413, "payload-too-large", "big");
    assert!(
        !polled.load(Ordering::SeqCst),
        "the body was read although Content-Length was over the limit"
    );

    // Without Content-Length (chunked), the limit holds while reading.
    let chunked = Request::post("/payments")
        .header("idempotency-key", "big")
        .body(Body::from_stream(futures_util::stream::iter(
            (0..3).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; 512]))),
        )))
        .unwrap();
    let (response, body) = send(&app, chunked).await;
    assert_problem(&response, &body, 413, "payload-too-large", "big");
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn a_failing_ledger_is_503_and_the_handler_does_not_run_unless_fail_open() {
    let runs = Runs::default();
    let ledger = Faulty::default();
    ledger.faults().fail_all(true);
    let app = payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(ledger.clone()));
    let (response, body) = send(&app, pay("k", BODY)).await;
    assert_problem(&response, &body, 503, "ledger-unavailable", "k");
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert_eq!(runs.get(), 0);

    ledger.faults().fail_all(false);
    assert_eq!(
        send(&app, pay("k", BODY)).await.0.status(),
        StatusCode::CREATED,
        "service recovers"
    );
    assert_eq!(runs.get(), 1);

    ledger.faults().fail_all(true);
    let open = IdempotencyLayer::builder(ledger.clone())
        .with_ledger_failure(LedgerFailure::FailOpen)
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(open);
    assert_eq!(
        send(&app, pay("k2", BODY)).await.0.status(),
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 2, "fail-open runs the handler unprotected");
}

#[tokio::test]
async fn uncovered_methods_pass_through_without_touching_the_ledger() {
    let ledger = Faulty::default();
    let app = Router::new()
        .route(
            "/payments",
            get(|| async { "list" }).put(|| async { "put" }),
        )
        .layer(IdempotencyLayer::new(ledger.clone()));
    let (response, body) = send(&app, Request::get("/payments").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (response.status(), &body[..]),
        (StatusCode::OK, &b"list"[..])
    );
    let put = Request::put("/payments")
        .header("idempotency-key", "k")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, put).await.1, "put");
    assert_eq!(ledger.faults().total_calls(), 0);
    assert!(response.extensions().get::<Outcome>().is_none());
}

fn status_app(runs: &Runs, layer: IdempotencyLayer<MemoryLedger>) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/status/{code}",
            post(move |axum::extract::Path(code): axum::extract::Path<u16>| {
                let runs = runs.clone();
                async move {
                    runs.bump();
                    (
                        StatusCode::from_u16(code).unwrap(),
                        format!("status {code}"),
                    )
                }
            }),
        )
        .layer(layer)
}

#[tokio::test]
async fn two_and_four_hundreds_are_stored_five_hundreds_and_retryable_4xx_are_not() {
    let runs = Runs::default();
    let app = status_app(&runs, IdempotencyLayer::new(MemoryLedger::new()));
    let call = |code: u16| {
        Request::post(format!("/status/{code}"))
            .header("idempotency-key", format!("key-{code}"))
            .body(Body::empty())
            .unwrap()
    };
    for code in [200, 201, 400, 404, 422] {
        let before = runs.get();
        let (first, _) = send(&app, call(code)).await;
        let (again, body) = send(&app, call(code)).await;
        assert_eq!(
            (first.status().as_u16(), again.status().as_u16()),
            (code, code)
        );
        assert!(is_replay(&again), "{code} is replayed");
        assert_eq!(body, format!("status {code}"));
        assert_eq!(runs.get(), before + 1, "{code} ran once");
    }
    for code in [500, 503, 408, 409, 429] {
        let before = runs.get();
        let (first, _) = send(&app, call(code)).await;
        let (again, _) = send(&app, call(code)).await;
        assert_eq!(
            (first.status().as_u16(), again.status().as_u16()),
            (code, code)
        );
        assert!(!is_replay(&again), "{code} is not stored");
        assert_eq!(
            runs.get(),
            before + 2,
            "{code} released the key: the retry ran"
        );
    }

    let only_2xx = IdempotencyLayer::builder(MemoryLedger::new())
        .with_store_predicate(|s| s.is_success())
        .build()
        .unwrap();
    let app = status_app(&runs, only_2xx);
    send(&app, call(404)).await;
    assert!(
        !is_replay(&send(&app, call(404)).await.0),
        "a custom predicate decides"
    );
}

#[tokio::test]
async fn replays_keep_repeated_headers_in_order_and_drop_set_cookie_and_denied_headers() {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_replay_deny_headers([header::HeaderName::from_static("x-request-id")])
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                handler_runs.bump();
                async {
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header(header::LINK, "<c>")
                        .header(header::LINK, "<a>")
                        .header(header::LINK, "<b>")
                        .header(header::SET_COOKIE, "session=secret")
                        .header("x-request-id", "req-1")
                        // Not `no-store`: that would mean "do not store this response".
                        .header(header::CACHE_CONTROL, "private, max-age=0")
                        .body(Body::from("ok"))
                        .unwrap()
                }
            }),
        )
        .layer(layer);
    let (first, _) = send(&app, pay("k", "{}")).await;
    assert!(
        first.headers().contains_key(header::SET_COOKIE),
        "the first caller gets every header"
    );
    let (again, body) = send(&app, pay("k", "{}")).await;
    assert!(is_replay(&again));
    assert_eq!(body, "ok");
    let links: Vec<_> = again.headers().get_all(header::LINK).iter().collect();
    assert_eq!(links, ["<c>", "<a>", "<b>"]);
    assert!(!again.headers().contains_key(header::SET_COOKIE));
    assert!(!again.headers().contains_key("x-request-id"));
    assert_eq!(again.headers()[header::CACHE_CONTROL], "private, max-age=0");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_response_over_the_store_limit_reaches_the_first_caller_whole_and_is_not_rerun() {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_store_limit(1000)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/export",
            post(move || {
                handler_runs.bump();
                // Several frames, so the limit is crossed mid-stream.
                let chunks =
                    (0..10u8).map(|i| Ok::<_, Infallible>(Bytes::from(vec![b'a' + i; 300])));
                async move {
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/plain")
                        .header(header::CONTENT_ENCODING, "identity")
                        .header(header::ETAG, "\"v1\"")
                        .header("digest", "sha-256=abc")
                        .header("x-export", "1")
                        .body(Body::from_stream(futures_util::stream::iter(chunks)))
                        .unwrap()
                }
            }),
        )
        .layer(layer);
    let export = || {
        Request::post("/export")
            .header("idempotency-key", "e")
            .body(Body::empty())
            .unwrap()
    };
    let (first, body) = send(&app, export()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let expected: Vec<u8> = (0..10u8).flat_map(|i| vec![b'a' + i; 300]).collect();
    assert_eq!(
        body, expected,
        "the first caller gets the whole body, in order"
    );

    let (again, body) = send(&app, export()).await;
    assert!(is_replay(&again));
    assert_eq!(again.headers()["idempotent-replay-body"], "omitted");
    // The headers that describe the omitted body do not describe the empty one: a client would
    // try to gunzip nothing, or cache an empty body under the ETag.
    for gone in ["content-type", "content-encoding", "etag", "digest"] {
        assert!(again.headers().get(gone).is_none(), "{gone} was replayed");
    }
    // The only length is the empty body's own (hyper or axum may set it from the size hint).
    if let Some(length) = again.headers().get(header::CONTENT_LENGTH) {
        assert_eq!(length, "0");
    }
    assert_eq!(
        again.headers()["x-export"],
        "1",
        "other headers are replayed"
    );
    assert!(body.is_empty());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_handler_panic_is_500_releases_the_key_and_a_retry_runs_again() {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let n = handler_runs.bump();
                async move {
                    if n == 1 {
                        panic!("processor client bug (test)");
                    }
                    (StatusCode::CREATED, "charged")
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()));
    let (response, body) = send(&app, pay("panic-key-7f3", BODY)).await;
    assert_problem(&response, &body, 500, "handler-failed", "panic-key-7f3");
    let (retry, body) = send(&app, pay("panic-key-7f3", BODY)).await;
    assert_eq!(
        (retry.status(), &body[..]),
        (StatusCode::CREATED, &b"charged"[..])
    );
    assert!(!is_replay(&retry));
    let (replay, _) = send(&app, pay("panic-key-7f3", BODY)).await;
    assert!(is_replay(&replay));
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn the_handler_finishes_after_a_client_disconnect_and_the_retry_is_replayed() {
    let runs = Runs::default();
    let finished = Arc::new(tokio::sync::Notify::new());
    let (handler_runs, done) = (runs.clone(), finished.clone());
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let (runs, done) = (handler_runs.clone(), done.clone());
                async move {
                    runs.bump();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    done.notify_one();
                    (StatusCode::CREATED, "charged")
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryLedger::new()));
    // The client gives up after 50 ms: its response future is dropped mid-handler.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), send(&app, pay("k", BODY))).await;
    assert!(
        gave_up.is_err(),
        "the client disconnected before the handler finished"
    );
    // Bounded so that a handler cancelled with its client fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(30), finished.notified())
        .await
        .expect("the handler was cancelled when its client left");
    // The completion is recorded right after the handler returns; a retry in that instant gets
    // a 409, so retry as a client would until it gets an answer.
    let mut retry = send(&app, pay("k", BODY)).await;
    while retry.0.status() == StatusCode::CONFLICT {
        tokio::time::sleep(Duration::from_millis(10)).await;
        retry = send(&app, pay("k", BODY)).await;
    }
    assert_eq!(retry.0.status(), StatusCode::CREATED);
    assert!(is_replay(&retry.0));
    assert_eq!(retry.1, "charged");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_same_key_in_two_scopes_is_two_requests() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_scope(|parts: &axum::http::request::Parts| {
            parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    let as_tenant = |tenant: &str| {
        let mut request = pay("shared-key", BODY);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(tenant).unwrap(),
        );
        request
    };
    let (a, _) = send(&app, as_tenant("Bearer a")).await;
    let (b, _) = send(&app, as_tenant("Bearer b")).await;
    assert!(!is_replay(&a) && !is_replay(&b), "no cross-scope replay");
    assert_eq!(
        (a.headers()["x-run"].clone(), b.headers()["x-run"].clone()),
        ("1".try_into().unwrap(), "2".try_into().unwrap())
    );
    let (a_again, _) = send(&app, as_tenant("Bearer a")).await;
    assert!(is_replay(&a_again));
    assert_eq!(a_again.headers()["x-run"], "1");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn json_canonicalization_replays_reordered_and_reformatted_bodies() {
    let runs = Runs::default();
    let canonical = IdempotencyLayer::builder(MemoryLedger::new())
        .with_json_canonicalization(true)
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(canonical);
    send(&app, pay("k", r#"{"a":1,"b":2}"#)).await;
    let (again, _) = send(&app, pay("k", "{ \"b\": 2,\n  \"a\": 1 }")).await;
    assert!(is_replay(&again));
    let (changed, body) = send(&app, pay("k", r#"{"a":1,"b":3}"#)).await;
    assert_problem(&changed, &body, 422, "key-reused", "");
    assert_eq!(runs.get(), 1);

    // Off (the default), the bytes are compared as sent.
    let plain =
        payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(MemoryLedger::new()));
    send(&plain, pay("k", r#"{"a":1,"b":2}"#)).await;
    assert_eq!(
        send(&plain, pay("k", r#"{"b":2,"a":1}"#)).await.0.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn accepted_policy_answers_202_with_a_working_location_scoped_to_the_caller() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_in_progress(InProgress::Accepted)
        .with_scope(|parts: &axum::http::request::Parts| {
            parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(300))
        .layer(layer.clone())
        .merge(layer.operation_router());
    let authed = |mut r: Request<Body>, who: &str| {
        r.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_str(who).unwrap());
        r
    };
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, authed(pay("k", BODY), "a")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (accepted, body) = send(&app, authed(pay("k", BODY), "a")).await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    assert_eq!(accepted.headers()[header::RETRY_AFTER], "1");
    let location = accepted.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(location.starts_with("/operations/"), "{location}");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(location.ends_with(json["operation_id"].as_str().unwrap()));

    let poll = |who: &str| authed(Request::get(&location).body(Body::empty()).unwrap(), who);
    let (status, body) = send(&app, poll("a")).await;
    assert_eq!(status.status(), StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"],
        "in_progress"
    );
    let (foreign, body) = send(&app, poll("b")).await;
    assert_problem(&foreign, &body, 404, "operation-not-found", "");

    let (first, first_body) = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let (done, done_body) = send(&app, poll("a")).await;
    assert_eq!(done.status(), StatusCode::CREATED);
    assert!(is_replay(&done));
    assert_eq!(done_body, first_body);
    assert_eq!(
        send(&app, poll("b")).await.0.status(),
        StatusCode::NOT_FOUND
    );
    let unknown = authed(
        Request::get("/operations/not-a-uuid")
            .body(Body::empty())
            .unwrap(),
        "a",
    );
    assert_eq!(send(&app, unknown).await.0.status(), StatusCode::NOT_FOUND);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn wait_policy_times_out_into_409() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_in_progress(InProgress::Wait {
            timeout: Duration::from_millis(100),
        })
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::from_millis(1000)).layer(layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (response, body) = send(&app, pay("k", BODY)).await;
    assert_problem(&response, &body, 409, "request-in-progress", "");
    assert_eq!(first.await.unwrap().0.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_cannot_overwrite_the_new_result() {
    let ledger = Faulty::default();
    let runs = Runs::default();
    let release_first = Arc::new(tokio::sync::Notify::new());
    let (handler_runs, gate) = (runs.clone(), release_first.clone());
    let layer = IdempotencyLayer::builder(ledger.clone())
        .with_lease(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/payments",
            post(move || {
                let (runs, gate) = (handler_runs.clone(), gate.clone());
                async move {
                    let n = runs.bump();
                    if n == 1 {
                        // The first holder stalls (and its renewals are lost) until told to go on.
                        gate.notified().await;
                    }
                    (StatusCode::CREATED, format!("holder {n}"))
                }
            }),
        )
        .layer(layer);

    ledger.faults().drop_renewals(true);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The lease expired: the retry takes the key over and completes. (The stall lasts until
    // then: a renewal allowed earlier could revive the lease before the retry's claim.)
    let (second, body) = send(&app, pay("k", BODY)).await;
    ledger.faults().drop_renewals(false);
    assert_eq!(
        (second.status(), &body[..]),
        (StatusCode::CREATED, &b"holder 2"[..])
    );
    assert!(!is_replay(&second));

    // The stalled holder finishes now: its complete is fenced off.
    release_first.notify_one();
    let (first, body) = first.await.unwrap();
    assert_eq!(
        body, "holder 1",
        "the stalled caller still gets its own answer"
    );
    assert_eq!(first.status(), StatusCode::CREATED);

    let (replay, body) = send(&app, pay("k", BODY)).await;
    assert!(is_replay(&replay));
    assert_eq!(body, "holder 2", "the new holder's result is what replays");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn renewal_keeps_a_slow_handler_from_being_taken_over() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_lease(Duration::from_millis(300))
        .build()
        .unwrap();
    // The handler takes three leases' time.
    let app = payments(runs.clone(), Duration::from_millis(900)).layer(layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k", BODY)).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        send(&app, pay("k", BODY)).await.0.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(first.await.unwrap().0.status(), StatusCode::CREATED);
    assert!(is_replay(&send(&app, pay("k", BODY)).await.0));
    assert_eq!(runs.get(), 1);
}

/// The claim took effect in the ledger, but the client left before its answer arrived. The key
/// must not stay claimed with no handler (every retry would get 409 until the lease expired):
/// the layer gives it back, and the retry runs the handler, once.
#[tokio::test]
async fn a_client_that_leaves_while_the_claim_is_answered_does_not_strand_the_key() {
    let ledger = Faulty::default();
    ledger
        .faults()
        .delay_answers(Op::Claim, Duration::from_millis(200));
    let runs = Runs::default();
    let app = payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(ledger.clone()));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), send(&app, pay("k", BODY))).await;
    assert!(gave_up.is_err(), "the client left during the claim");
    ledger
        .faults()
        .delay_answers(Op::Claim, Duration::from_millis(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (retry, body) = send(&app, pay("k", BODY)).await;
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        !is_replay(&retry),
        "the orphaned claim was released, so the retry ran"
    );
    assert_eq!(runs.get(), 1, "nothing ran for the client that left");
}

/// A request body that fails while being read (the client aborted) is a 400
/// `body-unreadable`; the handler does not run and no key is claimed.
#[tokio::test]
async fn an_unreadable_body_is_400_and_claims_nothing() {
    let runs = Runs::default();
    let ledger = Faulty::default();
    let app = payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(ledger.clone()));
    let frames: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"amount\":")),
        Err(std::io::Error::other("the client aborted (test)")),
    ];
    let request = Request::post("/payments")
        .header("idempotency-key", "aborted-7d1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap();
    let (response, body) = send(&app, request).await;
    assert_problem(&response, &body, 400, "body-unreadable", "aborted-7d1");
    assert_eq!(runs.get(), 0);
    assert_eq!(ledger.faults().calls(Op::Claim), 0, "nothing was claimed");
    let (retry, _) = send(&app, pay("aborted-7d1", BODY)).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
}

/// A custom fingerprint function decides what counts as the same request: here only the
/// `amount` member, so a changed `note` is a replay and a changed amount a 422.
#[tokio::test]
async fn a_custom_fingerprint_function_decides_what_is_the_same_request() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_fingerprint(|_: &axum::http::request::Parts, body: &Bytes| {
            let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            tower_idempotency::Fingerprint::of(json["amount"].to_string().as_bytes())
        })
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    let (first, _) = send(&app, pay("fp", r#"{"amount":100,"note":"a"}"#)).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let (same, _) = send(&app, pay("fp", r#"{"note":"b","amount":100}"#)).await;
    assert!(is_replay(&same), "only the amount is fingerprinted");
    let (other, body) = send(&app, pay("fp", r#"{"amount":200,"note":"a"}"#)).await;
    assert_problem(&other, &body, 422, "key-reused", "");
    assert_eq!(runs.get(), 1);
}

/// The fingerprint headers are the ones configured: a change in one of them is another request
/// (422); a change in any other header is the same request (replay).
#[tokio::test]
async fn fingerprint_headers_are_the_configured_ones() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(MemoryLedger::new())
        .with_fingerprint_headers([axum::http::HeaderName::from_static("x-account")])
        .build()
        .unwrap();
    let app = payments(runs.clone(), Duration::ZERO).layer(layer);
    let with = |account: &'static str, agent: &'static str| {
        let mut request = pay("fh", BODY);
        let headers = request.headers_mut();
        headers.insert("x-account", HeaderValue::from_static(account));
        headers.insert(header::USER_AGENT, HeaderValue::from_static(agent));
        request
    };
    assert_eq!(
        send(&app, with("acct-1", "curl")).await.0.status(),
        StatusCode::CREATED
    );
    let (other_agent, _) = send(&app, with("acct-1", "wget")).await;
    assert!(is_replay(&other_agent), "User-Agent is not fingerprinted");
    let (other_account, body) = send(&app, with("acct-2", "curl")).await;
    assert_problem(&other_account, &body, 422, "key-reused", "");
    // Content-Type, fingerprinted by default, is no longer in the list.
    let mut text = with("acct-1", "curl");
    text.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    assert!(is_replay(&send(&app, text).await.0));
    assert_eq!(runs.get(), 1);
}
