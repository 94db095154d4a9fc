//! Whether the PostgreSQL ledger reads a key's record before it claims the key: [`ReadFirst`],
//! and the running share of claims that found a stored record, which the default
//! ([`ReadFirst::Adaptive`]) decides by.
//!
//! The claim statement reads the record and inserts in one round trip, but PostgreSQL sets up
//! its `INSERT` (the table's indexes, the `ON CONFLICT` action) even when the read finds a record
//! and nothing is inserted: measured on a replay, 60 µs of PostgreSQL's CPU against about 37 µs
//! for a plain `SELECT` (docs/benchmarks.md, "Issue 18, fourth pass"). Reading first saves that
//! on a replay, a 409 or a 422, and costs a first request one more round trip. It pays when most
//! claims find a record: a retry storm, or clients that retry every request.

use std::sync::atomic::{AtomicU32, Ordering};

/// Whether [`PostgresLedger`](crate::PostgresLedger) reads a key's record with a plain `SELECT`
/// before it runs the claim statement ([`with_read_first`](crate::PostgresLedger::with_read_first)).
///
/// Either way the claim means the same: the read answers only for a record the claim could not
/// take (a stored response, a live lease, a different request), exactly as the claim statement's
/// own read would have a moment later; when it finds none, the claim statement runs and decides
/// atomically as always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReadFirst {
    /// Read first while most recent claims found a stored record: more than three in four,
    /// averaged over about the last 64 claims of this ledger (and its clones). A replay then
    /// costs one `SELECT`; a first request, the claim statement alone. Starts by claiming first.
    #[default]
    Adaptive,
    /// Always read first: a replay is one `SELECT`, a first request two round trips.
    Always,
    /// Never read first: every claim is the claim statement alone, one round trip.
    Never,
}

/// The share of recent claims that found a record, as a fixed-point fraction of [`ONE`], moved
/// 1/64 of the way towards 0 or 1 by each claim (an exponentially weighted average).
///
/// Updated with a plain load and store rather than a compare-and-swap loop: two claims that
/// record at once may lose one of the two updates, which only delays the average by a claim, and
/// no claim waits on another ledger call's bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ReplayShare(AtomicU32);

/// 1.0 in [`ReplayShare`]'s fixed point.
const ONE: u32 = 1 << 16;
/// Read first above this share: the measured break-even is about 0.72 (a replay read first saves
/// about 23 µs of the database's CPU; a first request read first costs a round trip, about 60 µs
/// of the database's and the app's).
const THRESHOLD: u32 = ONE / 4 * 3;
/// Each claim moves the share by 1/2^WEIGHT of the distance.
const WEIGHT: u32 = 6;

impl ReplayShare {
    /// Whether the next claim reads first under `policy`.
    pub(crate) fn reads_first(&self, policy: ReadFirst) -> bool {
        match policy {
            ReadFirst::Always => true,
            ReadFirst::Never => false,
            ReadFirst::Adaptive => self.0.load(Ordering::Relaxed) > THRESHOLD,
        }
    }

    /// Counts one claim's outcome: it found a record (`true`), or took the key (`false`).
    pub(crate) fn record(&self, found: bool) {
        let share = self.0.load(Ordering::Relaxed);
        let next = if found {
            share + ((ONE - share) >> WEIGHT).max(1)
        } else {
            share - (share >> WEIGHT).max(share.min(1))
        };
        self.0.store(next.min(ONE), Ordering::Relaxed);
    }

    /// The share, from 0.0 to 1.0 (for `Debug`).
    pub(crate) fn get(&self) -> f64 {
        f64::from(self.0.load(Ordering::Relaxed)) / f64::from(ONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(outcomes: impl IntoIterator<Item = bool>) -> ReplayShare {
        let share = ReplayShare::default();
        for found in outcomes {
            share.record(found);
        }
        share
    }

    #[test]
    fn adaptive_starts_by_claiming_first() {
        let share = ReplayShare::default();
        assert!(!share.reads_first(ReadFirst::Adaptive));
        assert!(share.reads_first(ReadFirst::Always));
        assert!(!share.reads_first(ReadFirst::Never));
    }

    #[test]
    fn a_run_of_replays_turns_reading_first_on_and_first_requests_turn_it_off() {
        // 1 - (63/64)^n > 3/4 from n = 89 on.
        let replays = after(std::iter::repeat_n(true, 80));
        assert!(
            !replays.reads_first(ReadFirst::Adaptive),
            "{}",
            replays.get()
        );
        let replays = after(std::iter::repeat_n(true, 100));
        assert!(
            replays.reads_first(ReadFirst::Adaptive),
            "{}",
            replays.get()
        );
        for _ in 0..20 {
            replays.record(false);
        }
        assert!(
            !replays.reads_first(ReadFirst::Adaptive),
            "{}",
            replays.get()
        );
        assert!(replays.reads_first(ReadFirst::Always));
    }

    #[test]
    fn the_share_follows_the_mix_of_claims() {
        // Half replays never reads first; nine in ten does.
        let half = after((0..1_000).map(|i| i % 2 == 0));
        assert!((0.4..0.6).contains(&half.get()), "{}", half.get());
        assert!(!half.reads_first(ReadFirst::Adaptive));
        let most = after((0..1_000).map(|i| i % 10 != 0));
        assert!((0.8..0.97).contains(&most.get()), "{}", most.get());
        assert!(most.reads_first(ReadFirst::Adaptive));
    }

    #[test]
    fn the_share_stays_between_zero_and_one() {
        let all = after(std::iter::repeat_n(true, 10_000));
        assert_eq!(all.get(), 1.0);
        let none = after(std::iter::repeat_n(true, 10).chain(std::iter::repeat_n(false, 10_000)));
        assert_eq!(none.get(), 0.0);
    }
}
