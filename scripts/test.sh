#!/usr/bin/env bash
# The whole test suite: fetch the default model if missing, then the Rust tests (unit and
# integration, against the real model and a real server), then the official `openai` Python
# client and the AIOS SDK (Cerebrum) against a running server, two replicas as a router sees
# them (metrics, KV events over ZeroMQ, render, deploy/ manifests), then the soak (1,000 requests
# from 16 clients, a fifth of them hanging up mid-stream, a quarter of them invalid).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test
python3 tests/python/run_openai_client.py
python3 tests/python/run_cerebrum_sdk.py
python3 tests/python/run_scale_out.py target/debug/aios
python3 scripts/soak.py --bin target/debug/aios --requests 1000 --clients 16
