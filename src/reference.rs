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
use crate::prepare::validate_targets;

/// The loss of `input` \[B, C\] against `targets` \[B\] with the head's fixed scale s, composed from
/// plain candle ops; gradients by candle autograd. Same contract as [`MarginSoftmaxLoss::loss`].
pub fn loss(cfg: &MarginSoftmaxLoss, input: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_inputs(cfg, input, targets, None)?;
    let t = read_targets(cfg, input, targets)?;
    let scale = fixed_row_scale(cfg, input.dim(0)?, input)?;
    loss_impl(cfg, input, &t, &scale)
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
    loss_impl(cfg, input, &t, &scale)
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
    soft_cap(cfg, head_logits(cfg, &input.to_dtype(acc)?, &scale, &t)?)
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
/// ([`crate::prepare::validate_targets`]), so both reject the same values with the same error.
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
fn head_logits(cfg: &MarginSoftmaxLoss, x: &Tensor, scale: &Tensor, t: &Targets) -> Result<Tensor> {
    let (rows, classes) = x.dims2()?;
    let u = match cfg.head {
        Head::Softmax { .. } => x.clone(),
        Head::Rbf { gamma, .. } => (clamp_min0_torch(x)? * (-1.0 / gamma))?.exp()?,
        _ => {
            let c = clamp_torch(x, -1.0, 1.0)?;
            let u_y = target_logit(cfg, &x.gather(&t.gather_index, 1)?)?;
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

fn loss_impl(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    t: &Targets,
    scale: &Tensor,
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
    let z = soft_cap(cfg, head_logits(cfg, &x, &scale, t)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn softmax_matches_candle_nn_cross_entropy() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[
                [1.5f64, -0.3, 0.2, 2.0],
                [0.1, 0.0, -1.0, 0.4],
                [3.0, -2.0, 0.5, 0.5],
            ],
            &dev,
        )?;
        let y = Tensor::new(&[3u32, 0, 2], &dev)?;
        let cfg = MarginSoftmaxLoss::new(Head::softmax());
        let ours = scalar(&loss(&cfg, &x, &y)?);
        let theirs = scalar(&candle_nn::loss::cross_entropy(&x, &y)?);
        assert!((ours - theirs).abs() < 1e-12, "{ours} vs {theirs}");
        Ok(())
    }

    #[test]
    fn arcface_hand_computed() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.6f64, 0.2]], &dev)?;
        let y = Tensor::new(&[0i64], &dev)?;
        let head = Head::ArcFace {
            s: 1.0,
            m: 0.5,
            easy_margin: false,
        };
        let cfg = MarginSoftmaxLoss::new(head);
        let z0 = (0.6f64.acos() + 0.5).cos();
        let lse = (z0.exp() + 0.2f64.exp()).ln();
        let got = scalar(&loss(&cfg, &x, &y)?);
        assert!((got - (lse - z0)).abs() < 1e-12, "{got} vs {}", lse - z0);
        let z = logits(&cfg, &x, &y, None)?.to_vec2::<f64>()?;
        assert!((z[0][0] - z0).abs() < 1e-14 && z[0][1] == 0.2);
        Ok(())
    }

    /// Central finite differences of the reference against its autograd gradient.
    fn check_grad(
        cfg: &MarginSoftmaxLoss,
        x: &[f64],
        shape: (usize, usize),
        y: &Tensor,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::from_vec(x.to_vec(), shape, &dev)?)?;
        let l = loss(cfg, var.as_tensor(), y)?;
        let grads = l.backward()?;
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..x.len() {
            let mut xp = x.to_vec();
            let mut xm = x.to_vec();
            xp[i] += h;
            xm[i] -= h;
            let lp = scalar(&loss(cfg, &Tensor::from_vec(xp, shape, &dev)?, y)?);
            let lm = scalar(&loss(cfg, &Tensor::from_vec(xm, shape, &dev)?, y)?);
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "element {i}: finite difference {fd} vs autograd {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = [
            0.61, -0.2, 0.33, 0.05, -0.7, //
            0.12, 0.85, -0.4, 0.3, 0.2, //
            -0.9, 0.1, 0.15, 0.42, 0.97,
        ];
        let y = Tensor::new(&[0u32, 1, 4], &Device::Cpu)?;
        let head = Head::ArcFace {
            s: 4.0,
            m: 0.5,
            easy_margin: false,
        };
        let cfg = MarginSoftmaxLoss::new(head)
            .label_smoothing(0.1)
            .focal_gamma(2.0)
            .poly(&[1.0, 0.5]);
        check_grad(&cfg, &x, (3, 5), &y)?;
        // The other cosine heads, with z-loss and a sum reduction.
        for head in [
            Head::Combined {
                s: 4.0,
                m1: 1.1,
                m2: 0.3,
                m3: 0.2,
            },
            Head::CosFace { s: 4.0, m: 0.35 },
            Head::SphereFace {
                s: 4.0,
                m: 4.0,
                lambda: 2.0,
            },
        ] {
            let cfg = MarginSoftmaxLoss::new(head)
                .z_loss(0.01)
                .reduction(Reduction::Sum);
            check_grad(&cfg, &x, (3, 5), &y)?;
        }
        Ok(())
    }

    #[test]
    fn all_ignored_and_empty_give_zero() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        let x = Var::from_tensor(&Tensor::new(&[[0.3f32, f32::NAN], [0.1, 0.2]], &dev)?)?;
        let y = Tensor::new(&[-100i64, -100], &dev)?;
        let l = loss(&cfg, x.as_tensor(), &y)?;
        assert_eq!(l.dtype(), DType::F32);
        assert_eq!(scalar(&l), 0.0);
        let g = l
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(g.iter().all(|&v| v == 0.0), "{g:?}");

        let empty = Tensor::zeros((0, 3), DType::F32, &dev)?;
        let y = Tensor::zeros(0, DType::U32, &dev)?;
        assert_eq!(scalar(&loss(&cfg, &empty, &y)?), 0.0);
        let none = cfg.clone().reduction(Reduction::None);
        assert_eq!(loss(&none, &empty, &y)?.dims(), &[0]);
        Ok(())
    }

    /// The target logit of every margin head against scalar f64 formulas (with acos), over
    /// cosines that cover both branches, the clamps and the out-of-range inputs.
    #[test]
    fn target_logits_match_scalar_formulas() -> Result<()> {
        use std::f64::consts::PI;
        let dev = Device::Cpu;
        let cs: [f64; 16] = [
            -1.3, -1.0, -0.999, -0.95, -0.9, -0.6, -0.3, -1e-3, 0.0, 0.2, 0.5, 0.7, 0.9, 0.99999,
            1.0, 1.2,
        ];
        let x = Tensor::from_vec(cs.to_vec(), (cs.len(), 1), &dev)?;
        let y = Tensor::zeros(cs.len(), DType::U32, &dev)?;
        let arc = |c: f64, m: f64, easy: bool| {
            let phi = (c.acos() + m).cos();
            if easy {
                if c > 0.0 { phi } else { c }
            } else if c > (PI - m).cos() {
                phi
            } else {
                c - m * m.sin()
            }
        };
        let comb = |c: f64, m1: f64, m2: f64, m3: f64| {
            let t = c.acos();
            if m1 * t + m2 <= PI {
                (m1 * t + m2).cos() - m3
            } else {
                c - m3 - m2 * m2.sin()
            }
        };
        let sphere = |c: f64, m: f64, lambda: f64| {
            let t = c.acos();
            let k = ((m * t / PI).floor()).min(m - 1.0);
            let psi = (-1f64).powi(k as i32) * (m * t).cos() - 2.0 * k;
            (lambda * c + psi) / (1.0 + lambda)
        };
        type F = Box<dyn Fn(f64) -> f64>;
        let cases: Vec<(Head, F, bool)> = vec![
            (
                Head::CosFace { s: 1.0, m: 0.35 },
                Box::new(|c| c - 0.35),
                false,
            ),
            (
                Head::ArcFace {
                    s: 1.0,
                    m: 0.5,
                    easy_margin: false,
                },
                Box::new(move |c| arc(c, 0.5, false)),
                true,
            ),
            (
                Head::ArcFace {
                    s: 1.0,
                    m: 0.5,
                    easy_margin: true,
                },
                Box::new(move |c| arc(c, 0.5, true)),
                true,
            ),
            (
                Head::ArcFace {
                    s: 1.0,
                    m: 2.9,
                    easy_margin: false,
                },
                Box::new(move |c| arc(c, 2.9, false)),
                true,
            ),
            (
                Head::Combined {
                    s: 1.0,
                    m1: 1.0,
                    m2: 0.3,
                    m3: 0.2,
                },
                Box::new(move |c| comb(c, 1.0, 0.3, 0.2)),
                true,
            ),
            (
                Head::Combined {
                    s: 1.0,
                    m1: 1.35,
                    m2: 0.5,
                    m3: 0.1,
                },
                Box::new(move |c| comb(c, 1.35, 0.5, 0.1)),
                true,
            ),
            (
                Head::SphereFace {
                    s: 1.0,
                    m: 4.0,
                    lambda: 5.0,
                },
                Box::new(move |c| sphere(c, 4.0, 5.0)),
                false,
            ),
            (
                Head::SphereFace {
                    s: 1.0,
                    m: 3.0,
                    lambda: 0.0,
                },
                Box::new(move |c| sphere(c, 3.0, 0.0)),
                false,
            ),
            (
                Head::SphereFace {
                    s: 1.0,
                    m: 1.0,
                    lambda: 1.0,
                },
                Box::new(move |c| sphere(c, 1.0, 1.0)),
                false,
            ),
        ];
        // Both gradient modes give the paper's value, unclamped (only the derivative is bounded).
        for (head, f, _) in cases {
            for mode in [MarginGrad::Exact, MarginGrad::Detached] {
                let cfg = MarginSoftmaxLoss::new(head).margin_grad(mode);
                let z = logits(&cfg, &x, &y, None)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                for (&c, &got) in cs.iter().zip(&z) {
                    let want = f(c.clamp(-1.0, 1.0));
                    assert!(
                        (got - want).abs() < 1e-12,
                        "{head:?} {mode:?} c={c}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Gradients at the clamp ties pass (PyTorch semantics), are 0 strictly outside, and the
    /// detached margin has derivative 1.
    #[test]
    fn clamp_ties_and_detached_margin_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let s = 2.0;
        let y = Tensor::new(&[1u32], &dev)?;
        let xs = [1.0f64, 0.3, -1.0, 1.5, -0.5];
        for (head, mode) in [
            (Head::CosFace { s, m: 0.35 }, MarginGrad::Exact),
            (
                Head::ArcFace {
                    s,
                    m: 0.5,
                    easy_margin: false,
                },
                MarginGrad::Detached,
            ),
            (
                Head::Combined {
                    s,
                    m1: 1.2,
                    m2: 0.3,
                    m3: 0.2,
                },
                MarginGrad::Detached,
            ),
        ] {
            let cfg = MarginSoftmaxLoss::new(head).margin_grad(mode);
            let x = Var::from_tensor(&Tensor::new(&[xs], &dev)?)?;
            let l = loss(&cfg, x.as_tensor(), &y)?;
            let g = l
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f64>()?;
            let z = logits(&cfg, x.as_tensor(), &y, None)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            for j in 0..xs.len() {
                let p = (z[j] - lse).exp();
                let want = if j == 3 {
                    0.0
                } else if j == 1 {
                    s * (p - 1.0)
                } else {
                    s * p
                };
                assert!(
                    (g[j] - want).abs() < 1e-12,
                    "{head:?} col {j}: {} vs {want}",
                    g[j]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn row_scale_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[[0.5f64, -0.2, 0.1], [0.3, 0.9, -0.8], [0.0, 0.2, 0.4]],
            &dev,
        )?;
        let y = Tensor::new(&[0i64, 2, -100], &dev)?;
        let cfg = MarginSoftmaxLoss::new(Head::sphereface(3.0))
            .label_smoothing(0.05)
            .z_loss(0.1);
        let r0 = [2.0f64, 3.5, 1.2];
        let r = Var::from_tensor(&Tensor::new(&r0, &dev)?)?;
        let l = loss_with_row_scale(&cfg, &x, &y, r.as_tensor())?;
        let g = l.backward()?.get(r.as_tensor()).unwrap().to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..3 {
            let (mut rp, mut rm) = (r0, r0);
            rp[i] += h;
            rm[i] -= h;
            let lp = scalar(&loss_with_row_scale(
                &cfg,
                &x,
                &y,
                &Tensor::new(&rp, &dev)?,
            )?);
            let lm = scalar(&loss_with_row_scale(
                &cfg,
                &x,
                &y,
                &Tensor::new(&rm, &dev)?,
            )?);
            let fd = (lp - lm) / (2.0 * h);
            assert!((fd - g[i]).abs() < 1e-6, "row {i}: {fd} vs {}", g[i]);
        }
        assert_eq!(g[2], 0.0);
        Ok(())
    }

    #[test]
    fn half_input_and_weighted_mean() -> Result<()> {
        let dev = Device::Cpu;
        let v = [[0.9f64, 0.1, -0.3], [0.2, 0.7, 0.05], [0.4, -0.1, 0.3]];
        let y = Tensor::new(&[0u32, 1, 2], &dev)?;
        let w = Tensor::new(&[1.0f32, 2.0, 0.5], &dev)?;
        let cfg = MarginSoftmaxLoss::new(Head::arcface())
            .class_weights(w)?
            .focal_gamma(1.5);
        let x64 = Tensor::new(&v, &dev)?;
        let per_row = loss(&cfg.clone().reduction(Reduction::None), &x64, &y)?.to_vec1::<f64>()?;
        let want = (per_row[0] + per_row[1] + per_row[2]) / 3.5;
        assert!((scalar(&loss(&cfg, &x64, &y)?) - want).abs() < 1e-12);
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let x = Var::from_tensor(&x64.to_dtype(dt)?)?;
            let l = loss(&cfg, x.as_tensor(), &y)?;
            assert_eq!(l.dtype(), DType::F32);
            // Compare with the f64 loss of the rounded input.
            let exact = scalar(&loss(&cfg, &x.as_tensor().to_dtype(DType::F64)?, &y)?);
            assert!(
                (scalar(&l) - exact).abs() < 1e-4 * exact.abs().max(1.0),
                "{dt:?}"
            );
            let g = l.backward()?;
            assert_eq!(g.get(x.as_tensor()).unwrap().dtype(), dt);
        }
        Ok(())
    }

    #[test]
    fn bad_target_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = MarginSoftmaxLoss::new(Head::cosface());
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let err = loss(&cfg, &x, &Tensor::new(&[0i64, 3], &dev)?)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("margin_softmax_ce(cosface): "), "{err}");
        assert!(err.contains("row 1") && err.contains('3'), "{err}");
        assert!(loss(&cfg, &x, &Tensor::new(&[-1i64, 0], &dev)?).is_err());
        Ok(())
    }
}
