//! The ledger conformance suite against `PostgresLedger`, each test on a table of its own so that
//! they run in parallel. Without `DATABASE_URL` each test says it is skipped (and fails if
//! `CI=true`).
//!
//! `ledger_conformance_tests!` needs a ledger from its factory and so cannot skip; this list
//! mirrors its cases, and `every_conformance_case_is_listed` checks that it still does.

mod common;

use tower_idempotency_core::conformance;

macro_rules! postgres_conformance {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                conformance::run(async {
                    let Some(table) = common::PgTable::create().await else { return };
                    conformance::$case(table.ledger.clone()).await;
                    table.drop().await;
                });
            }
        )*

        const CASES: &[&str] = &[$(stringify!($case)),*];
    };
}

postgres_conformance!(
    concurrent_claims_have_one_winner,
    live_claim_is_in_progress,
    completed_claim_returns_response,
    wrong_token_is_fenced,
    expired_lease_is_taken_over_and_fenced,
    takeover_requires_same_fingerprint,
    renewal_prevents_takeover,
    release_frees_the_key,
    retention_expires_records,
    scopes_are_separate,
    operation_lookup_is_scoped,
    purge_deletes_only_expired,
    large_binary_response_round_trips,
    waiters_see_completion,
);

/// The cases above are exactly the ones `ledger_conformance_tests!` expands to, read from the
/// macro's source in core so that a new conformance case cannot be silently missed here.
#[test]
fn every_conformance_case_is_listed() {
    let source = include_str!("../../crates/tower-idempotency-core/src/conformance.rs");
    let listed: Vec<&str> = source
        .split("$crate::ledger_conformance_tests!(@cases $make;")
        .nth(1)
        .and_then(|rest| rest.split(");").next())
        .expect("the case list of ledger_conformance_tests!")
        .split(',')
        .map(str::trim)
        .filter(|case| !case.is_empty())
        .collect();
    assert!(!listed.is_empty(), "found no cases in the macro");
    for case in &listed {
        assert!(
            CASES.contains(case),
            "conformance case {case} is not run against PostgreSQL"
        );
    }
}
