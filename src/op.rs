//! The op family, candle-nn style: each op a small struct implementing a candle `CustomOp*`
//! (`CustomOp3` for the forward and backward ops, `CustomOp2` for a slice's statistics,
//! `InplaceOp2` / `InplaceOp3` for the gradient written into a caller's buffer), with `cpu_fwd`
//! (and, with the `cuda` feature, `cuda_fwd`) and `bwd` side by side.
//!
//! - [`MarginSoftmaxForward`] (input, targets, row scale) → per-row statistics [B, 8]:
//!   loss, max logit M and ln Σ exp(z − M) (lse = M + ln Σ), w_y, the gradient constants
//!   a, k, g_y (see [`crate::math`]) and dℓ/dr. Only the
//!   per-row constants are saved for the backward pass (Apex xentropy's idea, extended to the
//!   criterion options), never probabilities.
//! - [`MarginSoftmaxBackward`] (input, targets, row info [B, 6]) → d(loss)/d(input) \[B, C\]: one
//!   more read of each row, one write.
//! - [`forward_backward`]: both in one call, without autograd, returning two tensors (which a
//!   `CustomOp` cannot), dispatched on the storage directly.
//!
//! Each body runs on a backend (`crate::backends`), through its one dtype dispatch: CPU storage
//! on the CPU bodies, or, with the `kernel-emu` feature inside [`crate::kernel_emu::emulated`],
//! on the CUDA kernels under the emulator; CUDA storage on the CUDA kernels.

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, InplaceOp2, InplaceOp3, Layout, Result, Shape, Storage,
    Tensor, bail,
};

use crate::backends;
use crate::backends::cpu::{self, Cpu};
#[cfg(feature = "cuda")]
use crate::backends::cuda::{self, Cuda};
#[cfg(feature = "kernel-emu")]
use crate::backends::emu;
use crate::config::{MarginSoftmaxLoss, OP_NAME, Reduction};
use crate::layout::{
    PARTIAL_COLUMNS, STAT_COLUMNS, STAT_D_MARGINS, STAT_D_SCALE, STAT_GRAD_CONSTANTS, STAT_LOSS,
    STAT_MAX, stat_columns,
};
use crate::math::Acc;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// `backends::$entry(backend, args...)` for CPU storage, with the emulated CUDA kernels as the
/// backend while they are active on this thread (feature `kernel-emu`,
/// [`crate::kernel_emu::emulated`]), else the CPU bodies.
macro_rules! on_cpu {
    ($entry:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(feature = "kernel-emu")]
        let out = match emu::active() {
            Some(emulated) => backends::$entry(&emulated, $($arg),*),
            None => backends::$entry(&Cpu, $($arg),*),
        };
        #[cfg(not(feature = "kernel-emu"))]
        let out = backends::$entry(&Cpu, $($arg),*);
        out
    }};
}

struct MarginSoftmaxForward {
    cfg: MarginSoftmaxLoss,
    /// Whether the row scale takes a gradient, so that the CPU forward computes dℓ/dr.
    scale_grad: bool,
}

impl CustomOp3 for MarginSoftmaxForward {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = input_layout.dims()[0];
        let columns = stat_columns(scale_layout.dims().len() == 2);
        let stats = on_cpu!(forward(
            &self.cfg,
            (input, input_layout),
            (targets, targets_layout),
            (scale, scale_layout),
            self.scale_grad,
        ))?;
        Ok((stats, Shape::from((rows, columns))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        input: &CudaStorage,
        input_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
        scale: &CudaStorage,
        scale_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let rows = input_layout.dims()[0];
        let columns = stat_columns(scale_layout.dims().len() == 2);
        let stats = backends::forward(
            &Cuda,
            &self.cfg,
            (input, input_layout),
            (targets, targets_layout),
            (scale, scale_layout),
            self.scale_grad,
        )?;
        Ok((stats, Shape::from((rows, columns))))
    }

    /// Only the loss column carries an upstream gradient (the others are internal, and the
    /// weight column's use in the mean's denominator does not depend on the input).
    fn bwd(
        &self,
        input: &Tensor,
        targets: &Tensor,
        scale: &Tensor,
        stats: &Tensor,
        grad_stats: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let upstream = grad_stats.narrow(1, STAT_LOSS, 1)?;
        // The row parameters: the row scale \[B\], or (r, m1, m2, m3) [B, ROW_PARAMS] with
        // per-row margins, whose gradient also reads dℓ/d(m1, m2, m3) from the statistics.
        let row_margins = scale.rank() == 2;
        let grad_scale = if scale.track_op() {
            let d_scale = stats.narrow(1, STAT_D_SCALE, 1)?.mul(&upstream)?;
            Some(if row_margins {
                let d_margins = stats
                    .narrow(1, STAT_D_MARGINS, 3)?
                    .broadcast_mul(&upstream)?;
                Tensor::cat(&[&d_scale, &d_margins], 1)?
            } else {
                d_scale.squeeze(1)?
            })
        } else {
            None
        };
        if !input.track_op() {
            return Ok((None, None, grad_scale));
        }
        let per_row = if row_margins {
            scale.clone()
        } else {
            scale.unsqueeze(1)?
        };
        let row_info = Tensor::cat(
            &[
                &stats.narrow(1, STAT_MAX, 2)?,
                &stats
                    .narrow(1, STAT_GRAD_CONSTANTS, 3)?
                    .broadcast_mul(&upstream)?,
                &per_row,
            ],
            1,
        )?;
        let grad_input = input.apply_op3_no_bwd(
            targets,
            &row_info,
            &MarginSoftmaxBackward {
                cfg: self.cfg.clone(),
            },
        )?;
        Ok((Some(grad_input), None, grad_scale))
    }
}

struct MarginSoftmaxBackward {
    cfg: MarginSoftmaxLoss,
}

impl CustomOp3 for MarginSoftmaxBackward {
    fn name(&self) -> &'static str {
        "margin_softmax_ce_backward"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
        row_info: &CpuStorage,
        row_info_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grad = on_cpu!(backward(
            &self.cfg,
            (input, input_layout),
            (targets, targets_layout),
            (row_info, row_info_layout),
        ))?;
        Ok((grad, input_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        input: &CudaStorage,
        input_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
        row_info: &CudaStorage,
        row_info_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let grad = backends::backward(
            &Cuda,
            &self.cfg,
            (input, input_layout),
            (targets, targets_layout),
            (row_info, row_info_layout),
        )?;
        Ok((grad, input_layout.shape().clone()))
    }
}

/// The per-row statistics [B, STAT_COLUMNS], differentiable into `input` and `scale`.
pub(crate) fn forward(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    scale: &Tensor,
) -> Result<Tensor> {
    input.apply_op3(
        targets,
        scale,
        MarginSoftmaxForward {
            cfg: cfg.clone(),
            scale_grad: scale.track_op(),
        },
    )
}

/// d(loss)/d(input) \[B, C\] from the per-row [M, ln Σ, a, k, g_y, r] (upstream gradient folded
/// in): the backward op, without an autograd node.
pub(crate) fn gradient_from_row_info(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_info: &Tensor,
) -> Result<Tensor> {
    input.apply_op3_no_bwd(
        targets,
        row_info,
        &MarginSoftmaxBackward { cfg: cfg.clone() },
    )
}

/// The op over one slice of the classes: the online state of each row's non-target entries in
/// the slice, [B, PARTIAL_COLUMNS] in the accumulation dtype. `local_targets[i]`: the row's target
/// as a column of the slice, −1 for an ignored row, ≥ the slice's width for a target in another
/// slice. `cfg` carries the slice's class weights. With [`merge_partials`] and [`finalize`], the
/// forward op's statistics of whole rows that no tensor holds whole (the head modules' slices,
/// the shards of a sharded loss). The backends return [B, splits, PARTIAL_COLUMNS] (a device
/// backend may cut a wide slice into column splits), which [`slice_partials`] merges.
struct SlicePartials {
    cfg: MarginSoftmaxLoss,
    local_targets: Vec<i64>,
    scale_grad: bool,
}

impl candle_core::CustomOp2 for SlicePartials {
    fn name(&self) -> &'static str {
        "margin_softmax_ce_slice_partials"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = input_layout.dims()[0];
        let (partials, splits) = on_cpu!(slice_partials(
            &self.cfg,
            (input, input_layout),
            &self.local_targets,
            (scale, scale_layout),
            self.scale_grad,
        ))?;
        Ok((partials, Shape::from((rows, splits, PARTIAL_COLUMNS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        input: &CudaStorage,
        input_layout: &Layout,
        scale: &CudaStorage,
        scale_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let rows = input_layout.dims()[0];
        let (partials, splits) = backends::slice_partials(
            &Cuda,
            &self.cfg,
            (input, input_layout),
            &self.local_targets,
            (scale, scale_layout),
            self.scale_grad,
        )?;
        Ok((partials, Shape::from((rows, splits, PARTIAL_COLUMNS))))
    }
}

/// See [`SlicePartials`]. `input` \[B, c\] row-contiguous, `scale` \[B\] in the accumulation
/// dtype.
pub(crate) fn slice_partials(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    local_targets: Vec<i64>,
    scale: &Tensor,
    scale_grad: bool,
) -> Result<Tensor> {
    let states = input.apply_op2_no_bwd(
        scale,
        &SlicePartials {
            cfg: cfg.clone(),
            local_targets,
            scale_grad,
        },
    )?;
    // A device backend may cut a wide slice into column splits: merged here, in split order.
    let splits = states.dim(1)?;
    if splits == 1 {
        return states.squeeze(1);
    }
    let parts = (0..splits)
        .map(|k| states.narrow(1, k, 1)?.squeeze(1))
        .collect::<Result<Vec<_>>>()?;
    merge_partials(&parts)
}

/// The inputs of the rows' targets that lie in `scores` \[B, c\] (`local`: the rows' targets
/// as columns of it, as for [`slice_partials`]) in place of `previous` \[B\] (accumulation
/// dtype); marks those rows in `owned`.
pub(crate) fn pick_target_inputs(
    scores: &Tensor,
    local: &[i64],
    previous: &Tensor,
    owned: &mut [u8],
) -> Result<Tensor> {
    let (rows, c) = scores.dims2()?;
    let dev = scores.device();
    let index: Vec<u32> = local
        .iter()
        .map(|&t| t.clamp(0, c.max(1) as i64 - 1) as u32)
        .collect();
    let owns: Vec<u8> = local
        .iter()
        .map(|&t| u8::from(t >= 0 && t < c as i64))
        .collect();
    for (o, &k) in owned.iter_mut().zip(&owns) {
        *o |= k;
    }
    let picked = scores
        .gather(&Tensor::from_vec(index, (rows, 1), dev)?, 1)?
        .squeeze(1)?
        .to_dtype(previous.dtype())?;
    Tensor::from_vec(owns, rows, dev)?.where_cond(&picked, previous)
}

/// The states of the slices of each row merged in the order of `parts` (each [B,
/// PARTIAL_COLUMNS], the accumulation dtype), on the host: every caller that merges the same
/// parts in the same order gets the same bits (the ranks of a sharded loss). Returns [B,
/// PARTIAL_COLUMNS] on `parts[0]`'s device.
pub(crate) fn merge_partials(parts: &[Tensor]) -> Result<Tensor> {
    let first = &parts[0];
    let rows = first.dim(0)?;
    let merged = match first.dtype() {
        DType::F64 => {
            let host = parts
                .iter()
                .map(|t| t.flatten_all()?.to_vec1::<f64>())
                .collect::<Result<Vec<_>>>()?;
            Tensor::from_vec(
                cpu::merge_partials(&host, rows),
                (rows, PARTIAL_COLUMNS),
                first.device(),
            )?
        }
        _ => {
            let host = parts
                .iter()
                .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<Vec<_>>>()?;
            Tensor::from_vec(
                cpu::merge_partials(&host, rows),
                (rows, PARTIAL_COLUMNS),
                first.device(),
            )?
        }
    };
    Ok(merged)
}

/// The forward op's statistics [B, STAT_COLUMNS] (on the host, from a few values per row) of rows
/// whose non-target entries' merged state is `others` [B, PARTIAL_COLUMNS] and whose target input
/// is `target_inputs` \[B\]; `targets` among `classes` classes, `scale` the row scale \[B\].
/// The accumulation dtype of `others`; the result on its device.
pub(crate) fn finalize(
    cfg: &MarginSoftmaxLoss,
    classes: usize,
    targets: &[Option<usize>],
    others: &Tensor,
    target_inputs: &Tensor,
    scale: &Tensor,
    scale_grad: bool,
) -> Result<Tensor> {
    let finalize_in = match others.dtype() {
        DType::F64 => finalize_as::<f64>,
        _ => finalize_as::<f32>,
    };
    finalize_in(
        cfg,
        classes,
        targets,
        others,
        target_inputs,
        scale,
        scale_grad,
    )
}

/// [`finalize`] with the host math in `A`.
fn finalize_as<A: Acc>(
    cfg: &MarginSoftmaxLoss,
    classes: usize,
    targets: &[Option<usize>],
    others: &Tensor,
    target_inputs: &Tensor,
    scale: &Tensor,
    scale_grad: bool,
) -> Result<Tensor> {
    let read = |t: &Tensor| t.to_dtype(A::DTYPE)?.flatten_all()?.to_vec1::<A>();
    // The row parameters: the row scale \[B\], or (r, m1, m2, m3) [B, 4] with per-row margins.
    let params = read(scale)?;
    let (scales, margins) = match scale.rank() {
        2 => {
            let (scales, margins) = cpu::split_row_params(&params);
            (scales, Some(margins))
        }
        _ => (params, None),
    };
    let stats = cpu::finalize_partials(
        cfg,
        classes,
        targets,
        &read(others)?,
        &read(target_inputs)?,
        &scales,
        margins.as_deref(),
        scale_grad,
    );
    let columns = stat_columns(margins.is_some());
    Tensor::from_vec(stats, (targets.len(), columns), others.device())
}

/// The widest row (number of classes C) that [`MarginSoftmaxLoss::loss_and_grad`] reads in one
/// pass (one read and one write per element) on `device` for inputs of `dtype`. On a CUDA
/// device: rows that fit in the shared memory one block may opt into take one block per row;
/// on sm_90 and later, rows that fit in the shared memory of a cluster of 8 blocks take a
/// cluster per row (distributed shared memory); wider rows take a cooperative kernel that reads
/// groups of rows sized to the L2 cache once from memory and a second time, for the gradient,
/// from L2. On an H100 / H200
/// (227 KiB a block, clusters) one block holds C ≤ 57 597 f32, 115 193 f16 / bf16, 28 799 f64,
/// a cluster C ≤ 460 768, 921 536 and 230 384 (this function's value there); on an A100
/// (163 KiB, no clusters) 41 213, 82 425 and 20 607; on a GPU without the opt-in (48 KiB)
/// 11 773, 23 545 and 5 887. On the CPU every row is one pass (`usize::MAX`). The autograd path
/// (`loss` + `backward()`) always reads twice (forward and backward ops).
///
/// # Errors
/// A dtype other than f32, f64, f16 or bf16, a device other than the CPU or CUDA, or a failed
/// device query; each names the op.
pub fn one_pass_max_classes(device: &Device, dtype: DType) -> Result<usize> {
    let size = match dtype {
        DType::F32 => 4,
        DType::F64 => 8,
        DType::F16 | DType::BF16 => 2,
        other => bail!("{OP_NAME}: input dtype must be f32, f64, f16 or bf16, got {other:?}"),
    };
    match device {
        Device::Cpu => {
            #[cfg(feature = "kernel-emu")]
            if let Some(emulated) = emu::active() {
                return Ok(emulated.0.one_pass_max_classes(size));
            }
            let _ = size;
            Ok(usize::MAX)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::one_pass_max_classes(dev, size),
        #[allow(unreachable_patterns)]
        other => bail!(
            "{OP_NAME}: runs on the CPU and on CUDA devices, got {:?}",
            other.location()
        ),
    }
}

/// (stats [B, STAT_COLUMNS], d(loss)/d(input), d(loss)/d(scale)) for the configured reduction
/// (the sum of the rows' losses for [`Reduction::None`]), outside the autograd graph.
/// d(loss)/d(scale) only with `scale_grad` (0 otherwise).
pub(crate) fn forward_backward(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    scale: &Tensor,
    scale_grad: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (rows, classes) = input.dims2()?;
    let mean = cfg.reduction == Reduction::Mean;
    let (input_storage, input_layout) = input.storage_and_layout();
    let (targets_storage, targets_layout) = targets.storage_and_layout();
    let (scale_storage, scale_layout) = scale.storage_and_layout();
    let (stats, grad, grad_scale) = match (&*input_storage, &*targets_storage, &*scale_storage) {
        (Storage::Cpu(x), Storage::Cpu(t), Storage::Cpu(s)) => {
            let (stats, grad, grad_scale) = on_cpu!(forward_backward(
                cfg,
                (x, input_layout),
                (t, targets_layout),
                (s, scale_layout),
                mean,
                scale_grad,
            ))?;
            (
                Storage::Cpu(stats),
                Storage::Cpu(grad),
                Storage::Cpu(grad_scale),
            )
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(x), Storage::Cuda(t), Storage::Cuda(s)) => {
            let (stats, grad, grad_scale) = backends::forward_backward(
                &Cuda,
                cfg,
                (x, input_layout),
                (t, targets_layout),
                (s, scale_layout),
                mean,
                scale_grad,
            )?;
            (
                Storage::Cuda(stats),
                Storage::Cuda(grad),
                Storage::Cuda(grad_scale),
            )
        }
        _ => bail!(
            "{OP_NAME}({}): loss_and_grad runs on the CPU{}; got input on {:?}",
            cfg.head.name(),
            if cfg!(feature = "cuda") {
                " and on CUDA devices"
            } else {
                ", and on CUDA devices with the `cuda` feature"
            },
            input.device().location()
        ),
    };
    let tensor = |storage, shape: (usize, usize)| {
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    };
    // The row parameters' gradient has their shape: \[B\] (the row scale), or [B, ROW_PARAMS].
    let grad_params = match scale.dims() {
        [_, width] => tensor(grad_scale, (rows, *width)),
        _ => tensor(grad_scale, (rows, 1)).squeeze(1)?,
    };
    Ok((
        tensor(stats, (rows, STAT_COLUMNS)),
        tensor(grad, (rows, classes)),
        grad_params,
    ))
}

/// The fused op writing the gradient into a caller's buffer (the destination of candle's
/// in-place op), reading the input from a second tensor (`srcs` = [input, targets]) or, in
/// place, from the buffer itself (`srcs` = [targets]). The per-row statistics come back through
/// `stats`, since an in-place op returns nothing. CPU only: [`crate::MarginSoftmaxLoss`]'s
/// entry points copy the gradient into the buffer on other devices.
struct MarginSoftmaxInto {
    cfg: MarginSoftmaxLoss,
    mean: bool,
    stats: std::sync::Mutex<Option<CpuStorage>>,
}

impl MarginSoftmaxInto {
    /// Runs the CPU body into `grad` (reading `input`, or `grad` itself in place) and keeps the
    /// statistics for the caller.
    fn run(
        &self,
        grad: (&mut CpuStorage, &Layout),
        input: Option<(&CpuStorage, &Layout)>,
        targets: (&CpuStorage, &Layout),
    ) -> Result<()> {
        let stats = cpu::forward_backward_into(&self.cfg, grad, input, targets, self.mean)?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok(())
    }
}

impl InplaceOp3 for MarginSoftmaxInto {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        grad: &mut CpuStorage,
        grad_layout: &Layout,
        input: &CpuStorage,
        input_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<()> {
        self.run(
            (grad, grad_layout),
            Some((input, input_layout)),
            (targets, targets_layout),
        )
    }
}

impl InplaceOp2 for MarginSoftmaxInto {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        input: &mut CpuStorage,
        input_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<()> {
        self.run((input, input_layout), None, (targets, targets_layout))
    }
}

/// The per-row statistics of the fused op, writing d(loss)/d(input) into `grad` (contiguous, the
/// input's shape and dtype, on the CPU) for the configured reduction; with `grad = None` the
/// input itself is overwritten with its gradient. The head's fixed scale.
pub(crate) fn forward_backward_into(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    grad: Option<&Tensor>,
) -> Result<Tensor> {
    let rows = input.dim(0)?;
    let op = MarginSoftmaxInto {
        cfg: cfg.clone(),
        mean: cfg.reduction == Reduction::Mean,
        stats: std::sync::Mutex::new(None),
    };
    match grad {
        Some(grad) => grad.inplace_op3(input, targets, &op)?,
        None => input.inplace_op2(targets, &op)?,
    }
    let stats = op.stats.into_inner().unwrap_or_else(|e| e.into_inner());
    let Some(stats) = stats else {
        bail!(
            "{OP_NAME}({}): internal error: the in-place op produced no statistics",
            cfg.head.name()
        )
    };
    Ok(Tensor::from_storage(
        Storage::Cpu(stats),
        (rows, STAT_COLUMNS),
        BackpropOp::none(),
        false,
    ))
}
