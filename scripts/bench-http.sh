#!/usr/bin/env bash
# HTTP over loopback (docs/benchmarks.md, "HTTP over loopback (issue 6)"): builds bench/ in
# release and runs the comparison (bare axum, tower-idempotency on Memory/SQLite/PostgreSQL and
# CachedLedger<PostgresLedger>, RedisLedger, axum-idempotent 0.6 on its Moka and PostgreSQL stores,
# idempotent 2.0) on the fresh and replay paths, then the 60 s growth run. Each run reports req/s,
# p50 and p99 latency, and for the PostgreSQL variants the WAL bytes written per request.
# idempotent 2.0 declares rust-version 1.98 but builds on 1.95, hence --ignore-rust-version.
#   scripts/bench-http.sh            # everything
#   scripts/bench-http.sh compare    # or: growth
#   scripts/bench-http.sh issue18    # issue 18's table: bare, Memory, PostgreSQL (+ cache), SQLite,
#                                    # axum-idempotent on PostgreSQL (BENCH_ONLY narrows it further),
#                                    # by the issue's method: a 15-byte body the handler parses
#   scripts/bench-http.sh latency    # issue18 with network latency to the databases:
#                                    # BENCH_DB_DELAY_US defaults to 500 (0.5 ms each way)
# Settings: BENCH_SECS (5), BENCH_ROUNDS (3), BENCH_CONNS (32), GROWTH_SECS (60), GROWTH_WINDOW (5),
# DATABASE_URL (the PostgreSQL variants are left out when empty), BENCH_ONLY (a comma-separated list of
# variants: memory, sqlite, postgres, postgres-cached, postgres-tx (exactly-once mode), redis (REDIS_URL), axum-idempotent, axum-idempotent-pg,
# idempotent), BENCH_PATHS (fresh, replay or mixed; fresh and replay by default; mixed: BENCH_MIX percent
# replays, default 10, spread among first requests), BENCH_PG_STRATEGY (combined, insert or read: the
# PostgreSQL ledger variants' ClaimStrategy; the default, adaptive, otherwise), BENCH_PG_BATCH=0 (the
# PostgreSQL ledger variants write every completion alone: with_batched_completions(false)), BENCH_HANDLER=json (every
# variant's handler parses the JSON body instead of ignoring it), BENCH_BODY=small (issue 18's 15-byte
# body, {"amount":1000}, instead of 1 KiB; with BENCH_HANDLER=json it is issue 18's own method, and
# the issue18 and latency runs' default), BENCH_PG_POOL (the PostgreSQL pool size of
# the ledger variants and of the PostgreSQL peer alike; default 10), BENCH_DB_DELAY_US (when > 0, every
# variant reaches PostgreSQL and Redis through a TCP proxy in the bench process that delays each chunk
# of bytes by that many microseconds each way, bench/src/delay.rs: a round trip costs about twice that
# more; the round trips through the proxy and direct are measured and printed at start), BENCH_PG_SQL
# (statements run on the PostgreSQL ledger variants' table after the migrations, `{t}` its name: for
# measuring a schema change before making it a migration).
#   scripts/bench-http.sh one memory replay   # one measurement, for a profiler
set -euo pipefail
cd "$(dirname "$0")/../bench"
export DATABASE_URL="${DATABASE_URL-postgres://postgres@127.0.0.1:5432/test}"
export REDIS_URL="${REDIS_URL-redis://127.0.0.1:6379}"
cargo build --release --quiet --ignore-rust-version
echo "uptime: $(uptime)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; rustc: $(rustc --version)"
[ $# -gt 0 ] || set -- all
if [ "$1" = latency ]; then
    export BENCH_DB_DELAY_US="${BENCH_DB_DELAY_US-500}"
    set -- issue18
fi
if [ "$1" = issue18 ]; then
    export BENCH_ONLY="${BENCH_ONLY-memory,postgres,postgres-cached,postgres-tx,sqlite,redis,axum-idempotent-pg}"
    # The issue's own method: a 15-byte body that the handler parses. BENCH_BODY= BENCH_HANDLER=
    # gives the stricter default of the other runs (1 KiB that the handler ignores).
    export BENCH_BODY="${BENCH_BODY-small}" BENCH_HANDLER="${BENCH_HANDLER-json}"
    set -- compare
fi
./target/release/tower-idempotency-bench "$@"
echo "uptime: $(uptime)"
