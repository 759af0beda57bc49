"""Does writing contexts to disk stall the other agents? One agent streams 300 tokens while four
other agents' contexts (~1,400 tokens each, parked in host memory beforehand) are snapshotted
to disk one after another; prints the streaming agent's median and largest gap between tokens,
and the largest while a snapshot was being written. Against a running aios with `[kv] disk_dir`:

    python3 scripts/bench_snapshot_stall.py http://127.0.0.1:8000 [disk|turn]

With `turn`, the four agents take their next turn instead (one token each, one after another):
their KV comes back from host memory into the pool while the streaming agent runs, and the
gaps show what bringing it back costs the other agents (no disk tier needed).
"""

import json
import os
import random
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_context_ttft import call, words  # noqa: E402


def main():
    url = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    mode = sys.argv[2] if len(sys.argv) > 2 else "disk"
    rng = random.Random(1)
    ctxs = []
    for _ in range(4):
        ctx = call(url, "/v1/contexts", {})
        history = words(rng, 1400)
        call(url, "/v1/completions",
             {"prompt": history, "max_tokens": 1, "context_id": ctx["id"]})
        call(url, "/v1/contexts/%s/snapshot" % ctx["id"], {"tier": "host"})
        ctxs.append((ctx["id"], history))
    stamps = []

    def stream():
        body = {"prompt": "Tell me a long story about the sea.", "max_tokens": 300,
                "ignore_eos": True, "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    spans = []
    for c, history in ctxs:
        a = time.perf_counter()
        if mode == "turn":
            call(url, "/v1/completions", {"prompt": history + " Next:", "max_tokens": 1,
                                          "context_id": c})
        else:
            call(url, "/v1/contexts/%s/snapshot" % c, {"tier": "disk"})
        spans.append((a, time.perf_counter()))
        time.sleep(0.2)
    t.join()
    for c, _ in ctxs:
        call(url, "/v1/contexts/" + c, method="DELETE")
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    during = [b - a for a, b in zip(stamps, stamps[1:])
              if any(s <= b and a <= e for s, e in spans)]
    print(json.dumps({
        "median_gap_ms": round(gaps[len(gaps) // 2] * 1e3, 1),
        "max_gap_ms": round(gaps[-1] * 1e3, 1),
        "max_gap_during_calls_ms": round(max(during) * 1e3, 1) if during else None,
        "call_ms": [round((e - s) * 1e3) for s, e in spans],
    }))


if __name__ == "__main__":
    main()
