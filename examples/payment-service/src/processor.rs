//! The card processor's client: every charge is a `POST /charges` over HTTP with the charge's
//! idempotency key and a timeout (the processor itself is [`card_processor`](crate::card_processor)).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use reqwest::Client;
use serde_json::Value;

use crate::{auth::Tenant, card_processor::ChargeRequest, problem::Problem, store::NewPayment};

/// The default timeout of one call to the processor.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the card processor at one base URL.
#[derive(Debug, Clone)]
pub struct Processor {
    client: Client,
    base: String,
}

impl Processor {
    /// A client of the processor at `base` (such as `http://127.0.0.1:3001`); every call gives
    /// up after `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: Client::builder().timeout(timeout).build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// The processor's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Charges `payment` for `tenant` with the processor's `Idempotency-Key` `key`. The same key
    /// gets the processor's replay, so a retry after any failure charges once.
    ///
    /// `Ok` once the processor answered 201 (a replay included). Otherwise a problem, none of
    /// which says nothing was charged unless the processor said so: 402 `card-declined` (stored
    /// by the layer), and 503 for everything whose outcome is unknown or transient, which the
    /// layer does not store, so that the retry sends the same key again.
    pub async fn charge(
        &self,
        key: &str,
        tenant: &Tenant,
        payment: &NewPayment,
    ) -> Result<(), Problem> {
        let body = ChargeRequest {
            merchant: tenant.id().to_owned(),
            customer: payment.customer.clone(),
            amount: payment.amount,
            currency: payment.currency.clone(),
        };
        let sent = self
            .client
            .post(format!("{}/charges", self.base))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, "the processor did not answer");
                return Err(unknown());
            }
        };
        let status = response.status();
        // Read the whole answer: a connection broken mid-answer is an unknown outcome too.
        let answer = response.bytes().await;
        match (status, answer) {
            (StatusCode::CREATED | StatusCode::OK, Ok(_)) => Ok(()),
            (StatusCode::PAYMENT_REQUIRED, _) => Err(Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "card-declined",
                "The card was declined",
                "the processor declined the charge; nothing was charged",
            )),
            // The processor has this charge key bound to another payment: an earlier run of
            // this Idempotency-Key (released, say by a 5xx after the charge) charged or declined
            // a different body. The key belongs to that payment; the client reused it.
            (StatusCode::UNPROCESSABLE_ENTITY, _) => Err(Problem::idempotency(
                tower_idempotency::problem::RejectionKind::KeyReused,
                "an earlier attempt with this Idempotency-Key reached the processor with a \
                 different payment; send this payment with a new key, or send the earlier \
                 payment again with this key to finish it",
            )
            // Nothing was charged now, and the key must stay free: the earlier payment, charged
            // but not recorded, is finished by sending it again with this key.
            .not_stored()),
            (StatusCode::CONFLICT, _) => Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "processor-busy",
                "The processor is still working on this charge",
                "an earlier attempt of this payment is still in progress at the processor; \
                 retry with the same Idempotency-Key",
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))),
            (_, Err(error)) => {
                tracing::warn!(%error, %status, "the processor's answer was cut off");
                Err(unknown())
            }
            (status, Ok(_)) if status.is_server_error() => {
                tracing::warn!(%status, "the processor failed");
                Err(unknown())
            }
            (status, Ok(body)) => {
                tracing::error!(%status, body = %String::from_utf8_lossy(&body), "the processor refused the charge");
                Err(Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "processor-error",
                    "The processor refused the charge",
                    "the card processor refused the charge request; it was not charged",
                ))
            }
        }
    }

    /// The processor's charges for `tenant` and `customer` (`{"charges": [..]}`), for audits.
    pub async fn charges(&self, tenant: &Tenant, customer: &str) -> Result<Value, Problem> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/charges", self.base),
            [("merchant", tenant.id()), ("customer", customer)],
        );
        let value = match url {
            Ok(url) => match self
                .client
                .get(url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
            {
                Ok(response) => response.json::<Value>().await.map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            },
            Err(error) => Err(error.to_string()),
        };
        value.map_err(|error| {
            tracing::warn!(%error, "listing the processor's charges failed");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "processor-unavailable",
                "The payment processor is unavailable",
                "the processor's charges could not be read",
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        })
    }
}

/// The processor failed or did not answer: the charge may or may not have been made.
fn unknown() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "processor-unavailable",
        "The payment processor is unavailable",
        "the processor did not confirm the charge, so the card may have been charged; a retry \
         with the same Idempotency-Key sends the processor the same charge key, so the card is \
         charged at most once",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}
