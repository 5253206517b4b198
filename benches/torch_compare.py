#!/usr/bin/env python3
"""The crate's CUDA kernels against PyTorch (eager and torch.compile) and Liger-Kernel.

One timed unit is one full training step of the loss: logits [B, C] -> (scalar mean loss,
d(loss)/d(logits) [B, C] in the logits' dtype). For the crate ("ours") that is what
`MarginSoftmaxLoss::loss_and_grad` launches on a GPU (src/cuda.rs): `ms_fused_<T>` when a row
fits in shared memory (C * sizeof(T) <= 47104 bytes), else `ms_forward_partial_<T>` ->
`ms_forward_finalize_<T>` (row info and d(loss)/d(scale) for the backward, the mean's 1/N folded
in) -> `ms_backward_<T>`, plus the mean over the per-row losses. The kernels are compiled here from
kernels/*.cu with nvcc (the flags of build.rs) and launched through CuPy on PyTorch's current
stream, with torch tensors' device pointers and a byte-for-byte copy of `struct MsParams`
(kernels/params.cuh) built with ctypes.

Providers, per problem:
  ce        softmax cross-entropy:        ours, eager F.cross_entropy, torch.compile, Liger
  ce_ls     the same, label smoothing 0.1: ours, eager, torch.compile, Liger
  arcface   ArcFace s=64, m=0.5:          ours (margin detached in backward, as arcface_torch),
                                          ours-exact (the exact margin derivative), eager
                                          InsightFace arcface_torch, torch.compile of it

Each provider's loss and gradient are first checked against a float64 reference computed with
torch on the GPU (row chunks over the whole tensor); a provider that disagrees beyond the
tolerances (TOLERANCES below) is skipped, loudly. Timing is `triton.testing.do_bench` (median,
p20, p80), rotating among several pre-generated random inputs.

Usage (on a GPU machine with PyTorch, Triton, CuPy and nvcc):
  python benches/torch_compare.py [--shapes 8192x32000 ...] [--dtypes bf16 f16 f32] [--quick]
Without a GPU (no torch, cupy or numpy needed; uses gcc/g++ and nvcc when found):
  python benches/torch_compare.py --selftest-params
See benches/README_torch.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "kernels"
KERNEL_SOURCES = ("forward", "backward", "fused")

# ----------------------------------------------------------------------------------------------
# The kernel ABI: kernels/params.cuh, mirrored field for field (as src/kernel_params.rs does).
# ----------------------------------------------------------------------------------------------

MS_MAX_SPHERE_M = 16
TRANSFORM_IDENTITY, TRANSFORM_COSINE, TRANSFORM_RBF = 0, 1, 2
MARGIN_NONE, MARGIN_ADDITIVE, MARGIN_ANGULAR, MARGIN_SPHERE = 0, 1, 2, 3
STAT_COLUMNS = 8  # MS_STAT_COLUMNS: loss, max, ln sum, w_y, a, k, g_y, dloss/dscale
STAT_LOSS, STAT_WEIGHT = 0, 3  # src/op.rs
ROWINFO_COLUMNS = 6  # MS_ROWINFO_COLUMNS
PARTIAL_COLUMNS = 5  # MS_PARTIAL_COLUMNS
EXACT_MARGIN_COS_EPS = 1e-5  # src/config.rs
# sin(theta_eps), cos(theta_eps) = 1 - EXACT_MARGIN_COS_EPS: the floor of the exact-mode ArcFace /
# Combined derivative's denominator sin(theta) (src/math.rs exact_sin_floor).
SIN_FLOOR = math.sqrt((1.0 - (1.0 - EXACT_MARGIN_COS_EPS)) * (1.0 + (1.0 - EXACT_MARGIN_COS_EPS)))

_MS_FIELDS = [
    ("rows", ctypes.c_int64),
    ("classes", ctypes.c_int64),
    ("row_stride", ctypes.c_int64),
    ("transform", ctypes.c_int32),
    ("margin", ctypes.c_int32),
    ("exact", ctypes.c_int32),
    ("easy", ctypes.c_int32),
    ("sphere_m", ctypes.c_int32),
    ("n_poly", ctypes.c_int32),
    ("has_weights", ctypes.c_int32),
    ("splits", ctypes.c_int32),
    ("weighted_smoothing", ctypes.c_int32),
    ("softcapped", ctypes.c_int32),
    ("neg_inv_gamma", ctypes.c_double),
    ("additive_m", ctypes.c_double),
    ("m1", ctypes.c_double),
    ("m2", ctypes.c_double),
    ("m3", ctypes.c_double),
    ("fallback_shift", ctypes.c_double),
    ("sin_floor", ctypes.c_double),
    ("lambda", ctypes.c_double),  # a Python keyword: use getattr / setattr
    ("thresholds", ctypes.c_double * MS_MAX_SPHERE_M),
    ("smoothing", ctypes.c_double),
    ("total_weight", ctypes.c_double),
    ("focal_gamma", ctypes.c_double),
    ("z_loss", ctypes.c_double),
    ("softcap", ctypes.c_double),
    ("inv_softcap", ctypes.c_double),
    ("upstream", ctypes.c_double),
]


class MsParams(ctypes.Structure):
    """`struct MsParams` of kernels/params.cuh: 3 int64, 10 int32, 8 float64, float64[16],
    7 float64 = 312 bytes, alignment 8, no padding (checked below, and against the C compiler,
    nvcc's PTX and the device in --selftest-params / the GPU preflight)."""

    _fields_ = _MS_FIELDS


MS_PARAMS_SIZE = 3 * 8 + 10 * 4 + 8 * 8 + MS_MAX_SPHERE_M * 8 + 7 * 8
assert MS_PARAMS_SIZE == 312
assert ctypes.sizeof(MsParams) == MS_PARAMS_SIZE, ctypes.sizeof(MsParams)
assert ctypes.alignment(MsParams) == 8, ctypes.alignment(MsParams)


def ms_field_layout() -> List[Tuple[str, int, int]]:
    """(name, offset, size) of every field, from ctypes."""
    return [(name, getattr(MsParams, name).offset, getattr(MsParams, name).size) for name, _ in _MS_FIELDS]


# The expected offsets, written out (the C layout rules on an LP64 / CUDA target).
EXPECTED_OFFSETS = {
    "rows": 0, "classes": 8, "row_stride": 16, "transform": 24, "margin": 28, "exact": 32,
    "easy": 36, "sphere_m": 40, "n_poly": 44, "has_weights": 48, "splits": 52,
    "weighted_smoothing": 56, "softcapped": 60, "neg_inv_gamma": 64, "additive_m": 72, "m1": 80,
    "m2": 88, "m3": 96, "fallback_shift": 104, "sin_floor": 112, "lambda": 120, "thresholds": 128,
    "smoothing": 256, "total_weight": 264, "focal_gamma": 272, "z_loss": 280, "softcap": 288,
    "inv_softcap": 296, "upstream": 304,
}
assert {n: o for n, o, _ in ms_field_layout()} == EXPECTED_OFFSETS

# The kernels' argument lists ('p': a device pointer, 8 bytes; 'S': MsParams by value), from
# kernels/forward.cu, backward.cu, fused.cu and the launches of src/cuda.rs.
ENTRY_SIGNATURES = {
    # (const T* x, const int* targets, const ACC* scale, const ACC* weights, MsParams p,
    #  ACC* partials)
    "ms_forward_partial": "ppppSp",
    # (x, targets, scale, weights, poly, MsParams p, partials, stats, row_info, grad_scale)
    "ms_forward_finalize": "pppppSpppp",
    # (const T* x, const int* targets, const ACC* row_info, const ACC* weights, MsParams p,
    #  T* grad)
    "ms_backward": "ppppSp",
    # (x, targets, scale, weights, poly, MsParams p, stats, grad, grad_scale)
    "ms_fused": "pppppSppp",
}
ENTRY_MODULE = {
    "ms_forward_partial": "forward",
    "ms_forward_finalize": "forward",
    "ms_backward": "backward",
    "ms_fused": "fused",
}

# Launch constants of src/launch.rs (BLOCK and FINALIZE_BLOCK are MS_BLOCK / MS_FINALIZE_BLOCK of
# kernels/params.cuh: the kernels trap on any other block size).
BLOCK = 256
FINALIZE_BLOCK = 128
MAX_GRID = 65_535
FUSED_SMEM_LIMIT = 48 * 1024
FUSED_STATIC_RESERVE = 2048
SPLIT_TARGET_BLOCKS = 1024
SPLIT_MIN_COLUMNS = 4096
I32_MAX = 2**31 - 1


def div_ceil(a: int, b: int) -> int:
    return -(-a // b)


def split_count(rows: int, classes: int) -> int:
    """clamp(ceil(1024 / B), 1, ceil(C / 4096)), as src/launch.rs."""
    return max(min(div_ceil(SPLIT_TARGET_BLOCKS, max(rows, 1)), div_ceil(classes, SPLIT_MIN_COLUMNS)), 1)


def fused_max_classes(size: int) -> int:
    return (FUSED_SMEM_LIMIT - FUSED_STATIC_RESERVE) // size


assert fused_max_classes(4) == 11_776 and fused_max_classes(2) == 23_552 and fused_max_classes(8) == 5_888


def fused_shared_mem(classes: int, size: int) -> Optional[int]:
    """Dynamic shared memory of ms_fused (round_up(C*size, 16)), or None: the split path."""
    if classes <= fused_max_classes(size):
        return div_ceil(classes * size, 16) * 16
    return None


# ----------------------------------------------------------------------------------------------
# Loss configurations and MsParams::new (src/kernel_params.rs, src/math.rs Margin::new).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadCfg:
    kind: str  # softmax | cosface | arcface | combined | sphereface | rbf
    s: float = 1.0
    m: float = 0.0  # CosFace / ArcFace margin; SphereFace integer m
    m1: float = 1.0  # Combined
    m2: float = 0.0
    m3: float = 0.0
    easy_margin: bool = False  # ArcFace
    lam: float = 0.0  # SphereFace lambda
    gamma: float = 16.0  # RBF


@dataclasses.dataclass(frozen=True)
class LossCfg:
    head: HeadCfg
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    z_loss: float = 0.0
    n_poly: int = 0
    has_weights: bool = False
    margin_grad: str = "exact"  # exact | detached (MarginGrad; the crate's default is Exact)
    softcap: Optional[float] = None  # logit soft-capping cap (None: off)
    total_weight: Optional[float] = None  # sum of the class weights (weights with smoothing)


def make_params(cfg: LossCfg, rows: int, classes: int, row_stride: int, splits: int, upstream: float) -> MsParams:
    """MsParams::new of src/kernel_params.rs, field for field."""
    if min(rows, classes, splits) < 0 or cfg.n_poly < 0:
        raise ValueError("negative size")
    # src/cuda.rs: B and C below 2^31 (targets travel as int32), rows * splits blocks in a grid.
    if max(rows, classes, splits, cfg.n_poly) > I32_MAX or rows * splits > I32_MAX:
        raise ValueError(f"shape ({rows}, {classes}) x {splits} splits is too large for the CUDA kernels")
    h = cfg.head
    if h.kind == "softmax":
        transform, neg_inv_gamma = TRANSFORM_IDENTITY, 0.0
    elif h.kind == "rbf":
        transform, neg_inv_gamma = TRANSFORM_RBF, -1.0 / h.gamma
    elif h.kind in ("cosface", "arcface", "combined", "sphereface"):
        transform, neg_inv_gamma = TRANSFORM_COSINE, 0.0
    else:
        raise ValueError(f"unknown head {h.kind!r}")
    exact = cfg.margin_grad == "exact"
    if cfg.margin_grad not in ("exact", "detached"):
        raise ValueError(f"margin_grad must be exact or detached, got {cfg.margin_grad!r}")
    p = MsParams()
    p.rows, p.classes, p.row_stride = rows, classes, row_stride
    p.transform = transform
    p.margin = MARGIN_NONE
    p.exact = int(exact)
    p.easy = 0
    p.sphere_m = 1
    p.n_poly = cfg.n_poly
    p.has_weights = int(cfg.has_weights)
    p.splits = splits
    weighted = cfg.has_weights and cfg.label_smoothing > 0.0
    if weighted and cfg.total_weight is None:
        raise ValueError("class weights with label smoothing need total_weight (the weights' sum)")
    p.weighted_smoothing = int(weighted)
    p.softcapped = int(cfg.softcap is not None)
    p.neg_inv_gamma = neg_inv_gamma
    p.additive_m = 0.0
    p.m1, p.m2, p.m3 = 1.0, 0.0, 0.0
    p.fallback_shift = 0.0
    p.sin_floor = 0.0
    setattr(p, "lambda", 0.0)
    for j in range(MS_MAX_SPHERE_M):
        p.thresholds[j] = 0.0
    p.smoothing = cfg.label_smoothing
    p.total_weight = cfg.total_weight if weighted else float(classes)
    p.focal_gamma = cfg.focal_gamma
    p.z_loss = cfg.z_loss
    p.softcap = cfg.softcap if cfg.softcap is not None else 0.0
    p.inv_softcap = 1.0 / cfg.softcap if cfg.softcap is not None else 0.0
    p.upstream = upstream

    def angular(m1: float, m2: float, m3: float, easy: bool) -> None:
        p.margin = MARGIN_ANGULAR
        p.m1, p.m2, p.m3 = m1, m2, m3
        p.fallback_shift = m3 + m2 * math.sin(m2)
        p.easy = int(easy)
        p.sin_floor = SIN_FLOOR  # used by the exact mode's derivative only
        p.exact = int(exact)

    if h.kind == "cosface":
        p.margin = MARGIN_ADDITIVE
        p.additive_m = h.m
    elif h.kind == "arcface":
        angular(1.0, h.m, 0.0, h.easy_margin)
    elif h.kind == "combined":
        angular(h.m1, h.m2, h.m3, False)
    elif h.kind == "sphereface":
        m = int(h.m)
        if not 1 <= m <= MS_MAX_SPHERE_M or m != h.m:
            raise ValueError(f"SphereFace m must be an integer in 1..{MS_MAX_SPHERE_M}, got {h.m}")
        p.margin = MARGIN_SPHERE
        p.sphere_m = m
        setattr(p, "lambda", h.lam)
        for j in range(1, m):
            p.thresholds[j] = math.cos(j * math.pi / m)
        p.exact = int(exact)
    return p


def f32_round(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def upstream_mean(n_valid: int, acc_is_f64: bool) -> float:
    """src/cpu.rs upstream_factor for Mean without class weights: 1 / (sum of ones), computed in
    the accumulation type (f32 division == f64 division rounded to f32: innocuous double
    rounding), then widened to f64 for MsParams."""
    if n_valid == 0:
        return 0.0
    return 1.0 / n_valid if acc_is_f64 else f32_round(1.0 / n_valid)


# How the struct is handed to CuPy: "numpy" (a size-1 array, documented) or "cpointer" (a
# cupy.cuda.function.CPointer at a ctypes copy: the fallback the GPU preflight switches to if
# this CuPy rejects the first; the ABI probe then checks the bytes that arrive either way).
PARAM_PASSING = ["numpy"]
_KEEPALIVE: List[object] = []


def params_kernel_arg(p: MsParams):
    """The struct as a CuPy kernel argument: a NumPy array of size one holding its bytes.

    CuPy (cupy/cuda/function.pyx, `_pointer`) passes a size-1 numpy.ndarray by value: its data
    pointer goes into cuLaunchKernel's kernelParams, and the driver copies as many bytes as the
    kernel's parameter declares (312 here: `.param .align 8 .b8 ..._param_5[312]` in the PTX).
    This is the documented way to pass a structure (CuPy user guide, "Custom user structures";
    examples/custom_struct/complex_struct.py). A numpy *scalar* (np.void) does not work: CuPy
    stores scalars in a small fixed buffer. The dtype is numpy's view of the ctypes structure
    (same fields, offsets, itemsize 312, alignment 8); the array is freshly allocated (aligned)."""
    if PARAM_PASSING[0] == "cpointer":
        from cupy.cuda import function

        buf = MsParams.from_buffer_copy(bytes(p))
        _KEEPALIVE.append(buf)  # a few per run: the kernels read it at every launch
        return function.CPointer(ctypes.addressof(buf))
    import numpy as np

    dt = np.dtype(MsParams)
    assert dt.itemsize == MS_PARAMS_SIZE, dt.itemsize
    arr = np.zeros(1, dtype=dt)
    arr.view(np.uint8)[:] = np.frombuffer(bytes(p), dtype=np.uint8)
    assert arr.size == 1 and arr.tobytes() == bytes(p)
    return arr


def describe_params(p: MsParams) -> str:
    keys = ["rows", "classes", "row_stride", "transform", "margin", "exact", "easy", "sphere_m", "n_poly",
            "has_weights", "splits", "weighted_smoothing", "softcapped", "neg_inv_gamma", "additive_m", "m1",
            "m2", "m3", "fallback_shift", "sin_floor", "lambda", "smoothing", "total_weight", "focal_gamma",
            "z_loss", "softcap", "inv_softcap", "upstream"]
    parts = [f"{k}={getattr(p, k)!r}" for k in keys]
    th = [p.thresholds[j] for j in range(MS_MAX_SPHERE_M)]
    if any(th):
        parts.append("thresholds=[" + ", ".join(f"{t:.6g}" for t in th) + "]")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# ABI cross-checks that need no GPU: the header's field list, a host C++ compiler, nvcc's PTX.
# ----------------------------------------------------------------------------------------------

# The C type of each ctypes field type (c_int64 is an alias of c_long on LP64: compare objects).
_C_NAMES = {ctypes.c_int64: "long long", ctypes.c_int32: "int", ctypes.c_double: "double"}


def parse_header_fields(path: Path = KERNELS / "params.cuh") -> List[Tuple[str, str, int]]:
    """(name, C type, array length or 0) of `struct MsParams` in params.cuh, in order."""
    text = path.read_text()
    m = re.search(r"struct\s+MsParams\s*\{(.*?)\};", text, re.S)
    if not m:
        raise ValueError(f"no `struct MsParams {{ ... }};` in {path}")
    body = re.sub(r"//[^\n]*", "", m.group(1))
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for stmt in body.split(";"):
        stmt = " ".join(stmt.split())
        if not stmt:
            continue
        for ctype in ("long long", "int", "double"):
            if stmt.startswith(ctype + " "):
                break
        else:
            raise ValueError(f"unexpected field declaration in params.cuh: {stmt!r}")
        for decl in stmt[len(ctype):].split(","):
            decl = decl.strip()
            am = re.fullmatch(r"(\w+)\s*(?:\[\s*(\w+)\s*\])?", decl)
            if not am:
                raise ValueError(f"unexpected declarator in params.cuh: {decl!r}")
            n = am.group(2)
            count = 0
            if n is not None:
                count = MS_MAX_SPHERE_M if n == "MS_MAX_SPHERE_M" else int(n)
            fields.append((am.group(1), ctype, count))
    return fields


def check_header_fields() -> List[str]:
    """Differences between params.cuh's field list and the ctypes mirror (empty: none)."""
    problems = []
    text = (KERNELS / "params.cuh").read_text()
    mm = re.search(r"#define\s+MS_MAX_SPHERE_M\s+(\d+)", text)
    if not mm or int(mm.group(1)) != MS_MAX_SPHERE_M:
        problems.append(f"MS_MAX_SPHERE_M in params.cuh is {mm and mm.group(1)}, the script has {MS_MAX_SPHERE_M}")
    for macro, value in (("MS_TRANSFORM_IDENTITY", TRANSFORM_IDENTITY), ("MS_TRANSFORM_COSINE", TRANSFORM_COSINE),
                         ("MS_TRANSFORM_RBF", TRANSFORM_RBF), ("MS_MARGIN_NONE", MARGIN_NONE),
                         ("MS_MARGIN_ADDITIVE", MARGIN_ADDITIVE), ("MS_MARGIN_ANGULAR", MARGIN_ANGULAR),
                         ("MS_MARGIN_SPHERE", MARGIN_SPHERE), ("MS_STAT_COLUMNS", STAT_COLUMNS),
                         ("MS_ROWINFO_COLUMNS", ROWINFO_COLUMNS), ("MS_PARTIAL_COLUMNS", PARTIAL_COLUMNS)):
        dm = re.search(rf"#define\s+{macro}\s+(\d+)", text)
        if not dm or int(dm.group(1)) != value:
            problems.append(f"{macro} in params.cuh is {dm and dm.group(1)}, the script has {value}")
    header = parse_header_fields()
    ours = []
    for name, ct in _MS_FIELDS:
        if hasattr(ct, "_length_"):
            ours.append((name, _C_NAMES[ct._type_], ct._length_))
        else:
            ours.append((name, _C_NAMES[ct], 0))
    header_norm = [(n, t, c) for n, t, c in header]
    if header_norm != ours:
        problems.append("field list differs:\n  params.cuh: " + repr(header_norm) + "\n  script:     " + repr(ours))
    return problems


def _hex_double(v: float) -> str:
    if not math.isfinite(v):
        raise ValueError("non-finite value in a test config")
    return float(v).hex()


def c_probe_source(configs: List[Tuple[str, MsParams]]) -> str:
    """A host C++ program that prints sizeof / alignof / offsetof of params.cuh's struct and the
    bytes of the same configurations filled field by field in C."""
    lines = [
        "#include <cstddef>",
        "#include <cstdio>",
        "#include <cstring>",
        '#include "params.cuh"',
        "int main() {",
        '    std::printf("size %zu\\n", sizeof(MsParams));',
        '    std::printf("align %zu\\n", alignof(MsParams));',
    ]
    for name, _ in _MS_FIELDS:
        lines.append(f'    std::printf("offset {name} %zu %zu\\n", offsetof(MsParams, {name}), sizeof(((MsParams*)0)->{name}));')
    for label, p in configs:
        lines.append("    {")
        lines.append("        MsParams p;")
        lines.append("        std::memset(&p, 0, sizeof p);")
        for name, ct in _MS_FIELDS:
            v = getattr(p, name)
            if name == "thresholds":
                for j in range(MS_MAX_SPHERE_M):
                    lines.append(f"        p.thresholds[{j}] = {_hex_double(v[j])};")
            elif ct is ctypes.c_double:
                lines.append(f"        p.{name} = {_hex_double(v)};")
            elif ct is ctypes.c_int64:
                lines.append(f"        p.{name} = {int(v)}LL;")
            else:
                lines.append(f"        p.{name} = {int(v)};")
        lines.append('        const unsigned char* b = reinterpret_cast<const unsigned char*>(&p);')
        lines.append(f'        std::printf("bytes {label} ");')
        lines.append('        for (std::size_t i = 0; i < sizeof p; ++i) std::printf("%02x", b[i]);')
        lines.append('        std::printf("\\n");')
        lines.append("    }")
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def find_host_cxx() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def run_c_probe(configs: List[Tuple[str, MsParams]], workdir: Path) -> Tuple[Optional[str], List[str], str]:
    """Compiles and runs the C probe. Returns (compiler or None, problems, its output)."""
    cxx = find_host_cxx()
    if cxx is None:
        return None, [], ""
    src = workdir / "ms_params_probe.cpp"
    exe = workdir / "ms_params_probe"
    src.write_text(c_probe_source(configs))
    cmd = [cxx, "-std=c++17", "-O0", "-Wall", "-I", str(KERNELS), "-o", str(exe), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return cxx, [f"host compile failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}"], ""
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    problems = []
    got = {}
    got_bytes = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "size":
            got["size"] = int(parts[1])
        elif parts[0] == "align":
            got["align"] = int(parts[1])
        elif parts[0] == "offset":
            got[parts[1]] = (int(parts[2]), int(parts[3]))
        elif parts[0] == "bytes":
            got_bytes[parts[1]] = parts[2]
    if got.get("size") != MS_PARAMS_SIZE:
        problems.append(f"C sizeof(MsParams) = {got.get('size')}, ctypes {MS_PARAMS_SIZE}")
    if got.get("align") != 8:
        problems.append(f"C alignof(MsParams) = {got.get('align')}, ctypes 8")
    for name, off, size in ms_field_layout():
        if got.get(name) != (off, size):
            problems.append(f"field {name}: C (offset, size) = {got.get(name)}, ctypes ({off}, {size})")
    for label, p in configs:
        if got_bytes.get(label) != bytes(p).hex():
            problems.append(f"config {label}: the C-filled bytes differ from the ctypes bytes")
    return cxx, problems, out


def find_nvcc(explicit: Optional[str] = None) -> Optional[str]:
    """As build.rs: $NVCC, nvcc on PATH, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc,
    /usr/local/cuda/bin/nvcc."""
    candidates = [explicit, os.environ.get("NVCC")]
    for c in candidates:
        if c:
            w = shutil.which(c) or (c if Path(c).is_file() else None)
            if w:
                return w
            if c is explicit:
                raise FileNotFoundError(f"--nvcc {c} not found")
    w = shutil.which("nvcc")
    if w:
        return w
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return None


def arch_number(arch: str) -> int:
    """"sm_90" -> 90, "sm_90a" -> 90, "sm_100" -> 100 (bf16 kernels need >= 80)."""
    m = re.search(r"\d+", arch)
    return int(m.group()) if m else 0


def nvcc_version(nvcc: str) -> str:
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    m = re.search(r"release [^\n]*", r.stdout)
    return m.group(0) if m else r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"


def nvcc_command(nvcc: str, arch: str, source: Path, out: Path, include: Path = KERNELS) -> List[str]:
    """build.rs's command: --ptx -arch=sm_XX -O3 -std=c++17 -I kernels -o out source."""
    return [nvcc, "--ptx", f"-arch={arch}", "-O3", "-std=c++17", "-I", str(include), "-o", str(out), str(source)]


def compile_ptx(nvcc: str, arch: str, sources: Dict[str, Path], out_dir: Path) -> Dict[str, Path]:
    """Compiles each source to out_dir/<stem>.ptx, in parallel. Raises with nvcc's output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for stem, src in sources.items():
        out = out_dir / f"{stem}.ptx"
        cmd = nvcc_command(nvcc, arch, src, out)
        procs[stem] = (cmd, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result, errors = {}, []
    for stem, (cmd, out, proc) in procs.items():
        text, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"nvcc failed on {stem}: {' '.join(shlex.quote(c) for c in cmd)}\n{text}")
        else:
            if text.strip():
                print(f"  nvcc ({stem}): {text.strip()}")
            result[stem] = out
    if errors:
        raise RuntimeError("\n".join(errors))
    return result


_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)


def ptx_entries(ptx_text: str) -> Dict[str, List[str]]:
    """Each .entry's parameters as 'p' (.u64 / .b64: a pointer) or 'S<size>/<align>' (a by-value
    byte blob), in order."""
    entries = {}
    for m in _ENTRY_RE.finditer(ptx_text):
        params = []
        for decl in m.group(2).split(","):
            decl = " ".join(decl.split())
            if not decl:
                continue
            bm = re.search(r"\.align (\d+) \.b8 \w+\[(\d+)\]", decl)
            if bm:
                params.append(f"S{bm.group(2)}/{bm.group(1)}")
            elif re.search(r"\.(u64|b64|s64)\b", decl):
                params.append("p")
            else:
                params.append("?" + decl)
        entries[m.group(1)] = params
    return entries


def check_ptx_signatures(ptx_paths: Dict[str, Path], suffixes: List[str]) -> List[str]:
    """The PTX's kernel parameter lists against ENTRY_SIGNATURES (MsParams: 312 bytes, align 8)."""
    problems = []
    by_module = {stem: ptx_entries(path.read_text()) for stem, path in ptx_paths.items()}
    for root, sig in ENTRY_SIGNATURES.items():
        want = ["p" if c == "p" else f"S{MS_PARAMS_SIZE}/8" for c in sig]
        for sfx in suffixes:
            name = f"{root}_{sfx}"
            got = by_module.get(ENTRY_MODULE[root], {}).get(name)
            if got is None:
                problems.append(f"{name}: not in {ENTRY_MODULE[root]}.ptx")
            elif got != want:
                problems.append(f"{name}: PTX parameters {got}, the launches pass {want}")
    return problems


# The device-side layout probe, run before the first launch on a GPU: the device compiler's
# sizeof / alignof / offsetof and the bytes the kernel receives.
def device_probe_source() -> str:
    lines = [
        "#include <cstddef>",
        '#include "params.cuh"',
        'extern "C" __global__ void ms_abi_probe(MsParams p, unsigned long long* layout, unsigned char* bytes) {',
        "    if (blockIdx.x != 0 || threadIdx.x != 0) return;",
        "    layout[0] = sizeof(MsParams);",
        "    layout[1] = alignof(MsParams);",
    ]
    for i, (name, _) in enumerate(_MS_FIELDS):
        lines.append(f"    layout[{2 + i}] = offsetof(MsParams, {name});")
    lines += [
        "    const unsigned char* b = reinterpret_cast<const unsigned char*>(&p);",
        "    for (unsigned i = 0; i < sizeof(MsParams); ++i) bytes[i] = b[i];",
        "}",
        "",
    ]
    return "\n".join(lines)


def selftest_configs() -> List[Tuple[str, LossCfg, Tuple[int, int]]]:
    return [
        ("softmax", LossCfg(HeadCfg("softmax", s=1.0)), (8192, 32000)),
        ("softmax_ls0.1", LossCfg(HeadCfg("softmax", s=1.0), label_smoothing=0.1), (4096, 128256)),
        ("arcface_exact", LossCfg(HeadCfg("arcface", s=64.0, m=0.5)), (512, 1_000_000)),
        ("arcface_detached", LossCfg(HeadCfg("arcface", s=64.0, m=0.5), margin_grad="detached"), (1024, 45000)),
        ("arcface_easy", LossCfg(HeadCfg("arcface", s=64.0, m=0.5, easy_margin=True)), (37, 1001)),
        ("combined", LossCfg(HeadCfg("combined", s=64.0, m1=1.0, m2=0.3, m3=0.2)), (256, 8000)),
        ("cosface_focal_poly_z", LossCfg(HeadCfg("cosface", s=64.0, m=0.35), focal_gamma=2.0, z_loss=1e-4,
                                         n_poly=1, has_weights=True, margin_grad="detached"), (64, 50000)),
        ("sphereface_m4", LossCfg(HeadCfg("sphereface", s=30.0, m=4, lam=5.0)), (3, 23552)),
        ("rbf", LossCfg(HeadCfg("rbf", s=35.0, gamma=16.0)), (5, 40001)),
    ]


def selftest_params(args) -> int:
    """--selftest-params: no torch, cupy or GPU. Returns the exit code."""
    failures: List[str] = []
    print(f"MsParams (ctypes): sizeof {ctypes.sizeof(MsParams)}, alignment {ctypes.alignment(MsParams)}")
    print(f"{'field':16} {'offset':>6} {'size':>5}")
    for name, off, size in ms_field_layout():
        print(f"{name:16} {off:6d} {size:5d}")
    hp = check_header_fields()
    print("params.cuh field list and #defines vs the script: " + ("OK" if not hp else "MISMATCH"))
    failures += hp

    built = []
    print("\nconfigurations (path and launch shapes as src/cuda.rs would choose them):")
    for label, cfg, (b, c) in selftest_configs():
        splits = split_count(b, c)
        p = make_params(cfg, b, c, c, splits, upstream_mean(b, acc_is_f64=False))
        raw = bytes(p)
        assert len(raw) == MS_PARAMS_SIZE
        fmts = {ctypes.c_int64: "<q", ctypes.c_int32: "<i", ctypes.c_double: "<d"}
        for name, ct in _MS_FIELDS:
            off = getattr(MsParams, name).offset
            if name == "thresholds":
                got = list(struct.unpack_from("<16d", raw, off))
                want = [p.thresholds[j] for j in range(MS_MAX_SPHERE_M)]
            else:
                got, want = struct.unpack_from(fmts[ct], raw, off)[0], getattr(p, name)
            if got != want:
                failures.append(f"{label}: field {name} reads back {got} at offset {off}, set to {want}")
        paths = []
        for sfx, size in (("bf16", 2), ("f16", 2), ("f32", 4), ("f64", 8)):
            smem = fused_shared_mem(c, size)
            paths.append(f"{sfx}: " + (f"fused smem={smem}" if smem else f"split x{splits}"))
        print(f"  {label:22} B={b:<5} C={c:<8} {len(raw)} bytes sha256={hashlib.sha256(raw).hexdigest()[:16]}  "
              + "; ".join(paths))
        print(f"    {describe_params(p)}")
        built.append((label.replace(".", "_"), p))

    # Spot checks of the values (src/kernel_params.rs / src/math.rs).
    arc = built[2][1]
    exp = dict(transform=TRANSFORM_COSINE, margin=MARGIN_ANGULAR, exact=1, easy=0, m1=1.0, m2=0.5, m3=0.0,
               fallback_shift=0.5 * math.sin(0.5), sin_floor=SIN_FLOOR)
    for k, v in exp.items():
        if getattr(arc, k) != v:
            failures.append(f"arcface_exact.{k} = {getattr(arc, k)}, want {v}")
    if built[3][1].sin_floor != SIN_FLOOR or built[3][1].exact != 0:
        failures.append("arcface_detached: sin_floor must be sin(theta_eps) and exact 0")
    sm = built[0][1]
    if (sm.transform, sm.margin, sm.exact, sm.sin_floor) != (TRANSFORM_IDENTITY, MARGIN_NONE, 1, 0.0):
        failures.append("softmax: transform/margin/exact/sin_floor wrong")
    if (sm.weighted_smoothing, sm.softcapped, sm.total_weight, sm.softcap) != (0, 0, 32000.0, 0.0):
        failures.append("softmax: weighted_smoothing/softcapped/total_weight/softcap wrong")
    if built[8][1].transform != TRANSFORM_RBF or built[8][1].neg_inv_gamma != -1.0 / 16.0:
        failures.append("rbf: transform 2 with neg_inv_gamma = -1/16 expected")
    sph = built[7][1]
    if sph.sphere_m != 4 or [sph.thresholds[j] for j in range(1, 4)] != [math.cos(j * math.pi / 4) for j in range(1, 4)]:
        failures.append("sphereface: m / thresholds wrong")
    if split_count(8192, 32000) != 1 or split_count(512, 1_000_000) != 2 or split_count(1, 1_000_000) != 245:
        failures.append("split_count disagrees with the formula")
    if upstream_mean(1000, False) != float.fromhex("0x1.0624dep-10"):
        failures.append(f"upstream_mean(1000) = {upstream_mean(1000, False).hex()}, want f32(1/1000)")

    # NumPy's view of the structure (what is handed to CuPy).
    try:
        import numpy as np
    except ImportError:
        print("\nnumpy not installed: the kernel-argument array (params_kernel_arg) was not checked")
    else:
        dt = np.dtype(MsParams)
        np_off = {n: dt.fields[n][1] for n in dt.names}
        ok = dt.itemsize == MS_PARAMS_SIZE and dt.alignment == 8 and np_off == EXPECTED_OFFSETS
        for _, p in built:
            a = params_kernel_arg(p)
            ok &= a.size == 1 and a.nbytes == MS_PARAMS_SIZE and a.tobytes() == bytes(p)
            ok &= a.__array_interface__["data"][0] % 8 == 0
        print(f"\nnumpy {np.__version__}: dtype(MsParams) itemsize {dt.itemsize}, alignment {dt.alignment}, "
              f"size-1 argument arrays hold the ctypes bytes: {'OK' if ok else 'MISMATCH'}")
        if not ok:
            failures.append("numpy view of MsParams differs")

    with tempfile.TemporaryDirectory(prefix="ms_selftest_") as tmp:
        tmpd = Path(tmp)
        cxx, cp, out = run_c_probe(built, tmpd)
        if cxx is None:
            print("\nno host C++ compiler (g++ / c++ / clang++): offsetof cross-check skipped")
        else:
            print(f"\nhost C++ check ({cxx}): sizeof/alignof/offsetof of params.cuh's struct and the bytes of "
                  f"{len(built)} configurations filled field by field in C: " + ("OK" if not cp else "MISMATCH"))
            for line in out.splitlines():
                if not line.startswith("bytes"):
                    print("    " + line)
            failures += cp
        nvcc = find_nvcc(args.nvcc)
        if nvcc is None:
            print("\nnvcc not found: PTX signature check skipped")
        else:
            arch = args.arch or "sm_90"
            print(f"\nnvcc {nvcc} ({nvcc_version(nvcc)}): compiling kernels/*.cu for {arch} ...")
            try:
                ptx = compile_ptx(nvcc, arch, {s: KERNELS / f"{s}.cu" for s in KERNEL_SOURCES}, tmpd / "ptx")
                probe_cu = tmpd / "abi_probe.cu"
                probe_cu.write_text(device_probe_source())
                compile_ptx(nvcc, arch, {"abi_probe": probe_cu}, tmpd / "ptx")
                sfx = ["f32", "f64", "f16"] + (["bf16"] if arch_number(arch) >= 80 else [])
                sp = check_ptx_signatures(ptx, sfx)
                print(f"PTX entry signatures ({', '.join(ENTRY_SIGNATURES)} x {sfx}) vs the launches: "
                      + ("OK" if not sp else "MISMATCH"))
                for name, params in sorted(ptx_entries(ptx["fused"].read_text()).items()):
                    print(f"    {name}: {params}")
                failures += sp
            except Exception as e:  # noqa: BLE001
                failures.append(f"nvcc: {e}")
    print()
    if failures:
        print("SELFTEST FAILED:")
        for f in failures:
            print("  - " + f)
        return 1
    print("selftest-params: all checks passed")
    return 0


# ----------------------------------------------------------------------------------------------
# The GPU part (torch, triton, cupy imported lazily).
# ----------------------------------------------------------------------------------------------

DTYPE_INFO = {  # name -> (kernel suffix, element size, accumulation is f64)
    "bf16": ("bf16", 2, False),
    "f16": ("f16", 2, False),
    "f32": ("f32", 4, False),
    "f64": ("f64", 8, True),
}

# Tolerances of the f64 check, per input dtype: the loss's relative error, the gradient's
# normwise relative error ||g - g_ref|| / ||g_ref||, and its largest error relative to the
# largest reference entry max|g - g_ref| / max|g_ref|. The bf16 / f16 ones allow for a gradient
# (and, for PyTorch, a loss) rounded to the input dtype: half an ulp is 2^-9 (bf16), 2^-12 (f16).
TOLERANCES = {
    "bf16": dict(loss=1e-2, grad=1e-2, gmax=3e-2),
    "f16": dict(loss=2e-3, grad=2e-3, gmax=5e-3),
    "f32": dict(loss=1e-4, grad=1e-4, gmax=1e-3),
    "f64": dict(loss=1e-9, grad=1e-9, gmax=1e-8),
}

DEFAULT_SHAPES = ["8192x32000", "4096x128256", "512x1000000", "1024x45000"]
PREFLIGHT_SHAPES = ["37x1001", "3x23552", "2x11777", "64x50000", "5x40001"]
GOAL_COPY_FRACTION = 0.85
GOAL_VS_COMPILE_LIGER = 1.3
GOAL_VS_EAGER_ARCFACE = 8.0
GOAL_CE_SHAPES = [(8192, 32000), (4096, 128256)]


def parse_shape(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*([\d_.eE+]+)\s*[xX*]\s*([\d_.eE+]+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {s!r}: write BxC, e.g. 512x1000000 or 512x1_000_000")

    def num(t: str) -> int:
        v = float(t.replace("_", ""))
        if v != int(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"shape {s!r}: {t} is not a positive integer")
        return int(v)

    return num(m.group(1)), num(m.group(2))


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}[name]


class OursKernels:
    """kernels/*.cu compiled to PTX with nvcc and loaded as CuPy RawModules."""

    def __init__(self, nvcc: str, arch: str, build_dir: Path):
        import cupy

        self.cupy = cupy
        self.arch = arch
        self.nvcc = nvcc
        t0 = time.perf_counter()
        sources = {s: KERNELS / f"{s}.cu" for s in KERNEL_SOURCES}
        probe_cu = build_dir / "abi_probe.cu"
        build_dir.mkdir(parents=True, exist_ok=True)
        probe_cu.write_text(device_probe_source())
        sources["abi_probe"] = probe_cu
        self.ptx = compile_ptx(nvcc, arch, sources, build_dir)
        self.compile_s = time.perf_counter() - t0
        self.command = " ".join(shlex.quote(c) for c in nvcc_command("nvcc", arch, Path("kernels/<name>.cu"),
                                                                       Path("<name>.ptx"), Path("kernels")))
        cap = arch_number(arch)
        self.suffixes = ["f32", "f64", "f16"] + (["bf16"] if cap >= 80 else [])
        problems = check_ptx_signatures({k: v for k, v in self.ptx.items() if k != "abi_probe"}, self.suffixes)
        if problems:
            raise RuntimeError("PTX signatures differ from the launches:\n  " + "\n  ".join(problems))
        self.modules = {stem: cupy.RawModule(path=str(path)) for stem, path in self.ptx.items()}
        self._funcs = {}

    def func(self, root: str, suffix: str):
        key = (root, suffix)
        if key not in self._funcs:
            self._funcs[key] = self.modules[ENTRY_MODULE[root]].get_function(f"{root}_{suffix}")
        return self._funcs[key]

    def static_smem(self, root: str, suffix: str) -> int:
        """CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES (RawKernel.attributes; the shared_size_bytes
        property is deprecated in recent CuPy)."""
        f = self.func(root, suffix)
        try:
            return int(f.attributes["shared_size_bytes"])
        except Exception:  # noqa: BLE001
            v = f.shared_size_bytes
            return int(v() if callable(v) else v)

    def probe_abi(self, p: MsParams) -> List[str]:
        """Runs ms_abi_probe on the device: the device compiler's layout, and the bytes that
        arrive through CuPy's by-value argument passing."""
        import numpy as np
        import torch

        n = 2 + len(_MS_FIELDS)
        layout = torch.zeros(n, dtype=torch.int64, device="cuda")
        received = torch.zeros(MS_PARAMS_SIZE, dtype=torch.uint8, device="cuda")
        f = self.modules["abi_probe"].get_function("ms_abi_probe")
        with on_torch_stream(self.cupy):
            f((1,), (1,), (params_kernel_arg(p), np.uint64(layout.data_ptr()), np.uint64(received.data_ptr())))
        torch.cuda.synchronize()
        lay = layout.cpu().tolist()
        problems = []
        if lay[0] != MS_PARAMS_SIZE or lay[1] != 8:
            problems.append(f"device sizeof/alignof(MsParams) = {lay[0]}/{lay[1]}, ctypes {MS_PARAMS_SIZE}/8")
        for i, (name, off, _) in enumerate(ms_field_layout()):
            if lay[2 + i] != off:
                problems.append(f"device offsetof({name}) = {lay[2 + i]}, ctypes {off}")
        if bytes(received.cpu().tolist()) != bytes(p):
            problems.append("the bytes the kernel received differ from the ctypes bytes")
        return problems


class on_torch_stream:
    """`with on_torch_stream(cupy):` makes CuPy launch on PyTorch's current stream."""

    _cache: Dict[int, object] = {}

    def __init__(self, cupy):
        import torch

        ptr = torch.cuda.current_stream().cuda_stream
        s = on_torch_stream._cache.get(ptr)
        if s is None:
            s = cupy.cuda.ExternalStream(ptr)
            on_torch_stream._cache[ptr] = s
        self.stream = s

    def __enter__(self):
        self.stream.__enter__()
        return self.stream

    def __exit__(self, *exc):
        return self.stream.__exit__(*exc)


class OursStep:
    """One loss_and_grad step through the crate's kernels, launched as src/cuda.rs does.

    Differences from the candle op, stated: the targets are int32 (-1: ignored) prepared once
    outside the step, and the mean's 1/N (`upstream`) is computed once on the host from them;
    the candle op reads the targets back, validates them and uploads them as i32 on every call.
    The step allocates its outputs (stats, gradient, d(loss)/d(scale), split-path scratch) with
    PyTorch's caching allocator and reduces the per-row losses with two torch sums, as candle's
    `reduce` does (sum of column 0 / sum of column 3)."""

    def __init__(self, kernels: OursKernels, cfg: LossCfg, rows: int, classes: int, dtype: str,
                 n_valid: int, force_split: bool = False):
        import torch

        self.k = kernels
        self.cfg = cfg
        self.rows, self.classes = rows, classes
        self.sfx, self.size, acc64 = DTYPE_INFO[dtype]
        if self.sfx not in kernels.suffixes:
            raise RuntimeError(f"no {self.sfx} kernels for {kernels.arch}")
        self.acc = torch.float64 if acc64 else torch.float32
        self.dtype = torch_dtype(dtype)
        self.splits = split_count(rows, classes)
        self.smem = None if force_split else fused_shared_mem(classes, self.size)
        self.params = make_params(cfg, rows, classes, classes, self.splits, upstream_mean(n_valid, acc64))
        self.parg = params_kernel_arg(self.params)
        dev = "cuda"
        self.scale = torch.full((rows,), cfg.head.s, dtype=self.acc, device=dev)
        self.weights = torch.zeros(1, dtype=self.acc, device=dev)  # has_weights = 0: a valid dummy
        self.poly = torch.zeros(1, dtype=self.acc, device=dev)  # n_poly = 0: one unused element
        if self.smem is not None:
            self.f_fused = kernels.func("ms_fused", self.sfx)
            static = kernels.static_smem("ms_fused", self.sfx)
            if static > FUSED_STATIC_RESERVE:
                raise RuntimeError(f"ms_fused_{self.sfx} uses {static} bytes of static shared memory, more than "
                                   f"the {FUSED_STATIC_RESERVE} reserved for it")
            self.path = f"fused (smem {self.smem} B)"
            self.passes = 2  # one read of the row, one write of the gradient
        else:
            self.f_partial = kernels.func("ms_forward_partial", self.sfx)
            self.f_finalize = kernels.func("ms_forward_finalize", self.sfx)
            self.f_backward = kernels.func("ms_backward", self.sfx)
            per_block = BLOCK * (16 // self.size)
            self.grid_backward = (min(div_ceil(classes, per_block), MAX_GRID), min(rows, MAX_GRID), 1)
            self.path = f"split x{self.splits} + finalize + backward"
            self.passes = 3  # the forward's read, the backward's read and write

    def _launch(self, func, grid, block, args, smem=0, root=""):
        import numpy as np
        import torch

        sig = ENTRY_SIGNATURES[root]
        assert len(args) == len(sig), (root, len(args))
        packed = []
        for a, kind in zip(args, sig):
            if kind == "p":
                assert isinstance(a, torch.Tensor) and a.is_cuda, root
                packed.append(np.uint64(a.data_ptr()))
            else:
                packed.append(a)
        func(grid, block, tuple(packed), shared_mem=smem)

    def __call__(self, x, y32, poison: bool = False):
        import torch

        b, c = self.rows, self.classes
        assert x.shape == (b, c) and x.dtype == self.dtype and x.is_contiguous(), (x.shape, x.dtype)
        assert y32.dtype == torch.int32 and y32.shape == (b,) and y32.is_contiguous()
        new = (lambda *s, dtype: torch.full(s, float("nan"), dtype=dtype, device=x.device)) if poison else \
            (lambda *s, dtype: torch.empty(s, dtype=dtype, device=x.device))
        stats = new(b * STAT_COLUMNS, dtype=self.acc)
        grad = new(b, c, dtype=self.dtype)
        grad_scale = new(b, dtype=self.acc)
        with on_torch_stream(self.k.cupy):
            if self.smem is not None:
                self._launch(self.f_fused, (min(b, MAX_GRID), 1, 1), (BLOCK, 1, 1),
                             (x, y32, self.scale, self.weights, self.poly, self.parg, stats, grad, grad_scale),
                             smem=self.smem, root="ms_fused")
            else:
                partials = new(b * self.splits * PARTIAL_COLUMNS, dtype=self.acc)
                row_info = new(b * ROWINFO_COLUMNS, dtype=self.acc)
                self._launch(self.f_partial, (b * self.splits, 1, 1), (BLOCK, 1, 1),
                             (x, y32, self.scale, self.weights, self.parg, partials), root="ms_forward_partial")
                self._launch(self.f_finalize, (div_ceil(b, FINALIZE_BLOCK), 1, 1), (FINALIZE_BLOCK, 1, 1),
                             (x, y32, self.scale, self.weights, self.poly, self.parg, partials, stats, row_info,
                              grad_scale), root="ms_forward_finalize")
                self._launch(self.f_backward, self.grid_backward, (BLOCK, 1, 1),
                             (x, y32, row_info, self.weights, self.parg, grad), root="ms_backward")
        st = stats.view(b, STAT_COLUMNS)
        loss = st[:, STAT_LOSS].sum() / st[:, STAT_WEIGHT].sum()
        return loss, grad


# --- problems, inputs and the float64 reference ------------------------------------------------

ARCFACE_S, ARCFACE_M = 64.0, 0.5
LABEL_SMOOTHING = 0.1


@dataclasses.dataclass
class Problem:
    name: str
    title: str
    kind: str  # ce | arcface
    label_smoothing: float = 0.0


PROBLEMS = {
    "ce": Problem("ce", "softmax cross-entropy", "ce"),
    "ce_ls": Problem("ce_ls", f"softmax cross-entropy, label smoothing {LABEL_SMOOTHING}", "ce", LABEL_SMOOTHING),
    "arcface": Problem("arcface", f"ArcFace s={ARCFACE_S:g} m={ARCFACE_M:g}", "arcface"),
}


def make_inputs(problem: Problem, rows: int, classes: int, dtype: str, n_sets: int, seed: int):
    """n_sets independent random inputs (leaf tensors that require grad) and targets.

    ce: logits ~ N(0, 2^2). arcface: cosines ~ N(0, 0.1^2) for the other classes, the target's
    cosine uniform in [0.2, 0.9] (a trained model's range; it also keeps every target out of the
    θ + m > π region, where arcface_torch (no fallback) and the crate (InsightFace's monotone
    fallback) differ by design)."""
    import torch

    xs, ys, y32s = [], [], []
    for k in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(seed + 1000 * k)
        y = torch.randint(0, classes, (rows,), generator=g, device="cuda", dtype=torch.int64)
        x = torch.randn(rows, classes, generator=g, device="cuda", dtype=torch_dtype(dtype))
        if problem.kind == "ce":
            x.mul_(2.0)
        else:
            x.mul_(0.1).clamp_(-1.0, 1.0)
            t = torch.rand(rows, generator=g, device="cuda", dtype=torch.float32).mul_(0.7).add_(0.2)
            x.scatter_(1, y[:, None], t[:, None].to(x.dtype))
        xs.append(x.requires_grad_(True))
        ys.append(y)
        y32s.append(torch.where(y >= 0, y, torch.full_like(y, -1)).to(torch.int32).contiguous())
    return xs, ys, y32s


def reference_rows(problem: Problem, mode: str, x, y):
    """Per-row losses [rows] in float64 of the f64 tensor x (requires grad), the math of
    shared/spec/losses.md; gradients come from autograd. mode: 'exact' or 'detached' margin."""
    import torch

    if problem.kind == "ce":
        z = x  # s = 1
        eps = problem.label_smoothing
        lse = torch.logsumexp(z, dim=1)
        zy = z.gather(1, y[:, None]).squeeze(1)
        return lse - (1.0 - eps) * zy - (eps / z.shape[1]) * z.sum(dim=1)
    s, m = ARCFACE_S, ARCFACE_M
    c = x.clamp(-1.0, 1.0)  # PyTorch clamp: the gradient passes on the closed interval
    cy = c.gather(1, y[:, None]).squeeze(1)
    # The paper's value in both modes (a gradient mode never changes the loss), from the detached
    # cosine; the gradient comes from a value-0 carrier: phi'(c) = 1 (detached, and the fallback
    # branch), or sin(theta + m) / max(sin theta, sin theta_eps) (exact).
    theta0 = torch.acos(cy.detach())
    fallback = theta0 + m > math.pi
    value = torch.where(fallback, cy.detach() - m * math.sin(m), torch.cos(theta0 + m))
    if mode == "exact":
        theta = theta0 + (torch.cos(theta0) - cy) / torch.clamp(torch.sin(theta0), min=SIN_FLOOR)
        slope = torch.where(fallback, cy, torch.cos(theta + m))
    else:
        slope = cy
    phi = value + (slope - slope.detach())
    z = (s * c).scatter(1, y[:, None], (s * phi)[:, None])
    lse = torch.logsumexp(z, dim=1)
    return lse - s * phi


def check_against_reference(problem: Problem, mode: str, x, y, outputs: Dict[str, Tuple[object, object]],
                            chunk_elems: int = 1 << 25) -> Dict[str, Dict[str, float]]:
    """Compares each provider's (loss, grad) on input x with the f64 reference, in row chunks
    over the whole tensor. Returns per provider: loss_err, grad_err (normwise), gmax_err
    (max abs error / max |ref|), finite."""
    import torch

    rows, classes = x.shape
    per = max(1, chunk_elems // classes)
    loss_ref = 0.0
    ref_max, ref_sq = 0.0, 0.0
    acc = {n: dict(max_abs=0.0, sq=0.0) for n in outputs}
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        xc = x.detach()[r0:r1].double().requires_grad_(True)
        ell = reference_rows(problem, mode, xc, y[r0:r1])
        total = ell.sum() / rows
        (gref,) = torch.autograd.grad(total, xc)
        loss_ref += total.item()
        ref_max = max(ref_max, gref.abs().max().item())
        ref_sq += gref.square().sum().item()
        for n, (_, grad) in outputs.items():
            d = grad.detach()[r0:r1].double() - gref
            a = acc[n]
            dm = d.abs().max().item()
            a["max_abs"] = dm if (math.isnan(dm) or math.isnan(a["max_abs"])) else max(a["max_abs"], dm)
            a["sq"] += d.square().sum().item()
        del xc, ell, total, gref
    result = {}
    for n, (loss, grad) in outputs.items():
        lv = float(loss.detach().double().item())
        finite = bool(torch.isfinite(grad.detach()).all().item()) and math.isfinite(lv)
        result[n] = dict(
            loss=lv,
            loss_ref=loss_ref,
            loss_err=abs(lv - loss_ref) / max(abs(loss_ref), 1e-300),
            grad_err=math.sqrt(acc[n]["sq"] / max(ref_sq, 1e-300)),
            gmax_err=acc[n]["max_abs"] / max(ref_max, 1e-300),
            finite=finite,
        )
    return result


def within(err: Dict[str, float], tol: Dict[str, float]) -> bool:
    return (err["finite"] and err["loss_err"] <= tol["loss"] and err["grad_err"] <= tol["grad"]
            and err["gmax_err"] <= tol["gmax"])


# --- the PyTorch / Liger providers ---------------------------------------------------------------


def arcface_torch_logits(x, labels, s: float = ARCFACE_S, m2: float = ARCFACE_M):
    """InsightFace arcface_torch as configured for ArcFace (margin_list = (1.0, 0.5, 0.0)):
    PartialFC_V2 casts the logits to float and clamps them to [-1, 1], then CombinedMarginLoss's
    `m1 == 1.0 and m3 == 0.0` branch: under no_grad, arccos of the target and of every logit in
    place, add m2 on the target, cos in place; then scale by s. The margin (and the acos / cos
    round trip) is thereby a constant shift in backward: the crate's MarginGrad::Detached."""
    import torch

    logits = x.float()  # PartialFC_V2: `if self.fp16: logits = logits.float()`
    logits = logits.clamp(-1, 1)
    index_positive = torch.where(labels != -1)[0]
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        final_target_logit = target_logit + m2
        logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
        logits.cos_()
    logits = logits * s
    return logits


def arcface_torch_loss(x, labels):
    import torch.nn.functional as F

    return F.cross_entropy(arcface_torch_logits(x, labels), labels)


@dataclasses.dataclass
class Provider:
    name: str
    ref_mode: str  # which f64 reference it is checked against
    build: Callable  # (ctx) -> (run(i) -> (loss, grad), check() -> (loss, grad), info or None)
    is_ours: bool = False
    note: str = ""


class Ctx:
    def __init__(self, problem, rows, classes, dtype, xs, ys, y32s, kernels, args):
        self.problem, self.rows, self.classes, self.dtype = problem, rows, classes, dtype
        self.xs, self.ys, self.y32s = xs, ys, y32s
        self.kernels, self.args = kernels, args


def _autograd_step(loss_fn):
    import torch

    def step(x, y):
        loss = loss_fn(x, y)
        (g,) = torch.autograd.grad(loss, x)
        return loss, g

    return step


def _liger_module(label_smoothing: float):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(label_smoothing=label_smoothing)


def liger_available() -> Tuple[bool, str]:
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerCrossEntropyLoss  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def providers_for(problem: Problem, args) -> List[Provider]:
    import torch
    import torch.nn.functional as F

    out: List[Provider] = []

    def ours(cfg: LossCfg):
        def build(ctx: Ctx):
            step = OursStep(ctx.kernels, cfg, ctx.rows, ctx.classes, ctx.dtype, n_valid=ctx.rows,
                            force_split=args.ours_path == "split")
            build.passes = step.passes
            return ((lambda i: step(ctx.xs[i], ctx.y32s[i])),
                    (lambda: step(ctx.xs[0], ctx.y32s[0], poison=True)), step.path)

        return build

    def torch_fn(fn):
        def build(ctx: Ctx):
            step = _autograd_step(fn)
            return (lambda i: step(ctx.xs[i], ctx.ys[i])), (lambda: step(ctx.xs[0], ctx.ys[0])), None

        return build

    def compiled(fn):
        def build(ctx: Ctx):
            cf = torch.compile(fn, dynamic=False, mode=None if args.compile_mode == "default" else args.compile_mode)
            step = _autograd_step(cf)
            return ((lambda i: step(ctx.xs[i], ctx.ys[i])), (lambda: step(ctx.xs[0], ctx.ys[0])),
                    f"compiled on first call (mode {args.compile_mode})")

        return build

    def liger(ls: float):
        def build(ctx: Ctx):
            mod = _liger_module(ls)
            step = _autograd_step(lambda x, y: mod(x, y))
            # Liger writes the gradient into its input: give it its own copies.
            own = [x.detach().clone().requires_grad_(True) for x in ctx.xs]

            def check():
                xc = ctx.xs[0].detach().clone().requires_grad_(True)
                return step(xc, ctx.ys[0])

            return (lambda i: step(own[i], ctx.ys[i])), check, None

        return build

    if problem.kind == "ce":
        ls = problem.label_smoothing
        cfg = LossCfg(HeadCfg("softmax", s=1.0), label_smoothing=ls)
        ce = (lambda x, y: F.cross_entropy(x, y, label_smoothing=ls)) if ls else (lambda x, y: F.cross_entropy(x, y))
        out.append(Provider("ours", "exact", ours(cfg), is_ours=True))
        out.append(Provider("torch-eager", "exact", torch_fn(ce)))
        out.append(Provider("torch-compile", "exact", compiled(ce)))
        out.append(Provider("liger", "exact", liger(ls),
                            note="LigerCrossEntropyLoss; writes the gradient into its input (timed on own copies)"))
    else:
        head = HeadCfg("arcface", s=ARCFACE_S, m=ARCFACE_M)
        out.append(Provider("ours", "detached", ours(LossCfg(head, margin_grad="detached")), is_ours=True,
                            note="MarginGrad::Detached, as arcface_torch"))
        out.append(Provider("ours-exact", "exact", ours(LossCfg(head, margin_grad="exact")), is_ours=True,
                            note="MarginGrad::Exact (the crate's default)"))
        out.append(Provider("arcface-eager", "detached", torch_fn(arcface_torch_loss),
                            note="InsightFace arcface_torch CombinedMarginLoss(1, 0.5, 0) + F.cross_entropy"))
        out.append(Provider("arcface-compile", "detached", compiled(arcface_torch_loss)))
    if args.providers:
        out = [p for p in out if p.name in args.providers]
    return out


# --- timing ----------------------------------------------------------------------------------------


def bench(fn, args) -> Tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def rotating(run, n: int):
    state = [0]

    def fn():
        i = state[0]
        state[0] = (i + 1) % n
        run(i)

    return fn


def measure_copy_bandwidth(args) -> Tuple[float, float]:
    """GB/s of `torch.empty_like(x).copy_(x)` on a large bf16 tensor, bytes read + written."""
    import torch

    n = int(args.copy_gib * (1 << 30)) // 2
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    med, _, _ = bench(lambda: torch.empty_like(x).copy_(x), args)
    nbytes = 2 * x.numel() * x.element_size()
    x = None  # free the 1 GiB before the groups run
    torch.cuda.empty_cache()
    return nbytes / (med * 1e-3) / 1e9, med


def _fmt_err(e: Optional[Dict[str, float]]) -> str:
    if not e:
        return "-"
    return f"{e['loss_err']:.1e}/{e['grad_err']:.1e}/{e['gmax_err']:.1e}"


def run_group(problem: Problem, rows: int, classes: int, dtype: str, kernels, args, copy_gbps: float,
              results: List[dict], preflight: bool = False) -> None:
    """Checks (and unless preflight, times) every provider of one (problem, shape, dtype)."""
    import torch
    import torch._dynamo

    tol = TOLERANCES[dtype]
    size = DTYPE_INFO[dtype][1]
    input_bytes = rows * classes * size
    n_sets = 1 if preflight else max(2, min(args.sets, int(args.input_budget_gib * (1 << 30) // input_bytes)))
    tag = f"{problem.name} {dtype} {rows}x{classes}"
    print(f"\n=== {tag}: {problem.title}; {n_sets} input set(s) of {input_bytes / 1e9:.3f} GB", flush=True)
    provs = providers_for(problem, args)
    if preflight:
        provs = [p for p in provs if p.is_ours]
    if kernels is None:
        provs = [p for p in provs if not p.is_ours]
    lig_ok, lig_why = liger_available()
    torch._dynamo.reset()
    try:
        xs, ys, y32s = make_inputs(problem, rows, classes, dtype, n_sets, args.seed)
    except torch.cuda.OutOfMemoryError as e:
        print(f"!!! {tag}: out of memory generating the inputs: {e}")
        return
    ctx = Ctx(problem, rows, classes, dtype, xs, ys, y32s, kernels, args)
    built, outputs, rows_out = {}, {}, {}
    for p in provs:
        rec = dict(problem=problem.name, dtype=dtype, rows=rows, classes=classes, provider=p.name, note=p.note,
                   status="", median_ms=None, p20_ms=None, p80_ms=None, gbps=None, copy_frac=None,
                   speedup_of_ours=None, err=None, path=None, setup_s=None, moved_gbps=None)
        rows_out[p.name] = rec
        if p.name == "liger" and not lig_ok:
            rec["status"] = "skipped: liger_kernel not installed"
            print(f"  {p.name:16} skipped: liger_kernel not installed ({lig_why})")
            continue
        t0 = time.perf_counter()
        try:
            run, check, info = p.build(ctx)
            outputs[p.name] = check()  # (loss, grad) on input set 0; compiles / loads on first use
            torch.cuda.synchronize()
            rec["setup_s"] = time.perf_counter() - t0
            rec["path"] = info
            built[p.name] = run
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0][:300] if str(e) else ""
            rec["status"] = f"error: {type(e).__name__}: {first}"
            print(f"!!! {p.name}: {rec['status']}")
            if args.verbose:
                traceback.print_exc()
            outputs.pop(p.name, None)
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001  (a sticky CUDA error: nothing further can run)
                print(f"!!! CUDA context unusable after {p.name}: {e2}")
                raise
    # The f64 reference, once per margin mode, over the whole of input set 0.
    for mode in sorted({p.ref_mode for p in provs if p.name in outputs}):
        names = [p.name for p in provs if p.ref_mode == mode and p.name in outputs]
        try:
            errs = check_against_reference(problem, mode, xs[0], ys[0], {n: outputs[n] for n in names})
        except Exception as e:  # noqa: BLE001
            print(f"!!! reference ({mode}) failed: {type(e).__name__}: {e}")
            for n in names:
                rows_out[n]["status"] = "error: reference failed"
                built.pop(n, None)
            continue
        for n in names:
            e = errs[n]
            rec = rows_out[n]
            rec["err"] = e
            ok = within(e, tol)
            line = (f"  {n:16} check vs f64 ({mode}): loss {e['loss']:.6g} (ref {e['loss_ref']:.6g}) rel err "
                    f"{e['loss_err']:.2e}; grad normwise {e['grad_err']:.2e}, max {e['gmax_err']:.2e}"
                    f"{'' if e['finite'] else ', NON-FINITE values'}"
                    f"{'; ' + rec['path'] if rec['path'] else ''}"
                    f"{'; setup %.1f s' % rec['setup_s'] if rec['setup_s'] and rec['setup_s'] > 1 else ''}")
            print(line)
            if not ok:
                rec["status"] = (f"skipped: disagrees with the f64 reference beyond tolerance (loss {tol['loss']:g}, "
                                 f"grad {tol['grad']:g}, max {tol['gmax']:g})")
                print(f"!!! {n}: {rec['status']} -- NOT TIMED")
                built.pop(n, None)
            else:
                rec["status"] = "ok" if not preflight else "ok (checked)"
    outputs.clear()
    torch.cuda.empty_cache()
    if not preflight:
        nbytes = 2 * rows * classes * size
        for p in provs:
            if p.name not in built:
                continue
            rec = rows_out[p.name]
            try:
                med, p20, p80 = bench(rotating(built[p.name], n_sets), args)
            except Exception as e:  # noqa: BLE001
                rec["status"] = f"error while timing: {type(e).__name__}: {e}"
                print(f"!!! {p.name}: {rec['status']}")
                continue
            rec.update(median_ms=med, p20_ms=p20, p80_ms=p80, gbps=nbytes / (med * 1e-3) / 1e9)
            rec["copy_frac"] = rec["gbps"] / copy_gbps if copy_gbps else None
            moved = ""
            passes = getattr(p.build, "passes", None) if p.is_ours else None
            if passes:
                # What the kernels really move (the split path reads the input twice).
                rec["moved_gbps"] = passes * rows * classes * size / (med * 1e-3) / 1e9
                moved = (f"  [{passes} passes over B*C: {rec['moved_gbps']:.1f} GB/s moved, "
                         f"{100 * rec['moved_gbps'] / copy_gbps:.1f}% of copy]")
            print(f"  {p.name:16} {med:9.4f} ms (p20 {p20:.4f}, p80 {p80:.4f})  {rec['gbps']:7.1f} GB/s  "
                  f"{100 * rec['copy_frac']:5.1f}% of copy{moved}", flush=True)
        ours_ms = rows_out.get("ours", {}).get("median_ms")
        for n, rec in rows_out.items():
            if ours_ms and rec["median_ms"] and n != "ours":
                rec["speedup_of_ours"] = rec["median_ms"] / ours_ms
    del built, ctx, xs, ys, y32s
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    results.extend(rows_out.values())


def print_table(results: List[dict]) -> None:
    hdr = (f"{'shape':>14} {'dtype':5} {'problem':8} {'provider':16} {'median ms':>10} {'p20':>9} {'p80':>9} "
           f"{'GB/s':>7} {'%copy':>6} {'ours x':>7}  {'err loss/grad/max':24} status")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        shape = f"{r['rows']}x{r['classes']}"
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        copy = num(100 * r["copy_frac"], ".1f") if r["copy_frac"] is not None else "-"
        print(f"{shape:>14} {r['dtype']:5} {r['problem']:8} {r['provider']:16} {num(r['median_ms'], '.4f'):>10} "
              f"{num(r['p20_ms'], '.4f'):>9} {num(r['p80_ms'], '.4f'):>9} {num(r['gbps'], '.1f'):>7} "
              f"{copy:>6} {num(r['speedup_of_ours'], '.2f'):>7}  {_fmt_err(r['err']):24} {r['status']}")
    print("'ours x' = median time of that provider / median time of 'ours' (> 1: ours is faster). GB/s counts "
          "2*B*C*sizeof(T) per step (read the logits, write the gradient).")


def print_goals(results: List[dict], dtypes: List[str]) -> List[str]:
    lines = []

    def find(problem, dtype, rows, classes, provider):
        for r in results:
            if (r["problem"], r["dtype"], r["rows"], r["classes"], r["provider"]) == (problem, dtype, rows, classes,
                                                                                      provider):
                return r
        return None

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    # 1. ours >= 85% of the copy bandwidth, every timed ours row.
    for r in results:
        if r["provider"].startswith("ours") and r["copy_frac"] is not None:
            extra = ""
            if r.get("moved_gbps") and r["gbps"]:
                passes = round(2 * r["moved_gbps"] / r["gbps"])
                if passes > 2:
                    extra = (f" (split path, {passes} passes: the kernels moved "
                             f"{100 * r['copy_frac'] * r['moved_gbps'] / r['gbps']:.1f}% of copy bandwidth; "
                             f"over the counted 2 passes the ceiling is {100 * 2 / passes:.0f}%)")
            lines.append(f"[{verdict(r['copy_frac'] >= GOAL_COPY_FRACTION)}] {r['provider']} >= "
                         f"{100 * GOAL_COPY_FRACTION:.0f}% of copy bandwidth: {r['problem']} {r['dtype']} "
                         f"{r['rows']}x{r['classes']}: {100 * r['copy_frac']:.1f}%{extra}")
    # 2. ours >= 1.3x torch.compile and Liger, CE at (8192, 32000) and (4096, 128256), bf16.
    for problem in ("ce", "ce_ls"):
        for rows, classes in GOAL_CE_SHAPES:
            for prov in ("torch-compile", "liger"):
                r = find(problem, "bf16", rows, classes, prov)
                what = f"ours >= {GOAL_VS_COMPILE_LIGER}x {prov}: {problem} bf16 {rows}x{classes}"
                if r is None:
                    lines.append(f"[NOT RUN] {what}")
                elif r["speedup_of_ours"] is None:
                    lines.append(f"[NOT MEASURED] {what}: {r['status'] or 'ours not timed'}")
                else:
                    lines.append(f"[{verdict(r['speedup_of_ours'] >= GOAL_VS_COMPILE_LIGER)}] {what}: "
                                 f"{r['speedup_of_ours']:.2f}x")
    # 3. ours >= 8x eager ArcFace.
    for r in results:
        if r["problem"] == "arcface" and r["provider"] == "arcface-eager":
            what = f"ours >= {GOAL_VS_EAGER_ARCFACE:g}x eager ArcFace: {r['dtype']} {r['rows']}x{r['classes']}"
            if r["speedup_of_ours"] is None:
                lines.append(f"[NOT MEASURED] {what}: {r['status'] or 'ours not timed'}")
            else:
                lines.append(f"[{verdict(r['speedup_of_ours'] >= GOAL_VS_EAGER_ARCFACE)}] {what}: "
                             f"{r['speedup_of_ours']:.2f}x")
    if not any(r["problem"] == "arcface" for r in results):
        lines.append(f"[NOT RUN] ours >= {GOAL_VS_EAGER_ARCFACE:g}x eager ArcFace")
    print("\nGOALS")
    for line in lines:
        print("  " + line)
    return lines


def environment(args, kernels, nvcc) -> Dict[str, str]:
    import torch

    env = {}
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["command"] = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    env["device"] = (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.1f} GiB"
                     + (f", L2 {props.L2_cache_size / 2**20:.0f} MiB" if hasattr(props, "L2_cache_size") else "")
                     + ")")
    env["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable: {e}"
    try:
        import cupy

        env["cupy"] = cupy.__version__
        env["driver"] = str(cupy.cuda.runtime.driverGetVersion())
    except Exception as e:  # noqa: BLE001
        env["cupy"] = f"unavailable: {e}"
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = "not installed"
    import numpy

    env["numpy"] = numpy.__version__
    env["python"] = sys.version.split()[0]
    env["nvcc"] = f"{nvcc} ({nvcc_version(nvcc)})" if nvcc else "not found"
    if kernels is not None:
        env["kernels"] = f"{kernels.command} (compiled in {kernels.compile_s:.1f} s)"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "kernels"], capture_output=True,
                               text=True, timeout=10)
        if rev.returncode == 0:
            env["git"] = rev.stdout.strip() + (" (kernels/ modified)" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    env["kernels_sha256"] = hashlib.sha256(b"".join((KERNELS / f).read_bytes() for f in sorted(
        os.listdir(KERNELS)) if f.endswith((".cu", ".cuh")))).hexdigest()[:16]
    env["timing"] = (f"triton.testing.do_bench(warmup={args.warmup_ms} ms, rep={args.rep_ms} ms, "
                     f"quantiles=[0.5, 0.2, 0.8]) over {args.sets} rotating input sets (at most "
                     f"{args.input_budget_gib} GiB of inputs per group, at least 2)")
    return env


def main_gpu(args) -> int:
    import torch
    import torch._dynamo

    if not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch: nothing to measure (use --selftest-params without a GPU)")
        return 2
    for knob, value in (("cache_size_limit", 64), ("recompile_limit", 64)):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, value)
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    nvcc = find_nvcc(args.nvcc)
    kernels = None
    build_dir = Path(args.build_dir) if args.build_dir else Path(tempfile.mkdtemp(prefix="ms_torch_compare_"))
    if nvcc is None:
        print("!!! nvcc not found ($NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): 'ours' is SKIPPED")
    else:
        try:
            import cupy

            cupy.cuda.Device(torch.cuda.current_device()).use()
            kernels = OursKernels(nvcc, arch, build_dir)
        except Exception as e:  # noqa: BLE001
            print(f"!!! building / loading the crate's kernels failed: 'ours' is SKIPPED\n{e}")
            if args.verbose:
                traceback.print_exc()
    env = environment(args, kernels, nvcc)
    print("torch_compare.py: candle-margin-softmax kernels vs PyTorch eager / torch.compile / Liger-Kernel")
    for k, v in env.items():
        print(f"  {k:14} {v}")
    if kernels is not None:
        probe_params = make_params(LossCfg(HeadCfg("sphereface", s=30.0, m=4, lam=5.0), label_smoothing=0.1,
                                           focal_gamma=2.0, z_loss=1e-4, n_poly=1),
                                   1234, 56789, 56789, 3, upstream_mean(1234, False))
        try:
            probe = kernels.probe_abi(probe_params)
        except TypeError as e:  # this CuPy does not take a size-1 numpy array by value
            print(f"  passing MsParams as a size-1 numpy array failed ({e}); trying a CPointer")
            PARAM_PASSING[0] = "cpointer"
            try:
                probe = kernels.probe_abi(probe_params)
            except Exception as e2:  # noqa: BLE001
                probe = [f"{type(e2).__name__}: {e2}"]
        except Exception as e:  # noqa: BLE001
            probe = [f"{type(e).__name__}: {e}"]
        if probe:
            print("!!! MsParams ABI probe on the device FAILED: 'ours' is SKIPPED\n  " + "\n  ".join(probe))
            kernels = None
        else:
            print("  MsParams ABI probe: the device's sizeof/alignof/offsetof match ctypes and the kernel "
                  f"received the {MS_PARAMS_SIZE} bytes unchanged (passed as: {PARAM_PASSING[0]})")
    results: List[dict] = []
    t_start = time.perf_counter()
    if kernels is not None and not args.no_preflight:
        print("\n--- preflight: ours vs the f64 reference on small shapes that take both paths (odd C: "
              "unaligned rows), not timed")
        pre: List[dict] = []
        for dtype in args.dtypes:
            for shape in PREFLIGHT_SHAPES:
                rows, classes = parse_shape(shape)
                for pname in args.problems:
                    try:
                        run_group(PROBLEMS[pname], rows, classes, dtype, kernels, args, 0.0, pre, preflight=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"!!! preflight {pname} {dtype} {shape}: {type(e).__name__}: {e}")
                        pre.append(dict(provider="ours", problem=pname, dtype=dtype, rows=rows, classes=classes,
                                        status=f"error: {e}"))
                        torch.cuda.synchronize()  # raises (and ends the run) if the context is gone
        bad = [r for r in pre if not r["status"].startswith("ok")]
        print(f"--- preflight: {len(pre) - len(bad)}/{len(pre)} ok"
              + ("" if not bad else "; FAILED: " + ", ".join(f"{r['provider']} {r['problem']} {r['dtype']} "
                                                          f"{r['rows']}x{r['classes']}" for r in bad)))
        if bad and not args.keep_going:
            print("!!! the crate's kernels disagree with the reference on the preflight shapes: 'ours' is SKIPPED "
                  "(--keep-going times it anyway)")
            kernels = None
    copy_gbps, copy_ms = measure_copy_bandwidth(args)
    print(f"\ncopy bandwidth: torch.empty_like(x).copy_(x), {args.copy_gib:g} GiB bf16: {copy_ms:.4f} ms, "
          f"{copy_gbps:.1f} GB/s (read + write)")
    aborted = False
    for dtype in args.dtypes:
        for rows, classes in args.shapes:
            for pname in args.problems:
                try:
                    run_group(PROBLEMS[pname], rows, classes, dtype, kernels, args, copy_gbps, results)
                except Exception as e:  # noqa: BLE001
                    print(f"!!! {pname} {dtype} {rows}x{classes}: {type(e).__name__}: {e}")
                    if args.verbose:
                        traceback.print_exc()
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception as e2:  # noqa: BLE001
                        print(f"!!! the CUDA context is unusable ({e2}): stopping; results so far follow")
                        aborted = True
                print(f"  (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
                if aborted:
                    break
            if aborted:
                break
        if aborted:
            break
    print("\n" + "=" * 40 + " RESULTS " + "=" * 40)
    for k in ("date", "command", "device", "torch", "triton", "cupy", "liger_kernel", "nvcc", "git"):
        if k in env:
            print(f"  {k:14} {env[k]}")
    print(f"  copy bandwidth {copy_gbps:.1f} GB/s; tolerances vs f64 (loss / grad normwise / grad max): "
          + "; ".join(f"{d} {TOLERANCES[d]['loss']:g}/{TOLERANCES[d]['grad']:g}/{TOLERANCES[d]['gmax']:g}"
                      for d in args.dtypes))
    print_table(results)
    goals = print_goals(results, args.dtypes)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(environment=env, copy_gbps=copy_gbps, results=results,
                                                   goals=goals), indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                    help="BxC shapes (default: the Rust GPU bench's %(default)s); commas also separate")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], help="bf16 f16 f32 (f64: ours only)")
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--providers", nargs="+", default=None,
                    help="only these providers (ours ours-exact torch-eager torch-compile liger arcface-eager "
                         "arcface-compile)")
    ap.add_argument("--quick", action="store_true", help="short timing (warmup 10 ms, rep 40 ms, 2 input sets)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup, ms (default 50)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench rep, ms (default 300)")
    ap.add_argument("--sets", type=int, default=None, help="rotating input sets per group (default 4)")
    ap.add_argument("--input-budget-gib", type=float, default=6.0, help="memory for the input sets of one group")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy-bandwidth tensor")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--ours-path", choices=["auto", "split"], default="auto",
                    help="auto: as src/launch.rs (fused when C*sizeof <= 47104); split: always the 3-kernel path")
    ap.add_argument("--arch", default=None, help="nvcc -arch (default: the GPU's, e.g. sm_90)")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: as build.rs finds it)")
    ap.add_argument("--build-dir", default=None, help="where the PTX goes (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-preflight", action="store_true", help="skip the small-shape correctness preflight")
    ap.add_argument("--keep-going", action="store_true", help="time ours even if the preflight fails")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks")
    ap.add_argument("--selftest-params", action="store_true",
                    help="no GPU: build MsParams for several configs, check sizes / offsets / bytes against "
                         "params.cuh (header parse, host C++ compiler, nvcc's PTX when found)")
    args = ap.parse_args(argv)
    shapes = []
    for s in args.shapes:
        for part in s.split(","):
            if part.strip():
                shapes.append(parse_shape(part))
    args.shapes = shapes
    for d in args.dtypes:
        if d not in DTYPE_INFO:
            ap.error(f"unknown dtype {d!r}: use bf16, f16, f32 or f64")
    if args.quick:
        args.warmup_ms = 10.0 if args.warmup_ms is None else args.warmup_ms
        args.rep_ms = 40.0 if args.rep_ms is None else args.rep_ms
        args.sets = 2 if args.sets is None else args.sets
    args.warmup_ms = 50.0 if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = 300.0 if args.rep_ms is None else args.rep_ms
    args.sets = 4 if args.sets is None else args.sets
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.selftest_params:
        return selftest_params(args)
    return main_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
