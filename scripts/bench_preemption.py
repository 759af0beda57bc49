"""What does preempting by swapping cost the agents? Three agents stream at once, each with a
~1,400-token prompt, against a server whose KV pool holds only two of them, under round-robin:
every turn change swaps one agent's KV out to host memory and another's back in. Prints the
served tokens per second over all streams, the gaps between tokens (median, p99, largest) of
every stream and those of streams while they run (under 100 ms: a paused stream's gaps are its
wait for other agents' turns), and the swap-outs the server counted (/health).

    python3 scripts/bench_preemption.py http://127.0.0.1:8000 [TOKENS]

against a server started with, for the default model (f16 KV: 360 KB per 16-token block):

    [kv]
    bytes = 75000000
    [engine]
    policy = "round_robin"
"""

import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_context_ttft import words  # noqa: E402


def stream(url, model, agent, prompt, tokens, out):
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Agent-Id": agent},
    )
    times = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                times.append(time.perf_counter())
    out[agent] = times


def swap_outs(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        h = json.load(r)
    return sum(kv.get("swap_outs", 0) for kv in h.get("kv", {}).values())


def main():
    url = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rng = random.Random(3)
    prompts = [words(rng, 1400) for _ in range(3)]
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
    before = swap_outs(url)
    out = {}
    start = time.perf_counter()
    threads = [
        threading.Thread(target=stream, args=(url, model, f"agent-{i}", p, tokens, out))
        for i, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Decode only: from the last stream's first token to the last token anywhere.
    first = max(ts[0] for ts in out.values())
    end = max(ts[-1] for ts in out.values())
    served = sum(sum(1 for t in ts if t > first) for ts in out.values())
    gaps = sorted(
        (b - a) * 1e3 for ts in out.values() for a, b in zip(ts, ts[1:]) if a >= first
    )
    # Gaps of a stream while it runs (a paused stream waits out other agents' turns: those gaps
    # are the policy's, hundreds of milliseconds), where a swap on the engine thread would show.
    running = [g for g in gaps if g < 100]

    def p99(g):
        return g[min(len(g) - 1, int(len(g) * 0.99))]

    print(
        f"{served / (end - first):.1f} tokens/s over all streams, "
        f"gaps median {statistics.median(gaps):.1f} ms, p99 {p99(gaps):.1f}, "
        f"largest {gaps[-1]:.1f}; while running: p99 {p99(running):.1f}, "
        f"largest {running[-1]:.1f}; "
        f"swap-outs {swap_outs(url) - before}; {time.perf_counter() - start:.1f} s in all"
    )


if __name__ == "__main__":
    main()
