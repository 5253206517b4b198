//! [`MarginHead::loss_with_row_margins`]: the head's loss with a margin per row, the building
//! block of the adaptive heads (ElasticFace's drawn margins, MagFace's m(‖f‖)), through the
//! same passes over W as [`MarginHead::loss`].

use candle_core::{Result, Tensor};

use super::MarginHead;
use crate::config::{HEAD_OP, accumulation_dtype};
use crate::row_margins::margin_columns;

impl MarginHead {
    /// As [`MarginHead::loss`], with a margin per row in place of the head's: `margins` \[B\]
    /// for CosFace and ArcFace, [B, 3] = (m1, m2, m3) for Combined, any float dtype, as in
    /// [`crate::MarginSoftmaxLoss::loss_with_row_margins`]. The loss back-propagates into the
    /// margins too, so margins computed from the embeddings with candle ops (MagFace's
    /// m(‖f‖)) pass their gradient on to them. Chunking, Partial FC and the feature-norm scale
    /// work as with [`MarginHead::loss`]; the sharded loss has no per-row-margin variant yet.
    ///
    /// The gradient pass runs on the CPU only so far: on a CUDA device, a loss that takes a
    /// gradient returns an `Err` naming the op (the forward alone, whose per-row part runs on
    /// the host, works there).
    ///
    /// # Errors
    /// As [`MarginHead::loss`], and for: a head other than CosFace, ArcFace and Combined;
    /// `margins` of another shape, of a dtype other than f16, bf16, f32 and f64, or on another
    /// device than W; a CUDA device when the loss takes a gradient.
    pub fn loss_with_row_margins(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        margins: &Tensor,
    ) -> Result<Tensor> {
        let rows = self.check_embeddings(embeddings)?;
        let prefix = format!("{HEAD_OP}({})", self.name());
        let acc = accumulation_dtype(self.weight.dtype());
        let m123 = margin_columns(
            &self.loss.head,
            &prefix,
            rows,
            margins,
            self.weight.device(),
            acc,
        )?;
        self.loss_impl(embeddings, targets, None, Some(&m123))
    }
}
