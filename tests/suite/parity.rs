//! Forward and gradient parity of the fused op with `reference` (plain candle ops + autograd).
//!
//! Every case checks, against the reference's loss and autograd gradients:
//! 1. `loss` (value, dtype, shape) and its autograd gradient into the input (and into the row
//!    scale for the `*_with_row_scale` cases);
//! 2. `loss_and_grad` / `loss_and_grad_with_row_scale`: loss, input gradient (in the input dtype)
//!    and row-scale gradient (in the accumulation dtype).
//!
//! Grid sizes:
//! - (1,1), (2,8), (9,41) and (37,1000): every head variant alone; every option alone with
//!   ArcFace and RBF; the all-options combination for every head variant (with Mean, None, Sum and
//!   Detached margins); the row-scale cases (SphereFace m = 1, 2, 3, 4 with feature norms
//!   r ∈ [5, 30], ArcFace, CosFace, Combined, Softmax, RBF; plain, combination, None, focal +
//!   Poly-N with Sum, Detached) — all in f64, f32, f16 and bf16;
//! - (64,10000): every head variant alone and with the combination (Mean) in all four dtypes;
//!   every option alone and the combination variants with ArcFace and RBF in f64 and f32; the
//!   full row-scale grid in f64 and f32, and its SphereFace / ArcFace part in f16 and bf16.
//!
//! Every grid is a function taking `&Device` so that the GPU suite can reuse it. The small grids
//! of every head variant (heads alone, the combination, weighted smoothing, soft-capping) run as
//! one test per head, `parity_small_<grid>_<head>` (`cargo test arcface`).

use candle_core::{DType, Device, Result, Tensor};
use candle_margin_softmax::{Head, Reduction};

use crate::common::*;

pub const SMALL: [(usize, usize); 3] = [(1, 1), (2, 8), (9, 41)];
pub const MEDIUM: (usize, usize) = (37, 1000);
pub const LARGE: (usize, usize) = (64, 10000);
pub const ALL_DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];
pub const FULL_DTYPES: [DType; 2] = [DType::F64, DType::F32];

/// One parity case; failures are recorded in `f` with the case label.
#[allow(clippy::too_many_arguments)]
pub fn parity_case(
    dev: &Device,
    name: &str,
    head: Head,
    opts: &Opts,
    (b, c): (usize, usize),
    dtype: DType,
    with_row_scale: bool,
    f: &mut Failures,
) {
    let label = format!(
        "{name} {b}x{c} {}{}",
        dtype_name(dtype),
        if with_row_scale { " row_scale" } else { "" }
    );
    if let Err(e) = parity_inner(dev, &label, head, opts, (b, c), dtype, with_row_scale, f) {
        f.err(&label, e);
    }
}

#[allow(clippy::too_many_arguments)]
fn parity_inner(
    dev: &Device,
    label: &str,
    head: Head,
    opts: &Opts,
    (b, c): (usize, usize),
    dtype: DType,
    with_row_scale: bool,
    f: &mut Failures,
) -> Result<()> {
    let seed = seed_of(label);
    let mut r = rng(seed);
    let t = gen_targets(&mut r, b, c, opts.ignore);
    let x = gen_input(&mut r, &head, b, c, &t);
    let rs = gen_row_scale(&mut r, b);
    let acc = acc_dtype(dtype);
    let cfg = opts.cfg(head, c, dtype, dev, seed)?;
    let input = input_tensor(&x, b, c, dtype, dev)?;
    let targets = targets_i64(&t, dev)?;
    let row_scale = if with_row_scale {
        Some(Tensor::from_vec(rs.clone(), b, dev)?.to_dtype(acc)?)
    } else {
        None
    };
    inputs_parity(label, &cfg, &input, &targets, row_scale.as_ref(), f)
}

/// Parity of all entry points on given tensors (shared with the edge-value tests), against the
/// reference run in the input's dtype.
pub fn inputs_parity(
    label: &str,
    cfg: &candle_margin_softmax::MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
    f: &mut Failures,
) -> Result<()> {
    inputs_parity_vs(label, cfg, input, targets, row_scale, false, f)
}

/// As [`inputs_parity`]; with `f64_oracle` the reference runs in f64 on the same (already
/// rounded) values: for edge rows where the naive reference itself loses precision in f32 (e.g.
/// a smoothed ℓ_CE of ~10 multiplying a rounded 1 − p_y in the focal gradient).
pub fn inputs_parity_vs(
    label: &str,
    cfg: &candle_margin_softmax::MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
    f64_oracle: bool,
    f: &mut Failures,
) -> Result<()> {
    let dtype = input.dtype();
    let acc = acc_dtype(dtype);
    let (b, _c) = input.dims2()?;
    let (tl, tg) = tols(dtype);
    // Natural scales (see `compare`): a row loss is a difference of logits of size ≤ s_eff, an
    // input-gradient element is (p_j − q_j)·s_eff / B at most (Mean), a row-scale gradient
    // element Σ_j g_j·u_j is O(1 / B).
    let s_eff = match row_scale {
        Some(r) => vec_f64(r)?.iter().fold(1.0f64, |m, v| m.max(*v)),
        None => cfg.head.scale(),
    };
    let bn = b.max(1) as f64;
    let floor_loss = s_eff;
    let floor_grad = s_eff / bn;
    let floor_dr = 1.0 / bn;

    // Gradients where the reference has its documented focal 0 < γ < 1 limitation (NaN where p_t
    // rounds to 1) are compared where the reference is finite (the fused side must be finite
    // everywhere).
    let cmp_grad = if cfg.focal_gamma > 0.0 && cfg.focal_gamma < 1.0 {
        compare_where_ref_finite
    } else {
        compare
    };
    let fused = autograd(Side::Fused, cfg, input, targets, row_scale)?;
    // The reference always runs on the CPU (on the same values), whatever device the fused op
    // runs on; `compare` reads both sides back to the host.
    let refr = if f64_oracle {
        let r64 = row_scale.map(|r| r.to_dtype(DType::F64)).transpose()?;
        reference_on_cpu(cfg, &input.to_dtype(DType::F64)?, targets, r64.as_ref())?
    } else {
        reference_on_cpu(cfg, input, targets, row_scale)?
    };

    let want_loss_dims: &[usize] = if cfg.reduction == Reduction::None {
        &[b]
    } else {
        &[]
    };
    if fused.loss.dtype() != acc {
        f.0.push(format!(
            "[{label}] loss dtype {:?}, want {acc:?}",
            fused.loss.dtype()
        ));
    }
    if fused.loss.dims() != want_loss_dims {
        f.0.push(format!(
            "[{label}] loss shape {:?}, want {want_loss_dims:?}",
            fused.loss.dims()
        ));
    }
    if fused.dx.dtype() != dtype {
        f.0.push(format!(
            "[{label}] autograd dx dtype {:?}, want {dtype:?}",
            fused.dx.dtype()
        ));
    }
    f.check(
        label,
        compare("loss", &fused.loss, &refr.loss, tl, floor_loss),
    );
    f.check(
        label,
        cmp_grad("autograd dinput", &fused.dx, &refr.dx, tg, floor_grad),
    );
    if let (Some(a), Some(bb)) = (&fused.dr, &refr.dr) {
        f.check(label, cmp_grad("autograd drow_scale", a, bb, tl, floor_dr));
    }

    let (loss, dx, dr) = match row_scale {
        Some(r) => {
            let (l, g, gr) = cfg.loss_and_grad_with_row_scale(input, targets, r)?;
            (l, g, Some(gr))
        }
        None => {
            let (l, g) = cfg.loss_and_grad(input, targets)?;
            (l, g, None)
        }
    };
    if dx.dtype() != dtype {
        f.0.push(format!(
            "[{label}] loss_and_grad dinput dtype {:?}, want {dtype:?}",
            dx.dtype()
        ));
    }
    f.check(
        label,
        compare("loss_and_grad loss", &loss, &refr.loss, tl, floor_loss),
    );
    f.check(
        label,
        cmp_grad("loss_and_grad dinput", &dx, &refr.dx, tg, floor_grad),
    );
    if let (Some(a), Some(bb)) = (&dr, &refr.dr) {
        if a.dtype() != acc {
            f.0.push(format!(
                "[{label}] loss_and_grad drow_scale dtype {:?}, want {acc:?}",
                a.dtype()
            ));
        }
        f.check(
            label,
            cmp_grad("loss_and_grad drow_scale", a, bb, tl, floor_dr),
        );
    }
    Ok(())
}

/// The reference's loss and autograd gradients, computed on the CPU from copies of the inputs
/// (and of the class weights).
pub fn reference_on_cpu(
    cfg: &candle_margin_softmax::MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
) -> Result<Autograd> {
    let cpu = Device::Cpu;
    let row_scale = row_scale.map(|r| r.to_device(&cpu)).transpose()?;
    autograd(
        Side::Reference,
        &cfg_on(cfg, &cpu)?,
        &input.to_device(&cpu)?,
        &targets.to_device(&cpu)?,
        row_scale.as_ref(),
    )
}

/// Every (head, option set) pair over the shapes and dtypes, without and / or with a per-row
/// scale; a case is labelled `head+options` (`head` for an unnamed option set).
#[allow(clippy::too_many_arguments)]
pub fn grid(
    dev: &Device,
    heads: &[(&str, Head)],
    option_sets: &[(String, Opts)],
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    row_scales: &[bool],
    f: &mut Failures,
) {
    for &(hn, head) in heads {
        for (on, opts) in option_sets {
            let name = if on.is_empty() {
                hn.to_string()
            } else {
                format!("{hn}+{on}")
            };
            for &shape in shapes {
                for &dt in dtypes {
                    for &row_scale in row_scales {
                        parity_case(dev, &name, head, opts, shape, dt, row_scale, f);
                    }
                }
            }
        }
    }
}

fn named(sets: Vec<(&str, Opts)>) -> Vec<(String, Opts)> {
    sets.into_iter().map(|(n, o)| (n.to_string(), o)).collect()
}

/// Each of `heads` alone (default criterion: Mean cross-entropy).
pub fn heads_alone(
    dev: &Device,
    heads: &[(&'static str, Head)],
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    f: &mut Failures,
) {
    let plain = named(vec![("", Opts::default())]);
    grid(dev, heads, &plain, shapes, dtypes, &[false], f);
}

/// Every criterion option alone, with ArcFace and with RBF.
pub fn options_alone_grid(
    dev: &Device,
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    f: &mut Failures,
) {
    let heads = [("arcface", Head::arcface()), ("rbf", Head::rbf())];
    grid(
        dev,
        &heads,
        &named(options_alone()),
        shapes,
        dtypes,
        &[false],
        f,
    );
}

/// The combination (smoothing + focal + Poly-1 + z-loss + weights + ignore) for every head
/// variant, with Mean; with `extra`, also with Reduction::None, Sum and Detached margins.
pub fn combo_every_head(
    dev: &Device,
    heads: &[(&'static str, Head)],
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    extra: bool,
    f: &mut Failures,
) {
    let mut variants = vec![("combo", Opts::combo())];
    if extra {
        variants.push(("combo_none", Opts::combo().with_reduction(Reduction::None)));
        variants.push(("combo_sum", Opts::combo().with_reduction(Reduction::Sum)));
        variants.push(("combo_detached", Opts::combo().with_detached()));
    }
    grid(dev, heads, &named(variants), shapes, dtypes, &[false], f);
}

/// The per-row scale: SphereFace (the original A-Softmax with feature norms r ∈ [5, 30]) with
/// several margins, and ArcFace / Softmax / RBF, alone and with options.
pub fn row_scale_grid(
    dev: &Device,
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    full: bool,
    f: &mut Failures,
) {
    let mut heads = vec![
        ("sphereface_l5", Head::sphereface(5.0)),
        ("arcface", Head::arcface()),
    ];
    if full {
        heads.extend([
            (
                "sphereface_m1_l0",
                Head::SphereFace {
                    s: 1.0,
                    m: 1.0,
                    lambda: 0.0,
                },
            ),
            (
                "sphereface_m2_l0",
                Head::SphereFace {
                    s: 1.0,
                    m: 2.0,
                    lambda: 0.0,
                },
            ),
            (
                "sphereface_m3_l100",
                Head::SphereFace {
                    s: 1.0,
                    m: 3.0,
                    lambda: 100.0,
                },
            ),
            ("softmax", Head::softmax()),
            ("cosface", Head::cosface()),
            ("combined", Head::combined()),
            ("rbf", Head::rbf()),
        ]);
    }
    let mut variants = vec![("plain", Opts::default()), ("combo", Opts::combo())];
    if full {
        variants.push(("combo_none", Opts::combo().with_reduction(Reduction::None)));
        variants.push((
            "focal_polyN_sum",
            Opts {
                focal: 0.5,
                poly: vec![1.0, -0.45, 0.25],
                reduction: Reduction::Sum,
                ..Opts::default()
            },
        ));
        variants.push(("detached", Opts::default().with_detached()));
    }
    grid(dev, &heads, &named(variants), shapes, dtypes, &[true], f);
}

/// Class weights with label smoothing against the reference's PyTorch composition: every head
/// variant, alone and with focal / Poly / z-loss, ignored rows, every reduction.
pub fn weighted_smoothing_grid(
    dev: &Device,
    heads: &[(&'static str, Head)],
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    f: &mut Failures,
) {
    let sets = weighted_smoothing_options();
    grid(dev, heads, &sets, shapes, dtypes, &[false], f);
}

/// Logit soft-capping: every head variant, alone and with every option, with and without a
/// per-row scale.
pub fn softcap_grid(
    dev: &Device,
    heads: &[(&'static str, Head)],
    shapes: &[(usize, usize)],
    dtypes: &[DType],
    f: &mut Failures,
) {
    let sets = named(softcap_options());
    grid(dev, heads, &sets, shapes, dtypes, &[false, true], f);
}

pub fn small_weighted_smoothing(dev: &Device, head: &str) {
    let mut f = Failures::default();
    weighted_smoothing_grid(dev, &variants_of(head), &SMALL, &ALL_DTYPES, &mut f);
    f.finish(&format!(
        "parity: class weights + label smoothing (PyTorch), {head}, small shapes"
    ));
}

pub fn small_softcap(dev: &Device, head: &str) {
    let mut f = Failures::default();
    softcap_grid(dev, &variants_of(head), &SMALL, &ALL_DTYPES, &mut f);
    f.finish(&format!("parity: logit soft-capping, {head}, small shapes"));
}

pub fn small_heads(dev: &Device, head: &str) {
    let mut f = Failures::default();
    heads_alone(dev, &variants_of(head), &SMALL, &ALL_DTYPES, &mut f);
    f.finish(&format!("parity: {head} alone, small shapes"));
}

pub fn small_options(dev: &Device) {
    let mut f = Failures::default();
    options_alone_grid(dev, &SMALL, &ALL_DTYPES, &mut f);
    f.finish("parity: options alone (ArcFace, RBF), small shapes");
}

pub fn small_combo(dev: &Device, head: &str) {
    let mut f = Failures::default();
    combo_every_head(dev, &variants_of(head), &SMALL, &ALL_DTYPES, true, &mut f);
    f.finish(&format!(
        "parity: all options together, {head}, small shapes"
    ));
}

pub fn small_row_scale(dev: &Device) {
    let mut f = Failures::default();
    row_scale_grid(dev, &SMALL, &ALL_DTYPES, true, &mut f);
    f.finish("parity: row scale, small shapes");
}

pub fn medium(dev: &Device) {
    let mut f = Failures::default();
    heads_alone(dev, &head_variants(), &[MEDIUM], &ALL_DTYPES, &mut f);
    combo_every_head(dev, &head_variants(), &[MEDIUM], &ALL_DTYPES, true, &mut f);
    options_alone_grid(dev, &[MEDIUM], &ALL_DTYPES, &mut f);
    row_scale_grid(dev, &[MEDIUM], &ALL_DTYPES, true, &mut f);
    weighted_smoothing_grid(dev, &main_heads(), &[MEDIUM], &FULL_DTYPES, &mut f);
    softcap_grid(dev, &main_heads(), &[MEDIUM], &FULL_DTYPES, &mut f);
    f.finish("parity: 37x1000");
}

pub fn large_heads(dev: &Device) {
    let mut f = Failures::default();
    heads_alone(dev, &head_variants(), &[LARGE], &ALL_DTYPES, &mut f);
    combo_every_head(dev, &head_variants(), &[LARGE], &ALL_DTYPES, false, &mut f);
    f.finish("parity: 64x10000, heads alone and all options together");
}

pub fn large_options(dev: &Device) {
    let mut f = Failures::default();
    options_alone_grid(dev, &[LARGE], &FULL_DTYPES, &mut f);
    combo_every_head(
        dev,
        &[("arcface", Head::arcface()), ("rbf", Head::rbf())],
        &[LARGE],
        &FULL_DTYPES,
        true,
        &mut f,
    );
    f.finish("parity: 64x10000, options alone (ArcFace, RBF)");
}

pub fn large_row_scale(dev: &Device) {
    let mut f = Failures::default();
    row_scale_grid(dev, &[LARGE], &FULL_DTYPES, true, &mut f);
    row_scale_grid(dev, &[LARGE], &[DType::F16, DType::BF16], false, &mut f);
    f.finish("parity: 64x10000, row scale");
}

#[test]
fn parity_small_weighted_smoothing_softmax() {
    small_weighted_smoothing(&device(), "softmax");
}

#[test]
fn parity_small_weighted_smoothing_cosface() {
    small_weighted_smoothing(&device(), "cosface");
}

#[test]
fn parity_small_weighted_smoothing_arcface() {
    small_weighted_smoothing(&device(), "arcface");
}

#[test]
fn parity_small_weighted_smoothing_combined() {
    small_weighted_smoothing(&device(), "combined");
}

#[test]
fn parity_small_weighted_smoothing_sphereface() {
    small_weighted_smoothing(&device(), "sphereface");
}

#[test]
fn parity_small_weighted_smoothing_rbf() {
    small_weighted_smoothing(&device(), "rbf");
}

#[test]
fn parity_small_softcap_softmax() {
    small_softcap(&device(), "softmax");
}

#[test]
fn parity_small_softcap_cosface() {
    small_softcap(&device(), "cosface");
}

#[test]
fn parity_small_softcap_arcface() {
    small_softcap(&device(), "arcface");
}

#[test]
fn parity_small_softcap_combined() {
    small_softcap(&device(), "combined");
}

#[test]
fn parity_small_softcap_sphereface() {
    small_softcap(&device(), "sphereface");
}

#[test]
fn parity_small_softcap_rbf() {
    small_softcap(&device(), "rbf");
}

#[test]
fn parity_small_heads_softmax() {
    small_heads(&device(), "softmax");
}

#[test]
fn parity_small_heads_cosface() {
    small_heads(&device(), "cosface");
}

#[test]
fn parity_small_heads_arcface() {
    small_heads(&device(), "arcface");
}

#[test]
fn parity_small_heads_combined() {
    small_heads(&device(), "combined");
}

#[test]
fn parity_small_heads_sphereface() {
    small_heads(&device(), "sphereface");
}

#[test]
fn parity_small_heads_rbf() {
    small_heads(&device(), "rbf");
}

#[test]
fn parity_small_options() {
    small_options(&device());
}

#[test]
fn parity_small_combo_softmax() {
    small_combo(&device(), "softmax");
}

#[test]
fn parity_small_combo_cosface() {
    small_combo(&device(), "cosface");
}

#[test]
fn parity_small_combo_arcface() {
    small_combo(&device(), "arcface");
}

#[test]
fn parity_small_combo_combined() {
    small_combo(&device(), "combined");
}

#[test]
fn parity_small_combo_sphereface() {
    small_combo(&device(), "sphereface");
}

#[test]
fn parity_small_combo_rbf() {
    small_combo(&device(), "rbf");
}

#[test]
fn parity_small_row_scale() {
    small_row_scale(&device());
}

#[test]
fn parity_medium() {
    medium(&device());
}

#[test]
fn parity_large_heads() {
    large_heads(&device());
}

#[test]
fn parity_large_options() {
    large_options(&device());
}

#[test]
fn parity_large_row_scale() {
    large_row_scale(&device());
}
