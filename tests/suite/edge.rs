//! Edge values and layouts: cos θ = ±1, half precision with s = 64, far RBF distances, extreme
//! targets, all rows ignored, B = 0, C = 1, a very confident focal row, values just outside the
//! clamps, non-contiguous inputs, and u32 vs i64 targets.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, Reduction};

use crate::common::*;
use crate::parity::{inputs_parity, inputs_parity_vs};

fn cosine_heads() -> Vec<(&'static str, Head)> {
    head_variants()
        .into_iter()
        .filter(|(_, h)| kind(h) == Kind::Cosine)
        .collect()
}

/// Checks loss, autograd gradient and `loss_and_grad` outputs are finite.
fn finite_everywhere(
    label: &str,
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    f: &mut Failures,
) -> Result<()> {
    let a = autograd(Side::Fused, cfg, input, targets, None)?;
    if !all_finite(&a.loss)? {
        f.0.push(format!(
            "[{label}] loss not finite: {:?}",
            vec_f64(&a.loss)?
        ));
    }
    if !all_finite(&a.dx)? {
        f.0.push(format!("[{label}] autograd dinput not finite"));
    }
    let (l, g) = cfg.loss_and_grad(input, targets)?;
    if !all_finite(&l)? {
        f.0.push(format!(
            "[{label}] loss_and_grad loss not finite: {:?}",
            vec_f64(&l)?
        ));
    }
    if !all_finite(&g)? {
        f.0.push(format!("[{label}] loss_and_grad dinput not finite"));
    }
    Ok(())
}

/// cos θ exactly ±1, including the target at +1 and at −1, in both margin-gradient modes, for
/// every cosine head: finite loss and gradients, and parity with the reference.
pub fn cos_pm1(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (5usize, 6usize);
    // row 0: target +1; row 1: target −1; row 2: non-targets ±1, target 0.5;
    // row 3: everything ±1 (target +1); row 4: everything ±1 (target −1).
    let t: Vec<i64> = vec![2, 0, 5, 1, 3];
    let mut x = vec![0.0f64; b * c];
    let mut r = rng(7);
    for i in 0..b {
        for j in 0..c {
            x[i * c + j] = rand::Rng::random_range(&mut r, -0.9..0.9);
        }
    }
    x[2] = 1.0;
    x[c] = -1.0;
    for j in 0..c {
        x[2 * c + j] = if j % 2 == 0 { 1.0 } else { -1.0 };
        x[3 * c + j] = if j % 3 == 0 { 1.0 } else { -1.0 };
        x[4 * c + j] = if j % 2 == 0 { -1.0 } else { 1.0 };
    }
    x[2 * c + 5] = 0.5;
    x[3 * c + 1] = 1.0;
    x[4 * c + 3] = -1.0;
    for (hn, head) in cosine_heads() {
        for mode in [MarginGrad::Exact, MarginGrad::Detached] {
            for (on, opts) in [
                ("plain", Opts::default()),
                ("none", Opts::default().with_reduction(Reduction::None)),
                ("combo", Opts::combo()),
            ] {
                for dt in [DType::F64, DType::F32, DType::F16, DType::BF16] {
                    let label = format!("cos±1 {hn}+{on} {mode:?} {}", dtype_name(dt));
                    let mut run = || -> Result<()> {
                        let mut cfg = opts.cfg(head, c, dt, dev, 1)?;
                        cfg.margin_grad = mode;
                        let input = input_tensor(&x, b, c, dt, dev)?;
                        let targets = targets_i64(&t, dev)?;
                        finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                        // The f64 oracle: with smoothing, ℓ_CE ≈ 10 multiplies the naive
                        // reference's rounded 1 − p_y in its f32 focal gradient (2e−4 off).
                        inputs_parity_vs(&label, &cfg, &input, &targets, None, true, &mut f)
                    };
                    if let Err(e) = run() {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("edge: cos = ±1");
}

/// Inputs just outside the clamps (cos beyond ±1, d² < 0): finite, equal to the reference, and
/// (PyTorch clamp semantics) zero gradient at the clamped entries.
pub fn outside_clamp(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 5usize);
    let t: Vec<i64> = vec![0, 2, 4];
    for (hn, head) in head_variants() {
        if kind(&head) == Kind::Logit {
            continue;
        }
        for mode in [MarginGrad::Exact, MarginGrad::Detached] {
            for dt in [DType::F64, DType::F32] {
                let label = format!("outside clamp {hn} {mode:?} {}", dtype_name(dt));
                let mut r = rng(seed_of(&label));
                let mut x = gen_input(&mut r, &head, b, c, &t);
                let clamped: Vec<usize> = if kind(&head) == Kind::Cosine {
                    // target of row 0 above 1, non-target of row 1 below −1, target of row 2
                    // below −1, non-target of row 0 above 1.
                    x[0] = 1.0 + 1e-3;
                    x[c] = -1.0 - 2e-3;
                    x[2 * c + 4] = -1.0 - 1e-3;
                    x[3] = 1.0 + 5e-4;
                    vec![0, c, 2 * c + 4, 3]
                } else {
                    x[0] = -0.01;
                    x[c + 1] = -1e-3;
                    vec![0, c + 1]
                };
                let mut run = || -> Result<()> {
                    let mut cfg = MarginSoftmaxLoss::new(head).reduction(Reduction::Sum);
                    cfg.margin_grad = mode;
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                    inputs_parity(&label, &cfg, &input, &targets, None, &mut f)?;
                    let (_, g) = cfg.loss_and_grad(&input, &targets)?;
                    let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                    let (g, ga) = (vec_f64(&g)?, vec_f64(&a.dx)?);
                    for &k in &clamped {
                        if g[k] != 0.0 || ga[k] != 0.0 {
                            f.0.push(format!(
                                "[{label}] gradient at clamped entry {k} (x = {}) is {} \
                                 (loss_and_grad) / {} (autograd), want 0",
                                x[k], g[k], ga[k]
                            ));
                        }
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("edge: values outside the clamps");
}

/// s = 64 with half-precision input: logits up to ±128 apart must not overflow exp.
pub fn s64_half(dev: &Device) {
    let mut f = Failures::default();
    for (hn, head) in [
        ("arcface", Head::arcface()),
        ("cosface", Head::cosface()),
        ("combined", Head::combined()),
        (
            "sphereface_s64",
            Head::SphereFace {
                s: 64.0,
                m: 4.0,
                lambda: 5.0,
            },
        ),
        ("softmax_s64", Head::Softmax { s: 64.0 }),
    ] {
        for dt in [DType::F16, DType::BF16] {
            for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                for (b, c) in [(9usize, 41usize), (16, 1000)] {
                    let label = format!("s64 {hn}+{on} {b}x{c} {}", dtype_name(dt));
                    let mut run = || -> Result<()> {
                        let mut r = rng(seed_of(&label));
                        let t = gen_targets(&mut r, b, c, opts.ignore);
                        let mut x = gen_input(&mut r, &head, b, c, &t);
                        if kind(&head) == Kind::Logit {
                            // Logits in [−2, 2] so that s·x spans ±128.
                            x.iter_mut().for_each(|v| *v = (*v / 3.0).clamp(-2.0, 2.0));
                        }
                        // One maximally confident row and one maximally wrong row.
                        if t[0] >= 0 {
                            for (j, v) in x[..c].iter_mut().enumerate() {
                                *v = if j as i64 == t[0] { 1.0 } else { -1.0 };
                            }
                        }
                        if b > 1 && t[1] >= 0 {
                            for (j, v) in x[c..2 * c].iter_mut().enumerate() {
                                *v = if j as i64 == t[1] { -1.0 } else { 1.0 };
                            }
                        }
                        let cfg = opts.cfg(head, c, dt, dev, 3)?;
                        let input = input_tensor(&x, b, c, dt, dev)?;
                        let targets = targets_i64(&t, dev)?;
                        finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                        // The f64 oracle: with smoothing, ℓ_CE ≈ 10 multiplies the naive
                        // reference's rounded 1 − p_y in its f32 focal gradient (2e−4 off).
                        inputs_parity_vs(&label, &cfg, &input, &targets, None, true, &mut f)
                    };
                    if let Err(e) = run() {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("edge: s = 64 with f16 / bf16 input");
}

/// RBF with every d² far (1e5..1e6): every score underflows to 0, so the loss is exactly ln C
/// and the gradient is finite (0); plus a mix of near and very far distances.
pub fn rbf_far(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (6usize, 20usize);
    for dt in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        // f16 tops out at 65504: use 1e4..6e4 there (still exp(−d²/γ) = 0 for γ = 16).
        let (lo, hi) = if dt == DType::F16 {
            (4.0, 4.78)
        } else {
            (5.0, 6.0)
        };
        for (hn, head) in [
            ("rbf", Head::rbf()),
            (
                "rbf_g64",
                Head::Rbf {
                    s: 64.0,
                    gamma: 64.0,
                },
            ),
        ] {
            let label = format!("rbf far {hn} {}", dtype_name(dt));
            let mut run = || -> Result<()> {
                let mut r = rng(seed_of(&label));
                let t = gen_targets(&mut r, b, c, false);
                let x: Vec<f64> = (0..b * c)
                    .map(|_| 10f64.powf(rand::Rng::random_range(&mut r, lo..hi)))
                    .collect();
                let input = input_tensor(&x, b, c, dt, dev)?;
                let targets = targets_i64(&t, dev)?;
                let cfg = MarginSoftmaxLoss::new(head);
                finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                let loss = cfg.loss(&input, &targets)?;
                let l = vec_f64(&loss)?[0];
                let want = (c as f64).ln();
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
                if (l - want).abs() > tol * want {
                    f.0.push(format!("[{label}] loss {l}, want ln C = {want}"));
                }
                inputs_parity(&label, &cfg, &input, &targets, None, &mut f)?;
                // Mixed: half the entries near, half far, with the combination of options.
                let x2: Vec<f64> = x
                    .iter()
                    .enumerate()
                    .map(|(k, &v)| {
                        if k % 2 == 0 {
                            v
                        } else {
                            rand::Rng::random_range(&mut r, 0.0..4.0)
                        }
                    })
                    .collect();
                let input2 = input_tensor(&x2, b, c, dt, dev)?;
                let cfg2 = Opts::combo().cfg(head, c, dt, dev, 5)?;
                finite_everywhere(&label, &cfg2, &input2, &targets, &mut f)?;
                inputs_parity(
                    &format!("{label} mixed"),
                    &cfg2,
                    &input2,
                    &targets,
                    None,
                    &mut f,
                )
            };
            if let Err(e) = run() {
                f.err(&label, e);
            }
        }
    }
    f.finish("edge: RBF with far distances");
}

/// Targets 0 and C − 1 only.
pub fn extreme_targets(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (6usize, 13usize);
    let t: Vec<i64> = (0..b)
        .map(|i| if i % 2 == 0 { 0 } else { c as i64 - 1 })
        .collect();
    for (hn, head) in head_variants() {
        for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
            for dt in [DType::F64, DType::F32] {
                let label = format!("targets 0/C-1 {hn}+{on} {}", dtype_name(dt));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let cfg = opts.cfg(head, c, dt, dev, 9)?;
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    inputs_parity(&label, &cfg, &input, &targets, None, &mut f)
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("edge: targets 0 and C-1");
}

fn all_zero(t: &Tensor) -> Result<bool> {
    Ok(vec_f64(t)?.iter().all(|&v| v == 0.0))
}

/// Every row ignored: each reduction gives exactly 0 (Mean too, not NaN), gradients all 0.
pub fn all_ignored(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (5usize, 7usize);
    let t = vec![IGNORE; b];
    for (hn, head) in main_heads() {
        for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                for dt in [DType::F64, DType::F32, DType::F16] {
                    let label = format!("all ignored {hn}+{on} {red:?} {}", dtype_name(dt));
                    let mut run = || -> Result<()> {
                        let mut r = rng(seed_of(&label));
                        let x = gen_input(&mut r, &head, b, c, &t);
                        let cfg = opts.clone().with_reduction(red).cfg(head, c, dt, dev, 2)?;
                        let input = input_tensor(&x, b, c, dt, dev)?;
                        let targets = targets_i64(&t, dev)?;
                        let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, dev)?
                            .to_dtype(acc_dtype(dt))?;
                        let a = autograd(Side::Fused, &cfg, &input, &targets, Some(&rs))?;
                        let a2 = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                        let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                        let (l3, g3, gr3) =
                            cfg.loss_and_grad_with_row_scale(&input, &targets, &rs)?;
                        for (what, v) in [
                            ("loss (row scale)", &a.loss),
                            ("loss", &a2.loss),
                            ("loss_and_grad loss", &l),
                            ("loss_and_grad_with_row_scale loss", &l3),
                            ("autograd dinput (row scale)", &a.dx),
                            ("autograd dinput", &a2.dx),
                            ("autograd drow_scale", a.dr.as_ref().unwrap()),
                            ("loss_and_grad dinput", &g),
                            ("loss_and_grad_with_row_scale dinput", &g3),
                            ("loss_and_grad_with_row_scale drow_scale", &gr3),
                        ] {
                            if !all_zero(v)? {
                                f.0.push(format!(
                                    "[{label}] {what} not all exactly 0: {:?}",
                                    vec_f64(v)?
                                ));
                            }
                        }
                        let want: &[usize] = if red == Reduction::None { &[b] } else { &[] };
                        if a2.loss.dims() != want {
                            f.0.push(format!("[{label}] loss shape {:?}", a2.loss.dims()));
                        }
                        inputs_parity(&label, &cfg, &input, &targets, None, &mut f)
                    };
                    if let Err(e) = run() {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("edge: all rows ignored");
}

/// B = 0: the loss works (Mean / Sum give 0, None gives shape [0]), gradients have shape (0, C).
/// (Mean runs last: a panic there would otherwise hide the results of the other reductions.)
pub fn empty_batch(dev: &Device) {
    let mut f = Failures::default();
    let c = 10usize;
    for (hn, head) in main_heads() {
        for red in [Reduction::Sum, Reduction::None, Reduction::Mean] {
            for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                for dt in [DType::F64, DType::F32, DType::BF16] {
                    let label = format!("B=0 {hn}+{on} {red:?} {}", dtype_name(dt));
                    let mut run = || -> Result<()> {
                        let cfg = opts.clone().with_reduction(red).cfg(head, c, dt, dev, 4)?;
                        let input = Tensor::zeros((0, c), dt, dev)?;
                        let targets = Tensor::zeros(0, DType::I64, dev)?;
                        let rs = Tensor::zeros(0, acc_dtype(dt), dev)?;
                        let want: &[usize] = if red == Reduction::None { &[0] } else { &[] };
                        let check_loss = |what: &str, l: &Tensor, f: &mut Failures| -> Result<()> {
                            if l.dims() != want {
                                f.0.push(format!("[{label}] {what} shape {:?}", l.dims()));
                            } else if !all_zero(l)? {
                                f.0.push(format!("[{label}] {what} = {:?}", vec_f64(l)?));
                            }
                            Ok(())
                        };
                        let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                        check_loss("loss", &a.loss, &mut f)?;
                        if a.dx.dims() != [0, c] {
                            f.0.push(format!("[{label}] autograd dinput shape {:?}", a.dx.dims()));
                        }
                        let ar = autograd(Side::Fused, &cfg, &input, &targets, Some(&rs))?;
                        check_loss("loss_with_row_scale", &ar.loss, &mut f)?;
                        let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                        check_loss("loss_and_grad loss", &l, &mut f)?;
                        if g.dims() != [0, c] || g.dtype() != dt {
                            f.0.push(format!(
                                "[{label}] loss_and_grad dinput shape {:?} dtype {:?}",
                                g.dims(),
                                g.dtype()
                            ));
                        }
                        let (l, g, gr) = cfg.loss_and_grad_with_row_scale(&input, &targets, &rs)?;
                        check_loss("loss_and_grad_with_row_scale loss", &l, &mut f)?;
                        if g.dims() != [0, c] || gr.dims() != [0] {
                            f.0.push(format!(
                                "[{label}] loss_and_grad_with_row_scale shapes {:?} {:?}",
                                g.dims(),
                                gr.dims()
                            ));
                        }
                        Ok(())
                    };
                    if let Err(e) = run() {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("edge: B = 0");
}

/// Focal γ = 0.5 with p_t → 1 (a very confident row): (1 − p)^(γ−1) must not blow up.
pub fn focal_confident(dev: &Device) {
    let mut f = Failures::default();
    for (hn, head) in [
        ("softmax", Head::softmax()),
        ("arcface", Head::arcface()),
        ("cosface", Head::cosface()),
        ("rbf", Head::rbf()),
    ] {
        for (on, opts) in [
            (
                "focal0.5",
                Opts {
                    focal: 0.5,
                    ..Opts::default()
                },
            ),
            (
                "focal0.5_poly",
                Opts {
                    focal: 0.5,
                    poly: vec![1.0, -0.45, 0.25],
                    ..Opts::default()
                },
            ),
            (
                "focal0.5_smooth",
                Opts {
                    focal: 0.5,
                    smoothing: 0.1,
                    poly: vec![1.0],
                    ..Opts::default()
                },
            ),
        ] {
            for dt in [DType::F64, DType::F32, DType::BF16] {
                for gap in [30.0f64, 200.0] {
                    let label = format!("focal confident {hn}+{on} gap {gap} {}", dtype_name(dt));
                    let mut run = || -> Result<()> {
                        let (b, c) = (3usize, 8usize);
                        let t: Vec<i64> = vec![3, 0, 7];
                        let mut r = rng(seed_of(&label));
                        let mut x = gen_input(&mut r, &head, b, c, &t);
                        // Row 0 (and 1) very confident; row 2 ordinary.
                        for i in 0..2 {
                            for j in 0..c {
                                let is_t = j as i64 == t[i];
                                x[i * c + j] = match kind(&head) {
                                    Kind::Logit => {
                                        if is_t {
                                            gap
                                        } else {
                                            0.0
                                        }
                                    }
                                    Kind::Cosine => {
                                        if is_t {
                                            1.0
                                        } else {
                                            -1.0
                                        }
                                    }
                                    Kind::Distance => {
                                        if is_t {
                                            0.0
                                        } else {
                                            1e4
                                        }
                                    }
                                };
                            }
                        }
                        let cfg = opts.cfg(head, c, dt, dev, 6)?;
                        let input = input_tensor(&x, b, c, dt, dev)?;
                        let targets = targets_i64(&t, dev)?;
                        finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                        // The f64 oracle: with smoothing, ℓ_CE ≈ 10 multiplies the naive
                        // reference's rounded 1 − p_y in its f32 focal gradient (2e−4 off).
                        inputs_parity_vs(&label, &cfg, &input, &targets, None, true, &mut f)
                    };
                    if let Err(e) = run() {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("edge: focal gamma 0.5, p_t -> 1");
}

/// C = 1: p = 1 for every row; the loss is 0 (plus z-loss), gradients finite.
pub fn one_class(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (5usize, 1usize);
    for (hn, head) in head_variants() {
        for (on, opts) in [
            ("plain", Opts::default()),
            ("combo", Opts::combo()),
            (
                "focal0.5_polyN",
                Opts {
                    focal: 0.5,
                    poly: vec![1.0, -0.45, 0.25],
                    smoothing: 0.3,
                    ..Opts::default()
                },
            ),
        ] {
            for dt in [DType::F64, DType::F32, DType::F16] {
                let label = format!("C=1 {hn}+{on} {}", dtype_name(dt));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, opts.ignore);
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let cfg = opts.cfg(head, c, dt, dev, 8)?;
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    finite_everywhere(&label, &cfg, &input, &targets, &mut f)?;
                    inputs_parity(&label, &cfg, &input, &targets, None, &mut f)?;
                    let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, dev)?
                        .to_dtype(acc_dtype(dt))?;
                    inputs_parity(
                        &format!("{label} row_scale"),
                        &cfg,
                        &input,
                        &targets,
                        Some(&rs),
                        &mut f,
                    )
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("edge: C = 1");
}

/// Non-contiguous inputs (a transposed view, and `narrow` on either dimension of a wider
/// tensor) give the same loss and gradients as the contiguous copy; the autograd gradient
/// flows back into the underlying tensor at the right places.
pub fn non_contiguous(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (7usize, 19usize);
    for (hn, head) in main_heads() {
        for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
            for dt in [DType::F64, DType::F32, DType::F16] {
                let label = format!("non-contiguous {hn}+{on} {}", dtype_name(dt));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, opts.ignore);
                    let cfg = opts.cfg(head, c, dt, dev, 10)?;
                    let targets = targets_i64(&t, dev)?;
                    // A wider [B + 3, C + 8] tensor of the head's kind.
                    let (bw, cw) = (b + 3, c + 8);
                    let tw: Vec<i64> = (0..bw)
                        .map(|i| t.get(i).copied().unwrap_or(0).max(0))
                        .collect();
                    let wide =
                        input_tensor(&gen_input(&mut r, &head, bw, cw, &tw), bw, cw, dt, dev)?;
                    let (tol, _) = tols(dt);
                    let (_, tolg) = tols(dt);
                    let views: Vec<(&str, ViewFn, Tensor)> = vec![
                        (
                            "transposed",
                            Box::new(move |base: &Tensor| base.t()),
                            wide.narrow(0, 0, b)?.narrow(1, 0, c)?.t()?.contiguous()?,
                        ),
                        (
                            "narrow dim 1",
                            Box::new(move |base: &Tensor| base.narrow(1, 5, c)),
                            wide.narrow(0, 0, b)?.contiguous()?,
                        ),
                        (
                            "narrow dims 0 and 1",
                            Box::new(move |base: &Tensor| base.narrow(0, 2, b)?.narrow(1, 3, c)),
                            wide.contiguous()?,
                        ),
                    ];
                    for (vn, view, base) in views {
                        let vl = format!("{label} {vn}");
                        let base_var = Var::from_tensor(&base)?;
                        let x_view = view(base_var.as_tensor())?;
                        if x_view.dims() != [b, c] {
                            f.0.push(format!("[{vl}] test bug: view shape {:?}", x_view.dims()));
                            continue;
                        }
                        let x_contig = x_view.detach().contiguous()?;
                        // Autograd through the view into the base tensor.
                        let loss_v = cfg.loss(&x_view, &targets)?;
                        let gb = root(&loss_v)?.backward()?;
                        let g_base = grad_of(&gb, &base_var)?;
                        let contig = autograd(Side::Fused, &cfg, &x_contig, &targets, None)?;
                        f.check(
                            &vl,
                            compare(
                                "loss (view vs contiguous)",
                                &loss_v,
                                &contig.loss,
                                tol,
                                1e-30,
                            ),
                        );
                        // The base gradient seen through the same view must equal the contiguous
                        // gradient, and be 0 elsewhere.
                        let g_view = view(&g_base)?;
                        f.check(
                            &vl,
                            compare("autograd dinput (view)", &g_view, &contig.dx, tolg, 1e-30),
                        );
                        let total: f64 = vec_f64(&g_base)?.iter().map(|v| v.abs()).sum();
                        let inside: f64 = vec_f64(&g_view)?.iter().map(|v| v.abs()).sum();
                        if (total - inside).abs() > 1e-12 * total.max(1.0) {
                            f.0.push(format!(
                                "[{vl}] gradient leaks outside the view: Σ|g| base {total} vs view {inside}"
                            ));
                        }
                        let (lv, gv) = cfg.loss_and_grad(&x_view, &targets)?;
                        let (lc, gc) = cfg.loss_and_grad(&x_contig, &targets)?;
                        f.check(
                            &vl,
                            compare("loss_and_grad loss (view)", &lv, &lc, tol, 1e-30),
                        );
                        f.check(
                            &vl,
                            compare("loss_and_grad dinput (view)", &gv, &gc, tolg, 1e-30),
                        );
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("edge: non-contiguous input");
}

/// A view of a base tensor, applied both to the input and to the gradient of the base.
type ViewFn = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

fn bitwise_eq(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    let (x, y) = (vec_f64(a)?, vec_f64(b)?);
    Ok(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

/// u8 (candle's MNIST labels) and u32 targets give bitwise the results of the same i64 targets on
/// every entry point and in the reference (ignored rows: ignore_index −100 for i64, and a value
/// of the narrow type's range for the others: 255, `u32::MAX`); an out-of-range u8 target is an
/// error naming the row.
pub fn target_dtypes(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (9usize, 23usize);
    for (hn, head) in main_heads() {
        for (on, opts) in [
            ("plain", Opts::default()),
            ("combo", Opts::combo()),
            ("combo_softcap", Opts::combo().with_softcap()),
        ] {
            for dt in [DType::F64, DType::F32, DType::BF16] {
                let label = format!("target dtypes {hn}+{on} {}", dtype_name(dt));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, opts.ignore);
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let input = input_tensor(&x, b, c, dt, dev)?;
                    let cfg_i = opts.cfg(head, c, dt, dev, 11)?;
                    let ti = targets_i64(&t, dev)?;
                    let narrow = |ignored: i64| -> Vec<i64> {
                        t.iter()
                            .map(|&v| if v == IGNORE { ignored } else { v })
                            .collect()
                    };
                    let tu =
                        Tensor::from_vec(narrow(u32::MAX as i64), b, dev)?.to_dtype(DType::U32)?;
                    let t8 = Tensor::from_vec(narrow(255), b, dev)?.to_dtype(DType::U8)?;
                    let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, dev)?
                        .to_dtype(acc_dtype(dt))?;
                    let results = |cfg: &MarginSoftmaxLoss,
                                   targets: &Tensor|
                     -> Result<Vec<Tensor>> {
                        let a = autograd(Side::Fused, cfg, &input, targets, Some(&rs))?;
                        let (l, g) = cfg.loss_and_grad(&input, targets)?;
                        let (_, _, gr) = cfg.loss_and_grad_with_row_scale(&input, targets, &rs)?;
                        let reference =
                            crate::parity::reference_on_cpu(cfg, &input, targets, None)?;
                        Ok(vec![
                            a.loss,
                            a.dx,
                            a.dr.expect("row-scale gradient"),
                            l,
                            g,
                            gr,
                            reference.loss,
                            reference.dx,
                        ])
                    };
                    let names = [
                        "loss",
                        "autograd dinput",
                        "autograd drow_scale",
                        "loss_and_grad loss",
                        "loss_and_grad dinput",
                        "loss_and_grad_with_row_scale drow_scale",
                        "reference loss",
                        "reference dinput",
                    ];
                    let want = results(&cfg_i, &ti)?;
                    for (tn, targets, ignore) in [("u32", &tu, u32::MAX as i64), ("u8", &t8, 255)] {
                        let got = results(&cfg_i.clone().ignore_index(Some(ignore)), targets)?;
                        for ((what, p), q) in names.iter().zip(&want).zip(&got) {
                            if !bitwise_eq(p, q)? {
                                f.0.push(format!(
                                    "[{label}] {what}: {tn} and i64 targets differ: {:?} vs {:?}",
                                    vec_f64(q)?.iter().take(8).collect::<Vec<_>>(),
                                    vec_f64(p)?.iter().take(8).collect::<Vec<_>>()
                                ));
                            }
                        }
                    }
                    let mut bad = narrow(255);
                    bad[2] = 200;
                    let bad = Tensor::from_vec(bad, b, dev)?.to_dtype(DType::U8)?;
                    match cfg_i.clone().ignore_index(Some(255)).loss(&input, &bad) {
                        Ok(_) => {
                            f.0.push(format!("[{label}] u8 target 200 of C = {c}: Ok, want Err"))
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            let named = ["margin_softmax_ce", "row 2", "200"];
                            if !named.iter().all(|k| msg.contains(k)) {
                                f.0.push(format!("[{label}] unclear error: {msg}"));
                            }
                        }
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("edge: u8, u32 and i64 targets");
}

/// The float64 oracle of a Softmax-head row with logits z_j = r·x_j (x_j = −∞ masked) and target
/// y under label smoothing ε: (ℓ, dℓ/dz, dℓ/dr), as PyTorch's cross_entropy gives them
/// (ℓ = +∞ with ε > 0, since log_softmax(−∞) = −∞; masked entries contribute 0 to dℓ/dr
/// without smoothing).
fn masked_softmax_row(x: &[f64], y: usize, r: f64, eps: f64) -> (f64, Vec<f64>, f64) {
    let c = x.len() as f64;
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(r * v));
    let lse = max + x.iter().map(|&v| (r * v - max).exp()).sum::<f64>().ln();
    let (mut loss, mut d_r) = (0.0, 0.0);
    let mut g = vec![0.0; x.len()];
    for (j, &v) in x.iter().enumerate() {
        let q = if j == y { 1.0 - eps } else { 0.0 } + eps / c;
        if q != 0.0 {
            loss -= q * (r * v - lse);
        }
        g[j] = (r * v - lse).exp() - q;
        if g[j] != 0.0 {
            d_r += g[j] * v;
        }
    }
    (loss, g, d_r)
}

/// A Softmax-head row with masked (−∞) non-target logits, at index 0, C − 1 and inside, in
/// f32 and f64 (a −∞ at the first index a GPU thread visits made the kernels' loss NaN): finite
/// loss equal to a float64 computation, gradient r·(p − onehot) with 0 at the masked entries
/// (autograd through `loss`, and `loss_and_grad`), and with `loss_with_row_scale` a finite
/// dℓ/dr equal to Σ_j (p_j − q_j)·x_j over the unmasked entries. With label smoothing ε > 0 the
/// loss is +∞ (PyTorch: log_softmax(−∞) = −∞ enters the smoothing term), the input gradient
/// stays finite (ε/C of −1 at the masked entries, times r), and dℓ/dr is +∞.
pub fn neg_inf_logit(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (4usize, 37usize);
    let t: Vec<i64> = vec![3, 0, 36, 20];
    let masked: [&[usize]; 4] = [&[0, c - 1], &[1, 5, 17, c - 1], &[0, 2, 19], &[0]];
    let s = 2.0f64;
    let mut x = vec![0.0f64; b * c];
    for i in 0..b {
        for j in 0..c {
            // Multiples of 1/8: exact in f32, so the oracle sees the same input.
            x[i * c + j] = ((j * 7 + i * 3) % 23) as f64 / 8.0 - 1.0;
        }
        for &j in masked[i] {
            x[i * c + j] = f64::NEG_INFINITY;
        }
    }
    let row_scale = [1.5f64, 2.0, 0.75, 3.0];
    for eps in [0.0f64, 0.1] {
        for dt in [DType::F64, DType::F32] {
            let label = format!("-inf logit eps {eps} {}", dtype_name(dt));
            let (tol_loss, tol_grad) = tols(dt);
            let mut run = || -> Result<()> {
                let cfg = MarginSoftmaxLoss::new(Head::Softmax { s })
                    .reduction(Reduction::Sum)
                    .label_smoothing(eps);
                let input = input_tensor(&x, b, c, dt, dev)?;
                let targets = targets_i64(&t, dev)?;
                let (mut loss, mut dx, mut d_r) = (0.0, Vec::new(), Vec::new());
                let (mut loss_r, mut dx_r) = (0.0, Vec::new());
                for i in 0..b {
                    let row = &x[i * c..(i + 1) * c];
                    let (l, g, _) = masked_softmax_row(row, t[i] as usize, s, eps);
                    loss += l;
                    dx.extend(g.iter().map(|v| s * v));
                    let (l, g, dr) = masked_softmax_row(row, t[i] as usize, row_scale[i], eps);
                    loss_r += l;
                    dx_r.extend(g.iter().map(|v| row_scale[i] * v));
                    d_r.push(dr);
                }
                let check_loss = |what: &str, got: f64, want: f64, f: &mut Failures| {
                    let ok = if want.is_finite() {
                        got.is_finite() && (got - want).abs() <= tol_loss * want.abs().max(1.0)
                    } else {
                        got == want
                    };
                    if !ok {
                        f.0.push(format!("[{label}] {what}: loss {got}, want {want}"));
                    }
                };
                let check_grad = |what: &str, got: &Tensor, want: &[f64], f: &mut Failures| {
                    let g = match vec_f64(got) {
                        Ok(g) => g,
                        Err(e) => return f.err(&label, e),
                    };
                    f.check(&label, compare_vec(what, &g, want, tol_grad, 1.0));
                    if eps == 0.0 {
                        for (i, row) in masked.iter().enumerate() {
                            for &j in row.iter() {
                                if g[i * c + j] != 0.0 {
                                    f.0.push(format!(
                                        "[{label}] {what}: gradient at masked ({i}, {j}) is {}",
                                        g[i * c + j]
                                    ));
                                }
                            }
                        }
                    }
                };
                let a = autograd(Side::Fused, &cfg, &input, &targets, None)?;
                check_loss("loss", vec_f64(&a.loss)?[0], loss, &mut f);
                check_grad("loss backward dx", &a.dx, &dx, &mut f);
                let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                check_loss("loss_and_grad", vec_f64(&l)?[0], loss, &mut f);
                check_grad("loss_and_grad dx", &g, &dx, &mut f);
                let r = Tensor::new(&row_scale[..], dev)?.to_dtype(acc_dtype(dt))?;
                let a = autograd(Side::Fused, &cfg, &input, &targets, Some(&r))?;
                check_loss("row scale loss", vec_f64(&a.loss)?[0], loss_r, &mut f);
                check_grad("row scale dx", &a.dx, &dx_r, &mut f);
                let got = vec_f64(a.dr.as_ref().expect("row-scale gradient"))?;
                if eps == 0.0 {
                    f.check(
                        &label,
                        compare_vec("row scale dr", &got, &d_r, tol_loss, 1.0),
                    );
                } else if got.iter().any(|&v| v != f64::INFINITY) {
                    f.0.push(format!(
                        "[{label}] row scale dr {got:?}, want +inf (smoothing)"
                    ));
                }
                Ok(())
            };
            if let Err(e) = run() {
                f.err(&label, e);
            }
        }
    }
    f.finish("edge: -inf (masked) logits");
}

#[test]
fn edge_cos_pm1() {
    cos_pm1(&device());
}

#[test]
fn edge_outside_clamp() {
    outside_clamp(&device());
}

#[test]
fn edge_s64_half() {
    s64_half(&device());
}

#[test]
fn edge_rbf_far() {
    rbf_far(&device());
}

#[test]
fn edge_extreme_targets() {
    extreme_targets(&device());
}

#[test]
fn edge_all_ignored() {
    all_ignored(&device());
}

#[test]
fn edge_empty_batch() {
    empty_batch(&device());
}

#[test]
fn edge_focal_confident() {
    focal_confident(&device());
}

#[test]
fn edge_one_class() {
    one_class(&device());
}

#[test]
fn edge_non_contiguous() {
    non_contiguous(&device());
}

#[test]
fn edge_target_dtypes() {
    target_dtypes(&device());
}

#[test]
fn edge_neg_inf_logit() {
    neg_inf_logit(&device());
}
