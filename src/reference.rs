//! The losses composed from plain candle tensor ops: the test oracle for the fused op.
//!
//! Everything here is deliberately unfused and simple: the head and the criterion are written
//! as a chain of ordinary candle ops (`where_cond`, `gather`, `exp`, `log`, `powf`, ...), and
//! every gradient comes from candle's autograd (`loss.backward()`), with no `CustomOp` and no
//! hand-written derivative. It is slow (many [B, C] temporaries) and is meant for tests and
//! for reading, not for training. It computes what [`MarginSoftmaxLoss::loss`] promises:
//!
//! - Accumulation dtype: f32 for f32 / f16 / bf16 input (the input is upcast first with the
//!   differentiable `to_dtype`, so nothing is exponentiated in half precision), f64 for f64.
//!   The loss comes back in that dtype; the gradient reaching `input` has the input's dtype.
//! - Clamps follow PyTorch's `clamp`: the gradient passes where `lo <= x <= hi` (ties included)
//!   and is 0 strictly outside. candle's own `clamp` (max then min) halves the gradient at a tie,
//!   so [`clamp_torch`] is built from `where_cond` instead.
//! - `acos`: candle has no `acos`. The Combined head needs θ = acos(c), so θ0 = acos(c) is
//!   computed on the host from detached values (f64 `acos`), then made differentiable with one
//!   Newton step on cos θ = c taken from the detached θ0:
//!   θ = θ0 + (cos θ0 − c) / sin θ0. Its value is θ0 (up to rounding of a ~0 correction) and
//!   autograd gives dθ/dc = −1 / sin θ0, the true derivative of acos. In `Exact` mode the target
//!   cosine is clamped to ±(1 − [`EXACT_MARGIN_COS_EPS`]) first, so sin θ0 > 0. In `Detached` mode
//!   the margin is a constant (no gradient through it) and θ0 is used as is.
//! - SphereFace needs no `acos`: cos(mθ) = T_m(c) by the Chebyshev recurrence, and
//!   k = ⌊mθ/π⌋ = #{ j ∈ 1..m−1 : c ≤ cos(jπ/m) } from comparisons.
//! - Branch masks (ArcFace / Combined fallback, easy margin, SphereFace k) are taken on detached
//!   values; the value of the chosen branch carries the gradient.
//! - Ignored rows (target == `ignore_index`): their input is replaced by 0 (and their row scale
//!   by 1) with `where_cond` before the head, and their loss by 0 with `where_cond` after the
//!   criterion, so their gradient is exactly 0 and no NaN / inf in an ignored row can leak into
//!   the gradient (`0 · NaN = NaN` would, with a multiplicative mask).
//!
//! Known limitation (shared by the naive formula, not by the fused op): with focal γ < 1, a row
//! whose p_t rounds to exactly 1 gets a NaN gradient from `powf` (0^(γ−1) = ∞).

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{
    EXACT_MARGIN_COS_EPS, Head, MarginGrad, MarginSoftmaxLoss, Reduction, accumulation_dtype,
};
use crate::loss::{check_inputs, fixed_row_scale};
use crate::prepare::validate_targets;

/// The loss of `input` [B, C] against `targets` [B] with the head's fixed scale s, composed from
/// plain candle ops; gradients by candle autograd. Same contract as [`MarginSoftmaxLoss::loss`].
pub fn loss(cfg: &MarginSoftmaxLoss, input: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_inputs(cfg, input, targets, None)?;
    let t = read_targets(cfg, input, targets)?;
    let scale = fixed_row_scale(cfg, input.dim(0)?, input)?;
    loss_impl(cfg, input, &t, &scale)
}

/// As [`loss`], with a per-row scale r [B] (any float dtype) in place of s: z_ij = r_i·u_ij.
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

/// The logits z [B, C] (accumulation dtype) the head produces from `input`, with the margin on
/// each row's target column, scaled by s (or by `row_scale` when given). For inspection and tests.
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
    head_logits(cfg, &input.to_dtype(acc)?, &scale, &t)
}

/// The validated targets, as device tensors.
struct Targets {
    /// [B, 1] i64: the target, or 0 (a safe index) for ignored rows. For `gather`.
    gather_index: Tensor,
    /// [B, 1] i64: the target, or −1 (matches no column) for ignored rows. For the margin mask.
    mask_index: Tensor,
    /// [B] u8: 1 for rows that are not ignored.
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

/// `acos` of a tensor, computed on the host from detached values. With `differentiable`, one
/// Newton step on cos θ = c from the detached θ0 gives the value θ0 and the gradient
/// dθ/dc = −1/sin θ0 (requires sin θ0 ≠ 0, i.e. |c| < 1). Also returns θ0 on the host (f64).
fn acos(c: &Tensor, differentiable: bool) -> Result<(Tensor, Vec<f64>)> {
    let values = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let theta0_host: Vec<f64> = values.iter().map(|v| v.acos()).collect();
    let theta0 =
        Tensor::from_vec(theta0_host.clone(), c.shape(), c.device())?.to_dtype(c.dtype())?;
    let theta = if differentiable {
        // θ = θ0 + (cos θ0 − c) / sin θ0, θ0 constant.
        (&theta0 + (theta0.cos()? - c)?.div(&theta0.sin()?)?)?
    } else {
        theta0
    };
    Ok((theta, theta0_host))
}

/// The margin function φ(c): the unscaled target logit u_y of a cosine head as a function of the
/// (already clamped) target cosine `c` [B, 1]. With `differentiable = false`, `c` is detached
/// and so is the result.
fn margin(head: &Head, c: &Tensor, differentiable: bool) -> Result<Tensor> {
    use std::f64::consts::PI;
    match *head {
        Head::CosFace { m, .. } => c - m,
        Head::ArcFace { m, easy_margin, .. } => {
            // cos(θ + m) = c·cos m − sin θ·sin m, sin θ = sqrt(1 − c²) (θ ∈ [0, π]).
            let sin_theta = (1.0 - c.sqr()?)?.sqrt()?;
            let phi = ((c * m.cos())? - (sin_theta * m.sin())?)?;
            if easy_margin {
                c.detach().gt(0.0)?.where_cond(&phi, c)
            } else {
                let fallback = (c - m * m.sin())?;
                c.detach().gt((PI - m).cos())?.where_cond(&phi, &fallback)
            }
        }
        Head::Combined { m1, m2, m3, .. } => {
            let (theta, theta0) = acos(c, differentiable)?;
            let phi = ((theta * m1)? + m2)?.cos()? - m3;
            let fallback = (c - (m3 + m2 * m2.sin()))?;
            let in_range: Vec<u8> = theta0.iter().map(|t| u8::from(m1 * t + m2 <= PI)).collect();
            let in_range = Tensor::from_vec(in_range, c.shape(), c.device())?;
            in_range.where_cond(&phi?, &fallback)
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

/// The unscaled target logit u_y [B, 1] from the target's input value `x_y` [B, 1].
fn target_logit(cfg: &MarginSoftmaxLoss, x_y: &Tensor) -> Result<Tensor> {
    let head = &cfg.head;
    match cfg.margin_grad {
        MarginGrad::Exact => match head {
            Head::ArcFace { .. } | Head::Combined { .. } => {
                let eps = EXACT_MARGIN_COS_EPS;
                margin(head, &clamp_torch(x_y, -1.0 + eps, 1.0 - eps)?, true)
            }
            _ => margin(head, &clamp_torch(x_y, -1.0, 1.0)?, true),
        },
        MarginGrad::Detached => {
            // Exact forward value, φ'(c) = 1 in backward: c + (φ(c) − c), the bracket constant.
            let c = clamp_torch(x_y, -1.0, 1.0)?;
            let shift = (margin(head, &c.detach(), false)? - c.detach())?;
            c + shift.detach()
        }
    }
}

/// The head: z [B, C] = scale_i · u_ij, with the margin on the target column of valid rows.
/// `x` is already in the accumulation dtype; `scale` is [B].
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

/// The per-row loss ℓ [B] from the logits z [B, C]: ignored rows are NOT zeroed here.
fn criterion(cfg: &MarginSoftmaxLoss, z: &Tensor, t: &Targets) -> Result<Tensor> {
    let classes = z.dim(1)?;
    let eps = cfg.label_smoothing;
    // lse, stable: subtract the detached row max.
    // (candle's max rejects an empty tensor; B = 0 has no rows to stabilise.)
    let max = if z.dim(0)? == 0 {
        Tensor::zeros((0, 1), z.dtype(), z.device())?
    } else {
        z.max_keepdim(1)?.detach()
    };
    let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?.squeeze(1)?;
    let z_y = z.gather(&t.gather_index, 1)?.squeeze(1)?;
    let p_y = (&z_y - &lse)?.exp()?; // exp(log p_y)
    let sum_z = z.sum(1)?;
    let ce = ((&lse - (&z_y * (1.0 - eps))?)? - (sum_z * (eps / classes as f64))?)?;
    let p_t = ((p_y * (1.0 - eps))? + eps / classes as f64)?;
    let omp = (1.0 - p_t)?.relu()?;
    let gamma = cfg.focal_gamma;
    let mut row = if gamma == 0.0 {
        ce
    } else {
        omp.powf(gamma)?.mul(&ce)?
    };
    for (i, &coef) in cfg.poly.iter().enumerate() {
        let k = (i + 1) as f64;
        row = (row + (omp.powf(k + gamma)? * coef)?)?;
    }
    if cfg.z_loss != 0.0 {
        row = (row + (lse.sqr()? * cfg.z_loss)?)?;
    }
    Ok(row)
}

/// w_{y_i} [B] (accumulation dtype, constant): the class weight of each row's target, 1 without
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
            .detach()
            .to_dtype(acc)?
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
    let z = head_logits(cfg, &x, &scale, t)?;
    let w_y = target_weights(cfg, t, acc, dev)?;
    let row = (criterion(cfg, &z, t)? * &w_y)?;
    let zeros = row.zeros_like()?;
    let row = t.valid.where_cond(&row, &zeros)?;
    match cfg.reduction {
        Reduction::None => Ok(row),
        Reduction::Sum => row.sum_all(),
        Reduction::Mean => {
            // Σ w_y over rows not ignored; 0 (empty or all ignored) divides by 1 instead.
            let denominator = t.valid.where_cond(&w_y, &zeros)?.sum_all()?;
            let is_zero = denominator.eq(0.0)?.to_dtype(acc)?;
            row.sum_all()? / (denominator + is_zero)?
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
        let eps = EXACT_MARGIN_COS_EPS;
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
        for (head, f, eps_clamp) in cases {
            for mode in [MarginGrad::Exact, MarginGrad::Detached] {
                let cfg = MarginSoftmaxLoss::new(head).margin_grad(mode);
                let z = logits(&cfg, &x, &y, None)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                for (&c, &got) in cs.iter().zip(&z) {
                    let e = if eps_clamp && mode == MarginGrad::Exact {
                        eps
                    } else {
                        0.0
                    };
                    let want = f(c.clamp(-1.0 + e, 1.0 - e));
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
            .class_weights(w)
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
