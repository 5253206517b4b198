//! The CUDA kernels' math, checked on the CPU: `kernels/host_check/host_check.cpp` compiles
//! kernels/heads.cuh and kernels/common.cuh as host C++ and replays the kernels' per-row
//! algorithm (split partials, ordered merge, finalize_row, grad_element). These tests compare it
//! with the CPU op over every head, margin mode and criterion option, in f64 and f32, so the
//! kernels' formulas are tested on machines without a GPU. What this cannot cover (vector loads,
//! shuffles, shared memory, grid strides) the kernel suite does (`tests/suite/kernels.rs`, on a GPU or through the emulated kernels).
//!
//! Built only with the `kernel-host-check` feature (it needs a C++ compiler):
//! `cargo test --features kernel-host-check --lib kernel_check`.

use candle_core::{DType, Device, Tensor};

use crate::backends::launch::params::MsParams;
use crate::config::{Head, MarginGrad, MarginSoftmaxLoss, Reduction};
use crate::layout::{ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::op;

unsafe extern "C" {
    fn ms_host_replay_row_f32(
        p: *const MsParams,
        poly: *const f32,
        weights: *const f32,
        x: *const f32,
        target: i32,
        scale: f32,
        stats: *mut f32,
        info: *mut f32,
        grad: *mut f32,
    );
    fn ms_host_replay_row_f64(
        p: *const MsParams,
        poly: *const f64,
        weights: *const f64,
        x: *const f64,
        target: i32,
        scale: f64,
        stats: *mut f64,
        info: *mut f64,
        grad: *mut f64,
    );
}

/// A small deterministic generator (the check needs no statistical quality).
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn heads() -> Vec<Head> {
    vec![
        Head::Softmax { s: 3.0 },
        Head::CosFace { s: 30.0, m: 0.35 },
        Head::arcface(),
        Head::ArcFace {
            s: 30.0,
            m: 0.5,
            easy_margin: true,
        },
        Head::ArcFace {
            s: 16.0,
            m: 2.9,
            easy_margin: false,
        },
        Head::combined(),
        Head::Combined {
            s: 20.0,
            m1: 1.7,
            m2: 0.4,
            m3: 0.1,
        },
        Head::SphereFace {
            s: 12.0,
            m: 4.0,
            lambda: 5.0,
        },
        Head::SphereFace {
            s: 12.0,
            m: 3.0,
            lambda: 0.0,
        },
        Head::rbf(),
    ]
}

fn option_sets(classes: usize) -> Vec<(&'static str, MarginSoftmaxLoss)> {
    // Class weights, one of them 0 (a zero weight must add 0 to the smoothing sums, not NaN).
    let weights: Vec<f64> = (0..classes)
        .map(|j| {
            if j == 3 {
                0.0
            } else {
                0.5 + (j % 5) as f64 * 0.3
            }
        })
        .collect();
    let weights = Tensor::new(weights.as_slice(), &Device::Cpu).expect("weights tensor");
    let weighted = |cfg: MarginSoftmaxLoss| {
        cfg.class_weights(weights.clone())
            .expect("valid class weights")
    };
    let base = |head| {
        MarginSoftmaxLoss::new(head)
            .reduction(Reduction::None)
            .ignore_index(Some(-1))
    };
    vec![
        ("plain", base(Head::softmax())),
        ("smoothing", base(Head::softmax()).label_smoothing(0.1)),
        ("focal", base(Head::softmax()).focal_gamma(2.0)),
        ("focal 0.5", base(Head::softmax()).focal_gamma(0.5)),
        ("poly", base(Head::softmax()).poly(&[1.0, -0.4, 0.2])),
        ("z-loss", base(Head::softmax()).z_loss(1e-3)),
        ("weights", weighted(base(Head::softmax()))),
        (
            "weights + smoothing",
            weighted(base(Head::softmax()).label_smoothing(0.2)),
        ),
        ("soft-capping", base(Head::softmax()).logit_softcap(10.0)),
        (
            "soft-capping + smoothing",
            base(Head::softmax())
                .logit_softcap(7.0)
                .label_smoothing(0.1),
        ),
        (
            "everything",
            weighted(
                base(Head::softmax())
                    .label_smoothing(0.1)
                    .focal_gamma(1.5)
                    .poly(&[1.0])
                    .z_loss(1e-4),
            ),
        ),
        (
            "everything + soft-capping",
            weighted(
                base(Head::softmax())
                    .label_smoothing(0.1)
                    .focal_gamma(1.5)
                    .poly(&[1.0, -0.4])
                    .z_loss(1e-4)
                    .logit_softcap(12.0),
            ),
        ),
    ]
}

/// Inputs for the head: cosines (some exactly ±1 and some just outside), squared distances
/// (some far, some negative), or logits.
fn input_row(head: &Head, classes: usize, rng: &mut Lcg) -> Vec<f64> {
    (0..classes)
        .map(|j| match head {
            Head::Softmax { .. } => rng.uniform(-4.0, 4.0),
            Head::Rbf { .. } => match j % 11 {
                3 => rng.uniform(1e2, 1e6),
                7 => -1e-3,
                _ => rng.uniform(0.0, 60.0),
            },
            _ => match j % 13 {
                2 => 1.0,
                5 => -1.0,
                9 => 1.0 + 1e-6,
                _ => rng.uniform(-1.0, 1.0),
            },
        })
        .collect()
}

/// Compares the replayed kernels with the CPU op for one configuration, dtype and shape.
fn check(cfg: &MarginSoftmaxLoss, dtype: DType, rows: usize, classes: usize, splits: usize) {
    let mut rng = Lcg(0x5eed ^ (classes as u64) << 8 ^ rows as u64);
    let mut x = Vec::with_capacity(rows * classes);
    for _ in 0..rows {
        x.extend(input_row(&cfg.head, classes, &mut rng));
    }
    // Targets: every row's own class except one ignored row; the target input made larger for
    // the cosine heads in half the rows, so that the margin matters.
    let targets: Vec<i64> = (0..rows)
        .map(|i| {
            if i == 1 {
                -1
            } else {
                ((i * 7) % classes) as i64
            }
        })
        .collect();
    for (i, &t) in targets.iter().enumerate() {
        if t >= 0 && cfg.head.takes_cosine() && i % 2 == 0 {
            x[i * classes + t as usize] = rng.uniform(0.2, 0.95);
        }
    }
    let scales: Vec<f64> = (0..rows).map(|i| 4.0 + i as f64).collect();
    let dev = Device::Cpu;
    let input = Tensor::from_vec(x.clone(), (rows, classes), &dev)
        .and_then(|t| t.to_dtype(dtype))
        .expect("input");
    let target_t = Tensor::from_vec(targets.clone(), rows, &dev).expect("targets");
    let acc = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let scale_t = Tensor::from_vec(scales.clone(), rows, &dev)
        .and_then(|t| t.to_dtype(acc))
        .expect("scale");
    let (stats, grad, _) =
        op::forward_backward(cfg, &input, &target_t, &scale_t, true).expect("CPU op");
    let stats = flat(&stats);
    let grad = flat(&grad);
    let weights: Vec<f64> = match &cfg.class_weights {
        Some(w) => w.values().to_vec(),
        None => vec![1.0],
    };
    let params = MsParams::new(cfg, rows, classes, classes, splits, true);
    let poly = if cfg.poly.is_empty() {
        vec![0.0]
    } else {
        cfg.poly.clone()
    };
    let what = format!(
        "{} {:?} {dtype:?} ({rows}, {classes}) splits {splits}",
        cfg.head.name(),
        cfg.margin_grad
    );
    for row in 0..rows {
        let xr = &x[row * classes..(row + 1) * classes];
        let (kernel_stats, kernel_grad) = replay(
            dtype,
            &params,
            &poly,
            &weights,
            xr,
            targets[row] as i32,
            scales[row],
        );
        let cpu_stats = &stats[row * STAT_COLUMNS..(row + 1) * STAT_COLUMNS];
        let cpu_grad = &grad[row * classes..(row + 1) * classes];
        // f64: both sides are exact up to summation order; f32: the CPU sums in 64-wide chunks
        // with 8 lanes and a 2-ulp exp, the replay sequentially with libm's exp.
        let tol = if dtype == DType::F64 { 1e-11 } else { 2e-5 };
        let scale_of = |v: &[f64]| v.iter().fold(1e-3f64, |m, a| m.max(a.abs()));
        for (c, (&k, &r)) in kernel_stats.iter().zip(cpu_stats).enumerate() {
            // Column 1 (max) and 2 (ln Σ) are compared through lse; the rest directly.
            let bound = tol * scale_of(cpu_stats).max(1.0);
            assert!(
                (k - r).abs() <= bound || (c == 1 || c == 2),
                "{what}, row {row}, stat column {c}: kernel {k} vs CPU {r}"
            );
        }
        let lse = |s: &[f64]| s[1] + s[2];
        assert!(
            (lse(&kernel_stats) - lse(cpu_stats)).abs() <= tol * lse(cpu_stats).abs().max(1.0),
            "{what}, row {row}: lse kernel {} vs CPU {}",
            lse(&kernel_stats),
            lse(cpu_stats)
        );
        let bound = tol * scale_of(cpu_grad);
        for (j, (&k, &r)) in kernel_grad.iter().zip(cpu_grad).enumerate() {
            assert!(
                (k - r).abs() <= bound,
                "{what}, row {row}, class {j}: kernel grad {k} vs CPU {r} (bound {bound:e})"
            );
        }
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("read back")
}

fn replay(
    dtype: DType,
    params: &MsParams,
    poly: &[f64],
    weights: &[f64],
    x: &[f64],
    target: i32,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let classes = x.len();
    if dtype == DType::F64 {
        let mut stats = [0f64; STAT_COLUMNS];
        let mut info = [0f64; ROWINFO_COLUMNS];
        let mut grad = vec![0f64; classes];
        // SAFETY: every pointer is valid for the lengths the replay reads or writes: poly for
        // n_poly ≥ 0 entries (at least 1 allocated), weights for C entries when has_weights, x
        // and grad for C, stats and info for their fixed widths; the C function keeps none.
        unsafe {
            ms_host_replay_row_f64(
                params,
                poly.as_ptr(),
                weights.as_ptr(),
                x.as_ptr(),
                target,
                scale,
                stats.as_mut_ptr(),
                info.as_mut_ptr(),
                grad.as_mut_ptr(),
            )
        };
        (stats.to_vec(), grad)
    } else {
        // The op's f16 / bf16 input is rounded first, then computed in f32 like f32 input.
        let round = |v: f64| match dtype {
            DType::F16 => half::f16::from_f64(v).to_f32(),
            DType::BF16 => half::bf16::from_f64(v).to_f32(),
            _ => v as f32,
        };
        let x32: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let poly32: Vec<f32> = poly.iter().map(|&v| v as f32).collect();
        let weights32: Vec<f32> = weights.iter().map(|&v| v as f32).collect();
        let mut stats = [0f32; STAT_COLUMNS];
        let mut info = [0f32; ROWINFO_COLUMNS];
        let mut grad = vec![0f32; classes];
        // SAFETY: as for the f64 call above.
        unsafe {
            ms_host_replay_row_f32(
                params,
                poly32.as_ptr(),
                weights32.as_ptr(),
                x32.as_ptr(),
                target,
                scale as f32,
                stats.as_mut_ptr(),
                info.as_mut_ptr(),
                grad.as_mut_ptr(),
            )
        };
        // The op rounds the gradient to the input dtype.
        let grad = grad
            .iter()
            .map(|&g| match dtype {
                DType::F16 => half::f16::from_f32(g).to_f64(),
                DType::BF16 => half::bf16::from_f32(g).to_f64(),
                _ => g as f64,
            })
            .collect();
        (stats.iter().map(|&v| v as f64).collect(), grad)
    }
}

fn for_all_configs(classes: usize, mut f: impl FnMut(MarginSoftmaxLoss)) {
    for head in heads() {
        for mode in [MarginGrad::Exact, MarginGrad::Detached] {
            for (_, opts) in option_sets(classes) {
                let mut cfg = opts.margin_grad(mode);
                cfg.head = head;
                f(cfg);
            }
        }
    }
}

#[test]
fn kernel_math_matches_cpu_f64() {
    for_all_configs(37, |cfg| {
        for splits in [1, 3] {
            check(&cfg, DType::F64, 5, 37, splits);
        }
    });
}

#[test]
fn kernel_math_matches_cpu_f32() {
    for_all_configs(37, |cfg| check(&cfg, DType::F32, 5, 37, 2));
}

#[test]
fn kernel_math_matches_cpu_half_precision() {
    for_all_configs(37, |cfg| {
        for dtype in [DType::F16, DType::BF16] {
            check(&cfg, dtype, 3, 37, 1);
        }
    });
}

#[test]
fn kernel_math_one_class_and_wide_rows() {
    for_all_configs(1, |cfg| check(&cfg, DType::F64, 3, 1, 1));
    for_all_configs(1000, |cfg| check(&cfg, DType::F64, 2, 1000, 7));
}
