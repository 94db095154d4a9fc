//! The circuit breaker around the ledger: after repeated failures or timeouts, covered requests
//! get 503 at once without touching the ledger, until a half-open probe succeeds.
//!
//! Small and hand-written rather than a dependency: the breakers on crates.io wrap a whole tower
//! service (the handler's, here, which must not be cut off) or bring their own backoff and
//! instrumentation types; this one is a counter and a timestamp behind a mutex that is never
//! held across an await, with the state exported as a metric.

use std::{sync::Mutex, time::Duration};

// tokio's clock, so that tests with a paused clock move the breaker's too (outside a runtime it
// is the system's monotonic clock).
use tokio::time::Instant;

/// When the breaker opens and how long it stays open. See
/// [`with_circuit_breaker`](crate::IdempotencyLayerBuilder::with_circuit_breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Consecutive failed or timed-out ledger calls that open the breaker. Default: 5.
    pub failures: u32,
    /// How long it stays open before one probe is let through. Default: 5 s.
    pub open_for: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

/// What the breaker is doing, as its metric reports it (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Calls go to the ledger.
    Closed = 0,
    /// Calls are refused at once.
    Open = 1,
    /// One probe is in flight; every other call is refused until it answers.
    HalfOpen = 2,
}

impl BreakerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Whether a call may go to the ledger, and if so whether it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Go ahead.
    Call,
    /// Go ahead: the probe whose answer closes or re-opens the breaker.
    Probe,
    /// Refused: the breaker is open.
    Refused,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
}

/// The breaker's state, shared by every clone of one layer.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: Option<CircuitBreaker>,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A breaker with `settings`, or one that always lets calls through.
    pub(crate) fn new(settings: Option<CircuitBreaker>) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is one assignment: a poisoned lock holds a consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings, if the breaker is on.
    pub(crate) fn settings(&self) -> Option<CircuitBreaker> {
        self.settings
    }

    /// Asks to make a ledger call now.
    pub(crate) fn permit(&self) -> Permit {
        let Some(settings) = self.settings else {
            return Permit::Call;
        };
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Permit::Call,
            BreakerState::HalfOpen => Permit::Refused,
            BreakerState::Open => {
                let waited = inner.opened_at.map_or(Duration::MAX, |at| at.elapsed());
                if waited >= settings.open_for {
                    inner.state = BreakerState::HalfOpen;
                    Permit::Probe
                } else {
                    Permit::Refused
                }
            }
        }
    }

    /// Records a call's answer: `true` for an answer (even `LeaseLost`), `false` for a failure or
    /// a timeout. Returns the new state if this answer changed it.
    pub(crate) fn record(&self, permit: Permit, answered: bool) -> Option<BreakerState> {
        let settings = self.settings?;
        let mut inner = self.lock();
        let before = inner.state;
        if answered {
            inner.consecutive_failures = 0;
            // The probe's answer closes it; so does any answer while open (a renewal or a
            // completion, which the breaker never refuses, got through).
            if permit == Permit::Probe || before == BreakerState::Open {
                inner.state = BreakerState::Closed;
                inner.opened_at = None;
            }
        } else {
            inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
            let trips = permit == Permit::Probe
                || (before == BreakerState::Closed
                    && inner.consecutive_failures >= settings.failures.max(1));
            if trips {
                inner.state = BreakerState::Open;
                inner.opened_at = Some(Instant::now());
            }
        }
        (inner.state != before).then_some(inner.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, open_for_ms: u64) -> Breaker {
        Breaker::new(Some(CircuitBreaker {
            failures,
            open_for: Duration::from_millis(open_for_ms),
        }))
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(3, 60_000);
        for _ in 0..2 {
            assert_eq!(b.record(b.permit(), false), None);
        }
        // An answer in between resets the count.
        assert_eq!(b.record(b.permit(), true), None);
        for _ in 0..2 {
            assert_eq!(b.record(b.permit(), false), None);
        }
        assert_eq!(b.record(b.permit(), false), Some(BreakerState::Open));
        assert_eq!(b.permit(), Permit::Refused);
    }

    #[test]
    fn lets_one_probe_through_after_open_for_and_closes_on_its_success() {
        let b = breaker(1, 20);
        assert_eq!(b.record(b.permit(), false), Some(BreakerState::Open));
        assert_eq!(b.permit(), Permit::Refused);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.permit();
        assert_eq!(probe, Permit::Probe);
        assert_eq!(b.permit(), Permit::Refused, "only one probe at a time");
        assert_eq!(b.record(probe, true), Some(BreakerState::Closed));
        assert_eq!(b.permit(), Permit::Call);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = breaker(1, 20);
        b.record(b.permit(), false);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.permit();
        assert_eq!(b.record(probe, false), Some(BreakerState::Open));
        assert_eq!(b.permit(), Permit::Refused);
    }

    #[test]
    fn without_settings_it_never_opens() {
        let b = Breaker::new(None);
        for _ in 0..100 {
            assert_eq!(b.record(b.permit(), false), None);
        }
        assert_eq!(b.permit(), Permit::Call);
    }
}
