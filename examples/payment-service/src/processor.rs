//! The simulated card processor: it takes `latency` and fails with probability `fail_rate`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};

use crate::{problem::Problem, store::NewPayment};

/// A processor that charges nothing for real.
#[derive(Debug, Clone)]
pub struct Processor {
    latency: Duration,
    fail_rate: f64,
}

impl Processor {
    /// A processor that takes `latency` per charge and fails a `fail_rate` share of them
    /// (clamped to 0..=1).
    pub fn new(latency: Duration, fail_rate: f64) -> Self {
        Self {
            latency,
            fail_rate: fail_rate.clamp(0.0, 1.0),
        }
    }

    /// Charges `payment`. A failure charged nothing: 503 problem+json with `Retry-After`; the
    /// idempotency layer releases the key on a 5xx, so a retry with the same key charges again.
    pub async fn charge(&self, payment: &NewPayment) -> Result<(), Problem> {
        tokio::time::sleep(self.latency).await;
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            tracing::warn!(amount = payment.amount, "the processor declined to answer");
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "processor-unavailable",
                "The payment processor is unavailable",
                "nothing was charged; retry with the same Idempotency-Key",
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        Ok(())
    }
}
