//! ElasticFace (`MarginHead::elastic`): the draws (seeded, reproducible, N(m, σ) in
//! distribution), the step that advances once per training call and never in evaluation, and the
//! loss and gradients against a float64 re-derivation of the official `ElasticArcFace` /
//! `ElasticCosFace` (fdbtrs/ElasticFace, `utils/losses.py`) given the step's draws, "plus"
//! included (its sort and gather written here from the official code).

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{ElasticFace, Head, MarginHead, MarginSoftmaxLoss};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::common::{GridFailures, IGNORE, cell_verdict, loss_and_grad_checks, rng, seed_of};

const ROWS: usize = 8;
const DIM: usize = 12;
const CLASSES: usize = 9;

#[test]
fn elastic_draws_are_seeded_and_normal() {
    let e = ElasticFace::default();
    let n = 40_000;
    let draws = e.draw(0.5, 3, n);
    let mean = draws.iter().sum::<f64>() / n as f64;
    let var = draws.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Four standard errors: σ/√n = 2.5e-4 for the mean, σ/√(2n) ≈ 1.8e-4 for the std.
    assert!((mean - 0.5).abs() < 1e-3, "mean {mean}");
    assert!((var.sqrt() - 0.05).abs() < 7.2e-4, "std {}", var.sqrt());
    assert_eq!(draws, e.draw(0.5, 3, n), "the same seed and step");
    assert_ne!(draws[..10], e.draw(0.5, 4, 10)[..], "another step");
    let other_seed = ElasticFace { seed: 1, ..e };
    assert_ne!(draws[..10], other_seed.draw(0.5, 3, 10)[..], "another seed");
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}

/// The official forward in f64 with the given per-row margins (ignored rows: none), then
/// `F.cross_entropy` (mean over the rows not ignored, as `ignore_index = -1` does).
fn official(
    f: &Tensor,
    w: &Tensor,
    t: &[i64],
    margins: &[f64],
    arc: bool,
    s: f64,
) -> Result<Tensor> {
    let dev = f.device();
    let cos = l2_normalize(f)?.matmul(&l2_normalize(w)?.t()?)?;
    let m_hot: Vec<f64> = (0..ROWS * CLASSES)
        .map(|k| {
            let (i, j) = (k / CLASSES, k % CLASSES);
            if t[i] == j as i64 { margins[i] } else { 0.0 }
        })
        .collect();
    let m_hot = Tensor::from_vec(m_hot, (ROWS, CLASSES), dev)?;
    let logits = if arc {
        // cos_theta.acos_() then += m_hot then cos_(): θ from the host (candle has no acos),
        // its derivative −1/sin θ attached by a value-0 carrier.
        let c = cos.detach().flatten_all()?.to_vec1::<f64>()?;
        let theta0 = Tensor::from_vec(c.iter().map(|v| v.acos()).collect(), (ROWS, CLASSES), dev)?;
        let inv_sin = theta0.sin()?.recip()?;
        let theta = (&theta0 - (&cos - cos.detach())?.mul(&inv_sin)?)?;
        (theta + m_hot)?.cos()?
    } else {
        (cos - m_hot)?
    };
    let logits = (logits * s)?;
    let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let valid: Vec<usize> = (0..ROWS).filter(|&i| t[i] != IGNORE).collect();
    let mut total = Tensor::zeros((), DType::F64, dev)?;
    for &i in &valid {
        total = (total - log_p.get(i)?.get(t[i] as usize)?)?;
    }
    total / valid.len() as f64
}

#[test]
fn elastic_matches_the_official_formula() {
    let mut grid = GridFailures::default();
    for arc in [true, false] {
        for plus in [false, true] {
            for dtype in [DType::F64, DType::F32] {
                for chunk in [None, Some(4)] {
                    let label = format!("elastic/arc{arc}/plus{plus}/{dtype:?}/chunk{chunk:?}");
                    grid.cell(|| {
                        let run = || -> Result<Vec<std::result::Result<(), String>>> {
                            let dev = Device::Cpu;
                            let mut r = rng(seed_of(&label));
                            let normal = Normal::new(0.0, 1.0).unwrap();
                            let f: Vec<f64> =
                                (0..ROWS * DIM).map(|_| normal.sample(&mut r)).collect();
                            let w: Vec<f64> = (0..CLASSES * DIM)
                                .map(|_| normal.sample(&mut r) * 0.1)
                                .collect();
                            let mut t: Vec<i64> = (0..ROWS)
                                .map(|_| r.random_range(0..CLASSES as i64))
                                .collect();
                            t[3] = IGNORE;
                            let head = if arc {
                                ElasticFace::arcface_head()
                            } else {
                                ElasticFace::cosface_head()
                            };
                            let elastic = ElasticFace {
                                plus,
                                seed: 11,
                                ..ElasticFace::default()
                            };
                            let cfg = MarginSoftmaxLoss::new(head).ignore_index(Some(IGNORE));
                            let fv = Var::from_tensor(
                                &Tensor::from_vec(f.clone(), (ROWS, DIM), &dev)?.to_dtype(dtype)?,
                            )?;
                            let wv = Var::from_tensor(
                                &Tensor::from_vec(w.clone(), (CLASSES, DIM), &dev)?
                                    .to_dtype(dtype)?,
                            )?;
                            let mut module =
                                MarginHead::from_weight(cfg, wv.as_tensor().clone(), None)?
                                    .elastic(elastic)?;
                            if let Some(k) = chunk {
                                module = module.chunk_classes(k)?;
                            }
                            module.set_elastic_step(5)?;
                            let y = Tensor::from_vec(t.clone(), ROWS, &dev)?;
                            // Evaluation does not advance the step.
                            module.cosines(fv.as_tensor())?;
                            module.predict(fv.as_tensor())?;
                            let loss = module.loss(fv.as_tensor(), &y)?;
                            if module.elastic_step()? != 6 {
                                return Ok(vec![Err(format!("step {}", module.elastic_step()?))]);
                            }
                            let grads = loss.backward()?;
                            // The step's draws, for the rows not ignored, in order; "plus" as the
                            // official code: sorted ascending, gathered by the rows' order of
                            // descending target cosine.
                            let valid: Vec<usize> = (0..ROWS).filter(|&i| t[i] != IGNORE).collect();
                            let mean = if arc { 0.5 } else { 0.35 };
                            let mut drawn = elastic.draw(mean, 5, valid.len());
                            let f64v = Var::from_tensor(&Tensor::from_vec(f, (ROWS, DIM), &dev)?)?;
                            let w64v =
                                Var::from_tensor(&Tensor::from_vec(w, (CLASSES, DIM), &dev)?)?;
                            if plus {
                                let cos = l2_normalize(f64v.as_tensor())?
                                    .matmul(&l2_normalize(w64v.as_tensor())?.t()?)?;
                                let dist: Vec<f64> = valid
                                    .iter()
                                    .map(|&i| cos.get(i)?.get(t[i] as usize)?.to_scalar::<f64>())
                                    .collect::<Result<_>>()?;
                                let mut order: Vec<usize> = (0..valid.len()).collect();
                                order.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]));
                                let mut sorted = drawn.clone();
                                sorted.sort_by(f64::total_cmp);
                                drawn = order.iter().map(|&k| sorted[k]).collect();
                            }
                            let mut margins = vec![0.0; ROWS];
                            for (&i, m) in valid.iter().zip(drawn) {
                                margins[i] = m;
                            }
                            let want = official(
                                f64v.as_tensor(),
                                w64v.as_tensor(),
                                &t,
                                &margins,
                                arc,
                                64.0,
                            )?;
                            let want_grads = want.backward()?;
                            let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
                            loss_and_grad_checks(
                                (&loss, &want),
                                (&grads, &want_grads),
                                &[("embeddings", &fv, &f64v), ("W", &wv, &w64v)],
                                tol,
                            )
                        };
                        cell_verdict(&label, run)
                    });
                }
            }
        }
    }
    grid.assert_none();
}

#[test]
fn elastic_errors_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::ones((CLASSES, DIM), DType::F32, &dev)?;
    let head = |h: Head| MarginHead::from_weight(MarginSoftmaxLoss::new(h), w.clone(), None);
    let first = |r: Result<MarginHead>| {
        r.err()
            .expect("an error")
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        first(head(Head::combined())?.elastic(ElasticFace::default())),
        "margin_head(combined): ElasticFace needs the ArcFace or CosFace head"
    );
    assert!(
        first(head(Head::arcface())?.elastic(ElasticFace {
            std: -1.0,
            ..ElasticFace::default()
        }))
        .starts_with("margin_head(arcface): ElasticFace's std must be finite and >= 0")
    );
    // Sharded, "plus" is refused through the ranks' agreement (it reads every row's target
    // cosine, which no rank holds whole).
    let plus = head(Head::arcface())?.elastic(ElasticFace {
        plus: true,
        ..ElasticFace::default()
    })?;
    let comm: std::sync::Arc<dyn candle_margin_softmax::Communicator> = std::sync::Arc::new(
        candle_margin_softmax::InProcessGroup::new(1)?
            .pop()
            .expect("one rank"),
    );
    let shard = candle_margin_softmax::ClassShard {
        offset: 0,
        count: CLASSES,
        total: CLASSES,
    };
    let f = Tensor::ones((2, DIM), DType::F32, &dev)?;
    let y = Tensor::new(&[0u32, 1], &dev)?;
    let e = plus.sharded_loss(&f, &y, shard, comm).unwrap_err();
    assert!(
        e.to_string()
            .contains("ElasticFace's \"plus\" ordering is not supported with a sharded loss yet"),
        "{e}"
    );
    let mut module = head(Head::arcface())?.elastic(ElasticFace::default())?;
    let e = module
        .set_config(MarginSoftmaxLoss::new(Head::combined()))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("margin_head(arcface): set_config cannot change the head of a MagFace"),
        "{e}"
    );
    Ok(())
}

/// The step kept in a `VarMap` (`elastic_with_state`): saved with W to safetensors and loaded
/// into a head built afresh, which then draws the same margins as the saved head's next call.
#[test]
fn elastic_step_is_saved_and_loaded_with_the_varmap() -> Result<()> {
    use candle_nn::{VarBuilder, VarMap};
    let dev = Device::Cpu;
    let elastic = ElasticFace {
        seed: 5,
        ..ElasticFace::default()
    };
    let build = |varmap: &VarMap| -> Result<MarginHead> {
        let vb = VarBuilder::from_varmap(varmap, DType::F64, &dev);
        MarginHead::new(
            MarginSoftmaxLoss::new(ElasticFace::arcface_head()),
            DIM,
            CLASSES,
            vb.pp("head"),
        )?
        .elastic_with_state(elastic, vb.pp("head"))
    };
    let varmap = VarMap::new();
    let head = build(&varmap)?;
    let mut r = rng(seed_of("elastic_varmap"));
    let normal = Normal::new(0.0, 1.0).unwrap();
    let f: Vec<f64> = (0..ROWS * DIM).map(|_| normal.sample(&mut r)).collect();
    let f = Tensor::from_vec(f, (ROWS, DIM), &dev)?;
    let t: Vec<u32> = (0..ROWS)
        .map(|_| r.random_range(0..CLASSES as u32))
        .collect();
    let y = Tensor::from_vec(t, ROWS, &dev)?;
    for _ in 0..3 {
        head.loss(&f, &y)?;
    }
    assert_eq!(head.elastic_step()?, 3);
    let path =
        std::env::temp_dir().join(format!("elastic_step_{}.safetensors", std::process::id()));
    varmap.save(&path)?;
    let next = head.loss(&f, &y)?.to_scalar::<f64>()?;
    // A head built afresh starts at 0; loading the checkpoint puts it at 3.
    let varmap2 = VarMap::new();
    let resumed = build(&varmap2)?;
    assert_eq!(resumed.elastic_step()?, 0);
    let mut varmap2 = varmap2;
    varmap2.load(&path)?;
    std::fs::remove_file(&path).ok();
    assert_eq!(resumed.elastic_step()?, 3);
    assert_eq!(resumed.loss(&f, &y)?.to_scalar::<f64>()?, next);
    assert_eq!(resumed.elastic_step()?, 4);
    Ok(())
}
