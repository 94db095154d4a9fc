"""After a schemathesis run: no double charge, by the database and by the service's own listing.

Every payment row must be named by exactly one completed key's stored 201 (a handler that ran
twice for one key would leave a payment that no stored response names), no key may be left in
progress, and GET /payments?customer=.. must answer exactly the payments of each customer.
Run by scripts/schemathesis.sh with SCHEMATHESIS_BASE, SCHEMATHESIS_TOKEN, SCHEMATHESIS_DB.
"""

import collections
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request

base = os.environ["SCHEMATHESIS_BASE"]
token = os.environ["SCHEMATHESIS_TOKEN"]
url = os.environ["SCHEMATHESIS_DB"]
tenant = hashlib.sha256(token.encode()).hexdigest()[:32]

PAYMENTS = "SELECT id, customer FROM payments WHERE tenant = '%s'" % tenant
# Payment ids in the stored 201s; the body is the JSON the handler answered.
STORED = "SELECT status, state, body FROM idempotency_records"

if url.startswith("sqlite:"):
    path = url[len("sqlite://"):].split("?")[0]
    db = sqlite3.connect(path)
    payments = db.execute(PAYMENTS).fetchall()
    records = [(s, st, bytes(b) if b is not None else None) for s, st, b in db.execute(STORED)]
else:
    def psql(query):
        # As one JSON value: fuzzed customers hold tabs and newlines.
        wrapped = "SELECT coalesce(json_agg(row_to_json(t)), '[]') FROM (%s) t" % query
        out = subprocess.run(
            ["psql", "-At", url.split("?")[0], "-c", wrapped],
            check=True, capture_output=True, text=True,
        ).stdout
        return json.loads(out)
    payments = [(r["id"], r["customer"]) for r in psql(PAYMENTS)]
    records = [
        (r["status"], r["state"], r["body"].encode() if r["body"] else None)
        for r in psql(
            "SELECT status, state, convert_from(body, 'UTF8') AS body FROM idempotency_records"
        )
    ]

findings = []
in_progress = sum(1 for _, state, _ in records if state == "in_progress")
if in_progress:
    findings.append(f"{in_progress} key(s) left in progress")
named = collections.Counter()
for status, state, body in records:
    if state == "completed" and status == 201 and body:
        named[json.loads(body)["id"]] += 1
rows = collections.Counter(pid for pid, _ in payments)
for pid, n in rows.items():
    if named[pid] != 1:
        findings.append(f"payment {pid}: {n} row(s), named by {named[pid]} stored 201(s)")
for pid in named:
    if pid not in rows:
        findings.append(f"stored 201 names {pid}, which has no payment row")

by_customer = collections.defaultdict(set)
for pid, customer in payments:
    by_customer[customer].add(pid)
for customer, ids in by_customer.items():
    request = urllib.request.Request(
        base + "/payments?" + urllib.parse.urlencode({"customer": customer}),
        headers={"Authorization": "Bearer " + token},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        listed = {p["id"] for p in json.load(response)["payments"]}
    # The listing returns at most 100 (store::LIST_LIMIT).
    if listed != ids and not (len(listed) == 100 and listed <= ids):
        findings.append(f"listing for a customer answers {len(listed)} payment(s), the table has {len(ids)}")

print(
    f"audit: {len(payments)} payment(s) of {len(by_customer)} customer(s), "
    f"{sum(named.values())} stored 201(s), {len(records)} key(s), {in_progress} in progress"
)
for finding in findings:
    print("audit finding:", finding)
sys.exit(1 if findings else 0)
