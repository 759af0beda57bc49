#!/usr/bin/env bash
# Decode speed with a JSON schema against unconstrained decoding, same prompts, same server.
# Starts a release server, then alternates `aios bench` runs without and with
# `--response-format benches/data/records-schema.json` (a schema that never ends early: at
# least 100 records, so every request decodes its full --output-tokens), ROUNDS times each,
# and prints the median output tokens/s of each and their ratio, per concurrency level.
#   scripts/bench-structured.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PORT=${PORT:-8397}
scripts/fetch-model.sh >/dev/null
cargo build --release --bin aios 2>/dev/null
BIN=${CARGO_TARGET_DIR:-target}/release/aios
out=$(mktemp -d)
# No prefix cache: both modes send the same prompts, and the second must not find them cached.
printf '[kv]\nprefix_cache = false\n' >"$out/aios.toml"
"$BIN" serve --config "$out/aios.toml" --port "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
for r in $(seq "$ROUNDS"); do
  for mode in plain schema; do
    extra=()
    [ "$mode" = schema ] && extra=(--response-format benches/data/records-schema.json)
    "$BIN" bench --url "http://127.0.0.1:$PORT" --concurrency 1,8 --requests 16 \
      --prompt-words 60 --output-tokens 128 --seed "$r" "${extra[@]}" \
      --json "$out/$mode-$r.json" >/dev/null
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(mode):
    return [json.load(open(f"{out}/{mode}-{r}.json")) for r in range(1, rounds + 1)]
plain, schema = runs("plain"), runs("schema")
print(f"{'conc':>4} {'plain tok/s':>12} {'schema tok/s':>13} {'ratio':>6} {'plain ITL ms':>13} {'schema ITL ms':>14}")
for i, level in enumerate(plain[0]):
    med = lambda rs, k: statistics.median(r[i][k] for r in rs)
    itl = lambda rs: statistics.median(r[i]["itl_ms"]["mean"] for r in rs)
    p, s = med(plain, "output_tokens_per_s"), med(schema, "output_tokens_per_s")
    print(f"{level['concurrency']:>4} {p:>12.1f} {s:>13.1f} {s / p:>6.2f} {itl(plain):>13.1f} {itl(schema):>14.1f}")
PY
