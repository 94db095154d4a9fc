#!/usr/bin/env bash
# Soak: the tests/tests/soak.rs run for SOAK_SECS (default 60) in release, printing its summary
# (requests, executed/replayed/409, peak ledger records and the bound, peak RSS).
#   scripts/soak.sh                 # 60 s
#   SOAK_SECS=300 scripts/soak.sh   # longer; SOAK_RETENTION_SECS (default 1) sets retention
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECS="${SOAK_SECS:-60}"
echo "soak: ${SOAK_SECS} s in release; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo test --release -p tower-idempotency-tests --test soak -- --nocapture
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
