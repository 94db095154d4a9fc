#!/usr/bin/env bash
# HTTP over loopback (docs/benchmarks.md, "HTTP over loopback (issue 6)"): builds bench/ in
# release and runs the comparison (bare axum, tower-idempotency on Memory/SQLite/PostgreSQL,
# axum-idempotent 0.6, idempotent 2.0) on the fresh and replay paths, then the 60 s growth run.
# idempotent 2.0 declares rust-version 1.98 but builds on 1.95, hence --ignore-rust-version.
#   scripts/bench-http.sh            # everything
#   scripts/bench-http.sh compare    # or: growth
# Settings: BENCH_SECS (5), BENCH_ROUNDS (3), BENCH_CONNS (32), GROWTH_SECS (60), GROWTH_WINDOW (5),
# DATABASE_URL (PostgresLedger is left out when unset), BENCH_ONLY (a comma-separated list of
# variants), BENCH_HANDLER=json (every variant's handler parses the JSON body instead of ignoring it).
#   scripts/bench-http.sh one memory replay   # one measurement, for a profiler
set -euo pipefail
cd "$(dirname "$0")/../bench"
export DATABASE_URL="${DATABASE_URL-postgres://postgres@127.0.0.1:5432/test}"
cargo build --release --quiet --ignore-rust-version
echo "uptime: $(uptime)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; rustc: $(rustc --version)"
[ $# -gt 0 ] || set -- all
./target/release/tower-idempotency-bench "$@"
echo "uptime: $(uptime)"
