//! The CPU row kernels at every SIMD level this machine has, bitwise against the scalar build
//! (the oracle: every level runs the same source with the same operations in the same order); the
//! fused path's one-exp gradient against the recomputing backward of autograd; and the
//! caller-buffer and in-place variants of `loss_and_grad`.
//!
//! A machine without AVX-512 still runs the AVX-512 code's source through its other levels; a
//! machine with it runs the comparison for that level too.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{MarginSoftmaxLoss, Reduction, SimdLevel, with_simd_level};

use crate::common::*;
use crate::parity::ALL_DTYPES;

/// Shapes around the kernels' 64-entry chunk (C = 63, 64, 65, 129), a single class, and a
/// wider row; targets include the first and last class.
const SHAPES: [(usize, usize); 7] = [
    (3, 1),
    (4, 63),
    (5, 64),
    (3, 65),
    (6, 129),
    (7, 300),
    (2, 2000),
];

/// The op's outputs on one input, each flattened to f64 bit patterns (exact for every dtype).
fn outputs(
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
) -> Result<Vec<(&'static str, Vec<u64>)>> {
    let bits = |t: &Tensor| -> Result<Vec<u64>> {
        Ok(vec_f64(t)?
            .into_iter()
            .map(|v| {
                if v.is_nan() {
                    f64::NAN.to_bits()
                } else {
                    v.to_bits()
                }
            })
            .collect())
    };
    let var = Var::from_tensor(input)?;
    let loss = cfg.loss(var.as_tensor(), targets)?;
    let grads = root(&loss)?.backward()?;
    let dx = grad_of(&grads, &var)?;
    let (fused_loss, fused_grad) = cfg.loss_and_grad(input, targets)?;
    let buffer = input.zeros_like()?;
    let into_loss = cfg.loss_and_grad_into(input, targets, &buffer)?;
    Ok(vec![
        ("loss", bits(&loss)?),
        ("autograd dx", bits(&dx)?),
        ("loss_and_grad loss", bits(&fused_loss)?),
        ("loss_and_grad dx", bits(&fused_grad)?),
        ("into loss", bits(&into_loss)?),
        ("into dx", bits(&buffer)?),
    ])
}

fn option_sets() -> Vec<(&'static str, Opts)> {
    vec![
        ("plain", Opts::default()),
        (
            "smoothing",
            Opts {
                smoothing: 0.1,
                ..Opts::default()
            },
        ),
        ("combo", Opts::combo()),
        (
            "weighted_smoothing_sum",
            Opts {
                smoothing: 0.2,
                weights: true,
                ignore: true,
                ..Opts::default()
            }
            .with_reduction(Reduction::Sum),
        ),
        (
            "softcap",
            Opts {
                smoothing: 0.1,
                ..Opts::default()
            }
            .with_softcap(),
        ),
        ("detached", Opts::combo().with_detached()),
    ]
}

/// One case of the grid: (label, cfg, input, targets, dtype).
type Case = (String, MarginSoftmaxLoss, Tensor, Tensor, DType);

/// Every case of the grid.
fn cases(dev: &Device) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for (head_name, head) in main_heads() {
        for (opt_name, opts) in option_sets() {
            for dtype in ALL_DTYPES {
                for (b, c) in SHAPES {
                    let label = format!("{head_name} {opt_name} {} {b}x{c}", dtype_name(dtype));
                    let seed = seed_of(&label);
                    let mut r = rng(seed);
                    let mut t = gen_targets(&mut r, b, c, opts.ignore);
                    // The first and the last class as targets.
                    if t[0] != IGNORE {
                        t[0] = 0;
                    }
                    t[b - 1] = c as i64 - 1;
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let cfg = opts.cfg(head, c, acc_dtype(dtype), dev, seed)?;
                    out.push((
                        label,
                        cfg,
                        input_tensor(&x, b, c, dtype, dev)?,
                        targets_i64(&t, dev)?,
                        dtype,
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn every_level_matches_scalar_bitwise() -> Result<()> {
    let dev = Device::Cpu;
    let levels = SimdLevel::available();
    assert_eq!(levels[0], SimdLevel::Scalar);
    eprintln!("SIMD levels on this machine: {levels:?}");
    let mut failures = Failures::default();
    for (label, cfg, input, targets, _) in cases(&dev)? {
        let scalar = with_simd_level(SimdLevel::Scalar, || outputs(&cfg, &input, &targets))??;
        for &level in &levels[1..] {
            let got = with_simd_level(level, || outputs(&cfg, &input, &targets))??;
            for ((what, want), (_, got)) in scalar.iter().zip(&got) {
                if let Some(i) = (0..want.len()).find(|&i| want[i] != got[i]) {
                    failures.0.push(format!(
                        "[{label}] {level:?} {what} differs from Scalar at {i}: {} vs {}",
                        f64::from_bits(got[i]),
                        f64::from_bits(want[i])
                    ));
                }
            }
        }
    }
    failures.finish("SIMD levels vs scalar");
    Ok(())
}

/// The fused path keeps e_j = exp(z_j − m_c) from its forward pass and forms p_j = e_j·f_c; the
/// autograd backward recomputes p_j = exp(z_j − lse). They must agree to the dtype's tolerance
/// (at the level this machine picks, and at the scalar level).
#[test]
fn one_exp_gradient_matches_recomputed() -> Result<()> {
    let dev = Device::Cpu;
    let mut failures = Failures::default();
    for level in [SimdLevel::Scalar, SimdLevel::current()] {
        for (label, cfg, input, targets, dtype) in cases(&dev)? {
            let out = with_simd_level(level, || outputs(&cfg, &input, &targets))??;
            let get = |name: &str| -> Vec<f64> {
                out.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.iter().map(|&b| f64::from_bits(b)).collect())
                    .unwrap_or_default()
            };
            // Half-precision outputs are rounded from f32 values that differ by a few f32 ulps:
            // they may round to neighbouring values, one half-precision ulp apart.
            let (tol, floor) = match dtype {
                DType::F16 => (2f64.powi(-10), tols(dtype).1),
                DType::BF16 => (2f64.powi(-7), tols(dtype).1),
                _ => tols(dtype),
            };
            let label = format!("{label} {level:?}");
            failures.check(
                &label,
                compare_vec(
                    "dx",
                    &get("loss_and_grad dx"),
                    &get("autograd dx"),
                    tol,
                    floor,
                ),
            );
            failures.check(
                &label,
                compare_vec("loss", &get("loss_and_grad loss"), &get("loss"), tol, floor),
            );
            // The caller's buffer gets exactly what loss_and_grad returns.
            if get("into dx") != get("loss_and_grad dx")
                || get("into loss") != get("loss_and_grad loss")
            {
                failures.0.push(format!(
                    "[{label}] loss_and_grad_into differs from loss_and_grad"
                ));
            }
        }
    }
    failures.finish("one-exp fused gradient vs autograd");
    Ok(())
}

/// A reused buffer: every entry is overwritten (the buffer starts as NaN, then holds the previous
/// step's gradient); in place, the input becomes exactly loss_and_grad's gradient.
#[test]
fn buffer_reuse_and_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let mut failures = Failures::default();
    for (label, cfg, input, targets, dtype) in cases(&dev)? {
        let (b, c) = input.dims2()?;
        let (want_loss, want_grad) = cfg.loss_and_grad(&input, &targets)?;
        let buffer = Tensor::full(f32::NAN, (b, c), &dev)?.to_dtype(dtype)?;
        let other = (input.clone() * 0.5)?;
        cfg.loss_and_grad_into(&other, &targets, &buffer)?;
        let loss = cfg.loss_and_grad_into(&input, &targets, &buffer)?;
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            let (a, b) = (vec_f64(a)?, vec_f64(b)?);
            Ok(a.len() == b.len()
                && a.iter()
                    .zip(&b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())))
        };
        if !same(&buffer, &want_grad)? || !same(&loss, &want_loss)? {
            failures.0.push(format!(
                "[{label}] reused buffer differs from loss_and_grad"
            ));
        }
        let logits = input.copy()?;
        let loss = cfg.loss_and_grad_in_place(&logits, &targets)?;
        if !same(&logits, &want_grad)? || !same(&loss, &want_loss)? {
            failures.0.push(format!(
                "[{label}] in-place gradient differs from loss_and_grad"
            ));
        }
    }
    failures.finish("buffer reuse and in place");
    Ok(())
}

#[test]
fn into_and_in_place_errors() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = MarginSoftmaxLoss::new(candle_margin_softmax::Head::arcface());
    let x = Tensor::zeros((4, 6), DType::F32, &dev)?;
    let t = Tensor::new(&[0u32, 1, 2, 5], &dev)?;
    let expect_err = |what: &str, r: Result<Tensor>, needle: &str| match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("margin_softmax"),
                "{what}: error does not name the op: {msg}"
            );
            assert!(
                msg.contains(needle),
                "{what}: error does not mention {needle:?}: {msg}"
            );
        }
    };
    expect_err(
        "wrong shape",
        cfg.loss_and_grad_into(&x, &t, &Tensor::zeros((4, 5), DType::F32, &dev)?),
        "shape",
    );
    expect_err(
        "wrong dtype",
        cfg.loss_and_grad_into(&x, &t, &Tensor::zeros((4, 6), DType::BF16, &dev)?),
        "dtype",
    );
    let wide = Tensor::zeros((6, 4), DType::F32, &dev)?;
    expect_err(
        "strided buffer",
        cfg.loss_and_grad_into(&x, &t, &wide.t()?),
        "contiguous",
    );
    expect_err(
        "buffer is the input",
        cfg.loss_and_grad_into(&x, &t, &x),
        "shares storage",
    );
    let base = Tensor::zeros((4, 12), DType::F32, &dev)?;
    expect_err(
        "buffer aliasing the input",
        cfg.loss_and_grad_into(&base.narrow(1, 0, 6)?, &t, &base.narrow(1, 6, 6)?),
        "contiguous",
    );
    expect_err(
        "strided in-place input",
        cfg.loss_and_grad_in_place(&wide.t()?, &t),
        "contiguous",
    );
    expect_err(
        "bad target",
        cfg.loss_and_grad_into(&x, &Tensor::new(&[0u32, 1, 2, 6], &dev)?, &x.zeros_like()?),
        "out of range",
    );
    if let Some(missing) = SimdLevel::ALL.into_iter().find(|l| !l.is_available()) {
        let r = with_simd_level(missing, || ());
        let msg = r
            .expect_err("an unavailable level must be an error")
            .to_string();
        assert!(
            msg.contains("margin_softmax") && msg.contains("not available"),
            "{msg}"
        );
    }
    Ok(())
}
