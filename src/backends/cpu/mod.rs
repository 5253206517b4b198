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

pub(crate) mod alloc;
mod online;
mod rows;
pub(crate) mod simd;

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::Zero;
use rayon::prelude::*;

use crate::backends::cpu_storage::{HostElement, Rows, contiguous, contiguous_mut, read_targets};
use crate::backends::{Arg, Bodies, by_dtype};
use crate::config::{Head, MarginSoftmaxLoss};
use crate::layout::{
    PARTIAL_COLUMNS, ROW_PARAMS, ROWINFO_COLUMNS, STAT_COLUMNS, STAT_D_MARGINS,
    STAT_GRAD_CONSTANTS, stat_columns,
};
use crate::math::{
    Acc, Cosine, Criterion, Element, Identity, Margin, RbfKernel, SoftCap, Transform,
    times_nonzero, weighted_smoothing,
};
use crate::targets_and_weights::{read_weights, upstream_factor, weight_of};
use alloc::zeroed_buffer;
use online::{Online, RowCache, RowPass};
use rows::{
    BackwardKernel, ForwardContext, ForwardKernel, FusedKernel, PartialKernel, RowGrad, finish_row,
    target_logit, target_margin_grads, with_transform,
};
use simd::Dispatch;

/// A row task handed to rayon covers at least this many elements, so that small batches
/// (256 × 1000) are not cut into per-row tasks whose dispatch costs more than their work.
const MIN_ELEMENTS_PER_TASK: usize = 1 << 15;

/// Rows per rayon task for rows of `classes` entries.
fn rows_per_task(classes: usize) -> usize {
    MIN_ELEMENTS_PER_TASK.div_ceil(classes.max(1)).max(1)
}

/// The per-row parameters of a call: the row scale \[B\], or (r, m1, m2, m3) per row
/// ([B, `ROW_PARAMS`]) with per-row margins.
pub(super) struct RowParams<'a, A: Clone> {
    pub(super) scales: Cow<'a, [A]>,
    pub(super) margins: Option<Vec<[A; 3]>>,
}

impl<'a, A: Acc> RowParams<'a, A> {
    fn read(params: Arg<'a, CpuStorage>, name: &str) -> Result<Self> {
        let values = contiguous::<A>(params.0, params.1, "row parameters", name)?;
        if params.1.dims().len() < 2 {
            return Ok(Self {
                scales: Cow::Borrowed(values),
                margins: None,
            });
        }
        let (scales, margins) = split_row_params(values);
        Ok(Self {
            scales: Cow::Owned(scales),
            margins: Some(margins),
        })
    }

    fn fixed(scales: Vec<A>) -> Self {
        Self {
            scales: Cow::Owned(scales),
            margins: None,
        }
    }
}

/// Row parameters [B, `ROW_PARAMS`] (flat) split into the row scales and each row's
/// (m1, m2, m3).
pub(crate) fn split_row_params<A: Copy>(params: &[A]) -> (Vec<A>, Vec<[A; 3]>) {
    params
        .chunks_exact(ROW_PARAMS)
        .map(|p| (p[0], [p[1], p[2], p[3]]))
        .unzip()
}

/// The CPU bodies: rows in parallel (rayon), each row kernel at the SIMD level picked at run time.
pub(crate) struct Cpu;

impl<T: Element> Bodies<T, CpuStorage> for Cpu {
    fn takes_row_margins(&self) -> bool {
        true
    }

    /// With per-row margins, the statistics carry dℓ/d(m1, m2, m3) in three more columns
    /// ([B, `STAT_COLUMNS_ROW_MARGINS`]).
    fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        scale: Arg<CpuStorage>,
        scale_grad: bool,
    ) -> Result<CpuStorage> {
        let name = cfg.head.name();
        let rows = Rows::<T>::new(x.0, x.1, name)?;
        let params = RowParams::read(scale, name)?;
        let columns = stat_columns(params.margins.is_some());
        let ctx =
            ForwardContext::<T>::new(cfg, (rows.rows, rows.classes), targets, params, scale_grad)?;
        let simd = Dispatch::current();
        let mut stats = vec![T::Acc::zero(); rows.rows * columns];
        with_transform!(cfg.head, T::Acc, |transform| {
            stats
                .par_chunks_mut(columns)
                .with_min_len(rows_per_task(rows.classes))
                .enumerate()
                .for_each(|(i, out)| {
                    let kernel = ForwardKernel {
                        ctx: &ctx,
                        row: rows.row(i),
                        i,
                        transform: &transform,
                    };
                    let s = simd.run(kernel);
                    out[..STAT_COLUMNS].copy_from_slice(&s);
                    if ctx.row_margins.is_some() {
                        let x_target = ctx.targets[i].map(|y| rows.row(i)[y].load());
                        out[STAT_D_MARGINS..]
                            .copy_from_slice(&ctx.margin_grads(i, x_target, &transform, s[6]));
                    }
                })
        });
        Ok(T::Acc::to_cpu_storage_owned(stats))
    }

    fn backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        row_info: Arg<CpuStorage>,
    ) -> Result<CpuStorage> {
        let name = cfg.head.name();
        let rows = Rows::<T>::new(x.0, x.1, name)?;
        let targets = read_targets(targets.0, targets.1, cfg, rows.classes)?;
        let info = contiguous::<T::Acc>(row_info.0, row_info.1, "row info", name)?;
        let width = row_info.1.dims().get(1).copied().unwrap_or(ROWINFO_COLUMNS);
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
                    let info = &info[i * width..(i + 1) * width];
                    let margin = match info.get(ROWINFO_COLUMNS..) {
                        Some(&[m1, m2, m3]) => margin.for_row([m1, m2, m3]),
                        _ => margin,
                    };
                    let kernel = BackwardKernel {
                        row: rows.row(i),
                        out,
                        target: targets[i],
                        grad: RowGrad::of(info),
                        transform: &transform,
                        margin,
                        cap: &cap,
                        weights: weights.as_deref(),
                    };
                    simd.run(kernel)
                })
        });
        Ok(T::to_cpu_storage_owned(grad))
    }

    fn forward_backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        targets: Arg<CpuStorage>,
        scale: Arg<CpuStorage>,
        mean: bool,
        scale_grad: bool,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        let name = cfg.head.name();
        let rows = Rows::<T>::new(x.0, x.1, name)?;
        let params = RowParams::read(scale, name)?;
        let ctx =
            ForwardContext::<T>::new(cfg, (rows.rows, rows.classes), targets, params, scale_grad)?;
        let mut grad = zeroed_buffer::<T>(rows.rows * rows.classes);
        let (stats, grad_scale) = fused_rows(cfg, &ctx, FusedInput::Rows(&rows), &mut grad, mean);
        // With per-row margins, the row parameters' gradient [B, ROW_PARAMS]: (dℓ/dr,
        // dℓ/d(m1, m2, m3)), the upstream factor folded in as in dℓ/dr.
        let grad_params = match &ctx.row_margins {
            None => grad_scale,
            Some(_) => {
                let upstream = upstream_factor(&ctx.targets, &ctx.weights, mean);
                let mut out = Vec::with_capacity(rows.rows * ROW_PARAMS);
                with_transform!(cfg.head, T::Acc, |transform| {
                    for i in 0..rows.rows {
                        let x_target = ctx.targets[i].map(|y| rows.row(i)[y].load());
                        let g_target = stats[i * STAT_COLUMNS + STAT_GRAD_CONSTANTS + 2];
                        let d = ctx.margin_grads(i, x_target, &transform, g_target);
                        out.push(grad_scale[i]);
                        out.extend(d.map(|d| d * upstream));
                    }
                });
                out
            }
        };
        Ok((
            T::Acc::to_cpu_storage_owned(stats),
            T::to_cpu_storage_owned(grad),
            T::Acc::to_cpu_storage_owned(grad_params),
        ))
    }

    /// One state per row: the split count is 1.
    fn slice_partials(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<CpuStorage>,
        local_targets: &[i64],
        scale: Arg<CpuStorage>,
        scale_grad: bool,
    ) -> Result<(CpuStorage, usize)> {
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
        let mut out = vec![T::Acc::zero(); rows.rows * PARTIAL_COLUMNS];
        with_transform!(cfg.head, T::Acc, |transform| {
            out.par_chunks_mut(PARTIAL_COLUMNS)
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
        Ok((T::Acc::to_cpu_storage_owned(out), 1))
    }
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
    by_dtype!(grad.0.dtype(), cfg, T => forward_backward_into_typed::<T>(cfg, grad, input, targets, mean))
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
    let ctx = ForwardContext::<T>::new(
        cfg,
        (rows, classes),
        targets,
        RowParams::fixed(scales),
        false,
    )?;
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

/// Merges the slices' states of each row in the order given (`parts[k]` is slice k's
/// [B, PARTIAL_COLUMNS]), the same order on every caller, so that every rank of a sharded loss
/// gets the same bits.
pub(crate) fn merge_partials<A: Acc>(parts: &[Vec<A>], rows: usize) -> Vec<A> {
    let mut out = Vec::with_capacity(rows * PARTIAL_COLUMNS);
    for i in 0..rows {
        let at = |k: usize| {
            Online::of_partial(&parts[k][i * PARTIAL_COLUMNS..(i + 1) * PARTIAL_COLUMNS])
        };
        let mut state = Online::empty();
        for k in 0..parts.len() {
            state = state.merge(&at(k));
        }
        out.extend_from_slice(&state.to_partial());
    }
    out
}

/// The statistics [B, STAT_COLUMNS] (with per-row `margins`, [B, STAT_COLUMNS_ROW_MARGINS]:
/// dℓ/d(m1, m2, m3) after them) of whole rows from their non-target entries' merged state
/// `others` [B, PARTIAL_COLUMNS] and each target's input `target_inputs` [B] (the forward op's
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
    margins: Option<&[[A; 3]]>,
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
    let columns = stat_columns(margins.is_some());
    let mut out = vec![A::zero(); targets.len() * columns];
    with_transform!(cfg.head, A, |transform| {
        for (i, (o, &target)) in out.chunks_mut(columns).zip(targets).enumerate() {
            let Some(y) = target else { continue };
            let margin = margins.map_or(margin, |m| margin.for_row(m[i]));
            let pass = RowPass {
                scale: scales[i],
                scale_grad,
                transform: &transform,
                cap,
                weights: smoothing,
            };
            let (z_target, v_target, _) =
                target_logit(target_inputs[i], scales[i], &transform, &margin, &cap);
            let rest = Online::of_partial(&others[i * PARTIAL_COLUMNS..(i + 1) * PARTIAL_COLUMNS]);
            let online = Online::new(z_target).merge(&rest);
            let w_target = smoothing.map_or(A::one(), |w| w[y]);
            let stats = finish_row(
                &online,
                (z_target, v_target, w_target),
                weight_of(&weights, y),
                &pass,
                &criterion,
            );
            o[..STAT_COLUMNS].copy_from_slice(&stats);
            if margins.is_some() {
                let d = target_margin_grads(target_inputs[i], scales[i], &transform, &margin, &cap);
                let g_target = stats[STAT_GRAD_CONSTANTS + 2];
                o[STAT_D_MARGINS..].copy_from_slice(&d.map(|d| times_nonzero(g_target, d)));
            }
        }
    });
    out
}
