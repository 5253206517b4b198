#!/usr/bin/env bash
# An nvcc for the type-checking builds of CI (`cargo clippy --features cuda / nccl`): candle's
# own kernels (the build script of the `candle-kernels` crate, about ten minutes of nvcc on two
# cores) get empty outputs, since a type check never runs or links them; every other call, this
# crate's build.rs building kernels/*.cu into fatbins included, goes to the real nvcc
# ($REAL_NVCC). Not for a build that is run: candle's kernels would be empty.
set -euo pipefail
real="${REAL_NVCC:?nvcc-typecheck.sh: set REAL_NVCC to the real nvcc}"
if [ "${CARGO_PKG_NAME:-}" != "candle-kernels" ]; then
    exec "$real" "$@"
fi
for arg in "$@"; do
    case "$arg" in
    --version | -V | --list-gpu-arch | --list-gpu-code) exec "$real" "$@" ;;
    esac
done
# The outputs it would write: `-o FILE`, or `--ptx` with `--output-directory DIR` (DIR/<stem>.ptx
# for each .cu input).
prev="" dir="" ptx=0 sources=()
for arg in "$@"; do
    case "$prev" in
    -o | --output-file) : >"$arg" ;;
    --output-directory | -odir) dir="$arg" ;;
    esac
    case "$arg" in
    -o=* | --output-file=*) : >"${arg#*=}" ;;
    --output-directory=* | -odir=*) dir="${arg#*=}" ;;
    --ptx | -ptx) ptx=1 ;;
    *.cu) sources+=("$arg") ;;
    esac
    prev="$arg"
done
if [ "$ptx" = 1 ] && [ -n "$dir" ]; then
    for source in "${sources[@]}"; do
        name="$(basename "$source")"
        : >"$dir/${name%.cu}.ptx"
    done
fi
