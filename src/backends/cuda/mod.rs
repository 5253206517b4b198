//! The CUDA backend (feature `cuda`): the op's bodies on a GPU, the Rust side of `kernels/*.cu`.
//! The modules are loaded by [`module`]; every raw launch is in [`launches`]; which kernels run,
//! in which order, and every grid, block and shared memory size, come from the one launch
//! planner, `crate::backends::launch` (which describes the paths), for the device's shape: the
//! same plans that the emulated backend runs on the CPU in CI.
//!
//! Targets: `ms_targets` converts and checks them on the GPU (and forms the mean's gradient
//! factor 1/Σ w there); the forward reads back one value, the first invalid row, unless
//! [`MarginSoftmaxLoss::check_targets`] is off; the backward reads nothing.

mod launches;
mod module;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::{CudaDevice, CudaStorage, Result, bail};

use crate::backends::launch::params::MsParams;
use crate::backends::launch::{DEFAULT_SHARED, DeviceShape, LossAndGradPlan, Planner, RowShape};
use crate::backends::{Arg, Bodies};
use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::layout::{PARTIAL_COLUMNS, ROWINFO_COLUMNS};
use launches::{
    BackwardArgs, CudaElement, DeviceTargets, ForBackward, Inputs, LossAndGrad, backward_launch,
    contiguous, device_targets, empty, input_view, with_weights,
};

// SAFETY: MsParams is #[repr(C)], Copy, holds only plain integers and floats, and mirrors the
// layout of `struct MsParams` in kernels/params.cuh field for field (its size is checked at
// compile time in src/backends/launch/params.rs), so its bytes are a valid kernel argument of that type.
unsafe impl DeviceRepr for MsParams {}

/// The device's shape for the planner.
fn device_shape(dev: &CudaDevice) -> Result<DeviceShape> {
    let limits = module::device_limits(dev)?;
    Ok(DeviceShape {
        sm_count: limits.sm_count,
        max_shared_per_block: limits.max_dynamic_shared_optin.max(DEFAULT_SHARED),
        clusters: limits.cluster_launch,
        cooperative: limits.cooperative_launch,
        l2_bytes: limits.l2_bytes,
    })
}

/// The planner for `dev`.
fn planner(dev: &CudaDevice) -> Result<Planner> {
    Ok(Planner::device(device_shape(dev)?))
}

/// The widest row `loss_and_grad` reads in one pass (`ms_fused` or `ms_fused_cluster`) on `dev`
/// for elements of `size` bytes.
pub(crate) fn one_pass_max_classes(dev: &CudaDevice, size: usize) -> Result<usize> {
    Ok(planner(dev)?.one_pass_max_classes(size))
}

/// The CUDA kernels on the tensors' GPU, launched as planned for its shape.
pub(crate) struct Cuda;

impl<T: CudaElement> Bodies<T, CudaStorage> for Cuda {
    fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CudaStorage>,
        targets: Arg<CudaStorage>,
        scale: Arg<CudaStorage>,
        scale_grad: bool,
    ) -> Result<CudaStorage> {
        let shape = RowShape::new(x.1, cfg.head.name())?;
        let dev = x.0.device();
        if shape.rows == 0 {
            return empty::<T::Acc>(dev);
        }
        let plan = planner(dev)?.forward(cfg, shape, std::mem::size_of::<T>(), scale_grad)?;
        let stats = with_weights::<T::Acc, _>(cfg, dev, |weights| {
            let targets = device_targets(
                cfg,
                dev,
                shape.classes,
                targets,
                weights,
                false,
                cfg.check_targets,
            )?;
            let inputs = Inputs::<T>::new(cfg, shape, x, targets, scale)?;
            let partials = inputs.partial(&plan, weights)?;
            inputs.finalize(&plan, weights, &partials, None)
        })?;
        Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
    }

    /// No host synchronization: the targets are converted on the device without the check
    /// (the forward made it).
    fn backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CudaStorage>,
        targets: Arg<CudaStorage>,
        row_info: Arg<CudaStorage>,
    ) -> Result<CudaStorage> {
        let name = cfg.head.name();
        let shape = RowShape::new(x.1, name)?;
        let dev = x.0.device();
        if shape.rows == 0 {
            return empty::<T>(dev);
        }
        let info = contiguous::<T::Acc>(row_info.0, row_info.1, "row info", name)?;
        if info.len() != shape.rows * ROWINFO_COLUMNS {
            bail!(
                "{OP_NAME}({name}): internal error: row info has {} elements, want {}",
                info.len(),
                shape.rows * ROWINFO_COLUMNS
            )
        }
        let x_view = input_view::<T>(x.0, x.1, name)?;
        let plan = planner(dev)?.backward(cfg, shape, std::mem::size_of::<T>())?;
        let grad = with_weights::<T::Acc, _>(cfg, dev, |weights| {
            let targets = device_targets(cfg, dev, shape.classes, targets, weights, false, false)?;
            backward_launch::<T>(
                dev,
                shape,
                BackwardArgs {
                    x: &x_view,
                    targets: &targets.targets,
                    row_info: &info,
                    weights,
                },
                (&plan.params, plan.variant, &plan.backward),
            )
        })?;
        Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
    }

    /// The mean's Σ w is formed on the device; the first of the planner's five paths that
    /// fits (see `backends::launch`).
    fn forward_backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CudaStorage>,
        targets: Arg<CudaStorage>,
        scale: Arg<CudaStorage>,
        mean: bool,
        scale_grad: bool,
    ) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
        let shape = RowShape::new(x.1, cfg.head.name())?;
        let dev = x.0.device();
        let wrap = |out: LossAndGrad<T>| {
            (
                CudaStorage::wrap_cuda_slice(out.stats, dev.clone()),
                CudaStorage::wrap_cuda_slice(out.grad, dev.clone()),
                CudaStorage::wrap_cuda_slice(out.grad_scale, dev.clone()),
            )
        };
        if shape.rows == 0 {
            return Ok(wrap(LossAndGrad {
                stats: dev.alloc_zeros(0)?,
                grad: dev.alloc_zeros(0)?,
                grad_scale: dev.alloc_zeros(0)?,
            }));
        }
        let size = std::mem::size_of::<T>();
        let plan = planner(dev)?.loss_and_grad(cfg, shape, size, scale_grad)?;
        let out = with_weights::<T::Acc, _>(cfg, dev, |weights| {
            let targets = device_targets(
                cfg,
                dev,
                shape.classes,
                targets,
                weights,
                mean,
                cfg.check_targets,
            )?;
            let inputs = Inputs::<T>::new(cfg, shape, x, targets, scale)?;
            match &plan {
                LossAndGradPlan::Fused {
                    params,
                    variant,
                    fused,
                } => inputs.fused("ms_fused", (params, variant, fused), weights, None),
                LossAndGradPlan::FusedWarp {
                    params,
                    variant,
                    fused,
                } => inputs.fused("ms_fused_warp", (params, variant, fused), weights, None),
                LossAndGradPlan::FusedCluster {
                    params,
                    variant,
                    cluster,
                } => inputs.fused(
                    "ms_fused_cluster",
                    (params, variant, cluster),
                    weights,
                    None,
                ),
                LossAndGradPlan::FusedL2 {
                    params,
                    variant,
                    launch,
                    work,
                } => inputs.fused(
                    "ms_fused_l2",
                    (params, variant, launch),
                    weights,
                    Some(*work),
                ),
                LossAndGradPlan::Split {
                    forward,
                    backward_variant,
                    backward,
                } => {
                    let partials = inputs.partial(forward, weights)?;
                    // SAFETY: ms_forward_finalize writes all rows·6 row-info entries and all rows
                    // scale-gradient entries when given these buffers.
                    let (mut row_info, mut grad_scale) = unsafe {
                        (
                            dev.alloc::<T::Acc>(shape.rows * ROWINFO_COLUMNS)?,
                            dev.alloc::<T::Acc>(shape.rows)?,
                        )
                    };
                    let for_backward = ForBackward {
                        row_info: &mut row_info,
                        grad_scale: &mut grad_scale,
                    };
                    let stats = inputs.finalize(forward, weights, &partials, Some(for_backward))?;
                    let grad = backward_launch::<T>(
                        dev,
                        shape,
                        BackwardArgs {
                            x: &inputs.x,
                            targets: &inputs.targets.targets,
                            row_info: &row_info.slice(..),
                            weights,
                        },
                        (&forward.params, backward_variant, backward),
                    )?;
                    Ok(LossAndGrad {
                        stats,
                        grad,
                        grad_scale,
                    })
                }
            }
        })?;
        Ok(wrap(out))
    }

    /// `ms_forward_partial` with the slice-local targets uploaded as i32 (the targets kernel
    /// would reject a target ≥ the slice's width).
    fn slice_partials(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CudaStorage>,
        local_targets: &[i64],
        scale: Arg<CudaStorage>,
        scale_grad: bool,
    ) -> Result<(CudaStorage, usize)> {
        let name = cfg.head.name();
        let shape = RowShape::new(x.1, name)?;
        let dev = x.0.device();
        if shape.rows == 0 {
            return Ok((empty::<T::Acc>(dev)?, 1));
        }
        if local_targets.len() != shape.rows {
            bail!(
                "{OP_NAME}({name}): internal error: {} slice targets for {} rows",
                local_targets.len(),
                shape.rows
            )
        }
        let plan = planner(dev)?.forward(cfg, shape, std::mem::size_of::<T>(), scale_grad)?;
        let targets: Vec<i32> = local_targets
            .iter()
            .map(|&t| t.clamp(-1, shape.classes as i64) as i32)
            .collect();
        let partials = with_weights::<T::Acc, _>(cfg, dev, |weights| {
            let device_targets = DeviceTargets {
                targets: dev.clone_htod(&targets)?,
                upstream: dev.alloc_zeros::<T::Acc>(1)?,
            };
            let inputs = Inputs::<T>::new(cfg, shape, x, device_targets, scale)?;
            inputs.partial(&plan, weights)
        })?;
        let splits = plan.partials_len / (shape.rows * PARTIAL_COLUMNS);
        Ok((CudaStorage::wrap_cuda_slice(partials, dev.clone()), splits))
    }
}
