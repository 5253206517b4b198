//! Launch planning for the kernels of `kernels/*.cu`, in one pure-Rust place: which path a call
//! takes (a warp, a block or a cluster per row, the L2 kernel's row groups, or the split
//! forward → backward), how many blocks each row of the split forward gets, and every launch's
//! grid, block and dynamic shared memory.
//! The CUDA backend (`src/cuda.rs`) launches exactly these plans on a GPU and the emulated
//! backend (`src/emu.rs`, feature `kernel-emu`) runs the same plans through the SIMT emulator,
//! so CI exercises the launch code as well as the kernels.
//!
//! Every plan depends on the shapes, the dtype and the configuration only (never on the data or
//! the device), so the merge order of the reductions, hence every bit of the result, is the same
//! run to run.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{Layout, Result, bail};

use crate::config::{Head, MarginSoftmaxLoss, OP_NAME};
use crate::kernel_params::MsParams;

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
/// Columns of one (row, split)'s partial state (`MS_PARTIAL_COLUMNS`): max, Σ exp, Σ exp·v,
/// Σ w·v, Σ w·z (v = ∂z/∂r, w the smoothing weight; see `Online` in kernels/common.cuh).
pub(crate) const PARTIAL_COLUMNS: usize = 5;

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
mod tests {
    use super::*;
    use crate::config::Head;

    fn shape(rows: usize, classes: usize) -> RowShape {
        RowShape {
            rows,
            classes,
            row_stride: classes,
        }
    }

    #[test]
    fn split_counts() {
        let d = DeviceShape::H200; // 528 resident partial blocks (264 for f64)
        assert_eq!(split_count(1, 1, 4, d), 1);
        assert_eq!(split_count(0, 100, 4, d), 1);
        assert_eq!(split_count(4, 11_777, 4, d), 3);
        assert_eq!(split_count(64, 1_000_000, 4, d), 16);
        assert_eq!(split_count(64, 1_000_000, 8, d), 8);
        assert_eq!(split_count(512, 1_000_000, 2, d), 2);
        assert_eq!(split_count(1024, 32_000, 2, d), 1);
        assert_eq!(split_count(2, 1_000_000, 4, d), 245);
    }

    #[test]
    fn path_boundary_per_dtype_and_device() {
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        for device in [DeviceShape::DEFAULT, DeviceShape::H200] {
            let planner = Planner::device(device);
            for size in [2usize, 4, 8] {
                let limit = planner.fused_max_classes(size);
                match planner
                    .loss_and_grad(&cfg, shape(3, limit), size, false)
                    .unwrap()
                {
                    LossAndGradPlan::Fused { fused, .. } => {
                        let shared = fused.shared_mem_bytes as usize;
                        assert!(shared >= (limit + 16 / size - 1) * size);
                        assert!(shared + FUSED_STATIC_RESERVE <= device.max_shared_per_block);
                    }
                    other => panic!("C = {limit}, size {size}: {other:?}"),
                }
                // Past one block: a cluster where the device has them, else the split path.
                let wider = planner
                    .loss_and_grad(&cfg, shape(3, limit + 1), size, false)
                    .unwrap();
                if device.clusters {
                    assert!(
                        matches!(wider, LossAndGradPlan::FusedCluster { .. }),
                        "{wider:?}"
                    );
                } else {
                    assert!(matches!(wider, LossAndGradPlan::Split { .. }), "{wider:?}");
                }
            }
        }
    }

    #[test]
    fn warp_path_for_narrow_rows() {
        let cfg = MarginSoftmaxLoss::new(Head::softmax());
        let planner = Planner::device(DeviceShape::DEFAULT);
        for size in [2usize, 4, 8] {
            let limit = warp_max_classes(size);
            match planner
                .loss_and_grad(&cfg, shape(17, limit), size, false)
                .unwrap()
            {
                LossAndGradPlan::FusedWarp { fused, .. } => {
                    assert_eq!(fused.grid, [3, 1, 1]);
                    assert!(fused.shared_mem_bytes as usize <= WARP_SHARED);
                }
                other => panic!("{other:?}"),
            }
            let wider = planner.loss_and_grad(&cfg, shape(17, limit + 1), size, false);
            assert!(matches!(wider.unwrap(), LossAndGradPlan::Fused { .. }));
        }
    }

    #[test]
    fn cluster_path_on_h200() {
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        let h200 = Planner::device(DeviceShape::H200);
        let plan = |c: usize, size: usize| h200.loss_and_grad(&cfg, shape(4096, c), size, false);
        // The shapes: (8192, 32000) one block per row; (4096, 128256) bf16 a cluster.
        assert!(matches!(
            plan(32_000, 2).unwrap(),
            LossAndGradPlan::Fused { .. }
        ));
        match plan(128_256, 2).unwrap() {
            LossAndGradPlan::FusedCluster { cluster, .. } => {
                assert_eq!(cluster.grid, [4096 * 8, 1, 1]);
                assert_eq!(cluster_slice(128_256, 2), 16_032);
                assert_eq!(
                    cluster.shared_mem_bytes as usize,
                    fused_shared_bytes(16_032, 2)
                );
            }
            other => panic!("{other:?}"),
        }
        for size in [2usize, 4, 8] {
            let limit = h200.one_pass_max_classes(size);
            let slice = cluster_slice(limit, size);
            assert!(fused_shared_bytes(slice, size) + FUSED_STATIC_RESERVE <= 227 * 1024);
            assert!(matches!(
                plan(limit, size).unwrap(),
                LossAndGradPlan::FusedCluster { .. }
            ));
            assert!(matches!(
                plan(limit + 1, size).unwrap(),
                LossAndGradPlan::FusedL2 { .. }
            ));
        }
        // No clusters without the capability: one block, then the L2 kernel.
        let a100 = Planner::device(DeviceShape {
            clusters: false,
            ..DeviceShape::H200
        });
        let plan = a100
            .loss_and_grad(&cfg, shape(4096, 128_256), 2, false)
            .unwrap();
        assert!(matches!(plan, LossAndGradPlan::FusedL2 { .. }));
        // Nor the L2 kernel without cooperative launch: the split path.
        let plain = Planner::device(DeviceShape {
            cooperative: false,
            ..DeviceShape::H200
        });
        let plan = plain
            .loss_and_grad(&cfg, shape(64, 1_000_000), 4, false)
            .unwrap();
        assert!(matches!(plan, LossAndGradPlan::Split { .. }));
    }

    /// The rows past a cluster on an H200 (50 MiB of L2, a group within a third of it).
    #[test]
    fn l2_path_on_h200() {
        let h200 = Planner::device(DeviceShape::H200);
        let check = |cfg: &MarginSoftmaxLoss, rows, classes, size, want: (usize, usize, u32)| {
            match h200
                .loss_and_grad(cfg, shape(rows, classes), size, false)
                .unwrap()
            {
                LossAndGradPlan::FusedL2 {
                    params,
                    launch,
                    work:
                        L2Work {
                            group_rows,
                            partials_len,
                        },
                    ..
                } => {
                    assert_eq!((group_rows, params.splits as usize, launch.grid[0]), want);
                    assert_eq!(partials_len, rows * want.1 * PARTIAL_COLUMNS);
                    // A group's inputs within a third of the L2 (or one row).
                    assert!(group_rows == 1 || group_rows * classes * size <= (50 << 20) / 3);
                    // A phase gives each block at most one slice to read and one to write.
                    assert!(group_rows * want.1 <= launch.grid[0] as usize);
                }
                other => panic!("{other:?}"),
            }
        };
        let arcface = MarginSoftmaxLoss::new(Head::arcface());
        // (512, 1e6) bf16: 2 MB rows, 8 a group, 396 blocks (3 per SM), 49 slices of ~20k.
        check(&arcface, 512, 1_000_000, 2, (8, 49, 396));
        // (64, 1e6) f32: 4 MB rows, 4 a group, 99 slices.
        check(&arcface, 64, 1_000_000, 4, (4, 99, 396));
        // f64 and the `_ext` entries: 2 blocks per SM.
        check(&arcface, 64, 1_000_000, 8, (2, 132, 264));
        let mut smooth = MarginSoftmaxLoss::new(Head::arcface());
        smooth.label_smoothing = 0.1;
        check(&smooth, 64, 1_000_000, 4, (4, 66, 264));
        // One row wider than the budget: a group of one, slices of at least 4096 columns.
        check(&arcface, 3, 10_000_000, 4, (1, 396, 396));
        check(&arcface, 3, 500_000, 8, (3, 88, 264));
        // The grid cap bounds the grid, hence the slices.
        let capped = Planner::grid_cap(16, DeviceShape::H200);
        match capped
            .loss_and_grad(&arcface, shape(2, 460_769), 4, false)
            .unwrap()
        {
            LossAndGradPlan::FusedL2 {
                params,
                launch,
                work: L2Work { group_rows, .. },
                ..
            } => assert_eq!((group_rows, params.splits, launch.grid[0]), (2, 8, 16)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn variants() {
        let mut cfg = MarginSoftmaxLoss::new(Head::softmax());
        assert_eq!(kernel_variant(&cfg, false), "identity");
        assert_eq!(kernel_variant(&cfg, true), "identity_ext");
        cfg.label_smoothing = 0.1;
        assert_eq!(kernel_variant(&cfg, false), "identity_ext");
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        assert_eq!(kernel_variant(&cfg, false), "cosine");
        let cfg = MarginSoftmaxLoss::new(Head::rbf());
        assert_eq!(kernel_variant(&cfg, false), "rbf");
        for (i, v) in [
            "identity",
            "cosine",
            "rbf",
            "identity_ext",
            "cosine_ext",
            "rbf_ext",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(variant_index(v), i as i32);
        }
    }

    #[test]
    fn grids_are_capped_and_never_empty() {
        let cfg = MarginSoftmaxLoss::new(Head::softmax());
        let p = Planner::device(DeviceShape::H200)
            .forward(&cfg, shape(100_000, 8), 4, false)
            .unwrap();
        assert_eq!(p.partial.grid, [MAX_GRID as u32, 1, 1]);
        assert_eq!(p.partials_len, 100_000 * PARTIAL_COLUMNS);
        let b = Planner::grid_cap(3, DeviceShape::DEFAULT)
            .backward(&cfg, shape(10, 5000), 4)
            .unwrap();
        assert_eq!(b.backward.grid, [3, 3, 1]);
        let one = Planner::grid_cap(0, DeviceShape::DEFAULT)
            .backward(&cfg, shape(1, 1), 2)
            .unwrap();
        assert_eq!(one.backward.grid, [1, 1, 1]);
    }
}
