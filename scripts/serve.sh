#!/usr/bin/env bash
# Fetch the default model if missing, build aios (release), and serve it on localhost.
# Extra arguments go to `aios serve` (e.g. --port 8080, --model PATH, --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo build --release --bin aios
exec "${CARGO_TARGET_DIR:-target}/release/aios" serve "$@"
