//! The head modules ([`MarginHead`]) against the composition from plain candle ops: the op's
//! input built by hand (normalize, matmul, the d² expansion, the linear layer) and fed to
//! `reference::loss`, differentiated by candle autograd. Loss and gradients for the embeddings,
//! W and the bias; every head and criterion option; chunk sizes 1, odd and ≥ C; Partial FC; the
//! errors.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginHead, MarginSoftmaxLoss, Reduction, reference};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::common::{
    GridFailures, Opts, compare, gen_targets, main_heads, rng, seed_of, targets_i64, vec_f64,
};

const EPS: f64 = 1e-12;

/// What a head test varies besides the head and the criterion.
#[derive(Clone, Copy)]
pub struct Layout {
    pub rows: usize,
    pub dim: usize,
    pub classes: usize,
    pub bias: bool,
}

/// The seeded parameters and inputs of one case: embeddings [B, D], W [C, D], bias [C].
pub struct Case {
    pub f: Var,
    pub w: Var,
    pub b: Option<Var>,
    pub targets: Tensor,
    /// The upstream gradient of a per-row loss (random, so that the per-row factors are tested).
    pub upstream: Tensor,
}

pub fn case(label: &str, l: Layout, opts: &Opts, dtype: DType, dev: &Device) -> Result<Case> {
    let mut r = rng(seed_of(label));
    let normal = Normal::new(0.0, 1.0).unwrap();
    let mut draw = |n: usize, scale: f64| -> Vec<f64> {
        (0..n).map(|_| normal.sample(&mut r) * scale).collect()
    };
    let f = draw(l.rows * l.dim, 1.0);
    let w = draw(l.classes * l.dim, 0.7);
    let b = draw(l.classes, 0.5);
    let up: Vec<f64> = draw(l.rows, 1.0);
    let mut r2 = rng(seed_of(label) ^ 0x7a);
    let t = gen_targets(&mut r2, l.rows, l.classes, opts.ignore);
    let var = |v: Vec<f64>, shape: &[usize]| -> Result<Var> {
        Var::from_tensor(&Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
    };
    Ok(Case {
        f: var(f, &[l.rows, l.dim])?,
        w: var(w, &[l.classes, l.dim])?,
        b: if l.bias {
            Some(var(b, &[l.classes])?)
        } else {
            None
        },
        targets: targets_i64(&t, dev)?,
        upstream: Tensor::from_vec(up, l.rows, dev)?,
    })
}

pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(EPS)?)
}

/// The op's input composed by hand, in f64.
fn composed_input(head: &Head, f: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match head {
        Head::Softmax { .. } => {
            let z = f.matmul(&w.t()?)?;
            match b {
                Some(b) => z.broadcast_add(&b.unsqueeze(0)?),
                None => Ok(z),
            }
        }
        Head::Rbf { .. } => {
            let f2 = f.sqr()?.sum_keepdim(1)?;
            let w2 = w.sqr()?.sum_keepdim(1)?.t()?;
            f2.broadcast_add(&w2)?
                .broadcast_sub(&(f.matmul(&w.t()?)? * 2.0)?)
        }
        _ => normalize(f)?.matmul(&normalize(w)?.t()?),
    }
}

/// Loss and gradients (embeddings, W, bias) of the composition, in f64 from the case's values.
fn composed(
    cfg: &MarginSoftmaxLoss,
    c: &Case,
    feature_norm: bool,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let f = Var::from_tensor(&c.f.as_tensor().to_dtype(DType::F64)?)?;
    let w = Var::from_tensor(&c.w.as_tensor().to_dtype(DType::F64)?)?;
    let b = match &c.b {
        Some(b) => Some(Var::from_tensor(&b.as_tensor().to_dtype(DType::F64)?)?),
        None => None,
    };
    let cfg = cfg.clone().check_targets(true);
    let input = composed_input(&cfg.head, &f, &w, b.as_ref().map(|b| b.as_tensor()))?;
    let loss = if feature_norm {
        let norm = f.sqr()?.sum(1)?.sqrt()?;
        reference::loss_with_row_scale(&cfg, &input, &c.targets, &norm)?
    } else {
        reference::loss(&cfg, &input, &c.targets)?
    };
    let root = root_of(&loss, &c.upstream)?;
    let grads = root.backward()?;
    let g = |v: &Var| grads.get(v).cloned().unwrap_or(v.zeros_like().unwrap());
    Ok((loss.clone(), g(&f), g(&w), b.as_ref().map(g)))
}

/// The backward root: the loss, or Σ_i g_i·ℓ_i for per-row losses.
pub fn root_of(loss: &Tensor, upstream: &Tensor) -> Result<Tensor> {
    if loss.rank() == 0 {
        Ok(loss.clone())
    } else {
        loss.mul(&upstream.to_dtype(loss.dtype())?)?.sum_all()
    }
}

/// Loss and gradients of the head module on the case.
pub fn of_head(head: &MarginHead, c: &Case) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let loss = head.loss(c.f.as_tensor(), &c.targets)?;
    let grads = root_of(&loss, &c.upstream)?.backward()?;
    let g = |v: &Var| -> Result<Tensor> {
        grads
            .get(v)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
    };
    Ok((
        loss.clone(),
        g(&c.f)?,
        g(&c.w)?,
        match &c.b {
            Some(b) => Some(g(b)?),
            None => None,
        },
    ))
}

fn check_case(
    label: &str,
    head: &MarginHead,
    c: &Case,
    feature_norm: bool,
    tol: (f64, f64),
) -> std::result::Result<(), String> {
    let e = |e: candle_core::Error| format!("{label}: {e}");
    let got = of_head(head, c).map_err(e)?;
    let want = composed(head.config(), c, feature_norm).map_err(e)?;
    compare(&format!("{label} loss"), &got.0, &want.0, tol.0, 1.0)?;
    compare(
        &format!("{label} d/d embeddings"),
        &got.1,
        &want.1,
        tol.1,
        1e-6,
    )?;
    compare(&format!("{label} d/dW"), &got.2, &want.2, tol.1, 1e-6)?;
    if let (Some(a), Some(b)) = (&got.3, &want.3) {
        compare(&format!("{label} d/d bias"), a, b, tol.1, 1e-6)?;
    }
    Ok(())
}

/// The option sets the head grid runs: plain, everything together (smoothing with class
/// weights, focal, Poly-1, z-loss, ignored rows), per-row losses, soft-capping, the sum.
pub fn head_options() -> Vec<(&'static str, Opts)> {
    vec![
        ("plain", Opts::default()),
        ("combo", Opts::combo()),
        (
            "none_ignore",
            Opts {
                ignore: true,
                smoothing: 0.2,
                ..Opts::default()
            }
            .with_reduction(Reduction::None),
        ),
        (
            "softcap_sum",
            Opts::default()
                .with_softcap()
                .with_reduction(Reduction::Sum),
        ),
        ("detached_combo", Opts::combo().with_detached()),
    ]
}

fn layouts() -> Vec<(&'static str, Layout)> {
    let base = Layout {
        rows: 9,
        dim: 5,
        classes: 23,
        bias: false,
    };
    vec![
        ("small", base),
        // More rows than one statistics group (32) with small chunks: groups of 32, 32, 6.
        (
            "tall",
            Layout {
                rows: 70,
                dim: 3,
                classes: 11,
                ..base
            },
        ),
        (
            "one_class",
            Layout {
                rows: 4,
                dim: 6,
                classes: 1,
                ..base
            },
        ),
    ]
}

/// Every head (and Softmax with a bias, SphereFace with the feature-norm scale) × option set ×
/// layout × chunk size (1, 7, ≥ C, the default), in `dtype` against the f64 composition.
pub fn head_grid(dev: &Device, dtype: DType, tol: (f64, f64), chunks: &[Option<usize>]) {
    let mut heads: Vec<(String, Head, bool, bool)> = main_heads()
        .into_iter()
        .map(|(n, h)| (n.to_string(), h, false, false))
        .collect();
    heads.push(("softmax_bias".into(), Head::softmax(), true, false));
    heads.push(("sphereface_norm".into(), Head::sphereface(0.0), false, true));
    let mut grid = GridFailures::default();
    for (hname, head, bias, feature_norm) in &heads {
        for (oname, opts) in head_options() {
            for (lname, layout) in layouts() {
                let layout = Layout {
                    bias: *bias,
                    ..layout
                };
                for chunk in chunks {
                    let label = format!("{hname}/{oname}/{lname}/chunk{chunk:?}/{dtype:?}");
                    let run = || -> std::result::Result<(), String> {
                        let e = |e: candle_core::Error| format!("{label}: {e}");
                        let c = case(&label, layout, &opts, dtype, dev).map_err(e)?;
                        let cfg = opts
                            .cfg(*head, layout.classes, DType::F64, dev, seed_of(&label))
                            .map_err(e)?
                            .ignore_index(Some(crate::common::IGNORE));
                        let mut m = MarginHead::from_weight(
                            cfg,
                            c.w.as_tensor().clone(),
                            c.b.as_ref().map(|b| b.as_tensor().clone()),
                        )
                        .map_err(e)?
                        .feature_norm_scale(*feature_norm)
                        .map_err(e)?;
                        if let Some(n) = chunk {
                            m = m.chunk_classes(*n).map_err(e)?;
                        }
                        check_case(&label, &m, &c, *feature_norm, tol)
                    };
                    grid.cell(run);
                }
            }
        }
    }
    grid.assert_none();
}

#[test]
fn heads_match_composition_f64() {
    head_grid(
        &Device::Cpu,
        DType::F64,
        (1e-12, 1e-12),
        &[Some(1), Some(7), Some(1000), None],
    );
}

#[test]
fn heads_match_composition_f32() {
    head_grid(&Device::Cpu, DType::F32, (2e-5, 5e-5), &[Some(5), None]);
}

#[test]
fn heads_match_composition_half() {
    // The head computes in f32 from the half-precision values (W converted a slice at a time), so
    // the loss matches the f64 composition of the same values as f32 does; the gradients are
    // returned in the half dtype: one rounding, `common::tols`.
    head_grid(&Device::Cpu, DType::F16, (2e-5, 2e-3), &[Some(5), None]);
    head_grid(&Device::Cpu, DType::BF16, (2e-5, 1.6e-2), &[Some(5), None]);
}

/// Chunk sizes 1, odd and ≥ C give the same loss and gradients as each other (f64, 1e-12), on a
/// width where the default chunk is several slices.
#[test]
fn chunk_sizes_agree() -> Result<()> {
    chunks_agree(&Device::Cpu, 3001, &[1, 97, 1000, 3000, 5000])
}

/// The loss and gradients of an ArcFace head with every option over `classes` classes, for each
/// chunk size in `chunks`, against the one-slice (fused) computation.
pub fn chunks_agree(dev: &Device, classes: usize, chunks: &[usize]) -> Result<()> {
    let layout = Layout {
        rows: 40,
        dim: 16,
        classes,
        bias: false,
    };
    let opts = Opts::combo();
    let c = case("chunks", layout, &opts, DType::F64, dev)?;
    let cfg = opts
        .cfg(Head::arcface(), layout.classes, DType::F64, dev, 7)?
        .ignore_index(Some(crate::common::IGNORE));
    let run = |chunk: usize| -> Result<Vec<Vec<f64>>> {
        let m = MarginHead::from_weight(cfg.clone(), c.w.as_tensor().clone(), None)?
            .chunk_classes(chunk)?;
        let (l, df, dw, _) = of_head(&m, &c)?;
        Ok(vec![vec_f64(&l)?, vec_f64(&df)?, vec_f64(&dw)?])
    };
    let whole = run(layout.classes)?;
    for &chunk in chunks {
        let got = run(chunk)?;
        for (k, (g, w)) in got.iter().zip(&whole).enumerate() {
            crate::common::compare_vec(&format!("chunk {chunk} part {k}"), g, w, 1e-12, 1e-6)
                .map_err(candle_core::Error::Msg)?;
        }
    }
    Ok(())
}

fn partial_case(rate: f64, seed: u64) -> Result<(MarginHead, Case)> {
    let dev = Device::Cpu;
    let layout = Layout {
        rows: 12,
        dim: 6,
        classes: 50,
        bias: false,
    };
    let opts = Opts {
        smoothing: 0.1,
        weights: true,
        ..Opts::default()
    };
    let c = case("partial", layout, &opts, DType::F64, &dev)?;
    let cfg = opts.cfg(Head::cosface(), layout.classes, DType::F64, &dev, 11)?;
    let head = MarginHead::from_weight(cfg, c.w.as_tensor().clone(), None)?
        .chunk_classes(4)?
        .partial_fc(rate, seed)?;
    Ok((head, c))
}

#[test]
fn partial_fc_rate_one_is_the_full_head() -> Result<()> {
    let (sampled, c) = partial_case(1.0, 3)?;
    let full = MarginHead::from_weight(sampled.config().clone(), c.w.as_tensor().clone(), None)?;
    let a = of_head(&sampled, &c)?;
    let b = of_head(&full, &c)?;
    for (what, x, y) in [("loss", &a.0, &b.0), ("df", &a.1, &b.1), ("dW", &a.2, &b.2)] {
        compare(what, x, y, 1e-12, 1e-6).map_err(candle_core::Error::Msg)?;
    }
    Ok(())
}

/// Rate 0.3: the sampled classes are the rows of W with a gradient; they must number ⌊0.3·C⌋,
/// include every target, and the loss and gradients must equal the composition over them.
#[test]
fn partial_fc_matches_composition_on_its_sample() -> Result<()> {
    let (head, c) = partial_case(0.3, 42)?;
    let (loss, df, dw, _) = of_head(&head, &c)?;
    let norms = vec_f64(&dw.sqr()?.sum(1)?)?;
    let sample: Vec<u32> = (0..norms.len() as u32)
        .filter(|&j| norms[j as usize] > 0.0)
        .collect();
    assert_eq!(sample.len(), 15, "⌊0.3·50⌋ classes sampled");
    let targets: Vec<i64> = c.targets.to_vec1()?;
    for &t in &targets {
        assert!(sample.contains(&(t as u32)), "target {t} not sampled");
    }
    // The composition over the sampled classes, targets as positions among them.
    let dev = Device::Cpu;
    let index = Tensor::new(sample.as_slice(), &dev)?;
    let f = Var::from_tensor(c.f.as_tensor())?;
    let w = Var::from_tensor(c.w.as_tensor())?;
    let ws = w.as_tensor().index_select(&index, 0)?;
    let local: Vec<i64> = targets
        .iter()
        .map(|&t| sample.iter().position(|&j| j as i64 == t).unwrap() as i64)
        .collect();
    let mut cfg = head.config().clone();
    let weights = cfg
        .class_weights
        .as_ref()
        .unwrap()
        .tensor()
        .index_select(&index, 0)?;
    cfg = cfg.class_weights(weights)?;
    let input = composed_input(&cfg.head, &f, &ws, None)?;
    let want = reference::loss(&cfg, &input, &Tensor::new(local.as_slice(), &dev)?)?;
    let grads = want.backward()?;
    compare("loss", &loss, &want, 1e-12, 1e-3).map_err(candle_core::Error::Msg)?;
    compare("df", &df, grads.get(&f).unwrap(), 1e-12, 1e-6).map_err(candle_core::Error::Msg)?;
    compare("dW", &dw, grads.get(&w).unwrap(), 1e-12, 1e-6).map_err(candle_core::Error::Msg)?;
    Ok(())
}

/// The same seed gives the same samples call after call; successive calls sample anew.
#[test]
fn partial_fc_is_seeded() -> Result<()> {
    let (a, c) = partial_case(0.3, 9)?;
    let (b, _) = partial_case(0.3, 9)?;
    let (other, _) = partial_case(0.3, 10)?;
    let t = c.f.as_tensor().detach();
    let la: Vec<f32> = (0..3)
        .map(|_| a.loss(&t, &c.targets)?.to_dtype(DType::F32)?.to_scalar())
        .collect::<Result<_>>()?;
    let lb: Vec<f32> = (0..3)
        .map(|_| b.loss(&t, &c.targets)?.to_dtype(DType::F32)?.to_scalar())
        .collect::<Result<_>>()?;
    let lo: f32 = other
        .loss(&t, &c.targets)?
        .to_dtype(DType::F32)?
        .to_scalar()?;
    assert_eq!(la, lb);
    assert!(
        la[0] != la[1] || la[1] != la[2],
        "successive calls sample anew: {la:?}"
    );
    assert_ne!(la[0], lo, "another seed samples otherwise");
    Ok(())
}

/// An upstream gradient other than 1 scales the handed-over gradients; a second backward is an
/// error, not a silent zero.
#[test]
fn upstream_scaling_and_second_backward() -> Result<()> {
    let dev = Device::Cpu;
    let layout = Layout {
        rows: 6,
        dim: 4,
        classes: 9,
        bias: true,
    };
    let c = case("upstream", layout, &Opts::default(), DType::F64, &dev)?;
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    let head = MarginHead::from_weight(
        cfg.clone(),
        c.w.as_tensor().clone(),
        c.b.as_ref().map(|b| b.as_tensor().clone()),
    )?;
    let loss = head.loss(c.f.as_tensor(), &c.targets)?;
    let grads = (&loss * 3.0)?.backward()?;
    let want = composed(&cfg, &c, false)?;
    let scaled = (&want.2 * 3.0)?;
    compare("3·dW", grads.get(&c.w).unwrap(), &scaled, 1e-12, 1e-6)
        .map_err(candle_core::Error::Msg)?;
    let again = loss.backward();
    assert!(again.is_err(), "a second backward must fail");
    let msg = again.unwrap_err().to_string();
    assert!(msg.contains("margin_head"), "{msg}");
    Ok(())
}

/// A head built from a VarBuilder: W's init (normal(0, 0.01) for the cosine heads), the module's
/// forward, predict and a few SGD steps that lower the loss.
#[test]
fn var_builder_head_trains() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let head = MarginHead::new(
        MarginSoftmaxLoss::new(Head::arcface()),
        16,
        200,
        vb.pp("arc"),
    )?
    .chunk_classes(37)?;
    let w = vec_f64(head.weight())?;
    let std = (w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std - 0.01).abs() < 0.001, "init std {std}");
    let mut r = rng(5);
    let x: Vec<f32> = (0..64 * 16).map(|_| r.random_range(-1.0..1.0)).collect();
    let x = Tensor::from_vec(x, (64, 16), &dev)?;
    let y: Vec<u32> = (0..64).map(|i| (i % 200) as u32).collect();
    let y = Tensor::from_vec(y, 64, &dev)?;
    assert_eq!(head.forward(&x)?.dims(), &[64, 200]);
    assert_eq!(head.predict(&x)?.dims(), &[64]);
    assert_eq!(head.cosines(&x)?.max_keepdim(D::Minus1)?.dims(), &[64, 1]);
    let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.5)?;
    use candle_nn::Optimizer;
    let first: f32 = head.loss(&x, &y)?.to_scalar()?;
    for _ in 0..20 {
        let loss = head.loss(&x, &y)?;
        opt.backward_step(&loss)?;
    }
    let last: f32 = head.loss(&x, &y)?.to_scalar()?;
    assert!(last < first, "loss {first} → {last}");
    Ok(())
}

/// Bad input: an `Err` naming the op, never a panic.
#[test]
fn head_errors_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::zeros((10, 4), DType::F32, &dev)?;
    let arc = MarginSoftmaxLoss::new(Head::arcface());
    let head = MarginHead::from_weight(arc.clone(), w.clone(), None)?;
    let t = Tensor::new(&[1u32, 2], &dev)?;
    let msg = |r: Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let cases: Vec<(&str, String)> = vec![
        (
            "dim mismatch",
            msg(head.loss(&Tensor::zeros((2, 5), DType::F32, &dev)?, &t)),
        ),
        (
            "dtype",
            msg(head.loss(&Tensor::zeros((2, 4), DType::F64, &dev)?, &t)),
        ),
        (
            "rank",
            msg(head.loss(&Tensor::zeros(4, DType::F32, &dev)?, &t)),
        ),
        (
            "target range",
            msg(head.loss(
                &Tensor::ones((2, 4), DType::F32, &dev)?,
                &Tensor::new(&[1u32, 10], &dev)?,
            )),
        ),
        (
            "target shape",
            msg(head.loss(
                &Tensor::ones((2, 4), DType::F32, &dev)?,
                &Tensor::new(&[1u32], &dev)?,
            )),
        ),
        (
            "target dtype",
            msg(head.loss(
                &Tensor::ones((2, 4), DType::F32, &dev)?,
                &Tensor::new(&[1f32, 2.0], &dev)?,
            )),
        ),
    ];
    let err = |r: Result<MarginHead>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let fresh = || MarginHead::from_weight(arc.clone(), w.clone(), None);
    let rbf = || MarginHead::from_weight(MarginSoftmaxLoss::new(Head::rbf()), w.clone(), None);
    let mut builder: Vec<(&str, String)> = vec![
        ("chunk 0", err(fresh()?.chunk_classes(0))),
        (
            "weight rank",
            err(MarginHead::from_weight(
                arc.clone(),
                Tensor::zeros(4, DType::F32, &dev)?,
                None,
            )),
        ),
        (
            "bias on arcface",
            err(MarginHead::from_weight(
                arc.clone(),
                w.clone(),
                Some(Tensor::zeros(10, DType::F32, &dev)?),
            )),
        ),
        (
            "bias shape",
            err(MarginHead::from_weight(
                MarginSoftmaxLoss::new(Head::softmax()),
                w.clone(),
                Some(Tensor::zeros(9, DType::F32, &dev)?),
            )),
        ),
        ("feature norm on rbf", err(rbf()?.feature_norm_scale(true))),
        (
            "cosines of rbf",
            msg(rbf()?.cosines(&Tensor::zeros((2, 4), DType::F32, &dev)?)),
        ),
        (
            "set_config to another family",
            rbf()?
                .set_config(arc.clone())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        ),
    ];
    for rate in [0.0, -0.5, 1.5, f64::NAN] {
        builder.push(("rate", err(fresh()?.partial_fc(rate, 1))));
    }
    for (what, m) in cases.iter().chain(&builder) {
        assert!(
            m.contains("margin_head") || m.contains("margin_softmax_ce"),
            "{what}: expected an error naming the op, got {m:?}"
        );
    }
    Ok(())
}

/// An empty batch: the loss is 0 (Mean and Sum) or empty (None), W's gradient zero.
#[test]
fn empty_batch() -> Result<()> {
    let dev = Device::Cpu;
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for chunk in [1usize, 1000] {
            let w = Var::from_tensor(&Tensor::ones((5, 3), DType::F32, &dev)?)?;
            let head = MarginHead::from_weight(
                MarginSoftmaxLoss::new(Head::arcface()).reduction(reduction),
                w.as_tensor().clone(),
                None,
            )?
            .chunk_classes(chunk)?;
            let f = Var::from_tensor(&Tensor::zeros((0, 3), DType::F32, &dev)?)?;
            let loss = head.loss(f.as_tensor(), &Tensor::zeros(0, DType::U32, &dev)?)?;
            let grads = loss.sum_all()?.backward()?;
            assert_eq!(vec_f64(&loss.sum_all()?)?, vec![0.0]);
            let dw = grads.get(&w).expect("W's gradient");
            assert!(vec_f64(dw)?.iter().all(|&v| v == 0.0));
        }
    }
    Ok(())
}
