"""32 agents in multi-turn chats that share a ~500-token system prompt, all at once, against a
running server: served output tokens/s, mean and p99 time to first token, and prompt tokens
served from cache. Run it against aios with `[kv] prefix_cache = true` (the default) and
`false` to see what the prefix cache gives; with `--contexts` each agent also keeps its
conversation in a context of its own (`context_id`), so a turn reuses its own history too.

    python3 scripts/bench_shared_prompt.py http://127.0.0.1:8000 [AGENTS] [TURNS] [--contexts]
"""

import json
import random
import sys
import threading
import time
import urllib.request

WORDS = "river stone cloud market engine garden letter window silver orange quiet number".split()


def create_context(url, agent):
    req = urllib.request.Request(url + "/v1/contexts", data=b"{}")
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", agent)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["id"]


def chat(url, agent, messages, max_tokens, context=None):
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if context:
        body["context_id"] = context
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Agent-Id", agent)
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    with urllib.request.urlopen(req) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
    return first, "".join(text), usage


def main():
    use_contexts = "--contexts" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--contexts"]
    url = args[0].rstrip("/")
    agents = int(args[1]) if len(args) > 1 else 32
    turns = int(args[2]) if len(args) > 2 else 3
    rng = random.Random()
    system = "You are a helpful agent. Background: " + " ".join(
        rng.choice(WORDS) for _ in range(490))
    ttfts, outputs, cached, prompts = [], [0], [0], [0]
    lock = threading.Lock()

    def agent(i):
        messages = [{"role": "system", "content": system}]
        ctx = create_context(url, f"agent-{i}") if use_contexts else None
        for t in range(turns):
            messages.append({"role": "user", "content": f"Agent {i}, turn {t}: "
                             + " ".join(rng.choice(WORDS) for _ in range(20))})
            first, text, usage = chat(url, f"agent-{i}", messages, 32, ctx)
            messages.append({"role": "assistant", "content": text})
            with lock:
                ttfts.append(first)
                outputs[0] += usage["completion_tokens"]
                prompts[0] += usage["prompt_tokens"]
                cached[0] += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    print(json.dumps({
        "agents": agents, "turns": turns, "contexts": use_contexts, "wall_s": wall,
        "output_tok_s": outputs[0] / wall,
        "ttft_mean_ms": 1e3 * sum(ttfts) / len(ttfts),
        "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "prompt_tokens": prompts[0], "cached_tokens": cached[0],
    }))


if __name__ == "__main__":
    main()
