//! The per-row margins in plain candle ops (the oracle of
//! [`MarginSoftmaxLoss::loss_with_row_margins`]): each row's target logit from its own
//! (m1, m2, m3) as tensors, so that candle's autograd finds the gradient into the margins.
//!
//! θ0 = acos(c) comes from the detached cosine (on the host, as for the fixed margins), so it
//! is a constant; the angular branch u = cos(m1·θ0 + m2) − m3 and the fallback
//! u = c − m3 − m2·sin m2 are then ordinary candle expressions of the margins. The derivative by
//! the cosine is attached by a value-0 carrier, from the margins' detached values: in `Exact`
//! mode cos(m1·θ + m2) with θ = θ0 + (cos θ0 − c)/max(sin θ0, sin θ_ε) (one Newton step, as for
//! the fixed margins), in `Detached` mode c.

use std::f64::consts::PI;

use candle_core::{Result, Tensor};

use super::{acos_host, clamp_torch, loss_impl, read_targets};
use crate::config::{Head, MarginGrad, MarginSoftmaxLoss, accumulation_dtype};
use crate::loss::{check_inputs, fixed_row_scale};
use crate::math::exact_sin_floor;

/// The loss with a margin per row (`margins` \[B\] for CosFace and ArcFace, [B, 3] = (m1, m2,
/// m3) for Combined), composed from plain candle ops; differentiable into `input`, `margins` and
/// `row_scale`. Same contract as [`MarginSoftmaxLoss::loss_with_row_margins`] (the checks of
/// the margins' shape are the op's; here a wrong shape fails in candle).
pub fn loss_with_row_margins(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    margins: &Tensor,
    row_scale: Option<&Tensor>,
) -> Result<Tensor> {
    check_inputs(cfg, input, targets, row_scale)?;
    let t = read_targets(cfg, input, targets)?;
    let acc = accumulation_dtype(input.dtype());
    let rows = input.dim(0)?;
    let scale = match row_scale {
        Some(r) => r.to_dtype(acc)?,
        None => fixed_row_scale(cfg, rows, input)?,
    };
    let m = margins.to_dtype(acc)?;
    let column = |v: f64| Tensor::full(v, (rows, 1), input.device())?.to_dtype(acc);
    let m123 = match cfg.head {
        Head::CosFace { .. } => Tensor::cat(&[&column(1.0)?, &column(0.0)?, &m.unsqueeze(1)?], 1)?,
        Head::ArcFace { .. } => Tensor::cat(&[&column(1.0)?, &m.unsqueeze(1)?, &column(0.0)?], 1)?,
        _ => m,
    };
    loss_impl(cfg, input, &t, &scale, Some(&m123))
}

/// The unscaled target logit u_y [B, 1] from the target's input `x_y` [B, 1] and the rows'
/// margins `m123` [B, 3].
pub(super) fn target_logit(cfg: &MarginSoftmaxLoss, x_y: &Tensor, m123: &Tensor) -> Result<Tensor> {
    let c = clamp_torch(x_y, -1.0, 1.0)?;
    let cd = c.detach();
    let (m1, m2, m3) = (
        m123.narrow(1, 0, 1)?,
        m123.narrow(1, 1, 1)?,
        m123.narrow(1, 2, 1)?,
    );
    let easy_margin = match cfg.head {
        Head::CosFace { .. } => return (&cd - &m3)? + (&c - &cd)?,
        Head::ArcFace { easy_margin, .. } => easy_margin,
        Head::Combined { .. } => false,
        _ => candle_core::bail!("per-row margins need the CosFace, ArcFace or Combined head"),
    };
    let theta0 =
        Tensor::from_vec(acos_host(&cd)?, cd.shape(), cd.device())?.to_dtype(cd.dtype())?;
    let angular = ((m1.mul(&theta0)? + &m2)?.cos()? - &m3)?;
    // Branches on detached values: the easy margin keeps c where c ≤ 0; otherwise the
    // fallback where m1·θ + m2 > π.
    let (on_angular, other) = if easy_margin {
        (cd.gt(0.0)?, cd.clone())
    } else {
        let angle = (m1.detach().mul(&theta0)? + m2.detach())?;
        let fallback = ((&cd - &m3)? - m2.mul(&m2.sin()?)?)?;
        (angle.le(PI)?, fallback)
    };
    let value = on_angular.where_cond(&angular, &other)?;
    let slope = match cfg.margin_grad {
        MarginGrad::Detached => c.clone(),
        MarginGrad::Exact => {
            let floor = exact_sin_floor();
            let inv_denominator = theta0.sin()?.maximum(floor)?.recip()?;
            let theta = (&theta0 + (theta0.cos()? - &c)?.mul(&inv_denominator)?)?;
            let exact = (m1.detach().mul(&theta)? + m2.detach())?.cos()?;
            on_angular.where_cond(&exact, &c)?
        }
    };
    // The value (attached to the margins), plus a value-0 carrier of the derivative by c.
    value + (&slope - slope.detach())?
}
