//! Per-row margins: the building block of the adaptive heads (MagFace's m(‖f‖), AdaFace's
//! norm-dependent margins, ElasticFace's drawn margins). The margins of CosFace, ArcFace and the
//! combined margin, given per row as a tensor, differentiable, in the one pass over each row.
//!
//! Inside, the op takes the row parameters (r, m1, m2, m3) per row, [B, 4], in place of the row
//! scale \[B\]: CosFace's m is m3 and ArcFace's m2, the other two fixed (m1 = 1). The forward
//! pass builds each row's margin from them (`math::Margin::for_row`) and returns dℓ/d(m1, m2,
//! m3) beside dℓ/dr, from the target's input alone (`math::Margin::margin_grads`).
//!
//! The CPU bodies take them; the CUDA kernels (and their emulation) do not yet, and return an
//! `Err` naming the op. `MarginHead::loss_with_row_margins` is the head module's variant;
//! `loss_and_grad_into` and the sharded losses have none yet.

use candle_core::{DType, Device, Result, Tensor, bail};

use crate::config::{Head, MarginSoftmaxLoss, OP_NAME, accumulation_dtype, is_arithmetic_float};
use crate::loss::{check_inputs, fixed_row_scale};

/// What [`MarginSoftmaxLoss::loss_and_grad_with_row_margins`] returns.
#[derive(Debug, Clone)]
pub struct RowMarginGrads {
    /// The loss, as [`MarginSoftmaxLoss::loss`] returns it.
    pub loss: Tensor,
    /// d(loss)/d(input) \[B, C\], in the input's dtype.
    pub input: Tensor,
    /// d(loss)/d(margins), the margins' shape, in the accumulation dtype (f32, or f64).
    pub margins: Tensor,
    /// d(loss)/d(row_scale) \[B\] when a row scale was given.
    pub row_scale: Option<Tensor>,
}

impl MarginSoftmaxLoss {
    /// As [`Self::loss`] (or [`Self::loss_with_row_scale`] with `row_scale`), with a margin per
    /// row in place of the head's: `margins` \[B\] for CosFace (m) and ArcFace (m), [B, 3] for
    /// the combined margin (m1, m2, m3), any float dtype and layout. The head's other settings
    /// (easy margin, the ArcFace fallback, the gradient mode) apply to every row's margin, and
    /// the fallback threshold follows the row's margin as in MagFace's official code. The
    /// result back-propagates into `margins` (MagFace's m(‖f‖) takes a gradient) in both
    /// gradient modes, which differ only in the derivative by the input.
    ///
    /// The margins' values are not checked (that would read them back from the device); a NaN
    /// margin gives its row a NaN loss.
    ///
    /// CPU only so far: on a CUDA device (or through the emulated kernels) it returns an `Err`.
    ///
    /// # Errors
    /// As [`Self::loss`] (and [`Self::loss_with_row_scale`] for `row_scale`), and for: a head
    /// other than CosFace, ArcFace and Combined; `margins` of another shape than \[B\] (CosFace,
    /// ArcFace) or [B, 3] (Combined), of a dtype other than f16, bf16, f32 and f64, or on
    /// another device; an input on a CUDA device.
    pub fn loss_with_row_margins(
        &self,
        input: &Tensor,
        targets: &Tensor,
        margins: &Tensor,
        row_scale: Option<&Tensor>,
    ) -> Result<Tensor> {
        let params = self.row_params(input, targets, margins, row_scale)?;
        self.loss_impl(input, targets, &params)
    }

    /// As [`Self::loss_and_grad`], with per-row margins (see [`Self::loss_with_row_margins`]):
    /// the loss and the gradients into the input, the margins and, when given, the row scale, in
    /// one pass over each row.
    ///
    /// # Errors
    /// As [`Self::loss_with_row_margins`].
    pub fn loss_and_grad_with_row_margins(
        &self,
        input: &Tensor,
        targets: &Tensor,
        margins: &Tensor,
        row_scale: Option<&Tensor>,
    ) -> Result<RowMarginGrads> {
        let params = self
            .row_params(input, targets, &margins.detach(), row_scale)?
            .detach();
        let (loss, grad, grad_params) =
            self.loss_and_grad_impl(input, targets, &params, row_scale.is_some())?;
        let d_margins = match self.head {
            Head::CosFace { .. } => grad_params.narrow(1, 3, 1)?.squeeze(1)?,
            Head::ArcFace { .. } => grad_params.narrow(1, 2, 1)?.squeeze(1)?,
            _ => grad_params.narrow(1, 1, 3)?,
        };
        let d_scale = match row_scale {
            Some(_) => Some(grad_params.narrow(1, 0, 1)?.squeeze(1)?),
            None => None,
        };
        Ok(RowMarginGrads {
            loss,
            input: grad,
            margins: d_margins,
            row_scale: d_scale,
        })
    }

    /// The checked row parameters (r, m1, m2, m3) [B, 4] in the accumulation dtype,
    /// differentiable into `margins` and `row_scale`.
    fn row_params(
        &self,
        input: &Tensor,
        targets: &Tensor,
        margins: &Tensor,
        row_scale: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (rows, _) = check_inputs(self, input, targets, row_scale)?;
        let acc = accumulation_dtype(input.dtype());
        let prefix = format!("{OP_NAME}({})", self.head.name());
        let m123 = margin_columns(&self.head, &prefix, rows, margins, input.device(), acc)?;
        let scale = match row_scale {
            Some(r) => r.to_dtype(acc)?,
            None => fixed_row_scale(self, rows, input)?,
        };
        Tensor::cat(&[&scale.unsqueeze(1)?, &m123], 1)?.contiguous()
    }
}

/// The per-row margins as (m1, m2, m3) [B, 3] in `acc`, differentiable into `margins`:
/// CosFace's m is m3 and ArcFace's m2 (the others 1 and 0), Combined's are its three columns.
/// Checks the head, the margins' shape (\[B\], or [B, 3] for Combined), dtype and device;
/// errors start with `prefix` (the op's or the head's name).
pub(crate) fn margin_columns(
    head: &Head,
    prefix: &str,
    rows: usize,
    margins: &Tensor,
    device: &Device,
    acc: DType,
) -> Result<Tensor> {
    let shape: &[usize] = match head {
        Head::CosFace { .. } | Head::ArcFace { .. } => &[rows],
        Head::Combined { .. } => &[rows, 3],
        _ => bail!("{prefix}: per-row margins need the CosFace, ArcFace or Combined head"),
    };
    if margins.dims() != shape {
        bail!(
            "{prefix}: margins must have shape {shape:?}, got {:?}",
            margins.dims()
        )
    }
    if !is_arithmetic_float(margins.dtype()) {
        bail!(
            "{prefix}: margins must be an f16, bf16, f32 or f64 tensor, got {:?}",
            margins.dtype()
        )
    }
    if !margins.device().same_device(device) {
        bail!(
            "{prefix}: margins are on {:?} but the input is on {:?}",
            margins.device().location(),
            device.location()
        )
    }
    let m = margins.to_dtype(acc)?;
    let constant = |v: f64| Tensor::full(v, (rows, 1), device)?.to_dtype(acc);
    let columns = match head {
        Head::CosFace { .. } => [constant(1.0)?, constant(0.0)?, m.unsqueeze(1)?],
        Head::ArcFace { .. } => [constant(1.0)?, m.unsqueeze(1)?, constant(0.0)?],
        _ => return m.contiguous(),
    };
    Tensor::cat(&columns, 1)
}
