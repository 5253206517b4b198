#!/usr/bin/env bash
# SASS instruction budget of the kernels' steady-state loops: compiles every kernels/*.cu for
# sm_90 (the H200 the crate is measured on) as build.rs does, disassembles the cubins with
# nvdisasm, finds each kernel's loops and fails when a vectorized element loop issues more
# instructions per element than its budget. Also fails on any local memory: a ptxas spill or
# stack frame, or an LDL / STL instruction in the SASS (named by function). No GPU needed; nvcc,
# ptxas and nvdisasm come from .ci/cuda-toolkit.sh (pinned wheels from PyPI, or your NVCC=...).
#
#   .ci/sass-budget.sh                        # sm_90, fails over budget
#   SASS_BUDGET_REPORT_ONLY=1 .ci/sass-budget.sh   # the table only; still fails on local memory
#   SASS_BUDGET_DEFAULT=12 .ci/sass-budget.sh # default budget per 2-byte element (see below)
#   ARCHS="80 90" .ci/sass-budget.sh          # also sm_80 (same budgets)
#   SASS_BUDGET_VERBOSE=1 .ci/sass-budget.sh  # every loop, and each vector loop's opcodes
#   KEEP=/tmp/sass .ci/sass-budget.sh         # keep .ptx / .cubin / .sass / ptxas logs there
# Addresses in the table are those of `nvdisasm -c <cubin>` (the .sass files with KEEP).
#
# The heuristic (static, from the SASS text; self-calibrating under compiler unrolling):
# - Kernels: every code section (.text.<name>) of the cubins, with the device subroutines that
#   ptxas placed in it (CALL.REL targets such as the division slow paths, named in the table
#   when a loop lies in one). The element type T comes from the kernel's name:
#   the first of the tokens f32 / f64 / f16 / bf16 among its `_`-separated parts (4 / 8 / 2 /
#   2 bytes); `ms_fused_identity_bf16` is bf16. A name without one is reported, never budgeted.
# - Loops: the natural loops of the control-flow graph. Basic blocks end at a branch (BRA with
#   any modifiers, BRA.U / BRA.DIV / BRA with a predicate operand or an @P guard also fall
#   through; BRX jump tables go to their BRANCH_TARGETS), EXIT, RET; CALL.REL returns. A branch
#   to a block that dominates it is a back edge (predicated or not); the loop is its header plus
#   every block that reaches the back edge without passing the header; back edges to one header
#   make one loop. A plain "backward branch = loop" rule over address ranges does not work on
#   this SASS: ptxas lays rare paths (the division slow path, other runtime modes) out after the
#   kernel's main body and branches back from them, which looks like dozens of overlapping
#   "loops"; with dominators those blocks are (rightly) part of the loop they return to. The
#   `BRA self` trap after the last EXIT is unreachable, so no loop.
# - Each 128-bit (or 256-bit) memory access (LDG / LDS / LD / STG / STS / ST with a .128 /
#   .256 width: LDG.E.128, LDG.E.128.CONSTANT, LDS.128, STG.E.128, STS.128...) belongs to the
#   innermost loop around it. A loop that holds one directly, and has no loop nested in it that
#   holds one, is a steady-state (vectorized element) loop and is budgeted. The others are
#   listed, not budgeted: "outer" (a row loop around the element loop; it may hold a peeled
#   vector iteration) and "scalar" (scalar tails and element loops, reductions; for those with
#   loads of exactly sizeof(T) bytes the table gives instructions per such load, as
#   information; loops with neither, e.g. in math code, are counted in one line, listed with
#   SASS_BUDGET_VERBOSE=1).
# - Elements per iteration = (128-bit loads from global or shared in the body) × 16 / sizeof(T);
#   a loop with no vector load but vector stores counts its stores instead. If ptxas unrolls the
#   loop 4×, body and loads grow together and the ratio stays the same.
# - Instructions in the body = every non-NOP instruction in the loop's blocks (BSSY / BSYNC /
#   WARPSYNC issue, so they count), less those of the loops nested in it (shown apart), and
#   none of the subroutines it CALLs. This is a static count: every runtime-selected path of
#   the body (a transform switch, an optional weight load, the skipped target element) adds to
#   it although one iteration takes one path, so it is an upper bound on what an iteration
#   issues, and a body with many runtime modes reads high (no path through the SASS is a
#   reliable stand-in for the common case: the cheapest one skips every element as "the
#   target", and the fall-through one runs almost every mode). Instructions per element = that
#   count / elements per iteration.
#
# Budgets (instructions per element, in the steady-state loop):
# At H200 copy speed, 4.3 TB/s, a bf16 element that is read once and written once moves 4 bytes:
# at most 4.3e12 / 4 = 1.075e12 elements/s. The GPU issues 132 SMs × 4 schedulers × ~1.98 GHz
# ≈ 1.045e12 warp-instructions/s = 33.4e12 thread-instructions/s, i.e. ~31 thread-instructions
# per element if every issue slot of the whole kernel went to it. A loop that reads once and
# writes once must stay well under that (latency hiding, address math outside the loop, the
# other kernels of the op): the issue asks ~15 per element for a bf16 read at copy speed, with a
# target of 8–12 in the inner loop. So the default is SASS_BUDGET_DEFAULT=15 per 2-byte element,
# scaled by sizeof(T) / 2 for the wider types (30 for f32, 60 for f64: at copy speed they move
# proportionally fewer elements per second, so each element may take proportionally more
# instructions). Per-kernel budgets: the table below.
set -euo pipefail

cd "$(dirname "$0")/.."

# Per-kernel budgets: "<glob on the kernel name> <max instructions per element | off>", first
# match wins, absolute (not scaled by the type). Kernels that match none get the default
# (SASS_BUDGET_DEFAULT × sizeof(T) / 2). "off" lists the kernel's loops without budgeting them.
# Examples:
#   "ms_backward_*_bf16 12"
#   "ms_fused_*_f64 off"
budgets=(
    # The finalize kernels merge each row's partials (an f64 pair per 128-bit load): not an
    # element loop, whatever the heuristic counts.
    "ms_forward_finalize_* off"
    # f64: the exponential and the margin math run in DFMA-based routines (~25 instructions per
    # exp); no GPU reads f64 at copy speed through them. A regression gate, not a roofline.
    "ms_*_f64 160"
    # `_ext` loops (label smoothing, the row scale's gradient, soft-capping possible): sum exp*v
    # and sum w*v per element in the forward, k*w in the backward; soft-capped vectors leave
    # the loop. 2-byte budgets; f32 has twice the time per element.
    "ms_*_identity_ext_*f16 27"
    "ms_*_cosine_ext_*f16 30"
    "ms_*_rbf_ext_*f16 31"
    "ms_*_ext_f32 40"
    # The cosine heads clamp (and the backward multiplies by the clamp's 0/1 derivative); RBF
    # evaluates a second exponential per element.
    "ms_*_cosine_*f16 20"
    "ms_*_rbf_*f16 21"
)

default_budget="${SASS_BUDGET_DEFAULT:-15}"
report_only="${SASS_BUDGET_REPORT_ONLY:-0}"
verbose="${SASS_BUDGET_VERBOSE:-0}"
# The flags of build.rs (NVCC_FLAGS there) and the ptxas of .ci/cuda-kernels.sh.
nvcc_flags=(-O3 -std=c++17 -I kernels)
read -r -a archs <<<"${ARCHS:-90}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if ! [[ "$default_budget" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "sass-budget.sh: SASS_BUDGET_DEFAULT=$default_budget is not a number" >&2
    exit 2
fi

shopt -s nullglob
sources=(kernels/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "sass-budget.sh: no kernels/*.cu: nothing to check"
    exit 0
fi

# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh
# nvdisasm ships next to nvcc in a CUDA toolkit; cuda-toolkit.sh installs it from its own wheel.
# (cuobjdump -sass would need nvdisasm too: it calls it.)
nvdisasm="${NVDISASM:-}"
if [ -z "$nvdisasm" ]; then
    if [ -x "$CUDA_HOME/bin/nvdisasm" ]; then
        nvdisasm="$CUDA_HOME/bin/nvdisasm"
    else
        nvdisasm="$(command -v nvdisasm || true)"
    fi
fi
if [ -z "$nvdisasm" ] || ! "$nvdisasm" --version >/dev/null 2>&1; then
    echo "sass-budget.sh: nvdisasm (the SASS disassembler) was not found" \
        "${NVDISASM:+at NVDISASM=$NVDISASM }(looked in $CUDA_HOME/bin and on PATH). The pinned" \
        "toolkit of .ci/cuda-toolkit.sh includes it (wheel nvidia-cuda-nvdisasm); with your own" \
        "toolkit (NVCC=...) set NVDISASM=/path/to/nvdisasm." >&2
    exit 2
fi

if [ -n "${KEEP:-}" ]; then
    work="$KEEP"
    mkdir -p "$work"
    # A kept folder may hold a previous run's files, of sources since removed: the analysis
    # reads every $work/*.sm_<arch>.sass.
    rm -f "$work"/*.sm_*.sass "$work"/*.sm_*.sass.tmp "$work"/*.sm_*.ptxas.log
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi

"$NVCC" --version | tail -n 1
echo "ptxas: $(command -v ptxas); nvdisasm: $nvdisasm ($("$nvdisasm" --version | tail -n 1))"
echo "kernels: ${sources[*]}; architectures: ${archs[*]/#/sm_}; $jobs jobs"

# One job: source × architecture → PTX (as build.rs) → cubin (ptxas -v, as cuda-kernels.sh) →
# SASS; everything goes to $work/<stem>.sm_<arch>.*.
compile_one() {
    local src="$1" arch="$2"
    local base
    base="$work/$(basename "$src" .cu).sm_$arch"
    rm -f "$base.sass"
    if ! "$NVCC" --ptx "-arch=sm_$arch" "${nvcc_flags[@]}" -o "$base.ptx" "$src" \
        >"$base.nvcc.log" 2>&1; then
        echo "nvcc failed" >>"$base.nvcc.log"
        return 1
    fi
    ptxas "-arch=sm_$arch" -O3 -v -o "$base.cubin" "$base.ptx" >"$base.ptxas.log" 2>&1 || return 1
    "$nvdisasm" -c "$base.cubin" >"$base.sass.tmp" 2>"$base.nvdisasm.log" || return 1
    mv "$base.sass.tmp" "$base.sass"
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
echo "compiled and disassembled in $((SECONDS - start)) s"
if [ "$failed" -ne 0 ]; then
    for log in "$work"/*.nvcc.log "$work"/*.ptxas.log "$work"/*.nvdisasm.log; do
        if grep -q -i -E 'error|fail' "$log"; then
            printf '\n---- %s ----\n' "$(basename "$log")"
            cat "$log"
        fi
    done
    echo "sass-budget.sh: compile or disassembly errors (above)" >&2
    exit 1
fi

# The analysis: python3 (stdlib only) reads $work/*.sm_<arch>.{sass,ptxas.log}.
budget_file="$work/budgets.txt"
if [ ${#budgets[@]} -gt 0 ]; then
    printf '%s\n' "${budgets[@]}" >"$budget_file"
else
    : >"$budget_file"
fi
python3 - "$work" "$budget_file" "$default_budget" "$report_only" "$verbose" "${archs[@]}" <<'PY'
import collections
import fnmatch
import glob
import os
import re
import sys

work, budget_file, default_budget, report_only, verbose = sys.argv[1:6]
archs = sys.argv[6:]
default_budget = float(default_budget)
report_only = report_only not in ("", "0")
verbose = verbose not in ("", "0")

DTYPE_BYTES = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2}

budgets = []
for line in open(budget_file):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    parts = line.split()
    if len(parts) != 2 or not (parts[1] == "off" or re.fullmatch(r"[0-9]+(\.[0-9]+)?", parts[1])):
        sys.exit(f"sass-budget.sh: bad budget entry {line!r}: want '<glob> <number|off>'")
    budgets.append((parts[0], None if parts[1] == "off" else float(parts[1])))


def dtype_of(name):
    for part in name.split("_"):
        if part in DTYPE_BYTES:
            return part
    return None


def budget_of(name, dtype):
    """(budget or None, where it came from)."""
    for pattern, value in budgets:
        if fnmatch.fnmatchcase(name, pattern):
            return value, pattern
    if dtype is None:
        return None, "no dtype in name"
    return default_budget * DTYPE_BYTES[dtype] / 2, "default"


# nvdisasm -c (one .section per kernel; subroutines, labels and branch targets by name):
#         .section        .text.ms_backward_bf16,"ax",@progbits
#         .type           $__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath,@function
#   .L_x_71:
#         /*0160*/                   @!P0 BRA `(.L_x_1) ;
SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
SUBROUTINE = re.compile(r"^\s*\.type\s+([^,\s]+)\s*,\s*@function")
LABEL = re.compile(r"^([^\s/:][^\s:]*):\s*$")
INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
TARGET = re.compile(r"`\(([^)]+)\)")
BRANCH_TARGETS = re.compile(r'BRANCH_TARGETS ([^"]+)"')
# Instructions that end a basic block (a CALL returns to the next one).
TERMINATORS = {"BRA", "JMP", "BRX", "BRXU", "JMX", "JMXU", "EXIT", "RET", "KILL", "BPT"}
VECTOR_BASES = {"LDG", "LDS", "LD", "STG", "STS", "ST"}
LOAD_BASES = {"LDG", "LDS", "LD"}


class Function:
    def __init__(self, name):
        self.name = name
        self.insns = []  # (address, predicate, opcode, operands, [target addresses])
        self.labels = {}
        self.subroutines = []  # (start address, name)


def parse_sass(path):
    funcs = collections.OrderedDict()
    cur = None
    pending = []
    raw = []
    for line in open(path, errors="replace"):
        m = SECTION.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            pending = []
            continue
        if cur is None:
            continue
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSN.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for label in pending:
            cur.labels[label] = addr
            if label.startswith("$"):
                cur.subroutines.append((addr, label))
        pending = []
        text = m.group(2)
        pred = ""
        pm = PRED.match(text)
        if pm:
            pred = pm.group(0).strip()
            text = text[pm.end():]
        op, _, operands = text.partition(" ")
        raw.append((cur, addr, pred, op, operands.strip()))
    for f, addr, pred, op, operands in raw:
        names = TARGET.findall(operands)
        bt = BRANCH_TARGETS.search(operands)
        if bt:
            names += [n.strip() for n in bt.group(1).split(",")]
        f.insns.append((addr, pred, op, operands, [f.labels[n] for n in names if n in f.labels]))
    return funcs


def subroutine_at(func, addr):
    """The device subroutine of func holding addr, or None (the kernel itself)."""
    name = None
    for start, sub in func.subroutines:
        if start <= addr:
            name = sub
    return name


def mem_width(op):
    """Bytes of a LDG/LDS/LD/STG/STS/ST access from its modifiers (None: not one)."""
    parts = op.split(".")
    if parts[0] not in VECTOR_BASES:
        return None
    width = 4
    for p in parts[1:]:
        if p in ("U8", "S8"):
            width = 1
        elif p in ("U16", "S16"):
            width = 2
        elif p in ("64", "128", "256"):
            width = int(p) // 8
    return width


def counts(op):
    return op != "NOP" and not op.startswith("NOP.")


class Block:
    def __init__(self, index, insns):
        self.index = index
        self.insns = insns
        self.addr = insns[0][0]
        self.n = sum(1 for i in insns if counts(i[2]))
        self.succs = []
        self.preds = []


def build_cfg(func):
    """Basic blocks of func with successor / predecessor lists, and the roots (the kernel's entry
    and each device subroutine, reached by CALL)."""
    insns = func.insns
    if not insns:
        return [], []
    index_of = {i[0]: k for k, i in enumerate(insns)}
    leaders = {0}
    for k, (addr, pred, op, operands, targets) in enumerate(insns):
        base = op.split(".")[0]
        for t in targets:
            if base != "CALL" and t in index_of:
                leaders.add(index_of[t])
        if base in TERMINATORS and k + 1 < len(insns):
            leaders.add(k + 1)
    for start, _name in func.subroutines:
        if start in index_of:
            leaders.add(index_of[start])
    starts = sorted(leaders)
    blocks = []
    block_at = {}
    for n, s in enumerate(starts):
        e = starts[n + 1] if n + 1 < len(starts) else len(insns)
        b = Block(n, insns[s:e])
        blocks.append(b)
        block_at[b.addr] = b
    for n, b in enumerate(blocks):
        addr, pred, op, operands, targets = b.insns[-1]
        base = op.split(".")[0]
        nxt = blocks[n + 1] if n + 1 < len(blocks) else None
        predicated = pred not in ("", "@PT")
        succ = []
        if base in ("BRA", "JMP", "BRX", "BRXU", "JMX", "JMXU"):
            succ = [block_at[t] for t in targets if t in block_at]
            # Conditional: a guard predicate, or one among the operands (BRA.U !UP0, BRA.DIV UR4,
            # BRA !P1: anything before the target).
            before_target = operands.split("`", 1)[0].strip()
            if predicated or (base in ("BRA", "JMP") and before_target) or not succ:
                succ.append(nxt)
        elif base in ("EXIT", "RET", "KILL", "BPT"):
            if predicated:
                succ.append(nxt)
        else:
            succ.append(nxt)
        for s in succ:
            if s is not None and s not in b.succs:
                b.succs.append(s)
                s.preds.append(b)
    roots = [blocks[0]] + [block_at[a] for a, _ in func.subroutines if a in block_at]
    return blocks, roots


def dominators(blocks, roots):
    """Immediate dominators (Cooper, Harvey, Kennedy) below a virtual root above `roots`."""
    order = []
    seen = set()
    for r in roots:
        if r.index in seen:
            continue
        stack = [(r, iter(r.succs))]
        seen.add(r.index)
        while stack:
            b, it = stack[-1]
            for s in it:
                if s.index not in seen:
                    seen.add(s.index)
                    stack.append((s, iter(s.succs)))
                    break
            else:
                order.append(b)
                stack.pop()
    rpo = list(reversed(order))
    num = {b.index: k + 1 for k, b in enumerate(rpo)}
    num[-1] = 0  # the virtual root
    idom = {b.index: None for b in rpo}
    root_set = {r.index for r in roots}
    for r in root_set:
        idom[r] = -1

    def intersect(a, b):
        while a != b:
            while num[a] > num[b]:
                a = idom[a]
            while num[b] > num[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo:
            if b.index in root_set:
                continue
            new = None
            for p in b.preds:
                if p.index in idom and idom[p.index] is not None:
                    new = p.index if new is None else intersect(p.index, new)
            if new is not None and idom[b.index] != new:
                idom[b.index] = new
                changed = True
    return idom


def dominates(idom, h, s):
    while s is not None and s != -1:
        if s == h:
            return True
        s = idom.get(s)
    return False


class Loop:
    def __init__(self, header):
        self.header = header
        self.body = {header.index}
        self.latches = set()
        self.parent = None
        self.children = []


def find_loops(blocks, roots):
    """Natural loops: an edge s -> h whose target h dominates s is a back edge; the loop of h is
    h plus every block that reaches such an s without passing h (back edges to one header make
    one loop). Code that a loop branches out to and back from (a cold path laid out after the
    kernel) belongs to it; code reached by CALL does not."""
    idom = dominators(blocks, roots)
    loops = {}
    for b in blocks:
        if b.index not in idom:
            continue  # unreachable
        for h in b.succs:
            if dominates(idom, h.index, b.index):
                loop = loops.setdefault(h.index, Loop(h))
                loop.latches.add(b.index)
                stack = [b]
                while stack:
                    x = stack.pop()
                    if x.index in loop.body:
                        continue
                    loop.body.add(x.index)
                    stack.extend(x.preds)
    result = sorted(loops.values(), key=lambda l: l.header.addr)
    for l in result:
        holders = [o for o in result if o is not l and l.header.index in o.body and len(o.body) > len(l.body)]
        if holders:
            l.parent = min(holders, key=lambda o: len(o.body))
            l.parent.children.append(l)
    return result


def descendants(loop):
    out = []
    for c in loop.children:
        out.append(c)
        out.extend(descendants(c))
    return out


def analyse(kernel, func):
    dtype = dtype_of(kernel)
    tbytes = DTYPE_BYTES.get(dtype)
    blocks, roots = build_cfg(func)
    loops = find_loops(blocks, roots)
    rows = []
    vector_in = {}  # loop header -> whether a 128-bit access lies in its own blocks
    for loop in loops:
        nested = set()
        for c in descendants(loop):
            nested |= c.body
        own = loop.body - nested
        own_n = sum(blocks[i].n for i in own)
        nested_n = sum(blocks[i].n for i in nested)
        ld = st = scalar_ld = 0
        hist = collections.Counter()
        vec_ld_blocks, vec_st_blocks = {}, {}
        for i in own:
            for _addr, _pred, op, _operands, _t in blocks[i].insns:
                if not counts(op):
                    continue
                hist[op] += 1
                w = mem_width(op)
                if w is None:
                    continue
                base = op.split(".")[0]
                if w >= 16:
                    if base in LOAD_BASES:
                        ld += w // 16
                        vec_ld_blocks[i] = vec_ld_blocks.get(i, 0) + w // 16
                    else:
                        st += w // 16
                        vec_st_blocks[i] = vec_st_blocks.get(i, 0) + w // 16
                elif base in LOAD_BASES and tbytes is not None and w == tbytes:
                    scalar_ld += 1
        vec_blocks = vec_ld_blocks or vec_st_blocks
        addrs = [blocks[i].addr for i in loop.body]
        last = max((blocks[i].insns[-1][0] for i in loop.body))
        depth = 0
        p = loop.parent
        while p is not None:
            depth += 1
            p = p.parent
        vector_in[loop.header.index] = bool(vec_blocks)
        rows.append(dict(loop=loop, start=min(addrs), end=last, header=loop.header.addr, n=own_n, nested=nested_n,
                         ld=ld, st=st, scalar_ld=scalar_ld, hist=hist, depth=depth))
    for r in rows:
        # Innermost: a loop around a vectorized loop (the row loop, which may hold a peeled
        # first vector iteration) is not itself a steady-state loop.
        r["outer"] = any(vector_in[d.header.index] for d in descendants(r["loop"]))
    return dtype, tbytes, rows


# ptxas -v (as in cuda-kernels.sh):
#   ptxas info    : Function properties for ms_fused_f32
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
def ptxas_local_memory(path):
    bad = []
    fn = None
    for line in open(path, errors="replace"):
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        if "bytes stack frame" in line and fn:
            nums = dict((k, int(v)) for v, k in re.findall(r"(\d+) bytes (stack frame|spill stores|spill loads)", line))
            if any(nums.values()):
                bad.append((fn, nums))
            fn = None
    return bad


failures = []
local_failures = []
for arch in archs:
    parsed = []
    for sass in sorted(glob.glob(os.path.join(work, f"*.sm_{arch}.sass"))):
        stem = os.path.basename(sass)[: -len(f".sm_{arch}.sass")]
        log = os.path.join(work, f"{stem}.sm_{arch}.ptxas.log")
        for fn, nums in ptxas_local_memory(log):
            local_failures.append(f"sm_{arch} {stem}.cu: ptxas: {fn}: " + ", ".join(f"{v} bytes {k}" for k, v in nums.items()))
        parsed.extend((stem, kernel, func) for kernel, func in parse_sass(sass).items())
    kw = max([28] + [len(k) for _s, k, _f in parsed])
    print(f"\n==== sm_{arch}: loops per kernel (addresses as in nvdisasm -c) ====")
    print(f"{'kernel':{kw}} {'loop':17} {'d':>1} {'instr':>5} {'nest':>5} {'ld128':>5} {'st128':>5} "
          f"{'elem/it':>7} {'instr/elem':>10} {'budget':>6}  verdict")
    budgeted = 0
    no_vector = []
    if True:
        for stem, kernel, func in parsed:
            ldl = [(a, op) for a, _p, op, _o, _t in func.insns if op.split(".")[0] in ("LDL", "STL")]
            if ldl:
                subs = sorted({subroutine_at(func, a) or kernel for a, _op in ldl})
                where = ", ".join(f"{op}@{a:#06x}" for a, op in ldl[:6]) + (" ..." if len(ldl) > 6 else "")
                local_failures.append(f"sm_{arch} {stem}.cu: SASS of {kernel}: {len(ldl)} local-memory instructions"
                                      f" in {', '.join(subs)} ({where})")
            dtype, tbytes, rows = analyse(kernel, func)
            budget, origin = budget_of(kernel, dtype)
            if not rows:
                print(f"{kernel:{kw}} {'(no loop)':17}")
            has_vector = False
            quiet = 0
            for r in rows:
                loop = f"{r['start']:#06x}-{r['end']:#06x}"
                vec = r["ld"] if r["ld"] else r["st"]
                cols = dict(elem="-", ipe="-", budget="-")
                if vec and r["outer"]:
                    verdict = "outer: holds a vectorized loop, not budgeted"
                elif vec and tbytes:
                    has_vector = True
                    elems = vec * 16 // tbytes
                    ipe = r["n"] / elems
                    cols.update(elem=str(elems), ipe=f"{ipe:.1f}")
                    if budget is None:
                        verdict = f"not budgeted ({origin})"
                        cols["budget"] = "off"
                    else:
                        budgeted += 1
                        cols["budget"] = f"{budget:g}"
                        if ipe > budget:
                            verdict = "OVER BUDGET"
                            failures.append(f"sm_{arch} {kernel} loop {loop}: {ipe:.1f} instructions/element"
                                            f" > budget {budget:g} ({origin})")
                        else:
                            verdict = "ok"
                elif vec:
                    verdict = "vector, no dtype in the name: not budgeted"
                else:
                    if r["scalar_ld"]:
                        cols.update(elem=f"({r['scalar_ld']})", ipe=f"({r['n'] / r['scalar_ld']:.1f})")
                    elif not verbose:
                        quiet += 1
                        continue
                    verdict = "scalar: not budgeted"
                sub = subroutine_at(func, r["header"])
                if sub:
                    verdict += f" (in {sub})"
                print(f"{kernel:{kw}} {loop:17} {r['depth']:>1} {r['n']:>5} {r['nested']:>5} {r['ld']:>5} {r['st']:>5} "
                      f"{cols['elem']:>7} {cols['ipe']:>10} {cols['budget']:>6}  {verdict}")
                if verbose and vec:
                    mix = ", ".join(f"{op} {n}" for op, n in r["hist"].most_common())
                    print(f"{'':8}opcodes: {mix}")
            if quiet:
                print(f"{kernel:{kw}} {'':17} + {quiet} loop(s) with no element-sized or 128-bit access"
                      " (reductions, math): not budgeted, listed with SASS_BUDGET_VERBOSE=1")
            if not has_vector and dtype:
                no_vector.append(kernel)
    print(f"\nsm_{arch}: {budgeted} budgeted loop(s); kernels with no 128-bit loop (nothing budgeted): "
          + (", ".join(no_vector) if no_vector else "none"))

print("\nloop: lowest and highest address of its blocks; d: loops around it; instr: non-NOP instructions"
      "\nin its blocks less those of the loops nested in it (nest); elem/it: 128-bit loads (else stores)"
      "\nx 16 / sizeof(T), in parentheses for a scalar loop its loads of sizeof(T) bytes (information).")
sys.stdout.flush()

status = 0
if local_failures:
    print("\nsass-budget.sh: local memory (spills, stack frame or LDL/STL) in:", file=sys.stderr)
    for f in local_failures:
        print("  " + f, file=sys.stderr)
    status = 1
if failures:
    print("\nsass-budget.sh: steady-state loops over their instruction budget:", file=sys.stderr)
    for f in failures:
        print("  " + f, file=sys.stderr)
    if report_only:
        print("(SASS_BUDGET_REPORT_ONLY=1: not failing on budget)", file=sys.stderr)
    else:
        print("Budgets: SASS_BUDGET_DEFAULT (per 2-byte element) or the table at the top of .ci/sass-budget.sh;"
              " SASS_BUDGET_REPORT_ONLY=1 reports without failing.", file=sys.stderr)
        status = 1
if status == 0 and failures:
    print("\nsass-budget.sh: no local memory; loops over budget (above) not failing: SASS_BUDGET_REPORT_ONLY=1")
elif status == 0:
    print("\nsass-budget.sh: every budgeted loop within budget, no local memory")
sys.exit(status)
PY
