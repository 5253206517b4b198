//! The CUDA suite: the CPU suite's grids run on CUDA device 0, plus GPU-sized shapes, the
//! fused / split path boundary, and bitwise determinism.
//!
//! Every test starts with [`cuda_device`]: without a CUDA device (or without the `cuda` feature)
//! it prints "skipping: no CUDA device" and returns, unless `REQUIRE_GPU=1`, where it fails.
//!
//! Inputs are generated on the host (as in the CPU suite) and moved to the device; the
//! reference always runs on the CPU (`parity::reference_on_cpu`), and every comparison reads both
//! sides back to the host. The tolerances are those of the CPU suite ([`tols`]): the kernels
//! accumulate in the same type (f32 for f32 / f16 / bf16, f64 for f64) in another order.

use candle_core::{DType, Device, Result, Tensor};
use candle_margin_softmax::{Head, MarginSoftmaxLoss, Reduction};

use crate::common::*;
use crate::parity;
use crate::{edge, errors, finite_diff};

/// CUDA device 0, or `None` (after saying so) when there is none; with `REQUIRE_GPU=1` a
/// missing device fails the test instead.
pub fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!(
                    "REQUIRE_GPU=1 but no CUDA device is available (build with `--features \
                     cuda` on a machine with a GPU): {e}"
                );
            }
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// The largest C that `loss_and_grad` runs through the fused one-block-per-row kernel for each
/// input dtype (see `loss_and_grad`'s docs): round_up(C·sizeof(T), 16) ≤ 48 KiB − 1024 − 2048,
/// i.e. 11520 (f32), 23040 (f16, bf16), 5760 (f64).
fn fused_limit(dtype: DType) -> usize {
    (48 * 1024 - 1024 - 2048) / dtype.size_in_bytes()
}

// ---- The CPU suite's grids on the GPU. ----

#[test]
fn gpu_parity_small_heads() {
    let Some(dev) = cuda_device() else { return };
    parity::small_heads(&dev);
}

#[test]
fn gpu_parity_small_options() {
    let Some(dev) = cuda_device() else { return };
    parity::small_options(&dev);
}

#[test]
fn gpu_parity_small_combo() {
    let Some(dev) = cuda_device() else { return };
    parity::small_combo(&dev);
}

#[test]
fn gpu_parity_small_row_scale() {
    let Some(dev) = cuda_device() else { return };
    parity::small_row_scale(&dev);
}

#[test]
fn gpu_parity_medium() {
    let Some(dev) = cuda_device() else { return };
    parity::medium(&dev);
}

#[test]
fn gpu_parity_large_heads() {
    let Some(dev) = cuda_device() else { return };
    parity::large_heads(&dev);
}

#[test]
fn gpu_parity_large_options() {
    let Some(dev) = cuda_device() else { return };
    parity::large_options(&dev);
}

#[test]
fn gpu_parity_large_row_scale() {
    let Some(dev) = cuda_device() else { return };
    parity::large_row_scale(&dev);
}

#[test]
fn gpu_edge_cases() {
    let Some(dev) = cuda_device() else { return };
    edge::cos_pm1(&dev);
    edge::outside_clamp(&dev);
    edge::s64_half(&dev);
    edge::rbf_far(&dev);
    edge::extreme_targets(&dev);
    edge::all_ignored(&dev);
    edge::focal_confident(&dev);
    edge::one_class(&dev);
    edge::non_contiguous(&dev);
    edge::u32_vs_i64(&dev);
}

#[test]
fn gpu_edge_empty_batch() {
    let Some(dev) = cuda_device() else { return };
    edge::empty_batch(&dev);
}

#[test]
fn gpu_finite_differences() {
    let Some(dev) = cuda_device() else { return };
    finite_diff::every_head_every_option(&dev);
    finite_diff::detached_where_exact(&dev);
    finite_diff::row_scale(&dev);
}

#[test]
fn gpu_errors() {
    let Some(dev) = cuda_device() else { return };
    errors::invalid_inputs(&dev);
    errors::invalid_hyper_parameters(&dev);
    errors::valid_boundaries(&dev);
}

/// The first line of an error (candle appends a backtrace when RUST_BACKTRACE is set).
fn message<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(e) => e.to_string().lines().next().unwrap_or("").to_string(),
    }
}

/// Invalid target values give the same error on the GPU as on the CPU (the targets are read
/// back and checked by the same code), through the forward op and `loss_and_grad`.
#[test]
fn gpu_target_errors_match_cpu() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    let (b, c) = (4usize, 6usize);
    let mut r = rng(seed_of("gpu target errors"));
    let x = gen_input(&mut r, &Head::arcface(), b, c, &[0; 4]);
    let cases: Vec<(&str, Vec<i64>, Option<i64>)> = vec![
        ("target = C", vec![0, 6, 1, 2], Some(-100)),
        ("negative target", vec![0, 1, -5, 2], Some(-100)),
        ("ignore_index None", vec![0, -100, 1, 2], None),
    ];
    for (name, t, ignore) in cases {
        for dtype in [DType::F32, DType::F64] {
            for targets_u32 in [false, true] {
                if targets_u32 && t.iter().any(|&v| v < 0) {
                    continue;
                }
                let label = format!("{name} {} u32={targets_u32}", dtype_name(dtype));
                let cfg = MarginSoftmaxLoss::new(Head::arcface()).ignore_index(ignore);
                let on = |d: &Device| -> Result<(String, String)> {
                    let input = input_tensor(&x, b, c, dtype, d)?;
                    let targets = if targets_u32 {
                        let v: Vec<u32> = t.iter().map(|&v| v as u32).collect();
                        Tensor::from_vec(v, b, d)?
                    } else {
                        targets_i64(&t, d)?
                    };
                    Ok((
                        message(cfg.loss(&input, &targets)),
                        message(cfg.loss_and_grad(&input, &targets)),
                    ))
                };
                match (on(&Device::Cpu), on(&dev)) {
                    (Ok(cpu), Ok(gpu)) => {
                        if cpu != gpu || cpu.0 == "Ok" || cpu.1 == "Ok" {
                            f.0.push(format!("[{label}] CPU {cpu:?} vs GPU {gpu:?}"));
                        }
                    }
                    (a, b) => f.0.push(format!(
                        "[{label}] setup failed: {:?} / {:?}",
                        a.err(),
                        b.err()
                    )),
                }
            }
        }
    }
    f.finish("gpu: target errors identical to the CPU's");
}

// ---- The fused / split boundary of loss_and_grad. ----

/// C at the fused kernel's limit and one past it (the three-kernel path), for every dtype, with
/// the combination of options and with a per-row scale: parity with the CPU reference.
#[test]
fn gpu_fused_split_boundary() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dtype);
        for c in [limit, limit + 1] {
            for (hn, head) in [("arcface", Head::arcface()), ("rbf", Head::rbf())] {
                for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                    for with_row_scale in [false, true] {
                        let name = format!("boundary {hn}+{on}");
                        parity::parity_case(
                            &dev,
                            &name,
                            head,
                            &opts,
                            (8, c),
                            dtype,
                            with_row_scale,
                            &mut f,
                        );
                    }
                }
            }
        }
    }
    f.finish("gpu: fused / split boundary");
}

/// More rows than the grid cap of 65535 (the fused and backward kernels are grid-stride over
/// rows; `loss` + backward always runs `ms_backward`), against the CPU fused op.
#[test]
fn gpu_many_rows() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    let (b, c) = (70_000usize, 16usize);
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let label = format!("many rows {b}x{c} {}", dtype_name(dtype));
        if let Err(e) = vs_cpu_op(
            &dev,
            &label,
            Head::arcface(),
            &Opts::combo(),
            (b, c),
            dtype,
            &mut f,
        ) {
            f.err(&label, e);
        }
    }
    f.finish("gpu: more rows than the grid cap");
}

// ---- GPU-sized shapes. ----

/// Loss + autograd gradient and `loss_and_grad` on the GPU against the CPU fused op.
fn vs_cpu_op(
    dev: &Device,
    label: &str,
    head: Head,
    opts: &Opts,
    (b, c): (usize, usize),
    dtype: DType,
    f: &mut Failures,
) -> Result<()> {
    let seed = seed_of(label);
    let mut r = rng(seed);
    let t = gen_targets(&mut r, b, c, opts.ignore);
    let x = gen_input(&mut r, &head, b, c, &t);
    let cpu = Device::Cpu;
    let cfg_cpu = opts.cfg(head, c, dtype, &cpu, seed)?;
    let cfg_gpu = cfg_on(&cfg_cpu, dev)?;
    let input_cpu = input_tensor(&x, b, c, dtype, &cpu)?;
    let targets_cpu = targets_i64(&t, &cpu)?;
    drop(x);
    let input_gpu = input_cpu.to_device(dev)?;
    let targets_gpu = targets_cpu.to_device(dev)?;
    let (tl, tg) = tols(dtype);
    let s = head.scale();
    let bn = b.max(1) as f64;

    let want = autograd(Side::Fused, &cfg_cpu, &input_cpu, &targets_cpu, None)?;
    let got = autograd(Side::Fused, &cfg_gpu, &input_gpu, &targets_gpu, None)?;
    f.check(
        label,
        compare("loss vs CPU op", &got.loss, &want.loss, tl, s),
    );
    f.check(
        label,
        compare("autograd dinput vs CPU op", &got.dx, &want.dx, tg, s / bn),
    );
    drop(got);
    let (want_l, want_g) = cfg_cpu.loss_and_grad(&input_cpu, &targets_cpu)?;
    let (got_l, got_g) = cfg_gpu.loss_and_grad(&input_gpu, &targets_gpu)?;
    f.check(
        label,
        compare("loss_and_grad loss vs CPU op", &got_l, &want_l, tl, s),
    );
    f.check(
        label,
        compare(
            "loss_and_grad dinput vs CPU op",
            &got_g,
            &want_g,
            tg,
            s / bn,
        ),
    );
    Ok(())
}

/// The three large-vocabulary configurations.
fn big_configs() -> Vec<(&'static str, Head, Opts)> {
    vec![
        (
            "arcface+smoothing",
            Head::arcface(),
            Opts {
                smoothing: 0.1,
                ..Opts::default()
            },
        ),
        ("rbf", Head::rbf(), Opts::default()),
        ("softmax", Head::softmax(), Opts::default()),
    ]
}

/// (1024, 32000): every configuration in f32 and bf16, against the CPU fused op and the CPU
/// reference.
#[test]
fn gpu_big_1024x32000() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    let (b, c) = (1024usize, 32_000usize);
    for (name, head, opts) in big_configs() {
        for dtype in [DType::F32, DType::BF16] {
            let label = format!("{name} {b}x{c} {}", dtype_name(dtype));
            if let Err(e) = vs_cpu_op(&dev, &label, head, &opts, (b, c), dtype, &mut f) {
                f.err(&label, e);
            }
            parity::parity_case(&dev, name, head, &opts, (b, c), dtype, false, &mut f);
        }
    }
    f.finish("gpu: 1024 x 32000");
}

/// (64, 1_000_000): every configuration in f32 and bf16 against the CPU fused op; ArcFace with
/// smoothing in f32 also against the CPU reference (slow on the CPU).
#[test]
fn gpu_big_64x1m() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    let (b, c) = (64usize, 1_000_000usize);
    for (name, head, opts) in big_configs() {
        for dtype in [DType::F32, DType::BF16] {
            let label = format!("{name} {b}x{c} {}", dtype_name(dtype));
            if let Err(e) = vs_cpu_op(&dev, &label, head, &opts, (b, c), dtype, &mut f) {
                f.err(&label, e);
            }
        }
    }
    let (name, head, opts) = big_configs().swap_remove(0);
    parity::parity_case(&dev, name, head, &opts, (b, c), DType::F32, false, &mut f);
    f.finish("gpu: 64 x 1000000");
}

// ---- Determinism. ----

/// A tensor's exact values (every f16 / bf16 / f32 value converts to f64 exactly).
fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(vec_f64(t)?.iter().map(|v| v.to_bits()).collect())
}

/// Two runs of `loss_and_grad` (with and without a row scale) and of `loss` + backward give
/// bitwise identical results, in the fused path (C below the limit) and in the split path
/// (above it, with several blocks per row).
#[test]
fn gpu_deterministic() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let limit = fused_limit(dtype);
        for (b, c) in [(256usize, limit / 2), (256, limit + 1), (16, 200_000)] {
            for (hn, head) in [("arcface", Head::arcface()), ("rbf", Head::rbf())] {
                let label = format!("det {hn} {b}x{c} {}", dtype_name(dtype));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, true);
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let cfg = Opts::combo().cfg(head, c, dtype, &dev, 1)?;
                    let input = input_tensor(&x, b, c, dtype, &dev)?;
                    let targets = targets_i64(&t, &dev)?;
                    let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, &dev)?
                        .to_dtype(acc_dtype(dtype))?;
                    let once = || -> Result<Vec<Vec<u64>>> {
                        let (l, g) = cfg.loss_and_grad(&input, &targets)?;
                        let (l2, g2, gr) =
                            cfg.loss_and_grad_with_row_scale(&input, &targets, &rs)?;
                        let a = autograd(Side::Fused, &cfg, &input, &targets, Some(&rs))?;
                        let dr = a.dr.expect("row scale gradient");
                        [l, g, l2, g2, gr, a.loss, a.dx, dr]
                            .iter()
                            .map(bits)
                            .collect()
                    };
                    let (first, second) = (once()?, once()?);
                    let names = [
                        "loss_and_grad loss",
                        "loss_and_grad dinput",
                        "loss_and_grad_with_row_scale loss",
                        "loss_and_grad_with_row_scale dinput",
                        "loss_and_grad_with_row_scale drow_scale",
                        "loss",
                        "autograd dinput",
                        "autograd drow_scale",
                    ];
                    for ((what, p), q) in names.iter().zip(&first).zip(&second) {
                        if p != q {
                            let k = p.iter().zip(q).position(|(u, v)| u != v).unwrap_or(0);
                            f.0.push(format!("[{label}] {what}: two runs differ (first at {k})"));
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
    f.finish("gpu: bitwise determinism");
}

/// Every reduction with the combination of options and a per-row scale, on both paths of
/// `loss_and_grad` (C = 4000: fused; C = 40000: split, 10 blocks per row in the forward).
#[test]
fn gpu_reduction_variants_big() {
    let Some(dev) = cuda_device() else { return };
    let mut f = Failures::default();
    for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for (b, c) in [(96usize, 4000usize), (96, 40_000)] {
            let opts = Opts::combo().with_reduction(red);
            let name = format!("combo {red:?}");
            parity::parity_case(
                &dev,
                &name,
                Head::combined(),
                &opts,
                (b, c),
                DType::F32,
                true,
                &mut f,
            );
        }
    }
    f.finish("gpu: reductions on both paths");
}
