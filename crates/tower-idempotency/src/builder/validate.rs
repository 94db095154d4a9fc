//! The settings that cannot work, and the one place they are checked: [`build`].
//!
//! [`build`]: super::IdempotencyLayerBuilder::build

use std::time::Duration;

use tower_idempotency_core::MAX_DURATION;

use super::InProgress;
use crate::config::Config;

/// A setting that cannot work, reported by
/// [`IdempotencyLayerBuilder::build`](crate::IdempotencyLayerBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The lease must be at least one millisecond.
    #[error("the lease must be at least 1 ms")]
    ZeroLease,
    /// Retention must be at least the lease, or an abandoned claim could be purged while its
    /// lease still runs.
    #[error("retention ({retention:?}) must be at least the lease ({lease:?})")]
    RetentionShorterThanLease {
        /// The configured retention.
        retention: Duration,
        /// The configured lease.
        lease: Duration,
    },
    /// The request body limit must be at least one byte.
    #[error("the request body limit must be at least 1 byte")]
    ZeroBodyLimit,
    /// The layer would cover no method at all.
    #[error("the layer covers no HTTP method")]
    NoMethods,
    /// The Wait policy needs a timeout of at least one millisecond.
    #[error("the Wait policy's timeout must be at least 1 ms")]
    ZeroWaitTimeout,
    /// A duration (the named setting) is longer than 100 years, more than a deadline can hold.
    #[error("the {0} is longer than 100 years")]
    DurationTooLong(&'static str),
    /// The ledger timeout must be at least one millisecond.
    #[error("the ledger timeout must be at least 1 ms")]
    ZeroLedgerTimeout,
    /// The ledger timeout must be at most a third of the lease, so that a renewal can time out
    /// and be retried before the lease runs out.
    #[error("the ledger timeout ({timeout:?}) must be at most a third of the lease ({lease:?})")]
    LedgerTimeoutTooLong {
        /// The configured ledger timeout.
        timeout: Duration,
        /// The configured lease.
        lease: Duration,
    },
    /// The circuit breaker needs at least one failure to open and an open time of at least one
    /// millisecond.
    #[error("the circuit breaker needs failures >= 1 and open_for >= 1 ms")]
    InvalidCircuitBreaker,
    /// The in-flight cap must be at least 1.
    #[error("the in-flight cap must be at least 1")]
    ZeroMaxInFlight,
    /// The maximum handler time must be at least one millisecond.
    #[error("the maximum handler time must be at least 1 ms")]
    ZeroMaxHandlerTime,
    /// The operation path must start with `/`, not end with one, and hold only path characters.
    #[error("the operation path {0:?} must start with '/', not end with '/', and be a plain path")]
    InvalidOperationPath(String),
}

/// Checks every setting: the first that cannot work is the error.
pub(super) fn check(c: &Config) -> Result<(), ConfigError> {
    if c.lease < Duration::from_millis(1) {
        return Err(ConfigError::ZeroLease);
    }
    let wait = match c.in_progress {
        InProgress::Wait { timeout } => timeout,
        _ => Duration::ZERO,
    };
    for (setting, duration) in [
        ("lease", c.lease),
        ("retention", c.retention),
        ("wait timeout", wait),
        ("retry after", c.retry_after),
        ("ledger timeout", c.ledger_timeout()),
        ("maximum handler time", c.max_handler_time),
        (
            "circuit breaker's open time",
            c.breaker.settings().map_or(Duration::ZERO, |b| b.open_for),
        ),
    ] {
        if duration > MAX_DURATION {
            return Err(ConfigError::DurationTooLong(setting));
        }
    }
    if c.retention < c.lease {
        return Err(ConfigError::RetentionShorterThanLease {
            retention: c.retention,
            lease: c.lease,
        });
    }
    if c.body_limit == 0 {
        return Err(ConfigError::ZeroBodyLimit);
    }
    if c.methods.is_empty() {
        return Err(ConfigError::NoMethods);
    }
    if let InProgress::Wait { timeout } = c.in_progress
        && timeout < Duration::from_millis(1)
    {
        return Err(ConfigError::ZeroWaitTimeout);
    }
    if let Some(timeout) = c.ledger_timeout {
        if timeout < Duration::from_millis(1) {
            return Err(ConfigError::ZeroLedgerTimeout);
        }
        if timeout > c.lease / 3 {
            return Err(ConfigError::LedgerTimeoutTooLong {
                timeout,
                lease: c.lease,
            });
        }
    }
    if let Some(breaker) = c.breaker.settings()
        && (breaker.failures == 0 || breaker.open_for < Duration::from_millis(1))
    {
        return Err(ConfigError::InvalidCircuitBreaker);
    }
    if c.max_in_flight == Some(0) {
        return Err(ConfigError::ZeroMaxInFlight);
    }
    if c.max_handler_time < Duration::from_millis(1) {
        return Err(ConfigError::ZeroMaxHandlerTime);
    }
    let path = &c.operation_path;
    let plain = path.len() > 1
        && path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains("//")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
    if !plain {
        return Err(ConfigError::InvalidOperationPath(path.clone()));
    }
    Ok(())
}
