//! The losses composed from plain candle tensor ops: the test oracle for the fused op.
//!
//! Everything here is deliberately unfused and simple: the head and the criterion are written
//! as a chain of ordinary candle ops (`where_cond`, `gather`, `exp`, `log`, `powf`, ...), and
//! every gradient comes from candle's autograd (`loss.backward()`), with no `CustomOp` and no
//! hand-written derivative. It is slow (many \[B, C\] temporaries) and is meant for tests and
//! for reading, not for training. It computes what [`MarginSoftmaxLoss::loss`] promises:
//!
//! - Accumulation dtype: f32 for f32 / f16 / bf16 input (the input is upcast first with the
//!   differentiable `to_dtype`, so nothing is exponentiated in half precision), f64 for f64.
//!   The loss comes back in that dtype; the gradient reaching `input` has the input's dtype.
//! - Clamps follow PyTorch's `clamp`: the gradient passes where `lo <= x <= hi` (ties included)
//!   and is 0 strictly outside. candle's own `clamp` (max then min) halves the gradient at a tie,
//!   so `clamp_torch` is built from `where_cond` instead.
//! - `acos`: candle has no `acos`. θ0 = acos(c) is computed on the host from detached values
//!   (f64 `acos`), so the margin functions' values are computed from detached cosines (ArcFace
//!   by the identity cos(θ + m) = c·cos m − sin θ·sin m, Combined from θ0), the same value in
//!   both gradient modes. Their gradient is attached by a value-0 carrier g(c) − g(c).detach():
//!   `Detached` mode takes g(c) = c (φ'(c) = 1); `Exact` mode takes, on the angular branch,
//!   g(c) = cos(m1·θ + m2) with θ = θ0 + (cos θ0 − c)/max(sin θ0, sin θ_ε), one Newton step on
//!   cos θ = c from the constant θ0, whose derivative autograd finds to be
//!   m1·sin(m1·θ + m2)/max(sin θ, sin θ_ε): the spec's bounded derivative, the forward untouched.
//! - SphereFace needs no `acos`: cos(mθ) = T_m(c) by the Chebyshev recurrence, and
//!   k = ⌊mθ/π⌋ = #{ j ∈ 1..m−1 : c ≤ cos(jπ/m) } from comparisons.
//! - Branch masks (ArcFace / Combined fallback, easy margin, SphereFace k) are taken on detached
//!   values; the value of the chosen branch carries the gradient.
//! - Ignored rows (target == `ignore_index`): their input is replaced by 0 (and their row scale
//!   by 1) with `where_cond` before the head, and their loss by 0 with `where_cond` after the
//!   criterion, so their gradient is exactly 0 and no NaN / inf in an ignored row can leak into
//!   the gradient (`0 · NaN = NaN` would, with a multiplicative mask).
//!
//! - The criterion is PyTorch's composition, literally: log p = z − lse, the weighted NLL
//!   −w_y·log p_y, the smoothing term −Σ_j w_j·log p_j, combined as
//!   (1 − ε)·NLL + (ε/C)·smoothing (`F.cross_entropy(weight=w, label_smoothing=ε)`), then the
//!   focal factor on it and w_y·(Poly + z-loss) added.
//! - Soft-capping z ← cap·tanh(z/cap) with candle's `tanh` (whose backward is 1 − tanh²).
//!
//! Known limitations (shared by the naive formulas, not by the fused op): with focal γ < 1, a
//! row whose p_t rounds to exactly 1 gets a NaN gradient from `powf` (0^(γ−1) = ∞); a −∞ logit
//! makes the smoothing term (and the focal gradient) NaN, as in PyTorch.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{Head, MarginGrad, MarginSoftmaxLoss, Reduction, accumulation_dtype};
use crate::loss::{check_inputs, fixed_row_scale, mean_of_sum};
use crate::math::exact_sin_floor;
use crate::targets_and_weights::validate_targets;

/// The loss of `input` \[B, C\] against `targets` \[B\] with the head's fixed scale s, composed from
/// plain candle ops; gradients by candle autograd. Same contract as [`MarginSoftmaxLoss::loss`].
pub fn loss(cfg: &MarginSoftmaxLoss, input: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_inputs(cfg, input, targets, None)?;
    let t = read_targets(cfg, input, targets)?;
    let scale = fixed_row_scale(cfg, input.dim(0)?, input)?;
    loss_impl(cfg, input, &t, &scale, None)
}

/// As [`loss`], with a per-row scale r \[B\] (any float dtype) in place of s: z_ij = r_i·u_ij.
/// Differentiable with respect to `input` and `row_scale`. Same contract as
/// [`MarginSoftmaxLoss::loss_with_row_scale`].
pub fn loss_with_row_scale(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: &Tensor,
) -> Result<Tensor> {
    check_inputs(cfg, input, targets, Some(row_scale))?;
    let t = read_targets(cfg, input, targets)?;
    let scale = row_scale.to_dtype(accumulation_dtype(input.dtype()))?;
    loss_impl(cfg, input, &t, &scale, None)
}

/// The logits z \[B, C\] (accumulation dtype) the head produces from `input`, with the margin on
/// each row's target column, scaled by s (or by `row_scale` when given), soft-capped when the
/// loss has `logit_softcap`: what the criterion sees. For inspection and tests.
/// Rows whose target is `ignore_index` get no margin (every column is treated as a non-target),
/// and their input is used as is.
pub fn logits(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
) -> Result<Tensor> {
    check_inputs(cfg, input, targets, row_scale)?;
    let t = read_targets(cfg, input, targets)?;
    let acc = accumulation_dtype(input.dtype());
    let scale = match row_scale {
        Some(r) => r.to_dtype(acc)?,
        None => fixed_row_scale(cfg, input.dim(0)?, input)?,
    };
    soft_cap(
        cfg,
        head_logits(cfg, &input.to_dtype(acc)?, &scale, &t, None)?,
    )
}

/// The validated targets, as device tensors.
struct Targets {
    /// [B, 1] i64: the target, or 0 (a safe index) for ignored rows. For `gather`.
    gather_index: Tensor,
    /// [B, 1] i64: the target, or −1 (matches no column) for ignored rows. For the margin mask.
    mask_index: Tensor,
    /// \[B\] u8: 1 for rows that are not ignored.
    valid: Tensor,
}

/// Reads the targets to the host and checks them with the op's own check
/// ([`crate::targets_and_weights::validate_targets`]), so both reject the same values with the same error.
fn read_targets(cfg: &MarginSoftmaxLoss, input: &Tensor, targets: &Tensor) -> Result<Targets> {
    let (rows, classes) = input.dims2()?;
    let values = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let checked = validate_targets(&values, cfg, classes)?;
    let gather: Vec<i64> = checked.iter().map(|t| t.map_or(0, |y| y as i64)).collect();
    let mask: Vec<i64> = checked.iter().map(|t| t.map_or(-1, |y| y as i64)).collect();
    let valid: Vec<u8> = checked.iter().map(|t| u8::from(t.is_some())).collect();
    let dev = input.device();
    Ok(Targets {
        gather_index: Tensor::from_vec(gather, (rows, 1), dev)?,
        mask_index: Tensor::from_vec(mask, (rows, 1), dev)?,
        valid: Tensor::from_vec(valid, rows, dev)?,
    })
}

/// PyTorch's `clamp`: value clamped to [lo, hi]; gradient 1 where lo <= x <= hi, 0 outside.
fn clamp_torch(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let inside = x.ge(lo)?.mul(&x.le(hi)?)?;
    inside.where_cond(x, &x.clamp(lo, hi)?.detach())
}

/// PyTorch's `clamp(min = 0)`: gradient 1 where x >= 0, 0 below.
fn clamp_min0_torch(x: &Tensor) -> Result<Tensor> {
    x.ge(0.0)?.where_cond(x, &x.zeros_like()?)
}

/// θ0 = acos(c) of a detached tensor, on the host (f64).
fn acos_host(c: &Tensor) -> Result<Vec<f64>> {
    let values = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(values.iter().map(|v| v.acos()).collect())
}

/// The margin function φ(c): the unscaled target logit u_y of a cosine head as a function of the
/// (already clamped) target cosine `c` [B, 1]. Differentiable only for CosFace and SphereFace
/// (whose formulas have bounded derivatives); ArcFace and Combined are computed from the
/// detached cosine, their gradient attached by the caller.
fn margin(head: &Head, c: &Tensor) -> Result<Tensor> {
    use std::f64::consts::PI;
    match *head {
        Head::CosFace { m, .. } => c - m,
        Head::ArcFace { m, easy_margin, .. } => {
            // cos(θ + m) = c·cos m − sin θ·sin m, sin θ = sqrt(1 − c²) (θ ∈ [0, π]).
            let c = c.detach();
            let sin_theta = (1.0 - c.sqr()?)?.relu()?.sqrt()?;
            let phi = ((&c * m.cos())? - (sin_theta * m.sin())?)?;
            let mask = angular_branch(head, &c)?;
            let other = if easy_margin {
                c.clone()
            } else {
                (&c - m * m.sin())?
            };
            mask.where_cond(&phi, &other)
        }
        Head::Combined { m1, m2, m3, .. } => {
            let c = c.detach();
            let theta0 = Tensor::from_vec(acos_host(&c)?, c.shape(), c.device())?;
            let phi = (((theta0 * m1)? + m2)?.cos()? - m3)?.to_dtype(c.dtype())?;
            let fallback = (&c - (m3 + m2 * m2.sin()))?;
            angular_branch(head, &c)?.where_cond(&phi, &fallback)
        }
        Head::SphereFace { m, lambda, .. } => {
            let m = m as usize;
            // T_m(c) = cos(mθ) by the Chebyshev recurrence.
            let mut t_prev = c.ones_like()?;
            let mut t_cur = c.clone();
            for _ in 1..m {
                let t_next = ((c * 2.0)?.mul(&t_cur)? - &t_prev)?;
                t_prev = t_cur;
                t_cur = t_next;
            }
            // k = ⌊mθ/π⌋ = #{j in 1..m−1 : c <= cos(jπ/m)}; (−1)^k as a product of ±1.
            let cd = c.detach();
            let mut k = c.zeros_like()?;
            let mut sign = c.ones_like()?;
            for j in 1..m {
                let hit = cd
                    .le((j as f64 * PI / m as f64).cos())?
                    .to_dtype(c.dtype())?;
                k = (k + &hit)?;
                sign = sign.mul(&(1.0 - (hit * 2.0)?)?)?;
            }
            let psi = (sign.mul(&t_cur)? - (k * 2.0)?)?;
            ((c * lambda)? + psi)? / (1.0 + lambda)
        }
        Head::Softmax { .. } | Head::Rbf { .. } => Ok(c.clone()),
    }
}

/// u8 [B, 1]: 1 where an ArcFace / Combined target cosine `c` (detached) is on the angular
/// branch cos(m1·θ + m2) − m3, 0 on the other one (the monotone fallback, or c itself for the
/// easy margin's c ≤ 0).
fn angular_branch(head: &Head, c: &Tensor) -> Result<Tensor> {
    use std::f64::consts::PI;
    match *head {
        Head::ArcFace {
            easy_margin: true, ..
        } => c.gt(0.0),
        Head::ArcFace { m, .. } => c.gt((PI - m).cos()),
        Head::Combined { m1, m2, .. } => {
            let in_range: Vec<u8> = acos_host(c)?
                .iter()
                .map(|t| u8::from(m1 * t + m2 <= PI))
                .collect();
            Tensor::from_vec(in_range, c.shape(), c.device())
        }
        _ => c.ones_like()?.to_dtype(DType::U8),
    }
}

/// g(c) whose derivative is the exact-mode derivative of an ArcFace / Combined target logit:
/// on the angular branch cos(m1·θ + m2) with θ = θ0 + (cos θ0 − c)/max(sin θ0, sin θ_ε) (θ0 and
/// the denominator constant), so dg/dc = m1·sin(m1·θ0 + m2)/max(sin θ0, sin θ_ε); elsewhere c.
fn exact_angular_slope(head: &Head, c: &Tensor) -> Result<Tensor> {
    let (m1, m2) = match *head {
        Head::ArcFace { m, .. } => (1.0, m),
        Head::Combined { m1, m2, .. } => (m1, m2),
        _ => return Ok(c.clone()),
    };
    let floor = exact_sin_floor();
    let theta0_host = acos_host(c)?;
    let inv_denominator: Vec<f64> = theta0_host
        .iter()
        .map(|t| 1.0 / t.sin().max(floor))
        .collect();
    let dtype = c.dtype();
    let theta0 = Tensor::from_vec(theta0_host, c.shape(), c.device())?.to_dtype(dtype)?;
    let inv_denominator =
        Tensor::from_vec(inv_denominator, c.shape(), c.device())?.to_dtype(dtype)?;
    let theta = (&theta0 + (theta0.cos()? - c)?.mul(&inv_denominator)?)?;
    let angular = ((theta * m1)? + m2)?.cos()?;
    angular_branch(head, &c.detach())?.where_cond(&angular, c)
}

/// The unscaled target logit u_y [B, 1] from the target's input value `x_y` [B, 1]: the same
/// value in both gradient modes.
fn target_logit(cfg: &MarginSoftmaxLoss, x_y: &Tensor) -> Result<Tensor> {
    let head = &cfg.head;
    let c = clamp_torch(x_y, -1.0, 1.0)?;
    match (cfg.margin_grad, head) {
        (MarginGrad::Exact, Head::ArcFace { .. } | Head::Combined { .. }) => {
            let g = exact_angular_slope(head, &c)?;
            margin(head, &c)? + (&g - g.detach())?
        }
        (MarginGrad::Exact, _) => margin(head, &c),
        (MarginGrad::Detached, _) => {
            // The forward value φ(c), with φ'(c) = 1 in backward.
            margin(head, &c.detach())?.detach() + (&c - c.detach())?
        }
    }
}

/// The head: z \[B, C\] = scale_i · u_ij, with the margin on the target column of valid rows.
/// `x` is already in the accumulation dtype; `scale` is \[B\].
fn head_logits(
    cfg: &MarginSoftmaxLoss,
    x: &Tensor,
    scale: &Tensor,
    t: &Targets,
    row_margins: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, classes) = x.dims2()?;
    let u = match cfg.head {
        Head::Softmax { .. } => x.clone(),
        Head::Rbf { gamma, .. } => (clamp_min0_torch(x)? * (-1.0 / gamma))?.exp()?,
        _ => {
            let c = clamp_torch(x, -1.0, 1.0)?;
            let x_y = x.gather(&t.gather_index, 1)?;
            let u_y = match row_margins {
                Some(m) => row_margins::target_logit(cfg, &x_y, m)?,
                None => target_logit(cfg, &x_y)?,
            };
            let cols = Tensor::arange(0i64, classes as i64, x.device())?.unsqueeze(0)?;
            let is_target = cols.broadcast_eq(&t.mask_index)?;
            is_target.where_cond(&u_y.broadcast_as((rows, classes))?, &c)?
        }
    };
    u.broadcast_mul(&scale.unsqueeze(1)?)
}

/// Soft-capping z ← cap·tanh(z/cap), when configured.
fn soft_cap(cfg: &MarginSoftmaxLoss, z: Tensor) -> Result<Tensor> {
    match cfg.logit_softcap {
        Some(cap) => (z / cap)?.tanh()? * cap,
        None => Ok(z),
    }
}

/// The per-row loss ℓ \[B\] from the logits z \[B, C\] and the row's target weight w_y \[B\] (1
/// without class weights): ignored rows are NOT zeroed here.
///
/// PyTorch's `cross_entropy(weight=w, label_smoothing=ε)` per row, composed as PyTorch composes
/// it: log p = z − lse; (1 − ε)·(−w_y·log p_y) + (ε/C)·(−Σ_j w_j·log p_j) (the smoothing term
/// only when ε > 0, as PyTorch skips it). Then the focal factor (1 − p_t)^γ on it, and
/// w_y·(Σ_k ε_k·(1 − p_t)^(k + γ) + λ_z·lse²), p_t = (1 − ε)·p_y + ε/C.
fn criterion(cfg: &MarginSoftmaxLoss, z: &Tensor, t: &Targets, w_y: &Tensor) -> Result<Tensor> {
    let classes = z.dim(1)?;
    let eps = cfg.label_smoothing;
    // lse, stable: subtract the detached row max.
    // (candle's max rejects an empty tensor; B = 0 has no rows to stabilise.)
    let max = if z.dim(0)? == 0 {
        Tensor::zeros((0, 1), z.dtype(), z.device())?
    } else {
        z.max_keepdim(1)?.detach()
    };
    let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let log_p = z.broadcast_sub(&lse)?;
    let lse = lse.squeeze(1)?;
    let log_p_y = log_p.gather(&t.gather_index, 1)?.squeeze(1)?;
    let nll = (log_p_y.neg()? * w_y)?;
    let ce = if eps > 0.0 {
        let weighted_log_p = match &cfg.class_weights {
            Some(w) => {
                let w = w
                    .tensor()
                    .detach()
                    .to_dtype(z.dtype())?
                    .to_device(z.device())?;
                log_p.broadcast_mul(&w.unsqueeze(0)?)?
            }
            None => log_p.clone(),
        };
        let smooth = weighted_log_p.sum(1)?.neg()?;
        ((nll * (1.0 - eps))? + (smooth * (eps / classes as f64))?)?
    } else {
        nll
    };
    let p_y = log_p_y.exp()?;
    let p_t = ((p_y * (1.0 - eps))? + eps / classes as f64)?;
    let omp = (1.0 - p_t)?.relu()?;
    let gamma = cfg.focal_gamma;
    let mut row = if gamma == 0.0 {
        ce
    } else {
        omp.powf(gamma)?.mul(&ce)?
    };
    let mut extra: Option<Tensor> = None;
    let mut add = |term: Tensor| -> Result<()> {
        extra = Some(match extra.take() {
            Some(e) => (e + term)?,
            None => term,
        });
        Ok(())
    };
    for (i, &coef) in cfg.poly.iter().enumerate() {
        let k = (i + 1) as f64;
        add((omp.powf(k + gamma)? * coef)?)?;
    }
    if cfg.z_loss != 0.0 {
        add((lse.sqr()? * cfg.z_loss)?)?;
    }
    if let Some(extra) = extra {
        row = (row + (extra * w_y)?)?;
    }
    Ok(row)
}

/// w_{y_i} \[B\] (accumulation dtype, constant): the class weight of each row's target, 1 without
/// class weights; ignored rows read class 0 (they are masked out by the callers).
fn target_weights(
    cfg: &MarginSoftmaxLoss,
    t: &Targets,
    acc: DType,
    dev: &Device,
) -> Result<Tensor> {
    let rows = t.valid.dim(0)?;
    match &cfg.class_weights {
        Some(w) => w
            .tensor()
            .detach()
            .to_dtype(acc)?
            .to_device(dev)?
            .gather(&t.gather_index.squeeze(1)?, 0),
        None => Tensor::ones(rows, acc, dev),
    }
}

/// The loss from the validated targets and the row scale; `row_margins`: per-row (m1, m2, m3)
/// [B, 3] in place of the head's margins.
fn loss_impl(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    t: &Targets,
    scale: &Tensor,
    row_margins: Option<&Tensor>,
) -> Result<Tensor> {
    let acc = accumulation_dtype(input.dtype());
    let dev = input.device();
    let (rows, classes) = input.dims2()?;
    let x = input.to_dtype(acc)?;
    // Ignored rows: input 0 and scale 1, so nothing non-finite is ever computed from them, and
    // `where_cond`'s backward sends them exactly 0.
    let valid_rc = t.valid.unsqueeze(1)?.broadcast_as((rows, classes))?;
    let x = valid_rc.where_cond(&x, &x.zeros_like()?)?;
    let scale = t.valid.where_cond(scale, &scale.ones_like()?)?;
    let z = soft_cap(cfg, head_logits(cfg, &x, &scale, t, row_margins)?)?;
    let w_y = target_weights(cfg, t, acc, dev)?;
    let row = criterion(cfg, &z, t, &w_y)?;
    let zeros = row.zeros_like()?;
    let row = t.valid.where_cond(&row, &zeros)?;
    match cfg.reduction {
        Reduction::None => Ok(row),
        Reduction::Sum => row.sum_all(),
        Reduction::Mean => {
            // Σ w_y over rows not ignored; a zero sum (empty, all ignored, or every target on a
            // zero-weight class) gives 0 and a zero gradient.
            let denominator = t.valid.where_cond(&w_y, &zeros)?.sum_all()?;
            mean_of_sum(&row.sum_all()?, &denominator)
        }
    }
}

mod row_margins;
pub use row_margins::loss_with_row_margins;

#[cfg(test)]
mod tests;
