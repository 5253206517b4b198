//! The head's elementwise form (how embeddings and W become the op's input), and the
//! normalizations of the cosine heads.

use candle_core::{DType, Result, Tensor};

use crate::config::{Head, accumulation_dtype};

/// The ε of the normalizations: max(‖x‖, ε) as in PyTorch's `F.normalize`.
pub const DEFAULT_NORM_EPS: f64 = 1e-12;

/// How the head turns (embeddings, W) into the op's input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Form {
    Cosine,
    Rbf,
    Linear,
}

pub(super) fn form_of(head: &Head) -> Form {
    match head {
        Head::Softmax { .. } => Form::Linear,
        Head::Rbf { .. } => Form::Rbf,
        _ => Form::Cosine,
    }
}

/// x / max(‖x‖, ε) per row, composed (differentiable): PyTorch's `F.normalize`.
pub(super) fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let acc = accumulation_dtype(x.dtype());
    let xa = x.to_dtype(acc)?;
    let norm = row_norms(&xa)?.maximum(eps)?;
    xa.broadcast_div(&norm)?.to_dtype(x.dtype())
}

/// ‖x_i‖ \[B\] (composed, differentiable).
pub(super) fn row_norm(x: &Tensor) -> Result<Tensor> {
    row_norms(x)?.squeeze(1)
}

/// ‖x_i‖ per row \[B, 1\] of an f32 or f64 matrix, composed (differentiable), without overflow
/// or underflow: where Σ_j x_ij² is not a finite normal number (a row past ~1.8e19 in f32 or
/// ~1.3e154 in f64, or a tiny one), m·‖x_i/m‖ with m = max_j |x_ij| held constant (BLAS `nrm2`'s
/// scaling; the gradient is x_i/‖x_i‖ either way); elsewhere √(Σ_j x_ij²) as it is.
pub(super) fn row_norms(x: &Tensor) -> Result<Tensor> {
    let squares = x.sqr()?.sum_keepdim(1)?;
    if x.elem_count() == 0 {
        return squares.sqrt();
    }
    let (tiny, huge) = match x.dtype() {
        DType::F64 => (f64::MIN_POSITIVE, f64::MAX),
        _ => (f64::from(f32::MIN_POSITIVE), f64::from(f32::MAX)),
    };
    let m = x.detach().abs()?.max_keepdim(1)?.maximum(tiny)?;
    let scaled = x
        .broadcast_div(&m)?
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .mul(&m)?;
    // NaN compares false: such a row keeps its NaN through the scaled branch too.
    let plain = squares.ge(tiny)?.mul(&squares.le(huge)?)?;
    plain.where_cond(&squares.sqrt()?, &scaled)
}
