//! One evaluation of a head's loss ([`HeadBatch`]): what the two passes over W read (the
//! classes' W, the embeddings in the form the scores use, the per-row and per-class constants,
//! the chunking, the shard), the scores of one slice, and the passes themselves.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::form::{Form, form_of, row_norms};
use super::partial_fc::Sample;
use crate::config::{ClassWeights, MarginSoftmaxLoss, Reduction, accumulation_dtype};
use crate::layout::{STAT_D_MARGINS, STAT_D_SCALE};
use crate::loss::{check_inputs, reduce};
use crate::op;
use crate::shard::{
    ClassShard, Communicator, all_reduce_sum, exchange_states, local_targets, row_info,
    slice_gradient, slice_weights,
};
use crate::targets_and_weights::upstream_factor;

/// How many scores a chunk holds by default: B × (classes per slice), 2²¹ (8 MiB of f32).
pub const DEFAULT_CHUNK_SCORES: usize = 1 << 21;

/// What one evaluation reads of a head: its loss configuration, parameters and settings.
pub(super) struct HeadParts<'a> {
    pub(super) loss: &'a MarginSoftmaxLoss,
    pub(super) weight: &'a Tensor,
    pub(super) bias: Option<&'a Tensor>,
    pub(super) feature_norm_scale: bool,
    pub(super) eps: f64,
    pub(super) chunk_classes: Option<usize>,
    /// Sub-center ArcFace's K: W's rows j·K .. (j + 1)·K are class j's sub-centers.
    pub(super) sub_centers: usize,
}

/// One evaluation of the loss: the (sampled) classes' W, the embeddings in the form the scores
/// use, the per-row and per-class constants, and the chunking.
pub(super) struct HeadBatch {
    /// The loss configuration for these classes, reading targets as i64 with −1 for ignored rows.
    pub(super) cfg: MarginSoftmaxLoss,
    pub(super) form: Form,
    /// W's dtype (the gradients' dtype).
    pub(super) dtype: DType,
    /// The dtype everything is computed in: f32 for f16 / bf16 weights (W is converted a slice at
    /// a time), else W's.
    pub(super) acc: DType,
    /// Embeddings as the scores read them, in `acc`: f̂ for the cosine heads, f otherwise.
    pub(super) features: Tensor,
    /// The raw embeddings in the accumulation dtype (for the backward of the normalization).
    pub(super) raw: Tensor,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    /// In `acc`: for the cosine heads n_j = 1/max(‖W_j‖, ε); RBF: ‖W_j‖².
    pub(super) per_class: Option<Tensor>,
    /// Cosine heads: n_j²·[‖W_j‖ > ε] in the accumulation dtype.
    pub(super) per_class_acc: Option<Tensor>,
    /// RBF: ‖f_i‖² \[B, 1\].
    pub(super) per_row: Option<Tensor>,
    /// The row scale r \[B\] (accumulation dtype).
    pub(super) scale: Tensor,
    /// Per-row margins (m1, m2, m3) [B, 3] (accumulation dtype), replacing the head's.
    pub(super) margins: Option<Tensor>,
    /// Sub-center ArcFace's K (1: one centre per class).
    pub(super) sub_centers: usize,
    pub(super) scale_grad: bool,
    pub(super) targets: Vec<Option<usize>>,
    pub(super) targets_tensor: Tensor,
    pub(super) eps: f64,
    pub(super) slice_classes: usize,
    /// Partial FC: the sampled classes (u32 \[C'\]) and C.
    pub(super) sampled: Option<(Tensor, usize)>,
    /// The classes of the whole problem: W's rows, or all shards' classes when sharded.
    pub(super) total_classes: usize,
    /// Sharded: this rank's classes and the ranks' communicator.
    pub(super) sharding: Option<Sharding>,
}

/// A sharded loss's shard and communicator, and the op's name for its errors.
#[derive(Clone)]
pub(super) struct Sharding {
    pub(super) shard: ClassShard,
    pub(super) comm: Arc<dyn Communicator>,
    pub(super) op: String,
}

impl HeadBatch {
    pub(super) fn new(
        head: HeadParts<'_>,
        embeddings: &Tensor,
        targets: Vec<Option<usize>>,
        sample: Option<Sample>,
        sharding: Option<Sharding>,
        margins: Option<Tensor>,
    ) -> Result<Self> {
        let dev = head.weight.device().clone();
        let dtype = head.weight.dtype();
        let acc = accumulation_dtype(dtype);
        let form = form_of(&head.loss.head);
        let mut cfg = head
            .loss
            .clone()
            .ignore_index(Some(-1))
            .check_targets(false);
        let (weight, bias, targets, sampled) = match sample {
            Some(s) => {
                let index = Tensor::from_vec(s.classes.clone(), s.classes.len(), &dev)?;
                if let Some(w) = &head.loss.class_weights {
                    let values: Vec<f64> =
                        s.classes.iter().map(|&j| w.values()[j as usize]).collect();
                    let n = values.len();
                    cfg.class_weights =
                        Some(ClassWeights::new(&Tensor::from_vec(values, n, &dev)?)?);
                }
                (
                    head.weight.detach().index_select(&index, 0)?,
                    match &head.bias {
                        Some(b) => Some(b.detach().index_select(&index, 0)?),
                        None => None,
                    },
                    s.targets,
                    Some((index, head.weight.dim(0)?)),
                )
            }
            None => (
                head.weight.detach(),
                head.bias.as_ref().map(|b| b.detach()),
                targets,
                None,
            ),
        };
        let sub_centers = head.sub_centers;
        let classes = weight.dim(0)? / sub_centers;
        let rows = embeddings.dim(0)?;
        let raw = embeddings.detach().to_dtype(acc)?;
        let eps = head.eps;
        let (features, per_class, per_class_acc, per_row) = match form {
            Form::Cosine => {
                let norm = row_norms(&raw)?.maximum(eps)?;
                let features = raw.broadcast_div(&norm)?;
                let (inv, inv_sq) = per_class_norms(&weight, eps, acc)?;
                (features, Some(inv), Some(inv_sq), None)
            }
            Form::Rbf => {
                let sq = class_sq_norms(&weight, acc)?;
                let f2 = raw.sqr()?.sum_keepdim(1)?;
                (raw.clone(), Some(sq), None, Some(f2))
            }
            Form::Linear => (raw.clone(), None, None, None),
        };
        let bias = match bias {
            Some(b) => Some(b.to_dtype(acc)?),
            None => None,
        };
        let scale = if head.feature_norm_scale {
            row_norms(&raw)?.squeeze(1)?
        } else {
            Tensor::full(head.loss.head.scale(), rows, &dev)?.to_dtype(acc)?
        };
        let total_classes = sharding.as_ref().map_or(classes, |s| s.shard.total);
        let index: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |y| y as i64)).collect();
        let targets_tensor = Tensor::from_vec(index, rows, &dev)?;
        let slice_classes = head
            .chunk_classes
            .unwrap_or((DEFAULT_CHUNK_SCORES / (rows * sub_centers).max(1)).max(1))
            .min(classes);
        Ok(Self {
            cfg,
            form,
            dtype,
            acc,
            features,
            raw,
            weight,
            bias,
            per_class,
            per_class_acc,
            per_row,
            scale,
            margins,
            sub_centers,
            scale_grad: head.feature_norm_scale,
            targets,
            targets_tensor,
            eps,
            slice_classes,
            sampled,
            total_classes,
            sharding,
        })
    }

    /// The op's row parameters: the row scale \[B\], or (r, m1, m2, m3) [B, 4] with per-row
    /// margins.
    pub(super) fn row_params(&self) -> Result<Tensor> {
        match &self.margins {
            Some(m) => Tensor::cat(&[&self.scale.unsqueeze(1)?, m], 1)?.contiguous(),
            None => Ok(self.scale.clone()),
        }
    }

    pub(super) fn rows(&self) -> usize {
        self.targets.len()
    }

    pub(super) fn classes(&self) -> usize {
        self.weight.dims()[0] / self.sub_centers
    }

    /// The scores of the classes [c0, c0 + c) for every row, [B, c]: with sub-centers the
    /// largest of each class's K sub-center cosines (Sub-center ArcFace), and the sub-center
    /// cosines [B, c·K] themselves, which the gradient pass needs.
    pub(super) fn class_scores(&self, c0: usize, c: usize) -> Result<(Tensor, Option<Tensor>)> {
        let rows = self.rows();
        let k = self.sub_centers;
        if k == 1 {
            return Ok((self.scores((0, rows), (c0, c))?, None));
        }
        let sub = self.scores((0, rows), (c0 * k, c * k))?;
        let best = sub.reshape((rows, c, k))?.max(2)?;
        Ok((best, Some(sub)))
    }

    /// Adds a slice's gradient δ [B, c] of the class scores to `sums`: with sub-centers, δ goes
    /// to each class's arg-max sub-center (the first on a tie) and the others get 0.
    pub(super) fn add_slice(
        &self,
        sums: &mut SliceSums,
        c0: usize,
        (scores, sub): (&Tensor, Option<&Tensor>),
        delta: &Tensor,
    ) -> Result<()> {
        let Some(sub) = sub else {
            return sums.add(self, c0, scores, delta);
        };
        let (rows, c) = delta.dims2()?;
        let k = self.sub_centers;
        let best = sub.reshape((rows, c, k))?.argmax_keepdim(2)?;
        let which = Tensor::arange(0u32, k as u32, sub.device())?.reshape((1, 1, k))?;
        let routed = which
            .broadcast_eq(&best)?
            .to_dtype(delta.dtype())?
            .broadcast_mul(&delta.unsqueeze(2)?)?
            .reshape((rows, c * k))?;
        sums.add(self, c0 * k, sub, &routed)
    }

    /// W's rows [c0, c0 + c) in the compute dtype (a view for f32 / f64, a converted copy of
    /// the slice only for f16 / bf16).
    pub(super) fn weight_slice(&self, c0: usize, c: usize) -> Result<Tensor> {
        self.weight.narrow(0, c0, c)?.to_dtype(self.acc)
    }

    /// The scores x_ij \[rows, cols\] of the module docs' table, in the compute dtype. For a
    /// half-precision W, the product is formed a slice of classes at a time, so that W is never
    /// converted whole.
    pub(super) fn scores(&self, rows: (usize, usize), cols: (usize, usize)) -> Result<Tensor> {
        let f = self.features.narrow(0, rows.0, rows.1)?;
        let product = if self.dtype == self.acc || cols.1 <= self.slice_classes {
            f.matmul(&self.weight_slice(cols.0, cols.1)?.t()?)?
        } else {
            let mut parts = Vec::new();
            let mut c0 = cols.0;
            while c0 < cols.0 + cols.1 {
                let c = self.slice_classes.min(cols.0 + cols.1 - c0);
                parts.push(f.matmul(&self.weight_slice(c0, c)?.t()?)?);
                c0 += c;
            }
            Tensor::cat(&parts, 1)?
        };
        let column = |t: &Option<Tensor>| -> Result<Tensor> {
            t.as_ref()
                .expect("per-class constants of this form")
                .narrow(0, cols.0, cols.1)?
                .unsqueeze(0)
        };
        match self.form {
            Form::Cosine => product.broadcast_mul(&column(&self.per_class)?),
            Form::Rbf => {
                let f2 = self
                    .per_row
                    .as_ref()
                    .expect("RBF keeps ‖f‖²")
                    .narrow(0, rows.0, rows.1)?;
                (product * -2.0)?
                    .broadcast_add(&f2)?
                    .broadcast_add(&column(&self.per_class)?)
            }
            Form::Linear => match &self.bias {
                Some(_) => product.broadcast_add(&column(&self.bias)?),
                None => Ok(product),
            },
        }
    }

    /// Each row's target as a column of the slice [c0, c0 + c) of this W: −1 for an ignored
    /// row, `c` (no column) for a target in another slice or on another rank.
    pub(super) fn local_targets(&self, c0: usize, c: usize) -> Vec<i64> {
        local_targets(&self.targets, self.class_offset() + c0, c)
    }

    pub(super) fn class_offset(&self) -> usize {
        self.sharding.as_ref().map_or(0, |s| s.shard.offset)
    }

    /// The configuration over the slice [c0, c0 + c) of this W: its class weights, and one more
    /// (1) for the padding column of the gradient pass when `pad`.
    pub(super) fn slice_config(&self, c0: usize, c: usize, pad: bool) -> Result<MarginSoftmaxLoss> {
        slice_weights(
            &self.cfg,
            self.class_offset() + c0,
            c,
            pad,
            self.weight.device(),
        )
    }

    /// The statistics pass, or the whole computation in one fused pass when one slice covers
    /// every class, the loss is reduced and not sharded.
    pub(super) fn first_pass(&self, need_grads: bool) -> Result<FirstPass> {
        let classes = self.classes();
        if need_grads
            && self.slice_classes >= classes
            && self.cfg.reduction != Reduction::None
            && self.sharding.is_none()
        {
            let (scores, sub) = self.class_scores(0, classes)?;
            check_inputs(&self.cfg, &scores, &self.targets_tensor, Some(&self.scale))?;
            let (loss, grad, grad_params) = self.cfg.loss_and_grad_impl(
                &scores,
                &self.targets_tensor,
                &self.row_params()?,
                self.scale_grad,
            )?;
            // With per-row margins the row parameters' gradient is [B, 4]: (dℓ/dr, dℓ/dm).
            let (grad_scale, grad_margins) = match &self.margins {
                Some(_) => (
                    grad_params.narrow(1, 0, 1)?.squeeze(1)?,
                    Some(grad_params.narrow(1, 1, 3)?),
                ),
                None => (grad_params, None),
            };
            let mut acc = SliceSums::new(self)?;
            self.add_slice(&mut acc, 0, (&scores, sub.as_ref()), &grad)?;
            let mut grads = acc.finish(self, self.scale_grad.then_some(&grad_scale))?;
            grads.margins = grad_margins;
            return Ok(FirstPass::Fused { loss, grads });
        }
        let stats = self.statistics()?;
        let loss = reduce(self.cfg.reduction, &stats)?;
        Ok(FirstPass::Stats { stats, loss })
    }

    /// The op's statistics of the whole rows [B, STAT_COLUMNS]: each slice of classes reduced to
    /// its online state by the op, the states merged in slice order (and, sharded, gathered and
    /// merged in rank order), and the criterion applied.
    pub(super) fn statistics(&self) -> Result<Tensor> {
        let (rows, classes) = (self.rows(), self.classes());
        let dev = self.weight.device();
        let mut parts = Vec::new();
        let mut target_inputs = Tensor::zeros(rows, self.acc, dev)?;
        let mut owned = vec![0u8; rows];
        let mut c0 = 0;
        while c0 < classes {
            let c = self.slice_classes.min(classes - c0);
            let (scores, _) = self.class_scores(c0, c)?;
            let local = self.local_targets(c0, c);
            target_inputs = op::pick_target_inputs(&scores, &local, &target_inputs, &mut owned)?;
            let cfg = self.slice_config(c0, c, false)?;
            parts.push(op::slice_partials(
                &cfg,
                &scores,
                local,
                &self.scale,
                self.scale_grad,
            )?);
            c0 += c;
        }
        let mut merged = op::merge_partials(&parts)?;
        if let Some(sharding) = &self.sharding {
            (merged, target_inputs) = exchange_states(
                &sharding.op,
                sharding.comm.as_ref(),
                &merged,
                &target_inputs,
                owned,
            )?;
        }
        op::finalize(
            &self.cfg,
            self.total_classes,
            &self.targets,
            &merged,
            &target_inputs,
            &self.row_params()?,
            self.scale_grad,
        )
    }

    /// The per-row factor folded into the gradient: `upstream` (the autograd gradient of a
    /// per-row loss) or, for a reduced loss, 1/Σ w_y for the mean and 1 for the sum.
    pub(super) fn row_upstream(&self, upstream: Option<&Tensor>) -> Result<Tensor> {
        match upstream {
            Some(g) => g
                .to_dtype(self.acc)?
                .broadcast_as(self.rows())?
                .contiguous(),
            None => {
                let weights: Option<Vec<f64>> =
                    self.cfg.class_weights.as_ref().map(|w| w.values().to_vec());
                let factor = upstream_factor::<f64>(
                    &self.targets,
                    &weights,
                    self.cfg.reduction == Reduction::Mean,
                );
                Tensor::full(factor, self.rows(), self.weight.device())?.to_dtype(self.acc)
            }
        }
    }

    /// The gradient pass: slices of classes, each recomputing its scores and taking their
    /// gradient from the row statistics.
    pub(super) fn second_pass(&self, stats: &Tensor, upstream: &Tensor) -> Result<Gradients> {
        let classes = self.classes();
        let row_info = row_info(stats, upstream, &self.row_params()?)?;
        let mut sums = SliceSums::new(self)?;
        let mut c0 = 0;
        while c0 < classes {
            let c = self.slice_classes.min(classes - c0);
            let (scores, sub) = self.class_scores(c0, c)?;
            let cfg = self.slice_config(c0, c, true)?;
            let local = self.local_targets(c0, c);
            let grad = slice_gradient(&cfg, &scores, &local, &row_info)?;
            self.add_slice(&mut sums, c0, (&scores, sub.as_ref()), &grad)?;
            c0 += c;
        }
        let d_scale = if self.scale_grad {
            Some(
                stats
                    .narrow(1, STAT_D_SCALE, 1)?
                    .squeeze(1)?
                    .mul(upstream)?,
            )
        } else {
            None
        };
        let mut grads = sums.finish(self, d_scale.as_ref())?;
        if self.margins.is_some() {
            let d = stats.narrow(1, STAT_D_MARGINS, 3)?;
            grads.margins = Some(d.broadcast_mul(&upstream.unsqueeze(1)?)?);
        }
        Ok(grads)
    }
}

/// n_j = 1/max(‖W_j‖, ε) and n_j²·[‖W_j‖ > ε], computed a slice of classes at a time so that no
/// \[C, D\] temporary is formed.
pub(super) fn per_class_norms(weight: &Tensor, eps: f64, acc: DType) -> Result<(Tensor, Tensor)> {
    let norm = class_norms(weight, acc)?;
    let inv = norm.maximum(eps)?.recip()?;
    let mask = norm.gt(eps)?.to_dtype(acc)?;
    let inv_sq = inv.sqr()?.mul(&mask)?;
    Ok((inv, inv_sq))
}

/// ‖W_j‖ \[C\] in `acc` without overflow ([`row_norms`]), a slice of classes at a time.
fn class_norms(weight: &Tensor, acc: DType) -> Result<Tensor> {
    per_class_slices(weight, acc, |w| row_norms(w)?.squeeze(1))
}

/// ‖W_j‖² \[C\] in `acc`, a slice of classes at a time.
pub(super) fn class_sq_norms(weight: &Tensor, acc: DType) -> Result<Tensor> {
    per_class_slices(weight, acc, |w| w.sqr()?.sum(1))
}

/// `per_row` \[c\] of W's rows converted to `acc` a slice at a time (no \[C, D\] temporary),
/// concatenated into \[C\].
fn per_class_slices(
    weight: &Tensor,
    acc: DType,
    per_row: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let classes = weight.dim(0)?;
    let step = (DEFAULT_CHUNK_SCORES / weight.dim(1)?.max(1)).max(1);
    let mut parts = Vec::new();
    let mut c0 = 0;
    while c0 < classes {
        let c = step.min(classes - c0);
        parts.push(per_row(&weight.narrow(0, c0, c)?.to_dtype(acc)?)?);
        c0 += c;
    }
    Tensor::cat(&parts, 0)
}

/// What the gradient pass accumulates: d(loss)/d(features) over slices, and W's (and the bias's)
/// gradient written a slice at a time.
pub(super) struct SliceSums {
    pub(super) features: Tensor,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
}

impl SliceSums {
    pub(super) fn new(p: &HeadBatch) -> Result<Self> {
        let dev = p.weight.device();
        Ok(Self {
            features: Tensor::zeros(p.features.dims(), p.acc, dev)?,
            weight: Tensor::zeros(p.weight.dims(), p.dtype, dev)?,
            bias: match &p.bias {
                Some(b) => Some(Tensor::zeros(b.dims(), p.dtype, dev)?),
                None => None,
            },
        })
    }

    /// Adds the slice of classes [c0, c0 + c) with scores x and δ = d(loss)/dx, both \[B, c\] in
    /// the compute dtype.
    pub(super) fn add(
        &mut self,
        p: &HeadBatch,
        c0: usize,
        x: &Tensor,
        delta: &Tensor,
    ) -> Result<()> {
        let c = x.dim(1)?;
        let w = p.weight_slice(c0, c)?;
        let (d_features, d_weight) = match p.form {
            Form::Cosine => {
                let n = p.per_class.as_ref().expect("cosine").narrow(0, c0, c)?;
                let g = delta.broadcast_mul(&n.unsqueeze(0)?)?;
                let a = g.t()?.matmul(&p.features)?;
                let n2 = p.per_class_acc.as_ref().expect("cosine").narrow(0, c0, c)?;
                let coef = delta.mul(x)?.sum(0)?.mul(&n2)?;
                let d_weight = a.sub(&w.broadcast_mul(&coef.unsqueeze(1)?)?)?;
                (g.matmul(&w)?, d_weight)
            }
            Form::Rbf => {
                let row_sum = delta.sum_keepdim(1)?;
                let d_features = ((p.raw.broadcast_mul(&row_sum)? - delta.matmul(&w)?)? * 2.0)?;
                let col_sum = delta.sum(0)?.unsqueeze(1)?;
                let d_weight =
                    ((w.broadcast_mul(&col_sum)? - delta.t()?.matmul(&p.features)?)? * 2.0)?;
                (d_features, d_weight)
            }
            Form::Linear => {
                if let Some(bias) = &self.bias {
                    bias.slice_set(&delta.sum(0)?.to_dtype(p.dtype)?, 0, c0)?;
                }
                (delta.matmul(&w)?, delta.t()?.matmul(&p.features)?)
            }
        };
        self.features = (&self.features + d_features)?;
        self.weight
            .slice_set(&d_weight.to_dtype(p.dtype)?.contiguous()?, 0, c0)?;
        Ok(())
    }

    /// The parameters' gradients: the normalization's backward for the cosine heads (and the
    /// feature-norm scale's term), Partial FC's scatter into \[C, D\].
    pub(super) fn finish(mut self, p: &HeadBatch, d_scale: Option<&Tensor>) -> Result<Gradients> {
        if let Some(sharding) = &p.sharding {
            // Every rank's classes contribute to the embeddings' gradient.
            self.features = all_reduce_sum(
                &sharding.op,
                "the embeddings' gradient",
                sharding.comm.as_ref(),
                &self.features,
            )?;
        }
        let mut d_raw = match p.form {
            Form::Cosine => {
                // f̂ = f / max(‖f‖, ε): d f = (d f̂ − f̂·(f̂·d f̂)) / ‖f‖ where ‖f‖ > ε, d f̂ / ε
                // elsewhere.
                let norm = row_norms(&p.raw)?;
                let denom = norm.maximum(p.eps)?;
                let unit = p.raw.broadcast_div(&denom)?;
                let mask = norm.gt(p.eps)?.to_dtype(p.acc)?;
                let along = unit.mul(&self.features)?.sum_keepdim(1)?.mul(&mask)?;
                let d = (self.features - unit.broadcast_mul(&along)?)?.broadcast_div(&denom)?;
                match d_scale {
                    // r = ‖f‖: dr/df = f/‖f‖ (0 at f = 0).
                    Some(ds) => {
                        let positive = norm.gt(0.0)?;
                        let safe = positive.where_cond(&norm, &norm.ones_like()?)?;
                        let dir = p
                            .raw
                            .broadcast_div(&safe)?
                            .broadcast_mul(&positive.to_dtype(p.acc)?)?;
                        (d + dir.broadcast_mul(&ds.unsqueeze(1)?)?)?
                    }
                    None => d,
                }
            }
            _ => self.features,
        };
        d_raw = d_raw.to_dtype(p.dtype)?;
        let (weight, bias) = match &p.sampled {
            Some((index, classes)) => {
                let dims = (*classes, p.weight.dim(1)?);
                let full = Tensor::zeros(dims, p.dtype, p.weight.device())?.index_add(
                    index,
                    &self.weight,
                    0,
                )?;
                let bias = match self.bias {
                    Some(b) => Some(
                        Tensor::zeros(*classes, p.dtype, p.weight.device())?
                            .index_add(index, &b, 0)?,
                    ),
                    None => None,
                };
                (full, bias)
            }
            None => (self.weight, self.bias),
        };
        Ok(Gradients {
            embeddings: d_raw,
            weight,
            bias,
            margins: None,
        })
    }
}

pub(super) enum FirstPass {
    Fused { loss: Tensor, grads: Gradients },
    Stats { stats: Tensor, loss: Tensor },
}

/// The gradients of the loss for an upstream gradient of 1 (reduced losses), or of Σ_i g_i·ℓ_i.
pub(super) struct Gradients {
    pub(super) embeddings: Tensor,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    /// With per-row margins: dℓ/d(m1, m2, m3) [B, 3] (accumulation dtype).
    pub(super) margins: Option<Tensor>,
}
