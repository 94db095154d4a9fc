//! Every setting `IdempotencyLayerBuilder::build` refuses, by name, and the defaults it accepts.

#![allow(clippy::unwrap_used)] // tests may panic

use std::time::Duration;

use tower_idempotency::{
    ConfigError, IdempotencyLayer, IdempotencyLayerBuilder, InProgress, MemoryLedger,
    core::MAX_DURATION,
};

fn builder() -> IdempotencyLayerBuilder<MemoryLedger> {
    IdempotencyLayer::builder(MemoryLedger::new())
}

#[test]
fn defaults_are_valid() {
    assert!(builder().build().is_ok());
}

#[test]
fn invalid_settings_are_named() {
    let err = |b: IdempotencyLayerBuilder<MemoryLedger>| b.build().err();
    assert_eq!(
        err(builder().with_lease(Duration::ZERO)),
        Some(ConfigError::ZeroLease)
    );
    assert!(matches!(
        err(builder().with_retention(Duration::from_secs(1))),
        Some(ConfigError::RetentionShorterThanLease { .. })
    ));
    assert_eq!(
        err(builder().with_body_limit(0)),
        Some(ConfigError::ZeroBodyLimit)
    );
    assert_eq!(
        err(builder().with_methods([])),
        Some(ConfigError::NoMethods)
    );
    assert_eq!(
        err(builder().with_in_progress(InProgress::Wait {
            timeout: Duration::ZERO
        })),
        Some(ConfigError::ZeroWaitTimeout)
    );
    for bad in ["", "/", "ops", "/ops/", "/a//b", "/{id}", "/a b"] {
        assert!(
            matches!(
                err(builder().with_operation_path(bad)),
                Some(ConfigError::InvalidOperationPath(_))
            ),
            "{bad:?}"
        );
    }
    assert!(
        builder()
            .with_operation_path("/v1/operations")
            .build()
            .is_ok()
    );
    // "Forever" is not a duration an Instant can hold: refused here, not a panic later.
    assert_eq!(
        err(builder().with_in_progress(InProgress::Wait {
            timeout: Duration::MAX
        })),
        Some(ConfigError::DurationTooLong("wait timeout"))
    );
    assert_eq!(
        err(builder().with_retention(Duration::MAX)),
        Some(ConfigError::DurationTooLong("retention"))
    );
    assert_eq!(
        err(builder()
            .with_lease(Duration::MAX)
            .with_retention(Duration::MAX)),
        Some(ConfigError::DurationTooLong("lease"))
    );
    assert_eq!(
        err(builder().with_retry_after(Duration::MAX)),
        Some(ConfigError::DurationTooLong("retry after"))
    );
    assert!(builder().with_retention(MAX_DURATION).build().is_ok());
}
