//! The one Rust definition of each head's math and of the criterion, generic over the
//! accumulation type (f32 for f32 / f16 / bf16 input, f64 for f64 input).
//!
//! A row's logits are z_j = r·u_j: u is the head's unscaled logit, r the row's scale (the head's
//! s, or a per-row scale). The criterion's gradient with respect to the logits has the form
//!
//!   g_j = A·p_j + K·w_j   (j ≠ y),      g_y = G,
//!
//! with three per-row constants A, K, G (see [`Criterion::row`]; w_j is the class weight where
//! the smoothing term reads it, else 1), so the backward pass needs only those and the row's
//! lse: p_j = exp(z_j − lse) is recomputed from the input.

use candle_core::WithDType;
use half::{bf16, f16};
use num_traits::Float;

use crate::config::MarginSoftmaxLoss;
#[cfg(test)]
use crate::config::SPHEREFACE_MAX_M;

/// An accumulation type: every sum, exp and per-row constant is computed in it.
pub(crate) trait Acc:
    Float
    + WithDType
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// Below this argument exp() is subnormal (or 0) in this type.
    const EXP_SUBNORMAL_BELOW: Self;
    fn of(v: f64) -> Self;

    /// Calls `f` with a scratch slice of `len` values (contents unspecified), reused across
    /// calls on this thread so that the CPU rows do not allocate (nor page-fault) per row.
    /// Slices over [`SCRATCH_KEEP_MAX`] values are allocated for the call and freed after it.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// exp(d) for d ≤ 0 in a sum or a probability whose other terms are ≥ 1 or whose result is
    /// rounded: flushes subnormal results to 0, which changes nothing there but avoids the
    /// CPU's slow subnormal arithmetic (scaled logits reach e^(−2s), far below e^(−87)).
    #[inline(always)]
    fn exp_flushed(d: Self) -> Self {
        if d < Self::EXP_SUBNORMAL_BELOW {
            Self::zero()
        } else {
            d.exp()
        }
    }
}

/// c·v, except that an exactly zero coefficient (or probability weight) contributes 0 even when
/// v is infinite: a masked logit (u = −∞) has p = 0, and 0·(−∞) = NaN is not its share. A NaN
/// coefficient still gives NaN. Mirrors `times_nonzero` in kernels/common.cuh.
#[inline(always)]
pub(crate) fn times_nonzero<A: Acc>(c: A, v: A) -> A {
    if c == A::zero() { A::zero() } else { c * v }
}

/// The largest scratch (in values) a thread keeps between calls: 2²² (16 MiB of f32 per
/// thread); the fused CPU path needs about 2·C per row.
pub(crate) const SCRATCH_KEEP_MAX: usize = 1 << 22;

macro_rules! thread_scratch {
    ($t:ty, $name:ident, $with:ident) => {
        thread_local! {
            static $name: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        fn $with<R>(len: usize, f: impl FnOnce(&mut [$t]) -> R) -> R {
            if len > SCRATCH_KEEP_MAX {
                return f(&mut vec![0.0; len]);
            }
            $name.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => {
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    f(&mut buf[..len])
                }
                // Re-entered on this thread (not done by the crate): a fresh buffer.
                Err(_) => f(&mut vec![0.0; len]),
            })
        }
    };
}

thread_scratch!(f32, SCRATCH_F32, with_scratch_f32);
thread_scratch!(f64, SCRATCH_F64, with_scratch_f64);

impl Acc for f32 {
    const EXP_SUBNORMAL_BELOW: f32 = -87.0;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        with_scratch_f32(len, f)
    }

    /// A branch-free exp that LLVM can inline and vectorize (libm's `expf` is an opaque call):
    /// Cody–Waite range reduction d = n·ln 2 + r, |r| ≤ ln2/2, then the degree-7 Cephes
    /// polynomial for e^r (relative error ≈ 1e−7, within 2 ulp of `f32::exp`), and 2^n
    /// written into the exponent bits.
    #[inline(always)]
    fn exp_flushed(d: f32) -> f32 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_5e-4;
        // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
        const ROUND: f32 = 12_582_912.0;
        let below = d < Self::EXP_SUBNORMAL_BELOW;
        let x = if below { 0.0 } else { d };
        let shifted = x * LOG2_E + (ROUND + 127.0);
        let n = shifted - (ROUND + 127.0);
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let e_r = p * r * r + r + 1.0;
        // The low mantissa bits of `shifted` hold n + 127, the biased exponent of 2^n.
        let two_n = f32::from_bits(shifted.to_bits() << 23);
        if below { 0.0 } else { e_r * two_n }
    }
}

impl Acc for f64 {
    const EXP_SUBNORMAL_BELOW: f64 = -708.0;
    fn of(v: f64) -> Self {
        v
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
        with_scratch_f64(len, f)
    }
}

/// An input element type and the accumulation type it is computed in.
pub(crate) trait Element: WithDType + Copy + Send + Sync + 'static {
    type Acc: Acc;
    fn load(self) -> Self::Acc;
    fn store(v: Self::Acc) -> Self;
    /// `n` zeros from zeroed memory (`calloc`: the pages stay untouched until written).
    fn zeroed_vec(n: usize) -> Vec<Self>;
    /// `dst[i] = src[i].load()`, for equal lengths: the row kernels convert a chunk at a time so
    /// that the conversion vectorizes (the `half` crate's slice conversions use F16C for f16).
    #[inline(always)]
    fn load_slice(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.load();
        }
    }
    /// `dst[..src.len()]` from `src` (at most N entries): a full chunk in a loop of known length,
    /// which compiles to vector moves rather than a `memcpy` call per chunk.
    #[inline(always)]
    fn load_chunk<const N: usize>(src: &[Self], dst: &mut [Self::Acc; N]) {
        match <&[Self; N]>::try_from(src) {
            Ok(full) => {
                for i in 0..N {
                    dst[i] = full[i].load();
                }
            }
            Err(_) => Self::load_slice(src, &mut dst[..src.len()]),
        }
    }
    /// `dst` from `src[..dst.len()]` (at most N entries), as [`Element::load_chunk`].
    #[inline(always)]
    fn store_chunk<const N: usize>(src: &[Self::Acc; N], dst: &mut [Self]) {
        match <&mut [Self; N]>::try_from(&mut *dst) {
            Ok(full) => {
                for i in 0..N {
                    full[i] = Self::store(src[i]);
                }
            }
            Err(_) => {
                let n = dst.len();
                Self::store_slice(&src[..n], dst)
            }
        }
    }
    /// `dst[i] = Self::store(src[i])`, for equal lengths.
    #[inline(always)]
    fn store_slice(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::store(s);
        }
    }
}

impl Element for f32 {
    type Acc = f32;
    fn zeroed_vec(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
}

impl Element for f64 {
    type Acc = f64;
    fn zeroed_vec(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(v: f64) -> Self {
        v
    }
}

impl Element for f16 {
    type Acc = f32;
    fn zeroed_vec(n: usize) -> Vec<Self> {
        bytemuck::allocation::cast_vec(vec![0u16; n])
    }
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn load_chunk<const N: usize>(src: &[Self], dst: &mut [f32; N]) {
        Self::load_slice(src, &mut dst[..src.len()])
    }
    #[inline(always)]
    fn store_chunk<const N: usize>(src: &[f32; N], dst: &mut [Self]) {
        let n = dst.len();
        Self::store_slice(&src[..n], dst)
    }
}

impl Element for bf16 {
    type Acc = f32;
    fn zeroed_vec(n: usize) -> Vec<Self> {
        bytemuck::allocation::cast_vec(vec![0u16; n])
    }
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// PyTorch's clamp: NaN passes through, and so does the gradient on the closed interval.
#[inline(always)]
fn clamp<A: Acc>(x: A, lo: A, hi: A) -> A {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

#[inline(always)]
fn inside<A: Acc>(x: A, lo: A, hi: A) -> A {
    if x >= lo && x <= hi {
        A::one()
    } else {
        A::zero()
    }
}

/// The per-element transform x → u of the non-target entries; monomorphized per head family so
/// the row loops carry no branch on the head.
pub(crate) trait Transform<A: Acc>: Copy + Send + Sync {
    /// Whether the fused CPU path keeps u_j from the forward pass for the gradient, rather than
    /// recomputing it: where u costs an exp (RBF).
    const CACHES_U: bool = false;
    fn u(&self, x: A) -> A;
    /// du/dx, given x and u = self.u(x).
    fn du(&self, x: A, u: A) -> A;
}

/// Softmax: u = x.
#[derive(Clone, Copy)]
pub(crate) struct Identity;

impl<A: Acc> Transform<A> for Identity {
    #[inline(always)]
    fn u(&self, x: A) -> A {
        x
    }
    #[inline(always)]
    fn du(&self, _x: A, _u: A) -> A {
        A::one()
    }
}

/// Cosine heads: u = clamp(c, −1, 1).
#[derive(Clone, Copy)]
pub(crate) struct Cosine;

impl<A: Acc> Transform<A> for Cosine {
    #[inline(always)]
    fn u(&self, x: A) -> A {
        clamp(x, -A::one(), A::one())
    }
    #[inline(always)]
    fn du(&self, x: A, _u: A) -> A {
        inside(x, -A::one(), A::one())
    }
}

/// RBF: u = exp(−max(d², 0)/γ), du/dd² = −u/γ (0 where d² < 0).
#[derive(Clone, Copy)]
pub(crate) struct RbfKernel<A> {
    pub neg_inv_gamma: A,
}

impl<A: Acc> Transform<A> for RbfKernel<A> {
    const CACHES_U: bool = true;
    #[inline(always)]
    fn u(&self, x: A) -> A {
        let d2 = if x < A::zero() { A::zero() } else { x };
        A::exp_flushed(d2 * self.neg_inv_gamma)
    }
    #[inline(always)]
    fn du(&self, x: A, u: A) -> A {
        // The product first, then a select: a branch would keep the row loops scalar.
        let d = u * self.neg_inv_gamma;
        if x >= A::zero() { d } else { A::zero() }
    }
}

/// Logit soft-capping z = cap·tanh(z_raw/cap) (Gemma-2) and its derivative sech²(z_raw/cap),
/// both from one expm1: with a = z_raw/cap and e = expm1(−2|a|) ∈ [−1, 0],
/// tanh|a| = −e/(2 + e) and sech² a = 4·(1 + e)/(2 + e)². Accurate near a = 0 (no 1 − e² cancels)
/// and finite for every a: a = ±∞ gives (±cap, 0), a masked logit's limit. Mirrors `softcap` in
/// kernels/heads.cuh.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SoftCap<A> {
    cap: A,
    inv_cap: A,
}

impl<A: Acc> SoftCap<A> {
    pub fn new(cfg: &MarginSoftmaxLoss) -> Option<Self> {
        cfg.logit_softcap.map(|cap| Self {
            cap: A::of(cap),
            inv_cap: A::of(1.0 / cap),
        })
    }

    /// (z, dz/dz_raw).
    #[inline(always)]
    pub fn apply(&self, z_raw: A) -> (A, A) {
        let a = z_raw * self.inv_cap;
        let two = A::one() + A::one();
        let e = (-(a.abs() * two)).exp_m1();
        let two_plus_e = two + e;
        let t = -e / two_plus_e;
        let t = if a < A::zero() { -t } else { t };
        let d = (two + two) * (A::one() + e) / (two_plus_e * two_plus_e);
        (self.cap * t, d)
    }
}

/// The criterion's constants, in the accumulation type.
#[derive(Clone, Debug)]
pub(crate) struct Criterion<A> {
    smoothing: A,
    focal_gamma: A,
    poly: Vec<A>,
    z_loss: A,
    classes: A,
    /// W = Σ_j w_j for the smoothing term: the class weights' sum, or C without them.
    total_weight: A,
}

/// What the forward pass learns about one (non-ignored) row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLoss<A> {
    /// ℓ, class weights included.
    pub loss: A,
    /// g_j = a·p_j + k·w_j for j ≠ y (w_j = 1 without class weights; k = 0 without smoothing).
    pub a: A,
    pub k: A,
    /// g_y, formed from 1 − p_y so that it does not cancel when p_y → 1.
    pub g_target: A,
}

/// Whether the smoothing term reads the class weights per class: only with both class weights
/// and label smoothing (without smoothing only w_y enters, a per-row constant).
pub(crate) fn weighted_smoothing(cfg: &MarginSoftmaxLoss) -> bool {
    cfg.class_weights.is_some() && cfg.label_smoothing > 0.0
}

/// W = Σ_j w_j of the smoothing term: the class weights' sum with [`weighted_smoothing`], else C
/// (every w_j = 1). Shared by [`Criterion::new`] and the kernels' `MsParams::new`.
pub(crate) fn smoothing_total_weight(cfg: &MarginSoftmaxLoss, classes: usize) -> f64 {
    match &cfg.class_weights {
        Some(w) if weighted_smoothing(cfg) => w.total(),
        _ => classes as f64,
    }
}

impl<A: Acc> Criterion<A> {
    pub fn new(cfg: &MarginSoftmaxLoss, classes: usize) -> Self {
        let total_weight = smoothing_total_weight(cfg, classes);
        Self {
            smoothing: A::of(cfg.label_smoothing),
            focal_gamma: A::of(cfg.focal_gamma),
            poly: cfg.poly.iter().map(|&e| A::of(e)).collect(),
            z_loss: A::of(cfg.z_loss),
            classes: A::of(classes as f64),
            total_weight: A::of(total_weight),
        }
    }

    /// The row's loss and gradient constants from its logits' max M and ln Σ_j exp(z_j − M)
    /// (lse = M + ln Σ, kept apart so that log p_y = (z_y − M) − ln Σ does not inherit the
    /// rounding of a large lse), the target logit z_y, S = Σ_j w_j·z_j (every class, the target
    /// included; w_j = 1 without class weights, and only read with smoothing) and w = w_y.
    ///
    /// With ε = smoothing, W = Σ_j w_j (C without weights), p_t = (1 − ε)·p_y + ε/C (PyTorch's
    /// `cross_entropy(weight, label_smoothing)` for ℓ_CE; the focal factor multiplies it, the Poly
    /// and z-loss terms take w_y):
    ///   ℓ_CE = (1 − ε)·w·(lse − z_y) + (ε/C)·Σ_j w_j·(lse − z_j) = (1 − ε)·w·(−log p_y) + (ε/C)·(W·lse − S)
    ///   F = (1 − p_t)^γ,   ℓ = F·ℓ_CE + w·[Σ_k ε_k·(1 − p_t)^(k + γ) + λ_z·lse²]
    /// With D = dℓ/dp_t = −γ·(1 − p_t)^(γ − 1)·ℓ_CE − w·Σ_k ε_k·(k + γ)·(1 − p_t)^(k + γ − 1),
    /// ∂p_t/∂z_j = (1 − ε)·p_y·([j = y] − p_j) and ∂ℓ_CE/∂z_j = (1 − ε)·w·(p_j − [j = y]) + (ε/C)·(W·p_j − w_j):
    ///   g_j = A·p_j + K·w_j (j ≠ y),
    ///   A = F·((1 − ε)·w + ε·W/C) − D·(1 − ε)·p_y + 2·w·λ_z·lse,   K = −F·ε/C,
    ///   G = F·[(ε/C)·((W − w)·p_y − w·(1 − p_y)) − (1 − ε)·w·(1 − p_y)] + D·(1 − ε)·p_y·(1 − p_y)
    ///       + 2·w·λ_z·lse·p_y.
    /// 1 − p_y = −expm1(log p_y), and (1 − p_t)^(γ − 1)·ℓ_CE is formed as
    /// (1 − p_t)^γ·(ℓ_CE/(1 − p_t)), whose last factor → w as p_t → 1 without smoothing: finite
    /// for every γ ≥ 0. D·p_y is 0 where p_y = 0 (a −∞ target logit: ℓ = +∞, D = −∞, but the
    /// gradient's limit is finite, p − onehot as PyTorch gives).
    pub fn row(&self, max: A, log_sum: A, z_target: A, sum_wz: A, weight: A) -> RowLoss<A> {
        let one = A::one();
        let zero = A::zero();
        let eps = self.smoothing;
        let classes = self.classes;
        let total = self.total_weight;
        let lse = max + log_sum;
        let log_py = match (z_target - max) - log_sum {
            // Rounding can make it positive; NaN (from NaN input) must pass through, which
            // `min` would not let it do.
            d if d > zero => zero,
            d => d,
        };
        let p_y = log_py.exp();
        let one_minus_py = -log_py.exp_m1();
        let keep = one - eps;
        let (ce, one_minus_pt) = if eps > zero {
            // Σ_j w_j·(lse − z_j) = (W·M − S) + W·ln Σ.
            let smooth = (total * max - sum_wz) + total * log_sum;
            let ce = keep * weight * -log_py + eps / classes * smooth;
            let spread = eps * (classes - one) / classes;
            (ce, keep * one_minus_py + spread)
        } else {
            (weight * -log_py, one_minus_py)
        };
        let gamma = self.focal_gamma;
        let focal = if gamma > zero {
            one_minus_pt.powf(gamma)
        } else {
            one
        };
        // ℓ_CE/(1 − p_t): → w as p_t → 1 without smoothing; with smoothing 1 − p_t ≥ ε(C−1)/C,
        // and 1 − p_t = 0 only for C = 1, where ℓ_CE ≡ 0.
        let ce_ratio = if one_minus_pt > zero {
            ce / one_minus_pt
        } else {
            weight
        };
        let mut loss = focal * ce;
        // Without focusing (γ = 0) this term is 0, also where ℓ_CE = +∞ (smoothing with a
        // masked logit): 0·∞ would make every gradient NaN.
        let mut d_pt = if gamma > zero {
            -gamma * focal * ce_ratio
        } else {
            zero
        };
        let mut poly = zero;
        for (i, &coef) in self.poly.iter().enumerate() {
            let power = A::of((i + 1) as f64) + gamma;
            poly += coef * one_minus_pt.powf(power);
            d_pt -= weight * coef * power * one_minus_pt.powf(power - one);
        }
        loss += weight * (poly + self.z_loss * lse * lse);
        let z_term = (self.z_loss + self.z_loss) * weight * lse;
        // D·(1 − ε)·p_y, 0 where p_y = 0 whatever D is.
        let d_py = times_nonzero(p_y, d_pt * keep);
        let smooth_target = if eps > zero {
            eps / classes * ((total - weight) * p_y - weight * one_minus_py)
        } else {
            zero
        };
        RowLoss {
            loss,
            a: focal * (keep * weight + eps * total / classes) - d_py + z_term,
            k: -focal * eps / classes,
            g_target: focal * (smooth_target - keep * weight * one_minus_py)
                + d_py * one_minus_py
                + z_term * p_y,
        }
    }
}

mod margin;
#[cfg(test)]
use margin::chebyshev;
pub(crate) use margin::{Margin, exact_sin_floor};

#[cfg(test)]
mod tests;
