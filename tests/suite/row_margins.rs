//! Per-row margins (`MarginSoftmaxLoss::loss_with_row_margins`,
//! `loss_and_grad_with_row_margins`), the adaptive heads' building block: the loss and the
//! gradients into the input, the margins and the row scale against the reference (plain candle
//! ops, autograd) over heads × dtypes × criterion options × shapes, against central differences
//! of the reference in f64, equal to the fixed margins when every row has the head's, at the
//! edge rows, and the errors.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, Reduction, reference};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::{
    GridFailures, IGNORE, Opts, cell_verdict, compare, dtype_name, first_line, gen_input,
    gen_row_scale, gen_targets, input_tensor, rng, root, seed_of, targets_i64, tols, variants_of,
    vec_f64,
};

const DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

fn heads() -> Vec<(&'static str, Head)> {
    ["cosface", "arcface", "combined"]
        .into_iter()
        .flat_map(variants_of)
        .collect()
}

/// Per-row margins for the head: CosFace m ∈ (0.1, 0.5), ArcFace m ∈ (0.1, 0.8) (wide enough
/// that rows with a low target cosine take the fallback), Combined m1 ∈ (0.8, 1.3),
/// m2 ∈ (0.05, 0.6), m3 ∈ (0, 0.3).
fn gen_margins(r: &mut StdRng, head: &Head, b: usize) -> Vec<f64> {
    match head {
        Head::CosFace { .. } => (0..b).map(|_| r.random_range(0.1..0.5)).collect(),
        Head::ArcFace { .. } => (0..b).map(|_| r.random_range(0.1..0.8)).collect(),
        _ => (0..b)
            .flat_map(|_| {
                [
                    r.random_range(0.8..1.3),
                    r.random_range(0.05..0.6),
                    r.random_range(0.0..0.3),
                ]
            })
            .collect(),
    }
}

fn margins_tensor(m: &[f64], head: &Head, b: usize, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(m.to_vec(), m.len(), &Device::Cpu)?;
    match head {
        Head::Combined { .. } => t.reshape((b, 3))?.to_dtype(dtype),
        _ => t.to_dtype(dtype),
    }
}

/// Loss and the gradients into input, margins and row scale, through autograd.
struct Sides {
    loss: Tensor,
    dx: Tensor,
    dm: Tensor,
    dr: Option<Tensor>,
}

fn through_autograd(
    fused: bool,
    cfg: &MarginSoftmaxLoss,
    x: &Tensor,
    y: &Tensor,
    m: &Tensor,
    r: Option<&Tensor>,
) -> Result<Sides> {
    let xv = Var::from_tensor(x)?;
    let mv = Var::from_tensor(m)?;
    let rv = r.map(Var::from_tensor).transpose()?;
    let rt = rv.as_ref().map(|v| v.as_tensor());
    let loss = if fused {
        cfg.loss_with_row_margins(xv.as_tensor(), y, mv.as_tensor(), rt)?
    } else {
        reference::loss_with_row_margins(cfg, xv.as_tensor(), y, mv.as_tensor(), rt)?
    };
    let grads = root(&loss)?.backward()?;
    let grad = |v: &Var| match grads.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => v.as_tensor().zeros_like(),
    };
    Ok(Sides {
        dx: grad(&xv)?,
        dm: grad(&mv)?,
        dr: rv.as_ref().map(grad).transpose()?,
        loss,
    })
}

/// The margins' and row scale's gradients, relative to their largest entry: f64 1e-9; f32 2e-4
/// (f32 arithmetic on both sides, through acos / cos in different orders); f16 / bf16 as the
/// input's gradient ([`tols`]): the reference's come back rounded to the margins' dtype, one ulp
/// from the op's f32.
fn param_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 2e-4,
        half => tols(half).1,
    }
}

#[allow(clippy::too_many_arguments)]
fn check_cell(
    label: &str,
    head: Head,
    opts: &Opts,
    dtype: DType,
    (b, c): (usize, usize),
    with_row_scale: bool,
) -> std::result::Result<(), String> {
    cell_verdict(label, || {
        let dev = Device::Cpu;
        let mut r = rng(seed_of(label));
        let t = gen_targets(&mut r, b, c, opts.ignore);
        let x = input_tensor(&gen_input(&mut r, &head, b, c, &t), b, c, dtype, &dev)?;
        let y = targets_i64(&t, &dev)?;
        let m = margins_tensor(&gen_margins(&mut r, &head, b), &head, b, dtype)?;
        let rs = if with_row_scale {
            Some(Tensor::from_vec(gen_row_scale(&mut r, b), b, &dev)?.to_dtype(dtype)?)
        } else {
            None
        };
        let cfg = opts.cfg(head, c, dtype, &dev, seed_of(label))?;
        let fused = through_autograd(true, &cfg, &x, &y, &m, rs.as_ref())?;
        let want = through_autograd(false, &cfg, &x, &y, &m, rs.as_ref())?;
        let one_pass = cfg.loss_and_grad_with_row_margins(&x, &y, &m, rs.as_ref())?;
        let (tol_loss, tol_dx) = tols(dtype);
        let tol_p = param_tol(dtype);
        let mut checks = vec![
            compare("loss", &fused.loss, &want.loss, tol_loss, 1.0),
            compare("dx", &fused.dx, &want.dx, tol_dx, 1e-3),
            compare("dm", &fused.dm, &want.dm, tol_p, 1e-3),
            compare(
                "loss_and_grad loss",
                &one_pass.loss,
                &want.loss,
                tol_loss,
                1.0,
            ),
            compare("loss_and_grad dx", &one_pass.input, &want.dx, tol_dx, 1e-3),
            compare(
                "loss_and_grad dm",
                &one_pass.margins,
                &want.dm.to_dtype(one_pass.margins.dtype())?,
                tol_p,
                1e-3,
            ),
        ];
        if let (Some(got), Some(one), Some(want)) = (&fused.dr, &one_pass.row_scale, &want.dr) {
            checks.push(compare("dr", got, want, tol_p, 1e-3));
            checks.push(compare("loss_and_grad dr", one, want, tol_p, 1e-3));
        } else if with_row_scale {
            checks.push(Err("a row-scale gradient is missing".into()));
        }
        Ok(checks)
    })
}

#[test]
fn row_margins_match_the_reference_over_heads_dtypes_options_and_shapes() {
    let option_sets: Vec<(&str, Opts, bool)> = vec![
        ("plain", Opts::default(), false),
        ("combo", Opts::combo(), false),
        (
            "combo_sum_detached",
            Opts::combo().with_reduction(Reduction::Sum).with_detached(),
            false,
        ),
        (
            "softcap_none_row_scale",
            Opts::default()
                .with_softcap()
                .with_reduction(Reduction::None),
            true,
        ),
        (
            "smoothing_row_scale",
            Opts {
                smoothing: 0.1,
                ..Opts::default()
            },
            true,
        ),
    ];
    let mut grid = GridFailures::default();
    for (head_name, head) in heads() {
        for &dtype in &DTYPES {
            for (opts_name, opts, with_row_scale) in &option_sets {
                for (b, c) in [(7, 11), (3, 300), (1, 1)] {
                    let label = format!(
                        "row_margins/{head_name}/{}/{opts_name}/{b}x{c}",
                        dtype_name(dtype)
                    );
                    grid.cell(|| check_cell(&label, head, opts, dtype, (b, c), *with_row_scale));
                }
            }
        }
    }
    grid.assert_none();
}

/// d(loss)/d(margins) and d(loss)/d(input) of the op against central differences of the
/// reference's loss, f64, one entry at a time (away from branch boundaries: the targets'
/// cosines are drawn in (−0.8, 0.9) and checked against θ + m = π).
#[test]
fn row_margins_gradients_match_central_differences_of_the_reference() -> Result<()> {
    let dev = Device::Cpu;
    let (b, c) = (4, 6);
    for (name, head) in heads() {
        for grad_mode in [MarginGrad::Exact, MarginGrad::Detached] {
            let mut r = rng(seed_of(&format!("row_margins_fd/{name}/{grad_mode:?}")));
            let cfg = MarginSoftmaxLoss::new(head)
                .label_smoothing(0.1)
                .margin_grad(grad_mode);
            let t: Vec<i64> = (0..b).map(|_| r.random_range(0..c as i64)).collect();
            let mut xs: Vec<f64> = (0..b * c).map(|_| r.random_range(-0.8..0.9)).collect();
            // Row 0's target cosine low enough that ArcFace with m ≥ 0.5 falls back.
            xs[t[0] as usize] = -0.95;
            let ms = gen_margins(&mut r, &head, b);
            let mut ms = ms;
            if matches!(head, Head::ArcFace { .. }) {
                ms[0] = 0.6;
            }
            let x = Tensor::from_vec(xs.clone(), (b, c), &dev)?;
            let y = targets_i64(&t, &dev)?;
            let m = margins_tensor(&ms, &head, b, DType::F64)?;
            let got = cfg.loss_and_grad_with_row_margins(&x, &y, &m, None)?;
            let loss_at = |xs: &[f64], ms: &[f64]| -> Result<f64> {
                let x = Tensor::from_vec(xs.to_vec(), (b, c), &dev)?;
                let m = margins_tensor(ms, &head, b, DType::F64)?;
                reference::loss_with_row_margins(&cfg, &x, &y, &m, None)?.to_scalar::<f64>()
            };
            let h = 1e-6;
            let dm = vec_f64(&got.margins)?;
            for k in 0..ms.len() {
                let (mut up, mut down) = (ms.clone(), ms.clone());
                up[k] += h;
                down[k] -= h;
                let fd = (loss_at(&xs, &up)? - loss_at(&xs, &down)?) / (2.0 * h);
                assert!(
                    (dm[k] - fd).abs() <= 1e-6 * fd.abs().max(1.0),
                    "{name} {grad_mode:?}: dℓ/dm[{k}] = {} but central differences give {fd}",
                    dm[k]
                );
            }
            // The input's gradient: exact mode only (detached mode is not the derivative).
            if grad_mode == MarginGrad::Exact {
                let dx = vec_f64(&got.input)?;
                for k in 0..xs.len() {
                    let (mut up, mut down) = (xs.clone(), xs.clone());
                    up[k] += h;
                    down[k] -= h;
                    let fd = (loss_at(&up, &ms)? - loss_at(&down, &ms)?) / (2.0 * h);
                    assert!(
                        (dx[k] - fd).abs() <= 1e-6 * fd.abs().max(1.0),
                        "{name}: dℓ/dx[{k}] = {} but central differences give {fd}",
                        dx[k]
                    );
                }
            }
        }
    }
    Ok(())
}

/// Every row given the head's own margin: the fixed-margin loss and gradient (bitwise in f64,
/// where the fallback shift m3 + m2·sin m2 is formed in the same precision both ways).
#[test]
fn row_margins_equal_to_the_heads_give_the_fixed_margin_loss() -> Result<()> {
    let dev = Device::Cpu;
    let (b, c) = (9, 40);
    for (name, head) in heads() {
        for dtype in [DType::F64, DType::F32] {
            let mut r = rng(seed_of(&format!("row_margins_fixed/{name}")));
            let t = gen_targets(&mut r, b, c, true);
            let x = input_tensor(&gen_input(&mut r, &head, b, c, &t), b, c, dtype, &dev)?;
            let y = targets_i64(&t, &dev)?;
            let per_row: Vec<f64> = match head {
                Head::CosFace { m, .. } | Head::ArcFace { m, .. } => vec![m; b],
                Head::Combined { m1, m2, m3, .. } => (0..b).flat_map(|_| [m1, m2, m3]).collect(),
                _ => unreachable!(),
            };
            let m = margins_tensor(&per_row, &head, b, dtype)?;
            let cfg = MarginSoftmaxLoss::new(head).label_smoothing(0.1);
            let (fixed_loss, fixed_dx) = cfg.loss_and_grad(&x, &y)?;
            let got = cfg.loss_and_grad_with_row_margins(&x, &y, &m, None)?;
            let (a, b_) = (vec_f64(&fixed_dx)?, vec_f64(&got.input)?);
            let (la, lb) = (vec_f64(&fixed_loss)?, vec_f64(&got.loss)?);
            if dtype == DType::F64 {
                assert_eq!(la, lb, "{name}: loss");
                assert_eq!(a, b_, "{name}: dx");
            } else {
                compare("loss", &got.loss, &fixed_loss, 1e-6, 1.0).unwrap();
                compare("dx", &got.input, &fixed_dx, 1e-5, 1e-3).unwrap();
            }
        }
    }
    Ok(())
}

/// Edge rows: target cosines at and beyond ±1 (clamped), θ + m just past π (the fallback),
/// a zero margin, and an ignored row whose margin is NaN (it reads nothing of it).
#[test]
fn row_margins_at_the_edges() -> Result<()> {
    let dev = Device::Cpu;
    let c = 5;
    let targets = [0i64, 1, 2, 3, 4, IGNORE];
    let b = targets.len();
    let mut xs = vec![0.1f64; b * c];
    xs[0] = 1.0; // c_y = 1
    xs[c + 1] = 1.3; // beyond 1: clamped, no gradient into it
    xs[2 * c + 2] = -1.0; // θ = π
    xs[3 * c + 3] = (std::f64::consts::PI - 0.5 - 1e-3).cos() - 1e-4; // θ + 0.5 just past π
    xs[4 * c + 4] = 0.3;
    let x = Tensor::from_vec(xs, (b, c), &dev)?;
    let y = targets_i64(&targets, &dev)?;
    for (name, head) in heads() {
        let cfg = MarginSoftmaxLoss::new(head).reduction(Reduction::None);
        let row = |i: usize| -> Vec<f64> {
            let m = if i == 4 { 0.0 } else { 0.5 };
            match head {
                Head::Combined { .. } => vec![1.0, m, 0.1],
                _ => vec![m],
            }
        };
        let mut ms: Vec<f64> = (0..b).flat_map(row).collect();
        let nan_at = ms.len() - row(b - 1).len();
        let finite = ms.clone();
        for v in &mut ms[nan_at..] {
            *v = f64::NAN;
        }
        let m = margins_tensor(&ms, &head, b, DType::F64)?;
        let m_finite = margins_tensor(&finite, &head, b, DType::F64)?;
        let got = cfg.loss_and_grad_with_row_margins(&x, &y, &m, None)?;
        // The ignored row's NaN margin changes nothing.
        let with_finite = cfg.loss_and_grad_with_row_margins(&x, &y, &m_finite, None)?;
        assert_eq!(vec_f64(&got.loss)?, vec_f64(&with_finite.loss)?, "{name}");
        assert_eq!(vec_f64(&got.input)?, vec_f64(&with_finite.input)?, "{name}");
        let dm = vec_f64(&got.margins)?;
        assert!(dm[nan_at..].iter().all(|&v| v == 0.0), "{name}: {dm:?}");
        // Everything else against the reference (with the finite margins: the reference's
        // autograd multiplies the ignored row's zero by the NaN margin's derivative).
        let want = through_autograd(false, &cfg, &x, &y, &m_finite, None)?;
        compare("edge loss", &got.loss, &want.loss, 1e-10, 1.0).unwrap();
        compare("edge dx", &got.input, &want.dx, 1e-10, 1e-3).unwrap();
        compare("edge dm", &with_finite.margins, &want.dm, 1e-9, 1e-3).unwrap();
        assert_eq!(
            vec_f64(&got.input)?[c + 1],
            0.0,
            "{name}: the clamped cosine's gradient"
        );
    }
    Ok(())
}

#[test]
fn row_margins_errors_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let y = Tensor::new(&[0i64, 1], &dev)?;
    let m = Tensor::new(&[0.3f32, 0.4], &dev)?;
    let err = |cfg: &MarginSoftmaxLoss, m: &Tensor| {
        first_line(&cfg.loss_with_row_margins(&x, &y, m, None).unwrap_err())
    };
    assert_eq!(
        err(&MarginSoftmaxLoss::new(Head::softmax()), &m),
        "margin_softmax_ce(softmax): per-row margins need the CosFace, ArcFace or Combined head"
    );
    assert_eq!(
        err(
            &MarginSoftmaxLoss::new(Head::arcface()),
            &m.reshape((2, 1))?
        ),
        "margin_softmax_ce(arcface): margins must have shape [2], got [2, 1]"
    );
    assert_eq!(
        err(&MarginSoftmaxLoss::new(Head::combined()), &m),
        "margin_softmax_ce(combined): margins must have shape [2, 3], got [2]"
    );
    assert_eq!(
        err(
            &MarginSoftmaxLoss::new(Head::cosface()),
            &Tensor::new(&[1u32, 2], &dev)?
        ),
        "margin_softmax_ce(cosface): margins must be an f16, bf16, f32 or f64 tensor, got U32"
    );
    let e = MarginSoftmaxLoss::new(Head::arcface())
        .loss_and_grad_with_row_margins(&x, &y, &m, Some(&Tensor::new(&[1f32], &dev)?))
        .unwrap_err();
    assert!(first_line(&e).starts_with("margin_softmax_ce(arcface): row_scale must have shape"));
    Ok(())
}

/// `MarginHead::loss_with_row_margins` against the composition (normalize, matmul,
/// `reference::loss_with_row_margins`, autograd, in f64): the loss and the gradients into the
/// embeddings, W and the margins, for the fused single-slice path and the chunked two-pass path,
/// reduced and per-row losses, with and without the feature-norm scale; and margins computed
/// from the embeddings' norms with candle ops (MagFace's linear m(‖f‖)), whose gradient reaches
/// the embeddings through the margins.
#[test]
fn row_margins_head_matches_the_composition() {
    use crate::heads::{Layout, case, normalize, root_of};
    use candle_margin_softmax::MarginHead;

    let layout = Layout {
        rows: 6,
        dim: 8,
        classes: 13,
        bias: false,
    };
    let option_sets: Vec<(&str, Opts)> = vec![
        ("plain", Opts::default()),
        ("combo", Opts::combo()),
        ("per_row", Opts::combo().with_reduction(Reduction::None)),
    ];
    let mut grid = GridFailures::default();
    for (head_name, head) in heads() {
        for dtype in [DType::F64, DType::F32] {
            for (opts_name, opts) in &option_sets {
                for chunk in [None, Some(4), Some(1)] {
                    for feature_norm in [false, true] {
                        for magface in [false, true] {
                            let label = format!(
                                "row_margins_head/{head_name}/{}/{opts_name}/chunk{chunk:?}/\
                                 norm{feature_norm}/magface{magface}",
                                dtype_name(dtype)
                            );
                            grid.cell(|| {
                                let run = || -> Result<Vec<std::result::Result<(), String>>> {
                                    let dev = Device::Cpu;
                                    let c = case(&label, layout, opts, dtype, &dev)?;
                                    let cfg = opts.cfg(head, layout.classes, dtype, &dev, 7)?;
                                    let mut r = rng(seed_of(&label));
                                    let m0 = margins_tensor(
                                        &gen_margins(&mut r, &head, layout.rows),
                                        &head,
                                        layout.rows,
                                        dtype,
                                    )?;
                                    // MagFace's m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a)
                                    // on a = ‖f‖ clamped to [l_a, u_a] = [1, 10] (the first
                                    // margin column only for Combined: m1 stays).
                                    let margins_of = |f: &Tensor, m0: &Tensor| -> Result<Tensor> {
                                        if !magface {
                                            return Ok(m0.clone());
                                        }
                                        let a = f.sqr()?.sum(1)?.sqrt()?.clamp(1.0, 10.0)?;
                                        let m = ((a - 1.0)? * (0.35 / 9.0))? + 0.45;
                                        match head {
                                            Head::Combined { .. } => Tensor::cat(
                                                &[
                                                    &m0.narrow(1, 0, 1)?,
                                                    &m?.unsqueeze(1)?.to_dtype(m0.dtype())?,
                                                    &m0.narrow(1, 2, 1)?,
                                                ],
                                                1,
                                            ),
                                            _ => m?.to_dtype(m0.dtype()),
                                        }
                                    };
                                    // The head.
                                    let mv = Var::from_tensor(&m0)?;
                                    let mut module = MarginHead::from_weight(
                                        cfg.clone(),
                                        c.w.as_tensor().clone(),
                                        None,
                                    )?
                                    .feature_norm_scale(feature_norm)?;
                                    if let Some(k) = chunk {
                                        module = module.chunk_classes(k)?;
                                    }
                                    let m = margins_of(c.f.as_tensor(), mv.as_tensor())?;
                                    let loss = module.loss_with_row_margins(
                                        c.f.as_tensor(),
                                        &c.targets,
                                        &m,
                                    )?;
                                    let grads = root_of(&loss, &c.upstream)?.backward()?;
                                    // With MagFace's margins for CosFace / ArcFace, the
                                    // drawn margins take no part: no gradient (0) on both sides.
                                    let got = |v: &Var| match grads.get(v) {
                                        Some(g) => Ok(g.clone()),
                                        None if magface => v.zeros_like(),
                                        None => Err(candle_core::Error::Msg("no gradient".into())),
                                    };
                                    let (gf, gw, gm) = (got(&c.f)?, got(&c.w)?, got(&mv)?);
                                    // The composition, in f64.
                                    let f =
                                        Var::from_tensor(&c.f.as_tensor().to_dtype(DType::F64)?)?;
                                    let w =
                                        Var::from_tensor(&c.w.as_tensor().to_dtype(DType::F64)?)?;
                                    let m64 = Var::from_tensor(&m0.to_dtype(DType::F64)?)?;
                                    let cos = normalize(f.as_tensor())?
                                        .matmul(&normalize(w.as_tensor())?.t()?)?;
                                    let norm = f.sqr()?.sum(1)?.sqrt()?;
                                    let want_loss = reference::loss_with_row_margins(
                                        &cfg.clone().check_targets(true),
                                        &cos,
                                        &c.targets,
                                        &margins_of(f.as_tensor(), m64.as_tensor())?,
                                        feature_norm.then_some(&norm),
                                    )?;
                                    let want = root_of(&want_loss, &c.upstream)?.backward()?;
                                    let wanted = |v: &Var| match want.get(v) {
                                        Some(g) => Ok(g.clone()),
                                        None if magface => v.zeros_like(),
                                        None => Err(candle_core::Error::Msg(
                                            "no reference gradient".into(),
                                        )),
                                    };
                                    let tol = if dtype == DType::F64 { 1e-9 } else { 2e-4 };
                                    Ok(vec![
                                        compare("loss", &loss, &want_loss, tol, 1.0),
                                        compare("d/d embeddings", &gf, &wanted(&f)?, tol, 1e-6),
                                        compare("d/dW", &gw, &wanted(&w)?, tol, 1e-6),
                                        compare("d/d margins", &gm, &wanted(&m64)?, tol, 1e-6),
                                    ])
                                };
                                cell_verdict(&label, run)
                            });
                        }
                    }
                }
            }
        }
    }
    grid.assert_none();
}
