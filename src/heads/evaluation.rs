//! Evaluation: the head's input, cosines, logits (no margin) and predictions, composed from
//! plain candle ops (these hold [B, C]).

use candle_core::{DType, Result, Tensor, bail};

use super::MarginHead;
use super::form::{Form, form_of, normalize, row_norm};
use crate::config::{HEAD_OP, accumulation_dtype};

impl MarginHead {
    /// The op's input for `embeddings` \[B, D\], composed from plain candle ops (differentiable,
    /// holds \[B, C\]): cosines f̂·Ŵᵀ for the cosine heads (with sub-centers, each class's
    /// largest), squared distances for RBF, f·Wᵀ (+ b)
    /// for Softmax.
    ///
    /// # Errors
    /// Embeddings not of shape \[B, D\], or not of W's dtype and device.
    pub fn input(&self, embeddings: &Tensor) -> Result<Tensor> {
        self.check_embeddings(embeddings)?;
        let w = &self.weight;
        match form_of(&self.loss.head) {
            Form::Cosine => {
                let cosines =
                    normalize(embeddings, self.eps)?.matmul(&normalize(w, self.eps)?.t()?)?;
                // Sub-center ArcFace: each class's largest sub-center cosine.
                match self.sub_centers {
                    1 => Ok(cosines),
                    k => cosines
                        .reshape((cosines.dim(0)?, self.classes(), k))?
                        .max(2),
                }
            }
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
        if rows == 0 {
            return input.to_dtype(accumulation_dtype(input.dtype()));
        }
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

    /// The predicted class of each embedding, u32 \[B\]: the arg-max of [`MarginHead::logits`]
    /// (empty for an empty batch).
    ///
    /// # Errors
    /// As [`MarginHead::input`].
    pub fn predict(&self, embeddings: &Tensor) -> Result<Tensor> {
        let logits = self.logits(embeddings)?;
        if logits.dim(0)? == 0 {
            return Tensor::zeros(0, DType::U32, logits.device());
        }
        logits.argmax(1)
    }
}
