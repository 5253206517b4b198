//! The public entry points: validate, then apply the fused op.

use candle_core::{DType, Result, Tensor, bail};

use crate::config::{
    MarginSoftmaxLoss, OP_NAME, Reduction, accumulation_dtype, is_arithmetic_float,
};
use crate::layout::{self, STAT_WEIGHT};
use crate::op;

/// Every check that needs only shapes, dtypes and devices (no device read-back); returns
/// (B, C). Target *values* are checked by the op itself, where the targets are read anyway.
pub(crate) fn check_inputs(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
) -> Result<(usize, usize)> {
    let name = cfg.head.name();
    let (rows, classes) = match input.dims() {
        &[b, c] => (b, c),
        d => bail!("{OP_NAME}({name}): input must have rank 2 [B, C], got shape {d:?}"),
    };
    if !matches!(
        input.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    ) {
        bail!(
            "{OP_NAME}({name}): input dtype must be f32, f64, f16 or bf16, got {:?}",
            input.dtype()
        )
    }
    cfg.validate_for(accumulation_dtype(input.dtype()))?;
    if classes == 0 {
        bail!(
            "{OP_NAME}({name}): input has C = 0 classes (shape {:?})",
            input.dims()
        )
    }
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        bail!(
            "{OP_NAME}({name}): targets must be an integer tensor of dtype u8, u32 or i64, got {:?}",
            targets.dtype()
        )
    }
    if targets.dims() != [rows] {
        bail!(
            "{OP_NAME}({name}): targets must have shape [B] = [{rows}] to match input {:?}, got {:?}",
            input.dims(),
            targets.dims()
        )
    }
    let same_device = |t: &Tensor, what: &str| -> Result<()> {
        if !t.device().same_device(input.device()) {
            bail!(
                "{OP_NAME}({name}): {what} is on {:?} but input is on {:?}",
                t.device().location(),
                input.device().location()
            )
        }
        Ok(())
    };
    same_device(targets, "targets")?;
    if let Some(w) = &cfg.class_weights {
        if w.len() != classes {
            bail!(
                "{OP_NAME}({name}): class_weights must have shape [C] = [{classes}], got [{}]",
                w.len()
            )
        }
        same_device(w.tensor(), "class_weights")?;
    }
    if let Some(r) = row_scale {
        if r.dims() != [rows] {
            bail!(
                "{OP_NAME}({name}): row_scale must have shape [B] = [{rows}], got {:?}",
                r.dims()
            )
        }
        if !is_arithmetic_float(r.dtype()) {
            bail!(
                "{OP_NAME}({name}): row_scale must be an f16, bf16, f32 or f64 tensor, got {:?}",
                r.dtype()
            )
        }
        same_device(r, "row_scale")?;
    }
    Ok((rows, classes))
}

/// True when each row is contiguous in memory (any row stride and offset), which the op reads
/// directly; other layouts (e.g. a transposed view) are copied first.
fn rows_are_contiguous(t: &Tensor) -> bool {
    let stride = t.stride();
    t.dims()[1] <= 1 || stride[1] == 1
}

impl MarginSoftmaxLoss {
    /// The loss of `input` \[B, C\] against `targets` \[B\], differentiable with respect to `input`
    /// through candle autograd.
    ///
    /// - `input`: f32, f64, f16 or bf16. For the cosine heads, cos θ (clamped to [−1, 1]); for
    ///   RBF, squared distances (clamped to ≥ 0); for Softmax, logits. Any layout: row-contiguous
    ///   views (e.g. `narrow` on either dimension) are read in place, others copied once.
    /// - `targets`: u8, u32 or i64 class indices in [0, C), or `ignore_index` (the default −100
    ///   only matches i64 targets: see [`MarginSoftmaxLoss::ignore_index`]).
    /// - Returns f32 (f64 for f64 input): shape \[B\] for [`Reduction::None`], a scalar otherwise.
    ///   The gradient into `input` has the input's dtype.
    /// - Input values are not checked for size: where s·x itself (or d²/γ) overflows the
    ///   accumulation dtype, the loss and its gradient are non-finite, as in PyTorch. The
    ///   weighted mean's sums Σ w_y·ℓ and Σ w_y are formed in f64 whatever the dtype.
    ///
    /// # Errors
    /// An `Err` that names the op and the problem, for: an invalid hyper-parameter (see the
    /// setters of [`MarginSoftmaxLoss`]), or one that does not round to a finite, normal (or
    /// zero) value of the accumulation dtype of this input (f32 for f32 / f16 / bf16 input:
    /// s = 1e39 or a class weight of 1e39 overflows it, s = 1e−45 or γ = 1e−40 underflows it;
    /// also 1/γ for RBF, 1 + λ for SphereFace, 1/cap and Σ_j w_j); input rank ≠ 2, C = 0, or a
    /// non-float input; targets that are not u8 / u32 / i64, not of shape \[B\], or hold a value
    /// outside [0, C) that is not `ignore_index`; class weights not of shape \[C\]; tensors on
    /// different devices.
    pub fn loss(&self, input: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (rows, _) = check_inputs(self, input, targets, None)?;
        let scale = fixed_row_scale(self, rows, input)?;
        self.loss_impl(input, targets, &scale)
    }

    /// As [`Self::loss`], with a per-row scale `row_scale` \[B\] (any float dtype) that replaces the
    /// head's fixed `s` for each row: z_ij = r_i·u_ij. This is the original SphereFace, where r_i
    /// is the feature norm ‖f_i‖, or one learnable s broadcast to every row
    /// (`s.broadcast_as(b)`). Any layout (a strided column view, a broadcast): the result
    /// back-propagates into `row_scale`, hence into the tensor it is a view of.
    ///
    /// The scale's *values* are not checked (that would read them back from the device: a
    /// synchronization per call). They enter the formulas as they are: a NaN scale gives that
    /// row a NaN loss and NaN gradients; r = 0 gives every logit 0 (the loss of a uniform
    /// softmax, ln C without the other options, and a zero input gradient); a negative r flips
    /// the sign of every logit, margin included, so minimizing the loss pushes the target's
    /// cosine down.
    ///
    /// # Errors
    /// As [`Self::loss`], and for a `row_scale` that is not a float tensor of shape \[B\].
    pub fn loss_with_row_scale(
        &self,
        input: &Tensor,
        targets: &Tensor,
        row_scale: &Tensor,
    ) -> Result<Tensor> {
        check_inputs(self, input, targets, Some(row_scale))?;
        // `contiguous` is a differentiable copy where needed (a strided or broadcast view): the
        // gradient reaches the view's base through it.
        let scale = row_scale
            .to_dtype(accumulation_dtype(input.dtype()))?
            .contiguous()?;
        self.loss_impl(input, targets, &scale)
    }

    pub(crate) fn loss_impl(
        &self,
        input: &Tensor,
        targets: &Tensor,
        scale: &Tensor,
    ) -> Result<Tensor> {
        let input = if rows_are_contiguous(input) {
            input.clone()
        } else {
            input.contiguous()?
        };
        let targets = targets.contiguous()?;
        let stats = op::forward(self, &input, &targets, scale)?;
        reduce(self.reduction, &stats)
    }

    /// The loss and d(loss)/d(input) in one call, without autograd: the training-step
    /// primitive. Each row is read, its statistics formed, and its gradient written while the
    /// row is still in cache. With [`Reduction::None`], the gradient is that of Σ_i ℓ_i (an
    /// upstream gradient of ones). Returns (loss as in [`Self::loss`], gradient \[B, C\] in the
    /// input's dtype). Neither output is attached to the autograd graph.
    ///
    /// On the CPU each row's exps are kept from its forward pass for its gradient, in a scratch
    /// of about C values per rayon thread (2·C for RBF), reused across calls: up to 2²² values
    /// (16 MiB of f32) per thread stay allocated; wider rows allocate theirs per call. The row
    /// kernels run at the best SIMD level the CPU has (see [`crate::SimdLevel`]).
    ///
    /// On a CUDA device (feature `cuda`) a row that fits in shared memory is read once and its
    /// gradient written once: by a warp (C ≤ 1021 f32, 2041 f16 / bf16, 511 f64), by a block
    /// (up to the shared memory a block may opt into: C ≤ 57 597 f32 / 115 193 bf16 on an
    /// H100 / H200), or on sm_90 by a cluster of 8 blocks (C ≤ 460 768 f32 / 921 536 bf16 on an
    /// H100 / H200); [`crate::one_pass_max_classes`] gives the limit of a device. Wider rows take
    /// three kernels (partial statistics over column slices, per-row finalize, backward): two
    /// reads and one write. The targets are converted and checked on the GPU, and the forward
    /// reads back one value (see [`Self::check_targets`]). The launch shapes depend only on B,
    /// C, the dtype and the device, so the results are bitwise reproducible on a device.
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn loss_and_grad(&self, input: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let (rows, _) = check_inputs(self, input, targets, None)?;
        let scale = fixed_row_scale(self, rows, input)?;
        let (loss, grad, _) = self.loss_and_grad_impl(input, targets, &scale, false)?;
        Ok((loss, grad))
    }

    /// As [`Self::loss_and_grad`], writing the gradient into the caller's `grad` (same shape
    /// and dtype as `input`, contiguous) instead of a new tensor; returns the loss. A training
    /// loop that reuses one buffer across steps allocates nothing of size \[B, C\]: on the CPU the
    /// page faults of a fresh gradient-sized buffer cost about as much as the op's arithmetic
    /// (see `src/backends/cpu/alloc.rs` and benches/RESULTS.md). The head's fixed scale (no per-row scale
    /// variant).
    ///
    /// `grad` is written in place (candle's in-place op): any tensor that shares its storage (a
    /// view of it, or a clone) sees the new values, and an autograd graph that saved it is
    /// silently invalidated; use a buffer that only this call writes. On a CUDA device the op
    /// computes a new gradient and copies it into `grad` (same results, one more \[B, C\]
    /// buffer and copy).
    ///
    /// # Errors
    /// As [`Self::loss`], and for a `grad` whose shape, dtype or device differs from `input`'s,
    /// that is not contiguous, or that shares storage with `input` (use
    /// [`Self::loss_and_grad_in_place`] for that).
    pub fn loss_and_grad_into(
        &self,
        input: &Tensor,
        targets: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        check_inputs(self, input, targets, None)?;
        let name = self.head.name();
        if grad.dims() != input.dims() || grad.dtype() != input.dtype() {
            bail!(
                "{OP_NAME}({name}): gradient buffer must have the input's shape {:?} and dtype \
                 {:?}, got {:?} {:?}",
                input.dims(),
                input.dtype(),
                grad.dims(),
                grad.dtype()
            )
        }
        if !grad.device().same_device(input.device()) {
            bail!(
                "{OP_NAME}({name}): gradient buffer is on {:?} but input is on {:?}",
                grad.device().location(),
                input.device().location()
            )
        }
        if !grad.is_contiguous() {
            bail!(
                "{OP_NAME}({name}): gradient buffer must be contiguous (got strides {:?} for \
                 shape {:?})",
                grad.stride(),
                grad.dims()
            )
        }
        let input = if rows_are_contiguous(input) {
            input.detach()
        } else {
            input.detach().contiguous()?
        };
        // candle refuses a destination that shares storage with a source before writing
        // anything; its message names neither this op's call nor the way out.
        self.loss_and_grad_to(&input, targets, Some(grad))
            .map_err(|e| match e.to_string() {
                m if m.contains("shares storage with dst") => candle_core::Error::Msg(format!(
                    "{OP_NAME}({name}): the gradient buffer shares storage with the input (use \
                     loss_and_grad_in_place to overwrite the input with its gradient): {m}"
                )),
                _ => e,
            })
    }

    /// As [`Self::loss_and_grad`], overwriting `input` with its own gradient; returns the loss.
    /// No buffer of size \[B, C\] at all: the logits' memory is reused for their gradient, as
    /// some fused cross-entropy libraries do. Each row is read entirely (and kept in a per-thread
    /// scratch) before its gradient is written.
    ///
    /// **Opt-in, and a trap if misused**: after the call `input` holds the gradient, not the
    /// logits. Any tensor sharing its storage (a view, a clone) changes too, and if `input` was
    /// saved by an autograd graph (the output of a matmul whose backward reads it, or a `Var`)
    /// that graph silently computes wrong gradients afterwards. Use it only on a tensor that
    /// nothing else reads, e.g. logits computed outside autograd whose gradient you feed to the
    /// layer below by hand. On a CUDA device the op computes a new gradient and copies it over
    /// `input`.
    ///
    /// # Errors
    /// As [`Self::loss`], and for an `input` that is not contiguous (a view would be copied,
    /// and the gradient would not land where the caller looks for it).
    pub fn loss_and_grad_in_place(&self, input: &Tensor, targets: &Tensor) -> Result<Tensor> {
        check_inputs(self, input, targets, None)?;
        if !input.is_contiguous() {
            bail!(
                "{OP_NAME}({}): loss_and_grad_in_place needs a contiguous input (got strides \
                 {:?} for shape {:?})",
                self.head.name(),
                input.stride(),
                input.dims()
            )
        }
        self.loss_and_grad_to(input, targets, None)
    }

    /// The loss, its gradient written into `grad` (`None`: over `input`): the CPU op in place,
    /// or on other devices a new gradient copied there.
    fn loss_and_grad_to(
        &self,
        input: &Tensor,
        targets: &Tensor,
        grad: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !input.device().is_cpu() {
            let (loss, g) = self.loss_and_grad(input, targets)?;
            grad.unwrap_or(input).slice_set(&g, 0, 0)?;
            return Ok(loss);
        }
        let stats = op::forward_backward_into(self, input, &targets.contiguous()?, grad)?;
        reduce(self.reduction, &stats)
    }

    /// As [`Self::loss_and_grad`] with a per-row scale (see [`Self::loss_with_row_scale`]: any
    /// layout, values not checked); also returns d(loss)/d(row_scale), shape \[B\], in the
    /// accumulation dtype (f32, or f64), one entry per row (for a broadcast scale, sum it).
    ///
    /// # Errors
    /// As [`Self::loss_with_row_scale`].
    pub fn loss_and_grad_with_row_scale(
        &self,
        input: &Tensor,
        targets: &Tensor,
        row_scale: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        check_inputs(self, input, targets, Some(row_scale))?;
        let scale = row_scale
            .detach()
            .to_dtype(accumulation_dtype(input.dtype()))?;
        self.loss_and_grad_impl(input, targets, &scale, true)
    }

    pub(crate) fn loss_and_grad_impl(
        &self,
        input: &Tensor,
        targets: &Tensor,
        scale: &Tensor,
        scale_grad: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let input = if rows_are_contiguous(input) {
            input.detach()
        } else {
            input.detach().contiguous()?
        };
        let targets = targets.contiguous()?;
        let (stats, grad, grad_scale) =
            op::forward_backward(self, &input, &targets, &scale.contiguous()?, scale_grad)?;
        let loss = reduce(self.reduction, &stats)?;
        Ok((loss, grad, grad_scale))
    }
}

/// A \[B\] tensor holding the head's fixed s: the op always takes a per-row scale, so the fixed
/// and per-row cases share one code path (B extra floats read).
pub(crate) fn fixed_row_scale(
    cfg: &MarginSoftmaxLoss,
    rows: usize,
    input: &Tensor,
) -> Result<Tensor> {
    let dtype = accumulation_dtype(input.dtype());
    Tensor::full(cfg.head.scale(), rows, input.device())?.to_dtype(dtype)
}

/// Per-row losses \[B\] from the op's statistics, reduced with plain candle ops (so the autograd
/// graph runs through the op's `bwd` for column 0 only).
pub(crate) fn reduce(reduction: Reduction, stats: &Tensor) -> Result<Tensor> {
    let per_row = stats.narrow(1, layout::STAT_LOSS, 1)?.squeeze(1)?;
    if per_row.dim(0)? == 0 && reduction != Reduction::None {
        // Σ over no rows is 0 (and Mean's 0/0 is 0 by our convention); candle cannot narrow an
        // empty tensor at a column offset, so the weight column is not read.
        return per_row.sum_all();
    }
    match reduction {
        Reduction::None => Ok(per_row),
        Reduction::Sum => per_row.sum_all(),
        Reduction::Mean => {
            // Σ ℓ / Σ w_y over rows not ignored, both sums in f64 whatever the input's dtype
            // (valid f32 weights of a class that many rows target overflow an f32 sum), the
            // quotient rounded once. The weights do not depend on the input, so the denominator
            // carries no gradient.
            let denominator = stats
                .narrow(1, STAT_WEIGHT, 1)?
                .detach()
                .to_dtype(DType::F64)?
                .sum_all()?;
            let sum = per_row.to_dtype(DType::F64)?.sum_all()?;
            mean_of_sum(&sum, &denominator)?.to_dtype(per_row.dtype())
        }
    }
}

/// Σ ℓ / Σ w, or 0 (with a zero gradient) where Σ w = 0: an all-ignored or empty batch, or one
/// whose targets all have weight 0 (the spec's choice; PyTorch gives NaN). The quotient is
/// selected, not multiplied by a mask, so that an infinite Σ ℓ cannot make it 0·∞ = NaN.
pub(crate) fn mean_of_sum(sum: &Tensor, denominator: &Tensor) -> Result<Tensor> {
    let is_zero = denominator.eq(0.0)?;
    let safe = (denominator + is_zero.to_dtype(denominator.dtype())?)?;
    is_zero.where_cond(&sum.zeros_like()?, &sum.div(&safe)?)
}
