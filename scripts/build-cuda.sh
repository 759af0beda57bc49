#!/usr/bin/env bash
# Build aios with the `cuda` feature on any Linux x86-64 machine, GPU or not.
#
#  1. Installs NVIDIA's CUDA 13 toolkit wheels from PyPI (nvcc, headers, runtime, NVRTC, cuBLAS,
#     cuRAND) into a venv of their own (.venv-cuda/; they lay out a toolkit tree under
#     site-packages/nvidia/cu13). No system CUDA install, no GPU, no driver needed.
#  2. Makes a link-only directory (.venv-cuda/link-stubs/): unversioned libX.so names for the
#     toolkit's libraries and a stub libcuda.so (the real one comes with the NVIDIA driver, on GPU
#     machines only). The linker sees it through LIBRARY_PATH; it is never on a run-time library
#     path, so the built binary loads the driver's real libcuda.so.1.
#  3. cargo build --release --features cuda into target-cuda/ (apart from the CPU build's target/).
#
# A second run reuses the venv and the build (seconds). Environment overrides:
#   PYTHON            the Python that makes the venv (python3)
#   AIOS_CUDA_VENV    where the venv goes (.venv-cuda)
#   CUDA_ROOT         an existing CUDA 13 toolkit to use instead of the wheels (no venv then)
#   CUDA_COMPUTE_CAP  the GPU architecture the kernels are compiled for (90: Hopper, H100/H200)
#   CARGO_TARGET_DIR  where cargo builds (target-cuda)
#   AIOS_BUILD_NICE   the niceness cargo runs at (19: the build yields the CPU to others)
# The binary needs, where it runs: an NVIDIA driver for CUDA 13 (R580 or newer) and the toolkit's
# run-time libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc; from the same wheels
# or a CUDA 13 install) on LD_LIBRARY_PATH. scripts/gpu-check.sh finds them in .venv-cuda/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-python3}
VENV=${AIOS_CUDA_VENV:-.venv-cuda}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
NICE=${AIOS_BUILD_NICE:-19}

# CUDA 13.0 update 2, one consistent release (cudarc 0.19 supports CUDA up to 13.4).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

say() { echo "build-cuda: $*"; }
die() { echo "build-cuda: error: $*" >&2; exit 1; }
t0=$SECONDS

# --- 1. the toolkit -------------------------------------------------------------------------
if [ -n "${CUDA_ROOT:-}" ]; then
  say "using the CUDA toolkit at CUDA_ROOT=$CUDA_ROOT"
  STUBS=$ROOT/$CARGO_TARGET_DIR/link-stubs
  case $CARGO_TARGET_DIR in /*) STUBS=$CARGO_TARGET_DIR/link-stubs ;; esac
else
  stamp=$VENV/.aios-wheels
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${WHEELS[*]}" ]; then
    say "CUDA wheels already installed in $VENV"
  else
    command -v "$PY" >/dev/null || die "no $PY (set PYTHON to a Python 3 with venv and pip)"
    if [ ! -x "$VENV/bin/python" ]; then
      say "creating $VENV"
      "$PY" -m venv "$VENV" || die "could not create a venv with $PY (is the venv module installed?)"
    fi
    say "installing the CUDA 13 toolkit wheels into $VENV (about 1 GB to download) ..."
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
    echo "${WHEELS[*]}" >"$stamp"
  fi
  CUDA_ROOT=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
  [ -d "$CUDA_ROOT" ] || die "the wheels did not lay out $VENV/lib/python3*/site-packages/nvidia/cu13"
  STUBS=$VENV/link-stubs
fi
export CUDA_ROOT CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT
export PATH=$CUDA_ROOT/bin:$PATH
NVCC_BIN=$CUDA_ROOT/bin/nvcc
[ -x "$NVCC_BIN" ] || die "no nvcc at $NVCC_BIN"
nvcc_release=$("$NVCC_BIN" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ -n "$nvcc_release" ] || die "$NVCC_BIN --version did not run (output above)"
say "nvcc $nvcc_release at $NVCC_BIN; kernels for compute capability $CUDA_COMPUTE_CAP"

LIBDIR=
for d in "$CUDA_ROOT/lib64" "$CUDA_ROOT/lib"; do
  if compgen -G "$d/libcublas.so*" >/dev/null; then LIBDIR=$d; break; fi
done
[ -n "$LIBDIR" ] || die "no libcublas.so* under $CUDA_ROOT/lib64 or $CUDA_ROOT/lib"

# --- 2. link-only names and the libcuda stub --------------------------------------------------
mkdir -p "$STUBS"
for lib in cudart cublas cublasLt curand nvrtc; do
  if [ -e "$LIBDIR/lib$lib.so" ]; then continue; fi
  real=$(compgen -G "$LIBDIR/lib$lib.so.[0-9]*" | sort | head -n 1 || true)
  [ -n "$real" ] || die "no lib$lib.so.* in $LIBDIR"
  ln -sfn "$real" "$STUBS/lib$lib.so"
done
if [ ! -f "$STUBS/libcuda.so" ]; then
  shipped=$(compgen -G "$CUDA_ROOT/lib*/stubs/libcuda.so" | head -n 1 || true)
  if [ -n "$shipped" ]; then
    say "libcuda stub: the toolkit's $shipped"
    cp "$shipped" "$STUBS/libcuda.so"
  else
    # Every driver API name cuda.h mentions (cuInit, cuMemAlloc_v2, ...) as an empty function,
    # under the driver's soname, so the binary records a need for libcuda.so.1 and gets the real
    # library from the driver at run time. Never run: only the linker reads it.
    header=$CUDA_ROOT/include/cuda.h
    [ -f "$header" ] || die "no $header to take the driver API names from"
    say "libcuda stub: compiling one from the names in $header"
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*' "$header" | sort -u |
      sed 's/.*/void &(void) {}/' >"$STUBS/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so.tmp" "$STUBS/libcuda-stub.c"
    mv "$STUBS/libcuda.so.tmp" "$STUBS/libcuda.so"
  fi
fi
export LIBRARY_PATH=$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}

# --- 3. the build ---------------------------------------------------------------------------
say "cargo build --release --features cuda (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, nice $NICE); a first build takes about 20 minutes on 2 cores"
nice -n "$NICE" cargo build --release --features cuda --bin aios
BIN=$CARGO_TARGET_DIR/release/aios
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || die "cargo finished but $BIN is missing"
say "done in $((SECONDS - t0)) s"
say "binary: $BIN"
say "it runs where an NVIDIA driver (R580+, CUDA 13) is installed, with LD_LIBRARY_PATH=$LIBDIR"
say "check it on a GPU machine: scripts/gpu-check.sh $BIN"
