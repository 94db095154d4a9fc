#!/usr/bin/env bash
# schemathesis (a third-party, property-based API fuzzer) against the live payment service,
# from the service's own GET /openapi.json.
#
#   bash scripts/schemathesis.sh          # bounded and seeded, SQLite: what .ci/run runs
#   bash scripts/schemathesis.sh --long   # more examples, PostgreSQL ($DATABASE_URL's server);
#                                         # writes its result to docs/fuzzing.md
#
# Checks: no 5xx, every status code, content type and body as the document says. Then an
# audit: every payment row belongs to exactly one key's stored 201 (a handler that ran twice
# for one key would leave a payment no stored response names), nothing is left in progress, and
# the service's own listing (GET /payments?customer=..) answers exactly those payments.
# Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
TOKEN=tok_schemathesis
LONG=false
[ "${1:-}" = "--long" ] && LONG=true
[ "${SCHEMATHESIS_LONG:-}" = 1 ] && LONG=true
if $LONG; then
  MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-200}"
  PHASES=examples,coverage,fuzzing,stateful
else
  MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
  PHASES=examples,coverage,fuzzing,stateful
fi
SEED="${SCHEMATHESIS_SEED:-17}"

venv=.venv-schemathesis
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

work="$(mktemp -d)"
pid=""
pg_db=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if [ -n "$pg_db" ]; then
    psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $pg_db" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if $LONG; then
  pg_admin="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
  pg_db="schemathesis_$$"
  psql -q "$pg_admin" -c "CREATE DATABASE $pg_db" >/dev/null
  database_url="${pg_admin%/*}/$pg_db"
else
  database_url="sqlite://$work/payments.db?mode=rwc"
fi

cargo build --quiet -p payment-service --bin payment-service
PAYMENT_SERVICE_ADDR=127.0.0.1:0 PAYMENT_SERVICE_LATENCY_MS=5 RUST_LOG=warn \
  cargo run --quiet -p payment-service --bin payment-service -- serve \
  --database-url "$database_url" >"$work/service.out" 2>"$work/service.err" &
pid=$!
base=""
for _ in $(seq 1 300); do
  base="$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$work/service.out" | head -n 1)"
  [ -n "$base" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/service.err" >&2; echo "the service did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$base" ] || { echo "the service did not say 'listening on'" >&2; exit 1; }
echo "payment-service at $base ($database_url); schemathesis $SCHEMATHESIS_VERSION, seed $SEED, max examples $MAX_EXAMPLES"

start=$(date +%s)
set +e
"$venv/bin/schemathesis" run "$base/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --phases "$PHASES" \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --generation-database none \
  --workers 1 \
  --request-timeout 10 \
  --header "Authorization: Bearer $TOKEN" \
  --no-color 2>&1 | tee "$work/schemathesis.log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))

# The audit, while the service still answers the listing; then stop it and read the database.
audit_status=0
SCHEMATHESIS_BASE="$base" SCHEMATHESIS_TOKEN="$TOKEN" SCHEMATHESIS_DB="$database_url" \
  "$venv/bin/python" scripts/schemathesis_audit.py | tee "$work/audit.log" || audit_status=$?
kill "$pid"
wait "$pid" 2>/dev/null || true
pid=""
if grep -q "panicked" "$work/service.err"; then
  echo "the service panicked:" >&2
  grep -A3 panicked "$work/service.err" >&2
  audit_status=1
fi

if $LONG; then
  python3 - "$status" "$audit_status" "$elapsed" "$SEED" "$MAX_EXAMPLES" "$SCHEMATHESIS_VERSION" "$work/schemathesis.log" "$work/audit.log" <<'PY'
import re, sys, datetime, pathlib
status, audit, elapsed, seed, n, version, log, audit_log = sys.argv[1:]
path = pathlib.Path("docs/fuzzing.md")
text = path.read_text()
tail = "\n".join(pathlib.Path(log).read_text().strip().splitlines()[-12:])
result = "passed" if status == "0" and audit == "0" else "FAILED"
block = (
    "<!-- schemathesis-long:start -->\n"
    f"Last `scripts/schemathesis.sh --long`: **{result}** on {datetime.date.today()} "
    f"(schemathesis {version}, PostgreSQL, seed {seed}, max examples {n}, {elapsed} s).\n\n"
    "```text\n" + tail + "\n" + pathlib.Path(audit_log).read_text().strip() + "\n```\n"
    "<!-- schemathesis-long:end -->"
)
text = re.sub(r"<!-- schemathesis-long:start -->.*<!-- schemathesis-long:end -->", lambda _: block, text, flags=re.S)
path.write_text(text)
PY
fi

echo "schemathesis took ${elapsed}s (exit $status), audit exit $audit_status"
[ "$status" -eq 0 ] && [ "$audit_status" -eq 0 ]
