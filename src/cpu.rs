//! The CPU bodies of the op. Rows run in parallel (rayon); each row is read once by the forward
//! pass (online max / sum-exp) and once more by the backward pass, which writes the gradient.
//! The fused `forward_backward` runs both passes on a row back to back, while it is in cache, and
//! keeps each entry's exp from the forward pass (one exp per element, not two).
//! Nothing of size \[B, C\] is allocated besides the gradient (and not even that with
//! [`forward_backward_into`]).
//!
//! Every row function is `#[inline(always)]` and runs under [`Dispatch::run`], which compiles it
//! once per SIMD level (baseline, AVX2 + FMA, AVX-512, NEON) and picks one at run time; the loops
//! work on [`CHUNK`]-sized arrays so that LLVM vectorizes them at every level.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::alloc::zeroed_buffer;
use crate::config::{Head, MarginSoftmaxLoss};
use crate::host::{HostElement, Rows, contiguous, contiguous_mut, read_targets, with_element};
use crate::math::{
    Acc, Cosine, Criterion, Element, Identity, Margin, RbfKernel, SoftCap, Transform,
    times_nonzero, weighted_smoothing,
};
use crate::op::{PARTIAL_STATE, ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::prepare::{read_weights, upstream_factor, weight_of};
use crate::simd::{Dispatch, RowKernel};

/// A row task handed to rayon covers at least this many elements, so that small batches
/// (256 × 1000) are not cut into per-row tasks whose dispatch costs more than their work.
const MIN_ELEMENTS_PER_TASK: usize = 1 << 15;

/// Rows per rayon task for rows of `classes` entries.
fn rows_per_task(classes: usize) -> usize {
    MIN_ELEMENTS_PER_TASK.div_ceil(classes.max(1)).max(1)
}

/// How many elements the online max / sum-exp takes per step: the chunk's logits are formed
/// first, so the running max is rescaled at most once per chunk and the exps are independent.
const CHUNK: usize = 64;
/// Independent partial sums per chunk (a multiple of any SIMD width in use).
const LANES: usize = 8;

/// The running state of the online log-sum-exp over a row's non-target entries, seeded with the
/// target logit. v_j = ∂z_j/∂r is the unscaled logit u_j, or sech²(r·u_j/cap)·u_j with
/// soft-capping; w_j is the class weight where the smoothing term reads it, else 1.
struct Online<A> {
    max: A,
    /// Σ exp(z_j − max) over every entry seen, the target included.
    sum_exp: A,
    /// Σ exp(z_j − max)·v_j over the non-target entries (for the row-scale gradient).
    sum_exp_v: A,
    /// Σ w_j·v_j over the non-target entries (for the row-scale gradient, and for Σ w_j·z_j
    /// = r·Σ w_j·u_j without soft-capping).
    sum_wv: A,
    /// Σ w_j·z_j over the non-target entries, accumulated only with soft-capping.
    sum_wz: A,
}

/// What the online pass needs besides the row: the row's scale, the head's transform, the
/// optional soft-capping and, where the smoothing term reads them, the class weights.
struct RowPass<'a, A, H> {
    scale: A,
    /// Whether dℓ/dr is wanted (a per-row scale that takes a gradient): only then is
    /// Σ exp(z_j − max)·v_j accumulated.
    scale_grad: bool,
    transform: &'a H,
    cap: Option<SoftCap<A>>,
    weights: Option<&'a [A]>,
}

/// What the fused path keeps of a row's forward pass for its gradient, in the thread's scratch:
/// e_j = exp(z_j − m_c) for every entry but the target, m_c being the running max when entry j's
/// chunk was absorbed (one per chunk, in order), and u_j where the transform costs an exp
/// ([`Transform::CACHES_U`]). The gradient's p_j = e_j·exp(m_c − M − ln Σ): one exp per chunk
/// instead of one per entry.
struct RowCache<'s, A> {
    e: &'s mut [A],
    u: &'s mut [A],
    chunk_max: &'s mut [A],
    chunks: usize,
}

impl<'s, A: Acc> RowCache<'s, A> {
    /// The scratch length a row of `classes` entries needs.
    fn scratch_len<H: Transform<A>>(classes: usize) -> usize {
        let u = if H::CACHES_U { classes } else { 0 };
        classes + u + classes / CHUNK + 2
    }

    fn new<H: Transform<A>>(scratch: &'s mut [A], classes: usize) -> Self {
        let (e, rest) = scratch.split_at_mut(classes);
        let (u, chunk_max) = rest.split_at_mut(if H::CACHES_U { classes } else { 0 });
        Self {
            e,
            u,
            chunk_max,
            chunks: 0,
        }
    }
}

impl<A: Acc> Online<A> {
    /// The state of no entry yet, for a slice's partial statistics. The max starts at the most
    /// negative finite value, not −∞, so that a slice of masked logits (z = −∞) gives
    /// exp(−∞ − max) = 0, not NaN, and sums to an empty state.
    fn empty() -> Self {
        Self {
            max: <A as Float>::min_value(),
            sum_exp: A::zero(),
            sum_exp_v: A::zero(),
            sum_wv: A::zero(),
            sum_wz: A::zero(),
        }
    }

    /// The state of two disjoint sets of entries together.
    fn merge(self, other: &Self) -> Self {
        let max = if other.max > self.max {
            other.max
        } else {
            self.max
        };
        let (fa, fb) = ((self.max - max).exp(), (other.max - max).exp());
        Self {
            max,
            sum_exp: times_nonzero(self.sum_exp, fa) + times_nonzero(other.sum_exp, fb),
            sum_exp_v: times_nonzero(self.sum_exp_v, fa) + times_nonzero(other.sum_exp_v, fb),
            sum_wv: self.sum_wv + other.sum_wv,
            sum_wz: self.sum_wz + other.sum_wz,
        }
    }

    /// The partial-statistics columns (see [`crate::op::PARTIAL_STATE`]).
    fn to_partial(&self) -> [A; PARTIAL_STATE] {
        [
            self.max,
            self.sum_exp,
            self.sum_exp_v,
            self.sum_wv,
            self.sum_wz,
        ]
    }

    fn of_partial(p: &[A]) -> Self {
        Self {
            max: p[0],
            sum_exp: p[1],
            sum_exp_v: p[2],
            sum_wv: p[3],
            sum_wz: p[4],
        }
    }

    fn new(z_target: A) -> Self {
        Self {
            max: z_target,
            sum_exp: A::one(),
            sum_exp_v: A::zero(),
            sum_wv: A::zero(),
            sum_wz: A::zero(),
        }
    }

    /// Absorbs the entries `xs`, which start at column `first`, in chunks of [`CHUNK`]: the
    /// chunk's logits first (the tail padded with z = −∞ and v = 0, and w = 0 when the weights
    /// are read, which add nothing; w stays 1 otherwise), then one
    /// rescale of the running sums at most, then the exps, summed in [`LANES`] independent
    /// partial sums so that the loops vectorize. Soft-capping and class weights are decided once
    /// per chunk, so the plain path's loops carry no extra work.
    #[inline(always)]
    fn absorb<T: Element<Acc = A>, H: Transform<A>>(
        &mut self,
        xs: &[T],
        first: usize,
        pass: &RowPass<'_, A, H>,
        mut cache: Option<&mut RowCache<'_, A>>,
    ) {
        let scale = pass.scale;
        let transform = *pass.transform;
        let mut x = [A::zero(); CHUNK];
        let mut v = [A::zero(); CHUNK];
        let mut z = [A::zero(); CHUNK];
        let mut w = [A::one(); CHUNK];
        for (c, chunk) in xs.chunks(CHUNK).enumerate() {
            let start = first + c * CHUNK;
            T::load_chunk(chunk, &mut x);
            for i in 0..CHUNK {
                v[i] = transform.u(x[i]);
                z[i] = scale * v[i];
            }
            if let Some(cache) = cache.as_deref_mut()
                && H::CACHES_U
            {
                cache.u[start..start + chunk.len()].copy_from_slice(&v[..chunk.len()]);
            }
            if let Some(cap) = &pass.cap {
                for i in 0..chunk.len() {
                    let (zc, dz) = cap.apply(z[i]);
                    z[i] = zc;
                    // A masked logit (u = −∞) has sech² = 0: its ∂z/∂r is 0, not NaN.
                    v[i] = times_nonzero(dz, v[i]);
                }
            }
            if let Some(weights) = pass.weights {
                w[..chunk.len()].copy_from_slice(&weights[start..start + chunk.len()]);
                w[chunk.len()..].fill(A::zero());
            }
            for i in chunk.len()..CHUNK {
                v[i] = A::zero();
                z[i] = A::neg_infinity();
            }
            let mut lane_max = [A::neg_infinity(); LANES];
            for block in z.chunks_exact(LANES) {
                for (m, &v) in lane_max.iter_mut().zip(block) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let chunk_max = lane_max
                .iter()
                .fold(A::neg_infinity(), |m, &v| Float::max(m, v));
            if chunk_max > self.max {
                let rescale = (self.max - chunk_max).exp();
                self.sum_exp *= rescale;
                self.sum_exp_v *= rescale;
                self.max = chunk_max;
            }
            let max = self.max;
            // The exps in a loop of their own: inside the lane loop below LLVM keeps them scalar.
            let mut e = [A::zero(); CHUNK];
            for (ei, &zi) in e.iter_mut().zip(z.iter()) {
                *ei = A::exp_flushed(zi - max);
            }
            if let Some(cache) = cache.as_deref_mut() {
                cache.e[start..start + chunk.len()].copy_from_slice(&e[..chunk.len()]);
                cache.chunk_max[cache.chunks] = max;
                cache.chunks += 1;
            }
            // e·v and w·v per entry in loops of their own, where the select of times_nonzero
            // vectorizes; then plain sums in LANES independent partial sums.
            let mut ev = [A::zero(); CHUNK];
            if pass.scale_grad {
                for i in 0..CHUNK {
                    // A masked logit: e = 0 and v = −∞ must add 0, not NaN.
                    ev[i] = times_nonzero(e[i], v[i]);
                }
            }
            let mut wv = v;
            if pass.weights.is_some() {
                for i in 0..CHUNK {
                    // A zero weight adds 0, also for a masked logit.
                    wv[i] = times_nonzero(w[i], v[i]);
                }
            }
            let mut sum_exp = [A::zero(); LANES];
            let mut sum_exp_v = [A::zero(); LANES];
            let mut sum_wv = [A::zero(); LANES];
            for b in 0..CHUNK / LANES {
                for l in 0..LANES {
                    sum_exp[l] += e[b * LANES + l];
                    sum_wv[l] += wv[b * LANES + l];
                }
            }
            if pass.scale_grad {
                for b in 0..CHUNK / LANES {
                    for l in 0..LANES {
                        sum_exp_v[l] += ev[b * LANES + l];
                    }
                }
            }
            let total = |lanes: [A; LANES]| lanes.iter().fold(A::zero(), |acc, &v| acc + v);
            self.sum_exp += total(sum_exp);
            self.sum_exp_v += total(sum_exp_v);
            self.sum_wv += total(sum_wv);
            if pass.cap.is_some() {
                let mut sum_wz = A::zero();
                for i in 0..chunk.len() {
                    sum_wz += times_nonzero(w[i], z[i]);
                }
                self.sum_wz += sum_wz;
            }
        }
    }
}

/// The target entry's logit z_y, its ∂z_y/∂r and dz_y/d(x_y)·(1/r) (the margin's derivative
/// times the soft-capping's), for the target's input x.
#[inline]
fn target_logit<A: Acc, H: Transform<A>>(
    x: A,
    scale: A,
    transform: &H,
    margin: &Margin<A>,
    cap: &Option<SoftCap<A>>,
) -> (A, A, A) {
    let (u, du) = margin.target(transform, x);
    let z = scale * u;
    match cap {
        Some(cap) => {
            let (zc, dz) = cap.apply(z);
            (zc, times_nonzero(dz, u), dz * du)
        }
        None => (z, u, du),
    }
}

/// Everything a row's backward pass (and the caller) needs, in the order of the op's stats
/// columns (see [`crate::op`]).
#[inline(always)]
fn forward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    target: Option<usize>,
    weight: T::Acc,
    pass: &RowPass<'_, T::Acc, H>,
    margin: &Margin<T::Acc>,
    criterion: &Criterion<T::Acc>,
    mut cache: Option<&mut RowCache<'_, T::Acc>>,
) -> [T::Acc; STAT_COLUMNS] {
    let zero = T::Acc::zero();
    let Some(y) = target else {
        return [zero; STAT_COLUMNS];
    };
    let scale = pass.scale;
    let (z_target, v_target, _) =
        target_logit(row[y].load(), scale, pass.transform, margin, &pass.cap);
    let mut online = Online::new(z_target);
    online.absorb(&row[..y], 0, pass, cache.as_deref_mut());
    online.absorb(&row[y + 1..], y + 1, pass, cache);
    // w_j = 1 unless the smoothing term reads the weights.
    let w_target = pass.weights.map_or(T::Acc::one(), |w| w[y]);
    finish_row(
        &online,
        (z_target, v_target, w_target),
        weight,
        pass,
        criterion,
    )
}

/// A row's statistics from the online state of all its entries (seeded with the target's) and
/// the target's logit z_y, ∂z_y/∂r and smoothing weight: the criterion, and dℓ/dr.
#[inline(always)]
fn finish_row<A: Acc, H>(
    online: &Online<A>,
    (z_target, v_target, w_target): (A, A, A),
    weight: A,
    pass: &RowPass<'_, A, H>,
    criterion: &Criterion<A>,
) -> [A; STAT_COLUMNS] {
    let log_sum = online.sum_exp.ln();
    // Σ_j w_j·z_j, the target included.
    let sum_wz_others = if pass.cap.is_some() {
        online.sum_wz
    } else {
        pass.scale * online.sum_wv
    };
    let sum_wz = sum_wz_others + times_nonzero(w_target, z_target);
    let r = criterion.row(online.max, log_sum, z_target, sum_wz, weight);
    // dℓ/dr = Σ_j g_j·v_j, with Σ_{j≠y} p_j·v_j = sum_exp_v / sum_exp. A term with an exactly
    // zero coefficient adds 0: k = 0 without smoothing, while sum_wv = −∞ with a masked logit.
    let d_scale = if pass.scale_grad {
        times_nonzero(r.a, online.sum_exp_v / online.sum_exp)
            + times_nonzero(r.k, online.sum_wv)
            + times_nonzero(r.g_target, v_target)
    } else {
        A::zero()
    };
    [
        r.loss, online.max, log_sum, weight, r.a, r.k, r.g_target, d_scale,
    ]
}

/// The per-row constants of a backward pass: [M, ln Σ, a, k, g_y, r] with the upstream gradient
/// already folded into a, k, g_y (the row-info layout of [`crate::op`]).
#[derive(Clone, Copy)]
struct RowGrad<A> {
    max: A,
    log_sum: A,
    a: A,
    k: A,
    g_target: A,
    scale: A,
}

impl<A: Acc> RowGrad<A> {
    fn of(info: &[A]) -> Self {
        Self {
            max: info[0],
            log_sum: info[1],
            a: info[2],
            k: info[3],
            g_target: info[4],
            scale: info[5],
        }
    }
}

/// dx_j = (a·p_j + k·w_j)·c_j·r·du_j/dx_j for j ≠ y and g_y·c_y·r·du_y/dx_y, with
/// p_j = exp((z_j − M) − ln Σ), z_j = r·u_j (or cap·tanh(r·u_j/cap), whose derivative c_j =
/// sech²(r·u_j/cap); c_j = 1 without capping) and w_j = 1 unless the smoothing term reads the
/// class weights. Recomputes every p_j from the input (the autograd backward, and the fused path
/// with soft-capping).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    out: &mut [T],
    target: Option<usize>,
    grad: RowGrad<T::Acc>,
    transform: &H,
    margin: &Margin<T::Acc>,
    cap: &Option<SoftCap<T::Acc>>,
    weights: Option<&[T::Acc]>,
) {
    let Some(y) = target else {
        out.fill(T::store(T::Acc::zero()));
        return;
    };
    let RowGrad {
        max,
        log_sum,
        a,
        k,
        g_target,
        scale,
    } = grad;
    let transform = *transform;
    let mut x = [T::Acc::zero(); CHUNK];
    let mut g = [T::Acc::zero(); CHUNK];
    for (c, (xs, os)) in row.chunks(CHUNK).zip(out.chunks_mut(CHUNK)).enumerate() {
        let len = xs.len();
        T::load_chunk(xs, &mut x);
        match (cap, weights) {
            (None, None) => {
                for i in 0..CHUNK {
                    let u = transform.u(x[i]);
                    let p = T::Acc::exp_flushed((scale * u - max) - log_sum);
                    g[i] = (a * p + k) * scale * transform.du(x[i], u);
                }
            }
            _ => {
                for i in 0..len {
                    let u = transform.u(x[i]);
                    let (z, dz) = match cap {
                        Some(cap) => cap.apply(scale * u),
                        None => (scale * u, T::Acc::one()),
                    };
                    let p = T::Acc::exp_flushed((z - max) - log_sum);
                    let w = weights.map_or(T::Acc::one(), |w| w[c * CHUNK + i]);
                    g[i] = (a * p + k * w) * dz * scale * transform.du(x[i], u);
                }
            }
        }
        T::store_chunk(&g, os);
    }
    let (_, _, dz_target) = target_logit(row[y].load(), scale, &transform, margin, cap);
    out[y] = T::store(g_target * scale * dz_target);
}

/// The fused path's gradient for every entry but the target (which the caller writes), from the
/// forward pass's [`RowCache`]: p_j = e_j·f_c with f_c = exp(m_c − M − ln Σ) per chunk, then as
/// [`backward_row`] without soft-capping. p_j is flushed to 0 where it would be subnormal, as
/// `exp_flushed` does in [`backward_row`] (and e_j is raised to e_min/f_c before the product, so
/// that no product is subnormal: the CPU's subnormal arithmetic is slow).
///
/// `x` is the row; `None` reads it from `out`, the in-place case: each chunk is loaded before its
/// gradient is stored.
#[inline(always)]
fn backward_row_cached<T: Element, H: Transform<T::Acc>>(
    x: Option<&[T]>,
    out: &mut [T],
    y: usize,
    grad: RowGrad<T::Acc>,
    transform: &H,
    weights: Option<&[T::Acc]>,
    cache: &RowCache<'_, T::Acc>,
) {
    let RowGrad {
        max,
        log_sum,
        a,
        k,
        scale,
        ..
    } = grad;
    // A local copy: read through the reference, its fields are reloaded in the loop, which
    // then stays scalar.
    let transform = *transform;
    let zero = T::Acc::zero();
    let e_min = T::Acc::EXP_SUBNORMAL_BELOW.exp();
    let classes = out.len();
    let mut xa = [zero; CHUNK];
    let mut g = [zero; CHUNK];
    let mut chunk = 0;
    for (lo, hi) in [(0, y), (y + 1, classes)] {
        let mut start = lo;
        while start < hi {
            let len = CHUNK.min(hi - start);
            let f = T::Acc::exp_flushed((cache.chunk_max[chunk] - max) - log_sum);
            chunk += 1;
            // Below this e_j, p_j = e_j·f would be subnormal: it is 0. f = 0: every p_j is 0;
            // a NaN f (a NaN row) reaches every p_j.
            let e_floor = if f > zero {
                e_min / f
            } else if f == zero {
                T::Acc::infinity()
            } else {
                zero
            };
            match x {
                Some(x) => T::load_chunk(&x[start..start + len], &mut xa),
                None => T::load_chunk(&out[start..start + len], &mut xa),
            }
            // Fixed-size copies, so that the loop below has no bounds checks and vectorizes.
            let mut e = [zero; CHUNK];
            e[..len].copy_from_slice(&cache.e[start..start + len]);
            let mut u = [zero; CHUNK];
            if H::CACHES_U {
                u[..len].copy_from_slice(&cache.u[start..start + len]);
            }
            let mut w = [T::Acc::one(); CHUNK];
            if let Some(weights) = weights {
                w[..len].copy_from_slice(&weights[start..start + len]);
            }
            for i in 0..CHUNK {
                let ui = if H::CACHES_U {
                    u[i]
                } else {
                    transform.u(xa[i])
                };
                let ei = e[i];
                // The product is formed from e_j raised to the floor, so that it is never
                // subnormal even where it is discarded (a vectorized select computes both);
                // a NaN e_j passes both tests and stays NaN.
                let raised = if ei < e_floor { e_floor } else { ei };
                let p = if ei < e_floor { zero } else { raised * f };
                g[i] = (a * p + k * w[i]) * scale * transform.du(xa[i], ui);
            }
            T::store_chunk(&g, &mut out[start..start + len]);
            start += len;
        }
    }
}

/// Calls `$body` with `$t` bound to the head's element transform, so the row loops are
/// monomorphized per head family.
macro_rules! with_transform {
    ($head:expr, $acc:ty, |$t:ident| $body:expr) => {
        match $head {
            Head::Softmax { .. } => {
                let $t = Identity;
                $body
            }
            Head::Rbf { gamma, .. } => {
                let $t = RbfKernel::<$acc> {
                    neg_inv_gamma: <$acc>::of(-1.0 / gamma),
                };
                $body
            }
            _ => {
                let $t = Cosine;
                $body
            }
        }
    };
}

/// What a forward pass reads besides the rows' elements, prepared once per call.
struct ForwardContext<'a, T: Element> {
    rows: usize,
    classes: usize,
    targets: Vec<Option<usize>>,
    scales: &'a [T::Acc],
    weights: Option<Vec<T::Acc>>,
    /// Whether the smoothing term reads `weights` per class ([`weighted_smoothing`]).
    weighted_smoothing: bool,
    /// Whether dℓ/dr is computed (else the stats' last column is 0).
    scale_grad: bool,
    margin: Margin<T::Acc>,
    criterion: Criterion<T::Acc>,
    cap: Option<SoftCap<T::Acc>>,
}

impl<'a, T: Element> ForwardContext<'a, T> {
    /// For a \[rows, classes\] input with these targets and per-row scales.
    fn new(
        cfg: &MarginSoftmaxLoss,
        (rows, classes): (usize, usize),
        targets: (&CpuStorage, &Layout),
        scales: &'a [T::Acc],
        scale_grad: bool,
    ) -> Result<Self> {
        Ok(Self {
            rows,
            classes,
            scale_grad,
            targets: read_targets(targets.0, targets.1, cfg, classes)?,
            scales,
            weights: read_weights::<T::Acc>(cfg),
            weighted_smoothing: weighted_smoothing(cfg),
            margin: Margin::new(&cfg.head, cfg.margin_grad),
            criterion: Criterion::new(cfg, classes),
            cap: SoftCap::new(cfg),
        })
    }

    fn weight(&self, target: Option<usize>) -> T::Acc {
        target.map_or(T::Acc::zero(), |y| weight_of(&self.weights, y))
    }

    /// The class weights where the smoothing term reads them per class.
    fn smoothing_weights(&self) -> Option<&[T::Acc]> {
        if self.weighted_smoothing {
            self.weights.as_deref()
        } else {
            None
        }
    }

    /// Row i's statistics (see [`forward_row`]), reading the row from `row`.
    #[inline(always)]
    fn stats<H: Transform<T::Acc>>(
        &self,
        i: usize,
        row: &[T],
        transform: &H,
        cache: Option<&mut RowCache<'_, T::Acc>>,
    ) -> [T::Acc; STAT_COLUMNS] {
        let target = self.targets[i];
        let pass = RowPass {
            scale: self.scales[i],
            scale_grad: self.scale_grad,
            transform,
            cap: self.cap,
            weights: self.smoothing_weights(),
        };
        forward_row(
            row,
            target,
            self.weight(target),
            &pass,
            &self.margin,
            &self.criterion,
            cache,
        )
    }

    /// Row i's statistics, and its gradient written into `out` (`x`: the row, or `None` when
    /// `out` is the row itself, overwritten in place), the upstream factor folded in. Returns
    /// (stats, dℓ/dr · upstream).
    /// `scratch`: [`RowCache::scratch_len`] values.
    #[inline(always)]
    fn fused_row<H: Transform<T::Acc>>(
        &self,
        i: usize,
        x: Option<&[T]>,
        out: &mut [T],
        transform: &H,
        upstream: T::Acc,
        scratch: &mut [T::Acc],
    ) -> ([T::Acc; STAT_COLUMNS], T::Acc) {
        let classes = out.len();
        let target = self.targets[i];
        let scale = self.scales[i];
        let grad = |s: &[T::Acc; STAT_COLUMNS]| RowGrad {
            max: s[1],
            log_sum: s[2],
            a: s[4] * upstream,
            k: s[5] * upstream,
            g_target: s[6] * upstream,
            scale,
        };
        let (Some(y), None) = (target, self.cap) else {
            // An ignored row, or soft-capping: the forward pass, then the recomputing backward
            // (from a copy of the row when it is overwritten in place; an ignored row is not
            // read: its statistics are 0 and its gradient is filled with 0).
            let copy;
            let row = match x {
                Some(x) => x,
                None if target.is_none() => &[],
                None => {
                    copy = out.to_vec();
                    &copy[..]
                }
            };
            let s = self.stats(i, row, transform, None);
            backward_row(
                row,
                out,
                target,
                grad(&s),
                transform,
                &self.margin,
                &self.cap,
                self.smoothing_weights(),
            );
            return (s, s[7] * upstream);
        };
        let mut cache = RowCache::new::<H>(scratch, classes);
        let row = x.unwrap_or(&*out);
        let s = self.stats(i, row, transform, Some(&mut cache));
        let g = grad(&s);
        // The target's entry, read before the row may be overwritten.
        let (_, _, dz_target) = target_logit(row[y].load(), scale, transform, &self.margin, &None);
        let target_grad = T::store(g.g_target * scale * dz_target);
        backward_row_cached(x, out, y, g, transform, self.smoothing_weights(), &cache);
        out[y] = target_grad;
        (s, s[7] * upstream)
    }
}

/// Row i's statistics.
struct ForwardKernel<'c, 'a, T: Element, H> {
    ctx: &'c ForwardContext<'a, T>,
    row: &'c [T],
    i: usize,
    transform: &'c H,
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for ForwardKernel<'_, '_, T, H> {
    type Output = [T::Acc; STAT_COLUMNS];
    #[inline(always)]
    fn run(self) -> Self::Output {
        self.ctx.stats(self.i, self.row, self.transform, None)
    }
}

/// Row i's statistics and gradient (see [`ForwardContext::fused_row`]).
struct FusedKernel<'c, 'a, T: Element, H> {
    ctx: &'c ForwardContext<'a, T>,
    i: usize,
    x: Option<&'c [T]>,
    out: &'c mut [T],
    transform: &'c H,
    upstream: T::Acc,
    scratch: &'c mut [T::Acc],
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for FusedKernel<'_, '_, T, H> {
    type Output = ([T::Acc; STAT_COLUMNS], T::Acc);
    #[inline(always)]
    fn run(self) -> Self::Output {
        self.ctx.fused_row(
            self.i,
            self.x,
            self.out,
            self.transform,
            self.upstream,
            self.scratch,
        )
    }
}

/// Row i's gradient from its row info (the autograd backward).
struct BackwardKernel<'c, T: Element, H> {
    row: &'c [T],
    out: &'c mut [T],
    target: Option<usize>,
    grad: RowGrad<T::Acc>,
    transform: &'c H,
    margin: &'c Margin<T::Acc>,
    cap: &'c Option<SoftCap<T::Acc>>,
    weights: Option<&'c [T::Acc]>,
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for BackwardKernel<'_, T, H> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        backward_row(
            self.row,
            self.out,
            self.target,
            self.grad,
            self.transform,
            self.margin,
            self.cap,
            self.weights,
        )
    }
}

/// The forward op: per-row statistics [B, STAT_COLUMNS] in the accumulation dtype; dℓ/dr (the
/// last column) only with `scale_grad`, else 0.
pub(crate) fn forward(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    scale_grad: bool,
) -> Result<CpuStorage> {
    with_element!(
        x.0,
        cfg.head.name(),
        forward_typed(cfg, x, targets, scale, scale_grad)
    )
}

fn forward_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    scale_grad: bool,
) -> Result<CpuStorage> {
    let name = cfg.head.name();
    let rows = Rows::<T>::new(x.0, x.1, name)?;
    let scales = contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?;
    let ctx =
        ForwardContext::<T>::new(cfg, (rows.rows, rows.classes), targets, scales, scale_grad)?;
    let simd = Dispatch::current();
    let mut stats = vec![T::Acc::zero(); rows.rows * STAT_COLUMNS];
    with_transform!(cfg.head, T::Acc, |transform| {
        stats
            .par_chunks_mut(STAT_COLUMNS)
            .with_min_len(rows_per_task(rows.classes))
            .enumerate()
            .for_each(|(i, out)| {
                let kernel = ForwardKernel {
                    ctx: &ctx,
                    row: rows.row(i),
                    i,
                    transform: &transform,
                };
                out.copy_from_slice(&simd.run(kernel))
            })
    });
    Ok(T::Acc::to_cpu_storage_owned(stats))
}

/// The backward op: d(loss)/d(input) \[B, C\] in the input dtype, from the input, the targets and
/// the per-row [M, ln Σ, a, k, g_y, r] (upstream gradient folded in).
pub(crate) fn backward(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    row_info: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    with_element!(
        x.0,
        cfg.head.name(),
        backward_typed(cfg, x, targets, row_info)
    )
}

fn backward_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    row_info: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let name = cfg.head.name();
    let rows = Rows::<T>::new(x.0, x.1, name)?;
    let targets = read_targets(targets.0, targets.1, cfg, rows.classes)?;
    let info = contiguous::<T::Acc>(row_info.0, row_info.1, "row info", name)?;
    let margin = Margin::<T::Acc>::new(&cfg.head, cfg.margin_grad);
    let cap = SoftCap::<T::Acc>::new(cfg);
    let weights = if weighted_smoothing(cfg) {
        read_weights::<T::Acc>(cfg)
    } else {
        None
    };
    let simd = Dispatch::current();
    let mut grad = zeroed_buffer::<T>(rows.rows * rows.classes);
    with_transform!(cfg.head, T::Acc, |transform| {
        grad.par_chunks_mut(rows.classes)
            .with_min_len(rows_per_task(rows.classes))
            .enumerate()
            .for_each(|(i, out)| {
                let kernel = BackwardKernel {
                    row: rows.row(i),
                    out,
                    target: targets[i],
                    grad: RowGrad::of(&info[i * ROWINFO_COLUMNS..(i + 1) * ROWINFO_COLUMNS]),
                    transform: &transform,
                    margin: &margin,
                    cap: &cap,
                    weights: weights.as_deref(),
                };
                simd.run(kernel)
            })
    });
    Ok(T::to_cpu_storage_owned(grad))
}

/// Forward and backward together: (stats [B, STAT_COLUMNS], d(loss)/d(input) \[B, C\],
/// d(loss)/d(row scale) \[B\]), for the reduced loss when `mean` (Σ_i ℓ_i / Σ_i w_{y_i}), else for
/// Σ_i ℓ_i. d(loss)/d(row scale) only with `scale_grad`, else 0.
pub(crate) fn forward_backward(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    mean: bool,
    scale_grad: bool,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    with_element!(
        x.0,
        cfg.head.name(),
        forward_backward_typed(cfg, x, targets, scale, mean, scale_grad)
    )
}

fn forward_backward_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    mean: bool,
    scale_grad: bool,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    let name = cfg.head.name();
    let rows = Rows::<T>::new(x.0, x.1, name)?;
    let scales = contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?;
    let ctx =
        ForwardContext::<T>::new(cfg, (rows.rows, rows.classes), targets, scales, scale_grad)?;
    let mut grad = zeroed_buffer::<T>(rows.rows * rows.classes);
    let (stats, grad_scale) = fused_rows(cfg, &ctx, FusedInput::Rows(&rows), &mut grad, mean);
    Ok((
        T::Acc::to_cpu_storage_owned(stats),
        T::to_cpu_storage_owned(grad),
        T::Acc::to_cpu_storage_owned(grad_scale),
    ))
}

/// The fused op writing the gradient into the caller's buffer `grad` (contiguous \[B, C\], the
/// input's dtype), reading the rows from `input`, or with `None` from `grad` itself, which then
/// holds the input and is overwritten (in place). The head's fixed scale. Returns the stats.
pub(crate) fn forward_backward_into(
    cfg: &MarginSoftmaxLoss,
    grad: (&mut CpuStorage, &Layout),
    input: Option<(&CpuStorage, &Layout)>,
    targets: (&CpuStorage, &Layout),
    mean: bool,
) -> Result<CpuStorage> {
    with_element!(
        grad.0,
        cfg.head.name(),
        forward_backward_into_typed(cfg, grad, input, targets, mean)
    )
}

fn forward_backward_into_typed<T: Element + HostElement>(
    cfg: &MarginSoftmaxLoss,
    grad: (&mut CpuStorage, &Layout),
    input: Option<(&CpuStorage, &Layout)>,
    targets: (&CpuStorage, &Layout),
    mean: bool,
) -> Result<CpuStorage> {
    let name = cfg.head.name();
    let (rows, classes) = grad.1.shape().dims2()?;
    let scales = vec![T::Acc::of(cfg.head.scale()); rows];
    let ctx = ForwardContext::<T>::new(cfg, (rows, classes), targets, &scales, false)?;
    let out = contiguous_mut::<T>(grad.0, grad.1, "gradient buffer", name)?;
    let (stats, _) = match input {
        Some((storage, layout)) => {
            let rows = Rows::<T>::new(storage, layout, name)?;
            fused_rows(cfg, &ctx, FusedInput::Rows(&rows), out, mean)
        }
        None => fused_rows(cfg, &ctx, FusedInput::InPlace, out, mean),
    };
    Ok(T::Acc::to_cpu_storage_owned(stats))
}

/// Where the fused rows read their input: the context's rows, or the gradient buffer itself
/// (overwritten in place).
#[derive(Clone, Copy)]
enum FusedInput<'c, 'a, T> {
    Rows(&'c Rows<'a, T>),
    InPlace,
}

/// [`RowCache::scratch_len`] for this transform.
fn scratch_len_of<A: Acc, H: Transform<A>>(_: &H, classes: usize) -> usize {
    RowCache::<A>::scratch_len::<H>(classes)
}

/// Runs the fused row kernel on every row, writing the gradient into `grad` (\[B, C\],
/// contiguous); returns (stats, d(loss)/d(row scale)).
fn fused_rows<T: Element>(
    cfg: &MarginSoftmaxLoss,
    ctx: &ForwardContext<'_, T>,
    input: FusedInput<'_, '_, T>,
    grad: &mut [T],
    mean: bool,
) -> (Vec<T::Acc>, Vec<T::Acc>) {
    let (rows, classes) = (ctx.rows, ctx.classes);
    let upstream = upstream_factor(&ctx.targets, &ctx.weights, mean);
    let simd = Dispatch::current();
    let mut stats = vec![T::Acc::zero(); rows * STAT_COLUMNS];
    let mut grad_scale = vec![T::Acc::zero(); rows];
    if classes == 0 {
        return (stats, grad_scale);
    }
    with_transform!(cfg.head, T::Acc, |transform| {
        let scratch_len = scratch_len_of::<T::Acc, _>(&transform, classes);
        stats
            .par_chunks_mut(STAT_COLUMNS)
            .zip(grad.par_chunks_mut(classes))
            .zip(grad_scale.par_iter_mut())
            .with_min_len(rows_per_task(classes))
            .enumerate()
            .for_each(|(i, ((stat, out), d_scale))| {
                let x = match input {
                    FusedInput::Rows(rows) => Some(rows.row(i)),
                    FusedInput::InPlace => None,
                };
                // The scratch is taken here, outside `simd.run`: code in a closure handed to
                // `with_scratch` would not be compiled with the level's features.
                let (s, ds) = T::Acc::with_scratch(scratch_len, |scratch| {
                    simd.run(FusedKernel {
                        ctx,
                        i,
                        x,
                        out,
                        transform: &transform,
                        upstream,
                        scratch,
                    })
                });
                stat.copy_from_slice(&s);
                *d_scale = ds;
            })
    });
    (stats, grad_scale)
}

/// The online state of the non-target entries of a slice of each row (see
/// [`crate::op::slice_partials`]), [B, PARTIAL_STATE] in the accumulation dtype, and the split
/// count, 1 (the kernels' layout is [B, splits, 5]): `local_targets[i]` is the row's
/// target as a column of the slice, −1 for an ignored row (an empty state), and any value ≥ the
/// slice's width for a target in another slice (every entry counts). The slice's class weights
/// are the configuration's (already cut to the slice).
pub(crate) fn slice_partials(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    local_targets: &[i64],
    scale: (&CpuStorage, &Layout),
    scale_grad: bool,
) -> Result<(CpuStorage, usize)> {
    let partials = with_element!(
        x.0,
        cfg.head.name(),
        slice_partials_typed(cfg, x, local_targets, scale, scale_grad)
    )?;
    Ok((partials, 1))
}

fn slice_partials_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    local_targets: &[i64],
    scale: (&CpuStorage, &Layout),
    scale_grad: bool,
) -> Result<CpuStorage> {
    let name = cfg.head.name();
    let rows = Rows::<T>::new(x.0, x.1, name)?;
    let scales = contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?;
    let weights = if weighted_smoothing(cfg) {
        read_weights::<T::Acc>(cfg)
    } else {
        None
    };
    let cap = SoftCap::<T::Acc>::new(cfg);
    let simd = Dispatch::current();
    let mut out = vec![T::Acc::zero(); rows.rows * PARTIAL_STATE];
    with_transform!(cfg.head, T::Acc, |transform| {
        out.par_chunks_mut(PARTIAL_STATE)
            .with_min_len(rows_per_task(rows.classes))
            .enumerate()
            .for_each(|(i, o)| {
                let kernel = PartialKernel {
                    row: rows.row(i),
                    target: local_targets[i],
                    pass: RowPass {
                        scale: scales[i],
                        scale_grad,
                        transform: &transform,
                        cap,
                        weights: weights.as_deref(),
                    },
                };
                o.copy_from_slice(&simd.run(kernel))
            })
    });
    Ok(T::Acc::to_cpu_storage_owned(out))
}

/// One row's slice state (see [`slice_partials`]).
struct PartialKernel<'c, T: Element, H> {
    row: &'c [T],
    target: i64,
    pass: RowPass<'c, T::Acc, H>,
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for PartialKernel<'_, T, H> {
    type Output = [T::Acc; PARTIAL_STATE];
    #[inline(always)]
    fn run(self) -> Self::Output {
        let mut online = Online::empty();
        match self.target {
            t if t < 0 => {}
            t if (t as usize) < self.row.len() => {
                let y = t as usize;
                online.absorb(&self.row[..y], 0, &self.pass, None);
                online.absorb(&self.row[y + 1..], y + 1, &self.pass, None);
            }
            _ => online.absorb(self.row, 0, &self.pass, None),
        }
        online.to_partial()
    }
}

/// Merges the slices' states of each row in the order given (`parts[k]` is slice k's
/// [B, PARTIAL_STATE]), the same order on every caller, so that every rank of a sharded loss
/// gets the same bits.
pub(crate) fn merge_partials<A: Acc>(parts: &[Vec<A>], rows: usize) -> Vec<A> {
    let mut out = Vec::with_capacity(rows * PARTIAL_STATE);
    for i in 0..rows {
        let at =
            |k: usize| Online::of_partial(&parts[k][i * PARTIAL_STATE..(i + 1) * PARTIAL_STATE]);
        let mut state = Online::empty();
        for k in 0..parts.len() {
            state = state.merge(&at(k));
        }
        out.extend_from_slice(&state.to_partial());
    }
    out
}

/// The statistics [B, STAT_COLUMNS] of whole rows from their non-target entries' merged state
/// `others` [B, PARTIAL_STATE] and each target's input `target_inputs` [B] (the forward op's
/// result up to rounding: the target is absorbed last instead of first). `targets` are the rows'
/// classes among all `classes` (`None`: ignored, statistics 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize_partials<A: Acc>(
    cfg: &MarginSoftmaxLoss,
    classes: usize,
    targets: &[Option<usize>],
    others: &[A],
    target_inputs: &[A],
    scales: &[A],
    scale_grad: bool,
) -> Vec<A> {
    let weights = read_weights::<A>(cfg);
    let smoothing = if weighted_smoothing(cfg) {
        weights.as_deref()
    } else {
        None
    };
    let margin = Margin::<A>::new(&cfg.head, cfg.margin_grad);
    let criterion = Criterion::<A>::new(cfg, classes);
    let cap = SoftCap::<A>::new(cfg);
    let mut out = vec![A::zero(); targets.len() * STAT_COLUMNS];
    with_transform!(cfg.head, A, |transform| {
        for (i, (o, &target)) in out.chunks_mut(STAT_COLUMNS).zip(targets).enumerate() {
            let Some(y) = target else { continue };
            let pass = RowPass {
                scale: scales[i],
                scale_grad,
                transform: &transform,
                cap,
                weights: smoothing,
            };
            let (z_target, v_target, _) =
                target_logit(target_inputs[i], scales[i], &transform, &margin, &cap);
            let rest = Online::of_partial(&others[i * PARTIAL_STATE..(i + 1) * PARTIAL_STATE]);
            let online = Online::new(z_target).merge(&rest);
            let w_target = smoothing.map_or(A::one(), |w| w[y]);
            o.copy_from_slice(&finish_row(
                &online,
                (z_target, v_target, w_target),
                weight_of(&weights, y),
                &pass,
                &criterion,
            ));
        }
    });
    out
}
