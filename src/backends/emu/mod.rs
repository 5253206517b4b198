//! The emulated backend (feature `kernel-emu`): the crate's CUDA kernels, `kernels/*.cu`
//! unmodified, run on the CPU through the SIMT emulator of `kernels/emu/` (one fiber per CUDA
//! thread, `__shared__` per block, barriers, warp shuffles, sanitizers), behind the C ABI of
//! `kernels/emu/capi.cpp` that `build.rs` compiles with `cc`.
//!
//! It is test infrastructure, not a faster CPU path: it lets CI execute every line of the kernels
//! and of their launch planning without a GPU. Every launch comes from [`Planner`], the planning
//! code of the CUDA backend (with a lower grid cap when the caller asks for one, so that the
//! grid-stride loops run on small inputs), and the host side does what `src/backends/cuda/` does: the
//! targets converted and checked by `ms_targets`, the mean's upstream factor on the device, the same buffers. Outputs are
//! filled with NaN before each launch, so an element a kernel forgets to write shows up as a
//! mismatch.
//!
//! While [`kernel_emu::emulated`] runs on a thread, the op's CPU storage on that thread takes this
//! backend instead of `src/backends/cpu/`.

mod ffi;

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, WithDType, bail};
use num_traits::{Float, Zero};

use crate::backends::cpu_storage::contiguous;
use crate::backends::launch::params::MsParams;
use crate::backends::launch::{
    ForwardPlan, L2Work, Launch, LossAndGradPlan, Planner, RowShape, TARGETS_LAUNCH, variant_index,
};
use crate::backends::{Arg, Bodies};
use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::layout::{PARTIAL_COLUMNS, ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::math::{Acc, Element};
use crate::targets_and_weights::{kernel_poly, read_weights, target_error};
use ffi::{EMULATED_COOPERATIVE_BLOCKS, EmuAcc, EmuElement, OnePass};

thread_local! {
    /// The planner of this thread's emulated launches; `None`: the CPU bodies.
    static PLANNER: Cell<Option<Planner>> = const { Cell::new(None) };
}

/// The emulated kernels when the op on this thread runs on them.
pub(crate) fn active() -> Option<Emulated> {
    PLANNER.with(Cell::get).map(Emulated)
}

/// Switching the op between the CPU bodies and the emulated CUDA kernels (test infrastructure;
/// feature `kernel-emu`).
///
/// Thread order and workers are the emulator's own settings, read once from the environment:
/// `CUDA_EMU_ORDER=forward|reverse|random` (the order in which the scheduler resumes a block's
/// threads), `CUDA_EMU_SEED=n` (for `random`) and `CUDA_EMU_WORKERS=n` (OS threads running
/// blocks; with 2 or more, ThreadSanitizer sees races between blocks). Any emulator error (a
/// divergent barrier, a deadlock, a shuffle that names an exited lane, an invalid launch) and,
/// in a sanitizer build (`KERNEL_EMU_SANITIZE`), any sanitizer report aborts the process with a
/// report on stderr.
pub mod kernel_emu {
    use super::{PLANNER, Planner};
    pub use crate::backends::launch::DeviceShape;

    /// Restores the previous setting when dropped (also when `f` panics).
    struct Restore(Option<Planner>);

    impl Drop for Restore {
        fn drop(&mut self) {
            PLANNER.with(|p| p.set(self.0));
        }
    }

    fn with<R>(planner: Option<Planner>, f: impl FnOnce() -> R) -> R {
        let _restore = Restore(PLANNER.with(|p| p.replace(planner)));
        f()
    }

    /// Runs `f` with every call of the op on CPU tensors, on this thread, executed by the CUDA
    /// kernels under the emulator, planned for a GPU without the shared-memory opt-in
    /// ([`DeviceShape::DEFAULT`]). Launch grids have at most `grid_cap` blocks in each
    /// dimension (clamped to 1..=65535, the CUDA backend's cap): a small cap runs the kernels'
    /// grid-stride loops on small inputs.
    pub fn emulated<R>(grid_cap: usize, f: impl FnOnce() -> R) -> R {
        emulated_on(grid_cap, DeviceShape::DEFAULT, f)
    }

    /// [`emulated`], planned for a device of the given shape (e.g. [`DeviceShape::H200`]: the
    /// one-pass path then takes rows up to the 227 KiB of shared memory a block may opt into).
    pub fn emulated_on<R>(grid_cap: usize, device: DeviceShape, f: impl FnOnce() -> R) -> R {
        with(Some(Planner::grid_cap(grid_cap, device)), f)
    }

    /// Runs `f` with the op on CPU tensors back on the CPU bodies (inside [`emulated`]: the
    /// oracle side of a comparison).
    pub fn native<R>(f: impl FnOnce() -> R) -> R {
        with(None, f)
    }
}

/// An output buffer in the accumulation type that the kernels must fill completely: NaN until
/// they do.
fn poisoned<A: Acc>(len: usize) -> Vec<A> {
    vec![A::nan(); len]
}

/// An output buffer in the element type, NaN until the kernels fill it.
fn poisoned_elements<T: Element>(len: usize) -> Vec<T> {
    vec![T::store(T::Acc::nan()); len]
}

/// The targets as `ms_targets` leaves them on the device: i32 classes (−1 ignored, −2 invalid)
/// and the gradient factor (1, or 1/Σ w for the mean).
struct DeviceTargets<A> {
    targets: Vec<i32>,
    upstream: [A; 1],
}

/// Runs `ms_targets` on the raw targets (u8, u32 or i64), as the CUDA backend does; with
/// `check`, an invalid target is the CPU path's `Err` (the first invalid row, its value read
/// from the raw targets).
fn device_targets<A: EmuAcc>(
    cfg: &MarginSoftmaxLoss,
    shape: RowShape,
    targets: (&CpuStorage, &Layout),
    weights: &[A],
    mean: bool,
    check: bool,
) -> Result<DeviceTargets<A>> {
    let name = cfg.head.name();
    let rows = shape.rows;
    let mut out = DeviceTargets {
        targets: vec![i32::MIN; rows],
        upstream: [A::nan()],
    };
    let mut first_invalid = [-1i64];
    let has_weights = i32::from(cfg.class_weights.is_some());
    let (ignore_index, has_ignore) = cfg.ignore_index.map_or((0, 0), |i| (i, 1));
    macro_rules! run {
        ($t:ty, $code:literal) => {{
            let raw = contiguous::<$t>(targets.0, targets.1, "targets", name)?;
            if raw.len() != rows || (has_weights == 1 && weights.len() != shape.classes) {
                bail!("{OP_NAME}({name}): internal error: targets or weights of the wrong size")
            }
            // SAFETY: the arguments match `ms_targets_I_A(const I* raw, long long rows, long
            // long classes, long long ignore_index, int has_ignore, const A* weights, int
            // has_weights, int mean, int* out, long long* first_invalid, A* upstream)` in
            // kernels/targets.cu, I the type of the dtype code (capi.cpp); raw and out hold
            // `rows` elements, weights C when has_weights (checked above; else one, never
            // read), first_invalid and upstream one each.
            unsafe {
                (A::TARGETS)(
                    &TARGETS_LAUNCH,
                    $code,
                    raw.as_ptr().cast(),
                    rows as i64,
                    shape.classes as i64,
                    ignore_index,
                    has_ignore,
                    weights.as_ptr(),
                    has_weights,
                    i32::from(mean),
                    out.targets.as_mut_ptr(),
                    first_invalid.as_mut_ptr(),
                    out.upstream.as_mut_ptr(),
                )
            };
            if check && first_invalid[0] < rows as i64 {
                let row = first_invalid[0] as usize;
                return Err(target_error(cfg, i64::from(raw[row]), row, shape.classes));
            }
        }};
    }
    match targets.0.dtype() {
        DType::U8 => run!(u8, 0),
        DType::U32 => run!(u32, 1),
        DType::I64 => run!(i64, 2),
        other => bail!("{OP_NAME}({name}): targets must be u8, u32 or i64, got {other:?}"),
    }
    Ok(out)
}

/// What every launch reads, prepared once per call and checked against the shape (the kernels
/// index it without bounds).
struct Inputs<'a, T: EmuElement> {
    shape: RowShape,
    /// The input from its first element (the layout's offset applied: the kernels see the
    /// alignment a device pointer would have).
    x: &'a [T],
    targets: DeviceTargets<T::Acc>,
    /// The class weights (C, or one unused element when there are none): every kernel may read
    /// them (the backward with weighted smoothing only).
    weights: Vec<T::Acc>,
    /// The forward's further inputs (the backward reads none).
    forward: Option<ForwardInputs<'a, T::Acc>>,
}

/// The row scale (B) and the PolyLoss coefficients (or one unused element).
struct ForwardInputs<'a, A> {
    scale: &'a [A],
    poly: Vec<A>,
}

impl<'a, T: EmuElement> Inputs<'a, T> {
    /// `mean`: the gradient factor is 1/Σ w (else 1); `check`: an invalid target is an `Err`.
    fn new(
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        x: (&'a CpuStorage, &Layout),
        targets: (&CpuStorage, &Layout),
        scale: Option<(&'a CpuStorage, &Layout)>,
        mean: bool,
        check: bool,
    ) -> Result<Self> {
        let name = cfg.head.name();
        let data = x.0.as_slice::<T>()?;
        let x = &data[x.1.start_offset().min(data.len())..];
        let last_row_end = match shape.rows {
            0 => 0,
            rows => (rows - 1) * shape.row_stride + shape.classes,
        };
        let forward = scale
            .map(|scale| -> Result<_> {
                Ok(ForwardInputs {
                    scale: contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?,
                    poly: kernel_poly::<T::Acc>(cfg),
                })
            })
            .transpose()?;
        let weights = read_weights::<T::Acc>(cfg).unwrap_or_else(|| vec![T::Acc::zero()]);
        let forward_fits = forward.as_ref().is_none_or(|f| f.scale.len() == shape.rows);
        let weights_fit = cfg.class_weights.is_none() || weights.len() == shape.classes;
        if x.len() < last_row_end || !forward_fits || !weights_fit {
            bail!("{OP_NAME}({name}): internal error: the buffers do not match the shape {shape:?}")
        }
        let targets = device_targets(cfg, shape, targets, &weights, mean, check)?;
        Ok(Self {
            shape,
            x,
            targets,
            weights,
            forward,
        })
    }

    fn forward_inputs(&self) -> Result<&ForwardInputs<'a, T::Acc>> {
        match &self.forward {
            Some(f) => Ok(f),
            None => bail!("{OP_NAME}: internal error: a forward launch without its inputs"),
        }
    }

    /// `ms_forward_partial` then `ms_forward_finalize`: the statistics [rows, 8], and with
    /// `backward` also the backward's row info [rows, 6] and d(loss)/d(scale) [rows].
    fn forward(
        &self,
        plan: &ForwardPlan,
        backward: Option<BackwardOutputs<'_, T::Acc>>,
    ) -> Result<Vec<T::Acc>> {
        let rows = self.shape.rows;
        let f = self.forward_inputs()?;
        let mut partials = poisoned::<T::Acc>(plan.partials_len);
        let mut stats = poisoned::<T::Acc>(rows * STAT_COLUMNS);
        let (row_info, grad_scale) = match backward {
            Some((info, gs)) if info.len() == rows * ROWINFO_COLUMNS && gs.len() == rows => {
                (info.as_mut_ptr(), gs.as_mut_ptr())
            }
            Some(_) => bail!("{OP_NAME}: internal error: row info buffers of the wrong size"),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        // SAFETY: the arguments match `ms_forward_partial_{variant}_T(const T* x, const int*
        // targets, const ACC* scale, const ACC* weights, MsParams p, ACC* partials)` (capi.cpp
        // picks the variant, runs the launch and returns when it is done); x holds
        // rows·row_stride elements from its first up to the last row's end and targets / scale
        // rows each, weights C elements when p.has_weights (else one, never read:
        // weighted_smoothing needs class weights) (checked in `new`), partials the plan's
        // length, and plan.params describes exactly this shape.
        unsafe {
            (T::KERNELS.partial)(
                &plan.partial,
                variant_index(plan.variant),
                self.x.as_ptr(),
                self.targets.targets.as_ptr(),
                f.scale.as_ptr(),
                self.weights.as_ptr(),
                &plan.params,
                partials.as_mut_ptr(),
            )
        };
        // SAFETY: as above for `ms_forward_finalize_T(x, targets, scale, weights, poly, p,
        // partials, stats, row_info, grad_scale, upstream)`: weights holds C elements when
        // p.has_weights (else one), poly max(n_poly, 1), stats rows·8, row_info / grad_scale
        // are rows·6 / rows buffers or null, which the kernel then does not write, upstream one
        // element.
        unsafe {
            (T::KERNELS.finalize)(
                &plan.finalize,
                self.x.as_ptr(),
                self.targets.targets.as_ptr(),
                f.scale.as_ptr(),
                self.weights.as_ptr(),
                f.poly.as_ptr(),
                &plan.params,
                partials.as_ptr(),
                stats.as_mut_ptr(),
                row_info,
                grad_scale,
                self.targets.upstream.as_ptr(),
            )
        };
        Ok(stats)
    }

    /// `ms_backward`: d(loss)/d(input) [rows, C] from the row info [rows, 6].
    fn backward(
        &self,
        params: &MsParams,
        variant: &str,
        launch: &Launch,
        row_info: &[T::Acc],
    ) -> Result<Vec<T>> {
        let RowShape { rows, classes, .. } = self.shape;
        if row_info.len() != rows * ROWINFO_COLUMNS {
            bail!(
                "{OP_NAME}: internal error: row info has {} elements, want {}",
                row_info.len(),
                rows * ROWINFO_COLUMNS
            )
        }
        let mut grad = poisoned_elements::<T>(rows * classes);
        // SAFETY: the arguments match `ms_backward_{variant}_T(const T* x, const int* targets,
        // const ACC* row_info, const ACC* weights, MsParams p, T* grad)`; x, targets and
        // weights as in `forward`, row_info rows·6 (checked above), grad rows·C.
        unsafe {
            (T::KERNELS.backward)(
                launch,
                variant_index(variant),
                self.x.as_ptr(),
                self.targets.targets.as_ptr(),
                row_info.as_ptr(),
                self.weights.as_ptr(),
                params,
                grad.as_mut_ptr(),
            )
        };
        Ok(grad)
    }

    /// `ms_fused`, `ms_fused_warp`, `ms_fused_cluster` or `ms_fused_l2` (with `l2`): the
    /// statistics, the gradient and d(loss)/d(scale) in one launch.
    fn fused(
        &self,
        kind: OnePass,
        (params, variant, launch): (&MsParams, &str, &Launch),
        l2: Option<L2Work>,
    ) -> Result<LossAndGrad<T>> {
        let RowShape { rows, classes, .. } = self.shape;
        let f = self.forward_inputs()?;
        let (mut partials, group_rows) = match l2 {
            Some(work) => {
                // The emulator runs a cooperative grid's blocks at once, each on an OS thread,
                // and aborts the process past its limit: refuse here instead.
                let blocks = launch.grid.iter().map(|&g| g as usize).product::<usize>();
                if blocks > EMULATED_COOPERATIVE_BLOCKS {
                    bail!(
                        "{OP_NAME}: the emulated ms_fused_l2 runs at most \
                         {EMULATED_COOPERATIVE_BLOCKS} blocks, the plan has {blocks} (lower the \
                         emulated device's SM count or the grid cap)"
                    )
                }
                (
                    poisoned::<T::Acc>(work.partials_len),
                    work.group_rows as i64,
                )
            }
            None => (Vec::new(), 0),
        };
        let mut out = LossAndGrad {
            stats: poisoned(rows * STAT_COLUMNS),
            grad: poisoned_elements(rows * classes),
            grad_scale: poisoned(rows),
        };
        // SAFETY: the arguments match `ms_fused{|_warp|_cluster}_{variant}_T(const T* x,
        // const int* targets, const ACC* scale, const ACC* weights, const ACC* poly, MsParams
        // p, ACC* stats, T* grad, ACC* grad_scale, const ACC* upstream)`; the inputs as in
        // `forward`, the outputs rows·8, rows·C and rows; the launch's dynamic shared memory is
        // the plan's, which holds the row (or the cluster block's slice), and a cluster launch's
        // grid is a multiple of MS_CLUSTER (planned); ms_fused_l2 (kind L2) also takes
        // `partials`, rows·splits·5 elements (the plan's), and its group size; the other kinds
        // never read those two.
        unsafe {
            (T::KERNELS.fused)(
                launch,
                kind as i32,
                variant_index(variant),
                self.x.as_ptr(),
                self.targets.targets.as_ptr(),
                f.scale.as_ptr(),
                self.weights.as_ptr(),
                f.poly.as_ptr(),
                params,
                out.stats.as_mut_ptr(),
                out.grad.as_mut_ptr(),
                out.grad_scale.as_mut_ptr(),
                self.targets.upstream.as_ptr(),
                partials.as_mut_ptr(),
                group_rows,
            )
        };
        Ok(out)
    }
}

/// The split path's finalize also writes the backward's row info [rows, 6] and d(loss)/d(scale)
/// [rows].
type BackwardOutputs<'b, A> = (&'b mut [A], &'b mut [A]);

/// What `loss_and_grad` returns: statistics [rows, 8], gradient [rows, C], d(loss)/d(scale).
struct LossAndGrad<T: Element> {
    stats: Vec<T::Acc>,
    grad: Vec<T>,
    grad_scale: Vec<T::Acc>,
}

/// The CUDA kernels under the emulator, launched as planned for the emulated device.
#[derive(Clone, Copy)]
pub(crate) struct Emulated(pub(crate) Planner);

impl<T: EmuElement> Bodies<T, CpuStorage> for Emulated {
    fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        scale: Arg<CpuStorage>,
        scale_grad: bool,
    ) -> Result<CpuStorage> {
        let planner = self.0;
        let shape = RowShape::new(x.1, cfg.head.name())?;
        if shape.rows == 0 {
            return Ok(T::Acc::to_cpu_storage_owned(Vec::new()));
        }
        let inputs = Inputs::<T>::new(
            cfg,
            shape,
            x,
            targets,
            Some(scale),
            false,
            cfg.check_targets,
        )?;
        let plan = planner.forward(cfg, shape, std::mem::size_of::<T>(), scale_grad)?;
        Ok(T::Acc::to_cpu_storage_owned(inputs.forward(&plan, None)?))
    }

    /// The targets are converted on the device without the check (the forward did it).
    fn backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        row_info: Arg<CpuStorage>,
    ) -> Result<CpuStorage> {
        let planner = self.0;
        let name = cfg.head.name();
        let shape = RowShape::new(x.1, name)?;
        if shape.rows == 0 {
            return Ok(T::to_cpu_storage_owned(Vec::new()));
        }
        let info = contiguous::<T::Acc>(row_info.0, row_info.1, "row info", name)?;
        let inputs = Inputs::<T>::new(cfg, shape, x, targets, None, false, false)?;
        let plan = planner.backward(cfg, shape, std::mem::size_of::<T>())?;
        let grad = inputs.backward(&plan.params, plan.variant, &plan.backward, info)?;
        Ok(T::to_cpu_storage_owned(grad))
    }

    /// The first of the planner's five paths that fits (see `backends::launch`).
    fn forward_backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        scale: Arg<CpuStorage>,
        mean: bool,
        scale_grad: bool,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        let planner = self.0;
        let shape = RowShape::new(x.1, cfg.head.name())?;
        let wrap = |out: LossAndGrad<T>| {
            (
                T::Acc::to_cpu_storage_owned(out.stats),
                T::to_cpu_storage_owned(out.grad),
                T::Acc::to_cpu_storage_owned(out.grad_scale),
            )
        };
        if shape.rows == 0 {
            return Ok(wrap(LossAndGrad {
                stats: Vec::new(),
                grad: Vec::new(),
                grad_scale: Vec::new(),
            }));
        }
        let inputs =
            Inputs::<T>::new(cfg, shape, x, targets, Some(scale), mean, cfg.check_targets)?;
        let size = std::mem::size_of::<T>();
        let out = match planner.loss_and_grad(cfg, shape, size, scale_grad)? {
            LossAndGradPlan::Fused {
                params,
                variant,
                fused,
            } => inputs.fused(OnePass::Block, (&params, variant, &fused), None)?,
            LossAndGradPlan::FusedWarp {
                params,
                variant,
                fused,
            } => inputs.fused(OnePass::Warp, (&params, variant, &fused), None)?,
            LossAndGradPlan::FusedCluster {
                params,
                variant,
                cluster,
            } => inputs.fused(OnePass::Cluster, (&params, variant, &cluster), None)?,
            LossAndGradPlan::FusedL2 {
                params,
                variant,
                launch,
                work,
            } => inputs.fused(OnePass::L2, (&params, variant, &launch), Some(work))?,
            LossAndGradPlan::Split {
                forward,
                backward_variant,
                backward,
            } => {
                let mut row_info = poisoned::<T::Acc>(shape.rows * ROWINFO_COLUMNS);
                let mut grad_scale = poisoned::<T::Acc>(shape.rows);
                let stats = inputs.forward(&forward, Some((&mut row_info, &mut grad_scale)))?;
                let grad =
                    inputs.backward(&forward.params, backward_variant, &backward, &row_info)?;
                LossAndGrad {
                    stats,
                    grad,
                    grad_scale,
                }
            }
        };
        Ok(wrap(out))
    }

    /// `ms_forward_partial` with the slice-local targets as given, as the CUDA backend launches it.
    fn slice_partials(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        local_targets: &[i64],
        scale: Arg<CpuStorage>,
        scale_grad: bool,
    ) -> Result<(CpuStorage, usize)> {
        let planner = self.0;
        let name = cfg.head.name();
        let shape = RowShape::new(x.1, name)?;
        if shape.rows == 0 {
            return Ok((T::Acc::to_cpu_storage_owned(Vec::new()), 1));
        }
        let data = x.0.as_slice::<T>()?;
        let xs = &data[x.1.start_offset().min(data.len())..];
        let scale = contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?;
        let weights = read_weights::<T::Acc>(cfg).unwrap_or_else(|| vec![T::Acc::zero()]);
        let last_row_end = (shape.rows - 1) * shape.row_stride + shape.classes;
        if xs.len() < last_row_end
            || scale.len() != shape.rows
            || local_targets.len() != shape.rows
            || (cfg.class_weights.is_some() && weights.len() != shape.classes)
        {
            bail!("{OP_NAME}({name}): internal error: the buffers do not match the shape {shape:?}")
        }
        // Targets travel as i32: −1, a column, or the slice's width (the planner bounds C by i32).
        let targets: Vec<i32> = local_targets
            .iter()
            .map(|&t| t.clamp(-1, shape.classes as i64) as i32)
            .collect();
        let plan = planner.forward(cfg, shape, std::mem::size_of::<T>(), scale_grad)?;
        let mut partials = poisoned::<T::Acc>(plan.partials_len);
        // SAFETY: as in `Inputs::forward` for `ms_forward_partial_{variant}_T(const T* x, const int*
        // targets, const ACC* scale, const ACC* weights, MsParams p, ACC* partials)`: x holds the
        // rows up to the last row's end, targets and scale `rows` each, weights C elements when
        // p.has_weights (else one, never read), partials the plan's length (all checked above), and
        // plan.params describes exactly this shape.
        unsafe {
            (T::KERNELS.partial)(
                &plan.partial,
                variant_index(plan.variant),
                xs.as_ptr(),
                targets.as_ptr(),
                scale.as_ptr(),
                weights.as_ptr(),
                &plan.params,
                partials.as_mut_ptr(),
            )
        };
        let splits = plan.partials_len / (shape.rows * PARTIAL_COLUMNS);
        Ok((T::Acc::to_cpu_storage_owned(partials), splits))
    }
}

#[cfg(test)]
mod tests;
