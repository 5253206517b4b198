//! Margin heads as candle modules over raw embeddings: [`MarginHead`] owns the class-centre
//! matrix W \[C, D\] (and, for the Softmax head, an optional bias) and computes the loss of a batch
//! of embeddings \[B, D\] without ever holding the \[B, C\] logits or their gradient.
//!
//! The loss runs in two passes over W, both by slices of `c` classes, with the fused op on every
//! slice:
//!
//! 1. **Row statistics.** Each slice's scores \[B, c\] are one matmul (plus the head's
//!    elementwise form, below); the op reduces them to its online per-row state (max, Σ exp,
//!    Σ z, …), the states are merged in slice order, and the criterion is applied to the merged
//!    rows on the host with the CPU path's row math, so every option sees whole rows. A
//!    class-sharded head ([`MarginHead::sharded_loss`]) merges the ranks' states the same way, in
//!    rank order.
//! 2. **Gradients.** The slice's scores \[B, c\] are
//!    recomputed, the op's backward turns them and the row statistics into d(loss)/d(scores)
//!    \[B, c\], and two matmuls give that slice's contribution to d(loss)/d(embeddings) (summed
//!    over slices, \[B, D\]) and its rows of d(loss)/dW (written in place, once). W's gradient is
//!    the only \[C, D\] allocation.
//!
//! When one slice covers every class (`c ≥ C`), the scores \[B, C\] are formed once and the fused
//! forward + backward reads them once (one pass, three matmuls, as a composed step).
//!
//! The head's elementwise form, with n_j = 1/max(‖W_j‖, ε) and f̂_i = f_i / max(‖f_i‖, ε) (PyTorch's
//! `F.normalize`):
//!
//! | head | score x_ij | d(loss)/d(f̂_i) | d(loss)/d(W_j) |
//! |---|---|---|---|
//! | cosine heads | (f̂_i·W_j)·n_j | Σ_j g_ij·W_j with g_ij = δ_ij·n_j | Σ_i g_ij·f̂_i − W_j·n_j²·Σ_i δ_ij·x_ij (0 for ‖W_j‖ ≤ ε) |
//! | RBF | ‖f_i‖² + ‖W_j‖² − 2·f_i·W_j | 2·f_i·Σ_j δ_ij − 2·Σ_j δ_ij·W_j | 2·W_j·Σ_i δ_ij − 2·Σ_i δ_ij·f_i |
//! | Softmax | f_i·W_j + b_j | Σ_j δ_ij·W_j | Σ_i δ_ij·f_i (and d b_j = Σ_i δ_ij) |
//!
//! where δ_ij = d(loss)/d(x_ij) comes from the op. For the cosine heads d(loss)/d(f_i) =
//! (d f̂_i − f̂_i·(f̂_i·d f̂_i))/‖f_i‖ (d f̂_i/max(‖f_i‖, ε) when ‖f_i‖ ≤ ε), plus
//! (dℓ/dr_i)·f_i/‖f_i‖ when the feature norm is SphereFace's row scale r_i = ‖f_i‖.

mod autograd;
mod batch;
mod elastic;
mod evaluation;
mod form;
mod magface;
mod partial_fc;
mod row_margins;
mod sub_center;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use crate::config::{HEAD_OP, MarginSoftmaxLoss, Reduction, accumulation_dtype};
use crate::gradient_handover::hand_over;
use crate::shard::{
    ClassShard, Communicator, Terms, agree, config_fingerprint, targets_fingerprint,
};
use crate::targets_and_weights::validate_targets;
use autograd::{HeadGradients, Pending, Slot, SourceState};
pub use batch::DEFAULT_CHUNK_SCORES;
use batch::{FirstPass, HeadBatch, HeadParts, Sharding};
pub use elastic::ElasticFace;
pub use form::DEFAULT_NORM_EPS;
use form::{Form, form_of};
pub use magface::MagFace;
pub use partial_fc::PartialFc;
use partial_fc::sample_classes;
pub use sub_center::SubCenterOutliers;

/// A margin (or kernel) softmax head over raw embeddings, candle-nn style: it owns W \[C, D\] (the
/// class centres, one row per class) and, for the Softmax head, an optional bias \[C\].
///
/// - [`MarginHead::loss`]: the loss of embeddings \[B, D\] against targets \[B\], differentiable
///   into the embeddings, W and the bias through candle autograd, computed in chunks (see the
///   module docs) so that neither the \[B, C\] logits nor their gradient is ever held.
/// - [`MarginHead::logits`] (also [`Module::forward`]), [`MarginHead::cosines`],
///   [`MarginHead::predict`]: evaluation, without margin, composed from plain candle ops (these
///   hold \[B, C\]).
///
/// The cosine heads (CosFace, ArcFace, Combined, SphereFace) normalize both the embeddings and
/// W's rows; SphereFace can take the feature norm ‖f_i‖ as its row scale
/// ([`MarginHead::feature_norm_scale`]); RBF scores squared distances
/// ‖f_i‖² + ‖W_j‖² − 2·f_i·W_j; Softmax is a linear layer f·Wᵀ (+ b).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_margin_softmax::{Head, MarginHead, MarginSoftmaxLoss};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let head = MarginHead::new(MarginSoftmaxLoss::new(Head::arcface()), 8, 100, vb.pp("head"))?;
/// let embeddings = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
/// let targets = Tensor::new(&[3u32, 14, 15, 92], &dev)?;
/// let loss = head.loss(&embeddings, &targets)?;
/// let grads = loss.backward()?; // gradients for W (and the embeddings, if they are variables)
/// assert!(grads.get(head.weight()).is_some());
/// # Ok(()) }
/// ```
pub struct MarginHead {
    loss: MarginSoftmaxLoss,
    weight: Tensor,
    bias: Option<Tensor>,
    feature_norm_scale: bool,
    eps: f64,
    chunk_classes: Option<usize>,
    partial_fc: Option<PartialFc>,
    /// Calls of [`MarginHead::loss`] so far with Partial FC: the sampler's stream index.
    calls: AtomicU64,
    /// MagFace's norm-dependent margin and regulariser ([`MarginHead::magface`]).
    magface: Option<MagFace>,
    /// ElasticFace's drawn margins ([`MarginHead::elastic`]) and the training calls so far
    /// (the draws' stream index).
    elastic: Option<ElasticFace>,
    elastic_steps: AtomicU64,
    /// ElasticFace's step as a variable of a `VarMap` ([`MarginHead::elastic_with_state`]),
    /// which then holds the step instead of `elastic_steps`.
    elastic_state: Option<Tensor>,
    /// Sub-center ArcFace's K ([`MarginHead::sub_centers`]); 1: one centre per class.
    sub_centers: usize,
}

impl MarginHead {
    /// A head for `classes` classes over embeddings of `in_dim` values, W \[classes, in_dim\] taken
    /// from `vb` under the name `weight`, initialized (when `vb` creates it) as InsightFace does
    /// for the cosine heads, normal(0, 0.01); normal(0, 1/√D) for RBF (centres at about unit
    /// norm, the scale of embeddings of unit variance per dimension ÷ √D); for Softmax PyTorch's
    /// `nn.Linear`, uniform(±1/√D). No bias: see [`MarginHead::new_with_bias`].
    ///
    /// # Errors
    /// `in_dim` or `classes` 0, an invalid loss configuration, or the var builder's own errors
    /// (a stored tensor of another shape). (Class weights are checked by the loss: C of them, or
    /// all shards' classes for [`MarginHead::sharded_loss`].)
    pub fn new(
        loss: MarginSoftmaxLoss,
        in_dim: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = loss.head.name();
        if in_dim == 0 || classes == 0 {
            bail!("{HEAD_OP}({name}): in_dim and classes must be > 0, got {in_dim} and {classes}")
        }
        let init = match form_of(&loss.head) {
            Form::Cosine => Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            Form::Rbf => Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (in_dim as f64).sqrt(),
            },
            Form::Linear => {
                let bound = 1.0 / (in_dim as f64).sqrt();
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
        };
        let weight = vb.get_with_hints((classes, in_dim), "weight", init)?;
        Self::from_weight(loss, weight, None)
    }

    /// As [`MarginHead::new`], with a bias \[classes\] (name `bias`, uniform(±1/√D) as in
    /// `nn.Linear`): the Softmax head only.
    ///
    /// # Errors
    /// As [`MarginHead::new`], and for a head other than Softmax.
    pub fn new_with_bias(
        loss: MarginSoftmaxLoss,
        in_dim: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = loss.head.name();
        if form_of(&loss.head) != Form::Linear {
            bail!("{HEAD_OP}({name}): a bias is only defined for the softmax head")
        }
        let head = Self::new(loss, in_dim, classes, vb.clone())?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let bias = vb.get_with_hints(
            classes,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        head.with_bias_tensor(bias)
    }

    /// A head over the given W \[C, D\] (f32, f64, f16 or bf16; a `Var`'s tensor to train it) and,
    /// for Softmax, an optional bias \[C\] of the same dtype and device.
    ///
    /// # Errors
    /// W not of rank 2 with C, D > 0 or not a float tensor; a bias for a head other than Softmax,
    /// or one not of shape \[C\], W's dtype and W's device; an invalid loss configuration.
    pub fn from_weight(
        loss: MarginSoftmaxLoss,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let name = loss.head.name();
        match weight.dims() {
            &[c, d] if c > 0 && d > 0 => {}
            d => bail!("{HEAD_OP}({name}): weight must have shape [C, D] with C, D > 0, got {d:?}"),
        };
        if !matches!(
            weight.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            bail!(
                "{HEAD_OP}({name}): weight dtype must be f32, f64, f16 or bf16, got {:?}",
                weight.dtype()
            )
        }
        loss.validate_for(accumulation_dtype(weight.dtype()))?;
        let head = Self {
            loss,
            weight,
            bias: None,
            feature_norm_scale: false,
            eps: DEFAULT_NORM_EPS,
            chunk_classes: None,
            partial_fc: None,
            calls: AtomicU64::new(0),
            magface: None,
            elastic: None,
            elastic_steps: AtomicU64::new(0),
            elastic_state: None,
            sub_centers: 1,
        };
        match bias {
            Some(b) => head.with_bias_tensor(b),
            None => Ok(head),
        }
    }

    fn with_bias_tensor(mut self, bias: Tensor) -> Result<Self> {
        let name = self.name();
        if form_of(&self.loss.head) != Form::Linear {
            bail!("{HEAD_OP}({name}): a bias is only defined for the softmax head")
        }
        if bias.dims() != [self.classes()] {
            bail!(
                "{HEAD_OP}({name}): bias must have shape [C] = [{}], got {:?}",
                self.classes(),
                bias.dims()
            )
        }
        if bias.dtype() != self.weight.dtype() || !bias.device().same_device(self.weight.device()) {
            bail!(
                "{HEAD_OP}({name}): bias must have the weight's dtype {:?} and device {:?}, got {:?} on {:?}",
                self.weight.dtype(),
                self.weight.device().location(),
                bias.dtype(),
                bias.device().location()
            )
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// Classes per slice of both passes: a chunk holds B·n scores. `n ≥ C` computes the
    /// loss in one pass over \[B, C\]. The default is ⌊[`DEFAULT_CHUNK_SCORES`] / B⌋ (at least 1).
    /// Every chunk size gives the same loss and gradients up to rounding.
    ///
    /// # Errors
    /// n = 0.
    pub fn chunk_classes(mut self, n: usize) -> Result<Self> {
        if n == 0 {
            bail!(
                "{HEAD_OP}({}): chunk_classes must be > 0, got 0",
                self.name()
            )
        }
        self.chunk_classes = Some(n);
        Ok(self)
    }

    /// Samples a fraction `rate` of the classes per call (see [`PartialFc`]); `rate = 1` keeps
    /// every class (through the same gather and scatter).
    ///
    /// # Errors
    /// `rate` outside (0, 1] or NaN.
    pub fn partial_fc(mut self, rate: f64, seed: u64) -> Result<Self> {
        if !(rate > 0.0 && rate <= 1.0) {
            bail!(
                "{HEAD_OP}({}): the Partial FC sampling rate must be in (0, 1], got {rate}",
                self.name()
            )
        }
        if self.sub_centers > 1 {
            bail!(
                "{HEAD_OP}({}): Partial FC is not supported with sub-centers yet",
                self.name()
            )
        }
        self.partial_fc = Some(PartialFc { rate, seed });
        Ok(self)
    }

    /// Uses each embedding's norm ‖f_i‖ as its row scale in place of the head's fixed s (the
    /// original SphereFace / A-Softmax), with its gradient. Cosine heads only.
    ///
    /// # Errors
    /// A head that is not a cosine head.
    pub fn feature_norm_scale(mut self, on: bool) -> Result<Self> {
        if on && form_of(&self.loss.head) != Form::Cosine {
            bail!(
                "{HEAD_OP}({}): the feature-norm row scale needs a cosine head",
                self.name()
            )
        }
        self.feature_norm_scale = on;
        Ok(self)
    }

    /// The ε of the normalizations (default [`DEFAULT_NORM_EPS`]).
    ///
    /// # Errors
    /// ε not finite and > 0.
    pub fn norm_eps(mut self, eps: f64) -> Result<Self> {
        if !(eps.is_finite() && eps > 0.0) {
            bail!(
                "{HEAD_OP}({}): norm_eps must be finite and > 0, got {eps}",
                self.name()
            )
        }
        self.eps = eps;
        Ok(self)
    }

    /// Replaces the loss configuration (the same head family: e.g. SphereFace's λ of the current
    /// iteration, see [`crate::SphereFaceLambda`]), keeping W, the bias and the other settings.
    ///
    /// # Errors
    /// An invalid configuration, or another head family (the
    /// parameters' shapes and initialization belong to it); for a MagFace or ElasticFace head,
    /// another head.
    pub fn set_config(&mut self, loss: MarginSoftmaxLoss) -> Result<()> {
        if form_of(&loss.head) != form_of(&self.loss.head)
            || (self.feature_norm_scale && form_of(&loss.head) != Form::Cosine)
        {
            bail!(
                "{HEAD_OP}({}): set_config cannot change the head family (to {})",
                self.name(),
                loss.head.name()
            )
        }
        let adaptive = self.magface.is_some() || self.elastic.is_some();
        if adaptive && std::mem::discriminant(&loss.head) != std::mem::discriminant(&self.loss.head)
        {
            bail!(
                "{HEAD_OP}({}): set_config cannot change the head of a MagFace or ElasticFace \
                 head (to {})",
                self.name(),
                loss.head.name()
            )
        }
        loss.validate_for(accumulation_dtype(self.weight.dtype()))?;
        self.loss = loss;
        Ok(())
    }

    /// W \[C, D\].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias \[C\], if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The loss configuration.
    pub fn config(&self) -> &MarginSoftmaxLoss {
        &self.loss
    }

    /// The number of classes C.
    pub fn classes(&self) -> usize {
        self.weight.dims()[0] / self.sub_centers
    }

    /// The embedding dimension D.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// What one evaluation of the loss reads of this head.
    fn parts(&self) -> HeadParts<'_> {
        HeadParts {
            loss: &self.loss,
            weight: &self.weight,
            bias: self.bias.as_ref(),
            feature_norm_scale: self.feature_norm_scale,
            eps: self.eps,
            chunk_classes: self.chunk_classes,
            sub_centers: self.sub_centers,
        }
    }

    fn name(&self) -> &'static str {
        self.loss.head.name()
    }

    fn check_embeddings(&self, embeddings: &Tensor) -> Result<usize> {
        let name = self.name();
        let d = self.in_dim();
        let rows = match embeddings.dims() {
            &[b, dim] if dim == d => b,
            dims => bail!(
                "{HEAD_OP}({name}): embeddings must have shape [B, D] with D = {d}, got {dims:?}"
            ),
        };
        if embeddings.dtype() != self.weight.dtype() {
            bail!(
                "{HEAD_OP}({name}): embeddings must have the weight's dtype {:?}, got {:?}",
                self.weight.dtype(),
                embeddings.dtype()
            )
        }
        self.check_device(embeddings, "embeddings")?;
        Ok(rows)
    }

    fn check_device(&self, t: &Tensor, what: &str) -> Result<()> {
        if !t.device().same_device(self.weight.device()) {
            bail!(
                "{HEAD_OP}({}): {what} are on {:?} but the weight is on {:?}",
                self.name(),
                t.device().location(),
                self.weight.device().location()
            )
        }
        Ok(())
    }

    /// The loss of `embeddings` \[B, D\] (W's dtype and device) against `targets` \[B\] (u8, u32 or
    /// i64, as for [`MarginSoftmaxLoss::loss`]), reduced as the configuration says (class
    /// weights, if any, of length C); f32 (f64 for
    /// f64). Differentiable through candle autograd into the embeddings, W and the bias, whichever
    /// track gradients. With [`Reduction::Mean`] or [`Reduction::Sum`] the gradients are computed
    /// during this call (the module docs' second pass) and `backward()` only hands them over
    /// (scaled, if the upstream gradient is not 1); with [`Reduction::None`] the second pass runs
    /// in `backward()`, with the per-row upstream gradient. Nothing of size \[B, C\] is held unless
    /// the chunk covers every class. For f16 / bf16 weights and embeddings everything is computed in f32
    /// (W converted a slice at a time, never whole) and the gradients are rounded to the
    /// parameters' dtype once, at the end.
    ///
    /// # Errors
    /// Embeddings not of shape \[B, D\], or not of W's dtype and device; targets not u8 / u32 / i64
    /// of shape \[B\] on W's device, or with a value outside [0, C) that is not `ignore_index`;
    /// and every error of [`MarginSoftmaxLoss::loss`] for the configuration.
    pub fn loss(&self, embeddings: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if let Some(magface) = &self.magface {
            return self.magface_loss(embeddings, targets, magface, None);
        }
        if let Some(elastic) = &self.elastic {
            return self.elastic_loss(embeddings, targets, elastic, None);
        }
        self.loss_impl(embeddings, targets, None, None)
    }

    /// The loss of a head whose W holds one shard of the classes ([`ClassShard`]: this rank's
    /// `count` classes from `offset`, of `total`), every rank calling it with the same
    /// `embeddings` and `targets` (global class indices in [0, total)) and its own W slice. The
    /// ranks exchange through `comm` a few values per row, merged in rank order, so every rank
    /// returns the same loss as the unsharded head over all classes (up to rounding), and the
    /// same bits as every other rank. Gradients: W's into this rank's slice, the embeddings' the
    /// sum over ranks (every rank gets the whole gradient, as for a replicated input), the bias's
    /// into this rank's slice. Every option but Partial FC; the chunking is per rank.
    ///
    /// Before computing, the ranks agree (one small exchange): each sends its shard, B, W's
    /// dtype and fingerprints of the configuration (the loss's and this module's) and of the
    /// targets, or the error of its own checks. Every rank must make the same calls in the same
    /// order, also `backward()` with [`Reduction::None`] (its gradient pass exchanges the
    /// embeddings' gradient).
    ///
    /// # Errors
    /// The same `Err` on every rank, starting with `margin_head(<head>)`, when:
    /// - a rank's own checks fail (the error names the rank and carries its message): those of
    ///   [`MarginHead::loss`] (targets checked against `shard.total`), a shard whose `count` is
    ///   not W's row count or that [`ClassShard::validate`] rejects, or Partial FC;
    /// - the ranks disagree on B, W's dtype, the total, the configuration or the targets (the
    ///   field and the ranks);
    /// - the shards overlap, repeat or leave classes uncovered;
    /// - an exchange fails: a rank that does not arrive before the communicator's deadline (the
    ///   round and the missing ranks), a rank that left, or a group poisoned by an earlier
    ///   failure (its cause).
    pub fn sharded_loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        shard: ClassShard,
        comm: Arc<dyn Communicator>,
    ) -> Result<Tensor> {
        let op = format!("{HEAD_OP}({})", self.name());
        let sharding = Some(Sharding { shard, comm, op });
        if let Some(magface) = &self.magface {
            return self.magface_loss(embeddings, targets, magface, sharding);
        }
        if let Some(elastic) = &self.elastic {
            return self.elastic_loss(embeddings, targets, elastic, sharding);
        }
        self.loss_impl(embeddings, targets, sharding, None)
    }

    /// This call's own checks (of the shard too, when sharded): the targets on the host, and
    /// their values.
    fn check_call(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        shard: Option<ClassShard>,
    ) -> Result<(Vec<Option<usize>>, Vec<i64>)> {
        let name = self.name();
        if let Some(shard) = shard {
            shard
                .validate()
                .map_err(|e| candle_core::Error::Msg(format!("{HEAD_OP}({name}): {e}")))?;
            if shard.count != self.classes() {
                bail!(
                    "{HEAD_OP}({name}): the shard holds {} classes but W has {} rows",
                    shard.count,
                    self.classes()
                )
            }
            if self.partial_fc.is_some() {
                bail!("{HEAD_OP}({name}): Partial FC is not supported with a sharded loss")
            }
            if self.sub_centers > 1 {
                bail!("{HEAD_OP}({name}): sub-centers are not supported with a sharded loss yet")
            }
            if self.elastic.is_some_and(|e| e.plus) {
                bail!(
                    "{HEAD_OP}({name}): ElasticFace's \"plus\" ordering is not supported with a \
                     sharded loss yet (it reads every row's target cosine)"
                )
            }
        }
        let rows = self.check_embeddings(embeddings)?;
        if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!(
                "{HEAD_OP}({name}): targets must be an integer tensor of dtype u8, u32 or i64, got {:?}",
                targets.dtype()
            )
        }
        if targets.dims() != [rows] {
            bail!(
                "{HEAD_OP}({name}): targets must have shape [B] = [{rows}], got {:?}",
                targets.dims()
            )
        }
        self.check_device(targets, "targets")?;
        let values: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
        let total = shard.map_or(self.classes(), |s| s.total);
        if let Some(w) = &self.loss.class_weights
            && w.len() != total
        {
            bail!(
                "{HEAD_OP}({name}): class_weights must have shape [C] = [{total}] (all classes), got [{}]",
                w.len()
            )
        }
        Ok((validate_targets(&values, &self.loss, total)?, values))
    }

    /// The loss; `margins`: per-row (m1, m2, m3) [B, 3] in the accumulation dtype
    /// (`row_margins::margin_columns`), attached to the caller's margins.
    fn loss_impl(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        sharding: Option<Sharding>,
        margins: Option<&Tensor>,
    ) -> Result<Tensor> {
        let checked = self.check_call(embeddings, targets, sharding.as_ref().map(|s| s.shard));
        if let Some(s) = &sharding {
            let terms = checked.as_ref().map(|(_, values)| Terms {
                shard: s.shard,
                rows: values.len(),
                dtype: self.weight.dtype(),
                config: config_fingerprint(
                    &self.loss,
                    &format!(
                        "feature_norm_scale {} eps {:?} bias {} magface {:?} elastic {:?} step {}",
                        self.feature_norm_scale,
                        self.eps,
                        self.bias.is_some(),
                        self.magface,
                        self.elastic,
                        self.elastic_step().unwrap_or(u64::MAX)
                    ),
                ),
                targets: targets_fingerprint(values),
            });
            agree(&s.op, s.comm.as_ref(), self.weight.device(), terms)?;
        }
        // Unsharded, or every rank passed its own checks (this one included).
        let (host_targets, _) = checked?;
        let classes = self.classes();
        let sample = match self.partial_fc {
            Some(pfc) => {
                let call = self.calls.fetch_add(1, Ordering::Relaxed);
                Some(sample_classes(pfc, call, &host_targets, classes))
            }
            None => None,
        };
        let detached = margins.map(Tensor::detach);
        let batch = HeadBatch::new(
            self.parts(),
            embeddings,
            host_targets,
            sample,
            sharding,
            detached,
        )?;
        let tracked = embeddings.track_op()
            || self.weight.track_op()
            || self.bias.as_ref().is_some_and(|b| b.track_op())
            || margins.is_some_and(Tensor::track_op);
        let (loss, pending) = match batch.first_pass(tracked)? {
            FirstPass::Fused { loss, grads } => (loss, Pending::Ready(grads)),
            FirstPass::Stats { loss, .. } if !tracked => return Ok(loss),
            FirstPass::Stats { stats, loss } if self.loss.reduction == Reduction::None => (
                loss,
                Pending::Deferred {
                    batch: Box::new(batch),
                    stats,
                },
            ),
            FirstPass::Stats { stats, loss } => {
                let upstream = batch.row_upstream(None)?;
                (loss, Pending::Ready(batch.second_pass(&stats, &upstream)?))
            }
        };
        let source = Arc::new(HeadGradients {
            state: Mutex::new(SourceState {
                pending,
                handed: None,
            }),
        });
        let out = hand_over(
            HEAD_OP,
            &loss,
            &[
                (Slot::Embeddings as usize, Some(embeddings)),
                (Slot::Weight as usize, Some(&self.weight)),
                (Slot::Bias as usize, self.bias.as_ref()),
                (Slot::Margins as usize, margins),
            ],
            source,
        )?;
        Ok(out)
    }
}

impl Module for MarginHead {
    /// The logits without margin ([`MarginHead::logits`]).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.logits(xs)
    }
}
