//! The head's elementwise form (how embeddings and W become the op's input), and the
//! normalizations of the cosine heads.

use candle_core::{Result, Tensor};

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
    let norm = xa.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(eps)?;
    xa.broadcast_div(&norm)?.to_dtype(x.dtype())
}

/// ‖x_i‖ \[B\] (composed, differentiable).
pub(super) fn row_norm(x: &Tensor) -> Result<Tensor> {
    x.sqr()?.sum(1)?.sqrt()
}
