#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX and the PTX to cubin with `ptxas -v` (the SASS that
# build.rs puts in its fatbins, one architecture at a time), for each architecture in
# CUDA_KERNEL_ARCHS (default "80 90", as build.rs's MARGIN_SOFTMAX_CUDA_ARCHS), prints
# registers, spills and stack frame per kernel, and fails on a compile error, an nvcc warning,
# or any function with spill stores / loads or a stack frame. No GPU needed; nvcc comes from
# .ci/cuda-toolkit.sh (pinned CUDA 13.0 wheels from PyPI, or your NVCC=...).
#
#   .ci/cuda-kernels.sh            # all kernels, sm_80 and sm_90
#   CUDA_KERNEL_ARCHS=86 .ci/cuda-kernels.sh
#   KEEP=/tmp/k .ci/cuda-kernels.sh   # keep the .ptx / .cubin / ptxas logs in /tmp/k
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh

# The flags of build.rs (NVCC_FLAGS there; it passes one -gencode per architecture instead of
# -arch), plus warnings as errors.
nvcc_flags=(-O3 -std=c++17 -I kernels --Werror all-warnings)
archs=(${CUDA_KERNEL_ARCHS:-80 90})
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

shopt -s nullglob
sources=(kernels/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "cuda-kernels.sh: no kernels/*.cu: nothing to check"
    exit 0
fi

if [ -n "${KEEP:-}" ]; then
    work="$KEEP"
    mkdir -p "$work"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi

"$NVCC" --version | tail -n 2
echo "ptxas: $(command -v ptxas)"
echo "kernels: ${sources[*]}; architectures: ${archs[*]}; $jobs jobs"

# One job: source × architecture → PTX → cubin; the logs go to $work/<stem>.sm_<arch>.*.
compile_one() {
    local src="$1" arch="$2"
    local base
    base="$work/$(basename "$src" .cu).sm_$arch"
    if ! "$NVCC" --ptx "-arch=sm_$arch" "${nvcc_flags[@]}" -o "$base.ptx" "$src" \
        >"$base.nvcc.log" 2>&1; then
        echo "nvcc failed" >>"$base.nvcc.log"
        return 1
    fi
    ptxas "-arch=sm_$arch" -O3 -v -o "$base.cubin" "$base.ptx" >"$base.ptxas.log" 2>&1
}

start=$SECONDS
pids=()
names=()
for arch in "${archs[@]}"; do
    for src in "${sources[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
            wait -n || true
        done
        compile_one "$src" "$arch" &
        pids+=($!)
        names+=("$src sm_$arch")
    done
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "FAILED: ${names[$i]}"
        failed=1
    fi
done
echo "compiled in $((SECONDS - start)) s"

# nvcc output in full (errors, or warnings, which --Werror turns into errors).
for log in "$work"/*.nvcc.log; do
    if [ -s "$log" ]; then
        printf '\n---- %s ----\n' "$(basename "$log" .nvcc.log)"
        cat "$log"
    fi
done
if [ "$failed" -ne 0 ]; then
    # ptxas errors, if nvcc got that far.
    for log in "$work"/*.ptxas.log; do
        grep -q -i error "$log" && { printf '\n---- %s ----\n' "$(basename "$log")"; cat "$log"; }
    done
    echo "cuda-kernels.sh: compile errors (above)" >&2
    exit 1
fi

# ptxas -v prints, per function:
#   ptxas info    : Compiling entry function 'fwd_f32' for 'sm_90'
#   ptxas info    : Function properties for fwd_f32
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 10 registers, used 0 barriers, 368 bytes cmem[0]
# Non-inlined device functions get "Function properties" too (no "Used" line); they count.
bad=0
printf '\n%-12s %-6s %-40s %5s %6s %7s %7s %8s\n' source arch function regs stack spill-st spill-ld smem
for arch in "${archs[@]}"; do
    for src in "${sources[@]}"; do
        log="$work/$(basename "$src" .cu).sm_$arch.ptxas.log"
        if ! awk -v src="$(basename "$src")" -v arch="sm_$arch" '
            function flush() {
                if (fn == "") return
                printf "%-12s %-6s %-40s %5s %6s %7s %7s %8s%s\n", src, arch, fn, regs, stack, st, ld, smem, \
                    (stack + st + ld > 0 ? "   <-- FAIL" : "")
                if (stack + st + ld > 0) bad = 1
                fn = ""
            }
            /Function properties for / {
                flush()
                fn = $0; sub(/.*Function properties for /, "", fn)
                regs = "-"; smem = "-"; stack = 0; st = 0; ld = 0
                next
            }
            /bytes stack frame/ {
                for (i = 1; i <= NF; i++) {
                    if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i + 0
                    if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^stores/) st = $i + 0
                    if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^loads/) ld = $i + 0
                }
                next
            }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) {
                    if ($(i+1) ~ /^registers/) { regs = $i; if (smem == "-") smem = 0 }
                    if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
                }
                next
            }
            END { flush(); exit bad }
        ' "$log"; then
            bad=1
        fi
    done
done

if [ "$bad" -ne 0 ]; then
    printf '\ncuda-kernels.sh: a function above spills registers or has a stack frame (local memory).\n' >&2
    echo "Raw ptxas output:" >&2
    cat "$work"/*.ptxas.log >&2
    exit 1
fi
printf '\ncuda-kernels.sh: every kernel compiles for %s with no spills and no stack frame\n' "${archs[*]/#/sm_}"
