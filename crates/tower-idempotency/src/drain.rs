//! The in-flight cap and the drain: how many covered requests one layer holds at once, and a
//! handle that an app's graceful shutdown awaits until they (detached handlers included) are
//! done.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// `None`: no cap.
    cap: Option<usize>,
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The layer holds its cap of requests.
    Full,
    /// The layer is draining for shutdown.
    Draining,
}

/// One covered request in flight: held by the request's future, and moved with it into a task if
/// the client leaves, so a detached handler counts until it has recorded its result.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Gate {
    pub(crate) fn new(cap: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            cap,
            ..Self::default()
        })
    }

    /// Lets one request in, or says why not.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Ticket, Refused> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Refused::Draining);
        }
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match self.cap {
                Some(cap) if n >= cap => None,
                _ => Some(n + 1),
            });
        match admitted {
            Ok(_) => Ok(Ticket(self.clone())),
            Err(_) => Err(Refused::Full),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A handle on one layer's requests in flight, from
/// [`IdempotencyLayer::drain_handle`](crate::IdempotencyLayer::drain_handle). Clone it into an
/// app's shutdown path.
///
/// ```
/// # use std::time::Duration;
/// # use tower_idempotency::{IdempotencyLayer, MemoryLedger};
/// # async fn run() {
/// let layer = IdempotencyLayer::new(MemoryLedger::new());
/// let drain = layer.drain_handle();
/// // ... serve with the layer; then, on SIGTERM, after the server stopped accepting:
/// let finished = drain.drain(Duration::from_secs(30)).await;
/// assert!(finished, "requests still running at the deadline");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DrainHandle(pub(crate) Arc<Gate>);

impl DrainHandle {
    /// Covered requests in flight now, detached handlers included.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    /// Refuses new covered requests (503 with `Retry-After`; other requests pass as before), then
    /// waits until every request in flight, detached handlers included, has recorded its result,
    /// or `deadline` passes. `true` if none is left.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.0.draining.store(true, Ordering::Release);
        let idle = async {
            loop {
                let notified = self.0.idle.notified();
                if self.0.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, idle).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_refuses_past_it_and_frees_a_place_on_drop() {
        let gate = Gate::new(Some(2));
        let a = gate.enter().unwrap();
        let _b = gate.enter().unwrap();
        assert_eq!(gate.enter().unwrap_err(), Refused::Full);
        drop(a);
        assert!(gate.enter().is_ok());
    }

    #[tokio::test]
    async fn drain_refuses_new_requests_and_waits_for_the_last_ticket() {
        let gate = Gate::new(None);
        let ticket = gate.enter().unwrap();
        let handle = DrainHandle(gate.clone());
        let drained = tokio::spawn({
            let handle = handle.clone();
            async move { handle.drain(Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        while !gate.draining.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.enter().unwrap_err(), Refused::Draining);
        assert!(!drained.is_finished());
        drop(ticket);
        assert!(drained.await.unwrap());
        assert_eq!(handle.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_its_deadline() {
        let gate = Gate::new(None);
        let _stuck = gate.enter().unwrap();
        assert!(!DrainHandle(gate).drain(Duration::from_secs(5)).await);
    }
}
