"""The AIOS SDK (Cerebrum, `aios-agent-sdk` from PyPI) against a real aios server, as an agent
written for the AIOS kernel would use it: the SDK's own client sends its own request shape to
`/query`, and the default model answers.

Starts `target/debug/aios serve --port 0` (built by `cargo test`).
"""
import sys

from aios_server import start, stop
from cerebrum.client import Cerebrum
from cerebrum.llm.communication import LLMQuery

failed = 0


def check(name, cond, detail=""):
    global failed
    print(f"{'ok  ' if cond else 'FAIL'} {name} {'' if cond else detail}")
    failed += 0 if cond else 1


proc, base = start()
try:
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
    stop(proc)

print(f"cerebrum-sdk: {'all passed' if not failed else f'{failed} failed'}")
sys.exit(1 if failed else 0)
