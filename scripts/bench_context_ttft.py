"""Time to first token of an agent's next turn on a context holding ~1,400 tokens, with the
context's KV in each tier (the pool, host memory, disk), against a cold prefill of the same
prompt (fresh random words, so no cache helps it). Against a running aios server:

    python3 scripts/bench_context_ttft.py http://127.0.0.1:8000 [REPEATS] [SNAPSHOT_DIR]

The disk tier needs the server's `[kv] disk_dir`. Without SNAPSHOT_DIR the snapshot is read back
from the page cache (it was just written); give the model's subdirectory of disk_dir as
SNAPSHOT_DIR (e.g. /tmp/snaps/smollm2) and each file is dropped from the page cache before the
turn (posix_fadvise DONTNEED), so the figure includes reading it from the device.
"""

import json
import os
import random
import sys
import time
import urllib.error
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
    snap_dir = sys.argv[3] if len(sys.argv) > 3 else None
    rng = random.Random()
    cold = []
    tiers = {"pool": [], "host": [], "disk": []}
    skipped = set()
    for _ in range(repeats):
        history = words(rng, 1400)  # about 1,400 tokens (one token a word)
        # Cold: a prompt no cache has seen.
        cold.append(ttft(url, {"prompt": history + " Next:", "max_tokens": 1}, "bench-cold"))
        for tier, times in tiers.items():
            if tier in skipped:
                continue
            # The same kind of history held by a context, moved to the tier, then the next turn.
            history = words(rng, 1400)
            ctx = call(url, "/v1/contexts", {})
            call(url, "/v1/completions",
                 {"prompt": history, "max_tokens": 1, "context_id": ctx["id"]})
            if tier != "pool":
                try:
                    info = call(url, "/v1/contexts/%s/snapshot" % ctx["id"], {"tier": tier})
                except urllib.error.HTTPError as e:
                    # A server without `[kv] disk_dir` has no disk tier: measure the others.
                    print("%s tier skipped: %s" % (tier, e.read().decode()), file=sys.stderr)
                    skipped.add(tier)
                    call(url, "/v1/contexts/" + ctx["id"], method="DELETE")
                    continue
                assert info["tier"] == tier, info
            if tier == "disk" and snap_dir:
                fd = os.open(os.path.join(snap_dir, ctx["id"] + ".kvctx"), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            times.append(ttft(url, {"prompt": history + " Next:", "max_tokens": 1,
                                    "context_id": ctx["id"]}, "bench-agent"))
            call(url, "/v1/contexts/" + ctx["id"], method="DELETE")
    med = lambda xs: sorted(xs)[len(xs) // 2]
    c = med(cold)
    out = {"cold_ttft_ms": round(c * 1e3, 1)}
    for tier, times in tiers.items():
        if not times:
            continue
        out[tier + "_ttft_ms"] = round(med(times) * 1e3, 1)
        out[tier + "_ratio"] = round(c / med(times), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
