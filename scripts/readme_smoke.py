#!/usr/bin/env python3
"""Runs README.md's first session as a newcomer would, and checks every answer.

Reads the commands out of README.md, so that a change to the README changes what is tested:
- the first `cargo run` line of the README's first `sh` block (the service on its SQLite
  default), started with PAYMENT_SERVICE_ADDR=127.0.0.1:0 and without DATABASE_URL;
- every `curl` line of the "A first session" section, against the address the service printed,
  each checked against the status in its trailing comment (`# 201`, `# 201 replayed`, `# 422`);
- the storm line of that section, made small with STORM_* variables; it must exit 0.

The service is stopped by its pid (SIGTERM, then SIGKILL), whatever happens. Every wait is
bounded. Exits non-zero on the first mismatch.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 600  # a cold `cargo run` compiles the service first
CURL_TIMEOUT_S = 30
STORM_TIMEOUT_S = 300


def fail(message):
    print(f"readme smoke: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def sh_blocks(text):
    """The ```sh blocks of `text`, each as a list of logical lines (continuations joined)."""
    blocks = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        lines, current = [], ""
        for raw in block.splitlines():
            if raw.rstrip().endswith("\\"):
                current += raw.rstrip()[:-1] + " "
                continue
            current += raw
            if current.strip():
                lines.append(current.strip())
            current = ""
        blocks.append(lines)
    return blocks


def split_comment(line):
    """`command  # comment` -> (command, comment). Quotes in these lines never hold a `#`."""
    command, _, comment = line.partition("  #")
    return command.strip(), comment.strip()


def section(text, heading):
    start = text.find(heading)
    if start < 0:
        fail(f"README.md has no {heading!r} section")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def main():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first_block = sh_blocks(readme)[0]
    serve = next((l for l in first_block if l.startswith("cargo run")), None)
    if serve is None:
        fail("the README's first sh block has no `cargo run` line")
    serve, _ = split_comment(serve)

    session = section(readme, "### A first session")
    blocks = sh_blocks(session)
    if len(blocks) < 3:
        fail("'A first session' needs three sh blocks: serve, curl, storm")
    if split_comment(blocks[0][0])[0] != serve:
        fail(f"the session starts the service with {blocks[0][0]!r}, not the first command {serve!r}")
    curls = [split_comment(l) for l in blocks[1] if l.startswith("curl")]
    storm = split_comment(blocks[2][0])[0]
    if not curls:
        fail("'A first session' shows no curl line")

    env = dict(os.environ)
    env.pop("DATABASE_URL", None)  # a newcomer has none: the SQLite default
    env["PAYMENT_SERVICE_ADDR"] = "127.0.0.1:0"
    print(f"readme smoke: {serve}", flush=True)
    service = subprocess.Popen(
        ["bash", "-c", f"exec {serve}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        addr = wait_for_listening(service)
        print(f"readme smoke: the service listens on {addr}", flush=True)
        for command, expected in curls:
            check_curl(command.replace("localhost:3000", addr), expected)
        storm_env = dict(env)
        storm_env.update(
            STORM_URL=f"http://{addr}",
            STORM_PAYMENTS="20",
            STORM_DUPLICATES="4",
            STORM_CONCURRENCY="8",
        )
        print(f"readme smoke: {storm} (20 payments x 4)", flush=True)
        try:
            done = subprocess.run(
                ["bash", "-c", storm],
                cwd=ROOT,
                env=storm_env,
                timeout=STORM_TIMEOUT_S,
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired:
            fail(f"the storm did not finish in {STORM_TIMEOUT_S} s")
        print(done.stdout, flush=True)
        if done.returncode != 0:
            fail(f"the storm exited {done.returncode}: {done.stderr[-2000:]}")
    finally:
        stop(service)
    print("readme smoke: OK")


def wait_for_listening(service):
    found = {}

    def read():
        for line in service.stdout:
            match = re.search(r"listening on http://(\S+)", line)
            if match:
                found["addr"] = match.group(1)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if "addr" not in found:
        fail(f"no `listening on` within {START_TIMEOUT_S} s (exit code {service.poll()})")
    # Keep draining stdout so that the service never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in service.stdout], daemon=True).start()
    return found["addr"]


def check_curl(command, expected):
    want = re.match(r"(\d{3})\b\s*(.*)", expected)
    if not want:
        fail(f"{command!r} has no expected status in its comment")
    status, extra = int(want.group(1)), want.group(2)
    try:
        done = subprocess.run(
            ["bash", "-c", f"{command} --max-time {CURL_TIMEOUT_S}"],
            capture_output=True,
            text=True,
            timeout=CURL_TIMEOUT_S + 5,
        )
    except subprocess.TimeoutExpired:
        fail(f"{command!r} did not answer in {CURL_TIMEOUT_S} s")
    head = done.stdout.split("\r\n\r\n", 1)[0]
    got = re.match(r"HTTP/\S+ (\d{3})", head)
    if done.returncode != 0 or not got:
        fail(f"{command!r} failed (curl exit {done.returncode}): {done.stderr}")
    if int(got.group(1)) != status:
        fail(f"{command!r} answered {got.group(1)}, the README says {status}:\n{done.stdout}")
    replayed = re.search(r"^idempotent-replayed:\s*true", head, flags=re.I | re.M)
    if "replayed" in extra and not replayed:
        fail(f"{command!r} was not a replay:\n{head}")
    print(f"readme smoke: {status}{' replayed' if replayed else ''} <- {command[:90]}", flush=True)


def stop(service):
    if service.poll() is not None:
        return
    try:
        os.killpg(service.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while service.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if service.poll() is None:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait(5)


if __name__ == "__main__":
    main()
