"""The AIOS SDK (Cerebrum, `aios-agent-sdk` from PyPI) against a real aios server, as an agent
written for the AIOS kernel would use it: the SDK's own client sends its own request shape to
`/query`, and the default model answers.

Starts `target/debug/aios serve --port 0` (built by `cargo test`).
"""
import os
import subprocess
import sys
import time
import urllib.request

from cerebrum.client import Cerebrum
from cerebrum.llm.communication import LLMQuery

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET if os.path.isabs(TARGET) else os.path.join(ROOT, TARGET), "debug", "aios")

failed = 0


def check(name, cond, detail=""):
    global failed
    print(f"{'ok  ' if cond else 'FAIL'} {name} {'' if cond else detail}")
    failed += 0 if cond else 1


proc = subprocess.Popen([BIN, "serve", "--port", "0", "--threads", "2"],
                        cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
try:
    line = proc.stdout.readline()
    assert "listening on" in line, f"unexpected first line: {line!r}"
    base = line.strip().split()[-1]
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline:
            raise SystemExit("server never became healthy")
        time.sleep(0.2)

    kernel = Cerebrum(base_url=base)
    r = kernel._query_llm("demo_author/demo_agent", LLMQuery(
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]))
    resp = r.get("response", {})
    check("the SDK's llm query gets an answer from the default model",
          resp.get("status_code") == 200 and isinstance(resp.get("response_message"), str)
          and resp["response_message"].strip() != "", r)
    check("with the kernel's timing fields", all(k in r for k in
          ("start_times", "end_times", "waiting_times", "turnaround_times")), r)
finally:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()

print(f"cerebrum-sdk: {'all passed' if not failed else f'{failed} failed'}")
sys.exit(1 if failed else 0)
