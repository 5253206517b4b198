//! The reference's own checks: against candle-nn, hand-computed values and finite differences.

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
fn check_grad(cfg: &MarginSoftmaxLoss, x: &[f64], shape: (usize, usize), y: &Tensor) -> Result<()> {
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
        -1.3, -1.0, -0.999, -0.95, -0.9, -0.6, -0.3, -1e-3, 0.0, 0.2, 0.5, 0.7, 0.9, 0.99999, 1.0,
        1.2,
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
