#!/usr/bin/env bash
# The CUDA kernels themselves (kernels/*.cu, unmodified) run on the CPU through the SIMT emulator
# of kernels/emu/, driven by the crate's own launch planning (src/backends/launch/mod.rs, feature
# `kernel-emu`): the emulator's self-test, then the kernel suite (`kernels::emu::*` in the `suite`
# test binary, the same checks as the GPU suite) and the ABI check, in three builds and several
# thread orders. "all" is the whole kernel suite; "memory" and "barriers" the parts of it that
# the sanitizers need (below):
#   plain         all: forward order, 1 worker; memory: random order, 2 workers
#   ASan + UBSan  memory: reverse order, 1 worker
#   TSan          barriers: random order, 2 workers (races within a block and between blocks)
# Each thread order runs once on the whole suite under a sanitizer or plain, and the three
# orders together; TSan's report does not depend on the order (the fibers of a block are
# ordered only by barriers and warp operations, whichever order the scheduler picks), so one
# TSan run, with 2 workers for the races between blocks, catches what two did.
# (TSan runs the emulator ~25 times slower than plain, ASan ~5 times.)
# Any emulator error (divergent barrier or shuffle, deadlock, invalid launch) or sanitizer report
# aborts its run, and a parity mismatch fails it. Closes with "kernel-emu: N passed, N failed"
# (one count per run) and exits non-zero if any run failed.
#
# Needs a Rust toolchain, g++ and the CUDA host headers, which .ci/cuda-toolkit.sh installs from
# PyPI. The three builds share the target directory (only this crate is rebuilt between them).
#   .ci/kernel-emu.sh                   # everything
#   KERNEL_EMU_BUILDS="address" .ci/kernel-emu.sh   # only the ASan + UBSan runs
#   KERNEL_EMU_FILTER="kernels::emu::grid_stride kernels::emu::split_rows" .ci/kernel-emu.sh
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh || exit 1
export CUDA_EMU_INCLUDE="${CUDA_HOME}/include"

read -r -a builds <<<"${KERNEL_EMU_BUILDS:-plain address thread}"
# shellcheck disable=SC2034 # used through the nameref of run()
all=(kernels::emu::)
# "memory", for ASan + UBSan and the second plain order: the whole suite but its two long
# numerics grids (the finite differences and the medium shapes, run once, plain, forward), whose
# launches the small grids and the boundary, alignment and wide-row tests already make.
# shellcheck disable=SC2034
memory=(kernels::emu:: --skip kernels::emu::finite_differences --skip kernels::emu::parity_medium)
# "barriers", for TSan: every kernel entry (each head's variant, each dtype) on every path, with
# more than one warp and more than one block: the parity grid of the small shapes, capped grids
# (every grid-stride loop, the split forward with several splits a row), clusters, the L2
# kernel's grid barrier, the target kernel's paths, B = 0. Not the boundary widths ±1, the row
# phases or the determinism reruns (the plain and ASan runs cover those): the tests read
# CUDA_EMU_GRID=barriers and keep one width per path (kernels::emu::cluster_rows) and one head
# in the path tests (a head picks the per-element transform, not the barriers).
# shellcheck disable=SC2034
barriers=(kernels::emu::parity_small_heads kernels::emu::grid_stride
    kernels::emu::reduction_variants kernels::emu::target_errors_match_cpu
    kernels::emu::edge_empty_batch kernels::emu::unchecked_targets kernels::emu::cluster_rows
    kernels::emu::l2_rows_few)
if [ -n "${KERNEL_EMU_FILTER:-}" ]; then
    read -r -a all <<<"$KERNEL_EMU_FILTER"
    # shellcheck disable=SC2034
    memory=("${all[@]}")
    # shellcheck disable=SC2034
    barriers=("${all[@]}")
fi
seed="${CUDA_EMU_SEED:-20261201}"
passed=0
failed=0
failures=()
logs="${KERNEL_EMU_LOGS:-target/kernel-emu-logs}"
mkdir -p "$logs"

# The emulator's own tests, in each build: its warp semantics against CUDA's definitions
# (selftest.cpp); clusters with distributed shared memory, cooperative grid.sync, large dynamic
# shared memory and their errors (selftest_cluster.cpp, which runs each error case in a child).
selftest() {
    local flavour="$1"
    shift
    local test bin
    for test in selftest selftest_cluster; do
        bin="$logs/$test-$flavour"
        echo "---- $test ($flavour)"
        if g++ -std=c++17 -g -O1 -fno-strict-aliasing -I kernels/emu -I "$CUDA_EMU_INCLUDE" "$@" \
            "kernels/emu/$test.cpp" -o "$bin" && "$bin"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1))
            failures+=("emulator $test ($flavour)")
        fi
    done
}

# build: the kernel-suite binaries of the current KERNEL_EMU_SANITIZE setting into $bins.
build() {
    echo "==== build: ${KERNEL_EMU_SANITIZE:-plain}"
    bins=()
    local json
    json="$(cargo test --features kernel-emu --no-run --lib --test suite --message-format=json)" || {
        failed=$((failed + 1))
        failures+=("build ${KERNEL_EMU_SANITIZE:-plain}")
        return 1
    }
    mapfile -t bins < <(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' <<<"$json")
    printf '     %s\n' "${bins[@]}"
}

# run NAME SET ENV... : the ABI check and the tests SET (all, memory or barriers) of the kernel suite
# from the last build, with ENV set (the sanitizer runtime preloaded, see build.rs).
run() {
    local name="$1"
    local -n tests="$2"
    shift 2
    local log="$logs/${name// /_}.log"
    local start=$SECONDS
    local ok=1
    echo "---- $name ($*)"
    : >"$log"
    # --report-time (libtest's, unstable: RUSTC_BOOTSTRAP for the test binary alone) puts each
    # test's time in the log, for the slowest-tests line below.
    local timed=(-Z unstable-options --report-time)
    for bin in "${bins[@]}"; do
        if [[ "$(basename "$bin")" == candle_margin_softmax-* ]]; then
            env "$@" RUSTC_BOOTSTRAP=1 "$bin" emu::tests "${timed[@]}" >>"$log" 2>&1 || ok=0
        else
            env "$@" RUSTC_BOOTSTRAP=1 "$bin" "${tests[@]}" "${timed[@]}" >>"$log" 2>&1 || ok=0
        fi
    done
    [ ${#bins[@]} -eq 2 ] || ok=0
    if [ "$ok" = 1 ]; then
        passed=$((passed + 1))
        echo "     ok in $((SECONDS - start)) s: $(grep -E '^test result' "$log" | tail -n 1)"
        echo "     slowest: $(sed -nE 's/^test (kernels::emu::)?([^ ]+) \.\.\. ok <([0-9.]+)s>$/\3 \2/p' "$log" |
            sort -rn | head -n 4 | awk '{printf "%s %.0f s; ", $2, $1}')"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "     FAILED in $((SECONDS - start)) s; from $log:"
        grep -E 'cuda_emu: |ERROR: AddressSanitizer|runtime error:|WARNING: ThreadSanitizer|panicked|FAILED|failures:' "$log" | head -n 20
        tail -n 40 "$log"
    fi
}

# The sanitizers' own settings: stop at the first report; Rust's test harness leaks by design.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:second_deadlock_stack=1:suppressions=$PWD/kernels/emu/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}"

for build in "${builds[@]}"; do
    case "$build" in
    plain)
        selftest plain
        export KERNEL_EMU_SANITIZE=
        build || continue
        run "plain all forward w1" all CUDA_EMU_ORDER=forward CUDA_EMU_WORKERS=1
        run "plain memory random w2 seed $seed" memory CUDA_EMU_ORDER=random CUDA_EMU_SEED="$seed" CUDA_EMU_WORKERS=2
        ;;
    address)
        selftest asan -fsanitize=address,undefined -fno-sanitize-recover=all
        export KERNEL_EMU_SANITIZE=address
        build || continue
        asan="LD_PRELOAD=$(gcc -print-file-name=libasan.so)"
        run "asan memory reverse w1" memory "$asan" CUDA_EMU_ORDER=reverse CUDA_EMU_WORKERS=1
        ;;
    thread)
        selftest tsan -fsanitize=thread
        export KERNEL_EMU_SANITIZE=thread
        build || continue
        tsan="LD_PRELOAD=$(gcc -print-file-name=libtsan.so)"
        run "tsan barriers random w2 seed $seed" barriers "$tsan" CUDA_EMU_GRID=barriers CUDA_EMU_ORDER=random CUDA_EMU_SEED="$seed" CUDA_EMU_WORKERS=2
        ;;
    *)
        echo "kernel-emu.sh: unknown build '$build' (plain, address, thread)" >&2
        exit 2
        ;;
    esac
done
export KERNEL_EMU_SANITIZE=

for f in "${failures[@]}"; do
    echo "failed: $f"
done
echo "kernel-emu: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
