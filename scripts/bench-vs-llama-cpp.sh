#!/usr/bin/env bash
# Side by side on this machine: llama.cpp's CPU kernels (built from source by the PyPI package
# llama-cpp-python, a few minutes on 2 cores, into .venv-bench/) and ours, same GGUF, same
# thread count, same measurements; prints both and the ratios. A benchmark-time peer only.
#
#   scripts/bench-vs-llama-cpp.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
scripts/fetch-model.sh >/dev/null
if ! .venv-bench/bin/python -c "import llama_cpp" 2>/dev/null; then
    command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
    python3 -m venv .venv-bench
    # Native build for this CPU, like our target-cpu build. On a CPU that reports AMX, a native
    # build runs llama.cpp's AMX tiles, which a virtual machine may not enable (SIGILL at the
    # first matmul): there, the same AVX-512 and VNNI instructions without AMX.
    flags="-DGGML_NATIVE=ON"
    if grep -qw amx_tile /proc/cpuinfo; then
        flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        for f in avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
            grep -qw "${f%%:*}" /proc/cpuinfo && flags="$flags -DGGML_${f##*:}=ON"
        done
    fi
    CMAKE_ARGS="$flags" .venv-bench/bin/pip install -q llama-cpp-python
fi
theirs=$(.venv-bench/bin/python scripts/bench_llama_cpp.py "$model" "$threads")
ours=$(AIOS_BENCH_THREADS="$threads" cargo bench -q --bench model 2>/dev/null | grep '^{')
python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'tokens/s':<24}{'aios':>9}{'llama.cpp':>11}{'ratio':>8}")
for key, name in [("pp512", "prefill pp512"), ("pp2000", "prefill 2000"),
                  ("tg128", "decode tg128"), ("tg_at2000", "decode at 2000 ctx")]:
    print(f"{name:<24}{ours[key]:>9.1f}{theirs[key]:>11.1f}{ours[key] / theirs[key]:>7.2f}x")
PY
