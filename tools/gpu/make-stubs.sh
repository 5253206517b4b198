#!/usr/bin/env bash
# Usage: make-stubs.sh TARGET_PROFILE_DIR OUT_DIR
# Link-time stand-ins for libcuda, libnvrtc, libcurand, libcublas and libcublasLt, made from the
# undefined symbols of the built candle / cudarc / candle-kernels objects. Each stub function
# returns 100 (CUDA_ERROR_NO_DEVICE), so a binary linked against them does nothing useful but on
# a machine with the real libraries (whose sonames these stubs copy). libcudart comes from the
# pinned toolkit ($CUDA_HOME, see nvcc-env.sh): it is a real library, only linked, never packed.
set -euo pipefail
profile=${1:?usage: make-stubs.sh TARGET_PROFILE_DIR OUT_DIR}
out=${2:?usage: make-stubs.sh TARGET_PROFILE_DIR OUT_DIR}
: "${CUDA_HOME:?source tools/gpu/nvcc-env.sh first}"
mkdir -p "$out"
syms=$out/syms.txt
shopt -s nullglob
objs=("$profile"/deps/*.rlib "$profile"/build/candle-kernels-*/out/*.a)
[ ${#objs[@]} -gt 0 ] || { echo "make-stubs: no .rlib / .a under $profile" >&2; exit 1; }
for f in "${objs[@]}"; do
  nm -u --format=just-symbols "$f" 2>/dev/null || true
done | sort -u | grep -E '^(cu|nvrtc|curand|cublas)' >"$syms" || true
grep -q '^cuInit$' "$syms" || { echo "make-stubs: cuInit is not among the undefined symbols: was the build made with --features cuda?" >&2; exit 1; }
stub() { # name soname include-regex [exclude-regex]
  grep -E "$3" "$syms" | grep -vE "${4:-^$}" | sed 's/.*/int &(void) { return 100; }/' >"$out/$1.c"
  gcc -shared -fPIC -o "$out/$2" -Wl,-soname,"$2" "$out/$1.c"
  ln -sf "$2" "$out/$1.so"
  echo "make-stubs: $2 ($(wc -l <"$out/$1.c") symbols)" >&2
}
stub libcuda libcuda.so.1 '^cu[A-Z]'
stub libnvrtc libnvrtc.so.13 '^nvrtc'
stub libcurand libcurand.so.10 '^curand'
stub libcublas libcublas.so.13 '^cublas' '^cublasLt'
stub libcublasLt libcublasLt.so.13 '^cublasLt'
[ -e "$CUDA_HOME/lib/libcudart.so.13" ] || { echo "make-stubs: $CUDA_HOME/lib/libcudart.so.13 missing" >&2; exit 1; }
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$out/libcudart.so"
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$out/libcudart.so.13"
