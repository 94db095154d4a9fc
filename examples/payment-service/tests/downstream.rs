//! The charge is idempotent downstream: the service sends the card processor a key derived from
//! its operation, so every re-run of a payment gets the processor's replay. In-process here
//! (the failing insert, validation answers that are not stored, a declined card that is); the
//! crash tests kill the real binaries.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::{PATIENCE, Process};
use std::time::Duration;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use http_body_util::BodyExt;
use payment_service::{
    Database, Settings,
    card_processor::{self, Faults},
};
use reqwest::Client;
use serde_json::{Value, json};
use tower::ServiceExt;

const GOOD: &str = r#"{"amount":1234,"currency":"EUR","customer":"alice"}"#;

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, bool, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post(key: &str, content_type: &str, body: &str) -> Request<Body> {
    Request::post("/payments")
        .header(header::AUTHORIZATION, "Bearer tok_downstream")
        .header(header::CONTENT_TYPE, content_type)
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, "Bearer tok_downstream")
        .body(Body::empty())
        .unwrap()
}

async fn counts(app: &Router, customer: &str) -> (usize, usize) {
    let (_, _, payments) = send(app, get(&format!("/payments?customer={customer}"))).await;
    let (status, _, charges) =
        send(app, get(&format!("/processor/charges?customer={customer}"))).await;
    assert_eq!(status, StatusCode::OK, "{charges}");
    (
        payments["payments"].as_array().unwrap().len(),
        charges["charges"].as_array().unwrap().len(),
    )
}

/// The issue's reproduction: the insert after the charge fails on every attempt. Each 500
/// releases the key and the retry runs the handler again, but it sends the same charge key, so
/// the processor charges once; once the insert works, the payment is recorded, still one charge.
#[tokio::test]
async fn a_failing_insert_retried_three_times_charges_once() {
    let database = Database::connect("sqlite::memory:", None).await.unwrap();
    let processor_url = card_processor::spawn("sqlite::memory:", Faults::default())
        .await
        .unwrap();
    let failing = Settings {
        processor_url: processor_url.clone(),
        fail_insert_rate: 1.0,
        ..Settings::default()
    };
    let app = database.router(&failing).unwrap();
    for _ in 0..3 {
        let (status, replayed, body) = send(&app, post("k-1", "application/json", GOOD)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert!(!replayed);
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains("safe to retry"), "{detail}");
        assert!(detail.contains("may have been charged"), "{detail}");
    }
    assert_eq!(
        counts(&app, "alice").await,
        (0, 1),
        "three runs, one charge"
    );

    let working = Settings {
        processor_url,
        ..Settings::default()
    };
    let app = database.router(&working).unwrap();
    let (status, replayed, _) = send(&app, post("k-1", "application/json", GOOD)).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(counts(&app, "alice").await, (1, 1));
}

/// Found by schemathesis (a 502 on `POST /payments`): a key whose first run charged and was then
/// released (the insert failed), reused with a different payment, sends the processor the same
/// charge key with another body. The processor refuses it (422); the client is told its key
/// belongs to another payment (422 `key-reused`), not that the processor failed (502), and
/// nothing more is charged; the earlier payment can still be finished with its key.
#[tokio::test]
async fn a_released_key_reused_for_another_payment_is_422_not_502() {
    let database = Database::connect("sqlite::memory:", None).await.unwrap();
    let processor_url = card_processor::spawn("sqlite::memory:", Faults::default())
        .await
        .unwrap();
    let failing = Settings {
        processor_url: processor_url.clone(),
        fail_insert_rate: 1.0,
        ..Settings::default()
    };
    let app = database.router(&failing).unwrap();
    let (status, _, _) = send(&app, post("k-reuse", "application/json", GOOD)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let working = Settings {
        processor_url,
        ..Settings::default()
    };
    let app = database.router(&working).unwrap();
    let other = r#"{"amount":99,"currency":"EUR","customer":"alice"}"#;
    let (status, _, body) = send(&app, post("k-reuse", "application/json", other)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["type"].as_str().unwrap().ends_with("key-reused"),
        "{body}"
    );
    assert_eq!(counts(&app, "alice").await, (0, 1), "no second charge");
    // The 422 is not stored: the earlier payment, charged but never recorded, is finished by
    // sending it again with its key (the processor replays its charge).
    let (status, replayed, body) = send(&app, post("k-reuse", "application/json", GOOD)).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body}");
    assert_eq!(
        counts(&app, "alice").await,
        (1, 1),
        "one payment, one charge"
    );
}

#[tokio::test]
async fn a_fixed_request_after_a_400_or_a_415_with_the_same_key_gets_201() {
    let database = Database::connect("sqlite::memory:", None).await.unwrap();
    let settings = Settings {
        processor_url: card_processor::spawn("sqlite::memory:", Faults::default())
            .await
            .unwrap(),
        ..Settings::default()
    };
    let app = database.router(&settings).unwrap();
    let cases = [
        (
            "after-400",
            "application/json",
            r#"{"amount":-1,"currency":"EUR","customer":"alice"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "after-bad-json",
            "application/json",
            r#"{"amount":"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "after-415",
            "text/plain",
            GOOD,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (key, content_type, body, status) in cases {
        let (first, _, problem) = send(&app, post(key, content_type, body)).await;
        assert_eq!(first, status, "{key}: {problem}");
        let (fixed, replayed, payment) = send(&app, post(key, "application/json", GOOD)).await;
        assert_eq!(
            (fixed, replayed),
            (StatusCode::CREATED, false),
            "{key}: {payment}"
        );
        let (again, replayed, _) = send(&app, post(key, "application/json", GOOD)).await;
        assert_eq!((again, replayed), (StatusCode::CREATED, true), "{key}");
    }
    assert_eq!(counts(&app, "alice").await, (3, 3));
}

#[tokio::test]
async fn a_declined_card_is_a_stored_402() {
    let database = Database::connect("sqlite::memory:", None).await.unwrap();
    let settings = Settings {
        processor_url: card_processor::spawn("sqlite::memory:", Faults::default())
            .await
            .unwrap(),
        ..Settings::default()
    };
    let app = database.router(&settings).unwrap();
    let over =
        json!({ "amount": card_processor::CARD_LIMIT + 1, "currency": "EUR", "customer": "bob" })
            .to_string();
    let (first, replayed, problem) = send(&app, post("declined", "application/json", &over)).await;
    assert_eq!(
        (first, replayed),
        (StatusCode::PAYMENT_REQUIRED, false),
        "{problem}"
    );
    assert_eq!(problem["type"], "/problems/card-declined");
    let (again, replayed, _) = send(&app, post("declined", "application/json", &over)).await;
    assert_eq!((again, replayed), (StatusCode::PAYMENT_REQUIRED, true));
    let (changed, _, _) = send(&app, post("declined", "application/json", GOOD)).await;
    assert_eq!(
        changed,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a declined key is used up"
    );
    assert_eq!(counts(&app, "bob").await, (0, 0));
}

// The crash tests: real processes, killed with SIGKILL.

const TOKEN: &str = "tok_downstream_crash";

struct TempFiles(Vec<std::path::PathBuf>);

impl TempFiles {
    fn sqlite(&mut self, name: &str) -> String {
        let file = std::env::temp_dir().join(format!(
            "payment-{name}-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let url = format!("sqlite://{}?mode=rwc", file.display());
        self.0.push(file);
        url
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for file in &self.0 {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

async fn pay(
    client: &Client,
    base: &str,
    key: &str,
    customer: &str,
) -> reqwest::Result<(StatusCode, Value)> {
    let response = client
        .post(format!("{base}/payments"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": 1234, "currency": "EUR", "customer": customer }))
        .send()
        .await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// Retries until a 201 (bounded), then returns the customer's payments and charges.
async fn settle(
    client: &Client,
    base: &str,
    key: &str,
    customer: &str,
) -> (Vec<StatusCode>, usize, usize) {
    let mut statuses = Vec::new();
    loop {
        let (status, _) = pay(client, base, key, customer).await.unwrap();
        statuses.push(status);
        if status == StatusCode::CREATED {
            break;
        }
        assert!(statuses.len() < 500, "no 201 after {statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = |path: &'static str, field: &'static str| async move {
        let body: Value = client
            .get(format!("{base}{path}?customer={customer}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        body[field].as_array().unwrap().len()
    };
    let payments = list("/payments", "payments").await;
    let charges = list("/processor/charges", "charges").await;
    (statuses, payments, charges)
}

/// The service is killed after the processor charged and before the payment row: the restarted
/// service re-runs the payment once the dead lease lapses, sends the same charge key, gets the
/// processor's replay, and records the payment. One charge, one payment, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_service_between_the_charge_and_the_insert_charges_once() {
    let mut files = TempFiles(Vec::new());
    let (service_db, processor_db) = (files.sqlite("service"), files.sqlite("processor"));
    let client = Client::builder().timeout(PATIENCE).build().unwrap();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let serve = |hook: bool| {
        let mut args = vec![
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--lease-ms",
            "400",
            "--latency-ms",
            "0",
            "--database-url",
            &service_db,
            "--processor-database-url",
            &processor_db,
        ];
        if hook {
            args.push("--pause-after-charge");
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for round in 0..3 {
        let (key, customer) = (format!("{run}-svc-{round}"), format!("{run}-svc-{round}"));
        let args = serve(true);
        let mut doomed = Process::spawn(Process::command(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .await;
        let first = tokio::spawn({
            let (client, base, key, customer) = (
                client.clone(),
                doomed.base.clone(),
                key.clone(),
                customer.clone(),
            );
            async move { pay(&client, &base, &key, &customer).await }
        });
        assert_eq!(doomed.next_line().await.as_deref(), Some("CHARGED"));
        doomed.kill().await;
        assert!(
            first.await.unwrap().is_err(),
            "the first caller's connection died"
        );

        let args = serve(false);
        let restarted = Process::spawn(Process::command(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .await;
        let (statuses, payments, charges) = settle(&client, &restarted.base, &key, &customer).await;
        restarted.kill().await;
        assert_eq!((payments, charges), (1, 1), "round {round}: {statuses:?}");
    }
}

/// The processor is killed after it recorded a charge and before it answered: the service's
/// call fails (503, the key released), and once the processor is back on the same address and
/// database, the retry sends the same charge key and gets the processor's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_processor_after_charging_charges_once() {
    let mut files = TempFiles(Vec::new());
    let (service_db, processor_db) = (files.sqlite("service"), files.sqlite("processor"));
    let client = Client::builder().timeout(PATIENCE).build().unwrap();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];

    let mut processor = Process::spawn(Process::command(&[
        "processor",
        "--addr",
        "127.0.0.1:0",
        "--latency-ms",
        "0",
        "--database-url",
        &processor_db,
        "--pause-after-charge",
    ]))
    .await;
    let addr = processor.base.trim_start_matches("http://").to_owned();
    let service = Process::spawn(Process::command(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--database-url",
        &service_db,
        "--processor-url",
        &processor.base,
    ]))
    .await;
    let mut rounds = Vec::new();
    for round in 0..3 {
        let (key, customer) = (format!("{run}-proc-{round}"), format!("{run}-proc-{round}"));
        let first = tokio::spawn({
            let (client, base, key, customer) = (
                client.clone(),
                service.base.clone(),
                key.clone(),
                customer.clone(),
            );
            async move { pay(&client, &base, &key, &customer).await }
        });
        assert_eq!(processor.next_line().await.as_deref(), Some("CHARGED"));
        processor.kill().await;
        let (status, problem) = first.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("may have been charged"),
            "{problem}"
        );

        // Back on the same address and database; the hook stays on for the next round, and a
        // replay does not pause (it charges nothing).
        processor = Process::spawn(Process::command(&[
            "processor",
            "--addr",
            &addr,
            "--latency-ms",
            "0",
            "--database-url",
            &processor_db,
            "--pause-after-charge",
        ]))
        .await;
        let (statuses, payments, charges) = settle(&client, &service.base, &key, &customer).await;
        assert_eq!((payments, charges), (1, 1), "round {round}: {statuses:?}");
        rounds.push(statuses);
    }
    service.kill().await;
    processor.kill().await;
}
