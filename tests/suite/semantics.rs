//! The semantics of issue 8, each pinned by an oracle that does not share code with the op: the
//! PyTorch formula of class weights with label smoothing and the soft-capping formula written out
//! in f64 loops, the exact mode's forward equal to the detached mode's bit for bit, the −∞ target
//! logit's finite gradient, a zero total weight, any layout of the row scale and its unchecked
//! values (u8 targets: `edge::target_dtypes`).
//! Every function takes `&Device` so that the kernel suite can run it through the kernels.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, Reduction};

use crate::common::*;

// The heads of the semantics checks that run as one test per head (the kernel suite runs them
// all in one).
/// [`exact_mode_keeps_the_loss`]: the margin heads.
#[cfg_attr(not(any(feature = "cuda", feature = "kernel-emu")), allow(dead_code))]
pub const MARGIN_HEADS: [&str; 4] = ["cosface", "arcface", "combined", "sphereface"];
/// [`zero_total_weight`].
#[cfg_attr(not(any(feature = "cuda", feature = "kernel-emu")), allow(dead_code))]
pub const ZERO_TOTAL_WEIGHT_HEADS: [&str; 3] = ["arcface", "softmax", "rbf"];
/// [`row_scale_layouts`].
#[cfg_attr(not(any(feature = "cuda", feature = "kernel-emu")), allow(dead_code))]
pub const ROW_SCALE_LAYOUTS_HEADS: [&str; 2] = ["sphereface", "arcface"];

/// One row's loss and d(loss)/d(z) under PyTorch's `F.cross_entropy(weight=w,
/// label_smoothing=ε, reduction='none')`, in f64 from the logits z:
/// ℓ = (1 − ε)·w_y·(−log p_y) + (ε/C)·Σ_j w_j·(−log p_j),
/// dℓ/dz_j = (1 − ε)·w_y·(p_j − [j = y]) + (ε/C)·(W·p_j − w_j), W = Σ_j w_j.
fn torch_weighted_smoothing_row(z: &[f64], y: usize, w: &[f64], eps: f64) -> (f64, Vec<f64>) {
    let c = z.len() as f64;
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
    let total: f64 = w.iter().sum();
    let mut loss = (1.0 - eps) * w[y] * (lse - z[y]);
    for (j, &zj) in z.iter().enumerate() {
        loss += eps / c * w[j] * (lse - zj);
    }
    let grad = z
        .iter()
        .enumerate()
        .map(|(j, &zj)| {
            let p = (zj - lse).exp();
            let onehot = if j == y { 1.0 } else { 0.0 };
            (1.0 - eps) * w[y] * (p - onehot) + eps / c * (total * p - w[j])
        })
        .collect();
    (loss, grad)
}

/// Class weights with label smoothing follow PyTorch: the Softmax head (z = s·x) against the f64
/// formula above, per row (None), summed and averaged by Σ_i w_{y_i} (Mean), with ignored rows;
/// and the 6 × 9 ArcFace batch, whose per-row weighting of the whole smoothed row (the
/// old semantics) was 1.2 % away.
pub fn weighted_smoothing_is_pytorch(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (6usize, 9usize);
    let eps = 0.2;
    let w: Vec<f64> = (0..c).map(|j| 0.25 + 0.5 * j as f64).collect();
    let t: Vec<i64> = vec![0, 8, IGNORE, 3, 4, 4];
    let mut r = rng(seed_of("weighted smoothing pytorch"));
    for (hn, head) in [
        ("softmax", Head::Softmax { s: 2.0 }),
        ("arcface", Head::arcface()),
    ] {
        let x = gen_input(&mut r, &head, b, c, &t);
        // The logits, in f64: Softmax s·x; ArcFace s·c with s·cos(θ + m) at the target (the
        // generated cosines keep away from the fallback region's boundary).
        let z: Vec<Vec<f64>> = (0..b)
            .map(|i| {
                (0..c)
                    .map(|j| {
                        let v = x[i * c + j];
                        match head {
                            Head::ArcFace { s, m, .. } if t[i] == j as i64 => {
                                let theta = v.acos();
                                if theta + m <= std::f64::consts::PI {
                                    s * (theta + m).cos()
                                } else {
                                    s * (v - m * m.sin())
                                }
                            }
                            _ => head.scale() * v,
                        }
                    })
                    .collect()
            })
            .collect();
        for dt in [DType::F64, DType::F32] {
            let label = format!("weights+smoothing vs PyTorch {hn} {}", dtype_name(dt));
            let run = |f: &mut Failures| -> Result<()> {
                let input = input_tensor(&x, b, c, dt, dev)?;
                let targets = targets_i64(&t, dev)?;
                let base = MarginSoftmaxLoss::new(head)
                    .label_smoothing(eps)
                    .class_weights(Tensor::from_vec(w.clone(), c, dev)?.to_dtype(dt)?)?;
                let (tol, _) = tols(dt);
                let mut rows = vec![0.0; b];
                let mut sum_w = 0.0;
                let mut grads = vec![vec![0.0; c]; b];
                for i in 0..b {
                    if t[i] == IGNORE {
                        continue;
                    }
                    let (l, g) = torch_weighted_smoothing_row(&z[i], t[i] as usize, &w, eps);
                    rows[i] = l;
                    grads[i] = g;
                    sum_w += w[t[i] as usize];
                }
                let total: f64 = rows.iter().sum();
                let none = base
                    .clone()
                    .reduction(Reduction::None)
                    .loss(&input, &targets)?;
                f.check(
                    &label,
                    compare_vec("per-row loss", &vec_f64(&none)?, &rows, tol, 1.0),
                );
                for (rn, red, want) in [
                    ("sum", Reduction::Sum, total),
                    ("mean", Reduction::Mean, total / sum_w),
                ] {
                    let cfg = base.clone().reduction(red);
                    let got = vec_f64(&cfg.loss(&input, &targets)?)?;
                    f.check(&label, compare_vec(rn, &got, &[want], tol, 1.0));
                    if let Head::Softmax { s } = head {
                        // dℓ/dx = s·dℓ/dz, divided by Σ w_y for the mean.
                        let scale = if red == Reduction::Mean { s / sum_w } else { s };
                        let want: Vec<f64> = grads.iter().flatten().map(|g| g * scale).collect();
                        let (_, g) = cfg.loss_and_grad(&input, &targets)?;
                        f.check(
                            &label,
                            compare_vec(&format!("{rn} dx"), &vec_f64(&g)?, &want, tol, 1.0),
                        );
                    }
                }
                Ok(())
            };
            if let Err(e) = run(&mut f) {
                f.err(&label, e);
            }
        }
    }
    f.finish("semantics: class weights with label smoothing follow PyTorch");
}

/// Logit soft-capping against its formula in f64, Softmax head (z = cap·tanh(s·x/cap)): the loss
/// and dℓ/dx = s·sech²(s·x/cap)·(p − onehot), for caps that bite (values beyond the cap are
/// squashed: a cap never applied, or applied with a wrong derivative, fails).
pub fn softcap_formula(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 11usize);
    let s = 3.0;
    let t: Vec<i64> = vec![0, 10, 4];
    let mut r = rng(seed_of("softcap formula"));
    let x = gen_input(&mut r, &Head::softmax(), b, c, &t);
    for cap in [0.5f64, 4.0, 30.0] {
        for dt in [DType::F64, DType::F32] {
            let label = format!("softcap {cap} {}", dtype_name(dt));
            let run = |f: &mut Failures| -> Result<()> {
                let input = input_tensor(&x, b, c, dt, dev)?;
                // The oracle sees the input as rounded to the dtype.
                let xr = vec_f64(&input)?;
                let targets = targets_i64(&t, dev)?;
                let cfg = MarginSoftmaxLoss::new(Head::Softmax { s })
                    .logit_softcap(cap)
                    .reduction(Reduction::Sum);
                let (mut loss, mut grad) = (0.0, Vec::new());
                for i in 0..b {
                    let a: Vec<f64> = (0..c).map(|j| s * xr[i * c + j] / cap).collect();
                    let z: Vec<f64> = a.iter().map(|a| cap * a.tanh()).collect();
                    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
                    let y = t[i] as usize;
                    loss += lse - z[y];
                    for j in 0..c {
                        let onehot = if j == y { 1.0 } else { 0.0 };
                        let sech2 = 1.0 / a[j].cosh().powi(2);
                        grad.push(s * sech2 * ((z[j] - lse).exp() - onehot));
                    }
                }
                let (tol, _) = tols(dt);
                let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                f.check(
                    &label,
                    compare_vec("loss", &vec_f64(&a.loss)?, &[loss], tol, 1.0),
                );
                f.check(
                    &label,
                    compare_vec("autograd dx", &vec_f64(&a.dx)?, &grad, tol, 1.0),
                );
                let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                f.check(
                    &label,
                    compare_vec("loss_and_grad", &vec_f64(&l)?, &[loss], tol, 1.0),
                );
                f.check(
                    &label,
                    compare_vec("loss_and_grad dx", &vec_f64(&g)?, &grad, tol, 1.0),
                );
                Ok(())
            };
            if let Err(e) = run(&mut f) {
                f.err(&label, e);
            }
        }
    }
    f.finish("semantics: soft-capping against its formula");
}

/// Every margin head: the loss in `Exact` mode equals the loss in `Detached` mode bit for bit
/// (per row, and reduced, through `loss` and `loss_and_grad`), at random cosines and at the edge
/// cosines (±1, next to ±1, 0, beyond the clamp), in every dtype. ArcFace at θ = 0 gives the
/// paper's s·cos m (the old clamp gave a target logit 0.137 lower), and in the fallback region
/// next to c = −1 the exact gradient is the detached one (φ' = 1, not 0).
/// One test per margin head ([`MARGIN_HEADS`]) on that head's variants; ArcFace's also checks
/// the poles.
pub fn exact_mode_keeps_the_loss(dev: &Device, name: &str) {
    let mut f = Failures::default();
    let variants: Vec<(&str, Head)> = head_variants()
        .into_iter()
        .filter(|(_, h)| h.takes_cosine())
        .chain([(
            "arcface_m2.9",
            Head::ArcFace {
                s: 16.0,
                m: 2.9,
                easy_margin: false,
            },
        )])
        .collect();
    let heads = only(name, variants);
    let edges = [
        -1.2,
        -1.0,
        -0.99999994,
        -0.9999,
        -0.5,
        -1e-7,
        0.0,
        1e-7,
        0.5,
        0.99999,
        0.99999994,
        1.0,
        1.3,
    ];
    let (b, c) = (edges.len() + 5, 7usize);
    for (hn, head) in heads {
        for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
            for dt in [DType::F64, DType::F32, DType::F16, DType::BF16] {
                let label = format!("exact vs detached {hn}+{on} {}", dtype_name(dt));
                let run = |f: &mut Failures| -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, false);
                    let mut x = gen_input(&mut r, &head, b, c, &t);
                    for (i, &e) in edges.iter().enumerate() {
                        x[i * c + t[i] as usize] = e;
                    }
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    let exact = opts
                        .cfg(head, c, dt, dev, 3)?
                        .margin_grad(MarginGrad::Exact);
                    let detached = exact.clone().margin_grad(MarginGrad::Detached);
                    for red in [Reduction::None, Reduction::Mean] {
                        let (e, d) = (
                            exact.clone().reduction(red),
                            detached.clone().reduction(red),
                        );
                        let pairs = [
                            ("loss", e.loss(&input, &targets)?, d.loss(&input, &targets)?),
                            (
                                "loss_and_grad",
                                e.loss_and_grad(&input, &targets)?.0,
                                d.loss_and_grad(&input, &targets)?.0,
                            ),
                        ];
                        for (what, p, q) in pairs {
                            let (p, q) = (vec_f64(&p)?, vec_f64(&q)?);
                            let same = p.len() == q.len()
                                && p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits());
                            if !same {
                                f.0.push(format!(
                                    "[{label}] {what} {red:?}: exact {p:?} != detached {q:?}"
                                ));
                            }
                            if p.iter().any(|v| !v.is_finite()) {
                                f.0.push(format!("[{label}] {what} {red:?}: not finite {p:?}"));
                            }
                        }
                    }
                    let (_, g) = exact.loss_and_grad(&input, &targets)?;
                    if !all_finite(&g)? {
                        f.0.push(format!("[{label}] exact gradient not finite"));
                    }
                    Ok(())
                };
                if let Err(e) = run(&mut f) {
                    f.err(&label, e);
                }
            }
        }
    }
    if name == "arcface" {
        arcface_at_the_poles(dev, &mut f);
    }
    f.finish(&format!(
        "semantics: exact mode never changes the loss, {name}"
    ));
}

fn arcface_at_the_poles(dev: &Device, f: &mut Failures) {
    // ArcFace at θ = 0 and in the fallback region next to c = −1, f64: row [1, 0] with target
    // 0 has z_0 = s·cos m; row [−1, 0] with target 0 has z_0 = s·(−1 − m·sin m) and φ' = 1.
    let (s, m) = (64.0f64, 0.5f64);
    let head = Head::ArcFace {
        s,
        m,
        easy_margin: false,
    };
    let run = |f: &mut Failures| -> Result<()> {
        let input = Tensor::new(&[[1.0f64, 0.0], [-1.0, 0.0]], dev)?;
        let targets = Tensor::new(&[0u32, 0], dev)?;
        let cfg = MarginSoftmaxLoss::new(head).reduction(Reduction::Sum);
        let softplus = |v: f64| v.exp().ln_1p();
        let z_top = s * m.cos();
        let z_fallback = s * (-1.0 - m * m.sin());
        let want = softplus(-z_top) + softplus(-z_fallback);
        let got = vec_f64(&cfg.loss(&input, &targets)?)?[0];
        if (got - want).abs() > 1e-12 * want.abs() {
            f.0.push(format!(
                "[arcface theta = 0] loss {got}, want {want} (s·cos m target)"
            ));
        }
        let (_, g) = cfg.loss_and_grad(&input, &targets)?;
        let g = vec_f64(&g)?;
        // Fallback row: dℓ/dx_0 = s·(p_0 − 1)·1.
        let p0 = 1.0 / (1.0 + (-z_fallback).exp());
        let want_fallback = s * (p0 - 1.0);
        if (g[2] - want_fallback).abs() > 1e-9 * want_fallback.abs() {
            f.0.push(format!(
                "[arcface c = -1] exact gradient {}, want {want_fallback} (phi' = 1 in the \
                 fallback region)",
                g[2]
            ));
        }
        // θ = 0: the derivative sin(m)/sin θ_ε, bounded.
        let sin_floor = ((1.0 - (1.0 - 1e-5f64)) * (1.0 + (1.0 - 1e-5))).sqrt();
        let p0 = 1.0 / (1.0 + (-z_top).exp());
        let want_top = s * (p0 - 1.0) * m.sin() / sin_floor;
        if (g[0] - want_top).abs() > 1e-9 * want_top.abs() {
            f.0.push(format!(
                "[arcface theta = 0] exact gradient {}, want {want_top}",
                g[0]
            ));
        }
        Ok(())
    };
    if let Err(e) = run(f) {
        f.err("arcface at the poles", e);
    }
}

/// The f64 limit of a Softmax-head row whose target logit is −∞ (p_y = 0): ℓ = +∞ and, as
/// PyTorch's autograd gives it, dℓ/dz_j = F·[(1 − ε)·w_y·(p_j − [j = y]) + (ε/C)·(W·p_j − w_j)]
/// + 2·w_y·λ_z·lse·p_j with F = (1 − ε/C)^γ: the focal and Poly terms' p_y·log p_y → 0.
fn neg_inf_target_grad(z: &[f64], y: usize, w: &[f64], opts: &Opts) -> Vec<f64> {
    let c = z.len() as f64;
    let eps = opts.smoothing;
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
    let total: f64 = w.iter().sum();
    let focal = (1.0 - eps / c).powf(opts.focal);
    z.iter()
        .enumerate()
        .map(|(j, &zj)| {
            let p = (zj - lse).exp();
            let onehot = if j == y { 1.0 } else { 0.0 };
            focal * ((1.0 - eps) * w[y] * (p - onehot) + eps / c * (total * p - w[j]))
                + 2.0 * w[y] * opts.z * lse * p
        })
        .collect()
}

/// A −∞ target logit (Softmax head): the loss is +∞ and the gradient finite, the limit above
/// (PyTorch's p − onehot for plain cross-entropy), also with focal (γ = 2 and 0.5), Poly,
/// z-loss, smoothing and class weights, through `loss` and `loss_and_grad`.
pub fn neg_inf_target(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 6usize);
    let t: Vec<i64> = vec![2, 0, 5];
    let s = 1.5;
    let d = Opts::default;
    let sets = [
        ("plain", d()),
        ("focal2", Opts { focal: 2.0, ..d() }),
        (
            "focal0.5_poly",
            Opts {
                focal: 0.5,
                poly: vec![1.0, -0.4],
                ..d()
            },
        ),
        ("zloss", Opts { z: 0.01, ..d() }),
        (
            "smoothing_focal",
            Opts {
                smoothing: 0.1,
                focal: 2.0,
                ..d()
            },
        ),
        (
            "weights_smoothing_focal_poly",
            Opts {
                smoothing: 0.1,
                focal: 1.0,
                poly: vec![1.0],
                weights: true,
                ..d()
            },
        ),
    ];
    for (on, opts) in sets {
        for dt in [DType::F64, DType::F32] {
            let label = format!("-inf target {on} {}", dtype_name(dt));
            let run = |f: &mut Failures| -> Result<()> {
                let mut x: Vec<f64> = (0..b * c)
                    .map(|k| ((k * 5) % 7) as f64 / 4.0 - 0.5)
                    .collect();
                x[t[0] as usize] = f64::NEG_INFINITY; // row 0's target
                x[c + t[1] as usize] = f64::NEG_INFINITY; // row 1's target (first column)
                let cfg = opts
                    .cfg(Head::Softmax { s }, c, dt, dev, 17)?
                    .reduction(Reduction::Sum);
                let w: Vec<f64> = match &cfg.class_weights {
                    Some(w) => w.values().to_vec(),
                    None => vec![1.0; c],
                };
                let mut want = Vec::new();
                for i in 0..b {
                    let z: Vec<f64> = (0..c).map(|j| s * x[i * c + j]).collect();
                    let y = t[i] as usize;
                    let g = if i < 2 {
                        neg_inf_target_grad(&z, y, &w, &opts)
                    } else {
                        Vec::new()
                    };
                    want.push(g);
                }
                let input = input_tensor(&x, b, c, dt, dev)?;
                let targets = targets_i64(&t, dev)?;
                let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                for (what, loss, grad) in [("loss", &a.loss, &a.dx), ("loss_and_grad", &l, &g)] {
                    let loss = vec_f64(loss)?[0];
                    if loss != f64::INFINITY {
                        f.0.push(format!("[{label}] {what}: loss {loss}, want +inf"));
                    }
                    let grad = vec_f64(grad)?;
                    if let Some(k) = grad.iter().position(|v| !v.is_finite()) {
                        f.0.push(format!("[{label}] {what}: gradient {} at {k}", grad[k]));
                        continue;
                    }
                    for i in 0..2 {
                        let got: Vec<f64> =
                            grad[i * c..(i + 1) * c].iter().map(|v| v / s).collect();
                        let (_, tol) = tols(dt);
                        f.check(
                            &label,
                            compare_vec(&format!("{what} row {i} dz"), &got, &want[i], tol, 1.0),
                        );
                    }
                }
                Ok(())
            };
            if let Err(e) = run(&mut f) {
                f.err(&label, e);
            }
        }
    }
    f.finish("semantics: a -inf target logit has a finite gradient");
}

/// Class weights whose Σ_i w_{y_i} over the batch is 0 (every target on a zero-weight class):
/// `Mean` gives loss 0 and gradient 0 on every path (`loss`, autograd, `loss_and_grad`, with and
/// without a row scale, and `reference`), also with label smoothing, whose per-row losses are not
/// 0 (the smoothing term weights the other classes), and `Sum` is unaffected.
/// One test per head of [`ZERO_TOTAL_WEIGHT_HEADS`].
pub fn zero_total_weight(dev: &Device, name: &str) {
    let mut f = Failures::default();
    let (b, c) = (5usize, 8usize);
    let t: Vec<i64> = vec![1, 3, 1, IGNORE, 6];
    let mut w = vec![1.5f64; c];
    for j in [1, 3, 6] {
        w[j] = 0.0;
    }
    let heads = vec![
        ("arcface", Head::arcface()),
        ("softmax", Head::softmax()),
        ("rbf", Head::rbf()),
    ];
    for (hn, head) in only(name, heads) {
        for (on, opts) in [
            ("plain", Opts::default()),
            (
                "smoothing_focal_poly_z",
                Opts {
                    smoothing: 0.1,
                    focal: 2.0,
                    poly: vec![1.0],
                    z: 1e-3,
                    ..Opts::default()
                },
            ),
            (
                "softcap_smoothing",
                Opts {
                    smoothing: 0.2,
                    ..Opts::default()
                }
                .with_softcap(),
            ),
        ] {
            for dt in [DType::F64, DType::F32, DType::BF16] {
                let label = format!("zero total weight {hn}+{on} {}", dtype_name(dt));
                let run = |f: &mut Failures| -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, dev)?
                        .to_dtype(acc_dtype(dt))?;
                    let cfg = opts
                        .cfg(head, c, dt, dev, 0)?
                        .class_weights(Tensor::from_vec(w.clone(), c, dev)?.to_dtype(dt)?)?;
                    let zero = |what: &str, t: &Tensor, f: &mut Failures| match vec_f64(t) {
                        Ok(v) if v.iter().all(|&x| x == 0.0) => {}
                        Ok(v) => f.0.push(format!(
                            "[{label}] {what}: {:?}, want all 0",
                            &v[..v.len().min(8)]
                        )),
                        Err(e) => f.err(&label, e),
                    };
                    let a = autograd(Side::Fused, &cfg, &input, &targets, Some(&rs))?;
                    zero("autograd loss", &a.loss, f);
                    zero("autograd dx", &a.dx, f);
                    zero("autograd dr", a.dr.as_ref().expect("row-scale gradient"), f);
                    let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                    zero("loss", &a.loss, f);
                    zero("loss dx", &a.dx, f);
                    let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                    zero("loss_and_grad loss", &l, f);
                    zero("loss_and_grad dx", &g, f);
                    let (l, g, gr) = cfg.loss_and_grad_with_row_scale(&input, &targets, &rs)?;
                    zero("loss_and_grad_with_row_scale loss", &l, f);
                    zero("loss_and_grad_with_row_scale dx", &g, f);
                    zero("loss_and_grad_with_row_scale dr", &gr, f);
                    let rf = crate::parity::reference_on_cpu(&cfg, &input, &targets, None)?;
                    zero("reference loss", &rf.loss, f);
                    zero("reference dx", &rf.dx, f);
                    // Sum is the plain sum of the per-row losses (not 0 with smoothing).
                    let sum = cfg.clone().reduction(Reduction::Sum);
                    let got = sum.loss(&input, &targets)?;
                    let want = crate::parity::reference_on_cpu(&sum, &input, &targets, None)?.loss;
                    let (tol, _) = tols(dt);
                    f.check(&label, compare("sum", &got, &want, tol, head.scale()));
                    if opts.smoothing > 0.0 && vec_f64(&got)?[0] == 0.0 {
                        f.0.push(format!("[{label}] smoothed rows of weight 0 sum to 0"));
                    }
                    Ok(())
                };
                if let Err(e) = run(&mut f) {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish(&format!("semantics: zero total weight, {name}"));
}

/// The row scale in any layout on every entry point: a strided column view of a [B, 3] learnable
/// tensor, and one learnable s broadcast to every row. Results equal those of the same values
/// made contiguous, and the gradient reaches the view's base (the column, or Σ_i dℓ/dr_i).
/// One test per head of [`ROW_SCALE_LAYOUTS_HEADS`].
pub fn row_scale_layouts(dev: &Device, name: &str) {
    let mut f = Failures::default();
    let (b, c) = (6usize, 10usize);
    let heads = vec![
        ("sphereface_l5", Head::sphereface(5.0)),
        ("arcface", Head::arcface()),
    ];
    for (hn, head) in only(name, heads) {
        for (on, opts) in [
            ("plain", Opts::default()),
            ("combo", Opts::combo().with_softcap()),
        ] {
            for dt in [DType::F64, DType::F32, DType::F16] {
                let label = format!("row scale layouts {hn}+{on} {}", dtype_name(dt));
                let run = |f: &mut Failures| -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, opts.ignore);
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    let cfg = opts.cfg(head, c, dt, dev, 5)?;
                    let acc = acc_dtype(dt);
                    let (tol, _) = tols(dt);
                    let scales = gen_row_scale(&mut r, b);
                    // A [B, 3] base whose column 1 is the scale.
                    let base_values: Vec<f64> =
                        scales.iter().flat_map(|&v| [v + 1.0, v, v - 1.0]).collect();
                    let base = Var::from_tensor(
                        &Tensor::from_vec(base_values, (b, 3), dev)?.to_dtype(acc)?,
                    )?;
                    let column = base.as_tensor().narrow(1, 1, 1)?.squeeze(1)?;
                    let plain = Tensor::from_vec(scales.clone(), b, dev)?.to_dtype(acc)?;
                    let want = autograd(Side::Fused, &cfg, &input, &targets, Some(&plain))?;
                    let want_dr = vec_f64(want.dr.as_ref().expect("row-scale gradient"))?;
                    let loss = cfg.loss_with_row_scale(&input, &targets, &column)?;
                    f.check(&label, compare("column loss", &loss, &want.loss, tol, 1.0));
                    let grads = root(&loss)?.backward()?;
                    match grads.get(base.as_tensor()) {
                        Some(g) => {
                            let g = vec_f64(g)?;
                            let got: Vec<f64> = (0..b).map(|i| g[i * 3 + 1]).collect();
                            let others: Vec<f64> =
                                (0..b).flat_map(|i| [g[i * 3], g[i * 3 + 2]]).collect();
                            f.check(
                                &label,
                                compare_vec("column d(base)", &got, &want_dr, tol, 1.0),
                            );
                            if others.iter().any(|&v| v != 0.0) {
                                f.0.push(format!(
                                    "[{label}] other columns of the base got {others:?}"
                                ));
                            }
                        }
                        None => f.0.push(format!("[{label}] no gradient reached the base")),
                    }
                    let (l, g, gr) = cfg.loss_and_grad_with_row_scale(&input, &targets, &column)?;
                    f.check(
                        &label,
                        compare("column loss_and_grad", &l, &want.loss, tol, 1.0),
                    );
                    f.check(
                        &label,
                        compare("column loss_and_grad dx", &g, &want.dx, tol, 1.0),
                    );
                    f.check(
                        &label,
                        compare_vec(
                            "column loss_and_grad dr",
                            &vec_f64(&gr)?,
                            &want_dr,
                            tol,
                            1.0,
                        ),
                    );
                    // One learnable s for every row.
                    let s0 = 12.5f64;
                    let s = Var::from_tensor(&Tensor::new(s0, dev)?.to_dtype(acc)?)?;
                    let broadcast = s.as_tensor().broadcast_as(b)?;
                    let same = Tensor::from_vec(vec![s0; b], b, dev)?.to_dtype(acc)?;
                    let want = autograd(Side::Fused, &cfg, &input, &targets, Some(&same))?;
                    let want_ds: f64 = vec_f64(want.dr.as_ref().expect("row-scale gradient"))?
                        .iter()
                        .sum();
                    let loss = cfg.loss_with_row_scale(&input, &targets, &broadcast)?;
                    f.check(
                        &label,
                        compare("broadcast loss", &loss, &want.loss, tol, 1.0),
                    );
                    match root(&loss)?.backward()?.get(s.as_tensor()) {
                        Some(g) => f.check(
                            &label,
                            compare_vec("broadcast ds", &vec_f64(g)?, &[want_ds], tol, 1.0),
                        ),
                        None => {
                            f.0.push(format!("[{label}] no gradient reached the broadcast s"))
                        }
                    }
                    let (l, _, gr) =
                        cfg.loss_and_grad_with_row_scale(&input, &targets, &broadcast)?;
                    f.check(
                        &label,
                        compare("broadcast loss_and_grad", &l, &want.loss, tol, 1.0),
                    );
                    let got_ds: f64 = vec_f64(&gr)?.iter().sum();
                    f.check(
                        &label,
                        compare_vec(
                            "broadcast loss_and_grad Σ dr",
                            &[got_ds],
                            &[want_ds],
                            tol,
                            1.0,
                        ),
                    );
                    Ok(())
                };
                if let Err(e) = run(&mut f) {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish(&format!("semantics: row scale in any layout, {name}"));
}

/// What unchecked row-scale values do, as documented on `loss_with_row_scale` (Softmax head,
/// z = r·x): a NaN scale makes its row's loss and gradient NaN and leaves the other rows alone;
/// r = 0 gives the uniform softmax's ln C and a zero input gradient; r = −2 on x gives what r = 2
/// gives on −x.
pub fn row_scale_values(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (4usize, 6usize);
    let t: Vec<i64> = vec![1, 2, 3, 0];
    let mut r = rng(seed_of("row scale values"));
    let x = gen_input(&mut r, &Head::softmax(), b, c, &t);
    for dt in [DType::F64, DType::F32] {
        let label = format!("row scale values {}", dtype_name(dt));
        let run = |f: &mut Failures| -> Result<()> {
            let cfg = MarginSoftmaxLoss::new(Head::softmax()).reduction(Reduction::None);
            let input = input_tensor(&x, b, c, dt, dev)?;
            let targets = targets_i64(&t, dev)?;
            let acc = acc_dtype(dt);
            let scale = Tensor::new(&[f64::NAN, 0.0, -2.0, 5.0], dev)?.to_dtype(acc)?;
            let (loss, dx, dr) = cfg.loss_and_grad_with_row_scale(&input, &targets, &scale)?;
            let (loss, dx, dr) = (vec_f64(&loss)?, vec_f64(&dx)?, vec_f64(&dr)?);
            if !(loss[0].is_nan() && dx[..c].iter().all(|v| v.is_nan()) && dr[0].is_nan()) {
                f.0.push(format!(
                    "[{label}] NaN scale: loss {}, dx {:?}",
                    loss[0],
                    &dx[..c]
                ));
            }
            if !(loss[3].is_finite() && dx[3 * c..].iter().all(|v| v.is_finite())) {
                f.0.push(format!("[{label}] a NaN scale leaked into row 3"));
            }
            let ln_c = (c as f64).ln();
            if (loss[1] - ln_c).abs() > 1e-6 || dx[c..2 * c].iter().any(|&v| v != 0.0) {
                f.0.push(format!(
                    "[{label}] r = 0: loss {} (want ln C = {ln_c}), dx {:?}",
                    loss[1],
                    &dx[c..2 * c]
                ));
            }
            let flipped: Vec<f64> = x.iter().map(|v| -v).collect();
            let minus = input_tensor(&flipped, b, c, dt, dev)?;
            let two = Tensor::new(&[2.0f64; 4], dev)?.to_dtype(acc)?;
            let want = vec_f64(&cfg.loss_with_row_scale(&minus, &targets, &two)?)?;
            if (loss[2] - want[2]).abs() > 1e-6 * want[2].abs().max(1.0) {
                f.0.push(format!(
                    "[{label}] r = -2: loss {}, want {}",
                    loss[2], want[2]
                ));
            }
            Ok(())
        };
        if let Err(e) = run(&mut f) {
            f.err(&label, e);
        }
    }
    f.finish("semantics: unchecked row-scale values");
}

#[test]
fn semantics_weighted_smoothing_is_pytorch() {
    weighted_smoothing_is_pytorch(&device());
}

#[test]
fn semantics_softcap_formula() {
    softcap_formula(&device());
}

#[test]
fn semantics_exact_mode_keeps_the_loss_cosface() {
    exact_mode_keeps_the_loss(&device(), "cosface");
}

#[test]
fn semantics_exact_mode_keeps_the_loss_arcface() {
    exact_mode_keeps_the_loss(&device(), "arcface");
}

#[test]
fn semantics_exact_mode_keeps_the_loss_combined() {
    exact_mode_keeps_the_loss(&device(), "combined");
}

#[test]
fn semantics_exact_mode_keeps_the_loss_sphereface() {
    exact_mode_keeps_the_loss(&device(), "sphereface");
}

#[test]
fn semantics_neg_inf_target() {
    neg_inf_target(&device());
}

#[test]
fn semantics_zero_total_weight_arcface() {
    zero_total_weight(&device(), "arcface");
}

#[test]
fn semantics_zero_total_weight_softmax() {
    zero_total_weight(&device(), "softmax");
}

#[test]
fn semantics_zero_total_weight_rbf() {
    zero_total_weight(&device(), "rbf");
}

#[test]
fn semantics_row_scale_layouts_sphereface() {
    row_scale_layouts(&device(), "sphereface");
}

#[test]
fn semantics_row_scale_layouts_arcface() {
    row_scale_layouts(&device(), "arcface");
}

#[test]
fn semantics_row_scale_values() {
    row_scale_values(&device());
}
