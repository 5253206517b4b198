#!/usr/bin/env bash
# Plants the classic kernel bugs one at a time in a copy of the work tree and shows what catches
# each: the emulated kernel suite (feature `kernel-emu`) built plain, with ASan + UBSan and with
# TSan (2 workers). A mutant is caught when a run fails: an emulator error (divergent barrier or
# shuffle, deadlock, invalid launch), a sanitizer report, or a parity mismatch. Not part of CI
# (about a minute of build per mutant and build); kernels/emu/README.md keeps the last report.
#
#   .ci/kernel-mutants.sh                 # every mutant
#   .ci/kernel-mutants.sh vector_tail ... # the named ones
# Each mutation is a perl substitution that must change its file (the script fails loudly when a
# kernel edit makes a pattern stale). Exit status: 0 when every mutant was caught.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 1
# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh || exit 1
export CUDA_EMU_INCLUDE="${CUDA_HOME}/include"
work="${MUTANTS_WORK:-$root/target/mutants}"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$root/target/mutants-target}"
# A quick part of the kernel suite: every kernel and head, both paths, tails, alignments, grid
# strides, ignored rows, and the L2 kernel's row groups (for l2_no_grid_barrier).
read -r -a filters <<<"${MUTANTS_FILTER:-kernels::emu::parity_small_heads kernels::emu::grid_stride kernels::emu::row_alignment kernels::emu::l2_rows_few}"
mkdir -p "$work"

# name | file | perl substitution (applied once, must match)
mutants=(
    "no_barrier_info|kernels/fused.cu|s{(\n\s*)__syncthreads\(\);(\s*\n\s*A info\[MS_ROWINFO_COLUMNS\];)}{\$1// (barrier removed)\$2}"
    "no_barrier_reduce|kernels/common.cuh|s{__syncthreads\(\);(\s*// the previous call)}{// (barrier removed)\$1}"
    "vector_tail|kernels/rows.cuh|s{/ V;(\s*const long long tail = body \+ vectors \* V;\s*for \(long long j = start \+ thread; j < body; j \+= threads\) scalar\(j\);\s*for \(long long k = thread; k < vectors;\))}{/ V + 1;\$1}"
    "misaligned|kernels/rows.cuh|s{long long head = misalign == 0 \? 0 : \(long long\)\(\(16 - misalign\) / sizeof\(T\)\);\s*if \(head > n \|\| !aligned16\(from \+ head\)\) head = n;}{long long head = 0; (void)misalign;}"
    "divergent_barrier|kernels/common.cuh|s{if \(lane == 0\) warp_states\[warp\] = s;\s*__syncthreads\(\);}{if (lane == 0) { warp_states[warp] = s; __syncthreads(); }}"
    "divergent_shuffle|kernels/common.cuh|s#if \(warp == 0\) \{#if (warp == 0 && lane < 16) {#"
    "unguarded_lane_read|kernels/common.cuh|s{s = lane < WARPS \? warp_states\[lane\] : online_empty<A>\(\);}{s = warp_states[lane];}"
    "static_shared_oob|kernels/common.cuh|s{warp_states\[warp\] = s;}{warp_states[warp * 5] = s;}"
    # Caught by kernels::emu::l2_rows_few (in the default filter): the L2 kernel's grid barrier
    # dropped, so a group's gradient may read partial states not yet written.
    "l2_no_grid_barrier|kernels/fused.cu|s{if \(g < groups\) grid\.sync\(\);}{(void)grid;}"
    # The planner gives ms_fused 16 bytes less dynamic shared memory than the row needs.
    "host_fused_smem_short|src/backends/launch/mod.rs|s{(\* size\)\.next_multiple_of\(16\))}{\$1 - 16}"
)

selected=("$@")
caught=0
missed=0
report="$work/report.txt"
: >"$report"
for entry in "${mutants[@]}"; do
    IFS='|' read -r name file subst <<<"$entry"
    if [ ${#selected[@]} -gt 0 ] && [[ " ${selected[*]} " != *" $name "* ]]; then
        continue
    fi
    dir="$work/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$dir"
    if ! perl -0pi -e "$subst or die qq{pattern not found\n}" "$dir/$file"; then
        echo "=== $name: STALE mutation (pattern not found in $file)" | tee -a "$report"
        missed=$((missed + 1))
        continue
    fi
    echo "=== $name ($file)" | tee -a "$report"
    diff -u "$root/$file" "$dir/$file" | sed -n '3,$p' | grep -E '^[-+]' | head -n 6 | sed 's/^/    /' | tee -a "$report"
    hit=0
    for flavour in plain address thread; do
        # Build this flavour (only the crate is rebuilt), then run the suite binary directly with
        # the sanitizer runtime preloaded, as .ci/kernel-emu.sh does.
        sanitize="${flavour/plain/}"
        bin=$(cd "$dir" && KERNEL_EMU_SANITIZE="$sanitize" cargo test --features kernel-emu --test suite \
            --no-run --message-format=json 2>"$work/$name-$flavour-build.log" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')
        if [ -z "$bin" ]; then
            printf '    %-8s BUILD FAILED (see %s)\n' "$flavour" "$work/$name-$flavour-build.log" | tee -a "$report"
            continue
        fi
        preload=
        [ "$flavour" = address ] && preload="$(gcc -print-file-name=libasan.so)"
        [ "$flavour" = thread ] && preload="$(gcc -print-file-name=libtsan.so)"
        for order in forward reverse; do
            workers=1
            [ "$flavour" = thread ] && workers=2
            [ "$flavour" != plain ] && [ "$order" = reverse ] && continue
            log="$work/$name-$flavour-$order.log"
            LD_PRELOAD="$preload" CUDA_EMU_ORDER="$order" CUDA_EMU_WORKERS="$workers" \
                ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
                TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:suppressions=$root/kernels/emu/tsan.supp" \
                timeout 900 "$bin" "${filters[@]}" --test-threads 2 >"$log" 2>&1
            rc=$?
            what=$(grep -m1 -oE 'cuda_emu: (error|deadlock).{0,150}|ERROR: AddressSanitizer: [a-z-]+|runtime error: .{0,120}|WARNING: ThreadSanitizer: [a-z ]+|\[[^]]*\] [^:]*: .{0,100}' "$log" | head -n 1)
            [ -z "$what" ] && what=$(grep -m1 -E 'test result|panicked' "$log")
            printf '    %-8s order=%-8s workers=%s rc=%-4s %s\n' "$flavour" "$order" "$workers" "$rc" "$what" | tee -a "$report"
            [ "$rc" -ne 0 ] && hit=1
        done
    done
    if [ "$hit" = 1 ]; then
        caught=$((caught + 1))
    else
        missed=$((missed + 1))
        echo "    NOT CAUGHT" | tee -a "$report"
    fi
done
echo "mutants: $caught passed, $missed failed" | tee -a "$report"
[ "$missed" -eq 0 ]
