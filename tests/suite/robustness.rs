//! Issue 21's single-machine items: cosine heads that normalise huge or tiny vectors without
//! overflow, 8-, 6- and 4-bit float weights and row scales refused, an empty batch through
//! `predict` / `cosines`, every error starting with the op's name.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginHead, MarginSoftmaxLoss};

use crate::common::{rng, seed_of};

fn uniform(n: usize, label: &str) -> Vec<f64> {
    use rand::Rng;
    let mut r = rng(seed_of(label));
    (0..n).map(|_| r.random_range(-1.0..1.0)).collect()
}

/// The ArcFace head's loss and the embeddings' gradient with embeddings and W scaled by
/// (`fs`, `ws`), in `dtype`.
fn arcface_at(fs: f64, ws: f64, dtype: DType) -> Result<(f64, Vec<f64>)> {
    let dev = Device::Cpu;
    let (b, d, c) = (4usize, 8usize, 11usize);
    let f = Tensor::from_vec(uniform(b * d, "overflow f"), (b, d), &dev)?;
    let w = Tensor::from_vec(uniform(c * d, "overflow w"), (c, d), &dev)?;
    let f = Var::from_tensor(&(f * fs)?.to_dtype(dtype)?)?;
    let w = (w * ws)?.to_dtype(dtype)?;
    let head = MarginHead::from_weight(MarginSoftmaxLoss::new(Head::arcface()), w, None)?;
    let t = Tensor::new(&[0u32, 3, 7, 10], &dev)?;
    let loss = head.loss(f.as_tensor(), &t)?;
    let g = loss.backward()?.get(&f).expect("gradient").clone();
    // The gradient scales as 1/fs: compare it at scale 1.
    let g = (g.to_dtype(DType::F64)? * fs)?;
    Ok((
        loss.to_dtype(DType::F64)?.to_scalar()?,
        g.flatten_all()?.to_vec1()?,
    ))
}

/// ‖f‖² and ‖W_j‖² overflow (f32 ×1e20, f64 ×1e160): the loss and the (rescaled) gradient must
/// equal those at scale 1. (Underflow needs vectors below the normalisation's ε = 1e-12, where
/// max(‖x‖, ε) rightly changes the result, as in PyTorch.)
#[test]
fn cosine_heads_normalise_without_overflow() -> Result<()> {
    for (dtype, big, tol) in [(DType::F32, 1e20, 1e-5), (DType::F64, 1e160, 1e-12)] {
        let (want, want_g) = arcface_at(1.0, 1.0, dtype)?;
        for (fs, ws) in [(big, 1.0), (1.0, big), (big, big), (1e6, 1e-3)] {
            let (got, g) = arcface_at(fs, ws, dtype)?;
            assert!(
                (got - want).abs() <= tol * want.abs(),
                "{dtype:?} f×{fs:e} W×{ws:e}: loss {got} vs {want}"
            );
            let scale = want_g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(&want_g) {
                assert!(
                    (a - b).abs() <= tol * 10.0 * scale,
                    "{dtype:?} f×{fs:e} W×{ws:e}: gradient {a} vs {b}"
                );
            }
        }
    }
    Ok(())
}

/// Class weights and row scales in the 8-, 6- and 4-bit float formats: an `Err` naming the op
/// (F8E4M3 weights used to hang in candle's conversion).
#[test]
fn low_bit_float_weights_and_scales_are_refused() -> Result<()> {
    let dev = Device::Cpu;
    let input = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let targets = Tensor::new(&[0u32, 1], &dev)?;
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    for dtype in [
        DType::F8E4M3,
        DType::F6E2M3,
        DType::F6E3M2,
        DType::F4,
        DType::F8E8M0,
    ] {
        // Some formats cannot even be made on the CPU; those need no refusal.
        let Ok(w) = Tensor::zeros(3, dtype, &dev) else {
            continue;
        };
        let msg = cfg
            .clone()
            .class_weights(w)
            .expect_err("refused")
            .to_string();
        assert!(msg.starts_with("margin_softmax_ce"), "{dtype:?}: {msg}");
        let Ok(r) = Tensor::zeros(2, dtype, &dev) else {
            continue;
        };
        let msg = cfg
            .loss_with_row_scale(&input, &targets, &r)
            .expect_err("refused")
            .to_string();
        assert!(msg.starts_with("margin_softmax_ce"), "{dtype:?}: {msg}");
    }
    Ok(())
}

/// `predict`, `cosines` and `logits` of an empty batch: empty results, not candle's
/// "empty tensor for reduce".
#[test]
fn empty_batch_predict_and_cosines() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::ones((5, 3), DType::F32, &dev)?;
    let head = MarginHead::from_weight(MarginSoftmaxLoss::new(Head::arcface()), w, None)?;
    let f = Tensor::zeros((0, 3), DType::F32, &dev)?;
    assert_eq!(head.predict(&f)?.dims(), [0]);
    assert_eq!(head.predict(&f)?.dtype(), DType::U32);
    assert_eq!(head.cosines(&f)?.dims(), [0, 5]);
    assert_eq!(head.logits(&f)?.dims(), [0, 5]);
    Ok(())
}

/// `loss_and_grad_into` with a buffer that is the input itself: the error names the op.
#[test]
fn aliasing_error_names_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let input = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let targets = Tensor::new(&[0u32, 1], &dev)?;
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    let msg = cfg
        .loss_and_grad_into(&input, &targets, &input)
        .expect_err("aliasing")
        .to_string();
    assert!(msg.starts_with("margin_softmax_ce"), "{msg}");
    Ok(())
}

/// Σ_i w_{y_i} past f32's range for valid f32 weights (3e38 on a class that 4 of 6 rows
/// target): the mean and its gradient stay finite and match the same problem in f64, through
/// `loss` (autograd) and `loss_and_grad`.
#[test]
fn weight_sum_beyond_f32() -> Result<()> {
    let dev = Device::Cpu;
    let (b, c) = (6usize, 3usize);
    // The target's logit dominates: per-row losses ~1e-4, so w·ℓ stays in range.
    let targets = [0u32, 0, 1, 0, 2, 0];
    let x: Vec<f64> = (0..b * c)
        .map(|k| {
            if k % c == targets[k / c] as usize {
                10.0
            } else {
                0.1 * (k % 5) as f64
            }
        })
        .collect();
    let t = Tensor::new(&targets, &dev)?;
    let run = |dtype: DType| -> Result<(f64, f64, Vec<f64>)> {
        let w = Tensor::new(&[3e38f64, 1.0, 2.0], &dev)?.to_dtype(dtype)?;
        let cfg = MarginSoftmaxLoss::new(Head::softmax()).class_weights(w)?;
        let input = Var::from_tensor(&Tensor::from_vec(x.clone(), (b, c), &dev)?.to_dtype(dtype)?)?;
        let loss = cfg.loss(input.as_tensor(), &t)?;
        let auto = loss.backward()?.get(&input).expect("gradient").clone();
        let (fused, grad) = cfg.loss_and_grad(input.as_tensor(), &t)?;
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let fused = fused.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let auto: Vec<f64> = auto.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let grad: Vec<f64> = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        for (a, g) in auto.iter().zip(&grad) {
            assert!(
                (a - g).abs() <= 1e-3 * g.abs().max(1e-6),
                "{dtype:?}: {a} vs {g}"
            );
        }
        Ok((loss, fused, grad))
    };
    let (want, _, want_grad) = run(DType::F64)?;
    let (loss, fused, grad) = run(DType::F32)?;
    assert!(want.is_finite() && want > 0.0);
    // ℓ ~ 1e-4 is a difference of ~10 in f32: a few digits of it.
    for got in [loss, fused] {
        assert!((got - want).abs() <= 1e-3 * want, "{got} vs {want}");
    }
    let scale = want_grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (g, w) in grad.iter().zip(&want_grad) {
        // The factor 1/Σw is subnormal in f32: a few significant digits.
        assert!(g.is_finite() && (g - w).abs() <= 1e-2 * scale, "{g} vs {w}");
    }
    Ok(())
}
