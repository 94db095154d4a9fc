//! How the PostgreSQL ledger claims a key: [`ClaimStrategy`], and the running share of claims
//! that found a stored record, which the default ([`ClaimStrategy::Adaptive`]) decides by, and
//! by which the SQLite ledger decides whether to read before it claims (`sqlite.rs`).
//!
//! The claim statement reads the record and inserts in one round trip, and PostgreSQL sets up
//! both halves whichever one does the work. A plain `INSERT .. ON CONFLICT DO NOTHING` is
//! cheaper for a key nobody has used; a plain `SELECT` is cheaper for a replay (profiled: the
//! claim statement took 60 µs of PostgreSQL's CPU per replay, a `SELECT` about 37 µs;
//! docs/benchmarks.md, "Issue 18, fourth pass"). Each costs one more round trip when it guesses
//! wrong, so the ledger guesses from what its recent claims found.

use std::sync::atomic::{AtomicU32, Ordering};

/// How [`PostgresLedger`](crate::PostgresLedger) claims a key
/// ([`with_claim_strategy`](crate::PostgresLedger::with_claim_strategy)).
///
/// Every strategy means the same claim: the plain `INSERT` succeeds only where no record exists
/// (which the claim statement would also have inserted), the plain `SELECT` answers only for a
/// record the claim could not take (a stored response, a live lease, a different request), as the
/// claim statement's own read would have a moment later; whenever either finds otherwise, the
/// claim statement runs and decides atomically, as always (replacing an expired record, taking
/// over a lapsed lease).
#[cfg(feature = "postgres")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClaimStrategy {
    /// By the share of this ledger's recent claims (about the last 64, its clones included) that
    /// found a record: under one in eight, [`InsertFirst`](Self::InsertFirst) (ordinary traffic,
    /// mostly first requests); over seven in eight, [`ReadFirst`](Self::ReadFirst) (a retry
    /// storm); in between, [`Combined`](Self::Combined). Starts inserting first. The bands are
    /// narrow so that a wrong guess, which costs a round trip, stays rare: where the database is
    /// a network hop away and the pool's connections, not its CPU, are the limit, the extra round
    /// trips cost more than the cheaper statements save.
    #[default]
    Adaptive,
    /// The claim statement alone, which reads and inserts in one statement: one round trip for
    /// every claim.
    Combined,
    /// A plain `INSERT .. ON CONFLICT DO NOTHING` first, then the claim statement if it inserted
    /// nothing: a first request costs one cheap statement, a replay two round trips.
    InsertFirst,
    /// A plain `SELECT` of the record first, then the claim statement if it found none: a replay
    /// costs one cheap statement, a first request two round trips.
    ReadFirst,
}

/// What one claim runs first.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum First {
    Insert,
    Read,
    /// Nothing: the claim statement.
    Claim,
}

/// The share of recent claims that found a record, as a fixed-point fraction of [`ONE`], moved
/// 1/64 of the way towards 0 or 1 by each claim (an exponentially weighted average).
///
/// Updated with a plain load and store rather than a compare-and-swap loop: two claims that
/// record at once may lose one of the two updates, which only delays the average by a claim, and
/// no claim waits on another's bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ReplayShare(AtomicU32);

/// 1.0 in [`ReplayShare`]'s fixed point.
const ONE: u32 = 1 << 16;
/// Insert first below this share. On loopback, where the CPU is the limit, inserting first saved
/// a first request about 30-40 µs of CPU (throughput +12 %, the median of 6 rounds) and costs a
/// replay a round trip (about 55 µs of the database's and the app's CPU): break-even near
/// 0.35-0.4. With 1.1 ms to the database and the pool the limit, every extra round trip costs:
/// 10 % of replays measured -1 to -4 % against the claim statement alone, 20 % -7 to -8 %
/// (docs/benchmarks.md). One in eight keeps the loss there small and the gain on loopback.
const INSERT_BELOW: u32 = ONE / 8;
/// Read first above this share: on loopback the break-even is about 0.72 (a replay read first
/// saves about 23 µs of the database's CPU; a first request read first costs a round trip, about
/// 60 µs); narrowed like [`INSERT_BELOW`], for the same reason.
#[cfg(feature = "postgres")]
const READ_ABOVE: u32 = ONE / 8 * 7;
/// Each claim moves the share by 1/2^WEIGHT of the distance.
const WEIGHT: u32 = 6;

impl ReplayShare {
    /// What the next claim runs first under `strategy`.
    #[cfg(feature = "postgres")]
    pub(crate) fn first(&self, strategy: ClaimStrategy) -> First {
        match strategy {
            ClaimStrategy::Combined => First::Claim,
            ClaimStrategy::InsertFirst => First::Insert,
            ClaimStrategy::ReadFirst => First::Read,
            ClaimStrategy::Adaptive if self.mostly_fresh() => First::Insert,
            ClaimStrategy::Adaptive if self.0.load(Ordering::Relaxed) > READ_ABOVE => First::Read,
            ClaimStrategy::Adaptive => First::Claim,
        }
    }

    /// Whether under one in eight recent claims found a record: where `Adaptive` inserts
    /// first, and where the SQLite ledger skips its read before claiming.
    pub(crate) fn mostly_fresh(&self) -> bool {
        self.0.load(Ordering::Relaxed) < INSERT_BELOW
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

#[cfg(all(test, feature = "postgres"))]
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
    fn adaptive_starts_by_inserting_first_and_the_others_are_fixed() {
        let share = ReplayShare::default();
        assert_eq!(share.first(ClaimStrategy::Adaptive), First::Insert);
        assert_eq!(share.first(ClaimStrategy::ReadFirst), First::Read);
        assert_eq!(share.first(ClaimStrategy::InsertFirst), First::Insert);
        assert_eq!(share.first(ClaimStrategy::Combined), First::Claim);
        let replays = after(std::iter::repeat_n(true, 1_000));
        assert_eq!(replays.first(ClaimStrategy::InsertFirst), First::Insert);
        assert_eq!(replays.first(ClaimStrategy::Combined), First::Claim);
    }

    #[track_caller]
    fn assert_first(share: &ReplayShare, expected: First) {
        let first = share.first(ClaimStrategy::Adaptive);
        assert_eq!(first, expected, "at a share of {}", share.get());
    }

    #[test]
    fn a_run_of_replays_moves_from_inserting_to_reading_first_and_back() {
        // 1 - (63/64)^n passes 1/8 from n = 9 on, and 7/8 from n = 133 on.
        assert_first(&after(std::iter::repeat_n(true, 7)), First::Insert);
        assert_first(&after(std::iter::repeat_n(true, 12)), First::Claim);
        assert_first(&after(std::iter::repeat_n(true, 125)), First::Claim);
        let share = after(std::iter::repeat_n(true, 140));
        assert_first(&share, First::Read);
        for _ in 0..20 {
            share.record(false);
        }
        assert_first(&share, First::Claim);
        for _ in 0..150 {
            share.record(false);
        }
        assert_first(&share, First::Insert);
    }

    #[test]
    fn the_share_follows_the_mix_of_claims() {
        // One in 20, one in 5, half, four in 5, 19 in 20 found a record.
        let mix = |every: usize, found: bool| after((0..1_000).map(|i| (i % every == 0) == found));
        let few = mix(20, true);
        assert!((0.02..0.1).contains(&few.get()), "{}", few.get());
        assert_first(&few, First::Insert);
        assert_first(&mix(5, true), First::Claim);
        let half = mix(2, true);
        assert!((0.4..0.6).contains(&half.get()), "{}", half.get());
        assert_first(&half, First::Claim);
        assert_first(&mix(5, false), First::Claim);
        let nearly_all = mix(20, false);
        assert!(
            (0.9..0.98).contains(&nearly_all.get()),
            "{}",
            nearly_all.get()
        );
        assert_first(&nearly_all, First::Read);
    }

    #[test]
    fn the_share_stays_between_zero_and_one() {
        let all = after(std::iter::repeat_n(true, 10_000));
        assert_eq!(all.get(), 1.0);
        let none = after(std::iter::repeat_n(true, 10).chain(std::iter::repeat_n(false, 10_000)));
        assert_eq!(none.get(), 0.0);
    }
}
