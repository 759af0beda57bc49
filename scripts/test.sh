#!/usr/bin/env bash
# The whole test suite: fetch the default model if missing, then the Rust tests (unit and
# integration, against the real model and a real server), then the official `openai` Python
# client and the AIOS SDK (Cerebrum) against a running server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test
python3 tests/python/run_openai_client.py
python3 tests/python/run_cerebrum_sdk.py
