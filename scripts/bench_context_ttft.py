"""Time to first token of an agent's next turn on a context holding ~1,400 tokens, against a
cold prefill of the same prompt (fresh random words, so no cache helps it). Against a running
aios server:

    python3 scripts/bench_context_ttft.py http://127.0.0.1:8000 [REPEATS]
"""

import json
import random
import sys
import time
import urllib.request


def call(url, path, body=None, agent="bench-agent", method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", agent)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def ttft(url, body, agent):
    """Seconds until the first streamed token."""
    body = dict(body, stream=True)
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", agent)
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"text"' in line:
                return time.perf_counter() - t
    raise RuntimeError("no token streamed")


def words(rng, n):
    vocab = "river stone cloud market engine garden letter window silver orange quiet number".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def main():
    url = sys.argv[1].rstrip("/")
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rng = random.Random()
    cold, warm = [], []
    for _ in range(repeats):
        history = words(rng, 1400)  # about 1,400 tokens (one token a word)
        # Cold: a prompt no cache has seen.
        cold.append(ttft(url, {"prompt": history + " Next:", "max_tokens": 1}, "bench-cold"))
        # Warm: the same history held by a context, then the next turn.
        history = words(rng, 1400)
        ctx = call(url, "/v1/contexts", {})
        call(url, "/v1/completions",
             {"prompt": history, "max_tokens": 1, "context_id": ctx["id"]})
        warm.append(ttft(url, {"prompt": history + " Next:", "max_tokens": 1,
                               "context_id": ctx["id"]}, "bench-agent"))
        call(url, "/v1/contexts/" + ctx["id"], method="DELETE")
    c, w = sorted(cold)[len(cold) // 2], sorted(warm)[len(warm) // 2]
    print(json.dumps({"cold_ttft_ms": c * 1e3, "context_ttft_ms": w * 1e3, "ratio": c / w}))


if __name__ == "__main__":
    main()
