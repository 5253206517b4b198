//! Class sharding (model parallelism): W and the logits split by class over ranks, each rank
//! holding one contiguous slice of the classes ([`ClassShard`]). A sharded loss exchanges only a
//! few values per row through a [`Communicator`]: each rank's online softmax state over its
//! slice (max, Σ exp, and the sums the criterion options need) and its targets' inputs, and, for
//! the embeddings' gradient, the [B, D] partial sums. Every rank merges the gathered states in
//! rank order, so every rank computes the same bits whatever the timing.
//!
//! Before it computes anything, a sharded loss makes the ranks agree (`agreement`): every rank
//! sends its shard, B, the input dtype and fingerprints of the configuration and the targets, or
//! the error of its own checks, and every rank returns the same `Err` unless all passed, the
//! shards tile the classes exactly once and everything else is equal.
//!
//! [`InProcessGroup`] runs N ranks in one process, one thread per rank (a gather waits for every
//! rank, so the ranks cannot take turns on one thread), with a deadline on every gather, for
//! tests and CPU users; with the feature `nccl`, [`NcclCommunicator`] is one GPU's rank over
//! NCCL, with the same deadline kept by a watchdog (`watchdog`) as PyTorch's.

mod agreement;
mod in_process;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
mod watchdog;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device, Error, Result, Tensor, bail};

pub(crate) use agreement::{Terms, agree, config_fingerprint, targets_fingerprint};
pub use in_process::{InProcessCommunicator, InProcessGroup};
#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;

use crate::config::{ClassWeights, MarginSoftmaxLoss, OP_NAME, Reduction, accumulation_dtype};
use crate::gradient_handover::{GradientSource, hand_over};
use crate::layout;
use crate::loss::{check_inputs, reduce};
use crate::op;
use crate::targets_and_weights::{upstream_factor, validate_targets};

/// How long a collective waits for the other ranks unless told otherwise, for every
/// communicator of the crate: 10 minutes, the default timeout of
/// `torch.distributed.init_process_group`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Which classes a rank holds: `count` classes from `offset`, out of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassShard {
    pub offset: usize,
    pub count: usize,
    pub total: usize,
}

impl ClassShard {
    /// The shard of `rank` when `total` classes are split over `ranks` as evenly as possible:
    /// the first `total % ranks` ranks hold one class more. Every rank holds at least one class
    /// (as [`ClassShard::validate`] requires), so `total` must be at least `ranks`.
    ///
    /// # Errors
    /// An `Err` starting with `class_shard` for `ranks` = 0, `rank` ≥ `ranks`, or fewer classes
    /// than ranks.
    pub fn even(total: usize, ranks: usize, rank: usize) -> Result<Self> {
        if ranks == 0 || rank >= ranks {
            bail!("class_shard: shard {rank} of {ranks} ranks does not exist")
        }
        if total < ranks {
            bail!(
                "class_shard: {total} classes cannot be split over {ranks} ranks (every rank \
                 holds at least one class)"
            )
        }
        let base = total / ranks;
        let extra = total % ranks;
        let offset = rank * base + rank.min(extra);
        Ok(Self {
            offset,
            count: base + usize::from(rank < extra),
            total,
        })
    }

    /// Checks `offset + count ≤ total` and `count` ≥ 1 (a rank holds at least one class). That
    /// the ranks' shards tile [0, total) exactly once is checked by the sharded loss itself,
    /// which sees every rank's shard.
    ///
    /// # Errors
    /// An `Err` starting with `class_shard` for a shard outside the class range or an empty one.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0
            || self
                .offset
                .checked_add(self.count)
                .is_none_or(|e| e > self.total)
        {
            bail!(
                "class_shard: shard of {} classes from {} is not a non-empty part of {} classes",
                self.count,
                self.offset,
                self.total
            )
        }
        Ok(())
    }
}

/// The collective a sharded loss needs, implemented over NCCL, threads, or anything else.
pub trait Communicator: Send + Sync {
    /// This rank, in 0..world_size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `t` (the same shape and dtype on every rank) stacked in rank order:
    /// [world_size, ..t's shape], on `t`'s device. Every rank must call it, in the same order.
    ///
    /// # Errors
    /// A failed exchange, or tensors of different shapes or dtypes across ranks.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
}

/// `comm.all_gather(t)`, its error prefixed with the op and what was exchanged.
fn gather(op: &str, what: &str, comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    comm.all_gather(t)
        .map_err(|e| Error::Msg(format!("{op}: the exchange of {what} failed: {e}")))
}

/// The sum over ranks of each rank's `t`, added in rank order (the same bits on every rank).
pub(crate) fn all_reduce_sum(
    op: &str,
    what: &str,
    comm: &dyn Communicator,
    t: &Tensor,
) -> Result<Tensor> {
    let gathered = gather(op, what, comm, t)?;
    let mut sum = gathered.get(0)?;
    for k in 1..comm.world_size() {
        sum = (sum + gathered.get(k)?)?;
    }
    Ok(sum)
}

/// Gathers every rank's merged slice states [B, PARTIAL_COLUMNS], target inputs \[B\] and which
/// rows' targets it holds (`owned`), and merges the ranks' states in rank order: the states of
/// whole rows and their target inputs, the same bits on every rank.
/// An empty batch (which every rank has, since the ranks agreed on B) exchanges nothing.
pub(crate) fn exchange_states(
    op: &str,
    comm: &dyn Communicator,
    merged: &Tensor,
    target_inputs: &Tensor,
    owned: Vec<u8>,
) -> Result<(Tensor, Tensor)> {
    let rows = owned.len();
    if rows == 0 {
        return Ok((merged.clone(), target_inputs.clone()));
    }
    let dev = merged.device();
    let owns = Tensor::from_vec(owned, rows, dev)?.to_dtype(merged.dtype())?;
    let packed = Tensor::cat(
        &[merged, &target_inputs.unsqueeze(1)?, &owns.unsqueeze(1)?],
        1,
    )?;
    let all = gather(op, "the row states", comm, &packed)?;
    let mut states = Vec::with_capacity(all.dim(0)?);
    let mut inputs = target_inputs.clone();
    for k in 0..all.dim(0)? {
        let part = all.get(k)?;
        states.push(part.narrow(1, 0, layout::PARTIAL_COLUMNS)?);
        let owns_k = part
            .narrow(1, layout::PARTIAL_COLUMNS + 1, 1)?
            .squeeze(1)?
            .ne(0.0)?;
        let input_k = part.narrow(1, layout::PARTIAL_COLUMNS, 1)?.squeeze(1)?;
        inputs = owns_k.where_cond(&input_k, &inputs)?;
    }
    Ok((op::merge_partials(&states)?, inputs))
}

impl MarginSoftmaxLoss {
    /// The loss over all `shard.total` classes when this rank holds the input of its classes
    /// only: `input` \[B, shard.count\] (cosines, squared distances or logits, as for
    /// [`MarginSoftmaxLoss::loss`]) of the classes `shard.offset..`, `targets` \[B\] global class
    /// indices (u8, u32 or i64, or `ignore_index`), the same on every rank. The ranks exchange
    /// through `comm` a few values per row (each rank's online softmax state and its targets'
    /// inputs), merged in rank order: every rank returns the same loss, equal to
    /// [`MarginSoftmaxLoss::loss`] on the whole \[B, total\] input up to rounding, with the same
    /// bits on every rank. Differentiable into `input` (this rank's columns of the gradient; the
    /// backward needs no exchange). Class weights, if any, are those of all `total` classes.
    /// The head's fixed scale (no per-row scale).
    ///
    /// Before computing, the ranks agree (one small exchange): each sends its shard, B, the input
    /// dtype and fingerprints of this configuration and of the targets, or the error of its own
    /// checks. Every rank must call it, in the same order.
    ///
    /// # Errors
    /// The same `Err` on every rank, starting with `margin_softmax_ce(<head>)`, when:
    /// - a rank's own checks fail (the error names the rank and carries its message): those of
    ///   [`MarginSoftmaxLoss::loss`] for the whole problem (targets checked against
    ///   `shard.total`), an input whose width is not `shard.count`, class weights whose length
    ///   is not `shard.total`, or a shard that [`ClassShard::validate`] rejects;
    /// - the ranks disagree on B, the input dtype, the total, the configuration or the targets
    ///   (the field and the ranks);
    /// - the shards overlap, repeat or leave classes uncovered;
    /// - an exchange fails: a rank that does not arrive before the communicator's deadline (the
    ///   round and the missing ranks), a rank that left, or a group poisoned by an earlier
    ///   failure (its cause).
    pub fn sharded_loss(
        &self,
        input: &Tensor,
        targets: &Tensor,
        shard: ClassShard,
        comm: Arc<dyn Communicator>,
    ) -> Result<Tensor> {
        let op = format!("{OP_NAME}({})", self.head.name());
        let local = self.sharded_checks(&op, input, targets, shard);
        let terms = local.as_ref().map(|(terms, _)| *terms);
        agree(&op, comm.as_ref(), input.device(), terms)?;
        // Every rank passed its own checks, this one included.
        let (terms, host_targets) = local?;
        let rows = terms.rows;
        if rows == 0 {
            // Loss 0 and gradient 0, as unsharded (the class weights play no part).
            let mut whole = self.clone();
            whole.class_weights = None;
            return whole.loss(input, targets);
        }
        let acc = accumulation_dtype(input.dtype());
        let dev = input.device();
        let cfg = self.clone().ignore_index(Some(-1)).check_targets(false);
        let scale = Tensor::full(self.head.scale(), rows, dev)?.to_dtype(acc)?;
        let x = input.detach().contiguous()?;
        let local = local_targets(&host_targets, shard.offset, shard.count);
        let slice_cfg = slice_weights(&cfg, shard.offset, shard.count, false, dev)?;
        let states = op::slice_partials(&slice_cfg, &x, local.clone(), &scale, false)?;
        let mut owned = vec![0u8; rows];
        let inputs =
            op::pick_target_inputs(&x, &local, &Tensor::zeros(rows, acc, dev)?, &mut owned)?;
        let (merged, inputs) = exchange_states(&op, comm.as_ref(), &states, &inputs, owned)?;
        let stats = op::finalize(
            &cfg,
            shard.total,
            &host_targets,
            &merged,
            &inputs,
            &scale,
            false,
        )?;
        let loss = reduce(self.reduction, &stats)?;
        if !input.track_op() {
            return Ok(loss);
        }
        let weights: Option<Vec<f64>> = self.class_weights.as_ref().map(|w| w.values().to_vec());
        let factor =
            upstream_factor::<f64>(&host_targets, &weights, self.reduction == Reduction::Mean);
        let source = Arc::new(ShardGradient {
            pending: Mutex::new(Some(ShardBackward {
                cfg: slice_weights(&cfg, shard.offset, shard.count, true, dev)?,
                x,
                local,
                stats,
                scale,
                factor,
            })),
        });
        hand_over(OP_NAME, &loss, &[(0, Some(input))], source)
    }

    /// This rank's own checks of a sharded call: its terms for the agreement and the targets.
    fn sharded_checks(
        &self,
        op: &str,
        input: &Tensor,
        targets: &Tensor,
        shard: ClassShard,
    ) -> Result<(Terms, Vec<Option<usize>>)> {
        shard
            .validate()
            .map_err(|e| Error::Msg(format!("{op}: {e}")))?;
        if input.rank() != 2 || input.dim(1)? != shard.count {
            bail!(
                "{op}: a sharded input must have shape [B, shard.count] = [B, {}], got {:?}",
                shard.count,
                input.dims()
            )
        }
        // The shape and dtype checks of the unsharded op, with the class weights of all classes
        // checked against the whole width.
        let mut whole = self.clone();
        whole.class_weights = None;
        let (rows, _) = check_inputs(&whole, input, targets, None)?;
        if let Some(w) = &self.class_weights
            && w.len() != shard.total
        {
            bail!(
                "{op}: class_weights must have shape [C] = [{}] (all classes), got [{}]",
                shard.total,
                w.len()
            )
        }
        let values: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
        let host_targets = validate_targets(&values, self, shard.total)?;
        let terms = Terms {
            shard,
            rows,
            dtype: input.dtype(),
            config: config_fingerprint(self, ""),
            targets: targets_fingerprint(&values),
        };
        Ok((terms, host_targets))
    }
}

/// Each row's target as a column of the classes [offset, offset + count): −1 for an ignored
/// row, `count` (no column) for a target outside them.
pub(crate) fn local_targets(targets: &[Option<usize>], offset: usize, count: usize) -> Vec<i64> {
    targets
        .iter()
        .map(|t| match t {
            None => -1,
            Some(y) if (offset..offset + count).contains(y) => (y - offset) as i64,
            Some(_) => count as i64,
        })
        .collect()
}

/// `cfg` with the class weights of the classes [offset, offset + count) only, and one more
/// (1, never read for a loss) for the padding column of the gradient when `pad`.
pub(crate) fn slice_weights(
    cfg: &MarginSoftmaxLoss,
    offset: usize,
    count: usize,
    pad: bool,
    dev: &Device,
) -> Result<MarginSoftmaxLoss> {
    let mut out = cfg.clone();
    if let Some(w) = &cfg.class_weights {
        let mut values = w.values()[offset..offset + count].to_vec();
        if pad {
            values.push(1.0);
        }
        let n = values.len();
        out.class_weights = Some(ClassWeights::new(&Tensor::from_vec(values, n, dev)?)?);
    }
    Ok(out)
}

/// The gradient of a slice of the classes \[B, c\] from the statistics of whole rows: the op's
/// backward over the slice padded with one column. The op's backward treats the target's column
/// specially, so the rows whose target lies in another slice (or on another rank) point at the
/// padding column (`local` = c), whose gradient is dropped.
pub(crate) fn slice_gradient(
    cfg_padded: &MarginSoftmaxLoss,
    x: &Tensor,
    local: &[i64],
    row_info: &Tensor,
) -> Result<Tensor> {
    let (rows, c) = x.dims2()?;
    let dev = x.device();
    let padded = Tensor::cat(&[x, &Tensor::zeros((rows, 1), x.dtype(), dev)?], 1)?;
    let local = Tensor::from_vec(local.to_vec(), rows, dev)?;
    op::gradient_from_row_info(cfg_padded, &padded, &local, row_info)?
        .narrow(1, 0, c)?
        .contiguous()
}

/// The row info [B, ROWINFO_COLUMNS] of the backward op from the statistics, with the per-row
/// upstream factor `upstream` \[B\] folded in.
pub(crate) fn row_info(stats: &Tensor, upstream: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let up = upstream.unsqueeze(1)?;
    // The row scale \[B\], or the row parameters (r, m1, m2, m3) [B, 4] with per-row margins.
    let per_row = if scale.rank() == 2 {
        scale.clone()
    } else {
        scale.unsqueeze(1)?
    };
    Tensor::cat(
        &[
            &stats.narrow(1, layout::STAT_MAX, 2)?,
            &stats
                .narrow(1, layout::STAT_GRAD_CONSTANTS, 3)?
                .broadcast_mul(&up)?,
            &per_row,
        ],
        1,
    )
}

/// What the backward of a sharded loss needs (its gradient is formed in `backward()`).
struct ShardBackward {
    cfg: MarginSoftmaxLoss,
    x: Tensor,
    local: Vec<i64>,
    stats: Tensor,
    scale: Tensor,
    /// 1/Σ w_y for the mean, else 1.
    factor: f64,
}

struct ShardGradient {
    pending: Mutex<Option<ShardBackward>>,
}

impl GradientSource for ShardGradient {
    fn take(&self, _slot: usize, upstream: &Tensor) -> Result<Option<Tensor>> {
        let Some(b) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            bail!(
                "{OP_NAME}: this sharded loss was already back-propagated (compute it again for \
                 another backward)"
            )
        };
        let rows = b.x.dim(0)?;
        let up = (upstream.to_dtype(b.scale.dtype())? * b.factor)?
            .broadcast_as(rows)?
            .contiguous()?;
        let info = row_info(&b.stats, &up, &b.scale)?;
        Ok(Some(slice_gradient(&b.cfg, &b.x, &b.local, &info)?))
    }
}
