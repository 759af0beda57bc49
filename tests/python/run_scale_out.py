#!/usr/bin/env python3
"""Two aios replicas as a router sees them (issue: scale out behind the inference gateway).

Starts the replicas of deploy/plain (aios-a on 127.0.0.1, aios-b on 127.0.0.2, each with the real
default model, a small KV pool and two running sequences at most) and checks, as the llm-d
endpoint picker would use them:

  * /metrics parses as Prometheus text; the vLLM-named gauges have the protocol's types;
    vllm:cache_config_info is 1 with block_size and num_gpu_blocks; under saturation
    vllm:num_requests_waiting rises above 0 and vllm:kv_cache_usage_perc stays in [0, 1];
  * a ZeroMQ subscriber (pyzmq) gets three-frame messages `kv@<id>@<model>`, big-endian
    sequence numbers that strictly increase, msgpack batches whose BlockStored chain carries
    exactly the token ids /v1/completions/render gives for the prompt, and BlockRemoved for
    blocks evicted from the pool;
  * /v1/chat/completions/render gives the ids the engine ran (usage.prompt_tokens);
  * a context id one replica holds is a clear 404 on the other;
  * every manifest under deploy/ parses, and every vLLM metric they name is one aios exports.

Usage: tests/python/run_scale_out.py [path/to/aios]
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import msgpack
import yaml
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "aios")
# 64 blocks of 16 tokens (23,040 bytes a token for the default model).
POOL_BYTES = 64 * 16 * 23040


def call(url, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url, path, body, headers=None):
    status, data = call(url, path, body, headers)
    return status, json.loads(data)


def start(name, workdir):
    with open(os.path.join(ROOT, "deploy", "plain", f"aios-{name}.toml")) as f:
        cfg = f.read()
    cfg += (f"\n[kv]\nbytes = {POOL_BYTES}\nprefault_bytes = 0\n"
            "\n[engine]\nmax_running = 2\n"
            "\n[embeddings]\npath = \"\"\n\n[memory]\npath = \"\"\n")
    path = os.path.join(workdir, f"aios-{name}.toml")
    with open(path, "w") as f:
        f.write(cfg)
    p = subprocess.Popen([BIN, "serve", "--config", path, "--port", "0", "--threads", "1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = p.stdout.readline().strip().rsplit(" ", 1)[1]
    events = p.stdout.readline().strip().rsplit(" ", 1)[1]
    return p, url, events


def wait_healthy(url):
    deadline = time.time() + 120
    while call(url, "/health")[0] != 200:
        assert time.time() < deadline, f"{url} never became healthy"
        time.sleep(0.2)


def parse_metrics(text):
    """{name: [(labels dict, value)]} and {family: type}; asserts every line is well-formed."""
    types, samples = {}, {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        samples.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return types, samples


class Subscriber:
    """Collects every KV-event message of one replica on a thread."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.sock.connect(endpoint)
        self.messages = []
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            self.messages.append(frames)

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def main():
    workdir = tempfile.mkdtemp(prefix="aios-scale-")
    procs = []
    ctx = zmq.Context()
    try:
        pa, url_a, ev_a = start("a", workdir)
        pb, url_b, ev_b = start("b", workdir)
        procs = [pa, pb]
        assert url_a.startswith("http://127.0.0.1:") and url_b.startswith("http://127.0.0.2:"), (url_a, url_b)
        sub_a, sub_b = Subscriber(ctx, ev_a), Subscriber(ctx, ev_b)
        wait_healthy(url_a)
        wait_healthy(url_b)
        time.sleep(0.5)  # subscriptions reach the publishers

        # Metrics: types and meanings, on both replicas.
        for url in (url_a, url_b):
            types, s = parse_metrics(call(url, "/metrics")[1].decode())
            for name, kind in [("vllm:num_requests_waiting", "gauge"), ("vllm:num_requests_running", "gauge"),
                               ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:cache_config_info", "gauge")]:
                assert types.get(name) == kind, (name, types.get(name))
                assert s.get(name), f"{name} has no sample on {url}"
            (info, one), = s["vllm:cache_config_info"]
            assert one == 1 and info["block_size"] == "16" and int(info["num_gpu_blocks"]) == 64, info

        # Saturation: 8 long requests against 2 running slots; scrape every 50 ms meanwhile.
        results = []
        def long_request(i):
            results.append(post(url_a, "/v1/completions", {"prompt": f"Request {i}: once upon a time",
                                                             "max_tokens": 48, "ignore_eos": True})[0])
        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        waiting_seen, scrapes, scrape_time = 0.0, 0, 0.0
        while any(t.is_alive() for t in threads):
            t0 = time.time()
            _, s = parse_metrics(call(url_a, "/metrics")[1].decode())
            scrape_time += time.time() - t0
            scrapes += 1
            waiting_seen = max(waiting_seen, s["vllm:num_requests_waiting"][0][1])
            usage = s["vllm:kv_cache_usage_perc"][0][1]
            assert 0.0 <= usage <= 1.0, usage
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert results == [200] * 8, results
        assert waiting_seen > 0, "num_requests_waiting never rose above 0 under saturation"
        print(f"scale-out: {scrapes} scrapes under load, {1000 * scrape_time / max(scrapes, 1):.1f} ms each; "
              f"most waiting: {waiting_seen:.0f}")

        # KV events: the blocks a prompt leaves in the cache, token for token.
        prompt = "The quick brown fox jumps over the lazy dog. " * 6
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        status, rendered = post(url_a, "/v1/completions/render", body)
        assert status == 200, rendered
        ids = rendered["token_ids"]
        assert post(url_a, "/v1/completions", body)[0] == 200
        # Chat render gives exactly what the engine ran.
        chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2}
        status, crender = post(url_a, "/v1/chat/completions/render", chat)
        status2, answer = post(url_a, "/v1/chat/completions", chat)
        assert status == 200 and status2 == 200
        assert len(crender["token_ids"]) == answer["usage"]["prompt_tokens"], (crender, answer["usage"])

        # Evict: distinct prompts of about nine blocks each fill the 64-block pool several times.
        for i in range(12):
            p = f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(60))
            assert post(url_a, "/v1/completions", {"prompt": p, "max_tokens": 1})[0] == 200
        time.sleep(1.0)
        sub_a.close()
        sub_b.close()

        stored, removed, seqs = {}, set(), []
        for frames in sub_a.messages:
            assert len(frames) == 3, f"{len(frames)} frames"
            topic, seq, payload = frames
            assert re.fullmatch(rb"kv@aios-a@smollm2", topic), topic
            assert len(seq) == 8
            seqs.append(int.from_bytes(seq, "big"))
            ts, events, dp_rank = msgpack.unpackb(payload)
            assert isinstance(ts, float) and dp_rank == 0
            for e in events:
                if e[0] == "BlockStored":
                    _, hashes, parent, tokens, block_size, lora, medium = e
                    assert block_size == 16 and len(tokens) == 16 * len(hashes) and lora is None
                    assert medium == "CPU"
                    stored[hashes[0]] = (parent, tokens)
                elif e[0] == "BlockRemoved":
                    removed.update(e[1])
                else:
                    assert e == ["AllBlocksCleared"], e
        assert seqs and all(b > a for a, b in zip(seqs, seqs[1:])), "sequence numbers must strictly increase"
        # Follow the chain from the prompt's first block.
        chain, parent = [], None
        for k in range(len(ids) // 16):
            block = ids[16 * k:16 * (k + 1)]
            match = [h for h, (p, t) in stored.items() if p == parent and t == block]
            assert match, f"no BlockStored for block {k} of the rendered prompt"
            parent = match[0]
            chain.append(parent)
        assert len(chain) >= 3, len(chain)
        assert removed, "no BlockRemoved after filling the pool"
        assert removed <= set(stored), "a BlockRemoved names a block never stored"
        print(f"scale-out: {len(sub_a.messages)} KV-event messages, {len(stored)} blocks stored, "
              f"{len(removed)} removed; the prompt's {len(chain)} blocks match its render")
        assert not [m for m in sub_b.messages if b"BlockStored" in m[2]], "replica b cached nothing"

        # Affinity: a context lives on one replica; the other says so.
        status, ctx_info = post(url_a, "/v1/contexts", {}, {"X-Agent-Id": "pinned"})
        assert status == 200, ctx_info
        status, err = post(url_b, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                            "context_id": ctx_info["id"]}, {"X-Agent-Id": "pinned"})
        assert status == 404 and ctx_info["id"] in err["error"]["message"], (status, err)

        # Manifests parse; every vLLM metric they name is exported.
        _, s = parse_metrics(call(url_a, "/metrics")[1].decode())
        exported = set(s)
        files = glob.glob(os.path.join(ROOT, "deploy", "**", "*.yaml"), recursive=True)
        assert len(files) >= 5, files
        named = set()
        for f in files:
            with open(f) as fh:
                text = fh.read()
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            assert docs, f
            for d in docs:
                if "kind" in d:
                    assert "apiVersion" in d, f
                for cm in ([d] if d.get("kind") == "ConfigMap" else []):
                    for key, inner in cm.get("data", {}).items():
                        if key.endswith((".yaml", ".yml")):
                            yaml.safe_load(inner)
            named |= set(re.findall(r"vllm:[a-z_]+", text))
        missing = named - exported
        assert named and not missing, f"manifests name metrics aios does not export: {missing}"
        print(f"scale-out: {len(files)} manifests parse; they name {sorted(named)}, all exported")

        for p in procs:
            p.terminate()
            assert p.wait(timeout=60) == 0
        procs = []
        print("scale-out: ok")
    finally:
        for p in procs:
            p.kill()
        ctx.term()


if __name__ == "__main__":
    main()
