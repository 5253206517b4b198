//! ElasticFace (Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition",
//! CVPR Workshops 2022), as its official code computes it (fdbtrs/ElasticFace,
//! `utils/losses.py`: `ElasticArcFace`, `ElasticCosFace`; `config/config*.py`):
//!
//! 1. each row whose target is not ignored draws its margin m_i ~ N(m, σ) (m the head's, σ = 0.05
//!    in the official configs), in row order;
//! 2. "plus": the drawn margins sorted ascending are gathered by the rows' ranks of target cosine
//!    (descending), m'_i = sorted[rank_order[i]], as `margin[idicate_cosie]` does;
//! 3. the ArcFace (cos(θ_y + m_i)) or CosFace (c_y − m_i) loss with those per-row margins, which
//!    take no gradient (`MarginHead::loss_with_row_margins`).
//!
//! The draws are the crate's own: Box–Muller on SplitMix64 seeded by (seed, step), so a seed and
//! a step give the same margins on every backend and rank ([`ElasticFace::draw`]); the step
//! advances once per training call ([`MarginHead::loss`]), never in evaluation.

use std::sync::atomic::Ordering;

use candle_core::{DType, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use super::MarginHead;
use super::batch::Sharding;
use super::form::normalize;
use super::partial_fc::SplitMix64;
use crate::config::{HEAD_OP, Head, accumulation_dtype};
use crate::row_margins::margin_columns;

/// ElasticFace's settings ([`MarginHead::elastic`]): the margins' standard deviation σ (their
/// mean is the head's m), the "plus" ordering, and the draws' seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ElasticFace {
    pub std: f64,
    pub plus: bool,
    pub seed: u64,
}

impl Default for ElasticFace {
    /// σ = 0.05 (the official configs), no "plus", seed 0.
    fn default() -> Self {
        Self {
            std: 0.05,
            plus: false,
            seed: 0,
        }
    }
}

impl ElasticFace {
    /// ElasticArcFace's head in the official config: ArcFace, s = 64, m = 0.5.
    pub fn arcface_head() -> Head {
        Head::ArcFace {
            s: 64.0,
            m: 0.5,
            easy_margin: false,
        }
    }

    /// ElasticCosFace's head in the official config: CosFace, s = 64, m = 0.35.
    pub fn cosface_head() -> Head {
        Head::CosFace { s: 64.0, m: 0.35 }
    }

    /// The margins of training step `step` for `rows` rows (those whose target is not ignored,
    /// in order): mean + σ·z_k, z_k standard normal (Box–Muller, the cosine branch, on
    /// SplitMix64 seeded by the seed and the step).
    pub fn draw(&self, mean: f64, step: u64, rows: usize) -> Vec<f64> {
        let mut rng = SplitMix64(self.seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
        let unit = |bits: u64| ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64; // (0, 1]
        (0..rows)
            .map(|_| {
                let (u1, u2) = (unit(rng.next()), unit(rng.next()));
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                mean + self.std * z
            })
            .collect()
    }
}

impl MarginHead {
    /// Makes this head ElasticFace (ElasticArcFace on an ArcFace head, ElasticCosFace on a
    /// CosFace head): every training call ([`MarginHead::loss`]) draws each row's margin (see
    /// [`ElasticFace`] and `heads::elastic`). The step counter starts at 0
    /// ([`MarginHead::set_elastic_step`] restores it from a checkpoint).
    ///
    /// # Errors
    /// A head other than ArcFace and CosFace; σ not finite or negative; a MagFace head.
    pub fn elastic(mut self, elastic: ElasticFace) -> Result<Self> {
        let prefix = format!("{HEAD_OP}({})", self.name());
        if !matches!(self.loss.head, Head::ArcFace { .. } | Head::CosFace { .. }) {
            bail!("{prefix}: ElasticFace needs the ArcFace or CosFace head")
        }
        if !(elastic.std.is_finite() && elastic.std >= 0.0) {
            bail!(
                "{prefix}: ElasticFace's std must be finite and >= 0, got {}",
                elastic.std
            )
        }
        if self.magface.is_some() {
            bail!("{prefix}: a head is MagFace or ElasticFace, not both")
        }
        self.elastic = Some(elastic);
        Ok(self)
    }

    /// As [`MarginHead::elastic`], with the step kept as the variable `elastic_step` (f64 \[1\])
    /// of `vb`, so that a `VarMap` saves and loads it with W (safetensors): a head rebuilt from
    /// a checkpoint goes on drawing where the saved one stopped. Load the `VarMap` after
    /// building the head, as for W. The step is then read and written at each training call
    /// (one host read: make a head's training calls from one thread).
    ///
    /// # Errors
    /// As [`MarginHead::elastic`], and `vb`'s errors (e.g. a stored `elastic_step` of another
    /// shape).
    pub fn elastic_with_state(self, elastic: ElasticFace, vb: VarBuilder) -> Result<Self> {
        let state = vb.get_with_hints_dtype(1, "elastic_step", Init::Const(0.0), DType::F64)?;
        let mut head = self.elastic(elastic)?;
        head.elastic_state = Some(state);
        Ok(head)
    }

    /// ElasticFace's step: the training calls so far (the next call draws step `elastic_step()`).
    ///
    /// # Errors
    /// Reading the step's variable ([`MarginHead::elastic_with_state`]) failed.
    pub fn elastic_step(&self) -> Result<u64> {
        match &self.elastic_state {
            Some(state) => Ok(state.to_vec1::<f64>()?[0] as u64),
            None => Ok(self.elastic_steps.load(Ordering::Relaxed)),
        }
    }

    /// Sets ElasticFace's step (to resume a run without a `VarMap`).
    ///
    /// # Errors
    /// Writing the step's variable failed.
    pub fn set_elastic_step(&self, step: u64) -> Result<()> {
        match &self.elastic_state {
            Some(state) => state.slice_set(&Tensor::new(&[step as f64], state.device())?, 0, 0),
            None => {
                self.elastic_steps.store(step, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// The step of this training call, advancing the counter.
    fn next_elastic_step(&self) -> Result<u64> {
        match &self.elastic_state {
            Some(_) => {
                let step = self.elastic_step()?;
                self.set_elastic_step(step + 1)?;
                Ok(step)
            }
            None => Ok(self.elastic_steps.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The ElasticFace loss (steps 1–3 of the module docs).
    pub(super) fn elastic_loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        elastic: &ElasticFace,
        sharding: Option<Sharding>,
    ) -> Result<Tensor> {
        // Every call advances the step, a failing one too, so that the ranks of a sharded loss
        // stay on the same step.
        let step = self.next_elastic_step()?;
        let shard = sharding.as_ref().map(|s| s.shard);
        let host_targets = match self.check_call(embeddings, targets, shard) {
            Ok((t, _)) => t,
            // Sharded, the rank still joins the agreement, which carries its error to the others.
            Err(_) if sharding.is_some() => {
                return self.loss_impl(embeddings, targets, sharding, None);
            }
            Err(e) => return Err(e),
        };
        let mean = match self.loss.head {
            Head::ArcFace { m, .. } | Head::CosFace { m, .. } => m,
            // `elastic` and `set_config` keep the head ArcFace or CosFace.
            other => bail!(
                "{HEAD_OP}({}): ElasticFace needs the ArcFace or CosFace head",
                other.name()
            ),
        };
        let valid: Vec<(usize, usize)> = host_targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|y| (i, y)))
            .collect();
        let mut drawn = elastic.draw(mean, step, valid.len());
        if elastic.plus && !valid.is_empty() {
            let cosines = self.target_cosines(embeddings, &valid)?;
            let mut by_cosine: Vec<usize> = (0..valid.len()).collect();
            by_cosine.sort_by(|&a, &b| cosines[b].total_cmp(&cosines[a]));
            let mut sorted = drawn.clone();
            sorted.sort_by(f64::total_cmp);
            drawn = by_cosine.iter().map(|&k| sorted[k]).collect();
        }
        let mut margins = vec![mean; host_targets.len()];
        for (&(i, _), m) in valid.iter().zip(drawn) {
            margins[i] = m;
        }
        let acc = accumulation_dtype(self.weight.dtype());
        let dev = self.weight.device();
        let margins = Tensor::from_vec(margins, host_targets.len(), dev)?.to_dtype(acc)?;
        let prefix = format!("{HEAD_OP}({})", self.name());
        let rows = host_targets.len();
        let m123 = margin_columns(&self.loss.head, &prefix, rows, &margins, dev, acc)?;
        self.loss_impl(embeddings, targets, sharding, Some(&m123))
    }

    /// f̂_i·Ŵ_{y_i} for the rows `valid` = (row, target), on the host (f64).
    fn target_cosines(&self, embeddings: &Tensor, valid: &[(usize, usize)]) -> Result<Vec<f64>> {
        let dev = self.weight.device();
        let rows: Vec<u32> = valid.iter().map(|&(i, _)| i as u32).collect();
        let classes: Vec<u32> = valid.iter().map(|&(_, y)| y as u32).collect();
        let n = valid.len();
        let f = embeddings
            .detach()
            .to_dtype(DType::F64)?
            .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
        let w = self
            .weight
            .detach()
            .to_dtype(DType::F64)?
            .index_select(&Tensor::from_vec(classes, n, dev)?, 0)?;
        normalize(&f, self.eps)?
            .mul(&normalize(&w, self.eps)?)?
            .sum(1)?
            .to_vec1::<f64>()
    }
}
