#!/usr/bin/env bash
# Compile check of moeba's CUDA backend on a machine with no GPU and no CUDA toolkit.
#
# - installs, once, nvcc 13.0 from PyPI into a venv cached at ${MOEBA_CACHE:-$HOME/.cache/moeba}/nvcc-13.0
#   (13.0 matches the GPU machines' driver; see ../shared/CUDA.md or the moeba-build docs),
# - installs g++ (nvcc's host compiler), libclang-dev (bindgen) and python3-venv with apt-get when
#   they are missing,
# - builds moeba-kernels with `--features cuda` (nvcc compiles kernels/*.cu into one fatbin),
#   builds its tests without running them, and runs clippy on it with -D warnings,
# - prints the nvcc time and the kernels' register / stack / spill figures from ptxas.
#
# Idempotent; meant for a fresh Debian 12 machine as root (CI), works as a user when the apt
# packages are already there. Only sm_80 and sm_90a SASS are built unless MOEBA_CUDA_ARCHS says
# otherwise (the full default list, sm_80,sm_90a,sm_100,sm_120,compute_90, takes about 2.5x as long).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${MOEBA_CACHE:-$HOME/.cache/moeba}"
VENV="$CACHE/nvcc-13.0"
MARKER="$VENV/.moeba-nvcc-13.0-complete"
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
)
export MOEBA_CUDA_ARCHS="${MOEBA_CUDA_ARCHS:-sm_80,sm_90a}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say() { printf '[cuda-check] %s\n' "$*"; }

# ---------------------------------------------------------------- system packages
have_libclang() {
    compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null \
        || compgen -G '/usr/lib/*/libclang*.so*' >/dev/null \
        || { [ -n "${LIBCLANG_PATH:-}" ] && compgen -G "$LIBCLANG_PATH/libclang*.so*" >/dev/null; }
}
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
have_libclang || missing+=(libclang-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ! [ -f "$MARKER" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing with apt-get: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { say "need root (or sudo) to install ${missing[*]}"; exit 1; }
        SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- nvcc 13.0 from PyPI (cached)
find_cuda_home() {
    compgen -G "$VENV/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" | head -n1 | sed 's|/bin/nvcc$||'
}
CUDA_HOME_FOUND="$(find_cuda_home || true)"
if [ -f "$MARKER" ] && [ -n "$CUDA_HOME_FOUND" ] && [ -x "$CUDA_HOME_FOUND/bin/nvcc" ]; then
    say "nvcc cached in $VENV"
else
    say "installing nvcc 13.0 into $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
    CUDA_HOME_FOUND="$(find_cuda_home)"
    [ -x "$CUDA_HOME_FOUND/bin/nvcc" ] || { say "nvcc missing after install"; exit 1; }
    touch "$MARKER"
fi
export CUDA_HOME="$CUDA_HOME_FOUND"
unset NVCC CUDA_PATH
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

# ---------------------------------------------------------------- build, test build, clippy
say "MOEBA_CUDA_ARCHS=$MOEBA_CUDA_ARCHS"
t0=$(date +%s)
cargo build -p moeba-kernels --features cuda
say "cargo build --features cuda: $(( $(date +%s) - t0 ))s"
cargo test -p moeba-kernels --features cuda --no-run
cargo clippy -p moeba-kernels --features cuda --all-targets -- -D warnings
# Without the feature nothing needs nvcc: check that this still builds.
cargo build -p moeba-kernels

# ---------------------------------------------------------------- ptxas figures
log="$(ls -t target/*/build/moeba-kernels-*/out/ptxas.log 2>/dev/null | head -n1 || true)"
if [ -n "$log" ]; then
    say "nvcc: $(sed -n '2s/^# //p' "$log") for $MOEBA_CUDA_ARCHS ($log)"
    awk '
        /Compiling entry function/ { n++ }
        /bytes stack frame/ { if ($1 + 0 > 0) stack++; if ($5 + 0 > 0 || $9 + 0 > 0) spill++ }
        /Used [0-9]+ registers/ { r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r); if (r + 0 > max) max = r + 0 }
        END { printf "[cuda-check] %d kernel compilations, max %d registers, %d with a stack frame, %d spilling\n", n, max, stack, spill }
    ' "$log"
fi
say "ok"
