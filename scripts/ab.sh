#!/usr/bin/env bash
# Compare builds of examples/decode_loop on a noisy machine: run each binary in turn, ROUNDS
# times, with the same environment, and print each one's median and best milliseconds a step.
# Copy the example's binary aside before and after a change, then:
#
#   cargo build --release --example decode_loop && cp target/release/examples/decode_loop /tmp/new
#   scripts/ab.sh 8 "CTX=0 STEP=512 N=4" /tmp/old /tmp/new
set -euo pipefail
rounds=$1
env_vars=$2
shift 2
out=$(mktemp)
for _ in $(seq "$rounds"); do
    for bin in "$@"; do
        # shellcheck disable=SC2086
        ms=$(env $env_vars "$bin" | grep -o '([0-9.]* ms' | tr -d '( ms')
        echo "$bin $ms" >>"$out"
    done
done
python3 - "$out" <<'PY'
import collections, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, ms = line.split()
    runs[name].append(float(ms))
for name, ms in runs.items():
    ms.sort()
    print("%s: median %.2f ms, best %.2f ms, %d runs" % (name, ms[len(ms) // 2], ms[0], len(ms)))
PY
rm -f "$out"
