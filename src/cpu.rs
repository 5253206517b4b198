//! The CPU bodies of the op. Rows run in parallel (rayon); each row is read once by the forward
//! pass (online max / sum-exp) and once more by the backward pass, which writes the gradient.
//! The fused `forward_backward` runs both passes on a row back to back, while it is in cache.
//! Nothing of size \[B, C\] is allocated besides the gradient.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::config::{Head, MarginSoftmaxLoss};
use crate::host::{Rows, contiguous, read_targets, with_element};
use crate::math::{
    Acc, Cosine, Criterion, Element, Identity, Margin, RbfKernel, SoftCap, Transform,
    times_nonzero, weighted_smoothing,
};
use crate::op::{ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::prepare::{read_weights, upstream_factor, weight_of};

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
    transform: &'a H,
    cap: Option<SoftCap<A>>,
    weights: Option<&'a [A]>,
}

impl<A: Acc> Online<A> {
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
    fn absorb<T: Element<Acc = A>, H: Transform<A>>(
        &mut self,
        xs: &[T],
        first: usize,
        pass: &RowPass<'_, A, H>,
    ) {
        let scale = pass.scale;
        let mut v = [A::zero(); CHUNK];
        let mut z = [A::zero(); CHUNK];
        let mut w = [A::one(); CHUNK];
        for (c, chunk) in xs.chunks(CHUNK).enumerate() {
            for (i, x) in chunk.iter().enumerate() {
                v[i] = pass.transform.u(x.load());
                z[i] = scale * v[i];
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
                let start = first + c * CHUNK;
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
            let mut sum_exp = [A::zero(); LANES];
            let mut sum_exp_v = [A::zero(); LANES];
            let mut sum_wv = [A::zero(); LANES];
            if pass.weights.is_none() {
                for (eb, vb) in e.chunks_exact(LANES).zip(v.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        sum_exp[l] += eb[l];
                        // A masked logit: e = 0 and v = −∞ must add 0, not NaN.
                        sum_exp_v[l] += times_nonzero(eb[l], vb[l]);
                        sum_wv[l] += vb[l];
                    }
                }
            } else {
                for ((eb, vb), wb) in e
                    .chunks_exact(LANES)
                    .zip(v.chunks_exact(LANES))
                    .zip(w.chunks_exact(LANES))
                {
                    for l in 0..LANES {
                        sum_exp[l] += eb[l];
                        sum_exp_v[l] += times_nonzero(eb[l], vb[l]);
                        // A zero weight adds 0, also for a masked logit.
                        sum_wv[l] += times_nonzero(wb[l], vb[l]);
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
fn forward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    target: Option<usize>,
    weight: T::Acc,
    pass: &RowPass<'_, T::Acc, H>,
    margin: &Margin<T::Acc>,
    criterion: &Criterion<T::Acc>,
) -> [T::Acc; STAT_COLUMNS] {
    let zero = T::Acc::zero();
    let Some(y) = target else {
        return [zero; STAT_COLUMNS];
    };
    let scale = pass.scale;
    let (z_target, v_target, _) =
        target_logit(row[y].load(), scale, pass.transform, margin, &pass.cap);
    let mut online = Online::new(z_target);
    online.absorb(&row[..y], 0, pass);
    online.absorb(&row[y + 1..], y + 1, pass);
    let log_sum = online.sum_exp.ln();
    // Σ_j w_j·z_j, the target included (w_j = 1 unless the smoothing term reads the weights).
    let w_target = pass.weights.map_or(T::Acc::one(), |w| w[y]);
    let sum_wz_others = if pass.cap.is_some() {
        online.sum_wz
    } else {
        scale * online.sum_wv
    };
    let sum_wz = sum_wz_others + times_nonzero(w_target, z_target);
    let r = criterion.row(online.max, log_sum, z_target, sum_wz, weight);
    // dℓ/dr = Σ_j g_j·v_j, with Σ_{j≠y} p_j·v_j = sum_exp_v / sum_exp. A term with an exactly
    // zero coefficient adds 0: k = 0 without smoothing, while sum_wv = −∞ with a masked logit.
    let d_scale = times_nonzero(r.a, online.sum_exp_v / online.sum_exp)
        + times_nonzero(r.k, online.sum_wv)
        + times_nonzero(r.g_target, v_target);
    [
        r.loss, online.max, log_sum, weight, r.a, r.k, r.g_target, d_scale,
    ]
}

/// dx_j = (a·p_j + k·w_j)·c_j·r·du_j/dx_j for j ≠ y and g_y·c_y·r·du_y/dx_y, with
/// p_j = exp((z_j − M) − ln Σ), z_j = r·u_j (or cap·tanh(r·u_j/cap), whose derivative c_j =
/// sech²(r·u_j/cap); c_j = 1 without capping) and w_j = 1 unless the smoothing term reads the
/// class weights. `info` is [M, ln Σ, a, k, g_y, r] with the upstream gradient already folded
/// into a, k, g_y.
#[allow(clippy::too_many_arguments)]
fn backward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    out: &mut [T],
    target: Option<usize>,
    info: &[T::Acc],
    transform: &H,
    margin: &Margin<T::Acc>,
    cap: &Option<SoftCap<T::Acc>>,
    weights: Option<&[T::Acc]>,
) {
    let Some(y) = target else {
        out.fill(T::store(T::Acc::zero()));
        return;
    };
    let [max, log_sum, a, k, g_target, scale] =
        [info[0], info[1], info[2], info[3], info[4], info[5]];
    match (cap, weights) {
        (None, None) => {
            for (o, &x) in out.iter_mut().zip(row) {
                let x = x.load();
                let u = transform.u(x);
                let p = T::Acc::exp_flushed((scale * u - max) - log_sum);
                *o = T::store((a * p + k) * scale * transform.du(x, u));
            }
        }
        _ => {
            for (j, (o, &x)) in out.iter_mut().zip(row).enumerate() {
                let x = x.load();
                let u = transform.u(x);
                let (z, dz) = match cap {
                    Some(cap) => cap.apply(scale * u),
                    None => (scale * u, T::Acc::one()),
                };
                let p = T::Acc::exp_flushed((z - max) - log_sum);
                let w = weights.map_or(T::Acc::one(), |w| w[j]);
                *o = T::store((a * p + k * w) * dz * scale * transform.du(x, u));
            }
        }
    }
    let (_, _, dz_target) = target_logit(row[y].load(), scale, transform, margin, cap);
    out[y] = T::store(g_target * scale * dz_target);
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
    rows: Rows<'a, T>,
    targets: Vec<Option<usize>>,
    scales: &'a [T::Acc],
    weights: Option<Vec<T::Acc>>,
    /// Whether the smoothing term reads `weights` per class ([`weighted_smoothing`]).
    weighted_smoothing: bool,
    margin: Margin<T::Acc>,
    criterion: Criterion<T::Acc>,
    cap: Option<SoftCap<T::Acc>>,
}

impl<'a, T: Element> ForwardContext<'a, T> {
    fn new(
        cfg: &MarginSoftmaxLoss,
        x: (&'a CpuStorage, &Layout),
        targets: (&CpuStorage, &Layout),
        scale: (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let name = cfg.head.name();
        let rows = Rows::<T>::new(x.0, x.1, name)?;
        let classes = rows.classes;
        Ok(Self {
            targets: read_targets(targets.0, targets.1, cfg, classes)?,
            scales: contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?,
            weights: read_weights::<T::Acc>(cfg),
            weighted_smoothing: weighted_smoothing(cfg),
            margin: Margin::new(&cfg.head, cfg.margin_grad),
            criterion: Criterion::new(cfg, classes),
            cap: SoftCap::new(cfg),
            rows,
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

    /// Row i's statistics (see [`forward_row`]).
    fn stats<H: Transform<T::Acc>>(&self, i: usize, transform: &H) -> [T::Acc; STAT_COLUMNS] {
        let target = self.targets[i];
        let pass = RowPass {
            scale: self.scales[i],
            transform,
            cap: self.cap,
            weights: self.smoothing_weights(),
        };
        forward_row(
            self.rows.row(i),
            target,
            self.weight(target),
            &pass,
            &self.margin,
            &self.criterion,
        )
    }
}

/// The forward op: per-row statistics [B, STAT_COLUMNS] in the accumulation dtype.
pub(crate) fn forward(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    with_element!(x.0, cfg.head.name(), forward_typed(cfg, x, targets, scale))
}

fn forward_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let ctx = ForwardContext::<T>::new(cfg, x, targets, scale)?;
    let mut stats = vec![T::Acc::zero(); ctx.rows.rows * STAT_COLUMNS];
    with_transform!(cfg.head, T::Acc, |transform| {
        stats
            .par_chunks_mut(STAT_COLUMNS)
            .enumerate()
            .for_each(|(i, out)| out.copy_from_slice(&ctx.stats(i, &transform)))
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
    let mut grad = vec![T::store(T::Acc::zero()); rows.rows * rows.classes];
    with_transform!(cfg.head, T::Acc, |transform| {
        grad.par_chunks_mut(rows.classes)
            .enumerate()
            .for_each(|(i, out)| {
                let info = &info[i * ROWINFO_COLUMNS..(i + 1) * ROWINFO_COLUMNS];
                backward_row(
                    rows.row(i),
                    out,
                    targets[i],
                    info,
                    &transform,
                    &margin,
                    &cap,
                    weights.as_deref(),
                );
            })
    });
    Ok(T::to_cpu_storage_owned(grad))
}

/// Forward and backward together: (stats [B, STAT_COLUMNS], d(loss)/d(input) \[B, C\],
/// d(loss)/d(row scale) \[B\]), for the reduced loss when `mean` (Σ_i ℓ_i / Σ_i w_{y_i}), else for
/// Σ_i ℓ_i.
pub(crate) fn forward_backward(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    mean: bool,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    with_element!(
        x.0,
        cfg.head.name(),
        forward_backward_typed(cfg, x, targets, scale, mean)
    )
}

fn forward_backward_typed<T: Element>(
    cfg: &MarginSoftmaxLoss,
    x: (&CpuStorage, &Layout),
    targets: (&CpuStorage, &Layout),
    scale: (&CpuStorage, &Layout),
    mean: bool,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    let ctx = ForwardContext::<T>::new(cfg, x, targets, scale)?;
    let (rows, classes) = (ctx.rows.rows, ctx.rows.classes);
    let upstream = upstream_factor(&ctx.targets, &ctx.weights, mean);
    let mut stats = vec![T::Acc::zero(); rows * STAT_COLUMNS];
    let mut grad = vec![T::store(T::Acc::zero()); rows * classes];
    let mut grad_scale = vec![T::Acc::zero(); rows];
    with_transform!(cfg.head, T::Acc, |transform| {
        stats
            .par_chunks_mut(STAT_COLUMNS)
            .zip(grad.par_chunks_mut(classes))
            .zip(grad_scale.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((stat, out), d_scale))| {
                let s = ctx.stats(i, &transform);
                stat.copy_from_slice(&s);
                let [_, max, log_sum, _, a, k, g_target, ds] = s;
                let scale = ctx.scales[i];
                let info = [
                    max,
                    log_sum,
                    a * upstream,
                    k * upstream,
                    g_target * upstream,
                    scale,
                ];
                backward_row(
                    ctx.rows.row(i),
                    out,
                    ctx.targets[i],
                    &info,
                    &transform,
                    &ctx.margin,
                    &ctx.cap,
                    ctx.smoothing_weights(),
                );
                *d_scale = ds * upstream;
            })
    });
    Ok((
        T::Acc::to_cpu_storage_owned(stats),
        T::to_cpu_storage_owned(grad),
        T::Acc::to_cpu_storage_owned(grad_scale),
    ))
}
