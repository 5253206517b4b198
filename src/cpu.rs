//! The CPU bodies of the op. Rows run in parallel (rayon); each row is read once by the forward
//! pass (online max / sum-exp) and once more by the backward pass, which writes the gradient.
//! The fused `forward_backward` runs both passes on a row back to back, while it is in cache.
//! Nothing of size [B, C] is allocated besides the gradient.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::{Float, Zero};
use rayon::prelude::*;

use crate::config::{Head, MarginSoftmaxLoss};
use crate::host::{Rows, contiguous, read_targets, with_element};
use crate::math::{
    Acc, Cosine, Criterion, Element, Identity, Margin, RbfKernel, Transform, times_nonzero,
};
use crate::op::{ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::prepare::{read_weights, upstream_factor, weight_of};

/// How many elements the online max / sum-exp takes per step: the chunk's logits are formed
/// first, so the running max is rescaled at most once per chunk and the exps are independent.
const CHUNK: usize = 64;
/// Independent partial sums per chunk (a multiple of any SIMD width in use).
const LANES: usize = 8;

/// The running state of the online log-sum-exp over a row's non-target entries, seeded with the
/// target logit.
struct Online<A> {
    max: A,
    /// Σ exp(z_j − max) over every entry seen, the target included.
    sum_exp: A,
    /// Σ exp(z_j − max)·u_j over the non-target entries (for the row-scale gradient).
    sum_exp_u: A,
    /// Σ u_j over the non-target entries (for Σ z and the row-scale gradient).
    sum_u: A,
}

impl<A: Acc> Online<A> {
    fn new(z_target: A) -> Self {
        Self {
            max: z_target,
            sum_exp: A::one(),
            sum_exp_u: A::zero(),
            sum_u: A::zero(),
        }
    }

    /// Absorbs entries in chunks of [`CHUNK`]: the chunk's logits first (the tail padded with
    /// z = −∞, u = 0, which add nothing), then one rescale of the running sums at most, then
    /// the exps, summed in [`LANES`] independent partial sums so that the loops vectorize.
    fn absorb<T: Element<Acc = A>, H: Transform<A>>(&mut self, xs: &[T], scale: A, transform: &H) {
        let mut u = [A::zero(); CHUNK];
        let mut z = [A::zero(); CHUNK];
        for chunk in xs.chunks(CHUNK) {
            for (i, x) in chunk.iter().enumerate() {
                u[i] = transform.u(x.load());
                z[i] = scale * u[i];
            }
            for i in chunk.len()..CHUNK {
                u[i] = A::zero();
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
                self.sum_exp_u *= rescale;
                self.max = chunk_max;
            }
            let max = self.max;
            // The exps in a loop of their own: inside the lane loop below LLVM keeps them scalar.
            let mut e = [A::zero(); CHUNK];
            for (ei, &zi) in e.iter_mut().zip(z.iter()) {
                *ei = A::exp_flushed(zi - max);
            }
            let mut sum_exp = [A::zero(); LANES];
            let mut sum_exp_u = [A::zero(); LANES];
            let mut sum_u = [A::zero(); LANES];
            for (eb, ub) in e.chunks_exact(LANES).zip(u.chunks_exact(LANES)) {
                for l in 0..LANES {
                    sum_exp[l] += eb[l];
                    // A masked logit: e = 0 and u = −∞ must add 0, not NaN.
                    sum_exp_u[l] += times_nonzero(eb[l], ub[l]);
                    sum_u[l] += ub[l];
                }
            }
            let total = |lanes: [A; LANES]| lanes.iter().fold(A::zero(), |acc, &v| acc + v);
            self.sum_exp += total(sum_exp);
            self.sum_exp_u += total(sum_exp_u);
            self.sum_u += total(sum_u);
        }
    }
}

/// Everything a row's backward pass (and the caller) needs, in the order of the op's stats
/// columns (see [`crate::op`]).
fn forward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    target: Option<usize>,
    scale: T::Acc,
    weight: T::Acc,
    transform: &H,
    margin: &Margin<T::Acc>,
    criterion: &Criterion<T::Acc>,
) -> [T::Acc; STAT_COLUMNS] {
    let zero = T::Acc::zero();
    let Some(y) = target else {
        return [zero; STAT_COLUMNS];
    };
    let (u_target, _) = margin.target(transform, row[y].load());
    let z_target = scale * u_target;
    let mut online = Online::new(z_target);
    online.absorb(&row[..y], scale, transform);
    online.absorb(&row[y + 1..], scale, transform);
    let log_sum = online.sum_exp.ln();
    let sum_z = scale * (online.sum_u + u_target);
    let r = criterion.row(online.max, log_sum, z_target, sum_z, weight);
    // dℓ/dr = Σ_j g_j·u_j, with Σ_{j≠y} p_j·u_j = sum_exp_u / sum_exp. A term with an exactly
    // zero coefficient adds 0: k = 0 without smoothing, while sum_u = −∞ with a masked logit.
    let d_scale = times_nonzero(r.a, online.sum_exp_u / online.sum_exp)
        + times_nonzero(r.k, online.sum_u)
        + times_nonzero(r.g_target, u_target);
    [
        r.loss, online.max, log_sum, weight, r.a, r.k, r.g_target, d_scale,
    ]
}

/// dx_j = (a·p_j + k)·r·du_j/dx_j for j ≠ y and g_y·r·du_y/dx_y, with
/// p_j = exp((r·u_j − M) − ln Σ). `info` is [M, ln Σ, a, k, g_y, r] with the upstream gradient
/// already folded into a, k, g_y.
fn backward_row<T: Element, H: Transform<T::Acc>>(
    row: &[T],
    out: &mut [T],
    target: Option<usize>,
    info: &[T::Acc],
    transform: &H,
    margin: &Margin<T::Acc>,
) {
    let Some(y) = target else {
        out.fill(T::store(T::Acc::zero()));
        return;
    };
    let [max, log_sum, a, k, g_target, scale] =
        [info[0], info[1], info[2], info[3], info[4], info[5]];
    for (o, &x) in out.iter_mut().zip(row) {
        let x = x.load();
        let u = transform.u(x);
        let p = T::Acc::exp_flushed((scale * u - max) - log_sum);
        *o = T::store((a * p + k) * scale * transform.du(x, u));
    }
    let (_, du_target) = margin.target(transform, row[y].load());
    out[y] = T::store(g_target * scale * du_target);
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
    margin: Margin<T::Acc>,
    criterion: Criterion<T::Acc>,
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
            weights: read_weights::<T::Acc>(cfg)?,
            margin: Margin::new(&cfg.head, cfg.margin_grad),
            criterion: Criterion::new(cfg, classes),
            rows,
        })
    }

    fn weight(&self, target: Option<usize>) -> T::Acc {
        target.map_or(T::Acc::zero(), |y| weight_of(&self.weights, y))
    }

    /// Row i's statistics (see [`forward_row`]).
    fn stats<H: Transform<T::Acc>>(&self, i: usize, transform: &H) -> [T::Acc; STAT_COLUMNS] {
        let target = self.targets[i];
        forward_row(
            self.rows.row(i),
            target,
            self.scales[i],
            self.weight(target),
            transform,
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

/// The backward op: d(loss)/d(input) [B, C] in the input dtype, from the input, the targets and
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
    let mut grad = vec![T::store(T::Acc::zero()); rows.rows * rows.classes];
    with_transform!(cfg.head, T::Acc, |transform| {
        grad.par_chunks_mut(rows.classes)
            .enumerate()
            .for_each(|(i, out)| {
                let info = &info[i * ROWINFO_COLUMNS..(i + 1) * ROWINFO_COLUMNS];
                backward_row(rows.row(i), out, targets[i], info, &transform, &margin);
            })
    });
    Ok(T::to_cpu_storage_owned(grad))
}

/// Forward and backward together: (stats [B, STAT_COLUMNS], d(loss)/d(input) [B, C],
/// d(loss)/d(row scale) [B]), for the reduced loss when `mean` (Σ_i ℓ_i / Σ_i w_{y_i}), else for
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
