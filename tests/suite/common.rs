//! Shared helpers: the device, seeded input generators, configuration builders, and the
//! norm-wise comparison used by every parity / finite-difference check.

#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, Reduction, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// The device the CPU suite runs on; every grid function takes `&Device`, and `kernels.rs` runs
/// the same grids on a CUDA device and through the emulated kernels.
pub fn device() -> Device {
    Device::Cpu
}

/// The same loss configuration with its class weights (if any) moved to `dev`.
pub fn cfg_on(cfg: &MarginSoftmaxLoss, dev: &Device) -> Result<MarginSoftmaxLoss> {
    let mut cfg = cfg.clone();
    if let Some(w) = &cfg.class_weights {
        cfg.class_weights = Some(w.to_device(dev)?);
    }
    Ok(cfg)
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A stable seed from a label (FNV-1a), so each grid cell has its own reproducible data.
pub fn seed_of(label: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub const IGNORE: i64 = -100;

/// Every head variant the grids use (each head alone, plus a few non-default variants).
pub fn head_variants() -> Vec<(&'static str, Head)> {
    vec![
        ("softmax", Head::softmax()),
        ("softmax_s2.5", Head::Softmax { s: 2.5 }),
        ("cosface", Head::cosface()),
        ("arcface", Head::arcface()),
        (
            "arcface_easy",
            Head::ArcFace {
                s: 64.0,
                m: 0.5,
                easy_margin: true,
            },
        ),
        ("combined", Head::combined()),
        (
            "combined_m1",
            Head::Combined {
                s: 32.0,
                m1: 1.35,
                m2: 0.25,
                m3: 0.1,
            },
        ),
        ("sphereface_l5", Head::sphereface(5.0)),
        (
            "sphereface_m3_l0",
            Head::SphereFace {
                s: 16.0,
                m: 3.0,
                lambda: 0.0,
            },
        ),
        ("rbf", Head::rbf()),
        (
            "rbf_g2",
            Head::Rbf {
                s: 10.0,
                gamma: 2.0,
            },
        ),
    ]
}

/// The heads by the names of their papers, one per `Head` variant: each grid that runs every
/// head variant is split by these into one test per head (`cargo test arcface` runs ArcFace's).
pub const HEADS: [&str; 6] = [
    "softmax",
    "cosface",
    "arcface",
    "combined",
    "sphereface",
    "rbf",
];

/// The head's name in [`HEADS`] (its `Head` variant).
pub fn head_name(head: &Head) -> &'static str {
    match head {
        Head::Softmax { .. } => "softmax",
        Head::CosFace { .. } => "cosface",
        Head::ArcFace { .. } => "arcface",
        Head::Combined { .. } => "combined",
        Head::SphereFace { .. } => "sphereface",
        Head::Rbf { .. } => "rbf",
    }
}

/// The entries of `heads` that are variants of the head `name` (in their order); panics when
/// there is none, so that a per-head test never passes by running nothing.
pub fn only(name: &str, heads: Vec<(&'static str, Head)>) -> Vec<(&'static str, Head)> {
    assert!(HEADS.contains(&name), "unknown head {name}");
    let of: Vec<_> = heads
        .into_iter()
        .filter(|(_, h)| head_name(h) == name)
        .collect();
    assert!(!of.is_empty(), "no variant of the head {name}");
    of
}

/// Every variant of the head `name` in [`head_variants`].
pub fn variants_of(name: &str) -> Vec<(&'static str, Head)> {
    only(name, head_variants())
}

/// The main heads, one per kind (used where the grid would get too big with every variant).
pub fn main_heads() -> Vec<(&'static str, Head)> {
    vec![
        ("softmax", Head::softmax()),
        ("cosface", Head::cosface()),
        ("arcface", Head::arcface()),
        ("combined", Head::combined()),
        ("sphereface_l5", Head::sphereface(5.0)),
        ("rbf", Head::rbf()),
    ]
}

/// Criterion options, independent of the head. `weights` and `ignore` are realised per call
/// (class weights need C; `ignore` sets ~30% of the targets to `IGNORE`).
#[derive(Clone, Debug)]
pub struct Opts {
    pub smoothing: f64,
    pub focal: f64,
    pub poly: Vec<f64>,
    pub z: f64,
    pub weights: bool,
    pub ignore: bool,
    pub reduction: Reduction,
    pub detached: bool,
    /// Logit soft-capping, relative to the head: cap = softcap·max(s, 5) (see [`softcap_of`]).
    pub softcap: Option<f64>,
}

/// The soft-capping cap of `opts.softcap = Some(rel)` for `head`: rel·max(s, 5), so that the cap
/// bites for every head (scaled cosines reach ±s, softmax logits here are N(0, 3)).
pub fn softcap_of(head: &Head, rel: f64) -> f64 {
    rel * head.scale().max(5.0)
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            smoothing: 0.0,
            focal: 0.0,
            poly: Vec::new(),
            z: 0.0,
            weights: false,
            ignore: false,
            reduction: Reduction::Mean,
            detached: false,
            softcap: None,
        }
    }
}

impl Opts {
    /// Smoothing + focal + Poly-1 + z-loss + class weights + ignore_index together.
    pub fn combo() -> Self {
        Self {
            smoothing: 0.1,
            focal: 2.0,
            poly: vec![1.0],
            z: 1e-3,
            weights: true,
            ignore: true,
            ..Self::default()
        }
    }

    pub fn with_reduction(mut self, r: Reduction) -> Self {
        self.reduction = r;
        self
    }

    pub fn with_detached(mut self) -> Self {
        self.detached = true;
        self
    }

    /// Soft-capping at 0.4·max(s, 5).
    pub fn with_softcap(mut self) -> Self {
        self.softcap = Some(0.4);
        self
    }

    pub fn cfg(
        &self,
        head: Head,
        c: usize,
        weight_dtype: DType,
        dev: &Device,
        seed: u64,
    ) -> Result<MarginSoftmaxLoss> {
        let mut cfg = MarginSoftmaxLoss::new(head)
            .label_smoothing(self.smoothing)
            .focal_gamma(self.focal)
            .poly(&self.poly)
            .z_loss(self.z)
            .reduction(self.reduction)
            .margin_grad(if self.detached {
                MarginGrad::Detached
            } else {
                MarginGrad::Exact
            });
        if let Some(rel) = self.softcap {
            cfg = cfg.logit_softcap(softcap_of(&head, rel));
        }
        if self.weights {
            let mut r = rng(seed ^ 0x5eed_0003);
            let w: Vec<f64> = (0..c).map(|_| r.random_range(0.5..2.0)).collect();
            cfg = cfg.class_weights(Tensor::from_vec(w, c, dev)?.to_dtype(weight_dtype)?)?;
        }
        Ok(cfg)
    }
}

/// Each criterion option alone (the plain Mean cross-entropy included), labelled.
pub fn options_alone() -> Vec<(&'static str, Opts)> {
    let d = Opts::default;
    vec![
        ("plain_mean", d()),
        (
            "smoothing",
            Opts {
                smoothing: 0.1,
                ..d()
            },
        ),
        ("focal", Opts { focal: 2.0, ..d() }),
        ("focal_0.5", Opts { focal: 0.5, ..d() }),
        (
            "poly1",
            Opts {
                poly: vec![1.0],
                ..d()
            },
        ),
        (
            // ε_2 = −0.45 ≥ −1/2 is valid (and exercises a negative coefficient).
            "polyN",
            Opts {
                poly: vec![1.0, -0.45, 0.25],
                ..d()
            },
        ),
        ("zloss", Opts { z: 1e-3, ..d() }),
        (
            "weights",
            Opts {
                weights: true,
                ..d()
            },
        ),
        (
            "ignore",
            Opts {
                ignore: true,
                ..d()
            },
        ),
        ("none", d().with_reduction(Reduction::None)),
        ("sum", d().with_reduction(Reduction::Sum)),
        ("detached", d().with_detached()),
        ("softcap", d().with_softcap()),
        (
            "weights_smoothing",
            Opts {
                weights: true,
                smoothing: 0.1,
                ..d()
            },
        ),
    ]
}

/// Class weights with label smoothing (PyTorch's semantics), with ignored rows: alone and with
/// focal, Poly, z-loss and all three, each with every reduction.
pub fn weighted_smoothing_options() -> Vec<(String, Opts)> {
    let base = Opts {
        weights: true,
        smoothing: 0.15,
        ignore: true,
        ..Opts::default()
    };
    let extras: [(&str, Opts); 5] = [
        ("", base.clone()),
        (
            "+focal",
            Opts {
                focal: 2.0,
                ..base.clone()
            },
        ),
        (
            "+poly",
            Opts {
                poly: vec![1.0, -0.3],
                ..base.clone()
            },
        ),
        (
            "+zloss",
            Opts {
                z: 1e-3,
                ..base.clone()
            },
        ),
        (
            "+focal+poly+zloss",
            Opts {
                focal: 0.5,
                poly: vec![1.0],
                z: 1e-3,
                ..base.clone()
            },
        ),
    ];
    let mut out = Vec::new();
    for (en, opts) in extras {
        for (rn, red) in [
            ("mean", Reduction::Mean),
            ("sum", Reduction::Sum),
            ("none", Reduction::None),
        ] {
            out.push((
                format!("weights_smoothing{en}_{rn}"),
                opts.clone().with_reduction(red),
            ));
        }
    }
    out
}

/// Soft-capping alone, with every option (weights + smoothing included) and with Detached
/// margins.
pub fn softcap_options() -> Vec<(&'static str, Opts)> {
    vec![
        ("softcap", Opts::default().with_softcap()),
        ("softcap_combo", Opts::combo().with_softcap()),
        (
            "softcap_combo_sum",
            Opts::combo().with_softcap().with_reduction(Reduction::Sum),
        ),
        (
            "softcap_detached_focal",
            Opts {
                focal: 0.5,
                ..Opts::default()
            }
            .with_softcap()
            .with_detached(),
        ),
    ]
}

/// Random targets in [0, C); with `ignore`, about 30% of the rows get `IGNORE` (at least one
/// row kept and, when B ≥ 2, at least one ignored).
pub fn gen_targets(r: &mut StdRng, b: usize, c: usize, ignore: bool) -> Vec<i64> {
    let mut t: Vec<i64> = (0..b).map(|_| r.random_range(0..c as i64)).collect();
    if ignore && b >= 2 {
        for v in t.iter_mut() {
            if r.random_bool(0.3) {
                *v = IGNORE;
            }
        }
        t[0] = r.random_range(0..c as i64);
        if t.iter().all(|&v| v != IGNORE) {
            t[b - 1] = IGNORE;
        }
    }
    t
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cosine,
    Distance,
    Logit,
}

pub fn kind(head: &Head) -> Kind {
    match head {
        Head::Softmax { .. } => Kind::Logit,
        Head::Rbf { .. } => Kind::Distance,
        _ => Kind::Cosine,
    }
}

/// A [B, C] input for the head, row-major:
/// - cosines uniform in (−1, 1), and in about half the rows the target cosine is drawn from
///   (0.2, 0.9) so that the margin matters (the other half still reaches ArcFace's fallback
///   region c ≤ cos(π − m));
/// - RBF: d² uniform in (0, 4), about 15% far (log-uniform in 1e2..1e6);
/// - softmax logits normal(0, 3).
pub fn gen_input(r: &mut StdRng, head: &Head, b: usize, c: usize, targets: &[i64]) -> Vec<f64> {
    let mut x = vec![0.0; b * c];
    match kind(head) {
        Kind::Cosine => {
            for v in x.iter_mut() {
                *v = r.random_range(-1.0..1.0);
            }
            for (i, &t) in targets.iter().enumerate() {
                if t >= 0 && r.random_bool(0.5) {
                    x[i * c + t as usize] = r.random_range(0.2..0.9);
                }
            }
        }
        Kind::Distance => {
            for v in x.iter_mut() {
                *v = if r.random_bool(0.15) {
                    10f64.powf(r.random_range(2.0..6.0))
                } else {
                    r.random_range(0.0..4.0)
                };
            }
        }
        Kind::Logit => {
            let n = Normal::new(0.0, 3.0).unwrap();
            for v in x.iter_mut() {
                *v = n.sample(r);
            }
        }
    }
    x
}

/// Per-row scales (feature norms) in [5, 30].
pub fn gen_row_scale(r: &mut StdRng, b: usize) -> Vec<f64> {
    (0..b).map(|_| r.random_range(5.0..30.0)).collect()
}

pub fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

pub fn input_tensor(x: &[f64], b: usize, c: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(x.to_vec(), (b, c), dev)?.to_dtype(dtype)
}

pub fn targets_i64(t: &[i64], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(t.to_vec(), t.len(), dev)
}

pub fn vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F64 => "f64",
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
        DType::I64 => "i64",
        _ => "other",
    }
}

/// Tolerances (loss, input gradient) for the norm-wise comparison with the reference.
///
/// f64 1e-10, f32 1e-5. For f16 / bf16 the SAME half-precision input goes to both sides, and
/// both upcast to f32 internally, so the loss (f32) still matches at ~1e-5; the input gradient
/// is returned in the input dtype, so the two sides differ by the final rounding of nearly equal
/// f32 values, which can land on neighbouring half values: at most one ulp of the element,
/// i.e. 2^-10 relative for f16 (half-ulp 2^-11 ≈ 4.9e-4 each way) and 2^-7 for bf16 (half-ulp
/// 2^-8 ≈ 3.9e-3). Norm-wise relative to max|ref| that gives tol 2e-3 for f16 and 1.6e-2 for
/// bf16 (one ulp plus slack).
pub fn tols(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-10),
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (1e-5, 2e-3),
        DType::BF16 => (1e-5, 1.6e-2),
        _ => unreachable!(),
    }
}

/// Both tensors as f64 vectors, after checking that their shapes agree.
fn read_pair(
    what: &str,
    got: &Tensor,
    want: &Tensor,
) -> std::result::Result<(Vec<f64>, Vec<f64>), String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "{what}: shape {:?} vs reference {:?}",
            got.dims(),
            want.dims()
        ));
    }
    match (vec_f64(got), vec_f64(want)) {
        (Ok(g), Ok(w)) => Ok((g, w)),
        (a, b) => Err(format!(
            "{what}: read-back failed: {:?} / {:?}",
            a.err(),
            b.err()
        )),
    }
}

/// The norm-wise check max|got − want| ≤ tol · max(max|want|, floor); also checks the shapes.
///
/// The floor is the natural scale of the quantity (documented at each call site), used only
/// where the reference is (close to) 0 analytically — e.g. C = 1, where the loss is a difference
/// lse − z_y of O(s) terms that cancel exactly, so each side carries an absolute rounding error of
/// O(unit roundoff · s) that a floor of ~0 would turn into a spurious relative failure.
pub fn compare(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    tol: f64,
    floor: f64,
) -> std::result::Result<(), String> {
    let (g, w) = read_pair(what, got, want)?;
    compare_vec(what, &g, &w, tol, floor)
}

pub fn compare_vec(
    what: &str,
    g: &[f64],
    w: &[f64],
    tol: f64,
    floor: f64,
) -> std::result::Result<(), String> {
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = -1.0f64;
    let mut at = 0usize;
    for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
        // Any non-finite value (on either side) is a failure, even when both agree.
        let d = if a.is_finite() && b.is_finite() {
            (a - b).abs()
        } else {
            f64::INFINITY
        };
        if d > worst {
            worst = d;
            at = i;
        }
    }
    let worst = worst.max(0.0);
    let bound = tol * scale.max(floor);
    if worst <= bound {
        Ok(())
    } else {
        Err(format!(
            "{what}: max|got-ref| = {worst:.3e} at flat index {at} (got {:.10e}, ref {:.10e}); \
             max|ref| = {scale:.3e}, rel err = {:.3e}, bound = {bound:.3e} (tol {tol:.1e}, \
             floor {floor:.1e}), n = {}",
            g.get(at).copied().unwrap_or(f64::NAN),
            w.get(at).copied().unwrap_or(f64::NAN),
            worst / scale.max(floor),
            g.len()
        ))
    }
}

/// As [`compare`], but only over the entries where the reference is finite; `got` must still be
/// finite everywhere. Used for the reference's documented limitation: with focal 0 < γ < 1, a
/// row whose p_t rounds to exactly 1 gets a NaN gradient from `powf` (0^(γ−1) = ∞) in the
/// reference, while the fused op (which forms 1 − p_t as −expm1(log p_t)) stays finite.
pub fn compare_where_ref_finite(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    tol: f64,
    floor: f64,
) -> std::result::Result<(), String> {
    let (g, w) = read_pair(what, got, want)?;
    if let Some(k) = g.iter().position(|v| !v.is_finite()) {
        return Err(format!("{what}: fused value not finite at {k}: {}", g[k]));
    }
    let (g2, w2): (Vec<f64>, Vec<f64>) = g
        .iter()
        .zip(&w)
        .filter(|(_, b)| b.is_finite())
        .map(|(a, b)| (*a, *b))
        .unzip();
    compare_vec(what, &g2, &w2, tol, floor)
}

pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(vec_f64(t)?.iter().all(|v| v.is_finite()))
}

/// The tensor autograd is started from: the loss itself, or Σ_i ℓ_i for `Reduction::None`.
pub fn root(loss: &Tensor) -> Result<Tensor> {
    if loss.rank() == 0 {
        Ok(loss.clone())
    } else {
        loss.sum_all()
    }
}

/// d root / d var, zeros when autograd found no path (e.g. B = 0).
pub fn grad_of(grads: &candle_core::backprop::GradStore, var: &Var) -> Result<Tensor> {
    match grads.get(var.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => var.as_tensor().zeros_like(),
    }
}

/// The results of one side (fused or reference) through autograd.
pub struct Autograd {
    pub loss: Tensor,
    pub dx: Tensor,
    pub dr: Option<Tensor>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Fused,
    Reference,
}

/// Loss and gradients through candle autograd, for the fused op or the reference.
pub fn autograd(
    side: Side,
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
) -> Result<Autograd> {
    let xv = Var::from_tensor(input)?;
    let rv = match row_scale {
        Some(r) => Some(Var::from_tensor(r)?),
        None => None,
    };
    let loss = match (side, &rv) {
        (Side::Fused, None) => cfg.loss(xv.as_tensor(), targets)?,
        (Side::Fused, Some(r)) => {
            cfg.loss_with_row_scale(xv.as_tensor(), targets, r.as_tensor())?
        }
        (Side::Reference, None) => reference::loss(cfg, xv.as_tensor(), targets)?,
        (Side::Reference, Some(r)) => {
            reference::loss_with_row_scale(cfg, xv.as_tensor(), targets, r.as_tensor())?
        }
    };
    let grads = root(&loss)?.backward()?;
    let dx = grad_of(&grads, &xv)?;
    let dr = match &rv {
        Some(r) => Some(grad_of(&grads, r)?),
        None => None,
    };
    Ok(Autograd { loss, dx, dr })
}

/// Collects failures of a grid so one run reports all of them.
#[derive(Default)]
pub struct Failures(pub Vec<String>);

impl Failures {
    pub fn check(&mut self, label: &str, r: std::result::Result<(), String>) {
        if let Err(e) = r {
            self.0.push(format!("[{label}] {e}"));
        }
    }
    pub fn err(&mut self, label: &str, e: impl std::fmt::Display) {
        self.0.push(format!("[{label}] error: {e}"));
    }
    pub fn finish(self, what: &str) {
        if !self.0.is_empty() {
            let n = self.0.len();
            let shown: Vec<&String> = self.0.iter().take(60).collect();
            let mut msg = format!("{what}: {n} failure(s)\n");
            for s in shown {
                msg.push_str(s);
                msg.push('\n');
            }
            panic!("{msg}");
        }
    }
}

/// The cells of a test grid: every cell runs, and the test fails once at the end, listing every
/// failed cell.
#[derive(Default)]
pub struct GridFailures {
    cells: usize,
    failures: Vec<String>,
}

impl GridFailures {
    /// Runs one cell; an `Err` is its failure message (which names the cell).
    pub fn cell(&mut self, run: impl FnOnce() -> std::result::Result<(), String>) {
        self.cells += 1;
        if let Err(msg) = run() {
            self.failures.push(msg);
        }
    }

    /// Panics with every failed cell's message, if any failed.
    pub fn assert_none(self) {
        assert!(self.cells > 0, "the grid ran no cell");
        assert!(
            self.failures.is_empty(),
            "{} of {} cells failed:\n{}",
            self.failures.len(),
            self.cells,
            self.failures.join("\n")
        );
    }
}

/// A variable's gradient, which must be in the store.
pub fn required_grad(store: &candle_core::backprop::GradStore, var: &Var) -> Result<Tensor> {
    store
        .get(var)
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
}

/// A grid cell's verdict: `run` returns the cell's comparisons (or fails); the cell passes when
/// every comparison does, and its failure message names `label` and every failed comparison.
pub fn cell_verdict(
    label: &str,
    run: impl FnOnce() -> Result<Vec<std::result::Result<(), String>>>,
) -> std::result::Result<(), String> {
    match run() {
        Err(e) => Err(format!("[{label}] error: {e}")),
        Ok(checks) => {
            let failed: Vec<String> = checks.into_iter().filter_map(|c| c.err()).collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(format!("[{label}] {}", failed.join("; ")))
            }
        }
    }
}

/// The loss and the gradients into each (name, variable, the reference's variable) compared at
/// `tol` (the gradients relative to max(max|reference|, 1e-6)).
pub fn loss_and_grad_checks(
    (loss, want): (&Tensor, &Tensor),
    (grads, want_grads): (
        &candle_core::backprop::GradStore,
        &candle_core::backprop::GradStore,
    ),
    vars: &[(&str, &Var, &Var)],
    tol: f64,
) -> Result<Vec<std::result::Result<(), String>>> {
    let mut checks = vec![compare("loss", loss, want, tol, 1.0)];
    for &(name, got, reference) in vars {
        let (g, w) = (
            required_grad(grads, got)?,
            required_grad(want_grads, reference)?,
        );
        checks.push(compare(&format!("d/d {name}"), &g, &w, tol, 1e-6));
    }
    Ok(checks)
}

/// An error's first line (candle appends a backtrace when RUST_BACKTRACE is set).
pub fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
