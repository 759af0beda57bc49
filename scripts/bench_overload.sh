#!/usr/bin/env bash
# Overload: 32 concurrent agents against one local aios, served local-only, then with a second
# aios as its OpenAI-compatible fallback ("the cloud"). Prints p99 TTFT, completed requests/s
# and who served what for both.
#
#   scripts/bench_overload.sh [REQUESTS] [MAX_QUEUE_MS]
#
# The cloud must bring capacity of its own, as a real provider does: each server is pinned to
# one core (taskset) and runs one compute thread, so local-only is one core serving everything
# and local + fallback is one core each. aios bench itself shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-128}"
max_queue_ms="${2:-1500}"
scripts/fetch-model.sh >/dev/null
cargo build --release --bin aios -q
bin="$PWD/target/release/aios"
model="$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf"
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# serve NAME CORE PORT EXTRA_SECTIONS EXTRA_MODEL_LINES
serve() {
    local name=$1 core=$2 port=$3
    mkdir -p "$dir/$name"
    cat >"$dir/$name/config.toml" <<EOF
$4
[memory]
path = "$dir/$name/memory.sqlite"

[[models]]
name = "smollm2"
path = "$model"
$5
EOF
    taskset -c "$core" "$bin" serve --config "$dir/$name/config.toml" --port "$port" \
        --threads 1 >"$dir/$name/log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$port/health" | grep -q '"ready"' && return 0
        sleep 0.5
    done
    echo "server $name did not become ready:" >&2
    tail -20 "$dir/$name/log" >&2
    exit 1
}

# run LABEL PORT: the load, then the backends that served it (from /metrics).
run() {
    "$bin" bench --url "http://127.0.0.1:$2" --concurrency 32 --requests "$requests" \
        --prompt-words 60 --output-tokens 32 --seed 11 --json "$dir/$1.json" >"$dir/$1.txt"
    curl -s "http://127.0.0.1:$2/metrics" |
        grep -E '^aios_http_requests_total\{.*route="/v1/completions"' >"$dir/$1.metrics" || true
}

serve local-only 0 18401 "" ""
run local-only 18401
kill "${pids[0]}"
wait "${pids[0]}" 2>/dev/null || true
pids=()

serve cloud 1 18402 "" ""
serve local 0 18401 "[[providers]]
name = \"cloud\"
base_url = \"http://127.0.0.1:18402/v1\"
max_concurrency = 64
timeout_secs = 300
" "fallbacks = [\"cloud\"]
max_queue_ms = $max_queue_ms"
run with-fallback 18401

python3 - "$dir" "$requests" "$max_queue_ms" <<'PY'
import json, re, sys
d, requests, mq = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"32 concurrent agents, {requests} streamed completions (60-word prompts, 32 tokens out), "
      f"max_queue_ms = {mq}")
print(f"{'setup':<26}{'done':>6}{'failed':>8}{'req/s':>8}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
      f"{'out tok/s':>11}  served by")
for label, name in [("local-only", "local only (1 core)"),
                    ("with-fallback", "local + fallback (1+1)")]:
    rep = json.load(open(f"{d}/{label}.json"))
    rep = rep[0] if isinstance(rep, list) else rep
    by = {}
    for line in open(f"{d}/{label}.metrics"):
        b = re.search(r'backend="([^"]*)"', line)
        by[b.group(1) if b else "?"] = by.get(b.group(1) if b else "?", 0) + int(float(line.split()[-1]))
    served = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
    print(f"{name:<26}{rep.get('completed', 0):>6}{rep.get('failed', 0):>8}"
          f"{rep['requests_per_s']:>8.2f}{rep['ttft_ms']['p50']:>13.0f}{rep['ttft_ms']['p99']:>13.0f}"
          f"{rep['output_tokens_per_s']:>11.1f}  {served}")
PY
