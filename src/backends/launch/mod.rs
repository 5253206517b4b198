//! The one launch planner of the kernels of `kernels/*.cu`, and the one description of the launch
//! paths: which kernels a call runs, how many blocks each row gets, and every launch's grid,
//! block and dynamic shared memory. The CUDA backend (`backends::cuda`) launches exactly these
//! plans on a GPU and the emulated backend (`backends::emu`, feature `kernel-emu`) runs the same
//! plans through the SIMT emulator, so CI exercises the launch code as well as the kernels.
//!
//! The forward op (`loss`) and a slice's statistics: the **split forward**,
//! `ms_forward_partial_{variant}` over `splits` column ranges of each row ([`split_count`]:
//! enough blocks for two waves of the GPU), then `ms_forward_finalize`, one thread per row
//! merging its ranges in a fixed order. The backward op: `ms_backward_{variant}`, a
//! grid-stride pass over the rows that reads each row once more and writes its gradient.
//!
//! `loss_and_grad` takes the first of five paths that fits the row (C classes of `size` bytes):
//! 1. **warp**, `ms_fused_warp`: C ≤ [`warp_max_classes`], a warp per row and 8 rows a block,
//!    the row held in shared memory (narrow rows, where a block per row would idle).
//! 2. **block**, `ms_fused`: the row fits in the shared memory a block may opt into
//!    ([`fused_max_classes`]), one block per row, one read and one write.
//! 3. **cluster**, `ms_fused_cluster` (sm_90 and later): the row fits in the shared memory of
//!    [`CLUSTER`] blocks ([`cluster_max_classes`]), a cluster per row over distributed shared
//!    memory.
//! 4. **L2**, `ms_fused_l2`: the device has cooperative launch; groups of rows sized to a third
//!    of the L2 ([`l2_groups`]) are read once from memory and once more, for the gradient, from
//!    the L2, one grid barrier per group.
//! 5. **split**: the split forward (its finalize also writing the backward's row info and
//!    d(loss)/d(scale)), then `ms_backward`.
//!
//! `{variant}` is the head's element transform (identity, cosine, rbf), `_ext` with label
//! smoothing or soft-capping ([`kernel_variant`]).
//!
//! The one-pass limits (C; S = the shared memory a block may opt into, V = 16 / sizeof(T),
//! bytes(n) = round_up((n + V − 1)·sizeof(T), 16): warp 8·bytes(C) ≤ 32 KiB, block
//! bytes(C) + 2 KiB ≤ S, cluster bytes(round_up(⌈C / 8⌉, V)) + 2 KiB ≤ S;
//! `one_pass_max_classes` in the crate's API is the last one-pass column):
//!
//! | device (opt-in shared memory a block) | warp f32 / 2-byte / f64 | block f32 / 2-byte / f64 | cluster f32 / 2-byte / f64 |
//! | --- | --- | --- | --- |
//! | H100 / H200, sm_90 (227 KiB) | 1021 / 2041 / 511 | 57 597 / 115 193 / 28 799 | 460 768 / 921 536 / 230 384 |
//! | A100, sm_80 (163 KiB) | same | 41 213 / 82 425 / 20 607 | — |
//! | sm_86 / sm_89 (99 KiB) | same | 24 829 / 49 657 / 12 415 | — |
//! | no opt-in (48 KiB) | same | 11 773 / 23 545 / 5 887 | — |
//!
//! So on an H200: (8192, 32000) bf16 / f32 take a block per row, (4096, 128256) bf16 a cluster
//! per row, (512, 1 000 000) bf16 and (64, 1 000 000) f32 the L2 kernel (50 MiB of L2: groups of
//! 8 rows in 49 slices and of 4 rows in 99 slices, a grid of 396 blocks, 3 per SM; its `_ext` and
//! f64 entries are compiled for 2 per SM). Every block of an L2 group merges its row's slice
//! statistics itself in an order fixed by the slice count alone, so the result is bitwise
//! reproducible run to run; whether the second read is served from L2 at the planned group size
//! is the GPU measurement still to come ([`L2_SHARE`] is the knob). The split forward gives each
//! row ⌊2 · resident / B⌋ blocks (resident = SMs × the entry's minimum blocks per SM), at most
//! ⌈C / 4096⌉ and at least 1, so that few wide rows still fill two full waves. Targets:
//! `ms_targets` runs first in every op; the forward reads back one 8-byte value (the first
//! invalid row) unless `check_targets(false)`.
//!
//! Every plan depends on the shapes, the dtype and the configuration only (never on the data or
//! the device), so the merge order of the reductions, hence every bit of the result, is the same
//! run to run.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

pub(crate) mod params;

use candle_core::{Layout, Result, bail};

use crate::config::{Head, MarginSoftmaxLoss, OP_NAME};
use crate::layout::PARTIAL_COLUMNS;
use params::MsParams;

/// Threads per block of `ms_forward_partial`, `ms_backward` and `ms_fused`: `MS_BLOCK` of
/// kernels/params.cuh, which the kernels' block reductions are compiled for (checked against the
/// kernels' own value by the `kernel-emu` ABI test).
pub(crate) const BLOCK: u32 = 256;
/// Threads per block of `ms_forward_finalize` (one thread per row): `MS_FINALIZE_BLOCK`.
pub(crate) const FINALIZE_BLOCK: u32 = 128;
/// Threads of the one block of `ms_targets`: `MS_TARGETS_BLOCK`.
pub(crate) const TARGETS_BLOCK: u32 = 1024;
/// The grid cap of a GPU launch: the largest grid y / z dimension, used for every dimension.
/// Every kernel is grid-stride, so any cap is correct; tests lower it ([`Planner::grid_cap`]) to
/// run the grid-stride loops on small inputs.
pub(crate) const MAX_GRID: usize = 65_535;
/// The shared memory every CUDA GPU gives a block without an opt-in.
pub(crate) const DEFAULT_SHARED: usize = 48 * 1024;
/// Room kept for the static shared memory of `ms_fused` (today the block reduction's
/// MS_BLOCK / 32 = 8 warp states of 5 values and the 6 row-info values: 184 bytes for f32 / f16 /
/// bf16, 368 for f64), checked at run time against the loaded kernel by the CUDA backend.
pub(crate) const FUSED_STATIC_RESERVE: usize = 2048;

/// What the plans need to know of the device: its SM count and the shared memory a block may
/// opt into (`cudaDevAttrMaxSharedMemoryPerBlockOptin`: 227 KiB on H100 / H200, 163 KiB on
/// A100, 99 KiB on sm_86 / sm_89, 48 KiB where there is no opt-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// The most shared memory (static + dynamic) one block may use, in bytes.
    pub max_shared_per_block: usize,
    /// Thread-block clusters with distributed shared memory (sm_90 and later).
    pub clusters: bool,
    /// Cooperative launch (`cudaDevAttrCooperativeLaunch`: grid-wide barriers), which
    /// `ms_fused_l2` needs; without it rows wider than one pass take the split path.
    pub cooperative: bool,
    /// The L2 cache, in bytes (`cudaDevAttrL2CacheSize`): `ms_fused_l2` sizes its row groups
    /// from it.
    pub l2_bytes: usize,
}

impl DeviceShape {
    /// A GPU that is planned for without knowing it: 48 KiB of shared memory a block (no
    /// opt-in), 132 SMs.
    #[cfg(any(test, feature = "kernel-emu"))]
    pub const DEFAULT: DeviceShape = DeviceShape {
        sm_count: 132,
        max_shared_per_block: DEFAULT_SHARED,
        clusters: false,
        cooperative: false,
        l2_bytes: 0,
    };
    /// NVIDIA H200 / H100 SXM: 132 SMs, 227 KiB of shared memory a block with the opt-in,
    /// clusters, cooperative launch, 50 MiB of L2.
    #[cfg(any(test, feature = "kernel-emu"))]
    pub const H200: DeviceShape = DeviceShape {
        sm_count: 132,
        max_shared_per_block: 227 * 1024,
        clusters: true,
        cooperative: true,
        l2_bytes: 50 * 1024 * 1024,
    };
}

/// Elements of `size` bytes in a 16-byte vector.
const fn vector_width(size: usize) -> usize {
    16 / size
}

/// The dynamic shared memory `ms_fused` needs for rows of `classes` elements of `size` bytes:
/// the row at an offset below one vector (so that its 16-byte-aligned part is aligned in
/// shared memory too, kernels/fused.cu), rounded up to 16 bytes.
pub(crate) const fn fused_shared_bytes(classes: usize, size: usize) -> usize {
    ((classes + vector_width(size) - 1) * size).next_multiple_of(16)
}

/// The widest row `loss_and_grad` runs through `ms_fused` for elements of `size` bytes on a
/// device that gives a block `max_shared` bytes of shared memory: the largest C with
/// [`fused_shared_bytes`] + [`FUSED_STATIC_RESERVE`] ≤ `max_shared`.
pub(crate) const fn fused_max_classes(size: usize, max_shared: usize) -> usize {
    let room = max_shared.saturating_sub(FUSED_STATIC_RESERVE) / 16 * 16;
    (room / size).saturating_sub(vector_width(size) - 1)
}
// The numbers documented on `MarginSoftmaxLoss::loss_and_grad`.
const _: () = assert!(
    fused_max_classes(4, DEFAULT_SHARED) == 11_773
        && fused_max_classes(2, DEFAULT_SHARED) == 23_545
        && fused_max_classes(8, DEFAULT_SHARED) == 5_887
        && fused_max_classes(4, 227 * 1024) == 57_597
        && fused_max_classes(2, 227 * 1024) == 115_193
        && fused_max_classes(8, 227 * 1024) == 28_799
);

/// The dynamic shared memory `ms_fused_warp` may use: a block's `BLOCK / 32` row slots.
const WARP_SHARED: usize = 32 * 1024;
/// Rows per block of `ms_fused_warp` (a warp each).
pub(crate) const WARP_ROWS: usize = BLOCK as usize / 32;

/// The widest row `ms_fused_warp` takes: [`WARP_ROWS`] slots of [`fused_shared_bytes`] within
/// [`WARP_SHARED`] (1021 f32, 2041 f16 / bf16, 511 f64 classes).
pub(crate) const fn warp_max_classes(size: usize) -> usize {
    fused_max_classes(size, WARP_SHARED / WARP_ROWS + FUSED_STATIC_RESERVE)
}
const _: () = assert!(
    warp_max_classes(4) == 1021 && warp_max_classes(2) == 2041 && warp_max_classes(8) == 511
);

/// Blocks per row of `ms_fused_cluster` (`MS_CLUSTER`, kernels/params.cuh).
pub(crate) const CLUSTER: usize = 8;

/// The classes each block of `ms_fused_cluster` holds for rows of `classes`:
/// round_up(⌈C / CLUSTER⌉, 16 / size) (kernels/fused.cu).
pub(crate) const fn cluster_slice(classes: usize, size: usize) -> usize {
    classes
        .div_ceil(CLUSTER)
        .next_multiple_of(vector_width(size))
}

/// The widest row `ms_fused_cluster` takes: every block's slice within [`fused_max_classes`].
pub(crate) const fn cluster_max_classes(size: usize, max_shared: usize) -> usize {
    fused_max_classes(size, max_shared) / vector_width(size) * vector_width(size) * CLUSTER
}
const _: () = assert!(
    cluster_max_classes(2, 227 * 1024) == 921_536 && cluster_max_classes(4, 227 * 1024) == 460_768
);

/// Blocks of `ms_forward_partial` one SM holds at least: its `__launch_bounds__` minimum, 4 for
/// the f32-accumulating entries and 2 for f64 (kernels/forward.cu).
const fn partial_blocks_per_sm(size: usize) -> usize {
    if size == 8 { 2 } else { 4 }
}

/// The split forward gives every block at least this many columns ...
const SPLIT_MIN_COLUMNS: usize = 4096;
/// ... and aims at this many waves of the device's resident blocks in all (rows × splits).
const SPLIT_WAVES: usize = 2;

/// Blocks per row of the split forward (`ms_forward_partial`) on `device` for elements of
/// `size` bytes: enough blocks for [`SPLIT_WAVES`] full waves when the rows alone fill fewer
/// (splits = ⌊waves · resident / B⌋), never a block under [`SPLIT_MIN_COLUMNS`] columns
/// (splits ≤ ⌈C / 4096⌉), at least 1.
pub(crate) fn split_count(rows: usize, classes: usize, size: usize, device: DeviceShape) -> usize {
    let resident = device.sm_count.max(1) * partial_blocks_per_sm(size);
    (SPLIT_WAVES * resident / rows.max(1))
        .min(classes.div_ceil(SPLIT_MIN_COLUMNS))
        .max(1)
}

/// Blocks of `ms_fused_l2` per SM: the `__launch_bounds__` minimum its entries are compiled for
/// (kernels/fused.cu: 3, or 2 for the `_ext` entries and f64), which guarantees that many are
/// resident at once; its cooperative grid is exactly that many per SM.
pub(crate) const fn l2_blocks_per_sm(size: usize, ext: bool) -> usize {
    if size == 8 || ext { 2 } else { 3 }
}

/// `ms_fused_l2` groups rows so that one group's inputs take at most 1 / L2_SHARE of the L2: the
/// group whose gradient is being written (read a second time, from L2) and the next group
/// (read the first time) are in flight together, with the gradients' writes passing through L2
/// as well.
const L2_SHARE: usize = 3;

/// `ms_fused_l2`'s row groups: (rows a group, slices a row, blocks of the grid). A group holds
/// ⌊L2 / L2_SHARE / row bytes⌋ rows (at least 1, at most B); the grid is the device's resident
/// blocks ([`l2_blocks_per_sm`] per SM, within the grid cap), and each row of a group gets an
/// equal share of it (at least 1 slice, none under [`SPLIT_MIN_COLUMNS`] columns), so that one
/// phase gives each block at most one slice to read and one to write.
pub(crate) fn l2_groups(
    rows: usize,
    classes: usize,
    size: usize,
    ext: bool,
    device: DeviceShape,
    grid_cap: usize,
) -> (usize, usize, usize) {
    let row_bytes = classes.max(1) * size;
    let group_rows = (device.l2_bytes / L2_SHARE / row_bytes).clamp(1, rows.max(1));
    let grid = (device.sm_count.max(1) * l2_blocks_per_sm(size, ext)).min(grid_cap);
    let splits = (grid / group_rows)
        .min(classes.div_ceil(SPLIT_MIN_COLUMNS))
        .max(1);
    (group_rows, splits, grid)
}

/// The element loops of a launch (kernels/rows.cuh, `MS_PER_TRANSFORM`): the head's transform,
/// and `_ext` when an option adds work per element (label smoothing, soft-capping and, in the
/// forward, the row scale's gradient). The kernels' names are `{op}_{variant}_{dtype}`.
pub(crate) fn kernel_variant(cfg: &MarginSoftmaxLoss, scale_grad: bool) -> &'static str {
    let ext = cfg.label_smoothing > 0.0 || cfg.logit_softcap.is_some() || scale_grad;
    match (&cfg.head, ext) {
        (Head::Softmax { .. }, false) => "identity",
        (Head::Softmax { .. }, true) => "identity_ext",
        (Head::Rbf { .. }, false) => "rbf",
        (Head::Rbf { .. }, true) => "rbf_ext",
        (_, false) => "cosine",
        (_, true) => "cosine_ext",
    }
}

/// The index of a variant in `MS_PER_TRANSFORM`'s order (the emulated backend's C ABI takes it).
#[cfg(any(test, feature = "kernel-emu"))]
pub(crate) fn variant_index(variant: &str) -> i32 {
    match variant {
        "identity" => 0,
        "cosine" => 1,
        "rbf" => 2,
        "identity_ext" => 3,
        "cosine_ext" => 4,
        _ => 5,
    }
}

/// One kernel launch: grid, block and dynamic shared memory. `#[repr(C)]`: the emulated backend
/// passes it to `kernels/emu/capi.cpp` (`struct EmuLaunch`) as it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

/// The shape of a [B, C] input whose rows are each contiguous, as the kernels index it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowShape {
    pub rows: usize,
    pub classes: usize,
    /// Elements between the starts of two rows.
    pub row_stride: usize,
}

impl RowShape {
    pub(crate) fn new(layout: &Layout, name: &str) -> Result<Self> {
        let (rows, classes) = layout.shape().dims2()?;
        let stride = layout.stride();
        if classes > 1 && stride[1] != 1 {
            bail!("{OP_NAME}({name}): internal error: input rows must be contiguous")
        }
        // Targets travel as i32, and the grids count rows × splits blocks in an i32.
        if classes > i32::MAX as usize || rows > i32::MAX as usize {
            bail!(
                "{OP_NAME}({name}): input shape {:?} is too large for the CUDA kernels (B and C \
                 must be below 2^31)",
                layout.dims()
            )
        }
        Ok(Self {
            rows,
            classes,
            row_stride: stride[0],
        })
    }
}

/// The forward: `partial` writes each (row, split)'s online state into a buffer of
/// `partials_len` elements, then `finalize` merges them into the statistics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardPlan {
    pub params: MsParams,
    /// The element loops of `ms_forward_partial` ([`kernel_variant`]).
    pub variant: &'static str,
    pub partial: Launch,
    pub finalize: Launch,
    pub partials_len: usize,
}

/// The backward: one launch of `ms_backward`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardPlan {
    pub params: MsParams,
    pub variant: &'static str,
    pub backward: Launch,
}

/// `loss_and_grad`: `ms_fused_warp` for narrow rows ([`warp_max_classes`]), `ms_fused` when the
/// row fits in the shared memory a block may have on the device, `ms_fused_cluster` (sm_90) when
/// it fits in [`CLUSTER`] blocks', else `ms_fused_l2` where the device has cooperative launch
/// ([`l2_groups`]), else the split forward (its finalize also writing the backward's row info
/// and d(loss)/d(scale)) then `ms_backward`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LossAndGradPlan {
    Fused {
        params: MsParams,
        variant: &'static str,
        fused: Launch,
    },
    /// `ms_fused_warp`: a warp per row, [`WARP_ROWS`] rows per block.
    FusedWarp {
        params: MsParams,
        variant: &'static str,
        fused: Launch,
    },
    /// `cluster` is `ms_fused_cluster`'s launch (grid a multiple of [`CLUSTER`]).
    FusedCluster {
        params: MsParams,
        variant: &'static str,
        cluster: Launch,
    },
    /// `ms_fused_l2`: a cooperative `launch` over row groups, each row in `params.splits`
    /// slices.
    FusedL2 {
        params: MsParams,
        variant: &'static str,
        launch: Launch,
        work: L2Work,
    },
    Split {
        forward: ForwardPlan,
        /// `ms_backward`'s variant (no `_ext` for the row scale: it needs none).
        backward_variant: &'static str,
        backward: Launch,
    },
}

/// `ms_fused_l2`'s two arguments beyond `ms_fused`'s: the rows a group, and the length of the
/// buffer of the slices' partial states (rows × splits × [`PARTIAL_COLUMNS`] elements of the
/// accumulation type) that the backend allocates for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct L2Work {
    pub group_rows: usize,
    pub partials_len: usize,
}

/// `ms_targets`: one block.
pub(crate) const TARGETS_LAUNCH: Launch = Launch {
    grid: [1, 1, 1],
    block: [TARGETS_BLOCK, 1, 1],
    shared_mem_bytes: 0,
};

/// Plans launches for a device shape, with a grid cap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planner {
    grid_cap: usize,
    device: DeviceShape,
}

impl Planner {
    /// The planner of launches on a GPU of this shape.
    pub(crate) fn device(device: DeviceShape) -> Self {
        Self {
            grid_cap: MAX_GRID,
            device,
        }
    }

    /// A planner whose grids have at most `cap` blocks in each dimension (clamped to
    /// 1..=[`MAX_GRID`]): the kernels' grid-stride loops then run on small inputs.
    #[cfg(any(test, feature = "kernel-emu"))]
    pub(crate) fn grid_cap(cap: usize, device: DeviceShape) -> Self {
        Self {
            grid_cap: cap.clamp(1, MAX_GRID),
            device,
        }
    }

    fn grid(&self, blocks: usize) -> u32 {
        // ≤ MAX_GRID < 2^32.
        blocks.clamp(1, self.grid_cap) as u32
    }

    /// The forward op (`ms_forward_partial` → `ms_forward_finalize`) for elements of `size`
    /// bytes; `scale_grad`: d(loss)/d(scale) is wanted.
    pub(crate) fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        size: usize,
        scale_grad: bool,
    ) -> Result<ForwardPlan> {
        let splits = split_count(shape.rows, shape.classes, size, self.device);
        let params = params(cfg, shape, splits, scale_grad)?;
        let blocks = shape.rows * splits;
        Ok(ForwardPlan {
            params,
            variant: kernel_variant(cfg, scale_grad),
            partial: Launch {
                grid: [self.grid(blocks), 1, 1],
                block: [BLOCK, 1, 1],
                shared_mem_bytes: 0,
            },
            finalize: Launch {
                grid: [
                    self.grid(shape.rows.div_ceil(FINALIZE_BLOCK as usize)),
                    1,
                    1,
                ],
                block: [FINALIZE_BLOCK, 1, 1],
                shared_mem_bytes: 0,
            },
            partials_len: blocks * PARTIAL_COLUMNS,
        })
    }

    /// The backward op (`ms_backward`), for elements of `size` bytes: column vectors of
    /// 16 / size elements on grid x, rows on grid y.
    pub(crate) fn backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        size: usize,
    ) -> Result<BackwardPlan> {
        Ok(BackwardPlan {
            params: params(cfg, shape, 1, false)?,
            variant: kernel_variant(cfg, false),
            backward: self.backward_launch(shape, size),
        })
    }

    fn backward_launch(&self, shape: RowShape, size: usize) -> Launch {
        let per_block = BLOCK as usize * vector_width(size);
        Launch {
            grid: [
                self.grid(shape.classes.div_ceil(per_block)),
                self.grid(shape.rows),
                1,
            ],
            block: [BLOCK, 1, 1],
            shared_mem_bytes: 0,
        }
    }

    /// The widest row `loss_and_grad` runs through `ms_fused` for elements of `size` bytes.
    pub(crate) fn fused_max_classes(&self, size: usize) -> usize {
        fused_max_classes(size, self.device.max_shared_per_block)
    }

    /// The widest row `loss_and_grad` reads once: through `ms_fused_cluster` where the device
    /// has clusters, else `ms_fused`.
    pub(crate) fn one_pass_max_classes(&self, size: usize) -> usize {
        if self.device.clusters {
            cluster_max_classes(size, self.device.max_shared_per_block)
        } else {
            self.fused_max_classes(size)
        }
    }

    /// `loss_and_grad` for elements of `size` bytes.
    pub(crate) fn loss_and_grad(
        &self,
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        size: usize,
        scale_grad: bool,
    ) -> Result<LossAndGradPlan> {
        if shape.classes <= warp_max_classes(size) {
            // ≤ WARP_SHARED.
            let shared = (WARP_ROWS * fused_shared_bytes(shape.classes, size)) as u32;
            Ok(LossAndGradPlan::FusedWarp {
                params: params(cfg, shape, 1, scale_grad)?,
                variant: kernel_variant(cfg, scale_grad),
                fused: Launch {
                    grid: [self.grid(shape.rows.div_ceil(WARP_ROWS)), 1, 1],
                    block: [BLOCK, 1, 1],
                    shared_mem_bytes: shared,
                },
            })
        } else if shape.classes <= self.fused_max_classes(size) {
            // ≤ max_shared_per_block, a device attribute (an i32).
            let shared = fused_shared_bytes(shape.classes, size) as u32;
            Ok(LossAndGradPlan::Fused {
                params: params(cfg, shape, 1, scale_grad)?,
                variant: kernel_variant(cfg, scale_grad),
                fused: Launch {
                    grid: [self.grid(shape.rows), 1, 1],
                    block: [BLOCK, 1, 1],
                    shared_mem_bytes: shared,
                },
            })
        } else if self.device.clusters
            && shape.classes <= cluster_max_classes(size, self.device.max_shared_per_block)
        {
            let shared = fused_shared_bytes(cluster_slice(shape.classes, size), size) as u32;
            // Rows in flight: a whole number of clusters within the grid cap (at least one).
            let clusters = shape.rows.min(self.grid_cap / CLUSTER).max(1);
            Ok(LossAndGradPlan::FusedCluster {
                params: params(cfg, shape, 1, scale_grad)?,
                variant: kernel_variant(cfg, scale_grad),
                cluster: Launch {
                    // ≤ MAX_GRID.
                    grid: [(clusters * CLUSTER) as u32, 1, 1],
                    block: [BLOCK, 1, 1],
                    shared_mem_bytes: shared,
                },
            })
        } else if self.device.cooperative {
            let variant = kernel_variant(cfg, scale_grad);
            let ext = variant.ends_with("_ext");
            let (group_rows, splits, grid) = l2_groups(
                shape.rows,
                shape.classes,
                size,
                ext,
                self.device,
                self.grid_cap,
            );
            let params = params(cfg, shape, splits, scale_grad)?;
            // A phase's work items (a group's slices, twice) are counted in an i32.
            if (2 * group_rows * splits) > i32::MAX as usize {
                bail!(
                    "{OP_NAME}({}): too many slices for the CUDA L2 kernel",
                    cfg.head.name()
                )
            }
            Ok(LossAndGradPlan::FusedL2 {
                params,
                variant,
                launch: Launch {
                    // ≤ grid_cap ≤ MAX_GRID.
                    grid: [grid as u32, 1, 1],
                    block: [BLOCK, 1, 1],
                    shared_mem_bytes: 0,
                },
                work: L2Work {
                    group_rows,
                    partials_len: shape.rows * splits * PARTIAL_COLUMNS,
                },
            })
        } else {
            Ok(LossAndGradPlan::Split {
                forward: self.forward(cfg, shape, size, scale_grad)?,
                backward_variant: kernel_variant(cfg, false),
                backward: self.backward_launch(shape, size),
            })
        }
    }
}

/// The kernels' parameters for this configuration and shape, after the checks that the launch
/// grids and the i32 fields need.
fn params(
    cfg: &MarginSoftmaxLoss,
    shape: RowShape,
    splits: usize,
    scale_grad: bool,
) -> Result<MsParams> {
    let name = cfg.head.name();
    if shape
        .rows
        .checked_mul(splits)
        .is_none_or(|n| n > i32::MAX as usize)
    {
        bail!("{OP_NAME}({name}): too many rows for the CUDA forward grid")
    }
    if i32::try_from(cfg.poly.len()).is_err() {
        bail!("{OP_NAME}({name}): too many PolyLoss coefficients")
    }
    Ok(MsParams::new(
        cfg,
        shape.rows,
        shape.classes,
        shape.row_stride,
        splits,
        scale_grad,
    ))
}

#[cfg(test)]
mod tests;
