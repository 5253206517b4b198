#!/usr/bin/env bash
# The GPU-machine side of tools/gpu/pack.sh; pack.sh copies it to .gpu/run.sh.
# That machine has no Rust and no network; it has PyTorch, Triton, CuPy, nvcc 13.0, ncu and
# compute-sanitizer. Device tool: carry [".gpu"], command `bash .gpu/run.sh all`, timeout_s ~480.
#
#   bash .gpu/run.sh all                every step below, in about 7 minutes (GPU_RUN_BUDGET_S)
#   bash .gpu/run.sh tests              facts, PTX load check, the GPU test suite (REQUIRE_GPU=1)
#   bash .gpu/run.sh sanitize           compute-sanitizer (SANITIZE_TOOLS) on SANITIZE_FILTERS
#   bash .gpu/run.sh bench              examples/bench (short) and benches/torch_compare.py (short)
#   bash .gpu/run.sh libs               only the library lookup
#   bash .gpu/run.sh EXAMPLE [ARGS...]  one example binary (bench, train), no time limit;
#                                       `bench` needs an argument to mean the example (else the
#                                       step), or say `bash .gpu/run.sh example bench`
#
# Logs: $OUT/<step>.log (OUT defaults to /tmp/gpu-out); $OUT/summary.txt has one line per step:
# name, exit code, seconds, the log's closing line. Every step runs even when an earlier one
# failed; the exit code is 1 when any step failed (or did not run for lack of time).
#
# Environment knobs (defaults below): GPU_RUN_BUDGET_S, GPU_TEST_FILTERS, SANITIZE_FILTERS,
# SANITIZE_TOOLS, BENCH_ARGS, TORCH_ARGS, the per-step caps T_*, GPU_RUN_BIN_DIR (where the
# binaries are unpacked), GPU_RUN_LIB_ROOTS (colon-separated fake roots: look for the CUDA
# libraries only under them; for testing the lookup on a machine without CUDA).
set -uo pipefail

# ---- settings -------------------------------------------------------------------------------
# the GPU tests of the `suite` test binary (libtest filters, space-separated: tests/suite/kernels.rs
# stamps every GPU test, the GPU-sized ones included, as `kernels::gpu::*`), and the subset that runs
# under compute-sanitizer
GPU_TEST_FILTERS=${GPU_TEST_FILTERS:-kernels::gpu::}
SANITIZE_FILTERS=${SANITIZE_FILTERS:-kernels::gpu::parity_small_heads kernels::gpu::fused_split_boundary}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck synccheck}
SUITE_BIN=${SUITE_BIN:-suite}
BENCH_ARGS=${BENCH_ARGS:---shapes 8192x32000,1024x45000 --dtypes bf16 --iters 10 --ref-iters 3 --warmup 2}
TORCH_ARGS=${TORCH_ARGS:---shapes 8192x32000 --dtypes bf16 --heads softmax arcface-detached --cycles 20}
GPU_RUN_BUDGET_S=${GPU_RUN_BUDGET_S:-430}   # the whole `all` run, unpacking included
# per-step caps, seconds (each step also stops at the overall budget)
# (15 + 20 + 30 + 120 + 3 x 35 + 40 + 85 = 415 s, plus unpacking and the library lookup)
T_FACTS=${T_FACTS:-15}
T_PTX=${T_PTX:-20}
T_SUITE=${T_SUITE:-120}
T_OTHER_TESTS=${T_OTHER_TESTS:-30}  # each test binary other than the suite
T_SANITIZE=${T_SANITIZE:-35}        # each tool
T_BENCH=${T_BENCH:-40}
T_TORCH=${T_TORCH:-85}
LIBS=(libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13)

# ---- paths ----------------------------------------------------------------------------------
PACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$PACK/$(basename "${BASH_SOURCE[0]}")
OUT=${OUT:-/tmp/gpu-out}
BIN=${GPU_RUN_BIN_DIR:-/tmp/gpu-bin}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
T0=$SECONDS
DEADLINE=$((T0 + GPU_RUN_BUDGET_S))
FAILED=0

say() { echo "[run.sh $((SECONDS - T0))s] $*"; }

# ---- internal sub-commands (run under `timeout` by run_step) ---------------------------------
facts() {
  echo "## nvidia-smi"
  nvidia-smi || echo "nvidia-smi failed (rc=$?)"
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,mig.mode.current \
    --format=csv 2>&1 || true
  local rc=0
  nvidia-smi -L >/dev/null 2>&1 || rc=1
  echo "## tools"
  for t in nvcc compute-sanitizer ncu python3; do
    if command -v "$t" >/dev/null 2>&1; then echo "$t: $(command -v "$t")"; else echo "$t: not on PATH"; fi
  done
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  python3 - <<'PY' 2>&1 || true
import importlib
for m in ("torch", "triton", "cupy", "numpy", "liger_kernel"):
    try:
        mod = importlib.import_module(m)
        extra = ""
        if m == "torch":
            extra = f" cuda={mod.version.cuda} available={mod.cuda.is_available()}"
        print(f"{m}: {getattr(mod, '__version__', '?')}{extra}")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__}: {e})")
PY
  echo "## packed"
  [ -f "$PACK/MANIFEST.txt" ] && head -n 4 "$PACK/MANIFEST.txt"
  if [ $rc -eq 0 ]; then echo "facts: GPU visible"; else echo "facts: nvidia-smi -L failed: no GPU visible"; fi
  return $rc
}

# Loads every packed PTX module with CuPy (the driver JIT): catches PTX the driver refuses
# (CUDA_ERROR_UNSUPPORTED_PTX_VERSION) in seconds, before any Rust binary runs.
ptx_load() {
  python3 - "$PACK/ptx" <<'PY'
import glob, os, re, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.ptx")))
if not files:
    sys.exit("ptx-load: no PTX packed")
import cupy
print("cupy", cupy.__version__, "driver", cupy.cuda.runtime.driverGetVersion(),
      "device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
bad = 0
for f in files:
    text = open(f).read()
    ver = re.search(r"^\.version\s+(\S+)", text, re.M)
    tgt = re.search(r"^\.target\s+(\S+)", text, re.M)
    names = re.findall(r"\.entry\s+(\w+)", text)
    try:
        mod = cupy.RawModule(path=f)
        for n in names:
            mod.get_function(n)
        print(f"ok   {os.path.basename(f)}: .version {ver and ver.group(1)} .target {tgt and tgt.group(1)}, {len(names)} kernels loaded")
    except Exception as e:  # noqa: BLE001
        bad += 1
        print(f"FAIL {os.path.basename(f)}: {type(e).__name__}: {e}")
print("ptx-load: all modules loaded" if not bad else f"ptx-load: {bad} module(s) failed")
sys.exit(1 if bad else 0)
PY
}

# benches/torch_compare.py against the packed examples/peer (the crate's own CUDA path, timed
# with events by the peer), interleaved step by step with PyTorch, torch.compile and Liger.
torch_bench() {
  local script=$PACK/py/benches/torch_compare.py args
  read -r -a args <<<"$TORCH_ARGS"
  shopt -s nullglob
  local whl=("$PACK"/../.whl/*.whl)
  if [ ${#whl[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${whl[@]}" &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  args=(--device cuda --peer "$BIN/examples/peer" "${args[@]}" --json "$OUT/torch_compare.json")
  echo "python3 $script ${args[*]}"
  PYTHONUNBUFFERED=1 python3 "$script" "${args[@]}"
}

case ${1:-} in
  __facts) facts; exit ;;
  __ptx_load) ptx_load; exit ;;
  __torch) torch_bench; exit ;;
esac

# ---- the CUDA libraries ---------------------------------------------------------------------
# Directories where a CUDA library usually lies, under prefix $1 ("" for the real root).
lib_dirs_under() {
  local p=$1 d
  shopt -s nullglob
  for d in "$p"/usr/lib/x86_64-linux-gnu "$p"/usr/lib64 "$p"/lib/x86_64-linux-gnu "$p"/usr/lib/wsl/lib \
    "$p"/usr/local/nvidia/lib64 "$p"/usr/local/nvidia/lib "$p"/usr/local/cuda/lib64 \
    "$p"/usr/local/cuda/targets/x86_64-linux/lib "$p"/usr/local/cuda-*/lib64 \
    "$p"/usr/local/cuda-*/targets/x86_64-linux/lib "$p"/opt/conda/lib \
    "$p"/usr/local/lib/python3*/*-packages/nvidia/*/lib "$p"/usr/lib/python3*/*-packages/nvidia/*/lib \
    "$p"/opt/conda/lib/python3*/site-packages/nvidia/*/lib "$p"/root/.local/lib/python3*/site-packages/nvidia/*/lib \
    "$p"/usr/local/lib/python3*/*-packages/torch/lib "$p"/opt/conda/lib/python3*/site-packages/torch/lib; do
    [ -d "$d" ] && echo "$d"
  done
}

# The nvidia-* pip packages and torch/lib of this python3 (nvidia is a namespace package:
# nvidia.__file__ is None, so use __path__); guarded: no python3, no nvidia package, a hang.
python_lib_dirs() {
  command -v python3 >/dev/null 2>&1 || return 0
  timeout 30 python3 - <<'PY' 2>/dev/null || true
import glob, os
roots = []
try:
    import nvidia
    roots += list(getattr(nvidia, "__path__", [])) or [os.path.dirname(nvidia.__file__)]
except Exception:
    pass
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        print(d)
try:
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        print(os.path.join(os.path.dirname(spec.origin), "lib"))
except Exception:
    pass
PY
}

find_libs() {
  local roots=() r lib d found_dirs=() missing=() path
  declare -A where=()
  if [ -n "${GPU_RUN_LIB_ROOTS:-}" ]; then
    IFS=: read -r -a roots <<<"$GPU_RUN_LIB_ROOTS"
    say "library lookup restricted to GPU_RUN_LIB_ROOTS=$GPU_RUN_LIB_ROOTS"
  else
    roots=("")
    # 1. the loader's cache
    if command -v ldconfig >/dev/null 2>&1; then
      while read -r lib path; do
        [ -z "${where[$lib]:-}" ] && [[ $path != */stubs/* ]] && [ -e "$path" ] && where[$lib]=$path
      done < <(ldconfig -p 2>/dev/null | awk '$NF ~ /^\// && $1 ~ /^lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so\./ && /x86-64/ {print $1, $NF}')
    fi
  fi
  # 2. the usual directories (under each fake root when testing), 3. python's nvidia packages
  local dirs=()
  for r in "${roots[@]}"; do mapfile -t -O "${#dirs[@]}" dirs < <(lib_dirs_under "$r"); done
  [ -z "${GPU_RUN_LIB_ROOTS:-}" ] && mapfile -t -O "${#dirs[@]}" dirs < <(python_lib_dirs)
  for lib in "${LIBS[@]}"; do
    [ -n "${where[$lib]:-}" ] && continue
    for d in "${dirs[@]}"; do
      if [ -e "$d/$lib" ]; then where[$lib]=$d/$lib; break; fi
    done
  done
  # 4. the slow way, for what is still missing: find, bounded in time
  local want=() names=()
  for lib in "${LIBS[@]}"; do [ -z "${where[$lib]:-}" ] && want+=(-o -name "$lib") && names+=("$lib"); done
  if [ ${#want[@]} -gt 0 ]; then
    say "not in the usual places: ${names[*]}; searching with find (at most 60 s a root)"
    for r in "${roots[@]}"; do
      while read -r path; do
        lib=$(basename "$path")
        # link-time stubs, and the forward-compatibility libcuda (needs a matching kernel driver)
        [[ $path == */stubs/* ]] && continue
        [[ $lib == libcuda.so.1 && $path == */compat/* ]] && continue
        [ -z "${where[$lib]:-}" ] && where[$lib]=$path
      done < <(timeout 60 find "${r:-/}" \( -path /proc -o -path /sys -o -path /dev -o -path "$BIN" \) -prune \
        -o \( "${want[@]:1}" \) -print 2>/dev/null)
    done
  fi
  for lib in "${LIBS[@]}"; do
    if [ -n "${where[$lib]:-}" ]; then
      echo "  found   $lib: ${where[$lib]}"
      d=$(dirname "${where[$lib]}")
      [[ " ${found_dirs[*]} " == *" $d "* ]] || found_dirs+=("$d")
    else
      echo "  MISSING $lib"
      missing+=("$lib")
    fi
  done
  if [ ${#found_dirs[@]} -gt 0 ]; then
    local joined
    joined=$(IFS=:; echo "${found_dirs[*]}")
    export LD_LIBRARY_PATH=$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  echo "  LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  if [ ${#missing[@]} -gt 0 ]; then
    echo "libs: ${#missing[@]} missing: ${missing[*]}"
    return 1
  fi
  echo "libs: all ${#LIBS[@]} found"
}

# ---- steps ----------------------------------------------------------------------------------
record() { # name rc seconds closing-line
  printf '%-34s rc=%-4s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  [ "$2" = 0 ] || FAILED=1
}

# the log's closing line, backtraces ("Stack backtrace:", "  3: <unknown>", "at src/...") left out
last_line() {
  grep -v -E '^[[:space:]]*$|^[[:space:]]*[0-9]+: |^[[:space:]]+at |^Stack backtrace:|^note: run with `RUST_BACKTRACE' \
    "$1" 2>/dev/null | tail -n 1 | cut -c1-200
}

# run_step NAME CAP KIND CMD...   KIND: plain | tests (libtest output: checks that tests ran,
# warns on "skip"). Runs CMD under timeout min(CAP, time left), logs to $OUT/NAME.log.
run_step() {
  local name=$1 cap=$2 kind=$3 log=$OUT/$1.log
  shift 3
  local left=$((DEADLINE - SECONDS - 3)) t=$cap
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 5 ]; then
    echo "not run: the ${GPU_RUN_BUDGET_S}s budget is spent" >"$log"
    say "=== $name: NOT RUN (budget spent)"
    record "$name" 125 0 "not run: budget spent"
    return
  fi
  say "=== $name (timeout ${t}s): $*"
  local s=$SECONDS rc
  (
    echo "\$ $*"
    timeout -k 5 "$t" "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMEOUT: stopped after ${t}s (rc=$rc)"; fi
    exit $rc
  ) >"$log" 2>&1
  rc=$?
  local el=$((SECONDS - s)) close warn=""
  if [ "$kind" = tests ]; then
    # libtest: "test result: ok. 3 passed; 0 failed; ..." per binary; none or all zero = nothing ran
    local ran
    ran=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed; [0-9]* failed' "$log" |
      awk '{p += $4; f += $6} END {print p + f + 0}')
    if [ "$rc" -eq 0 ] && [ "${ran:-0}" -eq 0 ]; then
      echo "NO TESTS RAN: the filter matched nothing (a pass proves nothing)" >>"$log"
      rc=3
    fi
    if grep -qi 'skip' "$log"; then
      warn=" [WARNING: printed 'skip']"
      echo "WARNING: $name printed 'skip' ($(grep -ci 'skip' "$log") lines): a skipped GPU test proves nothing; read $log"
      grep -i -m 5 'skip' "$log" | sed 's/^/    /'
    fi
  fi
  close=$(last_line "$log")
  tail -n 15 "$log" | sed 's/^/    /'
  say "--- $name: rc=$rc in ${el}s"
  record "$name" "$rc" "$el" "$close$warn"
}

unpack() {
  local f d n=0
  rm -rf "$BIN" && mkdir -p "$BIN/tests" "$BIN/examples"
  shopt -s nullglob
  for f in "$PACK"/tests/*.xz "$PACK"/examples/*.xz; do
    d=$BIN/$(basename "$(dirname "$f")")/$(basename "$f" .xz)
    if command -v xz >/dev/null 2>&1; then
      xz -dc "$f" >"$d"
    else
      python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$d"
    fi || { say "cannot unpack $f"; FAILED=1; continue; }
    chmod +x "$d"
    n=$((n + 1))
  done
  say "unpacked $n binaries into $BIN"
}

# the `ldd` view of one binary: which libraries it would load with this LD_LIBRARY_PATH
show_ldd() {
  local b
  for b in "$BIN/tests/$SUITE_BIN" "$BIN"/tests/* "$BIN"/examples/*; do
    [ -x "$b" ] || continue
    echo "ldd $(basename "$b"):"
    ldd "$b" 2>&1 | grep -E 'cuda|cublas|curand|nvrtc|not found' | sed 's/^/    /'
    return
  done
}

step_libs() {
  local s=$SECONDS rc
  say "=== libs"
  # not in a subshell: find_libs exports LD_LIBRARY_PATH for every later step
  find_libs >"$OUT/libs.log" 2>&1
  rc=$?
  local close
  close=$(last_line "$OUT/libs.log")
  show_ldd >>"$OUT/libs.log" 2>&1
  cat "$OUT/libs.log"
  record libs "$rc" $((SECONDS - s)) "$close"
  return "$rc"
}

steps_tests() {
  run_step ptx-load "$T_PTX" plain bash "$SELF" __ptx_load
  local t name filters
  read -r -a filters <<<"$GPU_TEST_FILTERS"
  shopt -s nullglob
  local tests=("$BIN"/tests/*)
  if [ ${#tests[@]} -eq 0 ]; then record tests 1 0 "no packed test binaries"; return; fi
  for t in "${tests[@]}"; do
    name=$(basename "$t")
    if [ "$name" = "$SUITE_BIN" ]; then
      run_step "tests-$name" "$T_SUITE" tests env REQUIRE_GPU=1 "$t" --test-threads=1 "${filters[@]}"
    else
      run_step "tests-$name" "$T_OTHER_TESTS" tests env REQUIRE_GPU=1 "$t"
    fi
  done
}

find_sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
    /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  return 1
}

steps_sanitize() {
  local cs tool filters
  read -r -a filters <<<"$SANITIZE_FILTERS"
  if ! cs=$(find_sanitizer); then
    for tool in $SANITIZE_TOOLS; do
      echo "compute-sanitizer not found" >"$OUT/sanitize-$tool.log"
      record "sanitize-$tool" 127 0 "compute-sanitizer not found"
    done
    return
  fi
  for tool in $SANITIZE_TOOLS; do
    run_step "sanitize-$tool" "$T_SANITIZE" tests env REQUIRE_GPU=1 "$cs" --tool "$tool" --error-exitcode 9 \
      --print-limit 50 "$BIN/tests/$SUITE_BIN" --test-threads=1 "${filters[@]}"
  done
}

steps_bench() {
  local args
  read -r -a args <<<"$BENCH_ARGS"
  run_step bench-rust "$T_BENCH" plain "$BIN/examples/bench" "${args[@]}"
  run_step bench-torch "$T_TORCH" plain bash "$SELF" __torch
}

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$SELF"; }

mode=${1:-}
example=""
case $mode in
  "" | -h | --help) usage; exit 0 ;;
  all | tests | sanitize | libs) ;;
  # `bench` alone is the benchmark step; `bench ARGS...` the bench example
  bench) if [ $# -gt 1 ]; then example=bench; shift; fi ;;
  example) example=${2:-}; shift 2 || shift ;;
  *) example=$mode; shift ;;
esac
: >"$SUMMARY"
if [ -n "$example" ]; then
  # one example binary, no time limit of its own
  say "example $example $*; OUT=$OUT"
  unpack
  step_libs
  if [ ! -x "$BIN/examples/$example" ]; then
    echo "run.sh: no example '$example' packed (have: $(cd "$BIN/examples" && echo *)); modes: all tests sanitize bench libs" >&2
    exit 2
  fi
  "$BIN/examples/$example" "$@" 2>&1 | tee "$OUT/$example.log"
  exit "${PIPESTATUS[0]}"
fi
say "mode $mode; OUT=$OUT; budget ${GPU_RUN_BUDGET_S}s"
if [ "$mode" = libs ]; then step_libs; exit $?; fi

unpack
step_libs
if [ "$mode" = all ] || [ "$mode" = tests ]; then run_step facts "$T_FACTS" plain bash "$SELF" __facts; fi
case $mode in
  all) steps_tests; steps_sanitize; steps_bench ;;
  tests) steps_tests ;;
  sanitize) steps_sanitize ;;
  bench) steps_bench ;;
esac

echo
say "summary ($SUMMARY):"
cat "$SUMMARY"
if grep -qi 'skip' "$OUT"/tests-*.log "$OUT"/sanitize-*.log 2>/dev/null; then
  echo "WARNING: a test log printed 'skip': $(grep -li 'skip' "$OUT"/tests-*.log "$OUT"/sanitize-*.log 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
fi
if [ "$FAILED" -ne 0 ]; then say "FAILED: at least one step failed (see above)"; exit 1; fi
say "all steps passed"
