#!/usr/bin/env python3
"""Soak test: many agents at once, some hanging up mid-stream, many sending garbage.

Starts `aios serve` (the binary given) with the default model, then sends REQUESTS requests
from CLIENTS concurrent clients: valid chat and completion requests (streamed or not), streams
the client drops after the first chunk, and invalid bodies of many kinds. It checks:

  * no response is a 5xx;
  * every invalid body gets a 4xx with an OpenAI-style JSON error;
  * every valid request gets a 200 with a well-formed answer;
  * at the end the KV pool has no block in use and nothing is running;
  * resident memory after the run is flat against a baseline taken after a warm-up;
  * the server still answers, then exits 0 on SIGTERM.

Usage: scripts/soak.py [--bin target/debug/aios] [--requests 1000] [--clients 16]
Exit status 0 when every check holds; the figures are printed either way.
"""

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("agent kernel memory cache token river mountain green quick blue seven "
         "planet story answer question light window paper").split()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, binary, workdir):
        cfg = os.path.join(workdir, "soak.toml")
        model = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
        with open(cfg, "w") as f:
            f.write(
                "[server]\nport = 0\n\n"
                # The KV pool is a fixed reservation: commit all of it at start, so that what
                # grows afterwards is the heap, not the prefix cache filling the pool.
                "[kv]\nbytes = 268435456\nprefault_bytes = 268435456\n\n"
                "[engine]\nmax_queued = 256\n\n"
                "[embeddings]\npath = \"\"\n\n[memory]\npath = \"\"\n\n"
                f"[[models]]\nname = \"smollm2\"\npath = {json.dumps(model)}\n"
            )
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", cfg, "--threads", "2"],
            stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "soak-server.log"), "w"),
            text=True)
        line = self.proc.stdout.readline()
        if "listening on http://" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        hostport = line.strip().rsplit("http://", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        deadline = time.time() + 120
        while True:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("server never became healthy")
            time.sleep(0.2)

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=300)

    def get(self, path):
        c = self.conn()
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def post(self, path, body, headers=None):
        c = self.conn()
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request("POST", path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def prompt(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))


def valid_body(rng, stream):
    temp = rng.choice([0, 0.7, 1.0])
    if rng.random() < 0.5:
        body = {"messages": [{"role": "user", "content": prompt(rng)}],
                "max_tokens": rng.randint(1, 8), "temperature": temp}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": prompt(rng), "max_tokens": rng.randint(1, 8), "temperature": temp}
        path = "/v1/completions"
    if stream:
        body["stream"] = True
        body["max_tokens"] = rng.randint(16, 48)
    return path, json.dumps(body).encode()


def invalid_body(rng):
    """A (path, body bytes) the server must refuse with a 4xx and a JSON error."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    cases = [
        (chat, b"{not json"),
        (chat, b""),
        (chat, b"[1, 2, 3]"),
        (chat, json.dumps({"messages": "hello"}).encode()),
        (chat, json.dumps({"messages": []}).encode()),
        (chat, json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode()),
        (chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode()),
        (chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode()),
        (chat, json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode()),
        (comp, b'{"prompt": "\xff\xfe broken utf-8", "max_tokens": 2}'),
        (comp, json.dumps({"prompt": "hi", "n": 0}).encode()),
        (comp, json.dumps({"prompt": "hi", "max_tokens": 1, "logprobs": 99}).encode()),
        (comp, json.dumps({"prompt": "word " * 9000, "max_tokens": 4}).encode()),
        (comp, json.dumps({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}}).encode()),
        ("/v1/no-such-route", b"{}"),
    ]
    return rng.choice(cases)


def check_error(status, data):
    if not 400 <= status < 500:
        return f"expected a 4xx, got {status}"
    try:
        msg = json.loads(data)["error"]["message"]
    except Exception:
        return f"{status} without a JSON error body: {data[:120]!r}"
    return None if msg else "empty error message"


def run_one(server, i, seed, stats, lock):
    rng = random.Random(seed * 1_000_003 + i)
    kind = rng.random()
    problem = None
    try:
        if kind < 0.25:
            path, body = invalid_body(rng)
            status, data = server.post(path, body)
            problem = check_error(status, data)
            key = "invalid"
        elif kind < 0.45:
            # A stream the client drops after its first chunk.
            path, body = valid_body(rng, True)
            c = server.conn()
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                problem = f"stream got {r.status}"
            else:
                r.fp.readline()
            c.sock.shutdown(2) if c.sock else None
            c.close()
            key = "dropped"
        elif kind < 0.55:
            path, body = valid_body(rng, True)
            status, data = server.post(path, body)
            text = data.decode()
            if status != 200 or not text.rstrip().endswith("data: [DONE]"):
                problem = f"stream {status}: {text[-200:]!r}"
            key = "streamed"
        else:
            path, body = valid_body(rng, False)
            status, data = server.post(path, body, {"X-Agent-Id": f"agent-{i % 7}"})
            if status != 200:
                problem = f"valid request got {status}: {data[:200]!r}"
            else:
                v = json.loads(data)
                if not v.get("choices") or v["usage"]["completion_tokens"] < 1:
                    problem = f"malformed answer {data[:200]!r}"
            key = "answered"
    except Exception as e:  # a reset or timeout is a failure too
        problem = f"{type(e).__name__}: {e}"
        key = "error"
    with lock:
        stats[key] = stats.get(key, 0) + 1
        if problem:
            stats.setdefault("problems", []).append(f"#{i} {key}: {problem}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "aios"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", default="/tmp")
    a = ap.parse_args()

    server = Server(a.bin, a.workdir)
    pid = server.proc.pid
    stats, lock = {}, threading.Lock()
    warm = max(a.requests // 5, 1)
    t0 = time.time()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(lambda i: run_one(server, i, a.seed, stats, lock), range(warm)))
    base = rss_kib(pid)
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(lambda i: run_one(server, i, a.seed, stats, lock), range(warm, a.requests)))
    elapsed = time.time() - t0

    # Dropped streams end on the engine's next step; give it a moment.
    deadline = time.time() + 30
    while True:
        _, h = server.get("/health")
        kv = json.loads(h)["kv"]["smollm2"]
        if kv["blocks_used"] == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    _, m = server.get("/metrics")
    running = [l for l in m.decode().splitlines() if l.startswith("vllm:num_requests_running")]
    end = rss_kib(pid)
    status, _ = server.post("/v1/completions", b'{"prompt": "1, 2, 3,", "max_tokens": 2}')
    code = server.stop()

    problems = stats.pop("problems", [])
    growth = end - base
    print(f"soak: {a.requests} requests, {a.clients} clients, {elapsed:.1f}s "
          f"({a.requests / elapsed:.1f} req/s): {json.dumps(stats, sort_keys=True)}")
    print(f"soak: RSS {base / 1024:.1f} MiB after warm-up, {end / 1024:.1f} MiB at the end "
          f"({growth / 1024:+.1f} MiB); KV blocks in use at the end: {kv['blocks_used']}; {running}")
    if kv["blocks_used"] != 0:
        problems.append(f"{kv['blocks_used']} KV blocks still in use")
    if any(not l.endswith(" 0") for l in running):
        problems.append(f"sequences still running: {running}")
    # Flat: within 10% of the warm baseline, or 24 MiB (allocator noise on a small heap).
    if growth > max(base // 10, 24 * 1024):
        problems.append(f"resident memory grew by {growth / 1024:.1f} MiB")
    if status != 200:
        problems.append(f"server no longer answers after the soak: {status}")
    if code != 0:
        problems.append(f"server exited {code} on SIGTERM")
    for p in problems[:30]:
        print("FAIL", p)
    if problems:
        print(f"soak: {len(problems)} problems")
        sys.exit(1)
    print("soak: ok")


if __name__ == "__main__":
    main()
