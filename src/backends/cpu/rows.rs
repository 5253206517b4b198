//! The CPU row kernels: the forward, backward and fused passes over one row, and the
//! [`RowKernel`]s that run them at the SIMD level picked at run time.
//!
//! Forward (one row, target y, scale r, logits z_j = r·u_j):
//! 1. z_y from the target's margin ([`target_logit`]), then the online max M and Σ exp(z_j − M)
//!    over the other entries, chunk by chunk ([`Online::absorb`]).
//! 2. lse = M + ln Σ; the criterion's loss and the gradient constants a, k, g_y
//!    ([`finish_row`], `Criterion::row` in `src/math.rs`).
//!
//! Backward: 3. g_j = (a·p_j + k·w_j)·r·du_j/dx_j with p_j = exp(z_j − lse) recomputed from the
//! input ([`backward_row`]), or from the forward's cached exps in the fused pass
//! ([`backward_row_cached`]); g_y from g_y's constant and the margin's derivative.

use std::borrow::Cow;

use num_traits::{Float, One, Zero};

use candle_core::{CpuStorage, Layout, Result};

use super::RowParams;
use super::online::{CHUNK, Online, RowCache, RowPass};
use super::simd::RowKernel;
use crate::backends::cpu_storage::read_targets;
use crate::config::MarginSoftmaxLoss;
use crate::layout::{PARTIAL_COLUMNS, STAT_COLUMNS};
use crate::math::{
    Acc, Criterion, Element, Margin, SoftCap, Transform, times_nonzero, weighted_smoothing,
};
use crate::targets_and_weights::{read_weights, weight_of};

/// The target entry's logit z_y, its ∂z_y/∂r and dz_y/d(x_y)·(1/r) (the margin's derivative
/// times the soft-capping's), for the target's input x.
#[inline]
pub(super) fn target_logit<A: Acc, H: Transform<A>>(
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

/// ∂z_y/∂(m1, m2, m3) for per-row margins: (dz_y/du_y)·∂u_y/∂m_k, with dz_y/du_y = r (times
/// the soft-capping's derivative).
#[inline]
pub(super) fn target_margin_grads<A: Acc, H: Transform<A>>(
    x: A,
    scale: A,
    transform: &H,
    margin: &Margin<A>,
    cap: &Option<SoftCap<A>>,
) -> [A; 3] {
    let (u, _) = margin.target(transform, x);
    let dz_du = match cap {
        Some(cap) => cap.apply(scale * u).1 * scale,
        None => scale,
    };
    margin.margin_grads(x).map(|d| times_nonzero(d, dz_du))
}

/// Everything a row's backward pass (and the caller) needs, in the order of the op's stats
/// columns (see [`crate::op`]).
#[inline(always)]
pub(super) fn forward_row<T: Element, H: Transform<T::Acc>>(
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
pub(super) fn finish_row<A: Acc, H>(
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
pub(super) struct RowGrad<A> {
    pub(super) max: A,
    pub(super) log_sum: A,
    pub(super) a: A,
    pub(super) k: A,
    pub(super) g_target: A,
    pub(super) scale: A,
}

impl<A: Acc> RowGrad<A> {
    pub(super) fn of(info: &[A]) -> Self {
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
pub(super) fn backward_row<T: Element, H: Transform<T::Acc>>(
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
pub(super) fn backward_row_cached<T: Element, H: Transform<T::Acc>>(
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
pub(super) use with_transform;

/// What a forward pass reads besides the rows' elements, prepared once per call.
pub(super) struct ForwardContext<'a, T: Element> {
    pub(super) rows: usize,
    pub(super) classes: usize,
    pub(super) targets: Vec<Option<usize>>,
    pub(super) scales: Cow<'a, [T::Acc]>,
    /// Per-row (m1, m2, m3), replacing the head's margins row by row.
    pub(super) row_margins: Option<Vec<[T::Acc; 3]>>,
    pub(super) weights: Option<Vec<T::Acc>>,
    /// Whether the smoothing term reads `weights` per class ([`weighted_smoothing`]).
    pub(super) weighted_smoothing: bool,
    /// Whether dℓ/dr is computed (else the stats' last column is 0).
    pub(super) scale_grad: bool,
    pub(super) margin: Margin<T::Acc>,
    pub(super) criterion: Criterion<T::Acc>,
    pub(super) cap: Option<SoftCap<T::Acc>>,
}

impl<'a, T: Element> ForwardContext<'a, T> {
    /// For a \[rows, classes\] input with these targets and row parameters.
    pub(super) fn new(
        cfg: &MarginSoftmaxLoss,
        (rows, classes): (usize, usize),
        targets: (&CpuStorage, &Layout),
        params: RowParams<'a, T::Acc>,
        scale_grad: bool,
    ) -> Result<Self> {
        Ok(Self {
            rows,
            classes,
            scale_grad,
            targets: read_targets(targets.0, targets.1, cfg, classes)?,
            scales: params.scales,
            row_margins: params.margins,
            weights: read_weights::<T::Acc>(cfg),
            weighted_smoothing: weighted_smoothing(cfg),
            margin: Margin::new(&cfg.head, cfg.margin_grad),
            criterion: Criterion::new(cfg, classes),
            cap: SoftCap::new(cfg),
        })
    }

    /// Row i's margin: the head's, or built from the row's own margins.
    #[inline(always)]
    pub(super) fn margin_of(&self, i: usize) -> Margin<T::Acc> {
        match &self.row_margins {
            Some(m) => self.margin.for_row(m[i]),
            None => self.margin,
        }
    }

    /// dℓ/d(m1, m2, m3) of row i (target input `x_target`, dℓ/dz_y `g_target`), with per-row
    /// margins; 0 for an ignored row.
    #[inline]
    pub(super) fn margin_grads<H: Transform<T::Acc>>(
        &self,
        i: usize,
        x_target: Option<T::Acc>,
        transform: &H,
        g_target: T::Acc,
    ) -> [T::Acc; 3] {
        match x_target {
            Some(x) => {
                target_margin_grads(x, self.scales[i], transform, &self.margin_of(i), &self.cap)
                    .map(|d| times_nonzero(g_target, d))
            }
            None => [T::Acc::zero(); 3],
        }
    }

    pub(super) fn weight(&self, target: Option<usize>) -> T::Acc {
        target.map_or(T::Acc::zero(), |y| weight_of(&self.weights, y))
    }

    /// The class weights where the smoothing term reads them per class.
    pub(super) fn smoothing_weights(&self) -> Option<&[T::Acc]> {
        if self.weighted_smoothing {
            self.weights.as_deref()
        } else {
            None
        }
    }

    /// Row i's statistics (see [`forward_row`]), reading the row from `row`.
    #[inline(always)]
    pub(super) fn stats<H: Transform<T::Acc>>(
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
            &self.margin_of(i),
            &self.criterion,
            cache,
        )
    }

    /// Row i's statistics, and its gradient written into `out` (`x`: the row, or `None` when
    /// `out` is the row itself, overwritten in place), the upstream factor folded in. Returns
    /// (stats, dℓ/dr · upstream).
    /// `scratch`: [`RowCache::scratch_len`] values.
    #[inline(always)]
    pub(super) fn fused_row<H: Transform<T::Acc>>(
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
        let margin = self.margin_of(i);
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
                &margin,
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
        let (_, _, dz_target) = target_logit(row[y].load(), scale, transform, &margin, &None);
        let target_grad = T::store(g.g_target * scale * dz_target);
        backward_row_cached(x, out, y, g, transform, self.smoothing_weights(), &cache);
        out[y] = target_grad;
        (s, s[7] * upstream)
    }
}

/// Row i's statistics.
pub(super) struct ForwardKernel<'c, 'a, T: Element, H> {
    pub(super) ctx: &'c ForwardContext<'a, T>,
    pub(super) row: &'c [T],
    pub(super) i: usize,
    pub(super) transform: &'c H,
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for ForwardKernel<'_, '_, T, H> {
    type Output = [T::Acc; STAT_COLUMNS];
    #[inline(always)]
    fn run(self) -> Self::Output {
        self.ctx.stats(self.i, self.row, self.transform, None)
    }
}

/// Row i's statistics and gradient (see [`ForwardContext::fused_row`]).
pub(super) struct FusedKernel<'c, 'a, T: Element, H> {
    pub(super) ctx: &'c ForwardContext<'a, T>,
    pub(super) i: usize,
    pub(super) x: Option<&'c [T]>,
    pub(super) out: &'c mut [T],
    pub(super) transform: &'c H,
    pub(super) upstream: T::Acc,
    pub(super) scratch: &'c mut [T::Acc],
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
pub(super) struct BackwardKernel<'c, T: Element, H> {
    pub(super) row: &'c [T],
    pub(super) out: &'c mut [T],
    pub(super) target: Option<usize>,
    pub(super) grad: RowGrad<T::Acc>,
    pub(super) transform: &'c H,
    pub(super) margin: Margin<T::Acc>,
    pub(super) cap: &'c Option<SoftCap<T::Acc>>,
    pub(super) weights: Option<&'c [T::Acc]>,
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
            &self.margin,
            self.cap,
            self.weights,
        )
    }
}

/// One row's slice state (see [`slice_partials`]).
pub(super) struct PartialKernel<'c, T: Element, H> {
    pub(super) row: &'c [T],
    pub(super) target: i64,
    pub(super) pass: RowPass<'c, T::Acc, H>,
}

impl<T: Element, H: Transform<T::Acc>> RowKernel for PartialKernel<'_, T, H> {
    type Output = [T::Acc; PARTIAL_COLUMNS];
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
