//! The loss configuration: which head turns the input into logits, and which criterion options
//! turn the logits into a loss. Built once, validated on every call (the checks are a handful of
//! scalar comparisons), shared by the fused op and by [`crate::reference`].

use candle_core::{DType, Result, Tensor, bail};

/// The name the loss's errors start with (`MarginSoftmaxLoss`, the ops, the backends).
pub(crate) const OP_NAME: &str = "margin_softmax_ce";
/// The name that `MarginHead`'s errors start with.
pub(crate) const HEAD_OP: &str = "margin_head";

/// Largest SphereFace margin accepted. The paper and the official code use 1..=4; larger
/// integers are still well defined (Chebyshev polynomials), but past 16 the target logit
/// oscillates so fast in θ that it no longer trains.
pub const SPHEREFACE_MAX_M: u32 = 16;

/// Defines the floor of the ArcFace / Combined target derivative's denominator in
/// [`MarginGrad::Exact`] mode: d cos(m1·θ + m2) / d cos θ = m1·sin(m1·θ + m2) / sin θ is unbounded
/// as sin θ → 0, so it is evaluated as m1·sin(m1·θ + m2) / max(sin θ, sin θ_ε) with
/// cos θ_ε = 1 − 1e−5 (sin θ_ε ≈ 4.47e−3, opensphere's band). Only the derivative is bounded: the
/// forward value is the paper's formula in both gradient modes.
pub const EXACT_MARGIN_COS_EPS: f64 = 1e-5;

/// The head: how one row of the input becomes logits `z`. Every head multiplies by a scale
/// (`s`, or a per-row scale `r_i` given with the `*_with_row_scale` calls), so below `u` is the
/// unscaled logit and `z = s·u`.
///
/// | head | input x | u_j, j ≠ y | u_y | defaults |
/// |---|---|---|---|---|
/// | `Softmax` | logit | x | x | s = 1 |
/// | `CosFace` | cos θ | c | c − m | s = 64, m = 0.35 |
/// | `ArcFace` | cos θ | c | cos(θ + m) | s = 64, m = 0.5 |
/// | `Combined` | cos θ | c | cos(m1·θ + m2) − m3 | s = 64, (1, 0.3, 0.2) |
/// | `SphereFace` | cos θ | c | (λ·c + ψ(θ)) / (1 + λ) | s = 30, m = 4 |
/// | `Rbf` | d² | exp(−d²/γ) | exp(−d²/γ) | s = 35, γ = 16 |
///
/// c is the input clamped to [−1, 1]; d² is clamped to ≥ 0. Gradients through those clamps follow
/// PyTorch's `clamp`: they pass where the input is inside the closed interval and are 0 outside.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Head {
    /// Plain scaled softmax cross-entropy on logits: z = s·x.
    Softmax { s: f64 },
    /// CosFace / AM-Softmax (additive cosine margin): z_y = s·(c − m). Requires 0 ≤ m ≤ 1.
    CosFace { s: f64, m: f64 },
    /// ArcFace (additive angular margin): z_y = s·cos(θ + m), kept monotone in θ as
    /// InsightFace does: when c ≤ cos(π − m) the target becomes c − m·sin m. With
    /// `easy_margin`, the margin applies only where c > 0 (z_y = s·c elsewhere).
    /// Requires 0 ≤ m < π.
    ArcFace { s: f64, m: f64, easy_margin: bool },
    /// The combined margin of InsightFace: z_y = s·(cos(m1·θ + m2) − m3), with all three margins
    /// in effect at once, and the monotone fallback z_y = s·(c − m3 − m2·sin m2) where
    /// m1·θ + m2 > π. Requires 0 < m1 ≤ 8, 0 ≤ m2 < π, 0 ≤ m3 ≤ 1.
    Combined { s: f64, m1: f64, m2: f64, m3: f64 },
    /// SphereFace / A-Softmax with integer margin m (1 ≤ m ≤ [`SPHEREFACE_MAX_M`]) and the
    /// annealing weight λ ≥ 0 of the current iteration (see [`SphereFaceLambda`]):
    /// z_y = r·(λ·c + ψ(θ)) / (1 + λ), ψ(θ) = (−1)^k·cos(mθ) − 2k, k = ⌊mθ/π⌋.
    /// The scale r is `s`, or the feature norm ‖f_i‖ of the original A-Softmax when passed as the
    /// per-row scale.
    SphereFace { s: f64, m: f64, lambda: f64 },
    /// RBF-Softmax on squared distances: z_j = s·exp(−d²_j/γ), no margin. Requires γ > 0.
    Rbf { s: f64, gamma: f64 },
}

impl Head {
    /// Scaled softmax with s = 1: plain cross-entropy on logits.
    pub fn softmax() -> Self {
        Head::Softmax { s: 1.0 }
    }
    /// CosFace with the paper's defaults s = 64, m = 0.35.
    pub fn cosface() -> Self {
        Head::CosFace { s: 64.0, m: 0.35 }
    }
    /// ArcFace with the paper's defaults s = 64, m = 0.5, no easy margin.
    pub fn arcface() -> Self {
        Head::ArcFace {
            s: 64.0,
            m: 0.5,
            easy_margin: false,
        }
    }
    /// The combined margin with InsightFace's defaults s = 64, (m1, m2, m3) = (1, 0.3, 0.2).
    pub fn combined() -> Self {
        Head::Combined {
            s: 64.0,
            m1: 1.0,
            m2: 0.3,
            m3: 0.2,
        }
    }
    /// SphereFace with m = 4, a fixed scale s = 30 and the given λ (see [`SphereFaceLambda`]).
    pub fn sphereface(lambda: f64) -> Self {
        Head::SphereFace {
            s: 30.0,
            m: 4.0,
            lambda,
        }
    }
    /// RBF-Softmax with the paper's defaults s = 35, γ = 16.
    pub fn rbf() -> Self {
        Head::Rbf {
            s: 35.0,
            gamma: 16.0,
        }
    }

    /// The head's fixed scale s.
    pub fn scale(&self) -> f64 {
        match *self {
            Head::Softmax { s }
            | Head::CosFace { s, .. }
            | Head::ArcFace { s, .. }
            | Head::Combined { s, .. }
            | Head::SphereFace { s, .. }
            | Head::Rbf { s, .. } => s,
        }
    }

    /// A short lowercase name, used in error messages and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Head::Softmax { .. } => "softmax",
            Head::CosFace { .. } => "cosface",
            Head::ArcFace { .. } => "arcface",
            Head::Combined { .. } => "combined",
            Head::SphereFace { .. } => "sphereface",
            Head::Rbf { .. } => "rbf",
        }
    }

    /// True for the heads whose input is a cosine (clamped to [−1, 1]).
    pub fn takes_cosine(&self) -> bool {
        !matches!(self, Head::Softmax { .. } | Head::Rbf { .. })
    }

    fn validate(&self) -> Result<()> {
        let name = self.name();
        let s = self.scale();
        if !(s.is_finite() && s > 0.0) {
            bail!("{OP_NAME}({name}): scale s must be finite and > 0, got {s}")
        }
        let in_range = |what: &str, v: f64, lo: f64, hi: f64, hi_open: bool| -> Result<()> {
            let ok = v.is_finite() && v >= lo && if hi_open { v < hi } else { v <= hi };
            if !ok {
                let close = if hi_open { ")" } else { "]" };
                bail!("{OP_NAME}({name}): {what} must be in [{lo}, {hi}{close}, got {v}")
            }
            Ok(())
        };
        match *self {
            Head::Softmax { .. } => {}
            Head::CosFace { m, .. } => in_range("margin m", m, 0.0, 1.0, false)?,
            Head::ArcFace { m, .. } => in_range("margin m", m, 0.0, std::f64::consts::PI, true)?,
            Head::Combined { m1, m2, m3, .. } => {
                if !(m1.is_finite() && m1 > 0.0 && m1 <= 8.0) {
                    bail!("{OP_NAME}({name}): margin m1 must be in (0, 8], got {m1}")
                }
                in_range("margin m2", m2, 0.0, std::f64::consts::PI, true)?;
                in_range("margin m3", m3, 0.0, 1.0, false)?;
            }
            Head::SphereFace { m, lambda, .. } => {
                if !(m.is_finite() && m.fract() == 0.0 && m >= 1.0) {
                    bail!("{OP_NAME}({name}): margin m must be a positive integer, got {m}")
                }
                if m > SPHEREFACE_MAX_M as f64 {
                    bail!("{OP_NAME}({name}): margin m must be at most {SPHEREFACE_MAX_M}, got {m}")
                }
                if !(lambda.is_finite() && lambda >= 0.0) {
                    bail!("{OP_NAME}({name}): lambda must be finite and >= 0, got {lambda}")
                }
            }
            Head::Rbf { gamma, .. } => {
                if !(gamma.is_finite() && gamma > 0.0) {
                    bail!("{OP_NAME}({name}): gamma must be finite and > 0, got {gamma}")
                }
            }
        }
        Ok(())
    }
}

/// The official SphereFace λ schedule: λ(it) = max(λ_min, base·(1 + γ·it)^(−power)).
/// λ starts large (the loss is nearly plain softmax) and anneals towards λ_min; pass the current
/// value in [`Head::SphereFace`] at each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SphereFaceLambda {
    pub base: f64,
    pub gamma: f64,
    pub power: f64,
    pub lambda_min: f64,
}

impl Default for SphereFaceLambda {
    /// The official Caffe defaults: base = 1000, γ = 0.12, power = 1, λ_min = 5.
    fn default() -> Self {
        Self {
            base: 1000.0,
            gamma: 0.12,
            power: 1.0,
            lambda_min: 5.0,
        }
    }
}

impl SphereFaceLambda {
    /// λ at training iteration `iteration` (0-based).
    pub fn at(&self, iteration: u64) -> f64 {
        let decayed = self.base * (1.0 + self.gamma * iteration as f64).powf(-self.power);
        decayed.max(self.lambda_min)
    }
}

/// How the per-row losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Per-row losses, shape \[B\]; ignored rows hold 0.
    None,
    /// Σ_i ℓ_i, a scalar.
    Sum,
    /// Σ_i ℓ_i / Σ_i w_{y_i} over the rows that are not ignored (PyTorch's semantics; w = 1
    /// without class weights). An empty or all-ignored batch gives 0, not NaN.
    #[default]
    Mean,
}

/// How the margin of the target logit is differentiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MarginGrad {
    /// The true derivative of the forward function: φ'(c) = sin(θ + m)/sin θ for ArcFace,
    /// m1·sin(m1·θ + m2)/sin θ for Combined, (λ + (−1)^k·m·U_{m−1}(c))/(1 + λ) for SphereFace,
    /// 1 for CosFace and in the monotone fallback region. For ArcFace and Combined the
    /// denominator is evaluated as max(sin θ, sin θ_ε) (see [`EXACT_MARGIN_COS_EPS`]), which
    /// bounds the derivative near c = ±1; the forward value is not changed: it is the paper's
    /// formula, bit for bit the same as in [`MarginGrad::Detached`] mode.
    #[default]
    Exact,
    /// The margin is a constant shift in the backward pass (φ'(c) = 1), as in InsightFace's
    /// arcface_torch since 2022 and opensphere; the forward value is the same as in `Exact`.
    Detached,
}

/// The float dtypes the crate computes with: f16, bf16, f32 and f64 (not the 8-, 6- and 4-bit
/// storage formats, which candle cannot convert on every path).
pub(crate) fn is_arithmetic_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Per-class weights w (shape \[C\]), checked once when they are set: every entry finite and ≥ 0.
///
/// Made by [[`ClassWeights::new`]] (or [`MarginSoftmaxLoss::class_weights`]), which reads the
/// tensor to the host once (on a GPU, one synchronization when the weights are set, none per
/// step) and keeps a snapshot: a later in-place change of the tensor (e.g. `Var::set`) is not
/// seen; set the weights again instead. The weights are constants of the loss: a `Var` passed
/// here gets no gradient.
#[derive(Clone, Debug)]
pub struct ClassWeights {
    /// The snapshot, in the dtype it was given in, on the device it was given on.
    tensor: Tensor,
    /// The same values on the host, widened to f64.
    host: std::sync::Arc<[f64]>,
    /// Σ_j w_j, the largest entry and the smallest non-zero one (∞ if none), in f64.
    total: f64,
    max: f64,
    min_positive: f64,
}

impl ClassWeights {
    /// Checks and snapshots `weights`: rank 1, f16 / bf16 / f32 / f64, every entry finite and ≥ 0.
    ///
    /// # Errors
    /// An `Err` naming the op for a tensor that is not rank 1 or not f16 / bf16 / f32 / f64 (the
    /// 8-, 6- and 4-bit float formats included), and for the
    /// first entry that is negative, NaN or infinite (its index and value).
    pub fn new(weights: &Tensor) -> Result<Self> {
        if weights.rank() != 1 {
            bail!(
                "{OP_NAME}: class_weights must have rank 1 [C], got shape {:?}",
                weights.dims()
            )
        }
        if !is_arithmetic_float(weights.dtype()) {
            bail!(
                "{OP_NAME}: class_weights must be an f16, bf16, f32 or f64 tensor, got {:?}",
                weights.dtype()
            )
        }
        let host: Vec<f64> = weights.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some((j, w)) = host
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
        {
            bail!(
                "{OP_NAME}: class_weights must be finite and >= 0, got {w} at class {j} (the \
                 first bad entry)"
            )
        }
        let total = host.iter().sum();
        let max = host.iter().fold(0.0f64, |m, &v| m.max(v));
        let min_positive = host
            .iter()
            .filter(|&&v| v > 0.0)
            .fold(f64::INFINITY, |m, &v| m.min(v));
        Ok(Self {
            tensor: weights.detach().copy()?,
            host: host.into(),
            total,
            max,
            min_positive,
        })
    }

    /// The weights as given (a copy taken when they were set), on their device.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The number of classes C.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// True for C = 0.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The weights on the host, widened to f64.
    pub fn values(&self) -> &[f64] {
        &self.host
    }

    /// Σ_j w_j.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// The same weights on another device (no new check: the values are the same).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            tensor: self.tensor.to_device(device)?,
            host: self.host.clone(),
            ..*self
        })
    }
}

/// A margin / kernel softmax cross-entropy loss: a [`Head`] plus the criterion options.
///
/// Build it once with [`MarginSoftmaxLoss::new`] and the chained setters; every call validates
/// it and returns an `Err` naming the op and the bad value (the checks are listed on each
/// setter). The fields are public for struct-update syntax.
///
/// The criterion on the logits z (after the head and the optional soft-capping
/// z ← cap·tanh(z/cap)), for one row with target y (p = softmax(z), lse = log Σ e^z), with
/// class weights w (all 1 without them) and label smoothing ε:
/// - cross-entropy, PyTorch's `F.cross_entropy(weight=w, label_smoothing=ε)`:
///   ℓ_CE = (1 − ε)·w_y·(lse − z_y) + (ε/C)·Σ_j w_j·(lse − z_j);
/// - focal: ℓ = (1 − p_t)^γ·ℓ_CE with p_t = (1 − ε)·p_y + ε/C;
/// - PolyLoss: ℓ += w_y·Σ_k ε_k·(1 − p_t)^(k + γ);
/// - z-loss: ℓ += w_y·λ_z·lse²;
/// - rows whose target is `ignore_index` give 0 loss and gradient.
#[derive(Clone, Debug)]
pub struct MarginSoftmaxLoss {
    pub head: Head,
    /// ε ∈ [0, 1). Default 0.
    pub label_smoothing: f64,
    /// γ ≥ 0. Default 0 (no focal term).
    pub focal_gamma: f64,
    /// PolyLoss coefficients ε_1..ε_N, each ≥ −1/k. Empty by default; `vec![1.0]` is Poly-1.
    pub poly: Vec<f64>,
    /// λ_z ≥ 0. Default 0.
    pub z_loss: f64,
    /// Per-class weights (see [`ClassWeights`]), on the input's device. Default none.
    pub class_weights: Option<ClassWeights>,
    /// Target value that marks a row as ignored, compared as i64. Default `Some(-100)`, as in
    /// PyTorch. −100 can never match a u32 or u8 target: with those, use a value of their
    /// range, e.g. `Some(u32::MAX as i64)` or `Some(255)`.
    pub ignore_index: Option<i64>,
    pub reduction: Reduction,
    pub margin_grad: MarginGrad,
    /// Logit soft-capping (Gemma-2 style): z ← cap·tanh(z/cap) on every logit, after the head
    /// and before the criterion. `None` (the default): no capping.
    pub logit_softcap: Option<f64>,
    /// Whether a CUDA forward checks the targets (default `true`); see
    /// [`MarginSoftmaxLoss::check_targets`].
    pub check_targets: bool,
}

impl MarginSoftmaxLoss {
    /// The loss with the given head and PyTorch's criterion defaults: no smoothing, no focal,
    /// Poly or z-loss term, no class weights, `ignore_index = -100`, mean reduction, exact
    /// margin gradients and no soft-capping.
    pub fn new(head: Head) -> Self {
        Self {
            head,
            label_smoothing: 0.0,
            focal_gamma: 0.0,
            poly: Vec::new(),
            z_loss: 0.0,
            class_weights: None,
            ignore_index: Some(-100),
            reduction: Reduction::Mean,
            margin_grad: MarginGrad::Exact,
            logit_softcap: None,
            check_targets: true,
        }
    }
    /// Label smoothing ε; must be in [0, 1). With class weights it follows PyTorch: the
    /// smoothing term weights each class by its own weight (see [`MarginSoftmaxLoss`]).
    pub fn label_smoothing(mut self, epsilon: f64) -> Self {
        self.label_smoothing = epsilon;
        self
    }
    /// Focal γ; must be finite and ≥ 0.
    pub fn focal_gamma(mut self, gamma: f64) -> Self {
        self.focal_gamma = gamma;
        self
    }
    /// PolyLoss coefficients ε_1..ε_N; ε_k must be finite and ≥ −1/k. `&[1.0]` is Poly-1.
    pub fn poly(mut self, coefficients: &[f64]) -> Self {
        self.poly = coefficients.to_vec();
        self
    }
    /// z-loss weight λ_z; must be finite and ≥ 0.
    pub fn z_loss(mut self, lambda: f64) -> Self {
        self.z_loss = lambda;
        self
    }
    /// Per-class weights, shape \[C\] (checked against the input at each call), float dtype,
    /// every entry finite and ≥ 0: checked here, once (see [[`ClassWeights::new`]]). They are
    /// constants of the loss: a `Var` gets no gradient.
    ///
    /// # Errors
    /// As [[`ClassWeights::new`]].
    pub fn class_weights(mut self, weights: Tensor) -> Result<Self> {
        self.class_weights = Some(ClassWeights::new(&weights)?);
        Ok(self)
    }
    /// The target value that marks a row as ignored (`None`: no row is ignored). The default
    /// −100 never matches a u32 or u8 target; use e.g. `Some(u32::MAX as i64)` with those.
    pub fn ignore_index(mut self, index: Option<i64>) -> Self {
        self.ignore_index = index;
        self
    }
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }
    pub fn margin_grad(mut self, mode: MarginGrad) -> Self {
        self.margin_grad = mode;
        self
    }
    /// Logit soft-capping z ← cap·tanh(z/cap) (Gemma-2); `cap` must be finite and > 0.
    pub fn logit_softcap(mut self, cap: f64) -> Self {
        self.logit_softcap = Some(cap);
        self
    }
    /// Whether the forward on a CUDA device checks the targets (default `true`).
    ///
    /// The targets are converted and checked on the GPU either way; with the check, the
    /// forward then reads one value back (the first invalid row, if any) to return the same
    /// `Err` as the CPU path — one host synchronization per forward, none in the backward.
    /// `false` skips that read, so that the CPU can run ahead and a training step can be
    /// captured in a CUDA graph: a target outside [0, C) that is not `ignore_index` then gives
    /// that row a NaN loss and a NaN gradient row (and NaN for a mean over it) instead of an
    /// `Err`, never an out-of-bounds read. The CPU path always checks.
    pub fn check_targets(mut self, check: bool) -> Self {
        self.check_targets = check;
        self
    }

    /// Checks every hyper-parameter; the `Err` names the op, the head and the bad value.
    pub fn validate(&self) -> Result<()> {
        self.head.validate()?;
        let name = self.head.name();
        let eps = self.label_smoothing;
        if !(eps.is_finite() && (0.0..1.0).contains(&eps)) {
            bail!("{OP_NAME}({name}): label_smoothing must be in [0, 1), got {eps}")
        }
        let gamma = self.focal_gamma;
        if !(gamma.is_finite() && gamma >= 0.0) {
            bail!("{OP_NAME}({name}): focal_gamma must be finite and >= 0, got {gamma}")
        }
        for (i, &coef) in self.poly.iter().enumerate() {
            let k = (i + 1) as f64;
            if !(coef.is_finite() && coef >= -1.0 / k) {
                bail!(
                    "{OP_NAME}({name}): poly coefficient eps_{} must be finite and >= -1/{} \
                     (else the loss is not monotone in p_t), got {coef}",
                    i + 1,
                    i + 1
                )
            }
        }
        let z = self.z_loss;
        if !(z.is_finite() && z >= 0.0) {
            bail!("{OP_NAME}({name}): z_loss must be finite and >= 0, got {z}")
        }
        if let Some(cap) = self.logit_softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            bail!("{OP_NAME}({name}): logit_softcap must be finite and > 0, got {cap}")
        }
        Ok(())
    }

    /// [`Self::validate`], then every hyper-parameter (and the quantities the kernels derive
    /// from them, such as −1/γ) checked against the accumulation dtype `acc` (f32 or f64) of a
    /// call: each must round to a finite value and, unless it is 0, to a normal one (s = 1e39
    /// overflows f32, s = 1e−45 is a subnormal f32 that flushes to 0 on a GPU).
    pub(crate) fn validate_for(&self, acc: DType) -> Result<()> {
        self.validate()?;
        let name = self.head.name();
        let check = |what: &str, v: f64| -> Result<()> {
            let ok = match acc {
                DType::F64 => v.is_finite() && (v == 0.0 || v.abs() >= f64::MIN_POSITIVE),
                _ => {
                    let r = v as f32;
                    v.is_finite() && r.is_finite() && (v == 0.0 || r.abs() >= f32::MIN_POSITIVE)
                }
            };
            if !ok {
                let (lo, hi) = match acc {
                    DType::F64 => (f64::MIN_POSITIVE, f64::MAX),
                    _ => (f32::MIN_POSITIVE as f64, f32::MAX as f64),
                };
                bail!(
                    "{OP_NAME}({name}): {what} = {v:e} is not representable in the {acc:?} \
                     accumulation of this input (0, or {lo:e} <= |v| <= {hi:e})"
                )
            }
            Ok(())
        };
        check("scale s", self.head.scale())?;
        match self.head {
            Head::Softmax { .. } => {}
            Head::CosFace { m, .. } => check("margin m", m)?,
            Head::ArcFace { m, .. } => check("margin m", m)?,
            Head::Combined { m1, m2, m3, .. } => {
                check("margin m1", m1)?;
                check("margin m2", m2)?;
                check("margin m3", m3)?;
            }
            Head::SphereFace { lambda, .. } => {
                check("lambda", lambda)?;
                check("1 + lambda", 1.0 + lambda)?;
            }
            Head::Rbf { gamma, .. } => {
                check("gamma", gamma)?;
                check("1/gamma", 1.0 / gamma)?;
            }
        }
        check("label_smoothing", self.label_smoothing)?;
        check("focal_gamma", self.focal_gamma)?;
        for (i, &coef) in self.poly.iter().enumerate() {
            check(&format!("poly coefficient eps_{}", i + 1), coef)?;
        }
        check("z_loss", self.z_loss)?;
        if let Some(cap) = self.logit_softcap {
            check("logit_softcap", cap)?;
            check("1/logit_softcap", 1.0 / cap)?;
        }
        if let Some(w) = &self.class_weights {
            // Each weight and their sum (the smoothing term's W): entries are ≥ 0, so the
            // largest and the smallest non-zero one bound them all (both kept from the check
            // at set time: nothing of size C is scanned per call).
            check("the largest class weight", w.max)?;
            if w.min_positive.is_finite() {
                check("the smallest non-zero class weight", w.min_positive)?;
            }
            check("the sum of the class weights", w.total())?;
        }
        Ok(())
    }
}

/// The dtype the loss (and all accumulation) uses for a given input dtype.
pub(crate) fn accumulation_dtype(input: DType) -> DType {
    if input == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
