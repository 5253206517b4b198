#!/usr/bin/env python3
"""The crate's CUDA kernels against PyTorch (eager and torch.compile), Liger-Kernel and arcface_torch.

One timed unit is one full training step of the loss: logits [B, C] -> (scalar mean loss,
d(loss)/d(logits) [B, C] in the logits' dtype). For the crate ("ours") that is what
`MarginSoftmaxLoss::loss_and_grad` launches on a GPU (src/backends/cuda/, planned by src/backends/launch/mod.rs):

  1. `ms_targets_i64_<acc>` (one block of 1024 threads): the int64 targets converted to int32
     and checked on the device, and the mean's gradient factor 1/sum w written to a one-element
     device buffer (`upstream`) that the loss kernels read;
  2. with the target check on (the crate's default) one 8-byte device-to-host read of
     `first_invalid`, i.e. one host synchronization per step; none with check_targets(false);
  3. the first of these paths that takes the row (Planner::loss_and_grad, in its order; with
     smem(C) = round_up((C + 16/sizeof(T) - 1) * sizeof(T), 16), the row's dynamic shared memory):
     a. `ms_fused_warp_<variant>_<T>` for narrow rows, 8 * smem(C) <= 32 KiB (C <= 2041
        bf16/f16, 1021 f32, 511 f64): a warp per row, 8 rows per block of 256, grid ceil(B / 8)
        capped at 65535, dynamic smem 8 * smem(C) (no opt-in needed);
     b. `ms_fused_<variant>_<T>` when smem(C) + 2048 <= the device's
        cudaDevAttrMaxSharedMemoryPerBlockOptin (C <= 115193 bf16 / 57597 f32 / 28799 f64 on an
        H200): a block per row, grid B capped at 65535;
     c. `ms_fused_cluster_<variant>_<T>` (compiled for sm_90 and later only, __cluster_dims__(8,
        1, 1)) where the device has cluster launch (cudaDevAttrClusterLaunch) and every block's
        slice of S = round_up(ceil(C / 8), 16/sizeof(T)) classes fits: smem(S) + 2048 <= the opt-in
        limit (C <= 921536 bf16 / 460768 f32 / 230384 f64 on an H200): a cluster of 8 blocks per
        row, grid 8 * max(1, min(B, 65535 // 8)), dynamic smem smem(S) per block;
        a, b and c take ms_fused's 10 arguments, and the function is opted into its dynamic shared
        memory when that plus its static shared memory passes 48 KiB; one read, one write;
     d. `ms_fused_l2_<variant>_<T>` where the device has cooperative launch
        (cudaDevAttrCooperativeLaunch), as a COOPERATIVE launch (cuLaunchCooperativeKernel: CuPy's
        enable_cooperative_groups) of grid = min(SMs * (3, or 2 for f64 and `_ext`), 65535) blocks
        of 256, no dynamic smem: rows in groups of G = clamp(floor(L2 / 3 / (C * sizeof(T))), 1, B)
        (L2 = cudaDevAttrL2CacheSize), each row in splits = max(min(grid // G, ceil(C / 4096)), 1)
        slices; ms_fused's 10 arguments plus `ACC* partials` (B * splits * 5 elements) and
        `long long group_rows` (G); one read from memory, the gradient's second read from L2, one
        write;
     e. else `ms_forward_partial_<variant>_<T>` (splits = clamp(floor(2 * SMs * (4, or 2 for
        f64) / B), 1, ceil(C / 4096)) blocks per row) -> `ms_forward_finalize_<T>` (row info and
        d(loss)/d(scale), the device's upstream folded in) -> `ms_backward_<variant>_<T>`;
     <variant> is identity / cosine / rbf, `_ext` with label smoothing or soft-capping
     (`kernel_variant` in src/backends/launch/mod.rs);
  4. the mean over the per-row losses (two torch sums, as candle's `reduce`).

The kernels are compiled here from kernels/*.cu with nvcc for the GPU's own architecture
(build.rs builds sm_80 + sm_90 fatbins; one `--ptx -arch=sm_XX` suffices here: sm_90 on an H200,
which ms_fused_cluster needs, and the bf16 entries need sm_80 or later) and launched through
CuPy on PyTorch's current stream, with torch
tensors' device pointers and a byte-for-byte ctypes copy of `struct MsParams`
(kernels/params.cuh).

Providers, per problem:
  ce        softmax cross-entropy:        ours, ours-nocheck, ours-autograd, eager
                                          F.cross_entropy, torch.compile, Liger
  ce_ls     the same, label smoothing 0.1 (variant identity_ext)
  arcface   ArcFace s=64, m=0.5:          ours (margin detached in backward, as arcface_torch),
                                          ours-nocheck, ours-exact (the exact margin
                                          derivative), ours-autograd, eager InsightFace
                                          arcface_torch, torch.compile of it
  ours           loss_and_grad, check_targets on (the default): one 8-byte D2H read per step
  ours-nocheck   loss_and_grad with check_targets(false): nothing read back in the step
  ours-autograd  loss() + backward as candle's autograd runs the op: forward (ms_targets,
                 partial, finalize, with the check's read), then the op's bwd (row info from
                 the stats with torch ops, ms_targets again, ms_backward): 2 reads + 1 write

Each provider's loss and gradient are first checked against a float64 reference computed with
torch on the GPU (row chunks over the whole tensor); a provider that disagrees beyond the
tolerances (TOLERANCES below) is skipped, loudly. Timing is `triton.testing.do_bench` (median,
p20, p80), rotating among several pre-generated random inputs. For every (shape, dtype) the
script also times a device-to-device copy of the same bytes, `y.copy_(x)` with x, y of B*C
elements of the dtype (1 read + 1 write), the same way, and reports each provider's share of
that copy's bandwidth: counting 1 read + 1 write of [B, C] for a loss_and_grad step (all
providers but ours-autograd) and 2 reads + 1 write for ours-autograd.

Default run (no arguments): the issue's shapes 8192x32000:bf16, 4096x128256:bf16,
512x1000000:bf16, 64x1000000:f32 (a shape without `:dtype` runs in each of --dtypes; on an H200
they take ms_fused, ms_fused_cluster, ms_fused_l2 and ms_fused_l2: groups of 8 rows x 49 slices and of
4 rows x 99 slices, grid 396 (264 and 33 / 66 slices for ce_ls's `_ext` entries)), problems
ce ce_ls arcface, do_bench warmup 50 ms / rep 200 ms, up to 3 rotating input sets (at most
--input-budget-gib 6 GiB of inputs per group). Expected on an H200 (an estimate, not measured
with this version): about 4-6 minutes, most of it torch.compile (one compilation per shape and
problem, 12 in all) and the inputs / f64 references of the 512x1000000 groups. Runtime knobs:
  --quick                  warmup 10 ms, rep 40 ms, 2 input sets (about 2-3 minutes)
  --problems ce            1/3 of the compilations; --providers to drop some
  --shapes 8192x32000:bf16 fewer shapes; --no-preflight skips the small-shape checks (~10 s)
  --warmup-ms / --rep-ms / --sets / --input-budget-gib

Usage (on a GPU machine with PyTorch, Triton, CuPy and nvcc):
  python benches/torch_compare.py [--shapes 8192x32000:bf16 ...] [--dtypes bf16 f16 f32] [--quick]
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
KERNEL_SOURCES = ("forward", "backward", "fused", "targets")

# ----------------------------------------------------------------------------------------------
# The kernel ABI: kernels/params.cuh, mirrored field for field (as src/backends/launch/params.rs does).
# ----------------------------------------------------------------------------------------------

MS_MAX_SPHERE_M = 16
TRANSFORM_IDENTITY, TRANSFORM_COSINE, TRANSFORM_RBF = 0, 1, 2
MARGIN_NONE, MARGIN_COSFACE, MARGIN_ARCFACE_COMBINED, MARGIN_SPHEREFACE = 0, 1, 2, 3
STAT_COLUMNS = 8  # MS_STAT_COLUMNS: loss, max, ln sum, w_y, a, k, g_y, dloss/dscale
STAT_LOSS, STAT_WEIGHT = 0, 3  # src/layout.rs
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
    ("scale_grad", ctypes.c_int32),
    ("reserved", ctypes.c_int32),
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
]


class MsParams(ctypes.Structure):
    """`struct MsParams` of kernels/params.cuh: 3 int64, 12 int32, 8 float64, float64[16],
    6 float64 = 312 bytes, alignment 8, no padding (checked below, and against the C compiler,
    nvcc's PTX and the device in --selftest-params / the GPU preflight)."""

    _fields_ = _MS_FIELDS


MS_PARAMS_SIZE = 3 * 8 + 12 * 4 + 8 * 8 + MS_MAX_SPHERE_M * 8 + 6 * 8
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
    "weighted_smoothing": 56, "softcapped": 60, "scale_grad": 64, "reserved": 68, "neg_inv_gamma": 72,
    "additive_m": 80, "m1": 88, "m2": 96, "m3": 104, "fallback_shift": 112, "sin_floor": 120, "lambda": 128,
    "thresholds": 136, "smoothing": 264, "total_weight": 272, "focal_gamma": 280, "z_loss": 288, "softcap": 296,
    "inv_softcap": 304,
}
assert {n: o for n, o, _ in ms_field_layout()} == EXPECTED_OFFSETS

# The kernels' argument lists, from kernels/forward.cu, backward.cu, fused.cu, targets.cu and the
# launches of src/backends/cuda/: 'p' a device pointer (8 bytes), 'q' a long long (8 bytes), 'i' an int
# (4 bytes), 'S' MsParams by value (312 bytes, alignment 8).
ENTRY_SIGNATURES = {
    # ms_forward_partial_{variant}_T(const T* x, const int* targets, const ACC* scale,
    #                                const ACC* weights, MsParams p, ACC* partials)
    "ms_forward_partial": "ppppSp",
    # ms_forward_finalize_T(x, targets, scale, weights, poly, MsParams p, const ACC* partials,
    #                       ACC* stats, ACC* row_info, ACC* grad_scale, const ACC* upstream)
    "ms_forward_finalize": "pppppSppppp",
    # ms_backward_{variant}_T(const T* x, const int* targets, const ACC* row_info,
    #                         const ACC* weights, MsParams p, T* grad)
    "ms_backward": "ppppSp",
    # ms_fused_{variant}_T(x, targets, scale, weights, poly, MsParams p, ACC* stats, T* grad,
    #                      ACC* grad_scale, const ACC* upstream)
    "ms_fused": "pppppSpppp",
    # ms_fused_warp_{variant}_T and ms_fused_cluster_{variant}_T: ms_fused's arguments (src/backends/cuda/
    # launches all three through Inputs::fused)
    "ms_fused_warp": "pppppSpppp",
    "ms_fused_cluster": "pppppSpppp",
    # ms_fused_l2_{variant}_T: ms_fused's arguments, then ACC* partials, long long group_rows
    # (src/backends/cuda/: Inputs::fused with L2Work; launched cooperatively)
    "ms_fused_l2": "pppppSpppppq",
    # ms_targets_I_A(const I* raw, long long rows, long long classes, long long ignore_index,
    #                int has_ignore, const A* weights, int has_weights, int mean, int* out,
    #                long long* first_invalid, A* upstream)
    "ms_targets": "pqqqipiippp",
}
ENTRY_MODULE = {
    "ms_forward_partial": "forward",
    "ms_forward_finalize": "forward",
    "ms_backward": "backward",
    "ms_fused": "fused",
    "ms_fused_warp": "fused",
    "ms_fused_cluster": "fused",
    "ms_fused_l2": "fused",
    "ms_targets": "targets",
}
# Entries compiled only from an architecture on: ms_fused_cluster is inside
# `#if __CUDA_ARCH__ >= 900` (kernels/fused.cu: thread-block clusters). The bf16 entries need
# sm_80 (element_suffixes).
ENTRY_MIN_ARCH = {"ms_fused_cluster": 90}
# The element loops of MS_PER_TRANSFORM (kernels/rows.cuh), in its order (src/backends/launch/mod.rs
# variant_index): the entries `{root}_{variant}_{T}` of the roots below.
VARIANTS = ("identity", "cosine", "rbf", "identity_ext", "cosine_ext", "rbf_ext")
VARIANT_ROOTS = ("ms_forward_partial", "ms_backward", "ms_fused", "ms_fused_warp", "ms_fused_cluster", "ms_fused_l2")
# ms_targets_{I}_{A}: raw target types (candle's U8, U32, I64) x accumulation types.
TARGET_SUFFIXES = ("u8", "u32", "i64")
ACC_SUFFIXES = ("f32", "f64")


def entry_names(root: str, suffix: str) -> List[str]:
    """The entry points of `root` for the element suffix `suffix` (f32 / f64 / f16 / bf16), or
    for ms_targets the accumulation suffix (f32 / f64)."""
    if root in VARIANT_ROOTS:
        return [f"{root}_{v}_{suffix}" for v in VARIANTS]
    if root == "ms_targets":
        return [f"ms_targets_{i}_{suffix}" for i in TARGET_SUFFIXES]
    return [f"{root}_{suffix}"]


# Launch constants of src/backends/launch/mod.rs (BLOCK, FINALIZE_BLOCK and TARGETS_BLOCK are MS_BLOCK,
# MS_FINALIZE_BLOCK and MS_TARGETS_BLOCK of kernels/params.cuh: ms_fused, ms_forward_partial and
# ms_targets trap on any other block size). --selftest-params reads them back from both files.
BLOCK = 256
FINALIZE_BLOCK = 128
TARGETS_BLOCK = 1024
MAX_GRID = 65_535
DEFAULT_SHARED = 48 * 1024  # the shared memory every GPU gives a block without the opt-in
FUSED_STATIC_RESERVE = 2048  # room kept for ms_fused's static shared memory
WARP_SHARED = 32 * 1024  # the dynamic shared memory ms_fused_warp may use (no opt-in needed)
WARP_ROWS = BLOCK // 32  # rows per block of ms_fused_warp (a warp each)
CLUSTER = 8  # blocks per row of ms_fused_cluster (MS_CLUSTER, its __cluster_dims__)
SPLIT_MIN_COLUMNS = 4096
SPLIT_WAVES = 2
L2_SHARE = 3  # ms_fused_l2's row group takes at most 1 / L2_SHARE of the L2 (src/backends/launch/mod.rs L2_SHARE)
I32_MAX = 2**31 - 1
# MS_TARGET_IGNORED / MS_TARGET_INVALID of params.cuh (the int32 targets ms_targets writes).
TARGET_IGNORED, TARGET_INVALID = -1, -2
IGNORE_INDEX = -100  # MarginSoftmaxLoss's default ignore_index (src/config.rs), as PyTorch's


def div_ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class DeviceShape:
    """src/backends/launch/mod.rs DeviceShape: the SM count, the shared memory one block may opt into
    (cudaDevAttrMaxSharedMemoryPerBlockOptin, at least 48 KiB), whether the device launches
    thread-block clusters (CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH, sm_90 and later), whether it has
    cooperative launch (CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: ms_fused_l2's grid barriers) and
    its L2 cache in bytes (CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: ms_fused_l2's row groups)."""

    sm_count: int
    max_shared_per_block: int
    clusters: bool = False
    cooperative: bool = False
    l2_bytes: int = 0


DEVICE_DEFAULT = DeviceShape(132, DEFAULT_SHARED, False, False, 0)  # DeviceShape::DEFAULT (no opt-in)
DEVICE_H200 = DeviceShape(132, 227 * 1024, True, True, 50 * 1024 * 1024)  # DeviceShape::H200 (and H100 SXM)
DEVICE_A100 = DeviceShape(108, 163 * 1024, False)  # src/op.rs's A100 figures (163 KiB, no clusters)


def vector_width(size: int) -> int:
    """Elements of `size` bytes in a 16-byte vector."""
    return 16 // size


def fused_shared_bytes(classes: int, size: int) -> int:
    """ms_fused's dynamic shared memory: round_up((C + 16/size - 1) * size, 16) (the row at an
    offset below one vector, so that its 16-byte-aligned part is aligned in shared memory too)."""
    return div_ceil((classes + vector_width(size) - 1) * size, 16) * 16


def fused_max_classes(size: int, max_shared: int) -> int:
    """The largest C with fused_shared_bytes(C, size) + FUSED_STATIC_RESERVE <= max_shared."""
    room = max(max_shared - FUSED_STATIC_RESERVE, 0) // 16 * 16
    return max(room // size - (vector_width(size) - 1), 0)


def warp_max_classes(size: int) -> int:
    """The widest row ms_fused_warp takes: WARP_ROWS slots of fused_shared_bytes within WARP_SHARED
    (1021 f32, 2041 f16 / bf16, 511 f64), as src/backends/launch/mod.rs warp_max_classes."""
    return fused_max_classes(size, WARP_SHARED // WARP_ROWS + FUSED_STATIC_RESERVE)


def cluster_slice(classes: int, size: int) -> int:
    """The classes each block of ms_fused_cluster holds: round_up(ceil(C / CLUSTER), 16 / size)."""
    v = vector_width(size)
    return div_ceil(div_ceil(classes, CLUSTER), v) * v


def cluster_max_classes(size: int, max_shared: int) -> int:
    """The widest row ms_fused_cluster takes: every block's slice within fused_max_classes."""
    v = vector_width(size)
    return fused_max_classes(size, max_shared) // v * v * CLUSTER


def one_pass_max_classes(size: int, device: "DeviceShape") -> int:
    """Planner::one_pass_max_classes (src/op.rs one_pass_max_classes on a CUDA device): the widest
    row loss_and_grad reads once, through ms_fused_cluster where the device has clusters, else
    ms_fused."""
    if device.clusters:
        return cluster_max_classes(size, device.max_shared_per_block)
    return fused_max_classes(size, device.max_shared_per_block)


def partial_blocks_per_sm(size: int) -> int:
    """ms_forward_partial's __launch_bounds__ minimum blocks per SM: 2 for f64, else 4."""
    return 2 if size == 8 else 4


def split_count(rows: int, classes: int, size: int, sm_count: int) -> int:
    """Blocks per row of ms_forward_partial: clamp(floor(2 * resident / B), 1, ceil(C / 4096)),
    resident = SMs * partial_blocks_per_sm(size), as src/backends/launch/mod.rs split_count."""
    resident = max(sm_count, 1) * partial_blocks_per_sm(size)
    return max(min(SPLIT_WAVES * resident // max(rows, 1), div_ceil(classes, SPLIT_MIN_COLUMNS)), 1)


def grid_dim(blocks: int) -> int:
    """Planner::grid: clamp(blocks, 1, MAX_GRID) (every kernel is grid-stride)."""
    return min(max(blocks, 1), MAX_GRID)


def l2_blocks_per_sm(size: int, ext: bool) -> int:
    """ms_fused_l2's blocks per SM (src/backends/launch/mod.rs l2_blocks_per_sm): 2 for f64 and the `_ext`
    entries, else 3; its cooperative grid is that many per SM (the entries' __launch_bounds__
    minimum guarantees at least that many resident: checked on the PTX in --selftest-params)."""
    return 2 if size == 8 or ext else 3


def l2_groups(rows: int, classes: int, size: int, ext: bool, device: "DeviceShape",
              grid_cap: int = MAX_GRID) -> Tuple[int, int, int]:
    """src/backends/launch/mod.rs l2_groups: (rows a group, slices a row, blocks of the grid). A group holds
    floor(L2 / L2_SHARE / row bytes) rows, clamped to [1, max(B, 1)]; the grid is
    SMs * l2_blocks_per_sm within the grid cap; each row gets max(min(grid // G, ceil(C / 4096)), 1)
    slices."""
    row_bytes = max(classes, 1) * size
    group_rows = min(max(device.l2_bytes // L2_SHARE // row_bytes, 1), max(rows, 1))
    grid = min(max(device.sm_count, 1) * l2_blocks_per_sm(size, ext), grid_cap)
    splits = max(min(grid // group_rows, div_ceil(classes, SPLIT_MIN_COLUMNS)), 1)
    return group_rows, splits, grid


# The numbers asserted in src/backends/launch/mod.rs (and documented on MarginSoftmaxLoss::loss_and_grad).
assert [fused_max_classes(n, DEFAULT_SHARED) for n in (4, 2, 8)] == [11_773, 23_545, 5_887]
assert [fused_max_classes(n, 227 * 1024) for n in (4, 2, 8)] == [57_597, 115_193, 28_799]
assert split_count(64, 1_000_000, 4, 132) == 16 and split_count(512, 1_000_000, 2, 132) == 2
assert split_count(2, 1_000_000, 4, 132) == 245
assert [warp_max_classes(n) for n in (4, 2, 8)] == [1021, 2041, 511]
assert cluster_max_classes(2, 227 * 1024) == 921_536 and cluster_max_classes(4, 227 * 1024) == 460_768
assert cluster_slice(128_256, 2) == 16_032
assert l2_groups(512, 1_000_000, 2, False, DEVICE_H200) == (8, 49, 396)
assert l2_groups(64, 1_000_000, 4, False, DEVICE_H200) == (4, 99, 396)


@dataclasses.dataclass(frozen=True)
class Launch:
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_mem: int = 0


TARGETS_LAUNCH = Launch((1, 1, 1), (TARGETS_BLOCK, 1, 1))


# The one-pass kinds of plan_loss_and_grad (LossAndGradPlan::FusedWarp / Fused / FusedCluster) and
# the kernel root each launches (src/backends/cuda/: Inputs::fused with that root, the same arguments).
ONE_PASS_ROOTS = {"fused_warp": "ms_fused_warp", "fused": "ms_fused", "fused_cluster": "ms_fused_cluster"}
# Every kind src/backends/cuda/ launches through Inputs::fused: the one-pass ones and ms_fused_l2 (the same
# 10 arguments, then partials and group_rows; a cooperative launch).
FUSED_ROOTS = {**ONE_PASS_ROOTS, "fused_l2": "ms_fused_l2"}
# The script's kinds -> src/backends/launch/mod.rs LossAndGradPlan's paths, in Planner::loss_and_grad's order.
PLAN_PATHS = {"fused_warp": "FusedWarp", "fused": "Fused", "fused_cluster": "FusedCluster", "fused_l2": "FusedL2",
              "split": "Split"}
# What --selftest-params finds in Planner::loss_and_grad (comments and whitespace removed) for
# each path: the condition, the grid and the dynamic shared memory plan_loss_and_grad computes.
PLAN_PATH_EXPRS = {
    "FusedWarp": [
        "ifshape.classes<=warp_max_classes(size){",
        "letshared=(WARP_ROWS*fused_shared_bytes(shape.classes,size))asu32;",
        "grid:[self.grid(shape.rows.div_ceil(WARP_ROWS)),1,1],block:[BLOCK,1,1],shared_mem_bytes:shared",
    ],
    "Fused": [
        "}elseifshape.classes<=self.fused_max_classes(size){",
        "letshared=fused_shared_bytes(shape.classes,size)asu32;",
        "grid:[self.grid(shape.rows),1,1],block:[BLOCK,1,1],shared_mem_bytes:shared",
    ],
    "FusedCluster": [
        "}elseifself.device.clusters&&shape.classes<=cluster_max_classes(size,self.device.max_shared_per_block){",
        "letshared=fused_shared_bytes(cluster_slice(shape.classes,size),size)asu32;",
        "letclusters=shape.rows.min(self.grid_cap/CLUSTER).max(1);",
        "grid:[(clusters*CLUSTER)asu32,1,1],block:[BLOCK,1,1],shared_mem_bytes:shared",
    ],
    "FusedL2": [
        "}elseifself.device.cooperative{letvariant=kernel_variant(cfg,scale_grad);"
        "letext=variant.ends_with(\"_ext\");",
        "let(group_rows,splits,grid)=l2_groups(shape.rows,shape.classes,size,ext,self.device,self.grid_cap,);",
        "letparams=params(cfg,shape,splits,scale_grad)?;",
        "if(2*group_rows*splits)>i32::MAXasusize{bail!(",
        "Ok(LossAndGradPlan::FusedL2{params,variant,launch:Launch{grid:[gridasu32,1,1],block:[BLOCK,1,1],"
        "shared_mem_bytes:0,},work:L2Work{group_rows,partials_len:shape.rows*splits*PARTIAL_COLUMNS,},})",
    ],
    "Split": [
        "forward:self.forward(cfg,shape,size,scale_grad)?,backward_variant:kernel_variant(cfg,false),"
        "backward:self.backward_launch(shape,size),",
    ],
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The launches of one op, as src/backends/launch/mod.rs Planner plans them. kind: 'fused_warp'
    (ms_fused_warp), 'fused' (ms_fused), 'fused_cluster' (ms_fused_cluster), 'fused_l2'
    (ms_fused_l2, cooperative), 'split' (partial -> finalize -> backward: loss_and_grad), 'forward'
    (partial -> finalize) or 'backward' (ms_backward)."""

    kind: str
    splits: int  # MsParams.splits: ms_forward_partial's blocks a row, ms_fused_l2's slices a row
    variant: str  # the fused kernel's / ms_forward_partial's, or ms_backward's for kind 'backward'
    backward_variant: Optional[str] = None  # ms_backward's, for kind 'split'
    fused: Optional[Launch] = None  # the fused launch (kinds fused_warp, fused, fused_cluster, fused_l2)
    partial: Optional[Launch] = None
    finalize: Optional[Launch] = None
    backward: Optional[Launch] = None
    partials_len: int = 0  # ms_forward_partial's / ms_fused_l2's partial states, in ACC elements
    group_rows: int = 0  # ms_fused_l2's rows a group


def plan_forward(cfg: "LossCfg", rows: int, classes: int, size: int, scale_grad: bool, device: DeviceShape) -> Plan:
    """Planner::forward."""
    splits = split_count(rows, classes, size, device.sm_count)
    blocks = rows * splits
    return Plan("forward", splits, kernel_variant(cfg, scale_grad),
                partial=Launch((grid_dim(blocks), 1, 1), (BLOCK, 1, 1)),
                finalize=Launch((grid_dim(div_ceil(rows, FINALIZE_BLOCK)), 1, 1), (FINALIZE_BLOCK, 1, 1)),
                partials_len=blocks * PARTIAL_COLUMNS)


def backward_launch(rows: int, classes: int, size: int) -> Launch:
    """Planner::backward_launch: column vectors of 16/size elements on x, rows on y."""
    per_block = BLOCK * vector_width(size)
    return Launch((grid_dim(div_ceil(classes, per_block)), grid_dim(rows), 1), (BLOCK, 1, 1))


def plan_backward(cfg: "LossCfg", rows: int, classes: int, size: int) -> Plan:
    """Planner::backward (never `_ext` for the row scale)."""
    return Plan("backward", 1, kernel_variant(cfg, False), backward=backward_launch(rows, classes, size))


def plan_loss_and_grad(cfg: "LossCfg", rows: int, classes: int, size: int, scale_grad: bool,
                       device: DeviceShape, force_split: bool = False) -> Plan:
    """Planner::loss_and_grad, its paths in its order:
    1. ms_fused_warp when C <= warp_max_classes(size): a warp per row, WARP_ROWS rows per block,
       grid ceil(B / 8) (capped), dynamic smem WARP_ROWS * fused_shared_bytes(C) <= 32 KiB;
    2. ms_fused when C <= fused_max_classes(size, the device's opt-in limit): a block per row;
    3. ms_fused_cluster where the device has clusters and C <= cluster_max_classes: a cluster of
       CLUSTER blocks per row, grid CLUSTER * max(1, min(B, MAX_GRID // CLUSTER)), dynamic smem
       fused_shared_bytes(cluster_slice(C)) per block;
    4. ms_fused_l2 where the device has cooperative launch: l2_groups' (group_rows, splits, grid),
       a cooperative launch of grid blocks, no dynamic smem, B * splits * PARTIAL_COLUMNS partials;
    5. else the split forward then ms_backward (force_split: always this one)."""
    variant = kernel_variant(cfg, scale_grad)
    if not force_split and classes <= warp_max_classes(size):
        return Plan("fused_warp", 1, variant,
                    fused=Launch((grid_dim(div_ceil(rows, WARP_ROWS)), 1, 1), (BLOCK, 1, 1),
                                 WARP_ROWS * fused_shared_bytes(classes, size)))
    if not force_split and classes <= fused_max_classes(size, device.max_shared_per_block):
        return Plan("fused", 1, variant,
                    fused=Launch((grid_dim(rows), 1, 1), (BLOCK, 1, 1), fused_shared_bytes(classes, size)))
    if not force_split and device.clusters and classes <= cluster_max_classes(size, device.max_shared_per_block):
        clusters = max(min(rows, MAX_GRID // CLUSTER), 1)  # whole clusters within the grid cap
        return Plan("fused_cluster", 1, variant,
                    fused=Launch((clusters * CLUSTER, 1, 1), (BLOCK, 1, 1),
                                 fused_shared_bytes(cluster_slice(classes, size), size)))
    if not force_split and device.cooperative:
        group_rows, splits, grid = l2_groups(rows, classes, size, variant.endswith("_ext"), device)
        if rows * splits > I32_MAX:  # params(): the rows' slices are counted in an int
            raise ValueError(f"shape ({rows}, {classes}): too many rows for the CUDA forward grid")
        if 2 * group_rows * splits > I32_MAX:  # a phase's work items are counted in an int
            raise ValueError(f"shape ({rows}, {classes}): too many slices for the CUDA L2 kernel")
        return Plan("fused_l2", splits, variant, fused=Launch((grid, 1, 1), (BLOCK, 1, 1), 0),
                    partials_len=rows * splits * PARTIAL_COLUMNS, group_rows=group_rows)
    f = plan_forward(cfg, rows, classes, size, scale_grad, device)
    return dataclasses.replace(f, kind="split", backward_variant=kernel_variant(cfg, False),
                               backward=backward_launch(rows, classes, size))


# ----------------------------------------------------------------------------------------------
# Loss configurations and MsParams::new (src/backends/launch/params.rs, src/math.rs Margin::new).
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


def kernel_variant(cfg: LossCfg, scale_grad: bool) -> str:
    """src/backends/launch/mod.rs kernel_variant: the head's transform, `_ext` with label smoothing,
    soft-capping or (forward / fused only: callers pass False for ms_backward) the row scale's
    gradient."""
    ext = cfg.label_smoothing > 0.0 or cfg.softcap is not None or scale_grad
    kind = cfg.head.kind
    base = "identity" if kind == "softmax" else "rbf" if kind == "rbf" else "cosine"
    return base + ("_ext" if ext else "")


def make_params(cfg: LossCfg, rows: int, classes: int, row_stride: int, splits: int, scale_grad: bool) -> MsParams:
    """MsParams::new of src/backends/launch/params.rs, field for field. (The gradient factor is no longer
    a field: ms_targets writes it to a device buffer that the loss kernels read.)"""
    if min(rows, classes, splits) < 0 or cfg.n_poly < 0:
        raise ValueError("negative size")
    # src/backends/cuda/: B and C below 2^31 (targets travel as int32), rows * splits blocks in a grid.
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
    p.scale_grad = int(scale_grad)
    p.reserved = 0
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

    def angular(m1: float, m2: float, m3: float, easy: bool) -> None:
        p.margin = MARGIN_ARCFACE_COMBINED
        p.m1, p.m2, p.m3 = m1, m2, m3
        p.fallback_shift = m3 + m2 * math.sin(m2)
        p.easy = int(easy)
        p.sin_floor = SIN_FLOOR  # used by the exact mode's derivative only
        p.exact = int(exact)

    if h.kind == "cosface":
        p.margin = MARGIN_COSFACE
        p.additive_m = h.m
    elif h.kind == "arcface":
        angular(1.0, h.m, 0.0, h.easy_margin)
    elif h.kind == "combined":
        angular(h.m1, h.m2, h.m3, False)
    elif h.kind == "sphereface":
        m = int(h.m)
        if not 1 <= m <= MS_MAX_SPHERE_M or m != h.m:
            raise ValueError(f"SphereFace m must be an integer in 1..{MS_MAX_SPHERE_M}, got {h.m}")
        p.margin = MARGIN_SPHEREFACE
        p.sphere_m = m
        setattr(p, "lambda", h.lam)
        for j in range(1, m):
            p.thresholds[j] = math.cos(j * math.pi / m)
        p.exact = int(exact)
    return p


def f32_round(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def upstream_mean(n_valid: int, acc_is_f64: bool) -> float:
    """What ms_targets writes to `upstream` for the mean without class weights: 1 / (sum of
    ones) in the accumulation type (f32 division == f64 division rounded to f32), 0 when no row
    counts (the targets check of the GPU preflight compares the device's value with this)."""
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
            "has_weights", "splits", "weighted_smoothing", "softcapped", "scale_grad", "reserved",
            "neg_inv_gamma", "additive_m", "m1", "m2", "m3", "fallback_shift", "sin_floor", "lambda", "smoothing",
            "total_weight", "focal_gamma", "z_loss", "softcap", "inv_softcap"]
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
                         ("MS_MARGIN_COSFACE", MARGIN_COSFACE), ("MS_MARGIN_ARCFACE_COMBINED", MARGIN_ARCFACE_COMBINED),
                         ("MS_MARGIN_SPHEREFACE", MARGIN_SPHEREFACE), ("MS_STAT_COLUMNS", STAT_COLUMNS),
                         ("MS_ROWINFO_COLUMNS", ROWINFO_COLUMNS), ("MS_PARTIAL_COLUMNS", PARTIAL_COLUMNS),
                         ("MS_BLOCK", BLOCK), ("MS_FINALIZE_BLOCK", FINALIZE_BLOCK),
                         ("MS_TARGETS_BLOCK", TARGETS_BLOCK), ("MS_CLUSTER", CLUSTER),
                         ("MS_TARGET_IGNORED", TARGET_IGNORED),
                         ("MS_TARGET_INVALID", TARGET_INVALID)):
        dm = re.search(rf"#define\s+{macro}\s+\(?\s*(-?\d+)\s*\)?", text)
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


def _rust_int(text: str) -> int:
    """A Rust integer expression of the constants below: 65_535, 48 * 1024, 2048."""
    value = 1
    for factor in text.split("*"):
        value *= int(factor.strip().replace("_", ""))
    return value


def _squash(text: str) -> str:
    """Rust source without comments and with all whitespace removed (for expression checks)."""
    return re.sub(r"\s+", "", re.sub(r"//[^\n]*", "", text))


def check_rust_sources() -> Tuple[List[str], int]:
    """The script's launch planning against src/backends/launch/mod.rs (and src/backends/cuda/'s roots, src/op.rs's
    documented limits) and its mirror of MsParams against src/backends/launch/params.rs: the constants,
    the field order, every number the Rust tests and const asserts state for split_count,
    fused_max_classes, warp_max_classes, cluster_max_classes and cluster_slice, the paths of
    LossAndGradPlan in Planner::loss_and_grad's order with their conditions, grids and shared
    memory. Returns (problems, checks made)."""
    problems, checks = [], 0
    launch = (REPO / "src" / "launch.rs").read_text()
    consts = {"BLOCK": BLOCK, "FINALIZE_BLOCK": FINALIZE_BLOCK, "TARGETS_BLOCK": TARGETS_BLOCK,
              "MAX_GRID": MAX_GRID, "PARTIAL_COLUMNS": PARTIAL_COLUMNS, "DEFAULT_SHARED": DEFAULT_SHARED,
              "FUSED_STATIC_RESERVE": FUSED_STATIC_RESERVE, "SPLIT_MIN_COLUMNS": SPLIT_MIN_COLUMNS,
              "SPLIT_WAVES": SPLIT_WAVES, "WARP_SHARED": WARP_SHARED, "CLUSTER": CLUSTER, "L2_SHARE": L2_SHARE}
    for name, value in consts.items():
        m = re.search(rf"const {name}: \w+ = ([\d_ *]+);", launch)
        checks += 1
        if not m or _rust_int(m.group(1)) != value:
            problems.append(f"src/backends/launch/mod.rs {name} = {m and m.group(1)}, the script has {value}")
    checks += 1
    if not re.search(r"const WARP_ROWS: usize = BLOCK as usize / 32;", launch) or WARP_ROWS != BLOCK // 32:
        problems.append("src/backends/launch/mod.rs WARP_ROWS is not BLOCK / 32 (the script's WARP_ROWS)")
    # The struct's fields, in order (the script's DeviceShape has the same), and the two constants.
    sm = re.search(r"pub struct DeviceShape \{(.*?)\n\}", launch, re.S)
    checks += 1
    rust_dev_fields = re.findall(r"pub (\w+):", sm.group(1)) if sm else []
    if rust_dev_fields != [f.name for f in dataclasses.fields(DeviceShape)]:
        problems.append(f"src/backends/launch/mod.rs DeviceShape fields {rust_dev_fields}, the script's "
                        f"{[f.name for f in dataclasses.fields(DeviceShape)]}")
    for name, dev in (("DEFAULT", DEVICE_DEFAULT), ("H200", DEVICE_H200)):
        m = re.search(rf"const {name}: DeviceShape = DeviceShape \{{\s*sm_count: ([\d_]+),\s*"
                      rf"max_shared_per_block: ([\w_ *]+),\s*clusters: (true|false),\s*"
                      rf"cooperative: (true|false),\s*l2_bytes: ([\d_ *]+),", launch)
        checks += 1
        if not m:
            problems.append(f"src/backends/launch/mod.rs: DeviceShape::{name} {{ sm_count, max_shared_per_block, clusters, "
                            "cooperative, l2_bytes }} not found")
            continue
        shared = DEFAULT_SHARED if m.group(2).strip() == "DEFAULT_SHARED" else _rust_int(m.group(2))
        got = (_rust_int(m.group(1)), shared, m.group(3) == "true", m.group(4) == "true", _rust_int(m.group(5)))
        if got != dataclasses.astuple(dev):
            problems.append(f"src/backends/launch/mod.rs DeviceShape::{name} = {got}, the script has {dev}")
    devices = {"d": DEVICE_H200, "DeviceShape::H200": DEVICE_H200, "DeviceShape::DEFAULT": DEVICE_DEFAULT}
    found = 0
    for m in re.finditer(r"assert_eq!\(split_count\(([\d_]+), ([\d_]+), (\d+), ([\w:]+)\), ([\d_]+)\)", launch):
        rows, classes, size, dev, want = m.groups()
        found += 1
        checks += 1
        got = split_count(_rust_int(rows), _rust_int(classes), int(size), devices[dev].sm_count)
        if got != _rust_int(want):
            problems.append(f"split_count({rows}, {classes}, {size}, {dev}) = {got}, src/backends/launch/mod.rs says {want}")
    for m in re.finditer(r"fused_max_classes\((\d+), ([\w_ *]+)\) == ([\d_]+)", launch):
        size, shared, want = m.groups()
        found += 1
        checks += 1
        shared_v = DEFAULT_SHARED if shared.strip() == "DEFAULT_SHARED" else _rust_int(shared)
        got = fused_max_classes(int(size), shared_v)
        if got != _rust_int(want):
            problems.append(f"fused_max_classes({size}, {shared}) = {got}, src/backends/launch/mod.rs says {want}")
    if found < 8:
        problems.append(f"src/backends/launch/mod.rs: only {found} split_count / fused_max_classes asserts found (expected >= 8)")
    found = 0
    for m in re.finditer(r"warp_max_classes\((\d+)\) == ([\d_]+)", launch):
        size, want = m.groups()
        found += 1
        checks += 1
        if warp_max_classes(int(size)) != _rust_int(want):
            problems.append(f"warp_max_classes({size}) = {warp_max_classes(int(size))}, src/backends/launch/mod.rs says {want}")
    for m in re.finditer(r"cluster_max_classes\((\d+), ([\w_ *]+)\) == ([\d_]+)", launch):
        size, shared, want = m.groups()
        found += 1
        checks += 1
        got = cluster_max_classes(int(size), _rust_int(shared))
        if got != _rust_int(want):
            problems.append(f"cluster_max_classes({size}, {shared}) = {got}, src/backends/launch/mod.rs says {want}")
    for m in re.finditer(r"assert_eq!\(cluster_slice\(([\d_]+), (\d+)\), ([\d_]+)\)", launch):
        classes, size, want = m.groups()
        found += 1
        checks += 1
        got = cluster_slice(_rust_int(classes), int(size))
        if got != _rust_int(want):
            problems.append(f"cluster_slice({classes}, {size}) = {got}, src/backends/launch/mod.rs says {want}")
    if found < 6:
        problems.append(f"src/backends/launch/mod.rs: only {found} warp_max_classes / cluster_max_classes / cluster_slice "
                        "asserts found (expected >= 6)")
    # ms_fused_l2's planning: l2_blocks_per_sm and l2_groups as the script computes them, and the
    # (group_rows, splits, grid) of src/backends/launch/mod.rs's l2_path_on_h200 test.
    fns = {}
    for fname in ("l2_blocks_per_sm", "l2_groups"):
        fm = re.search(rf"fn {fname}\((.*?)\n\}}\n", launch, re.S)
        fns[fname] = _squash(fm.group(1)) if fm else ""
    for fname, expr in (
            ("l2_blocks_per_sm", "size:usize,ext:bool)->usize{ifsize==8||ext{2}else{3}"),
            ("l2_groups", "letrow_bytes=classes.max(1)*size;"),
            ("l2_groups", "letgroup_rows=(device.l2_bytes/L2_SHARE/row_bytes).clamp(1,rows.max(1));"),
            ("l2_groups", "letgrid=(device.sm_count.max(1)*l2_blocks_per_sm(size,ext)).min(grid_cap);"),
            ("l2_groups", "letsplits=(grid/group_rows).min(classes.div_ceil(SPLIT_MIN_COLUMNS)).max(1);"),
            ("l2_groups", "(group_rows,splits,grid)")):
        checks += 1
        if expr not in fns[fname]:
            problems.append(f"src/backends/launch/mod.rs {fname}: `{expr}` not found (the script's {fname} computes that)")
    tm = re.search(r"fn l2_path_on_h200\(\) \{(.*?)\n    \}\n", launch, re.S)
    l2_test = tm.group(1) if tm else ""
    arc_l2 = LossCfg(HeadCfg("arcface", s=64.0, m=0.5))
    l2_cfgs = {"arcface": arc_l2, "smooth": dataclasses.replace(arc_l2, label_smoothing=0.1)}
    found = 0
    for m in re.finditer(r"check\(&(\w+), ([\d_]+), ([\d_]+), (\d+), \(([\d_]+), ([\d_]+), ([\d_]+)\)\);", l2_test):
        name, rows, classes, size = m.group(1), _rust_int(m.group(2)), _rust_int(m.group(3)), int(m.group(4))
        want_l2 = tuple(_rust_int(v) for v in m.groups()[4:])
        found += 1
        checks += 1
        if name not in l2_cfgs:
            problems.append(f"src/backends/launch/mod.rs l2_path_on_h200: unknown configuration `{name}` (the script knows "
                            f"{list(l2_cfgs)})")
            continue
        pl = plan_loss_and_grad(l2_cfgs[name], rows, classes, size, False, DEVICE_H200)
        got = (pl.kind, (pl.group_rows, pl.splits, pl.fused and pl.fused.grid[0]), pl.partials_len)
        if got != ("fused_l2", want_l2, rows * want_l2[1] * PARTIAL_COLUMNS):
            problems.append(f"{name} {rows}x{classes} size {size} on an H200: the script plans {got}, "
                            f"src/backends/launch/mod.rs l2_path_on_h200 says FusedL2 {want_l2}")
    for m in re.finditer(r"Planner::grid_cap\((\d+), DeviceShape::H200\);.*?shape\(([\d_]+), ([\d_]+)\), (\d+), "
                         r"false\).*?=> assert_eq!\(\(group_rows, params\.splits, launch\.grid\[0\]\), "
                         r"\(([\d_]+), ([\d_]+), ([\d_]+)\)\)", l2_test, re.S):
        cap, rows, classes, size = (_rust_int(v) for v in m.groups()[:4])
        want_l2 = tuple(_rust_int(v) for v in m.groups()[4:])
        found += 1
        checks += 1
        got = l2_groups(rows, classes, size, False, DEVICE_H200, grid_cap=cap)
        if got != want_l2:
            problems.append(f"l2_groups({rows}, {classes}, {size}, false, H200, cap {cap}) = {got}, "
                            f"src/backends/launch/mod.rs l2_path_on_h200 says {want_l2}")
    if found < 7:
        problems.append(f"src/backends/launch/mod.rs l2_path_on_h200: only {found} (group_rows, splits, grid) checks found "
                        "(expected >= 7)")
    # The definitions of the limits, as the script computes them.
    defs = _squash(launch)
    for what, expr in (
            ("warp_max_classes", "fused_max_classes(size,WARP_SHARED/WARP_ROWS+FUSED_STATIC_RESERVE)"),
            ("cluster_slice", "classes.div_ceil(CLUSTER).next_multiple_of(vector_width(size))"),
            ("cluster_max_classes",
             "fused_max_classes(size,max_shared)/vector_width(size)*vector_width(size)*CLUSTER"),
            ("one_pass_max_classes", "ifself.device.clusters{cluster_max_classes(size,self.device.max_shared_per_block)"
                                     "}else{self.fused_max_classes(size)}")):
        checks += 1
        if expr not in defs:
            problems.append(f"src/backends/launch/mod.rs {what}: `{expr}` not found (the script's {what} computes that)")
    em = re.search(r"pub\(crate\) enum LossAndGradPlan \{(.*?)\n\}", launch, re.S)
    paths = re.findall(r"^    (\w+) \{", em.group(1), re.M) if em else []
    checks += 1
    if sorted(paths) != sorted(PLAN_PATHS.values()):
        problems.append(f"src/backends/launch/mod.rs LossAndGradPlan has the paths {paths}; the script models "
                        f"{list(PLAN_PATHS.values())} "
                        "(plan_loss_and_grad): update it")
    # Planner::loss_and_grad: the paths in the script's order, each with its condition and launch.
    lm = re.search(r"pub\(crate\) fn loss_and_grad\((.*?)\n    \}\n", launch, re.S)
    body = _squash(lm.group(1)) if lm else ""
    order = re.findall(r"LossAndGradPlan::(\w+)\{", body)
    checks += 1
    if order != list(PLAN_PATHS.values()):
        problems.append(f"src/backends/launch/mod.rs Planner::loss_and_grad plans {order}, in that order; the script plans "
                        f"{list(PLAN_PATHS.values())}")
    for path, exprs in PLAN_PATH_EXPRS.items():
        for expr in exprs:
            checks += 1
            if expr not in body:
                problems.append(f"src/backends/launch/mod.rs Planner::loss_and_grad ({path}): `{expr}` not found; the script's "
                                "plan_loss_and_grad is written after it")
    # Every one-pass path: one split, the variant with scale_grad (Plan(kind, 1, variant) above).
    one_pass = "params:params(cfg,shape,1,scale_grad)?,variant:kernel_variant(cfg,scale_grad),"
    checks += 1
    if body.count(one_pass) != len(ONE_PASS_ROOTS):
        problems.append(f"src/backends/launch/mod.rs Planner::loss_and_grad: `{one_pass}` found {body.count(one_pass)} times, "
                        f"the script's {len(ONE_PASS_ROOTS)} one-pass paths use it")
    # src/backends/cuda/: each fused path launches its root through Inputs::fused (ms_fused's arguments).
    cuda = _squash((REPO / "src" / "cuda.rs").read_text())
    roots = dict(re.findall(r"LossAndGradPlan::(\w+)\{[\w,]*\}=>inputs\.fused\(\"(\w+)\"", cuda))
    want_roots = {PLAN_PATHS[k]: v for k, v in FUSED_ROOTS.items()}
    checks += 1
    if roots != want_roots:
        problems.append(f"src/backends/cuda/ launches the fused paths as {roots}; the script as {want_roots}")
    # ms_fused_l2: the one-pass paths without L2 work; FusedL2 with its group_rows and partials_len,
    # appended as `ACC* partials, long long group_rows`, launched cooperatively; DeviceShape's two
    # new fields from the device attributes the script reads (query_device_shape).
    cuda_module = _squash((REPO / "src" / "cuda_module.rs").read_text())
    for where, text, expr in (
            ("src/backends/cuda/", cuda, "(params,variant,fused),weights,None"),
            ("src/backends/cuda/", cuda, "(params,variant,cluster),weights,None"),
            ("src/backends/cuda/", cuda, "LossAndGradPlan::FusedL2{params,variant,launch,work,}"
                                  "=>inputs.fused(\"ms_fused_l2\",(params,variant,launch),weights,"
                                  "Some(*work),)"),
            ("src/backends/cuda/", cuda, "self.dev.alloc::<T::Acc>(work.partials_len)}?,work.group_rowsasi64,"),
            ("src/backends/cuda/", cuda, "b.arg(&self.targets.upstream);ifletSome((partials,group_rows))=&mutl2{"
                                  "b.arg(partials);b.arg(&*group_rows);}"),
            ("src/backends/cuda/", cuda, "ifcooperative{b.launch_cooperative(config(launch))}else{b.launch(config(launch))}"),
            ("src/backends/cuda/", cuda, "cooperative:limits.cooperative_launch,l2_bytes:limits.l2_bytes,"),
            ("src/backends/cuda/module.rs", cuda_module, "CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH,"),
            ("src/backends/cuda/module.rs", cuda_module, "CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE,")):
        checks += 1
        if expr not in text:
            problems.append(f"{where}: `{expr}` not found (the script's ms_fused_l2 launch / device query "
                            "follows it)")
    # src/op.rs documents the one-pass limits: the script's values must be the ones it states.
    op = (REPO / "src" / "op.rs").read_text()
    dm = re.search(r"((?:\s*///[^\n]*\n)+)\s*pub fn one_pass_max_classes", op)
    doc = " ".join(l.strip().lstrip("/").strip() for l in dm.group(1).splitlines()) if dm else ""
    doc_numbers = {int(n.replace(" ", "")) for n in re.findall(r"\d{1,3}(?: \d{3})+|\d+", doc)}
    stated = [(dev, sz) for dev in (DEVICE_H200, DEVICE_A100, DEVICE_DEFAULT) for sz in (4, 2, 8)]
    values = [one_pass_max_classes(sz, dev) for dev, sz in stated]
    values += [fused_max_classes(sz, DEVICE_H200.max_shared_per_block) for sz in (4, 2, 8)]
    missing = [v for v in values if v not in doc_numbers]
    checks += 1
    if not doc or missing:
        problems.append(f"src/op.rs one_pass_max_classes docs: the script's limits {missing or values} are not "
                        "stated there (H200 cluster / block, A100, 48 KiB)")
    kp = (REPO / "src" / "kernel_params.rs").read_text()
    sm = re.search(r"pub\(crate\) struct MsParams \{(.*?)\n\}", kp, re.S)
    rust_fields = re.findall(r"pub (\w+):", sm.group(1)) if sm else []
    checks += 1
    ours = [n for n, _ in _MS_FIELDS]
    if rust_fields != ours:
        problems.append(f"src/backends/launch/params.rs MsParams fields {rust_fields} differ from the script's {ours}")
    return problems, checks


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
    """Each .entry's parameters, in order: '8' (.u64 / .b64 / .s64: a pointer or a long long),
    '4' (.u32 / .b32 / .s32: an int) or 'S<size>/<align>' (a by-value byte blob)."""
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
                params.append("8")
            elif re.search(r"\.(u32|b32|s32)\b", decl):
                params.append("4")
            else:
                params.append("?" + decl)
        entries[m.group(1)] = params
    return entries


def ptx_params_of(sig: str) -> List[str]:
    """The PTX parameter list a signature of ENTRY_SIGNATURES compiles to."""
    return [{"p": "8", "q": "8", "i": "4", "S": f"S{MS_PARAMS_SIZE}/8"}[c] for c in sig]


def expected_entries(suffixes: List[str], arch: str) -> Dict[str, Tuple[str, str]]:
    """Every entry point the launches may name for these element suffixes, compiled for `arch`:
    name -> (module, root). ms_targets comes for both accumulation types whatever the element
    types; ms_fused_cluster only from sm_90 (ENTRY_MIN_ARCH)."""
    want = {}
    for root in ENTRY_SIGNATURES:
        if arch_number(arch) < ENTRY_MIN_ARCH.get(root, 0):
            continue
        sfxs = ACC_SUFFIXES if root == "ms_targets" else suffixes
        for sfx in sfxs:
            for name in entry_names(root, sfx):
                want[name] = (ENTRY_MODULE[root], root)
    return want


def check_ptx_signatures(ptx_paths: Dict[str, Path], suffixes: List[str],
                         arch: str) -> Tuple[List[str], int, List[str]]:
    """The PTX's kernel parameter lists (count and sizes) against ENTRY_SIGNATURES, for every
    entry the launches may name (per variant, per element type; ms_targets per target and
    accumulation type) when compiled for `arch`; below an entry's ENTRY_MIN_ARCH its absence
    is checked too. Returns (problems, entries checked, the PTX's entries the script does not
    know: not an error by themselves, the script never launches them)."""
    problems, unknown = [], []
    by_module = {stem: ptx_entries(path.read_text()) for stem, path in ptx_paths.items()}
    want = expected_entries(suffixes, arch)
    for root, min_arch in ENTRY_MIN_ARCH.items():
        if arch_number(arch) < min_arch:
            present = [n for n in by_module.get(ENTRY_MODULE[root], {}) if n.startswith(root + "_")]
            if present:
                problems.append(f"{arch}: {len(present)} {root}_* entries in {ENTRY_MODULE[root]}.ptx (e.g. "
                                f"{present[0]}); the script expects them from sm_{min_arch} only")
    for name, (module, root) in want.items():
        expect = ptx_params_of(ENTRY_SIGNATURES[root])
        got = by_module.get(module, {}).get(name)
        if got is None:
            problems.append(f"{name}: not in {module}.ptx")
        elif got != expect:
            problems.append(f"{name}: PTX parameters {got} ({len(got)}), the launches pass {expect} ({len(expect)})")
    for module, entries in by_module.items():
        unknown += [f"{module}.ptx: {name}" for name in entries if name not in want]
    return problems, len(want), unknown


_BOUNDS_RE = re.compile(r"\.entry\s+(\w+)\s*\(.*?\)\s*((?:\.(?:maxntid|minnctapersm|reqntid|maxnreg|explicitcluster|"
                        r"reqnctapercluster|maxclusterrank)[^\n]*\n\s*)*)", re.S)


def ptx_launch_bounds(ptx_text: str) -> Dict[str, Tuple[Optional[int], Optional[int]]]:
    """Each .entry's __launch_bounds__ as the PTX states them: (.maxntid's x, .minnctapersm), None
    where absent."""
    out = {}
    for m in _BOUNDS_RE.finditer(ptx_text):
        mx = re.search(r"\.maxntid\s+(\d+)", m.group(2))
        mn = re.search(r"\.minnctapersm\s+(\d+)", m.group(2))
        out[m.group(1)] = (int(mx.group(1)) if mx else None, int(mn.group(1)) if mn else None)
    return out


def check_l2_launch_bounds(ptx_paths: Dict[str, Path], suffixes: List[str]) -> Tuple[List[str], List[str], int]:
    """ms_fused_l2's cooperative grid is l2_blocks_per_sm(size, ext) blocks per SM (src/backends/launch/mod.rs),
    which the driver launches only if that many are co-resident: each entry's __launch_bounds__
    (.maxntid BLOCK, .minnctapersm N) must guarantee N >= that (no dynamic shared memory; its
    static shared memory is a few bytes). Returns (problems, notes where N is larger than the
    planned count, entries checked)."""
    problems, notes = [], []
    bounds = ptx_launch_bounds(ptx_paths[ENTRY_MODULE["ms_fused_l2"]].read_text()) \
        if ENTRY_MODULE["ms_fused_l2"] in ptx_paths else {}
    n = 0
    for sfx in suffixes:
        size = DTYPE_INFO[sfx][1]
        for name in entry_names("ms_fused_l2", sfx):
            ext = name[:-len(sfx) - 1].endswith("_ext")
            planned = l2_blocks_per_sm(size, ext)
            n += 1
            maxntid, min_blocks = bounds.get(name, (None, None))
            if maxntid != BLOCK or min_blocks is None or min_blocks < planned:
                problems.append(f"{name}: __launch_bounds__ (.maxntid {maxntid}, .minnctapersm {min_blocks}) do not "
                                f"guarantee the {planned} blocks of {BLOCK} per SM its cooperative grid launches "
                                "(src/backends/launch/mod.rs l2_blocks_per_sm)")
            elif min_blocks != planned:
                notes.append(f"{name}: .minnctapersm {min_blocks}, the plan launches {planned} per SM")
    return problems, notes, n


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


def selftest_configs() -> List[Tuple[str, LossCfg, Tuple[int, int], bool]]:
    """(label, configuration, (B, C), scale_grad)."""
    return [
        ("softmax", LossCfg(HeadCfg("softmax", s=1.0)), (8192, 32000), False),
        ("softmax_ls0.1", LossCfg(HeadCfg("softmax", s=1.0), label_smoothing=0.1), (4096, 128256), False),
        ("arcface_exact", LossCfg(HeadCfg("arcface", s=64.0, m=0.5)), (512, 1_000_000), False),
        ("arcface_detached", LossCfg(HeadCfg("arcface", s=64.0, m=0.5), margin_grad="detached"), (1024, 45000),
         False),
        ("arcface_easy_scale", LossCfg(HeadCfg("arcface", s=64.0, m=0.5, easy_margin=True)), (37, 1001), True),
        ("combined", LossCfg(HeadCfg("combined", s=64.0, m1=1.0, m2=0.3, m3=0.2)), (256, 8000), False),
        ("cosface_focal_poly_z", LossCfg(HeadCfg("cosface", s=64.0, m=0.35), focal_gamma=2.0, z_loss=1e-4,
                                         n_poly=1, has_weights=True, margin_grad="detached"), (64, 50000), False),
        ("sphereface_m4", LossCfg(HeadCfg("sphereface", s=30.0, m=4, lam=5.0)), (3, 23552), False),
        ("rbf_softcap", LossCfg(HeadCfg("rbf", s=35.0, gamma=16.0), softcap=30.0), (5, 40001), False),
        ("f32_64x1e6", LossCfg(HeadCfg("softmax", s=1.0)), (64, 1_000_000), False),
    ]


def selftest_planning() -> Tuple[List[str], int]:
    """The launch planning (src/backends/launch/mod.rs) on the numbers of its tests and the brief's, plus the
    variants of src/backends/launch/mod.rs's `variants` test and the plans of the issue's shapes on an H200."""
    problems, checks = [], 0

    def want(what: str, got, expect) -> None:
        nonlocal checks
        checks += 1
        if got != expect:
            problems.append(f"{what} = {got!r}, want {expect!r}")

    for size, w48, w227 in ((4, 11_773, 57_597), (2, 23_545, 115_193), (8, 5_887, 28_799)):
        want(f"fused_max_classes({size}, 48 KiB)", fused_max_classes(size, 48 * 1024), w48)
        want(f"fused_max_classes({size}, 227 KiB)", fused_max_classes(size, 227 * 1024), w227)
        for shared in (48 * 1024, 99 * 1024, 163 * 1024, 227 * 1024):
            limit = fused_max_classes(size, shared)
            checks += 1
            if not (fused_shared_bytes(limit, size) + FUSED_STATIC_RESERVE <= shared
                    < fused_shared_bytes(limit + 1, size) + FUSED_STATIC_RESERVE
                    and fused_shared_bytes(limit, size) >= (limit + 16 // size - 1) * size
                    and fused_shared_bytes(limit, size) % 16 == 0):
                problems.append(f"fused_max_classes({size}, {shared}) = {limit} is not the largest C that fits")
    for args, expect in (((1, 1, 4, 132), 1), ((0, 100, 4, 132), 1), ((4, 11_777, 4, 132), 3),
                         ((64, 1_000_000, 4, 132), 16), ((64, 1_000_000, 8, 132), 8),
                         ((512, 1_000_000, 2, 132), 2), ((1024, 32_000, 2, 132), 1),
                         ((2, 1_000_000, 4, 132), 245)):
        want(f"split_count{args}", split_count(*args), expect)
    # ms_fused_warp: 1021 f32, 2041 f16 / bf16, 511 f64 classes; the largest C whose WARP_ROWS slots
    # fit in WARP_SHARED.
    for size, w in ((4, 1021), (2, 2041), (8, 511)):
        limit = warp_max_classes(size)
        want(f"warp_max_classes({size})", limit, w)
        checks += 1
        if not (WARP_ROWS * fused_shared_bytes(limit, size) <= WARP_SHARED
                < WARP_ROWS * fused_shared_bytes(limit + 1, size)):
            problems.append(f"warp_max_classes({size}) = {limit} is not the largest C whose {WARP_ROWS} slots fit "
                            f"in {WARP_SHARED} B")
    # ms_fused_cluster: 921536 bf16, 460768 f32, 230384 f64 at 227 KiB; every block's slice of the
    # widest row fits, one more class does not.
    want("cluster_slice(128256, 2)", cluster_slice(128_256, 2), 16_032)
    want("cluster_slice(1, 4)", cluster_slice(1, 4), 4)
    for size, w in ((2, 921_536), (4, 460_768), (8, 230_384)):
        want(f"cluster_max_classes({size}, 227 KiB)", cluster_max_classes(size, 227 * 1024), w)
        want(f"one_pass_max_classes({size}, H200)", one_pass_max_classes(size, DEVICE_H200), w)
        for shared in (48 * 1024, 163 * 1024, 227 * 1024):
            limit = cluster_max_classes(size, shared)
            checks += 1
            fits = lambda c: fused_shared_bytes(cluster_slice(c, size), size) + FUSED_STATIC_RESERVE <= shared
            if not (fits(limit) and not fits(limit + 1) and limit % (CLUSTER * vector_width(size)) == 0):
                problems.append(f"cluster_max_classes({size}, {shared}) = {limit} is not the largest C whose "
                                f"{CLUSTER} slices fit")
    for size, w in ((4, 41_213), (2, 82_425), (8, 20_607)):  # src/op.rs's A100 (no clusters)
        want(f"one_pass_max_classes({size}, A100)", one_pass_max_classes(size, DEVICE_A100), w)
    want("one_pass_max_classes(2, 48 KiB)", one_pass_max_classes(2, DEVICE_DEFAULT), 23_545)
    want("fused_shared_bytes(32000, 2)", fused_shared_bytes(32000, 2), 64016)
    want("fused_shared_bytes(1, 4)", fused_shared_bytes(1, 4), 16)
    want("backward_launch(8192, 32000, 2)", backward_launch(8192, 32000, 2).grid, (16, 8192, 1))
    want("backward_launch(100000, 5000, 4)", backward_launch(100_000, 5000, 4).grid, (5, MAX_GRID, 1))
    sm = LossCfg(HeadCfg("softmax", s=1.0))
    want("kernel_variant(softmax, false)", kernel_variant(sm, False), "identity")
    want("kernel_variant(softmax, true)", kernel_variant(sm, True), "identity_ext")
    want("kernel_variant(softmax ls 0.1, false)", kernel_variant(dataclasses.replace(sm, label_smoothing=0.1), False),
         "identity_ext")
    want("kernel_variant(softmax softcap, false)", kernel_variant(dataclasses.replace(sm, softcap=30.0), False),
         "identity_ext")
    want("kernel_variant(arcface, false)", kernel_variant(LossCfg(HeadCfg("arcface", s=64, m=0.5)), False), "cosine")
    want("kernel_variant(cosface, true)", kernel_variant(LossCfg(HeadCfg("cosface", s=64, m=0.35)), True),
         "cosine_ext")
    want("kernel_variant(rbf, false)", kernel_variant(LossCfg(HeadCfg("rbf", s=35)), False), "rbf")
    want("kernel_variant(rbf ls, false)", kernel_variant(LossCfg(HeadCfg("rbf", s=35), label_smoothing=0.1), False),
         "rbf_ext")
    # The plans of the issue's shapes on an H200 (132 SMs, 227 KiB, clusters).
    p1 = plan_loss_and_grad(sm, 8192, 32000, 2, False, DEVICE_H200)
    want("H200 8192x32000 bf16 plan", (p1.kind, p1.variant, p1.fused), ("fused", "identity",
                                                                          Launch((8192, 1, 1), (256, 1, 1), 64016)))
    p2 = plan_loss_and_grad(sm, 4096, 128256, 2, False, DEVICE_H200)
    want("H200 4096x128256 bf16 plan", (p2.kind, p2.variant, p2.fused),
         ("fused_cluster", "identity", Launch((4096 * 8, 1, 1), (256, 1, 1), fused_shared_bytes(16_032, 2))))
    want("fused_shared_bytes(16032, 2)", fused_shared_bytes(16_032, 2), 32080)
    # Without clusters the row past one block takes ms_fused_l2 (src/backends/launch/mod.rs: "No clusters without
    # the capability"), and without cooperative launch as well the split path.
    p2s = plan_loss_and_grad(sm, 4096, 128256, 2, False, dataclasses.replace(DEVICE_H200, clusters=False))
    want("H200 without clusters 4096x128256 bf16 plan", (p2s.kind, p2s.group_rows, p2s.splits, p2s.fused.grid),
         ("fused_l2", 68, 5, (396, 1, 1)))
    p2n = plan_loss_and_grad(sm, 4096, 128256, 2, False,
                             dataclasses.replace(DEVICE_H200, clusters=False, cooperative=False))
    want("H200 without clusters or cooperative launch 4096x128256 bf16 plan",
         (p2n.kind, p2n.splits, p2n.partial.grid, p2n.backward.grid), ("split", 1, (4096, 1, 1), (63, 4096, 1)))
    # The issue's two rows past a cluster: ms_fused_l2 (src/backends/launch/mod.rs l2_path_on_h200): groups of 8
    # rows x 49 slices and of 4 x 99, 396 blocks (3 per SM), a cooperative launch without dynamic smem.
    p3 = plan_loss_and_grad(sm, 512, 1_000_000, 2, False, DEVICE_H200)
    want("H200 512x1000000 bf16 plan", (p3.kind, p3.variant, p3.group_rows, p3.splits, p3.fused, p3.partials_len),
         ("fused_l2", "identity", 8, 49, Launch((396, 1, 1), (256, 1, 1), 0), 512 * 49 * PARTIAL_COLUMNS))
    p4 = plan_loss_and_grad(sm, 64, 1_000_000, 4, False, DEVICE_H200)
    want("H200 64x1000000 f32 plan", (p4.kind, p4.variant, p4.group_rows, p4.splits, p4.fused, p4.partials_len),
         ("fused_l2", "identity", 4, 99, Launch((396, 1, 1), (256, 1, 1), 0), 64 * 99 * PARTIAL_COLUMNS))
    # The same rows with label smoothing (ce_ls: identity_ext, 2 blocks per SM) and for arcface.
    ls = dataclasses.replace(sm, label_smoothing=0.1)
    p3e = plan_loss_and_grad(ls, 512, 1_000_000, 2, False, DEVICE_H200)
    want("H200 512x1000000 bf16 ls plan", (p3e.kind, p3e.variant, p3e.group_rows, p3e.splits, p3e.fused.grid),
         ("fused_l2", "identity_ext", 8, 33, (264, 1, 1)))
    p4e = plan_loss_and_grad(ls, 64, 1_000_000, 4, False, DEVICE_H200)
    want("H200 64x1000000 f32 ls plan", (p4e.kind, p4e.variant, p4e.group_rows, p4e.splits, p4e.fused.grid),
         ("fused_l2", "identity_ext", 4, 66, (264, 1, 1)))
    p3a = plan_loss_and_grad(LossCfg(HeadCfg("arcface", s=64.0, m=0.5)), 512, 1_000_000, 2, False, DEVICE_H200)
    want("H200 512x1000000 bf16 arcface plan", (p3a.kind, p3a.variant, p3a.group_rows, p3a.splits),
         ("fused_l2", "cosine", 8, 49))
    # An H200 without cooperative launch: the split path (src/backends/launch/mod.rs: "Nor the L2 kernel without
    # cooperative launch"), 2 and 16 blocks per row.
    plain = dataclasses.replace(DEVICE_H200, cooperative=False)
    p3s = plan_loss_and_grad(sm, 512, 1_000_000, 2, False, plain)
    want("H200 without cooperative launch 512x1000000 bf16 plan",
         (p3s.kind, p3s.splits, p3s.partial.grid, p3s.finalize.grid, p3s.partials_len),
         ("split", 2, (1024, 1, 1), (4, 1, 1), 1024 * PARTIAL_COLUMNS))
    p4s = plan_loss_and_grad(sm, 64, 1_000_000, 4, False, plain)
    want("H200 without cooperative launch 64x1000000 f32 plan", (p4s.kind, p4s.splits, p4s.partial.grid,
                                                                  p4s.backward.grid),
         ("split", 16, (1024, 1, 1), (977, 64, 1)))
    # l2_groups on the numbers of src/backends/launch/mod.rs l2_path_on_h200, and its bounds: a group's inputs
    # within 1 / L2_SHARE of the L2 (or one row), at most one slice to read and one to write per
    # block in a phase, slices of at least SPLIT_MIN_COLUMNS columns (or one).
    for args_, expect in (((512, 1_000_000, 2, False), (8, 49, 396)), ((64, 1_000_000, 4, False), (4, 99, 396)),
                          ((64, 1_000_000, 8, False), (2, 132, 264)), ((64, 1_000_000, 4, True), (4, 66, 264)),
                          ((3, 10_000_000, 4, False), (1, 396, 396)), ((3, 500_000, 8, False), (3, 88, 264))):
        want(f"l2_groups{args_} on an H200", l2_groups(*args_, DEVICE_H200), expect)
    want("l2_groups(2, 460769, 4, false, H200, cap 16)", l2_groups(2, 460_769, 4, False, DEVICE_H200, 16), (2, 8, 16))
    want("l2_groups(0, 0, 2, false, 48 KiB)", l2_groups(0, 0, 2, False, DEVICE_DEFAULT), (1, 1, 396))
    for rows, classes, size, ext in ((512, 1_000_000, 2, False), (64, 1_000_000, 4, True), (3, 10_000_000, 4, False),
                                     (100_000, 921_537, 2, False), (7, 4097, 8, True), (5000, 1_000_000, 4, False)):
        g, s, grid = l2_groups(rows, classes, size, ext, DEVICE_H200)
        checks += 1
        if not ((g == 1 or g * classes * size <= DEVICE_H200.l2_bytes // L2_SHARE) and g * s <= grid
                and (s == 1 or s <= div_ceil(classes, SPLIT_MIN_COLUMNS)) and 1 <= g <= rows
                and grid == DEVICE_H200.sm_count * l2_blocks_per_sm(size, ext)):
            problems.append(f"l2_groups({rows}, {classes}, {size}, {ext}, H200) = {(g, s, grid)} breaks its bounds")
    p5 = plan_loss_and_grad(dataclasses.replace(sm, label_smoothing=0.1), 3, 40000, 2, True, DEVICE_DEFAULT)
    want("48 KiB 3x40000 bf16 ls + scale_grad plan", (p5.kind, p5.variant, p5.backward_variant),
         ("split", "identity_ext", "identity_ext"))
    p6 = plan_loss_and_grad(sm, 3, 40000, 2, True, DEVICE_DEFAULT)
    want("48 KiB 3x40000 bf16 scale_grad plan (ms_backward never _ext for the scale)",
         (p6.variant, p6.backward_variant), ("identity_ext", "identity"))
    want("100000x8 f32 partial grid (capped)", plan_forward(sm, 100_000, 8, 4, False, DEVICE_H200).partial.grid,
         (MAX_GRID, 1, 1))
    # The path boundaries (src/backends/launch/mod.rs path_boundary_per_dtype_and_device, warp_path_for_narrow_rows,
    # cluster_path_on_h200).
    arc = LossCfg(HeadCfg("arcface", s=64.0, m=0.5))
    for dev_name, dev in (("48 KiB", DEVICE_DEFAULT), ("H200", DEVICE_H200)):
        for size in (2, 4, 8):
            w, f, c = warp_max_classes(size), fused_max_classes(size, dev.max_shared_per_block), \
                one_pass_max_classes(size, dev)
            pw = plan_loss_and_grad(sm, 17, w, size, False, dev)
            want(f"{dev_name} 17x{w} size {size} plan", (pw.kind, pw.fused.grid),
                 ("fused_warp", (3, 1, 1)))
            checks += 1
            if pw.fused.shared_mem != WARP_ROWS * fused_shared_bytes(w, size) or pw.fused.shared_mem > WARP_SHARED:
                problems.append(f"{dev_name} 17x{w} size {size}: ms_fused_warp smem {pw.fused.shared_mem}")
            want(f"{dev_name} 17x{w + 1} size {size} plan", plan_loss_and_grad(sm, 17, w + 1, size, False, dev).kind,
                 "fused")
            pf = plan_loss_and_grad(arc, 3, f, size, False, dev)
            want(f"{dev_name} 3x{f} size {size} plan", (pf.kind, pf.variant, pf.fused.shared_mem),
                 ("fused", "cosine", fused_shared_bytes(f, size)))
            want(f"{dev_name} 3x{f + 1} size {size} plan", plan_loss_and_grad(arc, 3, f + 1, size, False, dev).kind,
                 "fused_cluster" if dev.clusters else "fused_l2" if dev.cooperative else "split")
            if dev.clusters:
                pc = plan_loss_and_grad(arc, 4096, c, size, False, dev)
                want(f"{dev_name} 4096x{c} size {size} plan", (pc.kind, pc.fused.grid, pc.fused.shared_mem),
                     ("fused_cluster", (4096 * CLUSTER, 1, 1), fused_shared_bytes(cluster_slice(c, size), size)))
                pl2 = plan_loss_and_grad(arc, 4096, c + 1, size, False, dev)
                want(f"{dev_name} 4096x{c + 1} size {size} plan", pl2.kind, "fused_l2" if dev.cooperative else "split")
                if dev.cooperative:
                    want(f"{dev_name} 4096x{c + 1} size {size} ms_fused_l2 (group_rows, splits, grid)",
                         (pl2.group_rows, pl2.splits, pl2.fused.grid[0]), l2_groups(4096, c + 1, size, False, dev))
    # Grids: ms_fused_warp's ceil(B / 8) capped; ms_fused_cluster's whole clusters within the cap,
    # at least one.
    want("H200 1000000x100 f32 warp grid", plan_loss_and_grad(sm, 1_000_000, 100, 4, False, DEVICE_H200).fused.grid,
         (MAX_GRID, 1, 1))
    want("H200 9x100 f32 warp grid", plan_loss_and_grad(sm, 9, 100, 4, False, DEVICE_H200).fused.grid, (2, 1, 1))
    want("H200 100000x200000 bf16 cluster grid",
         plan_loss_and_grad(sm, 100_000, 200_000, 2, False, DEVICE_H200).fused.grid, (MAX_GRID // 8 * 8, 1, 1))
    want("H200 1x200000 bf16 cluster grid", plan_loss_and_grad(sm, 1, 200_000, 2, False, DEVICE_H200).fused.grid,
         (8, 1, 1))
    want("H200 4096x128256 bf16 forced split", plan_loss_and_grad(sm, 4096, 128256, 2, False, DEVICE_H200,
                                                                  force_split=True).kind, "split")
    want("H200 37x1001 bf16 forced split", plan_loss_and_grad(sm, 37, 1001, 2, False, DEVICE_H200,
                                                              force_split=True).kind, "split")
    return problems, checks


def selftest_params(args) -> int:
    """--selftest-params: no torch, cupy or GPU. Returns the exit code."""
    failures: List[str] = []
    print(f"MsParams (ctypes): sizeof {ctypes.sizeof(MsParams)}, alignment {ctypes.alignment(MsParams)}")
    print(f"{'field':18} {'offset':>6} {'size':>5}")
    for name, off, size in ms_field_layout():
        print(f"{name:18} {off:6d} {size:5d}")
    hp = check_header_fields()
    print("params.cuh field list and #defines vs the script: " + ("OK" if not hp else "MISMATCH"))
    failures += hp
    rp, rn = check_rust_sources()
    print(f"src/backends/launch/mod.rs constants, DeviceShape (fields, DEFAULT / H200), the split_count / fused_max_classes / "
          f"warp_max_classes / cluster_max_classes / cluster_slice numbers of its tests and const asserts, "
          f"l2_blocks_per_sm / l2_groups and the l2_path_on_h200 numbers, "
          f"Planner::loss_and_grad's paths, order, conditions, grids and smem, src/backends/cuda/'s fused roots and "
          f"ms_fused_l2 launch (partials, group_rows, cooperative) and device attributes, "
          f"src/op.rs's one-pass limits, and src/backends/launch/params.rs's field order vs the script ({rn} checks): "
          + ("OK" if not rp else "MISMATCH"))
    failures += rp
    pp, pn = selftest_planning()
    print(f"launch planning (warp / fused / cluster smem and limits, path boundaries, split counts, grids, "
          f"variants, l2_groups, the issue's shapes on an H200 (ms_fused_l2 past a cluster) and without "
          f"clusters / cooperative launch; "
          f"{pn} checks): " + ("OK" if not pp else "MISMATCH"))
    failures += pp

    built = []
    print("\nconfigurations (variant, path and launches as src/backends/launch/mod.rs plans them on a 48 KiB / 132-SM GPU and "
          "on an H200):")
    fmts = {ctypes.c_int64: "<q", ctypes.c_int32: "<i", ctypes.c_double: "<d"}
    for label, cfg, (b, c), scale_grad in selftest_configs():
        splits = split_count(b, c, 2, DEVICE_H200.sm_count)
        p = make_params(cfg, b, c, c, splits, scale_grad)
        raw = bytes(p)
        assert len(raw) == MS_PARAMS_SIZE
        for name, ct in _MS_FIELDS:
            off = getattr(MsParams, name).offset
            if name == "thresholds":
                got = list(struct.unpack_from("<16d", raw, off))
                want = [p.thresholds[j] for j in range(MS_MAX_SPHERE_M)]
            else:
                got, want = struct.unpack_from(fmts[ct], raw, off)[0], getattr(p, name)
            if got != want:
                failures.append(f"{label}: field {name} reads back {got} at offset {off}, set to {want}")
        print(f"  {label:22} B={b:<5} C={c:<8} scale_grad={int(scale_grad)} {len(raw)} bytes "
              f"sha256={hashlib.sha256(raw).hexdigest()[:16]}")
        for dev_name, dev in (("48K", DEVICE_DEFAULT), ("H200", DEVICE_H200)):
            parts = []
            for sfx, size in (("bf16", 2), ("f32", 4), ("f64", 8)):
                pl = plan_loss_and_grad(cfg, b, c, size, scale_grad, dev)
                if pl.kind in ONE_PASS_ROOTS:
                    parts.append(f"{sfx}: {ONE_PASS_ROOTS[pl.kind]}_{pl.variant} grid {pl.fused.grid[0]} "
                                 f"smem {pl.fused.shared_mem}")
                elif pl.kind == "fused_l2":
                    parts.append(f"{sfx}: ms_fused_l2_{pl.variant} (cooperative) groups of {pl.group_rows} "
                                 f"x{pl.splits} grid {pl.fused.grid[0]}")
                else:
                    parts.append(f"{sfx}: partial_{pl.variant} x{pl.splits} grid {pl.partial.grid[0]} -> "
                                 f"backward_{pl.backward_variant} grid {pl.backward.grid[:2]}")
            print(f"    {dev_name:5} " + "; ".join(parts))
        print(f"    {describe_params(p)}")
        built.append((label.replace(".", "_"), p))

    # Spot checks of the values (src/backends/launch/params.rs / src/math.rs).
    arc = built[2][1]
    exp = dict(transform=TRANSFORM_COSINE, margin=MARGIN_ARCFACE_COMBINED, exact=1, easy=0, m1=1.0, m2=0.5, m3=0.0,
               fallback_shift=0.5 * math.sin(0.5), sin_floor=SIN_FLOOR, scale_grad=0, reserved=0, splits=2)
    for k, v in exp.items():
        if getattr(arc, k) != v:
            failures.append(f"arcface_exact.{k} = {getattr(arc, k)}, want {v}")
    if built[3][1].sin_floor != SIN_FLOOR or built[3][1].exact != 0:
        failures.append("arcface_detached: sin_floor must be sin(theta_eps) and exact 0")
    if built[4][1].scale_grad != 1 or built[4][1].easy != 1:
        failures.append("arcface_easy_scale: scale_grad and easy must be 1")
    sm = built[0][1]
    if (sm.transform, sm.margin, sm.exact, sm.sin_floor) != (TRANSFORM_IDENTITY, MARGIN_NONE, 1, 0.0):
        failures.append("softmax: transform/margin/exact/sin_floor wrong")
    if (sm.weighted_smoothing, sm.softcapped, sm.total_weight, sm.softcap) != (0, 0, 32000.0, 0.0):
        failures.append("softmax: weighted_smoothing/softcapped/total_weight/softcap wrong")
    rbf = built[8][1]
    if (rbf.transform, rbf.neg_inv_gamma, rbf.softcapped, rbf.softcap, rbf.inv_softcap) != (
            TRANSFORM_RBF, -1.0 / 16.0, 1, 30.0, 1.0 / 30.0):
        failures.append("rbf_softcap: transform 2, neg_inv_gamma -1/16, softcap 30 expected")
    sph = built[7][1]
    if sph.sphere_m != 4 or [sph.thresholds[j] for j in range(1, 4)] != [math.cos(j * math.pi / 4) for j in range(1, 4)]:
        failures.append("sphereface: m / thresholds wrong")
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
        for sig in ENTRY_SIGNATURES.values():  # the scalar arguments' packing (_pack_args)
            for kind in set(sig) - {"p", "S"}:
                ok &= {"q": np.int64, "i": np.int32}[kind](1).itemsize == int(ptx_params_of(kind)[0])
        print(f"\nnumpy {np.__version__}: dtype(MsParams) itemsize {dt.itemsize}, alignment {dt.alignment}, "
              f"size-1 argument arrays hold the ctypes bytes, scalar argument sizes: {'OK' if ok else 'MISMATCH'}")
        if not ok:
            failures.append("numpy view of MsParams / scalar argument sizes differ")

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
        for arch in ([args.arch] if args.arch else list(SELFTEST_ARCHS)) if nvcc else []:
            print(f"\nnvcc {nvcc} ({nvcc_version(nvcc)}): compiling kernels/*.cu for {arch} ...", flush=True)
            try:
                t0 = time.perf_counter()
                out_dir = tmpd / f"ptx_{arch}"
                ptx = compile_ptx(nvcc, arch, {s: KERNELS / f"{s}.cu" for s in KERNEL_SOURCES}, out_dir)
                probe_cu = tmpd / "abi_probe.cu"
                probe_cu.write_text(device_probe_source())
                compile_ptx(nvcc, arch, {"abi_probe": probe_cu}, out_dir)
                print(f"  compiled in {time.perf_counter() - t0:.0f} s")
                sfx = element_suffixes(arch)
                if arch_number(arch) >= 80 and "bf16" not in sfx:
                    failures.append(f"{arch}: bf16 entries expected")
                sp, n_entries, unknown = check_ptx_signatures(ptx, sfx, arch)
                roots = [r for r in VARIANT_ROOTS if arch_number(arch) >= ENTRY_MIN_ARCH.get(r, 0)]
                absent = [r for r in VARIANT_ROOTS if r not in roots]
                print(f"PTX entry signatures ({arch}): {n_entries} entries ({', '.join(roots)} x {len(VARIANTS)} "
                      f"variants x {sfx}, ms_forward_finalize x {sfx}, ms_targets x {list(TARGET_SUFFIXES)} x "
                      f"{list(ACC_SUFFIXES)}), parameter counts and sizes vs the launches"
                      + (f"; {', '.join(absent)} absent below sm_{max(ENTRY_MIN_ARCH[r] for r in absent)}"
                         if absent else "") + ": " + ("OK" if not sp else "MISMATCH"))
                if unknown:
                    print(f"  note: {len(unknown)} entries the script never launches: "
                          + ", ".join(sorted({re.sub(r"_(f32|f64|f16|bf16)$", "_<T>", u) for u in unknown})))
                bp, bnotes, n_bounds = check_l2_launch_bounds(ptx, sfx)
                print(f"ms_fused_l2 launch bounds ({arch}): {n_bounds} entries guarantee the {BLOCK}-thread blocks per "
                      f"SM of their cooperative grid (l2_blocks_per_sm: 3, 2 for f64 and _ext): "
                      + ("OK" if not bp else "MISMATCH"))
                if bnotes:
                    groups: Dict[str, List[str]] = {}
                    for note in bnotes:
                        name, _, what = note.partition(": ")
                        groups.setdefault(what, []).append(name[len("ms_fused_l2_"):])
                    print(f"  note: {len(bnotes)} entries are compiled for more blocks per SM than the plan launches "
                          "(safe: fewer co-resident blocks than guaranteed): "
                          + "; ".join(f"ms_fused_l2_{{{', '.join(names)}}}: {what}" for what, names in groups.items()))
                failures += bp
                for module, path in sorted(ptx.items()):
                    entries = ptx_entries(path.read_text())
                    for name in sorted(entries):
                        if name.endswith(("identity_bf16", "finalize_bf16", "i64_f32")) and arch == (
                                [args.arch] if args.arch else list(SELFTEST_ARCHS))[-1]:
                            print(f"    {name}: {len(entries[name])} params {entries[name]}")
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


# The architectures --selftest-params compiles for without --arch: build.rs's fatbin SASS targets
# (sm_80: no ms_fused_cluster; sm_90: every entry).
SELFTEST_ARCHS = ("sm_80", "sm_90")


def element_suffixes(arch: str) -> List[str]:
    """The element types compiled for `arch`: bf16 only from sm_80 (`#if __CUDA_ARCH__ >= 800`)."""
    return ["f32", "f64", "f16"] + (["bf16"] if arch_number(arch) >= 80 else [])


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

# The issue's shapes, each with its dtype (a shape without one runs in each of --dtypes).
DEFAULT_SHAPES = ["8192x32000:bf16", "4096x128256:bf16", "512x1000000:bf16", "64x1000000:f32"]


def preflight_shapes(size: int, device: DeviceShape) -> List[Tuple[int, int]]:
    """Small shapes that take every path on this device (odd C: unaligned rows; row counts that
    leave ms_fused_warp's last block part empty): a short row, the widest ms_fused_warp row and
    one more (ms_fused), the widest ms_fused row and one more (ms_fused_cluster where the device
    has clusters, else ms_fused_l2 where it has cooperative launch, else split), the widest
    one-pass row and one more (ms_fused_l2 or split), on a device with cooperative launch
    2 G + 1 rows one past the one-pass limit (ms_fused_l2 with G rows a group: three groups, the
    last of one row), a mid row and a long row (many splits per row where it is split)."""
    warp = warp_max_classes(size)
    limit = fused_max_classes(size, device.max_shared_per_block)
    shapes = [(37, 1001), (19, warp), (3, warp + 1), (3, limit), (2, limit + 1)]
    one_pass = one_pass_max_classes(size, device)
    if device.clusters:
        shapes += [(3, one_pass), (2, one_pass + 1)]
    if device.cooperative:
        group_rows = l2_groups(1 << 30, one_pass + 1, size, False, device)[0]
        shapes += [(2 * group_rows + 1, one_pass + 1)]
    shapes += [(64, 50_001), (2, 300_007)]
    return list(dict.fromkeys(shapes))
GOAL_COPY_FRACTION = 0.85
GOAL_VS_COMPILE_LIGER = 1.3
GOAL_VS_EAGER_ARCFACE = 8.0
GOAL_CE_SHAPES = [(8192, 32000), (4096, 128256)]


def parse_shape_dtype(s: str) -> Tuple[int, int, Optional[str]]:
    """'BxC' or 'BxC:dtype' -> (B, C, dtype or None)."""
    body, _, dtype = s.partition(":")
    dtype = dtype.strip() or None
    if dtype is not None and dtype not in DTYPE_INFO:
        raise argparse.ArgumentTypeError(f"shape {s!r}: unknown dtype {dtype!r} (bf16, f16, f32, f64)")
    return parse_shape(body) + (dtype,)


def parse_shape(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*([\d_.eE+]+)\s*[xX*]\s*([\d_.eE+]+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {s!r}: write BxC or BxC:dtype, e.g. 512x1000000:bf16")

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
    """kernels/*.cu compiled to PTX with nvcc and loaded as CuPy RawModules, and the device's
    shape for the launch planning (its SM count and opt-in shared memory per block)."""

    def __init__(self, nvcc: str, arch: str, build_dir: Path, device: DeviceShape):
        import cupy

        self.cupy = cupy
        self.arch = arch
        self.nvcc = nvcc
        self.device = device
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
        self.suffixes = element_suffixes(arch)
        problems, _, _ = check_ptx_signatures({k: v for k, v in self.ptx.items() if k != "abi_probe"},
                                              self.suffixes, arch)
        problems += check_l2_launch_bounds(self.ptx, self.suffixes)[0]
        if problems:
            raise RuntimeError("PTX signatures differ from the launches:\n  " + "\n  ".join(problems))
        self.modules = {stem: cupy.RawModule(path=str(path)) for stem, path in self.ptx.items()}
        # ms_fused_l2 needs a cooperative launch (cuLaunchCooperativeKernel, as src/backends/cuda/'s
        # launch_cooperative): CuPy launches a RawModule's kernels that way when the module is made
        # with enable_cooperative_groups=True (for a PTX path that only selects the launch call), so
        # its module is loaded a second time with the flag, on first use (cooperative_func).
        self._coop_modules: Dict[str, object] = {}
        self._coop_funcs = {}
        self._funcs = {}
        self._dynamic_smem: Dict[str, int] = {}

    def func(self, name: str, root: str):
        """The entry point `name` of root `root`'s module (a CuPy RawKernel)."""
        if name not in self._funcs:
            self._funcs[name] = self.modules[ENTRY_MODULE[root]].get_function(name)
        return self._funcs[name]

    def cooperative_func(self, name: str, root: str):
        """The entry point `name` as a RawKernel that CuPy launches with cuLaunchCooperativeKernel."""
        if name not in self._coop_funcs:
            stem = ENTRY_MODULE[root]
            if stem not in self._coop_modules:
                self._coop_modules[stem] = self.cupy.RawModule(path=str(self.ptx[stem]),
                                                               enable_cooperative_groups=True)
            f = self._coop_modules[stem].get_function(name)
            if not getattr(f, "enable_cooperative_groups", True):
                raise RuntimeError(f"{name}: this CuPy's RawModule does not pass enable_cooperative_groups on")
            self._coop_funcs[name] = f
        return self._coop_funcs[name]

    def cooperative_capacity(self, name: str, root: str, block: int, dynamic_smem: int) -> int:
        """The most blocks of `block` threads a cooperative launch of `name` may have on this device:
        cuOccupancyMaxActiveBlocksPerMultiprocessor x the SM count (the driver refuses a larger
        cooperative grid; the crate's launch then fails, while CuPy would shrink the grid with a
        warning, so OursStep checks the planned grid against this first)."""
        from cupy.cuda import driver

        f = self.cooperative_func(name, root)
        per_sm = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(f.kernel.ptr, block, dynamic_smem))
        return per_sm * self.device.sm_count

    def static_smem(self, name: str, root: str) -> int:
        """CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES (RawKernel.attributes; the shared_size_bytes
        property is deprecated in recent CuPy)."""
        f = self.func(name, root)
        try:
            return int(f.attributes["shared_size_bytes"])
        except Exception:  # noqa: BLE001
            v = f.shared_size_bytes
            return int(v() if callable(v) else v)

    def allow_dynamic_shared(self, name: str, root: str, nbytes: int) -> None:
        """Kernel::allow_dynamic_shared of src/backends/cuda/module.rs: opts the function into `nbytes` of
        dynamic shared memory (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), once per new
        maximum. CuPy: the settable `RawKernel.max_dynamic_shared_size_bytes`; the driver call
        directly if this CuPy lacks it. Read back to make sure it took."""
        if nbytes <= self._dynamic_smem.get(name, 0):
            return
        f = self.func(name, root)
        try:
            f.max_dynamic_shared_size_bytes = nbytes
            got = int(f.max_dynamic_shared_size_bytes)
        except AttributeError:
            from cupy.cuda import driver

            attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
            driver.funcSetAttribute(f.kernel.ptr, attr, nbytes)
            got = int(driver.funcGetAttribute(attr, f.kernel.ptr))
        if got < nbytes:
            raise RuntimeError(f"{name}: max dynamic shared memory is {got} after setting {nbytes}")
        self._dynamic_smem[name] = nbytes

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

    def probe_targets(self) -> List[str]:
        """ms_targets on a small target vector against what kernels/targets.cu specifies: the
        int32 targets (-1 ignored, -2 invalid), the first invalid row and the mean's 1/sum w, for
        every target type and both accumulation types, with and without mean."""
        import torch

        rows, classes = 3001, 17
        g = torch.Generator(device="cpu").manual_seed(7)
        raw = torch.randint(0, classes, (rows,), generator=g, dtype=torch.int64)
        raw[5] = IGNORE_INDEX
        raw[77] = IGNORE_INDEX
        raw_bad = raw.clone()
        raw_bad[1234] = classes
        raw_bad[2000] = -5
        problems = []
        for acc_sfx, acc in (("f32", torch.float32), ("f64", torch.float64)):
            for tsfx, tdtype in (("i64", torch.int64), ("u32", None), ("u8", torch.uint8)):
                for values, has_ignore, mean in ((raw, 1, 1), (raw_bad, 1, 0), (raw.clamp(min=0), 0, 1)):
                    if tsfx == "u32":
                        # torch has no general uint32: the i64 values' low 32 bits as int32.
                        if (values < 0).any() and has_ignore:
                            continue  # -100 is no u32; candle's U32 targets cannot hold it
                        dev_raw = values.to(torch.int32).cuda()
                    elif tsfx == "u8":
                        if (values < 0).any():
                            continue
                        dev_raw = values.to(tdtype).cuda()
                    else:
                        dev_raw = values.cuda()
                    out, first, up = launch_targets(self, dev_raw, tsfx, acc_sfx, acc, rows, classes, has_ignore,
                                                    mean, ignore_index=IGNORE_INDEX)
                    torch.cuda.synchronize()
                    want = torch.where((values >= 0) & (values < classes), values,
                                       torch.full_like(values, TARGET_INVALID))
                    if has_ignore:
                        want = torch.where(values == IGNORE_INDEX, torch.full_like(values, TARGET_IGNORED), want)
                    bad = (want == TARGET_INVALID).nonzero()
                    want_first = int(bad[0]) if len(bad) else rows
                    n_valid = int((want >= 0).sum())
                    want_up = upstream_mean(n_valid, acc is torch.float64) if mean else 1.0
                    tag = f"ms_targets_{tsfx}_{acc_sfx} (ignore {has_ignore}, mean {mean})"
                    if not torch.equal(out.cpu().to(torch.int64), want):
                        problems.append(f"{tag}: converted targets differ")
                    if int(first.item()) != want_first:
                        problems.append(f"{tag}: first_invalid {int(first.item())}, want {want_first}")
                    if float(up.item()) != want_up:
                        problems.append(f"{tag}: upstream {float(up.item())!r}, want {want_up!r}")
        return problems


def _pack_args(sig: str, args, what: str):
    """CuPy kernel arguments for a signature of ENTRY_SIGNATURES: a torch tensor (or None: a null
    pointer) for 'p', an int for 'q' (int64) and 'i' (int32), MsParams' argument array for 'S'."""
    import numpy as np
    import torch

    assert len(args) == len(sig), (what, len(args), sig)
    packed = []
    for a, kind in zip(args, sig):
        if kind == "p":
            if a is None:
                packed.append(np.uint64(0))
            else:
                assert isinstance(a, torch.Tensor) and a.is_cuda, what
                packed.append(np.uint64(a.data_ptr()))
        elif kind == "q":
            packed.append(np.int64(a))
        elif kind == "i":
            packed.append(np.int32(a))
        else:
            packed.append(a)
    return tuple(packed)


def launch(kernels: OursKernels, name: str, root: str, lc: Launch, args, cooperative: bool = False) -> None:
    """One planned launch on PyTorch's current stream; `cooperative`: with cuLaunchCooperativeKernel
    (ms_fused_l2, as src/backends/cuda/'s launch_cooperative)."""
    f = kernels.cooperative_func(name, root) if cooperative else kernels.func(name, root)
    with on_torch_stream(kernels.cupy):
        f(lc.grid, lc.block, _pack_args(ENTRY_SIGNATURES[root], args, name), shared_mem=lc.shared_mem)


def launch_targets(kernels: OursKernels, raw, tsfx: str, acc_sfx: str, acc, rows: int, classes: int,
                   has_ignore: int, mean: int, ignore_index: int = IGNORE_INDEX, weights=None, has_weights: int = 0,
                   poison: bool = False):
    """device_targets of src/backends/cuda/ without the read-back: ms_targets into fresh buffers (int32
    targets [rows], first_invalid [1] int64, upstream [1] acc). Returns the three."""
    import torch

    dev = raw.device
    if poison:
        out = torch.full((max(rows, 1),), -7, dtype=torch.int32, device=dev)
        first = torch.full((1,), -7, dtype=torch.int64, device=dev)
        up = torch.full((1,), float("nan"), dtype=acc, device=dev)
    else:
        out = torch.empty(max(rows, 1), dtype=torch.int32, device=dev)
        first = torch.empty(1, dtype=torch.int64, device=dev)
        up = torch.empty(1, dtype=acc, device=dev)
    if weights is None:
        weights = torch.zeros(1, dtype=acc, device=dev)  # has_weights = 0: a valid dummy, never read
    launch(kernels, f"ms_targets_{tsfx}_{acc_sfx}", "ms_targets", TARGETS_LAUNCH,
           (raw, rows, classes, ignore_index, has_ignore, weights, has_weights, mean, out, first, up))
    return out, first, up


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


class TargetError(ValueError):
    """What the crate's check_targets turns an invalid target into (src/targets_and_weights.rs target_error)."""


class OursStep:
    """One step through the crate's kernels, launched as src/backends/cuda/ launches them, with the plans
    of src/backends/launch/mod.rs for this device (its SM count and opt-in shared memory).

    mode 'loss_and_grad': forward_backward (MarginSoftmaxLoss::loss_and_grad): ms_targets (mean),
    the check's one 8-byte read of first_invalid when check_targets, then ms_fused_warp, ms_fused,
    ms_fused_cluster (the same arguments), ms_fused_l2 (the same, then a partials buffer of
    plan.partials_len accumulation elements and group_rows; a cooperative launch) or partial ->
    finalize -> backward. mode 'autograd': loss() then backward, as candle's autograd
    runs the op: the forward op (ms_targets without mean, the check's read, partial, finalize
    without row info), the reduction, then the op's bwd (row info = [max, ln sum, (a, k, g_y) *
    d loss / d loss_i, scale], formed with torch ops as src/op.rs forms it with candle ops) and
    the backward op (ms_targets again, unchecked, then ms_backward).

    Differences from the candle op, stated: the row scale, the PolyLoss buffer (unused) and the
    dummy class-weights buffer are made once outside the step (the candle op uploads the poly
    buffer and allocates the dummy on every call); buffers come from PyTorch's caching
    allocator; the targets are torch's int64 (candle I64 targets: ms_targets_i64)."""

    def __init__(self, kernels: OursKernels, cfg: LossCfg, rows: int, classes: int, dtype: str,
                 check_targets: bool = True, mode: str = "loss_and_grad", force_split: bool = False):
        import torch

        if mode not in ("loss_and_grad", "autograd"):
            raise ValueError(mode)
        self.k = kernels
        self.cfg = cfg
        self.mode = mode
        self.check = check_targets
        self.rows, self.classes = rows, classes
        self.sfx, self.size, acc64 = DTYPE_INFO[dtype]
        self.acc_sfx = "f64" if acc64 else "f32"
        if self.sfx not in kernels.suffixes:
            raise RuntimeError(f"no {self.sfx} kernels for {kernels.arch} (bf16 needs sm_80 or later)")
        self.acc = torch.float64 if acc64 else torch.float32
        self.dtype = torch_dtype(dtype)
        dev = "cuda"
        self.scale = torch.full((rows,), cfg.head.s, dtype=self.acc, device=dev)
        self.weights = torch.zeros(1, dtype=self.acc, device=dev)  # has_weights = 0: a valid dummy
        self.poly = torch.zeros(1, dtype=self.acc, device=dev)  # n_poly = 0: one unused element
        if mode == "loss_and_grad":
            self.plan = plan_loss_and_grad(cfg, rows, classes, self.size, False, kernels.device, force_split)
            self.params = make_params(cfg, rows, classes, classes, self.plan.splits, False)
            if self.plan.kind in FUSED_ROOTS:
                # Inputs::fused of src/backends/cuda/, for ms_fused_warp, ms_fused, ms_fused_cluster and
                # ms_fused_l2 alike.
                self.fused_root = FUSED_ROOTS[self.plan.kind]
                self.fused_name = f"{self.fused_root}_{self.plan.variant}_{self.sfx}"
                if self.fused_root == "ms_fused_cluster" and arch_number(kernels.arch) < ENTRY_MIN_ARCH[self.fused_root]:
                    raise RuntimeError(f"{self.fused_name} planned but the kernels were compiled for {kernels.arch} "
                                       f"(clusters need sm_90)")
                static = kernels.static_smem(self.fused_name, self.fused_root)
                if static > FUSED_STATIC_RESERVE:
                    raise RuntimeError(f"{self.fused_name} uses {static} bytes of static shared memory, more than "
                                       f"the {FUSED_STATIC_RESERVE} reserved for it")
                dynamic = self.plan.fused.shared_mem
                if dynamic + static > DEFAULT_SHARED:
                    kernels.allow_dynamic_shared(self.fused_name, self.fused_root, dynamic)
                if self.plan.kind == "fused_l2":
                    # src/backends/cuda/: launch_cooperative; the driver refuses a grid whose blocks are not
                    # all co-resident (the __launch_bounds__ guarantee l2_blocks_per_sm per SM).
                    grid = self.plan.fused.grid[0]
                    capacity = kernels.cooperative_capacity(self.fused_name, self.fused_root, self.plan.fused.block[0],
                                                            dynamic)
                    if grid > capacity:
                        raise RuntimeError(f"{self.fused_name}: the planned cooperative grid of {grid} blocks exceeds "
                                           f"the {capacity} that can be co-resident on this device")
                shape = {"fused_warp": f"{WARP_ROWS} rows per block, ",
                         "fused": "",
                         "fused_cluster": f"{CLUSTER} blocks per row of {cluster_slice(classes, self.size)} classes, ",
                         "fused_l2": f"cooperative, groups of {self.plan.group_rows} rows, {self.plan.splits} slices "
                                     f"a row, 2nd read from L2, ",
                         }[self.plan.kind]
                self.path = (f"{self.fused_root}_{self.plan.variant} ({shape}smem {dynamic} B, grid "
                             f"{self.plan.fused.grid[0]}{', opted in' if dynamic + static > DEFAULT_SHARED else ''})")
                # One read of the row, one write of the gradient (ms_fused_l2: the gradient's second
                # read of the row is meant to hit L2, so 2 passes of memory traffic as well).
                self.passes = 2
            else:
                self.path = (f"partial_{self.plan.variant} x{self.plan.splits} (grid {self.plan.partial.grid[0]}) + "
                             f"finalize + backward_{self.plan.backward_variant} (grid {self.plan.backward.grid[:2]})")
                self.passes = 3  # the forward's read, the backward's read and write
        else:
            self.plan = plan_forward(cfg, rows, classes, self.size, False, kernels.device)
            self.bplan = plan_backward(cfg, rows, classes, self.size)
            self.params = make_params(cfg, rows, classes, classes, self.plan.splits, False)
            self.bparams = make_params(cfg, rows, classes, classes, 1, False)
            self.bparg = params_kernel_arg(self.bparams)
            self.path = (f"autograd: partial_{self.plan.variant} x{self.plan.splits} + finalize | bwd: "
                         f"backward_{self.bplan.variant}")
            self.passes = 3
        self.parg = params_kernel_arg(self.params)
        self.path += "; targets checked (1 D2H read)" if check_targets else "; targets unchecked"

    def _targets(self, y, mean: int, check: bool, poison: bool):
        out, first, up = launch_targets(self.k, y, "i64", self.acc_sfx, self.acc, self.rows, self.classes,
                                        has_ignore=1, mean=mean, poison=poison)
        if check:
            row = int(first.item())  # the 8-byte device-to-host read (a synchronization)
            if 0 <= row < self.rows:
                raise TargetError(f"target {int(y[row])} of row {row} is outside [0, {self.classes})")
        return out, up

    def __call__(self, x, y, poison: bool = False):
        import torch

        b, c = self.rows, self.classes
        assert x.shape == (b, c) and x.dtype == self.dtype and x.is_contiguous(), (x.shape, x.dtype)
        assert y.dtype == torch.int64 and y.shape == (b,) and y.is_contiguous()
        new = (lambda *s, dtype: torch.full(s, float("nan"), dtype=dtype, device=x.device)) if poison else \
            (lambda *s, dtype: torch.empty(s, dtype=dtype, device=x.device))
        if self.mode == "autograd":
            return self._autograd(x, y, new, poison)
        sfx, pl = self.sfx, self.plan
        y32, up = self._targets(y, mean=1, check=self.check, poison=poison)
        stats = new(b * STAT_COLUMNS, dtype=self.acc)
        grad = new(b, c, dtype=self.dtype)
        grad_scale = new(b, dtype=self.acc)
        if pl.kind in ONE_PASS_ROOTS:
            launch(self.k, self.fused_name, self.fused_root, pl.fused,
                   (x, y32, self.scale, self.weights, self.poly, self.parg, stats, grad, grad_scale, up))
        elif pl.kind == "fused_l2":
            # The kernel writes every (row, slice)'s partial state before the grid barrier after
            # which it reads it (poison: NaN before the launch, as the other buffers).
            partials = new(pl.partials_len, dtype=self.acc)
            launch(self.k, self.fused_name, self.fused_root, pl.fused,
                   (x, y32, self.scale, self.weights, self.poly, self.parg, stats, grad, grad_scale, up, partials,
                    pl.group_rows), cooperative=True)
        else:
            partials = new(pl.partials_len, dtype=self.acc)
            row_info = new(b * ROWINFO_COLUMNS, dtype=self.acc)
            launch(self.k, f"ms_forward_partial_{pl.variant}_{sfx}", "ms_forward_partial", pl.partial,
                   (x, y32, self.scale, self.weights, self.parg, partials))
            launch(self.k, f"ms_forward_finalize_{sfx}", "ms_forward_finalize", pl.finalize,
                   (x, y32, self.scale, self.weights, self.poly, self.parg, partials, stats, row_info, grad_scale, up))
            launch(self.k, f"ms_backward_{pl.backward_variant}_{sfx}", "ms_backward", pl.backward,
                   (x, y32, row_info, self.weights, self.parg, grad))
        return self._reduce(stats), grad

    def _reduce(self, stats):
        """candle's `reduce` for the mean: sum(loss_i) / sum(w_i) (0 when the sum is 0)."""
        import torch

        st = stats.view(self.rows, STAT_COLUMNS)
        den = st[:, STAT_WEIGHT].sum()
        return torch.where(den == 0, torch.zeros_like(den), st[:, STAT_LOSS].sum() / den)

    def _autograd(self, x, y, new, poison: bool):
        import torch

        b, c, sfx, pl = self.rows, self.classes, self.sfx, self.plan
        # The forward op (src/backends/cuda/ forward_typed): no mean in ms_targets, no row info.
        y32, up = self._targets(y, mean=0, check=self.check, poison=poison)
        stats = new(b * STAT_COLUMNS, dtype=self.acc)
        partials = new(pl.partials_len, dtype=self.acc)
        launch(self.k, f"ms_forward_partial_{pl.variant}_{sfx}", "ms_forward_partial", pl.partial,
               (x, y32, self.scale, self.weights, self.parg, partials))
        launch(self.k, f"ms_forward_finalize_{sfx}", "ms_forward_finalize", pl.finalize,
               (x, y32, self.scale, self.weights, self.poly, self.parg, partials, stats, None, None, up))
        loss = self._reduce(stats)
        # The op's bwd (src/op.rs): d loss / d loss_i = 1 / sum w (mean_of_sum), row info from
        # the stats, then the backward op (src/backends/cuda/ backward_typed: ms_targets unchecked).
        st = stats.view(b, STAT_COLUMNS)
        den = st[:, STAT_WEIGHT].sum()
        upstream = torch.where(den == 0, torch.zeros_like(den), 1.0 / den).expand(b, 1)
        row_info = torch.cat([st[:, 1:3], st[:, 4:7] * upstream, self.scale[:, None]], dim=1).contiguous()
        y32b, _ = self._targets(y, mean=0, check=False, poison=poison)
        grad = new(b, c, dtype=self.dtype)
        launch(self.k, f"ms_backward_{self.bplan.variant}_{sfx}", "ms_backward", self.bplan.backward,
               (x, y32b, row_info, self.weights, self.bparg, grad))
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

    xs, ys = [], []
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
    return xs, ys


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
    passes: int = 2  # [B, C] passes counted for its bandwidth: 1 read + 1 write, or 2 + 1 (autograd)


class Ctx:
    def __init__(self, problem, rows, classes, dtype, xs, ys, kernels, args):
        self.problem, self.rows, self.classes, self.dtype = problem, rows, classes, dtype
        self.xs, self.ys = xs, ys
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

    def ours(cfg: LossCfg, check: bool = True, mode: str = "loss_and_grad"):
        def build(ctx: Ctx):
            step = OursStep(ctx.kernels, cfg, ctx.rows, ctx.classes, ctx.dtype, check_targets=check, mode=mode,
                            force_split=args.ours_path == "split")
            build.passes = step.passes
            return ((lambda i: step(ctx.xs[i], ctx.ys[i])),
                    (lambda: step(ctx.xs[0], ctx.ys[0], poison=True)), step.path)

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
        out.append(Provider("ours", "exact", ours(cfg), is_ours=True,
                            note="loss_and_grad, check_targets on (one 8-byte D2H read per step)"))
        out.append(Provider("ours-nocheck", "exact", ours(cfg, check=False), is_ours=True,
                            note="loss_and_grad, check_targets(false): no read-back"))
        out.append(Provider("ours-autograd", "exact", ours(cfg, mode="autograd"), is_ours=True, passes=3,
                            note="loss() + backward through the op's fwd / bwd: 2 reads + 1 write"))
        out.append(Provider("torch-eager", "exact", torch_fn(ce)))
        out.append(Provider("torch-compile", "exact", compiled(ce)))
        out.append(Provider("liger", "exact", liger(ls),
                            note="LigerCrossEntropyLoss; writes the gradient into its input (timed on own copies)"))
    else:
        head = HeadCfg("arcface", s=ARCFACE_S, m=ARCFACE_M)
        detached = LossCfg(head, margin_grad="detached")
        out.append(Provider("ours", "detached", ours(detached), is_ours=True,
                            note="MarginGrad::Detached, as arcface_torch; check_targets on"))
        out.append(Provider("ours-nocheck", "detached", ours(detached, check=False), is_ours=True,
                            note="MarginGrad::Detached, check_targets(false)"))
        out.append(Provider("ours-exact", "exact", ours(LossCfg(head, margin_grad="exact")), is_ours=True,
                            note="MarginGrad::Exact (the crate's default); check_targets on"))
        out.append(Provider("ours-autograd", "detached", ours(detached, mode="autograd"), is_ours=True, passes=3,
                            note="MarginGrad::Detached, loss() + backward: 2 reads + 1 write"))
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
    """GB/s of `torch.empty_like(x).copy_(x)` on a large bf16 tensor, bytes read + written (the
    header's device figure; each shape's %copy uses measure_shape_copy)."""
    import torch

    n = int(args.copy_gib * (1 << 30)) // 2
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    med, _, _ = bench(lambda: torch.empty_like(x).copy_(x), args)
    nbytes = 2 * x.numel() * x.element_size()
    x = None  # free the 1 GiB before the groups run
    torch.cuda.empty_cache()
    return nbytes / (med * 1e-3) / 1e9, med


def measure_shape_copy(rows: int, classes: int, dtype: str, args) -> Dict[str, float]:
    """The copy a [B, C] step is compared with: `y.copy_(x)`, x and y of B*C elements of the
    dtype (one read and one write of the bytes a loss_and_grad step must move at least), timed
    as the providers are (do_bench, same warmup / rep; do_bench clears L2 before each call)."""
    import torch

    n = rows * classes
    x = torch.randn(n, dtype=torch_dtype(dtype), device="cuda")
    y = torch.empty_like(x)
    med, p20, p80 = bench(lambda: y.copy_(x), args)
    nbytes = 2 * n * x.element_size()
    del x, y
    torch.cuda.empty_cache()
    return dict(ms=med, p20_ms=p20, p80_ms=p80, gbps=nbytes / (med * 1e-3) / 1e9, bytes=nbytes)


def _fmt_err(e: Optional[Dict[str, float]]) -> str:
    if not e:
        return "-"
    return f"{e['loss_err']:.1e}/{e['grad_err']:.1e}/{e['gmax_err']:.1e}"


def run_group(problem: Problem, rows: int, classes: int, dtype: str, kernels, args, copy: Optional[Dict[str, float]],
              results: List[dict], preflight: bool = False) -> None:
    """Checks (and unless preflight, times) every provider of one (problem, shape, dtype); copy:
    measure_shape_copy of the same (shape, dtype), the bandwidth each share is of."""
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
        xs, ys = make_inputs(problem, rows, classes, dtype, n_sets, args.seed)
    except torch.cuda.OutOfMemoryError as e:
        print(f"!!! {tag}: out of memory generating the inputs: {e}")
        return
    ctx = Ctx(problem, rows, classes, dtype, xs, ys, kernels, args)
    built, outputs, rows_out = {}, {}, {}
    for p in provs:
        rec = dict(problem=problem.name, dtype=dtype, rows=rows, classes=classes, provider=p.name, note=p.note,
                   status="", median_ms=None, p20_ms=None, p80_ms=None, gbps=None, copy_frac=None,
                   speedup_of_ours=None, err=None, path=None, setup_s=None, moved_gbps=None,
                   counted_passes=p.passes, copy_ms=copy and copy["ms"], copy_gbps=copy and copy["gbps"])
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
        copy_gbps = copy["gbps"] if copy else None
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
            # Counted: 1 read + 1 write of [B, C] per step (2 reads + 1 write for ours-autograd).
            rec.update(median_ms=med, p20_ms=p20, p80_ms=p80,
                       gbps=p.passes * rows * classes * size / (med * 1e-3) / 1e9)
            rec["copy_frac"] = rec["gbps"] / copy_gbps if copy_gbps else None
            moved = ""
            passes = getattr(p.build, "passes", None) if p.is_ours else None
            if passes and passes != p.passes:
                # What the kernels really move (the split path of loss_and_grad reads the input twice).
                rec["moved_gbps"] = passes * rows * classes * size / (med * 1e-3) / 1e9
                moved = (f"  [the kernels make {passes} passes over B*C: {rec['moved_gbps']:.1f} GB/s moved, "
                         f"{100 * rec['moved_gbps'] / copy_gbps:.1f}% of copy]")
            share = f"{100 * rec['copy_frac']:5.1f}%" if rec["copy_frac"] is not None else "    -"
            print(f"  {p.name:16} {med:9.4f} ms (p20 {p20:.4f}, p80 {p80:.4f})  {rec['gbps']:7.1f} GB/s  "
                  f"{share} of copy ({'2R+1W' if p.passes == 3 else '1R+1W'} counted){moved}", flush=True)
        ours_ms = rows_out.get("ours", {}).get("median_ms")
        for n, rec in rows_out.items():
            if ours_ms and rec["median_ms"] and n != "ours":
                rec["speedup_of_ours"] = rec["median_ms"] / ours_ms
    del built, ctx, xs, ys
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    results.extend(rows_out.values())


def print_table(results: List[dict]) -> None:
    hdr = (f"{'shape':>14} {'dtype':5} {'problem':8} {'provider':16} {'median ms':>10} {'p20':>9} {'p80':>9} "
           f"{'GB/s':>7} {'copy ms':>8} {'%copy':>6} {'ours x':>7}  {'err loss/grad/max':24} status")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        shape = f"{r['rows']}x{r['classes']}"
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        copy = num(100 * r["copy_frac"], ".1f") if r["copy_frac"] is not None else "-"
        print(f"{shape:>14} {r['dtype']:5} {r['problem']:8} {r['provider']:16} {num(r['median_ms'], '.4f'):>10} "
              f"{num(r['p20_ms'], '.4f'):>9} {num(r['p80_ms'], '.4f'):>9} {num(r['gbps'], '.1f'):>7} "
              f"{num(r.get('copy_ms'), '.4f'):>8} {copy:>6} {num(r['speedup_of_ours'], '.2f'):>7}  "
              f"{_fmt_err(r['err']):24} {r['status']}")
    print("'ours x' = median time of that provider / median time of 'ours' (loss_and_grad, targets checked; > 1: "
          "ours is faster). GB/s counts 2*B*C*sizeof(T) per step (read the logits, write the gradient), "
          "3*B*C*sizeof(T) for ours-autograd (2 reads + 1 write). 'copy ms' is y.copy_(x) of B*C elements of the "
          "dtype (1 read + 1 write), timed the same way in the same run; %copy = GB/s / that copy's GB/s.")


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

    # 1. ours >= 85% of the copy bandwidth, every timed ours row (of the same-shape copy; counted
    # 1 read + 1 write for loss_and_grad, 2 reads + 1 write for ours-autograd).
    for r in results:
        if r["provider"].startswith("ours") and r["copy_frac"] is not None:
            extra = " (loss + autograd backward, 2 reads + 1 write counted)" if r.get("counted_passes") == 3 else ""
            if r.get("moved_gbps") and r["gbps"]:
                passes = round(r.get("counted_passes", 2) * r["moved_gbps"] / r["gbps"])
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


def query_device_shape(cupy, torch) -> DeviceShape:
    """src/backends/cuda/ device_shape: the SM count, max(cudaDevAttrMaxSharedMemoryPerBlockOptin,
    48 KiB), cudaDevAttrClusterLaunch (CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH, 120; CuPy may not
    name it), cudaDevAttrCooperativeLaunch (CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, 95) and
    cudaDevAttrL2CacheSize (CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, 38), of the current device."""
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    sm = int(props.multi_processor_count)
    optin = None
    try:
        attr = getattr(cupy.cuda.runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)
        optin = int(cupy.cuda.runtime.deviceGetAttribute(attr, index))
    except Exception:  # noqa: BLE001
        try:
            optin = int(cupy.cuda.Device(index).attributes["MaxSharedMemoryPerBlockOptin"])
        except Exception:  # noqa: BLE001
            optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:
        print("!!! cannot read cudaDevAttrMaxSharedMemoryPerBlockOptin: planning with 48 KiB (no opt-in)")
        optin = DEFAULT_SHARED
    torch_optin = getattr(props, "shared_memory_per_block_optin", None)
    if torch_optin is not None and int(torch_optin) != optin:
        print(f"  note: CuPy says {optin} B of opt-in shared memory per block, torch {torch_optin}: using CuPy's")
    try:
        attr = getattr(cupy.cuda.runtime, "cudaDevAttrClusterLaunch", 120)
        clusters = bool(cupy.cuda.runtime.deviceGetAttribute(attr, index))
    except Exception as e:  # noqa: BLE001
        clusters = (props.major, props.minor) >= (9, 0)
        print(f"  note: cannot read cudaDevAttrClusterLaunch ({type(e).__name__}: {e}): clusters "
              f"{'assumed' if clusters else 'not assumed'} from sm_{props.major}{props.minor}")
    try:
        attr = getattr(cupy.cuda.runtime, "cudaDevAttrCooperativeLaunch", 95)
        cooperative = bool(cupy.cuda.runtime.deviceGetAttribute(attr, index))
    except Exception as e:  # noqa: BLE001
        # The crate fails where it cannot read it; the script plans without ms_fused_l2 (split).
        cooperative = False
        print(f"  note: cannot read cudaDevAttrCooperativeLaunch ({type(e).__name__}: {e}): planning without "
              "ms_fused_l2 (split past one pass)")
    try:
        attr = getattr(cupy.cuda.runtime, "cudaDevAttrL2CacheSize", 38)
        l2_bytes = int(cupy.cuda.runtime.deviceGetAttribute(attr, index))
    except Exception as e:  # noqa: BLE001
        l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)
        print(f"  note: cannot read cudaDevAttrL2CacheSize ({type(e).__name__}: {e}): using torch's "
              f"L2_cache_size, {l2_bytes} B")
    torch_l2 = getattr(props, "L2_cache_size", None)
    if torch_l2 is not None and int(torch_l2) != l2_bytes:
        print(f"  note: CuPy says {l2_bytes} B of L2, torch {torch_l2}: using CuPy's")
    return DeviceShape(sm, max(optin, DEFAULT_SHARED), clusters, cooperative, l2_bytes)


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
    if "bf16" in {d for _, _, d in args.runs} and arch_number(arch) < 80:
        print(f"!!! {arch}: the bf16 kernels need sm_80 or later (`#if __CUDA_ARCH__ >= 800`): bf16 'ours' rows "
              "will fail")
    nvcc = find_nvcc(args.nvcc)
    kernels = None
    device = None
    build_dir = Path(args.build_dir) if args.build_dir else Path(tempfile.mkdtemp(prefix="ms_torch_compare_"))
    if nvcc is None:
        print("!!! nvcc not found ($NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): 'ours' is SKIPPED")
    else:
        try:
            import cupy

            cupy.cuda.Device(torch.cuda.current_device()).use()
            device = query_device_shape(cupy, torch)
            if device.clusters and arch_number(arch) < ENTRY_MIN_ARCH["ms_fused_cluster"]:
                # The crate's fatbin has sm_90 SASS and plans ms_fused_cluster here; PTX for this
                # --arch has no cluster entries, so these runs plan as a device without clusters.
                print(f"!!! --arch {arch} has no ms_fused_cluster (sm_90 and later) but the device launches "
                      f"clusters: planning as without clusters (the crate would take ms_fused_cluster for rows "
                      f"past one block); drop --arch to compile for sm_{major}{minor}")
                device = dataclasses.replace(device, clusters=False)
            kernels = OursKernels(nvcc, arch, build_dir, device)
        except Exception as e:  # noqa: BLE001
            print(f"!!! building / loading the crate's kernels failed: 'ours' is SKIPPED\n{e}")
            if args.verbose:
                traceback.print_exc()
    env = environment(args, kernels, nvcc)
    if device is not None:
        dts = (("bf16/f16", 2), ("f32", 4), ("f64", 8))
        env["plan_device"] = (f"{device.sm_count} SMs, {device.max_shared_per_block} B of shared memory per block "
                              f"with the opt-in, clusters {'yes' if device.clusters else 'no'}: ms_fused_warp up to "
                              f"C = " + " / ".join(f"{warp_max_classes(n)} ({d})" for d, n in dts)
                              + "; ms_fused up to " + " / ".join(f"{fused_max_classes(n, device.max_shared_per_block)}"
                                                                 for _, n in dts)
                              + ("; ms_fused_cluster up to " + " / ".join(
                                  f"{cluster_max_classes(n, device.max_shared_per_block)}" for _, n in dts)
                                 if device.clusters else "")
                              + (f"; cooperative launch, {device.l2_bytes / 2**20:g} MiB of L2: ms_fused_l2 past that "
                                 f"(row groups within {device.l2_bytes // L2_SHARE} B, grid "
                                 f"{min(device.sm_count * l2_blocks_per_sm(4, False), MAX_GRID)}, or "
                                 f"{min(device.sm_count * l2_blocks_per_sm(8, False), MAX_GRID)} for "
                                 "f64 and _ext)" if device.cooperative else "; no cooperative launch: split past that"))
    print("torch_compare.py: candle-margin-softmax kernels vs PyTorch eager / torch.compile / Liger-Kernel")
    for k, v in env.items():
        print(f"  {k:14} {v}")
    if kernels is not None:
        probe_params = make_params(LossCfg(HeadCfg("sphereface", s=30.0, m=4, lam=5.0), label_smoothing=0.1,
                                           focal_gamma=2.0, z_loss=1e-4, n_poly=1),
                                   1234, 56789, 56789, 3, True)
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
            try:
                tp = kernels.probe_targets()
            except Exception as e:  # noqa: BLE001
                tp = [f"{type(e).__name__}: {e}"]
            if tp:
                print("!!! ms_targets probe FAILED: 'ours' is SKIPPED\n  " + "\n  ".join(tp))
                kernels = None
            else:
                print("  ms_targets probe: converted targets, first invalid row and 1/sum w match "
                      "kernels/targets.cu (u8 / u32 / i64 x f32 / f64)")
    results: List[dict] = []
    t_start = time.perf_counter()
    if kernels is not None and not args.no_preflight:
        print("\n--- preflight: ours vs the f64 reference on small shapes that take every path (odd C: "
              "unaligned rows), not timed")
        pre: List[dict] = []
        for dtype in sorted({d for _, _, d in args.runs}, key=list(DTYPE_INFO).index):
            for rows, classes in preflight_shapes(DTYPE_INFO[dtype][1], kernels.device):
                for pname in args.problems:
                    try:
                        run_group(PROBLEMS[pname], rows, classes, dtype, kernels, args, None, pre, preflight=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"!!! preflight {pname} {dtype} {rows}x{classes}: {type(e).__name__}: {e}")
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
    copies: Dict[str, Optional[dict]] = {}
    for rows, classes, dtype in args.runs:
        try:
            copy = measure_shape_copy(rows, classes, dtype, args)
            print(f"\ncopy {rows}x{classes} {dtype}: y.copy_(x) of {copy['bytes'] / 2 / 1e9:.3f} GB: "
                  f"{copy['ms']:.4f} ms (p20 {copy['p20_ms']:.4f}, p80 {copy['p80_ms']:.4f}), "
                  f"{copy['gbps']:.1f} GB/s (read + write)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"!!! copy {rows}x{classes} {dtype}: {type(e).__name__}: {e}: no %copy for this shape")
            copy = None
        copies[f"{rows}x{classes}:{dtype}"] = copy
        for pname in args.problems:
            try:
                run_group(PROBLEMS[pname], rows, classes, dtype, kernels, args, copy, results)
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
    print("\n" + "=" * 40 + " RESULTS " + "=" * 40)
    for k in ("date", "command", "device", "plan_device", "torch", "triton", "cupy", "liger_kernel", "nvcc", "git"):
        if k in env:
            print(f"  {k:14} {env[k]}")
    run_dtypes = sorted({d for _, _, d in args.runs}, key=list(DTYPE_INFO).index)
    print(f"  copy bandwidth ({args.copy_gib:g} GiB bf16) {copy_gbps:.1f} GB/s; per shape: "
          + "; ".join(f"{k} {v['gbps']:.1f} GB/s" if v else f"{k} -" for k, v in copies.items()))
    print("  tolerances vs f64 (loss / grad normwise / grad max): "
          + "; ".join(f"{d} {TOLERANCES[d]['loss']:g}/{TOLERANCES[d]['grad']:g}/{TOLERANCES[d]['gmax']:g}"
                      for d in run_dtypes))
    print_table(results)
    goals = print_goals(results, run_dtypes)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(environment=env, copy_gbps=copy_gbps, shape_copies=copies,
                                                   results=results, goals=goals), indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                    help="BxC or BxC:dtype shapes (default: the issue's %(default)s); commas also separate")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"],
                    help="dtypes of the shapes given without one: bf16 f16 f32 f64 (default bf16)")
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--providers", nargs="+", default=None,
                    help="only these providers (ours ours-nocheck ours-exact ours-autograd torch-eager "
                         "torch-compile liger arcface-eager arcface-compile)")
    ap.add_argument("--quick", action="store_true", help="short timing (warmup 10 ms, rep 40 ms, 2 input sets)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup, ms (default 50)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench rep, ms (default 200)")
    ap.add_argument("--sets", type=int, default=None, help="rotating input sets per group (default 3)")
    ap.add_argument("--input-budget-gib", type=float, default=6.0, help="memory for the input sets of one group")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy-bandwidth tensor")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--ours-path", choices=["auto", "split"], default="auto",
                    help="auto: as src/backends/launch/mod.rs (ms_fused_warp, ms_fused or ms_fused_cluster when the row fits, "
                         "else ms_fused_l2 with cooperative launch; see plan_loss_and_grad); split: always "
                         "partial -> finalize -> backward")
    ap.add_argument("--arch", default=None,
                    help="nvcc -arch (default: the GPU's, e.g. sm_90, which ms_fused_cluster needs; with "
                         "--selftest-params: sm_80 and sm_90, build.rs's targets)")
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
    for d in args.dtypes:
        if d not in DTYPE_INFO:
            ap.error(f"unknown dtype {d!r}: use bf16, f16, f32 or f64")
    runs: List[Tuple[int, int, str]] = []  # (B, C, dtype), in the order given
    for s in args.shapes:
        for part in s.split(","):
            if part.strip():
                try:
                    rows, classes, dtype = parse_shape_dtype(part)
                except argparse.ArgumentTypeError as e:
                    ap.error(str(e))
                for d in [dtype] if dtype else args.dtypes:
                    if (rows, classes, d) not in runs:
                        runs.append((rows, classes, d))
    args.runs = runs
    if args.quick:
        args.warmup_ms = 10.0 if args.warmup_ms is None else args.warmup_ms
        args.rep_ms = 40.0 if args.rep_ms is None else args.rep_ms
        args.sets = 2 if args.sets is None else args.sets
    args.warmup_ms = 50.0 if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = 200.0 if args.rep_ms is None else args.rep_ms
    args.sets = 3 if args.sets is None else args.sets
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.selftest_params:
        return selftest_params(args)
    return main_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
