//! The kernel suite: the CPU suite's grids and the kernels' own cases (the fused / split
//! boundary, several splits per row, grid-stride loops, row alignment, determinism), run on a
//! device under test ([`Dut`]):
//! - `kernels::gpu::*` (feature `cuda`): on CUDA device 0. Without a device each test says
//!   `SKIPPED: no CUDA device` on stderr and returns, unless `REQUIRE_GPU=1`, where it fails.
//!   Without the `cuda` feature these tests do not exist, so a GPU-less `cargo test` reports none.
//! - `kernels::emu::*` (feature `kernel-emu`): the same CUDA kernels and launch plans run on the
//!   CPU by the SIMT emulator (`candle_margin_softmax::kernel_emu`), with shapes sized for it.
//!
//! Inputs are generated on the host and moved to the device; the reference always runs on the
//! CPU (`parity::reference_on_cpu`), and comparisons with the CPU op run it natively
//! ([`Dut::host`]). The tolerances are those of the CPU suite ([`tols`]): the kernels accumulate
//! in the same type (f32 for f32 / f16 / bf16, f64 for f64) in another order.

use candle_core::{DType, Device, Result, Tensor};
use candle_margin_softmax::{Head, MarginSoftmaxLoss, Reduction};

use crate::common::*;
use crate::parity;
use crate::{edge, errors, finite_diff, semantics};

/// The device the kernels run on.
pub struct Dut {
    pub dev: Device,
    /// `Some(grid cap)`: the emulated kernels on the CPU.
    emulated: Option<usize>,
    /// The shape of the emulated GPU (its SM count and shared memory per block); a real GPU is
    /// its own.
    #[cfg(feature = "kernel-emu")]
    shape: candle_margin_softmax::kernel_emu::DeviceShape,
}

impl Dut {
    /// CUDA device 0, or `None` (after saying so) when there is none; with `REQUIRE_GPU=1` a
    /// missing device fails the test instead.
    #[cfg(feature = "cuda")]
    pub fn cuda() -> Option<Dut> {
        match Device::new_cuda(0) {
            Ok(dev) => Some(Dut {
                dev,
                emulated: None,
                #[cfg(feature = "kernel-emu")]
                shape: candle_margin_softmax::kernel_emu::DeviceShape::DEFAULT,
            }),
            Err(e) => {
                if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    panic!("REQUIRE_GPU=1 but no CUDA device is available: {e}");
                }
                eprintln!("SKIPPED: no CUDA device ({e}); REQUIRE_GPU=1 makes this a failure");
                None
            }
        }
    }

    /// The emulated kernels, with the CUDA backend's grid cap.
    #[cfg(feature = "kernel-emu")]
    pub fn emulated() -> Dut {
        Dut {
            dev: Device::Cpu,
            emulated: Some(65_535),
            shape: candle_margin_softmax::kernel_emu::DeviceShape::DEFAULT,
        }
    }

    /// This device, emulated as an H200 (227 KiB of shared memory a block and clusters: one
    /// block per row up to 57 597 f32 / 115 193 bf16 classes, a cluster up to 460 768 /
    /// 921 536); a GPU stays itself.
    pub fn as_h200(&self) -> Dut {
        Dut {
            dev: self.dev.clone(),
            emulated: self.emulated,
            #[cfg(feature = "kernel-emu")]
            shape: candle_margin_softmax::kernel_emu::DeviceShape::H200,
        }
    }

    /// The emulated kernels planned for a GPU of this shape.
    #[cfg(feature = "kernel-emu")]
    pub fn emulated_as(shape: candle_margin_softmax::kernel_emu::DeviceShape) -> Dut {
        Dut {
            shape,
            ..Dut::emulated()
        }
    }

    pub fn is_emulated(&self) -> bool {
        self.emulated.is_some()
    }

    /// This device with at most `cap` blocks per grid dimension (emulated only; a GPU keeps its
    /// planner's cap, so there the test needs more rows than 65535 to reach the grid-stride
    /// loops).
    pub fn with_grid_cap(&self, cap: usize) -> Dut {
        Dut {
            dev: self.dev.clone(),
            emulated: self.emulated.map(|_| cap),
            #[cfg(feature = "kernel-emu")]
            shape: self.shape,
        }
    }

    /// Runs `f` with the op on this device.
    pub fn run<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        match self.emulated {
            #[cfg(feature = "kernel-emu")]
            Some(cap) => {
                candle_margin_softmax::kernel_emu::emulated_on(cap, self.shape, || f(&self.dev))
            }
            _ => f(&self.dev),
        }
    }

    /// Runs `f` with the op on CPU tensors on the CPU bodies (the oracle of a comparison).
    pub fn host<R>(&self, f: impl FnOnce() -> R) -> R {
        match self.emulated {
            #[cfg(feature = "kernel-emu")]
            Some(_) => candle_margin_softmax::kernel_emu::native(f),
            _ => f(),
        }
    }

    /// `gpu` on a GPU, `emu` under the emulator.
    pub fn size<T>(&self, gpu: T, emu: T) -> T {
        if self.is_emulated() { emu } else { gpu }
    }
}

/// Whether the run wants only what reaches every kernel entry on every path, not every boundary
/// width (`CUDA_EMU_GRID=barriers`: .ci/kernel-emu.sh's TSan run, which looks for missing
/// barriers; the plain and ASan runs take the whole grid).
#[cfg_attr(not(feature = "kernel-emu"), allow(dead_code))]
fn barriers_only() -> bool {
    std::env::var("CUDA_EMU_GRID").is_ok_and(|g| g == "barriers")
}

/// The heads a path test runs: all of `heads`, or with `CUDA_EMU_GRID=barriers` the first alone.
/// A head picks the per-element transform of a kernel entry, not its barriers or its shared
/// memory, so one head finds what the others would (the options, which do change the reductions,
/// stay in full).
fn heads_for_run<'a>(heads: &'a [(&'a str, Head)]) -> &'a [(&'a str, Head)] {
    if barriers_only() { &heads[..1] } else { heads }
}

/// Stamps `#[test] fn NAME` calling `NAME(&Dut)`: in `gpu` (feature `cuda`) for every name, and
/// in `emu` (feature `kernel-emu`) for the first list (the second holds GPU-sized shapes).
macro_rules! kernel_tests {
    (
        both: [$($both:ident),* $(,)?],
        gpu_only: [$($gpu:ident),* $(,)?],
        emu_only: [$($emu:ident),* $(,)?] $(,)?
    ) => {
        #[cfg(feature = "cuda")]
        mod gpu {
            $(
                #[test]
                fn $both() {
                    if let Some(dut) = super::Dut::cuda() {
                        super::$both(&dut);
                    }
                }
            )*
            $(
                #[test]
                fn $gpu() {
                    if let Some(dut) = super::Dut::cuda() {
                        super::$gpu(&dut);
                    }
                }
            )*
        }
        #[cfg(feature = "kernel-emu")]
        mod emu {
            $(
                #[test]
                fn $both() {
                    super::$both(&super::Dut::emulated());
                }
            )*
            $(
                #[test]
                fn $emu() {
                    super::$emu();
                }
            )*
        }
    };
}

kernel_tests!(
    both: [
        parity_small_heads_softmax,
        parity_small_heads_cosface,
        parity_small_heads_arcface,
        parity_small_heads_combined,
        parity_small_heads_sphereface,
        parity_small_heads_rbf,
        parity_small_options,
        parity_small_combo_softmax,
        parity_small_combo_cosface,
        parity_small_combo_arcface,
        parity_small_combo_combined,
        parity_small_combo_sphereface,
        parity_small_combo_rbf,
        parity_small_row_scale,
        parity_small_weighted_smoothing_softmax,
        parity_small_weighted_smoothing_cosface,
        parity_small_weighted_smoothing_arcface,
        parity_small_weighted_smoothing_combined,
        parity_small_weighted_smoothing_sphereface,
        parity_small_weighted_smoothing_rbf,
        parity_small_softcap_softmax,
        parity_small_softcap_cosface,
        parity_small_softcap_arcface,
        parity_small_softcap_combined,
        parity_small_softcap_sphereface,
        parity_small_softcap_rbf,
        parity_medium,
        edge_cases,
        semantics,
        edge_empty_batch,
        finite_differences,
        error_messages,
        row_margins_refused,
        target_errors_match_cpu,
        fused_split_boundary,
        split_rows,
        grid_stride,
        row_alignment,
        deterministic,
        reduction_variants,
        softcap_and_weighted_smoothing,
        softcap_weighted_smoothing_paths,
        unchecked_targets,
        one_pass_wide_rows,
        head_modules,
    ],
    gpu_only: [
        parity_large_heads,
        parity_large_options,
        parity_large_row_scale,
        many_rows,
        big_1024x32000,
        big_64x1m,
    ],
    emu_only: [cluster_rows, l2_rows, l2_rows_few],
);

/// The largest C that `loss_and_grad` runs through the fused one-block-per-row kernel on the
/// device under test for each input dtype (`one_pass_max_classes`: emulated, a GPU without the
/// shared-memory opt-in unless the Dut says otherwise; on a GPU, its own limit).
fn fused_limit(dut: &Dut, dtype: DType) -> usize {
    dut.run(|dev| candle_margin_softmax::one_pass_max_classes(dev, dtype))
        .expect("one_pass_max_classes")
}

// ---- The CPU suite's grids on the device. ----

/// The head modules (`MarginHead`: chunked row statistics and slice gradients through the op's
/// forward and backward kernels) against the composition, f64 and f32, chunked and whole.
fn head_modules(dut: &Dut) {
    dut.run(|dev| {
        crate::heads::head_grid(dev, DType::F64, (1e-12, 1e-12), &[Some(5), None]);
        crate::heads::head_grid(dev, DType::F32, (2e-5, 5e-5), &[Some(7)]);
        // Slices wider than one split column range (4096): the partial kernel cuts them.
        crate::heads::chunks_agree(dev, 9001, &[4500, 8999]).expect("chunk sizes agree");
        crate::sub_center::sub_center_grid(dev, &[DType::F32], &[Some(2)]);
    });
}

// The small parity grids of every head variant, one test per head.

fn parity_small_heads_softmax(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "softmax"));
}

fn parity_small_heads_cosface(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "cosface"));
}

fn parity_small_heads_arcface(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "arcface"));
}

fn parity_small_heads_combined(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "combined"));
}

fn parity_small_heads_sphereface(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "sphereface"));
}

fn parity_small_heads_rbf(dut: &Dut) {
    dut.run(|dev| parity::small_heads(dev, "rbf"));
}

fn parity_small_options(dut: &Dut) {
    dut.run(parity::small_options);
}

fn parity_small_combo_softmax(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "softmax"));
}

fn parity_small_combo_cosface(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "cosface"));
}

fn parity_small_combo_arcface(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "arcface"));
}

fn parity_small_combo_combined(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "combined"));
}

fn parity_small_combo_sphereface(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "sphereface"));
}

fn parity_small_combo_rbf(dut: &Dut) {
    dut.run(|dev| parity::small_combo(dev, "rbf"));
}

fn parity_small_row_scale(dut: &Dut) {
    dut.run(parity::small_row_scale);
}

fn parity_small_weighted_smoothing_softmax(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "softmax"));
}

fn parity_small_weighted_smoothing_cosface(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "cosface"));
}

fn parity_small_weighted_smoothing_arcface(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "arcface"));
}

fn parity_small_weighted_smoothing_combined(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "combined"));
}

fn parity_small_weighted_smoothing_sphereface(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "sphereface"));
}

fn parity_small_weighted_smoothing_rbf(dut: &Dut) {
    dut.run(|dev| parity::small_weighted_smoothing(dev, "rbf"));
}

fn parity_small_softcap_softmax(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "softmax"));
}

fn parity_small_softcap_cosface(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "cosface"));
}

fn parity_small_softcap_arcface(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "arcface"));
}

fn parity_small_softcap_combined(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "combined"));
}

fn parity_small_softcap_sphereface(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "sphereface"));
}

fn parity_small_softcap_rbf(dut: &Dut) {
    dut.run(|dev| parity::small_softcap(dev, "rbf"));
}

/// Issue 8's semantics, each against its own f64 oracle (tests/suite/semantics.rs).
fn semantics(dut: &Dut) {
    dut.run(|dev| {
        semantics::weighted_smoothing_is_pytorch(dev);
        semantics::softcap_formula(dev);
        for head in semantics::MARGIN_HEADS {
            semantics::exact_mode_keeps_the_loss(dev, head);
        }
        semantics::neg_inf_target(dev);
        for head in semantics::ZERO_TOTAL_WEIGHT_HEADS {
            semantics::zero_total_weight(dev, head);
        }
        for head in semantics::ROW_SCALE_LAYOUTS_HEADS {
            semantics::row_scale_layouts(dev, head);
        }
        semantics::row_scale_values(dev);
    });
}

fn parity_medium(dut: &Dut) {
    dut.run(parity::medium);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parity_large_heads(dut: &Dut) {
    dut.run(parity::large_heads);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parity_large_options(dut: &Dut) {
    dut.run(parity::large_options);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parity_large_row_scale(dut: &Dut) {
    dut.run(parity::large_row_scale);
}

fn edge_cases(dut: &Dut) {
    dut.run(|dev| {
        edge::cos_pm1(dev);
        edge::outside_clamp(dev);
        edge::s64_half(dev);
        edge::rbf_far(dev);
        edge::extreme_targets(dev);
        edge::all_ignored(dev);
        edge::focal_confident(dev);
        edge::one_class(dev);
        edge::non_contiguous(dev);
        edge::target_dtypes(dev);
        edge::neg_inf_logit(dev);
    });
}

fn edge_empty_batch(dut: &Dut) {
    dut.run(edge::empty_batch);
}

fn finite_differences(dut: &Dut) {
    dut.run(|dev| {
        for head in HEADS {
            finite_diff::every_option(dev, head);
        }
        finite_diff::detached_where_exact(dev);
        finite_diff::row_scale(dev);
    });
}

fn error_messages(dut: &Dut) {
    dut.run(|dev| {
        errors::invalid_inputs(dev);
        errors::invalid_hyper_parameters(dev);
        errors::unrepresentable_hyper_parameters(dev);
        errors::valid_boundaries(dev);
    });
}

/// Per-row margins run on the CPU bodies only so far: the kernels refuse them with the op's name
/// instead of reading the [B, 4] row parameters as a row scale.
fn row_margins_refused(dut: &Dut) {
    dut.run(|dev| {
        let x = Tensor::zeros((2, 3), DType::F32, dev).unwrap();
        let y = Tensor::new(&[0u32, 1], dev).unwrap();
        let m = Tensor::new(&[0.3f32, 0.4], dev).unwrap();
        let cfg = MarginSoftmaxLoss::new(Head::arcface());
        let expected = "margin_softmax_ce(arcface): per-row margins run on the CPU only so far";
        let w = Tensor::ones((3, 4), DType::F32, dev).unwrap();
        let head = candle_margin_softmax::MarginHead::from_weight(cfg.clone(), w, None).unwrap();
        // Embeddings that take a gradient: the head's gradient pass needs the kernels (its
        // forward alone runs the per-row margins on the host and succeeds).
        let f = candle_core::Var::ones((2, 4), DType::F32, dev).unwrap();
        let f = f.as_tensor();
        for got in [
            message(cfg.loss_with_row_margins(&x, &y, &m, None)),
            message(cfg.loss_and_grad_with_row_margins(&x, &y, &m, None)),
            message(head.loss_with_row_margins(f, &y, &m)),
        ] {
            assert!(got.starts_with(expected), "{got}");
        }
    });
}

/// The first line of an error (candle appends a backtrace when RUST_BACKTRACE is set).
fn message<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(e) => e.to_string().lines().next().unwrap_or("").to_string(),
    }
}

/// Invalid target values give the same error on the device as on the CPU (the targets are read
/// back and checked by the same code), through the forward op and `loss_and_grad`.
fn target_errors_match_cpu(dut: &Dut) {
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
                match (dut.host(|| on(&Device::Cpu)), dut.run(on)) {
                    (Ok(cpu), Ok(gpu)) => {
                        if cpu != gpu || cpu.0 == "Ok" || cpu.1 == "Ok" {
                            f.0.push(format!("[{label}] CPU {cpu:?} vs device {gpu:?}"));
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
    f.finish("kernels: target errors identical to the CPU's");
}

/// With the target check off, the forward reads nothing back: an invalid target (out of range,
/// not ignore_index) gives its row a NaN loss and a NaN gradient row, never an error or an
/// out-of-bounds read, while the other rows equal the checked run on those rows alone; a mean
/// over the batch is NaN. Both paths (C below and above the one-pass limit), every dtype.
fn unchecked_targets(dut: &Dut) {
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dut, dtype);
        for c in [7usize, limit + 1] {
            let label = format!("unchecked targets C={c} {}", dtype_name(dtype));
            let mut run = || -> Result<()> {
                let b = 4usize;
                let head = Head::arcface();
                let mut r = rng(seed_of(&label));
                let good: Vec<i64> = vec![1, 0, (c - 1) as i64, 2];
                let x = gen_input(&mut r, &head, b, c, &good);
                let input = input_tensor(&x, b, c, dtype, &dut.dev)?;
                let bad: Vec<i64> = vec![1, c as i64, (c - 1) as i64, -7];
                let cfg = MarginSoftmaxLoss::new(head)
                    .reduction(Reduction::None)
                    .check_targets(false);
                let targets = targets_i64(&bad, &dut.dev)?;
                // The valid rows 0 and 2, checked, on their own.
                let rows = Tensor::new(&[0u32, 2], &dut.dev)?;
                let sub_input = input.index_select(&rows, 0)?;
                let sub_targets = targets_i64(&[bad[0], bad[2]], &dut.dev)?;
                let checked = cfg.clone().check_targets(true);
                let (want_l, want_g) =
                    dut.run(|_| checked.loss_and_grad(&sub_input, &sub_targets))?;
                let (got_l, got_g) = dut.run(|_| cfg.loss_and_grad(&input, &targets))?;
                let loss = dut.run(|_| cfg.loss(&input, &targets))?;
                let got_l = got_l.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let loss = loss.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let got_g = got_g.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                let want_l = want_l.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let want_g = want_g.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                for bad_row in [1usize, 3] {
                    if !got_l[bad_row].is_nan() || !loss[bad_row].is_nan() {
                        f.0.push(format!(
                            "[{label}] row {bad_row}: loss {got_l:?} / {loss:?}"
                        ));
                    }
                    if !got_g[bad_row].iter().all(|v| v.is_nan()) {
                        f.0.push(format!("[{label}] row {bad_row}: gradient not all NaN"));
                    }
                }
                for (k, row) in [0usize, 2].into_iter().enumerate() {
                    let (tl, tg) = tols(dtype);
                    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
                    if !close(got_l[row], want_l[k], tl) || !close(loss[row], want_l[k], tl) {
                        f.0.push(format!(
                            "[{label}] row {row}: loss {} vs {}",
                            got_l[row], want_l[k]
                        ));
                    }
                    if got_g[row]
                        .iter()
                        .zip(&want_g[k])
                        .any(|(&a, &b)| !close(a, b, tg))
                    {
                        f.0.push(format!("[{label}] row {row}: gradient differs"));
                    }
                }
                let mean = MarginSoftmaxLoss::new(head).check_targets(false);
                let (mean_l, mean_g) = dut.run(|_| mean.loss_and_grad(&input, &targets))?;
                if !mean_l.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan() {
                    f.0.push(format!("[{label}] the mean over a NaN row is not NaN"));
                }
                drop(mean_g);
                Ok(())
            };
            if let Err(e) = run() {
                f.err(&label, e);
            }
        }
    }
    f.finish("kernels: target check off");
}

/// On an H200 (227 KiB of shared memory a block, clusters; emulated, or the GPU itself if it is
/// one), `loss_and_grad` reads a row once with one block up to 57 597 f32 / 115 193 f16 and
/// bf16 / 28 799 f64 classes and with a cluster of 8 blocks up to 460 768 / 921 536 / 230 384:
/// both boundaries, one below, at and past, against the CPU fused op, plain and with the
/// combination of options. (On another GPU the test checks its own one-pass limit.)
fn one_pass_wide_rows(dut: &Dut) {
    // Past a cluster the L2 kernel's cooperative grid: 16 blocks where emulated (one OS thread
    // each), the GPU's own on a GPU.
    let wide = dut.as_h200().with_grid_cap(16);
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(&wide, dtype);
        let block_limit = match dtype {
            DType::F32 => 57_597,
            DType::F64 => 28_799,
            _ => 115_193,
        };
        let mut widths = vec![limit - 1, limit, limit + 1];
        if wide.is_emulated() {
            let want =
                block_limit / (16 / dtype.size_in_bytes()) * (16 / dtype.size_in_bytes()) * 8;
            if limit != want {
                f.0.push(format!(
                    "{}: one-pass limit {limit}, want {want}",
                    dtype_name(dtype)
                ));
            }
            widths.extend([block_limit, block_limit + 1]);
        }
        for c in widths {
            for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                let label = format!("one pass arcface+{on} 2x{c} {}", dtype_name(dtype));
                if let Err(e) =
                    vs_cpu_op(&wide, &label, Head::arcface(), &opts, (2, c), dtype, &mut f)
                {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("kernels: one pass up to the opt-in shared memory and a cluster");
}

/// The cluster path (sm_90: a row over 8 blocks, their statistics merged through distributed
/// shared memory) at small widths, on an emulated GPU with clusters and 6 KiB of shared memory a
/// block (one block per row up to 1021 f32 / 2041 f16 / 509 f64 classes, a cluster up to
/// 8160 / 16320 / 4064): below, at and past each boundary, odd widths (misaligned rows), ignored
/// rows, every head, every dtype, plain and with all options, more rows than the grid's
/// clusters (grid-stride), against the CPU fused op.
#[cfg(feature = "kernel-emu")]
fn cluster_rows() {
    use candle_margin_softmax::kernel_emu::DeviceShape;
    let dut = Dut::emulated_as(DeviceShape {
        sm_count: 4,
        max_shared_per_block: 6 * 1024,
        clusters: true,
        cooperative: false,
        l2_bytes: 0,
    });
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(&dut, dtype);
        let v = 16 / dtype.size_in_bytes();
        let block_limit = (4096 / dtype.size_in_bytes()) - (v - 1);
        if limit != block_limit / v * v * 8 {
            f.0.push(format!("{}: cluster limit {limit}", dtype_name(dtype)));
        }
        // Every width at the block / cluster boundaries; with CUDA_EMU_GRID=barriers (the TSan
        // run of .ci/kernel-emu.sh) one width that takes the cluster path (the paths beyond it
        // are reached by other tests of that run).
        let widths = if barriers_only() {
            vec![block_limit + 2 * v + 3]
        } else {
            vec![
                block_limit + 1,
                block_limit + 2 * v + 3,
                limit - 1,
                limit,
                limit + 1,
            ]
        };
        for c in widths {
            let heads = [
                ("arcface", Head::arcface()),
                ("softmax", Head::softmax()),
                ("rbf", Head::rbf()),
            ];
            for &(hn, head) in heads_for_run(&heads) {
                for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                    let label = format!("cluster {hn}+{on} 5x{c} {}", dtype_name(dtype));
                    if let Err(e) = vs_cpu_op(&dut, &label, head, &opts, (5, c), dtype, &mut f) {
                        f.err(&label, e);
                    }
                }
            }
        }
        // Grid-stride over rows: a grid cap of 3 leaves one cluster for 9 rows.
        let label = format!(
            "cluster grid stride 9x{} {}",
            block_limit + 9,
            dtype_name(dtype)
        );
        let capped = dut.with_grid_cap(3);
        if let Err(e) = vs_cpu_op(
            &capped,
            &label,
            Head::arcface(),
            &Opts::combo(),
            (9, block_limit + 9),
            dtype,
            &mut f,
        ) {
            f.err(&label, e);
        }
    }
    f.finish("kernels: rows over a thread-block cluster");
}

/// The L2 path (`ms_fused_l2`: a cooperative grid over groups of rows, each row in slices whose
/// partial states every block merges in one fixed order, a group's gradient written while the
/// next group is read) at small widths, on an emulated GPU with 3 SMs (a grid of 9 blocks, 6 for
/// the `_ext` entries and f64), 6 KiB of shared memory a block (one block per row up to 1021
/// f32 / 2041 f16 / 509 f64 classes), no clusters and 192 KiB of L2 (groups within 64 KiB):
/// one slice a row with groups of several rows, 3 and 5 slices a row with groups of one to three
/// rows, groups that do not divide B, odd widths (misaligned rows), ignored rows, every head,
/// every dtype, plain, with all options and soft-capped, and a grid cap of 2 (blocks taking
/// several slices a phase), against the CPU fused op.
#[cfg(feature = "kernel-emu")]
fn l2_rows() {
    l2_grid(L2Grid::Full);
}

/// [`l2_rows`]' structure at a size ThreadSanitizer gets through in a minute or two (it runs the
/// whole process, the CPU oracle included, many times slower): groups of several rows and of
/// one, 1 to 3 slices a row, ignored rows, f32 and bf16, ArcFace with all options and Softmax
/// plain, the grid cap of 2. In `.ci/kernel-emu.sh`'s sanitizer set.
#[cfg(feature = "kernel-emu")]
fn l2_rows_few() {
    l2_grid(L2Grid::Few);
}

#[cfg(feature = "kernel-emu")]
#[derive(Clone, Copy, PartialEq)]
enum L2Grid {
    Full,
    Few,
}

#[cfg(feature = "kernel-emu")]
fn l2_grid(grid: L2Grid) {
    use candle_margin_softmax::kernel_emu::DeviceShape;
    let full = grid == L2Grid::Full;
    let dut = Dut::emulated_as(DeviceShape {
        sm_count: 3,
        max_shared_per_block: 6 * 1024,
        clusters: false,
        cooperative: true,
        l2_bytes: 192 * 1024,
    });
    let mut f = Failures::default();
    let dtypes: &[DType] = if full {
        &parity::ALL_DTYPES
    } else {
        &[DType::F32, DType::BF16]
    };
    let (rows, widths): (usize, &[usize]) = if full {
        (7, &[0, 9001, 4 * 4096 + 3])
    } else {
        (5, &[0, 8195])
    };
    for &dtype in dtypes {
        let limit = fused_limit(&dut, dtype);
        let block_limit = (4096 / dtype.size_in_bytes()) - (16 / dtype.size_in_bytes() - 1);
        if limit != block_limit {
            f.0.push(format!("{}: one-pass limit {limit}", dtype_name(dtype)));
        }
        // 0: one past the one-pass limit.
        for c in widths.iter().map(|&c| if c == 0 { limit + 1 } else { c }) {
            for (hn, head) in [
                ("arcface", Head::arcface()),
                ("softmax", Head::softmax()),
                ("rbf", Head::rbf()),
            ] {
                for (on, opts) in [
                    ("plain", Opts::default()),
                    ("combo", Opts::combo()),
                    ("softcap", Opts::default().with_softcap()),
                ] {
                    let wanted = match (hn, on) {
                        (_, "softcap") => full && hn == "arcface",
                        ("arcface", "combo") | ("softmax", "plain") => true,
                        _ => full,
                    };
                    if !wanted {
                        continue;
                    }
                    let label = format!("l2 {hn}+{on} {rows}x{c} {}", dtype_name(dtype));
                    if let Err(e) = vs_cpu_op(&dut, &label, head, &opts, (rows, c), dtype, &mut f) {
                        f.err(&label, e);
                    }
                }
            }
        }
        let label = format!("l2 grid cap 2, 5x9001 {}", dtype_name(dtype));
        if let Err(e) = vs_cpu_op(
            &dut.with_grid_cap(2),
            &label,
            Head::arcface(),
            &Opts::combo(),
            (5, 9001),
            dtype,
            &mut f,
        ) {
            f.err(&label, e);
        }
    }
    f.finish("kernels: rows past one pass through L2");
}

// ---- The fused / split boundary of loss_and_grad. ----

/// C one below the fused kernel's limit, at it and one past it (the three-kernel path, 3 blocks
/// per row in the forward), for every dtype, with the combination of options and with a per-row
/// scale: parity with the CPU reference.
fn fused_split_boundary(dut: &Dut) {
    let b = dut.size(8, 3);
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dut, dtype);
        for c in [limit - 1, limit, limit + 1] {
            for (hn, head) in [("arcface", Head::arcface()), ("rbf", Head::rbf())] {
                for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                    for with_row_scale in [false, true] {
                        let name = format!("boundary {hn}+{on}");
                        dut.run(|dev| {
                            parity::parity_case(
                                dev,
                                &name,
                                head,
                                &opts,
                                (b, c),
                                dtype,
                                with_row_scale,
                                &mut f,
                            )
                        });
                    }
                }
            }
        }
    }
    f.finish("kernels: fused / split boundary");
}

/// More rows than the grid cap of 65535 (the fused and backward kernels are grid-stride over
/// rows; `loss` + backward always runs `ms_backward`), against the CPU fused op.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn many_rows(dut: &Dut) {
    let mut f = Failures::default();
    let (b, c) = (70_000usize, 16usize);
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let label = format!("many rows {b}x{c} {}", dtype_name(dtype));
        if let Err(e) = vs_cpu_op(
            dut,
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
    f.finish("kernels: more rows than the grid cap");
}

/// Grids smaller than the work (emulated: a grid cap of 3 blocks per dimension; on a GPU the cap
/// of 65535, which `many_rows` passes), so every kernel runs its grid-stride loops: over rows in
/// `ms_fused` and `ms_backward`, over (row, split) blocks in `ms_forward_partial`, over column
/// vectors in `ms_backward`, and over rows in `ms_forward_finalize` (more rows than 3 blocks of
/// 128 threads). Both paths, every dtype, ignored rows, against the CPU fused op.
fn grid_stride(dut: &Dut) {
    let capped = dut.with_grid_cap(3);
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dut, dtype);
        for (b, c) in [(397usize, 5usize), (11, 37), (13, 2100), (5, limit + 1)] {
            let heads = [("arcface", Head::arcface()), ("softmax", Head::softmax())];
            for &(hn, head) in heads_for_run(&heads) {
                let label = format!("grid stride {hn} {b}x{c} {}", dtype_name(dtype));
                if let Err(e) =
                    vs_cpu_op(&capped, &label, head, &Opts::combo(), (b, c), dtype, &mut f)
                {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("kernels: grid-stride loops");
}

/// Many blocks per row in the split forward (C = 40000: 10 splits with 2 rows) and a ragged last
/// split, every dtype, plain and with all options, against the CPU fused op.
fn split_rows(dut: &Dut) {
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        for (b, c) in [(2usize, 40_000usize), (3, 12_289)] {
            for (on, opts) in [("plain", Opts::default()), ("combo", Opts::combo())] {
                let label = format!("split rows rbf+{on} {b}x{c} {}", dtype_name(dtype));
                if let Err(e) = vs_cpu_op(dut, &label, Head::rbf(), &opts, (b, c), dtype, &mut f) {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("kernels: several splits per row");
}

/// Rows at every 16-byte phase: odd C (consecutive rows alternate alignment), views that start
/// past element 0 (a `narrow` on the class dimension: every row misaligned; on the batch
/// dimension: a storage offset), for every dtype on both paths, against the same values copied
/// contiguous on the CPU op: `loss`, autograd (into the view's base) and `loss_and_grad`.
fn row_alignment(dut: &Dut) {
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dut, dtype);
        for (b, c) in [(9usize, 37usize), (4, 1001), (3, 2101), (3, limit + 3)] {
            for (skip_rows, skip_cols) in [(0usize, 0usize), (0, 1), (1, 0), (1, 3)] {
                let label = format!(
                    "alignment {b}x{c} {} offset ({skip_rows}, {skip_cols})",
                    dtype_name(dtype)
                );
                let mut run = || -> Result<()> {
                    let head = Head::arcface();
                    let opts = Opts::combo();
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, opts.ignore);
                    let (bw, cw) = (b + skip_rows, c + skip_cols + 2);
                    let tw: Vec<i64> = (0..bw)
                        .map(|i| t.get(i).copied().unwrap_or(0).max(0))
                        .collect();
                    let wide = gen_input(&mut r, &head, bw, cw, &tw);
                    let cfg = opts.cfg(head, c, dtype, &dut.dev, 7)?;
                    let targets = targets_i64(&t, &dut.dev)?;
                    let base = input_tensor(&wide, bw, cw, dtype, &dut.dev)?;
                    let view = base.narrow(0, skip_rows, b)?.narrow(1, skip_cols, c)?;
                    let copy = view.contiguous()?;
                    let want = dut.host(|| autograd(Side::Fused, &cfg, &copy, &targets, None))?;
                    let (want_l, want_g) = dut.host(|| cfg.loss_and_grad(&copy, &targets))?;
                    let got = dut.run(|_| autograd(Side::Fused, &cfg, &view, &targets, None))?;
                    let (got_l, got_g) = dut.run(|_| cfg.loss_and_grad(&view, &targets))?;
                    let (tl, tg) = tols(dtype);
                    let s = head.scale();
                    let bn = b as f64;
                    f.check(&label, compare("loss", &got.loss, &want.loss, tl, s));
                    f.check(
                        &label,
                        compare("autograd dinput", &got.dx, &want.dx, tg, s / bn),
                    );
                    f.check(
                        &label,
                        compare("loss_and_grad loss", &got_l, &want_l, tl, s),
                    );
                    f.check(
                        &label,
                        compare("loss_and_grad dinput", &got_g, &want_g, tg, s / bn),
                    );
                    Ok(())
                };
                if let Err(e) = run() {
                    f.err(&label, e);
                }
            }
        }
    }
    f.finish("kernels: rows at every alignment");
}

// ---- Logit soft-capping and class weights with label smoothing. ----

/// The soft-capping and weighted-smoothing configurations of the kernel checks: soft-capping
/// alone, class weights with smoothing alone (the smoothing term then reads every class's
/// weight: the kernels read the weights per element), and both with every other option
/// (focal, Poly, z-loss, ignored rows). The cap is below the head's logit range, so that it
/// bends the logits (and saturates some of them).
fn capped_configs(head: Head) -> Vec<(&'static str, Opts, Option<f64>)> {
    let cap = match head {
        Head::Softmax { .. } => 5.0,
        Head::Rbf { .. } => 20.0,
        _ => 30.0,
    };
    vec![
        ("softcap", Opts::default(), Some(cap)),
        (
            "weights+smoothing",
            Opts {
                weights: true,
                smoothing: 0.15,
                ..Opts::default()
            },
            None,
        ),
        ("combo+softcap", Opts::combo(), Some(cap)),
    ]
}

/// One soft-capping / weighted-smoothing case on the device against the CPU op (and, with
/// `reference`, against the CPU reference): `loss` + autograd (the split forward, then
/// `ms_backward` alone) and `loss_and_grad` (`ms_fused` or the split path, by C), with or
/// without a per-row scale (then d(loss)/d(row scale) too).
#[allow(clippy::too_many_arguments)]
fn capped_case(
    dut: &Dut,
    label: &str,
    head: Head,
    (opts, cap): (&Opts, Option<f64>),
    (b, c): (usize, usize),
    dtype: DType,
    with_row_scale: bool,
    reference: bool,
    f: &mut Failures,
) -> Result<()> {
    let seed = seed_of(label);
    let mut r = rng(seed);
    let t = gen_targets(&mut r, b, c, opts.ignore);
    let x = gen_input(&mut r, &head, b, c, &t);
    let rs = gen_row_scale(&mut r, b);
    let cpu = Device::Cpu;
    let mut cfg_cpu = opts.cfg(head, c, dtype, &cpu, seed)?;
    cfg_cpu.logit_softcap = cap;
    let dev = &dut.dev;
    let cfg_dev = cfg_on(&cfg_cpu, dev)?;
    let input_cpu = input_tensor(&x, b, c, dtype, &cpu)?;
    let targets_cpu = targets_i64(&t, &cpu)?;
    let scale_cpu = if with_row_scale {
        Some(Tensor::from_vec(rs.clone(), b, &cpu)?.to_dtype(acc_dtype(dtype))?)
    } else {
        None
    };
    let input_dev = input_cpu.to_device(dev)?;
    let targets_dev = targets_cpu.to_device(dev)?;
    let scale_dev = scale_cpu.as_ref().map(|s| s.to_device(dev)).transpose()?;
    let (tl, tg) = tols(dtype);
    let s_eff = if with_row_scale {
        rs.iter().fold(1.0f64, |m, v| m.max(*v))
    } else {
        head.scale()
    };
    let bn = b.max(1) as f64;

    let want = dut.host(|| {
        autograd(
            Side::Fused,
            &cfg_cpu,
            &input_cpu,
            &targets_cpu,
            scale_cpu.as_ref(),
        )
    })?;
    let got = dut.run(|_| {
        autograd(
            Side::Fused,
            &cfg_dev,
            &input_dev,
            &targets_dev,
            scale_dev.as_ref(),
        )
    })?;
    f.check(
        label,
        compare("loss vs CPU op", &got.loss, &want.loss, tl, s_eff),
    );
    f.check(
        label,
        compare(
            "autograd dinput vs CPU op",
            &got.dx,
            &want.dx,
            tg,
            s_eff / bn,
        ),
    );
    if let (Some(g), Some(w)) = (&got.dr, &want.dr) {
        f.check(
            label,
            compare("autograd drow_scale vs CPU op", g, w, tl, 1.0 / bn),
        );
    }
    let loss_and_grad = |cfg: &MarginSoftmaxLoss,
                         input: &Tensor,
                         targets: &Tensor,
                         scale: Option<&Tensor>|
     -> Result<(Tensor, Tensor, Option<Tensor>)> {
        match scale {
            Some(rs) => {
                let (l, g, gr) = cfg.loss_and_grad_with_row_scale(input, targets, rs)?;
                Ok((l, g, Some(gr)))
            }
            None => {
                let (l, g) = cfg.loss_and_grad(input, targets)?;
                Ok((l, g, None))
            }
        }
    };
    let (want_l, want_g, want_r) =
        dut.host(|| loss_and_grad(&cfg_cpu, &input_cpu, &targets_cpu, scale_cpu.as_ref()))?;
    let (got_l, got_g, got_r) =
        dut.run(|_| loss_and_grad(&cfg_dev, &input_dev, &targets_dev, scale_dev.as_ref()))?;
    f.check(
        label,
        compare("loss_and_grad loss vs CPU op", &got_l, &want_l, tl, s_eff),
    );
    f.check(
        label,
        compare(
            "loss_and_grad dinput vs CPU op",
            &got_g,
            &want_g,
            tg,
            s_eff / bn,
        ),
    );
    if let (Some(g), Some(w)) = (&got_r, &want_r) {
        f.check(
            label,
            compare("loss_and_grad drow_scale vs CPU op", g, w, tl, 1.0 / bn),
        );
    }
    if reference {
        dut.run(|_| {
            parity::inputs_parity(
                label,
                &cfg_dev,
                &input_dev,
                &targets_dev,
                scale_dev.as_ref(),
                f,
            )
        })?;
    }
    Ok(())
}

/// Soft-capping, class weights with smoothing, and both with every option, on small rows (the
/// fused kernel for `loss_and_grad`, the split forward and `ms_backward` for `loss` + autograd):
/// every head kind, every dtype, with and without a per-row scale, against the CPU op and the
/// CPU reference.
fn softcap_and_weighted_smoothing(dut: &Dut) {
    let mut f = Failures::default();
    for dtype in parity::ALL_DTYPES {
        for (hn, head) in [
            ("arcface", Head::arcface()),
            ("softmax", Head::softmax()),
            ("rbf", Head::rbf()),
        ] {
            for (cn, opts, cap) in capped_configs(head) {
                for with_row_scale in [false, true] {
                    let label = format!(
                        "{hn}+{cn} 5x37 {} row scale {with_row_scale}",
                        dtype_name(dtype)
                    );
                    if let Err(e) = capped_case(
                        dut,
                        &label,
                        head,
                        (&opts, cap),
                        (5, 37),
                        dtype,
                        with_row_scale,
                        true,
                        &mut f,
                    ) {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("kernels: soft-capping and weighted smoothing");
}

/// The same configurations across the fused / split boundary of `loss_and_grad` (C at the fused
/// limit and one past it: 3 blocks per row in the split forward), with several splits per row
/// and a ragged last split (C = 12289: 4 splits), and through the grid-stride loops (grid cap
/// 3), every dtype, against the CPU op.
fn softcap_weighted_smoothing_paths(dut: &Dut) {
    let mut f = Failures::default();
    let capped = dut.with_grid_cap(3);
    for dtype in parity::ALL_DTYPES {
        let limit = fused_limit(dut, dtype);
        let cases = [
            (dut, "arcface", Head::arcface(), (3usize, limit)),
            (dut, "arcface", Head::arcface(), (3, limit + 1)),
            (dut, "rbf", Head::rbf(), (2, 12_289)),
            (&capped, "softmax capped grid", Head::softmax(), (11, 37)),
            (
                &capped,
                "softmax capped grid",
                Head::softmax(),
                (5, limit + 1),
            ),
        ];
        for (d, hn, head, (b, c)) in cases {
            for (cn, opts, cap) in capped_configs(head) {
                if cn == "softcap" {
                    continue; // the small grid has it alone; here with the other options
                }
                for with_row_scale in [false, true] {
                    let label = format!(
                        "{hn}+{cn} {b}x{c} {} row scale {with_row_scale}",
                        dtype_name(dtype)
                    );
                    if let Err(e) = capped_case(
                        d,
                        &label,
                        head,
                        (&opts, cap),
                        (b, c),
                        dtype,
                        with_row_scale,
                        false,
                        &mut f,
                    ) {
                        f.err(&label, e);
                    }
                }
            }
        }
    }
    f.finish("kernels: soft-capping and weighted smoothing on every path");
}

// ---- GPU-sized shapes. ----

/// Loss + autograd gradient and `loss_and_grad` on the device against the CPU fused op.
fn vs_cpu_op(
    dut: &Dut,
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
    let dev = &dut.dev;
    let cfg_gpu = cfg_on(&cfg_cpu, dev)?;
    let input_cpu = input_tensor(&x, b, c, dtype, &cpu)?;
    let targets_cpu = targets_i64(&t, &cpu)?;
    drop(x);
    let input_gpu = input_cpu.to_device(dev)?;
    let targets_gpu = targets_cpu.to_device(dev)?;
    let (tl, tg) = tols(dtype);
    let s = head.scale();
    let bn = b.max(1) as f64;

    let want = dut.host(|| autograd(Side::Fused, &cfg_cpu, &input_cpu, &targets_cpu, None))?;
    let got = dut.run(|_| autograd(Side::Fused, &cfg_gpu, &input_gpu, &targets_gpu, None))?;
    f.check(
        label,
        compare("loss vs CPU op", &got.loss, &want.loss, tl, s),
    );
    f.check(
        label,
        compare("autograd dinput vs CPU op", &got.dx, &want.dx, tg, s / bn),
    );
    drop(got);
    let (want_l, want_g) = dut.host(|| cfg_cpu.loss_and_grad(&input_cpu, &targets_cpu))?;
    let (got_l, got_g) = dut.run(|_| cfg_gpu.loss_and_grad(&input_gpu, &targets_gpu))?;
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
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
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
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn big_1024x32000(dut: &Dut) {
    let mut f = Failures::default();
    let (b, c) = (1024usize, 32_000usize);
    for (name, head, opts) in big_configs() {
        for dtype in [DType::F32, DType::BF16] {
            let label = format!("{name} {b}x{c} {}", dtype_name(dtype));
            if let Err(e) = vs_cpu_op(dut, &label, head, &opts, (b, c), dtype, &mut f) {
                f.err(&label, e);
            }
            dut.run(|dev| {
                parity::parity_case(dev, name, head, &opts, (b, c), dtype, false, &mut f)
            });
        }
    }
    f.finish("kernels: 1024 x 32000");
}

/// (64, 1_000_000): every configuration in f32 and bf16 against the CPU fused op; ArcFace with
/// smoothing in f32 also against the CPU reference (slow on the CPU).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn big_64x1m(dut: &Dut) {
    let mut f = Failures::default();
    let (b, c) = (64usize, 1_000_000usize);
    for (name, head, opts) in big_configs() {
        for dtype in [DType::F32, DType::BF16] {
            let label = format!("{name} {b}x{c} {}", dtype_name(dtype));
            if let Err(e) = vs_cpu_op(dut, &label, head, &opts, (b, c), dtype, &mut f) {
                f.err(&label, e);
            }
        }
    }
    let (name, head, opts) = big_configs().swap_remove(0);
    dut.run(|dev| parity::parity_case(dev, name, head, &opts, (b, c), DType::F32, false, &mut f));
    f.finish("kernels: 64 x 1000000");
}

// ---- Determinism. ----

/// A tensor's exact values (every f16 / bf16 / f32 value converts to f64 exactly).
fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(vec_f64(t)?.iter().map(|v| v.to_bits()).collect())
}

/// Two runs of `loss_and_grad` (with and without a row scale) and of `loss` + backward give
/// bitwise identical results, in the fused path (C below the limit) and in the split path
/// (above it, with several blocks per row). Emulated, the thread order is the emulator's
/// (`CUDA_EMU_ORDER`), so across the CI runs this also checks that no result depends on it
/// beyond the tolerances of the parity grids.
fn deterministic(dut: &Dut) {
    let dev = &dut.dev;
    let mut f = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let limit = fused_limit(dut, dtype);
        let shapes = dut.size(
            [(256usize, limit / 2), (256, limit + 1), (16, 200_000)],
            [(6usize, limit / 2), (3, limit + 1), (2, 30_000)],
        );
        for (b, c) in shapes {
            for (hn, head) in [("arcface", Head::arcface()), ("rbf", Head::rbf())] {
                let label = format!("det {hn} {b}x{c} {}", dtype_name(dtype));
                let mut run = || -> Result<()> {
                    let mut r = rng(seed_of(&label));
                    let t = gen_targets(&mut r, b, c, true);
                    let x = gen_input(&mut r, &head, b, c, &t);
                    let cfg = Opts::combo().cfg(head, c, dtype, dev, 1)?;
                    let input = input_tensor(&x, b, c, dtype, dev)?;
                    let targets = targets_i64(&t, dev)?;
                    let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, dev)?
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
                    let (first, second) = (dut.run(|_| once())?, dut.run(|_| once())?);
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
    f.finish("kernels: bitwise determinism");
}

/// Every reduction with the combination of options and a per-row scale, on both paths of
/// `loss_and_grad` (C = 4000: fused; C = 40000: split, 10 blocks per row in the forward).
fn reduction_variants(dut: &Dut) {
    let mut f = Failures::default();
    for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for (b, c) in [(dut.size(96usize, 5), 4000usize), (dut.size(96, 2), 40_000)] {
            let opts = Opts::combo().with_reduction(red);
            let name = format!("combo {red:?}");
            dut.run(|dev| {
                parity::parity_case(
                    dev,
                    &name,
                    Head::combined(),
                    &opts,
                    (b, c),
                    DType::F32,
                    true,
                    &mut f,
                )
            });
        }
    }
    f.finish("kernels: reductions on both paths");
}
