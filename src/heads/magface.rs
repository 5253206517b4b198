//! MagFace (Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
//! Assessment", CVPR 2021), as its official code computes it (IrvingMeng/MagFace,
//! `models/magface.py`: `MagLinear`, `MagLoss`; the defaults of its training script):
//!
//! 1. a_i = clamp(‖f_i‖, l_a, u_a), differentiable inside the interval (PyTorch's `clamp`);
//! 2. m(a_i) = (u_m − l_m)/(u_a − l_a)·(a_i − l_a) + l_m, the row's ArcFace margin (not
//!    detached: the loss reaches the embeddings through it);
//! 3. the ArcFace loss with those per-row margins (`MarginHead::loss_with_row_margins`): the
//!    easy margin as `MagLinear`'s default, or the fallback cos θ − sin(π − m)·m below
//!    θ = π − m, both per row;
//! 4. the regulariser λ_g·g(a_i), g(a) = a/u_a² + 1/a, averaged over the batch as `MagLoss`
//!    does (`torch.mean(g)`) and added to the loss.

use candle_core::{Result, Tensor, bail};

use super::MarginHead;
use super::batch::Sharding;
use crate::config::{HEAD_OP, Head, Reduction, accumulation_dtype};
use crate::row_margins::margin_columns;

/// MagFace's hyper-parameters ([`MarginHead::magface`]). The defaults are those of the official
/// training script: a ∈ [10, 110], m ∈ [0.45, 0.8], λ_g = 35 (with s = 64 and the easy margin:
/// [`MagFace::head`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MagFace {
    /// l_a, u_a: the feature norm's range (the norm is clamped to it).
    pub l_a: f64,
    pub u_a: f64,
    /// l_m, u_m: the margins at l_a and u_a.
    pub l_margin: f64,
    pub u_margin: f64,
    /// λ_g: the regulariser's weight.
    pub lambda_g: f64,
}

impl Default for MagFace {
    fn default() -> Self {
        Self {
            l_a: 10.0,
            u_a: 110.0,
            l_margin: 0.45,
            u_margin: 0.8,
            lambda_g: 35.0,
        }
    }
}

impl MagFace {
    /// The head MagFace's official code trains with: ArcFace, s = 64, the easy margin
    /// (`MagLinear`'s default; the fixed m is not used: every row takes m(‖f‖)).
    pub fn head() -> Head {
        Head::ArcFace {
            s: 64.0,
            m: 0.5,
            easy_margin: true,
        }
    }

    fn validate(&self, prefix: &str) -> Result<()> {
        let finite = [
            self.l_a,
            self.u_a,
            self.l_margin,
            self.u_margin,
            self.lambda_g,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !(finite && 0.0 < self.l_a && self.l_a < self.u_a) || self.lambda_g < 0.0 {
            bail!(
                "{prefix}: MagFace needs finite parameters with 0 < l_a < u_a and lambda_g >= 0, \
                 got {self:?}"
            )
        }
        Ok(())
    }
}

impl MarginHead {
    /// Makes this head MagFace: [`MarginHead::loss`] then gives each row the ArcFace margin
    /// m(‖f‖) and adds the regulariser λ_g·g(‖f‖) (see [`MagFace`] and the module docs of
    /// `heads::magface`). With [`Reduction::Mean`] the regulariser is averaged over the batch
    /// (every row, as the official code has no ignored rows), with `Sum` summed, with `None`
    /// added to each row's loss. No state: evaluation calls are unchanged.
    ///
    /// # Errors
    /// A head other than ArcFace; parameters that are not finite, or not 0 < l_a < u_a and
    /// λ_g ≥ 0.
    pub fn magface(mut self, magface: MagFace) -> Result<Self> {
        let prefix = format!("{HEAD_OP}({})", self.name());
        if !matches!(self.loss.head, Head::ArcFace { .. }) {
            bail!("{prefix}: MagFace needs the ArcFace head (MagFace::head() is the official one)")
        }
        magface.validate(&prefix)?;
        if self.elastic.is_some() {
            bail!("{prefix}: a head is MagFace or ElasticFace, not both")
        }
        self.magface = Some(magface);
        Ok(self)
    }

    /// The MagFace loss (steps 1–4 of the module docs).
    pub(super) fn magface_loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        mf: &MagFace,
        sharding: Option<Sharding>,
    ) -> Result<Tensor> {
        let rows = match self.check_embeddings(embeddings) {
            Ok(rows) => rows,
            // Sharded, the rank still joins the agreement, which carries its error to the others.
            Err(_) if sharding.is_some() => {
                return self.loss_impl(embeddings, targets, sharding, None);
            }
            Err(e) => return Err(e),
        };
        let acc = accumulation_dtype(self.weight.dtype());
        let f = embeddings.to_dtype(acc)?;
        // ‖f‖, kept off 0 so that the square root's derivative stays finite there (such a norm
        // is clamped to l_a > 0 anyway, and takes no gradient).
        let norm = f.sqr()?.sum(1)?.maximum(1e-30)?.sqrt()?;
        let inside = norm.ge(mf.l_a)?.mul(&norm.le(mf.u_a)?)?;
        let a = inside.where_cond(&norm, &norm.clamp(mf.l_a, mf.u_a)?.detach())?;
        let slope = (mf.u_margin - mf.l_margin) / (mf.u_a - mf.l_a);
        let margins = ((&a - mf.l_a)? * slope)? + mf.l_margin;
        let prefix = format!("{HEAD_OP}({})", self.name());
        let m123 = margin_columns(
            &self.loss.head,
            &prefix,
            rows,
            &margins?,
            self.weight.device(),
            acc,
        )?;
        let loss = self.loss_impl(embeddings, targets, sharding, Some(&m123))?;
        let g = ((&a / (mf.u_a * mf.u_a))? + a.recip()?)?;
        let regulariser = match self.loss.reduction {
            Reduction::None => g,
            Reduction::Sum => g.sum_all()?,
            Reduction::Mean if rows == 0 => g.sum_all()?,
            Reduction::Mean => g.mean_all()?,
        };
        let dtype = loss.dtype();
        loss + (regulariser * mf.lambda_g)?.to_dtype(dtype)?
    }
}
