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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use crate::config::{ClassWeights, Head, MarginSoftmaxLoss, Reduction, accumulation_dtype};
use crate::handover::{GradientSource, hand_over};
use crate::loss::{check_inputs, reduce};
use crate::op::{self, STAT_D_SCALE};
use crate::prepare::{upstream_factor, validate_targets};
use crate::shard::{
    ClassShard, Communicator, all_reduce_sum, exchange_states, local_targets, row_info,
    slice_gradient, slice_weights,
};

/// The name errors of the head modules start with.
pub(crate) const HEAD_OP: &str = "margin_head";

/// The ε of the normalizations: max(‖x‖, ε) as in PyTorch's `F.normalize`.
pub const DEFAULT_NORM_EPS: f64 = 1e-12;

/// How many scores a chunk holds by default: B × (classes per slice), 2²¹ (8 MiB of f32).
pub const DEFAULT_CHUNK_SCORES: usize = 1 << 21;

/// Partial FC (InsightFace's arcface_torch): each call samples ⌊rate·C⌋ classes (at least 1),
/// every class that is a target of the batch plus uniformly drawn others (the targets alone when
/// they are more), and computes the loss over those classes only, as if they were all the
/// classes: label smoothing spreads over them and the smoothing's Σ w_j sums their class weights.
/// W's gradient (and the bias's) is zero outside them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialFc {
    /// The fraction of classes sampled per call, in (0, 1].
    pub rate: f64,
    /// The seed of the sampler: call k of a head samples from the stream (seed, k), so a run is
    /// reproducible.
    pub seed: u64,
}

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
}

/// How the head turns (embeddings, W) into the op's input.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    Cosine,
    Rbf,
    Linear,
}

fn form_of(head: &Head) -> Form {
    match head {
        Head::Softmax { .. } => Form::Linear,
        Head::Rbf { .. } => Form::Rbf,
        _ => Form::Cosine,
    }
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
    /// parameters' shapes and initialization belong to it).
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
        self.weight.dims()[0]
    }

    /// The embedding dimension D.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
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

    /// The op's input for `embeddings` \[B, D\], composed from plain candle ops (differentiable,
    /// holds \[B, C\]): cosines f̂·Ŵᵀ for the cosine heads, squared distances for RBF, f·Wᵀ (+ b)
    /// for Softmax.
    ///
    /// # Errors
    /// Embeddings not of shape \[B, D\], or not of W's dtype and device.
    pub fn input(&self, embeddings: &Tensor) -> Result<Tensor> {
        self.check_embeddings(embeddings)?;
        let w = &self.weight;
        match form_of(&self.loss.head) {
            Form::Cosine => normalize(embeddings, self.eps)?.matmul(&normalize(w, self.eps)?.t()?),
            Form::Rbf => {
                let f2 = embeddings.sqr()?.sum_keepdim(1)?;
                let w2 = w.sqr()?.sum_keepdim(1)?.t()?;
                f2.broadcast_add(&w2)?
                    .broadcast_sub(&(embeddings.matmul(&w.t()?)? * 2.0)?)
            }
            Form::Linear => {
                let z = embeddings.matmul(&w.t()?)?;
                match &self.bias {
                    Some(b) => z.broadcast_add(&b.unsqueeze(0)?),
                    None => Ok(z),
                }
            }
        }
    }

    /// The cosines f̂·Ŵᵀ \[B, C\] (cosine heads only; see [`MarginHead::input`]).
    ///
    /// # Errors
    /// As [`MarginHead::input`], and for a head that is not a cosine head.
    pub fn cosines(&self, embeddings: &Tensor) -> Result<Tensor> {
        if form_of(&self.loss.head) != Form::Cosine {
            bail!(
                "{HEAD_OP}({}): cosines are defined for the cosine heads only",
                self.name()
            )
        }
        self.input(embeddings)
    }

    /// The logits \[B, C\] without margin (accumulation dtype, differentiable): s·cos θ (‖f‖·cos θ
    /// with the feature-norm scale), s·exp(−d²/γ) for RBF, s·(f·Wᵀ + b) for Softmax, soft-capped
    /// when the loss is. The transform is [`crate::reference::logits`] with every row treated as
    /// having no target.
    ///
    /// # Errors
    /// As [`MarginHead::input`].
    pub fn logits(&self, embeddings: &Tensor) -> Result<Tensor> {
        let input = self.input(embeddings)?;
        let rows = input.dim(0)?;
        let cfg = self.loss.clone().ignore_index(Some(-1));
        let no_target = Tensor::full(-1i64, rows, input.device())?;
        let scale = if self.feature_norm_scale {
            Some(row_norm(
                &embeddings.to_dtype(accumulation_dtype(input.dtype()))?,
            )?)
        } else {
            None
        };
        crate::reference::logits(&cfg, &input, &no_target, scale.as_ref())
    }

    /// The predicted class of each embedding, u32 \[B\]: the arg-max of [`MarginHead::logits`].
    ///
    /// # Errors
    /// As [`MarginHead::input`].
    pub fn predict(&self, embeddings: &Tensor) -> Result<Tensor> {
        self.logits(embeddings)?.argmax(1)
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
        self.loss_impl(embeddings, targets, None)
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
    /// # Errors
    /// As [`MarginHead::loss`] (targets checked against `shard.total`), and for a shard whose
    /// `count` is not W's row count or that does not fit in `total`, Partial FC, or a failed
    /// exchange. Every rank must make the same calls in the same order, also `backward()` with
    /// [`Reduction::None`] (its gradient pass exchanges the embeddings' gradient).
    pub fn sharded_loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        shard: ClassShard,
        comm: Arc<dyn Communicator>,
    ) -> Result<Tensor> {
        let name = self.name();
        shard.validate()?;
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
        self.loss_impl(embeddings, targets, Some(Sharding { shard, comm }))
    }

    fn loss_impl(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        sharding: Option<Sharding>,
    ) -> Result<Tensor> {
        let rows = self.check_embeddings(embeddings)?;
        let name = self.name();
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
        let classes = self.classes();
        let total = sharding.as_ref().map_or(classes, |s| s.shard.total);
        if let Some(w) = &self.loss.class_weights
            && w.len() != total
        {
            bail!(
                "{HEAD_OP}({name}): class_weights must have shape [C] = [{total}] (all classes), got [{}]",
                w.len()
            )
        }
        let host_targets = validate_targets(&values, &self.loss, total)?;
        let sample = match self.partial_fc {
            Some(pfc) => {
                let call = self.calls.fetch_add(1, Ordering::Relaxed);
                Some(sample_classes(pfc, call, &host_targets, classes))
            }
            None => None,
        };
        let problem = Problem::new(self, embeddings, host_targets, sample, sharding)?;
        let tracked = embeddings.track_op()
            || self.weight.track_op()
            || self.bias.as_ref().is_some_and(|b| b.track_op());
        let (loss, pending) = match problem.first_pass(tracked)? {
            FirstPass::Fused { loss, grads } => (loss, Pending::Ready(grads)),
            FirstPass::Stats { loss, .. } if !tracked => return Ok(loss),
            FirstPass::Stats { stats, loss } if self.loss.reduction == Reduction::None => (
                loss,
                Pending::Deferred {
                    problem: Box::new(problem),
                    stats,
                },
            ),
            FirstPass::Stats { stats, loss } => {
                let upstream = problem.row_upstream(None)?;
                (
                    loss,
                    Pending::Ready(problem.second_pass(&stats, &upstream)?),
                )
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

/// x / max(‖x‖, ε) per row, composed (differentiable): PyTorch's `F.normalize`.
fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let acc = accumulation_dtype(x.dtype());
    let xa = x.to_dtype(acc)?;
    let norm = xa.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(eps)?;
    xa.broadcast_div(&norm)?.to_dtype(x.dtype())
}

/// ‖x_i‖ \[B\] (composed, differentiable).
fn row_norm(x: &Tensor) -> Result<Tensor> {
    x.sqr()?.sum(1)?.sqrt()
}

/// The classes of one Partial FC call, sorted, and the targets as positions among them.
struct Sample {
    classes: Vec<u32>,
    targets: Vec<Option<usize>>,
}

/// SplitMix64: a small, well-mixed generator for the sampler (no dependency, stable output).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) (Lemire's multiply-shift; the bias is below 2⁻³² for n < 2³²).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 32).wrapping_mul(n as u64) >> 32) as usize
    }
}

/// Every class that is a target of the batch, plus uniformly drawn others up to ⌊rate·C⌋ classes
/// in all (InsightFace's `sample`: the positives alone when they are more), sorted.
fn sample_classes(pfc: PartialFc, call: u64, targets: &[Option<usize>], classes: usize) -> Sample {
    let wanted = ((pfc.rate * classes as f64) as usize).clamp(1, classes);
    let mut positive = vec![false; classes];
    for &y in targets.iter().flatten() {
        positive[y] = true;
    }
    let mut chosen: Vec<u32> = (0..classes as u32)
        .filter(|&j| positive[j as usize])
        .collect();
    let extra = wanted.saturating_sub(chosen.len());
    if extra > 0 {
        let mut negatives: Vec<u32> = (0..classes as u32)
            .filter(|&j| !positive[j as usize])
            .collect();
        let mut rng = SplitMix64(pfc.seed ^ call.wrapping_mul(0xD1B5_4A32_D192_ED03));
        // A partial Fisher–Yates shuffle: the first `extra` entries are a uniform sample.
        for k in 0..extra {
            let pick = k + rng.below(negatives.len() - k);
            negatives.swap(k, pick);
        }
        chosen.extend_from_slice(&negatives[..extra]);
        chosen.sort_unstable();
    }
    let mut position = vec![u32::MAX; classes];
    for (k, &j) in chosen.iter().enumerate() {
        position[j as usize] = k as u32;
    }
    let targets = targets
        .iter()
        .map(|t| t.map(|y| position[y] as usize))
        .collect();
    Sample {
        classes: chosen,
        targets,
    }
}

/// One evaluation of the loss: the (sampled) classes' W, the embeddings in the form the scores
/// use, the per-row and per-class constants, and the chunking.
struct Problem {
    /// The loss configuration for these classes, reading targets as i64 with −1 for ignored rows.
    cfg: MarginSoftmaxLoss,
    form: Form,
    /// W's dtype (the gradients' dtype).
    dtype: DType,
    /// The dtype everything is computed in: f32 for f16 / bf16 weights (W is converted a slice at
    /// a time), else W's.
    acc: DType,
    /// Embeddings as the scores read them, in `acc`: f̂ for the cosine heads, f otherwise.
    features: Tensor,
    /// The raw embeddings in the accumulation dtype (for the backward of the normalization).
    raw: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    /// In `acc`: for the cosine heads n_j = 1/max(‖W_j‖, ε); RBF: ‖W_j‖².
    per_class: Option<Tensor>,
    /// Cosine heads: n_j²·[‖W_j‖ > ε] in the accumulation dtype.
    per_class_acc: Option<Tensor>,
    /// RBF: ‖f_i‖² \[B, 1\].
    per_row: Option<Tensor>,
    /// The row scale r \[B\] (accumulation dtype).
    scale: Tensor,
    scale_grad: bool,
    targets: Vec<Option<usize>>,
    targets_tensor: Tensor,
    eps: f64,
    slice_classes: usize,
    /// Partial FC: the sampled classes (u32 \[C'\]) and C.
    sampled: Option<(Tensor, usize)>,
    /// The classes of the whole problem: W's rows, or all shards' classes when sharded.
    total_classes: usize,
    /// Sharded: this rank's classes and the ranks' communicator.
    sharding: Option<Sharding>,
}

/// A sharded loss's shard and communicator.
#[derive(Clone)]
struct Sharding {
    shard: ClassShard,
    comm: Arc<dyn Communicator>,
}

impl Problem {
    fn new(
        head: &MarginHead,
        embeddings: &Tensor,
        targets: Vec<Option<usize>>,
        sample: Option<Sample>,
        sharding: Option<Sharding>,
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
                    Some((index, head.classes())),
                )
            }
            None => (
                head.weight.detach(),
                head.bias.as_ref().map(|b| b.detach()),
                targets,
                None,
            ),
        };
        let classes = weight.dim(0)?;
        let rows = embeddings.dim(0)?;
        let raw = embeddings.detach().to_dtype(acc)?;
        let eps = head.eps;
        let (features, per_class, per_class_acc, per_row) = match form {
            Form::Cosine => {
                let norm = raw.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(eps)?;
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
            raw.sqr()?.sum(1)?.sqrt()?
        } else {
            Tensor::full(head.loss.head.scale(), rows, &dev)?.to_dtype(acc)?
        };
        let total_classes = sharding.as_ref().map_or(classes, |s| s.shard.total);
        let index: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |y| y as i64)).collect();
        let targets_tensor = Tensor::from_vec(index, rows, &dev)?;
        let slice_classes = head
            .chunk_classes
            .unwrap_or((DEFAULT_CHUNK_SCORES / rows.max(1)).max(1))
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

    fn rows(&self) -> usize {
        self.targets.len()
    }

    fn classes(&self) -> usize {
        self.weight.dims()[0]
    }

    /// W's rows [c0, c0 + c) in the compute dtype (a view for f32 / f64, a converted copy of
    /// the slice only for f16 / bf16).
    fn weight_slice(&self, c0: usize, c: usize) -> Result<Tensor> {
        self.weight.narrow(0, c0, c)?.to_dtype(self.acc)
    }

    /// The scores x_ij \[rows, cols\] of the module docs' table, in the compute dtype. For a
    /// half-precision W, the product is formed a slice of classes at a time, so that W is never
    /// converted whole.
    fn scores(&self, rows: (usize, usize), cols: (usize, usize)) -> Result<Tensor> {
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
    fn local_targets(&self, c0: usize, c: usize) -> Vec<i64> {
        local_targets(&self.targets, self.class_offset() + c0, c)
    }

    fn class_offset(&self) -> usize {
        self.sharding.as_ref().map_or(0, |s| s.shard.offset)
    }

    /// The configuration over the slice [c0, c0 + c) of this W: its class weights, and one more
    /// (1) for the padding column of the gradient pass when `pad`.
    fn slice_config(&self, c0: usize, c: usize, pad: bool) -> Result<MarginSoftmaxLoss> {
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
    fn first_pass(&self, need_grads: bool) -> Result<FirstPass> {
        let (rows, classes) = (self.rows(), self.classes());
        if need_grads
            && self.slice_classes >= classes
            && self.cfg.reduction != Reduction::None
            && self.sharding.is_none()
        {
            let scores = self.scores((0, rows), (0, classes))?;
            check_inputs(&self.cfg, &scores, &self.targets_tensor, Some(&self.scale))?;
            let (loss, grad, grad_scale) = self.cfg.loss_and_grad_impl(
                &scores,
                &self.targets_tensor,
                &self.scale,
                self.scale_grad,
            )?;
            let mut acc = SliceSums::new(self)?;
            acc.add(self, 0, &scores, &grad)?;
            let grads = acc.finish(self, self.scale_grad.then_some(&grad_scale))?;
            return Ok(FirstPass::Fused { loss, grads });
        }
        let stats = self.statistics()?;
        let loss = reduce(self.cfg.reduction, &stats)?;
        Ok(FirstPass::Stats { stats, loss })
    }

    /// The op's statistics of the whole rows [B, STAT_COLUMNS]: each slice of classes reduced to
    /// its online state by the op, the states merged in slice order (and, sharded, gathered and
    /// merged in rank order), and the criterion applied.
    fn statistics(&self) -> Result<Tensor> {
        let (rows, classes) = (self.rows(), self.classes());
        let dev = self.weight.device();
        let mut parts = Vec::new();
        let mut target_inputs = Tensor::zeros(rows, self.acc, dev)?;
        let mut owned = vec![0u8; rows];
        let mut c0 = 0;
        while c0 < classes {
            let c = self.slice_classes.min(classes - c0);
            let scores = self.scores((0, rows), (c0, c))?;
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
            (merged, target_inputs) =
                exchange_states(sharding.comm.as_ref(), &merged, &target_inputs, owned)?;
        }
        op::finalize(
            &self.cfg,
            self.total_classes,
            &self.targets,
            &merged,
            &target_inputs,
            &self.scale,
            self.scale_grad,
        )
    }

    /// The per-row factor folded into the gradient: `upstream` (the autograd gradient of a
    /// per-row loss) or, for a reduced loss, 1/Σ w_y for the mean and 1 for the sum.
    fn row_upstream(&self, upstream: Option<&Tensor>) -> Result<Tensor> {
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
    fn second_pass(&self, stats: &Tensor, upstream: &Tensor) -> Result<Gradients> {
        let (rows, classes) = (self.rows(), self.classes());
        let row_info = row_info(stats, upstream, &self.scale)?;
        let mut sums = SliceSums::new(self)?;
        let mut c0 = 0;
        while c0 < classes {
            let c = self.slice_classes.min(classes - c0);
            let scores = self.scores((0, rows), (c0, c))?;
            let cfg = self.slice_config(c0, c, true)?;
            let local = self.local_targets(c0, c);
            let grad = slice_gradient(&cfg, &scores, &local, &row_info)?;
            sums.add(self, c0, &scores, &grad)?;
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
        sums.finish(self, d_scale.as_ref())
    }
}

/// n_j = 1/max(‖W_j‖, ε) and n_j²·[‖W_j‖ > ε], computed a slice of classes at a time so that no
/// \[C, D\] temporary is formed.
fn per_class_norms(weight: &Tensor, eps: f64, acc: DType) -> Result<(Tensor, Tensor)> {
    let norm = class_sq_norms(weight, acc)?.sqrt()?;
    let inv = norm.maximum(eps)?.recip()?;
    let mask = norm.gt(eps)?.to_dtype(acc)?;
    let inv_sq = inv.sqr()?.mul(&mask)?;
    Ok((inv, inv_sq))
}

/// ‖W_j‖² \[C\] in `acc`, a slice of classes at a time.
fn class_sq_norms(weight: &Tensor, acc: DType) -> Result<Tensor> {
    let classes = weight.dim(0)?;
    let step = (DEFAULT_CHUNK_SCORES / weight.dim(1)?.max(1)).max(1);
    let mut parts = Vec::new();
    let mut c0 = 0;
    while c0 < classes {
        let c = step.min(classes - c0);
        parts.push(weight.narrow(0, c0, c)?.to_dtype(acc)?.sqr()?.sum(1)?);
        c0 += c;
    }
    Tensor::cat(&parts, 0)
}

/// What the gradient pass accumulates: d(loss)/d(features) over slices, and W's (and the bias's)
/// gradient written a slice at a time.
struct SliceSums {
    features: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl SliceSums {
    fn new(p: &Problem) -> Result<Self> {
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
    fn add(&mut self, p: &Problem, c0: usize, x: &Tensor, delta: &Tensor) -> Result<()> {
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
    fn finish(mut self, p: &Problem, d_scale: Option<&Tensor>) -> Result<Gradients> {
        if let Some(sharding) = &p.sharding {
            // Every rank's classes contribute to the embeddings' gradient.
            self.features = all_reduce_sum(sharding.comm.as_ref(), &self.features)?;
        }
        let mut d_raw = match p.form {
            Form::Cosine => {
                // f̂ = f / max(‖f‖, ε): d f = (d f̂ − f̂·(f̂·d f̂)) / ‖f‖ where ‖f‖ > ε, d f̂ / ε
                // elsewhere.
                let norm = p.raw.sqr()?.sum_keepdim(1)?.sqrt()?;
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
        })
    }
}

enum FirstPass {
    Fused { loss: Tensor, grads: Gradients },
    Stats { stats: Tensor, loss: Tensor },
}

/// The gradients of the loss for an upstream gradient of 1 (reduced losses), or of Σ_i g_i·ℓ_i.
struct Gradients {
    embeddings: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
}

enum Pending {
    /// Computed in the forward call, for an upstream gradient of 1.
    Ready(Gradients),
    /// Per-row losses: the gradient pass runs in `backward()` with the per-row upstream.
    Deferred {
        problem: Box<Problem>,
        stats: Tensor,
    },
    /// Handed over to a `backward()` already.
    Spent,
}

/// Shared by the pass-through nodes of one loss. Each parameter's gradient is handed over once
/// and then released (as PyTorch frees a graph after `backward()`), so the head holds no copy of
/// W's gradient beside candle's gradient store.
struct HeadGradients {
    state: Mutex<SourceState>,
}

struct SourceState {
    pending: Pending,
    /// The gradients not handed over yet (embeddings, W, bias).
    handed: Option<[Option<Tensor>; 3]>,
}

impl GradientSource for HeadGradients {
    /// `slot`'s gradient for this backward. The first node to ask computes every gradient with
    /// its upstream gradient (each node passes the same values on: candle hands them over as
    /// separate tensors); a slot asked for twice means a second backward.
    fn take(&self, slot: usize, upstream: &Tensor) -> Result<Option<Tensor>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.handed.is_none() {
            let grads = match std::mem::replace(&mut state.pending, Pending::Spent) {
                Pending::Ready(g) => {
                    let factor = upstream.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if factor == 1.0 {
                        g
                    } else {
                        Gradients {
                            embeddings: (&g.embeddings * factor)?,
                            weight: (&g.weight * factor)?,
                            bias: match &g.bias {
                                Some(b) => Some((b * factor)?),
                                None => None,
                            },
                        }
                    }
                }
                Pending::Deferred { problem, stats } => {
                    let up = problem.row_upstream(Some(upstream))?;
                    problem.second_pass(&stats, &up)?
                }
                Pending::Spent => unreachable!("spent only once handed"),
            };
            state.handed = Some([Some(grads.embeddings), Some(grads.weight), grads.bias]);
        }
        let slots = state.handed.as_mut().expect("set above");
        match slots.get_mut(slot).and_then(Option::take) {
            Some(g) => Ok(Some(g)),
            None => bail!(
                "{HEAD_OP}: this loss was already back-propagated; a head's loss hands its \
                 gradients over once (compute the loss again for another backward)"
            ),
        }
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Embeddings = 0,
    Weight = 1,
    Bias = 2,
}
