//! MagFace (`MarginHead::magface`) against a float64 re-derivation written from the official
//! code (IrvingMeng/MagFace, `models/magface.py`: `MagLinear.forward`, `MagLoss`), differentiated
//! by candle autograd: the loss (cross-entropy + λ_g·mean g) and the gradients into the
//! embeddings (through the cosines, the margin m(‖f‖) and g) and W. Norms below l_a, inside
//! and above u_a; the easy margin (`MagLinear`'s default) and the fallback; chunked and fused
//! passes; f64 and f32 heads; the errors.

use std::f64::consts::PI;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessGroup, MagFace, MarginHead, MarginSoftmaxLoss,
};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::common::{GridFailures, cell_verdict, first_line, loss_and_grad_checks, rng, seed_of};

const ROWS: usize = 7;
const DIM: usize = 16;
const CLASSES: usize = 11;

/// PyTorch's `clamp(lo, hi)`: the gradient passes inside [lo, hi].
fn clamp_torch(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let inside = x.ge(lo)?.mul(&x.le(hi)?)?;
    inside.where_cond(x, &x.clamp(lo, hi)?.detach())
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}

/// The official MagFace loss in f64: `MagLinear.forward` then `MagLoss.forward`, with
/// `F.cross_entropy` (mean) and λ_g·mean(g).
fn official(
    f: &Tensor,
    w: &Tensor,
    targets: &[i64],
    mf: &MagFace,
    s: f64,
    easy: bool,
) -> Result<Tensor> {
    let dev = f.device();
    let x_norm = clamp_torch(&f.sqr()?.sum_keepdim(1)?.sqrt()?, mf.l_a, mf.u_a)?;
    let slope = (mf.u_margin - mf.l_margin) / (mf.u_a - mf.l_a);
    let ada_margin = (((&x_norm - mf.l_a)? * slope)? + mf.l_margin)?;
    let (cos_m, sin_m) = (ada_margin.cos()?, ada_margin.sin()?);
    let cos_theta = clamp_torch(&l2_normalize(f)?.matmul(&l2_normalize(w)?.t()?)?, -1.0, 1.0)?;
    let sin_theta = (1.0 - cos_theta.sqr()?)?.sqrt()?;
    let cos_theta_m = (cos_theta.broadcast_mul(&cos_m)? - sin_theta.broadcast_mul(&sin_m)?)?;
    let shape = cos_theta.shape().clone();
    let cos_theta_m = if easy {
        cos_theta.gt(0.0)?.where_cond(&cos_theta_m, &cos_theta)?
    } else {
        let mm = ((PI - &ada_margin)?.sin()? * &ada_margin)?;
        let threshold = (PI - &ada_margin)?.cos()?;
        let over = cos_theta.broadcast_gt(&threshold)?;
        over.where_cond(&cos_theta_m, &cos_theta.broadcast_sub(&mm)?)?
    };
    let index = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), dev)?;
    let cols = Tensor::arange(0i64, CLASSES as i64, dev)?.unsqueeze(0)?;
    let one_hot = cols.broadcast_eq(&index)?.broadcast_as(&shape)?;
    let output = one_hot.where_cond(&(cos_theta_m * s)?, &(cos_theta * s)?)?;
    let log_p = candle_nn::ops::log_softmax(&output, D::Minus1)?;
    let ce = log_p.gather(&index, 1)?.neg()?.mean_all()?;
    let g = ((&x_norm / (mf.u_a * mf.u_a))? + x_norm.recip()?)?.mean_all()?;
    ce + (g * mf.lambda_g)?
}

#[test]
fn magface_matches_the_official_formula() {
    let mf = MagFace::default();
    let mut grid = GridFailures::default();
    for easy in [true, false] {
        for dtype in [DType::F64, DType::F32] {
            for chunk in [None, Some(3)] {
                let label = format!("magface/easy{easy}/{dtype:?}/chunk{chunk:?}");
                grid.cell(|| {
                    let run = || -> Result<Vec<std::result::Result<(), String>>> {
                        let dev = Device::Cpu;
                        let mut r = rng(seed_of(&label));
                        let normal = Normal::new(0.0, 1.0).unwrap();
                        // Rows of norm ≈ 5 (below l_a), inside [10, 110] and ≈ 130 (above u_a).
                        let norms = [5.0, 12.0, 30.0, 55.0, 80.0, 105.0, 130.0];
                        let mut f = Vec::with_capacity(ROWS * DIM);
                        for &n in &norms {
                            let v: Vec<f64> = (0..DIM).map(|_| normal.sample(&mut r)).collect();
                            let len = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                            f.extend(v.iter().map(|x| x * n / len));
                        }
                        let w: Vec<f64> = (0..CLASSES * DIM)
                            .map(|_| normal.sample(&mut r) * 0.1)
                            .collect();
                        let t: Vec<i64> = (0..ROWS)
                            .map(|_| r.random_range(0..CLASSES as i64))
                            .collect();
                        let head = Head::ArcFace {
                            s: 64.0,
                            m: 0.5,
                            easy_margin: easy,
                        };
                        // The head, in `dtype`.
                        let fv = Var::from_tensor(
                            &Tensor::from_vec(f.clone(), (ROWS, DIM), &dev)?.to_dtype(dtype)?,
                        )?;
                        let wv = Var::from_tensor(
                            &Tensor::from_vec(w.clone(), (CLASSES, DIM), &dev)?.to_dtype(dtype)?,
                        )?;
                        let mut module = MarginHead::from_weight(
                            MarginSoftmaxLoss::new(head),
                            wv.as_tensor().clone(),
                            None,
                        )?
                        .magface(mf)?;
                        if let Some(k) = chunk {
                            module = module.chunk_classes(k)?;
                        }
                        let y = Tensor::from_vec(t.clone(), ROWS, &dev)?;
                        let loss = module.loss(fv.as_tensor(), &y)?;
                        let grads = loss.backward()?;
                        // The official formula, in f64.
                        let f64v = Var::from_tensor(&Tensor::from_vec(f, (ROWS, DIM), &dev)?)?;
                        let w64v = Var::from_tensor(&Tensor::from_vec(w, (CLASSES, DIM), &dev)?)?;
                        let want =
                            official(f64v.as_tensor(), w64v.as_tensor(), &t, &mf, 64.0, easy)?;
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
    grid.assert_none();
}

#[test]
fn magface_errors_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::ones((CLASSES, DIM), DType::F32, &dev)?;
    let head = |h: Head| MarginHead::from_weight(MarginSoftmaxLoss::new(h), w.clone(), None);
    let err = |r: Result<MarginHead>| first_line(&r.err().expect("an error"));
    assert_eq!(
        err(head(Head::cosface())?.magface(MagFace::default())),
        "margin_head(cosface): MagFace needs the ArcFace head (MagFace::head() is the official one)"
    );
    let bad = MagFace {
        l_a: 110.0,
        u_a: 10.0,
        ..MagFace::default()
    };
    assert!(
        err(head(MagFace::head())?.magface(bad)).starts_with(
            "margin_head(arcface): MagFace needs finite parameters with 0 < l_a < u_a"
        )
    );
    // Sharded, a rank whose embeddings are wrong still joins the ranks' agreement, which
    // returns its error (a hang without it).
    let module = head(MagFace::head())?.magface(MagFace::default())?;
    let comm: std::sync::Arc<dyn Communicator> =
        std::sync::Arc::new(InProcessGroup::new(1)?.pop().expect("one rank"));
    let f = Tensor::ones((2, DIM + 1), DType::F32, &dev)?;
    let y = Tensor::new(&[0u32, 1], &dev)?;
    let shard = ClassShard {
        offset: 0,
        count: CLASSES,
        total: CLASSES,
    };
    let e = module.sharded_loss(&f, &y, shard, comm).unwrap_err();
    assert!(
        first_line(&e).starts_with("margin_head(arcface): rank 0 failed its own checks")
            && first_line(&e).contains("embeddings must have shape [B, D]"),
        "{e}"
    );
    Ok(())
}
