//! Class sharding (model parallelism): W and the logits split by class over ranks, each rank
//! holding one contiguous slice of the classes ([`ClassShard`]). A sharded loss exchanges only a
//! few values per row through a [`Communicator`]: each rank's online softmax state over its
//! slice (max, Σ exp, and the sums the criterion options need) and its targets' inputs, and, for
//! the embeddings' gradient, the [B, D] partial sums. Every rank merges the gathered states in
//! rank order, so every rank computes the same bits whatever the timing.
//!
//! [`InProcessGroup`] runs N ranks in one process, one thread per rank (a gather waits for every
//! rank, so the ranks cannot take turns on one thread), for tests and CPU users; with the
//! feature `nccl`, [`NcclCommunicator`] wraps a cudarc NCCL communicator, one per GPU.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device, Result, Tensor, bail};

use crate::config::{
    ClassWeights, HEAD_OP, MarginSoftmaxLoss, OP_NAME, Reduction, accumulation_dtype,
};
use crate::gradient_handover::{GradientSource, hand_over};
use crate::layout;
use crate::loss::{check_inputs, reduce};
use crate::op;
use crate::targets_and_weights::{upstream_factor, validate_targets};

/// Which classes a rank holds: `count` classes from `offset`, out of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassShard {
    pub offset: usize,
    pub count: usize,
    pub total: usize,
}

impl ClassShard {
    /// The shard of `rank` when `total` classes are split over `ranks` as evenly as possible:
    /// the first `total % ranks` ranks hold one class more.
    ///
    /// # Errors
    /// `ranks` = 0 or `rank` ≥ `ranks`.
    pub fn even(total: usize, ranks: usize, rank: usize) -> Result<Self> {
        if ranks == 0 || rank >= ranks {
            bail!("{HEAD_OP}: shard {rank} of {ranks} ranks does not exist")
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

    /// Checks `offset + count ≤ total` and `count` ≥ 1 (a rank holds at least one class).
    ///
    /// # Errors
    /// A shard outside the class range, or an empty one.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0
            || self
                .offset
                .checked_add(self.count)
                .is_none_or(|e| e > self.total)
        {
            bail!(
                "{HEAD_OP}: shard of {} classes from {} is not a non-empty part of {} classes",
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

/// The state the ranks of one [`InProcessGroup`] share.
struct Exchange {
    /// Each rank's contribution to the current round.
    slots: Vec<Option<Tensor>>,
    /// The gathered result of the last completed round, and how many ranks still have to read
    /// it.
    result: Option<(Tensor, usize)>,
    /// Completed rounds (a rank waits for the round it contributed to).
    round: u64,
    /// Set when a rank's contribution did not match; every waiting rank then fails.
    failed: Option<String>,
}

/// N ranks in one process: [`InProcessGroup::new`] returns one [`InProcessCommunicator`] per
/// rank, to be moved to one thread each (`all_gather` blocks until every rank has called it).
pub struct InProcessGroup;

impl InProcessGroup {
    /// The communicators of `ranks` ranks.
    ///
    /// # Errors
    /// `ranks` = 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(ranks: usize) -> Result<Vec<InProcessCommunicator>> {
        if ranks == 0 {
            bail!("{HEAD_OP}: an in-process group needs at least one rank")
        }
        let shared = Arc::new((
            Mutex::new(Exchange {
                slots: vec![None; ranks],
                result: None,
                round: 0,
                failed: None,
            }),
            Condvar::new(),
        ));
        Ok((0..ranks)
            .map(|rank| InProcessCommunicator {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect())
    }
}

/// One rank of an [`InProcessGroup`].
pub struct InProcessCommunicator {
    rank: usize,
    ranks: usize,
    shared: Arc<(Mutex<Exchange>, Condvar)>,
}

impl Communicator for InProcessCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.ranks
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let (lock, ready) = &*self.shared;
        let mut ex = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Wait until the previous round's result has been read by every rank.
        while ex.result.is_some() && ex.failed.is_none() {
            ex = ready.wait(ex).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(msg) = &ex.failed {
            bail!("{msg}")
        }
        let my_round = ex.round;
        ex.slots[self.rank] = Some(t.clone());
        if ex.slots.iter().all(Option::is_some) {
            let parts: Vec<Tensor> = ex
                .slots
                .iter_mut()
                .map(|s| s.take().expect("set"))
                .collect();
            let same = parts
                .iter()
                .all(|p| p.dims() == parts[0].dims() && p.dtype() == parts[0].dtype());
            if !same {
                ex.failed = Some(format!(
                    "{HEAD_OP}: all_gather got tensors of different shapes or dtypes across ranks"
                ));
                ready.notify_all();
                bail!("{}", ex.failed.clone().unwrap_or_default())
            }
            let stacked = Tensor::stack(&parts, 0)?;
            ex.result = Some((stacked, self.ranks));
            ex.round += 1;
            ready.notify_all();
        }
        while ex.round == my_round && ex.failed.is_none() {
            ex = ready.wait(ex).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(msg) = &ex.failed {
            bail!("{msg}")
        }
        let (result, left) = ex.result.as_mut().expect("a completed round has a result");
        let out = result.clone();
        *left -= 1;
        if *left == 0 {
            ex.result = None;
            ready.notify_all();
        }
        Ok(out)
    }
}

/// The sum over ranks of each rank's `t`, added in rank order (the same bits on every rank).
pub(crate) fn all_reduce_sum(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    let gathered = comm.all_gather(t)?;
    let mut sum = gathered.get(0)?;
    for k in 1..comm.world_size() {
        sum = (sum + gathered.get(k)?)?;
    }
    Ok(sum)
}

/// Gathers every rank's merged slice states [B, PARTIAL_COLUMNS], target inputs \[B\] and which
/// rows' targets it holds (`owned`), and merges the ranks' states in rank order: the states of
/// whole rows and their target inputs, the same bits on every rank.
pub(crate) fn exchange_states(
    comm: &dyn Communicator,
    merged: &Tensor,
    target_inputs: &Tensor,
    owned: Vec<u8>,
) -> Result<(Tensor, Tensor)> {
    let rows = owned.len();
    let dev = merged.device();
    let owns = Tensor::from_vec(owned, rows, dev)?.to_dtype(merged.dtype())?;
    let packed = Tensor::cat(
        &[merged, &target_inputs.unsqueeze(1)?, &owns.unsqueeze(1)?],
        1,
    )?;
    let all = comm.all_gather(&packed)?;
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
    /// # Errors
    /// As [`MarginSoftmaxLoss::loss`] for the whole problem (targets checked against
    /// `shard.total`), an input whose width is not `shard.count`, a shard that does not fit in
    /// its total, or a failed exchange. Every rank must call it, in the same order.
    pub fn sharded_loss(
        &self,
        input: &Tensor,
        targets: &Tensor,
        shard: ClassShard,
        comm: Arc<dyn Communicator>,
    ) -> Result<Tensor> {
        let name = self.head.name();
        shard.validate()?;
        if input.rank() != 2 || input.dim(1)? != shard.count {
            bail!(
                "{OP_NAME}({name}): a sharded input must have shape [B, shard.count] = [B, {}], got {:?}",
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
                "{OP_NAME}({name}): class_weights must have shape [C] = [{}] (all classes), got [{}]",
                shard.total,
                w.len()
            )
        }
        let values: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
        let host_targets = validate_targets(&values, self, shard.total)?;
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
        let (merged, inputs) = exchange_states(comm.as_ref(), &states, &inputs, owned)?;
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
    Tensor::cat(
        &[
            &stats.narrow(1, layout::STAT_MAX, 2)?,
            &stats
                .narrow(1, layout::STAT_GRAD_CONSTANTS, 3)?
                .broadcast_mul(&up)?,
            &scale.unsqueeze(1)?,
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

#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;

#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Mutex;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::Comm;
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail,
    };

    use super::Communicator;
    use crate::config::HEAD_OP;

    /// The NCCL communicator of one rank (one GPU, usually one process), through cudarc:
    /// [`Communicator::all_gather`] is `ncclAllGather` on the communicator's stream. Build the
    /// `Comm` on the stream of the candle device the tensors live on (e.g.
    /// `Comm::from_rank(device.cuda_stream(), rank, world_size, id)` with an `Id` made by rank
    /// 0 and sent to the others), so that NCCL and candle's kernels are ordered on one stream.
    pub struct NcclCommunicator {
        comm: Mutex<CommHandle>,
        rank: usize,
        world_size: usize,
    }

    /// The cudarc communicator, which holds a raw NCCL handle (neither `Send` nor `Sync`).
    struct CommHandle(Comm);

    // SAFETY: an NCCL communicator may be used from any host thread as long as no two threads use
    // it at once (NCCL's thread-safety rules); every use goes through the `Mutex` above.
    unsafe impl Send for CommHandle {}

    impl NcclCommunicator {
        /// Wraps a cudarc NCCL communicator.
        pub fn new(comm: Comm) -> Self {
            let (rank, world_size) = (comm.rank(), comm.world_size());
            Self {
                comm: Mutex::new(CommHandle(comm)),
                rank,
                world_size,
            }
        }
    }

    impl Communicator for NcclCommunicator {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world_size
        }

        fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            t.contiguous()?.apply_op1_no_bwd(&AllGather {
                comm: &comm.0,
                world_size: self.world_size,
            })
        }
    }

    /// `ncclAllGather` of a contiguous f32 / f64 tensor into [world_size, ..shape].
    struct AllGather<'c> {
        comm: &'c Comm,
        world_size: usize,
    }

    impl CustomOp1 for AllGather<'_> {
        fn name(&self) -> &'static str {
            "margin_head_nccl_all_gather"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("{HEAD_OP}: the NCCL communicator needs tensors on a CUDA device")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("{HEAD_OP}: all_gather needs a contiguous tensor")
            };
            let dev = storage.device().clone();
            let n = end - start;
            let nccl_err = |e| candle_core::Error::Msg(format!("{HEAD_OP}: ncclAllGather: {e:?}"));
            let out = match storage.dtype() {
                DType::F32 => {
                    let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
                    // SAFETY: ncclAllGather writes all world_size·n elements before any read.
                    let mut dst = unsafe { dev.alloc::<f32>(n * self.world_size) }?;
                    self.comm.all_gather(&src, &mut dst).map_err(nccl_err)?;
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }
                DType::F64 => {
                    let src = storage.as_cuda_slice::<f64>()?.slice(start..end);
                    // SAFETY: as above.
                    let mut dst = unsafe { dev.alloc::<f64>(n * self.world_size) }?;
                    self.comm.all_gather(&src, &mut dst).map_err(nccl_err)?;
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }
                other => bail!("{HEAD_OP}: all_gather of {other:?} tensors is not supported"),
            };
            let mut dims = vec![self.world_size];
            dims.extend_from_slice(layout.dims());
            Ok((out, Shape::from(dims)))
        }
    }
}
