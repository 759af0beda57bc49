#!/usr/bin/env bash
# The NEON kernels on an x86-64 machine: cross-compile the kernel, attention, KV and model tests
# for aarch64 Linux and run them under qemu's user-mode emulation (its default CPU has NEON and
# the dot-product extension), once on each NEON kernel set. Emulation checks results, not speed.
#
# Installs what it needs if missing: Rust's aarch64 standard library (rustup), and Debian's
# cross gcc (the linker, and the C compiler for bundled SQLite) and qemu-user. On an aarch64
# machine, `cargo test` runs the same tests natively.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
target=aarch64-unknown-linux-gnu
# Exit status 3: the tools could not be installed here (no test ran); any other failure is a
# build or test failure.
cannot() {
    echo "test-aarch64: cannot run here: $1" >&2
    exit 3
}
rustup target list --installed | grep -qx "$target" || timeout 600 rustup target add "$target" \
    || cannot "rustup could not install the $target standard library"
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
    timeout 600 apt-get install -y -qq $pkgs >/dev/null 2>&1 \
        || { timeout 600 apt-get update -qq && timeout 600 apt-get install -y -qq $pkgs >/dev/null; } \
        || cannot "apt-get could not install $pkgs"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
run() {
    cargo test --release --target "$target" "$@"
}
# Every kernel path the emulated CPU has (portable, neon, neondot) against the reference.
run --test kernels
for kernels in neondot neon; do
    echo "== AIOS_CPU_KERNELS=$kernels"
    # Attention against its reference and the KV pool, then the default model: llama.cpp's
    # greedy continuations (f16 and 8-bit KV) and batch invariance.
    AIOS_CPU_KERNELS=$kernels run --lib -- ops:: kv::
    AIOS_CPU_KERNELS=$kernels run --test model
done
