"""Embeddings per second at batch 1 and 32, and memory retrieval latency at N memories, against
a running aios server:

    python3 scripts/bench_embeddings.py http://127.0.0.1:8000 [N_MEMORIES]

Sentences are random 12-word strings. Memories go in through POST /v1/memories (one request
each, as an agent would add them) for a fresh agent; retrieval is POST /v1/memories/search
(embedding the query, then an exact scan of the agent's N memories), median of 20.
"""

import json
import random
import sys
import time
import urllib.request

WORDS = ("river stone cloud market engine garden letter window silver orange quiet number "
         "harbour violin forecast ticket village coffee planet mirror bridge candle").split()


def post(url, path, body, agent="bench-embed"):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", agent)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(12))


def main():
    url = sys.argv[1].rstrip("/")
    n_mem = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    rng = random.Random(1)
    out = {}
    for batch, requests in [(1, 200), (32, 20)]:
        post(url, "/v1/embeddings", {"input": [sentence(rng) for _ in range(batch)]})  # warm
        t = time.perf_counter()
        for _ in range(requests):
            post(url, "/v1/embeddings", {"input": [sentence(rng) for _ in range(batch)]})
        out[f"embeddings_per_s_batch{batch}"] = round(batch * requests / (time.perf_counter() - t), 1)
    agent = f"bench-mem-{random.randrange(1 << 30)}"
    t = time.perf_counter()
    for _ in range(n_mem):
        post(url, "/v1/memories", {"content": sentence(rng)}, agent)
    out["memories"] = n_mem
    out["memory_adds_per_s"] = round(n_mem / (time.perf_counter() - t), 1)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        hits = post(url, "/v1/memories/search", {"query": sentence(rng), "k": 5}, agent)
        times.append(time.perf_counter() - t)
        assert len(hits["data"]) == 5
    times.sort()
    out["search_ms_p50"] = round(times[len(times) // 2] * 1e3, 2)
    out["search_ms_max"] = round(times[-1] * 1e3, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
