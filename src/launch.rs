//! Launch planning for the kernels of `kernels/*.cu`, in one pure-Rust place: which path a call
//! takes (the fused one-block-per-row kernel or the split forward → backward), how many blocks
//! each row of the split forward gets, and every launch's grid, block and dynamic shared memory.
//! The CUDA backend (`src/cuda.rs`) launches exactly these plans on a GPU and the emulated
//! backend (`src/emu.rs`, feature `kernel-emu`) runs the same plans through the SIMT emulator,
//! so CI exercises the launch code as well as the kernels.
//!
//! Every plan depends on the shapes, the dtype and the configuration only (never on the data or
//! the device), so the merge order of the reductions, hence every bit of the result, is the same
//! run to run.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{Layout, Result, bail};

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::kernel_params::MsParams;

/// Threads per block of `ms_forward_partial`, `ms_backward` and `ms_fused`: `MS_BLOCK` of
/// kernels/params.cuh, which the kernels' block reductions are compiled for (checked against the
/// kernels' own value by the `kernel-emu` ABI test).
pub(crate) const BLOCK: u32 = 256;
/// Threads per block of `ms_forward_finalize` (one thread per row): `MS_FINALIZE_BLOCK`.
pub(crate) const FINALIZE_BLOCK: u32 = 128;
/// The grid cap of a GPU launch: the largest grid y / z dimension, used for every dimension.
/// Every kernel is grid-stride, so any cap is correct; tests lower it ([`Planner::grid_cap`]) to
/// run the grid-stride loops on small inputs.
pub(crate) const MAX_GRID: usize = 65_535;
/// Columns of one (row, split)'s partial state (`MS_PARTIAL_COLUMNS`): max, Σ exp, Σ exp·v,
/// Σ w·v, Σ w·z (v = ∂z/∂r, w the smoothing weight; see `Online` in kernels/common.cuh).
pub(crate) const PARTIAL_COLUMNS: usize = 5;

/// The shared memory one block of `ms_fused` may use in all (static + dynamic): the default
/// per-block limit of every CUDA GPU, so no opt-in attribute is needed.
const FUSED_SMEM_LIMIT: usize = 48 * 1024;
/// Room kept for the static shared memory of `ms_fused` (today the block reduction's
/// MS_BLOCK / 32 = 8 warp states of 5 values and the 6 row-info values: 184 bytes for f32 / f16 /
/// bf16, 368 for f64), checked at run time against the loaded kernel by the CUDA backend.
pub(crate) const FUSED_STATIC_RESERVE: usize = 2048;

/// The widest row `loss_and_grad` runs through `ms_fused` for elements of `size` bytes: the row
/// must fit in round_up(C·size, 16) ≤ 48 KiB − 2048 = 47104 bytes (a multiple of 16, so this is
/// C·size ≤ 47104).
pub(crate) const fn fused_max_classes(size: usize) -> usize {
    (FUSED_SMEM_LIMIT - FUSED_STATIC_RESERVE) / size
}
// The numbers documented on `MarginSoftmaxLoss::loss_and_grad`.
const _: () = assert!(
    fused_max_classes(4) == 11_776
        && fused_max_classes(2) == 23_552
        && fused_max_classes(8) == 5_888
);

/// The split forward aims at this many blocks in all (rows × splits) ...
const SPLIT_TARGET_BLOCKS: usize = 1024;
/// ... but gives no block fewer than this many columns (splits ≤ ⌈C / 4096⌉).
const SPLIT_MIN_COLUMNS: usize = 4096;

/// Blocks per row of the split forward (`ms_forward_partial`):
/// clamp(⌈1024 / B⌉, 1, ⌈C / 4096⌉).
pub(crate) fn split_count(rows: usize, classes: usize) -> usize {
    SPLIT_TARGET_BLOCKS
        .div_ceil(rows.max(1))
        .min(classes.div_ceil(SPLIT_MIN_COLUMNS))
        .max(1)
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
    pub partial: Launch,
    pub finalize: Launch,
    pub partials_len: usize,
}

/// The backward: one launch of `ms_backward`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardPlan {
    pub params: MsParams,
    pub backward: Launch,
}

/// `loss_and_grad`: `ms_fused` when the row fits in shared memory, else the split forward (its
/// finalize also writing the backward's row info and d(loss)/d(scale)) then `ms_backward`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LossAndGradPlan {
    Fused {
        params: MsParams,
        fused: Launch,
    },
    Split {
        forward: ForwardPlan,
        backward: Launch,
    },
}

/// Plans launches; the one parameter is the grid cap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planner {
    grid_cap: usize,
}

impl Planner {
    /// The planner of GPU launches.
    pub(crate) const DEVICE: Planner = Planner { grid_cap: MAX_GRID };

    /// A planner whose grids have at most `cap` blocks in each dimension (clamped to
    /// 1..=[`MAX_GRID`]): the kernels' grid-stride loops then run on small inputs.
    #[cfg(any(test, feature = "kernel-emu"))]
    pub(crate) fn grid_cap(cap: usize) -> Self {
        Self {
            grid_cap: cap.clamp(1, MAX_GRID),
        }
    }

    fn grid(&self, blocks: usize) -> u32 {
        // ≤ MAX_GRID < 2^32.
        blocks.clamp(1, self.grid_cap) as u32
    }

    /// The forward op (`ms_forward_partial` → `ms_forward_finalize`).
    pub(crate) fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        upstream: f64,
    ) -> Result<ForwardPlan> {
        let splits = split_count(shape.rows, shape.classes);
        let params = params(cfg, shape, splits, upstream)?;
        let blocks = shape.rows * splits;
        Ok(ForwardPlan {
            params,
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
            params: params(cfg, shape, 1, 1.0)?,
            backward: self.backward_launch(shape, size),
        })
    }

    fn backward_launch(&self, shape: RowShape, size: usize) -> Launch {
        let per_block = BLOCK as usize * (16 / size);
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

    /// `loss_and_grad` for elements of `size` bytes, with the gradient factor `upstream`
    /// (1, or 1/Σ w for the mean).
    pub(crate) fn loss_and_grad(
        &self,
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        size: usize,
        upstream: f64,
    ) -> Result<LossAndGradPlan> {
        match fused_shared_mem(shape.classes, size) {
            Some(shared) => Ok(LossAndGradPlan::Fused {
                params: params(cfg, shape, 1, upstream)?,
                fused: Launch {
                    grid: [self.grid(shape.rows), 1, 1],
                    block: [BLOCK, 1, 1],
                    // ≤ 47104 (fused_max_classes).
                    shared_mem_bytes: shared as u32,
                },
            }),
            None => Ok(LossAndGradPlan::Split {
                forward: self.forward(cfg, shape, upstream)?,
                backward: self.backward_launch(shape, size),
            }),
        }
    }
}

/// The dynamic shared memory `ms_fused` is launched with for rows of `classes` elements of
/// `size` bytes (the row, 16-byte aligned) when the row fits ([`fused_max_classes`]); `None`:
/// the split path.
fn fused_shared_mem(classes: usize, size: usize) -> Option<usize> {
    (classes <= fused_max_classes(size)).then(|| (classes * size).next_multiple_of(16))
}

/// The kernels' parameters for this configuration and shape, after the checks that the launch
/// grids and the i32 fields need.
fn params(
    cfg: &MarginSoftmaxLoss,
    shape: RowShape,
    splits: usize,
    upstream: f64,
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
        upstream,
    ))
}

/// The validated targets as the kernels take them: i32 class indices, −1 for an ignored row
/// (each target is < C < 2^31, checked by [`RowShape::new`]).
pub(crate) fn kernel_targets(targets: &[Option<usize>]) -> Vec<i32> {
    targets.iter().map(|t| t.map_or(-1, |y| y as i32)).collect()
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
        assert_eq!(split_count(1, 1), 1);
        assert_eq!(split_count(0, 100), 1);
        assert_eq!(split_count(4, 11_777), 3);
        assert_eq!(split_count(64, 1_000_000), 16);
        assert_eq!(split_count(1024, 32_000), 1);
        assert_eq!(split_count(2, 1_000_000), 245);
    }

    #[test]
    fn path_boundary_per_dtype() {
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        for size in [2usize, 4, 8] {
            let limit = fused_max_classes(size);
            let fused = Planner::DEVICE
                .loss_and_grad(&cfg, shape(3, limit), size, 1.0)
                .unwrap();
            match fused {
                LossAndGradPlan::Fused { fused, .. } => {
                    assert_eq!(fused.shared_mem_bytes as usize, limit * size);
                    assert!(fused.shared_mem_bytes as usize + FUSED_STATIC_RESERVE <= 48 * 1024);
                }
                other => panic!("C = {limit}, size {size}: {other:?}"),
            }
            let split = Planner::DEVICE
                .loss_and_grad(&cfg, shape(3, limit + 1), size, 1.0)
                .unwrap();
            assert!(matches!(split, LossAndGradPlan::Split { .. }), "{split:?}");
        }
    }

    #[test]
    fn grids_are_capped_and_never_empty() {
        let cfg = MarginSoftmaxLoss::new(Head::softmax());
        let p = Planner::DEVICE
            .forward(&cfg, shape(100_000, 8), 1.0)
            .unwrap();
        assert_eq!(p.partial.grid, [MAX_GRID as u32, 1, 1]);
        assert_eq!(p.partials_len, 100_000 * PARTIAL_COLUMNS);
        let b = Planner::grid_cap(3)
            .backward(&cfg, shape(10, 5000), 4)
            .unwrap();
        assert_eq!(b.backward.grid, [3, 3, 1]);
        let one = Planner::grid_cap(0).backward(&cfg, shape(1, 1), 2).unwrap();
        assert_eq!(one.backward.grid, [1, 1, 1]);
    }
}
