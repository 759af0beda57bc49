#!/usr/bin/env bash
# Bounded fuzzing of what aios reads from outside: request bodies, GGUF files, KV snapshots.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s each, all targets)
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (installed here on first use). Seeds
# are written to fuzz/corpus/TARGET; a crash is saved under fuzz/artifacts/TARGET and makes
# the script exit non-zero (turn it into a test, then fix it).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(request gguf snapshot)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

mkdir -p fuzz/corpus/request fuzz/corpus/gguf fuzz/corpus/snapshot
seed() { printf '%s' "$2" > "fuzz/corpus/$1/$3"; }
seed request '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}' chat
seed request '{"prompt":"1, 2,","max_tokens":2,"temperature":0,"stop":["\n"],"n":2,"logprobs":2}' completion
seed request '{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"x"}]}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}}],"tool_choice":"required"}' tools
seed request '{"messages":[{"role":"user","content":"j"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"k":{"enum":["a","b"]}}}}},"stream":true,"stream_options":{"include_usage":true}}' schema
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$model" ]; then
    # The header: metadata (the vocabulary among it) and the tensor index.
    head -c 2000000 "$model" > fuzz/corpus/gguf/smollm2-head
    # And its first 4 KiB: mutations of a small input run a thousand times faster.
    head -c 4096 "$model" > fuzz/corpus/gguf/smollm2-4k
fi
python3 - <<'PY'
import json, struct
meta = {"fingerprint": "fuzz|layers=1|kv_heads=1|head_dim=2|block=16|f16", "id": "ctx-1", "owner": "a", "created": 0,
        "tokens": 3, "kv_len": 2, "data_values": 64}
h = json.dumps(meta).encode()
body = b"AIOSKV\0\x01" + struct.pack("<I", len(h)) + h
body += struct.pack("<3I", 1, 2, 3) + b"\0\x3c" * 64 + b"\0" * 8
open("fuzz/corpus/snapshot/small", "wb").write(body)
PY

status=0
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    if ! (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=4000000 -rss_limit_mb=4096 -print_final_stats=1); then
        echo "!! $t: a crash; the input is under fuzz/artifacts/$t"
        status=1
    fi
done
exit $status
