//! The storm: many payments, each sent as concurrent duplicates over a flaky network, then an
//! audit of what was charged. Shared by the `storm` binary and the end-to-end tests.
//!
//! For each payment (a unique `customer`, `storm-{run}-{i}`, and one idempotency key), its
//! duplicates are sent at once; each retries with the same key and body until it gets a final
//! 201. A "dropped" request is abandoned at a random moment (before or after the server got it,
//! like a connection reset) and retried; 409, 202 and 5xx are retried after a short backoff.
//! Then `GET /payments?customer=..` must show exactly one payment per customer, the one every
//! duplicate was answered with, and `GET /processor/charges?customer=..` (the card processor's
//! own record, through the service) exactly one charge for it: no payment without its charge,
//! no charge without its payment.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Client, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::Semaphore, task::JoinSet};

/// What to send, and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service's base URL, such as `http://127.0.0.1:3000`.
    pub url: String,
    /// How many payments. Default: 200.
    pub payments: usize,
    /// How many concurrent duplicates of each. Default: 8.
    pub duplicates: usize,
    /// The probability that a request is abandoned and retried. Default: 0.2.
    pub drop_rate: f64,
    /// A dropped request is abandoned after a random delay up to this. Default: 100 ms.
    pub drop_after: Duration,
    /// The bearer token (so the tenant). Default: `storm-{run id}`.
    pub token: String,
    /// Names this run's customers: `storm-{run_id}-{i}`. Default: 8 random hex digits.
    pub run_id: String,
    /// How many payments are in flight at once. Default: 16.
    pub concurrency: usize,
    /// How many attempts one duplicate makes before giving up. Default: 200.
    pub max_attempts: usize,
    /// Show a progress bar on stderr. Default: false.
    pub progress: bool,
}

impl Config {
    /// The defaults, against `url`, with a fresh run id and token.
    pub fn new(url: impl Into<String>) -> Self {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self {
            url: url.into(),
            payments: 200,
            duplicates: 8,
            drop_rate: 0.2,
            drop_after: Duration::from_millis(100),
            token: format!("storm-{run_id}"),
            run_id,
            concurrency: 16,
            max_attempts: 200,
            progress: false,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Requests sent, dropped ones included.
    pub requests: u64,
    /// 201 without `Idempotent-Replayed`: the handler ran.
    pub executed: u64,
    /// 201 with `Idempotent-Replayed: true`.
    pub replayed: u64,
    /// 409: a duplicate of a request in progress.
    pub conflicts: u64,
    /// 202: a duplicate of a request in progress (Accepted policy).
    pub accepted: u64,
    /// 5xx (mostly 503: the processor failed, nothing charged); retried.
    pub server_errors: u64,
    /// Requests abandoned by the client.
    pub dropped: u64,
    /// Requests after a duplicate's first.
    pub retries: u64,
    /// Any other status (a duplicate stops at it), a transport error, or a duplicate that gave
    /// up after `max_attempts`.
    pub unexpected: u64,
    /// Payments the audit found exactly once.
    pub created: u64,
    /// Payments charged more than once: several rows for a customer, or duplicates answered
    /// with different payments.
    pub double_charges: u64,
    /// Payments without a row, or whose row is not the one the client was answered with (a
    /// charge whose payment is missing included).
    pub lost: u64,
    /// Charges the processor recorded for the storm's customers.
    pub processor_charges: u64,
    /// Payments with a row but no charge at the processor.
    pub uncharged: u64,
    /// Wall time, in milliseconds.
    pub elapsed_ms: u64,
}

impl Summary {
    /// No payment charged twice, none lost, and the processor's charges match the payments one
    /// to one.
    pub fn is_clean(&self) -> bool {
        self.double_charges == 0
            && self.lost == 0
            && self.uncharged == 0
            && self.processor_charges == self.created
    }

    fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.executed += other.executed;
        self.replayed += other.replayed;
        self.conflicts += other.conflicts;
        self.accepted += other.accepted;
        self.server_errors += other.server_errors;
        self.dropped += other.dropped;
        self.retries += other.retries;
        self.unexpected += other.unexpected;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "requests        {:>8}", self.requests)?;
        writeln!(
            f,
            "  executed      {:>8}  (201, handler ran)",
            self.executed
        )?;
        writeln!(
            f,
            "  replayed      {:>8}  (201, Idempotent-Replayed)",
            self.replayed
        )?;
        writeln!(f, "  409 conflict  {:>8}", self.conflicts)?;
        writeln!(f, "  202 accepted  {:>8}", self.accepted)?;
        writeln!(f, "  5xx           {:>8}  (retried)", self.server_errors)?;
        writeln!(
            f,
            "  dropped       {:>8}  (abandoned by the client)",
            self.dropped
        )?;
        writeln!(f, "  unexpected    {:>8}", self.unexpected)?;
        writeln!(f, "retries         {:>8}", self.retries)?;
        writeln!(f, "payments        {:>8}", self.created)?;
        writeln!(f, "processor charges {:>6}", self.processor_charges)?;
        writeln!(f, "uncharged       {:>8}", self.uncharged)?;
        writeln!(f, "double charges  {:>8}", self.double_charges)?;
        writeln!(f, "lost            {:>8}", self.lost)?;
        write!(f, "elapsed         {:>8} ms", self.elapsed_ms)
    }
}

/// The storm could not run or audit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StormError {
    /// The HTTP client failed to build, or an audit request failed.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// An audit answered something other than 200 with a payment list.
    #[error("audit of {customer}: {detail}")]
    Audit {
        /// The customer audited.
        customer: String,
        /// What was wrong.
        detail: String,
    },
    /// A task panicked.
    #[error("a storm task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

struct Shared {
    client: Client,
    config: Config,
}

/// Runs the storm and the audit. `Ok` even when payments were double charged or lost: look at
/// [`Summary::is_clean`].
pub async fn run(config: Config) -> Result<Summary, StormError> {
    let started = Instant::now();
    let client = Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(config.concurrency * config.duplicates.max(1))
        .build()?;
    let progress = if config.progress {
        let bar = ProgressBar::new(config.payments as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} payments {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let shared = Arc::new(Shared { client, config });
    let config = &shared.config;
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));

    let mut payments = JoinSet::new();
    for i in 0..config.payments {
        let shared = shared.clone();
        let permits = permits.clone();
        let progress = progress.clone();
        payments.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = one_payment(&shared, i).await;
            progress.inc(1);
            result
        });
    }
    let mut summary = Summary::default();
    let mut answered = Vec::with_capacity(config.payments);
    while let Some(result) = payments.join_next().await {
        let (i, counts, ids) = result?;
        summary.add(&counts);
        answered.push((i, ids));
    }
    progress.set_message("auditing");

    let mut audits = JoinSet::new();
    for (i, ids) in answered {
        let shared = shared.clone();
        let permits = permits.clone();
        audits.spawn(async move {
            let _permit = permits.acquire_owned().await;
            audit(&shared, i, ids).await
        });
    }
    while let Some(result) = audits.join_next().await {
        let (verdict, charges) = result??;
        summary.processor_charges += charges;
        match verdict {
            Verdict::Created => summary.created += 1,
            Verdict::Double => summary.double_charges += 1,
            Verdict::Lost => summary.lost += 1,
            Verdict::Uncharged => summary.uncharged += 1,
        }
    }
    progress.finish_and_clear();
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(summary)
}

fn customer(config: &Config, i: usize) -> String {
    format!("storm-{}-{i}", config.run_id)
}

/// Sends payment `i` as concurrent duplicates; returns the counts and the payment id each
/// duplicate was finally answered with (`None` if it gave up).
async fn one_payment(shared: &Arc<Shared>, i: usize) -> (usize, Summary, Vec<Option<String>>) {
    let config = &shared.config;
    let key = format!("{}-{i}-{}", config.run_id, uuid::Uuid::new_v4().simple());
    let body = json!({
        "amount": 100 + (i as i64 % 9_900),
        "currency": "EUR",
        "customer": customer(config, i),
    });
    let mut duplicates = JoinSet::new();
    for _ in 0..config.duplicates.max(1) {
        let shared = shared.clone();
        let key = key.clone();
        let body = body.clone();
        duplicates.spawn(async move { until_final(&shared, &key, &body).await });
    }
    let mut summary = Summary::default();
    let mut ids = Vec::new();
    while let Some(result) = duplicates.join_next().await {
        match result {
            Ok((counts, id)) => {
                summary.add(&counts);
                ids.push(id);
            }
            Err(_) => {
                summary.unexpected += 1;
                ids.push(None);
            }
        }
    }
    (i, summary, ids)
}

async fn backoff() {
    tokio::time::sleep(Duration::from_millis(fastrand::u64(10..=50))).await;
}

/// One duplicate: retries with the same key and body until a 201 (or `max_attempts`).
async fn until_final(shared: &Shared, key: &str, body: &Value) -> (Summary, Option<String>) {
    let config = &shared.config;
    let url = format!("{}/payments", config.url.trim_end_matches('/'));
    let mut counts = Summary::default();
    for attempt in 0..config.max_attempts.max(1) {
        if attempt > 0 {
            counts.retries += 1;
        }
        counts.requests += 1;
        let send = shared
            .client
            .post(&url)
            .bearer_auth(&config.token)
            .header("Idempotency-Key", key)
            .json(body)
            .send();
        if fastrand::f64() < config.drop_rate {
            // The network loses this exchange: abandon it at a random moment, before or after
            // the server got it. Whatever came back is never seen.
            let max = config.drop_after.as_millis() as u64;
            let _ = tokio::time::timeout(Duration::from_millis(fastrand::u64(0..=max)), send).await;
            counts.dropped += 1;
            continue;
        }
        let response = match send.await {
            Ok(response) => response,
            Err(_) => {
                counts.unexpected += 1;
                backoff().await;
                continue;
            }
        };
        match response.status() {
            StatusCode::CREATED => {
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                let id = match response.json::<Value>().await {
                    Ok(payment) => payment["id"].as_str().map(str::to_owned),
                    Err(_) => None,
                };
                if replayed {
                    counts.replayed += 1;
                } else {
                    counts.executed += 1;
                }
                return (counts, id);
            }
            StatusCode::CONFLICT => counts.conflicts += 1,
            StatusCode::ACCEPTED => counts.accepted += 1,
            status if status.is_server_error() => counts.server_errors += 1,
            // 400, 401, 422...: retrying the same request cannot help.
            _ => {
                counts.unexpected += 1;
                return (counts, None);
            }
        }
        backoff().await;
    }
    counts.unexpected += 1;
    (counts, None)
}

enum Verdict {
    Created,
    Double,
    Lost,
    Uncharged,
}

/// `GET {path}?customer=..` as the storm's tenant: the array under `field`.
async fn list(
    shared: &Shared,
    path: &str,
    customer: &str,
    field: &str,
) -> Result<Vec<Value>, StormError> {
    let config = &shared.config;
    // `storm-{hex}-{i}` needs no percent-encoding.
    let url = format!(
        "{}{path}?customer={customer}",
        config.url.trim_end_matches('/')
    );
    let response = shared
        .client
        .get(&url)
        .bearer_auth(&config.token)
        .send()
        .await?;
    let error = |detail: String| StormError::Audit {
        customer: customer.to_owned(),
        detail,
    };
    if response.status() != StatusCode::OK {
        return Err(error(format!("{path}: status {}", response.status())));
    }
    let list: Value = response.json().await?;
    list[field]
        .as_array()
        .cloned()
        .ok_or_else(|| error(format!("{path}: no {field} array")))
}

/// The verdict on payment `i`, and how many charges the processor has for it.
async fn audit(
    shared: &Shared,
    i: usize,
    answered: Vec<Option<String>>,
) -> Result<(Verdict, u64), StormError> {
    let customer = customer(&shared.config, i);
    let payments = list(shared, "/payments", &customer, "payments").await?;
    let charges = list(shared, "/processor/charges", &customer, "charges").await?;
    let rows: Vec<&str> = payments.iter().filter_map(|p| p["id"].as_str()).collect();
    let mut ids: Vec<&str> = answered.iter().flatten().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    let verdict = match (rows.as_slice(), ids.as_slice(), charges.len()) {
        (rows, _, _) if rows.len() > 1 => Verdict::Double,
        (_, ids, _) if ids.len() > 1 => Verdict::Double,
        (_, _, charges) if charges > 1 => Verdict::Double,
        ([row], [id], 1) if row == id => Verdict::Created,
        ([row], [id], 0) if row == id => Verdict::Uncharged,
        _ => Verdict::Lost,
    };
    Ok((verdict, charges.len() as u64))
}
