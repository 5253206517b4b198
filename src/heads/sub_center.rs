//! Sub-center ArcFace (Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale
//! Noisy Web Faces", ECCV 2020; InsightFace `recognition/SubCenter-ArcFace`,
//! pytorch-metric-learning's `SubCenterArcFaceLoss`):
//!
//! 1. W holds K sub-centers per class, rows j·K .. (j + 1)·K for class j;
//! 2. a class's cosine is the largest of its sub-centers' cosines, cos_j = max_k f̂·Ŵ_{j,k},
//!    formed a slice of classes at a time in the head's passes (never [B, C·K] whole unless one
//!    slice covers every class), and the head's margin applies to it;
//! 3. the gradient of cos_j goes to its arg-max sub-center (the first on a tie), as the
//!    derivative of `max` does in PyTorch;
//! 4. after training, [`MarginHead::sub_center_outliers`] finds each class's dominant
//!    sub-center (the one most of its samples are closest to) and the samples farther than a
//!    threshold angle from it, as `SubCenterArcFaceLoss.get_outliers` does.

use candle_core::{DType, Result, Tensor, bail};

use super::MarginHead;
use super::form::{Form, form_of, normalize};
use crate::config::HEAD_OP;

/// What [`MarginHead::sub_center_outliers`] returns.
#[derive(Debug, Clone)]
pub struct SubCenterOutliers {
    /// The rows (sample indices) farther than the threshold from their class's dominant
    /// sub-center, by class and then by row, as pytorch-metric-learning lists them.
    pub outliers: Vec<usize>,
    /// Each class's dominant sub-center, W's row (not normalized): \[C, D\], W's dtype.
    pub dominant_centers: Tensor,
    /// Each class's dominant sub-center index in 0..K (0 for a class without samples).
    pub dominant: Vec<usize>,
}

impl MarginHead {
    /// Makes this head Sub-center ArcFace with `k` sub-centers per class: W's rows j·k ..
    /// (j + 1)·k are class j's (build it with `classes·k` rows, e.g. `MarginHead::new(loss, d,
    /// classes * k, vb)?.sub_centers(k)?`), and each class scores its largest sub-center cosine
    /// (see `heads::sub_center`). Every criterion option, per-row margins, MagFace and
    /// ElasticFace work with it; Partial FC and the sharded loss do not yet.
    ///
    /// # Errors
    /// `k` = 0; a head that is not a cosine head; W's row count not a multiple of `k`; Partial
    /// FC.
    pub fn sub_centers(mut self, k: usize) -> Result<Self> {
        let prefix = format!("{HEAD_OP}({})", self.name());
        if k == 0 {
            bail!("{prefix}: the number of sub-centers must be at least 1")
        }
        if form_of(&self.loss.head) != Form::Cosine {
            bail!("{prefix}: sub-centers need a cosine head")
        }
        let rows = self.weight.dims()[0];
        if !rows.is_multiple_of(k) {
            bail!("{prefix}: W's {rows} rows are not a multiple of {k} sub-centers")
        }
        if self.partial_fc.is_some() {
            bail!("{prefix}: Partial FC is not supported with sub-centers yet")
        }
        self.sub_centers = k;
        Ok(self)
    }

    /// The sub-centers per class (1 unless [`MarginHead::sub_centers`]).
    pub fn sub_center_count(&self) -> usize {
        self.sub_centers
    }

    /// The after-training step of Sub-center ArcFace: for each class with samples in
    /// `embeddings` / `targets`, its dominant sub-center (the one most of its samples have the
    /// largest cosine with; the lowest index on a tie) and the samples whose cosine with it is
    /// below cos(`threshold_degrees`) (pytorch-metric-learning's default: 75°). Retraining on
    /// the samples kept with the dominant centres as W is the paper's recipe. No gradient.
    ///
    /// # Errors
    /// As [`MarginHead::cosines`]; targets not u8 / u32 / i64 of shape \[B\] or out of range
    /// (ignored rows are skipped); a threshold that is not finite.
    pub fn sub_center_outliers(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        threshold_degrees: f64,
    ) -> Result<SubCenterOutliers> {
        let prefix = format!("{HEAD_OP}({})", self.name());
        if !threshold_degrees.is_finite() {
            bail!("{prefix}: the outlier threshold must be finite, got {threshold_degrees}")
        }
        let (targets, _) = self.check_call(embeddings, targets, None)?;
        let (k, classes) = (self.sub_centers, self.classes());
        let f = normalize(&embeddings.detach().to_dtype(DType::F64)?, self.eps)?;
        let w = normalize(&self.weight.detach().to_dtype(DType::F64)?, self.eps)?;
        // [B, C·K] on the host: an after-training step, not a training one.
        let cosines = f.matmul(&w.t()?)?.to_vec2::<f64>()?;
        let cos_threshold = threshold_degrees.to_radians().cos();
        let mut outliers = Vec::new();
        let mut dominant = vec![0usize; classes];
        for (class, best) in dominant.iter_mut().enumerate() {
            let members: Vec<usize> = (0..targets.len())
                .filter(|&i| targets[i] == Some(class))
                .collect();
            if members.is_empty() {
                continue;
            }
            let sub = |i: usize| &cosines[i][class * k..(class + 1) * k];
            let mut counts = vec![0usize; k];
            for &i in &members {
                counts[first_max(sub(i))] += 1;
            }
            *best = first_max(&counts);
            outliers.extend(members.iter().filter(|&&i| sub(i)[*best] < cos_threshold));
        }
        let rows: Vec<u32> = dominant
            .iter()
            .enumerate()
            .map(|(class, &d)| (class * k + d) as u32)
            .collect();
        let index = Tensor::from_vec(rows, classes, self.weight.device())?;
        Ok(SubCenterOutliers {
            outliers,
            dominant_centers: self.weight.detach().index_select(&index, 0)?,
            dominant,
        })
    }
}

/// The index of the largest value (the first on a tie), as `torch.argmax`.
fn first_max<T: PartialOrd>(values: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
